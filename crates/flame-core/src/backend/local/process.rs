//! What the local backend asks the system about a process it did not
//! necessarily start (a runner of a dead parent): its environment, to tell
//! a runner from a process that reused its pid, and whether it still runs.
//!
//! Linux reads `/proc`; macOS asks `sysctl` for `KERN_PROCARGS2` (the
//! arguments and environment, as `ps -E` shows them). The Linux path is the
//! one the tests run; the macOS path is type-checked in CI.

use std::io;

/// The environment of `pid` as NUL-separated `NAME=value` entries
/// (possibly with other NUL-separated strings around them: callers look
/// for one whole entry).
#[cfg(target_os = "linux")]
pub(super) fn environment(pid: u32) -> io::Result<Vec<u8>> {
    std::fs::read(format!("/proc/{pid}/environ"))
}

/// The environment of `pid` as NUL-separated `NAME=value` entries, after
/// its argument count, executable path and arguments.
#[cfg(target_os = "macos")]
pub(super) fn environment(pid: u32) -> io::Result<Vec<u8>> {
    use std::os::raw::{c_int, c_void};
    let mut argmax: c_int = 0;
    let mut len = std::mem::size_of::<c_int>();
    let mut mib = [libc::CTL_KERN, libc::KERN_ARGMAX];
    // SAFETY: sysctl writes at most `len` bytes into `argmax`, an int.
    let got = unsafe {
        libc::sysctl(
            mib.as_mut_ptr(),
            2,
            &mut argmax as *mut c_int as *mut c_void,
            &mut len,
            std::ptr::null_mut(),
            0,
        )
    };
    if got != 0 || argmax <= 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; argmax as usize];
    let mut size = buf.len();
    let mut mib = [libc::CTL_KERN, libc::KERN_PROCARGS2, pid as c_int];
    // SAFETY: sysctl writes at most `size` bytes into `buf` and sets `size`
    // to what it wrote.
    let got = unsafe {
        libc::sysctl(
            mib.as_mut_ptr(),
            3,
            buf.as_mut_ptr() as *mut c_void,
            &mut size,
            std::ptr::null_mut(),
            0,
        )
    };
    if got != 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(size);
    Ok(buf)
}

/// Elsewhere a process's environment cannot be read, so the local backend
/// never kills a process it cannot tell is a runner.
#[cfg(not(any(target_os = "linux", target_os = "macos")))]
pub(super) fn environment(_pid: u32) -> io::Result<Vec<u8>> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "reading another process's environment is implemented on Linux and macOS only",
    ))
}

/// Whether `pid` still runs: not gone, and on Linux not a zombie either.
#[cfg(target_os = "linux")]
pub(super) fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // Field 3, after the command in parentheses, is the state.
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|s| s.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Whether `pid` still exists (a zombie counts until it is reaped, which
/// its parent, or launchd for an orphan, does at once).
#[cfg(not(target_os = "linux"))]
pub(super) fn running(pid: u32) -> bool {
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    let alive = unsafe { libc::kill(pid as libc::pid_t, 0) } == 0;
    alive || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}
