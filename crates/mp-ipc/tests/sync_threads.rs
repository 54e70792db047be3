//! Semantics of the synchronisation primitives between threads (the same
//! shared-memory code paths as between processes; see `sync_processes.rs`).
//! Every blocking call is bounded.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use mp_ipc::{
    Barrier, BarrierError, BoundedSemaphore, Condition, Event, Lock, LockError, RLock, Semaphore,
    SemaphoreError, Value, WaitError,
};

/// The longest any wait here may take before the test fails instead of hanging.
const BOUND: Duration = Duration::from_secs(20);
/// The timeout of the timed-wait tests.
const TIMEOUT: Duration = Duration::from_millis(100);
/// How late a timed wait may return on a loaded machine.
const SLACK: Duration = Duration::from_secs(1);

/// Runs `wait`, which must time out, and checks it took about `TIMEOUT`.
fn assert_times_out<E: std::fmt::Debug>(what: &str, wait: impl FnOnce() -> Result<(), E>) {
    let start = Instant::now();
    let result = wait();
    let elapsed = start.elapsed();
    assert!(
        result.is_err(),
        "{what}: expected a timeout, got {result:?}"
    );
    assert!(
        elapsed >= TIMEOUT,
        "{what}: returned early, after {elapsed:?}"
    );
    assert!(
        elapsed < TIMEOUT + SLACK,
        "{what}: returned late, after {elapsed:?}"
    );
}

#[test]
fn timed_waits_return_after_about_their_timeout() {
    let lock = Lock::new().unwrap();
    let rlock = RLock::new().unwrap();
    let value = Value::new(0u8).unwrap();
    let _held = lock.lock().unwrap();
    let _rheld = rlock.lock().unwrap();
    let _vheld = value.lock().unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            assert_times_out("Lock", || {
                lock.lock_timeout(TIMEOUT)
                    .map(drop)
                    .map_err(|e| e.without_guard())
            });
            assert_times_out("RLock", || {
                rlock
                    .lock_timeout(TIMEOUT)
                    .map(drop)
                    .map_err(|e| e.without_guard())
            });
            assert_times_out("Value", || {
                value
                    .lock_timeout(TIMEOUT)
                    .map(drop)
                    .map_err(|e| e.without_guard())
            });
        });
    });
    let semaphore = Semaphore::new(0).unwrap();
    assert_times_out("Semaphore", || semaphore.acquire_timeout(TIMEOUT).map(drop));
    let bounded = BoundedSemaphore::new(0).unwrap();
    assert_times_out("BoundedSemaphore", || {
        bounded.acquire_timeout(TIMEOUT).map(drop)
    });
    let event = Event::new().unwrap();
    assert_times_out("Event", || event.wait_timeout(TIMEOUT));
    let condition = Condition::new().unwrap();
    assert_times_out("Condition", || {
        let guard = condition.lock().unwrap();
        condition
            .wait_timeout(guard, TIMEOUT)
            .map(drop)
            .map_err(|e| format!("{e}"))
    });
    let barrier = Barrier::new(2).unwrap();
    assert_times_out("Barrier", || barrier.wait_timeout(TIMEOUT).map(drop));
    assert!(barrier.broken(), "a timeout breaks the barrier");
}

#[test]
fn lock_protects_a_counter_across_threads() {
    let counter = Value::new(0u64).unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            let counter = counter.clone();
            s.spawn(move || {
                for _ in 0..10_000 {
                    *counter.lock().unwrap() += 1;
                }
            });
        }
    });
    assert_eq!(counter.get().unwrap(), 40_000);
}

#[test]
fn notify_n_wakes_exactly_n() {
    const WAITERS: u32 = 5;
    // Both conditions share the Value's lock, which protects the counters
    // [arrived, woken].
    let counters = Value::new([0u32; 2]).unwrap();
    let wake = Condition::with_lock(counters.get_lock()).unwrap();
    let progress = Condition::with_lock(counters.get_lock()).unwrap();
    std::thread::scope(|s| {
        let waiters: Vec<_> = (0..WAITERS)
            .map(|_| {
                s.spawn(|| {
                    let mut guard = counters.lock().unwrap();
                    guard[0] += 1;
                    progress.notify_all();
                    // Enqueued before the lock is released: once the main
                    // thread sees arrived == WAITERS under the lock, all wait.
                    let mut guard = wake.wait_timeout(guard, BOUND).expect("notified in time");
                    guard[1] += 1;
                    progress.notify_all();
                })
            })
            .collect();
        let guard = counters.lock().unwrap();
        let guard = progress
            .wait_for_timeout(guard, BOUND, |c| c[0] == WAITERS)
            .unwrap();
        assert_eq!(wake.notify(2), 2);
        let guard = progress
            .wait_for_timeout(guard, BOUND, |c| c[1] == 2)
            .unwrap();
        // Exactly three are still waiting: notify_all finds exactly them.
        assert_eq!(wake.notify_all(), 3);
        let guard = progress
            .wait_for_timeout(guard, BOUND, |c| c[1] == WAITERS)
            .unwrap();
        drop(guard);
        for waiter in waiters {
            waiter.join().unwrap();
        }
    });
    assert_eq!(wake.notify(1), 0);
}

#[test]
fn a_waiter_arriving_after_notify_does_not_take_the_notification() {
    let lock = Lock::new().unwrap();
    let cond = Condition::with_lock(&lock).unwrap();
    let early_waiting = Event::new().unwrap();
    std::thread::scope(|s| {
        let early = s.spawn(|| {
            let guard = lock.lock().unwrap();
            early_waiting.set(); // still holding the lock: the notifier waits for it
            cond.wait_timeout(guard, BOUND)
                .map(drop)
                .map_err(|e| e.to_string())
        });
        early_waiting.wait_timeout(BOUND).unwrap();
        let guard = lock.lock().unwrap(); // the early waiter is enqueued now
        assert_eq!(cond.notify(1), 1);
        drop(guard);
        // A late waiter cannot consume the early one's notification.
        let guard = lock.lock().unwrap();
        assert!(matches!(
            cond.wait_timeout(guard, TIMEOUT),
            Err(WaitError::Timeout(_))
        ));
        assert!(early.join().unwrap().is_ok());
    });
}

#[test]
fn semaphore_admits_at_most_its_value() {
    let semaphore = Semaphore::new(2).unwrap();
    let inside = AtomicU32::new(0);
    let most = AtomicU32::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                for _ in 0..2_000 {
                    let _permit = semaphore.acquire_timeout(BOUND).unwrap();
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    inside.fetch_sub(1, Ordering::SeqCst);
                }
            });
        }
    });
    assert!(most.load(Ordering::SeqCst) <= 2);
    assert_eq!(semaphore.value(), 2);
    let bounded = BoundedSemaphore::new(1).unwrap();
    assert_eq!(
        bounded.release(),
        Err(SemaphoreError::OverRelease { bound: 1 })
    );
}

#[test]
fn barrier_keeps_rounds_apart_and_indexes_arrivals() {
    const PARTIES: usize = 3;
    const ROUNDS: u32 = 300;
    let barrier = Barrier::builder(PARTIES as u32)
        .timeout(BOUND)
        .build()
        .unwrap();
    let reached: [AtomicU32; PARTIES] = Default::default();
    let indices = std::thread::scope(|s| {
        let parties: Vec<_> = (0..PARTIES)
            .map(|me| {
                let (barrier, reached) = (&barrier, &reached);
                s.spawn(move || {
                    let mut indices = Vec::new();
                    for round in 1..=ROUNDS {
                        reached[me].store(round, Ordering::SeqCst);
                        indices.push(barrier.wait().unwrap());
                        // Everybody reached this round; nobody is past the next.
                        for other in reached {
                            let at = other.load(Ordering::SeqCst);
                            assert!(
                                at == round || at == round + 1,
                                "round {round}: a party is at {at}"
                            );
                        }
                    }
                    indices
                })
            })
            .collect();
        parties
            .into_iter()
            .map(|p| p.join().unwrap())
            .collect::<Vec<_>>()
    });
    for round in 0..ROUNDS as usize {
        let mut seen: Vec<u32> = indices.iter().map(|party| party[round]).collect();
        seen.sort_unstable();
        assert_eq!(seen, [0, 1, 2], "round {round}");
    }
}

#[test]
fn barrier_abort_and_reset_break_current_waiters() {
    let barrier = Barrier::new(3).unwrap();
    for breaker in [Barrier::abort as fn(&Barrier), Barrier::reset] {
        std::thread::scope(|s| {
            let waiter = s.spawn(|| barrier.wait_timeout(BOUND));
            // Wait for the waiter to arrive before breaking.
            let deadline = Instant::now() + BOUND;
            while barrier.n_waiting() == 0 {
                assert!(Instant::now() < deadline, "the waiter never arrived");
                std::thread::yield_now();
            }
            breaker(&barrier);
            assert!(matches!(waiter.join().unwrap(), Err(BarrierError::Broken)));
        });
        barrier.reset();
        assert!(!barrier.broken());
        assert_eq!(barrier.n_waiting(), 0);
    }
}

#[test]
fn event_releases_every_waiter() {
    let event = Event::new().unwrap();
    std::thread::scope(|s| {
        let waiters: Vec<_> = (0..4)
            .map(|_| s.spawn(|| event.wait_timeout(BOUND)))
            .collect();
        event.set();
        for waiter in waiters {
            assert!(waiter.join().unwrap().is_ok());
        }
    });
}

#[test]
fn a_thread_dying_with_the_lock_is_reported_to_the_next_owner() {
    let lock = Lock::new().unwrap();
    std::thread::scope(|s| {
        s.spawn(|| std::mem::forget(lock.lock().unwrap()));
    });
    let guard = match lock.lock_timeout(BOUND) {
        Err(LockError::OwnerDied(guard)) => guard,
        other => panic!("expected OwnerDied, got {other:?}"),
    };
    drop(guard);
    assert!(lock.try_lock().is_ok(), "the lock is clean after recovery");
}

#[test]
fn a_handle_sent_through_a_channel_is_the_same_object() {
    let (tx, rx) = ipc_channel::ipc::channel::<(Lock, Value<u32>)>().unwrap();
    let lock = Lock::new().unwrap();
    let value = Value::new(7u32).unwrap();
    tx.send((lock.clone(), value.clone())).unwrap();
    // A second mapping of the same memory in this process.
    let (lock2, value2) = rx.recv().unwrap();
    value2.set(8).unwrap();
    assert_eq!(value.get().unwrap(), 8);
    let _guard = lock.lock().unwrap();
    std::thread::scope(|s| {
        s.spawn(|| assert!(matches!(lock2.try_lock(), Err(LockError::WouldBlock))));
    });
}

#[test]
fn malformed_bytes_are_an_error_not_a_panic() {
    assert!(postcard::from_bytes::<Lock>(&[0xff, 0x01]).is_err());
    assert!(postcard::from_bytes::<Value<u64>>(&[]).is_err());
    assert!(postcard::from_bytes::<Barrier>(&[3, 1, 2, 3]).is_err());
}

/// CPU time the calling thread has used (user + system).
fn thread_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a valid place for a rusage, which getrusage fills.
    let usage = unsafe {
        assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()), 0);
        usage.assume_init()
    };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

#[test]
fn parties_watching_each_other_and_semaphore_sleepers_sleep_in_the_kernel() {
    // Two of three barrier parties wait (the second watches the first with
    // futex_waitv); a semaphore acquirer waits while a holder thread lives.
    let barrier = Barrier::new(3).unwrap();
    let semaphore = Semaphore::new(1).unwrap();
    let wait = Duration::from_millis(400);
    let (holding, held) = std::sync::mpsc::channel();
    let (release, released) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        let semaphore = &semaphore;
        s.spawn(move || {
            let _permit = semaphore.acquire();
            holding.send(()).unwrap();
            let _ = released.recv_timeout(Duration::from_secs(30));
        });
        held.recv().unwrap();
        let used: Vec<Duration> = [
            s.spawn(|| {
                let before = thread_cpu();
                let _ = barrier.wait_timeout(wait);
                thread_cpu() - before
            }),
            s.spawn(|| {
                let before = thread_cpu();
                let _ = barrier.wait_timeout(wait);
                thread_cpu() - before
            }),
            s.spawn(|| {
                let before = thread_cpu();
                assert!(semaphore.acquire_timeout(wait).is_err());
                thread_cpu() - before
            }),
        ]
        .into_iter()
        .map(|waiter| waiter.join().unwrap())
        .collect();
        release.send(()).unwrap();
        for cpu in used {
            // A spinning waiter would use most of the 400 ms.
            assert!(
                cpu < Duration::from_millis(40),
                "a waiter used {cpu:?} of CPU"
            );
        }
    });
}

#[test]
fn more_waiters_than_slots_are_all_served_and_counted_exactly() {
    const WAITERS: u32 = 300; // beyond the 256 slots: some wait in the overflow
    let cond = Condition::new().unwrap();
    let registered = AtomicU32::new(0);
    let notified = AtomicU32::new(0);
    std::thread::scope(|s| {
        for _ in 0..WAITERS {
            s.spawn(|| {
                let guard = cond.lock().unwrap();
                registered.fetch_add(1, Ordering::Relaxed);
                match cond.wait_timeout(guard, Duration::from_secs(30)) {
                    Ok(_) => notified.fetch_add(1, Ordering::Relaxed),
                    Err(error) => panic!("a waiter was not notified: {error}"),
                };
            });
        }
        // Registered under the lock, before the wait releases it: once we
        // hold the lock and count them all, all of them wait.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let guard = cond.lock().unwrap();
            if registered.load(Ordering::Relaxed) == WAITERS {
                drop(guard);
                break;
            }
            drop(guard);
            assert!(Instant::now() < deadline, "waiters never came");
            std::thread::yield_now();
        }
        assert_eq!(cond.notify(260), 260);
        assert_eq!(cond.notify_all(), (WAITERS - 260) as usize);
        assert_eq!(cond.notify_all(), 0);
    });
    assert_eq!(notified.load(Ordering::Relaxed), WAITERS);
}
