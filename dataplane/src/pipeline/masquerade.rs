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
//!   is routed back to the node's stack, which is where it was going;
//! * **published ports** (hostPort) from inside the cluster: a pod's or another node's
//!   connection to node:hostPort is translated like an inbound one, and the pod's answers,
//!   recognised by their source, leave as node:hostPort whoever the client is (outside,
//!   a pod, a node, the node itself, the pod itself).
//!
//! `before_routing` decides what a packet needs before it is routed, cheaply;
//! `translate_before_routing` does it; `outbound` runs after routing.

use super::nat::{self, Side};
use super::DropReason;
use crate::conntrack::{Refusal, Tuple};
use crate::tables::host_ports::HostPorts;
use crate::tables::masquerade::Masquerading;
use crate::tables::PortRole;
use crate::wire::icmp::{self, IcmpPacket};
use crate::wire::{ipv4, Ipv4Header, TcpPacket};
use std::net::Ipv4Addr;

/// The TCP flags of the IPv4 packet `l3` of `protocol`, when it is TCP with a header.
fn tcp_flags(l3: &[u8], protocol: u8) -> Option<u8> {
    if protocol != ipv4::PROTO_TCP {
        return None;
    }
    let ip = Ipv4Header::new_checked(l3).ok()?;
    TcpPacket::new_checked(ip.rest()).ok().map(|t| t.flags())
}

/// Source and destination of the IPv4 header `l3` (unspecified when it has none; callers
/// have parsed it already).
fn addresses(l3: &[u8]) -> (Ipv4Addr, Ipv4Addr) {
    Ipv4Header::new_checked(l3).map_or((Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED), |ip| {
        (ip.src(), ip.dst())
    })
}

/// The tuple of the IPv4 packet `l3` whose ports are `ports`.
fn tuple_of(l3: &[u8], ports: &nat::L4) -> Tuple {
    let (src, dst) = addresses(l3);
    Tuple {
        protocol: ports.protocol,
        src,
        src_port: ports.src_port,
        dst,
        dst_port: ports.dst_port,
    }
}

/// Why the table refused a new flow, as the drop it causes.
fn refused(refusal: Refusal) -> DropReason {
    match refusal {
        Refusal::TableFull => DropReason::ConntrackFull,
        Refusal::NoPort => DropReason::NoMasqueradePort,
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
        .map_err(refused)?;
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
                .map_err(refused)?,
            _ => return Ok(false),
        },
    };
    let client = reply.src;
    if !nat::translate(l3, Side::Destination, pod.0, pod.1, partial) {
        return Ok(false);
    }
    // A pod connecting to its own published port (hairpin) would receive a packet from its
    // own address, which its kernel drops: it sees the node's address as the client
    // instead (with its own port, which no other connection to it from the node's address
    // uses: the node's ports in the masquerade range are reserved).
    if client == pod.0 {
        nat::translate(l3, Side::Source, m.node(), reply.src_port, partial);
    }
    Ok(true)
}

/// A translation a packet needs before it is routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BeforeRouting {
    /// For the node's address: [`inbound`].
    Inbound,
    /// From a published pod port: [`host_port_answer`].
    Answer,
}

/// Which translation, if any, the IPv4 packet `l3` arriving on a port of role `from` needs
/// before routing. From the node's stack: everything for the node's address (replies to
/// masqueraded flows, connections to published ports). From pods and other nodes:
/// connections to published ports, and pods' answers from them. With no port published,
/// this costs pod traffic one address comparison.
pub(super) fn before_routing(
    m: &Masquerading,
    host_ports: &HostPorts,
    from: PortRole,
    l3: &[u8],
) -> Option<BeforeRouting> {
    let (src, dst) = addresses(l3);
    let to_node = dst == m.node();
    if to_node && from == PortRole::Host {
        return Some(BeforeRouting::Inbound);
    }
    if host_ports.is_empty() {
        return None;
    }
    let ports = nat::l4_of(l3).filter(|p| p.protocol != ipv4::PROTO_ICMP)?;
    if from == PortRole::Pod && host_ports.publishes(src, ports.protocol, ports.src_port) {
        Some(BeforeRouting::Answer)
    } else if to_node && host_ports.get(ports.protocol, ports.dst_port).is_some() {
        Some(BeforeRouting::Inbound)
    } else {
        None
    }
}

/// What [`translate_before_routing`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Translated {
    /// Nothing: the packet goes on as it came.
    Nothing,
    /// The destination became a pod's ([`inbound`]).
    Destination,
    /// A published port's answer now comes from the node ([`host_port_answer`]).
    Answer,
}

/// Runs the translation [`before_routing`] chose. A packet from a published pod port that
/// answers no flow may still be a new connection to a published port (the pod's own,
/// hairpin): then it is treated as such.
pub(super) fn translate_before_routing(
    m: &Masquerading,
    host_ports: &HostPorts,
    step: BeforeRouting,
    l3: &mut [u8],
    partial: bool,
    now_ns: u64,
) -> Result<Translated, DropReason> {
    if step == BeforeRouting::Answer {
        if host_port_answer(m, l3, partial, now_ns) {
            return Ok(Translated::Answer);
        }
        let to_published = addresses(l3).1 == m.node()
            && nat::l4_of(l3).is_some_and(|p| host_ports.get(p.protocol, p.dst_port).is_some());
        if !to_published {
            return Ok(Translated::Nothing);
        }
    }
    Ok(match inbound(m, host_ports, l3, partial, now_ns)? {
        true => Translated::Destination,
        false => Translated::Nothing,
    })
}

/// The tuple of a translatable IPv4 packet `l3`: taken before a translation, what
/// [`restore`] puts back.
pub(super) fn tuple(l3: &[u8]) -> Option<Tuple> {
    nat::l4_of(l3).map(|ports| tuple_of(l3, &ports))
}

/// Puts the addresses and ports of `before` back into the translated packet `l3`: an ICMP
/// error about it must quote it as its sender sent it, or the sender cannot match the error
/// to its socket (a PMTU black hole).
pub(super) fn restore(l3: &mut [u8], before: &Tuple, partial: bool) {
    nat::translate(l3, Side::Source, before.src, before.src_port, partial);
    nat::translate(l3, Side::Destination, before.dst, before.dst_port, partial);
}

/// A pod's answer on a connection that came in through one of its published ports
/// (hostPort): the source becomes node:hostPort again, whoever the client (outside the
/// cluster, another pod, another node, the node itself). For the pod's connection to its
/// own published port (hairpin, see [`inbound`]) the destination becomes the pod again.
/// Returns whether it translated; a packet of no such flow is left alone (a new flow from
/// that port is masqueraded after routing as usual).
fn host_port_answer(m: &Masquerading, l3: &mut [u8], partial: bool, now_ns: u64) -> bool {
    let Some(ports) = nat::l4_of(l3) else {
        return false;
    };
    let flags = tcp_flags(l3, ports.protocol);
    let tuple = tuple_of(l3, &ports);
    let (port, hairpin) = match m.conntrack.answer(&tuple, flags, now_ns) {
        Some(port) => (port, false),
        None if tuple.dst == m.node() => {
            let own = Tuple {
                dst: tuple.src,
                ..tuple
            };
            match m.conntrack.answer(&own, flags, now_ns) {
                Some(port) => (port, true),
                None => return false,
            }
        }
        None => return false,
    };
    nat::translate(l3, Side::Source, m.node(), port, partial)
        && (!hairpin || nat::translate(l3, Side::Destination, tuple.src, tuple.dst_port, partial))
}

/// An ICMP error about a masqueraded packet: the quoted packet went from node:port to the
/// remote end; translate the quote's source and the outer destination back to the pod.
fn icmp_error(m: &Masquerading, l3: &mut [u8], now_ns: u64) -> bool {
    let Ok(mut ip) = Ipv4Header::new_checked(&mut *l3) else {
        return false;
    };
    if ip.protocol() != ipv4::PROTO_ICMP {
        return false;
    }
    let rest_len = ip.rest().len();
    let Ok(mut message) = IcmpPacket::new_checked(&mut ip.split_mut().1[..rest_len]) else {
        return false;
    };
    if !icmp::is_v4_error(message.kind()) {
        return false;
    }
    let quote = message.body();
    let Some(quoted) = nat::l4_of(quote) else {
        return false;
    };
    // The quoted packet is what we sent: node:port -> remote. Its reply tuple is the key.
    let (sent_from, sent_to) = addresses(quote);
    let reply = Tuple {
        protocol: quoted.protocol,
        src: sent_to,
        src_port: quoted.dst_port,
        dst: sent_from,
        dst_port: quoted.src_port,
    };
    if reply.dst != m.node() {
        return false;
    }
    let Some((pod, port)) = m.conntrack.inbound(&reply, None, now_ns) else {
        return false;
    };
    // The quote's source (TCP/UDP checksums inside it are adjusted when quoted), the ICMP
    // checksum over the changed quote, then the outer destination.
    if !nat::translate(message.body_mut(), Side::Source, pod, port, false) {
        return false;
    }
    message.fill_checksum_v4();
    ip.set_dst(pod);
    true
}
