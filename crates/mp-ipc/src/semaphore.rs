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
//! Permits are not owned: [`SemaphoreGuard::forget`] keeps a permit taken, and
//! any thread or process may [`release`](Semaphore::release), as in Python.
//! For the same reason a permit held by a process that dies is not given back
//! (use a robust [`Lock`](crate::lock::Lock) where that matters).

use std::fmt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::futex::{self, AtomicU32, WaitOutcome, fence};
use crate::lock::deadline_after;
use crate::shm::{Shared, ShmError, ShmState, tag};

/// Errors of semaphore operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum SemaphoreError {
    /// `try_acquire`: no permit is free.
    #[error("no permit is free")]
    WouldBlock,
    /// `acquire_timeout`: no permit became free in time.
    #[error("timed out after {0:?} waiting for a permit")]
    Timeout(Duration),
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
}

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
    pub(crate) fn acquire(&self, deadline: Option<Instant>) -> bool {
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
            if futex::wait(&self.count, 0, deadline) == WaitOutcome::TimedOut {
                // A wake-up may have been meant for us: take its permit.
                break self.try_acquire();
            }
        };
        self.sleepers.fetch_sub(1, Ordering::Relaxed);
        acquired
    }

    /// Gives a permit back; `Err(bound)` if that would exceed the bound.
    pub(crate) fn release(&self) -> Result<(), u32> {
        let bound = self.bound;
        self.count
            .fetch_update(Ordering::Release, Ordering::Relaxed, |count| {
                (count < bound).then_some(count + 1)
            })
            .map_err(|_| bound)?;
        fence(Ordering::SeqCst);
        if self.sleepers.load(Ordering::Relaxed) > 0 {
            futex::wake(&self.count, 1);
        }
        Ok(())
    }

    pub(crate) fn value(&self) -> u32 {
        self.count.load(Ordering::Relaxed)
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
        // SAFETY: the closure writes a complete SemState.
        let state = unsafe {
            Shared::create(|ptr: *mut SemState| {
                ptr.write(SemState::new(value, bound));
                Ok(())
            })?
        };
        Ok(Self { state })
    }

    /// Takes a permit, waiting as long as needed. The guard gives it back
    /// when dropped (or keep it with [`SemaphoreGuard::forget`]).
    pub fn acquire(&self) -> SemaphoreGuard<'_> {
        // Without a deadline the wait only ends with a permit.
        while !self.state.acquire(None) {}
        SemaphoreGuard::new(self)
    }

    /// Takes a permit if one is free.
    pub fn try_acquire(&self) -> Result<SemaphoreGuard<'_>, SemaphoreError> {
        if self.state.try_acquire() {
            Ok(SemaphoreGuard::new(self))
        } else {
            Err(SemaphoreError::WouldBlock)
        }
    }

    /// Takes a permit, waiting at most `timeout`.
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<SemaphoreGuard<'_>, SemaphoreError> {
        if self.state.acquire(deadline_after(timeout)) {
            Ok(SemaphoreGuard::new(self))
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
}

impl<'a> SemaphoreGuard<'a> {
    fn new(semaphore: &'a Semaphore) -> Self {
        Self { semaphore }
    }

    /// Keeps the permit taken (Python's bare `acquire()`); give it back later
    /// with [`Semaphore::release`], from any thread or process.
    pub fn forget(self) {
        std::mem::forget(self);
    }
}

impl Drop for SemaphoreGuard<'_> {
    fn drop(&mut self) {
        // Only a bounded semaphore released behind the guard's back (an
        // explicit release beyond its own acquisitions) can refuse this.
        if let Err(error) = self.semaphore.release() {
            tracing::warn!(%error, "semaphore guard could not give its permit back");
        }
    }
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
                    loom::thread::spawn(move || assert!(sem.acquire(None)))
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
                loom::thread::spawn(move || sem.acquire(Some(std::time::Instant::now())))
            };
            sem.release().unwrap();
            let took = waiter.join().unwrap();
            assert_eq!(sem.value(), if took { 0 } else { 1 });
        });
    }
}
