//! The outputs of `compare`: a readable table, JSON rows and CSV rows.
//!
//! The table is written by hand (about forty lines): a table crate would add a
//! dependency to save little, and the notes and legends below it are plain text anyway.

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
    /// The baseline build's path (`--baseline`), when one was measured.
    pub baseline: Option<String>,
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
        Cell::NoFloor | Cell::NoProcspawn | Cell::NoBaseline => "-".to_owned(),
        Cell::PythonMissing(what) if what.ends_with("python3") => "python3 missing".to_owned(),
        Cell::PythonMissing(_) => "script missing".to_owned(),
        Cell::TimedOut(after) => format!("timeout {}s", after.as_secs_f64()),
        Cell::Failed(why) => {
            notes.push(format!("{}: {why}", note()));
            format!("failed [{}]", notes.len())
        }
    }
}

/// `12.3x faster` / `2.00x SLOWER`: how a ratio of advantage reads.
fn advantage_text(ratio: Option<f64>) -> String {
    ratio.map_or("-".to_owned(), |r| {
        if r >= 1.0 {
            format!("{}x faster", figure(r))
        } else {
            format!("{}x SLOWER", figure(1.0 / r))
        }
    })
}

/// The readable table, with its legend and notes.
pub fn table(meta: &Meta, rows: &[Row]) -> String {
    let mut notes = Vec::new();
    let with_baseline = meta.baseline.is_some();
    let mut header = vec![
        "workload",
        "unit",
        "multiproc",
        "procspawn",
        "cpython",
        "floor",
        "vs procspawn",
        "vs cpython",
        "vs floor",
    ];
    if with_baseline {
        header.extend(["baseline", "vs baseline"]);
    }
    let mut lines: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for row in rows {
        let name = row.workload.name;
        let unit = match row.workload.better {
            Better::Lower => format!("{} (lower)", row.workload.unit),
            Better::Higher => format!("{} (higher)", row.workload.unit),
        };
        let mut line = vec![
            name.to_owned(),
            unit,
            cell_text(&row.multiproc, &mut notes, || format!("{name}, multiproc")),
            cell_text(&row.procspawn, &mut notes, || format!("{name}, procspawn")),
            cell_text(&row.cpython, &mut notes, || format!("{name}, cpython")),
            cell_text(&row.floor, &mut notes, || format!("{name}, floor")),
            advantage_text(row.ratio_vs_procspawn()),
            advantage_text(row.ratio_vs_cpython()),
            row.ratio_vs_floor()
                .map_or("-".to_owned(), |r| format!("{}x", figure(r))),
        ];
        if with_baseline {
            line.push(cell_text(&row.baseline, &mut notes, || {
                format!("{name}, baseline")
            }));
            line.push(advantage_text(row.ratio_vs_baseline()));
        }
        lines.push(line);
    }
    let mut widths = vec![0; header.len()];
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }

    let mut out = String::new();
    let mode = if meta.quick { "quick" } else { "full" };
    let _ = writeln!(
        out,
        "multiproc vs procspawn 1.0.2 vs CPython {} multiprocessing vs the OS floor: medians of {} interleaved runs \
         ({mode}, {} s per side per run), {}",
        meta.python, meta.reps, meta.budget_s, meta.machine
    );
    let _ = writeln!(out, "$ {}", meta.command);
    out.push('\n');
    for (i, line) in lines.iter().enumerate() {
        let mut text = String::new();
        for (col, (cell, &w)) in line.iter().zip(&widths).enumerate() {
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
        "vs procspawn, vs cpython: how many times faster multiproc is than procspawn or CPython \
         on that row (time ratio for costs, rate ratio for rates).\n\
         vs floor: multiproc's cost as a multiple of the OS floor's (1.00x = at the floor; the \
         floor is measured in the same run).\n",
    );
    if let Some(baseline) = &meta.baseline {
        let _ = writeln!(
            out,
            "baseline: the multiproc side of {baseline}, interleaved with this build's; vs \
             baseline: how many times faster this build is."
        );
    }
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
    let (procspawn, procspawn_reps) = cell_json(&row.procspawn);
    let (cpython, cpython_reps) = cell_json(&row.cpython);
    let (floor, floor_reps) = cell_json(&row.floor);
    let (baseline, baseline_reps) = cell_json(&row.baseline);
    json!({
        "workload": row.workload.name,
        "what": row.workload.what,
        "unit": row.workload.unit,
        "better": row.workload.better.as_str(),
        "multiproc": multiproc,
        "procspawn": procspawn,
        "cpython": cpython,
        "floor": floor,
        "baseline": baseline,
        "floor_kind": row.workload.floor.map(|f| f.describe()),
        "ratio_vs_procspawn": row.ratio_vs_procspawn(),
        "ratio_vs_cpython": row.ratio_vs_cpython(),
        "ratio_vs_floor": row.ratio_vs_floor(),
        "ratio_vs_baseline": row.ratio_vs_baseline(),
        "multiproc_status": row.multiproc.status(),
        "procspawn_status": row.procspawn.status(),
        "cpython_status": row.cpython.status(),
        "floor_status": row.floor.status(),
        "baseline_status": row.baseline.status(),
        "reps": {
            "multiproc": multiproc_reps,
            "procspawn": procspawn_reps,
            "cpython": cpython_reps,
            "floor": floor_reps,
            "baseline": baseline_reps,
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
            "baseline": meta.baseline,
            "ratio_vs_baseline": "how many times faster this build is than the baseline build (> 1: ahead)",
            "ratio_vs_procspawn": "how many times faster multiproc is than procspawn (> 1: ahead)",
            "ratio_vs_cpython": "how many times faster multiproc is than CPython (> 1: ahead)",
            "ratio_vs_floor": "multiproc's cost as a multiple of the OS floor's (1.0: at the floor)",
        },
        "rows": rows.iter().map(row_json).collect::<Vec<_>>(),
    })
}

/// The columns of [`csv`], in order.
pub const CSV_COLUMNS: [&str; 17] = [
    "workload",
    "unit",
    "better",
    "multiproc",
    "procspawn",
    "cpython",
    "floor",
    "baseline",
    "ratio_vs_procspawn",
    "ratio_vs_cpython",
    "ratio_vs_floor",
    "ratio_vs_baseline",
    "multiproc_status",
    "procspawn_status",
    "cpython_status",
    "floor_status",
    "baseline_status",
];

/// One CSV line per row after a header line (RFC 4180: text fields quoted, `"` doubled);
/// a figure that was not measured is an empty field, and its status says why.
pub fn csv(rows: &[Row]) -> String {
    let quote = |text: &str| format!("\"{}\"", text.replace('"', "\"\""));
    let number = |x: Option<f64>| x.map_or(String::new(), |x| x.to_string());
    let mut out = CSV_COLUMNS.join(",");
    out.push('\n');
    for row in rows {
        let fields = [
            quote(row.workload.name),
            quote(row.workload.unit),
            quote(row.workload.better.as_str()),
            number(row.multiproc.value()),
            number(row.procspawn.value()),
            number(row.cpython.value()),
            number(row.floor.value()),
            number(row.baseline.value()),
            number(row.ratio_vs_procspawn()),
            number(row.ratio_vs_cpython()),
            number(row.ratio_vs_floor()),
            number(row.ratio_vs_baseline()),
            quote(&row.multiproc.status()),
            quote(&row.procspawn.status()),
            quote(&row.cpython.status()),
            quote(&row.floor.status()),
            quote(&row.baseline.status()),
        ];
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
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
            baseline: None,
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
                procspawn: value(5.0),
                cpython: value(10.0),
                floor: value(10.0),
                baseline: Cell::NoBaseline,
            },
            Row {
                workload: find("lock_uncontended").unwrap(),
                multiproc: value(14.0),
                procspawn: Cell::NoProcspawn,
                cpython: Cell::Failed("boom".into()),
                floor: Cell::NoFloor,
                baseline: Cell::NoBaseline,
            },
            Row {
                workload: find("pool_map_1m").unwrap(),
                multiproc: Cell::TimedOut(Duration::from_secs(20)),
                procspawn: value(1.0),
                cpython: Cell::PythonMissing("python3".into()),
                floor: Cell::NoFloor,
                baseline: Cell::NoBaseline,
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
            pipe.contains("4.00x SLOWER")
                && pipe.contains("2.00x SLOWER")
                && pipe.ends_with("2.00x"),
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
        assert_eq!(first["procspawn"], json!(5.0));
        assert_eq!(first["ratio_vs_procspawn"], json!(0.25));
        assert_eq!(
            doc["rows"][1]["procspawn_status"],
            "procspawn has no counterpart"
        );
    }

    #[test]
    fn csv_has_a_header_and_one_quoted_line_per_row() {
        let rows = [Row {
            workload: find("pool_apply").unwrap(),
            multiproc: value(2.0),
            procspawn: value(4.0),
            cpython: Cell::Failed("said \"no\", twice".into()),
            floor: value(1.0),
            baseline: value(4.0),
        }];
        let text = csv(&rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], CSV_COLUMNS.join(","));
        assert_eq!(
            lines[1],
            "\"pool_apply\",\"us\",\"lower\",2,4,,1,4,2,,2,2,\"ok\",\"ok\",\
             \"failed: said \"\"no\"\", twice\",\"ok\",\"ok\""
        );
        assert_eq!(lines.len(), 2);
    }

    #[test]
    fn a_baseline_adds_its_column_and_ratio_only_when_given() {
        let rows = [
            Row {
                workload: find("queue_1to1_8b").unwrap(),
                multiproc: value(12.0),
                procspawn: Cell::NoProcspawn,
                cpython: value(0.3),
                floor: Cell::NoFloor,
                baseline: value(8.0),
            },
            Row {
                workload: find("pool_apply").unwrap(),
                multiproc: value(4.0),
                procspawn: value(60.0),
                cpython: value(150.0),
                floor: value(13.0),
                baseline: Cell::Failed("no workload \"pool_apply\"".into()),
            },
        ];
        let plain = table(&meta(), &rows);
        assert!(!plain.contains("vs baseline"), "{plain}");

        let with = Meta {
            baseline: Some("/tmp/mp-bench-old".into()),
            ..meta()
        };
        let text = table(&with, &rows);
        let last_words = |start: &str, n: usize| {
            let line = text.lines().find(|l| l.starts_with(start)).unwrap();
            let words: Vec<&str> = line.split_whitespace().collect();
            words[words.len() - n..].join(" ")
        };
        assert_eq!(last_words("workload", 5), "vs floor baseline vs baseline");
        assert_eq!(last_words("queue_1to1_8b", 3), "8.00 1.50x faster");
        assert_eq!(last_words("pool_apply", 3), "failed [1] -");
        assert!(
            text.contains("[1] pool_apply, baseline: no workload")
                && text.contains("the multiproc side of /tmp/mp-bench-old"),
            "{text}"
        );

        let doc = json(&with, &rows);
        assert_eq!(doc["meta"]["baseline"], "/tmp/mp-bench-old");
        assert_eq!(doc["rows"][0]["baseline"], json!(8.0));
        assert_eq!(doc["rows"][0]["ratio_vs_baseline"], json!(1.5));
        assert_eq!(doc["rows"][1]["ratio_vs_baseline"], Value::Null);
    }
}
