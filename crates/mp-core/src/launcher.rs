//! Where children are created from.
//!
//! A child's parent-death signal (`PR_SET_PDEATHSIG`) fires when the *thread* that created it
//! exits, not the process. A child started from a short-lived thread (a libtest test, a
//! thread pool's worker) would be killed when that thread ends. So children are created either
//! on the main thread, which lives as long as the process, or on one long-lived launcher
//! thread that other threads hand the work to.

use std::sync::mpsc;

use parking_lot::Mutex;

use crate::error::ProcessError;
use crate::sys;

type Job = Box<dyn FnOnce() + Send>;

/// Runs `launch` on a thread that lives as long as the process.
pub(crate) fn on_long_lived_thread<T: Send + 'static>(
    launch: impl FnOnce() -> Result<T, ProcessError> + Send + 'static,
) -> Result<T, ProcessError> {
    if sys::on_main_thread() {
        return launch();
    }
    static LAUNCHER: Mutex<Option<mpsc::Sender<Job>>> = Mutex::new(None);
    let mut launcher = LAUNCHER.lock();
    if launcher.is_none() {
        let (jobs, receiver) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("multiproc-launcher".into())
            .spawn(move || {
                for job in receiver {
                    job();
                }
            })
            .map_err(ProcessError::io("starting the launcher thread"))?;
        *launcher = Some(jobs);
    }
    let (reply, result) = mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = reply.send(launch());
    });
    launcher
        .as_ref()
        .expect("set above")
        .send(job)
        .map_err(|_| ProcessError::StartFailed("the launcher thread is gone".into()))?;
    result
        .recv()
        .map_err(|_| ProcessError::StartFailed("the launcher thread is gone".into()))?
}
