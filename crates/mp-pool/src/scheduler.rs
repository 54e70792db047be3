//! The pool's scheduler: which worker runs which chunk, what happens to a dead worker's
//! chunks, and when workers are replaced. Everything here runs under one lock, held briefly;
//! results are delivered to their jobs after it is released. The bookkeeping is pure: it
//! reaches the world only through a [`WorkerLink`] per worker and a [`Supervisor`], so the
//! unit tests below drive it with fakes (and it runs under Miri).
//!
//! # Per-worker links, fed by the parent, with stealing
//!
//! Every worker has its own task link, and chunks wait in the parent (`pending`) until a
//! worker has room. Why not one shared queue that workers pull from (Python's design)?
//!
//! * **Knowing who holds what.** A worker can die at any instruction. With a shared queue, a
//!   task taken by a worker that dies before saying so is simply lost: that is how CPython's
//!   `Pool` hangs forever. Here every chunk on a worker's link has a sequence number, and
//!   the worker *claims* each one before starting it by a compare-and-swap on a counter in
//!   shared memory ([`Claims`](crate::transport::Claims)). After its death, the counter says
//!   which chunk it was running (that one fails with `WorkerDied`) and which it never
//!   started (re-queued for the others). Results are sent the moment each chunk ends, so
//!   nothing else is lost with it (a `map`'s successful results may ride with its next
//!   chunk's: the map fails as a whole anyway; see `worker.rs`).
//! * **Cheap links.** Each link has one producer and one consumer, the cheapest queue there
//!   is; nothing is contended between workers, and tiny chunks travel in batches deep
//!   enough to hide the wake-up latency (about `AHEAD_NS` of measured work per worker).
//! * **No idle worker while work waits: stealing.** Batching means chunks queue behind the
//!   one running on a worker. When a worker becomes idle while nothing waits in the parent,
//!   the parent revokes the chunks another worker has queued but not claimed (the same
//!   compare-and-swap, from the other side: exactly one side wins each chunk) and hands
//!   them out again, the idle worker first. The busy worker skips revoked chunks when it
//!   reads them and says so, so that the parent knows its link has room again. Stealing
//!   happens only when a worker idles, so it costs nothing while work flows.
//!
//! A shared queue with the same claim protocol would need a multi-consumer ring with
//! per-slot ownership in shared memory; per-worker links plus stealing keep every link
//! single-producer/single-consumer and need one word per worker.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mp_core::FunctionId;

use crate::error::{PoolError, TaskTypes, describe_exit, status_of_exitcode};
use crate::job::{ChunkOutcome, Job};
use crate::transport::{
    BATCH_BYTES, ChunkPayload, ChunkResult, MAX_MESSAGES_IN_FLIGHT, Payload, TaskChunk,
    TaskMessage, TransportError, WorkerId,
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

/// The pool's end of one worker's task link, as the scheduler uses it.
pub(crate) trait WorkerLink: Send {
    /// Sends a message without waiting.
    fn send(&self, message: &TaskMessage) -> Result<(), TransportError>;
    /// Revokes the chunks before `sent` the worker has not claimed; returns the first one
    /// revoked (`sent` if none).
    fn revoke(&self, sent: u64) -> u64;
    /// Chunks below this were claimed by the worker or revoked.
    fn claimed(&self) -> u64;
}

/// What the scheduler asks of the supervisor thread.
pub(crate) trait Supervisor: Send + Sync {
    /// Start one more worker (it registers with [`Scheduler::register_worker`]).
    fn start_worker(&self);
    /// Kill this worker (its exit is reported with [`Scheduler::worker_exited`]).
    fn kill(&self, id: WorkerId);
    /// Call [`Scheduler::expire`] for chunk `seq` of worker `id` at `deadline`.
    fn watch(&self, id: WorkerId, seq: u64, deadline: Instant);
}

/// How long a chunk may run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Limits {
    /// From the moment a worker starts it (per-task timeout).
    pub timeout: Option<Duration>,
    /// The whole call's deadline (`map_timeout`).
    pub deadline: Option<Instant>,
}

impl Limits {
    /// Whether the worker must report when it starts the chunk.
    fn any(&self) -> bool {
        self.timeout.is_some() || self.deadline.is_some()
    }
}

/// A piece of a job: a few items' encoded arguments and where their results go.
pub(crate) struct Chunk {
    pub job: Arc<dyn Job>,
    pub index: usize,
    /// The position of its first item in the job's input.
    pub first_item: usize,
    pub items: usize,
    pub function: FunctionId,
    pub types: TaskTypes,
    pub payload: Payload,
    pub limits: Limits,
}

/// A delivery to make once the lock is released.
pub(crate) type Delivery = (Arc<dyn Job>, ChunkOutcome);

/// Whether the pool takes new work.
#[derive(Clone, Debug)]
pub(crate) enum Mode {
    Open,
    Closed,
    Terminated,
    /// No worker could be started or initialized: nothing more runs.
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
    link: Box<dyn WorkerLink>,
    ready: bool,
    /// Chunks sent and not answered, in sequence order (the order the worker runs them).
    assigned: VecDeque<Assigned>,
    /// The sequence number of the next chunk sent.
    sent: u64,
    /// The first sequence number of each message the worker may not have read yet.
    unread: VecDeque<u64>,
    /// Chunks it may still be given (`maxtasksperchild`).
    budget: Option<usize>,
    /// No more chunks go to it: the pool is stopping, or its link broke.
    draining: bool,
    /// Its link was found full: no more chunks until it answers.
    congested: bool,
}

impl Worker {
    fn has_room(&self, depth: usize) -> bool {
        self.ready
            && !self.draining
            && !self.congested
            && self.budget != Some(0)
            && self.assigned.len() < depth
            && self.unread.len() < MAX_MESSAGES_IN_FLIGHT
    }

    /// The worker answered about chunk `seq`: it has read every message up to it.
    fn read_up_to(&mut self, seq: u64) {
        self.congested = false;
        while self.unread.front().is_some_and(|&first| first <= seq) {
            self.unread.pop_front();
        }
    }

    /// Revokes every chunk it has not claimed and takes them back, in order (the worker
    /// skips them). It will not run them: they no longer count towards its
    /// `maxtasksperchild`.
    fn revoke_unclaimed(&mut self) -> Vec<Assigned> {
        let first = self.link.revoke(self.sent);
        let split = self
            .assigned
            .iter()
            .position(|a| a.seq >= first)
            .unwrap_or(self.assigned.len());
        let taken: Vec<Assigned> = self.assigned.drain(split..).collect();
        if let Some(budget) = &mut self.budget {
            *budget += taken.len();
        }
        taken
    }

    /// How many of its chunks another worker could run sooner: those it has not claimed,
    /// if it is busy with one (started and not answered), or if there are at least two (it
    /// can start only one next). Zero otherwise.
    fn stealable(&self) -> usize {
        let claimed = self.link.claimed();
        let unclaimed = self.sent.saturating_sub(claimed) as usize;
        let running = self
            .assigned
            .front()
            .is_some_and(|first| first.seq < claimed);
        if running || unclaimed >= 2 {
            unclaimed
        } else {
            0
        }
    }
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
    /// Worker starts asked of the supervisor and not yet registered or failed.
    starts_requested: usize,
    startup_failures: usize,
    /// Why the last worker start failed (and which worker it was), if the pool went on
    /// without it; cleared when `processes` workers are ready again.
    start_error: Option<(WorkerId, PoolError)>,
    /// Running average of the time a worker spends on one chunk, in nanoseconds.
    chunk_ns: Option<f64>,
    supervisor: Arc<dyn Supervisor>,
}

impl Scheduler {
    pub(crate) fn new(
        processes: usize,
        max_tasks: Option<usize>,
        has_initializer: bool,
        supervisor: Arc<dyn Supervisor>,
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
            start_error: None,
            chunk_ns: None,
            supervisor,
        }
    }

    /// Asks the supervisor for as many workers as are missing. Workers that are retiring
    /// (`maxtasksperchild`) or being killed count until their exit is reported: the pool
    /// never runs more than `processes` worker processes.
    pub(crate) fn request_workers(&mut self) {
        if !matches!(self.mode, Mode::Open | Mode::Closed) || self.stopping {
            return;
        }
        let have = self.workers.len() + self.starts_requested;
        for _ in have..self.processes {
            self.starts_requested += 1;
            self.supervisor.start_worker();
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
        self.pending.is_empty() && self.workers.iter().all(|w| w.assigned.is_empty())
    }

    /// Every worker asked for has started and is ready (or failed to start), or the pool
    /// is not running any more: `join` waits for this, so that every worker the pool
    /// promised runs its initializer.
    pub(crate) fn is_settled(&self) -> bool {
        !matches!(self.mode, Mode::Open | Mode::Closed)
            || (self.starts_requested == 0 && self.workers.iter().all(|w| w.ready))
    }

    /// `wait_ready`'s question: `Some(Ok)` once `processes` workers are ready, `Some(Err)`
    /// if the pool is broken or terminated or a worker failed to start, `None` meanwhile.
    pub(crate) fn readiness(&self) -> Option<Result<(), PoolError>> {
        match &self.mode {
            Mode::Broken(error) => return Some(Err(error.clone())),
            Mode::Terminated => return Some(Err(PoolError::Terminated)),
            Mode::Open | Mode::Closed => {}
        }
        if let Some((_, error)) = &self.start_error {
            return Some(Err(error.clone()));
        }
        let ready = self.workers.iter().filter(|w| w.ready).count();
        (ready >= self.processes).then_some(Ok(()))
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
            if let Err(e) = worker.link.send(&TaskMessage::Stop) {
                tracing::debug!(worker = %worker.id, %e, "could not tell a pool worker to stop");
                self.supervisor.kill(worker.id);
            }
        }
    }

    /// Python's `terminate`: every chunk, waiting or running, fails with
    /// [`PoolError::Terminated`]; workers are forgotten (the supervisor kills them).
    pub(crate) fn terminate(&mut self) -> Vec<Delivery> {
        self.mode = Mode::Terminated;
        self.stopping = true;
        let running = self
            .workers
            .drain(..)
            .flat_map(|w| w.assigned)
            .map(|a| a.chunk);
        let chunks: Vec<Chunk> = running.chain(self.pending.drain(..)).collect();
        chunks
            .into_iter()
            .map(|chunk| fail(chunk, PoolError::Terminated))
            .collect()
    }

    /// The supervisor is about to start a worker: record its link. Refused (false) once the
    /// pool stops or breaks.
    pub(crate) fn register_worker(&mut self, id: WorkerId, link: Box<dyn WorkerLink>) -> bool {
        self.starts_requested = self.starts_requested.saturating_sub(1);
        if self.stopping || !matches!(self.mode, Mode::Open | Mode::Closed) {
            return false;
        }
        self.workers.push(Worker {
            id,
            pid: 0,
            link,
            ready: false,
            assigned: VecDeque::new(),
            sent: 0,
            unread: VecDeque::new(),
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

    /// The supervisor could not start worker `id` (`registered`: after registering it).
    /// The pool goes on with the workers it has (a replacement is asked for when one of
    /// them exits), and `wait_ready` reports the error; with no worker at all, nothing
    /// could ever run, so the pool is broken.
    pub(crate) fn start_failed(
        &mut self,
        id: WorkerId,
        registered: bool,
        message: String,
    ) -> Vec<Delivery> {
        if registered {
            self.workers.retain(|w| w.id != id);
        } else {
            self.starts_requested = self.starts_requested.saturating_sub(1);
        }
        tracing::error!(%message, "could not start a pool worker");
        let error = PoolError::StartFailed(message);
        if self.workers.is_empty() && self.starts_requested == 0 {
            self.break_pool(error)
        } else {
            self.start_error = Some((id, error));
            Vec::new()
        }
    }

    pub(crate) fn worker_ready(&mut self, id: WorkerId, pid: u32) {
        if let Some(worker) = self.worker_mut(id) {
            worker.pid = pid;
            worker.ready = true;
            self.startup_failures = 0;
            // Made up for only once the pool is whole again: a worker started at the same
            // time as the failed one (or before it) becoming ready changes nothing, and
            // `wait_ready` must not wait for a worker that will never come.
            if self.start_error.is_some()
                && self.workers.iter().filter(|w| w.ready).count() >= self.processes
            {
                self.start_error = None;
            }
            tracing::debug!(worker = %id, pid, "pool worker ready");
        }
        self.dispatch();
    }

    /// The result of one chunk: matches it with its chunk. Call [`dispatch`](Self::dispatch)
    /// after a run of these to hand out more work.
    pub(crate) fn result(&mut self, id: WorkerId, result: ChunkResult) -> Option<Delivery> {
        let worker = self.workers.iter_mut().find(|w| w.id == id)?; // terminated meanwhile
        worker.read_up_to(result.seq);
        let Some(assigned) = take_assigned(worker, result.seq) else {
            tracing::warn!(worker = %id, seq = result.seq, "result for an unknown chunk");
            return None;
        };
        let pid = worker.pid;
        let sample = result.elapsed_ns as f64;
        self.chunk_ns = Some(match self.chunk_ns {
            None => sample,
            Some(average) => average + (sample - average) / 8.0,
        });
        let chunk = assigned.chunk;
        tracing::trace!(worker = %id, seq = assigned.seq, index = chunk.index, "chunk done");
        let result = match result.outcome {
            Ok(bytes) => Ok((pid, bytes)),
            Err(failure) => Err(PoolError::from_task_failure(pid, failure, chunk.types)),
        };
        Some((
            chunk.job,
            ChunkOutcome {
                index: chunk.index,
                items: chunk.items,
                first_item: chunk.first_item,
                result,
            },
        ))
    }

    /// The worker skipped revoked chunks up to `last`: its link has room again.
    pub(crate) fn skipped(&mut self, id: WorkerId, last: u64) {
        if let Some(worker) = self.worker_mut(id) {
            worker.read_up_to(last);
        }
    }

    /// A worker process ended (reported by the supervisor after everything it sent).
    ///
    /// Of its unanswered chunks, those it claimed fail with [`PoolError::WorkerDied`]: the
    /// one it was running (and any whose result died with it mid-send). Those it never
    /// claimed go back to the head of the queue, in order, for the other workers. A
    /// replacement is requested.
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
        let claimed = worker.link.claimed();
        let mut not_started = Vec::new();
        for assigned in worker.assigned {
            if assigned.seq < claimed {
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
        } else if worker.draining || self.stopping || worker.budget == Some(0) {
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
    /// batched into as few messages as the inline limit allows. When nothing waits and a
    /// worker is idle, steals the chunks queued behind another worker's running one.
    pub(crate) fn dispatch(&mut self) {
        if !matches!(self.mode, Mode::Open | Mode::Closed) {
            return;
        }
        let depth = self.depth();
        // Once chunks were stolen, they go to idle workers only (not back behind the slow
        // chunk they were taken from; the worker they came from counts as idle if it runs
        // nothing); what idle workers cannot take waits here.
        let mut idle_only = false;
        loop {
            while self.pending.front().is_some_and(|c| c.job.is_cancelled()) {
                self.pending.pop_front();
            }
            if self.pending.is_empty() {
                if !self.steal(depth) {
                    return;
                }
                idle_only = true;
            }
            let fits = |w: &Worker| w.has_room(depth) && (!idle_only || w.assigned.is_empty());
            let eligible = self.workers.iter().filter(|w| fits(w)).count();
            let Some(worker) = self
                .workers
                .iter_mut()
                .filter(|w| fits(w))
                .min_by_key(|w| w.assigned.len())
            else {
                return;
            };
            let share = self.pending.len().div_ceil(eligible);
            let room = (depth - worker.assigned.len())
                .min(share)
                .min(worker.budget.unwrap_or(usize::MAX));
            let first_seq = worker.sent;
            let mut batch = Vec::with_capacity(room);
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
                let seq = first_seq + batch.len() as u64;
                let group = if chunk.job.results_observed_together() {
                    // The job's address: unique while its chunks exist (they hold it).
                    Arc::as_ptr(&chunk.job).cast::<()>() as usize as u64
                } else {
                    0
                };
                message.push(TaskChunk {
                    seq,
                    group,
                    report_start: chunk.limits.any(),
                    function: chunk.function,
                    payload: ChunkPayload::Inline(chunk.payload.clone()),
                });
                batch.push(Assigned { seq, chunk });
            }
            if batch.is_empty() {
                continue;
            }
            let count = batch.len();
            match worker.link.send(&TaskMessage::Run(message)) {
                Ok(()) => {
                    tracing::trace!(worker = %worker.id, chunks = count, first_seq, "dispatch");
                }
                Err(TransportError::Full) if !worker.assigned.is_empty() => {
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
                    self.supervisor.kill(worker.id);
                }
            }
            worker.sent += count as u64;
            worker.unread.push_back(first_seq);
            worker.assigned.extend(batch);
            if let Some(budget) = &mut worker.budget {
                // At zero it exits after these; its replacement starts when it has.
                *budget -= count;
            }
        }
    }

    /// Worker `id` started chunk `seq`, which has a time limit: the supervisor is asked to
    /// call [`expire`](Self::expire) at its deadline.
    pub(crate) fn started(&mut self, id: WorkerId, seq: u64) {
        let Some(worker) = self.workers.iter().find(|w| w.id == id) else {
            return;
        };
        let Some(assigned) = worker.assigned.iter().find(|a| a.seq == seq) else {
            return; // answered meanwhile
        };
        let limits = assigned.chunk.limits;
        let now = Instant::now();
        let by_timeout = limits.timeout.map(|timeout| now + timeout);
        let deadline = match (by_timeout, limits.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some(deadline) = deadline {
            self.supervisor.watch(id, seq, deadline);
        }
    }

    /// The deadline of chunk `seq` of worker `id` passed. If the worker is still on it
    /// (it has not answered and has not started a later chunk), the chunk fails with
    /// [`PoolError::TaskTimedOut`] (or [`PoolError::Timeout`], for a whole call's
    /// deadline), and the worker gets no more work and is killed: its other unanswered
    /// chunks are settled when its exit is reported (those it never started run elsewhere),
    /// and a replacement starts then.
    ///
    /// There is one race, and it is benign: a chunk that ended just before its deadline but
    /// whose result was not read yet still counts as timed out (its result is ignored).
    pub(crate) fn expire(&mut self, id: WorkerId, seq: u64) -> Option<Delivery> {
        let worker = self.workers.iter_mut().find(|w| w.id == id)?;
        let position = worker.assigned.iter().position(|a| a.seq == seq)?;
        let claimed = worker.link.claimed();
        let moved_on = worker
            .assigned
            .iter()
            .any(|a| a.seq > seq && a.seq < claimed);
        if moved_on {
            return None; // it finished the chunk: its result is on the way
        }
        let assigned = worker.assigned.remove(position)?;
        worker.draining = true;
        let pid = worker.pid;
        self.supervisor.kill(id);
        let chunk = assigned.chunk;
        let error = match chunk.limits.timeout {
            Some(timeout) => PoolError::TaskTimedOut {
                function: chunk.types.function,
                index: chunk.first_item,
                timeout,
                pid,
            },
            None => PoolError::Timeout,
        };
        tracing::warn!(worker = %id, pid, %error, "pool task timed out; killing its worker");
        Some(fail(chunk, error))
    }

    /// Whether worker `id` has not answered chunk `seq` yet (a deadline for it still counts).
    pub(crate) fn is_unanswered(&self, id: WorkerId, seq: u64) -> bool {
        self.workers
            .iter()
            .find(|w| w.id == id)
            .is_some_and(|w| w.assigned.iter().any(|a| a.seq == seq))
    }

    /// Withdraws `job`'s chunks that have not started: waiting ones are dropped, those
    /// queued on workers revoked (the same claim protocol as stealing: exactly one side wins
    /// each chunk). With `all_or_nothing`, only if none of its chunks has started; if a
    /// worker claimed one first, nothing changes. Returns whether the job was withdrawn.
    pub(crate) fn cancel_job(&mut self, job: &Arc<dyn Job>, all_or_nothing: bool) -> bool {
        let ours = |chunk: &Chunk| same_job(&chunk.job, job);
        let started = |w: &Worker| {
            let claimed = w.link.claimed();
            w.assigned.iter().any(|a| a.seq < claimed && ours(&a.chunk))
        };
        if all_or_nothing && self.workers.iter().any(started) {
            return false;
        }
        let mut revoked = Vec::new();
        let mut lost_race = false;
        for worker in &mut self.workers {
            if !worker.assigned.iter().any(|a| ours(&a.chunk)) {
                continue;
            }
            let taken = worker.revoke_unclaimed();
            // What is left it had claimed, possibly since the check above.
            lost_race |= all_or_nothing && worker.assigned.iter().any(|a| ours(&a.chunk));
            revoked.extend(taken.into_iter().map(|a| a.chunk));
        }
        if !lost_race {
            job.cancel();
            revoked.retain(|c| !ours(c));
            self.pending.retain(|c| !ours(c));
        }
        for chunk in revoked.into_iter().rev() {
            self.pending.push_front(chunk);
        }
        self.dispatch();
        !lost_race
    }

    /// `shutdown(cancel_pending)`: every chunk no worker has started fails with
    /// [`PoolError::Cancelled`] (waiting ones, and those queued on workers, revoked);
    /// running chunks finish.
    pub(crate) fn cancel_pending(&mut self) -> Vec<Delivery> {
        let mut chunks: Vec<Chunk> = Vec::new();
        for worker in &mut self.workers {
            chunks.extend(worker.revoke_unclaimed().into_iter().map(|a| a.chunk));
        }
        chunks.extend(self.pending.drain(..));
        chunks
            .into_iter()
            .map(|chunk| fail(chunk, PoolError::Cancelled))
            .collect()
    }

    /// If a worker is idle, takes back the chunks the busiest other worker has queued and
    /// not claimed (see `Worker::stealable`), and queues them first. Whether any were
    /// taken.
    fn steal(&mut self, depth: usize) -> bool {
        let idle = self
            .workers
            .iter()
            .any(|w| w.assigned.is_empty() && w.has_room(depth));
        if !idle {
            return false;
        }
        let Some(victim) = self
            .workers
            .iter_mut()
            .filter(|w| !w.draining)
            .map(|w| (w.stealable(), w))
            .filter(|(queued, _)| *queued > 0)
            .max_by_key(|(queued, _)| *queued)
            .map(|(_, w)| w)
        else {
            return false;
        };
        let taken = victim.revoke_unclaimed();
        if taken.is_empty() {
            return false;
        }
        tracing::trace!(worker = %victim.id, chunks = taken.len(), "chunks stolen for an idle worker");
        for assigned in taken.into_iter().rev() {
            self.pending.push_front(assigned.chunk);
        }
        true
    }
}

/// Removes the chunk `seq` from the worker's unanswered chunks (normally the very first).
fn take_assigned(worker: &mut Worker, seq: u64) -> Option<Assigned> {
    let position = worker.assigned.iter().position(|a| a.seq == seq)?;
    worker.assigned.remove(position)
}

/// Whether two chunks belong to the same job (the same allocation; vtables may differ).
fn same_job(a: &Arc<dyn Job>, b: &Arc<dyn Job>) -> bool {
    std::ptr::addr_eq(Arc::as_ptr(a), Arc::as_ptr(b))
}

fn fail(chunk: Chunk, error: PoolError) -> Delivery {
    (
        chunk.job,
        ChunkOutcome {
            index: chunk.index,
            items: chunk.items,
            first_item: chunk.first_item,
            result: Err(error),
        },
    )
}

/// Pure bookkeeping, no syscall: `.ci/miri` runs this whole module under Miri (its name).
#[cfg(test)]
mod miri_tests {
    mod proptests;
    use super::*;
    use crate::transport::{Bytes, ResultBytes, claim, revoke};
    use parking_lot::Mutex;
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

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

    /// A worker's link as the tests see it: the messages sent, and the claim counter the
    /// fake worker moves.
    #[derive(Default)]
    struct FakeWorker {
        /// The sequence numbers of each `Run` message; `None` for `Stop`.
        messages: Mutex<Vec<Option<Vec<u64>>>>,
        claims: AtomicU64,
    }

    impl FakeWorker {
        /// Every chunk sent, in order.
        fn sent(&self) -> Vec<u64> {
            self.messages
                .lock()
                .iter()
                .flatten()
                .flatten()
                .copied()
                .collect()
        }
    }

    struct FakeLink(Arc<FakeWorker>);

    impl WorkerLink for FakeLink {
        fn send(&self, message: &TaskMessage) -> Result<(), TransportError> {
            let seqs = match message {
                TaskMessage::Run(chunks) => Some(chunks.iter().map(|c| c.seq).collect()),
                TaskMessage::Setup { .. } | TaskMessage::Stop => None,
            };
            self.0.messages.lock().push(seqs);
            Ok(())
        }
        fn revoke(&self, sent: u64) -> u64 {
            revoke(&self.0.claims, sent)
        }
        fn claimed(&self) -> u64 {
            self.0.claims.load(Ordering::Acquire)
        }
    }

    #[derive(Default)]
    struct FakeSupervisor {
        starts: AtomicUsize,
        kills: Mutex<Vec<WorkerId>>,
        watches: Mutex<Vec<(WorkerId, u64)>>,
    }

    impl Supervisor for FakeSupervisor {
        fn start_worker(&self) {
            self.starts.fetch_add(1, Ordering::SeqCst);
        }
        fn kill(&self, id: WorkerId) {
            self.kills.lock().push(id);
        }
        fn watch(&self, id: WorkerId, seq: u64, _deadline: Instant) {
            self.watches.lock().push((id, seq));
        }
    }

    /// A job that records what it was given: chunk index → outcome (`Ok(pid)` or error).
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(usize, Result<u32, PoolError>)>>);

    impl Job for Recorder {
        fn deliver(&self, outcome: ChunkOutcome) {
            let result = outcome.result.map(|(pid, _)| pid);
            self.0.lock().push((outcome.index, result));
        }
        fn cancel(&self) {}
        fn is_cancelled(&self) -> bool {
            false
        }
        fn results_observed_together(&self) -> bool {
            false
        }
    }

    fn chunks(job: &Arc<Recorder>, indices: std::ops::Range<usize>) -> Vec<Chunk> {
        indices
            .map(|index| Chunk {
                job: job.clone(),
                index,
                first_item: index,
                items: 1,
                function: FunctionId::of_task(&|x: u8| x),
                types: TaskTypes {
                    function: "f",
                    args: "u8",
                    output: "u8",
                },
                payload: Payload::new(vec![index as u8]),
                limits: Limits::default(),
            })
            .collect()
    }

    fn done(seq: u64, elapsed_ns: u64) -> ChunkResult {
        ChunkResult {
            seq,
            elapsed_ns,
            outcome: Ok(ResultBytes::Inline(Bytes::from_vec(Vec::new()))),
        }
    }

    struct Fixture {
        scheduler: Scheduler,
        supervisor: Arc<FakeSupervisor>,
        workers: Vec<Arc<FakeWorker>>,
    }

    /// A scheduler with `processes` ready workers (pids 100, 101...).
    fn fixture(processes: usize, max_tasks: Option<usize>) -> Fixture {
        let supervisor = Arc::new(FakeSupervisor::default());
        let mut scheduler = Scheduler::new(processes, max_tasks, false, supervisor.clone());
        scheduler.request_workers();
        assert_eq!(supervisor.starts.load(Ordering::SeqCst), processes);
        let mut workers = Vec::new();
        for i in 0..processes {
            let worker = Arc::new(FakeWorker::default());
            let id = WorkerId(i as u64);
            assert!(scheduler.register_worker(id, Box::new(FakeLink(worker.clone()))));
            scheduler.worker_ready(id, 100 + i as u32);
            workers.push(worker);
        }
        Fixture {
            scheduler,
            supervisor,
            workers,
        }
    }

    /// Makes the scheduler measure chunks as taking `ns`, through one chunk on worker 0.
    fn measure(f: &mut Fixture, ns: u64) {
        let job = Arc::new(Recorder::default());
        f.scheduler.enqueue(chunks(&job, 0..1)).unwrap();
        let seq = *f.workers[0].sent().last().unwrap();
        assert!(claim(&f.workers[0].claims, seq));
        assert!(f.scheduler.result(WorkerId(0), done(seq, ns)).is_some());
    }

    #[test]
    fn cheap_chunks_are_batched_and_an_idle_worker_steals_the_unclaimed_ones() {
        let mut f = fixture(2, None);
        measure(&mut f, 1_000); // cheap: deep batches
        let job = Arc::new(Recorder::default());
        f.scheduler.enqueue(chunks(&job, 0..8)).unwrap();
        let mut delivered = Vec::new();
        let (first, second) = (f.workers[0].sent(), f.workers[1].sent());
        assert_eq!(
            (first.len(), second.len()),
            (5, 4),
            "fair shares, in batches"
        );
        // Worker 1 runs its four chunks; worker 0 is stuck in the first of its four.
        for seq in second {
            assert!(claim(&f.workers[1].claims, seq));
            delivered.push(f.scheduler.result(WorkerId(1), done(seq, 1_000)).unwrap());
        }
        assert!(claim(&f.workers[0].claims, 1));
        f.scheduler.dispatch();
        // The three chunks queued behind it were revoked and went to the idle worker.
        assert_eq!(f.workers[0].claims.load(Ordering::SeqCst), 5);
        for seq in 2..5 {
            assert!(
                !claim(&f.workers[0].claims, seq),
                "revoked chunk {seq} was run"
            );
        }
        assert_eq!(f.workers[1].sent(), [0, 1, 2, 3, 4, 5, 6]);
        f.scheduler.skipped(WorkerId(0), 4);
        for seq in 4..7 {
            assert!(claim(&f.workers[1].claims, seq));
            delivered.push(f.scheduler.result(WorkerId(1), done(seq, 1_000)).unwrap());
        }
        delivered.push(f.scheduler.result(WorkerId(0), done(1, 5_000_000)).unwrap());
        assert!(f.scheduler.is_idle());
        deliver(delivered);
        let mut delivered: Vec<usize> = job.0.lock().iter().map(|(index, _)| *index).collect();
        delivered.sort_unstable();
        assert_eq!(
            delivered,
            (0..8).collect::<Vec<_>>(),
            "each chunk exactly once"
        );
    }

    #[test]
    fn a_batch_not_started_yet_is_shared_with_a_worker_that_becomes_idle() {
        let mut f = fixture(1, None);
        measure(&mut f, 1_000);
        let job = Arc::new(Recorder::default());
        f.scheduler.enqueue(chunks(&job, 0..4)).unwrap();
        assert_eq!(
            f.workers[0].sent(),
            [0, 1, 2, 3, 4],
            "all four on the only worker"
        );
        // A second worker becomes ready before the first started any of them: they are
        // revoked and shared between the two.
        let second = Arc::new(FakeWorker::default());
        assert!(
            f.scheduler
                .register_worker(WorkerId(1), Box::new(FakeLink(second.clone())))
        );
        f.scheduler.worker_ready(WorkerId(1), 101);
        assert_eq!(
            f.workers[0].claims.load(Ordering::SeqCst),
            5,
            "all four revoked"
        );
        assert_eq!(second.sent().len(), 2, "two of them moved");
        assert_eq!(
            f.workers[0].sent(),
            [0, 1, 2, 3, 4, 5, 6],
            "and two sent back"
        );
    }

    #[test]
    fn a_dead_worker_fails_the_chunk_it_ran_and_the_others_run_elsewhere() {
        let mut f = fixture(2, None);
        measure(&mut f, 1_000);
        let job = Arc::new(Recorder::default());
        f.scheduler.enqueue(chunks(&job, 0..6)).unwrap();
        assert_eq!(
            f.workers[0].sent(),
            [0, 1, 2, 3],
            "0 was the measuring chunk"
        );
        // Worker 0 finished chunk 1 (reported), died running chunk 2; 3 never started.
        assert!(claim(&f.workers[0].claims, 1));
        let finished = f.scheduler.result(WorkerId(0), done(1, 1_000));
        assert!(matches!(
            finished,
            Some((_, ChunkOutcome { result: Ok(_), .. }))
        ));
        assert!(claim(&f.workers[0].claims, 2));
        let deliveries = f.scheduler.worker_exited(WorkerId(0), -9, None);
        assert_eq!(deliveries.len(), 1, "only the running chunk fails");
        match &deliveries[0].1.result {
            Err(PoolError::WorkerDied { pid: 100, .. }) => {}
            other => panic!("expected WorkerDied, got {:?}", other.as_ref().err()),
        }
        assert_eq!(
            f.supervisor.starts.load(Ordering::SeqCst),
            3,
            "a replacement"
        );
        // The chunk that never started goes to the live worker once it has room.
        for seq in f.workers[1].sent() {
            assert!(claim(&f.workers[1].claims, seq));
            f.scheduler.result(WorkerId(1), done(seq, 1_000)).unwrap();
        }
        f.scheduler.dispatch();
        assert_eq!(
            f.workers[1].sent().len(),
            4,
            "three of its own and the orphan"
        );
    }

    #[test]
    fn a_retiring_worker_is_replaced_after_it_exits_not_before() {
        let mut f = fixture(1, Some(2));
        measure(&mut f, 1_000);
        let job = Arc::new(Recorder::default());
        f.scheduler.enqueue(chunks(&job, 0..3)).unwrap();
        assert_eq!(
            f.workers[0].sent(),
            [0, 1],
            "its budget: two chunks (0 measured)"
        );
        assert_eq!(
            f.supervisor.starts.load(Ordering::SeqCst),
            1,
            "no early replacement"
        );
        assert!(claim(&f.workers[0].claims, 1));
        f.scheduler.result(WorkerId(0), done(1, 1_000)).unwrap();
        assert_eq!(f.supervisor.starts.load(Ordering::SeqCst), 1);
        assert!(f.scheduler.worker_exited(WorkerId(0), 0, None).is_empty());
        assert_eq!(
            f.supervisor.starts.load(Ordering::SeqCst),
            2,
            "replaced on exit"
        );
        let next = Arc::new(FakeWorker::default());
        assert!(
            f.scheduler
                .register_worker(WorkerId(9), Box::new(FakeLink(next.clone())))
        );
        f.scheduler.worker_ready(WorkerId(9), 200);
        assert_eq!(
            next.sent(),
            [0, 1],
            "the waiting chunks run on the replacement"
        );
    }

    #[test]
    fn join_waits_for_promised_workers_and_wait_ready_reports_start_failures() {
        let supervisor = Arc::new(FakeSupervisor::default());
        let mut scheduler = Scheduler::new(2, None, false, supervisor.clone());
        scheduler.request_workers();
        assert!(scheduler.is_idle());
        assert!(!scheduler.is_settled(), "two workers were promised");
        assert!(scheduler.readiness().is_none());
        let worker = Arc::new(FakeWorker::default());
        assert!(scheduler.register_worker(WorkerId(0), Box::new(FakeLink(worker))));
        assert!(
            scheduler
                .start_failed(WorkerId(1), false, "EMFILE".into())
                .is_empty()
        );
        // A worker started before the failure becoming ready does not hide it.
        scheduler.worker_ready(WorkerId(0), 100);
        assert!(scheduler.is_settled());
        assert_eq!(
            scheduler.readiness(),
            Some(Err(PoolError::StartFailed("EMFILE".into())))
        );
        assert!(
            matches!(scheduler.mode(), Mode::Open),
            "it goes on with one worker"
        );
    }

    /// A small deterministic generator for the randomized test (no dependency needed).
    struct XorShift(u64);

    impl XorShift {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    /// A fake worker process of the randomized test.
    struct Simulated {
        id: WorkerId,
        link: Arc<FakeWorker>,
        /// Chunks it claimed and has not reported yet, in order.
        running: VecDeque<u64>,
        /// How many chunks of its link it has read.
        read: usize,
        /// Chunks it may still run (`maxtasksperchild`).
        budget: Option<usize>,
    }

    /// A scheduler driven by simulated workers, recording every delivery.
    struct Simulation {
        scheduler: Scheduler,
        supervisor: Arc<FakeSupervisor>,
        processes: usize,
        max_tasks: Option<usize>,
        live: Vec<Simulated>,
        next_id: u64,
        deliveries: Vec<Delivery>,
    }

    impl Simulation {
        /// Runs everything left to the end: starts what was asked for, workers
        /// report and read all they have, spent workers retire. Whether the
        /// scheduler became idle.
        fn drain(&mut self) -> bool {
            for _ in 0..10_000 {
                if self.scheduler.is_idle() {
                    return true;
                }
                self.start_requested();
                for w in 0..self.live.len() {
                    while !self.live[w].running.is_empty() {
                        self.finish_one(w, 1_000);
                    }
                    while self.read_next(w) {}
                }
                let mut w = 0;
                while w < self.live.len() {
                    if self.live[w].budget == Some(0) && self.live[w].running.is_empty() {
                        self.exit(w, 0);
                    } else {
                        w += 1;
                    }
                }
                self.scheduler.dispatch();
            }
            self.scheduler.is_idle()
        }

        /// Starts the workers the scheduler asked for.
        fn start_requested(&mut self) {
            while (self.next_id as usize) < self.supervisor.starts.load(Ordering::SeqCst) {
                let link = Arc::new(FakeWorker::default());
                let id = WorkerId(self.next_id);
                self.next_id += 1;
                assert!(
                    self.scheduler
                        .register_worker(id, Box::new(FakeLink(link.clone())))
                );
                self.scheduler.worker_ready(id, 100 + id.0 as u32);
                self.live.push(Simulated {
                    id,
                    link,
                    running: VecDeque::new(),
                    read: 0,
                    budget: self.max_tasks,
                });
                assert!(
                    self.live.len() <= self.processes,
                    "more workers than processes"
                );
            }
        }

        /// Worker `w` reads the next chunk of its link and claims (or skips) it. False if it
        /// had nothing to read or its budget is spent (it exits without reading).
        fn read_next(&mut self, w: usize) -> bool {
            let worker = &mut self.live[w];
            let Some(&seq) = worker.link.sent().get(worker.read) else {
                return false;
            };
            if worker.budget == Some(0) {
                return false;
            }
            worker.read += 1;
            if claim(&worker.link.claims, seq) {
                worker.running.push_back(seq);
                if let Some(budget) = &mut worker.budget {
                    *budget -= 1;
                }
            } else {
                self.scheduler.skipped(worker.id, seq);
            }
            true
        }

        /// Worker `w` reports its oldest claimed chunk, taking `ns`.
        fn finish_one(&mut self, w: usize, ns: u64) {
            if let Some(seq) = self.live[w].running.pop_front() {
                let id = self.live[w].id;
                self.deliveries
                    .extend(self.scheduler.result(id, done(seq, ns)));
                self.scheduler.dispatch();
            }
        }

        /// Worker `w` ends (dies, or retires): how many of its chunks failed, and how many
        /// it had claimed and not reported.
        fn exit(&mut self, w: usize, exitcode: i32) -> (usize, usize) {
            let worker = self.live.remove(w);
            let failed = self.scheduler.worker_exited(worker.id, exitcode, None);
            let counts = (failed.len(), worker.running.len());
            self.deliveries.extend(failed);
            counts
        }
    }

    /// Random interleavings of submissions, starts, claims, results, skips, deaths, expired
    /// deadlines, cancellations and steals: every chunk is delivered exactly once (none of a
    /// cancelled job after its cancellation), never more than `processes` workers
    /// exist, and a worker's death fails exactly the chunks it had claimed and not reported.
    #[test]
    fn every_chunk_is_delivered_exactly_once_whatever_happens() {
        let seeds: u64 = if cfg!(miri) { 2 } else { 40 };
        for seed in 1..=seeds {
            let mut rng = XorShift(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let processes = 1 + rng.below(3) as usize;
            let max_tasks = (rng.below(2) == 0).then(|| 1 + rng.below(4) as usize);
            let supervisor = Arc::new(FakeSupervisor::default());
            let mut scheduler = Scheduler::new(processes, max_tasks, false, supervisor.clone());
            scheduler.request_workers();
            let mut sim = Simulation {
                scheduler,
                supervisor,
                processes,
                max_tasks,
                live: Vec::new(),
                next_id: 0,
                deliveries: Vec::new(),
            };
            let job = Arc::new(Recorder::default());
            let mut submitted = 0;
            // A second job, submitted in bursts and cancelled at some point: once cancelled,
            // none of its chunks is delivered any more.
            let victim = Arc::new(Recorder::default());
            let victim_job: Arc<dyn Job> = victim.clone();
            let mut victim_submitted = 0;
            let mut cancelled_after: Option<usize> = None;
            for _ in 0..400 {
                let worker = (!sim.live.is_empty()).then(|| rng.below(sim.live.len() as u64));
                match (rng.below(7), worker) {
                    (6, _) if cancelled_after.is_none() && rng.below(3) > 0 => {
                        let n = 1 + rng.below(4) as usize;
                        let new = chunks(&victim, victim_submitted..victim_submitted + n);
                        sim.scheduler.enqueue(new).unwrap();
                        victim_submitted += n;
                    }
                    // A failed cancellation (one of its chunks runs) changes nothing.
                    (6, _)
                        if cancelled_after.is_none()
                            && sim.scheduler.cancel_job(&victim_job, true) =>
                    {
                        let so_far = sim
                            .deliveries
                            .iter()
                            .filter(|(j, _)| same_job(j, &victim_job))
                            .count();
                        cancelled_after = Some(so_far);
                    }
                    (0, _) if submitted < 60 => {
                        let n = 1 + rng.below(6) as usize;
                        let new = chunks(&job, submitted..submitted + n);
                        sim.scheduler.enqueue(new).unwrap();
                        submitted += n;
                    }
                    (1, _) => sim.start_requested(),
                    (2 | 3, Some(w)) => {
                        sim.read_next(w as usize);
                    }
                    (4, Some(w)) => {
                        let ns = [1_000, 10_000_000][rng.below(2) as usize];
                        sim.finish_one(w as usize, ns);
                    }
                    (5, Some(w)) if rng.below(4) == 0 => {
                        let (failed, claimed) = sim.exit(w as usize, -9);
                        assert_eq!(failed, claimed, "seed {seed}: only claimed chunks fail");
                    }
                    (5, Some(w)) if rng.below(3) == 0 => {
                        // The deadline of the chunk it runs now passes: that chunk fails,
                        // the worker is killed and exits.
                        let w = w as usize;
                        let Some(&seq) = sim.live[w].running.back() else {
                            continue;
                        };
                        let id = sim.live[w].id;
                        let expired = sim.scheduler.expire(id, seq);
                        assert!(expired.is_some(), "seed {seed}: it was running");
                        sim.deliveries.extend(expired);
                        assert_eq!(sim.supervisor.kills.lock().pop(), Some(id));
                        let (failed, claimed) = sim.exit(w, -9);
                        assert_eq!(failed + 1, claimed, "seed {seed}: the others it claimed");
                    }
                    _ => {}
                }
            }
            assert!(sim.drain(), "seed {seed}: work left over");
            deliver(std::mem::take(&mut sim.deliveries));
            let mut victims: Vec<usize> = victim.0.lock().iter().map(|(i, _)| *i).collect();
            match cancelled_after {
                Some(count) => assert_eq!(victims.len(), count, "seed {seed}: ran after cancel"),
                None => assert_eq!(victims.len(), victim_submitted, "seed {seed}: lost"),
            }
            victims.sort_unstable();
            victims.dedup();
            assert_eq!(victims.len(), victim.0.lock().len(), "seed {seed}: twice");
            let mut delivered: Vec<usize> = job.0.lock().iter().map(|(i, _)| *i).collect();
            delivered.sort_unstable();
            assert_eq!(
                delivered,
                (0..submitted).collect::<Vec<_>>(),
                "seed {seed}: each chunk exactly once"
            );
        }
    }

    fn timed_chunks(job: &Arc<Recorder>, indices: std::ops::Range<usize>) -> Vec<Chunk> {
        let mut chunks = chunks(job, indices);
        for chunk in &mut chunks {
            chunk.limits.timeout = Some(Duration::from_secs(1));
        }
        chunks
    }

    #[test]
    fn an_expired_chunk_fails_and_its_worker_is_killed_and_replaced() {
        let mut f = fixture(2, None);
        measure(&mut f, 1_000);
        let job = Arc::new(Recorder::default());
        f.scheduler.enqueue(timed_chunks(&job, 0..4)).unwrap();
        let sent = f.workers[0].sent();
        assert_eq!(sent.len(), 3, "the measuring chunk and two timed ones");
        let running = sent[1];
        assert!(claim(&f.workers[0].claims, running));
        f.scheduler.started(WorkerId(0), running);
        assert_eq!(*f.supervisor.watches.lock(), [(WorkerId(0), running)]);
        let (_, failed) = f.scheduler.expire(WorkerId(0), running).expect("expired");
        match failed.result {
            Err(PoolError::TaskTimedOut {
                function: "f",
                pid: 100,
                index,
                ..
            }) => assert_eq!(index, failed.index),
            other => panic!("expected TaskTimedOut, got {:?}", other.err()),
        }
        assert_eq!(*f.supervisor.kills.lock(), [WorkerId(0)]);
        assert!(f.scheduler.expire(WorkerId(0), running).is_none(), "once");
        // It gets nothing more; at its exit the chunk it never started is re-queued.
        assert!(f.scheduler.worker_exited(WorkerId(0), -9, None).is_empty());
        assert_eq!(f.supervisor.starts.load(Ordering::SeqCst), 3, "replaced");
        for seq in f.workers[1].sent() {
            assert!(claim(&f.workers[1].claims, seq));
            f.scheduler.result(WorkerId(1), done(seq, 1_000)).unwrap();
        }
        f.scheduler.dispatch();
        assert_eq!(f.workers[1].sent().len(), 3, "its two, and the orphan");
    }

    #[test]
    fn a_chunk_whose_worker_moved_on_is_not_expired() {
        let mut f = fixture(1, None);
        measure(&mut f, 1_000);
        let job = Arc::new(Recorder::default());
        f.scheduler.enqueue(timed_chunks(&job, 0..2)).unwrap();
        let sent = f.workers[0].sent();
        assert!(claim(&f.workers[0].claims, sent[1]));
        f.scheduler.started(WorkerId(0), sent[1]);
        // It finished that chunk (the result is on its way) and started the next.
        assert!(claim(&f.workers[0].claims, sent[2]));
        assert!(f.scheduler.expire(WorkerId(0), sent[1]).is_none());
        assert!(f.supervisor.kills.lock().is_empty(), "nobody killed");
        // A chunk without limits is never watched.
        let plain = Arc::new(Recorder::default());
        f.scheduler.enqueue(chunks(&plain, 0..1)).unwrap();
        f.scheduler.started(WorkerId(0), 99);
        assert_eq!(f.supervisor.watches.lock().len(), 1);
    }

    #[test]
    fn a_job_is_cancelled_only_while_none_of_its_chunks_started() {
        let mut f = fixture(1, None);
        measure(&mut f, 1_000);
        let (first, second) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
        f.scheduler.enqueue(chunks(&first, 0..2)).unwrap();
        f.scheduler.enqueue(chunks(&second, 0..2)).unwrap();
        let sent = f.workers[0].sent();
        assert_eq!(sent.len(), 5, "all queued on the one worker");
        let first_job: Arc<dyn Job> = first.clone();
        let second_job: Arc<dyn Job> = second.clone();
        assert!(claim(&f.workers[0].claims, sent[1]), "the first job runs");
        assert!(!f.scheduler.cancel_job(&first_job, true), "it started");
        // The worker skips what was revoked; the first job's other chunk was sent again.
        assert!(f.scheduler.cancel_job(&second_job, true));
        let resent = &f.workers[0].sent()[5..];
        assert_eq!(
            resent.len(),
            1,
            "only the first job's waiting chunk: {resent:?}"
        );
        for seq in 2..5 {
            assert!(!claim(&f.workers[0].claims, seq), "revoked chunk {seq} ran");
        }
        f.scheduler.skipped(WorkerId(0), 4);
        f.scheduler
            .result(WorkerId(0), done(sent[1], 1_000))
            .unwrap();
        assert!(claim(&f.workers[0].claims, resent[0]));
        f.scheduler
            .result(WorkerId(0), done(resent[0], 1_000))
            .unwrap();
        assert!(
            f.scheduler.is_idle(),
            "the cancelled job left nothing behind"
        );
    }

    #[test]
    fn cancel_pending_fails_every_chunk_not_started() {
        let mut f = fixture(2, None);
        measure(&mut f, 1_000);
        let job = Arc::new(Recorder::default());
        f.scheduler.enqueue(chunks(&job, 0..40)).unwrap();
        let running = f.workers[1].sent()[0];
        assert!(claim(&f.workers[1].claims, running));
        let cancelled = f.scheduler.cancel_pending();
        assert_eq!(cancelled.len(), 39, "all but the running one");
        assert!(
            cancelled
                .iter()
                .all(|(_, o)| matches!(o.result, Err(PoolError::Cancelled)))
        );
        f.scheduler
            .result(WorkerId(1), done(running, 1_000))
            .unwrap();
        assert!(f.scheduler.is_idle());
    }

    fn deliver(deliveries: Vec<Delivery>) {
        for (job, outcome) in deliveries {
            job.deliver(outcome);
        }
    }
}
