//! A child process finds the parent's listener by its path and authkey.

use std::path::PathBuf;
use std::time::Duration;

use mp_core::Process;
use mp_ipc::connection::ConnectionError;
use mp_ipc::listener::{Client, Listener};

const PATIENCE: Duration = Duration::from_secs(20);

#[test]
fn a_child_connects_to_the_parents_listener_with_the_authkey() {
    let path = std::env::temp_dir().join(format!("mp-ipc-listener-{}.sock", std::process::id()));
    let listener = Listener::bind(&path, Some(b"shared secret")).unwrap();
    let child = Process::new(|path: PathBuf| {
        let wrong = Client::connect(&path, Some(b"guess"));
        let conn = Client::connect(&path, Some(b"shared secret")).unwrap();
        let n: u64 = conn.recv_timeout(PATIENCE).unwrap();
        conn.send(n * 2).unwrap();
        matches!(wrong, Err(ConnectionError::Authentication(_)))
    })
    .args(path)
    .start()
    .unwrap();
    assert!(matches!(
        listener.accept_timeout(PATIENCE),
        Err(ConnectionError::Authentication(_))
    ));
    let conn = listener.accept_timeout(PATIENCE).unwrap();
    conn.send(21u64).unwrap();
    assert_eq!(conn.recv_timeout::<u64>(PATIENCE).unwrap(), 42);
    assert!(
        child.join_timeout(PATIENCE).unwrap(),
        "the wrong key was not refused"
    );
    // The child is gone: its end of the connection is too.
    assert!(matches!(
        conn.recv_timeout::<u64>(PATIENCE),
        Err(ConnectionError::Closed)
    ));
}
