//! A named shared-memory segment with corrupted contents, opened as a `Value`, `Array`,
//! `Lock`, `Event` or `Semaphore` (as a handle received from another process would be): attach
//! is a value or a typed error, and the non-blocking operations on what attached never panic
//! or hang.
//!
//! Input: byte 0 picks the kind and the mode; in "patch" mode (odd byte 0) the segment starts
//! as a copy of a real, freshly made object's memory and the rest of the input is
//! `(offset u16, xor u8)` patches, which gets past the tag check into the state; in "raw" mode
//! the rest of the input is the segment's contents.
//!
//! Only the public API is used: a handle's wire form is `(SharedMemory, offset)`, so a real
//! object's segment is read by receiving its handle (over ipc-channel, which carries the
//! memfd) as `(SharedMemory, u64)`, and a named segment is opened as an object by decoding
//! `(name, offset)`. If that wire form changes, patch mode panics with a message saying so.
#![no_main]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use multiproc::{Array, Event, Lock, Semaphore, SharedMemory, Value};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The segment (and offset) behind a handle, as another process would receive it.
fn segment_of<T: Clone + Serialize + DeserializeOwned>(object: &T) -> (SharedMemory, u64) {
    let (tx, rx) = ipc_channel::ipc::channel::<T>().expect("an ipc channel");
    tx.send(object.clone()).expect("a handle sends");
    rx.to_opaque()
        .to::<(SharedMemory, u64)>()
        .recv()
        .expect("a handle's wire form is (SharedMemory, offset): update this target")
}

/// Opens `offset` of the named segment `shm` as a `T`, as decoding a received handle does.
fn open_as<T: DeserializeOwned>(shm: &SharedMemory, offset: u64) -> Result<T, postcard::Error> {
    // Then `None`: a `Value`/`Array` with its lock in its own segment (their wire form is
    // `((segment, offset), Option<Lock>)`); the others stop reading before it.
    let wire = postcard::to_allocvec(&(shm, offset, None::<()>)).expect("a named segment encodes");
    postcard::from_bytes(&wire)
}

fn unique_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "/multiproc-fuzz-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A named segment holding `template`'s bytes with `patches` applied (patch mode), or `raw`.
fn corrupted_segment(template: Option<&SharedMemory>, rest: &[u8]) -> Option<Unlinked> {
    let len = match template {
        Some(template) => template.len(),
        None => rest.len(),
    };
    let shm = Unlinked(SharedMemory::create(&unique_name(), len).ok()?);
    let mut bytes = vec![0u8; len];
    match template {
        Some(template) => {
            template.read_at(0, &mut bytes).expect("read the template");
            for patch in rest.chunks_exact(3) {
                let offset = usize::from(u16::from_le_bytes([patch[0], patch[1]])) % len;
                bytes[offset] ^= patch[2];
            }
        }
        None => bytes.copy_from_slice(rest),
    }
    shm.0.write_at(0, &bytes).expect("write the segment");
    Some(shm)
}

/// A named segment that is unlinked when dropped (after the objects opened on it have their
/// own mapping). A crashing input leaves `/dev/shm/multiproc-fuzz-*` behind; CI removes them.
struct Unlinked(SharedMemory);

impl Drop for Unlinked {
    fn drop(&mut self) {
        self.0.unlink().expect("unlink a segment of this target");
    }
}

/// Attaches a corrupted copy of `fresh`'s segment as a `T` and runs `exercise` on it.
fn fuzz_kind<T: Clone + Serialize + DeserializeOwned>(
    fresh: T,
    patch: bool,
    rest: &[u8],
    exercise: impl FnOnce(&T),
) {
    let (template, offset) = segment_of(&fresh);
    if patch {
        // Unpatched, the copy must attach: otherwise this target no longer reaches the state.
        let copy = corrupted_segment(Some(&template), &[]).expect("a copy");
        if let Err(error) = open_as::<T>(&copy.0, offset) {
            panic!(
                "an intact copy of {} no longer attaches ({error}): update this target",
                std::any::type_name::<T>()
            );
        }
    }
    let segment = corrupted_segment(patch.then_some(&template), rest);
    let Some(segment) = segment else { return };
    if let Ok(object) = open_as::<T>(&segment.0, offset) {
        exercise(&object);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let patch = selector & 1 == 1;
    let no_wait = Duration::ZERO;
    match (selector >> 1) % 5 {
        // Locked without waiting: a corrupted owner TID may name a live thread, which holds it.
        // (A mutex whose glibc type bits were corrupted used to make glibc abort the process
        // here; attach now rejects it: fuzz/findings/ history, tests/handle_decoding.rs.)
        0 => fuzz_kind(Value::new(7u64).unwrap(), patch, rest, |value| {
            if let Ok(guard) = value.try_lock() {
                drop(guard);
            }
        }),
        1 => fuzz_kind(Array::<u32>::new(4).unwrap(), patch, rest, |array| {
            // A corrupted length is accepted only if the elements fit in the segment.
            assert!(
                array.len() <= 4,
                "an attached array's length fits its segment"
            );
            if let Ok(guard) = array.try_lock() {
                drop(guard);
            }
        }),
        2 => fuzz_kind(Lock::new().unwrap(), patch, rest, |lock| {
            let _ = lock.locked();
            if let Ok(guard) = lock.try_lock() {
                drop(guard);
            }
        }),
        3 => fuzz_kind(Event::new().unwrap(), patch, rest, |event| {
            let _ = event.is_set();
            let _ = event.wait_timeout(no_wait);
            event.set();
            assert!(
                event.wait_timeout(no_wait).is_ok(),
                "a set event does not block"
            );
            event.clear();
        }),
        _ => fuzz_kind(Semaphore::new(2).unwrap(), patch, rest, |semaphore| {
            let _ = semaphore.value();
            if let Ok(guard) = semaphore.try_acquire() {
                drop(guard);
            }
            let _ = semaphore.acquire_timeout(no_wait);
            let _ = semaphore.release();
        }),
    }
});
