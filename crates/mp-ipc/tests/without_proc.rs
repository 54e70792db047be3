//! Pipes, queues, peer death and `wait` in a mount namespace where `/proc`
//! is an empty tmpfs: nothing in mp-ipc needs `/proc`.
//!
//! The test re-runs itself under `unshare --mount` (root, or a user
//! namespace); where namespaces are not permitted it says so and passes.
//! Children are forked (`StartMethod::Fork`): mp-core's spawn method
//! re-executes `/proc/self/exe`, which is mp-core's business, not this one's.

mod common;

use std::time::{Duration, Instant};

use mp_core::{Process, StartMethod};
use mp_ipc::connection::{Connection, ConnectionError, Pipe, Waitable, wait};
use mp_ipc::queue::Queue;

const PATIENCE: Duration = Duration::from_secs(20);

#[test]
fn pipes_queues_peer_death_and_wait_work_with_proc_hidden() {
    common::with_proc_hidden(
        "pipes_queues_peer_death_and_wait_work_with_proc_hidden",
        body,
    );
}

fn body() {
    // Creation and transfer, both kinds, both ways.
    let (here, there) = Pipe::duplex().unwrap();
    let queue: Queue<String> = Queue::bounded(4).unwrap();
    let child = Process::new(|(conn, queue): (Connection, Queue<String>)| {
        let n: u32 = conn.recv_timeout(PATIENCE).unwrap();
        queue.put(format!("got {n}")).unwrap();
        conn.send(n + 1).unwrap();
        // Hold the connection until killed.
        let _ = conn.recv_timeout::<u32>(PATIENCE);
    })
    .start_method(StartMethod::Fork)
    .args((there, queue.clone()))
    .start()
    .unwrap();
    // wait: nothing yet.
    let objects = [Waitable::from(&here), Waitable::from(child.sentinel())];
    assert!(
        wait(&objects, Some(Duration::from_millis(50)))
            .unwrap()
            .is_empty()
    );
    here.send(41u32).unwrap();
    assert_eq!(wait(&objects, Some(PATIENCE)).unwrap(), [0]);
    assert_eq!(here.recv_timeout::<u32>(PATIENCE).unwrap(), 42);
    assert_eq!(queue.get_timeout(PATIENCE).unwrap(), "got 41");
    // Peer death: recv returns Closed, wait reports the sentinel.
    child.kill().unwrap();
    assert!(matches!(
        here.recv_timeout::<u32>(PATIENCE),
        Err(ConnectionError::Closed)
    ));
    let deadline = Instant::now() + PATIENCE;
    while !wait(&objects, Some(PATIENCE)).unwrap().contains(&1) {
        assert!(Instant::now() < deadline, "the sentinel never became ready");
    }
    assert!(
        child.join_timeout(PATIENCE).is_err(),
        "the child was killed"
    );
}

/// The tests of this binary fork from libtest's threads. SAFETY (of the `allow_fork` below):
/// no test here holds a lock of its own, or of a library, that a forked child then uses; the
/// locks the children touch are mp-core's, which are safe across `fork()`.
#[ctor::ctor(unsafe)]
fn allow_fork_in_these_tests() {
    // SAFETY: see above: nothing a forked child uses is held by another thread of this binary.
    unsafe { mp_core::allow_fork() };
}
