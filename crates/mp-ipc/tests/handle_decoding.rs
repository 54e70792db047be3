//! A handle received from another process is checked against what it claims to be: the wrong
//! kind or shape of object is a typed error, never memory read out of bounds. (The fuzz target
//! `shm_attach` in fuzz/ explores corrupted segments; these are its findings, pinned.)

use mp_ipc::{Array, Lock, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Sends `object` over ipc-channel (which carries its memfd) and receives it as a `U`.
fn receive_as<T: Serialize + DeserializeOwned, U: Serialize + DeserializeOwned>(
    object: T,
) -> Result<U, ipc_channel::IpcError> {
    let (tx, rx) = ipc_channel::ipc::channel::<T>().unwrap();
    tx.send(object).unwrap();
    rx.to_opaque().to::<U>().recv()
}

#[test]
fn an_array_is_not_received_as_a_value() {
    // A Value reads element 0 only; an Array of length 0 received as a Value used to attach
    // and then write through a dangling pointer (SIGSEGV), found by the shm_attach target.
    let empty = Array::<u64>::new(0).unwrap();
    assert!(receive_as::<_, Value<u64>>(empty).is_err());
    let four = Array::<u64>::new(4).unwrap();
    assert!(receive_as::<_, Value<u64>>(four).is_err());
}

#[test]
fn a_value_is_still_received_as_a_value() {
    let value = Value::new(41u64).unwrap();
    let received: Value<u64> = receive_as(value.clone()).unwrap();
    received.set(42).unwrap();
    assert_eq!(value.get().unwrap(), 42, "the same memory");
}

#[test]
fn a_one_element_array_is_a_value_of_the_same_memory() {
    // Same layout as a Value: accepted, and it is the same memory.
    let array = Array::<u64>::new(1).unwrap();
    let value: Value<u64> = receive_as(array.clone()).unwrap();
    value.set(9).unwrap();
    assert_eq!(array.lock().ok().unwrap()[0], 9);
}

#[test]
fn a_lock_is_not_received_as_a_value() {
    let lock = Lock::new().unwrap();
    assert!(receive_as::<_, Value<u64>>(lock).is_err());
}

/// `object`'s segment, as another process receives it: a handle's wire form starts with
/// `(SharedMemory, offset)`.
fn segment_of<T: Serialize + DeserializeOwned>(object: T) -> mp_ipc::SharedMemory {
    let (shm, _offset): (mp_ipc::SharedMemory, u64) = receive_as(object).unwrap();
    shm
}

/// Opens offset 0 of a named copy of `template` with `patch` applied, as decoding a handle
/// naming that segment does, and runs `exercise` on what attached; whether it attached.
fn open_patched<T: DeserializeOwned>(
    template: &mp_ipc::SharedMemory,
    patch: impl FnOnce(&mut [u8]),
    exercise: impl FnOnce(&T),
) -> bool {
    let mut bytes = vec![0u8; template.len()];
    template.read_at(0, &mut bytes).unwrap();
    patch(&mut bytes);
    let name = format!("/mp-ipc-test-corrupt-{}", std::process::id());
    let shm = mp_ipc::SharedMemory::create(&name, bytes.len()).unwrap();
    shm.write_at(0, &bytes).unwrap();
    // `(segment, offset)`, then a Value's `Option<Lock>` (None: its lock is in the segment);
    // a Lock ignores the trailing byte.
    let wire = postcard::to_allocvec(&(&shm, 0u64, None::<()>)).unwrap();
    let attached = postcard::from_bytes::<T>(&wire);
    shm.unlink().unwrap();
    if let Ok(object) = &attached {
        exercise(object);
    }
    attached.is_ok()
}

/// The corruption the shm_attach fuzz target found (fuzz/findings/): XORed into the low byte
/// of a robust mutex's glibc `__kind` word (errorcheck | robust | process-shared), it makes a
/// priority-protect, non-robust mutex, and `pthread_mutex_trylock` aborted the whole process
/// (an assertion in `__pthread_tpp_change_priority`).
const FINDING_XOR: u8 = 0xd1;

/// Applies `FINDING_XOR` to each 4-byte word of the segment in turn (wherever the mutex's kind
/// word is, one of them hits it): each copy either fails to attach or locks without aborting.
#[test]
fn a_lock_whose_mutex_kind_is_corrupted_does_not_abort() {
    let template = segment_of(Lock::new().unwrap());
    let mut rejected = 0;
    for word in (0..template.len()).step_by(4) {
        let attached = open_patched::<Lock>(
            &template,
            |bytes| bytes[word] ^= FINDING_XOR,
            |lock| {
                if let Ok(guard) = lock.try_lock() {
                    drop(guard);
                }
            },
        );
        rejected += usize::from(!attached);
    }
    assert!(rejected > 0, "some corruption is caught at attach");
    // The intact copy still attaches and locks.
    assert!(open_patched::<Lock>(
        &template,
        |_| {},
        |lock| {
            assert!(lock.try_lock().is_ok(), "an intact copy locks");
        }
    ));
}

#[test]
fn a_value_whose_mutex_kind_is_corrupted_does_not_abort() {
    let template = segment_of(Value::new(7u64).unwrap());
    assert!(
        open_patched::<Value<u64>>(
            &template,
            |_| {},
            |value| assert_eq!(value.get().ok(), Some(7))
        ),
        "an intact copy attaches"
    );
    let mut rejected = 0;
    for word in (0..template.len()).step_by(4) {
        let attached = open_patched::<Value<u64>>(
            &template,
            |bytes| bytes[word] ^= FINDING_XOR,
            // Non-blocking: a corrupted owner TID may name a live thread, which is held.
            |value| {
                if let Ok(guard) = value.try_lock() {
                    drop(guard);
                }
            },
        );
        rejected += usize::from(!attached);
    }
    assert!(rejected > 0, "some corruption is caught at attach");
}

/// What a listener without an authkey does with a channel name a peer sends: a NUL in it made
/// ipc-channel panic inside `accept` (found by the listener_handshake fuzz target); a name too
/// long for a Unix socket path would be truncated into another path. Both are refused.
#[test]
fn a_listener_refuses_a_channel_name_that_is_not_a_socket_path() {
    use mp_ipc::connection::ConnectionError;
    use mp_ipc::listener::{Address, Listener};
    use std::io::Write;
    use std::net::{Shutdown, TcpStream};

    let listener = Listener::bind(Address::tcp_loopback(0), None)
        .unwrap()
        .handshake_timeout(std::time::Duration::from_secs(5));
    let Address::Tcp(address) = listener.address().clone() else {
        unreachable!("bound to TCP")
    };
    let long = "/tmp/".to_owned() + &"a".repeat(200);
    for name in [&b"/tmp/a\0b"[..], long.as_bytes()] {
        let mut peer = TcpStream::connect(address).unwrap();
        let len = u32::try_from(name.len()).unwrap().to_le_bytes();
        peer.write_all(&len).unwrap();
        peer.write_all(name).unwrap();
        peer.shutdown(Shutdown::Write).unwrap();
        match listener.accept() {
            Err(ConnectionError::Authentication(reason)) => {
                assert!(reason.contains("bad channel name"), "{reason}")
            }
            Err(other) => panic!("refused for another reason: {other}"),
            Ok(_) => panic!("accepted a peer that named no channel"),
        }
    }
}
