//! What one node's dataplane needs from the cluster state: its own pod CIDRs and address,
//! and for every other node the address to reach it and the pod CIDRs behind it.

use super::config::Backend;
use super::manifests::Manifests;
use ipnet::IpNet;
use serde::Serialize;
use std::net::IpAddr;

/// Another node, as seen from this one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Peer {
    /// Node name.
    pub node: String,
    /// Its InternalIP: the tunnel endpoint or next hop.
    pub address: IpAddr,
    /// The pod CIDRs routed to it.
    pub pod_cidrs: Vec<IpNet>,
}

/// One node's share of the cluster state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodePlan {
    /// This node's name.
    pub node: String,
    /// This node's InternalIP.
    pub address: IpAddr,
    /// This node's pod CIDRs.
    pub pod_cidrs: Vec<IpNet>,
    /// How traffic crosses to peers.
    pub backend: Backend,
    /// Configured pod MTU, if any.
    pub mtu: Option<u32>,
    /// Every other node with an address and pod CIDRs, by name.
    pub peers: Vec<Peer>,
}

/// The plan of node `name`; an error says what is missing.
pub fn plan(m: &Manifests, name: &str) -> Result<NodePlan, String> {
    let me = m.nodes.iter().find(|n| n.name == name).ok_or_else(|| {
        format!(
            "no Node named {name} in the manifests ({} nodes read)",
            m.nodes.len()
        )
    })?;
    let address = me.internal_ip.ok_or_else(|| {
        format!(
            "Node {name} ({}) has no InternalIP in status.addresses",
            me.file.display()
        )
    })?;
    let peers = m
        .nodes
        .iter()
        .filter(|n| n.name != name && !n.pod_cidrs.is_empty())
        .filter_map(|n| {
            Some(Peer {
                node: n.name.clone(),
                address: n.internal_ip?,
                pod_cidrs: n.pod_cidrs.clone(),
            })
        })
        .collect();
    Ok(NodePlan {
        node: name.to_string(),
        address,
        pod_cidrs: me.pod_cidrs.clone(),
        backend: m.config.backend,
        mtu: m.config.mtu,
        peers,
    })
}
