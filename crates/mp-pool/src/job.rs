//! Where the results of a job's chunks go: collected into one value (`map`, `apply` and
//! their `_async` forms) or streamed to an iterator (`imap`, `imap_unordered`).
//!
//! The result thread calls [`Job::deliver`] once per chunk, outside the scheduler's lock;
//! decoding the results happens there too.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::Waker;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};
use serde::de::DeserializeOwned;

use crate::error::PoolError;
use crate::result::Completion;
use crate::transport::ResultBytes;

/// What became of one chunk of a job.
pub(crate) struct ChunkOutcome {
    /// The chunk's position in its job.
    pub index: usize,
    /// How many items it had.
    pub items: usize,
    /// The position of its first item in the job's input.
    pub first_item: usize,
    /// The postcard-encoded `Vec` of results, with the pid of the worker that made it.
    pub result: Result<(u32, ResultBytes), PoolError>,
}

/// A job as the scheduler sees it: a sink for chunk outcomes.
pub(crate) trait Job: Send + Sync {
    /// Receives the outcome of one chunk.
    fn deliver(&self, outcome: ChunkOutcome);
    /// Drops its chunks that have not started (their outcomes are ignored from now on).
    fn cancel(&self);
    /// Whether the chunks that have not started yet can be dropped (a failed `map`, a
    /// dropped iterator).
    fn is_cancelled(&self) -> bool;
    /// Whether the successful results of its chunks are only observed together (a `map`:
    /// nothing can be seen before the last chunk is in), so that a worker may send them
    /// together while it runs the job's next chunk. Failures are sent at once regardless.
    fn results_observed_together(&self) -> bool;
}

/// Hands outcomes to their jobs (outside the scheduler's lock). A panicking callback is
/// reported and does not stop the other deliveries.
pub(crate) fn deliver(deliveries: Vec<(Arc<dyn Job>, ChunkOutcome)>) {
    for (job, outcome) in deliveries {
        let delivered =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.deliver(outcome)));
        if delivered.is_err() {
            tracing::error!("a pool result callback panicked");
        }
    }
}

/// Decodes a chunk's results and checks there is one per item. A failing decoder, or one
/// that panics (a user's `Deserialize`), fails this chunk with [`PoolError::BadResult`]
/// naming the type and the decoder's message; nothing else is affected.
fn decode<R: DeserializeOwned>(outcome: ChunkOutcome) -> Result<Vec<R>, PoolError> {
    let (pid, bytes) = outcome.result?;
    let bad = |message: String| PoolError::BadResult {
        pid,
        message: format!("decoding {}: {message}", std::any::type_name::<R>()),
    };
    // mp-core's decoder names the type and keeps the message a failing `Deserialize`
    // noted (postcard drops it).
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        mp_core::decode_described::<Vec<R>>(bytes.as_bytes())
    }));
    let values: Vec<R> = match decoded {
        Ok(Ok(values)) => values,
        Ok(Err(message)) => return Err(bad(message)),
        Err(panic) => {
            return Err(bad(format!(
                "the decoder panicked: {}",
                panic_message(&*panic)
            )));
        }
    };
    if values.len() != outcome.items {
        return Err(bad(format!(
            "{} results for {} items",
            values.len(),
            outcome.items
        )));
    }
    Ok(values)
}

/// The message of a caught panic.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Collects every chunk into one value: `map` (a `Vec` in input order) and `apply` (the one
/// value). Fails fast: the first failing chunk (in completion order) completes the job with
/// its error and cancels the chunks that have not started. A chunk fails if the pool fails
/// it, or if `check` finds an error among its values (an `Err` returned by a task of the
/// `try_` family).
pub(crate) struct CollectJob<R, T, E = PoolError> {
    state: Mutex<Collecting<R>>,
    completion: Arc<Completion<T, E>>,
    finish: fn(Vec<R>) -> Option<T>,
    check: fn(&[R]) -> Option<E>,
    cancelled: AtomicBool,
}

/// The `check` of jobs whose values are never errors.
pub(crate) fn no_task_errors<R, E>(_: &[R]) -> Option<E> {
    None
}

struct Collecting<R> {
    /// Each item's value, at its position in the input (one slot per item rather than a
    /// `Vec` per chunk: with small chunks, the allocations and the final flattening were
    /// a good part of the result thread's work).
    slots: Vec<Option<R>>,
    received: usize,
    /// The number of chunks, once submission is over.
    expected: Option<usize>,
    done: bool,
}

impl<R: DeserializeOwned + Send, T: Send, E: From<PoolError> + Send> CollectJob<R, T, E> {
    /// A job whose results are turned into the final value by `finish` (`None`: the worker
    /// sent something that does not fit, reported as [`PoolError::BadResult`]), failing
    /// with the first error `check` finds in a chunk's values.
    pub(crate) fn new(
        completion: Arc<Completion<T, E>>,
        finish: fn(Vec<R>) -> Option<T>,
        check: fn(&[R]) -> Option<E>,
    ) -> Self {
        CollectJob {
            state: Mutex::new(Collecting {
                slots: Vec::new(),
                received: 0,
                expected: None,
                done: false,
            }),
            completion,
            finish,
            check,
            cancelled: AtomicBool::new(false),
        }
    }

    /// Submission is over: the job has `chunks` chunks.
    pub(crate) fn seal(&self, chunks: usize) {
        let mut state = self.state.lock();
        state.expected = Some(chunks);
        self.finish_if_complete(state);
    }

    fn finish_if_complete(&self, mut state: parking_lot::MutexGuard<'_, Collecting<R>>) {
        if state.done || Some(state.received) != state.expected {
            return;
        }
        state.done = true;
        let slots = std::mem::take(&mut state.slots);
        drop(state);
        // Every chunk arrived, so every slot is filled.
        let values: Option<Vec<R>> = slots.into_iter().collect();
        let outcome = values.and_then(self.finish).ok_or_else(|| {
            PoolError::BadResult {
                pid: 0,
                message: "the worker's results do not make up the expected value".into(),
            }
            .into()
        });
        self.completion.complete(outcome);
    }
}

impl<R: DeserializeOwned + Send, T: Send, E: From<PoolError> + Send> Job for CollectJob<R, T, E> {
    fn deliver(&self, outcome: ChunkOutcome) {
        if self.is_cancelled() {
            return;
        }
        let first = outcome.first_item;
        let checked =
            decode::<R>(outcome)
                .map_err(E::from)
                .and_then(|values| match (self.check)(&values) {
                    Some(error) => Err(error),
                    None => Ok(values),
                });
        match checked {
            Ok(values) => {
                let mut state = self.state.lock();
                if state.done {
                    return;
                }
                let end = first + values.len();
                if state.slots.len() < end {
                    state.slots.resize_with(end, || None);
                }
                for (slot, value) in state.slots[first..end].iter_mut().zip(values) {
                    *slot = Some(value);
                }
                state.received += 1;
                self.finish_if_complete(state);
            }
            Err(error) => {
                let mut state = self.state.lock();
                if std::mem::replace(&mut state.done, true) {
                    return;
                }
                state.slots = Vec::new();
                drop(state);
                self.cancel();
                self.completion.complete(Err(error));
            }
        }
    }

    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    fn results_observed_together(&self) -> bool {
        true
    }
}

/// The items of one chunk, or its error and how many items it stands for.
pub(crate) type ChunkItems<R> = Result<Vec<R>, (PoolError, usize)>;

/// Streams chunk results to an iterator, in input order or in completion order.
pub(crate) struct StreamJob<R> {
    state: Mutex<Streaming<R>>,
    /// The task polling the stream (`IMap` as a `Stream`), woken when a chunk arrives.
    waker: Mutex<Option<Waker>>,
    arrived: Condvar,
    cancelled: AtomicBool,
}

enum Streaming<R> {
    Ordered(BTreeMap<usize, ChunkItems<R>>),
    Unordered(VecDeque<ChunkItems<R>>),
}

impl<R: DeserializeOwned + Send> StreamJob<R> {
    pub(crate) fn new(ordered: bool) -> Self {
        StreamJob {
            state: Mutex::new(if ordered {
                Streaming::Ordered(BTreeMap::new())
            } else {
                Streaming::Unordered(VecDeque::new())
            }),
            waker: Mutex::new(None),
            arrived: Condvar::new(),
            cancelled: AtomicBool::new(false),
        }
    }

    /// The chunk at `index` (ordered) or any chunk (unordered) if it is there; otherwise
    /// `waker` is woken when one arrives.
    pub(crate) fn poll_next(&self, index: usize, waker: &Waker) -> Option<ChunkItems<R>> {
        // The waker is registered before looking, so that a chunk delivered in between
        // wakes it.
        {
            let mut slot = self.waker.lock();
            match &mut *slot {
                Some(old) => old.clone_from(waker),
                None => *slot = Some(waker.clone()),
            }
        }
        match &mut *self.state.lock() {
            Streaming::Ordered(chunks) => chunks.remove(&index),
            Streaming::Unordered(chunks) => chunks.pop_front(),
        }
    }

    /// Waits until deadline for the chunk at `index` (ordered) or any chunk (unordered).
    /// `None`: the deadline passed.
    pub(crate) fn next(&self, index: usize, deadline: Option<Instant>) -> Option<ChunkItems<R>> {
        let mut state = self.state.lock();
        loop {
            let found = match &mut *state {
                Streaming::Ordered(chunks) => chunks.remove(&index),
                Streaming::Unordered(chunks) => chunks.pop_front(),
            };
            if found.is_some() {
                return found;
            }
            match deadline {
                None => self.arrived.wait(&mut state),
                Some(deadline) => {
                    if self.arrived.wait_until(&mut state, deadline).timed_out() {
                        return None;
                    }
                }
            }
        }
    }
}

impl<R: DeserializeOwned + Send> Job for StreamJob<R> {
    fn deliver(&self, outcome: ChunkOutcome) {
        if self.is_cancelled() {
            return;
        }
        let (index, items) = (outcome.index, outcome.items);
        let chunk = decode::<R>(outcome).map_err(|error| (error, items));
        match &mut *self.state.lock() {
            Streaming::Ordered(chunks) => {
                chunks.insert(index, chunk);
            }
            Streaming::Unordered(chunks) => chunks.push_back(chunk),
        }
        self.arrived.notify_all();
        // Taken out first: the waker runs with no lock of ours held.
        let waker = self.waker.lock().take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    fn results_observed_together(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::result::AsyncResult;

    fn ok(index: usize, values: &[u32]) -> ChunkOutcome {
        ChunkOutcome {
            index,
            items: values.len(),
            first_item: index * values.len(),
            result: Ok((
                1,
                ResultBytes::Inline(crate::transport::Bytes::from_vec(
                    postcard::to_allocvec(values).unwrap(),
                )),
            )),
        }
    }

    #[test]
    fn collect_orders_chunks_by_index_whatever_the_arrival_order() {
        let completion = Completion::new();
        let job = CollectJob::<u32, Vec<u32>>::new(completion.clone(), Some, no_task_errors);
        job.deliver(ok(1, &[3, 4]));
        job.deliver(ok(0, &[1, 2]));
        assert!(!completion.is_ready(), "not sealed yet");
        job.seal(2);
        assert_eq!(AsyncResult::new(completion).get(), Ok(vec![1, 2, 3, 4]));
    }

    #[test]
    fn collect_of_nothing_is_empty_and_a_failure_wins_at_once() {
        let empty = Completion::new();
        CollectJob::<u32, Vec<u32>>::new(empty.clone(), Some, no_task_errors).seal(0);
        assert_eq!(AsyncResult::new(empty).get(), Ok(vec![]));

        let failed = Completion::new();
        let job = CollectJob::<u32, Vec<u32>>::new(failed.clone(), Some, no_task_errors);
        job.deliver(ChunkOutcome {
            index: 1,
            items: 2,
            first_item: 2,
            result: Err(PoolError::Terminated),
        });
        assert!(job.is_cancelled());
        job.deliver(ok(0, &[1, 2]));
        assert_eq!(AsyncResult::new(failed).get(), Err(PoolError::Terminated));
    }

    #[test]
    fn a_wrong_number_of_results_is_a_typed_error() {
        let completion = Completion::new();
        let job = CollectJob::<u32, Vec<u32>>::new(completion.clone(), Some, no_task_errors);
        job.deliver(ChunkOutcome {
            index: 0,
            items: 3,
            first_item: 0,
            result: Ok((
                9,
                ResultBytes::Inline(crate::transport::Bytes::from_vec(
                    postcard::to_allocvec(&[1u32]).unwrap(),
                )),
            )),
        });
        assert!(matches!(
            AsyncResult::new(completion).get(),
            Err(PoolError::BadResult { pid: 9, .. })
        ));
    }

    #[test]
    fn streams_yield_in_order_or_in_arrival_order() {
        let ordered = StreamJob::<u32>::new(true);
        ordered.deliver(ok(1, &[2]));
        ordered.deliver(ok(0, &[1]));
        assert_eq!(ordered.next(0, None), Some(Ok(vec![1])));
        assert_eq!(ordered.next(1, None), Some(Ok(vec![2])));
        assert_eq!(ordered.next(2, Some(Instant::now())), None);

        let unordered = StreamJob::<u32>::new(false);
        unordered.deliver(ok(1, &[2]));
        unordered.deliver(ok(0, &[1]));
        assert_eq!(unordered.next(0, None), Some(Ok(vec![2])));
        assert_eq!(unordered.next(1, None), Some(Ok(vec![1])));
    }
}
