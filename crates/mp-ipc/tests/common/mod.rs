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
