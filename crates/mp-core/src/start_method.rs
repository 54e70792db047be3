//! The start methods (Python's `spawn`, `forkserver`, `fork`) and the process-wide default.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

use serde::{Deserialize, Serialize};

/// How a child process is created (Python's start methods).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StartMethod {
    /// Start a fresh copy of this executable (`posix_spawn` of `/proc/self/exe`, or where
    /// `/proc` is hidden, of the path the program was started from). The child
    /// shares nothing with the parent but what it is sent. The default.
    #[default]
    Spawn,
    /// Ask a fork server — a fresh, single-threaded copy of this executable started on first
    /// use — to fork the child: fork's speed, spawn's isolation.
    ForkServer,
    /// `fork()` this process. Fastest, and the child sees a copy of everything.
    ///
    /// Only the calling thread is copied. mp-core's own state is safe across that (its locks
    /// are all held by the forking thread during the `fork()`, and its launcher thread and
    /// fork-server client are replaced in the child), so a forked child can start processes
    /// and pools. A lock of *other* code held by another thread at that moment stays held
    /// forever in the child (the allocator's and stdio's are reset by glibc; a program's
    /// own `Mutex` or a logging library's are not): in a program with threads of its own,
    /// prefer spawn or forkserver, as Python 3.12+ warns and 3.14 made the default.
    Fork,
}

impl StartMethod {
    /// Python's name for it: `"spawn"`, `"forkserver"` or `"fork"`.
    pub fn name(self) -> &'static str {
        match self {
            StartMethod::Spawn => "spawn",
            StartMethod::ForkServer => "forkserver",
            StartMethod::Fork => "fork",
        }
    }

    /// All start methods, in Python's order of preference.
    pub const ALL: [StartMethod; 3] = [
        StartMethod::Spawn,
        StartMethod::ForkServer,
        StartMethod::Fork,
    ];
}

impl fmt::Display for StartMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A start method name that is not `spawn`, `forkserver` or `fork`.
#[derive(Debug, thiserror::Error)]
#[error("unknown start method {0:?} (expected spawn, forkserver or fork)")]
pub struct UnknownStartMethod(String);

impl FromStr for StartMethod {
    type Err = UnknownStartMethod;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        StartMethod::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| UnknownStartMethod(s.to_owned()))
    }
}

static DEFAULT_START_METHOD: AtomicU8 = AtomicU8::new(0);

/// Sets the start method used by processes and pools that do not choose one
/// (Python's `set_start_method`).
pub fn set_start_method(method: StartMethod) {
    DEFAULT_START_METHOD.store(method as u8, Ordering::Relaxed);
}

/// The start method used when none is chosen (Python's `get_start_method`).
pub fn get_start_method() -> StartMethod {
    match DEFAULT_START_METHOD.load(Ordering::Relaxed) {
        1 => StartMethod::ForkServer,
        2 => StartMethod::Fork,
        _ => StartMethod::Spawn,
    }
}
