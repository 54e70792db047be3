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
//! Differences from Python: there is no feeder thread (put writes straight
//! into shared memory, so `close` needs no `join_thread` and a process can
//! exit right after a put without losing the item); an "unbounded" queue has
//! no item limit but a ring of fixed size in bytes ([`QueueBuilder::capacity_bytes`],
//! 8 MiB by default — address space, faulted in as used): a put that finds
//! it full waits like a bounded one. Items larger than a quarter of the ring
//! travel out of band (in their own pages of the same memory file), so any
//! size works. Items must be plain data: handles (queues, pipes, shared
//! memory...) inside an item do not carry their file descriptors; pass them
//! as process arguments instead.

use std::borrow::Borrow;
use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::futex::{self, WaitOutcome};
use crate::ring::{DEFAULT_CAPACITY, Payload, Postcard, Ring, RingConfig, RingError, Wait};
use crate::shm::ShmError;
use crate::transport::{self, Ticket};

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
    /// The queue was closed: puts fail; gets fail once it is drained.
    #[error("the queue is closed")]
    Closed,
    /// The item could not be encoded (nothing was put).
    #[error("could not encode the item: {0}")]
    Encode(#[source] postcard::Error),
    /// An item could not be decoded as the queue's type; it was removed from
    /// the queue (later items are unaffected).
    #[error("could not decode an item (it was removed from the queue): {0}")]
    Decode(#[source] postcard::Error),
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
    Ok(crate::ring::Postcard(value).encoded()?.into_owned())
}

impl From<RingError> for QueueError {
    fn from(error: RingError) -> Self {
        match error {
            RingError::Closed => QueueError::Closed,
            RingError::Full => QueueError::Full,
            RingError::Empty => QueueError::Empty,
            RingError::Timeout => QueueError::Timeout,
            RingError::Encode(e) => QueueError::Encode(e),
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
    _item: PhantomData<fn(T) -> T>,
}

impl<T> Clone for QueueBuilder<T> {
    fn clone(&self) -> Self {
        QueueBuilder {
            maxsize: self.maxsize,
            capacity_bytes: self.capacity_bytes,
            _item: PhantomData,
        }
    }
}

impl<T> fmt::Debug for QueueBuilder<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueBuilder")
            .field("maxsize", &self.maxsize)
            .field("capacity_bytes", &self.capacity_bytes)
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
    /// of it travel out of band. The ring is address space until used.
    pub fn capacity_bytes(mut self, bytes: usize) -> Self {
        self.capacity_bytes = bytes;
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
    ring: Arc<Ring>,
    _item: PhantomData<fn(T) -> T>,
}

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Queue {
            ring: Arc::clone(&self.ring),
            _item: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Queue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Queue")
            .field("len", &self.ring.len())
            .field("maxsize", &self.ring.max_items())
            .field("capacity_bytes", &self.ring.capacity())
            .field("closed", &self.ring.is_closing())
            .finish()
    }
}

impl<T: Serialize + DeserializeOwned> Queue<T> {
    /// A queue holding at most `maxsize` items (Python's `Queue(maxsize)`).
    pub fn bounded(maxsize: usize) -> Result<Self, QueueError> {
        Self::builder().maxsize(maxsize).build()
    }

    /// A queue with no item limit (Python's `Queue()`); see the
    /// [module docs](self) for how its ring bounds the bytes in flight.
    pub fn unbounded() -> Result<Self, QueueError> {
        Self::builder().build()
    }

    /// Options: item limit, ring size.
    pub fn builder() -> QueueBuilder<T> {
        QueueBuilder {
            maxsize: None,
            capacity_bytes: DEFAULT_CAPACITY,
            _item: PhantomData,
        }
    }

    fn with_tag(builder: QueueBuilder<T>, type_tag: u64) -> Result<Self, QueueError> {
        let ring = Ring::create(RingConfig {
            capacity: builder.capacity_bytes,
            max_items: builder.maxsize,
            type_tag,
            // For `connection::wait` over queues.
            doorbell: true,
        })?
        .with_parcels()?; // handles inside items (see `message_handles`)
        Ok(Queue {
            ring: Arc::new(ring),
            _item: PhantomData,
        })
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
        Ok(self.ring.push(&Postcard(item), wait, None)?)
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
        self.ring.pop(wait, None, decode::<T>)?
    }
}

impl<T> Queue<T> {
    /// The number of items in the queue now (Python's `qsize`; a snapshot
    /// that other processes may change at once).
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    /// Whether the queue is empty now (a snapshot).
    pub fn is_empty(&self) -> bool {
        !self.ring.has_data()
    }

    /// Whether a put would have to wait now (a snapshot).
    pub fn is_full(&self) -> bool {
        self.ring.is_full()
    }

    /// The item limit, if any (Python's `maxsize`).
    pub fn maxsize(&self) -> Option<usize> {
        self.ring.max_items().map(|n| n as usize)
    }

    /// Closes the queue for everyone: puts fail with [`QueueError::Closed`]
    /// from now on (a put waiting for room wakes up and fails); gets return
    /// what is left, then fail with `Closed`. A put that had already
    /// returned is never lost.
    pub fn close(&self) -> Result<(), QueueError> {
        Ok(self.ring.close()?)
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.ring.is_closing()
    }
}

impl<'a, T> From<&'a Queue<T>> for crate::connection::Waitable<'a> {
    /// For [`wait`](crate::connection::wait): ready when the queue has an item or is closed.
    fn from(queue: &'a Queue<T>) -> Self {
        crate::connection::Waitable::Queue(crate::connection::QueueReadiness { ring: &queue.ring })
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
        Ok(_) => Err(QueueError::Decode(postcard::Error::DeserializeBadEncoding)),
        Err(error) => Err(QueueError::Decode(error)),
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
/// (see the [transport](crate::transport)).
#[derive(Serialize, Deserialize)]
struct Wire {
    ring: Ticket,
}

impl<T> Serialize for Queue<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::Error;
        let ring = transport::lend(&self.ring.descriptors())
            .map_err(|e| S::Error::custom(format!("lending a queue's descriptors: {e}")))?;
        Wire { ring }.serialize(serializer)
    }
}

impl<'de, T> Deserialize<'de> for Queue<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        attach(deserializer, type_tag::<Queue<T>>())
    }
}

fn attach<'de, D: Deserializer<'de>, T>(deserializer: D, tag: u64) -> Result<Queue<T>, D::Error> {
    let wire = Wire::deserialize(deserializer)?;
    let fds = transport::claim(wire.ring).map_err(|error| {
        tracing::warn!(%error, "a received queue could not take its descriptors");
        crate::decode_error::custom(format!("receiving a queue's descriptors: {error}"))
    })?;
    let ring = Ring::attach(fds.into_iter(), tag).map_err(crate::decode_error::custom)?;
    Ok(Queue {
        ring: Arc::new(ring),
        _item: PhantomData,
    })
}

/// Python's `SimpleQueue`: an unbounded [`Queue`] with just put, get and
/// close.
///
/// ```
/// use mp_ipc::queue::SimpleQueue;
///
/// let queue: SimpleQueue<[u8; 3]> = SimpleQueue::new()?;
/// queue.put([1u8, 2, 3])?;
/// assert_eq!(queue.get()?, [1, 2, 3]);
/// assert!(queue.is_empty());
/// # Ok::<(), mp_ipc::queue::QueueError>(())
/// ```
pub struct SimpleQueue<T> {
    queue: Queue<T>,
}

impl<T> Clone for SimpleQueue<T> {
    fn clone(&self) -> Self {
        SimpleQueue {
            queue: self.queue.clone(),
        }
    }
}

impl<T> fmt::Debug for SimpleQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimpleQueue")
            .field("len", &self.queue.len())
            .finish()
    }
}

impl<T: Serialize + DeserializeOwned> SimpleQueue<T> {
    /// Creates an empty queue.
    pub fn new() -> Result<Self, QueueError> {
        let queue = Queue::with_tag(Queue::<T>::builder(), type_tag::<SimpleQueue<T>>())?;
        Ok(SimpleQueue { queue })
    }

    /// Puts an item.
    pub fn put(&self, item: impl Borrow<T>) -> Result<(), QueueError> {
        self.queue.put(item)
    }

    /// Takes the next item, waiting for one.
    pub fn get(&self) -> Result<T, QueueError> {
        self.queue.get()
    }

    /// Takes the next item, waiting at most `timeout`.
    pub fn get_timeout(&self, timeout: Duration) -> Result<T, QueueError> {
        self.queue.get_timeout(timeout)
    }
}

impl<T> SimpleQueue<T> {
    /// Whether the queue is empty now (Python's `empty()`).
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Closes the queue (see [`Queue::close`]).
    pub fn close(&self) -> Result<(), QueueError> {
        self.queue.close()
    }
}

impl<T> Serialize for SimpleQueue<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.queue.serialize(serializer)
    }
}

impl<'de, T> Deserialize<'de> for SimpleQueue<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(SimpleQueue {
            queue: attach(deserializer, type_tag::<SimpleQueue<T>>())?,
        })
    }
}

/// Python's `JoinableQueue`: a [`Queue`] (all of its methods are available
/// through `Deref`) that counts unfinished tasks. Every item put is a task;
/// a consumer calls [`task_done`](Self::task_done) when it has processed one;
/// [`join`](Self::join) waits until every task is done.
///
/// ```
/// use mp_ipc::queue::JoinableQueue;
/// use std::time::Duration;
///
/// let tasks = JoinableQueue::unbounded()?;
/// tasks.put(21u64)?;
/// let worker = {
///     let tasks = tasks.clone();
///     std::thread::spawn(move || {
///         let n = tasks.get().unwrap();
///         assert_eq!(n * 2, 42);
///         tasks.task_done().unwrap();
///     })
/// };
/// tasks.join_timeout(Duration::from_secs(10))?;
/// worker.join().unwrap();
/// # Ok::<(), mp_ipc::queue::QueueError>(())
/// ```
///
/// An item lost with a consumer killed in the middle of a get is never
/// `task_done`; use [`join_timeout`](Self::join_timeout) when that can
/// happen. Items that could not be decoded count as done.
pub struct JoinableQueue<T> {
    queue: Queue<T>,
}

impl<T> Clone for JoinableQueue<T> {
    fn clone(&self) -> Self {
        JoinableQueue {
            queue: self.queue.clone(),
        }
    }
}

impl<T> fmt::Debug for JoinableQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinableQueue")
            .field("len", &self.queue.len())
            .field("unfinished_tasks", &self.unfinished_tasks())
            .finish()
    }
}

impl<T> Deref for JoinableQueue<T> {
    type Target = Queue<T>;
    fn deref(&self) -> &Queue<T> {
        &self.queue
    }
}

impl<T: Serialize + DeserializeOwned> JoinableQueue<T> {
    /// A joinable queue holding at most `maxsize` items.
    pub fn bounded(maxsize: usize) -> Result<Self, QueueError> {
        Self::from_builder(Queue::<T>::builder().maxsize(maxsize))
    }

    /// A joinable queue with no item limit.
    pub fn unbounded() -> Result<Self, QueueError> {
        Self::from_builder(Queue::<T>::builder())
    }

    /// A joinable queue with the options of `builder`.
    pub fn from_builder(builder: QueueBuilder<T>) -> Result<Self, QueueError> {
        Ok(JoinableQueue {
            queue: Queue::with_tag(builder, type_tag::<JoinableQueue<T>>())?,
        })
    }

    /// Takes the next item (see [`Queue::get`]); an item that fails to
    /// decode is counted as done.
    pub fn get(&self) -> Result<T, QueueError> {
        self.count_undecodable(self.queue.get())
    }

    /// See [`Queue::try_get`].
    pub fn try_get(&self) -> Result<T, QueueError> {
        self.count_undecodable(self.queue.try_get())
    }

    /// See [`Queue::get_timeout`].
    pub fn get_timeout(&self, timeout: Duration) -> Result<T, QueueError> {
        self.count_undecodable(self.queue.get_timeout(timeout))
    }

    fn count_undecodable(&self, result: Result<T, QueueError>) -> Result<T, QueueError> {
        if let Err(QueueError::Decode(_)) = &result {
            let _ = self.task_done();
        }
        result
    }
}

impl<T> JoinableQueue<T> {
    /// Items put and not yet marked done (a snapshot).
    pub fn unfinished_tasks(&self) -> usize {
        let put = self.queue.ring.indices().tail().items();
        put.wrapping_sub(self.queue.ring.tasks().done.load(SeqCst)) as usize
    }

    /// Marks one task done; wakes the joiners when none is left.
    pub fn task_done(&self) -> Result<(), QueueError> {
        let tasks = self.queue.ring.tasks();
        let mut done = tasks.done.load(SeqCst);
        loop {
            let put = self.queue.ring.indices().tail().items();
            if put.wrapping_sub(done) == 0 {
                return Err(QueueError::TaskDoneTooMany);
            }
            match tasks
                .done
                .compare_exchange(done, done.wrapping_add(1), SeqCst, SeqCst)
            {
                Ok(_) => {
                    if put.wrapping_sub(done) == 1 {
                        tasks.seq.fetch_add(1, SeqCst);
                        futex::wake_all(&tasks.seq);
                    }
                    return Ok(());
                }
                Err(now) => done = now,
            }
        }
    }

    /// Waits until every item put has been marked done.
    pub fn join(&self) -> Result<(), QueueError> {
        self.join_until(None)
    }

    /// Like [`join`](Self::join), giving up after `timeout` ([`QueueError::Timeout`]).
    pub fn join_timeout(&self, timeout: Duration) -> Result<(), QueueError> {
        self.join_until(Instant::now().checked_add(timeout))
    }

    fn join_until(&self, deadline: Option<Instant>) -> Result<(), QueueError> {
        let tasks = self.queue.ring.tasks();
        loop {
            let seq = tasks.seq.load(SeqCst);
            std::sync::atomic::fence(SeqCst);
            if self.unfinished_tasks() == 0 {
                return Ok(());
            }
            if futex::wait(&tasks.seq, seq, deadline) == WaitOutcome::TimedOut
                && self.unfinished_tasks() != 0
            {
                return Err(QueueError::Timeout);
            }
        }
    }
}

impl<T> Serialize for JoinableQueue<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.queue.serialize(serializer)
    }
}

impl<'de, T> Deserialize<'de> for JoinableQueue<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(JoinableQueue {
            queue: attach(deserializer, type_tag::<JoinableQueue<T>>())?,
        })
    }
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
        let as_u16: Queue<u16> = Queue {
            ring: Arc::clone(&queue.ring),
            _item: PhantomData,
        };
        assert!(matches!(as_u16.get(), Err(QueueError::Decode(_))));
        assert_eq!(queue.get().unwrap(), "ok");
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
    fn type_tags_differ_between_types_and_kinds() {
        assert_ne!(type_tag::<Queue<u8>>(), type_tag::<Queue<u16>>());
        assert_ne!(type_tag::<Queue<u8>>(), type_tag::<JoinableQueue<u8>>());
        assert_eq!(type_tag::<Queue<u8>>(), type_tag::<Queue<u8>>());
    }
}
