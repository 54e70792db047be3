//! The fork start method: `fork()` the calling process; the child continues from a copy of the
//! parent's memory, receives its function through an ipc-channel created before the fork, runs
//! it and exits.
//!
//! Fastest start, and the child sees everything the parent had, but forking a multithreaded
//! parent is unsafe in general: only the forking thread survives in the child, and a lock
//! another thread held at that moment stays held forever there (Python deprecates `fork` in
//! threaded programs for this reason). Prefer spawn or forkserver unless the parent is
//! single-threaded.

use std::os::fd::OwnedFd;

use ipc_channel::ipc::{self, IpcSender};

use crate::bootstrap::{self, EXIT_ORPHANED, Header};
use crate::error::ProcessError;
use crate::sys;

/// Forks a child that waits for its [`Header`] on the returned channel.
pub(crate) fn fork_child() -> Result<(u32, OwnedFd, IpcSender<Header>), ProcessError> {
    let (sender, receiver) =
        ipc::channel::<Header>().map_err(ProcessError::io("creating a channel"))?;
    let parent = std::process::id();
    // SAFETY: fork has no memory-safety preconditions of its own; the child below only runs
    // code that is sound after fork in the documented setting (see the module docs: the
    // caller chose the fork start method knowing the parent's threads are not copied).
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(ProcessError::io("fork")(std::io::Error::last_os_error())),
        0 => {
            drop(sender);
            let code = if !bootstrap::prepare_child_process(parent) {
                EXIT_ORPHANED
            } else {
                match receiver.recv() {
                    Ok(header) => bootstrap::serve(receiver, header),
                    Err(e) => bootstrap::fail(&format!("no request from the parent: {e}")),
                }
            };
            std::process::exit(code)
        }
        pid => {
            drop(receiver);
            let pidfd = sys::pidfd_open(pid as u32).map_err(ProcessError::io("opening a pidfd"))?;
            Ok((pid as u32, pidfd, sender))
        }
    }
}
