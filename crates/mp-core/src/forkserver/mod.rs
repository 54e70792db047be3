//! The forkserver start method: a fresh, single-threaded copy of this executable (started with
//! spawn the first time it is needed) that forks children on request. Children start at
//! fork's speed from a small, clean process, without inheriting the parent's threads, locks or
//! memory.
//!
//! ## Spares: the fork happens before the request
//!
//! The server keeps children forked ahead, *spares*, and tells the requester each one's pid
//! and a pidfd for it (an *announcement*, one datagram on the doorbell, below). A spare waits
//! for a request itself: a request goes straight to it, and it becomes the requested child at
//! once. So a start costs the requester one message and one wake-up of the spare, not a
//! wake-up of the server, a fork, a reply and a wake-up of the requester in turn (most of a
//! forkserver start's time beyond the fork floor's on the project's VM: start + join of a
//! no-op went from 2.0-2.2x that floor to 1.5-1.6x, `crates/mp-bench/README.md`). Android's
//! zygote keeps such a pool of unspecialized processes for the same reason.
//!
//! The spares stand in a line of [`server::SPARES`]: only the first reads the doorbell; the next
//! waits for it to be taken (or to die), which closes the first one's end of a pipe, its
//! *gate*. The server watches the first gate too, and forks a replacement at the end of the
//! line while the child runs; a start does not wait for that fork even when starts follow
//! each other closely.
//!
//! A request names the spare it is for, and carries a sequence number that pairs it with its
//! ring of the doorbell: a spare that died before reading its request (killed while idle)
//! leaves it to the next one, which passes it over; the requester then finds its child dead,
//! as it would any killed child. While a spare waits, nothing of it reaches the requester's
//! children list: it is an ordinary child of the requester's once handed out. The spares
//! cost two idle processes besides the server while a program uses this start method.
//!
//! ## Channels
//!
//! Requests travel over an ipc-channel (so they can carry the child's own channel, or, for a
//! function of no argument, the child's whole header, which the child then finds in its
//! memory: see [`First`]); a datagram socket, the *doorbell*, tells the spare that a request
//! is waiting, one message per request, each carrying (`SCM_RIGHTS`) the child's sidecar (its
//! outcome bell too), which ipc-channel cannot carry. The server sends its announcements on
//! the doorbell's other direction. Only one process reads the doorbell's requests at a time:
//! the first spare in line, or the server while it has none (after a failed fork).
//!
//! The server forks each spare as a *sibling* (`clone` with `CLONE_PARENT`, see
//! [`sibling::fork_sibling`]): the child's parent is the requester, as with the other start methods.
//! So the requester waits for it, reaps it and reads its exact exit status from its pidfd,
//! the child dies with the requester (parent-death signal, set by the spare before it
//! waits), and nothing about it goes through the server once it runs: no status relay, no
//! `SIGCHLD` in the server.
//!
//! ## Where things are
//!
//! `client.rs` is the requester's side (the [`fork_child`] a start calls, the announcements it
//! reads); `server.rs` the server's loop and a spare's life; `doorbell.rs` what travels on
//! the doorbell (rings, announcements); `sibling.rs` the hand-made `clone` that forks a spare
//! as the requester's child; `surroundings.rs` the working directory and environment a
//! child adopts.

mod client;
mod doorbell;
mod server;
mod sibling;
mod surroundings;

use ipc_channel::ipc::IpcReceiver;
use serde::{Deserialize, Serialize};

use crate::launcher::SendFirst;
use crate::protocol::Header;

pub(crate) use client::{fork_child, hold_across_fork, reset_after_fork};
pub(crate) use server::serve;
use surroundings::Surroundings;

// A request lives briefly on the stack of its sender and receiver; boxing its large variant
// would cost an allocation per start.
#[allow(clippy::large_enum_variant)]
#[derive(Serialize, Deserialize)]
enum Request {
    /// First message (the rendezvous needs one).
    Hello,
    /// Become a child (the requester's) that reads its header from `header`: for the spare
    /// whose pid is `spare` (another spare passes it over). `seq` pairs it with its ring of
    /// the doorbell (see [`doorbell::request_for`]). `surroundings`: the requester's working directory
    /// and environment, when they differ from the server's.
    Fork {
        seq: u64,
        spare: u32,
        header: HeaderRoute,
        surroundings: Option<Surroundings>,
    },
}

#[derive(Serialize, Deserialize)]
enum HeaderRoute {
    /// On a channel of its own, followed by its argument.
    Channel(IpcReceiver<Header>),
    /// In the request: the child finds it in the memory it copies from the server. For a
    /// function of no argument, whose child needs nothing else from its parent: no channel
    /// (a socket pair, about 7 us to create and close on the project's VM), no message to
    /// send and receive, no descriptor passed.
    Inline(Header),
}

/// What a requester gives its forkserver child first (see [`fork_child`]).
pub(crate) enum First {
    /// Sends the header and argument on the child's channel while the server forks.
    Send(SendFirst),
    /// The header, to travel in the request (a function of no argument). Made on demand,
    /// as often as the request is sent (once more if the server had died).
    Inline(Box<dyn FnMut() -> Header + Send>),
}
