//! [`IMap`]: the lazy iterator of `imap` and `imap_unordered`.

use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use mp_core::{Entry, FunctionId};

use crate::error::{PoolError, TaskTypes, TryError};
use crate::job::{ChunkItems, Job, StreamJob, panic_message};
use crate::pool::{Pool, encode};
use crate::scheduler::{Chunk, Limits};
use crate::worker;

/// Chunks kept in flight per worker process by default.
const CHUNKS_IN_FLIGHT_PER_PROCESS: usize = 16;

/// The results of [`Pool::imap`] (input order) or [`Pool::imap_unordered`] (completion
/// order), one `Result` per input item.
///
/// ```
/// use mp_pool::Pool;
///
/// let pool = Pool::new(2)?;
/// // An endless input: items are read only as results are consumed.
/// let first: Vec<u64> = pool
///     .chunksize(4)
///     .imap(|x: u64| x * 3, 0..)
///     .take(10)
///     .collect::<Result<_, _>>()?;
/// assert_eq!(first, (0..10).map(|x| x * 3).collect::<Vec<_>>());
/// # Ok::<(), mp_pool::PoolError>(())
/// ```
///
/// At most [`max_in_flight`](IMap::max_in_flight) chunks are submitted and not yet consumed
/// (backpressure): memory stays bounded whatever the length of the input. A failed chunk
/// yields one error per item it held, and iteration goes on with the next chunk. If the pool
/// stops accepting tasks (closed, terminated, broken), or the input iterator panics
/// ([`PoolError::InputPanicked`]), the iterator yields the results of everything read
/// before (in order, for `imap`), then that error once, then ends; the pool stays usable.
/// As in Python, the chunk being read when the input failed fails as a whole. Dropping the
/// iterator drops the chunks that have not started.
///
/// Its `size_hint` is exact while the input's is, so progress bars know the length (see
/// the `progress` example of the `multiproc` crate).
pub struct IMap<'pool, M, F: Entry<M>, I> {
    pool: &'pool Pool,
    function: FunctionId,
    types: TaskTypes,
    input: Option<I>,
    chunksize: usize,
    limits: Limits,
    max_in_flight: usize,
    job: Arc<StreamJob<F::Output>>,
    /// Chunks submitted, and chunks consumed (the index of the next one, when ordered).
    submitted: usize,
    consumed: usize,
    /// Items in the chunks submitted and not consumed.
    items_in_flight: usize,
    current: std::vec::IntoIter<F::Output>,
    /// A failed chunk's error, and how many more of its items to report.
    failed: Option<(PoolError, usize)>,
    /// Why submitting stopped, yielded once everything submitted was consumed.
    refused: Option<PoolError>,
    _function: PhantomData<fn() -> (M, F)>,
}

impl<'pool, M: 'static, F: Entry<M>, I: Iterator<Item = F::Args>> IMap<'pool, M, F, I> {
    pub(crate) fn new(
        pool: &'pool Pool,
        function: &F,
        input: I,
        chunksize: usize,
        limits: Limits,
        ordered: bool,
    ) -> Self {
        let refused = (chunksize == 0).then_some(PoolError::InvalidChunksize);
        IMap {
            pool,
            function: worker::chunk_function(function),
            types: TaskTypes::of::<M, F>(),
            input: refused.is_none().then_some(input),
            chunksize,
            limits,
            max_in_flight: CHUNKS_IN_FLIGHT_PER_PROCESS * pool.processes(),
            job: Arc::new(StreamJob::new(ordered)),
            submitted: 0,
            consumed: 0,
            items_in_flight: 0,
            current: Vec::new().into_iter(),
            failed: None,
            refused,
            _function: PhantomData,
        }
    }

    /// Keeps at most `chunks` chunks submitted and not yet consumed (default: 16 per worker
    /// process; at least 1).
    #[must_use]
    pub fn max_in_flight(mut self, chunks: usize) -> Self {
        self.max_in_flight = chunks.max(1);
        self
    }

    /// The next result, waiting at most `timeout` for it (Python's `next(timeout)`).
    /// A timeout yields `Some(Err(PoolError::Timeout))` and loses nothing: the same result is
    /// waited for again by the next call.
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<Result<F::Output, PoolError>> {
        self.next_until(Some(Instant::now() + timeout))
    }

    fn next_until(&mut self, deadline: Option<Instant>) -> Option<Result<F::Output, PoolError>> {
        self.step(|job, index| job.next(index, deadline))
            .unwrap_or(Some(Err(PoolError::Timeout)))
    }

    /// The next item, getting the chunk it needs from `fetch`: `None` if `fetch` has
    /// nothing yet (a timeout, or a stream not ready), `Some(None)` at the end.
    #[allow(clippy::option_option)]
    fn step(
        &mut self,
        mut fetch: impl FnMut(&StreamJob<F::Output>, usize) -> Option<ChunkItems<F::Output>>,
    ) -> Option<Option<Result<F::Output, PoolError>>> {
        loop {
            if let Some(value) = self.current.next() {
                return Some(Some(Ok(value)));
            }
            if let Some((error, left)) = self.failed.take() {
                if left > 1 {
                    self.failed = Some((error.clone(), left - 1));
                }
                return Some(Some(Err(error)));
            }
            self.top_up();
            if self.consumed == self.submitted {
                return Some(self.refused.take().map(Err));
            }
            let chunk: ChunkItems<F::Output> = fetch(&self.job, self.consumed)?;
            self.consumed += 1;
            match chunk {
                Ok(values) => {
                    self.items_in_flight -= values.len();
                    self.current = values.into_iter();
                }
                Err((error, items)) => {
                    self.items_in_flight -= items;
                    self.failed = Some((error, items));
                }
            }
        }
    }

    /// Submits chunks until `max_in_flight` are outstanding. Refills only once half the
    /// window is free, so that chunks travel in batches rather than one per result.
    fn top_up(&mut self) {
        let outstanding = self.submitted - self.consumed;
        if outstanding > 0 && outstanding >= self.max_in_flight.div_ceil(2) {
            return;
        }
        let Some(input) = &mut self.input else {
            return;
        };
        let sink: Arc<dyn Job> = self.job.clone();
        let mut chunks = Vec::new();
        let mut refused = None;
        let mut items_read = 0;
        while outstanding + chunks.len() < self.max_in_flight {
            let chunksize = self.chunksize;
            // The input is the caller's code: if it panics, what was read before is kept.
            let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                input.by_ref().take(chunksize).collect::<Vec<F::Args>>()
            }));
            let items = match read {
                Ok(items) => items,
                Err(panic) => {
                    let message = panic_message(&*panic);
                    tracing::debug!(%message, "imap input panicked");
                    refused = Some(PoolError::InputPanicked(message));
                    break;
                }
            };
            if items.is_empty() {
                self.input = None;
                break;
            }
            match encode(&items, &self.pool.shared.spares) {
                Ok(payload) => {
                    items_read += items.len();
                    chunks.push(Chunk {
                        job: sink.clone(),
                        index: self.submitted + chunks.len(),
                        first_item: (self.submitted + chunks.len()) * chunksize,
                        items: items.len(),
                        function: self.function,
                        types: self.types,
                        payload,
                        limits: self.limits,
                    });
                }
                Err(error) => {
                    refused = Some(error);
                    break;
                }
            }
        }
        let count = chunks.len();
        if count > 0 {
            match self.pool.enqueue(chunks) {
                Ok(()) => {
                    self.submitted += count;
                    self.items_in_flight += items_read;
                }
                Err(error) => refused = Some(error),
            }
        }
        if let Some(error) = refused {
            self.input = None;
            self.refused = Some(error);
        }
    }
}

impl<M: 'static, F: Entry<M>, I: Iterator<Item = F::Args>> Iterator for IMap<'_, M, F, I> {
    type Item = Result<F::Output, PoolError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_until(None)
    }

    /// Exact while the input's is: the results on their way plus the input's length.
    fn size_hint(&self) -> (usize, Option<usize>) {
        let known = self.current.len()
            + self.failed.as_ref().map_or(0, |(_, left)| *left)
            + self.items_in_flight
            + usize::from(self.refused.is_some());
        match &self.input {
            None => (known, Some(known)),
            Some(input) => {
                let (low, high) = input.size_hint();
                (
                    known.saturating_add(low),
                    high.and_then(|high| known.checked_add(high)),
                )
            }
        }
    }
}

/// `IMap` as a [`Stream`](futures_core::Stream), for async code (`while let Some(x) =
/// stream.next().await`). Runtime-agnostic: the pool's result thread wakes the task when a
/// result arrives. Reading the input iterator (to keep `max_in_flight` chunks submitted)
/// happens inside `poll_next`, so it should not block.
impl<M: 'static, F: Entry<M>, I: Iterator<Item = F::Args>> futures_core::Stream
    for IMap<'_, M, F, I>
{
    type Item = Result<F::Output, PoolError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let waker = cx.waker();
        match self
            .get_mut()
            .step(|job, index| job.poll_next(index, waker))
        {
            Some(item) => Poll::Ready(item),
            None => Poll::Pending,
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        Iterator::size_hint(self)
    }
}

// Nothing in an `IMap` is pinned structurally: moving it between polls is fine.
impl<M, F: Entry<M>, I> Unpin for IMap<'_, M, F, I> {}

impl<M, F: Entry<M>, I> Drop for IMap<'_, M, F, I> {
    fn drop(&mut self) {
        self.job.cancel();
    }
}

/// The results of [`Pool::try_imap`] / [`Pool::try_imap_unordered`]: an [`IMap`] over a
/// function returning `Result<T, E>`, whose `Err`s come as [`TryError::Task`] (carrying `E`
/// itself) and the pool's failures as [`TryError::Pool`]. As with `imap`, iteration goes on
/// after an error.
pub struct TryIMap<'pool, M, F: Entry<M>, I> {
    inner: IMap<'pool, M, F, I>,
}

impl<'pool, M, F: Entry<M>, I> TryIMap<'pool, M, F, I> {
    pub(crate) fn new(inner: IMap<'pool, M, F, I>) -> Self {
        TryIMap { inner }
    }
}

/// `Result<Result<T, E>, PoolError>` as one `Result`.
fn flatten<T, E>(item: Result<Result<T, E>, PoolError>) -> Result<T, TryError<E>> {
    match item {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(TryError::Task(error)),
        Err(error) => Err(TryError::Pool(error)),
    }
}

impl<'pool, M: 'static, F, I, T, E> TryIMap<'pool, M, F, I>
where
    F: Entry<M, Output = Result<T, E>>,
    I: Iterator<Item = F::Args>,
{
    /// See [`IMap::max_in_flight`].
    #[must_use]
    pub fn max_in_flight(self, chunks: usize) -> Self {
        TryIMap {
            inner: self.inner.max_in_flight(chunks),
        }
    }

    /// See [`IMap::next_timeout`] (a timeout is `TryError::Pool(PoolError::Timeout)`).
    pub fn next_timeout(&mut self, timeout: Duration) -> Option<Result<T, TryError<E>>> {
        self.inner.next_timeout(timeout).map(flatten)
    }
}

impl<M: 'static, F, I, T, E> Iterator for TryIMap<'_, M, F, I>
where
    F: Entry<M, Output = Result<T, E>>,
    I: Iterator<Item = F::Args>,
{
    type Item = Result<T, TryError<E>>;

    fn next(&mut self) -> Option<Self::Item> {
        self.inner.next().map(flatten)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.inner.size_hint()
    }
}

impl<M: 'static, F, I, T, E> futures_core::Stream for TryIMap<'_, M, F, I>
where
    F: Entry<M, Output = Result<T, E>>,
    I: Iterator<Item = F::Args>,
{
    type Item = Result<T, TryError<E>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.get_mut().inner)
            .poll_next(cx)
            .map(|item| item.map(flatten))
    }
}

impl<M, F: Entry<M>, I> std::fmt::Debug for TryIMap<'_, M, F, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl<M, F: Entry<M>, I> std::fmt::Debug for IMap<'_, M, F, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IMap")
            .field("chunksize", &self.chunksize)
            .field("submitted", &self.submitted)
            .field("consumed", &self.consumed)
            .finish_non_exhaustive()
    }
}
