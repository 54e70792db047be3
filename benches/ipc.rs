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
    BenchmarkGroup, Criterion, criterion_group, criterion_main, measurement::WallTime,
};
use multiproc::mp_ipc::shm::SharedMemory;

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

criterion_group!(benches, shared_memory);
criterion_main!(benches);
