//! A guided run through what multiproc can do, printing what each step did and how long it
//! took. The main job of the repository:
//!
//! ```text
//! cargo run --release --example tour
//! ```

use std::time::{Duration, Instant};

use multiproc::mp_ipc::{
    Barrier, Bytes, Condition, Connection, ConnectionError, Event, Lock, LockError, Pipe, Queue,
    SharedMemory, Value,
};
use multiproc::mp_pool::{Pool, PoolError};
use multiproc::{Process, ProcessError, StartMethod, active_children, cpu_count, current_process};

type StepResult = Result<String, Box<dyn std::error::Error>>;

/// Runs one step of the tour and prints its outcome and duration.
fn step(title: &str, body: impl FnOnce() -> StepResult) -> bool {
    let started = Instant::now();
    let outcome = body();
    let elapsed = started.elapsed();
    match outcome {
        Ok(detail) => {
            println!(
                "  ok   {title:<62} {:>10}  {detail}",
                format_duration(elapsed)
            );
            true
        }
        Err(error) => {
            println!(
                "  FAIL {title:<62} {:>10}  {error}",
                format_duration(elapsed)
            );
            false
        }
    }
}

fn format_duration(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{:.1} µs", d.as_secs_f64() * 1e6)
    } else {
        format!("{:.2} ms", d.as_secs_f64() * 1e3)
    }
}

fn square(x: u64) -> u64 {
    x * x
}

fn park_forever() {
    loop {
        std::thread::park();
    }
}

fn processes() -> Vec<bool> {
    println!("\nProcesses (mp-core)");
    let mut results = vec![step("who am I", || {
        let me = current_process();
        Ok(format!(
            "{} (pid {}), {} CPUs usable",
            me.name,
            me.pid,
            cpu_count()
        ))
    })];
    for method in StartMethod::ALL {
        results.push(step(
            &format!("run square(12) in a child, start method {method}"),
            || {
                let child = Process::new(square).args(12).start_method(method).start()?;
                let value = child.join()?;
                Ok(format!(
                    "returned {value}, exit code {:?}",
                    child.exitcode()
                ))
            },
        ));
    }
    results.push(step("a child names itself and its parent", || {
        let child = Process::new(|| (multiproc::current_process(), multiproc::parent_process()))
            .name("worker-a")
            .start()?;
        let (me, parent) = child.join()?;
        let parent = parent.ok_or("a child always has a parent")?;
        Ok(format!(
            "{} (pid {}) was started by {} (pid {})",
            me.name, me.pid, parent.name, parent.pid
        ))
    }));
    results.push(step("a panic in a child is a typed error", || {
        let child = Process::new(|x: i32| -> i32 { panic!("cannot handle {x}") })
            .args(-1)
            .start()?;
        match child.join() {
            Err(ProcessError::Panicked { report, .. }) => Ok(format!(
                "Panicked {{ message: {:?}, location: {} }}",
                report.message,
                report.location.unwrap_or_default()
            )),
            other => Err(format!("unexpected: {other:?}").into()),
        }
    }));
    results.push(step("exit(3) in a child is exit code 3", || {
        let child = Process::new(|| -> () { std::process::exit(3) }).start()?;
        let error = child.join().expect_err("the child exits without a value");
        Ok(format!("{error}; exitcode() = {:?}", child.exitcode()))
    }));
    results.push(step("join_timeout on a busy child, then terminate", || {
        let child = Process::new(park_forever).start()?;
        let timed_out = child.join_timeout(Duration::from_millis(50));
        child.terminate()?;
        let ended = child.join();
        Ok(format!(
            "{} / after terminate: {}; exitcode() = {:?}",
            timed_out.expect_err("busy"),
            ended.expect_err("terminated"),
            child.exitcode()
        ))
    }));
    results.push(step("100 children started and joined (forkserver)", || {
        let started = Instant::now();
        let children = (0..100u64)
            .map(|i| {
                Process::new(square)
                    .args(i)
                    .start_method(StartMethod::ForkServer)
                    .start()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let total: u64 = children.iter().map(|c| c.join()).sum::<Result<u64, _>>()?;
        Ok(format!(
            "sum of squares {total}, {:.0} µs per process",
            started.elapsed().as_secs_f64() * 1e6 / 100.0
        ))
    }));
    results.push(step("children of children", || {
        let child = Process::new(|| {
            let grandchild = Process::new(|| multiproc::current_process().name)
                .start()
                .unwrap();
            grandchild.join().unwrap()
        })
        .start()?;
        Ok(format!("grandchild is called {}", child.join()?))
    }));
    results.push(step("active_children() after all joins", || {
        Ok(format!("{} still running", active_children().len()))
    }));
    results
}

fn synchronisation() -> Vec<bool> {
    println!("\nLocks, events, barriers and shared memory (mp-ipc)");
    let bound = Duration::from_secs(10);
    let mut results = vec![step(
        "4 processes x 100000 increments of a Value under its lock",
        || {
            let counter = Value::new(0u64)?;
            let children = (0..4)
                .map(|_| {
                    Process::new(|counter: Value<u64>| {
                        for _ in 0..100_000 {
                            *counter.lock().unwrap() += 1;
                        }
                    })
                    .args(counter.clone())
                    .start()
                })
                .collect::<Result<Vec<_>, _>>()?;
            for child in &children {
                child.join()?;
            }
            Ok(format!("total {} (exact)", counter.get()?))
        },
    )];
    results.push(step(
        "a process SIGKILLed holding a Lock: the next owner is told",
        || {
            let lock = Lock::new()?;
            let holding = Event::new()?;
            let child = Process::new(|(lock, holding): (Lock, Event)| {
                let _guard = lock.lock().unwrap();
                holding.set();
                park_forever();
            })
            .args((lock.clone(), holding.clone()))
            .start()?;
            holding.wait_timeout(bound)?;
            child.kill()?;
            let killed = child.join().expect_err("killed");
            match lock.lock_timeout(bound) {
                Err(LockError::OwnerDied(_guard)) => Ok(format!(
                    "{killed}; next lock(): OwnerDied with the guard (CPython would hang)"
                )),
                other => Err(format!("unexpected: {other:?}").into()),
            }
        },
    ));
    results.push(step("Barrier: 3 processes meet 100 times", || {
        let barrier = Barrier::builder(3).timeout(bound).build()?;
        let children = (0..3)
            .map(|_| {
                Process::new(|barrier: Barrier| -> Result<u32, String> {
                    let mut index_sum = 0;
                    for _ in 0..100 {
                        index_sum += barrier.wait().map_err(|e| e.to_string())?;
                    }
                    Ok(index_sum)
                })
                .args(barrier.clone())
                .start()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut total = 0;
        for child in &children {
            total += child.join()??;
        }
        Ok(format!("arrival indices sum to {total} (= 100 x (0+1+2))"))
    }));
    results.push(step(
        "Condition.notify(1) wakes one waiting process",
        || {
            let ready = Value::new(0u32)?;
            let cond = Condition::with_lock(ready.get_lock())?;
            let child = Process::new(
                |(ready, cond): (Value<u32>, Condition)| -> Result<u32, String> {
                    let guard = ready.lock().map_err(|e| e.to_string())?;
                    let guard = cond
                        .wait_for_timeout(guard, Duration::from_secs(10), |v| **v > 0)
                        .map_err(|e| e.to_string())?;
                    Ok(*guard)
                },
            )
            .args((ready.clone(), cond.clone()))
            .start()?;
            *ready.lock().map_err(LockError::without_guard)? = 42;
            cond.notify(1);
            Ok(format!("the child saw {}", child.join()??))
        },
    ));
    results.push(step(
        "SharedMemory passed to a child is the same memory",
        || {
            let shm = SharedMemory::new(4096)?;
            let child =
                Process::new(|shm: SharedMemory| shm.write_at(0, b"hi from the child").is_ok())
                    .args(shm.clone())
                    .start()?;
            if !child.join()? {
                return Err("the child could not write".into());
            }
            let mut buf = [0u8; 17];
            shm.read_at(0, &mut buf)?;
            Ok(format!("parent reads {:?}", String::from_utf8_lossy(&buf)))
        },
    ));
    results
}

fn queues_and_pipes() -> Vec<bool> {
    println!("\nQueues and pipes (mp-ipc)");
    const PATIENCE: Duration = Duration::from_secs(10);
    let mut results = vec![step(
        "Queue: 2 producer processes, 100000 items, FIFO per producer",
        || {
            let queue: Queue<(u32, u32)> = Queue::bounded(1000)?;
            let producers = (0..2u32)
                .map(|p| {
                    Process::new(|(queue, p): (Queue<(u32, u32)>, u32)| {
                        for i in 0..50_000 {
                            queue.put((p, i)).unwrap();
                        }
                    })
                    .args((queue.clone(), p))
                    .start()
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mut next = [0u32; 2];
            for _ in 0..100_000 {
                let (p, i) = queue.get_timeout(PATIENCE)?;
                if i != next[p as usize] {
                    return Err(
                        format!("producer {p}: got {i}, expected {}", next[p as usize]).into(),
                    );
                }
                next[p as usize] += 1;
            }
            for producer in &producers {
                producer.join()?;
            }
            Ok("every item once, in order per producer".into())
        },
    )];
    results.push(step("Queue: a 64 MiB item to a child and back", || {
        let there: Queue<Bytes> = Queue::unbounded()?;
        let back: Queue<Bytes> = Queue::unbounded()?;
        let child = Process::new(|(there, back): (Queue<Bytes>, Queue<Bytes>)| {
            let mut item = there.get().unwrap();
            item.reverse();
            back.put(item).unwrap();
        })
        .args((there.clone(), back.clone()))
        .start()?;
        let item: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
        there.put(Bytes(item.clone()))?;
        let mut returned = back.get_timeout(PATIENCE)?.0;
        child.join()?;
        returned.reverse();
        if returned != item {
            return Err("the item came back changed".into());
        }
        Ok("out of band: its own pages of the queue's memfd".into())
    }));
    results.push(step("Pipe: 10000 round trips with a child", || {
        let (here, there) = Pipe::duplex()?;
        let child = Process::new(|conn: Connection| {
            while let Ok(n) = conn.recv::<u64>() {
                conn.send(n + 1).unwrap();
            }
        })
        .args(there)
        .start()?;
        let started = Instant::now();
        let mut n = 0u64;
        for _ in 0..10_000 {
            here.send(n)?;
            n = here.recv_timeout(PATIENCE)?;
        }
        let per_trip = started.elapsed() / 10_000;
        here.close(); // the child's recv returns Closed and it ends
        child.join()?;
        Ok(format!("counted to {n}, {per_trip:?} per round trip"))
    }));
    results.push(step(
        "Pipe: recv from a SIGKILLed writer is Closed, not a hang",
        || {
            let (reader, writer) = Pipe::simplex()?;
            let (ready, ready_writer) = Pipe::simplex()?;
            let child = Process::new(|(writer, ready): (Connection, Connection)| {
                writer.send("last words").unwrap();
                ready.send(()).unwrap();
                park_forever(); // hold the writer until killed
            })
            .args((writer, ready_writer))
            .start()?;
            ready.recv_timeout::<()>(PATIENCE)?;
            child.kill()?;
            let last: String = reader.recv_timeout(PATIENCE)?;
            let started = Instant::now();
            match reader.recv_timeout::<String>(PATIENCE) {
                Err(ConnectionError::Closed) => {}
                other => return Err(format!("expected Closed, got {other:?}").into()),
            }
            let _ = child.join_timeout(PATIENCE);
            Ok(format!(
                "got {last:?}, then Closed after {:?}",
                started.elapsed()
            ))
        },
    ));
    results
}

/// Counts the primes below `bound` by trial division: a CPU-bound task.
fn count_primes(bound: u64) -> u64 {
    (2..bound)
        .filter(|&n| (2..).take_while(|d| d * d <= n).all(|d| n % d != 0))
        .count() as u64
}

fn pool() -> Vec<bool> {
    println!("\nA pool of worker processes (mp-pool)");
    let mut results = vec![step("Pool(4).map(square, [1, 2, 3, 4, 5])", || {
        let pool = Pool::new(4)?;
        let squares = pool.map(square, [1, 2, 3, 4, 5])?;
        pool.close();
        pool.join()?;
        Ok(format!("{squares:?}"))
    })];
    let pool = match Pool::new(2) {
        Ok(pool) => pool,
        Err(error) => {
            println!("  FAIL could not create a pool: {error}");
            results.push(false);
            return results;
        }
    };
    results.push(step("map x*x over 1 M integers, default chunks", || {
        let started = Instant::now();
        let squares = pool.map(square, 0..1_000_000u64)?;
        let rate = squares.len() as f64 / started.elapsed().as_secs_f64() / 1e6;
        if squares[999_999] != 999_999 * 999_999 {
            return Err("wrong result".into());
        }
        Ok(format!("{rate:.0} M items/s"))
    }));
    results.push(step(
        "imap over an endless iterator, lazily, in order",
        || {
            let first: Vec<u64> = pool
                .chunksize(16)
                .imap(square, 0u64..)
                .take(1000)
                .collect::<Result<_, _>>()?;
            if first != (0..1000).map(square).collect::<Vec<_>>() {
                return Err("out of order".into());
            }
            Ok("1000 results of an unbounded input, bounded memory".into())
        },
    ));
    results.push(step("imap_unordered yields every result once", || {
        let mut seen: Vec<u64> = pool
            .imap_unordered(square, 0..500u64)
            .collect::<Result<_, _>>()?;
        seen.sort_unstable();
        if seen != (0..500).map(square).collect::<Vec<_>>() {
            return Err("missing or duplicated results".into());
        }
        Ok("500 results in completion order".into())
    }));
    results.push(step("apply_async of any function, with a callback", || {
        let (sender, receiver) = std::sync::mpsc::channel();
        let joined = pool
            .apply_async(
                |(a, b): (String, u32)| a.repeat(b as usize),
                ("ab".into(), 3),
            )?
            .callback(move |s| sender.send(s.len()).unwrap_or(()));
        let value = joined.get_timeout(Duration::from_secs(10))?;
        let seen = receiver.recv_timeout(Duration::from_secs(10))?;
        Ok(format!("{value:?}; the callback saw {seen} bytes"))
    }));
    results.push(step(
        "a task that panics fails alone; its worker lives on",
        || {
            let single = Pool::new(1)?;
            let before = single.apply(|()| std::process::id(), ())?;
            let error = single
                .apply(|x: u32| -> u32 { panic!("cannot take {x}") }, 7)
                .unwrap_err();
            let after = single.apply(|()| std::process::id(), ())?;
            if before != after {
                return Err("the worker was replaced".into());
            }
            Ok(error.to_string())
        },
    ));
    results.push(step(
        "a worker SIGKILLed mid-task: that task fails, the pool goes on",
        || {
            let suicide = |()| -> u32 {
                let me = rustix::process::getpid();
                let _ = rustix::process::kill_process(me, rustix::process::Signal::KILL);
                0
            };
            let error = pool.apply(suicide, ()).unwrap_err();
            if !matches!(error, PoolError::WorkerDied { .. }) {
                return Err(format!("unexpected {error}").into());
            }
            let after = pool.map(square, 0..100u64)?;
            Ok(format!(
                "{error}; then map of 100 gave {} results",
                after.len()
            ))
        },
    ));
    results.push(step(
        "max_tasks_per_child(2): 10 tasks, fresh workers",
        || {
            let recycling = Pool::builder()
                .processes(2)
                .max_tasks_per_child(2)
                .build()?;
            let pids = recycling
                .chunksize(1)
                .map(|_: u8| std::process::id(), 0..10)?;
            let mut distinct = pids.clone();
            distinct.sort_unstable();
            distinct.dedup();
            Ok(format!(
                "{} tasks ran on {} worker processes",
                pids.len(),
                distinct.len()
            ))
        },
    ));
    results.push(step("terminate while a task runs: no hang", || {
        let busy = Pool::new(2)?;
        let long = busy.apply_async(|()| std::thread::sleep(Duration::from_secs(3600)), ())?;
        let started = Instant::now();
        busy.terminate();
        match long.get_timeout(Duration::from_secs(10)) {
            Err(PoolError::Terminated) => Ok(format!(
                "the hour-long task failed with Terminated after {}",
                format_duration(started.elapsed())
            )),
            other => Err(format!("unexpected {other:?}").into()),
        }
    }));
    results.push(step("CPU-bound tasks: serial vs the pool", || {
        let tasks = vec![400_000u64; 8];
        pool.chunksize(1).map(count_primes, vec![1_000u64; 2])?;
        let started = Instant::now();
        let serial: Vec<u64> = tasks.iter().map(|&b| count_primes(b)).collect();
        let serial_time = started.elapsed();
        let started = Instant::now();
        let parallel = pool.chunksize(1).map(count_primes, tasks)?;
        let parallel_time = started.elapsed();
        if parallel != serial {
            return Err("different results".into());
        }
        Ok(format!(
            "{} serial, {} on {} workers: {:.2}x",
            format_duration(serial_time),
            format_duration(parallel_time),
            pool.processes(),
            serial_time.as_secs_f64() / parallel_time.as_secs_f64()
        ))
    }));
    pool.close();
    results.push(step("close + join", || {
        pool.join_timeout(Duration::from_secs(10))?;
        Ok(format!("{} children left", active_children().len()))
    }));
    results
}

/// Pool timeouts, cancellation and `Result`-returning tasks (mp-pool).
fn pool_timeouts() -> Vec<bool> {
    use multiproc::mp_pool::TryError;
    println!("\nPool: timeouts, cancellation, tasks returning Result (mp-pool)");
    let pool = match Pool::new(2) {
        Ok(pool) => pool,
        Err(error) => {
            println!("  FAIL could not create a pool: {error}");
            return vec![false];
        }
    };
    let mut results = vec![step(
        "a task over its timeout: its worker is killed, the pool goes on",
        || {
            let started = Instant::now();
            let stuck = pool
                .timeout(Duration::from_millis(200))
                .apply_async(|()| park_forever(), ())?;
            let error = match stuck.get_timeout(Duration::from_secs(10)) {
                Err(error @ PoolError::TaskTimedOut { .. }) => error,
                other => return Err(format!("unexpected {other:?}").into()),
            };
            let failed_after = started.elapsed();
            let after = pool.map(square, 0..100u64)?;
            Ok(format!(
                "failed after {}: {error}; then map of 100 gave {} results",
                format_duration(failed_after),
                after.len()
            ))
        },
    )];
    results.push(step(
        "cancel a queued task; try_map carries the task's Err",
        || {
            let single = Pool::new(1)?;
            let busy = single
                .timeout(Duration::from_millis(200))
                .apply_async(|()| park_forever(), ())?;
            let queued = single.apply_async(square, 3)?;
            let cancelled = queued.cancel();
            let _ = busy.get_timeout(Duration::from_secs(10));
            let parse = |s: String| s.parse::<u32>().map_err(|e| format!("{s:?}: {e}"));
            let outcome = single.try_map(parse, ["1".to_string(), "two".into()]);
            match (cancelled, queued.get(), outcome) {
                (true, Err(PoolError::Cancelled), Err(TryError::Task(message))) => Ok(format!(
                    "cancelled before it ran; try_map failed with Err({message})"
                )),
                other => Err(format!("unexpected {other:?}").into()),
            }
        },
    ));
    results
}

/// Awaiting pool results from async code, with no runtime (mp-pool).
fn pool_await() -> Vec<bool> {
    use multiproc::mp_pool::{ReturnWhen, as_completed, wait};
    use std::future::Future;
    use std::sync::Arc;
    use std::task::{Context, Poll, Wake, Waker};
    println!("\nPool: await, as_completed, wait (mp-pool)");

    /// The smallest executor: poll, park until the pool's result thread wakes us.
    fn block_on<F: Future>(future: F) -> F::Output {
        struct Unpark(std::thread::Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut context = Context::from_waker(&waker);
        let mut future = std::pin::pin!(future);
        loop {
            if let Poll::Ready(output) = future.as_mut().poll(&mut context) {
                return output;
            }
            std::thread::park();
        }
    }

    let pool = match Pool::new(2) {
        Ok(pool) => pool,
        Err(error) => {
            println!("  FAIL could not create a pool: {error}");
            return vec![false];
        }
    };
    let mut results = vec![step(
        "await an AsyncResult (any executor, no runtime)",
        || {
            let handles = (1..=4u64)
                .map(|x| pool.apply_async(square, x))
                .collect::<Result<Vec<_>, _>>()?;
            let sum = block_on(async {
                let mut sum = 0;
                for handle in handles {
                    sum += handle.await?;
                }
                Ok::<u64, PoolError>(sum)
            })?;
            Ok(format!("1² + 2² + 3² + 4² = {sum}, awaited"))
        },
    )];
    results.push(step("as_completed and wait(FirstCompleted)", || {
        let slow = pool.apply_async(
            |ms: u64| {
                std::thread::sleep(Duration::from_millis(ms));
                ms
            },
            300,
        )?;
        let quick = pool.apply_async(square, 9)?;
        let first = wait(
            &[slow, quick],
            ReturnWhen::FirstCompleted,
            Some(Duration::from_secs(10)),
        );
        let handles = (0..8u64)
            .map(|x| pool.apply_async(square, x))
            .collect::<Result<Vec<_>, _>>()?;
        let completed = as_completed(handles).filter(|h| h.get().is_ok()).count();
        Ok(format!(
            "wait returned with {:?} done, {:?} pending; as_completed yielded {completed} of 8",
            first.done, first.not_done
        ))
    }));
    results
}

fn main() {
    // SAFETY: the tour's threads are multiproc's own (launcher, pools' supervisors) and hold
    // no lock a forked child uses, so the fork start method is sound here.
    unsafe { multiproc::allow_fork() };
    println!("multiproc tour: every capability, what it did and how long it took");
    let results: Vec<bool> = [
        processes(),
        synchronisation(),
        queues_and_pipes(),
        pool(),
        pool_timeouts(),
        pool_await(),
    ]
    .concat();
    let failed = results.iter().filter(|ok| !**ok).count();
    println!("\n{} steps, {} failed", results.len(), failed);
    if failed > 0 {
        std::process::exit(1);
    }
}
