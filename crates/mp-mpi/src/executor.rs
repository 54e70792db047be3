//! [`Executor`]: the API shared by the local `mp_pool::Pool` and the [`MpiPool`], so that code
//! written once runs on either.

use std::time::Duration;

use mp_core::Entry;
use mp_pool::{AsyncResult, IMap, Pool, PoolError, ResultError};

use crate::MpiAsyncResult;
use crate::error::MpiPoolError;
use crate::imap::MpiIMap;
use crate::pool::MpiPool;

/// A pool of workers: `map`, `imap`, `imap_unordered`, `starmap`, `apply`, `apply_async`,
/// `submit`, chunk sizes, callbacks, `close`/`join`/`terminate` and the `_timeout` variants,
/// the same on one machine ([`mp_pool::Pool`]) and over MPI ranks ([`MpiPool`]).
///
/// ```
/// use mp_mpi::{Executor, Pending};
///
/// fn square(x: u64) -> u64 {
///     x * x
/// }
///
/// /// Runs unchanged on a local pool or on MPI ranks.
/// fn sum_of_squares<P: Executor>(pool: &P, n: u64) -> Result<u64, P::Error> {
///     let squares = pool.chunksize(64).map(square, 0..n)?;
///     let last = pool.apply_async(square, n)?.get()?;
///     Ok(squares.iter().sum::<u64>() + last)
/// }
///
/// let local = mp_pool::Pool::new(2)?;
/// assert_eq!(sum_of_squares(&local, 3)?, 14);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// The required methods are the primitives; the Python names are provided on top of them.
pub trait Executor: Sized {
    /// Why a task failed.
    type Error: std::error::Error + Clone + Send + Sync + 'static;
    /// The handle of a submitted task (Python's `AsyncResult`, a `concurrent.futures` future).
    type AsyncResult<T: Send + 'static>: Pending<T, Error = Self::Error>;
    /// The lazy iterator of `imap` and `imap_unordered`.
    type IMap<'pool, M: 'static, F: Entry<M>, I: Iterator<Item = F::Args>>: ResultStream<
        Item = Result<F::Output, Self::Error>,
    >
    where
        Self: 'pool;

    /// The number of workers.
    fn processes(&self) -> usize;

    /// Submits `function(args)` and returns a handle to its result (Python's `apply_async`).
    fn apply_async<M: 'static, F: Entry<M>>(
        &self,
        function: F,
        args: F::Args,
    ) -> Result<Self::AsyncResult<F::Output>, Self::Error>;

    /// `map_async` with an explicit chunk size (`None`: Python's default, about four chunks
    /// per worker).
    fn map_async_chunked<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        &self,
        function: F,
        items: I,
        chunksize: Option<usize>,
    ) -> Result<Self::AsyncResult<Vec<F::Output>>, Self::Error>;

    /// `imap` (`ordered`) or `imap_unordered` with an explicit chunk size.
    fn imap_chunked<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        &self,
        function: F,
        items: I,
        chunksize: usize,
        ordered: bool,
    ) -> Self::IMap<'_, M, F, I::IntoIter>;

    /// Accepts no more tasks; those submitted still run.
    fn close(&self);

    /// Waits for the submitted tasks and the workers to end; the pool must be closed first.
    fn join(&self) -> Result<(), Self::Error>;

    /// [`join`](Self::join), giving up after `timeout` (the pool is left as it was).
    fn join_timeout(&self, timeout: Duration) -> Result<(), Self::Error>;

    /// Stops: unfinished tasks fail.
    fn terminate(&self);

    /// Runs `function(args)` on a worker and returns its result (Python's `apply`).
    fn apply<M: 'static, F: Entry<M>>(
        &self,
        function: F,
        args: F::Args,
    ) -> Result<F::Output, Self::Error> {
        self.apply_async(function, args)?.get()
    }

    /// `ProcessPoolExecutor.submit` / mpi4py's `MPIPoolExecutor.submit`: the same as
    /// [`apply_async`](Self::apply_async).
    fn submit<M: 'static, F: Entry<M>>(
        &self,
        function: F,
        args: F::Args,
    ) -> Result<Self::AsyncResult<F::Output>, Self::Error> {
        self.apply_async(function, args)
    }

    /// The results of `function` on every item, in input order (Python's `map`).
    fn map<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        &self,
        function: F,
        items: I,
    ) -> Result<Vec<F::Output>, Self::Error> {
        self.map_async_chunked(function, items, None)?.get()
    }

    /// [`map`](Self::map) without waiting (Python's `map_async`).
    fn map_async<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        &self,
        function: F,
        items: I,
    ) -> Result<Self::AsyncResult<Vec<F::Output>>, Self::Error> {
        self.map_async_chunked(function, items, None)
    }

    /// Python's `starmap`: a Rust function of several values takes a tuple, so this is
    /// [`map`](Self::map) over tuples.
    fn starmap<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        &self,
        function: F,
        items: I,
    ) -> Result<Vec<F::Output>, Self::Error> {
        self.map(function, items)
    }

    /// Python's `starmap_async`: [`map_async`](Self::map_async) over tuples.
    fn starmap_async<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        &self,
        function: F,
        items: I,
    ) -> Result<Self::AsyncResult<Vec<F::Output>>, Self::Error> {
        self.map_async(function, items)
    }

    /// A lazy iterator of the results in input order (Python's `imap`, chunk size 1).
    fn imap<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        &self,
        function: F,
        items: I,
    ) -> Self::IMap<'_, M, F, I::IntoIter> {
        self.imap_chunked(function, items, 1, true)
    }

    /// [`imap`](Self::imap) in completion order (Python's `imap_unordered`).
    fn imap_unordered<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        &self,
        function: F,
        items: I,
    ) -> Self::IMap<'_, M, F, I::IntoIter> {
        self.imap_chunked(function, items, 1, false)
    }

    /// The operations that take Python's `chunksize=`: `pool.chunksize(10).map(f, items)`.
    fn chunksize(&self, chunksize: usize) -> Chunked<'_, Self> {
        Chunked {
            pool: self,
            chunksize,
        }
    }
}

/// The handle of a submitted task: [`mp_pool::AsyncResult`] (of a [`Pool`] or, as
/// [`MpiAsyncResult`], of an [`MpiPool`]).
pub trait Pending<T>: Sized {
    /// Why the task failed.
    type Error;
    /// Waits for the outcome and moves the value out.
    fn get(&self) -> Result<T, Self::Error>;
    /// [`get`](Self::get), giving up after `timeout` (nothing is lost).
    fn get_timeout(&self, timeout: Duration) -> Result<T, Self::Error>;
    /// Waits until the outcome is known.
    fn wait(&self);
    /// Waits at most `timeout`; returns whether the outcome is known.
    fn wait_timeout(&self, timeout: Duration) -> bool;
    /// Whether the outcome is known.
    fn ready(&self) -> bool;
    /// Whether the task succeeded, once known.
    fn successful(&self) -> Option<bool>;
    /// Calls `callback` with the value on success (Python's `callback=`).
    #[must_use]
    fn callback(self, callback: impl FnOnce(&T) + Send + 'static) -> Self;
    /// Calls `callback` with the error on failure (Python's `error_callback=`).
    #[must_use]
    fn error_callback(self, callback: impl FnOnce(&Self::Error) + Send + 'static) -> Self;
}

/// The iterator of `imap`: an [`Iterator`] with a bounded wait.
pub trait ResultStream: Iterator {
    /// The next item, waiting at most `timeout` (a timeout is an error item; nothing is lost).
    fn next_timeout(&mut self, timeout: Duration) -> Option<Self::Item>;
}

/// An [`Executor`] with a chunk size, from [`Executor::chunksize`].
#[derive(Debug)]
pub struct Chunked<'pool, P> {
    pool: &'pool P,
    chunksize: usize,
}

impl<P> Clone for Chunked<'_, P> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<P> Copy for Chunked<'_, P> {}

impl<'pool, P: Executor> Chunked<'pool, P> {
    /// [`Executor::map`] with this chunk size.
    pub fn map<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        self,
        function: F,
        items: I,
    ) -> Result<Vec<F::Output>, P::Error> {
        self.map_async(function, items)?.get()
    }

    /// [`Executor::map_async`] with this chunk size.
    pub fn map_async<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        self,
        function: F,
        items: I,
    ) -> Result<P::AsyncResult<Vec<F::Output>>, P::Error> {
        self.pool
            .map_async_chunked(function, items, Some(self.chunksize))
    }

    /// [`Executor::starmap`] with this chunk size.
    pub fn starmap<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        self,
        function: F,
        items: I,
    ) -> Result<Vec<F::Output>, P::Error> {
        self.map(function, items)
    }

    /// [`Executor::starmap_async`] with this chunk size.
    pub fn starmap_async<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        self,
        function: F,
        items: I,
    ) -> Result<P::AsyncResult<Vec<F::Output>>, P::Error> {
        self.map_async(function, items)
    }

    /// [`Executor::imap`] with this chunk size.
    pub fn imap<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        self,
        function: F,
        items: I,
    ) -> P::IMap<'pool, M, F, I::IntoIter> {
        self.pool
            .imap_chunked(function, items, self.chunksize, true)
    }

    /// [`Executor::imap_unordered`] with this chunk size.
    pub fn imap_unordered<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        self,
        function: F,
        items: I,
    ) -> P::IMap<'pool, M, F, I::IntoIter> {
        self.pool
            .imap_chunked(function, items, self.chunksize, false)
    }
}

impl Executor for Pool {
    type Error = PoolError;
    type AsyncResult<T: Send + 'static> = AsyncResult<T>;
    type IMap<'pool, M: 'static, F: Entry<M>, I: Iterator<Item = F::Args>> = IMap<'pool, M, F, I>;

    fn processes(&self) -> usize {
        Pool::processes(self)
    }

    fn apply_async<M: 'static, F: Entry<M>>(
        &self,
        function: F,
        args: F::Args,
    ) -> Result<AsyncResult<F::Output>, PoolError> {
        Pool::apply_async(self, function, args)
    }

    fn map_async_chunked<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        &self,
        function: F,
        items: I,
        chunksize: Option<usize>,
    ) -> Result<AsyncResult<Vec<F::Output>>, PoolError> {
        match chunksize {
            None => Pool::map_async(self, function, items),
            Some(chunksize) => Pool::chunksize(self, chunksize).map_async(function, items),
        }
    }

    fn imap_chunked<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        &self,
        function: F,
        items: I,
        chunksize: usize,
        ordered: bool,
    ) -> IMap<'_, M, F, I::IntoIter> {
        let chunked = Pool::chunksize(self, chunksize);
        if ordered {
            chunked.imap(function, items)
        } else {
            chunked.imap_unordered(function, items)
        }
    }

    fn close(&self) {
        Pool::close(self);
    }

    fn join(&self) -> Result<(), PoolError> {
        Pool::join(self)
    }

    fn join_timeout(&self, timeout: Duration) -> Result<(), PoolError> {
        Pool::join_timeout(self, timeout)
    }

    fn terminate(&self) {
        Pool::terminate(self);
    }
}

impl<T, E: ResultError> Pending<T> for AsyncResult<T, E> {
    type Error = E;
    fn get(&self) -> Result<T, E> {
        AsyncResult::get(self)
    }
    fn get_timeout(&self, timeout: Duration) -> Result<T, E> {
        AsyncResult::get_timeout(self, timeout)
    }
    fn wait(&self) {
        AsyncResult::wait(self);
    }
    fn wait_timeout(&self, timeout: Duration) -> bool {
        AsyncResult::wait_timeout(self, timeout)
    }
    fn ready(&self) -> bool {
        AsyncResult::ready(self)
    }
    fn successful(&self) -> Option<bool> {
        AsyncResult::successful(self)
    }
    fn callback(self, callback: impl FnOnce(&T) + Send + 'static) -> Self {
        AsyncResult::callback(self, callback)
    }
    fn error_callback(self, callback: impl FnOnce(&E) + Send + 'static) -> Self {
        AsyncResult::error_callback(self, callback)
    }
}

impl<M: 'static, F: Entry<M>, I: Iterator<Item = F::Args>> ResultStream for IMap<'_, M, F, I> {
    fn next_timeout(&mut self, timeout: Duration) -> Option<Self::Item> {
        IMap::next_timeout(self, timeout)
    }
}

impl Executor for MpiPool {
    type Error = MpiPoolError;
    type AsyncResult<T: Send + 'static> = MpiAsyncResult<T>;
    type IMap<'pool, M: 'static, F: Entry<M>, I: Iterator<Item = F::Args>> =
        MpiIMap<'pool, M, F, I>;

    fn processes(&self) -> usize {
        MpiPool::processes(self)
    }

    fn apply_async<M: 'static, F: Entry<M>>(
        &self,
        function: F,
        args: F::Args,
    ) -> Result<MpiAsyncResult<F::Output>, MpiPoolError> {
        self.collect(&function, std::iter::once(args), Some(1), |values| {
            values.into_iter().next()
        })
    }

    fn map_async_chunked<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        &self,
        function: F,
        items: I,
        chunksize: Option<usize>,
    ) -> Result<MpiAsyncResult<Vec<F::Output>>, MpiPoolError> {
        self.collect(&function, items, chunksize, Some)
    }

    fn imap_chunked<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        &self,
        function: F,
        items: I,
        chunksize: usize,
        ordered: bool,
    ) -> MpiIMap<'_, M, F, I::IntoIter> {
        MpiIMap::new(self, &function, items.into_iter(), chunksize, ordered)
    }

    fn close(&self) {
        MpiPool::close(self);
    }

    fn join(&self) -> Result<(), MpiPoolError> {
        MpiPool::join(self)
    }

    fn join_timeout(&self, timeout: Duration) -> Result<(), MpiPoolError> {
        MpiPool::join_timeout(self, timeout)
    }

    fn terminate(&self) {
        MpiPool::terminate(self);
    }
}

impl<M: 'static, F: Entry<M>, I: Iterator<Item = F::Args>> ResultStream for MpiIMap<'_, M, F, I> {
    fn next_timeout(&mut self, timeout: Duration) -> Option<Self::Item> {
        MpiIMap::next_timeout(self, timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::same_api::same_api;

    #[test]
    fn the_local_pool_is_an_executor() {
        let pool = Pool::new(2).unwrap();
        same_api(&pool).unwrap();
        Executor::close(&pool);
        Executor::join_timeout(&pool, Duration::from_secs(30)).unwrap();
    }
}
