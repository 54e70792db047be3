//! Pipes between processes: boundaries, large messages both ways at once,
//! the end of the line when a peer is dropped or killed, `wait`.

use std::time::{Duration, Instant};

use mp_core::Process;
use mp_ipc::connection::{Connection, ConnectionError, Pipe, Waitable, wait};
use mp_ipc::queue::Bytes;

/// Generous bound for anything that should happen "at once".
const PATIENCE: Duration = Duration::from_secs(20);

/// Message `i` of the boundary test: sizes from empty to out-of-band.
fn message(i: usize) -> Vec<u8> {
    let len = match i % 5 {
        0 => 0,
        1 => i % 17,
        2 => 1000 + i,
        3 => 5000 + 7 * i, // over a quarter of the 16 KiB ring: out of band
        _ => 8,
    };
    (0..len).map(|j| (i * 7 + j) as u8).collect()
}

#[test]
fn messages_are_never_merged_or_split() {
    const COUNT: usize = 2000;
    let (reader, writer) = Pipe::builder()
        .capacity_bytes(16 << 10)
        .build_simplex()
        .unwrap();
    let child = Process::new(|(writer, count): (Connection, usize)| {
        for i in 0..count {
            writer.send_bytes(&message(i)).unwrap();
        }
    })
    .args((writer, COUNT))
    .start()
    .unwrap();
    let mut buf = vec![0u8; 1 << 16];
    for i in 0..COUNT {
        let expected = message(i);
        if i % 2 == 0 {
            assert_eq!(
                reader.recv_bytes_timeout(PATIENCE).unwrap(),
                expected,
                "message {i}"
            );
        } else {
            let len = reader.recv_bytes_into_timeout(&mut buf, PATIENCE).unwrap();
            assert_eq!(&buf[..len], expected, "message {i}");
        }
    }
    child.join_timeout(PATIENCE).unwrap();
    // The writer is gone everywhere and everything was read.
    assert!(matches!(
        reader.recv_bytes_timeout(PATIENCE),
        Err(ConnectionError::Closed)
    ));
}

#[test]
fn ping_pong_with_a_child() {
    let (here, there) = Pipe::duplex().unwrap();
    let child = Process::new(|conn: Connection| {
        while let Ok(n) = conn.recv_timeout::<u64>(PATIENCE) {
            conn.send(n + 1).unwrap();
        }
    })
    .args(there)
    .start()
    .unwrap();
    let mut n = 0u64;
    for _ in 0..1000 {
        here.send(n).unwrap();
        n = here.recv_timeout(PATIENCE).unwrap();
    }
    assert_eq!(n, 1000);
    drop(here); // the child's recv sees Closed and it returns
    child.join_timeout(PATIENCE).unwrap();
}

/// Block copies: fast in debug builds too.
fn big(len: usize, seed: u8) -> Bytes {
    let block: Vec<u8> = (0..253u8)
        .map(|i| i.wrapping_mul(13).wrapping_add(seed))
        .collect();
    let mut bytes = block.repeat(len / block.len() + 1);
    bytes.truncate(len);
    Bytes(bytes)
}

#[test]
fn both_ends_send_256_mib_at_once_without_deadlock() {
    const LEN: usize = 256 << 20;
    let (here, there) = Pipe::duplex().unwrap();
    let child = Process::new(|conn: Connection| {
        conn.send_bytes(&big(LEN, 2)).unwrap();
        let got = conn.recv_bytes_timeout(PATIENCE).unwrap();
        got == big(LEN, 1).0
    })
    .args(there)
    .start()
    .unwrap();
    here.send_bytes(&big(LEN, 1)).unwrap();
    let got = here.recv_bytes_timeout(PATIENCE).unwrap();
    assert!(got == big(LEN, 2).0, "the child's message arrived changed");
    assert!(
        child.join_timeout(PATIENCE).unwrap(),
        "the parent's message arrived changed"
    );
}

#[test]
fn recv_returns_closed_when_the_writer_process_is_killed() {
    let (reader, writer) = Pipe::simplex().unwrap();
    let (ready_reader, ready_writer) = Pipe::simplex().unwrap();
    let child = Process::new(|(writer, ready): (Connection, Connection)| {
        writer.send(1u8).unwrap();
        ready.send(()).unwrap();
        // Hold the writer until killed.
        std::thread::sleep(PATIENCE);
    })
    .args((writer, ready_writer))
    .start()
    .unwrap();
    ready_reader.recv_timeout::<()>(PATIENCE).unwrap();
    child.kill().unwrap();
    let start = Instant::now();
    assert_eq!(
        reader.recv_timeout::<u8>(PATIENCE).unwrap(),
        1,
        "data sent before the kill is kept"
    );
    assert!(matches!(
        reader.recv_timeout::<u8>(PATIENCE),
        Err(ConnectionError::Closed)
    ));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "noticed after {:?}",
        start.elapsed()
    );
    assert!(
        child.join_timeout(PATIENCE).is_err(),
        "the child was killed"
    );
}

#[test]
fn send_returns_closed_when_the_reader_process_is_killed_and_the_ring_fills() {
    let (reader, writer) = Pipe::builder()
        .capacity_bytes(4096)
        .build_simplex()
        .unwrap();
    let (ready_reader, ready_writer) = Pipe::simplex().unwrap();
    let child = Process::new(|(reader, ready): (Connection, Connection)| {
        ready.send(()).unwrap();
        let _hold = reader;
        std::thread::sleep(PATIENCE);
    })
    .args((reader, ready_writer))
    .start()
    .unwrap();
    ready_reader.recv_timeout::<()>(PATIENCE).unwrap();
    child.kill().unwrap();
    let start = Instant::now();
    let result = loop {
        if let Err(error) = writer.send_bytes(&[0; 100]) {
            break error;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "send never noticed the dead reader"
        );
    };
    assert!(matches!(result, ConnectionError::Closed), "{result}");
    assert!(child.join_timeout(PATIENCE).is_err());
}

#[test]
fn recv_returns_closed_when_the_writer_process_exits_normally() {
    let (reader, writer) = Pipe::simplex().unwrap();
    let child = Process::new(|writer: Connection| writer.send("bye").unwrap())
        .args(writer)
        .start()
        .unwrap();
    assert_eq!(reader.recv_timeout::<String>(PATIENCE).unwrap(), "bye");
    assert!(matches!(
        reader.recv_timeout::<String>(PATIENCE),
        Err(ConnectionError::Closed)
    ));
    child.join_timeout(PATIENCE).unwrap();
}

#[test]
fn wait_over_connections_and_a_process_sentinel() {
    let (a, b) = Pipe::duplex().unwrap();
    let (ready_reader, ready_writer) = Pipe::simplex().unwrap();
    let child = Process::new(|(conn, ready): (Connection, Connection)| {
        let go: u8 = conn.recv_timeout(PATIENCE).unwrap();
        conn.send(go + 1).unwrap();
        drop(ready);
    })
    .args((b, ready_writer))
    .start()
    .unwrap();
    let timeout = Duration::from_millis(100);
    let start = Instant::now();
    let objects = [Waitable::from(&a), Waitable::from(child.sentinel())];
    assert!(wait(&objects, Some(timeout)).unwrap().is_empty());
    assert!(start.elapsed() >= timeout);
    a.send(1u8).unwrap();
    assert!(wait(&objects, Some(PATIENCE)).unwrap().contains(&0));
    assert_eq!(a.recv_timeout::<u8>(PATIENCE).unwrap(), 2);
    // The child ends: its sentinel becomes ready (and a's peer goes away).
    assert!(matches!(
        ready_reader.recv_timeout::<u8>(PATIENCE),
        Err(ConnectionError::Closed)
    ));
    let deadline = Instant::now() + PATIENCE;
    while !wait(&objects, Some(PATIENCE)).unwrap().contains(&1) {
        assert!(Instant::now() < deadline);
    }
    child.join_timeout(PATIENCE).unwrap();
}

#[test]
fn poll_times_out_then_sees_a_message() {
    let (a, b) = Pipe::duplex().unwrap();
    let timeout = Duration::from_millis(100);
    let start = Instant::now();
    assert!(!b.poll(Some(timeout)).unwrap());
    let waited = start.elapsed();
    assert!(
        waited >= timeout && waited < timeout + Duration::from_secs(2),
        "{waited:?}"
    );
    let child = Process::new(|a: Connection| a.send(7u32).unwrap())
        .args(a)
        .start()
        .unwrap();
    assert!(b.poll(Some(PATIENCE)).unwrap());
    assert_eq!(b.recv::<u32>().unwrap(), 7);
    child.join_timeout(PATIENCE).unwrap();
}

/// The kernel's hang-up, not a periodic check, tells a blocked reader that
/// its writer was killed.
#[test]
fn a_killed_writer_wakes_a_blocked_reader_at_once() {
    let (reader, writer) = Pipe::simplex().unwrap();
    let (ready_reader, ready_writer) = Pipe::simplex().unwrap();
    let child = Process::new(|(writer, ready): (Connection, Connection)| {
        ready.send(()).unwrap();
        // Hold the writer until killed.
        std::thread::sleep(PATIENCE);
        drop(writer);
    })
    .args((writer, ready_writer))
    .start()
    .unwrap();
    ready_reader.recv_timeout::<()>(PATIENCE).unwrap();
    let blocked = std::thread::spawn(move || {
        let outcome = reader.recv_timeout::<u8>(PATIENCE);
        (outcome, Instant::now())
    });
    // Let the reader go to sleep (the kill must wake a sleeper, whatever
    // the interleaving; this only makes the sleeping case the likely one).
    std::thread::sleep(Duration::from_millis(100));
    let killed_at = Instant::now();
    child.kill().unwrap();
    let (outcome, woke_at) = blocked.join().unwrap();
    assert!(
        matches!(outcome, Err(ConnectionError::Closed)),
        "{outcome:?}"
    );
    let latency = woke_at - killed_at;
    eprintln!("recv returned Closed {latency:?} after SIGKILL was sent");
    assert!(
        latency < Duration::from_millis(500),
        "the death was noticed after {latency:?}"
    );
    assert!(child.join_timeout(PATIENCE).is_err());
}
