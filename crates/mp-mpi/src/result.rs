//! [`MpiAsyncResult`]: the handle of a task submitted with `apply_async`, `submit` or
//! `map_async` (Python's `AsyncResult`), with the same semantics as `mp_pool::AsyncResult`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::backoff;
use crate::error::MpiPoolError;

type SuccessCallback<T> = Box<dyn FnOnce(&T) + Send>;
type ErrorCallback = Box<dyn FnOnce(&MpiPoolError) + Send>;

enum State<T> {
    Pending {
        on_success: Option<SuccessCallback<T>>,
        on_error: Option<ErrorCallback>,
    },
    Ready(Result<T, MpiPoolError>),
    /// The value was moved out by `get`.
    Taken,
}

/// Where a job's outcome lands: filled once by the dispatcher, read by an [`MpiAsyncResult`].
pub(crate) struct Completion<T> {
    state: Mutex<State<T>>,
    ready: Condvar,
    /// Set with the outcome, for waiters polling before they sleep.
    done: AtomicBool,
}

impl<T> Completion<T> {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Completion {
            state: Mutex::new(State::Pending {
                on_success: None,
                on_error: None,
            }),
            ready: Condvar::new(),
            done: AtomicBool::new(false),
        })
    }

    /// Stores the outcome (the first one wins), wakes waiters and runs the matching callback
    /// (under this completion's lock, which only the handle could contend for).
    pub(crate) fn complete(&self, outcome: Result<T, MpiPoolError>) {
        let mut state = self.state.lock();
        let State::Pending {
            on_success,
            on_error,
        } = &mut *state
        else {
            return;
        };
        let (on_success, on_error) = (on_success.take(), on_error.take());
        *state = State::Ready(outcome);
        self.done.store(true, Ordering::Release);
        self.ready.notify_all();
        if let State::Ready(outcome) = &*state {
            match (outcome, on_success, on_error) {
                (Ok(value), Some(callback), _) => callback(value),
                (Err(error), _, Some(callback)) => callback(error),
                _ => {}
            }
        }
    }
}

/// The eventual outcome of a task or of a whole `map_async` on an [`MpiPool`](crate::MpiPool).
///
/// It does not keep the pool alive: if the pool is terminated or dropped first, the result
/// becomes [`MpiPoolError::Terminated`].
pub struct MpiAsyncResult<T> {
    completion: Arc<Completion<T>>,
}

impl<T> fmt::Debug for MpiAsyncResult<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MpiAsyncResult")
            .field("ready", &self.ready())
            .finish()
    }
}

impl<T> MpiAsyncResult<T> {
    pub(crate) fn new(completion: Arc<Completion<T>>) -> Self {
        MpiAsyncResult { completion }
    }

    /// Calls `callback` with the value when the task succeeds (Python's `callback=`). It runs
    /// on rank 0's dispatcher thread when the result arrives, or right here if it is already
    /// there; like Python's, it must return quickly (no other result is delivered
    /// meanwhile) and must not join or drop the pool (the dispatcher would wait for itself).
    #[must_use = "the result is returned so that its value can still be read"]
    pub fn callback(self, callback: impl FnOnce(&T) + Send + 'static) -> Self {
        {
            let mut state = self.completion.state.lock();
            match &mut *state {
                State::Pending { on_success, .. } => *on_success = Some(Box::new(callback)),
                State::Ready(Ok(value)) => callback(value),
                State::Ready(Err(_)) | State::Taken => {}
            }
        }
        self
    }

    /// Calls `callback` with the error when the task fails (Python's `error_callback=`),
    /// under the same rules as [`callback`](Self::callback).
    #[must_use = "the result is returned so that its outcome can still be read"]
    pub fn error_callback(self, callback: impl FnOnce(&MpiPoolError) + Send + 'static) -> Self {
        {
            let mut state = self.completion.state.lock();
            match &mut *state {
                State::Pending { on_error, .. } => *on_error = Some(Box::new(callback)),
                State::Ready(Err(error)) => callback(error),
                State::Ready(Ok(_)) | State::Taken => {}
            }
        }
        self
    }

    /// Whether the outcome is known.
    pub fn ready(&self) -> bool {
        !matches!(*self.completion.state.lock(), State::Pending { .. })
    }

    /// `Some(true)` if the task succeeded, `Some(false)` if it failed, `None` while it runs.
    pub fn successful(&self) -> Option<bool> {
        match &*self.completion.state.lock() {
            State::Pending { .. } => None,
            State::Ready(outcome) => Some(outcome.is_ok()),
            State::Taken => Some(true),
        }
    }

    /// Waits until the outcome is known.
    pub fn wait(&self) {
        self.wait_until(None);
    }

    /// Waits at most `timeout` for the outcome; returns whether it is known.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        self.wait_until(Some(Instant::now() + timeout))
    }

    fn wait_until(&self, deadline: Option<Instant>) -> bool {
        // Poll briefly before sleeping: a result often comes within microseconds, and waking
        // a sleeping thread costs more than that.
        backoff::spin_until(|| self.completion.done.load(Ordering::Acquire), deadline);
        let mut state = self.completion.state.lock();
        while matches!(*state, State::Pending { .. }) {
            match deadline {
                None => self.completion.ready.wait(&mut state),
                Some(deadline) => {
                    if self
                        .completion
                        .ready
                        .wait_until(&mut state, deadline)
                        .timed_out()
                    {
                        return !matches!(*state, State::Pending { .. });
                    }
                }
            }
        }
        true
    }

    /// Waits for the outcome and returns it. The value is moved out: a second `get` after a
    /// success returns [`MpiPoolError::AlreadyTaken`]; an error is returned every time.
    pub fn get(&self) -> Result<T, MpiPoolError> {
        self.wait();
        self.take()
    }

    /// [`get`](Self::get), giving up after `timeout` with [`MpiPoolError::Timeout`] (the
    /// task goes on; `get` can be called again).
    pub fn get_timeout(&self, timeout: Duration) -> Result<T, MpiPoolError> {
        if !self.wait_timeout(timeout) {
            return Err(MpiPoolError::Timeout);
        }
        self.take()
    }

    fn take(&self) -> Result<T, MpiPoolError> {
        let mut state = self.completion.state.lock();
        match std::mem::replace(&mut *state, State::Taken) {
            State::Ready(Ok(value)) => Ok(value),
            State::Ready(Err(error)) => {
                *state = State::Ready(Err(error.clone()));
                Err(error)
            }
            State::Taken => Err(MpiPoolError::AlreadyTaken),
            State::Pending { .. } => unreachable!("take is only called once the outcome is known"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn callbacks_run_once_before_or_after_completion() {
        let calls = Arc::new(AtomicUsize::new(0));
        let before = Completion::<u32>::new();
        let counter = calls.clone();
        let early = MpiAsyncResult::new(before.clone()).callback(move |v| {
            assert_eq!(*v, 5);
            counter.fetch_add(1, Ordering::SeqCst);
        });
        before.complete(Ok(5));
        before.complete(Ok(6));
        assert_eq!(early.get(), Ok(5));
        assert_eq!(early.get(), Err(MpiPoolError::AlreadyTaken));
        let after = Completion::<u32>::new();
        after.complete(Err(MpiPoolError::Terminated));
        let counter = calls.clone();
        let late = MpiAsyncResult::new(after).error_callback(move |e| {
            assert_eq!(*e, MpiPoolError::Terminated);
            counter.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(late.successful(), Some(false));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn get_timeout_loses_nothing() {
        let completion = Completion::<u32>::new();
        let result = MpiAsyncResult::new(completion.clone());
        assert_eq!(
            result.get_timeout(Duration::from_millis(10)),
            Err(MpiPoolError::Timeout)
        );
        assert!(!result.ready());
        completion.complete(Ok(1));
        assert_eq!(result.get_timeout(Duration::from_secs(5)), Ok(1));
    }
}
