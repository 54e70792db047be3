//! A child process finds the parent's listener by its path and authkey.

use std::path::PathBuf;
use std::time::Duration;

use mp_core::Process;
use mp_ipc::connection::ConnectionError;
use mp_ipc::listener::{Client, Listener};

const PATIENCE: Duration = Duration::from_secs(20);

#[test]
fn a_child_connects_to_the_parents_listener_with_the_authkey() {
    let path = std::env::temp_dir().join(format!("mp-ipc-listener-{}.sock", std::process::id()));
    let listener = Listener::bind(&path, Some(b"shared secret")).unwrap();
    let child = Process::new(|path: PathBuf| {
        let wrong = Client::connect(&path, Some(b"guess"));
        let conn = Client::connect(&path, Some(b"shared secret")).unwrap();
        let n: u64 = conn.recv_timeout(PATIENCE).unwrap();
        conn.send(n * 2).unwrap();
        matches!(wrong, Err(ConnectionError::Authentication(_)))
    })
    .args(path)
    .start()
    .unwrap();
    assert!(matches!(
        listener.accept_timeout(PATIENCE),
        Err(ConnectionError::Authentication(_))
    ));
    let conn = listener.accept_timeout(PATIENCE).unwrap();
    conn.send(21u64).unwrap();
    assert_eq!(conn.recv_timeout::<u64>(PATIENCE).unwrap(), 42);
    assert!(
        child.join_timeout(PATIENCE).unwrap(),
        "the wrong key was not refused"
    );
    // The child is gone: its end of the connection is too.
    assert!(matches!(
        conn.recv_timeout::<u64>(PATIENCE),
        Err(ConnectionError::Closed)
    ));
}

mod tcp_and_refusals {
    use super::PATIENCE;
    use mp_core::Process;
    use mp_ipc::connection::ConnectionError;
    use mp_ipc::listener::{Address, Client, Listener};
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::time::{Duration, Instant};

    #[test]
    fn a_child_connects_over_tcp_to_a_port_the_system_chose() {
        let listener = Listener::bind(Address::tcp_loopback(0), Some(b"tcp key")).unwrap();
        let Address::Tcp(bound) = listener.address().clone() else {
            panic!("a TCP listener reports a TCP address");
        };
        assert_ne!(bound.port(), 0, "the chosen port is reported");
        let child = Process::new(|address: Address| {
            let conn = Client::connect(address, Some(b"tcp key")).unwrap();
            let n: u64 = conn.recv_timeout(PATIENCE).unwrap();
            conn.send(n + 1).unwrap();
        })
        .args(Address::Tcp(bound))
        .start()
        .unwrap();
        let conn = listener.accept_timeout(PATIENCE).unwrap();
        conn.send(41u64).unwrap();
        assert_eq!(conn.recv_timeout::<u64>(PATIENCE).unwrap(), 42);
        child.join_timeout(PATIENCE).unwrap();
    }

    /// Runs one client against `listener`; both results.
    fn attempt(
        listener: &Listener,
        key: Option<&'static [u8]>,
    ) -> (Result<(), ConnectionError>, Result<(), ConnectionError>) {
        let address = listener.address().clone();
        let client = std::thread::spawn(move || Client::connect(address, key).map(drop));
        let server = listener.accept_timeout(PATIENCE).map(drop);
        (server, client.join().unwrap())
    }

    fn assert_refused_on_both_sides(
        outcome: (Result<(), ConnectionError>, Result<(), ConnectionError>),
        case: &str,
    ) {
        let (server, client) = outcome;
        assert!(
            matches!(server, Err(ConnectionError::Authentication(_))),
            "{case}: listener got {server:?}"
        );
        assert!(
            matches!(client, Err(ConnectionError::Authentication(_))),
            "{case}: client got {client:?}"
        );
    }

    #[test]
    fn every_refusal_is_an_authentication_error_on_both_sides() {
        for address in [Address::tcp_loopback(0), Address::generated_unix().unwrap()] {
            let keyed = Listener::bind(&address, Some(b"right")).unwrap();
            assert_refused_on_both_sides(attempt(&keyed, Some(b"wrong")), "wrong key");
            assert_refused_on_both_sides(attempt(&keyed, None), "client without a key");
            let (server, client) = attempt(&keyed, Some(b"right"));
            server.unwrap();
            client.unwrap();
            drop(keyed);
            let open = Listener::bind(&address, None).unwrap();
            assert_refused_on_both_sides(attempt(&open, Some(b"key")), "listener without a key");
            let (server, client) = attempt(&open, None);
            server.unwrap();
            client.unwrap();
        }
    }

    #[test]
    fn a_generated_address_is_fresh_and_removed_with_the_listener() {
        let first = Listener::bind_generated(None).unwrap();
        let second = Listener::bind_generated(None).unwrap();
        assert_ne!(first.address(), second.address());
        let Address::Unix(path) = first.address().clone() else {
            panic!("a generated address is a Unix path");
        };
        assert!(path.exists());
        drop(first);
        assert!(!path.exists());
    }

    /// Forwards one connection to `target`, recording what the client sent.
    fn recording_proxy(target: Address) -> (Address, std::thread::JoinHandle<Vec<u8>>) {
        let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = Address::Tcp(proxy.local_addr().unwrap());
        let Address::Tcp(target) = target else {
            panic!("TCP target")
        };
        let recorder = std::thread::spawn(move || {
            let (mut client, _) = proxy.accept().unwrap();
            let mut server = TcpStream::connect(target).unwrap();
            for s in [&client, &server] {
                s.set_read_timeout(Some(PATIENCE)).unwrap();
            }
            let (mut server_in, mut client_out) =
                (server.try_clone().unwrap(), client.try_clone().unwrap());
            let downstream = std::thread::spawn(move || {
                let _ = std::io::copy(&mut server_in, &mut client_out);
                let _ = client_out.shutdown(Shutdown::Write);
            });
            let mut recorded = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                match client.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        recorded.extend_from_slice(&buf[..n]);
                        if server.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = server.shutdown(Shutdown::Both);
            let _ = downstream.join();
            recorded
        });
        (address, recorder)
    }

    #[test]
    fn a_recorded_handshake_replayed_is_refused() {
        let listener = Listener::bind(Address::tcp_loopback(0), Some(b"key")).unwrap();
        let (proxy, recorder) = recording_proxy(listener.address().clone());
        let client = std::thread::spawn(move || Client::connect(proxy, Some(b"key")).map(drop));
        listener.accept_timeout(PATIENCE).unwrap();
        client.join().unwrap().unwrap();
        let recorded = recorder.join().unwrap();
        assert!(!recorded.is_empty());

        // The attacker replays the client's side of that handshake verbatim.
        let Address::Tcp(target) = listener.address().clone() else {
            unreachable!()
        };
        let attacker = std::thread::spawn(move || {
            let mut stream = TcpStream::connect(target).unwrap();
            stream.set_read_timeout(Some(PATIENCE)).unwrap();
            let _ = stream.write_all(&recorded);
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer);
            answer
        });
        assert!(matches!(
            listener.accept_timeout(PATIENCE),
            Err(ConnectionError::Authentication(_))
        ));
        let answer = attacker.join().unwrap();
        assert!(
            answer.windows(9).any(|w| w == b"#REFUSED#"),
            "the replay is told it is refused"
        );
    }

    /// xorshift64*: a seeded, reproducible stream of bytes.
    struct Bytes(u64);

    impl Bytes {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        /// A malformed handshake: framed or not, with lengths at the edges.
        fn handshake(&mut self) -> Vec<u8> {
            let mut out = Vec::new();
            for _ in 0..self.below(4) {
                let len = match self.below(6) {
                    0 => 0,
                    1 => 4096,
                    2 => 4097,
                    3 => u32::MAX,
                    _ => self.below(80) as u32,
                };
                out.extend_from_slice(&len.to_le_bytes());
                let body = len.min(200) as usize;
                let known: &[&[u8]] = &[b"#CHALLENGE#", b"#WELCOME#", b"#REFUSED#", b"#MP-"];
                if self.below(3) == 0 {
                    out.extend_from_slice(known[self.below(known.len() as u64) as usize]);
                }
                out.extend((0..body).map(|_| self.next() as u8));
            }
            if self.below(4) == 0 {
                out.truncate(self.below(out.len() as u64 + 1) as usize);
            }
            out
        }
    }

    #[test]
    fn malformed_handshakes_never_panic_or_hang_the_listener() {
        for key in [Some(&b"fuzz key"[..]), None] {
            let listener = Listener::bind(Address::tcp_loopback(0), key)
                .unwrap()
                .handshake_timeout(Duration::from_millis(300));
            let Address::Tcp(target) = listener.address().clone() else {
                unreachable!()
            };
            let mut bytes = Bytes(0x9e37_79b9_7f4a_7c15 ^ u64::from(key.is_some()));
            let started = Instant::now();
            for case in 0..150 {
                let junk = bytes.handshake();
                let hold_open = case % 25 == 0; // a client that stalls
                let client = std::thread::spawn(move || {
                    let mut stream = TcpStream::connect(target).unwrap();
                    stream.set_read_timeout(Some(PATIENCE)).unwrap();
                    let _ = stream.write_all(&junk);
                    if !hold_open {
                        let _ = stream.shutdown(Shutdown::Write);
                    }
                    let mut answer = Vec::new();
                    let _ = stream.read_to_end(&mut answer);
                });
                let outcome = listener.accept_timeout(PATIENCE);
                assert!(outcome.is_err(), "case {case} was accepted");
                client.join().unwrap();
            }
            assert!(started.elapsed() < PATIENCE * 3, "the fuzz run dragged");
            // Still serving well-formed clients.
            let client = std::thread::spawn(move || Client::connect(target, key).map(drop));
            listener.accept_timeout(PATIENCE).unwrap();
            client.join().unwrap().unwrap();
        }
    }
}
