//! Where the outcomes of chunks go: a job collecting a whole `map`/`apply`, or the stream of
//! an `imap`. The dispatcher thread calls [`Sink::deliver`] once per chunk it sent (or
//! failed), decoding results on the way.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};
use serde::de::DeserializeOwned;

use crate::backoff;
use crate::error::MpiPoolError;
use mp_pool::ResultSender;

/// A receiver of chunk outcomes.
pub(crate) trait Sink: Send + Sync {
    /// Chunk `index` ended: the postcard bytes of its `Vec` of results, or why it failed.
    /// `rank` ran it (0 when it never left rank 0).
    fn deliver(&self, index: usize, rank: i32, outcome: Result<&[u8], MpiPoolError>);
    /// Whether the chunks not yet sent can be dropped (the job failed or nobody waits).
    fn is_cancelled(&self) -> bool;
}

/// A chunk waiting to be sent: its wire message (see `wire`) and where its outcome goes.
pub(crate) struct Chunk {
    pub(crate) key: u64,
    pub(crate) index: usize,
    pub(crate) message: Vec<u8>,
    pub(crate) sink: Arc<dyn Sink>,
}

fn decode<R: DeserializeOwned>(bytes: &[u8], rank: i32) -> Result<Vec<R>, MpiPoolError> {
    postcard::from_bytes(bytes).map_err(|e| MpiPoolError::BadResult {
        rank,
        message: format!("decoding Vec<{}>: {e}", std::any::type_name::<R>()),
    })
}

/// The chunks of one `map_async` / `apply_async`, completed when all have arrived or as soon
/// as one fails.
pub(crate) struct CollectJob<R, T> {
    parts: Mutex<(Vec<Option<Vec<R>>>, usize)>,
    completion: ResultSender<T, MpiPoolError>,
    finish: fn(Vec<R>) -> Option<T>,
    failed: AtomicBool,
}

impl<R: DeserializeOwned + Send, T: Send> CollectJob<R, T> {
    /// A job of `chunks` chunks; `finish` turns the results, in input order, into the value.
    pub(crate) fn new(
        chunks: usize,
        completion: ResultSender<T, MpiPoolError>,
        finish: fn(Vec<R>) -> Option<T>,
    ) -> Arc<Self> {
        let job = Arc::new(CollectJob {
            parts: Mutex::new(((0..chunks).map(|_| None).collect(), chunks)),
            completion,
            finish,
            failed: AtomicBool::new(false),
        });
        if chunks == 0 {
            job.finish_with(Vec::new());
        }
        job
    }

    fn finish_with(&self, values: Vec<R>) {
        let outcome = (self.finish)(values).ok_or_else(|| MpiPoolError::BadResult {
            rank: 0,
            message: "a task returned no value".into(),
        });
        self.completion.complete(outcome);
    }
}

impl<R: DeserializeOwned + Send, T: Send> Sink for CollectJob<R, T> {
    fn deliver(&self, index: usize, rank: i32, outcome: Result<&[u8], MpiPoolError>) {
        match outcome.and_then(|bytes| decode::<R>(bytes, rank)) {
            Ok(values) => {
                let mut parts = self.parts.lock();
                let (slots, missing) = &mut *parts;
                if slots[index].replace(values).is_none() {
                    *missing -= 1;
                }
                if *missing == 0 && !self.failed.load(Ordering::Acquire) {
                    let values = std::mem::take(slots)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .collect();
                    drop(parts);
                    self.finish_with(values);
                }
            }
            Err(error) => {
                self.failed.store(true, Ordering::Release);
                self.completion.complete(Err(error));
            }
        }
    }

    fn is_cancelled(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }
}

/// The chunks of an `imap` / `imap_unordered`, read one by one by the iterator.
pub(crate) struct StreamJob<R> {
    arrived_chunks: Mutex<BTreeMap<usize, Result<Vec<R>, MpiPoolError>>>,
    arrived: Condvar,
    /// Chunks delivered so far, for the reader polling before it sleeps.
    delivered: AtomicUsize,
    ordered: bool,
    dropped: AtomicBool,
}

impl<R: DeserializeOwned + Send> StreamJob<R> {
    pub(crate) fn new(ordered: bool) -> Self {
        StreamJob {
            arrived_chunks: Mutex::new(BTreeMap::new()),
            arrived: Condvar::new(),
            delivered: AtomicUsize::new(0),
            ordered,
            dropped: AtomicBool::new(false),
        }
    }

    /// The index and outcome of chunk `index` (in completion order: of any chunk), waiting
    /// until `deadline`; `None` when the deadline passed first.
    pub(crate) fn next(
        &self,
        index: usize,
        deadline: Option<Instant>,
    ) -> Option<(usize, Result<Vec<R>, MpiPoolError>)> {
        // Poll briefly before sleeping (see `backoff::spin_until`): in order, chunk `index`
        // is the `index + 1`-th delivered at the earliest; in completion order, any will do
        // (`index` chunks were taken before this call).
        let wanted = index + 1;
        backoff::spin_until(
            || self.delivered.load(Ordering::Acquire) >= wanted,
            deadline,
        );
        let mut arrived = self.arrived_chunks.lock();
        loop {
            let next = if self.ordered {
                arrived.remove(&index).map(|chunk| (index, chunk))
            } else {
                arrived.pop_first()
            };
            if next.is_some() {
                return next;
            }
            match deadline {
                None => self.arrived.wait(&mut arrived),
                Some(deadline) => {
                    if self.arrived.wait_until(&mut arrived, deadline).timed_out() {
                        return None;
                    }
                }
            }
        }
    }

    /// The iterator is gone: chunks not yet sent are dropped.
    pub(crate) fn drop_rest(&self) {
        self.dropped.store(true, Ordering::Release);
    }
}

impl<R: DeserializeOwned + Send> Sink for StreamJob<R> {
    fn deliver(&self, index: usize, rank: i32, outcome: Result<&[u8], MpiPoolError>) {
        if self.dropped.load(Ordering::Acquire) {
            return;
        }
        let chunk = outcome.and_then(|bytes| decode::<R>(bytes, rank));
        self.arrived_chunks.lock().insert(index, chunk);
        self.delivered.fetch_add(1, Ordering::Release);
        self.arrived.notify_all();
    }

    fn is_cancelled(&self) -> bool {
        self.dropped.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MpiAsyncResult;

    fn encoded(values: &[u32]) -> Vec<u8> {
        postcard::to_allocvec(values).unwrap()
    }

    #[test]
    fn a_collect_job_orders_its_chunks_and_fails_fast() {
        let (sender, result) = MpiAsyncResult::pending();
        let job = CollectJob::<u32, Vec<u32>>::new(2, sender, Some);
        job.deliver(1, 2, Ok(&encoded(&[3, 4])));
        job.deliver(0, 1, Ok(&encoded(&[1, 2])));
        assert_eq!(result.get(), Ok(vec![1, 2, 3, 4]));

        let (sender, result) = MpiAsyncResult::pending();
        let job = CollectJob::<u32, Vec<u32>>::new(3, sender, Some);
        job.deliver(0, 1, Ok(&[0xff, 0xff]));
        assert!(job.is_cancelled());
        match result.get() {
            Err(MpiPoolError::BadResult { rank: 1, message }) => {
                assert!(message.contains("u32"), "{message}");
            }
            other => panic!("expected BadResult, got {other:?}"),
        }
    }

    #[test]
    fn an_empty_job_is_complete_at_once() {
        let (sender, result) = MpiAsyncResult::pending();
        let _job = CollectJob::<u32, Vec<u32>>::new(0, sender, Some);
        assert_eq!(result.get(), Ok(vec![]));
    }

    #[test]
    fn a_stream_yields_in_order_or_as_they_come() {
        let ordered = StreamJob::<u32>::new(true);
        ordered.deliver(1, 1, Ok(&encoded(&[2])));
        assert_eq!(ordered.next(0, Some(Instant::now())), None);
        ordered.deliver(0, 1, Ok(&encoded(&[1])));
        assert_eq!(ordered.next(0, None), Some((0, Ok(vec![1]))));
        assert_eq!(ordered.next(1, None), Some((1, Ok(vec![2]))));
        let unordered = StreamJob::<u32>::new(false);
        unordered.deliver(5, 1, Ok(&encoded(&[9])));
        assert_eq!(unordered.next(0, None), Some((5, Ok(vec![9]))));
    }
}
