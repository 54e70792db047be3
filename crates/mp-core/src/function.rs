//! Naming a Rust function across processes.
//!
//! Closures cannot travel between address spaces, but parent and child run the same binary
//! image, so a function can be named by its address relative to a fixed symbol of that image
//! (see DESIGN.md, "The crux"). [`Entry`] is implemented for every non-capturing closure and
//! `fn` item taking zero or one argument; the argument and the result travel serialized.
//! A [`FunctionId`] names a monomorphised trampoline that decodes the arguments, calls the
//! function (which is zero-sized, so it can be conjured on the other side) and encodes the
//! result.

//!
//! An address decoded from bytes must never be called: every id carries a tag, a MAC of its
//! offset under the run's secret [`RunKey`], and decoding checks it. The key is made on first
//! use in the process that starts a run and travels to each child in its bootstrap header
//! (never through the environment); a peer mp-core did not start (an MPI rank) is given it
//! with [`adopt_run_key`].

use std::any::Any;
use std::backtrace::{Backtrace, BacktraceStatus};
use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Once, OnceLock};

use hmac::{Hmac, Mac};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::decode_error;
pub use crate::protocol::PanicReport;
use crate::protocol::{RawFunctionId, RunKey};

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

static RUN_KEY: OnceLock<RunKey> = OnceLock::new();

/// The key of this run, made on first use (see [`RunKey`]).
///
/// Hand it to a peer of the same executable that mp-core did not start (an MPI rank, a
/// process started by a supervisor) over a channel you trust, and have the peer call
/// [`adopt_run_key`] before it decodes any [`FunctionId`]; children started by mp-core get it
/// at bootstrap.
pub fn run_key() -> RunKey {
    RUN_KEY.get_or_init(fresh_run_key).clone()
}

fn fresh_run_key() -> RunKey {
    let mut key = [0u8; 32];
    let mut filled = 0;
    while filled < key.len() {
        match rustix::rand::getrandom(&mut key[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(error) => {
                // getrandom(2) exists since Linux 3.17; /dev/urandom is the older way.
                use std::io::Read;
                let read = std::fs::File::open("/dev/urandom")
                    .and_then(|mut random| random.read_exact(&mut key));
                if let Err(fallback) = read {
                    panic!(
                        "no randomness for the run key: getrandom: {error}, /dev/urandom: {fallback}"
                    );
                }
                break;
            }
        }
    }
    RunKey(key)
}

/// [`adopt_run_key`] was called in a process that already uses another key.
#[derive(Debug, thiserror::Error)]
#[error(
    "this process already uses another run key (it made or checked a FunctionId before \
     adopting one): adopt the key before anything else"
)]
pub struct RunKeyConflict;

/// Makes this process accept the [`FunctionId`]s of the run `key` belongs to, and tag its own
/// with it. Children started by mp-core adopt their parent's key at bootstrap by themselves;
/// this is for peers mp-core did not start, e.g. MPI ranks launched by `mpirun`: rank 0 sends
/// [`run_key`] to the others, which adopt it before decoding any id. Adopting the key this
/// process already has is a no-op; adopting another one after the first was made or used is
/// refused ([`RunKeyConflict`]).
///
/// # Safety
///
/// Whoever knows the key can make this process call any address. `key` must come from
/// [`run_key`] in a process running this same executable file (ids are offsets in its image),
/// over a channel no one else can write to, and it must not be disclosed further.
pub unsafe fn adopt_run_key(key: RunKey) -> Result<(), RunKeyConflict> {
    let current = RUN_KEY.get_or_init(|| key.clone());
    if *current == key {
        Ok(())
    } else {
        Err(RunKeyConflict)
    }
}

/// What an id names: tags are computed per kind, so an id of one kind can never pass for the
/// other (their trampolines have different signatures).
#[derive(Clone, Copy)]
pub(crate) enum IdKind {
    /// A `task_trampoline::<M, F>`: the only kind a public [`FunctionId`] has.
    Task = 1,
    /// A process trampoline (`child::run_process::<M, F>`), carried raw in bootstrap headers.
    Process = 2,
}

/// The tag of `offset` under this run's key: HMAC-SHA256 of kind and offset, truncated to 64
/// bits.
pub(crate) fn tag_of(kind: IdKind, offset: i64) -> u64 {
    let key = RUN_KEY.get_or_init(fresh_run_key);
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&key.0).expect("HMAC takes any key length");
    mac.update(&[kind as u8]);
    mac.update(&offset.to_le_bytes());
    let digest = mac.finalize().into_bytes();
    u64::from_le_bytes(
        digest[..8]
            .try_into()
            .expect("a SHA-256 digest has 32 bytes"),
    )
}

/// Does, once, in a fork server, the lazy set-up every forked child would otherwise repeat
/// on its first id check and its first call: the SHA-256 implementation's CPU feature
/// detection (CPUID, which a hypervisor traps: tens of microseconds per child on a VM) and
/// the panic hook. Children inherit both.
pub(crate) fn warm_up_for_children() {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(&[0; 32]).expect("HMAC takes any key length");
    mac.update(&[0]);
    std::hint::black_box(mac.finalize().into_bytes());
    install_panic_hook();
    // The thread-locals with a destructor that a child touches: the first touch registers
    // the destructor with glibc (`__cxa_thread_atexit_impl`, which locks the dynamic
    // loader's state), a few copy-on-write page faults in every child that the server's
    // touch saves them.
    LAST_PANIC.with(|last| drop(last.borrow_mut().take()));
    crate::decode_error::clear();
}

thread_local! {
    /// The last id this thread checked: a pool decodes the same id for every task.
    static LAST_CHECKED: Cell<Option<RawFunctionId>> = const { Cell::new(None) };
}

/// A [`FunctionId`] decoded from bytes that was not made in this run: a forgery, corrupt
/// data, or an id from another program or run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "a FunctionId that was not made in this run (offset {offset:#x}): refusing to call it; \
     ids are only valid in processes of the run that made them (see mp_core::adopt_run_key)"
)]
pub struct ForgedFunctionId {
    /// The offset the forged id claimed.
    pub offset: i64,
}

/// A function of this binary image, valid in every process of the same run of the same
/// executable.
///
/// It is named by its offset from a fixed symbol and tagged with a MAC under the run's
/// [`RunKey`]; decoding one checks the tag, so an id made up or read from untrusted bytes is
/// rejected ([`ForgedFunctionId`]) rather than called.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawFunctionId", into = "RawFunctionId")]
pub struct FunctionId {
    raw: RawFunctionId,
}

impl TryFrom<RawFunctionId> for FunctionId {
    type Error = ForgedFunctionId;
    fn try_from(raw: RawFunctionId) -> Result<Self, ForgedFunctionId> {
        if LAST_CHECKED.with(Cell::get) == Some(raw) {
            return Ok(FunctionId { raw });
        }
        if tag_of(IdKind::Task, raw.offset) != raw.tag {
            let forged = ForgedFunctionId { offset: raw.offset };
            decode_error::note_decode_failure(&forged);
            return Err(forged);
        }
        LAST_CHECKED.with(|last| last.set(Some(raw)));
        Ok(FunctionId { raw })
    }
}

impl From<FunctionId> for RawFunctionId {
    fn from(id: FunctionId) -> RawFunctionId {
        id.raw
    }
}

/// The raw id of `address`, a function of this image of the given kind, tagged for this run.
pub(crate) fn raw_id_of(kind: IdKind, address: usize) -> RawFunctionId {
    let offset = address as i64 - anchor() as i64;
    RawFunctionId {
        offset,
        tag: tag_of(kind, offset),
    }
}

/// The address `raw` names if its tag proves it was made as an id of `kind` in this run.
pub(crate) fn checked_address(kind: IdKind, raw: RawFunctionId) -> Result<usize, ForgedFunctionId> {
    if tag_of(kind, raw.offset) != raw.tag {
        return Err(ForgedFunctionId { offset: raw.offset });
    }
    Ok((anchor() as i64 + raw.offset) as usize)
}

impl FunctionId {
    fn of_address(kind: IdKind, address: usize) -> Self {
        FunctionId {
            raw: raw_id_of(kind, address),
        }
    }

    /// The address this id names. A `FunctionId` exists only if made by `of_task` in a
    /// process of this run (decoding checks the tag), so it is a task trampoline of this image.
    fn address(self) -> usize {
        (anchor() as i64 + self.raw.offset) as usize
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
        Self::of_address(
            IdKind::Task,
            task_trampoline::<M, F> as TaskTrampoline as usize,
        )
    }

    /// Runs the task trampoline this id names on postcard-encoded arguments.
    ///
    /// A panic in the function is caught and returned as [`TaskFailure::Panicked`].
    pub fn run_task(self, input: &[u8]) -> Result<Vec<u8>, TaskFailure> {
        // SAFETY: a FunctionId is made only by `of_task`, from a `task_trampoline::<M, F>`
        // instantiation of this executable (which has the `TaskTrampoline` signature), or
        // decoded from bytes, which checks its tag: a MAC of (IdKind::Task, offset) under the
        // run key, which only processes of this run (running this executable) hold. So the
        // address is such a trampoline. Process trampolines are tagged as IdKind::Process and
        // can never pass this check. The pointer is rebuilt with the provenance exposed when
        // ids are made (`as usize` on a function pointer exposes it); transmuting the bare
        // integer would make a pointer without provenance, which Miri reports as UB.
        let trampoline: TaskTrampoline = unsafe { std::mem::transmute(self.pointer()) };
        trampoline(input)
    }

    /// Runs the task trampoline this id names: [`run_task`](Self::run_task), kept for the
    /// callers written when ids could be forged.
    ///
    /// # Safety
    ///
    /// None beyond `run_task`'s: ids are checked when decoded. This stays an `unsafe fn` so
    /// that existing `unsafe` call sites still compile without warnings.
    pub unsafe fn call_task(self, input: &[u8]) -> Result<Vec<u8>, TaskFailure> {
        self.run_task(input)
    }
}

type TaskTrampoline = fn(&[u8]) -> Result<Vec<u8>, TaskFailure>;

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

fn task_trampoline<M, F: Entry<M>>(input: &[u8]) -> Result<Vec<u8>, TaskFailure> {
    decode_error::clear();
    let args: F::Args = postcard::from_bytes(input).map_err(|e| {
        TaskFailure::BadArguments(decode_error::describe_decode::<F::Args>(input, e))
    })?;
    let output = catch_panic(|| F::recreate().call(args), true).map_err(TaskFailure::Panicked)?;
    postcard::to_allocvec(&output)
        .map_err(|e| TaskFailure::BadResult(decode_error::describe_encode(&output, e)))
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

    /// A result whose `Serialize` refuses with a message of its own.
    #[derive(Debug, Deserialize)]
    struct Unsendable;

    impl Serialize for Unsendable {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("this value stays in its process"))
        }
    }

    #[test]
    fn a_result_that_refuses_to_encode_names_its_type_and_says_why() {
        let id = FunctionId::of_task(&|_: u8| Unsendable);
        let input = postcard::to_allocvec(&0u8).unwrap();
        // SAFETY: the id was made by of_task in this process.
        match unsafe { id.call_task(&input) } {
            Err(TaskFailure::BadResult(message)) => assert!(
                message.contains("Unsendable") && message.contains("stays in its process"),
                "{message}"
            ),
            other => panic!("expected BadResult, got {other:?}"),
        }
    }

    /// An argument that refuses odd numbers in its own words.
    #[derive(Debug, Serialize)]
    struct Even(u32);

    impl<'de> Deserialize<'de> for Even {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            let n = u32::deserialize(deserializer)?;
            if n % 2 == 1 {
                return Err(serde::de::Error::custom(format!("{n} is odd")));
            }
            Ok(Even(n))
        }
    }

    #[test]
    fn an_argument_that_refuses_to_decode_names_its_type_and_says_why() {
        let id = FunctionId::of_task(&|e: Even| e.0);
        let input = postcard::to_allocvec(&Even(3)).unwrap();
        // SAFETY: the id was made by of_task in this process.
        match unsafe { id.call_task(&input) } {
            Err(TaskFailure::BadArguments(message)) => assert!(
                message.contains("Even") && message.contains("3 is odd"),
                "{message}"
            ),
            other => panic!("expected BadArguments, got {other:?}"),
        }
    }
}
