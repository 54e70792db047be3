//! The forkserver start method: a fresh, single-threaded copy of this executable (started with
//! spawn the first time it is needed) that forks children on request. Children start at
//! fork's speed from a small, clean process, without inheriting the parent's threads, locks or
//! memory.
//!
//! Requests travel over an ipc-channel (so they can carry the child's own channel, or, for a
//! function of no argument, the child's whole header, which the child then finds in the
//! memory it copies from the server: see [`First`]); a
//! datagram socket, the *doorbell*, tells the server that a request is waiting, one message
//! per request, each carrying (`SCM_RIGHTS`) the child's sidecar (its outcome bell too), which
//! ipc-channel cannot carry. The server's single thread sleeps in a blocking `recvmsg` on the
//! doorbell.
//!
//! The server forks each child as a *sibling* (`clone` with `CLONE_PARENT`, see
//! [`fork_sibling`]): the child's parent is the requester, as with the other start methods.
//! So the requester waits for it, reaps it and reads its exact exit status from its pidfd,
//! the child dies with the requester (parent-death signal), and nothing about it goes
//! through the server once it runs: no status relay (a wake-up of the server and one of the
//! requester per child, on the path of every `join`), no `SIGCHLD` in the server.

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
    /// First message (the rendezvous needs one).
    Hello,
    /// Fork a child (the requester's) that will read its header from `header`.
    /// `surroundings`: the requester's working directory and environment, when they differ
    /// from the server's.
    Fork {
        header: HeaderRoute,
        surroundings: Option<Surroundings>,
    },
}

/// How a forkserver child gets its [`Header`].
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

/// The server's answer to a request: one datagram on the doorbell (the requester's pid
/// reply costs no channel and no allocation on either side, and the server sends it while its
/// new child waits for the CPU).
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Forked(u32),
    Failed(String),
}

impl Reply {
    /// The longest reply read: a failure's message is cut beyond it.
    const MAX: usize = 1024;

    /// Sends the reply (on the server's side of `doorbell`). A child's pid is sent from the
    /// stack: the server has just forked, and each page it writes now is a copy-on-write
    /// fault.
    fn send(&self, doorbell: BorrowedFd<'_>) -> std::io::Result<()> {
        let mut forked = [0u8; 5];
        let mut failed = Vec::new();
        let message: &[u8] = match self {
            Reply::Forked(pid) => {
                forked[1..].copy_from_slice(&pid.to_le_bytes());
                &forked
            }
            Reply::Failed(reason) => {
                failed.push(1);
                failed.extend_from_slice(reason.as_bytes());
                failed.truncate(Self::MAX);
                &failed
            }
        };
        // A datagram is sent whole or not at all, so an interrupted send can simply be
        // retried.
        rustix::io::retry_on_intr(|| rustix::net::send(doorbell, message, SendFlags::empty()))?;
        Ok(())
    }

    /// Waits at most `timeout` for the server's reply on `doorbell`.
    fn receive(doorbell: BorrowedFd<'_>, timeout: std::time::Duration) -> std::io::Result<Reply> {
        if !crate::sys::wait_readable(doorbell, Some(timeout))? {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no reply in {timeout:?}"),
            ));
        }
        let mut message = [0u8; Self::MAX];
        let received = rustix::io::retry_on_intr(|| {
            rustix::net::recv(doorbell, &mut message, RecvFlags::DONTWAIT)
        })?;
        match &message[..received.0.min(Self::MAX)] {
            [] => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the fork server hung up",
            )),
            [0, pid @ ..] => <[u8; 4]>::try_from(pid)
                .map(|pid| Reply::Forked(u32::from_le_bytes(pid)))
                .map_err(|_| std::io::Error::other("a malformed reply from the fork server")),
            [1, reason @ ..] => Ok(Reply::Failed(String::from_utf8_lossy(reason).into_owned())),
            _ => Err(std::io::Error::other(
                "a malformed reply from the fork server",
            )),
        }
    }
}

/// A child forked by the fork server (a child of this process, see the module docs).
pub(crate) struct ServerChild {
    pub pid: u32,
    /// The child's header channel (`None`: the header travelled in the request).
    pub channel: Option<IpcSender<Header>>,
}

pub(crate) struct Client {
    /// The process that started the server (a forked child inherits a copy it must not use).
    owner: u32,
    /// The server's working directory and environment (its parent's when it started).
    surroundings: Surroundings,
    requests: IpcSender<Request>,
    /// Rung once per request (carrying the child's sidecar); the server replies on it.
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
    sidecar: OwnedFd,
    first: Option<First>,
) -> Result<ServerChild, ProcessError> {
    let me = std::process::id();
    let mut server = SERVER.lock();
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
    let client = Client {
        owner: std::process::id(),
        surroundings,
        requests: spawned.channel,
        doorbell,
        server: spawned.pidfd,
    };
    transfer::send(&client.requests, Request::Hello)
        .map_err(|e| ProcessError::StartFailed(format!("fork server unreachable: {e}")))?;
    tracing::debug!(pid = spawned.pid, "fork server started");
    Ok(client)
}

/// Rings the doorbell for one request, handing the server the child's sidecar.
fn ring(doorbell: BorrowedFd<'_>, sidecar: BorrowedFd<'_>) -> std::io::Result<()> {
    let fds = [sidecar];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
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

/// What the doorbell said: a request is waiting (with the sidecar for its child, if it
/// came), or the parent is gone.
enum Bell {
    Request(Option<OwnedFd>),
    Hangup,
}

/// Waits for the next ring of the doorbell.
fn next_bell(doorbell: BorrowedFd<'_>) -> Bell {
    let mut byte = [0u8; 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::io::retry_on_intr(|| {
        rustix::net::recvmsg(
            doorbell,
            &mut [IoSliceMut::new(&mut byte)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )
    });
    match received {
        Ok(message) if message.bytes == 0 => Bell::Hangup,
        Ok(_) => Bell::Request(control.drain().find_map(|message| match message {
            RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
            _ => None,
        })),
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
        sidecar: BorrowedFd<'_>,
        first: &mut Option<First>,
    ) -> Result<ServerChild, Failure> {
        // A failure here is ours (e.g. EMFILE), not the server's.
        let local = |e| Failure::Refused(ProcessError::io("creating a channel")(e));
        let (channel, header) = match first {
            Some(First::Inline(make)) => (None, HeaderRoute::Inline(make())),
            _ => {
                let (channel, header) = ipc::channel::<Header>().map_err(local)?;
                (Some(channel), HeaderRoute::Channel(header))
            }
        };
        let unreachable = |e: &dyn std::fmt::Display| {
            Failure::Unreachable(ProcessError::StartFailed(format!(
                "the fork server is unreachable: {e}"
            )))
        };
        let surroundings = Some(Surroundings::current()).filter(|now| *now != self.surroundings);
        // The request, the doorbell's ring and the child's first messages, with signals held
        // back once.
        let sent = transfer::holding_signals(|| {
            transfer::send(
                &self.requests,
                Request::Fork {
                    header,
                    surroundings,
                },
            )
            .map_err(|e| unreachable(&e))?;
            ring(self.doorbell.as_fd(), sidecar).map_err(|e| unreachable(&e))?;
            // While the server forks. If this fails, the child finds its channel closed and
            // exits; the reply is still read, to keep replies in step with requests.
            Ok(match (&channel, first.take()) {
                (Some(channel), Some(First::Send(first))) => first(channel),
                (_, inline) => {
                    // Kept for a second request, if the server turns out to be gone.
                    *first = inline;
                    Ok(())
                }
            })
        })?;
        let reply = Reply::receive(self.doorbell.as_fd(), HANDSHAKE_TIMEOUT);
        match (sent, reply) {
            // The server is fine; what failed was ours (typically the argument's encoding).
            (Err(error), Ok(_)) => Err(Failure::Refused(error)),
            (Ok(()), Ok(Reply::Forked(pid))) => Ok(ServerChild { pid, channel }),
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
    loop {
        let bell = match next_bell(doorbell.as_fd()) {
            Bell::Request(bell) => bell,
            Bell::Hangup => return 0, // the parent is gone (and its children with it)
        };
        let (route, surroundings) = match requests.recv() {
            Ok(Request::Fork {
                header,
                surroundings,
            }) => (header, surroundings),
            Ok(Request::Hello) => continue,
            Err(_) => return 0,
        };
        let Some(sidecar) = bell else {
            let _ =
                Reply::Failed("the request came without its sidecar".into()).send(doorbell.as_fd());
            continue;
        };
        // SAFETY: the fork server is single-threaded (it runs before main, and never starts
        // a thread), and `thread` describes its one thread.
        match unsafe { fork_sibling(&thread) } {
            Err(error) => {
                let _ = Reply::Failed(format!("fork failed: {error}")).send(doorbell.as_fd());
            }
            Ok(0) => {
                drop((requests, doorbell));
                // SAFETY: this child of the single-threaded server has one thread.
                let adopted = surroundings.map_or(Ok(()), |s| unsafe { s.adopt() });
                // Its parent is the server's (the requester). SIGPIPE is ignored already:
                // the disposition the server set is inherited.
                let code = if !crate::sys::die_with_parent(parent) {
                    EXIT_ORPHANED
                } else if let Err(message) = adopted {
                    child::fail(&message)
                } else {
                    match route {
                        HeaderRoute::Inline(header) => child::serve(None, header, sidecar),
                        HeaderRoute::Channel(channel) => match channel.recv() {
                            Ok(header) => child::serve(Some(channel), header, sidecar),
                            Err(e) => child::fail(&format!("no request from the parent: {e}")),
                        },
                    }
                };
                child::exit_forked(code);
            }
            Ok(pid) => {
                // The reply first: the requester waits for it, and the child for this CPU.
                let replied = Reply::Forked(pid as u32).send(doorbell.as_fd());
                // The child's copies (of an inline header's outcome channel too) are its own.
                drop((sidecar, route));
                if replied.is_err() {
                    return 0;
                }
            }
        }
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
/// parent (`CLONE_PARENT`), which gets its `SIGCHLD` and reaps it. Returns 0 in the child
/// and the child's pid in the server.
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
unsafe fn fork_sibling(thread: &MainThread) -> std::io::Result<libc::pid_t> {
    let flags = (libc::CLONE_PARENT | libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID) as u64;
    let args = CloneArgs {
        flags,
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
    // descriptor of this thread, in the child's copy only.
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
        pid = unsafe { legacy_clone(flags, thread.tid) };
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
    }
    Ok(pid as libc::pid_t)
}

/// `clone(flags, 0, NULL, ctid)` in this architecture's argument order.
///
/// # Safety
///
/// As `fork_sibling`.
#[cfg(target_arch = "x86_64")]
unsafe fn legacy_clone(flags: u64, ctid: *mut libc::pid_t) -> libc::c_long {
    // SAFETY: x86-64's order: flags, stack, parent tid, child tid, tls.
    unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, ctid, 0usize) }
}

/// `clone(flags, 0, NULL, ctid)` in this architecture's argument order.
///
/// # Safety
///
/// As `fork_sibling`.
#[cfg(target_arch = "aarch64")]
unsafe fn legacy_clone(flags: u64, ctid: *mut libc::pid_t) -> libc::c_long {
    // SAFETY: aarch64's order: flags, stack, parent tid, tls, child tid.
    unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, ctid) }
}

/// Without `clone3`, no sibling on this architecture (its `clone` order is not spelled out
/// here): the error stays `ENOSYS`.
///
/// # Safety
///
/// None needed; unsafe only to match the other architectures'.
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
unsafe fn legacy_clone(_flags: u64, _ctid: *mut libc::pid_t) -> libc::c_long {
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

    #[test]
    fn replies_cross_the_doorbell_whole() {
        let (server, client) = doorbell();
        let long = "x".repeat(3 * Reply::MAX);
        for reply in [
            Reply::Forked(0),
            Reply::Forked(u32::MAX),
            Reply::Failed("fork failed: EAGAIN".into()),
            Reply::Failed(long.clone()),
        ] {
            reply.send(server.as_fd()).unwrap();
            let received = Reply::receive(client.as_fd(), Duration::from_secs(5)).unwrap();
            match (&reply, received) {
                (Reply::Failed(sent), Reply::Failed(got)) if sent.len() > Reply::MAX => {
                    assert_eq!(got, sent[..Reply::MAX - 1]);
                }
                (_, received) => assert_eq!(received, reply),
            }
        }
    }

    #[test]
    fn a_malformed_late_or_missing_reply_is_an_error() {
        let (server, client) = doorbell();
        rustix::net::send(&server, &[0, 1, 2], SendFlags::empty()).unwrap();
        let malformed = Reply::receive(client.as_fd(), Duration::from_secs(5)).unwrap_err();
        assert!(malformed.to_string().contains("malformed"), "{malformed}");
        let late = Reply::receive(client.as_fd(), Duration::from_millis(1)).unwrap_err();
        assert_eq!(late.kind(), std::io::ErrorKind::TimedOut);
        drop(server);
        let gone = Reply::receive(client.as_fd(), Duration::from_secs(5)).unwrap_err();
        assert_eq!(gone.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
