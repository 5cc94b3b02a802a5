//! What one node's dataplane needs from the cluster state: its own pod CIDRs and address,
//! and for every other node the address to reach it and the pod CIDRs behind it.

use super::config::Backend;
use super::manifests::Manifests;
use ipnet::IpNet;
use serde::Serialize;
use std::net::IpAddr;
use switchyard_api::NodeSpec;

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

/// A Node's key in the cluster state (Nodes have no namespace).
fn node_key(name: &str) -> (String, String) {
    (String::new(), name.to_string())
}

/// The plan of node `name`; an error says what is missing.
pub fn plan(m: &Manifests, name: &str) -> Result<NodePlan, String> {
    let me = m.nodes.get(&node_key(name)).ok_or_else(|| {
        format!(
            "no Node named {name} in the manifests ({} nodes read)",
            m.nodes.len()
        )
    })?;
    if me.pod_cidrs.is_empty() {
        return Err(format!(
            "Node {name} has no spec.podCIDRs yet (kube-controller-manager allocates them \
             with --allocate-node-cidrs); waiting for them"
        ));
    }
    let address = me.internal_ip.ok_or_else(|| {
        format!(
            "Node {name} ({}) has no InternalIP in status.addresses",
            me.file.display()
        )
    })?;
    let mut peers: Vec<Peer> = m
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
    // The same plan whatever order the nodes were stored in.
    peers.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(NodePlan {
        node: name.to_string(),
        address,
        pod_cidrs: me.pod_cidrs.clone(),
        backend: m.config.backend,
        mtu: m.config.mtu,
        peers,
    })
}

impl NodePlan {
    /// What the dataplane is told: this plan with every peer's underlay (IPv4 InternalIP)
    /// and all its InternalIPs, and the cluster CIDRs. `uplink` overrides the interface
    /// found from the node's address.
    pub fn to_spec(&self, m: &Manifests, uplink: Option<String>) -> Result<NodeSpec, String> {
        let v4 = |name: &str, addr: IpAddr| {
            match addr {
            IpAddr::V4(a) => Ok(a),
            IpAddr::V6(_) => Err(format!(
                "Node {name} has no IPv4 InternalIP; the underlay is IPv4 (IPv6-only underlays are not supported yet)"
            )),
        }
        };
        let addresses_of = |name: &str| {
            m.nodes
                .get(&node_key(name))
                .map(|n| n.internal_ips.clone())
                .unwrap_or_default()
        };
        let peers = self
            .peers
            .iter()
            .map(|p| {
                Ok(switchyard_api::Peer {
                    name: p.node.clone(),
                    underlay: v4(&p.node, p.address)?,
                    addresses: addresses_of(&p.node),
                    pod_cidrs: p.pod_cidrs.clone(),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(NodeSpec {
            name: self.node.clone(),
            underlay: v4(&self.node, self.address)?,
            addresses: addresses_of(&self.node),
            uplink,
            pod_cidrs: self.pod_cidrs.clone(),
            cluster_cidrs: [m.config.cluster_cidr, m.config.cluster_cidr_v6]
                .into_iter()
                .flatten()
                .collect(),
            backend: self.backend,
            mtu: self.mtu,
            peers,
            masquerade: m.config.masquerade.clone(),
            routes: m.config.routes.clone(),
            service_cidrs: m.config.service_cidrs.clone(),
        })
    }
}
