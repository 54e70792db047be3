//! Handles inside messages: how the descriptors of a handle sent inside a
//! [`Connection`](crate::connection::Connection) message or a
//! [`Queue`](crate::queue::Queue) item travel with it.
//!
//! A message is postcard bytes in a shared-memory ring; bytes cannot carry a
//! descriptor. So the descriptors travel in the kernel, beside the ring, on a
//! `SOCK_SEQPACKET` socket pair (the *parcel socket*):
//!
//! * for a connection, the *writers' presence socket* of the direction: its
//!   sending end every writer handle holds (it is the writers' presence: its
//!   hang-up tells readers that every writer is gone, see
//!   [`liveness`](crate::liveness)), its receiving end every reader handle
//!   holds (its watch);
//! * for a queue, a socket pair of its ring whose two ends every handle holds
//!   ([`Ring::with_parcels`](crate::ring::Ring::with_parcels)).
//!
//! * **Encode** ([`encoding`], on the producer's thread, under the ring's
//!   producer lock): while a message is encoded, a handle's `Serialize`
//!   (through [`transport::lend`](crate::transport::lend)) duplicates its
//!   descriptors into this thread's *parcel* and writes a [`Slot`] in their
//!   place: the parcel's [`Key`] and the handle's range in it. When the
//!   encoding that will be published succeeds, the parcel is sent on the
//!   parcel socket (`SCM_RIGHTS`, payload = key and count) *before* the
//!   frame is published. A message without handles collects nothing: no
//!   system call, no allocation (two thread-local stores).
//! * **Decode** ([`receiving`], on the consumer's thread, under the ring's
//!   consumer lock): a slot's `Deserialize` takes its range from the parcel
//!   whose key it names, received from the socket on first use.
//! * **Order**: parcels are sent and frames published under the producer
//!   lock, parcels received and frames consumed under the consumer lock, so
//!   parcels queue in frame order. A parcel whose frame was never published
//!   (the push failed after encoding, e.g. the ring closed) is an *orphan*;
//!   one whose frame was consumed by a receiver that died before taking it is
//!   *lost*. The key is the sending time (`CLOCK_MONOTONIC`, the same clock
//!   for every process of a time namespace) and a nonce: a receiver looking
//!   for key `k` peeks at the head parcel: older than `k` is an orphan
//!   (received and closed), `k` is its own, newer means its own was lost (a
//!   typed error; the newer parcel stays for its frame).
//! * **Nothing leaks**: descriptors in a socket's queue are owned by the
//!   kernel. A message never read is dropped with the ring; its parcel is
//!   closed with the last receiving end of the socket, whether the readers
//!   were dropped, exited or SIGKILLed (the kernel's garbage collector also
//!   frees cycles, e.g. a reader end sent over its own connection).
//!
//! Every handle of this crate (connections, queues, `SharedMemory` and what
//! lives in it: locks, events, values...) lends its descriptors through
//! [`transport::lend`](crate::transport::lend), so it travels this way.
//! Outside a connection's send or a queue's put (e.g. `queue::encode_item`)
//! a handle is refused ([`RingError::HandleInItem`](crate::ring::RingError))
//! before anything is duplicated.

use std::cell::{Cell, RefCell};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

use crate::ring::RingError;
use crate::transport::retry_eintr;

/// Most descriptors one message carries (the kernel's `SCM_MAX_FD`).
pub(crate) const MAX_FDS_PER_MESSAGE: usize = 253;

/// Identifies the parcel of one message: when it was made (nanoseconds of
/// `CLOCK_MONOTONIC`) and a nonce. Fixed-size on the wire, so that the size
/// pass and the encoding pass of a message agree.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub(crate) struct Key([u8; 16]);

impl Key {
    fn new() -> Key {
        static NONCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let nanos = (now.tv_sec as u64)
            .wrapping_mul(1_000_000_000)
            .wrapping_add(now.tv_nsec as u64);
        let nonce = NONCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ^ (u64::from(std::process::id()) << 40);
        let mut key = [0u8; 16];
        key[..8].copy_from_slice(&nanos.to_le_bytes());
        key[8..].copy_from_slice(&nonce.to_le_bytes());
        Key(key)
    }

    fn sent_nanos(&self) -> u64 {
        u64::from_le_bytes(self.0[..8].try_into().expect("8 bytes"))
    }
}

/// What a handle's ticket holds inside a message: its descriptors' range in
/// the message's parcel.
#[derive(Serialize, Deserialize)]
pub(crate) struct Slot {
    key: Key,
    first: u32,
    count: u32,
}

/// The payload of a parcel on the socket.
const PARCEL_HEADER: usize = 20;

fn parcel_header(key: Key, count: usize) -> [u8; PARCEL_HEADER] {
    let mut header = [0u8; PARCEL_HEADER];
    header[..16].copy_from_slice(&key.0);
    header[16..].copy_from_slice(&(count as u32).to_le_bytes());
    header
}

/// What this thread is encoding (a `Cell`: the fast path only swaps it).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Idle,
    /// A size pass: slots are counted, nothing is duplicated or sent.
    Measure,
    /// An encoding whose bytes are published if it succeeds.
    Publish,
}

/// What the handles of the current encoding collected: touched only when
/// a handle is met (`COLLECTING` says whether it belongs to this encoding).
#[derive(Default)]
struct Collected {
    key: Option<Key>,
    /// The descriptors collected (empty during a size pass).
    fds: Vec<OwnedFd>,
    /// How many descriptors were collected (also in a size pass).
    count: usize,
    /// Why a handle could not be encoded.
    failure: Option<Failure>,
}

enum Failure {
    /// Outside a ring's put (e.g. `queue::encode_item`).
    Refused,
    Io(io::Error),
}

thread_local! {
    /// The parcel socket of the ring this thread puts into (-1: none).
    static CARRIER: Cell<RawFd> = const { Cell::new(-1) };
    static MODE: Cell<Mode> = const { Cell::new(Mode::Idle) };
    /// Whether `COLLECTED` holds what the current encoding collected.
    static COLLECTING: Cell<bool> = const { Cell::new(false) };
    static COLLECTED: RefCell<Collected> = RefCell::new(Collected::default());
    /// The receiving end of the parcel socket of the ring this thread takes
    /// from (-1: none).
    static INBOX: Cell<RawFd> = const { Cell::new(-1) };
    /// Whether `PARCEL` holds the current decoding's parcel.
    static HOLDING: Cell<bool> = const { Cell::new(false) };
    static PARCEL: RefCell<Option<(Key, Vec<Option<OwnedFd>>)>> = const { RefCell::new(None) };
}

/// A new parcel socket: `(send, receive)`, a `SOCK_SEQPACKET` pair
/// (close-on-exec).
pub(crate) fn parcel_socket() -> io::Result<(OwnedFd, OwnedFd)> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Runs `send` with `socket` (the sending end of a parcel socket) as where the
/// descriptors of handles in the message go.
pub(crate) fn carrying<R>(socket: BorrowedFd<'_>, send: impl FnOnce() -> R) -> R {
    struct Restore(RawFd);
    impl Drop for Restore {
        fn drop(&mut self) {
            CARRIER.with(|carrier| carrier.set(self.0));
        }
    }
    let _restore = Restore(CARRIER.with(|carrier| carrier.replace(socket.as_raw_fd())));
    send()
}

/// Runs `encode` (of a queue item or a message) with the thread marked as
/// doing so. `publishes`: the bytes will be published if this succeeds (a
/// size pass does not publish). On success with handles, their parcel is
/// sent. Without handles: four thread-local `Cell` swaps, nothing else.
pub(crate) fn encoding<R>(
    publishes: bool,
    encode: impl FnOnce() -> postcard::Result<R>,
) -> Result<R, RingError> {
    /// Restores the enclosing encoding's state (also on a panic).
    struct Restore {
        mode: Mode,
        collecting: bool,
        /// The enclosing encoding's collection, set aside (nested encodings
        /// only: an item's `Serialize` putting into another queue).
        outer: Option<Collected>,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            MODE.with(|mode| mode.set(self.mode));
            if COLLECTING.with(|collecting| collecting.replace(self.collecting)) {
                drop(COLLECTED.with(RefCell::take));
            }
            if let Some(outer) = self.outer.take() {
                COLLECTED.with(|collected| *collected.borrow_mut() = outer);
            }
        }
    }
    let mode = if publishes {
        Mode::Publish
    } else {
        Mode::Measure
    };
    let outer_collecting = COLLECTING.with(|collecting| collecting.replace(false));
    let restore = Restore {
        mode: MODE.with(|cell| cell.replace(mode)),
        collecting: outer_collecting,
        outer: outer_collecting.then(|| COLLECTED.with(RefCell::take)),
    };
    let result = encode();
    let collected = COLLECTING
        .with(|collecting| collecting.replace(false))
        .then(|| COLLECTED.with(RefCell::take));
    drop(restore);
    let Some(collected) = collected else {
        return result.map_err(RingError::Encode);
    };
    let passing = |source| RingError::Io {
        op: "passing the descriptors of a handle in a message",
        source,
    };
    match (result, collected.failure) {
        (_, Some(Failure::Refused)) => Err(RingError::HandleInItem),
        (_, Some(Failure::Io(source))) => Err(passing(source)),
        (Err(error), None) => Err(RingError::Encode(error)),
        (Ok(value), None) => {
            if let Some(key) = collected
                .key
                .filter(|_| publishes && !collected.fds.is_empty())
            {
                send_parcel(key, &collected.fds).map_err(passing)?;
            }
            Ok(value)
        }
    }
}

/// The collection of the current encoding (started at its first handle).
fn with_collected<R>(f: impl FnOnce(&mut Collected) -> R) -> R {
    if !COLLECTING.with(|collecting| collecting.replace(true)) {
        // Whatever a panicked encoding left is not ours.
        drop(COLLECTED.with(RefCell::take));
    }
    COLLECTED.with(|collected| f(&mut collected.borrow_mut()))
}

/// For a handle's `Serialize` ([`transport::lend`](crate::transport::lend)):
/// `None` when no item or message is being encoded; else the slot of `fds`
/// in the message's parcel, or why they cannot travel.
pub(crate) fn collect(fds: &[BorrowedFd<'_>]) -> Option<io::Result<Slot>> {
    let mode = MODE.with(Cell::get);
    if mode == Mode::Idle {
        return None;
    }
    let carried = CARRIER.with(Cell::get) >= 0;
    Some(with_collected(|collected| {
        if !carried {
            collected.failure = Some(Failure::Refused);
            return Err(io::Error::other(
                "handles travel only inside a connection's messages and a queue's items",
            ));
        }
        if collected.count + fds.len() > MAX_FDS_PER_MESSAGE {
            let error = format!("more than {MAX_FDS_PER_MESSAGE} descriptors in one message");
            collected.failure = Some(Failure::Io(io::Error::other(error.clone())));
            return Err(io::Error::other(error));
        }
        if mode == Mode::Publish {
            for fd in fds {
                match rustix::io::fcntl_dupfd_cloexec(fd, 0) {
                    Ok(copy) => collected.fds.push(copy),
                    Err(errno) => {
                        collected.failure = Some(Failure::Io(errno.into()));
                        return Err(errno.into());
                    }
                }
            }
        }
        let first = collected.count as u32;
        collected.count += fds.len();
        Ok(Slot {
            key: *collected.key.get_or_insert_with(Key::new),
            first,
            count: fds.len() as u32,
        })
    }))
}

fn send_parcel(key: Key, fds: &[OwnedFd]) -> io::Result<()> {
    let socket = CARRIER.with(Cell::get);
    // SAFETY: `CARRIER` is set only by `carrying`, for the duration of the
    // send that borrows the socket (the writer endpoint's presence), and this
    // runs inside that send.
    let socket = unsafe { BorrowedFd::borrow_raw(socket) };
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    let mut space =
        vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(io::Error::other("too many descriptors for one message"));
    }
    let header = parcel_header(key, fds.len());
    loop {
        match rustix::net::sendmsg(
            socket,
            &[io::IoSlice::new(&header)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::PIPE) => {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "every reader of the connection is gone",
                ));
            }
            Err(errno) => return Err(errno.into()),
        }
    }
}

/// Runs `decode` (of a message received from a ring whose parcel socket's
/// receiving end is `socket`) with the thread marked as doing so;
/// descriptors of the message's parcel that no handle took are closed after.
/// Without handles: two thread-local `Cell` swaps.
pub(crate) fn receiving<R>(socket: BorrowedFd<'_>, decode: impl FnOnce() -> R) -> R {
    /// Restores the enclosing decoding's state (also on a panic).
    struct Restore {
        inbox: RawFd,
        holding: bool,
        outer: Option<(Key, Vec<Option<OwnedFd>>)>,
    }
    impl Drop for Restore {
        fn drop(&mut self) {
            INBOX.with(|inbox| inbox.set(self.inbox));
            if HOLDING.with(|holding| holding.replace(self.holding)) {
                drop(PARCEL.with(RefCell::take)); // what no handle took
            }
            if let Some(outer) = self.outer.take() {
                PARCEL.with(|parcel| *parcel.borrow_mut() = Some(outer));
            }
        }
    }
    let outer_holding = HOLDING.with(|holding| holding.replace(false));
    let _restore = Restore {
        inbox: INBOX.with(|inbox| inbox.replace(socket.as_raw_fd())),
        holding: outer_holding,
        outer: outer_holding.then(|| PARCEL.with(RefCell::take)).flatten(),
    };
    decode()
}

/// Whether the thread decodes a message (where a courier ticket cannot be).
pub(crate) fn decoding_message() -> bool {
    INBOX.with(Cell::get) >= 0
}

/// For a handle's `Deserialize` ([`transport::claim`](crate::transport::claim)):
/// the descriptors of `slot`.
pub(crate) fn take(slot: Slot) -> io::Result<Vec<OwnedFd>> {
    let socket = INBOX.with(Cell::get);
    if socket < 0 {
        return Err(io::Error::other(
            "a handle sent inside a message must be received with `recv` or `get`",
        ));
    }
    if !HOLDING.with(|holding| holding.replace(true)) {
        drop(PARCEL.with(RefCell::take)); // left by a panicked decoding
    }
    PARCEL.with(|parcel| {
        let mut parcel = parcel.borrow_mut();
        if parcel.as_ref().map(|(key, _)| *key) != Some(slot.key) {
            // SAFETY: `INBOX` is set only by `receiving`, for the duration of
            // the receive that borrows the socket, and this runs inside it.
            let socket = unsafe { BorrowedFd::borrow_raw(socket) };
            let fds = receive_parcel(socket, slot.key).inspect_err(|error| {
                tracing::warn!(%error, "a handle inside a message could not be received");
            })?;
            *parcel = Some((slot.key, fds.into_iter().map(Some).collect()));
        }
        let (_, fds) = parcel.as_mut().expect("just received");
        let range = slot.first as usize..slot.first as usize + slot.count as usize;
        fds.get_mut(range)
            .ok_or_else(|| io::Error::other("a handle's descriptors are not in its message"))?
            .iter_mut()
            .map(Option::take)
            .collect::<Option<Vec<OwnedFd>>>()
            .ok_or_else(|| io::Error::other("a handle's descriptors were taken twice"))
    })
}

/// Receives the parcel `key` from `socket`, closing orphans before it.
fn receive_parcel(socket: BorrowedFd<'_>, key: Key) -> io::Result<Vec<OwnedFd>> {
    loop {
        let mut header = [0u8; PARCEL_HEADER];
        let peeked = retry_eintr(|| {
            rustix::net::recvmsg(
                socket,
                &mut [io::IoSliceMut::new(&mut header)],
                &mut RecvAncillaryBuffer::default(),
                RecvFlags::PEEK | RecvFlags::DONTWAIT,
            )
        });
        match peeked {
            Ok(received) if received.bytes == PARCEL_HEADER => {}
            Ok(_) => return Err(io::Error::other("a malformed parcel of descriptors")),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::other(
                    "the descriptors of a handle in this message are missing",
                ));
            }
            Err(error) => return Err(error),
        }
        let head = Key(header[..16].try_into().expect("16 bytes"));
        let count = u32::from_le_bytes(header[16..].try_into().expect("4 bytes")) as usize;
        if head != key && head.sent_nanos() > key.sent_nanos() {
            return Err(io::Error::other(
                "the descriptors of a handle in this message were taken by a receiver that died",
            ));
        }
        let mut space =
            vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let received = retry_eintr(|| {
            rustix::net::recvmsg(
                socket,
                &mut [io::IoSliceMut::new(&mut header)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT,
            )
        })?;
        let mut fds = Vec::with_capacity(count);
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = message {
                fds.extend(rights);
            }
        }
        if head != key {
            tracing::debug!(count, "closed the descriptors of an unpublished message");
            continue;
        }
        if received.flags.contains(ReturnFlags::CTRUNC) || fds.len() != count {
            return Err(io::Error::other(format!(
                "expected {count} descriptors in a message, received {} (descriptor table full?)",
                fds.len()
            )));
        }
        return Ok(fds);
    }
}
