//! Message pipes between processes: [`Pipe`] and its two [`Connection`]s,
//! and [`wait`] over many connections and process sentinels (Python's
//! `multiprocessing.Pipe` and `multiprocessing.connection.wait`).
//!
//! ```
//! use mp_core::Process;
//! use mp_ipc::connection::{Connection, Pipe};
//!
//! let (here, there) = Pipe::duplex()?;
//! let child = Process::new(|conn: Connection| {
//!     let n: u64 = conn.recv().unwrap();
//!     conn.send(n * 2).unwrap();
//! })
//! .args(there)
//! .start()?;
//! here.send(21u64)?;
//! assert_eq!(here.recv::<u64>()?, 42);
//! child.join()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Each direction is a shared-memory ring (see the `ring` module): messages
//! keep their boundaries, any serde value travels with `send`/`recv`
//! (postcard), raw bytes with `send_bytes`/`recv_bytes`. Messages larger
//! than a quarter of the ring (8 MiB by default, so 2 MiB) travel out of
//! band, in their own pages of the same memory file: sending one never waits
//! for the reader, so two processes sending each other huge messages at once
//! do not deadlock. (Like an OS pipe, a flood of small messages that nobody
//! reads fills the ring, and then `send` waits.)
//!
//! **Handles inside messages.** A [`Connection`], a
//! [`Queue`](crate::queue::Queue), a [`Lock`](crate::Lock) or any other
//! primitive inside a sent value arrives as the same object (`conn.send((&other, &queue))`, as Python's `conn.send(other)`):
//!
//! ```
//! use mp_ipc::connection::{Connection, Pipe};
//!
//! let (a, b) = Pipe::duplex()?;
//! let (near, far) = Pipe::duplex()?;
//! a.send(("take this", &far))?;
//! let (_, far): (String, Connection) = b.recv()?;
//! far.send(7u8)?;
//! assert_eq!(near.recv::<u8>()?, 7);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! **End of the line.** Every handle of an end holds the write end of a
//! *presence pipe* (a writer: the sending end of a *presence socket*, on which
//! the descriptors of handles inside messages also travel) that nobody
//! writes to; the other end watches the read end.
//! When the last descriptor of the write end closes — in whichever process,
//! also when the process is killed, and not while a message carrying a
//! handle is in flight — the kernel reports a hang-up on the read end, which
//! a per-process watcher thread turns into a wake-up of the blocked reader
//! (or of a writer blocked on a full ring): once the ring is drained, `recv`
//! returns [`ConnectionError::Closed`] instead of waiting forever. Nothing
//! is polled and nothing reads `/proc` (see the `liveness` module and
//! `TRANSPORT.md`).
//!
//! **Waiting from an event loop.** A readable `Connection` is
//! [`AsFd`]: its descriptor (an eventfd) becomes readable
//! when a message arrives after a [`poll`](Connection::poll) that returned
//! `false` (that `poll` arms it), when the other end is gone, or when the
//! connection is closed. With tokio's `AsyncFd`:
//!
//! ```
//! use std::time::Duration;
//! use mp_ipc::connection::Pipe;
//! use tokio::io::unix::AsyncFd;
//!
//! let (reader, writer) = Pipe::simplex()?;
//! let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
//! let message: String = runtime.block_on(async {
//!     let ready = AsyncFd::new(reader.clone())?; // registers the descriptor
//!     let sender = std::thread::spawn(move || writer.send("hello"));
//!     let message = loop {
//!         if reader.poll(Some(Duration::ZERO))? {
//!             break reader.recv()?;
//!         }
//!         // `poll` found nothing and armed the descriptor: sleep until it fires.
//!         ready.readable().await?.clear_ready();
//!     };
//!     sender.join().unwrap()?;
//!     Ok::<_, Box<dyn std::error::Error>>(message)
//! })?;
//! assert_eq!(message, "hello");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! (The same loop with a plain `epoll` is tested in this module.)

use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::decode_error::CodecError;
use crate::liveness::{Presence, Watch, presence_pipe, presence_socket};
use crate::message_handles;
use crate::ring::{
    DEFAULT_CAPACITY, Liveness, Payload, Postcard, RawBytes, Ring, RingConfig, RingError, Wait,
};
use crate::shm::ShmError;
use crate::transport::{self, Ticket};

/// The type tag of connection rings (see `Ring::attach`).
const CONNECTION_TAG: u64 = u64::from_le_bytes(*b"mp-conn1");

/// What can go wrong on a connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectionError {
    /// Every handle of the other end is gone (dropped, or its process died)
    /// and nothing is left to read — Python's `EOFError` on `recv`,
    /// `BrokenPipeError` on `send`.
    #[error("the other end of the connection is closed")]
    Closed,
    /// A `*_timeout` call gave up.
    #[error("timed out")]
    Timeout,
    /// `recv_bytes_into`: the message does not fit; it was consumed and is
    /// returned here whole (Python's `BufferTooShort`), the stream stays aligned.
    #[error("a message of {} bytes does not fit the buffer", message.len())]
    BufferTooShort {
        /// The whole message.
        message: Vec<u8>,
    },
    /// The value could not be encoded (nothing was sent): its type, postcard's error and
    /// the cause the value gave.
    #[error("could not encode the message: {0}")]
    Encode(#[source] CodecError),
    /// The message could not be decoded as the requested type; it was
    /// consumed (later messages are unaffected).
    #[error("could not decode the message (it was consumed): {0}")]
    Decode(#[source] CodecError),
    /// `recv`/`poll` on the write-only end of a simplex pipe.
    #[error("this end of the pipe is write-only")]
    NotReadable,
    /// `send` on the read-only end of a simplex pipe.
    #[error("this end of the pipe is read-only")]
    NotWritable,
    /// The calling thread is already inside a send (or recv) on this
    /// connection, e.g. from a value's `Serialize` implementation.
    #[error("the calling thread is already inside a send or recv on this connection")]
    Reentrant,
    /// The connection's shared memory does not hold what it should.
    #[error("the connection's shared memory is corrupted: {0}")]
    Corrupted(String),
    /// The message contains a handle but is not being carried by a
    /// connection that can pass its descriptors (nothing was sent). Every
    /// handle of this crate travels inside [`send`](Connection::send)'s
    /// messages; a handle nested in another transport is passed as a process
    /// argument.
    #[error(
        "the message contains a handle that cannot travel inside a message; pass it as a process argument"
    )]
    HandleInMessage,
    /// A [`Listener`](crate::listener::Listener) or
    /// [`Client`](crate::listener::Client) handshake failed: wrong or missing
    /// authkey, or a peer that does not speak the protocol (Python's
    /// `AuthenticationError`).
    #[error("authentication failed: {0}")]
    Authentication(String),
    /// A handle received from another process is not a connection.
    #[error("received handle does not match: {0}")]
    Incompatible(String),
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Creating or attaching the shared memory failed.
    #[error(transparent)]
    Shm(#[from] ShmError),
}

impl From<RingError> for ConnectionError {
    fn from(error: RingError) -> Self {
        match error {
            RingError::Closed => ConnectionError::Closed,
            // A connection never uses `try_` waits on the ring.
            RingError::Full | RingError::Empty | RingError::Timeout => ConnectionError::Timeout,
            RingError::Encode(e) => ConnectionError::Encode(CodecError::untyped(e)),
            RingError::Corrupted(what) => ConnectionError::Corrupted(what),
            RingError::Incompatible(what) => ConnectionError::Incompatible(what),
            RingError::Reentrant => ConnectionError::Reentrant,
            RingError::HandleInItem => ConnectionError::HandleInMessage,
            // Every reader is gone (seen when passing a handle's descriptors).
            RingError::Io { source, .. } if source.kind() == io::ErrorKind::BrokenPipe => {
                ConnectionError::Closed
            }
            RingError::Io { op, source } => ConnectionError::Io { op, source },
        }
    }
}

fn io_error(op: &'static str) -> impl FnOnce(io::Error) -> ConnectionError {
    move |source| ConnectionError::Io { op, source }
}

/// Creates pipes: `Pipe::duplex()`, `Pipe::simplex()`, or with options
/// `Pipe::builder().capacity_bytes(1 << 20).duplex()`.
#[derive(Clone, Debug)]
#[must_use = "a builder does nothing until .duplex() or .simplex()"]
pub struct Pipe {
    capacity_bytes: usize,
}

impl Pipe {
    /// Options for a new pipe.
    pub fn builder() -> Pipe {
        Pipe {
            capacity_bytes: DEFAULT_CAPACITY,
        }
    }

    /// Size of each direction's ring in bytes (rounded up to a power of two
    /// between 4 KiB and 2 GiB; default 8 MiB of address space, faulted in as
    /// used). Messages over a quarter of it travel out of band.
    pub fn capacity_bytes(mut self, bytes: usize) -> Pipe {
        self.capacity_bytes = bytes;
        self
    }

    /// A two-way pipe (Python's `Pipe()`): both connections send and receive.
    pub fn duplex() -> Result<(Connection, Connection), ConnectionError> {
        Pipe::builder().build_duplex()
    }

    /// A one-way pipe (Python's `Pipe(duplex=False)`): returns `(reader, writer)`.
    pub fn simplex() -> Result<(Connection, Connection), ConnectionError> {
        Pipe::builder().build_simplex()
    }

    /// [`Pipe::duplex`] with these options.
    pub fn build_duplex(self) -> Result<(Connection, Connection), ConnectionError> {
        let (a_to_b_reader, a_to_b_writer) = self.direction()?;
        let (b_to_a_reader, b_to_a_writer) = self.direction()?;
        Ok((
            Connection::new(Some(a_to_b_writer), Some(b_to_a_reader)),
            Connection::new(Some(b_to_a_writer), Some(a_to_b_reader)),
        ))
    }

    /// [`Pipe::simplex`] with these options.
    pub fn build_simplex(self) -> Result<(Connection, Connection), ConnectionError> {
        let (reader, writer) = self.direction()?;
        Ok((
            Connection::new(None, Some(reader)),
            Connection::new(Some(writer), None),
        ))
    }

    /// One direction: a ring, the two presence pipes, and the (reader,
    /// writer) endpoints on them.
    fn direction(&self) -> Result<(Endpoint, Endpoint), ConnectionError> {
        let ring = Arc::new(Ring::create(RingConfig {
            capacity: self.capacity_bytes,
            max_items: None,
            type_tag: CONNECTION_TAG,
            doorbell: true,
        })?);
        let (watch_readers, readers_present) =
            presence_pipe().map_err(io_error("creating a presence pipe"))?;
        let (watch_writers, writers_present) =
            presence_socket().map_err(io_error("creating a presence socket"))?;
        Ok((
            Endpoint::new(
                Arc::clone(&ring),
                Side::Reader,
                readers_present,
                watch_writers,
            )?,
            Endpoint::new(ring, Side::Writer, writers_present, watch_readers)?,
        ))
    }
}

/// Which end of a direction an endpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Reader,
    Writer,
}

/// One end of one direction, in this process: the ring, this end's presence
/// (held, never written), and the watch on the other end's presence.
struct Endpoint {
    ring: Arc<Ring>,
    /// The write end of this end's presence pipe (of a writer: the sending
    /// end of its presence socket): held for as long as this process has a
    /// handle of this end.
    presence: Presence,
    /// The read end of the other end's presence pipe.
    peer: Watch,
}

impl Endpoint {
    fn new(
        ring: Arc<Ring>,
        side: Side,
        presence: OwnedFd,
        peer: OwnedFd,
    ) -> Result<Endpoint, ConnectionError> {
        // What the other end's death wakes: our sleepers on the ring, and
        // whoever polls the doorbell.
        let woken = Arc::clone(&ring);
        let peer = Watch::new(peer, move || match side {
            Side::Reader => {
                woken.indices().wake_consumers();
                woken.ring_doorbell();
            }
            Side::Writer => woken.indices().wake_producers(),
        })
        .map_err(io_error("watching the other end"))?;
        Ok(Endpoint {
            ring,
            presence: Presence::new(presence),
            peer,
        })
    }

    /// Descriptors that travel: presence, watch, then the ring's.
    fn descriptors(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = vec![self.presence.as_fd(), self.peer.fd()];
        fds.extend(self.ring.descriptors());
        fds
    }
}

impl Liveness for Endpoint {
    #[inline]
    fn peer_gone(&self) -> bool {
        self.peer.gone()
    }

    fn before_sleep(&self) {
        if let Err(error) = self.peer.ensure_watched() {
            // Without a watcher, look now; a death later is then not noticed
            // by a sleeper (only with the descriptor table full).
            tracing::warn!(%error, "cannot watch the other end of a connection");
            self.peer.check_now();
        }
    }
}

/// One end of a [`Pipe`] (Python's `multiprocessing.connection.Connection`).
///
/// Clones, and copies received by child processes, are handles to the same
/// end; several may send (or receive) at once without ever interleaving
/// messages. The end closes when its last handle in the last process is
/// dropped (or [`close`](Self::close)d).
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Ends>,
}

struct Ends {
    tx: Option<Endpoint>,
    rx: Option<Endpoint>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("readable", &self.inner.rx.is_some())
            .field("writable", &self.inner.tx.is_some())
            .finish()
    }
}

impl Connection {
    fn new(tx: Option<Endpoint>, rx: Option<Endpoint>) -> Connection {
        Connection {
            inner: Arc::new(Ends { tx, rx }),
        }
    }

    fn tx(&self) -> Result<&Endpoint, ConnectionError> {
        self.inner.tx.as_ref().ok_or(ConnectionError::NotWritable)
    }

    fn rx(&self) -> Result<&Endpoint, ConnectionError> {
        self.inner.rx.as_ref().ok_or(ConnectionError::NotReadable)
    }

    /// Whether this end can receive.
    pub fn readable(&self) -> bool {
        self.inner.rx.is_some()
    }

    /// Whether this end can send.
    pub fn writable(&self) -> bool {
        self.inner.tx.is_some()
    }

    /// Sends a value (any serde type, encoded with postcard). Accepts values
    /// and references: `send(42)`, `send(&data)`.
    ///
    /// Handles inside the value (a [`Connection`], a
    /// [`Queue`](crate::queue::Queue), a [`SharedMemory`](crate::SharedMemory)
    /// and what lives in it...) arrive as the same objects, like
    /// Python's `conn.send(other_conn)`: their descriptors travel beside the
    /// message (see [`transport_design`](crate::transport_design)), and are
    /// closed by the kernel if the message is never received.
    pub fn send(&self, value: impl Serialize) -> Result<(), ConnectionError> {
        match self.send_encoded(&Postcard(&value)) {
            Err(ConnectionError::Encode(error)) => Err(ConnectionError::Encode(
                CodecError::encoding(&value, error.into_postcard_error()),
            )),
            sent => sent,
        }
    }

    /// Sends `bytes` as one message.
    pub fn send_bytes(&self, bytes: &[u8]) -> Result<(), ConnectionError> {
        self.send_encoded(&RawBytes(bytes))
    }

    fn send_encoded(&self, message: &dyn crate::ring::Encode) -> Result<(), ConnectionError> {
        let tx = self.tx()?;
        if tx.peer.gone() {
            return Err(ConnectionError::Closed);
        }
        // Handles inside the message send their descriptors on the writers'
        // presence socket (see `message_handles`).
        tx.ring
            .push_carried(message, tx.presence.as_fd(), Wait::Forever, Some(tx))?;
        Ok(())
    }

    /// Receives the next message as a `T`, waiting for it.
    pub fn recv<T: DeserializeOwned>(&self) -> Result<T, ConnectionError> {
        self.recv_value(Wait::Forever)
    }

    /// Like [`recv`](Self::recv), giving up after `timeout` ([`ConnectionError::Timeout`]).
    pub fn recv_timeout<T: DeserializeOwned>(
        &self,
        timeout: Duration,
    ) -> Result<T, ConnectionError> {
        self.recv_value(Wait::timeout(timeout))
    }

    /// Receives and decodes a value; handles inside it take their
    /// descriptors from the writers' presence socket (see `message_handles`).
    fn recv_value<T: DeserializeOwned>(&self, wait: Wait) -> Result<T, ConnectionError> {
        let rx = self.rx()?;
        rx.ring.pop(wait, Some(rx), |payload| {
            message_handles::receiving(rx.peer.fd(), || decode::<T>(payload))
        })?
    }

    /// Receives the next message as bytes, waiting for it.
    pub fn recv_bytes(&self) -> Result<Vec<u8>, ConnectionError> {
        self.recv_with(Wait::Forever, |payload| {
            payload.to_vec().map_err(io_error("reading a message"))
        })?
    }

    /// Like [`recv_bytes`](Self::recv_bytes), giving up after `timeout`.
    pub fn recv_bytes_timeout(&self, timeout: Duration) -> Result<Vec<u8>, ConnectionError> {
        self.recv_with(Wait::timeout(timeout), |payload| {
            payload.to_vec().map_err(io_error("reading a message"))
        })?
    }

    /// Receives the next message into the start of `buf`, returning its
    /// length. A message longer than `buf` is consumed and returned whole in
    /// [`ConnectionError::BufferTooShort`] (the stream stays aligned).
    pub fn recv_bytes_into(&self, buf: &mut [u8]) -> Result<usize, ConnectionError> {
        self.recv_with(Wait::Forever, |payload| read_into(payload, buf))?
    }

    /// Like [`recv_bytes_into`](Self::recv_bytes_into), giving up after `timeout`.
    pub fn recv_bytes_into_timeout(
        &self,
        buf: &mut [u8],
        timeout: Duration,
    ) -> Result<usize, ConnectionError> {
        self.recv_with(Wait::timeout(timeout), |payload| read_into(payload, buf))?
    }

    fn recv_with<R>(
        &self,
        wait: Wait,
        read: impl FnOnce(Payload<'_>) -> R,
    ) -> Result<R, ConnectionError> {
        let rx = self.rx()?;
        Ok(rx.ring.pop(wait, Some(rx), read)?)
    }

    /// Whether a message (or the end of the stream) is ready to be received,
    /// waiting up to `timeout` for one (`None`: as long as it takes; zero:
    /// just look). Python's `poll`.
    pub fn poll(&self, timeout: Option<Duration>) -> Result<bool, ConnectionError> {
        let rx = self.rx()?;
        let deadline = timeout.map(|t| Instant::now().checked_add(t).unwrap_or_else(far_future));
        Ok(rx.ring.wait_readable(deadline, Some(rx)))
    }

    /// Closes this handle (dropping it does the same). The peer sees
    /// [`ConnectionError::Closed`] once every handle of this end, in every
    /// process, is gone.
    pub fn close(self) {
        drop(self);
    }

    /// Whether `recv` would return at once (a message, or the end).
    fn ready(rx: &Endpoint) -> bool {
        rx.ring.has_data() || rx.ring.indices().is_closed() || rx.peer.gone()
    }
}

impl AsRawFd for Connection {
    /// See [`AsFd`] (for tokio's `AsyncFd`, which takes `AsRawFd`).
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

impl AsFd for Connection {
    /// For a readable end: an eventfd that becomes readable when a message
    /// arrives after a [`poll`](Connection::poll) that returned `false` (which
    /// arms it), when the other end is gone, or when the connection closes.
    /// Register it with epoll, mio or tokio's `AsyncFd`, and after each
    /// readiness call `poll(Some(Duration::ZERO))` (see the module docs).
    ///
    /// For a write-only end: a descriptor that reports a hang-up once no
    /// reader is left.
    fn as_fd(&self) -> BorrowedFd<'_> {
        match (&self.inner.rx, &self.inner.tx) {
            (Some(rx), _) => rx
                .ring
                .doorbell()
                .expect("connection rings have a doorbell"),
            (None, Some(tx)) => tx.peer.fd(),
            (None, None) => unreachable!("a connection has at least one direction"),
        }
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

fn decode<T: DeserializeOwned>(payload: Payload<'_>) -> Result<T, ConnectionError> {
    let bytes = payload
        .contiguous()
        .map_err(io_error("reading a message"))?;
    match postcard::take_from_bytes::<T>(&bytes) {
        Ok((value, [])) => Ok(value),
        Ok(_) => Err(ConnectionError::Decode(CodecError::decoding::<T>(
            &bytes,
            postcard::Error::DeserializeBadEncoding,
        ))),
        Err(error) => Err(ConnectionError::Decode(CodecError::decoding::<T>(
            &bytes, error,
        ))),
    }
}

fn read_into(payload: Payload<'_>, buf: &mut [u8]) -> Result<usize, ConnectionError> {
    let len = payload.len();
    match buf.get_mut(..len) {
        Some(dst) => {
            payload
                .read_into(dst)
                .map_err(io_error("reading a message"))?;
            Ok(len)
        }
        None => Err(ConnectionError::BufferTooShort {
            message: payload.to_vec().map_err(io_error("reading a message"))?,
        }),
    }
}

/// Something [`wait`] can wait for.
#[derive(Clone, Copy, Debug)]
pub enum Waitable<'a> {
    /// Ready when [`Connection::poll`] would say so.
    Connection(&'a Connection),
    /// A queue: ready when it has an item or is closed (`Waitable::from(&queue)`).
    Queue(QueueReadiness<'a>),
    /// Ready when the descriptor is readable, e.g. a process sentinel
    /// (`mp_core::Child::sentinel`, a pidfd: readable once the child ended).
    Fd(BorrowedFd<'a>),
}

/// The part of a [`Queue`](crate::queue::Queue) that [`wait`] looks at (from
/// `Waitable::from(&queue)`).
#[derive(Clone, Copy)]
pub struct QueueReadiness<'a> {
    pub(crate) ring: &'a Ring,
}

impl fmt::Debug for QueueReadiness<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueReadiness")
            .field("len", &self.ring.len())
            .finish()
    }
}

impl<'a> From<&'a Connection> for Waitable<'a> {
    fn from(connection: &'a Connection) -> Self {
        Waitable::Connection(connection)
    }
}

impl<'a> From<BorrowedFd<'a>> for Waitable<'a> {
    fn from(fd: BorrowedFd<'a>) -> Self {
        Waitable::Fd(fd)
    }
}

/// What `wait` watches for one object.
enum Source<'a> {
    /// A connection's readable end: its doorbell, and its watch on the writers.
    Connection(&'a Endpoint),
    /// A queue's ring: its doorbell.
    Queue(&'a Ring),
    Fd(BorrowedFd<'a>),
}

impl Source<'_> {
    /// Drains and arms the doorbell, then looks: a publish after the look rings.
    fn arm_and_look(&self) -> bool {
        match self {
            Source::Connection(rx) => {
                rx.ring.drain_doorbell();
                rx.ring.arm_doorbell();
                Connection::ready(rx)
            }
            Source::Queue(ring) => {
                ring.drain_doorbell();
                ring.arm_doorbell();
                ring.has_data() || ring.indices().is_closed()
            }
            Source::Fd(_) => false,
        }
    }
}

/// Waits until at least one of `objects` is ready, or `timeout` passes
/// (`None`: no limit); returns the indices of the ready ones (empty on
/// timeout). Python's `multiprocessing.connection.wait`.
///
/// It sleeps in one `poll` over every object's descriptor: a connection's or
/// a queue's doorbell, a connection's watch on the other end, a process
/// sentinel's pidfd. Any number of objects; nothing is looked at again until
/// the kernel reports an event. (Two threads waiting on the same object at
/// once may see an item late: the doorbell is drained by whoever wakes first.)
pub fn wait(
    objects: &[Waitable<'_>],
    timeout: Option<Duration>,
) -> Result<Vec<usize>, ConnectionError> {
    use rustix::event::{PollFd, PollFlags};
    let deadline = timeout.map(|t| Instant::now().checked_add(t).unwrap_or_else(far_future));
    let sources = objects
        .iter()
        .map(|object| match object {
            Waitable::Connection(connection) => connection.rx().map(Source::Connection),
            Waitable::Queue(queue) => Ok(Source::Queue(queue.ring)),
            Waitable::Fd(fd) => Ok(Source::Fd(*fd)),
        })
        .collect::<Result<Vec<Source<'_>>, _>>()?;
    loop {
        let mut ready: Vec<usize> = (0..sources.len())
            .filter(|&index| sources[index].arm_and_look())
            .collect();
        let mut fds = Vec::with_capacity(2 * sources.len());
        for source in &sources {
            match source {
                Source::Connection(rx) => {
                    fds.push(PollFd::from_borrowed_fd(doorbell(&rx.ring)?, PollFlags::IN));
                    fds.push(PollFd::from_borrowed_fd(rx.peer.fd(), PollFlags::empty()));
                }
                Source::Queue(ring) => {
                    fds.push(PollFd::from_borrowed_fd(doorbell(ring)?, PollFlags::IN));
                }
                Source::Fd(fd) => fds.push(PollFd::from_borrowed_fd(*fd, PollFlags::IN)),
            }
        }
        let wait_until = if ready.is_empty() {
            deadline
        } else {
            Some(Instant::now()) // just collect the descriptors ready too
        };
        poll_until(&mut fds, wait_until)?;
        let mut slot = 0;
        for (index, source) in sources.iter().enumerate() {
            let now_ready = match source {
                Source::Connection(rx) => {
                    if !fds[slot + 1].revents().is_empty() {
                        rx.peer.mark_gone();
                    }
                    slot += 2;
                    Connection::ready(rx)
                }
                Source::Queue(ring) => {
                    slot += 1;
                    ring.has_data() || ring.indices().is_closed()
                }
                Source::Fd(_) => {
                    slot += 1;
                    !fds[slot - 1].revents().is_empty()
                }
            };
            if now_ready && !ready.contains(&index) {
                ready.push(index);
            }
        }
        if !ready.is_empty() || deadline.is_some_and(|d| Instant::now() >= d) {
            ready.sort_unstable();
            return Ok(ready);
        }
    }
}

/// The doorbell `wait` polls for `ring`.
fn doorbell(ring: &Ring) -> Result<BorrowedFd<'_>, ConnectionError> {
    ring.doorbell().ok_or_else(|| {
        ConnectionError::Incompatible("a ring without a doorbell cannot be waited on".into())
    })
}

/// `poll` until an event or `deadline` (`None`: no limit), retrying on EINTR
/// with the time that is left.
fn poll_until(
    fds: &mut [rustix::event::PollFd<'_>],
    deadline: Option<Instant>,
) -> Result<(), ConnectionError> {
    loop {
        let timeout = deadline.map(|d| {
            let left = d.saturating_duration_since(Instant::now());
            rustix::event::Timespec {
                tv_sec: left.as_secs().try_into().unwrap_or(i64::MAX),
                tv_nsec: left.subsec_nanos().into(),
            }
        });
        match rustix::event::poll(fds, timeout.as_ref()) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Ok(());
                }
            }
            Err(errno) => {
                return Err(ConnectionError::Io {
                    op: "poll",
                    source: errno.into(),
                });
            }
        }
    }
}

/// How a connection travels: for each direction it can use, a ticket for
/// the endpoint's descriptors (see [`Endpoint::descriptors`]).
#[derive(Serialize, Deserialize)]
struct Wire {
    tx: Option<Ticket>,
    rx: Option<Ticket>,
}

fn lend<E: serde::ser::Error>(endpoint: &Option<Endpoint>) -> Result<Option<Ticket>, E> {
    endpoint
        .as_ref()
        .map(|e| transport::lend(&e.descriptors()))
        .transpose()
        .map_err(|e| {
            crate::decode_error::custom_encode(format!("lending a connection's descriptors: {e}"))
        })
}

impl Serialize for Connection {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if mp_core::finding_encode_cause() {
            // A second pass that only looks for why an encoding failed: lend nothing.
            return serializer.serialize_unit();
        }
        Wire {
            tx: lend(&self.inner.tx)?,
            rx: lend(&self.inner.rx)?,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Connection {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if mp_core::replaying_decode() {
            // A second reading that only looks for why a decode failed: claim nothing.
            return Err(mp_core::abandon_replay());
        }
        let wire = Wire::deserialize(deserializer)?;
        let attach =
            |ticket: Option<Ticket>, side: Side| -> Result<Option<Endpoint>, ConnectionError> {
                let Some(ticket) = ticket else {
                    return Ok(None);
                };
                let mut fds = transport::claim(ticket)
                    .map_err(io_error("receiving a connection's descriptors"))?
                    .into_iter();
                let (Some(presence), Some(peer)) = (fds.next(), fds.next()) else {
                    return Err(ConnectionError::Incompatible("too few descriptors".into()));
                };
                let ring = Arc::new(Ring::attach(fds, CONNECTION_TAG)?);
                if ring.doorbell().is_none() {
                    return Err(ConnectionError::Incompatible(
                        "a ring without a doorbell".into(),
                    ));
                }
                Endpoint::new(ring, side, presence, peer).map(Some)
            };
        let tx = attach(wire.tx, Side::Writer).map_err(crate::decode_error::custom)?;
        let rx = attach(wire.rx, Side::Reader).map_err(crate::decode_error::custom)?;
        Ok(Connection::new(tx, rx))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    /// A value whose `Serialize` refuses, with a message of its own.
    struct Refuses;

    impl Serialize for Refuses {
        fn serialize<S: Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("this one stays here"))
        }
    }

    #[test]
    fn codec_failures_name_the_type_and_the_reason_and_the_pipe_goes_on() {
        let (a, b) = Pipe::duplex().unwrap();
        match a.send((1u8, Refuses)) {
            Err(ConnectionError::Encode(error)) => {
                assert!(error.type_name().contains("Refuses"), "{error}");
                assert_eq!(error.cause(), Some("this one stays here"));
            }
            other => panic!("expected an encode error, got {other:?}"),
        }
        a.send(7u8).unwrap();
        match b.recv::<bool>() {
            Err(ConnectionError::Decode(error)) => {
                assert_eq!(error.type_name(), "bool");
                assert!(std::error::Error::source(&error).is_some());
            }
            other => panic!("expected a decode error, got {other:?}"),
        }
        a.send(7u8).unwrap();
        assert_eq!(b.recv::<u8>().unwrap(), 7);
    }

    #[test]
    fn the_descriptor_wakes_an_epoll_loop_for_a_message_and_for_the_end() {
        use rustix::event::epoll;
        let (reader, writer) = Pipe::simplex().unwrap();
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).unwrap();
        epoll::add(
            &epoll,
            &reader,
            epoll::EventData::new_u64(1),
            epoll::EventFlags::IN | epoll::EventFlags::ET,
        )
        .unwrap();
        let wait_event = || {
            let mut events: Vec<epoll::Event> = Vec::with_capacity(4);
            let timeout = rustix::event::Timespec {
                tv_sec: 10,
                tv_nsec: 0,
            };
            epoll::wait(
                &epoll,
                rustix::buffer::spare_capacity(&mut events),
                Some(&timeout),
            )
            .unwrap()
        };
        // The loop of the module docs: poll (arms), else sleep in epoll.
        assert!(!reader.poll(Some(Duration::ZERO)).unwrap());
        let sender = std::thread::spawn(move || {
            writer.send(7u8).unwrap();
            writer
        });
        let mut got = None;
        while got.is_none() {
            if reader.poll(Some(Duration::ZERO)).unwrap() {
                got = Some(reader.recv::<u8>().unwrap());
            } else {
                assert_eq!(wait_event(), 1, "epoll timed out before the message");
            }
        }
        assert_eq!(got, Some(7));
        let writer = sender.join().unwrap();
        assert!(!reader.poll(Some(Duration::ZERO)).unwrap());
        drop(writer);
        // The end of the stream makes the descriptor readable too.
        while !reader.poll(Some(Duration::ZERO)).unwrap() {
            assert_eq!(wait_event(), 1, "epoll timed out before the end");
        }
        assert!(matches!(
            reader.recv_timeout::<u8>(Duration::from_secs(10)),
            Err(ConnectionError::Closed)
        ));
    }

    #[test]
    fn duplex_both_ways_and_boundaries() {
        let (a, b) = Pipe::duplex().unwrap();
        a.send("hello").unwrap();
        a.send_bytes(b"").unwrap();
        a.send_bytes(&[7; 100]).unwrap();
        b.send(vec![1u32, 2, 3]).unwrap();
        assert_eq!(b.recv::<String>().unwrap(), "hello");
        assert_eq!(b.recv_bytes().unwrap(), b"");
        assert_eq!(b.recv_bytes().unwrap(), [7; 100]);
        assert_eq!(a.recv::<Vec<u32>>().unwrap(), [1, 2, 3]);
        assert!(!a.poll(Some(Duration::ZERO)).unwrap());
    }

    #[test]
    fn simplex_ends_are_one_way() {
        let (reader, writer) = Pipe::simplex().unwrap();
        assert!(matches!(
            reader.send(1u8),
            Err(ConnectionError::NotWritable)
        ));
        assert!(matches!(
            writer.recv::<u8>(),
            Err(ConnectionError::NotReadable)
        ));
        writer.send(1u8).unwrap();
        assert_eq!(reader.recv::<u8>().unwrap(), 1);
    }

    #[test]
    fn buffer_too_short_returns_the_message_and_keeps_alignment() {
        let (reader, writer) = Pipe::simplex().unwrap();
        writer.send_bytes(b"0123456789").unwrap();
        writer.send_bytes(b"ok").unwrap();
        let mut buf = [0u8; 4];
        match reader.recv_bytes_into(&mut buf) {
            Err(ConnectionError::BufferTooShort { message }) => assert_eq!(message, b"0123456789"),
            other => panic!("{other:?}"),
        }
        assert_eq!(reader.recv_bytes_into(&mut buf).unwrap(), 2);
        assert_eq!(&buf[..2], b"ok");
    }

    #[test]
    fn dropping_the_writer_closes_the_reader_after_draining() {
        let (reader, writer) = Pipe::simplex().unwrap();
        writer.send(5u8).unwrap();
        let clone = writer.clone();
        drop(writer);
        clone.send(6u8).unwrap();
        drop(clone);
        assert_eq!(reader.recv::<u8>().unwrap(), 5);
        assert_eq!(reader.recv::<u8>().unwrap(), 6);
        assert!(matches!(
            reader.recv_timeout::<u8>(Duration::from_secs(10)),
            Err(ConnectionError::Closed)
        ));
        assert!(reader.poll(Some(Duration::ZERO)).unwrap(), "EOF is ready");
    }

    /// Waits until a thread sleeps for data on `connection`'s ring.
    fn until_a_reader_sleeps(connection: &Connection) {
        let indices = connection.inner.rx.as_ref().unwrap().ring.indices();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !indices.consumer_sleeping() {
            assert!(Instant::now() < deadline, "the reader never went to sleep");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_blocked_reader_wakes_when_the_writer_is_dropped() {
        let (reader, writer) = Pipe::simplex().unwrap();
        let probe = reader.clone();
        let start = Instant::now();
        let waiter = std::thread::spawn(move || reader.recv_timeout::<u8>(Duration::from_secs(20)));
        until_a_reader_sleeps(&probe);
        drop(writer);
        assert!(matches!(
            waiter.join().unwrap(),
            Err(ConnectionError::Closed)
        ));
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn a_connection_inside_a_message_is_the_same_connection() {
        let (a, b) = Pipe::duplex().unwrap();
        let (c, d) = Pipe::duplex().unwrap();
        a.send((5u8, &d)).unwrap();
        drop(d);
        let (five, d) = b.recv::<(u8, Connection)>().unwrap();
        assert_eq!(five, 5);
        d.send("over the received end").unwrap();
        assert_eq!(c.recv::<String>().unwrap(), "over the received end");
        c.send(6u8).unwrap();
        assert_eq!(d.recv::<u8>().unwrap(), 6);
        drop(d);
        assert!(matches!(c.recv::<u8>(), Err(ConnectionError::Closed)));
    }

    #[test]
    fn shared_memory_in_a_message_is_the_same_memory() {
        let (a, b) = Pipe::duplex().unwrap();
        let shm = crate::SharedMemory::new(64).unwrap();
        a.send((1u8, &shm)).unwrap();
        let (one, arrived) = b.recv::<(u8, crate::SharedMemory)>().unwrap();
        assert_eq!(one, 1);
        arrived.write_at(0, b"through").unwrap();
        let mut seen = [0u8; 7];
        shm.read_at(0, &mut seen).unwrap();
        assert_eq!(&seen, b"through");
    }

    #[test]
    fn a_parcel_left_by_a_message_read_as_bytes_is_closed_by_the_next_one() {
        let (a, b) = Pipe::duplex().unwrap();
        let (first, first_peer) = Pipe::duplex().unwrap();
        let (second, second_peer) = Pipe::duplex().unwrap();
        a.send(&first).unwrap();
        a.send(&second).unwrap();
        drop((first, second));
        // Read as bytes: the handle is never decoded, its parcel stays queued.
        b.recv_bytes().unwrap();
        let second = b.recv::<Connection>().unwrap();
        second.send(3u8).unwrap();
        assert_eq!(second_peer.recv::<u8>().unwrap(), 3);
        // The first handle's descriptors were closed on the way.
        assert!(matches!(
            first_peer.recv_timeout::<u8>(Duration::from_secs(10)),
            Err(ConnectionError::Closed)
        ));
    }

    #[test]
    fn sending_to_a_dropped_reader_is_closed() {
        let (reader, writer) = Pipe::simplex().unwrap();
        drop(reader);
        // The watcher thread learns of the hang-up within microseconds;
        // sends until then land in the ring.
        let deadline = Instant::now() + Duration::from_secs(10);
        let error = loop {
            match writer.send(1u8) {
                Ok(()) => assert!(
                    Instant::now() < deadline,
                    "the reader's end was never noticed"
                ),
                Err(error) => break error,
            }
            std::thread::yield_now();
        };
        assert!(matches!(error, ConnectionError::Closed), "{error:?}");
    }

    #[test]
    fn wait_wakes_when_the_other_end_is_dropped_in_another_thread() {
        let (reader, writer) = Pipe::simplex().unwrap();
        let (other_reader, _other_writer) = Pipe::simplex().unwrap();
        let dropper = std::thread::spawn(move || {
            // No hand-off needed: whether wait is asleep yet or not, the
            // hang-up makes the reader ready.
            drop(writer);
        });
        let objects = [Waitable::from(&other_reader), Waitable::from(&reader)];
        let start = Instant::now();
        assert_eq!(wait(&objects, Some(Duration::from_secs(20))).unwrap(), [1]);
        assert!(start.elapsed() < Duration::from_secs(10));
        dropper.join().unwrap();
        assert!(matches!(
            reader.recv_timeout::<u8>(Duration::from_secs(10)),
            Err(ConnectionError::Closed)
        ));
    }

    #[test]
    fn wait_over_queues_and_connections() {
        let queue: crate::queue::Queue<u32> = crate::queue::Queue::unbounded().unwrap();
        let closing: crate::queue::Queue<u32> = crate::queue::Queue::unbounded().unwrap();
        let (reader, _writer) = Pipe::simplex().unwrap();
        let objects = [
            Waitable::from(&reader),
            Waitable::from(&queue),
            Waitable::from(&closing),
        ];
        assert!(
            wait(&objects, Some(Duration::from_millis(20)))
                .unwrap()
                .is_empty()
        );
        let putter = {
            let queue = queue.clone();
            std::thread::spawn(move || queue.put(5).unwrap())
        };
        assert_eq!(wait(&objects, Some(Duration::from_secs(20))).unwrap(), [1]);
        putter.join().unwrap();
        assert_eq!(queue.get().unwrap(), 5);
        let closer = {
            let closing = closing.clone();
            std::thread::spawn(move || closing.shutdown().unwrap())
        };
        assert_eq!(wait(&objects, Some(Duration::from_secs(20))).unwrap(), [2]);
        closer.join().unwrap();
    }

    #[test]
    fn wait_reports_ready_connections() {
        let (a1, b1) = Pipe::duplex().unwrap();
        let (a2, b2) = Pipe::duplex().unwrap();
        let objects = [Waitable::from(&b1), Waitable::from(&b2)];
        assert_eq!(
            wait(&objects, Some(Duration::from_millis(20))).unwrap(),
            Vec::<usize>::new()
        );
        a2.send(1u8).unwrap();
        assert_eq!(wait(&objects, Some(Duration::from_secs(10))).unwrap(), [1]);
        let probe = b1.clone();
        let sender = std::thread::spawn(move || {
            until_a_reader_sleeps(&probe);
            a1.send(2u8).unwrap();
            a1
        });
        b2.recv::<u8>().unwrap();
        assert_eq!(wait(&objects, Some(Duration::from_secs(10))).unwrap(), [0]);
        drop(sender.join().unwrap());
    }
}
