//! NetworkPolicy as the dataplane needs it: for each pod of the node that a policy
//! selects, the rules that allow traffic into it (ingress) and out of it (egress), with
//! every selector already resolved to addresses and every named port to a number by the
//! control process. Pushed whole with [`crate::Request::ApplyPolicies`].
//!
//! A pod absent from [`PolicySet::pods`], or whose direction is `None`, is open in that
//! direction; a direction with no rule denies everything (Kubernetes' "default deny").

use crate::IpNet;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// Every policy in force on the node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicySet {
    /// Rules, shared by the pods that use them (referred to by index).
    #[serde(default)]
    pub rules: Vec<PolicyRule>,
    /// The pods some policy selects.
    #[serde(default)]
    pub pods: Vec<PodPolicy>,
}

/// One allowing rule: traffic from or to any of `peers` on any of `ports`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PolicyRule {
    /// The policy and rule it comes from (`NAMESPACE/NAME ingress rule 0`).
    pub origin: String,
    /// The peers; empty: every peer.
    #[serde(default)]
    pub peers: Vec<PolicyPeer>,
    /// The ports; empty: every port of every protocol.
    #[serde(default)]
    pub ports: Vec<PolicyPort>,
}

/// Addresses a rule admits: a prefix without the prefixes in `except`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PolicyPeer {
    /// The prefix (a pod is `ADDRESS/32` or `/128`).
    pub cidr: IpNet,
    /// Prefixes inside `cidr` that are not admitted.
    #[serde(default)]
    pub except: Vec<IpNet>,
}

/// Ports a rule admits: one protocol, and one port, a range, or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PolicyPort {
    /// IP protocol number: 6 (TCP), 17 (UDP) or 132 (SCTP).
    pub protocol: u8,
    /// First port; 0: every port of the protocol.
    #[serde(default)]
    pub port: u16,
    /// Last port of a range (`endPort`); none: `port` alone.
    #[serde(default)]
    pub end_port: Option<u16>,
}

/// A pod some policy selects, and what those policies allow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodPolicy {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `status.podIPs`.
    pub addresses: Vec<IpAddr>,
    /// Traffic into the pod; none: open.
    #[serde(default)]
    pub ingress: Option<PolicyDirection>,
    /// Traffic out of the pod; none: open.
    #[serde(default)]
    pub egress: Option<PolicyDirection>,
}

/// One direction of a selected pod: the policies that select it and their rules.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDirection {
    /// The policies selecting the pod for this direction (`NAMESPACE/NAME`).
    pub policies: Vec<String>,
    /// Indexes into [`PolicySet::rules`]; none: everything is denied.
    #[serde(default)]
    pub rules: Vec<u32>,
}

/// A selected pod as the dataplane lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodPolicyStatus {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// Its addresses.
    pub addresses: Vec<IpAddr>,
    /// The policies selecting it for ingress (none: open).
    #[serde(default)]
    pub ingress: Option<Vec<String>>,
    /// The policies selecting it for egress (none: open).
    #[serde(default)]
    pub egress: Option<Vec<String>>,
    /// The allowing rules of ingress (their origins).
    #[serde(default)]
    pub ingress_rules: Vec<String>,
    /// The allowing rules of egress (their origins).
    #[serde(default)]
    pub egress_rules: Vec<String>,
}

/// The policy state of the dataplane: its pods, and the generation of the rules in force.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStatus {
    /// Increases with every change pushed.
    pub generation: u64,
    /// Flows whose verdict is remembered.
    pub flows: usize,
    /// The selected pods of this node.
    pub pods: Vec<PodPolicyStatus>,
}

/// A flow the policies denied, as the dataplane remembers the last ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeniedFlow {
    /// When, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// `tcp`, `udp`, `sctp`, `icmp` or the protocol number.
    pub protocol: String,
    /// The client.
    pub src: IpAddr,
    /// The client's port (0 where the protocol has none).
    pub src_port: u16,
    /// The server.
    pub dst: IpAddr,
    /// The server's port.
    pub dst_port: u16,
    /// `ingress` (the server's policies denied it) or `egress` (the client's).
    pub direction: String,
    /// The pod whose policies denied it (`NAMESPACE/NAME`).
    pub pod: String,
    /// The policies that select that pod, none of which allows the flow.
    pub policies: Vec<String>,
}
