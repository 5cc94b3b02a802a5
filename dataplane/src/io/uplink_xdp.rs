//! The uplink's AF_XDP path (`--uplink-mode afxdp`): AF_XDP sockets on the device that
//! holds the node's underlay address, behind an XDP program that hands them only the VXLAN
//! datagrams addressed to the node's address and port ([`Filter::Vxlan`]), or under direct
//! routing only the IPv4 packets to the node's pod CIDR ([`Filter::PodCidr`]); everything
//! else the device receives stays the kernel's. Frames to other nodes leave through the
//! same sockets with headers built by the dataplane ([`crate::offload::outer`]).
//!
//! The next hop's MAC comes from the kernel's own tables: a thread reads the kernel's
//! routes to the peers and its neighbour table over netlink every [`REFRESH`], and at once
//! when the kernel says an entry on the device became usable (it listens to the neighbour
//! table's changes, as `ip monitor neigh` does), and marks the entries it uses "in use"
//! (`NTF_USE`) when the kernel has not confirmed them lately, so that the kernel resolves
//! and re-probes them as if its own packets went there; the dataplane never sends or
//! answers ARP itself. A peer whose next hop the kernel has not
//! resolved yet, or that it reaches through another device, is sent to through the
//! uplink's sockets ([`super::uplink`]), which makes the kernel resolve it.
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

use super::netlink::{MainRoute, Neighbour, NeighbourEvents, Netlink};
use super::xdp::{Filter, XdpRedirect};
use super::xsk::{frame_size_for, XskSocket};
use super::{links, netns};
use crate::tables::lpm::Lpm;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use switchyard_api::MacAddr;

/// How often the next hops are read again from the kernel's tables (besides when a
/// worker asks and when the kernel resolves a neighbour on the device).
pub const REFRESH: Duration = Duration::from_millis(500);

/// Frames one worker moved through the AF_XDP sockets, on a cache line of its own.
#[derive(Default)]
#[repr(align(64))]
struct Moved {
    received: AtomicU64,
    sent: AtomicU64,
}

/// How a destination outside the cluster leaves, by the kernel's main table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Through another interface, or a route the kernel keeps to itself (blackhole,
    /// unreachable, several next hops).
    Kernel,
    /// Through the device, to this router.
    Gateway(Ipv4Addr),
    /// Through the device, to the destination itself.
    OnLink,
}

/// The main table's IPv4 routes as the exits see them: an LPM whose values index `via`.
#[derive(Default)]
struct ExitRoutes {
    routes: Lpm<u32>,
    via: Vec<Via>,
    /// The routes as read (sorted by the refresher), to rebuild only when they change.
    read: Vec<((Ipv4Addr, u8), Via)>,
}

impl ExitRoutes {
    fn build(read: Vec<((Ipv4Addr, u8), Via)>) -> Self {
        let mut via = vec![Via::Kernel];
        let mut routes = Vec::with_capacity(read.len());
        for &((net, len), v) in &read {
            via.push(v);
            routes.push((u32::from(net), len, via.len() as u32 - 1));
        }
        Self {
            routes: Lpm::build(routes).unwrap_or_default(),
            via,
            read,
        }
    }

    fn via(&self, dst: Ipv4Addr) -> Via {
        let at = self.routes.lookup(u32::from(dst)) as usize;
        self.via.get(at).copied().unwrap_or(Via::Kernel)
    }
}

/// What the refresher publishes: the next hops' MACs.
#[derive(Default)]
struct Hops {
    /// By peer node.
    peers: HashMap<Ipv4Addr, MacAddr>,
    /// The main table's routes (exits only).
    exits: Arc<ExitRoutes>,
    /// The device's resolved neighbours (exits only).
    neighbours: HashMap<Ipv4Addr, MacAddr>,
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
    next_hops: Arc<ArcSwap<Hops>>,
    /// Whether packets leaving the node with its address go out here ([`XdpPath::exit_hop`]).
    exits: bool,
    /// The last exit next hop a worker found unresolved (an IPv4 address as an integer, 0
    /// for none), for the refresher to have the kernel resolve.
    missing: Arc<AtomicU32>,
    /// Has the refresher read the tables again now.
    waker: Arc<mio::Waker>,
    stop: Arc<AtomicBool>,
    refresher: Option<JoinHandle<()>>,
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
        let next_hops = Arc::new(ArcSwap::from_pointee(Hops::default()));
        let exits = published.is_some();
        let missing = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut wait = RefresherWait::open()?;
        let waker = wait.waker.clone();
        let refresher = std::thread::Builder::new()
            .name("sy-uplink-nh".into())
            .spawn({
                let (next_hops, stop) = (next_hops.clone(), stop.clone());
                let missing = missing.clone();
                move || {
                    let mut resolver = Resolver {
                        exits,
                        ..Resolver::default()
                    };
                    while !stop.load(Ordering::Relaxed) {
                        let wanted = Ipv4Addr::from(missing.swap(0, Ordering::Relaxed));
                        let wanted = (!wanted.is_unspecified()).then_some(wanted);
                        match resolver.resolve(&mut netlink, index, &peers.load(), wanted) {
                            Ok(found) => next_hops.store(Arc::new(found)),
                            Err(e) => tracing::warn!("uplink: cannot read next hops: {e}"),
                        }
                        if let Err(e) = wait.until_due(index, REFRESH) {
                            tracing::warn!("uplink: cannot hear neighbour changes: {e}");
                            std::thread::sleep(REFRESH);
                        }
                    }
                }
            })?;
        Ok(Self {
            moved: (0..queues).map(|_| Moved::default()).collect(),
            sockets: sockets.into_iter().map(|s| Mutex::new(Some(s))).collect(),
            fds,
            mac,
            next_hops,
            exits,
            missing,
            waker,
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
        self.refresh();
        self.next_hops.store(Arc::new(Hops::default()));
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
        if let Err(e) = self.waker.wake() {
            tracing::warn!("uplink: cannot wake the next hops' reader: {e}");
        }
    }

    /// The MAC of the next hop toward `peer`, once the kernel has resolved it.
    pub fn next_hop(&self, peer: Ipv4Addr) -> Option<MacAddr> {
        self.next_hops.load().peers.get(&peer).copied()
    }

    /// Whether this path is the exit of packets leaving the node with its address
    /// (opened with `published`).
    pub fn is_exit(&self) -> bool {
        self.exits
    }

    /// The MAC of the next hop toward `dst`, a destination outside the cluster, when the
    /// kernel's main table sends it through this device and the kernel has resolved that
    /// hop; `None` sends it through the node's stack. A hop not resolved is handed to the
    /// refresher, which asks the kernel to resolve it and reads it again soon after.
    pub fn exit_hop(&self, dst: Ipv4Addr) -> Option<MacAddr> {
        let hops = self.next_hops.load();
        let hop = match hops.exits.via(dst) {
            Via::Kernel => return None,
            Via::Gateway(gateway) => gateway,
            Via::OnLink => dst,
        };
        let mac = hops.neighbours.get(&hop).copied();
        if mac.is_none() && self.missing.swap(u32::from(hop), Ordering::Relaxed) != u32::from(hop) {
            self.refresh();
        }
        mac
    }

    /// Has the kernel resolve the next hop toward `client`, which just opened a connection
    /// to the node from outside the cluster, so that the answers find it known: the first
    /// answers of a flow whose hop is unknown go through the node's stack.
    pub fn expect_answers_to(&self, client: Ipv4Addr) {
        // Only the lookup's side effect is wanted: a missing hop is handed to the refresher.
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

impl Drop for XdpPath {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.refresh();
        if let Some(thread) = self.refresher.take() {
            let _ = thread.join();
        }
    }
}

/// What the refresher waits on between two readings: a worker's call ([`XdpPath::refresh`])
/// and the kernel's neighbour table changes.
struct RefresherWait {
    poll: mio::Poll,
    events: mio::Events,
    waker: Arc<mio::Waker>,
    neighbours: NeighbourEvents,
}

const WOKEN: mio::Token = mio::Token(0);
const NEIGHBOURS: mio::Token = mio::Token(1);

impl RefresherWait {
    /// Opens the wait, in the calling thread's namespace.
    fn open() -> io::Result<Self> {
        let poll = mio::Poll::new()?;
        let waker = Arc::new(mio::Waker::new(poll.registry(), WOKEN)?);
        let neighbours = NeighbourEvents::open()?;
        poll.registry().register(
            &mut mio::unix::SourceFd(&neighbours.raw_fd()),
            NEIGHBOURS,
            mio::Interest::READABLE,
        )?;
        Ok(Self {
            poll,
            events: mio::Events::with_capacity(4),
            waker,
            neighbours,
        })
    }

    /// Returns after `timeout`, or sooner when woken or when an entry on interface `index`
    /// became usable (the kernel resolved a next hop a worker may be waiting for).
    fn until_due(&mut self, index: u32, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            match self.poll.poll(&mut self.events, Some(left)) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => other?,
            }
            let mut due = false;
            for event in &self.events {
                match event.token() {
                    NEIGHBOURS => due |= self.neighbours.drain(index)?,
                    _ => due = true,
                }
            }
            if due {
                return Ok(());
            }
        }
    }
}

/// What the refresher knows of the way to each peer, and out of the node.
#[derive(Default)]
struct Resolver {
    /// The next hop toward each peer the kernel reaches through the device (the gateway,
    /// or the peer itself on the link), from its routes.
    hops: HashMap<Ipv4Addr, Ipv4Addr>,
    /// Whether the main table's routes are read for the exits.
    exits: bool,
    /// The main table's routes, as last read.
    exit_routes: Arc<ExitRoutes>,
    /// Refreshes until the routes are read again.
    routes_due: u32,
}

/// Routes are read again every this many refreshes (and for a new peer at once).
const ROUTES_EVERY: u32 = 10;

impl Resolver {
    /// The next hops' MACs for every peer the kernel reaches through interface `index`
    /// and has resolved (and, for the exits, the routes and every resolved neighbour on
    /// it). Next hops the kernel has not confirmed lately (missing or stale peers' hops,
    /// stale gateways, the exit hop a worker found `wanted`) are marked in use, so that the kernel resolves or probes them as
    /// its own sends would: the dataplane's frames do not pass through its neighbour
    /// table.
    fn resolve(
        &mut self,
        netlink: &mut Netlink,
        index: u32,
        peers: &[Ipv4Addr],
        wanted: Option<Ipv4Addr>,
    ) -> io::Result<Hops> {
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
            if self.exits {
                let mut read = exit_routes(netlink.main_routes_v4()?, index);
                read.sort_unstable_by_key(|&((net, len), _)| (net, len));
                if read != self.exit_routes.read {
                    self.exit_routes = Arc::new(ExitRoutes::build(read));
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
        let mut out = Hops {
            peers: HashMap::with_capacity(peers.len()),
            ..Hops::default()
        };
        let mut nudged = std::collections::HashSet::new();
        for &peer in peers {
            let Some(&hop) = self.hops.get(&peer) else {
                continue;
            };
            let known = neighbours.get(&hop);
            if let Some(n) = known {
                out.peers.insert(peer, n.mac);
            }
            if !known.is_some_and(|n| n.confirmed) && nudged.insert(hop) {
                netlink.use_neighbour(index, hop)?;
            }
        }
        if self.exits {
            // A hop a worker found missing is resolved; gateways the kernel resolved once
            // are kept confirmed.
            if let Some(hop) = wanted.filter(|h| !neighbours.contains_key(h)) {
                if nudged.insert(hop) {
                    netlink.use_neighbour(index, hop)?;
                }
            }
            for via in &self.exit_routes.via {
                if let Via::Gateway(gateway) = via {
                    let stale = neighbours.get(gateway).is_some_and(|n| !n.confirmed);
                    if stale && nudged.insert(*gateway) {
                        netlink.use_neighbour(index, *gateway)?;
                    }
                }
            }
            out.exits = self.exit_routes.clone();
            out.neighbours = neighbours.into_iter().map(|(ip, n)| (ip, n.mac)).collect();
        }
        Ok(out)
    }
}

/// The main table's routes `read` as exits through interface `index`.
fn exit_routes(read: Vec<MainRoute>, index: u32) -> Vec<((Ipv4Addr, u8), Via)> {
    read.into_iter()
        .map(|(net, route)| {
            let via = match route {
                Some(r) if r.oif == index => match r.gateway {
                    Some(IpAddr::V4(gateway)) => Via::Gateway(gateway),
                    Some(IpAddr::V6(_)) => Via::Kernel,
                    None => Via::OnLink,
                },
                _ => Via::Kernel,
            };
            (net, via)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(oif: u32, gateway: Option<Ipv4Addr>) -> Option<super::super::netlink::KernelRoute> {
        Some(super::super::netlink::KernelRoute {
            dst: switchyard_api::IpNet::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0).unwrap(),
            oif,
            gateway: gateway.map(IpAddr::V4),
            src: None,
            table: 254,
        })
    }

    #[test]
    fn exits_follow_the_longest_route_and_leave_other_devices_to_the_kernel() {
        let gw = Ipv4Addr::new(192, 168, 1, 1);
        let read = vec![
            ((Ipv4Addr::UNSPECIFIED, 0), route(2, Some(gw))),
            ((Ipv4Addr::new(192, 168, 1, 0), 24), route(2, None)),
            ((Ipv4Addr::new(192, 168, 2, 0), 24), route(3, None)),
            ((Ipv4Addr::new(192, 168, 2, 128), 25), route(2, Some(gw))),
            ((Ipv4Addr::new(203, 0, 113, 0), 24), None),
        ];
        let exits = ExitRoutes::build(exit_routes(read, 2));
        assert_eq!(exits.via(Ipv4Addr::new(8, 8, 8, 8)), Via::Gateway(gw));
        assert_eq!(exits.via(Ipv4Addr::new(192, 168, 1, 7)), Via::OnLink);
        assert_eq!(exits.via(Ipv4Addr::new(192, 168, 2, 7)), Via::Kernel);
        assert_eq!(exits.via(Ipv4Addr::new(192, 168, 2, 200)), Via::Gateway(gw));
        assert_eq!(
            exits.via(Ipv4Addr::new(203, 0, 113, 9)),
            Via::Kernel,
            "a blackhole is the kernel's"
        );
        let none = ExitRoutes::build(Vec::new());
        assert_eq!(none.via(Ipv4Addr::new(8, 8, 8, 8)), Via::Kernel);
    }
}
