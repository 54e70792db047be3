//! Dropping the last handle of queues and pipes frees everything: no memfd
//! descriptor, no mapping and no liveness lock outlives them. (Alone in this
//! test binary, so that no other test's segments come and go while it counts.)

mod common;
use common::memfd_resources;
use mp_ipc::connection::{Connection, Pipe};
use mp_ipc::queue::{Bytes, JoinableQueue, Queue, SimpleQueue};

/// `/proc/locks` names of the memfds this process has open ("00:01:1234").
fn memfd_ids() -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            if !std::fs::read_link(&path)
                .ok()?
                .to_string_lossy()
                .starts_with("/memfd:")
            {
                return None;
            }
            let meta = std::fs::metadata(&path).ok()?;
            Some(format!(
                "{:02x}:{:02x}:{}",
                libc::major(meta.dev()),
                libc::minor(meta.dev()),
                meta.ino()
            ))
        })
        .collect()
}

/// How many of `ids` carry an OFD lock (other processes' locks are ignored).
fn locked(ids: &[String]) -> usize {
    let locks = std::fs::read_to_string("/proc/locks").unwrap();
    ids.iter()
        .filter(|id| {
            locks.lines().any(|line| {
                line.contains("OFDLCK") && line.split_whitespace().any(|f| f == id.as_str())
            })
        })
        .count()
}

#[test]
fn the_last_handles_free_everything() {
    let before = memfd_resources();
    let ids;
    {
        let queue: Queue<Bytes> = Queue::builder().capacity_bytes(4096).build().unwrap();
        let simple: SimpleQueue<u8> = SimpleQueue::new().unwrap();
        let joinable: JoinableQueue<u8> = JoinableQueue::unbounded().unwrap();
        let (a, b) = Pipe::duplex().unwrap();
        // Through a channel: second descriptors and mappings of each.
        let (tx, rx) = ipc_channel::ipc::channel().unwrap();
        tx.send((queue.clone(), simple.clone(), joinable.clone(), b))
            .unwrap();
        let (queue2, simple2, joinable2, b): (
            Queue<Bytes>,
            SimpleQueue<u8>,
            JoinableQueue<u8>,
            Connection,
        ) = rx.recv().unwrap();
        // Inline and out-of-band items, both ways.
        queue.put(Bytes(vec![1; 10])).unwrap();
        queue.put(Bytes(vec![2; 100_000])).unwrap();
        assert_eq!(queue2.get().unwrap().len(), 10);
        assert_eq!(queue2.get().unwrap().len(), 100_000);
        simple.put(1).unwrap();
        assert_eq!(simple2.get().unwrap(), 1);
        joinable.put(1).unwrap();
        joinable2.get().unwrap();
        joinable2.task_done().unwrap();
        a.send_bytes(&[3; 3 << 20]).unwrap();
        assert_eq!(b.recv_bytes().unwrap().len(), 3 << 20);
        b.send("back").unwrap();
        assert_eq!(a.recv::<String>().unwrap(), "back");
        let during = memfd_resources();
        assert!(
            during.0 > before.0 && during.1 > before.1,
            "{before:?} -> {during:?}"
        );
        ids = memfd_ids();
        assert_eq!(
            locked(&ids),
            4,
            "one liveness lock per pipe end and direction"
        );
    }
    assert_eq!(memfd_resources(), before);
    assert_eq!(locked(&ids), 0, "liveness locks outlived their handles");
}
