//! The pool's scheduler: which worker runs which chunk, what happens to a dead worker's
//! chunks, and when workers are replaced. Everything here runs under one lock, held briefly;
//! results are delivered to their jobs after it is released.
//!
//! # Per-worker queues, fed by the parent
//!
//! Every worker has its own task link, and chunks wait in the parent (`pending`) until a
//! worker has room. Why not one shared queue that workers pull from (Python's design) or
//! work stealing?
//!
//! * **Knowing who held what.** A worker can die at any instruction. With per-worker links
//!   the parent knows exactly which chunks were on the dead worker's link; the worker runs
//!   them in order and records the one it starts in a shared progress word, so the parent
//!   knows which chunk it was running (that one fails), which ran before it, and which never
//!   started (those are re-queued for the other workers). With a shared queue, a task taken
//!   by a worker that dies before saying so is simply lost: that is how CPython's `Pool`
//!   hangs forever.
//! * **Cheap links.** Each link has exactly one producer and one consumer, the cheapest queue
//!   there is, and nothing is contended between workers.
//! * **Balance without stealing.** The parent keeps only about `AHEAD_NS` (0.5 ms) of
//!   work, by the measured time per chunk, queued on each worker (at least one chunk, at
//!   most `MAX_DEPTH`); the rest waits in the parent and goes to whichever worker frees up.
//!   Slow chunks are therefore handed out one at a time (an idle worker never waits behind a
//!   busy one's queue), while tiny chunks travel in batches deep enough to hide the wake-up
//!   latency. The price: a chunk far slower than the running average holds up the chunks
//!   queued behind it on its worker (about `AHEAD_NS` of expected work); they are not stolen
//!   back, which would need a claim protocol with the worker on every chunk, for a case that
//!   the measured average already keeps small.

use std::collections::VecDeque;
use std::sync::Arc;

use mp_core::FunctionId;

use crate::error::{PoolError, describe_exit, status_of_exitcode};
use crate::job::{ChunkOutcome, Job};
use crate::supervisor::Commands;
use crate::transport::{
    BATCH_BYTES, ChunkResult, MAX_MESSAGES_IN_FLIGHT, Payload, Progress, TaskChunk, TaskMessage,
    TaskSender, TransportError, WorkerId,
};

/// How much work (by the running average of chunk times) to keep queued on each worker.
pub(crate) const AHEAD_NS: f64 = 500_000.0;
/// The most chunks queued on one worker.
pub(crate) const MAX_DEPTH: usize = 256;
/// Chunks queued per worker before any chunk time has been measured: one, so that slow
/// first tasks spread over the workers as they become ready.
const INITIAL_DEPTH: usize = 1;
/// Workers that die before becoming ready, in a row, before the pool gives up.
const MAX_STARTUP_FAILURES: usize = 3;

/// Python's default `chunksize` for `map`: about four chunks per worker
/// (`divmod(len, 4 * workers)`, plus one when there is a remainder).
pub(crate) fn default_chunksize(items: usize, workers: usize) -> usize {
    let per = 4 * workers.max(1);
    (items / per + usize::from(!items.is_multiple_of(per))).max(1)
}

/// A piece of a job: a few items' encoded arguments and where their results go.
pub(crate) struct Chunk {
    pub job: Arc<dyn Job>,
    pub index: usize,
    pub items: usize,
    pub function: FunctionId,
    pub payload: Payload,
}

/// A delivery to make once the lock is released.
pub(crate) type Delivery = (Arc<dyn Job>, ChunkOutcome);

/// Whether the pool takes new work.
#[derive(Clone, Debug)]
pub(crate) enum Mode {
    Open,
    Closed,
    Terminated,
    /// A worker could not be started or initialized: nothing more runs.
    Broken(PoolError),
}

struct Assigned {
    seq: u64,
    chunk: Chunk,
}

/// A worker process as the scheduler knows it.
struct Worker {
    id: WorkerId,
    /// Known once the worker reports ready (or the supervisor reports its start).
    pid: u32,
    sender: TaskSender,
    /// The chunk it last started, readable after its death.
    progress: Progress,
    ready: bool,
    /// Unanswered batches, oldest first (the worker runs them in this order).
    batches: VecDeque<VecDeque<Assigned>>,
    in_flight: usize,
    /// Chunks it may still be given (`maxtasksperchild`).
    budget: Option<usize>,
    /// No more chunks go to it: its budget is spent, the pool is stopping, or its link broke.
    draining: bool,
    /// Its link was found full: no more chunks until it answers.
    congested: bool,
}

/// The scheduler's state (behind the pool's lock).
pub(crate) struct Scheduler {
    mode: Mode,
    /// Set by `join` once idle: workers get no more work and are not replaced.
    stopping: bool,
    pending: VecDeque<Chunk>,
    workers: Vec<Worker>,
    processes: usize,
    max_tasks: Option<usize>,
    has_initializer: bool,
    /// Worker starts asked of the supervisor and not yet registered.
    starts_requested: usize,
    startup_failures: usize,
    next_seq: u64,
    /// Running average of the time a worker spends on one chunk, in nanoseconds.
    chunk_ns: Option<f64>,
    commands: Arc<Commands>,
}

impl Scheduler {
    pub(crate) fn new(
        processes: usize,
        max_tasks: Option<usize>,
        has_initializer: bool,
        commands: Arc<Commands>,
    ) -> Self {
        Scheduler {
            mode: Mode::Open,
            stopping: false,
            pending: VecDeque::new(),
            workers: Vec::new(),
            processes,
            max_tasks,
            has_initializer,
            starts_requested: 0,
            startup_failures: 0,
            next_seq: 0,
            chunk_ns: None,
            commands,
        }
    }

    /// Asks the supervisor for as many workers as are missing.
    pub(crate) fn request_workers(&mut self) {
        if !matches!(self.mode, Mode::Open | Mode::Closed) || self.stopping {
            return;
        }
        let have = self.workers.iter().filter(|w| !w.draining).count() + self.starts_requested;
        for _ in have..self.processes {
            self.starts_requested += 1;
            self.commands.start_worker();
        }
    }

    /// Whether new chunks are accepted, and if not, why.
    pub(crate) fn accepting(&self) -> Result<(), PoolError> {
        match &self.mode {
            Mode::Open => Ok(()),
            Mode::Closed => Err(PoolError::Closed),
            Mode::Terminated => Err(PoolError::Terminated),
            Mode::Broken(error) => Err(error.clone()),
        }
    }

    /// Queues chunks and hands out what the workers have room for.
    pub(crate) fn enqueue(&mut self, chunks: Vec<Chunk>) -> Result<(), PoolError> {
        self.accepting()?;
        tracing::trace!(chunks = chunks.len(), "chunks submitted");
        self.pending.extend(chunks);
        self.dispatch();
        Ok(())
    }

    /// No chunk waits or runs.
    pub(crate) fn is_idle(&self) -> bool {
        self.pending.is_empty() && self.workers.iter().all(|w| w.in_flight == 0)
    }

    /// The pids of the workers that are running (started and not yet reported dead).
    pub(crate) fn worker_pids(&self) -> Vec<u32> {
        self.workers
            .iter()
            .filter(|w| w.pid != 0)
            .map(|w| w.pid)
            .collect()
    }

    pub(crate) fn mode(&self) -> &Mode {
        &self.mode
    }

    /// Python's `close`: no new chunks; those submitted still run.
    pub(crate) fn close(&mut self) {
        if matches!(self.mode, Mode::Open) {
            self.mode = Mode::Closed;
        }
    }

    /// The end of `join`: tells every worker to finish. Workers registered later are refused.
    pub(crate) fn stop_workers(&mut self) {
        self.stopping = true;
        for worker in &mut self.workers {
            worker.draining = true;
            if let Err(e) = worker.sender.send(&TaskMessage::Stop) {
                tracing::debug!(worker = %worker.id, %e, "could not tell a pool worker to stop");
                self.commands.kill(worker.id);
            }
        }
    }

    /// Python's `terminate`: every chunk, waiting or running, fails with
    /// [`PoolError::Terminated`]; workers are forgotten (the supervisor kills them).
    pub(crate) fn terminate(&mut self) -> Vec<Delivery> {
        self.mode = Mode::Terminated;
        self.stopping = true;
        let mut deliveries = Vec::new();
        let running = self
            .workers
            .drain(..)
            .flat_map(|w| w.batches)
            .flatten()
            .map(|a| a.chunk);
        for chunk in running.chain(self.pending.drain(..)).collect::<Vec<_>>() {
            deliveries.push(fail(chunk, PoolError::Terminated));
        }
        deliveries
    }

    /// The supervisor is about to start a worker: record its link. Refused (false) once the
    /// pool stops or breaks.
    pub(crate) fn register_worker(
        &mut self,
        id: WorkerId,
        sender: TaskSender,
        progress: Progress,
    ) -> bool {
        self.starts_requested = self.starts_requested.saturating_sub(1);
        if self.stopping || !matches!(self.mode, Mode::Open | Mode::Closed) {
            return false;
        }
        self.workers.push(Worker {
            id,
            pid: 0,
            sender,
            progress,
            ready: false,
            batches: VecDeque::new(),
            in_flight: 0,
            budget: self.max_tasks,
            draining: false,
            congested: false,
        });
        true
    }

    /// The supervisor started the worker (its pid is known now).
    pub(crate) fn worker_started(&mut self, id: WorkerId, pid: u32) {
        if let Some(worker) = self.worker_mut(id) {
            worker.pid = pid;
        }
    }

    /// The supervisor could not start a worker: the pool is broken.
    pub(crate) fn start_failed(&mut self, id: Option<WorkerId>, message: String) -> Vec<Delivery> {
        if let Some(id) = id {
            self.workers.retain(|w| w.id != id);
        } else {
            self.starts_requested = self.starts_requested.saturating_sub(1);
        }
        tracing::error!(%message, "could not start a pool worker");
        self.break_pool(PoolError::StartFailed(message))
    }

    pub(crate) fn worker_ready(&mut self, id: WorkerId, pid: u32) {
        if let Some(worker) = self.worker_mut(id) {
            worker.pid = pid;
            worker.ready = true;
            self.startup_failures = 0;
            tracing::debug!(worker = %id, pid, "pool worker ready");
        }
        self.dispatch();
    }

    /// Results from a worker: matches them with their chunks and hands out more work.
    pub(crate) fn results(&mut self, id: WorkerId, results: Vec<ChunkResult>) -> Vec<Delivery> {
        let mut deliveries = Vec::with_capacity(results.len());
        let Some(worker) = self.workers.iter_mut().find(|w| w.id == id) else {
            return deliveries; // terminated meanwhile
        };
        let pid = worker.pid;
        worker.congested = false;
        let mut total_ns = 0f64;
        for result in results {
            let Some(assigned) = take_assigned(worker, result.seq) else {
                tracing::warn!(worker = %id, seq = result.seq, "result for an unknown chunk");
                continue;
            };
            total_ns += result.elapsed_ns as f64;
            let chunk = assigned.chunk;
            tracing::trace!(worker = %id, seq = assigned.seq, index = chunk.index, "chunk done");
            let result = match result.outcome {
                Ok(bytes) => Ok((pid, bytes.0)),
                Err(failure) => Err(PoolError::from_task_failure(pid, failure)),
            };
            deliveries.push((
                chunk.job,
                ChunkOutcome {
                    index: chunk.index,
                    items: chunk.items,
                    result,
                },
            ));
        }
        if !deliveries.is_empty() {
            let sample = total_ns / deliveries.len() as f64;
            self.chunk_ns = Some(match self.chunk_ns {
                None => sample,
                Some(average) => average + (sample - average) / 8.0,
            });
        }
        self.dispatch();
        deliveries
    }

    /// A worker process ended (reported by the supervisor after everything it sent).
    ///
    /// Of its unanswered chunks, those up to the last one it started (its progress word says
    /// which) fail with [`PoolError::WorkerDied`]: it was running the last one, and the
    /// results of the others died with it. The chunks after it never started: they go back
    /// to the head of the queue, in order, for the other workers. A replacement is requested.
    ///
    /// A worker that dies before becoming ready failed its initializer, if there is one (the
    /// pool is then broken: no retry); otherwise repeated early deaths break the pool too.
    pub(crate) fn worker_exited(
        &mut self,
        id: WorkerId,
        exitcode: i32,
        failure: Option<String>,
    ) -> Vec<Delivery> {
        let mut deliveries = Vec::new();
        let Some(position) = self.workers.iter().position(|w| w.id == id) else {
            return deliveries;
        };
        let worker = self.workers.remove(position);
        let (pid, status) = (worker.pid, status_of_exitcode(exitcode));
        let started = worker.progress.last_started();
        let mut not_started = Vec::new();
        for assigned in worker.batches.into_iter().flatten() {
            if started.is_some_and(|last| assigned.seq <= last) {
                deliveries.push(fail(assigned.chunk, PoolError::WorkerDied { pid, status }));
            } else {
                not_started.push(assigned.chunk);
            }
        }
        if !deliveries.is_empty() {
            tracing::warn!(
                worker = %id,
                pid,
                exitcode,
                failed = deliveries.len(),
                requeued = not_started.len(),
                "pool worker died while running tasks"
            );
        } else if worker.draining || self.stopping {
            tracing::debug!(worker = %id, pid, exitcode, "pool worker exited");
        } else {
            tracing::warn!(worker = %id, pid, exitcode, "idle pool worker died");
        }
        for chunk in not_started.into_iter().rev() {
            self.pending.push_front(chunk);
        }
        if !worker.ready && !worker.draining {
            if self.has_initializer {
                let message = failure.unwrap_or_else(|| {
                    format!("the worker {} during initialization", describe_exit(status))
                });
                tracing::error!(worker = %id, pid, %message, "pool initializer failed");
                deliveries.extend(self.break_pool(PoolError::InitializerFailed { pid, message }));
            } else {
                self.startup_failures += 1;
                if self.startup_failures >= MAX_STARTUP_FAILURES {
                    let message = format!(
                        "{} workers in a row died before becoming ready (the last {})",
                        self.startup_failures,
                        describe_exit(status)
                    );
                    deliveries.extend(self.break_pool(PoolError::StartFailed(message)));
                }
            }
        }
        if matches!(self.mode, Mode::Broken(_)) {
            let error = self.broken_error();
            deliveries.extend(self.pending.drain(..).map(|c| fail(c, error.clone())));
        }
        self.request_workers();
        self.dispatch();
        deliveries
    }

    fn broken_error(&self) -> PoolError {
        match &self.mode {
            Mode::Broken(error) => error.clone(),
            _ => PoolError::Terminated,
        }
    }

    /// Stops the pool for good with `error`: waiting chunks fail with it, and so will new
    /// submissions. Running chunks finish.
    fn break_pool(&mut self, error: PoolError) -> Vec<Delivery> {
        if matches!(self.mode, Mode::Open | Mode::Closed) {
            self.mode = Mode::Broken(error);
        }
        let error = self.broken_error();
        self.pending
            .drain(..)
            .map(|c| fail(c, error.clone()))
            .collect()
    }

    fn worker_mut(&mut self, id: WorkerId) -> Option<&mut Worker> {
        self.workers.iter_mut().find(|w| w.id == id)
    }

    /// Chunks to keep queued on one worker.
    fn depth(&self) -> usize {
        match self.chunk_ns {
            None => INITIAL_DEPTH,
            Some(ns) => ((AHEAD_NS / ns.max(1.0)) as usize).clamp(1, MAX_DEPTH),
        }
    }

    /// Hands waiting chunks to workers with room, least loaded first, a fair share each,
    /// batched into as few messages as the inline limit allows.
    fn dispatch(&mut self) {
        if !matches!(self.mode, Mode::Open | Mode::Closed) {
            return;
        }
        let depth = self.depth();
        loop {
            while self.pending.front().is_some_and(|c| c.job.is_cancelled()) {
                self.pending.pop_front();
            }
            if self.pending.is_empty() {
                return;
            }
            let has_room = |w: &Worker| {
                w.ready
                    && !w.draining
                    && !w.congested
                    && w.in_flight < depth
                    && w.batches.len() < MAX_MESSAGES_IN_FLIGHT
            };
            let eligible = self.workers.iter().filter(|w| has_room(w)).count();
            let Some(worker) = self
                .workers
                .iter_mut()
                .filter(|w| has_room(w))
                .min_by_key(|w| w.in_flight)
            else {
                return;
            };
            let share = self.pending.len().div_ceil(eligible);
            let room = (depth - worker.in_flight)
                .min(share)
                .min(worker.budget.unwrap_or(usize::MAX));
            let mut batch = VecDeque::with_capacity(room);
            let mut message = Vec::with_capacity(room);
            let mut bytes = 0;
            while batch.len() < room {
                let Some(chunk) = self.pending.front() else {
                    break;
                };
                if chunk.job.is_cancelled() {
                    self.pending.pop_front();
                    continue;
                }
                let size = chunk.payload.len();
                if !batch.is_empty() && bytes + size > BATCH_BYTES {
                    break;
                }
                let Some(chunk) = self.pending.pop_front() else {
                    break;
                };
                bytes += size;
                let seq = self.next_seq;
                self.next_seq += 1;
                message.push(TaskChunk {
                    seq,
                    function: chunk.function,
                    payload: chunk.payload.clone(),
                });
                batch.push_back(Assigned { seq, chunk });
            }
            if batch.is_empty() {
                continue;
            }
            let count = batch.len();
            match worker.sender.send(&TaskMessage::Run(message)) {
                Ok(()) => {
                    let first_seq = batch[0].seq;
                    tracing::trace!(worker = %worker.id, chunks = count, first_seq, "dispatch");
                }
                Err(TransportError::Full) if worker.in_flight > 0 => {
                    // Not expected (see the transport's contract): take the chunks back and
                    // give this worker nothing more until it answers.
                    tracing::warn!(worker = %worker.id, "pool worker's task link is full");
                    worker.congested = true;
                    for assigned in batch.into_iter().rev() {
                        self.pending.push_front(assigned.chunk);
                    }
                    continue;
                }
                Err(e) => {
                    // Its chunks stay assigned: they are settled when its exit is reported.
                    tracing::warn!(worker = %worker.id, %e, "pool worker link broke; killing it");
                    worker.draining = true;
                    self.commands.kill(worker.id);
                }
            }
            worker.in_flight += count;
            worker.batches.push_back(batch);
            let mut retiring = false;
            if let Some(budget) = &mut worker.budget {
                *budget -= count;
                // It exits after these; its replacement can start now.
                retiring = *budget == 0;
                worker.draining |= retiring;
            }
            if retiring {
                self.request_workers();
            }
        }
    }
}

/// Removes the chunk `seq` from the worker's unanswered batches (normally the very first).
fn take_assigned(worker: &mut Worker, seq: u64) -> Option<Assigned> {
    let (b, i) = worker
        .batches
        .iter()
        .enumerate()
        .find_map(|(b, batch)| batch.iter().position(|a| a.seq == seq).map(|i| (b, i)))?;
    let assigned = worker.batches[b].remove(i)?;
    if worker.batches[b].is_empty() {
        worker.batches.remove(b);
    }
    worker.in_flight -= 1;
    Some(assigned)
}

fn fail(chunk: Chunk, error: PoolError) -> Delivery {
    (
        chunk.job,
        ChunkOutcome {
            index: chunk.index,
            items: chunk.items,
            result: Err(error),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_chunksize_follows_python() {
        // Python: chunksize, extra = divmod(len, 4 * workers); chunksize += bool(extra)
        assert_eq!(default_chunksize(1_000_000, 2), 125_000);
        assert_eq!(default_chunksize(100, 4), 7);
        assert_eq!(default_chunksize(16, 4), 1);
        assert_eq!(default_chunksize(17, 4), 2);
        assert_eq!(default_chunksize(5, 4), 1);
        assert_eq!(default_chunksize(0, 4), 1);
    }
}
