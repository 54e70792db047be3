//! A program that ignores `SIGCHLD` has its children reaped by the kernel: their exit status
//! is gone before `join` can collect it. `join` still returns what the function returned,
//! a child that ended without a value is a typed error (never a timeout or a hang), and the
//! child no longer counts as alive.
//!
//! Its own test binary, because the disposition is process-wide.

use std::time::Duration;

use mp_core::{Process, ProcessError, StartMethod};

const PATIENCE: Duration = Duration::from_secs(20);

fn double(x: u32) -> u32 {
    x * 2
}

fn exit_early(code: i32) {
    std::process::exit(code)
}

#[test]
fn children_of_a_program_that_ignores_sigchld_are_joined() {
    // SAFETY: the test harness's threads run no signal handlers; only this process's own
    // SIGCHLD disposition changes.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    // SAFETY: this test's only other threads are the harness's and mp-core's, which hold no
    // lock a forked child uses.
    unsafe { mp_core::allow_fork() };
    for method in StartMethod::ALL {
        let child = Process::new(double)
            .args(21)
            .start_method(method)
            .start()
            .unwrap();
        assert_eq!(child.join_timeout(PATIENCE).unwrap(), 42, "{method:?}");
        assert!(!child.is_alive(), "{method:?}");
        assert_eq!(
            child.exitcode(),
            None,
            "{method:?}: the status was the kernel's"
        );

        let child = Process::new(exit_early)
            .args(3)
            .start_method(method)
            .start()
            .unwrap();
        match child.join_timeout(PATIENCE) {
            Err(ProcessError::StatusLost { pid }) => assert_eq!(pid, child.pid()),
            other => panic!("{method:?}: expected StatusLost, got {other:?}"),
        }
        assert!(!child.is_alive(), "{method:?}");
    }
}
