//! Lifecycle of child processes under every start method. Every join is bounded, and every
//! test reaps what it starts.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use ipc_channel::ipc::{self, IpcSender};
use mp_core::{
    Child, Process, ProcessError, StartMethod, active_children, current_process, parent_process,
};
use serde::{Deserialize, Deserializer, Serialize};

/// The longest any join here may take before the test fails instead of hanging.
const BOUND: Duration = Duration::from_secs(20);

fn square(x: u64) -> u64 {
    x * x
}

/// Joins `child` (bounded) and checks that `signal` killed it, as the error and as Python's
/// `exitcode`.
fn assert_killed_by<R>(child: &Child<R>, signal: i32, context: impl std::fmt::Display)
where
    R: Serialize + for<'de> Deserialize<'de> + std::fmt::Debug,
{
    match child.join_timeout(BOUND) {
        Err(ProcessError::Signaled { signal: got, .. }) => assert_eq!(got, signal, "{context}"),
        other => panic!("{context}: expected signal {signal}, got {other:?}"),
    }
    assert_eq!(child.exitcode(), Some(-signal), "{context}");
}

fn park_forever() {
    loop {
        std::thread::park();
    }
}

#[test]
fn returns_the_functions_value_under_every_start_method() {
    for method in StartMethod::ALL {
        let child = Process::new(square)
            .args(9)
            .start_method(method)
            .start()
            .unwrap();
        assert_eq!(child.join_timeout(BOUND).unwrap(), 81, "{method}");
        assert_eq!(child.exitcode(), Some(0));
        assert!(!child.is_alive());
        assert!(matches!(
            child.join(),
            Err(ProcessError::AlreadyJoined { .. })
        ));
    }
}

#[test]
fn functions_without_arguments_and_with_tuples() {
    // A function of no argument gets no argument message (and, forked, no header channel).
    for method in [
        StartMethod::Fork,
        StartMethod::ForkServer,
        StartMethod::Spawn,
    ] {
        let child = Process::new(|| String::from("hello"))
            .start_method(method)
            .start()
            .unwrap();
        assert_eq!(child.join_timeout(BOUND).unwrap(), "hello", "{method}");
        let child = Process::new(|| ())
            .name("n".repeat(5000))
            .start_method(method)
            .start()
            .unwrap();
        child.join_timeout(BOUND).unwrap();
    }
    let child = Process::new(|| String::from("hello")).start().unwrap();
    assert_eq!(child.join_timeout(BOUND).unwrap(), "hello");
    let child = Process::new(|(a, b): (String, Vec<u8>)| format!("{a}{}", b.len()))
        .args(("len=".into(), vec![0; 5]))
        .start()
        .unwrap();
    assert_eq!(child.join_timeout(BOUND).unwrap(), "len=5");
}

#[test]
fn a_function_with_an_argument_needs_args() {
    let result = Process::new(square).start();
    assert!(matches!(result, Err(ProcessError::MissingArgs)));
}

#[test]
fn join_timeout_times_out_then_join_after_kill_reports_the_signal() {
    for method in StartMethod::ALL {
        let child = Process::new(park_forever)
            .start_method(method)
            .start()
            .unwrap();
        let started = Instant::now();
        let timeout = Duration::from_millis(200);
        assert!(matches!(
            child.join_timeout(timeout),
            Err(ProcessError::Timeout { .. })
        ));
        assert!(started.elapsed() >= timeout);
        assert!(child.is_alive());
        assert_eq!(child.exitcode(), None);
        child.kill().unwrap();
        assert_killed_by(&child, libc::SIGKILL, method);
    }
}

#[test]
fn a_hundred_children_terminated_right_after_start_all_report_sigterm() {
    for method in [StartMethod::ForkServer, StartMethod::Spawn] {
        let children: Vec<_> = (0..100)
            .map(|_| {
                let child = Process::new(park_forever)
                    .start_method(method)
                    .start()
                    .unwrap();
                child.terminate().unwrap();
                child
            })
            .collect();
        for child in &children {
            assert_killed_by(child, libc::SIGTERM, method);
        }
    }
}

#[test]
fn exit_codes_follow_pythons_convention() {
    for method in StartMethod::ALL {
        let child = Process::new(|code: i32| -> () { std::process::exit(code) })
            .args(7)
            .start_method(method)
            .start()
            .unwrap();
        match child.join_timeout(BOUND) {
            Err(ProcessError::Exited { code, .. }) => assert_eq!(code, 7),
            other => panic!("{method}: expected exit code 7, got {other:?}"),
        }
        assert_eq!(child.exitcode(), Some(7));
    }
}

#[test]
fn death_by_signal_is_reported_with_its_number() {
    for method in StartMethod::ALL {
        let child = Process::new(|| -> () { std::process::abort() })
            .start_method(method)
            .start()
            .unwrap();
        match child.join_timeout(BOUND) {
            Err(e @ ProcessError::Signaled { signal, .. }) => {
                assert_eq!(signal, libc::SIGABRT);
                assert!(e.to_string().contains("SIGABRT"), "{e}");
            }
            other => panic!("{method}: expected SIGABRT, got {other:?}"),
        }
        assert_eq!(child.exitcode(), Some(-libc::SIGABRT));
    }
}

#[test]
fn panics_carry_message_and_location() {
    for method in StartMethod::ALL {
        let child = Process::new(|x: u32| -> u32 { panic!("no good: {x}") })
            .args(5)
            .start_method(method)
            .start()
            .unwrap();
        match child.join_timeout(BOUND) {
            Err(ProcessError::Panicked { report, .. }) => {
                assert_eq!(report.message, "no good: 5");
                let location = report.location.expect("a location");
                assert!(location.contains("tests/process.rs"), "{location}");
                // The child inherits RUST_BACKTRACE; with it, the backtrace comes along.
                let wanted = std::env::var("RUST_BACKTRACE").is_ok_and(|v| v != "0");
                assert_eq!(report.backtrace.is_some(), wanted, "{method}");
                if let Some(backtrace) = report.backtrace {
                    assert!(backtrace.contains("process"), "{backtrace}");
                }
            }
            other => panic!("{method}: expected a panic, got {other:?}"),
        }
        assert_eq!(child.exitcode(), Some(1));
    }
}

/// A value whose decoding fails on the other side when it is odd.
#[derive(Debug, Serialize)]
struct EvenOnly(u32);

impl<'de> Deserialize<'de> for EvenOnly {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = u32::deserialize(deserializer)?;
        if value % 2 == 1 {
            return Err(serde::de::Error::custom(format!("{value} is odd")));
        }
        Ok(EvenOnly(value))
    }
}

/// The child could not decode its argument: `join` says so.
fn assert_bad_arguments<R>(child: mp_core::Child<R>, method: StartMethod)
where
    R: std::fmt::Debug + serde::Serialize + for<'de> serde::Deserialize<'de>,
{
    let joined = child.join_timeout(BOUND);
    assert!(
        matches!(joined, Err(ProcessError::BadArguments { .. })),
        "{method}: {joined:?}"
    );
}

#[test]
fn undecodable_arguments_and_results_are_errors() {
    for method in StartMethod::ALL {
        let child = Process::new(|e: EvenOnly| e.0)
            .args(EvenOnly(3))
            .start_method(method)
            .start()
            .unwrap();
        assert_bad_arguments(child, method);
        let child = Process::new(|x: u32| EvenOnly(x))
            .args(3)
            .start_method(method)
            .start()
            .unwrap();
        assert!(
            matches!(
                child.join_timeout(BOUND),
                Err(ProcessError::BadResult { .. })
            ),
            "{method}"
        );
    }
}

/// A large argument whose decoded value is much larger than its encoding (small numbers,
/// one byte each in postcard, eight in memory): a child prepares its heap for the encoding's
/// size, and the rest is allocated as usual.
#[test]
fn a_large_argument_that_grows_when_decoded_round_trips() {
    let data: Vec<u64> = (0..(1u64 << 18)).map(|i| i % 100).collect();
    let child = Process::new(|data: Vec<u64>| data.iter().sum::<u64>())
        .args(data.clone())
        .start()
        .unwrap();
    assert_eq!(child.join_timeout(BOUND).unwrap(), data.iter().sum::<u64>());
}

#[test]
fn large_results_do_not_deadlock_the_join() {
    let child = Process::new(|n: usize| vec![7u8; n])
        .args(32 << 20)
        .start()
        .unwrap();
    let value = child.join_timeout(BOUND).unwrap();
    assert_eq!(value.len(), 32 << 20);
    assert!(value.iter().all(|&b| b == 7));
}

/// Arguments and results larger than a socket fragment travel as memfds (mp-core's payload
/// path): values, the descriptors inside them, and decode failures come through as for small
/// ones, under every start method.
#[test]
fn large_arguments_and_results_round_trip_with_their_descriptors() {
    for method in StartMethod::ALL {
        for len in [0usize, 1000, 64 << 10, (64 << 10) + 1, 3 << 20, 5 << 20] {
            let (tx, rx) = ipc::channel::<usize>().unwrap();
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let child = Process::new(|(tx, data): (IpcSender<usize>, Vec<u8>)| {
                tx.send(data.len()).unwrap();
                (data.iter().rev().copied().collect::<Vec<u8>>(), tx)
            })
            .args((tx, data.clone()))
            .start_method(method)
            .start()
            .unwrap();
            assert_eq!(rx.try_recv_timeout(BOUND).unwrap(), len, "{method} {len}");
            let (back, tx) = child.join_timeout(BOUND).unwrap();
            assert!(back.iter().eq(data.iter().rev()), "{method} {len}");
            // The sender came back through the large result and still reaches `rx`.
            tx.send(len + 1).unwrap();
            assert_eq!(
                rx.try_recv_timeout(BOUND).unwrap(),
                len + 1,
                "{method} {len}"
            );
        }
        let child = Process::new(|(e, _pad): (EvenOnly, Vec<u8>)| e.0)
            .args((EvenOnly(3), vec![0; 1 << 20]))
            .start_method(method)
            .start()
            .unwrap();
        assert_bad_arguments(child, method);
    }
}

#[test]
fn children_can_spawn_children_and_know_their_family() {
    for method in StartMethod::ALL {
        let child = Process::new(|method: StartMethod| {
            let me = current_process();
            let parent = parent_process().expect("a child has a parent");
            let grandchild = Process::new(|| (current_process(), parent_process()))
                .start_method(method)
                .start()
                .unwrap();
            let (grand, grand_parent) = grandchild.join_timeout(BOUND).unwrap();
            (me, parent, grand, grand_parent.unwrap())
        })
        .args(method)
        .name("outer")
        .start_method(method)
        .start()
        .unwrap();
        let pid = child.pid();
        let (me, parent, grand, grand_parent) = child.join_timeout(BOUND).unwrap();
        assert_eq!(me.name, "outer");
        assert_eq!(me.pid, pid);
        assert_eq!(parent.pid, std::process::id());
        assert_eq!(parent.name, "MainProcess");
        assert!(
            grand.name.starts_with("Process-") && grand.name.contains(':'),
            "{}",
            grand.name
        );
        assert_eq!(grand_parent.pid, pid);
        assert_eq!(grand_parent.name, "outer");
    }
}

#[test]
fn active_children_lists_running_children_only() {
    let child = Process::new(park_forever).start().unwrap();
    assert!(active_children().iter().any(|c| c.pid == child.pid()));
    child.kill().unwrap();
    let _ = child.join_timeout(BOUND);
    assert!(!active_children().iter().any(|c| c.pid == child.pid()));
}

/// Waits for a process that is not our child to disappear.
fn gone_within(pid: u32, bound: Duration) -> bool {
    let Ok(pidfd) = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::PidfdFlags::empty(),
    ) else {
        return true; // already gone
    };
    let mut fds = [rustix::event::PollFd::new(
        &pidfd,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::event::Timespec {
        tv_sec: bound.as_secs() as i64,
        tv_nsec: 0,
    };
    rustix::event::poll(&mut fds, Some(&timeout)).unwrap() == 1
}

#[test]
fn children_die_with_a_sigkilled_parent() {
    for method in StartMethod::ALL {
        let (report, grandchild_pid) = ipc::channel::<u32>().unwrap();
        let parent = Process::new(|(report, method): (IpcSender<u32>, StartMethod)| -> () {
            let grandchild = Process::new(park_forever)
                .start_method(method)
                .start()
                .unwrap();
            report.send(grandchild.pid()).unwrap();
            loop {
                std::thread::park();
            }
        })
        .args((report, method))
        .start_method(method)
        .start()
        .unwrap();
        let grandchild = grandchild_pid.try_recv_timeout(BOUND).unwrap();
        let grandchild_fd = rustix::process::pidfd_open(
            rustix::process::Pid::from_raw(grandchild as i32).unwrap(),
            rustix::process::PidfdFlags::empty(),
        )
        .unwrap();
        parent.kill().unwrap();
        assert!(matches!(
            parent.join_timeout(BOUND),
            Err(ProcessError::Signaled { .. })
        ));
        assert!(
            gone_within(grandchild, Duration::from_secs(10)),
            "{method}: orphan {grandchild}"
        );
        drop(grandchild_fd);
    }
}

#[test]
fn daemon_children_are_terminated_when_their_parent_exits() {
    let parent = Process::new(|| {
        let daemon = Process::new(park_forever).daemon(true).start().unwrap();
        daemon.pid()
    })
    .start()
    .unwrap();
    let daemon = parent.join_timeout(BOUND).unwrap();
    assert!(
        gone_within(daemon, Duration::from_secs(10)),
        "daemon {daemon} outlived its parent"
    );
}

#[test]
fn non_daemon_children_are_waited_for_at_exit() {
    let (done_tx, done_rx) = ipc::channel::<()>().unwrap();
    let (release_tx, release_rx) = ipc::channel::<()>().unwrap();
    let parent = Process::new(|(done, release): (IpcSender<()>, ipc::IpcReceiver<()>)| {
        // The grandchild finishes only when the test says so, long after this returns.
        Process::new(|(done, release): (IpcSender<()>, ipc::IpcReceiver<()>)| {
            release.recv().unwrap();
            done.send(()).unwrap();
        })
        .args((done, release))
        .start()
        .unwrap()
        .pid()
    })
    .args((done_tx, release_rx))
    .start()
    .unwrap();
    // The parent has returned its value but cannot exit while its child runs.
    assert!(matches!(
        parent.join_timeout(Duration::from_millis(300)),
        Err(ProcessError::Timeout { .. })
    ));
    assert!(parent.is_alive());
    release_tx.send(()).unwrap();
    done_rx.try_recv_timeout(BOUND).unwrap();
    assert!(parent.join_timeout(BOUND).is_ok());
}

#[test]
fn descriptors_do_not_leak_into_children() {
    let file = std::fs::File::open("/proc/self/exe").unwrap();
    let fd = file.as_raw_fd();
    for method in [StartMethod::Spawn, StartMethod::ForkServer] {
        let child = Process::new(|fd: i32| {
            std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .ok()
                .map(|p| p.display().to_string())
        })
        .args(fd)
        .start_method(method)
        .start()
        .unwrap();
        let seen = child.join_timeout(BOUND).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        assert_ne!(
            seen,
            Some(ours.display().to_string()),
            "{method}: fd {fd} leaked"
        );
    }
}

#[test]
fn a_child_whose_bootstrap_fails_never_runs_main() {
    let exe = std::env::current_exe().unwrap();
    for marker in ["garbage", "child:1"] {
        // If main ran, `--list` would print the tests and exit 0.
        let output = std::process::Command::new(&exe)
            .arg("--list")
            .env("MULTIPROC_BOOTSTRAP", marker)
            .output()
            .unwrap();
        assert!(!output.status.success(), "{marker}: main ran");
        assert!(
            output.stdout.is_empty(),
            "{marker}: main ran: {:?}",
            output.stdout
        );
    }
    let output = std::process::Command::new(&exe)
        .arg("--list")
        .env("MULTIPROC_BOOTSTRAP", "garbage")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(mp_core::EXIT_BOOTSTRAP_FAILED));
    assert!(String::from_utf8_lossy(&output.stderr).contains("will not run main"));
}

#[test]
fn sentinel_becomes_readable_when_the_child_ends() {
    let child = Process::new(|| 1u8).start().unwrap();
    let sentinel = child.sentinel();
    let mut fds = [rustix::event::PollFd::new(
        &sentinel,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::event::Timespec {
        tv_sec: 20,
        tv_nsec: 0,
    };
    assert_eq!(rustix::event::poll(&mut fds, Some(&timeout)).unwrap(), 1);
    assert_eq!(child.join_timeout(BOUND).unwrap(), 1);
}

#[test]
fn cpu_count_honours_affinity() {
    let n = mp_core::cpu_count();
    assert!(n >= 1);
    assert!(
        n <= std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(n)
            .max(n)
    );
    let set = rustix::thread::sched_getaffinity(None).unwrap();
    assert_eq!(n, set.count() as usize);
}

#[test]
fn start_methods_parse_and_set_the_default() {
    for method in StartMethod::ALL {
        assert_eq!(method.name().parse::<StartMethod>().unwrap(), method);
    }
    assert!("thread".parse::<StartMethod>().is_err());
    // Python 3.14's default on Linux.
    assert_eq!(mp_core::get_start_method(), StartMethod::ForkServer);
    mp_core::set_start_method(StartMethod::Spawn);
    assert_eq!(mp_core::get_start_method(), StartMethod::Spawn);
    mp_core::set_start_method(StartMethod::ForkServer);
    assert_eq!(mp_core::get_start_method(), StartMethod::ForkServer);
}

/// The pids of this process's living children, from every thread's `children` file. Not the
/// zombies: a server killed between forking a spare and announcing it leaves that spare
/// unknown to us, and it stays a zombie once it ends (see `forkserver::client`).
fn child_pids() -> Vec<u32> {
    let mut pids = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let path = task.unwrap().path().join("children");
        if let Ok(list) = std::fs::read_to_string(path) {
            pids.extend(
                list.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    pids.retain(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat[stat.rfind(')').unwrap() + 1..].starts_with(" Z"))
    });
    pids
}

/// The fork server and its two spares, our children left once the others are joined: the
/// server started first (the spares are forked from it), then the spare first in line. The
/// server forks a replacement spare while a child runs, so it may not be there yet: looked
/// for again until it is (bounded).
fn server_and_spares() -> (u32, [u32; 2]) {
    let started = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        // Field 22 (start time), counted after the command's closing parenthesis.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        after.split_whitespace().nth(19).unwrap().parse().unwrap()
    };
    let deadline = Instant::now() + BOUND;
    let mut children = child_pids();
    while children.len() < 3 && Instant::now() < deadline {
        std::thread::yield_now();
        children = child_pids();
    }
    assert_eq!(children.len(), 3, "the server and its spares: {children:?}");
    children.sort_by_key(|&pid| (started(pid), pid));
    (children[0], [children[1], children[2]])
}

#[test]
fn a_killed_fork_server_is_replaced() {
    assert_squares_under_forkserver(2);
    let (server, _) = server_and_spares();
    kill_and_wait(server);

    // The spares it left serve two more starts; the next finds the server dead and starts a
    // new one.
    for n in [3u64, 4, 5] {
        assert_squares_under_forkserver(n);
    }
    let (new_server, _) = server_and_spares();
    assert_ne!(new_server, server, "the dead server was not reaped");

    // Again with a function of no argument, whose header travels inside the request: it is
    // made once more for the replacement server.
    kill_and_wait(new_server);
    for _ in 0..3 {
        let child = Process::new(|| 7u8)
            .start_method(StartMethod::ForkServer)
            .start()
            .unwrap();
        assert_eq!(child.join_timeout(BOUND).unwrap(), 7);
    }
}

/// Starts `square(n)` under forkserver and checks what it returns.
fn assert_squares_under_forkserver(n: u64) {
    let child = Process::new(square)
        .args(n)
        .start_method(StartMethod::ForkServer)
        .start()
        .unwrap();
    assert_eq!(child.join_timeout(BOUND).unwrap(), n * n);
}

/// A spare killed while it waits costs nothing but itself: the request addressed to it is
/// passed over, the start that took it finds its child killed, and the next start gets a
/// fresh spare.
#[test]
fn a_killed_spare_is_replaced() {
    assert_squares_under_forkserver(2);
    let (server, [spare, _]) = server_and_spares();
    kill_and_wait(spare);
    // The announcement of the killed spare may still be unread: that start's child is the
    // killed spare (reported killed), or a fresh one (if the spare's death was seen first).
    let taken = Process::new(square)
        .args(3)
        .start_method(StartMethod::ForkServer)
        .start()
        .unwrap();
    match taken.join_timeout(BOUND) {
        Ok(9) => {}
        Err(ProcessError::Signaled { signal, .. }) => assert_eq!(signal, libc::SIGKILL),
        other => panic!("expected 9 or a killed child, got {other:?}"),
    }
    for n in [4u64, 5] {
        assert_squares_under_forkserver(n);
    }
    let (still, _) = server_and_spares();
    assert_eq!(still, server, "the server itself was not replaced");
}

/// SIGKILLs `pid` (a child of this process) and waits until it has ended.
fn kill_and_wait(pid: u32) {
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::PidfdFlags::empty(),
    )
    .unwrap();
    rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL).unwrap();
    let mut fds = [rustix::event::PollFd::new(
        &pidfd,
        rustix::event::PollFlags::IN,
    )];
    let timeout = rustix::event::Timespec {
        tv_sec: 10,
        tv_nsec: 0,
    };
    assert_eq!(rustix::event::poll(&mut fds, Some(&timeout)).unwrap(), 1);
}

/// The tests of this binary fork from libtest's threads. SAFETY (of the `allow_fork` below):
/// no test here holds a lock of its own, or of a library, that a forked child then uses; the
/// locks the children touch are mp-core's, which are safe across `fork()`.
#[ctor::ctor(unsafe)]
fn allow_fork_in_these_tests() {
    // SAFETY: see above: nothing a forked child uses is held by another thread of this binary.
    unsafe { mp_core::allow_fork() };
}

/// A forkserver child ends with `_exit` (as CPython's forked children do), after flushing
/// what Rust and C buffered: output written without a newline, by `print!` and by C's
/// `printf`, reaches the child's stdout, as it does from a spawned child. (Fork is refused in
/// this threaded test process.)
#[test]
fn buffered_output_of_a_child_is_flushed_when_it_exits() {
    for method in [StartMethod::ForkServer, StartMethod::Spawn] {
        let path =
            std::env::temp_dir().join(format!("mp-core-flush-{}-{method}.txt", std::process::id()));
        let child = Process::new(|path: String| {
            let file = std::fs::File::create(&path).unwrap();
            // SAFETY: points this child's stdout (fd 1) at the file; `file` stays open
            // until then and fd 1 is this process's to replace.
            assert!(unsafe { libc::dup2(file.as_raw_fd(), 1) } == 1);
            print!("rust ");
            // SAFETY: a NUL-terminated format without conversions.
            unsafe { libc::printf(c"and c".as_ptr()) };
        })
        .args(path.to_string_lossy().into_owned())
        .start_method(method)
        .start()
        .unwrap();
        child.join_timeout(BOUND).unwrap();
        let written = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(written, "rust and c", "{method}");
    }
}

/// What a child finds about its own process: its parent's pid, whether glibc's descriptor of
/// its thread holds its thread id, and whether its robust mutex list is registered with the
/// kernel (a forkserver child is cloned by hand, not by glibc's `fork`, which sets up both).
fn own_process() -> (u32, bool, bool) {
    const PR_GET_TID_ADDRESS: libc::c_int = 40;
    let mut tid: *mut libc::pid_t = std::ptr::null_mut();
    // SAFETY: PR_GET_TID_ADDRESS writes one pointer into `tid`; gettid has no preconditions.
    let tid_known = unsafe { libc::prctl(PR_GET_TID_ADDRESS, &mut tid as *mut *mut libc::pid_t) }
        == 0
        && !tid.is_null()
        // SAFETY: the address glibc registered for this thread: its descriptor's tid field,
        // live as long as the thread.
        && unsafe { tid.read() } == unsafe { libc::gettid() };
    let mut head: *mut libc::c_void = std::ptr::null_mut();
    let mut len = 0usize;
    // SAFETY: get_robust_list(0, ...) writes this thread's list head and size into the locals.
    let robust = unsafe {
        libc::syscall(
            libc::SYS_get_robust_list,
            0,
            &mut head as *mut *mut libc::c_void,
            &mut len as *mut usize,
        )
    } == 0
        && !head.is_null();
    (std::os::unix::process::parent_id(), tid_known, robust)
}

#[test]
fn every_child_is_the_starters_own_with_its_thread_set_up_as_by_fork() {
    for method in StartMethod::ALL {
        let child = Process::new(own_process)
            .start_method(method)
            .start()
            .unwrap();
        assert_eq!(
            child.join_timeout(BOUND).unwrap(),
            (std::process::id(), true, true),
            "{method}"
        );
    }
}
