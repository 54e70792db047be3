//! The result thread: receives every report (results, readiness, and the supervisor's exit
//! notices), updates the scheduler, and delivers outcomes to their
//! jobs, running callbacks (as Python's result-handler thread does).

use std::sync::Arc;

use crate::job::deliver;
use crate::pool::Shared;
use crate::transport::{Report, ReportReceiver};

/// Receive errors in a row after which the link is considered gone.
const MAX_CONSECUTIVE_ERRORS: usize = 100;

/// The result thread's body; returns on [`Report::Shutdown`].
pub(crate) fn run(shared: Arc<Shared>, reports: ReportReceiver) {
    let mut errors = 0;
    loop {
        let report = match reports.recv() {
            Ok(report) => {
                errors = 0;
                report
            }
            Err(e) => {
                // One message was lost (a worker died halfway through sending a large one):
                // its chunks are settled when that worker's exit is reported.
                errors += 1;
                tracing::warn!(%e, "pool report lost");
                if errors < MAX_CONSECUTIVE_ERRORS {
                    continue;
                }
                tracing::error!("pool report link is gone; terminating the pool");
                shared.terminate();
                return;
            }
        };
        let deliveries = {
            let mut scheduler = shared.scheduler.lock();
            let deliveries = match report {
                Report::Results { worker, results } => scheduler.results(worker, results),
                Report::Ready { worker, pid } => {
                    scheduler.worker_ready(worker, pid);
                    Vec::new()
                }
                Report::Exited {
                    worker,
                    exitcode,
                    failure,
                } => scheduler.worker_exited(worker, exitcode, failure),
                Report::Shutdown => return,
            };
            if scheduler.is_idle() {
                shared.idle.notify_all();
            }
            deliveries
        };
        deliver(deliveries);
    }
}
