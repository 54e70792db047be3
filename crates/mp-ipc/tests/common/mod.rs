//! Helpers shared by the leak tests.

/// Open memfd descriptors and memfd mappings of this process.
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
