//! A get blocked on an empty queue (a put blocked on a full bounded one)
//! whose every other handle is gone — dropped, closed, or its process
//! killed, handles in flight counted — fails with `Abandoned`, told by the
//! kernel (pidfds), instead of waiting forever as Python's does. Idle waits
//! sleep.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use mp_core::Process;
use mp_ipc::queue::{JoinableQueue, Queue, QueueError, SimpleQueue};

const PATIENCE: Duration = Duration::from_secs(30);

fn cpu_time() -> Duration {
    // SAFETY: an all-zero rusage is a valid value for getrusage to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid, writable rusage.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

/// A child that holds `queue` (and tells `ready` so) until it is killed.
fn holder(queue: &Queue<u64>, ready: &Queue<u64>) -> mp_core::Child<()> {
    let child = Process::new(|(queue, ready): (Queue<u64>, Queue<u64>)| {
        ready.put(1).unwrap();
        // Stays alive holding `queue` until the parent kills it (a bound,
        // not a hand-off: the test kills it long before).
        std::thread::sleep(Duration::from_secs(120));
        drop(queue);
    })
    .args((queue.clone(), ready.clone()))
    .start()
    .unwrap();
    ready.get_timeout(PATIENCE).unwrap();
    child
}

/// Runs `call` on a thread; its result, or a panic after `PATIENCE`.
fn on_a_thread<R: Send + 'static>(call: impl FnOnce() -> R + Send + 'static) -> mpsc::Receiver<R> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(call());
    });
    rx
}

#[test]
fn a_lone_handle_fails_at_once_where_it_would_wait_forever() {
    let queue: Queue<u64> = Queue::unbounded().unwrap();
    assert!(matches!(queue.get(), Err(QueueError::Abandoned)));
    assert!(matches!(queue.try_get(), Err(QueueError::Empty)));
    let full: Queue<u64> = Queue::bounded(1).unwrap();
    full.put(1).unwrap();
    assert!(matches!(full.put(2), Err(QueueError::Abandoned)));
    assert!(matches!(full.try_put(2), Err(QueueError::Full)));
    // Items still there are taken first.
    assert_eq!(full.get().unwrap(), 1);
    let simple: SimpleQueue<u8> = SimpleQueue::new().unwrap();
    assert!(matches!(simple.get(), Err(QueueError::Abandoned)));
    let joinable: JoinableQueue<u8> = JoinableQueue::unbounded().unwrap();
    assert!(matches!(joinable.get(), Err(QueueError::Abandoned)));
}

#[test]
fn dropping_or_closing_the_other_handle_wakes_a_blocked_get() {
    for close in [false, true] {
        let queue: Queue<u64> = Queue::unbounded().unwrap();
        let other = queue.clone();
        let got = on_a_thread(move || queue.get());
        // Whatever the getter is doing (spinning, sleeping), the other
        // handle's departure must reach it.
        other.put(5).unwrap();
        assert_eq!(got.recv_timeout(PATIENCE).unwrap().unwrap(), 5);
        let queue = other.clone();
        let got = on_a_thread(move || queue.get());
        if close {
            other.close().unwrap();
            assert!(matches!(other.put(1), Err(QueueError::HandleClosed)));
        } else {
            drop(other);
        }
        assert!(matches!(
            got.recv_timeout(PATIENCE).unwrap(),
            Err(QueueError::Abandoned)
        ));
    }
}

#[test]
fn a_killed_holder_wakes_a_blocked_get_within_milliseconds() {
    let queue: Queue<u64> = Queue::unbounded().unwrap();
    let ready: Queue<u64> = Queue::unbounded().unwrap();
    let child = holder(&queue, &ready);
    // While the child lives, the get waits (a bound: it times out).
    assert!(matches!(
        queue.get_timeout(Duration::from_millis(100)),
        Err(QueueError::Timeout)
    ));
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let result = queue.get();
        tx.send(Instant::now()).unwrap();
        result
    });
    // Let the getter reach its sleep (if it has not, it finds the death on
    // its way there: the outcome is the same).
    std::thread::sleep(Duration::from_millis(50));
    let killed = Instant::now();
    child.kill().unwrap();
    let woke = rx.recv_timeout(PATIENCE).expect("the get never woke");
    assert!(matches!(waiter.join().unwrap(), Err(QueueError::Abandoned)));
    let latency = woke.saturating_duration_since(killed);
    eprintln!("a blocked get woke {latency:?} after SIGKILL of the last other holder");
    // 10 ms is the target (measured ~1 ms); the bound has CI slack.
    assert!(latency < Duration::from_secs(2), "{latency:?}");
    let _ = child.join_timeout(PATIENCE);
}

#[test]
fn a_killed_reader_wakes_a_put_blocked_on_a_full_queue() {
    let queue: Queue<u64> = Queue::bounded(1).unwrap();
    let ready: Queue<u64> = Queue::unbounded().unwrap();
    let child = holder(&queue, &ready);
    queue.put(1).unwrap();
    let put = on_a_thread(move || queue.put(2));
    std::thread::sleep(Duration::from_millis(50));
    child.kill().unwrap();
    assert!(matches!(
        put.recv_timeout(PATIENCE).unwrap(),
        Err(QueueError::Abandoned)
    ));
    let _ = child.join_timeout(PATIENCE);
}

#[test]
fn a_child_that_returns_wakes_the_parent_and_its_items_come_first() {
    let queue: Queue<u64> = Queue::unbounded().unwrap();
    let child = Process::new(|queue: Queue<u64>| {
        queue.put(1).unwrap();
        queue.put(2).unwrap();
    })
    .args(queue.clone())
    .start()
    .unwrap();
    assert_eq!(queue.get_timeout(PATIENCE).unwrap(), 1);
    assert_eq!(queue.get_timeout(PATIENCE).unwrap(), 2);
    // The child's handle is gone once it returned: no hang.
    assert!(matches!(queue.get(), Err(QueueError::Abandoned)));
    child.join_timeout(PATIENCE).unwrap();
}

#[test]
fn a_handle_in_flight_counts_until_it_is_claimed_and_dropped() {
    let queue: Queue<u64> = Queue::unbounded().unwrap();
    let (tx, rx) = ipc_channel::ipc::channel::<Queue<u64>>().unwrap();
    tx.send(queue.clone()).unwrap();
    // Only the handle in the message is left besides ours: the get waits.
    assert!(matches!(
        queue.get_timeout(Duration::from_millis(100)),
        Err(QueueError::Timeout)
    ));
    let received = rx.recv().unwrap();
    received.put(3).unwrap();
    assert_eq!(queue.get().unwrap(), 3);
    drop(received);
    assert!(matches!(queue.get(), Err(QueueError::Abandoned)));
}

#[test]
fn an_idle_get_with_a_holder_in_another_process_sleeps() {
    let queue: Queue<u64> = Queue::unbounded().unwrap();
    let ready: Queue<u64> = Queue::unbounded().unwrap();
    let child = holder(&queue, &ready);
    let got = on_a_thread(move || queue.get_timeout(PATIENCE));
    std::thread::sleep(Duration::from_millis(100));
    // Measure while it waits (the window is a measurement, not a hand-off).
    let window = Duration::from_secs(1);
    let (before, start) = (cpu_time(), Instant::now());
    std::thread::sleep(window);
    let share = (cpu_time() - before).as_secs_f64() / start.elapsed().as_secs_f64();
    eprintln!("an idle blocked get used {:.3} % of a core", share * 100.0);
    assert!(share < 0.01, "{:.3} % of a core", share * 100.0);
    child.kill().unwrap();
    assert!(matches!(
        got.recv_timeout(PATIENCE).unwrap(),
        Err(QueueError::Abandoned)
    ));
    let _ = child.join_timeout(PATIENCE);
}

#[test]
fn a_holder_killed_and_reaped_before_the_get_is_not_waited_for() {
    let queue: Queue<u64> = Queue::unbounded().unwrap();
    let ready: Queue<u64> = Queue::unbounded().unwrap();
    let child = holder(&queue, &ready);
    // Seen alive first (cached), then killed and reaped: no pidfd can be
    // opened for it any more.
    assert!(matches!(
        queue.get_timeout(Duration::from_millis(50)),
        Err(QueueError::Timeout)
    ));
    child.kill().unwrap();
    let _ = child.join_timeout(PATIENCE);
    let got = on_a_thread(move || queue.get());
    assert!(matches!(
        got.recv_timeout(PATIENCE).unwrap(),
        Err(QueueError::Abandoned)
    ));
}
