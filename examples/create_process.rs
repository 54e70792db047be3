//! Seed Q3: create a process, let it print, wait for it.
//!
//! ```text
//! cargo run --example create_process
//! ```

use multiproc::Process;

fn process_function() {
    println!("This is a child process");
}

fn main() -> Result<(), multiproc::ProcessError> {
    let process = Process::new(process_function).start()?;
    process.join()?;
    println!("The process has completed");
    Ok(())
}
