//! Start + join of a child running a no-op function, and of one squaring its argument; a
//! 1 MiB buffer echoed through a new child; per start method.
//!
//! ```text
//! cargo bench --bench process
//! ```
//!
//! The side-by-side runner (`cargo run --release -p mp-bench -- compare --filter
//! process_start`) puts the same start + join next to CPython, procspawn and the OS floor
//! (`posix_spawn` of /bin/true, `fork` + `waitpid`).

use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use multiproc::{Process, StartMethod};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bytes that serde encodes in one piece (what `serde_bytes::ByteBuf` does), not byte by byte.
struct ByteBuf(Vec<u8>);

impl Serialize for ByteBuf {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for ByteBuf {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Bytes;
        impl serde::de::Visitor<'_> for Bytes {
            type Value = ByteBuf;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, bytes: &[u8]) -> Result<ByteBuf, E> {
                Ok(ByteBuf(bytes.to_vec()))
            }
            fn visit_byte_buf<E>(self, bytes: Vec<u8>) -> Result<ByteBuf, E> {
                Ok(ByteBuf(bytes))
            }
        }
        deserializer.deserialize_byte_buf(Bytes)
    }
}

fn no_op() {}

/// Lets the benches fork: criterion's threads hold no lock a forked child uses.
fn allow_fork() {
    // SAFETY: see above; the children only run the benched functions.
    unsafe { multiproc::allow_fork() };
}

/// One bench of `start_join` per start method, in the group `name`.
fn per_start_method(c: &mut Criterion, name: &str, start_join: impl Fn(StartMethod)) {
    allow_fork();
    let mut group = c.benchmark_group(name);
    group
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for method in StartMethod::ALL {
        group.bench_function(method.name(), |b| b.iter(|| start_join(method)));
    }
    group.finish();
}

fn start_and_join(c: &mut Criterion) {
    per_start_method(c, "process_start_join", |method| {
        let child = Process::new(no_op).start_method(method).start().unwrap();
        child.join().unwrap();
    });
}

/// A function with an argument and a result: what most children run. Its argument travels
/// differently from a no-op's (under fork and forkserver a no-op needs no channel at all).
fn square(x: u64) -> u64 {
    x * x
}

fn start_and_join_with_an_argument(c: &mut Criterion) {
    per_start_method(c, "process_start_join_square", |method| {
        let child = Process::new(square)
            .args(7)
            .start_method(method)
            .start()
            .unwrap();
        assert_eq!(child.join().unwrap(), 49);
    });
}

fn echo_one_mib(c: &mut Criterion) {
    allow_fork();
    const SIZE: usize = 1 << 20;
    let mut group = c.benchmark_group("process_echo_1mib");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
        .throughput(Throughput::Bytes(2 * SIZE as u64));
    let payload = vec![7u8; SIZE];
    for method in StartMethod::ALL {
        group.bench_with_input(
            BenchmarkId::from_parameter(method),
            &payload,
            |b, payload| {
                b.iter(|| {
                    let child = Process::new(|bytes: ByteBuf| bytes)
                        .args(ByteBuf(payload.clone()))
                        .start_method(method)
                        .start()
                        .unwrap();
                    assert_eq!(child.join().unwrap().0.len(), SIZE);
                })
            },
        );
    }
    group.finish();
}

criterion_group!(
    benches,
    start_and_join,
    start_and_join_with_an_argument,
    echo_one_mib
);
criterion_main!(benches);
