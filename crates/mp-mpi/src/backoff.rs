//! How a rank waits for MPI traffic without eating a core.
//!
//! Open MPI has no receive that sleeps: a blocking `MPI_Recv` or `MPI_Probe` polls its
//! transports at 100 % of a core, even with `mpi_yield_when_idle`, so idle worker ranks on an
//! oversubscribed node would steal the CPU of busy ones. The pool therefore polls with
//! `MPI_Improbe` and backs off.
//!
//! * For [`SPIN`] after the last message it polls continuously, yielding the core between
//!   polls, which keeps the round trip of a busy pool short. On this project's loaded 2-vCPU
//!   VM a 50 µs spin gave a 390 µs `apply` round trip and 200 µs gave 66 µs: a hop through
//!   rank 0's two threads and the worker often takes longer than 50 µs there, and a rank
//!   that went to sleep wakes late.
//! * Then it sleeps between polls, each sleep a sixteenth of the time waited so far, from
//!   [`FIRST_SLEEP`] up to [`MAX_SLEEP`]. A message is thus noticed at most about 6 % (and at
//!   most [`MAX_SLEEP`]) later than it arrived, relative to how long the rank had waited, and
//!   a rank idle for long wakes 250 times a second for a poll of a few microseconds (about
//!   1 % of a core, measured by the tests). mpi4py.futures makes the same trade-off with a
//!   fixed 1 ms sleep.

use std::time::{Duration, Instant};

/// How long to poll without sleeping after the last message (see the module docs).
pub(crate) const SPIN: Duration = Duration::from_micros(200);
/// The shortest sleep after the spin.
pub(crate) const FIRST_SLEEP: Duration = Duration::from_micros(20);
/// The longest sleep between two polls: the worst added latency of a task sent to an idle rank.
pub(crate) const MAX_SLEEP: Duration = Duration::from_millis(4);
/// Each sleep is the time waited so far divided by this.
const SLEEP_FRACTION: u32 = 16;

/// The state of one waiting loop.
#[derive(Debug)]
pub(crate) struct Backoff {
    idle_since: Instant,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff {
            idle_since: Instant::now(),
        }
    }

    /// Something happened: poll eagerly again.
    pub(crate) fn reset(&mut self) {
        self.idle_since = Instant::now();
    }

    /// How long to pause before the next poll: `None` while spinning (yield the core and poll
    /// again), then sleeps growing with the time waited.
    pub(crate) fn next_pause(&self) -> Option<Duration> {
        let waited = self.idle_since.elapsed();
        (waited >= SPIN).then(|| (waited / SLEEP_FRACTION).clamp(FIRST_SLEEP, MAX_SLEEP))
    }

    /// Pauses the calling thread for the next pause.
    pub(crate) fn pause(&self) {
        match self.next_pause() {
            None => std::thread::yield_now(),
            Some(sleep) => std::thread::sleep(sleep),
        }
    }
}

/// Polls `ready` (yielding the core between polls) for at most [`SPIN`] or until `deadline`;
/// returns whether it became true. Waiters call this before sleeping on a condition variable.
pub(crate) fn spin_until(ready: impl Fn() -> bool, deadline: Option<Instant>) -> bool {
    let start = Instant::now();
    loop {
        if ready() {
            return true;
        }
        if start.elapsed() >= SPIN || deadline.is_some_and(|d| Instant::now() >= d) {
            return false;
        }
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spin_until_stops_at_once_when_ready_and_soon_when_not() {
        assert!(spin_until(|| true, None));
        let start = Instant::now();
        assert!(!spin_until(|| false, None));
        assert!(start.elapsed() >= SPIN);
    }

    #[test]
    fn sleeps_grow_with_the_wait_up_to_the_cap_and_reset() {
        let mut backoff = Backoff::new();
        backoff.idle_since -= SPIN;
        assert_eq!(backoff.next_pause(), Some(FIRST_SLEEP));
        backoff.idle_since -= Duration::from_millis(16);
        let pause = backoff.next_pause().unwrap();
        assert!(
            pause >= Duration::from_millis(1) && pause < MAX_SLEEP,
            "{pause:?}"
        );
        backoff.idle_since -= Duration::from_secs(10);
        assert_eq!(backoff.next_pause(), Some(MAX_SLEEP));
        backoff.reset();
        assert_eq!(backoff.next_pause(), None);
    }
}
