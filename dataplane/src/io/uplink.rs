//! The uplink: where pod traffic for other nodes leaves this node and where theirs arrives,
//! through the node's own kernel sockets (docs/multinode.md, option A). Only the sockets
//! are here; what turns datagrams into frames and frames into datagrams is
//! [`crate::offload::tunnel`]'s.
//!
//! * **VXLAN**: UDP sockets. Receive: one socket per worker bound to the node's address
//!   and the VXLAN port with `SO_REUSEPORT`, so the kernel spreads peers' flows over the
//!   workers; `UDP_GRO` returns runs of datagrams in one read. Send: a pool of sockets
//!   bound to the node's address on distinct ephemeral ports; the inner flow's hash picks
//!   one, so the outer UDP source port follows the inner flow (RFC 7348). A TCP
//!   super-frame's segments leave with one `sendmsg` and `UDP_SEGMENT`: the kernel builds
//!   and checksums the outer headers.
//! * **IP-in-IP**: a raw socket per inner family (protocol 4 for IPv4, 41 for IPv6), read
//!   by worker 0 (a raw socket gets every packet of its protocol).
//!
//! With `--uplink-mode afxdp` ([`UplinkMode::AfXdp`]), VXLAN also moves through AF_XDP
//! sockets on the underlay device ([`super::uplink_xdp`]): received frames are checked
//! and decapsulated here, frames to a peer whose next hop the kernel has resolved leave as
//! whole frames with outer headers built here; the sockets stay open beside them for what
//! the program lets through and for peers not resolved yet.
//! * **Direct routing** (AF_XDP only; without it the node's kernel routes pod traffic
//!   between nodes): IPv4 packets to the node's pod CIDR arrive on the AF_XDP sockets, and
//!   packets to peers' pods leave on them behind an Ethernet header to the next hop; until
//!   a next hop is resolved, a raw socket (`IPPROTO_RAW`) hands them to the kernel's
//!   routing as they are.
//!
//! A datagram from an address that is not a peer, with another VNI, malformed, or with no
//! buffer left is dropped here and counted by reason ([`Uplink::drops`], reported in the
//! stats as `uplink_not_a_peer`, `uplink_not_ours`, `uplink_malformed`, `uplink_no_buffer`).
// Unsafe code here: sendmsg/recvmsg with UDP_SEGMENT/UDP_GRO control messages and
// recvmmsg/sendmmsg (the fast path: libc, with no allocation per call; docs/crates.md).
#![allow(unsafe_code)]

use super::uplink_xdp::XdpPath;
use super::xdp::Filter;
use crate::buffer::{PacketBuf, BATCH};
use crate::offload::outer::{self, NotVxlan, OuterAddrs};
pub use crate::offload::tunnel::Encap;
use crate::offload::tunnel::{self, Decapsulator, Outgoing, Received, Reject};
use crate::wire::{vnet, vxlan, L3_OFFSET};
use arc_swap::ArcSwap;
use nix::sys::socket::{setsockopt, sockopt, AddressFamily, SockFlag, SockProtocol, SockType};
use std::io;
use std::mem::{size_of, size_of_val, zeroed};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use switchyard_api::MacAddr;

/// The largest UDP payload in one IPv4 datagram (65,535 - 20 - 8).
const MAX_UDP_PAYLOAD: usize = 65_507;
/// Sockets in the VXLAN send pool (distinct outer source ports).
const TX_POOL: usize = 16;

/// How an uplink moves its datagrams.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum UplinkMode {
    /// The node's UDP (or raw IP) sockets: the kernel builds the outer headers, segments
    /// and merges (`UDP_SEGMENT`, `UDP_GRO`).
    #[default]
    Sockets,
    /// AF_XDP sockets on the underlay device for VXLAN (and direct routing), whole frames
    /// built by the dataplane, next hops from the kernel's tables; the sockets beside them.
    AfXdp,
}

impl UplinkMode {
    /// The mode's name, as `--uplink-mode` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sockets => "sockets",
            Self::AfXdp => "afxdp",
        }
    }
}

impl std::str::FromStr for UplinkMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "sockets" => Ok(Self::Sockets),
            "afxdp" => Ok(Self::AfXdp),
            other => Err(format!("unknown uplink mode {other:?} (sockets or afxdp)")),
        }
    }
}

/// How packets that leave the node with its address (masqueraded, or answering a port it
/// publishes) travel when the uplink is on AF_XDP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NodeExit {
    /// Both halves through the AF_XDP sockets: the node's stack forwards none of them.
    #[default]
    AfXdp,
    /// Through the node's stack, both ways, where its netfilter rules apply.
    Kernel,
}

impl NodeExit {
    /// The way's name, as `--node-exit` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Self::AfXdp => "afxdp",
            Self::Kernel => "kernel",
        }
    }
}

impl std::str::FromStr for NodeExit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "afxdp" => Ok(Self::AfXdp),
            "kernel" => Ok(Self::Kernel),
            other => Err(format!("unknown node exit {other:?} (afxdp or kernel)")),
        }
    }
}

/// An uplink port's sockets.
pub struct Uplink {
    decap: Decapsulator,
    vxlan_header: [u8; vxlan::HEADER_LEN],
    /// The node's underlay address.
    local: Ipv4Addr,
    /// Receive sockets, one per worker queue (IP-in-IP: one, read by worker 0).
    rx: Vec<OwnedFd>,
    /// Send sockets; the inner flow hash picks one.
    tx: Vec<OwnedFd>,
    /// Underlay addresses accepted as senders.
    peers: Arc<ArcSwap<Vec<Ipv4Addr>>>,
    /// The AF_XDP path ([`UplinkMode::AfXdp`]).
    xdp: Option<XdpPath>,
    /// Makes frames of what the AF_XDP path takes for the node (not overlay traffic) as if
    /// they came from the host port (whose MAC is their source), when it is the exit.
    for_node: Option<Decapsulator>,
    /// Whether the kernel accepted `UDP_SEGMENT` so far.
    gso: AtomicBool,
    /// Datagrams dropped on receive, by [`Reject`] index.
    drops: [AtomicU64; Reject::ALL.len()],
}

impl Uplink {
    /// Opens the sockets for `encap` on the node's underlay address `local`, with `queues`
    /// receive queues (VXLAN). Frames delivered get `mac` as source and `gateway` as
    /// destination. An earlier process's receive sockets (`kept`, see
    /// [`super::handover`]) are taken over when they are bound where these would be: the
    /// datagrams that arrived meanwhile wait in them. With `per_cpu` (workers pinned, worker
    /// `i` on CPU `i`), a datagram goes to the socket of the worker on the CPU that
    /// received it (`SO_INCOMING_CPU`), so no other CPU has to be woken. `mode` says
    /// whether AF_XDP sockets on the underlay device carry VXLAN too; `pods`: the node's
    /// IPv4 pod CIDR, which the AF_XDP sockets take under direct routing. With `exit` (the
    /// host port's MAC) the AF_XDP path is also the node's exit: it takes what comes back
    /// to the node for the dataplane (see [`super::uplink_xdp`]), delivered as frames from
    /// the host port ([`Uplink::recv_split`]), and sends packets that leave the node with
    /// its address ([`Uplink::send_outside`]).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        encap: Encap,
        local: Ipv4Addr,
        queues: usize,
        mac: MacAddr,
        gateway: MacAddr,
        kept: Option<Vec<OwnedFd>>,
        per_cpu: bool,
        mode: UplinkMode,
        pods: Option<(Ipv4Addr, u8)>,
        exit: Option<MacAddr>,
    ) -> io::Result<Self> {
        let (rx, tx) = match encap {
            Encap::Vxlan { port, .. } => {
                let at = SocketAddrV4::new(local, port);
                let rx = match kept.filter(|k| k.len() == queues.max(1) && bound_at(k, at)) {
                    Some(kept) => kept,
                    None => (0..queues.max(1))
                        .map(|_| udp_socket(at, true))
                        .collect::<io::Result<Vec<_>>>()?,
                };
                if per_cpu {
                    for (queue, socket) in rx.iter().enumerate() {
                        set_incoming_cpu(socket, queue)?;
                    }
                }
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
            // Sends packets whole, headers included; receives nothing (what the AF_XDP
            // program passes reaches the pods through the node's routes).
            Encap::Direct => (
                Vec::new(),
                vec![raw_socket(local, libc::IPPROTO_RAW as u8)?],
            ),
        };
        let peers = Arc::new(ArcSwap::from_pointee(Vec::new()));
        let xdp =
            match (mode, encap) {
                (UplinkMode::Sockets, Encap::Direct) => return Err(invalid(
                    "direct routing goes through the node's kernel unless the uplink is AF_XDP",
                )),
                (UplinkMode::Sockets, _) => None,
                (UplinkMode::AfXdp, Encap::Vxlan { port, .. }) => Some(XdpPath::open(
                    local,
                    Filter::Vxlan { local, port },
                    queues,
                    peers.clone(),
                    exit.is_some(),
                )?),
                (UplinkMode::AfXdp, Encap::Direct) => {
                    let (net, prefix) = pods.ok_or_else(|| {
                        invalid("direct routing on the AF_XDP uplink needs an IPv4 pod CIDR")
                    })?;
                    let filter = Filter::PodCidr { net, prefix };
                    Some(XdpPath::open(
                        local,
                        filter,
                        queues,
                        peers.clone(),
                        exit.is_some(),
                    )?)
                }
                (UplinkMode::AfXdp, Encap::Ipip { .. }) => return Err(invalid(
                    "the AF_XDP uplink carries VXLAN and direct routing, not IP-in-IP: use --uplink-mode sockets with IP-in-IP",
                )),
            };
        Ok(Self {
            decap: Decapsulator {
                encap,
                mac,
                gateway,
            },
            vxlan_header: encap.vxlan_header().unwrap_or_default(),
            local,
            rx,
            tx,
            peers,
            for_node: exit.filter(|_| xdp.is_some()).map(|host_mac| Decapsulator {
                encap: Encap::Direct,
                mac: host_mac,
                gateway,
            }),
            xdp,
            gso: AtomicBool::new(true),
            drops: Default::default(),
        })
    }

    /// Takes the AF_XDP path's program off the device now, if there is one (a new uplink
    /// is about to attach its own there); the sockets go on receiving what the kernel hands
    /// them.
    pub fn detach_xdp(&self) -> io::Result<()> {
        self.xdp.as_ref().map_or(Ok(()), XdpPath::detach)
    }

    /// The encapsulation.
    pub fn encap(&self) -> Encap {
        self.decap.encap
    }

    /// Replaces the set of underlay addresses accepted as senders.
    pub fn set_peers(&self, peers: Vec<Ipv4Addr>) {
        self.peers.store(Arc::new(peers));
        if let Some(xdp) = &self.xdp {
            xdp.refresh();
        }
    }

    /// The AF_XDP path, when the uplink has one.
    pub fn xdp(&self) -> Option<&XdpPath> {
        self.xdp.as_ref()
    }

    /// The receive sockets (to keep across a restart).
    pub fn receive_fds(&self) -> Vec<RawFd> {
        self.rx.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// Number of receive queues.
    pub fn queues(&self) -> usize {
        self.rx.len()
    }

    /// The receive socket of worker `queue`, if that worker reads this uplink.
    pub fn raw_fd(&self, queue: usize) -> Option<RawFd> {
        self.rx.get(queue).map(AsRawFd::as_raw_fd)
    }

    /// Sends what worker `queue` posted on the AF_XDP path (nothing to do otherwise).
    pub fn flush(&self, queue: usize) -> io::Result<()> {
        match &self.xdp {
            Some(xdp) => xdp.flush(queue),
            None => Ok(()),
        }
    }

    /// Worker `queue`'s AF_XDP socket, which it polls beside [`Uplink::raw_fd`].
    pub fn xdp_fd(&self, queue: usize) -> Option<RawFd> {
        self.xdp.as_ref()?.raw_fd(queue)
    }

    /// Datagrams dropped on receive so far, by reason.
    pub fn drops(&self) -> impl Iterator<Item = (Reject, u64)> + '_ {
        Reject::ALL
            .into_iter()
            .zip(&self.drops)
            .map(|(reason, n)| (reason, n.load(Ordering::Relaxed)))
    }

    fn count(&self, got: &Received) {
        for (slot, n) in self.drops.iter().zip(got.rejected) {
            if n > 0 {
                slot.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    fn reject(&self, reason: Reject) {
        self.drops[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Reads and decapsulates datagrams into `bufs`; returns how many frames are ready
    /// (overlay frames first, then those for the node: see [`Uplink::recv_split`]).
    pub(super) fn recv_batch(
        &self,
        queue: usize,
        bufs: &mut [PacketBuf],
        calls: usize,
    ) -> io::Result<usize> {
        self.recv_split(queue, bufs, calls)
            .map(|(overlay, node)| overlay + node)
    }

    /// Whether its socket is read a datagram per call (VXLAN with `UDP_GRO`, and no
    /// AF_XDP path read before it).
    pub(super) fn reads_one_per_call(&self) -> bool {
        self.xdp.is_none() && matches!(self.decap.encap, Encap::Vxlan { .. })
    }

    /// Reads and decapsulates datagrams into `bufs`: with the AF_XDP path, its socket
    /// first, then the UDP socket with the buffers left, in at most `calls` calls (under
    /// VXLAN a `recvmsg` reads one datagram, otherwise a `recvmmsg` a batch; with 0 the
    /// UDP socket is not read: only the AF_XDP socket was found ready). Returns how many
    /// overlay frames are ready at the start of `bufs`, and how many frames for the node
    /// follow them: what the exit's program took for the node's address, made frames from
    /// the host port (to be run through the pipeline as if that port had read them).
    pub fn recv_split(
        &self,
        queue: usize,
        bufs: &mut [PacketBuf],
        calls: usize,
    ) -> io::Result<(usize, usize)> {
        let want = bufs.len().min(BATCH);
        let (overlay, node) = match &self.xdp {
            Some(xdp) => self.recv_frames(xdp, queue, &mut bufs[..want]),
            None => (0, 0),
        };
        let from_xdp = overlay + node;
        let Some(fd) = self.raw_fd(queue).filter(|_| from_xdp < want && calls > 0) else {
            return Ok((overlay, node));
        };
        let rest = &mut bufs[from_xdp..want];
        let from_socket = match self.decap.encap {
            Encap::Vxlan { .. } => self.recv_gro(fd, rest, calls),
            Encap::Ipip { .. } | Encap::Direct => self.recv_packets(fd, rest),
        };
        match from_socket {
            Ok(n) => {
                // Overlay frames first: the socket's move before those for the node.
                bufs[overlay..from_xdp + n].rotate_left(node);
                Ok((overlay + n, node))
            }
            Err(_) if from_xdp > 0 => Ok((overlay, node)),
            Err(e) => Err(e),
        }
    }

    /// AF_XDP receive: every VXLAN frame (or routed packet) on worker `queue`'s socket
    /// becomes a frame in `bufs` (its datagram copied once, behind room for the
    /// virtio-net header), or is dropped and counted; so does every packet for the node
    /// when the path is the exit. Returns how many overlay frames start `bufs` and how
    /// many frames for the node follow them.
    fn recv_frames(&self, xdp: &XdpPath, queue: usize, bufs: &mut [PacketBuf]) -> (usize, usize) {
        let at = self.decap.encap.rx_offset();
        let port = match self.decap.encap {
            Encap::Vxlan { port, .. } => port,
            Encap::Direct => return self.recv_routed(xdp, queue, bufs),
            Encap::Ipip { .. } => return (0, 0),
        };
        let peers = self.peers.load();
        let mut kept = Kept::default();
        xdp.recv(queue, bufs.len(), |frame| {
            let got = match outer::datagram(frame, self.local, port) {
                Ok(d) if !peers.contains(&d.src) => Err(Reject::NotAPeer),
                Ok(d) => {
                    let buf = &mut bufs[kept.len()];
                    let payload = &frame[d.payload];
                    match buf.receive_space().get_mut(at..at + payload.len()) {
                        Some(space) => {
                            space.copy_from_slice(payload);
                            self.decap.decapsulate(buf, payload.len()).map(|()| {
                                if !d.checksummed {
                                    // Nothing covered the inner packet: its own checksum
                                    // is still to be checked.
                                    buf.frame_mut()[0] &= !vnet::F_DATA_VALID;
                                }
                            })
                        }
                        None => Err(Reject::Malformed),
                    }
                }
                Err(NotVxlan::NotOurs) => match &self.for_node {
                    Some(node) => kept.for_node(node, xdp, frame, bufs),
                    None => Err(Reject::NotOurs),
                },
                Err(NotVxlan::Malformed) => Err(Reject::Malformed),
            };
            match got {
                Ok(()) => kept.total += 1,
                Err(reason) => self.reject(reason),
            }
        });
        kept.split(bufs)
    }

    /// AF_XDP receive under direct routing: the IPv4 packet of every frame on worker
    /// `queue`'s socket is copied once into a buffer and made a frame, or dropped and
    /// counted. The program took packets to the node's pods, and (as the exit) what comes
    /// back to the node's own address: those are made frames from the host port. The
    /// senders of the first are checked as the node's own routing would (the pipeline takes
    /// an uplink's packets only to local pods and the node).
    fn recv_routed(&self, xdp: &XdpPath, queue: usize, bufs: &mut [PacketBuf]) -> (usize, usize) {
        let mut kept = Kept::default();
        xdp.recv(queue, bufs.len(), |frame| {
            let got = match &self.for_node {
                Some(node) if outer::routed_to(frame) == Some(self.local) => {
                    kept.for_node(node, xdp, frame, bufs)
                }
                _ => routed(&self.decap, frame, &mut bufs[kept.len()]),
            };
            match got {
                Ok(()) => kept.total += 1,
                Err(reason) => self.reject(reason),
            }
        });
        kept.split(bufs)
    }

    /// IP-in-IP receive: one `recvmmsg` fills the batch, one packet per buffer.
    fn recv_packets(&self, fd: RawFd, bufs: &mut [PacketBuf]) -> io::Result<usize> {
        let at = self.decap.encap.rx_offset();
        let want = bufs.len();
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
            if !peers.contains(&from) {
                self.reject(Reject::NotAPeer);
                continue;
            }
            match self.decap.decapsulate(&mut bufs[i], len) {
                Ok(()) => {
                    bufs.swap(kept, i);
                    kept += 1;
                }
                Err(reason) => self.reject(reason),
            }
        }
        Ok(kept)
    }

    /// VXLAN receive with `UDP_GRO`: one `recvmsg` may return many datagrams of one size
    /// back to back (the kernel did not cut the sender's UDP GSO super-packet, or merged
    /// a run); the decapsulator turns them into frames, merging TCP runs.
    fn recv_gro(&self, fd: RawFd, bufs: &mut [PacketBuf], calls: usize) -> io::Result<usize> {
        let at = self.decap.encap.rx_offset();
        let mut n = 0;
        for _ in 0..calls {
            if n == bufs.len() {
                break;
            }
            let space = &mut bufs[n].receive_space()[at..];
            let (len, from, segment) = match recv_one(fd, space) {
                Ok(got) => got,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if n == 0 => return Err(e),
                Err(_) => break,
            };
            if !self.peers.load().contains(&from) {
                self.reject(Reject::NotAPeer);
                continue;
            }
            let segment = if segment == 0 { len } else { segment };
            let got = self.decap.split_runs(&mut bufs[n..], len, segment);
            self.count(&got);
            n += got.frames;
        }
        Ok(n)
    }

    /// Sends `frame` (virtio-net header then Ethernet, as the pipeline left it: an IPv4
    /// packet leaving the node with its address) straight out of the AF_XDP path, when it
    /// is the node's exit and the kernel's tables give the next hop toward the destination
    /// (a super-frame is segmented first, into `scratch`); it leaves at the next
    /// [`Uplink::flush`]. `None` when not: nothing was sent, and the frame is the node's
    /// stack's to route.
    pub fn send_outside(
        &self,
        queue: usize,
        frame: &mut [u8],
        scratch: &mut [u8],
    ) -> Option<io::Result<()>> {
        let xdp = self.xdp.as_ref().filter(|xdp| xdp.is_exit())?;
        let dst: [u8; 4] = frame.get(L3_OFFSET + 16..L3_OFFSET + 20)?.try_into().ok()?;
        let next_hop = xdp.exit_hop(Ipv4Addr::from(dst))?;
        Some(post_routed(xdp, queue, next_hop, frame, scratch))
    }

    /// Encapsulates `frame` (virtio-net header then Ethernet, as the pipeline left it) and
    /// sends it to the node at `peer`. A TCP super-frame is segmented first, into
    /// `scratch` (see [`crate::offload::segment::SCRATCH_LEN`]). With the AF_XDP path and
    /// the peer's next hop resolved, the frames are posted on worker `queue`'s AF_XDP
    /// socket and leave at the next [`Uplink::flush`].
    pub fn send_to(
        &self,
        queue: usize,
        frame: &mut [u8],
        peer: Ipv4Addr,
        scratch: &mut [u8],
    ) -> io::Result<()> {
        let hash = frame.get(L3_OFFSET..).map_or(0, tunnel::flow_hash);
        let resolved = self
            .xdp
            .as_ref()
            .and_then(|xdp| Some((xdp, xdp.next_hop(peer)?)));
        if let (Some((xdp, next_hop)), Encap::Direct) = (resolved, self.decap.encap) {
            return post_routed(xdp, queue, next_hop, frame, scratch);
        }
        let outgoing = tunnel::encapsulate(self.decap.encap, &self.vxlan_header, frame, scratch)
            .map_err(|e| invalid(&format!("cannot carry the frame: {e}")))?;
        if let Some((xdp, next_hop)) = resolved {
            let addrs = OuterAddrs {
                src_mac: xdp.mac(),
                dst_mac: next_hop,
                src: self.local,
                dst: peer,
                // The ephemeral range the kernel's own VXLAN picks source ports from.
                src_port: 49_152 + (hash % 16_384) as u16,
                dst_port: self.decap.encap.dst_port(),
            };
            // One datagram in at most two parts, behind its outer headers.
            let post = |a: &[u8], b: &[u8]| {
                let head = outer::headers(&addrs, &[a, b]);
                xdp.post(queue, &[&head, a, b])
            };
            return match outgoing {
                Outgoing::One([a, b]) => post(a, b),
                Outgoing::Segments { data, stride, .. } => {
                    data.chunks(stride).try_for_each(|seg| post(seg, &[]))
                }
            };
        }
        let socket = self.tx[hash as usize % self.tx.len()].as_raw_fd();
        let dst = sockaddr(SocketAddrV4::new(peer, self.decap.encap.dst_port()));
        match outgoing {
            Outgoing::One(parts) => send(socket, &dst, &parts, 0),
            Outgoing::Segments {
                data,
                stride,
                count,
                skip: 0,
            } => {
                if count > 1 && self.gso.load(Ordering::Relaxed) {
                    // One UDP payload holds at most 65,507 bytes and 64 segments.
                    let per_send = (MAX_UDP_PAYLOAD / stride).clamp(1, 64);
                    match data
                        .chunks(per_send * stride)
                        .try_for_each(|chunk| send(socket, &dst, &[chunk], stride as u16))
                    {
                        Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                            self.gso.store(false, Ordering::Relaxed);
                        }
                        other => return other,
                    }
                }
                data.chunks(stride)
                    .try_for_each(|seg| send(socket, &dst, &[seg], 0))
            }
            Outgoing::Segments {
                data, stride, skip, ..
            } => send_many(socket, &dst, data.chunks(stride).map(|seg| &seg[skip..])),
        }
    }
}

/// Copies the IPv4 packet of the received Ethernet frame `frame` into `buf` and makes it a
/// frame with `decap` (direct routing: no encapsulation).
fn routed(decap: &Decapsulator, frame: &[u8], buf: &mut PacketBuf) -> Result<(), Reject> {
    let packet = outer::routed_packet(frame).ok_or(Reject::Malformed)?;
    let packet = &frame[packet];
    let at = decap.encap.rx_offset();
    let space = buf
        .receive_space()
        .get_mut(at..at + packet.len())
        .ok_or(Reject::Malformed)?;
    space.copy_from_slice(packet);
    decap.decapsulate(buf, packet.len())
}

/// The frames one AF_XDP receive kept, and which of them are for the node.
#[derive(Default)]
struct Kept {
    total: usize,
    /// Bit `i`: frame `i` is for the node (a batch holds at most 64 frames).
    node: u64,
}

impl Kept {
    fn len(&self) -> usize {
        self.total
    }

    /// Makes the packet of `frame`, which came back to the node's address from outside the
    /// cluster through `xdp`, the next frame in `bufs` with `decap` ([`routed`]), marked
    /// for the node: its TCP or UDP checksum is checked, and a partial one (from a sender
    /// behind a virtual link) is marked so, as the node's stack would have taken it. A
    /// connection opened from outside has the kernel resolve the way back to its client
    /// now, ahead of the first answer.
    fn for_node(
        &mut self,
        decap: &Decapsulator,
        xdp: &XdpPath,
        frame: &[u8],
        bufs: &mut [PacketBuf],
    ) -> Result<(), Reject> {
        let buf = &mut bufs[self.total];
        routed(decap, frame, buf)?;
        if let Some(client) = outer::connection_opened_by(frame) {
            xdp.expect_answers_to(client);
        }
        vnet::note_received_checksum(buf.frame_mut());
        self.node |= 1 << self.total;
        Ok(())
    }

    /// Moves the overlay frames of `bufs` before those for the node (keeping each kind's
    /// order); returns how many there are of each.
    fn split(&self, bufs: &mut [PacketBuf]) -> (usize, usize) {
        if self.node == 0 {
            return (self.total, 0);
        }
        let mut overlay = 0;
        for i in 0..self.total {
            if self.node & (1 << i) == 0 {
                // Frames for the node between `overlay` and `i` shift up by one.
                bufs[overlay..=i].rotate_right(1);
                overlay += 1;
            }
        }
        (overlay, self.total - overlay)
    }
}

/// Posts the IPv4 packet of `frame` (virtio-net header then Ethernet) as it is, behind an
/// Ethernet header to `next_hop`, on worker `queue`'s AF_XDP socket; a super-frame is
/// segmented first, into `scratch`.
fn post_routed(
    xdp: &XdpPath,
    queue: usize,
    next_hop: MacAddr,
    frame: &mut [u8],
    scratch: &mut [u8],
) -> io::Result<()> {
    let outgoing = tunnel::encapsulate(Encap::Direct, &[0; vxlan::HEADER_LEN], frame, scratch)
        .map_err(|e| invalid(&format!("cannot carry the frame: {e}")))?;
    let head = outer::ethernet_v4(next_hop, xdp.mac());
    match outgoing {
        Outgoing::One([packet, _]) => xdp.post(queue, &[&head, packet]),
        Outgoing::Segments {
            data, stride, skip, ..
        } => data
            .chunks(stride)
            .try_for_each(|seg| xdp.post(queue, &[&head, &seg[skip..]])),
    }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message.to_string())
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
            (*cmsg).cmsg_level = libc::SOL_UDP;
            (*cmsg).cmsg_type = libc::UDP_SEGMENT;
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
    // cmsgs; CMSG_FIRSTHDR/NXTHDR stay inside it and CMSG_DATA of a libc::UDP_GRO cmsg holds
    // an int.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_UDP && (*cmsg).cmsg_type == libc::UDP_GRO {
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

/// The sockets' set-up goes through `nix` (typed options, no `unsafe`); only the raw
/// socket's creation, for an IP protocol number `nix` has no name for, and the fast path's
/// batched sends and receives with their control messages stay on `libc` (docs/crates.md).
fn bind(fd: &OwnedFd, addr: SocketAddrV4) -> io::Result<()> {
    nix::sys::socket::bind(fd.as_raw_fd(), &nix::sys::socket::SockaddrIn::from(addr)).map_err(
        |err| {
            let err = io::Error::from(err);
            io::Error::new(err.kind(), format!("cannot bind {addr}: {err}"))
        },
    )
}

/// 4 MiB socket buffers, past `net.core.[rw]mem_max` when allowed (root), so that a burst
/// of super-frames does not overflow them.
fn set_buffers(fd: &OwnedFd) -> io::Result<()> {
    const BYTES: usize = 4 << 20;
    if setsockopt(fd, sockopt::RcvBufForce, &BYTES).is_err() {
        setsockopt(fd, sockopt::RcvBuf, &BYTES)?;
    }
    if setsockopt(fd, sockopt::SndBufForce, &BYTES).is_err() {
        setsockopt(fd, sockopt::SndBuf, &BYTES)?;
    }
    Ok(())
}

fn udp_socket(addr: SocketAddrV4, reuse_port: bool) -> io::Result<OwnedFd> {
    let fd = nix::sys::socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Udp,
    )?;
    if reuse_port {
        setsockopt(&fd, sockopt::ReusePort, &true)?;
        // Receive runs of datagrams in one read (see `Uplink::recv_gro`).
        setsockopt(&fd, sockopt::UdpGroSegment, &true)?;
    }
    set_buffers(&fd)?;
    bind(&fd, addr)?;
    Ok(fd)
}

fn raw_socket(local: Ipv4Addr, protocol: u8) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call with constant arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::c_int::from(protocol),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    set_buffers(&fd)?;
    bind(&fd, SocketAddrV4::new(local, 0))?;
    Ok(fd)
}

/// Makes the kernel pick `socket` among its `SO_REUSEPORT` group for the datagrams it
/// receives on CPU `cpu` (Linux 6.1 and later: `reuseport_select_sock_by_hash` prefers the
/// socket whose incoming CPU is the current one; earlier kernels accept the option and
/// keep spreading by hash).
fn set_incoming_cpu(socket: &OwnedFd, cpu: usize) -> io::Result<()> {
    let cpu = libc::c_int::try_from(cpu).map_err(io::Error::other)?;
    // SAFETY: SO_INCOMING_CPU reads one int from the pointer, which is valid for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_INCOMING_CPU,
            (&cpu as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether every socket of `fds` is a UDP socket bound to `at`.
fn bound_at(fds: &[OwnedFd], at: SocketAddrV4) -> bool {
    fds.iter().all(|fd| {
        let udp = nix::sys::socket::getsockopt(fd, sockopt::SockType)
            .is_ok_and(|t| t == SockType::Datagram);
        let bound = nix::sys::socket::getsockname::<nix::sys::socket::SockaddrIn>(fd.as_raw_fd())
            .is_ok_and(|a| a.ip() == *at.ip() && a.port() == at.port());
        udp && bound
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_receive_socket_takes_the_cpu_it_serves() {
        let socket = udp_socket(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0), true).unwrap();
        set_incoming_cpu(&socket, 1).unwrap();
        let mut cpu: libc::c_int = -1;
        let mut len = size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: SO_INCOMING_CPU writes one int and its length to valid pointers.
        let rc = unsafe {
            libc::getsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_INCOMING_CPU,
                (&mut cpu as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        assert_eq!((rc, cpu), (0, 1));
    }
}
