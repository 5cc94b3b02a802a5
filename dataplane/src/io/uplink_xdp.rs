//! The uplink's AF_XDP path (`--uplink-mode afxdp`): AF_XDP sockets on the device that
//! holds the node's underlay address, behind an XDP program that hands them only the VXLAN
//! datagrams addressed to the node's address and port ([`Filter::Vxlan`]), or under direct
//! routing only the IPv4 packets to the node's pod CIDR ([`Filter::PodCidr`]); everything
//! else the device receives stays the kernel's. Frames to other nodes leave through the
//! same sockets with headers built by the dataplane ([`crate::offload::outer`]).
//!
//! The next hop's MAC comes from the kernel's own tables: a thread reads the kernel's
//! routes to the peers and its neighbour table over netlink every [`REFRESH`], and marks
//! the entries it uses "in use" (`NTF_USE`) when the kernel has not confirmed them lately,
//! so that the kernel resolves and re-probes them as if its own packets went there; the
//! dataplane never sends or answers ARP itself. A peer whose next hop the kernel has not
//! resolved yet, or that it reaches through another device, is sent to through the
//! uplink's sockets ([`super::uplink`]), which makes the kernel resolve it. The program
//! goes with this value (a BPF link), so a stopped or crashed dataplane leaves nothing on
//! the device.

use super::netlink::{Neighbour, Netlink};
use super::xdp::{Filter, XdpRedirect};
use super::xsk::{frame_size_for, XskSocket};
use super::{links, netns};
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
use switchyard_api::MacAddr;

/// How often the next hops are read again from the kernel's tables.
pub const REFRESH: Duration = Duration::from_millis(500);

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
    /// Next hops' MACs by peer, as the kernel resolved them.
    next_hops: Arc<ArcSwap<HashMap<Ipv4Addr, MacAddr>>>,
    stop: Arc<AtomicBool>,
    refresher: Option<JoinHandle<()>>,
    // Dropped after the sockets: the program then finds no socket and goes with its link.
    redirect: XdpRedirect,
}

impl XdpPath {
    /// Attaches to the device holding `local` (in the caller's namespace) for the frames
    /// `filter` names, with up to `queues` sockets (fewer when the device has fewer
    /// queues), and starts reading next hops for the addresses `peers` holds.
    pub fn open(
        local: Ipv4Addr,
        filter: Filter,
        queues: usize,
        peers: Arc<ArcSwap<Vec<Ipv4Addr>>>,
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
        let redirect = XdpRedirect::attach(index, queues as u32, filter).map_err(|e| {
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
            match XskSocket::bind(index, queue, frame_size) {
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
        let next_hops = Arc::new(ArcSwap::from_pointee(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let refresher = std::thread::Builder::new()
            .name("sy-uplink-nh".into())
            .spawn({
                let (next_hops, stop) = (next_hops.clone(), stop.clone());
                move || {
                    let mut resolver = Resolver::default();
                    while !stop.load(Ordering::Relaxed) {
                        match resolver.resolve(&mut netlink, index, &peers.load()) {
                            Ok(found) => next_hops.store(Arc::new(found)),
                            Err(e) => tracing::warn!("uplink: cannot read next hops: {e}"),
                        }
                        std::thread::park_timeout(REFRESH);
                    }
                }
            })?;
        Ok(Self {
            moved: (0..queues).map(|_| Moved::default()).collect(),
            sockets: sockets.into_iter().map(|s| Mutex::new(Some(s))).collect(),
            fds,
            mac,
            next_hops,
            stop,
            refresher: Some(refresher),
            redirect,
        })
    }

    /// Takes the program off the device and closes the sockets now (for an uplink that
    /// replaces this one on the same device: only one program fits a device, one socket a
    /// queue). What the program took goes to the kernel again, and no next hop is known
    /// any more, so frames leave through the uplink's other sockets until it goes.
    pub fn detach(&self) -> io::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = &self.refresher {
            thread.thread().unpark();
        }
        self.next_hops.store(Arc::new(HashMap::new()));
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
        if let Some(thread) = &self.refresher {
            thread.thread().unpark();
        }
    }

    /// The MAC of the next hop toward `peer`, once the kernel has resolved it.
    pub fn next_hop(&self, peer: Ipv4Addr) -> Option<MacAddr> {
        self.next_hops.load().get(&peer).copied()
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

impl Drop for XdpPath {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.refresher.take() {
            thread.thread().unpark();
            let _ = thread.join();
        }
    }
}

/// What the refresher knows of the way to each peer.
#[derive(Default)]
struct Resolver {
    /// The next hop toward each peer the kernel reaches through the device (the gateway,
    /// or the peer itself on the link), from its routes.
    hops: HashMap<Ipv4Addr, Ipv4Addr>,
    /// Refreshes until the routes are read again.
    routes_due: u32,
}

/// Routes are read again every this many refreshes (and for a new peer at once).
const ROUTES_EVERY: u32 = 10;

impl Resolver {
    /// The next hop's MAC for every peer the kernel reaches through interface `index` and
    /// has resolved. Next hops the kernel has not confirmed lately (missing, stale) are
    /// marked in use, so that the kernel resolves or probes them as its own sends would:
    /// the dataplane's frames do not pass through its neighbour table.
    fn resolve(
        &mut self,
        netlink: &mut Netlink,
        index: u32,
        peers: &[Ipv4Addr],
    ) -> io::Result<HashMap<Ipv4Addr, MacAddr>> {
        let stale_routes = self.routes_due == 0 || peers.iter().any(|p| !self.hops.contains_key(p));
        if stale_routes {
            self.hops.clear();
            for &peer in peers {
                match netlink.route_to(peer)? {
                    Some(route) if route.oif == index => {
                        let hop = match route.gateway {
                            Some(IpAddr::V4(gateway)) => gateway,
                            _ => peer,
                        };
                        self.hops.insert(peer, hop);
                    }
                    _ => {}
                }
            }
            self.routes_due = ROUTES_EVERY;
        }
        self.routes_due -= 1;
        let neighbours: HashMap<Ipv4Addr, Neighbour> = netlink
            .neighbours(index)?
            .into_iter()
            .map(|n| (n.ip, n))
            .collect();
        let mut out = HashMap::with_capacity(peers.len());
        let mut nudged = std::collections::HashSet::new();
        for &peer in peers {
            let Some(&hop) = self.hops.get(&peer) else {
                continue;
            };
            let known = neighbours.get(&hop);
            if let Some(n) = known {
                out.insert(peer, n.mac);
            }
            if !known.is_some_and(|n| n.confirmed) && nudged.insert(hop) {
                netlink.use_neighbour(index, hop)?;
            }
        }
        Ok(out)
    }
}
