//! Large arguments and results (which travel through each worker's reused shared regions,
//! see `src/bulk.rs`): every byte arrives, whatever the sizes, however many are in flight,
//! and after a worker died.
//!
//! Every wait is bounded ([`LIMIT`]).

use std::time::Duration;

use mp_ipc::queue::Queue;
use mp_pool::{Pool, PoolError};
use rustix::process::{Pid, Signal};
use serde::{Deserialize, Serialize};

/// The longest any result may take.
const LIMIT: Duration = Duration::from_secs(30);

/// `len` bytes made from `seed`, different at every position.
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed ^ (i >> 11) as u8)
        .collect()
}

/// Returns the bytes reversed (so that a result is not its argument) and the worker's pid.
fn reverse(mut bytes: Vec<u8>) -> (Vec<u8>, u32) {
    bytes.reverse();
    (bytes, std::process::id())
}

fn reversed(mut bytes: Vec<u8>) -> Vec<u8> {
    bytes.reverse();
    bytes
}

#[test]
fn large_arguments_and_results_arrive_whole_whatever_their_sizes() {
    let pool = Pool::new(2).unwrap();
    // Around the threshold, growing (a new region), shrinking (the same one), huge.
    for (seed, len) in [
        (1, 64 * 1024 - 8),
        (2, 64 * 1024),
        (3, 1 << 20),
        (4, 3 << 20),
        (5, 100_000),
        (6, 5 << 20),
        (7, 10),
        (8, 1 << 20),
    ] {
        let sent = pattern(seed, len);
        let (back, _) = pool
            .apply_async(reverse, sent.clone())
            .unwrap()
            .get_timeout(LIMIT)
            .unwrap();
        assert_eq!(back, reversed(sent), "{len} bytes");
    }
    pool.close();
    pool.join().unwrap();
}

#[test]
fn many_large_payloads_in_flight_at_once_all_arrive() {
    let pool = Pool::new(2).unwrap();
    let sent: Vec<Vec<u8>> = (0..8).map(|seed| pattern(seed, 300_000)).collect();
    let pending: Vec<_> = sent
        .iter()
        .map(|bytes| pool.apply_async(reverse, bytes.clone()).unwrap())
        .collect();
    for (bytes, result) in sent.iter().zip(pending) {
        let (back, _) = result.get_timeout(LIMIT).unwrap();
        assert_eq!(back, reversed(bytes.clone()));
    }
    let mapped = pool
        .chunksize(1)
        .map_timeout(reversed, sent.clone(), LIMIT)
        .unwrap();
    let expected: Vec<Vec<u8>> = sent.into_iter().map(reversed).collect();
    assert_eq!(mapped, expected);
    pool.close();
    pool.join().unwrap();
}

#[test]
fn large_payloads_go_on_after_a_worker_died() {
    let pool = Pool::new(1).unwrap();
    let sent = pattern(9, 1 << 20);
    let (_, pid) = pool
        .apply_async(reverse, sent.clone())
        .unwrap()
        .get_timeout(LIMIT)
        .unwrap();
    rustix::process::kill_process(Pid::from_raw(pid as i32).unwrap(), Signal::KILL).unwrap();
    // Whether this reaches the dead worker's link (then it runs on the replacement, which
    // gets a region of its own) or the replacement directly, every byte arrives.
    for seed in 10..13 {
        let sent = pattern(seed, 1 << 20);
        let (back, _) = pool
            .apply_async(reverse, sent.clone())
            .unwrap()
            .get_timeout(LIMIT)
            .unwrap();
        assert_eq!(back, reversed(sent));
    }
    pool.close();
    pool.join().unwrap();
}

/// Fails to serialize (after a large payload, when the pool encodes into a kept buffer).
#[derive(Clone, Deserialize)]
struct Unencodable(#[allow(dead_code)] u32);

impl Serialize for Unencodable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("refused on purpose"))
    }
}

#[test]
fn after_large_arguments_small_ones_and_encode_errors_are_as_before() {
    let pool = Pool::new(1).unwrap();
    let sent = pattern(1, 1 << 20);
    let (back, _) = pool.apply(reverse, sent.clone()).unwrap();
    assert_eq!(back, reversed(sent.clone()));
    // Small arguments after large ones.
    assert_eq!(pool.apply(reversed, vec![1, 2, 3]), Ok(vec![3, 2, 1]));
    pool.apply(reverse, sent.clone()).unwrap();
    // An encode failure after large arguments names the type, as always.
    match pool.apply(|u: Unencodable| u.0, Unencodable(1)) {
        Err(PoolError::EncodeArguments(message)) => {
            assert!(message.contains("Unencodable"), "{message}");
        }
        other => panic!("expected EncodeArguments, got {other:?}"),
    }
    // So is a handle among the arguments: refused before its descriptor is taken.
    pool.apply(reverse, sent.clone()).unwrap();
    let queue: Queue<u32> = Queue::unbounded().unwrap();
    match pool.apply(|q: Queue<u32>| q.len(), queue) {
        Err(PoolError::EncodeArguments(message)) => {
            assert!(message.contains("handle"), "{message}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let (back, _) = pool.apply(reverse, sent.clone()).unwrap();
    assert_eq!(back, reversed(sent));
    pool.close();
    pool.join().unwrap();
}
