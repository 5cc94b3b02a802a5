//! Joining the cluster: what a [`NodeSpec`] means for this node.
//!
//! [`plan`] is pure (no system call here: the control side finds the uplink, see
//! `switch::cluster`): from the spec and the uplink found on the node it computes the pod
//! MTU, the dataplane's cluster routes (peers' pod CIDRs through the overlay, the node's
//! addresses to the host port, a default route to the host) and the routes the node's own
//! stack needs (the cluster's pod networks through the host port; with the `direct`
//! backend, each peer's pod CIDRs through that peer). `Switch::set_node` then carries it
//! out: host port, uplink sockets, kernel routes, tables.
//!
//! How the node's stack reaches pods: the host port is a TAP (`sy0` by default) in the
//! node's namespace, and the cluster CIDRs are routed into it through the pods' gateway
//! (169.254.1.1 / fe80::1), with the node's address as the preferred source. Pods reach
//! the node's addresses through the same port; no NAT either way.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use switchyard_api::{ApiError, BackendKind, ErrorCode, IpNet, NextHop, NodeSpec};

/// The uplink as found on the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UplinkInfo {
    /// Interface name.
    pub ifname: String,
    /// Its MTU.
    pub mtu: u32,
    /// Its prefixes (to tell which peers are on-link).
    pub prefixes: Vec<IpNet>,
}

/// Where a route of the node's own stack goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum KernelVia {
    /// Into the host port, through the pods' gateway address.
    HostPort,
    /// Out of the uplink to this router (a peer node).
    Uplink(IpAddr),
}

/// Everything a spec implies, computed before anything is changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePlan {
    /// MTU of pod interfaces and of the overlay (largest inner packet).
    pub pod_mtu: u32,
    /// Dataplane routes.
    pub routes: BTreeMap<IpNet, NextHop>,
    /// Routes of the node's own stack, with their preferred source.
    pub kernel_routes: BTreeMap<IpNet, (KernelVia, Option<IpAddr>)>,
    /// Underlay addresses accepted as senders of encapsulated traffic.
    pub peer_underlays: Vec<Ipv4Addr>,
}

fn invalid(message: String) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, message)
}

fn host_net(addr: IpAddr) -> IpNet {
    crate::tables::builder::host_net(addr)
}

fn default_net(v6: bool) -> IpNet {
    if v6 {
        IpNet::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 0)
    } else {
        IpNet::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
    }
    .unwrap_or_else(|_| IpNet::from(IpAddr::V4(Ipv4Addr::UNSPECIFIED)))
}

/// Computes what `spec` means on a node whose uplink is `uplink`; refuses specs that
/// cannot work, saying why.
pub fn plan(spec: &NodeSpec, uplink: &UplinkInfo) -> Result<NodePlan, ApiError> {
    let backend = spec.backend;
    if backend.vni > 0x00ff_ffff {
        return Err(invalid(format!(
            "VNI {} does not fit in 24 bits",
            backend.vni
        )));
    }
    if backend.kind == BackendKind::Vxlan && backend.port == 0 {
        return Err(invalid("VXLAN port 0 is not a port".into()));
    }
    let has_v6 = spec
        .pod_cidrs
        .iter()
        .chain(spec.peers.iter().flat_map(|p| &p.pod_cidrs))
        .any(|c| c.addr().is_ipv6());
    let pod_mtu = spec
        .mtu
        .unwrap_or_else(|| uplink.mtu.saturating_sub(backend.kind.overhead()));
    let min_mtu = if has_v6 { 1280 } else { 576 };
    if pod_mtu < min_mtu || pod_mtu > 65_521 {
        return Err(invalid(format!(
            "pod MTU {pod_mtu} (uplink {} MTU {} minus {} bytes of {}) is out of range {min_mtu}..=65521",
            uplink.ifname,
            uplink.mtu,
            backend.kind.overhead(),
            backend.kind.name()
        )));
    }
    let on_link = |addr: IpAddr| uplink.prefixes.iter().any(|p| p.contains(&addr));
    let own_v6 = spec.addresses.iter().copied().find(IpAddr::is_ipv6);
    let mut routes = BTreeMap::new();
    let mut kernel_routes = BTreeMap::new();
    routes.insert(default_net(false), NextHop::Host);
    if has_v6 {
        routes.insert(default_net(true), NextHop::Host);
    }
    for addr in spec
        .addresses
        .iter()
        .copied()
        .chain([IpAddr::V4(spec.underlay)])
    {
        routes.insert(host_net(addr), NextHop::Host);
    }
    for cidr in &spec.pod_cidrs {
        routes.insert(cidr.trunc(), NextHop::Unreachable);
    }
    let mut names = std::collections::BTreeSet::new();
    for peer in &spec.peers {
        if !names.insert(peer.name.as_str()) {
            return Err(invalid(format!("peer {} is listed twice", peer.name)));
        }
        if peer.underlay == spec.underlay {
            return Err(invalid(format!(
                "peer {} has this node's own address {}",
                peer.name, peer.underlay
            )));
        }
        if backend.kind == BackendKind::Direct && !on_link(IpAddr::V4(peer.underlay)) {
            return Err(invalid(format!(
                "backend direct: node {} ({}) is not on-link from uplink {} ({}); use backend vxlan or ipip for nodes on other networks",
                peer.name,
                peer.underlay,
                uplink.ifname,
                list(&uplink.prefixes)
            )));
        }
        for cidr in &peer.pod_cidrs {
            let cidr = cidr.trunc();
            if let Some(own) = spec.pod_cidrs.iter().find(|c| overlap(c, &cidr)) {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!(
                        "pod CIDR {cidr} of node {} overlaps this node's {own}",
                        peer.name
                    ),
                ));
            }
            let via = match backend.kind {
                BackendKind::Direct => {
                    let gateway = if cidr.addr().is_ipv4() {
                        IpAddr::V4(peer.underlay)
                    } else {
                        peer.addresses
                            .iter()
                            .copied()
                            .find(|a| a.is_ipv6() && on_link(*a))
                            .ok_or_else(|| invalid(format!(
                                "backend direct: node {} has IPv6 pods ({cidr}) but no on-link IPv6 InternalIP to route them through",
                                peer.name
                            )))?
                    };
                    kernel_routes.insert(cidr, (KernelVia::Uplink(gateway), None));
                    NextHop::Host
                }
                _ => NextHop::Peer(peer.underlay),
            };
            if routes.insert(cidr, via).is_some() {
                return Err(ApiError::new(
                    ErrorCode::Conflict,
                    format!("pod CIDR {cidr} of node {} is claimed twice", peer.name),
                ));
            }
        }
        if backend.kind != BackendKind::Direct {
            for addr in peer
                .addresses
                .iter()
                .copied()
                .chain([IpAddr::V4(peer.underlay)])
            {
                routes.insert(host_net(addr), NextHop::Peer(peer.underlay));
            }
        }
    }
    for route in &spec.routes {
        if !on_link(route.via) {
            return Err(invalid(format!(
                "route to {} via {}: the next hop is not on-link from uplink {} ({})",
                route.dst,
                route.via,
                uplink.ifname,
                list(&uplink.prefixes)
            )));
        }
        if route.dst.addr().is_ipv4() != route.via.is_ipv4() {
            return Err(invalid(format!(
                "route to {} via {}: the families differ",
                route.dst, route.via
            )));
        }
        kernel_routes.insert(route.dst.trunc(), (KernelVia::Uplink(route.via), None));
    }
    let reach: Vec<IpNet> = if spec.cluster_cidrs.is_empty() {
        spec.pod_cidrs
            .iter()
            .chain(spec.peers.iter().flat_map(|p| &p.pod_cidrs))
            .map(IpNet::trunc)
            .collect()
    } else {
        spec.cluster_cidrs.iter().map(IpNet::trunc).collect()
    };
    // The Services' ranges too: the node's own clients (kubelet, hostNetwork pods) reach
    // cluster IPs through the dataplane, which translates them; in the dataplane an address
    // of the range that no Service serves is unreachable (not sent on to the node's stack,
    // which would send it back).
    for cidr in &spec.service_cidrs {
        routes.entry(cidr.trunc()).or_insert(NextHop::Unreachable);
    }
    for cidr in reach
        .into_iter()
        .chain(spec.service_cidrs.iter().map(IpNet::trunc))
    {
        let src = if cidr.addr().is_ipv4() {
            Some(IpAddr::V4(spec.underlay))
        } else {
            own_v6
        };
        kernel_routes
            .entry(cidr)
            .or_insert((KernelVia::HostPort, src));
    }
    Ok(NodePlan {
        pod_mtu,
        routes,
        kernel_routes,
        peer_underlays: spec.peers.iter().map(|p| p.underlay).collect(),
    })
}

/// Under direct routing with the uplink on AF_XDP, the dataplane carries IPv4 pod traffic
/// to other nodes itself: each peer's IPv4 pod CIDRs go to that peer through the uplink
/// instead of the node's stack (whose routes to them stay, for the node's own traffic and
/// for packets whose next hop is not resolved yet). IPv6 stays with the node's stack.
pub fn carry_direct_v4(plan: &mut NodePlan, spec: &NodeSpec) {
    if spec.backend.kind != BackendKind::Direct {
        return;
    }
    for peer in &spec.peers {
        for cidr in peer.pod_cidrs.iter().filter(|c| c.addr().is_ipv4()) {
            plan.routes
                .insert(cidr.trunc(), NextHop::Peer(peer.underlay));
        }
    }
}

fn overlap(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn list(nets: &[IpNet]) -> String {
    if nets.is_empty() {
        return "no addresses".into();
    }
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_api::{Backend, Peer};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn spec(kind: BackendKind) -> NodeSpec {
        NodeSpec {
            name: "a".into(),
            underlay: "192.168.1.2".parse().unwrap(),
            addresses: vec!["192.168.1.2".parse().unwrap(), "fd00:1::2".parse().unwrap()],
            uplink: None,
            pod_cidrs: vec![net("10.244.0.0/24"), net("fd10:244::/64")],
            cluster_cidrs: vec![net("10.244.0.0/16"), net("fd10:244::/56")],
            backend: Backend {
                kind,
                ..Backend::default()
            },
            mtu: None,
            peers: vec![Peer {
                name: "b".into(),
                underlay: "192.168.1.3".parse().unwrap(),
                addresses: vec!["fd00:1::3".parse().unwrap()],
                pod_cidrs: vec![net("10.244.1.0/24"), net("fd10:244:0:1::/64")],
            }],
            masquerade: Default::default(),
            routes: Vec::new(),
            service_cidrs: Vec::new(),
        }
    }

    fn uplink() -> UplinkInfo {
        UplinkInfo {
            ifname: "eth0".into(),
            mtu: 1500,
            prefixes: vec![net("192.168.1.0/24"), net("fd00:1::/64")],
        }
    }

    #[test]
    fn direct_routing_on_afxdp_sends_ipv4_pods_through_the_uplink_and_ipv6_through_the_node() {
        let s = spec(BackendKind::Direct);
        let mut p = plan(&s, &uplink()).unwrap();
        let before = p.kernel_routes.clone();
        carry_direct_v4(&mut p, &s);
        let peer = "192.168.1.3".parse().unwrap();
        assert_eq!(p.routes[&net("10.244.1.0/24")], NextHop::Peer(peer));
        assert_eq!(p.routes[&net("fd10:244:0:1::/64")], NextHop::Host);
        assert_eq!(p.kernel_routes, before, "the node's own routes stay");
        let mut vxlan = plan(&spec(BackendKind::Vxlan), &uplink()).unwrap();
        let unchanged = vxlan.clone();
        carry_direct_v4(&mut vxlan, &spec(BackendKind::Vxlan));
        assert_eq!(vxlan, unchanged);
    }

    #[test]
    fn vxlan_routes_peers_through_the_overlay() {
        let p = plan(&spec(BackendKind::Vxlan), &uplink()).unwrap();
        assert_eq!(p.pod_mtu, 1450);
        let peer = NextHop::Peer("192.168.1.3".parse().unwrap());
        assert_eq!(p.routes[&net("10.244.1.0/24")], peer);
        assert_eq!(p.routes[&net("fd10:244:0:1::/64")], peer);
        assert_eq!(p.routes[&net("192.168.1.3/32")], peer);
        assert_eq!(p.routes[&net("192.168.1.2/32")], NextHop::Host);
        assert_eq!(p.routes[&net("10.244.0.0/24")], NextHop::Unreachable);
        assert_eq!(
            p.kernel_routes[&net("10.244.0.0/16")],
            (KernelVia::HostPort, Some("192.168.1.2".parse().unwrap()))
        );
        assert_eq!(
            p.kernel_routes[&net("fd10:244::/56")],
            (KernelVia::HostPort, Some("fd00:1::2".parse().unwrap()))
        );
    }

    #[test]
    fn ipip_overhead_is_twenty() {
        assert_eq!(
            plan(&spec(BackendKind::Ipip), &uplink()).unwrap().pod_mtu,
            1480
        );
    }

    #[test]
    fn direct_routes_through_the_node_and_needs_on_link_peers() {
        let p = plan(&spec(BackendKind::Direct), &uplink()).unwrap();
        assert_eq!(p.pod_mtu, 1500);
        assert_eq!(p.routes[&net("10.244.1.0/24")], NextHop::Host);
        assert_eq!(
            p.kernel_routes[&net("10.244.1.0/24")],
            (KernelVia::Uplink("192.168.1.3".parse().unwrap()), None)
        );
        assert_eq!(
            p.kernel_routes[&net("fd10:244:0:1::/64")],
            (KernelVia::Uplink("fd00:1::3".parse().unwrap()), None)
        );
        let mut far = spec(BackendKind::Direct);
        far.peers[0].underlay = "192.168.2.3".parse().unwrap();
        let err = plan(&far, &uplink()).unwrap_err();
        assert!(err.message.contains("not on-link"), "{}", err.message);
        assert!(err.message.contains("use backend vxlan or ipip"));
    }

    #[test]
    fn extra_routes_go_to_the_node_through_on_link_routers() {
        let mut s = spec(BackendKind::Vxlan);
        s.routes.push(switchyard_api::ExtraRoute {
            dst: net("192.168.2.0/24"),
            via: "192.168.1.1".parse().unwrap(),
        });
        let p = plan(&s, &uplink()).unwrap();
        assert_eq!(
            p.kernel_routes[&net("192.168.2.0/24")],
            (KernelVia::Uplink("192.168.1.1".parse().unwrap()), None)
        );
        s.routes[0].via = "10.9.9.9".parse().unwrap();
        assert!(plan(&s, &uplink())
            .unwrap_err()
            .message
            .contains("not on-link"));
    }

    #[test]
    fn refuses_overlaps_and_bad_settings() {
        let mut s = spec(BackendKind::Vxlan);
        s.peers[0].pod_cidrs.push(net("10.244.0.128/25"));
        assert_eq!(plan(&s, &uplink()).unwrap_err().code, ErrorCode::Conflict);
        let mut s = spec(BackendKind::Vxlan);
        s.backend.vni = 1 << 24;
        assert!(plan(&s, &uplink()).is_err());
        let mut s = spec(BackendKind::Vxlan);
        s.mtu = Some(1000);
        assert!(plan(&s, &uplink()).unwrap_err().message.contains("1280"));
        let mut s = spec(BackendKind::Vxlan);
        s.peers.push(s.peers[0].clone());
        assert!(plan(&s, &uplink()).unwrap_err().message.contains("twice"));
    }
}
