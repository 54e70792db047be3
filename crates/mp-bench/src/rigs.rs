//! Child-process set-ups ("rigs") of the cross-process workloads, and the
//! functions their children run. Shared by the runner (`mp-bench compare`)
//! and the criterion benches (`benches/ipc.rs`, `benches/pool.rs` include
//! this file), so both measure exactly the same thing.
//!
//! This file depends only on `multiproc`, `serde` and `std`.

use std::error::Error;
use std::time::{Duration, Instant};

use multiproc::mp_ipc::connection::{Connection, Pipe};
use multiproc::mp_ipc::queue::{Bytes, Queue};
use multiproc::mp_ipc::{Barrier, Value};
use multiproc::{Child, Process, StartMethod};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The error type of a measurement: anything that went wrong, with its message.
pub type BenchError = Box<dyn Error + Send + Sync>;

/// Result of a measurement step.
pub type BenchResult<T> = Result<T, BenchError>;

/// What a rig's child returns: `Err` carries the message of what failed.
type ChildResult = Result<(), String>;

/// The 8 B item of the small-message queue workloads.
pub const SMALL_ITEM: [u8; 8] = [1; 8];
/// Size of the large queue items.
pub const BIG_ITEM: usize = 64 << 10;
/// One mebibyte.
pub const MIB: usize = 1 << 20;

/// Does nothing: the child of the process start workloads.
pub fn no_op() {}

/// The task of the pool workloads.
pub fn square(x: u64) -> u64 {
    x * x
}

/// The task of the 1 MiB echo workloads: returns what it was given.
pub fn echo_bytes(bytes: Bytes) -> Bytes {
    bytes
}

/// The payload of the 1 MiB echo workloads.
pub fn mebibyte() -> Bytes {
    Bytes(vec![0x5a; MIB])
}

/// Milliseconds of one 1 MiB round trip through `echo` (which sends the payload to another
/// process and returns what came back), checked.
pub fn echo_ms(echo: impl FnOnce(Bytes) -> BenchResult<Bytes>) -> BenchResult<f64> {
    let data = mebibyte();
    let start = Instant::now();
    let back = echo(data)?;
    let took = start.elapsed();
    if back.len() == MIB && back.iter().all(|&b| b == 0x5a) {
        Ok(took.as_secs_f64() * 1e3)
    } else {
        Err("the echoed 1 MiB differs from what was sent".into())
    }
}

/// Tasks of the CPU speedup workload.
pub const SPEEDUP_TASKS: usize = 8;

/// The `n` for which one [`spin`] takes at least a fortieth of the budget (and 2 ms).
pub fn speedup_task_size(budget: Duration) -> BenchResult<u64> {
    let task_time = (budget / 40).max(Duration::from_millis(2));
    let mut n = 1000u64;
    loop {
        let start = Instant::now();
        std::hint::black_box(spin(std::hint::black_box(n)));
        if start.elapsed() >= task_time {
            return Ok(n);
        }
        n = n.checked_mul(2).ok_or("spin calibration overflowed")?;
    }
}

/// One sample of the speedup workload: the time of [`SPEEDUP_TASKS`] `spin(n)` in a row over
/// the time of `parallel` (which runs the same tasks on a pool), back to back so that the
/// VM's speed changes hit both.
pub fn speedup_sample(n: u64, parallel: impl FnOnce() -> BenchResult<()>) -> BenchResult<f64> {
    let start = Instant::now();
    for _ in 0..SPEEDUP_TASKS {
        std::hint::black_box(spin(std::hint::black_box(n)));
    }
    let serial = start.elapsed();
    let start = Instant::now();
    parallel()?;
    Ok(serial.as_secs_f64() / start.elapsed().as_secs_f64())
}

/// CPU-bound task of the speedup workload: the same integer loop as the
/// CPython program's `spin`. Never inlined, so that the serial side and the
/// pool's workers run the very same machine code (inlined into the serial
/// loop, LLVM compiles it differently and the "speedup" measures codegen).
#[inline(never)]
pub fn spin(n: u64) -> u64 {
    let mut acc = 0u64;
    for i in 0..n {
        acc = (acc + i * i) % 1_000_003;
    }
    acc
}

/// Joins a rig's child, turning its failure into an error.
fn finish(child: Child<ChildResult>) -> BenchResult<()> {
    Ok(child.join()??)
}

/// Echoes every `Some(n)` back; returns at `None`.
fn echo(conn: Connection) -> ChildResult {
    while let Some(n) = conn.recv::<Option<u64>>().map_err(|e| e.to_string())? {
        conn.send(n).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A child echoing u64s over a duplex Pipe.
pub struct EchoRig {
    here: Connection,
    child: Child<ChildResult>,
}

impl EchoRig {
    /// Starts the echoing child.
    pub fn start() -> BenchResult<Self> {
        let (here, there) = Pipe::duplex()?;
        let child = Process::new(echo).args(there).start()?;
        Ok(EchoRig { here, child })
    }

    /// Time of `k` round trips (`send` + `recv` of a u64).
    pub fn round_trips(&self, k: u64) -> BenchResult<Duration> {
        let start = Instant::now();
        for i in 0..k {
            self.here.send(Some(i))?;
            if self.here.recv::<u64>()? != i {
                return Err("the echo returned another number".into());
            }
        }
        Ok(start.elapsed())
    }

    /// Stops the child.
    pub fn stop(self) -> BenchResult<()> {
        self.here.send(None::<u64>)?;
        finish(self.child)
    }
}

/// Receives batches: a count, then that many byte messages; answers with the
/// total bytes received. Returns at a count of 0.
fn byte_sink(conn: Connection) -> ChildResult {
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

/// A child receiving byte messages over a duplex Pipe.
pub struct SinkRig {
    here: Connection,
    child: Child<ChildResult>,
    payload: Vec<u8>,
}

impl SinkRig {
    /// Starts the receiving child; messages will be `size` bytes.
    pub fn start(size: usize) -> BenchResult<Self> {
        let (here, there) = Pipe::duplex()?;
        let child = Process::new(byte_sink).args(there).start()?;
        Ok(SinkRig {
            here,
            child,
            payload: vec![3; size],
        })
    }

    /// Time to `send_bytes` `k` messages until the child confirms them all.
    pub fn send(&self, k: u64) -> BenchResult<Duration> {
        let start = Instant::now();
        self.here.send(k)?;
        for _ in 0..k {
            self.here.send_bytes(&self.payload)?;
        }
        let received: u64 = self.here.recv()?;
        let expected = k * self.payload.len() as u64;
        if received != expected {
            return Err(format!("the sink got {received} bytes of {expected}").into());
        }
        Ok(start.elapsed())
    }

    /// Stops the child.
    pub fn stop(self) -> BenchResult<()> {
        self.here.send(0u64)?;
        finish(self.child)
    }
}

/// An item of the queue workloads.
pub trait QueueItem: Serialize + DeserializeOwned + Clone + Send + 'static {
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

/// A queue producer: per batch, puts the count it is sent, then echoes it.
fn producer<T: QueueItem>((control, queue, item): (Connection, Queue<T>, T)) -> ChildResult {
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
fn consumer<T: QueueItem>((control, queue): (Connection, Queue<T>)) -> ChildResult {
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

/// Producer and consumer processes on one unbounded Queue, each driven over
/// its own control Pipe (as the CPython program does it).
pub struct QueueRig {
    to_producers: Vec<Connection>,
    to_consumers: Vec<Connection>,
    children: Vec<Child<ChildResult>>,
}

impl QueueRig {
    /// Starts `producers` processes putting `item` and `consumers` getting.
    pub fn start<T: QueueItem>(producers: usize, consumers: usize, item: T) -> BenchResult<Self> {
        let queue: Queue<T> = Queue::unbounded()?;
        let mut rig = QueueRig {
            to_producers: Vec::new(),
            to_consumers: Vec::new(),
            children: Vec::new(),
        };
        for _ in 0..producers {
            let (here, there) = Pipe::duplex()?;
            let args = (there, queue.clone(), item.clone());
            rig.children
                .push(Process::new(producer::<T>).args(args).start()?);
            rig.to_producers.push(here);
        }
        for _ in 0..consumers {
            let (here, there) = Pipe::duplex()?;
            let args = (there, queue.clone());
            rig.children
                .push(Process::new(consumer::<T>).args(args).start()?);
            rig.to_consumers.push(here);
        }
        Ok(rig)
    }

    /// Items moved by one [`transfer`](Self::transfer) of `k`:
    /// `k * producers * consumers`, so that every producer puts and every
    /// consumer gets an equal share.
    pub fn items(&self, k: u64) -> u64 {
        k * (self.to_producers.len() * self.to_consumers.len()) as u64
    }

    /// Time until the consumers have got all [`items`](Self::items)`(k)`.
    pub fn transfer(&self, k: u64) -> BenchResult<Duration> {
        let items = self.items(k);
        let start = Instant::now();
        for c in &self.to_consumers {
            c.send(items / self.to_consumers.len() as u64)?;
        }
        for p in &self.to_producers {
            p.send(items / self.to_producers.len() as u64)?;
        }
        for c in &self.to_consumers {
            c.recv::<u64>()?;
        }
        let took = start.elapsed();
        for p in &self.to_producers {
            p.recv::<u64>()?;
        }
        Ok(took)
    }

    /// Stops every child.
    pub fn stop(self) -> BenchResult<()> {
        for control in self.to_producers.iter().chain(&self.to_consumers) {
            control.send(0u64)?;
        }
        self.children.into_iter().try_for_each(finish)
    }
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

/// Two forked processes each add 1 to `counter` `k` times under its lock,
/// released together by a barrier; returns the slower one's loop time, after
/// checking that no increment was lost.
pub fn counter_race(counter: &Value<i64>, k: u64) -> BenchResult<Duration> {
    let start = Barrier::new(2)?;
    let before = counter.get().map_err(|e| e.to_string())?;
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
    let added = counter.get().map_err(|e| e.to_string())? - before;
    if added != 2 * k as i64 {
        return Err(format!("lost increments: {added} of {}", 2 * k).into());
    }
    Ok(Duration::from_nanos(slowest))
}
