//! `switchyard-control get nodes|routes|peers|pods`: what one node's dataplane knows, as
//! tables (`-o wide` adds columns) or JSON. Every view is built from the dataplane's API
//! (node settings, routes, ports), so it shows what is in force, not what a manifest says.

use crate::table;
use serde::Serialize;
use std::net::IpAddr;
use switchyard_api::{IpNet, NextHop, NodeStatus, PortInfo, RouteInfo};

/// A node as `get nodes` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRow {
    /// Node name.
    pub name: String,
    /// `self` for this node, `peer` for the others.
    pub role: &'static str,
    /// Underlay (IPv4 InternalIP) address.
    pub internal_ip: IpAddr,
    /// All InternalIPs.
    pub addresses: Vec<IpAddr>,
    /// Pod CIDRs.
    pub pod_cidrs: Vec<IpNet>,
}

/// A pod as `get pods` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PodRow {
    /// Pod name: the network namespace's name (a runtime's sandbox), or its path.
    pub name: String,
    /// Pod addresses.
    pub ips: Vec<IpAddr>,
    /// The node it runs on.
    pub node: String,
    /// Its port id in the dataplane.
    pub port: u32,
    /// Interface name inside the pod.
    pub ifname: String,
    /// Who attached it (CNI network and container).
    pub owner: Option<String>,
    /// Node ports published to it (hostPort), as `8080->80/tcp`.
    pub host_ports: Vec<String>,
}

fn join<T: ToString>(items: &[T]) -> String {
    if items.is_empty() {
        return "<none>".into();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Every node: this one first, then its peers.
pub fn nodes(status: &NodeStatus) -> Vec<NodeRow> {
    let Some(spec) = &status.spec else {
        return Vec::new();
    };
    let mut rows = vec![NodeRow {
        name: spec.name.clone(),
        role: "self",
        internal_ip: IpAddr::V4(spec.underlay),
        addresses: spec.addresses.clone(),
        pod_cidrs: spec.pod_cidrs.clone(),
    }];
    rows.extend(spec.peers.iter().map(|p| NodeRow {
        name: p.name.clone(),
        role: "peer",
        internal_ip: IpAddr::V4(p.underlay),
        addresses: p.addresses.clone(),
        pod_cidrs: p.pod_cidrs.clone(),
    }));
    rows
}

/// This node's pods.
pub fn pods(status: &NodeStatus, ports: &[PortInfo]) -> Vec<PodRow> {
    let node = status
        .spec
        .as_ref()
        .map_or_else(|| "<unknown>".to_string(), |s| s.name.clone());
    ports
        .iter()
        .filter(|p| p.owner.as_deref() != Some("node"))
        .map(|p| PodRow {
            name: p
                .netns
                .strip_prefix("/run/netns/")
                .or_else(|| p.netns.strip_prefix("/var/run/netns/"))
                .unwrap_or(&p.netns)
                .to_string(),
            ips: p.ips.iter().map(IpNet::addr).collect(),
            node: node.clone(),
            port: p.id,
            ifname: p.ifname.clone(),
            owner: p.owner.clone(),
            host_ports: p
                .port_mappings
                .iter()
                .map(|m| format!("{}->{}/{}", m.host_port, m.container_port, m.protocol))
                .collect(),
        })
        .collect()
}

/// `get nodes` as a table.
pub fn render_nodes(rows: &[NodeRow], wide: bool) -> String {
    let mut header = vec!["NAME", "ROLE", "INTERNAL-IP", "POD-CIDRS"];
    if wide {
        header.push("ADDRESSES");
    }
    let cells = rows
        .iter()
        .map(|n| {
            let mut r = vec![
                n.name.clone(),
                n.role.into(),
                n.internal_ip.to_string(),
                join(&n.pod_cidrs),
            ];
            if wide {
                r.push(join(&n.addresses));
            }
            r
        })
        .collect::<Vec<_>>();
    table::render(&header, &cells)
}

/// `get peers`: the overlay's peer (VTEP) table.
pub fn render_peers(status: &NodeStatus, wide: bool) -> String {
    let Some(spec) = &status.spec else {
        return "no node settings yet (is switchyard-control run going?)\n".into();
    };
    let backend = spec.backend;
    let mut header = vec!["PEER", "UNDERLAY", "BACKEND", "POD-CIDRS"];
    if wide {
        header.extend(["VNI", "PORT", "ADDRESSES"]);
    }
    let rows = spec
        .peers
        .iter()
        .map(|p| {
            let mut r = vec![
                p.name.clone(),
                p.underlay.to_string(),
                backend.kind.name().into(),
                join(&p.pod_cidrs),
            ];
            if wide {
                r.extend([
                    backend.vni.to_string(),
                    backend.port.to_string(),
                    join(&p.addresses),
                ]);
            }
            r
        })
        .collect::<Vec<_>>();
    let mut out = format!(
        "node {} underlay {} uplink {} (MTU {}) pod MTU {} host interface {}\n",
        spec.name,
        spec.underlay,
        status.uplink.as_deref().unwrap_or("-"),
        status.uplink_mtu.unwrap_or(0),
        status.pod_mtu.unwrap_or(0),
        status.host_ifname.as_deref().unwrap_or("-")
    );
    out += &table::render(&header, &rows);
    out
}

/// `get routes`.
pub fn render_routes(routes: &[RouteInfo], status: &NodeStatus, wide: bool) -> String {
    let peer_name = |addr: &std::net::Ipv4Addr| {
        status
            .spec
            .as_ref()
            .and_then(|s| s.peers.iter().find(|p| p.underlay == *addr))
            .map(|p| p.name.clone())
    };
    let mut header = vec!["DESTINATION", "VIA"];
    if wide {
        header.push("ORIGIN");
    }
    let rows = routes
        .iter()
        .map(|r| {
            let via = match r.via {
                NextHop::Port(id) => format!("port {id}"),
                NextHop::Blackhole => "blackhole".into(),
                NextHop::Unreachable => "unreachable".into(),
                NextHop::Host => "host".into(),
                NextHop::Peer(addr) => match peer_name(&addr) {
                    Some(name) => format!("peer {name} ({addr})"),
                    None => format!("peer {addr}"),
                },
            };
            let mut row = vec![r.dst.to_string(), via];
            if wide {
                row.push(format!("{:?}", r.origin).to_lowercase());
            }
            row
        })
        .collect::<Vec<_>>();
    table::render(&header, &rows)
}

/// `get pods`.
pub fn render_pods(rows: &[PodRow], wide: bool) -> String {
    let mut header = vec!["NAME", "IP"];
    if wide {
        header.extend(["NODE", "PORT", "HOST-PORTS", "OWNER"]);
    }
    let cells = rows
        .iter()
        .map(|p| {
            let mut r = vec![p.name.clone(), join(&p.ips)];
            if wide {
                r.extend([
                    p.node.clone(),
                    format!("{} ({})", p.port, p.ifname),
                    if p.host_ports.is_empty() {
                        "-".into()
                    } else {
                        p.host_ports.join(",")
                    },
                    p.owner.clone().unwrap_or_else(|| "-".into()),
                ]);
            }
            r
        })
        .collect::<Vec<_>>();
    table::render(&header, &cells)
}

/// `get nat`: masquerade's port usage on this node.
pub fn render_nat(nat: Option<&switchyard_api::NatStatus>) -> String {
    let Some(n) = nat else {
        return "masquerade is not set up (no node settings yet)\n".into();
    };
    table::render(
        &["NODE", "PORT-RANGE", "FLOWS", "LIMIT", "TCP", "UDP", "ICMP"],
        &[vec![
            n.node.to_string(),
            n.port_range.to_string(),
            n.flows.to_string(),
            n.limit.to_string(),
            n.tcp.to_string(),
            n.udp.to_string(),
            n.icmp.to_string(),
        ]],
    )
}

/// `get conntrack`: the tracked flows.
pub fn render_conntrack(entries: &[switchyard_api::ConntrackEntry], wide: bool) -> String {
    let mut header = vec!["PROTO", "KIND", "POD", "REMOTE", "NODE-PORT", "STATE"];
    if wide {
        header.push("IDLE");
    }
    let rows = entries
        .iter()
        .map(|e| {
            let mut r = vec![
                e.protocol.clone(),
                e.kind.clone(),
                format!("{}:{}", e.pod, e.pod_port),
                format!("{}:{}", e.remote, e.remote_port),
                e.node_port.to_string(),
                e.state.clone(),
            ];
            if wide {
                r.push(format!("{}s", e.idle_s));
            }
            r
        })
        .collect::<Vec<_>>();
    table::render(&header, &rows)
}
