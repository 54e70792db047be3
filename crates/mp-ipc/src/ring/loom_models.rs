//! Loom models of the parts of the ring protocol beyond the indices (whose
//! models are in `indices.rs`): the out-of-band heap, and `close` against
//! a blocked put and get with the side locks held.
//!
//! A [`Ring`] cannot be built under loom (its header is zeroed memory, loom's
//! atomics are not), so each model replays the steps of the real functions,
//! in their order and with their memory orderings, on the real [`Indices`]
//! and the loom model of [`RobustMutex`]; each step names the function it
//! mirrors. Changing those functions means changing the model.

use super::indices::{Indices, Pos};
use crate::robust::RobustMutex;
use loom::cell::UnsafeCell;
use loom::sync::Arc;
use loom::sync::atomic::AtomicU64;
use loom::thread;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};

fn model(body: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(body);
}

/// Waits (the `Ring::wait_for_room` loop, without the spinning) until
/// `capacity` items leave room for one more after `tail`.
fn wait_for_room(indices: &Indices, tail: Pos, capacity: u32) -> bool {
    let has_room = |head: Pos| head.used_items(tail) < capacity;
    loop {
        if has_room(indices.head()) {
            return true;
        }
        if !indices.is_open() {
            return false;
        }
        indices.sleep_for_space(1, has_room, None);
    }
}

/// The out-of-band heap: a ring of frames naming regions, and the regions.
struct Heap {
    indices: Indices,
    /// The frames: a frame's payload names its region (the ring bytes).
    frames: [UnsafeCell<usize>; 2],
    /// The regions, as read and written with `pread`/`pwrite`/punch.
    regions: [UnsafeCell<u64>; 3],
    /// `ProducerSide::live_regions` and `heap_next`.
    live_regions: AtomicU64,
    heap_next: AtomicU64,
}

/// Ring capacity in frames in the heap model.
const HEAP_RING: u32 = 2;

impl Heap {
    fn new() -> Heap {
        Heap {
            indices: Indices::default(),
            frames: [UnsafeCell::new(0), UnsafeCell::new(0)],
            regions: [UnsafeCell::new(0), UnsafeCell::new(0), UnsafeCell::new(0)],
            live_regions: AtomicU64::new(0),
            heap_next: AtomicU64::new(0),
        }
    }

    /// `Ring::push_out_of_band` (one producer: the producer lock is implied).
    fn put(&self, value: u64) {
        let tail = self.indices.tail();
        assert!(wait_for_room(&self.indices, tail, HEAP_RING));
        // The heap restarts when no region is live or the ring is empty.
        if self.live_regions.load(SeqCst) == 0 || self.indices.head() == tail {
            self.heap_next.store(0, Relaxed);
        }
        let region = self.heap_next.load(Relaxed) as usize;
        assert!(
            region < self.regions.len(),
            "the heap grew past its regions"
        );
        self.heap_next.store(region as u64 + 1, Relaxed);
        // pwrite: loom reports it if a consumer may still be reading it.
        self.regions[region].with_mut(|r| {
            // SAFETY: loom checks this access against every other one.
            unsafe { *r = value }
        });
        self.live_regions.fetch_add(1, SeqCst);
        let frame = &self.frames[(tail.items() % HEAP_RING) as usize];
        // SAFETY: free ring space, the producer's until published.
        frame.with_mut(|f| unsafe { *f = region });
        // `Ring::publish_frame`.
        self.indices.publish(tail.advance(1, 1));
    }

    /// `Ring::pop` then `take_frame` and `consume` (one consumer).
    fn get(&self) -> u64 {
        let head = self.indices.head();
        while self.indices.tail() == head {
            self.indices.sleep_for_data(head, None, || false);
        }
        let frame = &self.frames[(head.items() % HEAP_RING) as usize];
        // SAFETY: a published frame, the consumer's until released.
        let region = frame.with(|f| unsafe { *f });
        // pread, then punch (before the head moves past the frame).
        // SAFETY: loom checks these accesses against the producer's.
        let value = self.regions[region].with(|r| unsafe { *r });
        self.regions[region].with_mut(|r| unsafe { *r = 0 });
        self.live_regions.fetch_sub(1, SeqCst);
        self.indices.release(head.advance(1, 1), HEAP_RING);
        value
    }
}

/// A producer putting out-of-band items while the consumer reads and
/// frees the earlier ones: the heap restarts only over regions nobody
/// reads any more (loom reports a write racing a read), every item reads
/// back intact, and three regions suffice for two frames in flight.
#[test]
fn loom_ring_heap_reuses_regions_only_after_they_are_read() {
    model(|| {
        let heap = Arc::new(Heap::new());
        let producer = {
            let heap = Arc::clone(&heap);
            thread::spawn(move || {
                for value in 1..=3 {
                    heap.put(value);
                }
            })
        };
        for expected in 1..=3 {
            assert_eq!(heap.get(), expected);
        }
        producer.join().unwrap();
        assert_eq!(heap.live_regions.load(SeqCst), 0);
    });
}

/// A ring of one slot with its side locks, for the close model.
struct Sides {
    indices: Indices,
    producer: RobustMutex,
    consumer: RobustMutex,
}

fn robust_mutex() -> RobustMutex {
    let mut slot = std::mem::MaybeUninit::<RobustMutex>::uninit();
    // SAFETY: a fresh local slot, valid for writes and used by nobody.
    unsafe { RobustMutex::init_at(slot.as_mut_ptr(), false) }.unwrap();
    // SAFETY: `init_at` initialised it.
    unsafe { slot.assume_init() }
}

#[derive(Debug, PartialEq)]
struct Closed;

impl Sides {
    /// `Ring::lock_producer`: a close begun by somebody else is finished by
    /// whoever holds the producer lock next.
    fn lock_producer(&self) {
        self.producer.lock(None).unwrap();
        if !self.indices.is_open() {
            self.indices.finish_close();
        }
    }

    /// `Ring::push` of an item of one slot.
    fn put(&self) -> Result<(), Closed> {
        self.lock_producer();
        let tail = self.indices.tail();
        let result = if wait_for_room(&self.indices, tail, 1) && self.indices.is_open() {
            self.indices.publish(tail.advance(1, 1));
            Ok(())
        } else {
            Err(Closed)
        };
        self.producer.unlock().unwrap();
        result
    }

    /// `Ring::pop`.
    fn get(&self) -> Result<(), Closed> {
        self.consumer.lock(None).unwrap();
        let result = loop {
            let head = self.indices.head();
            if self.indices.tail() != head {
                self.indices.release(head.advance(1, 1), 1);
                break Ok(());
            }
            if self.indices.is_closed() {
                if self.indices.tail() != head {
                    continue;
                }
                break Err(Closed);
            }
            self.indices.sleep_for_data(head, None, || false);
        };
        self.consumer.unlock().unwrap();
        result
    }

    /// `Ring::close`.
    fn close(&self) {
        if self.indices.is_closed() {
            return;
        }
        self.indices.begin_close();
        self.lock_producer();
        self.producer.unlock().unwrap();
    }
}

/// `close` against a put blocked on a full ring (holding the producer
/// lock) and a get that empties it and then blocks: no wake-up is lost
/// (loom reports a deadlock otherwise), the put either lands before the
/// close or fails with `Closed`, and the gets deliver exactly what was
/// put, then `Closed`.
#[test]
fn loom_ring_close_races_a_blocked_put_and_get() {
    model(|| {
        let sides = Arc::new(Sides {
            indices: Indices::default(),
            producer: robust_mutex(),
            consumer: robust_mutex(),
        });
        let tail = sides.indices.tail();
        sides.indices.publish(tail.advance(1, 1)); // full
        let producer = {
            let sides = Arc::clone(&sides);
            thread::spawn(move || sides.put())
        };
        let closer = {
            let sides = Arc::clone(&sides);
            thread::spawn(move || sides.close())
        };
        let mut delivered = 0;
        while sides.get().is_ok() {
            delivered += 1;
        }
        let put = producer.join().unwrap();
        closer.join().unwrap();
        assert_eq!(delivered, 1 + usize::from(put.is_ok()), "{put:?}");
        assert!(sides.indices.is_closed());
    });
}
