//! How a handle that fails to decode says why, across processes.
//!
//! A handle (queue, segment, connection, lock, ...) decoded in a child can fail for a reason
//! only that child knows (a named segment unlinked meanwhile, descriptors exhausted). postcard,
//! the codec of process arguments, replaces serde's custom messages by a generic one, so every
//! handle's `Deserialize` reports through [`custom`]: the message is noted with mp-core
//! ([`mp_core::note_decode_failure`]), which puts it into the `BadArguments` / `BadResult`
//! error the parent's `join()` returns, and also becomes the serde error itself. A handle that
//! fails to *encode* (its descriptors could not be lent: EMFILE) reports through
//! [`custom_encode`] the same way, into the `StartFailed` or `BadResult` error.

use std::fmt::Display;

/// The serde error for a handle that could not be decoded, with its message noted for mp-core.
pub(crate) fn custom<E: serde::de::Error>(error: impl Display) -> E {
    mp_core::note_decode_failure(&error);
    E::custom(error)
}

/// The serde error for a handle that could not be encoded, with its message noted for mp-core
/// (which describes encode failures of arguments and results with the same note).
pub(crate) fn custom_encode<E: serde::ser::Error>(error: impl Display) -> E {
    mp_core::note_decode_failure(&error);
    E::custom(error)
}
