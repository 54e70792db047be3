//! The forkserver start method: a fresh, single-threaded copy of this executable (started with
//! spawn the first time it is needed) that forks children on request. Children start at
//! fork's speed from a small, clean process, without inheriting the parent's threads, locks or
//! memory.
//!
//! Requests travel over an ipc-channel (so they can carry the child's own channel); a
//! datagram socket, the *doorbell*, tells the server that a request is waiting, one message
//! per request, each carrying (`SCM_RIGHTS`) the child's outcome bell and its sidecar, which
//! ipc-channel cannot carry. So the server's single thread sleeps in `poll` on the doorbell and a
//! `signalfd` for SIGCHLD at once. Children of the fork server are not children of the
//! parent, so the server reaps them and relays each exit status over a channel the parent
//! handed it with the request.

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use ipc_channel::ipc::{self, IpcReceiver, IpcSender};
use parking_lot::{Mutex, MutexGuard};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};

use crate::child;
use crate::error::ProcessError;
use crate::launcher::SendFirst;
use crate::protocol::{DOORBELL_FD, EXIT_ORPHANED, Header, Role};
use crate::spawn::{self, HANDSHAKE_TIMEOUT};
use crate::transfer;

#[derive(Serialize, Deserialize)]
enum Request {
    /// First message: where to send replies.
    Hello { replies: IpcSender<Reply> },
    /// Fork a child that will read its header from `header`; send its raw wait status on
    /// `status` when it ends. `surroundings`: the requester's working directory and
    /// environment, when they differ from the server's.
    Fork {
        header: IpcReceiver<Header>,
        status: IpcSender<i32>,
        surroundings: Option<Surroundings>,
    },
}

/// A process's working directory and environment.
///
/// The server is a snapshot of its parent at first use; a child forked from it would see the
/// directory and environment of that moment, not the requester's (Python's forkserver has
/// this flaw). So each request carries the requester's when they changed since the server
/// started, and the child adopts them before it runs anything: a forkserver child starts in
/// the same surroundings as a spawned one would.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Surroundings {
    cwd: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
}

impl Surroundings {
    /// This process's, now.
    fn current() -> Self {
        Surroundings {
            cwd: std::env::current_dir().ok(),
            env: std::env::vars_os().collect(),
        }
    }

    /// Makes them this process's.
    ///
    /// # Safety
    ///
    /// The process must have a single thread (changing the environment while another
    /// thread reads it is undefined behaviour).
    unsafe fn adopt(self) -> Result<(), String> {
        if let Some(cwd) = &self.cwd {
            std::env::set_current_dir(cwd)
                .map_err(|e| format!("cannot enter the working directory {cwd:?}: {e}"))?;
        }
        let wanted: HashMap<OsString, OsString> = self.env.into_iter().collect();
        for (key, _) in std::env::vars_os() {
            if !wanted.contains_key(&key) {
                // SAFETY: single-threaded, by this function's contract.
                unsafe { std::env::remove_var(&key) };
            }
        }
        for (key, value) in wanted {
            if std::env::var_os(&key).as_ref() != Some(&value) {
                // SAFETY: single-threaded, by this function's contract.
                unsafe { std::env::set_var(&key, &value) };
            }
        }
        Ok(())
    }
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

pub(crate) struct Client {
    /// The process that started the server (a forked child inherits a copy it must not use).
    owner: u32,
    /// The server's working directory and environment (its parent's when it started).
    surroundings: Surroundings,
    requests: IpcSender<Request>,
    replies: IpcReceiver<Reply>,
    doorbell: OwnedFd,
    server: OwnedFd,
}

impl Drop for Client {
    /// A client is dropped when its server failed: make sure it is gone, and reap it. A
    /// forked child's copy only closes its descriptors: the server is its parent's.
    fn drop(&mut self) {
        if self.owner != std::process::id() {
            return;
        }
        let _ = crate::sys::send_signal(self.server.as_fd(), libc::SIGKILL);
        let _ =
            crate::sys::wait_readable(self.server.as_fd(), Some(std::time::Duration::from_secs(5)));
        let _ = crate::sys::try_reap(self.server.as_fd());
    }
}

static SERVER: Mutex<Option<Client>> = Mutex::new(None);

/// Asks the fork server (started on first use) for a child. If the server has died (it can be
/// killed like any process), a fresh one is started and asked once more.
///
/// `first` (if any) sends the child's header and argument once the request is on its way,
/// while the server forks.
pub(crate) fn fork_child(
    bell: OwnedFd,
    sidecar: OwnedFd,
    first: Option<SendFirst>,
) -> Result<ServerChild, ProcessError> {
    let me = std::process::id();
    let mut server = SERVER.lock();
    let mut retried = false;
    let had_first = first.is_some();
    let mut first = first;
    loop {
        let client = match server.as_mut() {
            Some(client) if client.owner == me => client,
            _ => server.insert(start_server()?),
        };
        match client.fork([bell.as_fd(), sidecar.as_fd()], &mut first) {
            Ok(child) => return Ok(child),
            // The server is fine but could not fork (EAGAIN, ENOMEM): replacing it would kill
            // every child it is running.
            Err(Failure::Refused(error)) => return Err(error),
            Err(Failure::Unreachable(error)) => {
                tracing::warn!(%error, "the fork server failed; starting a new one");
                // Dropping the client kills and reaps the old server.
                *server = None;
                // A header already sent went to a child that will not run: no second try.
                if retried || (had_first && first.is_none()) {
                    return Err(error);
                }
                retried = true;
            }
        }
    }
}

/// Taken by the forking thread across `fork()`, so the child never inherits the lock held.
pub(crate) fn hold_across_fork() -> MutexGuard<'static, Option<Client>> {
    SERVER.lock()
}

/// In a forked child: closes the inherited client's descriptors (without touching the
/// parent's server) and releases the lock.
pub(crate) fn reset_after_fork(mut held: MutexGuard<'static, Option<Client>>) {
    held.take();
}

fn start_server() -> Result<Client, ProcessError> {
    let surroundings = Surroundings::current();
    let (doorbell_server, doorbell) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(|e| ProcessError::io("creating the fork server doorbell")(e.into()))?;
    let spawned = spawn::spawn_self::<Request>(
        Role::ForkServer {
            parent: std::process::id(),
        },
        &[(doorbell_server.as_fd(), DOORBELL_FD)],
    )?;
    drop(doorbell_server);
    let (replies_tx, replies) =
        ipc::channel::<Reply>().map_err(ProcessError::io("creating a channel"))?;
    let client = Client {
        owner: std::process::id(),
        surroundings,
        requests: spawned.channel,
        replies,
        doorbell,
        server: spawned.pidfd,
    };
    transfer::send(
        &client.requests,
        Request::Hello {
            replies: replies_tx,
        },
    )
    .map_err(|e| ProcessError::StartFailed(format!("fork server unreachable: {e}")))?;
    tracing::debug!(pid = spawned.pid, "fork server started");
    Ok(client)
}

/// Rings the doorbell for one request, handing the server the child's outcome bell and
/// sidecar.
fn ring(doorbell: BorrowedFd<'_>, fds: [BorrowedFd<'_>; 2]) -> std::io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    // A datagram is sent whole or not at all, so an interrupted send can simply be retried.
    rustix::io::retry_on_intr(|| {
        rustix::net::sendmsg(
            doorbell,
            &[IoSlice::new(&[1])],
            &mut control,
            SendFlags::empty(),
        )
    })?;
    Ok(())
}

/// What the doorbell said: a request is waiting (with the bell and the sidecar for its child,
/// if they came), nothing more for now, or the parent is gone.
enum Bell {
    Request(Option<(OwnedFd, OwnedFd)>),
    Quiet,
    Hangup,
}

fn next_bell(doorbell: BorrowedFd<'_>) -> Bell {
    let mut byte = [0u8; 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::io::retry_on_intr(|| {
        rustix::net::recvmsg(
            doorbell,
            &mut [IoSliceMut::new(&mut byte)],
            &mut control,
            RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
        )
    });
    match received {
        Ok(message) if message.bytes == 0 => Bell::Hangup,
        Ok(_) => {
            let mut fds: Vec<OwnedFd> = control
                .drain()
                .flat_map(|message| match message {
                    RecvAncillaryMessage::ScmRights(fds) => fds.collect(),
                    _ => Vec::new(),
                })
                .collect();
            let sidecar = fds.pop();
            let bell = fds.pop();
            Bell::Request(bell.zip(sidecar))
        }
        Err(rustix::io::Errno::AGAIN) => Bell::Quiet,
        Err(_) => Bell::Hangup,
    }
}

/// Why a request to the fork server gave no child.
enum Failure {
    /// The server answered: it could not fork.
    Refused(ProcessError),
    /// The server is gone or does not answer.
    Unreachable(ProcessError),
}

impl Client {
    fn fork(
        &mut self,
        fds: [BorrowedFd<'_>; 2],
        first: &mut Option<SendFirst>,
    ) -> Result<ServerChild, Failure> {
        // A failure here is ours (e.g. EMFILE), not the server's.
        let local = |e| Failure::Refused(ProcessError::io("creating a channel")(e));
        let (channel, header) = ipc::channel::<Header>().map_err(local)?;
        let (status_tx, status) = ipc::channel::<i32>().map_err(local)?;
        let unreachable = |e: &dyn std::fmt::Display| {
            Failure::Unreachable(ProcessError::StartFailed(format!(
                "the fork server is unreachable: {e}"
            )))
        };
        transfer::send(
            &self.requests,
            Request::Fork {
                header,
                status: status_tx,
                surroundings: Some(Surroundings::current()).filter(|now| *now != self.surroundings),
            },
        )
        .map_err(|e| unreachable(&e))?;
        ring(self.doorbell.as_fd(), fds).map_err(|e| unreachable(&e))?;
        // While the server forks. If this fails, the child finds its channel closed and
        // exits; the reply is still read, to keep replies in step with requests.
        let sent = first.take().map_or(Ok(()), |first| first(&channel));
        let reply = transfer::recv_timeout(&self.replies, Some(HANDSHAKE_TIMEOUT));
        match (sent, reply) {
            // The server is fine; what failed was ours (typically the argument's encoding).
            (Err(error), Ok(_)) => Err(Failure::Refused(error)),
            (Ok(()), Ok(Reply::Forked(pid))) => Ok(ServerChild {
                pid,
                channel,
                status,
            }),
            (_, Ok(Reply::Failed(message))) => {
                Err(Failure::Refused(ProcessError::StartFailed(message)))
            }
            (_, Err(e)) => Err(Failure::Unreachable(ProcessError::StartFailed(format!(
                "the fork server did not answer: {e:?}"
            )))),
        }
    }
}

/// The fork server's main loop (runs in the re-executed server process, never returns to
/// `main`). Returns its exit code.
pub(crate) fn serve(parent: u32) -> i32 {
    if !child::prepare_child_process(parent) {
        return EXIT_ORPHANED;
    }
    let (requests, replies) = match child::rendezvous::<Request>() {
        Ok((requests, Request::Hello { replies })) => (requests, replies),
        Ok(_) => return child::fail("the fork server was not greeted"),
        Err(message) => return child::fail(&message),
    };
    // SAFETY: the parent placed its end of the doorbell socket pair at DOORBELL_FD with
    // posix_spawn's dup2; nothing else in this process owns it.
    let doorbell = unsafe { OwnedFd::from_raw_fd(DOORBELL_FD) };
    let (sigchld, old_mask) = match SigchldFd::new() {
        Ok(pair) => pair,
        Err(e) => return child::fail(&format!("cannot watch SIGCHLD: {e}")),
    };
    crate::function::warm_up_for_children();
    let me = std::process::id();
    let mut statuses: HashMap<i32, IpcSender<i32>> = HashMap::new();
    loop {
        let mut fds = [
            rustix::event::PollFd::new(&doorbell, rustix::event::PollFlags::IN),
            rustix::event::PollFd::new(&sigchld.fd, rustix::event::PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return child::fail(&format!("fork server poll failed: {e}")),
        }
        let (rings, reaps) = (!fds[0].revents().is_empty(), !fds[1].revents().is_empty());
        if reaps {
            sigchld.drain();
            reap_children(&mut statuses);
        }
        if !rings {
            continue;
        }
        loop {
            let bell = match next_bell(doorbell.as_fd()) {
                Bell::Request(bell) => bell,
                Bell::Quiet => break,
                Bell::Hangup => return 0, // the parent is gone; our children die with us
            };
            let (header, status, surroundings) = match requests.recv() {
                Ok(Request::Fork {
                    header,
                    status,
                    surroundings,
                }) => (header, status, surroundings),
                Ok(Request::Hello { .. }) => continue,
                Err(_) => return 0,
            };
            let Some((bell, sidecar)) = bell else {
                let _ = replies.send(Reply::Failed(
                    "the request came without its bell and sidecar".into(),
                ));
                continue;
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
                    // SAFETY: this child of the single-threaded server has one thread.
                    let adopted = surroundings.map_or(Ok(()), |s| unsafe { s.adopt() });
                    let code = if !child::prepare_child_process(me) {
                        EXIT_ORPHANED
                    } else if let Err(message) = adopted {
                        child::fail(&message)
                    } else {
                        match header.recv() {
                            Ok(first) => child::serve(header, first, bell, sidecar),
                            Err(e) => child::fail(&format!("no request from the parent: {e}")),
                        }
                    };
                    child::exit_forked(code);
                }
                pid => {
                    drop((bell, sidecar));
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
