//! The ring's memory file: a memfd owned from its creation (or received
//! through the [transport](crate::transport)), read and written directly
//! for the out-of-band heap.

use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;

/// Largest single read or write Linux performs.
const MAX_IO: usize = 0x7fff_f000;

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
