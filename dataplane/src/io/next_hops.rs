//! An uplink's next hops, as the kernel's own tables give them: a thread reads the
//! kernel's routes to the peers and its neighbour table over netlink every [`REFRESH`], and
//! at once when a worker asks or the kernel says an entry on the device became usable (it
//! listens to the neighbour table's changes, as `ip monitor neigh` does), and marks the
//! entries it uses "in use" (`NTF_USE`) when the kernel has not confirmed them lately, so
//! that the kernel resolves and re-probes them as if its own packets went there; the
//! dataplane never sends or answers ARP itself. For the node's exit it also reads the main
//! table's routes through the device and every resolved neighbour on it.

use super::netlink::{MainRoute, Neighbour, NeighbourEvents, Netlink};
use crate::tables::lpm::Lpm;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use switchyard_api::MacAddr;

/// How often the next hops are read again from the kernel's tables (besides when a
/// worker asks and when the kernel resolves a neighbour on the device).
pub const REFRESH: Duration = Duration::from_millis(500);

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
    /// The routes as read (sorted by the reader), to rebuild only when they change.
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

/// What the reader publishes: the next hops' MACs.
#[derive(Default)]
struct Hops {
    /// By peer node.
    peers: HashMap<Ipv4Addr, MacAddr>,
    /// The main table's routes (exits only).
    exits: Arc<ExitRoutes>,
    /// The device's resolved neighbours (exits only).
    neighbours: HashMap<Ipv4Addr, MacAddr>,
}

/// The next hops of one device, kept current by a thread of their own (stopped on drop).
pub struct NextHops {
    /// The MACs, as the kernel resolved them.
    hops: Arc<ArcSwap<Hops>>,
    /// The last exit next hop a worker found unresolved (an IPv4 address as an integer, 0
    /// for none), for the reader to have the kernel resolve.
    missing: Arc<AtomicU32>,
    /// Has the reader read the tables again now.
    waker: Arc<mio::Waker>,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl NextHops {
    /// Starts reading, with `netlink` (opened in the device's namespace), the next hops on
    /// interface `index` toward the addresses `peers` holds; with `exits`, also the main
    /// table's routes through the device and its resolved neighbours ([`Self::exit`]).
    pub fn start(
        mut netlink: Netlink,
        index: u32,
        peers: Arc<ArcSwap<Vec<Ipv4Addr>>>,
        exits: bool,
    ) -> io::Result<Self> {
        let hops = Arc::new(ArcSwap::from_pointee(Hops::default()));
        let missing = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut wait = ReaderWait::open()?;
        let waker = wait.waker.clone();
        let reader = std::thread::Builder::new()
            .name("sy-uplink-nh".into())
            .spawn({
                let (hops, stop, missing) = (hops.clone(), stop.clone(), missing.clone());
                move || {
                    let mut resolver = Resolver {
                        exits,
                        ..Resolver::default()
                    };
                    while !stop.load(Ordering::Relaxed) {
                        let wanted = Ipv4Addr::from(missing.swap(0, Ordering::Relaxed));
                        let wanted = (!wanted.is_unspecified()).then_some(wanted);
                        match resolver.resolve(&mut netlink, index, &peers.load(), wanted) {
                            Ok(found) => hops.store(Arc::new(found)),
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
            hops,
            missing,
            waker,
            stop,
            reader: Some(reader),
        })
    }

    /// Reads the next hops again now (after the peers changed).
    pub fn refresh(&self) {
        if let Err(e) = self.waker.wake() {
            tracing::warn!("uplink: cannot wake the next hops' reader: {e}");
        }
    }

    /// Stops reading and forgets every next hop (the thread ends with the value).
    pub fn forget(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.refresh();
        self.hops.store(Arc::new(Hops::default()));
    }

    /// The MAC of the next hop toward `peer`, once the kernel has resolved it.
    pub fn peer(&self, peer: Ipv4Addr) -> Option<MacAddr> {
        self.hops.load().peers.get(&peer).copied()
    }

    /// The MAC of the next hop toward `dst`, a destination outside the cluster, when the
    /// kernel's main table sends it through the device and the kernel has resolved that
    /// hop. A hop not resolved is handed to the reader, which asks the kernel to resolve
    /// it and reads it again as soon as the kernel has.
    pub fn exit(&self, dst: Ipv4Addr) -> Option<MacAddr> {
        let hops = self.hops.load();
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
}

impl Drop for NextHops {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.refresh();
        if let Some(thread) = self.reader.take() {
            let _ = thread.join();
        }
    }
}

/// What the reader waits on between two readings: a worker's call ([`NextHops::refresh`], [`NextHops::exit`])
/// and the kernel's neighbour table changes.
struct ReaderWait {
    poll: mio::Poll,
    events: mio::Events,
    waker: Arc<mio::Waker>,
    neighbours: NeighbourEvents,
}

const WOKEN: mio::Token = mio::Token(0);
const NEIGHBOURS: mio::Token = mio::Token(1);

impl ReaderWait {
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

/// What the reader knows of the way to each peer, and out of the node.
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
    use crate::io::netlink::KernelRoute;

    fn route(oif: u32, gateway: Option<Ipv4Addr>) -> Option<KernelRoute> {
        Some(KernelRoute {
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
