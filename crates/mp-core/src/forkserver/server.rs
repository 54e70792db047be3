//! The fork server's side: its main loop, which keeps the line of spares, and a spare's life.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};

use ipc_channel::ipc::IpcReceiver;
use rustix::event::{PollFd, PollFlags};

use super::doorbell::{Announcement, Bell, next_bell, request_for};
use super::sibling::{MainThread, fork_sibling};
use super::{HeaderRoute, Request};
use crate::child;
use crate::protocol::{DOORBELL_FD, EXIT_ORPHANED};

/// How many spares the server keeps forked ahead. Two: while the first waits for a request,
/// the second waits for the first to be taken, so a start never waits for a fork even when
/// the starts follow each other faster than the server can fork (each child then runs
/// while the server forks its replacement).
pub(super) const SPARES: usize = 2;

/// The fork server's main loop (runs in the re-executed server process, never returns to
/// `main`). Returns its exit code.
///
/// It keeps [`SPARES`] spares forked and announced, in a line: only the first reads the
/// doorbell; each next one waits for the one before it to be taken (or to die: either way
/// that spare's end of a pipe, its *gate*, closes). The server watches the first spare's
/// gate too, and forks a replacement at the end of the line when it closes.
pub(crate) fn serve(parent: u32) -> i32 {
    if !child::prepare_child_process(parent) {
        return EXIT_ORPHANED;
    }
    let requests = match child::rendezvous::<Request>() {
        Ok((requests, Request::Hello)) => requests,
        Ok(_) => return child::fail("the fork server was not greeted"),
        Err(message) => return child::fail(&message),
    };
    // SAFETY: the parent placed its end of the doorbell socket pair at DOORBELL_FD with
    // posix_spawn's dup2; nothing else in this process owns it.
    let doorbell = unsafe { OwnedFd::from_raw_fd(DOORBELL_FD) };
    let thread = match MainThread::current() {
        Ok(thread) => thread,
        Err(e) => return child::fail(&format!("cannot prepare to fork: {e}")),
    };
    crate::function::warm_up_for_children();
    // The doorbell is a socket pair of the sidecars' kind: its buffer size is theirs.
    crate::payload::warm_up(doorbell.as_fd());
    // The read ends of the waiting spares' gates, first in line first.
    let mut line: VecDeque<OwnedFd> = VecDeque::with_capacity(SPARES);
    loop {
        while line.len() < SPARES {
            let forked = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
                .map_err(std::io::Error::from)
                // SAFETY: the fork server is single-threaded (it runs before main, and never
                // starts a thread), and `thread` describes its one thread.
                .and_then(|gate| Ok((gate, unsafe { fork_sibling(&thread) }?)));
            match forked {
                Ok(((gate, spare_gate), None)) => {
                    // The spare: it waits for the one before it, if any.
                    let previous = line.pop_back();
                    drop((gate, line));
                    child::exit_forked(spare(parent, requests, doorbell, previous, spare_gate));
                }
                Ok(((gate, spare_gate), Some((pid, pidfd)))) => {
                    drop(spare_gate);
                    let announcement = Announcement::Spare { pid, pidfd };
                    if announcement.send(doorbell.as_fd()).is_err() {
                        return 0; // the parent is gone
                    }
                    drop(announcement);
                    line.push_back(gate);
                }
                // With a spare still in line, forking again once it is taken may work.
                Err(_) if !line.is_empty() => break,
                Err(error) => {
                    if !fork_failed(&doorbell, &requests, format!("fork failed: {error}")) {
                        return 0;
                    }
                }
            }
        }
        // Until the first spare is taken or dead (its gate closes), or the parent is gone.
        let Some(first) = line.front() else { continue };
        if wait(&[(first.as_fd(), PollFlags::IN)]).is_none() {
            return 0;
        }
        line.pop_front();
    }
}

/// Waits until one of `fds` is ready for its events (or hung up), or the doorbell hangs up
/// (the parent is gone: `None`).
fn wait(fds: &[(BorrowedFd<'_>, PollFlags)]) -> Option<usize> {
    // SAFETY: DOORBELL_FD is the doorbell for the whole life of the server, and of a spare
    // until it is taken (it calls this before).
    let doorbell = unsafe { BorrowedFd::borrow_raw(DOORBELL_FD) };
    let mut polled: Vec<PollFd<'_>> = fds
        .iter()
        .map(|(fd, flags)| PollFd::new(fd, *flags))
        // Watched for its hangup only: its requests are the first spare's to read.
        .chain(std::iter::once(PollFd::new(&doorbell, PollFlags::empty())))
        .collect();
    loop {
        match rustix::event::poll(&mut polled, None) {
            Ok(_) => {
                if !polled.last()?.revents().is_empty() {
                    return None;
                }
                if let Some(ready) = polled.iter().position(|p| !p.revents().is_empty()) {
                    return Some(ready);
                }
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => return None,
        }
    }
}

/// After the server failed to fork a spare, with none in line: announces why, and waits for
/// the requester's ring to try again. A request that comes instead (for a spare that died
/// before reading it) is passed over, and also means trying again. False if the parent is
/// gone.
fn fork_failed(doorbell: &OwnedFd, requests: &IpcReceiver<Request>, reason: String) -> bool {
    if Announcement::Failed(reason).send(doorbell.as_fd()).is_err() {
        return false;
    }
    match next_bell(doorbell.as_fd()) {
        Bell::Hangup => false,
        Bell::Retry => true,
        Bell::Request { seq, sidecar } => {
            drop(sidecar);
            request_for(requests, seq).is_some()
        }
    }
}

/// A spare's life (see the module docs): it waits for the spare before it in line (its gate
/// closes when it is taken or dies), then for the request addressed to it, opens its own
/// gate, and becomes the requested child. Returns its exit code.
fn spare(
    parent: u32,
    requests: IpcReceiver<Request>,
    doorbell: OwnedFd,
    previous: Option<OwnedFd>,
    gate: OwnedFd,
) -> i32 {
    // Its parent is the server's (the requester), and it dies with it from now on, idle or
    // not. SIGPIPE is ignored already: the disposition the server set is inherited.
    if !crate::sys::die_with_parent(parent) {
        return EXIT_ORPHANED;
    }
    if let Some(previous) = previous
        && wait(&[(previous.as_fd(), PollFlags::IN)]).is_none()
    {
        return 0;
    }
    let me = std::process::id();
    let (route, surroundings, sidecar) = loop {
        let (seq, sidecar) = match next_bell(doorbell.as_fd()) {
            Bell::Request { seq, sidecar } => (seq, sidecar),
            // For a server without a spare, and the server has this one.
            Bell::Retry => continue,
            Bell::Hangup => return 0, // the parent is gone
        };
        match request_for(&requests, seq) {
            Some(Request::Fork {
                seq: this,
                spare,
                header,
                surroundings,
            }) if this == seq && spare == me => break (header, surroundings, sidecar),
            // For a spare that died before it read it (its requester finds it dead).
            Some(_) => continue,
            None => return 0,
        }
    };
    // Taken: the next spare in line may read the doorbell, and the server forks another.
    drop((gate, requests, doorbell));
    // SAFETY: this child of the single-threaded server has one thread.
    if let Err(message) = surroundings.map_or(Ok(()), |s| unsafe { s.adopt() }) {
        return child::fail(&message);
    }
    match route {
        HeaderRoute::Inline(header) => child::serve(None, header, sidecar),
        HeaderRoute::Channel(channel) => match channel.recv() {
            Ok(header) => child::serve(Some(channel), header, sidecar),
            Err(e) => child::fail(&format!("no request from the parent: {e}")),
        },
    }
}
