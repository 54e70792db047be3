//! SharedMemory across processes: an anonymous segment passed as an argument
//! is the same memory in the child; a named one is opened by name and leaves
//! /dev/shm when unlinked. Every join is bounded and every child reaped.

use std::time::Duration;

use mp_core::{Child, Process};
use mp_ipc::SharedMemory;

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

/// Known gap (about 1 run in 10 here): the child exits right after sending
/// its result, and a descriptor lent through the transport can only be
/// claimed while its lender lives (as for a Queue or Connection result);
/// the parent then gets a typed error after the claim patience (10 s). Needs
/// the transport to hold a lender's exit until its tickets are claimed or
/// dropped (transport.rs + mp-core's child), so it is not run by default.
#[test]
#[ignore = "a handle in a child's result needs the child alive to be claimed (transport gap)"]
fn an_anonymous_segment_made_by_a_child_comes_back_as_its_result() {
    let child = Process::new(|size: usize| -> SharedMemory {
        let shm = SharedMemory::new(size).unwrap();
        shm.write_at(0, b"made by the child").unwrap();
        shm
    })
    .args(4096)
    .start()
    .unwrap();
    let shm = join(child);
    let mut buf = [0u8; 17];
    shm.read_at(0, &mut buf).unwrap();
    assert_eq!(&buf, b"made by the child");
}
