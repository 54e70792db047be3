//! mp-ipc: communication and synchronisation between processes, Python
//! `multiprocessing` style, over shared memory and futexes.
//!
//! ```
//! use mp_core::Process;
//! use mp_ipc::{Lock, Queue, Value};
//!
//! // A queue and a counter shared with a child: handles passed as arguments are the same
//! // objects in the child.
//! let queue: Queue<String> = Queue::bounded(16)?;
//! let counter = Value::new(0u64)?;
//! let child = Process::new(|(queue, counter): (Queue<String>, Value<u64>)| {
//!     for word in ["hello", "from", "the", "child"] {
//!         queue.put(word.to_string()).unwrap();
//!         *counter.lock().unwrap() += 1;
//!     }
//! })
//! .args((queue.clone(), counter.clone()))
//! .start()?;
//! let words: Vec<String> = (0..4).map(|_| queue.get()).collect::<Result<_, _>>()?;
//! child.join()?;
//! assert_eq!(words.join(" "), "hello from the child");
//! assert_eq!(counter.get()?, 4);
//!
//! let lock = Lock::new()?;
//! // An RAII guard; a dead holder is reported as OwnerDied (with the guard), never a hang.
//! let guard = lock.lock().map_err(mp_ipc::LockError::without_guard)?;
//! drop(guard);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! * Data plane: [`Pipe`]/[`Connection`] (message boundaries kept, `Closed` when every handle
//!   of the peer end is gone, in any process), [`Queue`], [`SimpleQueue`], [`JoinableQueue`]
//!   (a shared-memory ring with futex wake-ups; a process killed mid-put or mid-get never
//!   corrupts it), [`Listener`]/[`Client`] with an authkey challenge.
//! * Synchronisation: [`Lock`], [`RLock`] (robust: if the holder dies, the next acquirer
//!   gets [`LockError::OwnerDied`] with the guard), [`Semaphore`], [`BoundedSemaphore`],
//!   [`Event`], [`Condition`], [`Barrier`].
//! * Shared memory: [`SharedMemory`] (anonymous memfd by default, named on request),
//!   [`Value`], [`Array`] (Python's `ShareableList`: an `Array` of plain-old-data).
//!
//! Every primitive is `Clone` (same object), `Send + Sync`, and `Serialize + Deserialize`
//! for travelling as a process argument (through ipc-channel; the descriptors of queues and
//! pipes travel beside it with `SCM_RIGHTS`); every primitive also travels inside
//! `Connection::send` messages and `Queue::put` items. It is freed when the last handle in
//! the last process is dropped. Every blocking call has `try_` and `_timeout` variants.
//!
//! Nothing reads `/proc`: descriptors are owned from creation, the end of a pipe is told by
//! the kernel (a hang-up on a pipe every handle holds), blocking calls sleep in the kernel,
//! and a readable [`Connection`] is [`AsFd`](std::os::fd::AsFd) for epoll, mio or tokio.
//! The design — who owns which descriptor, how liveness is signalled, what a message looks
//! like on the wire — is [`transport_design`] (`TRANSPORT.md` next to this crate's
//! `Cargo.toml`).

// Base layer: shared memory, futex wake-ups, robust process-shared mutex.
mod after_fork;
mod decode_error;
mod futex;
mod presence;
mod robust;
pub mod shm;
mod shm_tracker;

// Synchronisation primitives.
pub mod barrier;
pub mod condition;
pub mod event;
pub mod lock;
pub mod raw_value;
pub mod semaphore;
pub mod value;

pub use barrier::{Barrier, BarrierBuilder, BarrierError};
pub use condition::{Condition, WaitError};
pub use event::{Event, EventTimeout};
pub use lock::{ConditionLock, Guard, Lock, LockError, LockGuard, NotOwner, RLock, RLockGuard};
pub use raw_value::{RawArray, RawValue};
pub use semaphore::{BoundedSemaphore, Semaphore, SemaphoreError, SemaphoreGuard};
pub use shm::{SharedMemory, ShmError};
pub use value::{Array, ArrayGuard, Pod, Value, ValueGuard};

// Data plane.
pub mod connection;
pub mod listener;
mod liveness;
mod message_handles;
pub mod queue;
#[doc = include_str!("../TRANSPORT.md")]
pub mod transport_design {}
mod ring;
mod transport;

/// Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, which only that crate
/// enables): not part of the API, no stability promise.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod __fuzz {
    use crate::ring::{RawBytes, Ring, RingConfig, Wait};
    use std::os::fd::AsFd;

    /// Makes a small ring, puts `items` in it (up to the first that does not fit), XORs each `(offset, byte)` of
    /// `patches` into its shared memory (header, frames; offsets wrap), attaches the corrupted
    /// ring as another process would, and takes up to `items.len() + 1` items from it without
    /// waiting. Returns the attach error, or what each take gave (the bytes, or the error).
    pub fn corrupted_ring(
        items: &[&[u8]],
        patches: &[(u32, u8)],
    ) -> Result<Vec<Result<Vec<u8>, String>>, String> {
        const TYPE_TAG: u64 = 0x6675_7a7a;
        let config = RingConfig {
            capacity: 4096,
            max_items: None,
            type_tag: TYPE_TAG,
            doorbell: false,
        };
        let ring = Ring::create(config).map_err(|e| e.to_string())?;
        // Stops at the first that does not fit: what is in the ring is a prefix of `items`.
        for item in items {
            if ring.push(&RawBytes(item), Wait::Never, None).is_err() {
                break;
            }
        }
        let fd = ring.descriptors()[0]
            .try_clone_to_owned()
            .map_err(|e| e.to_string())?;
        let len = rustix::fs::fstat(&fd).map_err(|e| e.to_string())?.st_size as u64;
        for &(offset, xor) in patches {
            let offset = u64::from(offset) % len;
            let mut byte = [0u8];
            rustix::io::pread(fd.as_fd(), &mut byte, offset).map_err(|e| e.to_string())?;
            byte[0] ^= xor;
            rustix::io::pwrite(fd.as_fd(), &byte, offset).map_err(|e| e.to_string())?;
        }
        let attached = Ring::attach(vec![fd].into_iter(), TYPE_TAG).map_err(|e| e.to_string())?;
        Ok((0..=items.len())
            .map(|_| {
                attached
                    .pop(Wait::Never, None, |payload| payload.to_vec())
                    .map_err(|e| e.to_string())
                    .and_then(|bytes| bytes.map_err(|e| e.to_string()))
            })
            .collect())
    }
}

pub use connection::{Connection, ConnectionError, Pipe, Waitable};
pub use decode_error::CodecError;
pub use listener::{Client, Listener};
pub use queue::{Bytes, JoinableQueue, Queue, QueueBuilder, QueueError, SimpleQueue};
