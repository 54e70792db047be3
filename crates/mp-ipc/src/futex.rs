//! Futex wait and wake on a 32-bit word that may live in memory shared between
//! processes.
//!
//! The word is addressed with the *shared* futex operations (no
//! `FUTEX_PRIVATE_FLAG`): the kernel keys the wait queue on the underlying page,
//! so a waiter in one process is woken by a waker in another, even when the two
//! map the segment at different addresses.
//!
//! Under `cfg(loom)` the same functions are a model built from loom's mutex and
//! condition variable: the compare-and-sleep in [`wait`] is atomic with respect
//! to [`wake`] exactly as in the kernel, so a lost wake-up shows up as a loom
//! deadlock, and a timed wait models "the timeout fires now".

use std::time::Instant;

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicU32, fence};

// loom models SeqCst loads and stores as acquire/release only, but SeqCst
// fences exactly: the "register as sleeper / check the word" handshakes use
// fences so that the models check what the hardware guarantees.
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, fence};

/// What ended a [`wait`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WaitOutcome {
    /// Woken by [`wake`], or spuriously (by a signal, by a wake meant for an
    /// earlier value): the caller re-checks its condition.
    Woken,
    /// The word did not hold `expected` when the wait began; nothing slept.
    Mismatch,
    /// The deadline passed.
    TimedOut,
}

#[cfg(not(loom))]
mod imp {
    use super::WaitOutcome;
    use rustix::io::Errno;
    use rustix::thread::futex::{self, Flags, Timespec};
    use std::sync::atomic::AtomicU32;
    use std::time::Instant;

    /// Sleeps while `word == expected`, until woken or until `deadline`.
    pub(crate) fn wait(word: &AtomicU32, expected: u32, deadline: Option<Instant>) -> WaitOutcome {
        let timeout = match deadline {
            None => None,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return WaitOutcome::TimedOut;
                }
                Some(Timespec {
                    tv_sec: left.as_secs().try_into().unwrap_or(i64::MAX),
                    tv_nsec: left.subsec_nanos().into(),
                })
            }
        };
        match futex::wait(word, Flags::empty(), expected, timeout.as_ref()) {
            Ok(()) => WaitOutcome::Woken,
            Err(Errno::AGAIN) => WaitOutcome::Mismatch,
            Err(Errno::TIMEDOUT) => WaitOutcome::TimedOut,
            // EINTR: a signal; the caller re-checks and, if need be, waits again
            // with the time that is left.
            Err(Errno::INTR) => WaitOutcome::Woken,
            // EFAULT/EINVAL would mean the reference is not a valid futex word,
            // which `&AtomicU32` rules out; treat as spurious rather than panic.
            Err(_) => WaitOutcome::Woken,
        }
    }

    /// Wakes up to `count` waiters sleeping on `word`; returns how many woke.
    pub(crate) fn wake(word: &AtomicU32, count: u32) -> usize {
        // `count` above i32::MAX is read by the kernel as negative; clamp.
        let count = count.min(i32::MAX as u32);
        futex::wake(word, Flags::empty(), count).unwrap_or(0)
    }
}

#[cfg(loom)]
mod imp {
    use super::WaitOutcome;
    use loom::sync::atomic::AtomicU32;
    use loom::sync::{Condvar, Mutex};
    use std::sync::atomic::Ordering;
    use std::time::Instant;

    /// The model's single futex hash bucket: a wake-up counter and the queue.
    struct Bucket {
        wakeups: Mutex<u64>,
        sleepers: Condvar,
    }

    loom::lazy_static! {
        static ref BUCKET: Bucket = Bucket { wakeups: Mutex::new(0), sleepers: Condvar::new() };
    }

    /// Model: compare and sleep under the bucket lock; a timed wait whose word
    /// still matches times out at once (loom has no clock), which explores the
    /// timeout paths of the callers.
    pub(crate) fn wait(word: &AtomicU32, expected: u32, deadline: Option<Instant>) -> WaitOutcome {
        let mut wakeups = BUCKET.wakeups.lock().unwrap();
        if word.load(Ordering::SeqCst) != expected {
            return WaitOutcome::Mismatch;
        }
        if deadline.is_some() {
            return WaitOutcome::TimedOut;
        }
        let seen = *wakeups;
        while *wakeups == seen {
            wakeups = BUCKET.sleepers.wait(wakeups).unwrap();
        }
        WaitOutcome::Woken
    }

    /// Model: wakes every sleeper (extra wake-ups are spurious ones, which the
    /// callers must tolerate anyway); reports 0 woken.
    pub(crate) fn wake(_word: &AtomicU32, _count: u32) -> usize {
        let mut wakeups = BUCKET.wakeups.lock().unwrap();
        *wakeups += 1;
        BUCKET.sleepers.notify_all();
        0
    }
}

/// Sleeps while `word` holds `expected`, until woken, a spurious wake-up, or
/// `deadline` (`None`: no deadline).
///
/// Returns at once with [`WaitOutcome::Mismatch`] when the word differs, and
/// with [`WaitOutcome::TimedOut`] when the deadline has already passed.
#[inline]
pub(crate) fn wait(word: &AtomicU32, expected: u32, deadline: Option<Instant>) -> WaitOutcome {
    imp::wait(word, expected, deadline)
}

/// Wakes up to `count` waiters sleeping on `word`, in any process; returns the
/// number woken (the loom model reports 0).
#[inline]
pub(crate) fn wake(word: &AtomicU32, count: u32) -> usize {
    imp::wake(word, count)
}

/// Wakes every waiter sleeping on `word`; returns the number woken.
#[inline]
pub(crate) fn wake_all(word: &AtomicU32) -> usize {
    imp::wake(word, u32::MAX)
}

/// Runs a loom model with a bounded number of preemptions (3: enough for the
/// two- and three-thread protocols modelled here, and tractable).
#[cfg(all(test, loom))]
pub(crate) fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(f);
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::Duration;

    #[test]
    fn mismatch_returns_without_sleeping() {
        let word = AtomicU32::new(1);
        assert_eq!(wait(&word, 0, None), WaitOutcome::Mismatch);
    }

    #[test]
    fn timed_wait_times_out_after_the_deadline() {
        let word = AtomicU32::new(0);
        let start = Instant::now();
        let deadline = start + Duration::from_millis(50);
        let mut outcome = WaitOutcome::Woken;
        // Spurious wake-ups are allowed; loop as callers do.
        while outcome == WaitOutcome::Woken {
            outcome = wait(&word, 0, Some(deadline));
        }
        assert_eq!(outcome, WaitOutcome::TimedOut);
        assert!(Instant::now() >= deadline);
    }

    #[test]
    fn past_deadline_times_out_at_once() {
        let word = AtomicU32::new(0);
        assert_eq!(wait(&word, 0, Some(Instant::now())), WaitOutcome::TimedOut);
    }

    #[test]
    fn wake_releases_a_sleeper() {
        let word = Arc::new(AtomicU32::new(0));
        let sleeper = {
            let word = Arc::clone(&word);
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(10);
                while word.load(Ordering::Acquire) == 0 {
                    if wait(&word, 0, Some(deadline)) == WaitOutcome::TimedOut {
                        return false;
                    }
                }
                true
            })
        };
        word.store(1, Ordering::Release);
        wake_all(&word);
        assert!(sleeper.join().unwrap(), "the sleeper was never woken");
    }

    #[test]
    fn wake_without_sleepers_wakes_nobody() {
        let word = AtomicU32::new(0);
        assert_eq!(wake(&word, 1), 0);
    }
}
