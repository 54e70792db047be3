//! The frame layout: an 8-byte header (payload length, kind), then the
//! payload padded to 8 bytes; and how a consumer takes a frame.
//!
//! A *skip* frame ([`KIND_SKIP`]) carries no item: its "payload" is the rest
//! of the ring's lap, which a producer wrapping early (see `ring/wrap.rs`)
//! leaves unused. It counts no item, and a consumer just steps over it.

use std::sync::atomic::Ordering::SeqCst;

use super::heap::REGION_HEADER;
use super::{Payload, Pos, Ring, RingError, io_error};

/// Frame header: payload length (low 32 bits) and kind (high 32 bits).
pub(super) const FRAME_HEADER: u32 = 8;
pub(super) const KIND_INLINE: u32 = 1;
pub(super) const KIND_OUT_OF_BAND: u32 = 2;
/// A frame that holds no item: the unused end of a lap (see `ring/wrap.rs`).
pub(super) const KIND_SKIP: u32 = 3;
/// Payload of an out-of-band frame: region offset, length, item id.
pub(super) const OUT_OF_BAND_DESCRIPTOR: u32 = 24;

/// Frame size for a payload of `len` bytes.
pub(super) fn frame_len(len: u64) -> u64 {
    u64::from(FRAME_HEADER) + len.next_multiple_of(8)
}

/// Where the payload of a frame being consumed lies (positions, not
/// references: see [`Ring::consume`]).
pub(super) enum PayloadAt {
    /// `len` bytes in the ring at `at`.
    Inline { at: Pos, len: usize },
    /// `len` bytes of the memfd at `offset`.
    OutOfBand { offset: u64, len: usize },
}

impl Ring {
    /// Writes, at `tail`, a skip frame `len` bytes long (header included)
    /// over the rest of the lap; published with the frame after it.
    pub(super) fn write_skip_frame(&self, tail: Pos, len: u32) {
        debug_assert!(len >= FRAME_HEADER && len.is_multiple_of(8));
        let word = (u64::from(KIND_SKIP) << 32) | u64::from(len - FRAME_HEADER);
        // SAFETY: the header slot is free space at the tail (we hold the
        // producer lock), 8-aligned since frames are.
        unsafe { self.data_ptr(tail).cast::<u64>().write(word) };
    }

    /// Writes a frame header for `len` payload bytes at `tail` and
    /// publishes it.
    pub(super) fn publish_frame(&self, tail: Pos, kind: u32, len: u32) {
        let word = (u64::from(kind) << 32) | u64::from(len);
        // SAFETY: the header slot is free space at the tail (we hold the
        // producer lock), 8-aligned since frames are.
        unsafe { self.data_ptr(tail).cast::<u64>().write(word) };
        let frame = frame_len(u64::from(len)) as u32;
        if self.indices().publish(tail.advance(frame, 1)) {
            self.ring_doorbell();
        }
    }

    /// Reads the frame at `head` (with `used` bytes published) and
    /// consumes it. `Ok(None)`: it held no item to deliver (a skip frame, or
    /// an out-of-band item that a dead consumer had already taken); it was
    /// stepped over.
    pub(super) fn take_frame<R>(
        &self,
        head: Pos,
        used: u32,
        read: &mut Option<impl FnOnce(Payload<'_>) -> R>,
    ) -> Result<Option<R>, RingError> {
        if used < FRAME_HEADER || used > self.capacity {
            return Err(RingError::Corrupted(format!("{used} bytes published")));
        }
        // SAFETY: at least 8 published, 8-aligned bytes at `head`, ours
        // under the consumer lock.
        let word = unsafe { self.data_ptr(head).cast::<u64>().read() };
        let (kind, len) = ((word >> 32) as u32, word as u32);
        let frame = frame_len(u64::from(len));
        if frame > u64::from(used) {
            return Err(RingError::Corrupted(format!(
                "frame of {len} bytes, {used} published"
            )));
        }
        if kind == KIND_SKIP {
            // The end of a lap a producer wrapped early from: no item.
            self.indices()
                .release(head.advance(frame as u32, 0), self.capacity);
            return Ok(None);
        }
        let next = head.advance(frame as u32, 1);
        let payload_at = head.advance(FRAME_HEADER, 0);
        // SAFETY: `len` published bytes follow the frame header (checked above).
        let payload = unsafe { self.published(payload_at, len as usize) };
        match kind {
            KIND_INLINE => Ok(Some(self.consume(
                PayloadAt::Inline {
                    at: payload_at,
                    len: len as usize,
                },
                read,
                None,
                next,
            ))),
            KIND_OUT_OF_BAND if len == OUT_OF_BAND_DESCRIPTOR => {
                let field = |i: usize| {
                    u64::from_le_bytes(payload[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
                };
                let (offset, item_len, id) = (field(0), field(1), field(2));
                let mut region_header = [0u8; REGION_HEADER as usize];
                self.file
                    .read_exact_at(&mut region_header, offset)
                    .map_err(io_error("pread"))?;
                let region_id = u64::from_le_bytes(region_header[..8].try_into().expect("8 bytes"));
                let region_len =
                    u64::from_le_bytes(region_header[8..].try_into().expect("8 bytes"));
                if region_id != id || region_len != item_len {
                    tracing::warn!(
                        id,
                        "skipping an out-of-band item taken by a consumer that died"
                    );
                    self.tasks().done.fetch_add(1, SeqCst);
                    self.indices().release(next, self.capacity);
                    return Ok(None);
                }
                // Never trust a length from shared memory with an allocation.
                let file_len = self.file.len().map_err(io_error("fstat"))?;
                let end = offset
                    .checked_add(REGION_HEADER)
                    .and_then(|o| o.checked_add(item_len));
                let len = usize::try_from(item_len)
                    .ok()
                    .filter(|_| end.is_some_and(|end| end <= file_len))
                    .ok_or_else(|| {
                        RingError::Corrupted(format!(
                            "out-of-band item of {item_len} bytes at {offset}"
                        ))
                    })?;
                let region = (offset, REGION_HEADER + item_len);
                let payload = PayloadAt::OutOfBand {
                    offset: offset + REGION_HEADER,
                    len,
                };
                Ok(Some(self.consume(payload, read, Some(region), next)))
            }
            _ => Err(RingError::Corrupted(format!(
                "frame kind {kind} of {len} bytes"
            ))),
        }
    }

    /// Calls `read` on `payload`, frees the out-of-band `region` if any,
    /// then advances the head to `next` — also if `read` panics (the
    /// item is dropped, as a normal return would have consumed it).
    ///
    /// The payload is lent to `read` only for that call: no reference to
    /// the frame's bytes is alive when the head moves past them (a
    /// producer may write there from then on; Miri checks it).
    pub(super) fn consume<R>(
        &self,
        payload: PayloadAt,
        read: &mut Option<impl FnOnce(Payload<'_>) -> R>,
        region: Option<(u64, u64)>,
        next: Pos,
    ) -> R {
        let read = read.take().expect("one frame is delivered per pop");
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            read(match payload {
                PayloadAt::Inline { at, len } => {
                    // SAFETY: `len` published bytes at `at` (checked by
                    // `take_frame`), ours under the consumer lock until the
                    // release below, which follows this call.
                    Payload::Inline(unsafe { self.published(at, len) })
                }
                PayloadAt::OutOfBand { offset, len } => Payload::OutOfBand {
                    file: &self.file,
                    offset,
                    len,
                },
            })
        }));
        // Punch before advancing: a region is never in use once its frame
        // is behind the head (the heap restarts on an empty ring).
        if let Some((offset, len)) = region {
            if let Err(error) = self.file.punch(offset, len) {
                tracing::warn!(%error, "could not free an out-of-band region");
            }
            self.header().producer.0.live_regions.fetch_sub(1, SeqCst);
        }
        self.indices().release(next, self.capacity);
        match outcome {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}
