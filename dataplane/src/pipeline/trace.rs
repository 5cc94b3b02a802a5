//! Tracing a synthetic packet (`switchyard-control trace`): a pod's packet to a destination
//! is built as the pod would send it and run through the real pipeline against a detached
//! copy of the live tables ([`Tables::detached`]: the same routes, Services and policies,
//! empty flow tables of its own), with a pipeline of its own. Nothing is sent, no live flow
//! is opened, no live counter moves. Each stage's decision is then read from what the
//! pipeline did: the packet's addresses before and after, its counters, its verdict and the
//! next hop. The fast path carries no tracing code.

use super::{policy, Counters, DropReason, Event, Pipeline, Verdict, L3_OFFSET};
use crate::buffer::PacketBuf;
use crate::conntrack::key::FlowKey;
use crate::tables::{NextHop, Port, PortRole, Tables};
use crate::wire::{checksum, ipv4, ipv6, tcp};
use std::net::IpAddr;
use switchyard_api::{TraceReport, TraceStep};

/// The source port of a traced TCP, UDP or SCTP packet.
pub const PROBE_SOURCE_PORT: u16 = 40000;
/// The echo identifier of a traced ICMP echo request.
const PROBE_ECHO_ID: u16 = 0x5359;

/// The packet to trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// The pod's address (of the destination's family).
    pub src: IpAddr,
    /// The destination.
    pub dst: IpAddr,
    /// IP protocol: TCP (a SYN), UDP, SCTP or ICMP (an echo request).
    pub protocol: u8,
    /// Destination port (ignored for ICMP).
    pub dst_port: u16,
}

impl Probe {
    fn v6(&self) -> bool {
        self.dst.is_ipv6()
    }

    /// The IP protocol (ICMPv6 for an IPv6 echo) and the L4 header with a few bytes of
    /// payload, its checksum still zero.
    fn transport(&self) -> (u8, Vec<u8>) {
        let mut l4 = match self.protocol {
            ipv4::PROTO_TCP => {
                let mut t = vec![0u8; tcp::MIN_HEADER_LEN];
                t[0..2].copy_from_slice(&PROBE_SOURCE_PORT.to_be_bytes());
                t[2..4].copy_from_slice(&self.dst_port.to_be_bytes());
                t[12] = 5 << 4;
                t[13] = tcp::FLAG_SYN;
                t[14..16].copy_from_slice(&64240u16.to_be_bytes());
                t
            }
            ipv4::PROTO_ICMP => {
                let kind = if self.v6() { 128 } else { 8 };
                let mut t = vec![kind, 0, 0, 0];
                t.extend_from_slice(&PROBE_ECHO_ID.to_be_bytes());
                t.extend_from_slice(&1u16.to_be_bytes());
                t
            }
            _ => {
                // UDP, and SCTP's common header (ports first as well).
                let mut t = vec![
                    0u8;
                    if self.protocol == ipv4::PROTO_SCTP {
                        12
                    } else {
                        8
                    }
                ];
                t[0..2].copy_from_slice(&PROBE_SOURCE_PORT.to_be_bytes());
                t[2..4].copy_from_slice(&self.dst_port.to_be_bytes());
                t
            }
        };
        l4.extend_from_slice(b"switchyard trace");
        let protocol = match (self.protocol, self.v6()) {
            (ipv4::PROTO_ICMP, true) => ipv6::NEXT_ICMPV6,
            (p, _) => p,
        };
        if protocol == ipv4::PROTO_UDP {
            let len = l4.len() as u16;
            l4[4..6].copy_from_slice(&len.to_be_bytes());
        }
        (protocol, l4)
    }

    /// The Ethernet frame the pod behind `ingress` would send toward its gateway.
    fn frame<D>(&self, tables: &Tables<D>, ingress: &Port<D>) -> Vec<u8> {
        let (protocol, mut l4) = self.transport();
        let mut eth = Vec::with_capacity(128);
        eth.extend_from_slice(&tables.gateway.mac.0);
        eth.extend_from_slice(&ingress.mac.0);
        let l3 = match (self.src, self.dst) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                eth.extend_from_slice(&0x0800u16.to_be_bytes());
                let mut h = vec![0u8; ipv4::MIN_HEADER_LEN];
                ipv4::emit_header(&mut h, src, dst, protocol, l4.len(), 64);
                h
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                eth.extend_from_slice(&0x86ddu16.to_be_bytes());
                let mut h = vec![0u8; ipv6::HEADER_LEN];
                ipv6::emit_header(&mut h, src, dst, protocol, l4.len(), 64);
                h
            }
            _ => return eth,
        };
        let checksum_at = match protocol {
            ipv4::PROTO_TCP => Some((tcp::CHECKSUM_OFFSET, true)),
            ipv4::PROTO_UDP => Some((6, true)),
            ipv6::NEXT_ICMPV6 => Some((2, true)),
            ipv4::PROTO_ICMP => Some((2, false)),
            _ => None,
        };
        if let Some((at, pseudo)) = checksum_at {
            let sum = if pseudo {
                checksum::pseudo_header_of(&l3, protocol, l4.len() as u32)
            } else {
                0
            };
            let c = checksum::finish(checksum::accumulate(sum, &l4));
            l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
        }
        eth.extend_from_slice(&l3);
        eth.extend_from_slice(&l4);
        eth
    }
}

/// Runs `probe` from the pod behind `ingress` through a fresh pipeline over `tables` (a
/// detached copy: see the module's text) and reports what each stage decided.
pub fn trace<D>(tables: &Tables<D>, ingress: &Port<D>, probe: &Probe, now_ns: u64) -> TraceReport {
    let v6 = probe.v6();
    let mut pkt = PacketBuf::new();
    pkt.load_ethernet(&probe.frame(tables, ingress));
    let before = flow_of(&pkt, v6);
    let mut pipeline = Pipeline::new();
    let mut verdicts = [Verdict::Drop];
    pipeline.process(
        tables,
        ingress,
        std::slice::from_mut(&mut pkt),
        &mut verdicts,
        now_ns,
    );
    let counters = pipeline.counters();
    let after = flow_of(&pkt, v6);
    let mut steps = Vec::new();
    let mut step = |stage: &str, decision: String| {
        steps.push(TraceStep {
            stage: stage.into(),
            decision,
        })
    };
    step(
        "ingress",
        format!("{} from {}", port_name(ingress), ingress.mac),
    );
    let gateway: IpAddr = if v6 {
        tables.gateway.ipv6.into()
    } else {
        tables.gateway.ipv4.into()
    };
    step(
        "neighbour",
        format!(
            "the pod's gateway {gateway} answers for every address with {} (proxy {})",
            tables.gateway.mac,
            if v6 { "ND" } else { "ARP" }
        ),
    );
    let (Some(before), verdict) = (before, verdicts[0]) else {
        return report(probe, steps, "dropped", counters);
    };
    let after = after.unwrap_or(before);
    let (sent_to, sent_from) = (
        endpoint(before.dst, before.dst_port),
        endpoint(before.src, before.src_port),
    );
    let (now_to, now_from) = (
        endpoint(after.dst, after.dst_port),
        endpoint(after.src, after.src_port),
    );
    if counters.count(Event::ServiceTranslated) > 0 {
        let frontend = format!("{sent_to} is a Service frontend: backend {now_to}");
        step("service", frontend);
    } else if let Some(reason) = first_drop(counters, SERVICE_DROPS) {
        step("service", format!("refused: {}", reason.name()));
    } else if !tables.services.is_empty() {
        step("service", "not a Service frontend".into());
    }
    // Routing ran when the packet was forwarded or stopped at or after the route; the
    // destination it routed is the translated one, unless an answer replaced the packet.
    let routed = matches!(verdict, Verdict::Forward(_) | Verdict::Leave(_))
        || first_drop(counters, ROUTED_DROPS).is_some();
    if !routed {
        return finish(probe, steps, verdict, &pkt, tables, v6, counters);
    }
    let dst = if verdict == Verdict::Reply {
        before.dst
    } else {
        after.dst
    };
    let nh = match dst {
        IpAddr::V4(d) => tables.routes_v4.lookup(u32::from(d)),
        IpAddr::V6(d) => tables.routes_v6.lookup(u128::from(d)),
    };
    step("route", format!("{dst} via {}", next_hop(tables, nh)));
    if let Some(reason) = first_drop(counters, POLICY_DROPS) {
        let whose = if reason == DropReason::PolicyDeniedEgress {
            "the sending pod's egress rules"
        } else {
            "the destination pod's ingress rules"
        };
        step("policy", format!("denied by {whose}"));
    } else if !tables.policy.is_empty() {
        step("policy", "allowed".into());
    }
    if counters.count(Event::Masqueraded) > 0 {
        let source = format!(
            "source {sent_from} becomes {now_from} (the node's address; port chosen for this trace)"
        );
        step("masquerade", source);
    } else if let Some(reason) = first_drop(counters, MASQUERADE_DROPS) {
        step("masquerade", format!("refused: {}", reason.name()));
    } else if let Some(m) = tables.masquerade.as_deref() {
        let leaves =
            matches!(tables.nexthop(nh), Some(NextHop::Port(p)) if p.role == PortRole::Host);
        if leaves && !v6 {
            let exempt = matches!(dst, IpAddr::V4(d) if !m.applies_to(d));
            step(
                "masquerade",
                if exempt {
                    format!("not masqueraded: {dst} is exempt")
                } else {
                    "not masqueraded".into()
                },
            );
        }
    }
    finish(probe, steps, verdict, &pkt, tables, v6, counters)
}

/// The last steps: where the frame went, or what answered it, and the verdict.
fn finish<D>(
    probe: &Probe,
    mut steps: Vec<TraceStep>,
    verdict: Verdict,
    pkt: &PacketBuf,
    tables: &Tables<D>,
    v6: bool,
    counters: &Counters,
) -> TraceReport {
    let mut step = |stage: &str, decision: String| {
        steps.push(TraceStep {
            stage: stage.into(),
            decision,
        })
    };
    let name = match verdict {
        Verdict::Forward(index) => {
            if let Some(hop) = tables.nexthop(index) {
                step("egress", egress(hop, pkt, v6));
            }
            "forwarded"
        }
        Verdict::Leave(index) => {
            if let Some(hop) = tables.nexthop(index) {
                let through = egress(hop, pkt, v6);
                step(
                    "egress",
                    format!(
                        "the AF_XDP uplink, to the kernel's next hop (when it has none: {through})"
                    ),
                );
            }
            "forwarded"
        }
        Verdict::Reply => {
            step("reply", answer(pkt, v6));
            "answered"
        }
        Verdict::Drop | Verdict::Merged => "dropped",
    };
    report(probe, steps, name, counters)
}

/// Drops at or after the route lookup.
const ROUTED_DROPS: &[DropReason] = &[
    DropReason::NoRoute,
    DropReason::Blackhole,
    DropReason::Unreachable,
    DropReason::TtlExceeded,
    DropReason::TooBig,
    DropReason::NeedsFragmentation,
    DropReason::OverlayTransit,
    DropReason::PolicyDeniedEgress,
    DropReason::PolicyDeniedIngress,
    DropReason::ConntrackFull,
    DropReason::NoMasqueradePort,
    DropReason::NotMasqueradable,
];
const SERVICE_DROPS: &[DropReason] = &[
    DropReason::ServiceNoEndpoints,
    DropReason::ServiceNoLocalEndpoint,
    DropReason::ServiceFlowsFull,
    DropReason::ServiceReplyClash,
];
const POLICY_DROPS: &[DropReason] = &[
    DropReason::PolicyDeniedEgress,
    DropReason::PolicyDeniedIngress,
];
const MASQUERADE_DROPS: &[DropReason] = &[
    DropReason::ConntrackFull,
    DropReason::NoMasqueradePort,
    DropReason::NotMasqueradable,
];

fn first_drop(counters: &Counters, among: &[DropReason]) -> Option<DropReason> {
    among.iter().copied().find(|r| counters.dropped(*r) > 0)
}

fn report(
    probe: &Probe,
    mut steps: Vec<TraceStep>,
    verdict: &str,
    counters: &Counters,
) -> TraceReport {
    let drops: Vec<&str> = DropReason::ALL
        .iter()
        .filter(|r| counters.dropped(**r) > 0)
        .map(|r| r.name())
        .collect();
    let decision = if drops.is_empty() {
        verdict.to_string()
    } else {
        format!("{verdict}: {}", drops.join(", "))
    };
    steps.push(TraceStep {
        stage: "verdict".into(),
        decision,
    });
    TraceReport {
        packet: describe(probe),
        steps,
        verdict: verdict.into(),
    }
}

/// `tcp 10.244.0.5:40000 -> 10.96.0.10:80`, as the pod sends it.
fn describe(probe: &Probe) -> String {
    let name = crate::wire::protocol_name(probe.protocol);
    if probe.protocol == ipv4::PROTO_ICMP {
        format!("{name} echo request {} -> {}", probe.src, probe.dst)
    } else {
        format!(
            "{name} {} -> {}",
            endpoint(probe.src, PROBE_SOURCE_PORT),
            endpoint(probe.dst, probe.dst_port)
        )
    }
}

fn endpoint(addr: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(addr, port).to_string()
}

fn flow_of(pkt: &PacketBuf, v6: bool) -> Option<FlowKey> {
    let l3 = pkt.frame().get(L3_OFFSET..)?;
    policy::packet(l3, v6).map(|p| p.key)
}

fn port_name<D>(port: &Port<D>) -> String {
    let owner = port.info.pod.as_deref().or(port.info.owner.as_deref());
    match (port.role, owner) {
        (PortRole::Host, _) => format!("the node's host port {}", port.info.ifname),
        (PortRole::Uplink, _) => format!("the uplink {}", port.info.ifname),
        (_, Some(pod)) => format!("pod {pod} (port {}, {})", port.id, port.info.ifname),
        (_, None) => format!(
            "port {} ({} in {})",
            port.id, port.info.ifname, port.info.netns
        ),
    }
}

fn next_hop<D>(tables: &Tables<D>, index: u32) -> String {
    match tables.nexthop(index) {
        None => "no route".into(),
        Some(NextHop::Blackhole) => "a blackhole route".into(),
        Some(NextHop::Unreachable) => "an unreachable route".into(),
        Some(NextHop::Port(port)) => port_name(port),
        Some(NextHop::Tunnel { port, peer }) => {
            format!("the {} overlay to node {peer}", port.info.ifname)
        }
    }
}

/// Where the forwarded frame goes and how it was rewritten.
fn egress<D>(hop: &NextHop<D>, pkt: &PacketBuf, v6: bool) -> String {
    let eth = pkt.ethernet();
    let ttl = pkt
        .frame()
        .get(L3_OFFSET..)
        .and_then(|l3| l3.get(if v6 { 7 } else { 8 }))
        .copied()
        .unwrap_or(0);
    let ttl_name = if v6 { "hop limit" } else { "TTL" };
    let dst_mac = eth
        .get(0..6)
        .map(|m| switchyard_api::MacAddr([m[0], m[1], m[2], m[3], m[4], m[5]]).to_string())
        .unwrap_or_default();
    match hop {
        NextHop::Port(port) => format!(
            "out of {} to {dst_mac}, MTU {}, {ttl_name} 64 -> {ttl}",
            port.info.ifname, port.mtu
        ),
        NextHop::Tunnel { port, peer } => format!(
            "encapsulated by {} toward {peer} (inner MTU {}), {ttl_name} 64 -> {ttl}",
            port.info.ifname, port.mtu
        ),
        NextHop::Blackhole | NextHop::Unreachable => String::new(),
    }
}

/// What the pipeline answered the pod with (an ICMP error, most often).
fn answer(pkt: &PacketBuf, v6: bool) -> String {
    let Some(l3) = pkt.frame().get(L3_OFFSET..) else {
        return "an answer".into();
    };
    let at = if v6 {
        ipv6::HEADER_LEN
    } else {
        usize::from(l3.first().map_or(5, |b| b & 0x0f)) * 4
    };
    let (Some(kind), Some(code)) = (l3.get(at).copied(), l3.get(at + 1).copied()) else {
        return "an answer".into();
    };
    let what = match (v6, kind, code) {
        (false, 3, 3) | (true, 1, 4) => "port unreachable",
        (false, 3, 4) | (true, 2, _) => "fragmentation needed / packet too big",
        (false, 3, 13) | (true, 1, 1) => "administratively prohibited",
        (false, 3, _) | (true, 1, _) => "destination unreachable",
        (false, 11, _) | (true, 3, _) => "time exceeded",
        _ => "an ICMP message",
    };
    format!(
        "the gateway answers with ICMP{} type {kind} code {code} ({what})",
        if v6 { "v6" } else { "" }
    )
}
