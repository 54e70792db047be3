//! The start methods (Python's `spawn`, `forkserver`, `fork`) and the process-wide default.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU8, Ordering};

use serde::{Deserialize, Serialize};

/// How a child process is created (Python's start methods).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StartMethod {
    /// Start a fresh copy of this executable (`posix_spawn` of `/proc/self/exe`). The child
    /// shares nothing with the parent but what it is sent. The default.
    #[default]
    Spawn,
    /// Ask a fork server — a fresh, single-threaded copy of this executable started on first
    /// use — to fork the child: fork's speed, spawn's isolation.
    ForkServer,
    /// `fork()` this process. Fastest, and the child sees a copy of everything, but unsafe
    /// in a multithreaded parent (only the calling thread is copied; locks held by other
    /// threads stay held forever in the child).
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
