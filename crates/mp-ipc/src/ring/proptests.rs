//! Property tests of the ring's arithmetic: positions across the 2^32 wrap
//! of both halves, capacity rounding, frame sizes, and a heap-backed
//! [`Ring`] started at any position (near the wrap too) driven by random
//! puts and gets against a model of what must fit.

use super::*;
use frames::OUT_OF_BAND_DESCRIPTOR;
use proptest::prelude::*;
use std::collections::VecDeque;
use std::sync::atomic::Ordering::SeqCst;

/// A position whose byte half is 8-aligned (frames are), biased to just
/// below the 2^32 wrap of either half.
fn start_position() -> impl Strategy<Value = Pos> {
    let near_wrap = (1u32..=2048).prop_map(|k| k.wrapping_mul(8).wrapping_neg());
    let bytes = prop_oneof![near_wrap, any::<u32>().prop_map(|b| b & !7)];
    let items = prop_oneof![(0u32..16).prop_map(|j| u32::MAX - j), any::<u32>()];
    (bytes, items).prop_map(|(bytes, items)| Pos(u64::from(items) << 32 | u64::from(bytes)))
}

proptest! {
    /// The distance from a head to the tail advanced from it is the amount
    /// advanced, whatever wraps; advancing in two steps lands on the same
    /// position; bytes never carry into the item count, nor back.
    #[test]
    fn positions_measure_distances_across_the_wrap(
        head in prop_oneof![any::<u64>().prop_map(Pos), start_position()],
        bytes in 0u32..=MAX_CAPACITY as u32,
        items in any::<u32>(),
        split in 0.0f64..=1.0,
    ) {
        let tail = head.advance(bytes, items);
        prop_assert_eq!(head.used_bytes(tail), bytes);
        prop_assert_eq!(head.used_items(tail), items);
        prop_assert_eq!(tail.bytes(), head.bytes().wrapping_add(bytes));
        prop_assert_eq!(tail.items(), head.items().wrapping_add(items));
        let (b1, i1) = ((f64::from(bytes) * split) as u32, (f64::from(items) * split) as u32);
        prop_assert_eq!(head.advance(b1, i1).advance(bytes - b1, items - i1), tail);
    }

    /// Capacities are powers of two in range, at least what was asked for
    /// (within range) and less than twice it.
    #[test]
    fn capacities_round_up_to_a_power_of_two_in_range(requested in any::<usize>()) {
        let capacity = rounded_capacity(requested);
        prop_assert!(capacity.is_power_of_two());
        prop_assert!((MIN_CAPACITY..=MAX_CAPACITY).contains(&capacity));
        prop_assert!(capacity >= requested.min(MAX_CAPACITY));
        prop_assert!(capacity / 2 < requested.max(MIN_CAPACITY));
        // The ring's offsets follow positions across the 2^32 wrap only
        // because the capacity divides 2^32.
        prop_assert_eq!((1u64 << 32) % capacity as u64, 0);
    }

    /// A frame is the header plus the payload padded to 8 bytes.
    #[test]
    fn frames_are_8_aligned_and_hold_their_payload(len in 0u64..=u64::from(u32::MAX)) {
        let frame = frame_len(len);
        prop_assert_eq!(frame % 8, 0);
        prop_assert!(frame >= len + u64::from(FRAME_HEADER));
        prop_assert!(frame < len + u64::from(FRAME_HEADER) + 8);
    }
}

/// One step of the model test.
#[derive(Clone, Debug)]
enum Step {
    Put(usize),
    Get,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    // Sizes around the edges that matter: empty, one padding step, a
    // quarter of the ring (the out-of-band threshold), beyond it.
    let len = prop_oneof![
        4 => 0usize..=24,
        2 => 0usize..=700,
        1 => (MIN_CAPACITY / 4 - 24)..=(MIN_CAPACITY / 4 + 8),
        1 => 1500usize..=6000,
    ];
    // More puts than gets: the ring fills, and its last bytes are fought over.
    let step = prop_oneof![3 => len.prop_map(Step::Put), 1 => Just(Step::Get)];
    prop::collection::vec(step, 1..300)
}

/// What the ring must hold: the items, and the ring bytes their frames take.
#[derive(Default)]
struct Model {
    items: VecDeque<Vec<u8>>,
    bytes: u64,
}

/// Bytes an item of `len` takes in the ring: its frame, or the frame
/// naming its out-of-band region.
fn ring_bytes(len: usize, capacity: usize) -> u64 {
    let frame = frame_len(len as u64);
    if frame > (capacity / 4) as u64 {
        frame_len(u64::from(OUT_OF_BAND_DESCRIPTOR))
    } else {
        frame
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A ring started anywhere (near the wrap of both halves too) takes a
    /// put exactly when the model says the frame and an item slot fit,
    /// hands items back in order and intact, and its length and used bytes
    /// follow the model.
    #[test]
    fn a_ring_started_anywhere_takes_exactly_what_fits(
        start in start_position(),
        capacity in prop_oneof![Just(MIN_CAPACITY), Just(2 * MIN_CAPACITY)],
        max_items in prop_oneof![Just(None), (1u32..=8).prop_map(Some)],
        steps in steps(),
    ) {
        let ring = Ring::create_on_heap(RingConfig {
            capacity,
            max_items,
            type_tag: 7,
            doorbell: false,
        })
        .unwrap();
        let indices = ring.indices();
        indices.tail.0.store(start.0, SeqCst);
        indices.head.0.store(start.0, SeqCst);
        ring.header().producer.0.cached_head.store(start.0, SeqCst);
        ring.header().consumer.0.cached_tail.store(start.0, SeqCst);
        let mut model = Model::default();
        for (n, step) in steps.into_iter().enumerate() {
            match step {
                Step::Put(len) => {
                    let item: Vec<u8> = (0..len).map(|i| (i + n) as u8).collect();
                    let needed = ring_bytes(len, capacity);
                    let fits = max_items.is_none_or(|max| model.items.len() < max as usize)
                        && capacity as u64 - model.bytes >= needed;
                    let put = ring.push(&RawBytes(&item), Wait::Never, None);
                    if fits {
                        prop_assert!(put.is_ok(), "step {}: put of {} bytes: {:?}", n, len, put);
                        model.bytes += needed;
                        model.items.push_back(item);
                    } else {
                        prop_assert!(matches!(put, Err(RingError::Full)), "step {}: {:?}", n, put);
                    }
                }
                Step::Get => {
                    let got = ring.pop(Wait::Never, None, |p| p.to_vec().unwrap());
                    match model.items.pop_front() {
                        Some(item) => {
                            model.bytes -= ring_bytes(item.len(), capacity);
                            prop_assert_eq!(got.unwrap(), item, "step {}", n);
                        }
                        None => prop_assert!(matches!(got, Err(RingError::Empty))),
                    }
                }
            }
            let (head, tail) = (indices.head(), indices.tail());
            prop_assert_eq!(ring.len(), model.items.len());
            prop_assert_eq!(u64::from(head.used_bytes(tail)), model.bytes);
            prop_assert_eq!(head.items().wrapping_sub(start.items()) as usize + model.items.len(),
                tail.items().wrapping_sub(start.items()) as usize);
        }
    }
}

/// The edge the model test rarely reaches: the ring has exactly one
/// frame header of room, and an empty item (a frame of 8 bytes) fits it.
/// (It used to spin forever holding the producer lock, even with
/// `Wait::Never`: the inline path wanted more than a header of room, the
/// wait for room saw enough.)
#[test]
fn an_empty_item_fills_the_last_frame_header_of_room() {
    let ring = std::sync::Arc::new(
        Ring::create_on_heap(RingConfig {
            capacity: MIN_CAPACITY,
            max_items: None,
            type_tag: 7,
            doorbell: false,
        })
        .unwrap(),
    );
    let frames = (MIN_CAPACITY - 8) / 16;
    for _ in 0..frames {
        ring.push(&RawBytes(&[1; 8]), Wait::Never, None).unwrap();
    }
    ring.push(&RawBytes(&[]), Wait::Never, None).unwrap();
    let room = MIN_CAPACITY as u32 - ring.indices().head().used_bytes(ring.indices().tail());
    assert_eq!(room, FRAME_HEADER);
    let (done, outcome) = std::sync::mpsc::channel();
    let putter = std::sync::Arc::clone(&ring);
    std::thread::spawn(move || {
        let _ = done.send(
            putter
                .push(&RawBytes(&[]), Wait::Never, None)
                .map_err(|e| e.to_string()),
        );
    });
    let put = outcome
        .recv_timeout(Duration::from_secs(10))
        .expect("a put with Wait::Never returns");
    assert_eq!(put, Ok(()));
    assert_eq!(ring.len(), frames + 2);
    assert!(matches!(
        ring.push(&RawBytes(&[]), Wait::Never, None),
        Err(RingError::Full)
    ));
}
