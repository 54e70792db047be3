//! Shared memory segments: anonymous (the default, nothing left behind) or
//! named like Python's `shared_memory.SharedMemory`.
//!
//! ```
//! use mp_ipc::shm::SharedMemory;
//!
//! let shm = SharedMemory::new(4096)?;
//! shm.write_at(10, b"hello")?;
//! let mut buf = [0u8; 5];
//! shm.clone().read_at(10, &mut buf)?; // a clone is the same memory
//! assert_eq!(&buf, b"hello");
//! # Ok::<(), mp_ipc::shm::ShmError>(())
//! ```
//!
//! An anonymous segment is a memfd this crate creates and owns: passing a
//! [`SharedMemory`] as an argument to a child process hands the descriptor
//! over (see the [transport](crate::transport_design)) and maps the very same memory
//! there. The segment is freed when the last handle in the last process is
//! gone.
//!
//! A named segment ([`SharedMemory::create`] / [`SharedMemory::open`]) lives
//! in `/dev/shm`; dropping handles never unlinks it. It travels to a child by
//! name (so the child's copy fails to decode if the name was unlinked
//! meanwhile). As with Python's resource tracker, a segment is unlinked when
//! the process that *created* it dies (exit, panic, SIGKILL: a tracker
//! process watches it, see `shm_tracker.rs`), unless it was unlinked before
//! ([`SharedMemory::unlink`], [`SharedMemory::unlink_name`]) or the creator
//! asked it to outlive it ([`SharedMemory::persist`]). Processes that only
//! [`open`](SharedMemory::open) a segment never cause its unlink.
//!
//! ```
//! use mp_ipc::shm::SharedMemory;
//!
//! let shm = SharedMemory::create_unique(4096)?; // a fresh name
//! let name = shm.name().unwrap().to_owned();
//! SharedMemory::open(&name)?.write_at(0, b"by name")?;
//! SharedMemory::unlink_name(&name)?;
//! # Ok::<(), mp_ipc::shm::ShmError>(())
//! ```

use std::fmt;
use std::io;
use std::ptr::NonNull;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use rustix::fd::{AsFd, OwnedFd};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::robust::RobustMutex;
use crate::shm_tracker;
use crate::transport::{self, Ticket};

/// Errors of [`SharedMemory`].
#[derive(Debug, thiserror::Error)]
pub enum ShmError {
    /// Size 0, or larger than the address space allows.
    #[error(
        "invalid shared memory size {0}: must be at least 1 byte (and, if anonymous, fit in RAM + swap)"
    )]
    InvalidSize(usize),
    /// The name is empty, too long, or contains `/` or NUL.
    #[error(
        "invalid shared memory name {0:?}: want 1..=250 bytes, no '/' (except one leading) and no NUL"
    )]
    InvalidName(String),
    /// `create` with a name that already exists.
    #[error("shared memory segment {0:?} already exists")]
    AlreadyExists(String),
    /// `open` or `unlink` with a name that does not exist.
    #[error("no shared memory segment named {0:?}")]
    NotFound(String),
    /// An access outside the segment.
    #[error("access of {len} bytes at offset {offset} is outside the {size}-byte segment")]
    OutOfBounds {
        /// First byte of the access.
        offset: usize,
        /// Length of the access.
        len: usize,
        /// Size of the segment.
        size: usize,
    },
    /// A region at this offset would be misaligned for its type.
    #[error("offset {offset} is not aligned to {align} bytes")]
    Misaligned {
        /// Requested offset.
        offset: usize,
        /// Alignment required.
        align: usize,
    },
    /// The memory handed over does not hold the expected primitive (e.g. a
    /// `Lock` was decoded from the bytes of a `Semaphore`).
    #[error("shared memory at offset {offset} does not hold a {expected}")]
    WrongKind {
        /// The primitive expected there.
        expected: &'static str,
        /// Where it was expected.
        offset: usize,
    },
    /// `unlink` on an anonymous segment.
    #[error("anonymous shared memory has no name to unlink")]
    Anonymous,
    /// A system call failed.
    #[error("{op} failed: {source}")]
    Io {
        /// The operation that failed.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

fn io_err(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> ShmError {
    move |errno| ShmError::Io {
        op,
        source: errno.into(),
    }
}

/// A shared memory segment. Clones are handles to the same memory.
///
/// The contents are raw bytes shared with other processes: [`read_at`] and
/// [`write_at`] are always memory-safe (they copy with atomic accesses, so a
/// concurrent writer can tear the data but never cause undefined behaviour);
/// anything built on [`as_mut_ptr`] must do its own synchronisation, e.g.
/// with a lock from [`crate::lock`].
///
/// [`read_at`]: SharedMemory::read_at
/// [`write_at`]: SharedMemory::write_at
/// [`as_mut_ptr`]: SharedMemory::as_mut_ptr
#[derive(Clone)]
pub struct SharedMemory {
    segment: Arc<Segment>,
}

/// One mapping of a segment in this process.
struct Segment {
    /// Start of the mapping, valid for `len` bytes while the segment lives.
    /// Derived once from the owning mapping, never from a `&[u8]`.
    ptr: NonNull<u8>,
    len: usize,
    backing: Backing,
    /// Offsets of robust mutexes placed in the segment (see `Drop`).
    robust_mutexes: parking_lot::Mutex<Vec<usize>>,
}

enum Backing {
    /// A memfd (created here, or received from another process).
    Anonymous(OwnedFd),
    /// A POSIX shm object; `name` is without the slash.
    Named { name: String, _fd: OwnedFd },
}

// SAFETY: `Segment` owns its mapping; the raw pointer is only dereferenced by
// atomic copies (read_at/write_at) or by callers of the raw-pointer API, who
// take on synchronisation. Nothing in it is tied to the creating thread.
unsafe impl Send for Segment {}
// SAFETY: shared access only reads the immutable fields or goes through the
// atomic copies and the internal mutex.
unsafe impl Sync for Segment {}

impl SharedMemory {
    /// Creates an anonymous segment of `size` zeroed, pre-faulted bytes.
    /// It has no name and leaves nothing behind once every handle is dropped.
    pub fn new(size: usize) -> Result<Self, ShmError> {
        check_size(size)?;
        check_fits_in_memory(size)?;
        let fd = rustix::fs::memfd_create("mp-ipc-shm", rustix::fs::MemfdFlags::CLOEXEC)
            .map_err(io_err("memfd_create"))?;
        rustix::fs::ftruncate(&fd, size as u64).map_err(io_err("ftruncate"))?;
        let ptr = map(&fd, size, rustix::mm::MapFlags::POPULATE)?;
        Ok(Self::anonymous(fd, ptr, size))
    }

    fn anonymous(fd: OwnedFd, ptr: NonNull<u8>, len: usize) -> Self {
        Self::from_segment(Segment {
            ptr,
            len,
            backing: Backing::Anonymous(fd),
            robust_mutexes: parking_lot::Mutex::new(Vec::new()),
        })
    }

    /// Maps an anonymous segment received from another process.
    fn attach_anonymous(fd: OwnedFd) -> Result<Self, ShmError> {
        let size = size_of_file(&fd)?;
        let ptr = map(&fd, size, rustix::mm::MapFlags::empty())?;
        Ok(Self::anonymous(fd, ptr, size))
    }

    fn from_segment(segment: Segment) -> Self {
        Self {
            segment: Arc::new(segment),
        }
    }

    /// Creates a named segment of `size` zeroed bytes (Python's
    /// `SharedMemory(name, create=True, size=size)`). It stays in `/dev/shm`
    /// after every handle is gone, until [`unlink`](Self::unlink)ed or until
    /// this process dies (unless [`persist`](Self::persist) is called).
    pub fn create(name: &str, size: usize) -> Result<Self, ShmError> {
        check_size(size)?;
        let name = check_name(name)?;
        let path = format!("/{name}");
        let fd = rustix::shm::open(
            path.as_str(),
            rustix::shm::OFlags::CREATE | rustix::shm::OFlags::EXCL | rustix::shm::OFlags::RDWR,
            rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
        )
        .map_err(|errno| match errno {
            rustix::io::Errno::EXIST => ShmError::AlreadyExists(name.to_owned()),
            errno => io_err("shm_open")(errno),
        })?;
        let mapped = rustix::fs::ftruncate(&fd, size as u64)
            .map_err(io_err("ftruncate"))
            .and_then(|()| map(&fd, size, rustix::mm::MapFlags::empty()))
            .and_then(|ptr| {
                shm_tracker::track(name, &fd)
                    .map(|()| ptr)
                    .map_err(|source| ShmError::Io {
                        op: "report the segment to the shared memory tracker",
                        source,
                    })
            });
        match mapped {
            Ok(ptr) => Ok(Self::named(name, fd, ptr, size)),
            Err(error) => {
                // Leave nothing behind when creation fails half-way.
                let _ = rustix::shm::unlink(path.as_str());
                Err(error)
            }
        }
    }

    /// Opens an existing named segment (Python's `SharedMemory(name)`).
    pub fn open(name: &str) -> Result<Self, ShmError> {
        let name = check_name(name)?;
        let fd = rustix::shm::open(
            format!("/{name}").as_str(),
            rustix::shm::OFlags::RDWR,
            rustix::fs::Mode::empty(),
        )
        .map_err(|errno| match errno {
            rustix::io::Errno::NOENT => ShmError::NotFound(name.to_owned()),
            errno => io_err("shm_open")(errno),
        })?;
        let size = size_of_file(&fd)?;
        let ptr = map(&fd, size, rustix::mm::MapFlags::empty())?;
        Ok(Self::named(name, fd, ptr, size))
    }

    /// Creates a named segment under a fresh name (`mp-<pid>-<random>`);
    /// [`name`](Self::name) reports it. Otherwise as [`create`](Self::create).
    pub fn create_unique(size: usize) -> Result<Self, ShmError> {
        loop {
            let random = transport::random_bytes().map_err(|source| ShmError::Io {
                op: "getrandom",
                source,
            })?;
            let suffix: String = random[..8].iter().map(|b| format!("{b:02x}")).collect();
            let name = format!("mp-{}-{suffix}", std::process::id());
            match Self::create(&name, size) {
                Err(ShmError::AlreadyExists(_)) => continue, // 2^-64: try another
                other => return other,
            }
        }
    }

    /// Removes the segment called `name` from `/dev/shm` (Python's
    /// `SharedMemory(name).unlink()` without attaching it). Existing
    /// mappings stay valid until dropped.
    pub fn unlink_name(name: &str) -> Result<(), ShmError> {
        let name = check_name(name)?;
        // Untracked first: were this process killed in between, a segment of
        // the same name created later by someone else must not be unlinked.
        shm_tracker::untrack(name);
        rustix::shm::unlink(format!("/{name}").as_str()).map_err(|errno| match errno {
            rustix::io::Errno::NOENT => ShmError::NotFound(name.to_owned()),
            errno => io_err("shm_unlink")(errno),
        })
    }

    /// Keeps a segment this process created in `/dev/shm` after this process
    /// dies (by default the tracker unlinks it then; see the module docs).
    /// Someone must then [`unlink_name`](Self::unlink_name) it. Nothing
    /// changes for a segment this process only opened.
    pub fn persist(&self) -> Result<(), ShmError> {
        let name = self.name().ok_or(ShmError::Anonymous)?;
        shm_tracker::untrack(name);
        Ok(())
    }

    fn named(name: &str, fd: OwnedFd, ptr: NonNull<u8>, len: usize) -> Self {
        Self::from_segment(Segment {
            ptr,
            len,
            backing: Backing::Named {
                name: name.to_owned(),
                _fd: fd,
            },
            robust_mutexes: parking_lot::Mutex::new(Vec::new()),
        })
    }

    /// Removes the name of a named segment (Python's `unlink()`): later
    /// `open`s fail; existing mappings stay valid until dropped.
    pub fn unlink(&self) -> Result<(), ShmError> {
        Self::unlink_name(self.name().ok_or(ShmError::Anonymous)?)
    }

    /// The name of a named segment (without a leading `/`), `None` if anonymous.
    pub fn name(&self) -> Option<&str> {
        match &self.segment.backing {
            Backing::Anonymous(_) => None,
            Backing::Named { name, .. } => Some(name),
        }
    }

    /// Size in bytes (Python's `size`).
    pub fn len(&self) -> usize {
        self.segment.len
    }

    /// Always `false`: a segment has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.segment.len == 0
    }

    /// Start of the mapping in this process.
    pub fn as_ptr(&self) -> *const u8 {
        self.segment.ptr.as_ptr()
    }

    /// Start of the mapping in this process, for writing. Valid for
    /// [`len`](Self::len) bytes while this handle (or a clone) lives. Other
    /// threads and processes may access the same bytes at any time:
    /// synchronising with them is the caller's job.
    pub fn as_mut_ptr(&self) -> *mut u8 {
        self.segment.ptr.as_ptr()
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<(), ShmError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => Ok(()),
            _ => Err(ShmError::OutOfBounds {
                offset,
                len,
                size: self.len(),
            }),
        }
    }

    /// Copies `buf.len()` bytes starting at `offset` into `buf`.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<(), ShmError> {
        self.check_range(offset, buf.len())?;
        // SAFETY: the range is inside the mapping (checked above).
        unsafe { atomic_copy_from(self.as_ptr().add(offset), buf) };
        Ok(())
    }

    /// Copies `data` into the segment starting at `offset`.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), ShmError> {
        self.check_range(offset, data.len())?;
        // SAFETY: the range is inside the mapping (checked above).
        unsafe { atomic_copy_to(self.as_mut_ptr().add(offset), data) };
        Ok(())
    }

    /// A typed pointer `offset` bytes into the segment, checked to be in
    /// bounds and aligned for `T`. Dereferencing it is the caller's business.
    pub(crate) fn region<T>(&self, offset: usize) -> Result<NonNull<T>, ShmError> {
        self.check_range(offset, size_of::<T>())?;
        // SAFETY: in bounds (checked above), so the pointer stays inside the
        // mapping and is non-null.
        let ptr = unsafe { self.segment.ptr.add(offset) };
        if !(ptr.as_ptr() as usize).is_multiple_of(align_of::<T>()) {
            return Err(ShmError::Misaligned {
                offset,
                align: align_of::<T>(),
            });
        }
        Ok(ptr.cast())
    }

    /// Records that a robust mutex lives at `offset`, so that the mapping is
    /// kept (leaked) rather than unmapped if a thread of this process still
    /// holds that mutex when the last handle goes (see `Segment::drop`).
    pub(crate) fn track_robust_mutex(&self, offset: usize) {
        self.segment.robust_mutexes.lock().push(offset);
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        let held = self.robust_mutexes.get_mut().iter().any(|&offset| {
            // SAFETY: offsets were registered by the primitives that placed an
            // initialised RobustMutex there; the mapping is still alive.
            let mutex = unsafe { &*self.ptr.as_ptr().add(offset).cast::<RobustMutex>() };
            mutex.held_in_this_process()
        });
        if held {
            // A guard was leaked (mem::forget): glibc's robust list of the
            // holding thread points into this mapping. Keep it mapped.
            // (The descriptor may be closed: the mapping keeps the memory.)
            tracing::warn!(
                len = self.len,
                "shared memory holding a locked robust mutex kept mapped until exit"
            );
            return;
        }
        // SAFETY: the mapping was created by `map` with this pointer and
        // length and is unmapped exactly once, here; no handle remains.
        if let Err(errno) = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len) } {
            tracing::warn!(%errno, "munmap of a shared memory segment failed");
        }
    }
}

fn check_size(size: usize) -> Result<(), ShmError> {
    if size == 0 || size > isize::MAX as usize {
        return Err(ShmError::InvalidSize(size));
    }
    Ok(())
}

/// Anonymous segments are pre-faulted, so one larger than RAM + swap cannot
/// work; refuse it here rather than fail (and panic) inside ipc-channel.
fn check_fits_in_memory(size: usize) -> Result<(), ShmError> {
    let info = rustix::system::sysinfo();
    let unit = u64::from(info.mem_unit.max(1));
    let memory = (info.totalram as u64)
        .saturating_add(info.totalswap as u64)
        .saturating_mul(unit);
    if size as u64 > memory {
        return Err(ShmError::InvalidSize(size));
    }
    Ok(())
}

fn check_name(name: &str) -> Result<&str, ShmError> {
    let bare = name.strip_prefix('/').unwrap_or(name);
    if bare.is_empty()
        || bare.len() > 250
        || bare.contains(['/', '\0'])
        || bare == "."
        || bare == ".."
    {
        return Err(ShmError::InvalidName(name.to_owned()));
    }
    Ok(bare)
}

/// The size of the file behind a segment, checked.
fn size_of_file(fd: &OwnedFd) -> Result<usize, ShmError> {
    let size = rustix::fs::fstat(fd).map_err(io_err("fstat"))?.st_size;
    let size = usize::try_from(size).map_err(|_| ShmError::InvalidSize(0))?;
    check_size(size)?;
    Ok(size)
}

/// Maps `len` bytes of `fd`, shared, with `extra` flags. Named segments are
/// not pre-faulted (as in Python, pages are allocated on first touch), so
/// creating or opening a large one costs no more than a small one; a new
/// anonymous one is (`MAP_POPULATE`), as it always was.
fn map(fd: &OwnedFd, len: usize, extra: rustix::mm::MapFlags) -> Result<NonNull<u8>, ShmError> {
    use rustix::mm::{MapFlags, ProtFlags};
    // SAFETY: a fresh mapping at an address the kernel chooses; it aliases no
    // Rust object.
    let ptr = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            len,
            ProtFlags::READ | ProtFlags::WRITE,
            MapFlags::SHARED | extra,
            fd,
            0,
        )
    }
    .map_err(io_err("mmap"))?;
    NonNull::new(ptr.cast()).ok_or(ShmError::Io {
        op: "mmap",
        source: io::Error::other("null mapping"),
    })
}

/// Copies from shared memory with relaxed atomic loads (word-sized where
/// aligned), so racing writers in other threads or processes are not UB.
///
/// # Safety
/// `src` must be valid for reads of `dst.len()` bytes.
unsafe fn atomic_copy_from(src: *const u8, dst: &mut [u8]) {
    let mut i = 0;
    let head = src.align_offset(8).min(dst.len());
    let load_byte = |i: usize| {
        // SAFETY: i < dst.len(), inside the source range; AtomicU8 has the
        // alignment and size of u8.
        unsafe { (*src.add(i).cast::<AtomicU8>()).load(Ordering::Relaxed) }
    };
    while i < head {
        dst[i] = load_byte(i);
        i += 1;
    }
    while i + 8 <= dst.len() {
        // SAFETY: src + i is 8-aligned (after the head) and the 8 bytes are in range.
        let word = unsafe { (*src.add(i).cast::<AtomicU64>()).load(Ordering::Relaxed) };
        dst[i..i + 8].copy_from_slice(&word.to_ne_bytes());
        i += 8;
    }
    while i < dst.len() {
        dst[i] = load_byte(i);
        i += 1;
    }
}

/// Copies into shared memory with relaxed atomic stores; see
/// [`atomic_copy_from`].
///
/// # Safety
/// `dst` must be valid for writes of `src.len()` bytes.
unsafe fn atomic_copy_to(dst: *mut u8, src: &[u8]) {
    let mut i = 0;
    let head = dst.align_offset(8).min(src.len());
    let store_byte = |i: usize| {
        // SAFETY: i < src.len(), inside the destination range.
        unsafe { (*dst.add(i).cast::<AtomicU8>()).store(src[i], Ordering::Relaxed) }
    };
    while i < head {
        store_byte(i);
        i += 1;
    }
    while i + 8 <= src.len() {
        let word = u64::from_ne_bytes(src[i..i + 8].try_into().expect("8 bytes"));
        // SAFETY: dst + i is 8-aligned (after the head) and the 8 bytes are in range.
        unsafe { (*dst.add(i).cast::<AtomicU64>()).store(word, Ordering::Relaxed) };
        i += 8;
    }
    while i < src.len() {
        store_byte(i);
        i += 1;
    }
}

impl fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMemory")
            .field("name", &self.name())
            .field("len", &self.len())
            .field("ptr", &self.as_ptr())
            .finish()
    }
}

/// How a segment travels: a ticket for its memfd (see the
/// [transport](crate::transport)), or the name of a named segment.
#[derive(Serialize, Deserialize)]
enum Wire {
    Anonymous(Ticket),
    Named(String),
}

impl Serialize for SharedMemory {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if mp_core::finding_encode_cause() {
            // A second pass that only looks for why an encoding failed: lend nothing.
            return serializer.serialize_unit();
        }
        match &self.segment.backing {
            Backing::Anonymous(fd) => {
                let ticket = transport::lend(&[fd.as_fd()]).map_err(|e| {
                    crate::decode_error::custom_encode::<S::Error>(format!(
                        "lending a shared memory descriptor: {e}"
                    ))
                })?;
                serializer.serialize_newtype_variant("Wire", 0, "Anonymous", &ticket)
            }
            Backing::Named { name, .. } => {
                serializer.serialize_newtype_variant("Wire", 1, "Named", name)
            }
        }
    }
}

impl<'de> Deserialize<'de> for SharedMemory {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if mp_core::replaying_decode() {
            // A second reading that only looks for why a decode failed: claim nothing.
            return Err(mp_core::abandon_replay());
        }
        match Wire::deserialize(deserializer)? {
            Wire::Anonymous(ticket) => {
                let fds = transport::claim(ticket).map_err(|error| {
                    crate::decode_error::custom(format!(
                        "receiving a shared memory descriptor: {error}"
                    ))
                })?;
                let fd = match <[OwnedFd; 1]>::try_from(fds) {
                    Ok([fd]) => fd,
                    Err(fds) => {
                        return Err(crate::decode_error::custom(format!(
                            "a shared memory ticket carried {} descriptors, not 1",
                            fds.len()
                        )));
                    }
                };
                Self::attach_anonymous(fd).map_err(crate::decode_error::custom)
            }
            Wire::Named(name) => Self::open(&name).map_err(crate::decode_error::custom),
        }
    }
}

/// A state struct that lives in shared memory and is reached through
/// [`Shared`].
///
/// # Safety
/// Implementors are `#[repr(C)]`, start with a `u64` tag field that holds
/// `TAG` once initialised, and mutate their contents only through atomics or
/// the pthread API (they are shared, unsynchronised, with other processes).
pub(crate) unsafe trait ShmState: Sync {
    /// Identifies the struct in memory, checked when a handle is decoded.
    const TAG: u64;
    /// What the struct is, for error messages.
    const KIND: &'static str;
}

/// Turns an 8-byte name into a tag.
pub(crate) const fn tag(name: &[u8; 8]) -> u64 {
    u64::from_le_bytes(*name)
}

/// A `T` placed in a segment at a fixed offset, together with the handle that
/// keeps it mapped. Clones share the memory; it travels between processes as
/// its segment plus the offset, and is checked (bounds, alignment, tag) when
/// decoded.
pub(crate) struct Shared<T: ShmState> {
    shm: SharedMemory,
    offset: usize,
    ptr: NonNull<T>,
}

// SAFETY: `T: ShmState` is `Sync` and only mutated through atomics or pthread
// calls; the pointer stays valid while `shm` (an `Arc`) lives.
unsafe impl<T: ShmState> Send for Shared<T> {}
// SAFETY: as above: shared references to `T` are what `T: Sync` permits.
unsafe impl<T: ShmState> Sync for Shared<T> {}

impl<T: ShmState> Clone for Shared<T> {
    fn clone(&self) -> Self {
        Self {
            shm: self.shm.clone(),
            offset: self.offset,
            ptr: self.ptr,
        }
    }
}

impl<T: ShmState> Shared<T> {
    /// A new anonymous segment just big enough for a `T`, initialised by `init`.
    ///
    /// # Safety
    /// `init` must fully initialise the `T` it is given (including its tag).
    pub(crate) unsafe fn create(
        init: impl FnOnce(*mut T) -> Result<(), ShmError>,
    ) -> Result<Self, ShmError> {
        let shm = SharedMemory::new(size_of::<T>())?;
        // SAFETY: forwarded contract.
        unsafe { Self::create_in(shm, 0, init) }
    }

    /// Initialises a `T` at `offset` of `shm` with `init`.
    ///
    /// # Safety
    /// `init` must fully initialise the `T` it is given (including its tag),
    /// and nobody else may be using that part of `shm` yet.
    pub(crate) unsafe fn create_in(
        shm: SharedMemory,
        offset: usize,
        init: impl FnOnce(*mut T) -> Result<(), ShmError>,
    ) -> Result<Self, ShmError> {
        let ptr = shm.region::<T>(offset)?;
        init(ptr.as_ptr())?;
        Ok(Self { shm, offset, ptr })
    }

    /// The `T` at `offset` of an existing segment, after checking its tag.
    pub(crate) fn attach(shm: SharedMemory, offset: usize) -> Result<Self, ShmError> {
        let ptr = shm.region::<T>(offset)?;
        // SAFETY: in bounds and aligned (region), and every `ShmState` starts
        // with a u64 tag; read it atomically as other processes may be live.
        let found = unsafe { (*ptr.cast::<AtomicU64>().as_ptr()).load(Ordering::Acquire) };
        if found != T::TAG {
            return Err(ShmError::WrongKind {
                expected: T::KIND,
                offset,
            });
        }
        Ok(Self { shm, offset, ptr })
    }

    /// The segment holding the `T`.
    pub(crate) fn shm(&self) -> &SharedMemory {
        &self.shm
    }

    /// The offset of the `T` in its segment.
    pub(crate) fn offset(&self) -> usize {
        self.offset
    }
}

impl<T: ShmState> std::ops::Deref for Shared<T> {
    type Target = T;

    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: the pointer is in bounds and aligned, the `T` was
        // initialised (create) or its tag checked (attach), the mapping lives
        // as long as `self.shm`, and `T` only allows shared mutation through
        // atomics/pthread calls.
        unsafe { self.ptr.as_ref() }
    }
}

impl<T: ShmState> Serialize for Shared<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (&self.shm, self.offset as u64).serialize(serializer)
    }
}

impl<'de, T: ShmState> Deserialize<'de> for Shared<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (shm, offset) = <(SharedMemory, u64)>::deserialize(deserializer)?;
        let offset = usize::try_from(offset).map_err(crate::decode_error::custom)?;
        Self::attach(shm, offset).map_err(crate::decode_error::custom)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn anonymous_read_write_and_bounds() {
        let shm = SharedMemory::new(100).unwrap();
        assert_eq!(shm.len(), 100);
        assert!(shm.name().is_none());
        let data: Vec<u8> = (0..37).collect();
        for offset in [0, 1, 7, 63] {
            shm.write_at(offset, &data).unwrap();
            let mut back = vec![0u8; data.len()];
            shm.clone().read_at(offset, &mut back).unwrap();
            assert_eq!(back, data);
        }
        assert!(matches!(
            shm.write_at(90, &data),
            Err(ShmError::OutOfBounds {
                offset: 90,
                len: 37,
                size: 100
            })
        ));
        assert!(matches!(
            shm.read_at(usize::MAX, &mut [0]),
            Err(ShmError::OutOfBounds { .. })
        ));
        assert!(matches!(shm.unlink(), Err(ShmError::Anonymous)));
    }

    #[test]
    fn invalid_sizes_and_names_are_errors() {
        assert!(matches!(
            SharedMemory::new(0),
            Err(ShmError::InvalidSize(0))
        ));
        assert!(matches!(
            SharedMemory::new(usize::MAX),
            Err(ShmError::InvalidSize(_))
        ));
        for name in ["", "/", "a/b", "..", "x\0y"] {
            assert!(
                matches!(SharedMemory::create(name, 8), Err(ShmError::InvalidName(_))),
                "{name:?}"
            );
        }
    }

    #[test]
    fn region_checks_bounds_and_alignment() {
        let shm = SharedMemory::new(64).unwrap();
        assert!(shm.region::<u64>(56).is_ok());
        assert!(matches!(
            shm.region::<u64>(60),
            Err(ShmError::OutOfBounds { .. })
        ));
        assert!(matches!(
            shm.region::<u64>(4),
            Err(ShmError::Misaligned {
                offset: 4,
                align: 8
            })
        ));
    }

    #[test]
    fn named_create_open_unlink() {
        let name = format!("mp-ipc-test-{}", std::process::id());
        let created = SharedMemory::create(&name, 4096).unwrap();
        assert!(matches!(
            SharedMemory::create(&name, 4096),
            Err(ShmError::AlreadyExists(_))
        ));
        created.write_at(100, b"named").unwrap();
        let opened = SharedMemory::open(&format!("/{name}")).unwrap();
        assert_eq!(opened.name(), Some(name.as_str()));
        assert_eq!(opened.len(), 4096);
        let mut buf = [0u8; 5];
        opened.read_at(100, &mut buf).unwrap();
        assert_eq!(&buf, b"named");
        opened.unlink().unwrap();
        assert!(matches!(
            SharedMemory::open(&name),
            Err(ShmError::NotFound(_))
        ));
        assert!(matches!(created.unlink(), Err(ShmError::NotFound(_))));
        // Still mapped after unlink.
        created.read_at(100, &mut buf).unwrap();
        assert_eq!(&buf, b"named");
    }
}
