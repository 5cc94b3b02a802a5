//! This node's place in the cluster: what the control process computes from the cluster's
//! Nodes and pushes with [`crate::Request::SetNode`], and what the dataplane reports back.

use crate::IpNet;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr};

/// How pod traffic crosses between nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    /// VXLAN (RFC 7348) over UDP.
    Vxlan,
    /// IP-in-IP (IPv4 inner: protocol 4; IPv6 inner: protocol 41).
    Ipip,
    /// No encapsulation: packets are routed to the peer node as they are; every peer must
    /// be on-link.
    Direct,
}

impl BackendKind {
    /// The name used in configuration (`vxlan`, `ipip`, `direct`).
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Vxlan => "vxlan",
            BackendKind::Ipip => "ipip",
            BackendKind::Direct => "direct",
        }
    }

    /// Bytes the encapsulation adds to every packet on an IPv4 underlay (outer Ethernet
    /// excluded).
    pub fn overhead(self) -> u32 {
        match self {
            BackendKind::Vxlan => 50,
            BackendKind::Ipip => 20,
            BackendKind::Direct => 0,
        }
    }
}

/// The overlay settings shared by every node (the `backend` section of the cluster
/// configuration; absent fields take their defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Backend {
    /// Encapsulation.
    #[serde(rename = "type")]
    pub kind: BackendKind,
    /// VXLAN network identifier (24 bits).
    pub vni: u32,
    /// VXLAN UDP destination port.
    pub port: u16,
}

impl Default for Backend {
    fn default() -> Self {
        Self {
            kind: BackendKind::Vxlan,
            vni: 1,
            port: 4789,
        }
    }
}

/// A route the cluster configuration adds to every node (`routes: [{dst, via}]`): the
/// node's stack, and so its pods, reach `dst` through `via`, which must be on-link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtraRoute {
    /// Destination prefix.
    pub dst: IpNet,
    /// Next-hop router.
    pub via: IpAddr,
}

/// Another node, as this node's dataplane needs it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Peer {
    /// The Node's name.
    pub name: String,
    /// Its underlay (IPv4 InternalIP) address: where encapsulated traffic goes.
    pub underlay: Ipv4Addr,
    /// All its InternalIP addresses (IPv4 and IPv6), reached through the overlay.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// Its pod CIDRs.
    pub pod_cidrs: Vec<IpNet>,
}

/// Everything the dataplane needs to join the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeSpec {
    /// This Node's name.
    pub name: String,
    /// Its underlay (IPv4 InternalIP) address, the source of encapsulated traffic.
    pub underlay: Ipv4Addr,
    /// All its InternalIP addresses (IPv4 and IPv6): pods reach the node's own stack at
    /// these.
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    /// The interface that carries underlay traffic; found from `underlay` when absent.
    #[serde(default)]
    pub uplink: Option<String>,
    /// This node's pod CIDRs.
    pub pod_cidrs: Vec<IpNet>,
    /// The cluster's pod networks (the node's own stack routes them to the dataplane).
    pub cluster_cidrs: Vec<IpNet>,
    /// Overlay settings.
    pub backend: Backend,
    /// Pod MTU; the uplink's MTU minus the encapsulation overhead when absent.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Every other node.
    pub peers: Vec<Peer>,
    /// Masquerade of pod traffic leaving the cluster.
    #[serde(default)]
    pub masquerade: Masquerade,
    /// Routes added to the node's stack.
    #[serde(default)]
    pub routes: Vec<ExtraRoute>,
    /// The Services' virtual address ranges (never masqueraded).
    #[serde(default)]
    pub service_cidrs: Vec<IpNet>,
}

impl NodeSpec {
    /// A digest of these settings that every version of the agent and the dataplane
    /// computes alike: FNV-1a (64 bits) over their JSON encoding.
    pub fn digest(&self) -> u64 {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
            (hash ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        })
    }
}

/// What the dataplane made of a [`NodeSpec`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// The spec in force (none until the control process pushed one).
    pub spec: Option<NodeSpec>,
    /// The uplink interface found or given.
    #[serde(default)]
    pub uplink: Option<String>,
    /// MTU of the uplink.
    #[serde(default)]
    pub uplink_mtu: Option<u32>,
    /// MTU given to new pods, and the largest packet a pod may send to another node.
    #[serde(default)]
    pub pod_mtu: Option<u32>,
    /// The node-side interface through which the node's own stack reaches pods.
    #[serde(default)]
    pub host_ifname: Option<String>,
}

/// Source ports for masquerade, inclusive: `"61000-65534"` in configuration. The default
/// lies above Linux's ephemeral range (32768-60999), so that no connection the node opened
/// before the dataplane started has a port whose replies would be steered into it. A range
/// ends at 65534 at most: the kernel's policy rules, which steer the replies, cannot match
/// port 65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port.
    pub last: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        Self {
            first: 61000,
            last: 65534,
        }
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a port range like \"61000-65534\"");
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        if first < 1024 || last < first || last == u16::MAX {
            return Err(format!(
                "port range {s:?} must lie within 1024-65534 (the kernel's policy rules cannot \
                 match 65535) and start at or before its end"
            ));
        }
        Ok(Self { first, last })
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// How pod traffic leaving the cluster is masqueraded (the `masquerade` section of the
/// cluster configuration, shaped like ip-masq-agent's).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Masquerade {
    /// Destinations never masqueraded, besides the cluster's pod networks. Empty by
    /// default: everything outside the cluster is masqueraded (ip-masq-agent's default
    /// exempts the RFC 1918 ranges instead).
    #[serde(rename = "nonMasqueradeCIDRs")]
    pub non_masquerade_cidrs: Vec<IpNet>,
    /// Masquerade traffic to link-local addresses (169.254.0.0/16) too.
    pub masq_link_local: bool,
    /// The node's source ports for masqueraded flows; the node's own sockets do not use
    /// them (the dataplane reserves them).
    pub port_range: PortRange,
    /// The most flows tracked at once; new flows beyond it are dropped and counted.
    pub conntrack_max: usize,
}

impl Default for Masquerade {
    fn default() -> Self {
        Self {
            non_masquerade_cidrs: Vec::new(),
            masq_link_local: false,
            port_range: PortRange::default(),
            conntrack_max: 1 << 20,
        }
    }
}

/// Masquerade's state on a node (`switchyard-control get nat`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatStatus {
    /// The address flows are masqueraded to.
    pub node: std::net::Ipv4Addr,
    /// The source port range.
    pub port_range: PortRange,
    /// Flows tracked.
    pub flows: usize,
    /// The most flows tracked at once.
    pub limit: usize,
    /// Flows per protocol.
    pub tcp: usize,
    /// UDP flows.
    pub udp: usize,
    /// ICMP echo flows.
    pub icmp: usize,
    /// Flows not established dropped to make room for new ones while the table was full (since
    /// v6).
    #[serde(default)]
    pub early_drops: u64,
}

/// One tracked flow (`switchyard-control get conntrack`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackEntry {
    /// `tcp`, `udp` or `icmp`.
    pub protocol: String,
    /// `masquerade` (opened by the pod) or `hostPort` (opened by a client through a port
    /// published to the pod).
    #[serde(default = "masquerade_kind")]
    pub kind: String,
    /// The pod's address.
    pub pod: std::net::Ipv4Addr,
    /// The pod's port (ICMP: echo identifier).
    pub pod_port: u16,
    /// The remote address.
    pub remote: std::net::Ipv4Addr,
    /// The remote port (ICMP: echo identifier).
    pub remote_port: u16,
    /// The node's port the flow was given.
    pub node_port: u16,
    /// `new`, `established`, `closing` or `closed`.
    pub state: String,
    /// Seconds since the last packet.
    pub idle_s: u64,
}

fn masquerade_kind() -> String {
    "masquerade".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(peers: usize) -> NodeSpec {
        NodeSpec {
            name: "node-a".into(),
            underlay: Ipv4Addr::new(192, 0, 2, 1),
            addresses: Vec::new(),
            uplink: None,
            pod_cidrs: vec!["10.244.0.0/24".parse().unwrap()],
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            backend: Backend::default(),
            mtu: None,
            peers: (0..peers)
                .map(|i| Peer {
                    name: format!("node-{i}"),
                    underlay: Ipv4Addr::new(192, 0, 2, 10 + i as u8),
                    addresses: Vec::new(),
                    pod_cidrs: vec![format!("10.244.{}.0/24", i + 1).parse().unwrap()],
                })
                .collect(),
            masquerade: Masquerade::default(),
            routes: Vec::new(),
            service_cidrs: Vec::new(),
        }
    }

    #[test]
    fn the_digest_follows_the_settings() {
        assert_eq!(spec(3).digest(), spec(3).digest());
        assert_ne!(spec(3).digest(), spec(4).digest());
        let mut moved = spec(3);
        moved.peers[1].underlay = Ipv4Addr::new(192, 0, 2, 99);
        assert_ne!(moved.digest(), spec(3).digest());
        // What goes over the socket comes back with the same digest.
        let text = serde_json::to_string(&spec(3)).unwrap();
        let back: NodeSpec = serde_json::from_str(&text).unwrap();
        assert_eq!(back.digest(), spec(3).digest());
    }
}
