//! Handled signals arriving while the pool's threads wait (a `SIGUSR1` handler installed
//! without `SA_RESTART`, so that every blocking call is interrupted with `EINTR`): deadlines
//! still fire on time, results still arrive, nothing fails spuriously. In its own test binary
//! because the handler is process-wide.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mp_pool::{Pool, PoolError, ReturnWhen, wait};

mod common;
use common::*;

static HANDLED: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_signal(_: libc::c_int) {
    HANDLED.fetch_add(1, Ordering::Relaxed);
}

fn install_handler() {
    // SAFETY: an all-zero sigaction is valid (empty mask, no flags); the handler only
    // touches an atomic, which is async-signal-safe.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_signal as *const () as usize;
        action.sa_flags = 0; // no SA_RESTART: interrupted calls fail with EINTR
        assert_eq!(
            libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()),
            0
        );
    }
}

fn square(x: u64) -> u64 {
    x * x
}

fn stuck(_: ()) -> u32 {
    loop {
        std::thread::park();
    }
}

#[test]
fn deadlines_and_results_survive_a_storm_of_handled_signals() {
    install_handler();
    let pool = Pool::new(2).unwrap();
    pool.wait_ready(LIMIT).unwrap();
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let me = rustix::process::getpid();
            while !stop.load(Ordering::Relaxed) {
                // To the process: the kernel picks a thread that does not block it, the
                // pool's supervisor and result threads included.
                let _ = rustix::process::kill_process(me, rustix::process::Signal::USR1);
                std::thread::yield_now();
            }
        });
        let timeout = Duration::from_millis(300);
        let started = Instant::now();
        let timed = pool.timeout(timeout).apply_async(stuck, ()).unwrap();
        let squares = pool.chunksize(1).map(square, 0..2_000u64).unwrap();
        assert_eq!(squares[1_999], 1_999 * 1_999);
        let waited = wait(
            std::slice::from_ref(&timed),
            ReturnWhen::AllCompleted,
            Some(LIMIT),
        );
        assert_eq!(waited.done, [0]);
        assert!(
            matches!(timed.get(), Err(PoolError::TaskTimedOut { .. })),
            "{:?}",
            timed.get()
        );
        let elapsed = started.elapsed();
        assert!(elapsed >= timeout && elapsed < LIMIT, "{elapsed:?}");
        stop.store(true, Ordering::Relaxed);
    });
    assert!(HANDLED.load(Ordering::Relaxed) > 0, "no signal was handled");
    assert_eq!(pool.apply(square, 3), Ok(9));
    pool.close();
    pool.join_timeout(LIMIT).unwrap();
}
