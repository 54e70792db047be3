//! Why a value failed to encode or decode: [`CodecError`], and how a handle that fails says
//! why, across processes.
//!
//! A handle (queue, segment, connection, lock, ...) decoded in a child can fail for a reason
//! only that child knows (a named segment unlinked meanwhile, descriptors exhausted). postcard,
//! the codec of process arguments, replaces serde's custom messages by a generic one, so every
//! handle's `Deserialize` reports through [`custom`]: the message is noted with mp-core
//! ([`mp_core::note_decode_failure`]), which puts it into the `BadArguments` / `BadResult`
//! error the parent's `join()` returns, and also becomes the serde error itself. A handle that
//! fails to *encode* (its descriptors could not be lent: EMFILE) reports through
//! [`custom_encode`] the same way, into the `StartFailed` or `BadResult` error.

use std::fmt::{self, Display};

/// A value that could not be encoded or decoded: which Rust type, postcard's error, and the
/// cause the value itself gave (a handle's reason, or the custom message of a `Serialize` /
/// `Deserialize` impl, which postcard drops and this error keeps).
#[derive(Debug)]
pub struct CodecError {
    type_name: &'static str,
    source: postcard::Error,
    cause: Option<String>,
}

impl CodecError {
    /// A failure to encode `value`. Cold: only failures pay for finding the cause.
    #[cold]
    pub(crate) fn encoding<T: serde::Serialize + ?Sized>(
        value: &T,
        source: postcard::Error,
    ) -> Self {
        let cause = mp_core::take_failure_note().or_else(|| mp_core::encode_failure_cause(value));
        CodecError {
            type_name: std::any::type_name::<T>(),
            source,
            cause,
        }
    }

    /// A failure to decode a `T` from `bytes`, with the cause its `Deserialize` noted or gave
    /// (read again by [`mp_core::decode_failure_cause`], since postcard drops it).
    #[cold]
    pub(crate) fn decoding<T: serde::de::DeserializeOwned>(
        bytes: &[u8],
        source: postcard::Error,
    ) -> Self {
        let cause =
            mp_core::take_failure_note().or_else(|| mp_core::decode_failure_cause::<T>(bytes));
        CodecError {
            type_name: std::any::type_name::<T>(),
            source,
            cause,
        }
    }

    /// postcard's error where the type is not known (the ring's own encoding); the queue or
    /// pipe that knows the value replaces it with [`encoding`](Self::encoding).
    pub(crate) fn untyped(source: postcard::Error) -> Self {
        CodecError {
            type_name: "a value",
            source,
            cause: None,
        }
    }

    /// postcard's error, taking it out.
    pub(crate) fn into_postcard_error(self) -> postcard::Error {
        self.source
    }

    /// The Rust type that failed (`std::any::type_name`).
    pub fn type_name(&self) -> &'static str {
        self.type_name
    }

    /// postcard's error.
    pub fn postcard_error(&self) -> &postcard::Error {
        &self.source
    }

    /// What the value itself said, when it said something: a handle's reason (a segment
    /// that no longer exists, descriptors exhausted) or a `Serialize` impl's custom message.
    pub fn cause(&self) -> Option<&str> {
        self.cause.as_deref()
    }
}

impl Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.type_name, self.source)?;
        match &self.cause {
            Some(cause) => write!(f, ": {cause}"),
            None => Ok(()),
        }
    }
}

impl std::error::Error for CodecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

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
