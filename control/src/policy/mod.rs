//! NetworkPolicy as Kubernetes defines it, evaluated from the cluster's objects alone:
//! whether a connection from one pod to another pod's port is allowed, and which policy and
//! rule decided (`switchyard-control explain`).
//!
//! The semantics:
//! * a pod selected by no policy of a direction (`Ingress`, `Egress`) is open in that
//!   direction; policies are unioned: one rule of one policy that allows is enough;
//! * `policyTypes`, when absent, is `Ingress`, plus `Egress` when the policy has egress
//!   rules;
//! * egress is checked for the client, ingress for the server, and both must allow;
//! * a rule with no peers allows every peer; with no ports, every port;
//! * a peer's `podSelector` alone selects pods of the policy's namespace; a
//!   `namespaceSelector` alone, every pod of the namespaces it selects; both in one peer,
//!   the pods both select (AND); two peers are alternatives (OR); `ipBlock` matches the
//!   pod's address inside its CIDR and outside every `except` (which narrows its own peer
//!   only);
//! * a port is a number, a range (`port` to `endPort`) or a name, resolved against the
//!   destination pod's container ports; the protocol defaults to TCP;
//! * a namespace's labels include `kubernetes.io/metadata.name` as Kubernetes sets it.
//!
//! [`compile`] turns the same semantics into the rules the dataplane enforces; a property
//! test holds the two together.

pub mod compile;
pub mod selector;

pub use crate::cluster::pods::{pod_view, protocol_number, PodView};

use crate::cluster::manifests::Manifests;
use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::IpAddr;
use switchyard_api::PolicyPort;

/// The answer to "may this connection happen?".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Whether both the client's egress and the server's ingress allow it.
    pub allowed: bool,
    /// Which policy and rule decided, or that no policy applies.
    pub reason: String,
}

/// The label Kubernetes sets on every namespace: its name.
pub const NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// A namespace's labels, with `kubernetes.io/metadata.name` as Kubernetes sets it.
fn namespace_labels(m: &Manifests, namespace: &str) -> BTreeMap<String, String> {
    let mut labels = m
        .namespaces
        .get(&(String::new(), namespace.to_string()))
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    labels.insert(NAME_LABEL.into(), namespace.into());
    labels
}

/// The directions a policy applies to: `(ingress, egress)`.
fn directions(policy: &NetworkPolicy) -> (bool, bool) {
    let Some(spec) = &policy.spec else {
        return (true, false);
    };
    match &spec.policy_types {
        Some(types) => (
            types.iter().any(|t| t == "Ingress"),
            types.iter().any(|t| t == "Egress"),
        ),
        None => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
    }
}

fn policy_name(policy: &NetworkPolicy) -> String {
    format!(
        "{}/{}",
        policy.metadata.namespace.as_deref().unwrap_or("default"),
        policy.metadata.name.as_deref().unwrap_or_default()
    )
}

/// True when `policy` selects `pod`.
fn selects(policy: &NetworkPolicy, pod: &PodView) -> bool {
    policy.metadata.namespace.as_deref().unwrap_or("default") == pod.namespace.as_str()
        && policy
            .spec
            .as_ref()
            .and_then(|s| s.pod_selector.as_ref())
            .is_none_or(|sel| selector::matches(sel, &pod.labels))
}

/// True when `peer` (in a policy of namespace `policy_ns`) matches `pod`.
fn peer_matches(m: &Manifests, peer: &NetworkPolicyPeer, policy_ns: &str, pod: &PodView) -> bool {
    peer_admits(peer, policy_ns, pod, |sel| {
        selector::matches(sel, &namespace_labels(m, &pod.namespace))
    })
}

/// True when `peer` (in a policy of namespace `policy_ns`) matches `pod`, whose namespace
/// a namespace selector selects when `namespace_selected` says so.
fn peer_admits(
    peer: &NetworkPolicyPeer,
    policy_ns: &str,
    pod: &PodView,
    namespace_selected: impl Fn(&LabelSelector) -> bool,
) -> bool {
    if let Some(block) = &peer.ip_block {
        let Some(ip) = pod.ip else { return false };
        return in_block(block, ip);
    }
    let namespace_ok = match &peer.namespace_selector {
        Some(sel) => namespace_selected(sel),
        None => pod.namespace == policy_ns,
    };
    let pod_ok = peer
        .pod_selector
        .as_ref()
        .is_none_or(|sel| selector::matches(sel, &pod.labels));
    namespace_ok && pod_ok
}

/// True when `ip` is inside the block's CIDR and outside every `except`.
fn in_block(block: &IPBlock, ip: IpAddr) -> bool {
    let inside = |cidr: &str| cidr.parse::<IpNet>().is_ok_and(|n| n.contains(&ip));
    inside(&block.cidr) && !block.except.iter().flatten().any(|e| inside(e))
}

/// A policy port as the dataplane admits it, its name resolved against `server`'s
/// container ports; `None` when it admits nothing (a name `server` does not have, or has
/// for another protocol; any name when there is no server).
pub fn wire_port(p: &NetworkPolicyPort, server: Option<&PodView>) -> Option<PolicyPort> {
    let protocol = protocol_number(p.protocol.as_deref().unwrap_or("TCP"))?;
    let (port, end_port) = match &p.port {
        None => (0, None),
        Some(IntOrString::Int(n)) => (
            u16::try_from(*n).ok()?,
            p.end_port.and_then(|e| u16::try_from(e).ok()),
        ),
        Some(IntOrString::String(name)) => {
            let named = server?.port(name)?;
            if named.protocol != Some(protocol) {
                return None;
            }
            (named.port, None)
        }
    };
    Some(PolicyPort {
        protocol,
        port,
        end_port,
    })
}

/// True when the dataplane's `port` admits `protocol`/`number`.
pub fn admits(port: &PolicyPort, protocol: u8, number: u16) -> bool {
    port.protocol == protocol
        && (port.port == 0 || (port.port..=port.end_port.unwrap_or(port.port)).contains(&number))
}

/// True when `ports` (empty: all) admit `port`/`protocol` on `server`.
fn port_matches(ports: &[NetworkPolicyPort], port: u16, protocol: &str, server: &PodView) -> bool {
    let Some(protocol) = protocol_number(protocol) else {
        return ports.is_empty();
    };
    ports.is_empty()
        || ports
            .iter()
            .filter_map(|p| wire_port(p, Some(server)))
            .any(|p| admits(&p, protocol, port))
}

/// The rules of `policy` for one direction: (peers, ports) each.
fn rules(
    policy: &NetworkPolicy,
    ingress: bool,
) -> Vec<(Vec<NetworkPolicyPeer>, Vec<NetworkPolicyPort>)> {
    let spec = policy.spec.clone().unwrap_or_default();
    if ingress {
        spec.ingress
            .unwrap_or_default()
            .into_iter()
            .map(|r| (r.from.unwrap_or_default(), r.ports.unwrap_or_default()))
            .collect()
    } else {
        spec.egress
            .unwrap_or_default()
            .into_iter()
            .map(|r| (r.to.unwrap_or_default(), r.ports.unwrap_or_default()))
            .collect()
    }
}

/// True when `policy` selects `pod` for the direction (`ingress`, else egress).
fn applies(policy: &NetworkPolicy, ingress: bool, pod: &PodView) -> bool {
    let (does_ingress, does_egress) = directions(policy);
    (if ingress { does_ingress } else { does_egress }) && selects(policy, pod)
}

/// One direction's answer: `None` when no policy applies (open), else the allowing rule or
/// `Err` with the policies that selected the pod.
fn direction(
    m: &Manifests,
    ingress: bool,
    subject: &PodView,
    other: &PodView,
    port: u16,
    protocol: &str,
    server: &PodView,
) -> Option<Result<String, Vec<String>>> {
    let mut applying = Vec::new();
    for policy in m.policies.iter().map(|p| &p.policy) {
        if !applies(policy, ingress, subject) {
            continue;
        }
        let name = policy_name(policy);
        let ns = policy.metadata.namespace.as_deref().unwrap_or("default");
        let rules = rules(policy, ingress);
        for (i, (peers, ports)) in rules.iter().enumerate() {
            let peer_ok = peers.is_empty() || peers.iter().any(|p| peer_matches(m, p, ns, other));
            if peer_ok && port_matches(ports, port, protocol, server) {
                let kind = if ingress { "ingress" } else { "egress" };
                return Some(Ok(format!("{name} {kind} rule {i}")));
            }
        }
        applying.push(name);
    }
    if applying.is_empty() {
        None
    } else {
        Some(Err(applying))
    }
}

/// Whether `client` may connect to `server`'s `port`/`protocol`, and why.
pub fn explain(
    m: &Manifests,
    client: &PodView,
    server: &PodView,
    port: u16,
    protocol: &str,
) -> Verdict {
    let egress = direction(m, false, client, server, port, protocol, server);
    let ingress = direction(m, true, server, client, port, protocol, server);
    let describe = |d: &Option<Result<String, Vec<String>>>, what: &str| match d {
        None => format!("no policy selects {what}"),
        Some(Ok(rule)) => format!("allowed by {rule}"),
        Some(Err(policies)) => format!("denied: no rule of {} allows it", policies.join(", ")),
    };
    let allowed = !matches!(egress, Some(Err(_))) && !matches!(ingress, Some(Err(_)));
    let reason = format!(
        "egress of {}/{}: {}; ingress of {}/{}: {}",
        client.namespace,
        client.name,
        describe(&egress, "the client for egress"),
        server.namespace,
        server.name,
        describe(&ingress, "the server for ingress"),
    );
    Verdict { allowed, reason }
}

#[cfg(test)]
mod tests;
