//! What travels on the doorbell, the datagram socket pair between a requester and its fork
//! server (see the module docs of `forkserver`): the requester's rings (one per request, with
//! the child's sidecar; or a ring to try a failed fork again), and the server's
//! announcements of its spares.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use ipc_channel::ipc::IpcReceiver;
use rustix::net::{RecvFlags, SendFlags};

use crate::sys::{recv_datagram, send_datagram};

use super::Request;
use super::client::end_by_pid;

/// What the server tells the requester on the doorbell, one datagram each: its next spare,
/// or why it has none. (A datagram costs no channel and no allocation on either side.)
#[derive(Debug)]
pub(super) enum Announcement {
    /// The spare that takes the next request (a child of the requester's, see the module
    /// docs): its pid, and a pidfd for it from the server's `clone` (`CLONE_PIDFD`), passed
    /// along, so that the requester never names the spare by pid (a pid can be reused if the
    /// program lets the kernel reap its children, `SIGCHLD` ignored).
    Spare { pid: u32, pidfd: OwnedFd },
    /// The server could not fork a spare; it tries again when the requester rings (see
    /// [`ring_retry`]).
    Failed(String),
}

impl Announcement {
    /// The longest announcement read: a failure's message is cut beyond it.
    pub(super) const MAX: usize = 1024;

    /// Sends it (on the server's side of `doorbell`). A spare's is sent from the stack: the
    /// server has just forked, and each page it writes now is a copy-on-write fault.
    pub(super) fn send(&self, doorbell: BorrowedFd<'_>) -> std::io::Result<()> {
        match self {
            Announcement::Spare { pid, pidfd } => {
                let mut spare = [0u8; 5];
                spare[1..].copy_from_slice(&pid.to_le_bytes());
                send_datagram(doorbell, &spare, Some(pidfd.as_fd()), SendFlags::empty())
            }
            Announcement::Failed(reason) => {
                let mut failed = vec![1];
                failed.extend_from_slice(reason.as_bytes());
                failed.truncate(Self::MAX);
                send_datagram(doorbell, &failed, None, SendFlags::empty())
            }
        }
    }

    /// Takes the next announcement from `doorbell` if one is there (`Ok(None)` if not).
    pub(super) fn try_receive(doorbell: BorrowedFd<'_>) -> std::io::Result<Option<Announcement>> {
        let mut message = [0u8; Self::MAX];
        let (received, pidfd) = match recv_datagram(doorbell, &mut message, RecvFlags::DONTWAIT) {
            Ok(received) => received,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        };
        let malformed = || std::io::Error::other("a malformed announcement from the fork server");
        match (&message[..received.min(Self::MAX)], pidfd) {
            ([], _) => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the fork server hung up",
            )),
            ([0, pid @ ..], Some(pidfd)) => <[u8; 4]>::try_from(pid)
                .map(|pid| {
                    Some(Announcement::Spare {
                        pid: u32::from_le_bytes(pid),
                        pidfd,
                    })
                })
                .map_err(|_| malformed()),
            ([0, pid @ ..], None) => {
                // Its pidfd was dropped on the way (this process is out of descriptors): the
                // spare cannot be used; it is ended (the server then forks the next).
                if let Ok(pid) = <[u8; 4]>::try_from(pid) {
                    end_by_pid(u32::from_le_bytes(pid));
                }
                Err(std::io::Error::other(
                    "the spare's pidfd did not come through (out of descriptors?)",
                ))
            }
            ([1, reason @ ..], None) => Ok(Some(Announcement::Failed(
                String::from_utf8_lossy(reason).into_owned(),
            ))),
            _ => Err(malformed()),
        }
    }

    /// Waits at most `timeout` for the next announcement on `doorbell`, or until `server`
    /// (its pidfd) has ended without one.
    pub(super) fn receive(
        doorbell: BorrowedFd<'_>,
        server: BorrowedFd<'_>,
        timeout: std::time::Duration,
    ) -> std::io::Result<Announcement> {
        if let Some(announcement) = Self::try_receive(doorbell)? {
            return Ok(announcement);
        }
        // Not announced yet (the server is still forking), or the server is gone.
        if crate::sys::wait_any(&[doorbell, server], Some(timeout))?.is_none() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no spare announced in {timeout:?}"),
            ));
        }
        Self::try_receive(doorbell)?.ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the fork server ended")
        })
    }
}

/// Rings the doorbell for request number `seq`, handing the spare the child's sidecar.
pub(super) fn ring(
    doorbell: BorrowedFd<'_>,
    seq: u64,
    sidecar: BorrowedFd<'_>,
) -> std::io::Result<()> {
    send_datagram(
        doorbell,
        &seq.to_le_bytes(),
        Some(sidecar),
        SendFlags::empty(),
    )
}

/// Rings the doorbell without a request (no descriptor): after a failed fork, the server
/// waits for this to try again. A spare passes it over.
pub(super) fn ring_retry(doorbell: BorrowedFd<'_>) -> std::io::Result<()> {
    send_datagram(doorbell, &[2], None, SendFlags::empty())
}

/// What the doorbell said: request number `seq` is waiting (with the sidecar for its child),
/// a ring to try a failed fork again (no descriptor), or the parent is gone.
pub(super) enum Bell {
    Request { seq: u64, sidecar: OwnedFd },
    Retry,
    Hangup,
}

/// Waits for the next ring of the doorbell.
pub(super) fn next_bell(doorbell: BorrowedFd<'_>) -> Bell {
    let mut seq = [0u8; 8];
    match recv_datagram(doorbell, &mut seq, RecvFlags::empty()) {
        Ok((0, _)) | Err(_) => Bell::Hangup,
        Ok((_, None)) => Bell::Retry,
        Ok((_, Some(sidecar))) => Bell::Request {
            seq: u64::from_le_bytes(seq),
            sidecar,
        },
    }
}

/// The request that rang as number `seq`, read after its ring: the requests before it on the
/// channel are passed over (their rings were read by a spare that died before it read them).
/// `None` if the channel closed (the parent is gone).
pub(super) fn request_for(requests: &IpcReceiver<Request>, seq: u64) -> Option<Request> {
    loop {
        match requests.recv() {
            Ok(Request::Fork { seq: earlier, .. }) if earlier < seq => continue,
            Ok(Request::Hello) => continue,
            Ok(request) => return Some(request),
            Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    use std::time::Duration;

    fn doorbell() -> (OwnedFd, OwnedFd) {
        rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )
        .unwrap()
    }

    /// A pidfd that does not become readable while the test runs (this process's own).
    fn live_server() -> OwnedFd {
        crate::sys::pidfd_open(std::process::id()).unwrap()
    }

    #[test]
    fn announcements_cross_the_doorbell_whole() {
        let (server, client) = doorbell();
        let alive = live_server();
        let long = "x".repeat(3 * Announcement::MAX);
        let me = std::process::id();
        for announcement in [
            Announcement::Spare {
                pid: me,
                pidfd: live_server(),
            },
            Announcement::Failed("fork failed: EAGAIN".into()),
            Announcement::Failed(long.clone()),
        ] {
            announcement.send(server.as_fd()).unwrap();
            let received =
                Announcement::receive(client.as_fd(), alive.as_fd(), Duration::from_secs(5))
                    .unwrap();
            match (&announcement, received) {
                (Announcement::Spare { .. }, Announcement::Spare { pid, pidfd }) => {
                    assert_eq!(pid, me);
                    // A pidfd of this (living) process came through: not readable.
                    assert!(
                        !crate::sys::wait_readable(pidfd.as_fd(), Some(Duration::ZERO)).unwrap()
                    );
                }
                (Announcement::Failed(sent), Announcement::Failed(got))
                    if sent.len() > Announcement::MAX =>
                {
                    assert_eq!(got, sent[..Announcement::MAX - 1]);
                }
                (Announcement::Failed(sent), Announcement::Failed(got)) => assert_eq!(&got, sent),
                (sent, got) => panic!("sent {sent:?}, received {got:?}"),
            }
        }
    }

    #[test]
    fn a_malformed_late_or_missing_announcement_is_an_error() {
        let (server, client) = doorbell();
        let alive = live_server();
        rustix::net::send(&server, &[7, 1, 2], SendFlags::empty()).unwrap();
        let malformed =
            Announcement::receive(client.as_fd(), alive.as_fd(), Duration::from_secs(5))
                .unwrap_err();
        assert!(malformed.to_string().contains("malformed"), "{malformed}");
        let late = Announcement::receive(client.as_fd(), alive.as_fd(), Duration::from_millis(1))
            .unwrap_err();
        assert_eq!(late.kind(), std::io::ErrorKind::TimedOut);
        drop(server);
        let gone = Announcement::receive(client.as_fd(), alive.as_fd(), Duration::from_secs(5))
            .unwrap_err();
        assert_eq!(gone.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn rings_say_whether_they_carry_a_request() {
        let (server, client) = doorbell();
        let (sidecar, _) = doorbell();
        ring(client.as_fd(), 7, sidecar.as_fd()).unwrap();
        ring_retry(client.as_fd()).unwrap();
        assert!(matches!(
            next_bell(server.as_fd()),
            Bell::Request { seq: 7, .. }
        ));
        assert!(matches!(next_bell(server.as_fd()), Bell::Retry));
        drop(client);
        assert!(matches!(next_bell(server.as_fd()), Bell::Hangup));
    }
}
