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
//! **End of the line.** Every handle of an end holds a small "liveness
//! token": a memfd with an open-file-description lock, which the kernel
//! drops when the last descriptor of it closes — in whichever process, also
//! when the process is killed, and including handles in flight inside a
//! message. A reader that finds its ring empty checks whether the writers'
//! lock still exists (in `/proc/locks`); once none is left and the ring is
//! drained, `recv` returns [`ConnectionError::Closed`] instead of waiting
//! forever. Dropping a handle wakes the peer at once; a killed peer is
//! noticed within [`LIVENESS_SLICE`]. A writer blocked on a full ring learns
//! the same way that no reader is left.

use std::fmt;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU32};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ring::{
    DEFAULT_CAPACITY, Liveness, Payload, Postcard, RawBytes, Ring, RingConfig, RingError, Wait,
    carrier_with_token,
};
use crate::shm::{SharedMemory, ShmError};

/// How often a waiting reader (or writer) checks whether its peer was killed.
/// A peer that drops its handles normally wakes it at once.
pub const LIVENESS_SLICE: Duration = Duration::from_millis(50);

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
    /// The value could not be encoded (nothing was sent).
    #[error("could not encode the message: {0}")]
    Encode(#[source] postcard::Error),
    /// The message could not be decoded as the requested type; it was
    /// consumed (later messages are unaffected).
    #[error("could not decode the message (it was consumed): {0}")]
    Decode(#[source] postcard::Error),
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
    /// The message contains a handle (a queue, a pipe end, shared
    /// memory...): handles travel to other processes as process arguments,
    /// not inside messages (nothing was sent).
    #[error(
        "the message contains a handle (queue, connection...); pass handles as process arguments"
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
            RingError::Encode(e) => ConnectionError::Encode(e),
            RingError::Corrupted(what) => ConnectionError::Corrupted(what),
            RingError::Incompatible(what) => ConnectionError::Incompatible(what),
            RingError::Reentrant => ConnectionError::Reentrant,
            RingError::HandleInItem => ConnectionError::HandleInMessage,
            RingError::Io { op, source } => ConnectionError::Io { op, source },
            RingError::Shm(e) => ConnectionError::Shm(e),
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

    /// One direction: a ring and the (reader, writer) endpoints on it.
    fn direction(&self) -> Result<(Endpoint, Endpoint), ConnectionError> {
        let ring = Arc::new(Ring::create(RingConfig {
            capacity: self.capacity_bytes,
            max_items: None,
            type_tag: CONNECTION_TAG,
        })?);
        let (reader_token, reader_id) = LivenessToken::create()?;
        let (writer_token, writer_id) = LivenessToken::create()?;
        let words = &ring.extra().words;
        for (slot, value) in words
            .iter()
            .zip([writer_id.0, writer_id.1, reader_id.0, reader_id.1])
        {
            slot.store(value, SeqCst);
        }
        Ok((
            Endpoint::new(Arc::clone(&ring), reader_token, Side::Reader),
            Endpoint::new(ring, writer_token, Side::Writer),
        ))
    }
}

/// Which end of a direction an endpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum Side {
    Reader,
    Writer,
}

/// (device, inode) of a liveness token's memfd.
type TokenId = (u64, u64);

/// A memfd whose open file description holds a shared OFD lock: the lock
/// lives exactly as long as some descriptor of that description does,
/// anywhere (ipc-channel passes the description itself, not a copy).
struct LivenessToken {
    carrier: SharedMemory,
}

impl LivenessToken {
    /// A new, locked token and the identity of its file (for the peer to probe).
    fn create() -> Result<(LivenessToken, TokenId), ConnectionError> {
        let (carrier, file, carrier_fd, _) = carrier_with_token(4096)?;
        // SAFETY: `carrier_fd` is the descriptor ipc-channel holds for
        // `carrier` (the only one of that file, found just after creating
        // it), open for as long as `carrier` lives, which it does here.
        let carrier_fd = unsafe { BorrowedFd::borrow_raw(carrier_fd) };
        lock_description(carrier_fd).map_err(io_error("locking a liveness token"))?;
        let id = file.id().map_err(io_error("fstat"))?;
        Ok((LivenessToken { carrier }, id))
    }
}

/// Takes a shared OFD lock on the first byte through `fd`'s open file description.
fn lock_description(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: an all-zero flock is a valid value; the fields that matter are set below.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = libc::F_RDLCK as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = 0;
    lock.l_len = 1;
    // SAFETY: `fd` is open; `lock` is a valid flock for F_OFD_SETLK.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &lock) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Pauses before each re-scan that confirms a token is gone.
const CONFIRM_GONE: [Duration; 2] = [Duration::from_millis(1), Duration::from_millis(5)];

/// Whether some open file description holds an OFD lock on the file `id`
/// (read from `/proc/locks`). `None` if `/proc/locks` cannot be read.
///
/// The kernel generates `/proc/locks` afresh for every `read` call, resuming
/// at a record index: if a lock listed before that index is removed between
/// two calls (any pipe dropped anywhere), the next call skips a record that
/// is still there. So the file is read in calls of [`LOCKS_READ`] bytes (one
/// call then covers a whole page of records, generated in one consistent
/// pass), and "gone" is only concluded after re-scans spread over a few
/// milliseconds also miss the token, which covers a lock table longer than a
/// page. Concluding it is rare (once per connection at most).
fn token_alive(id: TokenId) -> Option<bool> {
    if token_listed(id)? {
        return Some(true);
    }
    for pause in CONFIRM_GONE {
        std::thread::sleep(pause);
        if token_listed(id)? {
            tracing::debug!(
                ?id,
                "a live liveness token was missing from one scan of /proc/locks"
            );
            return Some(true);
        }
    }
    Some(false)
}

/// Bytes asked for per `read` of `/proc/locks` (more than the kernel's page).
const LOCKS_READ: usize = 64 * 1024;

/// `/proc/locks`, read in large calls (see [`token_alive`]).
fn read_proc_locks() -> io::Result<String> {
    use std::io::Read;
    let mut file = fs::File::open("/proc/locks")?;
    let mut locks = Vec::new();
    let mut buffer = vec![0u8; LOCKS_READ];
    loop {
        match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => locks.extend_from_slice(&buffer[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    String::from_utf8(locks).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// One scan of `/proc/locks` for an OFD lock on the file `id`.
fn token_listed(id: TokenId) -> Option<bool> {
    let locks = match read_proc_locks() {
        Ok(locks) => locks,
        Err(error) => {
            static WARNED: AtomicBool = AtomicBool::new(false);
            if !WARNED.swap(true, Relaxed) {
                tracing::warn!(%error, "cannot read /proc/locks: peers that die are not noticed");
            }
            return None;
        }
    };
    let (dev, ino) = id;
    let needle = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
    Some(locks.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        // "N: OFDLCK ADVISORY READ -1 00:01:1234 0 0" (waiters have "->" after "N:").
        fields.next() == Some("OFDLCK") && fields.nth(3) == Some(needle.as_str())
    }))
}

/// One end of one direction, in this process: the ring, our liveness token,
/// and what we know of the peer's.
struct Endpoint {
    ring: Arc<Ring>,
    side: Side,
    /// Held for as long as this process has a handle of this end.
    token: Option<LivenessToken>,
    peer: TokenId,
    /// `ring.extra().epoch` when the peer was last found alive.
    checked_epoch: AtomicU32,
    /// A sleep slice expired (or never checked): check for real next time.
    check_due: AtomicBool,
    peer_gone: AtomicBool,
}

impl Endpoint {
    fn new(ring: Arc<Ring>, token: LivenessToken, side: Side) -> Endpoint {
        let words = &ring.extra().words;
        let peer_words = match side {
            Side::Reader => (0, 1),
            Side::Writer => (2, 3),
        };
        let peer = (
            words[peer_words.0].load(SeqCst),
            words[peer_words.1].load(SeqCst),
        );
        let epoch = ring.extra().epoch.load(SeqCst);
        Endpoint {
            ring,
            side,
            token: Some(token),
            peer,
            checked_epoch: AtomicU32::new(epoch),
            check_due: AtomicBool::new(true),
            peer_gone: AtomicBool::new(false),
        }
    }
}

impl Liveness for Endpoint {
    fn peer_gone_now(&self) -> bool {
        if self.peer_gone.load(Relaxed) {
            return true;
        }
        let epoch = self.ring.extra().epoch.load(SeqCst);
        if !self.check_due.load(Relaxed) && epoch == self.checked_epoch.load(Relaxed) {
            return false;
        }
        self.check_due.store(false, Relaxed);
        self.checked_epoch.store(epoch, Relaxed);
        let gone = token_alive(self.peer) == Some(false);
        if gone {
            tracing::debug!(side = ?self.side, "the other end of the connection is gone");
            self.peer_gone.store(true, Relaxed);
        }
        gone
    }

    fn slice_deadline(&self, deadline: Option<Instant>) -> Option<Instant> {
        let slice = Instant::now() + LIVENESS_SLICE;
        Some(deadline.map_or(slice, |d| d.min(slice)))
    }

    fn slice_expired(&self) {
        self.check_due.store(true, Relaxed);
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        // Close our token first, then tell the peer to look again: if this
        // was the last handle of our end anywhere, its lock is gone by now.
        drop(self.token.take());
        let extra = self.ring.extra();
        extra.epoch.fetch_add(1, SeqCst);
        match self.side {
            Side::Writer => self.ring.indices().wake_consumers(),
            Side::Reader => self.ring.indices().wake_producers(),
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
    pub fn send(&self, value: impl Serialize) -> Result<(), ConnectionError> {
        self.send_encoded(&Postcard(&value))
    }

    /// Sends `bytes` as one message.
    pub fn send_bytes(&self, bytes: &[u8]) -> Result<(), ConnectionError> {
        self.send_encoded(&RawBytes(bytes))
    }

    fn send_encoded(&self, message: &dyn crate::ring::Encode) -> Result<(), ConnectionError> {
        let tx = self.tx()?;
        if tx.peer_gone_now() {
            return Err(ConnectionError::Closed);
        }
        Ok(tx.ring.push(message, Wait::Forever, Some(tx))?)
    }

    /// Receives the next message as a `T`, waiting for it.
    pub fn recv<T: DeserializeOwned>(&self) -> Result<T, ConnectionError> {
        self.recv_with(Wait::Forever, decode::<T>)?
    }

    /// Like [`recv`](Self::recv), giving up after `timeout` ([`ConnectionError::Timeout`]).
    pub fn recv_timeout<T: DeserializeOwned>(
        &self,
        timeout: Duration,
    ) -> Result<T, ConnectionError> {
        self.recv_with(Wait::timeout(timeout), decode::<T>)?
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

    /// What `wait` needs: whether ready now, and the ring to sleep on.
    fn ready(&self) -> Result<(bool, &Endpoint), ConnectionError> {
        let rx = self.rx()?;
        let ready = rx.ring.has_data() || rx.ring.indices().is_closed() || rx.peer_gone_now();
        Ok((ready, rx))
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
        Ok(_) => Err(ConnectionError::Decode(
            postcard::Error::DeserializeBadEncoding,
        )),
        Err(error) => Err(ConnectionError::Decode(error)),
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
    /// Ready when the descriptor is readable, e.g. a process sentinel
    /// (`mp_core::Child::sentinel`, a pidfd: readable once the child ended).
    Fd(BorrowedFd<'a>),
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

/// How long `wait` sleeps between looks at descriptors (they cannot share a
/// sleep with the rings' futexes).
const FD_SLICE: Duration = Duration::from_millis(5);

/// Waits until at least one of `objects` is ready, or `timeout` passes
/// (`None`: no limit); returns the indices of the ready ones (empty on
/// timeout). Python's `multiprocessing.connection.wait`.
///
/// Connections wake the waiter at once (it sleeps on all their rings with one
/// `futex_waitv`); descriptors are looked at every few milliseconds.
pub fn wait(
    objects: &[Waitable<'_>],
    timeout: Option<Duration>,
) -> Result<Vec<usize>, ConnectionError> {
    let deadline = timeout.map(|t| Instant::now().checked_add(t).unwrap_or_else(far_future));
    loop {
        let mut ready = Vec::new();
        let mut words = Vec::new();
        let mut fds = false;
        for (index, object) in objects.iter().enumerate() {
            match object {
                Waitable::Connection(connection) => {
                    let (_, rx) = connection.ready()?;
                    // Announce first, then look: a message published after the
                    // look bumps the word we are about to sleep on.
                    let seq = rx.ring.indices().announce_data_sleeper();
                    if connection.ready()?.0 {
                        ready.push(index);
                    }
                    words.push((rx.ring.indices().data_word(), seq));
                }
                Waitable::Fd(fd) => {
                    fds = true;
                    if fd_readable(*fd)? {
                        ready.push(index);
                    }
                }
            }
        }
        if !ready.is_empty() {
            return Ok(ready);
        }
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            return Ok(ready);
        }
        let slice = now + if fds { FD_SLICE } else { LIVENESS_SLICE };
        let until = deadline.map_or(slice, |d| d.min(slice));
        sleep_on_words(&words, until);
        for object in objects {
            if let Waitable::Connection(connection) = object
                && let Some(rx) = &connection.inner.rx
            {
                rx.slice_expired();
            }
        }
    }
}

/// Whether `fd` is readable now.
fn fd_readable(fd: BorrowedFd<'_>) -> Result<bool, ConnectionError> {
    let mut poll = [rustix::event::PollFd::new(
        &fd,
        rustix::event::PollFlags::IN,
    )];
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let n = rustix::event::poll(&mut poll, Some(&zero)).map_err(|e| ConnectionError::Io {
        op: "poll",
        source: e.into(),
    })?;
    Ok(n > 0)
}

/// Sleeps until one of the futex `words` no longer holds its value, or
/// `until`.
#[cfg(loom)]
fn sleep_on_words(words: &[(&crate::futex::AtomicU32, u32)], until: Instant) {
    if let Some((word, value)) = words.first() {
        crate::futex::wait(word, *value, Some(until));
    }
}

/// Sleeps until one of the futex `words` no longer holds its value, or
/// `until`.
#[cfg(not(loom))]
fn sleep_on_words(words: &[(&crate::futex::AtomicU32, u32)], until: Instant) {
    use rustix::thread::futex;
    if words.is_empty() {
        std::thread::sleep(until.saturating_duration_since(Instant::now()));
        return;
    }
    let waiters: Vec<futex::Wait> = words
        .iter()
        .map(|(word, value)| {
            let mut waiter = futex::Wait::new();
            waiter.val = u64::from(*value);
            waiter.uaddr = futex::WaitPtr::new(word.as_ptr().cast());
            // Shared (not FUTEX2_PRIVATE): the words live in memory shared
            // with other processes.
            waiter.flags = futex::WaitFlags::SIZE_U32;
            waiter
        })
        .collect();
    let left = until.saturating_duration_since(Instant::now());
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let mut sec = now.tv_sec.saturating_add(left.as_secs() as i64);
    let mut nsec = now.tv_nsec + i64::from(left.subsec_nanos());
    if nsec >= 1_000_000_000 {
        nsec -= 1_000_000_000;
        sec += 1;
    }
    let absolute = rustix::time::Timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    };
    match futex::waitv(
        &waiters,
        futex::WaitvFlags::empty(),
        Some(&absolute),
        rustix::time::ClockId::Monotonic,
    ) {
        // Woken, timed out, a word changed, a signal: the caller looks again.
        Ok(_)
        | Err(rustix::io::Errno::TIMEDOUT | rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {
        }
        // futex_waitv needs Linux 5.16; before that, sleep on the first word
        // for a short while.
        Err(_) => {
            let short = Instant::now() + Duration::from_millis(1);
            crate::futex::wait(words[0].0, words[0].1, Some(until.min(short)));
        }
    }
}

/// How a connection travels: for each direction it can use, the ring's
/// carrier and this end's liveness token (whose description keeps the end
/// alive while the message is in flight).
#[derive(Serialize, Deserialize)]
struct Wire {
    tx: Option<(SharedMemory, SharedMemory)>,
    rx: Option<(SharedMemory, SharedMemory)>,
}

fn endpoint_wire(endpoint: &Option<Endpoint>) -> Option<(SharedMemory, SharedMemory)> {
    endpoint.as_ref().map(|e| {
        let token = e.token.as_ref().expect("a live endpoint holds its token");
        (e.ring.carrier().clone(), token.carrier.clone())
    })
}

impl Serialize for Connection {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        crate::ring::refuse_inside_item()?;
        Wire {
            tx: endpoint_wire(&self.inner.tx),
            rx: endpoint_wire(&self.inner.rx),
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Connection {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let wire = Wire::deserialize(deserializer)?;
        let attach = |parts: Option<(SharedMemory, SharedMemory)>,
                      side: Side|
         -> Result<Option<Endpoint>, ConnectionError> {
            let Some((ring, token)) = parts else {
                return Ok(None);
            };
            let ring = Arc::new(Ring::attach(ring, CONNECTION_TAG)?);
            Ok(Some(Endpoint::new(
                ring,
                LivenessToken { carrier: token },
                side,
            )))
        };
        let tx = attach(wire.tx, Side::Writer).map_err(D::Error::custom)?;
        let rx = attach(wire.rx, Side::Reader).map_err(D::Error::custom)?;
        Ok(Connection::new(tx, rx))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn one_scan_never_misses_a_held_token_while_others_come_and_go() {
        let (_token, id) = LivenessToken::create().unwrap();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let churned = std::sync::Arc::new(AtomicU32::new(0));
        let churn = {
            let (stop, churned) = (
                std::sync::Arc::clone(&stop),
                std::sync::Arc::clone(&churned),
            );
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    drop(LivenessToken::create().unwrap());
                    churned.fetch_add(1, Relaxed);
                }
            })
        };
        // Scan only while the other thread is creating and dropping tokens.
        while churned.load(Relaxed) < 50 {
            std::thread::yield_now();
        }
        let missed = (0..20_000)
            .filter(|_| token_listed(id) != Some(true))
            .count();
        stop.store(true, Relaxed);
        churn.join().unwrap();
        assert!(
            churned.load(Relaxed) > 100,
            "the churn did not overlap the scans"
        );
        assert_eq!(
            missed, 0,
            "a held token was missing from {missed} of 20000 scans"
        );
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
    fn a_handle_inside_a_message_is_refused() {
        let (a, b) = Pipe::duplex().unwrap();
        let (other, _keep) = Pipe::duplex().unwrap();
        assert!(matches!(
            a.send(&other),
            Err(ConnectionError::HandleInMessage)
        ));
        let queue: crate::queue::Queue<u8> = crate::queue::Queue::unbounded().unwrap();
        assert!(matches!(
            a.send((1u8, &queue)),
            Err(ConnectionError::HandleInMessage)
        ));
        // Nothing was sent; the pipe works, and handles still travel through ipc-channel.
        a.send(2u8).unwrap();
        assert_eq!(b.recv::<u8>().unwrap(), 2);
        let (tx, rx) = ipc_channel::ipc::channel().unwrap();
        tx.send(other).unwrap();
        drop(rx.recv().unwrap());
    }

    #[test]
    fn sending_to_a_dropped_reader_is_closed() {
        let (reader, writer) = Pipe::simplex().unwrap();
        drop(reader);
        assert!(matches!(writer.send(1u8), Err(ConnectionError::Closed)));
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
