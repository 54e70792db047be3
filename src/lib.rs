//! multiproc: Python's `multiprocessing`, rebuilt in Rust.
//!
//! ```
//! use multiproc::Process;
//!
//! let child = Process::new(|name: String| format!("hello, {name}")).args("world".into()).start()?;
//! assert_eq!(child.join()?, "hello, world");
//! # Ok::<(), multiproc::ProcessError>(())
//! ```
//!
//! This crate re-exports the workspace's crates (and the common names in [`prelude`]); depend
//! on one of them alone if that is all you need:
//!
//! * [`mp_core`]: run a function in a child process (spawn, forkserver, fork), its lifecycle.
//! * [`mp_ipc`]: pipes, queues, locks, events, conditions, barriers, shared memory.
//! * [`mp_pool`]: a worker-process pool.
//! * `mp_mpi` (feature `mpi`): the same pool over MPI ranks, for work beyond one machine.

pub use mp_core::{
    Child, Entry, ExitStatus, PanicReport, Process, ProcessError, ProcessInfo, StartMethod,
    active_children, cpu_count, current_process, get_start_method, parent_process,
    set_start_method,
};

pub use mp_ipc::{
    Array, Barrier, BarrierError, BoundedSemaphore, Bytes, Client, Condition, Connection,
    ConnectionError, Event, JoinableQueue, Listener, Lock, LockError, Pipe, Pod, Queue, QueueError,
    RLock, Semaphore, SemaphoreError, SharedMemory, ShmError, SimpleQueue, Value,
};

pub use mp_pool::{AsyncResult, IMap, Pool, PoolBuilder, PoolError};

/// The names most programs need, for `use multiproc::prelude::*`.
pub mod prelude {
    pub use mp_core::{Process, ProcessError, StartMethod};
    pub use mp_ipc::{
        Barrier, Condition, Connection, Event, JoinableQueue, Lock, Pipe, Queue, RLock, Semaphore,
        SharedMemory, SimpleQueue, Value,
    };
    pub use mp_pool::{Pool, PoolError};
}

pub use mp_core;
pub use mp_ipc;
#[cfg(feature = "mpi")]
pub use mp_mpi;
pub use mp_pool;
