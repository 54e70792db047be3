//! ipc-channel transfers that a handled signal cannot break.
//!
//! ipc-channel returns EINTR to its caller. Before any byte was read that is harmless and the
//! wait is restarted here with the time that remains ([`recv_timeout`]). In the middle of a
//! fragmented message it is not (the message is lost, or ipc-channel trips an assertion), so
//! a transfer that may span fragments runs with the thread's signals held back, and only once
//! the peer is known to be sending ([`recv_sent`]) or reading ([`send`]).

use std::cell::Cell;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use ipc_channel::ipc::{IpcReceiver, IpcSender};
use ipc_channel::{IpcError, TryRecvError};
use serde::{Deserialize, Serialize};

use crate::sys;

fn interrupted(error: &TryRecvError) -> bool {
    matches!(error, TryRecvError::IpcError(IpcError::Io(e)) if e.kind() == std::io::ErrorKind::Interrupted)
}

thread_local! {
    /// Whether this thread runs inside [`holding_signals`].
    static HOLDING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` (several transfers in a row, e.g. a request and the messages that follow it) with
/// signals held back once for all of them: each [`send`] inside skips its own masking (two
/// system calls).
pub(crate) fn holding_signals<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            HOLDING.with(|holding| holding.set(self.0));
        }
    }
    sys::without_signals(|| {
        let _restore = Restore(HOLDING.with(|holding| holding.replace(true)));
        f()
    })
}

/// Sends `message` to a peer that is reading (a child right after its start, a fork server).
pub(crate) fn send<T: Serialize>(sender: &IpcSender<T>, message: T) -> Result<(), IpcError> {
    if HOLDING.with(Cell::get) {
        return sender.send(message);
    }
    sys::without_signals(|| sender.send(message))
}

/// Receives a small (single-fragment) message, waiting at most `timeout` (`None`: forever);
/// a signal restarts the wait with the time that remains.
pub(crate) fn recv_timeout<T>(
    receiver: &IpcReceiver<T>,
    timeout: Option<Duration>,
) -> Result<T, TryRecvError>
where
    T: for<'de> Deserialize<'de> + Serialize,
{
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let result = match deadline {
            Some(deadline) => {
                receiver.try_recv_timeout(deadline.saturating_duration_since(Instant::now()))
            }
            None => receiver.recv().map_err(TryRecvError::IpcError),
        };
        match result {
            Err(error) if interrupted(&error) => continue,
            other => return other,
        }
    }
}

/// How long one uninterruptible slice of [`recv_sent`] may last: signal handlers are held back
/// at most this long when a peer that rang its bell stalls before sending.
const SENT_SLICE: Duration = Duration::from_millis(50);

/// Receives a message the peer has announced (it rang the bell, so it is sending now), of any
/// size, with signals held back during the transfer. Gives `Empty` if it has not arrived
/// within `timeout`, and `Disconnected` if the peer ended (`peer_gone`, its pidfd, became
/// readable) without sending it, even if a copy of its sender lives on elsewhere.
pub(crate) fn recv_sent<T>(
    receiver: &IpcReceiver<T>,
    timeout: Option<Duration>,
    peer_gone: BorrowedFd<'_>,
) -> Result<T, TryRecvError>
where
    T: for<'de> Deserialize<'de> + Serialize,
{
    // Usually it is there already (a child rings after a value, or ends without ringing):
    // one non-blocking receive, without a poll first.
    match sys::without_signals(|| receiver.try_recv()) {
        Err(TryRecvError::Empty) => {}
        Err(error) if interrupted(&error) => {}
        other => return other,
    }
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let slice = remaining.map_or(SENT_SLICE, |r| r.min(SENT_SLICE));
        match sys::without_signals(|| receiver.try_recv_timeout(slice)) {
            Err(TryRecvError::Empty)
                if sys::wait_readable(peer_gone, Some(Duration::ZERO)).unwrap_or(false) =>
            {
                // Ended: whatever it sent is buffered by now.
                return match sys::without_signals(|| receiver.try_recv()) {
                    Err(TryRecvError::Empty) => Err(TryRecvError::IpcError(IpcError::Disconnected)),
                    other => other,
                };
            }
            Err(TryRecvError::Empty) if remaining.is_some_and(|r| r <= slice) => {
                return Err(TryRecvError::Empty);
            }
            Err(TryRecvError::Empty) => continue,
            Err(error) if interrupted(&error) => continue,
            other => return other,
        }
    }
}
