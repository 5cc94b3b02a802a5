//! Sending arbitrary frames out of a pod's interface with an AF_PACKET socket, for
//! robustness tests (random, truncated and forged frames).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use switchyard_dataplane::io::netns::{link_index, run_in};

/// Sends each frame (a whole Ethernet frame) out of `ifname` in the namespace at `netns`;
/// returns how many the kernel accepted.
pub fn send_frames(netns: &Path, ifname: &str, frames: Vec<Vec<u8>>) -> io::Result<usize> {
    let ifname = ifname.to_string();
    run_in(netns, move || {
        let index = link_index(&ifname).ok_or_else(|| io::Error::other("no such interface"))?;
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by socket(2) and nobody else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = index as i32;
        let mut sent = 0;
        for frame in frames {
            // SAFETY: frame and addr are valid for the lengths given.
            let rc = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if rc >= 0 {
                sent += 1;
            }
        }
        Ok(sent)
    })
}
