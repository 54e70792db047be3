//! What can go wrong with an MPI pool or one of its tasks.

use mp_core::{PanicReport, TaskFailure};

/// Why a task of an [`MpiPool`](crate::MpiPool) produced no result, or why the pool could not
/// start or refused the task.
///
/// A worker rank that dies is not among these: Open MPI 4.1 (without ULFM) reports a dead rank
/// to nobody but `mpirun`, which ends the whole job within seconds, naming the rank (see the
/// crate docs, "Failures").
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MpiPoolError {
    /// The task panicked (in a chunk of several items: one of them did). The worker rank
    /// caught the panic and serves the next task.
    #[error("task {report} (on MPI rank {rank})")]
    Panicked {
        /// The rank that ran the task.
        rank: i32,
        /// Message, location and (with `RUST_BACKTRACE`) backtrace of the panic.
        report: PanicReport,
    },
    /// The task's arguments could not be encoded here.
    #[error("could not encode the arguments of a task: {0}")]
    EncodeArguments(String),
    /// The worker rank could not decode the task's arguments.
    #[error("MPI rank {rank} could not decode the arguments of a task: {message}")]
    BadArguments {
        /// The worker rank.
        rank: i32,
        /// The decoder's complaint.
        message: String,
    },
    /// The task's result could not be encoded (on the worker rank) or decoded (on rank 0).
    #[error("the result of a task from MPI rank {rank} could not be transferred: {message}")]
    BadResult {
        /// The worker rank.
        rank: i32,
        /// The codec's complaint, naming the Rust type.
        message: String,
    },
    /// The program runs alone (no `mpirun`, or `mpirun -n 1`): there is no rank to serve
    /// tasks. Run it with `mpirun -n N` (N ≥ 2), or use the local `mp_pool::Pool`.
    #[error(
        "this program runs as a single MPI process: an MPI pool needs worker ranks \
         (start it with `mpirun -n N`, N >= 2, or use the local mp_pool::Pool)"
    )]
    NoWorkerRanks,
    /// MPI was already initialised in this process (by an earlier pool, or by other code):
    /// MPI can be initialised only once per process.
    #[error("MPI was already initialised in this process; an MPI pool can be started only once")]
    AlreadyInitialized,
    /// Some ranks run a different executable (an MPMD launch such as `mpirun -n 1 a : -n 2
    /// b`): functions are named by their address in the executable, so every rank must run
    /// the same one. The job was shut down cleanly.
    #[error(
        "MPI ranks {ranks:?} run a different executable than rank 0; every rank must run the same program"
    )]
    MismatchedExecutable {
        /// The ranks whose executable differs from rank 0's.
        ranks: Vec<i32>,
    },
    /// The thread that owns MPI on this rank died (a bug: it is reported rather than hung on).
    #[error("the MPI dispatcher thread failed: {0}")]
    DispatcherFailed(String),
    /// The pool was closed: it accepts no new tasks.
    #[error("the pool is closed and accepts no new tasks")]
    Closed,
    /// The pool was terminated (explicitly or by being dropped) before the task finished.
    #[error("the pool was terminated before the task finished")]
    Terminated,
    /// A `*_timeout` call ran out of time. Nothing was lost: the call can be repeated.
    #[error("timed out waiting for the pool")]
    Timeout,
    /// A chunk size of 0 was asked for.
    #[error("chunksize must be at least 1")]
    InvalidChunksize,
    /// `join` was called on a pool that is still open (call `close` or `terminate` first).
    #[error("join() needs a closed or terminated pool: call close() first")]
    StillOpen,
    /// The result was already taken by an earlier `get`.
    #[error("the result was already taken by an earlier get")]
    AlreadyTaken,
    /// The task was withdrawn before it ran. An [`MpiPool`](crate::MpiPool) does not
    /// withdraw tasks today (`cancel` returns `false`); the variant exists because
    /// [`MpiAsyncResult`](crate::MpiAsyncResult) is mp-pool's result type, which can.
    #[error("the task was cancelled before it ran")]
    Cancelled,
}

impl mp_pool::ResultError for MpiPoolError {
    fn timeout() -> Self {
        MpiPoolError::Timeout
    }
    fn already_taken() -> Self {
        MpiPoolError::AlreadyTaken
    }
    fn cancelled() -> Self {
        MpiPoolError::Cancelled
    }
    fn is_cancelled(&self) -> bool {
        *self == MpiPoolError::Cancelled
    }
}

impl MpiPoolError {
    /// Turns what a worker rank reported about a task into an error.
    pub(crate) fn from_task_failure(rank: i32, failure: TaskFailure) -> MpiPoolError {
        match failure {
            TaskFailure::Panicked(report) => MpiPoolError::Panicked { rank, report },
            TaskFailure::BadArguments(message) => MpiPoolError::BadArguments { rank, message },
            TaskFailure::BadResult(message) => MpiPoolError::BadResult { rank, message },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_names_the_rank_and_the_location() {
        let report = PanicReport {
            message: "boom".into(),
            location: Some("src/x.rs:1:2".into()),
            backtrace: None,
        };
        let error = MpiPoolError::from_task_failure(3, TaskFailure::Panicked(report));
        assert_eq!(
            error.to_string(),
            "task panicked at src/x.rs:1:2: boom (on MPI rank 3)"
        );
    }
}
