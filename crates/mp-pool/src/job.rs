//! Where the results of a job's chunks go: collected into one value (`map`, `apply` and
//! their `_async` forms) or streamed to an iterator (`imap`, `imap_unordered`).
//!
//! The result thread calls [`Job::deliver`] once per chunk, outside the scheduler's lock;
//! decoding the results happens there too.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};
use serde::de::DeserializeOwned;

use crate::error::PoolError;
use crate::result::Completion;

/// What became of one chunk of a job.
pub(crate) struct ChunkOutcome {
    /// The chunk's position in its job.
    pub index: usize,
    /// How many items it had.
    pub items: usize,
    /// The postcard-encoded `Vec` of results, with the pid of the worker that made it.
    pub result: Result<(u32, Vec<u8>), PoolError>,
}

/// A job as the scheduler sees it: a sink for chunk outcomes.
pub(crate) trait Job: Send + Sync {
    /// Receives the outcome of one chunk.
    fn deliver(&self, outcome: ChunkOutcome);
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
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        postcard::from_bytes(&bytes)
    }));
    let values: Vec<R> = match decoded {
        Ok(Ok(values)) => values,
        Ok(Err(e)) => return Err(bad(e.to_string())),
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
/// its error and cancels the chunks that have not started.
pub(crate) struct CollectJob<R, T> {
    state: Mutex<Collecting<R>>,
    completion: Arc<Completion<T>>,
    finish: fn(Vec<R>) -> Option<T>,
    cancelled: AtomicBool,
}

struct Collecting<R> {
    chunks: Vec<Option<Vec<R>>>,
    received: usize,
    /// The number of chunks, once submission is over.
    expected: Option<usize>,
    done: bool,
}

impl<R: DeserializeOwned + Send, T: Send> CollectJob<R, T> {
    /// A job whose results are turned into the final value by `finish` (`None`: the worker
    /// sent something that does not fit, reported as [`PoolError::BadResult`]).
    pub(crate) fn new(completion: Arc<Completion<T>>, finish: fn(Vec<R>) -> Option<T>) -> Self {
        CollectJob {
            state: Mutex::new(Collecting {
                chunks: Vec::new(),
                received: 0,
                expected: None,
                done: false,
            }),
            completion,
            finish,
            cancelled: AtomicBool::new(false),
        }
    }

    /// Submission is over: the job has `chunks` chunks.
    pub(crate) fn seal(&self, chunks: usize) {
        let mut state = self.state.lock();
        state.expected = Some(chunks);
        self.finish_if_complete(state);
    }

    /// Gives up on the job (submission failed): drops its chunks that have not started.
    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    fn finish_if_complete(&self, mut state: parking_lot::MutexGuard<'_, Collecting<R>>) {
        if state.done || Some(state.received) != state.expected {
            return;
        }
        state.done = true;
        let chunks = std::mem::take(&mut state.chunks);
        drop(state);
        let values: Vec<R> = chunks.into_iter().flatten().flatten().collect();
        let outcome = (self.finish)(values).ok_or_else(|| PoolError::BadResult {
            pid: 0,
            message: "the worker's results do not make up the expected value".into(),
        });
        self.completion.complete(outcome);
    }
}

impl<R: DeserializeOwned + Send, T: Send> Job for CollectJob<R, T> {
    fn deliver(&self, outcome: ChunkOutcome) {
        if self.is_cancelled() {
            return;
        }
        let index = outcome.index;
        match decode::<R>(outcome) {
            Ok(values) => {
                let mut state = self.state.lock();
                if state.done {
                    return;
                }
                if state.chunks.len() <= index {
                    state.chunks.resize_with(index + 1, || None);
                }
                state.chunks[index] = Some(values);
                state.received += 1;
                self.finish_if_complete(state);
            }
            Err(error) => {
                let mut state = self.state.lock();
                if std::mem::replace(&mut state.done, true) {
                    return;
                }
                state.chunks = Vec::new();
                drop(state);
                self.cancel();
                self.completion.complete(Err(error));
            }
        }
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
            arrived: Condvar::new(),
            cancelled: AtomicBool::new(false),
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

    /// The iterator is gone: its remaining chunks need not run.
    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
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
            result: Ok((1, postcard::to_allocvec(values).unwrap())),
        }
    }

    #[test]
    fn collect_orders_chunks_by_index_whatever_the_arrival_order() {
        let completion = Completion::new();
        let job = CollectJob::<u32, Vec<u32>>::new(completion.clone(), Some);
        job.deliver(ok(1, &[3, 4]));
        job.deliver(ok(0, &[1, 2]));
        assert!(!completion.is_ready(), "not sealed yet");
        job.seal(2);
        assert_eq!(AsyncResult::new(completion).get(), Ok(vec![1, 2, 3, 4]));
    }

    #[test]
    fn collect_of_nothing_is_empty_and_a_failure_wins_at_once() {
        let empty = Completion::new();
        CollectJob::<u32, Vec<u32>>::new(empty.clone(), Some).seal(0);
        assert_eq!(AsyncResult::new(empty).get(), Ok(vec![]));

        let failed = Completion::new();
        let job = CollectJob::<u32, Vec<u32>>::new(failed.clone(), Some);
        job.deliver(ChunkOutcome {
            index: 1,
            items: 2,
            result: Err(PoolError::Terminated),
        });
        assert!(job.is_cancelled());
        job.deliver(ok(0, &[1, 2]));
        assert_eq!(AsyncResult::new(failed).get(), Err(PoolError::Terminated));
    }

    #[test]
    fn a_wrong_number_of_results_is_a_typed_error() {
        let completion = Completion::new();
        let job = CollectJob::<u32, Vec<u32>>::new(completion.clone(), Some);
        job.deliver(ChunkOutcome {
            index: 0,
            items: 3,
            result: Ok((9, postcard::to_allocvec(&[1u32]).unwrap())),
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
