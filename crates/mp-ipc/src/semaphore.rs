//! [`Semaphore`] and [`BoundedSemaphore`] across processes and threads.
//!
//! ```
//! use mp_ipc::semaphore::Semaphore;
//!
//! let slots = Semaphore::new(2)?;
//! let a = slots.acquire();
//! let b = slots.try_acquire()?;
//! assert!(slots.try_acquire().is_err()); // both permits taken
//! drop(a); // the guard gives its permit back
//! assert_eq!(slots.value(), 1);
//! # drop(b);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The count lives in shared memory. Acquiring is a compare-and-swap when a
//! permit is free; otherwise the caller spins briefly, then sleeps on a futex.
//! Releasing wakes a sleeper only if one is registered, so the uncontended
//! paths take no system call.
//!
//! **A holder that dies.** Permits held through a [`SemaphoreGuard`] are
//! *owned*: each thread holding guards of a semaphore holds a *holder slot*
//! in its segment, a robust mutex plus the number of guards it holds (see
//! `presence.rs`). When the thread dies (its process SIGKILLed, say),
//! the kernel marks the slot, and wakes an acquirer sleeping on it: the
//! acquirer gives the dead holder's permits back, logs a warning and counts
//! them in [`Semaphore::recovered`]. So `acquire()` never blocks forever
//! because of a dead holder. The slot stays held by its thread between
//! acquisitions (cached per thread, at most [`HOLDER_CACHE`] semaphores;
//! released when the thread exits or the cache evicts it), so the
//! uncontended path only adds a thread-local look-up and two plain stores to
//! a counter only that thread writes: no system call, no extra atomic
//! read-modify-write; the slot is looked up only when no permit is free.
//! Everything but the compare-and-swap, the count and the release is out of
//! line (waiting, recovery, warnings, the futex wake), so that acquire +
//! release inline into the caller: 52 instructions against 41 without
//! tracking (callgrind), the same time within noise (side-by-side runner,
//! A/B against the code before tracking: 14.55 ns against 14.46 ns).
//!
//! Permits taken out of a guard with [`SemaphoreGuard::forget`] are no
//! longer owned: any thread or process may [`release`](Semaphore::release)
//! them, as in Python, and they are not recovered if the process that took
//! them dies.
//!
//! **Limits, exactly.**
//!
//! * *Holder slots.* A semaphore has [`HOLDER_SLOTS`] (1,024) slots, one per
//!   thread holding (or having recently held) its guards; slots of dead
//!   threads are reclaimed when the next thread claims one. When all are
//!   held by live threads, the next thread's
//!   [`try_acquire`](Semaphore::try_acquire) and
//!   [`acquire_timeout`](Semaphore::acquire_timeout) fail with
//!   [`SemaphoreError::HolderSlotsFull`] without taking a permit, and its
//!   [`acquire`](Semaphore::acquire) (which cannot fail) takes the permit
//!   unowned and logs a warning. Nothing is lost silently, nothing blocks.
//! * *The kill window.* Taking a permit (a compare-and-swap of the count)
//!   and counting it in the holder slot (a store to another word) are two
//!   steps, a few tens of instructions apart on the uncontended path. A
//!   thread SIGKILLed exactly between them loses that one permit. Counting
//!   first instead would make such a death *add* a permit (two holders
//!   admitted where one was allowed), which is worse; making both one
//!   atomic step would need the count and every holder's record in one
//!   word, i.e. a lock around every acquisition, which the ≤ 20 ns budget
//!   excludes. Signals other than SIGKILL/SIGSTOP are harmless here (the
//!   handler returns into the same thread, which then counts the permit).

use std::fmt;
use std::marker::PhantomData;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::futex::{self, AtomicU32, WaitOutcome, fence};
use crate::lock::deadline_after;
use crate::presence::{FUTEX_OWNER_DIED, Watch};
use crate::robust::{Acquired, RobustMutex};
use crate::shm::{Shared, SharedMemory, ShmError, ShmState, tag};

/// Threads that may own permits of one semaphore at once (see
/// [`SemaphoreError::HolderSlotsFull`] for what the next one gets).
pub const HOLDER_SLOTS: usize = if cfg!(loom) { 2 } else { 1024 };

/// Semaphores whose holder slot a thread keeps between acquisitions.
pub const HOLDER_CACHE: usize = 8;

/// Errors of semaphore operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum SemaphoreError {
    /// `try_acquire`: no permit is free.
    #[error("no permit is free")]
    WouldBlock,
    /// `acquire_timeout`: no permit became free in time.
    #[error("timed out after {0:?} waiting for a permit")]
    Timeout(Duration),
    /// `try_acquire` / `acquire_timeout` by a thread when [`HOLDER_SLOTS`]
    /// other live threads each hold a holder slot of this semaphore: the
    /// permit it would take could not be recovered if it died, so none is
    /// taken. (A slot is freed when its thread exits, or evicts the
    /// semaphore from its cache of [`HOLDER_CACHE`].)
    #[error("all {slots} holder slots of the semaphore are held by live threads")]
    HolderSlotsFull {
        /// [`HOLDER_SLOTS`].
        slots: usize,
    },
    /// `release` of a [`BoundedSemaphore`] already at its initial value.
    #[error("semaphore released too many times (its bound is {bound})")]
    OverRelease {
        /// The initial (and maximum) value.
        bound: u32,
    },
}

/// Spins on the count this many times before sleeping (not under loom,
/// where every load is a scheduling point).
const SPINS: u32 = if cfg!(loom) { 0 } else { 100 };

/// The semaphore as laid out in shared memory.
#[repr(C)]
pub(crate) struct SemState {
    tag: u64,
    /// Free permits; also the futex word sleepers wait on.
    count: AtomicU32,
    /// Threads registered as (about to be) asleep on `count`.
    sleepers: AtomicU32,
    /// Largest value `release` may reach (`u32::MAX`: unbounded).
    bound: u32,
    /// Permits given back on behalf of dead holders, ever.
    recovered: AtomicU32,
}

/// A thread's holder slot, as laid out in shared memory (after the
/// [`SemState`]).
#[repr(C)]
pub(crate) struct Holder {
    /// Held by the thread for as long as it caches the slot.
    mutex: RobustMutex,
    /// Guards the thread holds; written only by it (and by the recoverer
    /// after its death).
    held: AtomicU32,
}

impl Holder {
    /// # Safety
    /// `ptr` is valid for writes of a `Holder` and not yet shared.
    unsafe fn init_at(ptr: *mut Holder) -> std::io::Result<()> {
        // SAFETY: per the contract.
        unsafe {
            RobustMutex::init_at(&raw mut (*ptr).mutex, false)?;
            (&raw mut (*ptr).held).write(AtomicU32::new(0));
        }
        Ok(())
    }
}

/// Where the holder slots start in a semaphore's segment.
const HOLDERS_OFFSET: usize = size_of::<SemState>().next_multiple_of(align_of::<Holder>());

// SAFETY: repr(C), starts with the tag, mutated only through atomics (`bound`
// is written once before sharing).
unsafe impl ShmState for SemState {
    const TAG: u64 = tag(b"mp:Sema\0");
    const KIND: &'static str = "Semaphore";
}

impl SemState {
    pub(crate) fn new(value: u32, bound: u32) -> Self {
        SemState {
            tag: Self::TAG,
            count: AtomicU32::new(value),
            sleepers: AtomicU32::new(0),
            bound,
            recovered: AtomicU32::new(0),
        }
    }

    /// Takes a permit if one is free.
    #[inline]
    pub(crate) fn try_acquire(&self) -> bool {
        let mut count = self.count.load(Ordering::Relaxed);
        while count > 0 {
            match self.count.compare_exchange_weak(
                count,
                count - 1,
                Ordering::Acquire,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => count = actual,
            }
        }
        false
    }

    /// Takes a permit, waiting until `deadline`; false if it passed first.
    /// While asleep, also wakes if a thread holding one of `holders` dies,
    /// and gives its permits back.
    pub(crate) fn acquire(&self, holders: &[Holder], deadline: Option<Instant>) -> bool {
        if self.try_acquire() {
            return true;
        }
        for _ in 0..SPINS {
            std::hint::spin_loop();
            if self.count.load(Ordering::Relaxed) > 0 && self.try_acquire() {
                return true;
            }
        }
        // Register before the last check; with the fence here and the one in
        // `release`, a release either sees us (and wakes) or happened before
        // the check (and we see its permit).
        self.sleepers.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let acquired = loop {
            if self.count.load(Ordering::Relaxed) > 0 && self.try_acquire() {
                break true;
            }
            let mut watch = Watch::new(&self.count, 0);
            let mut dead = false;
            for holder in holders {
                dead |= !watch.owner_of(&holder.mutex);
            }
            if dead {
                self.recover(holders);
                continue;
            }
            if watch.sleep(deadline) == WaitOutcome::TimedOut {
                // A wake-up may have been meant for us: take its permit.
                break self.try_acquire();
            }
        };
        self.sleepers.fetch_sub(1, Ordering::Relaxed);
        acquired
    }

    /// Gives back the permits of holders that died; returns how many.
    pub(crate) fn recover(&self, holders: &[Holder]) -> u32 {
        let mut recovered = 0;
        for holder in holders {
            if holder.mutex.word().load(Ordering::Acquire) & FUTEX_OWNER_DIED == 0 {
                continue;
            }
            // EOWNERDEAD hands the slot to exactly one recoverer.
            if let Ok(Acquired::OwnerDied) = holder.mutex.try_lock() {
                recovered += self.give_back(holder);
                let _ = holder.mutex.unlock();
            }
        }
        recovered
    }

    /// Gives back the permits of a dead holder whose slot the caller now
    /// holds (after `EOWNERDEAD`); returns how many.
    pub(crate) fn give_back(&self, holder: &Holder) -> u32 {
        let held = holder.held.swap(0, Ordering::AcqRel);
        let mut recovered = 0;
        for _ in 0..held {
            if self.release().is_err() {
                break; // a bounded semaphore is full: nothing was lost
            }
            recovered += 1;
        }
        if recovered > 0 {
            self.recovered.fetch_add(recovered, Ordering::Relaxed);
            tracing::warn!(
                permits = recovered,
                "semaphore: a holder died holding permits; they were given back"
            );
        }
        recovered
    }

    /// Gives a permit back; `Err(bound)` if that would exceed the bound.
    #[inline]
    pub(crate) fn release(&self) -> Result<(), u32> {
        let bound = self.bound;
        self.count
            .fetch_update(Ordering::Release, Ordering::Relaxed, |count| {
                (count < bound).then_some(count + 1)
            })
            .map_err(|_| bound)?;
        fence(Ordering::SeqCst);
        if self.sleepers.load(Ordering::Relaxed) > 0 {
            self.wake_one();
        }
        Ok(())
    }

    /// Wakes one thread sleeping on the count (out of line: the uncontended
    /// release has nobody to wake).
    #[cold]
    #[inline(never)]
    fn wake_one(&self) {
        futex::wake(&self.count, 1);
    }

    pub(crate) fn value(&self) -> u32 {
        self.count.load(Ordering::Relaxed)
    }
}

/// The holder slots this thread keeps, one per semaphore it holds guards of
/// (see the module documentation).
mod holding {
    use super::{HOLDER_CACHE, Holder, SemState, Semaphore};
    use crate::robust::Acquired;
    use crate::shm::SharedMemory;
    use std::cell::{Cell, RefCell};
    use std::sync::Once;
    use std::sync::atomic::Ordering;

    /// A holder slot this thread holds.
    struct Kept {
        /// The semaphore's state in this process (its identity here).
        state: *const SemState,
        /// The slot (in the mapping `shm` keeps alive).
        holder: *const Holder,
        /// Keeps the mapping, and so the held slot, alive while kept: glibc's
        /// robust list of this thread points into it.
        shm: SharedMemory,
    }

    impl Kept {
        fn holder(&self) -> &Holder {
            // SAFETY: `holder` points into the mapping `shm` keeps alive, at a
            // slot initialised when the semaphore was created.
            unsafe { &*self.holder }
        }

        fn held(&self) -> u32 {
            self.holder().held.load(Ordering::Relaxed)
        }
    }

    impl Drop for Kept {
        fn drop(&mut self) {
            // `LAST` must never name a slot that is gone.
            let _ = LAST.try_with(|last| {
                if last.get().0 == self.state {
                    last.set((std::ptr::null(), std::ptr::null()));
                }
            });
            let holder = self.holder();
            if holder.held.load(Ordering::Relaxed) == 0 {
                // Dropped on the thread that locked it (thread-local).
                let _ = holder.mutex.unlock();
            } else {
                // Guards were leaked: keep the slot held (the kernel marks it
                // when this thread exits, and the permits are recovered) and
                // the mapping with it.
                std::mem::forget(self.shm.clone());
            }
        }
    }

    thread_local! {
        static KEPT: RefCell<Vec<Kept>> = const { RefCell::new(Vec::new()) };
        /// The entry of `KEPT` used last (state, holder): the uncontended
        /// path reads only this (no destructor, so no lazy registration).
        static LAST: Cell<(*const SemState, *const Holder)> =
            const { Cell::new((std::ptr::null(), std::ptr::null())) };
    }

    /// In a forked child, the slots of the forking thread are not held by
    /// the child (glibc starts it with an empty robust list): forget them.
    extern "C" fn forget_after_fork() {
        let _ = KEPT.try_with(|kept| {
            if let Ok(mut kept) = kept.try_borrow_mut() {
                kept.drain(..).for_each(std::mem::forget);
            }
        });
        let _ = LAST.try_with(|last| last.set((std::ptr::null(), std::ptr::null())));
    }

    /// Adds `change` (+1 or -1) to this thread's guard count for `semaphore`;
    /// false if this thread has no holder slot there (every slot is taken).
    #[inline]
    pub(super) fn adjust(semaphore: &Semaphore, change: i32) -> bool {
        let state: *const SemState = &*semaphore.state;
        let (last, holder) = LAST.with(Cell::get);
        if last == state && !holder.is_null() {
            // SAFETY: `LAST` names an entry of `KEPT` (cleared when that entry
            // goes), whose mapping keeps the slot alive.
            let held = unsafe { &(*holder).held };
            // Only this thread writes its slot's count.
            let count = held.load(Ordering::Relaxed);
            held.store(count.saturating_add_signed(change), Ordering::Relaxed);
            return true;
        }
        adjust_slowly(semaphore, state, change)
    }

    #[cold]
    fn adjust_slowly(semaphore: &Semaphore, state: *const SemState, change: i32) -> bool {
        // During thread teardown the cache is gone: the guard is untracked.
        KEPT.try_with(|kept| {
            let Ok(mut kept) = kept.try_borrow_mut() else {
                return false;
            };
            let index = match kept.iter().position(|k| k.state == state) {
                Some(index) => index,
                None if change > 0 => match keep(&mut kept, semaphore, state) {
                    Some(index) => index,
                    None => return false,
                },
                None => return false,
            };
            let _ = LAST.try_with(|last| last.set((state, kept[index].holder)));
            let holder = kept[index].holder();
            // Only this thread writes its slot's count.
            let held = holder.held.load(Ordering::Relaxed);
            holder
                .held
                .store(held.saturating_add_signed(change), Ordering::Relaxed);
            true
        })
        .unwrap_or(false)
    }

    /// Claims a slot of `semaphore` for this thread and keeps it; returns
    /// its index in `kept`, or `None` if every slot is held by a live thread.
    #[cold]
    fn keep(kept: &mut Vec<Kept>, semaphore: &Semaphore, state: *const SemState) -> Option<usize> {
        static AT_FORK: Once = Once::new();
        AT_FORK.call_once(|| {
            // SAFETY: registers a handler that only touches this crate's
            // thread-local, which is valid in the child's single thread.
            let code = unsafe { libc::pthread_atfork(None, None, Some(forget_after_fork)) };
            if code != 0 {
                tracing::warn!(
                    code,
                    "pthread_atfork failed; semaphore slots after fork may be miscounted"
                );
            }
        });
        if kept.len() >= HOLDER_CACHE
            && let Some(idle) = kept.iter().position(|k| k.held() == 0)
        {
            // Its drop clears `LAST` if it names it.
            kept.swap_remove(idle);
        }
        let holder = semaphore
            .holders()
            .iter()
            .find(|holder| match holder.mutex.try_lock() {
                Ok(Acquired::Clean) => {
                    // A free slot counts no guards. A count found here was
                    // written by a corrupted (or hostile) segment: were it
                    // kept, this thread's exit would take it for leaked
                    // guards (keeping the mapping, "recovering" permits).
                    let stale = holder.held.swap(0, Ordering::Relaxed);
                    if stale != 0 {
                        tracing::warn!(
                            stale,
                            "semaphore: a free holder slot counted guards; reset"
                        );
                    }
                    true
                }
                Ok(Acquired::OwnerDied) => {
                    // A dead holder's slot: its permits go back first.
                    semaphore.state.give_back(holder);
                    true
                }
                Err(_) => false,
            })?;
        kept.push(Kept {
            state,
            holder,
            shm: semaphore.state.shm().clone(),
        });
        Some(kept.len() - 1)
    }
}

/// A counting semaphore (Python's `multiprocessing.Semaphore`).
///
/// Clones, and copies passed to child processes, are the same semaphore.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Semaphore {
    state: Shared<SemState>,
}

impl Semaphore {
    /// A semaphore with `value` permits, which [`release`](Self::release) can
    /// raise without bound (up to `u32::MAX`).
    pub fn new(value: u32) -> Result<Self, ShmError> {
        Self::with_bound(value, u32::MAX)
    }

    fn with_bound(value: u32, bound: u32) -> Result<Self, ShmError> {
        let shm = SharedMemory::new(HOLDERS_OFFSET + HOLDER_SLOTS * size_of::<Holder>())?;
        let first = shm.region::<Holder>(HOLDERS_OFFSET)?.as_ptr();
        for i in 0..HOLDER_SLOTS {
            // SAFETY: inside the fresh segment (sized above), aligned (region
            // checked the first; the size is a multiple of the alignment),
            // not yet shared.
            unsafe { Holder::init_at(first.add(i)) }.map_err(|source| ShmError::Io {
                op: "pthread_mutex_init",
                source,
            })?;
        }
        // SAFETY: the closure writes a complete SemState.
        let state = unsafe {
            Shared::create_in(shm, 0, |ptr: *mut SemState| {
                ptr.write(SemState::new(value, bound));
                Ok(())
            })?
        };
        Ok(Self { state })
    }

    /// The holder slots after the state (none if the segment is too small,
    /// which only a corrupted one is).
    fn holders(&self) -> &[Holder] {
        let shm = self.state.shm();
        match shm.region::<Holder>(HOLDERS_OFFSET) {
            // SAFETY: the whole range is inside the mapping (checked) and
            // aligned (region); the slots were initialised at creation and are
            // used only through atomics and the pthread API; the mapping lives
            // as long as `self.state`.
            Ok(first) if HOLDERS_OFFSET + HOLDER_SLOTS * size_of::<Holder>() <= shm.len() => unsafe {
                std::slice::from_raw_parts(first.as_ptr(), HOLDER_SLOTS)
            },
            _ => &[],
        }
    }

    /// Counts a guard of this thread (+1) or one fewer (-1); false if this
    /// thread has no holder slot (every slot is taken).
    #[inline]
    fn own(&self, change: i32) -> bool {
        holding::adjust(self, change)
    }

    /// A guard for a permit just taken, if it can be owned; otherwise the
    /// permit goes back and the error says why.
    #[inline]
    fn owned_guard(&self) -> Result<SemaphoreGuard<'_>, SemaphoreError> {
        let guard = SemaphoreGuard::new(self);
        if guard.tracked {
            return Ok(guard);
        }
        drop(guard); // gives the permit back
        Err(SemaphoreError::HolderSlotsFull {
            slots: HOLDER_SLOTS,
        })
    }

    /// Permits given back on behalf of holders that died (ever, in any
    /// process): each such recovery is also logged as a warning.
    pub fn recovered(&self) -> u32 {
        self.state.recovered.load(Ordering::Relaxed)
    }

    /// Takes a permit, waiting as long as needed. The guard gives it back
    /// when dropped (or keep it with [`SemaphoreGuard::forget`]).
    ///
    /// When [`HOLDER_SLOTS`] other live threads hold slots of this semaphore
    /// (see [`SemaphoreError::HolderSlotsFull`]), the permit is still taken
    /// but not owned: it is not recovered if this thread dies (logged as a
    /// warning). Use [`acquire_timeout`](Self::acquire_timeout) to get the
    /// error instead.
    #[inline]
    pub fn acquire(&self) -> SemaphoreGuard<'_> {
        // The fast path: a free permit, counted in this thread's cached
        // holder slot; everything else is out of line.
        if self.state.try_acquire() {
            let guard = SemaphoreGuard::new(self);
            if guard.tracked {
                return guard;
            }
            warn_untracked();
            return guard;
        }
        self.acquire_slowly()
    }

    /// [`acquire`](Self::acquire) when no permit was free.
    #[cold]
    #[inline(never)]
    fn acquire_slowly(&self) -> SemaphoreGuard<'_> {
        // The holder slots are looked up only when no permit is free.
        // Without a deadline the wait only ends with a permit.
        while !self.state.acquire(self.holders(), None) {}
        let guard = SemaphoreGuard::new(self);
        if !guard.tracked {
            warn_untracked();
        }
        guard
    }

    /// Takes a permit if one is free (or was held by a thread that died).
    pub fn try_acquire(&self) -> Result<SemaphoreGuard<'_>, SemaphoreError> {
        if self.state.try_acquire()
            || (self.state.recover(self.holders()) > 0 && self.state.try_acquire())
        {
            self.owned_guard()
        } else {
            Err(SemaphoreError::WouldBlock)
        }
    }

    /// Takes a permit, waiting at most `timeout`.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<SemaphoreGuard<'_>, SemaphoreError> {
        if self.state.try_acquire() || self.state.acquire(self.holders(), deadline_after(timeout)) {
            self.owned_guard()
        } else {
            Err(SemaphoreError::Timeout(timeout))
        }
    }

    /// Adds a permit, waking one waiter if any sleeps. For a
    /// [`BoundedSemaphore`], going past the initial value is an error.
    pub fn release(&self) -> Result<(), SemaphoreError> {
        self.state
            .release()
            .map_err(|bound| SemaphoreError::OverRelease { bound })
    }

    /// The number of free permits (Python's `get_value()`); it may change at
    /// any moment.
    pub fn value(&self) -> u32 {
        self.state.value()
    }
}

impl fmt::Debug for Semaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Semaphore")
            .field("value", &self.value())
            .finish_non_exhaustive()
    }
}

/// A permit of a [`Semaphore`] or [`BoundedSemaphore`]; released on drop.
#[must_use = "dropping the guard releases the permit at once; use .forget() to keep it"]
pub struct SemaphoreGuard<'a> {
    semaphore: &'a Semaphore,
    /// Counted in this thread's holder slot (false only when every slot was
    /// taken): only then is it uncounted when it goes.
    tracked: bool,
    /// Not `Send`: the permit is counted in this thread's holder slot.
    _not_send: PhantomData<*const ()>,
}

// SAFETY: `&SemaphoreGuard` exposes only `&Semaphore`, which is Sync.
unsafe impl Sync for SemaphoreGuard<'_> {}

impl<'a> SemaphoreGuard<'a> {
    #[inline]
    fn new(semaphore: &'a Semaphore) -> Self {
        Self {
            semaphore,
            tracked: semaphore.own(1),
            _not_send: PhantomData,
        }
    }

    /// Keeps the permit taken (Python's bare `acquire()`); give it back later
    /// with [`Semaphore::release`], from any thread or process. A forgotten
    /// permit is no longer owned by this thread: it is not recovered if this
    /// process dies.
    pub fn forget(self) {
        if self.tracked {
            self.semaphore.own(-1);
        }
        std::mem::forget(self);
    }
}

impl Drop for SemaphoreGuard<'_> {
    #[inline]
    fn drop(&mut self) {
        if self.tracked {
            self.semaphore.own(-1);
        }
        // Only a bounded semaphore released behind the guard's back (an
        // explicit release beyond its own acquisitions) can refuse this.
        if let Err(bound) = self.semaphore.state.release() {
            warn_over_release(bound);
        }
    }
}

/// The warning of a permit taken while every holder slot was held.
#[cold]
#[inline(never)]
fn warn_untracked() {
    tracing::warn!(
        slots = HOLDER_SLOTS,
        "semaphore: every holder slot is held by a live thread; this permit is not recovered if its thread dies"
    );
}

/// The warning of a guard whose permit a bounded semaphore refused.
#[cold]
#[inline(never)]
fn warn_over_release(bound: u32) {
    let error = SemaphoreError::OverRelease { bound };
    tracing::warn!(%error, "semaphore guard could not give its permit back");
}

impl fmt::Debug for SemaphoreGuard<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SemaphoreGuard")
            .field("semaphore", self.semaphore)
            .finish()
    }
}

/// A semaphore that may not be released above its initial value (Python's
/// `multiprocessing.BoundedSemaphore`): an extra [`release`](Self::release) is
/// [`SemaphoreError::OverRelease`].
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BoundedSemaphore {
    inner: Semaphore,
}

impl BoundedSemaphore {
    /// A semaphore with `value` permits, never more.
    pub fn new(value: u32) -> Result<Self, ShmError> {
        Semaphore::with_bound(value, value).map(|inner| Self { inner })
    }

    /// See [`Semaphore::acquire`].
    pub fn acquire(&self) -> SemaphoreGuard<'_> {
        self.inner.acquire()
    }

    /// See [`Semaphore::try_acquire`].
    pub fn try_acquire(&self) -> Result<SemaphoreGuard<'_>, SemaphoreError> {
        self.inner.try_acquire()
    }

    /// See [`Semaphore::acquire_timeout`].
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<SemaphoreGuard<'_>, SemaphoreError> {
        self.inner.acquire_timeout(timeout)
    }

    /// Adds a permit; [`SemaphoreError::OverRelease`] if all are already free.
    pub fn release(&self) -> Result<(), SemaphoreError> {
        self.inner.release()
    }

    /// The number of free permits.
    pub fn value(&self) -> u32 {
        self.inner.value()
    }

    /// See [`Semaphore::recovered`].
    pub fn recovered(&self) -> u32 {
        self.inner.recovered()
    }
}

impl fmt::Debug for BoundedSemaphore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BoundedSemaphore")
            .field("value", &self.value())
            .field("bound", &self.inner.state.bound)
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn counts_and_bounds() {
        let sem = BoundedSemaphore::new(2).unwrap();
        assert_eq!(sem.release(), Err(SemaphoreError::OverRelease { bound: 2 }));
        sem.acquire().forget();
        sem.try_acquire().unwrap().forget();
        assert_eq!(sem.value(), 0);
        assert!(matches!(sem.try_acquire(), Err(SemaphoreError::WouldBlock)));
        sem.release().unwrap();
        sem.release().unwrap();
        assert_eq!(sem.value(), 2);
        assert!(sem.release().is_err());
    }

    #[test]
    fn timeout_is_not_early() {
        let sem = Semaphore::new(0).unwrap();
        let timeout = Duration::from_millis(30);
        let start = Instant::now();
        assert_eq!(
            sem.acquire_timeout(timeout).err(),
            Some(SemaphoreError::Timeout(timeout))
        );
        assert!(start.elapsed() >= timeout);
    }

    #[test]
    fn a_thread_that_exits_holding_a_guard_gives_it_back_to_a_sleeper() {
        let sem = Semaphore::new(1).unwrap();
        std::thread::scope(|s| {
            // Leaks the guard (not `forget()`, which disowns the permit): the
            // permit is still owned when the thread ends.
            s.spawn(|| std::mem::forget(sem.acquire()));
        });
        assert_eq!(sem.value(), 0);
        let guard = sem
            .acquire_timeout(Duration::from_secs(20))
            .expect("the dead thread's permit is recovered");
        assert_eq!(sem.recovered(), 1);
        drop(guard);
        assert_eq!(sem.value(), 1);
    }

    #[test]
    fn forgotten_permits_are_not_recovered() {
        let sem = Semaphore::new(1).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| sem.acquire().forget());
        });
        assert!(matches!(sem.try_acquire(), Err(SemaphoreError::WouldBlock)));
        assert_eq!(sem.recovered(), 0);
        sem.release().unwrap();
        assert!(sem.try_acquire().is_ok());
    }

    #[test]
    fn guards_of_many_semaphores_on_one_thread() {
        let sems: Vec<_> = (0..3 * HOLDER_CACHE)
            .map(|_| Semaphore::new(1).unwrap())
            .collect();
        let guards: Vec<_> = sems.iter().map(Semaphore::acquire).collect();
        assert!(sems.iter().all(|s| s.value() == 0));
        drop(guards);
        for sem in &sems {
            drop(sem.acquire());
        }
        assert!(sems.iter().all(|s| s.value() == 1 && s.recovered() == 0));
    }

    #[test]
    fn when_every_holder_slot_is_held_fallible_acquires_say_so_and_take_nothing() {
        let sem = Semaphore::new(2).unwrap();
        // This thread holds every slot's mutex, as HOLDER_SLOTS live threads would.
        for holder in sem.holders() {
            assert_eq!(holder.mutex.try_lock(), Ok(Acquired::Clean));
        }
        std::thread::scope(|s| {
            s.spawn(|| {
                let full = Err(SemaphoreError::HolderSlotsFull {
                    slots: HOLDER_SLOTS,
                });
                assert_eq!(sem.try_acquire().map(drop), full);
                assert_eq!(sem.acquire_timeout(Duration::ZERO).map(drop), full);
                assert_eq!(sem.value(), 2, "no permit taken, none lost");
                // `acquire` cannot fail: the permit is taken, unowned.
                let guard = sem.acquire();
                assert_eq!(sem.value(), 1);
                drop(guard);
                assert_eq!(sem.value(), 2);
            });
        });
        for holder in sem.holders() {
            holder.mutex.unlock().unwrap();
        }
        // Slots free again: a new thread owns its permit (joined, not
        // scoped: a scope ends before the thread's exit has run).
        let owner = sem.clone();
        std::thread::spawn(move || std::mem::forget(owner.try_acquire().unwrap()))
            .join()
            .unwrap();
        let guard = sem.try_acquire().unwrap();
        assert_eq!(sem.recovered(), 1, "the dead thread's permit came back");
        drop(guard);
        assert_eq!(sem.value(), 2);
    }

    #[test]
    fn a_free_slot_with_a_corrupted_count_is_reset_when_claimed() {
        let sem = Semaphore::new(1).unwrap();
        // What a corrupted (or hostile) segment may hold in a free slot.
        for holder in sem.holders() {
            holder.held.store(5, Ordering::Relaxed);
        }
        let user = sem.clone();
        std::thread::spawn(move || drop(user.acquire()))
            .join()
            .unwrap();
        // The thread that claimed a slot exited with no guard: its slot was
        // unlocked (not kept, with its mapping, as if it leaked guards), and
        // nothing was "recovered".
        for holder in sem.holders() {
            assert_eq!(holder.mutex.try_lock(), Ok(Acquired::Clean));
            holder.mutex.unlock().unwrap();
        }
        assert_eq!(sem.recovered(), 0);
        assert_eq!(sem.value(), 1);
    }

    #[test]
    fn release_wakes_a_sleeper() {
        let sem = Semaphore::new(0).unwrap();
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                sem.acquire_timeout(Duration::from_secs(10))
                    .map(SemaphoreGuard::forget)
            });
            sem.release().unwrap();
            assert_eq!(waiter.join().unwrap(), Ok(()));
        });
        assert_eq!(sem.value(), 0);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::SemState;
    use loom::sync::Arc;

    /// Two waiters, permits released one by one: nobody sleeps through a
    /// release (loom reports a deadlock if a wake-up is lost).
    #[test]
    fn loom_semaphore_no_lost_wakeup() {
        crate::futex::model(|| {
            let sem = Arc::new(SemState::new(0, u32::MAX));
            let waiters: Vec<_> = (0..2)
                .map(|_| {
                    let sem = Arc::clone(&sem);
                    loom::thread::spawn(move || assert!(sem.acquire(&[], None)))
                })
                .collect();
            sem.release().unwrap();
            sem.release().unwrap();
            for waiter in waiters {
                waiter.join().unwrap();
            }
            assert_eq!(sem.value(), 0);
        });
    }

    /// A timed-out waiter never loses a permit that was released to it.
    #[test]
    fn loom_semaphore_timeout_keeps_permits() {
        crate::futex::model(|| {
            let sem = Arc::new(SemState::new(0, 1));
            let waiter = {
                let sem = Arc::clone(&sem);
                loom::thread::spawn(move || sem.acquire(&[], Some(std::time::Instant::now())))
            };
            sem.release().unwrap();
            let took = waiter.join().unwrap();
            assert_eq!(sem.value(), if took { 0 } else { 1 });
        });
    }
}
