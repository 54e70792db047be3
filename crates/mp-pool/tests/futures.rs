//! The `try_` family, `await` (under tokio and under a minimal executor), `IMap` as a
//! `Stream`, `as_completed` and `wait`, end to end with real workers.
//!
//! Every wait is bounded ([`LIMIT`]); tasks that must be running when the test acts wait at a
//! gate the test opens; nothing synchronises by sleeping.

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use futures_core::Stream;
use mp_pool::{Pool, PoolError, ReturnWhen, TryError, as_completed, wait};
use parking_lot::Mutex;

mod common;
use common::*;

fn square(x: u64) -> u64 {
    x * x
}

/// A task error that travels as itself.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum ParseError {
    Empty,
    NotANumber(String),
}

fn parse(s: String) -> Result<u64, ParseError> {
    if s.is_empty() {
        return Err(ParseError::Empty);
    }
    s.parse().map_err(|_| ParseError::NotANumber(s))
}

#[test]
fn try_apply_returns_the_value_or_the_task_s_own_error() {
    let pool = Pool::new(1).unwrap();
    assert_eq!(pool.try_apply(parse, "42".into()), Ok(42));
    assert_eq!(
        pool.try_apply(parse, "x".into()),
        Err(TryError::Task(ParseError::NotANumber("x".into())))
    );
    // A failure of the pool stays a pool error.
    let panicked = pool.try_apply(|_: u8| -> Result<u8, ParseError> { panic!("boom") }, 1);
    assert!(matches!(
        panicked,
        Err(TryError::Pool(PoolError::Panicked { .. }))
    ));
    let seen = Arc::new(Mutex::new(None));
    let sink = seen.clone();
    let failed = pool
        .try_apply_async(parse, String::new())
        .unwrap()
        .callback(|_| panic!("success callback on an Err"))
        .error_callback(move |error| *sink.lock() = Some(error.clone()));
    assert_eq!(failed.get(), Err(TryError::Task(ParseError::Empty)));
    assert_eq!(*seen.lock(), Some(TryError::Task(ParseError::Empty)));
    assert_eq!(failed.successful(), Some(false));
}

#[test]
fn try_map_collects_the_values_or_fails_fast_with_the_first_err() {
    let pool = Pool::new(2).unwrap();
    let numbers: Vec<String> = (0..50).map(|x: u64| x.to_string()).collect();
    assert_eq!(
        pool.try_map(parse, numbers.clone()),
        Ok((0..50).collect::<Vec<u64>>())
    );
    let mut with_a_bad_one = numbers;
    with_a_bad_one[37] = "thirty-seven".into();
    assert_eq!(
        pool.chunksize(5).try_map(parse, with_a_bad_one),
        Err(TryError::Task(ParseError::NotANumber(
            "thirty-seven".into()
        )))
    );
    let async_map = pool.try_map_async(parse, ["1".to_string(), "2".into()]);
    assert_eq!(async_map.unwrap().get_timeout(LIMIT), Ok(vec![1, 2]));
    assert_eq!(pool.apply(square, 3), Ok(9), "the pool goes on");
}

#[test]
fn try_imap_yields_values_and_the_task_s_errors_and_goes_on() {
    let pool = Pool::new(2).unwrap();
    let inputs = ["1".to_string(), "x".into(), String::new(), "4".into()];
    let results: Vec<_> = pool.chunksize(1).try_imap(parse, inputs.clone()).collect();
    assert_eq!(
        results,
        [
            Ok(1),
            Err(TryError::Task(ParseError::NotANumber("x".into()))),
            Err(TryError::Task(ParseError::Empty)),
            Ok(4),
        ]
    );
    let mut unordered: Vec<_> = pool
        .try_imap_unordered(parse, inputs)
        .filter_map(Result::ok)
        .collect();
    unordered.sort_unstable();
    assert_eq!(unordered, [1, 4]);
    let mut stream = pool.try_imap(parse, ["7".to_string()]);
    assert_eq!(block_on(next(&mut stream)), Some(Ok(7)));
    assert_eq!(block_on(next(&mut stream)), None);
}

/// A minimal executor: polls on this thread, parks until woken, at most `LIMIT`.
fn block_on<F: Future>(future: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut context = Context::from_waker(&waker);
    let mut future = pin!(future);
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
            return output;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the future was never woken");
        std::thread::park_timeout(left);
    }
}

/// The next item of a stream (what `StreamExt::next` does).
async fn next<S: Stream + Unpin>(stream: &mut S) -> Option<S::Item> {
    std::future::poll_fn(|cx| Pin::new(&mut *stream).poll_next(cx)).await
}

#[test]
fn an_async_result_is_awaited_under_a_minimal_executor_woken_by_the_pool() {
    let pool = Pool::new(1).unwrap();
    let mut announcements = Announcements::new();
    let gate = Gate::new();
    let held = pool
        .apply_async(announce_and_wait, (announcements.path(), gate.path()))
        .unwrap();
    // Held at its gate until the future has been polled (and found pending) at least once.
    std::thread::scope(|scope| {
        scope.spawn(|| {
            announcements.next_pid();
            gate.open();
        });
        let pid = block_on(held.into_future());
        assert!(pid.is_ok(), "{pid:?}");
    });
    assert_eq!(
        block_on(pool.apply_async(square, 5).unwrap().into_future()),
        Ok(25)
    );
    let failed = pool
        .apply_async(|_: u8| -> u8 { panic!("async boom") }, 0)
        .unwrap();
    assert!(matches!(
        block_on(failed.into_future()),
        Err(PoolError::Panicked { .. })
    ));
    let typed = pool.try_apply_async(parse, "x".into()).unwrap();
    assert_eq!(
        block_on(typed.into_future()),
        Err(TryError::Task(ParseError::NotANumber("x".into())))
    );
}

#[test]
fn results_and_imap_streams_are_awaited_under_tokio() {
    let pool = Pool::new(2).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        let bounded = |future| tokio::time::timeout(LIMIT, future);
        let value = bounded(pool.apply_async(square, 12).unwrap().into_future()).await;
        assert_eq!(value.expect("woken in time"), Ok(144));
        // Several at once, awaited in reverse order.
        let results: Vec<_> = (0..10u64)
            .map(|x| pool.apply_async(square, x).unwrap())
            .collect();
        for (x, result) in results.into_iter().enumerate().rev() {
            assert_eq!(result.await, Ok((x * x) as u64));
        }
        let mut stream = pool.chunksize(3).imap(square, 0..20u64);
        let mut values = Vec::new();
        while let Some(item) = tokio::time::timeout(LIMIT, next(&mut stream))
            .await
            .expect("woken in time")
        {
            values.push(item.unwrap());
        }
        assert_eq!(values, (0..20u64).map(square).collect::<Vec<_>>());
        let mut unordered = pool.imap_unordered(square, 0..20u64);
        let mut seen = Vec::new();
        while let Some(item) = next(&mut unordered).await {
            seen.push(item.unwrap());
        }
        seen.sort_unstable();
        assert_eq!(seen, values);
    });
}

#[test]
fn a_stream_yields_a_quick_result_while_a_slow_one_is_held() {
    let pool = Pool::new(2).unwrap();
    let mut announcements = Announcements::new();
    let gate = Gate::new();
    let items = [
        (Some(announcements.path()), gate.path()),
        (None, gate.path()),
    ];
    let mut stream = pool.imap_unordered(
        |(announce_to, gate): (Option<String>, String)| match announce_to {
            Some(path) => announce_and_wait((path, gate)),
            None => 0,
        },
        items,
    );
    // The quick one arrives while the slow one is held at its gate.
    assert_eq!(block_on(next(&mut stream)), Some(Ok(0)));
    let pid = announcements.next_pid();
    gate.open();
    assert_eq!(block_on(next(&mut stream)), Some(Ok(pid)));
    assert_eq!(block_on(next(&mut stream)), None);
}

#[test]
fn as_completed_yields_results_in_completion_order() {
    let pool = Pool::new(2).unwrap();
    let mut announcements = Announcements::new();
    let gate = Gate::new();
    let slow = pool
        .apply_async(announce_and_wait, (announcements.path(), gate.path()))
        .unwrap();
    let pid = announcements.next_pid();
    let quick = pool.apply_async(|x: u32| x, 7).unwrap();
    let mut completed = as_completed([slow, quick]);
    assert_eq!(completed.size_hint(), (2, Some(2)));
    let first = completed.next().expect("one completes");
    assert_eq!(first.get(), Ok(7), "the quick one first");
    assert!(matches!(
        completed.next_timeout(Duration::from_millis(20)),
        Some(Err(PoolError::Timeout))
    ));
    gate.open();
    let second = completed.next().expect("the other completes");
    assert_eq!(second.get(), Ok(pid));
    assert!(completed.next().is_none());
}

#[test]
fn wait_returns_on_the_first_completion_the_first_failure_or_all() {
    let pool = Pool::new(2).unwrap();
    let mut announcements = Announcements::new();
    let gate = Gate::new();
    let results = [
        pool.apply_async(announce_and_wait, (announcements.path(), gate.path()))
            .unwrap(),
        pool.apply_async(|x: u32| x, 1).unwrap(),
    ];
    announcements.next_pid();
    let first = wait(&results, ReturnWhen::FirstCompleted, Some(LIMIT));
    assert_eq!((first.done, first.not_done), (vec![1], vec![0]));
    let timed_out = wait(
        &results,
        ReturnWhen::AllCompleted,
        Some(Duration::from_millis(20)),
    );
    assert_eq!(timed_out.not_done, vec![0], "the held task is not done");
    gate.open();
    let all = wait(&results, ReturnWhen::AllCompleted, Some(LIMIT));
    assert_eq!(all.done.len(), 2);
    assert!(all.not_done.is_empty());

    // FirstError: returns at the failure, not waiting for the held task.
    let gate = Gate::new();
    let results = [
        pool.apply_async(announce_and_wait, (announcements.path(), gate.path()))
            .unwrap(),
        pool.apply_async(|x: u32| x, 1).unwrap(),
        pool.apply_async(|_: u32| -> u32 { panic!("failing") }, 2)
            .unwrap(),
    ];
    announcements.next_pid();
    let failed = wait(&results, ReturnWhen::FirstError, Some(LIMIT));
    assert!(failed.done.contains(&2), "{failed:?}");
    assert_eq!(failed.not_done, vec![0]);
    gate.open();
    assert!(results[0].get_timeout(LIMIT).is_ok());
}

/// The tests of this binary fork from libtest's threads. SAFETY (of the `allow_fork` below):
/// no test here holds a lock that a forked child then uses; the locks the children touch are
/// mp-core's, which are safe across `fork()`.
#[ctor::ctor(unsafe)]
fn allow_fork_in_these_tests() {
    // SAFETY: see above.
    unsafe { mp_core::allow_fork() };
}
