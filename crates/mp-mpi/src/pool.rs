//! [`MpiPool`]: the pool whose workers are MPI ranks, started on every rank with one call.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mp_core::{Entry, FunctionId};
use parking_lot::Mutex;
use serde::Serialize;

use crate::MpiAsyncResult;
use crate::dispatcher::{Mode, Shared};
use crate::error::MpiPoolError;
use crate::job::{Chunk, CollectJob, Sink};
use crate::session::{self, Role};
use crate::{task, wire};

/// Chunks a worker rank of short tasks may hold by default (see `dispatcher`).
const DEFAULT_PREFETCH: usize = 8;

/// Options of an [`MpiPool`], from [`MpiPool::builder`].
#[derive(Clone, Debug)]
pub struct MpiPoolBuilder {
    prefetch: usize,
}

impl MpiPoolBuilder {
    /// How many chunks a worker rank may hold at once while its chunks are short (default 8,
    /// at least 1; ranks whose chunks take longer than half a millisecond hold at most 2).
    /// More hides rank 0's and the network's latency behind short tasks; fewer lets a long
    /// task hold back fewer others.
    pub fn prefetch(mut self, chunks: usize) -> Self {
        self.prefetch = chunks.max(1);
        self
    }

    /// Starts the pool on every rank: see [`MpiPool::start`].
    pub fn start(self) -> Result<MpiPool, MpiPoolError> {
        let shared = Shared::new();
        let (role, thread) = session::start(shared.clone(), self.prefetch)?;
        match role {
            Role::Root { workers } => Ok(MpiPool {
                shared,
                workers,
                thread: Mutex::new(Some(thread)),
            }),
            Role::Worker => {
                let code = if thread.join().is_ok() { 0 } else { 1 };
                std::process::exit(code)
            }
            Role::RefusedWorker => {
                let _ = thread.join();
                std::process::exit(1)
            }
        }
    }
}

/// A pool of MPI ranks: Python's `multiprocessing.Pool` (mpi4py's `MPIPoolExecutor`) over a
/// cluster, with the API of [`Executor`](crate::Executor), which the local `mp_pool::Pool`
/// implements too.
///
/// Every rank runs the same program and calls [`MpiPool::start`]; rank 0 gets the pool, the
/// other ranks serve its tasks and exit inside `start` when the pool closes. Dropping the pool
/// terminates it (see [`terminate`](MpiPool::terminate)), then waits for the worker ranks to
/// stop and finalises MPI.
pub struct MpiPool {
    pub(crate) shared: Arc<Shared>,
    workers: usize,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for MpiPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiPool")
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

impl MpiPool {
    /// Initialises MPI and starts the pool: the one call of an SPMD program.
    ///
    /// * On rank 0 it returns the pool, whose workers are ranks 1..N.
    /// * On every other rank it **does not return**: the rank serves tasks until rank 0's pool
    ///   is closed, joined, terminated or dropped, then finalises MPI and exits the process
    ///   with code 0. Code before this call runs on every rank; code after it on rank 0 only.
    ///
    /// Errors: [`MpiPoolError::NoWorkerRanks`] when the program runs alone (no `mpirun`, or
    /// `-n 1`; use the local `mp_pool::Pool` then, as the `same_code` example does);
    /// [`MpiPoolError::AlreadyInitialized`] when MPI was initialised before in this process
    /// (MPI allows it once); [`MpiPoolError::MismatchedExecutable`] when some rank runs
    /// another program.
    pub fn start() -> Result<MpiPool, MpiPoolError> {
        Self::builder().start()
    }

    /// Options for a pool.
    pub fn builder() -> MpiPoolBuilder {
        MpiPoolBuilder {
            prefetch: DEFAULT_PREFETCH,
        }
    }

    /// The number of worker ranks (the job's size minus rank 0).
    pub fn processes(&self) -> usize {
        self.workers
    }

    /// Accepts no more tasks; those submitted still run (Python's `close`).
    pub fn close(&self) {
        let mut state = self.shared.state.lock();
        if state.mode == Mode::Open {
            state.mode = Mode::Closed;
        }
        self.shared.wake.notify_all();
    }

    /// Waits for every submitted task to finish and for the worker ranks to stop, then
    /// finalises MPI (Python's `join`). The pool must be closed or terminated first.
    pub fn join(&self) -> Result<(), MpiPoolError> {
        self.join_until(None)
    }

    /// [`join`](Self::join), giving up after `timeout` with [`MpiPoolError::Timeout`] (the
    /// pool is left as it was: join again, or terminate).
    pub fn join_timeout(&self, timeout: Duration) -> Result<(), MpiPoolError> {
        self.join_until(Some(Instant::now() + timeout))
    }

    fn join_until(&self, deadline: Option<Instant>) -> Result<(), MpiPoolError> {
        {
            let mut state = self.shared.state.lock();
            if state.mode == Mode::Open {
                return Err(MpiPoolError::StillOpen);
            }
            while !state.finished {
                match deadline {
                    None => self.shared.finished.wait(&mut state),
                    Some(deadline) => {
                        if self
                            .shared
                            .finished
                            .wait_until(&mut state, deadline)
                            .timed_out()
                            && !state.finished
                        {
                            return Err(MpiPoolError::Timeout);
                        }
                    }
                }
            }
        }
        if let Some(thread) = self.thread.lock().take() {
            thread
                .join()
                .map_err(|_| MpiPoolError::DispatcherFailed("it panicked".into()))?;
        }
        Ok(())
    }

    /// Stops at once (Python's `terminate`): waiting and running tasks fail with
    /// [`MpiPoolError::Terminated`] now. MPI cannot interrupt a task on a remote rank, so
    /// a worker rank finishes the chunks it holds (at most `prefetch`, their results are
    /// dropped) before it stops; [`join`](Self::join) (or dropping the pool) waits for that.
    pub fn terminate(&self) {
        self.shared.state.lock().mode = Mode::Terminated;
        self.shared.wake.notify_all();
    }

    /// Encodes `items` in chunks for `sink`, numbered from `first_index`.
    pub(crate) fn encode_chunks<A: Serialize>(
        &self,
        function: FunctionId,
        items: &[A],
        chunksize: usize,
        first_index: usize,
        sink: &Arc<dyn Sink>,
    ) -> Result<Vec<Chunk>, MpiPoolError> {
        items
            .chunks(chunksize)
            .enumerate()
            .map(|(i, chunk)| {
                let key = self.shared.next_key.fetch_add(1, Ordering::Relaxed);
                let mut message = wire::task_header(key, function);
                postcard::to_io(chunk, &mut message)
                    .map_err(|e| MpiPoolError::EncodeArguments(e.to_string()))?;
                if message.len() > wire::MAX_MESSAGE {
                    return Err(MpiPoolError::EncodeArguments(format!(
                        "a chunk of {} bytes exceeds MPI's message limit of {} bytes",
                        message.len(),
                        wire::MAX_MESSAGE
                    )));
                }
                Ok(Chunk {
                    key,
                    index: first_index + i,
                    message,
                    sink: sink.clone(),
                })
            })
            .collect()
    }

    /// Queues chunks for the dispatcher.
    pub(crate) fn enqueue(&self, chunks: Vec<Chunk>) -> Result<(), MpiPoolError> {
        let mut state = self.shared.state.lock();
        match state.mode {
            Mode::Open => {}
            Mode::Closed => return Err(MpiPoolError::Closed),
            Mode::Terminated => return Err(MpiPoolError::Terminated),
        }
        state.queue.extend(chunks);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Submits `items` as one collecting job (`map_async`, `apply_async`).
    pub(crate) fn collect<M: 'static, F: Entry<M>, I, T>(
        &self,
        function: &F,
        items: I,
        chunksize: Option<usize>,
        finish: fn(Vec<F::Output>) -> Option<T>,
    ) -> Result<MpiAsyncResult<T>, MpiPoolError>
    where
        I: IntoIterator<Item = F::Args>,
        T: Send + 'static,
    {
        if chunksize == Some(0) {
            return Err(MpiPoolError::InvalidChunksize);
        }
        let items: Vec<F::Args> = items.into_iter().collect();
        let chunksize = chunksize.unwrap_or_else(|| default_chunksize(items.len(), self.workers));
        let (sender, result) = MpiAsyncResult::pending();
        let job = CollectJob::<F::Output, T>::new(items.len().div_ceil(chunksize), sender, finish);
        let sink: Arc<dyn Sink> = job;
        let chunks =
            self.encode_chunks(task::chunk_function(function), &items, chunksize, 0, &sink)?;
        self.enqueue(chunks)?;
        Ok(result)
    }
}

/// Python's default chunk size for `map`: about four chunks per worker.
fn default_chunksize(items: usize, workers: usize) -> usize {
    items.div_ceil(4 * workers.max(1)).max(1)
}

impl Drop for MpiPool {
    fn drop(&mut self) {
        self.terminate();
        let _ = self.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_chunksize_is_pythons() {
        assert_eq!(default_chunksize(0, 3), 1);
        assert_eq!(default_chunksize(100, 3), 9);
        assert_eq!(default_chunksize(12, 3), 1);
        assert_eq!(default_chunksize(13, 3), 2);
    }
}
