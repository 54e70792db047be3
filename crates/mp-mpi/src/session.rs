//! The thread that owns MPI on every rank: it initialises MPI, checks that every rank runs the
//! same executable, then dispatches (rank 0) or serves tasks (other ranks), and finalises MPI.
//!
//! All MPI calls of a process happen on this one thread (`MPI_THREAD_FUNNELED`), so the
//! user's threads on rank 0 never touch MPI and MPI needs no thread support beyond that.
//! Worker ranks run tasks on this thread too; its stack is as large as a main thread's
//! usual one ([`STACK_SIZE`]) so that a task recursing deeply behaves as it would locally.

use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use mpi::Threading;
use mpi::collective::Root;
use mpi::topology::{Communicator, SimpleCommunicator};

use crate::dispatcher::{self, Shared};
use crate::error::MpiPoolError;
use crate::{task, worker};

/// Stack of the MPI thread: Linux's default main-thread stack limit.
const STACK_SIZE: usize = 8 << 20;

/// Exit code of a job aborted because the MPI thread panicked (a bug), instead of hanging.
const EXIT_PANIC: i32 = 71;

/// What this process is in the job.
#[derive(Debug)]
pub(crate) enum Role {
    /// Rank 0, with this many worker ranks.
    Root { workers: usize },
    /// A worker rank; the MPI thread returns when rank 0 stops the pool.
    Worker,
    /// A worker rank whose executable differs from rank 0's; the MPI thread has finalised.
    RefusedWorker,
}

/// Starts the MPI thread and waits until it knows this process's role.
pub(crate) fn start(
    shared: Arc<Shared>,
    prefetch: usize,
) -> Result<(Role, JoinHandle<()>), MpiPoolError> {
    let (role_tx, role_rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("mp-mpi".into())
        .stack_size(STACK_SIZE)
        .spawn(move || run(&role_tx, &shared, prefetch))
        .map_err(|e| MpiPoolError::DispatcherFailed(format!("spawning its thread: {e}")))?;
    match role_rx.recv() {
        Ok(Ok(role)) => Ok((role, thread)),
        Ok(Err(error)) => {
            let _ = thread.join();
            Err(error)
        }
        Err(_) => {
            let _ = thread.join();
            Err(MpiPoolError::DispatcherFailed(
                "it ended before initialising MPI".into(),
            ))
        }
    }
}

type RoleSender = mpsc::Sender<Result<Role, MpiPoolError>>;

fn run(role: &RoleSender, shared: &Shared, prefetch: usize) {
    let Some((universe, _)) = mpi::initialize_with_threading(Threading::Funneled) else {
        let _ = role.send(Err(MpiPoolError::AlreadyInitialized));
        return;
    };
    let world = universe.world();
    if world.size() < 2 {
        let _ = role.send(Err(MpiPoolError::NoWorkerRanks));
        return; // dropping the universe finalises MPI
    }
    let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
        serve_role(&world, role, shared, prefetch)
    }));
    if outcome.is_err() {
        tracing::error!(
            rank = world.rank(),
            "the MPI thread panicked: aborting the job"
        );
        world.abort(EXIT_PANIC);
    }
    tracing::debug!(rank = world.rank(), "finalising MPI");
}

fn serve_role(world: &SimpleCommunicator, role: &RoleSender, shared: &Shared, prefetch: usize) {
    let rank = world.rank();
    let root = world.process_at_rank(0);
    // Every rank takes rank 0's run key before any id is made or compared: ids are tagged
    // with it (see `task::share_run_key`), so the fingerprints below only agree under one key.
    let key_adopted = task::share_run_key(&root, rank == 0);
    let fingerprint = if key_adopted {
        task::image_fingerprint()
    } else {
        0 // never rank 0's: this rank is refused below
    };
    if rank == 0 {
        let mut fingerprints = vec![0u64; world.size() as usize];
        root.gather_into_root(&fingerprint, &mut fingerprints[..]);
        let mismatched: Vec<i32> = (0..world.size())
            .filter(|&r| fingerprints[r as usize] != fingerprint)
            .collect();
        let mut go = u8::from(mismatched.is_empty());
        root.broadcast_into(&mut go);
        if !mismatched.is_empty() {
            let _ = role.send(Err(MpiPoolError::MismatchedExecutable {
                ranks: mismatched,
            }));
            return;
        }
        let workers = world.size() as usize - 1;
        tracing::debug!(workers, "MPI pool started");
        let _ = role.send(Ok(Role::Root { workers }));
        dispatcher::dispatch(world, shared, prefetch);
    } else {
        root.gather_into(&fingerprint);
        let mut go = 0u8;
        root.broadcast_into(&mut go);
        if go == 0 {
            tracing::error!(rank, "rank 0 runs a different executable: not serving");
            let _ = role.send(Ok(Role::RefusedWorker));
            return;
        }
        let _ = role.send(Ok(Role::Worker));
        worker::serve(world);
    }
}
