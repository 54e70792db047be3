//! Large arguments and results through a memfd instead of socket fragments.
//!
//! ipc-channel encodes a message into one buffer, copies it into the socket in fragments, and
//! the receiver allocates a second buffer of the message's size to gather them before
//! decoding. For a 1 MiB argument that is two fresh 1 MiB buffers and two copies besides the
//! decoded value, and in a freshly started child every page of a fresh buffer is a page
//! fault (about 1 ms per MiB on a VM): most of the cost of sending 1 MiB to a new process.
//!
//! [`Packed`] wraps the argument and the result of a process. Its encoding is streamed (no
//! intermediate buffer) into a memfd once it outgrows [`SPILL`]; the memfd is handed over on
//! the process's *sidecar*, a socket pair the parent made for the child, and the message
//! itself only says how long it is. Smaller values travel inline, as before, at the cost of
//! one extra small copy.
//!
//! The receiver maps the memfd (the sender's pages, already in memory: nothing to fault in but
//! page table entries) and decodes straight from the mapping.
//!
//! ## Reused memfds (values up to [`POOLED_MAX`])
//!
//! Most of the cost of a fresh memfd is not the copy but the memory behind it: every page
//! written is a new shared-memory page (allocated, zeroed, charged, put on the LRU), freed
//! again when the last descriptor closes; for 1 MiB through a new process and back, 512 page
//! allocations and frees on the critical path (measured: 1 MiB echo through a new process
//! 1.65 -> 0.99 ms without them). So the memfd of a value up to [`POOLED_MAX`] is reused:
//! written with `pwrite` over the pages it already has, and kept in the receiving process's
//! [pool](take_memfd) once decoded. It cycles between the two ends of a process: the parent
//! writes the argument into a memfd of its pool; the child decodes it, keeps it in its own
//! pool and writes its result into it; the parent decodes the result and takes the memfd
//! back into its pool.
//!
//! A reused memfd cannot be sealed (a seal is for ever), so what keeps its bytes still while
//! the receiver decodes from a mapping is ownership, which passes along the cycle and is
//! never shared: a pool entry, the encoder writing into it ([`Spill`]), the sidecar message
//! in flight, the decoder mapping it. Each step gives up its descriptor when it passes the
//! memfd on (the encoder closes its descriptor once the memfd is sent; the decoder unmaps
//! before it gives it back to the pool), and only the owner writes. A copy of a descriptor
//! that a `fork` makes is never written: the pool's entries carry the pid of the process
//! that put them there and a forked copy of that process discards them, and an encoder or
//! decoder running on another thread at the fork does not exist in the copy. (Nothing stops
//! code that writes to a descriptor it does not own, as with any file a program maps; that
//! breaks Rust's I/O safety already.) A memfd in the pool still holds the last value written
//! to it, beyond the end of the next one: it is only given to this process's children (the
//! same program), so nothing leaves the program.
//!
//! ## Sealed memfds (larger values)
//!
//! The memfd of a larger value is sealed against writing, shrinking and growing once written
//! (and so never reused): a value that large is rare, and a pool of such memfds would hold
//! too much memory while idle. The seals also make the kernel, not ownership alone, keep its
//! bytes still.
//!
//! The value's own descriptors (queues, locks, shared memory handles...) still travel in the
//! ipc-channel message: ipc-channel collects them in thread-local tables while the message is
//! encoded and decoded, and the nested encoding here runs inside that, in the same order.

use std::cell::Cell;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::{Mutex, MutexGuard};

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::net::{RecvFlags, SendFlags};
use serde::de::{DeserializeOwned, Error as _};
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::decode_error;

/// Encodings up to this size travel inline in the ipc-channel message; larger ones in a memfd
/// (whose set-up costs about ten system calls, which only pays off for large values). Lower
/// if the system's socket buffers are small: see [`spill_limit`].
pub(crate) const SPILL: usize = 64 * 1024;

/// The largest encoding that travels inline: [`SPILL`], or a quarter of a fresh socket's send
/// buffer if that is less.
///
/// This bound is what lets a [`Packed`] message be sent before its receiver reads (the
/// argument of a spawned child is sent while the child starts): a message this small is one
/// ipc-channel fragment that fits in an empty socket's buffer, so the send never blocks.
/// The sidecar is a socket pair of the same kind as ipc-channel's, with the same default
/// buffer sizes.
fn spill_limit(sidecar: BorrowedFd<'_>) -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        rustix::net::sockopt::socket_send_buffer_size(sidecar)
            .map_or(4096, |size| (size / 4).clamp(4096, SPILL))
    })
}

/// The largest encoding whose memfd is reused (see the module docs); a larger one is sealed
/// and mapped by its receiver.
pub(crate) const POOLED_MAX: u64 = 4 << 20;

/// The most memfds a process keeps for reuse: with those of [`POOLED_MAX`], at most 16 MiB
/// of shared memory held while idle (usually one memfd of the size of the largest value).
const POOL_CAPACITY: usize = 4;

/// This process's memfds for reuse, each with the pid of the process that put it there.
///
/// The pid is what keeps a forked copy of this process (the `fork` start method, or a
/// program's own `fork()`) from writing into a memfd that is this process's: a copy
/// inherits the pool and its descriptors (a `fork` child drops its inherited copies on first
/// use, see [`take_memfd`]), but only the process that filled an entry ever takes it.
static POOL: Mutex<Vec<(u32, OwnedFd)>> = Mutex::new(Vec::new());

/// Taken by the forking thread across `fork()`, so the child never inherits the pool's lock
/// held.
pub(crate) fn hold_across_fork() -> MutexGuard<'static, impl Sized> {
    crate::fork_lock::lock(&POOL)
}

/// This process's pool, without the entries a fork copied from another process's (closed
/// here: only their owner may write into them).
fn pool() -> MutexGuard<'static, Vec<(u32, OwnedFd)>> {
    let me = std::process::id();
    let mut pool = crate::fork_lock::lock(&POOL);
    pool.retain(|(pid, _)| *pid == me);
    pool
}

/// A memfd to write a value into: one from this process's pool (its pages already
/// allocated), or a fresh one.
fn take_memfd() -> std::io::Result<std::fs::File> {
    if let Some((_, memfd)) = pool().pop() {
        return Ok(memfd.into());
    }
    Ok(rustix::fs::memfd_create(
        c"multiproc-payload",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )?
    .into())
}

/// Keeps `memfd` (unsealed, read) for reuse, unless the pool is full.
fn give_back(memfd: OwnedFd) {
    let mut pool = pool();
    if pool.len() < POOL_CAPACITY {
        pool.push((std::process::id(), memfd));
    }
}

/// Computes what the children of this process would each compute once (the spill limit,
/// from `socket`, a fresh socket pair of the sidecars' kind), so that they inherit it: for
/// a fork server, before it forks.
pub(crate) fn warm_up(socket: BorrowedFd<'_>) {
    spill_limit(socket);
}

/// The seals a memfd must carry before the receiver maps it: nobody can shrink it under the
/// mapping (which would make reading it fault) or change it while it is decoded.
const SEALS: SealFlags = SealFlags::SHRINK
    .union(SealFlags::GROW)
    .union(SealFlags::WRITE)
    .union(SealFlags::SEAL);

thread_local! {
    /// The sidecar of the transfer running on this thread (see [`with_sidecar`]).
    static SIDECAR: Cell<Option<RawFd>> = const { Cell::new(None) };
    /// Whether the receive running on this thread is a fresh child's argument (see
    /// [`receiving_child_argument`]).
    static CHILD_ARGUMENT: Cell<bool> = const { Cell::new(false) };
    /// Whether an encoding on this thread handed a memfd over since [`take_spilled`] last
    /// looked.
    static SPILLED: Cell<bool> = const { Cell::new(false) };
}

/// Whether an encoding on this thread handed a memfd over since the last call.
pub(crate) fn take_spilled() -> bool {
    SPILLED.with(|spilled| spilled.replace(false))
}

/// Runs `f` (the receive of the argument of a child that mp-core started, in a process that
/// runs one function) so that a large argument is decoded into populated memory.
///
/// In a fresh process every page the decoded value occupies is a page fault (256 for a
/// 1 MiB `Vec`, most of the faults of a 1 MiB echo through a new process). Before decoding
/// a memfd of `len` bytes, [`prepare_heap`] makes the allocator hold `len` bytes of
/// populated memory, in one `madvise` call (measured: 320 -> 65 page faults and 5 % less CPU
/// per 1 MiB echo). Only for a child's argument: a long-lived process's heap is warm, and
/// its allocation pattern is its own business.
pub(crate) fn receiving_child_argument<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            CHILD_ARGUMENT.with(|slot| slot.set(self.0));
        }
    }
    let _restore = Restore(CHILD_ARGUMENT.with(|slot| slot.replace(true)));
    f()
}

/// The largest value [`prepare_heap`] prepares for: glibc's dynamic mmap threshold stops at
/// 32 MiB (`DEFAULT_MMAP_THRESHOLD_MAX`), so a larger block would be unmapped again when
/// freed, its populated pages wasted.
const PREPARE_LIMIT: usize = 32 << 20;

/// Makes the next allocations of up to `len` bytes come from populated memory (see
/// [`receiving_child_argument`]): allocates `len` bytes, populates them with one
/// `MADV_POPULATE_WRITE` and frees them, so the allocator hands the same pages to the
/// decoder.
///
/// With glibc's malloc a block this large is first served by `mmap` (unmapped again when
/// freed: nothing gained), but freeing it raises the dynamic mmap threshold above `len`
/// (glibc's documented behaviour, unless the program fixed `M_MMAP_THRESHOLD`), so the
/// second block comes from the heap, and its freed pages stay there (the trim threshold
/// becomes twice the block). With other allocators the second block is likely reused too;
/// if not, the cost is one `madvise` of `len` bytes. A kernel without
/// `MADV_POPULATE_WRITE` (before 5.14) refuses it: the decoder then faults its pages in as
/// before. Not beyond [`PREPARE_LIMIT`].
fn prepare_heap(len: usize) {
    // SAFETY: sysconf only reads a system parameter.
    let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        size if size > 0 => size as usize,
        _ => return,
    };
    if len < 2 * page || len > PREPARE_LIMIT {
        return;
    }
    let Ok(layout) = std::alloc::Layout::from_size_align(len, 1) else {
        return;
    };
    // SAFETY: `layout` has a non-zero size; each block is freed with the layout it was
    // allocated with, and nothing reads or writes it. (`black_box`: the compiler may not
    // elide this pair, whose side effect on the allocator is the point.)
    let first = std::hint::black_box(unsafe { std::alloc::alloc(layout) });
    if first.is_null() {
        return;
    }
    // SAFETY: as above.
    unsafe { std::alloc::dealloc(first, layout) };
    // SAFETY: as above.
    let block = unsafe { std::alloc::alloc(layout) };
    if block.is_null() {
        return;
    }
    let skip = (block as usize).next_multiple_of(page) - block as usize;
    let whole = (len - skip) & !(page - 1);
    // SAFETY: [block + skip, block + skip + whole) is whole pages inside the block just
    // allocated (skip < page and whole <= len - skip), which nothing else uses;
    // MADV_POPULATE_WRITE only faults its pages in (writable, their contents unchanged), as
    // writing to them would.
    let _ = unsafe {
        rustix::mm::madvise(
            block.add(skip).cast(),
            whole,
            rustix::mm::Advice::LinuxPopulateWrite,
        )
    };
    // SAFETY: allocated above with `layout`, not used since.
    unsafe { std::alloc::dealloc(block, layout) };
}

/// Runs `f` (one ipc-channel send or receive of a [`Packed`] value) with `sidecar` as the
/// socket that carries the memfd of a large value. Without one, values travel inline.
pub(crate) fn with_sidecar<T>(sidecar: BorrowedFd<'_>, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<RawFd>);
    impl Drop for Restore {
        fn drop(&mut self) {
            SIDECAR.with(|slot| slot.set(self.0));
        }
    }
    let _restore = Restore(SIDECAR.with(|slot| slot.replace(Some(sidecar.as_raw_fd()))));
    f()
}

/// The sidecar set by [`with_sidecar`] on this thread.
fn sidecar() -> Option<BorrowedFd<'static>> {
    // SAFETY: the descriptor is borrowed for the duration of a `with_sidecar` call, which
    // encloses every encode and decode that reads it (the slot is restored when it returns);
    // the 'static lifetime never escapes the functions below.
    SIDECAR
        .with(Cell::get)
        .map(|fd| unsafe { BorrowedFd::borrow_raw(fd) })
}

/// A socket pair for the memfds of one process's argument and result: one end stays with
/// the parent's [`Child`](crate::Child), the other goes to the child.
pub(crate) fn sidecar_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )?)
}

/// A process's argument or result, encoded with postcard: inline when small, in a memfd sent
/// on the sidecar when large (see the module docs).
pub(crate) struct Packed<T>(pub T);

/// What the ipc-channel message carries for a [`Packed`] value.
#[derive(Serialize, Deserialize)]
enum Wire<'a> {
    /// The postcard encoding of the value.
    Inline(#[serde(borrow)] Bytes<'a>),
    /// The encoding is in the memfd next in line on the sidecar, this many bytes long.
    Shared(u64),
}

/// A byte slice encoded as bytes (serde encodes `&[u8]` as a sequence of `u8`s, one call each).
struct Bytes<'a>(&'a [u8]);

impl Serialize for Bytes<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Bytes<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        <&'de [u8]>::deserialize(deserializer).map(Bytes)
    }
}

impl<T: Serialize> Serialize for Packed<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let sidecar = sidecar();
        let mut spill = Spill {
            buffer: Vec::new(),
            file: None,
            written: 0,
            len: 0,
            error: None,
            limit: sidecar.map(spill_limit),
        };
        let encoded = postcard::serialize_with_flavor(&self.0, &mut spill);
        if let Some(error) = spill.error.take() {
            return Err(S::Error::custom(format!(
                "cannot write a large value: {error}"
            )));
        }
        if let Err(error) = encoded {
            // postcard dropped the custom message of whatever refused (and ipc-channel's
            // postcard would drop ours): find it again and note it for the error report,
            // unless a handle already noted its own reason.
            if let Some(cause) = crate::encode_failure_cause(&self.0) {
                decode_error::note_if_none(cause);
            }
            return Err(S::Error::custom(error));
        }
        match (spill.file.take(), sidecar) {
            (Some(file), Some(sidecar)) => {
                spill
                    .flush(&file)
                    .and_then(|()| hand_over(sidecar, file, spill.len > POOLED_MAX))
                    .map_err(|e| {
                        S::Error::custom(format!("cannot hand over a large value: {e}"))
                    })?;
                SPILLED.with(|spilled| spilled.set(true));
                Wire::Shared(spill.len).serialize(serializer)
            }
            _ => Wire::Inline(Bytes(&spill.buffer)).serialize(serializer),
        }
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Packed<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Wire::deserialize(deserializer)? {
            Wire::Inline(Bytes(bytes)) => postcard::from_bytes(bytes).map(Packed),
            Wire::Shared(len) => {
                let fail = |message: String| {
                    decode_error::note_decode_failure(&message);
                    D::Error::custom(message)
                };
                let sidecar = sidecar()
                    .ok_or_else(|| fail("a large value came without its sidecar".into()))?;
                let (memfd, sealed) = receive_memfd(sidecar)
                    .map_err(|e| fail(format!("cannot receive a large value: {e}")))?;
                let len =
                    usize::try_from(len).map_err(|_| fail("a large value is too large".into()))?;
                let child_argument = CHILD_ARGUMENT.with(Cell::get);
                // SAFETY: a sealed memfd cannot change; an unsealed one is a reused memfd,
                // which this decoder owns until it gives it back below, after the mapping is
                // gone (see the module docs).
                let mapping = unsafe { Mapping::new(&memfd, len) }
                    .map_err(|e| fail(format!("cannot map a large value: {e}")))?;
                if child_argument {
                    prepare_heap(len);
                }
                let decoded = postcard::from_bytes(mapping.bytes()).map(Packed);
                drop(mapping);
                if !sealed {
                    give_back(memfd);
                }
                decoded
            }
        }
        .map_err(D::Error::custom)
    }
}

/// A postcard flavor that keeps the encoding in memory up to [`SPILL`] bytes, then streams it
/// into a memfd (from [`take_memfd`]) through a buffer of that size (a large byte string is
/// written straight from the value). Writes are positioned (`pwrite`): a reused memfd's file
/// offset is shared with every process that held it.
struct Spill {
    buffer: Vec<u8>,
    file: Option<std::fs::File>,
    /// Bytes written to the file so far.
    written: u64,
    /// Bytes of the encoding so far.
    len: u64,
    /// The I/O error that stopped the encoding (postcard's error type cannot carry it).
    error: Option<std::io::Error>,
    /// The size beyond which the encoding goes to a memfd; `None`: never (no sidecar).
    limit: Option<usize>,
}

impl Spill {
    fn flush(&mut self, file: &std::fs::File) -> std::io::Result<()> {
        write_at(file, &self.buffer, &mut self.written)?;
        self.buffer.clear();
        Ok(())
    }

    fn extend(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.len += data.len() as u64;
        let limit = self.limit.unwrap_or(usize::MAX);
        if self.file.is_none() && self.buffer.len() + data.len() <= limit {
            self.buffer.extend_from_slice(data);
            return Ok(());
        }
        if self.file.is_some() && self.buffer.len() + data.len() <= SPILL {
            // Staging: written to the memfd in blocks of up to SPILL bytes.
            self.buffer.extend_from_slice(data);
            return Ok(());
        }
        let file = match self.file.take() {
            Some(file) => file,
            None => take_memfd()?,
        };
        let written = self.flush(&file).and_then(|()| {
            if data.len() >= SPILL {
                write_at(&file, data, &mut self.written)
            } else {
                self.buffer.extend_from_slice(data);
                Ok(())
            }
        });
        self.file = Some(file);
        written
    }
}

/// Writes all of `data` at `*offset` and moves the offset past it.
fn write_at(file: &std::fs::File, data: &[u8], offset: &mut u64) -> std::io::Result<()> {
    file.write_all_at(data, *offset)?;
    *offset += data.len() as u64;
    Ok(())
}

impl postcard::ser_flavors::Flavor for &mut Spill {
    type Output = ();

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.try_extend(&[data])
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.extend(data).map_err(|e| {
            self.error = Some(e);
            postcard::Error::SerializeBufferFull
        })
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Sends `file` on `sidecar` (one datagram: a byte and the descriptor), sealed first if
/// `seal` (a value too large to reuse its memfd: the receiver maps it).
fn hand_over(sidecar: BorrowedFd<'_>, file: std::fs::File, seal: bool) -> std::io::Result<()> {
    if seal {
        rustix::fs::fcntl_add_seals(&file, SEALS)?;
    }
    crate::sys::send_datagram(sidecar, &[1], Some(file.as_fd()), SendFlags::empty())
}

/// Rings a child's outcome bell, its end of the sidecar (see `protocol::SIDECAR_FD`): one
/// datagram without a descriptor, which wakes the parent's `join`. Never blocks: a sidecar
/// too full to take it is readable already.
pub(crate) fn ring(sidecar: BorrowedFd<'_>) {
    let _ = crate::sys::send_datagram(sidecar, &[0], None, SendFlags::DONTWAIT);
}

/// Takes the memfd waiting on `sidecar` (sent before the message that announced it, so it is
/// there already), and whether it carries [`SEALS`] (otherwise it is a reused memfd, see the
/// module docs). A ring of the outcome bell before it (a datagram without a descriptor, see
/// [`ring`]) is passed over.
fn receive_memfd(sidecar: BorrowedFd<'_>) -> std::io::Result<(OwnedFd, bool)> {
    loop {
        let mut byte = [0u8; 1];
        let (received, memfd) = crate::sys::recv_datagram(sidecar, &mut byte, RecvFlags::DONTWAIT)?;
        if received == 0 {
            return Err(std::io::Error::other(
                "the sidecar closed before the memfd came",
            ));
        }
        match memfd {
            Some(memfd) => {
                let sealed = rustix::fs::fcntl_get_seals(&memfd)?.contains(SEALS);
                return Ok((memfd, sealed));
            }
            // A ring: the memfd is behind it.
            None if byte == [0] => continue,
            None => {
                return Err(std::io::Error::other(
                    "the sidecar message carried no memfd",
                ));
            }
        }
    }
}

/// A read-only private mapping of the first `len` bytes of a sealed memfd.
struct Mapping {
    address: *mut std::ffi::c_void,
    len: usize,
}

impl Mapping {
    /// Maps the first `len` bytes of `memfd`.
    ///
    /// # Safety
    ///
    /// Nothing may write to `memfd`, shrink it or grow it until the mapping is dropped: it is
    /// sealed against that (`SEALS`), or it is a reused memfd that the caller owns (see the
    /// module docs).
    unsafe fn new(memfd: &OwnedFd, len: usize) -> std::io::Result<Mapping> {
        let size = rustix::fs::fstat(memfd)?.st_size;
        if !u64::try_from(size).is_ok_and(|size| size >= len as u64) {
            return Err(std::io::Error::other(format!(
                "the memfd holds {size} bytes, not the {len} announced"
            )));
        }
        if len == 0 {
            return Ok(Mapping {
                address: std::ptr::NonNull::dangling().as_ptr(),
                len,
            });
        }
        // SAFETY: a fresh mapping at an address of the kernel's choosing (it aliases no Rust
        // object), of a memfd that nothing writes to or resizes while the mapping lives (this
        // function's contract), at least `len` bytes long (checked above): every byte of the
        // mapping stays readable and unchanged until it is unmapped in `drop`. No POPULATE:
        // the pages are in memory already (written by the sender), and the kernel's
        // fault-around maps 16 of them per fault, which costs less than POPULATE's page by
        // page walk (measured: 4 % less CPU per 1 MiB echo through a new process, for 26 more
        // minor faults).
        let address = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ,
                rustix::mm::MapFlags::PRIVATE,
                memfd,
                0,
            )?
        };
        Ok(Mapping { address, len })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `address` is a live, readable mapping of `len` bytes (or a dangling,
        // well-aligned pointer for zero bytes) that nothing writes to (see `new`); the slice
        // borrows `self`, so it cannot outlive the mapping.
        unsafe { std::slice::from_raw_parts(self.address.cast::<u8>(), self.len) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the mapping made in `new`; no slice of it outlives `self`.
            let _ = unsafe { rustix::mm::munmap(self.address, self.len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a sidecar, every value travels inline.
    fn round_trip<T: Serialize + DeserializeOwned>(value: T) -> T {
        let bytes = postcard::to_stdvec(&Packed(value)).unwrap();
        postcard::from_bytes::<Packed<T>>(&bytes).unwrap().0
    }

    #[test]
    fn a_ring_before_a_memfd_is_passed_over_and_a_closed_sidecar_is_an_error() {
        let (ours, theirs) = sidecar_pair().unwrap();
        let value: Vec<u32> = (0..(SPILL as u32)).collect();
        ring(ours.as_fd());
        let encoded = with_sidecar(ours.as_fd(), || {
            postcard::to_stdvec(&Packed(&value)).unwrap()
        });
        ring(ours.as_fd());
        let decode = || {
            with_sidecar(theirs.as_fd(), || {
                postcard::from_bytes::<Packed<Vec<u32>>>(&encoded).map(|packed| packed.0)
            })
        };
        assert_eq!(decode().unwrap(), value);
        // Only the second ring is left; then the child's end closes.
        drop(ours);
        decode_error::clear();
        let error = decode_error::describe::<Vec<u32>>(decode().unwrap_err());
        assert!(error.contains("closed before the memfd"), "{error}");
    }

    #[test]
    fn small_and_large_values_round_trip_with_and_without_a_sidecar() {
        // What is sent on one end of the pair is received on the other.
        let (ours, theirs) = sidecar_pair().unwrap();
        for len in [0, 1, SPILL - 8, SPILL, SPILL + 1, 3 * SPILL + 17, 1 << 20] {
            let value: Vec<u32> = (0..len as u32 / 4).collect();
            let text = "x".repeat(len);
            assert_eq!(round_trip(value.clone()), value);
            assert_eq!(round_trip((text.clone(), 7u8)), (text, 7u8));
            let encoded = with_sidecar(ours.as_fd(), || {
                postcard::to_stdvec(&Packed(&value)).unwrap()
            });
            let decoded: Vec<u32> = with_sidecar(theirs.as_fd(), || {
                postcard::from_bytes::<Packed<Vec<u32>>>(&encoded)
                    .unwrap()
                    .0
            });
            assert_eq!(decoded, value);
            // postcard's variant index comes first: `Wire::Shared` is 1.
            let spilled = encoded[0] == 1;
            let plain = postcard::to_stdvec(&value).unwrap().len();
            let limit = spill_limit(ours.as_fd());
            assert_eq!(spilled, plain > limit, "{plain} bytes: spilled {spilled}");
        }
    }

    #[test]
    fn a_large_value_without_its_memfd_is_a_typed_failure() {
        let (ours, theirs) = sidecar_pair().unwrap();
        let encoded = with_sidecar(ours.as_fd(), || {
            postcard::to_stdvec(&Packed(vec![1u8; 2 * SPILL])).unwrap()
        });
        // Take the memfd away before decoding.
        let _ = receive_memfd(theirs.as_fd()).unwrap();
        decode_error::clear();
        let result = with_sidecar(theirs.as_fd(), || {
            postcard::from_bytes::<Packed<Vec<u8>>>(&encoded)
        });
        assert!(result.is_err());
        let described = decode_error::describe::<Vec<u8>>("failed");
        assert!(
            described.contains("cannot receive a large value"),
            "{described}"
        );
    }

    /// The inode of the memfd at the top of this process's pool.
    fn pooled_inode() -> Option<u64> {
        pool()
            .last()
            .map(|(_, memfd)| rustix::fs::fstat(memfd).unwrap().st_ino)
    }

    fn send_and_receive(value: &Vec<u8>, ours: &OwnedFd, theirs: &OwnedFd) -> Vec<u8> {
        let encoded = with_sidecar(ours.as_fd(), || {
            postcard::to_stdvec(&Packed(value)).unwrap()
        });
        with_sidecar(theirs.as_fd(), || {
            postcard::from_bytes::<Packed<Vec<u8>>>(&encoded).unwrap().0
        })
    }

    #[test]
    fn memfds_up_to_the_pooled_size_are_reused_and_larger_ones_are_sealed() {
        let (ours, theirs) = sidecar_pair().unwrap();
        assert_eq!(pooled_inode(), None);
        // Largest first: a smaller value written over it is read back exactly.
        let large = vec![7u8; 3 * SPILL];
        assert_eq!(send_and_receive(&large, &ours, &theirs), large);
        let reused = pooled_inode().expect("the memfd went back to the pool");
        let small: Vec<u8> = (0..2 * SPILL).map(|i| i as u8).collect();
        assert_eq!(send_and_receive(&small, &ours, &theirs), small);
        assert_eq!(pooled_inode(), Some(reused), "the same memfd, again");
        assert_eq!(pool().len(), 1);
        // Too large to keep: sealed, mapped, closed.
        let huge = vec![9u8; POOLED_MAX as usize + 1];
        let encoded = with_sidecar(ours.as_fd(), || {
            postcard::to_stdvec(&Packed(&huge)).unwrap()
        });
        assert_eq!(
            pool().len(),
            0,
            "the pooled memfd was taken for the huge value"
        );
        assert_eq!(
            with_sidecar(theirs.as_fd(), || {
                postcard::from_bytes::<Packed<Vec<u8>>>(&encoded).unwrap().0
            }),
            huge
        );
        assert_eq!(pool().len(), 0, "a sealed memfd is not reused");
    }

    #[test]
    fn pool_entries_of_another_process_are_never_taken() {
        let (ours, theirs) = sidecar_pair().unwrap();
        let value = vec![3u8; 2 * SPILL];
        assert_eq!(send_and_receive(&value, &ours, &theirs), value);
        let inherited = pooled_inode().unwrap();
        // As a forked copy would find it: the entry names its parent.
        for entry in crate::fork_lock::lock(&POOL).iter_mut() {
            entry.0 = std::process::id() + 1;
        }
        assert_eq!(pool().len(), 0, "the inherited entry is discarded");
        assert_eq!(send_and_receive(&value, &ours, &theirs), value);
        assert_ne!(pooled_inode(), Some(inherited), "a fresh memfd");
    }
}
