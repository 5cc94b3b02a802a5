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
//! least once a second (which keeps the flow alive there); TCP SYN, FIN and RST segments
//! always go to the shared table, which follows the flow's state.

use super::nat::{ip_head, IpHead};
use super::services::flow_key;
use super::DropReason;
use crate::conntrack::key::FlowKey;
use crate::conntrack::policy::{canonical, Denial, Known, Verdict};
use crate::conntrack::FxBuild;
use crate::tables::policy::PodRules;
use crate::tables::{Port, PortRole, Tables};
use crate::wire::icmp::{self, IcmpPacket};
use crate::wire::{ipv4, ipv6, tcp, TcpPacket, UdpPacket};
use std::hash::BuildHasher;
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

/// Slots of a worker's verdict cache.
const CACHE_SLOTS: usize = 1024;
/// How long a cached verdict is used before the shared table is asked again.
const CACHE_REFRESH_NS: u64 = 1_000_000_000;

/// A verdict a worker used, for the flow with key `flow` (lower end first).
#[derive(Debug, Clone, Copy)]
struct Cached {
    flow: FlowKey,
    generation: u64,
    verdict: Verdict,
    refreshed_ns: u64,
}

/// A worker's last verdicts, direct-mapped by the flow's hash; read and written without a
/// lock (each worker has its own).
#[derive(Debug)]
pub struct VerdictCache {
    slots: Vec<Option<Cached>>,
}

impl Default for VerdictCache {
    fn default() -> Self {
        Self {
            slots: vec![None; CACHE_SLOTS],
        }
    }
}

impl VerdictCache {
    fn slot(&self, flow: &FlowKey) -> usize {
        FxBuild::default().hash_one(flow) as usize % CACHE_SLOTS
    }

    /// The verdict on `flow` (lower end first) under rules of `generation`, if this worker
    /// used it within the last second.
    #[inline]
    fn get(&self, flow: &FlowKey, generation: u64, now_ns: u64) -> Option<Verdict> {
        let c = self.slots[self.slot(flow)].as_ref()?;
        (c.flow == *flow
            && c.generation == generation
            && now_ns.wrapping_sub(c.refreshed_ns) < CACHE_REFRESH_NS)
            .then_some(c.verdict)
    }

    #[inline]
    fn put(&mut self, flow: FlowKey, generation: u64, verdict: Verdict, now_ns: u64) {
        let i = self.slot(&flow);
        self.slots[i] = Some(Cached {
            flow,
            generation,
            verdict,
            refreshed_ns: now_ns,
        });
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
    cache: &mut VerdictCache,
    now_ns: u64,
) -> Result<(), DropReason> {
    let table = &*tables.policy;
    let key = &packet.key;
    if packet.opening == Opening::Unjudged {
        return Ok(());
    }
    // This worker's verdict on the flow under these rules, when it has one: every packet
    // of an established flow but SYN, FIN and RST segments stops here.
    let generation = table.generation;
    let cacheable = packet
        .tcp_flags
        .is_none_or(|f| f & (tcp::FLAG_SYN | tcp::FLAG_FIN | tcp::FLAG_RST) == 0)
        && packet.quoted.is_none();
    let (flow_key, _) = canonical(key);
    if cacheable {
        match cache.get(&flow_key, generation, now_ns) {
            Some(Verdict::Allowed) => return Ok(()),
            Some(Verdict::Denied { ingress }) => return Err(denied(ingress)),
            None => {}
        }
    }
    let remember = |cache: &mut VerdictCache, verdict| {
        if cacheable {
            cache.put(flow_key, generation, verdict, now_ns);
        }
    };
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
        remember(cache, Verdict::Allowed);
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
        Known::Allowed { .. } => {
            remember(cache, Verdict::Allowed);
            return Ok(());
        }
        Known::Denied { ingress } => {
            remember(cache, Verdict::Denied { ingress });
            return Err(denied(ingress));
        }
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
            remember(cache, Verdict::Denied { ingress });
            Err(denied(ingress))
        }
    }
}

/// The source address and port of `l3` (IPv6 when `v6`) before any translation, which
/// the stage uses as the flow's source (a Service reply's source is its backend; a
/// hairpin's, the pod itself).
pub(super) fn origin(l3: &[u8], v6: bool) -> Option<(IpAddr, u16)> {
    packet(l3, v6).map(|p| (p.key.src, p.key.src_port))
}
