//! The MPI pool measured against the local pool, in one run on the same ranks.
//!
//! ```text
//! mpirun -n 3 target/release/examples/bench_pool      # 2 worker ranks, local pool of 2
//! ```
//!
//! Rounds alternate MPI pool and local pool (`mp_pool::Pool` with as many workers as there
//! are worker ranks, started on rank 0 while the worker ranks sleep idle); medians are
//! printed. Compare with `bench_floor` (the raw MPI loop) run with the same `-n`.

use std::time::{Duration, Instant};

use mp_mpi::{Executor, MpiPool};

const ROUNDS: usize = 5;
const ROUND_TRIPS: usize = 2_000;
const MAP_ITEMS: u64 = 1_000_000;
const CHUNK1_ITEMS: u64 = 50_000;

fn square(x: u64) -> u64 {
    x * x
}

/// About 25 ms of arithmetic.
fn collatz_steps(seed: u64) -> u64 {
    let mut total = 0;
    for start in seed * 25_000..(seed + 1) * 25_000 {
        let mut n = start.max(1);
        while n != 1 {
            n = if n % 2 == 0 { n / 2 } else { 3 * n + 1 };
            total += 1;
        }
    }
    total
}

/// The figures of one backend in one round.
struct Round {
    round_trip: Duration,
    map_items_per_s: f64,
    chunk1_per_task: Duration,
    speedup: f64,
}

fn measure<P: Executor>(pool: &P) -> Round {
    let start = Instant::now();
    for i in 0..ROUND_TRIPS as u64 {
        assert_eq!(pool.apply(square, i).expect("apply"), i * i);
    }
    let round_trip = start.elapsed() / ROUND_TRIPS as u32;

    let start = Instant::now();
    let squares = pool.map(square, 0..MAP_ITEMS).expect("map");
    let map_items_per_s = MAP_ITEMS as f64 / start.elapsed().as_secs_f64();
    assert_eq!(squares.len() as u64, MAP_ITEMS);

    let start = Instant::now();
    let n = pool
        .chunksize(1)
        .imap_unordered(square, 0..CHUNK1_ITEMS)
        .count();
    let chunk1_per_task = start.elapsed() / CHUNK1_ITEMS as u32;
    assert_eq!(n as u64, CHUNK1_ITEMS);

    let seeds: Vec<u64> = (0..4 * pool.processes() as u64).collect();
    let start = Instant::now();
    let serial: Vec<u64> = seeds.iter().map(|&s| collatz_steps(s)).collect();
    let serial_time = start.elapsed();
    let start = Instant::now();
    let parallel = pool.chunksize(1).map(collatz_steps, seeds).expect("map");
    let speedup = serial_time.as_secs_f64() / start.elapsed().as_secs_f64();
    assert_eq!(parallel, serial);
    Round {
        round_trip,
        map_items_per_s,
        chunk1_per_task,
        speedup,
    }
}

fn median<T: PartialOrd + Copy>(mut values: Vec<T>) -> T {
    values.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    values[values.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mpi = MpiPool::start()?;
    let local = mp_pool::Pool::new(mpi.processes())?;
    let (mut on_mpi, mut on_local) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        on_mpi.push(measure(&mpi));
        on_local.push(measure(&local));
    }
    let workers = mpi.processes();
    let row = |name: &str, unit: &str, f: &dyn Fn(&Round) -> f64| {
        let m = median(on_mpi.iter().map(f).collect());
        let l = median(on_local.iter().map(f).collect());
        println!("{name:<26} {unit:<12} mpi {m:>10.2}   local {l:>10.2}   ({workers} workers)");
    };
    row("apply_round_trip", "us", &|r| {
        r.round_trip.as_secs_f64() * 1e6
    });
    row("map_1m_default_chunks", "M items/s", &|r| {
        r.map_items_per_s / 1e6
    });
    row("chunksize1_per_task", "us", &|r| {
        r.chunk1_per_task.as_secs_f64() * 1e6
    });
    row("cpu_speedup", "x", &|r| r.speedup);
    local.close();
    local.join()?;
    mpi.close();
    mpi.join()?;
    Ok(())
}
