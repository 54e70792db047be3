//! The workloads: every benchmark target named in the mp-core, mp-ipc and
//! mp-pool issues, each with its CPython twin (same name in
//! `benches/python/mp_bench.py`) and the OS floor that applies to it.

use crate::floor::Floor;
use crate::multiproc_side as mp;
use crate::procspawn_side as ps;
use crate::sampling::{BenchResult, Params};

/// Which direction is better for a workload's unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    /// A cost: time per operation.
    Lower,
    /// A rate or a speedup.
    Higher,
}

impl Better {
    /// `"lower"` or `"higher"`, as written in the JSON rows.
    pub fn as_str(self) -> &'static str {
        match self {
            Better::Lower => "lower",
            Better::Higher => "higher",
        }
    }
}

/// Measures one side of a workload; returns its samples.
pub type Measure = fn(&Params) -> BenchResult<Vec<f64>>;

/// One row of the comparison.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    /// Identifier, shared with the CPython program.
    pub name: &'static str,
    /// What is measured, in a few words.
    pub what: &'static str,
    /// Unit of all three columns.
    pub unit: &'static str,
    /// Whether lower or higher figures are better.
    pub better: Better,
    /// The OS floor, where one applies.
    pub floor: Option<Floor>,
    /// The multiproc side.
    pub multiproc: Measure,
    /// The procspawn side, on the rows procspawn can express.
    pub procspawn: Option<Measure>,
}

impl Workload {
    /// How many times better multiproc does than `other` (> 1: multiproc is
    /// ahead), whatever the unit's direction.
    pub fn advantage(&self, multiproc: f64, other: f64) -> f64 {
        match self.better {
            Better::Lower => other / multiproc,
            Better::Higher => multiproc / other,
        }
    }

    /// multiproc's cost as a multiple of the floor's (1.0: at the floor;
    /// 2.0: twice the floor's time, or half its rate).
    pub fn cost_vs_floor(&self, multiproc: f64, floor: f64) -> f64 {
        1.0 / self.advantage(multiproc, floor)
    }
}

const MEMCPY_1MIB: Floor = Floor::Memcpy { block: 1 << 20 };
const MEMCPY_64KIB: Floor = Floor::Memcpy { block: 64 << 10 };

/// Every workload, in report order.
pub const WORKLOADS: &[Workload] = &[
    Workload {
        name: "process_start_fork",
        what: "Process start + join of a no-op, fork start method",
        unit: "ms",
        better: Better::Lower,
        floor: Some(Floor::ForkExitWait),
        multiproc: mp::process_start_fork,
        procspawn: None,
    },
    Workload {
        name: "process_start_forkserver",
        what: "Process start + join of a no-op, forkserver start method",
        unit: "ms",
        better: Better::Lower,
        floor: Some(Floor::ForkExitWait),
        multiproc: mp::process_start_forkserver,
        procspawn: None,
    },
    Workload {
        name: "process_start_spawn",
        what: "Process start + join of a no-op, spawn start method",
        unit: "ms",
        better: Better::Lower,
        floor: Some(Floor::PosixSpawnTrue),
        multiproc: mp::process_start_spawn,
        procspawn: Some(ps::process_start_spawn),
    },
    Workload {
        name: "program_exec",
        what: "Reference for spawn, no library code: this program exec'd, exiting at once",
        unit: "ms",
        better: Better::Lower,
        floor: Some(Floor::PosixSpawnTrue),
        multiproc: mp::program_exec,
        procspawn: None,
    },
    Workload {
        name: "pipe_roundtrip",
        what: "Pipe round trip of a small message (send + recv, echoed by a child)",
        unit: "us",
        better: Better::Lower,
        floor: Some(Floor::FutexPingPong),
        multiproc: mp::pipe_roundtrip,
        procspawn: None,
    },
    Workload {
        name: "pipe_1mib",
        what: "Pipe throughput, 1 MiB send_bytes to a child's recv_bytes",
        unit: "GB/s",
        better: Better::Higher,
        floor: Some(MEMCPY_1MIB),
        multiproc: mp::pipe_1mib,
        procspawn: None,
    },
    Workload {
        name: "queue_1to1_8b",
        what: "Queue, 1 producer -> 1 consumer process, 8 B items",
        unit: "M msg/s",
        better: Better::Higher,
        floor: None,
        multiproc: mp::queue_1to1_8b,
        procspawn: None,
    },
    Workload {
        name: "queue_2to2_8b",
        what: "Queue, 2 producer -> 2 consumer processes, 8 B items",
        unit: "M msg/s",
        better: Better::Higher,
        floor: None,
        multiproc: mp::queue_2to2_8b,
        procspawn: None,
    },
    Workload {
        name: "queue_1to1_64k",
        what: "Queue, 1 producer -> 1 consumer process, 64 KiB items",
        unit: "GB/s",
        better: Better::Higher,
        floor: Some(MEMCPY_64KIB),
        multiproc: mp::queue_1to1_64k,
        procspawn: None,
    },
    Workload {
        name: "queue_2to2_64k",
        what: "Queue, 2 producer -> 2 consumer processes, 64 KiB items",
        unit: "GB/s",
        better: Better::Higher,
        floor: Some(MEMCPY_64KIB),
        multiproc: mp::queue_2to2_64k,
        procspawn: None,
    },
    Workload {
        name: "lock_uncontended",
        what: "Lock acquire + release, uncontended",
        unit: "ns",
        better: Better::Lower,
        floor: None,
        multiproc: mp::lock_uncontended,
        procspawn: None,
    },
    Workload {
        name: "semaphore_uncontended",
        what: "Semaphore acquire + release, uncontended",
        unit: "ns",
        better: Better::Lower,
        floor: None,
        multiproc: mp::semaphore_uncontended,
        procspawn: None,
    },
    Workload {
        name: "contended_counter",
        what: "2 processes each: lock a shared Value, += 1, unlock (total rate)",
        unit: "M ops/s",
        better: Better::Higher,
        floor: None,
        multiproc: mp::contended_counter,
        procspawn: None,
    },
    Workload {
        name: "value_increment",
        what: "Value += 1 under its own lock, one process",
        unit: "ns",
        better: Better::Lower,
        floor: None,
        multiproc: mp::value_increment,
        procspawn: None,
    },
    Workload {
        name: "shared_memory_round",
        what: "SharedMemory 1 MiB create + attach + close + unlink",
        unit: "us",
        better: Better::Lower,
        floor: None,
        multiproc: mp::shared_memory_round,
        procspawn: None,
    },
    Workload {
        name: "pool_create",
        what: "Pool(2) create + one apply + close + join",
        unit: "ms",
        better: Better::Lower,
        floor: None,
        multiproc: mp::pool_create,
        procspawn: Some(ps::pool_create),
    },
    Workload {
        name: "pool_map_1m",
        what: "Pool(2).map(x*x) over 1 M integers, default chunksize",
        unit: "M items/s",
        better: Better::Higher,
        floor: None,
        multiproc: mp::pool_map_1m,
        procspawn: None,
    },
    Workload {
        name: "pool_map_chunksize1",
        what: "Pool(2).map(x*x) with chunksize=1 over 100 k items (10 k with --quick)",
        unit: "k items/s",
        better: Better::Higher,
        floor: None,
        multiproc: mp::pool_map_chunksize1,
        procspawn: Some(ps::pool_map_chunksize1),
    },
    Workload {
        name: "pool_apply",
        what: "Pool(2).apply(x*x) sequential round trip",
        unit: "us",
        better: Better::Lower,
        floor: Some(Floor::FutexPingPong),
        multiproc: mp::pool_apply,
        procspawn: Some(ps::pool_apply),
    },
    Workload {
        name: "echo_1mib_process",
        what: "A new process (spawn) receives 1 MiB as its argument and returns it; join",
        unit: "ms",
        better: Better::Lower,
        floor: None,
        multiproc: mp::echo_1mib_process,
        procspawn: Some(ps::echo_1mib_process),
    },
    Workload {
        name: "echo_1mib_pool",
        what: "1 MiB sent to a warm Pool(2) worker and returned (apply)",
        unit: "ms",
        better: Better::Lower,
        floor: None,
        multiproc: mp::echo_1mib_pool,
        procspawn: Some(ps::echo_1mib_pool),
    },
    Workload {
        name: "cpu_speedup",
        what: "8 CPU-bound tasks: serial time / Pool(2).map time (paired runs)",
        unit: "x",
        better: Better::Higher,
        floor: None,
        multiproc: mp::cpu_speedup,
        procspawn: Some(ps::cpu_speedup),
    },
];

/// The workload called `name`.
pub fn find(name: &str) -> Option<&'static Workload> {
    WORKLOADS.iter().find(|w| w.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_floors_share_the_unit() {
        for (i, w) in WORKLOADS.iter().enumerate() {
            assert!(
                WORKLOADS[i + 1..].iter().all(|o| o.name != w.name),
                "duplicate workload {}",
                w.name
            );
            if let Some(floor) = w.floor {
                assert_eq!(
                    floor.unit(),
                    w.unit,
                    "floor of {} is in another unit",
                    w.name
                );
            }
        }
    }

    #[test]
    fn ratios_say_how_far_ahead_multiproc_is() {
        let time = find("pipe_roundtrip").unwrap();
        assert_eq!(time.advantage(10.0, 50.0), 5.0);
        assert_eq!(time.cost_vs_floor(11.0, 10.0), 1.1);
        let rate = find("pipe_1mib").unwrap();
        assert_eq!(rate.advantage(8.0, 4.0), 2.0);
        assert_eq!(rate.cost_vs_floor(5.0, 10.0), 2.0);
    }
}
