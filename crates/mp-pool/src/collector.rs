//! The result thread: receives every report (results, readiness, and the supervisor's exit
//! notices), updates the scheduler, and delivers outcomes to their
//! jobs, running callbacks (as Python's result-handler thread does).

use std::collections::HashMap;
use std::sync::Arc;

use mp_core::TaskFailure;

use crate::bulk::Inbox;
use crate::job::deliver;
use crate::pool::Shared;
use crate::transport::{Report, ReportReceiver, ResultBytes, WorkerId};

/// Receive errors in a row after which the link is considered gone.
const MAX_CONSECUTIVE_ERRORS: usize = 100;
/// Reports handled under one lock at most.
const MAX_REPORTS_PER_ROUND: usize = 256;

/// The result thread's body; returns on [`Report::Shutdown`].
pub(crate) fn run(shared: Arc<Shared>, reports: ReportReceiver) {
    let mut errors = 0;
    // Each worker's result region (large results, see `bulk`), as far as it announced one.
    let mut regions: HashMap<WorkerId, Inbox> = HashMap::new();
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
        // Take whatever else has arrived too, and handle it all under one lock: results
        // come one message per chunk, and the lock and the dispatch are paid once.
        let mut batch = vec![report];
        while batch.len() < MAX_REPORTS_PER_ROUND {
            match reports.try_recv() {
                Ok(Some(report)) => batch.push(report),
                Ok(None) => break,
                Err(e) => tracing::warn!(%e, "pool report lost"),
            }
        }
        let mut deliveries = Vec::with_capacity(batch.len());
        let mut changed = false;
        {
            let mut scheduler = shared.scheduler.lock();
            for report in batch {
                match report {
                    Report::Results { worker, results } => {
                        for mut result in results {
                            result.outcome = match result.outcome {
                                Ok(ResultBytes::Bulk(bulk)) => regions
                                    .entry(worker)
                                    .or_default()
                                    .open(bulk)
                                    .map(ResultBytes::Staged)
                                    .ok_or_else(|| {
                                        TaskFailure::BadResult(
                                            "the worker's result region is missing".into(),
                                        )
                                    }),
                                other => other,
                            };
                            deliveries.extend(scheduler.result(worker, result));
                        }
                    }
                    Report::Started { worker, seq } => scheduler.started(worker, seq),
                    Report::Skipped { worker, last } => scheduler.skipped(worker, last),
                    Report::Ready { worker, pid } => {
                        scheduler.worker_ready(worker, pid);
                        changed = true;
                    }
                    Report::Exited {
                        worker,
                        exitcode,
                        failure,
                    } => {
                        regions.remove(&worker);
                        deliveries.extend(scheduler.worker_exited(worker, exitcode, failure));
                        changed = true;
                    }
                    Report::Shutdown => {
                        drop(scheduler);
                        deliver(deliveries);
                        return;
                    }
                }
            }
            scheduler.dispatch();
            // Woken: `join` (idle and settled) and `wait_ready` (workers came or went).
            if changed || scheduler.is_idle() {
                shared.idle.notify_all();
            }
        }
        deliver(deliveries);
    }
}
