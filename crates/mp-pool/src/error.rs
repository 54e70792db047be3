//! What can go wrong with a pool or one of its tasks.

use mp_core::{ExitStatus, PanicReport, TaskFailure, signal_name};

/// Why a task produced no result, or why the pool refused or dropped it.
///
/// Every failure of a task surfaces as one of these within bounded time: a panic, the death
/// of the worker running it, undecodable data, or the pool shutting down around it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PoolError {
    /// The task panicked (in a chunk of several items: one of them did). The worker caught
    /// the panic and lives on.
    #[error("task {report} (in pool worker {pid})")]
    Panicked {
        /// The pid of the worker that ran the task.
        pid: u32,
        /// Message, location and (with `RUST_BACKTRACE`) backtrace of the panic.
        report: PanicReport,
    },
    /// The worker running the task died: killed by a signal (SIGKILL, SIGSEGV, SIGABRT, the
    /// OOM killer...) or exited from inside the task. The pool replaced the worker.
    #[error("pool worker {pid} {} while running this task", describe_exit(*status))]
    WorkerDied {
        /// The dead worker's pid.
        pid: u32,
        /// How it ended.
        status: ExitStatus,
    },
    /// The task's arguments could not be encoded here.
    #[error("could not encode the arguments of a task: {0}")]
    EncodeArguments(String),
    /// The worker could not decode the task's arguments.
    #[error("pool worker {pid} could not decode the arguments of a task: {message}")]
    BadArguments {
        /// The worker's pid.
        pid: u32,
        /// The decoder's complaint.
        message: String,
    },
    /// The task's result could not be encoded (in the worker) or decoded (here).
    #[error("the result of a task from pool worker {pid} could not be transferred: {message}")]
    BadResult {
        /// The worker's pid.
        pid: u32,
        /// The codec's complaint.
        message: String,
    },
    /// A worker's initializer failed (panicked, or killed its process). The pool does not
    /// retry it: the pool is broken, and every task not already running fails with this.
    #[error("the pool's initializer failed in worker {pid}: {message}")]
    InitializerFailed {
        /// The pid of the worker whose initializer failed.
        pid: u32,
        /// What happened.
        message: String,
    },
    /// A worker process could not be started; the pool is broken.
    #[error("could not start a pool worker: {0}")]
    StartFailed(String),
    /// The pool was closed: it accepts no new tasks.
    #[error("the pool is closed and accepts no new tasks")]
    Closed,
    /// The pool was terminated (explicitly or by being dropped) before the task finished.
    #[error("the pool was terminated before the task finished")]
    Terminated,
    /// A `*_timeout` call ran out of time (for `get_timeout`, `next_timeout`,
    /// `join_timeout`: nothing was lost, the call can be repeated; for
    /// [`Pool::map_timeout`](crate::Pool::map_timeout): the map was given up).
    #[error("timed out waiting for the pool")]
    Timeout,
    /// The task ran longer than its timeout ([`TaskOptions::timeout`](crate::TaskOptions::timeout),
    /// [`PoolBuilder::task_timeout`](crate::PoolBuilder::task_timeout)): the worker running
    /// it was killed (and replaced), the task failed with this.
    #[error(
        "task {function} (item {index} of its call) ran longer than its timeout of {timeout:?}; pool worker {pid} was killed"
    )]
    TaskTimedOut {
        /// The task function's Rust name (`std::any::type_name`).
        function: &'static str,
        /// The position of the task's item in its call (`map`, `imap`; 0 for `apply`). With a
        /// chunk size above 1 the limit applies to the chunk: this is its first item.
        index: usize,
        /// The timeout it exceeded.
        timeout: std::time::Duration,
        /// The pid of the worker that was killed.
        pid: u32,
    },
    /// The task was withdrawn before it started: [`AsyncResult::cancel`](crate::AsyncResult::cancel),
    /// or [`Pool::shutdown`](crate::Pool::shutdown) with `cancel_pending`.
    #[error("the task was cancelled before it started")]
    Cancelled,
    /// The input iterator of `imap` panicked (with this message). What it yielded before
    /// was computed; the chunk it was reading fails with this error.
    #[error("the input iterator panicked: {0}")]
    InputPanicked(String),
    /// A chunk size of 0 was asked for.
    #[error("chunksize must be at least 1")]
    InvalidChunksize,
    /// `max_tasks_per_child(0)` was asked for.
    #[error("max_tasks_per_child must be at least 1")]
    InvalidMaxTasks,
    /// A pool of 0 processes was asked for.
    #[error("a pool needs at least one process")]
    NoProcesses,
    /// `join` was called on a pool that is still open (as in Python, `close` or
    /// `terminate` it first).
    #[error("join() needs a closed or terminated pool: call close() first")]
    StillOpen,
    /// The result was already taken by an earlier `get`.
    #[error("the result was already taken by an earlier get")]
    AlreadyTaken,
}

impl PoolError {
    /// Turns what a worker reported about a task into an error, naming the Rust type the
    /// worker could not decode or encode.
    pub(crate) fn from_task_failure(pid: u32, failure: TaskFailure, types: TaskTypes) -> PoolError {
        match failure {
            TaskFailure::Panicked(report) => PoolError::Panicked { pid, report },
            TaskFailure::BadArguments(message) => PoolError::BadArguments {
                pid,
                message: format!("decoding {}: {message}", types.args),
            },
            TaskFailure::BadResult(message) => PoolError::BadResult {
                pid,
                message: format!("encoding {}: {message}", types.output),
            },
        }
    }
}

/// The Rust types a task's arguments and result travel as, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TaskTypes {
    /// The task function's type.
    pub function: &'static str,
    /// The type of one item's arguments.
    pub args: &'static str,
    /// The type of one item's result.
    pub output: &'static str,
}

impl TaskTypes {
    /// The types of the task function `F`.
    pub(crate) fn of<M, F: mp_core::Entry<M>>() -> TaskTypes {
        TaskTypes {
            function: std::any::type_name::<F>(),
            args: std::any::type_name::<F::Args>(),
            output: std::any::type_name::<F::Output>(),
        }
    }
}

/// The failure of a task from the `try_` family ([`Pool::try_apply`](crate::Pool::try_apply),
/// [`Pool::try_map`](crate::Pool::try_map), ...): the `Err` the task returned, carried as
/// itself, or a failure of the pool.
///
/// ```
/// use mp_pool::{Pool, TryError};
///
/// fn parse(s: String) -> Result<u32, String> {
///     s.parse().map_err(|_| format!("not a number: {s}"))
/// }
///
/// let pool = Pool::new(1)?;
/// assert_eq!(pool.try_apply(parse, "12".into()), Ok(12));
/// assert_eq!(
///     pool.try_apply(parse, "x".into()),
///     Err(TryError::Task("not a number: x".to_string()))
/// );
/// # Ok::<(), mp_pool::PoolError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TryError<E> {
    /// The task returned `Err(error)`.
    Task(E),
    /// The pool could not run the task, or it failed (panic, worker death, timeout...).
    Pool(PoolError),
}

impl<E: std::fmt::Display> std::fmt::Display for TryError<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TryError::Task(error) => write!(f, "the task failed: {error}"),
            TryError::Pool(error) => error.fmt(f),
        }
    }
}

impl<E: std::fmt::Debug + std::fmt::Display> std::error::Error for TryError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TryError::Task(_) => None,
            TryError::Pool(error) => Some(error),
        }
    }
}

impl<E> From<PoolError> for TryError<E> {
    fn from(error: PoolError) -> Self {
        TryError::Pool(error)
    }
}

/// The error type of an [`AsyncResult`](crate::AsyncResult): [`PoolError`], or
/// [`TryError<E>`] for the `try_` family; other executors that hand out `AsyncResult`s
/// (mp-mpi's `MpiPool`, through [`AsyncResult::pending`](crate::AsyncResult::pending))
/// implement it for their own error type.
///
/// It names the failures an `AsyncResult` reports by itself, whatever runs the task.
pub trait ResultError: Clone {
    /// `get_timeout` ran out of time ([`PoolError::Timeout`]).
    fn timeout() -> Self;
    /// The value was already moved out by an earlier `get` ([`PoolError::AlreadyTaken`]).
    fn already_taken() -> Self;
    /// The task was withdrawn before it ran ([`PoolError::Cancelled`]).
    fn cancelled() -> Self;
    /// Whether this is the error of [`cancelled`](Self::cancelled).
    fn is_cancelled(&self) -> bool;
}

impl ResultError for PoolError {
    fn timeout() -> Self {
        PoolError::Timeout
    }
    fn already_taken() -> Self {
        PoolError::AlreadyTaken
    }
    fn cancelled() -> Self {
        PoolError::Cancelled
    }
    fn is_cancelled(&self) -> bool {
        *self == PoolError::Cancelled
    }
}

impl<E: Clone> ResultError for TryError<E> {
    fn timeout() -> Self {
        TryError::Pool(PoolError::Timeout)
    }
    fn already_taken() -> Self {
        TryError::Pool(PoolError::AlreadyTaken)
    }
    fn cancelled() -> Self {
        TryError::Pool(PoolError::Cancelled)
    }
    fn is_cancelled(&self) -> bool {
        matches!(self, TryError::Pool(PoolError::Cancelled))
    }
}

/// "was killed by signal 9 (SIGKILL)" / "exited with code 3".
pub(crate) fn describe_exit(status: ExitStatus) -> String {
    match status {
        ExitStatus::Signal(signal) => {
            format!("was killed by signal {signal} ({})", signal_name(signal))
        }
        ExitStatus::Code(code) => format!("exited with code {code}"),
        ExitStatus::Unknown => "ended (its exit status was collected elsewhere)".to_owned(),
    }
}

/// The status behind a Python-style exit code (negative: killed by that signal).
pub(crate) fn status_of_exitcode(exitcode: i32) -> ExitStatus {
    if exitcode < 0 {
        ExitStatus::Signal(-exitcode)
    } else {
        ExitStatus::Code(exitcode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_death_names_pid_and_signal() {
        let error = PoolError::WorkerDied {
            pid: 42,
            status: status_of_exitcode(-9),
        };
        assert_eq!(
            error.to_string(),
            "pool worker 42 was killed by signal 9 (SIGKILL) while running this task"
        );
        let exited = PoolError::WorkerDied {
            pid: 7,
            status: status_of_exitcode(3),
        };
        assert_eq!(
            exited.to_string(),
            "pool worker 7 exited with code 3 while running this task"
        );
    }

    #[test]
    fn panics_carry_message_and_location() {
        let report = PanicReport {
            message: "boom".into(),
            location: Some("src/x.rs:1:2".into()),
            backtrace: None,
        };
        let types = TaskTypes {
            function: "f",
            args: "u32",
            output: "alloc::string::String",
        };
        let error = PoolError::from_task_failure(5, TaskFailure::Panicked(report), types);
        assert_eq!(
            error.to_string(),
            "task panicked at src/x.rs:1:2: boom (in pool worker 5)"
        );
        let bad = PoolError::from_task_failure(5, TaskFailure::BadArguments("eof".into()), types);
        assert!(bad.to_string().contains("decoding u32: eof"), "{bad}");
        let bad = PoolError::from_task_failure(5, TaskFailure::BadResult("nope".into()), types);
        assert!(
            bad.to_string()
                .contains("encoding alloc::string::String: nope"),
            "{bad}"
        );
    }
}
