//! Runs one measurement in a child process under a time bound.
//!
//! Every side of every workload (multiproc, CPython, floor) runs as a child
//! of the runner in a process group of its own. The runner waits on a pidfd
//! with a deadline; past it, the whole group is SIGKILLed and the cell reads
//! "timed out". When the child ends on its own the group is killed as well, so
//! a measurement never leaves a process behind. The child prints one JSON line:
//! `{"unit": .., "value": .., "samples": [..]}` or `{"error": ".."}`.

use std::io::{self, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec, poll};
use rustix::process::{Pid, PidfdFlags, Signal, kill_process_group, pidfd_open};
use serde::{Deserialize, Serialize};

/// What a measuring child prints on its last line of stdout.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Unit of `value` and `samples`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    /// Median of the samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    /// Every sample, in the order taken.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<f64>,
    /// Why the measurement failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How a bounded child run ended.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// The child measured: unit, median and samples.
    Measured {
        /// Unit the child reported.
        unit: String,
        /// Median it reported.
        value: f64,
        /// Its samples.
        samples: Vec<f64>,
    },
    /// The program could not be started because it does not exist.
    NotFound(String),
    /// The child reported an error, crashed, or printed something unreadable.
    Failed(String),
    /// The child was still running at the deadline and was killed.
    TimedOut(Duration),
}

/// How long to wait for a dead child's pipes to close (a grandchild that
/// escaped the process group may still hold them).
const PIPE_GRACE: Duration = Duration::from_secs(2);

/// Runs `cmd` in its own process group, killing the group after `timeout`.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Outcome {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Outcome::NotFound(program),
        Err(e) => return Outcome::Failed(format!("cannot start {program}: {e}")),
    };
    let stdout = read_in_background(child.stdout.take());
    let stderr = read_in_background(child.stderr.take());
    let group = Pid::from_child(&child);

    let finished = wait_exit(&child, timeout);
    // The child is a zombie or still running, so its pid (the group id)
    // cannot have been reused: killing the group reaches only its processes.
    let _ = kill_process_group(group, Signal::KILL);
    let status = child.wait();

    let stdout = stdout.recv_timeout(PIPE_GRACE).unwrap_or_default();
    let stderr = stderr.recv_timeout(PIPE_GRACE).unwrap_or_default();
    match finished {
        Ok(true) => {}
        Ok(false) => return Outcome::TimedOut(timeout),
        Err(e) => return Outcome::Failed(format!("waiting for {program}: {e}")),
    }
    let report = String::from_utf8_lossy(&stdout)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<Report>(l.trim()));
    let status_note = match &status {
        Ok(s) if s.success() => String::new(),
        Ok(s) => format!("{s}"),
        Err(e) => format!("wait: {e}"),
    };
    match report {
        Some(Ok(Report {
            error: Some(error), ..
        })) => Outcome::Failed(error),
        Some(Ok(Report {
            unit: Some(unit),
            value: Some(value),
            samples,
            ..
        })) if status_note.is_empty() => Outcome::Measured {
            unit,
            value,
            samples,
        },
        _ => {
            let last_err = String::from_utf8_lossy(&stderr)
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no output")
                .trim()
                .to_owned();
            let status_note = if status_note.is_empty() {
                "unreadable result".to_owned()
            } else {
                status_note
            };
            Outcome::Failed(format!("{status_note}: {last_err}"))
        }
    }
}

/// Reads a pipe to its end on a thread; the bytes arrive on the channel.
fn read_in_background(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    if let Some(mut pipe) = pipe {
        thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    }
    rx
}

/// Waits until the child exits (true) or the timeout passes (false), without
/// reaping it.
fn wait_exit(child: &std::process::Child, timeout: Duration) -> io::Result<bool> {
    let pidfd = pidfd_open(Pid::from_child(child), PidfdFlags::empty())?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let left = Timespec::try_from(left).map_err(|_| io::Error::other("timeout too large"))?;
        let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
        match poll(&mut fds, Some(&left)) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[test]
    fn a_result_line_is_measured() {
        let out = run_bounded(
            sh(r#"echo noise; echo '{"unit":"us","value":2.5,"samples":[2,2.5,3]}'"#),
            Duration::from_secs(10),
        );
        assert_eq!(
            out,
            Outcome::Measured {
                unit: "us".into(),
                value: 2.5,
                samples: vec![2.0, 2.5, 3.0]
            }
        );
    }

    #[test]
    fn an_error_line_or_a_crash_is_a_failure() {
        let out = run_bounded(
            sh(r#"echo '{"error":"no api"}'; exit 1"#),
            Duration::from_secs(10),
        );
        assert_eq!(out, Outcome::Failed("no api".into()));
        match run_bounded(sh("echo oops >&2; kill -SEGV $$"), Duration::from_secs(10)) {
            Outcome::Failed(msg) => {
                assert!(msg.contains("SIGSEGV") && msg.contains("oops"), "{msg}")
            }
            other => panic!("expected a failure, got {other:?}"),
        }
        match run_bounded(sh("echo not json"), Duration::from_secs(10)) {
            Outcome::Failed(msg) => assert!(msg.contains("unreadable"), "{msg}"),
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn a_missing_program_is_not_found() {
        let out = run_bounded(
            Command::new("/nonexistent/python3"),
            Duration::from_secs(10),
        );
        assert_eq!(out, Outcome::NotFound("/nonexistent/python3".into()));
    }

    #[test]
    fn a_hung_child_and_its_children_are_killed_at_the_deadline() {
        // The grandchild holds the stdout pipe; both must die with the group.
        let start = Instant::now();
        let out = run_bounded(sh("sleep 30 & sleep 30"), Duration::from_millis(300));
        assert_eq!(out, Outcome::TimedOut(Duration::from_millis(300)));
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "took {:?}",
            start.elapsed()
        );
    }
}
