//! NetworkPolicy rules in a snapshot, compiled for the first packet of a flow: for each
//! selected pod of the node and each direction, the address space cut into segments, each
//! with the ports its rules admit. A lookup is one binary search over the segments and a
//! scan of a short list of port ranges, whatever the number of policies and peers.
//!
//! Compilation: every peer (a prefix minus its `except` prefixes) becomes address
//! intervals tagged with its rule; a sweep over the interval ends gives the segments and
//! the set of rules active in each; equal sets share one list of port ranges (pods
//! selected by the same policies share one compiled direction too). In a list, the rules
//! keep their order, so the first range that admits a packet names the rule Kubernetes'
//! evaluation would name first; ranges a rule before already admits are left out, and
//! nothing follows a range that admits everything.

use crate::conntrack::FxBuild;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use switchyard_api::{IpNet, PolicyDirection, PolicyRule, PolicySet};

/// Where IPv4 peers live in the one space of points.
const V4_MAPPED: &str = "::ffff:0:0/96";

/// An address as a point of one space: IPv4 as IPv4-mapped IPv6.
#[inline]
pub fn point(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// The first and last point of a prefix.
fn span(net: &IpNet) -> (u128, u128) {
    (point(net.network()), point(net.broadcast()))
}

/// A port range of one protocol (0: every protocol and port) and the rule it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PortEntry {
    protocol: u8,
    first: u16,
    last: u16,
    rule: u32,
}

impl PortEntry {
    #[inline]
    fn admits(&self, protocol: u8, port: u16) -> bool {
        self.protocol == 0 || (self.protocol == protocol && self.first <= port && port <= self.last)
    }
}

/// One direction of a selected pod, compiled.
#[derive(Debug)]
pub struct CompiledRules {
    /// The policies selecting the pod for this direction.
    pub policies: Arc<[String]>,
    /// The rules' origins, by the rule numbers lookups return.
    pub origins: Vec<String>,
    /// Where each segment starts; the first starts at 0.
    starts: Vec<u128>,
    /// Each segment's range in `entries`.
    segments: Vec<(u32, u32)>,
    entries: Vec<PortEntry>,
}

impl CompiledRules {
    /// Compiles `rules` (in their order) of the policies `policies`.
    pub fn compile(rules: &[&PolicyRule], policies: Vec<String>) -> Self {
        // Intervals of each rule's peers, as events: (position, rule, +1 / -1).
        let mut events: Vec<(u128, u32, i32)> = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            let i = i as u32;
            let mut add = |lo: u128, hi: u128| {
                events.push((lo, i, 1));
                if hi < u128::MAX {
                    events.push((hi + 1, i, -1));
                }
            };
            if rule.peers.is_empty() {
                add(0, u128::MAX);
            }
            for peer in &rule.peers {
                let mut holes = peer.except.clone();
                if peer.cidr.addr().is_ipv6() {
                    // IPv6 prefixes never admit IPv4 peers, which live at ::ffff:0:0/96.
                    holes.push(V4_MAPPED.parse().expect("a prefix"));
                }
                for (lo, hi) in without(span(&peer.cidr), &holes) {
                    add(lo, hi);
                }
            }
        }
        events.sort_unstable();
        let mut active: BTreeMap<u32, u32> = BTreeMap::new();
        let mut lists: HashMap<Vec<u32>, (u32, u32)> = HashMap::new();
        let mut entries = Vec::new();
        let mut starts = vec![0u128];
        let mut segments = vec![(0u32, 0u32)];
        let mut at = 0;
        while at < events.len() {
            let position = events[at].0;
            while at < events.len() && events[at].0 == position {
                let (_, rule, delta) = events[at];
                let count = active.entry(rule).or_insert(0);
                *count = count.wrapping_add_signed(delta);
                if *count == 0 {
                    active.remove(&rule);
                }
                at += 1;
            }
            let set: Vec<u32> = active.keys().copied().collect();
            let range = *lists
                .entry(set)
                .or_insert_with_key(|set| port_list(rules, set, &mut entries));
            if segments.last() == Some(&range) {
                continue;
            }
            if starts.last() == Some(&position) {
                *segments.last_mut().expect("one segment at least") = range;
            } else {
                starts.push(position);
                segments.push(range);
            }
        }
        Self {
            policies: policies.into(),
            origins: rules.iter().map(|r| r.origin.clone()).collect(),
            starts,
            segments,
            entries,
        }
    }

    /// The first rule admitting `peer` on `protocol`/`port`, or `None` (denied).
    #[inline]
    pub fn allows(&self, peer: IpAddr, protocol: u8, port: u16) -> Option<u32> {
        let p = point(peer);
        let segment = self.starts.partition_point(|s| *s <= p) - 1;
        let (from, to) = self.segments[segment];
        self.entries[from as usize..to as usize]
            .iter()
            .find(|e| e.admits(protocol, port))
            .map(|e| e.rule)
    }

    /// Segments the address space is cut into (a measure of the compiled size).
    pub fn segments(&self) -> usize {
        self.starts.len()
    }
}

/// Appends the port ranges of the rules in `set` (ascending) to `entries`; returns their
/// range there.
fn port_list(rules: &[&PolicyRule], set: &[u32], entries: &mut Vec<PortEntry>) -> (u32, u32) {
    let from = entries.len();
    'rules: for &r in set {
        let rule = rules[r as usize];
        let mut ranges: Vec<PortEntry> = rule
            .ports
            .iter()
            .map(|p| PortEntry {
                protocol: p.protocol,
                first: if p.port == 0 { 0 } else { p.port },
                last: match (p.port, p.end_port) {
                    (0, _) => u16::MAX,
                    (port, Some(end)) => end.max(port),
                    (port, None) => port,
                },
                rule: r,
            })
            .collect();
        if rule.ports.is_empty() {
            ranges.push(PortEntry {
                protocol: 0,
                first: 0,
                last: u16::MAX,
                rule: r,
            });
        }
        for e in ranges {
            let covered = entries[from..].iter().any(|k| {
                k.protocol == 0
                    || (k.protocol == e.protocol && k.first <= e.first && e.last <= k.last)
            });
            if !covered {
                entries.push(e);
            }
            if e.protocol == 0 {
                break 'rules;
            }
        }
    }
    (from as u32, entries.len() as u32)
}

/// The interval `lo..=hi` without the prefixes in `except`, as sorted disjoint intervals.
fn without((lo, hi): (u128, u128), except: &[IpNet]) -> Vec<(u128, u128)> {
    let mut holes: Vec<(u128, u128)> = except
        .iter()
        .map(span)
        .filter(|(a, b)| *b >= lo && *a <= hi)
        .map(|(a, b)| (a.max(lo), b.min(hi)))
        .collect();
    holes.sort_unstable();
    let mut out = Vec::new();
    let mut next = Some(lo);
    for (a, b) in holes {
        let Some(from) = next else { break };
        if a > from {
            out.push((from, a - 1));
        }
        if b >= from {
            next = b.checked_add(1).filter(|n| *n <= hi);
        }
    }
    if let Some(from) = next {
        out.push((from, hi));
    }
    out
}

/// An address as a hash key: its point, hashed as two words (an `IpAddr` feeds the
/// hasher its bytes one at a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key(u128);

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.0 as u64);
        state.write_u64((self.0 >> 64) as u64);
    }
}

/// A selected pod: its name and its compiled directions (`None`: open).
#[derive(Debug)]
pub struct PodRules {
    /// `NAMESPACE/NAME`.
    pub name: Arc<str>,
    /// Its addresses.
    pub addresses: Vec<IpAddr>,
    /// Traffic into it.
    pub ingress: Option<Arc<CompiledRules>>,
    /// Traffic out of it.
    pub egress: Option<Arc<CompiledRules>>,
}

/// The ports whose pods some policy selects, as a filter over port ids: a port not in it
/// is surely not selected; a port in it may be (ids share a bit modulo 256, so a few
/// others pay the policy stage's check for nothing). The policy stage passes a packet
/// between two ports not in it without reading it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SelectedPorts([u64; 4]);

impl SelectedPorts {
    #[inline(always)]
    fn bit(id: u32) -> (usize, u64) {
        let i = (id % 256) as usize;
        (i / 64, 1 << (i % 64))
    }

    /// Adds the port `id`.
    pub fn insert(&mut self, id: u32) {
        let (word, bit) = Self::bit(id);
        self.0[word] |= bit;
    }

    /// True when the port `id` may be selected.
    #[inline(always)]
    pub fn contains(&self, id: u32) -> bool {
        let (word, bit) = Self::bit(id);
        self.0[word] & bit != 0
    }

    /// True when some port may be selected (a policy selects a pod of this node).
    #[inline(always)]
    pub fn any(&self) -> bool {
        self.0.iter().any(|w| *w != 0)
    }
}

/// The policies of a snapshot: selected pods by address, and this node's own addresses
/// (traffic between a pod and its node is always allowed).
#[derive(Debug, Default)]
pub struct PolicyTable {
    /// Increases with every change of the rules; a flow decided under an older one is
    /// decided again.
    pub generation: u64,
    pods: HashMap<Key, Arc<PodRules>, FxBuild>,
    node: Vec<IpAddr>,
}

impl PolicyTable {
    /// Compiles `set` as generation `generation`, for a node with addresses `node`.
    pub fn compile<'a>(set: &'a PolicySet, generation: u64, node: Vec<IpAddr>) -> Self {
        let mut shared: HashMap<(&[u32], &[String]), Arc<CompiledRules>> = HashMap::new();
        let mut direction = |d: Option<&'a PolicyDirection>| -> Option<Arc<CompiledRules>> {
            let d = d?;
            let rules: Vec<&PolicyRule> = d
                .rules
                .iter()
                .filter_map(|i| set.rules.get(*i as usize))
                .collect();
            Some(
                shared
                    .entry((d.rules.as_slice(), d.policies.as_slice()))
                    .or_insert_with(|| Arc::new(CompiledRules::compile(&rules, d.policies.clone())))
                    .clone(),
            )
        };
        let mut pods: HashMap<Key, Arc<PodRules>, FxBuild> = HashMap::default();
        for pod in &set.pods {
            let ingress = direction(pod.ingress.as_ref());
            let egress = direction(pod.egress.as_ref());
            if ingress.is_none() && egress.is_none() {
                continue;
            }
            let rules = Arc::new(PodRules {
                name: format!("{}/{}", pod.namespace, pod.name).into(),
                addresses: pod.addresses.clone(),
                ingress,
                egress,
            });
            for addr in &pod.addresses {
                pods.insert(Key(point(*addr)), rules.clone());
            }
        }
        Self {
            generation,
            pods,
            node,
        }
    }

    /// True when no pod is selected: the pipeline skips the policy stage.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty()
    }

    /// The selected pod with this address, if any.
    #[inline]
    pub fn pod(&self, addr: IpAddr) -> Option<&Arc<PodRules>> {
        self.pods.get(&Key(point(addr)))
    }

    /// True when a policy selects the pod that has one of `addrs`.
    pub fn selects(&self, mut addrs: impl Iterator<Item = IpAddr>) -> bool {
        addrs.any(|addr| self.pod(addr).is_some())
    }

    /// True when `addr` is one of the node's own.
    #[inline]
    pub fn is_node(&self, addr: IpAddr) -> bool {
        self.node.contains(&addr)
    }

    /// Every selected pod, once each, sorted by name.
    pub fn pods(&self) -> Vec<&Arc<PodRules>> {
        let mut out: Vec<&Arc<PodRules>> = self.pods.values().collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out.dedup_by(|a, b| Arc::ptr_eq(a, b));
        out
    }
}

#[cfg(test)]
mod tests;
