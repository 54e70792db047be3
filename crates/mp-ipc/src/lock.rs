//! [`Lock`] and [`RLock`]: robust mutual exclusion across processes and threads.
//!
//! ```
//! use mp_ipc::lock::{Lock, LockError};
//!
//! let lock = Lock::new()?;
//! {
//!     let _guard = lock.lock().map_err(LockError::without_guard)?; // released on drop
//!     assert!(lock.try_lock().is_err());
//! }
//! assert!(lock.try_lock().is_ok());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Both are glibc robust, process-shared mutexes in shared memory (see the
//! crate's `robust` module). A handle is cheap to clone and can be passed to a
//! child process as an argument: every clone, in every process, is the same
//! lock.
//!
//! **Robust:** when a process (or thread) dies holding the lock, the next
//! acquirer gets [`LockError::OwnerDied`], which carries the guard — the lock
//! is held and usable, but the data it protects may be half updated, much
//! like std's `PoisonError`. [`LockError::recover`] takes the guard out.
//! (CPython's lock stays locked forever in that case.)
//!
//! Acquiring a [`Lock`] already held by the calling thread is an error
//! ([`LockError::Deadlock`]) rather than a hang; use an [`RLock`] for
//! re-entrant locking. Guards are not `Send`: a lock is released by the thread
//! that acquired it.

use std::fmt;
use std::io;
use std::marker::PhantomData;
use std::mem::offset_of;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::robust::{Acquired, LockFailed, RobustMutex};
use crate::shm::{Shared, SharedMemory, ShmError, ShmState, tag};

/// Why a lock was not acquired cleanly.
///
/// `G` is what a successful call returns (a guard); [`OwnerDied`] carries it
/// because the lock *was* acquired.
///
/// [`OwnerDied`]: LockError::OwnerDied
#[derive(thiserror::Error)]
pub enum LockError<G> {
    /// The previous holder died (its process was killed, or its thread
    /// exited) while holding the lock. The lock is now held by the caller —
    /// the guard is inside — but the data it protects may be inconsistent.
    #[error(
        "the previous owner of the lock died while holding it (the lock is now held by the caller)"
    )]
    OwnerDied(G),
    /// `try_lock`: the lock is held by another thread or process.
    #[error("the lock is held elsewhere")]
    WouldBlock,
    /// `lock_timeout`: the lock was not acquired in time.
    #[error("timed out after {0:?} waiting for the lock")]
    Timeout(Duration),
    /// The calling thread already holds this lock; waiting would never end.
    #[error("the calling thread already holds this lock (a Lock is not re-entrant; use an RLock)")]
    Deadlock,
    /// The operating system reported an unexpected error.
    #[error("lock failed: {0}")]
    Os(#[source] io::Error),
}

impl<G> LockError<G> {
    /// The guard of an [`OwnerDied`](LockError::OwnerDied) error (the lock is
    /// held; the caller takes responsibility for the protected data); any
    /// other error is returned unchanged.
    ///
    /// ```
    /// # use mp_ipc::lock::{Lock, LockError};
    /// # let lock = Lock::new()?;
    /// let guard = lock.lock().or_else(LockError::recover).map_err(LockError::without_guard)?;
    /// # drop(guard);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn recover(self) -> Result<G, Self> {
        match self {
            LockError::OwnerDied(guard) => Ok(guard),
            other => Err(other),
        }
    }

    /// The same error without the guard (releasing the lock if it was
    /// held), e.g. to propagate it with `?` into a `Box<dyn Error>`, which
    /// cannot hold a borrowing guard.
    pub fn without_guard(self) -> LockError<()> {
        self.map(drop)
    }

    /// The guard, if the lock was acquired (i.e. [`OwnerDied`](LockError::OwnerDied)).
    pub fn into_guard(self) -> Option<G> {
        self.recover().ok()
    }

    /// Converts the guard inside, if any.
    pub(crate) fn map<H>(self, f: impl FnOnce(G) -> H) -> LockError<H> {
        match self {
            LockError::OwnerDied(guard) => LockError::OwnerDied(f(guard)),
            LockError::WouldBlock => LockError::WouldBlock,
            LockError::Timeout(timeout) => LockError::Timeout(timeout),
            LockError::Deadlock => LockError::Deadlock,
            LockError::Os(error) => LockError::Os(error),
        }
    }
}

impl<G> fmt::Debug for LockError<G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LockError::OwnerDied(_) => f.write_str("OwnerDied(..)"),
            LockError::WouldBlock => f.write_str("WouldBlock"),
            LockError::Timeout(timeout) => f.debug_tuple("Timeout").field(timeout).finish(),
            LockError::Deadlock => f.write_str("Deadlock"),
            LockError::Os(error) => f.debug_tuple("Os").field(error).finish(),
        }
    }
}

/// [`RLock::release`] by a thread that does not hold the lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("release of an RLock the calling thread does not hold")]
pub struct NotOwner;

/// Maps a raw mutex result to the public one; `guard` builds what a success
/// returns.
pub(crate) fn acquired<G>(
    result: Result<Acquired, LockFailed>,
    timeout: Option<Duration>,
    guard: impl FnOnce() -> G,
) -> Result<G, LockError<G>> {
    match result {
        Ok(Acquired::Clean) => Ok(guard()),
        Ok(Acquired::OwnerDied) => Err(LockError::OwnerDied(guard())),
        Err(LockFailed::TimedOut) => Err(LockError::Timeout(timeout.unwrap_or_default())),
        Err(LockFailed::WouldBlock) => Err(LockError::WouldBlock),
        Err(LockFailed::Deadlock) => Err(LockError::Deadlock),
        Err(LockFailed::Os(errno)) => Err(LockError::Os(io::Error::from_raw_os_error(errno))),
    }
}

/// `now + timeout`, or no deadline if that is beyond representable time.
pub(crate) fn deadline_after(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

/// Marker: a non-recursive (error-checking) mutex.
pub(crate) struct Plain;
/// Marker: a recursive mutex.
pub(crate) struct Recursive;

/// A robust mutex with a tag and an identity, as laid out in shared memory.
#[repr(C)]
pub(crate) struct MutexCell<K> {
    tag: u64,
    /// Distinguishes locks (a guard must belong to its condition's lock).
    id: u64,
    mutex: RobustMutex,
    kind: PhantomData<K>,
}

// SAFETY: repr(C), starts with the u64 tag, and the mutex is only used
// through the pthread API; `id` is written once before the cell is shared.
unsafe impl ShmState for MutexCell<Plain> {
    const TAG: u64 = tag(b"mp:Lock\0");
    const KIND: &'static str = "Lock";
}

// SAFETY: as for `MutexCell<Plain>`.
unsafe impl ShmState for MutexCell<Recursive> {
    const TAG: u64 = tag(b"mp:RLock");
    const KIND: &'static str = "RLock";
}

/// A fresh identity, unique among the locks of this machine in practice.
fn fresh_id() -> u64 {
    use std::hash::BuildHasher;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    // RandomState is seeded from the OS; hashing pid, time and a counter
    // makes collisions between live locks vanishingly unlikely.
    std::collections::hash_map::RandomState::new().hash_one((
        std::process::id(),
        Instant::now(),
        count,
    ))
}

/// A handle to a [`MutexCell`] that keeps its segment mapped.
struct MutexHandle<K>
where
    MutexCell<K>: ShmState,
{
    cell: Shared<MutexCell<K>>,
}

impl<K> Clone for MutexHandle<K>
where
    MutexCell<K>: ShmState,
{
    fn clone(&self) -> Self {
        Self {
            cell: self.cell.clone(),
        }
    }
}

impl<K> MutexHandle<K>
where
    MutexCell<K>: ShmState,
{
    fn create_in(shm: SharedMemory, offset: usize, recursive: bool) -> Result<Self, ShmError> {
        // SAFETY: the closure initialises every field of the cell (the
        // `PhantomData` has nothing to initialise).
        let cell = unsafe {
            Shared::<MutexCell<K>>::create_in(shm, offset, |cell| {
                let mutex = &raw mut (*cell).mutex;
                RobustMutex::init_at(mutex, recursive).map_err(|source| ShmError::Io {
                    op: "pthread_mutex_init",
                    source,
                })?;
                (&raw mut (*cell).id).write(fresh_id());
                // Publish the tag last: a cell with a valid tag is initialised.
                (*(&raw mut (*cell).tag).cast::<AtomicU64>())
                    .store(MutexCell::<K>::TAG, Ordering::Release);
                Ok(())
            })?
        };
        Ok(Self::tracked(cell))
    }

    fn attach(shm: SharedMemory, offset: usize) -> Result<Self, ShmError> {
        Self::checked(Shared::attach(shm, offset)?)
    }

    /// An attached cell, once its mutex is checked to be the robust,
    /// process-shared mutex of this kind: glibc aborts the process on some
    /// corrupted mutexes, so one another process wrote is checked first.
    fn checked(cell: Shared<MutexCell<K>>) -> Result<Self, ShmError> {
        let recursive = MutexCell::<K>::TAG == MutexCell::<Recursive>::TAG;
        if !cell.mutex.is_intact(recursive) {
            return Err(ShmError::WrongKind {
                expected: MutexCell::<K>::KIND,
                offset: cell.offset(),
            });
        }
        Ok(Self::tracked(cell))
    }

    fn tracked(cell: Shared<MutexCell<K>>) -> Self {
        cell.shm()
            .track_robust_mutex(cell.offset() + offset_of!(MutexCell<K>, mutex));
        Self { cell }
    }

    #[inline]
    fn mutex(&self) -> &RobustMutex {
        &self.cell.mutex
    }

    fn id(&self) -> u64 {
        self.cell.id
    }
}

impl<K> Serialize for MutexHandle<K>
where
    MutexCell<K>: ShmState,
{
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.cell.serialize(serializer)
    }
}

impl<'de, K> Deserialize<'de> for MutexHandle<K>
where
    MutexCell<K>: ShmState,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Self::checked(Shared::deserialize(deserializer)?).map_err(crate::decode_error::custom)
    }
}

/// A lock (Python's `multiprocessing.Lock`), robust against its holder dying.
///
/// Not re-entrant: acquiring it again from the holding thread is
/// [`LockError::Deadlock`]. Clones, and copies passed to child processes, are
/// the same lock.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Lock {
    handle: MutexHandle<Plain>,
}

impl Lock {
    /// A new, unlocked lock in its own shared memory.
    pub fn new() -> Result<Self, ShmError> {
        let shm = SharedMemory::new(size_of::<MutexCell<Plain>>())?;
        Self::create_in(shm, 0)
    }

    /// A new lock placed at `offset` of `shm` (for primitives that keep their
    /// lock beside their data).
    pub(crate) fn create_in(shm: SharedMemory, offset: usize) -> Result<Self, ShmError> {
        MutexHandle::create_in(shm, offset, false).map(|handle| Self { handle })
    }

    /// The lock at `offset` of `shm`, created there by [`Lock::create_in`].
    pub(crate) fn attach(shm: SharedMemory, offset: usize) -> Result<Self, ShmError> {
        MutexHandle::attach(shm, offset).map(|handle| Self { handle })
    }

    /// Size of a lock in shared memory (for layouts).
    pub(crate) const SIZE: usize = size_of::<MutexCell<Plain>>();

    /// Blocks until the lock is acquired.
    #[inline]
    pub fn lock(&self) -> Result<LockGuard<'_>, LockError<LockGuard<'_>>> {
        acquired(self.handle.mutex().lock(None), None, || {
            LockGuard::new(self)
        })
    }

    /// Acquires the lock if it is free, without waiting.
    #[inline]
    pub fn try_lock(&self) -> Result<LockGuard<'_>, LockError<LockGuard<'_>>> {
        acquired(self.handle.mutex().try_lock(), None, || {
            LockGuard::new(self)
        })
    }

    /// Blocks until the lock is acquired or `timeout` has passed
    /// ([`LockError::Timeout`]).
    pub fn lock_timeout(
        &self,
        timeout: Duration,
    ) -> Result<LockGuard<'_>, LockError<LockGuard<'_>>> {
        let result = self.handle.mutex().lock(deadline_after(timeout));
        acquired(result, Some(timeout), || LockGuard::new(self))
    }

    /// Whether some thread, in any process, holds the lock now (Python's
    /// `locked()`); it may change at any moment.
    pub fn locked(&self) -> bool {
        self.handle.mutex().owner_tid().is_some()
    }

    /// The kernel thread id (TID) of the holder, if any. For a
    /// single-threaded process, or the main thread of one, this is its pid.
    /// A holder that died reads as `None` (the kernel cleared its claim).
    pub fn owner_tid(&self) -> Option<u32> {
        self.handle.mutex().owner_tid()
    }

    #[inline]
    pub(crate) fn raw(&self) -> &RobustMutex {
        self.handle.mutex()
    }

    pub(crate) fn id(&self) -> u64 {
        self.handle.id()
    }
}

impl fmt::Debug for Lock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lock")
            .field("id", &format_args!("{:016x}", self.id()))
            .finish_non_exhaustive()
    }
}

/// Holds a [`Lock`]; releases it when dropped.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct LockGuard<'a> {
    lock: &'a Lock,
    /// Not `Send`: the owning thread must release the mutex.
    _not_send: PhantomData<*const ()>,
}

impl<'a> LockGuard<'a> {
    fn new(lock: &'a Lock) -> Self {
        Self {
            lock,
            _not_send: PhantomData,
        }
    }
}

// SAFETY: sharing `&LockGuard` across threads gives access to nothing but
// `Lock` (which is Sync); only moving the guard (Send) is unsound.
unsafe impl Sync for LockGuard<'_> {}

impl Drop for LockGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        // Cannot fail: this thread holds the lock (guards are not Send, and
        // the lock can only be released through its guard).
        let _ = self.lock.raw().unlock();
    }
}

impl fmt::Debug for LockGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LockGuard")
            .field("lock", self.lock)
            .finish()
    }
}

pub(crate) mod sealed {
    /// The lock a guard holds.
    pub enum Held<'a> {
        Lock(&'a super::Lock),
        RLock(&'a super::RLock),
    }

    /// Guards that hold a [`Lock`](super::Lock) or an
    /// [`RLock`](super::RLock), usable with a `Condition`.
    pub trait HeldLock {
        /// The lock this guard holds.
        fn held(&self) -> Held<'_>;
    }

    /// Locks a `Condition` can be bound to.
    pub trait ConditionLock {
        /// What locking it returns.
        type Guard<'a>: super::Guard
        where
            Self: 'a;

        /// Locks it (blocking).
        fn lock_guard(&self) -> Result<Self::Guard<'_>, super::LockError<Self::Guard<'_>>>;

        /// Its identity.
        fn lock_id(&self) -> u64;
    }
}

/// A guard holding a [`Lock`] or an [`RLock`]: [`LockGuard`], [`RLockGuard`],
/// or the guards of [`Value`](crate::value::Value) and
/// [`Array`](crate::value::Array). A
/// [`Condition`](crate::condition::Condition) waits with any of them that
/// holds its lock.
pub trait Guard: sealed::HeldLock {}

/// A lock a [`Condition`](crate::condition::Condition) can be bound to:
/// [`Lock`] or [`RLock`] (Python's default).
pub trait ConditionLock:
    sealed::ConditionLock + Clone + Serialize + for<'de> Deserialize<'de> + Send + Sync + fmt::Debug
{
}

impl sealed::HeldLock for LockGuard<'_> {
    fn held(&self) -> sealed::Held<'_> {
        sealed::Held::Lock(self.lock)
    }
}
impl Guard for LockGuard<'_> {}

impl sealed::ConditionLock for Lock {
    type Guard<'a> = LockGuard<'a>;

    fn lock_guard(&self) -> Result<LockGuard<'_>, LockError<LockGuard<'_>>> {
        self.lock()
    }

    fn lock_id(&self) -> u64 {
        self.id()
    }
}
impl ConditionLock for Lock {}

impl sealed::HeldLock for RLockGuard<'_> {
    fn held(&self) -> sealed::Held<'_> {
        sealed::Held::RLock(self.lock)
    }
}
impl Guard for RLockGuard<'_> {}

impl sealed::ConditionLock for RLock {
    type Guard<'a> = RLockGuard<'a>;

    fn lock_guard(&self) -> Result<RLockGuard<'_>, LockError<RLockGuard<'_>>> {
        self.lock()
    }

    fn lock_id(&self) -> u64 {
        self.handle.id()
    }
}
impl ConditionLock for RLock {}

/// A re-entrant lock (Python's `multiprocessing.RLock`), robust against its
/// holder dying.
///
/// The holding thread may acquire it again; it is released when every
/// acquisition has been released. Release by a thread that does not hold it is
/// an error ([`NotOwner`]).
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RLock {
    handle: MutexHandle<Recursive>,
}

impl RLock {
    /// A new, unlocked re-entrant lock in its own shared memory.
    pub fn new() -> Result<Self, ShmError> {
        let shm = SharedMemory::new(size_of::<MutexCell<Recursive>>())?;
        MutexHandle::create_in(shm, 0, true).map(|handle| Self { handle })
    }

    /// Blocks until the lock is acquired (at once if this thread holds it).
    pub fn lock(&self) -> Result<RLockGuard<'_>, LockError<RLockGuard<'_>>> {
        acquired(self.handle.mutex().lock(None), None, || {
            RLockGuard::new(self)
        })
    }

    /// Acquires the lock if it is free or held by this thread, without waiting.
    pub fn try_lock(&self) -> Result<RLockGuard<'_>, LockError<RLockGuard<'_>>> {
        acquired(self.handle.mutex().try_lock(), None, || {
            RLockGuard::new(self)
        })
    }

    /// Blocks until the lock is acquired or `timeout` has passed.
    pub fn lock_timeout(
        &self,
        timeout: Duration,
    ) -> Result<RLockGuard<'_>, LockError<RLockGuard<'_>>> {
        let result = self.handle.mutex().lock(deadline_after(timeout));
        acquired(result, Some(timeout), || RLockGuard::new(self))
    }

    /// Python-style acquisition without a guard: pair it with
    /// [`release`](Self::release).
    pub fn acquire(&self) -> Result<(), LockError<()>> {
        acquired(self.handle.mutex().lock(None), None, || ())
    }

    /// Releases one acquisition made by [`acquire`](Self::acquire); an error
    /// if the calling thread does not hold the lock.
    pub fn release(&self) -> Result<(), NotOwner> {
        self.handle.mutex().unlock().map_err(|_| NotOwner)
    }

    /// Whether some thread, in any process, holds the lock now (Python's
    /// `locked()`); it may change at any moment.
    pub fn locked(&self) -> bool {
        self.handle.mutex().owner_tid().is_some()
    }

    /// The kernel thread id (TID) of the holder, if any. For a
    /// single-threaded process, or the main thread of one, this is its pid.
    /// A holder that died reads as `None` (the kernel cleared its claim).
    pub fn owner_tid(&self) -> Option<u32> {
        self.handle.mutex().owner_tid()
    }

    #[inline]
    pub(crate) fn raw(&self) -> &RobustMutex {
        self.handle.mutex()
    }

    /// Whether the calling thread holds the lock (Python's `RLock._is_owned()`).
    pub fn is_owned(&self) -> bool {
        self.owner_tid() == Some(rustix::thread::gettid().as_raw_nonzero().get() as u32)
    }
}

impl fmt::Debug for RLock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RLock")
            .field("id", &format_args!("{:016x}", self.handle.id()))
            .finish_non_exhaustive()
    }
}

/// Holds one acquisition of an [`RLock`]; releases it when dropped.
#[must_use = "the lock is released as soon as the guard is dropped"]
pub struct RLockGuard<'a> {
    lock: &'a RLock,
    _not_send: PhantomData<*const ()>,
}

impl<'a> RLockGuard<'a> {
    fn new(lock: &'a RLock) -> Self {
        Self {
            lock,
            _not_send: PhantomData,
        }
    }
}

// SAFETY: `&RLockGuard` only exposes `&RLock`, which is Sync.
unsafe impl Sync for RLockGuard<'_> {}

impl Drop for RLockGuard<'_> {
    fn drop(&mut self) {
        // Fails only if the acquisition was already given back through
        // `RLock::release`; there is nothing left to release then.
        if self.lock.handle.mutex().unlock().is_err() {
            tracing::debug!("RLock guard dropped after its acquisition was released explicitly");
        }
    }
}

impl fmt::Debug for RLockGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RLockGuard")
            .field("lock", self.lock)
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_are_send_and_sync() {
        assert_send_sync::<Lock>();
        assert_send_sync::<RLock>();
    }

    #[test]
    fn lock_excludes_and_detects_self_deadlock() {
        let lock = Lock::new().unwrap();
        let guard = lock.lock().unwrap();
        assert!(matches!(lock.lock(), Err(LockError::Deadlock)));
        let clone = lock.clone();
        std::thread::scope(|s| {
            s.spawn(|| assert!(matches!(clone.try_lock(), Err(LockError::WouldBlock))));
        });
        drop(guard);
        assert!(clone.try_lock().is_ok());
    }

    #[test]
    fn lock_timeout_reports_its_timeout() {
        let lock = Lock::new().unwrap();
        let _guard = lock.lock().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                let timeout = Duration::from_millis(20);
                let start = Instant::now();
                assert!(
                    matches!(lock.lock_timeout(timeout), Err(LockError::Timeout(t)) if t == timeout)
                );
                assert!(start.elapsed() >= timeout);
            });
        });
    }

    #[test]
    fn owner_death_hands_over_the_guard() {
        let lock = Lock::new().unwrap();
        std::thread::scope(|s| {
            // A thread ending while holding the lock counts as the owner dying.
            s.spawn(|| std::mem::forget(lock.lock().unwrap()));
        });
        let guard = lock.lock().or_else(LockError::recover).expect("recovered");
        drop(guard);
        assert!(lock.lock().is_ok(), "clean after recovery");
    }

    #[test]
    fn locked_and_owner_follow_the_holder() {
        let lock = Lock::new().unwrap();
        assert!(!lock.locked());
        assert_eq!(lock.owner_tid(), None);
        let guard = lock.lock().unwrap();
        let me = rustix::thread::gettid().as_raw_nonzero().get() as u32;
        assert!(lock.locked());
        assert_eq!(lock.owner_tid(), Some(me));
        drop(guard);
        assert!(!lock.locked());

        let rlock = RLock::new().unwrap();
        assert!(!rlock.locked() && !rlock.is_owned());
        let _outer = rlock.lock().unwrap();
        assert!(rlock.locked() && rlock.is_owned());
        assert_eq!(rlock.owner_tid(), Some(me));
        std::thread::scope(|s| {
            s.spawn(|| assert!(rlock.locked() && !rlock.is_owned()));
        });
    }

    #[test]
    fn rlock_is_reentrant_and_rejects_foreign_release() {
        let rlock = RLock::new().unwrap();
        let outer = rlock.lock().unwrap();
        let inner = rlock.lock().unwrap();
        rlock.acquire().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                assert_eq!(rlock.release(), Err(NotOwner));
                assert!(matches!(rlock.try_lock(), Err(LockError::WouldBlock)));
            });
        });
        rlock.release().unwrap();
        drop(inner);
        drop(outer);
        assert_eq!(rlock.release(), Err(NotOwner));
    }

    #[test]
    fn a_lock_is_not_an_rlock() {
        let rlock = RLock::new().unwrap();
        let shm = rlock.handle.cell.shm().clone();
        assert!(matches!(
            Lock::attach(shm, 0),
            Err(ShmError::WrongKind {
                expected: "Lock",
                offset: 0
            })
        ));
    }
}
