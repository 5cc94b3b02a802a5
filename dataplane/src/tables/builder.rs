//! The control side's view of forwarding state (ports and static routes) and the
//! compilation of it into an immutable [`Tables`] snapshot.
//!
//! Every change is validated here first, so that a refused request leaves the state as it
//! was; then the whole snapshot is rebuilt. Rebuilding is O(routes) (about 0.3 s for a
//! million IPv4 routes, microseconds for a node's few hundred pods) and never blocks
//! forwarding.

use super::lpm::{Lpm, Route};
use super::{Gateway, NextHop, Port, PortRole, Tables};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use switchyard_api::{self as api, ApiError, ErrorCode, IpNet, RouteInfo, RouteOrigin, RouteSpec};

/// Flows to Services tracked at most (each about 200 bytes).
pub const DEFAULT_SERVICE_FLOWS: usize = 1 << 20;
/// The most flows whose policy verdict is remembered.
pub const DEFAULT_POLICY_FLOWS: usize = 1 << 20;
const NH_BLACKHOLE: u32 = 1;
const NH_UNREACHABLE: u32 = 2;
const NH_FIRST_PORT: u32 = 3;

/// Ports and static routes, from which snapshots are built.
pub struct TableBuilder<D> {
    gateway: Gateway,
    generation: u64,
    ports: BTreeMap<u32, Arc<Port<D>>>,
    static_routes: BTreeMap<IpNet, api::NextHop>,
    cluster_routes: BTreeMap<IpNet, api::NextHop>,
    node_ports: NodePorts<D>,
    masquerade: Option<Arc<super::masquerade::Masquerading>>,
    services: Arc<super::services::ServiceTable>,
    service_flows: Arc<crate::conntrack::service::ServiceFlows>,
    policy: Arc<super::policy::PolicyTable>,
    policy_flows: Arc<crate::conntrack::policy::PolicyFlows>,
}

/// The ports through which [`api::NextHop::Host`] and [`api::NextHop::Peer`] routes leave.
pub struct NodePorts<D> {
    /// The host port (the node's own stack).
    pub host: Option<Arc<Port<D>>>,
    /// The uplink carrying IPv4 pod traffic.
    pub tunnel_v4: Option<Arc<Port<D>>>,
    /// The uplink carrying IPv6 pod traffic.
    pub tunnel_v6: Option<Arc<Port<D>>>,
    /// The uplink that sends packets leaving the node with its address itself, if one does
    /// (see [`super::Exit`]).
    pub exit: Option<Arc<Port<D>>>,
}

impl<D> Default for NodePorts<D> {
    fn default() -> Self {
        Self {
            host: None,
            tunnel_v4: None,
            tunnel_v6: None,
            exit: None,
        }
    }
}

impl<D> Clone for NodePorts<D> {
    fn clone(&self) -> Self {
        Self {
            host: self.host.clone(),
            tunnel_v4: self.tunnel_v4.clone(),
            tunnel_v6: self.tunnel_v6.clone(),
            exit: self.exit.clone(),
        }
    }
}

impl<D> TableBuilder<D> {
    /// Empty state for a dataplane with this gateway.
    pub fn new(gateway: Gateway) -> Self {
        Self {
            gateway,
            generation: 0,
            ports: BTreeMap::new(),
            static_routes: BTreeMap::new(),
            cluster_routes: BTreeMap::new(),
            node_ports: NodePorts::default(),
            masquerade: None,
            services: Arc::default(),
            service_flows: Arc::new(crate::conntrack::service::ServiceFlows::new(
                DEFAULT_SERVICE_FLOWS,
            )),
            policy: Arc::default(),
            policy_flows: Arc::new(crate::conntrack::policy::PolicyFlows::new(
                DEFAULT_POLICY_FLOWS,
            )),
        }
    }

    /// Sets the NetworkPolicy rules for the next snapshots.
    pub fn set_policy(&mut self, policy: Arc<super::policy::PolicyTable>) {
        self.policy = policy;
    }

    /// The NetworkPolicy rules in force.
    pub fn policy(&self) -> &Arc<super::policy::PolicyTable> {
        &self.policy
    }

    /// The policy verdicts of flows (one table for the dataplane's life).
    pub fn policy_flows(&self) -> &Arc<crate::conntrack::policy::PolicyFlows> {
        &self.policy_flows
    }

    /// Sets the Services for the next snapshots.
    pub fn set_services(&mut self, services: Arc<super::services::ServiceTable>) {
        self.services = services;
    }

    /// The Services in force.
    pub fn services(&self) -> &Arc<super::services::ServiceTable> {
        &self.services
    }

    /// The flows to Services (one table for the dataplane's life).
    pub fn service_flows(&self) -> &Arc<crate::conntrack::service::ServiceFlows> {
        &self.service_flows
    }

    /// Replaces the routes computed from the node settings and the ports they use. The
    /// ports must have been inserted with [`TableBuilder::insert_port`].
    pub fn set_cluster(&mut self, routes: BTreeMap<IpNet, api::NextHop>, ports: NodePorts<D>) {
        self.cluster_routes = routes;
        self.node_ports = ports;
    }

    /// Sets (or clears) masquerading for the next snapshots.
    pub fn set_masquerade(&mut self, masquerade: Option<Arc<super::masquerade::Masquerading>>) {
        self.masquerade = masquerade;
    }

    /// The masquerade state in force.
    pub fn masquerade(&self) -> Option<&Arc<super::masquerade::Masquerading>> {
        self.masquerade.as_ref()
    }

    /// The ports of the node settings.
    pub fn node_ports(&self) -> &NodePorts<D> {
        &self.node_ports
    }

    /// The gateway pods route through.
    pub fn gateway(&self) -> Gateway {
        self.gateway
    }

    /// All ports, by id.
    pub fn ports(&self) -> impl Iterator<Item = &Arc<Port<D>>> {
        self.ports.values()
    }

    /// The port with this id.
    pub fn port(&self, id: u32) -> Option<&Arc<Port<D>>> {
        self.ports.get(&id)
    }

    /// The port created for this namespace and interface name.
    pub fn find_attachment(&self, netns: &str, ifname: &str) -> Option<&Arc<Port<D>>> {
        self.ports
            .values()
            .find(|p| p.info.netns == netns && p.info.ifname == ifname)
    }

    /// Refuses host ports another pod has published already.
    fn check_port_mappings(&self, mappings: &[api::PortMapping]) -> Result<(), ApiError> {
        let taken = self.host_ports();
        for m in mappings {
            if taken.contains_key(&(protocol_number(&m.protocol), m.host_port)) {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!(
                        "hostPort {}/{} is published by another pod already",
                        m.host_port, m.protocol
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Refuses a new port whose attachment, addresses or host ports are already taken.
    pub fn check_new_port(
        &self,
        netns: &str,
        ifname: &str,
        ips: &[IpNet],
        mappings: &[api::PortMapping],
    ) -> Result<(), ApiError> {
        self.check_port_mappings(mappings)?;
        if let Some(p) = self.find_attachment(netns, ifname) {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "port {} already attaches {ifname} in {netns}; delete it first",
                    p.id
                ),
            ));
        }
        for ip in ips {
            if let Some(p) = self.owner_of(ip.addr()) {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!(
                        "address {} is already used by port {} ({} in {})",
                        ip.addr(),
                        p.id,
                        p.info.ifname,
                        p.info.netns
                    ),
                ));
            }
            let host = host_net(ip.addr());
            if self.static_routes.contains_key(&host) {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!(
                        "a static route for {host} exists; delete it before giving {} to a pod",
                        ip.addr()
                    ),
                ));
            }
        }
        Ok(())
    }

    fn owner_of(&self, addr: IpAddr) -> Option<&Arc<Port<D>>> {
        self.ports
            .values()
            .find(|p| p.info.ips.iter().any(|n| n.addr() == addr))
    }

    /// Adds a port checked with [`TableBuilder::check_new_port`].
    pub fn insert_port(&mut self, port: Arc<Port<D>>) {
        self.ports.insert(port.id, port);
    }

    /// Removes a port and the static routes through it; returns the port.
    pub fn remove_port(&mut self, id: u32) -> Option<Arc<Port<D>>> {
        let port = self.ports.remove(&id)?;
        self.static_routes
            .retain(|_, via| *via != api::NextHop::Port(id));
        Some(port)
    }

    /// Adds a static route after checking it conflicts with nothing.
    pub fn add_route(&mut self, spec: &RouteSpec) -> Result<(), ApiError> {
        let dst = spec.dst.trunc();
        if dst != spec.dst {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "route destination {} has host bits set; did you mean {dst}?",
                    spec.dst
                ),
            ));
        }
        if let api::NextHop::Port(id) = spec.via {
            if !self.ports.contains_key(&id) {
                return Err(ApiError::new(
                    ErrorCode::NotFound,
                    format!("no port {id} to route through"),
                ));
            }
        }
        if self.static_routes.contains_key(&dst) {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("a route for {dst} exists already; delete it first"),
            ));
        }
        if dst.prefix_len() == dst.max_prefix_len() {
            if let Some(p) = self.owner_of(dst.addr()) {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!(
                        "{dst} is the address of port {} and routed to it already",
                        p.id
                    ),
                ));
            }
        }
        self.static_routes.insert(dst, spec.via);
        Ok(())
    }

    /// Removes a static route.
    pub fn del_route(&mut self, dst: &IpNet) -> Result<(), ApiError> {
        self.static_routes
            .remove(dst)
            .map(|_| ())
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, format!("no static route for {dst}")))
    }

    /// Every route: pod host routes, static ones, then the node settings' routes (a static
    /// route for the same prefix wins).
    pub fn routes(&self) -> Vec<RouteInfo> {
        let mut out: Vec<RouteInfo> = self
            .ports
            .values()
            .flat_map(|p| {
                p.info.ips.iter().map(|ip| RouteInfo {
                    dst: host_net(ip.addr()),
                    via: api::NextHop::Port(p.id),
                    origin: RouteOrigin::Pod,
                })
            })
            .collect();
        out.extend(self.static_routes.iter().map(|(dst, via)| RouteInfo {
            dst: *dst,
            via: *via,
            origin: RouteOrigin::Static,
        }));
        out.extend(
            self.cluster_routes
                .iter()
                .filter(|(dst, _)| !self.static_routes.contains_key(dst))
                .map(|(dst, via)| RouteInfo {
                    dst: *dst,
                    via: *via,
                    origin: RouteOrigin::Cluster,
                }),
        );
        out
    }

    /// The node's ports published to pods: (protocol, node port) -> (pod IPv4 address, pod
    /// port).
    pub fn host_ports(&self) -> HashMap<(u8, u16), (std::net::Ipv4Addr, u16)> {
        let mut out = HashMap::new();
        for port in self.ports.values() {
            let Some(addr) = port.ipv4.first() else {
                continue;
            };
            for m in &port.info.port_mappings {
                out.insert(
                    (protocol_number(&m.protocol), m.host_port),
                    (*addr, m.container_port),
                );
            }
        }
        out
    }

    /// Compiles the current state into a new snapshot.
    pub fn build(&mut self) -> Tables<D> {
        self.generation += 1;
        let mut nexthops = vec![NextHop::Blackhole, NextHop::Blackhole, NextHop::Unreachable];
        let mut port_nh: HashMap<u32, u32> = HashMap::new();
        for port in self.ports.values() {
            port_nh.insert(port.id, NH_FIRST_PORT + port_nh.len() as u32);
            nexthops.push(NextHop::Port(port.clone()));
        }
        let mut tunnel_nh: HashMap<(std::net::Ipv4Addr, bool), u32> = HashMap::new();
        let mut nh_of = |via: &api::NextHop, v6: bool| match via {
            api::NextHop::Port(id) => port_nh.get(id).copied().unwrap_or(NH_UNREACHABLE),
            api::NextHop::Blackhole => NH_BLACKHOLE,
            api::NextHop::Unreachable => NH_UNREACHABLE,
            api::NextHop::Host => self
                .node_ports
                .host
                .as_ref()
                .and_then(|h| port_nh.get(&h.id).copied())
                .unwrap_or(NH_UNREACHABLE),
            api::NextHop::Peer(peer) => {
                let uplink = if v6 {
                    &self.node_ports.tunnel_v6
                } else {
                    &self.node_ports.tunnel_v4
                };
                match uplink {
                    Some(port) => *tunnel_nh.entry((*peer, v6)).or_insert_with(|| {
                        nexthops.push(NextHop::Tunnel {
                            port: port.clone(),
                            peer: *peer,
                        });
                        nexthops.len() as u32 - 1
                    }),
                    None => NH_UNREACHABLE,
                }
            }
        };
        let mut v4: Vec<Route<u32>> = Vec::new();
        let mut v6: Vec<Route<u128>> = Vec::new();
        for route in self.routes() {
            let nh = nh_of(&route.via, route.dst.addr().is_ipv6());
            match route.dst {
                IpNet::V4(n) => v4.push((u32::from(n.addr()), n.prefix_len(), nh)),
                IpNet::V6(n) => v6.push((u128::from(n.addr()), n.prefix_len(), nh)),
            }
        }
        let mut selected_ports = super::policy::SelectedPorts::default();
        for port in self.ports.values().filter(|p| p.role == PortRole::Pod) {
            let v4 = port.ipv4.iter().map(|a| IpAddr::V4(*a));
            let v6 = port.ipv6.iter().map(|a| IpAddr::V6(*a));
            if self.policy.selects(v4.chain(v6)) {
                selected_ports.insert(port.id);
            }
        }
        Tables {
            generation: self.generation,
            gateway: self.gateway,
            ports: self.ports.iter().map(|(id, p)| (*id, p.clone())).collect(),
            // Prefix lengths come from IpNet and values are small: building cannot fail.
            routes_v4: Lpm::build(v4).unwrap_or_default(),
            routes_v6: Lpm::build(v6).unwrap_or_default(),
            nexthops,
            masquerade: self.masquerade.clone(),
            host_ports: super::host_ports::HostPorts::new(self.host_ports()),
            services: self.services.clone(),
            service_flows: self.service_flows.clone(),
            policy: self.policy.clone(),
            selected_ports,
            policy_flows: self.policy_flows.clone(),
            exit: self
                .node_ports
                .exit
                .clone()
                .zip(self.node_ports.host.clone())
                .map(|(uplink, host)| super::Exit { uplink, host }),
        }
    }
}

/// The /32 or /128 network of one address.
pub fn host_net(addr: IpAddr) -> IpNet {
    IpNet::new(addr, if addr.is_ipv4() { 32 } else { 128 }).unwrap_or_else(|_| IpNet::from(addr))
}

/// The IP protocol number of a port mapping's protocol (`udp`; anything else is TCP).
pub fn protocol_number(protocol: &str) -> u8 {
    match crate::wire::protocol_number(protocol) {
        Some(17) => 17,
        _ => 6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::{PortCounters, PortRole};
    use switchyard_api::{MacAddr, PortInfo, PortMapping};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    /// A port with no device (the builder never touches one).
    fn port(id: u32, ips: &[&str], role: PortRole, mappings: &[(u16, &str)]) -> Arc<Port<()>> {
        let ips: Vec<IpNet> = ips.iter().map(|s| net(s)).collect();
        let mac = MacAddr([0x0a, 0x58, 0, 0, 0, id as u8]);
        Arc::new(Port {
            id,
            mac,
            mtu: 1500,
            ipv4: ips
                .iter()
                .filter_map(|n| match n.addr() {
                    IpAddr::V4(a) => Some(a),
                    IpAddr::V6(_) => None,
                })
                .collect(),
            ipv6: Vec::new(),
            device: (),
            role,
            accepts_udp_gso: false,
            counters: PortCounters::default(),
            info: PortInfo {
                id,
                kind: "none".into(),
                netns: format!("/run/netns/pod{id}"),
                ifname: "eth0".into(),
                ifindex: 0,
                mac,
                mtu: 1500,
                ips,
                owner: None,
                pod: None,
                queues: 1,
                port_mappings: mappings
                    .iter()
                    .map(|(host_port, protocol)| PortMapping {
                        host_port: *host_port,
                        container_port: 80,
                        protocol: (*protocol).into(),
                        host_ip: String::new(),
                    })
                    .collect(),
            },
        })
    }

    fn builder() -> TableBuilder<()> {
        let mut b = TableBuilder::new(Gateway::default());
        b.insert_port(port(1, &["10.244.0.5/24"], PortRole::Pod, &[(8080, "tcp")]));
        b
    }

    fn code(r: Result<(), ApiError>) -> ErrorCode {
        r.unwrap_err().code
    }

    #[test]
    fn new_ports_that_take_what_is_taken_are_refused() {
        let b = builder();
        let ips = [net("10.244.0.6/24")];
        assert!(b.check_new_port("/run/netns/x", "eth0", &ips, &[]).is_ok());
        let same_place = b.check_new_port("/run/netns/pod1", "eth0", &ips, &[]);
        assert_eq!(code(same_place), ErrorCode::Conflict);
        let same_address = b.check_new_port("/run/netns/x", "eth0", &[net("10.244.0.5/24")], &[]);
        assert_eq!(code(same_address), ErrorCode::Conflict);
        let tcp_8080 = port(9, &[], PortRole::Pod, &[(8080, "tcp")]);
        let taken = b.check_new_port("/run/netns/x", "eth0", &ips, &tcp_8080.info.port_mappings);
        assert_eq!(code(taken), ErrorCode::Conflict);
        let udp_8080 = port(9, &[], PortRole::Pod, &[(8080, "udp")]);
        let other_protocol =
            b.check_new_port("/run/netns/x", "eth0", &ips, &udp_8080.info.port_mappings);
        assert!(other_protocol.is_ok(), "UDP 8080 is free");
    }

    #[test]
    fn static_routes_are_checked_and_go_with_their_port() {
        let mut b = builder();
        let route = |dst: &str, via| RouteSpec { dst: net(dst), via };
        let host_bits = b.add_route(&route("10.1.0.1/16", api::NextHop::Blackhole));
        assert_eq!(code(host_bits), ErrorCode::InvalidRequest);
        let no_port = b.add_route(&route("10.1.0.0/16", api::NextHop::Port(7)));
        assert_eq!(code(no_port), ErrorCode::NotFound);
        let pods_own = b.add_route(&route("10.244.0.5/32", api::NextHop::Blackhole));
        assert_eq!(code(pods_own), ErrorCode::Conflict);
        b.add_route(&route("10.1.0.0/16", api::NextHop::Port(1)))
            .unwrap();
        let twice = b.add_route(&route("10.1.0.0/16", api::NextHop::Blackhole));
        assert_eq!(code(twice), ErrorCode::Conflict);
        // A pod may not take an address a static route covers exactly.
        b.add_route(&route("10.244.0.9/32", api::NextHop::Blackhole))
            .unwrap();
        let covered = b.check_new_port("/run/netns/y", "eth0", &[net("10.244.0.9/24")], &[]);
        assert_eq!(code(covered), ErrorCode::Conflict);
        assert!(b.remove_port(1).is_some());
        let left: Vec<_> = b.routes().into_iter().map(|r| r.dst).collect();
        assert_eq!(
            left,
            [net("10.244.0.9/32")],
            "the port's routes went with it"
        );
        assert_eq!(code(b.del_route(&net("10.1.0.0/16"))), ErrorCode::NotFound);
    }

    #[test]
    fn snapshots_route_to_ports_tunnels_and_the_host() {
        let mut b = builder();
        let host = port(2, &[], PortRole::Host, &[]);
        let uplink = port(3, &[], PortRole::Uplink, &[]);
        b.insert_port(host.clone());
        b.insert_port(uplink.clone());
        let peer = std::net::Ipv4Addr::new(192, 168, 1, 11);
        let mut cluster = BTreeMap::new();
        cluster.insert(net("10.244.1.0/24"), api::NextHop::Peer(peer));
        cluster.insert(net("10.244.2.0/24"), api::NextHop::Peer(peer));
        cluster.insert(net("0.0.0.0/0"), api::NextHop::Host);
        cluster.insert(net("10.9.0.0/16"), api::NextHop::Host);
        b.set_cluster(
            cluster,
            NodePorts {
                host: Some(host),
                tunnel_v4: Some(uplink),
                ..NodePorts::default()
            },
        );
        // A static route for the same prefix as a cluster route wins.
        b.add_route(&RouteSpec {
            dst: net("10.9.0.0/16"),
            via: api::NextHop::Unreachable,
        })
        .unwrap();
        let t = b.build();
        let next = |addr: [u8; 4]| t.nexthop(t.routes_v4.lookup(u32::from_be_bytes(addr)));
        assert!(matches!(next([10, 244, 0, 5]), Some(NextHop::Port(p)) if p.id == 1));
        let a = match next([10, 244, 1, 7]) {
            Some(NextHop::Tunnel { port, peer: p }) if port.id == 3 && *p == peer => {
                t.routes_v4.lookup(u32::from_be_bytes([10, 244, 1, 7]))
            }
            _ => panic!("not a tunnel to the peer"),
        };
        assert_eq!(
            a,
            t.routes_v4.lookup(u32::from_be_bytes([10, 244, 2, 7])),
            "one tunnel next hop per peer"
        );
        assert!(matches!(next([8, 8, 8, 8]), Some(NextHop::Port(p)) if p.id == 2));
        assert!(matches!(next([10, 9, 1, 1]), Some(NextHop::Unreachable)));
        assert_eq!(
            t.host_ports.get(6, 8080),
            Some((std::net::Ipv4Addr::new(10, 244, 0, 5), 80))
        );
        assert_eq!(t.generation, 1);
        assert_eq!(b.build().generation, 2, "every snapshot is newer");
    }
}
