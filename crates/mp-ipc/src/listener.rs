//! Connections between processes that do not share a parent: a [`Listener`]
//! bound to a Unix socket path hands a [`Connection`] to every [`Client`]
//! that connects and, if an authkey is set, proves it knows the key
//! (Python's `multiprocessing.connection.Listener` / `Client`).
//!
//! ```
//! use mp_ipc::listener::{Client, Listener};
//!
//! let path = std::env::temp_dir().join(format!("mp-ipc-doc-{}.sock", std::process::id()));
//! let listener = Listener::bind(&path, Some(b"secret"))?;
//! let client = std::thread::spawn(move || {
//!     let conn = Client::connect(&path, Some(b"secret")).unwrap();
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
//! under the key (mutual authentication, as in Python; keys never travel).
//! Then the listener creates a duplex [`Pipe`] and passes one end to the
//! client through an ipc-channel (memfds travel as file descriptors): the
//! connection itself is the usual shared-memory one. Every step of the
//! handshake is bounded by [`HANDSHAKE_TIMEOUT`], so a client that stalls
//! cannot hang `accept`. The socket path is removed when the listener is
//! dropped.

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipc_channel::ipc::{IpcOneShotServer, IpcSender};

use crate::connection::{Connection, ConnectionError, Pipe};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::ring::random_token;

/// The longest any step of the handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// First message from the listener: protocol version and whether it authenticates.
const HELLO_OPEN: &[u8] = b"#MP-IPC-LISTENER-1#open";
const HELLO_AUTH: &[u8] = b"#MP-IPC-LISTENER-1#auth";
const CHALLENGE: &[u8] = b"#CHALLENGE#";
const WELCOME: &[u8] = b"#WELCOME#";
const FAILURE: &[u8] = b"#FAILURE#";
/// Largest handshake message accepted.
const MAX_MESSAGE: usize = 4096;

fn io_error(op: &'static str) -> impl FnOnce(io::Error) -> ConnectionError {
    move |source| ConnectionError::Io { op, source }
}

/// Accepts connections on a Unix socket path (Python's `Listener`).
#[derive(Debug)]
pub struct Listener {
    socket: UnixListener,
    path: PathBuf,
    authkey: Option<Vec<u8>>,
    pipe: Pipe,
}

impl Listener {
    /// Binds to `path` (which must not exist). With `authkey`, only clients
    /// that know the same key are accepted.
    pub fn bind(
        path: impl AsRef<Path>,
        authkey: Option<&[u8]>,
    ) -> Result<Listener, ConnectionError> {
        let path = path.as_ref().to_path_buf();
        let socket = UnixListener::bind(&path).map_err(io_error("binding the listener socket"))?;
        tracing::debug!(path = %path.display(), auth = authkey.is_some(), "listener bound");
        Ok(Listener {
            socket,
            path,
            authkey: authkey.map(<[u8]>::to_vec),
            pipe: Pipe::builder(),
        })
    }

    /// The options of the pipes created for accepted connections (e.g. their ring size).
    pub fn pipe_options(mut self, pipe: Pipe) -> Listener {
        self.pipe = pipe;
        self
    }

    /// The socket path clients connect to (Python's `address`).
    pub fn address(&self) -> &Path {
        &self.path
    }

    /// Waits for a client and returns the connection to it. A client that
    /// fails the handshake (wrong key, stalls) is an error for this call;
    /// the listener keeps working.
    pub fn accept(&self) -> Result<Connection, ConnectionError> {
        let (stream, _) = self
            .socket
            .accept()
            .map_err(io_error("accepting a client"))?;
        self.handshake(stream)
    }

    /// Like [`accept`](Self::accept), giving up after `timeout` if no client
    /// comes ([`ConnectionError::Timeout`]).
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Connection, ConnectionError> {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut fds = [PollFd::new(&self.socket, PollFlags::IN)];
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

    fn handshake(&self, mut stream: UnixStream) -> Result<Connection, ConnectionError> {
        bound(&stream)?;
        match &self.authkey {
            None => send_message(&mut stream, HELLO_OPEN)?,
            Some(key) => {
                send_message(&mut stream, HELLO_AUTH)?;
                deliver_challenge(&mut stream, key)?;
                answer_challenge(&mut stream, key)?;
            }
        }
        // The client names an ipc-channel server; its end of the pipe goes there.
        let name = String::from_utf8(receive_message(&mut stream)?).map_err(|_| {
            ConnectionError::Authentication("bad channel name from the client".into())
        })?;
        let (ours, theirs) = self.pipe.clone().build_duplex()?;
        let sender = IpcSender::<Connection>::connect(name)
            .map_err(io_error("connecting to the client's channel"))?;
        sender.send(theirs).map_err(|e| ConnectionError::Io {
            op: "handing the connection over",
            source: io::Error::other(format!("{e:?}")),
        })?;
        tracing::debug!(path = %self.path.display(), "client accepted");
        Ok(ours)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), %error, "could not remove the listener socket");
        }
    }
}

/// Connects to a [`Listener`] (Python's `Client`).
#[derive(Debug)]
pub struct Client;

impl Client {
    /// Connects to the listener at `path`, proving knowledge of `authkey`
    /// if the listener asks for it (and checking that the listener knows it too).
    pub fn connect(
        path: impl AsRef<Path>,
        authkey: Option<&[u8]>,
    ) -> Result<Connection, ConnectionError> {
        let mut stream =
            UnixStream::connect(path.as_ref()).map_err(io_error("connecting to the listener"))?;
        bound(&stream)?;
        let hello = receive_message(&mut stream)?;
        match (hello.as_slice(), authkey) {
            (HELLO_OPEN, None) => {}
            (HELLO_AUTH, Some(key)) => {
                answer_challenge(&mut stream, key)?;
                deliver_challenge(&mut stream, key)?;
            }
            (HELLO_AUTH, None) => {
                return Err(ConnectionError::Authentication(
                    "the listener requires an authkey".into(),
                ));
            }
            (HELLO_OPEN, Some(_)) => {
                return Err(ConnectionError::Authentication(
                    "the listener does not authenticate".into(),
                ));
            }
            _ => {
                return Err(ConnectionError::Authentication(
                    "not a multiproc listener".into(),
                ));
            }
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

/// Bounds every read and write of the handshake.
fn bound(stream: &UnixStream) -> Result<(), ConnectionError> {
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(io_error("setsockopt"))?;
    stream
        .set_write_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(io_error("setsockopt"))
}

fn send_message(stream: &mut UnixStream, message: &[u8]) -> Result<(), ConnectionError> {
    let len = u32::try_from(message.len()).expect("handshake messages are small");
    stream
        .write_all(&len.to_le_bytes())
        .and_then(|()| stream.write_all(message))
        .map_err(io_error("writing to the socket"))
}

fn receive_message(stream: &mut UnixStream) -> Result<Vec<u8>, ConnectionError> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).map_err(handshake_read_error)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(ConnectionError::Authentication(format!(
            "handshake message of {len} bytes"
        )));
    }
    let mut message = vec![0; len];
    stream
        .read_exact(&mut message)
        .map_err(handshake_read_error)?;
    Ok(message)
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

/// Sends a random challenge and checks the peer's HMAC of it.
fn deliver_challenge(stream: &mut UnixStream, key: &[u8]) -> Result<(), ConnectionError> {
    let mut nonce = random_token().map_err(io_error("getrandom"))?.to_vec();
    nonce.extend(random_token().map_err(io_error("getrandom"))?);
    let challenge = [CHALLENGE, &nonce].concat();
    send_message(stream, &challenge)?;
    let answer = receive_message(stream)?;
    if is_valid_answer(key, &challenge, &answer) {
        send_message(stream, WELCOME)
    } else {
        let _ = send_message(stream, FAILURE);
        Err(ConnectionError::Authentication(
            "the peer does not know the authkey".into(),
        ))
    }
}

/// Answers the peer's challenge with its HMAC under `key`.
fn answer_challenge(stream: &mut UnixStream, key: &[u8]) -> Result<(), ConnectionError> {
    let challenge = receive_message(stream)?;
    if !challenge.starts_with(CHALLENGE) {
        return Err(ConnectionError::Authentication(
            "expected a challenge".into(),
        ));
    }
    send_message(stream, &hmac_sha256(key, &challenge))?;
    match receive_message(stream)?.as_slice() {
        WELCOME => Ok(()),
        _ => Err(ConnectionError::Authentication(
            "the peer rejected our authkey".into(),
        )),
    }
}

/// HMAC-SHA256 (RFC 2104) of `message` under `key`.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    hmac_of(key, message).finalize().into_bytes().into()
}

fn hmac_of(key: &[u8], message: &[u8]) -> Hmac<Sha256> {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(message);
    mac
}

/// Whether `answer` is the HMAC of `challenge` under `key`, compared in constant time.
fn is_valid_answer(key: &[u8], challenge: &[u8], answer: &[u8]) -> bool {
    hmac_of(key, challenge).verify_slice(answer).is_ok()
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
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        assert_eq!(
            hex(&hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        let answer = hmac_sha256(b"key", b"challenge");
        assert!(is_valid_answer(b"key", b"challenge", &answer));
        assert!(!is_valid_answer(b"other key", b"challenge", &answer));
        assert!(!is_valid_answer(b"key", b"challenge", &answer[..31]));
    }

    fn socket_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("mp-ipc-{name}-{}.sock", std::process::id()))
    }

    #[test]
    fn matching_keys_connect_and_talk_both_ways() {
        let path = socket_path("match");
        let listener = Listener::bind(&path, Some(b"key")).unwrap();
        assert_eq!(listener.address(), path);
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
        // The listener sees the client hang up after the hello.
        assert!(listener.accept().is_err());
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
