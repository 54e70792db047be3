//! The supervisor thread: owns the worker processes. It starts them (at creation, and to
//! replace workers that died or retired), kills them on request, and watches their
//! sentinels (pidfds) so that a worker's death is noticed at once, whatever killed it. Each
//! exit is posted to the result thread as a [`Report::Exited`] notice, after the worker was
//! reaped, hence after everything the worker sent.
//!
//! It also keeps the deadlines of running tasks that have a time limit: its wait in the
//! kernel (`poll`) ends at the earliest one, and an expired task's worker is killed (see
//! [`Scheduler::expire`](crate::scheduler::Scheduler::expire)). There is no polling loop: with
//! no deadline, it sleeps until a command or a worker's exit wakes it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mp_core::{Child, ProcessError};
use parking_lot::Mutex;
use rustix::event::{EventfdFlags, PollFd, PollFlags};

use crate::job::{deliver, panic_message};
use crate::pool::Shared;
use crate::scheduler::Supervisor;
use crate::transport::{Claims, Report, TaskLink, TaskMessage, WorkerId, task_link};
use crate::worker::WorkerArgs;

/// The size of the deadline heap below which it is never pruned.
const MIN_PRUNE: usize = 1024;

enum Command {
    /// Start one worker.
    Start,
    /// Kill this worker (its link broke).
    Kill(WorkerId),
    /// Stop supervising once every worker has exited; with `kill`, kill them now.
    Stop { kill: bool },
    /// Expire chunk `seq` of `worker` at `deadline`.
    Watch {
        worker: WorkerId,
        seq: u64,
        deadline: Instant,
    },
}

/// The supervisor's mailbox: commands, and an eventfd that wakes it.
pub(crate) struct Commands {
    queue: Mutex<Vec<Command>>,
    doorbell: OwnedFd,
}

impl Commands {
    pub(crate) fn new() -> std::io::Result<Arc<Self>> {
        let doorbell = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Arc::new(Commands {
            queue: Mutex::new(Vec::new()),
            doorbell,
        }))
    }

    /// Asks the supervisor to finish once every worker is gone, killing them with `kill`.
    pub(crate) fn stop(&self, kill: bool) {
        self.push(Command::Stop { kill });
    }

    fn push(&self, command: Command) {
        self.queue.lock().push(command);
        // An eventfd write only fails when the counter would overflow, which a waiting
        // wake-up already covers.
        let _ = rustix::io::write(&self.doorbell, &1u64.to_ne_bytes());
    }

    fn take(&self) -> Vec<Command> {
        let mut counter = [0u8; 8];
        let _ = rustix::io::read(&self.doorbell, &mut counter);
        std::mem::take(&mut *self.queue.lock())
    }
}

impl Supervisor for Commands {
    fn start_worker(&self) {
        self.push(Command::Start);
    }

    fn kill(&self, id: WorkerId) {
        self.push(Command::Kill(id));
    }

    fn watch(&self, worker: WorkerId, seq: u64, deadline: Instant) {
        self.push(Command::Watch {
            worker,
            seq,
            deadline,
        });
    }
}

/// The supervisor thread's body.
pub(crate) fn run(shared: Arc<Shared>) {
    let mut workers: Vec<(WorkerId, Child<()>)> = Vec::new();
    let mut stopping = false;
    // Deadlines of running chunks, earliest first. An entry whose chunk has been answered
    // meanwhile stays until its time comes, and then changes nothing.
    let mut deadlines: BinaryHeap<Reverse<(Instant, WorkerId, u64)>> = BinaryHeap::new();
    // When the heap reaches this size, entries of answered chunks are dropped (amortised: the
    // threshold doubles with what remains), so that many quick tasks with a long timeout do
    // not pile up.
    let mut prune_at = MIN_PRUNE;
    loop {
        let earliest = deadlines.peek().map(|Reverse((at, _, _))| *at);
        wait_for_events(&shared.commands, &workers, earliest);
        let now = Instant::now();
        let mut expired = Vec::new();
        while let Some(Reverse((at, worker, seq))) = deadlines.peek().copied() {
            if at > now {
                break;
            }
            deadlines.pop();
            expired.push((worker, seq));
        }
        if !expired.is_empty() {
            let deliveries: Vec<_> = {
                let mut scheduler = shared.scheduler.lock();
                expired
                    .into_iter()
                    .filter_map(|(worker, seq)| scheduler.expire(worker, seq))
                    .collect()
            };
            if !deliveries.is_empty() {
                shared.idle.notify_all();
                deliver(deliveries);
            }
        }
        // Starts asked for in one batch (the pool's first workers) run in parallel.
        let mut starts = 0;
        for command in shared.commands.take() {
            match command {
                Command::Start if !stopping => starts += 1,
                Command::Start => {}
                Command::Kill(id) => {
                    if let Some((_, child)) = workers.iter().find(|(w, _)| *w == id) {
                        let _ = child.kill();
                    }
                }
                Command::Watch {
                    worker,
                    seq,
                    deadline,
                } => deadlines.push(Reverse((deadline, worker, seq))),
                Command::Stop { kill } => {
                    // Those asked for before the stop start first, as they would have.
                    workers.extend(start_workers(&shared, std::mem::take(&mut starts)));
                    stopping = true;
                    if kill {
                        for (_, child) in &workers {
                            let _ = child.kill();
                        }
                    }
                }
            }
        }
        workers.extend(start_workers(&shared, starts));
        if deadlines.len() >= prune_at {
            let scheduler = shared.scheduler.lock();
            deadlines.retain(|Reverse((_, worker, seq))| scheduler.is_unanswered(*worker, *seq));
            drop(scheduler);
            prune_at = (2 * deadlines.len()).max(MIN_PRUNE);
        }
        workers.retain(|(id, child)| match child.exitcode() {
            None => true,
            Some(exitcode) => {
                // Ended: this only reads what it reported (a panic outside a task, e.g. in the
                // initializer), waiting at most a moment for it.
                let failure = match child.join_timeout(Duration::ZERO) {
                    Err(ProcessError::Panicked { report, .. }) => Some(report.to_string()),
                    _ => None,
                };
                tracing::debug!(worker = %id, pid = child.pid(), exitcode, "pool worker reaped");
                // Fails only when the result thread is gone (the pool is shutting down).
                let _ = shared.reports.send(Report::Exited {
                    worker: *id,
                    exitcode,
                    failure,
                });
                false
            }
        });
        if stopping && workers.is_empty() {
            return;
        }
    }
}

/// Sleeps until a command arrives, a worker ends, or `deadline` passes.
fn wait_for_events(
    commands: &Commands,
    workers: &[(WorkerId, Child<()>)],
    deadline: Option<Instant>,
) {
    let mut fds = Vec::with_capacity(workers.len() + 1);
    fds.push(PollFd::new(&commands.doorbell, PollFlags::IN));
    fds.extend(
        workers
            .iter()
            .map(|(_, child)| PollFd::from_borrowed_fd(child.sentinel(), PollFlags::IN)),
    );
    loop {
        // Recomputed on every retry: an interrupted wait goes on with the time left.
        let timeout = deadline.map(|deadline| {
            // Rounded up, so that the wait does not end just before the deadline.
            let left =
                deadline.saturating_duration_since(Instant::now()) + Duration::from_micros(1);
            rustix::event::Timespec {
                tv_sec: left.as_secs().try_into().unwrap_or(i64::MAX),
                tv_nsec: left.subsec_nanos().into(),
            }
        });
        match rustix::event::poll(&mut fds, timeout.as_ref()) {
            Err(rustix::io::Errno::INTR) => continue,
            // Anything else (ENOMEM) is retried by the caller's loop, which re-checks the
            // workers without sleeping.
            _ => return,
        }
    }
}

/// Starts `count` workers at once, each on its own short-lived thread (the processes are
/// created on mp-core's launcher thread, one after another, but each thread waits for its
/// own child to connect back, which is most of the time a start takes): the pool's first
/// workers are ready in about the time of one start, not `count` of them. The scheduler
/// asks for one start per missing worker, so this never exceeds the pool's size.
fn start_workers(shared: &Shared, count: usize) -> Vec<(WorkerId, Child<()>)> {
    if count <= 1 {
        return (0..count).filter_map(|_| start_worker(shared)).collect();
    }
    std::thread::scope(|scope| {
        let starting: Vec<_> = (0..count)
            .map(|_| {
                std::thread::Builder::new()
                    .name("mp-pool-start".into())
                    .spawn_scoped(scope, || start_worker(shared))
                    // No thread to spare (EAGAIN): start this one here.
                    .map_err(|_| start_worker(shared))
            })
            .collect();
        starting
            .into_iter()
            .filter_map(|started| match started {
                // `start_worker` turns the failures it can meet into errors it reports.
                Ok(thread) => thread.join().ok().flatten(),
                Err(inline) => inline,
            })
            .collect()
    })
}

/// Starts one worker: registers its link with the scheduler, then starts the process.
/// `None` if the scheduler refused (stopping) or the start failed (reported to the pool).
///
/// Creating the link and starting the process can run out of descriptors or memory; some
/// layers below report that by panicking (ipc-channel asserts on EMFILE). Either way it is a
/// [`PoolError::StartFailed`](crate::PoolError::StartFailed) for this one worker, never the
/// end of this thread.
fn start_worker(shared: &Shared) -> Option<(WorkerId, Child<()>)> {
    let id = WorkerId(shared.next_worker.fetch_add(1, Ordering::Relaxed));
    let failed = |registered: bool, message: String| {
        let deliveries = shared
            .scheduler
            .lock()
            .start_failed(id, registered, message);
        shared.idle.notify_all();
        deliver(deliveries);
        None
    };
    let link = catch_panic(|| {
        task_link()
            .and_then(|(sender, receiver)| Ok((sender, receiver, Claims::new()?)))
            .map_err(|e| e.to_string())
    });
    let (sender, receiver, claims) = match link {
        Ok(link) => link,
        Err(message) => return failed(false, message),
    };
    // The worker's first message: the handles it needs besides its link (see
    // `TaskMessage::Setup`). The ring is empty: it fits.
    let setup = TaskMessage::Setup {
        reports: shared.reports.clone(),
        claims: claims.clone(),
    };
    if let Err(e) = catch_panic(|| sender.send(&setup).map_err(|e| e.to_string())) {
        return failed(false, e);
    }
    drop(setup);
    if !shared.scheduler.lock().register_worker(
        id,
        Box::new(TaskLink {
            sender,
            claims: claims.clone(),
        }),
    ) {
        return None;
    }
    let args = WorkerArgs {
        id,
        tasks: receiver,
        max_tasks: shared.config.max_tasks,
    };
    let name = format!("{}-{}", shared.config.name_prefix, id.0);
    let started = catch_panic(|| {
        shared
            .config
            .launcher
            .launch(args, name, shared.config.start_method)
            .map_err(|e| e.to_string())
    });
    match started {
        Ok(child) => {
            let (pid, name) = (child.pid(), child.name());
            tracing::info!(worker = %id, pid, name, "pool worker started");
            shared.scheduler.lock().worker_started(id, child.pid());
            Some((id, child))
        }
        Err(message) => failed(true, message),
    }
}

/// Runs `f`, turning a panic into an error message.
fn catch_panic<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|panic| Err(format!("panicked: {}", panic_message(&*panic))))
}
