//! Task timeouts, whole-call deadlines and cancellation, end to end with real workers.
//!
//! Every wait is bounded ([`LIMIT`]). Tasks that must be running when the test acts announce
//! themselves on a FIFO, and wait at a gate the test opens; nothing synchronises by sleeping.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mp_pool::{Pool, PoolError};
use parking_lot::Mutex;

mod common;
use common::*;

/// A timeout short enough for a quick test, long enough for any quick task on a loaded CI.
const SHORT: Duration = Duration::from_millis(300);

fn square(x: u64) -> u64 {
    x * x
}

/// The worker `pid` was killed: it ends (at most `LIMIT`) and runs no more tasks.
fn assert_exits(pool: &Pool, pid: u32) {
    assert_ends(pid);
    let pids: Vec<u32> = pool
        .chunksize(1)
        .map_async(|_: u32| std::process::id(), 0..pool.processes() as u32 * 4)
        .unwrap()
        .get_timeout(LIMIT)
        .unwrap();
    assert!(!pids.contains(&pid), "the killed worker {pid} ran a task");
}

fn close(pool: Pool) {
    let pids = pool.worker_pids();
    pool.close();
    pool.join_timeout(LIMIT).expect("join");
    for pid in pids {
        assert!(!is_running(pid), "worker {pid} left behind");
    }
}

#[test]
fn a_task_over_its_timeout_kills_its_worker_and_the_pool_goes_on() {
    let pool = Pool::new(1).unwrap();
    let mut announcements = Announcements::new();
    let started = Instant::now();
    let stuck = pool
        .timeout(SHORT)
        .apply_async(announce_and_block, announcements.path())
        .unwrap();
    let pid = announcements.next_pid();
    match stuck.get_timeout(LIMIT) {
        Err(PoolError::TaskTimedOut {
            function,
            index,
            timeout,
            pid: killed,
        }) => {
            assert!(function.contains("announce_and_block"), "{function}");
            assert_eq!((index, timeout, killed), (0, SHORT, pid));
        }
        other => panic!("expected TaskTimedOut, got {other:?}"),
    }
    assert!(started.elapsed() >= SHORT, "failed before its timeout");
    let message = stuck.get().unwrap_err().to_string();
    assert!(message.contains("announce_and_block"), "{message}");
    assert!(message.contains("timeout"), "{message}");
    assert_eq!(pool.apply(square, 7), Ok(49), "a replacement runs tasks");
    assert_exits(&pool, pid);
    close(pool);
}

#[test]
fn the_pool_wide_timeout_spares_quick_tasks_and_requeues_those_behind_the_slow_one() {
    let pool = Pool::builder()
        .processes(1)
        .task_timeout(SHORT)
        .build()
        .unwrap();
    let mut announcements = Announcements::new();
    let stuck = pool
        .apply_async(announce_and_block, announcements.path())
        .unwrap();
    // Queued behind the stuck task on the only worker: they must run on its replacement.
    let quick: Vec<_> = (0..5u64)
        .map(|x| pool.apply_async(square, x).unwrap())
        .collect();
    let pid = announcements.next_pid();
    assert!(matches!(
        stuck.get_timeout(LIMIT),
        Err(PoolError::TaskTimedOut { pid: p, .. }) if p == pid
    ));
    for (x, result) in quick.iter().enumerate() {
        assert_eq!(result.get_timeout(LIMIT), Ok((x * x) as u64));
    }
    // A per-call limit overrides the pool's.
    let long_enough = pool.timeout(LIMIT).apply_async(square, 9).unwrap();
    assert_eq!(long_enough.get_timeout(LIMIT), Ok(81));
    assert_exits(&pool, pid);
    close(pool);
}

#[test]
fn map_with_a_task_timeout_fails_with_the_task_that_ran_too_long() {
    let pool = Pool::new(2).unwrap();
    let announcements = Announcements::new();
    let path = announcements.path();
    let items: Vec<(u64, String)> = (0..6).map(|x| (x, path.clone())).collect();
    let result = pool
        .chunksize(1)
        .timeout(SHORT)
        .map(
            |(x, path): (u64, String)| {
                if x == 3 {
                    announce_and_block(path);
                }
                x
            },
            items,
        )
        .unwrap_err();
    match result {
        PoolError::TaskTimedOut { index, .. } => assert_eq!(index, 3),
        other => panic!("expected TaskTimedOut, got {other:?}"),
    }
    // With chunks of two, the limit is the chunk's, named by its first item.
    let items: Vec<(u64, String)> = (0..6).map(|x| (x, path.clone())).collect();
    let chunked = pool
        .chunksize(2)
        .timeout(SHORT)
        .map(
            |(x, path): (u64, String)| {
                if x == 3 {
                    announce_and_block(path);
                }
                x
            },
            items,
        )
        .unwrap_err();
    assert!(
        matches!(chunked, PoolError::TaskTimedOut { index: 2, .. }),
        "{chunked:?}"
    );
    // Tasks that end in time are not affected by a limit; thousands of them (more
    // deadlines than the supervisor keeps before pruning answered ones).
    let squares = pool
        .timeout(LIMIT)
        .chunksize(1)
        .map(square, 0..3_000u64)
        .unwrap();
    assert_eq!(squares[2_999], 2_999 * 2_999);
    close(pool);
}

#[test]
fn map_timeout_gives_up_at_the_deadline_and_kills_what_still_runs() {
    let pool = Pool::new(2).unwrap();
    let mut announcements = Announcements::new();
    let path = announcements.path();
    let items: Vec<(u64, String)> = (0..4).map(|x| (x, path.clone())).collect();
    let started = Instant::now();
    let outcome = pool.chunksize(1).map_timeout(
        |(x, path): (u64, String)| {
            if x == 1 {
                announce_and_block(path);
            }
            x
        },
        items,
        SHORT,
    );
    assert_eq!(outcome, Err(PoolError::Timeout));
    let waited = started.elapsed();
    assert!(
        waited >= SHORT && waited < LIMIT,
        "gave up after {waited:?}"
    );
    let pid = announcements.next_pid();
    assert_eq!(
        pool.map(square, 0..10u64).unwrap()[9],
        81,
        "the pool goes on"
    );
    assert_exits(&pool, pid);
    close(pool);
}

#[test]
fn cancel_withdraws_a_queued_task_and_not_a_running_one() {
    let pool = Pool::new(1).unwrap();
    let mut announcements = Announcements::new();
    let gate = Gate::new();
    let running = pool
        .apply_async(announce_and_wait, (announcements.path(), gate.path()))
        .unwrap();
    let pid = announcements.next_pid();
    let seen = Arc::new(Mutex::new(None));
    let sink = seen.clone();
    // Would announce itself if it ran.
    let queued = pool
        .apply_async(
            |path: String| {
                common::announce(&path);
                1u32
            },
            announcements.path(),
        )
        .unwrap()
        .error_callback(move |error| *sink.lock() = Some(error.clone()));
    assert!(queued.cancel(), "a queued task can be cancelled");
    assert!(queued.cancel(), "and stays cancelled");
    assert!(queued.cancelled());
    assert_eq!(queued.get(), Err(PoolError::Cancelled));
    assert_eq!(*seen.lock(), Some(PoolError::Cancelled), "error callback");
    assert!(!running.cancel(), "a running task is not cancelled");
    gate.open();
    assert_eq!(running.get_timeout(LIMIT), Ok(pid));
    assert!(!running.cancel(), "nor a finished one");
    assert!(!running.cancelled());
    // On the one worker, a task submitted after the cancelled one runs after it would have.
    assert_eq!(pool.apply(square, 4), Ok(16));
    close(pool);
    assert!(
        announcements.try_next_pid().is_none(),
        "the cancelled task ran"
    );
}

#[test]
fn a_map_is_cancelled_only_if_none_of_it_started() {
    let pool = Pool::new(1).unwrap();
    let mut announcements = Announcements::new();
    let gate = Gate::new();
    let running = pool
        .apply_async(announce_and_wait, (announcements.path(), gate.path()))
        .unwrap();
    announcements.next_pid();
    let queued = pool.chunksize(2).map_async(square, 0..10u64).unwrap();
    assert!(queued.cancel());
    assert_eq!(queued.get(), Err(PoolError::Cancelled));
    gate.open();
    running.get_timeout(LIMIT).unwrap();
    let started = pool.chunksize(1).map_async(square, 0..4u64).unwrap();
    started.wait_timeout(LIMIT);
    assert!(!started.cancel(), "it finished");
    assert_eq!(started.get(), Ok(vec![0, 1, 4, 9]));
    close(pool);
}

#[test]
fn shutdown_with_cancel_pending_fails_queued_tasks_and_lets_running_ones_finish() {
    let pool = Pool::new(1).unwrap();
    let mut announcements = Announcements::new();
    let gate = Gate::new();
    let running = pool
        .apply_async(announce_and_wait, (announcements.path(), gate.path()))
        .unwrap();
    let pid = announcements.next_pid();
    let queued: Vec<_> = (0..20u64)
        .map(|x| pool.apply_async(square, x).unwrap())
        .collect();
    let mapped = pool.map_async(square, 0..100u64).unwrap();
    std::thread::scope(|scope| {
        let shutdown = scope.spawn(|| pool.shutdown(true));
        // Cancelled at once, while the running task still waits at its gate.
        for result in &queued {
            assert_eq!(result.get_timeout(LIMIT), Err(PoolError::Cancelled));
        }
        assert_eq!(mapped.get_timeout(LIMIT), Err(PoolError::Cancelled));
        assert!(!running.ready(), "the running task was not interrupted");
        gate.open();
        assert_eq!(shutdown.join().unwrap(), Ok(()));
    });
    assert_eq!(running.get_timeout(LIMIT), Ok(pid), "it finished");
    assert!(!is_running(pid), "shutdown waited for the worker to exit");
    assert_eq!(pool.apply(square, 2), Err(PoolError::Closed));
}

/// The tests of this binary fork from libtest's threads. SAFETY (of the `allow_fork` below):
/// no test here holds a lock that a forked child then uses; the locks the children touch are
/// mp-core's, which are safe across `fork()`.
#[ctor::ctor(unsafe)]
fn allow_fork_in_these_tests() {
    // SAFETY: see above.
    unsafe { mp_core::allow_fork() };
}
