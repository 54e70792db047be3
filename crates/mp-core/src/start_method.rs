//! The start methods (Python's `spawn`, `forkserver`, `fork`) and the process-wide default.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

use serde::{Deserialize, Serialize};

/// How a child process is created (Python's start methods).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StartMethod {
    /// Start a fresh copy of this executable (vfork + exec of `/proc/self/exe`, or where
    /// `/proc` is hidden, of the path the program was started from). The child
    /// shares nothing with the parent but what it is sent.
    ///
    /// Most of a spawn is the new image starting up, which depends on how the program is
    /// linked: a dynamically linked one runs the dynamic loader (relocations, libc and
    /// libgcc_s, whose constructor probes the CPU) in every child. Where spawn speed matters,
    /// link the program statically, per binary:
    /// `cargo rustc --release --bin NAME -- -C target-feature=+crt-static` (glibc's
    /// static-pie; a program that needs `dlopen` or NSS lookups cannot), adding
    /// `-C relocation-model=static` for an image at a fixed address, which has no
    /// relocations to apply at start (and no address randomisation). On the project's 2-vCPU
    /// VM a start + join of a no-op took 0.91 ms dynamically linked, 0.61 ms static-pie and
    /// 0.56 ms static at a fixed address, against 0.50 ms for a `posix_spawn` of `/bin/true`
    /// (mp-bench's README).
    Spawn,
    /// Ask a fork server — a fresh, single-threaded copy of this executable started on first
    /// use — to fork the child: fork's speed (a third of spawn's cost or less), spawn's
    /// isolation. The default, as in Python 3.14 on Linux.
    ///
    /// The server keeps two children forked ahead (*spares*: two idle processes besides the
    /// server while the program uses this start method): a start hands its request straight
    /// to the first, and the server forks a replacement while the child runs.
    ///
    /// The child starts in the requester's current working directory and environment, as a
    /// spawned child would (Python's forkserver children see the server's, from the moment
    /// it started, instead). The child is the requester's own child, as with spawn (the
    /// server forks it as its sibling, `CLONE_PARENT`): the requester reaps it and reads its
    /// exact exit status, and it dies with the requester. What differs from spawn: the
    /// program's executable is the one that was running when the server started (a binary
    /// replaced on disk since is not picked up).
    #[default]
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
    ///
    /// Because that hazard cannot be checked (nothing tells a process, without `/proc`, how
    /// many threads it has, let alone what they hold), forking is an explicit `unsafe` opt-in:
    /// a start with `Fork` fails with [`ProcessError::ForkNotAllowed`](crate::ProcessError)
    /// until the program has called [`allow_fork`].
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

static FORK_ALLOWED: AtomicBool = AtomicBool::new(false);

/// Allows [`StartMethod::Fork`] in this process (and in the children it forks) from now on.
///
/// Without it, starting a process or a pool with `Fork` fails with
/// [`ProcessError::ForkNotAllowed`](crate::ProcessError::ForkNotAllowed).
///
/// # Safety
///
/// `fork()` copies only the calling thread. The caller promises that whenever this process
/// forks a child, no *other* thread holds a lock, or is half-way through updating state, that
/// the child will use: the child would find it held or torn forever (a deadlock at best,
/// undefined behaviour in C libraries at worst). mp-core's own locks are safe (the forking
/// thread holds them all across the `fork()`, and its threads are replaced in the child), and
/// glibc resets the allocator's and stdio's; a program's own `Mutex`es, a logging library's,
/// and any C library's are the caller's to vouch for. A program whose other threads are only
/// those of multiproc itself, or that forks before starting any, meets this.
///
/// ```
/// use mp_core::{Process, StartMethod};
/// // SAFETY: this example has no threads of its own that hold locks.
/// unsafe { mp_core::allow_fork() };
/// let child = Process::new(|| 6 * 7).start_method(StartMethod::Fork).start()?;
/// assert_eq!(child.join()?, 42);
/// # Ok::<(), mp_core::ProcessError>(())
/// ```
pub unsafe fn allow_fork() {
    FORK_ALLOWED.store(true, Ordering::Relaxed);
}

/// Whether [`allow_fork`] was called in this process (or in the process it was forked from).
pub fn fork_allowed() -> bool {
    FORK_ALLOWED.load(Ordering::Relaxed)
}

static DEFAULT_START_METHOD: AtomicU8 = AtomicU8::new(StartMethod::ForkServer as u8);

/// Sets the start method used by processes and pools that do not choose one
/// (Python's `set_start_method`).
pub fn set_start_method(method: StartMethod) {
    DEFAULT_START_METHOD.store(method as u8, Ordering::Relaxed);
}

/// The start method used when none is chosen (Python's `get_start_method`): forkserver unless
/// [`set_start_method`] chose another.
pub fn get_start_method() -> StartMethod {
    match DEFAULT_START_METHOD.load(Ordering::Relaxed) {
        1 => StartMethod::ForkServer,
        2 => StartMethod::Fork,
        _ => StartMethod::Spawn,
    }
}
