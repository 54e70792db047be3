//! mp-core: run a Rust function in a child process, Python `multiprocessing.Process` style.
//!
//! ```
//! use mp_core::{Process, StartMethod};
//!
//! fn square(x: u64) -> u64 {
//!     x * x
//! }
//!
//! // SAFETY: this program has no threads of its own, so forking it is sound (see `allow_fork`).
//! unsafe { mp_core::allow_fork() };
//! for method in StartMethod::ALL {
//!     let child = Process::new(square).args(12).start_method(method).start()?;
//!     assert_eq!(child.join()?, 144);
//! }
//! # Ok::<(), mp_core::ProcessError>(())
//! ```
//!
//! The child runs the same executable as the parent; the function is named by its address in
//! that image (see [`FunctionId`]), and its argument and result travel serialized over an
//! ipc-channel, which also carries file descriptors: multiproc's queues, locks and shared
//! memory can be passed as arguments and refer to the same objects in the child.
//!
//! * [`Process`] / [`Child`]: start, join (returning the function's value), join with a
//!   timeout, `is_alive`, `exitcode` (Python's convention), terminate, kill, a pidfd sentinel.
//! * [`StartMethod`]: spawn (a fresh copy of the executable, bootstrapped before `main`, so
//!   tests and doc tests can spawn), forkserver (the default, as in Python 3.14: children
//!   forked by a clean server started by spawn, in the requester's directory and
//!   environment), fork.
//! * [`current_process`], [`parent_process`], [`active_children`], [`cpu_count`].
//!
//! Failures are typed ([`ProcessError`]) and bounded in time: a panic carries its message and
//! location, a fatal signal its number. Children die with their parent, even when it is
//! SIGKILLed (`PR_SET_PDEATHSIG`), and no descriptor leaks into them.
//!
//! Real programs are handled: a handled signal (EINTR) never breaks a start or a join; a child
//! forked from any thread can start processes of its own; spawned children get only stdio
//! and the library's descriptors, and stdio always refers to something; and a
//! [`FunctionId`] decoded from bytes is checked against the run's secret [`RunKey`] before
//! anything is called (peers mp-core did not start get it through [`adopt_run_key`]).

#[cfg(not(target_os = "linux"))]
compile_error!("mp-core supports Linux only for now (it relies on pidfds, memfds and futexes)");

mod bootstrap;
mod child;
mod decode_cause;
mod decode_error;
mod encode_cause;
mod error;
mod fork;
mod fork_lock;
mod forkserver;
mod function;
mod launcher;
mod payload;
mod process;
mod protocol;
mod registry;
mod spawn;
mod start_method;
mod sys;
mod transfer;

/// Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, which only that crate
/// enables): not part of the API, no stability promise.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod __fuzz {
    /// Parses a bootstrap marker (the `MULTIPROC_BOOTSTRAP` value a child is started with) as
    /// the child does, and returns the role it names, re-encoded.
    pub fn parse_role(marker: &str) -> Result<String, String> {
        crate::protocol::Role::parse(marker).map(|role| role.encode())
    }
}

pub use child::before_child_exit;
pub use decode_cause::{abandon_replay, decode_failure_cause, replaying_decode};
pub use decode_error::{
    decode_described, encode_described, note_decode_failure, take_failure_note,
};
pub use encode_cause::{encode_failure_cause, finding_encode_cause};
pub use error::ProcessError;
pub use function::{
    Entry, ForgedFunctionId, FunctionId, RunKeyConflict, TaskFailure, adopt_run_key, run_key,
};
pub use process::{Child, Process};
pub use protocol::ProcessInfo;
pub use protocol::{EXIT_BOOTSTRAP_FAILED, PanicReport, RunKey};
pub use registry::{active_children, cpu_count, current_process, parent_process};
pub use spawn::executable;
pub use start_method::{
    StartMethod, UnknownStartMethod, allow_fork, fork_allowed, get_start_method, set_start_method,
};
pub use sys::{ExitStatus, signal_name};
