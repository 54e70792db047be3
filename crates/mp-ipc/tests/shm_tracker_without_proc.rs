//! The shared memory tracker where `/proc` is an empty tmpfs: a forked child
//! creates a named segment and is SIGKILLed; its tracker (started from the
//! program's recorded path, as mp-core's spawn does without `/proc`) unlinks
//! the segment.
//!
//! The test re-runs itself under `unshare --mount` (root, or a user
//! namespace); where namespaces are not permitted it says so and passes.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use mp_core::{Process, ProcessError, StartMethod};
use mp_ipc::SharedMemory;

const PATIENCE: Duration = Duration::from_secs(20);

#[test]
fn a_sigkilled_creators_segment_is_unlinked_with_proc_hidden() {
    common::with_proc_hidden(
        "a_sigkilled_creators_segment_is_unlinked_with_proc_hidden",
        body,
    );
}

fn body() {
    let name = format!("mp-ipc-tracker-no-proc-{}", std::process::id());
    let path = Path::new("/dev/shm").join(&name);
    let child = Process::new(|name: String| {
        SharedMemory::create(&name, 4096).unwrap();
        // SAFETY: kill takes plain integers.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    })
    .start_method(StartMethod::Fork)
    .args(name.clone())
    .start()
    .unwrap();
    let outcome = child.join_timeout(PATIENCE);
    assert!(
        matches!(outcome, Err(ProcessError::Signaled { .. })),
        "the child died of SIGKILL: {outcome:?}"
    );
    let deadline = Instant::now() + PATIENCE;
    while path.exists() {
        if Instant::now() > deadline {
            let _ = SharedMemory::unlink_name(&name);
            panic!("the tracker did not unlink {name} without /proc");
        }
        std::thread::yield_now();
    }
}

/// The test forks from libtest's threads. SAFETY (of the `allow_fork` below):
/// no test here holds a lock that the forked child then uses; the locks the
/// child touches are mp-core's, which are safe across `fork()`.
#[ctor::ctor(unsafe)]
fn allow_fork_in_these_tests() {
    // SAFETY: see above.
    unsafe { mp_core::allow_fork() };
}
