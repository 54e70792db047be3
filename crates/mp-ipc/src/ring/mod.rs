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
//! * Large items (16-256 KiB frames) *wrap early* while the consumer keeps
//!   up: past the first 1 MiB of a lap, the producer publishes a skip frame
//!   over the rest of the lap together with the item at the start of the next
//!   one, so that a stream of them cycles through 1 MiB of the ring instead
//!   of all of it (`wrap.rs` says why and when).

mod codec;
mod frames;
mod heap;
mod indices;
#[cfg(all(test, loom))]
mod loom_models;
mod memory;
#[cfg(all(test, not(loom)))]
mod miri_tests;
#[cfg(all(test, not(loom)))]
mod proptests;
mod spinner;
mod wrap;

/// 16 random bytes (the listener's challenges use it too).
pub(crate) use crate::transport::random_bytes as random_token;
pub(crate) use codec::{Encode, Payload, Postcard, RawBytes};
pub(crate) use indices::{FUTEX_SLEEPER, Indices, Padded, Pos};
pub(crate) use memory::MemFile;
use memory::Source;
pub(crate) use spinner::Spinner;

use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::Ordering::{Relaxed, Release};
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::{Duration, Instant};

use crate::message_handles::Carrier;
use crate::robust::{Acquired, LockFailed, RobustMutex};
use frames::{FRAME_HEADER, KIND_INLINE, frame_len};
use wrap::EarlyWrap;

/// Bytes of the header page at the start of the file.
pub(crate) const HEADER_LEN: usize = 4096;
/// Page size the ring and the out-of-band regions are aligned to.
const PAGE: u64 = 4096;
/// "mp-ring3" in ASCII: identifies an initialised ring header (3: frames
/// may be skip frames, see `wrap.rs`).
const MAGIC: u64 = u64::from_le_bytes(*b"mp-ring3");
/// Smallest and largest ring.
pub(crate) const MIN_CAPACITY: usize = 4096;
pub(crate) const MAX_CAPACITY: usize = 1 << 31;
/// Default ring size: 8 MiB of address space (faulted in as used), so
/// items up to 2 MiB travel inline.
pub(crate) const DEFAULT_CAPACITY: usize = 8 << 20;

/// The capacity a ring asked for `requested` bytes gets: a power of two
/// (so that it divides 2^32 and offsets follow positions across their
/// wrap) between [`MIN_CAPACITY`] and [`MAX_CAPACITY`].
fn rounded_capacity(requested: usize) -> usize {
    requested
        .clamp(MIN_CAPACITY, MAX_CAPACITY)
        .next_power_of_two()
}

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
    /// Shared with the other segments of a growing queue (`queue/segments.rs`).
    file: Arc<MemFile>,
    /// An eventfd rung by a publish when a waiter armed it (connections).
    doorbell: Option<Arc<OwnedFd>>,
    /// Where the descriptors of handles inside items travel (queues; see
    /// [`message_handles`](crate::message_handles)); shared by the segments
    /// of a growing queue, so that parcels queue in item order.
    parcels: Option<Arc<Parcels>>,
    /// Where this ring's header starts in `file` (0 but for the later
    /// segments of a growing queue); its heap starts after its ring.
    base: u64,
    header: NonNull<Header>,
    /// Twice `capacity` bytes: the ring, mapped twice back to back.
    data: NonNull<u8>,
    /// How `header` and `data` were obtained (and are given back).
    source: Source,
    capacity: u32,
    max_items: u32,
    max_inline_frame: u32,
    spinner: Spinner,
    /// Bytes of the last inline frame this process put: what the next is
    /// expected to be, for the early wrap (`wrap.rs`).
    last_frame: AtomicU32,
}

/// The two ends of a ring's `SOCK_SEQPACKET` socket pair for the
/// descriptors of handles inside items: every handle of the ring holds both.
struct Parcels {
    send: OwnedFd,
    receive: OwnedFd,
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

impl Ring {
    /// Creates a ring.
    pub(crate) fn create(config: RingConfig) -> Result<Ring, RingError> {
        let capacity = rounded_capacity(config.capacity);
        let file = MemFile::create("mp-ipc-ring", (HEADER_LEN + capacity) as u64)
            .map_err(io_error("memfd_create"))?;
        let doorbell = if config.doorbell {
            let flags =
                rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK;
            Some(rustix::event::eventfd(0, flags).map_err(|e| io_error("eventfd")(e.into()))?)
        } else {
            None
        };
        let ring = Ring::map(Arc::new(file), doorbell.map(Arc::new), 0, capacity)?;
        ring.initialise(config)
    }

    /// Creates a ring whose header starts at `base` in `file` (a later
    /// segment of a growing queue, see `queue/segments.rs`), sharing the
    /// file, the doorbell and the parcel sockets of the `first`. Whatever
    /// `[base, base + header + capacity)` held is discarded. The caller makes
    /// sure nobody else uses that range.
    pub(crate) fn create_at(
        first: &Ring,
        base: u64,
        config: RingConfig,
    ) -> Result<Ring, RingError> {
        let file = &first.file;
        let capacity = config
            .capacity
            .clamp(MIN_CAPACITY, MAX_CAPACITY)
            .next_power_of_two();
        let end = base + (HEADER_LEN + capacity) as u64;
        if file.len().map_err(io_error("fstat"))? < end {
            file.set_len(end).map_err(io_error("ftruncate"))?;
        }
        // A grower that died half-way may have left a partial header.
        file.punch(base, (HEADER_LEN + capacity) as u64)
            .map_err(io_error("fallocate"))?;
        let mut ring = Ring::map(Arc::clone(file), first.doorbell.clone(), base, capacity)?;
        ring.parcels = first.parcels.clone();
        ring.initialise(config)
    }

    /// Opens the ring whose header starts at `base` in `file` (made by
    /// [`create_at`](Self::create_at), here or in another process).
    pub(crate) fn attach_at(first: &Ring, base: u64, type_tag: u64) -> Result<Ring, RingError> {
        let mut ring = Ring::open(
            Arc::clone(&first.file),
            first.doorbell.clone(),
            base,
            type_tag,
        )?;
        ring.parcels = first.parcels.clone();
        Ok(ring)
    }

    /// The memfd (shared by every segment of a growing queue).
    pub(crate) fn file(&self) -> &Arc<MemFile> {
        &self.file
    }

    /// Where this ring's header starts in its file.
    pub(crate) fn base(&self) -> u64 {
        self.base
    }

    /// A ring whose memory comes from the heap (no memfd, no mapping, no
    /// doorbell): for tests of the protocol, and for Miri.
    #[cfg(test)]
    pub(crate) fn create_on_heap(config: RingConfig) -> Result<Ring, RingError> {
        use std::alloc::{Layout, alloc_zeroed, dealloc};
        let capacity = rounded_capacity(config.capacity);
        let header_layout = Layout::from_size_align(HEADER_LEN, PAGE as usize).expect("layout");
        let data_layout =
            Layout::from_size_align(2 * capacity, PAGE as usize).expect("ring layout");
        // SAFETY: both layouts have a non-zero size.
        let (header, data) = unsafe { (alloc_zeroed(header_layout), alloc_zeroed(data_layout)) };
        let (Some(header), Some(data)) = (NonNull::new(header), NonNull::new(data)) else {
            // SAFETY: whichever allocation succeeded is given back with its layout.
            unsafe {
                if !header.is_null() {
                    dealloc(header, header_layout);
                }
                if !data.is_null() {
                    dealloc(data, data_layout);
                }
            }
            return Err(io_error("alloc")(io::ErrorKind::OutOfMemory.into()));
        };
        let ring = Ring {
            file: Arc::new(MemFile::on_heap((HEADER_LEN + capacity) as u64)),
            doorbell: None,
            parcels: None,
            base: 0,
            header: header.cast(),
            data,
            source: Source::Heap,
            capacity: capacity as u32,
            max_items: 0,
            max_inline_frame: 0,
            spinner: Spinner::new(),
            last_frame: AtomicU32::new(0),
        };
        ring.initialise(config)
    }

    /// Initialises the fresh, zeroed header of a new ring.
    fn initialise(mut self, config: RingConfig) -> Result<Ring, RingError> {
        let capacity = self.capacity as usize;
        let ring = &mut self;
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
            .store(ring.base + (HEADER_LEN + capacity) as u64, Relaxed);
        header.producer.0.next_region_id.store(1, Relaxed);
        settings.magic.store(MAGIC, Release);
        ring.load_config()?;
        tracing::debug!(capacity, max_items = ?config.max_items, "ring created");
        Ok(self)
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
        let parcels = match (fds.next(), fds.next()) {
            (Some(send), Some(receive)) => Some(Arc::new(Parcels { send, receive })),
            (None, None) => None,
            _ => return Err(RingError::Incompatible("half a parcel socket".into())),
        };
        let mut ring = Ring::open(Arc::new(file), doorbell.map(Arc::new), 0, type_tag)?;
        ring.parcels = parcels;
        Ok(ring)
    }

    /// Checks and maps the ring whose header starts at `base` in `file`.
    fn open(
        file: Arc<MemFile>,
        doorbell: Option<Arc<OwnedFd>>,
        base: u64,
        type_tag: u64,
    ) -> Result<Ring, RingError> {
        let mut magic = [0u8; 8];
        file.read_exact_at(&mut magic, base)
            .map_err(io_error("pread"))?;
        if u64::from_ne_bytes(magic) != MAGIC {
            return Err(RingError::Incompatible("not a ring (bad magic)".into()));
        }
        let mut capacity = [0u8; 8];
        file.read_exact_at(
            &mut capacity,
            base + std::mem::offset_of!(Config, capacity) as u64,
        )
        .map_err(io_error("pread"))?;
        let capacity = u64::from_ne_bytes(capacity);
        let capacity = usize::try_from(capacity)
            .ok()
            .filter(|c| c.is_power_of_two() && (MIN_CAPACITY..=MAX_CAPACITY).contains(c))
            .ok_or_else(|| RingError::Corrupted(format!("capacity {capacity}")))?;
        if file.len().map_err(io_error("fstat"))? < base + (HEADER_LEN + capacity) as u64 {
            return Err(RingError::Corrupted("file shorter than the ring".into()));
        }
        let mut ring = Ring::map(file, doorbell, base, capacity)?;
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
        file: Arc<MemFile>,
        doorbell: Option<Arc<OwnedFd>>,
        base: u64,
        capacity: usize,
    ) -> Result<Ring, RingError> {
        use rustix::mm::{MapFlags, ProtFlags, mmap, mmap_anonymous, munmap};
        let rw = ProtFlags::READ | ProtFlags::WRITE;
        let fd = file
            .as_fd()
            .ok_or_else(|| RingError::Incompatible("a heap ring cannot be mapped".into()))?;
        // SAFETY: fresh mappings at addresses the kernel picks (or inside
        // the reservation made just before); none aliases a Rust object.
        unsafe {
            let header = mmap(
                std::ptr::null_mut(),
                HEADER_LEN,
                rw,
                MapFlags::SHARED,
                fd,
                base,
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
                    fd,
                    base + HEADER_LEN as u64,
                ) {
                    let _ = munmap(header, HEADER_LEN);
                    let _ = munmap(reserve, 2 * capacity);
                    return Err(io_error("mmap")(e.into()));
                }
            }
            Ok(Ring {
                file,
                doorbell,
                parcels: None,
                base,
                header: NonNull::new_unchecked(header.cast()),
                data: NonNull::new_unchecked(reserve.cast()),
                source: Source::Mapped,
                capacity: capacity as u32,
                max_items: 0,
                max_inline_frame: 0,
                spinner: Spinner::new(),
                last_frame: AtomicU32::new(0),
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

    /// Gives the ring a socket pair on which the descriptors of handles
    /// inside its items travel (see [`message_handles`](crate::message_handles)).
    pub(crate) fn with_parcels(mut self) -> Result<Ring, RingError> {
        let (send, receive) =
            crate::message_handles::parcel_socket().map_err(io_error("socketpair"))?;
        self.parcels = Some(Arc::new(Parcels { send, receive }));
        Ok(self)
    }

    /// What travels to another process: the memfd, then the doorbell and the
    /// parcel sockets if any.
    pub(crate) fn descriptors(&self) -> Vec<BorrowedFd<'_>> {
        self.file
            .as_fd()
            .into_iter()
            .chain(self.doorbell.as_deref().map(AsFd::as_fd))
            .chain(
                self.parcels
                    .iter()
                    .flat_map(|p| [p.send.as_fd(), p.receive.as_fd()]),
            )
            .collect()
    }

    /// The doorbell: an eventfd that becomes readable when an item is
    /// published after [`arm_doorbell`](Self::arm_doorbell), or when the
    /// ring closes. `None` for rings created without one.
    pub(crate) fn doorbell(&self) -> Option<BorrowedFd<'_>> {
        self.doorbell.as_deref().map(AsFd::as_fd)
    }

    /// Rings the doorbell (wakes whoever polls it).
    pub(crate) fn ring_doorbell(&self) {
        if let Some(doorbell) = self.doorbell.as_deref() {
            // A full counter (never in practice) is as readable as can be.
            let _ = rustix::io::write(doorbell, &1u64.to_ne_bytes());
        }
    }

    /// Empties the doorbell's counter (before arming it again).
    pub(crate) fn drain_doorbell(&self) {
        if let Some(doorbell) = self.doorbell.as_deref() {
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
            header.indices.data.0.sleeping.load(Relaxed) & FUTEX_SLEEPER != 0
        })
        .map_err(|e| match e {
            RingError::Full => RingError::Empty,
            other => other,
        })?;
        if acquired == Acquired::OwnerDied {
            // A consumer advances `head` only as its last step: nothing to
            // repair (its cached tail is a tail it saw, still valid).
            tracing::warn!("a consumer died during a get; its item, if any, is still in the ring");
        }
        Ok(held)
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
        self.push_frame(item, self.carrier(), wait, wait, liveness)
    }

    /// Puts one item whose handles' descriptors go to `carrier` (a
    /// connection's writers' presence socket) instead of the ring's own
    /// parcel socket.
    pub(crate) fn push_carried(
        &self,
        item: &dyn Encode,
        carrier: BorrowedFd<'_>,
        wait: Wait,
        liveness: Option<&dyn Liveness>,
    ) -> Result<(), RingError> {
        self.push_frame(item, Some(carrier), wait, wait, liveness)
    }

    /// Where the descriptors of handles inside items go: the ring's parcel
    /// socket (queues), if any.
    #[inline]
    fn carrier(&self) -> Carrier<'_> {
        self.parcels.as_deref().map(|parcels| parcels.send.as_fd())
    }

    /// Puts one item, waiting for the producer lock per `lock_wait` but for
    /// room only per `room_wait` ([`RingError::Full`] or `Timeout` then). For
    /// a growing queue, which moves on to a new segment instead.
    #[inline]
    pub(crate) fn push_waiting(
        &self,
        item: &dyn Encode,
        lock_wait: Wait,
        wait: Wait,
        liveness: Option<&dyn Liveness>,
    ) -> Result<(), RingError> {
        self.push_frame(item, self.carrier(), lock_wait, wait, liveness)
    }

    fn push_frame(
        &self,
        item: &dyn Encode,
        carrier: Carrier<'_>,
        lock_wait: Wait,
        wait: Wait,
        liveness: Option<&dyn Liveness>,
    ) -> Result<(), RingError> {
        let _held = self.lock_producer(lock_wait)?;
        let indices = self.indices();
        let producer = &self.header().producer.0;
        let tail = Pos(indices.tail.0.load(Relaxed));
        let mut head = Pos(producer.cached_head.load(Relaxed));
        let mut encoded_len = None;
        let mut wrap = self.early_wrap(tail);
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
            // Large items start the next lap early when the consumer keeps
            // up (`wrap.rs`); tried once, before the usual place, out of line.
            if let Some(skip) = wrap.take()
                && slot_free
            {
                match self.put_after_skip(item, carrier, tail, head, skip, wait)? {
                    EarlyWrap::Put => return Ok(()),
                    EarlyWrap::Larger { seen } => {
                        // Larger than predicted: put where it always goes.
                        head = seen;
                        continue;
                    }
                    EarlyWrap::NoRoom => {}
                }
            }
            // `>=`: with exactly a header of room an empty item still fits
            // (the wait for room below agrees, so `>` spun forever there).
            if slot_free && free >= FRAME_HEADER {
                let window = free.min(self.max_inline_frame) - FRAME_HEADER;
                let payload_at = tail.advance(FRAME_HEADER, 0);
                // SAFETY: we hold the producer lock and the window lies in
                // the free space after `tail`.
                let space = unsafe { self.free_space(payload_at, window as usize) };
                if let Some(len) = item.encode_into(space, carrier)? {
                    self.publish_frame(tail, KIND_INLINE, len as u32);
                    self.last_frame.store(frame_len(len as u64) as u32, Relaxed);
                    return Ok(());
                }
            }
            let len = match encoded_len {
                Some(len) => len,
                None => *encoded_len.insert(item.encoded_len(carrier)?),
            };
            if frame_len(len as u64) > u64::from(self.max_inline_frame) {
                return self.push_out_of_band((item, carrier), len, tail, head, wait, liveness);
            }
            let needed = frame_len(len as u64);
            head = self.wait_for_room(tail, needed, wait, liveness)?;
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
        match &self.parcels {
            Some(parcels) => self.pop_frame(wait, liveness, |payload| {
                crate::message_handles::receiving(parcels.receive.as_fd(), || read(payload))
            }),
            None => self.pop_frame(wait, liveness, read),
        }
    }

    fn pop_frame<R>(
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
        let data_len = 2 * self.capacity as usize;
        match self.source {
            // SAFETY: both mappings were made in `map` with these lengths and
            // are unmapped once, here; no reference into them outlives `self`
            // (side locks are only held inside method calls borrowing it).
            Source::Mapped => unsafe {
                let _ = rustix::mm::munmap(self.header.as_ptr().cast(), HEADER_LEN);
                let _ = rustix::mm::munmap(self.data.as_ptr().cast(), data_len);
            },
            // SAFETY: allocated in `create_on_heap` with these layouts, given
            // back once, here; nothing borrows them any more.
            Source::Heap => unsafe {
                use std::alloc::{Layout, dealloc};
                let page = PAGE as usize;
                dealloc(
                    self.header.as_ptr().cast(),
                    Layout::from_size_align_unchecked(HEADER_LEN, page),
                );
                dealloc(
                    self.data.as_ptr(),
                    Layout::from_size_align_unchecked(data_len, page),
                );
            },
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::Ordering::SeqCst;

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
        let stat = rustix::fs::fstat(ring.file.as_fd().unwrap()).unwrap();
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
    fn threads_lose_and_duplicate_nothing() {
        let ring = ring(4096, Some(16));
        const PER: u32 = 20_000;
        let producers: Vec<_> = (0..3u32)
            .map(|p| {
                let ring = Arc::clone(&ring);
                std::thread::spawn(move || {
                    for i in 0..PER {
                        let item = [p.to_le_bytes(), i.to_le_bytes()].concat();
                        push_bytes(&ring, &item, Wait::timeout(Duration::from_secs(20))).unwrap();
                    }
                })
            })
            .collect();
        let consumers: Vec<_> = (0..2)
            .map(|_| {
                let ring = Arc::clone(&ring);
                std::thread::spawn(move || {
                    let mut seen = Vec::new();
                    while let Ok(item) = pop_bytes(&ring, Wait::timeout(Duration::from_secs(20))) {
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
            std::thread::spawn(move || ring2.pop(Wait::Never, None, |_| panic!("bad item"))).join();
        assert!(panicked.is_err());
        assert_eq!(pop_bytes(&ring, Wait::Never).unwrap(), b"fine");
    }

    fn allocated_bytes(ring: &Ring) -> i64 {
        let stat = rustix::fs::fstat(ring.file.as_fd().unwrap()).unwrap();
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
