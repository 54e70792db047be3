//! A child starts in its requester's current working directory and environment under every
//! start method, including forkserver, whose server was started earlier, elsewhere.
//!
//! One test in its own binary: it changes the process's directory and environment, which
//! other tests running on threads of the same process (plain `cargo test`) must not see.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use mp_core::{Process, StartMethod};

const BOUND: Duration = Duration::from_secs(20);
const VARIABLE: &str = "MP_CORE_TEST_SURROUNDINGS";

/// What a child sees: its working directory and the test variable.
fn surroundings() -> (PathBuf, Option<OsString>) {
    (
        std::env::current_dir().expect("a working directory"),
        std::env::var_os(VARIABLE),
    )
}

/// Starts a child under every start method and checks what it sees.
fn every_child_sees(expected: (PathBuf, Option<OsString>)) {
    for method in StartMethod::ALL {
        let child = Process::new(surroundings)
            .start_method(method)
            .start()
            .unwrap();
        assert_eq!(child.join_timeout(BOUND).unwrap(), expected, "{method}");
    }
}

#[test]
fn children_see_the_requesters_current_directory_and_environment() {
    // SAFETY: this test binary has one test, and the only other threads are mp-core's, which
    // read the environment only while starting a process (none is being started here).
    unsafe { mp_core::allow_fork() };
    let start = std::env::current_dir().unwrap();
    // Start the fork server now, here, without the variable.
    every_child_sees((start.clone(), None));

    let elsewhere =
        std::env::temp_dir().join(format!("mp-core-surroundings-{}", std::process::id()));
    std::fs::create_dir_all(&elsewhere).unwrap();
    let elsewhere = elsewhere.canonicalize().unwrap();
    std::env::set_current_dir(&elsewhere).unwrap();
    // SAFETY: as above, no other thread reads the environment now.
    unsafe { std::env::set_var(VARIABLE, "after the server started") };
    every_child_sees((elsewhere.clone(), Some("after the server started".into())));

    // And back: a variable removed is gone in the child too.
    std::env::set_current_dir(&start).unwrap();
    // SAFETY: as above.
    unsafe { std::env::remove_var(VARIABLE) };
    std::fs::remove_dir(&elsewhere).unwrap();
    every_child_sees((start, None));
}
