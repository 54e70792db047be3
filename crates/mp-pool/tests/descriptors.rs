//! Running out of descriptors (EMFILE) while a pool starts its workers and links is a typed
//! error, never a panic on a pool thread nor a hang; the pool serves with the workers it
//! could start. In its own test binary: it lowers this process's descriptor limit.

use std::time::Duration;

use mp_pool::{Pool, PoolError};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

const LIMIT: Duration = Duration::from_secs(20);

fn open_descriptors() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count() as u64
}

fn square(x: u64) -> u64 {
    x * x
}

/// What one pool does under the current limit, as text for the report of a failure; errors
/// a user must never see (a pool thread that panicked shows as `Terminated`, a hang as
/// `Timeout`) fail the test.
fn start_and_use_a_pool() -> String {
    let pool = match Pool::new(2) {
        Ok(pool) => pool,
        Err(PoolError::StartFailed(message)) => return format!("build failed: {message}"),
        Err(other) => panic!("build failed with {other:?}"),
    };
    let ready = pool.wait_ready(LIMIT);
    let applied = pool
        .apply_async(square, 3)
        .and_then(|result| result.get_timeout(LIMIT));
    match (&ready, &applied) {
        (_, Err(PoolError::Timeout | PoolError::Terminated)) | (Err(PoolError::Timeout), _) => {
            panic!("ready: {ready:?}, apply: {applied:?}")
        }
        (Ok(()), result) => assert_eq!(*result, Ok(9), "every worker was up"),
        (Err(PoolError::StartFailed(_)), Ok(9) | Err(PoolError::StartFailed(_))) => {}
        other => panic!("unexpected outcome {other:?}"),
    }
    format!("ready: {ready:?}, apply: {applied:?}")
}

#[test]
fn running_out_of_descriptors_is_a_typed_error_never_a_panic_or_a_hang() {
    let original = getrlimit(Resource::Nofile);
    // Warm up what is created once per process (mp-core's launcher thread...).
    start_and_use_a_pool();
    let base = open_descriptors();
    let mut outcomes = Vec::new();
    // Up to the first limit under which a pool starts whole (how many descriptors that takes
    // depends on what the queues and the courier hold: 40 to 60 here).
    for extra in (0..160).step_by(4) {
        let low = Rlimit {
            current: Some(base + extra),
            maximum: original.maximum,
        };
        setrlimit(Resource::Nofile, low).expect("lowering the descriptor limit");
        let outcome = std::panic::catch_unwind(start_and_use_a_pool);
        setrlimit(Resource::Nofile, original).expect("restoring the limit");
        match outcome {
            Ok(outcome) => outcomes.push(format!("{extra:>3} spare: {outcome}")),
            Err(_) => panic!("with {extra} spare descriptors (see the panic above)"),
        }
        if outcomes.last().is_some_and(|o| o.contains("ready: Ok")) {
            break;
        }
    }
    println!("{}", outcomes.join("\n"));
    assert!(
        outcomes
            .iter()
            .any(|o| o.contains("StartFailed") || o.contains("build failed")),
        "the limit never bit: {outcomes:#?}"
    );
    assert!(
        outcomes.iter().any(|o| o.contains("ready: Ok")),
        "no pool ever started: {outcomes:#?}"
    );
    assert_eq!(start_and_use_a_pool(), "ready: Ok(()), apply: Ok(9)");
}
