//! The requester's side of the fork server: the one [`Client`] of this process, which starts
//! the server on first use, takes the spares it announces and sends them requests.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Mutex, MutexGuard};

use ipc_channel::ipc::{self, IpcSender};
use rustix::net::{AddressFamily, SocketFlags, SocketType};

use super::doorbell::{Announcement, ring, ring_retry};
use super::{First, HeaderRoute, Request, Surroundings};
use crate::error::ProcessError;
use crate::protocol::{DOORBELL_FD, Header, Role};
use crate::spawn::{self, HANDSHAKE_TIMEOUT};
use crate::{sys, transfer};

/// A child forked by the fork server (a child of this process, see the module docs).
pub(crate) struct ServerChild {
    pub pid: u32,
    pub pidfd: OwnedFd,
    /// The child's header channel (`None`: the header travelled in the request).
    pub channel: Option<IpcSender<Header>>,
}

pub(crate) struct Client {
    /// The process that started the server (a forked child inherits a copy it must not use).
    owner: u32,
    /// The server's working directory and environment (its parent's when it started).
    surroundings: Surroundings,
    requests: IpcSender<Request>,
    /// Rung once per request (carrying the child's sidecar); the server announces its spares
    /// on it.
    doorbell: OwnedFd,
    server: OwnedFd,
    /// The last announcement was a failure: the server waits for a ring to try again.
    retry: bool,
    /// The number of the next request (see [`super::doorbell::request_for`]).
    seq: u64,
}

impl Drop for Client {
    /// A client is dropped when its server failed: make sure it is gone, and reap it, and the
    /// spares it announced that were not handed out. A forked child's copy only closes its
    /// descriptors: the server and the spares are its parent's.
    ///
    /// A spare the server forked but had not announced when it died (a kill in the few
    /// microseconds between the two) is unknown here: it exits when it finds the doorbell
    /// hung up, and stays a zombie until this process exits.
    fn drop(&mut self) {
        if self.owner != std::process::id() {
            return;
        }
        sys::kill_and_reap(self.server.as_fd());
        while let Ok(Some(announcement)) = Announcement::try_receive(self.doorbell.as_fd()) {
            if let Announcement::Spare { pidfd, .. } = announcement {
                sys::kill_and_reap(pidfd.as_fd());
            }
        }
    }
}

static SERVER: Mutex<Option<Client>> = Mutex::new(None);

/// Asks the fork server (started on first use) for a child. If the server has died (it can be
/// killed like any process), a fresh one is started and asked once more.
///
/// `first` (if any) sends the child's header and argument once the request is on its way.
pub(crate) fn fork_child(
    sidecar: OwnedFd,
    first: Option<First>,
) -> Result<ServerChild, ProcessError> {
    let me = std::process::id();
    let mut server = crate::fork_lock::lock(&SERVER);
    let mut retried = false;
    let had_first = matches!(first, Some(First::Send(_)));
    let mut first = first;
    loop {
        let client = match server.as_mut() {
            Some(client) if client.owner == me => client,
            _ => server.insert(start_server()?),
        };
        match client.fork(sidecar.as_fd(), &mut first) {
            Ok(child) => return Ok(child),
            // The server is fine but could not fork (EAGAIN, ENOMEM): replacing it would not
            // help.
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
    crate::fork_lock::lock(&SERVER)
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
    let client = Client {
        owner: std::process::id(),
        surroundings,
        requests: spawned.channel,
        doorbell,
        server: spawned.pidfd,
        retry: false,
        seq: 0,
    };
    transfer::send(&client.requests, Request::Hello)
        .map_err(|e| ProcessError::StartFailed(format!("fork server unreachable: {e}")))?;
    tracing::debug!(pid = spawned.pid, "fork server started");
    Ok(client)
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
        sidecar: BorrowedFd<'_>,
        first: &mut Option<First>,
    ) -> Result<ServerChild, Failure> {
        let unreachable = |e: &dyn std::fmt::Display| {
            Failure::Unreachable(ProcessError::StartFailed(format!(
                "the fork server is unreachable: {e}"
            )))
        };
        let (pid, pidfd) = self.next_spare().map_err(|e| match e {
            SpareError::Failed(reason) => Failure::Refused(ProcessError::StartFailed(reason)),
            SpareError::Io(e) => unreachable(&e),
        })?;
        // From here on, a failure leaves a spare that will never run: ended and reaped.
        let give_up = |failure: Failure| {
            sys::kill_and_reap(pidfd.as_fd());
            failure
        };
        // A failure here is ours (e.g. EMFILE), not the server's.
        let (channel, header) = match first {
            Some(First::Inline(make)) => (None, HeaderRoute::Inline(make())),
            _ => match ipc::channel::<Header>() {
                Ok((channel, header)) => (Some(channel), HeaderRoute::Channel(header)),
                Err(e) => {
                    return Err(give_up(Failure::Refused(ProcessError::io(
                        "creating a channel",
                    )(e))));
                }
            },
        };
        let surroundings = Some(Surroundings::current()).filter(|now| *now != self.surroundings);
        let seq = self.seq;
        self.seq += 1;
        // The request, the doorbell's ring and the child's first messages, with signals held
        // back once.
        let sent = transfer::holding_signals(|| {
            transfer::send(
                &self.requests,
                Request::Fork {
                    seq,
                    spare: pid,
                    header,
                    surroundings,
                },
            )
            .map_err(|e| unreachable(&e))?;
            ring(self.doorbell.as_fd(), seq, sidecar).map_err(|e| unreachable(&e))?;
            match (&channel, first.take()) {
                (Some(channel), Some(First::Send(first))) => {
                    first(channel).map_err(Failure::Refused)
                }
                (_, inline) => {
                    // Kept for a second request, if the server turns out to be gone.
                    *first = inline;
                    Ok(())
                }
            }
        });
        match sent {
            Ok(()) => Ok(ServerChild {
                pid,
                pidfd,
                channel,
            }),
            Err(failure) => Err(give_up(failure)),
        }
    }

    /// The next spare announced (waiting for the server to fork it if need be), with a pidfd
    /// that names it for good (it is our child: its pid cannot be reused before we reap it).
    /// A spare that died while it waited (killed) is reaped and passed over.
    fn next_spare(&mut self) -> Result<(u32, OwnedFd), SpareError> {
        if std::mem::take(&mut self.retry) {
            ring_retry(self.doorbell.as_fd())?;
        }
        loop {
            let announced = Announcement::receive(
                self.doorbell.as_fd(),
                self.server.as_fd(),
                HANDSHAKE_TIMEOUT,
            )?;
            match announced {
                Announcement::Spare { pid, pidfd } => {
                    // A spare that died while it waited (killed) is passed over.
                    if sys::wait_readable(pidfd.as_fd(), Some(std::time::Duration::ZERO))
                        .unwrap_or(false)
                    {
                        let _ = sys::try_reap(pidfd.as_fd());
                        continue;
                    }
                    return Ok((pid, pidfd));
                }
                Announcement::Failed(reason) => {
                    self.retry = true;
                    return Err(SpareError::Failed(reason));
                }
            }
        }
    }
}

/// Ends and reaps spare `pid`, a child of ours that was announced but cannot be used, without
/// its pidfd (it did not come through). Its pid names no other process meanwhile: it is our
/// child, not reaped before this (unless the program ignores `SIGCHLD`, and the spare died on
/// its own in the moment since it was announced).
pub(super) fn end_by_pid(pid: u32) {
    let Ok(pid) = i32::try_from(pid) else { return };
    // SAFETY: kill and waitpid on a child of this process that nothing else reaps (see
    // above); waitpid writes nothing (null status).
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        while libc::waitpid(pid, std::ptr::null_mut(), 0) == -1
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
        {}
    }
}

/// Why [`Client::next_spare`] has none.
enum SpareError {
    /// The server could not fork one.
    Failed(String),
    /// The server is gone, did not answer, or its announcement could not be taken.
    Io(std::io::Error),
}

impl From<std::io::Error> for SpareError {
    fn from(error: std::io::Error) -> Self {
        SpareError::Io(error)
    }
}
