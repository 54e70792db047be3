//! Processes under the conditions of real programs: handled signals during start and join,
//! forks from threads, inherited descriptors, closed stdio, forged function ids. Every join is
//! bounded and every test reaps what it starts.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ipc_channel::ipc::{self, IpcSender};
use mp_core::{FunctionId, Process, ProcessError, StartMethod};
use serde::{Deserialize, Serialize};

/// The longest any join here may take before the test fails instead of hanging.
const BOUND: Duration = Duration::from_secs(20);

static HANDLED: AtomicUsize = AtomicUsize::new(0);

extern "C" fn count_signal(_: libc::c_int) {
    HANDLED.fetch_add(1, Ordering::Relaxed);
}

/// Installs a counting handler for `signal`, with or without SA_RESTART.
fn install_handler(signal: i32, restart: bool) {
    // SAFETY: a zeroed sigaction is valid; the handler only touches an atomic
    // (async-signal-safe); sigaction reads the struct we own.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = count_signal as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = if restart { libc::SA_RESTART } else { 0 };
        libc::sigemptyset(&mut action.sa_mask);
        assert_eq!(libc::sigaction(signal, &action, std::ptr::null_mut()), 0);
    }
}

fn tid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Sends `signal` to thread `tid` of this process and to the process as a whole, about every
/// 50 µs, until dropped.
struct Flood {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
}

impl Flood {
    fn start(signal: i32, tid: i32) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let pid = std::process::id() as i32;
            let mut sent = 0;
            while !flag.load(Ordering::Relaxed) {
                // SAFETY: tgkill and kill take plain integers; the handler is installed.
                unsafe {
                    libc::syscall(libc::SYS_tgkill, pid, tid, signal);
                    libc::kill(pid, signal);
                }
                sent += 2;
                std::thread::sleep(Duration::from_micros(50));
            }
            sent
        });
        Flood {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A pidfd of process `pid` (ours or not), opened while it is known to exist.
fn pidfd_of(pid: u32) -> OwnedFd {
    rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::PidfdFlags::empty(),
    )
    .unwrap()
}

/// Waits (bounded by [`BOUND`]) for the process behind `pidfd` to end; whether it did.
fn ends_within_bound(pidfd: &OwnedFd) -> bool {
    let mut fds = [rustix::event::PollFd::new(
        pidfd,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::event::Timespec {
        tv_sec: BOUND.as_secs() as i64,
        tv_nsec: 0,
    };
    rustix::io::retry_on_intr(|| rustix::event::poll(&mut fds, Some(&timeout))).unwrap() == 1
}

fn park_forever() {
    loop {
        std::thread::park();
    }
}

/// Under a stream of handled signals, starts and joins 100 children per start method (half
/// with SA_RESTART, half without; every tenth returns 1 MiB and every tenth is given 1 MiB,
/// so those travel as memfds):
/// every start succeeds, every value and exit status is exact, and a bystander child started
/// before the flood is still alive after it.
#[test]
fn a_flood_of_handled_signals_breaks_no_start_and_no_join() {
    let bystanders: Vec<_> = StartMethod::ALL
        .into_iter()
        .map(|method| {
            Process::new(park_forever)
                .start_method(method)
                .daemon(true)
                .start()
                .unwrap()
        })
        .collect();
    for restart in [true, false] {
        install_handler(libc::SIGUSR1, restart);
        let flood = Flood::start(libc::SIGUSR1, tid());
        let before = HANDLED.load(Ordering::Relaxed);
        for method in StartMethod::ALL {
            for i in 0..50u64 {
                let size = if i % 10 == 0 { 1 << 20 } else { 8 };
                let given = vec![i as u8; if i % 10 == 5 { 1 << 20 } else { 3 }];
                let child = Process::new(|(i, size, given): (u64, usize, Vec<u8>)| {
                    let intact = given.iter().all(|&b| b == i as u8);
                    (
                        i * 3 + given.len() as u64 * u64::from(intact),
                        vec![i as u8; size],
                    )
                })
                .args((i, size, given.clone()))
                .start_method(method)
                .start()
                .unwrap_or_else(|e| panic!("{method} start {i} (restart={restart}): {e}"));
                let (value, bytes) = child
                    .join_timeout(BOUND)
                    .unwrap_or_else(|e| panic!("{method} join {i} (restart={restart}): {e}"));
                assert_eq!(value, i * 3 + given.len() as u64);
                assert_eq!(bytes.len(), size);
                assert!(bytes.iter().all(|&b| b == i as u8));
                assert_eq!(child.exitcode(), Some(0), "{method} child {i}");
            }
        }
        let sent = flood.finish();
        let handled = HANDLED.load(Ordering::Relaxed) - before;
        assert!(
            sent > 100 && handled > 100,
            "the flood was too thin: {sent} sent, {handled} handled"
        );
    }
    for (bystander, method) in bystanders.iter().zip(StartMethod::ALL) {
        assert!(
            bystander.is_alive(),
            "{method} bystander died during the flood"
        );
        bystander.kill().unwrap();
        assert!(matches!(
            bystander.join_timeout(BOUND),
            Err(ProcessError::Signaled {
                signal: libc::SIGKILL,
                ..
            })
        ));
    }
}

/// A fork-started child whose parent forked it from a thread (the case where the launcher's
/// lock used to be copied held) starts children of its own from a thread, under every start
/// method.
#[test]
fn a_child_forked_from_a_thread_starts_processes_from_any_thread() {
    fn grandchildren() -> Vec<u64> {
        StartMethod::ALL
            .into_iter()
            .map(|method| {
                std::thread::spawn(move || {
                    let child = Process::new(|x: u64| x + 1)
                        .args(method as u64)
                        .start_method(method)
                        .start()
                        .unwrap();
                    child.join_timeout(BOUND).unwrap()
                })
                .join()
                .unwrap()
            })
            .collect()
    }
    // Keep other threads busy starting children while the fork happens.
    let busy = std::thread::spawn(|| {
        for _ in 0..20 {
            let child = Process::new(|| 1u8)
                .start_method(StartMethod::ForkServer)
                .start()
                .unwrap();
            child.join_timeout(BOUND).unwrap();
        }
    });
    let result = std::thread::spawn(|| {
        (0..5)
            .map(|_| {
                // A daemon: if it hangs, the join times out and the exit does not wait for it.
                let child = Process::new(grandchildren)
                    .start_method(StartMethod::Fork)
                    .daemon(true)
                    .start()
                    .unwrap();
                child.join_timeout(BOUND)
            })
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    busy.join().unwrap();
    for outcome in result {
        assert_eq!(outcome.unwrap(), vec![1, 2, 3]);
    }
}

fn open_descriptors_at_and_above(first: i32) -> Vec<i32> {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd >= first)
        .collect()
}

/// A descriptor at 50 or above without close-on-exec (a socket the program made inheritable)
/// does not reach spawn and forkserver children; they hold nothing above the library's own
/// fixed descriptors but what they open themselves.
#[test]
fn inheritable_descriptors_do_not_reach_spawned_children() {
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    // SAFETY: dup2 onto a high, unused slot; the copy is owned below and has no CLOEXEC.
    let high = unsafe {
        assert_eq!(libc::dup2(a.as_raw_fd(), 77), 77);
        OwnedFd::from_raw_fd(77)
    };
    drop((a, b));
    for method in [StartMethod::Spawn, StartMethod::ForkServer] {
        let child = Process::new(|fd: i32| {
            let open = std::fs::metadata(format!("/proc/self/fd/{fd}")).is_ok();
            (open, open_descriptors_at_and_above(50))
        })
        .args(high.as_raw_fd())
        .start_method(method)
        .start()
        .unwrap();
        let (open, high_ones) = child.join_timeout(BOUND).unwrap();
        assert!(!open, "{method}: fd 77 leaked");
        // read_dir's own descriptor is low (the child has few open), so nothing is above 50.
        assert!(
            high_ones.is_empty(),
            "{method}: {high_ones:?} open in the child"
        );
    }
}

/// The signal state a spawned child starts its function with: (the signals blocked on its
/// thread, whether SIGTTIN is ignored, whether SIGUSR2 is at its default).
fn signal_state() -> (Vec<i32>, bool, bool) {
    // SAFETY: sigprocmask and sigaction with null new values only write into the live
    // locals; sigismember reads the set they filled.
    unsafe {
        let mut mask: libc::sigset_t = std::mem::zeroed();
        assert_eq!(
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask),
            0
        );
        let blocked = (1..libc::SIGRTMIN())
            .filter(|&signal| libc::sigismember(&mask, signal) == 1)
            .collect();
        let disposition = |signal| {
            let mut action: libc::sigaction = std::mem::zeroed();
            assert_eq!(libc::sigaction(signal, std::ptr::null(), &mut action), 0);
            action.sa_sigaction
        };
        (
            blocked,
            disposition(libc::SIGTTIN) == libc::SIG_IGN,
            disposition(libc::SIGUSR2) == libc::SIG_DFL,
        )
    }
}

/// A spawned child starts as one started by `posix_spawn` with an empty mask would: whatever
/// the starting thread blocks, nothing is blocked in the child; a signal the parent ignores
/// stays ignored; one it handles is back at its default.
#[test]
fn spawned_children_start_with_an_empty_mask_and_the_parents_ignored_signals() {
    install_handler(libc::SIGUSR2, true);
    // SAFETY: setting SIGTTIN's disposition to SIG_IGN has no memory-safety preconditions;
    // pthread_sigmask reads the local set that sigaddset filled.
    unsafe {
        libc::signal(libc::SIGTTIN, libc::SIG_IGN);
        let mut block: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut block);
        libc::sigaddset(&mut block, libc::SIGTERM);
        libc::sigaddset(&mut block, libc::SIGCHLD);
        assert_eq!(
            libc::pthread_sigmask(libc::SIG_BLOCK, &block, std::ptr::null_mut()),
            0
        );
    }
    let child = Process::new(signal_state)
        .start_method(StartMethod::Spawn)
        .start()
        .unwrap();
    let (blocked, ttin_ignored, usr2_default) = child.join_timeout(BOUND).unwrap();
    assert_eq!(blocked, Vec::<i32>::new(), "blocked in the child");
    assert!(ttin_ignored, "SIGTTIN is no longer ignored in the child");
    assert!(usr2_default, "SIGUSR2's handler reached the child");
}

/// With fd 1 and 2 closed in the parent, a child's `println!`/`eprintln!` write to /dev/null,
/// never into the library's channel: the join returns the value.
#[test]
fn closed_stdio_in_the_parent_does_not_corrupt_the_channel() {
    // Run in a child so closing our stdio does not blind the test harness.
    let outer = Process::new(|| {
        // SAFETY: closing stdio descriptors; nothing in this process uses them afterwards
        // but through the library, which must cope.
        unsafe {
            libc::close(1);
            libc::close(2);
        }
        StartMethod::ALL
            .into_iter()
            .map(|method| {
                let child = Process::new(|| {
                    for _ in 0..1000 {
                        println!("noise on stdout");
                        eprintln!("noise on stderr");
                    }
                    let target = |fd: i32| {
                        std::fs::read_link(format!("/proc/self/fd/{fd}"))
                            .map(|p| p.display().to_string())
                            .unwrap_or_default()
                    };
                    (target(1), target(2), 42u32)
                })
                .start_method(method)
                .start()
                .map_err(|e| e.to_string())?;
                child.join_timeout(BOUND).map_err(|e| e.to_string())
            })
            .collect::<Vec<_>>()
    })
    .start()
    .unwrap();
    let results = outer.join_timeout(BOUND * 2).unwrap();
    for (result, method) in results.into_iter().zip(StartMethod::ALL) {
        let (out, err, value) = result.unwrap_or_else(|e| panic!("{method}: {e}"));
        assert_eq!(value, 42, "{method}");
        assert_eq!(out, "/dev/null", "{method}: stdout is {out}");
        assert_eq!(err, "/dev/null", "{method}: stderr is {err}");
    }
}

#[derive(Serialize, Deserialize)]
struct RawId {
    offset: i64,
    tag: u64,
}

/// An id made up from bytes, or taken from a real one with its offset changed, is refused
/// with a typed error; a real one round-trips.
#[test]
fn forged_function_ids_are_refused() {
    fn double(x: u32) -> u32 {
        x * 2
    }
    let real = FunctionId::of_task(&double);
    let bytes = postcard::to_allocvec(&real).unwrap();
    let decoded: FunctionId = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(decoded, real);
    let output = decoded
        .run_task(&postcard::to_allocvec(&21u32).unwrap())
        .unwrap();
    assert_eq!(postcard::from_bytes::<u32>(&output).unwrap(), 42);

    let RawId { offset, tag } = postcard::from_bytes(&bytes).unwrap();
    for forged in [
        RawId { offset: 0, tag: 0 },
        RawId {
            offset: offset + 16,
            tag,
        },
        RawId {
            offset,
            tag: tag ^ 1,
        },
    ] {
        let forged = postcard::to_allocvec(&forged).unwrap();
        assert!(postcard::from_bytes::<FunctionId>(&forged).is_err());
    }
    // The typed error, as a serde format with messages reports it.
    let error = mp_core::ForgedFunctionId { offset: 16 };
    assert!(error.to_string().contains("not made in this run"));
}

/// The run key reaches children (ids made in the parent are accepted there, and ids made in
/// a child are accepted by the parent), and a peer cannot adopt a second key.
#[test]
fn ids_cross_processes_of_one_run_under_every_start_method() {
    fn triple(x: u32) -> u32 {
        x * 3
    }
    let id = FunctionId::of_task(&triple);
    for method in StartMethod::ALL {
        let child = Process::new(|(id, x): (FunctionId, u32)| {
            let out = id.run_task(&postcard::to_allocvec(&x).unwrap()).unwrap();
            let made_here = FunctionId::of_task(&|y: u32| y + 1);
            (postcard::from_bytes::<u32>(&out).unwrap(), made_here)
        })
        .args((id, 5))
        .start_method(method)
        .start()
        .unwrap();
        let (value, made_there) = child.join_timeout(BOUND).unwrap();
        assert_eq!(value, 15, "{method}");
        let out = made_there
            .run_task(&postcard::to_allocvec(&1u32).unwrap())
            .unwrap();
        assert_eq!(postcard::from_bytes::<u32>(&out).unwrap(), 2, "{method}");
    }
    let key = mp_core::run_key();
    // SAFETY: the key is this process's own.
    assert!(unsafe { mp_core::adopt_run_key(key) }.is_ok());
    let other: mp_core::RunKey = postcard::from_bytes(&[7u8; 32]).unwrap();
    // SAFETY: refused (a key is already in use), so nothing is adopted.
    assert!(unsafe { mp_core::adopt_run_key(other) }.is_err());
}

/// A daemon may have children here (Python forbids it, because a daemon terminated at exit
/// would orphan them): every child has a parent-death signal, so a daemon's children die
/// with it, however it ends.
#[test]
fn a_daemons_children_die_with_it() {
    for method in StartMethod::ALL {
        let (pid_tx, pid_rx) = ipc::channel::<u32>().unwrap();
        let daemon = Process::new(|(method, report): (StartMethod, IpcSender<u32>)| {
            let grandchild = Process::new(park_forever)
                .start_method(method)
                .start()
                .unwrap();
            report.send(grandchild.pid()).unwrap();
            park_forever()
        })
        .args((method, pid_tx))
        .daemon(true)
        .start_method(method)
        .start()
        .unwrap();
        let grandchild = pid_rx.try_recv_timeout(BOUND).unwrap();
        let grandchild = pidfd_of(grandchild);
        daemon.terminate().unwrap();
        assert!(matches!(
            daemon.join_timeout(BOUND),
            Err(ProcessError::Signaled {
                signal: libc::SIGTERM,
                ..
            })
        ));
        assert!(
            ends_within_bound(&grandchild),
            "{method}: the daemon's child outlived it"
        );
    }
}

/// A child's death is seen by a waiting join promptly: the join sleeps on the pidfd itself.
#[test]
fn join_wakes_when_the_child_dies() {
    for method in StartMethod::ALL {
        let child = Process::new(park_forever)
            .start_method(method)
            .start()
            .unwrap();
        let pid = child.pid();
        let killer = std::thread::spawn(move || {
            // SAFETY: kill takes plain integers; the child is not reaped before the join.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            Instant::now()
        });
        let result = child.join_timeout(BOUND);
        let woke = Instant::now();
        let killed = killer.join().unwrap();
        assert!(matches!(
            result,
            Err(ProcessError::Signaled {
                signal: libc::SIGKILL,
                ..
            })
        ));
        // Generous bound (a shared 2-core VM): what it guards against is a polling join.
        assert!(
            woke - killed < Duration::from_millis(500),
            "{method}: {:?}",
            woke - killed
        );
    }
}

/// A value that fails to decode for a reason of its own, the way a handle whose shared segment
/// is gone does: it notes the reason, then fails.
#[derive(Debug)]
struct Unattachable;

impl Serialize for Unattachable {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("/mp-segment-that-was-unlinked")
    }
}

impl<'de> Deserialize<'de> for Unattachable {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        let message = format!("shared memory segment {name:?} not found");
        mp_core::note_decode_failure(&message);
        Err(serde::de::Error::custom(message))
    }
}

/// Arguments and results that fail to decode name their Rust type and the value's own reason
/// in the parent's join, under every start method.
#[test]
fn decode_failures_keep_their_cause_across_processes() {
    for method in StartMethod::ALL {
        let child = Process::new(|_: Unattachable| 1u8)
            .args(Unattachable)
            .start_method(method)
            .start()
            .unwrap();
        match child.join_timeout(BOUND) {
            Err(ProcessError::BadArguments { message, .. }) => {
                assert!(message.contains("Unattachable"), "{method}: {message}");
                assert!(
                    message.contains("\"/mp-segment-that-was-unlinked\" not found"),
                    "{method}: {message}"
                );
            }
            other => panic!("{method}: expected BadArguments, got {other:?}"),
        }
        let child = Process::new(|| Unattachable)
            .start_method(method)
            .start()
            .unwrap();
        match child.join_timeout(BOUND) {
            Err(ProcessError::BadResult { message, .. }) => {
                assert!(message.contains("Unattachable"), "{method}: {message}");
                assert!(message.contains("not found"), "{method}: {message}");
            }
            other => panic!("{method}: expected BadResult, got {other:?}"),
        }
    }
}

/// An argument that refuses to be encoded.
struct Unencodable;

impl Serialize for Unencodable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("refuses to be encoded"))
    }
}

impl<'de> Deserialize<'de> for Unencodable {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        <()>::deserialize(deserializer).map(|()| Unencodable)
    }
}

/// An argument that cannot be encoded fails the start with a typed error naming its type,
/// under every start method (forked children are sent theirs before they run), and leaves
/// nothing behind: the start method works afterwards and no child is left running.
#[test]
fn an_argument_that_cannot_be_encoded_fails_the_start_and_leaves_nothing_behind() {
    for method in StartMethod::ALL {
        match Process::new(|_: Unencodable| 1u8)
            .args(Unencodable)
            .start_method(method)
            .start()
        {
            Err(ProcessError::StartFailed(message)) => {
                assert!(message.contains("Unencodable"), "{method}: {message}");
                // The argument's own reason, which postcard drops, is found again.
                assert!(
                    message.contains("refuses to be encoded"),
                    "{method}: {message}"
                );
            }
            other => panic!("{method}: expected StartFailed, got {other:?}"),
        }
        // A result that refuses: the child's BadResult says why.
        let child = Process::new(|| Unencodable)
            .start_method(method)
            .start()
            .unwrap();
        match child.join_timeout(BOUND) {
            Err(ProcessError::BadResult { message, .. }) => assert!(
                message.contains("Unencodable") && message.contains("refuses to be encoded"),
                "{method}: {message}"
            ),
            other => panic!("{method}: expected BadResult, got {:?}", other.map(|_| ())),
        }
        let child = Process::new(|| 5u8).start_method(method).start().unwrap();
        assert_eq!(child.join_timeout(BOUND).unwrap(), 5, "{method}");
    }
    assert!(mp_core::active_children().is_empty());
}

/// Runs this test binary's test `name` in a new mount namespace with an empty tmpfs over
/// /proc, and returns whether it passed; `None` (with a message) where that is not
/// permitted here.
fn run_with_proc_hidden(name: &str) -> Option<bool> {
    let hide = "mount -t tmpfs none /proc";
    let probe = std::process::Command::new("unshare")
        .args(["--mount", "sh", "-c", hide])
        .stderr(std::process::Stdio::null())
        .status();
    if !probe.is_ok_and(|s| s.success()) {
        eprintln!("skipped: cannot hide /proc here (needs `unshare --mount` and mount rights)");
        return None;
    }
    let mut inner = std::process::Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg(format!("{hide} && exec \"$0\" --exact {name} --nocapture"))
        .arg(std::env::current_exe().unwrap())
        .env("MP_CORE_TEST_PROC_HIDDEN", "1")
        .spawn()
        .unwrap();
    let ended = ends_within_bound(&pidfd_of(inner.id()));
    if !ended {
        let _ = inner.kill();
    }
    Some(inner.wait().unwrap().success() && ended)
}

/// With /proc hidden, every start method still starts, joins and reports exit statuses (the
/// library needs /proc for nothing: pidfds tell deaths, the executable's path was recorded
/// before main).
#[test]
fn processes_work_where_proc_is_hidden() {
    if std::env::var_os("MP_CORE_TEST_PROC_HIDDEN").is_some() {
        assert!(
            !std::path::Path::new("/proc/self").exists(),
            "/proc is not hidden"
        );
        for method in StartMethod::ALL {
            let child = Process::new(|x: u64| x * x)
                .args(9)
                .start_method(method)
                .start()
                .unwrap();
            assert_eq!(child.join_timeout(BOUND).unwrap(), 81, "{method}");
            let child = Process::new(park_forever)
                .start_method(method)
                .start()
                .unwrap();
            child.kill().unwrap();
            assert!(matches!(
                child.join_timeout(BOUND),
                Err(ProcessError::Signaled {
                    signal: libc::SIGKILL,
                    ..
                })
            ));
        }
        return;
    }
    if let Some(passed) = run_with_proc_hidden("processes_work_where_proc_is_hidden") {
        assert!(
            passed,
            "the run with /proc hidden failed (its output is above)"
        );
    }
}

/// The open descriptors of this process (found without /proc).
fn open_fds() -> Vec<i32> {
    (0..4096)
        // SAFETY: F_GETFD on a descriptor number only reads the descriptor table.
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0)
        .collect()
}

fn set_descriptor_limit(soft: u64) {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    rustix::process::setrlimit(
        rustix::process::Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(soft),
            maximum: limit.maximum,
        },
    )
    .unwrap();
}

/// With the descriptor table all but full (every headroom from 0 to 24 free slots, so each
/// step of a start runs out in turn), starting and joining under every start method gives a
/// result or a typed error, never a panic or a hang; once descriptors are free again, starts
/// work and nothing leaked.
#[test]
fn exhausted_descriptors_give_typed_errors() {
    let outer = Process::new(|| {
        // Start the fork server while descriptors are plentiful, as a long-running program
        // would have.
        let warm = Process::new(|| 0u8)
            .start_method(StartMethod::ForkServer)
            .start()
            .unwrap();
        warm.join_timeout(BOUND).unwrap();
        let before = open_fds();
        let highest = *before.last().unwrap();
        let original = rustix::process::getrlimit(rustix::process::Resource::Nofile);
        let mut failures = Vec::new();
        let mut successes = 0;
        for headroom in 0..24 {
            for method in StartMethod::ALL {
                set_descriptor_limit((highest + 1 + headroom) as u64);
                let outcome = Process::new(|x: u32| x + 1)
                    .args(headroom as u32)
                    .start_method(method)
                    .start()
                    .and_then(|child| child.join_timeout(BOUND));
                set_descriptor_limit(original.current.unwrap_or(1024));
                match outcome {
                    Ok(value) => {
                        assert_eq!(value, headroom as u32 + 1);
                        successes += 1;
                    }
                    Err(ProcessError::Timeout { pid }) => panic!("{method}: child {pid} hung"),
                    Err(error) => failures.push(error.to_string()),
                }
            }
        }
        // Descriptors are back: everything works, and nothing was left open.
        for method in StartMethod::ALL {
            let child = Process::new(|| 7u8).start_method(method).start().unwrap();
            assert_eq!(child.join_timeout(BOUND).unwrap(), 7);
        }
        // Finished children are forgotten (and their pidfds closed) when listed.
        assert!(mp_core::active_children().is_empty());
        let after = open_fds();
        let leaked: Vec<_> = after
            .into_iter()
            .filter(|fd| !before.contains(fd))
            .collect();
        (failures, successes, leaked)
    })
    .start()
    .unwrap();
    let (failures, successes, leaked) = outer.join_timeout(BOUND * 3).unwrap();
    assert!(!failures.is_empty(), "the limit never bit");
    assert!(
        successes > 0,
        "no start succeeded even with room: {failures:?}"
    );
    assert!(leaked.is_empty(), "descriptors {leaked:?} leaked");
    eprintln!("typed errors seen: {failures:#?}");
}

/// The tests of this binary fork from libtest's threads. SAFETY (of the `allow_fork` below):
/// no test here holds a lock of its own, or of a library, that a forked child then uses; the
/// locks the children touch are mp-core's, which are safe across `fork()`.
#[ctor::ctor(unsafe)]
fn allow_fork_in_these_tests() {
    // SAFETY: see above: nothing a forked child uses is held by another thread of this binary.
    unsafe { mp_core::allow_fork() };
}
