//! The NetworkPolicy rules the control process pushes: validated, compiled into the
//! snapshot's policy table with this node's own addresses (traffic between a pod and its
//! node always passes), and listed with the flows they denied last.

use super::{invalid, protocol_name, State, Switch};
use crate::tables::policy::PolicyTable;
use crate::wire::ipv4;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use switchyard_api::{
    ApiError, DeniedFlow, NodeSpec, PodPolicyStatus, PolicySet, PolicyStatus, Reply,
};

/// The rules in force and their generation.
#[derive(Default)]
pub(super) struct Policies {
    set: PolicySet,
    generation: u64,
}

impl Policies {
    /// Compiles the rules in force as a new generation, for a node with settings `node`.
    pub(super) fn table(
        &mut self,
        gateway: &crate::tables::Gateway,
        node: Option<&NodeSpec>,
    ) -> Arc<PolicyTable> {
        self.generation += 1;
        let mut own: Vec<IpAddr> = vec![gateway.ipv4.into(), gateway.ipv6.into()];
        if let Some(spec) = node {
            own.push(spec.underlay.into());
            own.extend(spec.addresses.iter().copied());
        }
        Arc::new(PolicyTable::compile(&self.set, self.generation, own))
    }
}

/// Refuses rules the dataplane cannot enforce as asked, saying why.
fn validate(set: &PolicySet) -> Result<(), ApiError> {
    for rule in &set.rules {
        for port in &rule.ports {
            if ![ipv4::PROTO_TCP, ipv4::PROTO_UDP, ipv4::PROTO_SCTP].contains(&port.protocol) {
                return Err(invalid(format!(
                    "{}: protocol {} is not TCP (6), UDP (17) or SCTP (132)",
                    rule.origin, port.protocol
                )));
            }
            if port.end_port.is_some_and(|end| end < port.port) {
                return Err(invalid(format!(
                    "{}: endPort {} is below port {}",
                    rule.origin,
                    port.end_port.unwrap_or_default(),
                    port.port
                )));
            }
        }
        for peer in &rule.peers {
            if let Some(e) = peer.except.iter().find(|e| !peer.cidr.contains(*e)) {
                return Err(invalid(format!(
                    "{}: except {e} is not inside {}",
                    rule.origin, peer.cidr
                )));
            }
        }
    }
    for pod in &set.pods {
        let directions = pod.ingress.iter().chain(&pod.egress);
        if let Some(i) = directions
            .flat_map(|d| &d.rules)
            .find(|i| **i as usize >= set.rules.len())
        {
            return Err(invalid(format!(
                "pod {}/{} refers to rule {i}, but there are {} rules",
                pod.namespace,
                pod.name,
                set.rules.len()
            )));
        }
    }
    Ok(())
}

impl Switch {
    /// Replaces the rules in force: all at once, or not at all when they are invalid.
    pub(super) fn apply_policies(&self, set: PolicySet) -> Result<Reply, ApiError> {
        validate(&set)?;
        let mut state = self.state();
        let state: &mut State = &mut state;
        state.policies.set = set;
        let node = state.node.as_ref().map(|n| &n.spec);
        let table = state.policies.table(&self.config.gateway, node);
        state.builder.set_policy(table);
        self.publish(state);
        Ok(Reply::Done)
    }

    /// The selected pods with ports on this node, and the rules in force.
    pub(super) fn list_policies(&self) -> Reply {
        let tables = self.tables();
        let local = |addr: &IpAddr| {
            tables.ports.values().any(|p| match addr {
                IpAddr::V4(a) => p.ipv4.contains(a),
                IpAddr::V6(a) => p.ipv6.contains(a),
            })
        };
        let pods = tables
            .policy
            .pods()
            .into_iter()
            .filter(|p| p.addresses.iter().any(local))
            .map(|p| {
                let (namespace, name) = p.name.split_once('/').unwrap_or(("", &p.name));
                PodPolicyStatus {
                    namespace: namespace.into(),
                    name: name.into(),
                    addresses: p.addresses.clone(),
                    ingress: p.ingress.as_ref().map(|r| r.policies.to_vec()),
                    egress: p.egress.as_ref().map(|r| r.policies.to_vec()),
                    ingress_rules: p
                        .ingress
                        .as_ref()
                        .map(|r| r.origins.clone())
                        .unwrap_or_default(),
                    egress_rules: p
                        .egress
                        .as_ref()
                        .map(|r| r.origins.clone())
                        .unwrap_or_default(),
                }
            })
            .collect();
        Reply::Policies(PolicyStatus {
            generation: tables.policy.generation,
            flows: tables.policy_flows.len(),
            pods,
        })
    }

    /// The flows the policies denied last, oldest first.
    pub(super) fn denied_flows(&self) -> Reply {
        let now_ns = crate::worker::monotonic_ns();
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let flows = self
            .tables()
            .policy_flows
            .denied()
            .into_iter()
            .map(|d| DeniedFlow {
                time_ms: now_ms.saturating_sub(now_ns.saturating_sub(d.at_ns) / 1_000_000),
                protocol: protocol_name(d.flow.protocol),
                src: d.flow.src,
                src_port: d.flow.src_port,
                dst: d.flow.dst,
                dst_port: d.flow.dst_port,
                direction: if d.denial.ingress {
                    "ingress"
                } else {
                    "egress"
                }
                .into(),
                pod: d.denial.pod.to_string(),
                policies: d.denial.policies.to_vec(),
            })
            .collect();
        Reply::DeniedFlows(flows)
    }
}
