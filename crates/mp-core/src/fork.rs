//! The fork start method: `fork()` the calling process; the child continues from a copy of the
//! parent's memory, receives its function through an ipc-channel created before the fork, runs
//! it and exits.
//!
//! Fastest start, and the child sees everything the parent had, but only the forking thread
//! is copied: a lock another thread held at that moment stays held forever in the child. The
//! library's own state is made safe for that: every lock of mp-core is taken by the forking
//! thread across the `fork()` (so none is copied held), and the state that names threads or
//! processes of the parent (the launcher thread, the fork server client, the children list)
//! is reset in the child. Locks of other code (the program's, other libraries') are not;
//! that is why Python deprecates `fork` in threaded programs, and why spawn and forkserver are
//! the safe choices there.

use std::os::fd::OwnedFd;

use ipc_channel::ipc::{self, IpcSender};

use crate::child;
use crate::error::ProcessError;
use crate::forkserver::First;
use crate::protocol::{EXIT_ORPHANED, Header};
use crate::{forkserver, launcher, payload, registry, sys, transfer};

/// Forks a child that waits for its [`Header`] on the returned channel, exchanges large
/// values on `sidecar` and rings it when its outcome should be read before it exits.
///
/// `first` (if any) sends the header and argument before the fork: the child then reads them
/// at once, and a failure to send them starts no child at all.
///
/// A [`First::Inline`] header (a function of no argument) is made before the fork and the
/// child finds it in its copy of this process's memory: no channel at all (`None` is
/// returned for it).
pub(crate) fn fork_child(
    sidecar: OwnedFd,
    first: Option<First>,
) -> Result<(u32, OwnedFd, Option<IpcSender<Header>>), ProcessError> {
    let (channel, inline) = match first {
        Some(First::Inline(mut make)) => (None, Some(make())),
        first => {
            let (sender, receiver) =
                ipc::channel::<Header>().map_err(ProcessError::io("creating a channel"))?;
            if let Some(First::Send(first)) = first {
                transfer::holding_signals(|| first(&sender))?;
            }
            (Some((sender, receiver)), None)
        }
    };
    let parent = std::process::id();
    // Nothing mp-core locks may be copied held: take every lock of the library, in the one
    // order used everywhere (launcher, fork server, registry), across the fork; the memfd
    // pool's lock is never held with another.
    let launcher = launcher::hold_across_fork();
    let server = forkserver::hold_across_fork();
    let registry = registry::hold_across_fork();
    let pool = payload::hold_across_fork();
    // SAFETY: fork has no memory-safety preconditions of its own. The child only runs code
    // that is sound after fork: this thread holds every mp-core lock (released below by the
    // same thread), and the state naming the parent's threads and processes is reset before
    // use (see the module docs for what other code's locks mean).
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(ProcessError::io("fork")(std::io::Error::last_os_error())),
        0 => {
            forkserver::reset_after_fork(server);
            drop((launcher, registry, pool));
            let code = if !child::prepare_child_process(parent) {
                EXIT_ORPHANED
            } else {
                match (inline, channel) {
                    (Some(header), _) => child::serve(None, header, sidecar),
                    (None, Some((sender, receiver))) => {
                        drop(sender);
                        match transfer::recv_timeout(&receiver, None) {
                            Ok(header) => child::serve(Some(receiver), header, sidecar),
                            Err(e) => child::fail(&format!("no request from the parent: {e:?}")),
                        }
                    }
                    (None, None) => child::fail("no header and no channel"),
                }
            };
            // Not `child::exit_forked`: its flush of stdout takes the stdout lock, which a
            // thread of a multi-threaded parent may have held at the fork (std's own exit
            // only tries it).
            std::process::exit(code)
        }
        pid => {
            drop((launcher, server, registry, pool));
            // The child's copies (of an inline header's outcome channel too) are its own.
            drop((sidecar, inline));
            let sender = channel.map(|(sender, receiver)| {
                drop(receiver);
                sender
            });
            let pidfd = sys::pidfd_open(pid as u32).map_err(ProcessError::io("opening a pidfd"))?;
            Ok((pid as u32, pidfd, sender))
        }
    }
}
