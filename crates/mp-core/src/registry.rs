//! The children of this process and who this process is: `current_process`,
//! `parent_process`, `active_children`, `cpu_count`, and the clean-up at exit (daemon children
//! are terminated, others are waited for, as in Python).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard};

use parking_lot::Mutex as WatchLock;

use crate::fork_lock;
use crate::protocol::{Header, ProcessInfo};
use crate::sys::{self, ExitStatus};

pub(crate) struct Identity {
    /// Position in the process tree: `[]` for the main process, `[1, 2]` for `Process-1:2`.
    path: Vec<u32>,
    name: String,
    daemon: bool,
    parent: Option<ProcessInfo>,
}

static IDENTITY: RwLock<Option<Identity>> = RwLock::new(None);
static CHILD_COUNTER: AtomicU32 = AtomicU32::new(0);
/// The pid whose children the registry holds (a forked child inherits a stale copy).
static OWNER: AtomicU32 = AtomicU32::new(0);
static CHILDREN: Mutex<Vec<Arc<Tracked>>> = Mutex::new(Vec::new());

/// Taken by the forking thread across `fork()` (after the launcher's and the fork server's
/// locks), so the child never inherits the registry's locks held.
pub(crate) fn hold_across_fork() -> (
    MutexGuard<'static, Vec<Arc<Tracked>>>,
    RwLockReadGuard<'static, Option<Identity>>,
) {
    (fork_lock::lock(&CHILDREN), fork_lock::read(&IDENTITY))
}

/// Records who this process is, first thing in a child.
pub(crate) fn become_child(header: &Header) {
    *fork_lock::write(&IDENTITY) = Some(Identity {
        path: header.identity.clone(),
        name: header.name.clone(),
        daemon: header.daemon,
        parent: Some(header.parent.clone()),
    });
    CHILD_COUNTER.store(0, Ordering::Relaxed);
    OWNER.store(std::process::id(), Ordering::Relaxed);
    // A forked child inherits its parent's list; those are not its children.
    std::mem::take(&mut *fork_lock::lock(&CHILDREN));
}

/// The tree position and default name of the next child.
pub(crate) fn next_child_identity() -> (Vec<u32>, String) {
    let mut path = fork_lock::read(&IDENTITY)
        .as_ref()
        .map(|i| i.path.clone())
        .unwrap_or_default();
    path.push(CHILD_COUNTER.fetch_add(1, Ordering::Relaxed) + 1);
    let name = format!(
        "Process-{}",
        path.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(":")
    );
    (path, name)
}

/// This process: pid, name and daemon flag (Python's `current_process()`).
pub fn current_process() -> ProcessInfo {
    let identity = fork_lock::read(&IDENTITY);
    match identity.as_ref() {
        Some(i) => ProcessInfo {
            pid: std::process::id(),
            name: i.name.clone(),
            daemon: i.daemon,
        },
        None => ProcessInfo {
            pid: std::process::id(),
            name: "MainProcess".into(),
            daemon: false,
        },
    }
}

/// The process that started this one, or `None` in the main process (Python's
/// `parent_process()`).
pub fn parent_process() -> Option<ProcessInfo> {
    fork_lock::read(&IDENTITY)
        .as_ref()
        .and_then(|i| i.parent.clone())
}

/// The children of this process that are still running (Python's `active_children()`).
/// Finished children are reaped on the way, as in Python.
pub fn active_children() -> Vec<ProcessInfo> {
    let mut children = fork_lock::lock(&CHILDREN);
    children.retain(|c| c.poll_exit().is_none());
    children.iter().map(|c| c.info()).collect()
}

/// The number of CPUs this process may run on (its affinity mask), at least 1.
pub fn cpu_count() -> usize {
    rustix::thread::sched_getaffinity(None)
        .map(|set| set.count() as usize)
        .ok()
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .max(1)
}

/// How the end of a child is observed.
pub(crate) enum ExitWatch {
    /// Our own child: `waitid` on its pidfd.
    Direct,
    /// It ended like this (and was reaped).
    Ended(ExitStatus),
}

/// A child process this process started.
pub(crate) struct Tracked {
    pub pid: u32,
    pub name: String,
    pub daemon: bool,
    pub pidfd: OwnedFd,
    watch: WatchLock<ExitWatch>,
}

impl Tracked {
    pub(crate) fn info(&self) -> ProcessInfo {
        ProcessInfo {
            pid: self.pid,
            name: self.name.clone(),
            daemon: self.daemon,
        }
    }

    /// How it ended, if it has (never blocks).
    pub(crate) fn poll_exit(&self) -> Option<ExitStatus> {
        self.wait_exit(Some(Duration::ZERO))
    }

    /// Waits at most `timeout` (`None`: without limit) for the child to end, and reaps it.
    pub(crate) fn wait_exit(&self, timeout: Option<Duration>) -> Option<ExitStatus> {
        // A poll of a running child answers from its pidfd alone, without the lock.
        let polling = timeout.is_some_and(|t| t.is_zero());
        if polling {
            // A child known to have ended (joined) answers without a system call: `track`
            // polls the previous children at every start.
            if let Some(ExitWatch::Ended(status)) = self.watch.try_lock().as_deref() {
                return Some(*status);
            }
            if !sys::wait_readable(self.pidfd.as_fd(), timeout).unwrap_or(false) {
                return None;
            }
        }
        let mut watch = self.watch.lock();
        let ended = match &*watch {
            ExitWatch::Ended(status) => return Some(*status),
            ExitWatch::Direct => {
                // Sleep on the pidfd without the lock, so other threads can still ask.
                drop(watch);
                if !sys::wait_readable(self.pidfd.as_fd(), timeout).unwrap_or(false) {
                    return None;
                }
                watch = self.watch.lock();
                match &*watch {
                    ExitWatch::Ended(status) => return Some(*status),
                    _ => match sys::try_reap(self.pidfd.as_fd()) {
                        Ok(status) => status,
                        // It has ended (its pidfd is readable), yet there is nothing to
                        // reap: its status went elsewhere (see `ExitStatus::Unknown`).
                        Err(error) if error.raw_os_error() == Some(libc::ECHILD) => {
                            Some(ExitStatus::Unknown)
                        }
                        Err(_) => None,
                    },
                }
            }
        };
        if let Some(status) = ended {
            tracing::debug!(pid = self.pid, name = %self.name, ?status, "process ended");
            *watch = ExitWatch::Ended(status);
        }
        ended
    }
}

/// Registers a freshly started child, and reaps children whose handles were dropped.
pub(crate) fn track(
    pid: u32,
    name: String,
    daemon: bool,
    pidfd: OwnedFd,
    watch: ExitWatch,
) -> Arc<Tracked> {
    register_exit_handler();
    let tracked = Arc::new(Tracked {
        pid,
        name,
        daemon,
        pidfd,
        watch: WatchLock::new(watch),
    });
    let mut children = fork_lock::lock(&CHILDREN);
    children.retain(|c| Arc::strong_count(c) > 1 || c.poll_exit().is_none());
    children.push(tracked.clone());
    tracked
}

fn register_exit_handler() {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    REGISTERED.call_once(|| {
        OWNER.store(std::process::id(), Ordering::Relaxed);
        // SAFETY: `clean_up_at_exit` is an `extern "C" fn()` that never unwinds.
        unsafe { libc::atexit(clean_up_at_exit) };
    });
}

/// How long daemon children get to exit after SIGTERM before they are killed.
const DAEMON_GRACE: Duration = Duration::from_secs(1);

extern "C" fn clean_up_at_exit() {
    clean_up_before_exit();
}

/// What this process owes its children before it exits (daemons terminated, the others
/// waited for): run by `atexit`, and by a forkserver child that ends with `_exit`
/// ([`child::exit_forked`](crate::child::exit_forked)). Running it twice does nothing more.
pub(crate) fn clean_up_before_exit() {
    if OWNER.load(Ordering::Relaxed) != std::process::id() {
        return;
    }
    let children = std::mem::take(&mut *fork_lock::lock(&CHILDREN));
    let (daemons, others): (Vec<_>, Vec<_>) = children.into_iter().partition(|c| c.daemon);
    for child in &daemons {
        let _ = sys::send_signal(child.pidfd.as_fd(), libc::SIGTERM);
    }
    for child in &daemons {
        if child.wait_exit(Some(DAEMON_GRACE)).is_none() {
            let _ = sys::send_signal(child.pidfd.as_fd(), libc::SIGKILL);
            child.wait_exit(Some(DAEMON_GRACE));
        }
    }
    for child in &others {
        tracing::debug!(pid = child.pid, "waiting for non-daemon child at exit");
        child.wait_exit(None);
    }
}
