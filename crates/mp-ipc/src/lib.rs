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
//! pipes travel beside it with `SCM_RIGHTS`); it is freed when the last handle in the last
//! process is dropped. Every blocking call has `try_` and `_timeout` variants.
//!
//! Nothing reads `/proc`: descriptors are owned from creation, the end of a pipe is told by
//! the kernel (a hang-up on a pipe every handle holds), blocking calls sleep in the kernel,
//! and a readable [`Connection`] is [`AsFd`](std::os::fd::AsFd) for epoll, mio or tokio.
//! The design — who owns which descriptor, how liveness is signalled, what a message looks
//! like on the wire — is [`transport_design`] (`TRANSPORT.md` next to this crate's
//! `Cargo.toml`).

// Base layer: shared memory, futex wake-ups, robust process-shared mutex.
mod decode_error;
mod futex;
mod presence;
mod robust;
pub mod shm;

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
pub mod queue;
#[doc = include_str!("../TRANSPORT.md")]
pub mod transport_design {}
mod ring;
mod transport;

pub use connection::{Connection, ConnectionError, Pipe, Waitable};
pub use listener::{Client, Listener};
pub use queue::{Bytes, JoinableQueue, Queue, QueueBuilder, QueueError, SimpleQueue};
