//! Rank 0's dispatcher: the loop, on the thread that owns MPI, that sends chunks to worker
//! ranks, receives their results and hands them to the jobs.
//!
//! Scheduling is dynamic, like the local pool's: chunks wait in one FIFO queue (filled by the
//! user's threads under [`Shared::state`]); the least loaded worker rank is given the next
//! chunk whenever it holds fewer than its limit of unfinished ones. The limit adapts to how
//! long that rank's chunks take: [`SLOW_PREFETCH`] (2: the next chunk is already there when
//! the current one ends, and a slow task holds back at most one other) until a chunk comes
//! back within [`FAST_CHUNK`] of being sent, then `prefetch` (default 8), so that short tasks
//! are pipelined and a rank does not wait for rank 0 between them. Results are delivered as
//! each chunk ends.
//!
//! Sends are nonblocking (`MPI_Isend`): a blocking send of a large chunk (rendezvous protocol)
//! to a worker busy with a long task would stall every other rank's results until that task
//! ended. Receives are `MPI_Improbe` + `MPI_Mrecv` on any source, with the backoff of
//! `backoff.rs` while nothing arrives; with nothing in flight the dispatcher sleeps on a
//! condition variable until a task is submitted.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use mpi::point_to_point::{Destination, MatchedReceiveVec, Source, Status};
use mpi::request::{Request, StaticScope};
use mpi::topology::{Communicator, SimpleCommunicator};
use parking_lot::{Condvar, Mutex};

use crate::backoff::Backoff;
use crate::error::MpiPoolError;
use crate::job::{Chunk, Sink};
use crate::wire;

/// What the user's threads and the dispatcher share.
pub(crate) struct Shared {
    pub(crate) state: Mutex<State>,
    /// The dispatcher sleeps here; notified on submissions, close and terminate.
    pub(crate) wake: Condvar,
    /// Notified when the dispatcher has finished (`State::finished`).
    pub(crate) finished: Condvar,
    /// The key of the next chunk (keys match results to chunks).
    pub(crate) next_key: AtomicU64,
}

/// The queue and the pool's mode.
pub(crate) struct State {
    pub(crate) queue: VecDeque<Chunk>,
    pub(crate) mode: Mode,
    /// The dispatcher has stopped every worker rank and returned.
    pub(crate) finished: bool,
}

/// Whether the pool takes tasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    Open,
    /// No new tasks; those submitted still run.
    Closed,
    /// Unfinished tasks fail with `Terminated`.
    Terminated,
}

impl Shared {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                mode: Mode::Open,
                finished: false,
            }),
            wake: Condvar::new(),
            finished: Condvar::new(),
            next_key: AtomicU64::new(0),
        })
    }
}

/// The chunks a worker rank holds up to while its chunks take long.
const SLOW_PREFETCH: usize = 2;
/// A chunk answered within this time of being sent lets its rank hold `prefetch` chunks.
const FAST_CHUNK: Duration = Duration::from_micros(500);

/// What rank 0 knows of a worker rank's load.
#[derive(Clone, Copy, Debug, Default)]
struct Load {
    /// Chunks sent and not answered.
    held: usize,
    /// Whether its last chunk came back within `FAST_CHUNK`.
    fast: bool,
}

/// A chunk sent and not yet answered.
struct InFlight {
    index: usize,
    rank: i32,
    sent: Instant,
    sink: Arc<dyn Sink>,
    _send: OutgoingSend,
}

/// Runs the dispatcher until the pool is closed and idle, or terminated; then stops every
/// worker rank. Returns when nothing more will come from any of them.
pub(crate) fn dispatch(world: &SimpleCommunicator, shared: &Shared, prefetch: usize) {
    let size = world.size() as usize;
    let mut loads = vec![Load::default(); size];
    let mut in_flight: HashMap<u64, InFlight> = HashMap::new();
    let mut backoff = Backoff::new();
    loop {
        let mut progressed = false;
        while let Some(probed) = world
            .any_process()
            .immediate_matched_probe_with_tag(wire::RESULT)
        {
            let (message, status) = probed.matched_receive_vec::<u8>();
            receive_result(&message, &status, &mut in_flight, &mut loads);
            progressed = true;
        }
        let mut to_send = Vec::new();
        {
            let mut state = shared.state.lock();
            if state.mode == Mode::Terminated {
                let queued = std::mem::take(&mut state.queue);
                drop(state);
                for chunk in queued {
                    chunk
                        .sink
                        .deliver(chunk.index, 0, Err(MpiPoolError::Terminated));
                }
                for chunk in in_flight.values() {
                    chunk
                        .sink
                        .deliver(chunk.index, chunk.rank, Err(MpiPoolError::Terminated));
                }
                break;
            }
            while let Some(rank) = least_busy(&loads, prefetch) {
                let Some(chunk) = state.queue.pop_front() else {
                    break;
                };
                if chunk.sink.is_cancelled() {
                    continue;
                }
                loads[rank].held += 1;
                to_send.push((rank as i32, chunk));
            }
            if to_send.is_empty() && !progressed {
                if in_flight.is_empty() && state.mode == Mode::Closed && state.queue.is_empty() {
                    break;
                }
                match backoff.next_pause() {
                    None => {
                        drop(state);
                        std::thread::yield_now();
                    }
                    // Nothing can arrive from the workers: sleep until a submission.
                    Some(_) if in_flight.is_empty() => {
                        shared.wake.wait(&mut state);
                        backoff.reset();
                    }
                    Some(pause) => {
                        shared.wake.wait_for(&mut state, pause);
                    }
                }
                continue;
            }
        }
        backoff.reset();
        for (rank, chunk) in to_send {
            let send = OutgoingSend::start(world, rank, chunk.message, wire::TASK);
            in_flight.insert(
                chunk.key,
                InFlight {
                    index: chunk.index,
                    rank,
                    sent: Instant::now(),
                    sink: chunk.sink,
                    _send: send,
                },
            );
        }
    }
    stop_workers(world, in_flight);
    let mut state = shared.state.lock();
    state.finished = true;
    shared.finished.notify_all();
}

/// The worker rank holding the fewest chunks, if it holds fewer than its limit.
fn least_busy(loads: &[Load], prefetch: usize) -> Option<usize> {
    let limit = |load: &Load| {
        if load.fast {
            prefetch
        } else {
            prefetch.min(SLOW_PREFETCH)
        }
    };
    (1..loads.len())
        .filter(|&rank| loads[rank].held < limit(&loads[rank]))
        .min_by_key(|&rank| loads[rank].held)
}

/// Hands a result to its job.
fn receive_result(
    message: &[u8],
    status: &Status,
    in_flight: &mut HashMap<u64, InFlight>,
    loads: &mut [Load],
) {
    let rank = status.source_rank();
    match wire::parse_result(message) {
        Ok((key, outcome)) => match in_flight.remove(&key) {
            Some(chunk) => {
                let load = &mut loads[rank as usize];
                load.held = load.held.saturating_sub(1);
                load.fast = chunk.sent.elapsed() < FAST_CHUNK;
                let outcome = outcome.map_err(|f| MpiPoolError::from_task_failure(rank, f));
                chunk.sink.deliver(chunk.index, rank, outcome);
            }
            None => tracing::warn!(key, rank, "a result for no known task was dropped"),
        },
        Err(message) => {
            // A worker of this same executable never sends this; fail what that rank holds
            // rather than leave its tasks waiting forever.
            tracing::error!(rank, %message, "undecodable message from a worker rank");
            let keys: Vec<u64> = in_flight
                .iter()
                .filter(|(_, chunk)| chunk.rank == rank)
                .map(|(key, _)| *key)
                .collect();
            for key in keys {
                if let Some(chunk) = in_flight.remove(&key) {
                    let error = MpiPoolError::BadResult {
                        rank,
                        message: message.clone(),
                    };
                    chunk.sink.deliver(chunk.index, rank, Err(error));
                }
            }
            loads[rank as usize].held = 0;
        }
    }
}

/// Sends STOP to every worker rank and receives until each has answered STOPPED; results
/// still arriving (of terminated tasks) are dropped.
fn stop_workers(world: &SimpleCommunicator, mut in_flight: HashMap<u64, InFlight>) {
    let workers = world.size() - 1;
    for rank in 1..world.size() {
        // An empty message goes out eagerly: this send does not wait for the worker.
        world
            .process_at_rank(rank)
            .send_with_tag(&[0u8; 0][..], wire::STOP);
    }
    let mut stopped = 0;
    let mut backoff = Backoff::new();
    while stopped < workers {
        let Some(probed) = world.any_process().immediate_matched_probe() else {
            backoff.pause();
            continue;
        };
        let (message, status) = probed.matched_receive_vec::<u8>();
        match status.tag() {
            wire::STOPPED => stopped += 1,
            wire::RESULT => {
                if let Ok((key, _)) = wire::parse_result(&message) {
                    in_flight.remove(&key);
                }
            }
            tag => tracing::warn!(tag, rank = status.source_rank(), "unexpected message"),
        }
        backoff.reset();
    }
    tracing::debug!(workers, "every worker rank stopped");
}

/// A nonblocking send that owns its buffer until MPI is done with it.
struct OutgoingSend {
    request: Option<Request<'static, [u8]>>,
    buffer: *mut [u8],
}

impl OutgoingSend {
    fn start(world: &SimpleCommunicator, rank: i32, message: Vec<u8>, tag: mpi::Tag) -> Self {
        let buffer = Box::into_raw(message.into_boxed_slice());
        // SAFETY: `buffer` comes from `Box::into_raw` just above, so it is valid, aligned and
        // initialised, and nothing else refers to it. It is freed only in `drop`, after the
        // request that borrows it has completed, so this reference never outlives it.
        let bytes: &'static [u8] = unsafe { &*buffer };
        let request = world
            .process_at_rank(rank)
            .immediate_send_with_tag(StaticScope, bytes, tag);
        OutgoingSend {
            request: Some(request),
            buffer,
        }
    }
}

impl Drop for OutgoingSend {
    fn drop(&mut self) {
        if let Some(request) = self.request.take() {
            // Called once the worker has answered (so has received it) or stopped: this wait
            // returns at once.
            request.wait();
        }
        // SAFETY: `buffer` came from `Box::into_raw` in `start` and is freed only here, once;
        // the send that read it has completed (waited above), and the only reference made
        // from it went with the request.
        drop(unsafe { Box::from_raw(self.buffer) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_least_busy_worker_gets_the_next_chunk_up_to_its_limit() {
        let load = |held, fast| Load { held, fast };
        let loads = [
            load(0, false),
            load(1, false),
            load(0, false),
            load(2, false),
        ];
        assert_eq!(least_busy(&loads, 8), Some(2));
        // Ranks of slow chunks hold at most SLOW_PREFETCH, ranks of fast ones `prefetch`.
        let loads = [load(0, false), load(2, false), load(5, true)];
        assert_eq!(least_busy(&loads, 8), Some(2));
        let loads = [load(0, false), load(2, false), load(8, true)];
        assert_eq!(least_busy(&loads, 8), None);
        assert_eq!(least_busy(&[load(0, false), load(1, true)], 1), None);
        assert_eq!(least_busy(&[load(0, false)], 8), None);
    }
}
