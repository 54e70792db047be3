//! Waiting costs no CPU: the pool's threads sleep in the kernel while a task with a
//! deadline runs. In its own test binary (one test), so that the process's CPU time is this
//! pool's alone whatever the test runner.

use std::time::{Duration, Instant};

use mp_pool::Pool;

mod common;
use common::*;

/// CPU time (user + system) this process has used so far.
fn cpu_time() -> Duration {
    // SAFETY: an all-zero rusage is a valid value for getrusage to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid, writable rusage.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

#[test]
fn waiting_for_a_task_s_deadline_costs_no_cpu() {
    let pool = Pool::new(1).unwrap();
    let mut announcements = Announcements::new();
    let gate = Gate::new();
    let held = pool
        .timeout(LIMIT)
        .apply_async(announce_and_wait, (announcements.path(), gate.path()))
        .unwrap();
    announcements.next_pid();
    // A measuring window, not synchronisation: the pool's threads sleep in the kernel
    // until the deadline (20 s away) or an event.
    let (cpu_before, wall_before) = (cpu_time(), Instant::now());
    std::thread::sleep(Duration::from_millis(500));
    let (cpu, wall) = (cpu_time() - cpu_before, wall_before.elapsed());
    assert!(
        cpu < wall / 10,
        "{cpu:?} of CPU in {wall:?} while waiting for a deadline"
    );
    gate.open();
    assert!(held.get_timeout(LIMIT).is_ok());
    pool.close();
    pool.join_timeout(LIMIT).unwrap();
}
