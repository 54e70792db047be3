//! mp-pool: a pool of worker processes, Python's `multiprocessing.Pool`, that never hangs.
//!
//! ```
//! use mp_pool::Pool;
//!
//! fn square(x: u64) -> u64 {
//!     x * x
//! }
//!
//! let pool = Pool::new(4)?;
//! assert_eq!(pool.map(square, [1, 2, 3, 4, 5])?, vec![1, 4, 9, 16, 25]);
//!
//! // Any non-capturing closure or fn item runs on the same pool.
//! let sum = pool.apply_async(|(a, b): (u32, u32)| a + b, (2, 3))?;
//! assert_eq!(sum.get()?, 5);
//!
//! // A panic fails its task only; the worker lives on.
//! let err = pool.apply(|x: u32| -> u32 { panic!("bad input {x}") }, 7).unwrap_err();
//! assert!(err.to_string().contains("bad input 7"));
//!
//! // Tasks returning `Result` keep their own error type; results can be awaited too.
//! let parsed = pool.try_apply(|s: String| s.parse::<u8>().map_err(|e| e.to_string()), "x".into());
//! assert!(matches!(parsed, Err(mp_pool::TryError::Task(_))));
//! pool.close();
//! pool.join()?;
//! # Ok::<(), mp_pool::PoolError>(())
//! ```
//!
//! * [`Pool`] / [`PoolBuilder`]: `map`, `starmap`, `imap`, `imap_unordered`, `apply` and
//!   the `_async` forms, `close`, `join`, `terminate`, `shutdown`, `wait_ready`; the `try_`
//!   family (`try_apply`, `try_map`, ...) for functions returning `Result<T, E>`, whose `Err`
//!   arrives as itself ([`TryError`]); `map_timeout` (a deadline for the whole call).
//! * [`TaskOptions`]: `chunksize` and per-task `timeout` (pebble's `schedule(timeout=)`)
//!   through [`Pool::chunksize`] and [`Pool::timeout`]; a task over its limit fails with
//!   [`PoolError::TaskTimedOut`], its worker is killed and replaced.
//! * [`AsyncResult`]: `get`, `get_timeout`, `wait`, `ready`, `successful`, `cancel`,
//!   Python's `callback` / `error_callback`, and `.await` (runtime-agnostic).
//! * [`IMap`]: the lazy, bounded-memory iterator of `imap` and `imap_unordered`, also a
//!   `futures_core::Stream`.
//! * [`as_completed`] and [`wait`]: `concurrent.futures`' helpers over several results.
//! * [`PoolError`]: every way a task can fail, typed.
//!
//! Workers are processes started by mp-core (spawn, forkserver or fork) running the same
//! executable; a task function is named by its address, its arguments and results travel
//! postcard-encoded, grouped in chunks. The pool watches its workers' pidfds: a worker that
//! dies mid-task (SIGKILL, abort, segfault, out of memory) fails the task it was running with
//! [`PoolError::WorkerDied`], naming its pid and signal, within milliseconds; a replacement
//! starts, tasks it had not started run elsewhere, and the pool goes on. Each result is
//! delivered as soon as its task ends, and an idle worker takes over tasks queued behind a
//! slow one.
//!
//! The pool runs two threads: a result thread (delivers results, runs callbacks) and a
//! supervisor thread (starts, watches and replaces workers). Scheduling (per-worker links
//! fed by the parent, a claim protocol in shared memory, stealing for idle workers, and
//! why) is described in the `scheduler` module's source.

#[cfg(not(target_os = "linux"))]
compile_error!("mp-pool supports Linux only for now (it relies on pidfds and mp-core)");

mod bulk;
mod collector;
mod error;
mod imap;
mod job;
mod pool;
mod result;
mod scheduler;
mod supervisor;
mod transport;
mod wait;
mod worker;

pub use error::{PoolError, ResultError, TryError};
pub use imap::{IMap, TryIMap};
pub use pool::{Pool, PoolBuilder, TaskOptions, WithChunksize};
pub use result::{AsyncResult, ResultFuture, ResultSender};
pub use wait::{AsCompleted, ReturnWhen, Waited, as_completed, wait};
