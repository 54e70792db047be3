//! The multiproc side of every workload, written against the public API of
//! the umbrella crate; each function returns its samples in the unit of its
//! workload (see [`crate::workload::WORKLOADS`]). The child processes of the cross-process workloads are set up by
//! [`crate::rigs`], which the criterion benches share.

use std::hint::black_box;
use std::time::Instant;

use multiproc::mp_ipc::queue::Bytes;
use multiproc::mp_ipc::{Lock, LockError, Semaphore, SharedMemory, Value};
use multiproc::mp_pool::Pool;
use multiproc::{Process, StartMethod};

use crate::rigs::{
    self, EchoRig, QueueItem, QueueRig, SPEEDUP_TASKS, SinkRig, echo_bytes, echo_ms, mebibyte,
    no_op, speedup_sample, speedup_task_size, spin, square,
};
use crate::sampling::{BenchResult, Params, per_op, sample_for, throughput, timed};

/// Process start + join, fork start method.
pub fn process_start_fork(params: &Params) -> BenchResult<Vec<f64>> {
    process_start(params, StartMethod::Fork)
}

/// Process start + join, forkserver start method.
pub fn process_start_forkserver(params: &Params) -> BenchResult<Vec<f64>> {
    process_start(params, StartMethod::ForkServer)
}

/// Process start + join, spawn start method.
pub fn process_start_spawn(params: &Params) -> BenchResult<Vec<f64>> {
    process_start(params, StartMethod::Spawn)
}

/// The reference row of spawn: milliseconds per `posix_spawn` + `waitpid` of this program
/// itself, which exits at the top of `main` ([`crate::EXIT_AT_ONCE`]). No library code
/// runs but its constructor's check; what is left is what every spawned child pays for
/// the program's image: the kernel's exec, the dynamic loader and libraries of its link.
pub fn program_exec(params: &Params) -> BenchResult<Vec<f64>> {
    crate::floor::posix_spawn_wait(params, &std::env::current_exe()?, &[crate::EXIT_AT_ONCE])
}

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

/// Microseconds per `send` + `recv` of a u64 echoed by a child.
pub fn pipe_roundtrip(params: &Params) -> BenchResult<Vec<f64>> {
    let rig = EchoRig::start()?;
    let samples = per_op(params, 16, 1e6, |k| rig.round_trips(k));
    rig.stop()?;
    samples
}

/// Queue 1 -> 1, 8 B items.
pub fn queue_1to1_8b(params: &Params) -> BenchResult<Vec<f64>> {
    queue_throughput(params, 1, 1, rigs::SMALL_ITEM)
}

/// Queue 2 -> 2, 8 B items.
pub fn queue_2to2_8b(params: &Params) -> BenchResult<Vec<f64>> {
    queue_throughput(params, 2, 2, rigs::SMALL_ITEM)
}

/// Queue 1 -> 1, 64 KiB items.
pub fn queue_1to1_64k(params: &Params) -> BenchResult<Vec<f64>> {
    queue_throughput(params, 1, 1, Bytes(vec![2; rigs::BIG_ITEM]))
}

/// Queue 2 -> 2, 64 KiB items.
pub fn queue_2to2_64k(params: &Params) -> BenchResult<Vec<f64>> {
    queue_throughput(params, 2, 2, Bytes(vec![2; rigs::BIG_ITEM]))
}

/// GB/s of 1 MiB `send_bytes` to a child's `recv_bytes`, until it confirms.
pub fn pipe_1mib(params: &Params) -> BenchResult<Vec<f64>> {
    let rig = SinkRig::start(rigs::MIB)?;
    let samples = throughput(params, 4, rigs::MIB as f64, 1e9, |k| rig.send(k));
    rig.stop()?;
    samples
}

/// `producers` x `consumers` processes on one unbounded Queue, each consumer
/// taking an equal share of every batch (as the CPython program does): M msg/s
/// for 8 B items, GB/s for larger ones.
fn queue_throughput<T: QueueItem>(
    params: &Params,
    producers: usize,
    consumers: usize,
    item: T,
) -> BenchResult<Vec<f64>> {
    let (per_item, scale) = match item.payload() {
        8 => (1.0, 1e6),
        bytes => (bytes as f64, 1e9),
    };
    let rig = QueueRig::start(producers, consumers, item)?;
    let items_per_k = rig.items(1) as f64;
    let samples = throughput(params, 64, per_item * items_per_k, scale, |k| {
        rig.transfer(k)
    });
    rig.stop()?;
    samples
}

/// A lock result as a benchmark result (a guard borrows its lock, so the
/// error cannot travel as it is).
fn locked<G>(result: Result<G, LockError<G>>) -> BenchResult<G> {
    result.map_err(|e| e.to_string().into())
}

/// Nanoseconds per `lock()` + drop of the guard, nobody else around.
pub fn lock_uncontended(params: &Params) -> BenchResult<Vec<f64>> {
    let lock = Lock::new()?;
    per_op(params, 1024, 1e9, |k| {
        timed(|| {
            for _ in 0..k {
                drop(black_box(locked(lock.lock())?));
            }
            Ok(())
        })
    })
}

/// Nanoseconds per `acquire()` + drop of the guard (the release).
pub fn semaphore_uncontended(params: &Params) -> BenchResult<Vec<f64>> {
    let semaphore = Semaphore::new(1)?;
    per_op(params, 1024, 1e9, |k| {
        timed(|| {
            for _ in 0..k {
                drop(black_box(semaphore.acquire()));
            }
            Ok(())
        })
    })
}

/// Nanoseconds per `*value.lock()? += 1`.
pub fn value_increment(params: &Params) -> BenchResult<Vec<f64>> {
    let value = Value::new(0i64)?;
    per_op(params, 1024, 1e9, |k| {
        timed(|| {
            for _ in 0..k {
                *locked(value.lock())? += 1;
            }
            Ok(())
        })
    })
}

/// Million increments per second of two processes sharing one locked Value
/// (see [`rigs::counter_race`]).
pub fn contended_counter(params: &Params) -> BenchResult<Vec<f64>> {
    let counter = Value::new(0i64)?;
    throughput(params, 256, 2.0, 1e6, |k| rigs::counter_race(&counter, k))
}

/// Microseconds per round of Python's named-segment life cycle, 1 MiB:
/// `SharedMemory(create=True)`, `SharedMemory(name)`, both `close()`, `unlink()`.
pub fn shared_memory_round(params: &Params) -> BenchResult<Vec<f64>> {
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

/// Milliseconds per `Pool::new(2)`, one `apply` (so that a worker is surely
/// up: a pool may start its workers lazily), `close` + `join`.
pub fn pool_create(params: &Params) -> BenchResult<Vec<f64>> {
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

pub fn pool_map_1m(params: &Params) -> BenchResult<Vec<f64>> {
    pool_map(params, 1_000_000, None, 1e6)
}

/// Items of the chunksize=1 map: the 100 k, or 10 k in a quick run
/// (the same numbers as the CPython program's `CHUNKSIZE1_ITEMS`).
pub fn pool_map_chunksize1(params: &Params) -> BenchResult<Vec<f64>> {
    let items = if params.quick { 10_000 } else { 100_000 };
    pool_map(params, items, Some(1), 1e3)
}

/// Microseconds per sequential `apply(square)` on a pool of 2.
pub fn pool_apply(params: &Params) -> BenchResult<Vec<f64>> {
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

/// Serial time / `Pool(2).map` time of 8 equal CPU-bound tasks (chunksize 1),
/// each pair of runs back to back so that the VM's speed changes hit both.
pub fn cpu_speedup(params: &Params) -> BenchResult<Vec<f64>> {
    let n = speedup_task_size(params.budget)?;
    let pool = Pool::new(2)?;
    pool.chunksize(1).map(spin, [1000, 1000])?;
    let samples = sample_for(params.budget, || {
        speedup_sample(n, || {
            pool.chunksize(1).map(spin, vec![n; SPEEDUP_TASKS])?;
            Ok(())
        })
    })?;
    pool.close();
    pool.join()?;
    Ok(samples)
}

/// Milliseconds per new process (spawn) that receives 1 MiB and returns it.
pub fn echo_1mib_process(params: &Params) -> BenchResult<Vec<f64>> {
    let one = || echo_ms(|data| Ok(Process::new(echo_bytes).args(data).start()?.join()?));
    one()?;
    sample_for(params.budget, one)
}

/// Milliseconds per 1 MiB sent to a warm `Pool(2)` worker (`apply`) and returned.
pub fn echo_1mib_pool(params: &Params) -> BenchResult<Vec<f64>> {
    let pool = Pool::new(2)?;
    pool.apply(echo_bytes, mebibyte())?;
    let samples = sample_for(params.budget, || {
        echo_ms(|data| Ok(pool.apply(echo_bytes, data)?))
    })?;
    pool.close();
    pool.join()?;
    Ok(samples)
}
