//! Small-packet rate with batched system calls: one sender thread in the client pod sends
//! 64-byte UDP datagrams 64 per `sendmmsg`, one receiver thread in the server pod takes
//! them 64 per `recvmmsg`. iperf3 sends one datagram per system call, which caps a single
//! sender near 150,000 packets/s on this machine kind, below what the datapaths forward;
//! here the sender's system calls cost a 64th, so the figure is the datapath's.
#![allow(unsafe_code)] // sendmmsg/recvmmsg through libc (nix's wrappers allocate per call)

use crate::netns::Netns;
use crate::{fail, Result};
use std::net::{SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_dataplane::io::netns::run_in;

const PAYLOAD: usize = 64;
const PER_CALL: usize = 64;
/// The port the receiver listens on.
pub const FLOOD_PORT: u16 = 5299;

/// Packets per second received at `to` (in `server`) while `client` floods it for
/// `seconds` (the first half second is not counted: queues fill, workers wake).
pub fn udp_flood_pps(
    client: &Netns,
    server: &Netns,
    to: SocketAddrV4,
    seconds: u64,
) -> Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let listening = Arc::new(AtomicBool::new(false));
    let receiver = std::thread::spawn({
        let (stop, received, listening) = (stop.clone(), received.clone(), listening.clone());
        let path = server.path();
        move || {
            run_in(&path, || {
                let socket = UdpSocket::bind(SocketAddrV4::new(
                    std::net::Ipv4Addr::UNSPECIFIED,
                    to.port(),
                ))?;
                socket.set_read_timeout(Some(Duration::from_millis(50)))?;
                set_receive_buffer(&socket, 8 << 20);
                listening.store(true, Ordering::Release);
                let mut bufs = vec![[0u8; 256]; PER_CALL];
                let mut iovs: Vec<libc::iovec> = bufs
                    .iter_mut()
                    .map(|b| libc::iovec {
                        iov_base: b.as_mut_ptr().cast(),
                        iov_len: b.len(),
                    })
                    .collect();
                let mut hdrs = headers(&mut iovs);
                while !stop.load(Ordering::Relaxed) {
                    let n = recv_many(&socket, &mut hdrs);
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
                Ok(())
            })
        }
    });
    let deadline = Instant::now() + Duration::from_secs(2);
    while !listening.load(Ordering::Acquire) {
        if Instant::now() > deadline || receiver.is_finished() {
            stop.store(true, Ordering::Relaxed);
            let why = receiver
                .join()
                .map_err(|_| fail!("the flood receiver panicked"))?;
            return Err(fail!("the flood receiver did not start: {why:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sender = std::thread::spawn({
        let stop = stop.clone();
        let path = client.path();
        move || {
            run_in(&path, || {
                let socket = UdpSocket::bind("0.0.0.0:0")?;
                socket.connect(to)?;
                let payload = [0x5au8; PAYLOAD];
                let mut iovs = [libc::iovec {
                    iov_base: payload.as_ptr() as *mut libc::c_void,
                    iov_len: PAYLOAD,
                }; PER_CALL];
                let mut hdrs = headers(&mut iovs);
                while !stop.load(Ordering::Relaxed) {
                    send_many(&socket, &mut hdrs);
                }
                Ok(())
            })
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let start = (Instant::now(), received.load(Ordering::Relaxed));
    std::thread::sleep(Duration::from_secs(seconds.max(1)));
    let end = (Instant::now(), received.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    let sent = sender
        .join()
        .map_err(|_| fail!("the flood sender panicked"))?;
    let got = receiver
        .join()
        .map_err(|_| fail!("the flood receiver panicked"))?;
    sent.and(got).map_err(|e| fail!("flood: {e}"))?;
    let packets = end.1 - start.1;
    if packets == 0 {
        return Err(fail!("the flood to {to} received nothing"));
    }
    Ok(packets as f64 / (end.0 - start.0).as_secs_f64())
}

/// Asks for a receive buffer of `bytes` (beyond `rmem_max`: root may); best effort.
fn set_receive_buffer(socket: &UdpSocket, bytes: libc::c_int) {
    // SAFETY: the option reads one int from the pointer, valid for the call.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// One message header per iovec in `iovs` (which must outlive them).
fn headers(iovs: &mut [libc::iovec]) -> Vec<libc::mmsghdr> {
    iovs.iter_mut()
        .map(|iov| {
            // SAFETY: an all-zero `mmsghdr` is valid (null pointers, zero lengths).
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect()
}

/// One `sendmmsg` of `hdrs` (each pointing at the payload) on the connected `socket`.
fn send_many(socket: &UdpSocket, hdrs: &mut [libc::mmsghdr]) {
    // SAFETY: every header points at an iovec over the payload; all outlive the call, and
    // sendmmsg only reads them.
    unsafe { libc::sendmmsg(socket.as_raw_fd(), hdrs.as_mut_ptr(), hdrs.len() as u32, 0) };
}

/// One `recvmmsg` into `hdrs` (waiting up to the socket's timeout for the first);
/// returns how many datagrams arrived.
fn recv_many(socket: &UdpSocket, hdrs: &mut [libc::mmsghdr]) -> usize {
    // SAFETY: each header points at its own iovec over its own buffer; all outlive the
    // call. MSG_WAITFORONE: return once something arrived.
    let n = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            hdrs.as_mut_ptr(),
            hdrs.len() as u32,
            libc::MSG_WAITFORONE,
            std::ptr::null_mut(),
        )
    };
    n.max(0) as usize
}
