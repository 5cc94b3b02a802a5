//! The uplink: where pod traffic for other nodes leaves this node and where theirs arrives,
//! through the node's own kernel sockets (docs/multinode.md, option A).
//!
//! * **VXLAN**: UDP sockets. Receive: one socket per worker bound to the node's address
//!   and the VXLAN port with `SO_REUSEPORT`, so the kernel spreads peers' flows over the
//!   workers; `recvmmsg` fills a batch. Send: a pool of sockets bound to the node's address
//!   on distinct ephemeral ports; the inner flow's hash picks one, so the outer UDP source
//!   port follows the inner flow (RFC 7348) and the underlay can spread flows. A TCP
//!   super-frame is cut into segments in user space (`pipeline::segment`) and sent with one
//!   `sendmsg` and `UDP_SEGMENT`: the kernel builds and checksums the outer headers.
//! * **IP-in-IP**: a raw socket per inner family (protocol 4 for IPv4, 41 for IPv6), read
//!   by worker 0 (a raw socket gets every packet of its protocol).
//!
//! Frames read from the uplink are decapsulated in place into the layout every port
//! delivers (virtio-net header, Ethernet from the uplink's MAC to the gateway's), so the
//! pipeline routes them like any other. A datagram from an address that is not a peer, with
//! another VNI, or malformed is dropped here and counted on the port.

use crate::buffer::{PacketBuf, BATCH};
use crate::pipeline::coalesce::{tcp_absorb, tcp_finish, tcp_follows, tcp_segment};
use crate::pipeline::segment;
use crate::wire::{ethernet, vnet, VnetHeader};
use arc_swap::ArcSwap;
use std::io;
use std::mem::{size_of, size_of_val, zeroed};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use switchyard_api::MacAddr;

const SOL_UDP: libc::c_int = 17;
const UDP_SEGMENT: libc::c_int = 103;
const UDP_GRO: libc::c_int = 104;
const VXLAN_HEADER_LEN: usize = 8;
/// The largest UDP payload in one IPv4 datagram (65,535 - 20 - 8).
const MAX_UDP_PAYLOAD: usize = 65_507;
const VXLAN_FLAG_VNI: u8 = 0x08;
/// Sockets in the VXLAN send pool (distinct outer source ports).
const TX_POOL: usize = 16;
/// Where a received datagram's payload starts in the buffer: for VXLAN the inner Ethernet
/// header lands right after the virtio-net header.
const VXLAN_RX_AT: usize = vnet::HEADER_LEN - VXLAN_HEADER_LEN;
/// For IP-in-IP the inner IP header lands after virtio-net + Ethernet when the outer header
/// has no options (20 bytes).
const IPIP_RX_AT: usize = vnet::HEADER_LEN + ethernet::HEADER_LEN - 20;

/// The encapsulation an uplink speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encap {
    /// VXLAN with this VNI, to this UDP port.
    Vxlan {
        /// VXLAN network identifier.
        vni: u32,
        /// Destination UDP port.
        port: u16,
    },
    /// IP-in-IP with this IP protocol number (4: IPv4 inner, 41: IPv6 inner).
    Ipip {
        /// Outer IP protocol.
        protocol: u8,
    },
}

/// An uplink port's sockets.
pub struct Uplink {
    encap: Encap,
    /// Receive sockets, one per worker queue (IP-in-IP: one, read by worker 0).
    rx: Vec<OwnedFd>,
    /// Send sockets; the inner flow hash picks one.
    tx: Vec<OwnedFd>,
    /// Underlay addresses accepted as senders.
    peers: ArcSwap<Vec<Ipv4Addr>>,
    /// Source MAC written on decapsulated frames (the uplink port's own).
    mac: MacAddr,
    /// Destination MAC written on decapsulated frames (the gateway's).
    gateway: MacAddr,
    /// Whether the kernel accepted `UDP_SEGMENT` so far.
    gso: AtomicBool,
    /// Datagrams dropped on receive (not a peer, wrong VNI, malformed).
    pub rx_rejected: AtomicU64,
}

impl Uplink {
    /// Opens the sockets for `encap` on the node's underlay address `local`, with `queues`
    /// receive queues (VXLAN). Frames delivered get `mac` as source and `gateway` as
    /// destination.
    pub fn open(
        encap: Encap,
        local: Ipv4Addr,
        queues: usize,
        mac: MacAddr,
        gateway: MacAddr,
    ) -> io::Result<Self> {
        let (rx, tx) = match encap {
            Encap::Vxlan { port, .. } => {
                let rx = (0..queues.max(1))
                    .map(|_| udp_socket(SocketAddrV4::new(local, port), true))
                    .collect::<io::Result<Vec<_>>>()?;
                let tx = (0..TX_POOL)
                    .map(|_| udp_socket(SocketAddrV4::new(local, 0), false))
                    .collect::<io::Result<Vec<_>>>()?;
                (rx, tx)
            }
            Encap::Ipip { protocol } => {
                let raw = raw_socket(local, protocol)?;
                let tx = vec![raw.try_clone()?];
                (vec![raw], tx)
            }
        };
        Ok(Self {
            encap,
            rx,
            tx,
            peers: ArcSwap::from_pointee(Vec::new()),
            mac,
            gateway,
            gso: AtomicBool::new(true),
            rx_rejected: AtomicU64::new(0),
        })
    }

    /// An uplink without sockets, for tests and fuzzing of the receive path
    /// ([`Uplink::deliver`]); it accepts every sender.
    pub fn detached(encap: Encap, mac: MacAddr, gateway: MacAddr) -> Self {
        Self {
            encap,
            rx: Vec::new(),
            tx: Vec::new(),
            peers: ArcSwap::from_pointee(Vec::new()),
            mac,
            gateway,
            gso: AtomicBool::new(true),
            rx_rejected: AtomicU64::new(0),
        }
    }

    /// Turns `data` into frames in `bufs` as a receive does: for VXLAN, datagrams of
    /// `segment` bytes back to back, as one `UDP_GRO` read returns them; for IP-in-IP, one
    /// packet with its outer header. Returns how many frames. The sender check is the
    /// caller's. For tests and fuzzing.
    pub fn deliver(&self, data: &[u8], segment: usize, bufs: &mut [PacketBuf]) -> usize {
        let Some(first) = bufs.first_mut() else {
            return 0;
        };
        let at = match self.encap {
            Encap::Vxlan { .. } => VXLAN_RX_AT,
            Encap::Ipip { .. } => IPIP_RX_AT,
        };
        let space = &mut first.receive_space()[at..];
        let len = data.len().min(space.len());
        space[..len].copy_from_slice(&data[..len]);
        match self.encap {
            Encap::Vxlan { .. } if len > 0 => self.split_runs(bufs, len, segment.clamp(1, len)),
            Encap::Vxlan { .. } => 0,
            Encap::Ipip { .. } => usize::from(self.decapsulate(first, at, len)),
        }
    }

    /// The encapsulation.
    pub fn encap(&self) -> Encap {
        self.encap
    }

    /// Replaces the set of underlay addresses accepted as senders.
    pub fn set_peers(&self, peers: Vec<Ipv4Addr>) {
        self.peers.store(Arc::new(peers));
    }

    /// Number of receive queues.
    pub fn queues(&self) -> usize {
        self.rx.len()
    }

    /// The receive socket of worker `queue`, if that worker reads this uplink.
    pub fn raw_fd(&self, queue: usize) -> Option<RawFd> {
        self.rx.get(queue).map(AsRawFd::as_raw_fd)
    }

    /// Reads and decapsulates datagrams into `bufs`; returns how many frames are ready.
    pub(super) fn recv_batch(&self, queue: usize, bufs: &mut [PacketBuf]) -> io::Result<usize> {
        let Some(fd) = self.raw_fd(queue) else {
            return Ok(0);
        };
        let want = bufs.len().min(BATCH);
        if let Encap::Vxlan { .. } = self.encap {
            return self.recv_gro(fd, &mut bufs[..want]);
        }
        let at = match self.encap {
            Encap::Vxlan { .. } => VXLAN_RX_AT,
            Encap::Ipip { .. } => IPIP_RX_AT,
        };
        // SAFETY: all-zero is a valid value for these plain C structs.
        let mut addrs: [libc::sockaddr_in; BATCH] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut iovs: [libc::iovec; BATCH] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut hdrs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
        for i in 0..want {
            let space = &mut bufs[i].receive_space()[at..];
            iovs[i] = libc::iovec {
                iov_base: space.as_mut_ptr().cast(),
                iov_len: space.len(),
            };
            hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
            hdrs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in).cast();
            hdrs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
        }
        // SAFETY: `hdrs[..want]` point at live iovecs over the buffers' free space and at
        // live address slots, all of which outlive the call.
        let got = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                want as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::WouldBlock {
                Ok(0)
            } else {
                Err(err)
            };
        }
        let peers = self.peers.load();
        let mut kept = 0;
        for i in 0..got as usize {
            let from = Ipv4Addr::from(u32::from_be(addrs[i].sin_addr.s_addr));
            let len = hdrs[i].msg_len as usize;
            let ok = peers.contains(&from) && self.decapsulate(&mut bufs[i], at, len);
            if ok {
                bufs.swap(kept, i);
                kept += 1;
            } else {
                self.rx_rejected.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(kept)
    }

    /// VXLAN receive with `UDP_GRO`: one `recvmsg` may return many datagrams of one size
    /// back to back (the kernel did not cut the sender's UDP GSO super-packet, or merged
    /// a run). Consecutive TCP segments of one inner flow are merged in place into one
    /// super-frame ([`Self::merge_run`]); anything else continues in the next buffer.
    fn recv_gro(&self, fd: RawFd, bufs: &mut [PacketBuf]) -> io::Result<usize> {
        let mut n = 0;
        while n < bufs.len() {
            let space = &mut bufs[n].receive_space()[VXLAN_RX_AT..];
            let (len, from, segment) = match recv_one(fd, space) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if n == 0 => return Err(e),
                Err(_) => break,
            };
            if !self.peers.load().contains(&from) {
                self.rx_rejected.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let segment = if segment == 0 { len } else { segment };
            n += self.split_runs(&mut bufs[n..], len, segment);
        }
        Ok(n)
    }

    /// `bufs[0]` holds `len` bytes of datagrams of `segment` bytes (the last may be
    /// shorter) at [`VXLAN_RX_AT`]; turns them into frames in `bufs[0..]`, returns how
    /// many. When the buffers run out, what is left is dropped and counted.
    fn split_runs(&self, bufs: &mut [PacketBuf], mut len: usize, segment: usize) -> usize {
        let mut made = 0;
        while len > 0 {
            let (this, rest) = bufs.split_at_mut(made + 1);
            let space = this[made].receive_space();
            let (used, frame_len) = self.merge_run(space, len, segment);
            len -= used;
            let src_at = VXLAN_RX_AT + used;
            if frame_len == 0 {
                // The first datagram was not ours: the rest starts over in this buffer.
                space.copy_within(src_at..src_at + len, VXLAN_RX_AT);
                continue;
            }
            if len > 0 {
                // The rest starts a new frame in the next buffer, if there is one.
                match rest.first_mut() {
                    Some(next) => next.receive_space()[VXLAN_RX_AT..VXLAN_RX_AT + len]
                        .copy_from_slice(&space[src_at..src_at + len]),
                    None => {
                        self.rx_rejected
                            .fetch_add(len.div_ceil(segment) as u64, Ordering::Relaxed);
                        len = 0;
                    }
                }
            }
            this[made].set_len(frame_len);
            made += 1;
        }
        made
    }

    /// Decapsulates the first datagram in `space` (at [`VXLAN_RX_AT`]) into a frame and
    /// merges the TCP segments that continue it; returns the datagram bytes consumed and
    /// the frame's length (0 when the first datagram was not ours: dropped and counted).
    fn merge_run(&self, space: &mut [u8], len: usize, segment: usize) -> (usize, usize) {
        let first_len = segment.min(len);
        let Some(frame_len) = self.decapsulate_in(space, VXLAN_RX_AT, first_len) else {
            self.rx_rejected.fetch_add(1, Ordering::Relaxed);
            return (first_len, 0);
        };
        let l3_at = vnet::HEADER_LEN + ethernet::HEADER_LEN;
        let Some(first) = tcp_segment(&space[l3_at..frame_len], true) else {
            return (first_len, frame_len);
        };
        let (mut used, mut end, mut merged) = (first_len, frame_len, first.payload_len());
        while used < len {
            let at = VXLAN_RX_AT + used;
            let dlen = segment.min(len - used);
            let inner = at + VXLAN_HEADER_LEN + ethernet::HEADER_LEN;
            if dlen < VXLAN_HEADER_LEN + ethernet::HEADER_LEN + 20
                || !self.vxlan_ok(&space[at..at + VXLAN_HEADER_LEN])
                || space[at + 20..at + 22] != space[vnet::HEADER_LEN + 12..l3_at]
            {
                break;
            }
            let (head, tail) = space.split_at_mut(inner);
            let next_l3 = &tail[..dlen - VXLAN_HEADER_LEN - ethernet::HEADER_LEN];
            let Some(next) = tcp_segment(next_l3, true) else {
                break;
            };
            if end + next.payload_len() > crate::buffer::MAX_FRAME
                || merged + next.payload_len() + first.payload_offset() > 65_535
                || !tcp_follows(&head[l3_at..], &first, merged, next_l3, &next)
            {
                break;
            }
            tcp_absorb(&mut head[l3_at..], &first, next_l3);
            let payload = inner + next.payload_offset();
            space.copy_within(payload..payload + next.payload_len(), end);
            end += next.payload_len();
            merged += next.payload_len();
            used += dlen;
            let short = next.payload_len() < first.payload_len();
            if short {
                break;
            }
        }
        if merged > first.payload_len() {
            tcp_finish(&mut space[..end], &first, merged);
        }
        (used, end)
    }

    fn vxlan_ok(&self, h: &[u8]) -> bool {
        match self.encap {
            Encap::Vxlan { vni, .. } => {
                h[0] & VXLAN_FLAG_VNI != 0 && u32::from_be_bytes([0, h[4], h[5], h[6]]) == vni
            }
            Encap::Ipip { .. } => false,
        }
    }

    /// Turns a datagram read at offset `at` into a frame; false when it is not ours.
    fn decapsulate(&self, buf: &mut PacketBuf, at: usize, len: usize) -> bool {
        match self.decapsulate_in(buf.receive_space(), at, len) {
            Some(frame_len) => {
                buf.set_len(frame_len);
                true
            }
            None => false,
        }
    }

    /// Decapsulates the datagram of `len` bytes at `at` in `space` in place; returns the
    /// frame's length (virtio-net header and Ethernet included).
    fn decapsulate_in(&self, space: &mut [u8], at: usize, len: usize) -> Option<usize> {
        let frame_len = match self.encap {
            Encap::Vxlan { .. } => {
                let h = space.get(at..at + VXLAN_HEADER_LEN + ethernet::HEADER_LEN)?;
                if len < VXLAN_HEADER_LEN + ethernet::HEADER_LEN + 20 || !self.vxlan_ok(h) {
                    return None;
                }
                at + len
            }
            Encap::Ipip { protocol } => {
                let outer = usize::from(space[at] & 0x0f) * 4;
                if len < outer + 20 || outer < 20 || space[at + 9] != protocol {
                    return None;
                }
                if outer > 20 {
                    space.copy_within(at + outer..at + len, at + 20);
                }
                at + len - (outer - 20)
            }
        };
        let l3 = vnet::HEADER_LEN + ethernet::HEADER_LEN;
        let ethertype: [u8; 2] = match space[l3] >> 4 {
            4 => [0x08, 0x00],
            6 => [0x86, 0xdd],
            _ => return None,
        };
        space[..vnet::HEADER_LEN].fill(0);
        if matches!(self.encap, Encap::Vxlan { .. }) {
            // The kernel verified the outer UDP checksum, which covers the inner packet.
            space[0] = vnet::F_DATA_VALID;
        }
        let eth = &mut space[vnet::HEADER_LEN..l3];
        eth[0..6].copy_from_slice(&self.gateway.0);
        eth[6..12].copy_from_slice(&self.mac.0);
        eth[12..14].copy_from_slice(&ethertype);
        Some(frame_len)
    }

    /// Encapsulates `frame` (virtio-net header then Ethernet, as the pipeline left it) and
    /// sends it to the node at `peer`. A TCP super-frame is segmented first, into
    /// `scratch` (see [`segment::SCRATCH_LEN`]).
    pub fn send_to(&self, frame: &mut [u8], peer: Ipv4Addr, scratch: &mut [u8]) -> io::Result<()> {
        let gso_type = VnetHeader::new_checked(&*frame)
            .map(|h| {
                if h.is_gso() {
                    h.gso_type()
                } else {
                    vnet::GSO_NONE
                }
            })
            .map_err(|_| invalid("frame shorter than its virtio-net header"))?;
        let eth_at = vnet::HEADER_LEN;
        let l3_at = eth_at + ethernet::HEADER_LEN;
        if frame.len() < l3_at + 20 {
            return Err(invalid("frame too short to carry"));
        }
        let socket = self.tx[flow_hash(&frame[l3_at..]) as usize % self.tx.len()].as_raw_fd();
        let dst = sockaddr(SocketAddrV4::new(peer, self.dst_port()));
        let vxlan = self.vxlan_header();
        match gso_type {
            vnet::GSO_NONE => {
                if !vnet::finish_checksum(frame) {
                    return Err(invalid("partial checksum outside the frame"));
                }
                match self.encap {
                    Encap::Vxlan { .. } => send(socket, &dst, &[&vxlan, &frame[eth_at..]], 0),
                    Encap::Ipip { .. } => send(socket, &dst, &[&frame[l3_at..]], 0),
                }
            }
            vnet::GSO_TCPV4 | vnet::GSO_TCPV6 => {
                let gap = match self.encap {
                    Encap::Vxlan { .. } => VXLAN_HEADER_LEN,
                    Encap::Ipip { .. } => 0,
                };
                let segs = segment::tcp(frame, gap, scratch)
                    .map_err(|e| invalid(&format!("cannot segment: {e:?}")))?;
                let out = &mut scratch[..segs.total];
                match self.encap {
                    Encap::Vxlan { .. } => {
                        for seg in out.chunks_mut(segs.stride) {
                            seg[..VXLAN_HEADER_LEN].copy_from_slice(&vxlan);
                        }
                        if segs.count > 1 && self.gso.load(Ordering::Relaxed) {
                            // One UDP payload holds at most 65,507 bytes and 64 segments.
                            let per_send = (MAX_UDP_PAYLOAD / segs.stride).clamp(1, 64);
                            match out.chunks(per_send * segs.stride).try_for_each(|chunk| {
                                send(socket, &dst, &[chunk], segs.stride as u16)
                            }) {
                                Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                                    self.gso.store(false, Ordering::Relaxed);
                                }
                                other => return other,
                            }
                        }
                        out.chunks(segs.stride)
                            .try_for_each(|seg| send(socket, &dst, &[seg], 0))
                    }
                    Encap::Ipip { .. } => send_many(
                        socket,
                        &dst,
                        out.chunks(segs.stride)
                            .map(|seg| &seg[ethernet::HEADER_LEN..]),
                    ),
                }
            }
            _ => Err(invalid("UDP GSO frames are not carried between nodes")),
        }
    }

    fn dst_port(&self) -> u16 {
        match self.encap {
            Encap::Vxlan { port, .. } => port,
            Encap::Ipip { .. } => 0,
        }
    }

    fn vxlan_header(&self) -> [u8; VXLAN_HEADER_LEN] {
        let vni = match self.encap {
            Encap::Vxlan { vni, .. } => vni,
            Encap::Ipip { .. } => 0,
        };
        let v = (vni & 0x00ff_ffff).to_be_bytes();
        [VXLAN_FLAG_VNI, 0, 0, 0, v[1], v[2], v[3], 0]
    }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message.to_string())
}

/// A hash of the inner packet's addresses and ports (IPv4 or IPv6), the same for every
/// packet of a flow.
fn flow_hash(l3: &[u8]) -> u32 {
    let (addrs, proto, l4) = match l3[0] >> 4 {
        4 => {
            let ihl = usize::from(l3[0] & 0x0f) * 4;
            (l3.get(12..20), l3[9], l3.get(ihl..))
        }
        _ => (l3.get(8..40), l3.get(6).copied().unwrap_or(0), l3.get(40..)),
    };
    let mut h: u32 = 0x811c_9dc5;
    let ports = match proto {
        6 | 17 => l4.and_then(|l| l.get(..4)),
        _ => None,
    };
    for b in addrs.unwrap_or(&[]).iter().chain(ports.unwrap_or(&[])) {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    h ^ (h >> 16)
}

fn sockaddr(addr: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// One `sendmsg` of the concatenation of `parts` to `dst`; with `segment > 0`, the kernel
/// cuts the payload into datagrams of that size (`UDP_SEGMENT`).
fn send(fd: RawFd, dst: &libc::sockaddr_in, parts: &[&[u8]], segment: u16) -> io::Result<()> {
    let mut iovs = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; 2];
    for (iov, part) in iovs.iter_mut().zip(parts) {
        iov.iov_base = part.as_ptr() as *mut libc::c_void;
        iov.iov_len = part.len();
    }
    // Room for one cmsg carrying a u16, 8-byte aligned.
    let mut control = [0u64; 4];
    // SAFETY: all-zero is a valid msghdr.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (dst as *const libc::sockaddr_in as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
    msg.msg_iov = iovs.as_mut_ptr();
    msg.msg_iovlen = parts.len().min(2);
    if segment > 0 {
        msg.msg_control = control.as_mut_ptr().cast();
        // SAFETY: CMSG_SPACE only computes a size.
        msg.msg_controllen = unsafe { libc::CMSG_SPACE(size_of::<u16>() as u32) } as usize;
        // SAFETY: `msg` points at `control`, which has room for one cmsg with a u16
        // (CMSG_SPACE(2) = 24 <= 32 bytes); CMSG_FIRSTHDR is therefore non-null and
        // CMSG_DATA points inside `control`.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = SOL_UDP;
            (*cmsg).cmsg_type = UDP_SEGMENT;
            (*cmsg).cmsg_len = libc::CMSG_LEN(size_of::<u16>() as u32) as usize;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
        }
    }
    // SAFETY: `msg` and everything it points to (address, iovecs over live slices,
    // control buffer) outlive the call; sendmsg only reads them.
    let rc = unsafe { libc::sendmsg(fd, &msg, 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A blocking socket: receives use `MSG_DONTWAIT`, while a send waits for room in the
/// socket buffer (back-pressure on the worker, like the kernel's own queueing) instead of
/// dropping the frame.
/// One `recvmsg` into `space`: bytes read, the sender's address, and the segment size the
/// kernel reports with `UDP_GRO` (0 when it merged nothing).
fn recv_one(fd: RawFd, space: &mut [u8]) -> io::Result<(usize, Ipv4Addr, usize)> {
    // SAFETY: all-zero is a valid sockaddr_in and msghdr.
    let mut from: libc::sockaddr_in = unsafe { zeroed() };
    let mut iov = libc::iovec {
        iov_base: space.as_mut_ptr().cast(),
        iov_len: space.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: as above.
    let mut msg: libc::msghdr = unsafe { zeroed() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control);
    // SAFETY: `msg` points at live storage for the address, the data (`space`) and the
    // control messages, all of which outlive the call.
    let got = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut segment = 0;
    // SAFETY: the kernel filled `msg_controllen` bytes of `control` with well-formed
    // cmsgs; CMSG_FIRSTHDR/NXTHDR stay inside it and CMSG_DATA of a UDP_GRO cmsg holds
    // an int.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == SOL_UDP && (*cmsg).cmsg_type == UDP_GRO {
                segment = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    let addr = Ipv4Addr::from(u32::from_be(from.sin_addr.s_addr));
    Ok((got as usize, addr, segment.max(0) as usize))
}

/// Sends each of `packets` as its own datagram to `dst`, 64 per `sendmmsg`.
fn send_many<'a>(
    fd: RawFd,
    dst: &libc::sockaddr_in,
    packets: impl Iterator<Item = &'a [u8]>,
) -> io::Result<()> {
    const MAX: usize = 64;
    // SAFETY: all-zero is a valid iovec and mmsghdr.
    let mut iovs: [libc::iovec; MAX] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut hdrs: [libc::mmsghdr; MAX] = unsafe { zeroed() };
    let mut packets = packets.peekable();
    while packets.peek().is_some() {
        let mut n = 0;
        for packet in packets.by_ref().take(MAX) {
            iovs[n] = libc::iovec {
                iov_base: packet.as_ptr() as *mut libc::c_void,
                iov_len: packet.len(),
            };
            n += 1;
        }
        for i in 0..n {
            hdrs[i].msg_hdr.msg_name =
                (dst as *const libc::sockaddr_in as *mut libc::sockaddr_in).cast();
            hdrs[i].msg_hdr.msg_namelen = size_of::<libc::sockaddr_in>() as u32;
            hdrs[i].msg_hdr.msg_iov = &mut iovs[i];
            hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        let mut sent = 0;
        while sent < n {
            // SAFETY: `hdrs[sent..n]` point at the destination and at iovecs over live
            // slices, all of which outlive the call; sendmmsg only reads them.
            let rc = unsafe { libc::sendmmsg(fd, hdrs[sent..].as_mut_ptr(), (n - sent) as u32, 0) };
            if rc < 0 {
                return Err(io::Error::last_os_error());
            }
            sent += rc as usize;
        }
    }
    Ok(())
}

fn new_socket(kind: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_int(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a live c_int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn bind(fd: &OwnedFd, addr: SocketAddrV4) -> io::Result<()> {
    let sa = sockaddr(addr);
    // SAFETY: `sa` is a valid sockaddr_in of the size passed.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as u32,
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(
            err.kind(),
            format!("cannot bind {addr}: {err}"),
        ));
    }
    Ok(())
}

/// 4 MiB socket buffers, past `net.core.[rw]mem_max` when allowed (root), so that a burst
/// of super-frames does not overflow them.
fn set_buffers(fd: &OwnedFd) -> io::Result<()> {
    for (forced, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if set_int(fd, libc::SOL_SOCKET, forced, 4 << 20).is_err() {
            set_int(fd, libc::SOL_SOCKET, plain, 4 << 20)?;
        }
    }
    Ok(())
}

fn udp_socket(addr: SocketAddrV4, reuse_port: bool) -> io::Result<OwnedFd> {
    let fd = new_socket(libc::SOCK_DGRAM, 0)?;
    if reuse_port {
        set_int(&fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
        // Receive runs of datagrams in one read (see `Uplink::recv_gro`).
        set_int(&fd, SOL_UDP, UDP_GRO, 1)?;
    }
    set_buffers(&fd)?;
    bind(&fd, addr)?;
    Ok(fd)
}

fn raw_socket(local: Ipv4Addr, protocol: u8) -> io::Result<OwnedFd> {
    let fd = new_socket(libc::SOCK_RAW, libc::c_int::from(protocol))?;
    set_buffers(&fd)?;
    bind(&fd, SocketAddrV4::new(local, 0))?;
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::segment::test_frames;

    #[test]
    fn flow_hash_is_per_flow() {
        let mut a = [0u8; 40];
        a[0] = 0x45;
        a[9] = 6;
        a[12..20].copy_from_slice(&[10, 0, 0, 1, 10, 0, 1, 1]);
        a[20..24].copy_from_slice(&[0x30, 0x39, 0x00, 0x50]);
        let mut b = a;
        b[20] = 0x31;
        assert_eq!(flow_hash(&a), flow_hash(&a.clone()));
        assert_ne!(flow_hash(&a), flow_hash(&b));
    }

    #[test]
    fn vxlan_header_carries_the_vni() {
        let u = vxlan(0x12_3456);
        assert_eq!(u.vxlan_header(), [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
    }

    const GW: MacAddr = MacAddr([0xee; 6]);
    const UP: MacAddr = MacAddr([0x0e, 0xee, 0xee, 0, 0, 2]);

    fn vxlan(vni: u32) -> Uplink {
        Uplink::detached(Encap::Vxlan { vni, port: 4789 }, UP, GW)
    }

    /// What the sending node puts on the wire for `frame`: its segments, each behind a
    /// VXLAN header with `vni`; returns the datagrams back to back and their size.
    fn datagrams(frame: &[u8], vni: u32) -> (Vec<u8>, usize) {
        let mut out = vec![0u8; segment::SCRATCH_LEN];
        let s = segment::tcp(frame, VXLAN_HEADER_LEN, &mut out).unwrap();
        out.truncate(s.total);
        let header = vxlan(vni).vxlan_header();
        for seg in out.chunks_mut(s.stride) {
            seg[..VXLAN_HEADER_LEN].copy_from_slice(&header);
        }
        (out, s.stride)
    }

    fn bufs(n: usize) -> Vec<PacketBuf> {
        (0..n).map(|_| PacketBuf::new()).collect()
    }

    const ACK: u8 = 0x10;

    #[test]
    fn a_run_of_segments_becomes_the_super_frame_again() {
        for v6 in [false, true] {
            let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 13 % 251) as u8).collect();
            let frame = test_frames::super_frame(v6, &payload, 1448, ACK);
            let (wire, stride) = datagrams(&frame, 1);
            let mut b = bufs(4);
            assert_eq!(vxlan(1).deliver(&wire, stride, &mut b), 1, "one frame");
            let f = b[0].frame();
            let vh = VnetHeader::new_checked(f).unwrap();
            let l3h = if v6 { 40 } else { 20 };
            assert_eq!(
                vh.gso_type(),
                if v6 { vnet::GSO_TCPV6 } else { vnet::GSO_TCPV4 }
            );
            assert_eq!(vh.gso_size(), 1448);
            assert_eq!(usize::from(vh.csum_start()), 14 + l3h);
            assert_eq!(&f[12..18], &GW.0, "to the gateway");
            assert_eq!(&f[18..24], &UP.0, "from the uplink");
            let l3 = &f[26..];
            let total = if v6 {
                40 + usize::from(crate::wire::read_u16(l3, 4))
            } else {
                usize::from(crate::wire::read_u16(l3, 2))
            };
            assert_eq!(total, l3.len());
            assert_eq!(&l3[l3h + 20..], &payload[..], "payload intact and in order");
            assert_eq!(&l3[l3h + 4..l3h + 8], &1_000_000u32.to_be_bytes());
            if !v6 {
                assert_eq!(crate::wire::checksum::checksum(&l3[..20]), 0);
            }
        }
    }

    #[test]
    fn other_flows_wrong_vni_and_short_buffers_are_handled() {
        let payload = vec![7u8; 1448 * 4];
        let frame = test_frames::super_frame(false, &payload, 1448, ACK);
        let (mut wire, stride) = datagrams(&frame, 1);
        // Segments 3 and 4 belong to another flow (other destination port).
        for k in 2..4 {
            let tcp = k * stride + VXLAN_HEADER_LEN + 14 + 20;
            wire[tcp + 3] ^= 1;
        }
        let mut b = bufs(4);
        assert_eq!(vxlan(1).deliver(&wire, stride, &mut b), 2, "two runs");
        for f in &b[..2] {
            assert_eq!(
                f.len(),
                12 + 14 + 20 + 20 + 2 * 1448,
                "two segments in each"
            );
        }
        // Another VNI: the first datagram is dropped and counted, the rest start over.
        let (mut wire, stride) = datagrams(&frame, 1);
        wire[4..7].copy_from_slice(&[0, 0, 9]);
        let u = vxlan(1);
        let mut b = bufs(4);
        assert_eq!(u.deliver(&wire, stride, &mut b), 1);
        assert_eq!(u.rx_rejected.load(Ordering::Relaxed), 1);
        let l3 = &b[0].frame()[26..];
        assert_eq!(l3.len(), 20 + 20 + 3 * 1448, "three segments merged");
        // More runs than buffers: the rest is dropped and counted, nothing panics.
        let (mut wire, stride) = datagrams(&frame, 1);
        for k in 0..4 {
            wire[k * stride + VXLAN_HEADER_LEN + 14 + 20 + 3] ^= k as u8;
        }
        let u = vxlan(1);
        let mut b = bufs(2);
        assert_eq!(u.deliver(&wire, stride, &mut b), 2);
        assert_eq!(u.rx_rejected.load(Ordering::Relaxed), 2);
        assert!(b.iter().all(|f| f.len() == 12 + 14 + 20 + 20 + 1448));
    }

    #[test]
    fn ip_in_ip_is_stripped_to_a_frame() {
        let inner = [
            0x45u8, 0, 0, 20, 0, 0, 0, 0, 64, 1, 0, 0, 10, 244, 1, 5, 10, 244, 0, 5,
        ];
        let mut packet = vec![
            0x45u8, 0, 0, 40, 0, 0, 0, 0, 64, 4, 0, 0, 192, 168, 1, 11, 192, 168, 1, 10,
        ];
        packet.extend_from_slice(&inner);
        let u = Uplink::detached(Encap::Ipip { protocol: 4 }, UP, GW);
        let mut b = bufs(1);
        assert_eq!(u.deliver(&packet, 0, &mut b), 1);
        assert_eq!(&b[0].frame()[24..26], &[0x08, 0x00]);
        assert_eq!(&b[0].frame()[26..], &inner);
        packet[9] = 41;
        assert_eq!(
            u.deliver(&packet, 0, &mut b),
            0,
            "another protocol is not ours"
        );
    }
}
