//! The spawn start method, parent side: start a fresh copy of this executable with
//! `posix_spawn` (vfork + exec: its cost does not grow with the parent's memory), hand it the
//! write end of a pipe as fd 3, read back the name of its rendezvous and connect to it.
//!
//! No step can hang: the pipe reaches end-of-file if the child dies, and the wait for the
//! rendezvous name is bounded by [`HANDSHAKE_TIMEOUT`].

use std::ffi::{CString, OsStr};
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
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
    let pid = posix_spawn_self(&role.encode(), &inherit)
        .map_err(ProcessError::io("spawning a child process"))?;
    drop(handshake_write);
    drop(given);
    let pidfd = match sys::pidfd_open(pid) {
        Ok(pidfd) => pidfd,
        Err(error) => {
            // Without a pidfd, fall back to the pid: the child is ours and not reaped yet,
            // so the pid cannot have been recycled.
            // SAFETY: kill and waitpid take plain integers; `status` is a live local.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
                let mut status = 0;
                libc::waitpid(pid as i32, &mut status, 0);
            }
            return Err(ProcessError::io("opening a pidfd")(error));
        }
    };
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
            let _ = sys::send_signal(pidfd.as_fd(), libc::SIGKILL);
            let _ = sys::wait_readable(pidfd.as_fd(), Some(Duration::from_secs(5)));
            let status = sys::try_reap(pidfd.as_fd()).ok().flatten();
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

/// `posix_spawn`s `/proc/self/exe` with the current environment plus the bootstrap marker,
/// each `(from, to)` descriptor duplicated to `to` (dup2 clears close-on-exec on the copy).
/// Every descriptor from [`FIRST_FREE_FD`] up is closed in the child before the exec, as
/// CPython does: those the program opened without close-on-exec must not leak into it.
fn posix_spawn_self(role: &str, inherit: &[(i32, i32)]) -> io::Result<u32> {
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

    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(rc))
        }
    };
    let mut actions = std::mem::MaybeUninit::<libc::posix_spawn_file_actions_t>::uninit();
    let mut attr = std::mem::MaybeUninit::<libc::posix_spawnattr_t>::uninit();
    // SAFETY: the init functions initialise the objects they are given; every pointer passed
    // below points to a live, initialised object or NUL-terminated string owned by this frame;
    // both objects are destroyed before returning.
    unsafe {
        check(libc::posix_spawn_file_actions_init(actions.as_mut_ptr()))?;
        if let Err(e) = check(libc::posix_spawnattr_init(attr.as_mut_ptr())) {
            libc::posix_spawn_file_actions_destroy(actions.as_mut_ptr());
            return Err(e);
        }
        let result = (|| {
            for &(from, to) in inherit {
                check(libc::posix_spawn_file_actions_adddup2(
                    actions.as_mut_ptr(),
                    from,
                    to,
                ))?;
            }
            #[cfg(target_env = "gnu")]
            check(libc::posix_spawn_file_actions_addclosefrom_np(
                actions.as_mut_ptr(),
                FIRST_FREE_FD as libc::c_int,
            ))?;
            let mut empty = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
            libc::sigemptyset(empty.as_mut_ptr());
            check(libc::posix_spawnattr_setsigmask(
                attr.as_mut_ptr(),
                empty.as_ptr(),
            ))?;
            check(libc::posix_spawnattr_setflags(
                attr.as_mut_ptr(),
                libc::POSIX_SPAWN_SETSIGMASK as libc::c_short,
            ))?;
            let mut pid: libc::pid_t = 0;
            check(libc::posix_spawn(
                &mut pid,
                path.as_ptr(),
                actions.as_ptr(),
                attr.as_ptr(),
                argv.as_ptr(),
                envp.as_ptr(),
            ))?;
            Ok(pid as u32)
        })();
        libc::posix_spawn_file_actions_destroy(actions.as_mut_ptr());
        libc::posix_spawnattr_destroy(attr.as_mut_ptr());
        result
    }
}

fn null_terminated(strings: &[CString]) -> Vec<*mut libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr() as *mut libc::c_char)
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect()
}
