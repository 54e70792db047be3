//! The child side of process creation: the constructor that runs before `main` in a re-executed
//! child, and the code every child (spawned, forked or forked by the fork server) runs to
//! receive its function, call it and report back.
//!
//! A spawned child is this same executable started again with [`MARKER`] in its environment.
//! The constructor below runs before the user's `main` (and before libtest's, so a plain
//! `#[test]` can spawn), sees the marker, serves the request and exits: the user's `main` never
//! runs in a child. A child whose bootstrap fails exits with a message and the code
//! [`EXIT_BOOTSTRAP_FAILED`]; it never falls through into `main` (no fork bombs).

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};

use ipc_channel::ipc::{IpcOneShotServer, IpcReceiver, OpaqueIpcSender};
use serde::{Deserialize, Serialize};

use crate::function::FunctionId;
use crate::process::StartMethod;
use crate::registry::{self, ProcessInfo};
use crate::sys;

/// Environment variable that turns a re-executed copy of the program into a child.
pub(crate) const MARKER: &str = "MULTIPROC_BOOTSTRAP";
/// Exit code of a child whose bootstrap failed (BSD's EX_SOFTWARE).
pub const EXIT_BOOTSTRAP_FAILED: i32 = 70;
/// Exit code of a child whose parent was already gone when it started.
pub(crate) const EXIT_ORPHANED: i32 = 71;
/// The descriptor a spawned child writes its rendezvous name to.
pub(crate) const HANDSHAKE_FD: i32 = 3;
/// The descriptor on which a fork server is told that requests are waiting.
pub(crate) const DOORBELL_FD: i32 = 4;

/// The first message a child receives: what to run and who it is. The function's argument
/// follows on the same channel as a second message, typed by the function's trampoline.
#[derive(Serialize, Deserialize)]
pub(crate) struct Header {
    pub entry: FunctionId,
    pub identity: Vec<u32>,
    pub name: String,
    pub daemon: bool,
    pub parent: ProcessInfo,
    pub start_method: StartMethod,
    pub outcome: OpaqueIpcSender,
}

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

#[ctor::ctor(unsafe)]
fn bootstrap_before_main() {
    let Some(marker) = std::env::var_os(MARKER) else {
        return;
    };
    // SAFETY: constructors run before main, while the process has a single thread, so no
    // other thread can be reading the environment.
    unsafe { std::env::remove_var(MARKER) };
    let code = match Role::parse(&marker.to_string_lossy()) {
        Ok(Role::Child { parent }) => serve_spawned(parent),
        Ok(Role::ForkServer { parent }) => crate::forkserver::serve(parent),
        Err(message) => fail(&message),
    };
    std::process::exit(code);
}

/// Reports a bootstrap failure on stderr (no subscriber may be installed this early) and
/// returns the exit code that says so.
pub(crate) fn fail(message: &str) -> i32 {
    tracing::error!(message, "multiproc child bootstrap failed");
    let _ = writeln!(
        std::io::stderr(),
        "multiproc: child bootstrap failed: {message}; this process was started as a \
         multiproc child and will not run main"
    );
    EXIT_BOOTSTRAP_FAILED
}

/// Prepares a fresh process to serve as a child: dies with `parent`, ignores SIGPIPE like any
/// Rust program (the runtime that would do it has not run yet). False if `parent` is gone.
pub(crate) fn prepare_child_process(parent: u32) -> bool {
    if !sys::die_with_parent(parent) {
        return false;
    }
    // SAFETY: setting a signal disposition to SIG_IGN has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    true
}

/// Opens a one-shot rendezvous, tells the parent its name through [`HANDSHAKE_FD`], and waits
/// for the parent to connect. Returns the channel and its first message.
pub(crate) fn rendezvous<T>() -> Result<(IpcReceiver<T>, T), String>
where
    T: for<'de> Deserialize<'de> + Serialize,
{
    let (server, name) =
        IpcOneShotServer::<T>::new().map_err(|e| format!("cannot open a rendezvous: {e}"))?;
    // SAFETY: the parent placed the write end of a pipe at HANDSHAKE_FD with posix_spawn's
    // dup2 and nothing else in this process owns that descriptor.
    let handshake = unsafe { OwnedFd::from_raw_fd(HANDSHAKE_FD) };
    let mut handshake = std::fs::File::from(handshake);
    handshake
        .write_all(format!("{name}\n").as_bytes())
        .map_err(|e| format!("cannot reach the parent: {e}"))?;
    drop(handshake);
    server
        .accept()
        .map_err(|e| format!("the parent did not connect: {e:?}"))
}

fn serve_spawned(parent: u32) -> i32 {
    if !prepare_child_process(parent) {
        return EXIT_ORPHANED;
    }
    match rendezvous::<Header>() {
        Ok((channel, header)) => serve(channel, header),
        Err(message) => fail(&message),
    }
}

/// Runs the function a child was sent and returns its exit code.
pub(crate) fn serve(channel: IpcReceiver<Header>, header: Header) -> i32 {
    registry::become_child(&header);
    let _span =
        tracing::debug_span!("child", name = %header.name, pid = std::process::id()).entered();
    // SAFETY: the header comes from our parent, which runs this same executable and made the
    // id with FunctionId::of_process.
    let trampoline = unsafe { header.entry.process_trampoline() };
    trampoline(channel.to_opaque(), header.outcome)
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
