//! The shared-memory data plane under [`Queue`](crate::queue::Queue) and
//! [`Connection`](crate::connection::Connection): a multi-producer,
//! multi-consumer byte ring of length-prefixed frames in a memfd.
//!
//! # Layout
//!
//! One memfd holds everything, so that a single file descriptor (lent to other
//! processes through the [transport](crate::transport)) gives a process the whole queue:
//!
//! ```text
//! [0, 4096)                 header: configuration, indices, wake-up words, two robust mutexes
//! [4096, 4096 + capacity)   the ring of frames (mapped twice back to back, so every frame is
//!                           contiguous in memory however it wraps)
//! [4096 + capacity, ...)    the out-of-band heap: one region per item too large for the ring
//! ```
//!
//! Pages are faulted in on first use, not at creation: a large ring costs
//! address space, not memory, until it is filled.
//!
//! # Protocol
//!
//! * Producers serialise on one robust mutex, consumers on another (a
//!   two-lock queue): a put never waits for a get to finish copying, and the
//!   other way round.
//! * `head` and `tail` are 64-bit words on their own cache lines, each packing
//!   a byte position (low 32 bits) and an item count (high 32 bits), so one
//!   store publishes both. A producer writes its frame into free space and
//!   publishes it with a store of `tail` as its **last** step: a producer killed
//!   mid-put leaves no visible partial frame, and the next producer (told
//!   `OwnerDied` by the mutex) continues from the published tail. A consumer
//!   copies the frame out and advances `head` as its last step: a consumer
//!   killed mid-get leaves the item in the ring for the next one.
//! * Wake-ups: a waiter spins briefly (an adaptive, bounded budget, then a
//!   couple of `sched_yield`s for when both ends share a vCPU), then sleeps on
//!   a futex *while holding its side's mutex*, so at most one producer and one
//!   consumer ever sleep on the ring's futex words; the others queue on the
//!   mutex. The sleeper announces itself (`data.sleeping`, `space.wanted`) and
//!   the other side issues `FUTEX_WAKE` only when somebody sleeps. The
//!   announcement and the index store are sequentially consistent on both sides
//!   (a Dekker pair), so no wake-up is lost; see the loom models at the bottom.
//! * Items whose frame would exceed a quarter of the ring go *out of band*: the
//!   producer `pwrite`s them into a fresh region of the same memfd beyond the
//!   ring and publishes a 32-byte frame naming the region; the consumer
//!   `pread`s the region, punches it out of the file (freeing the memory), and
//!   only then advances `head`. Every region starts with the item's id; a
//!   region punched by a consumer killed before it advanced `head` reads back
//!   as zeros, and the next consumer skips that frame (the dead consumer had
//!   taken the item) instead of returning garbage. A producer killed while
//!   writing a region leaves a record that the next producer uses to punch it.
//!   No descriptor is passed per item, so any number of consumer processes can
//!   take out-of-band items.

use std::time::Instant;

use crate::futex::{self, AtomicU32, WaitOutcome};
#[cfg(loom)]
use loom::sync::atomic::{AtomicU64, fence};
use std::sync::atomic::Ordering::{Relaxed, Release, SeqCst};
#[cfg(not(loom))]
use std::sync::atomic::{AtomicU64, fence};

/// `state`: open for puts.
const OPEN: u32 = 0;
/// `state`: `close` has begun; puts fail, gets still wait (a put may be in flight).
const CLOSING: u32 = 1;
/// `state`: closed; no put is in flight or will ever publish again.
const CLOSED: u32 = 2;

/// A ring position: byte offset (mod 2^32) in the low half, item count (mod
/// 2^32) in the high half.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pos(pub(crate) u64);

impl Pos {
    pub(crate) fn bytes(self) -> u32 {
        self.0 as u32
    }

    pub(crate) fn items(self) -> u32 {
        (self.0 >> 32) as u32
    }

    pub(crate) fn advance(self, bytes: u32, items: u32) -> Pos {
        let items = u64::from(self.items().wrapping_add(items)) << 32;
        Pos(items | u64::from(self.bytes().wrapping_add(bytes)))
    }

    /// Bytes between `self` (a head) and `tail`.
    pub(crate) fn used_bytes(self, tail: Pos) -> u32 {
        tail.bytes().wrapping_sub(self.bytes())
    }

    /// Items between `self` (a head) and `tail`.
    pub(crate) fn used_items(self, tail: Pos) -> u32 {
        tail.items().wrapping_sub(self.items())
    }
}

/// Keeps a word alone on its cache line pair (adjacent-line prefetch pulls
/// 128 bytes on x86).
#[repr(C, align(128))]
#[derive(Default)]
pub(crate) struct Padded<T>(pub(crate) T);

/// Sleeping consumers: a futex sequence word and who waits: [`FUTEX_SLEEPER`]
/// (a consumer or poller asleep on `seq`) and/or [`DOORBELL_ARMED`] (somebody
/// waits on the ring's doorbell descriptor, see `Ring::arm_doorbell`).
#[repr(C)]
#[derive(Default)]
pub(crate) struct DataWait {
    seq: AtomicU32,
    sleeping: AtomicU32,
}

/// `DataWait::sleeping`: somebody sleeps on the futex word.
pub(crate) const FUTEX_SLEEPER: u32 = 1;
/// `DataWait::sleeping`: somebody waits on the doorbell descriptor.
pub(crate) const DOORBELL_ARMED: u32 = 2;

/// A sleeping producer: a futex sequence word and how many free bytes it
/// waits for (0: nobody waits).
#[repr(C)]
#[derive(Default)]
pub(crate) struct SpaceWait {
    seq: AtomicU32,
    wanted: AtomicU64,
}

/// The index and wake-up words of a ring: everything the put/get protocol
/// synchronises on. All-zero bytes are a valid, empty, open ring.
#[repr(C)]
#[derive(Default)]
pub(crate) struct Indices {
    tail: Padded<AtomicU64>,
    head: Padded<AtomicU64>,
    data: Padded<DataWait>,
    space: Padded<SpaceWait>,
    state: Padded<AtomicU32>,
}

impl Indices {
    /// The published tail.
    pub(crate) fn tail(&self) -> Pos {
        Pos(self.tail.0.load(SeqCst))
    }

    /// The published head.
    pub(crate) fn head(&self) -> Pos {
        Pos(self.head.0.load(SeqCst))
    }

    /// Producer (holding the producer lock): makes everything up to `tail`
    /// visible, then wakes the sleeping consumer, if any. Returns whether a
    /// doorbell waiter was armed (the caller rings the doorbell).
    pub(crate) fn publish(&self, tail: Pos) -> bool {
        self.tail.0.store(tail.0, Release);
        // Dekker with `sleep_for_data` (store; fence; load on both sides):
        // either the sleeper sees the new tail, or this load sees its flag.
        // The plain load keeps the common case (nobody sleeps) free of
        // read-modify-writes.
        fence(SeqCst);
        let data = &self.data.0;
        if data.sleeping.load(Relaxed) != 0 {
            let waiters = data.sleeping.swap(0, SeqCst);
            if waiters & FUTEX_SLEEPER != 0 {
                data.seq.fetch_add(1, SeqCst);
                futex::wake_all(&data.seq);
            }
            return waiters & DOORBELL_ARMED != 0;
        }
        false
    }

    /// Consumer (holding the consumer lock, or a poller): sleeps until the
    /// tail moves past `head`, the ring closes, `give_up()` (checked after
    /// the sleep is announced: whoever makes it true bumps the word with
    /// [`wake_consumers`](Self::wake_consumers)), or `deadline`.
    pub(crate) fn sleep_for_data(
        &self,
        head: Pos,
        deadline: Option<Instant>,
        give_up: impl Fn() -> bool,
    ) -> WaitOutcome {
        let data = &self.data.0;
        let seq = data.seq.load(SeqCst);
        data.sleeping.fetch_or(FUTEX_SLEEPER, SeqCst);
        fence(SeqCst);
        if self.tail() != head || self.state.0.load(SeqCst) == CLOSED || give_up() {
            return WaitOutcome::Mismatch;
        }
        futex::wait(&data.seq, seq, deadline)
    }

    /// Consumer (holding the consumer lock): makes the bytes before `head`
    /// free again, then wakes the sleeping producer if it now has the room it
    /// asked for. `capacity` is the ring size in bytes.
    pub(crate) fn release(&self, head: Pos, capacity: u32) {
        self.head.0.store(head.0, Release);
        // Dekker with `sleep_for_space`, as in `publish`.
        fence(SeqCst);
        let space = &self.space.0;
        let wanted = space.wanted.load(Relaxed);
        if wanted != 0 {
            let free = u64::from(capacity.saturating_sub(head.used_bytes(self.tail())));
            if free >= wanted
                && space
                    .wanted
                    .compare_exchange(wanted, 0, SeqCst, SeqCst)
                    .is_ok()
            {
                space.seq.fetch_add(1, SeqCst);
                futex::wake_all(&space.seq);
            }
        }
    }

    /// Producer (holding the producer lock): sleeps until a consumer frees at
    /// least `wanted` bytes (at least 1: any get frees an item slot), the ring
    /// closes, or `deadline`. `has_room` re-checks with the current head.
    pub(crate) fn sleep_for_space(
        &self,
        wanted: u64,
        has_room: impl Fn(Pos) -> bool,
        deadline: Option<Instant>,
    ) -> WaitOutcome {
        let space = &self.space.0;
        let seq = space.seq.load(SeqCst);
        space.wanted.store(wanted.max(1), SeqCst);
        fence(SeqCst);
        if has_room(self.head()) || self.state.0.load(SeqCst) != OPEN {
            space.wanted.store(0, SeqCst);
            return WaitOutcome::Mismatch;
        }
        let outcome = futex::wait(&space.seq, seq, deadline);
        // Only the producer-lock holder sleeps here, so the word is ours.
        space.wanted.store(0, SeqCst);
        outcome
    }

    /// Whether the ring is open for puts.
    pub(crate) fn is_open(&self) -> bool {
        self.state.0.load(SeqCst) == OPEN
    }

    /// Whether the ring is closed for good (gets drain, then fail).
    pub(crate) fn is_closed(&self) -> bool {
        self.state.0.load(SeqCst) == CLOSED
    }

    /// First step of closing: puts start failing and a producer waiting for
    /// space wakes up. Returns whether this call began the close.
    pub(crate) fn begin_close(&self) -> bool {
        let began = self
            .state
            .0
            .compare_exchange(OPEN, CLOSING, SeqCst, SeqCst)
            .is_ok();
        self.space.0.seq.fetch_add(1, SeqCst);
        futex::wake_all(&self.space.0.seq);
        began
    }

    /// Last step of closing, by a producer-lock holder (so no put is in
    /// flight): gets drain what is left, then fail; sleeping consumers wake.
    pub(crate) fn finish_close(&self) {
        if self.state.0.load(SeqCst) != OPEN {
            self.state.0.store(CLOSED, SeqCst);
            self.wake_consumers();
        }
    }

    /// Wakes every consumer and poller (to re-check their condition).
    pub(crate) fn wake_consumers(&self) {
        self.data.0.seq.fetch_add(1, SeqCst);
        futex::wake_all(&self.data.0.seq);
    }

    /// Wakes the producer sleeping for space (to re-check its condition).
    pub(crate) fn wake_producers(&self) {
        self.space.0.seq.fetch_add(1, SeqCst);
        futex::wake_all(&self.space.0.seq);
    }

    /// Whether a consumer (or poller) announced that it sleeps for data.
    #[cfg(test)]
    pub(crate) fn consumer_sleeping(&self) -> bool {
        self.data.0.sleeping.load(SeqCst) != 0
    }

    /// Announces a doorbell waiter: the next publish rings the doorbell.
    /// The caller checks for data after this (the Dekker pair of `publish`).
    pub(crate) fn arm_doorbell(&self) {
        self.data.0.sleeping.fetch_or(DOORBELL_ARMED, SeqCst);
        fence(SeqCst);
    }
}

/// 16 random bytes (the listener's challenges use it too).
pub(crate) use crate::transport::random_bytes as random_token;
pub(crate) use shm_ring::*;

/// The ring in a memfd. Under `cfg(loom)` it compiles (against the models
/// of the futex and the mutex) but only `Indices` is model-checked.
mod shm_ring {
    use std::borrow::Cow;
    use std::fs;
    use std::io;
    use std::marker::PhantomData;
    use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
    use std::os::unix::fs::FileExt;
    use std::ptr::NonNull;
    use std::sync::atomic::Ordering::{Relaxed, Release, SeqCst};
    use std::sync::atomic::{AtomicU32, AtomicU64};
    use std::time::{Duration, Instant};

    use super::{Indices, Padded, Pos};
    use crate::robust::{Acquired, LockFailed, RobustMutex};
    use crate::shm::ShmError;

    /// Bytes of the header page at the start of the file.
    const HEADER_LEN: usize = 4096;
    /// Page size the ring and the out-of-band regions are aligned to.
    const PAGE: u64 = 4096;
    /// "mp-ring2" in ASCII: identifies an initialised ring header.
    const MAGIC: u64 = u64::from_le_bytes(*b"mp-ring2");
    /// Frame header: payload length (low 32 bits) and kind (high 32 bits).
    const FRAME_HEADER: u32 = 8;
    const KIND_INLINE: u32 = 1;
    const KIND_OUT_OF_BAND: u32 = 2;
    /// Payload of an out-of-band frame: region offset, length, item id.
    const OUT_OF_BAND_DESCRIPTOR: u32 = 24;
    /// Header of an out-of-band region: item id and length.
    const REGION_HEADER: u64 = 16;
    /// Smallest and largest ring.
    pub(crate) const MIN_CAPACITY: usize = 4096;
    pub(crate) const MAX_CAPACITY: usize = 1 << 31;
    /// Default ring size: 8 MiB of address space (faulted in as used), so
    /// items up to 2 MiB travel inline.
    pub(crate) const DEFAULT_CAPACITY: usize = 8 << 20;
    /// Largest single read or write Linux performs.
    const MAX_IO: usize = 0x7fff_f000;

    /// What went wrong in the ring; the public types map it to their errors.
    #[derive(Debug, thiserror::Error)]
    pub(crate) enum RingError {
        #[error("closed")]
        Closed,
        #[error("full")]
        Full,
        #[error("empty")]
        Empty,
        #[error("timed out")]
        Timeout,
        #[error("could not encode the item: {0}")]
        Encode(#[source] postcard::Error),
        #[error("the shared ring is corrupted: {0}")]
        Corrupted(String),
        #[error("a handle of another type or an incompatible ring was received: {0}")]
        Incompatible(String),
        #[error("the calling thread is already inside a put or get on this ring")]
        Reentrant,
        #[error("a handle cannot travel inside an item")]
        HandleInItem,
        #[error("{op} failed: {source}")]
        Io {
            op: &'static str,
            #[source]
            source: io::Error,
        },
        #[error(transparent)]
        Shm(#[from] ShmError),
    }

    pub(crate) fn io_error(op: &'static str) -> impl FnOnce(io::Error) -> RingError {
        move |source| RingError::Io { op, source }
    }

    /// How long an operation may wait.
    #[derive(Clone, Copy, Debug)]
    pub(crate) enum Wait {
        /// Not at all (`try_`): fail with `Full`/`Empty` instead.
        Never,
        /// Until this instant: then fail with `Timeout`.
        Until(Instant),
        /// As long as it takes.
        Forever,
    }

    impl Wait {
        pub(crate) fn timeout(timeout: Duration) -> Wait {
            Instant::now()
                .checked_add(timeout)
                .map_or(Wait::Forever, Wait::Until)
        }

        fn deadline(self) -> Option<Instant> {
            match self {
                Wait::Until(deadline) => Some(deadline),
                Wait::Never => Some(Instant::now()),
                Wait::Forever => None,
            }
        }

        fn expired(self) -> bool {
            match self {
                Wait::Never => true,
                Wait::Until(deadline) => Instant::now() >= deadline,
                Wait::Forever => false,
            }
        }
    }

    /// Something a producer can write into the ring.
    pub(crate) trait Encode {
        /// Encodes into `buf`; `Ok(None)` when `buf` is too small.
        fn encode_into(&self, buf: &mut [u8]) -> Result<Option<usize>, RingError>;
        /// The exact encoded length.
        fn encoded_len(&self) -> Result<usize, RingError>;
        /// The encoded bytes in one piece (for the out-of-band path).
        fn encoded(&self) -> Result<Cow<'_, [u8]>, RingError>;
    }

    /// Raw bytes, written as they are.
    pub(crate) struct RawBytes<'a>(pub(crate) &'a [u8]);

    impl Encode for RawBytes<'_> {
        fn encode_into(&self, buf: &mut [u8]) -> Result<Option<usize>, RingError> {
            let Some(dst) = buf.get_mut(..self.0.len()) else {
                return Ok(None);
            };
            dst.copy_from_slice(self.0);
            Ok(Some(self.0.len()))
        }

        fn encoded_len(&self) -> Result<usize, RingError> {
            Ok(self.0.len())
        }

        fn encoded(&self) -> Result<Cow<'_, [u8]>, RingError> {
            Ok(Cow::Borrowed(self.0))
        }
    }

    /// A serde value, encoded with postcard.
    pub(crate) struct Postcard<'a, T: ?Sized>(pub(crate) &'a T);

    impl<T: serde::Serialize + ?Sized> Encode for Postcard<'_, T> {
        fn encode_into(&self, buf: &mut [u8]) -> Result<Option<usize>, RingError> {
            match encoding_item(|| postcard::to_slice(self.0, buf)) {
                Ok(written) => Ok(Some(written.len())),
                Err(RingError::Encode(postcard::Error::SerializeBufferFull)) => Ok(None),
                Err(error) => Err(error),
            }
        }

        fn encoded_len(&self) -> Result<usize, RingError> {
            encoding_item(|| postcard::experimental::serialized_size(self.0))
        }

        fn encoded(&self) -> Result<Cow<'_, [u8]>, RingError> {
            encoding_item(|| postcard::to_stdvec(self.0)).map(Cow::Owned)
        }
    }

    thread_local! {
        /// Set while this thread encodes a queue item or a message; records
        /// whether a handle refused to be encoded into it.
        static ENCODING: std::cell::Cell<Encoding> = const { std::cell::Cell::new(Encoding::Idle) };
    }

    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Encoding {
        Idle,
        Item,
        HandleRefused,
    }

    /// Runs a postcard encoding of an item, marking the thread as doing so.
    fn encoding_item<R>(encode: impl FnOnce() -> postcard::Result<R>) -> Result<R, RingError> {
        struct Reset(Encoding);
        impl Drop for Reset {
            fn drop(&mut self) {
                ENCODING.with(|state| state.set(self.0));
            }
        }
        let _reset = Reset(ENCODING.with(|state| state.replace(Encoding::Item)));
        let result = encode();
        let refused = ENCODING.with(|state| state.get()) == Encoding::HandleRefused;
        match result {
            Ok(value) => Ok(value),
            Err(_) if refused => Err(RingError::HandleInItem),
            Err(error) => Err(RingError::Encode(error)),
        }
    }

    /// For the `Serialize` impls of handles (queues, connections): fails if
    /// the handle is being encoded into a queue item or a message.
    ///
    /// A handle's file descriptors travel only through ipc-channel (as a
    /// process argument); encoded into an item they would not arrive, and
    /// ipc-channel would attach them to the next message this thread sends.
    pub(crate) fn refuse_inside_item<E: serde::ser::Error>() -> Result<(), E> {
        let inside = ENCODING.with(|state| {
            let inside = state.get() != Encoding::Idle;
            if inside {
                state.set(Encoding::HandleRefused);
            }
            inside
        });
        if inside {
            Err(E::custom(
                "handles cannot travel inside queue items or messages",
            ))
        } else {
            Ok(())
        }
    }

    /// A frame's payload as a consumer sees it, valid during the consumer's
    /// callback.
    pub(crate) enum Payload<'a> {
        /// In the ring: borrowed in place.
        Inline(&'a [u8]),
        /// In an out-of-band region: read on demand.
        OutOfBand {
            file: &'a MemFile,
            offset: u64,
            len: usize,
        },
    }

    impl Payload<'_> {
        pub(crate) fn len(&self) -> usize {
            match self {
                Payload::Inline(bytes) => bytes.len(),
                Payload::OutOfBand { len, .. } => *len,
            }
        }

        /// Copies the payload into `buf`, which must be exactly `len()` long.
        pub(crate) fn read_into(&self, buf: &mut [u8]) -> io::Result<()> {
            debug_assert_eq!(buf.len(), self.len());
            match self {
                Payload::Inline(bytes) => {
                    buf.copy_from_slice(bytes);
                    Ok(())
                }
                Payload::OutOfBand { file, offset, .. } => file.read_exact_at(buf, *offset),
            }
        }

        /// The payload as owned bytes.
        pub(crate) fn to_vec(&self) -> io::Result<Vec<u8>> {
            match self {
                Payload::Inline(bytes) => Ok(bytes.to_vec()),
                Payload::OutOfBand { .. } => {
                    let mut buf = vec![0; self.len()];
                    self.read_into(&mut buf)?;
                    Ok(buf)
                }
            }
        }

        /// The payload in one contiguous piece: borrowed when inline.
        pub(crate) fn contiguous(&self) -> io::Result<Cow<'_, [u8]>> {
            match self {
                Payload::Inline(bytes) => Ok(Cow::Borrowed(bytes)),
                Payload::OutOfBand { .. } => self.to_vec().map(Cow::Owned),
            }
        }
    }

    /// Immutable settings, written once by the creator before the segment is
    /// shared.
    #[repr(C)]
    struct Config {
        magic: AtomicU64,
        capacity: AtomicU64,
        /// 0: no item limit.
        max_items: AtomicU64,
        /// Largest frame kept inline.
        max_inline_frame: AtomicU64,
        /// What the handles expect to carry (a hash of the item type's name).
        type_tag: AtomicU64,
    }

    /// Producer-side state, only touched under the producer lock.
    #[repr(C)]
    struct ProducerSide {
        lock: RobustMutex,
        /// A head seen earlier (never ahead of the real one).
        cached_head: AtomicU64,
        /// Next free offset of the out-of-band heap.
        heap_next: AtomicU64,
        next_region_id: AtomicU64,
        /// A region being written: offset, length (0: none), tail at the time.
        pending_offset: AtomicU64,
        pending_len: AtomicU64,
        pending_tail: AtomicU64,
        /// Out-of-band regions published and not yet freed. Incremented
        /// before a frame is published, decremented by the consumer after it
        /// punched the region: a process dying in between leaves it too high,
        /// never too low (the heap then restarts only on an empty ring).
        live_regions: AtomicU64,
    }

    /// Consumer-side state, only touched under the consumer lock.
    #[repr(C)]
    struct ConsumerSide {
        lock: RobustMutex,
        /// A tail seen earlier (never ahead of the real one).
        cached_tail: AtomicU64,
    }

    /// `JoinableQueue` bookkeeping: unfinished tasks = items ever put − `done`.
    #[repr(C)]
    pub(crate) struct Tasks {
        pub(crate) done: crate::futex::AtomicU32,
        pub(crate) seq: crate::futex::AtomicU32,
    }

    #[repr(C)]
    struct Header {
        config: Padded<Config>,
        indices: Indices,
        producer: Padded<ProducerSide>,
        consumer: Padded<ConsumerSide>,
        tasks: Padded<Tasks>,
    }

    #[cfg(not(loom))]
    const _: () = assert!(size_of::<Header>() <= HEADER_LEN);
    const _: () = assert!(std::mem::offset_of!(Header, config) == 0);

    /// Settings of a new ring.
    #[derive(Clone, Copy, Debug)]
    pub(crate) struct RingConfig {
        /// Bytes; rounded up to a power of two between [`MIN_CAPACITY`] and [`MAX_CAPACITY`].
        pub(crate) capacity: usize,
        /// Most items at once (`None`: no limit).
        pub(crate) max_items: Option<u32>,
        /// Checked by [`Ring::attach`].
        pub(crate) type_tag: u64,
        /// Whether the ring has a doorbell descriptor (see [`Ring::doorbell`]).
        pub(crate) doorbell: bool,
    }

    /// A memfd, owned from its creation (or received through the transport),
    /// for growing, reading and writing the file directly.
    #[derive(Debug)]
    pub(crate) struct MemFile {
        file: fs::File,
    }

    impl MemFile {
        /// A new, empty memfd of `len` bytes (close-on-exec).
        pub(crate) fn create(name: &str, len: u64) -> io::Result<MemFile> {
            let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)?;
            let file = MemFile { file: fd.into() };
            file.set_len(len)?;
            Ok(file)
        }

        /// A memfd received from another process.
        pub(crate) fn from_fd(fd: OwnedFd) -> MemFile {
            MemFile { file: fd.into() }
        }

        pub(crate) fn len(&self) -> io::Result<u64> {
            Ok(self.file.metadata()?.len())
        }

        pub(crate) fn set_len(&self, len: u64) -> io::Result<()> {
            self.file.set_len(len)
        }

        pub(crate) fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
            while !buf.is_empty() {
                let chunk = buf.len().min(MAX_IO);
                self.file.read_exact_at(&mut buf[..chunk], offset)?;
                buf = &mut buf[chunk..];
                offset += chunk as u64;
            }
            Ok(())
        }

        pub(crate) fn write_all_at(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
            while !buf.is_empty() {
                let chunk = buf.len().min(MAX_IO);
                self.file.write_all_at(&buf[..chunk], offset)?;
                buf = &buf[chunk..];
                offset += chunk as u64;
            }
            Ok(())
        }

        /// Frees the pages of `[offset, offset + len)`; they read back as zeros.
        pub(crate) fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
            use rustix::fs::FallocateFlags;
            rustix::fs::fallocate(
                &self.file,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                offset,
                len,
            )
            .map_err(io::Error::from)
        }

        pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
            self.file.as_fd()
        }
    }

    /// Adaptive spinning before a futex sleep.
    ///
    /// Spinning pays when the other side runs on another vCPU and answers
    /// within microseconds (waking a sleeper there costs ~30 µs); it hurts
    /// when both share one vCPU (the spinner holds the CPU the answer needs).
    /// So a spin pauses for up to `budget` iterations (20 ns each here), then
    /// yields twice, then gives up; the budget adapts to what happened:
    ///
    /// * ready while pausing: the peer is on another vCPU and quick: double;
    /// * ready after a yield that ran another task (it took a while): the
    ///   peer needed our vCPU: halve; after a yield that returned at once
    ///   (nobody else wanted our vCPU): the pause was just too short: double;
    /// * gave up, and the sleep that followed ended soon ([`SHORT_SLEEP`]):
    ///   a longer spin would have caught it: double;
    /// * gave up, and the sleep was long (an idle peer): halve.
    #[derive(Debug)]
    pub(crate) struct Spinner {
        budget: AtomicU32,
    }

    const SPIN_MIN: u32 = 16;
    const SPIN_MAX: u32 = 1024;
    const SPIN_START: u32 = 256;
    const SPIN_YIELDS: u32 = 2;
    /// A sleep shorter than this (wake-up latency included) means the peer
    /// answered soon after we stopped spinning.
    const SHORT_SLEEP: Duration = Duration::from_micros(200);
    /// A `sched_yield` that takes longer than this let another task run.
    const YIELD_RAN_OTHERS: Duration = Duration::from_micros(2);

    impl Spinner {
        pub(crate) fn new() -> Spinner {
            Spinner {
                budget: AtomicU32::new(SPIN_START),
            }
        }

        fn grow(&self) {
            let budget = self.budget.load(Relaxed);
            self.budget.store((budget * 2).min(SPIN_MAX), Relaxed);
        }

        fn shrink(&self) {
            let budget = self.budget.load(Relaxed);
            self.budget.store((budget / 2).max(SPIN_MIN), Relaxed);
        }

        /// Spins until `ready()` or the budget runs out; returns `ready()`.
        pub(crate) fn spin(&self, ready: impl Fn() -> bool) -> bool {
            for _ in 0..self.budget.load(Relaxed) {
                if ready() {
                    self.grow();
                    return true;
                }
                std::hint::spin_loop();
            }
            for _ in 0..SPIN_YIELDS {
                let before = Instant::now();
                std::thread::yield_now();
                if ready() {
                    if before.elapsed() > YIELD_RAN_OTHERS {
                        self.shrink();
                    } else {
                        self.grow();
                    }
                    return true;
                }
            }
            false
        }

        /// The condition became true after a sleep that began at `since`.
        pub(crate) fn slept(&self, since: Instant) {
            if since.elapsed() < SHORT_SLEEP {
                self.grow();
            } else {
                self.shrink();
            }
        }
    }

    /// A held side lock; unlocks on drop. Not `Send`: the mutex belongs to
    /// the locking thread.
    struct Held<'a> {
        mutex: &'a RobustMutex,
        _not_send: PhantomData<*const ()>,
    }

    impl Drop for Held<'_> {
        fn drop(&mut self) {
            if self.mutex.unlock().is_err() {
                tracing::error!("ring lock released by a thread that does not hold it");
            }
        }
    }

    /// One process's mapping of a ring. Shared by the handles of a process
    /// through an `Arc`.
    pub(crate) struct Ring {
        /// The memfd holding header, ring and heap: what travels to other processes.
        file: MemFile,
        /// An eventfd rung by a publish when a waiter armed it (connections).
        doorbell: Option<OwnedFd>,
        header: NonNull<Header>,
        /// Twice `capacity` bytes: the ring, mapped twice back to back.
        data: NonNull<u8>,
        capacity: u32,
        max_items: u32,
        max_inline_frame: u32,
        spinner: Spinner,
    }

    // SAFETY: the mappings are owned by the Ring and live until it drops; all
    // shared state in them is atomics or robust mutexes, and the ring bytes
    // are only accessed under the protocol (see the module docs), whichever
    // thread does it.
    unsafe impl Send for Ring {}
    // SAFETY: as above: `&Ring` gives no unsynchronised access.
    unsafe impl Sync for Ring {}

    impl std::fmt::Debug for Ring {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Ring")
                .field("capacity", &self.capacity)
                .field("max_items", &self.max_items)
                .field("len", &self.len())
                .finish()
        }
    }

    /// Frame size for a payload of `len` bytes.
    fn frame_len(len: u64) -> u64 {
        u64::from(FRAME_HEADER) + len.next_multiple_of(8)
    }

    impl Ring {
        /// Creates a ring.
        pub(crate) fn create(config: RingConfig) -> Result<Ring, RingError> {
            let capacity = config
                .capacity
                .clamp(MIN_CAPACITY, MAX_CAPACITY)
                .next_power_of_two();
            let file = MemFile::create("mp-ipc-ring", (HEADER_LEN + capacity) as u64)
                .map_err(io_error("memfd_create"))?;
            let doorbell = if config.doorbell {
                let flags =
                    rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK;
                Some(rustix::event::eventfd(0, flags).map_err(|e| io_error("eventfd")(e.into()))?)
            } else {
                None
            };
            let mut ring = Ring::map(file, doorbell, capacity)?;
            let raw = ring.header.as_ptr();
            // SAFETY: the mutexes live in our fresh, zeroed, page-aligned
            // header, which nobody else can see yet; the pointers are derived
            // from the mapping, not from a reference.
            unsafe {
                RobustMutex::init_at(&raw mut (*raw).producer.0.lock, false)
                    .map_err(io_error("pthread_mutex_init"))?;
                RobustMutex::init_at(&raw mut (*raw).consumer.0.lock, false)
                    .map_err(io_error("pthread_mutex_init"))?;
            }
            let header = ring.header();
            let settings = &header.config.0;
            settings.capacity.store(capacity as u64, Relaxed);
            settings
                .max_items
                .store(config.max_items.map_or(0, u64::from), Relaxed);
            settings
                .max_inline_frame
                .store((capacity / 4) as u64, Relaxed);
            settings.type_tag.store(config.type_tag, Relaxed);
            header
                .producer
                .0
                .heap_next
                .store((HEADER_LEN + capacity) as u64, Relaxed);
            header.producer.0.next_region_id.store(1, Relaxed);
            settings.magic.store(MAGIC, Release);
            ring.load_config()?;
            tracing::debug!(capacity, max_items = ?config.max_items, "ring created");
            Ok(ring)
        }

        /// Opens the ring whose descriptors ([`Ring::descriptors`]) were
        /// received from another process (or duplicated here).
        pub(crate) fn attach(
            mut fds: std::vec::IntoIter<OwnedFd>,
            type_tag: u64,
        ) -> Result<Ring, RingError> {
            let file = MemFile::from_fd(
                fds.next()
                    .ok_or_else(|| RingError::Incompatible("no ring descriptor".into()))?,
            );
            let doorbell = fds.next();
            let mut magic = [0u8; 8];
            file.read_exact_at(&mut magic, 0)
                .map_err(io_error("pread"))?;
            if u64::from_ne_bytes(magic) != MAGIC {
                return Err(RingError::Incompatible("not a ring (bad magic)".into()));
            }
            let mut capacity = [0u8; 8];
            file.read_exact_at(&mut capacity, std::mem::offset_of!(Config, capacity) as u64)
                .map_err(io_error("pread"))?;
            let capacity = u64::from_ne_bytes(capacity);
            let capacity = usize::try_from(capacity)
                .ok()
                .filter(|c| c.is_power_of_two() && (MIN_CAPACITY..=MAX_CAPACITY).contains(c))
                .ok_or_else(|| RingError::Corrupted(format!("capacity {capacity}")))?;
            if file.len().map_err(io_error("fstat"))? < (HEADER_LEN + capacity) as u64 {
                return Err(RingError::Corrupted("file shorter than the ring".into()));
            }
            let mut ring = Ring::map(file, doorbell, capacity)?;
            ring.load_config()?;
            if ring.header().config.0.type_tag.load(Relaxed) != type_tag {
                return Err(RingError::Incompatible(
                    "the item type differs from the one it was created with".into(),
                ));
            }
            Ok(ring)
        }

        fn load_config(&mut self) -> Result<(), RingError> {
            let config = &self.header().config.0;
            let max_inline = config.max_inline_frame.load(Relaxed);
            let max_items = config.max_items.load(Relaxed);
            if max_inline < 64
                || max_inline > u64::from(self.capacity)
                || max_items > u64::from(u32::MAX)
            {
                return Err(RingError::Corrupted("bad configuration".into()));
            }
            self.max_inline_frame = max_inline as u32;
            self.max_items = max_items as u32;
            Ok(())
        }

        /// Maps the header and the ring (twice, back to back).
        fn map(
            file: MemFile,
            doorbell: Option<OwnedFd>,
            capacity: usize,
        ) -> Result<Ring, RingError> {
            use rustix::mm::{MapFlags, ProtFlags, mmap, mmap_anonymous, munmap};
            let rw = ProtFlags::READ | ProtFlags::WRITE;
            // SAFETY: fresh mappings at addresses the kernel picks (or inside
            // the reservation made just before); none aliases a Rust object.
            unsafe {
                let header = mmap(
                    std::ptr::null_mut(),
                    HEADER_LEN,
                    rw,
                    MapFlags::SHARED,
                    file.as_fd(),
                    0,
                )
                .map_err(|e| io_error("mmap")(e.into()))?;
                let reserve = match mmap_anonymous(
                    std::ptr::null_mut(),
                    2 * capacity,
                    ProtFlags::empty(),
                    MapFlags::PRIVATE,
                ) {
                    Ok(reserve) => reserve,
                    Err(e) => {
                        let _ = munmap(header, HEADER_LEN);
                        return Err(io_error("mmap")(e.into()));
                    }
                };
                for half in 0..2 {
                    let at = reserve.cast::<u8>().add(half * capacity).cast();
                    if let Err(e) = mmap(
                        at,
                        capacity,
                        rw,
                        MapFlags::SHARED | MapFlags::FIXED,
                        file.as_fd(),
                        HEADER_LEN as u64,
                    ) {
                        let _ = munmap(header, HEADER_LEN);
                        let _ = munmap(reserve, 2 * capacity);
                        return Err(io_error("mmap")(e.into()));
                    }
                }
                Ok(Ring {
                    file,
                    doorbell,
                    header: NonNull::new_unchecked(header.cast()),
                    data: NonNull::new_unchecked(reserve.cast()),
                    capacity: capacity as u32,
                    max_items: 0,
                    max_inline_frame: 0,
                    spinner: Spinner::new(),
                })
            }
        }

        fn header(&self) -> &Header {
            // SAFETY: the header mapping lives as long as `self`; everything
            // in it is atomics, robust mutexes, or plain fields written once
            // before the ring was shared.
            unsafe { self.header.as_ref() }
        }

        pub(crate) fn indices(&self) -> &Indices {
            &self.header().indices
        }

        pub(crate) fn tasks(&self) -> &Tasks {
            &self.header().tasks.0
        }

        /// What travels to another process: the memfd, then the doorbell if any.
        pub(crate) fn descriptors(&self) -> Vec<BorrowedFd<'_>> {
            std::iter::once(self.file.as_fd())
                .chain(self.doorbell.as_ref().map(AsFd::as_fd))
                .collect()
        }

        /// The doorbell: an eventfd that becomes readable when an item is
        /// published after [`arm_doorbell`](Self::arm_doorbell), or when the
        /// ring closes. `None` for rings created without one.
        pub(crate) fn doorbell(&self) -> Option<BorrowedFd<'_>> {
            self.doorbell.as_ref().map(AsFd::as_fd)
        }

        /// Rings the doorbell (wakes whoever polls it).
        pub(crate) fn ring_doorbell(&self) {
            if let Some(doorbell) = &self.doorbell {
                // A full counter (never in practice) is as readable as can be.
                let _ = rustix::io::write(doorbell, &1u64.to_ne_bytes());
            }
        }

        /// Empties the doorbell's counter (before arming it again).
        pub(crate) fn drain_doorbell(&self) {
            if let Some(doorbell) = &self.doorbell {
                let mut counter = [0u8; 8];
                let _ = rustix::io::read(doorbell, &mut counter);
            }
        }

        /// Asks the next publish to ring the doorbell. The caller checks for
        /// data afterwards (see `Indices::arm_doorbell`).
        pub(crate) fn arm_doorbell(&self) {
            self.indices().arm_doorbell();
        }

        /// Ring size in bytes.
        pub(crate) fn capacity(&self) -> usize {
            self.capacity as usize
        }

        /// Most items at once, if limited.
        pub(crate) fn max_items(&self) -> Option<u32> {
            (self.max_items != 0).then_some(self.max_items)
        }

        /// Items in the ring now (a snapshot).
        pub(crate) fn len(&self) -> usize {
            let indices = self.indices();
            let head = indices.head();
            head.used_items(indices.tail()) as usize
        }

        /// Whether a put would have to wait for room now (a snapshot).
        pub(crate) fn is_full(&self) -> bool {
            let indices = self.indices();
            let head = indices.head();
            let tail = indices.tail();
            (self.max_items != 0 && head.used_items(tail) >= self.max_items)
                || self.capacity.saturating_sub(head.used_bytes(tail)) < 2 * FRAME_HEADER
        }

        fn lock<'a>(
            mutex: &'a RobustMutex,
            wait: Wait,
            holder_waits: impl Fn() -> bool,
        ) -> Result<(Held<'a>, Acquired), RingError> {
            let result = match wait {
                Wait::Forever => mutex.lock(None),
                Wait::Until(deadline) => mutex.lock(Some(deadline)),
                // `try_`: the lock is held either by a side waiting for
                // data/room (then the answer is Full/Empty) or by one moving
                // an item (then wait for it, briefly).
                Wait::Never => match mutex.try_lock() {
                    Err(LockFailed::WouldBlock) if holder_waits() => Err(LockFailed::WouldBlock),
                    Err(LockFailed::WouldBlock) => mutex.lock(Some(Instant::now() + TRY_GRACE)),
                    other => other,
                },
            };
            match result {
                Ok(acquired) => Ok((
                    Held {
                        mutex,
                        _not_send: PhantomData,
                    },
                    acquired,
                )),
                Err(LockFailed::TimedOut | LockFailed::WouldBlock) => Err(match wait {
                    Wait::Never => RingError::Full, // callers map to Full/Empty
                    _ => RingError::Timeout,
                }),
                Err(LockFailed::Deadlock) => Err(RingError::Reentrant),
                Err(LockFailed::Os(code)) => Err(RingError::Io {
                    op: "pthread_mutex_lock",
                    source: io::Error::from_raw_os_error(code),
                }),
            }
        }

        fn lock_producer(&self, wait: Wait) -> Result<Held<'_>, RingError> {
            let header = self.header();
            let (held, acquired) = Self::lock(&header.producer.0.lock, wait, || {
                header.indices.space.0.wanted.load(Relaxed) != 0
            })?;
            if acquired == Acquired::OwnerDied {
                self.recover_producer();
            }
            // Holding the producer lock, no put is in flight: a close begun
            // by a process that died before finishing it completes here.
            if !header.indices.is_open() {
                header.indices.finish_close();
            }
            Ok(held)
        }

        fn lock_consumer(&self, wait: Wait) -> Result<Held<'_>, RingError> {
            let header = self.header();
            let (held, acquired) = Self::lock(&header.consumer.0.lock, wait, || {
                header.indices.data.0.sleeping.load(Relaxed) & super::FUTEX_SLEEPER != 0
            })
            .map_err(|e| match e {
                RingError::Full => RingError::Empty,
                other => other,
            })?;
            if acquired == Acquired::OwnerDied {
                // A consumer advances `head` only as its last step: nothing to
                // repair (its cached tail is a tail it saw, still valid).
                tracing::warn!(
                    "a consumer died during a get; its item, if any, is still in the ring"
                );
            }
            Ok(held)
        }

        /// After a producer died holding the lock: free the region it was
        /// writing, unless its frame was published.
        fn recover_producer(&self) {
            let producer = &self.header().producer.0;
            let len = producer.pending_len.load(Relaxed);
            if len != 0 {
                let published = self.indices().tail().0 != producer.pending_tail.load(Relaxed);
                if !published {
                    let offset = producer.pending_offset.load(Relaxed);
                    if let Err(error) = self.file.punch(offset, len) {
                        tracing::warn!(%error, "could not free the region of a producer that died");
                    }
                }
                producer.pending_len.store(0, Relaxed);
            }
            tracing::warn!("a producer died during a put; its unpublished item was discarded");
        }

        fn data_ptr(&self, pos: Pos) -> *mut u8 {
            let offset = (pos.bytes() & (self.capacity - 1)) as usize;
            // SAFETY: offset < capacity, inside the 2 × capacity mapping.
            unsafe { self.data.as_ptr().add(offset) }
        }

        /// `len` bytes of free space at `pos` (the producer lock holder's).
        ///
        /// # Safety
        /// The caller holds the producer lock and `[pos, pos + len)` is free.
        #[allow(clippy::mut_from_ref)]
        unsafe fn free_space(&self, pos: Pos, len: usize) -> &mut [u8] {
            debug_assert!(len <= self.capacity as usize);
            // SAFETY: within the double mapping (offset < capacity, len ≤
            // capacity); free space is touched by nobody but the producer-lock
            // holder until it is published.
            unsafe { std::slice::from_raw_parts_mut(self.data_ptr(pos), len) }
        }

        /// `len` published bytes at `pos` (the consumer lock holder's).
        ///
        /// # Safety
        /// The caller holds the consumer lock and `[pos, pos + len)` is published.
        unsafe fn published(&self, pos: Pos, len: usize) -> &[u8] {
            // SAFETY: as in `free_space`; published bytes are not written
            // again until the head moves past them.
            unsafe { std::slice::from_raw_parts(self.data_ptr(pos), len) }
        }

        /// Puts one item. `liveness`, for connections, tells whether the
        /// reading end is gone; checked while waiting for room.
        pub(crate) fn push(
            &self,
            item: &dyn Encode,
            wait: Wait,
            liveness: Option<&dyn Liveness>,
        ) -> Result<(), RingError> {
            let _held = self.lock_producer(wait)?;
            let indices = self.indices();
            let producer = &self.header().producer.0;
            let tail = Pos(indices.tail.0.load(Relaxed));
            let mut head = Pos(producer.cached_head.load(Relaxed));
            let mut encoded_len = None;
            loop {
                if !indices.is_open() {
                    return Err(RingError::Closed);
                }
                let used = head.used_bytes(tail);
                if used > self.capacity {
                    // Only a process scribbling over the header gets here.
                    return Err(RingError::Corrupted(format!("{used} bytes in use")));
                }
                let free = self.capacity - used;
                let slot_free = self.max_items == 0 || head.used_items(tail) < self.max_items;
                if slot_free && free > FRAME_HEADER {
                    let window = free.min(self.max_inline_frame) - FRAME_HEADER;
                    let payload_at = tail.advance(FRAME_HEADER, 0);
                    // SAFETY: we hold the producer lock and the window lies in
                    // the free space after `tail`.
                    let space = unsafe { self.free_space(payload_at, window as usize) };
                    if let Some(len) = item.encode_into(space)? {
                        self.publish_frame(tail, KIND_INLINE, len as u32);
                        return Ok(());
                    }
                }
                let len = match encoded_len {
                    Some(len) => len,
                    None => *encoded_len.insert(item.encoded_len()?),
                };
                if frame_len(len as u64) > u64::from(self.max_inline_frame) {
                    return self.push_out_of_band(item, len, tail, head, wait, liveness);
                }
                let needed = frame_len(len as u64);
                head = self.wait_for_room(tail, needed, wait, liveness)?;
            }
        }

        /// Writes a frame header for `len` payload bytes at `tail` and
        /// publishes it.
        fn publish_frame(&self, tail: Pos, kind: u32, len: u32) {
            let word = (u64::from(kind) << 32) | u64::from(len);
            // SAFETY: the header slot is free space at the tail (we hold the
            // producer lock), 8-aligned since frames are.
            unsafe { self.data_ptr(tail).cast::<u64>().write(word) };
            let frame = frame_len(u64::from(len)) as u32;
            if self.indices().publish(tail.advance(frame, 1)) {
                self.ring_doorbell();
            }
        }

        /// Waits (spinning, then sleeping) until `needed` bytes and an item
        /// slot are free after `tail`; returns the head that shows it.
        fn wait_for_room(
            &self,
            tail: Pos,
            needed: u64,
            wait: Wait,
            liveness: Option<&dyn Liveness>,
        ) -> Result<Pos, RingError> {
            let indices = self.indices();
            let producer = &self.header().producer.0;
            let has_room = |head: Pos| {
                u64::from(self.capacity.saturating_sub(head.used_bytes(tail))) >= needed
                    && (self.max_items == 0 || head.used_items(tail) < self.max_items)
            };
            let mut slept_since = None;
            loop {
                let head = indices.head();
                producer.cached_head.store(head.0, Relaxed);
                if has_room(head) || !indices.is_open() {
                    if let Some(since) = slept_since {
                        self.spinner.slept(since);
                    }
                    return Ok(head);
                }
                if liveness.is_some_and(|l| l.peer_gone()) {
                    return Err(RingError::Closed);
                }
                if wait.expired() {
                    return Err(match wait {
                        Wait::Never => RingError::Full,
                        _ => RingError::Timeout,
                    });
                }
                if self
                    .spinner
                    .spin(|| has_room(indices.head()) || !indices.is_open())
                {
                    continue;
                }
                if let Some(liveness) = liveness {
                    liveness.before_sleep();
                }
                let gone = || liveness.is_some_and(|l| l.peer_gone());
                slept_since.get_or_insert_with(Instant::now);
                indices.sleep_for_space(needed, |head| has_room(head) || gone(), wait.deadline());
            }
        }

        /// Puts an item too large for the ring into a region of the heap and
        /// a small frame naming it into the ring.
        fn push_out_of_band(
            &self,
            item: &dyn Encode,
            len: usize,
            tail: Pos,
            mut head: Pos,
            wait: Wait,
            liveness: Option<&dyn Liveness>,
        ) -> Result<(), RingError> {
            let indices = self.indices();
            let producer = &self.header().producer.0;
            let frame = frame_len(u64::from(OUT_OF_BAND_DESCRIPTOR));
            // First the room for the frame, so that a timeout leaves nothing behind.
            loop {
                if !indices.is_open() {
                    return Err(RingError::Closed);
                }
                let free = u64::from(self.capacity.saturating_sub(head.used_bytes(tail)));
                if free >= frame && (self.max_items == 0 || head.used_items(tail) < self.max_items)
                {
                    break;
                }
                head = self.wait_for_room(tail, frame, wait, liveness)?;
            }
            let bytes = item.encoded()?;
            if bytes.len() != len {
                return Err(RingError::Corrupted(
                    "the item encoded to a different length twice".into(),
                ));
            }
            // The heap restarts at its beginning when no region is in use:
            // when none is counted live, or when the ring is empty (consumers
            // punch a region before they advance past its frame).
            let heap_start = u64::from(self.capacity) + HEADER_LEN as u64;
            if producer.live_regions.load(SeqCst) == 0 || indices.head() == tail {
                producer.heap_next.store(heap_start, Relaxed);
            }
            let offset = producer.heap_next.load(Relaxed);
            let region_len = REGION_HEADER + len as u64;
            let id = producer.next_region_id.fetch_add(1, Relaxed);
            producer.pending_offset.store(offset, Relaxed);
            producer.pending_tail.store(tail.0, Relaxed);
            producer.pending_len.store(region_len, Relaxed);
            producer
                .heap_next
                .store(offset + region_len.next_multiple_of(PAGE), Relaxed);
            let written = self
                .file
                .write_all_at(&bytes, offset + REGION_HEADER)
                .and_then(|()| {
                    let mut region_header = [0u8; REGION_HEADER as usize];
                    region_header[..8].copy_from_slice(&id.to_le_bytes());
                    region_header[8..].copy_from_slice(&(len as u64).to_le_bytes());
                    self.file.write_all_at(&region_header, offset)
                });
            if let Err(error) = written {
                let _ = self.file.punch(offset, region_len);
                producer.pending_len.store(0, Relaxed);
                return Err(io_error("writing an out-of-band item")(error));
            }
            let mut descriptor = [0u8; OUT_OF_BAND_DESCRIPTOR as usize];
            descriptor[..8].copy_from_slice(&offset.to_le_bytes());
            descriptor[8..16].copy_from_slice(&(len as u64).to_le_bytes());
            descriptor[16..].copy_from_slice(&id.to_le_bytes());
            // SAFETY: we hold the producer lock and made sure `frame` bytes are free.
            unsafe { self.free_space(tail.advance(FRAME_HEADER, 0), descriptor.len()) }
                .copy_from_slice(&descriptor);
            producer.live_regions.fetch_add(1, SeqCst);
            self.publish_frame(tail, KIND_OUT_OF_BAND, OUT_OF_BAND_DESCRIPTOR);
            producer.pending_len.store(0, Relaxed);
            tracing::trace!(len, id, "out-of-band item put");
            Ok(())
        }

        /// Takes one item, handing its payload to `read`. The item is removed
        /// whatever `read` returns (an undecodable item must not wedge the
        /// queue), and also if `read` panics.
        ///
        /// `liveness`, for connections, tells whether the writing end is
        /// gone; it is checked whenever the ring is found empty.
        pub(crate) fn pop<R>(
            &self,
            wait: Wait,
            liveness: Option<&dyn Liveness>,
            read: impl FnOnce(Payload<'_>) -> R,
        ) -> Result<R, RingError> {
            let _held = self.lock_consumer(wait)?;
            let indices = self.indices();
            let consumer = &self.header().consumer.0;
            let mut read = Some(read);
            let mut slept_since = None;
            loop {
                let head = Pos(indices.head.0.load(Relaxed));
                let mut tail = Pos(consumer.cached_tail.load(Relaxed));
                if tail == head {
                    tail = indices.tail();
                    consumer.cached_tail.store(tail.0, Relaxed);
                }
                if tail != head {
                    if let Some(since) = slept_since.take() {
                        self.spinner.slept(since);
                    }
                    let used = head.used_bytes(tail);
                    match self.take_frame(head, used, &mut read)? {
                        Some(result) => return Ok(result),
                        None => continue, // skipped a lost out-of-band item
                    }
                }
                if indices.is_closed() {
                    if indices.tail() != head {
                        continue;
                    }
                    return Err(RingError::Closed);
                }
                if let Some(liveness) = liveness
                    && liveness.peer_gone()
                {
                    if indices.tail() != head {
                        continue;
                    }
                    return Err(RingError::Closed);
                }
                if wait.expired() {
                    return Err(match wait {
                        Wait::Never => RingError::Empty,
                        _ => RingError::Timeout,
                    });
                }
                if self
                    .spinner
                    .spin(|| indices.tail() != head || indices.is_closed())
                {
                    continue;
                }
                if let Some(liveness) = liveness {
                    liveness.before_sleep();
                }
                slept_since.get_or_insert_with(Instant::now);
                indices.sleep_for_data(head, wait.deadline(), || {
                    liveness.is_some_and(|l| l.peer_gone())
                });
            }
        }

        /// Reads the frame at `head` (with `used` bytes published) and
        /// consumes it. `Ok(None)`: it named an out-of-band item that a dead
        /// consumer had already taken; it was skipped.
        fn take_frame<R>(
            &self,
            head: Pos,
            used: u32,
            read: &mut Option<impl FnOnce(Payload<'_>) -> R>,
        ) -> Result<Option<R>, RingError> {
            if used < FRAME_HEADER || used > self.capacity {
                return Err(RingError::Corrupted(format!("{used} bytes published")));
            }
            // SAFETY: at least 8 published, 8-aligned bytes at `head`, ours
            // under the consumer lock.
            let word = unsafe { self.data_ptr(head).cast::<u64>().read() };
            let (kind, len) = ((word >> 32) as u32, word as u32);
            let frame = frame_len(u64::from(len));
            if frame > u64::from(used) {
                return Err(RingError::Corrupted(format!(
                    "frame of {len} bytes, {used} published"
                )));
            }
            let next = head.advance(frame as u32, 1);
            let payload_at = head.advance(FRAME_HEADER, 0);
            // SAFETY: `len` published bytes follow the frame header (checked above).
            let payload = unsafe { self.published(payload_at, len as usize) };
            match kind {
                KIND_INLINE => Ok(Some(self.consume(
                    Payload::Inline(payload),
                    read,
                    None,
                    next,
                ))),
                KIND_OUT_OF_BAND if len == OUT_OF_BAND_DESCRIPTOR => {
                    let field = |i: usize| {
                        u64::from_le_bytes(payload[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
                    };
                    let (offset, item_len, id) = (field(0), field(1), field(2));
                    let mut region_header = [0u8; REGION_HEADER as usize];
                    self.file
                        .read_exact_at(&mut region_header, offset)
                        .map_err(io_error("pread"))?;
                    let region_id =
                        u64::from_le_bytes(region_header[..8].try_into().expect("8 bytes"));
                    let region_len =
                        u64::from_le_bytes(region_header[8..].try_into().expect("8 bytes"));
                    if region_id != id || region_len != item_len {
                        tracing::warn!(
                            id,
                            "skipping an out-of-band item taken by a consumer that died"
                        );
                        self.tasks().done.fetch_add(1, SeqCst);
                        self.indices().release(next, self.capacity);
                        return Ok(None);
                    }
                    // Never trust a length from shared memory with an allocation.
                    let file_len = self.file.len().map_err(io_error("fstat"))?;
                    let end = offset
                        .checked_add(REGION_HEADER)
                        .and_then(|o| o.checked_add(item_len));
                    let len = usize::try_from(item_len)
                        .ok()
                        .filter(|_| end.is_some_and(|end| end <= file_len))
                        .ok_or_else(|| {
                            RingError::Corrupted(format!(
                                "out-of-band item of {item_len} bytes at {offset}"
                            ))
                        })?;
                    let region = (offset, REGION_HEADER + item_len);
                    let payload = Payload::OutOfBand {
                        file: &self.file,
                        offset: offset + REGION_HEADER,
                        len,
                    };
                    Ok(Some(self.consume(payload, read, Some(region), next)))
                }
                _ => Err(RingError::Corrupted(format!(
                    "frame kind {kind} of {len} bytes"
                ))),
            }
        }

        /// Calls `read` on `payload`, frees the out-of-band `region` if any,
        /// then advances the head to `next` — also if `read` panics (the
        /// item is dropped, as a normal return would have consumed it).
        fn consume<R>(
            &self,
            payload: Payload<'_>,
            read: &mut Option<impl FnOnce(Payload<'_>) -> R>,
            region: Option<(u64, u64)>,
            next: Pos,
        ) -> R {
            let read = read.take().expect("one frame is delivered per pop");
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| read(payload)));
            // Punch before advancing: a region is never in use once its frame
            // is behind the head (the heap restarts on an empty ring).
            if let Some((offset, len)) = region {
                if let Err(error) = self.file.punch(offset, len) {
                    tracing::warn!(%error, "could not free an out-of-band region");
                }
                self.header().producer.0.live_regions.fetch_sub(1, SeqCst);
            }
            self.indices().release(next, self.capacity);
            match outcome {
                Ok(result) => result,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }

        /// Whether an item is ready to be taken (a snapshot).
        pub(crate) fn has_data(&self) -> bool {
            let indices = self.indices();
            indices.head() != indices.tail()
        }

        /// Closes the ring: puts fail from now on; gets drain, then fail.
        pub(crate) fn close(&self) -> Result<(), RingError> {
            let indices = self.indices();
            if indices.is_closed() {
                return Ok(());
            }
            indices.begin_close();
            // Wait for a put in flight to finish (a sleeping one has been woken
            // and fails); `lock_producer` completes the close.
            let _held = self.lock_producer(Wait::Forever)?;
            self.ring_doorbell();
            tracing::debug!("ring closed");
            Ok(())
        }

        /// Whether `close` was called (puts fail).
        pub(crate) fn is_closing(&self) -> bool {
            !self.indices().is_open()
        }

        /// Spins then sleeps until the ring has data, is closed, or
        /// `deadline`, without taking anything. `true` when data is there
        /// (or the ring closed or the peer went away). When it finds nothing
        /// ready, it arms the doorbell first (see [`Ring::doorbell`]).
        pub(crate) fn wait_readable(
            &self,
            deadline: Option<Instant>,
            liveness: Option<&dyn Liveness>,
        ) -> bool {
            let indices = self.indices();
            let mut slept_since = None;
            let mut armed = false;
            loop {
                let head = indices.head();
                if indices.tail() != head || indices.is_closed() {
                    if let Some(since) = slept_since {
                        self.spinner.slept(since);
                    }
                    return true;
                }
                if liveness.is_some_and(|l| l.peer_gone()) {
                    return true;
                }
                if !armed && self.doorbell.is_some() {
                    // Drain, arm, look again: a publish after the look rings.
                    self.drain_doorbell();
                    self.arm_doorbell();
                    armed = true;
                    continue;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return false;
                }
                if self
                    .spinner
                    .spin(|| indices.tail() != indices.head() || indices.is_closed())
                {
                    continue;
                }
                if let Some(liveness) = liveness {
                    liveness.before_sleep();
                }
                slept_since.get_or_insert_with(Instant::now);
                indices.sleep_for_data(head, deadline, || liveness.is_some_and(|l| l.peer_gone()));
            }
        }
    }

    /// How long `try_` waits for a side lock held by a put or get that is
    /// moving an item (not waiting for data or room).
    const TRY_GRACE: Duration = Duration::from_millis(20);

    /// Liveness of the other end of a connection, consulted by a reader that
    /// found its ring empty (and a writer that found it full).
    pub(crate) trait Liveness {
        /// Whether every handle of the peer end is known to be gone (a load:
        /// whoever learns it sets it, then wakes the ring's sleepers).
        fn peer_gone(&self) -> bool;
        /// Called before sleeping: makes sure the peer's death will wake the
        /// sleeper (see `liveness::Watch::ensure_watched`).
        fn before_sleep(&self) {}
    }

    impl Drop for Ring {
        fn drop(&mut self) {
            use rustix::mm::munmap;
            // SAFETY: both mappings were made in `map` with these lengths and
            // are unmapped once, here; no reference into them outlives `self`
            // (side locks are only held inside method calls borrowing it).
            unsafe {
                let _ = munmap(self.header.as_ptr().cast(), HEADER_LEN);
                let _ = munmap(self.data.as_ptr().cast(), 2 * self.capacity as usize);
            }
        }
    }

    #[cfg(all(test, not(loom)))]
    mod tests {
        use super::*;
        use std::sync::Arc;

        fn ring(capacity: usize, max_items: Option<u32>) -> Arc<Ring> {
            Arc::new(
                Ring::create(RingConfig {
                    capacity,
                    max_items,
                    type_tag: 7,
                    doorbell: false,
                })
                .unwrap(),
            )
        }

        fn push_bytes(ring: &Ring, bytes: &[u8], wait: Wait) -> Result<(), RingError> {
            ring.push(&RawBytes(bytes), wait, None)
        }

        fn pop_bytes(ring: &Ring, wait: Wait) -> Result<Vec<u8>, RingError> {
            ring.pop(wait, None, |p| p.to_vec().unwrap())
        }

        #[test]
        fn frames_keep_their_boundaries_across_the_wrap() {
            let ring = ring(4096, None);
            for round in 0..200u32 {
                let len = (round * 37 % 700) as usize;
                let item: Vec<u8> = (0..len).map(|i| (i as u32 + round) as u8).collect();
                push_bytes(&ring, &item, Wait::Never).unwrap();
                push_bytes(&ring, b"", Wait::Never).unwrap();
                assert_eq!(ring.len(), 2);
                assert_eq!(pop_bytes(&ring, Wait::Never).unwrap(), item);
                assert_eq!(pop_bytes(&ring, Wait::Never).unwrap(), b"");
            }
            assert!(matches!(
                pop_bytes(&ring, Wait::Never),
                Err(RingError::Empty)
            ));
        }

        #[test]
        fn full_ring_and_item_limit() {
            let ring = ring(4096, Some(3));
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

            let bytes_bound = self::ring(4096, None);
            let mut pushed = 0;
            while push_bytes(&bytes_bound, &[1; 100], Wait::Never).is_ok() {
                pushed += 1;
            }
            assert_eq!(pushed, 4096 / 112);
        }

        #[test]
        fn out_of_band_items_round_trip_and_free_their_pages() {
            let ring = ring(4096, None);
            let big: Vec<u8> = (0..3 << 20).map(|i: u32| (i * 7) as u8).collect();
            push_bytes(&ring, b"before", Wait::Never).unwrap();
            push_bytes(&ring, &big, Wait::Never).unwrap();
            push_bytes(&ring, b"after", Wait::Never).unwrap();
            assert_eq!(ring.len(), 3);
            assert_eq!(pop_bytes(&ring, Wait::Never).unwrap(), b"before");
            assert_eq!(pop_bytes(&ring, Wait::Never).unwrap(), big);
            assert_eq!(pop_bytes(&ring, Wait::Never).unwrap(), b"after");
            // The region's pages were punched out: the file holds ~no data past the ring.
            let stat = rustix::fs::fstat(ring.file.as_fd()).unwrap();
            assert!(
                stat.st_blocks * 512 < 1 << 20,
                "{} bytes still allocated",
                stat.st_blocks * 512
            );
        }

        #[test]
        fn the_heap_restarts_while_the_ring_never_empties() {
            let ring = ring(4096, None);
            let big = vec![5u8; 10_000];
            push_bytes(&ring, b"always one item ahead", Wait::Never).unwrap();
            for _ in 0..100 {
                push_bytes(&ring, &big, Wait::Never).unwrap();
                pop_bytes(&ring, Wait::Never).unwrap();
                push_bytes(&ring, b"small", Wait::Never).unwrap();
                assert_eq!(pop_bytes(&ring, Wait::Never).unwrap(), big);
            }
            let heap_start = (HEADER_LEN + 4096) as u64;
            let next = ring.header().producer.0.heap_next.load(Relaxed);
            assert!(
                next <= heap_start + 3 * PAGE,
                "heap offsets kept growing: {next}"
            );
        }

        #[test]
        fn timeouts_wait_about_their_time() {
            let ring = ring(4096, Some(1));
            let timeout = Duration::from_millis(80);
            let start = Instant::now();
            assert!(matches!(
                pop_bytes(&ring, Wait::timeout(timeout)),
                Err(RingError::Timeout)
            ));
            let waited = start.elapsed();
            assert!(
                waited >= timeout && waited < timeout + Duration::from_secs(2),
                "{waited:?}"
            );
            push_bytes(&ring, b"1", Wait::Never).unwrap();
            let start = Instant::now();
            assert!(matches!(
                push_bytes(&ring, b"2", Wait::timeout(timeout)),
                Err(RingError::Timeout)
            ));
            let waited = start.elapsed();
            assert!(
                waited >= timeout && waited < timeout + Duration::from_secs(2),
                "{waited:?}"
            );
        }

        #[test]
        fn close_fails_puts_and_drains_gets() {
            let ring = ring(4096, None);
            push_bytes(&ring, b"left", Wait::Never).unwrap();
            ring.close().unwrap();
            assert!(matches!(
                push_bytes(&ring, b"late", Wait::Forever),
                Err(RingError::Closed)
            ));
            assert_eq!(pop_bytes(&ring, Wait::Forever).unwrap(), b"left");
            assert!(matches!(
                pop_bytes(&ring, Wait::Forever),
                Err(RingError::Closed)
            ));
        }

        #[test]
        fn close_wakes_a_blocked_consumer_and_producer() {
            let ring = ring(4096, Some(1));
            push_bytes(&ring, b"1", Wait::Never).unwrap();
            let producer = {
                let ring = Arc::clone(&ring);
                std::thread::spawn(move || {
                    push_bytes(&ring, b"2", Wait::timeout(Duration::from_secs(10)))
                })
            };
            let empty = self::ring(4096, None);
            let consumer = {
                let empty = Arc::clone(&empty);
                std::thread::spawn(move || {
                    pop_bytes(&empty, Wait::timeout(Duration::from_secs(10)))
                })
            };
            // Each thread either blocks first or starts after close; both must see Closed.
            ring.close().unwrap();
            empty.close().unwrap();
            assert!(matches!(producer.join().unwrap(), Err(RingError::Closed)));
            assert!(matches!(consumer.join().unwrap(), Err(RingError::Closed)));
        }

        #[test]
        fn threads_lose_and_duplicate_nothing() {
            let ring = ring(4096, Some(16));
            const PER: u32 = 20_000;
            let producers: Vec<_> = (0..3u32)
                .map(|p| {
                    let ring = Arc::clone(&ring);
                    std::thread::spawn(move || {
                        for i in 0..PER {
                            let item = [p.to_le_bytes(), i.to_le_bytes()].concat();
                            push_bytes(&ring, &item, Wait::timeout(Duration::from_secs(20)))
                                .unwrap();
                        }
                    })
                })
                .collect();
            let consumers: Vec<_> = (0..2)
                .map(|_| {
                    let ring = Arc::clone(&ring);
                    std::thread::spawn(move || {
                        let mut seen = Vec::new();
                        while let Ok(item) =
                            pop_bytes(&ring, Wait::timeout(Duration::from_secs(20)))
                        {
                            seen.push((
                                u32::from_le_bytes(item[..4].try_into().unwrap()),
                                u32::from_le_bytes(item[4..].try_into().unwrap()),
                            ));
                        }
                        seen
                    })
                })
                .collect();
            for p in producers {
                p.join().unwrap();
            }
            ring.close().unwrap();
            let mut all = Vec::new();
            for c in consumers {
                let seen = c.join().unwrap();
                // FIFO per producer, as seen by each consumer.
                for p in 0..3 {
                    let mine: Vec<u32> = seen
                        .iter()
                        .filter(|(q, _)| *q == p)
                        .map(|(_, i)| *i)
                        .collect();
                    assert!(mine.windows(2).all(|w| w[0] < w[1]));
                }
                all.extend(seen);
            }
            all.sort_unstable();
            let expected: Vec<(u32, u32)> =
                (0..3).flat_map(|p| (0..PER).map(move |i| (p, i))).collect();
            assert_eq!(all, expected);
        }

        #[test]
        fn a_panicking_reader_drops_the_item_and_leaves_the_ring_usable() {
            let ring = ring(4096, None);
            push_bytes(&ring, b"poison", Wait::Never).unwrap();
            push_bytes(&ring, b"fine", Wait::Never).unwrap();
            let ring2 = Arc::clone(&ring);
            let panicked =
                std::thread::spawn(move || ring2.pop(Wait::Never, None, |_| panic!("bad item")))
                    .join();
            assert!(panicked.is_err());
            assert_eq!(pop_bytes(&ring, Wait::Never).unwrap(), b"fine");
        }

        fn allocated_bytes(ring: &Ring) -> i64 {
            let stat = rustix::fs::fstat(ring.file.as_fd()).unwrap();
            stat.st_blocks as i64 * 512
        }

        #[test]
        fn a_producer_that_died_writing_a_region_has_it_freed_by_the_next() {
            let ring = ring(4096, None);
            let heap_start = (HEADER_LEN + 4096) as u64;
            let before = allocated_bytes(&ring);
            let dying = Arc::clone(&ring);
            // A thread that exits holding the producer lock is, for a robust
            // mutex, exactly a producer killed mid-put.
            std::thread::spawn(move || {
                let held = dying.lock_producer(Wait::Forever).unwrap();
                let producer = &dying.header().producer.0;
                let len = 1 << 20;
                producer.pending_offset.store(heap_start, Relaxed);
                producer
                    .pending_tail
                    .store(dying.indices().tail().0, Relaxed);
                producer.pending_len.store(len, Relaxed);
                dying
                    .file
                    .write_all_at(&vec![1; len as usize], heap_start)
                    .unwrap();
                std::mem::forget(held);
            })
            .join()
            .unwrap();
            assert!(allocated_bytes(&ring) >= before + (1 << 20));
            push_bytes(&ring, b"next", Wait::Never).unwrap();
            assert!(
                allocated_bytes(&ring) < before + (1 << 20),
                "the dead producer's region was freed"
            );
            assert_eq!(ring.header().producer.0.pending_len.load(Relaxed), 0);
            assert_eq!(pop_bytes(&ring, Wait::Never).unwrap(), b"next");
        }

        #[test]
        fn an_out_of_band_item_punched_by_a_dead_consumer_is_skipped() {
            let ring = ring(4096, None);
            let heap_start = (HEADER_LEN + 4096) as u64;
            push_bytes(&ring, &vec![9; 100_000], Wait::Never).unwrap();
            push_bytes(&ring, b"after", Wait::Never).unwrap();
            // A consumer frees the region, then dies before advancing the head.
            ring.file.punch(heap_start, 200_000).unwrap();
            let done_before = ring.tasks().done.load(SeqCst);
            assert_eq!(pop_bytes(&ring, Wait::Never).unwrap(), b"after");
            assert_eq!(
                ring.tasks().done.load(SeqCst),
                done_before + 1,
                "the lost item counts as done"
            );
            assert!(matches!(
                pop_bytes(&ring, Wait::Never),
                Err(RingError::Empty)
            ));
        }

        #[test]
        fn a_corrupted_frame_is_an_error_not_a_panic() {
            let ring = ring(4096, None);
            push_bytes(&ring, b"fine", Wait::Never).unwrap();
            // Scribble a frame header claiming more bytes than were published.
            // SAFETY: the test owns the ring; nobody else reads it.
            unsafe {
                ring.data_ptr(Pos(0))
                    .cast::<u64>()
                    .write((1u64 << 32) | 4000)
            };
            assert!(matches!(
                pop_bytes(&ring, Wait::Never),
                Err(RingError::Corrupted(_))
            ));
        }

        #[test]
        fn attach_checks_the_type_tag() {
            let ring = ring(4096, None);
            let copies = || {
                ring.descriptors()
                    .iter()
                    .map(|fd| fd.try_clone_to_owned().unwrap())
                    .collect::<Vec<_>>()
                    .into_iter()
            };
            assert!(matches!(
                Ring::attach(copies(), 8),
                Err(RingError::Incompatible(_))
            ));
            let same = Ring::attach(copies(), 7).unwrap();
            push_bytes(&ring, b"shared", Wait::Never).unwrap();
            assert_eq!(pop_bytes(&same, Wait::Never).unwrap(), b"shared");
        }
    }
}

#[cfg(all(test, loom))]
mod loom_models {
    //! Model checks of the index and wake-up protocol (`Indices`), with
    //! loom's model of the futex: a lost wake-up shows up as a deadlock.

    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    /// Ring capacity in the model, in "bytes" (each item takes one).
    const CAPACITY: u32 = 1;

    /// Explores every interleaving with up to 5 preemptions (the complete
    /// search does not finish in reasonable time; lost wake-ups need 1 or 2).
    fn model(body: impl Fn() + Sync + Send + 'static) {
        let mut builder = loom::model::Builder::new();
        builder.preemption_bound = Some(5);
        builder.check(body);
    }

    fn put(indices: &Indices) {
        let tail = indices.tail();
        loop {
            let has_room = |head: Pos| CAPACITY - head.used_bytes(tail) >= 1;
            if has_room(indices.head()) {
                indices.publish(tail.advance(1, 1));
                return;
            }
            indices.sleep_for_space(1, has_room, None);
        }
    }

    /// Takes one item; `false` when the ring is closed and empty.
    fn get(indices: &Indices) -> bool {
        loop {
            let head = indices.head();
            if indices.tail() != head {
                indices.release(head.advance(1, 1), CAPACITY);
                return true;
            }
            if indices.is_closed() {
                return indices.tail() != head && get(indices);
            }
            indices.sleep_for_data(head, None, || false);
        }
    }

    #[test]
    fn loom_ring_no_lost_wakeup_when_full_and_empty() {
        model(|| {
            let indices = Arc::new(Indices::default());
            let producer = {
                let indices = Arc::clone(&indices);
                thread::spawn(move || {
                    for _ in 0..3 {
                        put(&indices);
                    }
                })
            };
            for _ in 0..3 {
                assert!(get(&indices));
            }
            producer.join().unwrap();
            assert_eq!(indices.head(), indices.tail());
        });
    }

    #[test]
    fn loom_ring_close_wakes_consumer_after_draining() {
        model(|| {
            let indices = Arc::new(Indices::default());
            let producer = {
                let indices = Arc::clone(&indices);
                thread::spawn(move || {
                    put(&indices);
                    indices.begin_close();
                    indices.finish_close();
                })
            };
            assert!(get(&indices), "the item put before close is delivered");
            assert!(
                !get(&indices),
                "then the consumer learns the ring is closed"
            );
            producer.join().unwrap();
        });
    }

    #[test]
    fn loom_ring_close_wakes_producer_waiting_for_room() {
        model(|| {
            let indices = Arc::new(Indices::default());
            indices.publish(indices.tail().advance(1, 1)); // full
            let producer = {
                let indices = Arc::clone(&indices);
                thread::spawn(move || {
                    let tail = indices.tail();
                    let has_room = |head: Pos| CAPACITY - head.used_bytes(tail) >= 1;
                    while !has_room(indices.head()) && indices.is_open() {
                        indices.sleep_for_space(1, has_room, None);
                    }
                })
            };
            indices.begin_close();
            producer.join().unwrap();
        });
    }
}
