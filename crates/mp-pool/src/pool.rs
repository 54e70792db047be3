//! [`Pool`] and [`PoolBuilder`]: Python's `multiprocessing.Pool`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mp_core::{Entry, StartMethod};
use parking_lot::{Condvar, Mutex};
use serde::Serialize;

use crate::collector;
use crate::error::{PoolError, ResultError, TaskTypes, TryError};
use crate::imap::{IMap, TryIMap};
use crate::job::{CollectJob, Job, deliver, no_task_errors, panic_message};
use crate::result::{AsyncResult, Completion};
use crate::scheduler::{Chunk, Limits, Mode, Scheduler, default_chunksize};
use crate::supervisor::{self, Commands};
use crate::transport::{Payload, Report, ReportSender, Spares, report_link};
use crate::worker::{self, Launcher};

/// Submit chunks to the scheduler in groups of about this many encoded bytes...
const SUBMIT_BYTES: usize = 64 * 1024;
/// ...or this many chunks, whichever comes first.
const SUBMIT_CHUNKS: usize = 256;

/// What every worker of a pool is started with.
pub(crate) struct WorkerConfig {
    pub start_method: StartMethod,
    pub name_prefix: String,
    pub launcher: Launcher,
    pub max_tasks: Option<usize>,
}

/// State shared by the pool handle, its result thread and its supervisor thread.
pub(crate) struct Shared {
    pub scheduler: Mutex<Scheduler>,
    /// Notified (with `scheduler` locked) when no chunk waits or runs, and when workers
    /// become ready or exit.
    pub idle: Condvar,
    pub commands: Arc<Commands>,
    /// The pool's own sender on the report link, for notices to the result thread.
    pub reports: ReportSender,
    pub config: WorkerConfig,
    pub next_worker: AtomicU64,
    /// Buffers of large arguments, reused (see [`Spares`]).
    pub spares: Arc<Spares>,
}

impl Shared {
    /// Fails every chunk, waiting or running, with [`PoolError::Terminated`] and has the
    /// supervisor kill the workers. Idempotent.
    pub(crate) fn terminate(&self) {
        let deliveries = self.scheduler.lock().terminate();
        self.idle.notify_all();
        self.commands.stop(true);
        deliver(deliveries);
    }
}

/// Runs the body of one of the pool's threads. If it panics (a bug), the pool is terminated:
/// nobody would deliver results or watch workers any more, and waiting forever is the one
/// thing a pool must not do.
fn run_guarded(shared: Arc<Shared>, thread: &'static str, body: impl FnOnce(Arc<Shared>)) {
    let guarded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(shared.clone())));
    if guarded.is_err() {
        tracing::error!(thread, "pool thread panicked; terminating the pool");
        shared.terminate();
    }
}

struct Threads {
    supervisor: JoinHandle<()>,
    collector: JoinHandle<()>,
}

/// Options of a [`Pool`] (Python's `Pool(processes, initializer, initargs,
/// maxtasksperchild)`, plus the start method and the workers' names).
///
/// ```
/// use mp_pool::Pool;
/// use mp_core::StartMethod;
///
/// fn setup(greeting: String) { assert_eq!(greeting, "hello"); }
///
/// let pool = Pool::builder()
///     .processes(2)
///     .initializer(setup, "hello".to_string())
///     .max_tasks_per_child(100)
///     .start_method(StartMethod::ForkServer)
///     .name_prefix("Cruncher")
///     .build()?;
/// assert_eq!(pool.map(|x: u32| x + 1, [1, 2, 3])?, vec![2, 3, 4]);
/// # Ok::<(), mp_pool::PoolError>(())
/// ```
#[must_use = "a PoolBuilder does nothing until .build() is called"]
pub struct PoolBuilder {
    processes: Option<usize>,
    launcher: Launcher,
    max_tasks: Option<usize>,
    start_method: Option<StartMethod>,
    name_prefix: String,
    task_timeout: Option<Duration>,
}

impl Default for PoolBuilder {
    fn default() -> Self {
        PoolBuilder {
            processes: None,
            launcher: Launcher::plain(),
            max_tasks: None,
            start_method: None,
            name_prefix: "PoolWorker".into(),
            task_timeout: None,
        }
    }
}

impl PoolBuilder {
    /// The number of worker processes (default: [`mp_core::cpu_count`]).
    pub fn processes(mut self, processes: usize) -> Self {
        self.processes = Some(processes);
        self
    }

    /// A function each worker runs once, with a clone of `args`, before its first task
    /// (Python's `initializer` and `initargs`). The arguments travel with the worker's own,
    /// so they may hold handles of mp-ipc primitives (queues, locks, shared memory), which
    /// arrive as the same objects. If the initializer fails (panics, or kills its process),
    /// the pool does not retry it: the pool is broken, and tasks fail with
    /// [`PoolError::InitializerFailed`] carrying the panic's message and location.
    pub fn initializer<M: 'static, F: Entry<M>>(mut self, function: F, args: F::Args) -> Self
    where
        F::Args: Clone,
    {
        self.launcher = Launcher::with_initializer(function, args);
        self
    }

    /// Replace each worker after it has run this many chunks (Python's `maxtasksperchild`;
    /// default: never).
    pub fn max_tasks_per_child(mut self, tasks: usize) -> Self {
        self.max_tasks = Some(tasks);
        self
    }

    /// How workers are started (default: [`mp_core::get_start_method`]).
    pub fn start_method(mut self, method: StartMethod) -> Self {
        self.start_method = Some(method);
        self
    }

    /// Workers are named `<prefix>-<n>` (default prefix: `PoolWorker`).
    pub fn name_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.name_prefix = prefix.into();
        self
    }

    /// The pool-wide time limit of every task (pebble's `schedule(timeout=)` and
    /// `map(timeout=)`), counted from the moment a worker starts it; override it per call
    /// with [`Pool::timeout`]. A task running longer fails with
    /// [`PoolError::TaskTimedOut`]: its worker is killed and replaced, and the pool goes
    /// on. For `map`, the limit is per chunk of tasks (per task with `chunksize(1)`).
    pub fn task_timeout(mut self, timeout: Duration) -> Self {
        self.task_timeout = Some(timeout);
        self
    }

    /// Creates the pool. Workers start in the background: the pool accepts tasks at once
    /// and runs them as workers become ready.
    pub fn build(self) -> Result<Pool, PoolError> {
        let processes = self.processes.unwrap_or_else(mp_core::cpu_count);
        if processes == 0 {
            return Err(PoolError::NoProcesses);
        }
        if self.max_tasks == Some(0) {
            return Err(PoolError::InvalidMaxTasks);
        }
        let start_failed = |e: &dyn std::fmt::Display| PoolError::StartFailed(e.to_string());
        let commands = Commands::new().map_err(|e| start_failed(&e))?;
        let (reports, receiver) = report_link().map_err(|e| start_failed(&e))?;
        let shared = Arc::new(Shared {
            scheduler: Mutex::new(Scheduler::new(
                processes,
                self.max_tasks,
                self.launcher.has_initializer(),
                commands.clone(),
            )),
            idle: Condvar::new(),
            commands,
            reports,
            config: WorkerConfig {
                start_method: self.start_method.unwrap_or_else(mp_core::get_start_method),
                name_prefix: self.name_prefix,
                launcher: self.launcher,
                max_tasks: self.max_tasks,
            },
            next_worker: AtomicU64::new(1),
            spares: Arc::default(),
        });
        let collector = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("mp-pool-results".into())
                .spawn(move || {
                    run_guarded(shared, "results", |shared| collector::run(shared, receiver))
                })
                .map_err(|e| start_failed(&e))?
        };
        let supervisor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("mp-pool-supervisor".into())
                .spawn(move || run_guarded(shared, "supervisor", supervisor::run))
        };
        let supervisor = match supervisor {
            Ok(handle) => handle,
            Err(e) => {
                let _ = shared.reports.send(Report::Shutdown);
                let _ = collector.join();
                return Err(start_failed(&e));
            }
        };
        shared.scheduler.lock().request_workers();
        tracing::debug!(processes, method = %shared.config.start_method, "pool created");
        Ok(Pool {
            shared,
            processes,
            task_timeout: self.task_timeout,
            threads: Mutex::new(Some(Threads {
                supervisor,
                collector,
            })),
        })
    }
}

/// A pool of worker processes (Python's `multiprocessing.Pool`).
///
/// ```
/// use mp_pool::Pool;
///
/// fn square(x: u64) -> u64 {
///     x * x
/// }
///
/// let pool = Pool::new(2)?;
/// assert_eq!(pool.map(square, [1, 2, 3, 4, 5])?, vec![1, 4, 9, 16, 25]);
/// assert_eq!(pool.apply(square, 12)?, 144);
/// let lengths: Vec<usize> = pool.imap(|s: String| s.len(), ["a".to_string(), "bcd".into()])
///     .collect::<Result<_, _>>()?;
/// assert_eq!(lengths, vec![1, 3]);
/// # Ok::<(), mp_pool::PoolError>(())
/// ```
///
/// Any non-capturing closure or `fn` item whose argument and result are serde types runs on
/// the same pool (functions of several values take a tuple). Task arguments and results are
/// plain data: handles of mp-ipc primitives (queues, locks, shared memory) are passed to the
/// workers through [`PoolBuilder::initializer`], as with Python's `initargs`. Tasks are grouped in *chunks*
/// (Python's `chunksize`): one message, one decode and one encode per chunk.
///
/// Failures are per task and typed: a panic ([`PoolError::Panicked`], the worker survives),
/// the death of the worker running it ([`PoolError::WorkerDied`] with its pid and signal;
/// the worker is replaced, tasks it had not started run elsewhere), or the pool going away.
/// Nothing waits forever on a dead worker.
///
/// Dropping the pool terminates it (Python's `with Pool() as pool:`): waiting and running
/// tasks fail with [`PoolError::Terminated`] and the workers are killed. To let submitted
/// tasks finish, [`close`](Pool::close) and [`join`](Pool::join) first.
pub struct Pool {
    pub(crate) shared: Arc<Shared>,
    processes: usize,
    task_timeout: Option<Duration>,
    threads: Mutex<Option<Threads>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("processes", &self.processes)
            .finish_non_exhaustive()
    }
}

impl Pool {
    /// A pool of `processes` workers with default options.
    pub fn new(processes: usize) -> Result<Pool, PoolError> {
        Pool::builder().processes(processes).build()
    }

    /// Options for a pool.
    pub fn builder() -> PoolBuilder {
        PoolBuilder::default()
    }

    /// The number of worker processes the pool keeps.
    pub fn processes(&self) -> usize {
        self.processes
    }

    /// The pids of the workers currently running.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.shared.scheduler.lock().worker_pids()
    }

    /// Waits until all [`processes`](Self::processes) workers have started and run their
    /// initializer, at most `timeout`. Workers start in the background when the pool is
    /// built; this is how to know they are up, or why not: a worker that could not start
    /// ([`PoolError::StartFailed`], e.g. out of descriptors or memory), an initializer that
    /// failed ([`PoolError::InitializerFailed`]), or [`PoolError::Timeout`].
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), PoolError> {
        let deadline = Instant::now() + timeout;
        let mut scheduler = self.shared.scheduler.lock();
        loop {
            if let Some(readiness) = scheduler.readiness() {
                return readiness;
            }
            if self
                .shared
                .idle
                .wait_until(&mut scheduler, deadline)
                .timed_out()
            {
                return scheduler.readiness().unwrap_or(Err(PoolError::Timeout));
            }
        }
    }

    /// The same operations with an explicit chunk size (Python's `chunksize=` argument):
    /// `pool.chunksize(10).map(f, items)`.
    pub fn chunksize(&self, chunksize: usize) -> TaskOptions<'_> {
        self.options().chunksize(chunksize)
    }

    /// The same operations with a time limit per task (pebble's `schedule(timeout=)`):
    /// `pool.timeout(Duration::from_secs(1)).apply_async(f, x)`. See
    /// [`TaskOptions::timeout`].
    pub fn timeout(&self, timeout: Duration) -> TaskOptions<'_> {
        self.options().timeout(timeout)
    }

    /// The pool's operations with its default options, to adjust.
    fn options(&self) -> TaskOptions<'_> {
        TaskOptions {
            pool: self,
            chunksize: None,
            timeout: self.task_timeout,
        }
    }

    /// Runs `function(args)` on a worker and returns its result (Python's `apply`).
    pub fn apply<M: 'static, F: Entry<M>>(
        &self,
        function: F,
        args: F::Args,
    ) -> Result<F::Output, PoolError> {
        self.apply_async(function, args)?.get()
    }

    /// Submits `function(args)` and returns a handle to its result (Python's `apply_async`).
    pub fn apply_async<M: 'static, F: Entry<M>>(
        &self,
        function: F,
        args: F::Args,
    ) -> Result<AsyncResult<F::Output>, PoolError> {
        self.options().apply_async(function, args)
    }

    /// [`apply`](Self::apply) for a function returning `Result<T, E>`: an `Err` is the
    /// task's error, carried as itself ([`TryError::Task`]).
    pub fn try_apply<M: 'static, F, T, E>(
        &self,
        function: F,
        args: F::Args,
    ) -> Result<T, TryError<E>>
    where
        F: Entry<M, Output = Result<T, E>>,
        T: Send + 'static,
        E: Clone + Send + 'static,
    {
        self.options().try_apply(function, args)
    }

    /// [`apply_async`](Self::apply_async) for a function returning `Result<T, E>`: an `Err`
    /// fails the task with [`TryError::Task`] (its `error_callback` sees it).
    pub fn try_apply_async<M: 'static, F, T, E>(
        &self,
        function: F,
        args: F::Args,
    ) -> Result<AsyncResult<T, TryError<E>>, PoolError>
    where
        F: Entry<M, Output = Result<T, E>>,
        T: Send + 'static,
        E: Clone + Send + 'static,
    {
        self.options().try_apply_async(function, args)
    }

    /// [`map`](Self::map) for a function returning `Result<T, E>`: the first `Err` (in
    /// completion order) fails the whole map at once, carried as itself
    /// ([`TryError::Task`]); chunks that have not started are dropped.
    pub fn try_map<M: 'static, F, T, E, I>(
        &self,
        function: F,
        items: I,
    ) -> Result<Vec<T>, TryError<E>>
    where
        F: Entry<M, Output = Result<T, E>>,
        T: Send + 'static,
        E: Clone + Send + 'static,
        I: IntoIterator<Item = F::Args>,
    {
        self.options().try_map(function, items)
    }

    /// [`try_map`](Self::try_map) without waiting (the `try_` form of
    /// [`map_async`](Self::map_async)).
    pub fn try_map_async<M: 'static, F, T, E, I>(
        &self,
        function: F,
        items: I,
    ) -> Result<AsyncResult<Vec<T>, TryError<E>>, PoolError>
    where
        F: Entry<M, Output = Result<T, E>>,
        T: Send + 'static,
        E: Clone + Send + 'static,
        I: IntoIterator<Item = F::Args>,
    {
        self.options().try_map_async(function, items)
    }

    /// [`map`](Self::map) with a deadline for the whole call: if the results are not all in
    /// after `timeout`, it fails with [`PoolError::Timeout`], its tasks that have not
    /// started are dropped and the workers still running its tasks are killed (and
    /// replaced); the pool goes on.
    pub fn map_timeout<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        &self,
        function: F,
        items: I,
        timeout: Duration,
    ) -> Result<Vec<F::Output>, PoolError> {
        self.options().map_timeout(function, items, timeout)
    }

    /// `concurrent.futures.ProcessPoolExecutor.submit`: the same as
    /// [`apply_async`](Self::apply_async). The handle is the future; a worker's death fails
    /// only the task it was running ([`PoolError::WorkerDied`]) and never breaks the pool.
    pub fn submit<M: 'static, F: Entry<M>>(
        &self,
        function: F,
        args: F::Args,
    ) -> Result<AsyncResult<F::Output>, PoolError> {
        self.options().apply_async(function, args)
    }

    /// Applies `function` to every item and returns the results in input order (Python's
    /// `map`), with Python's default chunk size (about four chunks per worker).
    ///
    /// Fails with the first error (in completion order) as soon as it is known, without
    /// waiting for the other chunks; chunks that have not started are dropped.
    pub fn map<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        &self,
        function: F,
        items: I,
    ) -> Result<Vec<F::Output>, PoolError> {
        self.map_async(function, items)?.get()
    }

    /// [`map`](Self::map) without waiting: returns a handle to the `Vec` of results (Python's
    /// `map_async`). The items are read and encoded before this returns.
    pub fn map_async<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        &self,
        function: F,
        items: I,
    ) -> Result<AsyncResult<Vec<F::Output>>, PoolError> {
        self.options().map_async(function, items)
    }

    /// Python's `starmap`. A Rust function of several values takes one tuple, so this is
    /// [`map`](Self::map) over tuples: `pool.starmap(|(a, b): (u32, u32)| a * b, pairs)`.
    pub fn starmap<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        &self,
        function: F,
        items: I,
    ) -> Result<Vec<F::Output>, PoolError> {
        self.map(function, items)
    }

    /// Python's `starmap_async`: [`map_async`](Self::map_async) over tuples.
    pub fn starmap_async<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        &self,
        function: F,
        items: I,
    ) -> Result<AsyncResult<Vec<F::Output>>, PoolError> {
        self.map_async(function, items)
    }

    /// A lazy iterator of the results, in input order (Python's `imap`; chunk size 1
    /// unless set with [`chunksize`](Self::chunksize)). Items are read from `items` only as
    /// results are consumed, so an endless iterator runs in bounded memory.
    pub fn imap<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        &self,
        function: F,
        items: I,
    ) -> IMap<'_, M, F, I::IntoIter> {
        self.options().imap(function, items)
    }

    /// [`imap`](Self::imap), yielding results as they complete (Python's `imap_unordered`).
    pub fn imap_unordered<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        &self,
        function: F,
        items: I,
    ) -> IMap<'_, M, F, I::IntoIter> {
        self.options().imap_unordered(function, items)
    }

    /// [`imap`](Self::imap) for a function returning `Result<T, E>`: yields `Ok(value)`,
    /// or `Err(TryError::Task(e))` with the task's own error (and goes on, as `imap` does).
    pub fn try_imap<M: 'static, F, T, E, I>(
        &self,
        function: F,
        items: I,
    ) -> TryIMap<'_, M, F, I::IntoIter>
    where
        F: Entry<M, Output = Result<T, E>>,
        I: IntoIterator<Item = F::Args>,
    {
        TryIMap::new(self.imap(function, items))
    }

    /// [`try_imap`](Self::try_imap) in completion order.
    pub fn try_imap_unordered<M: 'static, F, T, E, I>(
        &self,
        function: F,
        items: I,
    ) -> TryIMap<'_, M, F, I::IntoIter>
    where
        F: Entry<M, Output = Result<T, E>>,
        I: IntoIterator<Item = F::Args>,
    {
        TryIMap::new(self.imap_unordered(function, items))
    }

    /// Accepts no more tasks; those submitted still run (Python's `close`).
    pub fn close(&self) {
        self.shared.scheduler.lock().close();
    }

    /// Closes the pool and waits for it to finish (`concurrent.futures`'
    /// `shutdown(wait=True, cancel_futures=cancel_pending)`). With `cancel_pending`, every
    /// task no worker has started fails at once with [`PoolError::Cancelled`] (its error
    /// callback runs; a `map` with such a task fails with it); tasks already running
    /// finish (as in Python; give them a [`timeout`](Self::timeout) to bound that).
    pub fn shutdown(&self, cancel_pending: bool) -> Result<(), PoolError> {
        self.close();
        if cancel_pending {
            let deliveries = self.shared.scheduler.lock().cancel_pending();
            tracing::debug!(
                cancelled = deliveries.len(),
                "pool shutdown cancels pending tasks"
            );
            self.shared.idle.notify_all();
            deliver(deliveries);
        }
        self.join()
    }

    /// Waits for every submitted task to finish, then for the workers to exit (Python's
    /// `join`). The pool must be closed (or terminated) first.
    pub fn join(&self) -> Result<(), PoolError> {
        self.join_until(None)
    }

    /// [`join`](Self::join), giving up after `timeout` with [`PoolError::Timeout`] (the
    /// pool is left as it was: join again, or terminate).
    pub fn join_timeout(&self, timeout: Duration) -> Result<(), PoolError> {
        self.join_until(Some(Instant::now() + timeout))
    }

    fn join_until(&self, deadline: Option<Instant>) -> Result<(), PoolError> {
        {
            let mut scheduler = self.shared.scheduler.lock();
            match scheduler.mode() {
                Mode::Open => return Err(PoolError::StillOpen),
                Mode::Terminated => {}
                Mode::Closed | Mode::Broken(_) => {
                    // Idle, and every worker the pool promised has started (and run its
                    // initializer), even if `close` and `join` follow `build` at once.
                    let done = |s: &Scheduler| {
                        (s.is_idle() && s.is_settled()) || matches!(s.mode(), Mode::Terminated)
                    };
                    while !done(&scheduler) {
                        match deadline {
                            None => self.shared.idle.wait(&mut scheduler),
                            Some(deadline) => {
                                if self
                                    .shared
                                    .idle
                                    .wait_until(&mut scheduler, deadline)
                                    .timed_out()
                                    && !done(&scheduler)
                                {
                                    return Err(PoolError::Timeout);
                                }
                            }
                        }
                    }
                    scheduler.stop_workers();
                }
            }
        }
        self.shared.commands.stop(false);
        self.shut_down_threads();
        Ok(())
    }

    /// Stops at once (Python's `terminate`): waiting and running tasks fail with
    /// [`PoolError::Terminated`], workers are killed (SIGKILL, so that this is bounded in
    /// time), and the pool's threads end. Idempotent; dropping the pool does the same.
    pub fn terminate(&self) {
        self.shared.terminate();
        self.shut_down_threads();
    }

    fn shut_down_threads(&self) {
        let Some(threads) = self.threads.lock().take() else {
            return;
        };
        let _ = threads.supervisor.join();
        // A callback that drops the last handle of its own pool runs on the result thread:
        // it cannot join itself, and leaves it to finish on the shutdown notice.
        let _ = self.shared.reports.send(Report::Shutdown);
        if threads.collector.thread().id() != std::thread::current().id() {
            let _ = threads.collector.join();
        }
        tracing::debug!("pool shut down");
    }

    /// Encodes `items` in chunks and submits them as one collecting job; returns its
    /// handle, and the job (to withdraw it).
    fn collect<M, F, I, T, E>(
        &self,
        function: &F,
        items: I,
        (chunksize, limits): (Option<usize>, Limits),
        finish: fn(Vec<F::Output>) -> Option<T>,
        check: fn(&[F::Output]) -> Option<E>,
    ) -> Result<Submitted<T, E>, PoolError>
    where
        M: 'static,
        F: Entry<M>,
        I: IntoIterator<Item = F::Args>,
        T: Send + 'static,
        E: ResultError + From<PoolError> + Send + 'static,
    {
        if chunksize == Some(0) {
            return Err(PoolError::InvalidChunksize);
        }
        self.shared.scheduler.lock().accepting()?;
        let completion = Completion::new();
        let job = Arc::new(CollectJob::new(completion.clone(), finish, check));
        let sink: Arc<dyn Job> = job.clone();
        // Weak on both sides: the job holds the completion, which holds this.
        let (shared, weak_job) = (Arc::downgrade(&self.shared), Arc::downgrade(&sink));
        completion.set_canceller(Box::new(move || {
            let (Some(shared), Some(job)) = (shared.upgrade(), weak_job.upgrade()) else {
                return false;
            };
            let withdrawn = shared.scheduler.lock().cancel_job(&job, true);
            // `join` waits for the pool to be idle, which this may have made it.
            shared.idle.notify_all();
            withdrawn
        }));
        let function_id = (worker::chunk_function(function), TaskTypes::of::<M, F>());
        let items = items.into_iter();
        let chunksize = |len| chunksize.unwrap_or_else(|| default_chunksize(len, self.processes));
        let fed = match items.size_hint() {
            (low, Some(high)) if low == high => {
                self.feed(&sink, function_id, items, chunksize(low), limits)
            }
            _ => {
                let items: Vec<_> = items.collect();
                let size = chunksize(items.len());
                self.feed(&sink, function_id, items.into_iter(), size, limits)
            }
        };
        match fed {
            Ok(chunks) => {
                tracing::debug!(chunks, "pool job submitted");
                job.seal(chunks);
                Ok((AsyncResult::new(completion), sink))
            }
            Err(error) => {
                job.cancel();
                Err(error)
            }
        }
    }

    /// Cuts `items` into chunks of `chunksize`, encodes and submits them; returns how many.
    fn feed<A: Serialize>(
        &self,
        job: &Arc<dyn Job>,
        (function, types): (mp_core::FunctionId, TaskTypes),
        mut items: impl Iterator<Item = A>,
        chunksize: usize,
        limits: Limits,
    ) -> Result<usize, PoolError> {
        let mut group = Vec::new();
        let mut group_bytes = 0;
        let mut index = 0;
        loop {
            let chunk: Vec<A> = items.by_ref().take(chunksize).collect();
            if chunk.is_empty() {
                break;
            }
            let payload = encode(&chunk, &self.shared.spares)?;
            group_bytes += payload.len();
            group.push(Chunk {
                job: job.clone(),
                index,
                first_item: index * chunksize,
                items: chunk.len(),
                function,
                types,
                payload,
                limits,
            });
            index += 1;
            if group_bytes >= SUBMIT_BYTES || group.len() >= SUBMIT_CHUNKS {
                self.enqueue(std::mem::take(&mut group))?;
                group_bytes = 0;
                if job.is_cancelled() {
                    break;
                }
            }
        }
        if !group.is_empty() {
            self.enqueue(group)?;
        }
        Ok(index)
    }

    /// Hands chunks to the scheduler.
    pub(crate) fn enqueue(&self, chunks: Vec<Chunk>) -> Result<(), PoolError> {
        self.shared.scheduler.lock().enqueue(chunks)
    }
}

/// A job's handle, and the job itself (to withdraw it).
type Submitted<T, E> = (AsyncResult<T, E>, Arc<dyn Job>);

/// Encodes a chunk's arguments (into one of the pool's spare buffers after large
/// arguments, see [`Spares`]).
/// Handles inside task arguments are refused here, before their descriptors are taken:
/// they travel to workers only as initializer arguments.
pub(crate) fn encode<A: Serialize>(
    items: &[A],
    spares: &Arc<Spares>,
) -> Result<Payload, PoolError> {
    if let Some(buffer) = spares.take() {
        match encode_into(items, buffer) {
            Some(bytes) if bytes.len() >= crate::bulk::MIN_BYTES => {
                spares.note(bytes.len());
                return Ok(Payload::recycled(bytes, spares));
            }
            Some(bytes) => {
                // Small after all: an exact copy, and the buffer stays a spare.
                let payload = Payload::new(bytes.clone());
                spares.give(bytes);
                spares.note(payload.len());
                return Ok(payload);
            }
            // Failed: the plain encoder says why (and runs the `Serialize` again).
            None => {}
        }
    }
    let failed = |message: String| {
        PoolError::EncodeArguments(format!(
            "encoding {}: {message}",
            std::any::type_name::<A>()
        ))
    };
    // A user's `Serialize` may panic: that fails this submission, not the caller.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        mp_ipc::queue::encode_item(items)
    })) {
        Ok(Ok(bytes)) => {
            spares.note(bytes.len());
            Ok(Payload::recycled(bytes, spares))
        }
        Ok(Err(e)) => Err(failed(e.to_string())),
        Err(panic) => Err(failed(format!("it panicked: {}", panic_message(&*panic)))),
    }
}

/// Encodes `items` into `buffer` exactly as [`mp_ipc::queue::encode_item`] would, with
/// its refusal of handles: the encoding runs inside `encode_item` (of a value that
/// serializes as nothing and writes `items` into the buffer on the side). `None` if it
/// failed or panicked.
fn encode_into<A: Serialize>(items: &[A], buffer: Vec<u8>) -> Option<Vec<u8>> {
    struct OnTheSide<'a, A>(&'a [A], std::cell::RefCell<Option<Vec<u8>>>);
    impl<A: Serialize> Serialize for OnTheSide<'_, A> {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut slot = self.1.borrow_mut();
            let mut buffer = slot.take().unwrap_or_default();
            // Whatever an earlier pass wrote (should `encode_item` ever make several).
            buffer.clear();
            match postcard::to_io(self.0, buffer) {
                Ok(buffer) => {
                    *slot = Some(buffer);
                    serializer.serialize_unit()
                }
                Err(e) => Err(serde::ser::Error::custom(e)),
            }
        }
    }
    let side = OnTheSide(items, std::cell::RefCell::new(Some(buffer)));
    let encoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        mp_ipc::queue::encode_item(&side)
    }));
    match encoded {
        Ok(Ok(_)) => side.1.into_inner(),
        _ => None,
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// The pool's operations with options of their own (Python's `chunksize=`, pebble's
/// `timeout=`), from [`Pool::chunksize`] or [`Pool::timeout`]:
/// `pool.chunksize(10).timeout(Duration::from_secs(1)).map(f, items)`.
///
/// ```
/// use std::time::Duration;
/// use mp_pool::{Pool, PoolError};
///
/// let pool = Pool::new(1)?;
/// let quick = pool.timeout(Duration::from_secs(5)).apply_async(|x: u32| x + 1, 1)?;
/// assert_eq!(quick.get()?, 2);
/// fn stuck(_: ()) -> u32 {
///     loop {
///         std::thread::park();
///     }
/// }
/// let stuck = pool.timeout(Duration::from_millis(100)).apply_async(stuck, ())?;
/// assert!(matches!(stuck.get(), Err(PoolError::TaskTimedOut { .. })));
/// // The worker running it was killed and replaced: the pool goes on.
/// assert_eq!(pool.apply(|x: u32| x * 2, 21)?, 42);
/// # Ok::<(), PoolError>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct TaskOptions<'pool> {
    pool: &'pool Pool,
    chunksize: Option<usize>,
    timeout: Option<Duration>,
}

/// The former name of [`TaskOptions`].
pub type WithChunksize<'pool> = TaskOptions<'pool>;

/// `finish` of one-value jobs (`apply`).
fn first<T>(values: Vec<T>) -> Option<T> {
    values.into_iter().next()
}

/// `check` of the `try_` family: the first `Err` among a chunk's values.
fn first_error<T, E: Clone>(values: &[Result<T, E>]) -> Option<TryError<E>> {
    values.iter().find_map(|value| match value {
        Ok(_) => None,
        Err(error) => Some(TryError::Task(error.clone())),
    })
}

/// `finish` of `try_map` (run once `first_error` found no error).
fn all_ok<T, E>(values: Vec<Result<T, E>>) -> Option<Vec<T>> {
    values.into_iter().map(Result::ok).collect()
}

/// `finish` of `try_apply`.
fn first_ok<T, E>(values: Vec<Result<T, E>>) -> Option<T> {
    values.into_iter().next()?.ok()
}

impl<'pool> TaskOptions<'pool> {
    /// The chunk size (Python's `chunksize=`; default: about four chunks per worker for
    /// `map`, 1 for `imap`).
    pub fn chunksize(mut self, chunksize: usize) -> Self {
        self.chunksize = Some(chunksize);
        self
    }

    /// The time limit of each task (each chunk, for `map`/`imap` with a chunk size above
    /// 1), counted from the moment a worker starts it (pebble's `schedule(timeout=)`;
    /// default: the pool's [`task_timeout`](PoolBuilder::task_timeout)). A task running
    /// longer fails with [`PoolError::TaskTimedOut`] naming it: the worker running it is
    /// killed, a replacement starts, the other tasks go on. The pool learns of a deadline
    /// from a timer its supervisor thread sleeps on; a task without a limit costs nothing.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    fn limits(&self) -> Limits {
        Limits {
            timeout: self.timeout,
            deadline: None,
        }
    }

    /// [`Pool::apply`] with these options.
    pub fn apply<M: 'static, F: Entry<M>>(
        self,
        function: F,
        args: F::Args,
    ) -> Result<F::Output, PoolError> {
        self.apply_async(function, args)?.get()
    }

    /// [`Pool::apply_async`] with these options.
    pub fn apply_async<M: 'static, F: Entry<M>>(
        self,
        function: F,
        args: F::Args,
    ) -> Result<AsyncResult<F::Output>, PoolError> {
        let options = (Some(1), self.limits());
        let items = std::iter::once(args);
        let (result, _) = self
            .pool
            .collect(&function, items, options, first, no_task_errors)?;
        Ok(result)
    }

    /// [`Pool::submit`] with these options.
    pub fn submit<M: 'static, F: Entry<M>>(
        self,
        function: F,
        args: F::Args,
    ) -> Result<AsyncResult<F::Output>, PoolError> {
        self.apply_async(function, args)
    }

    /// [`Pool::try_apply`] with these options.
    pub fn try_apply<M: 'static, F, T, E>(
        self,
        function: F,
        args: F::Args,
    ) -> Result<T, TryError<E>>
    where
        F: Entry<M, Output = Result<T, E>>,
        T: Send + 'static,
        E: Clone + Send + 'static,
    {
        self.try_apply_async(function, args)?.get()
    }

    /// [`Pool::try_apply_async`] with these options.
    pub fn try_apply_async<M: 'static, F, T, E>(
        self,
        function: F,
        args: F::Args,
    ) -> Result<AsyncResult<T, TryError<E>>, PoolError>
    where
        F: Entry<M, Output = Result<T, E>>,
        T: Send + 'static,
        E: Clone + Send + 'static,
    {
        let options = (Some(1), self.limits());
        let items = std::iter::once(args);
        let (result, _) = self
            .pool
            .collect(&function, items, options, first_ok, first_error)?;
        Ok(result)
    }

    /// [`Pool::map`] with these options.
    pub fn map<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        self,
        function: F,
        items: I,
    ) -> Result<Vec<F::Output>, PoolError> {
        self.map_async(function, items)?.get()
    }

    /// [`Pool::map_async`] with these options.
    pub fn map_async<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        self,
        function: F,
        items: I,
    ) -> Result<AsyncResult<Vec<F::Output>>, PoolError> {
        let options = (self.chunksize, self.limits());
        let (result, _) = self
            .pool
            .collect(&function, items, options, Some, no_task_errors)?;
        Ok(result)
    }

    /// [`Pool::map_timeout`] with these options.
    pub fn map_timeout<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        self,
        function: F,
        items: I,
        timeout: Duration,
    ) -> Result<Vec<F::Output>, PoolError> {
        let deadline = Instant::now() + timeout;
        let limits = Limits {
            timeout: self.timeout,
            deadline: Some(deadline),
        };
        let (result, job) = self.pool.collect(
            &function,
            items,
            (self.chunksize, limits),
            Some,
            no_task_errors,
        )?;
        match result.get_timeout(deadline.saturating_duration_since(Instant::now())) {
            Err(PoolError::Timeout) => {
                // Its waiting chunks are dropped; the running ones reach the same deadline
                // in the supervisor, which kills their workers.
                let shared = &self.pool.shared;
                shared.scheduler.lock().cancel_job(&job, false);
                shared.idle.notify_all();
                job.cancel();
                result.fail(PoolError::Timeout);
                Err(PoolError::Timeout)
            }
            outcome => outcome,
        }
    }

    /// [`Pool::try_map`] with these options.
    pub fn try_map<M: 'static, F, T, E, I>(
        self,
        function: F,
        items: I,
    ) -> Result<Vec<T>, TryError<E>>
    where
        F: Entry<M, Output = Result<T, E>>,
        T: Send + 'static,
        E: Clone + Send + 'static,
        I: IntoIterator<Item = F::Args>,
    {
        self.try_map_async(function, items)?.get()
    }

    /// [`Pool::try_map_async`] with these options.
    pub fn try_map_async<M: 'static, F, T, E, I>(
        self,
        function: F,
        items: I,
    ) -> Result<AsyncResult<Vec<T>, TryError<E>>, PoolError>
    where
        F: Entry<M, Output = Result<T, E>>,
        T: Send + 'static,
        E: Clone + Send + 'static,
        I: IntoIterator<Item = F::Args>,
    {
        let options = (self.chunksize, self.limits());
        let (result, _) = self
            .pool
            .collect(&function, items, options, all_ok, first_error)?;
        Ok(result)
    }

    /// [`Pool::starmap`] with these options.
    pub fn starmap<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        self,
        function: F,
        items: I,
    ) -> Result<Vec<F::Output>, PoolError> {
        self.map(function, items)
    }

    /// [`Pool::starmap_async`] with these options.
    pub fn starmap_async<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        self,
        function: F,
        items: I,
    ) -> Result<AsyncResult<Vec<F::Output>>, PoolError> {
        self.map_async(function, items)
    }

    /// [`Pool::imap`] with these options (chunk size 0 makes the iterator yield one
    /// [`PoolError::InvalidChunksize`]).
    pub fn imap<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        self,
        function: F,
        items: I,
    ) -> IMap<'pool, M, F, I::IntoIter> {
        let chunksize = self.chunksize.unwrap_or(1);
        IMap::new(
            self.pool,
            &function,
            items.into_iter(),
            chunksize,
            self.limits(),
            true,
        )
    }

    /// [`Pool::try_imap`] with these options.
    pub fn try_imap<M: 'static, F, T, E, I>(
        self,
        function: F,
        items: I,
    ) -> TryIMap<'pool, M, F, I::IntoIter>
    where
        F: Entry<M, Output = Result<T, E>>,
        I: IntoIterator<Item = F::Args>,
    {
        TryIMap::new(self.imap(function, items))
    }

    /// [`Pool::imap_unordered`] with these options.
    pub fn imap_unordered<M: 'static, F: Entry<M>, I: IntoIterator<Item = F::Args>>(
        self,
        function: F,
        items: I,
    ) -> IMap<'pool, M, F, I::IntoIter> {
        let chunksize = self.chunksize.unwrap_or(1);
        IMap::new(
            self.pool,
            &function,
            items.into_iter(),
            chunksize,
            self.limits(),
            false,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_into_a_kept_buffer_gives_the_plain_encoders_bytes() {
        let big: Vec<String> = (0..20_000).map(|i| format!("item {i}")).collect();
        let small = [1u64, 2, 3];
        let stale = vec![0xee; 300_000];
        let plain = mp_ipc::queue::encode_item(&big[..]).unwrap();
        assert_eq!(encode_into(&big, stale.clone()).unwrap(), plain);
        let plain = mp_ipc::queue::encode_item(&small[..]).unwrap();
        assert_eq!(encode_into(&small, stale).unwrap(), plain);

        // Through a pool's spares: large arguments leave their buffer for the next ones.
        let spares = Arc::new(Spares::default());
        let first = encode(&big, &spares).unwrap();
        assert_eq!(
            first.as_bytes(),
            mp_ipc::queue::encode_item(&big[..]).unwrap()
        );
        drop(first);
        let second = encode(&big, &spares).unwrap();
        assert_eq!(
            second.as_bytes(),
            mp_ipc::queue::encode_item(&big[..]).unwrap()
        );
        let after = encode(&small, &spares).unwrap();
        assert_eq!(
            after.as_bytes(),
            mp_ipc::queue::encode_item(&small[..]).unwrap()
        );
    }
}
