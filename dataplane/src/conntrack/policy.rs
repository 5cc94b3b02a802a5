//! The verdicts of NetworkPolicy, per flow: a flow is decided at its first packet, and
//! every later packet, in either direction, only looks its verdict up. A verdict carries
//! the generation of the rules it was decided under; a packet that finds an older one has
//! its flow decided again (so a policy change reaches established flows at their next
//! packet, and a flow the new rules deny stops at once in both directions).
//!
//! One entry per flow, under the tuple with the lower end first, so that both directions
//! find it with one lookup; sharded like the other connection tables. Bounded: when full,
//! allowed flows go on without an entry (each packet is then decided on its own).
//!
//! The last denied flows are kept in a ring for `get flows --denied`; a worker that finds
//! the ring busy skips the entry (the drop counters still count it) rather than wait.

use super::key::FlowKey;
use super::life::{Liveness, State};
use super::shards::{lock, new_shards, random_seed, shard_of, FxBuild};
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Denied flows remembered.
pub const DENIED_RING: usize = 1024;

/// A flow's remembered verdict.
#[derive(Debug)]
struct Decided {
    /// The end that opened the flow (source of its first packet).
    client: (IpAddr, u16),
    generation: u64,
    verdict: Verdict,
    life: Liveness,
}

/// A flow's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Both the client's egress and the server's ingress allow it.
    Allowed,
    /// Denied by the server's ingress (`true`) or the client's egress (`false`).
    Denied {
        /// The server's ingress denied it.
        ingress: bool,
    },
}

/// What the table knows of a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Known {
    /// Its flow was allowed under the rules in force; `reply`: the packet goes from the
    /// server to the client.
    Allowed {
        /// From the server.
        reply: bool,
    },
    /// Its flow was denied under the rules in force.
    Denied {
        /// By the server's ingress (else the client's egress).
        ingress: bool,
    },
    /// Its flow was decided under older rules: decide it again with the client as given.
    Stale {
        /// The flow's client.
        client: (IpAddr, u16),
    },
    /// No flow: this is the first packet the table sees.
    Unknown,
}

/// Why a flow was denied: which direction, and the pod whose rules said no.
#[derive(Debug, Clone)]
pub struct Denial {
    /// True: the server's ingress; false: the client's egress.
    pub ingress: bool,
    /// `NAMESPACE/NAME` of the pod.
    pub pod: Arc<str>,
    /// The policies selecting the pod for that direction, none of which allows the flow.
    pub policies: Arc<[String]>,
}

/// A denied flow in the ring.
#[derive(Debug, Clone)]
pub struct DeniedEntry {
    /// Monotonic clock reading.
    pub at_ns: u64,
    /// The flow as its client sent it.
    pub flow: FlowKey,
    /// Why.
    pub denial: Denial,
}

type Shard = Mutex<HashMap<FlowKey, Decided, FxBuild>>;

/// The policy verdicts of one dataplane.
pub struct PolicyFlows {
    shards: Box<[Shard]>,
    limit: usize,
    flows: AtomicUsize,
    seed: u64,
    denied: Mutex<VecDeque<DeniedEntry>>,
}

/// The flow's key with the lower end first, and whether `key` was turned around.
#[inline]
pub fn canonical(key: &FlowKey) -> (FlowKey, bool) {
    if (key.src, key.src_port) <= (key.dst, key.dst_port) {
        (*key, false)
    } else {
        (key.reversed(), true)
    }
}

impl PolicyFlows {
    /// A table of at most `limit` flows.
    pub fn new(limit: usize) -> Self {
        Self {
            shards: new_shards(),
            limit,
            flows: AtomicUsize::new(0),
            seed: random_seed(),
            denied: Mutex::new(VecDeque::new()),
        }
    }

    fn shard(&self, key: &FlowKey) -> MutexGuard<'_, HashMap<FlowKey, Decided, FxBuild>> {
        lock(&self.shards[shard_of(self.seed, key)])
    }

    /// What the table knows of a packet with tuple `key` (and TCP flags), under rules of
    /// generation `generation`; a packet of a known flow counts as seen at `now_ns`.
    pub fn lookup(
        &self,
        key: &FlowKey,
        generation: u64,
        tcp_flags: Option<u8>,
        now_ns: u64,
    ) -> Known {
        let (canon, _) = canonical(key);
        let map = self.shard(&canon);
        let Some(flow) = map.get(&canon) else {
            return Known::Unknown;
        };
        if flow.generation != generation {
            return Known::Stale {
                client: flow.client,
            };
        }
        if let Verdict::Denied { ingress } = flow.verdict {
            return Known::Denied { ingress };
        }
        let reply = flow.client != (key.src, key.src_port);
        flow.life.touch(now_ns, tcp_flags, reply);
        Known::Allowed { reply }
    }

    /// Records the verdict on the flow `key` (as its client sends it), decided under rules
    /// of `generation`. A new denied flow is not recorded (it holds no slot); a known one
    /// keeps its entry, now denied, until it expires.
    pub fn decide(
        &self,
        key: &FlowKey,
        verdict: Verdict,
        generation: u64,
        tcp_flags: Option<u8>,
        now_ns: u64,
    ) {
        let (canon, _) = canonical(key);
        let mut map = self.shard(&canon);
        if let Some(flow) = map.get_mut(&canon) {
            flow.client = (key.src, key.src_port);
            flow.generation = generation;
            flow.verdict = verdict;
            flow.life.touch(now_ns, tcp_flags, false);
            return;
        }
        if verdict != Verdict::Allowed || self.flows.load(Ordering::Relaxed) >= self.limit {
            return;
        }
        let life = Liveness::new(now_ns);
        life.touch(now_ns, tcp_flags, false);
        map.insert(
            canon,
            Decided {
                client: (key.src, key.src_port),
                generation,
                verdict,
                life,
            },
        );
        self.flows.fetch_add(1, Ordering::Relaxed);
    }

    /// Keeps a denied flow in the ring, unless another worker is writing to it.
    pub fn remember_denied(&self, flow: &FlowKey, denial: &Denial, now_ns: u64) {
        let Ok(mut ring) = self.denied.try_lock() else {
            return;
        };
        if ring.len() == DENIED_RING {
            ring.pop_front();
        }
        ring.push_back(DeniedEntry {
            at_ns: now_ns,
            flow: *flow,
            denial: denial.clone(),
        });
    }

    /// The denied flows remembered, oldest first.
    pub fn denied(&self) -> Vec<DeniedEntry> {
        let ring = lock(&self.denied);
        ring.iter().cloned().collect()
    }

    /// Removes flows idle past their timeout; returns how many.
    pub fn sweep(&self, now_ns: u64) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let mut map = lock(shard);
            let before = map.len();
            map.retain(|key, flow| !flow.life.expired(key.protocol, now_ns));
            removed += before - map.len();
        }
        self.flows.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    /// The most flows it holds.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Flows with a verdict now.
    pub fn len(&self) -> usize {
        self.flows.load(Ordering::Relaxed)
    }

    /// True when no flow has a verdict.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The state of the flow `key`, if it has an entry (for tests and listings).
    pub fn state(&self, key: &FlowKey) -> Option<(Verdict, State)> {
        let (canon, _) = canonical(key);
        let map = self.shard(&canon);
        map.get(&canon).map(|f| (f.verdict, f.life.state()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src: &str, sp: u16, dst: &str, dp: u16) -> FlowKey {
        FlowKey {
            protocol: 6,
            src: src.parse().unwrap(),
            src_port: sp,
            dst: dst.parse().unwrap(),
            dst_port: dp,
        }
    }

    #[test]
    fn both_directions_find_one_verdict_until_the_rules_change() {
        let t = PolicyFlows::new(10);
        let k = key("10.0.0.9", 40000, "10.0.0.2", 80);
        assert_eq!(t.lookup(&k, 1, None, 0), Known::Unknown);
        t.decide(&k, Verdict::Allowed, 1, Some(0x02), 0);
        assert_eq!(t.lookup(&k, 1, None, 1), Known::Allowed { reply: false });
        assert_eq!(
            t.lookup(&k.reversed(), 1, Some(0x12), 2),
            Known::Allowed { reply: true }
        );
        assert_eq!(
            t.lookup(&k, 1, Some(0x10), 2),
            Known::Allowed { reply: false }
        );
        assert_eq!(t.state(&k), Some((Verdict::Allowed, State::Established)));
        assert_eq!(
            t.lookup(&k.reversed(), 2, None, 3),
            Known::Stale {
                client: (k.src, k.src_port)
            }
        );
        t.decide(&k, Verdict::Denied { ingress: true }, 2, None, 3);
        assert_eq!(
            t.lookup(&k.reversed(), 2, None, 4),
            Known::Denied { ingress: true }
        );
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn new_denied_flows_take_no_slot_and_the_limit_holds() {
        let t = PolicyFlows::new(1);
        let denied = Verdict::Denied { ingress: false };
        t.decide(&key("10.0.0.1", 1, "10.0.0.2", 2), denied, 1, None, 0);
        assert!(t.is_empty());
        t.decide(
            &key("10.0.0.1", 1, "10.0.0.2", 2),
            Verdict::Allowed,
            1,
            None,
            0,
        );
        t.decide(
            &key("10.0.0.1", 3, "10.0.0.2", 2),
            Verdict::Allowed,
            1,
            None,
            0,
        );
        assert_eq!(t.len(), 1);
        assert_eq!(t.sweep(61 * super::super::life::NS), 1);
        assert!(t.is_empty());
    }

    #[test]
    fn the_ring_keeps_the_last_denied_flows() {
        let t = PolicyFlows::new(1);
        let denial = Denial {
            ingress: true,
            pod: "x/a".into(),
            policies: vec!["x/deny".to_string()].into(),
        };
        for port in 0..(DENIED_RING as u16 + 5) {
            t.remember_denied(&key("10.0.0.1", port, "10.0.0.2", 80), &denial, 0);
        }
        let ring = t.denied();
        assert_eq!(ring.len(), DENIED_RING);
        assert_eq!(ring[0].flow.src_port, 5);
    }
}
