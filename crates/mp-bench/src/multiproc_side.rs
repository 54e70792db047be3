//! The multiproc side of every workload, written against the public API of
//! the umbrella crate. A constant is `None` while the API it needs does not
//! exist yet; the runner then reports the cell as "not yet available".

use std::hint::black_box;
use std::time::{Duration, Instant};

use multiproc::mp_ipc::shm::SharedMemory;
use multiproc::mp_pool::Pool;
use multiproc::{Process, StartMethod};

use crate::sampling::{BenchResult, Params, per_op, sample_for, timed};
use crate::workload::Measure;

/// `Process` start + join, fork start method.
pub const PROCESS_START_FORK: Option<Measure> = Some(|p| process_start(p, StartMethod::Fork));
/// `Process` start + join, forkserver start method.
pub const PROCESS_START_FORKSERVER: Option<Measure> =
    Some(|p| process_start(p, StartMethod::ForkServer));
/// `Process` start + join, spawn start method.
pub const PROCESS_START_SPAWN: Option<Measure> = Some(|p| process_start(p, StartMethod::Spawn));
/// Pipe round trip of a small message.
pub const PIPE_ROUNDTRIP: Option<Measure> = None;
/// Pipe throughput with 1 MiB messages.
pub const PIPE_1MIB: Option<Measure> = None;
/// Queue 1 -> 1, 8 B items.
pub const QUEUE_1TO1_8B: Option<Measure> = None;
/// Queue 2 -> 2, 8 B items.
pub const QUEUE_2TO2_8B: Option<Measure> = None;
/// Queue 1 -> 1, 64 KiB items.
pub const QUEUE_1TO1_64K: Option<Measure> = None;
/// Queue 2 -> 2, 64 KiB items.
pub const QUEUE_2TO2_64K: Option<Measure> = None;
/// Lock acquire + release.
pub const LOCK_UNCONTENDED: Option<Measure> = None;
/// Semaphore acquire + release.
pub const SEMAPHORE_UNCONTENDED: Option<Measure> = None;
/// Two processes incrementing a shared Value under its lock.
pub const CONTENDED_COUNTER: Option<Measure> = None;
/// Value += 1 under its lock.
pub const VALUE_INCREMENT: Option<Measure> = None;
/// SharedMemory create + attach + close + unlink.
pub const SHARED_MEMORY_ROUND: Option<Measure> = Some(shared_memory_round);
/// Pool(2) create + teardown.
pub const POOL_CREATE: Option<Measure> = Some(pool_create);
/// Pool.map over 1 M items.
pub const POOL_MAP_1M: Option<Measure> = Some(pool_map_1m);
/// Pool.map with chunksize 1.
pub const POOL_MAP_CHUNKSIZE1: Option<Measure> = Some(pool_map_chunksize1);
/// Pool.apply round trip.
pub const POOL_APPLY: Option<Measure> = Some(pool_apply);
/// CPU-bound speedup with 2 workers.
pub const CPU_SPEEDUP: Option<Measure> = Some(cpu_speedup);

fn no_op() {}

/// Milliseconds per start + join of a child running [`no_op`].
fn process_start(params: &Params, method: StartMethod) -> BenchResult<Vec<f64>> {
    let one = || -> BenchResult<f64> {
        let start = Instant::now();
        Process::new(no_op).start_method(method).start()?.join()?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    // The first start of a method pays its one-time setup (the fork server).
    one()?;
    sample_for(params.budget, one)
}

/// Microseconds per round of Python's named-segment life cycle, 1 MiB:
/// `SharedMemory(create=True)`, `SharedMemory(name)`, both `close()`, `unlink()`.
fn shared_memory_round(params: &Params) -> BenchResult<Vec<f64>> {
    let name = format!("mp-bench-{}", std::process::id());
    per_op(params, 8, 1e6, |k| {
        timed(|| {
            for _ in 0..k {
                let segment = SharedMemory::create(&name, 1 << 20)?;
                let attached = SharedMemory::open(&name)?;
                drop(attached);
                segment.unlink()?;
            }
            Ok(())
        })
    })
}

fn square(x: u64) -> u64 {
    x * x
}

/// Milliseconds per `Pool::new(2)`, one `apply` (so that a worker is surely
/// up: a pool may start its workers lazily), `close` + `join`.
fn pool_create(params: &Params) -> BenchResult<Vec<f64>> {
    let one = || -> BenchResult<f64> {
        let start = Instant::now();
        let pool = Pool::new(2)?;
        pool.apply(square, 3)?;
        pool.close();
        pool.join()?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    one()?;
    sample_for(params.budget, one)
}

/// Items per second of `map(square)` over `items` integers on a pool of 2, in
/// units of `scale`, with the pool's default chunksize or the given one.
fn pool_map(
    params: &Params,
    items: u64,
    chunksize: Option<usize>,
    scale: f64,
) -> BenchResult<Vec<f64>> {
    let pool = Pool::new(2)?;
    pool.map(square, 0..1000)?;
    let samples = sample_for(params.budget, || {
        let start = Instant::now();
        let out = match chunksize {
            Some(n) => pool.chunksize(n).map(square, 0..items)?,
            None => pool.map(square, 0..items)?,
        };
        let took = start.elapsed().as_secs_f64();
        if out.len() as u64 != items || out.last() != Some(&square(items - 1)) {
            return Err("map returned wrong results".into());
        }
        Ok(items as f64 / took / scale)
    })?;
    pool.close();
    pool.join()?;
    Ok(samples)
}

fn pool_map_1m(params: &Params) -> BenchResult<Vec<f64>> {
    pool_map(params, 1_000_000, None, 1e6)
}

/// Items of the chunksize=1 map: the 100 k, or 10 k in a quick run
/// (the same numbers as the CPython program's `CHUNKSIZE1_ITEMS`).
fn pool_map_chunksize1(params: &Params) -> BenchResult<Vec<f64>> {
    let items = if params.quick { 10_000 } else { 100_000 };
    pool_map(params, items, Some(1), 1e3)
}

/// Microseconds per sequential `apply(square)` on a pool of 2.
fn pool_apply(params: &Params) -> BenchResult<Vec<f64>> {
    let pool = Pool::new(2)?;
    pool.apply(square, 3)?;
    let samples = per_op(params, 8, 1e6, |k| {
        timed(|| {
            for i in 0..k {
                pool.apply(square, i)?;
            }
            Ok(())
        })
    })?;
    pool.close();
    pool.join()?;
    Ok(samples)
}

/// CPU-bound task: the same integer loop as the CPython program's `spin`.
fn spin(n: u64) -> u64 {
    let mut acc = 0u64;
    for i in 0..n {
        acc = (acc + i * i) % 1_000_003;
    }
    acc
}

/// Serial time / `Pool(2).map` time of 8 equal CPU-bound tasks (chunksize 1),
/// each pair of runs back to back so that the VM's speed changes hit both.
fn cpu_speedup(params: &Params) -> BenchResult<Vec<f64>> {
    const TASKS: usize = 8;
    let task_time = (params.budget / 40).max(Duration::from_millis(2));
    let mut n = 1000u64;
    while timed(|| Ok(black_box(spin(black_box(n)))))? < task_time {
        n = n.checked_mul(2).ok_or("spin calibration overflowed")?;
    }
    let pool = Pool::new(2)?;
    pool.chunksize(1).map(spin, [1000, 1000])?;
    let samples = sample_for(params.budget, || {
        let serial = timed(|| {
            for _ in 0..TASKS {
                black_box(spin(black_box(n)));
            }
            Ok(())
        })?;
        let parallel = timed(|| Ok(pool.chunksize(1).map(spin, vec![n; TASKS])?))?;
        Ok(serial.as_secs_f64() / parallel.as_secs_f64())
    })?;
    pool.close();
    pool.join()?;
    Ok(samples)
}
