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
