//! Naming a Rust function across processes.
//!
//! Closures cannot travel between address spaces, but parent and child run the same binary
//! image, so a function can be named by its address relative to a fixed symbol of that image
//! (see DESIGN.md, "The crux"). [`Entry`] is implemented for every non-capturing closure and
//! `fn` item taking zero or one argument; the argument and the result travel serialized.
//! A [`FunctionId`] names a monomorphised trampoline that decodes the arguments, calls the
//! function (which is zero-sized, so it can be conjured on the other side) and encodes the
//! result.

use std::any::Any;
use std::backtrace::{Backtrace, BacktraceStatus};
use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A function that can run in another process: any non-capturing closure or `fn` item whose
/// argument and result are serde types.
///
/// The `Marker` parameter only keeps the zero-argument and one-argument implementations apart;
/// it is inferred and never written by users. Functions of several arguments take a tuple.
///
/// ```
/// use mp_core::Entry;
/// fn double(x: u64) -> u64 { x * 2 }
/// fn takes_entry<M, F: Entry<M>>(_: F) {}
/// takes_entry(double);
/// takes_entry(|| String::from("no arguments"));
/// takes_entry(|(a, b): (u32, String)| format!("{a}{b}"));
/// ```
pub trait Entry<Marker>: sealed::Sealed<Marker> + Copy + Send + Sync + 'static {
    /// What the function takes (`()` for a function of no argument).
    type Args: Serialize + DeserializeOwned + Send + 'static;
    /// What the function returns.
    type Output: Serialize + DeserializeOwned + Send + 'static;
    /// Calls the function.
    fn call(self, args: Self::Args) -> Self::Output;
    /// The arguments to use when none were given: `Some(())` for a function of no argument.
    fn default_args() -> Option<Self::Args>;
    /// The function itself, made from its type alone. It is zero-sized (a non-capturing
    /// closure or a `fn` item, checked at compile time), so another process that only knows
    /// its type can call it; this is how trampolines and pool workers get hold of it.
    fn recreate() -> Self {
        conjure::<Self>()
    }
}

/// Keeps [`Entry`] implemented only for closures and `fn` items, which are inhabited: that is
/// what makes [`Entry::recreate`] sound.
mod sealed {
    pub trait Sealed<Marker> {}
    impl<F: Fn() -> R, R> Sealed<fn() -> R> for F {}
    impl<F: Fn(A) -> R, A, R> Sealed<fn(A) -> R> for F {}
}

impl<F, R> Entry<fn() -> R> for F
where
    F: Fn() -> R + Copy + Send + Sync + 'static,
    R: Serialize + DeserializeOwned + Send + 'static,
{
    type Args = ();
    type Output = R;
    fn call(self, (): ()) -> R {
        self()
    }
    fn default_args() -> Option<()> {
        Some(())
    }
}

impl<F, A, R> Entry<fn(A) -> R> for F
where
    F: Fn(A) -> R + Copy + Send + Sync + 'static,
    A: Serialize + DeserializeOwned + Send + 'static,
    R: Serialize + DeserializeOwned + Send + 'static,
{
    type Args = A;
    type Output = R;
    fn call(self, args: A) -> R {
        self(args)
    }
    fn default_args() -> Option<A> {
        None
    }
}

/// Fails to compile unless `F` is zero-sized, i.e. a non-capturing closure or a `fn` item.
pub(crate) const fn assert_non_capturing<F>() {
    assert!(
        std::mem::size_of::<F>() == 0,
        "multiproc can only run non-capturing closures or fn items in another process: \
         pass captured values as arguments instead"
    );
}

/// Produces the one value of a zero-sized function type.
fn conjure<F: Copy>() -> F {
    const { assert_non_capturing::<F>() };
    // SAFETY: F is zero-sized (checked at compile time above) and inhabited: `Entry`, the
    // only way here, is sealed to closures and `fn` items, which always are. So F has exactly
    // one value, which has no bytes to initialise, and `Copy` means duplicating it skips no
    // destructor.
    unsafe { std::ptr::NonNull::<F>::dangling().read() }
}

/// The fixed symbol every [`FunctionId`] is relative to.
#[inline(never)]
fn anchor() -> usize {
    anchor as fn() -> usize as usize
}

/// A function of this binary image, named by its offset from a fixed symbol, valid in any
/// process running the same executable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FunctionId {
    offset: i64,
}

impl FunctionId {
    fn of_address(address: usize) -> Self {
        FunctionId {
            offset: address as i64 - anchor() as i64,
        }
    }

    fn address(self) -> usize {
        (anchor() as i64 + self.offset) as usize
    }

    /// The address as a pointer that may be called through, with the provenance exposed by
    /// the `as usize` casts that made the id.
    fn pointer(self) -> *const () {
        std::ptr::with_exposed_provenance(self.address())
    }

    /// Names the byte-level trampoline of `F`: postcard-encoded arguments in, postcard-encoded
    /// result out. This is how a pool runs any function on a long-lived worker.
    pub fn of_task<M, F: Entry<M>>(_: &F) -> Self {
        const { assert_non_capturing::<F>() };
        Self::of_address(run_task::<M, F> as TaskTrampoline as usize)
    }

    /// Runs the task trampoline this id names on postcard-encoded arguments.
    ///
    /// A panic in the function is caught and returned as [`TaskFailure::Panicked`].
    ///
    /// # Safety
    ///
    /// `self` must come from [`FunctionId::of_task`] in a process running this same executable
    /// (ids are addresses; any other value calls an arbitrary address).
    pub unsafe fn call_task(self, input: &[u8]) -> Result<Vec<u8>, TaskFailure> {
        // SAFETY: per this function's contract the address is that of a `run_task::<M, F>`
        // instantiation of this image, which has the `TaskTrampoline` signature. The pointer
        // is rebuilt with the provenance exposed when ids are made (`as usize` on a function
        // pointer exposes it); transmuting the bare integer would make a pointer without
        // provenance, which Miri reports as undefined behaviour.
        let trampoline: TaskTrampoline = unsafe { std::mem::transmute(self.pointer()) };
        trampoline(input)
    }

    pub(crate) fn of_process<M, F: Entry<M>>() -> Self {
        Self::of_address(run_process::<M, F> as ProcessTrampoline as usize)
    }

    /// # Safety
    /// `self` must come from [`FunctionId::of_process`] in a process running this executable.
    pub(crate) unsafe fn process_trampoline(self) -> ProcessTrampoline {
        // SAFETY: per the contract the address is a `run_process::<M, F>` instantiation; the
        // pointer carries exposed provenance (see `call_task`).
        unsafe { std::mem::transmute(self.pointer()) }
    }
}

type TaskTrampoline = fn(&[u8]) -> Result<Vec<u8>, TaskFailure>;
pub(crate) type ProcessTrampoline =
    fn(ipc_channel::ipc::OpaqueIpcReceiver, ipc_channel::ipc::OpaqueIpcSender) -> i32;

/// Why a task run through [`FunctionId::call_task`] produced no result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum TaskFailure {
    /// The function panicked.
    #[error("{0}")]
    Panicked(PanicReport),
    /// The arguments could not be decoded as the function's argument type.
    #[error("the arguments could not be decoded: {0}")]
    BadArguments(String),
    /// The result could not be encoded.
    #[error("the result could not be encoded: {0}")]
    BadResult(String),
}

fn run_task<M, F: Entry<M>>(input: &[u8]) -> Result<Vec<u8>, TaskFailure> {
    let args: F::Args =
        postcard::from_bytes(input).map_err(|e| TaskFailure::BadArguments(e.to_string()))?;
    let output = catch_panic(|| F::recreate().call(args), true).map_err(TaskFailure::Panicked)?;
    postcard::to_allocvec(&output).map_err(|e| TaskFailure::BadResult(e.to_string()))
}

/// What a child sends back at the end of a process.
#[derive(Serialize, Deserialize)]
pub(crate) enum Outcome<R> {
    Returned(R),
    Panicked(PanicReport),
    BadArguments(String),
    BadResult(String),
}

/// Exit code of a child whose function panicked, as Python's for an uncaught exception.
pub(crate) const EXIT_PANICKED: i32 = 1;
/// Exit code of a child that could not decode its arguments or encode its result.
pub(crate) const EXIT_BAD_DATA: i32 = 2;

fn run_process<M, F: Entry<M>>(
    args: ipc_channel::ipc::OpaqueIpcReceiver,
    outcome: ipc_channel::ipc::OpaqueIpcSender,
) -> i32 {
    let args = args.to::<F::Args>();
    let outcome = outcome.to::<Outcome<F::Output>>();
    let send = |message: Outcome<F::Output>| outcome.send(message);
    let args = match args.recv() {
        Ok(args) => args,
        Err(e) => {
            let _ = send(Outcome::BadArguments(e.to_string()));
            return EXIT_BAD_DATA;
        }
    };
    match catch_panic(|| F::recreate().call(args), false) {
        Ok(value) => match send(Outcome::Returned(value)) {
            Ok(()) => 0,
            Err(e) => {
                let _ = send(Outcome::BadResult(e.to_string()));
                EXIT_BAD_DATA
            }
        },
        Err(report) => {
            let _ = send(Outcome::Panicked(report));
            EXIT_PANICKED
        }
    }
}

/// A panic caught in another process: its message, where it happened, and the backtrace when
/// `RUST_BACKTRACE` asked for one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PanicReport {
    /// The panic message.
    pub message: String,
    /// `file:line:column` of the panic, when known.
    pub location: Option<String>,
    /// The child's backtrace, captured when `RUST_BACKTRACE` is set.
    pub backtrace: Option<String>,
}

impl std::fmt::Display for PanicReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "panicked")?;
        if let Some(location) = &self.location {
            write!(f, " at {location}")?;
        }
        write!(f, ": {}", self.message)
    }
}

thread_local! {
    /// Set while `catch_panic` runs: the hook records into `LAST_PANIC` instead of only printing.
    static CATCHING: Cell<Option<bool>> = const { Cell::new(None) };
    static LAST_PANIC: RefCell<Option<PanicReport>> = const { RefCell::new(None) };
}

fn install_panic_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| match CATCHING.with(Cell::get) {
            Some(quiet) => {
                let backtrace = Backtrace::capture();
                let report = PanicReport {
                    message: payload_message(info.payload()),
                    location: info.location().map(|l| l.to_string()),
                    backtrace: (backtrace.status() == BacktraceStatus::Captured)
                        .then(|| backtrace.to_string()),
                };
                LAST_PANIC.with(|last| *last.borrow_mut() = Some(report));
                if !quiet {
                    previous(info);
                }
            }
            None => previous(info),
        }));
    });
}

fn payload_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "Box<dyn Any>".to_owned()
    }
}

/// Runs `f`, turning a panic into a [`PanicReport`]. With `quiet`, the panic is not printed.
pub(crate) fn catch_panic<T>(f: impl FnOnce() -> T, quiet: bool) -> Result<T, PanicReport> {
    install_panic_hook();
    let outer = CATCHING.with(|c| c.replace(Some(quiet)));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(outer));
    result.map_err(|payload| {
        LAST_PANIC
            .with(|last| last.borrow_mut().take())
            .unwrap_or_else(|| PanicReport {
                message: payload_message(payload.as_ref()),
                location: None,
                backtrace: None,
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn square(x: u64) -> u64 {
        x * x
    }

    #[test]
    fn task_round_trip_through_its_id() {
        let id = FunctionId::of_task(&square);
        let input = postcard::to_allocvec(&7u64).unwrap();
        // SAFETY: the id was made by of_task in this process.
        let output = unsafe { id.call_task(&input) }.unwrap();
        assert_eq!(postcard::from_bytes::<u64>(&output).unwrap(), 49);
    }

    #[test]
    fn ids_differ_per_function_and_survive_serialization() {
        let a = FunctionId::of_task(&square);
        let b = FunctionId::of_task(&|s: String| s.len());
        assert_ne!(a, b);
        let bytes = postcard::to_allocvec(&a).unwrap();
        assert_eq!(postcard::from_bytes::<FunctionId>(&bytes).unwrap(), a);
    }

    #[test]
    fn task_panic_is_a_report_with_location() {
        let id = FunctionId::of_task(&|x: u32| -> u32 { panic!("bad {x}") });
        let input = postcard::to_allocvec(&3u32).unwrap();
        // SAFETY: the id was made by of_task in this process.
        match unsafe { id.call_task(&input) } {
            Err(TaskFailure::Panicked(report)) => {
                assert_eq!(report.message, "bad 3");
                assert!(report.location.unwrap().contains("function.rs"));
            }
            other => panic!("expected a panic report, got {other:?}"),
        }
    }

    #[test]
    fn malformed_task_input_is_an_error() {
        let id = FunctionId::of_task(&square);
        // SAFETY: the id was made by of_task in this process.
        let result = unsafe { id.call_task(&[0xff, 0xff, 0xff]) };
        assert!(matches!(result, Err(TaskFailure::BadArguments(_))));
    }
}
