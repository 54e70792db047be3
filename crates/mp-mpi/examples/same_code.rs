//! The same code on a local pool and on MPI ranks.
//!
//! ```text
//! cargo run --release --example same_code                 # alone: the local mp_pool::Pool
//! mpirun -n 4 target/release/examples/same_code           # MPI: rank 0 + 3 worker ranks
//! ```
//!
//! `work` is written once against [`Executor`]; `main` picks the backend: the MPI pool when
//! the program was started by `mpirun` with more than one rank, the local pool otherwise.

use std::time::Instant;

use mp_mpi::{Executor, MpiPool, MpiPoolError, Pending};

fn square(x: u64) -> u64 {
    x * x
}

/// About 20 ms of arithmetic: a CPU-bound task.
fn collatz_steps(seed: u64) -> u64 {
    let mut total = 0;
    for start in seed * 20_000..(seed + 1) * 20_000 {
        let mut n = start.max(1);
        while n != 1 {
            n = if n % 2 == 0 { n / 2 } else { 3 * n + 1 };
            total += 1;
        }
    }
    total
}

/// Where a task ran: the MPI rank, or the local worker's pid.
fn whereabouts(_: ()) -> String {
    match mp_mpi::current_rank() {
        Some(rank) => format!("MPI rank {rank}"),
        None => format!("local worker pid {}", std::process::id()),
    }
}

/// Written once, for any backend.
fn work<P: Executor>(pool: &P) -> Result<(), P::Error> {
    println!("  map(square, 1..=5) = {:?}", pool.map(square, 1..=5)?);
    let sum = pool.apply_async(|(a, b): (u32, u32)| a + b, (2, 3))?;
    println!("  apply_async(a + b, (2, 3)).get() = {}", sum.get()?);
    let first: Vec<u64> = pool.imap(square, 0..).take(5).collect::<Result<_, _>>()?;
    println!("  imap(square, 0..).take(5) = {first:?}");
    let mut places: Vec<String> = pool
        .chunksize(1)
        .map(whereabouts, vec![(); 2 * pool.processes()])?;
    places.sort();
    places.dedup();
    println!("  tasks ran on: {}", places.join(", "));

    let seeds: Vec<u64> = (0..8 * pool.processes() as u64).collect();
    let start = Instant::now();
    let serial: Vec<u64> = seeds.iter().map(|&s| collatz_steps(s)).collect();
    let serial_time = start.elapsed();
    let start = Instant::now();
    let parallel = pool.chunksize(1).map(collatz_steps, seeds)?;
    let parallel_time = start.elapsed();
    assert_eq!(parallel, serial);
    println!(
        "  CPU-bound: {} tasks serially {:.0?}, on {} workers {:.0?}: {:.2}x",
        serial.len(),
        serial_time,
        pool.processes(),
        parallel_time,
        serial_time.as_secs_f64() / parallel_time.as_secs_f64()
    );
    match pool.apply(|x: u32| -> u32 { panic!("task {x} failed") }, 7) {
        Err(error) => println!("  a panicking task: {error}"),
        Ok(_) => unreachable!("the task panics"),
    }
    pool.close();
    pool.join()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    match MpiPool::start() {
        Ok(pool) => {
            println!("MPI pool with {} worker ranks:", pool.processes());
            work(&pool)?;
        }
        Err(MpiPoolError::NoWorkerRanks) => {
            let pool = mp_pool::Pool::new(2)?;
            println!(
                "not under mpirun: local pool with {} workers:",
                pool.processes()
            );
            work(&pool)?;
        }
        Err(error) => return Err(error.into()),
    }
    Ok(())
}
