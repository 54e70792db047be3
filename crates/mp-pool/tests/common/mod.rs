//! Helpers shared by the pool's test binaries: bounded waits, and tasks that announce
//! themselves on a FIFO so that a test acts while they run (nothing synchronises by sleeping).
#![allow(dead_code)] // each binary uses some of them

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::process::{Pid, Signal};

/// The longest any test waits for the pool.
pub const LIMIT: Duration = Duration::from_secs(20);
/// How long a "long" task runs: far longer than any test, so it is always interrupted.
pub const LONG_TASK: Duration = Duration::from_secs(60);

/// A FIFO on which running tasks announce their worker's pid.
pub struct Announcements {
    path: PathBuf,
    reader: std::fs::File,
    /// Kept open so that the FIFO never reports end-of-file between announcements.
    _writer: std::fs::File,
}

impl Announcements {
    pub fn new() -> Self {
        let path = fresh_fifo("mp-pool-test");
        // Opened before any writer, non-blocking, so that writers never block on open.
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .expect("open fifo");
        let writer = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open fifo");
        Announcements {
            path,
            reader,
            _writer: writer,
        }
    }

    pub fn path(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// The pid of a task that announced itself and was not read yet, without waiting.
    pub fn try_next_pid(&mut self) -> Option<u32> {
        let mut buf = [0u8; 4];
        match self.reader.read(&mut buf) {
            Ok(4) => Some(u32::from_le_bytes(buf)),
            Ok(0) => None,
            Ok(n) => panic!("a partial announcement of {n} bytes"),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
            Err(e) => panic!("reading the fifo: {e}"),
        }
    }

    /// The pid of the next task to announce itself, waiting at most `LIMIT`.
    pub fn next_pid(&mut self) -> u32 {
        let deadline = Instant::now() + LIMIT;
        let mut buf = [0u8; 4];
        let mut filled = 0;
        while filled < 4 {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no task announced itself within {LIMIT:?}");
            let timeout = Timespec {
                tv_sec: left.as_secs() as i64,
                tv_nsec: left.subsec_nanos() as i64,
            };
            let mut fds = [PollFd::new(&self.reader, PollFlags::IN)];
            if rustix::event::poll(&mut fds, Some(&timeout)).expect("poll") == 0 {
                continue;
            }
            match self.reader.read(&mut buf[filled..]) {
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("reading the fifo: {e}"),
            }
        }
        u32::from_le_bytes(buf)
    }
}

impl Drop for Announcements {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// In a task: tells the test which worker runs it.
pub fn announce(path: &str) {
    let mut fifo = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open fifo");
    fifo.write_all(&std::process::id().to_le_bytes())
        .expect("write fifo");
}

/// A task that announces itself, then runs "forever".
pub fn announce_and_block(path: String) -> u32 {
    announce(&path);
    std::thread::sleep(LONG_TASK);
    0
}

pub fn is_running(pid: u32) -> bool {
    let pid = Pid::from_raw(pid as i32).expect("nonzero pid");
    rustix::process::test_kill_process(pid).is_ok()
}

/// Waits until process `pid` has ended (a zombie counts: the kernel says so through a
/// pidfd), at most `LIMIT`; panics if it has not.
pub fn assert_ends(pid: u32) {
    let pid = Pid::from_raw(pid as i32).expect("nonzero pid");
    let pidfd = match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
        Ok(pidfd) => pidfd,
        Err(rustix::io::Errno::SRCH) => return, // already reaped
        Err(e) => panic!("pidfd_open: {e}"),
    };
    let deadline = Instant::now() + LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "process {pid:?} still runs after {LIMIT:?}"
        );
        let timeout = Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: left.subsec_nanos() as i64,
        };
        let mut fds = [PollFd::new(&pidfd, PollFlags::IN)];
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(n) if n > 0 => return,
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => panic!("poll: {e}"),
        }
    }
}

pub fn kill(pid: u32, signal: Signal) {
    let pid = Pid::from_raw(pid as i32).expect("nonzero pid");
    rustix::process::kill_process(pid, signal).expect("kill");
}

/// Makes a FIFO with a name no other test of this process uses, in the temporary directory.
fn fresh_fifo(prefix: &str) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&path);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &path,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::RUSR | rustix::fs::Mode::WUSR,
        0,
    )
    .expect("mkfifo");
    path
}

/// A FIFO a task blocks on until the test opens it: holds a task running for as long as
/// the test needs, with no sleep on either side.
pub struct Gate {
    path: PathBuf,
}

impl Gate {
    pub fn new() -> Self {
        let path = fresh_fifo("mp-pool-gate");
        Gate { path }
    }

    pub fn path(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// Lets the task blocked in [`pass_gate`] go on. Call it once that task announced
    /// itself (it opens the gate right after): opening for writing waits for its reader,
    /// at most `LIMIT`.
    pub fn open(&self) {
        let deadline = Instant::now() + LIMIT;
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&self.path)
            {
                Ok(mut fifo) => {
                    fifo.write_all(b"x").expect("write gate");
                    return;
                }
                // No reader yet: the task is between its announcement and the gate.
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => {
                    assert!(Instant::now() < deadline, "the task never reached the gate");
                    std::thread::yield_now();
                }
                Err(e) => panic!("opening the gate: {e}"),
            }
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// In a task: waits until the test opens the gate.
pub fn pass_gate(path: &str) {
    let mut byte = [0u8; 1];
    let mut fifo = std::fs::File::open(path).expect("open gate");
    let _ = fifo.read(&mut byte);
}

/// In a task: announces itself, then waits at the gate; returns its pid.
pub fn announce_and_wait(paths: (String, String)) -> u32 {
    announce(&paths.0);
    pass_gate(&paths.1);
    std::process::id()
}
