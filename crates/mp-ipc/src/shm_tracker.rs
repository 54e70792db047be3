//! The shared memory tracker: unlinks the named segments a process created
//! when that process dies, however it dies (SIGKILL included).
//!
//! # Design
//!
//! A process that dies cannot clean up after itself, so another process must.
//! At its first [`SharedMemory::create`](crate::SharedMemory::create), a
//! process (the *creator*) starts a *tracker*: a fresh copy of the program
//! (mp-core's [`executable`](mp_core::executable), the same file the `spawn`
//! start method runs), which a constructor in this module turns into the
//! tracker before `main`, exactly as mp-core turns a copy into a child. It is
//! a clean process: it holds no mapping and no descriptor of the creator's
//! except the three it is given:
//!
//! * a **pidfd of the creator**, opened by the creator itself (so it cannot
//!   name a recycled pid). It becomes readable when the creator has exited:
//!   that is the death notice, from the kernel, for every way of dying.
//! * a **stream socket** on which the creator reports each segment it
//!   creates (`+`, with the segment's device and inode) and each it unlinks
//!   or asks to [`persist`](crate::SharedMemory::persist) (`-`), as
//!   length-prefixed records. A record is queued in the tracker's socket
//!   once `send` returns, so a creator killed right after reporting loses
//!   nothing (one killed in the middle of a record leaves a truncated last
//!   record, which the tracker ignores).
//! * a **doorbell** (an eventfd), rung by the creator every 64 reports, and
//!   when the socket's buffer is full (a few hundred records; the creator
//!   then waits for room): the tracker then reads what is queued. So a
//!   report costs one `send` and wakes nobody; the tracker reads reports in
//!   batches, while the creator goes on (ringing only when the buffer was
//!   full made a creator that kept creating and unlinking wait for the
//!   tracker every ~140 rounds). (A `SOCK_SEQPACKET` pair would keep record
//!   boundaries, but queues only `net.unix.max_dgram_qlen`, 10, records.)
//!
//! The tracker sleeps in `poll` on the pidfd and the doorbell (no timer, no
//! polling). When the pidfd fires it reads what is still queued, unlinks every
//! segment still reported whose name still refers to the *same* inode (a name
//! unlinked meanwhile and created again by someone else is left alone), and
//! exits. So the tracker outlives its creator by one `poll` wake-up.
//!
//! **Attachers are not creators.** [`open`](crate::SharedMemory::open) reports
//! nothing: a process that merely attached a segment never causes its unlink
//! when it dies (CPython's `resource_tracker` registers attachers too, and so
//! unlinks segments that other processes still use).
//!
//! **Costs.** Reading and writing a segment costs nothing extra. `create`
//! and `unlink` of a named segment send one record (no wake-up, except the
//! doorbell once per 64 records); the first `create` of a process
//! also starts the tracker (a fork + exec, about what starting a `spawn`
//! child costs). The creator keeps two descriptors (socket, doorbell). The tracker is in its own session,
//! so a terminal's Ctrl-C, which kills the creator's process group, does not
//! kill the tracker first.
//!
//! **Windows left open, on purpose.** A creator killed between `shm_open` and
//! the `send` of its report (`ftruncate`, `mmap`, `fstat`: microseconds)
//! leaves the segment behind; reporting *before* creating would instead risk unlinking a segment
//! of the same name that someone else created first. An unlink reports `-`
//! before unlinking, for the same reason. If the tracker itself is killed,
//! the creator learns it at its next report (`EPIPE`) and starts a new
//! tracker, which it tells every segment it still owns; a creator that dies
//! after its tracker and before another report leaves its segments behind
//! (nothing tells a process that a child in another session died, short of
//! watching it, which would cost a thread). A forked child is a new creator: it starts its own
//! tracker at its own first `create`. Like mp-core's `spawn`, this needs the
//! program to be a Rust executable linking this crate (not, say, a Python
//! extension module).
//!
//! The tracker ignores SIGINT, SIGTERM and SIGHUP (as CPython's does): a
//! signal meant for the whole program reaches it, but it must outlive the
//! creator to clean up after it, and it exits by itself right after.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

/// The environment variable that makes a copy of the program a tracker.
const MARKER: &str = "MP_IPC_SHM_TRACKER";
/// Where the tracker finds its end of the socket.
const SOCKET_FD: RawFd = 3;
/// Where the tracker finds the creator's pidfd.
const CREATOR_FD: RawFd = 4;
/// Where the tracker finds the doorbell.
const DOORBELL_FD: RawFd = 5;
/// Signals meant for the whole program (a terminal's Ctrl-C, a service
/// manager's stop): the creator's death ends the tracker, not these.
const IGNORED_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// A report: its length (u16, little-endian, of what follows), operation,
/// device, inode, name (at most 250 bytes).
const REPORT_MAX: usize = 2 + 1 + 8 + 8 + 256;
const ADD: u8 = b'+';
/// Reports between two rings of the doorbell (see `Tracker::report`).
const RING_EVERY: u32 = 64;
const REMOVE: u8 = b'-';

/// Which file a name referred to when it was created.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Identity {
    device: u64,
    inode: u64,
}

/// This process's tracker, as seen from the creator.
struct Tracker {
    /// The process that started it (a forked child must start its own).
    creator: u32,
    socket: OwnedFd,
    /// Rung when `socket`'s queue is full, so that the tracker reads it.
    doorbell: OwnedFd,
    process: std::process::Child,
    /// What the tracker was told is owned (to tell a new one, should it die).
    owned: HashMap<String, Identity>,
    /// Reports sent since the doorbell was last rung.
    unrung: u32,
}

static TRACKER: Mutex<Option<Tracker>> = Mutex::new(None);

fn lock() -> MutexGuard<'static, Option<Tracker>> {
    TRACKER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reports that this process created the segment `name`, open as `fd`: it
/// is unlinked when this process dies, unless [`untrack`]ed first.
pub(crate) fn track(name: &str, fd: &OwnedFd) -> io::Result<()> {
    let stat = rustix::fs::fstat(fd)?;
    let identity = Identity {
        device: stat.st_dev,
        inode: stat.st_ino,
    };
    let mut tracker = lock();
    let pid = std::process::id();
    if tracker.as_ref().is_some_and(|t| t.creator != pid) {
        // Inherited through fork: the parent's tracker is the parent's (and
        // not this process's child). Only our copy of its socket is closed;
        // nothing is sent on it.
        drop(tracker.take());
    }
    if let Some(current) = tracker.as_mut() {
        current.owned.insert(name.to_owned(), identity);
        if current.report(ADD, name, identity).is_ok() {
            return Ok(());
        }
        tracing::warn!("the shared memory tracker died; starting another");
    }
    let mut owned = tracker.take().map(reap).unwrap_or_default();
    owned.insert(name.to_owned(), identity);
    let started = start(owned)?;
    *tracker = Some(started);
    Ok(())
}

/// Reports that the segment `name` is no longer this process's to clean up
/// (unlinked, or asked to persist). Nothing happens if it was not tracked.
pub(crate) fn untrack(name: &str) {
    let mut tracker = lock();
    let Some(current) = tracker.as_mut().filter(|t| t.creator == std::process::id()) else {
        return;
    };
    let Some(identity) = current.owned.remove(name) else {
        return;
    };
    if current.report(REMOVE, name, identity).is_err() {
        tracing::warn!("the shared memory tracker died; starting another");
        let owned = tracker.take().map(reap).unwrap_or_default();
        match start(owned) {
            Ok(started) => *tracker = Some(started),
            Err(error) => tracing::error!(
                %error,
                "cannot restart the shared memory tracker; named segments of this process are no longer unlinked at its death"
            ),
        }
    }
}

/// Collects a dead tracker; returns what it had been told.
fn reap(mut tracker: Tracker) -> HashMap<String, Identity> {
    // Its end of the socket is closed: it is gone, or about to be.
    let _ = tracker.process.wait();
    tracker.owned
}

impl Tracker {
    /// Queues a report; rings the doorbell (and then waits for room) only if
    /// the queue is full. An error means the tracker is gone.
    fn report(&mut self, operation: u8, name: &str, identity: Identity) -> io::Result<()> {
        let mut record = Vec::with_capacity(REPORT_MAX);
        let length = (1 + 8 + 8 + name.len()) as u16; // names are at most 250 bytes
        record.extend_from_slice(&length.to_le_bytes());
        record.push(operation);
        record.extend_from_slice(&identity.device.to_le_bytes());
        record.extend_from_slice(&identity.inode.to_le_bytes());
        record.extend_from_slice(name.as_bytes());
        let mut flags = SendFlags::NOSIGNAL | SendFlags::DONTWAIT;
        let mut sent = 0;
        while sent < record.len() {
            match rustix::net::send(&self.socket, &record[sent..], flags) {
                Ok(count) => sent += count,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) if flags.contains(SendFlags::DONTWAIT) => {
                    rustix::io::write(&self.doorbell, &1u64.to_ne_bytes())?;
                    // The tracker drains the queue; wait for room (or for its
                    // death, which fails the send).
                    flags = SendFlags::NOSIGNAL;
                }
                Err(errno) => return Err(errno.into()),
            }
        }
        // Ring well before the queue is full (a few hundred records), so that
        // the tracker drains it while the creator goes on, instead of the
        // creator waiting for it with a full queue: one eventfd write per
        // `RING_EVERY` reports. Best effort: the report is queued already,
        // and a ring that failed only leaves the read to the full-queue ring.
        self.unrung += 1;
        if self.unrung >= RING_EVERY {
            self.unrung = 0;
            let _ = rustix::io::write(&self.doorbell, &1u64.to_ne_bytes());
        }
        Ok(())
    }
}

/// Starts a tracker for this process and tells it about `owned`.
fn start(owned: HashMap<String, Identity>) -> io::Result<Tracker> {
    let (ours, theirs) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let creator = rustix::process::pidfd_open(
        rustix::process::getpid(),
        rustix::process::PidfdFlags::empty(),
    )?;
    let doorbell = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC)?;
    let mut command = Command::new(std::ffi::OsStr::from_bytes(
        mp_core::executable()?.to_bytes(),
    ));
    command
        .env(MARKER, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let (socket_raw, creator_raw, doorbell_raw) = (
        theirs.as_raw_fd(),
        creator.as_raw_fd(),
        doorbell.as_raw_fd(),
    );
    // SAFETY: the closure runs in the forked child before exec and calls only
    // async-signal-safe functions (fcntl, dup2, setsid, signal to SIG_IGN,
    // which installs no handler) on descriptors that
    // are open in it (inherited from this process, which keeps them open
    // until `spawn` returns).
    unsafe {
        command.pre_exec(move || {
            // Move all out of the way first, so that no dup2 below
            // overwrites another; dup2 clears close-on-exec on the copy.
            let socket = libc::fcntl(socket_raw, libc::F_DUPFD_CLOEXEC, 10);
            let creator = libc::fcntl(creator_raw, libc::F_DUPFD_CLOEXEC, 10);
            let doorbell = libc::fcntl(doorbell_raw, libc::F_DUPFD_CLOEXEC, 10);
            if socket < 0
                || creator < 0
                || doorbell < 0
                || libc::dup2(socket, SOCKET_FD) < 0
                || libc::dup2(creator, CREATOR_FD) < 0
                || libc::dup2(doorbell, DOORBELL_FD) < 0
                || libc::setsid() < 0
            {
                return Err(io::Error::last_os_error());
            }
            // Ignored from before the exec (dispositions to ignore survive
            // it), so no window remains where these would kill the tracker.
            for signal in IGNORED_SIGNALS {
                libc::signal(signal, libc::SIG_IGN);
            }
            Ok(())
        });
    }
    let process = command.spawn()?;
    drop((theirs, creator));
    let mut tracker = Tracker {
        creator: std::process::id(),
        socket: ours,
        doorbell,
        process,
        owned: HashMap::new(),
        unrung: 0,
    };
    for (name, identity) in &owned {
        if let Err(error) = tracker.report(ADD, name, *identity) {
            // Leave no half-told tracker (nor its zombie) behind.
            let _ = tracker.process.kill();
            let _ = tracker.process.wait();
            return Err(error);
        }
    }
    tracker.owned = owned;
    tracing::debug!(
        tracker = tracker.process.id(),
        "shared memory tracker started"
    );
    Ok(tracker)
}

/// Turns a copy of the program started by [`start`] into the tracker, before
/// `main` (and before libtest's).
#[ctor::ctor(unsafe)]
fn serve_as_tracker_before_main() {
    if std::env::var_os(MARKER).is_none() {
        return;
    }
    // Nothing but the descriptors it was given is the tracker's business.
    // SAFETY: close_range only closes descriptors; this runs before main, in
    // a single thread, before anything in this process owns one above 5.
    unsafe { libc::syscall(libc::SYS_close_range, DOORBELL_FD + 1, u32::MAX, 0) };
    // SAFETY: `start` placed the three descriptors at these numbers with
    // dup2; nothing else in this fresh process owns them.
    let (socket, creator, doorbell) = unsafe {
        (
            OwnedFd::from_raw_fd(SOCKET_FD),
            OwnedFd::from_raw_fd(CREATOR_FD),
            OwnedFd::from_raw_fd(DOORBELL_FD),
        )
    };
    std::process::exit(watch(&socket, &creator, &doorbell));
}

/// The tracker: records reports until the creator exits, then unlinks what
/// it still owns. Returns the exit code.
fn watch(socket: &OwnedFd, creator: &OwnedFd, doorbell: &OwnedFd) -> i32 {
    let mut owned: HashMap<Vec<u8>, Identity> = HashMap::new();
    // Bytes of a record not yet whole.
    let mut partial = Vec::new();
    loop {
        let mut fds = [
            PollFd::new(creator, PollFlags::IN),
            PollFd::new(doorbell, PollFlags::IN),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => {}
            Err(Errno::INTR) => continue,
            Err(_) => return 1, // the creator's next report fails; it starts another
        }
        let creator_gone = !fds[0].revents().is_empty();
        if !fds[1].revents().is_empty() {
            // Reset the doorbell before reading, so that a ring after the
            // read is not lost.
            let mut count = [0u8; 8];
            let _ = rustix::io::read(doorbell, &mut count);
        }
        // On either event: what is queued (a closed socket, from an exec of
        // the creator, just reads as nothing more).
        read_reports(socket, &mut partial, &mut owned);
        if creator_gone {
            for (name, identity) in &owned {
                unlink_if_same(name, *identity);
            }
            return 0;
        }
    }
}

/// Applies every whole report queued; keeps an incomplete one in `partial`.
fn read_reports(socket: &OwnedFd, partial: &mut Vec<u8>, owned: &mut HashMap<Vec<u8>, Identity>) {
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let length = match rustix::net::recv(socket, &mut chunk, RecvFlags::DONTWAIT) {
            Ok((0, _)) => return,
            Ok((length, _)) => length,
            Err(Errno::INTR) => continue,
            Err(_) => return,
        };
        partial.extend_from_slice(&chunk[..length]);
        let mut at = 0;
        while let Some(header) = partial.get(at..at + 2) {
            let length = usize::from(u16::from_le_bytes([header[0], header[1]]));
            let Some(record) = partial.get(at + 2..at + 2 + length) else {
                break; // the rest is still on its way
            };
            apply(record, owned);
            at += 2 + length;
        }
        partial.drain(..at);
    }
}

/// Applies one report (operation, device, inode, name).
fn apply(record: &[u8], owned: &mut HashMap<Vec<u8>, Identity>) {
    if record.len() <= 17 {
        return; // malformed: nothing to apply
    }
    let word = |at: usize| u64::from_le_bytes(record[at..at + 8].try_into().expect("8 bytes"));
    let identity = Identity {
        device: word(1),
        inode: word(9),
    };
    let name = record[17..].to_vec();
    match record[0] {
        ADD => {
            owned.insert(name, identity);
        }
        REMOVE => {
            owned.remove(&name);
        }
        _ => {}
    }
}

/// Unlinks `/dev/shm/<name>` if it is still the file that was created.
fn unlink_if_same(name: &[u8], identity: Identity) {
    let Ok(name) = std::str::from_utf8(name) else {
        return;
    };
    if name.contains('/') {
        return;
    }
    let Ok(stat) = rustix::fs::lstat(format!("/dev/shm/{name}").as_str()) else {
        return; // unlinked already
    };
    if stat.st_dev == identity.device && stat.st_ino == identity.inode {
        let _ = rustix::shm::unlink(format!("/{name}").as_str());
    }
}
