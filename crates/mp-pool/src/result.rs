//! [`AsyncResult`]: the handle of a task submitted with `apply_async`, `map_async` or
//! `starmap_async` (Python's `AsyncResult`).

use std::fmt;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{PoolError, ResultError};
use crate::transport::SPIN;

type SuccessCallback<T> = Box<dyn FnOnce(&T) + Send>;
type ErrorCallback<E> = Box<dyn FnOnce(&E) + Send>;
/// Withdraws a job from the pool if none of it has started; whether it did.
pub(crate) type Canceller = Box<dyn Fn() -> bool + Send + Sync>;

enum State<T, E> {
    Pending {
        on_success: Option<SuccessCallback<T>>,
        on_error: Option<ErrorCallback<E>>,
        /// Tasks (`await`, `as_completed`, `wait`) to wake with the outcome.
        wakers: Vec<Waker>,
    },
    Ready(Result<T, E>),
    /// The value was moved out by `get`.
    Taken,
}

/// Where a job's outcome lands: filled once by the pool, read by an [`AsyncResult`].
pub(crate) struct Completion<T, E = PoolError> {
    state: Mutex<State<T, E>>,
    ready: Condvar,
    /// Set with the outcome, for waiters polling before they sleep.
    done: AtomicBool,
    /// Set by the pool once the job is submitted: how `AsyncResult::cancel` withdraws it.
    canceller: OnceLock<Canceller>,
}

impl<T, E> Completion<T, E> {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Completion {
            state: Mutex::new(State::Pending {
                on_success: None,
                on_error: None,
                wakers: Vec::new(),
            }),
            ready: Condvar::new(),
            done: AtomicBool::new(false),
            canceller: OnceLock::new(),
        })
    }

    /// Stores the outcome (the first one wins), runs the matching callback and wakes waiters
    /// (threads blocked in `get`, and tasks that registered a waker).
    ///
    /// The callback runs under this completion's lock, with a reference to the value: only
    /// the `AsyncResult` (not `Clone`, consumed when a callback is attached) could contend for
    /// it, so it cannot deadlock on it. Wakers are woken after the lock is released.
    pub(crate) fn complete(&self, outcome: Result<T, E>) {
        let mut state = self.state.lock();
        let State::Pending {
            on_success,
            on_error,
            wakers,
        } = &mut *state
        else {
            return;
        };
        let (on_success, on_error) = (on_success.take(), on_error.take());
        let wakers = std::mem::take(wakers);
        *state = State::Ready(outcome);
        self.done.store(true, Ordering::Release);
        // Waiters wake now but need the lock, so they see the value after the callback; and
        // if the callback panics, the unwinding releases the lock: nobody is left waiting.
        self.ready.notify_all();
        // Wake the tasks even if the callback panics.
        struct WakeOnDrop(Vec<Waker>);
        impl Drop for WakeOnDrop {
            fn drop(&mut self) {
                self.0.drain(..).for_each(Waker::wake);
            }
        }
        let wake = WakeOnDrop(wakers);
        if let State::Ready(outcome) = &*state {
            match (outcome, on_success, on_error) {
                (Ok(value), Some(callback), _) => callback(value),
                (Err(error), _, Some(callback)) => callback(error),
                _ => {}
            }
        }
        drop(state);
        drop(wake);
    }

    pub(crate) fn is_ready(&self) -> bool {
        !matches!(*self.state.lock(), State::Pending { .. })
    }

    /// Records how to withdraw the job (once).
    pub(crate) fn set_canceller(&self, canceller: Canceller) {
        let _ = self.canceller.set(canceller);
    }

    /// Registers `waker` to be woken with the outcome; false (and not registered) if the
    /// outcome is already known. A waker that would wake the same task replaces the old one.
    pub(crate) fn register(&self, waker: &Waker) -> bool {
        match &mut *self.state.lock() {
            State::Pending { wakers, .. } => {
                match wakers.iter_mut().find(|w| w.will_wake(waker)) {
                    Some(old) => old.clone_from(waker),
                    None => wakers.push(waker.clone()),
                }
                true
            }
            State::Ready(_) | State::Taken => false,
        }
    }
}

/// The eventual outcome of a task or a whole `map_async` (Python's `AsyncResult`, a
/// `concurrent.futures.Future`).
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
/// It is also a future (`result.await`, under any executor: the pool's result thread wakes
/// the task, no runtime is needed), and can be cancelled while it waits for a worker
/// ([`cancel`](Self::cancel)).
///
/// `E` is [`PoolError`], or [`TryError<E>`](crate::TryError) for the `try_` family of
/// functions that return a `Result`.
///
/// It does not keep the pool alive: if the pool is terminated or dropped first, the result
/// becomes [`PoolError::Terminated`].
pub struct AsyncResult<T, E = PoolError> {
    completion: Arc<Completion<T, E>>,
}

impl<T, E> fmt::Debug for AsyncResult<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncResult")
            .field("ready", &self.ready())
            .finish()
    }
}

impl<T, E> AsyncResult<T, E> {
    pub(crate) fn new(completion: Arc<Completion<T, E>>) -> Self {
        AsyncResult { completion }
    }

    /// A result not known yet, and the sender that completes it: for executors other than
    /// [`Pool`](crate::Pool) built on these results (mp-mpi's `MpiPool`), which then give
    /// their users `get`, `wait`, callbacks, `.await`, [`as_completed`](crate::as_completed)
    /// and [`wait`](crate::wait) as the pool does.
    ///
    /// ```
    /// use mp_pool::{AsyncResult, PoolError};
    ///
    /// let (sender, result) = AsyncResult::<u32, PoolError>::pending();
    /// std::thread::spawn(move || sender.complete(Ok(7)));
    /// assert_eq!(result.get(), Ok(7));
    /// ```
    pub fn pending() -> (ResultSender<T, E>, AsyncResult<T, E>) {
        let completion = Completion::new();
        (
            ResultSender {
                completion: completion.clone(),
            },
            AsyncResult { completion },
        )
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
    /// under the same rules as [`callback`](Self::callback). For the `try_` family, an
    /// `Err` returned by the task is such an error ([`TryError::Task`](crate::TryError)).
    #[must_use = "the AsyncResult is returned so that its outcome can still be read"]
    pub fn error_callback(self, callback: impl FnOnce(&E) + Send + 'static) -> Self {
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

    /// Registers `waker` to be woken with the outcome; false if it is already known.
    pub(crate) fn register(&self, waker: &Waker) -> bool {
        self.completion.register(waker)
    }
}

impl<T, E: ResultError> AsyncResult<T, E> {
    /// Waits for the outcome and returns it. The value is moved out: a second `get` after a
    /// success returns [`PoolError::AlreadyTaken`]; an error is returned every time.
    pub fn get(&self) -> Result<T, E> {
        self.wait();
        self.take()
    }

    /// [`get`](Self::get), giving up after `timeout` with [`PoolError::Timeout`] (the task
    /// goes on; `get` can be called again).
    pub fn get_timeout(&self, timeout: Duration) -> Result<T, E> {
        if !self.wait_timeout(timeout) {
            return Err(E::timeout());
        }
        self.take()
    }

    /// Withdraws the task if no worker has started it yet (`concurrent.futures.Future.cancel`):
    /// it then fails with [`PoolError::Cancelled`] (its error callback runs) and never runs.
    /// Returns whether it was cancelled: `false` once it runs or has finished (as in
    /// Python, a running task is not interrupted; give it a timeout for that). For a
    /// `map_async`, the map is withdrawn only if none of its chunks is running at that
    /// moment (results of chunks already finished are then dropped with it).
    pub fn cancel(&self) -> bool {
        if self.ready() {
            return self.cancelled();
        }
        let withdrawn = self
            .completion
            .canceller
            .get()
            .is_some_and(|cancel| cancel());
        if withdrawn {
            self.completion.complete(Err(E::cancelled()));
        }
        // It may have finished just before it was withdrawn: the first outcome stands.
        self.cancelled()
    }

    /// Whether the task was cancelled (by [`cancel`](Self::cancel) or by
    /// [`Pool::shutdown`](crate::Pool::shutdown) with `cancel_pending`).
    pub fn cancelled(&self) -> bool {
        match &*self.completion.state.lock() {
            State::Ready(Err(error)) => error.is_cancelled(),
            _ => false,
        }
    }

    pub(crate) fn take(&self) -> Result<T, E> {
        let mut state = self.completion.state.lock();
        match std::mem::replace(&mut *state, State::Taken) {
            State::Ready(Ok(value)) => Ok(value),
            State::Ready(Err(error)) => {
                *state = State::Ready(Err(error.clone()));
                Err(error)
            }
            State::Taken => Err(E::already_taken()),
            pending @ State::Pending { .. } => {
                *state = pending;
                drop(state);
                // Not reached: every caller waits for (or checks) the outcome first. Should
                // that change, "not there yet" is what the caller would need to hear.
                Err(E::timeout())
            }
        }
    }
}

impl<T, E: From<PoolError>> AsyncResult<T, E> {
    /// Fails the task with `error` unless its outcome is known.
    pub(crate) fn fail(&self, error: PoolError) {
        self.completion.complete(Err(error.into()));
    }
}

/// The producer's side of an [`AsyncResult`] from [`AsyncResult::pending`]: for executors
/// other than [`Pool`](crate::Pool) that hand out `AsyncResult`s (mp-mpi's `MpiPool`).
/// A pool's users never need it.
///
/// The first [`complete`](Self::complete) stands. Dropping every sender without completing
/// leaves the result pending: an executor completes (or fails) each of its results.
pub struct ResultSender<T, E = PoolError> {
    completion: Arc<Completion<T, E>>,
}

impl<T, E> Clone for ResultSender<T, E> {
    fn clone(&self) -> Self {
        ResultSender {
            completion: self.completion.clone(),
        }
    }
}

impl<T, E> fmt::Debug for ResultSender<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResultSender")
            .field("ready", &self.completion.is_ready())
            .finish()
    }
}

impl<T, E> ResultSender<T, E> {
    /// Stores the outcome unless one is known, runs the result's callback (on this thread,
    /// with no other lock needed) and wakes whoever waits for it (threads and tasks).
    pub fn complete(&self, outcome: Result<T, E>) {
        self.completion.complete(outcome);
    }

    /// Whether the outcome is known (completed here, or cancelled).
    pub fn is_complete(&self) -> bool {
        self.completion.is_ready()
    }

    /// Lets [`AsyncResult::cancel`] withdraw the task: `withdraw` returns whether the
    /// task was withdrawn before it started (the result then fails with
    /// [`ResultError::cancelled`]). Without one, `cancel` returns `false`. Only the first
    /// call counts.
    pub fn on_cancel(&self, withdraw: impl Fn() -> bool + Send + Sync + 'static) {
        self.completion.set_canceller(Box::new(withdraw));
    }
}

/// `result.await`: the future of an [`AsyncResult`].
///
/// Runtime-agnostic: the pool's result thread wakes the task when the outcome arrives;
/// nothing here starts or needs a runtime.
pub struct ResultFuture<T, E = PoolError> {
    result: AsyncResult<T, E>,
}

impl<T, E> fmt::Debug for ResultFuture<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResultFuture")
            .field("ready", &self.result.ready())
            .finish()
    }
}

impl<T, E: ResultError> Future for ResultFuture<T, E> {
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if self.result.register(cx.waker()) {
            Poll::Pending
        } else {
            Poll::Ready(self.result.take())
        }
    }
}

impl<T, E: ResultError> IntoFuture for AsyncResult<T, E> {
    type Output = Result<T, E>;
    type IntoFuture = ResultFuture<T, E>;

    fn into_future(self) -> ResultFuture<T, E> {
        ResultFuture { result: self }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::TryError;
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

    /// Counts its wake-ups.
    struct Counter(AtomicUsize);

    impl std::task::Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_registered_waker_is_woken_once_with_the_outcome() {
        let completion = Completion::<u32>::new();
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        assert!(completion.register(&waker));
        assert!(
            completion.register(&waker),
            "re-registered: replaced, not added"
        );
        completion.complete(Ok(3));
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        assert!(!completion.register(&waker), "the outcome is known");
        let mut context = Context::from_waker(&waker);
        let mut future = std::pin::pin!(AsyncResult::new(completion).into_future());
        assert_eq!(future.as_mut().poll(&mut context), Poll::Ready(Ok(3)));
    }

    #[test]
    fn cancel_asks_the_pool_and_the_first_outcome_stands() {
        let withdrawn = Completion::<u32>::new();
        withdrawn.set_canceller(Box::new(|| true));
        let result = AsyncResult::new(withdrawn);
        assert!(result.cancel());
        assert!(result.cancelled());
        assert_eq!(result.get(), Err(PoolError::Cancelled));

        let running = Completion::<u32>::new();
        running.set_canceller(Box::new(|| false));
        let result = AsyncResult::new(running.clone());
        assert!(!result.cancel(), "the pool could not withdraw it");
        running.complete(Ok(1));
        assert!(!result.cancel() && !result.cancelled());
        assert_eq!(result.get(), Ok(1));

        // Finished just before the pool withdrew it (nothing left to withdraw): not cancelled.
        let raced = Completion::<u32>::new();
        let late = raced.clone();
        raced.set_canceller(Box::new(move || {
            late.complete(Ok(2));
            true
        }));
        let result = AsyncResult::new(raced);
        assert!(!result.cancel());
        assert_eq!(result.get(), Ok(2));
    }

    #[test]
    fn results_of_the_try_family_carry_pool_errors_as_such() {
        let completion = Completion::<u32, TryError<String>>::new();
        let result = AsyncResult::new(completion.clone());
        assert_eq!(
            result.get_timeout(Duration::from_millis(1)),
            Err(TryError::Pool(PoolError::Timeout))
        );
        completion.complete(Err(TryError::Task("bad".into())));
        assert_eq!(result.get(), Err(TryError::Task("bad".into())));
        assert!(!result.cancelled());
    }

    #[test]
    fn a_sender_completes_wakes_and_withdraws_as_the_pool_does() {
        let (sender, result) = AsyncResult::<u32, TryError<String>>::pending();
        assert!(!result.cancel(), "no way to withdraw it was given");
        sender.on_cancel(|| true);
        assert!(result.cancel());
        assert!(sender.is_complete());
        sender.complete(Ok(1)); // too late: the first outcome stands
        assert_eq!(result.get(), Err(TryError::Pool(PoolError::Cancelled)));

        let (sender, result) = AsyncResult::<u32>::pending();
        let counter = Arc::new(Counter(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut future = std::pin::pin!(result.into_future());
        let mut context = Context::from_waker(&waker);
        assert_eq!(future.as_mut().poll(&mut context), Poll::Pending);
        std::thread::spawn(move || sender.complete(Ok(4)))
            .join()
            .unwrap();
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        assert_eq!(future.as_mut().poll(&mut context), Poll::Ready(Ok(4)));
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
