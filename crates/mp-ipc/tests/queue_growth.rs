//! An unbounded queue never makes `put` wait: it grows into further
//! segments, keeps `len` exact and FIFO order per producer, gives drained
//! segments' memory back, and lets a producer exit before anybody reads.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use mp_core::Process;
use mp_ipc::queue::{Bytes, JoinableQueue, Queue, QueueError};

const PATIENCE: Duration = Duration::from_secs(30);

/// Bytes of memory held by this process's queue memfds (test-side /proc;
/// each memfd once, however many descriptors this process holds of it).
fn queue_memory() -> u64 {
    let by_inode: BTreeMap<u64, u64> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let target = std::fs::read_link(&path).ok()?;
            target
                .to_string_lossy()
                .starts_with("/memfd:mp-ipc-ring")
                .then(|| std::fs::metadata(&path).ok())
                .flatten()
                .map(|meta| (meta.ino(), meta.blocks() * 512))
        })
        .collect();
    by_inode.values().sum()
}

#[test]
fn a_small_unbounded_queue_grows_keeps_order_and_len_and_gives_memory_back() {
    let queue: Queue<u64> = Queue::builder().capacity_bytes(4096).build().unwrap();
    const N: u64 = 200_000; // 3.2 MB of frames through a 4 KiB first ring
    for i in 0..N {
        // `try_put`: an unbounded queue is never full.
        queue.try_put(i).unwrap();
    }
    assert!(!queue.is_full());
    assert_eq!(queue.len(), N as usize);
    let peak = queue_memory();
    assert!(peak >= 16 * N, "{peak} bytes for {N} items");
    // A handle received now starts where the items are.
    let (tx, rx) = ipc_channel::ipc::channel().unwrap();
    tx.send(queue.clone()).unwrap();
    let received: Queue<u64> = rx.recv().unwrap();
    assert_eq!(received.len(), N as usize);
    for i in 0..N {
        let from = if i % 2 == 0 { &queue } else { &received };
        assert_eq!(from.try_get().unwrap(), i);
        if i % 50_000 == 0 {
            assert_eq!(queue.len(), (N - i - 1) as usize);
        }
    }
    assert!(queue.is_empty());
    assert_eq!(queue.len(), 0);
    assert!(matches!(queue.try_get(), Err(QueueError::Empty)));
    let after = queue_memory();
    // The retired segments (4 KiB, 8 KiB, ... 1 MiB) are given back; what
    // stays is the part of the last segment's ring (2 MiB) that was used,
    // the segments' header pages and the directory.
    assert!(
        peak - after >= 2000 << 10 && after <= (1200 << 10) + (64 << 10),
        "{peak} bytes before draining, {after} after"
    );
    // Still a working queue, in both processes' views.
    received.put(7).unwrap();
    assert_eq!(queue.get_timeout(PATIENCE).unwrap(), 7);
}

#[test]
fn a_child_puts_48_mib_returns_and_is_joined_before_the_parent_reads() {
    let queue: Queue<Bytes> = Queue::unbounded().unwrap();
    let child = Process::new(|queue: Queue<Bytes>| {
        for i in 0..48u8 {
            queue.put(Bytes(vec![i; 1 << 20])).unwrap();
        }
        48u32
    })
    .args(queue.clone())
    .start()
    .unwrap();
    // CPython deadlocks here (the child's feeder thread cannot flush).
    assert_eq!(child.join_timeout(PATIENCE).unwrap(), 48);
    assert_eq!(queue.len(), 48);
    for i in 0..48u8 {
        let item = queue.get_timeout(PATIENCE).unwrap();
        assert_eq!(item.len(), 1 << 20);
        assert!(item.iter().all(|&b| b == i), "item {i}");
    }
    assert!(queue.is_empty());
}

#[test]
fn producers_and_consumers_in_processes_lose_nothing_across_growth() {
    const PRODUCERS: u32 = 3;
    const PER_PRODUCER: u32 = 20_000;
    let queue: Queue<(u32, u32)> = Queue::builder().capacity_bytes(4096).build().unwrap();
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|p| {
            Process::new(|(queue, p): (Queue<(u32, u32)>, u32)| {
                for i in 0..PER_PRODUCER {
                    queue.try_put((p, i)).unwrap();
                }
            })
            .args((queue.clone(), p))
            .start()
            .unwrap()
        })
        .collect();
    let consumers: Vec<_> = (0..2)
        .map(|_| {
            Process::new(|queue: Queue<(u32, u32)>| {
                let mut seen = Vec::new();
                loop {
                    match queue.get_timeout(PATIENCE) {
                        Ok(item) => seen.push(item),
                        Err(QueueError::Closed) => return seen,
                        Err(other) => panic!("consumer: {other}"),
                    }
                }
            })
            .args(queue.clone())
            .start()
            .unwrap()
        })
        .collect();
    for producer in producers {
        producer.join_timeout(PATIENCE).unwrap();
    }
    queue.shutdown().unwrap();
    let mut next: BTreeMap<u32, u32> = BTreeMap::new();
    let mut total = 0;
    for consumer in consumers {
        let mut last: BTreeMap<u32, u32> = BTreeMap::new();
        for (p, i) in consumer.join_timeout(PATIENCE).unwrap() {
            if let Some(&before) = last.get(&p) {
                assert!(i > before, "producer {p}: {i} after {before}");
            }
            last.insert(p, i);
            *next.entry(p).or_default() += 1;
            total += 1;
        }
    }
    assert_eq!(total, PRODUCERS * PER_PRODUCER);
    assert!(next.values().all(|&n| n == PER_PRODUCER), "{next:?}");
    assert!(queue.is_empty());
}

#[test]
fn joinable_counts_stay_exact_across_growth_and_immediate_shutdown() {
    let tasks: JoinableQueue<u64> =
        JoinableQueue::from_builder(Queue::builder().capacity_bytes(4096)).unwrap();
    for i in 0..10_000 {
        tasks.put(i).unwrap();
    }
    assert_eq!(tasks.unfinished_tasks(), 10_000);
    for _ in 0..4_000 {
        tasks.get().unwrap();
        tasks.task_done().unwrap();
    }
    assert_eq!(tasks.unfinished_tasks(), 6_000);
    assert_eq!(tasks.len(), 6_000);
    assert!(matches!(
        tasks.join_timeout(Duration::from_millis(10)),
        Err(QueueError::Timeout)
    ));
    // A joiner in a child wakes when the rest is discarded.
    let joiner = Process::new(|tasks: JoinableQueue<u64>| tasks.join_timeout(PATIENCE).is_ok())
        .args(tasks.clone())
        .start()
        .unwrap();
    tasks.shutdown_immediate().unwrap();
    assert!(joiner.join_timeout(PATIENCE).unwrap());
    assert_eq!(tasks.unfinished_tasks(), 0);
    assert!(tasks.is_empty());
    assert!(matches!(tasks.get(), Err(QueueError::Closed)));
    assert!(matches!(tasks.put(1), Err(QueueError::Closed)));
}

/// 100 M small items through one unbounded queue (about 1.6 GB in flight):
/// run with `cargo test --release -p mp-ipc --test queue_growth -- --ignored`.
#[test]
#[ignore = "1.6 GB and ~1 min in release; run explicitly"]
fn a_hundred_million_small_items() {
    let queue: Queue<u64> = Queue::unbounded().unwrap();
    const N: u64 = 100_000_000;
    for i in 0..N {
        queue.try_put(i).unwrap();
    }
    assert_eq!(queue.len(), N as usize);
    for i in 0..N {
        assert_eq!(queue.try_get().unwrap(), i);
    }
    assert!(queue.is_empty());
    assert!(queue_memory() <= 130 << 20, "{}", queue_memory());
}

#[test]
fn a_queue_told_not_to_grow_is_bounded_by_its_ring() {
    let queue: Queue<Bytes> = Queue::builder()
        .capacity_bytes(64 << 10)
        .grow(false)
        .build()
        .unwrap();
    let _other = queue.clone();
    let mut sent = 0;
    while queue.try_put(Bytes(vec![1; 4000])).is_ok() {
        sent += 1;
        assert!(sent < 100, "a 64 KiB ring took {sent} items of 4 kB");
    }
    assert!(sent >= 10);
    assert!(matches!(
        queue.put_timeout(Bytes(vec![2; 4000]), Duration::from_millis(20)),
        Err(QueueError::Timeout)
    ));
    assert_eq!(queue.len(), sent);
}
