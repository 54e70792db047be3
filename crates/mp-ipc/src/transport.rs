//! How a handle's file descriptors reach another process.
//!
//! ipc-channel is the typed control channel between processes (it carries the
//! process bootstrap, arguments, results and the handles in them), but it only
//! passes descriptors it created itself, and never shows them to the receiver.
//! The rings, doorbells and liveness pipes of this crate are descriptors we own
//! (`OwnedFd` from creation), so they travel beside ipc-channel, with
//! `SCM_RIGHTS`, as follows (the design is in `TRANSPORT.md`):
//!
//! * **Lending** (a handle's `Serialize`): the descriptors are duplicated into
//!   this process's *courier* table under a fresh id, and what is serialized is
//!   a [`Ticket`]: that id, the lender's pid, and the sending half of a fresh
//!   ipc-channel channel whose receiving half the courier watches. The ticket
//!   travels wherever ipc-channel carries the message, as an ipc-channel object.
//! * **Claiming** (the handle's `Deserialize`): the receiver binds a datagram
//!   Unix socket to a random abstract name (no file, no `/proc`), sends that
//!   name through the ticket's channel, and receives the descriptors on its
//!   socket with `SCM_RIGHTS`. A ticket decoded in the process that lent it is
//!   served from the table directly.
//! * **Expiry**: the courier thread waits on every ticket's channel at once
//!   (ipc-channel's `IpcReceiverSet`, an epoll). When every copy of a ticket
//!   is gone (claimed and dropped, or the message carrying it was dropped, or
//!   the process holding it died), the kernel closes the channel and the
//!   courier closes the lent duplicates. So a handle in flight keeps its
//!   object alive exactly as long as the message that carries it exists, and
//!   a liveness pipe never stays open because of a message nobody will read.
//!
//! A lent handle can be claimed while its lender lives (as Python's
//! `resource_sharer`). A multiproc child therefore does not exit while a
//! ticket it lent is unclaimed and still exists (its result carries one, or a
//! message it sent does): after sending its outcome it waits, sleeping on the
//! table's condition variable, until every entry was claimed or expired, at
//! most [`LENDER_LINGER`] (a hook registered with mp-core's
//! `before_child_exit` on first lend). The parent's `join` claims while it
//! receives the result, so a child returning a handle exits at once; a child
//! whose parent never reads its result exits after the bound, and one whose
//! parent died is killed by its parent-death signal. Any other process that
//! exits right after sending a handle makes that handle undecodable (a typed
//! error, never a hang).

use std::collections::HashMap;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Condvar, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use ipc_channel::ipc::{self, IpcReceiver, IpcReceiverSet, IpcSelectionResult, IpcSender};
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};

use crate::message_handles;

/// How long a claim waits for the lender's courier to answer once the claim
/// was handed to it (the lender is alive then: the ticket's channel was open).
const CLAIM_PATIENCE: Duration = Duration::from_secs(10);

/// How long a multiproc child, its function done, waits at most for its lent
/// tickets to be claimed or dropped before it exits anyway (the claim
/// patience: a claim already under way is served).
pub(crate) const LENDER_LINGER: Duration = CLAIM_PATIENCE;

/// Most descriptors one ticket carries (a connection end has the most).
pub(crate) const MAX_FDS: usize = 8;

/// What a handle serializes in place of its descriptors: a courier ticket
/// when it travels through ipc-channel (a process argument or result), a
/// slot in the message's parcel inside a connection message (see
/// [`message_handles`]).
#[derive(Serialize, Deserialize)]
pub(crate) enum Ticket {
    Courier(CourierTicket),
    InMessage(message_handles::Slot),
}

/// A ticket for descriptors held by the lender's courier.
#[derive(Serialize, Deserialize)]
pub(crate) struct CourierTicket {
    /// The lending process.
    owner: u32,
    /// The entry in the lender's courier table.
    id: u64,
    /// How many descriptors the entry holds.
    count: u32,
    /// Claims go here; the courier learns from its closing that the ticket is gone.
    #[serde(deserialize_with = "claims_outside_messages")]
    claims: IpcSender<Claim>,
}

/// An ipc-channel sender is decoded only from an ipc-channel message: in
/// the bytes of a connection message it would name no channel.
fn claims_outside_messages<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<IpcSender<Claim>, D::Error> {
    if message_handles::decoding_message() {
        return Err(serde::de::Error::custom(
            "a courier ticket inside a message (not sent by this library)",
        ));
    }
    IpcSender::deserialize(deserializer)
}

/// A claim: "send the descriptors of this ticket to the socket named `reply_to`".
#[derive(Serialize, Deserialize)]
struct Claim {
    reply_to: Vec<u8>,
    nonce: u64,
}

/// A new ticket for the courier thread to watch.
struct Register {
    id: u64,
    claims: IpcReceiver<Claim>,
}

/// Registrations the courier thread has not taken yet (one list per
/// process, leaked like the table). They reach it in memory; over
/// ipc-channel goes only a wake-up without descriptors, which a full
/// descriptor table cannot truncate (a receiver inside an ipc-channel
/// message received with no descriptor left would make ipc-channel panic).
type Pending = &'static Mutex<Vec<Register>>;

/// Lent descriptors by ticket id (one table per process, leaked: the
/// courier thread and the lenders share it for the life of the process).
type Table = &'static Mutex<HashMap<u64, Vec<OwnedFd>>>;

/// This process's courier: the lent descriptors and the way to its thread.
struct Courier {
    pid: u32,
    table: Table,
    /// To the registrar thread, which forwards over ipc-channel to the courier
    /// thread (see [`lend`] for why not from the lending thread).
    register: mpsc::Sender<Register>,
}

static COURIER: Mutex<Option<Courier>> = Mutex::new(None);
/// Notified (with the table's lock) whenever an entry leaves a table: what
/// [`wait_until_claimed`] sleeps on.
static TABLE_SHRANK: Condvar = Condvar::new();
/// Entries the courier thread took from the table and is still handing to a
/// claimant (changed only with the table's lock held, so a waiter on
/// [`TABLE_SHRANK`] misses no change).
static DELIVERING: AtomicUsize = AtomicUsize::new(0);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps stay consistent whatever panicked while holding them.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The courier of this process, started on first use (and again in a forked
/// child, whose copy of the parent's has no thread).
fn courier() -> io::Result<(Table, mpsc::Sender<Register>)> {
    let pid = std::process::id();
    let mut courier = lock(&COURIER);
    if let Some(c) = courier.as_ref().filter(|c| c.pid == pid) {
        return Ok((c.table, c.register.clone()));
    }
    // After a fork through `fork(3)`, the slot is empty (see
    // `hold_across_fork`); after another kind of fork it holds the parent's
    // courier, whose threads are not here: forgotten, not dropped (its
    // channel's state may be mid-update by a thread that no longer exists).
    std::mem::forget(courier.take());
    crate::after_fork::register();
    let (wake, wakes) = ipc::channel::<()>()?;
    let table: Table = Box::leak(Box::new(Mutex::new(HashMap::new())));
    let pending: Pending = Box::leak(Box::new(Mutex::new(Vec::new())));
    let mut set = IpcReceiverSet::new()?;
    let control = set.add(wakes)?;
    // Made now, while lending can still fail with a typed error: a delivery
    // must not need a new descriptor, or a lender whose table is full when a
    // claim arrives would leave its claimant waiting out its patience.
    let outbox = datagram_socket()?;
    std::thread::Builder::new()
        .name("mp-ipc courier".into())
        .spawn(move || serve(set, control, table, pending, outbox))?;
    let (register, to_forward) = mpsc::channel::<Register>();
    std::thread::Builder::new()
        .name("mp-ipc registrar".into())
        .spawn(move || {
            for registration in to_forward {
                lock(pending).push(registration);
                if let Err(error) = wake.send(()) {
                    tracing::error!(%error, "the descriptor courier is gone; lent handles cannot be claimed");
                    return;
                }
            }
        })?;
    *courier = Some(Courier {
        pid,
        table,
        register: register.clone(),
    });
    Ok((table, register))
}

/// Removes the entry `id` from `table` and wakes [`wait_until_claimed`].
fn take_entry(table: Table, id: u64) -> Option<Vec<OwnedFd>> {
    let taken = lock(table).remove(&id);
    TABLE_SHRANK.notify_all();
    taken
}

/// The before-exit hook of a multiproc child (see the module docs): sleeps
/// until this process's courier table is empty, at most [`LENDER_LINGER`].
fn wait_until_claimed() {
    let table = match lock(&COURIER).as_ref() {
        Some(c) if c.pid == std::process::id() => c.table,
        _ => return, // this process lent nothing (a fork copy is not ours)
    };
    let unclaimed = |entries: &mut HashMap<u64, Vec<OwnedFd>>| {
        !entries.is_empty() || DELIVERING.load(Relaxed) > 0
    };
    let mut entries = lock(table);
    if !unclaimed(&mut entries) {
        return;
    }
    tracing::debug!(
        unclaimed = entries.len(),
        "waiting for lent handles to be claimed before exit"
    );
    let (entries, waited) = TABLE_SHRANK
        .wait_timeout_while(entries, LENDER_LINGER, unclaimed)
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if waited.timed_out() {
        tracing::warn!(
            unclaimed = entries.len(),
            "exiting with lent handles nobody claimed"
        );
    }
}

/// The courier thread: registers tickets, answers claims (through `outbox`,
/// an unbound datagram socket), drops what expired.
fn serve(mut set: IpcReceiverSet, control: u64, table: Table, pending: Pending, outbox: OwnedFd) {
    // The receiver-set id of each watched ticket → its table id.
    let mut tickets: HashMap<u64, u64> = HashMap::new();
    loop {
        let events = match set.select() {
            Ok(events) => events,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => {
                tracing::error!(%error, "the descriptor courier stopped");
                return;
            }
        };
        for event in events {
            match event {
                IpcSelectionResult::MessageReceived(from, _wake) if from == control => {
                    let registrations = std::mem::take(&mut *lock(pending));
                    for Register { id, claims } in registrations {
                        match set.add(claims) {
                            Ok(watch) => {
                                tickets.insert(watch, id);
                            }
                            Err(error) => {
                                tracing::error!(%error, "cannot watch a ticket; its descriptors are dropped");
                                take_entry(table, id);
                            }
                        }
                    }
                }
                IpcSelectionResult::MessageReceived(from, message) => {
                    let Some(&id) = tickets.get(&from) else {
                        continue;
                    };
                    let taken = {
                        let mut entries = lock(table);
                        let taken = entries.remove(&id);
                        if taken.is_some() {
                            DELIVERING.fetch_add(1, Relaxed);
                        }
                        taken
                    };
                    let Some(fds) = taken else {
                        continue; // claimed already (in-process shortcut)
                    };
                    match message.to::<Claim>() {
                        Ok(claim) => {
                            if let Err(error) = deliver(outbox.as_fd(), &claim, id, &fds) {
                                tracing::warn!(%error, id, "could not hand descriptors to a claimant");
                            }
                        }
                        Err(error) => tracing::warn!(%error, "malformed claim"),
                    }
                    // Only now, the descriptors being in the claimant's socket,
                    // may a lender waiting to exit go.
                    drop(fds);
                    {
                        let _entries = lock(table);
                        DELIVERING.fetch_sub(1, Relaxed);
                    }
                    TABLE_SHRANK.notify_all();
                }
                IpcSelectionResult::ChannelClosed(from) if from == control => return,
                IpcSelectionResult::ChannelClosed(from) => {
                    if let Some(id) = tickets.remove(&from) {
                        // Every copy of the ticket is gone: nobody can claim it.
                        take_entry(table, id);
                    }
                }
            }
        }
    }
}

/// The courier's locks, held by the forking thread across a `fork` (see
/// [`after_fork`](crate::after_fork)), so that none is copied held by the
/// courier thread or a lender.
pub(crate) struct HeldAcrossFork {
    courier: MutexGuard<'static, Option<Courier>>,
    table: Option<MutexGuard<'static, HashMap<u64, Vec<OwnedFd>>>>,
}

/// Takes the locks, in the order every code path takes them.
pub(crate) fn hold_across_fork() -> HeldAcrossFork {
    let courier = lock(&COURIER);
    let table = courier.as_ref().map(|c| lock(c.table));
    HeldAcrossFork { courier, table }
}

impl HeldAcrossFork {
    /// In the child: closes the copies of the parent's lent descriptors (the
    /// parent's courier serves its tickets; copies here would only keep the
    /// parent's objects open) and forgets the parent's courier, whose threads
    /// are not here; the child starts its own on first use.
    pub(crate) fn release_in_child(mut self) {
        if let Some(mut table) = self.table.take() {
            table.clear();
        }
        std::mem::forget(self.courier.take());
    }
}

/// The payload of a delivery: the ticket id and the claim's nonce.
fn delivery_header(id: u64, nonce: u64) -> [u8; 16] {
    let mut header = [0u8; 16];
    header[..8].copy_from_slice(&id.to_le_bytes());
    header[8..].copy_from_slice(&nonce.to_le_bytes());
    header
}

/// A Unix datagram socket (close-on-exec).
fn datagram_socket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Sends `fds` from `outbox` to the claimant's socket.
fn deliver(outbox: BorrowedFd<'_>, claim: &Claim, id: u64, fds: &[OwnedFd]) -> io::Result<()> {
    let address = SocketAddrUnix::new_abstract_name(&claim.reply_to)?;
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(io::Error::other("too many descriptors for one delivery"));
    }
    let header = delivery_header(id, claim.nonce);
    retry_eintr(|| {
        rustix::net::sendmsg_addr(
            outbox,
            &address,
            &[io::IoSlice::new(&header)],
            &mut control,
            SendFlags::NOSIGNAL,
        )
    })?;
    Ok(())
}

/// Runs a system call until it is not interrupted (EINTR).
pub(crate) fn retry_eintr<T>(mut call: impl FnMut() -> rustix::io::Result<T>) -> io::Result<T> {
    loop {
        match call() {
            Err(rustix::io::Errno::INTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

/// Lends duplicates of `fds` to whoever decodes the returned ticket: inside
/// a connection message, in the message's parcel; elsewhere, through the
/// courier.
pub(crate) fn lend(fds: &[BorrowedFd<'_>]) -> io::Result<Ticket> {
    if fds.is_empty() || fds.len() > MAX_FDS {
        return Err(io::Error::other("a ticket carries 1 to 8 descriptors"));
    }
    if let Some(slot) = message_handles::collect(fds) {
        return slot.map(Ticket::InMessage);
    }
    lend_to_courier(fds).map(Ticket::Courier)
}

/// Lends duplicates of `fds` through this process's courier.
fn lend_to_courier(fds: &[BorrowedFd<'_>]) -> io::Result<CourierTicket> {
    if fds.is_empty() || fds.len() > MAX_FDS {
        return Err(io::Error::other("a ticket carries 1 to 8 descriptors"));
    }
    let copies = fds
        .iter()
        .map(|fd| rustix::io::fcntl_dupfd_cloexec(fd, 0).map_err(io::Error::from))
        .collect::<io::Result<Vec<OwnedFd>>>()?;
    let (table, register) = courier()?;
    if !mp_core::before_child_exit(wait_until_claimed) {
        tracing::warn!(
            "no room for mp-ipc's before-exit hook: a child may exit before its lent handles are claimed"
        );
    }
    let (claims, watched) = ipc::channel::<Claim>()?;
    let id = NEXT_ID.fetch_add(1, Relaxed);
    lock(table).insert(id, copies);
    // The registration is an ipc-channel message; it must not be sent from
    // this thread, which may be inside ipc-channel's serialization of the
    // message that carries the ticket (ipc-channel collects the channels of
    // a message in thread-locals that any `send` on the thread takes over).
    // The registrar thread sends it; claims wait in the ticket's channel
    // until the courier watches it.
    let registration = Register {
        id,
        claims: watched,
    };
    if register.send(registration).is_err() {
        take_entry(table, id);
        return Err(io::Error::other(
            "the descriptor courier's registrar is gone",
        ));
    }
    Ok(CourierTicket {
        owner: std::process::id(),
        id,
        count: fds.len() as u32,
        claims,
    })
}

/// Takes the descriptors a ticket stands for.
pub(crate) fn claim(ticket: Ticket) -> io::Result<Vec<OwnedFd>> {
    match ticket {
        Ticket::Courier(ticket) => claim_courier_ticket(ticket),
        Ticket::InMessage(slot) => message_handles::take(slot),
    }
}

/// Takes the descriptors of a courier ticket.
fn claim_courier_ticket(ticket: CourierTicket) -> io::Result<Vec<OwnedFd>> {
    let count = ticket.count as usize;
    if count == 0 || count > MAX_FDS {
        return Err(io::Error::other(format!(
            "a ticket for {count} descriptors (at most {MAX_FDS})"
        )));
    }
    if ticket.owner == std::process::id() {
        let local = lock(&COURIER)
            .as_ref()
            .filter(|c| c.pid == ticket.owner)
            .and_then(|c| take_entry(c.table, ticket.id));
        if let Some(fds) = local {
            return Ok(fds);
        }
    }
    claim_from_courier(ticket, count)
}

/// Claims through the lender's courier thread (what another process does).
fn claim_from_courier(ticket: CourierTicket, count: usize) -> io::Result<Vec<OwnedFd>> {
    let socket = datagram_socket()?;
    let random = random_bytes()?;
    let mut name = b"mp-ipc-claim-".to_vec();
    name.extend(
        random
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
            .bytes(),
    );
    rustix::net::bind(&socket, &SocketAddrUnix::new_abstract_name(&name)?)?;
    let nonce = u64::from_le_bytes(random[..8].try_into().expect("8 bytes"));
    ticket
        .claims
        .send(Claim {
            reply_to: name,
            nonce,
        })
        .map_err(|error| {
            io::Error::new(
                io::ErrorKind::NotConnected,
                format!("the process that sent this handle is gone ({error})"),
            )
        })?;
    let deadline = Instant::now() + CLAIM_PATIENCE;
    let expected = delivery_header(ticket.id, nonce);
    loop {
        if !wait_readable(socket.as_fd(), deadline)? {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the process that sent this handle did not hand over its descriptors",
            ));
        }
        let mut header = [0u8; 16];
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = retry_eintr(|| {
            rustix::net::recvmsg(
                &socket,
                &mut [io::IoSliceMut::new(&mut header)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
            )
        });
        let received = match received {
            Ok(received) => received,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            Err(error) => return Err(error),
        };
        let mut fds = Vec::new();
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = message {
                fds.extend(rights);
            }
        }
        if received.bytes != header.len() || header != expected {
            continue; // not our courier's answer (the descriptors are closed)
        }
        if received.flags.contains(ReturnFlags::CTRUNC) || fds.len() != count {
            return Err(io::Error::other(format!(
                "expected {count} descriptors, received {} (descriptor table full?)",
                fds.len()
            )));
        }
        return Ok(fds);
    }
}

/// Waits until `fd` is readable or `deadline`; `false` on timeout. Retries
/// on EINTR with the time that is left.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, deadline: Instant) -> io::Result<bool> {
    use rustix::event::{PollFd, PollFlags, Timespec};
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = Timespec {
            tv_sec: left.as_secs().try_into().unwrap_or(i64::MAX),
            tv_nsec: left.subsec_nanos().into(),
        };
        let mut poll = [PollFd::new(&fd, PollFlags::IN)];
        match rustix::event::poll(&mut poll, Some(&timeout)) {
            Ok(0) if left.is_zero() => return Ok(false),
            Ok(0) => continue,
            Ok(_) => return Ok(true),
            Err(rustix::io::Errno::INTR) => continue,
            Err(errno) => return Err(errno.into()),
        }
    }
}

/// 16 random bytes from the kernel.
pub(crate) fn random_bytes() -> io::Result<[u8; 16]> {
    let mut bytes = [0u8; 16];
    let mut filled = 0;
    while filled < bytes.len() {
        match rustix::rand::getrandom(&mut bytes[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
    Ok(bytes)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn pipe() -> (std::fs::File, std::fs::File) {
        let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        (r.into(), w.into())
    }

    #[test]
    fn a_ticket_through_ipc_channel_delivers_the_same_open_files() {
        let (mut reader, writer) = pipe();
        let ticket = lend(&[writer.as_fd()]).unwrap();
        drop(writer);
        let (tx, rx) = ipc::channel::<Ticket>().unwrap();
        tx.send(ticket).unwrap();
        let ticket = rx.recv().unwrap();
        let mut fds = claim(ticket).unwrap();
        let mut writer = std::fs::File::from(fds.pop().unwrap());
        writer.write_all(b"same pipe").unwrap();
        drop(writer);
        let mut text = String::new();
        reader.read_to_string(&mut text).unwrap();
        assert_eq!(
            text, "same pipe",
            "and EOF: no copy of the write end is left"
        );
    }

    #[test]
    fn a_claim_through_the_courier_thread_delivers_every_descriptor() {
        let (mut first_reader, first) = pipe();
        let (mut second_reader, second) = pipe();
        let ticket = lend_to_courier(&[first.as_fd(), second.as_fd()]).unwrap();
        drop((first, second));
        let fds = claim_from_courier(ticket, 2).unwrap();
        for (fd, word) in fds.into_iter().zip(["one", "two"]) {
            std::fs::File::from(fd).write_all(word.as_bytes()).unwrap();
        }
        let mut text = String::new();
        first_reader.read_to_string(&mut text).unwrap();
        second_reader.read_to_string(&mut text).unwrap();
        assert_eq!(text, "onetwo");
    }

    #[test]
    fn a_dropped_ticket_closes_the_lent_copies() {
        let (reader, writer) = pipe();
        let ticket = lend(&[writer.as_fd()]).unwrap();
        drop(writer);
        drop(ticket);
        // The courier closes its copy when the ticket's channel closes: the
        // read end then sees the end of the pipe.
        assert!(wait_readable(reader.as_fd(), Instant::now() + Duration::from_secs(10)).unwrap());
        let mut buf = [0u8; 1];
        assert_eq!((&reader).read(&mut buf).unwrap(), 0);
    }
}
