//! The multiproc side of every workload, written against the public API of
//! the umbrella crate. A constant is `None` while the API it needs does not
//! exist yet; the runner then reports the cell as "not yet available".

use std::hint::black_box;
use std::time::{Duration, Instant};

use multiproc::mp_ipc::connection::{Connection, Pipe};
use multiproc::mp_ipc::queue::{Bytes, Queue};
use multiproc::mp_ipc::{Barrier, Lock, LockError, Semaphore, SharedMemory, Value};
use multiproc::mp_pool::Pool;
use multiproc::{Process, StartMethod};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::sampling::{BenchResult, Params, per_op, sample_for, throughput, timed};
use crate::workload::Measure;

/// `Process` start + join, fork start method.
pub const PROCESS_START_FORK: Option<Measure> = Some(|p| process_start(p, StartMethod::Fork));
/// `Process` start + join, forkserver start method.
pub const PROCESS_START_FORKSERVER: Option<Measure> =
    Some(|p| process_start(p, StartMethod::ForkServer));
/// `Process` start + join, spawn start method.
pub const PROCESS_START_SPAWN: Option<Measure> = Some(|p| process_start(p, StartMethod::Spawn));
/// Pipe round trip of a small message.
pub const PIPE_ROUNDTRIP: Option<Measure> = Some(pipe_roundtrip);
/// Pipe throughput with 1 MiB messages.
pub const PIPE_1MIB: Option<Measure> = Some(pipe_1mib);
/// Queue 1 -> 1, 8 B items.
pub const QUEUE_1TO1_8B: Option<Measure> = Some(|p| queue_throughput(p, 1, 1, SMALL_ITEM));
/// Queue 2 -> 2, 8 B items.
pub const QUEUE_2TO2_8B: Option<Measure> = Some(|p| queue_throughput(p, 2, 2, SMALL_ITEM));
/// Queue 1 -> 1, 64 KiB items.
pub const QUEUE_1TO1_64K: Option<Measure> =
    Some(|p| queue_throughput(p, 1, 1, Bytes(vec![2; BIG_ITEM])));
/// Queue 2 -> 2, 64 KiB items.
pub const QUEUE_2TO2_64K: Option<Measure> =
    Some(|p| queue_throughput(p, 2, 2, Bytes(vec![2; BIG_ITEM])));
/// Lock acquire + release.
pub const LOCK_UNCONTENDED: Option<Measure> = Some(lock_uncontended);
/// Semaphore acquire + release.
pub const SEMAPHORE_UNCONTENDED: Option<Measure> = Some(semaphore_uncontended);
/// Two processes incrementing a shared Value under its lock.
pub const CONTENDED_COUNTER: Option<Measure> = Some(contended_counter);
/// Value += 1 under its lock.
pub const VALUE_INCREMENT: Option<Measure> = Some(value_increment);
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

/// The 8 B item of the small-message queue workloads.
const SMALL_ITEM: [u8; 8] = [1; 8];
/// Size of the large queue items.
const BIG_ITEM: usize = 64 << 10;
const MIB: usize = 1 << 20;

/// Echoes every `Some(n)` back; returns at `None`.
fn echo(conn: Connection) -> Result<(), String> {
    while let Some(n) = conn.recv::<Option<u64>>().map_err(|e| e.to_string())? {
        conn.send(n).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Microseconds per `send` + `recv` of a u64 echoed by a child.
fn pipe_roundtrip(params: &Params) -> BenchResult<Vec<f64>> {
    let (here, there) = Pipe::duplex()?;
    let child = Process::new(echo).args(there).start()?;
    let samples = per_op(params, 16, 1e6, |k| {
        timed(|| {
            for i in 0..k {
                here.send(Some(i))?;
                if here.recv::<u64>()? != i {
                    return Err("echo returned another number".into());
                }
            }
            Ok(())
        })
    });
    here.send(None::<u64>)?;
    child.join()??;
    samples
}

/// Receives batches: a count, then that many byte messages; answers with the
/// total bytes received. Returns at a count of 0.
fn byte_sink(conn: Connection) -> Result<(), String> {
    loop {
        let count: u64 = conn.recv().map_err(|e| e.to_string())?;
        if count == 0 {
            return Ok(());
        }
        let mut received = 0u64;
        for _ in 0..count {
            received += conn.recv_bytes().map_err(|e| e.to_string())?.len() as u64;
        }
        conn.send(received).map_err(|e| e.to_string())?;
    }
}

/// GB/s of 1 MiB `send_bytes` to a child's `recv_bytes`, until it confirms.
fn pipe_1mib(params: &Params) -> BenchResult<Vec<f64>> {
    let (here, there) = Pipe::duplex()?;
    let child = Process::new(byte_sink).args(there).start()?;
    let payload = vec![3u8; MIB];
    let samples = throughput(params, 4, MIB as f64, 1e9, |k| {
        timed(|| {
            here.send(k)?;
            for _ in 0..k {
                here.send_bytes(&payload)?;
            }
            let received: u64 = here.recv()?;
            if received != k * MIB as u64 {
                return Err(format!("sink got {received} bytes of {}", k * MIB as u64).into());
            }
            Ok(())
        })
    });
    here.send(0u64)?;
    child.join()??;
    samples
}

/// A queue producer: per batch, puts the count it is sent, then echoes it.
fn producer<T: QueueItem>((control, queue, item): (Connection, Queue<T>, T)) -> Result<(), String> {
    loop {
        let count: u64 = control.recv().map_err(|e| e.to_string())?;
        if count == 0 {
            return Ok(());
        }
        for _ in 0..count {
            queue.put(&item).map_err(|e| e.to_string())?;
        }
        control.send(count).map_err(|e| e.to_string())?;
    }
}

/// A queue consumer: per batch, gets the count it is sent, then echoes it.
fn consumer<T: QueueItem>((control, queue): (Connection, Queue<T>)) -> Result<(), String> {
    loop {
        let count: u64 = control.recv().map_err(|e| e.to_string())?;
        if count == 0 {
            return Ok(());
        }
        for _ in 0..count {
            queue.get().map_err(|e| e.to_string())?;
        }
        control.send(count).map_err(|e| e.to_string())?;
    }
}

/// Item size as the queue workloads count it.
trait QueueItem: Serialize + DeserializeOwned + Clone + Send + 'static {
    /// Bytes of payload in one item.
    fn payload(&self) -> usize;
}

impl QueueItem for [u8; 8] {
    fn payload(&self) -> usize {
        8
    }
}

impl QueueItem for Bytes {
    fn payload(&self) -> usize {
        self.len()
    }
}

/// `producers` x `consumers` processes on one unbounded Queue, each consumer
/// taking an equal share of every batch (as the CPython program does): M msg/s
/// for 8 B items, GB/s for larger ones.
fn queue_throughput<T: QueueItem>(
    params: &Params,
    producers: u64,
    consumers: u64,
    item: T,
) -> BenchResult<Vec<f64>> {
    let queue: Queue<T> = Queue::unbounded()?;
    let mut workers = Vec::new();
    let (mut to_producers, mut to_consumers) = (Vec::new(), Vec::new());
    for _ in 0..producers {
        let (here, there) = Pipe::duplex()?;
        workers.push(
            Process::new(producer::<T>)
                .args((there, queue.clone(), item.clone()))
                .start()?,
        );
        to_producers.push(here);
    }
    for _ in 0..consumers {
        let (here, there) = Pipe::duplex()?;
        workers.push(
            Process::new(consumer::<T>)
                .args((there, queue.clone()))
                .start()?,
        );
        to_consumers.push(here);
    }
    let per_batch = producers * consumers;
    let (per_item, scale) = match item.payload() {
        8 => (1.0, 1e6),
        bytes => (bytes as f64, 1e9),
    };
    let samples = throughput(params, 64, per_item * per_batch as f64, scale, |k| {
        let start = Instant::now();
        for c in &to_consumers {
            c.send(k * per_batch / consumers)?;
        }
        for p in &to_producers {
            p.send(k * per_batch / producers)?;
        }
        for c in &to_consumers {
            c.recv::<u64>()?;
        }
        let took = start.elapsed();
        for p in &to_producers {
            p.recv::<u64>()?;
        }
        Ok(took)
    });
    for control in to_producers.iter().chain(&to_consumers) {
        control.send(0u64)?;
    }
    for worker in workers {
        worker.join()??;
    }
    samples
}

/// A lock result as a benchmark result (a guard borrows its lock, so the
/// error cannot travel as it is).
fn locked<G>(result: Result<G, LockError<G>>) -> BenchResult<G> {
    result.map_err(|e| e.to_string().into())
}

/// Nanoseconds per `lock()` + drop of the guard, nobody else around.
fn lock_uncontended(params: &Params) -> BenchResult<Vec<f64>> {
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
fn semaphore_uncontended(params: &Params) -> BenchResult<Vec<f64>> {
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
fn value_increment(params: &Params) -> BenchResult<Vec<f64>> {
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

/// One of the two counting processes: waits for the other at the barrier,
/// then adds 1 to the shared Value `k` times under its lock; returns how long
/// its loop took, in nanoseconds.
fn count_under_lock((counter, start, k): (Value<i64>, Barrier, u64)) -> Result<u64, String> {
    start.wait().map_err(|e| e.to_string())?;
    let begin = Instant::now();
    for _ in 0..k {
        *counter.lock().map_err(|e| e.to_string())? += 1;
    }
    Ok(begin.elapsed().as_nanos() as u64)
}

/// Million increments per second of two processes sharing one locked Value;
/// each batch times the slower process's loop, both released by one barrier.
fn contended_counter(params: &Params) -> BenchResult<Vec<f64>> {
    let counter = Value::new(0i64)?;
    throughput(params, 256, 2.0, 1e6, |k| {
        let start = Barrier::new(2)?;
        let before = locked(counter.get())?;
        let children = [(); 2].map(|()| {
            Process::new(count_under_lock)
                .args((counter.clone(), start.clone(), k))
                .start_method(StartMethod::Fork)
                .start()
        });
        let mut slowest = 0;
        for child in children {
            slowest = slowest.max(child?.join()??);
        }
        let added = locked(counter.get())? - before;
        if added != 2 * k as i64 {
            return Err(format!("lost increments: {added} of {}", 2 * k).into());
        }
        Ok(Duration::from_nanos(slowest))
    })
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
