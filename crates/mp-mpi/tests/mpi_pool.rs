//! The MPI pool's tests: a program for `mpirun -n 2..4` (MPI can start once per process, so,
//! as rsmpi does, the checks run in sequence in one program on every rank; rank 0 drives).
//!
//! `mpirun -n 3 target/debug/deps/mpi_pool-HASH [close|terminate]`: the argument chooses how
//! the pool ends (default `close`). Run alone (`cargo test`), it checks the singleton
//! behaviour only. A failed check panics on rank 0, which makes `mpirun` end the whole job
//! with a non-zero status; `.ci/mpi` also bounds the run with `timeout`.

use std::future::IntoFuture;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use mp_mpi::{Executor, MpiPool, MpiPoolError, Pending, current_rank};

const LONG: Duration = Duration::from_secs(30);

#[path = "common/same_api.rs"]
mod same_api;
use same_api::{same_api, square};

/// Returns the rank that ran it, after `ms` milliseconds.
fn rank_after(ms: u64) -> i32 {
    std::thread::sleep(Duration::from_millis(ms));
    current_rank().expect("tasks run on worker ranks")
}

/// CPU time (user + system) of the whole process so far, from getrusage.
fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a `rusage` into the pointer, which points to one.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage failed");
    // SAFETY: zero-initialised and filled by a successful getrusage.
    let usage = unsafe { usage.assume_init() };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

/// A worker's rank and its process's CPU time.
fn worker_cpu(ms: u64) -> (i32, Duration) {
    (rank_after(ms), cpu_time())
}

fn every_rank_works_and_results_come_as_tasks_end(pool: &MpiPool) {
    let workers = pool.processes();
    let mut seen: Vec<i32> = pool
        .chunksize(1)
        .map(rank_after, vec![30; 4 * workers])
        .unwrap();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(
        seen,
        (1..=workers as i32).collect::<Vec<_>>(),
        "every worker rank ran tasks"
    );
    if workers >= 2 {
        // A slow task beside fast ones: the fast ones' results come first.
        let mut results =
            pool.imap_unordered(|ms: u64| (ms, rank_after(ms)), [1500, 1, 1, 1, 1, 1]);
        let first = results.next_timeout(LONG).unwrap().unwrap();
        assert_eq!(
            first.0, 1,
            "a fast task's result comes before the slow one's"
        );
        let rest: Vec<_> = results.collect::<Result<_, _>>().unwrap();
        assert_eq!(rest.len(), 5);
    }
}

fn a_panic_fails_only_its_task(pool: &MpiPool) {
    let picky = |x: u32| -> u32 {
        assert!(x != 3, "three is not allowed");
        x
    };
    match pool.apply(picky, 3) {
        Err(MpiPoolError::Panicked { rank, report }) => {
            assert!(
                rank >= 1 && rank as usize <= pool.processes(),
                "rank {rank}"
            );
            assert!(report.message.contains("three is not allowed"));
            assert!(report.location.unwrap().contains("mpi_pool.rs"));
        }
        other => panic!("expected a panic report, got {other:?}"),
    }
    // In a stream, the failed item is one error among the results; the ranks live on.
    let results: Vec<_> = pool.imap(picky, [1, 2, 3, 4]).collect();
    assert!(results[2].is_err());
    assert_eq!(results[3], Ok(4));
    let ranks = pool
        .chunksize(1)
        .map(rank_after, vec![20; 4 * pool.processes()])
        .unwrap();
    assert!(ranks.iter().all(|&r| r >= 1));
}

fn callbacks_timeouts_and_errors(pool: &MpiPool) {
    let (tx, rx) = mpsc::channel();
    let ok = tx.clone();
    let value = pool
        .apply_async(square, 12)
        .unwrap()
        .callback(move |v| ok.send(Ok(*v)).unwrap());
    assert_eq!(rx.recv_timeout(LONG).unwrap(), Ok(144));
    assert_eq!(value.get().unwrap(), 144);
    let failed = pool
        .apply_async(|_: ()| -> u8 { panic!("for the error callback") }, ())
        .unwrap()
        .error_callback(move |e| tx.send(Err(e.to_string())).unwrap());
    let message = rx.recv_timeout(LONG).unwrap().unwrap_err();
    assert!(message.contains("for the error callback"), "{message}");
    assert_eq!(failed.successful(), Some(false));

    let slow = pool.apply_async(rank_after, 500).unwrap();
    assert_eq!(
        slow.get_timeout(Duration::from_millis(10)),
        Err(MpiPoolError::Timeout)
    );
    assert!(
        slow.get_timeout(LONG).unwrap() >= 1,
        "the timed-out result is still delivered"
    );

    assert_eq!(
        pool.chunksize(0).map(square, 0..3).unwrap_err(),
        MpiPoolError::InvalidChunksize
    );
    assert_eq!(pool.join_timeout(LONG), Err(MpiPoolError::StillOpen));
}

/// Drives `future` on this thread, parked until its waker is called (bounded by `LONG`).
fn block_on<F: std::future::Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut context = std::task::Context::from_waker(&waker);
    let mut future = std::pin::pin!(future);
    let deadline = Instant::now() + LONG;
    loop {
        if let std::task::Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the future was never woken");
        std::thread::park_timeout(left);
    }
}

/// mp-pool's result type brings `.await`, `as_completed` and `wait` to the MPI pool.
fn await_as_completed_and_wait(pool: &MpiPool) {
    assert_eq!(
        block_on(pool.apply_async(square, 9).unwrap().into_future()),
        Ok(81)
    );
    let slow = pool.apply_async(rank_after, 400).unwrap();
    let failed = pool
        .apply_async(|_: ()| -> i32 { panic!("first error") }, ())
        .unwrap();
    let results = [slow, failed];
    let waited = mp_pool::wait(&results, mp_pool::ReturnWhen::FirstError, Some(LONG));
    // The failure ends the wait (it may queue behind the slow task on one rank: then both).
    assert!(waited.done.contains(&1), "{waited:?}");
    assert_eq!(waited.done.len() + waited.not_done.len(), 2, "{waited:?}");
    assert!(results[1].ready());
    let [slow, failed] = results;
    assert!(matches!(failed.get(), Err(MpiPoolError::Panicked { .. })));
    assert!(!slow.cancel(), "an MPI pool does not withdraw a task");
    let fast = pool.apply_async(rank_after, 0).unwrap();
    let order: Vec<i32> = mp_pool::as_completed([slow, fast])
        .map(|done| done.get().unwrap())
        .collect();
    assert_eq!(order.len(), 2);
    assert!(order.iter().all(|&rank| rank >= 1), "{order:?}");
}

fn large_messages_and_bounded_read_ahead(pool: &MpiPool) {
    // 2 MiB each way (Open MPI's rendezvous protocol), several at once.
    let big = vec![7u8; 2 << 20];
    let echoed = pool
        .map(|bytes: Vec<u8>| bytes, vec![big.clone(); 3])
        .unwrap();
    assert!(echoed.iter().all(|bytes| *bytes == big));
    // An endless input: read only as results are consumed.
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = pulled.clone();
    let input = (0u64..).inspect(move |_| {
        counter.fetch_add(1, Ordering::Relaxed);
    });
    let first: Vec<u64> = pool
        .chunksize(4)
        .imap(square, input)
        .max_in_flight(8)
        .take(100)
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(first, (0..100).map(square).collect::<Vec<_>>());
    let read = pulled.load(Ordering::Relaxed);
    assert!(
        read <= 100 + 8 * 4,
        "read {read} items ahead of 100 consumed"
    );
}

fn idle_ranks_sleep(pool: &MpiPool) {
    let workers = pool.processes();
    // Rank 0 waiting for a long task.
    let (wall, cpu) = (Instant::now(), cpu_time());
    pool.apply(rank_after, 1000).unwrap();
    let share = (cpu_time() - cpu).as_secs_f64() / wall.elapsed().as_secs_f64();
    println!(
        "rank 0 waiting for a result: {:.2} % of a core",
        share * 100.0
    );
    assert!(
        share < 0.05,
        "rank 0 used {:.1} % of a core while waiting",
        share * 100.0
    );

    // Idle worker ranks: their CPU time before and after a second without tasks.
    let sample = || -> Vec<Duration> {
        let mut by_rank = vec![None; workers + 1];
        while by_rank[1..].iter().any(Option::is_none) {
            for (rank, cpu) in pool
                .chunksize(1)
                .map(worker_cpu, vec![20; 2 * workers])
                .unwrap()
            {
                by_rank[rank as usize].get_or_insert(cpu);
            }
        }
        by_rank.into_iter().flatten().collect()
    };
    let before = sample();
    let wall = Instant::now();
    std::thread::sleep(Duration::from_secs(1)); // the idle period being measured
    let after = sample();
    let wall = wall.elapsed().as_secs_f64();
    for (rank, (b, a)) in before.iter().zip(&after).enumerate() {
        let share = (a.saturating_sub(*b)).as_secs_f64() / wall;
        println!(
            "idle worker rank {}: {:.2} % of a core",
            rank + 1,
            share * 100.0
        );
        // The window includes the sampling tasks themselves; still far below a spinning rank.
        assert!(
            share < 0.05,
            "worker rank {} used {:.1} % of a core while idle",
            rank + 1,
            share * 100.0
        );
    }
}

fn end_with_close(pool: &MpiPool) {
    let pending = pool.apply_async(rank_after, 200).unwrap();
    pool.close();
    assert_eq!(pool.apply(square, 1), Err(MpiPoolError::Closed));
    pool.join_timeout(LONG).unwrap();
    assert!(
        pending.get_timeout(Duration::ZERO).unwrap() >= 1,
        "join waited for the task"
    );
}

fn end_with_terminate(pool: &MpiPool) {
    let running: Vec<_> = (0..3 * pool.processes())
        .map(|_| pool.apply_async(rank_after, 2000).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100)); // let the workers start them
    let start = Instant::now();
    pool.terminate();
    for result in &running {
        assert_eq!(result.get_timeout(LONG), Err(MpiPoolError::Terminated));
    }
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "terminate failed the tasks at once"
    );
    assert_eq!(pool.apply(square, 1), Err(MpiPoolError::Terminated));
    pool.join_timeout(LONG).unwrap();
}

/// A named check run on rank 0.
type Check = (&'static str, fn(&MpiPool));

fn main() {
    let ending = std::env::args().nth(1).unwrap_or_else(|| "close".into());
    let pool = match MpiPool::start() {
        Ok(pool) => pool,
        Err(MpiPoolError::NoWorkerRanks) => {
            assert_eq!(
                MpiPool::start().unwrap_err(),
                MpiPoolError::AlreadyInitialized
            );
            println!(
                "singleton run: NoWorkerRanks as documented; run under `mpirun -n 2..4` (.ci/mpi) for the MPI checks"
            );
            return;
        }
        Err(error) => panic!("the MPI pool did not start: {error}"),
    };
    assert_eq!(current_rank(), None, "rank 0 is not a worker");
    let checks: [Check; 7] = [
        ("same_api", |pool| same_api(pool).unwrap()),
        (
            "every_rank_works_and_results_come_as_tasks_end",
            every_rank_works_and_results_come_as_tasks_end,
        ),
        ("a_panic_fails_only_its_task", a_panic_fails_only_its_task),
        (
            "callbacks_timeouts_and_errors",
            callbacks_timeouts_and_errors,
        ),
        ("await_as_completed_and_wait", await_as_completed_and_wait),
        (
            "large_messages_and_bounded_read_ahead",
            large_messages_and_bounded_read_ahead,
        ),
        ("idle_ranks_sleep", idle_ranks_sleep),
    ];
    for (name, check) in checks {
        let start = Instant::now();
        check(&pool);
        println!(
            "ok {name} ({} workers, {:.0?})",
            pool.processes(),
            start.elapsed()
        );
    }
    match ending.as_str() {
        "terminate" => end_with_terminate(&pool),
        _ => end_with_close(&pool),
    }
    println!("ok end_with_{ending}");
}
