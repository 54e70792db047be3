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
