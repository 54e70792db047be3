//! Queues shared by processes and threads: nothing lost or duplicated, FIFO
//! per producer, close, timeouts, large items, joinable queues.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mp_core::Process;
use mp_ipc::queue::{Bytes, JoinableQueue, Queue, QueueError, SimpleQueue};

/// Generous bound for anything that should happen "at once".
const PATIENCE: Duration = Duration::from_secs(20);

type Item = (u32, u32); // (producer, sequence number)

fn produce(queue: &Queue<Item>, producer: u32, count: u32) {
    for i in 0..count {
        queue.put_timeout((producer, i), PATIENCE).unwrap();
    }
}

/// Takes items until the queue is closed and drained.
fn consume(queue: &Queue<Item>) -> Vec<Item> {
    let mut seen = Vec::new();
    loop {
        match queue.get_timeout(PATIENCE) {
            Ok(item) => seen.push(item),
            Err(QueueError::Closed) => return seen,
            Err(other) => panic!("consumer: {other}"),
        }
    }
}

fn check_fifo_and_complete(consumed: &[Vec<Item>], producers: u32, per_producer: u32) {
    let mut all: Vec<Item> = Vec::new();
    for seen in consumed {
        // Each consumer sees each producer's items in the order they were put.
        let mut last: BTreeMap<u32, u32> = BTreeMap::new();
        for &(producer, i) in seen {
            if let Some(&before) = last.get(&producer) {
                assert!(i > before, "producer {producer}: {i} after {before}");
            }
            last.insert(producer, i);
        }
        all.extend(seen);
    }
    all.sort_unstable();
    let expected: Vec<Item> = (0..producers)
        .flat_map(|p| (0..per_producer).map(move |i| (p, i)))
        .collect();
    assert_eq!(all.len(), expected.len(), "lost or duplicated items");
    assert_eq!(all, expected);
}

#[test]
fn processes_and_threads_lose_and_duplicate_nothing() {
    const PER_PRODUCER: u32 = 5_000;
    // A small ring and item bound so that producers really wait for room.
    let queue: Queue<Item> = Queue::builder()
        .maxsize(64)
        .capacity_bytes(4096)
        .build()
        .unwrap();

    let producers: Vec<_> = (0..3u32)
        .map(|p| {
            Process::new(|(queue, p, n): (Queue<Item>, u32, u32)| produce(&queue, p, n))
                .args((queue.clone(), p, PER_PRODUCER))
                .start()
                .unwrap()
        })
        .collect();
    let consumers: Vec<_> = (0..2)
        .map(|_| {
            Process::new(|queue: Queue<Item>| consume(&queue))
                .args(queue.clone())
                .start()
                .unwrap()
        })
        .collect();
    let thread_producer = {
        let queue = queue.clone();
        std::thread::spawn(move || produce(&queue, 3, PER_PRODUCER))
    };
    let thread_consumer = {
        let queue = queue.clone();
        std::thread::spawn(move || consume(&queue))
    };

    for producer in &producers {
        producer.join_timeout(PATIENCE).unwrap();
    }
    thread_producer.join().unwrap();
    queue.shutdown().unwrap();
    let mut consumed: Vec<Vec<Item>> = consumers
        .iter()
        .map(|c| c.join_timeout(PATIENCE).unwrap())
        .collect();
    consumed.push(thread_consumer.join().unwrap());
    check_fifo_and_complete(&consumed, 4, PER_PRODUCER);
    assert!(queue.is_empty());
}

#[test]
fn shutdown_fails_puts_drains_gets_and_wakes_a_blocked_getter_in_a_child() {
    let queue: Queue<u64> = Queue::unbounded().unwrap();
    queue.put(1).unwrap();
    queue.put(2).unwrap();
    // The child takes both items, then blocks in get until the parent closes.
    let child = Process::new(|(queue, ready): (Queue<u64>, Queue<u64>)| {
        let first = queue.get_timeout(PATIENCE).unwrap();
        let second = queue.get_timeout(PATIENCE).unwrap();
        ready.put(0).unwrap();
        let after = queue.get_timeout(PATIENCE);
        (first, second, matches!(after, Err(QueueError::Closed)))
    });
    let ready: Queue<u64> = Queue::unbounded().unwrap();
    let child = child.args((queue.clone(), ready.clone())).start().unwrap();
    ready.get_timeout(PATIENCE).unwrap();
    queue.shutdown().unwrap();
    assert!(queue.is_shut_down());
    assert!(matches!(queue.put(3), Err(QueueError::Closed)));
    assert_eq!(child.join_timeout(PATIENCE).unwrap(), (1, 2, true));
}

#[test]
fn a_put_blocked_on_a_full_queue_in_a_child_completes_when_the_parent_gets() {
    let queue: Queue<u64> = Queue::bounded(2).unwrap();
    let child = Process::new(|queue: Queue<u64>| {
        for i in 0..10 {
            queue.put_timeout(i, PATIENCE).unwrap();
        }
    })
    .args(queue.clone())
    .start()
    .unwrap();
    let got: Vec<u64> = (0..10)
        .map(|_| queue.get_timeout(PATIENCE).unwrap())
        .collect();
    assert_eq!(got, (0..10).collect::<Vec<_>>());
    child.join_timeout(PATIENCE).unwrap();
    assert_eq!(queue.maxsize(), Some(2));
}

#[test]
fn timeouts_return_after_about_their_timeout() {
    let timeout = Duration::from_millis(150);
    let margin = Duration::from_secs(2);

    let empty: Queue<u8> = Queue::unbounded().unwrap();
    // Another handle that could put (a lone handle's get fails at once with
    // `Abandoned`: see queue_liveness.rs).
    let _producer = empty.clone();
    let start = Instant::now();
    assert!(matches!(
        empty.get_timeout(timeout),
        Err(QueueError::Timeout)
    ));
    let waited = start.elapsed();
    assert!(
        waited >= timeout && waited < timeout + margin,
        "get waited {waited:?}"
    );

    let full: Queue<u8> = Queue::bounded(1).unwrap();
    let _consumer = full.clone();
    full.put(1).unwrap();
    assert!(full.is_full());
    assert!(matches!(full.try_put(2), Err(QueueError::Full)));
    let start = Instant::now();
    assert!(matches!(
        full.put_timeout(2, timeout),
        Err(QueueError::Timeout)
    ));
    let waited = start.elapsed();
    assert!(
        waited >= timeout && waited < timeout + margin,
        "put waited {waited:?}"
    );
    assert_eq!(full.len(), 1);
    assert!(matches!(empty.try_get(), Err(QueueError::Empty)));
}

#[test]
fn a_64_mib_item_travels_both_ways() {
    /// Distinct content per seed, built with block copies (fast in debug builds too).
    fn pattern(len: usize, seed: u8) -> Bytes {
        let block: Vec<u8> = (0..251u8)
            .map(|i| i.wrapping_mul(31).wrapping_add(seed))
            .collect();
        let mut bytes = block.repeat(len / block.len() + 1);
        bytes.truncate(len);
        Bytes(bytes)
    }
    const LEN: usize = 64 << 20;
    let queue: Queue<Bytes> = Queue::unbounded().unwrap();
    let back: Queue<Bytes> = Queue::unbounded().unwrap();
    let child = Process::new(|(queue, back): (Queue<Bytes>, Queue<Bytes>)| {
        let item = queue.get_timeout(PATIENCE).unwrap();
        let ok = item.len() == LEN && item == pattern(LEN, 1);
        back.put(pattern(LEN, 2)).unwrap();
        ok
    })
    .args((queue.clone(), back.clone()))
    .start()
    .unwrap();
    queue.put(pattern(LEN, 1)).unwrap();
    let item = back.get_timeout(PATIENCE).unwrap();
    assert!(item == pattern(LEN, 2), "the child's item arrived changed");
    assert!(
        child.join_timeout(PATIENCE).unwrap(),
        "the parent's item arrived changed"
    );
}

#[test]
fn joinable_queue_join_waits_for_every_task_done_in_children() {
    let tasks: JoinableQueue<u64> = JoinableQueue::unbounded().unwrap();
    let results: Queue<u64> = Queue::unbounded().unwrap();
    for n in 0..100 {
        tasks.put(n).unwrap();
    }
    assert_eq!(tasks.unfinished_tasks(), 100);
    let workers: Vec<_> = (0..2)
        .map(|_| {
            Process::new(|(tasks, results): (JoinableQueue<u64>, Queue<u64>)| {
                while let Ok(n) = tasks.get_timeout(Duration::from_millis(300)) {
                    results.put(n * n).unwrap();
                    tasks.task_done().unwrap();
                }
            })
            .args((tasks.clone(), results.clone()))
            .start()
            .unwrap()
        })
        .collect();
    tasks.join_timeout(PATIENCE).unwrap();
    assert_eq!(tasks.unfinished_tasks(), 0);
    let mut squares: Vec<u64> = (0..100)
        .map(|_| results.get_timeout(PATIENCE).unwrap())
        .collect();
    squares.sort_unstable();
    assert_eq!(squares, (0..100).map(|n| n * n).collect::<Vec<_>>());
    assert!(matches!(
        tasks.task_done(),
        Err(QueueError::TaskDoneTooMany)
    ));
    for worker in workers {
        worker.join_timeout(PATIENCE).unwrap();
    }
}

#[test]
fn join_timeout_times_out_while_tasks_are_unfinished() {
    let tasks: JoinableQueue<u8> = JoinableQueue::bounded(4).unwrap();
    tasks.put(1).unwrap();
    let timeout = Duration::from_millis(100);
    let start = Instant::now();
    assert!(matches!(
        tasks.join_timeout(timeout),
        Err(QueueError::Timeout)
    ));
    assert!(start.elapsed() >= timeout);
    assert_eq!(tasks.get().unwrap(), 1);
    tasks.task_done().unwrap();
    tasks.join_timeout(PATIENCE).unwrap();
}

#[test]
fn simple_queue_in_a_child() {
    let queue: SimpleQueue<String> = SimpleQueue::new().unwrap();
    let child = Process::new(|queue: SimpleQueue<String>| {
        let word = queue.get_timeout(PATIENCE).unwrap();
        queue.put(word.to_uppercase()).unwrap();
    })
    .args(queue.clone())
    .start()
    .unwrap();
    queue.put("hello".to_owned()).unwrap();
    child.join_timeout(PATIENCE).unwrap();
    assert_eq!(queue.get_timeout(PATIENCE).unwrap(), "HELLO");
    assert!(queue.is_empty());
}

#[test]
fn a_queue_received_as_another_type_is_refused() {
    let queue: Queue<u64> = Queue::unbounded().unwrap();
    let (tx, rx) = ipc_channel::ipc::channel::<Queue<u64>>().unwrap();
    tx.send(queue.clone()).unwrap();
    let rx: ipc_channel::ipc::IpcReceiver<Queue<String>> = rx.to_opaque().to();
    assert!(
        rx.recv().is_err(),
        "a Queue<u64> was accepted as a Queue<String>"
    );
    tx.send(queue).unwrap();
    let rx: ipc_channel::ipc::IpcReceiver<Queue<u64>> = rx.to_opaque().to();
    rx.recv().unwrap().put(1).unwrap();
}
