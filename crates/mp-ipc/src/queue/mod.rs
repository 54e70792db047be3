//! Queues between processes and threads: [`Queue`] (bounded or not),
//! [`SimpleQueue`] and [`JoinableQueue`], like Python's
//! `multiprocessing.Queue` family.
//!
//! ```
//! use mp_core::Process;
//! use mp_ipc::queue::Queue;
//!
//! let queue: Queue<String> = Queue::bounded(16)?;
//! let child = Process::new(|(queue, n): (Queue<String>, u32)| {
//!     for i in 0..n {
//!         queue.put(format!("item {i}")).unwrap();
//!     }
//! })
//! .args((queue.clone(), 3))
//! .start()?;
//! for i in 0..3 {
//!     assert_eq!(queue.get()?, format!("item {i}"));
//! }
//! child.join()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Any number of producer and consumer processes and threads may share a
//! queue: clones are handles to the same queue, and so is a queue passed as an
//! argument to a child process. Items are encoded with postcard, FIFO per
//! producer; once `put` has returned, the item is in shared memory and is
//! not lost if the producer dies. A process killed in the middle of a put or
//! a get never corrupts the queue nor blocks the others: the next producer
//! or consumer is told by a robust lock and carries on (see the `ring`
//! module docs for the protocol).
//!
//! An unbounded queue never makes `put` block: when its ring (8 MiB by
//! default, [`QueueBuilder::capacity_bytes`]) is full, a put waits at most
//! 10 ms for a consumer to make room (so a queue whose consumers keep up stays
//! in its warm pages), then the queue grows into a further segment of the
//! same memory file; a drained segment's memory is given back (see
//! `queue/segments.rs` for the design). So a producer can
//! always put everything and exit before anybody reads, which in CPython
//! deadlocks a `join()` made before draining. A bounded queue has one ring and
//! waits for room.
//!
//! Closing and shutting down follow Python 3.13: [`Queue::close`] (and
//! dropping) releases only that handle; [`Queue::shutdown`] and
//! [`Queue::shutdown_immediate`] act on the queue, for every process.
//!
//! A `get` that finds the queue empty when every other handle is gone
//! (dropped, closed, or its process ended, SIGKILL included; handles in
//! flight count) fails with [`QueueError::Abandoned`] instead of waiting
//! forever; so does a `put` on a full bounded queue. The kernel tells
//! (pidfds of the other holders, see `queue/holders.rs`); nothing is polled.
//! Handles copied by a bare `fork` (not passed as process arguments) are
//! not counted: once the child clones, drops, closes or waits on one, the
//! queue stops failing waits this way (they then wait as Python's do); a
//! child that only puts through such a copy goes unnoticed.
//!
//! Differences from Python: there is no feeder thread (put writes straight
//! into shared memory, so `close` needs no `join_thread` and a process can
//! exit right after a put without losing the item). Items larger than a
//! quarter of a ring travel out of band (in their own pages of the same memory
//! file), so any size works. Handles inside an item (queues, connections)
//! travel with it and are the same objects on arrival (see `message_handles`).

mod holders;
mod joinable;
mod segments;
mod simple;

pub use joinable::JoinableQueue;
pub use simple::SimpleQueue;

use std::borrow::Borrow;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::decode_error::CodecError;
use crate::ring::{Payload, Postcard, Ring, RingError, Wait};
use crate::shm::ShmError;
use crate::transport::{self, Ticket};
use segments::Segments;

/// What can go wrong with a queue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// `try_get`: no item is available now.
    #[error("the queue is empty")]
    Empty,
    /// `try_put`: the queue is full now.
    #[error("the queue is full")]
    Full,
    /// A `*_timeout` call gave up.
    #[error("timed out")]
    Timeout,
    /// The queue was shut down ([`Queue::shutdown`], Python's `ShutDown`):
    /// puts fail; gets fail once it is drained (at once after
    /// [`Queue::shutdown_immediate`]).
    #[error("the queue is shut down")]
    Closed,
    /// This handle was closed with [`Queue::close`]; other handles are unaffected.
    #[error("this handle of the queue was closed")]
    HandleClosed,
    /// A get found the queue empty (or a put found a bounded queue full) and
    /// every other handle of the queue is gone: dropped, closed, or its
    /// process ended (SIGKILL included), handles in flight counted. Nothing
    /// can ever arrive (or make room), so the call fails instead of waiting
    /// forever as Python's does. `try_` calls report `Empty`/`Full` instead.
    #[error("every other handle of the queue is gone: nothing can arrive or make room")]
    Abandoned,
    /// The item could not be encoded (nothing was put): its type, postcard's error and the
    /// cause the item gave.
    #[error("could not encode the item: {0}")]
    Encode(#[source] CodecError),
    /// An item could not be decoded as the queue's type; it was removed from
    /// the queue (later items are unaffected).
    #[error("could not decode an item (it was removed from the queue): {0}")]
    Decode(#[source] CodecError),
    /// The item contains a handle but is not being carried by a queue that
    /// can pass its descriptors (e.g. [`encode_item`], a handle nested in
    /// another transport); pass it as a process argument (nothing was put).
    #[error(
        "the item contains a handle that cannot travel inside an item; pass it as a process argument"
    )]
    HandleInItem,
    /// `JoinableQueue::task_done` was called more times than items were put.
    #[error("task_done() called more times than there were items")]
    TaskDoneTooMany,
    /// The calling thread is already inside a put (or get) of this queue,
    /// e.g. from an item's `Serialize` implementation.
    #[error("the calling thread is already inside a put or get of this queue")]
    Reentrant,
    /// The queue's shared memory does not hold what it should.
    #[error("the queue's shared memory is corrupted: {0}")]
    Corrupted(String),
    /// A handle received from another process is not a queue of this item type.
    #[error("received handle does not match: {0}")]
    Incompatible(String),
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Creating or attaching the shared memory failed.
    #[error(transparent)]
    Shm(#[from] ShmError),
}

/// Encodes `value` as a queue item would be encoded: postcard, plain data only. A handle
/// (queue, lock, shared memory...) inside it is refused with [`QueueError::HandleInItem`]
/// before its descriptor is taken, so nothing leaks. For crates that carry items over their
/// own shared-memory transport (mp-pool's task arguments).
pub fn encode_item<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, QueueError> {
    use crate::ring::Encode;
    match crate::ring::Postcard(value).encoded(None) {
        Ok(bytes) => Ok(bytes.into_owned()),
        Err(error) => Err(QueueError::from(error).naming(value)),
    }
}

impl QueueError {
    /// An encode failure of `item` names its type and cause (the ring knows only postcard's
    /// error); any other error is returned as it is.
    fn naming<T: Serialize + ?Sized>(self, item: &T) -> Self {
        match self {
            QueueError::Encode(error) => {
                QueueError::Encode(CodecError::encoding(item, error.into_postcard_error()))
            }
            other => other,
        }
    }
}

impl From<RingError> for QueueError {
    fn from(error: RingError) -> Self {
        match error {
            RingError::Closed => QueueError::Closed,
            RingError::Full => QueueError::Full,
            RingError::Empty => QueueError::Empty,
            RingError::Timeout => QueueError::Timeout,
            RingError::Encode(e) => QueueError::Encode(CodecError::untyped(e)),
            RingError::Corrupted(what) => QueueError::Corrupted(what),
            RingError::Incompatible(what) => QueueError::Incompatible(what),
            RingError::Reentrant => QueueError::Reentrant,
            RingError::HandleInItem => QueueError::HandleInItem,
            RingError::Io { op, source } => QueueError::Io { op, source },
        }
    }
}

/// Options of a new [`Queue`]: `Queue::builder().maxsize(100).build()`.
#[must_use = "a builder does nothing until .build()"]
pub struct QueueBuilder<T> {
    maxsize: Option<u32>,
    capacity_bytes: usize,
    grow: bool,
    _item: PhantomData<fn(T) -> T>,
}

impl<T> Clone for QueueBuilder<T> {
    fn clone(&self) -> Self {
        QueueBuilder {
            maxsize: self.maxsize,
            capacity_bytes: self.capacity_bytes,
            grow: self.grow,
            _item: PhantomData,
        }
    }
}

impl<T> fmt::Debug for QueueBuilder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueBuilder")
            .field("maxsize", &self.maxsize)
            .field("capacity_bytes", &self.capacity_bytes)
            .field("grow", &self.grow)
            .finish()
    }
}

impl<T: Serialize + DeserializeOwned> QueueBuilder<T> {
    /// At most `maxsize` items at once (Python's `maxsize`; at least 1,
    /// at most `u32::MAX`). Default: no item limit.
    pub fn maxsize(mut self, maxsize: usize) -> Self {
        self.maxsize = Some(maxsize.clamp(1, u32::MAX as usize) as u32);
        self
    }

    /// Size of the shared ring in bytes (rounded up to a power of two,
    /// between 4 KiB and 2 GiB; default 8 MiB). Items larger than a quarter
    /// of it travel out of band. The ring is address space until used. An
    /// unbounded queue grows beyond it (into segments up to twice as large
    /// as the one before, at most 64 MiB or this size).
    pub fn capacity_bytes(mut self, bytes: usize) -> Self {
        self.capacity_bytes = bytes;
        self
    }

    /// Whether a queue with no item limit grows when its ring is full
    /// (default: yes). With `false`, its ring's size in bytes bounds it: a
    /// put into a full ring waits for room (`try_put`: [`QueueError::Full`]),
    /// as in a bounded queue.
    pub fn grow(mut self, grow: bool) -> Self {
        self.grow = grow;
        self
    }

    /// Creates the queue.
    pub fn build(self) -> Result<Queue<T>, QueueError> {
        Queue::with_tag(self, type_tag::<Queue<T>>())
    }
}

/// A multi-producer, multi-consumer FIFO queue shared between processes
/// (Python's `multiprocessing.Queue`). See the [module docs](self).
///
/// Clones and copies received by child processes are handles to the same
/// queue; its memory is freed when the last handle in the last process is
/// dropped.
pub struct Queue<T> {
    segments: Arc<Segments>,
    /// This handle's `close` (Python's `Queue.close`): only this handle fails.
    closed: AtomicBool,
    _item: PhantomData<fn(T) -> T>,
}

impl<T> Clone for Queue<T> {
    /// Another handle to the same queue (open, even if this one was closed).
    fn clone(&self) -> Self {
        Queue::from_segments(Arc::clone(&self.segments))
    }
}

impl<T> fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("len", &self.segments.len())
            .field("maxsize", &self.segments.max_items())
            .field("capacity_bytes", &self.segments.first_capacity())
            .field("closed", &self.is_closed())
            .field("shut_down", &self.segments.is_shut_down())
            .finish()
    }
}

impl<T: Serialize + DeserializeOwned> Queue<T> {
    /// A queue holding at most `maxsize` items (Python's `Queue(maxsize)`).
    pub fn bounded(maxsize: usize) -> Result<Self, QueueError> {
        Self::builder().maxsize(maxsize).build()
    }

    /// A queue with no item limit (Python's `Queue()`): `put` never blocks,
    /// the queue grows (see the [module docs](self)).
    pub fn unbounded() -> Result<Self, QueueError> {
        Self::builder().build()
    }

    /// Options: item limit, ring size.
    pub fn builder() -> QueueBuilder<T> {
        QueueBuilder {
            maxsize: None,
            capacity_bytes: segments::FIRST_CAPACITY,
            grow: true,
            _item: PhantomData,
        }
    }

    fn with_tag(builder: QueueBuilder<T>, type_tag: u64) -> Result<Self, QueueError> {
        let segments = Segments::create(
            builder.capacity_bytes,
            builder.maxsize,
            builder.grow,
            type_tag,
        )?;
        Ok(Queue::from_segments(segments))
    }

    /// Puts an item, waiting for room if the queue is full.
    pub fn put(&self, item: impl Borrow<T>) -> Result<(), QueueError> {
        self.put_with(item.borrow(), Wait::Forever)
    }

    /// Puts an item if there is room now; [`QueueError::Full`] otherwise
    /// (Python's `put_nowait`).
    pub fn try_put(&self, item: impl Borrow<T>) -> Result<(), QueueError> {
        self.put_with(item.borrow(), Wait::Never)
    }

    /// Puts an item, waiting at most `timeout` for room
    /// ([`QueueError::Timeout`] then).
    pub fn put_timeout(&self, item: impl Borrow<T>, timeout: Duration) -> Result<(), QueueError> {
        self.put_with(item.borrow(), Wait::timeout(timeout))
    }

    fn put_with(&self, item: &T, wait: Wait) -> Result<(), QueueError> {
        self.check_open()?;
        self.segments
            .put(&Postcard(item), wait)
            .map_err(|error| error.naming(item))
    }

    /// Takes the next item, waiting for one.
    pub fn get(&self) -> Result<T, QueueError> {
        self.get_with(Wait::Forever)
    }

    /// Takes the next item if one is there now; [`QueueError::Empty`]
    /// otherwise (Python's `get_nowait`).
    pub fn try_get(&self) -> Result<T, QueueError> {
        self.get_with(Wait::Never)
    }

    /// Takes the next item, waiting at most `timeout` ([`QueueError::Timeout`] then).
    pub fn get_timeout(&self, timeout: Duration) -> Result<T, QueueError> {
        self.get_with(Wait::timeout(timeout))
    }

    fn get_with(&self, wait: Wait) -> Result<T, QueueError> {
        self.check_open()?;
        self.segments.get(wait, decode::<T>)?
    }
}

impl<T> Queue<T> {
    fn from_segments(segments: Arc<Segments>) -> Self {
        segments.handle_made();
        Queue {
            segments,
            closed: AtomicBool::new(false),
            _item: PhantomData,
        }
    }

    fn check_open(&self) -> Result<(), QueueError> {
        if self.closed.load(Relaxed) {
            return Err(QueueError::HandleClosed);
        }
        Ok(())
    }

    /// The number of items in the queue now (Python's `qsize`; a snapshot
    /// that other processes may change at once).
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    /// Whether the queue is empty now (a snapshot).
    pub fn is_empty(&self) -> bool {
        !self.segments.has_data()
    }

    /// Whether a put would have to wait now (a snapshot; never for an
    /// unbounded queue).
    pub fn is_full(&self) -> bool {
        self.segments.is_full()
    }

    /// The item limit, if any (Python's `maxsize`).
    pub fn maxsize(&self) -> Option<usize> {
        self.segments.max_items().map(|n| n as usize)
    }

    /// Releases this handle (Python's `Queue.close`): its puts and gets fail
    /// with [`QueueError::HandleClosed`] from now on. Other handles, clones
    /// included, in this process or another, are unaffected, and so is every
    /// item put. Dropping a handle does the same. To stop the queue for
    /// everybody, use [`shutdown`](Self::shutdown).
    pub fn close(&self) -> Result<(), QueueError> {
        if !self.closed.swap(true, Relaxed) {
            self.segments.handle_gone();
        }
        Ok(())
    }

    /// Whether [`close`](Self::close) was called on this handle.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Relaxed)
    }

    /// Shuts the queue down for every handle in every process (Python
    /// 3.13's `shutdown()`): puts fail with [`QueueError::Closed`] from now
    /// on (a put waiting for room wakes up and fails); gets return what is
    /// left, then fail with `Closed` (a get waiting for an item wakes up
    /// and fails). A put that had already returned is never lost.
    pub fn shutdown(&self) -> Result<(), QueueError> {
        self.segments.shut_down(false)?;
        Ok(())
    }

    /// Shuts the queue down and discards the items in it (Python 3.13's
    /// `shutdown(immediate=True)`): gets fail with [`QueueError::Closed`] at
    /// once. A [`JoinableQueue`] counts the discarded items done. An item
    /// taken by a get running at the same moment counts as taken before.
    pub fn shutdown_immediate(&self) -> Result<(), QueueError> {
        let discarded = self.segments.shut_down(true)?;
        segments::count_done(self.segments.tasks(), discarded);
        Ok(())
    }

    /// Whether the queue was shut down ([`shutdown`](Self::shutdown) or
    /// [`shutdown_immediate`](Self::shutdown_immediate), by any handle).
    pub fn is_shut_down(&self) -> bool {
        self.segments.is_shut_down()
    }
}

impl<T> Drop for Queue<T> {
    fn drop(&mut self) {
        if !*self.closed.get_mut() {
            self.segments.handle_gone();
        }
    }
}

impl<'a, T> From<&'a Queue<T>> for crate::connection::Waitable<'a> {
    /// For [`wait`](crate::connection::wait): ready when the queue has an item or is closed.
    fn from(queue: &'a Queue<T>) -> Self {
        crate::connection::Waitable::Queue(crate::connection::QueueReadiness {
            ring: queue.segments.consumer_ring(),
        })
    }
}

impl<'a, T> From<&'a SimpleQueue<T>> for crate::connection::Waitable<'a> {
    fn from(queue: &'a SimpleQueue<T>) -> Self {
        crate::connection::Waitable::from(&queue.queue)
    }
}

impl<'a, T> From<&'a JoinableQueue<T>> for crate::connection::Waitable<'a> {
    fn from(queue: &'a JoinableQueue<T>) -> Self {
        crate::connection::Waitable::from(&queue.queue)
    }
}

/// A byte buffer that encodes as one block.
///
/// serde encodes a `Vec<u8>` as a sequence of separate `u8`s, which postcard
/// writes (and reads) one at a time; `Bytes` is written with a single copy.
/// Use `Queue<Bytes>` (or `Connection::send(Bytes(..))`, or `send_bytes`)
/// for binary payloads.
///
/// ```
/// use mp_ipc::queue::{Bytes, Queue};
///
/// let queue: Queue<Bytes> = Queue::unbounded()?;
/// queue.put(Bytes(vec![1, 2, 3]))?;
/// assert_eq!(queue.get()?.0, [1, 2, 3]);
/// # Ok::<(), mp_ipc::queue::QueueError>(())
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bytes(pub Vec<u8>);

impl Deref for Bytes {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl std::ops::DerefMut for Bytes {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(bytes: Vec<u8>) -> Self {
        Bytes(bytes)
    }
}

impl From<Bytes> for Vec<u8> {
    fn from(bytes: Bytes) -> Self {
        bytes.0
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Bytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes(bytes.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, bytes: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes(bytes))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Bytes, A::Error> {
                let mut bytes = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
                while let Some(byte) = seq.next_element()? {
                    bytes.push(byte);
                }
                Ok(Bytes(bytes))
            }
        }
        deserializer.deserialize_byte_buf(Visitor)
    }
}

/// Decodes a whole payload as one `T`.
fn decode<T: DeserializeOwned>(payload: Payload<'_>) -> Result<T, QueueError> {
    let bytes = payload.contiguous().map_err(|source| QueueError::Io {
        op: "reading an out-of-band item",
        source,
    })?;
    match postcard::take_from_bytes::<T>(&bytes) {
        Ok((value, [])) => Ok(value),
        Ok(_) => Err(QueueError::Decode(CodecError::decoding::<T>(
            &bytes,
            postcard::Error::DeserializeBadEncoding,
        ))),
        Err(error) => Err(QueueError::Decode(CodecError::decoding::<T>(&bytes, error))),
    }
}

/// A stable (within one executable) tag for a handle type, checked when a
/// handle is received, so that a `Queue<A>` cannot be read as a `Queue<B>`.
fn type_tag<H: ?Sized>() -> u64 {
    // FNV-1a: deterministic across processes, unlike `RandomState`.
    std::any::type_name::<H>()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(0x100_0000_01b3)
        })
}

/// The wire form of every queue handle: a ticket for its ring's memfd
/// (see the [transport](crate::transport)), and the lending process, which
/// counts the handle in flight until it is claimed (see `holders.rs`).
#[derive(Serialize, Deserialize)]
struct Wire {
    ring: Ticket,
    lender: u32,
}

impl<T> Serialize for Queue<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if mp_core::finding_encode_cause() {
            // A second pass that only looks for why an encoding failed: lend nothing.
            return serializer.serialize_unit();
        }
        let ring = transport::lend(&self.segments.first().descriptors()).map_err(|e| {
            crate::decode_error::custom_encode::<S::Error>(format!(
                "lending a queue's descriptors: {e}"
            ))
        })?;
        // Counted for the lender until the receiver claims it.
        self.segments.handle_made();
        Wire {
            ring,
            lender: self.segments.lender(),
        }
        .serialize(serializer)
    }
}

impl<'de, T> Deserialize<'de> for Queue<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        attach(deserializer, type_tag::<Queue<T>>())
    }
}

fn attach<'de, D: Deserializer<'de>, T>(deserializer: D, tag: u64) -> Result<Queue<T>, D::Error> {
    if mp_core::replaying_decode() {
        // A second reading that only looks for why a decode failed: claim nothing.
        return Err(mp_core::abandon_replay());
    }
    let wire = Wire::deserialize(deserializer)?;
    let fds = transport::claim(wire.ring).map_err(|error| {
        tracing::warn!(%error, "a received queue could not take its descriptors");
        crate::decode_error::custom(format!("receiving a queue's descriptors: {error}"))
    })?;
    let ring = Ring::attach(fds.into_iter(), tag).map_err(crate::decode_error::custom)?;
    let segments = Segments::attach(ring, tag).map_err(crate::decode_error::custom)?;
    let queue = Queue::from_segments(segments);
    queue.segments.claimed_from(wire.lender);
    Ok(queue)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn a_handle_encoded_outside_a_queue_is_refused_and_stays_usable() {
        let lock = crate::Lock::new().unwrap();
        assert!(matches!(
            encode_item(&(1u8, &lock)),
            Err(QueueError::HandleInItem)
        ));
        let queue: Queue<(u8, crate::Lock)> = Queue::unbounded().unwrap();
        queue.put((2u8, lock.clone())).unwrap();
        let (two, arrived) = queue.get().unwrap();
        assert_eq!(two, 2);
        let _guard = arrived.lock().unwrap();
        assert!(lock.locked(), "the item's lock is the same lock");
    }

    #[test]
    fn put_accepts_values_and_references() {
        let queue: Queue<u64> = Queue::unbounded().unwrap();
        queue.put(5).unwrap();
        let six = 6;
        let by_reference: &u64 = &six;
        queue.put(by_reference).unwrap();
        assert_eq!(queue.len(), 2);
        assert_eq!(queue.get().unwrap(), 5);
        assert_eq!(queue.try_get().unwrap(), 6);
        assert!(matches!(queue.try_get(), Err(QueueError::Empty)));
    }

    #[test]
    fn a_wrong_type_is_a_decode_error_and_the_queue_goes_on() {
        let queue: Queue<String> = Queue::unbounded().unwrap();
        // The same ring read as another type: bytes that are not a valid u64 varint.
        queue.put("\u{ff}\u{ff}".to_owned()).unwrap();
        queue.put("ok".to_owned()).unwrap();
        let as_u16: Queue<u16> = Queue::from_segments(Arc::clone(&queue.segments));
        match as_u16.get() {
            Err(QueueError::Decode(error)) => {
                assert_eq!(error.type_name(), "u16");
                assert!(error.to_string().starts_with("u16: "), "{error}");
            }
            other => panic!("expected a decode error, got {other:?}"),
        }
        assert_eq!(queue.get().unwrap(), "ok");
    }

    /// An item whose `Serialize` refuses, with a message of its own.
    #[derive(Debug, Deserialize)]
    struct Refuses;

    impl Serialize for Refuses {
        fn serialize<S: Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("not while the lamp is lit"))
        }
    }

    /// An even number, refusing odd ones in its own words.
    #[derive(Debug, Serialize)]
    struct Even(u32);

    impl<'de> Deserialize<'de> for Even {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            let n = u32::deserialize(deserializer)?;
            if n % 2 == 1 {
                return Err(serde::de::Error::custom(format!("{n} is odd")));
            }
            Ok(Even(n))
        }
    }

    #[test]
    fn an_item_that_refuses_to_decode_says_why_and_the_queue_goes_on() {
        let queue: Queue<(u8, Even)> = Queue::unbounded().unwrap();
        queue.put((1, Even(3))).unwrap();
        queue.put((2, Even(4))).unwrap();
        match queue.get() {
            Err(QueueError::Decode(error)) => {
                assert!(error.type_name().contains("Even"), "{error}");
                assert_eq!(error.cause(), Some("3 is odd"));
            }
            other => panic!("expected a decode error, got {other:?}"),
        }
        assert_eq!(queue.get().unwrap().1.0, 4);
    }

    #[test]
    fn an_item_that_refuses_to_encode_names_its_type_and_its_reason() {
        let queue: Queue<Vec<Refuses>> = Queue::unbounded().unwrap();
        for result in [queue.put(vec![Refuses]), queue.try_put(vec![Refuses])] {
            match result {
                Err(QueueError::Encode(error)) => {
                    assert!(error.type_name().contains("Vec<"), "{error}");
                    assert!(error.type_name().contains("Refuses"), "{error}");
                    assert_eq!(error.cause(), Some("not while the lamp is lit"));
                    let text = QueueError::Encode(error).to_string();
                    assert!(text.contains("not while the lamp is lit"), "{text}");
                }
                other => panic!("expected an encode error, got {other:?}"),
            }
        }
        assert_eq!(queue.len(), 0, "nothing was put");
        match encode_item(&Refuses) {
            Err(QueueError::Encode(error)) => {
                assert_eq!(error.cause(), Some("not while the lamp is lit"))
            }
            other => panic!("expected an encode error, got {other:?}"),
        }
    }

    #[test]
    fn a_queue_inside_an_item_is_the_same_queue() {
        let outer: Queue<Queue<u8>> = Queue::unbounded().unwrap();
        let inner: Queue<u8> = Queue::unbounded().unwrap();
        outer.put(&inner).unwrap();
        outer.get().unwrap().put(1).unwrap();
        assert_eq!(inner.get().unwrap(), 1);
        // The thread is back to normal: the inner queue still travels as an argument.
        let (tx, rx) = ipc_channel::ipc::channel().unwrap();
        tx.send(inner.clone()).unwrap();
        rx.recv().unwrap().put(2).unwrap();
        assert_eq!(inner.get().unwrap(), 2);
    }

    #[test]
    fn handles_inside_items_keep_their_order_across_the_growth_of_the_queue() {
        // A 4 KiB first segment: the plain items around the handles make the queue grow
        // several times, and every segment shares the one parcel socket pair.
        let outer: Queue<(u32, Option<Queue<u32>>)> =
            Queue::builder().capacity_bytes(4096).build().unwrap();
        let inners: Vec<Queue<u32>> = (0..20).map(|_| Queue::unbounded().unwrap()).collect();
        for i in 0..4_000u32 {
            let handle = (i % 200 == 0).then(|| inners[(i / 200) as usize].clone());
            outer.put((i, handle)).unwrap();
        }
        for i in 0..4_000u32 {
            let (got, handle) = outer.get().unwrap();
            assert_eq!(got, i);
            assert_eq!(handle.is_some(), i % 200 == 0, "item {i}");
            if let Some(handle) = handle {
                handle.put(i).unwrap();
                assert_eq!(inners[(i / 200) as usize].get().unwrap(), i);
            }
        }
        assert!(outer.is_empty());
    }

    #[test]
    fn type_tags_differ_between_types_and_kinds() {
        assert_ne!(type_tag::<Queue<u8>>(), type_tag::<Queue<u16>>());
        assert_ne!(type_tag::<Queue<u8>>(), type_tag::<JoinableQueue<u8>>());
        assert_eq!(type_tag::<Queue<u8>>(), type_tag::<Queue<u8>>());
    }
}
