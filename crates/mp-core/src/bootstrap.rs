//! The constructor that turns a re-executed copy of the program into a child or a fork server
//! before `main` runs.
//!
//! A spawned child is this same executable started again with [`MARKER`] in its environment.
//! The constructor below runs before the user's `main` (and before libtest's, so a plain
//! `#[test]` can spawn), sees the marker, serves the request and exits: the user's `main` never
//! runs in a child. A child whose bootstrap fails exits with a message and the code
//! [`EXIT_BOOTSTRAP_FAILED`](crate::EXIT_BOOTSTRAP_FAILED); it never falls through into `main`
//! (no fork bombs).

use std::os::fd::{FromRawFd, OwnedFd};

use crate::child;
use crate::protocol::{EXIT_ORPHANED, MARKER, Role, SIDECAR_FD};
use crate::sys;

#[ctor::ctor(unsafe)]
fn bootstrap_before_main() {
    crate::spawn::remember_executable();
    let Some(marker) = std::env::var_os(MARKER) else {
        return;
    };
    // The parent started this process with its signals blocked (see `spawn`): none can
    // reach a handler of the parent's any more, so let them through (the mask a child
    // starts with is empty).
    sys::unblock_all_signals();
    // SAFETY: constructors run before main, while the process has a single thread, so no
    // other thread can be reading the environment.
    unsafe { std::env::remove_var(MARKER) };
    // Whatever the parent's stdio was, fds 0-2 refer to something before this process opens
    // a descriptor of its own, so none of its channels can become its stdout.
    sys::ensure_stdio_open();
    let code = match Role::parse(&marker.to_string_lossy()) {
        Ok(Role::Child { parent }) => serve_spawned(parent),
        Ok(Role::ForkServer { parent }) => crate::forkserver::serve(parent),
        Err(message) => child::fail(&message),
    };
    std::process::exit(code);
}

fn serve_spawned(parent: u32) -> i32 {
    if !child::prepare_child_process(parent) {
        return EXIT_ORPHANED;
    }
    // SAFETY: the parent placed the child's end of its sidecar at SIDECAR_FD with the dup2
    // before its exec; nothing else in this process owns that descriptor.
    let sidecar = unsafe { OwnedFd::from_raw_fd(SIDECAR_FD) };
    match child::rendezvous() {
        Ok((channel, header)) => child::serve(Some(channel), header, sidecar),
        Err(message) => child::fail(&message),
    }
}
