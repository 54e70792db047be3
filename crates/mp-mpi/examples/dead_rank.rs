//! What happens when a worker rank dies: `mpirun` ends the job, naming the rank.
//!
//! ```text
//! mpirun -n 3 target/release/examples/dead_rank
//! ```
//!
//! A task kills its own worker rank with SIGKILL. Open MPI 4.1 (no ULFM) tells nobody but
//! `mpirun`, which terminates every rank within a second or two and exits non-zero with
//! "mpirun noticed that process rank N ... exited on signal 9 (Killed)". Rank 0 never
//! returns from `get` (it is killed), and nothing hangs. `.ci/mpi` runs this and checks the
//! exit status, the time taken and the message.

use std::time::Duration;

use mp_mpi::{Executor, MpiPool};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let pool = MpiPool::start()?;
    let steady = pool.apply_async(
        |ms: u64| std::thread::sleep(Duration::from_millis(ms)),
        60_000,
    )?;
    let fatal = pool.apply_async(
        |_: ()| {
            let rank = mp_mpi::current_rank().unwrap_or(-1);
            eprintln!("dead_rank: worker rank {rank} kills itself with SIGKILL");
            // SAFETY: kill(2) on our own pid; the process ends here.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        },
        (),
    )?;
    // Rank 0 waits; mpirun ends the job long before this timeout.
    let outcome = fatal.get_timeout(Duration::from_secs(60));
    eprintln!("dead_rank: rank 0 was not stopped by mpirun: {outcome:?}");
    drop(steady);
    std::process::exit(3)
}
