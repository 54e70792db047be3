//! The forkserver start method: a fresh, single-threaded copy of this executable (started with
//! spawn the first time it is needed) that forks children on request. Children start at
//! fork's speed from a small, clean process, without inheriting the parent's threads, locks or
//! memory.
//!
//! Requests travel over an ipc-channel (so they can carry the child's own channel); a pipe,
//! the *doorbell*, tells the server that requests are waiting, so its single thread can sleep
//! in `poll` on the doorbell and a `signalfd` for SIGCHLD at once. Children of the fork server
//! are not children of the parent, so the server reaps them and relays each exit status over
//! a channel the parent handed it with the request.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};

use ipc_channel::ipc::{self, IpcReceiver, IpcSender};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::bootstrap::{self, DOORBELL_FD, EXIT_ORPHANED, Header, Role};
use crate::error::ProcessError;
use crate::spawn::{self, HANDSHAKE_TIMEOUT};

#[derive(Serialize, Deserialize)]
enum Request {
    /// First message: where to send replies.
    Hello { replies: IpcSender<Reply> },
    /// Fork a child that will read its header from `header`; send its raw wait status on
    /// `status` when it ends.
    Fork {
        header: IpcReceiver<Header>,
        status: IpcSender<i32>,
    },
}

#[derive(Serialize, Deserialize)]
enum Reply {
    Forked(u32),
    Failed(String),
}

/// A child forked by the fork server.
pub(crate) struct ServerChild {
    pub pid: u32,
    pub channel: IpcSender<Header>,
    /// Receives the child's raw wait status when the server reaps it.
    pub status: IpcReceiver<i32>,
}

struct Client {
    requests: IpcSender<Request>,
    replies: IpcReceiver<Reply>,
    doorbell: std::fs::File,
    server: OwnedFd,
}

impl Drop for Client {
    /// A client is dropped when its server failed: make sure it is gone, and reap it.
    fn drop(&mut self) {
        let _ = crate::sys::send_signal(self.server.as_fd(), libc::SIGKILL);
        let _ =
            crate::sys::wait_readable(self.server.as_fd(), Some(std::time::Duration::from_secs(5)));
        let _ = crate::sys::try_reap(self.server.as_fd());
    }
}

static SERVER: Mutex<Option<Client>> = Mutex::new(None);

/// Asks the fork server (started on first use) for a child. If the server has died (it can be
/// killed like any process), a fresh one is started and asked once more.
pub(crate) fn fork_child() -> Result<ServerChild, ProcessError> {
    let mut server = SERVER.lock();
    let mut retried = false;
    loop {
        let client = match server.as_mut() {
            Some(client) => client,
            None => server.insert(start_server()?),
        };
        match client.fork() {
            Ok(child) => return Ok(child),
            Err(error) => {
                tracing::warn!(%error, "the fork server failed; starting a new one");
                // Dropping the client kills and reaps the old server.
                *server = None;
                if retried {
                    return Err(error);
                }
                retried = true;
            }
        }
    }
}

fn start_server() -> Result<Client, ProcessError> {
    let (doorbell_read, doorbell_write) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
        .map_err(|e| ProcessError::io("creating the fork server doorbell")(e.into()))?;
    let spawned = spawn::spawn_self::<Request>(
        Role::ForkServer {
            parent: std::process::id(),
        },
        Some(doorbell_read.as_fd()),
    )?;
    let (replies_tx, replies) =
        ipc::channel::<Reply>().map_err(ProcessError::io("creating a channel"))?;
    spawned
        .channel
        .send(Request::Hello {
            replies: replies_tx,
        })
        .map_err(|e| ProcessError::StartFailed(format!("fork server unreachable: {e}")))?;
    tracing::debug!(pid = spawned.pid, "fork server started");
    Ok(Client {
        requests: spawned.channel,
        replies,
        doorbell: doorbell_write.into(),
        server: spawned.pidfd,
    })
}

impl Client {
    fn fork(&mut self) -> Result<ServerChild, ProcessError> {
        let (channel, header) =
            ipc::channel::<Header>().map_err(ProcessError::io("creating a channel"))?;
        let (status_tx, status) =
            ipc::channel::<i32>().map_err(ProcessError::io("creating a channel"))?;
        let unreachable = |e: &dyn std::fmt::Display| {
            ProcessError::StartFailed(format!("the fork server is unreachable: {e}"))
        };
        self.requests
            .send(Request::Fork {
                header,
                status: status_tx,
            })
            .map_err(|e| unreachable(&e))?;
        self.doorbell.write_all(&[1]).map_err(|e| unreachable(&e))?;
        match self.replies.try_recv_timeout(HANDSHAKE_TIMEOUT) {
            Ok(Reply::Forked(pid)) => Ok(ServerChild {
                pid,
                channel,
                status,
            }),
            Ok(Reply::Failed(message)) => Err(ProcessError::StartFailed(message)),
            Err(e) => Err(ProcessError::StartFailed(format!(
                "the fork server did not answer: {e:?}"
            ))),
        }
    }
}

/// The fork server's main loop (runs in the re-executed server process, never returns to
/// `main`). Returns its exit code.
pub(crate) fn serve(parent: u32) -> i32 {
    if !bootstrap::prepare_child_process(parent) {
        return EXIT_ORPHANED;
    }
    let (requests, replies) = match bootstrap::rendezvous::<Request>() {
        Ok((requests, Request::Hello { replies })) => (requests, replies),
        Ok(_) => return bootstrap::fail("the fork server was not greeted"),
        Err(message) => return bootstrap::fail(&message),
    };
    // SAFETY: the parent placed the read end of the doorbell pipe at DOORBELL_FD with
    // posix_spawn's dup2; nothing else in this process owns it.
    let doorbell = unsafe { OwnedFd::from_raw_fd(DOORBELL_FD) };
    let mut doorbell = std::fs::File::from(doorbell);
    let (sigchld, old_mask) = match SigchldFd::new() {
        Ok(pair) => pair,
        Err(e) => return bootstrap::fail(&format!("cannot watch SIGCHLD: {e}")),
    };
    let me = std::process::id();
    let mut statuses: HashMap<i32, IpcSender<i32>> = HashMap::new();
    loop {
        let mut fds = [
            rustix::event::PollFd::new(&doorbell, rustix::event::PollFlags::IN),
            rustix::event::PollFd::new(&sigchld.fd, rustix::event::PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return bootstrap::fail(&format!("fork server poll failed: {e}")),
        }
        let (rings, reaps) = (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
        if reaps {
            sigchld.drain();
            reap_children(&mut statuses);
        }
        if !rings {
            continue;
        }
        let mut bells = [0u8; 64];
        let count = match doorbell.read(&mut bells) {
            Ok(0) | Err(_) => return 0, // the parent is gone; our children die with us
            Ok(count) => count,
        };
        for _ in 0..count {
            let (header, status) = match requests.recv() {
                Ok(Request::Fork { header, status }) => (header, status),
                Ok(Request::Hello { .. }) => continue,
                Err(_) => return 0,
            };
            // SAFETY: the fork server is single-threaded (it runs before main, and never
            // starts a thread), so the child is a complete copy of it.
            match unsafe { libc::fork() } {
                -1 => {
                    let error = std::io::Error::last_os_error();
                    let _ = replies.send(Reply::Failed(format!("fork failed: {error}")));
                }
                0 => {
                    drop((requests, replies, doorbell, statuses, status));
                    sigchld.close_in_child(&old_mask);
                    let code = if !bootstrap::prepare_child_process(me) {
                        EXIT_ORPHANED
                    } else {
                        match header.recv() {
                            Ok(first) => bootstrap::serve(header, first),
                            Err(e) => bootstrap::fail(&format!("no request from the parent: {e}")),
                        }
                    };
                    std::process::exit(code);
                }
                pid => {
                    statuses.insert(pid, status);
                    if replies.send(Reply::Forked(pid as u32)).is_err() {
                        return 0;
                    }
                }
            }
        }
    }
}

fn reap_children(statuses: &mut HashMap<i32, IpcSender<i32>>) {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a live local.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return;
        }
        if let Some(sender) = statuses.remove(&pid) {
            let _ = sender.send(status);
        }
    }
}

/// A signalfd receiving SIGCHLD, which is blocked for normal delivery while it exists.
struct SigchldFd {
    fd: OwnedFd,
}

impl SigchldFd {
    fn new() -> std::io::Result<(SigchldFd, libc::sigset_t)> {
        let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        let mut old = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset/sigaddset initialise the local set; sigprocmask reads it and
        // writes the previous mask into the local `old`; signalfd creates a new descriptor
        // that we own from here on.
        unsafe {
            libc::sigemptyset(set.as_mut_ptr());
            libc::sigaddset(set.as_mut_ptr(), libc::SIGCHLD);
            if libc::sigprocmask(libc::SIG_BLOCK, set.as_ptr(), old.as_mut_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::signalfd(-1, set.as_ptr(), libc::SFD_CLOEXEC | libc::SFD_NONBLOCK);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok((
                SigchldFd {
                    fd: OwnedFd::from_raw_fd(fd),
                },
                old.assume_init(),
            ))
        }
    }

    fn drain(&self) {
        let mut buf = [0u8; std::mem::size_of::<libc::signalfd_siginfo>() * 8];
        while rustix::io::read(&self.fd, &mut buf).is_ok_and(|n| n > 0) {}
    }

    /// In a freshly forked child: restore the signal mask and close the signalfd.
    fn close_in_child(self, old_mask: &libc::sigset_t) {
        // SAFETY: sigprocmask only reads the given, initialised mask.
        unsafe { libc::sigprocmask(libc::SIG_SETMASK, old_mask, std::ptr::null_mut()) };
        drop(self);
    }
}
