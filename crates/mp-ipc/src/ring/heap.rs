//! The out-of-band heap: items too large for the ring go into their own
//! page-aligned regions of the same memfd, beyond the ring (see the module
//! docs of [`ring`](super) for how a dead producer or consumer is handled).

use std::sync::atomic::Ordering::{Relaxed, SeqCst};

use super::frames::{FRAME_HEADER, KIND_OUT_OF_BAND, OUT_OF_BAND_DESCRIPTOR, frame_len};
use super::{Encode, HEADER_LEN, Liveness, PAGE, Pos, Ring, RingError, Wait, io_error};
use crate::message_handles::Carrier;

/// Header of an out-of-band region: item id and length.
pub(super) const REGION_HEADER: u64 = 16;

impl Ring {
    /// After a producer died holding the lock: free the region it was
    /// writing, unless its frame was published.
    pub(super) fn recover_producer(&self) {
        let producer = &self.header().producer.0;
        let len = producer.pending_len.load(Relaxed);
        if len != 0 {
            let published = self.indices().tail().0 != producer.pending_tail.load(Relaxed);
            if !published {
                let offset = producer.pending_offset.load(Relaxed);
                if let Err(error) = self.file.punch(offset, len) {
                    tracing::warn!(%error, "could not free the region of a producer that died");
                }
            }
            producer.pending_len.store(0, Relaxed);
        }
        tracing::warn!("a producer died during a put; its unpublished item was discarded");
    }

    /// Puts an item too large for the ring into a region of the heap and
    /// a small frame naming it into the ring.
    pub(super) fn push_out_of_band(
        &self,
        (item, carrier): (&dyn Encode, Carrier<'_>),
        len: usize,
        tail: Pos,
        mut head: Pos,
        wait: Wait,
        liveness: Option<&dyn Liveness>,
    ) -> Result<(), RingError> {
        let indices = self.indices();
        let producer = &self.header().producer.0;
        let frame = frame_len(u64::from(OUT_OF_BAND_DESCRIPTOR));
        // First the room for the frame, so that a timeout leaves nothing behind.
        loop {
            if !indices.is_open() {
                return Err(RingError::Closed);
            }
            let free = u64::from(self.capacity.saturating_sub(head.used_bytes(tail)));
            if free >= frame && (self.max_items == 0 || head.used_items(tail) < self.max_items) {
                break;
            }
            head = self.wait_for_room(tail, frame, wait, liveness)?;
        }
        let bytes = item.encoded(carrier)?;
        if bytes.len() != len {
            return Err(RingError::Corrupted(
                "the item encoded to a different length twice".into(),
            ));
        }
        // The heap restarts at its beginning when no region is in use:
        // when none is counted live, or when the ring is empty (consumers
        // punch a region before they advance past its frame).
        let heap_start = self.base + u64::from(self.capacity) + HEADER_LEN as u64;
        if producer.live_regions.load(SeqCst) == 0 || indices.head() == tail {
            producer.heap_next.store(heap_start, Relaxed);
        }
        let offset = producer.heap_next.load(Relaxed);
        let region_len = REGION_HEADER + len as u64;
        let id = producer.next_region_id.fetch_add(1, Relaxed);
        producer.pending_offset.store(offset, Relaxed);
        producer.pending_tail.store(tail.0, Relaxed);
        producer.pending_len.store(region_len, Relaxed);
        producer
            .heap_next
            .store(offset + region_len.next_multiple_of(PAGE), Relaxed);
        let written = self
            .file
            .write_all_at(&bytes, offset + REGION_HEADER)
            .and_then(|()| {
                let mut region_header = [0u8; REGION_HEADER as usize];
                region_header[..8].copy_from_slice(&id.to_le_bytes());
                region_header[8..].copy_from_slice(&(len as u64).to_le_bytes());
                self.file.write_all_at(&region_header, offset)
            });
        if let Err(error) = written {
            let _ = self.file.punch(offset, region_len);
            producer.pending_len.store(0, Relaxed);
            return Err(io_error("writing an out-of-band item")(error));
        }
        let mut descriptor = [0u8; OUT_OF_BAND_DESCRIPTOR as usize];
        descriptor[..8].copy_from_slice(&offset.to_le_bytes());
        descriptor[8..16].copy_from_slice(&(len as u64).to_le_bytes());
        descriptor[16..].copy_from_slice(&id.to_le_bytes());
        // SAFETY: we hold the producer lock and made sure `frame` bytes are free.
        unsafe { self.free_space(tail.advance(FRAME_HEADER, 0), descriptor.len()) }
            .copy_from_slice(&descriptor);
        producer.live_regions.fetch_add(1, SeqCst);
        self.publish_frame(tail, KIND_OUT_OF_BAND, OUT_OF_BAND_DESCRIPTOR);
        producer.pending_len.store(0, Relaxed);
        tracing::trace!(len, id, "out-of-band item put");
        Ok(())
    }
}
