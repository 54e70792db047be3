//! mp-ipc: communication and synchronisation between processes.
//!
//! (Crate docs are completed as the modules land.)

// Base layer: shared memory, futex wake-ups, robust process-shared mutex.
mod futex;
mod robust;
pub mod shm;

// Synchronisation primitives.
pub mod barrier;
pub mod condition;
pub mod event;
pub mod lock;
pub mod semaphore;
pub mod value;

pub use barrier::{Barrier, BarrierBuilder, BarrierError};
pub use condition::{Condition, WaitError};
pub use event::{Event, EventTimeout};
pub use lock::{Guard, Lock, LockError, LockGuard, NotOwner, RLock, RLockGuard};
pub use semaphore::{BoundedSemaphore, Semaphore, SemaphoreError, SemaphoreGuard};
pub use shm::{SharedMemory, ShmError};
pub use value::{Array, ArrayGuard, Pod, Value, ValueGuard};

// Data plane.
pub mod connection;
pub mod listener;
pub mod queue;
mod ring;

pub use connection::{Connection, ConnectionError, Pipe, Waitable};
pub use listener::{Client, Listener};
pub use queue::{Bytes, JoinableQueue, Queue, QueueBuilder, QueueError, SimpleQueue};
