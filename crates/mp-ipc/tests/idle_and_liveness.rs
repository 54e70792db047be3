//! Blocking calls sleep in the kernel: CPU measured with getrusage (alone in
//! this test binary, so that no other test's CPU is counted).

use std::time::{Duration, Instant};

use mp_ipc::connection::{Connection, Pipe, Waitable, wait};
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
