//! The OS floors: what a workload costs when written directly against the
//! kernel, with no library in between. A row's "vs floor" ratio is measured
//! against one of these, in the same run.

use std::ffi::CString;
use std::hint::black_box;
use std::path::Path;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rustix::mm::{MapFlags, ProtFlags};
use rustix::thread::futex;

use crate::sampling::{BenchResult, Params, per_op, throughput, timed};

/// One OS floor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Floor {
    /// Round trip between two processes over a futex word in shared memory,
    /// both sides blocking in FUTEX_WAIT (no spinning), in µs.
    FutexPingPong,
    /// Single-threaded memcpy of `block`-byte blocks (in cache when small), in GB/s.
    Memcpy {
        /// Bytes per copy.
        block: usize,
    },
    /// `fork` of this small process, `_exit(0)` in the child, `waitpid`, in ms.
    ForkExitWait,
    /// `posix_spawn` of `/bin/true` (a dynamic binary) and `waitpid`, in ms.
    PosixSpawnTrue,
}

impl Floor {
    /// The unit this floor is measured in (equal to its workloads' unit).
    pub fn unit(self) -> &'static str {
        match self {
            Floor::FutexPingPong => "us",
            Floor::Memcpy { .. } => "GB/s",
            Floor::ForkExitWait | Floor::PosixSpawnTrue => "ms",
        }
    }

    /// What the floor measures, for the table's legend and the JSON rows.
    pub fn describe(self) -> String {
        match self {
            Floor::FutexPingPong => "raw futex ping-pong between two processes, \
                 FUTEX_WAIT/FUTEX_WAKE with no spinning: the BLOCKING floor \
                 (a design that spins before sleeping can beat it)"
                .to_owned(),
            Floor::Memcpy { block } => format!(
                "memcpy of {} blocks, one thread (one copy; a transfer makes at least one)",
                human_bytes(block)
            ),
            Floor::ForkExitWait => "fork + _exit + waitpid of a small process".to_owned(),
            Floor::PosixSpawnTrue => "posix_spawn of /bin/true + waitpid".to_owned(),
        }
    }

    /// Measures the floor.
    pub fn measure(self, params: &Params) -> BenchResult<Vec<f64>> {
        match self {
            Floor::FutexPingPong => futex_ping_pong(params),
            Floor::Memcpy { block } => memcpy(params, block),
            Floor::ForkExitWait => per_op(params, 8, 1e3, fork_exit_wait),
            Floor::PosixSpawnTrue => posix_spawn_true(params),
        }
    }
}

/// `1 MiB`, `64 KiB`, `8 B`.
pub fn human_bytes(n: usize) -> String {
    match n {
        n if n >= 1 << 20 && n % (1 << 20) == 0 => format!("{} MiB", n >> 20),
        n if n >= 1 << 10 && n % (1 << 10) == 0 => format!("{} KiB", n >> 10),
        n => format!("{n} B"),
    }
}

fn memcpy(params: &Params, block: usize) -> BenchResult<Vec<f64>> {
    let src = vec![0x5au8; block];
    let mut dst = vec![0u8; block];
    throughput(params, 16, block as f64, 1e9, |k| {
        let start = Instant::now();
        for _ in 0..k {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        }
        Ok(start.elapsed())
    })
}

/// Reaps `pid`, failing unless it exited with status 0.
fn wait_success(pid: libc::pid_t) -> BenchResult<()> {
    let mut status = 0;
    // SAFETY: waitpid writes only to `status`, a valid local.
    let reaped = unsafe { libc::waitpid(pid, &mut status, 0) };
    if reaped != pid {
        return Err(format!("waitpid({pid}): {}", std::io::Error::last_os_error()).into());
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        return Err(format!("child {pid} ended with wait status {status:#x}").into());
    }
    Ok(())
}

/// Forks; the child runs `child` (which must only make async-signal-safe calls)
/// and exits with its status. Returns the child's pid in the parent.
fn fork_running(child: impl FnOnce() -> i32) -> BenchResult<libc::pid_t> {
    // SAFETY: the measuring process is single-threaded (the runner starts a
    // fresh process per measurement), so the child may run any code; it ends
    // with _exit and never returns into the parent's stack frames.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(format!("fork: {}", std::io::Error::last_os_error()).into()),
        0 => {
            let code = child();
            // SAFETY: _exit ends the child without running the parent's atexit
            // handlers or destructors.
            unsafe { libc::_exit(code) }
        }
        pid => Ok(pid),
    }
}

fn fork_exit_wait(k: u64) -> BenchResult<Duration> {
    timed(|| {
        for _ in 0..k {
            wait_success(fork_running(|| 0)?)?;
        }
        Ok(())
    })
}

fn posix_spawn_true(params: &Params) -> BenchResult<Vec<f64>> {
    posix_spawn_wait(params, Path::new("/bin/true"), &[])
}

/// Milliseconds per `posix_spawn` of `program` with `args` and `waitpid` (which must see
/// it exit 0). The child gets this process's environment, as a real spawn does.
pub fn posix_spawn_wait(params: &Params, program: &Path, args: &[&str]) -> BenchResult<Vec<f64>> {
    let path = CString::new(program.as_os_str().as_encoded_bytes())?;
    let args = args
        .iter()
        .map(|arg| CString::new(*arg))
        .collect::<Result<Vec<_>, _>>()?;
    let mut argv: Vec<*mut libc::c_char> = std::iter::once(&path)
        .chain(&args)
        .map(|arg| arg.as_ptr().cast_mut())
        .collect();
    argv.push(ptr::null_mut());
    // Match a real spawn: the child gets an environment.
    let env: Vec<CString> = std::env::vars_os()
        .filter_map(|(k, v)| {
            let mut kv = k.into_encoded_bytes();
            kv.push(b'=');
            kv.extend(v.into_encoded_bytes());
            CString::new(kv).ok()
        })
        .collect();
    let mut envp: Vec<*mut libc::c_char> = env.iter().map(|s| s.as_ptr().cast_mut()).collect();
    envp.push(ptr::null_mut());
    per_op(params, 4, 1e3, |k| {
        timed(|| {
            for _ in 0..k {
                let mut pid: libc::pid_t = 0;
                // SAFETY: path, argv and envp are NUL-terminated C strings and
                // null-terminated arrays that outlive the call; null file
                // actions and attributes mean the defaults.
                let rc = unsafe {
                    libc::posix_spawn(
                        &mut pid,
                        path.as_ptr(),
                        ptr::null(),
                        ptr::null(),
                        argv.as_ptr(),
                        envp.as_ptr(),
                    )
                };
                if rc != 0 {
                    return Err(format!(
                        "posix_spawn {}: {}",
                        program.display(),
                        std::io::Error::from_raw_os_error(rc)
                    )
                    .into());
                }
                wait_success(pid)?;
            }
            Ok(())
        })
    })
}

/// The word's states in the ping-pong.
const PARENT_TURN: u32 = 0;
const CHILD_TURN: u32 = 1;
const STOP: u32 = 2;

/// A page of anonymous memory shared with forked children, unmapped on drop.
struct SharedPage(NonNull<libc::c_void>);

impl SharedPage {
    const LEN: usize = 4096;

    fn new() -> BenchResult<Self> {
        // SAFETY: a fresh anonymous mapping at an address of the kernel's
        // choosing; it aliases no Rust object.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                ptr::null_mut(),
                Self::LEN,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
            )?
        };
        Ok(SharedPage(NonNull::new(ptr).ok_or("mmap returned null")?))
    }

    fn word(&self) -> &AtomicU32 {
        // SAFETY: the page is mapped, zero-filled, page-aligned and lives as
        // long as `self`; it is only ever accessed atomically.
        unsafe { &*self.0.as_ptr().cast::<AtomicU32>() }
    }
}

impl Drop for SharedPage {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no reference from
        // `word` outlives `self`.
        let _ = unsafe { rustix::mm::munmap(self.0.as_ptr(), Self::LEN) };
    }
}

/// Sleeps in FUTEX_WAIT until `word` leaves `value`; returns the new value.
fn wait_while(word: &AtomicU32, value: u32) -> u32 {
    loop {
        let now = word.load(Ordering::Acquire);
        if now != value {
            return now;
        }
        // EAGAIN (the word already changed) and EINTR just mean: look again.
        let _ = futex::wait(word, futex::Flags::empty(), value, None);
    }
}

fn set_and_wake(word: &AtomicU32, value: u32) {
    word.store(value, Ordering::Release);
    let _ = futex::wake(word, futex::Flags::empty(), 1);
}

fn futex_ping_pong(params: &Params) -> BenchResult<Vec<f64>> {
    let page = SharedPage::new()?;
    let word = page.word();
    word.store(PARENT_TURN, Ordering::Relaxed);
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    let child = fork_running(|| {
        // Die with the measuring process even if it is killed mid-measurement.
        // SAFETY: prctl(PR_SET_PDEATHSIG) and getppid only affect this process.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                return 1;
            }
        }
        loop {
            match wait_while(word, PARENT_TURN) {
                CHILD_TURN => set_and_wake(word, PARENT_TURN),
                _ => return 0,
            }
        }
    })?;
    let result = per_op(params, 64, 1e6, |k| {
        let start = Instant::now();
        for _ in 0..k {
            set_and_wake(word, CHILD_TURN);
            wait_while(word, CHILD_TURN);
        }
        Ok(start.elapsed())
    });
    set_and_wake(word, STOP);
    wait_success(child)?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_read_naturally() {
        assert_eq!(human_bytes(1 << 20), "1 MiB");
        assert_eq!(human_bytes(64 << 10), "64 KiB");
        assert_eq!(human_bytes(8), "8 B");
        assert_eq!(human_bytes(1536), "1536 B");
    }
}
