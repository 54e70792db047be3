//! Where children are created from.
//!
//! A child's parent-death signal (`PR_SET_PDEATHSIG`) fires when the *thread* that created it
//! exits, not the process. A child started from a short-lived thread (a libtest test, a
//! thread pool's worker) would be killed when that thread ends. So children are created either
//! on the main thread, which lives as long as the process, or on one long-lived launcher
//! thread that other threads hand the work to.
//!
//! The launcher belongs to the process that started it: a forked child finds its parent's
//! launcher (a thread that does not exist in the child) and starts its own. The lock is only
//! held to look the launcher up, never while a launch runs.

use std::sync::mpsc;

use std::sync::{Mutex, MutexGuard};

use crate::error::ProcessError;
use crate::sys;

type Job = Box<dyn FnOnce() + Send>;

/// Sends a forked child's header and argument on its header channel before the child runs
/// (fork: before the `fork()`; forkserver: while the server forks), so the child finds them
/// waiting instead of waiting for them.
pub(crate) type SendFirst = Box<
    dyn FnOnce(&ipc_channel::ipc::IpcSender<crate::protocol::Header>) -> Result<(), ProcessError>
        + Send,
>;

struct Launcher {
    /// The process whose thread it is.
    owner: u32,
    jobs: mpsc::Sender<Job>,
}

static LAUNCHER: Mutex<Option<Launcher>> = Mutex::new(None);

/// Runs `launch` on a thread that lives as long as the process.
pub(crate) fn on_long_lived_thread<T: Send + 'static>(
    launch: impl FnOnce() -> Result<T, ProcessError> + Send + 'static,
) -> Result<T, ProcessError> {
    if sys::on_main_thread() {
        return launch();
    }
    let jobs = launcher_jobs()?;
    let (reply, result) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = reply.send(launch());
    });
    jobs.send(job)
        .map_err(|_| ProcessError::StartFailed("the launcher thread is gone".into()))?;
    result
        .recv()
        .map_err(|_| ProcessError::StartFailed("the launcher thread is gone".into()))?
}

/// The job queue of this process's launcher thread, started on first use.
fn launcher_jobs() -> Result<mpsc::Sender<Job>, ProcessError> {
    let me = std::process::id();
    let mut launcher = crate::fork_lock::lock(&LAUNCHER);
    if let Some(current) = launcher.as_ref().filter(|l| l.owner == me) {
        return Ok(current.jobs.clone());
    }
    let (jobs, receiver) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name("multiproc-launcher".into())
        .spawn(move || {
            for job in receiver {
                job();
            }
        })
        .map_err(ProcessError::io("starting the launcher thread"))?;
    if let Some(inherited) = launcher.replace(Launcher {
        owner: me,
        jobs: jobs.clone(),
    }) {
        // A forked copy of the parent's: its thread does not exist here. Leak it rather than
        // run the channel's clean-up on state copied mid-use.
        std::mem::forget(inherited);
    }
    Ok(jobs)
}

/// Taken by the forking thread across `fork()`, so the child never inherits the lock held
/// (the stale launcher it inherits is replaced on first use, by its owner pid).
pub(crate) fn hold_across_fork() -> MutexGuard<'static, impl Sized> {
    crate::fork_lock::lock(&LAUNCHER)
}
