//! Sending arbitrary frames out of a pod's interface with an AF_PACKET socket, for
//! robustness tests (random, truncated and forged frames).
#![allow(unsafe_code)] // AF_PACKET sockets bound to an interface index

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

const PACKET_VNET_HDR: libc::c_int = 15;
/// Bytes of the virtio-net header a packet socket with `PACKET_VNET_HDR` puts before each
/// frame.
pub const CAPTURE_VNET_LEN: usize = 10;

/// Captures every frame `ifname` in the namespace at `netns` sends or receives for
/// `duration`, each with the 10-byte virtio-net header the kernel attaches
/// (`PACKET_VNET_HDR`), so that a GSO super-packet comes with its segment size.
pub fn capture(
    netns: &Path,
    ifname: &str,
    duration: std::time::Duration,
) -> io::Result<Vec<Vec<u8>>> {
    let ifname = ifname.to_string();
    run_in(netns, move || {
        let index = link_index(&ifname).ok_or_else(|| io::Error::other("no such interface"))?;
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) with constant arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::c_int::from(all),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just returned by socket(2) and nobody else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: the option values are live and of the sizes given.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_VNET_HDR,
                (&one as *const libc::c_int).cast(),
                4,
            ) | libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = all;
        addr.sll_ifindex = index as i32;
        // SAFETY: addr is a valid sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let deadline = std::time::Instant::now() + duration;
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while std::time::Instant::now() < deadline {
            // SAFETY: buf is writable for its length.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 {
                frames.push(buf[..n as usize].to_vec());
            }
        }
        Ok(frames)
    })
}
