//! `Process` (the builder) and `Child` (the handle of a running child), with Python's
//! lifecycle: start, join, join with a timeout, is_alive, exitcode, terminate, kill, sentinel.

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipc_channel::ipc::{self, IpcReceiver, IpcSender, OpaqueIpcReceiver, OpaqueIpcSender};
use ipc_channel::{IpcError, TryRecvError};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::decode_error;
use crate::error::ProcessError;
use crate::function::{Entry, assert_non_capturing, run_key};
use crate::payload::{self, Packed};
use crate::protocol::{Header, MARKER, Outcome, ProcessInfo, Role, SIDECAR_FD};
use crate::registry::{self, ExitWatch, Tracked};
use crate::start_method::{StartMethod, fork_allowed, get_start_method};
use crate::sys::{self, ExitStatus};
use crate::{child, fork, forkserver, launcher, spawn, transfer};

/// A function to run in a child process, with its options (Python's `Process(target=...)`).
///
/// ```
/// use mp_core::Process;
///
/// let child = Process::new(|(a, b): (u64, u64)| a * b).args((6, 7)).name("multiplier").start()?;
/// assert_eq!(child.join()?, 42);
/// assert_eq!(child.exitcode(), Some(0));
/// # Ok::<(), mp_core::ProcessError>(())
/// ```
///
/// The function must be a non-capturing closure or a `fn` item (checked at compile time);
/// values it needs travel as its argument, which — like its result — is any serde type.
/// Handles of multiproc's primitives (queues, locks, shared memory, pipes) travel too: the
/// child gets a handle to the same object.
#[must_use = "a Process does nothing until .start() is called"]
pub struct Process<M, F: Entry<M>> {
    /// Only its type matters: the child conjures its own copy of the zero-sized function.
    _function: F,
    args: Option<F::Args>,
    name: Option<String>,
    daemon: bool,
    start_method: Option<StartMethod>,
}

impl<M, F: Entry<M>> Process<M, F> {
    /// Prepares `function` to run in a child.
    pub fn new(function: F) -> Self {
        const { assert_non_capturing::<F>() };
        Process {
            _function: function,
            args: None,
            name: None,
            daemon: false,
            start_method: None,
        }
    }

    /// The argument to call the function with (a tuple for several values).
    pub fn args(mut self, args: F::Args) -> Self {
        self.args = Some(args);
        self
    }

    /// The child's name (default: `Process-N`, or `Process-N:M` in a child, as in Python).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// A daemon child is terminated when its parent exits; a non-daemon child is waited for.
    /// Either way, every child dies if its parent is killed.
    pub fn daemon(mut self, daemon: bool) -> Self {
        self.daemon = daemon;
        self
    }

    /// How to create the child (default: [`get_start_method`]).
    pub fn start_method(mut self, method: StartMethod) -> Self {
        self.start_method = Some(method);
        self
    }

    /// Starts the child and returns its handle once it is running and has been sent its
    /// function and argument.
    pub fn start(self) -> Result<Child<F::Output>, ProcessError> {
        refuse_if_bootstrap_did_not_run()?;
        // A function of no argument: its child makes the argument itself (`()`), so none is
        // sent (see `Header::default_args`).
        let default_args = self.args.is_none();
        let args = self
            .args
            .or_else(F::default_args)
            .ok_or(ProcessError::MissingArgs)?;
        let (identity, default_name) = registry::next_child_identity();
        let name = self.name.unwrap_or(default_name);
        let method = self.start_method.unwrap_or_else(get_start_method);
        if method == StartMethod::Fork && !fork_allowed() {
            return Err(ProcessError::ForkNotAllowed);
        }
        // No descriptor of ours may land on a closed stdio slot (a child would inherit it as
        // its stdout).
        sys::ensure_stdio_open();
        // The sidecar: large values travel on it, and it is the child's outcome bell (see
        // `protocol::SIDECAR_FD`).
        let (sidecar, sidecar_for_child) =
            payload::sidecar_pair().map_err(ProcessError::io("creating the sidecar"))?;
        // Made before any fork: a forked child must not find it half-initialised.
        let run_key = run_key();
        let parent = registry::current_process();
        let small = header_is_small(&name, &parent, &identity);
        let daemon = self.daemon;
        let header_name = name.clone();
        let make_header = move |outcome: OpaqueIpcSender| Header {
            entry: child::process_entry::<M, F>(),
            run_key: run_key.clone(),
            identity: identity.clone(),
            name: header_name.clone(),
            daemon,
            parent: parent.clone(),
            outcome,
            args: None,
            default_args,
        };
        let new_outcome_channel = || {
            ipc::channel::<Outcome<Packed<F::Output>>>()
                .map_err(ProcessError::io("creating a channel"))
        };
        // The receiving end of the child's outcome channel, once made.
        let outcome_slot: Arc<Mutex<Option<OpaqueIpcReceiver>>> = Arc::default();
        let mut args = (!default_args).then_some(args);
        // A forked child gets its header and argument sent before it runs (fork: before the
        // fork; forkserver: while the server forks), so it need not wait for them. Only if
        // the header is small (the name is the program's): like the argument's, its message
        // must fit in the socket's buffer, as nobody reads it yet. The outcome channel that
        // the header names is made then too: under forkserver, its socket pair is created
        // while the server wakes up and forks, not before the request (a socket pair costs
        // about 8 us to create on the project's VM).
        let (header, first) = match method {
            // A forked child of a function of no argument needs nothing but its header: it
            // finds it in the memory it copies (fork: this process's; forkserver: the
            // server's, which got it in the request), with no channel of its own (see
            // `forkserver::First`).
            StartMethod::Fork | StartMethod::ForkServer if small && default_args => {
                let (outcome_tx, outcome_rx) = new_outcome_channel()?;
                *outcome_slot.lock() = Some(outcome_rx.to_opaque());
                let make = move || make_header(outcome_tx.clone().to_opaque());
                (None, Some(forkserver::First::Inline(Box::new(make))))
            }
            StartMethod::Fork | StartMethod::ForkServer if small => {
                let sidecar = sidecar
                    .try_clone()
                    .map_err(ProcessError::io("duplicating the sidecar"))?;
                let args = args.take();
                let slot = Arc::clone(&outcome_slot);
                let first = Box::new(move |channel: &IpcSender<Header>| {
                    let (outcome_tx, outcome_rx) = new_outcome_channel()?;
                    *slot.lock() = Some(outcome_rx.to_opaque());
                    let header = make_header(outcome_tx.to_opaque());
                    send_header_and_args(channel, Some(header), args, sidecar.as_fd())
                }) as launcher::SendFirst;
                (None, Some(forkserver::First::Send(first)))
            }
            _ => {
                let (outcome_tx, outcome_rx) = new_outcome_channel()?;
                *outcome_slot.lock() = Some(outcome_rx.to_opaque());
                (Some(make_header(outcome_tx.to_opaque())), None)
            }
        };

        // Only the creation runs on the launcher thread; the wait for a spawned child to
        // connect back runs here, so that children started from several threads start
        // in parallel.
        let launching =
            launcher::on_long_lived_thread(move || launch(method, sidecar_for_child, first))?;
        // A spawned child takes most of a millisecond to start: its argument is encoded and
        // sent meanwhile, on a channel of its own that the header names, instead of after it
        // connects. (The send cannot block: a large value goes to a memfd, and the message
        // that stays inline is bounded well below the socket's buffer, see `payload`.) A
        // function of no argument has nothing to send: its child makes the `()` itself (see
        // `Header::default_args`), which saves that channel (a socket pair: 14 us to create
        // and close on the project's VM, and a descriptor passed and received).
        decode_error::clear();
        let early = (matches!(launching, Launching::Spawned(_))
            && std::mem::size_of::<F::Args>() != 0)
            .then(|| send_args_early(&mut args, sidecar.as_fd()));
        let launched = launching.connect()?;
        // Made above, or by `first` (which a child that started has always run).
        let outcome_rx = outcome_slot
            .lock()
            .take()
            .ok_or_else(|| ProcessError::StartFailed("the outcome channel was not made".into()))?
            .to::<Outcome<Packed<F::Output>>>();
        let tracked = registry::track(
            launched.pid,
            name.clone(),
            self.daemon,
            launched.pidfd,
            launched.watch,
        );
        let child = Child {
            tracked,
            outcome: Mutex::new(OutcomeState::Waiting {
                receiver: outcome_rx,
            }),
            sidecar,
        };
        // `None`: the header travelled in the fork server's request, and there is no argument.
        let channel = launched.channel.map(IpcSender::to_opaque);
        debug_assert!(channel.is_some() || (header.is_none() && args.is_none()));
        let sent = early
            .transpose()
            .and_then(|args_channel| match (header, &channel) {
                (Some(header), Some(channel)) => {
                    let header = Header {
                        args: args_channel,
                        ..header
                    };
                    transfer::send(&channel.clone().to::<Header>(), header)
                }
                // Sent by the launcher already.
                _ => Ok(()),
            })
            .and_then(|()| match (args.take(), channel) {
                (Some(args), Some(channel)) => payload::with_sidecar(child.sidecar.as_fd(), || {
                    transfer::send(&channel.to::<Packed<F::Args>>(), Packed(args))
                }),
                _ => Ok(()),
            });
        if let Err(e) = sent {
            let _ = child.kill();
            child.tracked.wait_exit(Some(Duration::from_secs(5)));
            // The type, ipc-channel's error, and what a failing handle noted (postcard drops
            // serde's custom messages).
            return Err(ProcessError::StartFailed(format!(
                "could not send the function and its argument to the child: {}",
                decode_error::describe::<F::Args>(format!("{e:?}"))
            )));
        }
        tracing::debug!(pid = child.pid(), name = child.name(), %method, "process started");
        Ok(child)
    }
}

/// Whether a header's message is certain to fit in an empty socket's buffer (its other
/// fields are small and fixed).
fn header_is_small(name: &str, parent: &ProcessInfo, identity: &[u32]) -> bool {
    name.len() + parent.name.len() + 8 * identity.len() <= 4096
}

/// Sends a forked child's header and argument on its header channel (see
/// [`launcher::SendFirst`]), describing a failure as [`Process::start`] does.
fn send_header_and_args<A: Serialize + for<'de> Deserialize<'de>>(
    channel: &IpcSender<Header>,
    header: Option<Header>,
    args: Option<A>,
    sidecar: BorrowedFd<'_>,
) -> Result<(), ProcessError> {
    decode_error::clear();
    let sent = header.map_or(Ok(()), |header| transfer::send(channel, header));
    let sent = sent.and_then(|()| match args {
        Some(args) => payload::with_sidecar(sidecar, || {
            transfer::send(&channel.clone().to_opaque().to::<Packed<A>>(), Packed(args))
        }),
        None => Ok(()),
    });
    sent.map_err(|e| {
        ProcessError::StartFailed(format!(
            "could not send the function and its argument to the child: {}",
            decode_error::describe::<A>(format!("{e:?}"))
        ))
    })
}

/// Sends `args` (taken out of the option) on a fresh channel, before the child can read it,
/// and returns the channel's receiving end for the child's header.
fn send_args_early<A: Serialize + for<'de> Deserialize<'de>>(
    args: &mut Option<A>,
    sidecar: BorrowedFd<'_>,
) -> Result<ipc::OpaqueIpcReceiver, IpcError> {
    let (sender, receiver) = ipc::channel::<Packed<A>>().map_err(IpcError::Io)?;
    if let Some(args) = args.take() {
        payload::with_sidecar(sidecar, || transfer::send(&sender, Packed(args)))?;
    }
    Ok(receiver.to_opaque())
}

/// Fails loudly if this process was started as a child but its bootstrap never ran (the
/// constructor was not linked): starting children from here could multiply without end.
fn refuse_if_bootstrap_did_not_run() -> Result<(), ProcessError> {
    match std::env::var(MARKER) {
        Ok(marker) => Err(ProcessError::StartFailed(format!(
            "this process was started as a multiproc child ({MARKER}={marker}) but its \
             bootstrap did not run; refusing to start more processes"
        ))),
        Err(_) => Ok(()),
    }
}

struct Launched {
    pid: u32,
    pidfd: std::os::fd::OwnedFd,
    watch: ExitWatch,
    /// The child's header channel (`None`: see [`forkserver::First::Inline`]).
    channel: Option<IpcSender<Header>>,
}

/// A child created on the launcher thread: connected already, or (spawned) still to be
/// connected to by the caller.
enum Launching {
    Spawned(spawn::Started),
    Connected(Launched),
}

impl Launching {
    fn connect(self) -> Result<Launched, ProcessError> {
        match self {
            Launching::Connected(launched) => Ok(launched),
            Launching::Spawned(started) => {
                let spawned = started.connect::<Header>()?;
                Ok(Launched {
                    pid: spawned.pid,
                    pidfd: spawned.pidfd,
                    watch: ExitWatch::Direct,
                    channel: Some(spawned.channel),
                })
            }
        }
    }
}

fn launch(
    method: StartMethod,
    sidecar: OwnedFd,
    first: Option<forkserver::First>,
) -> Result<Launching, ProcessError> {
    match method {
        StartMethod::Spawn => {
            let parent = std::process::id();
            let started =
                spawn::start_self(Role::Child { parent }, &[(sidecar.as_fd(), SIDECAR_FD)])?;
            Ok(Launching::Spawned(started))
        }
        StartMethod::Fork => {
            let (pid, pidfd, channel) = fork::fork_child(sidecar, first)?;
            Ok(Launching::Connected(Launched {
                pid,
                pidfd,
                watch: ExitWatch::Direct,
                channel,
            }))
        }
        StartMethod::ForkServer => {
            // Our child (the server forks it as its sibling): waited for like a forked one.
            let child = forkserver::fork_child(sidecar, first)?;
            Ok(Launching::Connected(Launched {
                pid: child.pid,
                pidfd: child.pidfd,
                watch: ExitWatch::Direct,
                channel: child.channel,
            }))
        }
    }
}

enum OutcomeState<R> {
    /// The child has not reported yet: its report will arrive on `receiver`, announced by a
    /// datagram on the child's sidecar or, for a small value, by the sidecar's end of file
    /// when the child exits (see `protocol::SIDECAR_FD`).
    Waiting {
        receiver: IpcReceiver<Outcome<Packed<R>>>,
    },
    /// The child reported this (a value, a panic...).
    Received(Outcome<R>),
    /// The child ended without reporting.
    Silent,
    /// The value was handed out by a join.
    Taken,
}

/// The outcome as the child sent it, its value unwrapped.
fn unpack<R>(outcome: Outcome<Packed<R>>) -> Outcome<R> {
    match outcome {
        Outcome::Returned(Packed(value)) => Outcome::Returned(value),
        Outcome::Panicked(report) => Outcome::Panicked(report),
        Outcome::BadArguments(message) => Outcome::BadArguments(message),
        Outcome::BadResult(message) => Outcome::BadResult(message),
    }
}

/// A running (or finished) child process, returned by [`Process::start`].
///
/// Dropping a `Child` does not stop the process (as in Python); it is reaped later, and
/// terminated at exit if it is a daemon.
pub struct Child<R> {
    tracked: Arc<Tracked>,
    outcome: Mutex<OutcomeState<R>>,
    /// The parent's end of the child's sidecar, on which a large result arrives as a memfd.
    sidecar: OwnedFd,
}

impl<R> fmt::Debug for Child<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Child")
            .field("pid", &self.tracked.pid)
            .field("name", &self.tracked.name)
            .field("daemon", &self.tracked.daemon)
            .field("exitcode", &self.exitcode())
            .finish()
    }
}

impl<R> Child<R> {
    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.tracked.pid
    }

    /// The child's name.
    pub fn name(&self) -> &str {
        &self.tracked.name
    }

    /// Whether the child is a daemon.
    pub fn daemon(&self) -> bool {
        self.tracked.daemon
    }

    /// Whether the child is still running.
    pub fn is_alive(&self) -> bool {
        self.tracked.poll_exit().is_none()
    }

    /// Python's `exitcode`: `None` while running, then the exit code (0 after a normal
    /// return), or minus the number of the signal that killed it. Stays `None` after the
    /// end of a child whose status this process could not collect, as Python's does (see
    /// [`ExitStatus::Unknown`]; [`is_alive`](Self::is_alive) tells the two apart).
    pub fn exitcode(&self) -> Option<i32> {
        self.tracked.poll_exit().and_then(ExitStatus::exitcode)
    }

    /// Sends SIGTERM (Python's `terminate`). Does nothing if the child already ended.
    pub fn terminate(&self) -> Result<(), ProcessError> {
        self.send_signal(libc::SIGTERM)
    }

    /// Sends SIGKILL (Python's `kill`). Does nothing if the child already ended.
    pub fn kill(&self) -> Result<(), ProcessError> {
        self.send_signal(libc::SIGKILL)
    }

    /// Sends `signal` to the child, through its pidfd (never to a recycled pid).
    pub fn send_signal(&self, signal: i32) -> Result<(), ProcessError> {
        if self.tracked.poll_exit().is_some() {
            return Ok(());
        }
        sys::send_signal(self.tracked.pidfd.as_fd(), signal)
            .map_err(ProcessError::io("signalling a child"))
    }

    /// A descriptor that becomes readable when the child ends (a pidfd; Python's
    /// `sentinel`), for `poll`/`epoll` or mp-ipc's `wait`.
    pub fn sentinel(&self) -> BorrowedFd<'_> {
        self.tracked.pidfd.as_fd()
    }
}

impl<R: for<'de> Deserialize<'de> + Serialize> Child<R> {
    /// Waits for the child to end and returns what its function returned, like
    /// `std::thread::JoinHandle::join`. A child that panicked, exited early or was killed
    /// gives the matching [`ProcessError`].
    pub fn join(&self) -> Result<R, ProcessError> {
        self.join_until(None)
    }

    /// [`join`](Self::join), giving up after `timeout` with [`ProcessError::Timeout`]; the
    /// child keeps running and can be joined again.
    pub fn join_timeout(&self, timeout: Duration) -> Result<R, ProcessError> {
        self.join_until(Some(Instant::now() + timeout))
    }

    fn join_until(&self, deadline: Option<Instant>) -> Result<R, ProcessError> {
        let pid = self.pid();
        let mut state = self.outcome.lock();
        let remaining = || deadline.map(|d| d.saturating_duration_since(Instant::now()));
        // First the report (it must be read while the child runs: a large one fills the
        // channel and the child cannot exit until it is drained), then the exit. One poll
        // sleeps on both the bell (the sidecar) and the pidfd. The child rings before a
        // report that may be large, and after a value that the parent should read before the
        // child exits (a large value's memfd on the sidecar rings too, see
        // `child::run_process`); a small value is simply buffered when the sidecar's end of
        // file (the child keeps it open until it exits) or the pidfd wakes this poll.
        while let OutcomeState::Waiting { receiver } = &*state {
            let bell = self.sidecar.as_fd();
            let ready = sys::wait_any(&[bell, self.tracked.pidfd.as_fd()], remaining())
                .map_err(ProcessError::io("waiting for a child"))?;
            decode_error::clear();
            let received = payload::with_sidecar(self.sidecar.as_fd(), || match ready {
                None => None,
                // The bell rang (or every copy of it closed): the report is on its way, or
                // buffered.
                Some(0) => Some(transfer::recv_sent(
                    receiver,
                    remaining(),
                    self.tracked.pidfd.as_fd(),
                )),
                // Ended without ringing: whatever it sent is already buffered.
                Some(_) => Some(sys::without_signals(|| receiver.try_recv())),
            });
            let Some(received) = received else {
                return Err(ProcessError::Timeout { pid });
            };
            *state = match received {
                Ok(outcome) => OutcomeState::Received(unpack(outcome)),
                Err(TryRecvError::Empty) if ready == Some(0) => {
                    return Err(ProcessError::Timeout { pid });
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::IpcError(IpcError::Disconnected)) => {
                    OutcomeState::Silent
                }
                Err(TryRecvError::IpcError(e)) => OutcomeState::Received(Outcome::BadResult(
                    decode_error::describe::<R>(format_args!("{e:?}")),
                )),
            };
        }
        let Some(status) = self.tracked.wait_exit(remaining()) else {
            return Err(ProcessError::Timeout { pid });
        };
        match std::mem::replace(&mut *state, OutcomeState::Taken) {
            OutcomeState::Received(Outcome::Returned(value)) => Ok(value),
            OutcomeState::Received(Outcome::Panicked(report)) => {
                Err(ProcessError::Panicked { pid, report })
            }
            OutcomeState::Received(Outcome::BadArguments(message)) => {
                Err(ProcessError::BadArguments { pid, message })
            }
            OutcomeState::Received(Outcome::BadResult(message)) => {
                Err(ProcessError::BadResult { pid, message })
            }
            OutcomeState::Silent => Err(match status {
                ExitStatus::Code(code) => ProcessError::Exited { pid, code },
                ExitStatus::Signal(signal) => ProcessError::Signaled { pid, signal },
                ExitStatus::Unknown => ProcessError::StatusLost { pid },
            }),
            OutcomeState::Taken => Err(ProcessError::AlreadyJoined { pid }),
            OutcomeState::Waiting { .. } => unreachable!("left the loop above"),
        }
    }
}
