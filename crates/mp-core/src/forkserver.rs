//! The forkserver start method: a fresh, single-threaded copy of this executable (started with
//! spawn the first time it is needed) that forks children on request. Children start at
//! fork's speed from a small, clean process, without inheriting the parent's threads, locks or
//! memory.
//!
//! ## Spares: the fork happens before the request
//!
//! The server keeps children forked ahead, *spares*, and tells the requester each one's pid
//! and a pidfd for it (an *announcement*, one datagram on the doorbell, below). A spare waits
//! for a request itself: a request goes straight to it, and it becomes the requested child at
//! once. So a start costs the requester one message and one wake-up of the spare, not a
//! wake-up of the server, a fork, a reply and a wake-up of the requester in turn (most of a
//! forkserver start's time beyond the fork floor's on the project's VM: start + join of a
//! no-op went from 2.0-2.2x that floor to 1.5-1.6x, `crates/mp-bench/README.md`). Android's
//! zygote keeps such a pool of unspecialized processes for the same reason.
//!
//! The spares stand in a line of [`SPARES`]: only the first reads the doorbell; the next
//! waits for it to be taken (or to die), which closes the first one's end of a pipe, its
//! *gate*. The server watches the first gate too, and forks a replacement at the end of the
//! line while the child runs; a start does not wait for that fork even when starts follow
//! each other closely.
//!
//! A request names the spare it is for, and carries a sequence number that pairs it with its
//! ring of the doorbell: a spare that died before reading its request (killed while idle)
//! leaves it to the next one, which passes it over; the requester then finds its child dead,
//! as it would any killed child. While a spare waits, nothing of it reaches the requester's
//! children list: it is an ordinary child of the requester's once handed out. The spares
//! cost two idle processes besides the server while a program uses this start method.
//!
//! ## Channels
//!
//! Requests travel over an ipc-channel (so they can carry the child's own channel, or, for a
//! function of no argument, the child's whole header, which the child then finds in its
//! memory: see [`First`]); a datagram socket, the *doorbell*, tells the spare that a request
//! is waiting, one message per request, each carrying (`SCM_RIGHTS`) the child's sidecar (its
//! outcome bell too), which ipc-channel cannot carry. The server sends its announcements on
//! the doorbell's other direction. Only one process reads the doorbell's requests at a time:
//! the first spare in line, or the server while it has none (after a failed fork).
//!
//! The server forks each spare as a *sibling* (`clone` with `CLONE_PARENT`, see
//! [`fork_sibling`]): the child's parent is the requester, as with the other start methods.
//! So the requester waits for it, reaps it and reads its exact exit status from its pidfd,
//! the child dies with the requester (parent-death signal, set by the spare before it
//! waits), and nothing about it goes through the server once it runs: no status relay, no
//! `SIGCHLD` in the server.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsString;
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};

use ipc_channel::ipc::{self, IpcReceiver, IpcSender};
use rustix::event::{PollFd, PollFlags};
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

// A request lives briefly on the stack of its sender and receiver; boxing its large variant
// would cost an allocation per start.
#[allow(clippy::large_enum_variant)]
#[derive(Serialize, Deserialize)]
enum Request {
    /// First message (the rendezvous needs one).
    Hello,
    /// Become a child (the requester's) that reads its header from `header`: for the spare
    /// whose pid is `spare` (another spare passes it over). `seq` pairs it with its ring of
    /// the doorbell (see [`request_for`]). `surroundings`: the requester's working directory
    /// and environment, when they differ from the server's.
    Fork {
        seq: u64,
        spare: u32,
        header: HeaderRoute,
        surroundings: Option<Surroundings>,
    },
}

#[derive(Serialize, Deserialize)]
enum HeaderRoute {
    /// On a channel of its own, followed by its argument.
    Channel(IpcReceiver<Header>),
    /// In the request: the child finds it in the memory it copies from the server. For a
    /// function of no argument, whose child needs nothing else from its parent: no channel
    /// (a socket pair, about 7 us to create and close on the project's VM), no message to
    /// send and receive, no descriptor passed.
    Inline(Header),
}

/// What a requester gives its forkserver child first (see [`fork_child`]).
pub(crate) enum First {
    /// Sends the header and argument on the child's channel while the server forks.
    Send(SendFirst),
    /// The header, to travel in the request (a function of no argument). Made on demand,
    /// as often as the request is sent (once more if the server had died).
    Inline(Box<dyn FnMut() -> Header + Send>),
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

/// What the server tells the requester on the doorbell, one datagram each: its next spare,
/// or why it has none. (A datagram costs no channel and no allocation on either side.)
#[derive(Debug)]
enum Announcement {
    /// The spare that takes the next request (a child of the requester's, see the module
    /// docs): its pid, and a pidfd for it from the server's `clone` (`CLONE_PIDFD`), passed
    /// along, so that the requester never names the spare by pid (a pid can be reused if the
    /// program lets the kernel reap its children, `SIGCHLD` ignored).
    Spare { pid: u32, pidfd: OwnedFd },
    /// The server could not fork a spare; it tries again when the requester rings (see
    /// [`ring_retry`]).
    Failed(String),
}

impl Announcement {
    /// The longest announcement read: a failure's message is cut beyond it.
    const MAX: usize = 1024;

    /// Sends it (on the server's side of `doorbell`). A spare's is sent from the stack: the
    /// server has just forked, and each page it writes now is a copy-on-write fault.
    fn send(&self, doorbell: BorrowedFd<'_>) -> std::io::Result<()> {
        let mut spare = [0u8; 5];
        let mut failed = Vec::new();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        let fds;
        let message: &[u8] = match self {
            Announcement::Spare { pid, pidfd } => {
                spare[1..].copy_from_slice(&pid.to_le_bytes());
                fds = [pidfd.as_fd()];
                control.push(SendAncillaryMessage::ScmRights(&fds));
                &spare
            }
            Announcement::Failed(reason) => {
                failed.push(1);
                failed.extend_from_slice(reason.as_bytes());
                failed.truncate(Self::MAX);
                &failed
            }
        };
        // A datagram is sent whole or not at all, so an interrupted send can simply be
        // retried.
        rustix::io::retry_on_intr(|| {
            rustix::net::sendmsg(
                doorbell,
                &[IoSlice::new(message)],
                &mut control,
                SendFlags::empty(),
            )
        })?;
        Ok(())
    }

    /// Takes the next announcement from `doorbell` if one is there (`Ok(None)` if not).
    fn try_receive(doorbell: BorrowedFd<'_>) -> std::io::Result<Option<Announcement>> {
        let mut message = [0u8; Self::MAX];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = match rustix::io::retry_on_intr(|| {
            rustix::net::recvmsg(
                doorbell,
                &mut [IoSliceMut::new(&mut message)],
                &mut control,
                RecvFlags::DONTWAIT | RecvFlags::CMSG_CLOEXEC,
            )
        }) {
            Ok(received) => received.bytes,
            Err(rustix::io::Errno::AGAIN) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let pidfd = control.drain().find_map(|message| match message {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        });
        let malformed = || std::io::Error::other("a malformed announcement from the fork server");
        match (&message[..received.min(Self::MAX)], pidfd) {
            ([], _) => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the fork server hung up",
            )),
            ([0, pid @ ..], Some(pidfd)) => <[u8; 4]>::try_from(pid)
                .map(|pid| {
                    Some(Announcement::Spare {
                        pid: u32::from_le_bytes(pid),
                        pidfd,
                    })
                })
                .map_err(|_| malformed()),
            ([0, pid @ ..], None) => {
                // Its pidfd was dropped on the way (this process is out of descriptors): the
                // spare cannot be used; it is ended (the server then forks the next).
                if let Ok(pid) = <[u8; 4]>::try_from(pid) {
                    end_by_pid(u32::from_le_bytes(pid));
                }
                Err(std::io::Error::other(
                    "the spare's pidfd did not come through (out of descriptors?)",
                ))
            }
            ([1, reason @ ..], None) => Ok(Some(Announcement::Failed(
                String::from_utf8_lossy(reason).into_owned(),
            ))),
            _ => Err(malformed()),
        }
    }

    /// Waits at most `timeout` for the next announcement on `doorbell`, or until `server`
    /// (its pidfd) has ended without one.
    fn receive(
        doorbell: BorrowedFd<'_>,
        server: BorrowedFd<'_>,
        timeout: std::time::Duration,
    ) -> std::io::Result<Announcement> {
        if let Some(announcement) = Self::try_receive(doorbell)? {
            return Ok(announcement);
        }
        // Not announced yet (the server is still forking), or the server is gone.
        if crate::sys::wait_any(&[doorbell, server], Some(timeout))?.is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no spare announced in {timeout:?}"),
            ));
        }
        Self::try_receive(doorbell)?.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the fork server ended")
        })
    }
}

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
    /// The number of the next request (see [`request_for`]).
    seq: u64,
}

impl Drop for Client {
    /// A client is dropped when its server failed: make sure it is gone, and reap it, and the
    /// spares it announced that were not handed out. A forked child's copy only closes its
    /// descriptors: the server and the spares are its parent's.
    fn drop(&mut self) {
        if self.owner != std::process::id() {
            return;
        }
        let _ = crate::sys::send_signal(self.server.as_fd(), libc::SIGKILL);
        let _ =
            crate::sys::wait_readable(self.server.as_fd(), Some(std::time::Duration::from_secs(5)));
        let _ = crate::sys::try_reap(self.server.as_fd());
        while let Ok(Some(announcement)) = Announcement::try_receive(self.doorbell.as_fd()) {
            if let Announcement::Spare { pidfd, .. } = announcement {
                let _ = crate::sys::send_signal(pidfd.as_fd(), libc::SIGKILL);
                let _ = crate::sys::wait_readable(
                    pidfd.as_fd(),
                    Some(std::time::Duration::from_secs(5)),
                );
                let _ = crate::sys::try_reap(pidfd.as_fd());
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

/// Rings the doorbell for request number `seq`, handing the spare the child's sidecar.
fn ring(doorbell: BorrowedFd<'_>, seq: u64, sidecar: BorrowedFd<'_>) -> std::io::Result<()> {
    let fds = [sidecar];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    control.push(SendAncillaryMessage::ScmRights(&fds));
    // A datagram is sent whole or not at all, so an interrupted send can simply be retried.
    rustix::io::retry_on_intr(|| {
        rustix::net::sendmsg(
            doorbell,
            &[IoSlice::new(&seq.to_le_bytes())],
            &mut control,
            SendFlags::empty(),
        )
    })?;
    Ok(())
}

/// Rings the doorbell without a request (no descriptor): after a failed fork, the server
/// waits for this to try again. A spare passes it over.
fn ring_retry(doorbell: BorrowedFd<'_>) -> std::io::Result<()> {
    rustix::io::retry_on_intr(|| rustix::net::send(doorbell, &[2], SendFlags::empty()))?;
    Ok(())
}

/// What the doorbell said: request number `seq` is waiting (with the sidecar for its child),
/// a ring to try a failed fork again (no descriptor), or the parent is gone.
enum Bell {
    Request { seq: u64, sidecar: OwnedFd },
    Retry,
    Hangup,
}

/// Waits for the next ring of the doorbell.
fn next_bell(doorbell: BorrowedFd<'_>) -> Bell {
    let mut seq = [0u8; 8];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::io::retry_on_intr(|| {
        rustix::net::recvmsg(
            doorbell,
            &mut [IoSliceMut::new(&mut seq)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
    });
    match received {
        Ok(message) if message.bytes == 0 => Bell::Hangup,
        Ok(_) => control
            .drain()
            .find_map(|message| match message {
                RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
                _ => None,
            })
            .map_or(Bell::Retry, |sidecar| Bell::Request {
                seq: u64::from_le_bytes(seq),
                sidecar,
            }),
        Err(_) => Bell::Hangup,
    }
}

/// The request that rang as number `seq`, read after its ring: the requests before it on the
/// channel are passed over (their rings were read by a spare that died before it read them).
/// `None` if the channel closed (the parent is gone).
fn request_for(requests: &IpcReceiver<Request>, seq: u64) -> Option<Request> {
    loop {
        match requests.recv() {
            Ok(Request::Fork { seq: earlier, .. }) if earlier < seq => continue,
            Ok(Request::Hello) => continue,
            Ok(request) => return Some(request),
            Err(_) => return None,
        }
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
            let _ = crate::sys::send_signal(pidfd.as_fd(), libc::SIGKILL);
            let _ =
                crate::sys::wait_readable(pidfd.as_fd(), Some(std::time::Duration::from_secs(5)));
            let _ = crate::sys::try_reap(pidfd.as_fd());
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
                    if crate::sys::wait_readable(pidfd.as_fd(), Some(std::time::Duration::ZERO))
                        .unwrap_or(false)
                    {
                        let _ = crate::sys::try_reap(pidfd.as_fd());
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
fn end_by_pid(pid: u32) {
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

/// How many spares the server keeps forked ahead. Two: while the first waits for a request,
/// the second waits for the first to be taken, so a start never waits for a fork even when
/// the starts follow each other faster than the server can fork (each child then runs
/// while the server forks its replacement).
const SPARES: usize = 2;

/// The fork server's main loop (runs in the re-executed server process, never returns to
/// `main`). Returns its exit code.
///
/// It keeps [`SPARES`] spares forked and announced, in a line: only the first reads the
/// doorbell; each next one waits for the one before it to be taken (or to die: either way
/// that spare's end of a pipe, its *gate*, closes). The server watches the first spare's
/// gate too, and forks a replacement at the end of the line when it closes.
pub(crate) fn serve(parent: u32) -> i32 {
    if !child::prepare_child_process(parent) {
        return EXIT_ORPHANED;
    }
    let requests = match child::rendezvous::<Request>() {
        Ok((requests, Request::Hello)) => requests,
        Ok(_) => return child::fail("the fork server was not greeted"),
        Err(message) => return child::fail(&message),
    };
    // SAFETY: the parent placed its end of the doorbell socket pair at DOORBELL_FD with
    // posix_spawn's dup2; nothing else in this process owns it.
    let doorbell = unsafe { OwnedFd::from_raw_fd(DOORBELL_FD) };
    let thread = match MainThread::current() {
        Ok(thread) => thread,
        Err(e) => return child::fail(&format!("cannot prepare to fork: {e}")),
    };
    crate::function::warm_up_for_children();
    // The doorbell is a socket pair of the sidecars' kind: its buffer size is theirs.
    crate::payload::warm_up(doorbell.as_fd());
    // The read ends of the waiting spares' gates, first in line first.
    let mut line: VecDeque<OwnedFd> = VecDeque::with_capacity(SPARES);
    loop {
        while line.len() < SPARES {
            let forked = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(std::io::Error::from)
                // SAFETY: the fork server is single-threaded (it runs before main, and never
                // starts a thread), and `thread` describes its one thread.
                .and_then(|gate| Ok((gate, unsafe { fork_sibling(&thread) }?)));
            match forked {
                Ok(((gate, spare_gate), None)) => {
                    // The spare: it waits for the one before it, if any.
                    let previous = line.pop_back();
                    drop((gate, line));
                    child::exit_forked(spare(parent, requests, doorbell, previous, spare_gate));
                }
                Ok(((gate, spare_gate), Some((pid, pidfd)))) => {
                    drop(spare_gate);
                    let announcement = Announcement::Spare { pid, pidfd };
                    if announcement.send(doorbell.as_fd()).is_err() {
                        return 0; // the parent is gone
                    }
                    drop(announcement);
                    line.push_back(gate);
                }
                // With a spare still in line, forking again once it is taken may work.
                Err(_) if !line.is_empty() => break,
                Err(error) => {
                    if !fork_failed(&doorbell, &requests, format!("fork failed: {error}")) {
                        return 0;
                    }
                }
            }
        }
        // Until the first spare is taken or dead (its gate closes), or the parent is gone.
        let Some(first) = line.front() else { continue };
        if wait(&[(first.as_fd(), PollFlags::IN)]).is_none() {
            return 0;
        }
        line.pop_front();
    }
}

/// Waits until one of `fds` is ready for its events (or hung up), or the doorbell hangs up
/// (the parent is gone: `None`).
fn wait(fds: &[(BorrowedFd<'_>, PollFlags)]) -> Option<usize> {
    // SAFETY: DOORBELL_FD is the doorbell for the whole life of the server, and of a spare
    // until it is taken (it calls this before).
    let doorbell = unsafe { BorrowedFd::borrow_raw(DOORBELL_FD) };
    let mut polled: Vec<PollFd<'_>> = fds
        .iter()
        .map(|(fd, flags)| PollFd::new(fd, *flags))
        // Watched for its hangup only: its requests are the first spare's to read.
        .chain(std::iter::once(PollFd::new(&doorbell, PollFlags::empty())))
        .collect();
    loop {
        match rustix::event::poll(&mut polled, None) {
            Ok(_) => {
                if !polled.last()?.revents().is_empty() {
                    return None;
                }
                if let Some(ready) = polled.iter().position(|p| !p.revents().is_empty()) {
                    return Some(ready);
                }
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return None,
        }
    }
}

/// After the server failed to fork a spare, with none in line: announces why, and waits for
/// the requester's ring to try again. A request that comes instead (for a spare that died
/// before reading it) is passed over, and also means trying again. False if the parent is
/// gone.
fn fork_failed(doorbell: &OwnedFd, requests: &IpcReceiver<Request>, reason: String) -> bool {
    if Announcement::Failed(reason).send(doorbell.as_fd()).is_err() {
        return false;
    }
    match next_bell(doorbell.as_fd()) {
        Bell::Hangup => false,
        Bell::Retry => true,
        Bell::Request { seq, sidecar } => {
            drop(sidecar);
            request_for(requests, seq).is_some()
        }
    }
}

/// A spare's life (see the module docs): it waits for the spare before it in line (its gate
/// closes when it is taken or dies), then for the request addressed to it, opens its own
/// gate, and becomes the requested child. Returns its exit code.
fn spare(
    parent: u32,
    requests: IpcReceiver<Request>,
    doorbell: OwnedFd,
    previous: Option<OwnedFd>,
    gate: OwnedFd,
) -> i32 {
    // Its parent is the server's (the requester), and it dies with it from now on, idle or
    // not. SIGPIPE is ignored already: the disposition the server set is inherited.
    if !crate::sys::die_with_parent(parent) {
        return EXIT_ORPHANED;
    }
    if let Some(previous) = previous
        && wait(&[(previous.as_fd(), PollFlags::IN)]).is_none()
    {
        return 0;
    }
    let me = std::process::id();
    let (route, surroundings, sidecar) = loop {
        let (seq, sidecar) = match next_bell(doorbell.as_fd()) {
            Bell::Request { seq, sidecar } => (seq, sidecar),
            // For a server without a spare, and the server has this one.
            Bell::Retry => continue,
            Bell::Hangup => return 0, // the parent is gone
        };
        match request_for(&requests, seq) {
            Some(Request::Fork {
                seq: this,
                spare,
                header,
                surroundings,
            }) if this == seq && spare == me => break (header, surroundings, sidecar),
            // For a spare that died before it read it (its requester finds it dead).
            Some(_) => continue,
            None => return 0,
        }
    };
    // Taken: the next spare in line may read the doorbell, and the server forks another.
    drop((gate, requests, doorbell));
    // SAFETY: this child of the single-threaded server has one thread.
    if let Err(message) = surroundings.map_or(Ok(()), |s| unsafe { s.adopt() }) {
        return child::fail(&message);
    }
    match route {
        HeaderRoute::Inline(header) => child::serve(None, header, sidecar),
        HeaderRoute::Channel(channel) => match channel.recv() {
            Ok(header) => child::serve(Some(channel), header, sidecar),
            Err(e) => child::fail(&format!("no request from the parent: {e}")),
        },
    }
}

/// `PR_GET_TID_ADDRESS` (not in the libc crate for Linux): the address the kernel clears
/// when the calling thread exits, which glibc sets to its thread descriptor's `tid` field.
const PR_GET_TID_ADDRESS: libc::c_int = 40;

/// What a child cloned without glibc's `fork` needs set up as `fork` would (see
/// [`fork_sibling`]): where glibc keeps the thread's id, and its robust mutex list.
struct MainThread {
    /// glibc's `tid` field of this thread's descriptor (the kernel writes the child's tid
    /// there, `CLONE_CHILD_SETTID`, as glibc's `fork` asks it to).
    tid: *mut libc::pid_t,
    /// The thread's robust mutex list head and its size, registered again in the child
    /// (the kernel does not copy the registration).
    robust_head: *mut libc::c_void,
    robust_len: usize,
}

impl MainThread {
    fn current() -> std::io::Result<MainThread> {
        let mut tid: *mut libc::pid_t = std::ptr::null_mut();
        // SAFETY: PR_GET_TID_ADDRESS writes one pointer into the local `tid`.
        if unsafe { libc::prctl(PR_GET_TID_ADDRESS, &mut tid as *mut *mut libc::pid_t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut robust_head: *mut libc::c_void = std::ptr::null_mut();
        let mut robust_len: usize = 0;
        // SAFETY: get_robust_list(0, ...) writes the calling thread's list head and its
        // length into the two locals.
        if unsafe {
            libc::syscall(
                libc::SYS_get_robust_list,
                0,
                &mut robust_head as *mut *mut libc::c_void,
                &mut robust_len as *mut usize,
            )
        } != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        if tid.is_null() || robust_head.is_null() {
            return Err(std::io::Error::other(
                "the thread's id or robust list address is unknown",
            ));
        }
        Ok(MainThread {
            tid,
            robust_head,
            robust_len,
        })
    }
}

/// `struct clone_args` of `clone3` (its first version, 64 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
}

/// `fork()`, except that the child is this process's *sibling*: a child of this process's
/// parent (`CLONE_PARENT`), which gets its `SIGCHLD` and reaps it. Returns `None` in the child
/// and, in the server, the child's pid and a pidfd for it (`CLONE_PIDFD`), which the server
/// passes to the parent.
///
/// glibc's `fork` cannot ask for that flag, so this clones by hand and then does in the
/// child what glibc's `_Fork` (the `fork` without `atfork` handlers) does: the kernel
/// writes the child's thread id into glibc's thread descriptor (`CLONE_CHILD_SETTID` at the
/// address glibc registered, read back with `PR_GET_TID_ADDRESS`), and the child registers
/// the robust mutex list again (the kernel does not copy the registration; the list is
/// empty, as the server holds no robust mutex). The `atfork` handlers are skipped, as
/// `_Fork` and the `exit` of forkserver children skip them: the server has run nothing but
/// mp-core since it started, so there is no state of other code in it to fix up.
///
/// # Safety
///
/// The process must be single-threaded, and `thread` must describe its thread.
unsafe fn fork_sibling(thread: &MainThread) -> std::io::Result<Option<(u32, OwnedFd)>> {
    let flags = (libc::CLONE_PARENT
        | libc::CLONE_CHILD_SETTID
        | libc::CLONE_CHILD_CLEARTID
        | libc::CLONE_PIDFD) as u64;
    let mut pidfd: libc::c_int = -1;
    let args = CloneArgs {
        flags,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        child_tid: thread.tid as u64,
        // With CLONE_PARENT, the child's exit signal is the server's own (SIGCHLD); clone3
        // requires 0 here.
        exit_signal: 0,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 reads `args` (64 bytes, the size given); without CLONE_VM the child
    // runs in a copy of this address space, on a copy of this stack, like a forked child,
    // and this process has a single thread (this function's contract), so the copy is
    // complete. The kernel writes the child's tid to `thread.tid`, a field of glibc's
    // descriptor of this thread, in the child's copy only, and the pidfd's number to the
    // local `pidfd`, in the server.
    let mut pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        // clone3 is refused by some seccomp filters (older container runtimes): the classic
        // clone, whose argument order differs between architectures.
        // SAFETY: as above; no new stack (0: the child continues on a copy of this one).
        pid = unsafe { legacy_clone(flags, &mut pidfd, thread.tid) };
    }
    if pid == -1 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: registers the robust list head glibc registered for this thread (read
        // back in `MainThread::current`), which the child has a copy of at the same address.
        unsafe {
            libc::syscall(
                libc::SYS_set_robust_list,
                thread.robust_head,
                thread.robust_len,
            )
        };
        return Ok(None);
    }
    // SAFETY: with CLONE_PIDFD the kernel stored a new descriptor in `pidfd`, owned by
    // nothing else.
    Ok(Some((pid as u32, unsafe { OwnedFd::from_raw_fd(pidfd) })))
}

/// `clone(flags, 0, pidfd, ctid)` in this architecture's argument order (with
/// `CLONE_PIDFD`, the parent-tid argument is where the pidfd is stored).
///
/// # Safety
///
/// As `fork_sibling`.
#[cfg(target_arch = "x86_64")]
unsafe fn legacy_clone(
    flags: u64,
    pidfd: *mut libc::c_int,
    ctid: *mut libc::pid_t,
) -> libc::c_long {
    // SAFETY: x86-64's order: flags, stack, parent tid (the pidfd), child tid, tls.
    unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, pidfd, ctid, 0usize) }
}

/// `clone(flags, 0, pidfd, ctid)` in this architecture's argument order (with
/// `CLONE_PIDFD`, the parent-tid argument is where the pidfd is stored).
///
/// # Safety
///
/// As `fork_sibling`.
#[cfg(target_arch = "aarch64")]
unsafe fn legacy_clone(
    flags: u64,
    pidfd: *mut libc::c_int,
    ctid: *mut libc::pid_t,
) -> libc::c_long {
    // SAFETY: aarch64's order: flags, stack, parent tid (the pidfd), tls, child tid.
    unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, pidfd, 0usize, ctid) }
}

/// Without `clone3`, no sibling on this architecture (its `clone` order is not spelled out
/// here): the error stays `ENOSYS`.
///
/// # Safety
///
/// None needed; unsafe only to match the other architectures'.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
unsafe fn legacy_clone(
    _flags: u64,
    _pidfd: *mut libc::c_int,
    _ctid: *mut libc::pid_t,
) -> libc::c_long {
    -1
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn doorbell() -> (OwnedFd, OwnedFd) {
        rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap()
    }

    /// A pidfd that does not become readable while the test runs (this process's own).
    fn live_server() -> OwnedFd {
        crate::sys::pidfd_open(std::process::id()).unwrap()
    }

    #[test]
    fn announcements_cross_the_doorbell_whole() {
        let (server, client) = doorbell();
        let alive = live_server();
        let long = "x".repeat(3 * Announcement::MAX);
        let me = std::process::id();
        for announcement in [
            Announcement::Spare {
                pid: me,
                pidfd: live_server(),
            },
            Announcement::Failed("fork failed: EAGAIN".into()),
            Announcement::Failed(long.clone()),
        ] {
            announcement.send(server.as_fd()).unwrap();
            let received =
                Announcement::receive(client.as_fd(), alive.as_fd(), Duration::from_secs(5))
                    .unwrap();
            match (&announcement, received) {
                (Announcement::Spare { .. }, Announcement::Spare { pid, pidfd }) => {
                    assert_eq!(pid, me);
                    // A pidfd of this (living) process came through: not readable.
                    assert!(
                        !crate::sys::wait_readable(pidfd.as_fd(), Some(Duration::ZERO)).unwrap()
                    );
                }
                (Announcement::Failed(sent), Announcement::Failed(got))
                    if sent.len() > Announcement::MAX =>
                {
                    assert_eq!(got, sent[..Announcement::MAX - 1]);
                }
                (Announcement::Failed(sent), Announcement::Failed(got)) => assert_eq!(&got, sent),
                (sent, got) => panic!("sent {sent:?}, received {got:?}"),
            }
        }
    }

    #[test]
    fn a_malformed_late_or_missing_announcement_is_an_error() {
        let (server, client) = doorbell();
        let alive = live_server();
        rustix::net::send(&server, &[7, 1, 2], SendFlags::empty()).unwrap();
        let malformed =
            Announcement::receive(client.as_fd(), alive.as_fd(), Duration::from_secs(5))
                .unwrap_err();
        assert!(malformed.to_string().contains("malformed"), "{malformed}");
        let late = Announcement::receive(client.as_fd(), alive.as_fd(), Duration::from_millis(1))
            .unwrap_err();
        assert_eq!(late.kind(), std::io::ErrorKind::TimedOut);
        drop(server);
        let gone = Announcement::receive(client.as_fd(), alive.as_fd(), Duration::from_secs(5))
            .unwrap_err();
        assert_eq!(gone.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn rings_say_whether_they_carry_a_request() {
        let (server, client) = doorbell();
        let (sidecar, _) = doorbell();
        ring(client.as_fd(), 7, sidecar.as_fd()).unwrap();
        ring_retry(client.as_fd()).unwrap();
        assert!(matches!(
            next_bell(server.as_fd()),
            Bell::Request { seq: 7, .. }
        ));
        assert!(matches!(next_bell(server.as_fd()), Bell::Retry));
        drop(client);
        assert!(matches!(next_bell(server.as_fd()), Bell::Hangup));
    }
}
