//! Criterion benches of the mp-ipc primitives: the figures behind the mp-ipc
//! benchmark targets (issue: Pipe round trip, Queue 1->1 and 2->2 at 8 B and
//! 64 KiB, Lock and Semaphore uncontended and 2-process contended, Value += 1
//! under its lock, SharedMemory create + attach + close).
//!
//! ```text
//! cargo bench --bench ipc
//! ```
//!
//! The side-by-side comparison with CPython and the OS floor, interleaved in
//! one run, is `cargo run --release -p mp-bench -- compare`. Sample counts and
//! measurement times are kept small so that the whole `cargo bench` stays
//! within about ten minutes on a 2-core machine.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime,
};
use multiproc::mp_ipc::barrier::Barrier;
use multiproc::mp_ipc::lock::Lock;
use multiproc::mp_ipc::semaphore::Semaphore;
use multiproc::mp_ipc::shm::SharedMemory;
use multiproc::mp_ipc::value::Value;
use multiproc::{Process, StartMethod};

/// Applies the short timing every group of this file uses.
fn short(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
}

/// Named 1 MiB segment: create, attach by name, close both, unlink (Python's
/// `SharedMemory` life cycle); and the default anonymous segment.
fn shared_memory(c: &mut Criterion) {
    let mut group = c.benchmark_group("shared_memory");
    short(&mut group);
    let name = format!("mp-bench-criterion-{}", std::process::id());
    group.bench_function("named_1MiB_create_open_close_unlink", |b| {
        b.iter(|| {
            let segment = SharedMemory::create(&name, 1 << 20).unwrap();
            let attached = SharedMemory::open(&name).unwrap();
            drop(attached);
            segment.unlink().unwrap();
        })
    });
    group.bench_function("anonymous_1MiB_new_clone_drop", |b| {
        b.iter(|| {
            let segment = SharedMemory::new(1 << 20).unwrap();
            black_box(segment.clone());
        })
    });
    group.finish();
}

/// Uncontended acquire + release of Lock and Semaphore; Value += 1 under its lock.
fn uncontended(c: &mut Criterion) {
    let mut group = c.benchmark_group("uncontended");
    short(&mut group);
    let lock = Lock::new().unwrap();
    group.bench_function("lock_release", |b| {
        b.iter(|| drop(black_box(lock.lock().unwrap())))
    });
    let semaphore = Semaphore::new(1).unwrap();
    group.bench_function("semaphore_acquire_release", |b| {
        b.iter(|| drop(black_box(semaphore.acquire())))
    });
    let value = Value::new(0i64).unwrap();
    group.bench_function("value_increment_under_lock", |b| {
        b.iter(|| *value.lock().unwrap() += 1)
    });
    group.finish();
}

/// One of two processes: meet the other at the barrier, then `iters` times
/// lock the shared Value, add 1, unlock; returns its loop time in ns.
fn count_under_lock((counter, start, iters): (Value<i64>, Barrier, u64)) -> u64 {
    start.wait().unwrap();
    let begin = Instant::now();
    for _ in 0..iters {
        *counter.lock().unwrap() += 1;
    }
    begin.elapsed().as_nanos() as u64
}

/// Two processes incrementing one locked Value: time per increment pair
/// (one increment by each process), from the slower process's loop.
fn contended(c: &mut Criterion) {
    let mut group = c.benchmark_group("contended_2_processes");
    short(&mut group);
    group.throughput(Throughput::Elements(2));
    let counter = Value::new(0i64).unwrap();
    group.bench_function("value_increment_under_lock", |b| {
        b.iter_custom(|iters| {
            let start = Barrier::new(2).unwrap();
            let children = [(); 2].map(|()| {
                Process::new(count_under_lock)
                    .args((counter.clone(), start.clone(), iters))
                    .start_method(StartMethod::Fork)
                    .start()
                    .unwrap()
            });
            let slowest = children
                .map(|child| child.join().unwrap())
                .into_iter()
                .max();
            Duration::from_nanos(slowest.unwrap_or(0))
        })
    });
    group.finish();
}

criterion_group!(benches, shared_memory, uncontended, contended);
criterion_main!(benches);
