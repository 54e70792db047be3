//! A peer that connects to a `Listener` and writes arbitrary bytes instead of the handshake:
//! `accept` returns (a typed error; no panic) within the listener's handshake timeout, and the
//! listener keeps working for the next peer.
//!
//! Input: byte 0 picks the listener (even: no authkey, odd: with one); the rest is what the
//! peer writes before it stops sending (`shutdown(Write)`), as a client that speaks another
//! protocol, or a truncated or malicious one, would. Over loopback TCP (a Unix path would leave
//! a socket file behind each run: libFuzzer never drops the listeners).
#![no_main]

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use multiproc::mp_ipc::listener::{Address, Listener};

/// Short, so that a peer that stops sending mid-message costs little; the bound checked
/// below is far above it.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(200);

fn listener(authkey: bool) -> &'static Listener {
    static OPEN: OnceLock<Listener> = OnceLock::new();
    static AUTH: OnceLock<Listener> = OnceLock::new();
    let (slot, key) = if authkey {
        (&AUTH, Some(&b"fuzz-key"[..]))
    } else {
        (&OPEN, None)
    };
    slot.get_or_init(|| {
        Listener::bind(Address::tcp_loopback(0), key)
            .expect("a loopback listener binds")
            .handshake_timeout(HANDSHAKE_TIMEOUT)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, written)) = data.split_first() else {
        return;
    };
    let listener = listener(selector & 1 == 1);
    let Address::Tcp(address) = listener.address() else {
        unreachable!("bound to TCP")
    };
    let mut peer = TcpStream::connect(address).expect("connect to the listener");
    // The peer writes it all before accept reads (it fits the socket buffer: -max_len 4096),
    // then stops sending; it stays open (the listener's replies land in its buffer).
    let _ = peer.write_all(written);
    let _ = peer.shutdown(Shutdown::Write);
    let start = Instant::now();
    let accepted = listener.accept();
    let took = start.elapsed();
    assert!(
        took < HANDSHAKE_TIMEOUT * 10,
        "accept took {took:?} with a {HANDSHAKE_TIMEOUT:?} handshake timeout"
    );
    // Bytes that are not the protocol cannot name a live ipc-channel server of ours: the
    // hand-over cannot complete, so accept refuses with a typed error.
    assert!(accepted.is_err(), "a peer writing {written:?} was accepted");
    drop(peer);
});
