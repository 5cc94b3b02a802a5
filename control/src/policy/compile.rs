//! NetworkPolicies compiled into the rules the dataplane enforces ([`PolicySet`]): for
//! each pod of the node that a policy selects, per direction, the policies selecting it and
//! their rules in order, with every selector resolved to the addresses of the pods it
//! matches and every named port to a number.
//!
//! * An ingress rule's named ports resolve against the selected pod itself (the server).
//! * An egress rule's named ports resolve against each destination pod: such a rule
//!   becomes one rule per set of destinations that resolve the names alike (numbered ports
//!   keep one rule for every peer).
//! * A rule whose peers, or whose ports, all resolve to nothing admits nothing and is left
//!   out (the dataplane reads an empty list as "all").
//!
//! A rule is resolved once, whatever the number of pods it applies to, and shared between
//! them; pods are found through an index of their labels.

use super::{applies, in_block, peer_admits, policy_name, rules, selector, wire_port, NAME_LABEL};
use crate::cluster::manifests::Manifests;
use crate::cluster::pods::LabelSet;
use ipnet::IpNet;
use k8s_openapi::api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use switchyard_api::{PodPolicy, PolicyDirection, PolicyPeer, PolicyPort, PolicyRule, PolicySet};

/// The rules of the pods on `node` (every pod when `None`; pods that name no node are
/// always included), as the dataplane takes them.
pub fn compile(m: &Manifests, node: Option<&str>) -> PolicySet {
    let mut c = Compiler::new(m);
    let mut set = PolicySet::default();
    let subjects: Vec<usize> = match node {
        Some(node) => m.pods.on_node(node),
        None => (0..m.pods.len()).collect(),
    };
    for i in subjects {
        let pod = &m.pods[i];
        if pod.ips.is_empty() {
            continue;
        }
        let ingress = c.direction(i, true);
        let egress = c.direction(i, false);
        if ingress.is_none() && egress.is_none() {
            continue;
        }
        set.pods.push(PodPolicy {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            addresses: pod.ips.clone(),
            ingress,
            egress,
        });
    }
    // The same set whatever order the pods were stored in.
    set.pods
        .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    set.rules = c.rules;
    set
}

/// One policy's rules of one direction, as read.
type Rules = Vec<(Vec<NetworkPolicyPeer>, Vec<NetworkPolicyPort>)>;

struct Compiler<'m> {
    m: &'m Manifests,
    /// Namespaces' labels, `kubernetes.io/metadata.name` included.
    namespaces: HashMap<String, BTreeMap<String, String>>,
    /// Each policy's rules, ingress and egress.
    policy_rules: Vec<[Rules; 2]>,
    /// The rules compiled so far, and where each is.
    rules: Vec<PolicyRule>,
    interned: HashMap<PolicyRule, u32>,
    /// Rules already compiled: (policy, ingress, rule, the server's resolved ports).
    done: HashMap<(usize, bool, usize, Vec<PolicyPort>), Vec<u32>>,
}

impl<'m> Compiler<'m> {
    fn new(m: &'m Manifests) -> Self {
        let namespaces = m
            .namespaces
            .iter()
            .filter_map(|n| n.metadata.name.as_deref())
            .map(|name| (name.to_string(), super::namespace_labels(m, name)))
            .collect();
        let policy_rules = m
            .policies
            .iter()
            .map(|p| [rules(&p.policy, true), rules(&p.policy, false)])
            .collect();
        Self {
            m,
            namespaces,
            policy_rules,
            rules: Vec::new(),
            interned: HashMap::new(),
            done: HashMap::new(),
        }
    }

    /// The direction (`ingress`, else egress) of pod `i`: `None` when no policy selects
    /// it for that direction.
    fn direction(&mut self, i: usize, ingress: bool) -> Option<PolicyDirection> {
        let mut out: Option<PolicyDirection> = None;
        for (p, manifest) in self.m.policies.iter().enumerate() {
            let policy = &manifest.policy;
            if !applies(policy, ingress, &self.m.pods[i]) {
                continue;
            }
            let d = out.get_or_insert_with(PolicyDirection::default);
            d.policies.push(policy_name(policy));
            for r in 0..self.policy_rules[p][usize::from(!ingress)].len() {
                let compiled = self.rule(p, ingress, r, i);
                d.rules.extend(compiled);
            }
        }
        out
    }

    /// Rule `r` of policy `p` in one direction, for the selected pod `subject`: the
    /// indexes of the rules it compiles to.
    fn rule(&mut self, p: usize, ingress: bool, r: usize, subject: usize) -> Vec<u32> {
        let (peers, ports) = &self.policy_rules[p][usize::from(!ingress)][r];
        // Ingress ports resolve against the subject: part of what the rule depends on.
        let server_ports: Vec<PolicyPort> = if ingress {
            ports
                .iter()
                .filter_map(|port| wire_port(port, Some(&self.m.pods[subject])))
                .collect()
        } else {
            Vec::new()
        };
        let key = (p, ingress, r, server_ports.clone());
        if let Some(done) = self.done.get(&key) {
            return done.clone();
        }
        let policy = &self.m.policies[p].policy;
        let ns = policy.metadata.namespace.as_deref().unwrap_or("default");
        let origin = format!(
            "{} {} rule {r}",
            policy_name(policy),
            if ingress { "ingress" } else { "egress" }
        );
        let (peers, ports) = (peers.clone(), ports.clone());
        let mut out = Vec::new();
        let addresses = self.peers(&peers, ns);
        if !peers.is_empty() && addresses.is_empty() {
            // No peer resolves: the rule admits nothing.
        } else if ingress || !ports.iter().any(is_named) {
            let wire: Vec<PolicyPort> = if ingress {
                server_ports
            } else {
                ports
                    .iter()
                    .filter_map(|port| wire_port(port, None))
                    .collect()
            };
            if ports.is_empty() || !wire.is_empty() {
                out.push(self.intern(PolicyRule {
                    origin,
                    peers: addresses,
                    ports: wire,
                }));
            }
        } else {
            out = self.egress_with_names(&peers, &ports, ns, addresses, origin);
        }
        self.done.insert(key, out.clone());
        out
    }

    /// An egress rule with named ports: numbered ports for every peer, and for each set of
    /// destination pods that resolve the names alike, those pods with the ports they give.
    fn egress_with_names(
        &mut self,
        peers: &[NetworkPolicyPeer],
        ports: &[NetworkPolicyPort],
        ns: &str,
        addresses: Vec<PolicyPeer>,
        origin: String,
    ) -> Vec<u32> {
        let mut out = Vec::new();
        let numbered: Vec<PolicyPort> = ports
            .iter()
            .filter(|p| !is_named(p))
            .filter_map(|p| wire_port(p, None))
            .collect();
        if !numbered.is_empty() {
            out.push(self.intern(PolicyRule {
                origin: origin.clone(),
                peers: addresses,
                ports: numbered,
            }));
        }
        let mut groups: BTreeMap<Vec<PolicyPort>, Vec<PolicyPeer>> = BTreeMap::new();
        for pod in self.m.pods.iter() {
            let admitted: Vec<IpAddr> = if peers.is_empty() {
                pod.ips.clone()
            } else {
                let by_selector = peers.iter().any(|peer| {
                    peer.ip_block.is_none()
                        && peer_admits(peer, ns, pod, |s| self.ns_selects(s, &pod.namespace))
                });
                if by_selector {
                    pod.ips.clone()
                } else {
                    pod.ips
                        .iter()
                        .copied()
                        .filter(|ip| {
                            peers.iter().any(|peer| {
                                peer.ip_block.as_ref().is_some_and(|b| in_block(b, *ip))
                            })
                        })
                        .collect()
                }
            };
            if admitted.is_empty() {
                continue;
            }
            let resolved: Vec<PolicyPort> = ports
                .iter()
                .filter(|p| is_named(p))
                .filter_map(|p| wire_port(p, Some(pod)))
                .collect();
            if resolved.is_empty() {
                continue;
            }
            groups
                .entry(resolved)
                .or_default()
                .extend(admitted.into_iter().map(host));
        }
        for (ports, peers) in groups {
            out.push(self.intern(PolicyRule {
                origin: origin.clone(),
                peers,
                ports,
            }));
        }
        out
    }

    /// The addresses `peers` admit (empty when `peers` is: every address).
    fn peers(&self, peers: &[NetworkPolicyPeer], ns: &str) -> Vec<PolicyPeer> {
        let mut out = Vec::new();
        for peer in peers {
            if let Some(block) = &peer.ip_block {
                if let Ok(cidr) = block.cidr.parse::<IpNet>() {
                    out.push(PolicyPeer {
                        cidr: cidr.trunc(),
                        except: block
                            .except
                            .iter()
                            .flatten()
                            .filter_map(|e| e.parse::<IpNet>().ok())
                            .map(|e| e.trunc())
                            .filter(|e| cidr.contains(e))
                            .collect(),
                    });
                }
                continue;
            }
            for i in self.candidates(peer) {
                let pod = &self.m.pods[i];
                if peer_admits(peer, ns, pod, |s| self.ns_selects(s, &pod.namespace)) {
                    out.extend(pod.ips.iter().copied().map(host));
                }
            }
        }
        out.sort_by_key(|p| p.cidr);
        out.dedup();
        out
    }

    /// The pods a selector peer may match: those with its first label when it names one.
    fn candidates(&self, peer: &NetworkPolicyPeer) -> Vec<usize> {
        let first = peer
            .pod_selector
            .as_ref()
            .and_then(|s| s.match_labels.as_ref())
            .and_then(|l| l.iter().next());
        match first {
            Some((k, v)) => self.m.pods.with_label(k, v),
            None => (0..self.m.pods.len()).collect(),
        }
    }

    fn ns_selects(
        &self,
        sel: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
        namespace: &str,
    ) -> bool {
        match self.namespaces.get(namespace) {
            Some(labels) => selector::matches(sel, labels),
            // A namespace with no object read: only the label Kubernetes sets.
            None => selector::matches(sel, &NameOnly(namespace)),
        }
    }

    fn intern(&mut self, rule: PolicyRule) -> u32 {
        if let Some(i) = self.interned.get(&rule) {
            return *i;
        }
        let i = self.rules.len() as u32;
        self.interned.insert(rule.clone(), i);
        self.rules.push(rule);
        i
    }
}

/// The labels of a namespace with no object read: only its name, as Kubernetes sets it.
struct NameOnly<'a>(&'a str);

impl LabelSet for NameOnly<'_> {
    fn label(&self, key: &str) -> Option<&str> {
        (key == NAME_LABEL).then_some(self.0)
    }
}

fn is_named(port: &NetworkPolicyPort) -> bool {
    matches!(port.port, Some(IntOrString::String(_)))
}

/// The host prefix of one address.
fn host(addr: IpAddr) -> PolicyPeer {
    PolicyPeer {
        cidr: IpNet::from(addr),
        except: Vec::new(),
    }
}

#[cfg(test)]
pub(super) mod tests;
