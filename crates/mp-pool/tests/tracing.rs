//! The pool reports worker start, exit and death and job submission through `tracing`. In its
//! own test binary: the recording subscriber is the process-wide default (the events come
//! from the pool's own threads).

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use mp_pool::{Pool, PoolError};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

const LIMIT: Duration = Duration::from_secs(20);

/// Every event as `LEVEL message field=value...`.
static EVENTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct Recorder;

struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl Subscriber for Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Id::from_u64(NEXT.fetch_add(1, Ordering::Relaxed))
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let mut line = Line(event.metadata().level().to_string());
        event.record(&mut line);
        EVENTS.lock().unwrap().push(line.0);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

fn recorded(level: &str, message: &str) -> Vec<String> {
    let events = EVENTS.lock().unwrap();
    let prefix = format!("{level} {message}");
    events
        .iter()
        .filter(|e| e.starts_with(&prefix))
        .cloned()
        .collect()
}

#[test]
fn worker_lifecycle_and_jobs_are_traced() {
    tracing::subscriber::set_global_default(Recorder).expect("no other subscriber");
    let pool = Pool::new(2).unwrap();
    let squares = pool.map_async(|x: u64| x * x, 0..10).unwrap();
    assert_eq!(squares.get_timeout(LIMIT).unwrap().len(), 10);
    let died = pool
        .apply_async(|()| -> u8 { std::process::abort() }, ())
        .unwrap();
    let Err(PoolError::WorkerDied { pid, .. }) = died.get_timeout(LIMIT) else {
        panic!("expected the worker's death");
    };
    pool.close();
    pool.join_timeout(LIMIT).unwrap();

    assert!(!recorded("DEBUG", "pool job submitted").is_empty());
    // Two workers at first, maybe a replacement (unless join began before it could start);
    // every one of them is reported once more: died or exited.
    let started = recorded("INFO", "pool worker started");
    assert!((2..=3).contains(&started.len()), "{started:?}");
    let deaths = recorded("WARN", "pool worker died while running tasks");
    assert_eq!(deaths.len(), 1, "{deaths:?}");
    assert!(deaths[0].contains(&format!("pid={pid}")), "{deaths:?}");
    assert!(deaths[0].contains("exitcode=-6"), "{deaths:?}");
    let exits = recorded("DEBUG", "pool worker exited");
    assert_eq!(exits.len() + deaths.len(), started.len(), "{exits:?}");
}
