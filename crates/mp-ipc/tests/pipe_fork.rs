//! A child forked (StartMethod::Fork) from a process that uses pipes: it does
//! not keep its parent's pipe ends open, and it never inherits one of the
//! transport's locks held by another thread.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::Duration;

use mp_core::{Process, StartMethod};
use mp_ipc::connection::{Connection, ConnectionError, Pipe};
use mp_ipc::queue::Queue;

/// Generous bound for anything that should happen "at once".
const PATIENCE: Duration = Duration::from_secs(20);

fn allow_fork() {
    // SAFETY: the threads of these tests (the test harness's and the
    // hammering threads below) only take locks of mp-ipc, which are made
    // safe across fork (what these tests check), and of the allocator,
    // which glibc resets.
    unsafe { mp_core::allow_fork() };
}

#[test]
fn a_forked_child_does_not_keep_its_parents_pipe_end_open() {
    allow_fork();
    let (reader, writer) = Pipe::simplex().unwrap();
    let (hold_reader, hold_writer) = Pipe::simplex().unwrap();
    // The child inherits copies of `writer` and `hold_writer`; it waits until
    // the parent drops `hold_writer`, which it sees only if its own inherited
    // copy does not count.
    let child = Process::new(|hold: Connection| {
        matches!(
            hold.recv_timeout::<()>(PATIENCE),
            Err(ConnectionError::Closed)
        )
    })
    .args(hold_reader)
    .start_method(StartMethod::Fork)
    .start()
    .unwrap();
    writer.send(1u8).unwrap();
    drop(writer);
    assert_eq!(reader.recv_timeout::<u8>(PATIENCE).unwrap(), 1);
    // The forked child still runs (it waits for `hold`), and holds the
    // parent's copy of the writer: that copy does not keep the end open.
    assert!(matches!(
        reader.recv_timeout::<u8>(PATIENCE),
        Err(ConnectionError::Closed)
    ));
    assert!(child.is_alive());
    drop(hold_writer);
    assert!(
        child.join_timeout(PATIENCE).unwrap(),
        "the child's handle saw the end when the parent dropped its own"
    );
}

#[test]
fn forks_while_other_threads_use_the_transport_never_deadlock_the_child() {
    allow_fork();
    let stop = Arc::new(AtomicBool::new(false));
    // Threads that keep the courier, the liveness watcher and the registry
    // of presences busy (their locks taken and released all the time).
    let hammers: Vec<_> = (0..2)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let (tx, rx) = ipc_channel::ipc::channel::<Connection>().unwrap();
                while !stop.load(Relaxed) {
                    let (a, b) = Pipe::duplex().unwrap();
                    tx.send(a).unwrap(); // lent through the courier
                    let a = rx.recv().unwrap();
                    a.send(&b).unwrap(); // lent inside a message
                    drop(b);
                    let b = a.recv_timeout::<Connection>(PATIENCE);
                    drop((a, b));
                }
            })
        })
        .collect();
    for round in 0..20u32 {
        let queue: Queue<u32> = Queue::bounded(1).unwrap();
        let child = Process::new(|(queue, round): (Queue<u32>, u32)| {
            // Everything that takes a transport lock in the child.
            let (a, b) = Pipe::duplex().unwrap();
            let (tx, rx) = ipc_channel::ipc::channel::<Connection>().unwrap();
            tx.send(a).unwrap();
            let a = rx.recv().unwrap();
            a.send((round, &queue)).unwrap();
            let (round, queue) = b.recv_timeout::<(u32, Queue<u32>)>(PATIENCE).unwrap();
            queue.put(round).unwrap();
        })
        .args((queue.clone(), round))
        .start_method(StartMethod::Fork)
        .start()
        .unwrap();
        child
            .join_timeout(PATIENCE)
            .unwrap_or_else(|error| panic!("forked child {round}: {error}"));
        assert_eq!(queue.get_timeout(PATIENCE).unwrap(), round);
    }
    stop.store(true, Relaxed);
    for hammer in hammers {
        hammer.join().unwrap();
    }
}
