//! Whether the other end of a connection still exists, told by the kernel.
//!
//! Each end of each direction of a pipe has a *presence pipe*: every handle of
//! that end, in every process, holds a descriptor of the pipe's write end
//! (so do the courier's copies of handles in flight, see
//! [`transport`](crate::transport)); the other end holds the read end, its
//! *watch*. Nobody ever writes to it. When the last descriptor of the write
//! end closes, wherever it was (a handle dropped, a process exited or was
//! killed, a message carrying a handle dropped), the kernel reports `POLLHUP`
//! on the watch.
//!
//! A process learns it without looking: one thread per process (started on
//! first use) sleeps in `epoll_wait` on every watch of the process. On a hang-up
//! it marks the end gone and runs the end's `on_gone` (which wakes the futex
//! that readers or writers of the ring sleep on, and rings the doorbell).
//! Nothing is polled periodically; nothing reads `/proc`.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use rustix::event::epoll;

/// Watch keys → the flags they raise (one map per process, leaked: a
/// process has one watcher, a forked child its own).
type Entries = &'static Mutex<HashMap<u64, Weak<Flag>>>;

/// A new presence pipe: `(watch, presence)`, the read and the write end.
pub(crate) fn presence_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?)
}

/// A new presence socket for the writers of a connection direction:
/// `(watch, presence)`, the receiving and the sending end of a
/// `SOCK_SEQPACKET` pair. Its hang-up tells readers that every writer is
/// gone, as a presence pipe's does; the descriptors of handles sent inside
/// messages travel on it (see [`message_handles`](crate::message_handles)).
pub(crate) fn presence_socket() -> io::Result<(OwnedFd, OwnedFd)> {
    let (send, receive) = crate::message_handles::parcel_socket()?;
    Ok((receive, send))
}

/// A descriptor whose being open in a process says "a handle of this end
/// lives here": the write end of a presence pipe, or the sending end of a
/// presence socket.
///
/// Every presence of the process is in a registry, so that a child forked
/// from it does not count as a holder: [`after_fork`](crate::after_fork)
/// replaces each inherited presence descriptor with a meaningless one in the
/// child (a forked child gets the handles it needs as arguments, which carry
/// their own presence; the copies of its parent's handles it inherited are
/// not reachable from its function). Without this, a pipe end dropped by the
/// parent would stay open for as long as any forked child lives.
pub(crate) struct Presence(Option<OwnedFd>);

impl Presence {
    /// Registers `fd` as a presence of this process.
    pub(crate) fn new(fd: OwnedFd) -> Presence {
        crate::after_fork::register();
        lock(&PRESENCES).insert(fd.as_raw_fd());
        Presence(Some(fd))
    }

    pub(crate) fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_ref().expect("present until dropped").as_fd()
    }
}

impl Drop for Presence {
    fn drop(&mut self) {
        // Closed and unregistered under the lock: a fork never sees a
        // registered number that is closed (and maybe reused by now).
        let mut presences = lock(&PRESENCES);
        if let Some(fd) = self.0.take() {
            presences.remove(&fd.as_raw_fd());
            drop(fd);
        }
    }
}

/// The raw numbers of every [`Presence`] of this process.
static PRESENCES: Mutex<BTreeSet<RawFd>> = Mutex::new(BTreeSet::new());

/// What happens when an end is found gone.
type OnGone = Box<dyn Fn() + Send + Sync>;

/// The shared state of one watch: the flag, and what to do when it goes up.
struct Flag {
    gone: AtomicBool,
    on_gone: OnGone,
}

impl Flag {
    fn raise(&self) {
        if !self.gone.swap(true, SeqCst) {
            (self.on_gone)();
        }
    }
}

/// The read end of a peer's presence pipe, watched by this process's watcher.
pub(crate) struct Watch {
    flag: Arc<Flag>,
    fd: OwnedFd,
    key: u64,
    /// The process whose watcher has this watch registered (0: none).
    registered_in: AtomicU32,
    /// Also gone when `fd` turns readable (a pidfd of a process that ended).
    readable_means_gone: bool,
}

impl Watch {
    /// Watches `fd` (a presence pipe's read end); `on_gone` runs once, on
    /// the watcher thread (or the thread that notices first), when every
    /// descriptor of the write end is closed.
    pub(crate) fn new(
        fd: OwnedFd,
        on_gone: impl Fn() + Send + Sync + 'static,
    ) -> io::Result<Watch> {
        Watch::with_interest(fd, on_gone, false)
    }

    /// Watches a pidfd: `on_gone` runs once the process has ended (the
    /// pidfd turns readable; a hang-up alone comes only once it is reaped).
    pub(crate) fn process(
        pidfd: OwnedFd,
        on_gone: impl Fn() + Send + Sync + 'static,
    ) -> io::Result<Watch> {
        Watch::with_interest(pidfd, on_gone, true)
    }

    fn with_interest(
        fd: OwnedFd,
        on_gone: impl Fn() + Send + Sync + 'static,
        readable_means_gone: bool,
    ) -> io::Result<Watch> {
        static NEXT_KEY: AtomicU64 = AtomicU64::new(1);
        let watch = Watch {
            flag: Arc::new(Flag {
                gone: AtomicBool::new(false),
                on_gone: Box::new(on_gone),
            }),
            fd,
            key: NEXT_KEY.fetch_add(1, Relaxed),
            registered_in: AtomicU32::new(0),
            readable_means_gone,
        };
        watch.ensure_watched()?;
        Ok(watch)
    }

    /// Whether the peer is known to be gone (a load; the watcher raises it).
    #[inline]
    pub(crate) fn gone(&self) -> bool {
        self.flag.gone.load(SeqCst)
    }

    /// Makes sure this process's watcher watches (after a `fork`, the child
    /// has no watcher thread until it needs one). Called before sleeping.
    pub(crate) fn ensure_watched(&self) -> io::Result<()> {
        let pid = std::process::id();
        if self.registered_in.load(Relaxed) == pid {
            return Ok(());
        }
        let watcher = watcher()?;
        lock(watcher.entries).insert(self.key, Arc::downgrade(&self.flag));
        let added = epoll::add(
            &*watcher.epoll,
            &self.fd,
            epoll::EventData::new_u64(self.key),
            if self.readable_means_gone {
                epoll::EventFlags::ONESHOT | epoll::EventFlags::IN
            } else {
                epoll::EventFlags::ONESHOT
            },
        );
        if let Err(errno) = added {
            lock(watcher.entries).remove(&self.key);
            return Err(errno.into());
        }
        self.registered_in.store(pid, Relaxed);
        Ok(())
    }

    /// Looks at the pipe now (one `poll`), raising the flag on a hang-up.
    pub(crate) fn check_now(&self) -> bool {
        if self.gone() {
            return true;
        }
        if hung_up(self.fd.as_fd()) {
            self.flag.raise();
        }
        self.gone()
    }

    /// Raises the flag from a hang-up seen elsewhere (e.g. by `wait`'s poll).
    pub(crate) fn mark_gone(&self) {
        self.flag.raise();
    }

    /// The watched descriptor (reports `POLLHUP` once the peer is gone).
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Only this process's own watcher: a forked child shares the epoll
        // instance of the parent's watcher and must not remove its entries.
        if self.registered_in.load(Relaxed) == std::process::id()
            && let Some(watcher) = lock(&WATCHER).as_ref()
        {
            let _ = epoll::delete(&*watcher.epoll, &self.fd);
            lock(watcher.entries).remove(&self.key);
        }
    }
}

/// Whether `fd` reports a hang-up now.
pub(crate) fn hung_up(fd: BorrowedFd<'_>) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut poll = [PollFd::new(&fd, PollFlags::empty())];
    let zero = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        match rustix::event::poll(&mut poll, Some(&zero)) {
            Ok(_) => {
                return poll[0]
                    .revents()
                    .intersects(PollFlags::HUP | PollFlags::ERR);
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(_) => return false,
        }
    }
}

/// One per process: the epoll instance and what its keys stand for.
struct Watcher {
    pid: u32,
    epoll: Arc<OwnedFd>,
    entries: Entries,
}

static WATCHER: Mutex<Option<Watcher>> = Mutex::new(None);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// This process's watcher (epoll and map), started on first use.
fn watcher() -> io::Result<WatcherRef> {
    let pid = std::process::id();
    let mut slot = lock(&WATCHER);
    if let Some(w) = slot.as_ref().filter(|w| w.pid == pid) {
        return Ok(WatcherRef {
            epoll: Arc::clone(&w.epoll),
            entries: w.entries,
        });
    }
    // After a fork (not through `fork(3)`, whose handler empties the slot),
    // the slot holds the parent's watcher, whose thread did not survive the
    // fork: forgotten (its parts belong to that thread), replaced by this
    // process's own.
    std::mem::forget(slot.take());
    crate::after_fork::register();
    let epoll = Arc::new(epoll::create(epoll::CreateFlags::CLOEXEC)?);
    let entries: Entries = Box::leak(Box::new(Mutex::new(HashMap::new())));
    {
        let epoll = Arc::clone(&epoll);
        std::thread::Builder::new()
            .name("mp-ipc liveness".into())
            .spawn(move || watch_forever(&epoll, entries))?;
    }
    *slot = Some(Watcher {
        pid,
        epoll: Arc::clone(&epoll),
        entries,
    });
    Ok(WatcherRef { epoll, entries })
}

struct WatcherRef {
    epoll: Arc<OwnedFd>,
    entries: Entries,
}

/// This process's liveness locks, held by the forking thread across a
/// `fork` (see [`after_fork`](crate::after_fork)), so that none is copied
/// held by another thread.
pub(crate) struct HeldAcrossFork {
    watcher: MutexGuard<'static, Option<Watcher>>,
    entries: Option<MutexGuard<'static, HashMap<u64, Weak<Flag>>>>,
    presences: MutexGuard<'static, BTreeSet<RawFd>>,
}

/// Takes the locks, always in this order (no code path holds one of them
/// while taking an earlier one).
pub(crate) fn hold_across_fork() -> HeldAcrossFork {
    let watcher = lock(&WATCHER);
    let entries = watcher.as_ref().map(|w| lock(w.entries));
    HeldAcrossFork {
        watcher,
        entries,
        presences: lock(&PRESENCES),
    }
}

impl HeldAcrossFork {
    /// In the child: forgets the parent's watcher (its thread is not here)
    /// and makes every inherited presence descriptor meaningless, then
    /// releases the locks.
    pub(crate) fn release_in_child(mut self) {
        drop(self.entries.take());
        std::mem::forget(self.watcher.take());
        if self.presences.is_empty() {
            return;
        }
        // One descriptor that stands for nothing, put in place of each
        // presence (same number: the inherited handles still own it and close
        // it if they are ever dropped).
        let placeholder = match rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC) {
            Ok(fd) => fd,
            Err(errno) => {
                tracing::error!(%errno, "a forked child keeps its parent's pipe ends open");
                return;
            }
        };
        for &fd in self.presences.iter() {
            // SAFETY: `fd` is registered, so a `Presence` (the child's copy of
            // the parent's) owns it and it is open: presences are closed and
            // unregistered under the lock held here. `ManuallyDrop`: this only
            // borrows it; `dup3` replaces the file behind the number, which
            // stays owned by that `Presence`.
            let mut target = ManuallyDrop::new(unsafe { OwnedFd::from_raw_fd(fd) });
            if let Err(errno) =
                rustix::io::dup3(&placeholder, &mut target, rustix::io::DupFlags::CLOEXEC)
            {
                tracing::error!(%errno, fd, "a forked child keeps a pipe end of its parent open");
            }
        }
    }
}

/// The watcher thread: sleeps in `epoll_wait` until a watched pipe hangs up.
fn watch_forever(epoll: &OwnedFd, entries: &Mutex<HashMap<u64, Weak<Flag>>>) {
    let mut events: Vec<epoll::Event> = Vec::with_capacity(64);
    loop {
        events.clear();
        match epoll::wait(epoll, rustix::buffer::spare_capacity(&mut events), None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(errno) => {
                tracing::error!(%errno, "the liveness watcher stopped");
                return;
            }
        }
        for event in &events {
            let key = event.data.u64();
            let flag = lock(entries).remove(&key).and_then(|weak| weak.upgrade());
            if let Some(flag) = flag {
                tracing::debug!(key, "the other end of a connection is gone");
                flag.raise();
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn closing_every_write_end_raises_the_flag_through_the_watcher() {
        let (watch_end, presence) = presence_pipe().unwrap();
        let copy = presence.try_clone().unwrap();
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        let watch = Watch::new(watch_end, move || {
            let _ = lock(&tx).send(());
        })
        .unwrap();
        drop(presence);
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "a copy of the write end is still open"
        );
        assert!(!watch.gone() && !watch.check_now());
        drop(copy);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the watcher never reported the hang-up");
        assert!(watch.gone());
    }
}
