//! The multiproc side of every workload, written against the public API of
//! the umbrella crate. A constant is `None` while the API it needs does not
//! exist yet; the runner then reports the cell as "not yet available".

use std::time::Instant;

use multiproc::mp_ipc::shm::SharedMemory;
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
pub const POOL_CREATE: Option<Measure> = None;
/// Pool.map over 1 M items.
pub const POOL_MAP_1M: Option<Measure> = None;
/// Pool.map with chunksize 1.
pub const POOL_MAP_CHUNKSIZE1: Option<Measure> = None;
/// Pool.apply round trip.
pub const POOL_APPLY: Option<Measure> = None;
/// CPU-bound speedup with 2 workers.
pub const CPU_SPEEDUP: Option<Measure> = None;

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
