//! Criterion benches of the mp-ipc primitives (Pipe, Queue, Lock, Semaphore,
//! Value, SharedMemory): the figures behind the mp-ipc benchmark targets.
//! The side-by-side comparison with CPython is `mp-bench compare`.
//!
//! (The benches are wired in as the primitives land.)

fn main() {}
