//! A CPU-bound task run serially, then on a pool: prints both times and the speedup.
//!
//! ```text
//! cargo run --release --example cpu_bound [-- TASKS [WORKERS]]
//! ```
//!
//! Each task counts the primes below a bound by trial division: pure computation, no I/O,
//! the kind of work processes (not threads, in Python) exist for. The pool gets one task
//! per chunk (`chunksize(1)`), so that the workers share the tasks evenly. Serial and pool
//! runs are paired and repeated, and the best of each is reported, because CPU speed on a
//! shared machine drifts.

use std::time::{Duration, Instant};

use multiproc::mp_core::cpu_count;
use multiproc::mp_pool::{Pool, PoolError};

/// The number of primes below `bound`, by trial division.
fn count_primes(bound: u64) -> u64 {
    (2..bound)
        .filter(|&n| (2..).take_while(|d| d * d <= n).all(|d| n % d != 0))
        .count() as u64
}

const BOUND: u64 = 400_000;
const ROUNDS: usize = 3;

fn main() -> Result<(), PoolError> {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<usize>());
    let tasks = args.next().and_then(Result::ok).unwrap_or(8);
    let workers = args.next().and_then(Result::ok).unwrap_or_else(cpu_count);
    let inputs = vec![BOUND; tasks];

    let pool = Pool::new(workers)?;
    // Warm up: the workers are started and have run a task.
    pool.chunksize(1).map(count_primes, vec![1_000; workers])?;

    let (mut serial_best, mut pool_best) = (Duration::MAX, Duration::MAX);
    let mut expected = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        expected = inputs.iter().map(|&b| count_primes(b)).collect::<Vec<_>>();
        serial_best = serial_best.min(start.elapsed());

        let start = Instant::now();
        let parallel = pool.chunksize(1).map(count_primes, inputs.clone())?;
        pool_best = pool_best.min(start.elapsed());
        assert_eq!(parallel, expected, "the pool computed something else");
    }
    pool.close();
    pool.join()?;

    println!(
        "{tasks} tasks: count the primes below {BOUND} ({} each)",
        expected[0]
    );
    println!(
        "serial:             {:>8.1} ms",
        serial_best.as_secs_f64() * 1e3
    );
    println!(
        "pool of {workers} workers: {:>8.1} ms",
        pool_best.as_secs_f64() * 1e3
    );
    println!(
        "speedup:            {:>8.2}x",
        serial_best.as_secs_f64() / pool_best.as_secs_f64()
    );
    Ok(())
}
