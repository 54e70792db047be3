//! Helpers shared by the leak tests.

/// Open memfd descriptors and memfd mappings of this process.
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn memfd_resources() -> (usize, usize) {
    let descriptors = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("/memfd:"))
        .count();
    let mappings = std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|line| line.contains("/memfd:"))
        .count();
    (descriptors, mappings)
}

/// Every open descriptor of this process (memfds, pipes, sockets, eventfds...).
#[allow(dead_code)] // not every test binary that includes this module uses it
pub fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Waits (yielding, at most 10 s) until `condition` holds; whether it did.
/// For resources released by a helper thread (the courier closes a ticket's
/// channel once every copy of the ticket is gone).
#[allow(dead_code)]
pub fn eventually(condition: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !condition() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

/// Runs `body` in a copy of this test binary inside a mount namespace where
/// `/proc` is an empty tmpfs (`unshare --mount`, as root or in a user
/// namespace); where namespaces are not permitted, says so and returns.
/// `test` is the full name of the calling test, which the copy runs alone.
#[allow(dead_code)]
pub fn with_proc_hidden(test: &str, body: fn()) {
    use std::process::Command;
    const INSIDE: &str = "MP_IPC_TEST_PROC_HIDDEN";
    /// Mounts an empty tmpfs over `/proc`, then runs `$0 "$@"`.
    const HIDE_PROC: &str = "mount -t tmpfs mp-ipc-no-proc /proc && exec \"$0\" \"$@\"";
    if std::env::var_os(INSIDE).is_some() {
        assert!(
            !std::path::Path::new("/proc/self").exists(),
            "/proc is still visible inside the namespace"
        );
        return body();
    }
    let unshare = ["--mount", "--propagation", "private", "sh", "-c", HIDE_PROC];
    match Command::new("unshare").args(unshare).arg("true").output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => {
            return eprintln!(
                "SKIPPED: cannot hide /proc in a mount namespace here ({})",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        Err(error) => return eprintln!("SKIPPED: `unshare` is not available ({error})"),
    }
    let output = Command::new("unshare")
        .args(unshare)
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
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
