//! The child side's runtime: what every child (spawned, forked, or forked by the fork server)
//! runs to receive its function, call it and report back.
//!
//! A child adopts its parent's run key first (so it can check ids), then resolves the process
//! trampoline named in its [`Header`], receives the argument, calls the function and sends
//! the [`Outcome`], ringing its sidecar (the outcome bell, see `protocol::SIDECAR_FD`) when
//! the parent should read it before the child exits (see `run_process`). The bell is what
//! lets the parent's `join` sleep in one `poll` on the sidecar and the pidfd: ipc-channel does
//! not expose its receiver's descriptor.

use std::io::Write;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;

use ipc_channel::ipc::{IpcOneShotServer, IpcReceiver, OpaqueIpcReceiver, OpaqueIpcSender};
use serde::{Deserialize, Serialize};

use crate::decode_error;
use crate::function::{self, Entry, IdKind, catch_panic};
use crate::payload::{self, Packed, with_sidecar};
use crate::protocol::{
    EXIT_BAD_DATA, EXIT_BOOTSTRAP_FAILED, EXIT_PANICKED, HANDSHAKE_FD, Header, Outcome,
    RawFunctionId,
};
use crate::registry;
use crate::sys;

/// What a process trampoline is handed: the channel its argument arrives on, the one its
/// outcome goes to, and the sidecar, on which a large argument or result travels (see
/// `payload`) and which the child rings when the parent should read the outcome before the
/// child exits.
pub(crate) struct ChildLink {
    /// `None`: the function takes no argument (see [`Header::default_args`]).
    args: Option<OpaqueIpcReceiver>,
    outcome: OpaqueIpcSender,
    sidecar: OwnedFd,
}

type ProcessTrampoline = fn(ChildLink) -> i32;

/// Most hooks [`before_child_exit`] keeps.
const MAX_EXIT_HOOKS: usize = 8;

/// The hooks a child runs before it exits. `OnceLock` slots, not a mutex: a slot is never
/// locked by a reader, so a fork while another thread registers cannot leave the child stuck
/// (a slot being set then simply reads as empty in the child).
static EXIT_HOOKS: [OnceLock<fn()>; MAX_EXIT_HOOKS] = [const { OnceLock::new() }; MAX_EXIT_HOOKS];

/// Registers `hook` to run in a multiproc child after its function's outcome was sent to the
/// parent and before the child exits; registering the same function again does nothing.
///
/// This is for libraries whose objects in the outcome need the child alive a little longer:
/// mp-ipc registers a hook that waits (bounded) until the parent has claimed the handles
/// lent in a child's result. A hook must return in bounded time: the parent's `join` waits
/// for the exit. In a process that is not a multiproc child (the main program) hooks never
/// run. Hooks run in registration order, on the child's main thread; a forked child inherits
/// the hooks its parent had registered. Returns false if the table of hooks is full (8).
pub fn before_child_exit(hook: fn()) -> bool {
    for slot in &EXIT_HOOKS {
        match slot.get() {
            Some(existing) if std::ptr::fn_addr_eq(*existing, hook) => return true,
            Some(_) => continue,
            None => {
                if slot.set(hook).is_ok() {
                    return true;
                }
                // Another thread filled this slot meanwhile: maybe with the same hook.
                if slot.get().is_some_and(|f| std::ptr::fn_addr_eq(*f, hook)) {
                    return true;
                }
            }
        }
    }
    false
}

/// Whether any [`before_child_exit`] hook is registered.
fn exit_hooks_registered() -> bool {
    EXIT_HOOKS.iter().any(|slot| slot.get().is_some())
}

/// Runs the registered [`before_child_exit`] hooks; a panicking hook is logged, not fatal.
fn run_exit_hooks() {
    for hook in EXIT_HOOKS.iter().filter_map(OnceLock::get) {
        if std::panic::catch_unwind(hook).is_err() {
            tracing::error!("a before-exit hook of this child panicked");
        }
    }
}

/// The raw id of the process trampoline of `F`, for a [`Header`].
pub(crate) fn process_entry<M, F: Entry<M>>() -> RawFunctionId {
    function::raw_id_of(
        IdKind::Process,
        run_process::<M, F> as ProcessTrampoline as usize,
    )
}

/// Ends a child of the fork server with `code` as CPython ends a forked child (`os._exit`
/// after `multiprocessing`'s own clean-up): mp-core's clean-up at exit runs (its
/// [`before_child_exit`] hooks ran already, after the function), Rust's and C's buffered
/// output is flushed, and the process ends with `_exit`.
///
/// Skipped: the other `atexit` handlers and shared-library destructors, which are the fork
/// server's (registered before it forked, for its own exit): running them in every child is
/// slow (glibc's exit handlers touch pages the child never used: measured 52 -> 42 page
/// faults per forkserver start+join) and may be wrong (a handler that removes the parent's
/// files).
///
/// Only for children of the single-threaded fork server: the flush takes the stdout lock
/// (std's exit only tries it), which in a child forked from a multi-threaded process may be
/// held for ever by a thread that does not exist there. In a forkserver child it can only be
/// held by a thread of the child's own function, which the flush then waits for. Spawned
/// and fork-started children exit as before (`std::process::exit`).
pub(crate) fn exit_forked(code: i32) -> ! {
    registry::clean_up_before_exit();
    let _ = std::io::stdout().lock().flush();
    let _ = std::io::stderr().lock().flush();
    // SAFETY: fflush(NULL) flushes every C stdio stream of this process; _exit ends it
    // without returning (nothing after it runs, no destructor observes a torn state).
    unsafe {
        libc::fflush(std::ptr::null_mut());
        libc::_exit(code)
    }
}

/// Reports a bootstrap failure on stderr (no subscriber may be installed this early) and
/// returns the exit code that says so.
pub(crate) fn fail(message: &str) -> i32 {
    tracing::error!(message, "multiproc child bootstrap failed");
    let _ = writeln!(
        std::io::stderr(),
        "multiproc: child bootstrap failed: {message}; this process was started as a \
         multiproc child and will not run main"
    );
    EXIT_BOOTSTRAP_FAILED
}

/// Prepares a fresh process to serve as a child: dies with `parent`, ignores SIGPIPE like any
/// Rust program (the runtime that would do it has not run yet). False if `parent` is gone.
pub(crate) fn prepare_child_process(parent: u32) -> bool {
    if !sys::die_with_parent(parent) {
        return false;
    }
    // SAFETY: setting a signal disposition to SIG_IGN has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    true
}

/// Opens a one-shot rendezvous, tells the parent its name through [`HANDSHAKE_FD`], and waits
/// for the parent to connect. Returns the channel and its first message.
///
/// Only for the bootstrap constructor, while the process has a single thread (it points
/// `TMPDIR` at a memory file system for the rendezvous, see [`sys::with_memory_temp_dir`]).
pub(crate) fn rendezvous<T>() -> Result<(IpcReceiver<T>, T), String>
where
    T: for<'de> Deserialize<'de> + Serialize,
{
    // SAFETY: called only by the bootstrap constructor (a spawned child, a fork server),
    // before main, while this process has a single thread.
    let (server, name) = unsafe { sys::with_memory_temp_dir(IpcOneShotServer::<T>::new) }
        .map_err(|e| format!("cannot open a rendezvous: {e}"))?;
    // SAFETY: the parent placed the write end of a pipe at HANDSHAKE_FD with dup2 before its
    // exec and nothing else in this process owns that descriptor.
    let handshake = unsafe { OwnedFd::from_raw_fd(HANDSHAKE_FD) };
    let mut handshake = std::fs::File::from(handshake);
    handshake
        .write_all(format!("{name}\n").as_bytes())
        .map_err(|e| format!("cannot reach the parent: {e}"))?;
    drop(handshake);
    sys::without_signals(|| server.accept())
        .map_err(|e| format!("the parent did not connect: {e:?}"))
}

/// Runs the function a child was sent and returns its exit code.
pub(crate) fn serve(
    channel: Option<IpcReceiver<Header>>,
    mut header: Header,
    sidecar: OwnedFd,
) -> i32 {
    // SAFETY: the key comes from our parent, which runs this same executable, over a channel
    // only the two of us hold.
    if let Err(conflict) = unsafe { function::adopt_run_key(header.run_key.clone()) } {
        return fail(&conflict.to_string());
    }
    registry::become_child(&header);
    let _span =
        tracing::debug_span!("child", name = %header.name, pid = std::process::id()).entered();
    let address = match function::checked_address(IdKind::Process, header.entry) {
        Ok(address) => address,
        Err(forged) => return fail(&forged.to_string()),
    };
    // SAFETY: the tag was checked under the run key with IdKind::Process: the parent made
    // this id with `process_entry::<M, F>`, from a `run_process::<M, F>` instantiation of
    // this same executable, which has the `ProcessTrampoline` signature. The pointer takes the
    // provenance the parent's `as usize` cast exposed (same image, same layout).
    let trampoline: ProcessTrampoline =
        unsafe { std::mem::transmute(std::ptr::with_exposed_provenance::<()>(address)) };
    let args = match (header.default_args, header.args.take(), channel) {
        (true, _, _) => None,
        (false, Some(args), _) => Some(args),
        (false, None, Some(channel)) => Some(channel.to_opaque()),
        (false, None, None) => return fail("the header names no channel for the argument"),
    };
    let code = trampoline(ChildLink {
        args,
        outcome: header.outcome,
        sidecar,
    });
    run_exit_hooks();
    code
}

fn run_process<M, F: Entry<M>>(link: ChildLink) -> i32 {
    let ChildLink {
        args,
        outcome,
        sidecar,
    } = link;
    let code = run_function::<M, F>(args, outcome, &sidecar);
    // The sidecar stays open until this process exits (the kernel closes it then), so that
    // when it was not rung, its end of file wakes the parent's join together with the exit,
    // not once before it.
    std::mem::forget(sidecar);
    code
}

fn run_function<M, F: Entry<M>>(
    args: Option<OpaqueIpcReceiver>,
    outcome: OpaqueIpcSender,
    sidecar: &OwnedFd,
) -> i32 {
    let outcome = outcome.to::<Outcome<Packed<F::Output>>>();
    let sidecar = sidecar.as_fd();
    let send = |message: Outcome<Packed<F::Output>>| {
        let returned = matches!(message, Outcome::Returned(_));
        let ring = || payload::ring(sidecar);
        let send = || with_sidecar(sidecar, || outcome.send(message));
        if returned {
            // A value's message is bounded (a large one travels as a memfd, see `payload`)
            // so that it fits in the empty socket's buffer: the send never sleeps, so no
            // signal can interrupt it, and nothing needs holding back (which costs a system
            // call per signal number to find the handled ones).
            payload::take_spilled();
            let sent = send();
            // The parent's join wakes at this child's exit and finds the value buffered:
            // one wake-up instead of two. Rung (after the value, which is there by then)
            // only when the parent should read before this child exits: handles an exit
            // hook waits for the parent to claim. (A large value rang already: its memfd's
            // datagram on the sidecar wakes the parent, which decodes it while this child
            // exits.)
            if sent.is_ok() && !payload::take_spilled() && exit_hooks_registered() {
                ring();
            }
            sent
        } else {
            // Ring first: the parent then waits for the message itself. A panic report or an
            // error message is not bounded and may wait for the parent to read. Only the
            // signals with a handler are held back (they are what would interrupt the
            // transfer); SIGTERM and the like still end the child meanwhile.
            ring();
            sys::without_handled_signals(send)
        }
    };
    decode_error::clear();
    let args = match args {
        // A function of no argument: its default, made here, as the parent did.
        None => match F::default_args() {
            Some(args) => args,
            None => {
                let message = "no argument was sent to a function that takes one";
                let _ = send(Outcome::BadArguments(message.into()));
                return EXIT_BAD_DATA;
            }
        },
        Some(receiver) => {
            let receiver = receiver.to::<Packed<F::Args>>();
            let receive = || payload::receiving_child_argument(|| receiver.recv());
            match sys::without_signals(|| with_sidecar(sidecar, receive)) {
                Ok(Packed(args)) => args,
                Err(e) => {
                    let _ = send(Outcome::BadArguments(decode_error::describe::<F::Args>(e)));
                    return EXIT_BAD_DATA;
                }
            }
        }
    };
    match catch_panic(|| F::recreate().call(args), false) {
        Ok(value) => match send(Outcome::Returned(Packed(value))) {
            Ok(()) => 0,
            Err(e) => {
                let _ = send(Outcome::BadResult(decode_error::describe::<F::Output>(e)));
                EXIT_BAD_DATA
            }
        },
        Err(report) => {
            let _ = send(Outcome::Panicked(report));
            EXIT_PANICKED
        }
    }
}
