//! The masquerade stage (SNAT for pod traffic leaving the cluster), around routing:
//!
//! * **outbound**: a pod's IPv4 packet routed to the host port (toward whatever the node
//!   reaches), to a destination that is not exempt, leaves with the node's address and a
//!   source port (or ICMP echo identifier) from the tracked flow;
//! * **inbound**: a packet the node's stack hands to the host port for the node's own
//!   address (the node steers replies in the port range, and ICMP, to the dataplane; see
//!   docs/egress.md) gets its pod's address and port back if it belongs to a tracked flow,
//!   and is then routed like any packet; a new connection to a port published to a pod
//!   (hostPort) opens a flow to that pod. An ICMP error quoting a masqueraded packet goes to
//!   the pod with the quote translated back too. Anything else keeps its destination and
//!   is routed back to the node's stack, which is where it was going.

use super::nat::{self, Side};
use super::DropReason;
use crate::conntrack::{Refusal, Tuple};
use crate::tables::host_ports::HostPorts;
use crate::tables::masquerade::Masquerading;
use crate::wire::ipv4;
use std::net::Ipv4Addr;

fn tcp_flags(l3: &[u8], protocol: u8) -> Option<u8> {
    if protocol != ipv4::PROTO_TCP {
        return None;
    }
    let ihl = usize::from(l3[0] & 0x0f) * 4;
    l3.get(ihl + 13).copied()
}

fn addr(l3: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(l3[at], l3[at + 1], l3[at + 2], l3[at + 3])
}

/// The tuple of the IPv4 packet `l3` whose ports are `ports`.
fn tuple_of(l3: &[u8], ports: &nat::L4) -> Tuple {
    Tuple {
        protocol: ports.protocol,
        src: addr(l3, 12),
        src_port: ports.src_port,
        dst: addr(l3, 16),
        dst_port: ports.dst_port,
    }
}

/// Masquerades the pod's IPv4 packet `l3` (source becomes the node's address and port).
pub(super) fn outbound(
    m: &Masquerading,
    l3: &mut [u8],
    partial: bool,
    now_ns: u64,
) -> Result<(), DropReason> {
    let ports = nat::l4_of(l3).ok_or(DropReason::NotMasqueradable)?;
    let tuple = tuple_of(l3, &ports);
    let flags = tcp_flags(l3, ports.protocol);
    let port = m
        .conntrack
        .outbound(tuple, flags, now_ns)
        .map_err(|refusal| match refusal {
            Refusal::TableFull => DropReason::ConntrackFull,
            Refusal::NoPort => DropReason::NoMasqueradePort,
        })?;
    if nat::translate(l3, Side::Source, m.node(), port, partial) {
        Ok(())
    } else {
        Err(DropReason::NotMasqueradable)
    }
}

/// Gives a packet for the node's address its pod's address back, if it belongs to a
/// masqueraded flow or opens one to a port published to a pod (`host_ports`: hostPort);
/// returns whether it did, or why a new published flow was refused.
pub(super) fn inbound(
    m: &Masquerading,
    host_ports: &HostPorts,
    l3: &mut [u8],
    partial: bool,
    now_ns: u64,
) -> Result<bool, DropReason> {
    let Some(ports) = nat::l4_of(l3) else {
        return Ok(icmp_error(m, l3, now_ns));
    };
    let reply = tuple_of(l3, &ports);
    let flags = tcp_flags(l3, ports.protocol);
    let pod = match m.conntrack.inbound(&reply, flags, now_ns) {
        Some(pod) => pod,
        None => match host_ports.get(ports.protocol, ports.dst_port) {
            Some(published) if ports.protocol != ipv4::PROTO_ICMP => m
                .conntrack
                .expose(&reply, published, flags, now_ns)
                .map_err(|refusal| match refusal {
                    Refusal::TableFull => DropReason::ConntrackFull,
                    Refusal::NoPort => DropReason::NoMasqueradePort,
                })?,
            _ => return Ok(false),
        },
    };
    Ok(nat::translate(l3, Side::Destination, pod.0, pod.1, partial))
}

/// True when the IPv4 packet `l3` goes to a port of the node published to a pod: from a
/// pod or another node, only these are translated (the node's stack sees the rest).
pub(super) fn to_host_port(host_ports: &HostPorts, l3: &[u8]) -> bool {
    !host_ports.is_empty()
        && nat::l4_of(l3).is_some_and(|p| {
            p.protocol != ipv4::PROTO_ICMP && host_ports.get(p.protocol, p.dst_port).is_some()
        })
}

/// A pod's answer on a connection that came in through a published port (hostPort) from
/// inside the cluster (another pod, another node, the node itself): the source becomes
/// node:hostPort again. Returns whether it did; traffic that is no such answer is left
/// alone after one set lookup (none at all while no port is published).
pub(super) fn host_port_answer(
    m: &Masquerading,
    host_ports: &HostPorts,
    l3: &mut [u8],
    partial: bool,
    now_ns: u64,
) -> bool {
    if host_ports.is_empty() {
        return false;
    }
    let Some(ports) = nat::l4_of(l3) else {
        return false;
    };
    if !host_ports.publishes(addr(l3, 12), ports.protocol, ports.src_port) {
        return false;
    }
    let flags = tcp_flags(l3, ports.protocol);
    let Some(port) = m.conntrack.answer(&tuple_of(l3, &ports), flags, now_ns) else {
        return false;
    };
    nat::translate(l3, Side::Source, m.node(), port, partial)
}

/// An ICMP error about a masqueraded packet: the quoted packet went from node:port to the
/// remote end; translate the quote's source and the outer destination back to the pod.
fn icmp_error(m: &Masquerading, l3: &mut [u8], now_ns: u64) -> bool {
    let ihl = usize::from(l3[0] & 0x0f) * 4;
    if l3[9] != ipv4::PROTO_ICMP || l3.len() < ihl + 8 + 20 + 8 {
        return false;
    }
    let kind = l3[ihl];
    if !crate::wire::icmp::is_v4_error(kind) {
        return false;
    }
    let quote_at = ihl + 8;
    let quote = &l3[quote_at..];
    let Some(quoted) = nat::l4_of(quote) else {
        return false;
    };
    // The quoted packet is what we sent: node:port -> remote. Its reply tuple is the key.
    let reply = Tuple {
        protocol: quoted.protocol,
        src: addr(quote, 16),
        src_port: quoted.dst_port,
        dst: addr(quote, 12),
        dst_port: quoted.src_port,
    };
    if reply.dst != m.node() {
        return false;
    }
    let Some((pod, port)) = m.conntrack.inbound(&reply, None, now_ns) else {
        return false;
    };
    // The quote's source (TCP/UDP checksums inside it are adjusted when quoted), then the
    // outer destination, then the ICMP checksum over the changed quote.
    if !nat::translate(&mut l3[quote_at..], Side::Source, pod, port, false) {
        return false;
    }
    nat::translate_address(l3, Side::Destination, pod);
    nat::refresh_icmp_checksum(&mut l3[ihl..]);
    true
}
