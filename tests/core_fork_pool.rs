//! mp-core across crates: a child forked from a thread of a busy parent builds a `Pool` under
//! every start method of its own, and a forged `Barrier` (whose action is a function id) is
//! refused when decoded.

use std::time::Duration;

use multiproc::{Barrier, Pool, Process, SharedMemory, StartMethod};
use serde::{Deserialize, Serialize};

/// The longest any join here may take before the test fails instead of hanging.
const BOUND: Duration = Duration::from_secs(30);

fn pools_of_every_start_method() -> Vec<Vec<u64>> {
    StartMethod::ALL
        .into_iter()
        .map(|method| {
            // Built from a thread of the forked child, as a library would.
            std::thread::spawn(move || {
                let pool = Pool::builder()
                    .processes(2)
                    .start_method(method)
                    .build()
                    .unwrap();
                let squares = pool.map(|x: u64| x * x, 1..=4).unwrap();
                pool.close();
                pool.join_timeout(BOUND).unwrap();
                squares
            })
            .join()
            .unwrap()
        })
        .collect()
}

#[test]
fn a_child_forked_from_a_thread_builds_a_pool() {
    // A second thread keeps the launcher and the fork server busy while the fork happens.
    let busy = std::thread::spawn(|| {
        for _ in 0..10 {
            let child = Process::new(|| 1u8)
                .start_method(StartMethod::ForkServer)
                .start()
                .unwrap();
            child.join_timeout(BOUND).unwrap();
        }
    });
    let pools = std::thread::spawn(|| {
        // A daemon: if it hangs, the join times out and the exit does not wait for it.
        let child = Process::new(pools_of_every_start_method)
            .start_method(StartMethod::Fork)
            .daemon(true)
            .start()
            .unwrap();
        child.join_timeout(BOUND * 2)
    })
    .join()
    .unwrap();
    busy.join().unwrap();
    assert_eq!(pools.unwrap(), vec![vec![1, 4, 9, 16]; 3]);
}

fn action() {}

#[derive(Serialize, Deserialize)]
struct RawId {
    offset: i64,
    tag: u64,
}

/// The wire shape of a `Barrier`: its shared state (a segment and an offset), its action (a
/// function id) and its default timeout.
#[derive(Serialize, Deserialize)]
struct BarrierWire {
    state: (SharedMemory, u64),
    action: Option<RawId>,
    timeout: Option<Duration>,
}

/// Sends `wire` over a fresh channel and receives it as a `Barrier`.
fn as_barrier(wire: BarrierWire) -> Result<Barrier, ipc_channel::IpcError> {
    let (tx, rx) = ipc_channel::ipc::channel::<BarrierWire>().unwrap();
    tx.send(wire).unwrap();
    rx.to_opaque().to::<Barrier>().recv()
}

#[test]
fn a_barrier_with_a_forged_action_is_refused() {
    let barrier = Barrier::builder(1).action(action).build().unwrap();
    let (wire_tx, wire_rx) = ipc_channel::ipc::channel::<Barrier>().unwrap();
    wire_tx.send(barrier.clone()).unwrap();
    let wire = wire_rx.to_opaque().to::<BarrierWire>().recv().unwrap();
    let RawId { offset, tag } = wire.action.expect("the barrier has an action");

    // Unchanged, it decodes as a Barrier whose action runs.
    let genuine = BarrierWire {
        state: (wire.state.0.clone(), wire.state.1),
        action: Some(RawId { offset, tag }),
        timeout: wire.timeout,
    };
    let decoded = as_barrier(genuine).expect("a genuine barrier decodes");
    decoded.wait().unwrap();

    // Pointed elsewhere, or with a made-up tag, it is refused before anything runs.
    for forged in [
        RawId {
            offset: offset + 64,
            tag,
        },
        RawId {
            offset,
            tag: tag.wrapping_add(1),
        },
    ] {
        let forged = BarrierWire {
            state: (wire.state.0.clone(), wire.state.1),
            action: Some(forged),
            timeout: None,
        };
        let Err(error) = as_barrier(forged) else {
            panic!("a forged barrier must not decode");
        };
        assert!(
            matches!(error, ipc_channel::IpcError::SerializationError(_)),
            "{error:?}"
        );
    }
}

/// The tests of this binary fork from libtest's threads. SAFETY (of the `allow_fork` below):
/// no test here holds a lock of its own, or of a library, that a forked child then uses; the
/// locks the children touch are mp-core's, which are safe across `fork()`.
#[ctor::ctor(unsafe)]
fn allow_fork_in_these_tests() {
    // SAFETY: see above: nothing a forked child uses is held by another thread of this binary.
    unsafe { multiproc::allow_fork() };
}
