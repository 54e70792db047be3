//! A party SIGKILLed inside a synchronisation primitive: the survivors learn
//! of it from the kernel (robust futex lists) at once, not at their timeout.
//! Every wait and join is bounded; every child is killed and reaped.

use std::time::{Duration, Instant};

use mp_core::{Child, Process, ProcessError};
use mp_ipc::{Barrier, BarrierError, BoundedSemaphore, Event, Semaphore};

/// The longest any wait or join here may take before the test fails.
const BOUND: Duration = Duration::from_secs(30);
/// How soon after the kill the survivors must be told: generous for a loaded
/// 2-core CI machine (the figure printed is what matters; the issue asks for
/// under 100 ms, and survivors waiting `BOUND` prove it is not their timeout).
const PROMPT: Duration = Duration::from_secs(5);

/// A child killed and reaped when dropped, also when a test fails.
struct Killed<R: serde::Serialize + serde::de::DeserializeOwned>(Child<R>);

impl<R: serde::Serialize + serde::de::DeserializeOwned> Killed<R> {
    /// SIGKILLs the child, reaps it, and returns when the signal was sent.
    fn kill_now(&self) -> Instant {
        let killed = Instant::now();
        self.0.kill().unwrap();
        match self.0.join_timeout(BOUND) {
            Err(ProcessError::Signaled { signal, .. }) => assert_eq!(signal, libc::SIGKILL),
            other => panic!("expected death by SIGKILL, got {:?}", other.err()),
        }
        killed
    }
}

impl<R: serde::Serialize + serde::de::DeserializeOwned> Drop for Killed<R> {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.join_timeout(BOUND);
    }
}

/// A child that waits at `barrier` (until killed).
fn waiting_child(barrier: &Barrier) -> Killed<String> {
    let child = Process::new(|barrier: Barrier| format!("{:?}", barrier.wait_timeout(BOUND)))
        .args(barrier.clone())
        .start()
        .unwrap();
    Killed(child)
}

/// Spins (yielding) until `n` parties wait; bounded.
fn until_waiting(barrier: &Barrier, n: u32) {
    let deadline = Instant::now() + BOUND;
    while barrier.n_waiting() < n {
        assert!(Instant::now() < deadline, "parties never arrived");
        std::thread::yield_now();
    }
}

/// Parties waiting in threads of this process; each reports its result and
/// when it returned.
fn waiting_threads<'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    barrier: &Barrier,
    n: usize,
) -> Vec<std::sync::mpsc::Receiver<(Result<u32, String>, Instant)>> {
    (0..n)
        .map(|_| {
            let (report, result) = std::sync::mpsc::channel();
            let barrier = barrier.clone();
            scope.spawn(move || {
                let outcome = barrier.wait_timeout(BOUND).map_err(|e| format!("{e:?}"));
                let _ = report.send((outcome, Instant::now()));
            });
            result
        })
        .collect()
}

/// Every survivor got `Broken` (not a timeout), soon after `killed`.
fn assert_broken_promptly(
    survivors: Vec<std::sync::mpsc::Receiver<(Result<u32, String>, Instant)>>,
    killed: Instant,
) {
    let mut slowest = Duration::ZERO;
    for survivor in survivors {
        let (outcome, when) = survivor
            .recv_timeout(BOUND + BOUND)
            .expect("a survivor hung");
        assert_eq!(outcome, Err("Broken".to_string()));
        slowest = slowest.max(when.saturating_duration_since(killed));
    }
    eprintln!("survivors told of the death after {slowest:?}");
    assert!(slowest < PROMPT, "told only after {slowest:?}");
}

/// After a death and `reset()`, `parties` threads meet normally again.
fn assert_recovers(barrier: &Barrier) {
    assert!(barrier.broken());
    barrier.reset();
    assert!(!barrier.broken());
    std::thread::scope(|s| {
        let rounds: Vec<_> = (0..barrier.parties())
            .map(|_| s.spawn(|| barrier.wait_timeout(BOUND)))
            .collect();
        let mut indices: Vec<u32> = rounds
            .into_iter()
            .map(|r| r.join().unwrap().unwrap())
            .collect();
        indices.sort_unstable();
        assert_eq!(indices, (0..barrier.parties()).collect::<Vec<_>>());
    });
}

#[test]
fn a_barrier_party_killed_first_in_line_breaks_it_for_the_others() {
    let barrier = Barrier::new(4).unwrap();
    let victim = waiting_child(&barrier);
    until_waiting(&barrier, 1);
    std::thread::scope(|s| {
        let survivors = waiting_threads(s, &barrier, 2);
        until_waiting(&barrier, 3);
        let killed = victim.kill_now();
        assert_broken_promptly(survivors, killed);
    });
    assert_recovers(&barrier);
}

#[test]
fn a_barrier_party_killed_last_in_line_breaks_it_for_the_others() {
    let barrier = Barrier::new(4).unwrap();
    std::thread::scope(|s| {
        let survivors = waiting_threads(s, &barrier, 2);
        until_waiting(&barrier, 2);
        let victim = waiting_child(&barrier);
        until_waiting(&barrier, 3);
        let killed = victim.kill_now();
        assert_broken_promptly(survivors, killed);
    });
    assert_recovers(&barrier);
}

#[test]
fn a_barrier_party_killed_in_the_action_breaks_it_for_the_others() {
    // The action blocks (bounded) in whichever party arrives last: the child.
    let barrier = Barrier::builder(3)
        .action(|| std::thread::sleep(BOUND))
        .build()
        .unwrap();
    std::thread::scope(|s| {
        let survivors = waiting_threads(s, &barrier, 2);
        until_waiting(&barrier, 2);
        let victim = waiting_child(&barrier);
        until_waiting(&barrier, 3); // counted: the child is in the action
        let killed = victim.kill_now();
        assert_broken_promptly(survivors, killed);
    });
    assert!(barrier.broken());
    barrier.reset();
    assert!(!barrier.broken());
    assert_eq!(barrier.n_waiting(), 0);
}

#[test]
fn a_death_is_never_counted_as_an_arrival() {
    // The victim dies alone; the parties that come later find the barrier
    // broken instead of being released one party short.
    let barrier = Barrier::new(3).unwrap();
    let victim = waiting_child(&barrier);
    until_waiting(&barrier, 1);
    victim.kill_now();
    std::thread::scope(|s| {
        let late = waiting_threads(s, &barrier, 2);
        for party in late {
            let (outcome, _) = party.recv_timeout(BOUND + BOUND).expect("a party hung");
            assert_eq!(outcome, Err("Broken".to_string()));
        }
    });
    assert!(matches!(
        barrier.wait_timeout(BOUND),
        Err(BarrierError::Broken)
    ));
    assert_recovers(&barrier);
}

#[test]
fn permits_of_a_killed_holder_go_to_the_blocked_acquirers() {
    let semaphore = Semaphore::new(2).unwrap();
    let holding = Event::new().unwrap();
    let holder = Killed(
        Process::new(|(semaphore, holding): (Semaphore, Event)| {
            let _a = semaphore.acquire();
            let _b = semaphore.acquire();
            holding.set();
            // Hold both until killed (bounded, should the parent vanish).
            let _ = Event::new().unwrap().wait_timeout(BOUND);
        })
        .args((semaphore.clone(), holding.clone()))
        .start()
        .unwrap(),
    );
    holding
        .wait_timeout(BOUND)
        .expect("the child took both permits");
    assert_eq!(semaphore.value(), 0);
    std::thread::scope(|s| {
        let (report, results) = std::sync::mpsc::channel();
        for _ in 0..2 {
            let (semaphore, report) = (semaphore.clone(), report.clone());
            s.spawn(move || {
                let outcome = semaphore.acquire_timeout(BOUND).map(|g| g.forget());
                let _ = report.send((outcome, Instant::now()));
            });
        }
        // Both acquirers asleep (a sleeper cannot be observed directly; the
        // recovery is correct whether they sleep already or not).
        let killed = holder.kill_now();
        let mut slowest = Duration::ZERO;
        for _ in 0..2 {
            let (outcome, when) = results
                .recv_timeout(BOUND + BOUND)
                .expect("an acquirer hung");
            assert_eq!(outcome, Ok(()));
            slowest = slowest.max(when.saturating_duration_since(killed));
        }
        eprintln!("acquirers got the dead holder's permits after {slowest:?}");
        assert!(slowest < PROMPT, "only after {slowest:?}");
    });
    assert_eq!(semaphore.recovered(), 2);
    assert_eq!(semaphore.value(), 0);
}

#[test]
fn a_bounded_semaphore_recovers_up_to_its_bound() {
    let semaphore = BoundedSemaphore::new(1).unwrap();
    let holding = Event::new().unwrap();
    let holder = Killed(
        Process::new(|(semaphore, holding): (BoundedSemaphore, Event)| {
            let _permit = semaphore.acquire();
            holding.set();
            let _ = Event::new().unwrap().wait_timeout(BOUND);
        })
        .args((semaphore.clone(), holding.clone()))
        .start()
        .unwrap(),
    );
    holding
        .wait_timeout(BOUND)
        .expect("the child took the permit");
    holder.kill_now();
    // No sleeper: the next try_acquire recovers it.
    let permit = semaphore.try_acquire().expect("recovered");
    drop(permit);
    assert_eq!(semaphore.value(), 1);
    assert!(semaphore.release().is_err(), "never above the bound");
}
