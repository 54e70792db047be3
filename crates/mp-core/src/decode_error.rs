//! Keeping the cause of a decode failure across processes.
//!
//! postcard, the format under ipc-channel, drops the message of `serde::de::Error::custom`:
//! a handle that fails to attach (a shared segment that was unlinked) would reach the
//! parent's `join` as a bare "Serialization/Deserialization error". A `Deserialize` impl that
//! fails for a reason of its own records it here first ([`note_decode_failure`]); mp-core
//! takes the note when it reports the failure, together with the Rust type that failed.

use std::cell::RefCell;
use std::fmt::Display;

thread_local! {
    static NOTE: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Records why a value failed to decode on this thread, for the error mp-core reports (call
/// it in a `Deserialize` impl just before returning `D::Error::custom(..)`; the message
/// survives formats that discard custom messages, such as postcard).
pub fn note_decode_failure(message: impl Display) {
    NOTE.with(|note| *note.borrow_mut() = Some(message.to_string()));
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

/// Decodes a postcard-encoded `T`, describing a failure as mp-core describes those of task
/// arguments and results: the Rust type, postcard's error, and the message the failing
/// `Deserialize` noted with [`note_decode_failure`] (which postcard itself drops).
pub fn decode_described<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    clear();
    postcard::from_bytes(bytes).map_err(describe::<T>)
}
