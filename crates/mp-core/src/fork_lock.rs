//! The locks that the forking thread holds across `fork()` (see `fork`): std's, not
//! parking_lot's.
//!
//! parking_lot queues the threads that wait for a lock in a table shared by the whole
//! process. A forked child inherits that table as it was, listing threads that do not exist
//! in the child; releasing a lock there can hand it to one of them (parking_lot's fair
//! hand-off, which it does from time to time), and then nothing in the child can take it
//! again: a fork-started child hung in its first `start` (seen in the test that forks while
//! another thread starts children). std's futex-based locks keep all their state in the
//! lock's own word, so the forking thread releases them in the child cleanly, whoever was
//! waiting in the parent.
//!
//! A panic while one is held (mp-core's bug) must not wedge every later start, so poisoning
//! is ignored: each critical section leaves the data consistent at every step.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `lock`, ignoring poisoning.
pub(crate) fn lock<T>(lock: &Mutex<T>) -> MutexGuard<'_, T> {
    lock.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Locks `lock` for reading, ignoring poisoning.
pub(crate) fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Locks `lock` for writing, ignoring poisoning.
pub(crate) fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}
