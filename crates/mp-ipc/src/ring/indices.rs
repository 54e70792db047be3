//! The index and wake-up protocol of a ring: positions, the published head
//! and tail, the futex words sleepers announce themselves on, and the
//! open/closing/closed state. Model-checked with loom (below).

use std::time::Instant;

use crate::futex::{self, AtomicU32, WaitOutcome};
#[cfg(loom)]
use loom::sync::atomic::{AtomicU64, fence};
use std::sync::atomic::Ordering::{Relaxed, Release, SeqCst};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU64, fence};

/// `state`: open for puts.
const OPEN: u32 = 0;
/// `state`: `close` has begun; puts fail, gets still wait (a put may be in flight).
const CLOSING: u32 = 1;
/// `state`: closed; no put is in flight or will ever publish again.
const CLOSED: u32 = 2;

/// A ring position: byte offset (mod 2^32) in the low half, item count (mod
/// 2^32) in the high half.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pos(pub(crate) u64);

impl Pos {
    pub(crate) fn bytes(self) -> u32 {
        self.0 as u32
    }

    pub(crate) fn items(self) -> u32 {
        (self.0 >> 32) as u32
    }

    pub(crate) fn advance(self, bytes: u32, items: u32) -> Pos {
        let items = u64::from(self.items().wrapping_add(items)) << 32;
        Pos(items | u64::from(self.bytes().wrapping_add(bytes)))
    }

    /// Bytes between `self` (a head) and `tail`.
    pub(crate) fn used_bytes(self, tail: Pos) -> u32 {
        tail.bytes().wrapping_sub(self.bytes())
    }

    /// Items between `self` (a head) and `tail`.
    pub(crate) fn used_items(self, tail: Pos) -> u32 {
        tail.items().wrapping_sub(self.items())
    }
}

/// Keeps a word alone on its cache line pair (adjacent-line prefetch pulls
/// 128 bytes on x86).
#[repr(C, align(128))]
#[derive(Default)]
pub(crate) struct Padded<T>(pub(crate) T);

/// Sleeping consumers: a futex sequence word and who waits: [`FUTEX_SLEEPER`]
/// (a consumer or poller asleep on `seq`) and/or [`DOORBELL_ARMED`] (somebody
/// waits on the ring's doorbell descriptor, see `Ring::arm_doorbell`).
#[repr(C)]
#[derive(Default)]
pub(crate) struct DataWait {
    pub(super) seq: AtomicU32,
    pub(super) sleeping: AtomicU32,
}

/// `DataWait::sleeping`: somebody sleeps on the futex word.
pub(crate) const FUTEX_SLEEPER: u32 = 1;
/// `DataWait::sleeping`: somebody waits on the doorbell descriptor.
pub(crate) const DOORBELL_ARMED: u32 = 2;

/// A sleeping producer: a futex sequence word and how many free bytes it
/// waits for (0: nobody waits).
#[repr(C)]
#[derive(Default)]
pub(crate) struct SpaceWait {
    pub(super) seq: AtomicU32,
    pub(super) wanted: AtomicU64,
}

/// The index and wake-up words of a ring: everything the put/get protocol
/// synchronises on. All-zero bytes are a valid, empty, open ring.
#[repr(C)]
#[derive(Default)]
pub(crate) struct Indices {
    pub(super) tail: Padded<AtomicU64>,
    pub(super) head: Padded<AtomicU64>,
    pub(super) data: Padded<DataWait>,
    pub(super) space: Padded<SpaceWait>,
    pub(super) state: Padded<AtomicU32>,
}

impl Indices {
    /// The published tail.
    pub(crate) fn tail(&self) -> Pos {
        Pos(self.tail.0.load(SeqCst))
    }

    /// The published head.
    pub(crate) fn head(&self) -> Pos {
        Pos(self.head.0.load(SeqCst))
    }

    /// Producer (holding the producer lock): makes everything up to `tail`
    /// visible, then wakes the sleeping consumer, if any. Returns whether a
    /// doorbell waiter was armed (the caller rings the doorbell).
    pub(crate) fn publish(&self, tail: Pos) -> bool {
        self.tail.0.store(tail.0, Release);
        // Dekker with `sleep_for_data` (store; fence; load on both sides):
        // either the sleeper sees the new tail, or this load sees its flag.
        // The plain load keeps the common case (nobody sleeps) free of
        // read-modify-writes.
        fence(SeqCst);
        let data = &self.data.0;
        if data.sleeping.load(Relaxed) != 0 {
            let waiters = data.sleeping.swap(0, SeqCst);
            if waiters & FUTEX_SLEEPER != 0 {
                data.seq.fetch_add(1, SeqCst);
                futex::wake_all(&data.seq);
            }
            return waiters & DOORBELL_ARMED != 0;
        }
        false
    }

    /// Consumer (holding the consumer lock, or a poller): sleeps until the
    /// tail moves past `head`, the ring closes, `give_up()` (checked after
    /// the sleep is announced: whoever makes it true bumps the word with
    /// [`wake_consumers`](Self::wake_consumers)), or `deadline`.
    pub(crate) fn sleep_for_data(
        &self,
        head: Pos,
        deadline: Option<Instant>,
        give_up: impl Fn() -> bool,
    ) -> WaitOutcome {
        let data = &self.data.0;
        let seq = data.seq.load(SeqCst);
        data.sleeping.fetch_or(FUTEX_SLEEPER, SeqCst);
        fence(SeqCst);
        if self.tail() != head || self.state.0.load(SeqCst) == CLOSED || give_up() {
            return WaitOutcome::Mismatch;
        }
        futex::wait(&data.seq, seq, deadline)
    }

    /// Consumer (holding the consumer lock): makes the bytes before `head`
    /// free again, then wakes the sleeping producer if it now has the room it
    /// asked for. `capacity` is the ring size in bytes.
    pub(crate) fn release(&self, head: Pos, capacity: u32) {
        self.head.0.store(head.0, Release);
        // Dekker with `sleep_for_space`, as in `publish`.
        fence(SeqCst);
        let space = &self.space.0;
        let wanted = space.wanted.load(Relaxed);
        if wanted != 0 {
            let free = u64::from(capacity.saturating_sub(head.used_bytes(self.tail())));
            if free >= wanted
                && space
                    .wanted
                    .compare_exchange(wanted, 0, SeqCst, SeqCst)
                    .is_ok()
            {
                space.seq.fetch_add(1, SeqCst);
                futex::wake_all(&space.seq);
            }
        }
    }

    /// Producer (holding the producer lock): sleeps until a consumer frees at
    /// least `wanted` bytes (at least 1: any get frees an item slot), the ring
    /// closes, or `deadline`. `has_room` re-checks with the current head.
    pub(crate) fn sleep_for_space(
        &self,
        wanted: u64,
        has_room: impl Fn(Pos) -> bool,
        deadline: Option<Instant>,
    ) -> WaitOutcome {
        let space = &self.space.0;
        let seq = space.seq.load(SeqCst);
        space.wanted.store(wanted.max(1), SeqCst);
        fence(SeqCst);
        if has_room(self.head()) || self.state.0.load(SeqCst) != OPEN {
            space.wanted.store(0, SeqCst);
            return WaitOutcome::Mismatch;
        }
        let outcome = futex::wait(&space.seq, seq, deadline);
        // Only the producer-lock holder sleeps here, so the word is ours.
        space.wanted.store(0, SeqCst);
        outcome
    }

    /// Whether the ring is open for puts.
    pub(crate) fn is_open(&self) -> bool {
        self.state.0.load(SeqCst) == OPEN
    }

    /// Whether the ring is closed for good (gets drain, then fail).
    pub(crate) fn is_closed(&self) -> bool {
        self.state.0.load(SeqCst) == CLOSED
    }

    /// First step of closing: puts start failing and a producer waiting for
    /// space wakes up. Returns whether this call began the close.
    pub(crate) fn begin_close(&self) -> bool {
        let began = self
            .state
            .0
            .compare_exchange(OPEN, CLOSING, SeqCst, SeqCst)
            .is_ok();
        self.space.0.seq.fetch_add(1, SeqCst);
        futex::wake_all(&self.space.0.seq);
        began
    }

    /// Last step of closing, by a producer-lock holder (so no put is in
    /// flight): gets drain what is left, then fail; sleeping consumers wake.
    pub(crate) fn finish_close(&self) {
        if self.state.0.load(SeqCst) != OPEN {
            self.state.0.store(CLOSED, SeqCst);
            self.wake_consumers();
        }
    }

    /// Wakes every consumer and poller (to re-check their condition).
    pub(crate) fn wake_consumers(&self) {
        self.data.0.seq.fetch_add(1, SeqCst);
        futex::wake_all(&self.data.0.seq);
    }

    /// Wakes the producer sleeping for space (to re-check its condition).
    pub(crate) fn wake_producers(&self) {
        self.space.0.seq.fetch_add(1, SeqCst);
        futex::wake_all(&self.space.0.seq);
    }

    /// Whether a consumer (or poller) announced that it sleeps for data.
    #[cfg(test)]
    pub(crate) fn consumer_sleeping(&self) -> bool {
        self.data.0.sleeping.load(SeqCst) != 0
    }

    /// Announces a doorbell waiter: the next publish rings the doorbell.
    /// The caller checks for data after this (the Dekker pair of `publish`).
    pub(crate) fn arm_doorbell(&self) {
        self.data.0.sleeping.fetch_or(DOORBELL_ARMED, SeqCst);
        fence(SeqCst);
    }
}

// The position arithmetic's property tests are in `ring/proptests.rs`.

#[cfg(all(test, loom))]
mod loom_models {
    //! Model checks of the index and wake-up protocol (`Indices`), with
    //! loom's model of the futex: a lost wake-up shows up as a deadlock.

    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    /// Ring capacity in the model, in "bytes" (each item takes one).
    const CAPACITY: u32 = 1;

    /// Explores every interleaving with up to 5 preemptions (the complete
    /// search does not finish in reasonable time; lost wake-ups need 1 or 2).
    fn model(body: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(5);
        builder.check(body);
    }

    fn put(indices: &Indices) {
        let tail = indices.tail();
        loop {
            let has_room = |head: Pos| CAPACITY - head.used_bytes(tail) >= 1;
            if has_room(indices.head()) {
                indices.publish(tail.advance(1, 1));
                return;
            }
            indices.sleep_for_space(1, has_room, None);
        }
    }

    /// Takes one item; `false` when the ring is closed and empty.
    fn get(indices: &Indices) -> bool {
        loop {
            let head = indices.head();
            if indices.tail() != head {
                indices.release(head.advance(1, 1), CAPACITY);
                return true;
            }
            if indices.is_closed() {
                return indices.tail() != head && get(indices);
            }
            indices.sleep_for_data(head, None, || false);
        }
    }

    #[test]
    fn loom_ring_no_lost_wakeup_when_full_and_empty() {
        model(|| {
            let indices = Arc::new(Indices::default());
            let producer = {
                let indices = Arc::clone(&indices);
                thread::spawn(move || {
                    for _ in 0..3 {
                        put(&indices);
                    }
                })
            };
            for _ in 0..3 {
                assert!(get(&indices));
            }
            producer.join().unwrap();
            assert_eq!(indices.head(), indices.tail());
        });
    }

    #[test]
    fn loom_ring_close_wakes_consumer_after_draining() {
        model(|| {
            let indices = Arc::new(Indices::default());
            let producer = {
                let indices = Arc::clone(&indices);
                thread::spawn(move || {
                    put(&indices);
                    indices.begin_close();
                    indices.finish_close();
                })
            };
            assert!(get(&indices), "the item put before close is delivered");
            assert!(
                !get(&indices),
                "then the consumer learns the ring is closed"
            );
            producer.join().unwrap();
        });
    }

    #[test]
    fn loom_ring_close_wakes_producer_waiting_for_room() {
        model(|| {
            let indices = Arc::new(Indices::default());
            indices.publish(indices.tail().advance(1, 1)); // full
            let producer = {
                let indices = Arc::clone(&indices);
                thread::spawn(move || {
                    let tail = indices.tail();
                    let has_room = |head: Pos| CAPACITY - head.used_bytes(tail) >= 1;
                    while !has_room(indices.head()) && indices.is_open() {
                        indices.sleep_for_space(1, has_room, None);
                    }
                })
            };
            indices.begin_close();
            producer.join().unwrap();
        });
    }

    /// A doorbell waiter (`wait`, an epoll user) against a publisher: the
    /// arm bit and the tail store are a Dekker pair, so either the waiter
    /// sees the item or the publish rings. The doorbell (an eventfd) is
    /// modelled as a counter the waiter sleeps on with the futex model.
    #[test]
    fn loom_ring_doorbell_no_lost_ring() {
        model(|| {
            let indices = Arc::new(Indices::default());
            let doorbell = Arc::new(AtomicU32::new(0));
            let producer = {
                let (indices, doorbell) = (Arc::clone(&indices), Arc::clone(&doorbell));
                thread::spawn(move || {
                    let tail = indices.tail();
                    if indices.publish(tail.advance(1, 1)) {
                        doorbell.fetch_add(1, SeqCst);
                        futex::wake_all(&doorbell);
                    }
                })
            };
            let head = indices.head();
            loop {
                let rung = doorbell.load(SeqCst);
                indices.arm_doorbell();
                if indices.tail() != head {
                    break;
                }
                futex::wait(&doorbell, rung, None);
            }
            producer.join().unwrap();
        });
    }
}
