//! Presence slots: how a waiting party lets the kernel report its death.
//!
//! A party that sleeps in a primitive (a [`Barrier`](crate::barrier::Barrier)
//! wait; a thread holding [`Semaphore`](crate::semaphore::Semaphore) permits
//! has a slot of the same kind) first *claims* a slot: it locks the slot's robust, process-shared
//! mutex and keeps it locked while it waits. glibc links a held robust mutex
//! into the thread's robust list; when the thread dies (SIGKILL included),
//! the kernel walks that list, sets `FUTEX_OWNER_DIED` in the mutex word and,
//! if `FUTEX_WAITERS` is set in it, wakes one thread sleeping on the word.
//!
//! The other parties *watch* the claimed slots: they set `FUTEX_WAITERS` in
//! each word (what glibc itself does when it blocks on a mutex; the owner's
//! unlock then issues one extra futex wake) and sleep with `futex_waitv`
//! (Linux 5.16) on the primitive's own futex word *and* those mutex words at
//! once. A death therefore wakes a watcher at once, with no polling and no
//! helper process; the watcher sees `FUTEX_OWNER_DIED` on a slot of the
//! current round and breaks the primitive for everybody.
//!
//! `futex_waitv` takes at most 128 words: a watcher watches the first 126
//! claimed slots (a death among later ones is still seen by the next party to
//! arrive, or by the release, which checks every slot).

use std::io;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::futex::{self, AtomicU32, WaitOutcome};
use crate::robust::{Acquired, RobustMutex};

/// Kernel robust-futex ABI bits of a mutex word.
#[cfg_attr(loom, allow(dead_code))] // the loom model watches the main word only
const FUTEX_WAITERS: u32 = 0x8000_0000;
pub(crate) const FUTEX_OWNER_DIED: u32 = 0x4000_0000;
#[cfg_attr(loom, allow(dead_code))]
const FUTEX_TID_MASK: u32 = 0x3fff_ffff;

/// Most words `futex_waitv` accepts in one call.
#[cfg_attr(loom, allow(dead_code))]
const WAITV_MAX: usize = 128;

/// One presence slot, as laid out in shared memory.
#[repr(C)]
pub(crate) struct Presence {
    /// Held by the party waiting here; the kernel marks it if that party dies.
    mutex: RobustMutex,
    /// The round (generation) the party waits in.
    generation: AtomicU32,
    /// 1 while a party waits here; cleared before the mutex is unlocked.
    occupied: AtomicU32,
}

impl Presence {
    /// Initialises a free slot at `ptr`.
    ///
    /// # Safety
    /// `ptr` is valid for writes of a `Presence` and not yet shared.
    pub(crate) unsafe fn init_at(ptr: *mut Presence) -> io::Result<()> {
        // SAFETY: per the contract; every field is written before sharing.
        unsafe {
            RobustMutex::init_at(&raw mut (*ptr).mutex, false)?;
            (&raw mut (*ptr).generation).write(AtomicU32::new(0));
            (&raw mut (*ptr).occupied).write(AtomicU32::new(0));
        }
        Ok(())
    }

    /// Whether the party waiting here in `generation` died.
    fn died_in(&self, generation: u32) -> bool {
        self.occupied.load(Ordering::Acquire) == 1
            && self.generation.load(Ordering::Relaxed) == generation
            && self.mutex.word().load(Ordering::Acquire) & FUTEX_OWNER_DIED != 0
    }
}

/// A slot held by the calling thread; freed when dropped (by that thread:
/// guards are not `Send`).
pub(crate) struct Claim<'a> {
    slot: &'a Presence,
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.slot.occupied.store(0, Ordering::Release);
        let _ = self.slot.mutex.unlock();
    }
}

/// Claims a free slot for a party waiting in `generation`; `None` if every
/// slot is taken (the party then waits unwatched, as before this module).
///
/// A slot whose last holder died is reclaimed here (`EOWNERDEAD` hands it
/// over); a slot still held by a party of an earlier round that has not yet
/// woken is skipped.
pub(crate) fn claim(slots: &[Presence], generation: u32) -> Option<Claim<'_>> {
    slots.iter().find_map(|slot| match slot.mutex.try_lock() {
        Ok(Acquired::Clean | Acquired::OwnerDied) => {
            slot.generation.store(generation, Ordering::Relaxed);
            slot.occupied.store(1, Ordering::Release);
            Some(Claim {
                slot,
                _not_send: std::marker::PhantomData,
            })
        }
        Err(_) => None,
    })
}

/// Whether a party waiting in `generation` died.
pub(crate) fn any_died(slots: &[Presence], generation: u32) -> bool {
    slots.iter().any(|slot| slot.died_in(generation))
}

/// Futex words to sleep on together.
pub(crate) struct Watch<'a> {
    word: &'a AtomicU32,
    expected: u32,
    #[cfg(not(loom))]
    more: Vec<rustix::thread::futex::Wait>,
}

impl<'a> Watch<'a> {
    /// Sleeps while `word` holds `expected` (like [`futex::wait`]).
    pub(crate) fn new(word: &'a AtomicU32, expected: u32) -> Self {
        Self {
            word,
            expected,
            #[cfg(not(loom))]
            more: Vec::new(),
        }
    }

    /// Also wakes when `word` no longer holds `expected`.
    #[cfg_attr(loom, allow(unused_variables))]
    pub(crate) fn also(&mut self, word: &'a AtomicU32, expected: u32) {
        #[cfg(not(loom))]
        if self.more.len() + 1 < WAITV_MAX {
            self.more.push(wait_for(word, expected));
        }
    }

    /// Also wakes when a party waiting in `generation` (other than `mine`)
    /// dies. Returns false, watching nothing more, if one is already dead.
    #[cfg_attr(loom, allow(unused_variables))]
    pub(crate) fn parties(
        &mut self,
        slots: &'a [Presence],
        generation: u32,
        mine: Option<&Claim<'_>>,
    ) -> bool {
        #[cfg(not(loom))]
        for slot in slots {
            if mine.is_some_and(|claim| std::ptr::eq(claim.slot, slot))
                || slot.occupied.load(Ordering::Acquire) != 1
                || slot.generation.load(Ordering::Relaxed) != generation
            {
                continue;
            }
            if !self.owner_of(&slot.mutex) {
                return false;
            }
        }
        true
    }

    /// Also wakes when the thread holding `mutex` dies (if it is held).
    /// Returns false, watching nothing more, if its holder already died;
    /// true also when there was no room left to watch it.
    #[cfg_attr(loom, allow(unused_variables))]
    pub(crate) fn owner_of(&mut self, mutex: &'a RobustMutex) -> bool {
        #[cfg(not(loom))]
        {
            let word = mutex.word();
            let mut value = word.load(Ordering::Acquire);
            if value & FUTEX_OWNER_DIED == 0 && self.more.len() + 1 >= WAITV_MAX {
                return true;
            }
            loop {
                if value & FUTEX_OWNER_DIED != 0 {
                    return false;
                }
                if value & FUTEX_TID_MASK == 0 {
                    return true; // not held: nobody to watch
                }
                if value & FUTEX_WAITERS != 0 {
                    self.more.push(wait_for(word, value));
                    return true;
                }
                // Ask the kernel to wake a sleeper on this word when the
                // owner dies (and the owner's unlock to wake one too).
                match word.compare_exchange(
                    value,
                    value | FUTEX_WAITERS,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => value |= FUTEX_WAITERS,
                    Err(actual) => value = actual,
                }
            }
        }
        #[cfg(loom)]
        true
    }

    /// Sleeps until any watched word changes (or is woken), or `deadline`.
    pub(crate) fn sleep(&self, deadline: Option<Instant>) -> WaitOutcome {
        #[cfg(not(loom))]
        if !self.more.is_empty() {
            return self.sleep_on_all(deadline);
        }
        futex::wait(self.word, self.expected, deadline)
    }

    #[cfg(not(loom))]
    fn sleep_on_all(&self, deadline: Option<Instant>) -> WaitOutcome {
        use rustix::io::Errno;
        use rustix::thread::futex::{WaitvFlags, waitv};
        use rustix::time::ClockId;
        let mut waits = Vec::with_capacity(self.more.len() + 1);
        waits.push(wait_for(self.word, self.expected));
        waits.extend_from_slice(&self.more);
        let timeout = match deadline {
            None => None,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return WaitOutcome::TimedOut;
                }
                // futex_waitv takes an absolute CLOCK_MONOTONIC time.
                let at = crate::robust::monotonic_deadline(deadline);
                Some(rustix::thread::futex::Timespec {
                    tv_sec: at.tv_sec,
                    tv_nsec: at.tv_nsec,
                })
            }
        };
        match waitv(
            &waits,
            WaitvFlags::empty(),
            timeout.as_ref(),
            ClockId::Monotonic,
        ) {
            Ok(_) => WaitOutcome::Woken,
            Err(Errno::AGAIN) => WaitOutcome::Mismatch,
            Err(Errno::TIMEDOUT) => WaitOutcome::TimedOut,
            // EINTR: the caller re-checks and waits again with the time left.
            Err(Errno::INTR) => WaitOutcome::Woken,
            Err(errno) => {
                // ENOSYS (a kernel before 5.16): sleep on the main word
                // only; deaths are then noticed by the next arrival.
                tracing::debug!(%errno, "futex_waitv failed; waiting without watching parties");
                futex::wait(self.word, self.expected, deadline)
            }
        }
    }
}

#[cfg(not(loom))]
fn wait_for(word: &AtomicU32, expected: u32) -> rustix::thread::futex::Wait {
    use rustix::thread::futex::{Wait, WaitFlags, WaitPtr};
    let mut wait = Wait::new();
    wait.val = u64::from(expected);
    wait.uaddr = WaitPtr::new(word.as_ptr().cast());
    // Shared (not FUTEX2_PRIVATE): the words live in memory shared between
    // processes, and the kernel's robust-list wake-up is a shared one.
    wait.flags = WaitFlags::SIZE_U32;
    wait
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use std::mem::MaybeUninit;
    use std::time::Duration;

    fn slots(n: usize) -> Vec<Presence> {
        (0..n)
            .map(|_| {
                let mut slot = MaybeUninit::<Presence>::uninit();
                // SAFETY: a fresh, exclusively owned place.
                unsafe { Presence::init_at(slot.as_mut_ptr()).unwrap() };
                // SAFETY: initialised above; a robust mutex that is not held
                // may be moved (it is in no robust list).
                unsafe { slot.assume_init() }
            })
            .collect()
    }

    #[test]
    fn claims_are_exclusive_and_freed_on_drop() {
        let slots = slots(2);
        let a = claim(&slots, 7).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                let b = claim(&slots, 7).unwrap();
                assert!(!std::ptr::eq(a.slot, b.slot));
                assert!(claim(&slots, 7).is_none(), "both slots taken");
            });
        });
        drop(a);
        assert!(!any_died(&slots, 7));
    }

    #[test]
    fn a_thread_dying_in_a_slot_wakes_its_watcher() {
        let slots = slots(2);
        let word = AtomicU32::new(0);
        let generation = 3;
        std::thread::scope(|s| {
            let (claimed, ready) = std::sync::mpsc::channel();
            let (finish, done) = std::sync::mpsc::channel::<()>();
            let slots = &slots;
            s.spawn(move || {
                // Exits holding the slot: the kernel treats it as a death.
                std::mem::forget(claim(slots, generation).unwrap());
                claimed.send(()).unwrap();
                let _ = done.recv();
            });
            ready.recv().unwrap();
            let mut watch = Watch::new(&word, 0);
            assert!(watch.parties(slots, generation, None));
            finish.send(()).unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while !any_died(slots, generation) {
                assert_ne!(watch.sleep(Some(deadline)), WaitOutcome::TimedOut);
            }
        });
        assert!(!any_died(&slots, generation + 1), "only that round");
        // The dead party's slot is reclaimed.
        let first = claim(&slots, generation + 1).unwrap();
        let second = claim(&slots, generation + 1).unwrap();
        drop((first, second));
    }
}
