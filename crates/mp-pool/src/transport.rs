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
//! What travels, and how it is kept cheap (each measured on `mp-bench`'s pool rows):
//! * **Large payloads** (a chunk's arguments or results of 64 KiB or more) do not go
//!   through the queues' out-of-band path, which faults in fresh pages for every item; they
//!   go through a reused shared region per worker and direction ([`crate::bulk`]), and the
//!   message names them. Together with the pool's kept encode buffers ([`Spares`]) and the
//!   workers' malloc settings (`worker.rs`), a 1 MiB echo through a warm pool went from
//!   ~2.5 ms (~1 200 page faults) to ~0.15 ms.
//! * **Small payloads** (30 bytes or less: one small task's arguments or result) are kept
//!   inline ([`Bytes`], [`Payload::Small`]): a chunk costs no allocation to receive.
//! * **A batch of chunks** does not repeat what its chunks share (group, function,
//!   consecutive sequence numbers): see `compact`.
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
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mp_core::{FunctionId, TaskFailure};
use parking_lot::Mutex;

use crate::bulk::{BulkRef, Inbox, Outbox, Staged};
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
/// Short ones (most chunks of small tasks) are kept inline: receiving one allocates
/// nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Bytes {
    /// At most [`SMALL`] bytes, inline.
    Small(Small),
    /// Any length, on the heap.
    Heap(Vec<u8>),
}

/// The longest byte string kept inline.
pub(crate) const SMALL: usize = 30;

/// A short byte string, inline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Small {
    len: u8,
    data: [u8; SMALL],
}

impl Small {
    /// `bytes` inline, if it is short enough.
    pub(crate) fn new(bytes: &[u8]) -> Option<Small> {
        let mut data = [0; SMALL];
        data.get_mut(..bytes.len())?.copy_from_slice(bytes);
        Some(Small {
            len: bytes.len() as u8,
            data,
        })
    }

    /// The bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        &self.data[..usize::from(self.len)]
    }
}

impl Bytes {
    /// Takes a buffer (copying it inline if it is short).
    pub(crate) fn from_vec(bytes: Vec<u8>) -> Bytes {
        Small::new(&bytes).map_or(Bytes::Heap(bytes), Bytes::Small)
    }

    /// The bytes.
    pub(crate) fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Small(small) => small.as_slice(),
            Bytes::Heap(bytes) => bytes,
        }
    }
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.as_slice())
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
                Ok(Small::new(v).map_or_else(|| Bytes::Heap(v.to_vec()), Bytes::Small))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes::from_vec(v))
            }
        }
        deserializer.deserialize_byte_buf(BytesVisitor)
    }
}

/// The encoded arguments of one chunk. Shared, not copied, between the scheduler (which
/// keeps it to re-queue the chunk if its worker dies) and the message that carries it;
/// short ones are inline (copied, and allocating nothing).
#[derive(Clone, Debug)]
pub(crate) enum Payload {
    /// At most [`SMALL`] bytes.
    Small(Small),
    /// Any length.
    Shared(Arc<Encoded>),
}

/// The bytes of a [`Payload`]; a large buffer goes back to its pool's [`Spares`] when the
/// chunk is done with it.
#[derive(Debug)]
pub(crate) struct Encoded {
    bytes: Vec<u8>,
    spares: Option<Arc<Spares>>,
}

impl Drop for Encoded {
    fn drop(&mut self) {
        if let Some(spares) = &self.spares {
            spares.give(std::mem::take(&mut self.bytes));
        }
    }
}

impl Payload {
    /// Wraps encoded bytes.
    pub(crate) fn new(bytes: Vec<u8>) -> Payload {
        Small::new(&bytes).map_or_else(
            || {
                Payload::Shared(Arc::new(Encoded {
                    bytes,
                    spares: None,
                }))
            },
            Payload::Small,
        )
    }

    /// Wraps encoded bytes whose buffer, if large, is kept in `spares` once the chunk is
    /// done with it.
    pub(crate) fn recycled(bytes: Vec<u8>, spares: &Arc<Spares>) -> Payload {
        if bytes.capacity() < crate::bulk::MIN_BYTES {
            return Payload::new(bytes);
        }
        Payload::Shared(Arc::new(Encoded {
            bytes,
            spares: Some(spares.clone()),
        }))
    }

    /// The encoded bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            Payload::Small(small) => small.as_slice(),
            Payload::Shared(encoded) => &encoded.bytes,
        }
    }

    /// How many bytes it adds to a message.
    pub(crate) fn len(&self) -> usize {
        self.as_bytes().len()
    }
}

/// Buffers of large encoded arguments, kept by a pool for the next large arguments.
///
/// A large fresh buffer costs a page fault per 4 KiB page the encoder writes (the
/// allocator returns big freed blocks to the kernel), ~0.5 ms per MiB on this kind of
/// machine: more than the copies of a whole round trip. So the pool keeps at most
/// [`MAX_SPARES`] buffers of at most [`bulk::MAX_BYTES`](crate::bulk::MAX_BYTES) each while it
/// lives, and encodes the next arguments into one of them when the previous arguments
/// were large (after small ones, the plain encoder is quicker).
#[derive(Debug, Default)]
pub(crate) struct Spares {
    buffers: Mutex<Vec<Vec<u8>>>,
    /// The last arguments encoded were large: try a spare buffer for the next ones.
    last_large: AtomicBool,
}

/// The most spare buffers a pool keeps.
const MAX_SPARES: usize = 2;

impl Spares {
    /// A spare buffer, if the last arguments were large and one is kept.
    pub(crate) fn take(&self) -> Option<Vec<u8>> {
        if !self.last_large.load(Ordering::Relaxed) {
            return None;
        }
        self.buffers.lock().pop()
    }

    /// Notes whether the arguments just encoded were large.
    pub(crate) fn note(&self, len: usize) {
        self.last_large
            .store(len >= crate::bulk::MIN_BYTES, Ordering::Relaxed);
    }

    /// Keeps `buffer` (emptied) if it is a large one and there is room.
    pub(crate) fn give(&self, mut buffer: Vec<u8>) {
        if !(crate::bulk::MIN_BYTES..=crate::bulk::MAX_BYTES).contains(&buffer.capacity()) {
            return;
        }
        let mut buffers = self.buffers.lock();
        if buffers.len() < MAX_SPARES {
            buffer.clear();
            buffers.push(buffer);
        }
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.as_bytes())
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Ok(match Bytes::deserialize(deserializer)? {
            Bytes::Small(small) => Payload::Small(small),
            Bytes::Heap(bytes) => Payload::new(bytes),
        })
    }
}

/// One chunk of a job, as a worker receives it (on the wire, see [`compact`]).
#[derive(Debug)]
pub(crate) struct TaskChunk {
    /// Its sequence number on this worker's link (0, 1, 2...): what the worker claims
    /// (see [`Claims`]) and what its result is matched by.
    pub seq: u64,
    /// Chunks of one job whose results are only observed together (a `map`) share a
    /// nonzero group: the worker may send their successful results together (see the
    /// worker loop). 0: send the result the moment the chunk ends.
    pub group: u64,
    /// It has a time limit: the worker reports when it starts it ([`Report::Started`]),
    /// and sends its result at once.
    pub report_start: bool,
    /// The chunk trampoline to run.
    pub function: FunctionId,
    /// The postcard-encoded `Vec` of arguments.
    pub payload: ChunkPayload,
}

/// Where a chunk's encoded arguments are.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ChunkPayload {
    /// In the message.
    Inline(Payload),
    /// In the worker's argument region (see [`crate::bulk`]); the sender puts large
    /// payloads there.
    Bulk(BulkRef),
}

/// A chunk's encoded results, as they travel and as the pool hands them to the job.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ResultBytes {
    /// In the message.
    Inline(Bytes),
    /// In the worker's result region (see [`crate::bulk`]).
    Bulk(BulkRef),
    /// In the worker's result region, mapped by the pool: freed for the worker when
    /// dropped. Made by the result thread from `Bulk`; never sent.
    #[serde(skip)]
    Staged(Staged),
}

impl ResultBytes {
    /// The encoded results (empty for an unresolved reference, which then fails to decode).
    pub(crate) fn as_bytes(&self) -> &[u8] {
        match self {
            ResultBytes::Inline(bytes) => bytes.as_slice(),
            ResultBytes::Bulk(_) => &[],
            ResultBytes::Staged(staged) => staged.bytes(),
        }
    }
}

/// Parent → worker.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum TaskMessage {
    /// The first message on a link, put there before the worker starts: the rest of what
    /// the worker needs. Its handles travel inside the message (one datagram beside the
    /// ring) rather than as process arguments (a claim from the pool's courier each), which
    /// makes a worker's start shorter.
    Setup {
        /// Where it sends its reports.
        reports: ReportSender,
        /// Where it claims each chunk before starting it.
        claims: Claims,
    },
    /// Run these chunks in order.
    Run(#[serde(with = "compact")] Vec<TaskChunk>),
    /// Finish: no more tasks will come.
    Stop,
}

/// The wire form of a batch of chunks: what the previous chunk of the batch had is not
/// repeated. A chunk is `(seq gap, report_start, group, function, payload)`, the gap being
/// how many sequence numbers it skips after the previous chunk's (its own number for the
/// first), `group` and `function` `None` when they are the previous chunk's. With small
/// tasks most of a chunk's bytes were its group and function, and decoding a function
/// checks its tag.
mod compact {
    use std::fmt;

    use mp_core::FunctionId;
    use serde::de::{self, SeqAccess, Visitor};
    use serde::ser::SerializeSeq;
    use serde::{Deserializer, Serializer};

    use super::{ChunkPayload, TaskChunk};

    pub(super) fn serialize<S: Serializer>(
        chunks: &[TaskChunk],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(chunks.len()))?;
        let mut previous: Option<&TaskChunk> = None;
        for chunk in chunks {
            let gap = previous.map_or(chunk.seq, |p| chunk.seq.wrapping_sub(p.seq + 1));
            let group = previous
                .is_none_or(|p| p.group != chunk.group)
                .then_some(chunk.group);
            let function = previous
                .is_none_or(|p| p.function != chunk.function)
                .then_some(chunk.function);
            seq.serialize_element(&(gap, chunk.report_start, group, function, &chunk.payload))?;
            previous = Some(chunk);
        }
        seq.end()
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<TaskChunk>, D::Error> {
        struct Chunks;
        impl<'de> Visitor<'de> for Chunks {
            type Value = Vec<TaskChunk>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a batch of chunks")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut chunks: Vec<TaskChunk> =
                    Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                type Wire = (u64, bool, Option<u64>, Option<FunctionId>, ChunkPayload);
                while let Some((gap, report_start, group, function, payload)) =
                    seq.next_element::<Wire>()?
                {
                    let previous = chunks.last();
                    let missing = || de::Error::custom("the first chunk of a batch names all");
                    chunks.push(TaskChunk {
                        seq: previous.map_or(gap, |p| (p.seq + 1).wrapping_add(gap)),
                        group: match group {
                            Some(group) => group,
                            None => previous.ok_or_else(missing)?.group,
                        },
                        report_start,
                        function: match function {
                            Some(function) => function,
                            None => previous.ok_or_else(missing)?.function,
                        },
                        payload,
                    });
                }
                Ok(chunks)
            }
        }
        deserializer.deserialize_seq(Chunks)
    }
}

/// What became of one chunk.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct ChunkResult {
    /// The chunk's sequence number.
    pub seq: u64,
    /// How long the worker spent running it, in nanoseconds.
    pub elapsed_ns: u64,
    /// The postcard-encoded `Vec` of results, or why there is none.
    pub outcome: Result<ResultBytes, TaskFailure>,
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
    /// Results of chunks, in the order the worker ran them: each sent as soon as it
    /// ends, or with the next results of the same group (see [`TaskChunk::group`]).
    Results {
        /// Who.
        worker: WorkerId,
        /// The results.
        results: Vec<ChunkResult>,
    },
    /// The worker claimed and starts chunk `seq`, which has a time limit.
    Started {
        /// Who.
        worker: WorkerId,
        /// The chunk.
        seq: u64,
    },
    /// The worker skipped chunks the pool had revoked, up to and including `last`.
    Skipped {
        /// Who.
        worker: WorkerId,
        /// The last chunk it skipped.
        last: u64,
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

/// A worker's claim counter, in shared memory: the sequence number of the next chunk it
/// may start. The worker *claims* chunk `n` by moving it from `n` to `n + 1`; the pool
/// *revokes* the chunks the worker has not started by moving it past them. Both are one
/// compare-and-swap on the same word, so exactly one side wins each chunk: a chunk either
/// ran (or runs) on this worker, or it never will and can run elsewhere. After the worker's
/// death the counter tells which of its chunks started (those below it) and which did not.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Claims(SharedMemory);

impl Claims {
    pub(crate) fn new() -> Result<Claims, TransportError> {
        Ok(Claims(SharedMemory::new(8).map_err(QueueError::from)?))
    }

    fn word(&self) -> &AtomicU64 {
        let ptr = self.0.as_mut_ptr().cast::<u64>();
        debug_assert!(ptr.is_aligned() && self.0.len() >= 8);
        // SAFETY: the mapping starts on a page boundary (so `ptr` is aligned for a u64) and
        // holds at least 8 bytes (`new`); it stays mapped while `self` (a handle to it)
        // lives, which bounds the returned reference. Every process accesses these 8 bytes
        // only through atomic operations on this same `AtomicU64` view, so there is no
        // non-atomic access to race with.
        unsafe { AtomicU64::from_ptr(ptr) }
    }

    /// In the worker: claims chunk `seq` before starting it. `false`: the pool revoked it;
    /// it must be skipped.
    pub(crate) fn claim(&self, seq: u64) -> bool {
        claim(self.word(), seq)
    }

    /// In the pool: revokes every chunk before `sent` that the worker has not claimed.
    /// Returns the first revoked sequence number (`sent` if none was left).
    pub(crate) fn revoke(&self, sent: u64) -> u64 {
        revoke(self.word(), sent)
    }

    /// In the pool: chunks below this were claimed (started) or revoked.
    pub(crate) fn claimed(&self) -> u64 {
        self.word().load(Ordering::Acquire)
    }
}

/// The claim protocol on a counter (see [`Claims`]): the worker claims chunk `seq`.
pub(crate) fn claim(word: &AtomicU64, seq: u64) -> bool {
    word.compare_exchange(seq, seq + 1, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// The claim protocol on a counter (see [`Claims`]): the pool revokes the unclaimed chunks
/// before `sent`; returns the first one revoked (`sent` if none).
pub(crate) fn revoke(word: &AtomicU64, sent: u64) -> u64 {
    let mut next = word.load(Ordering::Acquire);
    while next < sent {
        match word.compare_exchange(next, sent, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return next,
            Err(now) => next = now,
        }
    }
    sent
}

/// The pool's end of one worker's task link: where its chunks go, and its claim counter.
pub(crate) struct TaskLink {
    pub sender: TaskSender,
    pub claims: Claims,
}

impl crate::scheduler::WorkerLink for TaskLink {
    fn send(&self, message: &TaskMessage) -> Result<(), TransportError> {
        self.sender.send(message)
    }

    fn revoke(&self, sent: u64) -> u64 {
        self.claims.revoke(sent)
    }

    fn claimed(&self) -> u64 {
        self.claims.claimed()
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

/// Parent side of a task link: the queue, and the worker's argument region (large
/// payloads, see [`crate::bulk`]).
pub(crate) struct TaskSender(Queue<TaskMessage>, Mutex<Outbox>);

/// Worker side of a task link.
#[derive(Serialize, Deserialize)]
pub(crate) struct TaskReceiver(Queue<TaskMessage>);

/// Creates a task link for a new worker.
pub(crate) fn task_link() -> Result<(TaskSender, TaskReceiver), TransportError> {
    let queue = Queue::builder()
        .capacity_bytes(TASK_RING_BYTES)
        .grow(false)
        .build()?;
    Ok((
        TaskSender(queue.clone(), Mutex::new(Outbox::default())),
        TaskReceiver(queue),
    ))
}

impl TaskSender {
    /// Sends without waiting (see the module docs). The first large inline payload of the
    /// message goes through the argument region instead, if that is free.
    pub(crate) fn send(&self, message: &TaskMessage) -> Result<(), TransportError> {
        let large = match message {
            TaskMessage::Run(chunks) => chunks.iter().position(|chunk| {
                matches!(&chunk.payload, ChunkPayload::Inline(p) if p.len() >= crate::bulk::MIN_BYTES)
            }),
            TaskMessage::Setup { .. } | TaskMessage::Stop => None,
        };
        let Some(large) = large else {
            return Self::sent(self.0.try_put(message));
        };
        let mut outbox = self.1.lock();
        let staged = match message {
            TaskMessage::Run(chunks) => match &chunks[large].payload {
                ChunkPayload::Inline(payload) => outbox.stage(payload.as_bytes()).map(|bulk| {
                    let mut copy: Vec<TaskChunk> = chunks
                        .iter()
                        .map(|chunk| TaskChunk {
                            seq: chunk.seq,
                            group: chunk.group,
                            report_start: chunk.report_start,
                            function: chunk.function,
                            payload: match &chunk.payload {
                                ChunkPayload::Inline(payload) => {
                                    ChunkPayload::Inline(payload.clone())
                                }
                                // The pool sends only inline payloads; a reference stays one.
                                ChunkPayload::Bulk(bulk) => ChunkPayload::Bulk(BulkRef {
                                    len: bulk.len,
                                    region: None,
                                }),
                            },
                        })
                        .collect();
                    copy[large].payload = ChunkPayload::Bulk(bulk);
                    TaskMessage::Run(copy)
                }),
                ChunkPayload::Bulk(_) => None,
            },
            TaskMessage::Setup { .. } | TaskMessage::Stop => None,
        };
        let sent = self.0.try_put(staged.as_ref().unwrap_or(message));
        outbox.sent(sent.is_ok());
        Self::sent(sent)
    }

    /// What a `try_put` means for the scheduler.
    fn sent(sent: Result<(), QueueError>) -> Result<(), TransportError> {
        match sent {
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

/// In the worker: the arguments of a received chunk, readable in place.
pub(crate) enum Arguments {
    /// They came in the message.
    Inline(Payload),
    /// They are in the argument region (freed when this is dropped).
    Staged(Staged),
    /// The message named a region the worker does not have (a broken link).
    Missing,
}

impl Arguments {
    /// Resolves a chunk's payload, with the worker's view of its argument region.
    pub(crate) fn open(payload: ChunkPayload, inbox: &mut Inbox) -> Arguments {
        match payload {
            ChunkPayload::Inline(payload) => Arguments::Inline(payload),
            ChunkPayload::Bulk(bulk) => inbox
                .open(bulk)
                .map_or(Arguments::Missing, Arguments::Staged),
        }
    }

    /// The encoded arguments (`None`: missing).
    pub(crate) fn bytes(&self) -> Option<&[u8]> {
        match self {
            Arguments::Inline(payload) => Some(payload.as_bytes()),
            Arguments::Staged(staged) => Some(staged.bytes()),
            Arguments::Missing => None,
        }
    }
}

/// Sending side of the report link (workers hold clones; so does the pool, for notices).
#[derive(Clone, Debug, Serialize, Deserialize)]
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

    /// The next report if one has arrived (`None`: none yet).
    pub(crate) fn try_recv(&self) -> Result<Option<Report>, TransportError> {
        match self.0.try_get() {
            Ok(report) => Ok(Some(report)),
            Err(QueueError::Empty) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_either_claimed_by_the_worker_or_revoked_by_the_pool() {
        let claims = Claims::new().unwrap();
        let worker = claims.clone();
        assert_eq!(claims.claimed(), 0);
        assert!(worker.claim(0));
        assert!(!worker.claim(0), "a chunk is claimed once");
        // Chunks 1..4 were sent; the worker started none of them: all are revoked.
        assert_eq!(claims.revoke(4), 1);
        for seq in 1..4 {
            assert!(!worker.claim(seq), "revoked chunk {seq} was claimed");
        }
        assert_eq!(claims.claimed(), 4);
        // Later chunks are claimed as usual; nothing left to revoke once all started.
        assert!(worker.claim(4));
        assert_eq!(claims.revoke(5), 5);
        assert_eq!(claims.claimed(), 5);
    }

    #[test]
    fn claims_race_and_exactly_one_side_wins_each_chunk() {
        for _ in 0..200 {
            let claims = Claims::new().unwrap();
            let worker = claims.clone();
            let claimer =
                std::thread::spawn(move || (0..64).take_while(|&s| worker.claim(s)).count());
            let first_revoked = claims.revoke(64);
            let ran = claimer.join().unwrap() as u64;
            assert_eq!(
                ran, first_revoked,
                "the worker ran exactly the chunks not revoked"
            );
        }
    }

    #[test]
    fn bytes_serialize_as_one_byte_string() {
        let bytes = Bytes::from_vec(vec![1, 2, 3]);
        let encoded = postcard::to_allocvec(&bytes).unwrap();
        assert_eq!(encoded, [3, 1, 2, 3]);
        assert_eq!(postcard::from_bytes::<Bytes>(&encoded).unwrap(), bytes);
        // Short ones are inline, longer ones on the heap; both travel the same way.
        for len in [0, SMALL, SMALL + 1, 1000] {
            let bytes = Bytes::from_vec(vec![7; len]);
            assert_eq!(matches!(bytes, Bytes::Small(_)), len <= SMALL);
            let encoded = postcard::to_allocvec(&bytes).unwrap();
            let decoded = postcard::from_bytes::<Bytes>(&encoded).unwrap();
            assert_eq!(decoded.as_slice(), &vec![7; len][..]);
            let payload = postcard::from_bytes::<Payload>(&encoded).unwrap();
            assert_eq!(payload.as_bytes(), &vec![7; len][..]);
        }
    }

    fn batch(seq: u64, bytes: usize) -> TaskMessage {
        TaskMessage::Run(vec![TaskChunk {
            seq,
            group: 0,
            report_start: false,
            function: FunctionId::of_task(&|x: u8| x),
            payload: ChunkPayload::Inline(Payload::new(vec![7; bytes])),
        }])
    }

    #[test]
    fn a_batch_travels_whole_without_repeating_what_chunks_share() {
        let (f, g) = (
            FunctionId::of_task(&|x: u8| x),
            FunctionId::of_task(&|x: u16| x),
        );
        let chunk = |seq, group, report_start, function, byte| TaskChunk {
            seq,
            group,
            report_start,
            function,
            payload: ChunkPayload::Inline(Payload::new(vec![byte; usize::from(byte)])),
        };
        let sent = TaskMessage::Run(vec![
            chunk(7, 1, false, f, 1),
            chunk(8, 1, false, f, 2),
            chunk(10, 1, true, f, 40),
            chunk(11, 2, false, f, 3),
            chunk(12, 2, false, g, 4),
            chunk(13, 0, false, f, 0),
        ]);
        let encoded = postcard::to_allocvec(&sent).unwrap();
        let TaskMessage::Run(received) = postcard::from_bytes(&encoded).unwrap() else {
            panic!("expected a batch");
        };
        let TaskMessage::Run(sent) = sent else {
            unreachable!()
        };
        assert_eq!(received.len(), sent.len());
        for (a, b) in sent.iter().zip(&received) {
            assert_eq!(
                (a.seq, a.group, a.report_start, a.function),
                (b.seq, b.group, b.report_start, b.function)
            );
            let bytes = |c: &TaskChunk| match &c.payload {
                ChunkPayload::Inline(p) => p.as_bytes().to_vec(),
                ChunkPayload::Bulk(_) => panic!("inline expected"),
            };
            assert_eq!(bytes(a), bytes(b));
        }
        // A chunk of a run costs its payload and a few bytes.
        let one = postcard::to_allocvec(&TaskMessage::Run(vec![chunk(0, 1 << 40, false, f, 1)]))
            .unwrap()
            .len();
        let two = postcard::to_allocvec(&TaskMessage::Run(vec![
            chunk(0, 1 << 40, false, f, 1),
            chunk(1, 1 << 40, false, f, 1),
        ]))
        .unwrap()
        .len();
        assert!(two - one <= 8, "{one} then {two} bytes");
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
                _ => panic!("expected a batch"),
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
