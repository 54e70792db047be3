//! The codec: how items become frame payloads and payloads become items.
//! Producers encode straight into the ring's free space ([`Encode`]);
//! consumers read a [`Payload`] in place (inline) or from the heap.

use std::borrow::Cow;
use std::io;

use super::RingError;
use super::memory::MemFile;
use crate::message_handles::{Carrier, encoding};

/// Something a producer can write into the ring. `carrier` is where the
/// descriptors of handles inside the item go (see
/// [`message_handles`](crate::message_handles); `None`: handles are refused).
pub(crate) trait Encode {
    /// Encodes into `buf`; `Ok(None)` when `buf` is too small.
    fn encode_into(&self, buf: &mut [u8], carrier: Carrier<'_>)
    -> Result<Option<usize>, RingError>;
    /// The exact encoded length.
    fn encoded_len(&self, carrier: Carrier<'_>) -> Result<usize, RingError>;
    /// The encoded bytes in one piece (for the out-of-band path).
    fn encoded(&self, carrier: Carrier<'_>) -> Result<Cow<'_, [u8]>, RingError>;
}

/// Raw bytes, written as they are.
pub(crate) struct RawBytes<'a>(pub(crate) &'a [u8]);

impl Encode for RawBytes<'_> {
    fn encode_into(&self, buf: &mut [u8], _: Carrier<'_>) -> Result<Option<usize>, RingError> {
        let Some(dst) = buf.get_mut(..self.0.len()) else {
            return Ok(None);
        };
        dst.copy_from_slice(self.0);
        Ok(Some(self.0.len()))
    }

    fn encoded_len(&self, _: Carrier<'_>) -> Result<usize, RingError> {
        Ok(self.0.len())
    }

    fn encoded(&self, _: Carrier<'_>) -> Result<Cow<'_, [u8]>, RingError> {
        Ok(Cow::Borrowed(self.0))
    }
}

/// A serde value, encoded with postcard.
pub(crate) struct Postcard<'a, T: ?Sized>(pub(crate) &'a T);

impl<T: serde::Serialize + ?Sized> Encode for Postcard<'_, T> {
    #[inline]
    fn encode_into(
        &self,
        buf: &mut [u8],
        carrier: Carrier<'_>,
    ) -> Result<Option<usize>, RingError> {
        match encoding(carrier, true, || postcard::to_slice(self.0, buf)) {
            Ok(written) => Ok(Some(written.len())),
            Err(RingError::Encode(postcard::Error::SerializeBufferFull)) => Ok(None),
            Err(error) => Err(error),
        }
    }

    fn encoded_len(&self, carrier: Carrier<'_>) -> Result<usize, RingError> {
        encoding(carrier, false, || {
            postcard::experimental::serialized_size(self.0)
        })
    }

    fn encoded(&self, carrier: Carrier<'_>) -> Result<Cow<'_, [u8]>, RingError> {
        encoding(carrier, true, || postcard::to_stdvec(self.0)).map(Cow::Owned)
    }
}

/// A frame's payload as a consumer sees it, valid during the consumer's
/// callback.
pub(crate) enum Payload<'a> {
    /// In the ring: borrowed in place.
    Inline(&'a [u8]),
    /// In an out-of-band region: read on demand.
    OutOfBand {
        file: &'a MemFile,
        offset: u64,
        len: usize,
    },
}

impl Payload<'_> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Payload::Inline(bytes) => bytes.len(),
            Payload::OutOfBand { len, .. } => *len,
        }
    }

    /// Copies the payload into `buf`, which must be exactly `len()` long.
    pub(crate) fn read_into(&self, buf: &mut [u8]) -> io::Result<()> {
        debug_assert_eq!(buf.len(), self.len());
        match self {
            Payload::Inline(bytes) => {
                buf.copy_from_slice(bytes);
                Ok(())
            }
            Payload::OutOfBand { file, offset, .. } => file.read_exact_at(buf, *offset),
        }
    }

    /// The payload as owned bytes.
    pub(crate) fn to_vec(&self) -> io::Result<Vec<u8>> {
        match self {
            Payload::Inline(bytes) => Ok(bytes.to_vec()),
            Payload::OutOfBand { .. } => {
                let mut buf = vec![0; self.len()];
                self.read_into(&mut buf)?;
                Ok(buf)
            }
        }
    }

    /// The payload in one contiguous piece: borrowed when inline.
    pub(crate) fn contiguous(&self) -> io::Result<Cow<'_, [u8]>> {
        match self {
            Payload::Inline(bytes) => Ok(Cow::Borrowed(bytes)),
            Payload::OutOfBand { .. } => self.to_vec().map(Cow::Owned),
        }
    }
}
