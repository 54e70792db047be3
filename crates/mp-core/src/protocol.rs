//! The wire protocol between a parent and its children, in one leaf module: the bootstrap
//! marker and the roles it names, the fixed descriptor numbers a spawned child finds, the
//! messages on the channel (the [`Header`], the [`Outcome`]) and the exit codes.
//!
//! Everything that both sides must agree on lives here, so the parent side (`spawn`, `fork`,
//! `forkserver`, `process`), the child side (`child`, `bootstrap`) and the registry import it
//! and never each other for it.

use ipc_channel::ipc::{OpaqueIpcReceiver, OpaqueIpcSender};
use serde::{Deserialize, Serialize};

/// Environment variable that turns a re-executed copy of the program into a child.
pub(crate) const MARKER: &str = "MULTIPROC_BOOTSTRAP";

/// The descriptor a spawned child writes its rendezvous name to.
pub(crate) const HANDSHAKE_FD: i32 = 3;
/// The descriptor on which a fork server is told that requests are waiting (a socket that
/// also carries each child's sidecar, and on which the server answers with the child's pid).
pub(crate) const DOORBELL_FD: i32 = 4;
/// The descriptor of a spawned child's end of its *sidecar*, a socket pair per child with
/// two jobs. Large arguments and results travel on it as memfds (see `payload`). And it is
/// the child's outcome bell: the child sends a datagram on it when the parent should read
/// its [`Outcome`] before the child exits (a memfd is one too), and otherwise its end of
/// file at the child's exit wakes the parent, so the parent's `join` sleeps in one `poll` on
/// the sidecar and the child's pidfd (ipc-channel does not expose its receiver's descriptor).
pub(crate) const SIDECAR_FD: i32 = 5;
/// Every descriptor a spawned child is given is below this; the rest are closed at bootstrap.
pub(crate) const FIRST_FREE_FD: u32 = 6;

/// Exit code of a child whose bootstrap failed (BSD's EX_SOFTWARE).
pub const EXIT_BOOTSTRAP_FAILED: i32 = 70;
/// Exit code of a child whose parent was already gone when it started.
pub(crate) const EXIT_ORPHANED: i32 = 71;
/// Exit code of a child whose function panicked, as Python's for an uncaught exception.
pub(crate) const EXIT_PANICKED: i32 = 1;
/// Exit code of a child that could not decode its arguments or encode its result.
pub(crate) const EXIT_BAD_DATA: i32 = 2;

/// What the marker asks this process to be.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Child { parent: u32 },
    ForkServer { parent: u32 },
}

impl Role {
    pub(crate) fn encode(&self) -> String {
        match self {
            Role::Child { parent } => format!("child:{parent}"),
            Role::ForkServer { parent } => format!("forkserver:{parent}"),
        }
    }

    pub(crate) fn parse(marker: &str) -> Result<Role, String> {
        let (kind, parent) = marker
            .split_once(':')
            .ok_or_else(|| format!("malformed {MARKER} value {marker:?}"))?;
        let parent = parent
            .parse()
            .map_err(|_| format!("malformed parent pid in {MARKER} value {marker:?}"))?;
        match kind {
            "child" => Ok(Role::Child { parent }),
            "forkserver" => Ok(Role::ForkServer { parent }),
            _ => Err(format!("unknown role in {MARKER} value {marker:?}")),
        }
    }
}

/// Who a process is: its pid and its name (`"MainProcess"`, `"Process-1"`, `"Process-1:2"`...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// The process id.
    pub pid: u32,
    /// The process name, as given to `Process::name` or generated like Python's.
    pub name: String,
    /// Whether it is a daemon (terminated when its parent exits).
    pub daemon: bool,
}

/// The first message a child receives: what to run and who it is. The function's argument
/// follows on the same channel as a second message, typed by the function's trampoline
/// (unless the function takes none: [`Header::default_args`]).
#[derive(Serialize, Deserialize)]
pub(crate) struct Header {
    /// The process trampoline to run. Raw, because the child can only check ids once it has
    /// adopted `run_key`; the header itself comes from the parent over a private channel.
    pub entry: RawFunctionId,
    /// The key that makes this run's [`FunctionId`](crate::FunctionId)s unforgeable.
    pub run_key: RunKey,
    pub identity: Vec<u32>,
    pub name: String,
    pub daemon: bool,
    pub parent: ProcessInfo,
    pub outcome: OpaqueIpcSender,
    /// The channel the argument was sent on before the child connected (spawn: the parent
    /// sends it while the child starts); `None`: it follows this header on the same channel.
    pub args: Option<OpaqueIpcReceiver>,
    /// The function takes no argument and is called with its default (`()`): no argument
    /// is sent, and `args` is `None`.
    pub default_args: bool,
}

/// What a child sends back at the end of a process.
#[derive(Serialize, Deserialize)]
pub(crate) enum Outcome<R> {
    Returned(R),
    Panicked(PanicReport),
    BadArguments(String),
    BadResult(String),
}

/// A panic caught in another process: its message, where it happened, and the backtrace when
/// `RUST_BACKTRACE` asked for one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PanicReport {
    /// The panic message.
    pub message: String,
    /// `file:line:column` of the panic, when known.
    pub location: Option<String>,
    /// The child's backtrace, captured when `RUST_BACKTRACE` is set.
    pub backtrace: Option<String>,
}

impl std::fmt::Display for PanicReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "panicked")?;
        if let Some(location) = &self.location {
            write!(f, " at {location}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A [`FunctionId`](crate::FunctionId) as it travels: an offset in the executable image and
/// the tag that proves it was made in this run. Only `function` turns it into an id, after
/// checking the tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct RawFunctionId {
    pub offset: i64,
    pub tag: u64,
}

/// The secret of one run of a program (a process tree started by mp-core, or a set of peers
/// given it explicitly): [`FunctionId`](crate::FunctionId)s carry a tag computed with it, so
/// an id decoded from bytes is accepted only if it was made by a process of this run.
///
/// Get it with [`run_key`](crate::run_key); give it to a peer that mp-core did not start
/// with [`adopt_run_key`](crate::adopt_run_key).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunKey(pub(crate) [u8; 32]);

impl std::fmt::Debug for RunKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RunKey(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_and_garbage_is_rejected() {
        for role in [Role::Child { parent: 42 }, Role::ForkServer { parent: 7 }] {
            assert_eq!(Role::parse(&role.encode()), Ok(role));
        }
        assert!(Role::parse("child").is_err());
        assert!(Role::parse("child:abc").is_err());
        assert!(Role::parse("daemon:1").is_err());
    }
}
