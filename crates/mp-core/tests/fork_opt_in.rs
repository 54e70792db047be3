//! The fork start method is an explicit `unsafe` opt-in (`allow_fork`): without it a start with
//! `Fork` is refused with a typed error, and the other methods are unaffected.
//!
//! One test function, because the opt-in is process-wide and cannot be taken back.

use std::time::Duration;

use mp_core::{Process, ProcessError, StartMethod};

fn square(x: u64) -> u64 {
    x * x
}

#[test]
fn fork_is_refused_until_the_program_allows_it() {
    assert!(!mp_core::fork_allowed());
    let refused = Process::new(square)
        .args(3)
        .start_method(StartMethod::Fork)
        .start();
    match refused {
        Err(ProcessError::ForkNotAllowed) => {}
        Err(other) => panic!("expected ForkNotAllowed, got {other}"),
        Ok(child) => {
            let _ = child.kill();
            panic!("a fork start succeeded without allow_fork");
        }
    }
    assert!(
        ProcessError::ForkNotAllowed
            .to_string()
            .contains("allow_fork"),
        "the error says how to opt in"
    );
    // The default method is not affected.
    let child = Process::new(square)
        .args(4)
        .start()
        .expect("spawn needs no opt-in");
    assert_eq!(child.join_timeout(Duration::from_secs(20)).unwrap(), 16);

    // SAFETY: this test binary has no threads of its own holding locks a child would use.
    unsafe { mp_core::allow_fork() };
    assert!(mp_core::fork_allowed());
    let child = Process::new(square)
        .args(5)
        .start_method(StartMethod::Fork)
        .start()
        .expect("fork works once allowed");
    assert_eq!(child.join_timeout(Duration::from_secs(20)).unwrap(), 25);
}
