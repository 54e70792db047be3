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

/// The pid of this process's tracker: its child started with the tracker's
/// marker in its environment (tests may read /proc; the library does not).
fn tracker_of_this_process() -> Option<i32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc").ok()?.find_map(|entry| {
        let pid: i32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let parent = stat.rsplit_once(") ")?.1.split(' ').nth(1)?;
        let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let marked = environ
            .split(|&b| b == 0)
            .any(|var| var == b"MP_IPC_SHM_TRACKER=1");
        (parent == me && marked).then_some(pid)
    })
}

/// Whether `pid` has exited (gone, or a zombie whose descriptors are closed).
fn exited(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z'))
    })
}

#[test]
fn a_killed_tracker_is_replaced_and_told_everything_again() {
    let (before, after) = (
        unique("before-tracker-death"),
        unique("after-tracker-death"),
    );
    let _cleanup = Cleanup(vec![before.clone(), after.clone()]);
    let child = Process::new(|(before, after): (String, String)| {
        SharedMemory::create(&before, 4096).unwrap();
        let tracker = tracker_of_this_process().expect("a tracker was started");
        // SAFETY: kill takes plain integers.
        unsafe { libc::kill(tracker, libc::SIGKILL) };
        assert!(common::eventually(|| exited(tracker)), "the tracker died");
        // This report fails; a new tracker is started and told both.
        SharedMemory::create(&after, 4096).unwrap();
        let replacement = tracker_of_this_process().expect("a new tracker");
        assert_ne!(replacement, tracker);
        die_by_sigkill()
    })
    .args((before.clone(), after.clone()))
    .start()
    .unwrap();
    join_killed(child);
    assert!(
        common::eventually(|| !path(&before).exists() && !path(&after).exists()),
        "the replacement tracker unlinked both"
    );
}

#[test]
fn the_tracker_outlives_a_sigterm_meant_for_the_program() {
    let name = unique("sigterm");
    let _cleanup = Cleanup(vec![name.clone()]);
    let child = Process::new(|name: String| {
        SharedMemory::create(&name, 4096).unwrap();
        let tracker = tracker_of_this_process().expect("a tracker was started");
        // SAFETY: kill takes plain integers.
        assert_eq!(unsafe { libc::kill(tracker, libc::SIGTERM) }, 0);
        die_by_sigkill()
    })
    .args(name.clone())
    .start()
    .unwrap();
    join_killed(child);
    assert!(
        common::eventually(|| !path(&name).exists()),
        "a SIGTERMed tracker left the segment behind"
    );
}

#[test]
fn many_reports_more_than_the_socket_queues_are_all_applied() {
    // More reports than the socket buffer holds (hundreds), so the
    // creator rings the tracker's doorbell and waits for room many times.
    let prefix = unique("many");
    let names: Vec<String> = (0..1200).map(|i| format!("{prefix}-{i}")).collect();
    let _cleanup = Cleanup(names.clone());
    let child = Process::new(|names: Vec<String>| {
        for name in &names {
            SharedMemory::create(name, 4096).unwrap();
        }
        // Half unlinked (and reported so) by the creator, half left to the tracker.
        for name in names.iter().step_by(2) {
            SharedMemory::unlink_name(name).unwrap();
        }
        // Recreated by someone else after its unlink: must survive.
        std::fs::write(path(&names[0]), b"someone else's").unwrap();
        die_by_sigkill()
    })
    .args(names.clone())
    .start()
    .unwrap();
    join_killed(child);
    assert!(
        common::eventually(|| names[1..].iter().all(|name| !path(name).exists())),
        "every segment the creator still owned was unlinked"
    );
    assert_eq!(std::fs::read(path(&names[0])).unwrap(), b"someone else's");
}

/// The slots of a creator's table (`shm_tracker::SLOTS`): segments beyond
/// these, at once, are reported on the socket.
const TABLE_SLOTS: usize = 1024;

#[test]
fn beyond_a_full_table_reports_go_on_the_socket_and_a_replacement_tracker_gets_both() {
    let prefix = unique("full");
    let names: Vec<String> = (0..TABLE_SLOTS + 6)
        .map(|i| format!("{prefix}-{i}"))
        .collect();
    let late = format!("{prefix}-late");
    let mut everything = names.clone();
    everything.push(late.clone());
    let _cleanup = Cleanup(everything);
    let child = Process::new(|(names, late): (Vec<String>, String)| {
        // The table fills up; the last 6 go on the socket.
        for name in &names {
            SharedMemory::create(name, 4096).unwrap();
        }
        // Unlinked by the creator: one from the table, one from the socket.
        SharedMemory::unlink_name(&names[3]).unwrap();
        SharedMemory::unlink_name(&names[TABLE_SLOTS + 2]).unwrap();
        // Persisted: one of each too.
        SharedMemory::open(&names[4]).unwrap().persist().unwrap();
        SharedMemory::open(&names[TABLE_SLOTS + 3])
            .unwrap()
            .persist()
            .unwrap();
        let tracker = tracker_of_this_process().expect("a tracker was started");
        // SAFETY: kill takes plain integers.
        unsafe { libc::kill(tracker, libc::SIGKILL) };
        assert!(common::eventually(|| exited(tracker)), "the tracker died");
        // Takes a freed slot; a replacement gets the same table and is sent
        // the socket's part again.
        SharedMemory::create(&late, 4096).unwrap();
        assert_ne!(tracker_of_this_process(), Some(tracker));
        die_by_sigkill()
    })
    .args((names.clone(), late.clone()))
    .start()
    .unwrap();
    join_killed(child);
    let kept = [&names[4], &names[TABLE_SLOTS + 3]];
    assert!(
        common::eventually(|| names
            .iter()
            .chain([&late])
            .filter(|name| !kept.contains(name))
            .all(|name| !path(name).exists())),
        "every segment the creator still owned was unlinked, table and socket alike"
    );
    for name in kept {
        assert!(path(name).exists(), "a persisted segment was unlinked");
        SharedMemory::unlink_name(name).unwrap();
    }
}

#[test]
fn a_forked_child_does_not_touch_its_parents_table() {
    let (parents, childs) = (unique("fork-parent"), unique("fork-child"));
    let _cleanup = Cleanup(vec![parents.clone(), childs.clone()]);
    let parent = Process::new(|(parents, childs): (String, String)| {
        SharedMemory::create(&parents, 4096).unwrap();
        // SAFETY: this child process runs no threads of its own besides
        // mp-ipc's, whose locks are made safe across fork.
        unsafe { mp_core::allow_fork() };
        // The forked child inherits the parent's table and state: persisting
        // the parent's segment there must not free the parent's slot, and
        // its own segment goes to its own tracker.
        let forked = Process::new(|(parents, childs): (String, String)| {
            SharedMemory::open(&parents).unwrap().persist().unwrap();
            SharedMemory::create(&childs, 4096).unwrap();
        })
        .args((parents, childs))
        .start_method(mp_core::StartMethod::Fork)
        .start()
        .unwrap();
        forked.join_timeout(BOUND).unwrap();
        die_by_sigkill()
    })
    .args((parents.clone(), childs.clone()))
    .start()
    .unwrap();
    join_killed(parent);
    assert!(
        common::eventually(|| !path(&childs).exists()),
        "the forked child's own tracker unlinked its segment"
    );
    assert!(
        common::eventually(|| !path(&parents).exists()),
        "the parent's segment, persisted only by a forked child, was unlinked at the parent's death"
    );
}
