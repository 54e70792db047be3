//! Who holds handles of a queue, so that a `get` blocked on an empty queue
//! (or a `put` blocked on a full bounded one) learns, from the kernel, that
//! no other handle is left to put (or take) anything.
//!
//! Every queue handle can both put and get, so the presence pipes of
//! connections (where the waiter holds no write end of the pipe it watches)
//! do not fit: a waiter's own handle would keep the pipe open. Instead the
//! queue's directory page has a table of *holders*: one 64-bit word per
//! process, `pid << 32 | handles`, where `handles` counts that process's open
//! handles plus the handles it lent that nobody claimed yet (a handle in
//! flight counts for its lender, which must live for it to be claimed; the
//! claimer registers its own before it takes the lender's count down). A
//! process updates its word with a CAS when a handle is made, closed or
//! dropped; the update that takes a count down wakes the queue's sleepers.
//!
//! A waiter, before sleeping, opens a pidfd of every other holder and hands
//! it to the process's liveness watcher (`liveness.rs`), which wakes the
//! waiter when that process ends, SIGKILL included. After every wake-up the
//! waiter adds up the handles of the holders still alive, other than its
//! own: none left means nobody can ever put (take) an item, and the call
//! fails with [`QueueError::Abandoned`](super::QueueError::Abandoned).
//! Nothing is polled; a death is noticed when the kernel reports the exit.
//!
//! Conservative by construction: a table with no free word, or a handle
//! inherited through a bare `fork` (not counted in the child), marks the
//! queue *untracked* and waits then never give up (as in Python). A handle
//! serialized into a message that is dropped unread keeps its lender counted
//! while the lender lives.

use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::SeqCst;

use crate::futex::AtomicU32;

/// Most processes tracked at once per queue.
pub(super) const HOLDERS: usize = 192;

/// The table, in the queue's directory page.
#[repr(C)]
pub(super) struct Holders {
    /// Non-zero: some handle is not counted; waits never give up.
    untracked: AtomicU32,
    /// Bumped by every change of a word: a waiter that found others alive
    /// looks again only when it moved (or a watched process ended).
    changes: AtomicU32,
    words: [AtomicU64; HOLDERS],
}

fn pid_of(word: u64) -> u32 {
    (word >> 32) as u32
}

fn count_of(word: u64) -> u32 {
    word as u32
}

fn word(pid: u32, count: u32) -> u64 {
    (u64::from(pid) << 32) | u64::from(count)
}

impl Holders {
    /// One more handle in process `pid` (made, received or lent).
    pub(super) fn add(&self, pid: u32) {
        // The process's word, if it has one.
        for slot in &self.words {
            let mut current = slot.load(SeqCst);
            while pid_of(current) == pid && count_of(current) > 0 {
                let new = word(pid, count_of(current).saturating_add(1));
                match slot.compare_exchange(current, new, SeqCst, SeqCst) {
                    Ok(_) => return self.changed(),
                    Err(now) => current = now,
                }
            }
        }
        // A free word; failing that, one of a process that ended.
        for reuse_ended in [false, true] {
            for slot in &self.words {
                let current = slot.load(SeqCst);
                let free = current == 0 || (reuse_ended && has_ended(pid_of(current)));
                if free
                    && slot
                        .compare_exchange(current, word(pid, 1), SeqCst, SeqCst)
                        .is_ok()
                {
                    return self.changed();
                }
            }
        }
        tracing::warn!("more processes hold this queue than it can track; waits will not give up");
        self.untracked.store(1, SeqCst);
    }

    /// One handle fewer in process `pid`. Returns whether it was counted.
    pub(super) fn remove(&self, pid: u32) -> bool {
        for slot in &self.words {
            let mut current = slot.load(SeqCst);
            while pid_of(current) == pid && count_of(current) > 0 {
                let new = match count_of(current) - 1 {
                    0 => 0,
                    n => word(pid, n),
                };
                match slot.compare_exchange(current, new, SeqCst, SeqCst) {
                    Ok(_) => {
                        self.changed();
                        return true;
                    }
                    Err(now) => current = now,
                }
            }
        }
        false
    }

    fn changed(&self) {
        self.changes.fetch_add(1, SeqCst);
    }

    /// How many times the table changed (mod 2^32).
    pub(super) fn changes(&self) -> u32 {
        self.changes.load(SeqCst)
    }

    /// Marks the queue untracked (a handle outside the count exists).
    pub(super) fn give_up_tracking(&self) {
        self.untracked.store(1, SeqCst);
    }

    /// Whether some handle other than the caller's (one of `me`'s) may
    /// exist: `ended(pid)` tells whether a holder's process ended.
    pub(super) fn others_alive(&self, me: u32, mut ended: impl FnMut(u32) -> bool) -> bool {
        if self.untracked.load(SeqCst) != 0 {
            return true;
        }
        self.words.iter().any(|slot| {
            let current = slot.load(SeqCst);
            let (pid, count) = (pid_of(current), count_of(current));
            match count {
                0 => false,
                _ if pid == me => count > 1,
                _ => !ended(pid),
            }
        })
    }

    /// The processes, other than `me`, holding handles now.
    pub(super) fn other_pids(&self, me: u32) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().filter_map(move |slot| {
            let current = slot.load(SeqCst);
            (count_of(current) > 0 && pid_of(current) != me).then_some(pid_of(current))
        })
    }
}

/// Whether process `pid` has ended (no pidfd can be opened for it). A pid
/// reused by another process reads as alive: never a false "ended".
pub(super) fn has_ended(pid: u32) -> bool {
    let Some(pid) = rustix::process::Pid::from_raw(pid as i32) else {
        return true;
    };
    matches!(
        rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()),
        Err(rustix::io::Errno::SRCH)
    )
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn table() -> Box<Holders> {
        // SAFETY: all-zero bytes are a valid `Holders` (atomics).
        unsafe { Box::new(std::mem::zeroed()) }
    }

    #[test]
    fn counts_per_process_and_excludes_the_caller() {
        let holders = table();
        let me = std::process::id();
        holders.add(me);
        assert!(!holders.others_alive(me, |_| false), "only my own handle");
        holders.add(me);
        assert!(holders.others_alive(me, |_| false), "a second handle here");
        assert!(holders.remove(me));
        let other = 1; // init: alive, not us
        holders.add(other);
        assert!(holders.others_alive(me, |_| false));
        assert!(!holders.others_alive(me, |pid| pid == other), "it ended");
        assert_eq!(holders.other_pids(me).collect::<Vec<_>>(), [other]);
        assert!(holders.remove(other));
        assert!(!holders.others_alive(me, |_| false));
        assert!(holders.remove(me));
        assert!(!holders.remove(me), "nothing left to remove");
        holders.give_up_tracking();
        assert!(holders.others_alive(me, |_| true));
    }
}
