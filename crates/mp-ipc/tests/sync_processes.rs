//! The synchronisation primitives across processes: handles passed as
//! arguments refer to the same objects in the children. Every join is bounded
//! and every child is killed and reaped on every path (see [`Children`]).

use std::time::{Duration, Instant};

use mp_core::{Child, Process, ProcessError};
use mp_ipc::{
    Barrier, BoundedSemaphore, Condition, Event, Lock, LockError, NotOwner, RLock, Semaphore,
    SemaphoreError, Value,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The longest any wait or join here may take before the test fails.
const BOUND: Duration = Duration::from_secs(30);

/// Children that are killed and reaped when dropped, also when a test fails.
struct Children<R: Serialize + DeserializeOwned>(Vec<Child<R>>);

impl<R: Serialize + DeserializeOwned> Children<R> {
    fn start(children: impl IntoIterator<Item = Result<Child<R>, ProcessError>>) -> Self {
        let mut started = Children(Vec::new());
        for child in children {
            started.0.push(child.expect("start a child"));
        }
        started
    }

    /// Joins every child within `BOUND` (in total), in order.
    fn join_all(&self) -> Vec<R> {
        let deadline = Instant::now() + BOUND;
        self.0
            .iter()
            .map(|child| {
                let left = deadline.saturating_duration_since(Instant::now());
                child
                    .join_timeout(left)
                    .unwrap_or_else(|e| panic!("child {}: {e}", child.pid()))
            })
            .collect()
    }
}

impl<R: Serialize + DeserializeOwned> Drop for Children<R> {
    fn drop(&mut self) {
        for child in &self.0 {
            let _ = child.kill();
        }
        for child in &self.0 {
            // Reap (a child already joined answers AlreadyJoined at once).
            let _ = child.join_timeout(BOUND);
        }
    }
}

#[test]
fn four_processes_add_under_the_value_lock() {
    let counter = Value::new(0u64).unwrap();
    let children = Children::start((0..4).map(|_| {
        Process::new(|(counter, n): (Value<u64>, u32)| {
            for _ in 0..n {
                *counter.lock().unwrap() += 1;
            }
        })
        .args((counter.clone(), 100_000))
        .start()
    }));
    children.join_all();
    assert_eq!(counter.get().unwrap(), 400_000);
}

#[test]
fn a_barrier_of_five_processes_keeps_order_over_a_thousand_passes() {
    const PARTIES: usize = 5;
    const PASSES: u32 = 1000;
    let barrier = Barrier::builder(PARTIES as u32)
        .timeout(BOUND)
        .build()
        .unwrap();
    // reached[i]: the last pass party i has reached.
    let reached = mp_ipc::Array::<u32>::new(PARTIES).unwrap();
    let children = Children::start((0..PARTIES).map(|me| {
        Process::new(
            |(barrier, reached, me): (Barrier, mp_ipc::Array<u32>, usize)| -> Result<Vec<u32>, String> {
                let mut indices = Vec::with_capacity(PASSES as usize);
                for pass in 1..=PASSES {
                    reached.lock().unwrap()[me] = pass;
                    indices.push(barrier.wait().map_err(|e| format!("pass {pass}: {e}"))?);
                    // Everybody reached this pass, and nobody is past the next.
                    let seen = reached.to_vec().unwrap();
                    if seen.iter().any(|&at| at != pass && at != pass + 1) {
                        return Err(format!("pass {pass}: parties at {seen:?}"));
                    }
                }
                Ok(indices)
            },
        )
        .args((barrier.clone(), reached.clone(), me))
        .start()
    }));
    let indices: Vec<Vec<u32>> = children
        .join_all()
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    for pass in 0..PASSES as usize {
        let mut seen: Vec<u32> = indices.iter().map(|party| party[pass]).collect();
        seen.sort_unstable();
        assert_eq!(seen, [0, 1, 2, 3, 4], "arrival indices of pass {pass}");
    }
    assert!(!barrier.broken());
}

#[test]
fn a_process_killed_holding_a_lock_hands_it_over() {
    let lock = Lock::new().unwrap();
    let counter = Value::new(0u32).unwrap();
    let holding = Event::new().unwrap();
    let children =
        Children::start([
            Process::new(|(lock, counter, holding): (Lock, Value<u32>, Event)| {
                let _lock = lock.lock().unwrap();
                let mut value = counter.lock().unwrap();
                *value = 1;
                holding.set();
                // Hold both until killed (bounded, should the parent vanish).
                let never = Event::new().unwrap();
                let _ = never.wait_timeout(BOUND);
                *value = 2;
            })
            .args((lock.clone(), counter.clone(), holding.clone()))
            .start(),
        ]);
    holding
        .wait_timeout(BOUND)
        .expect("the child took the locks");
    children.0[0].kill().unwrap();
    match children.0[0].join_timeout(BOUND) {
        Err(ProcessError::Signaled { signal, .. }) => assert_eq!(signal, libc::SIGKILL),
        other => panic!("expected death by SIGKILL, got {other:?}"),
    }
    match lock.lock_timeout(BOUND) {
        Err(LockError::OwnerDied(guard)) => drop(guard),
        other => panic!("expected OwnerDied, got {other:?}"),
    }
    // The Value's own lock too, with the value as the dead process left it.
    match counter.lock_timeout(BOUND) {
        Err(LockError::OwnerDied(mut value)) => {
            assert_eq!(*value, 1);
            *value = 10;
        }
        other => panic!("expected OwnerDied, got {other:?}"),
    }
    // Recovered: clean from now on.
    assert!(lock.try_lock().is_ok());
    assert_eq!(counter.get().unwrap(), 10);
}

#[test]
fn notify_n_wakes_exactly_n_processes() {
    const WAITERS: u32 = 4;
    // [arrived, woken], protected by the Value's lock, as is the condition.
    let counters = Value::new([0u32; 2]).unwrap();
    let wake = Condition::with_lock(counters.get_lock()).unwrap();
    let progress = Condition::with_lock(counters.get_lock()).unwrap();
    let children = Children::start((0..WAITERS).map(|_| {
        Process::new(|(counters, wake, progress): (Value<[u32; 2]>, Condition, Condition)| -> Result<(), String> {
            let mut guard = counters.lock().unwrap();
            guard[0] += 1;
            progress.notify_all();
            let mut guard = wake.wait_timeout(guard, BOUND).map_err(|e| e.to_string())?;
            guard[1] += 1;
            progress.notify_all();
            Ok(())
        })
        .args((counters.clone(), wake.clone(), progress.clone()))
        .start()
    }));
    let guard = counters.lock().unwrap();
    let guard = progress
        .wait_for_timeout(guard, BOUND, |c| c[0] == WAITERS)
        .unwrap();
    assert_eq!(wake.notify(3), 3);
    let guard = progress
        .wait_for_timeout(guard, BOUND, |c| c[1] == 3)
        .unwrap();
    assert_eq!(wake.notify_all(), 1, "exactly one was left waiting");
    let guard = progress
        .wait_for_timeout(guard, BOUND, |c| c[1] == WAITERS)
        .unwrap();
    drop(guard);
    for result in children.join_all() {
        result.unwrap();
    }
}

#[test]
fn semaphore_event_and_rlock_across_processes() {
    let semaphore = Semaphore::new(0).unwrap();
    let bounded = BoundedSemaphore::new(1).unwrap();
    let started = Event::new().unwrap();
    let rlock = RLock::new().unwrap();
    let _rheld = rlock.lock().unwrap();
    let children = Children::start([Process::new(
        |(semaphore, bounded, started, rlock): (Semaphore, BoundedSemaphore, Event, RLock)| {
            // Releasing the parent's RLock is refused here.
            let foreign = rlock.release();
            // The bounded semaphore is full: one more release is an error.
            let over = bounded.release();
            started.set();
            let permit = semaphore.acquire_timeout(BOUND).map(|p| p.forget());
            (foreign, over, permit)
        },
    )
    .args((
        semaphore.clone(),
        bounded.clone(),
        started.clone(),
        rlock.clone(),
    ))
    .start()]);
    started.wait_timeout(BOUND).unwrap();
    semaphore.release().unwrap();
    let (foreign, over, permit) = children.join_all().pop().unwrap();
    assert_eq!(foreign, Err(NotOwner));
    assert_eq!(over, Err(SemaphoreError::OverRelease { bound: 1 }));
    assert_eq!(permit, Ok(()));
    assert_eq!(semaphore.value(), 0, "the child kept the permit");
}

#[test]
fn values_under_one_given_lock_and_raw_arrays_across_processes() {
    let lock = Lock::new().unwrap();
    let count = Value::with_lock(0u64, &lock).unwrap();
    let total = mp_ipc::Array::<u64>::with_lock(1, &lock).unwrap();
    let raw = mp_ipc::RawArray::<u32>::new(4).unwrap();
    let children = Children::start((0..2u32).map(|me| {
        Process::new(
            |(count, total, raw, me): (
                Value<u64>,
                mp_ipc::Array<u64>,
                mp_ipc::RawArray<u32>,
                u32,
            )| {
                for _ in 0..10_000 {
                    let mut c = count.lock().unwrap();
                    *c += 1;
                    // The same lock guards the array: held already, so
                    // locking it through the array would deadlock.
                    assert!(matches!(total.try_lock(), Err(LockError::Deadlock)));
                    drop(c);
                    total.lock().unwrap()[0] += 2;
                }
                raw.set(me as usize, me + 100).unwrap();
            },
        )
        .args((count.clone(), total.clone(), raw.clone(), me))
        .start()
    }));
    children.join_all();
    assert_eq!(count.get().unwrap(), 20_000);
    assert_eq!(total.to_vec().unwrap(), [40_000]);
    assert_eq!(raw.to_vec(), [100, 101, 0, 0]);
}

#[test]
fn a_condition_over_an_rlock_across_processes() {
    let rlock = RLock::new().unwrap();
    let cond = Condition::with_rlock(&rlock).unwrap();
    let ready = mp_ipc::RawValue::new(0u32).unwrap();
    let holding = Event::new().unwrap();
    let children = Children::start([Process::new(
        |(cond, ready, holding): (Condition<RLock>, mp_ipc::RawValue<u32>, Event)| -> Result<u32, String> {
            let outer = cond.lock().map_err(|e| e.to_string())?;
            let inner = cond.get_lock().lock().map_err(|e| e.to_string())?;
            holding.set();
            let inner = cond
                .wait_for_timeout(inner, BOUND, |_| ready.get() == 1)
                .map_err(|e| e.to_string())?;
            drop(inner);
            drop(outer);
            Ok(ready.get())
        },
    )
    .args((cond.clone(), ready.clone(), holding.clone()))
    .start()]);
    holding
        .wait_timeout(BOUND)
        .expect("the child holds the RLock twice");
    // Free only once the child's wait released both levels.
    let guard = cond
        .get_lock()
        .lock_timeout(BOUND)
        .expect("the waiting child released every level");
    ready.set(1);
    assert_eq!(cond.notify_all(), 1);
    drop(guard);
    assert_eq!(children.join_all(), [Ok(1)]);
}
