//! A process SIGKILLed in the middle of a put or a get never corrupts the
//! queue nor blocks the other users.
//!
//! The window is made deterministic with an item type whose `Serialize` (run
//! by `put` while it holds the producer lock, after part of the item has been
//! written into the ring) or `Deserialize` (run by `get` while it holds the
//! consumer lock, before it advances the head) tells the parent "I am inside"
//! and then parks until the parent kills the process.

use std::sync::OnceLock;
use std::time::Duration;

use mp_core::Process;
use mp_ipc::connection::{Connection, Pipe};
use mp_ipc::queue::{Bytes, Queue, QueueError};
use serde::de::{self, SeqAccess, Visitor};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

const PATIENCE: Duration = Duration::from_secs(20);

/// Set only in a child that is to be killed inside a put or get.
static INSIDE: OnceLock<Connection> = OnceLock::new();

/// Tells the parent we are inside, then waits to be killed.
fn park_if_armed() {
    if let Some(report) = INSIDE.get() {
        report.send(()).unwrap();
        loop {
            std::thread::park();
        }
    }
}

/// An item whose encoding and decoding stop half-way in an armed process.
#[derive(Debug, Clone, PartialEq)]
struct Item {
    first: u64,
    payload: Bytes,
    second: u64,
}

impl Item {
    fn new(n: u64, payload_len: usize) -> Item {
        Item {
            first: n,
            payload: Bytes(vec![n as u8; payload_len]),
            second: !n,
        }
    }
}

impl Serialize for Item {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut tuple = serializer.serialize_tuple(3)?;
        tuple.serialize_element(&self.first)?;
        tuple.serialize_element(&self.payload)?;
        park_if_armed();
        tuple.serialize_element(&self.second)?;
        tuple.end()
    }
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ItemVisitor;
        impl<'de> Visitor<'de> for ItemVisitor {
            type Value = Item;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an Item")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Item, A::Error> {
                let first = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(0, &self))?;
                let payload = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(1, &self))?;
                park_if_armed();
                let second = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::invalid_length(2, &self))?;
                Ok(Item {
                    first,
                    payload,
                    second,
                })
            }
        }
        deserializer.deserialize_tuple(3, ItemVisitor)
    }
}

/// Starts a child that arms the hook and puts `item` (it parks inside the put).
fn child_killed_inside_put(queue: &Queue<Item>, item: Item) -> mp_core::Child<()> {
    let (inside, report) = Pipe::simplex().unwrap();
    let child = Process::new(|(queue, item, report): (Queue<Item>, Item, Connection)| {
        INSIDE.set(report).unwrap();
        queue.put(item).unwrap();
        unreachable!("the put parks until the process is killed");
    })
    .args((queue.clone(), item, report))
    .start()
    .unwrap();
    inside.recv_timeout::<()>(PATIENCE).unwrap();
    child
}

/// Starts a child that arms the hook and gets (it parks inside the get).
fn child_killed_inside_get(queue: &Queue<Item>) -> mp_core::Child<()> {
    let (inside, report) = Pipe::simplex().unwrap();
    let child = Process::new(|(queue, report): (Queue<Item>, Connection)| {
        INSIDE.set(report).unwrap();
        let _ = queue.get();
        unreachable!("the get parks until the process is killed");
    })
    .args((queue.clone(), report))
    .start()
    .unwrap();
    inside.recv_timeout::<()>(PATIENCE).unwrap();
    child
}

fn kill_and_reap<R: Serialize + for<'de> Deserialize<'de>>(child: mp_core::Child<R>) {
    child.kill().unwrap();
    assert!(
        child.join_timeout(PATIENCE).is_err(),
        "the child was killed"
    );
}

fn put_killed_midway_then_others_carry_on(payload_len: usize) {
    let queue: Queue<Item> = Queue::builder().capacity_bytes(64 << 10).build().unwrap();
    queue.put(Item::new(1, payload_len)).unwrap();
    let stuck = child_killed_inside_put(&queue, Item::new(2, payload_len));
    // Another producer process queues up behind the stuck one's lock.
    let next = Process::new(|(queue, len): (Queue<Item>, usize)| {
        queue.put_timeout(Item::new(3, len), PATIENCE).unwrap()
    })
    .args((queue.clone(), payload_len))
    .start()
    .unwrap();
    kill_and_reap(stuck);
    next.join_timeout(PATIENCE).unwrap();
    queue.put(Item::new(4, payload_len)).unwrap();
    let got: Vec<u64> = (0..3)
        .map(|_| queue.get_timeout(PATIENCE).unwrap().first)
        .collect();
    assert_eq!(got, [1, 3, 4], "the killed put left nothing visible");
    assert!(matches!(queue.try_get(), Err(QueueError::Empty)));
    assert_eq!(queue.len(), 0);
}

#[test]
fn a_producer_killed_inside_an_inline_put() {
    put_killed_midway_then_others_carry_on(100);
}

#[test]
fn a_producer_killed_inside_an_out_of_band_put() {
    put_killed_midway_then_others_carry_on(1 << 20);
}

fn get_killed_midway_keeps_the_item(payload_len: usize) {
    let queue: Queue<Item> = Queue::builder().capacity_bytes(64 << 10).build().unwrap();
    let items: Vec<Item> = (1..=3).map(|n| Item::new(n, payload_len)).collect();
    for item in &items {
        queue.put(item).unwrap();
    }
    let stuck = child_killed_inside_get(&queue);
    // Another consumer (a thread here) queues up behind the stuck one's lock.
    let next = {
        let queue = queue.clone();
        std::thread::spawn(move || queue.get_timeout(PATIENCE))
    };
    kill_and_reap(stuck);
    assert_eq!(
        next.join().unwrap().unwrap(),
        items[0],
        "the item of the killed get is delivered whole"
    );
    assert_eq!(queue.get_timeout(PATIENCE).unwrap(), items[1]);
    assert_eq!(queue.get_timeout(PATIENCE).unwrap(), items[2]);
    assert!(queue.is_empty());
    queue.put(&items[0]).unwrap();
    assert_eq!(queue.get_timeout(PATIENCE).unwrap(), items[0]);
}

#[test]
fn a_consumer_killed_inside_an_inline_get() {
    get_killed_midway_keeps_the_item(100);
}

#[test]
fn a_consumer_killed_inside_an_out_of_band_get() {
    get_killed_midway_keeps_the_item(1 << 20);
}

#[test]
fn a_producer_killed_while_waiting_for_room() {
    let queue: Queue<u64> = Queue::bounded(1).unwrap();
    queue.put(1).unwrap();
    let (started, report) = Pipe::simplex().unwrap();
    let child = Process::new(|(queue, report): (Queue<u64>, Connection)| {
        report.send(()).unwrap();
        let _ = queue.put(2); // waits for room, holding the producer lock
    })
    .args((queue.clone(), report))
    .start()
    .unwrap();
    started.recv_timeout::<()>(PATIENCE).unwrap();
    kill_and_reap(child);
    // Whether or not the child's put had begun, the queue works.
    assert_eq!(queue.get_timeout(PATIENCE).unwrap(), 1);
    queue.put_timeout(3, PATIENCE).unwrap();
    assert_eq!(queue.get_timeout(PATIENCE).unwrap(), 3);
}

#[test]
fn a_consumer_killed_while_waiting_for_an_item() {
    let queue: Queue<u64> = Queue::unbounded().unwrap();
    let (started, report) = Pipe::simplex().unwrap();
    let child = Process::new(|(queue, report): (Queue<u64>, Connection)| {
        report.send(()).unwrap();
        let _ = queue.get(); // waits for an item, holding the consumer lock
    })
    .args((queue.clone(), report))
    .start()
    .unwrap();
    started.recv_timeout::<()>(PATIENCE).unwrap();
    kill_and_reap(child);
    queue.put(7).unwrap();
    assert_eq!(queue.get_timeout(PATIENCE).unwrap(), 7);
}
