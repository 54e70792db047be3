//! Adaptive spinning before a futex sleep.

use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// Adaptive spinning before a futex sleep.
///
/// Spinning pays when the other side runs on another vCPU and answers
/// within microseconds (waking a sleeper there costs ~30 µs); it hurts
/// when both share one vCPU (the spinner holds the CPU the answer needs).
/// So a spin pauses for up to `budget` iterations (20 ns each here), then
/// yields twice, then gives up; the budget adapts to what happened:
///
/// * ready while pausing: the peer is on another vCPU and quick: double;
/// * ready after a yield that ran another task (it took a while): the
///   peer needed our vCPU: halve; after a yield that returned at once
///   (nobody else wanted our vCPU): the pause was just too short: double;
/// * gave up, and the sleep that followed ended soon ([`SHORT_SLEEP`]):
///   a longer spin would have caught it: double;
/// * gave up, and the sleep was long (an idle peer): halve.
#[derive(Debug)]
pub(crate) struct Spinner {
    budget: AtomicU32,
}

const SPIN_MIN: u32 = 16;
const SPIN_MAX: u32 = 1024;
const SPIN_START: u32 = 256;
const SPIN_YIELDS: u32 = 2;
/// A sleep shorter than this (wake-up latency included) means the peer
/// answered soon after we stopped spinning.
const SHORT_SLEEP: Duration = Duration::from_micros(200);
/// A `sched_yield` that takes longer than this let another task run.
const YIELD_RAN_OTHERS: Duration = Duration::from_micros(2);

impl Spinner {
    pub(crate) fn new() -> Spinner {
        Spinner {
            budget: AtomicU32::new(SPIN_START),
        }
    }

    fn grow(&self) {
        let budget = self.budget.load(Relaxed);
        self.budget.store((budget * 2).min(SPIN_MAX), Relaxed);
    }

    fn shrink(&self) {
        let budget = self.budget.load(Relaxed);
        self.budget.store((budget / 2).max(SPIN_MIN), Relaxed);
    }

    /// Spins until `ready()` or the budget runs out; returns `ready()`.
    pub(crate) fn spin(&self, ready: impl Fn() -> bool) -> bool {
        for _ in 0..self.budget.load(Relaxed) {
            if ready() {
                self.grow();
                return true;
            }
            std::hint::spin_loop();
        }
        for _ in 0..SPIN_YIELDS {
            let before = Instant::now();
            std::thread::yield_now();
            if ready() {
                if before.elapsed() > YIELD_RAN_OTHERS {
                    self.shrink();
                } else {
                    self.grow();
                }
                return true;
            }
        }
        false
    }

    /// The condition became true after a sleep that began at `since`.
    pub(crate) fn slept(&self, since: Instant) {
        if since.elapsed() < SHORT_SLEEP {
            self.grow();
        } else {
            self.shrink();
        }
    }
}
