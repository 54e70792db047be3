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
use std::time::Duration;

use criterion::{
    BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime,
};
use multiproc::mp_ipc::queue::Bytes;
use multiproc::mp_ipc::{Lock, Semaphore, SharedMemory, Value};

/// The child-process set-ups of mp-bench's runner, so that both measure the same thing.
#[allow(dead_code)]
#[path = "../crates/mp-bench/src/rigs.rs"]
mod rigs;

use rigs::{BIG_ITEM, EchoRig, MIB, QueueItem, QueueRig, SMALL_ITEM, SinkRig};

/// Applies the short timing every group of this file uses.
fn short(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
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

/// Two processes incrementing one locked Value: time per increment pair
/// (one increment by each process), from the slower process's loop.
fn contended(c: &mut Criterion) {
    let mut group = c.benchmark_group("contended_2_processes");
    short(&mut group);
    group.throughput(Throughput::Elements(2));
    let counter = Value::new(0i64).unwrap();
    group.bench_function("value_increment_under_lock", |b| {
        b.iter_custom(|iters| rigs::counter_race(&counter, iters).unwrap())
    });
    group.finish();
}

/// Pipe: round trip of a u64 echoed by a child; 1 MiB `send_bytes` to a child.
fn pipe(c: &mut Criterion) {
    let mut group = c.benchmark_group("pipe");
    short(&mut group);
    let echo = EchoRig::start().unwrap();
    group.bench_function("round_trip_u64", |b| {
        b.iter_custom(|iters| echo.round_trips(iters).unwrap())
    });
    echo.stop().unwrap();
    let sink = SinkRig::start(MIB).unwrap();
    group.throughput(Throughput::Bytes(MIB as u64));
    group.bench_function("send_bytes_1MiB", |b| {
        b.iter_custom(|iters| sink.send(iters).unwrap())
    });
    sink.stop().unwrap();
    group.finish();
}

/// One iteration moves `producers * consumers` items through the queue.
fn queue_case<T: QueueItem>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    name: &str,
    producers: usize,
    consumers: usize,
    item: T,
) {
    let rig = QueueRig::start(producers, consumers, item.clone()).unwrap();
    let items = rig.items(1);
    group.throughput(match item.payload() {
        8 => Throughput::Elements(items),
        bytes => Throughput::Bytes(items * bytes as u64),
    });
    group.bench_function(name, |b| {
        b.iter_custom(|iters| rig.transfer(iters).unwrap())
    });
    rig.stop().unwrap();
}

/// Queue 1 -> 1 and 2 -> 2 processes, 8 B and 64 KiB items.
fn queue(c: &mut Criterion) {
    let mut group = c.benchmark_group("queue");
    short(&mut group);
    queue_case(&mut group, "1to1_8B", 1, 1, SMALL_ITEM);
    queue_case(&mut group, "2to2_8B", 2, 2, SMALL_ITEM);
    queue_case(&mut group, "1to1_64KiB", 1, 1, Bytes(vec![2; BIG_ITEM]));
    queue_case(&mut group, "2to2_64KiB", 2, 2, Bytes(vec![2; BIG_ITEM]));
    group.finish();
}

/// Creation cost with 0 and with 1,000 of the same objects already held: it
/// must not grow with what the process holds (no descriptor table scans).
fn creation(c: &mut Criterion) {
    use multiproc::mp_ipc::connection::Pipe;
    use multiproc::mp_ipc::queue::Queue;
    // 1,000 duplex pipes hold ~12,000 descriptors.
    let mut limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    limit.current = limit.maximum;
    let _ = rustix::process::setrlimit(rustix::process::Resource::Nofile, limit);
    let mut group = c.benchmark_group("creation");
    short(&mut group);
    for held in [0usize, 1000] {
        let pipes: Vec<_> = (0..held).map(|_| Pipe::duplex().unwrap()).collect();
        let queues: Vec<Queue<u64>> = (0..held).map(|_| Queue::unbounded().unwrap()).collect();
        group.bench_function(format!("pipe_duplex_with_{held}_held"), |b| {
            b.iter(|| black_box(Pipe::duplex().unwrap()))
        });
        group.bench_function(format!("queue_with_{held}_held"), |b| {
            b.iter(|| black_box(Queue::<u64>::unbounded().unwrap()))
        });
        drop((pipes, queues));
    }
    group.finish();
}

criterion_group!(
    benches,
    creation,
    shared_memory,
    uncontended,
    contended,
    pipe,
    queue
);
criterion_main!(benches);
