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

// Data plane.
pub mod connection;
pub mod queue;
mod ring;
