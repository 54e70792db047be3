//! Dropping the last handle frees a segment: no memfd descriptor and no
//! mapping outlives it. (Alone in this test binary, so that no other test's
//! segments come and go while it counts.)

mod common;
use common::memfd_resources;
use mp_ipc::{Lock, SharedMemory, Value};

#[test]
fn the_last_handle_frees_the_segment() {
    let before = memfd_resources();
    {
        let shm = SharedMemory::new(1 << 20).unwrap();
        let _clone = shm.clone();
        let lock = Lock::new().unwrap();
        let value = Value::new(1u64).unwrap();
        // Through a channel: a second descriptor and mapping of each.
        let (tx, rx) = ipc_channel::ipc::channel().unwrap();
        tx.send((shm, lock, value)).unwrap();
        let (_shm, lock, value) = rx.recv().unwrap();
        *value.lock().unwrap() += 1;
        drop(lock.lock().unwrap());
        let during = memfd_resources();
        assert!(
            during.0 >= before.0 + 3 && during.1 >= before.1 + 3,
            "{before:?} -> {during:?}"
        );
    }
    assert_eq!(memfd_resources(), before);
}
