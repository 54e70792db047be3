//! Where a ring's memory comes from.
//!
//! * [`MemFile`]: the file behind the out-of-band heap, read and written
//!   directly: a memfd owned from its creation (or received through the
//!   [transport](crate::transport)), or, for tests, a byte vector.
//! * [`Source`]: how the header page and the ring bytes were obtained (and
//!   are given back): mapped from the memfd (the ring mapped twice back to
//!   back), or allocated on the heap for tests. A heap ring is `2 × capacity`
//!   plain bytes: every frame is written and read through the same
//!   contiguous range, so the protocol behaves as on the double mapping
//!   (nothing relies on the aliasing), without system calls — for Miri.

use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;

/// How the header and ring bytes of a [`Ring`](super::Ring) were obtained.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// `mmap` of the memfd: header page, ring mapped twice.
    Mapped,
    /// `alloc_zeroed` (tests): header page and `2 × capacity` bytes.
    #[cfg_attr(not(test), allow(dead_code))]
    Heap,
}

/// Largest single read or write Linux performs.
const MAX_IO: usize = 0x7fff_f000;

/// The file behind a ring: a memfd, or (tests) bytes on the heap with the
/// same semantics (writes past the end grow it, punched ranges read as zeros).
#[derive(Debug)]
pub(crate) struct MemFile {
    backing: Backing,
}

#[derive(Debug)]
enum Backing {
    File(fs::File),
    #[cfg_attr(not(test), allow(dead_code))]
    Heap(parking_lot::Mutex<Vec<u8>>),
}

impl MemFile {
    /// A new, empty memfd of `len` bytes (close-on-exec).
    pub(crate) fn create(name: &str, len: u64) -> io::Result<MemFile> {
        let fd = rustix::fs::memfd_create(name, rustix::fs::MemfdFlags::CLOEXEC)?;
        let file = MemFile::from_fd(fd);
        file.set_len(len)?;
        Ok(file)
    }

    /// A memfd received from another process.
    pub(crate) fn from_fd(fd: OwnedFd) -> MemFile {
        MemFile {
            backing: Backing::File(fd.into()),
        }
    }

    /// `len` zero bytes on the heap (tests).
    #[cfg(test)]
    pub(crate) fn on_heap(len: u64) -> MemFile {
        MemFile {
            backing: Backing::Heap(parking_lot::Mutex::new(vec![0; len as usize])),
        }
    }

    pub(crate) fn len(&self) -> io::Result<u64> {
        match &self.backing {
            Backing::File(file) => Ok(file.metadata()?.len()),
            Backing::Heap(bytes) => Ok(bytes.lock().len() as u64),
        }
    }

    pub(crate) fn set_len(&self, len: u64) -> io::Result<()> {
        match &self.backing {
            Backing::File(file) => file.set_len(len),
            Backing::Heap(bytes) => {
                bytes.lock().resize(len as usize, 0);
                Ok(())
            }
        }
    }

    pub(crate) fn read_exact_at(&self, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        let file = match &self.backing {
            Backing::File(file) => file,
            Backing::Heap(bytes) => {
                let bytes = bytes.lock();
                let range = heap_range(offset, buf.len(), bytes.len())
                    .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
                buf.copy_from_slice(&bytes[range]);
                return Ok(());
            }
        };
        while !buf.is_empty() {
            let chunk = buf.len().min(MAX_IO);
            file.read_exact_at(&mut buf[..chunk], offset)?;
            buf = &mut buf[chunk..];
            offset += chunk as u64;
        }
        Ok(())
    }

    pub(crate) fn write_all_at(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        let file = match &self.backing {
            Backing::File(file) => file,
            Backing::Heap(bytes) => {
                let mut bytes = bytes.lock();
                let end = offset as usize + buf.len();
                if bytes.len() < end {
                    bytes.resize(end, 0);
                }
                bytes[offset as usize..end].copy_from_slice(buf);
                return Ok(());
            }
        };
        while !buf.is_empty() {
            let chunk = buf.len().min(MAX_IO);
            file.write_all_at(&buf[..chunk], offset)?;
            buf = &buf[chunk..];
            offset += chunk as u64;
        }
        Ok(())
    }

    /// Frees the pages of `[offset, offset + len)`; they read back as zeros.
    pub(crate) fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::FallocateFlags;
        match &self.backing {
            Backing::File(file) => rustix::fs::fallocate(
                file,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
                offset,
                len,
            )
            .map_err(io::Error::from),
            Backing::Heap(bytes) => {
                let mut bytes = bytes.lock();
                let start = (offset as usize).min(bytes.len());
                let end = (offset.saturating_add(len) as usize).min(bytes.len());
                bytes[start..end].fill(0);
                Ok(())
            }
        }
    }

    /// The memfd (`None` on the heap).
    pub(crate) fn as_fd(&self) -> Option<BorrowedFd<'_>> {
        match &self.backing {
            Backing::File(file) => Some(file.as_fd()),
            Backing::Heap(_) => None,
        }
    }
}

/// `offset..offset + len` if it lies within `size` bytes.
fn heap_range(offset: u64, len: usize, size: usize) -> Option<std::ops::Range<usize>> {
    let start = usize::try_from(offset).ok()?;
    let end = start.checked_add(len)?;
    (end <= size).then_some(start..end)
}
