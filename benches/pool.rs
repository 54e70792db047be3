//! Criterion benches of mp-pool's `Pool`: the figures behind the mp-pool
//! benchmark targets (issue: `map` of x*x over 1 M integers with default
//! chunks, `map` with chunksize 1 over 100 k items, sequential `apply` round
//! trip, CPU-bound speedup with 2 workers, Pool(2) create + teardown).
//!
//! ```text
//! cargo bench --bench pool
//! ```
//!
//! The CPU-bound speedup is the ratio of the `cpu_bound/serial` and
//! `cpu_bound/pool2` times. The side-by-side comparison with CPython,
//! interleaved in one run, is `cargo run --release -p mp-bench -- compare`.
//! Sample counts and measurement times are kept small so that the whole
//! `cargo bench` stays within about ten minutes on a 2-core machine.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{
    BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime,
};
use multiproc::mp_pool::Pool;

/// The child-process set-ups of mp-bench's runner, so that both measure the same thing.
#[allow(dead_code)]
#[path = "../crates/mp-bench/src/rigs.rs"]
mod rigs;

use rigs::{spin, square};

/// Few samples, short measurement: most iterations here take milliseconds.
fn short(group: &mut BenchmarkGroup<'_, WallTime>) {
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
}

/// Pool(2) create, one apply (a worker is surely up), close, join.
fn create(c: &mut Criterion) {
    let mut group = c.benchmark_group("pool");
    short(&mut group);
    group.bench_function("create_apply_close_join_2", |b| {
        b.iter(|| {
            let pool = Pool::new(2).unwrap();
            pool.apply(square, 3).unwrap();
            pool.close();
            pool.join().unwrap();
        })
    });
    group.finish();
}

fn map(c: &mut Criterion) {
    let pool = Pool::new(2).unwrap();
    pool.map(square, 0..1000u64).unwrap();
    let mut group = c.benchmark_group("pool2_map_square");
    short(&mut group);
    group.throughput(Throughput::Elements(1_000_000));
    group.bench_function("1M_default_chunksize", |b| {
        b.iter(|| black_box(pool.map(square, 0..1_000_000u64).unwrap()))
    });
    group.throughput(Throughput::Elements(100_000));
    group.bench_function("100k_chunksize_1", |b| {
        b.iter(|| black_box(pool.chunksize(1).map(square, 0..100_000u64).unwrap()))
    });
    group.finish();

    let mut group = c.benchmark_group("pool2_apply");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    group.bench_function("round_trip", |b| {
        b.iter(|| pool.apply(square, black_box(7)).unwrap())
    });
    group.finish();
}

/// 8 tasks of 20-40 ms: serially, then on a pool of 2 (chunksize 1). With 5 ms tasks the
/// ratio was 1.77-1.79x: on this VM both vCPUs now and then run at half speed together for a
/// few milliseconds (workers' own timestamps show no idle gap), which short tasks cannot
/// average out.
fn cpu_bound(c: &mut Criterion) {
    const TASKS: usize = 8;
    let mut n = 1000u64;
    loop {
        let start = Instant::now();
        black_box(spin(black_box(n)));
        if start.elapsed() >= Duration::from_millis(20) {
            break;
        }
        n *= 2;
    }
    let pool = Pool::new(2).unwrap();
    pool.chunksize(1).map(spin, [1000, 1000]).unwrap();
    let mut group = c.benchmark_group("cpu_bound");
    short(&mut group);
    group.bench_function("serial", |b| {
        b.iter(|| {
            for _ in 0..TASKS {
                black_box(spin(black_box(n)));
            }
        })
    });
    group.bench_function("pool2", |b| {
        b.iter(|| black_box(pool.chunksize(1).map(spin, vec![n; TASKS]).unwrap()))
    });
    group.finish();
}

/// A byte buffer that travels as one byte string (as `serde_bytes::ByteBuf` does).
#[derive(Clone)]
struct Buffer(Vec<u8>);

impl serde::Serialize for Buffer {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Buffer {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Buffer;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Buffer, E> {
                Ok(Buffer(v.to_vec()))
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Buffer, E> {
                Ok(Buffer(v))
            }
        }
        deserializer.deserialize_byte_buf(Visitor)
    }
}

/// A 1 MiB buffer to a worker of a warm Pool(2) and back (procspawn's 1 MiB echo).
fn echo(c: &mut Criterion) {
    let pool = Pool::new(2).unwrap();
    let buffer = Buffer(vec![7; 1 << 20]);
    pool.apply(|b: Buffer| b, buffer.clone()).unwrap();
    let mut group = c.benchmark_group("pool2_echo");
    short(&mut group);
    group.throughput(Throughput::Bytes(1 << 20));
    group.bench_function("1MiB", |b| {
        b.iter(|| black_box(pool.apply(|b: Buffer| b, buffer.clone()).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, create, map, echo, cpu_bound);
criterion_main!(benches);
