//! `mp-bench`: multiproc side by side with CPython's `multiprocessing` and
//! the OS floor, on this machine, in one command.
//!
//! ```text
//! cargo run --release -p mp-bench -- compare [--quick] [--json] [--filter NAME]...
//! ```
//!
//! For every workload named in the benchmark targets of the mp-core, mp-ipc
//! and mp-pool issues, `compare` measures multiproc, the equivalent CPython
//! program (`benches/python/mp_bench.py`, run with `python3` from `PATH`) and,
//! where one applies, the OS floor written directly against the kernel (a raw
//! futex ping-pong, memcpy, fork/posix_spawn). The three sides run
//! interleaved, each repetition in a fresh child process under a time bound,
//! and the table reports medians: absolute figures drift 20-45 % between runs
//! on a shared VM, ratios measured in the same run do not.

mod child;
mod compare;
mod floor;
mod multiproc_side;
mod report;
mod rigs;
mod sampling;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use compare::{Cell, Options, Side};
use sampling::{Params, median};

const USAGE: &str = "\
usage:
  mp-bench compare [--quick] [--json] [--filter NAME]... [--reps N] [--budget SECS]
                   [--timeout SECS] [--python CMD] [--script PATH]
      Measure multiproc, CPython's multiprocessing and the OS floor side by side.
      --quick        about a minute in all (3 repetitions of 0.25 s per side)
      --json         one JSON document {\"meta\": .., \"rows\": [..]} instead of the table
      --filter NAME  only workload NAME, or those whose name contains NAME (repeatable)
      --reps N       interleaved repetitions per side (default 5, quick 3)
      --budget SECS  sampling time per side and repetition (default 0.5, quick 0.25)
      --timeout SECS time bound per side and repetition (default 60, quick 20)
      --python CMD   the interpreter (default python3 from PATH)
      --script PATH  the CPython program (default benches/python/mp_bench.py)
  mp-bench list
      The workloads and what each measures.
  mp-bench measure WORKLOAD --side multiproc|floor [--budget SECS] [--quick]
      One side of one workload, printed as a JSON line (what compare runs in its children).";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("compare") => compare_command(&args[1..]),
        Some("measure") => return measure_command(&args[1..]),
        Some("list") => {
            for w in workload::WORKLOADS {
                println!("{:<26} {:<10} {}", w.name, w.unit, w.what);
            }
            Ok(())
        }
        Some("help" | "--help" | "-h") => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(format!("expected a command\n{USAGE}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("mp-bench: {message}");
            ExitCode::from(2)
        }
    }
}

/// Walks `--flag value` style arguments.
struct Args<'a> {
    rest: std::slice::Iter<'a, String>,
}

impl<'a> Args<'a> {
    fn new(args: &'a [String]) -> Self {
        Args { rest: args.iter() }
    }

    fn next(&mut self) -> Option<&'a str> {
        self.rest.next().map(String::as_str)
    }

    fn value(&mut self, flag: &str) -> Result<&'a str, String> {
        self.next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
    }

    fn number<T: std::str::FromStr>(&mut self, flag: &str) -> Result<T, String> {
        let text = self.value(flag)?;
        text.parse()
            .map_err(|_| format!("{flag}: {text:?} is not a valid number"))
    }
}

fn seconds(secs: f64, flag: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{flag}: {secs} is not a duration"))
}

fn compare_command(raw: &[String]) -> Result<(), String> {
    let mut quick = false;
    let mut as_json = false;
    let mut filters = Vec::new();
    let (mut reps, mut budget, mut timeout) = (None, None, None);
    let mut python = "python3".to_owned();
    let mut script = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../benches/python/mp_bench.py"
    ));
    let mut args = Args::new(raw);
    while let Some(arg) = args.next() {
        match arg {
            "--quick" => quick = true,
            "--json" => as_json = true,
            "--filter" => filters.push(args.value(arg)?.to_owned()),
            "--reps" => reps = Some(args.number::<usize>(arg)?.max(1)),
            "--budget" => budget = Some(seconds(args.number(arg)?, arg)?),
            "--timeout" => timeout = Some(seconds(args.number(arg)?, arg)?),
            "--python" => python = args.value(arg)?.to_owned(),
            "--script" => script = PathBuf::from(args.value(arg)?),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let options = Options {
        quick,
        filters,
        reps: reps.unwrap_or(if quick { 3 } else { 5 }),
        budget: budget.unwrap_or(Duration::from_millis(if quick { 250 } else { 500 })),
        timeout: timeout.unwrap_or(Duration::from_secs(if quick { 20 } else { 60 })),
        python,
        script,
    };
    let workloads = compare::select(&options.filters);
    if workloads.is_empty() {
        return Err(format!(
            "no workload matches {:?}; `mp-bench list` shows them",
            options.filters
        ));
    }

    let python = compare::python_version(&options);
    let meta = report::Meta {
        command: format!(
            "cargo run --release -p mp-bench -- compare {}",
            raw.join(" ")
        )
        .trim_end()
        .to_owned(),
        quick: options.quick,
        reps: options.reps,
        budget_s: options.budget.as_secs_f64(),
        python: match &python {
            Ok(version) => version.clone(),
            Err(cell) => cell.status(),
        },
        machine: machine(),
    };
    let total = workloads.len();
    let rows = compare::run(&options, &workloads, &python, |i, row| {
        let show = |cell: &Cell| match cell.value() {
            Some(v) => report::figure(v),
            None => cell.status(),
        };
        eprintln!(
            "[{}/{total}] {}: multiproc {} | cpython {} | floor {} ({})",
            i + 1,
            row.workload.name,
            show(&row.multiproc),
            show(&row.cpython),
            show(&row.floor),
            row.workload.unit
        );
    })
    .map_err(|e| format!("cannot find this executable to run measurements: {e}"))?;

    if as_json {
        let doc = report::json(&meta, &rows);
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", report::table(&meta, &rows));
    }
    Ok(())
}

/// `Linux 6.18.0, 2 CPUs, load 0.42`: the load average at the start says
/// whether other work competed for the CPUs (it shows most in `cpu_speedup`).
fn machine() -> String {
    let uname = rustix::system::uname();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned());
    format!(
        "{} {}, {cpus} CPUs, load {load}",
        uname.sysname().to_string_lossy(),
        uname.release().to_string_lossy()
    )
}

/// `measure`: one side of one workload, in this (child) process; prints the
/// JSON line [`child::run_bounded`] reads.
fn measure_command(raw: &[String]) -> ExitCode {
    let report = match measure(raw) {
        Ok((unit, samples)) => child::Report {
            unit: Some(unit.to_owned()),
            value: median(&samples),
            samples,
            error: None,
        },
        Err(error) => child::Report {
            error: Some(error),
            ..Default::default()
        },
    };
    let failed = report.error.is_some();
    match serde_json::to_string(&report) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("mp-bench measure: {e}"),
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Runs one side of a workload; returns the unit it measured in and its samples.
fn measure(raw: &[String]) -> Result<(&'static str, Vec<f64>), String> {
    let mut args = Args::new(raw);
    let name = args
        .next()
        .ok_or_else(|| format!("measure needs a workload\n{USAGE}"))?;
    let workload = workload::find(name).ok_or_else(|| format!("no workload {name:?}"))?;
    let mut side = None;
    let mut params = Params {
        budget: Duration::from_millis(500),
        quick: false,
    };
    while let Some(arg) = args.next() {
        match arg {
            "--side" => side = Some(args.value(arg)?),
            "--budget" => params.budget = seconds(args.number(arg)?, arg)?,
            "--quick" => params.quick = true,
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let side = side.ok_or("measure needs --side multiproc|floor")?;
    let (unit, samples) = if side == Side::Multiproc.as_str() {
        (workload.unit, (workload.multiproc)(&params))
    } else if side == Side::Floor.as_str() {
        let floor = workload
            .floor
            .ok_or("no OS floor applies to this workload")?;
        (floor.unit(), floor.measure(&params))
    } else {
        return Err(format!("--side {side:?}: expected multiproc or floor"));
    };
    Ok((unit, samples.map_err(|e| e.to_string())?))
}
