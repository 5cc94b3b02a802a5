//! A minimal rtnetlink client: just what configuring a pod interface needs (link state,
//! MAC, MTU, addresses, routes, veth pairs). Synchronous; every request is acknowledged.
#![allow(unsafe_code)] // the rtnetlink socket's raw sends and receives

use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use switchyard_api::{IpNet, MacAddr};

const RTM_NEWLINK: u16 = libc::RTM_NEWLINK;
const RTM_DELLINK: u16 = libc::RTM_DELLINK;
const IFLA_IFNAME: u16 = libc::IFLA_IFNAME;
const IFLA_LINKINFO: u16 = libc::IFLA_LINKINFO;
const IFLA_INFO_KIND: u16 = libc::IFLA_INFO_KIND;
const IFLA_INFO_DATA: u16 = libc::IFLA_INFO_DATA;
const IFLA_NET_NS_FD: u16 = libc::IFLA_NET_NS_FD;
const IFLA_NUM_TX_QUEUES: u16 = libc::IFLA_NUM_TX_QUEUES;
const IFLA_NUM_RX_QUEUES: u16 = libc::IFLA_NUM_RX_QUEUES;
/// `VETH_INFO_PEER` (linux/veth.h), which libc does not define.
const VETH_INFO_PEER: u16 = 1;
const RTM_NEWADDR: u16 = libc::RTM_NEWADDR;
const RTM_NEWROUTE: u16 = libc::RTM_NEWROUTE;
const RTM_DELROUTE: u16 = libc::RTM_DELROUTE;
const RTM_NEWRULE: u16 = libc::RTM_NEWRULE;
const RTM_DELRULE: u16 = libc::RTM_DELRULE;
const RTM_GETRULE: u16 = libc::RTM_GETRULE;
const NLM_F_DUMP: u16 = libc::NLM_F_DUMP as u16;
const NLMSG_DONE: u16 = libc::NLMSG_DONE as u16;
// Rule attributes (linux/fib_rules.h), which libc does not define.
const FRA_DST: u16 = 1;
const FRA_IIFNAME: u16 = 3;
const FRA_PRIORITY: u16 = 6;
const FRA_TABLE: u16 = 15;
const FRA_IP_PROTO: u16 = 22;
const FRA_DPORT_RANGE: u16 = 24;
const FR_ACT_TO_TBL: u8 = 1;
/// The kernel's table of local addresses.
pub const RT_TABLE_LOCAL: u32 = libc::RT_TABLE_LOCAL as u32;
const NLM_F_REPLACE: u16 = libc::NLM_F_REPLACE as u16;
const NLM_F_REQUEST: u16 = libc::NLM_F_REQUEST as u16;
const NLM_F_ACK: u16 = libc::NLM_F_ACK as u16;
const NLM_F_EXCL: u16 = libc::NLM_F_EXCL as u16;
const NLM_F_CREATE: u16 = libc::NLM_F_CREATE as u16;
const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
const IFLA_ADDRESS: u16 = libc::IFLA_ADDRESS;
const IFLA_MTU: u16 = libc::IFLA_MTU;
const IFLA_GSO_MAX_SIZE: u16 = libc::IFLA_GSO_MAX_SIZE;
const IFA_ADDRESS: u16 = libc::IFA_ADDRESS;
const IFA_LOCAL: u16 = libc::IFA_LOCAL;
const IFA_F_NODAD: u8 = libc::IFA_F_NODAD as u8;
const RTA_DST: u16 = libc::RTA_DST;
const RTA_OIF: u16 = libc::RTA_OIF;
const RTA_GATEWAY: u16 = libc::RTA_GATEWAY;
const RTA_PREFSRC: u16 = libc::RTA_PREFSRC;
const RT_TABLE_MAIN: u8 = libc::RT_TABLE_MAIN;
const RTPROT_STATIC: u8 = libc::RTPROT_STATIC;
const RTM_GETROUTE: u16 = libc::RTM_GETROUTE;
const RTA_TABLE: u16 = libc::RTA_TABLE;
const RTM_GETLINK: u16 = libc::RTM_GETLINK;
const RTM_GETNEIGH: u16 = libc::RTM_GETNEIGH;
const RTM_NEWNEIGH: u16 = libc::RTM_NEWNEIGH;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
/// Neighbour states whose address may be used: reachable, stale, delay, probe, no ARP,
/// permanent.
const NUD_USABLE: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;
/// Neighbour states the kernel holds confirmed: reachable, no ARP, permanent.
const NUD_CONFIRMED: u16 = 0x02 | 0x40 | 0x80;
/// `ndm_flags`: the entry is in use (resolve or confirm it).
const NTF_USE: u8 = 0x01;
/// The routing protocol number that marks the node routes Switchyard installs
/// (`ip route show proto 83`), so that an uninstall finds every one of them.
pub const RTPROT_SWITCHYARD: u8 = 83;
const RT_SCOPE_UNIVERSE: u8 = libc::RT_SCOPE_UNIVERSE;
const RT_SCOPE_LINK: u8 = libc::RT_SCOPE_LINK;
const RTN_UNICAST: u8 = libc::RTN_UNICAST;

/// A route in the main table, as [`Netlink::replace_route`] installs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KernelRoute {
    /// Destination prefix.
    pub dst: IpNet,
    /// Output interface index.
    pub oif: u32,
    /// Next-hop router; on-link when absent.
    pub gateway: Option<IpAddr>,
    /// Preferred source address of locally sent packets.
    pub src: Option<IpAddr>,
    /// Routing table (the main table: 254).
    pub table: u8,
}

/// An IPv4 route of the main table as [`Netlink::main_routes_v4`] reads it: its
/// destination (address, prefix length), and the route when it is unicast through one
/// interface.
pub type MainRoute = ((Ipv4Addr, u8), Option<KernelRoute>);

/// A policy routing rule (`ip rule`), IPv4: which packets look up which table.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KernelRule {
    /// Priority (lower first).
    pub priority: u32,
    /// Only packets that arrived on this interface.
    pub iif: Option<String>,
    /// Only this IP protocol.
    pub protocol: Option<u8>,
    /// Only these destination ports (inclusive).
    pub dports: Option<(u16, u16)>,
    /// Only packets to this address.
    pub dst: Option<Ipv4Addr>,
    /// The table to look up.
    pub table: u32,
}

/// A NETLINK_ROUTE socket in the namespace of the thread that opened it.
pub struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

struct Message(Vec<u8>);

impl Message {
    fn new(kind: u16, flags: u16, seq: u32) -> Self {
        let mut b = Vec::with_capacity(128);
        b.extend_from_slice(&0u32.to_ne_bytes()); // length, set in finish()
        b.extend_from_slice(&kind.to_ne_bytes());
        b.extend_from_slice(&(flags | NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        b.extend_from_slice(&seq.to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes());
        Self(b)
    }

    fn bytes(&mut self, data: &[u8]) -> &mut Self {
        self.0.extend_from_slice(data);
        self
    }

    fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let len = 4 + data.len();
        self.0.extend_from_slice(&(len as u16).to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
        self
    }

    /// A nested attribute: what `inner` writes becomes its payload.
    fn nest(&mut self, kind: u16, inner: impl FnOnce(&mut Self)) -> &mut Self {
        let start = self.0.len();
        self.attr(kind, &[]);
        inner(self);
        let len = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    /// A `struct ifinfomsg` for link `index` (0: a new link), with no flags changed.
    fn link_header(&mut self, index: u32) -> &mut Self {
        self.bytes(&[libc::AF_UNSPEC as u8, 0])
            .bytes(&0u16.to_ne_bytes())
            .bytes(&(index as i32).to_ne_bytes())
            .bytes(&0u32.to_ne_bytes())
            .bytes(&0u32.to_ne_bytes())
    }

    /// A link's name, MTU and queue counts (`queues` each way).
    fn link_attrs(&mut self, name: &str, mtu: u32, queues: u32) -> &mut Self {
        let mut cname = name.as_bytes().to_vec();
        cname.push(0);
        self.attr(IFLA_IFNAME, &cname)
            .attr(IFLA_MTU, &mtu.to_ne_bytes())
            .attr(IFLA_NUM_TX_QUEUES, &queues.to_ne_bytes())
            .attr(IFLA_NUM_RX_QUEUES, &queues.to_ne_bytes())
    }

    fn finish(&mut self) -> &[u8] {
        let len = self.0.len() as u32;
        self.0[0..4].copy_from_slice(&len.to_ne_bytes());
        &self.0
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        libc::AF_INET as u8
    } else {
        libc::AF_INET6 as u8
    }
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        Ok(Self {
            fd: route_socket(0)?,
            seq: 1,
        })
    }

    fn transact(&mut self, msg: Message) -> io::Result<()> {
        self.exchange(msg, |_, _| {})
    }

    /// Sends `msg` and reads the answers until its acknowledgement (or, for a dump, its
    /// end), handing each other message of the answer (type, payload) to `each`.
    fn exchange(&mut self, mut msg: Message, mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
        let bytes = msg.finish();
        // SAFETY: `bytes` is a valid buffer of `bytes.len()` bytes; the kernel's netlink
        // address is the zeroed sockaddr_nl that a null destination implies for a
        // connected-less netlink socket (send to the kernel).
        let sent =
            unsafe { libc::send(self.fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let mut buf = vec![0u8; 32768];
        loop {
            // SAFETY: `buf` is a writable buffer of the given length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            for message in messages(&buf[..n as usize]) {
                let (kind, msg_seq, payload) = message?;
                if msg_seq == seq {
                    match kind {
                        NLMSG_ERROR if payload.len() >= 4 => {
                            let code =
                                i32::from_ne_bytes(payload[..4].try_into().unwrap_or_default());
                            return if code == 0 {
                                Ok(())
                            } else {
                                Err(io::Error::from_raw_os_error(-code))
                            };
                        }
                        NLMSG_DONE => return Ok(()),
                        _ => each(kind, payload),
                    }
                }
            }
        }
    }

    /// Every IPv4 policy routing rule that looks up a table (`ip rule`).
    pub fn rules(&mut self) -> io::Result<Vec<KernelRule>> {
        let mut msg = Message::new(RTM_GETRULE, NLM_F_DUMP, self.seq);
        msg.bytes(&[libc::AF_INET as u8, 0, 0, 0, 0, 0, 0, 0])
            .bytes(&0u32.to_ne_bytes());
        let mut out = Vec::new();
        self.exchange(msg, |kind, payload| {
            if kind == RTM_NEWRULE {
                out.extend(parse_rule(payload));
            }
        })?;
        Ok(out)
    }

    /// The route the kernel would take to `dst` now (`ip route get`): its output
    /// interface and gateway; `None` for a local or unreachable destination.
    pub fn route_to(&mut self, dst: Ipv4Addr) -> io::Result<Option<KernelRoute>> {
        let mut msg = Message::new(RTM_GETROUTE, 0, self.seq);
        msg.bytes(&[libc::AF_INET as u8, 32, 0, 0, 0, 0, 0, 0])
            .bytes(&0u32.to_ne_bytes())
            .attr(RTA_DST, &dst.octets());
        let mut out = None;
        self.exchange(msg, |kind, payload| {
            if kind == RTM_NEWROUTE {
                out = parse_route(payload);
            }
        })?;
        Ok(out)
    }

    /// The usable entries (reachable, stale, being probed or permanent) of the kernel's
    /// IPv4 neighbour table on interface `index`: address, link-layer address, and whether
    /// the kernel holds it confirmed (reachable, permanent, no ARP).
    pub fn neighbours(&mut self, index: u32) -> io::Result<Vec<Neighbour>> {
        let mut msg = Message::new(RTM_GETNEIGH, NLM_F_DUMP, self.seq);
        // struct ndmsg: family, padding, ifindex, state, flags, type.
        msg.bytes(&[libc::AF_INET as u8, 0, 0, 0])
            .bytes(&(index as i32).to_ne_bytes())
            .bytes(&[0, 0, 0, 0]);
        let mut out = Vec::new();
        self.exchange(msg, |kind, payload| {
            if kind == RTM_NEWNEIGH {
                out.extend(parse_neighbour(payload, index));
            }
        })?;
        Ok(out)
    }

    /// Tells the kernel that its neighbour entry for `ip` on interface `index` is in use,
    /// as its own sends would (`ip neigh replace IP dev DEV use`): it creates the entry
    /// and resolves it when missing, and confirms a stale one with a probe.
    pub fn use_neighbour(&mut self, index: u32, ip: Ipv4Addr) -> io::Result<()> {
        let mut msg = Message::new(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, self.seq);
        msg.bytes(&[libc::AF_INET as u8, 0, 0, 0])
            .bytes(&(index as i32).to_ne_bytes())
            .bytes(&0u16.to_ne_bytes())
            .bytes(&[NTF_USE, 0])
            .attr(NDA_DST, &ip.octets());
        self.transact(msg)
    }

    /// Interface `index`'s link-layer address.
    pub fn link_mac(&mut self, index: u32) -> io::Result<Option<MacAddr>> {
        let mut msg = Message::new(RTM_GETLINK, 0, self.seq);
        msg.link_header(index);
        let mut out = None;
        self.exchange(msg, |kind, payload| {
            if kind == RTM_NEWLINK {
                out = attributes(payload.get(16..).unwrap_or_default())
                    .find(|(kind, _)| *kind == IFLA_ADDRESS)
                    .and_then(|(_, data)| Some(MacAddr(data.get(..6)?.try_into().ok()?)));
            }
        })?;
        Ok(out)
    }

    /// Creates a veth pair: `host` in this socket's namespace and `pod` (with MAC
    /// `pod_mac`) in the namespace open at `pod_netns`, both with `mtu` and `queues` queues
    /// each way, both down. Fails with `EEXIST` when either name is taken.
    pub fn add_veth(
        &mut self,
        host: &str,
        pod: &str,
        pod_netns: std::os::fd::BorrowedFd<'_>,
        pod_mac: MacAddr,
        mtu: u32,
        queues: u32,
    ) -> io::Result<()> {
        let mut msg = Message::new(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, self.seq);
        msg.link_header(0).link_attrs(host, mtu, queues);
        msg.nest(IFLA_LINKINFO, |info| {
            info.attr(IFLA_INFO_KIND, b"veth\0");
            info.nest(IFLA_INFO_DATA, |data| {
                data.nest(VETH_INFO_PEER, |peer| {
                    peer.link_header(0)
                        .link_attrs(pod, mtu, queues)
                        .attr(IFLA_ADDRESS, &pod_mac.0)
                        .attr(IFLA_NET_NS_FD, &pod_netns.as_raw_fd().to_ne_bytes());
                });
            });
        });
        self.transact(msg)
    }

    /// Deletes link `index` (a veth takes its peer with it).
    pub fn delete_link(&mut self, index: u32) -> io::Result<()> {
        let mut msg = Message::new(RTM_DELLINK, 0, self.seq);
        msg.link_header(index);
        self.transact(msg)
    }

    /// Caps the size of the GSO super-frames the link's stack builds.
    pub fn set_gso_max_size(&mut self, index: u32, size: u32) -> io::Result<()> {
        let mut msg = Message::new(RTM_NEWLINK, 0, self.seq);
        msg.link_header(index)
            .attr(IFLA_GSO_MAX_SIZE, &size.to_ne_bytes());
        self.transact(msg)
    }

    /// Sets a link's MAC and MTU (when given) and brings it up.
    pub fn set_link(
        &mut self,
        index: u32,
        mac: Option<MacAddr>,
        mtu: Option<u32>,
    ) -> io::Result<()> {
        let mut msg = Message::new(RTM_NEWLINK, 0, self.seq);
        msg.bytes(&[libc::AF_UNSPEC as u8, 0])
            .bytes(&0u16.to_ne_bytes())
            .bytes(&(index as i32).to_ne_bytes())
            .bytes(&(libc::IFF_UP as u32).to_ne_bytes())
            .bytes(&(libc::IFF_UP as u32).to_ne_bytes());
        if let Some(mac) = mac {
            msg.attr(IFLA_ADDRESS, &mac.0);
        }
        if let Some(mtu) = mtu {
            msg.attr(IFLA_MTU, &mtu.to_ne_bytes());
        }
        self.transact(msg)
    }

    /// Adds an address (without duplicate address detection) to a link.
    pub fn add_address(&mut self, index: u32, net: IpNet) -> io::Result<()> {
        let ip = net.addr();
        let mut msg = Message::new(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, self.seq);
        msg.bytes(&[family(ip), net.prefix_len(), IFA_F_NODAD, RT_SCOPE_UNIVERSE])
            .bytes(&index.to_ne_bytes());
        if ip.is_ipv4() {
            msg.attr(IFA_LOCAL, &ip_bytes(ip));
        }
        msg.attr(IFA_ADDRESS, &ip_bytes(ip));
        self.transact(msg)
    }

    /// Adds a route out of `index`: through `gateway` when given, else on-link (a pod's
    /// own routes, inside its namespace).
    pub fn add_route(&mut self, index: u32, dst: IpNet, gateway: Option<IpAddr>) -> io::Result<()> {
        let route = KernelRoute {
            dst,
            oif: index,
            gateway,
            src: None,
            table: RT_TABLE_MAIN,
        };
        self.route_message(
            RTM_NEWROUTE,
            NLM_F_CREATE | NLM_F_EXCL,
            &route,
            RTPROT_STATIC,
        )
    }

    /// Installs the node route `route` (marked [`RTPROT_SWITCHYARD`]), replacing any route
    /// for the same destination.
    pub fn replace_route(&mut self, route: &KernelRoute) -> io::Result<()> {
        self.route_message(
            RTM_NEWROUTE,
            NLM_F_CREATE | NLM_F_REPLACE,
            route,
            RTPROT_SWITCHYARD,
        )
    }

    /// Removes `route` (whoever installed it).
    pub fn delete_route(&mut self, route: &KernelRoute) -> io::Result<()> {
        self.route_message(RTM_DELROUTE, 0, route, 0)
    }

    /// Every route of the namespace, both families and every table, installed with
    /// routing protocol `protocol`.
    pub fn routes_of(&mut self, protocol: u8) -> io::Result<Vec<KernelRoute>> {
        let mut msg = Message::new(RTM_GETROUTE, NLM_F_DUMP, self.seq);
        msg.bytes(&[libc::AF_UNSPEC as u8, 0, 0, 0, 0, 0, 0, 0])
            .bytes(&0u32.to_ne_bytes());
        let mut out = Vec::new();
        self.exchange(msg, |kind, payload| {
            if kind == RTM_NEWROUTE && payload.get(5) == Some(&protocol) {
                out.extend(parse_route(payload));
            }
        })?;
        Ok(out)
    }

    /// The IPv4 routes of the main table (destination, prefix length), each with its way
    /// out: `Some` for a unicast route through one interface (its gateway, if any), `None`
    /// for any other (blackhole, unreachable, prohibit, several next hops): traffic for
    /// those is the kernel's to decide.
    pub fn main_routes_v4(&mut self) -> io::Result<Vec<MainRoute>> {
        let mut msg = Message::new(RTM_GETROUTE, NLM_F_DUMP, self.seq);
        msg.bytes(&[libc::AF_INET as u8, 0, 0, 0, 0, 0, 0, 0])
            .bytes(&0u32.to_ne_bytes());
        let mut out = Vec::new();
        self.exchange(msg, |kind, payload| {
            if kind == RTM_NEWROUTE {
                out.extend(parse_main_route_v4(payload));
            }
        })?;
        Ok(out)
    }

    fn route_message(
        &mut self,
        kind: u16,
        flags: u16,
        route: &KernelRoute,
        protocol: u8,
    ) -> io::Result<()> {
        let mut msg = Message::new(kind, flags, self.seq);
        route_body(&mut msg, route, protocol);
        self.transact(msg)
    }

    /// Adds `rule`; one that exists already is left as it is.
    pub fn add_rule(&mut self, rule: &KernelRule) -> io::Result<()> {
        match self.rule_message(RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL, rule) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other,
        }
    }

    /// Removes `rule`; one that does not exist is no error.
    pub fn delete_rule(&mut self, rule: &KernelRule) -> io::Result<()> {
        match self.rule_message(RTM_DELRULE, 0, rule) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other,
        }
    }

    fn rule_message(&mut self, kind: u16, flags: u16, rule: &KernelRule) -> io::Result<()> {
        let mut msg = Message::new(kind, flags, self.seq);
        rule_body(&mut msg, rule);
        self.transact(msg)
    }
}

/// Writes `route` as a route message's payload, marked as installed by `protocol`.
fn route_body(msg: &mut Message, route: &KernelRoute, protocol: u8) {
    let scope = if route.gateway.is_some() {
        RT_SCOPE_UNIVERSE
    } else {
        RT_SCOPE_LINK
    };
    msg.bytes(&[
        family(route.dst.addr()),
        route.dst.prefix_len(),
        0,
        0,
        route.table,
        protocol,
        scope,
        RTN_UNICAST,
    ])
    .bytes(&0u32.to_ne_bytes());
    if route.dst.prefix_len() > 0 {
        msg.attr(RTA_DST, &ip_bytes(route.dst.addr()));
    }
    if let Some(gw) = route.gateway {
        msg.attr(RTA_GATEWAY, &ip_bytes(gw));
    }
    if let Some(src) = route.src {
        msg.attr(RTA_PREFSRC, &ip_bytes(src));
    }
    msg.attr(RTA_OIF, &route.oif.to_ne_bytes());
}

/// Writes `rule` as a rule message's payload.
fn rule_body(msg: &mut Message, rule: &KernelRule) {
    // struct fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action,
    // flags.
    let dst_len = if rule.dst.is_some() { 32 } else { 0 };
    msg.bytes(&[libc::AF_INET as u8, dst_len, 0, 0, 0, 0, 0, FR_ACT_TO_TBL])
        .bytes(&0u32.to_ne_bytes());
    if let Some(dst) = rule.dst {
        msg.attr(FRA_DST, &dst.octets());
    }
    msg.attr(FRA_PRIORITY, &rule.priority.to_ne_bytes());
    msg.attr(FRA_TABLE, &rule.table.to_ne_bytes());
    if let Some(iif) = &rule.iif {
        let mut name = iif.as_bytes().to_vec();
        name.push(0);
        msg.attr(FRA_IIFNAME, &name);
    }
    if let Some(protocol) = rule.protocol {
        msg.attr(FRA_IP_PROTO, &[protocol]);
    }
    if let Some((first, last)) = rule.dports {
        let mut range = first.to_ne_bytes().to_vec();
        range.extend_from_slice(&last.to_ne_bytes());
        msg.attr(FRA_DPORT_RANGE, &range);
    }
}

/// The route in a `RTM_NEWROUTE` payload (`struct rtmsg` and its attributes), if it is
/// a unicast route of a table [`KernelRoute`] can name.
fn parse_route(payload: &[u8]) -> Option<KernelRoute> {
    let header = payload.get(..12)?;
    let (family, dst_len, mut table) = (header[0], header[1], u32::from(header[4]));
    let v6 = family == libc::AF_INET6 as u8;
    if header[7] != RTN_UNICAST || !(v6 || family == libc::AF_INET as u8) {
        return None;
    }
    let addr = |d: &[u8]| -> Option<IpAddr> {
        if v6 {
            let octets: [u8; 16] = d.get(..16)?.try_into().ok()?;
            Some(IpAddr::from(octets))
        } else {
            let octets: [u8; 4] = d.get(..4)?.try_into().ok()?;
            Some(IpAddr::from(octets))
        }
    };
    let unspecified = if v6 {
        IpAddr::from([0u8; 16])
    } else {
        IpAddr::from([0u8; 4])
    };
    let (mut dst, mut gateway, mut src, mut oif) = (unspecified, None, None, 0);
    let mut rest = &payload[12..];
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]);
        let data = rest.get(4..len)?;
        match kind {
            RTA_DST => dst = addr(data)?,
            RTA_GATEWAY => gateway = addr(data),
            RTA_PREFSRC => src = addr(data),
            RTA_OIF => oif = u32::from_ne_bytes(data.get(..4)?.try_into().ok()?),
            RTA_TABLE => table = u32::from_ne_bytes(data.get(..4)?.try_into().ok()?),
            _ => {}
        }
        rest = rest
            .get(len.next_multiple_of(4).max(4)..)
            .unwrap_or_default();
    }
    Some(KernelRoute {
        dst: IpNet::new(dst, dst_len).ok()?,
        oif,
        gateway,
        src,
        table: u8::try_from(table).ok()?,
    })
}

/// An IPv4 route of the main table in a `RTM_NEWROUTE` payload: its destination, and the
/// route itself when it is unicast through one interface.
fn parse_main_route_v4(payload: &[u8]) -> Option<MainRoute> {
    let header = payload.get(..12)?;
    if header[0] != libc::AF_INET as u8 {
        return None;
    }
    let mut table = u32::from(header[4]);
    let mut dst = Ipv4Addr::UNSPECIFIED;
    for (kind, data) in attributes(&payload[12..]) {
        match kind {
            RTA_DST => dst = Ipv4Addr::from(<[u8; 4]>::try_from(data).ok()?),
            RTA_TABLE => table = u32::from_ne_bytes(data.get(..4)?.try_into().ok()?),
            _ => {}
        }
    }
    if table != u32::from(libc::RT_TABLE_MAIN) {
        return None;
    }
    let net = (dst, header[1].min(32));
    let route = parse_route(payload).filter(|r| r.oif != 0);
    Some((net, route))
}

/// The attributes (kind, data) in `data`, a sequence of `struct rtattr`.
fn attributes(mut data: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        let len = usize::from(u16::from_ne_bytes([*data.first()?, *data.get(1)?]));
        let kind = u16::from_ne_bytes([*data.get(2)?, *data.get(3)?]);
        let value = data.get(4..len)?;
        data = data
            .get(len.next_multiple_of(4).max(4)..)
            .unwrap_or_default();
        Some((kind, value))
    })
}

/// A NETLINK_ROUTE socket (close-on-exec, with `flags` such as `SOCK_NONBLOCK`) in the
/// calling thread's network namespace.
fn route_socket(flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call with constant arguments.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC | flags,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The netlink messages in `buf`, one datagram's worth: each message's type, sequence
/// number and payload; a truncated message ends them with an error.
fn messages(mut rest: &[u8]) -> impl Iterator<Item = io::Result<(u16, u32, &[u8])>> {
    std::iter::from_fn(move || {
        if rest.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap_or_default()) as usize;
        if len < 16 || len > rest.len() {
            rest = &[];
            return Some(Err(io::Error::other("truncated netlink message")));
        }
        let kind = u16::from_ne_bytes([rest[4], rest[5]]);
        let seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap_or_default());
        let payload = &rest[16..len];
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        Some(Ok((kind, seq, payload)))
    })
}

/// `RTMGRP_NEIGH`: the multicast group of the neighbour tables' changes.
const RTMGRP_NEIGH: u32 = 0x4;

/// A nonblocking NETLINK_ROUTE socket that hears every change of the kernel's neighbour
/// tables (`RTMGRP_NEIGH`), in the namespace of the thread that opened it: what `ip monitor
/// neigh` prints.
pub struct NeighbourEvents {
    fd: OwnedFd,
}

impl NeighbourEvents {
    /// Opens the socket and joins the group.
    pub fn open() -> io::Result<Self> {
        let fd = route_socket(libc::SOCK_NONBLOCK)?;
        // SAFETY: an all-zero sockaddr_nl is valid; the fields are set below.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups = RTMGRP_NEIGH;
        // SAFETY: `addr` is a valid sockaddr_nl and the length is its size.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if bound < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// The socket, to wait on until it is readable.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Reads every change waiting; returns whether one made an IPv4 entry on interface
    /// `index` usable (or changes were lost: the socket's buffer overran, and anything may
    /// have changed).
    pub fn drain(&mut self, index: u32) -> io::Result<bool> {
        let mut buf = [0u8; 8192];
        let mut usable = false;
        loop {
            // SAFETY: `buf` is a writable buffer of the given length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(usable),
                    Some(libc::ENOBUFS) => {
                        usable = true;
                        continue;
                    }
                    _ => Err(e),
                };
            }
            usable |= neighbour_became_usable(&buf[..n as usize], index);
        }
    }
}

/// Whether the datagram `buf` of neighbour table changes makes an IPv4 entry on interface
/// `index` usable.
fn neighbour_became_usable(buf: &[u8], index: u32) -> bool {
    messages(buf).any(|m| {
        matches!(m, Ok((RTM_NEWNEIGH, _, payload)) if parse_neighbour(payload, index).is_some())
    })
}

/// A usable entry of the kernel's neighbour table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbour {
    /// The neighbour's address.
    pub ip: Ipv4Addr,
    /// Its link-layer address.
    pub mac: MacAddr,
    /// Whether the kernel holds it confirmed (reachable, permanent, no ARP), rather than
    /// stale or being probed.
    pub confirmed: bool,
}

/// The usable IPv4 neighbour entry on interface `index` in a `RTM_NEWNEIGH` payload
/// (`struct ndmsg` and its attributes).
fn parse_neighbour(payload: &[u8], index: u32) -> Option<Neighbour> {
    let header = payload.get(..12)?;
    let ifindex = u32::from_ne_bytes(header[4..8].try_into().ok()?);
    let state = u16::from_ne_bytes([header[8], header[9]]);
    if header[0] != libc::AF_INET as u8 || ifindex != index || state & NUD_USABLE == 0 {
        return None;
    }
    let (mut dst, mut mac) = (None, None);
    for (kind, data) in attributes(&payload[12..]) {
        match kind {
            NDA_DST => dst = <[u8; 4]>::try_from(data).ok().map(Ipv4Addr::from),
            NDA_LLADDR => mac = <[u8; 6]>::try_from(data).ok().map(MacAddr),
            _ => {}
        }
    }
    Some(Neighbour {
        ip: dst?,
        mac: mac?,
        confirmed: state & NUD_CONFIRMED != 0,
    })
}

/// The rule in a `RTM_NEWRULE` payload (`struct fib_rule_hdr` and its attributes), if it
/// is an IPv4 rule that looks up a table.
fn parse_rule(payload: &[u8]) -> Option<KernelRule> {
    let header = payload.get(..12)?;
    if header[0] != libc::AF_INET as u8 || header[7] != FR_ACT_TO_TBL {
        return None;
    }
    let mut rule = KernelRule {
        priority: 0,
        iif: None,
        protocol: None,
        dports: None,
        dst: None,
        table: u32::from(header[4]),
    };
    let mut rest = &payload[12..];
    while rest.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([rest[0], rest[1]]));
        let kind = u16::from_ne_bytes([rest[2], rest[3]]);
        let data = rest.get(4..len)?;
        let u32_of = |d: &[u8]| {
            d.get(..4)
                .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        };
        match kind {
            FRA_PRIORITY => rule.priority = u32_of(data)?,
            FRA_TABLE => rule.table = u32_of(data)?,
            FRA_IIFNAME => {
                let name = data.split(|b| *b == 0).next().unwrap_or_default();
                rule.iif = Some(String::from_utf8_lossy(name).into_owned());
            }
            FRA_IP_PROTO => rule.protocol = data.first().copied(),
            FRA_DPORT_RANGE if data.len() >= 4 => {
                rule.dports = Some((
                    u16::from_ne_bytes([data[0], data[1]]),
                    u16::from_ne_bytes([data[2], data[3]]),
                ))
            }
            FRA_DST if data.len() >= 4 => {
                rule.dst = Some(Ipv4Addr::new(data[0], data[1], data[2], data[3]))
            }
            _ => {}
        }
        rest = rest
            .get(len.next_multiple_of(4).max(4)..)
            .unwrap_or_default();
    }
    Some(rule)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole `RTM_NEWNEIGH` message for 192.168.77.2 on interface `index` in `state`.
    fn neighbour_message(index: i32, state: u16) -> Vec<u8> {
        let mut m = Message::new(RTM_NEWNEIGH, 0, 1);
        m.bytes(&[libc::AF_INET as u8, 0, 0, 0])
            .bytes(&index.to_ne_bytes())
            .bytes(&state.to_ne_bytes())
            .bytes(&[0, 1])
            .attr(NDA_DST, &[192, 168, 77, 2])
            .attr(NDA_LLADDR, &[2, 0, 0, 0, 0, 9]);
        m.finish().to_vec()
    }

    #[test]
    fn usable_neighbour_entries_of_the_interface_are_read_others_skipped() {
        let entry = |index: i32, state: u16| neighbour_message(index, state)[16..].to_vec();
        let want = |confirmed| {
            Some(Neighbour {
                ip: Ipv4Addr::new(192, 168, 77, 2),
                mac: MacAddr([2, 0, 0, 0, 0, 9]),
                confirmed,
            })
        };
        assert_eq!(parse_neighbour(&entry(3, 0x02), 3), want(true), "reachable");
        assert_eq!(parse_neighbour(&entry(3, 0x04), 3), want(false), "stale");
        assert_eq!(parse_neighbour(&entry(3, 0x80), 3), want(true), "permanent");
        assert_eq!(parse_neighbour(&entry(3, 0x20), 3), None, "failed");
        assert_eq!(parse_neighbour(&entry(3, 0x01), 3), None, "incomplete");
        assert_eq!(
            parse_neighbour(&entry(4, 0x02), 3),
            None,
            "another interface"
        );
    }

    #[test]
    fn a_change_counts_when_it_makes_an_entry_of_the_interface_usable() {
        let incomplete = neighbour_message(3, 0x01);
        let reachable = neighbour_message(3, 0x02);
        let elsewhere = neighbour_message(4, 0x02);
        assert!(!neighbour_became_usable(&incomplete, 3), "being resolved");
        assert!(!neighbour_became_usable(&elsewhere, 3), "another interface");
        let datagram = [incomplete.as_slice(), &elsewhere, &reachable].concat();
        assert!(neighbour_became_usable(&datagram, 3), "the third of three");
        assert!(
            !neighbour_became_usable(&reachable[..reachable.len() - 4], 3),
            "truncated"
        );
        let mut deleted = reachable.clone();
        deleted[4..6].copy_from_slice(&(RTM_NEWNEIGH + 1).to_ne_bytes());
        assert!(!neighbour_became_usable(&deleted, 3), "a deletion");
    }

    #[test]
    fn a_route_reads_back_as_it_was_written() {
        let route = KernelRoute {
            dst: "10.244.1.0/24".parse().unwrap(),
            oif: 7,
            gateway: Some("192.168.1.11".parse().unwrap()),
            src: Some("192.168.1.10".parse().unwrap()),
            table: 200,
        };
        let mut nl_msg = Message::new(RTM_NEWROUTE, 0, 1);
        route_body(&mut nl_msg, &route, RTPROT_SWITCHYARD);
        let bytes = nl_msg.finish().to_vec();
        assert_eq!(bytes[16 + 5], RTPROT_SWITCHYARD);
        assert_eq!(parse_route(&bytes[16..]), Some(route));
        let default_v6 = KernelRoute {
            dst: "::/0".parse().unwrap(),
            oif: 3,
            gateway: None,
            src: None,
            table: 254,
        };
        let mut nl_msg = Message::new(RTM_NEWROUTE, 0, 1);
        route_body(&mut nl_msg, &default_v6, RTPROT_SWITCHYARD);
        let bytes = nl_msg.finish().to_vec();
        assert_eq!(parse_route(&bytes[16..]), Some(default_v6));
    }

    #[test]
    fn a_rule_reads_back_as_it_was_written() {
        let rule = KernelRule {
            priority: 50,
            iif: Some("eth0".into()),
            protocol: Some(6),
            dports: Some((61000, 65534)),
            dst: Some(Ipv4Addr::new(192, 168, 1, 10)),
            table: 200,
        };
        let mut m = Message::new(RTM_NEWRULE, 0, 1);
        rule_body(&mut m, &rule);
        let bytes = m.finish().to_vec();
        assert_eq!(parse_rule(&bytes[16..]), Some(rule));
        let plain = KernelRule {
            priority: 100,
            iif: None,
            protocol: None,
            dports: None,
            dst: None,
            table: RT_TABLE_LOCAL,
        };
        let mut m = Message::new(RTM_NEWRULE, 0, 1);
        rule_body(&mut m, &plain);
        let bytes = m.finish().to_vec();
        assert_eq!(parse_rule(&bytes[16..]), Some(plain));
        assert_eq!(parse_rule(&bytes[16..20]), None, "cut short");
    }

    #[test]
    fn messages_carry_their_length_flags_and_padded_attributes() {
        let mut m = Message::new(RTM_NEWROUTE, NLM_F_CREATE, 7);
        m.bytes(&[1, 2, 3, 4])
            .attr(RTA_OIF, &5u32.to_ne_bytes())
            .attr(RTA_DST, &[10, 0, 0]);
        let b = m.finish().to_vec();
        // Header (16) + 4 bytes + attr of 8 + attr of 4 + 3 padded to 8.
        assert_eq!(b.len(), 16 + 4 + 8 + 8);
        assert_eq!(
            u32::from_ne_bytes(b[0..4].try_into().unwrap()),
            b.len() as u32
        );
        assert_eq!(u16::from_ne_bytes([b[4], b[5]]), RTM_NEWROUTE);
        let flags = u16::from_ne_bytes([b[6], b[7]]);
        assert_eq!(flags, NLM_F_CREATE | NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(
            u32::from_ne_bytes(b[8..12].try_into().unwrap()),
            7,
            "sequence"
        );
        assert_eq!(&b[16..20], &[1, 2, 3, 4]);
        let attr = &b[20..28];
        assert_eq!(
            u16::from_ne_bytes([attr[0], attr[1]]),
            8,
            "attribute length"
        );
        assert_eq!(u16::from_ne_bytes([attr[2], attr[3]]), RTA_OIF);
        let dst = &b[28..36];
        assert_eq!(
            u16::from_ne_bytes([dst[0], dst[1]]),
            7,
            "length without padding"
        );
        assert_eq!(&dst[4..8], &[10, 0, 0, 0], "padded to four bytes");
    }

    #[test]
    fn addresses_encode_by_family() {
        assert_eq!(ip_bytes("10.1.2.3".parse().unwrap()), vec![10, 1, 2, 3]);
        assert_eq!(ip_bytes("fd00::1".parse().unwrap()).len(), 16);
        assert_eq!(family("10.1.2.3".parse().unwrap()), libc::AF_INET as u8);
        assert_eq!(family("fd00::1".parse().unwrap()), libc::AF_INET6 as u8);
    }
}
