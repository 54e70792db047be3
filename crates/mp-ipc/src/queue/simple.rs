//! [`SimpleQueue`]: Python's `multiprocessing.SimpleQueue`.

use std::borrow::Borrow;
use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Queue, QueueError, attach, type_tag};

/// Python's `SimpleQueue`: an unbounded [`Queue`] with just put, get and
/// close.
///
/// ```
/// use mp_ipc::queue::SimpleQueue;
///
/// let queue: SimpleQueue<[u8; 3]> = SimpleQueue::new()?;
/// queue.put([1u8, 2, 3])?;
/// assert_eq!(queue.get()?, [1, 2, 3]);
/// assert!(queue.is_empty());
/// # Ok::<(), mp_ipc::queue::QueueError>(())
/// ```
pub struct SimpleQueue<T> {
    pub(super) queue: Queue<T>,
}

impl<T> Clone for SimpleQueue<T> {
    fn clone(&self) -> Self {
        SimpleQueue {
            queue: self.queue.clone(),
        }
    }
}

impl<T> fmt::Debug for SimpleQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimpleQueue")
            .field("len", &self.queue.len())
            .finish()
    }
}

impl<T: Serialize + DeserializeOwned> SimpleQueue<T> {
    /// Creates an empty queue.
    pub fn new() -> Result<Self, QueueError> {
        let queue = Queue::with_tag(Queue::<T>::builder(), type_tag::<SimpleQueue<T>>())?;
        Ok(SimpleQueue { queue })
    }

    /// Puts an item.
    pub fn put(&self, item: impl Borrow<T>) -> Result<(), QueueError> {
        self.queue.put(item)
    }

    /// Takes the next item, waiting for one.
    pub fn get(&self) -> Result<T, QueueError> {
        self.queue.get()
    }

    /// Takes the next item, waiting at most `timeout`.
    pub fn get_timeout(&self, timeout: Duration) -> Result<T, QueueError> {
        self.queue.get_timeout(timeout)
    }
}

impl<T> SimpleQueue<T> {
    /// Whether the queue is empty now (Python's `empty()`).
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Closes the queue (see [`Queue::close`]).
    pub fn close(&self) -> Result<(), QueueError> {
        self.queue.close()
    }
}

impl<T> Serialize for SimpleQueue<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.queue.serialize(serializer)
    }
}

impl<'de, T> Deserialize<'de> for SimpleQueue<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(SimpleQueue {
            queue: attach(deserializer, type_tag::<SimpleQueue<T>>())?,
        })
    }
}
