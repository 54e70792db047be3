//! Large payloads (a chunk's arguments, a chunk's results) through a reused shared region
//! instead of the queues' out-of-band path.
//!
//! # Why
//!
//! mp-ipc's queue carries a large item out of band: in a fresh part of the ring's memfd,
//! punched out of the file once read. Every large item therefore costs the writer a page
//! fault per 4 KiB page (the kernel allocates and zeroes it) and the reader another (it maps
//! it), on top of the copies: a 1 MiB argument echoed through a worker took ~1 200 page
//! faults and 2.5 ms, mostly in the kernel.
//!
//! # How
//!
//! Each direction of each worker has at most one *region*: a [`SharedMemory`] (memfd) with
//! a small header holding a `busy` word, then room for one payload. The writer (the pool
//! for arguments, the worker for results) creates it on the first payload of at least
//! [`MIN_BYTES`], with an eighth to spare, and sends its handle once, inside the
//! message that carries that payload; later messages name only the length. The pages stay
//! mapped and faulted on both sides, so later payloads cost one copy in and the reader's
//! decode out, nothing else.
//!
//! The `busy` word is the whole protocol (one slot, one writer, one reader):
//! * the writer takes the region by moving `busy` 0 → 1 (compare-and-swap, acquire), then
//!   copies the payload in and publishes the message on its queue (the queue's publish
//!   orders the copy before the reader's receipt);
//! * the reader uses the bytes in place (a worker decodes its arguments from them; the
//!   pool decodes the results from them) and then stores 0 (release).
//!
//! The writer never waits: if the region is still busy (the reader has not finished with
//! the previous payload) or the payload is larger than [`MAX_BYTES`], the payload goes
//! inline on the queue as before. A region too small for a payload is replaced by a larger
//! one when it is free. If the message cannot be sent, the writer releases the region
//! itself (the reader never saw it). A region dies with its worker's links: a dead worker's
//! region is unmapped when the last handle goes, whatever state `busy` was left in.
//!
//! Memory: at most one region per direction per worker, at most [`MAX_BYTES`] each, kept
//! while the worker lives (a pool that never sends large payloads has none).

use std::sync::atomic::{AtomicU32, Ordering};

use mp_ipc::shm::{SharedMemory, ShmError};
use serde::{Deserialize, Serialize};

/// Payloads from this size on go through a region.
pub(crate) const MIN_BYTES: usize = 64 * 1024;
/// Payloads larger than this go inline (regions stay bounded).
pub(crate) const MAX_BYTES: usize = 64 << 20;
/// Bytes before the payload: the `busy` word, on its own cache line.
const HEADER: usize = 64;

/// A payload in the sender's region, as a message names it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct BulkRef {
    /// Its length (it starts at the region's data).
    pub len: u64,
    /// The region, when the receiver does not know it yet (a new one).
    pub region: Option<SharedMemory>,
}

/// One region: a `busy` word, then the payload.
#[derive(Clone, Debug)]
pub(crate) struct Region(SharedMemory);

impl Region {
    /// A new free region with room for `len` bytes, and an eighth more (payloads of about
    /// the same size keep using it).
    fn with_room(len: usize) -> Result<Region, ShmError> {
        let room = (len + len / 8).next_multiple_of(MIN_BYTES);
        Ok(Region(SharedMemory::new(HEADER + room)?))
    }

    fn busy(&self) -> &AtomicU32 {
        let ptr = self.0.as_mut_ptr().cast::<u32>();
        debug_assert!(ptr.is_aligned() && self.0.len() >= HEADER);
        // SAFETY: the mapping starts on a page boundary (so `ptr` is aligned for a u32) and
        // holds at least HEADER bytes (`with_room`, and `from_shared` checks received ones);
        // it stays mapped while `self` lives, which bounds the returned reference. Every
        // process accesses these 4 bytes only through atomic operations on this same view.
        unsafe { AtomicU32::from_ptr(ptr) }
    }

    /// Room for a payload.
    fn room(&self) -> usize {
        self.0.len() - HEADER
    }

    /// Writer: takes the region if the reader is done with it.
    fn try_take(&self) -> bool {
        self.busy()
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Reader (or a writer whose message was not sent): the region is free again.
    fn release(&self) {
        self.busy().store(0, Ordering::Release);
    }

    /// Writer, holding the region: copies `bytes` in.
    fn write(&self, bytes: &[u8]) {
        assert!(bytes.len() <= self.room());
        // SAFETY: the range [HEADER, HEADER + bytes.len()) is inside the mapping (asserted
        // above). The writer holds the region (`busy` is 1, taken by `try_take` or set on
        // creation), so the reader does not access the data until the message naming it
        // is published, after this copy; no other writer exists (one per region).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.0.as_mut_ptr().add(HEADER),
                bytes.len(),
            );
        }
    }

    /// Reader: the payload of `len` bytes, if it fits in the region.
    fn bytes(&self, len: usize) -> Option<&[u8]> {
        if len > self.room() {
            return None;
        }
        // SAFETY: the range is inside the mapping (checked above), which lives as long as
        // `self`. The reader calls this only between receiving a message that names the
        // payload and releasing the region; the writer does not touch the data in that
        // time (it waits for `busy` to be 0), so the bytes do not change while borrowed.
        Some(unsafe { std::slice::from_raw_parts(self.0.as_ptr().add(HEADER), len) })
    }

    /// A region received in a message (checked to hold a header).
    fn from_shared(shared: SharedMemory) -> Option<Region> {
        (shared.len() > HEADER).then_some(Region(shared))
    }
}

/// The writing side of one direction.
#[derive(Default)]
pub(crate) struct Outbox {
    region: Option<Region>,
    /// The reader has the region's handle (a message carrying it was sent).
    announced: bool,
    /// A payload was staged and its message not sent yet.
    pending: bool,
}

impl Outbox {
    /// Puts `bytes` in the region if it is worth it and free (or a new one can be made):
    /// the reference to send instead of the bytes. `None`: send them inline. After trying
    /// to send, call [`sent`](Self::sent).
    pub(crate) fn stage(&mut self, bytes: &[u8]) -> Option<BulkRef> {
        if !(MIN_BYTES..=MAX_BYTES).contains(&bytes.len()) {
            return None;
        }
        match &self.region {
            Some(region) if region.room() >= bytes.len() => {
                if !region.try_take() {
                    return None;
                }
            }
            current => {
                // None yet, or too small: replace it, unless the reader still uses it.
                if current.as_ref().is_some_and(|region| !region.try_take()) {
                    return None;
                }
                match Region::with_room(bytes.len()) {
                    Ok(region) => {
                        region.try_take();
                        self.region = Some(region);
                        self.announced = false;
                    }
                    Err(e) => {
                        tracing::debug!(%e, "no bulk region; payload goes inline");
                        if let Some(old) = &self.region {
                            old.release();
                        }
                        return None;
                    }
                }
            }
        }
        let region = self.region.as_ref()?;
        region.write(bytes);
        self.pending = true;
        Some(BulkRef {
            len: bytes.len() as u64,
            region: (!self.announced).then(|| region.0.clone()),
        })
    }

    /// A message was sent (`true`) or could not be (`false`): if it carried the staged
    /// payload, the reader now knows the region, or the region is free again.
    pub(crate) fn sent(&mut self, ok: bool) {
        if !std::mem::take(&mut self.pending) {
            return;
        }
        if let Some(region) = &self.region {
            if ok {
                self.announced = true;
            } else {
                region.release();
            }
        }
    }
}

/// The reading side of one direction: the region the writer last announced.
#[derive(Default)]
pub(crate) struct Inbox {
    region: Option<Region>,
}

impl Inbox {
    /// Resolves a reference from a message: the region holding its payload (adopting a
    /// newly announced one). `None`: no region is known, or the payload does not fit in it
    /// (a broken message).
    pub(crate) fn open(&mut self, bulk: BulkRef) -> Option<Staged> {
        if let Some(shared) = bulk.region {
            self.region = Region::from_shared(shared);
        }
        let region = self.region.clone()?;
        let len = usize::try_from(bulk.len).ok()?;
        region.bytes(len)?;
        Some(Staged { region, len })
    }
}

/// A payload in a region, readable in place; dropping it frees the region for the writer.
#[derive(Debug)]
pub(crate) struct Staged {
    region: Region,
    len: usize,
}

impl Staged {
    /// The payload.
    pub(crate) fn bytes(&self) -> &[u8] {
        // `open` checked that it fits.
        self.region.bytes(self.len).unwrap_or_default()
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        self.region.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(len: usize, byte: u8) -> Vec<u8> {
        vec![byte; len]
    }

    #[test]
    fn small_and_huge_payloads_go_inline() {
        let mut outbox = Outbox::default();
        assert!(outbox.stage(&payload(MIN_BYTES - 1, 1)).is_none());
        assert!(outbox.region.is_none());
    }

    #[test]
    fn a_region_is_announced_once_and_reused_when_released() {
        let (mut outbox, mut inbox) = (Outbox::default(), Inbox::default());
        let first = outbox.stage(&payload(MIN_BYTES, 1)).unwrap();
        assert!(
            first.region.is_some(),
            "a new region travels with its payload"
        );
        outbox.sent(true);
        // Busy until the reader is done: the next payload goes inline.
        assert!(outbox.stage(&payload(MIN_BYTES, 2)).is_none());
        let staged = inbox.open(first).unwrap();
        assert!(staged.bytes().iter().all(|&b| b == 1));
        assert!(outbox.stage(&payload(MIN_BYTES, 3)).is_none());
        drop(staged);
        let second = outbox.stage(&payload(MIN_BYTES, 4)).unwrap();
        assert!(second.region.is_none(), "the reader knows the region");
        outbox.sent(true);
        let staged = inbox.open(second).unwrap();
        assert_eq!(staged.bytes().len(), MIN_BYTES);
        assert!(staged.bytes().iter().all(|&b| b == 4));
    }

    #[test]
    fn an_unsent_payload_frees_the_region_and_a_new_region_is_announced_again() {
        let (mut outbox, mut inbox) = (Outbox::default(), Inbox::default());
        let lost = outbox.stage(&payload(MIN_BYTES, 1)).unwrap();
        outbox.sent(false);
        drop(lost);
        let again = outbox.stage(&payload(MIN_BYTES, 2)).unwrap();
        assert!(again.region.is_some(), "never announced: it travels again");
        outbox.sent(true);
        drop(inbox.open(again).unwrap());
        // A larger payload replaces the (free) region and announces the new one.
        let larger = outbox.stage(&payload(4 * MIN_BYTES, 3)).unwrap();
        assert!(larger.region.is_some());
        outbox.sent(true);
        let staged = inbox.open(larger).unwrap();
        assert_eq!(staged.bytes(), &payload(4 * MIN_BYTES, 3)[..]);
    }

    #[test]
    fn a_reference_beyond_the_region_is_refused() {
        let (mut outbox, mut inbox) = (Outbox::default(), Inbox::default());
        let mut bulk = outbox.stage(&payload(MIN_BYTES, 1)).unwrap();
        bulk.len = u64::MAX;
        assert!(inbox.open(bulk).is_none());
        assert!(
            Inbox::default()
                .open(BulkRef {
                    len: 1,
                    region: None
                })
                .is_none()
        );
    }
}
