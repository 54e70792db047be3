//! Handles sent inside Pipe messages, between processes: they arrive as the
//! same objects, and a handle whose receiver never reads it (dropped, killed)
//! leaves nothing open.

mod common;

use std::time::Duration;

use mp_core::Process;
use mp_ipc::connection::{Connection, ConnectionError, Pipe};
use mp_ipc::queue::{JoinableQueue, Queue, SimpleQueue};
use mp_ipc::{Event, Lock, Value};

/// Generous bound for anything that should happen "at once".
const PATIENCE: Duration = Duration::from_secs(20);

#[test]
fn a_connection_sent_over_a_connection_talks_to_the_same_peer() {
    let (parent_end, child_end) = Pipe::duplex().unwrap();
    let (near, far) = Pipe::duplex().unwrap();
    let child = Process::new(|carrier: Connection| {
        let (greeting, far) = carrier
            .recv_timeout::<(String, Connection)>(PATIENCE)
            .unwrap();
        far.send(format!("{greeting} back")).unwrap();
        let number: u64 = far.recv_timeout(PATIENCE).unwrap();
        far.send(number * 2).unwrap();
    })
    .args(child_end)
    .start()
    .unwrap();
    parent_end.send(("hello".to_string(), &far)).unwrap();
    drop(far);
    assert_eq!(near.recv_timeout::<String>(PATIENCE).unwrap(), "hello back");
    near.send(21u64).unwrap();
    assert_eq!(near.recv_timeout::<u64>(PATIENCE).unwrap(), 42);
    child.join_timeout(PATIENCE).unwrap();
    // The child's copy (received in the message) was the last handle of `far`.
    assert!(matches!(
        near.recv_timeout::<u64>(PATIENCE),
        Err(ConnectionError::Closed)
    ));
}

#[test]
fn queues_sent_in_messages_are_the_same_queues() {
    let (parent_end, child_end) = Pipe::simplex().unwrap();
    let queue: Queue<u32> = Queue::bounded(8).unwrap();
    let simple: SimpleQueue<String> = SimpleQueue::new().unwrap();
    let joinable: JoinableQueue<u8> = JoinableQueue::unbounded().unwrap();
    type Handles = (u32, Queue<u32>, SimpleQueue<String>, JoinableQueue<u8>);
    let child = Process::new(|carrier: Connection| {
        let (base, queue, simple, joinable) = carrier.recv_timeout::<Handles>(PATIENCE).unwrap();
        queue.put(base + 1).unwrap();
        simple.put(format!("item {base}")).unwrap();
        let task = joinable.get_timeout(PATIENCE).unwrap();
        joinable.put(task + 1).unwrap();
        joinable.task_done().unwrap();
    })
    .args(parent_end)
    .start()
    .unwrap();
    joinable.put(9).unwrap();
    child_end.send((41u32, &queue, &simple, &joinable)).unwrap();
    assert_eq!(queue.get_timeout(PATIENCE).unwrap(), 42);
    assert_eq!(simple.get_timeout(PATIENCE).unwrap(), "item 41");
    child.join_timeout(PATIENCE).unwrap();
    assert_eq!(joinable.get_timeout(PATIENCE).unwrap(), 10);
    joinable.task_done().unwrap();
    joinable.join_timeout(PATIENCE).unwrap();
}

#[test]
fn many_writers_sending_handles_at_once_each_arrive_with_their_message() {
    const WRITERS: u32 = 4;
    const EACH: u32 = 25;
    let (reader, writer) = Pipe::simplex().unwrap();
    let children: Vec<_> = (0..WRITERS)
        .map(|w| {
            Process::new(|(writer, w): (Connection, u32)| {
                for i in 0..EACH {
                    let id = w * 1000 + i;
                    let queue: Queue<u32> = Queue::bounded(1).unwrap();
                    queue.put(id).unwrap();
                    writer.send((id, queue)).unwrap();
                }
            })
            .args((writer.clone(), w))
            .start()
            .unwrap()
        })
        .collect();
    drop(writer);
    for _ in 0..WRITERS * EACH {
        let (id, queue) = reader.recv_timeout::<(u32, Queue<u32>)>(PATIENCE).unwrap();
        assert_eq!(
            queue.get_timeout(PATIENCE).unwrap(),
            id,
            "a handle arrived with another message"
        );
    }
    for child in children {
        child.join_timeout(PATIENCE).unwrap();
    }
    assert!(matches!(
        reader.recv_timeout::<u8>(PATIENCE),
        Err(ConnectionError::Closed)
    ));
}

/// Sends one end of a fresh pipe, inside a message, to a reader that never
/// reads it, then runs `lose_reader`; the kept end must then see `Closed`
/// (every descriptor of the sent end is gone, the in-flight ones included)
/// and the process holds no more descriptors than before. Twice: the first
/// round starts what the library starts once per process (threads, their
/// descriptors); the second is counted.
fn a_sent_end_is_closed_when(lose_reader: impl Fn(Connection)) {
    one_round(&lose_reader);
    let before = common::open_descriptors();
    one_round(&lose_reader);
    assert!(
        common::eventually(|| common::open_descriptors() <= before),
        "{} descriptors open, {before} before",
        common::open_descriptors()
    );
}

fn one_round(lose_reader: &impl Fn(Connection)) {
    let (reader, writer) = Pipe::simplex().unwrap();
    let (kept, sent) = Pipe::duplex().unwrap();
    writer.send((1u8, &sent)).unwrap();
    drop(sent);
    drop(writer);
    lose_reader(reader);
    assert!(matches!(
        kept.recv_timeout::<u8>(PATIENCE),
        Err(ConnectionError::Closed)
    ));
    // The other direction: told by the liveness thread (a send only looks
    // at its flag), so soon rather than at once.
    assert!(common::eventually(|| matches!(
        kept.send(1u8),
        Err(ConnectionError::Closed)
    )));
}

#[test]
fn a_handle_in_a_message_dropped_unread_leaks_nothing() {
    a_sent_end_is_closed_when(drop);
}

#[test]
fn a_handle_in_a_message_whose_reader_is_killed_leaks_nothing() {
    a_sent_end_is_closed_when(|reader| {
        let (ready_reader, ready_writer) = Pipe::simplex().unwrap();
        let child = Process::new(|(reader, ready): (Connection, Connection)| {
            let _hold = reader;
            ready.send(()).unwrap();
            // Hold the reader, never reading, until killed.
            std::thread::sleep(PATIENCE * 2);
        })
        .args((reader, ready_writer))
        .start()
        .unwrap();
        ready_reader.recv_timeout::<()>(PATIENCE).unwrap();
        child.kill().unwrap();
        assert!(
            child.join_timeout(PATIENCE).is_err(),
            "the child was killed"
        );
    });
}

#[test]
fn a_connection_inside_a_queue_item_reaches_another_process() {
    let queue: Queue<(u8, Connection)> = Queue::unbounded().unwrap();
    let (near, far) = Pipe::duplex().unwrap();
    let child = Process::new(|queue: Queue<(u8, Connection)>| {
        let (n, far) = queue.get_timeout(PATIENCE).unwrap();
        far.send(n + 1).unwrap();
    })
    .args(queue.clone())
    .start()
    .unwrap();
    queue.put((41u8, far)).unwrap();
    assert_eq!(near.recv_timeout::<u8>(PATIENCE).unwrap(), 42);
    child.join_timeout(PATIENCE).unwrap();
    assert!(matches!(
        near.recv_timeout::<u8>(PATIENCE),
        Err(ConnectionError::Closed)
    ));
}

/// Like [`a_sent_end_is_closed_when`], with the end sent inside a queue item.
fn a_queued_end_is_closed_when(lose_queue: impl Fn(Queue<(u8, Connection)>)) {
    let round = || {
        let queue: Queue<(u8, Connection)> = Queue::unbounded().unwrap();
        let (kept, sent) = Pipe::duplex().unwrap();
        queue.put((1u8, sent)).unwrap();
        lose_queue(queue);
        assert!(matches!(
            kept.recv_timeout::<u8>(PATIENCE),
            Err(ConnectionError::Closed)
        ));
    };
    round();
    let before = common::open_descriptors();
    round();
    assert!(
        common::eventually(|| common::open_descriptors() <= before),
        "{} descriptors open, {before} before",
        common::open_descriptors()
    );
}

#[test]
fn a_handle_in_a_queue_item_never_taken_leaks_nothing() {
    a_queued_end_is_closed_when(drop);
}

#[test]
fn a_handle_in_a_queue_item_whose_only_other_holder_is_killed_leaks_nothing() {
    a_queued_end_is_closed_when(|queue| {
        let (ready_reader, ready_writer) = Pipe::simplex().unwrap();
        let child = Process::new(|(queue, ready): (Queue<(u8, Connection)>, Connection)| {
            let _hold = queue;
            ready.send(()).unwrap();
            // Hold the queue, never taking the item, until killed.
            std::thread::sleep(PATIENCE * 2);
        })
        .args((queue, ready_writer))
        .start()
        .unwrap();
        ready_reader.recv_timeout::<()>(PATIENCE).unwrap();
        child.kill().unwrap();
        assert!(
            child.join_timeout(PATIENCE).is_err(),
            "the child was killed"
        );
    });
}

/// A connection and a queue returned as a child's result arrive (the child
/// waits for the claim before exiting): 20 runs.
#[test]
fn a_connection_and_a_queue_returned_by_a_child_arrive() {
    fn make_handles() -> (Connection, Queue<u32>) {
        let (kept, returned) = Pipe::duplex().unwrap();
        kept.send(7u32).unwrap();
        let queue = Queue::unbounded().unwrap();
        queue.put(3u32).unwrap();
        (returned, queue)
    }
    for run in 0..20 {
        let child = Process::new(make_handles).start().unwrap();
        let (conn, queue) = child.join_timeout(PATIENCE).unwrap();
        assert_eq!(conn.recv_timeout::<u32>(PATIENCE).unwrap(), 7, "run {run}");
        assert_eq!(queue.get_timeout(PATIENCE).unwrap(), 3, "run {run}");
    }
}

/// What a child receives in a message and in a queue item.
type InMessage = (u8, Lock, Event, Value<u64>);
type InItem = (Lock, Event, Value<u64>);

#[test]
fn locks_events_and_values_in_a_message_or_item_are_the_same_objects_in_a_child() {
    let (reader, writer) = Pipe::simplex().unwrap();
    let queue: Queue<InItem> = Queue::unbounded().unwrap();
    let (lock, event, value) = (
        Lock::new().unwrap(),
        Event::new().unwrap(),
        Value::new(0u64).unwrap(),
    );
    let (item_lock, item_event, item_value) = (
        Lock::new().unwrap(),
        Event::new().unwrap(),
        Value::new(5u64).unwrap(),
    );
    let child = Process::new(|(reader, queue): (Connection, Queue<InItem>)| {
        let (n, lock, event, value) = reader.recv_timeout::<InMessage>(PATIENCE).unwrap();
        let locked_by_parent = lock.locked();
        value.set(u64::from(n) * 10).unwrap();
        event.set();
        let (item_lock, item_event, item_value) = queue.get_timeout(PATIENCE).unwrap();
        item_value.set(item_value.get().unwrap() + 1).unwrap();
        item_event.set();
        (locked_by_parent, item_lock.locked())
    })
    .args((reader, queue.clone()))
    .start()
    .unwrap();
    // Both locks held by the parent throughout: the child must see them taken.
    let guard = lock.lock().unwrap();
    let item_guard = item_lock.lock().unwrap();
    writer.send((7u8, &lock, &event, &value)).unwrap();
    event.wait_timeout(PATIENCE).unwrap();
    assert_eq!(
        value.get().unwrap(),
        70,
        "the child wrote the parent's value"
    );
    queue
        .put((item_lock.clone(), item_event.clone(), item_value.clone()))
        .unwrap();
    item_event.wait_timeout(PATIENCE).unwrap();
    assert_eq!(item_value.get().unwrap(), 6);
    let (locked, item_locked) = child.join_timeout(PATIENCE).unwrap();
    assert!(locked, "the child saw the lock the parent holds");
    assert!(item_locked, "the child saw the item lock the parent holds");
    drop((guard, item_guard));
}

#[test]
fn a_handle_in_a_message_received_with_no_descriptor_left_is_an_error_and_the_pipe_goes_on() {
    let (reader, writer) = Pipe::simplex().unwrap();
    let (ready, ready_writer) = Pipe::simplex().unwrap();
    let child = Process::new(|(reader, ready): (Connection, Connection)| {
        use rustix::process::{Resource, getrlimit, setrlimit};
        let original = getrlimit(Resource::Nofile);
        // No descriptor left: the lowest free number is the open count.
        let probe = rustix::io::fcntl_dupfd_cloexec(std::io::stderr(), 0).unwrap();
        let open = std::os::fd::AsRawFd::as_raw_fd(&probe) as u64;
        drop(probe);
        let mut limit = original;
        limit.current = Some(open);
        setrlimit(Resource::Nofile, limit).unwrap();
        ready.send(()).unwrap();
        let refused = reader.recv_timeout::<(u8, Connection)>(PATIENCE);
        setrlimit(Resource::Nofile, original).unwrap();
        let next = reader.recv_timeout::<u8>(PATIENCE);
        (
            matches!(refused, Err(ConnectionError::Decode(_))),
            format!("{refused:?}"),
            next.ok(),
        )
    })
    .args((reader, ready_writer))
    .start()
    .unwrap();
    ready.recv_timeout::<()>(PATIENCE).unwrap();
    let (kept, sent) = Pipe::duplex().unwrap();
    writer.send((1u8, &sent)).unwrap();
    drop(sent);
    writer.send(2u8).unwrap();
    let (decode_failed, error, next) = child.join_timeout(PATIENCE).unwrap();
    assert!(decode_failed, "{error}");
    assert_eq!(next, Some(2), "the message after the refused one arrives");
    // No half handle survived anywhere: the sent end is closed.
    assert!(matches!(
        kept.recv_timeout::<u8>(PATIENCE),
        Err(ConnectionError::Closed)
    ));
}

#[test]
fn pipe_ends_sent_over_their_own_pipe_leak_nothing_once_dropped() {
    let round = || {
        // Each end of a pipe sent over the pipe itself: cycles of
        // descriptors in flight (each socket queues a copy of itself), which
        // the kernel collects once nothing outside refers to them.
        let (a, b) = Pipe::duplex().unwrap();
        a.send(&b).unwrap();
        b.send(&a).unwrap();
        a.send(&a).unwrap();
        drop((a, b));
    };
    round();
    let before = common::open_descriptors();
    round();
    assert!(
        common::eventually(|| common::open_descriptors() <= before),
        "{} descriptors open, {before} before",
        common::open_descriptors()
    );
}
