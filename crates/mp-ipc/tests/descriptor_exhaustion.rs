//! An exhausted descriptor table (EMFILE) is a typed error naming what
//! failed, never a panic, a half-made handle or a hang: when creating pipes
//! and queues, and when receiving a handle's descriptors.

use std::time::Duration;

use mp_core::Process;
use mp_ipc::connection::{Connection, ConnectionError, Pipe};
use mp_ipc::queue::{Queue, QueueError};

const PATIENCE: Duration = Duration::from_secs(20);

/// Lowers this process's descriptor limit to what is open now plus `spare`.
fn leave_spare_descriptors(spare: u64) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    // The lowest free descriptor number is at most the count of open ones.
    let probe = rustix::io::fcntl_dupfd_cloexec(std::io::stderr(), 0).unwrap();
    let open = std::os::fd::AsRawFd::as_raw_fd(&probe) as u64;
    drop(probe);
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = Some(open + spare);
    setrlimit(Resource::Nofile, limit).unwrap();
}

#[test]
fn creating_pipes_and_queues_with_no_descriptor_left_is_an_error() {
    // In a child: the limit is the child's alone.
    let child = Process::new(|()| {
        leave_spare_descriptors(0);
        let pipe = Pipe::duplex().map(drop);
        let queue = Queue::<u8>::unbounded().map(drop);
        (
            matches!(pipe, Err(ConnectionError::Io { .. })),
            matches!(queue, Err(QueueError::Io { .. })),
            format!("{pipe:?} / {queue:?}"),
        )
    })
    .args(())
    .start()
    .unwrap();
    let (pipe_failed, queue_failed, errors) = child.join_timeout(PATIENCE).unwrap();
    assert!(pipe_failed && queue_failed, "{errors}");
    assert!(errors.contains("Too many open files"), "{errors}");
}

/// Raises this process's descriptor limit back to its hard limit.
fn restore_descriptor_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    setrlimit(Resource::Nofile, limit).unwrap();
}

#[test]
fn a_handle_argument_that_cannot_be_lent_says_why_in_the_start_error() {
    // In a child (the limit is its own): start a grandchild with a queue as its argument
    // under ever fewer spare descriptors, until it starts. On the way, some start fails after
    // the grandchild exists but while the queue's descriptors are lent: that error must say
    // so (postcard alone would only say "SerdeSerCustom").
    let child = Process::new(|()| {
        let queue = Queue::<u8>::unbounded().unwrap();
        let mut errors = Vec::new();
        for spare in 0..128 {
            leave_spare_descriptors(spare);
            let started = Process::new(|queue: Queue<u8>| queue.put(7).is_ok())
                .args(queue.clone())
                .start();
            restore_descriptor_limit();
            match started {
                Err(error) => errors.push(error.to_string()),
                Ok(grandchild) => {
                    let put = grandchild.join_timeout(PATIENCE).unwrap();
                    return (put && queue.get().unwrap() == 7, errors);
                }
            }
        }
        (false, errors)
    })
    .args(())
    .start()
    .unwrap();
    let (started_at_last, errors) = child.join_timeout(PATIENCE).unwrap();
    assert!(started_at_last, "never started: {errors:#?}");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("lending a queue's descriptors") && e.contains("Queue<u8>")),
        "no start failed while lending the queue, or it did not say so: {errors:#?}"
    );
}

#[test]
fn a_lender_with_no_descriptor_left_still_hands_over_what_it_lent() {
    // In a child (the limit is its own): lend a queue to a running grandchild
    // through ipc-channel, then use up the descriptor table before the
    // grandchild claims it. The claim needs nothing new from the lender.
    let child = Process::new(|()| {
        let queue = Queue::<u8>::unbounded().unwrap();
        let (go_reader, go) = Pipe::simplex().unwrap();
        let (handles, handles_receiver) = ipc_channel::ipc::channel::<Queue<u8>>().unwrap();
        let grandchild = Process::new(
            |(go, handles): (Connection, ipc_channel::ipc::IpcReceiver<Queue<u8>>)| {
                go.recv_timeout::<()>(PATIENCE).unwrap();
                let queue = handles.recv().map_err(|e| format!("{e:?}"))?;
                queue.put(7).map_err(|e| e.to_string())
            },
        )
        .args((go_reader, handles_receiver))
        .start()
        .unwrap();
        handles.send(queue.clone()).unwrap();
        leave_spare_descriptors(0);
        let exhausted = rustix::io::fcntl_dupfd_cloexec(std::io::stderr(), 0).is_err();
        go.send(()).unwrap();
        let put = grandchild.join_timeout(PATIENCE).map_err(|e| e.to_string());
        restore_descriptor_limit();
        let got = queue.get_timeout(PATIENCE).map_err(|e| e.to_string());
        (exhausted, put, got)
    })
    .args(())
    .start()
    .unwrap();
    let (exhausted, put, got) = child.join_timeout(PATIENCE).unwrap();
    assert!(exhausted, "the lender's descriptor table was not full");
    assert_eq!(put, Ok(Ok(())));
    assert_eq!(got, Ok(7));
}

#[test]
fn receiving_a_handle_with_no_descriptor_left_is_an_error() {
    let (reader, writer) = Pipe::simplex().unwrap();
    let (report, report_writer) = Pipe::simplex().unwrap();
    let (command_reader, command) = Pipe::simplex().unwrap();
    // The child lowers its limit, then receives a connection through
    // ipc-channel (its descriptors through the parent's courier).
    let child = Process::new(
        |(report, command, handles): (
            Connection,
            Connection,
            ipc_channel::ipc::IpcReceiver<Connection>,
        )| {
            leave_spare_descriptors(3);
            report.send(()).unwrap();
            command.recv_timeout::<()>(PATIENCE).unwrap();
            let received = handles.recv();
            report.send(format!("{received:?}")).unwrap();
        },
    )
    .args({
        let (tx, rx) = ipc_channel::ipc::channel::<Connection>().unwrap();
        HANDLES.with(|h| *h.borrow_mut() = Some(tx));
        (report_writer, command_reader, rx)
    })
    .start()
    .unwrap();
    report.recv_timeout::<()>(PATIENCE).unwrap();
    HANDLES.with(|h| h.borrow().as_ref().unwrap().send(writer.clone()).unwrap());
    command.send(()).unwrap();
    let outcome: String = report.recv_timeout(PATIENCE).unwrap();
    // ipc-channel reports a failed decode as a serialization error (postcard
    // keeps no message; mp-ipc logs the cause).
    assert!(outcome.starts_with("Err(SerializationError"), "{outcome}");
    child.join_timeout(PATIENCE).unwrap();
    // Nothing of the refused handle stays alive: once the parent drops its
    // writer, the reader sees the end.
    drop(writer);
    assert!(matches!(
        reader.recv_timeout::<u8>(PATIENCE),
        Err(ConnectionError::Closed)
    ));
}

thread_local! {
    static HANDLES: std::cell::RefCell<Option<ipc_channel::ipc::IpcSender<Connection>>> =
        const { std::cell::RefCell::new(None) };
}
