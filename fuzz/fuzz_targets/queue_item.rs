//! Arbitrary bytes stored as a queue item and decoded as a typed message by the queue's own
//! decoder (`Queue::get`): a value or a typed `QueueError::Decode`, never a panic, and the
//! queue stays usable (the next item arrives intact).
//!
//! Only the public API is used: `Raw` serializes as exactly its bytes (a tuple of `u8`s is
//! written by postcard without a length), and deserializes as a `Message`, so the queue's
//! reader decodes bytes the writer did not encode from a `Message`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multiproc::{Queue, QueueError};
use serde::ser::SerializeTuple;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[path = "message.rs"]
mod message;
use message::Message;

#[derive(Debug)]
enum Item {
    /// Bytes to put, written as they are.
    Raw(Vec<u8>),
    /// What `get` decoded.
    Decoded(Message),
}

impl Serialize for Item {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Item::Raw(bytes) => {
                let mut tuple = serializer.serialize_tuple(bytes.len())?;
                for byte in bytes {
                    tuple.serialize_element(byte)?;
                }
                tuple.end()
            }
            Item::Decoded(message) => message.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Message::deserialize(deserializer).map(Item::Decoded)
    }
}

fuzz_target!(|data: &[u8]| {
    let queue: Queue<Item> = Queue::unbounded().expect("a queue");
    queue.put(Item::Raw(data.to_vec())).expect("put raw bytes");
    queue
        .put(Item::Decoded(Message::Text("after".into())))
        .expect("put");
    match queue.try_get() {
        Ok(Item::Decoded(_)) => {}
        Ok(Item::Raw(_)) => unreachable!("deserialize only makes Decoded"),
        Err(QueueError::Decode(_)) => {}
        Err(other) => panic!("garbage must be a decode error, got {other:?}"),
    }
    match queue.try_get() {
        Ok(Item::Decoded(Message::Text(text))) => assert_eq!(text, "after"),
        other => panic!("the item after the garbage was lost or damaged: {other:?}"),
    }
    assert!(queue.is_empty());
});
