//! What `switchyard-control` prints: one renderer per view. `get nodes|routes|peers|pods|
//! nat|conntrack` show what one node's dataplane knows, as tables (`-o wide` adds columns)
//! or JSON, built from the dataplane's API (node settings, routes, ports), so they show
//! what is in force, not what a manifest says; the dataplane commands (`hello`, `ports`,
//! `routes`, `stats`, ...) print its replies ([`render_reply`]); `plan` prints a node's
//! plan from manifests ([`render_plan`]).

use crate::cluster::plan::NodePlan;
use crate::table;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use switchyard_api::{
    IpNet, NextHop, NodeStatus, PortInfo, Reply, RouteInfo, ServiceStatus, Stats,
};

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
    /// Pod name: the Kubernetes pod (`namespace/name`) when the runtime named it, else the
    /// network namespace's name (a runtime's sandbox) or its path.
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
            name: p.pod.clone().unwrap_or_else(|| {
                p.netns
                    .strip_prefix("/run/netns/")
                    .or_else(|| p.netns.strip_prefix("/var/run/netns/"))
                    .unwrap_or(&p.netns)
                    .to_string()
            }),
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

/// `get routes` (peers named from the node settings) and `routes` (`status` absent).
pub fn render_routes(routes: &[RouteInfo], status: Option<&NodeStatus>, wide: bool) -> String {
    let peer_name = |addr: &std::net::Ipv4Addr| {
        status
            .and_then(|s| s.spec.as_ref())
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
        &[
            "NODE",
            "PORT-RANGE",
            "FLOWS",
            "LIMIT",
            "TCP",
            "UDP",
            "ICMP",
            "EARLY-DROPS",
        ],
        &[vec![
            n.node.to_string(),
            n.port_range.to_string(),
            n.flows.to_string(),
            n.limit.to_string(),
            n.tcp.to_string(),
            n.udp.to_string(),
            n.icmp.to_string(),
            n.early_drops.to_string(),
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

/// `get services`: one line per Service.
pub fn render_services(services: &[ServiceStatus], wide: bool) -> String {
    let mut header = vec!["NAME", "TYPE", "CLUSTER-IPS", "PORTS", "ENDPOINTS"];
    if wide {
        header.extend(["EXTERNAL-IPS", "AFFINITY", "POLICY", "MAGLEV"]);
    }
    let rows = services
        .iter()
        .map(|s| {
            let spec = &s.spec;
            let ports = spec
                .ports
                .iter()
                .map(|p| match p.node_port {
                    Some(n) => format!("{}:{n}/{}", p.port, p.protocol),
                    None => format!("{}/{}", p.port, p.protocol),
                })
                .collect::<Vec<_>>();
            let endpoints = spec
                .ports
                .iter()
                .map(|p| p.endpoints.len().to_string())
                .collect::<Vec<_>>();
            let mut row = vec![
                format!("{}/{}", spec.namespace, spec.name),
                spec.kind.clone(),
                join(&spec.cluster_ips),
                join(&ports),
                join(&endpoints),
            ];
            if wide {
                let policy = match (spec.internal_local, spec.external_local) {
                    (false, false) => "Cluster".to_string(),
                    (i, e) => format!(
                        "internal {} external {}",
                        if i { "Local" } else { "Cluster" },
                        if e { "Local" } else { "Cluster" }
                    ),
                };
                row.extend([
                    join(&spec.external_ips),
                    spec.affinity_timeout_s
                        .map_or_else(|| "None".into(), |t| format!("ClientIP {t}s")),
                    policy,
                    join(&s.maglev_table_sizes),
                ]);
            }
            row
        })
        .collect::<Vec<_>>();
    table::render(&header, &rows)
}

/// `get conntrack --service`: the flows to a Service.
pub fn render_service_flows(flows: &[switchyard_api::ServiceFlowEntry], wide: bool) -> String {
    let mut header = vec!["PROTO", "CLIENT", "FRONTEND", "BACKEND", "STATE"];
    if wide {
        header.extend(["SERVICE", "IDLE"]);
    }
    let rows = flows
        .iter()
        .map(|f| {
            let mut r = vec![
                f.protocol.clone(),
                f.client.clone(),
                f.frontend.clone(),
                f.backend.clone(),
                f.state.clone(),
            ];
            if wide {
                r.push(
                    f.service
                        .as_ref()
                        .map_or_else(|| "-".into(), ToString::to_string),
                );
                r.push(format!("{}s", f.idle_s));
            }
            r
        })
        .collect::<Vec<_>>();
    table::render(&header, &rows)
}

/// `get policies`: the selected pods of the node and the policies selecting them (`wide`:
/// the allowing rules too).
pub fn render_policies(status: &switchyard_api::PolicyStatus, wide: bool) -> String {
    let mut header = vec!["POD", "ADDRESSES", "INGRESS", "EGRESS"];
    if wide {
        header.extend(["INGRESS RULES", "EGRESS RULES"]);
    }
    let direction = |d: &Option<Vec<String>>| match d {
        None => "open".to_string(),
        Some(p) => p.join(","),
    };
    let rows = status
        .pods
        .iter()
        .map(|p| {
            let mut r = vec![
                format!("{}/{}", p.namespace, p.name),
                join(&p.addresses),
                direction(&p.ingress),
                direction(&p.egress),
            ];
            if wide {
                let rules = |d: &Option<Vec<String>>, rules: &[String]| match d {
                    None => "-".to_string(),
                    Some(_) if rules.is_empty() => "deny all".to_string(),
                    Some(_) => rules.join(","),
                };
                r.push(rules(&p.ingress, &p.ingress_rules));
                r.push(rules(&p.egress, &p.egress_rules));
            }
            r
        })
        .collect::<Vec<_>>();
    format!(
        "rules generation {}, {} flows with a verdict\n{}",
        status.generation,
        status.flows,
        table::render(&header, &rows)
    )
}

/// `get flows --denied`: the flows the policies denied last, oldest first.
pub fn render_denied_flows(flows: &[switchyard_api::DeniedFlow]) -> String {
    let rows = flows
        .iter()
        .map(|f| {
            let socket = |a: IpAddr, p: u16| std::net::SocketAddr::from((a, p)).to_string();
            let secs = f.time_ms / 1000;
            vec![
                format!(
                    "{:02}:{:02}:{:02}.{:03}",
                    secs / 3600 % 24,
                    secs / 60 % 60,
                    secs % 60,
                    f.time_ms % 1000
                ),
                f.protocol.clone(),
                socket(f.src, f.src_port),
                socket(f.dst, f.dst_port),
                f.direction.clone(),
                f.pod.clone(),
                if f.policies.is_empty() {
                    "default deny".to_string()
                } else {
                    format!("default deny of {}", f.policies.join(","))
                },
            ]
        })
        .collect::<Vec<_>>();
    table::render(
        &[
            "TIME (UTC)",
            "PROTO",
            "SOURCE",
            "DESTINATION",
            "DIRECTION",
            "POD",
            "DECIDED BY",
        ],
        &rows,
    )
}

/// `ports`: every port the dataplane has.
pub fn render_ports(ports: &[PortInfo]) -> String {
    table::render(
        &[
            "ID", "KIND", "NETNS", "IFNAME", "IPS", "MAC", "MTU", "QUEUES",
        ],
        &ports
            .iter()
            .map(|p| {
                vec![
                    p.id.to_string(),
                    p.kind.clone(),
                    p.netns.clone(),
                    p.ifname.clone(),
                    join(&p.ips),
                    p.mac.to_string(),
                    p.mtu.to_string(),
                    p.queues.to_string(),
                ]
            })
            .collect::<Vec<_>>(),
    )
}

/// `stats`: events, drops by reason and per-port traffic; zero counters only with `all`.
pub fn render_stats(stats: &Stats, all: bool) -> String {
    let pick = |m: &BTreeMap<String, u64>| -> Vec<Vec<String>> {
        m.iter()
            .filter(|(_, v)| all || **v > 0)
            .map(|(k, v)| vec![k.clone(), v.to_string()])
            .collect()
    };
    let mut out = format!("workers: {}\n\n", stats.workers);
    out += &table::render(&["EVENT", "COUNT"], &pick(&stats.counters));
    out += "\n";
    out += &table::render(&["DROP REASON", "COUNT"], &pick(&stats.drops));
    out += "\n";
    out += &table::render(
        &[
            "PORT",
            "IFNAME",
            "RX FRAMES",
            "RX BYTES",
            "TX FRAMES",
            "TX BYTES",
            "TX ERRORS",
        ],
        &stats
            .ports
            .iter()
            .map(|p| {
                vec![
                    p.id.to_string(),
                    p.ifname.clone(),
                    p.rx_frames.to_string(),
                    p.rx_bytes.to_string(),
                    p.tx_frames.to_string(),
                    p.tx_bytes.to_string(),
                    p.tx_errors.to_string(),
                ]
            })
            .collect::<Vec<_>>(),
    );
    out
}

/// The node settings in force, on one line.
pub fn render_node(status: &NodeStatus) -> String {
    match &status.spec {
        None => "no node settings yet (the control process pushes them)\n".into(),
        Some(spec) => format!(
            "node {} at {}  backend {}  uplink {} (MTU {})  pod MTU {}  peers {}\n",
            spec.name,
            spec.underlay,
            spec.backend.kind.name(),
            status.uplink.as_deref().unwrap_or("-"),
            status.uplink_mtu.unwrap_or(0),
            status.pod_mtu.unwrap_or(0),
            spec.peers.len()
        ),
    }
}

/// Any dataplane reply, as the command that asked for it prints it (`all`: zero counters
/// too, for `stats`).
pub fn render_reply(reply: &Reply, all: bool) -> String {
    match reply {
        Reply::Hello(h) => format!(
            "{}\nprotocol version {}, {} workers\ngateway {} / {} at {}\n",
            h.software, h.version, h.workers, h.gateway_ipv4, h.gateway_ipv6, h.gateway_mac
        ),
        Reply::Port(p) => format!(
            "port {} created: {} in {} ({})\n",
            p.id, p.ifname, p.netns, p.mac
        ),
        Reply::Ports(ports) => render_ports(ports),
        Reply::Routes(routes) => render_routes(routes, None, true),
        Reply::Stats(stats) => render_stats(stats, all),
        Reply::Node(status) => render_node(status),
        Reply::NodeDigest(Some(digest)) => format!("{digest:016x}\n"),
        Reply::NodeDigest(None) => "no node settings\n".into(),
        Reply::Nat(nat) => render_nat(nat.as_ref()),
        Reply::Conntrack(entries) => render_conntrack(entries, false),
        Reply::Services(list) => render_services(list, false),
        Reply::ServiceFlows(flows) => render_service_flows(flows, false),
        Reply::Policies(status) => render_policies(status, false),
        Reply::DeniedFlows(flows) => render_denied_flows(flows),
        Reply::Trace(report) => render_trace(report),
        Reply::Done => "done\n".into(),
    }
}

/// `trace`: the packet, then one line per stage.
pub fn render_trace(report: &switchyard_api::TraceReport) -> String {
    let width = report
        .steps
        .iter()
        .map(|s| s.stage.len())
        .max()
        .unwrap_or(0);
    let mut out = format!("{}\n", report.packet);
    for step in &report.steps {
        out.push_str(&format!("  {:width$}  {}\n", step.stage, step.decision));
    }
    out
}

/// `plan`: a node's address, pod CIDRs, backend and peers as the manifests give them.
pub fn render_plan(p: &NodePlan) -> String {
    let mut out = format!(
        "node {}  address {}  pod CIDRs {}  backend {} (VNI {}, port {})\n",
        p.node,
        p.address,
        join(&p.pod_cidrs),
        p.backend.kind.name(),
        p.backend.vni,
        p.backend.port
    );
    let rows: Vec<Vec<String>> = p
        .peers
        .iter()
        .map(|peer| {
            vec![
                peer.node.clone(),
                peer.address.to_string(),
                join(&peer.pod_cidrs),
            ]
        })
        .collect();
    out += &table::render(&["PEER", "ADDRESS", "POD CIDRS"], &rows);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_api::{Backend, MacAddr, NodeSpec, Peer, PortMapping, RouteOrigin};

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn status() -> NodeStatus {
        NodeStatus {
            spec: Some(NodeSpec {
                name: "node-a".into(),
                underlay: [192, 168, 1, 10].into(),
                addresses: vec![IpAddr::from([192, 168, 1, 10])],
                uplink: None,
                pod_cidrs: vec![net("10.244.0.0/24")],
                cluster_cidrs: vec![net("10.244.0.0/16")],
                backend: Backend::default(),
                mtu: None,
                peers: vec![Peer {
                    name: "node-b".into(),
                    underlay: [192, 168, 1, 11].into(),
                    addresses: Vec::new(),
                    pod_cidrs: vec![net("10.244.1.0/24")],
                }],
                masquerade: Default::default(),
                routes: Vec::new(),
                service_cidrs: Vec::new(),
            }),
            uplink: Some("eth0".into()),
            uplink_mtu: Some(1500),
            pod_mtu: Some(1450),
            host_ifname: Some("sy0".into()),
        }
    }

    fn port(id: u32, netns: &str, owner: &str) -> PortInfo {
        PortInfo {
            id,
            kind: "tap".into(),
            netns: netns.into(),
            ifname: "eth0".into(),
            ifindex: 2,
            mac: MacAddr([0x0a, 0x58, 10, 244, 0, id as u8]),
            mtu: 1450,
            ips: vec![net(&format!("10.244.0.{id}/24"))],
            owner: Some(owner.into()),
            pod: None,
            queues: 2,
            port_mappings: vec![PortMapping {
                host_port: 8080,
                container_port: 80,
                protocol: "tcp".into(),
                host_ip: String::new(),
            }],
        }
    }

    #[test]
    fn nodes_list_this_node_first_then_its_peers() {
        let rows = nodes(&status());
        let names: Vec<_> = rows.iter().map(|r| (r.name.as_str(), r.role)).collect();
        assert_eq!(names, [("node-a", "self"), ("node-b", "peer")]);
        assert!(nodes(&NodeStatus {
            spec: None,
            ..status()
        })
        .is_empty());
        let table = render_nodes(&rows, false);
        assert!(table.starts_with("NAME"), "{table}");
        assert!(table.contains("10.244.1.0/24"), "{table}");
    }

    #[test]
    fn pods_are_named_by_namespace_and_skip_the_node_port() {
        let rows = pods(
            &status(),
            &[
                port(5, "/run/netns/pod-a", "cni/abc"),
                port(6, "/proc/1/ns/net", "cni/def"),
                port(1, "/proc/1/ns/net", "node"),
            ],
        );
        assert_eq!(rows.len(), 2, "the node's own port is not a pod");
        assert_eq!(rows[0].name, "pod-a");
        assert_eq!(rows[1].name, "/proc/1/ns/net");
        assert_eq!(rows[0].node, "node-a");
        assert_eq!(rows[0].host_ports, ["8080->80/tcp"]);
        let wide = render_pods(&rows, true);
        assert!(
            wide.contains("HOST-PORTS") && wide.contains("8080->80/tcp"),
            "{wide}"
        );
        assert!(!render_pods(&rows, false).contains("HOST-PORTS"));
    }

    #[test]
    fn routes_name_peer_nodes_when_the_settings_are_known() {
        let routes = [RouteInfo {
            dst: net("10.244.1.0/24"),
            via: NextHop::Peer([192, 168, 1, 11].into()),
            origin: RouteOrigin::Cluster,
        }];
        let named = render_routes(&routes, Some(&status()), true);
        assert!(named.contains("peer node-b (192.168.1.11)"), "{named}");
        assert!(named.contains("cluster"), "{named}");
        let bare = render_routes(&routes, None, false);
        assert!(
            bare.contains("peer 192.168.1.11") && !bare.contains("ORIGIN"),
            "{bare}"
        );
    }

    #[test]
    fn stats_hide_zero_counters_unless_asked() {
        let stats = Stats {
            workers: 2,
            counters: BTreeMap::from([("forwarded_ipv4".into(), 3), ("arp_replies".into(), 0)]),
            drops: BTreeMap::from([("no_route".into(), 0)]),
            ports: Vec::new(),
        };
        let some = render_stats(&stats, false);
        assert!(
            some.contains("forwarded_ipv4") && !some.contains("arp_replies"),
            "{some}"
        );
        let all = render_stats(&stats, true);
        assert!(
            all.contains("arp_replies") && all.contains("no_route"),
            "{all}"
        );
        assert_eq!(
            render_reply(&Reply::Stats(stats), false),
            some,
            "the reply renders as its view"
        );
    }
}
