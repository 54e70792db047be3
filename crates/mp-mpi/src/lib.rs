//! mp-mpi: multiproc's pool over MPI ranks, mpi4py's `MPIPoolExecutor` for Rust.
//!
//! ```
//! use mp_mpi::{Executor, MpiPool, MpiPoolError, Pending};
//!
//! fn square(x: u64) -> u64 {
//!     x * x
//! }
//!
//! /// Written once for both backends.
//! fn work<P: Executor>(pool: &P) -> Result<(), P::Error> {
//!     assert_eq!(pool.map(square, 1..=5)?, [1, 4, 9, 16, 25]);
//!     let sum = pool.apply_async(|(a, b): (u32, u32)| a + b, (2, 3))?;
//!     assert_eq!(sum.get()?, 5);
//!     pool.close();
//!     pool.join() // over MPI: the worker ranks exit and MPI is finalised
//! }
//!
//! // Under `mpirun -n 4 ./prog` every rank runs this; only rank 0 returns from `start`.
//! match MpiPool::start() {
//!     Ok(pool) => work(&pool)?,
//!     // Run alone (as this doc test is): the same code on the local pool.
//!     Err(MpiPoolError::NoWorkerRanks) => work(&mp_pool::Pool::new(2)?)?,
//!     Err(error) => return Err(error.into()),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! (The examples of this crate run under `mpirun`; see `examples/same_code.rs` and the
//! README, which also shows the measured costs and a plan for 100+ nodes.)
//!
//! * [`MpiPool`]: started on every rank with one call ([`MpiPool::start`]); rank 0 gets the
//!   pool, the other ranks serve tasks and exit when it closes. A program run alone gets
//!   [`MpiPoolError::NoWorkerRanks`] and can fall back to the local pool.
//! * [`Executor`]: the API of both the local [`mp_pool::Pool`] and the [`MpiPool`] — `map`,
//!   `imap`, `imap_unordered`, `starmap`, `apply`, `apply_async`, `submit`, `chunksize`,
//!   callbacks ([`Pending`]), `close`/`join`/`terminate`, `get_timeout`, `next_timeout`,
//!   `join_timeout`. Code generic over `P: Executor` runs on either unchanged.
//! * [`current_rank`]: where a task runs.
//!
//! # How it works
//!
//! Every rank runs the same executable, so a task function is named as in the local pool: by
//! mp-core's [`FunctionId`](mp_core::FunctionId), its address relative to a symbol of the
//! image (checked at start: a rank running another executable is refused). Arguments and
//! results travel as postcard bytes, in chunks. On each rank one thread owns MPI
//! (`MPI_THREAD_FUNNELED`); on rank 0 it is the dispatcher (dynamic scheduling: each worker
//! rank holds at most 2 chunks, or 8 while its chunks take under half a millisecond;
//! nonblocking sends), on the others the serving loop.
//!
//! **Idle ranks sleep.** Open MPI's blocking receives spin at 100 % of a core; this crate
//! polls with `MPI_Improbe` instead, spinning 200 µs after the last message and then sleeping
//! between polls, each sleep a sixteenth of the time waited so far (20 µs to 4 ms). An idle
//! rank uses about 1 % of a core; a message is noticed at most ~6 % of the wait (and at most
//! 4 ms) after it arrived.
//!
//! # Failures
//!
//! * A task that panics fails with [`MpiPoolError::Panicked`], naming its rank; the rank
//!   serves the next task.
//! * A worker rank that dies (SIGKILL, abort, segfault, out of memory) cannot be survived with
//!   Open MPI 4.1 or MPICH without fault tolerance: MPI reports the death to nobody but the
//!   launcher, and rank 0's receives neither fail nor return. `mpirun` then ends the whole job
//!   within 1–2 s, printing the dead rank ("process rank N ... exited on signal 9"), with a
//!   non-zero exit status; `srun` does the same. Nothing hangs. The `dead_rank` example
//!   and `.ci/mpi` check this.
//! * With a ULFM-enabled MPI (Open MPI 5 built `--with-ft=ulfm`, MPICH with
//!   `MPIR_CVAR_ENABLE_FT`), rank 0 could set `MPI_ERRORS_RETURN`, learn of the death from
//!   `MPIX_ERR_PROC_FAILED`, fail only the chunks that rank held (as the local pool's
//!   `WorkerDied`) and go on with the surviving ranks (no replacement: that needs
//!   `MPI_Comm_spawn`). rsmpi does not expose ULFM yet, so this crate does not do it.
//! * A dead rank 0 ends the job the same way: the worker ranks never outlive it.
//!
//! # Limits
//!
//! MPI is initialised once per process: one pool per program run. [`MpiPool::terminate`]
//! cannot interrupt a task on a remote rank: those ranks stop after the chunks they hold.
//! A message is at most 2 GiB (MPI counts are `int`).

#[cfg(not(target_os = "linux"))]
compile_error!("mp-mpi supports Linux only for now (it relies on mp-core)");

mod backoff;
mod dispatcher;
mod error;
mod executor;
mod imap;
mod job;
mod pool;
mod session;
mod task;
mod wire;
mod worker;

/// The checks shared with the MPI test program.
#[cfg(test)]
#[path = "../tests/common/same_api.rs"]
mod same_api;

pub use error::MpiPoolError;
pub use executor::{Chunked, Executor, Pending, ResultStream};
pub use imap::MpiIMap;
pub use pool::{MpiPool, MpiPoolBuilder};
/// The eventual outcome of a task or a whole `map_async` on an [`MpiPool`]: mp-pool's
/// [`AsyncResult`](mp_pool::AsyncResult), with its `get`, `get_timeout`, `wait`, callbacks,
/// `.await`, and [`mp_pool::as_completed`] / [`mp_pool::wait`] over several. It does not
/// keep the pool alive: if the pool is terminated or dropped first, the result becomes
/// [`MpiPoolError::Terminated`]. `cancel` returns `false`: a task submitted to an MPI pool
/// is not withdrawn.
pub type MpiAsyncResult<T> = mp_pool::AsyncResult<T, MpiPoolError>;
pub use worker::current_rank;
