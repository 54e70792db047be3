//! `mp-bench`: multiproc side by side with procspawn (the Rust peer),
//! CPython's `multiprocessing` and the OS floor, on this machine, in one command.
//!
//! ```text
//! cargo run --release -p mp-bench -- compare [--quick] [--json | --csv] [--filter NAME]...
//!                                           [--baseline OTHER_MP_BENCH]
//! ```
//!
//! For every workload named in the benchmark targets of the mp-core, mp-ipc
//! and mp-pool issues, `compare` measures multiproc, procspawn 1.0.2 on the
//! rows it can express, the equivalent CPython program
//! (`benches/python/mp_bench.py`, run with `python3` from `PATH`) and, where
//! one applies, the OS floor written directly against the kernel (a raw futex
//! ping-pong, memcpy, fork/posix_spawn). The sides run interleaved, each
//! repetition in a fresh child process under a time bound, and the table
//! reports medians: absolute figures drift 20-45 % between runs on a shared
//! VM, ratios measured in the same run do not. `--baseline` adds another
//! build of the runner (an earlier commit's) as one more interleaved side, so
//! that a change is judged against its predecessor in the same run.

mod child;
mod compare;
mod floor;
mod multiproc_side;
mod procspawn_side;
mod report;
mod rigs;
mod sampling;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use compare::{Cell, Options};
use sampling::{Params, median};

/// multiproc side by side with procspawn, CPython's multiprocessing and the OS floor.
#[derive(Parser, Debug)]
#[command(name = "mp-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Measure multiproc, procspawn, CPython's multiprocessing and the OS floor side by side.
    Compare(CompareArgs),
    /// The workloads and what each measures.
    List,
    /// One side of one workload, printed as a JSON line (what compare runs in its children).
    Measure(MeasureArgs),
}

#[derive(clap::Args, Debug)]
struct CompareArgs {
    /// About a minute in all (3 repetitions of 0.25 s per side).
    #[arg(long)]
    quick: bool,
    /// One JSON document {"meta": .., "rows": [..]} instead of the table.
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// CSV: a header line, then one line per workload, instead of the table.
    #[arg(long)]
    csv: bool,
    /// Only workload NAME, or those whose name contains NAME (repeatable).
    #[arg(long = "filter", value_name = "NAME")]
    filters: Vec<String>,
    /// Interleaved repetitions per side [default: 5, quick 3].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    reps: Option<u16>,
    /// Sampling time per side and repetition [default: 0.5, quick 0.25].
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    budget: Option<Duration>,
    /// Time bound per side and repetition [default: 60, quick 20].
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    timeout: Option<Duration>,
    /// The Python interpreter.
    #[arg(long, value_name = "CMD", default_value = "python3")]
    python: String,
    /// The CPython program [default: benches/python/mp_bench.py].
    #[arg(long, value_name = "PATH")]
    script: Option<PathBuf>,
    /// Another build of this runner (say, the previous commit's
    /// `target/release/mp-bench`): its multiproc side is measured interleaved with this
    /// build's, as a `baseline` column with `vs baseline` ratios, so that a change is judged
    /// against its predecessor in one run.
    #[arg(long, value_name = "MP_BENCH")]
    baseline: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct MeasureArgs {
    /// The workload (`mp-bench list`).
    workload: String,
    /// Which side to measure.
    #[arg(long, value_enum)]
    side: MeasuredSide,
    /// Sampling time.
    #[arg(long, value_name = "SECS", value_parser = parse_seconds, default_value = "0.5")]
    budget: Duration,
    /// The quick variant of the workload (smaller inputs).
    #[arg(long)]
    quick: bool,
}

/// The sides this binary measures itself (CPython's is the Python program).
#[derive(ValueEnum, Clone, Copy, Debug)]
enum MeasuredSide {
    Multiproc,
    Procspawn,
    Floor,
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("{secs} is not a duration"))
}

/// The argument that makes the runner exit at the top of `main` (the `program_exec` row).
pub const EXIT_AT_ONCE: &str = "--exit-at-once";

fn main() -> ExitCode {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|arg| arg == EXIT_AT_ONCE)
    {
        return ExitCode::SUCCESS;
    }
    // procspawn re-executes this binary for its children: they run their function here and
    // exit (multiproc's children are served before main, by its constructor).
    procspawn::init();
    // SAFETY: the runner's only other threads are multiproc's own and the pools', which hold
    // no lock a forked child uses: the fork start method is sound here (it is measured).
    unsafe { multiproc::allow_fork() };
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Compare(args) => compare_command(args),
        Command::Measure(args) => return measure_command(&args),
        Command::List => {
            for w in workload::WORKLOADS {
                println!("{:<26} {:<10} {}", w.name, w.unit, w.what);
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("mp-bench: {message}");
            ExitCode::from(2)
        }
    }
}

fn compare_command(args: CompareArgs) -> Result<(), String> {
    let quick = args.quick;
    let options = Options {
        quick,
        filters: args.filters,
        reps: args.reps.map_or(if quick { 3 } else { 5 }, usize::from),
        budget: args
            .budget
            .unwrap_or(Duration::from_millis(if quick { 250 } else { 500 })),
        timeout: args
            .timeout
            .unwrap_or(Duration::from_secs(if quick { 20 } else { 60 })),
        python: args.python,
        script: args.script.unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../benches/python/mp_bench.py"
            ))
        }),
        baseline: args.baseline,
    };
    if let Some(baseline) = options.baseline.as_ref().filter(|path| !path.is_file()) {
        return Err(format!(
            "--baseline {}: no such file (give another build's mp-bench executable)",
            baseline.display()
        ));
    }
    let workloads = compare::select(&options.filters);
    if workloads.is_empty() {
        return Err(format!(
            "no workload matches {:?}; `mp-bench list` shows them",
            options.filters
        ));
    }

    let python = compare::python_version(&options);
    let raw: Vec<String> = std::env::args().skip(2).collect();
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
        baseline: options
            .baseline
            .as_ref()
            .map(|path| path.display().to_string()),
    };
    let total = workloads.len();
    let rows = compare::run(&options, &workloads, &python, |i, row| {
        let show = |cell: &Cell| match cell.value() {
            Some(v) => report::figure(v),
            None => cell.status(),
        };
        let baseline = match row.baseline {
            Cell::NoBaseline => String::new(),
            ref cell => format!(" | baseline {}", show(cell)),
        };
        eprintln!(
            "[{}/{total}] {}: multiproc {} | procspawn {} | cpython {} | floor {}{baseline} ({})",
            i + 1,
            row.workload.name,
            show(&row.multiproc),
            show(&row.procspawn),
            show(&row.cpython),
            show(&row.floor),
            row.workload.unit
        );
    })
    .map_err(|e| format!("cannot find this executable to run measurements: {e}"))?;

    if args.json {
        let doc = report::json(&meta, &rows);
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?
        );
    } else if args.csv {
        print!("{}", report::csv(&rows));
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
fn measure_command(args: &MeasureArgs) -> ExitCode {
    let report = match measure(args) {
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
fn measure(args: &MeasureArgs) -> Result<(&'static str, Vec<f64>), String> {
    let name = args.workload.as_str();
    let workload = workload::find(name).ok_or_else(|| format!("no workload {name:?}"))?;
    let params = Params {
        budget: args.budget,
        quick: args.quick,
    };
    let (unit, samples) = match args.side {
        MeasuredSide::Multiproc => (workload.unit, (workload.multiproc)(&params)),
        MeasuredSide::Procspawn => {
            let procspawn = workload
                .procspawn
                .ok_or("procspawn has no counterpart of this workload")?;
            (workload.unit, procspawn(&params))
        }
        MeasuredSide::Floor => {
            let floor = workload
                .floor
                .ok_or("no OS floor applies to this workload")?;
            (floor.unit(), floor.measure(&params))
        }
    };
    Ok((unit, samples.map_err(|e| e.to_string())?))
}
