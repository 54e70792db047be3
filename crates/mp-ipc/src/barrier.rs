//! [`Barrier`]: make a fixed number of processes or threads meet.
//!
//! ```
//! use mp_ipc::barrier::Barrier;
//! use std::time::Duration;
//!
//! let barrier = Barrier::builder(2).timeout(Duration::from_secs(10)).build()?;
//! let indices = std::thread::scope(|s| {
//!     let other = s.spawn(|| barrier.wait().unwrap());
//!     let mine = barrier.wait().unwrap();
//!     [mine, other.join().unwrap()]
//! });
//! // Like Python, each party gets a distinct arrival index in 0..parties.
//! assert_eq!(indices.iter().sum::<u32>(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Python's semantics: the last party to arrive runs the optional action,
//! then everybody is released; a timeout, [`abort`](Barrier::abort) or a
//! panicking action *breaks* the barrier — every waiter gets an error and new
//! waits fail at once — until [`reset`](Barrier::reset).
//!
//! Each wait belongs to a *generation*. Releasing or resetting starts a new
//! one at once, so a fast party cannot slip into the previous round, and a
//! reset never waits for stragglers (a party killed while waiting cannot wedge
//! a reset, unlike CPython).

use std::fmt;
use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mp_core::{FunctionId, TaskFailure};
use serde::{Deserialize, Serialize};

use crate::futex::{self, AtomicU32, WaitOutcome};
use crate::lock::deadline_after;
use crate::presence::{self, Presence, Watch};
use crate::robust::{Acquired, RobustMutex};
use crate::shm::{Shared, SharedMemory, ShmError, ShmState, tag};

/// Errors of [`Barrier`].
#[derive(Debug, thiserror::Error)]
pub enum BarrierError {
    /// The barrier is broken (by a timeout, `abort`, a failed action, or a
    /// `reset` while this party waited); Python's `BrokenBarrierError`.
    #[error("the barrier is broken")]
    Broken,
    /// This wait timed out; the barrier is now broken for every party.
    #[error("timed out after {0:?} waiting at the barrier (the barrier is now broken)")]
    Timeout(Duration),
    /// The action failed (it panicked); the barrier is now broken.
    #[error("the barrier's action failed: {0}")]
    ActionFailed(#[source] TaskFailure),
    /// A barrier needs at least one party.
    #[error("a barrier needs at least one party")]
    NoParties,
    /// The shared memory could not be set up.
    #[error(transparent)]
    Shm(#[from] ShmError),
    /// The operating system reported an unexpected error.
    #[error("barrier failed: {0}")]
    Os(#[source] io::Error),
}

/// Why [`BarrierState::wait`] failed, before mapping to [`BarrierError`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Failure<E> {
    Broken,
    TimedOut,
    Action(E),
}

/// The barrier as laid out in shared memory. Everything but `word` changes
/// only with `mutex` held.
#[repr(C)]
pub(crate) struct BarrierState {
    tag: u64,
    mutex: RobustMutex,
    /// The futex word: bumped on every release, break and reset.
    word: AtomicU32,
    generation: AtomicU32,
    /// Parties waiting in the current generation.
    count: AtomicU32,
    broken: AtomicU32,
    /// Bit `g % 32` set iff generation `g` was released (not reset).
    released: AtomicU32,
    parties: u32,
    /// Presence slots that follow the state in its segment (see
    /// `presence.rs`).
    slot_count: u32,
}

// SAFETY: repr(C), starts with the tag; mutated only through atomics and the
// pthread API (`parties` is written once before sharing).
unsafe impl ShmState for BarrierState {
    const TAG: u64 = tag(b"mp:Barr\0");
    const KIND: &'static str = "Barrier";
}

/// Where the presence slots start in a barrier's segment.
const SLOTS_OFFSET: usize = size_of::<BarrierState>().next_multiple_of(align_of::<Presence>());
/// The most presence slots a barrier gets (a waiter watches at most 126).
const MAX_SLOTS: u32 = 1024;

/// Holds the internal mutex.
struct Held<'a>(&'a RobustMutex);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

fn bit(generation: u32) -> u32 {
    1 << (generation % 32)
}

impl BarrierState {
    /// # Safety
    /// `ptr` is valid for writes of a `BarrierState` and not yet shared.
    pub(crate) unsafe fn init_at(ptr: *mut BarrierState, parties: u32) -> io::Result<()> {
        // SAFETY: per the contract; every field is written before sharing.
        unsafe {
            RobustMutex::init_at(&raw mut (*ptr).mutex, false)?;
            (&raw mut (*ptr).word).write(AtomicU32::new(0));
            (&raw mut (*ptr).generation).write(AtomicU32::new(0));
            (&raw mut (*ptr).count).write(AtomicU32::new(0));
            (&raw mut (*ptr).broken).write(AtomicU32::new(0));
            (&raw mut (*ptr).released).write(AtomicU32::new(0));
            (&raw mut (*ptr).parties).write(parties);
            (&raw mut (*ptr).slot_count).write(0);
            (&raw mut (*ptr).tag).write(Self::TAG);
        }
        Ok(())
    }

    /// Takes the bookkeeping mutex; true if its previous holder died
    /// holding it (inside `wait` or in the action).
    fn hold(&self) -> (Held<'_>, bool) {
        let died = match self.mutex.lock(None) {
            Ok(Acquired::Clean) => false,
            // Every field is a single atomic store, so the state is still
            // well-formed; the caller decides what the death means.
            Ok(Acquired::OwnerDied) => true,
            Err(error) => {
                tracing::error!(?error, "barrier bookkeeping lock failed; continuing");
                false
            }
        };
        (Held(&self.mutex), died)
    }

    /// Records a change and wakes every sleeper (after the mutex is dropped
    /// by the caller, ideally; waking with it held is correct too).
    fn bump(&self) {
        self.word.fetch_add(1, Ordering::Release);
    }

    fn wake(&self) {
        futex::wake_all(&self.word);
    }

    /// Breaks the barrier (bookkeeping held by the caller, who wakes).
    fn break_now(&self, why: &str) {
        if self.broken.swap(1, Ordering::Relaxed) == 0 {
            tracing::warn!(why, "barrier broken");
        }
        self.bump();
    }

    /// Waits for the other parties; runs `action` if last. Returns the
    /// arrival index.
    ///
    /// Each waiting party holds a presence slot (see `presence.rs`)
    /// and watches the slots of the parties that arrived before it; the first
    /// party of a round also watches `count`, which every later arrival
    /// bumps, and re-arms to watch it too. So every waiting party is watched
    /// by somebody asleep, and a party killed while waiting breaks the
    /// barrier as soon as the kernel reports the death. The last party runs
    /// the action with the bookkeeping mutex held, after waking the first
    /// party, which then sleeps on that (robust) mutex: a death in the
    /// action is reported the same way. The release itself checks every slot
    /// of the round, so a death is never counted as an arrival.
    pub(crate) fn wait<E>(
        &self,
        slots: &[Presence],
        deadline: Option<Instant>,
        has_action: bool,
        action: impl FnOnce() -> Result<(), E>,
    ) -> Result<u32, Failure<E>> {
        let (held, died) = self.hold();
        let generation = self.generation.load(Ordering::Relaxed);
        if died || presence::any_died(slots, generation) {
            self.break_now("a party died while waiting");
            drop(held);
            self.wake();
            return Err(Failure::Broken);
        }
        if self.broken.load(Ordering::Relaxed) != 0 {
            return Err(Failure::Broken);
        }
        let index = self.count.fetch_add(1, Ordering::Relaxed);
        if index + 1 == self.parties {
            if has_action && index > 0 {
                // The first party sleeps on our (robust) bookkeeping mutex
                // while the action runs: our death wakes it.
                futex::wake_all(&self.count);
            }
            if let Err(error) = action() {
                self.break_now("the action failed");
                drop(held);
                self.wake();
                return Err(Failure::Action(error));
            }
            let next = generation.wrapping_add(1);
            let released = self.released.load(Ordering::Relaxed);
            self.released
                .store((released | bit(generation)) & !bit(next), Ordering::Relaxed);
            self.generation.store(next, Ordering::Relaxed);
            self.count.store(0, Ordering::Relaxed);
            self.bump();
            drop(held);
            self.wake();
            return Ok(index);
        }
        let mine = presence::claim(slots, generation);
        if index > 0 {
            // The first party re-arms to watch our slot too.
            futex::wake_all(&self.count);
        }
        let mut held = Some(held);
        loop {
            let held_now = match held.take() {
                Some(held) => held,
                None => {
                    let (held, died) = self.hold();
                    if died && self.generation.load(Ordering::Relaxed) == generation {
                        self.break_now("a party died in the action or the bookkeeping");
                    }
                    held
                }
            };
            if self.generation.load(Ordering::Relaxed) != generation {
                return if self.released.load(Ordering::Relaxed) & bit(generation) != 0 {
                    Ok(index)
                } else {
                    Err(Failure::Broken)
                };
            }
            if self.broken.load(Ordering::Relaxed) != 0 {
                drop(held_now);
                self.wake();
                return Err(Failure::Broken);
            }
            // Watch the round's word, the other parties, and (first party
            // only) new arrivals; all read under the mutex, so a change
            // after this point makes the sleep return at once.
            let mut watch = Watch::new(&self.word, self.word.load(Ordering::Acquire));
            if index == 0 {
                watch.also(&self.count, self.count.load(Ordering::Relaxed));
            }
            if !watch.parties(slots, generation, mine.as_ref()) {
                self.break_now("a party died while waiting");
                drop(held_now);
                self.wake();
                return Err(Failure::Broken);
            }
            drop(held_now);
            if watch.sleep(deadline) == WaitOutcome::TimedOut {
                let (held_again, _) = self.hold();
                if self.generation.load(Ordering::Relaxed) == generation
                    && self.broken.load(Ordering::Relaxed) == 0
                {
                    self.break_now("a party timed out");
                    drop(held_again);
                    self.wake();
                    return Err(Failure::TimedOut);
                }
                held = Some(held_again);
            }
        }
    }

    pub(crate) fn abort(&self) {
        let (held, _) = self.hold();
        self.broken.store(1, Ordering::Relaxed);
        self.bump();
        drop(held);
        self.wake();
    }

    pub(crate) fn reset(&self) {
        let (held, _) = self.hold();
        let generation = self.generation.load(Ordering::Relaxed);
        let next = generation.wrapping_add(1);
        // The current generation ends without release: its waiters get Broken.
        let released = self.released.load(Ordering::Relaxed);
        self.released
            .store(released & !bit(generation) & !bit(next), Ordering::Relaxed);
        self.generation.store(next, Ordering::Relaxed);
        self.count.store(0, Ordering::Relaxed);
        self.broken.store(0, Ordering::Relaxed);
        self.bump();
        drop(held);
        self.wake();
    }

    pub(crate) fn broken(&self) -> bool {
        self.broken.load(Ordering::Relaxed) != 0
    }

    pub(crate) fn n_waiting(&self) -> u32 {
        if self.broken() {
            0
        } else {
            self.count.load(Ordering::Relaxed)
        }
    }
}

/// A barrier (Python's `multiprocessing.Barrier`) for a fixed number of
/// parties, with an optional action and default timeout.
///
/// Clones, and copies passed to child processes, are the same barrier (the
/// action and default timeout travel with the handle).
#[derive(Clone, Serialize, Deserialize)]
pub struct Barrier {
    state: Shared<BarrierState>,
    /// The action's trampoline in this executable image.
    action: Option<FunctionId>,
    timeout: Option<Duration>,
}

/// Options of a [`Barrier`]; from [`Barrier::builder`].
#[derive(Debug, Clone)]
#[must_use = "call .build() to create the barrier"]
pub struct BarrierBuilder {
    parties: u32,
    action: Option<FunctionId>,
    timeout: Option<Duration>,
}

impl BarrierBuilder {
    /// Runs `action` in the last party to arrive, before anybody is released
    /// (a non-capturing closure or `fn`, as it may run in any process).
    pub fn action<F: Fn() + Copy + Send + Sync + 'static>(mut self, action: F) -> Self {
        self.action = Some(FunctionId::of_task(&action));
        self
    }

    /// The timeout of [`Barrier::wait`] (default: none).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Creates the barrier.
    pub fn build(self) -> Result<Barrier, BarrierError> {
        if self.parties == 0 {
            return Err(BarrierError::NoParties);
        }
        // Room for every party of a round plus as many stragglers of the
        // previous round still holding their slots.
        let slot_count = self.parties.saturating_mul(2).min(MAX_SLOTS);
        let shm = SharedMemory::new(SLOTS_OFFSET + slot_count as usize * size_of::<Presence>())?;
        let mutex_error = |source| ShmError::Io {
            op: "pthread_mutex_init",
            source,
        };
        let slots = shm.region::<Presence>(SLOTS_OFFSET)?.as_ptr();
        for i in 0..slot_count as usize {
            // SAFETY: the slots lie inside the fresh segment (sized above),
            // aligned (region checked the first; the size is a multiple of
            // the alignment), and nobody else can see them yet.
            unsafe { Presence::init_at(slots.add(i)).map_err(mutex_error)? };
        }
        // SAFETY: init_at writes every field of the fresh state; the slot
        // count is written before the tag is published (by init_at's end).
        let state = unsafe {
            Shared::create_in(shm, 0, |ptr| {
                BarrierState::init_at(ptr, self.parties).map_err(mutex_error)?;
                (&raw mut (*ptr).slot_count).write(slot_count);
                Ok(())
            })?
        };
        Ok(Barrier {
            state,
            action: self.action,
            timeout: self.timeout,
        })
    }
}

impl Barrier {
    /// A barrier for `parties` parties, without action or timeout.
    pub fn new(parties: u32) -> Result<Self, BarrierError> {
        Self::builder(parties).build()
    }

    /// A builder, to add an action or a default timeout.
    pub fn builder(parties: u32) -> BarrierBuilder {
        BarrierBuilder {
            parties,
            action: None,
            timeout: None,
        }
    }

    /// Waits until all parties have called `wait` (for at most the default
    /// timeout, if any). Returns this party's arrival index, `0..parties`.
    pub fn wait(&self) -> Result<u32, BarrierError> {
        self.wait_until(self.timeout)
    }

    /// [`wait`](Self::wait) with this timeout instead of the default one.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<u32, BarrierError> {
        self.wait_until(Some(timeout))
    }

    fn wait_until(&self, timeout: Option<Duration>) -> Result<u32, BarrierError> {
        let deadline = timeout.and_then(deadline_after);
        let action = || match self.action {
            None => Ok(()),
            // SAFETY: the id was made by `FunctionId::of_task` for a function
            // of no argument, in a process running this executable (handles
            // only travel to children of the same image), and `()` encodes as
            // no bytes.
            Some(id) => unsafe { id.call_task(&[]) }.map(drop),
        };
        self.state
            .wait(self.slots(), deadline, self.action.is_some(), action)
            .map_err(|failure| match failure {
                Failure::Broken => BarrierError::Broken,
                Failure::TimedOut => BarrierError::Timeout(timeout.unwrap_or_default()),
                Failure::Action(error) => BarrierError::ActionFailed(error),
            })
    }

    /// The presence slots after the state (none if the segment is too
    /// small for the count it claims, which only a corrupted segment does).
    fn slots(&self) -> &[Presence] {
        let count = self.state.slot_count as usize;
        let shm = self.state.shm();
        let fits = count
            .checked_mul(size_of::<Presence>())
            .and_then(|bytes| bytes.checked_add(SLOTS_OFFSET))
            .is_some_and(|end| end <= shm.len());
        match shm.region::<Presence>(SLOTS_OFFSET) {
            // SAFETY: the whole range is inside the mapping (checked) and
            // aligned (region); the slots were initialised at creation and
            // are only used through atomics and the pthread API; the mapping
            // lives as long as `self.state`.
            Ok(first) if fits && count > 0 => unsafe {
                std::slice::from_raw_parts(first.as_ptr(), count)
            },
            _ => &[],
        }
    }

    /// Breaks the barrier: current and future waiters get
    /// [`BarrierError::Broken`] until [`reset`](Self::reset).
    pub fn abort(&self) {
        self.state.abort();
    }

    /// Returns the barrier to its initial state; parties waiting now get
    /// [`BarrierError::Broken`].
    pub fn reset(&self) {
        self.state.reset();
    }

    /// Whether the barrier is broken.
    pub fn broken(&self) -> bool {
        self.state.broken()
    }

    /// How many parties are waiting now.
    pub fn n_waiting(&self) -> u32 {
        self.state.n_waiting()
    }

    /// How many parties must arrive to release the barrier.
    pub fn parties(&self) -> u32 {
        self.state.parties
    }
}

impl fmt::Debug for Barrier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Barrier")
            .field("parties", &self.parties())
            .field("n_waiting", &self.n_waiting())
            .field("broken", &self.broken())
            .field("timeout", &self.timeout)
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn zero_parties_is_an_error() {
        assert!(matches!(Barrier::new(0), Err(BarrierError::NoParties)));
    }

    #[test]
    fn a_single_party_passes_and_runs_the_action() {
        let barrier = Barrier::builder(1).action(|| {}).build().unwrap();
        assert_eq!(barrier.wait().unwrap(), 0);
        assert_eq!(barrier.wait().unwrap(), 0);
        assert_eq!(barrier.parties(), 1);
    }

    #[test]
    fn timeout_breaks_and_reset_repairs() {
        let barrier = Barrier::new(2).unwrap();
        let timeout = Duration::from_millis(20);
        let start = Instant::now();
        assert!(
            matches!(barrier.wait_timeout(timeout), Err(BarrierError::Timeout(t)) if t == timeout)
        );
        assert!(start.elapsed() >= timeout);
        assert!(barrier.broken());
        assert!(matches!(barrier.wait(), Err(BarrierError::Broken)));
        barrier.reset();
        assert!(!barrier.broken());
        assert_eq!(barrier.n_waiting(), 0);
    }

    #[test]
    fn a_timeout_while_watching_other_parties_breaks_the_barrier() {
        // Three parties, two come: the second watches the first (futex_waitv
        // with a deadline); whoever times out first breaks the barrier.
        let barrier = Barrier::new(3).unwrap();
        let timeout = Duration::from_millis(50);
        let start = Instant::now();
        let outcomes: Vec<_> = std::thread::scope(|s| {
            let waiters: Vec<_> = (0..2)
                .map(|_| s.spawn(|| barrier.wait_timeout(timeout)))
                .collect();
            waiters.into_iter().map(|w| w.join().unwrap()).collect()
        });
        assert!(start.elapsed() >= timeout);
        assert!(
            outcomes
                .iter()
                .any(|o| matches!(o, Err(BarrierError::Timeout(_))))
        );
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Err(BarrierError::Timeout(_) | BarrierError::Broken)))
        );
        assert!(barrier.broken());
    }

    #[test]
    fn a_panicking_action_breaks_the_barrier() {
        let barrier = Barrier::builder(1)
            .action(|| panic!("action failed"))
            .build()
            .unwrap();
        match barrier.wait() {
            Err(BarrierError::ActionFailed(TaskFailure::Panicked(report))) => {
                assert_eq!(report.message, "action failed")
            }
            other => panic!("expected the action's panic, got {other:?}"),
        }
        assert!(barrier.broken());
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::{BarrierState, Failure};
    use loom::sync::Arc;
    use std::mem::MaybeUninit;

    fn state(parties: u32) -> Arc<BarrierState> {
        let mut slot = Box::new(MaybeUninit::<BarrierState>::uninit());
        // SAFETY: a fresh, exclusively owned allocation.
        unsafe { BarrierState::init_at(slot.as_mut_ptr(), parties).unwrap() };
        // SAFETY: init_at initialised every field.
        Arc::new(*unsafe { slot.assume_init() })
    }

    /// Two parties meet twice: indices are {0, 1} in each round and nobody
    /// sleeps through a release.
    #[test]
    fn loom_barrier_two_rounds() {
        crate::futex::model(|| {
            let barrier = state(2);
            let other = {
                let barrier = Arc::clone(&barrier);
                loom::thread::spawn(move || {
                    let a = barrier.wait(&[], None, false, || Ok::<(), ()>(())).unwrap();
                    let b = barrier.wait(&[], None, false, || Ok::<(), ()>(())).unwrap();
                    (a, b)
                })
            };
            let a = barrier.wait(&[], None, false, || Ok::<(), ()>(())).unwrap();
            let b = barrier.wait(&[], None, false, || Ok::<(), ()>(())).unwrap();
            let (oa, ob) = other.join().unwrap();
            assert_eq!(a + oa, 1);
            assert_eq!(b + ob, 1);
        });
    }

    /// abort while a party waits: the waiter is released with Broken.
    #[test]
    fn loom_barrier_abort_releases() {
        crate::futex::model(|| {
            let barrier = state(2);
            let waiter = {
                let barrier = Arc::clone(&barrier);
                loom::thread::spawn(move || barrier.wait(&[], None, false, || Ok::<(), ()>(())))
            };
            barrier.abort();
            assert_eq!(waiter.join().unwrap(), Err(Failure::Broken));
        });
    }
}
