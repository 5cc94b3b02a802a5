//! The NetworkPolicy stage, after routing (so after Service translation: a backend's
//! ingress rules see the client, a client's egress rules see the backend), IPv4 and IPv6.
//!
//! A packet is checked only when it leaves a pod of this node that a policy selects
//! (that pod's egress rules) or enters one (its ingress rules); every other packet passes
//! untouched, without a lookup. A checked packet looks its flow up: a flow decided under
//! the rules in force passes or drops as decided, in either direction (replies of an
//! allowed flow pass whatever the replier's rules say). A flow decided under older rules,
//! or not yet seen, is decided now with its client's egress rules and its server's
//! ingress rules: both must allow.
//!
//! Which end is the client: the source of a packet that opens a flow (TCP SYN, UDP, SCTP,
//! echo request, anything else); the destination of an echo reply or a SYN-ACK. A TCP
//! segment in the middle of a flow the table does not know (a flow older than the rules
//! that now select one of its pods) is judged with the end on the lower port as the server
//! (clients take ephemeral ports, 32768 and up on Linux), so that the replies of a flow
//! that started before enforcement pass and its client's packets are judged as the
//! client's; on equal ports, either end may be the client. An ICMP error passes when it is
//! about an allowed flow. Traffic between a pod and its own node, and a pod's traffic to
//! itself, always passes; so do IPv4 fragments after the first (they carry no port: the
//! first fragment decides, and a later one without it is never reassembled).
//!
//! Each worker keeps the verdicts it used last in a small direct-mapped cache
//! ([`VerdictCache`]), so that a packet of an established flow takes no lock: a hit is a
//! verdict of the same flow under the same rules, refreshed from the shared table at
//! least once a second (which keeps the flow alive there): the cache is emptied when the
//! rules change and once a second, at the start of a batch, so that a packet's lookup
//! compares its tuple and nothing else; TCP SYN, FIN and RST segments
//! always go to the shared table, which follows the flow's state. In front of the cache,
//! the verdict on the previous packet is kept with that packet's tuple as raw bytes, as it
//! arrived ([`Origin`]): the next packet of the same flow is decided by comparing bytes,
//! without parsing the packet into a flow key or hashing it. Within a batch, the packets
//! of a flow after its first allowed one do not come here at all: the pipeline's memo of
//! the batch's last route ([`super::memo`]) carries the verdict with the next hop.

use super::nat::{ip_head, IpHead};
use super::services::flow_key;
use super::tuple::{raw_tuple, RawTuple};
use super::DropReason;
use crate::conntrack::key::FlowKey;
use crate::conntrack::policy::{Denial, Known, Verdict};
use crate::tables::policy::PodRules;
use crate::tables::{Port, PortRole, Tables};
use crate::wire::icmp::{self, IcmpPacket};
use crate::wire::{ipv4, ipv6, tcp, TcpPacket, UdpPacket};
use std::net::IpAddr;
use std::sync::Arc;

/// How a packet stands to the start of its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Opening {
    /// Its source is the client.
    Opens,
    /// Its destination is the client (an echo reply).
    Answers,
    /// A TCP segment in mid-flow: the end on the lower port is the server (either end on
    /// equal ports).
    MidFlow,
    /// Not judged (an IPv4 fragment after the first).
    Unjudged,
}

/// What the stage reads of a packet.
#[derive(Debug, Clone, Copy)]
pub(super) struct Packet {
    /// Its tuple (ICMP echo: the identifier as both ports; other protocols: no ports).
    pub key: FlowKey,
    /// TCP flags.
    pub tcp_flags: Option<u8>,
    /// How it stands to its flow's start.
    pub opening: Opening,
    /// An ICMP error's quoted flow, turned to run the way the error does.
    pub quoted: Option<FlowKey>,
}

/// Reads the packet `l3` (IPv6 when `v6`) as the stage needs it.
pub(super) fn packet(l3: &[u8], v6: bool) -> Option<Packet> {
    let IpHead {
        protocol,
        src,
        dst,
        l4_at,
        later_fragment,
    } = ip_head(l3, v6)?;
    let mut p = Packet {
        key: FlowKey {
            protocol,
            src,
            src_port: 0,
            dst,
            dst_port: 0,
        },
        tcp_flags: None,
        opening: Opening::Opens,
        quoted: None,
    };
    if later_fragment {
        p.opening = Opening::Unjudged;
        return Some(p);
    }
    // A transport header cut short is judged without ports (only rules for every port
    // of every protocol admit it).
    let l4 = l3.get(l4_at..).unwrap_or_default();
    match protocol {
        ipv4::PROTO_TCP | ipv4::PROTO_UDP | ipv4::PROTO_SCTP => {
            if let Ok(ports) = UdpPacket::new_checked(l4) {
                p.key.src_port = ports.src_port();
                p.key.dst_port = ports.dst_port();
            }
            if protocol == ipv4::PROTO_TCP {
                if let Ok(segment) = TcpPacket::new_checked(l4) {
                    let flags = segment.flags();
                    p.tcp_flags = Some(flags);
                    let (syn, ack) = (flags & tcp::FLAG_SYN != 0, flags & tcp::FLAG_ACK != 0);
                    p.opening = match (syn, ack) {
                        (true, false) => Opening::Opens,
                        (true, true) => Opening::Answers,
                        _ => Opening::MidFlow,
                    };
                }
            }
        }
        ipv4::PROTO_ICMP | ipv6::NEXT_ICMPV6 if (protocol == ipv6::NEXT_ICMPV6) == v6 => {
            let Ok(message) = IcmpPacket::new_checked(l4) else {
                return Some(p);
            };
            let (request, reply, error) = if v6 {
                (
                    icmp::V6_ECHO_REQUEST,
                    icmp::V6_ECHO_REPLY,
                    icmp::is_v6_error(message.kind()),
                )
            } else {
                (
                    icmp::V4_ECHO_REQUEST,
                    icmp::V4_ECHO_REPLY,
                    icmp::is_v4_error(message.kind()),
                )
            };
            if message.kind() == request || message.kind() == reply {
                p.key.src_port = message.echo_ident();
                p.key.dst_port = message.echo_ident();
                if message.kind() == reply {
                    p.opening = Opening::Answers;
                }
            } else if error {
                p.quoted = l4
                    .get(icmp::HEADER_LEN..)
                    .and_then(|quote| flow_key(quote, v6))
                    .map(|(k, _)| k.reversed());
            }
        }
        _ => {}
    }
    Some(p)
}

/// What the stage reads of a packet as it arrived, before any translation.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct Origin {
    /// Its tuple, when a cached verdict may decide it (see [`raw_tuple`]).
    pub raw: Option<RawTuple>,
    /// Its source address and port, when a stage may translate it before the policy
    /// stage runs.
    pub source: Option<(IpAddr, u16)>,
}

impl Origin {
    /// Reads `l3` (IPv6 when `v6`); `translating`: a stage may change its source before
    /// the policy stage.
    #[inline(always)]
    pub fn of(l3: &[u8], v6: bool, translating: bool) -> Self {
        let raw = raw_tuple(l3, v6);
        let source = match &raw {
            _ if !translating => None,
            Some(raw) => Some(raw.source(v6)),
            None => packet(l3, v6).map(|p| (p.key.src, p.key.src_port)),
        };
        Self { raw, source }
    }
}

/// Slots of a worker's verdict cache.
const CACHE_SLOTS: usize = 1024;
/// How long a cached verdict is used before the shared table is asked again.
const CACHE_REFRESH_NS: u64 = 1_000_000_000;

/// A verdict a worker used, on packets with tuple `tuple` (one direction of a flow).
#[derive(Debug, Clone, Copy)]
struct Cached {
    tuple: RawTuple,
    verdict: Result<(), DropReason>,
}

/// A worker's last verdicts, direct-mapped by the packet's raw tuple; read and written
/// without a lock (each worker has its own). Every entry was decided under the rules of
/// `generation` less than a second ago ([`VerdictCache::begin`] empties the cache
/// otherwise), so a hit costs three word comparisons after one multiplication: the packet
/// is not parsed into a flow key.
#[derive(Debug)]
pub struct VerdictCache {
    slots: Vec<Option<Cached>>,
    /// The entry used last, looked at first: a batch of a bulk transfer is mostly one
    /// flow, whose packets then cost three comparisons and no hashing.
    last: Option<Cached>,
    /// The rules the entries were decided under.
    generation: u64,
    /// When the cache was last emptied.
    since_ns: u64,
}

impl Default for VerdictCache {
    fn default() -> Self {
        Self {
            slots: vec![None; CACHE_SLOTS],
            last: None,
            generation: 0,
            since_ns: 0,
        }
    }
}

impl VerdictCache {
    /// Called once per batch, before any [`Self::get`]: empties the cache when the rules
    /// are no longer those of `generation`'s entries, or a second has passed since it was
    /// last emptied (so that every flow in use asks the shared table, which keeps it
    /// alive there, at least once a second).
    #[inline]
    pub(super) fn begin(&mut self, generation: u64, now_ns: u64) {
        if generation != self.generation || now_ns.wrapping_sub(self.since_ns) >= CACHE_REFRESH_NS {
            self.empty(generation, now_ns);
        }
    }

    #[cold]
    fn empty(&mut self, generation: u64, now_ns: u64) {
        if self.last.is_some() {
            self.slots.fill(None);
            self.last = None;
        }
        self.generation = generation;
        self.since_ns = now_ns;
    }

    #[inline]
    fn slot(tuple: &RawTuple) -> usize {
        (tuple.folded().wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 54) as usize % CACHE_SLOTS
    }

    /// The verdict this worker used on packets with `tuple` since [`Self::begin`] last
    /// emptied the cache, if any.
    #[inline(always)]
    pub(super) fn get(&mut self, tuple: &RawTuple) -> Option<Result<(), DropReason>> {
        // Inline, the packet's tuple stays in registers: a bulk flow's packets end here.
        match &self.last {
            Some(last) if last.tuple == *tuple => Some(last.verdict),
            _ => self.get_slot(tuple),
        }
    }

    /// [`Self::get`] past the entry used last: the tuple's slot.
    #[inline(never)]
    fn get_slot(&mut self, tuple: &RawTuple) -> Option<Result<(), DropReason>> {
        let c = self.slots[Self::slot(tuple)].filter(|c| c.tuple == *tuple)?;
        self.last = Some(c);
        Some(c.verdict)
    }

    /// Keeps `verdict`, decided under the rules [`Self::begin`] was given, on packets
    /// like `origin`'s, when a cached verdict may decide them.
    #[inline]
    pub(super) fn put(&mut self, origin: &Origin, verdict: Result<(), DropReason>) {
        if let Some(tuple) = origin.raw {
            let entry = Some(Cached { tuple, verdict });
            self.slots[Self::slot(&tuple)] = entry;
            self.last = entry;
        }
    }
}

/// Which way to decide a flow.
enum Plan {
    /// The packet's source is the client.
    Forward,
    /// Its destination is.
    Reverse,
    /// Whichever allows it, the source first.
    Either,
}

/// Whether the client's egress rules and the server's ingress rules (each given only
/// when that pod is here and selected) allow the flow `key` (client to server).
fn verdict(
    key: &FlowKey,
    client: Option<&Arc<PodRules>>,
    server: Option<&Arc<PodRules>>,
) -> Result<(), Denial> {
    if let Some(pod) = client {
        if let Some(rules) = &pod.egress {
            if rules.allows(key.dst, key.protocol, key.dst_port).is_none() {
                return Err(Denial {
                    ingress: false,
                    pod: pod.name.clone(),
                    policies: rules.policies.clone(),
                });
            }
        }
    }
    if let Some(pod) = server {
        if let Some(rules) = &pod.ingress {
            if rules.allows(key.src, key.protocol, key.dst_port).is_none() {
                return Err(Denial {
                    ingress: true,
                    pod: pod.name.clone(),
                    policies: rules.policies.clone(),
                });
            }
        }
    }
    Ok(())
}

fn denied(ingress: bool) -> DropReason {
    if ingress {
        DropReason::PolicyDeniedIngress
    } else {
        DropReason::PolicyDeniedEgress
    }
}

/// Checks a routed packet from `ingress` to `egress` against the policies: `Ok` to go
/// on, `Err` with the drop reason when denied (the denied flow is remembered).
pub(super) fn check<D>(
    tables: &Tables<D>,
    ingress: &Port<D>,
    egress: &Port<D>,
    packet: &Packet,
    now_ns: u64,
) -> Result<(), DropReason> {
    let table = &*tables.policy;
    let key = &packet.key;
    if packet.opening == Opening::Unjudged {
        return Ok(());
    }
    let generation = table.generation;
    let at_src = (ingress.role == PortRole::Pod)
        .then(|| table.pod(key.src))
        .flatten();
    let at_dst = (egress.role == PortRole::Pod)
        .then(|| table.pod(key.dst))
        .flatten();
    if (at_src.is_none() && at_dst.is_none())
        || key.src == key.dst
        || (ingress.role == PortRole::Host && table.is_node(key.src))
        || (egress.role == PortRole::Host && table.is_node(key.dst))
    {
        return Ok(());
    }
    let flows = &*tables.policy_flows;
    if let Some(quoted) = &packet.quoted {
        if let Known::Allowed { .. } = flows.lookup(quoted, generation, None, now_ns) {
            return Ok(());
        }
    }
    let plan = match flows.lookup(key, generation, packet.tcp_flags, now_ns) {
        // A SYN from a flow's server opens a new flow over the same tuple.
        Known::Allowed { reply: true }
            if packet.opening == Opening::Opens && packet.tcp_flags.is_some() =>
        {
            Plan::Forward
        }
        Known::Allowed { .. } => return Ok(()),
        Known::Denied { ingress } => return Err(denied(ingress)),
        Known::Stale { client } if client == (key.src, key.src_port) => Plan::Forward,
        Known::Stale { .. } => Plan::Reverse,
        Known::Unknown => match packet.opening {
            Opening::Answers => Plan::Reverse,
            Opening::MidFlow if key.src_port < key.dst_port => Plan::Reverse,
            Opening::MidFlow if key.src_port == key.dst_port => Plan::Either,
            _ => Plan::Forward,
        },
    };
    let forward = || verdict(key, at_src, at_dst);
    let reverse = || verdict(&key.reversed(), at_dst, at_src);
    let (flow, outcome) = match plan {
        Plan::Forward => (*key, forward()),
        Plan::Reverse => (key.reversed(), reverse()),
        Plan::Either => match forward() {
            Ok(()) => (*key, Ok(())),
            Err(first) => match reverse() {
                Ok(()) => (key.reversed(), Ok(())),
                Err(_) => (*key, Err(first)),
            },
        },
    };
    match outcome {
        Ok(()) => {
            flows.decide(
                &flow,
                Verdict::Allowed,
                generation,
                packet.tcp_flags,
                now_ns,
            );
            Ok(())
        }
        Err(denial) => {
            let ingress = denial.ingress;
            flows.decide(
                &flow,
                Verdict::Denied { ingress },
                generation,
                packet.tcp_flags,
                now_ns,
            );
            flows.remember_denied(&flow, &denial, now_ns);
            Err(denied(ingress))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::tuple::tests::v4;

    #[test]
    fn a_cached_verdict_decides_only_the_same_direction_of_a_flow_under_the_same_rules_within_a_second(
    ) {
        let mut cache = VerdictCache::default();
        // A batch under rules of `generation` at `now_ns`, of one packet like `origin`'s.
        let get = |cache: &mut VerdictCache, origin: &Origin, generation, now_ns| {
            cache.begin(generation, now_ns);
            let tuple = origin.raw.as_ref()?;
            cache.get(tuple)
        };
        let packet = v4(6, tcp::FLAG_ACK, 0);
        let origin = Origin::of(&packet, false, false);
        assert_eq!(get(&mut cache, &origin, 1, 0), None);
        cache.put(&origin, Err(DropReason::PolicyDeniedIngress));
        assert_eq!(
            get(&mut cache, &origin, 1, 10),
            Some(Err(DropReason::PolicyDeniedIngress))
        );
        assert_eq!(get(&mut cache, &origin, 2, 10), None, "the rules changed");
        cache.put(&origin, Ok(()));
        assert_eq!(
            get(&mut cache, &origin, 2, 20),
            Some(Ok(())),
            "decided again"
        );
        assert_eq!(
            get(&mut cache, &origin, 2, CACHE_REFRESH_NS + 9),
            Some(Ok(())),
            "within a second of the rules' change"
        );
        assert_eq!(
            get(&mut cache, &origin, 2, CACHE_REFRESH_NS + 10),
            None,
            "a second since the rules changed: asked again"
        );
        cache.put(&origin, Ok(()));
        assert_eq!(
            get(&mut cache, &origin, 2, CACHE_REFRESH_NS + 20),
            Some(Ok(())),
            "and kept for the next second"
        );
        let mut other = packet.clone();
        other[22..24].copy_from_slice(&81u16.to_be_bytes());
        assert_eq!(
            get(&mut cache, &Origin::of(&other, false, false), 1, 10),
            None
        );
        let mut reply = packet.clone();
        reply.copy_within(12..16, 16);
        reply[12..16].copy_from_slice(&[10, 244, 0, 6]);
        assert_eq!(
            get(&mut cache, &Origin::of(&reply, false, false), 1, 10),
            None,
            "the other direction is its own"
        );
        let syn = Origin::of(&v4(6, tcp::FLAG_SYN, 0), false, true);
        assert!(syn.raw.is_none(), "a SYN always goes on");
        assert_eq!(
            syn.source,
            Some(("10.244.0.5".parse().unwrap(), 40000)),
            "its source is read all the same"
        );
    }
}
