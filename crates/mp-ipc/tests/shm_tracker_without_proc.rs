//! The shared memory tracker where `/proc` is an empty tmpfs: a forked child
//! creates a named segment and is SIGKILLed; its tracker (started from the
//! program's recorded path, as mp-core's spawn does without `/proc`) unlinks
//! the segment.
//!
//! The test re-runs itself under `unshare --mount` (root, or a user
//! namespace); where namespaces are not permitted it says so and passes.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mp_core::{Process, ProcessError, StartMethod};
use mp_ipc::SharedMemory;

const PATIENCE: Duration = Duration::from_secs(20);
const INSIDE: &str = "MP_IPC_TEST_PROC_HIDDEN";
const NAME: &str = "a_sigkilled_creators_segment_is_unlinked_with_proc_hidden";

/// Mounts an empty tmpfs over `/proc`, then runs `command` (in `$0 "$@"`).
const HIDE_PROC: &str = "mount -t tmpfs mp-ipc-no-proc /proc && exec \"$0\" \"$@\"";

#[test]
fn a_sigkilled_creators_segment_is_unlinked_with_proc_hidden() {
    if std::env::var_os(INSIDE).is_some() {
        assert!(
            !Path::new("/proc/self").exists(),
            "/proc is still visible inside the namespace"
        );
        body();
        return;
    }
    let probe = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            HIDE_PROC,
            "true",
        ])
        .output();
    match probe {
        Ok(output) if output.status.success() => {}
        Ok(output) => {
            eprintln!(
                "SKIPPED: cannot hide /proc in a mount namespace here ({})",
                String::from_utf8_lossy(&output.stderr).trim()
            );
            return;
        }
        Err(error) => {
            eprintln!("SKIPPED: `unshare` is not available ({error})");
            return;
        }
    }
    let exe = std::env::current_exe().unwrap();
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", HIDE_PROC])
        .arg(&exe)
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env(INSIDE, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "inside the namespace: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
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
