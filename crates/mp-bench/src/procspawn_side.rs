//! The procspawn side (procspawn 1.0.2, the Rust crate a Rust user would pick instead of
//! multiproc): the workloads it can express, written as its documentation shows. Each function
//! returns samples in the unit of its workload, measured the same way as the multiproc side
//! ([`crate::multiproc_side`]) and with the same task functions ([`crate::rigs`]).
//!
//! procspawn has no pipes, queues, locks or shared memory of its own, so those rows have no
//! procspawn column; what it has is `spawn` (a new process per call) and a `Pool` of
//! processes. `procspawn::init()` runs first thing in `main`.

use std::collections::VecDeque;
use std::time::Instant;

use procspawn::JoinHandle;

use crate::rigs::{
    SPEEDUP_TASKS, echo_bytes, echo_ms, mebibyte, no_op, speedup_sample, speedup_task_size, spin,
    square,
};
use crate::sampling::{BenchResult, Params, per_op, sample_for, timed};

/// The pool size of every pool row, as on the other sides.
const WORKERS: usize = 2;

fn pool() -> BenchResult<procspawn::Pool> {
    Ok(procspawn::Pool::new(WORKERS)?)
}

/// Milliseconds per `spawn` + `join` of a child running [`no_op`].
pub fn process_start_spawn(params: &Params) -> BenchResult<Vec<f64>> {
    let one = || -> BenchResult<f64> {
        let start = Instant::now();
        procspawn::spawn((), |()| no_op()).join()?;
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    one()?;
    sample_for(params.budget, one)
}

/// Milliseconds per `Pool::new(2)`, one task, `shutdown`.
pub fn pool_create(params: &Params) -> BenchResult<Vec<f64>> {
    let one = || -> BenchResult<f64> {
        let start = Instant::now();
        let pool = pool()?;
        let result = pool.spawn(3u64, square).join()?;
        if result != 9 {
            return Err(format!("square(3) returned {result}").into());
        }
        pool.shutdown();
        Ok(start.elapsed().as_secs_f64() * 1e3)
    };
    one()?;
    sample_for(params.budget, one)
}

/// Microseconds per sequential round trip of a task through a warm pool.
pub fn pool_apply(params: &Params) -> BenchResult<Vec<f64>> {
    let pool = pool()?;
    pool.spawn(3u64, square).join()?;
    let samples = per_op(params, 8, 1e6, |k| {
        timed(|| {
            for i in 0..k {
                pool.spawn(i, square).join()?;
            }
            Ok(())
        })
    })?;
    pool.shutdown();
    Ok(samples)
}

/// Tasks a chunksize-1 map keeps queued on procspawn's pool. procspawn opens descriptors for
/// every queued task: queueing all 10 000 at once panics inside procspawn with EMFILE ("Too
/// many open files"), so the map keeps a window of tasks in flight, joined in order.
const IN_FLIGHT: usize = 64;

/// Thousands of tasks per second: every item its own task (procspawn has no chunking), at
/// most [`IN_FLIGHT`] queued at once, results taken in order: the `chunksize=1` map of the
/// other sides.
pub fn pool_map_chunksize1(params: &Params) -> BenchResult<Vec<f64>> {
    let items: u64 = if params.quick { 10_000 } else { 100_000 };
    let pool = pool()?;
    pool.spawn(3u64, square).join()?;
    let samples = sample_for(params.budget, || {
        let start = Instant::now();
        let mut in_flight = VecDeque::with_capacity(IN_FLIGHT);
        let mut last = 0;
        for i in 0..items {
            if in_flight.len() == IN_FLIGHT {
                last = in_flight
                    .pop_front()
                    .map_or(Ok(0), |h: JoinHandle<u64>| h.join())?;
            }
            in_flight.push_back(pool.spawn(i, square));
        }
        for handle in in_flight {
            last = handle.join()?;
        }
        if last != (items - 1) * (items - 1) {
            return Err(format!("the last square was {last}").into());
        }
        Ok(items as f64 / start.elapsed().as_secs_f64() / 1e3)
    })?;
    pool.shutdown();
    Ok(samples)
}

/// Milliseconds per new process that receives 1 MiB and returns it.
pub fn echo_1mib_process(params: &Params) -> BenchResult<Vec<f64>> {
    let one = || echo_ms(|data| Ok(procspawn::spawn(data, echo_bytes).join()?));
    one()?;
    sample_for(params.budget, one)
}

/// Milliseconds per 1 MiB sent to a warm pool's worker and returned.
pub fn echo_1mib_pool(params: &Params) -> BenchResult<Vec<f64>> {
    let pool = pool()?;
    pool.spawn(mebibyte(), echo_bytes).join()?;
    let samples = sample_for(params.budget, || {
        echo_ms(|data| Ok(pool.spawn(data, echo_bytes).join()?))
    })?;
    pool.shutdown();
    Ok(samples)
}

/// Serial time / pool time of 8 equal CPU-bound tasks, paired runs.
pub fn cpu_speedup(params: &Params) -> BenchResult<Vec<f64>> {
    let n = speedup_task_size(params.budget)?;
    let pool = pool()?;
    for handle in [pool.spawn(1000u64, spin), pool.spawn(1000u64, spin)] {
        handle.join()?;
    }
    let samples = sample_for(params.budget, || {
        speedup_sample(n, || {
            let handles: Vec<_> = (0..SPEEDUP_TASKS).map(|_| pool.spawn(n, spin)).collect();
            for handle in handles {
                handle.join()?;
            }
            Ok(())
        })
    })?;
    pool.shutdown();
    Ok(samples)
}
