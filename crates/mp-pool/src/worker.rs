//! The worker process: runs the initializer, then chunks of tasks until told to stop, its
//! task budget (`maxtasksperchild`) is spent, or the pool is gone.
//!
//! A chunk is run through a *chunk trampoline*: for a task function `F`, the function
//! [`run_chunk::<M, F>`](run_chunk) takes the `Vec` of a chunk's arguments and returns the
//! `Vec` of results. It is itself a non-capturing function, so mp-core can name it across
//! processes ([`FunctionId::of_task`]) and run it with panics caught; one decode and one encode
//! per chunk instead of per item is what makes small tasks cheap.

use std::time::{Duration, Instant};

use mp_core::{Entry, FunctionId};
#[cfg(test)]
use mp_core::TaskFailure;
use serde::{Deserialize, Serialize};

use crate::transport::{
    Bytes, ChunkResult, Report, ReportSender, TaskMessage, TaskReceiver, WorkerId,
};

/// A function to run once in each worker before its first task, with its encoded arguments.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Initializer {
    pub function: FunctionId,
    pub args: Vec<u8>,
}

/// Everything a worker process is started with.
#[derive(Serialize, Deserialize)]
pub(crate) struct WorkerArgs {
    pub id: WorkerId,
    pub tasks: TaskReceiver,
    pub reports: ReportSender,
    pub initializer: Option<Initializer>,
    /// Chunks to run before exiting (`maxtasksperchild`); `None`: no limit.
    pub max_tasks: Option<usize>,
}

/// Results are sent at the end of each batch, and in between once this much time has passed
/// since the last send (so a slow batch still streams its results)...
const FLUSH_INTERVAL: Duration = Duration::from_micros(200);
/// ...or once this many result bytes wait.
const FLUSH_BYTES: usize = 64 * 1024;

/// The worker's main function (runs in the worker process).
pub(crate) fn serve(args: WorkerArgs) {
    let WorkerArgs { id, tasks, reports, initializer, max_tasks } = args;
    let pid = std::process::id();
    let _span = tracing::debug_span!("pool_worker", worker = %id, pid).entered();
    if let Some(initializer) = initializer {
        // SAFETY: the id was made by `FunctionId::of_task` in the parent, which runs this
        // same executable.
        if let Err(failure) = unsafe { initializer.function.call_task(&initializer.args) } {
            tracing::error!(%failure, "pool worker initializer failed");
            let _ = reports.send(Report::InitializerFailed { worker: id, pid, failure });
            return;
        }
    }
    if reports.send(Report::Ready { worker: id, pid }).is_err() {
        return;
    }
    tracing::debug!("pool worker ready");
    let mut done = 0usize;
    while max_tasks.is_none_or(|max| done < max) {
        let batch = match tasks.recv() {
            Ok(TaskMessage::Run(batch)) => batch,
            Ok(TaskMessage::Stop) => break,
            Err(e) => {
                tracing::debug!(%e, "pool gone; pool worker exits");
                return;
            }
        };
        let mut results = Vec::with_capacity(batch.len());
        let mut pending_bytes = 0;
        let mut last_flush = Instant::now();
        for chunk in batch {
            let started = Instant::now();
            // SAFETY: the id was made by `FunctionId::of_task` (on a chunk trampoline) in the
            // parent, which runs this same executable.
            let outcome = unsafe { chunk.function.call_task(chunk.payload.as_bytes()) };
            let finished = Instant::now();
            pending_bytes += outcome.as_ref().map_or(0, Vec::len);
            results.push(ChunkResult {
                seq: chunk.seq,
                elapsed_ns: u64::try_from((finished - started).as_nanos()).unwrap_or(u64::MAX),
                outcome: outcome.map(Bytes),
            });
            done += 1;
            if pending_bytes >= FLUSH_BYTES || finished - last_flush >= FLUSH_INTERVAL {
                let results = std::mem::take(&mut results);
                if reports.send(Report::Results { worker: id, results }).is_err() {
                    return;
                }
                pending_bytes = 0;
                last_flush = Instant::now();
            }
        }
        if !results.is_empty() && reports.send(Report::Results { worker: id, results }).is_err()
        {
            return;
        }
    }
    tracing::debug!(tasks = done, "pool worker exits");
}

/// The chunk trampoline of `F`, named across processes.
pub(crate) fn chunk_function<M: 'static, F: Entry<M>>(_: &F) -> FunctionId {
    FunctionId::of_task(&run_chunk::<M, F>)
}

/// The id of `F`'s own task trampoline (one argument in, one result out), for initializers.
pub(crate) fn task_function<M, F: Entry<M>>(function: &F) -> FunctionId {
    FunctionId::of_task(function)
}

/// Runs `F` on every argument of a chunk.
fn run_chunk<M, F: Entry<M>>(args: Vec<F::Args>) -> Vec<F::Output> {
    let function = zero_sized_value::<F>();
    args.into_iter().map(|a| function.call(a)).collect()
}

/// The one value of a zero-sized function type (what mp-core does to call a function it
/// named by address; mp-core does not export its helper).
fn zero_sized_value<F: Copy>() -> F {
    const { assert!(size_of::<F>() == 0, "pool tasks must be non-capturing functions") };
    // SAFETY: F is zero-sized (checked at compile time above), so reading it touches no
    // memory. It is inhabited: this is only reached through a chunk trampoline, whose id the
    // parent made from a value of F (`chunk_function` takes `&F`), and `Entry` requires F to
    // be `Copy`, so conjuring another value of it duplicates nothing that has a destructor.
    unsafe { std::ptr::NonNull::<F>::dangling().read() }
}

/// Why a worker's chunk failed, for tests of the trampoline.
#[cfg(test)]
fn run_encoded<M: 'static, F: Entry<M>>(
    function: &F,
    args: &[F::Args],
) -> Result<Vec<F::Output>, TaskFailure>
where
    F::Args: Clone,
{
    let id = chunk_function(function);
    let input = postcard::to_allocvec(args).expect("encodable");
    // SAFETY: the id was made by `FunctionId::of_task` in this process.
    let output = unsafe { id.call_task(&input) }?;
    Ok(postcard::from_bytes(&output).expect("decodable"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn square(x: u64) -> u64 {
        x * x
    }

    #[test]
    fn a_chunk_runs_every_item_in_order() {
        assert_eq!(run_encoded(&square, &[1, 2, 3]).unwrap(), vec![1, 4, 9]);
        assert_eq!(run_encoded(&square, &[]).unwrap(), Vec::<u64>::new());
        let sum = |(a, b): (u32, u32)| a + b;
        assert_eq!(run_encoded(&sum, &[(1, 2), (3, 4)]).unwrap(), vec![3, 7]);
    }

    #[test]
    fn a_panic_in_a_chunk_is_reported_with_its_location() {
        let picky = |x: u32| -> u32 {
            assert!(x != 2, "two is not allowed");
            x
        };
        match run_encoded(&picky, &[1, 2, 3]) {
            Err(TaskFailure::Panicked(report)) => {
                assert_eq!(report.message, "two is not allowed");
                assert!(report.location.unwrap().contains("worker.rs"));
            }
            other => panic!("expected a panic report, got {other:?}"),
        }
    }
}
