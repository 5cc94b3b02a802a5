//! Connection tracking for Services: which backend each flow to a Service was given, so
//! that every later packet goes to the same one and the backend's replies are translated
//! back. Kept on the client's node, where the first packet is translated; IPv4 and IPv6.
//!
//! One flow, two keys: the original tuple (client -> frontend, as the client sends it) and
//! the reply tuple (backend -> the address the backend sees as the client). Both point at
//! one shared [`ServiceFlow`]. A new flow is inserted under the reply key's shard lock
//! first, then the original's: when two workers see the first packets of one flow at once,
//! the second finds the first's entry and uses its backend (the insert race behind
//! kube-proxy's "5 second DNS delay" cannot happen). Client-IP affinity is a second map,
//! (frontend, client address) -> backend, with the Service's timeout.

pub use super::key::FlowKey;
use super::life::{Liveness, State, NS};
use super::shards::{lock, new_shards, FxBuild};
use super::table::{FlowTable, Tracked};
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Where a Service's traffic goes: the frontend (virtual address and port) a client used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    /// Virtual address (cluster IP, external IP or the node's for a node port).
    pub addr: IpAddr,
    /// IP protocol.
    pub protocol: u8,
    /// Virtual port.
    pub port: u16,
}

/// What a packet of a flow needs to be translated: a copy, taken under the shard's lock,
/// so that the fast path touches no reference count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// The tuple as the client sent it.
    pub original: FlowKey,
    /// The backend.
    pub backend: (IpAddr, u16),
    /// The source address the backend sees.
    pub seen_as: IpAddr,
    /// The source port the backend sees.
    pub seen_port: u16,
}

impl Translation {
    /// True when the backend sees another source than the client.
    pub fn source_translated(&self) -> bool {
        self.seen_as != self.original.src || self.seen_port != self.original.src_port
    }
}

/// A flow to a Service.
#[derive(Debug)]
pub struct ServiceFlow {
    /// The packet's tuple as the client sent it.
    pub original: FlowKey,
    /// The backend it was given.
    pub backend: (IpAddr, u16),
    /// The source the backend sees: the client; the frontend's address when the client is
    /// its own backend (hairpin: a packet from itself would be dropped by its kernel); the
    /// node's when a client from outside the cluster came through a node port of an
    /// `externalTrafficPolicy: Cluster` Service (so that the reply comes back this way).
    pub seen_as: IpAddr,
    /// The source port the backend sees: the client's, unless another flow from the same
    /// client address and port already reaches the same backend (one client port to two
    /// Services that share a backend), whose replies would then be indistinguishable.
    pub seen_port: u16,
    /// Which Service port (its id in the Service table).
    pub service_port: u64,
    life: Liveness,
}

impl ServiceFlow {
    /// The tuple of the backend's replies.
    pub fn reply_key(&self) -> FlowKey {
        FlowKey {
            protocol: self.original.protocol,
            src: self.backend.0,
            src_port: self.backend.1,
            dst: self.seen_as,
            dst_port: self.seen_port,
        }
    }

    /// Its state now.
    pub fn state(&self) -> State {
        self.life.state()
    }

    /// True when the backend sees another source than the client (hairpin, a node port's
    /// client shown as the node, or another source port).
    pub fn source_translated(&self) -> bool {
        self.translation().source_translated()
    }

    /// What its packets need.
    pub fn translation(&self) -> Translation {
        Translation {
            original: self.original,
            backend: self.backend,
            seen_as: self.seen_as,
            seen_port: self.seen_port,
        }
    }
}

impl Tracked for ServiceFlow {
    type Key = FlowKey;

    fn original_key(&self) -> FlowKey {
        self.original
    }

    fn reply_key(&self) -> FlowKey {
        ServiceFlow::reply_key(self)
    }

    fn life(&self) -> &Liveness {
        &self.life
    }
}

/// Why a new flow was not opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The table holds its limit of flows, none of them an unassured one near the new flow.
    TableFull,
    /// Every source port tried gives a reply tuple another flow holds.
    ReplyClash,
}

/// A flow as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceFlowInfo {
    /// The client's tuple.
    pub original: FlowKey,
    /// The backend.
    pub backend: (IpAddr, u16),
    /// Which Service port.
    pub service_port: u64,
    /// Its state.
    pub state: State,
    /// Seconds since the last packet.
    pub idle_s: u64,
}

/// Source ports tried for a flow whose own collides.
const PORT_TRIES: u64 = 64;

/// (Service port, client address) -> (backend, last used).
type Affinities = HashMap<(u64, IpAddr), ((IpAddr, u16), u64), FxBuild>;
type AffinityShard = Mutex<Affinities>;

/// The Service flows of one dataplane.
pub struct ServiceFlows {
    table: FlowTable<ServiceFlow>,
    affinity: Box<[AffinityShard]>,
}

impl ServiceFlows {
    /// A table of at most `limit` flows.
    pub fn new(limit: usize) -> Self {
        Self {
            table: FlowTable::new(limit),
            affinity: new_shards(),
        }
    }

    fn index<K: Hash>(&self, key: &K) -> usize {
        self.table.index(key)
    }

    fn affinity_shard(&self, key: &(u64, IpAddr)) -> std::sync::MutexGuard<'_, Affinities> {
        lock(&self.affinity[self.index(key)])
    }

    /// A packet the client sends: its flow, if it has one.
    pub fn forward(
        &self,
        original: &FlowKey,
        tcp_flags: Option<u8>,
        now_ns: u64,
    ) -> Option<Translation> {
        let map = self.table.shard(original);
        let flow = map.get(original)?;
        flow.life.touch(now_ns, tcp_flags, false);
        Some(flow.translation())
    }

    /// Opens the flow of `original` to `backend` (or finds the one another worker opened
    /// meanwhile, with its backend). The backend sees the client as `shown_as` when given,
    /// else as itself, or as the frontend when it is its own backend.
    pub fn open(
        &self,
        original: FlowKey,
        backend: (IpAddr, u16),
        shown_as: Option<IpAddr>,
        service_port: u64,
        tcp_flags: Option<u8>,
        now_ns: u64,
    ) -> Result<Translation, Refusal> {
        if !self.table.make_room(&original, |_| ()) {
            return Err(Refusal::TableFull);
        }
        let seen_as = match shown_as {
            Some(addr) => addr,
            None if backend.0 == original.src => original.dst,
            None => original.src,
        };
        // The client's own port first; when another flow's replies already use that
        // tuple, other ports from a position derived from the flow.
        let start = self.table.hash(&original);
        let mut tries = std::iter::once(original.src_port)
            .chain((0..PORT_TRIES).map(|k| (1024 + start.wrapping_add(k) % (65536 - 1024)) as u16));
        let flow = loop {
            let Some(port) = tries.next() else {
                return Err(Refusal::ReplyClash);
            };
            let flow = Arc::new(ServiceFlow {
                original,
                backend,
                seen_as,
                seen_port: port,
                service_port,
                life: Liveness::new(now_ns),
            });
            let reply = flow.reply_key();
            let mut replies = self.table.shard(&reply);
            match replies.get(&reply) {
                Some(other) if other.original == original => {
                    other.life.touch(now_ns, tcp_flags, false);
                    return Ok(other.translation());
                }
                Some(_) => continue,
                None => {
                    replies.insert(reply, flow.clone());
                    break flow;
                }
            }
        };
        let reply = flow.reply_key();
        let mut originals = self.table.shard(&original);
        if let Some(other) = originals.get(&original) {
            // Another worker opened the same flow with another backend meanwhile: keep
            // its, undo ours.
            other.life.touch(now_ns, tcp_flags, false);
            let kept = other.translation();
            drop(originals);
            self.table.shard(&reply).remove(&reply);
            return Ok(kept);
        }
        flow.life.touch(now_ns, tcp_flags, false);
        let opened = flow.translation();
        originals.insert(original, flow);
        drop(originals);
        self.table.added();
        Ok(opened)
    }

    /// A packet from a backend: the flow it answers, if any.
    pub fn reply(
        &self,
        reply: &FlowKey,
        tcp_flags: Option<u8>,
        now_ns: u64,
    ) -> Option<Translation> {
        let map = self.table.shard(reply);
        let flow = map.get(reply)?;
        if flow.reply_key() != *reply {
            return None;
        }
        flow.life.touch(now_ns, tcp_flags, true);
        Some(flow.translation())
    }

    /// The flow whose reply tuple is `reply`, without counting it as a packet of the flow
    /// (for an ICMP error about it).
    pub fn answering(&self, reply: &FlowKey) -> Option<Translation> {
        let map = self.table.shard(reply);
        let flow = map.get(reply)?;
        (flow.reply_key() == *reply).then(|| flow.translation())
    }

    /// The backend `client` was given on `service_port` within the last `timeout_ns`
    /// (ClientIP affinity), if still listed by `valid`.
    pub fn affinity(
        &self,
        service_port: u64,
        client: IpAddr,
        timeout_ns: u64,
        now_ns: u64,
        valid: impl Fn(&(IpAddr, u16)) -> bool,
    ) -> Option<(IpAddr, u16)> {
        let key = (service_port, client);
        self.affinity_shard(&key)
            .get(&key)
            .filter(|(backend, seen)| now_ns.saturating_sub(*seen) <= timeout_ns && valid(backend))
            .map(|(backend, _)| *backend)
    }

    /// Records that `client` uses `backend` on `service_port` at `now_ns`.
    pub fn remember(&self, service_port: u64, client: IpAddr, backend: (IpAddr, u16), now_ns: u64) {
        let key = (service_port, client);
        self.affinity_shard(&key).insert(key, (backend, now_ns));
    }

    /// Removes expired flows (and affinities idle past `affinity_timeout_ns`); returns how
    /// many flows.
    pub fn sweep(&self, now_ns: u64, affinity_timeout_ns: u64) -> usize {
        for shard in self.affinity.iter() {
            lock(shard).retain(|_, (_, seen)| now_ns.saturating_sub(*seen) <= affinity_timeout_ns);
        }
        self.remove_where(|f| f.life.expired(f.original.protocol, now_ns))
    }

    /// Removes the flows `doomed` picks, both keys of each; returns how many.
    pub fn remove_where(&self, doomed: impl Fn(&ServiceFlow) -> bool) -> usize {
        self.table.remove_where(doomed, |_| ())
    }

    /// Which of `backends` (address, protocol, port) some flow still uses.
    pub fn backends_in_use(
        &self,
        backends: &std::collections::HashSet<(IpAddr, u8, u16)>,
    ) -> Vec<(IpAddr, u8, u16)> {
        let mut out = std::collections::HashSet::new();
        self.table.for_each(|flow| {
            let b = (flow.backend.0, flow.original.protocol, flow.backend.1);
            if backends.contains(&b) {
                out.insert(b);
            }
        });
        out.into_iter().collect()
    }

    /// Flows tracked now.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// True when no flow is tracked.
    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// The most flows it holds.
    pub fn limit(&self) -> usize {
        self.table.limit()
    }

    /// Flows not established (unanswered, handshake not done, or reset) dropped so far to make room for new ones when full.
    pub fn early_drops(&self) -> u64 {
        self.table.early_drops()
    }

    /// Every flow (a snapshot, shard by shard), sorted.
    pub fn flows(&self, now_ns: u64) -> Vec<ServiceFlowInfo> {
        let mut out = Vec::new();
        self.table.for_each(|f| {
            out.push(ServiceFlowInfo {
                original: f.original,
                backend: f.backend,
                service_port: f.service_port,
                state: f.state(),
                idle_s: f.life.idle_s(now_ns),
            })
        });
        out.sort_by_key(|f| f.original);
        out
    }
}

/// Seconds to nanoseconds.
pub fn seconds(s: u64) -> u64 {
    s.saturating_mul(NS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src: &str, sport: u16, dst: &str, dport: u16) -> FlowKey {
        FlowKey {
            protocol: 6,
            src: src.parse().unwrap(),
            src_port: sport,
            dst: dst.parse().unwrap(),
            dst_port: dport,
        }
    }

    fn backend(s: &str) -> (IpAddr, u16) {
        (s.parse().unwrap(), 8080)
    }

    #[test]
    fn a_flow_keeps_its_backend_and_replies_find_the_client() {
        let t = ServiceFlows::new(10);
        let c = key("10.244.0.5", 40000, "10.96.0.10", 80);
        let f = t
            .open(c, backend("10.244.1.7"), None, 1, Some(0x02), 1)
            .unwrap();
        assert_eq!(f.backend, backend("10.244.1.7"));
        assert_eq!(t.forward(&c, Some(0x10), 2).unwrap().backend, f.backend);
        let reply = key("10.244.1.7", 8080, "10.244.0.5", 40000);
        let r = t.reply(&reply, Some(0x12), 3).unwrap();
        assert_eq!(r.original, c);
        t.forward(&c, Some(0x10), 3).unwrap();
        assert_eq!(t.flows(3)[0].state, State::Established);
        assert!(t
            .reply(&key("10.244.1.7", 8080, "10.244.0.5", 40001), None, 3)
            .is_none());
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn the_second_opener_of_a_flow_gets_the_first_ones_backend() {
        let t = ServiceFlows::new(10);
        let c = key("fd00::5", 40000, "fd00:96::10", 53);
        let first = t.open(c, backend("fd00:1::7"), None, 1, None, 1).unwrap();
        let second = t.open(c, backend("fd00:1::8"), None, 1, None, 1).unwrap();
        assert_eq!(second.backend, first.backend);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_client_that_is_its_own_backend_is_seen_as_the_frontend() {
        let t = ServiceFlows::new(10);
        let c = key("10.244.0.5", 40000, "10.96.0.10", 80);
        let f = t.open(c, backend("10.244.0.5"), None, 1, None, 1).unwrap();
        assert!(f.source_translated());
        let reply = key("10.244.0.5", 8080, "10.96.0.10", 40000);
        assert_eq!(t.reply(&reply, None, 2).unwrap().original, c);
    }

    #[test]
    fn a_full_table_refuses_and_a_reply_clash_takes_another_source_port() {
        let t = ServiceFlows::new(1);
        t.open(
            key("10.244.0.5", 1, "10.96.0.10", 80),
            backend("10.244.1.7"),
            None,
            1,
            None,
            1,
        )
        .unwrap();
        t.reply(&key("10.244.1.7", 8080, "10.244.0.5", 1), None, 1)
            .unwrap();
        let full = t.open(
            key("10.244.0.5", 2, "10.96.0.10", 80),
            backend("10.244.1.7"),
            None,
            1,
            None,
            1,
        );
        assert_eq!(full.err(), Some(Refusal::TableFull));
        let t = ServiceFlows::new(10);
        t.open(
            key("10.244.0.5", 1, "10.96.0.10", 80),
            backend("10.244.1.7"),
            None,
            1,
            None,
            1,
        )
        .unwrap();
        // The same client port to another Service with the same backend: the backend sees
        // another source port, and each flow's replies find their own client.
        let second = t
            .open(
                key("10.244.0.5", 1, "10.96.0.11", 80),
                backend("10.244.1.7"),
                None,
                2,
                None,
                1,
            )
            .unwrap();
        assert!(second.source_translated());
        assert_ne!(second.seen_port, 1);
        let reply = key("10.244.1.7", 8080, "10.244.0.5", second.seen_port);
        assert_eq!(
            t.reply(&reply, None, 2).unwrap().original.dst,
            "10.96.0.11".parse::<IpAddr>().unwrap()
        );
        let first = key("10.244.1.7", 8080, "10.244.0.5", 1);
        assert_eq!(
            t.reply(&first, None, 2).unwrap().original.dst,
            "10.96.0.10".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn sweeps_and_removals_take_both_keys() {
        let t = ServiceFlows::new(10);
        let c = key("10.244.0.5", 1, "10.96.0.10", 80);
        t.open(c, backend("10.244.1.7"), None, 1, Some(0x02), 0)
            .unwrap();
        assert_eq!(
            t.sweep(seconds(59), seconds(10)),
            0,
            "a fresh SYN lives 60 s"
        );
        assert_eq!(t.sweep(seconds(61), seconds(10)), 1);
        assert!(t
            .reply(&key("10.244.1.7", 8080, "10.244.0.5", 1), None, 0)
            .is_none());
        t.open(c, backend("10.244.1.7"), None, 1, None, 0).unwrap();
        assert_eq!(
            t.remove_where(|f| f.backend.0 == backend("10.244.1.7").0),
            1
        );
        assert!(t.is_empty());
    }

    #[test]
    fn affinity_holds_within_its_timeout_and_for_listed_backends() {
        let t = ServiceFlows::new(10);
        let client: IpAddr = "10.244.0.5".parse().unwrap();
        t.remember(1, client, backend("10.244.1.7"), 0);
        let any = |_: &(IpAddr, u16)| true;
        assert_eq!(
            t.affinity(1, client, seconds(10), seconds(10), any),
            Some(backend("10.244.1.7"))
        );
        assert_eq!(
            t.affinity(1, client, seconds(10), seconds(11), any),
            None,
            "timed out"
        );
        assert_eq!(
            t.affinity(2, client, seconds(10), 1, any),
            None,
            "another port"
        );
        assert_eq!(
            t.affinity(1, client, seconds(10), 1, |_| false),
            None,
            "backend gone"
        );
    }
}
