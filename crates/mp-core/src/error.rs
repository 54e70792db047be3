//! What can go wrong with a child process.

use crate::protocol::PanicReport;
use crate::sys::signal_name;

/// Why a process produced no return value, or could not be started or joined.
///
/// Every failure of a child surfaces as one of these within bounded time: a panic, an early
/// exit, a fatal signal, undecodable data, or a child that died before it connected back.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProcessError {
    /// The child's function panicked.
    #[error("process {pid} {report}")]
    Panicked {
        /// The child's pid.
        pid: u32,
        /// Message, location and (with `RUST_BACKTRACE`) backtrace of the panic.
        report: PanicReport,
    },
    /// The child exited (e.g. through `std::process::exit`) without returning a value.
    #[error("process {pid} exited with code {code} before returning a value")]
    Exited {
        /// The child's pid.
        pid: u32,
        /// Its exit code.
        code: i32,
    },
    /// The child was killed by a signal.
    #[error("process {pid} was killed by signal {signal} ({})", signal_name(*signal))]
    Signaled {
        /// The child's pid.
        pid: u32,
        /// The signal number.
        signal: i32,
    },
    /// The child could not decode the arguments it was sent.
    #[error("process {pid} could not decode its arguments: {message}")]
    BadArguments {
        /// The child's pid.
        pid: u32,
        /// The decoder's complaint.
        message: String,
    },
    /// The child's return value could not be encoded (in the child) or decoded (here).
    #[error("the return value of process {pid} could not be transferred: {message}")]
    BadResult {
        /// The child's pid.
        pid: u32,
        /// The codec's complaint.
        message: String,
    },
    /// The process could not be started, or died before it connected back.
    #[error("could not start the process: {0}")]
    StartFailed(String),
    /// The child ended without returning a value, and how it ended is unknown: its status
    /// went elsewhere (see [`ExitStatus::Unknown`](crate::ExitStatus::Unknown)). A child
    /// that returned a value still gives it to `join`.
    #[error(
        "process {pid} ended without returning a value, and its exit status was collected \
         elsewhere (this program ignores SIGCHLD, or a waitpid(-1) reaped it)"
    )]
    StatusLost {
        /// The child's pid.
        pid: u32,
    },
    /// `join_timeout` ran out; the child is still running and can be joined again.
    #[error("timed out waiting for process {pid}")]
    Timeout {
        /// The child's pid.
        pid: u32,
    },
    /// `join` was already called successfully (the value can be taken only once).
    #[error("process {pid} was already joined")]
    AlreadyJoined {
        /// The child's pid.
        pid: u32,
    },
    /// [`StartMethod::Fork`](crate::StartMethod::Fork) was chosen, but this program has not
    /// declared with [`allow_fork`](crate::allow_fork) that forking it is sound.
    #[error(
        "the fork start method is not allowed in this program: a forked child inherits every \
         lock another thread holds at that moment, held forever; use spawn or forkserver, or \
         call `unsafe {{ mp_core::allow_fork() }}` once where that cannot happen"
    )]
    ForkNotAllowed,
    /// A function that takes an argument was started without `.args(..)`.
    #[error("the function takes an argument: call .args(..) before .start()")]
    MissingArgs,
    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl ProcessError {
    pub(crate) fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> ProcessError {
        move |source| ProcessError::Io { context, source }
    }
}
