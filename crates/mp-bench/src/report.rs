//! The two outputs of `compare`: a readable table and JSON rows.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::compare::{Cell, Row};
use crate::workload::Better;

/// What the run was, printed above the table and as the JSON `meta` object.
#[derive(Clone, Debug)]
pub struct Meta {
    /// The command line that produced the report.
    pub command: String,
    /// A `--quick` run.
    pub quick: bool,
    /// Interleaved repetitions per side.
    pub reps: usize,
    /// Sampling time per side and repetition, in seconds.
    pub budget_s: f64,
    /// Python's version, or why there is none.
    pub python: String,
    /// `Linux 6.x` and the number of CPUs.
    pub machine: String,
}

/// A figure with three significant digits (`0.123`, `12.3`, `1234`).
pub fn figure(x: f64) -> String {
    let magnitude = x.abs();
    if magnitude >= 100.0 || magnitude == 0.0 {
        format!("{x:.0}")
    } else if magnitude >= 10.0 {
        format!("{x:.1}")
    } else if magnitude >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn cell_text(cell: &Cell, notes: &mut Vec<String>, note: impl FnOnce() -> String) -> String {
    match cell {
        Cell::Value { median, .. } => figure(*median),
        Cell::NoFloor => "-".to_owned(),
        Cell::PythonMissing(what) if what.ends_with("python3") => "python3 missing".to_owned(),
        Cell::PythonMissing(_) => "script missing".to_owned(),
        Cell::TimedOut(after) => format!("timeout {}s", after.as_secs_f64()),
        Cell::Failed(why) => {
            notes.push(format!("{}: {why}", note()));
            format!("failed [{}]", notes.len())
        }
    }
}

/// The readable table, with its legend and notes.
pub fn table(meta: &Meta, rows: &[Row]) -> String {
    let mut notes = Vec::new();
    let header = [
        "workload",
        "unit",
        "multiproc",
        "cpython",
        "floor",
        "vs cpython",
        "vs floor",
    ];
    let mut lines: Vec<[String; 7]> = vec![header.map(str::to_owned)];
    for row in rows {
        let name = row.workload.name;
        let unit = match row.workload.better {
            Better::Lower => format!("{} (lower)", row.workload.unit),
            Better::Higher => format!("{} (higher)", row.workload.unit),
        };
        lines.push([
            name.to_owned(),
            unit,
            cell_text(&row.multiproc, &mut notes, || format!("{name}, multiproc")),
            cell_text(&row.cpython, &mut notes, || format!("{name}, cpython")),
            cell_text(&row.floor, &mut notes, || format!("{name}, floor")),
            row.ratio_vs_cpython().map_or("-".to_owned(), |r| {
                if r >= 1.0 {
                    format!("{}x faster", figure(r))
                } else {
                    format!("{}x SLOWER", figure(1.0 / r))
                }
            }),
            row.ratio_vs_floor()
                .map_or("-".to_owned(), |r| format!("{}x", figure(r))),
        ]);
    }
    let mut widths = [0; 7];
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }

    let mut out = String::new();
    let mode = if meta.quick { "quick" } else { "full" };
    let _ = writeln!(
        out,
        "multiproc vs CPython {} multiprocessing vs the OS floor: medians of {} interleaved runs \
         ({mode}, {} s per side per run), {}",
        meta.python, meta.reps, meta.budget_s, meta.machine
    );
    let _ = writeln!(out, "$ {}", meta.command);
    out.push('\n');
    for (i, line) in lines.iter().enumerate() {
        let mut text = String::new();
        for (col, (cell, w)) in line.iter().zip(widths).enumerate() {
            if col < 2 {
                let _ = write!(text, "{cell:<w$}  ");
            } else {
                let _ = write!(text, "{cell:>w$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
        if i == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
    }
    out.push('\n');
    out.push_str(
        "vs cpython: how many times faster multiproc is than CPython on that row (time ratio for \
         costs, rate ratio for rates).\n\
         vs floor: multiproc's cost as a multiple of the OS floor's (1.00x = at the floor; the \
         floor is measured in the same run).\n",
    );
    let mut floors: BTreeMap<String, Vec<&str>> = BTreeMap::new();
    for row in rows {
        if let Some(floor) = row.workload.floor {
            floors
                .entry(floor.describe())
                .or_default()
                .push(row.workload.name);
        }
    }
    if !floors.is_empty() {
        out.push_str("floors:\n");
        for (describe, names) in floors {
            let _ = writeln!(out, "  {}: {describe}", names.join(", "));
        }
    }
    if !notes.is_empty() {
        out.push_str("notes:\n");
        for (i, note) in notes.iter().enumerate() {
            let _ = writeln!(out, "  [{}] {note}", i + 1);
        }
    }
    out
}

fn cell_json(cell: &Cell) -> (Value, Value) {
    match cell {
        Cell::Value { median, reps } => (json!(median), json!(reps)),
        _ => (Value::Null, json!([])),
    }
}

/// One JSON object per row, with the fields of the table and the statuses.
pub fn row_json(row: &Row) -> Value {
    let (multiproc, multiproc_reps) = cell_json(&row.multiproc);
    let (cpython, cpython_reps) = cell_json(&row.cpython);
    let (floor, floor_reps) = cell_json(&row.floor);
    json!({
        "workload": row.workload.name,
        "what": row.workload.what,
        "unit": row.workload.unit,
        "better": row.workload.better.as_str(),
        "multiproc": multiproc,
        "cpython": cpython,
        "floor": floor,
        "floor_kind": row.workload.floor.map(|f| f.describe()),
        "ratio_vs_cpython": row.ratio_vs_cpython(),
        "ratio_vs_floor": row.ratio_vs_floor(),
        "multiproc_status": row.multiproc.status(),
        "cpython_status": row.cpython.status(),
        "floor_status": row.floor.status(),
        "reps": {
            "multiproc": multiproc_reps,
            "cpython": cpython_reps,
            "floor": floor_reps,
        },
    })
}

/// The whole report as one JSON document: `{"meta": {..}, "rows": [..]}`.
pub fn json(meta: &Meta, rows: &[Row]) -> Value {
    json!({
        "meta": {
            "command": meta.command,
            "quick": meta.quick,
            "reps": meta.reps,
            "budget_s": meta.budget_s,
            "python": meta.python,
            "machine": meta.machine,
            "ratio_vs_cpython": "how many times faster multiproc is than CPython (> 1: ahead)",
            "ratio_vs_floor": "multiproc's cost as a multiple of the OS floor's (1.0: at the floor)",
        },
        "rows": rows.iter().map(row_json).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::find;
    use std::time::Duration;

    fn meta() -> Meta {
        Meta {
            command: "mp-bench compare".into(),
            quick: true,
            reps: 3,
            budget_s: 0.15,
            python: "3.11.7".into(),
            machine: "Linux, 2 CPUs".into(),
        }
    }

    fn value(median: f64) -> Cell {
        Cell::Value {
            median,
            reps: vec![median],
        }
    }

    #[test]
    fn figures_keep_three_significant_digits() {
        assert_eq!(figure(0.01234), "0.012");
        assert_eq!(figure(1.234), "1.23");
        assert_eq!(figure(12.34), "12.3");
        assert_eq!(figure(1234.5), "1234");
    }

    #[test]
    fn table_shows_values_ratios_and_why_a_cell_is_empty() {
        let rows = [
            Row {
                workload: find("pipe_roundtrip").unwrap(),
                multiproc: value(20.0),
                cpython: value(10.0),
                floor: value(10.0),
            },
            Row {
                workload: find("lock_uncontended").unwrap(),
                multiproc: value(14.0),
                cpython: Cell::Failed("boom".into()),
                floor: Cell::NoFloor,
            },
            Row {
                workload: find("pool_map_1m").unwrap(),
                multiproc: Cell::TimedOut(Duration::from_secs(20)),
                cpython: Cell::PythonMissing("python3".into()),
                floor: Cell::NoFloor,
            },
        ];
        let text = table(&meta(), &rows);
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap()
                .to_owned()
        };
        let pipe = line("pipe_roundtrip");
        assert!(
            pipe.contains("2.00x SLOWER") && pipe.ends_with("2.00x"),
            "{pipe}"
        );
        let lock = line("lock_uncontended");
        assert!(
            lock.contains("14.0") && lock.contains("failed [1]"),
            "{lock}"
        );
        assert!(
            text.contains("[1] lock_uncontended, cpython: boom"),
            "{text}"
        );
        let map = line("pool_map_1m");
        assert!(
            map.contains("timeout 20s") && map.contains("python3 missing"),
            "{map}"
        );
        assert!(text.contains("BLOCKING floor"), "{text}");

        let doc = json(&meta(), &rows);
        let first = &doc["rows"][0];
        assert_eq!(first["ratio_vs_cpython"], json!(0.5));
        assert_eq!(first["ratio_vs_floor"], json!(2.0));
        assert_eq!(doc["rows"][1]["multiproc"], json!(14.0));
        assert_eq!(doc["rows"][1]["cpython"], Value::Null);
        assert_eq!(doc["rows"][1]["ratio_vs_cpython"], Value::Null);
        assert_eq!(doc["rows"][1]["cpython_status"], "failed: boom");
        assert_eq!(doc["rows"][2]["multiproc_status"], "timed out after 20 s");
        assert_eq!(doc["rows"][2]["cpython_status"], "python3 not found");
    }
}
