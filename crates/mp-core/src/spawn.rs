//! The spawn start method, parent side: start a fresh copy of this executable (vfork + exec,
//! as `posix_spawn` does: its cost does not grow with the parent's memory), hand it the write
//! end of a pipe as fd 3, read back the name of its rendezvous and connect to it.
//!
//! No step can hang: the pipe reaches end-of-file if the child dies, and the wait for the
//! rendezvous name is bounded by [`HANDSHAKE_TIMEOUT`].

use std::ffi::{CString, OsStr};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use ipc_channel::ipc::IpcSender;
use serde::{Deserialize, Serialize};

use crate::error::ProcessError;
use crate::protocol::{FIRST_FREE_FD, HANDSHAKE_FD, MARKER, Role};
use crate::sys;

/// How long a fresh child may take to connect back before it is killed and the start fails.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// A re-executed child, connected.
pub(crate) struct Spawned<T> {
    pub pid: u32,
    pub pidfd: OwnedFd,
    pub channel: IpcSender<T>,
}

/// A re-executed child that has not connected back yet: [`Started::connect`] waits for it.
///
/// Creating the child ([`start_self`]) must happen on a long-lived thread (its parent-death
/// signal follows the creating thread, see `launcher`); waiting for it to connect back does
/// not, so several callers can wait for their children at once: children start in
/// parallel, not one after another.
pub(crate) struct Started {
    pid: u32,
    pidfd: OwnedFd,
    handshake: OwnedFd,
}

/// Starts this executable again in `role` and connects to it: [`start_self`], then
/// [`Started::connect`].
pub(crate) fn spawn_self<T>(
    role: Role,
    give: &[(BorrowedFd<'_>, i32)],
) -> Result<Spawned<T>, ProcessError>
where
    T: for<'de> Deserialize<'de> + Serialize,
{
    start_self(role, give)?.connect()
}

/// Starts this executable again in `role`, handing it each `(descriptor, number)` of `give`
/// at that number (besides the handshake pipe at [`HANDSHAKE_FD`]); it gets no other
/// descriptor but stdio.
pub(crate) fn start_self(
    role: Role,
    give: &[(BorrowedFd<'_>, i32)],
) -> Result<Started, ProcessError> {
    let (handshake_read, handshake_write) =
        rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
            .map_err(|e| ProcessError::io("creating the handshake pipe")(e.into()))?;
    // Move both inherited descriptors above the slots they are duplicated into, so that one
    // dup2 cannot overwrite the source of the other.
    let high = |fd: BorrowedFd<'_>| rustix::io::fcntl_dupfd_cloexec(fd, 10);
    let handshake_write = high(handshake_write.as_fd())
        .map_err(|e| ProcessError::io("duplicating the handshake pipe")(e.into()))?;
    let given = give
        .iter()
        .map(|&(fd, number)| Ok((high(fd)?, number)))
        .collect::<rustix::io::Result<Vec<_>>>()
        .map_err(|e| ProcessError::io("duplicating a descriptor for the child")(e.into()))?;

    let mut inherit = vec![(handshake_write.as_raw_fd(), HANDSHAKE_FD)];
    inherit.extend(given.iter().map(|(fd, number)| (fd.as_raw_fd(), *number)));
    let (pid, pidfd) = spawn_self_process(&role.encode(), &inherit)
        .map_err(ProcessError::io("spawning a child process"))?;
    drop(handshake_write);
    drop(given);
    tracing::debug!(pid, ?role, "spawned");
    Ok(Started {
        pid,
        pidfd,
        handshake: handshake_read,
    })
}

impl Started {
    /// Waits (at most [`HANDSHAKE_TIMEOUT`]) for the child to connect back; on failure the
    /// child is killed and reaped.
    pub(crate) fn connect<T>(self) -> Result<Spawned<T>, ProcessError>
    where
        T: for<'de> Deserialize<'de> + Serialize,
    {
        let Started {
            pid,
            pidfd,
            handshake,
        } = self;
        connect_to(pid, pidfd, handshake)
    }
}

fn connect_to<T>(
    pid: u32,
    pidfd: OwnedFd,
    handshake_read: OwnedFd,
) -> Result<Spawned<T>, ProcessError>
where
    T: for<'de> Deserialize<'de> + Serialize,
{
    let connected = read_rendezvous_name(handshake_read).and_then(|name| {
        let channel = sys::without_signals(|| IpcSender::connect(name.clone()))
            .map_err(|e| format!("cannot connect to the child's rendezvous: {e}"));
        remove_rendezvous(&name);
        channel
    });
    match connected {
        Ok(channel) => Ok(Spawned {
            pid,
            pidfd,
            channel,
        }),
        Err(reason) => {
            // Never leave a half-started child behind (it would wait in accept forever).
            let status = sys::kill_and_reap(pidfd.as_fd());
            Err(ProcessError::StartFailed(match status {
                Some(status) => format!("{reason} (child {pid} ended with {status:?})"),
                None => format!("{reason} (child {pid})"),
            }))
        }
    }
}

/// Removes the socket file of a rendezvous we are connected to, and its private directory.
/// The child would remove them after accepting, but a child killed right after starting
/// would leave them behind; the connection no longer needs the path.
fn remove_rendezvous(name: &str) {
    let socket = std::path::Path::new(name);
    if socket.file_name() != Some(OsStr::new("socket")) {
        return;
    }
    let _ = std::fs::remove_file(socket);
    if let Some(dir) = socket.parent() {
        let _ = std::fs::remove_dir(dir);
    }
}

fn read_rendezvous_name(pipe: OwnedFd) -> Result<String, String> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    let mut pipe = std::fs::File::from(pipe);
    let mut name = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(format!(
                "the child did not connect back within {HANDSHAKE_TIMEOUT:?}"
            ));
        }
        match sys::wait_readable(pipe.as_fd(), Some(remaining)) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => return Err(format!("waiting for the child: {e}")),
        }
        match pipe.read(&mut buf) {
            Ok(0) => return Err("the child exited before connecting back".into()),
            Ok(n) => {
                name.extend_from_slice(&buf[..n]);
                if name.ends_with(b"\n") {
                    name.pop();
                    return String::from_utf8(name)
                        .map_err(|_| "the child sent a malformed rendezvous name".into());
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading from the child: {e}")),
        }
    }
}

/// The path the program was started from, absolute, recorded before `main` (it may change
/// the working directory): where `/proc` is hidden, the file to re-execute.
static STARTED_FROM: std::sync::OnceLock<Option<CString>> = std::sync::OnceLock::new();

/// Records the path the kernel executed (`AT_EXECFN`), made absolute. Called by the
/// constructor, before `main` can change the working directory.
pub(crate) fn remember_executable() {
    STARTED_FROM.get_or_init(|| {
        // SAFETY: getauxval has no preconditions; for AT_EXECFN it returns the address of a
        // NUL-terminated string the kernel placed on the initial stack (alive for the whole
        // life of the process), or 0.
        let execfn = unsafe { libc::getauxval(libc::AT_EXECFN) } as *const libc::c_char;
        if execfn.is_null() {
            return None;
        }
        // SAFETY: see above: a live, NUL-terminated string.
        let path = unsafe { std::ffi::CStr::from_ptr(execfn) };
        let path = std::path::Path::new(OsStr::from_bytes(path.to_bytes()));
        let absolute = if path.is_absolute() {
            path.to_path_buf()
        } else {
            std::env::current_dir().ok()?.join(path)
        };
        CString::new(absolute.into_os_string().into_vec()).ok()
    });
}

/// The file to re-execute: `/proc/self/exe` (the running image, even if its path was
/// replaced), or where `/proc` is hidden, the path the program was started from.
/// (Public for mp-ipc's shared memory tracker, which starts a copy of the program too.)
pub fn executable() -> io::Result<&'static std::ffi::CStr> {
    static PROC_SELF_EXE: &std::ffi::CStr = c"/proc/self/exe";
    if rustix::fs::access(PROC_SELF_EXE, rustix::fs::Access::EXISTS).is_ok() {
        return Ok(PROC_SELF_EXE);
    }
    STARTED_FROM
        .get()
        .and_then(Option::as_deref)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "/proc is hidden and the path of this program is unknown",
            )
        })
}

/// Starts `/proc/self/exe` with the current environment plus the bootstrap marker, each
/// `(from, to)` descriptor duplicated to `to` (dup2 clears close-on-exec on the copy). Every
/// descriptor from [`FIRST_FREE_FD`] up is closed in the child before the exec, as CPython
/// does: those the program opened without close-on-exec must not leak into it.
///
/// Returns the child's pid and pidfd (made by `clone` itself: no window in which the pid
/// could be reused).
///
/// # Why not `posix_spawn`
///
/// This does what glibc's `posix_spawn` does (a `CLONE_VM | CLONE_VFORK` child on a stack of
/// its own, which only duplicates, closes and execs; its cost does not grow with the parent's
/// memory) except one step: before the exec, glibc's child queries and resets the disposition
/// of every signal (126 `rt_sigaction` calls, 16-28 us on the project's VM, 2-4 % of a spawn
/// start+join), so that no handler of the parent can run in the child while the two share
/// memory. Here the child runs with every blockable signal blocked instead, from before the
/// `clone` to after the exec (the mask survives `execve`), so no handler can run in it (glibc
/// keeps its two internal signals unblockable, but only glibc sends them, to threads of this
/// process by thread id, which the child is not);
/// the exec itself resets the handlers to their defaults (ignored signals stay ignored, as
/// with `posix_spawn`), and the child's bootstrap constructor then unblocks everything (the
/// empty mask that `posix_spawn` was asked for), delivering any signal that arrived meanwhile.
fn spawn_self_process(role: &str, inherit: &[(i32, i32)]) -> io::Result<(u32, OwnedFd)> {
    let cstring = |bytes: &[u8]| {
        CString::new(bytes).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte"))
    };
    let path = executable()?;
    let argv0 = std::env::args_os()
        .next()
        .unwrap_or_else(|| "multiproc-child".into());
    let argv_owned = [cstring(argv0.as_bytes())?];
    let mut env_owned = Vec::new();
    for (key, value) in std::env::vars_os() {
        if key.as_os_str() == OsStr::new(MARKER) {
            continue;
        }
        let mut entry = key.as_bytes().to_vec();
        entry.push(b'=');
        entry.extend_from_slice(value.as_bytes());
        if let Ok(entry) = CString::new(entry) {
            env_owned.push(entry);
        }
    }
    env_owned.push(cstring(format!("{MARKER}={role}").as_bytes())?);
    let argv = null_terminated(&argv_owned);
    let envp = null_terminated(&env_owned);
    let plan = ExecPlan {
        path,
        argv: &argv,
        envp: &envp,
        inherit,
        error: AtomicI32::new(0),
    };
    // The child's stack: it runs `exec_child` only (a few system calls, no allocation).
    let mut stack = Vec::<std::mem::MaybeUninit<u8>>::with_capacity(CHILD_STACK);
    // The top of the stack, 16-byte aligned as the ABI wants (the stack grows down).
    let top = stack.as_mut_ptr().wrapping_add(CHILD_STACK);
    let top = top.wrapping_sub(top as usize % 16);
    let mut pidfd: libc::c_int = -1;
    let pid = sys::without_signals(|| {
        // SAFETY: `clone` with CLONE_VM | CLONE_VFORK runs `exec_child` in a new process that
        // shares this memory, on `stack` (CHILD_STACK bytes owned by this frame, `top` inside
        // its allocation and aligned), and suspends this thread until the child has exec'd or
        // exited: `plan`, `argv`, `envp` and `stack`, borrowed by the child, outlive its use
        // of them. Its descriptor table is a copy (no CLONE_FILES): its dup2 and close_range
        // do not touch ours. It starts with the mask `without_signals` set (every blockable
        // signal blocked), so no handler of this process can run in it; `exec_child` calls
        // only async-signal-safe functions and neither allocates nor takes a lock (other
        // threads of this process keep running). With CLONE_PIDFD the kernel writes the
        // child's pidfd into `pidfd`, a live local.
        unsafe {
            libc::clone(
                exec_child,
                top.cast(),
                libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PIDFD | libc::SIGCHLD,
                std::ptr::from_ref(&plan).cast_mut().cast(),
                &mut pidfd as *mut libc::c_int,
            )
        }
    });
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    drop(stack);
    // SAFETY: clone succeeded with CLONE_PIDFD: `pidfd` is a descriptor the kernel just
    // opened for this process and nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    match plan.error.load(Ordering::Relaxed) {
        0 => Ok((pid as u32, pidfd)),
        error => {
            // It could not exec and has exited (CLONE_VFORK resumed us only then): reap it.
            let _ = sys::wait_readable(pidfd.as_fd(), Some(Duration::from_secs(5)));
            let _ = sys::try_reap(pidfd.as_fd());
            Err(io::Error::from_raw_os_error(error))
        }
    }
}

/// One more than the highest descriptor number this process may open (its soft
/// `RLIMIT_NOFILE`, at most the kernel's default ceiling of 2^20), by a raw system call: for
/// the child of [`spawn_self_process`] on a kernel without `close_range`.
fn descriptor_limit() -> u32 {
    const CEILING: u64 = 1 << 20;
    let mut limit = libc::rlimit64 {
        rlim_cur: CEILING,
        rlim_max: CEILING,
    };
    // SAFETY: prlimit64 on this process (pid 0) with no new limit only writes the current one
    // into the live local `limit`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_prlimit64,
            0,
            libc::RLIMIT_NOFILE,
            std::ptr::null::<libc::rlimit64>(),
            &mut limit as *mut libc::rlimit64,
        )
    };
    if rc < 0 {
        return CEILING as u32;
    }
    limit.rlim_cur.min(CEILING) as u32
}

/// Bytes of stack for the child of [`spawn_self_process`] until it execs (glibc's
/// `posix_spawn` gives its child 32 KiB plus the size of the arguments; this one uses
/// a few hundred bytes).
const CHILD_STACK: usize = 64 * 1024;

/// What the child of [`spawn_self_process`] needs, prepared by the parent: the child must not
/// allocate.
struct ExecPlan<'a> {
    path: &'a std::ffi::CStr,
    /// NUL-terminated arrays of NUL-terminated strings.
    argv: &'a [*mut libc::c_char],
    envp: &'a [*mut libc::c_char],
    inherit: &'a [(i32, i32)],
    /// The child's errno if it could not exec (0: it exec'd).
    error: AtomicI32,
}

/// The child of [`spawn_self_process`], before its exec: places the inherited descriptors,
/// closes the rest, execs. Returns (the child then exits with 127) only on failure, after
/// recording the error in the plan.
extern "C" fn exec_child(plan: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `plan` is the `ExecPlan` the parent passed to clone, alive until we exec or
    // exit (the parent is suspended until then).
    let plan = unsafe { &*plan.cast_const().cast::<ExecPlan<'_>>() };
    let fail = || {
        let errno = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL);
        plan.error.store(errno.max(1), Ordering::Relaxed);
        127
    };
    // Raw system calls only: a sanitizer's interceptors (of dup2, execve) would update its
    // bookkeeping, which this child shares with the parent.
    for &(from, to) in plan.inherit {
        // SAFETY: dup3 on descriptor numbers of this process's own (copied) table. `from` is
        // never `to` (the parent moved every source above them), so the copy is a new
        // descriptor without close-on-exec.
        if unsafe { libc::syscall(libc::SYS_dup3, from, to, 0) } < 0 {
            return fail();
        }
    }
    // SAFETY: close_range and close close descriptors of this process's own table only: the
    // ones it must not inherit (every one it is given is below FIRST_FREE_FD).
    if unsafe { libc::syscall(libc::SYS_close_range, FIRST_FREE_FD, u32::MAX, 0) } < 0 {
        if io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS) {
            return fail();
        }
        // Before Linux 5.9: one by one, up to the descriptor limit.
        for fd in FIRST_FREE_FD..descriptor_limit() {
            // SAFETY: as above.
            unsafe { libc::syscall(libc::SYS_close, fd) };
        }
    }
    // SAFETY: the path and both arrays are NUL-terminated and owned by the parent's frame,
    // alive until the exec (see above). execve returns only on failure.
    unsafe {
        libc::syscall(
            libc::SYS_execve,
            plan.path.as_ptr(),
            plan.argv.as_ptr(),
            plan.envp.as_ptr(),
        )
    };
    fail()
}

fn null_terminated(strings: &[CString]) -> Vec<*mut libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr() as *mut libc::c_char)
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect()
}
