//! A worker rank's loop: receive a chunk from rank 0, run it, send the result back, until
//! rank 0 says STOP.

use std::sync::OnceLock;

use mp_core::TaskFailure;
use mpi::point_to_point::{Destination, MatchedReceiveVec, Source};
use mpi::topology::{Communicator, SimpleCommunicator};

use crate::backoff::Backoff;
use crate::{task, wire};

/// This process's rank, once it serves as a worker rank.
static RANK: OnceLock<i32> = OnceLock::new();

/// The MPI rank of this process while it serves an [`MpiPool`](crate::MpiPool) as a worker
/// (`None` on rank 0 and outside MPI pools): tasks can ask where they run.
pub fn current_rank() -> Option<i32> {
    RANK.get().copied()
}

/// Exit code of a job aborted because rank 0 sent something this worker cannot parse.
const EXIT_PROTOCOL: i32 = 70;

/// Serves tasks until STOP; returns after answering STOPPED.
pub(crate) fn serve(world: &SimpleCommunicator) {
    let _ = RANK.set(world.rank());
    let root = world.process_at_rank(0);
    let mut backoff = Backoff::new();
    let mut served = 0u64;
    loop {
        let Some(probed) = root.immediate_matched_probe() else {
            backoff.pause();
            continue;
        };
        let (message, status) = probed.matched_receive_vec::<u8>();
        match status.tag() {
            wire::TASK => {
                let (key, function, arguments) = match wire::parse_task(&message) {
                    Ok(task) => task,
                    Err(error) => {
                        tracing::error!(rank = world.rank(), %error, "undecodable task from rank 0");
                        world.abort(EXIT_PROTOCOL);
                    }
                };
                let outcome = task::run_chunk_by_id(function, arguments);
                let mut reply = wire::result_message(key, &outcome);
                if reply.len() > wire::MAX_MESSAGE {
                    let failure = TaskFailure::BadResult(format!(
                        "a result of {} bytes exceeds MPI's message limit of {} bytes",
                        reply.len(),
                        wire::MAX_MESSAGE
                    ));
                    reply = wire::result_message(key, &Err(failure));
                }
                root.send_with_tag(&reply[..], wire::RESULT);
                served += 1;
                backoff.reset();
            }
            wire::STOP => {
                root.send_with_tag(&[0u8; 0][..], wire::STOPPED);
                tracing::debug!(rank = world.rank(), served, "worker rank stopped");
                return;
            }
            tag => {
                tracing::error!(rank = world.rank(), tag, "unexpected message from rank 0");
                world.abort(EXIT_PROTOCOL);
            }
        }
    }
}
