//! The scheduler's bookkeeping under proptest: random sequences of
//! submissions, worker starts, claims, skips, results and deaths drive the
//! [`Simulation`] of the tests above, and on failure proptest shrinks the
//! sequence to a minimal one.
//!
//! Not under Miri: two cases took three minutes there (proptest's own
//! machinery dominates); Miri runs the seeded randomized test above instead.
#![cfg(not(miri))]

use super::*;
use proptest::prelude::*;

/// One thing that happens to the pool. Worker numbers pick among the live
/// workers (modulo their count); steps that do not apply do nothing.
#[derive(Clone, Debug)]
enum Event {
    /// The user submits this many chunks.
    Submit(usize),
    /// The supervisor starts the workers the scheduler asked for.
    Start,
    /// A worker reads the next chunk sent to it: claims it, or skips it
    /// (the scheduler revoked it).
    Read(usize),
    /// A worker reports its oldest claimed chunk, quickly or slowly.
    Finish(usize, bool),
    /// A worker is killed.
    Kill(usize),
}

fn events() -> impl Strategy<Value = Vec<Event>> {
    let event = prop_oneof![
        1 => (1usize..=6).prop_map(Event::Submit),
        1 => Just(Event::Start),
        2 => any::<usize>().prop_map(Event::Read),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(w, slow)| Event::Finish(w, slow)),
        1 => any::<usize>().prop_map(Event::Kill),
    ];
    prop::collection::vec(event, 0..300)
}

impl Simulation {
    /// A simulation of `processes` workers, each running at most `max_tasks` chunks.
    fn new(processes: usize, max_tasks: Option<usize>) -> Simulation {
        let supervisor = Arc::new(FakeSupervisor::default());
        let mut scheduler = Scheduler::new(processes, max_tasks, false, supervisor.clone());
        scheduler.request_workers();
        Simulation {
            scheduler,
            supervisor,
            processes,
            max_tasks,
            live: Vec::new(),
            next_id: 0,
            deliveries: Vec::new(),
        }
    }
}

proptest! {
    // 64 cases of up to 300 events: a few seconds in a debug build.
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever happens: every submitted chunk is delivered exactly once;
    /// a death fails exactly the chunks the worker had claimed and not
    /// reported (and those are the only failures); never more workers
    /// than `processes` exist (asserted as they start); and the scheduler
    /// ends idle.
    #[test]
    fn every_chunk_is_delivered_once_and_only_claimed_chunks_fail(
        processes in 1usize..=3,
        max_tasks in prop_oneof![Just(None), (1usize..=4).prop_map(Some)],
        events in events(),
    ) {
        let mut sim = Simulation::new(processes, max_tasks);
        let job = Arc::new(Recorder::default());
        let mut submitted = 0;
        let mut lost_to_deaths = 0;
        for event in events {
            let live = sim.live.len();
            match event {
                Event::Submit(n) => {
                    sim.scheduler.enqueue(chunks(&job, submitted..submitted + n)).unwrap();
                    submitted += n;
                }
                Event::Start => sim.start_requested(),
                Event::Read(w) if live > 0 => {
                    sim.read_next(w % live);
                }
                Event::Finish(w, slow) if live > 0 => {
                    sim.finish_one(w % live, if slow { 10_000_000 } else { 1_000 });
                }
                Event::Kill(w) if live > 0 => {
                    let (failed, claimed) = sim.exit(w % live, -9);
                    prop_assert_eq!(failed, claimed, "only the claimed chunks fail");
                    lost_to_deaths += claimed;
                }
                _ => {}
            }
        }
        prop_assert!(sim.drain(), "work left over");
        deliver(std::mem::take(&mut sim.deliveries));
        let outcomes = job.0.lock();
        let mut delivered: Vec<usize> = outcomes.iter().map(|(i, _)| *i).collect();
        delivered.sort_unstable();
        prop_assert_eq!(delivered, (0..submitted).collect::<Vec<_>>(), "each chunk exactly once");
        let failed = outcomes.iter().filter(|(_, r)| r.is_err()).count();
        prop_assert_eq!(failed, lost_to_deaths, "failures are the deaths' claimed chunks");
    }
}
