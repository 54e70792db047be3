//! The worker process: runs the initializer, then chunks of tasks until told to stop, its
//! task budget (`maxtasksperchild`) is spent, or the pool is gone.
//!
//! A chunk is run through a *chunk trampoline*: for a task function `F`, the function
//! [`run_chunk::<M, F>`](run_chunk) takes the `Vec` of a chunk's arguments and returns the
//! `Vec` of results. It is itself a non-capturing function, so mp-core can name it across
//! processes ([`FunctionId::of_task`]) and run it with panics caught; one decode and one encode
//! per chunk instead of per item is what makes small tasks cheap.

use std::time::{Duration, Instant};

use mp_core::{Child, Entry, FunctionId, Process, ProcessError, StartMethod, TaskFailure};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::bulk::{Inbox, Outbox};
use crate::transport::{
    Arguments, Bytes, ChunkResult, Report, ResultBytes, TaskMessage, TaskReceiver, WorkerId,
};

/// Everything a worker process is started with (besides its initializer's arguments).
#[derive(Serialize, Deserialize)]
pub(crate) struct WorkerArgs {
    pub id: WorkerId,
    /// Its task link, whose first message is [`TaskMessage::Setup`] (the report link and
    /// its claim counter).
    pub tasks: TaskReceiver,
    /// Chunks to run before exiting (`maxtasksperchild`); `None`: no limit.
    pub max_tasks: Option<usize>,
}

type LaunchFn =
    dyn Fn(WorkerArgs, String, StartMethod) -> Result<Child<()>, ProcessError> + Send + Sync;

/// Starts worker processes: with or without an initializer, whose arguments travel with the
/// worker's own (over ipc-channel, so handles of mp-ipc primitives in them arrive as the same
/// objects, as with Python's `initargs`).
pub(crate) struct Launcher {
    launch: Box<LaunchFn>,
    has_initializer: bool,
}

impl Launcher {
    /// Workers that start serving at once.
    pub(crate) fn plain() -> Self {
        Launcher {
            launch: Box::new(|args, name, method| {
                Process::new(serve)
                    .args(args)
                    .name(name)
                    .daemon(true)
                    .start_method(method)
                    .start()
            }),
            has_initializer: false,
        }
    }

    /// Workers that first run `initializer(args.clone())`.
    pub(crate) fn with_initializer<M: 'static, F: Entry<M>>(_initializer: F, args: F::Args) -> Self
    where
        F::Args: Clone,
    {
        let args = Mutex::new(args);
        Launcher {
            launch: Box::new(move |worker, name, method| {
                Process::new(serve_initialized::<M, F>)
                    .args((worker, args.lock().clone()))
                    .name(name)
                    .daemon(true)
                    .start_method(method)
                    .start()
            }),
            has_initializer: true,
        }
    }

    pub(crate) fn has_initializer(&self) -> bool {
        self.has_initializer
    }

    /// Starts a worker process named `name`.
    pub(crate) fn launch(
        &self,
        args: WorkerArgs,
        name: String,
        method: StartMethod,
    ) -> Result<Child<()>, ProcessError> {
        (self.launch)(args, name, method)
    }
}

/// The entry of a worker with an initializer. A panicking initializer ends the process with
/// a panic report, which the pool reads when it reaps the worker.
fn serve_initialized<M, F: Entry<M>>((worker, args): (WorkerArgs, F::Args)) {
    keep_freed_memory();
    tracing::debug!(worker = %worker.id, "running the pool initializer");
    F::recreate().call(args);
    serve(worker);
}

/// Results of one group (see [`TaskChunk::group`](crate::transport::TaskChunk)) wait for
/// the group's next chunk at most this long...
const HOLD_TIME: Duration = Duration::from_micros(200);
/// ...or until this many result bytes wait.
const HOLD_BYTES: usize = 64 * 1024;

/// The worker's main loop (runs in the worker process).
///
/// Each chunk is claimed (see [`Claims`]) before it starts, and its result is sent the
/// moment it ends: nothing finished waits behind the next chunk, however slow, and a worker
/// that dies loses only the chunk it was running. The one exception changes nothing anyone
/// can see: successful results of a job that is only observed as a whole (a `map`) may be
/// held while the same job's next chunk runs (at most [`HOLD_TIME`]), and sent with its
/// result. If the worker dies meanwhile, that job fails anyway. Chunks the pool revoked
/// are skipped, and the skip is reported so that the pool knows the message was read.
pub(crate) fn serve(args: WorkerArgs) {
    let WorkerArgs {
        id,
        tasks,
        max_tasks,
    } = args;
    keep_freed_memory();
    let pid = std::process::id();
    let _span = tracing::debug_span!("pool_worker", worker = %id, pid).entered();
    let (reports, claims) = match tasks.recv() {
        Ok(TaskMessage::Setup { reports, claims }) => (reports, claims),
        Ok(_) => {
            tracing::error!("a pool worker's first message was not its setup; it exits");
            return;
        }
        Err(e) => {
            tracing::debug!(%e, "pool gone before the worker's setup arrived; it exits");
            return;
        }
    };
    if reports.send(Report::Ready { worker: id, pid }).is_err() {
        return;
    }
    tracing::debug!("pool worker ready");
    // Large payloads: arguments arrive in, results leave through, a reused region each.
    let mut arguments_region = Inbox::default();
    let mut results_region = Outbox::default();
    let send = |results: &mut Vec<ChunkResult>, outbox: &mut Outbox| {
        let results = std::mem::take(results);
        if results.is_empty() {
            return true;
        }
        let sent = reports
            .send(Report::Results {
                worker: id,
                results,
            })
            .is_ok();
        outbox.sent(sent);
        sent
    };
    let mut done = 0usize;
    while max_tasks.is_none_or(|max| done < max) {
        let batch = match tasks.recv() {
            Ok(TaskMessage::Run(batch)) => batch,
            Ok(TaskMessage::Stop) => break,
            Ok(TaskMessage::Setup { .. }) => {
                tracing::error!("a second setup on a pool worker's link; ignored");
                continue;
            }
            Err(e) => {
                tracing::debug!(%e, "pool gone; pool worker exits");
                return;
            }
        };
        let mut skipped = None;
        // Results held for their group: the group, since when, how many bytes.
        let mut held = Vec::new();
        // One clock reading per chunk (they cost ~50 ns each here, as much as a small task):
        // when a chunk ends is when the next one starts, unless a report was sent between.
        let mut now = Instant::now();
        let mut clock_stale = false;
        let (mut held_group, mut held_since, mut held_bytes) = (0, now, 0);
        for chunk in batch {
            // Opened before the claim, so that a skipped chunk frees its region too.
            let arguments = Arguments::open(chunk.payload, &mut arguments_region);
            if !claims.claim(chunk.seq) {
                skipped = Some(chunk.seq);
                continue;
            }
            let hold_on = chunk.group != 0
                && !chunk.report_start
                && chunk.group == held_group
                && held_bytes < HOLD_BYTES
                && now.saturating_duration_since(held_since) < HOLD_TIME;
            if !hold_on {
                clock_stale |= !held.is_empty();
                if !send(&mut held, &mut results_region) {
                    return;
                }
            }
            if chunk.report_start {
                clock_stale = true;
                // Its deadline starts now: the pool kills this process if it passes.
                let started = Report::Started {
                    worker: id,
                    seq: chunk.seq,
                };
                if reports.send(started).is_err() {
                    return;
                }
            }
            let _chunk = tracing::trace_span!("chunk", seq = chunk.seq).entered();
            let started = if std::mem::take(&mut clock_stale) {
                Instant::now()
            } else {
                now
            };
            let outcome = match arguments.bytes() {
                // SAFETY: the id was made by `FunctionId::of_task` (on a chunk trampoline) in
                // the parent, which runs this same executable.
                Some(bytes) => unsafe { chunk.function.call_task(bytes) },
                None => Err(TaskFailure::BadArguments(
                    "the chunk's arguments region is missing".into(),
                )),
            };
            drop(arguments);
            now = Instant::now();
            let elapsed = now.saturating_duration_since(started);
            let may_hold = chunk.group != 0 && !chunk.report_start && outcome.is_ok();
            let bytes = outcome.as_ref().map_or(0, Vec::len);
            held.push(ChunkResult {
                seq: chunk.seq,
                elapsed_ns: u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX),
                outcome: outcome.map(|bytes| match results_region.stage(&bytes) {
                    Some(bulk) => ResultBytes::Bulk(bulk),
                    None => ResultBytes::Inline(Bytes::from_vec(bytes)),
                }),
            });
            done += 1;
            if !may_hold {
                clock_stale = true;
                if !send(&mut held, &mut results_region) {
                    return;
                }
            } else if held.len() == 1 {
                (held_group, held_since, held_bytes) = (chunk.group, now, bytes);
            } else {
                held_bytes += bytes;
            }
        }
        if !send(&mut held, &mut results_region) {
            return;
        }
        if let Some(last) = skipped {
            tracing::trace!(last, "skipped revoked chunks");
            if reports.send(Report::Skipped { worker: id, last }).is_err() {
                return;
            }
        }
    }
    tracing::debug!(tasks = done, "pool worker exits");
}

/// Allocations below this size come from the worker's heap (glibc's default is a threshold
/// that adapts between 128 KiB and 32 MiB).
#[cfg(target_env = "gnu")]
const MMAP_THRESHOLD: i32 = 16 << 20;
/// The worker's heap keeps at most this much freed memory at its top before returning it.
#[cfg(target_env = "gnu")]
const TRIM_THRESHOLD: i32 = 32 << 20;

/// Lets the worker process reuse the memory of large payloads instead of faulting in fresh
/// pages for each.
///
/// A chunk with a large payload allocates a few buffers of its size (the decoded arguments,
/// the encoded results) and frees them when it ends. With glibc's defaults, a freed heap top
/// beyond twice the current mmap threshold (about 2 MiB after 1 MiB buffers) is returned to
/// the kernel at once, so the next chunk faults every page in again (256 faults per MiB,
/// each zeroing a page): ~0.5 ms of a 1 MiB echo that otherwise takes ~0.2 ms. Fixed
/// thresholds keep up to [`TRIM_THRESHOLD`] of freed memory in the worker for the next
/// chunk. The worker is the pool's own process; the caller's process is left alone.
fn keep_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: `mallopt` only sets glibc malloc parameters (under malloc's own lock); it has
    // no memory-safety preconditions, and both values are in the ranges glibc accepts (a
    // refused value leaves the default, reported by a 0 return that changes nothing).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// The chunk trampoline of `F`, named across processes.
pub(crate) fn chunk_function<M: 'static, F: Entry<M>>(_: &F) -> FunctionId {
    FunctionId::of_task(&run_chunk::<M, F>)
}

/// Runs `F` on every argument of a chunk.
fn run_chunk<M, F: Entry<M>>(args: Vec<F::Args>) -> Vec<F::Output> {
    let function = F::recreate();
    args.into_iter().map(|a| function.call(a)).collect()
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
