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
//! The dataplane's compiled rules will be checked against this evaluation.

pub mod selector;

use crate::cluster::manifests::Manifests;
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The answer to "may this connection happen?".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Whether both the client's egress and the server's ingress allow it.
    pub allowed: bool,
    /// Which policy and rule decided, or that no policy applies.
    pub reason: String,
}

/// A pod as policies see it: namespace, name, labels, address, container ports.
#[derive(Debug, Clone)]
pub struct PodView<'a> {
    /// `metadata.namespace`.
    pub namespace: &'a str,
    /// `metadata.name`.
    pub name: &'a str,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `status.podIPs` (first).
    pub ip: Option<IpAddr>,
    /// Named container ports: name -> (port, protocol).
    pub ports: BTreeMap<String, (u16, String)>,
}

/// Builds the policy view of a pod.
pub fn pod_view(pod: &Pod) -> PodView<'_> {
    let meta = &pod.metadata;
    let mut ports = BTreeMap::new();
    for c in pod.spec.iter().flat_map(|s| &s.containers) {
        for p in c.ports.iter().flatten() {
            if let Some(name) = &p.name {
                let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".into());
                ports.insert(name.clone(), (p.container_port as u16, protocol));
            }
        }
    }
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| {
            s.pod_ips
                .as_ref()
                .and_then(|ips| ips.first().map(|p| p.ip.clone()))
                .or_else(|| s.pod_ip.clone())
        })
        .and_then(|t| t.parse().ok());
    PodView {
        namespace: meta.namespace.as_deref().unwrap_or("default"),
        name: meta.name.as_deref().unwrap_or_default(),
        labels: meta.labels.clone().unwrap_or_default(),
        ip,
        ports,
    }
}

/// A namespace's labels, with `kubernetes.io/metadata.name` as Kubernetes sets it.
fn namespace_labels(m: &Manifests, namespace: &str) -> BTreeMap<String, String> {
    let mut labels = m
        .namespaces
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(namespace))
        .and_then(|n| n.metadata.labels.clone())
        .unwrap_or_default();
    labels.insert("kubernetes.io/metadata.name".into(), namespace.into());
    labels
}

/// The directions a policy applies to: `(ingress, egress)`.
fn directions(policy: &NetworkPolicy) -> (bool, bool) {
    let spec = policy.spec.clone().unwrap_or_default();
    match &spec.policy_types {
        Some(types) => (
            types.iter().any(|t| t == "Ingress"),
            types.iter().any(|t| t == "Egress"),
        ),
        None => (true, spec.egress.is_some_and(|e| !e.is_empty())),
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
    policy.metadata.namespace.as_deref().unwrap_or("default") == pod.namespace
        && selector::matches(
            &policy
                .spec
                .as_ref()
                .and_then(|s| s.pod_selector.clone())
                .unwrap_or_default(),
            &pod.labels,
        )
}

/// True when `peer` (in a policy of namespace `policy_ns`) matches `pod`.
fn peer_matches(m: &Manifests, peer: &NetworkPolicyPeer, policy_ns: &str, pod: &PodView) -> bool {
    if let Some(block) = &peer.ip_block {
        let Some(ip) = pod.ip else { return false };
        let inside = |cidr: &str| cidr.parse::<IpNet>().is_ok_and(|n| n.contains(&ip));
        return inside(&block.cidr) && !block.except.iter().flatten().any(|e| inside(e));
    }
    let namespace_ok = match &peer.namespace_selector {
        Some(sel) => selector::matches(sel, &namespace_labels(m, pod.namespace)),
        None => pod.namespace == policy_ns,
    };
    let pod_ok = peer
        .pod_selector
        .as_ref()
        .is_none_or(|sel| selector::matches(sel, &pod.labels));
    namespace_ok && pod_ok
}

/// True when `ports` (empty: all) admit `port`/`protocol` on `server`.
fn port_matches(ports: &[NetworkPolicyPort], port: u16, protocol: &str, server: &PodView) -> bool {
    ports.is_empty()
        || ports.iter().any(|p| {
            let p_protocol = p.protocol.as_deref().unwrap_or("TCP");
            if !p_protocol.eq_ignore_ascii_case(protocol) {
                return false;
            }
            match &p.port {
                None => true,
                Some(IntOrString::Int(n)) => {
                    let end = p.end_port.unwrap_or(*n);
                    (*n..=end).contains(&i32::from(port))
                }
                Some(IntOrString::String(name)) => server
                    .ports
                    .get(name)
                    .is_some_and(|(n, proto)| *n == port && proto.eq_ignore_ascii_case(protocol)),
            }
        })
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
        let (does_ingress, does_egress) = directions(policy);
        if (ingress && !does_ingress) || (!ingress && !does_egress) || !selects(policy, subject) {
            continue;
        }
        let name = policy_name(policy);
        let ns = policy.metadata.namespace.as_deref().unwrap_or("default");
        let spec = policy.spec.clone().unwrap_or_default();
        let rules: Vec<(Vec<NetworkPolicyPeer>, Vec<NetworkPolicyPort>)> = if ingress {
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
        };
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
