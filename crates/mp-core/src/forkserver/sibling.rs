//! Forking a spare as the requester's child (a *sibling* of the fork server): `clone` by hand
//! with `CLONE_PARENT` and `CLONE_PIDFD`, and the set-up glibc's `fork` would do in the child.

use std::os::fd::{FromRawFd, OwnedFd};

/// `PR_GET_TID_ADDRESS` (not in the libc crate for Linux): the address the kernel clears
/// when the calling thread exits, which glibc sets to its thread descriptor's `tid` field.
const PR_GET_TID_ADDRESS: libc::c_int = 40;

/// What a child cloned without glibc's `fork` needs set up as `fork` would (see
/// [`fork_sibling`]): where glibc keeps the thread's id, and its robust mutex list.
pub(super) struct MainThread {
    /// glibc's `tid` field of this thread's descriptor (the kernel writes the child's tid
    /// there, `CLONE_CHILD_SETTID`, as glibc's `fork` asks it to).
    tid: *mut libc::pid_t,
    /// The thread's robust mutex list head and its size, registered again in the child
    /// (the kernel does not copy the registration).
    robust_head: *mut libc::c_void,
    robust_len: usize,
}

impl MainThread {
    pub(super) fn current() -> std::io::Result<MainThread> {
        let mut tid: *mut libc::pid_t = std::ptr::null_mut();
        // SAFETY: PR_GET_TID_ADDRESS writes one pointer into the local `tid`.
        if unsafe { libc::prctl(PR_GET_TID_ADDRESS, &mut tid as *mut *mut libc::pid_t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut robust_head: *mut libc::c_void = std::ptr::null_mut();
        let mut robust_len: usize = 0;
        // SAFETY: get_robust_list(0, ...) writes the calling thread's list head and its
        // length into the two locals.
        if unsafe {
            libc::syscall(
                libc::SYS_get_robust_list,
                0,
                &mut robust_head as *mut *mut libc::c_void,
                &mut robust_len as *mut usize,
            )
        } != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        if tid.is_null() || robust_head.is_null() {
            return Err(std::io::Error::other(
                "the thread's id or robust list address is unknown",
            ));
        }
        Ok(MainThread {
            tid,
            robust_head,
            robust_len,
        })
    }
}

/// `struct clone_args` of `clone3` (its first version, 64 bytes).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
}

/// `fork()`, except that the child is this process's *sibling*: a child of this process's
/// parent (`CLONE_PARENT`), which gets its `SIGCHLD` and reaps it. Returns `None` in the child
/// and, in the server, the child's pid and a pidfd for it (`CLONE_PIDFD`), which the server
/// passes to the parent.
///
/// glibc's `fork` cannot ask for that flag, so this clones by hand and then does in the
/// child what glibc's `_Fork` (the `fork` without `atfork` handlers) does: the kernel
/// writes the child's thread id into glibc's thread descriptor (`CLONE_CHILD_SETTID` at the
/// address glibc registered, read back with `PR_GET_TID_ADDRESS`), and the child registers
/// the robust mutex list again (the kernel does not copy the registration; the list is
/// empty, as the server holds no robust mutex). The `atfork` handlers are skipped, as
/// `_Fork` and the `exit` of forkserver children skip them: the server has run nothing but
/// mp-core since it started, so there is no state of other code in it to fix up.
///
/// # Safety
///
/// The process must be single-threaded, and `thread` must describe its thread.
pub(super) unsafe fn fork_sibling(thread: &MainThread) -> std::io::Result<Option<(u32, OwnedFd)>> {
    let flags = (libc::CLONE_PARENT
        | libc::CLONE_CHILD_SETTID
        | libc::CLONE_CHILD_CLEARTID
        | libc::CLONE_PIDFD) as u64;
    let mut pidfd: libc::c_int = -1;
    let args = CloneArgs {
        flags,
        pidfd: &mut pidfd as *mut libc::c_int as u64,
        child_tid: thread.tid as u64,
        // With CLONE_PARENT, the child's exit signal is the server's own (SIGCHLD); clone3
        // requires 0 here.
        exit_signal: 0,
        ..CloneArgs::default()
    };
    // SAFETY: clone3 reads `args` (64 bytes, the size given); without CLONE_VM the child
    // runs in a copy of this address space, on a copy of this stack, like a forked child,
    // and this process has a single thread (this function's contract), so the copy is
    // complete. The kernel writes the child's tid to `thread.tid`, a field of glibc's
    // descriptor of this thread, in the child's copy only, and the pidfd's number to the
    // local `pidfd`, in the server.
    let mut pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    if pid == -1 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        // clone3 is refused by some seccomp filters (older container runtimes): the classic
        // clone, whose argument order differs between architectures.
        // SAFETY: as above; no new stack (0: the child continues on a copy of this one).
        pid = unsafe { legacy_clone(flags, &mut pidfd, thread.tid) };
    }
    if pid == -1 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: registers the robust list head glibc registered for this thread (read
        // back in `MainThread::current`), which the child has a copy of at the same address.
        unsafe {
            libc::syscall(
                libc::SYS_set_robust_list,
                thread.robust_head,
                thread.robust_len,
            )
        };
        return Ok(None);
    }
    // SAFETY: with CLONE_PIDFD the kernel stored a new descriptor in `pidfd`, owned by
    // nothing else.
    Ok(Some((pid as u32, unsafe { OwnedFd::from_raw_fd(pidfd) })))
}

/// `clone(flags, 0, pidfd, ctid)` in this architecture's argument order (with
/// `CLONE_PIDFD`, the parent-tid argument is where the pidfd is stored): flags, stack, parent
/// tid, then child tid and tls on x86-64, tls and child tid on aarch64. Elsewhere the order
/// is not spelled out here: -1, and the error stays `ENOSYS`.
///
/// # Safety
///
/// As `fork_sibling`.
unsafe fn legacy_clone(
    flags: u64,
    pidfd: *mut libc::c_int,
    ctid: *mut libc::pid_t,
) -> libc::c_long {
    #[cfg(target_arch = "x86_64")]
    let (fourth, fifth) = (ctid as usize, 0usize);
    #[cfg(target_arch = "aarch64")]
    let (fourth, fifth) = (0usize, ctid as usize);
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    // SAFETY: the arguments in this architecture's order (above); no new stack (0); the
    // caller upholds `fork_sibling`'s contract.
    return unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, pidfd, fourth, fifth) };
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = (flags, pidfd, ctid);
        -1
    }
}
