//! The ring protocol on heap memory, sized for Miri (`.ci/miri` runs every
//! test named `miri_*`): puts and gets through [`Ring`] across the wrap,
//! out-of-band items and a lost region, the item limit, close, and threads
//! racing. Under Miri the side locks are the atomic mutex of
//! [`robust`](crate::robust) and the futex waits are Miri's, so Miri checks
//! every access to the ring bytes and the header for undefined behaviour and
//! data races. The same tests run natively (with glibc's mutexes), longer.

use super::*;
use std::sync::Arc;
use std::sync::atomic::Ordering::SeqCst;

fn heap_ring(capacity: usize, max_items: Option<u32>) -> Arc<Ring> {
    Arc::new(
        Ring::create_on_heap(RingConfig {
            capacity,
            max_items,
            type_tag: 7,
            doorbell: false,
        })
        .expect("a heap ring"),
    )
}

fn push_bytes(ring: &Ring, bytes: &[u8], wait: Wait) -> Result<(), RingError> {
    ring.push(&RawBytes(bytes), wait, None)
}

fn pop_bytes(ring: &Ring, wait: Wait) -> Result<Vec<u8>, RingError> {
    ring.pop(wait, None, |p| p.to_vec().expect("payload readable"))
}

/// A generous guard against a hang (Miri's clock is virtual: it only
/// advances while every thread sleeps).
fn patient() -> Wait {
    Wait::timeout(Duration::from_secs(60))
}

fn item(len: usize, salt: u32) -> Vec<u8> {
    (0..len).map(|i| (i as u32 * 31 + salt) as u8).collect()
}

#[test]
fn miri_ring_frames_keep_their_boundaries_across_the_wrap() {
    let ring = heap_ring(MIN_CAPACITY, None);
    let mut carried = 0u64;
    for round in 0..if cfg!(miri) { 24u32 } else { 400 } {
        let item = item((round * 137 % 700) as usize, round);
        carried += frame_len(item.len() as u64) + frame_len(0);
        push_bytes(&ring, &item, Wait::Never).unwrap();
        push_bytes(&ring, b"", Wait::Never).unwrap();
        assert_eq!(ring.len(), 2);
        assert_eq!(pop_bytes(&ring, Wait::Never).unwrap(), item);
        assert_eq!(pop_bytes(&ring, Wait::Never).unwrap(), b"");
    }
    assert!(carried > 2 * MIN_CAPACITY as u64, "the ring wrapped twice");
    assert_eq!(u64::from(ring.indices().tail().bytes()), carried);
    assert!(matches!(
        pop_bytes(&ring, Wait::Never),
        Err(RingError::Empty)
    ));
}

#[test]
fn miri_ring_out_of_band_items_round_trip_and_a_lost_region_is_skipped() {
    let ring = heap_ring(MIN_CAPACITY, None);
    let big = item(3 * MIN_CAPACITY, 5);
    push_bytes(&ring, b"before", Wait::Never).unwrap();
    push_bytes(&ring, &big, Wait::Never).unwrap();
    push_bytes(&ring, &big[..2000], Wait::Never).unwrap();
    push_bytes(&ring, b"after", Wait::Never).unwrap();
    assert_eq!(ring.len(), 4);
    assert_eq!(pop_bytes(&ring, Wait::Never).unwrap(), b"before");
    assert_eq!(pop_bytes(&ring, Wait::Never).unwrap(), big);
    assert_eq!(pop_bytes(&ring, Wait::Never).unwrap(), &big[..2000]);
    assert_eq!(pop_bytes(&ring, Wait::Never).unwrap(), b"after");
    assert_eq!(ring.header().producer.0.live_regions.load(SeqCst), 0);

    // A consumer that punched the region and died before advancing the head:
    // the next consumer skips the frame and counts the item as done.
    push_bytes(&ring, &big, Wait::Never).unwrap();
    push_bytes(&ring, b"next", Wait::Never).unwrap();
    let heap_start = (HEADER_LEN + MIN_CAPACITY) as u64;
    ring.file
        .punch(heap_start, 4 * MIN_CAPACITY as u64)
        .unwrap();
    let done = ring.tasks().done.load(SeqCst);
    assert_eq!(pop_bytes(&ring, Wait::Never).unwrap(), b"next");
    assert_eq!(ring.tasks().done.load(SeqCst), done + 1);
    // The heap restarts at its beginning once the ring is empty.
    push_bytes(&ring, &big, Wait::Never).unwrap();
    assert_eq!(pop_bytes(&ring, Wait::Never).unwrap(), big);
    let next = ring.header().producer.0.heap_next.load(Relaxed);
    assert!(
        next <= heap_start + 4 * PAGE,
        "the heap kept growing: {next}"
    );
}

#[test]
fn miri_ring_item_limit_byte_limit_and_close() {
    let ring = heap_ring(MIN_CAPACITY, Some(3));
    for i in 0..3u8 {
        push_bytes(&ring, &[i; 10], Wait::Never).unwrap();
    }
    assert!(ring.is_full());
    assert!(matches!(
        push_bytes(&ring, b"x", Wait::Never),
        Err(RingError::Full)
    ));
    assert_eq!(pop_bytes(&ring, Wait::Never).unwrap(), [0; 10]);
    push_bytes(&ring, b"x", Wait::Never).unwrap();

    let bytes_bound = heap_ring(MIN_CAPACITY, None);
    let mut pushed = 0;
    while push_bytes(&bytes_bound, &[1; 100], Wait::Never).is_ok() {
        pushed += 1;
    }
    assert_eq!(pushed, MIN_CAPACITY / 112);

    ring.close().unwrap();
    assert!(matches!(
        push_bytes(&ring, b"late", Wait::Forever),
        Err(RingError::Closed)
    ));
    for expected in [&[1u8; 10][..], &[2; 10], b"x"] {
        assert_eq!(pop_bytes(&ring, Wait::Forever).unwrap(), expected);
    }
    assert!(matches!(
        pop_bytes(&ring, Wait::Forever),
        Err(RingError::Closed)
    ));
}

/// Two producers against one consumer through a ring of 4 slots: every
/// side sleeps on its futex word and wakes the other; nothing is lost or
/// duplicated, each producer's items arrive in order, and Miri sees no
/// data race on the ring bytes (published by the tail store, freed by the
/// head store).
#[test]
fn miri_ring_threads_lose_and_duplicate_nothing() {
    let per: u32 = if cfg!(miri) { 40 } else { 4000 };
    let ring = heap_ring(MIN_CAPACITY, Some(4));
    let producers: Vec<_> = (0..2u32)
        .map(|p| {
            let ring = Arc::clone(&ring);
            std::thread::spawn(move || {
                for i in 0..per {
                    // Every fifth item out of band: its region is written by
                    // the producer and read, then punched, by the consumer.
                    let len = if i % 5 == 0 { 1500 } else { 8 };
                    let mut item = item(len, i);
                    item[..8].copy_from_slice(&[p.to_le_bytes(), i.to_le_bytes()].concat());
                    push_bytes(&ring, &item, patient()).unwrap();
                }
            })
        })
        .collect();
    let mut seen = Vec::new();
    while seen.len() < 2 * per as usize {
        let item = pop_bytes(&ring, patient()).unwrap();
        let id = |at: usize| u32::from_le_bytes(item[at..at + 4].try_into().unwrap());
        seen.push((id(0), id(4)));
    }
    for p in producers {
        p.join().unwrap();
    }
    for p in 0..2 {
        let mine: Vec<u32> = seen.iter().filter(|s| s.0 == p).map(|s| s.1).collect();
        assert_eq!(mine, (0..per).collect::<Vec<_>>(), "producer {p}");
    }
    assert!(matches!(
        pop_bytes(&ring, Wait::Never),
        Err(RingError::Empty)
    ));
}

/// `close` racing with a put blocked on a full ring and a get blocked on
/// an empty one: both wake and fail with `Closed` (or finished first),
/// and nothing put is lost.
#[test]
fn miri_ring_close_wakes_a_blocked_put_and_a_blocked_get() {
    let full = heap_ring(MIN_CAPACITY, Some(1));
    push_bytes(&full, b"1", Wait::Never).unwrap();
    let empty = heap_ring(MIN_CAPACITY, None);
    let producer = {
        let full = Arc::clone(&full);
        std::thread::spawn(move || push_bytes(&full, b"2", patient()))
    };
    let consumer = {
        let empty = Arc::clone(&empty);
        std::thread::spawn(move || pop_bytes(&empty, patient()))
    };
    full.close().unwrap();
    empty.close().unwrap();
    assert!(matches!(producer.join().unwrap(), Err(RingError::Closed)));
    assert!(matches!(consumer.join().unwrap(), Err(RingError::Closed)));
    assert_eq!(pop_bytes(&full, Wait::Never).unwrap(), b"1");
    assert!(matches!(
        pop_bytes(&full, Wait::Never),
        Err(RingError::Closed)
    ));
}

/// Large items wrap early (`wrap.rs`): skip frames at the end of the first
/// 1 MiB of each lap, published with the item after them and stepped over
/// by the consumer; first in one thread (where the wraps are certain), then
/// with a consumer racing the producer.
#[test]
fn miri_ring_large_items_wrap_early_across_threads() {
    let ring = heap_ring(wrap::MIN_WRAP_CAPACITY as usize, None);
    let len = wrap::MIN_WRAP_FRAME as usize;
    let window_end = wrap::SOFT_WINDOW + frame_len(len as u64) as u32;
    // A lap's first 1 MiB holds ~64 items: 140 make two early wraps.
    for seq in 0..140u32 {
        push_bytes(&ring, &vec![seq as u8; len], Wait::Never).unwrap();
        if seq >= 2 {
            assert_eq!(
                pop_bytes(&ring, Wait::Never).unwrap(),
                vec![(seq - 2) as u8; len]
            );
        }
        assert!(ring.indices().tail().bytes() & (ring.capacity - 1) <= window_end);
    }
    for seq in 138..140u32 {
        assert_eq!(pop_bytes(&ring, Wait::Never).unwrap(), vec![seq as u8; len]);
    }
    let items: u32 = if cfg!(miri) { 140 } else { 2_000 };
    let producer = {
        let ring = Arc::clone(&ring);
        std::thread::spawn(move || {
            for seq in 0..items {
                push_bytes(&ring, &vec![seq as u8; len], patient()).unwrap();
            }
        })
    };
    for seq in 0..items {
        let got = pop_bytes(&ring, patient()).unwrap();
        assert!(
            got.len() == len && got.iter().all(|&b| b == seq as u8),
            "item {seq}"
        );
    }
    producer.join().unwrap();
    assert_eq!(ring.len(), 0);
}
