//! AF_XDP pod ports: a veth pair per pod, its pod end (`eth0`) configured inside the pod's
//! namespace as a TAP port would be, its node end (`syx…`) carrying a minimal XDP program
//! that hands every frame to the AF_XDP socket of its receive queue
//! ([`super::xdp::XdpRedirect`]), one socket per worker ([`super::xsk::XskSocket`]).
//! Frames move through shared rings with one system call per batch instead of one per
//! frame; on veth the kernel copies them into and out of the rings (copy mode).
//!
//! The pod end sends with its checksums complete (its transmit checksum offload is
//! switched off: an AF_XDP frame carries no "checksum still partial" mark) and without
//! TSO (the kernel takes TSO off a veth whose peer runs XDP), so bulk TCP moves in
//! MTU-sized frames here, where a TAP moves 64 KiB super-frames. Frames the dataplane sends
//! to the pod have their partial checksum finished and TCP super-frames segmented first.
//!
//! The program is attached through a BPF link held by the port: removing the port, or the
//! process ending in any way, detaches it. The veth pair outlives the process, with the
//! pod's addresses and routes, and a restarted dataplane re-attaches to it
//! ([`AfXdpPort::attach`]); deleting the port deletes the pair.
#![allow(unsafe_code)] // the ethtool ioctl on the pod's end

use super::interface::{configure, PodInterface};
use super::netlink::Netlink;
use super::netns;
use super::xdp::{Filter, XdpRedirect};
use super::xsk::{frame_size_for, XskSocket, POD_RX_RING};
use crate::buffer::PacketBuf;
use crate::offload::segment::{self, Segments};
use crate::wire::{vnet, VnetHeader};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// The largest MTU an AF_XDP pod port takes: a frame must fit one page behind the XDP
/// headroom on veth (and one UMEM frame).
pub const MAX_MTU: u32 = 3_506;

/// The name of the node's end of the veth pair of interface `ifname` in the namespace at
/// `netns`: `syx` and 11 hex digits of a hash of both, stable across restarts.
pub fn host_name(netns: &str, ifname: &str) -> String {
    // FNV-1a, 64 bits.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in netns.bytes().chain([0]).chain(ifname.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("syx{:011x}", hash >> 20)
}

/// A pod's veth pair with the AF_XDP sockets on its node end.
pub struct AfXdpPort {
    /// One socket per queue; each worker takes only its own.
    sockets: Vec<Mutex<XskSocket>>,
    fds: Vec<RawFd>,
    host: String,
    host_index: u32,
    // Dropped after the sockets: the program then finds no socket and detaches.
    _redirect: XdpRedirect,
}

impl AfXdpPort {
    /// Creates the veth pair of the pod interface `config` in the namespace at `netns_path`
    /// (`netns` as the port is recorded), configures the pod's end and binds `queues`
    /// sockets to the node's end; returns the port and the pod end's interface index. On
    /// any failure the pair is deleted again.
    pub fn create(
        netns_path: &Path,
        netns: &str,
        config: &PodInterface,
        queues: usize,
    ) -> io::Result<(Self, u32)> {
        if config.mtu > MAX_MTU {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "MTU {} is above {MAX_MTU}, the largest an AF_XDP port takes on veth; use a TAP port (podPorts \"tap\") or a smaller MTU",
                    config.mtu
                ),
            ));
        }
        let queues = queues.max(1);
        let host = host_name(netns, &config.ifname);
        let ns = File::open(netns_path)?;
        let pod_index = netns::run_in(netns_path, || Ok(netns::link_index(&config.ifname)))?;
        if pod_index.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "an interface named {} already exists in the namespace",
                    config.ifname
                ),
            ));
        }
        if netns::link_index(&host).is_some() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("the node already has an interface {host} for this pod interface"),
            ));
        }
        let mut nl = Netlink::open()?;
        nl.add_veth(
            &host,
            &config.ifname,
            ns.as_fd(),
            config.mac,
            config.mtu,
            queues as u32,
        )?;
        let made = (|| {
            let host_index = netns::link_index(&host)
                .ok_or_else(|| io::Error::other("the new veth vanished"))?;
            let pod_index = netns::run_in(netns_path, || {
                let index = netns::link_index(&config.ifname)
                    .ok_or_else(|| io::Error::other("the pod's end of the veth vanished"))?;
                disable_tx_checksum(&config.ifname)?;
                configure(index, config)?;
                Ok(index)
            })?;
            let frames = frame_size_for(config.mtu);
            Ok((
                Self::bind(host.clone(), host_index, queues, frames)?,
                pod_index,
            ))
        })();
        if made.is_err() {
            if let Some(index) = netns::link_index(&host) {
                let _ = nl.delete_link(index);
            }
        }
        made
    }

    /// Re-attaches to the veth pair of `ifname` in the namespace at `netns_path` (`netns`
    /// as recorded) that an earlier process created; returns the port and the pod end's
    /// interface index.
    pub fn attach(
        netns_path: &Path,
        netns: &str,
        ifname: &str,
        queues: usize,
    ) -> io::Result<(Self, u32)> {
        let host = host_name(netns, ifname);
        let pod_index = netns::run_in(netns_path, || {
            netns::link_index(ifname).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no interface {ifname} to re-attach"),
                )
            })
        })?;
        let host_index = netns::link_index(&host).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("the node has no interface {host} for {ifname}"),
            )
        })?;
        // The pair's MTU, as created, sizes the UMEM frames.
        let frames = frame_size_for(super::links::mtu(&host)?);
        Ok((
            Self::bind(host, host_index, queues.max(1), frames)?,
            pod_index,
        ))
    }

    /// Brings the node's end up, attaches the program and binds one socket per queue, with
    /// UMEM frames of `frame_size` bytes.
    fn bind(host: String, host_index: u32, queues: usize, frame_size: usize) -> io::Result<Self> {
        // The node's end carries no address: it must not forward nor take part in IPv6
        // (what no socket takes would otherwise reach the node's stack). Best effort.
        let _ = super::links::set_sysctl(&format!("net.ipv4.conf.{host}.forwarding"), "0");
        let _ = super::links::set_sysctl(&format!("net.ipv6.conf.{host}.disable_ipv6"), "1");
        Netlink::open()?.set_link(host_index, None, None)?;
        let redirect = XdpRedirect::attach(host_index, queues as u32, Filter::All, None)?;
        let mut sockets = Vec::with_capacity(queues);
        let mut fds = Vec::with_capacity(queues);
        for queue in 0..queues as u32 {
            let socket = XskSocket::bind(host_index, queue, frame_size, POD_RX_RING)?;
            redirect.insert_socket(queue, socket.raw_fd())?;
            fds.push(socket.raw_fd());
            sockets.push(Mutex::new(socket));
        }
        Ok(Self {
            sockets,
            fds,
            host,
            host_index,
            _redirect: redirect,
        })
    }

    /// Deletes the veth pair (the pod's interface goes with it).
    pub fn delete(&self) -> io::Result<()> {
        match Netlink::open()?.delete_link(self.host_index) {
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Ok(()),
            other => other,
        }
    }

    /// The node end's name.
    pub fn host_ifname(&self) -> &str {
        &self.host
    }

    /// Number of queues (sockets).
    pub fn queues(&self) -> usize {
        self.sockets.len()
    }

    /// The socket of queue `queue` (modulo the number of queues), to poll.
    pub fn raw_fd(&self, queue: usize) -> RawFd {
        self.fds[queue % self.fds.len()]
    }

    fn socket(&self, queue: usize) -> MutexGuard<'_, XskSocket> {
        // Only the worker of this queue locks it: never contended, and a panic while
        // holding it leaves the rings consistent (each step is one index store).
        self.sockets[queue % self.sockets.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn recv_batch(&self, queue: usize, bufs: &mut [PacketBuf]) -> io::Result<usize> {
        let mut socket = self.socket(queue);
        let mut n = 0;
        while n < bufs.len() {
            let space = bufs[n].receive_space();
            let (header, frame) = space.split_at_mut(vnet::HEADER_LEN);
            let Some(len) = socket.recv(frame) else { break };
            header.fill(0);
            bufs[n].set_len(vnet::HEADER_LEN + len);
            n += 1;
        }
        Ok(n)
    }

    /// Posts `frame` (virtio-net header then Ethernet, as the pipeline left it) on queue
    /// `queue`'s ring, its partial checksum finished, a TCP or UDP super-frame segmented into
    /// `scratch` first; it leaves at the next [`AfXdpPort::flush`].
    pub fn post(&self, queue: usize, frame: &mut [u8], scratch: &mut [u8]) -> io::Result<()> {
        let vh = VnetHeader::new_checked(&*frame).map_err(|_| invalid("truncated frame"))?;
        let mut socket = self.socket(queue);
        match vh.gso_type() {
            _ if !vh.is_gso() => {
                if !vnet::finish_checksum(frame) {
                    return Err(invalid("checksum offsets outside the frame"));
                }
                socket.post(&frame[vnet::HEADER_LEN..])
            }
            vnet::GSO_TCPV4 | vnet::GSO_TCPV6 | vnet::GSO_UDP_L4 => {
                let Segments { stride, total, .. } = segment::super_frame(frame, 0, scratch)
                    .map_err(|e| invalid(&format!("cannot segment: {e:?}")))?;
                scratch[..total]
                    .chunks(stride)
                    .try_for_each(|seg| socket.post(seg))
            }
            _ => Err(invalid("a super-frame of an unknown GSO type")),
        }
    }

    /// Sends what was posted on queue `queue`.
    pub fn flush(&self, queue: usize) -> io::Result<()> {
        self.socket(queue).flush()
    }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message.to_string())
}

/// Switches off transmit checksum offload on `ifname` in the caller's namespace
/// (`ethtool -K IFNAME tx off`).
fn disable_tx_checksum(ifname: &str) -> io::Result<()> {
    const ETHTOOL_STXCSUM: u32 = 0x17;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    #[repr(C)]
    struct IfReqData {
        name: [u8; libc::IFNAMSIZ],
        data: *mut libc::c_void,
        _pad: [u8; 16],
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_STXCSUM,
        data: 0,
    };
    let mut req = IfReqData {
        name: [0; libc::IFNAMSIZ],
        data: (&mut value as *mut EthtoolValue).cast(),
        _pad: [0; 16],
    };
    let name = ifname.as_bytes();
    if name.len() >= libc::IFNAMSIZ {
        return Err(invalid("interface name too long"));
    }
    req.name[..name.len()].copy_from_slice(name);
    // SAFETY: socket(2) with constant arguments.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` was just returned by socket(2) and nobody else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `req` is a `struct ifreq` whose data pointer points at `value`; both live
    // across the call.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCETHTOOL, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_end_names_are_stable_distinct_and_fit_an_interface_name() {
        let a = host_name("/var/run/netns/cni-1234", "eth0");
        assert_eq!(a, host_name("/var/run/netns/cni-1234", "eth0"));
        assert_ne!(a, host_name("/var/run/netns/cni-1234", "eth1"));
        assert_ne!(a, host_name("/var/run/netns/cni-1235", "eth0"));
        assert!(a.starts_with("syx") && a.len() == 14, "{a}");
        assert!(a.len() < libc::IFNAMSIZ);
    }
}
