//! [`MpiIMap`]: the lazy iterator of `imap` and `imap_unordered` on an [`MpiPool`].

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mp_core::{Entry, FunctionId};

use crate::error::MpiPoolError;
use crate::job::{Sink, StreamJob};
use crate::pool::MpiPool;
use crate::task;

/// Chunks kept in flight per worker rank by default.
const CHUNKS_IN_FLIGHT_PER_WORKER: usize = 16;

/// The results of `imap` (input order) or `imap_unordered` (completion order) on an
/// [`MpiPool`], one `Result` per input item; the same contract as `mp_pool::IMap`.
///
/// At most [`max_in_flight`](MpiIMap::max_in_flight) chunks are submitted and not yet
/// consumed (bounded read-ahead): an endless input runs in bounded memory. A failed chunk
/// yields one error per item it held, and iteration goes on with the next chunk. If the pool
/// stops accepting tasks, the iterator yields the results already on their way, then that
/// error once, then ends. Dropping the iterator drops the chunks not yet sent.
pub struct MpiIMap<'pool, M, F: Entry<M>, I> {
    pool: &'pool MpiPool,
    function: FunctionId,
    input: Option<I>,
    chunksize: usize,
    max_in_flight: usize,
    job: Arc<StreamJob<F::Output>>,
    /// Items per submitted chunk not yet consumed, by chunk index.
    sizes: HashMap<usize, usize>,
    submitted: usize,
    consumed: usize,
    current: std::vec::IntoIter<F::Output>,
    /// A failed chunk's error, and how many more of its items to report.
    failed: Option<(MpiPoolError, usize)>,
    /// Why submitting stopped, yielded once everything submitted was consumed.
    refused: Option<MpiPoolError>,
    _function: PhantomData<fn() -> (M, F)>,
}

impl<'pool, M: 'static, F: Entry<M>, I: Iterator<Item = F::Args>> MpiIMap<'pool, M, F, I> {
    pub(crate) fn new(
        pool: &'pool MpiPool,
        function: &F,
        input: I,
        chunksize: usize,
        ordered: bool,
    ) -> Self {
        let refused = (chunksize == 0).then_some(MpiPoolError::InvalidChunksize);
        MpiIMap {
            pool,
            function: task::chunk_function(function),
            input: refused.is_none().then_some(input),
            chunksize,
            max_in_flight: CHUNKS_IN_FLIGHT_PER_WORKER * pool.processes(),
            job: Arc::new(StreamJob::new(ordered)),
            sizes: HashMap::new(),
            submitted: 0,
            consumed: 0,
            current: Vec::new().into_iter(),
            failed: None,
            refused,
            _function: PhantomData,
        }
    }

    /// Keeps at most `chunks` chunks submitted and not yet consumed (default: 16 per worker
    /// rank; at least 1).
    #[must_use]
    pub fn max_in_flight(mut self, chunks: usize) -> Self {
        self.max_in_flight = chunks.max(1);
        self
    }

    /// The next result, waiting at most `timeout` for it. A timeout yields
    /// `Some(Err(MpiPoolError::Timeout))` and loses nothing.
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<Result<F::Output, MpiPoolError>> {
        self.next_until(Some(Instant::now() + timeout))
    }

    fn next_until(&mut self, deadline: Option<Instant>) -> Option<Result<F::Output, MpiPoolError>> {
        loop {
            if let Some(value) = self.current.next() {
                return Some(Ok(value));
            }
            if let Some((error, left)) = self.failed.take() {
                if left > 1 {
                    self.failed = Some((error.clone(), left - 1));
                }
                return Some(Err(error));
            }
            self.top_up();
            if self.consumed == self.submitted {
                return self.refused.take().map(Err);
            }
            let (index, chunk) = match self.job.next(self.consumed, deadline) {
                Some(chunk) => chunk,
                None => return Some(Err(MpiPoolError::Timeout)),
            };
            self.consumed += 1;
            let items = self.sizes.remove(&index).unwrap_or(1);
            match chunk {
                Ok(values) => self.current = values.into_iter(),
                Err(error) => self.failed = Some((error, items)),
            }
        }
    }

    /// Submits chunks until `max_in_flight` are outstanding or the input ends.
    fn top_up(&mut self) {
        while self.submitted - self.consumed < self.max_in_flight {
            let Some(input) = self.input.as_mut() else {
                return;
            };
            let items: Vec<F::Args> = input.by_ref().take(self.chunksize).collect();
            if items.is_empty() {
                self.input = None;
                return;
            }
            let sink: Arc<dyn Sink> = self.job.clone();
            let submitted = self
                .pool
                .encode_chunks(self.function, &items, items.len(), self.submitted, &sink)
                .and_then(|chunks| self.pool.enqueue(chunks));
            match submitted {
                Ok(()) => {
                    self.sizes.insert(self.submitted, items.len());
                    self.submitted += 1;
                }
                Err(error) => {
                    self.refused = Some(error);
                    self.input = None;
                }
            }
        }
    }
}

impl<M: 'static, F: Entry<M>, I: Iterator<Item = F::Args>> Iterator for MpiIMap<'_, M, F, I> {
    type Item = Result<F::Output, MpiPoolError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_until(None)
    }
}

impl<M, F: Entry<M>, I> Drop for MpiIMap<'_, M, F, I> {
    fn drop(&mut self) {
        self.job.drop_rest();
    }
}

impl<M, F: Entry<M>, I> std::fmt::Debug for MpiIMap<'_, M, F, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiIMap")
            .field("submitted", &self.submitted)
            .field("consumed", &self.consumed)
            .finish_non_exhaustive()
    }
}
