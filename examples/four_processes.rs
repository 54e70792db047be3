//! Seed Q6: four processes, each printing its own number and its own PID.
//!
//! ```text
//! cargo run --example four_processes
//! ```

use multiproc::{Process, current_process};

fn print_number(number: u32) {
    println!("Process {number}: pid {}", current_process().pid);
}

fn main() -> Result<(), multiproc::ProcessError> {
    let processes = (1..=4)
        .map(|number| Process::new(print_number).args(number).start())
        .collect::<Result<Vec<_>, _>>()?;
    // Unlike the seed (which joined only the last one), join every process.
    for process in &processes {
        process.join()?;
    }
    println!("All four processes have finished.");
    Ok(())
}
