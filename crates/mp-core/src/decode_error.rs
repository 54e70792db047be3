//! Keeping the cause of a decode failure across processes.
//!
//! postcard, the format under ipc-channel, drops the message of `serde::de::Error::custom`:
//! a handle that fails to attach (a shared segment that was unlinked) would reach the
//! parent's `join` as a bare "Serialization/Deserialization error". A `Deserialize` impl that
//! fails for a reason of its own records it here first ([`note_decode_failure`]); mp-core
//! takes the note when it reports the failure, together with the Rust type that failed.

use std::cell::RefCell;
use std::fmt::Display;

use crate::decode_cause::decode_failure_cause;
use crate::encode_cause::encode_failure_cause;

thread_local! {
    static NOTE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Records why a value failed to decode on this thread, for the error mp-core reports (call
/// it in a `Deserialize` impl just before returning `D::Error::custom(..)`; the message
/// survives formats that discard custom messages, such as postcard).
pub fn note_decode_failure(message: impl Display) {
    NOTE.with(|note| *note.borrow_mut() = Some(message.to_string()));
}

/// Notes `message` unless a more specific note (a handle's) is already there.
pub(crate) fn note_if_none(message: String) {
    NOTE.with(|note| {
        note.borrow_mut().get_or_insert(message);
    });
}

/// Takes the note [`note_decode_failure`] left on this thread, if any: for crates that report
/// codec failures of their own (mp-ipc's queues and pipes) with the cause postcard dropped.
pub fn take_failure_note() -> Option<String> {
    NOTE.with(|note| note.borrow_mut().take())
}

/// Forgets any stale note, before a decode whose failure will be described.
pub(crate) fn clear() {
    NOTE.with(|note| note.borrow_mut().take());
}

/// Describes a codec failure of a `T`: its type, the codec's error, and the note left by the
/// value that failed, if any.
pub(crate) fn describe<T>(error: impl Display) -> String {
    let ty = std::any::type_name::<T>();
    match NOTE.with(|note| note.borrow_mut().take()) {
        Some(note) => format!("{ty}: {error}: {note}"),
        None => format!("{ty}: {error}"),
    }
}

/// Describes a failure to decode a `T` from `bytes`: its type, the codec's error, and why —
/// the note a handle left, or else the custom message of the `Deserialize` that refused
/// (found by [`decode_failure_cause`], since postcard drops it).
pub(crate) fn describe_decode<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    error: impl Display,
) -> String {
    let ty = std::any::type_name::<T>();
    let cause = NOTE
        .with(|note| note.borrow_mut().take())
        .or_else(|| decode_failure_cause::<T>(bytes));
    match cause {
        Some(cause) => format!("{ty}: {error}: {cause}"),
        None => format!("{ty}: {error}"),
    }
}

/// Describes an encode failure of `value`: its type, the codec's error, and why it failed —
/// the note a handle left, or else the custom message its `Serialize` gave (found by
/// [`encode_failure_cause`], since postcard drops it).
pub(crate) fn describe_encode<T: serde::Serialize + ?Sized>(
    value: &T,
    error: impl Display,
) -> String {
    let ty = std::any::type_name::<T>();
    let cause = NOTE
        .with(|note| note.borrow_mut().take())
        .or_else(|| encode_failure_cause(value));
    match cause {
        Some(cause) => format!("{ty}: {error}: {cause}"),
        None => format!("{ty}: {error}"),
    }
}

/// Encodes `value` with postcard, describing a failure as mp-core describes those of task
/// arguments and results: the Rust type, postcard's error, and the cause (a handle's note,
/// or the custom message of the `Serialize` that refused, which postcard itself drops).
pub fn encode_described<T: serde::Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    clear();
    postcard::to_allocvec(value).map_err(|e| describe_encode(value, e))
}

/// Decodes a postcard-encoded `T`, describing a failure as mp-core describes those of task
/// arguments and results: the Rust type, postcard's error, and the message the failing
/// `Deserialize` noted with [`note_decode_failure`] (which postcard itself drops).
pub fn decode_described<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    clear();
    postcard::from_bytes(bytes).map_err(|e| describe_decode::<T>(bytes, e))
}
