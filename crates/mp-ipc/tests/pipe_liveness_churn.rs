//! A live peer is never mistaken for a dead one, even while many other pipes come and go
//! (their presence pipes hang up all the time; the watcher must wake only the ends whose
//! own peer is gone).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mp_ipc::ConnectionError;
use mp_ipc::connection::Pipe;

#[test]
fn churn_elsewhere_never_closes_a_live_pipe() {
    let (reader, writer) = Pipe::simplex().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let churners: Vec<_> = (0..2)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                // Keep a few hundred locks listed, replacing them all the time.
                let mut held: Vec<_> = (0..150).map(|_| Pipe::duplex().unwrap()).collect();
                let mut next = 0;
                while !stop.load(Ordering::Relaxed) {
                    held[next] = Pipe::duplex().unwrap();
                    next = (next + 1) % held.len();
                }
            })
        })
        .collect();
    // Each wait spans thousands of hang-ups of other pipes.
    for _ in 0..4 {
        match reader.recv_timeout::<u32>(Duration::from_millis(500)) {
            Err(ConnectionError::Timeout) => {}
            other => panic!("a live writer was reported as {other:?}"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    for churner in churners {
        churner.join().unwrap();
    }
    drop(writer);
    assert!(matches!(
        reader.recv_timeout::<u32>(Duration::from_secs(10)),
        Err(ConnectionError::Closed)
    ));
}
