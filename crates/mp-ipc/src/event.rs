//! [`Event`]: a flag that processes and threads can wait for.
//!
//! ```
//! use mp_ipc::event::Event;
//! use std::time::Duration;
//!
//! let ready = Event::new()?;
//! assert!(ready.wait_timeout(Duration::from_millis(1)).is_err());
//! ready.set();
//! ready.wait(); // returns at once: the flag is set
//! assert!(ready.is_set());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The flag shares its futex word with a count of `set` calls, so a waiter
//! that was asleep when the event was set returns even if the event is cleared
//! again before it runs (as with Python's `threading.Event`).

use std::fmt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::futex::{self, AtomicU32, WaitOutcome, fence};
use crate::lock::deadline_after;
use crate::shm::{Shared, ShmError, ShmState, tag};

/// `wait_timeout`: the event was not set in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("timed out after {0:?} waiting for the event")]
pub struct EventTimeout(pub Duration);

/// Bit 0 of the word: the flag. The other bits count `set` calls.
const FLAG: u32 = 1;

/// Checks the flag this many times before sleeping (not under loom).
const SPINS: u32 = if cfg!(loom) { 0 } else { 100 };

/// The event as laid out in shared memory.
#[repr(C)]
pub(crate) struct EventState {
    tag: u64,
    /// `FLAG` | (number of sets << 1); the futex word.
    word: AtomicU32,
    /// Threads registered as (about to be) asleep on `word`.
    sleepers: AtomicU32,
}

// SAFETY: repr(C), starts with the tag, mutated only through atomics.
unsafe impl ShmState for EventState {
    const TAG: u64 = tag(b"mp:Event");
    const KIND: &'static str = "Event";
}

/// Whether, since `start` was read, the flag is up or was raised.
fn signalled(start: u32, now: u32) -> bool {
    now & FLAG != 0 || now >> 1 != start >> 1
}

impl EventState {
    pub(crate) fn new() -> Self {
        EventState {
            tag: Self::TAG,
            word: AtomicU32::new(0),
            sleepers: AtomicU32::new(0),
        }
    }

    pub(crate) fn set(&self) {
        let raised = self
            .word
            .fetch_update(Ordering::Release, Ordering::Relaxed, |word| {
                (word & FLAG == 0).then(|| word.wrapping_add(2) | FLAG)
            })
            .is_ok();
        // Pairs with the fence in `wait`: we see its registration, or it
        // sees our flag.
        fence(Ordering::SeqCst);
        if raised && self.sleepers.load(Ordering::Relaxed) > 0 {
            futex::wake_all(&self.word);
        }
    }

    pub(crate) fn clear(&self) {
        self.word.fetch_and(!FLAG, Ordering::Relaxed);
    }

    pub(crate) fn is_set(&self) -> bool {
        self.word.load(Ordering::Acquire) & FLAG != 0
    }

    /// Waits until the flag is up or was raised meanwhile; false if
    /// `deadline` passed first.
    pub(crate) fn wait(&self, deadline: Option<Instant>) -> bool {
        let start = self.word.load(Ordering::Acquire);
        if start & FLAG != 0 {
            return true;
        }
        for _ in 0..SPINS {
            std::hint::spin_loop();
            if signalled(start, self.word.load(Ordering::Acquire)) {
                return true;
            }
        }
        // Register, then re-check: a `set` either sees us or we see it.
        self.sleepers.fetch_add(1, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        let set = loop {
            let now = self.word.load(Ordering::Acquire);
            if signalled(start, now) {
                break true;
            }
            if futex::wait(&self.word, now, deadline) == WaitOutcome::TimedOut {
                break signalled(start, self.word.load(Ordering::Acquire));
            }
        };
        self.sleepers.fetch_sub(1, Ordering::Relaxed);
        set
    }
}

/// An event (Python's `multiprocessing.Event`): `set` raises a flag and wakes
/// every waiter; `clear` lowers it.
///
/// Clones, and copies passed to child processes, are the same event.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Event {
    state: Shared<EventState>,
}

impl Event {
    /// A new event, not set.
    pub fn new() -> Result<Self, ShmError> {
        // SAFETY: the closure writes a complete EventState.
        let state = unsafe {
            Shared::create(|ptr: *mut EventState| {
                ptr.write(EventState::new());
                Ok(())
            })?
        };
        Ok(Self { state })
    }

    /// Raises the flag and wakes every waiter.
    pub fn set(&self) {
        self.state.set();
    }

    /// Lowers the flag.
    pub fn clear(&self) {
        self.state.clear();
    }

    /// Whether the flag is up.
    pub fn is_set(&self) -> bool {
        self.state.is_set()
    }

    /// Waits until the flag is up (returns at once if it is).
    pub fn wait(&self) {
        while !self.state.wait(None) {}
    }

    /// Waits until the flag is up, at most `timeout`.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<(), EventTimeout> {
        if self.state.wait(deadline_after(timeout)) {
            Ok(())
        } else {
            Err(EventTimeout(timeout))
        }
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("is_set", &self.is_set())
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn set_clear_and_timeout() {
        let event = Event::new().unwrap();
        assert!(!event.is_set());
        let timeout = Duration::from_millis(20);
        let start = Instant::now();
        assert_eq!(event.wait_timeout(timeout), Err(EventTimeout(timeout)));
        assert!(start.elapsed() >= timeout);
        event.set();
        event.set();
        assert!(event.is_set());
        assert_eq!(event.wait_timeout(Duration::ZERO), Ok(()));
        event.clear();
        assert!(!event.is_set());
    }

    #[test]
    fn a_set_then_clear_still_releases_sleepers() {
        let event = Event::new().unwrap();
        let state = &event.state;
        let start = state.word.load(Ordering::SeqCst);
        event.set();
        event.clear();
        assert!(signalled(start, state.word.load(Ordering::SeqCst)));
    }

    #[test]
    fn set_wakes_every_waiter() {
        let event = Event::new().unwrap();
        std::thread::scope(|s| {
            let waiters: Vec<_> = (0..3)
                .map(|_| s.spawn(|| event.wait_timeout(Duration::from_secs(10))))
                .collect();
            event.set();
            for waiter in waiters {
                assert_eq!(waiter.join().unwrap(), Ok(()));
            }
        });
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::EventState;
    use loom::sync::Arc;

    /// Set, clear, set: whenever the waiter arrives it is released (a waiter
    /// asleep during the first set must not miss it because of the clear).
    #[test]
    fn loom_event_set_clear_releases_waiter() {
        crate::futex::model(|| {
            let event = Arc::new(EventState::new());
            let waiter = {
                let event = Arc::clone(&event);
                loom::thread::spawn(move || assert!(event.wait(None)))
            };
            event.set();
            event.clear();
            event.set();
            waiter.join().unwrap();
        });
    }

    /// Concurrent setters: two waiters are both released.
    #[test]
    fn loom_event_two_waiters() {
        crate::futex::model(|| {
            let event = Arc::new(EventState::new());
            let waiters: Vec<_> = (0..2)
                .map(|_| {
                    let event = Arc::clone(&event);
                    loom::thread::spawn(move || assert!(event.wait(None)))
                })
                .collect();
            event.set();
            for waiter in waiters {
                waiter.join().unwrap();
            }
            assert!(event.is_set());
        });
    }
}
