//! The data plane between the pool and its workers: every byte that crosses the process
//! boundary goes through this module, so the carrier can change without touching the
//! scheduler.
//!
//! Two kinds of link:
//! * one **task link per worker** (parent → worker), carrying batches of chunks;
//! * one **report link shared by all workers** (workers → parent), carrying results,
//!   and readiness; the pool's own threads post notices (a worker
//!   exited, shut down) on it too, so the result thread waits on a single receiver.
//!
//! The carrier today is `ipc-channel` (a Unix socket per link). It is meant to become
//! mp-ipc's shared-memory queues; the contract the rest of the crate relies on is:
//!
//! * **A task send never blocks** as long as the scheduler keeps at most
//!   [`MAX_MESSAGES_IN_FLIGHT`] unanswered messages per worker: every message on a task link
//!   is small, because a payload larger than [`INLINE_LIMIT`] travels out of line (a memfd
//!   whose descriptor rides along). The scheduler sends while holding its lock, so this
//!   matters: a blocking send could wedge the pool behind one busy worker.
//! * **A receive polls briefly before it sleeps** ([`SPIN`]): waking a sleeping peer on
//!   another CPU costs tens of microseconds, and in a busy pool the next message usually
//!   arrives sooner than that. Between polls the thread yields, so that two peers sharing
//!   one CPU still make progress.
//! * **Reports from one worker arrive in the order it sent them**, and a notice the parent
//!   posts after observing a worker's exit arrives after everything that worker sent.

use std::fmt;
use std::io;
use std::time::{Duration, Instant};

use ipc_channel::TryRecvError;
use ipc_channel::ipc::{self, IpcReceiver, IpcSender, IpcSharedMemory};
use mp_core::{FunctionId, TaskFailure};
use mp_ipc::shm::SharedMemory;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Payloads larger than this travel out of line, in their own shared-memory segment.
pub(crate) const INLINE_LIMIT: usize = 16 * 1024;

/// The most unanswered task messages the scheduler may leave on one worker's link. With
/// [`INLINE_LIMIT`], this bounds what a link buffers (≤ 128 KiB plus small out-of-line
/// descriptors) below a Unix socket's send buffer, so sends never block.
pub(crate) const MAX_MESSAGES_IN_FLIGHT: usize = 8;

/// How long a receive polls for a message before it sleeps.
pub(crate) const SPIN: Duration = Duration::from_micros(50);

/// Receives from `receiver`, polling for [`SPIN`] before blocking.
fn recv_spinning<T>(receiver: &IpcReceiver<T>) -> Result<T, TransportError>
where
    T: for<'de> Deserialize<'de> + Serialize,
{
    let start = Instant::now();
    loop {
        match receiver.try_recv() {
            Ok(message) => return Ok(message),
            Err(TryRecvError::Empty) if start.elapsed() < SPIN => std::thread::yield_now(),
            Err(TryRecvError::Empty) => break,
            Err(TryRecvError::IpcError(e)) => return Err(TransportError(format!("{e:?}"))),
        }
    }
    receiver
        .recv()
        .map_err(|e| TransportError(format!("{e:?}")))
}

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

/// The encoded arguments of one chunk: inline when small, out of line when large.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) enum Payload {
    /// Carried in the message itself.
    Inline(Bytes),
    /// Carried in a shared-memory segment (a memfd) whose descriptor rides in the message.
    Shared(IpcSharedMemory),
}

impl Payload {
    /// Wraps encoded bytes, moving them out of line when they are large.
    pub(crate) fn new(bytes: Vec<u8>) -> Payload {
        if bytes.len() > INLINE_LIMIT {
            Payload::Shared(IpcSharedMemory::from_bytes(&bytes))
        } else {
            Payload::Inline(Bytes(bytes))
        }
    }

    /// The encoded bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            Payload::Inline(bytes) => &bytes.0,
            Payload::Shared(memory) => memory,
        }
    }

    /// What this payload weighs in a message, against [`INLINE_LIMIT`]: its bytes when
    /// inline; a sixteenth of the limit when out of line, so that a message carries at most
    /// 16 descriptors (the kernel refuses more than 253 per message).
    pub(crate) fn inline_len(&self) -> usize {
        match self {
            Payload::Inline(bytes) => bytes.0.len(),
            Payload::Shared(_) => INLINE_LIMIT / 16,
        }
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Payload::Inline(bytes) => write!(f, "Inline({} B)", bytes.0.len()),
            Payload::Shared(memory) => write!(f, "Shared({} B)", memory.len()),
        }
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
        SharedMemory::new(8)
            .map(Progress)
            .map_err(|e| TransportError(e.to_string()))
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

/// A link could not carry a message: the peer is gone, or the OS refused.
#[derive(Debug, thiserror::Error)]
#[error("pool transport: {0}")]
pub(crate) struct TransportError(String);

impl From<io::Error> for TransportError {
    fn from(e: io::Error) -> Self {
        TransportError(e.to_string())
    }
}

/// Parent side of a task link.
pub(crate) struct TaskSender(IpcSender<TaskMessage>);

/// Worker side of a task link.
#[derive(Serialize, Deserialize)]
pub(crate) struct TaskReceiver(IpcReceiver<TaskMessage>);

/// Creates a task link for a new worker.
pub(crate) fn task_link() -> Result<(TaskSender, TaskReceiver), TransportError> {
    let (sender, receiver) = ipc::channel()?;
    Ok((TaskSender(sender), TaskReceiver(receiver)))
}

impl TaskSender {
    /// Sends without blocking, given the contract in the module docs.
    pub(crate) fn send(&self, message: TaskMessage) -> Result<(), TransportError> {
        self.0
            .send(message)
            .map_err(|e| TransportError(format!("{e:?}")))
    }
}

impl TaskReceiver {
    /// Waits for the next message; an error means the parent is gone.
    pub(crate) fn recv(&self) -> Result<TaskMessage, TransportError> {
        recv_spinning(&self.0)
    }
}

/// Sending side of the report link (workers hold clones; so does the pool, for notices).
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct ReportSender(IpcSender<Report>);

/// The pool's side of the report link.
pub(crate) struct ReportReceiver(IpcReceiver<Report>);

/// Creates the report link of a pool.
pub(crate) fn report_link() -> Result<(ReportSender, ReportReceiver), TransportError> {
    let (sender, receiver) = ipc::channel()?;
    Ok((ReportSender(sender), ReportReceiver(receiver)))
}

impl ReportSender {
    /// Sends a report (blocks only while the result thread catches up).
    pub(crate) fn send(&self, report: Report) -> Result<(), TransportError> {
        self.0
            .send(report)
            .map_err(|e| TransportError(format!("{e:?}")))
    }
}

impl ReportReceiver {
    /// Waits for the next report. An error concerns one message (a worker died while
    /// sending a large one); the link itself lives as long as the pool holds a sender.
    pub(crate) fn recv(&self) -> Result<Report, TransportError> {
        recv_spinning(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_payloads_stay_inline_and_large_ones_move_out() {
        let small = Payload::new(vec![7; INLINE_LIMIT]);
        assert!(matches!(small, Payload::Inline(_)));
        let large = Payload::new(vec![9; INLINE_LIMIT + 1]);
        assert!(matches!(large, Payload::Shared(_)));
        assert_eq!(large.as_bytes(), &vec![9; INLINE_LIMIT + 1][..]);
        assert!(large.inline_len() * 16 <= INLINE_LIMIT);
    }

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

    #[test]
    fn messages_cross_a_task_link_with_out_of_line_payloads() {
        let (sender, receiver) = task_link().unwrap();
        let payload = Payload::new(vec![5; 100_000]);
        sender
            .send(TaskMessage::Run(vec![TaskChunk {
                seq: 3,
                function: FunctionId::of_task(&|x: u8| x),
                payload: payload.clone(),
            }]))
            .unwrap();
        match receiver.recv().unwrap() {
            TaskMessage::Run(chunks) => {
                assert_eq!(chunks.len(), 1);
                assert_eq!(chunks[0].seq, 3);
                assert_eq!(chunks[0].payload.as_bytes(), payload.as_bytes());
            }
            TaskMessage::Stop => panic!("expected a batch"),
        }
    }
}
