//! Early wrap: a producer putting large items starts the next lap of the
//! ring after the first [`SOFT_WINDOW`] bytes instead of at its end, when
//! the consumer keeps up, so that a stream of large items cycles through
//! 1 MiB of the ring rather than all of it.
//!
//! # Why
//!
//! A ring is 8 MiB by default (so that items up to 2 MiB travel inline), and
//! frames follow each other through all of it: for 64 KiB items every lap
//! touches 2,048 pages (4 KiB: shared memory gets no transparent huge pages
//! on the machine measured) and 8 MiB of cache lines on each side, four times
//! a core's 2 MiB L2. On the 2-vCPU Zen 5 KVM guest this project benchmarks
//! on, `queue_1to1_64k` then ran at ~20, ~35 or ~60 GB/s from one measurement
//! process to the next; with the early wrap it runs at 55-58 GB/s in the same
//! interleaved rounds (11 rounds of `mp-bench measure`, each started on an
//! idle machine: 36.5 against 57.7 GB/s median, 9 of 11 runs at 55 or more
//! against 3 of 11; the other two read ~35, as do both builds whenever other
//! work holds a vCPU).
//! A C model of the ring (two processes, a memfd, spinning indices) read
//! ~35 GB/s with an 8 MiB ring, ~40 with 2 MiB, ~47 with 1 MiB and ~50 with
//! 512 KiB; the window of 512 KiB measured the same as 1 MiB in the
//! benchmark. That the cost is the footprint (TLB reach under nested paging,
//! and lines coming from L3 or memory rather than the other core's L2) is
//! our reading, not a measurement: the VM exposes no performance counters.
//!
//! A smaller ring would do the same, but it sends items over a quarter of it
//! out of band, and it stops a fast producer early: with a 1 MiB first
//! segment `queue_1to1_8b` fell from 12.8 to 9.9 M items/s, its producer then
//! waiting for room in lockstep with the consumer.
//!
//! # How
//!
//! Only for frames of [`MIN_WRAP_FRAME`] to [`MAX_WRAP_FRAME`] bytes, in rings
//! of at least [`MIN_WRAP_CAPACITY`], and predicted from the last frame this
//! process put (the size is known only once encoded): when the next frame
//! would end beyond [`SOFT_WINDOW`] into the lap, the producer writes a skip
//! frame (`frames::KIND_SKIP`, no item) over the rest of the lap and the
//! item at the start of the next lap, and publishes both with one store of
//! `tail`. That needs the rest of the lap *and* the frame free, i.e. the
//! consumer past the first frame of the current lap. If the room is not
//! there, the producer waits for it only briefly (one adaptive spin, see
//! [`Spinner`](super::Spinner), never a sleep) and only when a frame or two
//! of gets would make it, and not at all when its caller does not wait for
//! room: `try_` puts, and the first attempt of every queue put
//! (`queue/segments.rs`), which so wraps early only when the room is there
//! already (as it is for `queue_1to1_64k`'s consumer); otherwise it puts the
//! item where it always did, right after `tail`. So when the ring has room a
//! put waits at most one short spin, and a consumer that falls behind
//! still gets the whole ring; the producer returns to the first 1 MiB at a
//! later put, once the consumer has caught up.
//!
//! The index protocol is unchanged: a skip frame is published and released
//! like any frame (it advances the byte position, not the item count), so
//! the loom models of `indices.rs` cover it.

use std::sync::atomic::Ordering::Relaxed;

use super::codec::Encode;
use super::frames::{FRAME_HEADER, KIND_INLINE, frame_len};
use super::{Pos, Ring, RingError, Wait};
use crate::message_handles::Carrier;

/// Bytes at the start of each lap that a stream of large frames stays in.
pub(super) const SOFT_WINDOW: u32 = 1 << 20;
/// Smallest frame that wraps early: below it, a frame costs its producer
/// and consumer little bandwidth, and waiting for the consumer (to free the
/// start of the lap) could cost more than the footprint saves.
pub(super) const MIN_WRAP_FRAME: u32 = 16 << 10;
/// Largest frame that wraps early (a quarter of the window).
pub(super) const MAX_WRAP_FRAME: u32 = SOFT_WINDOW / 4;
/// Smallest ring that wraps early.
pub(super) const MIN_WRAP_CAPACITY: u32 = 4 * SOFT_WINDOW;

impl Ring {
    /// Whether the producer, whose next frame would start at `tail`, should
    /// start it at the next lap instead: then the bytes from `tail` to the
    /// end of the lap (the skip frame's length).
    #[inline]
    pub(super) fn early_wrap(&self, tail: Pos) -> Option<u32> {
        if self.capacity < MIN_WRAP_CAPACITY {
            return None;
        }
        let predicted = self.last_frame.load(Relaxed);
        if !(MIN_WRAP_FRAME..=MAX_WRAP_FRAME).contains(&predicted) {
            return None;
        }
        let offset = tail.bytes() & (self.capacity - 1);
        if offset == 0 || offset + predicted <= SOFT_WINDOW {
            return None;
        }
        Some(self.capacity - offset)
    }

    /// A head that shows room for `skip` bytes after `tail` and then a frame
    /// of the predicted size, waiting for it as the module docs say; `None`
    /// when the room is not there (then the item goes right after `tail`).
    pub(super) fn room_to_wrap(&self, tail: Pos, head: Pos, skip: u32, wait: Wait) -> Option<Pos> {
        let indices = self.indices();
        let producer = &self.header().producer.0;
        let needed = u64::from(skip) + u64::from(self.last_frame.load(Relaxed));
        let free = |head: Pos| u64::from(self.capacity.saturating_sub(head.used_bytes(tail)));
        if free(head) >= needed {
            return Some(head);
        }
        let head = indices.head();
        producer.cached_head.store(head.0, Relaxed);
        let missing = needed.saturating_sub(free(head));
        if missing == 0 {
            return Some(head);
        }
        let predicted = u64::from(self.last_frame.load(Relaxed));
        if matches!(wait, Wait::Never) || missing > 2 * predicted {
            return None;
        }
        if !self.spinner.spin(|| free(indices.head()) >= needed) {
            return None;
        }
        let head = indices.head();
        producer.cached_head.store(head.0, Relaxed);
        (free(head) >= needed).then_some(head)
    }
}

/// What became of an item tried at the start of the next lap.
pub(super) enum EarlyWrap {
    /// It was put there, after a skip frame.
    Put,
    /// It is larger than predicted and did not fit: put it where it always
    /// goes (`seen` is the head the attempt saw).
    Larger { seen: Pos },
    /// The room was not there: put it where it always goes.
    NoRoom,
}

impl Ring {
    /// Tries to put `item` at the start of the next lap, after a skip frame
    /// of `skip` bytes at `tail` (from [`Ring::early_wrap`]), as one
    /// publication. Out of line: the put of a small item, which never gets
    /// here, stays short.
    #[inline(never)]
    pub(super) fn put_after_skip(
        &self,
        item: &dyn Encode,
        carrier: Carrier<'_>,
        tail: Pos,
        head: Pos,
        skip: u32,
        wait: Wait,
    ) -> Result<EarlyWrap, RingError> {
        let Some(head) = self.room_to_wrap(tail, head, skip, wait) else {
            return Ok(EarlyWrap::NoRoom);
        };
        // `room_to_wrap` saw `skip` + one predicted frame (at least
        // `MIN_WRAP_FRAME`, far more than a header) free.
        let free = self.capacity - head.used_bytes(tail) - skip;
        let start = tail.advance(skip, 0);
        let window = free.min(self.max_inline_frame) - FRAME_HEADER;
        // SAFETY: the caller holds the producer lock, and the window lies in
        // the free space after `tail` + `skip` (the start of the next lap),
        // which `room_to_wrap` saw free.
        let space = unsafe { self.free_space(start.advance(FRAME_HEADER, 0), window as usize) };
        let Some(len) = item.encode_into(space, carrier)? else {
            return Ok(EarlyWrap::Larger { seen: head });
        };
        self.write_skip_frame(tail, skip);
        self.publish_frame(start, KIND_INLINE, len as u32);
        self.last_frame.store(frame_len(len as u64) as u32, Relaxed);
        Ok(EarlyWrap::Put)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::ring::{RawBytes, RingConfig, RingError};

    const CAPACITY: usize = 8 << 20;
    const ITEM: usize = 64 << 10;

    fn ring() -> Arc<Ring> {
        Arc::new(
            Ring::create(RingConfig {
                capacity: CAPACITY,
                max_items: None,
                type_tag: 7,
                doorbell: false,
            })
            .unwrap(),
        )
    }

    fn item(seq: u32, len: usize) -> Vec<u8> {
        let mut item: Vec<u8> = (0..len).map(|i| (i as u32 ^ seq) as u8).collect();
        item[..4].copy_from_slice(&seq.to_le_bytes());
        item
    }

    fn put(ring: &Ring, bytes: &[u8]) {
        ring.push(&RawBytes(bytes), Wait::Never, None).unwrap();
    }

    fn get(ring: &Ring) -> Vec<u8> {
        ring.pop(Wait::Never, None, |p| p.to_vec().unwrap())
            .unwrap()
    }

    fn tail_offset(ring: &Ring) -> u32 {
        ring.indices().tail().bytes() & (ring.capacity - 1)
    }

    #[test]
    fn large_items_stay_at_the_start_of_the_lap_while_the_consumer_keeps_up() {
        let ring = ring();
        let frame = 8 + ITEM as u32;
        for seq in 0..600 {
            // Two laps' worth of the whole ring, one window's worth ahead.
            put(&ring, &item(seq, ITEM));
            if seq >= 8 {
                assert_eq!(get(&ring), item(seq - 8, ITEM));
            }
            assert!(
                tail_offset(&ring) <= SOFT_WINDOW + frame,
                "{}",
                tail_offset(&ring)
            );
        }
        for seq in 592..600 {
            assert_eq!(get(&ring), item(seq, ITEM));
        }
        assert_eq!(ring.len(), 0);
        assert!(matches!(
            ring.pop(Wait::Never, None, |_| ()),
            Err(RingError::Empty)
        ));
    }

    #[test]
    fn a_consumer_that_falls_behind_still_gets_the_whole_ring_without_waits() {
        let ring = ring();
        // 120 items of 64 KiB: most of the ring, far beyond the window;
        // every put succeeds at once (`Wait::Never`).
        for seq in 0..120 {
            put(&ring, &item(seq, ITEM));
        }
        assert!(tail_offset(&ring) > 7 << 20);
        for seq in 0..120 {
            assert_eq!(get(&ring), item(seq, ITEM));
        }
        // Caught up: the next large put starts the next lap.
        put(&ring, &item(120, ITEM));
        assert_eq!(tail_offset(&ring), 8 + ITEM as u32);
        assert_eq!(ring.len(), 1, "a skip frame counts no item");
        assert_eq!(get(&ring), item(120, ITEM));
        assert_eq!(ring.len(), 0);
    }

    #[test]
    fn items_of_every_size_around_the_prediction_keep_their_order() {
        let ring = ring();
        let sizes = [
            ITEM,
            ITEM,
            3,
            MAX_WRAP_FRAME as usize - 8,
            MAX_WRAP_FRAME as usize + 1000,
            (MIN_WRAP_FRAME as usize) - 100,
            ITEM,
            200 << 10,
            0,
            ITEM,
        ];
        let mut expected = std::collections::VecDeque::new();
        for seq in 0..2_000u32 {
            let len = sizes[seq as usize % sizes.len()].max(4);
            let bytes = item(seq, len);
            put(&ring, &bytes);
            expected.push_back(bytes);
            // The consumer lags by a varying number of items.
            while expected.len() > (seq as usize % 7) {
                assert_eq!(get(&ring), expected.pop_front().unwrap());
            }
        }
        while let Some(bytes) = expected.pop_front() {
            assert_eq!(get(&ring), bytes);
        }
        assert_eq!(ring.len(), 0);
    }

    #[test]
    fn threads_passing_large_items_lose_and_reorder_nothing() {
        let ring = ring();
        const ITEMS: u32 = 3_000;
        let producer = {
            let ring = Arc::clone(&ring);
            std::thread::spawn(move || {
                for seq in 0..ITEMS {
                    let len = [ITEM, 20 << 10, ITEM + 8, 100, 150 << 10][seq as usize % 5];
                    ring.push(
                        &RawBytes(&item(seq, len)),
                        Wait::timeout(Duration::from_secs(20)),
                        None,
                    )
                    .unwrap();
                }
            })
        };
        for seq in 0..ITEMS {
            let len = [ITEM, 20 << 10, ITEM + 8, 100, 150 << 10][seq as usize % 5];
            let got = ring
                .pop(Wait::timeout(Duration::from_secs(20)), None, |p| {
                    p.to_vec().unwrap()
                })
                .unwrap();
            assert!(got == item(seq, len), "item {seq} differs");
        }
        producer.join().unwrap();
        assert_eq!(ring.len(), 0);
    }
}
