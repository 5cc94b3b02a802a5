//! The Service stage (what kube-proxy does in a node's kernel, done here), before routing,
//! IPv4 and IPv6, TCP and UDP:
//!
//! * a packet from a pod or from the node to a Service's frontend (cluster IP or external IP,
//!   and port) gets a backend as its destination: the flow's, or for a new flow one chosen by
//!   Maglev over the Service's endpoints (the same choice on every node), or the client's
//!   previous one under ClientIP affinity. The client's address is kept, so the backend sees
//!   the pod; a client that is its own backend (hairpin) is shown the frontend's address
//!   as source, since its kernel drops packets from itself;
//! * a backend's reply to such a flow gets the frontend as its source again (and, for
//!   hairpin, the client as destination), on whichever port it arrives: from a local pod, or
//!   from another node through the overlay;
//! * a node port is served on every node's address: a pod's or the node's connection to
//!   any node's address and node port is translated right here, like a cluster IP's; a
//!   client from outside the cluster (through the node's stack, steered by a policy rule)
//!   is shown to the backend as this node under `externalTrafficPolicy: Cluster` (the
//!   backend may run on another node, and its answer must come back this way), and keeps
//!   its address under `Local`, which serves only this node's endpoints (and drops the
//!   client when there is none here). External IPs are served the same way;
//! * a frontend with no usable endpoint refuses the client at once with ICMP port
//!   unreachable ("connection refused"), as kube-proxy's REJECT does;
//! * an ICMP error about a Service flow (a backend's port unreachable, a router's
//!   fragmentation needed) reaches the client as if its frontend had sent it.
//!
//! Translation happens on the client's node only: packets from other nodes are already
//! addressed to their backend. Checksums are updated incrementally, partial ones kept
//! partial, so super-frames are translated whole.

use super::nat::{ip_head, translate_ip, IpHead, Side};
use super::DropReason;
use crate::conntrack::service::{FlowKey, Frontend, Refusal, ServiceFlows};
use crate::conntrack::FxBuild;
use crate::tables::services::ServiceTable;
use crate::tables::PortRole;
use crate::wire::icmp::{self, IcmpPacket};
use crate::wire::{checksum, ipv4, ipv6, Ipv4Header, Ipv6Packet, TcpPacket, UdpPacket};
use std::hash::BuildHasher;
use std::net::IpAddr;

/// What the stage did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Not a Service's packet: unchanged.
    Untouched,
    /// Now addressed to its backend (the caller routes it by its new destination).
    ToBackend,
    /// A backend's reply, now from its frontend.
    FromFrontend,
    /// No usable endpoint: refuse the client (ICMP port unreachable).
    Refuse,
    /// Dropped for this reason.
    Drop(DropReason),
}

/// The flow's tuple, and the TCP flags, of an IPv4 or IPv6 TCP/UDP packet `l3`.
fn flow_of(l3: &[u8], v6: bool) -> Option<(FlowKey, Option<u8>)> {
    let (key, l4_at) = flow_key(l3, v6)?;
    let flags = (key.protocol == ipv4::PROTO_TCP)
        .then(|| {
            TcpPacket::new_checked(l3.get(l4_at..)?)
                .ok()
                .map(|t| t.flags())
        })
        .flatten();
    Some((key, flags))
}

/// The hash Maglev picks a new flow's backend with: fixed keys, so the same on every node.
fn flow_hash(key: &FlowKey) -> u64 {
    let x = FxBuild::default().hash_one(key);
    x ^ (x >> 31)
}

/// An ICMP or ICMPv6 error about a packet of a Service flow, as the backend side sent it
/// (from `seen_as` to the backend): its quote gets the client's view back (the frontend as
/// destination, the client as source), the error its outer addresses (from the frontend
/// when the backend sent it, to the client), and its checksum; the client's kernel then
/// matches it to its socket ("connection refused" for a UDP port nothing listens on,
/// a smaller path MTU, ...). False when it is about no Service flow.
fn icmp_error(flows: &ServiceFlows, l3: &mut [u8], v6: bool) -> bool {
    let (header_len, outer_src) = if v6 {
        let Ok(ip) = Ipv6Packet::new_checked(&*l3) else {
            return false;
        };
        if ip.next_header() != ipv6::NEXT_ICMPV6 {
            return false;
        }
        (ipv6::HEADER_LEN, IpAddr::V6(ip.src()))
    } else {
        let Ok(ip) = Ipv4Header::new_checked(&*l3) else {
            return false;
        };
        if ip.protocol() != ipv4::PROTO_ICMP {
            return false;
        }
        (ip.header_len(), IpAddr::V4(ip.src()))
    };
    let Some(kind) = l3.get(header_len).copied() else {
        return false;
    };
    let is_error = if v6 {
        icmp::is_v6_error(kind)
    } else {
        icmp::is_v4_error(kind)
    };
    let quote_at = header_len + icmp::HEADER_LEN;
    if !is_error || l3.len() <= quote_at {
        return false;
    }
    let Some((quoted, _)) = flow_key(&l3[quote_at..], v6) else {
        return false;
    };
    let reply = FlowKey {
        protocol: quoted.protocol,
        src: quoted.dst,
        src_port: quoted.dst_port,
        dst: quoted.src,
        dst_port: quoted.src_port,
    };
    let Some(flow) = flows.answering(&reply) else {
        return false;
    };
    let front = flow.original;
    let quote = &mut l3[quote_at..];
    translate_ip(quote, Side::Destination, front.dst, front.dst_port, false);
    if flow.source_translated() {
        translate_ip(quote, Side::Source, front.src, front.src_port, false);
    }
    if outer_src == flow.backend.0 {
        set_address(l3, v6, Side::Source, front.dst);
    }
    if flow.source_translated() {
        set_address(l3, v6, Side::Destination, front.src);
    }
    refresh_icmp_checksum(l3, header_len, v6);
    true
}

/// The tuple of a TCP or UDP packet, whole or quoted in an ICMP error (which may carry only
/// its start), and where its transport header starts; the IP header is parsed once.
pub(super) fn flow_key(l3: &[u8], v6: bool) -> Option<(FlowKey, usize)> {
    let IpHead {
        protocol,
        src,
        dst,
        l4_at,
        later_fragment,
    } = ip_head(l3, v6)?;
    if later_fragment {
        return None;
    }
    if protocol != ipv4::PROTO_TCP && protocol != ipv4::PROTO_UDP {
        return None;
    }
    // TCP and UDP both start with the two ports.
    let ports = UdpPacket::new_checked(l3.get(l4_at..)?).ok()?;
    let key = FlowKey {
        protocol,
        src,
        src_port: ports.src_port(),
        dst,
        dst_port: ports.dst_port(),
    };
    Some((key, l4_at))
}

/// Sets one of the outer addresses of the IP packet `l3` (IPv4: with its header checksum).
fn set_address(l3: &mut [u8], v6: bool, side: Side, addr: IpAddr) {
    match (v6, addr) {
        (false, IpAddr::V4(a)) => {
            if let Ok(mut ip) = Ipv4Header::new_checked(l3) {
                match side {
                    Side::Source => ip.set_src(a),
                    Side::Destination => ip.set_dst(a),
                };
            }
        }
        (true, IpAddr::V6(a)) => {
            if let Ok(mut ip) = Ipv6Packet::new_checked(l3) {
                match side {
                    Side::Source => ip.set_src(a),
                    Side::Destination => ip.set_dst(a),
                };
            }
        }
        _ => {}
    }
}

/// Recomputes the ICMP (no pseudo-header) or ICMPv6 (with one) checksum of the message
/// after `header_len` bytes of IP header in `l3`.
fn refresh_icmp_checksum(l3: &mut [u8], header_len: usize, v6: bool) {
    let len = l3.len() - header_len;
    let pseudo = if v6 {
        checksum::pseudo_header_of(l3, ipv6::NEXT_ICMPV6, len as u32)
    } else {
        0
    };
    let Ok(mut message) = IcmpPacket::new_checked(&mut l3[header_len..]) else {
        return;
    };
    message.set_checksum(0);
    let sum = checksum::finish(checksum::accumulate(pseudo, &l3[header_len..]));
    if let Ok(mut message) = IcmpPacket::new_checked(&mut l3[header_len..]) {
        message.set_checksum(sum);
    }
}

/// Runs the stage over the IP packet `l3` that arrived on a port of role `from`.
pub(super) fn before_routing(
    services: &ServiceTable,
    flows: &ServiceFlows,
    from: PortRole,
    l3: &mut [u8],
    v6: bool,
    partial: bool,
    now_ns: u64,
) -> Step {
    let Some((key, flags)) = flow_of(l3, v6) else {
        return if icmp_error(flows, l3, v6) {
            Step::FromFrontend
        } else {
            Step::Untouched
        };
    };
    if services.is_backend(key.src, key.protocol, key.src_port) {
        if let Some(flow) = flows.reply(&key, flags, now_ns) {
            let front = flow.original;
            translate_ip(l3, Side::Source, front.dst, front.dst_port, partial);
            if flow.source_translated() {
                translate_ip(l3, Side::Destination, front.src, front.src_port, partial);
            }
            return Step::FromFrontend;
        }
    }
    if from == PortRole::Uplink {
        return Step::Untouched;
    }
    let frontend = Frontend {
        addr: key.dst,
        protocol: key.protocol,
        port: key.dst_port,
    };
    let (entry, node_port) = match services.frontend(&frontend) {
        Some(entry) => (entry, false),
        None if services.is_node_address(key.dst) => {
            match services.node_port(key.dst.is_ipv6(), key.protocol, key.dst_port) {
                Some(entry) => (entry, true),
                None => return Step::Untouched,
            }
        }
        None => return Step::Untouched,
    };
    let flow = match flows.forward(&key, flags, now_ns) {
        Some(flow) => flow,
        None => {
            // A client from outside the cluster: it arrived through the node's stack, from
            // an address that is no node's, to a node port or an external IP.
            let external = from == PortRole::Host
                && !services.is_node_address(key.src)
                && (node_port || services.is_external_ip(key.dst));
            let backends = entry.backends(external);
            let remembered = entry.affinity_ns.and_then(|timeout| {
                flows.affinity(entry.id, key.src, timeout, now_ns, |b| backends.contains(b))
            });
            let Some(backend) = remembered.or_else(|| backends.pick(flow_hash(&key))) else {
                return if external && entry.external_local {
                    Step::Drop(DropReason::ServiceNoLocalEndpoint)
                } else {
                    Step::Refuse
                };
            };
            if entry.affinity_ns.is_some() {
                flows.remember(entry.id, key.src, backend, now_ns);
            }
            // `externalTrafficPolicy: Cluster`: the backend may be on another node, so it
            // sees this node as the client and answers through it.
            let shown_as = (external && !entry.external_local)
                .then(|| services.own_address(key.dst.is_ipv6()))
                .flatten();
            match flows.open(key, backend, shown_as, entry.id, flags, now_ns) {
                Ok(flow) => flow,
                Err(Refusal::TableFull) => return Step::Drop(DropReason::ServiceFlowsFull),
                Err(Refusal::ReplyClash) => return Step::Drop(DropReason::ServiceReplyClash),
            }
        }
    };
    translate_ip(
        l3,
        Side::Destination,
        flow.backend.0,
        flow.backend.1,
        partial,
    );
    if flow.source_translated() {
        translate_ip(l3, Side::Source, flow.seen_as, flow.seen_port, partial);
    }
    Step::ToBackend
}
