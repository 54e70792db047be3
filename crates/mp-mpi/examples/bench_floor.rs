//! The floor for the MPI pool's benchmark: raw rsmpi, no pool, blocking (spinning) calls.
//!
//! ```text
//! mpirun -n 3 target/release/examples/bench_floor
//! ```
//!
//! * `raw_pingpong_8b`: rank 0 ↔ rank 1, an 8-byte message each way;
//! * `raw_loop_per_task`: rank 0 hands out `x` one at a time to whichever worker answers
//!   (any-source receive), workers answer `x * x`: the cost per task of the simplest dynamic
//!   scheduling loop MPI allows, the floor of the pool's `chunksize(1)` overhead.

use std::time::Instant;

use mpi::collective::CommunicatorCollectives;
use mpi::point_to_point::{Destination, Source};
use mpi::topology::Communicator;

const PINGS: usize = 20_000;
const TASKS: u64 = 200_000;
const TAG_WORK: i32 = 1;
const TAG_STOP: i32 = 2;

fn main() {
    let universe = mpi::initialize().expect("MPI initialises once");
    let world = universe.world();
    let (rank, size) = (world.rank(), world.size());
    assert!(size >= 2, "run under mpirun -n 2 or more");

    // Ping-pong between ranks 0 and 1.
    world.barrier();
    if rank == 0 {
        let start = Instant::now();
        for i in 0..PINGS as u64 {
            world.process_at_rank(1).send(&i);
            let (_back, _) = world.process_at_rank(1).receive::<u64>();
        }
        let per = start.elapsed().as_secs_f64() / PINGS as f64;
        println!(
            "raw_pingpong_8b            {:>8.2} us  ({size} ranks)",
            per * 1e6
        );
    } else if rank == 1 {
        for _ in 0..PINGS {
            let (x, _) = world.process_at_rank(0).receive::<u64>();
            world.process_at_rank(0).send(&x);
        }
    }

    // The dynamic scheduling loop.
    world.barrier();
    if rank == 0 {
        let start = Instant::now();
        let mut next = 0u64;
        let mut outstanding = 0;
        let mut sum = 0u64;
        for worker in 1..size {
            world.process_at_rank(worker).send_with_tag(&next, TAG_WORK);
            next += 1;
            outstanding += 1;
        }
        while outstanding > 0 {
            let (square, status) = world.any_process().receive::<u64>();
            sum = sum.wrapping_add(square);
            outstanding -= 1;
            if next < TASKS {
                world
                    .process_at_rank(status.source_rank())
                    .send_with_tag(&next, TAG_WORK);
                next += 1;
                outstanding += 1;
            }
        }
        let per = start.elapsed().as_secs_f64() / TASKS as f64;
        for worker in 1..size {
            world.process_at_rank(worker).send_with_tag(&0u64, TAG_STOP);
        }
        let expected = (0..TASKS).fold(0u64, |s, x| s.wrapping_add(x * x));
        assert_eq!(sum, expected);
        println!(
            "raw_loop_per_task          {:>8.2} us  ({} workers, {TASKS} tasks)",
            per * 1e6,
            size - 1
        );
    } else {
        loop {
            let (x, status) = world.process_at_rank(0).receive::<u64>();
            if status.tag() == TAG_STOP {
                break;
            }
            world.process_at_rank(0).send(&(x * x));
        }
    }
}
