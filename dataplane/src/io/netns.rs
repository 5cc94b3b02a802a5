//! Running code inside another network namespace.
//!
//! `setns(CLONE_NEWNET)` changes the namespace of the calling thread only, so the work runs
//! on a short-lived scoped thread: the rest of the process, workers included, stays in the
//! node's namespace. File descriptors opened there (a TAP's `/dev/net/tun`, a netlink
//! socket) keep pointing into the pod's namespace after the thread ends.
#![allow(unsafe_code)] // setns(2) on the calling thread

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Runs `work` on a thread that entered the network namespace at `path`
/// (`/run/netns/NAME`, `/proc/PID/ns/net`).
pub fn run_in<T: Send>(path: &Path, work: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let ns = File::open(path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: `ns` is an open file descriptor owned by this closure; setns only
                // reads it and changes the calling thread's namespace.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    let err = io::Error::last_os_error();
                    return Err(if err.raw_os_error() == Some(libc::EINVAL) {
                        io::Error::new(io::ErrorKind::InvalidInput, "not a network namespace file")
                    } else {
                        err
                    });
                }
                drop(ns);
                work()
            })
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("namespace worker thread panicked")))
    })
}

/// The index of interface `name` in the calling thread's namespace.
pub fn link_index(name: &str) -> Option<u32> {
    let cname = std::ffi::CString::new(name).ok()?;
    // SAFETY: `cname` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    (index != 0).then_some(index)
}
