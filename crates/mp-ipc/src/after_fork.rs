//! What a child forked from a process that uses mp-ipc inherits, made sound.
//!
//! `fork` copies only the calling thread. Four things of this crate would be
//! copied broken:
//!
//! * **Locks held by other threads** (the shm tracker's state, the courier's
//!   table, the liveness watcher's map, the registry of presences): a child
//!   that took one would wait forever. A `pthread_atfork` handler, registered
//!   when the first of these exists, takes every one of them before the fork
//!   (in the one order every code path follows: shm tracker, liveness, then
//!   courier) and releases them in the parent and in the child, so the child
//!   gets them unlocked and consistent.
//! * **State that names the parent's threads** (the courier and watcher
//!   threads do not exist in the child): forgotten in the child, which starts
//!   its own on first use; the parent's lent descriptors copied into the
//!   child are closed.
//! * **Presence descriptors** (see [`liveness::Presence`]): each inherited
//!   one is replaced, under the same number, by a descriptor that means
//!   nothing, so that a forked child does not keep its parent's pipe ends
//!   "alive" — a reader sees the end of a pipe once the parent drops or loses
//!   its last handle, whatever forked children still run. A forked child uses
//!   the handles it received (as process arguments or in messages), each with
//!   its own presence; an inherited copy of a parent's connection can still
//!   move bytes but no longer counts as a holder (a handle sent inside a
//!   message through it fails with a typed error).
//! * **The shared memory tracker's table** (see `shm_tracker.rs`): the child
//!   handler marks the inherited state as the parent's, so that the child
//!   never writes its parent's table and becomes a creator of its own. Its
//!   lock is taken first (a thread that starts a tracker forks while holding
//!   it, and skips it then).
//!
//! The handlers run for every `fork(3)` of the process (mp-core's fork start
//! method, `libc::fork`); a raw `clone`/`vfork` skips them, and the pid checks
//! of the courier and the watcher still give such a child its own.
//! A fork racing with the creation or the receipt of a handle in another
//! thread may leave that one handle's presence in the child (it is registered
//! just after it is made): the end then closes when the child exits, as
//! before.

use std::cell::RefCell;
use std::sync::Once;

use crate::{liveness, shm_tracker, transport};

thread_local! {
    /// The locks the forking thread holds between `prepare` and `parent`/`child`.
    static HELD: RefCell<
        Option<(
            shm_tracker::HeldAcrossFork,
            liveness::HeldAcrossFork,
            transport::HeldAcrossFork,
        )>,
    > = const { RefCell::new(None) };
}

/// Registers the handlers (once per process; a forked child inherits them).
pub(crate) fn register() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // SAFETY: the three handlers are `extern "C"` functions without
        // unwinding (the locks they take recover from poisoning instead of
        // panicking) that only take and release this crate's locks and, in
        // the child, use descriptors this crate owns.
        let error = unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) };
        if error != 0 {
            tracing::error!(error, "cannot make mp-ipc's state safe across fork");
        }
    });
}

extern "C" fn prepare() {
    let held = (
        shm_tracker::hold_across_fork(),
        liveness::hold_across_fork(),
        transport::hold_across_fork(),
    );
    HELD.with(|slot| *slot.borrow_mut() = Some(held));
}

extern "C" fn parent() {
    HELD.with(|slot| drop(slot.borrow_mut().take()));
}

extern "C" fn child() {
    shm_tracker::forget_in_child();
    if let Some((tracker, liveness, transport)) = HELD.with(|slot| slot.borrow_mut().take()) {
        transport.release_in_child();
        liveness.release_in_child();
        drop(tracker);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::time::{Duration, Instant};

    /// Forks while another thread holds every lock of the transport and the
    /// liveness watcher; the child must be able to use them all.
    #[test]
    fn a_fork_while_another_thread_holds_the_locks_gives_the_child_usable_ones() {
        // Start the courier and the watcher, so that their locks exist.
        let (watch_end, presence) = liveness::presence_pipe().unwrap();
        let presence = liveness::Presence::new(presence);
        let _watch = liveness::Watch::new(watch_end, || {}).unwrap();
        drop(transport::lend(&[presence.as_fd()]).unwrap());
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let holder = std::thread::spawn(move || {
            let held = (
                shm_tracker::hold_across_fork(),
                liveness::hold_across_fork(),
                transport::hold_across_fork(),
            );
            held_tx.send(()).unwrap();
            // Not a synchronisation: how long the locks stay held, so that
            // the fork below very likely starts while they are.
            std::thread::sleep(Duration::from_millis(200));
            drop(held);
        });
        held_rx.recv().unwrap();
        let (done_reader, done_writer) =
            rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC).unwrap();
        // SAFETY: the child only uses this crate's state (made safe by the
        // handlers under test), the allocator (reset by glibc), and exits
        // with `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let (watch_end, presence) = liveness::presence_pipe().unwrap();
            let presence = liveness::Presence::new(presence);
            let watch = liveness::Watch::new(watch_end, || {}).unwrap();
            let lent = transport::lend(&[presence.as_fd()]).unwrap();
            drop((lent, watch, presence));
            // Takes the tracker's lock (nothing to untrack).
            shm_tracker::untrack("not-a-segment");
            let _ = rustix::io::write(&done_writer, b"y");
            // SAFETY: ends the child without running the parent's atexit
            // handlers or test harness.
            unsafe { libc::_exit(0) };
        }
        drop(done_writer);
        let finished = transport::wait_readable(
            done_reader.as_fd(),
            Instant::now() + Duration::from_secs(20),
        )
        .unwrap();
        let mut byte = [0u8; 1];
        let told = finished && rustix::io::read(&done_reader, &mut byte).unwrap_or(0) == 1;
        // SAFETY: signalling and reaping our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        holder.join().unwrap();
        assert!(told, "the forked child deadlocked on an inherited lock");
    }
}
