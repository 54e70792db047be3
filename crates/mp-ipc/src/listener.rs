//! Connections between processes that do not share a parent: a [`Listener`]
//! bound to a Unix socket path or a TCP address hands a [`Connection`] to
//! every [`Client`] that connects and, if an authkey is set, proves it knows
//! the key (Python's `multiprocessing.connection.Listener` / `Client`).
//!
//! ```
//! use mp_ipc::listener::{Address, Client, Listener};
//!
//! // A TCP port chosen by the system (Python's `('localhost', 0)`).
//! let listener = Listener::bind(Address::tcp_loopback(0), Some(b"secret"))?;
//! let address = listener.address().clone();
//! let client = std::thread::spawn(move || {
//!     let conn = Client::connect(address, Some(b"secret")).unwrap();
//!     conn.send("hello").unwrap();
//! });
//! let conn = listener.accept()?;
//! assert_eq!(conn.recv::<String>()?, "hello");
//! client.join().unwrap();
//! # Ok::<(), mp_ipc::connection::ConnectionError>(())
//! ```
//!
//! The socket only carries the handshake. With an authkey, each side sends
//! the other a random 32-byte challenge and checks the HMAC-SHA256 of it
//! under the key, tagged with the answering side's role (mutual
//! authentication, as in Python; keys never travel). A fresh challenge per
//! connection makes a recorded handshake worthless to replay, the role tag
//! keeps one side's answer from serving as the other's, and a side refuses
//! its own challenge sent back to it. A refusal is
//! [`ConnectionError::Authentication`] on *both* sides in every case (wrong
//! key, a client without a key, a client with a key facing a listener
//! without one, bytes that are not the protocol): the refusing side says so
//! before hanging up.
//!
//! Then the listener creates a duplex [`Pipe`] and passes one end to the
//! client through an ipc-channel (memfds travel as file descriptors): the
//! connection itself is the usual shared-memory one. That hand-over needs
//! both processes on one machine, also over TCP (a loopback or local
//! address; a remote client fails with a typed error). Every step of the
//! handshake is bounded by [`HANDSHAKE_TIMEOUT`] (or
//! [`Listener::handshake_timeout`]), so a client that stalls cannot hang
//! `accept`. A Unix socket path is removed when the listener is dropped.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipc_channel::ipc::{IpcOneShotServer, IpcSender};

use crate::connection::{Connection, ConnectionError, Pipe};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::ring::random_token;

/// The longest any step of the handshake may take (by default).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// First message from the listener: protocol version and whether it authenticates.
const HELLO_OPEN: &[u8] = b"#MP-IPC-LISTENER-2#open";
const HELLO_AUTH: &[u8] = b"#MP-IPC-LISTENER-2#auth";
const CHALLENGE: &[u8] = b"#CHALLENGE#";
const WELCOME: &[u8] = b"#WELCOME#";
/// A refusal, followed by its reason; the sender hangs up after it.
const REFUSED: &[u8] = b"#REFUSED#";
/// Role tags mixed into the HMAC: who answers.
const CLIENT_ROLE: &[u8] = b"client:";
const LISTENER_ROLE: &[u8] = b"listener:";
/// Largest handshake message accepted.
const MAX_MESSAGE: usize = 4096;

fn io_error(op: &'static str) -> impl FnOnce(io::Error) -> ConnectionError {
    move |source| ConnectionError::Io { op, source }
}

fn refused(reason: impl Into<String>) -> ConnectionError {
    ConnectionError::Authentication(reason.into())
}

/// Where a [`Listener`] listens: a Unix socket path or a TCP address
/// (Python's `family='AF_UNIX'` / `'AF_INET'`). Serializable, to hand it to
/// a child process.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Address {
    /// A Unix socket path (must not exist when binding).
    Unix(PathBuf),
    /// A TCP address; port 0 asks the system for a free port when binding.
    Tcp(SocketAddr),
}

impl Address {
    /// `127.0.0.1:port` (port 0: any free port).
    pub fn tcp_loopback(port: u16) -> Address {
        Address::Tcp(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
    }

    /// The first address `host` resolves to, with `port` (Python's
    /// `('localhost', port)`).
    pub fn tcp_host(host: &str, port: u16) -> io::Result<Address> {
        (host, port)
            .to_socket_addrs()?
            .next()
            .map(Address::Tcp)
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("no address for {host}"))
            })
    }

    /// A fresh Unix socket path in the temporary directory (Python's
    /// `arbitrary_address('AF_UNIX')`).
    pub fn generated_unix() -> io::Result<Address> {
        let token: String = random_token()?
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        Ok(Address::Unix(std::env::temp_dir().join(format!(
            "mp-ipc-listener-{}-{token}.sock",
            std::process::id()
        ))))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "{}", path.display()),
            Address::Tcp(address) => write!(f, "{address}"),
        }
    }
}

impl From<SocketAddr> for Address {
    fn from(address: SocketAddr) -> Self {
        Address::Tcp(address)
    }
}

impl<I: Into<IpAddr>> From<(I, u16)> for Address {
    fn from((ip, port): (I, u16)) -> Self {
        Address::Tcp(SocketAddr::new(ip.into(), port))
    }
}

impl From<PathBuf> for Address {
    fn from(path: PathBuf) -> Self {
        Address::Unix(path)
    }
}

impl From<&PathBuf> for Address {
    fn from(path: &PathBuf) -> Self {
        Address::Unix(path.clone())
    }
}

impl From<&Path> for Address {
    fn from(path: &Path) -> Self {
        Address::Unix(path.to_path_buf())
    }
}

/// A string is a Unix socket path (use [`Address::tcp_host`] for a host name).
impl From<&str> for Address {
    fn from(path: &str) -> Self {
        Address::Unix(PathBuf::from(path))
    }
}

impl From<&Address> for Address {
    fn from(address: &Address) -> Self {
        address.clone()
    }
}

/// The listening socket.
#[derive(Debug)]
enum Socket {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// One handshake's byte stream, with the bound on each of its steps.
struct Stream {
    socket: StreamSocket,
    timeout: Duration,
}

enum StreamSocket {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn new(socket: StreamSocket) -> Stream {
        if let StreamSocket::Tcp(s) = &socket {
            // Small messages, one at a time: send each at once.
            let _ = s.set_nodelay(true);
        }
        Stream {
            socket,
            timeout: HANDSHAKE_TIMEOUT,
        }
    }

    fn connect(address: &Address) -> io::Result<Stream> {
        let socket = match address {
            Address::Unix(path) => StreamSocket::Unix(UnixStream::connect(path)?),
            Address::Tcp(address) => StreamSocket::Tcp(TcpStream::connect(address)?),
        };
        Ok(Stream::new(socket))
    }

    /// Shuts our sending side, then reads until the peer hangs up (at most
    /// one handshake timeout, 64 KiB).
    fn drain(&mut self) {
        let _ = match &self.socket {
            StreamSocket::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            StreamSocket::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
        };
        let deadline = Instant::now() + self.timeout;
        let mut left: usize = 64 << 10;
        let mut buf = [0u8; 4096];
        while left > 0 && Instant::now() < deadline {
            match self.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    }

    /// Bounds every read and write of the handshake.
    fn bound(&mut self, timeout: Duration) -> Result<(), ConnectionError> {
        self.timeout = timeout;
        let timeout = Some(timeout.max(Duration::from_millis(1)));
        match &self.socket {
            StreamSocket::Unix(s) => s
                .set_read_timeout(timeout)
                .and_then(|()| s.set_write_timeout(timeout)),
            StreamSocket::Tcp(s) => s
                .set_read_timeout(timeout)
                .and_then(|()| s.set_write_timeout(timeout)),
        }
        .map_err(io_error("setsockopt"))
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.socket {
            StreamSocket::Unix(s) => s.read(buf),
            StreamSocket::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match &mut self.socket {
            StreamSocket::Unix(s) => s.write(buf),
            StreamSocket::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Accepts connections on a Unix socket path or a TCP address (Python's `Listener`).
#[derive(Debug)]
pub struct Listener {
    socket: Socket,
    address: Address,
    authkey: Option<Vec<u8>>,
    pipe: Pipe,
    handshake_timeout: Duration,
}

impl Listener {
    /// Binds to `address`: a Unix socket path (which must not exist) or a
    /// TCP address (port 0: any free port, see [`address`](Self::address)).
    /// With `authkey`, only clients that know the same key are accepted.
    pub fn bind(
        address: impl Into<Address>,
        authkey: Option<&[u8]>,
    ) -> Result<Listener, ConnectionError> {
        let (socket, address) = match address.into() {
            Address::Unix(path) => {
                let socket =
                    UnixListener::bind(&path).map_err(io_error("binding the listener socket"))?;
                (Socket::Unix(socket), Address::Unix(path))
            }
            Address::Tcp(address) => {
                let socket =
                    TcpListener::bind(address).map_err(io_error("binding the listener socket"))?;
                let bound = socket
                    .local_addr()
                    .map_err(io_error("reading the bound address"))?;
                (Socket::Tcp(socket), Address::Tcp(bound))
            }
        };
        tracing::debug!(%address, auth = authkey.is_some(), "listener bound");
        Ok(Listener {
            socket,
            address,
            authkey: authkey.map(<[u8]>::to_vec),
            pipe: Pipe::builder(),
            handshake_timeout: HANDSHAKE_TIMEOUT,
        })
    }

    /// Binds to a fresh Unix socket path ([`Address::generated_unix`]);
    /// Python's `Listener()` without an address.
    pub fn bind_generated(authkey: Option<&[u8]>) -> Result<Listener, ConnectionError> {
        let address = Address::generated_unix().map_err(io_error("getrandom"))?;
        Self::bind(address, authkey)
    }

    /// The options of the pipes created for accepted connections (e.g. their ring size).
    pub fn pipe_options(mut self, pipe: Pipe) -> Listener {
        self.pipe = pipe;
        self
    }

    /// The longest each step of a client's handshake may take (default
    /// [`HANDSHAKE_TIMEOUT`]).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Listener {
        self.handshake_timeout = timeout;
        self
    }

    /// The address clients connect to (Python's `address`); for a TCP
    /// listener bound to port 0, the port the system chose.
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// Waits for a client and returns the connection to it. A client that
    /// fails the handshake (wrong key, stalls, speaks another protocol) is
    /// an error for this call; the listener keeps working.
    pub fn accept(&self) -> Result<Connection, ConnectionError> {
        let stream = match &self.socket {
            Socket::Unix(socket) => socket.accept().map(|(s, _)| StreamSocket::Unix(s)),
            Socket::Tcp(socket) => socket.accept().map(|(s, _)| StreamSocket::Tcp(s)),
        }
        .map_err(io_error("accepting a client"))?;
        let stream = Stream::new(stream);
        self.handshake(stream)
    }

    /// Like [`accept`](Self::accept), giving up after `timeout` if no client
    /// comes ([`ConnectionError::Timeout`]).
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Connection, ConnectionError> {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let fd = match &self.socket {
                Socket::Unix(socket) => socket.as_fd(),
                Socket::Tcp(socket) => socket.as_fd(),
            };
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            let wait = Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: i64::from(left.subsec_nanos()),
            };
            match poll(&mut fds, Some(&wait)) {
                Ok(0) if left.is_zero() => return Err(ConnectionError::Timeout),
                Ok(0) | Err(rustix::io::Errno::INTR) => continue,
                Ok(_) => return self.accept(),
                Err(errno) => return Err(io_error("poll")(errno.into())),
            }
        }
    }

    fn handshake(&self, mut stream: Stream) -> Result<Connection, ConnectionError> {
        stream.bound(self.handshake_timeout)?;
        match &self.authkey {
            None => send_message(&mut stream, HELLO_OPEN)?,
            Some(key) => {
                send_message(&mut stream, HELLO_AUTH)?;
                let ours = deliver_challenge(&mut stream, key, CLIENT_ROLE)?;
                answer_challenge(&mut stream, key, LISTENER_ROLE, Some(&ours))?;
            }
        }
        // The client names an ipc-channel server; its end of the pipe goes there.
        let name = receive_message(&mut stream)?;
        if let Some(reason) = name.strip_prefix(REFUSED) {
            return Err(refused(format!(
                "the client refused: {}",
                String::from_utf8_lossy(reason)
            )));
        }
        // A Unix socket path (what ipc-channel names its servers by): no NUL (ipc-channel
        // would panic) and short enough for `sun_path` (it would truncate, not refuse).
        // Found by the `listener_handshake` fuzz target.
        const SUN_PATH_MAX: usize = 107;
        let name = match String::from_utf8(name) {
            Ok(name)
                if !name.is_empty()
                    && !name.starts_with('#')
                    && !name.contains('\0')
                    && name.len() <= SUN_PATH_MAX =>
            {
                name
            }
            _ => return Err(refuse(&mut stream, "bad channel name from the client")),
        };
        let (ours, theirs) = self.pipe.clone().build_duplex()?;
        let sender = IpcSender::<Connection>::connect(name)
            .map_err(io_error("connecting to the client's channel"))?;
        sender.send(theirs).map_err(|e| ConnectionError::Io {
            op: "handing the connection over",
            source: io::Error::other(format!("{e:?}")),
        })?;
        tracing::debug!(address = %self.address, "client accepted");
        Ok(ours)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Address::Unix(path) = &self.address
            && let Err(error) = std::fs::remove_file(path)
        {
            tracing::warn!(path = %path.display(), %error, "could not remove the listener socket");
        }
    }
}

/// Connects to a [`Listener`] (Python's `Client`).
#[derive(Debug)]
pub struct Client;

impl Client {
    /// Connects to the listener at `address` (a Unix socket path or a TCP
    /// address), proving knowledge of `authkey` if the listener asks for it
    /// (and checking that the listener knows it too).
    pub fn connect(
        address: impl Into<Address>,
        authkey: Option<&[u8]>,
    ) -> Result<Connection, ConnectionError> {
        let mut stream =
            Stream::connect(&address.into()).map_err(io_error("connecting to the listener"))?;
        stream.bound(HANDSHAKE_TIMEOUT)?;
        let hello = receive_message(&mut stream)?;
        match (hello.as_slice(), authkey) {
            (HELLO_OPEN, None) => {}
            (HELLO_AUTH, Some(key)) => {
                answer_challenge(&mut stream, key, CLIENT_ROLE, None)?;
                deliver_challenge(&mut stream, key, LISTENER_ROLE)?;
            }
            (HELLO_AUTH, None) => {
                return Err(refuse(
                    &mut stream,
                    "the listener requires an authkey and the client has none",
                ));
            }
            (HELLO_OPEN, Some(_)) => {
                return Err(refuse(
                    &mut stream,
                    "the client requires authentication and the listener has no authkey",
                ));
            }
            _ => return Err(refuse(&mut stream, "not a multiproc listener")),
        }
        let (server, name) =
            IpcOneShotServer::<Connection>::new().map_err(io_error("creating a channel"))?;
        send_message(&mut stream, name.as_bytes())?;
        accept_bounded(server, name, HANDSHAKE_TIMEOUT)
    }
}

/// Waits at most `timeout` for the listener to send its end through the
/// one-shot server (whose `accept` cannot time out by itself: on timeout we
/// connect to it ourselves to release the waiting thread).
fn accept_bounded(
    server: IpcOneShotServer<Connection>,
    name: String,
    timeout: Duration,
) -> Result<Connection, ConnectionError> {
    let (done, outcome) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = done.send(server.accept().map(|(_, conn)| conn));
    });
    let result = match outcome.recv_timeout(timeout) {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(ConnectionError::Io {
            op: "receiving the connection",
            source: io::Error::other(format!("{e:?}")),
        }),
        Err(_) => {
            // Release the waiter with a connection of our own, then report the timeout.
            if let Ok(sender) = IpcSender::<Connection>::connect(name)
                && let Ok((_, unblock)) = Pipe::simplex()
            {
                let _ = sender.send(unblock);
            }
            Err(ConnectionError::Timeout)
        }
    };
    let _ = waiter.join();
    result
}

fn send_message(stream: &mut Stream, message: &[u8]) -> Result<(), ConnectionError> {
    // Every message sent is a constant, a challenge, an HMAC or a channel
    // name: far below u32::MAX.
    let len = u32::try_from(message.len()).unwrap_or(u32::MAX);
    stream
        .write_all(&len.to_le_bytes())
        .and_then(|()| stream.write_all(message))
        .map_err(io_error("writing to the socket"))
}

/// Tells the peer why we refuse (best effort: it may be gone) and returns
/// the matching error.
///
/// Then hangs up gracefully: shut our side, and read what the peer still
/// sends until it hangs up too (bounded by the handshake timeout and 64 KiB).
/// Closing with its messages unread would reset the connection, and the peer
/// could lose our refusal (and see `BrokenPipe` instead of the reason).
fn refuse(stream: &mut Stream, reason: &str) -> ConnectionError {
    if send_message(stream, &[REFUSED, reason.as_bytes()].concat()).is_ok() {
        stream.drain();
    }
    refused(reason)
}

fn receive_message(stream: &mut Stream) -> Result<Vec<u8>, ConnectionError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(handshake_read_error)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(refuse(stream, &format!("handshake message of {len} bytes")));
    }
    let mut message = vec![0; len];
    stream
        .read_exact(&mut message)
        .map_err(handshake_read_error)?;
    Ok(message)
}

/// A message that must not be a refusal (which becomes the error).
fn expect_message(stream: &mut Stream) -> Result<Vec<u8>, ConnectionError> {
    let message = receive_message(stream)?;
    match message.strip_prefix(REFUSED) {
        Some(reason) => Err(refused(format!(
            "the peer refused: {}",
            String::from_utf8_lossy(reason)
        ))),
        None => Ok(message),
    }
}

fn handshake_read_error(error: io::Error) -> ConnectionError {
    match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ConnectionError::Timeout,
        io::ErrorKind::UnexpectedEof => ConnectionError::Closed,
        _ => ConnectionError::Io {
            op: "reading from the socket",
            source: error,
        },
    }
}

/// Sends a fresh random challenge and checks the peer's HMAC of it, tagged
/// with the peer's `role`. Returns the challenge sent.
fn deliver_challenge(
    stream: &mut Stream,
    key: &[u8],
    role: &[u8],
) -> Result<Vec<u8>, ConnectionError> {
    let mut nonce = random_token().map_err(io_error("getrandom"))?.to_vec();
    nonce.extend(random_token().map_err(io_error("getrandom"))?);
    let challenge = [CHALLENGE, &nonce].concat();
    send_message(stream, &challenge)?;
    let answer = expect_message(stream)?;
    if is_valid_answer(key, role, &challenge, &answer) {
        send_message(stream, WELCOME)?;
        Ok(challenge)
    } else {
        Err(refuse(stream, "the peer does not know the authkey"))
    }
}

/// Answers the peer's challenge with its HMAC under `key`, tagged with our
/// `role`; refuses `ours` (our own challenge, reflected).
fn answer_challenge(
    stream: &mut Stream,
    key: &[u8],
    role: &[u8],
    ours: Option<&[u8]>,
) -> Result<(), ConnectionError> {
    let challenge = expect_message(stream)?;
    if !challenge.starts_with(CHALLENGE) || challenge.len() < CHALLENGE.len() + 32 {
        return Err(refuse(stream, "expected a challenge"));
    }
    if ours == Some(challenge.as_slice()) {
        return Err(refuse(stream, "our own challenge was sent back"));
    }
    send_message(stream, &hmac_sha256(key, role, &challenge))?;
    match expect_message(stream)?.as_slice() {
        WELCOME => Ok(()),
        _ => Err(refuse(stream, "expected a welcome")),
    }
}

/// HMAC-SHA256 (RFC 2104) of `role || message` under `key`.
fn hmac_sha256(key: &[u8], role: &[u8], message: &[u8]) -> [u8; 32] {
    hmac_of(key, role, message).finalize().into_bytes().into()
}

fn hmac_of(key: &[u8], role: &[u8], message: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(role);
    mac.update(message);
    mac
}

/// Whether `answer` is the HMAC of `role || challenge` under `key`, compared
/// in constant time.
fn is_valid_answer(key: &[u8], role: &[u8], challenge: &[u8], answer: &[u8]) -> bool {
    hmac_of(key, role, challenge).verify_slice(answer).is_ok()
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn hmac_matches_the_rfc_4231_vectors_and_verifies() {
        // RFC 4231, test cases 2 and 6 (a key longer than the block).
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex(&hmac_sha256(
                &[0xaa; 131],
                b"",
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        let answer = hmac_sha256(b"key", CLIENT_ROLE, b"challenge");
        assert!(is_valid_answer(b"key", CLIENT_ROLE, b"challenge", &answer));
        assert!(!is_valid_answer(
            b"other key",
            CLIENT_ROLE,
            b"challenge",
            &answer
        ));
        assert!(!is_valid_answer(
            b"key",
            CLIENT_ROLE,
            b"challenge",
            &answer[..31]
        ));
        // One role's answer is not the other's.
        assert!(!is_valid_answer(
            b"key",
            LISTENER_ROLE,
            b"challenge",
            &answer
        ));
    }

    fn socket_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("mp-ipc-{name}-{}.sock", std::process::id()))
    }

    #[test]
    fn matching_keys_connect_and_talk_both_ways() {
        let path = socket_path("match");
        let listener = Listener::bind(&path, Some(b"key")).unwrap();
        assert_eq!(listener.address(), &Address::Unix(path.clone()));
        let client = {
            let path = path.clone();
            std::thread::spawn(move || {
                let conn = Client::connect(&path, Some(b"key")).unwrap();
                conn.send(1u32).unwrap();
                conn.recv_timeout::<u32>(HANDSHAKE_TIMEOUT).unwrap()
            })
        };
        let conn = listener.accept_timeout(HANDSHAKE_TIMEOUT).unwrap();
        let n: u32 = conn.recv_timeout(HANDSHAKE_TIMEOUT).unwrap();
        conn.send(n + 1).unwrap();
        assert_eq!(client.join().unwrap(), 2);
        drop(listener);
        assert!(
            !path.exists(),
            "the socket path is removed with the listener"
        );
    }

    #[test]
    fn a_wrong_key_is_refused_on_both_sides_and_the_listener_goes_on() {
        let path = socket_path("wrong");
        let listener = Listener::bind(&path, Some(b"right")).unwrap();
        let client = {
            let path = path.clone();
            std::thread::spawn(move || Client::connect(&path, Some(b"wrong")))
        };
        assert!(matches!(
            listener.accept(),
            Err(ConnectionError::Authentication(_))
        ));
        assert!(matches!(
            client.join().unwrap(),
            Err(ConnectionError::Authentication(_))
        ));
        let no_key = {
            let path = path.clone();
            std::thread::spawn(move || Client::connect(&path, None))
        };
        // The client says why it hangs up: an authentication error here too.
        assert!(matches!(
            listener.accept(),
            Err(ConnectionError::Authentication(_))
        ));
        assert!(matches!(
            no_key.join().unwrap(),
            Err(ConnectionError::Authentication(_))
        ));
        let good = std::thread::spawn(move || Client::connect(&path, Some(b"right")).map(|_| ()));
        listener.accept().unwrap();
        good.join().unwrap().unwrap();
    }

    #[test]
    fn without_keys_and_accept_timeout() {
        let path = socket_path("open");
        let listener = Listener::bind(&path, None).unwrap();
        let timeout = Duration::from_millis(100);
        let start = Instant::now();
        assert!(matches!(
            listener.accept_timeout(timeout),
            Err(ConnectionError::Timeout)
        ));
        assert!(start.elapsed() >= timeout);
        let client = std::thread::spawn(move || {
            Client::connect(&path, None)
                .unwrap()
                .recv::<String>()
                .unwrap()
        });
        listener.accept().unwrap().send("open").unwrap();
        assert_eq!(client.join().unwrap(), "open");
        assert!(
            Listener::bind(listener.address(), None).is_err(),
            "the path is in use"
        );
    }
}
