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
//!   descriptors into the encoding's *parcel* and writes a [`Slot`] in their
//!   place: the parcel's [`Key`] and the handle's range in it. When the
//!   encoding that will be published succeeds, the parcel is sent on the
//!   parcel socket (`SCM_RIGHTS`, payload = key and count) *before* the
//!   frame is published. A message without handles collects nothing: no
//!   system call, no allocation (a thread-local pointer set and
//!   restored).
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

use std::cell::Cell;
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

/// Where the descriptors of handles inside an item or message go: the
/// sending end of a parcel socket (`None`: nowhere; a handle is refused).
pub(crate) type Carrier<'a> = Option<BorrowedFd<'a>>;

/// What the handles of the current encoding collected: touched only when
/// a handle is met.
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

/// One encoding in progress, on the stack of [`encoding`]; the thread's
/// [`ENCODING`] points at the innermost one.
struct Encoding {
    /// Where the descriptors go (-1: nowhere, handles are refused).
    carrier: RawFd,
    /// The bytes will be published if the encoding succeeds (else it is a
    /// size pass: slots are counted, nothing is duplicated or sent).
    publishes: bool,
    /// Allocated at the first handle met: a message without handles only
    /// initialises and checks one word.
    collected: Cell<Option<Box<Collected>>>,
}

/// One decoding in progress, on the stack of [`receiving`]; the thread's
/// [`DECODING`] points at the innermost one.
struct Decoding {
    /// The receiving end of the parcel socket of the ring decoded from.
    inbox: RawFd,
    /// The message's parcel, once a handle asked for it; what no handle
    /// took is closed with the `Decoding`.
    parcel: Cell<Option<Box<Parcel>>>,
}

/// The descriptors of one message, as received, by key.
type Parcel = (Key, Vec<Option<OwnedFd>>);

// The fast path (a message without handles) costs one thread-local swap in and
// one store out per encoding and per decoding: the context lives on the stack
// and the thread-locals only point at it (a null pointer: none).
thread_local! {
    /// The innermost encoding of this thread (null: none).
    static ENCODING: Cell<*const Encoding> = const { Cell::new(std::ptr::null()) };
    /// The innermost decoding of this thread (null: none).
    static DECODING: Cell<*const Decoding> = const { Cell::new(std::ptr::null()) };
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

/// Runs `encode` (of a queue item or a message) with the thread marked as
/// doing so. `publishes`: the bytes will be published if this succeeds (a
/// size pass does not publish). On success with handles, their parcel is
/// sent. Without handles: a thread-local pointer swapped in and restored,
/// nothing else.
#[inline]
pub(crate) fn encoding<R>(
    carrier: Carrier<'_>,
    publishes: bool,
    encode: impl FnOnce() -> postcard::Result<R>,
) -> Result<R, RingError> {
    /// Points the thread back at the enclosing encoding (also on a panic).
    struct Restore(*const Encoding);
    impl Drop for Restore {
        #[inline]
        fn drop(&mut self) {
            ENCODING.with(|current| current.set(self.0));
        }
    }
    let this = Encoding {
        carrier: carrier.map_or(-1, |fd| fd.as_raw_fd()),
        publishes,
        collected: Cell::new(None),
    };
    // Declared after `this`, so dropped before it: the pointer never outlives it.
    let restore = Restore(ENCODING.with(|current| current.replace(&raw const this)));
    let result = encode();
    drop(restore);
    match this.collected.into_inner() {
        None => result.map_err(RingError::Encode),
        Some(collected) => finish_encoding(carrier, publishes, result, *collected),
    }
}

/// The end of an encoding that met a handle: the parcel is sent, or the
/// failure reported.
#[cold]
fn finish_encoding<R>(
    carrier: Carrier<'_>,
    publishes: bool,
    result: postcard::Result<R>,
    collected: Collected,
) -> Result<R, RingError> {
    let passing = |source| RingError::Io {
        op: "passing the descriptors of a handle in a message",
        source,
    };
    match (result, collected.failure) {
        (_, Some(Failure::Refused)) => Err(RingError::HandleInItem),
        (_, Some(Failure::Io(source))) => Err(passing(source)),
        (Err(error), None) => Err(RingError::Encode(error)),
        (Ok(value), None) => {
            if let Some((key, socket)) = collected
                .key
                .zip(carrier)
                .filter(|_| publishes && !collected.fds.is_empty())
            {
                send_parcel(socket, key, &collected.fds).map_err(passing)?;
            }
            Ok(value)
        }
    }
}

/// For a handle's `Serialize` ([`transport::lend`](crate::transport::lend)):
/// `None` when no item or message is being encoded; else the slot of `fds`
/// in the message's parcel, or why they cannot travel.
pub(crate) fn collect(fds: &[BorrowedFd<'_>]) -> Option<io::Result<Slot>> {
    let current = ENCODING.with(Cell::get);
    if current.is_null() {
        return None;
    }
    // SAFETY: `ENCODING` points at the `Encoding` on the stack of the
    // innermost `encoding` call of this thread, which restores the previous
    // pointer before that value goes (also when unwinding); this runs inside
    // that call (a handle's `Serialize` within `encode`).
    let this = unsafe { &*current };
    let carried = this.carrier >= 0;
    let mut collected = this.collected.take().unwrap_or_default();
    let slot = (|| {
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
        if this.publishes {
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
    })();
    this.collected.set(Some(collected));
    Some(slot)
}

fn send_parcel(socket: BorrowedFd<'_>, key: Key, fds: &[OwnedFd]) -> io::Result<()> {
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
/// Without handles: a thread-local pointer swapped in and restored.
#[inline]
pub(crate) fn receiving<R>(socket: BorrowedFd<'_>, decode: impl FnOnce() -> R) -> R {
    /// Points the thread back at the enclosing decoding (also on a panic).
    struct Restore(*const Decoding);
    impl Drop for Restore {
        #[inline]
        fn drop(&mut self) {
            DECODING.with(|current| current.set(self.0));
        }
    }
    let this = Decoding {
        inbox: socket.as_raw_fd(),
        parcel: Cell::new(None),
    };
    // Declared after `this`, so dropped before it: the pointer never outlives
    // it; `this` then closes what no handle took.
    let _restore = Restore(DECODING.with(|current| current.replace(&raw const this)));
    decode()
}

/// Whether the thread decodes a message (where a courier ticket cannot be).
pub(crate) fn decoding_message() -> bool {
    !DECODING.with(Cell::get).is_null()
}

/// For a handle's `Deserialize` ([`transport::claim`](crate::transport::claim)):
/// the descriptors of `slot`.
pub(crate) fn take(slot: Slot) -> io::Result<Vec<OwnedFd>> {
    let current = DECODING.with(Cell::get);
    if current.is_null() {
        return Err(io::Error::other(
            "a handle sent inside a message must be received with `recv` or `get`",
        ));
    }
    // SAFETY: `DECODING` points at the `Decoding` on the stack of the
    // innermost `receiving` call of this thread, which restores the previous
    // pointer before that value goes (also when unwinding); this runs inside
    // that call (a handle's `Deserialize` within `decode`).
    let this = unsafe { &*current };
    let mut parcel = this.parcel.take();
    let taken = (|| {
        if parcel.as_ref().map(|p| p.0) != Some(slot.key) {
            // SAFETY: `inbox` was borrowed by `receiving` for the duration of
            // the receive, and this runs inside it.
            let socket = unsafe { BorrowedFd::borrow_raw(this.inbox) };
            let fds = receive_parcel(socket, slot.key).inspect_err(|error| {
                tracing::warn!(%error, "a handle inside a message could not be received");
            })?;
            parcel = Some(Box::new((slot.key, fds.into_iter().map(Some).collect())));
        }
        let (_, fds) = &mut **parcel.as_mut().expect("just received");
        let range = slot.first as usize..slot.first as usize + slot.count as usize;
        fds.get_mut(range)
            .ok_or_else(|| io::Error::other("a handle's descriptors are not in its message"))?
            .iter_mut()
            .map(Option::take)
            .collect::<Option<Vec<OwnedFd>>>()
            .ok_or_else(|| io::Error::other("a handle's descriptors were taken twice"))
    })();
    this.parcel.set(parcel);
    taken
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
