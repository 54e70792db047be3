//! Waiting for several results at once: [`as_completed`] and [`wait`]
//! (`concurrent.futures.as_completed` and `concurrent.futures.wait`).
//!
//! Both register a waker with every pending result (the same mechanism as `await`): when a
//! result completes, the pool's result thread pushes its position onto a shared queue and
//! wakes the waiting thread. Nothing polls. A result that is still pending when the wait
//! ends keeps its (small) waker until it completes.

use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Wake, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::PoolError;
use crate::result::AsyncResult;

/// Positions of the results that completed, in completion order.
#[derive(Default)]
struct Arrivals {
    queue: Mutex<VecDeque<usize>>,
    arrived: Condvar,
}

impl Arrivals {
    /// Waits until something arrives or `deadline` passes; `None` on timeout.
    fn pop(&self, deadline: Option<Instant>) -> Option<usize> {
        let mut queue = self.queue.lock();
        loop {
            if let Some(index) = queue.pop_front() {
                return Some(index);
            }
            match deadline {
                None => self.arrived.wait(&mut queue),
                Some(deadline) => {
                    if self.arrived.wait_until(&mut queue, deadline).timed_out() {
                        return queue.pop_front();
                    }
                }
            }
        }
    }
}

/// The waker of result `index`: reports it to the waiting thread.
struct Arrival {
    index: usize,
    arrivals: Arc<Arrivals>,
}

impl Wake for Arrival {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.arrivals.queue.lock().push_back(self.index);
        self.arrivals.arrived.notify_one();
    }
}

/// Has every result report to `arrivals` when it completes (at once if it has).
fn watch<T, E>(results: &[AsyncResult<T, E>]) -> Arc<Arrivals> {
    let arrivals = Arc::new(Arrivals::default());
    for (index, result) in results.iter().enumerate() {
        let waker = Waker::from(Arc::new(Arrival {
            index,
            arrivals: arrivals.clone(),
        }));
        if !result.register(&waker) {
            waker.wake();
        }
    }
    arrivals
}

/// The handles of `results` in the order they complete (`concurrent.futures.as_completed`).
///
/// ```
/// use mp_pool::{Pool, as_completed};
///
/// let pool = Pool::new(2)?;
/// let results = (1..=3)
///     .map(|x| pool.apply_async(|x: u64| x * x, x))
///     .collect::<Result<Vec<_>, _>>()?;
/// let mut squares: Vec<u64> = as_completed(results)
///     .map(|done| done.get())
///     .collect::<Result<_, _>>()?;
/// squares.sort();
/// assert_eq!(squares, [1, 4, 9]);
/// # Ok::<(), mp_pool::PoolError>(())
/// ```
///
/// Each handle is yielded once its outcome is known (`get` then returns at once). Use
/// [`AsCompleted::next_timeout`] to bound the wait for the next one.
pub fn as_completed<T, E>(
    results: impl IntoIterator<Item = AsyncResult<T, E>>,
) -> AsCompleted<T, E> {
    let results: Vec<AsyncResult<T, E>> = results.into_iter().collect();
    let arrivals = watch(&results);
    AsCompleted {
        left: results.len(),
        results: results.into_iter().map(Some).collect(),
        arrivals,
    }
}

/// The iterator of [`as_completed`].
pub struct AsCompleted<T, E = PoolError> {
    results: Vec<Option<AsyncResult<T, E>>>,
    left: usize,
    arrivals: Arc<Arrivals>,
}

impl<T, E> AsCompleted<T, E> {
    /// The next result to complete, waiting at most `timeout`: `Some(Err(Timeout))` if none
    /// did (nothing is lost; call again), `None` once all were yielded.
    pub fn next_timeout(
        &mut self,
        timeout: Duration,
    ) -> Option<Result<AsyncResult<T, E>, PoolError>> {
        self.next_until(Some(Instant::now() + timeout))
    }

    fn next_until(
        &mut self,
        deadline: Option<Instant>,
    ) -> Option<Result<AsyncResult<T, E>, PoolError>> {
        while self.left > 0 {
            let Some(index) = self.arrivals.pop(deadline) else {
                return Some(Err(PoolError::Timeout));
            };
            // A result's waker fires once; the check guards against a stray second report.
            if let Some(result) = self.results[index].take() {
                self.left -= 1;
                return Some(Ok(result));
            }
        }
        None
    }
}

impl<T, E> Iterator for AsCompleted<T, E> {
    type Item = AsyncResult<T, E>;

    fn next(&mut self) -> Option<AsyncResult<T, E>> {
        match self.next_until(None)? {
            Ok(result) => Some(result),
            Err(_) => unreachable!("no deadline, no timeout"),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<T, E> std::fmt::Debug for AsCompleted<T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsCompleted")
            .field("left", &self.left)
            .finish_non_exhaustive()
    }
}

/// When [`wait`] returns (`concurrent.futures`' `return_when`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReturnWhen {
    /// As soon as any result is known.
    FirstCompleted,
    /// As soon as any task failed, or all are known (Python's `FIRST_EXCEPTION`).
    FirstError,
    /// When all results are known.
    AllCompleted,
}

/// What [`wait`] found: positions (in the slice given) of the results that are known, and
/// of those that are not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Waited {
    /// Results whose outcome is known, in completion order as observed.
    pub done: Vec<usize>,
    /// Results still pending, in input order.
    pub not_done: Vec<usize>,
}

/// Waits for `results` as `return_when` says, at most `timeout` (`None`: no limit), and says
/// which are done (`concurrent.futures.wait`). Returning on timeout is not an error: the
/// caller sees what is done.
///
/// ```
/// use std::time::Duration;
/// use mp_pool::{Pool, ReturnWhen, wait};
///
/// let pool = Pool::new(2)?;
/// let results = [
///     pool.apply_async(|x: u32| x + 1, 1)?,
///     pool.apply_async(|x: u32| x + 2, 1)?,
/// ];
/// let waited = wait(&results, ReturnWhen::AllCompleted, Some(Duration::from_secs(30)));
/// assert_eq!(waited.done.len(), 2);
/// assert!(waited.not_done.is_empty());
/// # Ok::<(), mp_pool::PoolError>(())
/// ```
pub fn wait<T, E>(
    results: &[AsyncResult<T, E>],
    return_when: ReturnWhen,
    timeout: Option<Duration>,
) -> Waited {
    let deadline = timeout.map(|timeout| Instant::now() + timeout);
    let arrivals = watch(results);
    let mut done: Vec<usize> = Vec::new();
    let mut known = vec![false; results.len()];
    while done.len() < results.len() {
        let finished = match return_when {
            ReturnWhen::FirstCompleted => !done.is_empty(),
            ReturnWhen::FirstError => done
                .iter()
                .any(|&index| results[index].successful() == Some(false)),
            ReturnWhen::AllCompleted => false,
        };
        if finished {
            break;
        }
        let Some(index) = arrivals.pop(deadline) else {
            break;
        };
        if !std::mem::replace(&mut known[index], true) {
            done.push(index);
        }
    }
    // Results that completed while the last condition was checked count as done too.
    loop {
        let next = arrivals.queue.lock().pop_front();
        let Some(index) = next else {
            break;
        };
        if !std::mem::replace(&mut known[index], true) {
            done.push(index);
        }
    }
    let not_done = (0..results.len()).filter(|&index| !known[index]).collect();
    Waited { done, not_done }
}
