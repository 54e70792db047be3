//! [`AsyncResult`]: the handle of a task submitted with `apply_async`, `map_async` or
//! `starmap_async` (Python's `AsyncResult`).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::PoolError;
use crate::transport::SPIN;

type SuccessCallback<T> = Box<dyn FnOnce(&T) + Send>;
type ErrorCallback = Box<dyn FnOnce(&PoolError) + Send>;

enum State<T> {
    Pending {
        on_success: Option<SuccessCallback<T>>,
        on_error: Option<ErrorCallback>,
    },
    Ready(Result<T, PoolError>),
    /// The value was moved out by `get`.
    Taken,
}

/// Where a job's outcome lands: filled once by the pool, read by an [`AsyncResult`].
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

    /// Stores the outcome (the first one wins), runs the matching callback and wakes waiters.
    ///
    /// The callback runs under this completion's lock, with a reference to the value: only
    /// the `AsyncResult` (not `Clone`, consumed when a callback is attached) could contend for
    /// it, so it cannot deadlock on it.
    pub(crate) fn complete(&self, outcome: Result<T, PoolError>) {
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
        // Waiters wake now but need the lock, so they see the value after the callback; and
        // if the callback panics, the unwinding releases the lock: nobody is left waiting.
        self.ready.notify_all();
        if let State::Ready(outcome) = &*state {
            match (outcome, on_success, on_error) {
                (Ok(value), Some(callback), _) => callback(value),
                (Err(error), _, Some(callback)) => callback(error),
                _ => {}
            }
        }
    }

    pub(crate) fn is_ready(&self) -> bool {
        !matches!(*self.state.lock(), State::Pending { .. })
    }
}

/// The eventual outcome of a task or a whole `map_async` (Python's `AsyncResult`).
///
/// ```
/// use mp_pool::Pool;
///
/// let pool = Pool::new(2)?;
/// let result = pool.apply_async(|(a, b): (u32, u32)| a * b, (6, 7))?;
/// assert_eq!(result.get()?, 42);
/// assert_eq!(result.successful(), Some(true));
/// # Ok::<(), mp_pool::PoolError>(())
/// ```
///
/// It does not keep the pool alive: if the pool is terminated or dropped first, the result
/// becomes [`PoolError::Terminated`].
pub struct AsyncResult<T> {
    completion: Arc<Completion<T>>,
}

impl<T> fmt::Debug for AsyncResult<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncResult")
            .field("ready", &self.ready())
            .finish()
    }
}

impl<T> AsyncResult<T> {
    pub(crate) fn new(completion: Arc<Completion<T>>) -> Self {
        AsyncResult { completion }
    }

    /// Calls `callback` with the value when the task succeeds (Python's `callback=`).
    ///
    /// It runs on the pool's result thread as soon as the result arrives, before `get`
    /// returns it, or right here if the result is already there. Like Python's, it should
    /// return quickly and must not wait for other results of the same pool: the pool
    /// delivers no other result while it runs.
    #[must_use = "the AsyncResult is returned so that its value can still be read"]
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
    #[must_use = "the AsyncResult is returned so that its outcome can still be read"]
    pub fn error_callback(self, callback: impl FnOnce(&PoolError) + Send + 'static) -> Self {
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
        self.completion.is_ready()
    }

    /// `Some(true)` if the task succeeded, `Some(false)` if it failed, `None` while it runs
    /// (where Python raises `ValueError`).
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
        // Poll before sleeping, as the pool's links do (see `transport::SPIN`): waking from a
        // sleep costs more than the usual wait for a result while work flows.
        let start = Instant::now();
        while !self.completion.done.load(Ordering::Acquire)
            && start.elapsed() < SPIN
            && deadline.is_none_or(|d| Instant::now() < d)
        {
            std::thread::yield_now();
        }
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
    /// success returns [`PoolError::AlreadyTaken`]; an error is returned every time.
    pub fn get(&self) -> Result<T, PoolError> {
        self.wait();
        self.take()
    }

    /// [`get`](Self::get), giving up after `timeout` with [`PoolError::Timeout`] (the task
    /// goes on; `get` can be called again).
    pub fn get_timeout(&self, timeout: Duration) -> Result<T, PoolError> {
        if !self.wait_timeout(timeout) {
            return Err(PoolError::Timeout);
        }
        self.take()
    }

    fn take(&self) -> Result<T, PoolError> {
        let mut state = self.completion.state.lock();
        match std::mem::replace(&mut *state, State::Taken) {
            State::Ready(Ok(value)) => Ok(value),
            State::Ready(Err(error)) => {
                *state = State::Ready(Err(error.clone()));
                Err(error)
            }
            State::Taken => Err(PoolError::AlreadyTaken),
            State::Pending { .. } => unreachable!("take is only called once the outcome is known"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn callbacks_run_once_whether_attached_before_or_after_completion() {
        let calls = Arc::new(AtomicUsize::new(0));
        let before = Completion::<u32>::new();
        let counter = calls.clone();
        let early = AsyncResult::new(before.clone()).callback(move |v| {
            assert_eq!(*v, 5);
            counter.fetch_add(1, Ordering::SeqCst);
        });
        before.complete(Ok(5));
        before.complete(Ok(6)); // ignored: the first outcome wins
        assert_eq!(early.get(), Ok(5));

        let after = Completion::<u32>::new();
        after.complete(Ok(5));
        let counter = calls.clone();
        let late = AsyncResult::new(after).callback(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(late.get(), Ok(5));
        assert_eq!(late.get(), Err(PoolError::AlreadyTaken));
    }

    #[test]
    fn error_callback_sees_the_error_and_get_repeats_it() {
        let completion = Completion::<u32>::new();
        let seen = Arc::new(Mutex::new(None));
        let sink = seen.clone();
        let result = AsyncResult::new(completion.clone())
            .callback(|_| panic!("success callback on a failure"))
            .error_callback(move |e| *sink.lock() = Some(e.clone()));
        assert_eq!(result.successful(), None);
        completion.complete(Err(PoolError::Terminated));
        assert_eq!(*seen.lock(), Some(PoolError::Terminated));
        assert_eq!(result.successful(), Some(false));
        assert_eq!(result.get(), Err(PoolError::Terminated));
        assert_eq!(result.get(), Err(PoolError::Terminated));
    }

    #[test]
    fn get_timeout_times_out_and_can_be_retried() {
        let completion = Completion::<u32>::new();
        let result = AsyncResult::new(completion.clone());
        assert_eq!(
            result.get_timeout(Duration::from_millis(10)),
            Err(PoolError::Timeout)
        );
        assert!(!result.ready());
        completion.complete(Ok(1));
        assert_eq!(result.get_timeout(Duration::from_millis(10)), Ok(1));
    }
}
