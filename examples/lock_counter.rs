//! Four processes each add 1 to a shared counter 100000 times under its lock;
//! the parent prints the total, which is exactly 400000.
//!
//! ```text
//! cargo run --release --example lock_counter
//! ```
//!
//! The `Value` lives in shared memory; passing it as an argument gives each
//! child a handle to the same memory and the same (robust) lock.

use multiproc::Process;
use multiproc::mp_ipc::Value;

const PROCESSES: u64 = 4;
const INCREMENTS: u64 = 100_000;

fn add(counter: Value<u64>) {
    for _ in 0..INCREMENTS {
        // A lock whose previous holder died still hands over the guard: the
        // counter is consistent here (every update is one store), so recover.
        let mut count = counter
            .lock()
            .or_else(|e| e.recover())
            .expect("lock the counter");
        *count += 1;
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let counter = Value::new(0u64)?;
    let children = (0..PROCESSES)
        .map(|_| Process::new(add).args(counter.clone()).start())
        .collect::<Result<Vec<_>, _>>()?;
    for child in &children {
        child.join()?;
    }
    let total = counter.get()?;
    println!("total = {total}");
    assert_eq!(total, PROCESSES * INCREMENTS);
    Ok(())
}
