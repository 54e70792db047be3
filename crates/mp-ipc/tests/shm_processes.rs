//! SharedMemory across processes: an anonymous segment passed as an argument
//! is the same memory in the child; a named one is opened by name and leaves
//! /dev/shm when unlinked. Every join is bounded and every child reaped.

use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use mp_core::{Child, Process, StartMethod};
use mp_ipc::SharedMemory;
use rustix::event::{PollFd, PollFlags, Timespec};

const BOUND: Duration = Duration::from_secs(30);

/// Joins `child` within `BOUND`; kills it first if the join fails.
fn join<R: serde::Serialize + serde::de::DeserializeOwned>(child: Child<R>) -> R {
    match child.join_timeout(BOUND) {
        Ok(value) => value,
        Err(error) => {
            let _ = child.kill();
            let _ = child.join_timeout(BOUND);
            panic!("child {}: {error}", child.pid());
        }
    }
}

#[test]
fn an_anonymous_segment_is_the_same_memory_in_the_child() {
    let shm = SharedMemory::new(1 << 16).unwrap();
    shm.write_at(0, b"from the parent").unwrap();
    let child = Process::new(|shm: SharedMemory| -> Result<Vec<u8>, String> {
        let mut greeting = vec![0u8; 15];
        shm.read_at(0, &mut greeting).map_err(|e| e.to_string())?;
        shm.write_at(shm.len() - 5, b"child")
            .map_err(|e| e.to_string())?;
        Ok(greeting)
    })
    .args(shm.clone())
    .start()
    .unwrap();
    assert_eq!(join(child).unwrap(), b"from the parent");
    let mut reply = [0u8; 5];
    shm.read_at(shm.len() - 5, &mut reply).unwrap();
    assert_eq!(&reply, b"child");
}

#[test]
fn a_named_segment_is_opened_by_name_and_unlinked_explicitly() {
    let name = format!("mp-ipc-shm-test-{}", std::process::id());
    let created = SharedMemory::create(&name, 4096).unwrap();
    let path = std::path::Path::new("/dev/shm").join(&name);
    assert!(path.exists());
    // Passed by handle (travels by name) and opened by name.
    let child = Process::new(
        |(shm, name): (SharedMemory, String)| -> Result<usize, String> {
            let opened = SharedMemory::open(&name).map_err(|e| e.to_string())?;
            opened.write_at(0, b"named").map_err(|e| e.to_string())?;
            Ok(shm.len())
        },
    )
    .args((created.clone(), name.clone()))
    .start()
    .unwrap();
    let result = join(child);
    created.unlink().unwrap();
    assert_eq!(result.unwrap(), 4096);
    let mut buf = [0u8; 5];
    created.read_at(0, &mut buf).unwrap();
    assert_eq!(&buf, b"named");
    assert!(!path.exists(), "unlink removed the name");
}

#[test]
fn a_segment_that_cannot_be_attached_in_the_child_says_why_in_join() {
    let name = format!("mp-ipc-shm-gone-{}", std::process::id());
    let created = SharedMemory::create(&name, 4096).unwrap();
    // A named segment travels by name: unlinked before the child opens it, it is not found.
    created.unlink().unwrap();
    let child = Process::new(|shm: SharedMemory| shm.len())
        .args(created)
        .start()
        .unwrap();
    match child.join_timeout(BOUND) {
        Err(mp_core::ProcessError::BadArguments { message, .. }) => {
            assert!(
                message.contains("SharedMemory"),
                "names the type: {message}"
            );
            assert!(message.contains(&name), "names the segment: {message}");
            assert!(
                message.contains("not found") || message.contains("no shared memory"),
                "says it is missing: {message}"
            );
        }
        Err(other) => panic!("expected BadArguments naming the segment, got {other}"),
        Ok(len) => panic!("the child attached an unlinked segment of {len} bytes"),
    }
}

/// A child that returns a handle waits, after sending it, until the parent
/// has claimed it (it failed about 1 run in 10 when the child exited first):
/// run 50 times.
#[test]
fn an_anonymous_segment_made_by_a_child_comes_back_as_its_result() {
    for run in 0..50 {
        let shm = join(start_segment_maker(StartMethod::Spawn));
        let mut buf = [0u8; 17];
        shm.read_at(0, &mut buf).unwrap();
        assert_eq!(&buf, b"made by the child", "run {run}");
    }
}

/// The same through the fork server and `fork()` (their children exit
/// through the same runtime).
#[test]
fn a_segment_returned_by_a_forked_or_forkserver_child_arrives() {
    // SAFETY: the only other thread of this test process is the harness's,
    // which takes no lock the child needs; mp-ipc's own locks are fork-safe.
    unsafe { mp_core::allow_fork() };
    for method in [StartMethod::ForkServer, StartMethod::Fork] {
        for run in 0..10 {
            let shm = join(start_segment_maker(method));
            let mut buf = [0u8; 17];
            shm.read_at(0, &mut buf).unwrap();
            assert_eq!(&buf, b"made by the child", "{method:?}, run {run}");
        }
    }
}

/// A child whose parent never reads its result (the segment stays
/// unclaimed) still exits, after mp-ipc's linger bound (10 s).
#[test]
fn a_child_whose_result_is_never_read_still_exits() {
    let child = start_segment_maker(StartMethod::Spawn);
    let started = Instant::now();
    if !ends_by(child.sentinel(), started + BOUND) {
        let _ = child.kill();
        let _ = child.join_timeout(BOUND);
        panic!(
            "the child still runs {:?} after returning",
            started.elapsed()
        );
    }
    // The lender is gone: the handle in the result can no longer be claimed.
    match child.join_timeout(BOUND) {
        Err(mp_core::ProcessError::BadResult { message, .. }) => {
            assert!(
                message.contains("SharedMemory"),
                "names the type: {message}"
            );
        }
        Err(other) => panic!("expected BadResult, got {other}"),
        Ok(shm) => panic!("claimed {} bytes from an exited lender", shm.len()),
    }
}

/// A child dropped unjoined closes its outcome channel: the ticket in its
/// result expires and it exits at once, not after the linger bound.
#[test]
fn a_child_dropped_unjoined_does_not_wait_the_bound() {
    let child = start_segment_maker(StartMethod::Spawn);
    let pidfd = child.sentinel().try_clone_to_owned().unwrap();
    // Dropped before or after the result is sent (either order is possible
    // here): a send to a closed channel fails, a message in flight is freed
    // with the closed channel; either way the ticket expires.
    let started = Instant::now();
    drop(child);
    // Half the 10 s bound: generous for an exit that takes milliseconds.
    let exited = ends_by(pidfd.as_fd(), started + Duration::from_secs(5));
    if !exited {
        let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
    }
    assert!(
        exited,
        "the dropped child still ran after {:?}",
        started.elapsed()
    );
}

/// Whether the process of `pidfd` ends by `deadline` (a poll on the pidfd).
fn ends_by(pidfd: BorrowedFd<'_>, deadline: Instant) -> bool {
    let mut poll = [PollFd::new(&pidfd, PollFlags::IN)];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rustix::event::poll(&mut poll, Some(&Timespec::try_from(left).unwrap())) {
            Ok(0) => return false,
            Ok(_) => return true,
            Err(rustix::io::Errno::INTR) => continue,
            Err(error) => panic!("poll: {error}"),
        }
    }
}

/// Starts a child that makes a 4096-byte anonymous segment, writes to it
/// and returns it.
fn start_segment_maker(method: StartMethod) -> Child<SharedMemory> {
    fn make_segment(size: usize) -> SharedMemory {
        let shm = SharedMemory::new(size).unwrap();
        shm.write_at(0, b"made by the child").unwrap();
        shm
    }
    Process::new(make_segment)
        .args(4096)
        .start_method(method)
        .start()
        .unwrap()
}
