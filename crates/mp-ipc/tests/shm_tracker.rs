//! The shared memory tracker: a named segment is unlinked when the process
//! that created it dies (SIGKILL included), never because a process that only
//! attached it died, and not at all when its creator asked it to persist.
//! Every join is bounded; every test removes what it made from /dev/shm.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use mp_core::{Process, ProcessError};
use mp_ipc::SharedMemory;
use mp_ipc::event::Event;

const BOUND: Duration = Duration::from_secs(30);

fn path(name: &str) -> PathBuf {
    PathBuf::from("/dev/shm").join(name)
}

fn unique(what: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("mp-ipc-tracker-{what}-{}-{n}", std::process::id())
}

/// Ends the calling (child) process with SIGKILL: no destructor, no atexit.
fn die_by_sigkill() -> ! {
    // SAFETY: kill takes plain integers.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    unreachable!("SIGKILL is not handled");
}

/// Joins a child that is expected to be killed; kills it if it is not.
fn join_killed(child: mp_core::Child<()>) {
    let outcome = child.join_timeout(BOUND);
    let _ = child.kill();
    assert!(
        matches!(outcome, Err(ProcessError::Signaled { .. })),
        "the child was expected to die of SIGKILL: {outcome:?}"
    );
}

/// Removes `name` if a failed assertion left it behind.
struct Cleanup(Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for name in &self.0 {
            let _ = SharedMemory::unlink_name(name);
        }
    }
}

#[test]
fn a_segment_is_unlinked_when_its_creator_is_sigkilled() {
    let name = unique("killed");
    let _cleanup = Cleanup(vec![name.clone()]);
    let created = Event::new().unwrap();
    let child = Process::new(|(name, created): (String, Event)| {
        let shm = SharedMemory::create(&name, 4096).unwrap();
        shm.write_at(0, b"alive").unwrap();
        created.set();
        die_by_sigkill()
    })
    .args((name.clone(), created.clone()))
    .start()
    .unwrap();
    created.wait_timeout(BOUND).expect("the child created it");
    join_killed(child);
    assert!(
        common::eventually(|| !path(&name).exists()),
        "the segment of a SIGKILLed creator is still in /dev/shm"
    );
}

#[test]
fn a_segment_is_unlinked_when_its_creator_returns_without_unlinking() {
    let name = unique("exited");
    let _cleanup = Cleanup(vec![name.clone()]);
    let child = Process::new(|name: String| {
        SharedMemory::create(&name, 4096).unwrap();
    })
    .args(name.clone())
    .start()
    .unwrap();
    child.join_timeout(BOUND).unwrap();
    assert!(common::eventually(|| !path(&name).exists()));
}

#[test]
fn an_attacher_that_dies_does_not_unlink_it() {
    let name = unique("attached");
    // The attacher also creates a segment of its own: once that one is gone,
    // its tracker has acted, so the shared one surviving is not a matter of
    // timing.
    let marker = unique("attacher-own");
    let _cleanup = Cleanup(vec![name.clone(), marker.clone()]);
    let shared = SharedMemory::create(&name, 4096).unwrap();
    let child = Process::new(|(name, marker): (String, String)| {
        let attached = SharedMemory::open(&name).unwrap();
        attached.write_at(0, b"attacher").unwrap();
        SharedMemory::create(&marker, 4096).unwrap();
        die_by_sigkill()
    })
    .args((name.clone(), marker.clone()))
    .start()
    .unwrap();
    join_killed(child);
    assert!(
        common::eventually(|| !path(&marker).exists()),
        "the attacher's own segment was unlinked by its tracker"
    );
    assert!(
        path(&name).exists(),
        "an attacher's death unlinked a segment"
    );
    let mut buf = [0u8; 8];
    shared.read_at(0, &mut buf).unwrap();
    assert_eq!(&buf, b"attacher");
    shared.unlink().unwrap();
    assert!(!path(&name).exists());
}

#[test]
fn a_persisted_segment_outlives_its_creator() {
    let kept = unique("persisted");
    let marker = unique("not-persisted");
    let _cleanup = Cleanup(vec![kept.clone(), marker.clone()]);
    let child = Process::new(|(kept, marker): (String, String)| {
        let shm = SharedMemory::create(&kept, 4096).unwrap();
        shm.write_at(0, b"kept").unwrap();
        shm.persist().unwrap();
        SharedMemory::create(&marker, 4096).unwrap();
        die_by_sigkill()
    })
    .args((kept.clone(), marker.clone()))
    .start()
    .unwrap();
    join_killed(child);
    assert!(common::eventually(|| !path(&marker).exists()));
    assert!(path(&kept).exists(), "a persisted segment was unlinked");
    let mut buf = [0u8; 4];
    SharedMemory::open(&kept)
        .unwrap()
        .read_at(0, &mut buf)
        .unwrap();
    assert_eq!(&buf, b"kept");
    SharedMemory::unlink_name(&kept).unwrap();
    assert!(!path(&kept).exists());
}

#[test]
fn a_name_recreated_by_someone_else_is_not_unlinked_by_the_first_creators_tracker() {
    let name = unique("recreated");
    let marker = unique("recreated-marker");
    let _cleanup = Cleanup(vec![name.clone(), marker.clone()]);
    let (created, recreated) = (Event::new().unwrap(), Event::new().unwrap());
    let child = Process::new(
        |(name, marker, created, recreated): (String, String, Event, Event)| {
            SharedMemory::create(&name, 4096).unwrap();
            SharedMemory::create(&marker, 4096).unwrap();
            created.set();
            let _ = recreated.wait_timeout(Duration::from_secs(30));
            die_by_sigkill()
        },
    )
    .args((
        name.clone(),
        marker.clone(),
        created.clone(),
        recreated.clone(),
    ))
    .start()
    .unwrap();
    created.wait_timeout(BOUND).expect("the child created it");
    // Someone unlinks the name behind the creator's back and creates it again.
    std::fs::remove_file(path(&name)).unwrap();
    let ours = SharedMemory::create(&name, 8192).unwrap();
    recreated.set();
    join_killed(child);
    assert!(common::eventually(|| !path(&marker).exists()));
    assert!(
        path(&name).exists(),
        "another process's segment was unlinked"
    );
    assert_eq!(SharedMemory::open(&name).unwrap().len(), 8192);
    ours.unlink().unwrap();
}

#[test]
fn unique_names_and_unlink_by_name() {
    let first = SharedMemory::create_unique(4096).unwrap();
    let second = SharedMemory::create_unique(4096).unwrap();
    let (a, b) = (first.name().unwrap(), second.name().unwrap());
    assert_ne!(a, b);
    assert!(path(a).exists() && path(b).exists());
    SharedMemory::unlink_name(a).unwrap();
    second.unlink().unwrap();
    assert!(!path(a).exists() && !path(b).exists());
    assert!(matches!(
        SharedMemory::unlink_name(a),
        Err(mp_ipc::shm::ShmError::NotFound(_))
    ));
    assert!(matches!(
        SharedMemory::new(64).unwrap().persist(),
        Err(mp_ipc::shm::ShmError::Anonymous)
    ));
}
