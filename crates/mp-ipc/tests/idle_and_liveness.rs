//! Blocking calls sleep in the kernel (CPU measured with getrusage), and a
//! killed peer is reported by the kernel's hang-up, not by a periodic check.

use std::time::{Duration, Instant};

use mp_core::Process;
use mp_ipc::connection::{Connection, ConnectionError, Pipe, Waitable, wait};
use mp_ipc::queue::Queue;

const PATIENCE: Duration = Duration::from_secs(20);

/// CPU time (user + system) this process has used so far.
fn cpu_time() -> Duration {
    // SAFETY: an all-zero rusage is a valid value for getrusage to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid, writable rusage.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) }, 0);
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

/// Enough descriptors for a thousand pipes.
fn raise_descriptor_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    setrlimit(Resource::Nofile, limit).unwrap();
}

#[test]
fn idle_recv_poll_get_and_wait_over_1_100_and_1000_use_no_cpu() {
    raise_descriptor_limit();
    let small = || {
        Pipe::builder()
            .capacity_bytes(4096)
            .build_simplex()
            .unwrap()
    };
    // Readers and their writers (the writers are held, so nobody hangs up).
    let mut readers = Vec::new();
    let mut writers = Vec::new();
    for _ in 0..1101 {
        let (reader, writer) = small();
        readers.push(reader);
        writers.push(writer);
    }
    let queue: Queue<u32> = Queue::unbounded().unwrap();
    let (polled, poll_writer) = small();

    let mut waiters = Vec::new();
    // recv on 1 connection.
    let one = readers[0].clone();
    waiters.push(std::thread::spawn(move || {
        vec![one.recv_timeout::<u32>(PATIENCE).unwrap() as usize]
    }));
    // wait over 100 and over 1000 connections.
    for range in [1..101, 101..1101] {
        let set: Vec<Connection> = readers[range.clone()].to_vec();
        waiters.push(std::thread::spawn(move || {
            let objects: Vec<Waitable<'_>> = set.iter().map(Waitable::from).collect();
            wait(&objects, Some(PATIENCE)).unwrap()
        }));
    }
    // get on a queue, poll on a connection.
    {
        let queue = queue.clone();
        waiters.push(std::thread::spawn(move || {
            vec![queue.get_timeout(PATIENCE).unwrap() as usize]
        }));
    }
    waiters.push(std::thread::spawn(move || {
        vec![usize::from(polled.poll(Some(PATIENCE)).unwrap())]
    }));

    // Measure while they wait (the window is a measurement, not a hand-off).
    let window = Duration::from_secs(2);
    let (cpu_before, start) = (cpu_time(), Instant::now());
    std::thread::sleep(window);
    let used = cpu_time() - cpu_before;
    let share = used.as_secs_f64() / start.elapsed().as_secs_f64();
    eprintln!(
        "idle recv + poll + get + wait(100) + wait(1000): {used:?} of CPU in {:?} ({:.2} % of a core)",
        start.elapsed(),
        share * 100.0
    );

    // Wake each waiter with what it waits for.
    writers[0].send(7u32).unwrap();
    writers[50].send(1u32).unwrap();
    writers[1100].send(1u32).unwrap();
    queue.put(9).unwrap();
    poll_writer.send(1u32).unwrap();
    let results: Vec<Vec<usize>> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
    assert_eq!(results, [vec![7], vec![49], vec![999], vec![9], vec![1]]);
    assert!(
        share < 0.03,
        "five idle waiters used {:.2} % of a core",
        share * 100.0
    );
}

#[test]
fn a_killed_writer_wakes_a_blocked_reader_at_once() {
    let (reader, writer) = Pipe::simplex().unwrap();
    let (ready_reader, ready_writer) = Pipe::simplex().unwrap();
    let child = Process::new(|(writer, ready): (Connection, Connection)| {
        ready.send(()).unwrap();
        // Hold the writer until killed.
        std::thread::sleep(PATIENCE);
        drop(writer);
    })
    .args((writer, ready_writer))
    .start()
    .unwrap();
    ready_reader.recv_timeout::<()>(PATIENCE).unwrap();
    let blocked = std::thread::spawn(move || {
        let outcome = reader.recv_timeout::<u8>(PATIENCE);
        (outcome, Instant::now())
    });
    // Let the reader go to sleep (the kill must wake a sleeper, whatever
    // the interleaving; this only makes the sleeping case the likely one).
    std::thread::sleep(Duration::from_millis(100));
    let killed_at = Instant::now();
    child.kill().unwrap();
    let (outcome, woke_at) = blocked.join().unwrap();
    assert!(
        matches!(outcome, Err(ConnectionError::Closed)),
        "{outcome:?}"
    );
    let latency = woke_at - killed_at;
    eprintln!("recv returned Closed {latency:?} after SIGKILL was sent");
    assert!(
        latency < Duration::from_millis(500),
        "the death was noticed after {latency:?}"
    );
    assert!(child.join_timeout(PATIENCE).is_err());
}
