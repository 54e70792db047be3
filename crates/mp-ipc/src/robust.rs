//! A robust, process-shared pthread mutex placed in shared memory.
//!
//! glibc's robust mutexes keep a per-thread list of the robust mutexes each
//! thread holds; when a thread (or its whole process) dies, the kernel walks
//! that list, marks each held mutex `OWNER_DIED` and wakes one waiter, whose
//! lock call then returns `EOWNERDEAD`. [`RobustMutex::lock`] makes the mutex
//! consistent again and reports [`Acquired::OwnerDied`], so a lock held by a
//! killed process never wedges the others.
//!
//! The mutex is created as `PTHREAD_MUTEX_ERRORCHECK` (a thread re-locking a
//! mutex it holds gets [`LockFailed::Deadlock`] instead of hanging forever) or
//! `PTHREAD_MUTEX_RECURSIVE`.

// The lock word's bits (owner tid, FUTEX_OWNER_DIED, FUTEX_WAITERS) are read straight from
// glibc's `pthread_mutex_t` layout, and death detection relies on glibc registering held
// robust mutexes in the thread's kernel robust list: other C libraries differ.
#[cfg(not(target_env = "gnu"))]
compile_error!(
    "mp-ipc's robust locks are glibc's process-shared robust mutexes and read their layout: \
     build for a *-linux-gnu target"
);

/// How a lock was obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(any(loom, miri), allow(dead_code))] // the loom and Miri models never report OwnerDied
pub(crate) enum Acquired {
    /// The mutex was free or released normally.
    Clean,
    /// The previous owner died holding it; the mutex has been made consistent
    /// and is now held by the caller, but the data it protects may be half
    /// updated.
    OwnerDied,
}

/// Why a lock was not obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(loom, allow(dead_code))] // the loom model has no owner checks
pub(crate) enum LockFailed {
    /// The deadline passed first.
    TimedOut,
    /// `try_lock`: somebody else holds it.
    WouldBlock,
    /// The calling thread already holds this (non-recursive) mutex.
    Deadlock,
    /// Any other error from glibc (e.g. `ENOTRECOVERABLE`, `EAGAIN` when the
    /// recursion count would overflow); carries the errno.
    Os(i32),
}

/// `unlock` by a thread that does not hold the mutex.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct NotOwner;

#[cfg(not(any(loom, miri)))]
mod imp {
    use super::{Acquired, LockFailed, NotOwner, monotonic_deadline};
    use std::cell::UnsafeCell;
    use std::io;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Instant;

    // glibc >= 2.30 has `pthread_mutex_clocklock`, which takes a CLOCK_MONOTONIC
    // deadline (immune to wall-clock jumps); the libc crate does not declare it.
    unsafe extern "C" {
        fn pthread_mutex_clocklock(
            mutex: *mut libc::pthread_mutex_t,
            clockid: libc::clockid_t,
            abstime: *const libc::timespec,
        ) -> libc::c_int;
    }

    /// A glibc robust, process-shared mutex. Lives in shared memory: create it in
    /// place with [`RobustMutex::init_at`], never by value.
    #[repr(transparent)]
    pub(crate) struct RobustMutex {
        raw: UnsafeCell<libc::pthread_mutex_t>,
    }

    // SAFETY: a process-shared pthread mutex is designed to be operated on by many
    // threads (and processes) at once through a shared pointer; every access goes
    // through the pthread functions, which synchronise internally.
    unsafe impl Sync for RobustMutex {}
    // SAFETY: the mutex holds no thread-affine state of its own (ownership is
    // recorded in the mutex word by TID, not by where the struct is referenced).
    unsafe impl Send for RobustMutex {}

    /// Mask of the owner TID in a robust mutex word (kernel robust-futex ABI).
    const FUTEX_TID_MASK: u32 = 0x3fff_ffff;

    /// Byte offset of glibc's `__kind` (type, robust, process-shared, PI/PP
    /// bits) in `pthread_mutex_t`: after `__lock`, `__count`, `__owner` and, on
    /// 64-bit targets, `__nusers`.
    const KIND_OFFSET: usize = if cfg!(target_pointer_width = "64") {
        16
    } else {
        12
    };

    /// The `__kind` words glibc writes for the two flavours `init_at` makes
    /// (`[errorcheck, recursive]`), read from reference mutexes once rather than
    /// hard-coding glibc's bit values.
    ///
    /// Why it matters: glibc trusts `__kind` to pick its lock algorithm, and
    /// with foreign bits (priority-protect, priority-inheritance, another type)
    /// it asserts and aborts the process (e.g. in
    /// `__pthread_tpp_change_priority`) or issues PI futex calls on a word that
    /// is not a PI futex. A segment another process wrote is therefore checked
    /// before glibc sees it.
    fn expected_kinds() -> [i32; 2] {
        static KINDS: std::sync::OnceLock<[i32; 2]> = std::sync::OnceLock::new();
        *KINDS.get_or_init(|| {
            [false, true].map(|recursive| {
                let mut slot = Box::new(std::mem::MaybeUninit::<RobustMutex>::zeroed());
                // SAFETY: a fresh, aligned, exclusively owned allocation. The
                // reference mutex is never locked, so dropping it (without
                // pthread_mutex_destroy, a no-op for glibc) is sound.
                match unsafe { RobustMutex::init_at(slot.as_mut_ptr(), recursive) } {
                    // SAFETY: init_at initialised it.
                    Ok(()) => unsafe { slot.assume_init_ref() }.kind(),
                    // No mutex can be made: none attached matches either.
                    Err(_) => i32::MIN,
                }
            })
        })
    }

    impl RobustMutex {
        /// glibc's `__kind` word of this mutex.
        fn kind(&self) -> i32 {
            // SAFETY: `KIND_OFFSET` is inside the 4-aligned `pthread_mutex_t` and
            // holds the 32-bit `__kind` (see `KIND_OFFSET`); glibc reads and
            // writes it with plain or relaxed atomic accesses, and it lives as
            // long as `self`.
            let kind = unsafe {
                &*self
                    .raw()
                    .cast::<u8>()
                    .add(KIND_OFFSET)
                    .cast::<std::sync::atomic::AtomicI32>()
            };
            kind.load(Ordering::Relaxed)
        }

        /// Whether this mutex (typically in memory another process wrote) is a
        /// robust, process-shared mutex of the flavour `init_at(_, recursive)`
        /// makes, so that glibc may be handed it. Check before first use of an
        /// attached mutex.
        pub(crate) fn is_intact(&self, recursive: bool) -> bool {
            self.kind() == expected_kinds()[usize::from(recursive)]
        }

        /// Whether glibc may be handed this mutex: its kind is one `init_at`
        /// makes. Checked on every lock (one load) because the segment is
        /// shared: a peer may corrupt it after attach.
        fn is_sane(&self) -> bool {
            expected_kinds().contains(&self.kind())
        }

        /// Initialises a robust, process-shared mutex at `ptr`.
        ///
        /// # Safety
        /// `ptr` must be valid for writes of `size_of::<RobustMutex>()` bytes,
        /// aligned, and not in use by anybody (no thread may be using a mutex
        /// there while it is initialised).
        pub(crate) unsafe fn init_at(ptr: *mut RobustMutex, recursive: bool) -> io::Result<()> {
            let kind = if recursive {
                libc::PTHREAD_MUTEX_RECURSIVE
            } else {
                libc::PTHREAD_MUTEX_ERRORCHECK
            };
            let mut attr = std::mem::MaybeUninit::<libc::pthread_mutexattr_t>::uninit();
            // SAFETY: `attr` is a valid place for a mutexattr; it is initialised by
            // pthread_mutexattr_init before any other use and destroyed at the end.
            // `ptr` is valid for writes per this function's contract, and
            // `RobustMutex` is a transparent wrapper around `pthread_mutex_t`.
            unsafe {
                check(libc::pthread_mutexattr_init(attr.as_mut_ptr()))?;
                let attr = attr.as_mut_ptr();
                let result = check(libc::pthread_mutexattr_setpshared(
                    attr,
                    libc::PTHREAD_PROCESS_SHARED,
                ))
                .and_then(|()| {
                    check(libc::pthread_mutexattr_setrobust(
                        attr,
                        libc::PTHREAD_MUTEX_ROBUST,
                    ))
                })
                .and_then(|()| check(libc::pthread_mutexattr_settype(attr, kind)))
                .and_then(|()| check(libc::pthread_mutex_init(ptr.cast(), attr)));
                libc::pthread_mutexattr_destroy(attr);
                result
            }
        }

        fn raw(&self) -> *mut libc::pthread_mutex_t {
            self.raw.get()
        }

        /// Locks, blocking until `deadline` (`None`: forever).
        pub(crate) fn lock(&self, deadline: Option<Instant>) -> Result<Acquired, LockFailed> {
            if !self.is_sane() {
                return Err(LockFailed::Os(libc::EINVAL));
            }
            let code = match deadline {
                // SAFETY: `self.raw()` points to a mutex initialised by `init_at`
                // (the only way to obtain a `&RobustMutex` in this crate).
                None => unsafe { libc::pthread_mutex_lock(self.raw()) },
                Some(deadline) => {
                    let abstime = monotonic_deadline(deadline);
                    // SAFETY: as above; `abstime` is a valid timespec.
                    unsafe { pthread_mutex_clocklock(self.raw(), libc::CLOCK_MONOTONIC, &abstime) }
                }
            };
            self.interpret(code)
        }

        /// Locks if nobody holds the mutex, without waiting.
        pub(crate) fn try_lock(&self) -> Result<Acquired, LockFailed> {
            if !self.is_sane() {
                return Err(LockFailed::Os(libc::EINVAL));
            }
            // SAFETY: `self.raw()` points to an initialised mutex (see `lock`).
            let code = unsafe { libc::pthread_mutex_trylock(self.raw()) };
            self.interpret(code)
        }

        fn interpret(&self, code: libc::c_int) -> Result<Acquired, LockFailed> {
            match code {
                0 => Ok(Acquired::Clean),
                libc::EOWNERDEAD => {
                    // SAFETY: we hold the mutex (EOWNERDEAD hands it over), which is
                    // the precondition of pthread_mutex_consistent.
                    let code = unsafe { libc::pthread_mutex_consistent(self.raw()) };
                    if code == 0 {
                        tracing::warn!("robust mutex: previous owner died holding it; recovered");
                        Ok(Acquired::OwnerDied)
                    } else {
                        Err(LockFailed::Os(code))
                    }
                }
                libc::ETIMEDOUT => Err(LockFailed::TimedOut),
                libc::EBUSY => Err(LockFailed::WouldBlock),
                libc::EDEADLK => Err(LockFailed::Deadlock),
                other => Err(LockFailed::Os(other)),
            }
        }

        /// Unlocks; fails if the calling thread does not hold the mutex.
        pub(crate) fn unlock(&self) -> Result<(), NotOwner> {
            // SAFETY: `self.raw()` points to an initialised mutex; errorcheck and
            // recursive robust mutexes report EPERM for a non-owner instead of
            // misbehaving.
            match unsafe { libc::pthread_mutex_unlock(self.raw()) } {
                0 => Ok(()),
                _ => Err(NotOwner),
            }
        }

        /// The mutex's futex word: owner TID and the `FUTEX_WAITERS` /
        /// `FUTEX_OWNER_DIED` bits of the kernel's robust-futex ABI.
        pub(crate) fn word(&self) -> &AtomicU32 {
            // SAFETY: the first member of glibc's pthread_mutex_t is the 32-bit,
            // 4-aligned futex word, which glibc and the kernel only access
            // atomically (so must we); it lives as long as `self`.
            unsafe { &*self.raw().cast::<AtomicU32>() }
        }

        /// The TID of the thread holding the mutex, if any (read from the futex
        /// word, whose layout the kernel's robust-futex ABI fixes).
        pub(crate) fn owner_tid(&self) -> Option<u32> {
            match self.word().load(Ordering::Relaxed) & FUTEX_TID_MASK {
                0 => None,
                tid => Some(tid),
            }
        }

        /// Whether a thread of the calling process holds the mutex.
        ///
        /// Used before unmapping a segment: glibc links held robust mutexes into a
        /// per-thread list *through the mutexes themselves*, so unmapping a held
        /// one (possible after `mem::forget` of a guard) would leave a dangling
        /// list entry in this process.
        pub(crate) fn held_in_this_process(&self) -> bool {
            self.owner_tid().is_some_and(is_thread_of_this_process)
        }
    }

    /// Whether `tid` is a live thread of the calling process, asked of the kernel (no `/proc`):
    /// `tgkill` with signal 0 delivers nothing and fails with ESRCH unless `tid` belongs to
    /// this thread group.
    pub(super) fn is_thread_of_this_process(tid: u32) -> bool {
        let Ok(tid) = libc::pid_t::try_from(tid) else {
            return false;
        };
        // SAFETY: tgkill only reads its three integer arguments; signal 0 sends nothing.
        let result = unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, 0) };
        result == 0
    }

    fn check(code: libc::c_int) -> io::Result<()> {
        if code == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(code))
        }
    }
}

/// Model for loom: a futex mutex on loom atomics with the same interface (no
/// owner tracking, no owner death).
#[cfg(loom)]
mod imp {
    use super::{Acquired, LockFailed, NotOwner};
    use crate::futex::{self, AtomicU32, WaitOutcome};
    use std::io;
    use std::sync::atomic::Ordering;
    use std::time::Instant;

    pub(crate) struct RobustMutex {
        state: AtomicU32,
    }

    impl RobustMutex {
        pub(crate) unsafe fn init_at(ptr: *mut RobustMutex, _recursive: bool) -> io::Result<()> {
            // SAFETY: the caller guarantees `ptr` is valid for writes.
            unsafe {
                ptr.write(RobustMutex {
                    state: AtomicU32::new(0),
                })
            };
            Ok(())
        }

        pub(crate) fn lock(&self, deadline: Option<Instant>) -> Result<Acquired, LockFailed> {
            loop {
                if self.try_lock().is_ok() {
                    return Ok(Acquired::Clean);
                }
                if futex::wait(&self.state, 1, deadline) == WaitOutcome::TimedOut {
                    return Err(LockFailed::TimedOut);
                }
            }
        }

        pub(crate) fn try_lock(&self) -> Result<Acquired, LockFailed> {
            self.state
                .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
                .map(|_| Acquired::Clean)
                .map_err(|_| LockFailed::WouldBlock)
        }

        pub(crate) fn unlock(&self) -> Result<(), NotOwner> {
            if self.state.swap(0, Ordering::Release) == 0 {
                return Err(NotOwner);
            }
            futex::wake(&self.state, 1);
            Ok(())
        }

        pub(crate) fn held_in_this_process(&self) -> bool {
            false
        }

        pub(crate) fn is_intact(&self, _recursive: bool) -> bool {
            true
        }

        pub(crate) fn owner_tid(&self) -> Option<u32> {
            (self.state.load(Ordering::Relaxed) != 0).then_some(1)
        }

        pub(crate) fn word(&self) -> &AtomicU32 {
            &self.state
        }
    }
}

/// Under Miri: a futex mutex on std atomics with the interface and the owner
/// checks of the glibc one, so that Miri can run the ring protocol on the
/// heap (it cannot run glibc's process-shared robust mutexes: their pthread
/// calls and the kernel's robust list are outside what it interprets).
///
/// What it keeps: mutual exclusion with acquire/release ordering (what Miri
/// checks the protocol against), a sleeping `lock` with a deadline on the
/// futex word, `try_lock`, errorcheck semantics (re-locking by the holder is
/// [`LockFailed::Deadlock`], unlocking by another thread is [`NotOwner`])
/// and the recursive flavour. What it drops: owner death (Miri runs one
/// process; [`Acquired::OwnerDied`] is never reported) and TIDs (the owner
/// recorded in the word is a per-thread token from 1 up, not a kernel TID).
///
/// The word follows the kernel's robust-futex layout, so the code reading it
/// (`presence`, `semaphore`) sees the same bits: owner in the low 30 bits,
/// `WAITERS` in the top bit, `FUTEX_OWNER_DIED` never set.
#[cfg(all(miri, not(loom)))]
mod imp {
    use super::{Acquired, LockFailed, NotOwner};
    use crate::futex::{self, AtomicU32, WaitOutcome};
    use std::io;
    use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
    use std::time::Instant;

    /// Owner token bits of the word (the kernel's `FUTEX_TID_MASK`).
    const OWNER_MASK: u32 = 0x3fff_ffff;
    /// Somebody sleeps (or is about to) on the word: unlock must wake one.
    pub(super) const WAITERS: u32 = 0x8000_0000;

    /// The calling thread's owner token: distinct for every thread of the
    /// process (1, 2, ...; wraps after 2^30 threads, far beyond what Miri runs).
    fn me() -> u32 {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
        thread_local! {
            static TOKEN: u32 = (NEXT.fetch_add(1, Relaxed) & OWNER_MASK).max(1);
        }
        TOKEN.with(|token| *token)
    }

    #[repr(C)]
    pub(crate) struct RobustMutex {
        /// Owner token | [`WAITERS`]; 0 when free.
        word: AtomicU32,
        /// 1 for the recursive flavour.
        recursive: AtomicU32,
        /// Times the owner locked it (recursive flavour); only the owner
        /// touches it, so relaxed accesses suffice.
        depth: AtomicU32,
    }

    impl RobustMutex {
        /// Initialises a free mutex at `ptr`.
        ///
        /// # Safety
        /// As the glibc version: `ptr` valid for writes, aligned, not in use.
        pub(crate) unsafe fn init_at(ptr: *mut RobustMutex, recursive: bool) -> io::Result<()> {
            // SAFETY: the caller guarantees `ptr` is valid for writes, aligned
            // and unused.
            unsafe {
                ptr.write(RobustMutex {
                    word: AtomicU32::new(0),
                    recursive: AtomicU32::new(u32::from(recursive)),
                    depth: AtomicU32::new(0),
                })
            };
            Ok(())
        }

        fn owner(&self) -> u32 {
            self.word.load(Relaxed) & OWNER_MASK
        }

        /// Re-locking by the holder: counted (recursive) or refused.
        fn relock(&self) -> Result<Acquired, LockFailed> {
            if self.recursive.load(Relaxed) == 0 {
                return Err(LockFailed::Deadlock);
            }
            let depth = self.depth.load(Relaxed);
            let depth = depth.checked_add(1).ok_or(LockFailed::Os(libc::EAGAIN))?;
            self.depth.store(depth, Relaxed);
            Ok(Acquired::Clean)
        }

        /// Takes the free mutex with `bits` (the owner, plus `WAITERS` for a
        /// thread that slept: others may still sleep behind it).
        fn acquire(&self, bits: u32) -> bool {
            let won = self
                .word
                .compare_exchange(0, bits, Acquire, Relaxed)
                .is_ok();
            if won {
                self.depth.store(1, Relaxed);
            }
            won
        }

        /// Locks, sleeping on the word until `deadline` (`None`: forever).
        pub(crate) fn lock(&self, deadline: Option<Instant>) -> Result<Acquired, LockFailed> {
            let me = me();
            if self.owner() == me {
                return self.relock();
            }
            let mut bits = me;
            loop {
                if self.acquire(bits) {
                    return Ok(Acquired::Clean);
                }
                let seen = self.word.load(Relaxed);
                if seen == 0 {
                    continue;
                }
                if seen & WAITERS == 0
                    && self
                        .word
                        .compare_exchange(seen, seen | WAITERS, Relaxed, Relaxed)
                        .is_err()
                {
                    continue;
                }
                if futex::wait(&self.word, seen | WAITERS, deadline) == WaitOutcome::TimedOut {
                    return Err(LockFailed::TimedOut);
                }
                bits = me | WAITERS;
            }
        }

        /// Locks if nobody holds the mutex, without waiting.
        pub(crate) fn try_lock(&self) -> Result<Acquired, LockFailed> {
            let me = me();
            if self.owner() == me {
                return self.relock();
            }
            if self.acquire(me) {
                Ok(Acquired::Clean)
            } else {
                Err(LockFailed::WouldBlock)
            }
        }

        /// Unlocks; fails if the calling thread does not hold the mutex.
        pub(crate) fn unlock(&self) -> Result<(), NotOwner> {
            if self.owner() != me() {
                return Err(NotOwner);
            }
            let depth = self.depth.load(Relaxed);
            if depth > 1 {
                self.depth.store(depth - 1, Relaxed);
                return Ok(());
            }
            self.depth.store(0, Relaxed);
            if self.word.swap(0, Release) & WAITERS != 0 {
                futex::wake(&self.word, 1);
            }
            Ok(())
        }

        /// The futex word (owner token and `WAITERS`).
        pub(crate) fn word(&self) -> &AtomicU32 {
            &self.word
        }

        /// The owner's token, if held.
        pub(crate) fn owner_tid(&self) -> Option<u32> {
            Some(self.owner()).filter(|&owner| owner != 0)
        }

        /// Whether a thread holds it (Miri runs a single process).
        pub(crate) fn held_in_this_process(&self) -> bool {
            self.owner_tid().is_some()
        }

        /// Whether it is of the flavour `init_at(_, recursive)` makes.
        pub(crate) fn is_intact(&self, recursive: bool) -> bool {
            self.recursive.load(Relaxed) == u32::from(recursive)
        }
    }
}

pub(crate) use imp::RobustMutex;

/// `deadline` as an absolute CLOCK_MONOTONIC timespec (`Instant` is
/// CLOCK_MONOTONIC on Linux, but its value is not exposed, so go by the time
/// left).
#[cfg(not(loom))]
pub(crate) fn monotonic_deadline(deadline: std::time::Instant) -> libc::timespec {
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let mut sec = now
        .tv_sec
        .saturating_add(left.as_secs().try_into().unwrap_or(i64::MAX));
    let mut nsec = now.tv_nsec + i64::from(left.subsec_nanos());
    if nsec >= 1_000_000_000 {
        nsec -= 1_000_000_000;
        sec = sec.saturating_add(1);
    }
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

#[cfg(all(test, not(any(loom, miri))))]
mod tests {
    use super::*;
    use std::mem::MaybeUninit;
    use std::time::{Duration, Instant};

    fn boxed(recursive: bool) -> Box<RobustMutex> {
        let mut slot = Box::new(MaybeUninit::<RobustMutex>::uninit());
        // SAFETY: the box is a fresh, aligned, exclusively owned allocation.
        unsafe { RobustMutex::init_at(slot.as_mut_ptr(), recursive).unwrap() };
        // SAFETY: init_at initialised the mutex.
        unsafe { slot.assume_init() }
    }

    #[test]
    fn lock_unlock_and_owner() {
        let m = boxed(false);
        assert_eq!(m.owner_tid(), None);
        assert_eq!(m.lock(None), Ok(Acquired::Clean));
        assert_eq!(
            m.owner_tid(),
            Some(rustix::thread::gettid().as_raw_nonzero().get() as u32)
        );
        assert!(m.held_in_this_process());
        assert_eq!(m.unlock(), Ok(()));
        assert_eq!(m.unlock(), Err(NotOwner));
        assert!(!m.held_in_this_process());
    }

    #[test]
    fn only_live_threads_of_this_process_count_as_ours() {
        let me = rustix::thread::gettid().as_raw_nonzero().get() as u32;
        assert!(imp::is_thread_of_this_process(me));
        let exited = std::thread::spawn(|| rustix::thread::gettid().as_raw_nonzero().get() as u32)
            .join()
            .unwrap();
        assert!(!imp::is_thread_of_this_process(exited), "an exited thread");
        let parent = rustix::process::getppid().map_or(1, |p| p.as_raw_nonzero().get() as u32);
        assert!(!imp::is_thread_of_this_process(parent), "another process");
    }

    #[test]
    fn relock_is_deadlock_not_hang() {
        let m = boxed(false);
        m.lock(None).unwrap();
        assert_eq!(m.lock(None), Err(LockFailed::Deadlock));
        assert_eq!(m.try_lock(), Err(LockFailed::Deadlock));
        std::thread::scope(|s| {
            s.spawn(|| assert_eq!(m.try_lock(), Err(LockFailed::WouldBlock)));
        });
        m.unlock().unwrap();
    }

    #[test]
    fn recursive_counts_and_rejects_foreign_unlock() {
        let m = boxed(true);
        m.lock(None).unwrap();
        m.lock(None).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                assert_eq!(m.unlock(), Err(NotOwner));
                assert_eq!(m.try_lock(), Err(LockFailed::WouldBlock));
            });
        });
        m.unlock().unwrap();
        m.unlock().unwrap();
        assert_eq!(m.unlock(), Err(NotOwner));
    }

    #[test]
    fn timed_lock_times_out_and_owner_death_is_reported() {
        let m = boxed(false);
        std::thread::scope(|s| {
            // A thread that exits while holding the mutex: the kernel marks it
            // OWNER_DIED, like a killed process.
            s.spawn(|| assert_eq!(m.lock(None), Ok(Acquired::Clean)));
        });
        assert_eq!(m.lock(None), Ok(Acquired::OwnerDied));
        std::thread::scope(|s| {
            s.spawn(|| {
                let start = Instant::now();
                let timeout = Duration::from_millis(50);
                assert_eq!(m.lock(Some(start + timeout)), Err(LockFailed::TimedOut));
                assert!(start.elapsed() >= timeout);
            });
        });
        m.unlock().unwrap();
        assert_eq!(m.try_lock(), Ok(Acquired::Clean));
        m.unlock().unwrap();
    }
}

/// The mutex Miri runs in place of glibc's (see the `cfg(miri)` `imp`):
/// its owner checks, and exclusion Miri's race detector can confirm.
#[cfg(all(test, miri))]
mod miri_tests {
    use super::*;
    use std::cell::UnsafeCell;
    use std::mem::MaybeUninit;
    use std::time::{Duration, Instant};

    fn boxed(recursive: bool) -> Box<RobustMutex> {
        let mut slot = Box::new(MaybeUninit::<RobustMutex>::uninit());
        // SAFETY: the box is a fresh, aligned, exclusively owned allocation.
        unsafe { RobustMutex::init_at(slot.as_mut_ptr(), recursive).unwrap() };
        // SAFETY: init_at initialised the mutex.
        unsafe { slot.assume_init() }
    }

    #[test]
    fn miri_mutex_checks_its_owner() {
        let m = boxed(false);
        assert!(m.is_intact(false) && !m.is_intact(true));
        assert_eq!(m.owner_tid(), None);
        assert_eq!(m.lock(None), Ok(Acquired::Clean));
        assert!(m.held_in_this_process());
        assert_eq!(m.lock(None), Err(LockFailed::Deadlock));
        assert_eq!(m.try_lock(), Err(LockFailed::Deadlock));
        std::thread::scope(|s| {
            s.spawn(|| {
                assert_eq!(m.try_lock(), Err(LockFailed::WouldBlock));
                assert_eq!(m.unlock(), Err(NotOwner));
                let start = Instant::now();
                let timeout = Duration::from_millis(50);
                assert_eq!(m.lock(Some(start + timeout)), Err(LockFailed::TimedOut));
                assert!(start.elapsed() >= timeout);
            });
        });
        assert_eq!(m.unlock(), Ok(()));
        assert_eq!(m.unlock(), Err(NotOwner));
        assert_eq!(m.owner_tid(), None);
    }

    #[test]
    fn miri_mutex_recursive_counts() {
        let m = boxed(true);
        m.lock(None).unwrap();
        m.try_lock().unwrap();
        std::thread::scope(|s| {
            s.spawn(|| assert_eq!(m.try_lock(), Err(LockFailed::WouldBlock)));
        });
        m.unlock().unwrap();
        assert!(m.owner_tid().is_some(), "still held once");
        m.unlock().unwrap();
        assert_eq!(m.unlock(), Err(NotOwner));
    }

    /// Threads increment a plain (non-atomic) counter under the mutex,
    /// sleeping on it when contended: Miri reports a data race if the
    /// mutex fails to order them, and a deadlock if a wake-up is lost.
    #[test]
    fn miri_mutex_excludes_and_wakes_sleepers() {
        struct Counter(UnsafeCell<u64>);
        // SAFETY: only accessed while holding the mutex (what the test checks).
        unsafe impl Sync for Counter {}
        impl Counter {
            /// # Safety
            /// The caller holds the mutex.
            unsafe fn bump(&self) {
                // SAFETY: the caller holds the mutex: no other access.
                unsafe { *self.0.get() += 1 };
            }
        }
        let m = boxed(false);
        let counter = Counter(UnsafeCell::new(0));
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..20 {
                        m.lock(None).unwrap();
                        // SAFETY: the mutex is held.
                        unsafe { counter.bump() };
                        std::thread::yield_now();
                        m.unlock().unwrap();
                    }
                });
            }
        });
        assert_eq!(counter.0.into_inner(), 60);
    }
}
