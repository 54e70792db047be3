//! Producer and consumer processes over a `Queue`, then ping-pong over a
//! `Pipe`, printing what happened.
//!
//! ```text
//! cargo run --release --example queue_pipe
//! ```
//!
//! Both travel to the children as ordinary arguments: each child gets a
//! handle to the same shared-memory queue or pipe.

use std::time::{Duration, Instant};

use multiproc::Process;
use multiproc::mp_ipc::{Connection, ConnectionError, Pipe, Queue, QueueError};

const PRODUCERS: u32 = 2;
const ITEMS_PER_PRODUCER: u32 = 100_000;
const ROUND_TRIPS: u32 = 10_000;

/// A unit of work: which producer made it, and its number.
type Job = (u32, u32);

/// Puts this producer's jobs, waiting for room when the bounded queue is full.
fn produce((jobs, producer): (Queue<Job>, u32)) -> u32 {
    for n in 0..ITEMS_PER_PRODUCER {
        jobs.put((producer, n)).expect("put a job");
    }
    ITEMS_PER_PRODUCER
}

/// Takes jobs until the queue is closed and drained; returns how many it
/// took and their checksum.
fn consume(jobs: Queue<Job>) -> (u64, u64) {
    let (mut count, mut sum) = (0, 0);
    loop {
        match jobs.get() {
            Ok((producer, n)) => {
                count += 1;
                sum += u64::from(producer) * 1_000_000 + u64::from(n);
            }
            Err(QueueError::Closed) => return (count, sum),
            Err(error) => panic!("get failed: {error}"),
        }
    }
}

/// Answers every number with the next one until the other end goes away.
fn echo_plus_one(conn: Connection) -> u32 {
    let mut answered = 0;
    loop {
        match conn.recv::<u32>() {
            Ok(n) => {
                conn.send(n + 1).expect("send");
                answered += 1;
            }
            Err(ConnectionError::Closed) => return answered,
            Err(error) => panic!("recv failed: {error}"),
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("Queue: {PRODUCERS} producer processes -> 2 consumer processes");
    let jobs: Queue<Job> = Queue::bounded(1000)?;
    let started = Instant::now();
    let consumers = (0..2)
        .map(|_| Process::new(consume).args(jobs.clone()).start())
        .collect::<Result<Vec<_>, _>>()?;
    let producers = (0..PRODUCERS)
        .map(|p| Process::new(produce).args((jobs.clone(), p)).start())
        .collect::<Result<Vec<_>, _>>()?;
    let mut put = 0;
    for producer in &producers {
        put += producer.join()?;
    }
    // Every put has returned: shut the queue down, and the consumers drain what is left.
    jobs.shutdown()?;
    let (mut taken, mut checksum) = (0, 0);
    for (i, consumer) in consumers.iter().enumerate() {
        let (count, sum) = consumer.join()?;
        println!("  consumer {i} (pid {}) took {count} jobs", consumer.pid());
        taken += count;
        checksum += sum;
    }
    let expected: u64 = (0..u64::from(PRODUCERS))
        .map(|p| {
            (0..u64::from(ITEMS_PER_PRODUCER))
                .map(|n| p * 1_000_000 + n)
                .sum::<u64>()
        })
        .sum();
    let elapsed = started.elapsed();
    println!(
        "  {put} jobs put, {taken} taken, checksum {}, in {:.1} ms ({:.1} M jobs/s)",
        if checksum == expected { "ok" } else { "WRONG" },
        elapsed.as_secs_f64() * 1e3,
        f64::from(put) / elapsed.as_secs_f64() / 1e6,
    );
    assert_eq!((u64::from(put), checksum), (taken, expected));

    println!("Pipe: ping-pong with a child");
    let (here, there) = Pipe::duplex()?;
    let child = Process::new(echo_plus_one).args(there).start()?;
    let started = Instant::now();
    let mut n = 0u32;
    for _ in 0..ROUND_TRIPS {
        here.send(n)?;
        n = here.recv_timeout(Duration::from_secs(10))?;
    }
    let elapsed = started.elapsed();
    println!(
        "  {ROUND_TRIPS} round trips, counted to {n}, {:.2} µs per round trip",
        elapsed.as_secs_f64() * 1e6 / f64::from(ROUND_TRIPS)
    );
    // Closing our end ends the child's loop: its recv returns Closed.
    here.close();
    let answered = child.join()?;
    println!("  the child answered {answered} messages and saw the pipe close");
    assert_eq!(n, ROUND_TRIPS);
    Ok(())
}
