//! [`Condition`]: wait for a change that another process or thread announces.
//!
//! ```
//! use mp_ipc::condition::Condition;
//! use mp_ipc::value::Value;
//! use std::time::Duration;
//!
//! let ready = Value::new(0u32)?;
//! let cond = Condition::with_lock(ready.get_lock())?;
//! std::thread::scope(|s| {
//!     s.spawn(|| {
//!         *ready.lock().unwrap() = 1;
//!         cond.notify_all();
//!     });
//!     // Waits with the Value's own guard: the lock is released while asleep.
//!     let guard = cond
//!         .wait_for_timeout(ready.lock().unwrap(), Duration::from_secs(10), |v| **v == 1)
//!         .unwrap();
//!     assert_eq!(*guard, 1);
//! });
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Each waiter takes a slot in shared memory with its own futex word;
//! `notify(n)` marks the `n` oldest waiting slots and wakes exactly those
//! threads, so exactly `min(n, waiting)` waiters return, a waiter that arrives
//! later cannot take a notification meant for an earlier one, and a waiter
//! that times out never absorbs one. A slot left by a killed process is
//! reclaimed.
//!
//! There is no limit on waiters: beyond the 256 slots, further waiters share
//! an *overflow* count. `notify(n)` first serves the slots (oldest first),
//! then hands what is left of `n` to the overflow as tokens, at most one per
//! overflow waiter, and wakes that many; each token is taken by exactly one
//! overflow waiter (a waiter timing out takes one if any is left, so none is
//! absorbed), so the count stays exact. Among overflow waiters the order is
//! unspecified, and they are served after the slot waiters. (An overflow
//! waiter killed while waiting is not reclaimed: a later notification may be
//! counted for it.)

use std::fmt;
use std::io;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::futex::{self, AtomicU32, WaitOutcome};
use crate::lock::sealed::{ConditionLock as _, Held};
use crate::lock::{ConditionLock, Guard, Lock, LockError, RLock, deadline_after};
use crate::robust::{Acquired, RobustMutex};
use crate::shm::{Shared, ShmError, ShmState, tag};

/// Why a wait on a [`Condition`] did not end with a notification.
///
/// Every variant but [`Os`](WaitError::Os) hands the guard back: the lock is
/// held again.
#[derive(thiserror::Error)]
pub enum WaitError<G> {
    /// No notification came in time (the lock is held again).
    #[error("timed out waiting on the condition")]
    Timeout(G),
    /// Re-acquiring the lock found that its previous holder died; the lock is
    /// held, the protected data may be inconsistent.
    #[error("the previous owner of the condition's lock died while holding it")]
    OwnerDied(G),
    /// The guard holds another lock than the condition's; nothing waited.
    #[error("the guard does not hold this condition's lock")]
    WrongLock(G),
    /// Re-acquiring the lock failed; the lock is not held.
    #[error("re-acquiring the condition's lock failed: {0}")]
    Os(#[source] io::Error),
}

impl<G> WaitError<G> {
    /// The guard, unless the lock could not be re-acquired.
    pub fn into_guard(self) -> Option<G> {
        match self {
            WaitError::Timeout(g) | WaitError::OwnerDied(g) | WaitError::WrongLock(g) => Some(g),
            WaitError::Os(_) => None,
        }
    }
}

impl<G> fmt::Debug for WaitError<G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitError::Timeout(_) => f.write_str("Timeout(..)"),
            WaitError::OwnerDied(_) => f.write_str("OwnerDied(..)"),
            WaitError::WrongLock(_) => f.write_str("WrongLock(..)"),
            WaitError::Os(error) => f.debug_tuple("Os").field(error).finish(),
        }
    }
}

/// Number of waiter slots (small under loom to keep the model tractable).
const SLOTS: usize = if cfg!(loom) { 2 } else { 256 };

/// Where a waiter waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ticket {
    /// In slot `n`, with its own futex word.
    Slot(usize),
    /// In the overflow (every slot was taken).
    Overflow,
}

/// Slot states; the state word is also the slot's futex word.
const FREE: u32 = 0;
const WAITING: u32 = 1;
const NOTIFIED: u32 = 2;

#[repr(C)]
struct Slot {
    state: AtomicU32,
    /// Process of the waiter, to reclaim the slot if it dies.
    pid: AtomicU32,
    /// Arrival number, to notify the oldest waiters first.
    seq: AtomicU32,
}

impl Slot {
    fn new() -> Self {
        Slot {
            state: AtomicU32::new(FREE),
            pid: AtomicU32::new(0),
            seq: AtomicU32::new(0),
        }
    }
}

/// The waiter slots as laid out in shared memory.
#[repr(C)]
pub(crate) struct CondState {
    tag: u64,
    /// Serialises slot allocation and notification (never held across user
    /// code or sleeps).
    mutex: RobustMutex,
    next_seq: AtomicU32,
    /// Waiters without a slot (all were taken when they came).
    overflow_waiting: AtomicU32,
    /// Notifications handed to overflow waiters and not yet taken.
    overflow_tokens: AtomicU32,
    /// Futex word of the overflow waiters: bumped when tokens are handed out.
    overflow_seq: AtomicU32,
    slots: [Slot; SLOTS],
}

// SAFETY: repr(C), starts with the tag; mutated only through atomics and the
// pthread API.
unsafe impl ShmState for CondState {
    const TAG: u64 = tag(b"mp:Cond\0");
    const KIND: &'static str = "Condition";
}

/// Holds the internal mutex of a [`CondState`].
struct Bookkeeping<'a>(&'a RobustMutex);

impl Drop for Bookkeeping<'_> {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

fn alive(pid: u32) -> bool {
    #[cfg(loom)]
    {
        let _ = pid;
        true
    }
    #[cfg(not(loom))]
    {
        if pid == std::process::id() {
            return true;
        }
        let Some(pid) = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        else {
            return false;
        };
        // ESRCH: gone. EPERM: exists (another user's process).
        !matches!(
            rustix::process::test_kill_process(pid),
            Err(rustix::io::Errno::SRCH)
        )
    }
}

impl CondState {
    /// Initialises a state at `ptr`.
    ///
    /// # Safety
    /// `ptr` is valid for writes of a `CondState` and not yet shared.
    pub(crate) unsafe fn init_at(ptr: *mut CondState) -> io::Result<()> {
        // SAFETY: per the contract, every field is written through `ptr`
        // before anybody else can see it.
        unsafe {
            RobustMutex::init_at(&raw mut (*ptr).mutex, false)?;
            (&raw mut (*ptr).next_seq).write(AtomicU32::new(0));
            (&raw mut (*ptr).overflow_waiting).write(AtomicU32::new(0));
            (&raw mut (*ptr).overflow_tokens).write(AtomicU32::new(0));
            (&raw mut (*ptr).overflow_seq).write(AtomicU32::new(0));
            (&raw mut (*ptr).slots).write(std::array::from_fn(|_| Slot::new()));
            (&raw mut (*ptr).tag).write(Self::TAG);
        }
        Ok(())
    }

    fn bookkeeping(&self) -> Bookkeeping<'_> {
        match self.mutex.lock(None) {
            // After OwnerDied the slots are still well-formed (every update is
            // a single atomic store); carry on.
            Ok(Acquired::Clean | Acquired::OwnerDied) => {}
            Err(error) => tracing::error!(?error, "condition bookkeeping lock failed; continuing"),
        }
        Bookkeeping(&self.mutex)
    }

    /// Registers the calling thread as a waiter: in a slot if one is free,
    /// else in the overflow.
    pub(crate) fn enqueue(&self) -> Ticket {
        let _held = self.bookkeeping();
        let Some(index) = self.free_slot().or_else(|| {
            self.reclaim_dead();
            self.free_slot()
        }) else {
            self.overflow_waiting.fetch_add(1, Ordering::Relaxed);
            return Ticket::Overflow;
        };
        let slot = &self.slots[index];
        slot.pid.store(std::process::id(), Ordering::Relaxed);
        slot.seq.store(
            self.next_seq.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        slot.state.store(WAITING, Ordering::Release);
        Ticket::Slot(index)
    }

    /// Sleeps until notified or `deadline`, then leaves; true if notified.
    pub(crate) fn wait(&self, ticket: Ticket, deadline: Option<Instant>) -> bool {
        match ticket {
            Ticket::Slot(index) => {
                self.sleep(index, deadline);
                self.finish(index)
            }
            Ticket::Overflow => self.wait_in_overflow(deadline),
        }
    }

    /// An overflow waiter: takes a token when one is handed out, or leaves at
    /// `deadline` (taking a token if one is left, so none is absorbed).
    fn wait_in_overflow(&self, deadline: Option<Instant>) -> bool {
        loop {
            let seen = {
                let _held = self.bookkeeping();
                let tokens = self.overflow_tokens.load(Ordering::Relaxed);
                let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
                if tokens > 0 || timed_out {
                    if tokens > 0 {
                        self.overflow_tokens.store(tokens - 1, Ordering::Relaxed);
                    }
                    self.overflow_waiting.fetch_sub(1, Ordering::Relaxed);
                    return tokens > 0;
                }
                self.overflow_seq.load(Ordering::Relaxed)
            };
            // Tokens are handed out with the bookkeeping held and then the
            // word bumped: a hand-out after our check changes the word, so
            // this returns at once.
            // Any outcome: the check above decides (a timeout included).
            let _ = futex::wait(&self.overflow_seq, seen, deadline);
        }
    }

    /// Hands up to `n` notifications to overflow waiters (bookkeeping held);
    /// returns how many.
    fn notify_overflow(&self, n: usize) -> usize {
        let waiting = self.overflow_waiting.load(Ordering::Relaxed);
        let tokens = self.overflow_tokens.load(Ordering::Relaxed);
        let give = (waiting.saturating_sub(tokens) as usize).min(n) as u32;
        if give > 0 {
            self.overflow_tokens.store(tokens + give, Ordering::Relaxed);
            self.overflow_seq.fetch_add(1, Ordering::Release);
            futex::wake(&self.overflow_seq, give);
        }
        give as usize
    }

    fn free_slot(&self) -> Option<usize> {
        self.slots
            .iter()
            .position(|slot| slot.state.load(Ordering::Acquire) == FREE)
    }

    /// Frees the slots of dead processes (bookkeeping held).
    fn reclaim_dead(&self) {
        for slot in &self.slots {
            let state = slot.state.load(Ordering::Acquire);
            if state != FREE && !alive(slot.pid.load(Ordering::Relaxed)) {
                let _ =
                    slot.state
                        .compare_exchange(state, FREE, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
    }

    /// Sleeps on slot `index` until notified or `deadline`.
    pub(crate) fn sleep(&self, index: usize, deadline: Option<Instant>) {
        let slot = &self.slots[index];
        while slot.state.load(Ordering::Acquire) == WAITING {
            if futex::wait(&slot.state, WAITING, deadline) == WaitOutcome::TimedOut {
                return;
            }
        }
    }

    /// Leaves slot `index`; true if it had been notified.
    pub(crate) fn finish(&self, index: usize) -> bool {
        let slot = &self.slots[index];
        match slot
            .state
            .compare_exchange(WAITING, FREE, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => false,
            Err(_) => {
                slot.state.store(FREE, Ordering::Release);
                true
            }
        }
    }

    /// Notifies the `n` oldest live waiters; returns how many.
    pub(crate) fn notify(&self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        let _held = self.bookkeeping();
        let now = self.next_seq.load(Ordering::Relaxed);
        let mut woken = 0;
        while woken < n {
            let oldest = self
                .slots
                .iter()
                .filter(|slot| slot.state.load(Ordering::Acquire) == WAITING)
                .max_by_key(|slot| now.wrapping_sub(slot.seq.load(Ordering::Relaxed)));
            let Some(slot) = oldest else { break };
            woken += usize::from(self.notify_slot(slot));
        }
        woken + self.notify_overflow(n - woken)
    }

    /// Notifies every waiter; returns how many.
    pub(crate) fn notify_all(&self) -> usize {
        let _held = self.bookkeeping();
        let slots: usize = self
            .slots
            .iter()
            .filter(|slot| slot.state.load(Ordering::Acquire) == WAITING)
            .map(|slot| usize::from(self.notify_slot(slot)))
            .sum();
        slots + self.notify_overflow(usize::MAX)
    }

    /// Marks a waiting slot notified and wakes its thread; false if the
    /// waiter just left or is dead (its slot is then freed).
    fn notify_slot(&self, slot: &Slot) -> bool {
        if !alive(slot.pid.load(Ordering::Relaxed)) {
            let _ = slot
                .state
                .compare_exchange(WAITING, FREE, Ordering::AcqRel, Ordering::Relaxed);
            return false;
        }
        if slot
            .state
            .compare_exchange(WAITING, NOTIFIED, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return false; // timed out meanwhile
        }
        futex::wake(&slot.state, 1);
        true
    }
}

/// A condition variable (Python's `multiprocessing.Condition`), bound to a
/// [`Lock`] (the default) or an [`RLock`] (Python's default; see
/// [`Condition::with_rlock`]).
///
/// Clones, and copies passed to child processes, are the same condition.
/// Notifying does not require holding the lock (as with std's `Condvar`), but
/// to avoid missing a wake-up, change the awaited state under the lock.
#[derive(Clone, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Condition<L: ConditionLock = Lock> {
    lock: L,
    state: Shared<CondState>,
}

impl<L: ConditionLock> Condition<L> {
    fn bound_to(lock: &L) -> Result<Self, ShmError> {
        // SAFETY: init_at writes every field of the fresh state.
        let state = unsafe {
            Shared::create(|ptr| {
                CondState::init_at(ptr).map_err(|source| ShmError::Io {
                    op: "pthread_mutex_init",
                    source,
                })
            })?
        };
        // The internal mutex is never held outside `&self` methods, so the
        // segment cannot be unmapped while it is held: no need to track it.
        Ok(Self {
            lock: lock.clone(),
            state,
        })
    }
}

impl Condition<Lock> {
    /// A condition with a new lock of its own.
    pub fn new() -> Result<Self, ShmError> {
        Self::with_lock(&Lock::new()?)
    }

    /// A condition bound to `lock` (e.g. a [`Value`](crate::value::Value)'s
    /// lock, to wait with the Value's guard).
    pub fn with_lock(lock: &Lock) -> Result<Self, ShmError> {
        Self::bound_to(lock)
    }
}

impl Condition<RLock> {
    /// A condition bound to `rlock`. Waiting releases *every* acquisition
    /// the waiting thread holds and restores them all before returning, as
    /// Python does.
    pub fn with_rlock(rlock: &RLock) -> Result<Self, ShmError> {
        Self::bound_to(rlock)
    }
}

impl<L: ConditionLock> Condition<L> {
    /// The lock this condition is bound to.
    pub fn get_lock(&self) -> &L {
        &self.lock
    }

    /// Acquires the lock (see [`Lock::lock`] and [`RLock::lock`]).
    #[allow(clippy::type_complexity)]
    pub fn lock(&self) -> Result<L::Guard<'_>, LockError<L::Guard<'_>>> {
        self.lock.lock_guard()
    }

    /// Releases the lock held by `guard`, sleeps until notified, and
    /// re-acquires the lock.
    pub fn wait<G: Guard>(&self, guard: G) -> Result<G, WaitError<G>> {
        self.wait_until(guard, None)
    }

    /// [`wait`](Self::wait), for at most `timeout` ([`WaitError::Timeout`]).
    pub fn wait_timeout<G: Guard>(&self, guard: G, timeout: Duration) -> Result<G, WaitError<G>> {
        self.wait_until(guard, deadline_after(timeout))
    }

    /// Waits until `predicate` (called with the lock held) is true.
    pub fn wait_for<G: Guard>(
        &self,
        mut guard: G,
        mut predicate: impl FnMut(&mut G) -> bool,
    ) -> Result<G, WaitError<G>> {
        while !predicate(&mut guard) {
            guard = self.wait(guard)?;
        }
        Ok(guard)
    }

    /// [`wait_for`](Self::wait_for), for at most `timeout` in total; on
    /// [`WaitError::Timeout`] the predicate was still false.
    pub fn wait_for_timeout<G: Guard>(
        &self,
        mut guard: G,
        timeout: Duration,
        mut predicate: impl FnMut(&mut G) -> bool,
    ) -> Result<G, WaitError<G>> {
        let deadline = deadline_after(timeout);
        while !predicate(&mut guard) {
            guard = match self.wait_until(guard, deadline) {
                Err(WaitError::Timeout(mut guard)) => {
                    return if predicate(&mut guard) {
                        Ok(guard)
                    } else {
                        Err(WaitError::Timeout(guard))
                    };
                }
                other => other?,
            };
        }
        Ok(guard)
    }

    fn wait_until<G: Guard>(&self, guard: G, deadline: Option<Instant>) -> Result<G, WaitError<G>> {
        let held_id = match guard.held() {
            Held::Lock(lock) => lock.id(),
            Held::RLock(rlock) => rlock.lock_id(),
        };
        if held_id != self.lock.lock_id() {
            return Err(WaitError::WrongLock(guard));
        }
        let ticket = self.state.enqueue();
        // Registered before the lock is released: a notifier that takes the
        // lock after us sees us.
        let depth = release_all(&guard);
        let notified = self.state.wait(ticket, deadline);
        match reacquire(&guard, depth) {
            Ok(Acquired::Clean) if notified => Ok(guard),
            Ok(Acquired::Clean) => Err(WaitError::Timeout(guard)),
            Ok(Acquired::OwnerDied) => Err(WaitError::OwnerDied(guard)),
            Err(error) => {
                // The lock is not held: the guard must not release it.
                std::mem::forget(guard);
                Err(WaitError::Os(io::Error::other(format!("{error:?}"))))
            }
        }
    }

    /// Wakes exactly `min(n, waiting)` waiters, oldest first; returns how many.
    pub fn notify(&self, n: usize) -> usize {
        self.state.notify(n)
    }

    /// Wakes every waiter; returns how many.
    pub fn notify_all(&self) -> usize {
        self.state.notify_all()
    }
}

/// The mutex a guard holds.
fn mutex_of<G: Guard>(guard: &G) -> &RobustMutex {
    match guard.held() {
        Held::Lock(lock) => lock.raw(),
        Held::RLock(rlock) => rlock.raw(),
    }
}

/// Releases the guard's lock completely (every acquisition of an RLock by
/// this thread); returns how many acquisitions were released.
fn release_all<G: Guard>(guard: &G) -> u32 {
    let recursive = matches!(guard.held(), Held::RLock(_));
    let mutex = mutex_of(guard);
    let mut depth = 0;
    // An unlock fails (EPERM) once this thread no longer holds it, also when
    // another thread took it meanwhile.
    while mutex.unlock().is_ok() {
        depth += 1;
        if !recursive {
            break;
        }
    }
    depth
}

/// Takes the lock again, `depth` times (at least once: the guard holds one).
fn reacquire<G: Guard>(guard: &G, depth: u32) -> Result<Acquired, crate::robust::LockFailed> {
    let mutex = mutex_of(guard);
    let first = mutex.lock(None)?;
    for _ in 1..depth {
        // Recursive and held by this thread: returns at once.
        mutex.lock(None)?;
    }
    Ok(first)
}

impl<L: ConditionLock> fmt::Debug for Condition<L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Condition")
            .field("lock", &self.lock)
            .finish_non_exhaustive()
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn wait_timeout_times_out_with_the_lock_held() {
        let cond = Condition::new().unwrap();
        let guard = cond.lock().unwrap();
        let timeout = Duration::from_millis(20);
        let start = Instant::now();
        let guard = match cond.wait_timeout(guard, timeout) {
            Err(WaitError::Timeout(guard)) => guard,
            other => panic!("expected a timeout, got {other:?}"),
        };
        assert!(start.elapsed() >= timeout);
        assert!(matches!(
            cond.get_lock().try_lock(),
            Err(LockError::Deadlock)
        ));
        drop(guard);
    }

    #[test]
    fn wrong_lock_is_refused() {
        let cond = Condition::new().unwrap();
        let other = Lock::new().unwrap();
        let guard = other.lock().unwrap();
        assert!(matches!(cond.wait(guard), Err(WaitError::WrongLock(_))));
    }

    #[test]
    fn an_rlock_condition_releases_every_level_while_waiting() {
        use std::sync::atomic::AtomicU32;
        let rlock = RLock::new().unwrap();
        let cond = Condition::with_rlock(&rlock).unwrap();
        let flag = AtomicU32::new(0);
        let outer = cond.lock().unwrap();
        let inner = rlock.lock().unwrap(); // held twice by this thread
        std::thread::scope(|s| {
            s.spawn(|| {
                // Free only once the waiter has released both levels.
                let guard = rlock.lock_timeout(Duration::from_secs(20)).unwrap();
                flag.store(1, Ordering::Relaxed);
                assert_eq!(cond.notify_all(), 1);
                drop(guard);
            });
            let inner = cond
                .wait_for_timeout(inner, Duration::from_secs(20), |_| {
                    flag.load(Ordering::Relaxed) == 1
                })
                .unwrap();
            assert!(rlock.is_owned());
            drop(inner);
        });
        // Both levels were restored: one is still held after dropping one.
        assert!(rlock.is_owned());
        drop(outer);
        assert!(!rlock.locked());
    }

    #[test]
    fn an_rlock_guard_is_not_a_lock_guard() {
        let cond = Condition::new().unwrap();
        let rlock = RLock::new().unwrap();
        let guard = rlock.lock().unwrap();
        assert!(matches!(cond.wait(guard), Err(WaitError::WrongLock(_))));
    }

    #[test]
    fn notify_without_waiters_wakes_nobody() {
        let cond = Condition::new().unwrap();
        assert_eq!(cond.notify(3), 0);
        assert_eq!(cond.notify_all(), 0);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::{CondState, SLOTS, Ticket};
    use loom::sync::Arc;
    use std::mem::MaybeUninit;

    fn state() -> Arc<CondState> {
        let mut slot = Box::new(MaybeUninit::<CondState>::uninit());
        // SAFETY: a fresh, exclusively owned allocation.
        unsafe { CondState::init_at(slot.as_mut_ptr()).unwrap() };
        // SAFETY: init_at initialised every field.
        Arc::new(*unsafe { slot.assume_init() })
    }

    /// Two waiters, notify(1) then notify(1): each notification wakes exactly
    /// one waiter, none is lost.
    #[test]
    fn loom_condition_notify_one_each() {
        assert_eq!(SLOTS, 2);
        crate::futex::model(|| {
            let cond = state();
            let tickets = [cond.enqueue(), cond.enqueue()];
            assert!(tickets.iter().all(|t| matches!(t, Ticket::Slot(_))));
            let waiters: Vec<_> = tickets
                .into_iter()
                .map(|ticket| {
                    let cond = Arc::clone(&cond);
                    loom::thread::spawn(move || assert!(cond.wait(ticket, None)))
                })
                .collect();
            assert_eq!(cond.notify(1), 1);
            assert_eq!(cond.notify(1), 1);
            assert_eq!(cond.notify(1), 0);
            for waiter in waiters {
                waiter.join().unwrap();
            }
        });
    }

    /// A waiter that times out races a notify(1): either it got the
    /// notification (and notify counted it) or it timed out (and notify
    /// counted nobody) — never both, never neither.
    #[test]
    fn loom_condition_timeout_races_notify() {
        crate::futex::model(|| {
            let cond = state();
            let ticket = cond.enqueue();
            let waiter = {
                let cond = Arc::clone(&cond);
                loom::thread::spawn(move || cond.wait(ticket, Some(std::time::Instant::now())))
            };
            let woken = cond.notify(1);
            let notified = waiter.join().unwrap();
            assert_eq!(woken, usize::from(notified));
        });
    }

    /// With the slots taken, a third waiter waits in the overflow: notify(3)
    /// counts it, and it is woken (nobody sleeps through it).
    #[test]
    fn loom_condition_overflow_is_notified() {
        crate::futex::model(|| {
            let cond = state();
            let _taken = [cond.enqueue(), cond.enqueue()];
            let ticket = cond.enqueue();
            assert_eq!(ticket, Ticket::Overflow);
            let waiter = {
                let cond = Arc::clone(&cond);
                loom::thread::spawn(move || assert!(cond.wait(ticket, None)))
            };
            assert_eq!(cond.notify(3), 3);
            assert_eq!(cond.notify_all(), 0, "everybody was notified already");
            waiter.join().unwrap();
        });
    }

    /// An overflow waiter timing out races notify(1) after the slots: the
    /// count is exact either way.
    #[test]
    fn loom_condition_overflow_timeout_races_notify() {
        crate::futex::model(|| {
            let cond = state();
            let _taken = [cond.enqueue(), cond.enqueue()];
            // Both slot waiters notified (their slots stay taken until they
            // leave): notify(1) can only go to the overflow.
            assert_eq!(cond.notify(2), 2);
            let ticket = cond.enqueue();
            let waiter = {
                let cond = Arc::clone(&cond);
                loom::thread::spawn(move || cond.wait(ticket, Some(std::time::Instant::now())))
            };
            let woken = cond.notify(1);
            let notified = waiter.join().unwrap();
            assert_eq!(woken, usize::from(notified));
        });
    }
}
