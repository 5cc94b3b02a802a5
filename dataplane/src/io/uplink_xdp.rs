//! The uplink's AF_XDP path (`--uplink-mode afxdp`): AF_XDP sockets on the device that
//! holds the node's underlay address, behind an XDP program that hands them only the VXLAN
//! datagrams addressed to the node's address and port ([`Filter::Vxlan`]), or under direct
//! routing only the IPv4 packets to the node's pod CIDR ([`Filter::PodCidr`]); everything
//! else the device receives stays the kernel's. Frames to other nodes leave through the
//! same sockets with headers built by the dataplane ([`crate::offload::outer`]).
//!
//! The next hops' MACs come from the kernel's own tables ([`super::next_hops`]). A peer
//! whose next hop the kernel has not resolved yet, or that it reaches through another
//! device, is sent to through the uplink's sockets ([`super::uplink`]), which makes the
//! kernel resolve it.
//!
//! With `published` set, the program also takes what comes back to the node's address for
//! the dataplane (ICMP, and TCP and UDP to the ports [`XdpPath::publish`] lists: the
//! masquerade range and the ports published to pods), and packets that leave the node with
//! its address (masqueraded, or answering a published port) go out through the sockets
//! too, to the next hop the kernel's main table and neighbour table give
//! ([`XdpPath::exit_hop`]). Both halves of such a flow then pass the dataplane and neither
//! passes the kernel, whose connection tracking and firewall never see half a flow. A
//! destination whose next hop is unknown, or that the kernel reaches otherwise, goes
//! through the node's stack as before.
//!
//! The program goes with this value (a BPF link), so a stopped or crashed dataplane leaves
//! nothing on the device.

use super::netlink::Netlink;
use super::next_hops::NextHops;
use super::xdp::{Filter, XdpRedirect};
use super::xsk::{frame_size_for, XskSocket, UPLINK_RX_RING};
use super::{links, netns};
use arc_swap::ArcSwap;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use switchyard_api::MacAddr;

/// Frames one worker moved through the AF_XDP sockets, on a cache line of its own.
#[derive(Default)]
#[repr(align(64))]
struct Moved {
    received: AtomicU64,
    sent: AtomicU64,
}

/// The AF_XDP sockets of an uplink, their program and the next hops.
pub struct XdpPath {
    /// Frames moved, by worker.
    moved: Vec<Moved>,
    /// One socket per device queue that has one; worker `i` takes socket `i` (modulo).
    /// Taken out (closed) by [`XdpPath::detach`].
    sockets: Vec<Mutex<Option<XskSocket>>>,
    fds: Vec<RawFd>,
    /// The device's MAC.
    mac: MacAddr,
    /// Next hops' MACs, as the kernel resolved them.
    next_hops: NextHops,
    /// Whether packets leaving the node with its address go out here ([`XdpPath::exit_hop`]).
    exits: bool,
    // Dropped after the sockets: the program then finds no socket and goes with its link.
    redirect: XdpRedirect,
}

impl XdpPath {
    /// Attaches to the device holding `local` (in the caller's namespace) for the frames
    /// `filter` names, with up to `queues` sockets (fewer when the device has fewer
    /// queues), and starts reading next hops for the addresses `peers` holds. With
    /// `published`, it also takes what comes back to `local` for the dataplane and is
    /// the exit of packets leaving the node with its address (see the module's doc).
    pub fn open(
        local: Ipv4Addr,
        filter: Filter,
        queues: usize,
        peers: Arc<ArcSwap<Vec<Ipv4Addr>>>,
        published: bool,
    ) -> io::Result<Self> {
        let owner = links::owner_of(IpAddr::V4(local))?.ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no interface holds {local}: nothing to attach the AF_XDP uplink to"),
            )
        })?;
        let ifname = owner.ifname;
        let index = netns::link_index(&ifname)
            .ok_or_else(|| io::Error::other(format!("{ifname} vanished")))?;
        let mut netlink = Netlink::open()?;
        let mac = netlink
            .link_mac(index)?
            .ok_or_else(|| io::Error::other(format!("{ifname} has no MAC address")))?;
        let frame_size = frame_size_for(links::mtu(&ifname)?);
        let queues = queues.max(1);
        let published = published.then_some(local);
        let redirect =
            XdpRedirect::attach(index, queues as u32, filter, published).map_err(|e| {
                let hint = match e.raw_os_error() {
                    Some(libc::EBUSY | libc::EEXIST) => format!(
                        " (another XDP program is on {ifname}, see `ip link show {ifname}`: \
                         only one fits; use --uplink-mode sockets)"
                    ),
                    _ => String::new(),
                };
                io::Error::new(
                    e.kind(),
                    format!("cannot attach the uplink's XDP program to {ifname}: {e}{hint}"),
                )
            })?;
        let mut sockets = Vec::new();
        for queue in 0..queues as u32 {
            match XskSocket::bind(index, queue, frame_size, UPLINK_RX_RING) {
                Ok(socket) => {
                    redirect.insert_socket(queue, socket.raw_fd())?;
                    sockets.push(socket);
                }
                // The device has fewer queues than workers.
                Err(e) if queue > 0 && e.raw_os_error() == Some(libc::EINVAL) => break,
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot bind an AF_XDP socket to {ifname} queue {queue}: {e}"),
                    ))
                }
            }
        }
        let fds = sockets.iter().map(XskSocket::raw_fd).collect();
        let exits = published.is_some();
        let next_hops = NextHops::start(netlink, index, peers, exits)?;
        Ok(Self {
            moved: (0..queues).map(|_| Moved::default()).collect(),
            sockets: sockets.into_iter().map(|s| Mutex::new(Some(s))).collect(),
            fds,
            mac,
            next_hops,
            exits,
            redirect,
        })
    }

    /// Takes the program off the device and closes the sockets now (for an uplink that
    /// replaces this one on the same device: only one program fits a device, one socket a
    /// queue). What the program took goes to the kernel again, and no next hop is known
    /// any more, so frames leave through the uplink's other sockets until it goes.
    pub fn detach(&self) -> io::Result<()> {
        self.next_hops.forget();
        let detached = self.redirect.detach();
        for socket in &self.sockets {
            socket.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        detached
    }

    /// The device's MAC (the source of every frame sent).
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// The socket worker `queue` polls, if there is one for it.
    pub fn raw_fd(&self, queue: usize) -> Option<RawFd> {
        self.fds.get(queue).copied()
    }

    /// Reads the next hops again now (after the peers changed).
    pub fn refresh(&self) {
        self.next_hops.refresh();
    }

    /// The MAC of the next hop toward `peer`, once the kernel has resolved it.
    pub fn next_hop(&self, peer: Ipv4Addr) -> Option<MacAddr> {
        self.next_hops.peer(peer)
    }

    /// Whether this path is the exit of packets leaving the node with its address
    /// (opened with `published`).
    pub fn is_exit(&self) -> bool {
        self.exits
    }

    /// The MAC of the next hop toward `dst`, a destination outside the cluster, when the
    /// kernel's main table sends it through this device and the kernel has resolved that
    /// hop; `None` sends it through the node's stack. A hop not resolved is handed to the
    /// next hops' reader, which asks the kernel to resolve it and reads it again once it has.
    pub fn exit_hop(&self, dst: Ipv4Addr) -> Option<MacAddr> {
        self.next_hops.exit(dst)
    }

    /// Has the kernel resolve the next hop toward `client`, which just opened a connection
    /// to the node from outside the cluster, so that the answers find it known: the first
    /// answers of a flow whose hop is unknown go through the node's stack.
    pub fn expect_answers_to(&self, client: Ipv4Addr) {
        // Only the lookup's side effect is wanted: a missing hop is handed to the next hops' reader.
        let _ = self.exit_hop(client);
    }

    /// Makes the program take TCP and UDP to exactly these (protocol, port) pairs of the
    /// node's address (a path opened without `published` takes none).
    pub fn publish(&self, ports: impl IntoIterator<Item = (u8, u16)>) -> io::Result<()> {
        self.redirect.publish(ports)
    }

    /// Runs `f` on worker `queue`'s socket, if it has one.
    fn with_socket<R>(&self, queue: usize, f: impl FnOnce(&mut XskSocket) -> R) -> Option<R> {
        // Only worker `queue` (modulo) locks it: uncontended unless the device has fewer
        // queues than there are workers.
        let socket = self.sockets.get(queue % self.sockets.len().max(1))?;
        let mut socket: MutexGuard<'_, Option<XskSocket>> =
            socket.lock().unwrap_or_else(|e| e.into_inner());
        socket.as_mut().map(f)
    }

    /// Hands up to `max` frames received on worker `queue`'s socket to `each`; returns
    /// how many.
    pub fn recv(&self, queue: usize, max: usize, mut each: impl FnMut(&[u8])) -> usize {
        if self.fds.get(queue).is_none() {
            return 0;
        }
        let n = self
            .with_socket(queue, |socket| {
                let mut n = 0;
                while n < max && socket.recv_with(&mut each).is_some() {
                    n += 1;
                }
                n
            })
            .unwrap_or(0);
        if n > 0 {
            self.moved(queue)
                .received
                .fetch_add(n as u64, Ordering::Relaxed);
        }
        n
    }

    fn moved(&self, queue: usize) -> &Moved {
        &self.moved[queue % self.moved.len()]
    }

    /// Frames received and sent through the AF_XDP sockets so far.
    pub fn frames(&self) -> (u64, u64) {
        self.moved.iter().fold((0, 0), |(r, s), m| {
            (
                r + m.received.load(Ordering::Relaxed),
                s + m.sent.load(Ordering::Relaxed),
            )
        })
    }

    /// Posts the concatenation of `parts` as one frame on worker `queue`'s socket; it
    /// leaves at the next [`XdpPath::flush`].
    pub fn post(&self, queue: usize, parts: &[&[u8]]) -> io::Result<()> {
        match self.with_socket(queue, |socket| socket.post_parts(parts)) {
            Some(posted) => {
                posted?;
                self.moved(queue).sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            None => Err(io::Error::other("no AF_XDP socket on the uplink")),
        }
    }

    /// Sends what worker `queue` posted.
    pub fn flush(&self, queue: usize) -> io::Result<()> {
        self.with_socket(queue, XskSocket::flush).unwrap_or(Ok(()))
    }
}
