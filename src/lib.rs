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
    active_children, allow_fork, cpu_count, current_process, get_start_method, parent_process,
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

/// Misuse that must not compile, pinned by `compile_fail` doc tests (run by
/// `cargo test --doc`). Each case names the error code it must fail with; rustdoc checks the
/// code only on a nightly toolchain, so CI also runs these on nightly
/// (`cargo +nightly test --doc -p multiproc compile_fail`): a case that starts failing for
/// another reason (a typo, a renamed item) is then reported instead of passing silently.
/// Not part of the API.
///
/// A function that runs in another process must be a non-capturing closure or a `fn` item:
/// the child conjures it from its type alone, so a captured value would be read from memory
/// the child does not have. A closure capturing only `Copy` data satisfies every trait bound,
/// so this is enforced by a compile-time assertion that the function is zero-sized (E0080);
/// a closure capturing a `String` is not even `Copy` (E0277).
///
/// `Process::new` with a closure capturing a `Copy` value:
///
/// ```compile_fail,E0080
/// let offset = 5u64;
/// let _process = multiproc::Process::new(move |x: u64| x + offset);
/// ```
///
/// `Process::new` with a closure capturing a `String`:
///
/// ```compile_fail,E0277
/// let greeting = String::from("hello");
/// let _process = multiproc::Process::new(move || greeting.clone());
/// ```
///
/// `Pool::map` with a capturing closure:
///
/// ```compile_fail,E0080
/// # fn main() -> Result<(), multiproc::PoolError> {
/// let pool = multiproc::Pool::new(2)?;
/// let factor = 3u64;
/// let _tripled = pool.map(move |x: u64| x * factor, [1, 2, 3])?;
/// # Ok(()) }
/// ```
///
/// A `Barrier` action capturing a value:
///
/// ```compile_fail,E0080
/// let parties = 2u32;
/// let _builder = multiproc::Barrier::builder(parties).action(move || assert_eq!(parties, 2));
/// ```
///
/// The same calls compile with non-capturing functions (values travel as arguments):
///
/// ```no_run
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let _process = multiproc::Process::new(|(x, offset): (u64, u64)| x + offset).args((1, 5));
/// let pool = multiproc::Pool::new(2)?;
/// let _tripled = pool.map(|(x, factor): (u64, u64)| x * factor, [(1, 3), (2, 3)])?;
/// let _barrier = multiproc::Barrier::builder(2).action(|| ()).build()?;
/// # Ok(()) }
/// ```
///
/// Lock guards are `!Send`: the lock is owned by a thread (a robust mutex is released by the
/// thread that took it, and its owner-died detection is per thread), so a guard cannot be moved
/// to another thread and unlocked there.
///
/// ```compile_fail,E0277
/// let lock = multiproc::Lock::new().unwrap();
/// let Ok(guard) = lock.lock() else { return };
/// std::thread::scope(|scope| {
///     scope.spawn(move || drop(guard));
/// });
/// ```
///
/// ```compile_fail,E0277
/// let lock = multiproc::RLock::new().unwrap();
/// let Ok(guard) = lock.lock() else { return };
/// std::thread::scope(|scope| {
///     scope.spawn(move || drop(guard));
/// });
/// ```
///
/// ```compile_fail,E0277
/// let value = multiproc::Value::new(0u64).unwrap();
/// let Ok(guard) = value.lock() else { return };
/// std::thread::scope(|scope| {
///     scope.spawn(move || drop(guard));
/// });
/// ```
///
/// The same thread may of course keep using its guard, and a guard stays usable across a
/// scoped thread that does not take it:
///
/// ```
/// let lock = multiproc::Lock::new().unwrap();
/// let Ok(guard) = lock.lock() else { panic!("fresh lock") };
/// std::thread::scope(|scope| {
///     scope.spawn(|| ());
/// });
/// drop(guard);
/// ```
#[doc(hidden)]
pub mod compile_fail {}
