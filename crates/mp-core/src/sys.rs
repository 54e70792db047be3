//! Thin, safe wrappers over the process syscalls mp-core needs (pidfds, waitid, poll, signal
//! masks, stdio, datagrams that carry a descriptor).
//!
//! Every blocking call here retries on EINTR with the time that remains. ipc-channel's own
//! transfers do not: an EINTR in the middle of a fragmented message loses the message (or
//! trips an assertion in it), so mp-core runs each transfer inside [`without_signals`] /
//! [`without_handled_signals`] and does its waiting beforehand, in `poll`, where a signal is
//! harmless.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use rustix::process::{Pid, PidfdFlags, Signal, WaitId, WaitIdOptions};

/// Sends `bytes` as one datagram on `socket`, with `fd` attached if given (`SCM_RIGHTS`). A
/// datagram is sent whole or not at all, so an interrupted send is simply retried.
pub(crate) fn send_datagram(
    socket: BorrowedFd<'_>,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
    flags: SendFlags,
) -> io::Result<()> {
    // On the stack: the fork server sends right after a fork, when each page it writes is a
    // copy-on-write fault.
    let fds: [BorrowedFd<'_>; 1];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if let Some(fd) = fd {
        fds = [fd];
        control.push(SendAncillaryMessage::ScmRights(&fds));
    }
    rustix::io::retry_on_intr(|| {
        rustix::net::sendmsg(socket, &[IoSlice::new(bytes)], &mut control, flags)
    })?;
    Ok(())
}

/// Receives one datagram from `socket` into `buf` (cut to its length), with the descriptor it
/// carries, if any (close-on-exec). Returns the bytes received: 0 when the peer has closed.
/// Retried on EINTR.
pub(crate) fn recv_datagram(
    socket: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: RecvFlags,
) -> io::Result<(usize, Option<OwnedFd>)> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::io::retry_on_intr(|| {
        rustix::net::recvmsg(
            socket,
            &mut [IoSliceMut::new(buf)],
            &mut control,
            flags | RecvFlags::CMSG_CLOEXEC,
        )
    })?;
    let fd = control.drain().find_map(|message| match message {
        RecvAncillaryMessage::ScmRights(mut fds) => fds.next(),
        _ => None,
    });
    Ok((received.bytes, fd))
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// It was killed by this signal.
    Signal(i32),
    /// It ended, but its status went to someone else: the kernel, when this program ignores
    /// `SIGCHLD` (or set `SA_NOCLDWAIT`), or a `waitpid(-1)` elsewhere in it.
    Unknown,
}

impl ExitStatus {
    /// Python's `exitcode`: the exit code, or minus the signal number; `None` when the
    /// status is [`Unknown`](ExitStatus::Unknown) (Python's `exitcode` stays `None` then).
    pub fn exitcode(self) -> Option<i32> {
        match self {
            ExitStatus::Code(code) => Some(code),
            ExitStatus::Signal(signal) => Some(-signal),
            ExitStatus::Unknown => None,
        }
    }
}

pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = Pid::from_raw(pid as i32).ok_or_else(|| io::Error::other("pid 0"))?;
    Ok(rustix::process::pidfd_open(pid, PidfdFlags::empty())?)
}

/// Reaps the child behind `pidfd` if it has exited (never blocks).
pub(crate) fn try_reap(pidfd: BorrowedFd<'_>) -> io::Result<Option<ExitStatus>> {
    let status = rustix::process::waitid(
        WaitId::PidFd(pidfd),
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG,
    )?;
    Ok(status.and_then(|s| {
        if let Some(signal) = s.terminating_signal() {
            Some(ExitStatus::Signal(signal))
        } else {
            s.exit_status().map(ExitStatus::Code)
        }
    }))
}

/// Waits until `fd` is readable (for a pidfd: the process has exited), at most `timeout`
/// (`None`: forever). Returns whether it became readable.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    Ok(wait_any(&[fd], timeout)?.is_some())
}

/// Waits until one of `fds` is readable or hung up, at most `timeout` (`None`: forever), in
/// one `poll`; a signal only restarts it with the time that remains. Returns the index of the
/// first ready descriptor.
pub(crate) fn wait_any(
    fds: &[BorrowedFd<'_>],
    timeout: Option<Duration>,
) -> io::Result<Option<usize>> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let mut polled: Vec<PollFd<'_>> = fds
            .iter()
            .map(|fd| PollFd::new(fd, PollFlags::IN))
            .collect();
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let timespec = remaining.map(|r| Timespec {
            tv_sec: r.as_secs() as i64,
            tv_nsec: r.subsec_nanos() as i64,
        });
        match rustix::event::poll(&mut polled, timespec.as_ref()) {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(polled.iter().position(|p| !p.revents().is_empty())),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The signals that can be held back without changing what a fault does: all but the ones
/// the kernel raises synchronously for a faulting instruction (blocking those kills).
fn blockable_signals() -> libc::sigset_t {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigfillset initialises the local set; sigdelset edits it in place.
    unsafe {
        libc::sigfillset(set.as_mut_ptr());
        for synchronous in [
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGFPE,
            libc::SIGILL,
            libc::SIGTRAP,
            libc::SIGSYS,
        ] {
            libc::sigdelset(set.as_mut_ptr(), synchronous);
        }
        set.assume_init()
    }
}

/// The signals that currently have a handler in this process (those that can interrupt a
/// system call; a default or ignored disposition never makes one fail with EINTR).
fn handled_signals() -> libc::sigset_t {
    let mut set = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the local set; sigaction with a null new action only
    // writes the current one into the live local `action`; sigaddset edits the local set.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for signal in 1..=libc::SIGRTMAX() {
            let mut action = std::mem::zeroed::<libc::sigaction>();
            if libc::sigaction(signal, std::ptr::null(), &mut action) == 0
                && action.sa_sigaction != libc::SIG_DFL
                && action.sa_sigaction != libc::SIG_IGN
            {
                libc::sigaddset(set.as_mut_ptr(), signal);
            }
        }
        set.assume_init()
    }
}

/// Restores the calling thread's signal mask when dropped (also on unwinding).
struct MaskGuard(libc::sigset_t);

impl MaskGuard {
    fn block(set: &libc::sigset_t) -> MaskGuard {
        let mut old = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: pthread_sigmask reads the initialised `set` and writes the previous mask
        // into the local `old`; with valid arguments it cannot fail.
        unsafe {
            libc::pthread_sigmask(libc::SIG_BLOCK, set, old.as_mut_ptr());
            MaskGuard(old.assume_init())
        }
    }
}

impl Drop for MaskGuard {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved in `block`, an initialised set.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// Runs `f` (one ipc-channel transfer whose peer is already sending or reading) with every
/// blockable signal held back on this thread, so that no EINTR can cut the transfer in two.
/// A signal that arrives meanwhile is delivered as soon as `f` returns (or to another thread).
pub(crate) fn without_signals<T>(f: impl FnOnce() -> T) -> T {
    let _guard = MaskGuard::block(&blockable_signals());
    f()
}

/// Runs `f` with the signals that have a handler held back: for a transfer that may wait on
/// its peer for long, during which SIGTERM and other signals left at their default must
/// still end the process.
pub(crate) fn without_handled_signals<T>(f: impl FnOnce() -> T) -> T {
    let _guard = MaskGuard::block(&handled_signals());
    f()
}

/// Makes sure descriptors 0, 1 and 2 are open (on /dev/null when they were closed), so that no
/// descriptor this library opens can land on stdio, and no child inherits one there.
pub(crate) fn ensure_stdio_open() {
    for fd in 0..=2 {
        // SAFETY: F_GETFD on a descriptor number only reads the descriptor table.
        let open = unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
        if open {
            continue;
        }
        // open returns the lowest free descriptor: this one. If another thread took it
        // meanwhile, the copy is closed again and that thread's descriptor stays there.
        match rustix::fs::open(
            "/dev/null",
            rustix::fs::OFlags::RDWR,
            rustix::fs::Mode::empty(),
        ) {
            Ok(null) if std::os::fd::AsRawFd::as_raw_fd(&null) == fd => {
                // Stdio now: it stays open for the life of the process.
                let _ = std::os::fd::IntoRawFd::into_raw_fd(null);
            }
            Ok(_) | Err(_) => {}
        }
    }
}

pub(crate) fn send_signal(pidfd: BorrowedFd<'_>, signal: i32) -> io::Result<()> {
    let signal = Signal::from_named_raw(signal)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "unknown signal"))?;
    match rustix::process::pidfd_send_signal(pidfd, signal) {
        // Already exited (and maybe reaped): nothing to signal, as in Python.
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Ends the child behind `pidfd` (SIGKILL) and reaps it, waiting at most 5 s for it to go
/// (a process in uninterruptible sleep can outlast that; it is then left unreaped). Returns
/// how it ended, if it was reaped here.
pub(crate) fn kill_and_reap(pidfd: BorrowedFd<'_>) -> Option<ExitStatus> {
    let _ = send_signal(pidfd, libc::SIGKILL);
    let _ = wait_readable(pidfd, Some(Duration::from_secs(5)));
    try_reap(pidfd).ok().flatten()
}

/// The conventional name of a signal (`"SIGKILL"`), or `"SIG?"`.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGSYS => "SIGSYS",
        _ => "SIG?",
    }
}

/// Whether the calling thread is the process's main thread (the thread whose exit, unlike any
/// other's, does not fire the children's parent-death signal).
pub(crate) fn on_main_thread() -> bool {
    rustix::thread::gettid() == rustix::process::getpid()
}

/// Arms `PR_SET_PDEATHSIG` (SIGKILL) in a fresh child and closes the race with a parent that
/// died before it was armed. Returns false if the expected parent is already gone.
pub(crate) fn die_with_parent(expected_parent: u32) -> bool {
    if rustix::process::set_parent_process_death_signal(Some(Signal::KILL)).is_err() {
        return false;
    }
    rustix::process::getppid().map(|p| p.as_raw_nonzero().get() as u32) == Some(expected_parent)
}

/// Sets the calling thread's signal mask to empty: a spawned child's first step (see `spawn`).
pub(crate) fn unblock_all_signals() {
    let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the local set; pthread_sigmask reads it and, with a
    // null old-set pointer, writes nothing.
    unsafe {
        libc::sigemptyset(empty.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_SETMASK, empty.as_ptr(), std::ptr::null_mut());
    }
}

/// `statfs`'s magic number of tmpfs.
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// Where a spawned child opens its rendezvous socket: `/dev/shm` when it is a writable tmpfs.
///
/// ipc-channel puts a one-shot server's socket in a fresh directory under the temporary
/// directory. On a disk file system (an ext4 `/tmp`) creating, binding and removing it costs
/// about a fifth of a spawn's CPU (journalled inode allocation, and a synchronous discard when
/// the directory is removed); on tmpfs it is a few microseconds. Nothing but the socket's path
/// changes: the directory is private (random name) and removed as soon as the parent connects.
fn memory_temp_dir() -> Option<&'static std::ffi::OsStr> {
    const SHM: &str = "/dev/shm";
    let statfs = rustix::fs::statfs(SHM).ok()?;
    let writable = rustix::fs::access(SHM, rustix::fs::Access::WRITE_OK).is_ok();
    (statfs.f_type as i64 == TMPFS_MAGIC && writable).then_some(std::ffi::OsStr::new(SHM))
}

/// Runs `f` with `TMPDIR` pointing at a memory file system ([`memory_temp_dir`]) when there is
/// one, and restores the environment afterwards: the program's own `TMPDIR` is what its code
/// sees.
///
/// # Safety
///
/// Only while the process has a single thread (the bootstrap constructor, before main): it
/// changes the environment, which another thread could be reading.
pub(crate) unsafe fn with_memory_temp_dir<T>(f: impl FnOnce() -> T) -> T {
    let Some(dir) = memory_temp_dir() else {
        return f();
    };
    let saved = std::env::var_os("TMPDIR");
    // SAFETY: the caller guarantees that no other thread exists to read the environment.
    unsafe { std::env::set_var("TMPDIR", dir) };
    let result = f();
    // SAFETY: as above.
    unsafe {
        match saved {
            Some(saved) => std::env::set_var("TMPDIR", saved),
            None => std::env::remove_var("TMPDIR"),
        }
    }
    result
}
