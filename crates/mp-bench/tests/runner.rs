//! The runner, run as a user runs it: `compare --quick --filter` on one cheap
//! workload, as a table and as JSON, so the command in the README cannot rot.
//! Every run is bounded: past its deadline the runner's process group is
//! killed and the test fails.

use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::process::{Pid, PidfdFlags, Signal, kill_process_group, pidfd_open};
use serde_json::Value;

/// The workload the tests run: no processes, a fraction of a second per side.
const CHEAP: &str = "lock_uncontended";
const DEADLINE: Duration = Duration::from_secs(45);

/// Runs mp-bench with `args`, failing the test if it outlives the deadline.
fn mp_bench(args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mp-bench"));
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let child = cmd.spawn().expect("start mp-bench");
    let group = Pid::from_child(&child);
    let pidfd = pidfd_open(group, PidfdFlags::empty()).expect("pidfd_open");
    let timeout = Timespec::try_from(DEADLINE).unwrap();
    let ready = loop {
        match poll(&mut [PollFd::new(&pidfd, PollFlags::IN)], Some(&timeout)) {
            Err(rustix::io::Errno::INTR) => continue,
            other => break other.expect("poll pidfd"),
        }
    };
    if ready == 0 {
        let _ = kill_process_group(group, Signal::KILL);
        let _ = child.wait_with_output();
        panic!("mp-bench {args:?} still running after {DEADLINE:?}");
    }
    let output = child.wait_with_output().expect("collect mp-bench output");
    assert!(
        output.status.success(),
        "mp-bench {args:?} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).expect("utf-8 output")
}

fn is_figure(cell: &str) -> bool {
    cell.parse::<f64>().is_ok_and(|x| x.is_finite() && x > 0.0)
}

#[test]
fn quick_table_has_the_row_with_measured_cells() {
    let text = stdout(&mp_bench(&["compare", "--quick", "--filter", CHEAP]));
    let header = text
        .lines()
        .find(|l| l.starts_with("workload"))
        .unwrap_or_else(|| panic!("no header in:\n{text}"));
    for column in [
        "unit",
        "multiproc",
        "procspawn",
        "cpython",
        "floor",
        "vs procspawn",
        "vs cpython",
        "vs floor",
    ] {
        assert!(header.contains(column), "header lacks {column}: {header}");
    }
    let rows: Vec<&str> = text.lines().filter(|l| l.starts_with(CHEAP)).collect();
    assert_eq!(rows.len(), 1, "exactly one {CHEAP} row in:\n{text}");
    let row = rows[0];
    // workload, unit, multiproc, procspawn ("-": it has no locks), cpython, floor ("-"),
    // ratio vs procspawn ("-"), ratio vs cpython, ratio vs floor ("-").
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[1..3], ["ns", "(lower)"], "{row}");
    assert!(is_figure(cells[3]), "multiproc cell is not a figure: {row}");
    assert_eq!(cells[4], "-", "procspawn has no lock: {row}");
    assert!(is_figure(cells[5]), "cpython cell is not a figure: {row}");
    assert_eq!(
        cells[6..8],
        ["-", "-"],
        "no floor, no ratio vs procspawn: {row}"
    );
    let ratio = cells[8].trim_end_matches('x');
    assert!(is_figure(ratio), "no ratio vs cpython: {row}");
    assert!(matches!(cells[9], "faster" | "SLOWER"), "{row}");
    assert_eq!(cells[10..], ["-"], "{row}");
    assert!(
        text.lines()
            .filter(|l| l.starts_with("pipe_") || l.starts_with("pool_"))
            .count()
            == 0,
        "--filter let other workloads through:\n{text}"
    );
}

#[test]
fn quick_json_rows_have_every_field() {
    let text = stdout(&mp_bench(&[
        "compare", "--quick", "--json", "--filter", CHEAP,
    ]));
    let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    assert_eq!(doc["meta"]["quick"], Value::Bool(true));
    let rows = doc["rows"].as_array().expect("rows array");
    assert_eq!(rows.len(), 1, "{text}");
    let row = &rows[0];
    for field in [
        "workload",
        "unit",
        "multiproc",
        "procspawn",
        "cpython",
        "floor",
        "ratio_vs_procspawn",
        "ratio_vs_cpython",
        "ratio_vs_floor",
        "multiproc_status",
        "procspawn_status",
        "cpython_status",
        "floor_status",
    ] {
        assert!(row.get(field).is_some(), "row lacks {field}: {row}");
    }
    assert_eq!(row["workload"], CHEAP);
    assert_eq!(row["unit"], "ns");
    assert_eq!(row["cpython_status"], "ok", "{row}");
    let cpython = row["cpython"].as_f64().expect("CPython figure");
    assert!(cpython.is_finite() && cpython > 0.0, "{row}");
    assert_eq!(
        row["reps"]["cpython"].as_array().map(Vec::len),
        Some(3),
        "{row}"
    );
    // The floor and the ratios are null exactly when their inputs are.
    assert_eq!(row["floor"], Value::Null);
    assert_eq!(row["ratio_vs_floor"], Value::Null);
    assert_eq!(row["multiproc_status"], "ok", "{row}");
    let multiproc = row["multiproc"].as_f64().expect("multiproc figure");
    assert!(multiproc.is_finite() && multiproc > 0.0, "{row}");
    // Lower is better for ns: the ratio is CPython's time over multiproc's.
    let ratio = row["ratio_vs_cpython"].as_f64().expect("a ratio");
    assert!((ratio - cpython / multiproc).abs() < 1e-9 * ratio, "{row}");
}

#[test]
fn procspawn_is_measured_interleaved_on_the_rows_it_can_run() {
    let text = stdout(&mp_bench(&[
        "compare",
        "--quick",
        "--csv",
        "--reps",
        "2",
        "--budget",
        "0.05",
        "--filter",
        "process_start_spawn",
    ]));
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().expect("a header line").split(',').collect();
    let row: Vec<&str> = lines.next().expect("one row").split(',').collect();
    assert!(lines.next().is_none(), "one row only:\n{text}");
    let field = |name: &str| {
        let i = header
            .iter()
            .position(|h| *h == name)
            .unwrap_or_else(|| panic!("no {name}"));
        row[i]
    };
    assert_eq!(field("workload"), "\"process_start_spawn\"");
    assert_eq!(field("procspawn_status"), "\"ok\"", "{text}");
    assert!(is_figure(field("procspawn")), "{text}");
    assert!(is_figure(field("multiproc")), "{text}");
    assert!(is_figure(field("ratio_vs_procspawn")), "{text}");
}

#[test]
fn bad_arguments_are_refused_with_the_usage() {
    let output = Command::new(env!("CARGO_BIN_EXE_mp-bench"))
        .args(["compare", "--reps", "0"])
        .stdin(Stdio::null())
        .output()
        .expect("run mp-bench");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--reps"), "{stderr}");
    let output = Command::new(env!("CARGO_BIN_EXE_mp-bench"))
        .args(["compare", "--json", "--csv"])
        .stdin(Stdio::null())
        .output()
        .expect("run mp-bench");
    assert_eq!(
        output.status.code(),
        Some(2),
        "--json and --csv conflict: {output:?}"
    );
}

#[test]
fn without_python_the_cpython_column_says_so_and_the_rest_runs() {
    let text = stdout(&mp_bench(&[
        "compare",
        "--quick",
        "--json",
        "--reps",
        "1",
        "--filter",
        "pipe_1mib",
        "--python",
        "/nonexistent/python3",
    ]));
    let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    let row = &doc["rows"][0];
    assert_eq!(
        row["cpython_status"], "/nonexistent/python3 not found",
        "{row}"
    );
    assert_eq!(row["cpython"], Value::Null);
    // The floor (memcpy) still ran.
    assert_eq!(row["floor_status"], "ok", "{row}");
    assert!(row["floor"].as_f64().is_some_and(|v| v > 0.0), "{row}");
}

#[test]
fn the_cpython_program_has_exactly_the_runner_workloads() {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../benches/python/mp_bench.py"
    );
    let python = Command::new("python3")
        .args([script, "--list"])
        .output()
        .expect("python3 must be on PATH to check the CPython program");
    assert!(python.status.success(), "{python:?}");
    let mut python_names: Vec<String> = stdout(&python).lines().map(str::to_owned).collect();
    let listed = stdout(&mp_bench(&["list"]));
    let mut runner_names: Vec<String> = listed
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    python_names.sort();
    runner_names.sort();
    assert_eq!(python_names, runner_names);
}

#[test]
fn a_baseline_build_is_measured_interleaved_as_its_own_column() {
    // The runner is its own baseline here: the column and its ratio must be filled, and the
    // ratio must be what the two medians say.
    let exe = env!("CARGO_BIN_EXE_mp-bench");
    let text = stdout(&mp_bench(&[
        "compare",
        "--quick",
        "--json",
        "--reps",
        "2",
        "--filter",
        CHEAP,
        "--python",
        "/nonexistent/python3",
        "--baseline",
        exe,
    ]));
    let doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}:\n{text}"));
    assert_eq!(doc["meta"]["baseline"], exe);
    let row = &doc["rows"][0];
    assert_eq!(row["baseline_status"], "ok", "{row}");
    assert_eq!(
        row["reps"]["baseline"].as_array().map(Vec::len),
        Some(2),
        "{row}"
    );
    let baseline = row["baseline"].as_f64().expect("baseline figure");
    let multiproc = row["multiproc"].as_f64().expect("multiproc figure");
    let ratio = row["ratio_vs_baseline"].as_f64().expect("a ratio");
    // Lower is better for ns: the ratio is the baseline's time over this build's.
    assert!((ratio - baseline / multiproc).abs() < 1e-9 * ratio, "{row}");

    let output = Command::new(exe)
        .args(["compare", "--baseline", "/nonexistent/mp-bench"])
        .stdin(Stdio::null())
        .output()
        .expect("run mp-bench");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--baseline /nonexistent/mp-bench: no such file"),
        "{stderr}"
    );
}
