//! A pool that runs many tasks leaks nothing: no descriptor, no process. In its own test
//! binary (one test) so that no other test's pool moves the counts.

use std::time::Duration;

use mp_pool::Pool;

const LIMIT: Duration = Duration::from_secs(30);

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

fn add(x: u64) -> u64 {
    x + 1
}

/// 10 000 tasks through every kind of submission.
fn workload(pool: &Pool) {
    let applied: Vec<_> = (0..2_500u64)
        .map(|i| pool.apply_async(add, i).unwrap())
        .collect();
    for (i, result) in applied.into_iter().enumerate() {
        assert_eq!(result.get_timeout(LIMIT).unwrap(), i as u64 + 1);
    }
    let mapped = pool.chunksize(1).map_async(add, 0..2_500u64).unwrap();
    assert_eq!(mapped.get_timeout(LIMIT).unwrap().len(), 2_500);
    assert_eq!(
        pool.imap(add, 0..2_500u64).filter(|r| r.is_ok()).count(),
        2_500
    );
    // Large chunks travel out of band (in the ring's heap), which must be freed again.
    let big = pool.chunksize(1_250).map_async(add, 0..2_500u64).unwrap();
    assert_eq!(big.get_timeout(LIMIT).unwrap().len(), 2_500);
}

#[test]
fn ten_thousand_tasks_leave_no_descriptor_or_process_behind() {
    // The first handle sent to another process starts mp-ipc's descriptor courier, which
    // lives as long as this process (three descriptors): start it before counting.
    {
        let warm_up = Pool::new(1).unwrap();
        assert_eq!(warm_up.apply(add, 1).unwrap(), 2);
        warm_up.close();
        warm_up.join_timeout(LIMIT).unwrap();
    }
    let descriptors_before_pool = open_descriptors();
    let children_before_pool = mp_core::active_children().len();
    let pool = Pool::new(2).unwrap();
    workload(&pool); // warm-up: every lazily created resource exists now
    let (descriptors, children) = (open_descriptors(), mp_core::active_children().len());
    for _ in 0..2 {
        workload(&pool);
        // A leak per task would be thousands. What may appear late is bounded: a queue
        // caches a pidfd per other holder process the first time one of its calls sleeps
        // (mp-ipc `queue/holders.rs`), which on a loaded machine can happen in any round.
        let now = open_descriptors();
        assert!(
            now <= descriptors + 8,
            "descriptors grew while running tasks: {descriptors} after the warm-up, {now} now"
        );
        assert_eq!(mp_core::active_children().len(), children, "processes grew");
    }
    pool.close();
    pool.join_timeout(LIMIT).unwrap();
    drop(pool);
    assert_eq!(
        mp_core::active_children().len(),
        children_before_pool,
        "workers left behind"
    );
    // mp-ipc's courier closes a lent handle's channel once the handle was claimed, on its
    // own thread: allow it a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while open_descriptors() > descriptors_before_pool && std::time::Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert!(
        open_descriptors() <= descriptors_before_pool,
        "descriptors left behind: {} before, {} after",
        descriptors_before_pool,
        open_descriptors()
    );
}
