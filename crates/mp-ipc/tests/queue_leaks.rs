//! Dropping the last handle of queues and pipes frees everything: no memfd
//! descriptor, no mapping, no presence pipe, doorbell or courier entry
//! outlives them. (Alone in this test binary, so that no other test's
//! descriptors come and go while it counts.)

mod common;
use common::{eventually, memfd_resources, open_descriptors};
use mp_ipc::connection::{Connection, Pipe};
use mp_ipc::queue::{Bytes, JoinableQueue, Queue, SimpleQueue};

#[test]
fn the_last_handles_free_everything() {
    {
        // Start this process's courier and liveness threads (kept for good).
        let (a, _b) = Pipe::duplex().unwrap();
        let (tx, rx) = ipc_channel::ipc::channel().unwrap();
        tx.send(a).unwrap();
        drop(rx.recv().unwrap());
    }
    let before = memfd_resources();
    let descriptors_before = open_descriptors();
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
        assert!(open_descriptors() > descriptors_before + 8);
    }
    assert_eq!(memfd_resources(), before);
    assert!(
        // At most: the warm-up's last courier channel may close meanwhile.
        eventually(|| open_descriptors() <= descriptors_before),
        "{descriptors_before} descriptors before, {} after",
        open_descriptors()
    );
}
