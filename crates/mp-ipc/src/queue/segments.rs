//! The memory of a queue: a chain of rings (*segments*) in one memfd, so
//! that an unbounded queue grows instead of making `put` wait.
//!
//! # Layout
//!
//! ```text
//! memfd slot 0     [0, 2^40)            segment 0: header, ring, out-of-band heap
//! memfd slot 1     [2^40, 2^40 + 4096)  the directory (below)
//! memfd slot k + 1 [(k+1) 2^40, ...)    segment k ≥ 1, created when segment k - 1 filled up
//! ```
//!
//! Every segment is an ordinary [`Ring`] whose header starts at its slot; the
//! file is sparse, so a slot costs nothing until written. Segments live in the
//! queue's one memfd, so the descriptors that every handle already holds (the
//! memfd and the doorbell, lent through the [transport](crate::transport) like
//! any queue's) reach every new segment: growing passes no descriptor.
//!
//! # Growing
//!
//! A put into an unbounded queue never waits for room longer than
//! [`GROWTH_GRACE`] (10 ms, for consumers that keep up: growing costs fresh
//! pages): when the producer segment `p` is still full, the producer takes the directory's robust `grow_lock`,
//! creates segment `p + 1` (twice the size of `p`, at most [`GROWTH_LIMIT`]),
//! publishes `producer_segment = p + 1`, then *seals* `p` by closing its ring
//! (which waits for a put in flight in `p` and wakes its sleepers). A put that
//! finds its segment closed moves on to `producer_segment`, and before its
//! first put into a segment a process seals the one before it (a grower that
//! died between publishing and sealing is thus completed by the next producer
//! to move on: no item lands in `p + 1` while `p` is open to consumers).
//!
//! A get drains its segment; a sealed segment drained (the ring reports
//! `Closed`) with `producer_segment` beyond it is *retired*: exactly one
//! consumer advances the directory's `floor` past it (one CAS, which also adds
//! the segment's item count to `retired_items`) and punches its ring out of the
//! file (the memory goes back to the system; the header page stays, so a late
//! handle still reads "sealed"). Consumers then move on to the next segment, in
//! order: FIFO per producer holds across segments. A closed ring with nothing
//! beyond it means the queue was shut down.
//!
//! Shutdown sets the directory's `shutdown` word, then closes every segment
//! from the floor to the producer segment (under `grow_lock`, so no segment
//! appears behind it).
//!
//! A bounded queue is the same with one segment that never grows (its puts wait
//! for room in it): its put and get paths are one pointer load longer than a
//! lone ring's.
//!
//! Each process maps the segments it uses and keeps the mappings (address
//! space, no memory once punched) until its last handle of the queue drops, so
//! that the current-segment pointers need no reclamation scheme.

use std::collections::HashMap;
use std::os::fd::BorrowedFd;
use std::ptr::NonNull;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};
use std::sync::atomic::{AtomicPtr, AtomicU64};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use super::QueueError;
use super::holders::Holders;
use crate::futex::{self, AtomicU32};
use crate::liveness::Watch;
use crate::ring::{
    DEFAULT_CAPACITY, Encode, Liveness, Payload, Ring, RingConfig, RingError, Tasks, Wait, io_error,
};
use crate::robust::{Acquired, LockFailed, RobustMutex};

/// Bytes of memfd given to each segment (its header, ring and heap).
const SLOT: u64 = 1 << 40;
/// Where the directory page starts.
const DIRECTORY_AT: u64 = SLOT;
const DIRECTORY_LEN: usize = 4096;
/// "mp-qdir1": identifies an initialised directory.
const DIRECTORY_MAGIC: u64 = u64::from_le_bytes(*b"mp-qdir1");
/// Largest segment made by growing (the first may be larger if asked).
pub(crate) const GROWTH_LIMIT: usize = 64 << 20;
/// How long a put into a full segment waits for a consumer to make room
/// before the queue grows: consumers that keep up keep the queue in its
/// warm pages (fresh pages cost a fault and zeroing each); a put never waits
/// longer for room, however long consumers stall.
const GROWTH_GRACE: Duration = Duration::from_millis(10);

/// Most segments between the floor and the producer segment that a
/// directory can honestly name (a larger span is a corrupted directory).
const MAX_LIVE_SEGMENTS: u32 = 1 << 16;
/// Most segments a queue can have: their slots fit a file offset.
const MAX_SEGMENTS: u32 = (1 << 22) - 2;

/// Where segment `index` (at most [`MAX_SEGMENTS`]) starts in the memfd.
fn segment_base(index: u32) -> u64 {
    match index.min(MAX_SEGMENTS) {
        0 => 0,
        k => (u64::from(k) + 1) * SLOT,
    }
}

/// Which segment starts at `base`.
fn segment_index(base: u64) -> u32 {
    match base / SLOT {
        0 => 0,
        slot => (slot - 1) as u32,
    }
}

/// Shared state of the chain, in its own page of the memfd.
#[repr(C)]
struct Directory {
    magic: AtomicU64,
    /// Held while a segment is created and while the queue shuts down.
    grow_lock: RobustMutex,
    /// The segment puts go to.
    producer_segment: AtomicU32,
    /// 0: open; 1: shut down (puts fail, gets drain); 2: shut down, items discarded.
    shutdown: AtomicU32,
    /// `floor << 32 | retired_items`: the first segment that may hold items, and
    /// how many items (mod 2^32) were ever put into the segments below it.
    floor: AtomicU64,
    /// Whether the queue grows (unbounded) or its one segment waits for room.
    grows: AtomicU32,
    /// Which processes hold handles (see `holders.rs`).
    holders: Holders,
}

const _: () = assert!(size_of::<Directory>() <= DIRECTORY_LEN);

/// A process's view of a queue's segments, shared by its handles.
pub(crate) struct Segments {
    /// Segment 0: what travels (its memfd and doorbell), its `Tasks`.
    first: Arc<Ring>,
    directory: NonNull<Directory>,
    grows: bool,
    type_tag: u64,
    /// The segments puts and gets use now, in `mapped`.
    producer: AtomicPtr<Ring>,
    consumer: AtomicPtr<Ring>,
    /// Every segment this process mapped, kept until it drops (see the module docs).
    mapped: parking_lot::Mutex<Vec<Arc<Ring>>>,
    /// The process that made this view (a bare `fork` copies it into another).
    pid: u32,
    /// `FORKS` when this view was last checked against a fork.
    forks_seen: AtomicU32,
    /// The other holders' pidfds, watched while a call waits (`holders.rs`).
    watches: parking_lot::Mutex<HashMap<u32, Option<Watch>>>,
    /// Watched processes that ended (bumped by the watcher).
    deaths: AtomicU32,
    /// `changes << 32 | deaths` when a waiter last found other handles
    /// alive (`u64::MAX`: never): until either moves, the answer stands.
    alive_at: AtomicU64,
    /// `changes + 1` when every holder was last watched (0: never).
    watched_at: AtomicU32,
    /// For the watcher's wake-ups.
    myself: Weak<Segments>,
}

/// Bare `fork`s this process went through (counted in the child). Process-local, never in
/// shared memory: std's atomic even under `cfg(loom)`, whose atomics cannot be in a static.
static FORKS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

extern "C" fn count_fork_in_child() {
    FORKS.fetch_add(1, Relaxed);
}

/// Counts forks from now on (once per process image).
fn count_forks() {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    REGISTERED.call_once(|| {
        // SAFETY: registers a handler that only touches an atomic
        // (async-signal-safe, as a fork child handler must be).
        let code = unsafe { libc::pthread_atfork(None, None, Some(count_fork_in_child)) };
        if code != 0 {
            tracing::warn!(
                code,
                "pthread_atfork failed: forked queue handles go unnoticed"
            );
        }
    });
}

// SAFETY: the directory mapping is owned by `Segments` and lives until it
// drops; it holds only atomics and a process-shared robust mutex. The ring
// pointers point into `Arc<Ring>`s kept in `mapped` for as long as `self`.
unsafe impl Send for Segments {}
// SAFETY: as above; `&Segments` gives no unsynchronised access.
unsafe impl Sync for Segments {}

impl Drop for Segments {
    fn drop(&mut self) {
        // SAFETY: mapped in `map_directory` with this length, unmapped once,
        // here; no reference into it outlives `self`.
        unsafe {
            let _ = rustix::mm::munmap(self.directory.as_ptr().cast(), DIRECTORY_LEN);
        }
    }
}

/// Maps the directory page of `first`'s memfd.
fn map_directory(first: &Ring) -> Result<NonNull<Directory>, RingError> {
    use rustix::mm::{MapFlags, ProtFlags, mmap};
    let fd: BorrowedFd<'_> = first
        .descriptors()
        .first()
        .copied()
        .ok_or_else(|| RingError::Incompatible("a queue needs a memfd".into()))?;
    // SAFETY: a fresh shared mapping at an address the kernel picks; it
    // aliases no Rust object.
    let page = unsafe {
        mmap(
            std::ptr::null_mut(),
            DIRECTORY_LEN,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::SHARED,
            fd,
            DIRECTORY_AT,
        )
    }
    .map_err(|e| io_error("mmap")(e.into()))?;
    NonNull::new(page.cast()).ok_or_else(|| RingError::Corrupted("null mapping".into()))
}

impl Segments {
    /// A new queue: segment 0 of `capacity` bytes, and the directory.
    pub(crate) fn create(
        capacity: usize,
        max_items: Option<u32>,
        may_grow: bool,
        type_tag: u64,
    ) -> Result<Arc<Segments>, RingError> {
        let first = Ring::create(RingConfig {
            capacity,
            max_items,
            type_tag,
            // For `connection::wait` over queues.
            doorbell: true,
        })?
        // Handles inside items (see `message_handles`); every segment shares them.
        .with_parcels()?;
        let file = first.file();
        file.set_len(DIRECTORY_AT + DIRECTORY_LEN as u64)
            .map_err(io_error("ftruncate"))?;
        let directory = map_directory(&first)?;
        let grows = may_grow && max_items.is_none();
        let raw = directory.as_ptr();
        // SAFETY: the page is fresh and zeroed, and nobody else can see it
        // yet; the pointer comes from the mapping.
        unsafe {
            RobustMutex::init_at(&raw mut (*raw).grow_lock, false)
                .map_err(io_error("pthread_mutex_init"))?;
        }
        let segments = Segments::new(Arc::new(first), directory, grows, type_tag);
        let dir = segments.directory();
        dir.grows.store(u32::from(grows), Relaxed);
        dir.magic.store(DIRECTORY_MAGIC, Release);
        Ok(segments)
    }

    /// The lender of a received handle no longer counts it (see `holders.rs`).
    pub(crate) fn claimed_from(&self, lender: u32) {
        if self.directory().holders.remove(lender) {
            self.wake_waiters();
        }
    }

    /// A queue received from another process: `first` is its segment 0.
    pub(crate) fn attach(first: Ring, type_tag: u64) -> Result<Arc<Segments>, RingError> {
        let file = first.file();
        if file.len().map_err(io_error("fstat"))? < DIRECTORY_AT + DIRECTORY_LEN as u64 {
            return Err(RingError::Incompatible(
                "a ring without a queue directory".into(),
            ));
        }
        let directory = map_directory(&first)?;
        // SAFETY: a mapping of a whole page of the memfd, which holds a
        // `Directory` (atomics and a mutex, valid for any bytes to be read
        // as atomics) if the magic says so; only atomic words are read here.
        let (magic, grows) = unsafe {
            let page = &*directory.as_ptr();
            (page.magic.load(Acquire), page.grows.load(Relaxed) != 0)
        };
        if magic != DIRECTORY_MAGIC {
            // SAFETY: mapped just above with this length; nothing refers to it.
            unsafe {
                let _ = rustix::mm::munmap(directory.as_ptr().cast(), DIRECTORY_LEN);
            }
            return Err(RingError::Incompatible("bad queue directory".into()));
        }
        let segments = Segments::new(Arc::new(first), directory, grows, type_tag);
        let floor = segments.floor().0;
        let consumer = segments.segment(floor)?;
        segments.consumer.store(consumer.cast_mut(), Release);
        segments.use_for_puts(segments.directory().producer_segment.load(SeqCst))?;
        Ok(segments)
    }

    fn new(
        first: Arc<Ring>,
        directory: NonNull<Directory>,
        grows: bool,
        type_tag: u64,
    ) -> Arc<Self> {
        count_forks();
        let ptr = Arc::as_ptr(&first).cast_mut();
        Arc::new_cyclic(|myself| Segments {
            first: Arc::clone(&first),
            directory,
            grows,
            type_tag,
            producer: AtomicPtr::new(ptr),
            consumer: AtomicPtr::new(ptr),
            mapped: parking_lot::Mutex::new(vec![first]),
            pid: std::process::id(),
            forks_seen: AtomicU32::new(FORKS.load(Relaxed)),
            watches: parking_lot::Mutex::new(HashMap::new()),
            deaths: AtomicU32::new(0),
            alive_at: AtomicU64::new(u64::MAX),
            watched_at: AtomicU32::new(0),
            myself: Weak::clone(myself),
        })
    }

    /// This process, if this view is its own; after a bare `fork` the
    /// copied handles are not counted, so tracking is given up.
    fn pid_here(&self) -> Option<u32> {
        if FORKS.load(Relaxed) == self.forks_seen.load(Relaxed) {
            return Some(self.pid);
        }
        if std::process::id() == self.pid {
            self.forks_seen.store(FORKS.load(Relaxed), Relaxed);
            return Some(self.pid);
        }
        self.directory().holders.give_up_tracking();
        None
    }

    /// One more handle of this view (made, or lent in a message).
    pub(crate) fn handle_made(&self) {
        if let Some(pid) = self.pid_here() {
            self.directory().holders.add(pid);
        }
    }

    /// One handle of this view fewer (closed or dropped); wakes waiters,
    /// which may now be alone.
    pub(crate) fn handle_gone(&self) {
        if let Some(pid) = self.pid_here()
            && self.directory().holders.remove(pid)
        {
            self.wake_waiters();
        }
    }

    /// Wakes every get and put sleeping on the queue (in any process), to
    /// look at the holders again.
    fn wake_waiters(&self) {
        for index in self.live().unwrap_or(0..=0) {
            if let Ok(ring) = self.segment(index) {
                // SAFETY: from `segment` (see `load`).
                let ring = unsafe { &*ring };
                ring.indices().wake_consumers();
                ring.indices().wake_producers();
            }
        }
    }

    /// The process that made this view (what a lent handle names).
    pub(crate) fn lender(&self) -> u32 {
        self.pid
    }

    fn directory(&self) -> &Directory {
        // SAFETY: the mapping lives as long as `self`; it holds atomics and
        // a mutex initialised by the creator before the magic was stored.
        unsafe { self.directory.as_ref() }
    }

    /// Segment 0 (its descriptors travel; its header holds the task counts).
    pub(crate) fn first(&self) -> &Ring {
        &self.first
    }

    /// The `Tasks` of a `JoinableQueue`.
    pub(crate) fn tasks(&self) -> &Tasks {
        self.first.tasks()
    }

    /// The segments that may hold items, floor to producer segment.
    fn live(&self) -> Result<std::ops::RangeInclusive<u32>, RingError> {
        let first = self.floor().0;
        let last = self.directory().producer_segment.load(SeqCst);
        if last < first || last - first > MAX_LIVE_SEGMENTS || last > MAX_SEGMENTS {
            return Err(RingError::Corrupted(format!(
                "queue directory names segments {first}..={last}"
            )));
        }
        Ok(first..=last)
    }

    /// `(floor, items put into the segments below it)`.
    fn floor(&self) -> (u32, u32) {
        let word = self.directory().floor.load(SeqCst);
        ((word >> 32) as u32, word as u32)
    }

    /// Segment `index`, mapped in this process if it was not yet.
    fn segment(&self, index: u32) -> Result<*const Ring, RingError> {
        let mut mapped = self.mapped.lock();
        let base = segment_base(index);
        if let Some(ring) = mapped.iter().find(|ring| ring.base() == base) {
            return Ok(Arc::as_ptr(ring));
        }
        let ring = Arc::new(Ring::attach_at(&self.first, base, self.type_tag)?);
        let ptr = Arc::as_ptr(&ring);
        mapped.push(ring);
        Ok(ptr)
    }

    /// The segment `which` points at (every pointer stored in `producer`
    /// and `consumer` comes from [`segment`](Self::segment)).
    fn load(&self, which: &AtomicPtr<Ring>) -> &Ring {
        // SAFETY: the pointer was taken from an `Arc<Ring>` in `mapped`,
        // which keeps every entry until `self` drops.
        unsafe { &*which.load(Acquire) }
    }

    /// The segment gets read now (for `wait`).
    pub(crate) fn consumer_ring(&self) -> &Ring {
        self.load(&self.consumer)
    }

    /// Points puts at segment `index`, sealing the one before it (see the
    /// module docs: a grower may have died before doing it).
    fn use_for_puts(&self, index: u32) -> Result<(), RingError> {
        if index > 0 {
            let before = self.segment(index - 1)?;
            // SAFETY: from `segment` (see `load`).
            unsafe { &*before }.close()?;
        }
        let ring = self.segment(index)?;
        self.producer.store(ring.cast_mut(), Release);
        Ok(())
    }

    /// Puts one item: into the producer segment, growing when it is full
    /// (unbounded), or waiting for room (bounded).
    ///
    /// The fast path is one attempt at the producer segment that does not
    /// wait for room; everything else (a full or sealed segment, waiting,
    /// growing, abandonment) is [`put_slowly`](Self::put_slowly).
    #[inline]
    pub(crate) fn put(&self, item: &dyn Encode, wait: Wait) -> Result<(), QueueError> {
        let ring = self.load(&self.producer);
        match ring.push_waiting(item, wait, Wait::Never, None) {
            Ok(()) => Ok(()),
            Err(error) => self.put_slowly(ring, error, item, wait),
        }
    }

    /// The rest of [`put`](Self::put), after the attempt at `ring` failed with `error`.
    #[cold]
    fn put_slowly<'a>(
        &'a self,
        mut ring: &'a Ring,
        mut error: RingError,
        item: &dyn Encode,
        wait: Wait,
    ) -> Result<(), QueueError> {
        loop {
            let alone = Abandonment::new(self);
            let result = match error {
                RingError::Full if self.grows => self.push_with_grace(ring, item, wait),
                RingError::Full => ring.push(item, wait, alone.for_wait(wait)),
                other => Err(other),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(RingError::Closed) if ring.indices().is_open() => {
                    return Err(QueueError::Abandoned);
                }
                Err(RingError::Full) if self.grows => self.grow(ring)?,
                Err(RingError::Closed) => {
                    let now = self.directory().producer_segment.load(SeqCst);
                    if now <= segment_index(ring.base()) {
                        return Err(QueueError::Closed); // shut down
                    }
                    self.use_for_puts(now)?;
                }
                Err(other) => return Err(other.into()),
            }
            ring = self.load(&self.producer);
            error = match ring.push_waiting(item, wait, Wait::Never, None) {
                Ok(()) => return Ok(()),
                Err(error) => error,
            };
        }
    }

    /// A full segment of a growing queue: waits at most [`GROWTH_GRACE`]
    /// (within the caller's own deadline) for a consumer to make room, so
    /// that a queue whose consumers keep up stays in its warm pages instead
    /// of growing into fresh ones; `Full` if none was made.
    fn push_with_grace(&self, ring: &Ring, item: &dyn Encode, wait: Wait) -> Result<(), RingError> {
        let grace = Instant::now() + GROWTH_GRACE;
        let room_wait = match wait {
            Wait::Never => return Err(RingError::Full),
            Wait::Until(deadline) => Wait::Until(deadline.min(grace)),
            Wait::Forever => Wait::Until(grace),
        };
        match ring.push_waiting(item, wait, room_wait, None) {
            Err(RingError::Timeout) => match wait {
                Wait::Until(deadline) if Instant::now() >= deadline => Err(RingError::Timeout),
                _ => Err(RingError::Full),
            },
            other => other,
        }
    }

    /// Makes a segment after `full` (unless somebody did) and moves puts there.
    fn grow(&self, full: &Ring) -> Result<(), RingError> {
        let directory = self.directory();
        let index = segment_index(full.base());
        let _held = GrowLock::take(&directory.grow_lock)?;
        let now = directory.producer_segment.load(SeqCst);
        if now != index {
            return self.use_for_puts(now);
        }
        if directory.shutdown.load(SeqCst) != 0 {
            return Err(RingError::Closed);
        }
        let next = Some(index + 1)
            .filter(|&next| next <= MAX_SEGMENTS)
            .ok_or_else(|| RingError::Io {
                op: "growing the queue",
                source: std::io::ErrorKind::OutOfMemory.into(),
            })?;
        let capacity = (full.capacity() * 2).min(GROWTH_LIMIT.max(full.capacity()));
        let ring = Ring::create_at(
            &self.first,
            segment_base(next),
            RingConfig {
                capacity,
                max_items: None,
                type_tag: self.type_tag,
                doorbell: true,
            },
        )?;
        self.mapped.lock().push(Arc::new(ring));
        directory.producer_segment.store(next, SeqCst);
        tracing::debug!(segment = next, capacity, "queue grew");
        self.use_for_puts(next)
    }

    /// Takes one item, moving on through sealed segments.
    #[inline]
    pub(crate) fn get<R>(
        &self,
        wait: Wait,
        read: impl Fn(Payload<'_>) -> R + Copy,
    ) -> Result<R, QueueError> {
        let ring = self.load(&self.consumer);
        let alone = Abandonment::new(self);
        match ring.pop(wait, alone.for_wait(wait), read) {
            Ok(value) => Ok(value),
            Err(error) => self.get_slowly(ring, error, wait, read),
        }
    }

    /// The rest of [`get`](Self::get), after the attempt at `ring` failed with `error`.
    #[cold]
    fn get_slowly<'a, R>(
        &'a self,
        mut ring: &'a Ring,
        mut error: RingError,
        wait: Wait,
        read: impl Fn(Payload<'_>) -> R + Copy,
    ) -> Result<R, QueueError> {
        loop {
            match error {
                RingError::Closed if !ring.indices().is_closed() => {
                    return Err(QueueError::Abandoned);
                }
                RingError::Closed => {
                    if !self.move_consumer_on(ring)? {
                        return Err(QueueError::Closed);
                    }
                }
                other => return Err(other.into()),
            }
            ring = self.load(&self.consumer);
            let alone = Abandonment::new(self);
            error = match ring.pop(wait, alone.for_wait(wait), read) {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
        }
    }

    /// `drained` is closed and empty: retires it and points gets at the
    /// next segment; `false` if the queue was shut down instead.
    fn move_consumer_on(&self, drained: &Ring) -> Result<bool, RingError> {
        let index = segment_index(drained.base());
        if self.directory().producer_segment.load(SeqCst) <= index {
            return Ok(false);
        }
        self.retire(drained, index);
        let next = self.segment(index + 1)?;
        let _ = self.consumer.compare_exchange(
            std::ptr::from_ref(drained).cast_mut(),
            next.cast_mut(),
            AcqRel,
            Relaxed,
        );
        Ok(true)
    }

    /// Advances the floor past segment `index` (sealed and drained) and
    /// gives its memory back, once.
    fn retire(&self, ring: &Ring, index: u32) {
        let floor = &self.directory().floor;
        let mut word = floor.load(SeqCst);
        while (word >> 32) as u32 == index {
            let retired = (word as u32).wrapping_add(ring.indices().tail().items());
            let new = (u64::from(index + 1) << 32) | u64::from(retired);
            match floor.compare_exchange(word, new, SeqCst, SeqCst) {
                Ok(_) => {
                    let file = ring.file();
                    let start = ring.base() + crate::ring::HEADER_LEN as u64;
                    if let Err(error) = file.punch(start, ring.capacity() as u64) {
                        tracing::warn!(%error, "could not free a drained queue segment");
                    }
                    tracing::debug!(segment = index, "queue segment retired");
                    return;
                }
                Err(now) => word = now,
            }
        }
    }

    /// Items in the queue now (a snapshot; exact when nobody puts or gets).
    pub(crate) fn len(&self) -> usize {
        self.fold_live(0usize, |sum, ring| sum + ring.len())
    }

    /// Whether an item is ready to be taken (a snapshot).
    pub(crate) fn has_data(&self) -> bool {
        self.fold_live(false, |any, ring| any || ring.has_data())
    }

    /// Items ever put (mod 2^32), for `JoinableQueue`.
    pub(crate) fn items_put(&self) -> u32 {
        let (floor, retired) = self.floor();
        let mut total = retired;
        let last = self.live().map_or(floor, |live| *live.end());
        for index in floor..=last {
            match self.segment(index) {
                // SAFETY: from `segment` (see `load`).
                Ok(ring) => total = total.wrapping_add(unsafe { &*ring }.indices().tail().items()),
                Err(error) => tracing::warn!(%error, "could not map a queue segment"),
            }
        }
        total
    }

    fn fold_live<A>(&self, init: A, f: impl Fn(A, &Ring) -> A) -> A {
        let Ok(live) = self.live() else {
            return init;
        };
        if live.start() == live.end() {
            return f(init, self.load(&self.producer));
        }
        live.fold(init, |acc, index| match self.segment(index) {
            // SAFETY: from `segment` (see `load`).
            Ok(ring) => f(acc, unsafe { &*ring }),
            Err(_) => acc,
        })
    }

    /// Whether a put would have to wait now (never, when the queue grows).
    pub(crate) fn is_full(&self) -> bool {
        !self.grows && self.load(&self.producer).is_full()
    }

    /// Python 3.13's `shutdown`: puts fail; gets drain, then fail; blocked
    /// callers wake. With `immediate`, the items left are discarded (returns
    /// how many this call discarded).
    pub(crate) fn shut_down(&self, immediate: bool) -> Result<u32, QueueError> {
        let directory = self.directory();
        directory
            .shutdown
            .fetch_max(1 + u32::from(immediate), SeqCst);
        {
            let _held = GrowLock::take(&directory.grow_lock)?;
            for index in self.live()? {
                let ring = self.segment(index)?;
                // SAFETY: from `segment` (see `load`).
                unsafe { &*ring }.close()?;
            }
        }
        let mut discarded = 0u32;
        if immediate {
            loop {
                match self.get(Wait::Forever, |_| ()) {
                    Ok(()) | Err(QueueError::Corrupted(_)) => discarded += 1,
                    Err(QueueError::Closed | QueueError::Empty) => break,
                    Err(other) => return Err(other),
                }
            }
        }
        Ok(discarded)
    }

    /// Whether the queue was shut down.
    pub(crate) fn is_shut_down(&self) -> bool {
        self.directory().shutdown.load(SeqCst) != 0
    }

    /// The item limit, if any.
    pub(crate) fn max_items(&self) -> Option<u32> {
        self.first.max_items()
    }

    /// Bytes of segment 0.
    pub(crate) fn first_capacity(&self) -> usize {
        self.first.capacity()
    }
}

/// The default size of segment 0.
pub(crate) const FIRST_CAPACITY: usize = DEFAULT_CAPACITY;

/// The held `grow_lock`.
struct GrowLock<'a> {
    mutex: &'a RobustMutex,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl<'a> GrowLock<'a> {
    fn take(mutex: &'a RobustMutex) -> Result<Self, RingError> {
        match mutex.lock(None) {
            Ok(Acquired::Clean) => {}
            // The segment it was making, if any, was never published
            // (`producer_segment` moves last) and is made again from scratch.
            Ok(Acquired::OwnerDied) => tracing::warn!("a process died growing a queue"),
            Err(LockFailed::Deadlock) => return Err(RingError::Reentrant),
            Err(error) => {
                return Err(RingError::Io {
                    op: "locking a queue's directory",
                    source: std::io::Error::other(format!("{error:?}")),
                });
            }
        }
        Ok(GrowLock {
            mutex,
            _not_send: std::marker::PhantomData,
        })
    }
}

impl Drop for GrowLock<'_> {
    fn drop(&mut self) {
        if self.mutex.unlock().is_err() {
            tracing::error!("a queue's grow lock released by a thread that does not hold it");
        }
    }
}

/// Wakes `JoinableQueue::join`ers after `count` items were counted done.
pub(crate) fn count_done(tasks: &Tasks, count: u32) {
    if count > 0 {
        tasks.done.fetch_add(count, SeqCst);
        tasks.seq.fetch_add(1, SeqCst);
        futex::wake_all(&tasks.seq);
    }
}

/// Whether every other handle of the queue is gone, for a call about to
/// wait (see `holders.rs`).
struct Abandonment<'a> {
    segments: &'a Segments,
    /// Set by `before_sleep`: until the call is about to sleep (while it
    /// spins), `peer_gone` costs nothing.
    armed: AtomicBool,
}

impl<'a> Abandonment<'a> {
    fn new(segments: &'a Segments) -> Self {
        Abandonment {
            segments,
            armed: AtomicBool::new(false),
        }
    }

    /// Consulted only by calls that may wait: a `try_` call reports
    /// `Empty`/`Full` as Python does.
    fn for_wait(&self, wait: Wait) -> Option<&dyn Liveness> {
        match wait {
            Wait::Never => None,
            _ => Some(self),
        }
    }
}

impl Liveness for Abandonment<'_> {
    fn peer_gone(&self) -> bool {
        if !self.armed.load(Relaxed) {
            return false;
        }
        let segments = self.segments;
        let Some(me) = segments.pid_here() else {
            return false;
        };
        let holders = &segments.directory().holders;
        let now = (u64::from(holders.changes()) << 32) | u64::from(segments.deaths.load(SeqCst));
        if segments.alive_at.load(Relaxed) == now {
            return false; // nothing changed since others were found alive
        }
        let watches = segments.watches.lock();
        let ended = |pid: u32| match watches.get(&pid) {
            Some(Some(watch)) => watch.gone(),
            Some(None) => true, // no pidfd could be opened: it had ended
            None => false,      // not watched yet: assume alive
        };
        let alive = holders.others_alive(me, ended);
        if alive {
            segments.alive_at.store(now, Relaxed);
        }
        !alive
    }

    fn before_sleep(&self) {
        self.armed.store(true, Relaxed);
        let segments = self.segments;
        let Some(me) = segments.pid_here() else {
            return;
        };
        let holders = &segments.directory().holders;
        let changes = holders.changes();
        if segments.watched_at.load(Relaxed) == changes.wrapping_add(1) {
            return; // every holder of that table is watched already
        }
        let mut watches = segments.watches.lock();
        for pid in holders.other_pids(me) {
            if let Some(Some(watch)) = watches.get(&pid) {
                if let Err(error) = watch.ensure_watched() {
                    tracing::warn!(%error, pid, "could not watch a queue holder");
                }
                continue;
            }
            if watches.contains_key(&pid) {
                continue;
            }
            let watch = match rustix::process::Pid::from_raw(pid as i32)
                .map(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()))
            {
                Some(Ok(pidfd)) => {
                    let myself = Weak::clone(&segments.myself);
                    match Watch::process(pidfd, move || {
                        if let Some(segments) = myself.upgrade() {
                            segments.deaths.fetch_add(1, SeqCst);
                            segments.wake_waiters();
                        }
                    }) {
                        Ok(watch) => Some(watch),
                        Err(error) => {
                            // Unwatched: assumed alive for good.
                            tracing::warn!(%error, pid, "could not watch a queue holder");
                            segments.directory().holders.give_up_tracking();
                            continue;
                        }
                    }
                }
                Some(Err(rustix::io::Errno::SRCH)) | None => {
                    // Ended before it could be watched: a death all the same.
                    segments.deaths.fetch_add(1, SeqCst);
                    None
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, pid, "could not open a pidfd of a queue holder");
                    segments.directory().holders.give_up_tracking();
                    continue;
                }
            };
            watches.insert(pid, watch);
        }
        segments.watched_at.store(changes.wrapping_add(1), Relaxed);
    }
}
