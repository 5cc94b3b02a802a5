//! Connection tracking for masquerade: which pod flow owns which of the node's source
//! ports, so that replies find their way back.
//!
//! One table for the whole dataplane, because a flow's two directions are read by
//! different workers (the pod's TAP queue and the host port's queue are chosen by
//! different hashes): a [`FlowTable`], whose shards each have their own lock. Each flow is
//! stored under two keys, the outbound tuple (pod -> destination) and the reply tuple
//! (destination -> node:port), pointing at one shared [`Flow`] whose state and last-seen
//! time are atomics.
//!
//! Bounded: at most `limit` flows (default 1M). When full, a new flow takes the place of an
//! unassured one (early drop, as Linux does), or is refused (and the caller counts it)
//! when none is found nearby; established flows carry on. Expired flows are removed by
//! [`Conntrack::sweep`], which the dataplane runs every second. Memory per flow: two map
//! slots of 24 bytes plus a control byte each (at most 7/8 full), and one 48-byte shared
//! [`Flow`] (Arc counts included): about 125 bytes with the allocator's overhead, 127
//! measured at 210,000 flows (`bench-env/tests/egress.rs`); 1M flows take about 125 MiB.
//!
//! A new flow's source port is searched in the configured range from a position derived
//! from the flow's hash (randomised per dataplane start) for a reply tuple no other flow
//! holds; ports are shared between destinations, as Linux's NAT shares them, so the range
//! bounds the flows per destination, not in all.

pub mod journal;
pub mod key;
pub mod life;
pub mod policy;
pub mod service;
mod shards;
pub mod table;

use journal::{Backing, Journal, Recorded};
use life::Liveness;
pub use life::State;
pub use shards::FxBuild;
use std::hash::{Hash, Hasher};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use table::{FlowTable, Tracked};

/// A flow's journal slot when it has none.
const NO_SLOT: u32 = u32::MAX;

/// Ports tried for a new flow before it is refused.
const PORT_TRIES: u64 = 256;

/// One direction of a flow: protocol, source and destination address and port (ICMP:
/// the echo identifier as both ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tuple {
    /// IP protocol.
    pub protocol: u8,
    /// Source address.
    pub src: Ipv4Addr,
    /// Source port.
    pub src_port: u16,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Destination port.
    pub dst_port: u16,
}

impl Hash for Tuple {
    /// Two words, so that hashing costs two multiplications (the derived hash feeds the
    /// hasher some 30 bytes one at a time).
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64((u64::from(u32::from(self.src)) << 32) | u64::from(u32::from(self.dst)));
        state.write_u64(
            (u64::from(self.protocol) << 32)
                | (u64::from(self.src_port) << 16)
                | u64::from(self.dst_port),
        );
    }
}

/// A tracked flow: what both of its keys point at.
#[derive(Debug)]
pub struct Flow {
    /// The outbound tuple as the pod sent it.
    pub original: Tuple,
    /// The node's address its replies come to.
    pub node: Ipv4Addr,
    /// The node's source port (or echo identifier) it was given.
    pub node_port: u16,
    /// Opened by a client through a port published to the pod (hostPort), not by the pod.
    pub published: bool,
    life: Liveness,
    /// Its record in the journal ([`NO_SLOT`]: none).
    slot: AtomicU32,
}

impl Flow {
    /// A new flow of `original` given `node:node_port`, seen at `now_ns`.
    fn new(
        original: Tuple,
        node: Ipv4Addr,
        node_port: u16,
        published: bool,
        now_ns: u64,
    ) -> Arc<Self> {
        Arc::new(Self {
            original,
            node,
            node_port,
            published,
            life: Liveness::new(now_ns),
            slot: AtomicU32::new(NO_SLOT),
        })
    }

    /// Its state now.
    pub fn state(&self) -> State {
        self.life.state()
    }

    /// As the journal holds it.
    fn recorded(&self) -> Recorded {
        Recorded {
            original: self.original,
            node: self.node,
            node_port: self.node_port,
            published: self.published,
            life: self.life.bits(),
        }
    }

    fn expired(&self, now_ns: u64) -> bool {
        self.life.expired(self.original.protocol, now_ns)
    }
}

impl Tracked for Flow {
    type Key = Tuple;

    fn original_key(&self) -> Tuple {
        self.original
    }

    fn reply_key(&self) -> Tuple {
        reply_tuple(&self.original, self.node, self.node_port)
    }

    fn life(&self) -> &Liveness {
        &self.life
    }
}

/// The tuple of the replies to `original` once masqueraded to `node:node_port`.
fn reply_tuple(original: &Tuple, node: Ipv4Addr, node_port: u16) -> Tuple {
    if original.protocol == 1 {
        Tuple {
            protocol: 1,
            src: original.dst,
            src_port: node_port,
            dst: node,
            dst_port: node_port,
        }
    } else {
        Tuple {
            protocol: original.protocol,
            src: original.dst,
            src_port: original.dst_port,
            dst: node,
            dst_port: node_port,
        }
    }
}

/// Why a new flow was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The table holds its limit of flows, none of them an unassured one near the new flow.
    TableFull,
    /// Every source port of the range is in use for this protocol.
    NoPort,
}

/// The connection-tracking table of a masquerading node.
pub struct Conntrack {
    node: Ipv4Addr,
    table: FlowTable<Flow>,
    by_protocol: [AtomicUsize; 3],
    ports: (u16, u16),
    /// Where its flows outlive the process, if anywhere.
    journal: Option<Journal>,
}

/// What [`Conntrack::with_journal`] found in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Flows taken back.
    pub flows: usize,
    /// Why the journal's content was discarded, if it was.
    pub discarded: Option<String>,
}

/// A flow as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowInfo {
    /// The outbound tuple as the pod sent it.
    pub original: Tuple,
    /// The node's port.
    pub node_port: u16,
    /// Opened through a published port (hostPort) rather than masqueraded.
    pub published: bool,
    /// Its state.
    pub state: State,
    /// Seconds since the last packet.
    pub idle_s: u64,
}

impl Conntrack {
    /// A table masquerading to `node`, with source ports `ports` (inclusive) and at most
    /// `limit` flows.
    pub fn new(node: Ipv4Addr, ports: (u16, u16), limit: usize) -> Self {
        let (first, last) = (ports.0.min(ports.1).max(1), ports.0.max(ports.1));
        Self {
            node,
            table: FlowTable::new(limit),
            by_protocol: Default::default(),
            ports: (first, last),
            journal: None,
        }
    }

    /// A table as [`Conntrack::new`] makes it, whose flows are also written to `backing`
    /// (see [`journal`]); the flows an earlier process wrote there for the same address,
    /// ports and size are taken back, seen at `now_ns`.
    pub fn with_journal(
        node: Ipv4Addr,
        ports: (u16, u16),
        limit: usize,
        backing: Box<dyn Backing>,
        now_ns: u64,
    ) -> (Self, Restored) {
        let mut ct = Self::new(node, ports, limit);
        let (journal, recorded, discarded) = Journal::attach(backing, limit, ct.node, ct.ports);
        let mut flows = 0;
        for (slot, r) in recorded {
            let flow = Arc::new(Flow {
                original: r.original,
                node: r.node,
                node_port: r.node_port,
                published: r.published,
                life: Liveness::restored(r.life, now_ns),
                slot: AtomicU32::new(slot),
            });
            let reply = flow.reply_key();
            let free = !ct.table.shard(&reply).contains_key(&reply)
                && !ct.table.shard(&r.original).contains_key(&r.original);
            if !free {
                journal.forget(slot);
                continue;
            }
            ct.table.shard(&reply).insert(reply, flow.clone());
            ct.table.shard(&r.original).insert(r.original, flow);
            ct.added(r.original.protocol);
            flows += 1;
        }
        ct.journal = Some(journal);
        (ct, Restored { flows, discarded })
    }

    /// A packet of `flow`; writes its new state to the journal when it changed.
    fn touch(&self, flow: &Flow, now_ns: u64, tcp_flags: Option<u8>, reply: bool) {
        if flow.life.touch(now_ns, tcp_flags, reply) {
            if let Some(journal) = &self.journal {
                let slot = flow.slot.load(Ordering::Relaxed);
                if slot != NO_SLOT {
                    journal.update_life(slot, &flow.recorded());
                }
            }
        }
    }

    /// Writes a flow just inserted to the journal.
    fn record(&self, flow: &Flow) {
        if let Some(slot) = self
            .journal
            .as_ref()
            .and_then(|j| j.record(&flow.recorded()))
        {
            flow.slot.store(slot, Ordering::Relaxed);
        }
    }

    /// The address flows are masqueraded to.
    pub fn node(&self) -> Ipv4Addr {
        self.node
    }

    /// The port range, inclusive.
    pub fn port_range(&self) -> (u16, u16) {
        self.ports
    }

    fn counter(&self, protocol: u8) -> &AtomicUsize {
        match protocol {
            6 => &self.by_protocol[0],
            17 => &self.by_protocol[1],
            _ => &self.by_protocol[2],
        }
    }

    /// Counts a flow just inserted under both keys.
    fn added(&self, protocol: u8) {
        self.table.added();
        self.counter(protocol).fetch_add(1, Ordering::Relaxed);
    }

    /// Uncounts a flow the table removed, and forgets its record.
    fn gone(&self, flow: &Flow) {
        self.counter(flow.original.protocol)
            .fetch_sub(1, Ordering::Relaxed);
        if let Some(journal) = &self.journal {
            let slot = flow.slot.swap(NO_SLOT, Ordering::Relaxed);
            if slot != NO_SLOT {
                journal.forget(slot);
            }
        }
    }

    /// Whether a new flow of `original` may be added (see [`FlowTable::make_room`]).
    fn make_room(&self, original: &Tuple) -> Result<(), Refusal> {
        if self.table.make_room(original, |flow| self.gone(flow)) {
            Ok(())
        } else {
            Err(Refusal::TableFull)
        }
    }

    /// An outbound packet of `original` (pod -> destination): returns the node port to
    /// translate the source to, creating the flow if it is new.
    ///
    /// A new flow's port is searched from a position derived from the flow's hash, for a
    /// reply tuple (destination -> node:port) that no other flow holds: ports are shared
    /// between destinations, as Linux's NAT does, so the range limits the flows per
    /// destination address and port, not in all. Checking and claiming happen under the
    /// reply key's shard lock, so two workers never take the same tuple.
    pub fn outbound(
        &self,
        original: Tuple,
        tcp_flags: Option<u8>,
        now_ns: u64,
    ) -> Result<u16, Refusal> {
        if let Some(flow) = self.table.shard(&original).get(&original) {
            self.touch(flow, now_ns, tcp_flags, false);
            return Ok(flow.node_port);
        }
        self.make_room(&original)?;
        let (first, last) = self.ports;
        let count = u64::from(last - first) + 1;
        let start = self.table.hash(&original) % count;
        let tries = count.min(PORT_TRIES);
        for k in 0..tries {
            let port = first + ((start + k) % count) as u16;
            let reply = reply_tuple(&original, self.node, port);
            let flow = Flow::new(original, self.node, port, false, now_ns);
            {
                let mut replies = self.table.shard(&reply);
                if replies.contains_key(&reply) {
                    continue;
                }
                replies.insert(reply, flow.clone());
            }
            flow.life.touch(now_ns, tcp_flags, false);
            let mut out = self.table.shard(&original);
            if let Some(other) = out.get(&original) {
                // Another worker created the same flow meanwhile: use its port, undo ours.
                let kept = other.node_port;
                drop(out);
                self.table.shard(&reply).remove(&reply);
                return Ok(kept);
            }
            // Journaled before it can be found by its original key, through which alone
            // a flow is removed: its slot is known to whoever removes it.
            self.record(&flow);
            out.insert(original, flow);
            drop(out);
            self.added(original.protocol);
            return Ok(port);
        }
        Err(Refusal::NoPort)
    }

    /// A packet arriving for the node (`reply`: destination -> node:port): the pod address
    /// and port to translate the destination back to, if it belongs to a tracked flow.
    pub fn inbound(
        &self,
        reply: &Tuple,
        tcp_flags: Option<u8>,
        now_ns: u64,
    ) -> Option<(Ipv4Addr, u16)> {
        let shard = self.table.shard(reply);
        let flow = shard.get(reply)?;
        self.touch(flow, now_ns, tcp_flags, true);
        Some((flow.original.src, flow.original.src_port))
    }

    /// A packet a pod sends on a tracked flow, looked up without opening one: the node port
    /// its source becomes, if `original` (pod -> remote) is a flow's original direction.
    /// For the answers of a published port (hostPort) to clients inside the cluster, which
    /// are not masqueraded and so never reach [`Conntrack::outbound`].
    pub fn answer(&self, original: &Tuple, tcp_flags: Option<u8>, now_ns: u64) -> Option<u16> {
        let shard = self.table.shard(original);
        let flow = shard.get(original).filter(|f| f.original == *original)?;
        self.touch(flow, now_ns, tcp_flags, false);
        Some(flow.node_port)
    }

    /// A new connection to a port of the node published to a pod (hostPort): `reply` is
    /// the arriving packet's tuple (client -> node:hostPort); the flow is tracked as if the
    /// pod had opened it from `pod` to the client with the node port `hostPort`, so that
    /// this packet and later ones go to `pod` and the pod's answers leave as node:hostPort.
    /// Returns where to send it, or why the flow was refused.
    pub fn expose(
        &self,
        reply: &Tuple,
        pod: (Ipv4Addr, u16),
        tcp_flags: Option<u8>,
        now_ns: u64,
    ) -> Result<(Ipv4Addr, u16), Refusal> {
        let original = Tuple {
            protocol: reply.protocol,
            src: pod.0,
            src_port: pod.1,
            dst: reply.src,
            dst_port: reply.src_port,
        };
        self.make_room(&original)?;
        let flow = Flow::new(original, reply.dst, reply.dst_port, true, now_ns);
        {
            let mut replies = self.table.shard(reply);
            if let Some(existing) = replies.get(reply) {
                // Another worker published it meanwhile.
                return Ok((existing.original.src, existing.original.src_port));
            }
            replies.insert(*reply, flow.clone());
        }
        flow.life.touch(now_ns, tcp_flags, true);
        self.record(&flow);
        self.table.shard(&original).insert(original, flow);
        self.added(original.protocol);
        Ok(pod)
    }

    /// Removes the flows idle past their timeout and frees their ports; returns how many.
    pub fn sweep(&self, now_ns: u64) -> usize {
        self.table
            .remove_where(|flow| flow.expired(now_ns), |flow| self.gone(flow))
    }

    /// Removes every flow of the pod at `pod` (masqueraded or through a published port),
    /// when its port goes: a later pod given the same address must not inherit them.
    /// Returns how many.
    pub fn forget_pod(&self, pod: Ipv4Addr) -> usize {
        self.table
            .remove_where(|flow| flow.original.src == pod, |flow| self.gone(flow))
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

    /// Flows per protocol (TCP, UDP, ICMP).
    pub fn flows_by_protocol(&self) -> [usize; 3] {
        [0, 1, 2].map(|i| self.by_protocol[i].load(Ordering::Relaxed))
    }

    /// Every flow (a snapshot, shard by shard).
    pub fn flows(&self, now_ns: u64) -> Vec<FlowInfo> {
        let mut out = Vec::new();
        self.table.for_each(|f| {
            out.push(FlowInfo {
                original: f.original,
                node_port: f.node_port,
                published: f.published,
                state: f.state(),
                idle_s: f.life.idle_s(now_ns),
            })
        });
        out.sort_by_key(|f| f.original);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::life::NS;
    use super::*;

    fn t(src_port: u16) -> Tuple {
        Tuple {
            protocol: 6,
            src: Ipv4Addr::new(10, 244, 0, 5),
            src_port,
            dst: Ipv4Addr::new(192, 168, 2, 10),
            dst_port: 80,
        }
    }

    const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);

    #[test]
    fn a_flow_keeps_its_port_and_replies_find_the_pod() {
        let ct = Conntrack::new(NODE, (40000, 40009), 100);
        let p = ct.outbound(t(1234), Some(0x02), 0).unwrap();
        assert!((40000..=40009).contains(&p));
        assert_eq!(
            ct.outbound(t(1234), Some(0x10), 1).unwrap(),
            p,
            "same flow, same port"
        );
        let reply = Tuple {
            protocol: 6,
            src: Ipv4Addr::new(192, 168, 2, 10),
            src_port: 80,
            dst: NODE,
            dst_port: p,
        };
        assert_eq!(
            ct.inbound(&reply, Some(0x12), 2),
            Some((Ipv4Addr::new(10, 244, 0, 5), 1234))
        );
        assert_eq!(
            ct.flows(2)[0].state,
            State::New,
            "the handshake is not done"
        );
        ct.outbound(t(1234), Some(0x10), 2).unwrap();
        assert_eq!(ct.flows(2)[0].state, State::Established);
        let stranger = Tuple {
            dst_port: p.wrapping_add(1),
            ..reply
        };
        assert_eq!(ct.inbound(&stranger, None, 2), None);
        assert_eq!(ct.len(), 1);
    }

    #[test]
    fn ports_are_distinct_and_run_out_then_the_table_fills() {
        let ct = Conntrack::new(NODE, (40000, 40009), 100);
        let mut ports: Vec<u16> = (0..10)
            .map(|i| ct.outbound(t(i), Some(0x02), 0).unwrap())
            .collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 10, "no port handed out twice");
        assert_eq!(ct.outbound(t(99), Some(0x02), 0), Err(Refusal::NoPort));
        let elsewhere = Tuple {
            dst_port: 443,
            ..t(99)
        };
        assert!(
            ct.outbound(elsewhere, Some(0x02), 0).is_ok(),
            "ports are per destination"
        );
        assert_eq!(ct.flows_by_protocol(), [11, 0, 0]);
        let small = Conntrack::new(NODE, (1024, 65535), 3);
        for i in 0..3 {
            let port = small.outbound(t(i), None, 0).unwrap();
            small.inbound(&answer_to(t(i), port), None, 0).unwrap();
        }
        assert_eq!(
            small.outbound(t(7), None, 0),
            Err(Refusal::TableFull),
            "answered flows are never dropped for a new one"
        );
        assert!(
            small.outbound(t(1), None, 0).is_ok(),
            "known flows carry on when full"
        );
        assert_eq!(small.early_drops(), 0);
    }

    /// A client of the node's port 8080, published to a pod.
    fn published_client() -> Tuple {
        Tuple {
            protocol: 6,
            src: Ipv4Addr::new(192, 168, 2, 10),
            src_port: 5555,
            dst: NODE,
            dst_port: 8080,
        }
    }

    /// The reply to `original` masqueraded to `NODE:port`.
    fn answer_to(original: Tuple, port: u16) -> Tuple {
        reply_tuple(&original, NODE, port)
    }

    #[test]
    fn a_full_table_takes_a_new_flow_in_the_place_of_an_unassured_one() {
        let ct = Conntrack::new(NODE, (1024, 65535), 2);
        let answered = ct.outbound(t(1), Some(0x02), 0).unwrap();
        ct.inbound(&answer_to(t(1), answered), Some(0x12), 1)
            .unwrap();
        // A flood's SYN, then a new flow whose key lies in the flood flow's shard (the
        // search for an unassured flow is bounded to a few shards near the new one).
        let flood = t(2);
        let flood_port = ct.outbound(flood, Some(0x02), 2).unwrap();
        let near = (3..u16::MAX)
            .map(t)
            .find(|k| ct.table.index(k) == ct.table.index(&flood))
            .unwrap();
        assert!(ct.outbound(near, Some(0x02), 3).is_ok(), "room was made");
        assert_eq!((ct.len(), ct.early_drops()), (2, 1));
        assert_eq!(ct.flows_by_protocol(), [2, 0, 0]);
        // Its node port is free again and may already be the new flow's (whose replies
        // then match this tuple): what matters is that none reaches the dropped client.
        assert_ne!(
            ct.inbound(&answer_to(flood, flood_port), None, 4),
            Some((flood.src, flood.src_port)),
            "the dropped flow's replies no longer find it"
        );
        assert!(ct.inbound(&answer_to(t(1), answered), None, 4).is_some());
    }

    #[test]
    fn a_new_process_takes_back_the_journaled_flows_with_their_ports_and_states() {
        let shared = journal::SharedMemory::new(16);
        let (first, restored) =
            Conntrack::with_journal(NODE, (40000, 40009), 16, Box::new(shared.clone()), 0);
        assert_eq!(
            restored,
            Restored {
                flows: 0,
                discarded: None
            }
        );
        let p = first.outbound(t(1), Some(0x02), 0).unwrap();
        first.inbound(&answer_to(t(1), p), Some(0x12), 1).unwrap();
        first.outbound(t(1), Some(0x10), 2).unwrap();
        let other_pod = Tuple {
            src: Ipv4Addr::new(10, 244, 0, 6),
            ..t(2)
        };
        first.outbound(other_pod, Some(0x02), 0).unwrap();
        let client = published_client();
        first
            .expose(&client, (Ipv4Addr::new(10, 244, 0, 7), 80), Some(0x02), 0)
            .unwrap();
        first.forget_pod(other_pod.src);
        assert_eq!(first.len(), 2);
        drop(first); // the process dies: nothing more is written
        let (second, restored) =
            Conntrack::with_journal(NODE, (40000, 40009), 16, Box::new(shared.clone()), 50 * NS);
        assert_eq!(restored.flows, 2, "{restored:?}");
        assert_eq!(
            second.inbound(&answer_to(t(1), p), None, 51 * NS),
            Some((t(1).src, 1)),
            "replies find the pod"
        );
        assert_eq!(
            second.inbound(&client, None, 51 * NS),
            Some((Ipv4Addr::new(10, 244, 0, 7), 80)),
            "the published connection too"
        );
        let states: Vec<(bool, State)> = second
            .flows(51 * NS)
            .iter()
            .map(|f| (f.published, f.state))
            .collect();
        assert!(states.contains(&(false, State::Established)), "{states:?}");
        assert_eq!(second.outbound(t(1), None, 52 * NS), Ok(p), "the same port");
        assert_eq!(second.flows_by_protocol(), [2, 0, 0]);
        // Another port range: another table; the journal starts afresh.
        let (_, restored) = Conntrack::with_journal(NODE, (50000, 50009), 16, Box::new(shared), 0);
        assert_eq!(restored.flows, 0);
        assert!(restored.discarded.is_some());
    }

    #[test]
    fn idle_flows_expire_by_state_and_give_their_ports_back() {
        let ct = Conntrack::new(NODE, (40000, 40000), 10);
        let p = ct.outbound(t(1), Some(0x02), 0).unwrap();
        assert_eq!(ct.sweep(59 * NS), 0, "a fresh SYN lives 60 s");
        assert_eq!(ct.sweep(61 * NS), 1);
        assert!(ct.is_empty());
        assert_eq!(
            ct.outbound(t(2), Some(0x02), 62 * NS).unwrap(),
            p,
            "the port is free again"
        );
        ct.outbound(t(2), Some(0x04), 63 * NS).unwrap(); // RST
        assert_eq!(ct.flows(63 * NS)[0].state, State::Closed);
        assert_eq!(ct.sweep(74 * NS), 1, "closed flows go after 10 s");
        assert_eq!(ct.flows_by_protocol(), [0, 0, 0]);
    }

    #[test]
    fn a_deleted_pod_takes_its_flows_and_published_connections_with_it() {
        let ct = Conntrack::new(NODE, (40000, 40009), 10);
        let p = ct.outbound(t(1), Some(0x02), 0).unwrap();
        let other = Tuple {
            src: Ipv4Addr::new(10, 244, 0, 6),
            ..t(1)
        };
        ct.outbound(other, Some(0x02), 0).unwrap();
        let client = published_client();
        ct.expose(&client, (Ipv4Addr::new(10, 244, 0, 5), 80), Some(0x02), 0)
            .unwrap();
        let published: Vec<bool> = ct.flows(0).iter().map(|f| f.published).collect();
        assert_eq!(
            published.iter().filter(|p| **p).count(),
            1,
            "one published flow"
        );
        assert_eq!(ct.forget_pod(Ipv4Addr::new(10, 244, 0, 5)), 2);
        assert_eq!(ct.len(), 1);
        let reply = Tuple {
            src: Ipv4Addr::new(192, 168, 2, 10),
            src_port: 80,
            dst: NODE,
            dst_port: p,
            protocol: 6,
        };
        assert_eq!(
            ct.inbound(&reply, None, 1),
            None,
            "replies no longer find it"
        );
        assert_eq!(ct.inbound(&client, None, 1), None, "nor the published port");
        assert_eq!(ct.flows_by_protocol(), [1, 0, 0]);
    }

    #[test]
    fn workers_racing_for_the_same_flow_agree() {
        let ct = Arc::new(Conntrack::new(NODE, (1024, 65535), 100_000));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let ct = ct.clone();
                std::thread::spawn(move || {
                    (0..2000)
                        .map(|i| ct.outbound(t(i), None, 0).unwrap())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let results: Vec<Vec<u16>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(
            results.windows(2).all(|w| w[0] == w[1]),
            "every worker got the same ports"
        );
        assert_eq!(ct.len(), 2000);
        assert_eq!(
            ct.flows_by_protocol()[0],
            2000,
            "no flow counted twice by a lost race"
        );
        let mut ports: Vec<u16> = results[0].clone();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(
            ports.len(),
            2000,
            "one destination: every flow its own port"
        );
    }
}
