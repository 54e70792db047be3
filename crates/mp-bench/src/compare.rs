//! `compare`: every selected workload, its sides interleaved (multiproc,
//! procspawn, CPython, floor, baseline, then procspawn, CPython, floor, baseline,
//! multiproc: each repetition starts one side later), each side run as a
//! bounded child process; the medians across repetitions make the row.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::child::{Outcome, run_bounded};
use crate::sampling::median;
use crate::workload::{WORKLOADS, Workload};

/// Options of one `compare` run.
#[derive(Clone, Debug)]
pub struct Options {
    /// Short run (about a minute for every workload).
    pub quick: bool,
    /// Substrings selecting workloads by name; empty selects all.
    pub filters: Vec<String>,
    /// Interleaved repetitions of each side.
    pub reps: usize,
    /// Sampling time of one side in one repetition.
    pub budget: Duration,
    /// Time bound of one side in one repetition.
    pub timeout: Duration,
    /// The Python interpreter to run.
    pub python: String,
    /// The CPython benchmark program.
    pub script: PathBuf,
    /// Another build of this runner (an earlier commit's `mp-bench`): its multiproc side is
    /// measured interleaved with this one's, as the `baseline` column.
    pub baseline: Option<PathBuf>,
}

/// The measured columns of a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// multiproc, measured by this binary in a child.
    Multiproc,
    /// procspawn (the Rust peer), measured by this binary in a child.
    Procspawn,
    /// CPython's `multiprocessing`, measured by the Python program.
    CPython,
    /// The OS floor, measured by this binary in a child.
    Floor,
    /// The multiproc side of another build of the runner (`--baseline`).
    Baseline,
}

impl Side {
    /// Name of the side as in `measure --side` and the JSON keys.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Multiproc => "multiproc",
            Side::Procspawn => "procspawn",
            Side::CPython => "cpython",
            Side::Floor => "floor",
            Side::Baseline => "baseline",
        }
    }
}

/// One cell of the table.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    /// Median over the repetitions, and each repetition's own median.
    Value {
        /// Median of `reps`.
        median: f64,
        /// One figure per repetition, in run order.
        reps: Vec<f64>,
    },
    /// No OS floor applies to this workload.
    NoFloor,
    /// procspawn has no counterpart of this workload.
    NoProcspawn,
    /// No `--baseline` was given.
    NoBaseline,
    /// The Python interpreter or program is missing.
    PythonMissing(String),
    /// The side failed; the message says why.
    Failed(String),
    /// The side ran past its time bound and was killed.
    TimedOut(Duration),
}

impl Cell {
    /// The median, when the side measured.
    pub fn value(&self) -> Option<f64> {
        match self {
            Cell::Value { median, .. } => Some(*median),
            _ => None,
        }
    }

    /// `"ok"` or what kept the cell empty.
    pub fn status(&self) -> String {
        match self {
            Cell::Value { .. } => "ok".to_owned(),
            Cell::NoFloor => "no floor applies".to_owned(),
            Cell::NoProcspawn => "procspawn has no counterpart".to_owned(),
            Cell::NoBaseline => "no baseline given".to_owned(),
            Cell::PythonMissing(what) => format!("{what} not found"),
            Cell::Failed(why) => format!("failed: {why}"),
            Cell::TimedOut(after) => format!("timed out after {} s", after.as_secs_f64()),
        }
    }
}

/// One workload's result.
#[derive(Clone, Debug)]
pub struct Row {
    /// The workload.
    pub workload: &'static Workload,
    /// multiproc's cell.
    pub multiproc: Cell,
    /// procspawn's cell.
    pub procspawn: Cell,
    /// CPython's cell.
    pub cpython: Cell,
    /// The floor's cell.
    pub floor: Cell,
    /// The baseline build's multiproc cell.
    pub baseline: Cell,
}

impl Row {
    /// How many times better multiproc does than CPython (> 1: ahead).
    pub fn ratio_vs_cpython(&self) -> Option<f64> {
        Some(
            self.workload
                .advantage(self.multiproc.value()?, self.cpython.value()?),
        )
    }

    /// How many times better multiproc does than procspawn (> 1: ahead).
    pub fn ratio_vs_procspawn(&self) -> Option<f64> {
        Some(
            self.workload
                .advantage(self.multiproc.value()?, self.procspawn.value()?),
        )
    }

    /// How many times better this build does than the baseline build (> 1: ahead).
    pub fn ratio_vs_baseline(&self) -> Option<f64> {
        Some(
            self.workload
                .advantage(self.multiproc.value()?, self.baseline.value()?),
        )
    }

    /// multiproc's cost as a multiple of the floor's (1.0: at the floor).
    pub fn ratio_vs_floor(&self) -> Option<f64> {
        Some(
            self.workload
                .cost_vs_floor(self.multiproc.value()?, self.floor.value()?),
        )
    }
}

/// The workloads selected by the filters (all without filters): a filter
/// that is a workload's full name selects that one only; any other selects
/// every workload whose name contains it.
pub fn select(filters: &[String]) -> Vec<&'static Workload> {
    let selects = |filter: &str, name: &str| {
        if WORKLOADS.iter().any(|w| w.name == filter) {
            name == filter
        } else {
            name.contains(filter)
        }
    };
    WORKLOADS
        .iter()
        .filter(|w| filters.is_empty() || filters.iter().any(|f| selects(f, w.name)))
        .collect()
}

/// The interpreter's version (`3.11.7`), or the cell every CPython side gets
/// when Python cannot run.
pub fn python_version(options: &Options) -> Result<String, Cell> {
    if !options.script.is_file() {
        return Err(Cell::PythonMissing(options.script.display().to_string()));
    }
    let mut cmd = Command::new(&options.python);
    cmd.args([
        "-c",
        r#"import json, sys; print(json.dumps({"unit": sys.version.split()[0], "value": 0}))"#,
    ]);
    match run_bounded(cmd, Duration::from_secs(20)) {
        Outcome::Measured { unit, .. } => Ok(unit),
        Outcome::NotFound(what) => Err(Cell::PythonMissing(what)),
        Outcome::Failed(why) => Err(Cell::Failed(format!(
            "{} does not run: {why}",
            options.python
        ))),
        Outcome::TimedOut(after) => Err(Cell::TimedOut(after)),
    }
}

/// Measures the workloads, calling `progress` after each row.
pub fn run(
    options: &Options,
    workloads: &[&'static Workload],
    python: &Result<String, Cell>,
    mut progress: impl FnMut(usize, &Row),
) -> std::io::Result<Vec<Row>> {
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    for (i, &workload) in workloads.iter().enumerate() {
        let mut sides = [
            SideRun::new(None),
            SideRun::new(workload.procspawn.is_none().then_some(Cell::NoProcspawn)),
            SideRun::new(python.as_ref().err().cloned()),
            SideRun::new(workload.floor.is_none().then_some(Cell::NoFloor)),
            SideRun::new(options.baseline.is_none().then_some(Cell::NoBaseline)),
        ];
        let order = [
            Side::Multiproc,
            Side::Procspawn,
            Side::CPython,
            Side::Floor,
            Side::Baseline,
        ];
        for rep in 0..options.reps {
            // Each repetition starts with the next side: a side's after-effects (CPython's
            // pool workers still exiting, a warm or cold cache) then fall on every side in
            // turn, not always on the one that follows it.
            for i in rotated(order.len(), rep) {
                let (side, run) = (order[i], &mut sides[i]);
                if run.settled.is_some() {
                    continue;
                }
                let cmd = match side {
                    Side::CPython => python_command(options, workload),
                    Side::Multiproc | Side::Procspawn | Side::Floor => {
                        measure_command(&exe, options, workload, side)
                    }
                    Side::Baseline => match &options.baseline {
                        Some(baseline) => measure_command(baseline, options, workload, side),
                        None => continue,
                    },
                };
                run.record(workload, run_bounded(cmd, options.timeout));
            }
        }
        let [multiproc, procspawn, cpython, floor, baseline] = sides.map(SideRun::finish);
        let row = Row {
            workload,
            multiproc,
            procspawn,
            cpython,
            floor,
            baseline,
        };
        progress(i, &row);
        rows.push(row);
    }
    Ok(rows)
}

/// `0..len`, starting at `rep % len` and wrapping around.
fn rotated(len: usize, rep: usize) -> impl Iterator<Item = usize> {
    (0..len).map(move |i| (i + rep) % len)
}

fn common_args(cmd: &mut Command, options: &Options) {
    cmd.arg("--budget")
        .arg(format!("{}", options.budget.as_secs_f64()));
    if options.quick {
        cmd.arg("--quick");
    }
}

fn python_command(options: &Options, workload: &Workload) -> Command {
    let mut cmd = Command::new(&options.python);
    // spawn and forkserver children import the program as a module: keep
    // them from leaving a __pycache__ in the source tree.
    cmd.env("PYTHONDONTWRITEBYTECODE", "1");
    cmd.arg(&options.script).arg(workload.name);
    common_args(&mut cmd, options);
    cmd
}

fn measure_command(
    exe: &std::path::Path,
    options: &Options,
    workload: &Workload,
    side: Side,
) -> Command {
    // The baseline is another build's multiproc side.
    let side = match side {
        Side::Baseline => Side::Multiproc,
        other => other,
    };
    let mut cmd = Command::new(exe);
    cmd.args(["measure", workload.name, "--side", side.as_str()]);
    common_args(&mut cmd, options);
    cmd
}

/// One side of one workload across the repetitions.
struct SideRun {
    /// Each repetition's figure.
    reps: Vec<f64>,
    /// Set once the side can give no (more) figures.
    settled: Option<Cell>,
}

impl SideRun {
    fn new(settled: Option<Cell>) -> Self {
        SideRun {
            reps: Vec::new(),
            settled,
        }
    }

    fn record(&mut self, workload: &Workload, outcome: Outcome) {
        self.settled = match outcome {
            Outcome::Measured { unit, value, .. } if unit == workload.unit && value.is_finite() => {
                self.reps.push(value);
                None
            }
            Outcome::Measured { unit, value, .. } => Some(Cell::Failed(format!(
                "reported {value} {unit}, expected a finite figure in {}",
                workload.unit
            ))),
            Outcome::NotFound(what) => Some(Cell::PythonMissing(what)),
            Outcome::Failed(why) => Some(Cell::Failed(why)),
            Outcome::TimedOut(after) => Some(Cell::TimedOut(after)),
        };
    }

    fn finish(self) -> Cell {
        // A failure in any repetition makes the cell a failure: a median of
        // the repetitions that happened to work would hide it.
        match self.settled {
            Some(cell) => cell,
            None => match median(&self.reps) {
                Some(median) => Cell::Value {
                    median,
                    reps: self.reps,
                },
                None => Cell::Failed("no repetition ran".to_owned()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(unit: &str, value: f64) -> Outcome {
        Outcome::Measured {
            unit: unit.into(),
            value,
            samples: vec![value],
        }
    }

    #[test]
    fn medians_over_repetitions_and_failures_stick() {
        let workload = crate::workload::find("pipe_roundtrip").unwrap();
        let mut run = SideRun::new(None);
        for v in [3.0, 1.0, 2.0] {
            run.record(workload, outcome("us", v));
        }
        assert_eq!(
            run.finish(),
            Cell::Value {
                median: 2.0,
                reps: vec![3.0, 1.0, 2.0]
            }
        );

        let mut run = SideRun::new(None);
        run.record(workload, outcome("us", 1.0));
        run.record(workload, Outcome::TimedOut(Duration::from_secs(3)));
        assert_eq!(run.finish(), Cell::TimedOut(Duration::from_secs(3)));

        let mut run = SideRun::new(None);
        run.record(workload, outcome("ms", 1.0));
        assert!(
            matches!(run.finish(), Cell::Failed(m) if m.contains("expected a finite figure in us"))
        );
    }

    #[test]
    fn each_repetition_starts_with_the_next_side() {
        let orders: Vec<Vec<usize>> = (0..4).map(|rep| rotated(3, rep).collect()).collect();
        assert_eq!(orders, [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]);
    }

    #[test]
    fn filters_select_a_full_name_exactly_and_otherwise_by_substring() {
        let names = |filters: &[&str]| -> Vec<&str> {
            let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
            select(&filters).iter().map(|w| w.name).collect()
        };
        assert_eq!(names(&["queue_1to1"]), ["queue_1to1_8b", "queue_1to1_64k"]);
        assert_eq!(names(&["process_start_fork"]), ["process_start_fork"]);
        assert_eq!(
            names(&["process_start_fork", "spawn"]),
            ["process_start_fork", "process_start_spawn"]
        );
        assert_eq!(select(&[]).len(), WORKLOADS.len());
        assert!(select(&["no such workload".into()]).is_empty());
    }
}
