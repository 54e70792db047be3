//! The data plane between the pool and its workers: every byte that crosses the process
//! boundary goes through this module, so the carrier can change without touching the
//! scheduler.
//!
//! Two kinds of link, both mp-ipc shared-memory [`Queue`]s (a ring in a memfd, futex
//! wake-ups after a short adaptive spin, large items out of band in the same memfd):
//! * one **task link per worker** (parent → worker), carrying batches of chunks;
//! * one **report link shared by all workers** (workers → parent), carrying results and
//!   readiness; the pool's own threads post notices (a worker exited, shut down) on it too,
//!   so the result thread waits on a single queue.
//!
//! The contract the rest of the crate relies on:
//!
//! * **A task send never waits.** The scheduler sends while holding its lock, so a send that
//!   waited for a busy worker to make room would stall the whole pool behind it. Sends use
//!   `try_put`, and the scheduler keeps at most [`MAX_MESSAGES_IN_FLIGHT`] unanswered
//!   messages per worker: a message takes at most a quarter of the ring (larger ones go out
//!   of band), so they always fit. Should one not fit anyway, the send reports
//!   [`TransportError::Full`] and the scheduler takes the chunks back.
//! * **A receive polls for [`SPIN`] before it waits.** The ring's own spin is shorter than
//!   one futex wake-up on another CPU (tens of microseconds). In the pool, messages form a
//!   chain (caller → worker → result thread → caller): once one party sleeps, every other
//!   party waits longer than its spin and sleeps too, and a round trip settles at three
//!   wake-ups. Polling long enough to cover one wake-up elsewhere in the chain keeps the
//!   parties awake while work flows; between polls the thread yields, so that two parties
//!   sharing one CPU still make progress, and an idle pool sleeps after [`SPIN`].
//! * **Reports from one worker arrive in the order it sent them**, a report that was sent is
//!   not lost if its worker dies right after, and a worker killed in the middle of a send
//!   neither corrupts the link nor blocks the others (mp-ipc's robust ring). A notice the
//!   pool posts after reaping a worker therefore arrives after everything that worker sent.

use std::fmt;
use std::time::{Duration, Instant};

use mp_core::{FunctionId, TaskFailure};
use mp_ipc::queue::{Queue, QueueError};
use mp_ipc::shm::SharedMemory;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How long a receive polls before it waits (see the module docs).
pub(crate) const SPIN: Duration = Duration::from_micros(50);

/// Takes the next item of `queue`, polling for [`SPIN`] before waiting.
fn get_polling<T: Serialize + serde::de::DeserializeOwned>(
    queue: &Queue<T>,
) -> Result<T, QueueError> {
    let start = Instant::now();
    loop {
        match queue.try_get() {
            Err(QueueError::Empty) if start.elapsed() < SPIN => std::thread::yield_now(),
            Err(QueueError::Empty) => return queue.get(),
            done => return done,
        }
    }
}

/// Bytes of one worker's task ring (address space; pages are touched as used).
const TASK_RING_BYTES: usize = 1 << 20;

/// The most unanswered task messages the scheduler leaves on one worker's link: three
/// messages of at most a quarter of the ring each always fit.
pub(crate) const MAX_MESSAGES_IN_FLIGHT: usize = 3;

/// A batch message stops growing at this many payload bytes (a larger chunk travels alone).
pub(crate) const BATCH_BYTES: usize = 64 * 1024;

/// Identifies one worker process for the lifetime of a pool (never reused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) struct WorkerId(pub u64);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A byte buffer that serializes as one byte string (serde's `Vec<u8>` goes byte by byte).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Bytes(pub Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BytesVisitor;
        impl<'de> Visitor<'de> for BytesVisitor {
            type Value = Bytes;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes(v.to_vec()))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes(v))
            }
        }
        deserializer.deserialize_byte_buf(BytesVisitor)
    }
}

/// The encoded arguments of one chunk.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Payload(Bytes);

impl Payload {
    /// Wraps encoded bytes.
    pub(crate) fn new(bytes: Vec<u8>) -> Payload {
        Payload(Bytes(bytes))
    }

    /// The encoded bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0.0
    }

    /// How many bytes it adds to a message.
    pub(crate) fn len(&self) -> usize {
        self.0.0.len()
    }
}

/// One chunk of a job, as a worker receives it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct TaskChunk {
    /// The pool-wide sequence number the result is matched by.
    pub seq: u64,
    /// The chunk trampoline to run.
    pub function: FunctionId,
    /// The postcard-encoded `Vec` of arguments.
    pub payload: Payload,
}

/// Parent → worker.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum TaskMessage {
    /// Run these chunks in order.
    Run(Vec<TaskChunk>),
    /// Finish: no more tasks will come.
    Stop,
}

/// What became of one chunk.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ChunkResult {
    /// The chunk's sequence number.
    pub seq: u64,
    /// How long the worker spent running it, in nanoseconds.
    pub elapsed_ns: u64,
    /// The postcard-encoded `Vec` of results, or why there is none.
    pub outcome: Result<Bytes, TaskFailure>,
}

/// Worker → parent, and the pool's own notices to its result thread.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Report {
    /// The worker ran its initializer (if any) and waits for tasks.
    Ready {
        /// Who.
        worker: WorkerId,
        /// Its pid.
        pid: u32,
    },
    /// Results of chunks, in the order the worker ran them.
    Results {
        /// Who.
        worker: WorkerId,
        /// The results.
        results: Vec<ChunkResult>,
    },
    /// Notice from the supervisor: the worker's process ended (posted after it was reaped,
    /// hence after everything it sent).
    Exited {
        /// Who.
        worker: WorkerId,
        /// Its Python-style exit code (minus the signal number when killed).
        exitcode: i32,
        /// What its process reported, if it failed (a panic outside a task: in the
        /// initializer).
        failure: Option<String>,
    },
    /// Notice from the pool: the result thread must stop.
    Shutdown,
}

/// Where a worker records the chunk it is starting, in shared memory the pool reads after
/// the worker died: chunks before it ran (their results may be lost), chunks after it never
/// started and can run elsewhere. Only the worker writes and only after its death does the
/// pool read, so plain copies suffice: nothing can tear.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct Progress(SharedMemory);

impl Progress {
    pub(crate) fn new() -> Result<Progress, TransportError> {
        Ok(Progress(SharedMemory::new(8).map_err(QueueError::from)?))
    }

    /// In the worker: the chunk `seq` starts now.
    pub(crate) fn started(&self, seq: u64) {
        // Cannot fail: the segment has room for the 8 bytes.
        let _ = self.0.write_at(0, &(seq + 1).to_le_bytes());
    }

    /// In the pool, once the worker is dead: the last chunk it started, if any.
    pub(crate) fn last_started(&self) -> Option<u64> {
        let mut bytes = [0; 8];
        self.0.read_at(0, &mut bytes).ok()?;
        u64::from_le_bytes(bytes).checked_sub(1)
    }
}

/// A link could not carry a message.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TransportError {
    /// The task link has no room now (the scheduler takes the chunks back).
    #[error("the worker's task link is full")]
    Full,
    /// The queue failed (closed, corrupted, undecodable item, system error).
    #[error("pool transport: {0}")]
    Queue(#[from] QueueError),
}

/// Parent side of a task link.
pub(crate) struct TaskSender(Queue<TaskMessage>);

/// Worker side of a task link.
#[derive(Serialize, Deserialize)]
pub(crate) struct TaskReceiver(Queue<TaskMessage>);

/// Creates a task link for a new worker.
pub(crate) fn task_link() -> Result<(TaskSender, TaskReceiver), TransportError> {
    let queue = Queue::builder().capacity_bytes(TASK_RING_BYTES).build()?;
    Ok((TaskSender(queue.clone()), TaskReceiver(queue)))
}

impl TaskSender {
    /// Sends without waiting (see the module docs).
    pub(crate) fn send(&self, message: &TaskMessage) -> Result<(), TransportError> {
        match self.0.try_put(message) {
            Ok(()) => Ok(()),
            Err(QueueError::Full) => Err(TransportError::Full),
            Err(e) => Err(e.into()),
        }
    }
}

impl TaskReceiver {
    /// Waits for the next message; an error means the link is unusable.
    pub(crate) fn recv(&self) -> Result<TaskMessage, TransportError> {
        Ok(get_polling(&self.0)?)
    }
}

/// Sending side of the report link (workers hold clones; so does the pool, for notices).
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct ReportSender(Queue<Report>);

/// The pool's side of the report link.
pub(crate) struct ReportReceiver(Queue<Report>);

/// Creates the report link of a pool.
pub(crate) fn report_link() -> Result<(ReportSender, ReportReceiver), TransportError> {
    let queue = Queue::unbounded()?;
    Ok((ReportSender(queue.clone()), ReportReceiver(queue)))
}

impl ReportSender {
    /// Sends a report (waits only while the result thread catches up).
    pub(crate) fn send(&self, report: Report) -> Result<(), TransportError> {
        Ok(self.0.put(report)?)
    }
}

impl ReportReceiver {
    /// Waits for the next report. An error concerns one item (it could not be decoded);
    /// the link itself lives as long as the pool holds a sender.
    pub(crate) fn recv(&self) -> Result<Report, TransportError> {
        Ok(get_polling(&self.0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_remembers_the_last_chunk_started() {
        let progress = Progress::new().unwrap();
        assert_eq!(progress.last_started(), None);
        progress.started(0);
        assert_eq!(progress.last_started(), Some(0));
        progress.clone().started(41);
        assert_eq!(progress.last_started(), Some(41));
    }

    #[test]
    fn bytes_serialize_as_one_byte_string() {
        let bytes = Bytes(vec![1, 2, 3]);
        let encoded = postcard::to_allocvec(&bytes).unwrap();
        assert_eq!(encoded, [3, 1, 2, 3]);
        assert_eq!(postcard::from_bytes::<Bytes>(&encoded).unwrap(), bytes);
    }

    fn batch(seq: u64, bytes: usize) -> TaskMessage {
        TaskMessage::Run(vec![TaskChunk {
            seq,
            function: FunctionId::of_task(&|x: u8| x),
            payload: Payload::new(vec![7; bytes]),
        }])
    }

    #[test]
    fn the_largest_messages_in_flight_fit_without_waiting() {
        let (sender, receiver) = task_link().unwrap();
        // The worst case: every message as large as can stay in the ring, or larger.
        for (seq, bytes) in [
            (0, TASK_RING_BYTES / 4 - 64),
            (1, TASK_RING_BYTES / 4 - 64),
            (2, 5 << 20),
        ] {
            sender.send(&batch(seq, bytes)).unwrap();
        }
        assert_eq!(MAX_MESSAGES_IN_FLIGHT, 3);
        for expected in 0..3 {
            match receiver.recv().unwrap() {
                TaskMessage::Run(chunks) => assert_eq!(chunks[0].seq, expected),
                TaskMessage::Stop => panic!("expected a batch"),
            }
        }
    }

    #[test]
    fn a_full_link_says_so_instead_of_waiting() {
        let (sender, _receiver) = task_link().unwrap();
        let mut sent = 0;
        loop {
            match sender.send(&batch(sent, 100_000)) {
                Ok(()) => sent += 1,
                Err(TransportError::Full) => break,
                Err(e) => panic!("unexpected {e}"),
            }
            assert!(sent < 100, "a 1 MiB ring took {sent} messages of 100 kB");
        }
        assert!(sent >= MAX_MESSAGES_IN_FLIGHT as u64);
    }
}
