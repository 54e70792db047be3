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
//! except the four it is given:
//!
//! * a **pidfd of the creator**, opened by the creator itself (so it cannot
//!   name a recycled pid). It becomes readable when the creator has exited:
//!   that is the death notice, from the kernel, for every way of dying.
//! * the **table**: a memfd of [`SLOTS`] fixed-size slots (after the
//!   tracker's lock, below), which both map; only the creator writes the
//!   slots, only the tracker locks the lock. A slot holds a state word,
//!   the device and inode of a segment and its name. Reporting a segment
//!   created is writing a free slot (the creator's process-local mutex
//!   serialises its threads) and then publishing it with a release store of
//!   `LIVE` to its state word; reporting it unlinked or
//!   [`persist`](crate::SharedMemory::persist)ed is a store of `FREE`. No
//!   system call, no wake-up: the tracker reads the table only once the
//!   creator is dead (so never while it is written). A creator killed in the
//!   middle of writing a slot leaves it `FREE` (not yet published: that one
//!   segment is left behind, as below) or whole; never a `LIVE` slot with
//!   half a name. The memfd is sparse: only the pages of slots used are
//!   allocated (a process that never has more than 14 segments at a time
//!   touches one page).
//! * a **stream socket**, the fallback when the table is full (more than
//!   [`SLOTS`] segments created and not yet unlinked at once): each further
//!   segment created (`+`, with its device and inode) and unlinked or
//!   persisted (`-`) is then sent as a length-prefixed record. A record is
//!   queued in the tracker's socket once `send` returns, so a creator killed
//!   right after reporting loses nothing (one killed in the middle of a record
//!   leaves a truncated last record, which the tracker ignores). So beyond
//!   [`SLOTS`] segments everything still works, each `create` and `unlink`
//!   of the overflow only costs a `send` more (as every one did before the
//!   table existed).
//! * a **doorbell** (an eventfd) for the socket, rung by the creator every 64
//!   records, and when the socket's buffer is full (a few hundred records;
//!   the creator then waits for room): the tracker then reads what is queued.
//!   (A `SOCK_SEQPACKET` pair would keep record boundaries, but queues only
//!   `net.unix.max_dgram_qlen`, 10, records.)
//!
//! The tracker sleeps in `poll` on the pidfd and the doorbell (no timer, no
//! polling). When the pidfd fires it reads what is still queued on the
//! socket and the table, unlinks every segment still reported whose name
//! still refers to the *same* inode (a name unlinked meanwhile and created
//! again by someone else is left alone), and exits. So the tracker outlives
//! its creator by one `poll` wake-up.
//!
//! **Attachers are not creators.** [`open`](crate::SharedMemory::open) reports
//! nothing: a process that merely attached a segment never causes its unlink
//! when it dies (CPython's `resource_tracker` registers attachers too, and so
//! unlinks segments that other processes still use).
//!
//! **Costs.** Reading and writing a segment costs nothing extra. `create` of
//! a named segment costs an `fstat` (its identity), a load (is the tracker
//! still alive? see below) and a slot write; `unlink` and `persist` a store
//! to the slot. The first `create` of a process also
//! creates the table and starts the tracker (a fork + exec, about what
//! starting a `spawn` child costs). The creator keeps three descriptors
//! (table, socket, doorbell). The tracker is in its own session, so a
//! terminal's Ctrl-C, which kills the creator's process group, does not kill
//! the tracker first.
//!
//! **A killed tracker is replaced.** Each tracker, once started, takes a
//! robust mutex at the head of the table (see `robust.rs`) and holds it
//! until it exits; when it dies, however it dies, the kernel marks the mutex
//! `OWNER_DIED` and clears its owner. So each `create` learns whether the
//! tracker still runs from one load of the mutex word: owned by the
//! tracker's pid (single-threaded, so its only thread's id) means alive.
//! Otherwise (the tracker has not taken it yet, just after its start, or
//! could not) the creator asks the kernel whether the tracker, its child, has
//! exited (`waitpid` with `WNOHANG`, which neither blocks nor reaps a live
//! one); a socket report that fails with `EPIPE` also tells that it died. If
//! it has, the creator starts a new one and
//! gives it the *same* table, so it learns every segment of the table at
//! once; the segments reported on the socket are sent to it again. A creator
//! that dies after its tracker and before its next `create` leaves its
//! segments behind (nothing tells a process that a child in another session
//! died, short of watching it, which would cost a thread).
//!
//! **Windows left open, on purpose.** A creator killed between `shm_open` and
//! the publication of its report (`ftruncate`, `mmap`, `fstat`:
//! microseconds) leaves the segment behind; reporting *before* creating
//! would instead risk unlinking a segment of the same name that someone else
//! created first. An unlink is reported before unlinking, for the same
//! reason.
//!
//! **Fork.** A forked child is a new creator: it starts its own tracker (and
//! table) at its own first `create`. It inherits its parent's mapping of the
//! table but must never write it: mp-ipc's `pthread_atfork` handlers (see
//! `after_fork.rs`, registered when the table is made) take this module's
//! lock before the fork (so that the child never inherits it held by a
//! thread that is not there) and, in the child, call [`forget_in_child`],
//! which marks the inherited state as the parent's (no `getpid` per call), and
//! the next `create`, `unlink` or `persist` of the child drops it (closing
//! its copies of the descriptors, unmapping its copy of the table) without
//! writing anything. (A raw `clone` that skips `pthread_atfork` handlers is
//! not supported.) Like mp-core's `spawn`, the tracker needs the program to
//! be a Rust executable linking this crate (not, say, a Python extension
//! module).
//!
//! The tracker ignores SIGINT, SIGTERM and SIGHUP (as CPython's does): a
//! signal meant for the whole program reaches it, but it must outlive the
//! creator to clean up after it, and it exits by itself right after.

use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketFlags, SocketType};

use crate::robust::RobustMutex;

/// The environment variable that makes a copy of the program a tracker.
const MARKER: &str = "MP_IPC_SHM_TRACKER";
/// Where the tracker finds its end of the socket.
const SOCKET_FD: RawFd = 3;
/// Where the tracker finds the creator's pidfd.
const CREATOR_FD: RawFd = 4;
/// Where the tracker finds the doorbell.
const DOORBELL_FD: RawFd = 5;
/// Where the tracker finds the table.
const TABLE_FD: RawFd = 6;
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

/// Slots in the table: segments a process may have created and not unlinked
/// at once before reports go through the socket (280 KiB of address space,
/// allocated a page at a time as slots are used).
pub(crate) const SLOTS: usize = 1024;
/// A slot's state: nothing to unlink (never used, being written, or unlinked).
const FREE: u32 = 0;
/// A slot's state: its fields are whole; unlink its segment at the death.
const LIVE: u32 = 1;
/// Longest name a slot holds (`SharedMemory` names are at most 250 bytes).
const NAME_MAX: usize = 256;

/// One segment in the table. Only the creator writes it, only while its state
/// is `FREE`; the tracker reads it only after the creator's death.
#[repr(C)]
struct Slot {
    /// `FREE` or `LIVE`; `LIVE` is published last, with release ordering.
    state: AtomicU32,
    /// Bytes of `name` used.
    length: u32,
    device: u64,
    inode: u64,
    name: [u8; NAME_MAX],
}

/// Where the slots start in the table: after the tracker's lock (a
/// `pthread_mutex_t`, 40 bytes), rounded up to a cache line.
const SLOTS_AT: usize = 64;
const _: () = assert!(size_of::<RobustMutex>() <= SLOTS_AT);
/// The table's size in bytes.
const TABLE_BYTES: usize = SLOTS_AT + SLOTS * size_of::<Slot>();

/// Which file a name referred to when it was created.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Identity {
    device: u64,
    inode: u64,
}

/// Set in a forked child (by `after_fork`): the state in `STATE` is the
/// parent's, to be dropped without writing anything.
static INHERITED: AtomicBool = AtomicBool::new(false);

/// Marks this process's tracker state as inherited from the parent. Called in
/// a forked child, by mp-ipc's `pthread_atfork` child handler: an atomic
/// store only (async-signal-safe).
pub(crate) fn forget_in_child() {
    INHERITED.store(true, Ordering::Relaxed);
}

thread_local! {
    /// Whether this thread holds `STATE` while it forks to start a tracker:
    /// the fork handler must not take it again.
    static SPAWNING: Cell<bool> = const { Cell::new(false) };
}

/// `STATE`'s lock, taken by mp-ipc's `pthread_atfork` prepare handler (before
/// the other locks of the crate: `start` forks while holding it), so that a
/// child never inherits it held by a thread that is not there.
pub(crate) struct HeldAcrossFork {
    _guard: Option<MutexGuard<'static, Option<State>>>,
}

/// Takes `STATE`'s lock for a fork, unless this thread holds it already (it
/// is then starting a tracker, whose child execs at once).
pub(crate) fn hold_across_fork() -> HeldAcrossFork {
    if SPAWNING.with(Cell::get) {
        return HeldAcrossFork { _guard: None };
    }
    HeldAcrossFork {
        _guard: Some(
            STATE
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        ),
    }
}

/// The creator's mapping of its table.
struct Table {
    /// Given to each tracker this process starts.
    fd: OwnedFd,
    /// The start of the mapping: the tracker's lock.
    base: NonNull<u8>,
}

// SAFETY: `Table` owns its mapping (like a `Box<[Slot]>` that lives in
// shared memory); it is only used under `STATE`'s mutex.
unsafe impl Send for Table {}

impl Table {
    /// A fresh table: a sparse memfd, all slots `FREE` (zeroed).
    fn create() -> io::Result<Self> {
        let fd = rustix::fs::memfd_create("mp-ipc-shm-tracker", rustix::fs::MemfdFlags::CLOEXEC)?;
        rustix::fs::ftruncate(&fd, TABLE_BYTES as u64)?;
        // SAFETY: a fresh shared mapping of the whole memfd at an address the
        // kernel chooses; it aliases no Rust object.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                TABLE_BYTES,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &fd,
                0,
            )?
        };
        let base = NonNull::new(ptr.cast::<u8>()).ok_or(io::ErrorKind::Other)?;
        let table = Self { fd, base };
        // SAFETY: the start of the fresh, page-aligned mapping, which nobody
        // else uses yet (no tracker was given the memfd).
        unsafe { RobustMutex::init_at(table.base.as_ptr().cast(), false)? };
        Ok(table)
    }

    /// The lock each tracker of this table holds while it runs.
    fn tracker_lock(&self) -> &RobustMutex {
        // SAFETY: initialised by `init_at` in `create`; lives as long as the
        // mapping, which `self` owns.
        unsafe { &*self.base.as_ptr().cast::<RobustMutex>() }
    }

    /// The slot `index` (`< SLOTS`).
    fn slot(&self, index: usize) -> *mut Slot {
        assert!(index < SLOTS);
        // SAFETY: `SLOTS_AT + index * size_of::<Slot>()` is inside the
        // mapping of `TABLE_BYTES` bytes, 8-aligned (page + 64 + k * 280).
        unsafe { self.base.as_ptr().add(SLOTS_AT).cast::<Slot>().add(index) }
    }

    /// Writes `name` and `identity` into the `FREE` slot `index`, then
    /// publishes it.
    fn publish(&self, index: usize, name: &str, identity: Identity) {
        assert!(name.len() <= NAME_MAX);
        let slot = self.slot(index);
        // SAFETY: `slot` is in the mapping, which lives as long as `self`;
        // the slot is `FREE`, so the tracker does not read it, and this
        // process writes it only under `STATE`'s mutex (a forked child never
        // does: see `INHERITED`). Only raw pointers to its plain fields are
        // made; its state word is only reached through `&AtomicU32`.
        unsafe {
            (&raw mut (*slot).length).write(name.len() as u32);
            (&raw mut (*slot).device).write(identity.device);
            (&raw mut (*slot).inode).write(identity.inode);
            std::ptr::copy_nonoverlapping(
                name.as_ptr(),
                (&raw mut (*slot).name).cast::<u8>(),
                name.len(),
            );
            (*slot).state.store(LIVE, Ordering::Release);
        }
    }

    /// Marks the slot `index` `FREE`: its segment is no longer to be unlinked.
    fn free(&self, index: usize) {
        let slot = self.slot(index);
        // SAFETY: `slot` is in the mapping, which lives as long as `self`;
        // the state word is an atomic.
        unsafe { (*slot).state.store(FREE, Ordering::Release) };
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `create`, unmapped once, here; no
        // reference into it outlives the borrow of `self` it was made from.
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), TABLE_BYTES) };
    }
}

/// A segment this process created and has not unlinked.
#[derive(Clone, Copy)]
struct Entry {
    identity: Identity,
    /// Its slot in the table; `None` if it was reported on the socket (the
    /// table was full).
    slot: Option<usize>,
}

/// This process's tracker, as seen from the creator.
struct Tracker {
    socket: OwnedFd,
    /// Rung when `socket`'s queue is full, so that the tracker reads it.
    doorbell: OwnedFd,
    process: std::process::Child,
    /// Reports sent since the doorbell was last rung.
    unrung: u32,
}

/// Everything the creator keeps about its named segments.
struct State {
    table: Table,
    /// Slots freed, to be used first (the last freed first: its page is warm).
    free: Vec<usize>,
    /// Slots from here on were never used.
    unused: usize,
    /// What this process owns (to free its slot, or tell a new tracker the
    /// socket's part, should the tracker die).
    owned: HashMap<String, Entry>,
    /// `None` only if the last start failed.
    tracker: Option<Tracker>,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

/// This process's state, the parent's dropped if this is a forked child.
fn lock() -> MutexGuard<'static, Option<State>> {
    let mut state = STATE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if INHERITED.swap(false, Ordering::Relaxed) {
        // Inherited through fork: the parent's table, socket and tracker.
        // Only our copies of its descriptors and mapping go; nothing is
        // written or sent.
        drop(state.take());
    }
    state
}

/// Reports that this process created the segment `name`, open as `fd`: it
/// is unlinked when this process dies, unless [`untrack`]ed first.
pub(crate) fn track(name: &str, fd: &OwnedFd) -> io::Result<()> {
    let stat = rustix::fs::fstat(fd)?;
    let identity = Identity {
        device: stat.st_dev,
        inode: stat.st_ino,
    };
    let mut guard = lock();
    let state = match guard.as_mut() {
        Some(state) => state,
        None => {
            crate::after_fork::register();
            guard.insert(State {
                table: Table::create()?,
                free: Vec::new(),
                unused: 0,
                owned: HashMap::new(),
                tracker: None,
            })
        }
    };
    state.ensure_tracker()?;
    if let Some(previous) = state.owned.remove(name) {
        // Unlinked behind our back and created again: the old report goes.
        state.release(name, previous);
    }
    let slot = state.free.pop().or_else(|| {
        (state.unused < SLOTS).then(|| {
            state.unused += 1;
            state.unused - 1
        })
    });
    let entry = Entry { identity, slot };
    state.owned.insert(name.to_owned(), entry);
    match slot {
        Some(index) => state.table.publish(index, name, identity),
        None => {
            if let Err(error) = state.report_on_socket(ADD, name, identity) {
                // Not tracked: `create` unlinks it and fails.
                state.owned.remove(name);
                return Err(error);
            }
        }
    }
    Ok(())
}

/// Reports that the segment `name` is no longer this process's to clean up
/// (unlinked, or asked to persist). Nothing happens if it was not tracked.
pub(crate) fn untrack(name: &str) {
    let mut guard = lock();
    let Some(state) = guard.as_mut() else {
        return;
    };
    if let Some(entry) = state.owned.remove(name) {
        state.release(name, entry);
    }
}

impl State {
    /// Starts a tracker if there is none or it has exited.
    fn ensure_tracker(&mut self) -> io::Result<()> {
        if let Some(current) = self.tracker.as_mut() {
            // The tracker holds the table's robust lock while it runs; the
            // kernel clears the owner when it dies. So this one load says
            // "alive" without a system call; until the tracker has taken the
            // lock (just after its start), or should it fail to, ask the
            // kernel.
            if self.table.tracker_lock().owner_tid() == Some(current.process.id()) {
                return Ok(());
            }
            match current.process.try_wait() {
                Ok(None) => return Ok(()),
                // Exited (and now reaped), or reaped by someone else.
                Ok(Some(_)) | Err(_) => {
                    tracing::warn!("the shared memory tracker died; starting another");
                    self.tracker = None;
                }
            }
        }
        self.tracker = Some(start(&self.table, &self.owned)?);
        Ok(())
    }

    /// Reports `name`, which was `entry`, no longer owned.
    fn release(&mut self, name: &str, entry: Entry) {
        match entry.slot {
            Some(index) => {
                self.table.free(index);
                self.free.push(index);
            }
            None => {
                if let Err(error) = self.report_on_socket(REMOVE, name, entry.identity) {
                    tracing::error!(
                        %error,
                        "cannot restart the shared memory tracker; named segments of this process are no longer unlinked at its death"
                    );
                }
            }
        }
    }

    /// Sends a report on the socket (the table is full); starts another
    /// tracker if the socket says that this one died. An error means that
    /// no tracker could be started.
    fn report_on_socket(
        &mut self,
        operation: u8,
        name: &str,
        identity: Identity,
    ) -> io::Result<()> {
        if let Some(current) = self.tracker.as_mut() {
            if current.report(operation, name, identity).is_ok() {
                return Ok(());
            }
            tracing::warn!("the shared memory tracker died; starting another");
            let mut dead = self.tracker.take().expect("checked above");
            // Its end of the socket is closed: it is gone, or about to be.
            // Killed all the same, so that the wait is bounded whatever made
            // the send fail (the new one is told everything).
            let _ = dead.process.kill();
            let _ = dead.process.wait();
        }
        // `owned` is up to date: the new tracker is told this report too.
        self.tracker = Some(start(&self.table, &self.owned)?);
        Ok(())
    }
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

/// Starts a tracker for this process on `table`, and tells it, on the
/// socket, the segments of `owned` that have no slot.
fn start(table: &Table, owned: &HashMap<String, Entry>) -> io::Result<Tracker> {
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
    let (socket_raw, creator_raw, doorbell_raw, table_raw) = (
        theirs.as_raw_fd(),
        creator.as_raw_fd(),
        doorbell.as_raw_fd(),
        table.fd.as_raw_fd(),
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
            let table = libc::fcntl(table_raw, libc::F_DUPFD_CLOEXEC, 10);
            if socket < 0
                || creator < 0
                || doorbell < 0
                || table < 0
                || libc::dup2(socket, SOCKET_FD) < 0
                || libc::dup2(creator, CREATOR_FD) < 0
                || libc::dup2(doorbell, DOORBELL_FD) < 0
                || libc::dup2(table, TABLE_FD) < 0
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
    // The fork runs mp-ipc's atfork handlers in this thread, which holds
    // `STATE` already (see `hold_across_fork`).
    SPAWNING.with(|spawning| spawning.set(true));
    let spawned = command.spawn();
    SPAWNING.with(|spawning| spawning.set(false));
    let process = spawned?;
    drop((theirs, creator));
    let mut tracker = Tracker {
        socket: ours,
        doorbell,
        process,
        unrung: 0,
    };
    for (name, entry) in owned {
        if entry.slot.is_some() {
            continue; // the table tells it
        }
        if let Err(error) = tracker.report(ADD, name, entry.identity) {
            // Leave no half-told tracker (nor its zombie) behind.
            let _ = tracker.process.kill();
            let _ = tracker.process.wait();
            return Err(error);
        }
    }
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
    // a single thread, before anything in this process owns one above 6.
    unsafe { libc::syscall(libc::SYS_close_range, TABLE_FD + 1, u32::MAX, 0) };
    // SAFETY: `start` placed the four descriptors at these numbers with
    // dup2; nothing else in this fresh process owns them.
    let (socket, creator, doorbell, table) = unsafe {
        (
            OwnedFd::from_raw_fd(SOCKET_FD),
            OwnedFd::from_raw_fd(CREATOR_FD),
            OwnedFd::from_raw_fd(DOORBELL_FD),
            OwnedFd::from_raw_fd(TABLE_FD),
        )
    };
    let table = TrackerTable::map(&table);
    std::process::exit(watch(&socket, &creator, &doorbell, table.as_ref()));
}

/// The tracker's mapping of the table.
struct TrackerTable {
    base: NonNull<u8>,
}

impl TrackerTable {
    /// Maps the table and takes its lock, held until the tracker exits (the
    /// creator's sign that this tracker runs). `None` if `fd` is not a table.
    fn map(fd: &OwnedFd) -> Option<Self> {
        // SAFETY: a fresh shared mapping at an address the kernel chooses; it
        // aliases no Rust object.
        let mapped = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                TABLE_BYTES,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                fd,
                0,
            )
        };
        let table = Self {
            base: NonNull::new(mapped.ok()?.cast::<u8>())?,
        };
        // SAFETY: the creator initialised the lock before it gave the memfd
        // to any tracker; the mapping lives (never unmapped) until exit.
        let lock = unsafe { &*table.base.as_ptr().cast::<RobustMutex>() };
        // Taken (whether its previous holder, a killed tracker, died with it
        // or not) or not: without it, the creator asks the kernel instead.
        if lock.is_intact(false) {
            let _ = lock.try_lock();
        }
        Some(table)
    }

    /// The `LIVE` slots (read once the creator is dead).
    fn live(&self) -> Vec<(Vec<u8>, Identity)> {
        // SAFETY: the mapping holds SLOTS slots from SLOTS_AT, 8-aligned (any
        // bytes are a valid `Slot`); nobody writes them any more: the creator
        // is dead and its forked children never write them (see
        // `INHERITED`).
        let slots = unsafe {
            std::slice::from_raw_parts(self.base.as_ptr().add(SLOTS_AT).cast::<Slot>(), SLOTS)
        };
        live_slots(slots)
    }
}

/// The tracker: records reports until the creator exits, then unlinks what
/// it still owns. Returns the exit code.
fn watch(
    socket: &OwnedFd,
    creator: &OwnedFd,
    doorbell: &OwnedFd,
    table: Option<&TrackerTable>,
) -> i32 {
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
            Err(_) => return 1, // the creator's next `create` sees it; it starts another
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
            for (name, identity) in table.map(TrackerTable::live).unwrap_or_default() {
                unlink_if_same(&name, identity);
            }
            return 0;
        }
    }
}

/// The names and identities of the `LIVE` slots among `slots`.
fn live_slots(slots: &[Slot]) -> Vec<(Vec<u8>, Identity)> {
    slots
        .iter()
        .filter(|slot| slot.state.load(Ordering::Acquire) == LIVE)
        .filter_map(|slot| {
            let name = slot.name.get(..slot.length as usize)?;
            Some((
                name.to_vec(),
                Identity {
                    device: slot.device,
                    inode: slot.inode,
                },
            ))
        })
        .collect()
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
    if name.is_empty() || name.contains('/') {
        return;
    }
    let Ok(stat) = rustix::fs::lstat(format!("/dev/shm/{name}").as_str()) else {
        return; // unlinked already
    };
    if stat.st_dev == identity.device && stat.st_ino == identity.inode {
        let _ = rustix::shm::unlink(format!("/{name}").as_str());
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn empty_slots(count: usize) -> Vec<Slot> {
        (0..count)
            .map(|_| Slot {
                state: AtomicU32::new(FREE),
                length: 0,
                device: 0,
                inode: 0,
                name: [0; NAME_MAX],
            })
            .collect()
    }

    /// A creator killed after writing a slot's fields but before publishing
    /// it leaves nothing the tracker acts on; published, it is read whole.
    #[test]
    fn a_slot_written_but_not_published_is_not_live() {
        let mut slots = empty_slots(3);
        let identity = Identity {
            device: 7,
            inode: 42,
        };
        // Written by hand as `publish` does, up to (not including) the store
        // of LIVE: what a creator killed in between leaves.
        let half = &mut slots[1];
        half.length = 4;
        half.device = identity.device;
        half.inode = identity.inode;
        half.name[..4].copy_from_slice(b"half");
        assert!(live_slots(&slots).is_empty());
        slots[1].state.store(LIVE, Ordering::Release);
        assert_eq!(live_slots(&slots), vec![(b"half".to_vec(), identity)]);
        // Freed (unlinked or persisted): no longer live, fields left as they were.
        slots[1].state.store(FREE, Ordering::Release);
        assert!(live_slots(&slots).is_empty());
    }

    /// A slot whose length is out of range (a corrupt table) is skipped, not
    /// read past.
    #[test]
    fn a_slot_with_a_bad_length_is_skipped() {
        let slots = empty_slots(1);
        let mut slots = slots;
        slots[0].length = NAME_MAX as u32 + 1;
        slots[0].state.store(LIVE, Ordering::Release);
        assert!(live_slots(&slots).is_empty());
    }

    /// `Table::publish` writes exactly what `live_slots` reads back, through
    /// the memfd the tracker maps.
    #[test]
    fn a_published_slot_reads_back_through_the_memfd() {
        let table = Table::create().unwrap();
        let identity = Identity {
            device: 1,
            inode: 2,
        };
        table.publish(SLOTS - 1, "last-slot", identity);
        table.publish(0, "first", identity);
        table.free(0);
        let tracker = TrackerTable::map(&table.fd).expect("a table");
        assert_eq!(tracker.live(), vec![(b"last-slot".to_vec(), identity)]);
        // The "tracker" (this thread) holds the lock the creator looks at.
        assert_eq!(
            table.tracker_lock().owner_tid(),
            Some(rustix::thread::gettid().as_raw_nonzero().get() as u32)
        );
        table.tracker_lock().unlock().unwrap();
    }
}
