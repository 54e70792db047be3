//! The pool's behaviour, end to end, with real worker processes.
//!
//! Every wait is bounded ([`LIMIT`]): a hang fails the test instead of stalling the run.
//! Tasks that must be *running* when the test acts (kill, terminate) announce themselves on
//! a FIFO the test reads with a timeout; nothing synchronises by sleeping.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mp_core::{ExitStatus, StartMethod};
use mp_ipc::queue::Queue;
use mp_pool::{AsyncResult, Pool, PoolError};
use rustix::process::{Pid, Signal};

mod common;
use common::*;

fn square(x: u64) -> u64 {
    x * x
}

/// Burns a little CPU, more for some inputs, so that chunks finish out of order.
fn uneven_square(x: u64) -> u64 {
    let mut acc = x;
    for i in 0..(x % 7) * 20_000 {
        acc = std::hint::black_box(acc.wrapping_mul(31).wrapping_add(i));
    }
    std::hint::black_box(acc);
    x * x
}

#[test]
fn map_returns_results_in_input_order_for_any_chunksize() {
    let pool = Pool::new(2).unwrap();
    let expected: Vec<u64> = (0..300).map(|x| x * x).collect();
    let default = pool
        .map_async(uneven_square, 0..300)
        .unwrap()
        .get_timeout(LIMIT);
    assert_eq!(default.unwrap(), expected);
    for chunksize in [1, 2, 7, 299, 300, 301, 10_000] {
        let results = pool
            .chunksize(chunksize)
            .map_async(uneven_square, 0..300)
            .unwrap()
            .get_timeout(LIMIT);
        assert_eq!(results.unwrap(), expected, "chunksize {chunksize}");
    }
    // An input whose length is unknown beforehand is chunked all the same.
    let filtered = (0..600u64).filter(|x| x % 2 == 0);
    let results = pool
        .map_async(square, filtered)
        .unwrap()
        .get_timeout(LIMIT)
        .unwrap();
    assert_eq!(
        results,
        (0..600u64)
            .filter(|x| x % 2 == 0)
            .map(|x| x * x)
            .collect::<Vec<_>>()
    );
}

#[test]
fn map_of_nothing_is_empty() {
    let pool = Pool::new(2).unwrap();
    assert_eq!(pool.map(square, Vec::new()).unwrap(), Vec::<u64>::new());
    assert_eq!(
        pool.chunksize(5).map(square, []).unwrap(),
        Vec::<u64>::new()
    );
    let empty = pool.map_async(square, []).unwrap();
    assert_eq!(empty.get_timeout(LIMIT).unwrap(), Vec::<u64>::new());
    assert_eq!(pool.imap(square, []).count(), 0);
    assert_eq!(pool.imap_unordered(square, []).count(), 0);
}

#[test]
fn a_chunk_runs_on_one_worker_and_chunksize_zero_is_refused() {
    let pool = Pool::new(2).unwrap();
    let pids = pool
        .chunksize(50)
        .map(|_: u32| std::process::id(), 0..50)
        .unwrap();
    assert_eq!(
        pids.iter().collect::<BTreeSet<_>>().len(),
        1,
        "one chunk, one worker"
    );
    assert_eq!(
        pool.chunksize(0).map(square, [1]),
        Err(PoolError::InvalidChunksize)
    );
    let mut refused = pool.chunksize(0).imap(square, [1, 2]);
    assert_eq!(refused.next(), Some(Err(PoolError::InvalidChunksize)));
    assert_eq!(refused.next(), None);
}

#[test]
fn imap_keeps_order_and_reads_an_endless_input_lazily() {
    let pool = Pool::new(2).unwrap();
    let pulled = std::cell::Cell::new(0u64);
    let endless = (0u64..).inspect(|_| pulled.set(pulled.get() + 1));
    let (chunksize, in_flight) = (3, 4);
    let mut results = pool
        .chunksize(chunksize)
        .imap(uneven_square, endless)
        .max_in_flight(in_flight);
    for expected in 0..200u64 {
        let value = results.next_timeout(LIMIT).expect("endless").unwrap();
        assert_eq!(value, expected * expected);
        // Backpressure: never more than the window ahead of what was consumed.
        let bound = (expected + 1) + (chunksize * in_flight) as u64;
        assert!(
            pulled.get() <= bound,
            "pulled {} items for {} results",
            pulled.get(),
            expected + 1
        );
    }
}

#[test]
fn imap_unordered_yields_every_result_exactly_once() {
    let pool = Pool::new(2).unwrap();
    let mut seen: Vec<u64> = pool
        .imap_unordered(uneven_square, 0..500u64)
        .map(|r| r.unwrap())
        .collect();
    seen.sort_unstable();
    assert_eq!(seen, (0..500u64).map(|x| x * x).collect::<Vec<_>>());
    let mut chunked: Vec<u64> = pool
        .chunksize(9)
        .imap_unordered(square, 0..100u64)
        .map(|r| r.unwrap())
        .collect();
    chunked.sort_unstable();
    assert_eq!(chunked, (0..100u64).map(|x| x * x).collect::<Vec<_>>());
}

#[test]
fn imap_reports_a_failed_chunk_per_item_and_goes_on() {
    let pool = Pool::new(2).unwrap();
    let picky = |x: u32| -> u32 {
        assert!(x / 3 != 1, "{x} is in the bad chunk");
        x
    };
    let results: Vec<_> = pool.chunksize(3).imap(picky, 0..9).collect();
    assert_eq!(results.len(), 9);
    for (i, result) in results.iter().enumerate() {
        match result {
            Ok(v) => assert_eq!(*v as usize, i),
            Err(PoolError::Panicked { report, .. }) => {
                assert!((3..6).contains(&i), "item {i} failed");
                assert!(report.message.ends_with("is in the bad chunk"));
            }
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 3);
}

#[test]
fn one_pool_runs_any_function() {
    let pool = Pool::new(2).unwrap();
    assert_eq!(pool.apply(square, 9).unwrap(), 81);
    assert_eq!(
        pool.apply(|s: String| s.len(), "four".to_string()).unwrap(),
        4
    );
    assert_eq!(pool.apply(|(a, b): (i32, i32)| a - b, (2, 5)).unwrap(), -3);
    assert_eq!(
        pool.apply(|| "no arguments".to_string(), ()).unwrap(),
        "no arguments"
    );
    let words = pool.starmap(|(w, n): (String, usize)| w.repeat(n), [("ab".into(), 2)]);
    assert_eq!(words.unwrap(), vec!["abab".to_string()]);
    let products = pool.starmap_async(|(a, b): (u8, u8)| a as u16 * b as u16, [(3, 4), (200, 2)]);
    assert_eq!(products.unwrap().get_timeout(LIMIT).unwrap(), vec![12, 400]);
    let future = pool.submit(|x: f64| x.sqrt(), 2.25).unwrap();
    assert_eq!(future.get_timeout(LIMIT), Ok(1.5));
    let nested = pool.apply(
        |v: Vec<Option<u8>>| v.into_iter().flatten().sum::<u8>(),
        vec![Some(1), None, Some(2)],
    );
    assert_eq!(nested.unwrap(), 3);
}

#[test]
fn async_results_wait_time_out_and_report_success() {
    let pool = Pool::new(2).unwrap();
    let mut announcements = Announcements::new();
    let blocked = pool
        .apply_async(announce_and_block, announcements.path())
        .unwrap();
    announcements.next_pid();
    assert!(!blocked.ready());
    assert_eq!(blocked.successful(), None);
    assert!(!blocked.wait_timeout(Duration::from_millis(20)));
    assert_eq!(
        blocked.get_timeout(Duration::from_millis(20)),
        Err(PoolError::Timeout)
    );

    let quick = pool.apply_async(square, 5).unwrap();
    assert!(quick.wait_timeout(LIMIT));
    assert!(quick.ready());
    assert_eq!(quick.successful(), Some(true));
    assert_eq!(quick.get(), Ok(25));
    assert_eq!(quick.get(), Err(PoolError::AlreadyTaken));
}

#[test]
fn a_panicking_task_fails_alone_and_its_worker_survives() {
    let pool = Pool::new(1).unwrap();
    let pid = pool
        .apply_async(|()| std::process::id(), ())
        .unwrap()
        .get_timeout(LIMIT)
        .unwrap();
    let failed = pool
        .apply_async(|x: u32| -> u32 { panic!("cannot handle {x}") }, 7)
        .unwrap();
    match failed.get_timeout(LIMIT) {
        Err(PoolError::Panicked {
            pid: reported,
            report,
        }) => {
            assert_eq!(reported, pid);
            assert_eq!(report.message, "cannot handle 7");
            let location = report.location.expect("a location");
            assert!(location.contains("tests/pool.rs"), "location {location}");
        }
        other => panic!("expected a panic, got {other:?}"),
    }
    assert_eq!(failed.successful(), Some(false));
    let after = pool
        .apply_async(|()| std::process::id(), ())
        .unwrap()
        .get_timeout(LIMIT);
    assert_eq!(after.unwrap(), pid, "the worker survived its task's panic");
}

#[test]
fn map_reports_the_failure_and_drops_what_has_not_started() {
    let pool = Pool::new(2).unwrap();
    let picky = |x: u64| -> u64 {
        assert!(x != 57, "57 is unacceptable");
        x
    };
    let result = pool
        .chunksize(1)
        .map_async(picky, 0..10_000)
        .unwrap()
        .get_timeout(LIMIT);
    match result {
        Err(PoolError::Panicked { report, .. }) => assert_eq!(report.message, "57 is unacceptable"),
        other => panic!("expected the panic of item 57, got {other:?}"),
    }
    // The pool is fine afterwards.
    assert_eq!(pool.map(square, [3]).unwrap(), vec![9]);
}

#[test]
fn callbacks_and_error_callbacks_receive_the_outcome() {
    let pool = Pool::new(2).unwrap();
    let (sender, values) = mpsc::channel();
    let result = pool
        .apply_async(square, 12)
        .unwrap()
        .callback(move |v| sender.send(*v).unwrap())
        .error_callback(|e| panic!("unexpected error {e}"));
    assert_eq!(values.recv_timeout(LIMIT), Ok(144));
    assert_eq!(
        result.get_timeout(LIMIT),
        Ok(144),
        "the callback borrowed the value"
    );

    let (sender, errors) = mpsc::channel();
    let failed = pool
        .apply_async(|x: u8| -> u8 { panic!("no {x}") }, 1)
        .unwrap()
        .callback(|_| panic!("success callback on a failure"))
        .error_callback(move |e| sender.send(e.clone()).unwrap());
    let error = errors.recv_timeout(LIMIT).unwrap();
    assert!(matches!(&error, PoolError::Panicked { report, .. } if report.message == "no 1"));
    assert_eq!(failed.get_timeout(LIMIT), Err(error));

    let (sender, lists) = mpsc::channel();
    let mapped = pool
        .map_async(square, 1..=4)
        .unwrap()
        .callback(move |v| sender.send(v.clone()).unwrap());
    assert_eq!(lists.recv_timeout(LIMIT), Ok(vec![1, 4, 9, 16]));
    assert!(mapped.wait_timeout(LIMIT));

    // Attached after the result arrived: runs at once, on this thread.
    let called = Arc::new(AtomicBool::new(false));
    let done = pool.apply_async(square, 2).unwrap();
    assert!(done.wait_timeout(LIMIT));
    let flag = called.clone();
    let _done = done.callback(move |_| flag.store(true, Ordering::SeqCst));
    assert!(called.load(Ordering::SeqCst));
}

#[test]
fn a_panicking_callback_does_not_stop_the_pool() {
    let pool = Pool::new(1).unwrap();
    let first = pool
        .apply_async(square, 1)
        .unwrap()
        .callback(|_| panic!("callback bug"));
    assert_eq!(first.get_timeout(LIMIT), Ok(1));
    assert_eq!(
        pool.apply_async(square, 3).unwrap().get_timeout(LIMIT),
        Ok(9)
    );
}

/// Runs `task` (which announces itself), optionally kills its worker with `kill_with`, and
/// checks the task fails with the worker's death by `expected` and the pool goes on.
fn expect_worker_death<F>(kill_with: Option<Signal>, task: F, expected: i32)
where
    F: Fn(String) -> u32 + Copy + Send + Sync + 'static,
{
    let pool = Pool::new(2).unwrap();
    let mut announcements = Announcements::new();
    let doomed = pool.apply_async(task, announcements.path()).unwrap();
    let pid = announcements.next_pid();
    if let Some(signal) = kill_with {
        kill(pid, signal);
    }
    match doomed.get_timeout(LIMIT) {
        Err(error @ PoolError::WorkerDied { .. }) => {
            assert_eq!(
                error,
                PoolError::WorkerDied {
                    pid,
                    status: ExitStatus::Signal(expected)
                }
            );
            assert!(error.to_string().contains(&pid.to_string()), "{error}");
        }
        other => panic!("expected the worker's death, got {other:?}"),
    }
    // The pool goes on, with a replacement worker.
    let results = pool
        .map_async(square, 0..100)
        .unwrap()
        .get_timeout(LIMIT)
        .unwrap();
    assert_eq!(results, (0..100).map(square).collect::<Vec<_>>());
    let pids = pool
        .chunksize(1)
        .map_async(|_: u8| std::process::id(), 0..20)
        .unwrap();
    assert!(!pids.get_timeout(LIMIT).unwrap().contains(&pid));
}

#[test]
fn a_worker_killed_mid_task_fails_that_task_and_is_replaced() {
    expect_worker_death(Some(Signal::KILL), announce_and_block, libc::SIGKILL);
}

#[test]
fn a_task_that_aborts_or_segfaults_fails_with_the_signal() {
    fn abort(path: String) -> u32 {
        announce(&path);
        std::process::abort()
    }
    fn segfault(path: String) -> u32 {
        announce(&path);
        let me = Pid::from_raw(std::process::id() as i32).expect("pid");
        rustix::process::kill_process(me, Signal::SEGV).expect("raise");
        unreachable!("SIGSEGV is fatal")
    }
    expect_worker_death(None, abort, libc::SIGABRT);
    expect_worker_death(None, segfault, libc::SIGSEGV);
}

#[test]
fn tasks_queued_behind_a_dying_task_run_elsewhere() {
    let pool = Pool::new(2).unwrap();
    // Fill both workers' queues with tasks, one of which kills its worker.
    let results: Vec<_> = (0..40u64)
        .map(|i| {
            pool.apply_async(
                |i: u64| {
                    if i == 5 {
                        std::process::abort();
                    }
                    uneven_square(i)
                },
                i,
            )
            .unwrap()
        })
        .collect();
    for (i, result) in results.iter().enumerate() {
        match result.get_timeout(LIMIT) {
            Ok(v) => assert_eq!(v, (i * i) as u64),
            Err(PoolError::WorkerDied { status, .. }) => {
                assert_eq!(status, ExitStatus::Signal(libc::SIGABRT));
                // The aborting task, or one that ran just before it on the same worker
                // (whose result died with it). Tasks after it never started there: they
                // ran on the other worker or the replacement.
                assert!(
                    i <= 5,
                    "task {i} failed with the worker although it came after"
                );
            }
            Err(other) => panic!("task {i}: unexpected {other}"),
        }
    }
    assert_eq!(
        results[5].successful(),
        Some(false),
        "the aborting task failed"
    );
}

#[test]
fn terminate_while_busy_fails_tasks_and_kills_workers() {
    let pool = Pool::new(2).unwrap();
    let mut announcements = Announcements::new();
    let running: Vec<_> = (0..2)
        .map(|_| {
            pool.apply_async(announce_and_block, announcements.path())
                .unwrap()
        })
        .collect();
    let queued = pool.chunksize(1).map_async(square, 0..1000).unwrap();
    let pids = [announcements.next_pid(), announcements.next_pid()];
    pool.terminate();
    for result in &running {
        assert_eq!(result.get_timeout(LIMIT), Err(PoolError::Terminated));
    }
    assert_eq!(queued.get_timeout(LIMIT), Err(PoolError::Terminated));
    for pid in pids {
        assert!(!is_running(pid), "worker {pid} survived terminate");
    }
    assert_eq!(pool.apply(square, 1), Err(PoolError::Terminated));
    pool.terminate(); // idempotent
}

#[test]
fn dropping_a_busy_pool_terminates_it() {
    let mut announcements = Announcements::new();
    let (running, pid) = {
        let pool = Pool::new(2).unwrap();
        let running = pool
            .apply_async(announce_and_block, announcements.path())
            .unwrap();
        (running, announcements.next_pid())
    };
    assert_eq!(running.get_timeout(LIMIT), Err(PoolError::Terminated));
    assert!(!is_running(pid));
}

#[test]
fn dropping_an_idle_pool_without_join_leaves_no_worker() {
    let pids = {
        let pool = Pool::new(2).unwrap();
        pool.chunksize(1)
            .map(|_: u8| std::process::id(), 0..10)
            .unwrap()
    };
    for pid in pids {
        assert!(!is_running(pid));
    }
}

#[test]
fn close_and_join_let_submitted_tasks_finish() {
    let pool = Pool::new(2).unwrap();
    assert_eq!(pool.join(), Err(PoolError::StillOpen));
    let results = pool.chunksize(1).map_async(uneven_square, 0..200).unwrap();
    let pids: Vec<u32> = pool
        .chunksize(1)
        .map(|_: u8| std::process::id(), 0..4)
        .unwrap();
    pool.close();
    assert_eq!(pool.apply(square, 1), Err(PoolError::Closed));
    pool.join_timeout(LIMIT).unwrap();
    assert_eq!(results.successful(), Some(true), "join waited for the map");
    assert_eq!(results.get().unwrap().len(), 200);
    for pid in pids {
        assert!(!is_running(pid), "join waits for the workers to exit");
    }
    pool.join().unwrap(); // a second join has nothing to wait for
}

#[test]
fn max_tasks_per_child_replaces_workers() {
    let pool = Pool::builder()
        .processes(2)
        .max_tasks_per_child(3)
        .build()
        .unwrap();
    let pids = pool
        .chunksize(1)
        .map_async(|_: u32| std::process::id(), 0..30)
        .unwrap();
    let pids = pids.get_timeout(LIMIT).unwrap();
    let distinct: BTreeSet<_> = pids.iter().copied().collect();
    for pid in &distinct {
        let tasks = pids.iter().filter(|p| *p == pid).count();
        assert!(tasks <= 3, "worker {pid} ran {tasks} tasks");
    }
    assert!(
        distinct.len() >= 10,
        "only {} workers for 30 tasks",
        distinct.len()
    );
}

static SEED: AtomicU64 = AtomicU64::new(0);

#[test]
fn the_initializer_runs_in_every_worker_before_tasks() {
    let pool = Pool::builder()
        .processes(2)
        .max_tasks_per_child(2)
        .initializer(|seed: u64| SEED.store(seed, Ordering::SeqCst), 42)
        .build()
        .unwrap();
    // With replacements, so new workers run it too.
    let seeds = pool
        .chunksize(1)
        .map_async(|_: u8| SEED.load(Ordering::SeqCst), 0..10)
        .unwrap();
    assert_eq!(seeds.get_timeout(LIMIT).unwrap(), vec![42; 10]);
}

static OUTBOX: std::sync::OnceLock<Queue<u32>> = std::sync::OnceLock::new();

#[test]
fn initializer_arguments_may_carry_queues_as_in_python() {
    // Python: Pool(initializer=init, initargs=(queue,)), the way to share a queue with
    // pool workers; tasks then use the worker's global.
    let queue: Queue<u32> = Queue::unbounded().unwrap();
    let pool = Pool::builder()
        .processes(2)
        .initializer(|queue: Queue<u32>| OUTBOX.set(queue).is_ok(), queue.clone())
        .build()
        .unwrap();
    let send = |x: u32| OUTBOX.get().expect("initialized").put(x * 10).is_ok();
    let sent = pool
        .chunksize(1)
        .map_async(send, 0..10)
        .unwrap()
        .get_timeout(LIMIT)
        .unwrap();
    assert!(sent.iter().all(|ok| *ok));
    let mut received: Vec<u32> = (0..10).map(|_| queue.get_timeout(LIMIT).unwrap()).collect();
    received.sort_unstable();
    assert_eq!(received, (0..10).map(|x| x * 10).collect::<Vec<_>>());
}

#[test]
fn handles_as_task_arguments_are_refused_with_a_typed_error() {
    // Task arguments are plain data (as in Python, where a Queue cannot be a task
    // argument); handles go through the initializer.
    let pool = Pool::new(1).unwrap();
    let queue: Queue<u32> = Queue::unbounded().unwrap();
    // Refused in the parent, before the handle's descriptor is taken: nothing leaks.
    match pool.apply(|q: Queue<u32>| q.len(), queue) {
        Err(PoolError::EncodeArguments(message)) => {
            assert!(message.contains("handle"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(pool.apply(square, 4), Ok(16), "the pool is unaffected");
}

#[test]
fn pools_and_results_can_be_shared_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Pool>();
    assert_send_sync::<AsyncResult<Vec<String>>>();
    let pool = Pool::new(2).unwrap();
    let sums: Vec<u64> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let pool = &pool;
                scope.spawn(move || {
                    let values = pool.map_async(square, t * 100..(t + 1) * 100).unwrap();
                    values.get_timeout(LIMIT).unwrap().iter().sum::<u64>()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (t, sum) in sums.iter().enumerate() {
        let t = t as u64;
        assert_eq!(*sum, (t * 100..(t + 1) * 100).map(square).sum::<u64>());
    }
}

#[test]
fn a_failing_initializer_is_reported_and_not_retried() {
    let pool = Pool::builder()
        .processes(2)
        .name_prefix("InitFails")
        .initializer(
            |name: String| -> () { panic!("no configuration for {name}") },
            "db".into(),
        )
        .build()
        .unwrap();
    let first = pool.map_async(square, 0..10).unwrap().get_timeout(LIMIT);
    match first {
        Err(PoolError::InitializerFailed { message, .. }) => {
            assert!(message.contains("no configuration for db"), "{message}");
            assert!(
                message.contains("tests/pool.rs"),
                "the location is reported: {message}"
            );
        }
        other => panic!("expected the initializer's failure, got {other:?}"),
    }
    // Broken for good: refused at once; no worker is restarted, so the pool winds down.
    assert!(matches!(
        pool.apply(square, 1),
        Err(PoolError::InitializerFailed { .. })
    ));
    pool.close();
    pool.join_timeout(LIMIT).unwrap();
    let left = mp_core::active_children();
    assert!(
        !left.iter().any(|c| c.name.starts_with("InitFails-")),
        "{left:?}"
    );
}

#[test]
fn workers_are_named_with_the_prefix() {
    let pool = Pool::builder()
        .processes(2)
        .name_prefix("Cruncher")
        .build()
        .unwrap();
    let pids = pool
        .chunksize(1)
        .map(|_: u8| std::process::id(), 0..4)
        .unwrap();
    let children = mp_core::active_children();
    for pid in pids {
        let child = children
            .iter()
            .find(|c| c.pid == pid)
            .expect("a child of ours");
        assert!(child.name.starts_with("Cruncher-"), "name {}", child.name);
        assert!(child.daemon, "pool workers are daemons");
    }
}

#[test]
fn every_start_method_works() {
    for method in StartMethod::ALL {
        let pool = Pool::builder()
            .processes(2)
            .start_method(method)
            .build()
            .unwrap();
        let results = pool.map_async(square, 0..50).unwrap().get_timeout(LIMIT);
        assert_eq!(
            results.unwrap(),
            (0..50).map(square).collect::<Vec<_>>(),
            "{method}"
        );
        pool.close();
        pool.join_timeout(LIMIT).unwrap();
    }
}

#[test]
fn invalid_options_are_refused() {
    assert_eq!(Pool::new(0).unwrap_err(), PoolError::NoProcesses);
    let zero_tasks = Pool::builder().processes(1).max_tasks_per_child(0).build();
    assert_eq!(zero_tasks.unwrap_err(), PoolError::InvalidMaxTasks);
    let default = Pool::builder().build().unwrap();
    assert_eq!(default.processes(), mp_core::cpu_count());
}

// ---- Issue 11: every result on time, none lost, no hang from user code ----

/// Runs many tiny tasks so that the pool measures chunks as cheap and batches several on
/// each worker: the situation in which results used to wait behind a slow chunk.
fn warm_up(pool: &Pool) {
    let squares = pool.chunksize(1).map_async(square, 0..3_000u64).unwrap();
    assert_eq!(squares.get_timeout(LIMIT).unwrap().len(), 3_000);
}

/// `None`: returns at once; `Some(path)`: announces itself there, then runs "forever".
fn quick_or_blocking(path: Option<String>) -> u32 {
    match path {
        None => std::process::id(),
        Some(path) => announce_and_block(path),
    }
}

#[test]
fn a_quick_result_is_delivered_while_a_slow_task_follows_on_the_same_worker() {
    let mut announcements = Announcements::new();
    let pool = Pool::new(1).unwrap();
    warm_up(&pool);
    // One worker: both chunks go to it in one batch, the quick one first.
    let mut results = pool.imap(quick_or_blocking, [None, Some(announcements.path())]);
    let started = Instant::now();
    let quick = results.next_timeout(LIMIT);
    let waited = started.elapsed();
    let pid = announcements.next_pid();
    assert!(matches!(quick, Some(Ok(p)) if p == pid), "got {quick:?}");
    // Issue 11 asks for 50 ms; the bound here only has to tell "delivered when it ended"
    // from "held until the slow task ends" (60 s) on a loaded 2-CPU machine.
    assert!(
        waited < Duration::from_secs(5),
        "the quick result took {waited:?}"
    );
    assert_eq!(
        results.next_timeout(Duration::from_millis(50)),
        Some(Err(PoolError::Timeout)),
        "the slow task is still running"
    );
}

#[test]
fn callbacks_see_a_quick_result_while_a_slow_task_runs_on_the_same_worker() {
    // `wait(FIRST_COMPLETED)` built on callbacks: the quick task's callback must fire.
    let mut announcements = Announcements::new();
    let pool = Pool::new(1).unwrap();
    warm_up(&pool);
    let (sender, receiver) = mpsc::channel();
    let quick = pool
        .apply_async(quick_or_blocking, None)
        .unwrap()
        .callback(move |pid| {
            let _ = sender.send(*pid);
        });
    let slow = pool
        .apply_async(quick_or_blocking, Some(announcements.path()))
        .unwrap();
    let pid = receiver
        .recv_timeout(LIMIT)
        .expect("the quick callback ran");
    assert_eq!(announcements.next_pid(), pid);
    assert_eq!(quick.get_timeout(LIMIT), Ok(pid));
    assert!(!slow.ready());
}

#[test]
fn an_idle_worker_takes_the_chunks_queued_behind_a_slow_one() {
    let mut announcements = Announcements::new();
    let pool = Pool::new(2).unwrap();
    warm_up(&pool);
    // Fair shares put the slow chunk and some quick ones on one worker, the rest on the
    // other; once the other is idle it must take the quick ones still queued.
    let mut inputs = vec![Some(announcements.path())];
    inputs.extend(std::iter::repeat_n(None, 7));
    let mut results = pool.imap_unordered(quick_or_blocking, inputs);
    let mut pids = BTreeSet::new();
    for _ in 0..7 {
        match results.next_timeout(LIMIT) {
            Some(Ok(pid)) => pids.insert(pid),
            other => panic!("a quick task waited behind the slow one: {other:?}"),
        };
    }
    let slow_pid = announcements.next_pid();
    assert_eq!(
        results.next_timeout(Duration::from_millis(50)),
        Some(Err(PoolError::Timeout)),
        "only the slow task is left"
    );
    assert!(
        pids.iter().any(|p| *p != slow_pid),
        "quick tasks ran on the idle worker"
    );
}

#[test]
fn a_dying_worker_fails_only_its_running_task_and_delivers_what_it_finished() {
    let mut announcements = Announcements::new();
    let pool = Pool::new(1).unwrap();
    warm_up(&pool);
    // Three chunks in one batch: a finished one, the one running when the worker dies, and
    // one that never started.
    let mut results = pool.imap(quick_or_blocking, [None, Some(announcements.path()), None]);
    let finished = results.next_timeout(LIMIT);
    let pid = announcements.next_pid();
    kill(pid, Signal::KILL);
    assert_eq!(finished, Some(Ok(pid)), "finished before the death");
    match results.next_timeout(LIMIT) {
        Some(Err(PoolError::WorkerDied { pid: dead, status })) => {
            assert_eq!(dead, pid);
            assert_eq!(status, ExitStatus::Signal(9));
        }
        other => panic!("expected WorkerDied, got {other:?}"),
    }
    match results.next_timeout(LIMIT) {
        Some(Ok(replacement)) => assert_ne!(replacement, pid, "ran on the replacement"),
        other => panic!("the chunk that never started must run elsewhere: {other:?}"),
    }
    assert!(results.next().is_none());
}

/// An input that panics at item `at`.
fn failing_input(at: u64) -> impl Iterator<Item = u64> {
    (0..10).inspect(move |&i| assert!(i != at, "input broke at {i}"))
}

#[test]
fn imap_yields_what_it_read_before_the_input_failed() {
    let pool = Pool::new(2).unwrap();
    // Python: imap(f, gen) yields f(0), f(1), f(2), then raises.
    let results: Vec<_> = pool.imap(square, failing_input(3)).collect();
    assert_eq!(results[..3], [Ok(0), Ok(1), Ok(4)]);
    match &results[3..] {
        [Err(PoolError::InputPanicked(message))] => assert!(message.contains("input broke at 3")),
        other => panic!("expected the input's failure last, got {other:?}"),
    }
    // With chunks of 2, the chunk being read ([2, 3]) fails as a whole, as in Python.
    let results: Vec<_> = pool.chunksize(2).imap(square, failing_input(3)).collect();
    assert_eq!(results[..2], [Ok(0), Ok(1)]);
    assert!(
        matches!(results[2..], [Err(PoolError::InputPanicked(_))]),
        "{results:?}"
    );
    // Unordered: the same values, in any order, then the failure.
    let mut results: Vec<_> = pool.imap_unordered(square, failing_input(3)).collect();
    assert!(matches!(
        results.pop(),
        Some(Err(PoolError::InputPanicked(_)))
    ));
    results.sort_by_key(|r| *r.as_ref().unwrap());
    assert_eq!(results, [Ok(0), Ok(1), Ok(4)]);
    // The pool is unaffected.
    assert_eq!(pool.apply(square, 12), Ok(144));
}

#[test]
fn imap_reports_its_exact_length_when_the_input_knows_it() {
    let pool = Pool::new(2).unwrap();
    let mut results = pool.chunksize(3).imap(square, 0..100u64);
    assert_eq!(results.size_hint(), (100, Some(100)));
    for left in (0..100).rev() {
        assert!(results.next().unwrap().is_ok());
        assert_eq!(results.size_hint(), (left, Some(left)));
    }
    assert!(results.next().is_none());
    let endless = pool.imap(square, 0..);
    assert_eq!(endless.size_hint(), (usize::MAX, None));
}

#[test]
fn close_and_join_right_after_build_still_run_every_initializer() {
    let queue: Queue<u32> = Queue::unbounded().unwrap();
    let pool = Pool::builder()
        .processes(2)
        .initializer(
            |queue: Queue<u32>| queue.put(std::process::id()).unwrap(),
            queue.clone(),
        )
        .build()
        .unwrap();
    pool.close();
    pool.join_timeout(LIMIT).unwrap();
    let first = queue.get_timeout(LIMIT).expect("the first initializer ran");
    let second = queue
        .get_timeout(LIMIT)
        .expect("the second initializer ran");
    assert_ne!(first, second);
}

#[test]
fn wait_ready_reports_workers_up_or_why_not() {
    let pool = Pool::new(2).unwrap();
    pool.wait_ready(LIMIT).unwrap();
    assert_eq!(pool.worker_pids().len(), 2);
    for pid in pool.worker_pids() {
        assert!(is_running(pid));
    }

    let broken = Pool::builder()
        .processes(2)
        .initializer(|_: ()| -> () { panic!("no database") }, ())
        .build()
        .unwrap();
    match broken.wait_ready(LIMIT) {
        Err(PoolError::InitializerFailed { message, .. }) => {
            assert!(message.contains("no database"), "{message}")
        }
        other => panic!("expected InitializerFailed, got {other:?}"),
    }
}

#[test]
fn the_first_workers_start_together_and_are_exactly_the_pools_size() {
    // The supervisor starts them on parallel threads: each still gets its own process.
    let pool = Pool::new(6).unwrap();
    pool.wait_ready(LIMIT).unwrap();
    let pids: BTreeSet<u32> = pool.worker_pids().into_iter().collect();
    assert_eq!(pids.len(), 6, "{pids:?}");
    assert!(pids.iter().all(|&pid| is_running(pid)));
    let ran: BTreeSet<u32> = pool
        .chunksize(1)
        .map(|_: u32| std::process::id(), 0..60)
        .unwrap()
        .into_iter()
        .collect();
    assert!(ran.is_subset(&pids), "{ran:?} ran outside {pids:?}");
    pool.close();
    pool.join_timeout(LIMIT).unwrap();
}

static LAST_WORKER: std::sync::OnceLock<(Queue<u32>, Queue<u32>)> = std::sync::OnceLock::new();

/// Initializer: records its pid, and any earlier worker still alive (an overlap).
fn record_overlap((pids, overlaps): (Queue<u32>, Queue<u32>)) {
    while let Ok(earlier) = pids.try_get() {
        if is_running(earlier) {
            overlaps.put(earlier).unwrap();
        }
    }
    pids.put(std::process::id()).unwrap();
    let _ = LAST_WORKER.set((pids, overlaps));
}

#[test]
fn a_retiring_worker_is_replaced_only_after_it_exits() {
    let (pids, overlaps) = (Queue::unbounded().unwrap(), Queue::unbounded().unwrap());
    let pool = Pool::builder()
        .processes(1)
        .max_tasks_per_child(1)
        .initializer(record_overlap, (pids.clone(), overlaps.clone()))
        .build()
        .unwrap();
    // Tasks long enough that a replacement started early would overlap its predecessor.
    let slow_pid = |_: u32| {
        std::thread::sleep(Duration::from_millis(20));
        std::process::id()
    };
    let ran_on = pool
        .chunksize(1)
        .map_async(slow_pid, 0..8)
        .unwrap()
        .get_timeout(LIMIT)
        .unwrap();
    assert_eq!(
        ran_on.iter().collect::<BTreeSet<_>>().len(),
        8,
        "one worker per task"
    );
    pool.close();
    pool.join_timeout(LIMIT).unwrap();
    assert_eq!(
        overlaps.try_get().ok(),
        None,
        "a worker started while another ran"
    );
}

/// A type whose decoding panics (a user's buggy `Deserialize`).
#[derive(Debug, serde::Serialize)]
struct PanicsWhenDecoded(u32);

impl<'de> serde::Deserialize<'de> for PanicsWhenDecoded {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        panic!("my decoder is buggy")
    }
}

/// A type that cannot be encoded.
#[derive(Debug, serde::Deserialize)]
struct Unencodable(u32);

impl serde::Serialize for Unencodable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("no way to encode this"))
    }
}

/// A type that decodes only from values below 10.
#[derive(Debug, serde::Serialize)]
struct Small(u32);

impl<'de> serde::Deserialize<'de> for Small {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let value = <u32 as serde::Deserialize>::deserialize(d)?;
        if value < 10 {
            Ok(Small(value))
        } else {
            // postcard drops the custom message; the note keeps it (see mp-core).
            let message = format!("{value} is not small");
            mp_core::note_decode_failure(&message);
            Err(serde::de::Error::custom(message))
        }
    }
}

#[test]
fn a_panicking_result_decoder_fails_its_task_only() {
    let pool = Pool::new(1).unwrap();
    let result = pool.apply_async(PanicsWhenDecoded, 7).unwrap();
    match result.get_timeout(LIMIT) {
        Err(PoolError::BadResult { message, .. }) => {
            assert!(message.contains("PanicsWhenDecoded"), "{message}");
            assert!(message.contains("my decoder is buggy"), "{message}");
        }
        other => panic!("expected BadResult, got {other:?}"),
    }
    assert_eq!(pool.apply(square, 5), Ok(25), "the pool goes on");
}

#[test]
fn encode_and_decode_errors_name_the_type() {
    // postcard reports a custom serde error without its text ("Serde Serialization
    // Error"), so the type name is what tells the user which value failed.
    let pool = Pool::new(1).unwrap();
    match pool.apply(|u: Unencodable| u.0, Unencodable(1)) {
        Err(PoolError::EncodeArguments(message)) => {
            assert!(message.contains("Unencodable"), "{message}");
        }
        other => panic!("expected EncodeArguments, got {other:?}"),
    }
    match pool.apply(Unencodable, 1) {
        Err(PoolError::BadResult { message, .. }) => {
            assert!(message.contains("encoding pool::Unencodable"), "{message}");
        }
        other => panic!("expected BadResult from the worker, got {other:?}"),
    }
    match pool.apply(Small, 12) {
        Err(PoolError::BadResult { message, .. }) => {
            assert!(message.contains("decoding pool::Small"), "{message}");
            assert!(message.contains("12 is not small"), "{message}");
        }
        other => panic!("expected BadResult, got {other:?}"),
    }
    match pool.apply(|s: Small| s.0, Small(12)) {
        Err(PoolError::BadArguments { message, .. }) => {
            assert!(message.contains("decoding pool::Small"), "{message}");
            assert!(message.contains("12 is not small"), "{message}");
        }
        other => panic!("expected BadArguments from the worker, got {other:?}"),
    }
    assert_eq!(pool.apply(Small, 3).map(|s| s.0), Ok(3));
}

/// The tests of this binary fork from libtest's threads. SAFETY (of the `allow_fork` below):
/// no test here holds a lock of its own, or of a library, that a forked child then uses; the
/// locks the children touch are mp-core's, which are safe across `fork()`.
#[ctor::ctor(unsafe)]
fn allow_fork_in_these_tests() {
    // SAFETY: see above: nothing a forked child uses is held by another thread of this binary.
    unsafe { mp_core::allow_fork() };
}
