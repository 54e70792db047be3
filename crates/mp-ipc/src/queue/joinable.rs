//! [`JoinableQueue`]: a queue that counts unfinished tasks.

use std::fmt;
use std::ops::Deref;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Queue, QueueBuilder, QueueError, attach, type_tag};
use crate::futex::{self, WaitOutcome};

/// Python's `JoinableQueue`: a [`Queue`] (all of its methods are available
/// through `Deref`) that counts unfinished tasks. Every item put is a task;
/// a consumer calls [`task_done`](Self::task_done) when it has processed one;
/// [`join`](Self::join) waits until every task is done.
///
/// ```
/// use mp_ipc::queue::JoinableQueue;
/// use std::time::Duration;
///
/// let tasks = JoinableQueue::unbounded()?;
/// tasks.put(21u64)?;
/// let worker = {
///     let tasks = tasks.clone();
///     std::thread::spawn(move || {
///         let n = tasks.get().unwrap();
///         assert_eq!(n * 2, 42);
///         tasks.task_done().unwrap();
///     })
/// };
/// tasks.join_timeout(Duration::from_secs(10))?;
/// worker.join().unwrap();
/// # Ok::<(), mp_ipc::queue::QueueError>(())
/// ```
///
/// An item lost with a consumer killed in the middle of a get is never
/// `task_done`; use [`join_timeout`](Self::join_timeout) when that can
/// happen. Items that could not be decoded count as done.
pub struct JoinableQueue<T> {
    pub(super) queue: Queue<T>,
}

impl<T> Clone for JoinableQueue<T> {
    fn clone(&self) -> Self {
        JoinableQueue {
            queue: self.queue.clone(),
        }
    }
}

impl<T> fmt::Debug for JoinableQueue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinableQueue")
            .field("len", &self.queue.len())
            .field("unfinished_tasks", &self.unfinished_tasks())
            .finish()
    }
}

impl<T> Deref for JoinableQueue<T> {
    type Target = Queue<T>;
    fn deref(&self) -> &Queue<T> {
        &self.queue
    }
}

impl<T: Serialize + DeserializeOwned> JoinableQueue<T> {
    /// A joinable queue holding at most `maxsize` items.
    pub fn bounded(maxsize: usize) -> Result<Self, QueueError> {
        Self::from_builder(Queue::<T>::builder().maxsize(maxsize))
    }

    /// A joinable queue with no item limit.
    pub fn unbounded() -> Result<Self, QueueError> {
        Self::from_builder(Queue::<T>::builder())
    }

    /// A joinable queue with the options of `builder`.
    pub fn from_builder(builder: QueueBuilder<T>) -> Result<Self, QueueError> {
        Ok(JoinableQueue {
            queue: Queue::with_tag(builder, type_tag::<JoinableQueue<T>>())?,
        })
    }

    /// Takes the next item (see [`Queue::get`]); an item that fails to
    /// decode is counted as done.
    pub fn get(&self) -> Result<T, QueueError> {
        self.count_undecodable(self.queue.get())
    }

    /// See [`Queue::try_get`].
    pub fn try_get(&self) -> Result<T, QueueError> {
        self.count_undecodable(self.queue.try_get())
    }

    /// See [`Queue::get_timeout`].
    pub fn get_timeout(&self, timeout: Duration) -> Result<T, QueueError> {
        self.count_undecodable(self.queue.get_timeout(timeout))
    }

    fn count_undecodable(&self, result: Result<T, QueueError>) -> Result<T, QueueError> {
        if let Err(QueueError::Decode(_)) = &result {
            let _ = self.task_done();
        }
        result
    }
}

impl<T> JoinableQueue<T> {
    /// Items put and not yet marked done (a snapshot).
    pub fn unfinished_tasks(&self) -> usize {
        let put = self.queue.segments.items_put();
        put.wrapping_sub(self.queue.segments.tasks().done.load(SeqCst)) as usize
    }

    /// Marks one task done; wakes the joiners when none is left.
    pub fn task_done(&self) -> Result<(), QueueError> {
        let tasks = self.queue.segments.tasks();
        let mut done = tasks.done.load(SeqCst);
        loop {
            let put = self.queue.segments.items_put();
            if put.wrapping_sub(done) == 0 {
                return Err(QueueError::TaskDoneTooMany);
            }
            match tasks
                .done
                .compare_exchange(done, done.wrapping_add(1), SeqCst, SeqCst)
            {
                Ok(_) => {
                    if put.wrapping_sub(done) == 1 {
                        tasks.seq.fetch_add(1, SeqCst);
                        futex::wake_all(&tasks.seq);
                    }
                    return Ok(());
                }
                Err(now) => done = now,
            }
        }
    }

    /// Waits until every item put has been marked done.
    pub fn join(&self) -> Result<(), QueueError> {
        self.join_until(None)
    }

    /// Like [`join`](Self::join), giving up after `timeout` ([`QueueError::Timeout`]).
    pub fn join_timeout(&self, timeout: Duration) -> Result<(), QueueError> {
        self.join_until(Instant::now().checked_add(timeout))
    }

    fn join_until(&self, deadline: Option<Instant>) -> Result<(), QueueError> {
        let tasks = self.queue.segments.tasks();
        loop {
            let seq = tasks.seq.load(SeqCst);
            std::sync::atomic::fence(SeqCst);
            if self.unfinished_tasks() == 0 {
                return Ok(());
            }
            if futex::wait(&tasks.seq, seq, deadline) == WaitOutcome::TimedOut
                && self.unfinished_tasks() != 0
            {
                return Err(QueueError::Timeout);
            }
        }
    }
}

impl<T> Serialize for JoinableQueue<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.queue.serialize(serializer)
    }
}

impl<'de, T> Deserialize<'de> for JoinableQueue<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(JoinableQueue {
            queue: attach(deserializer, type_tag::<JoinableQueue<T>>())?,
        })
    }
}
