//! Address and port translation in place, for masquerade and Services: the source or the
//! destination address and the TCP/UDP port (IPv4 and IPv6) or ICMP echo identifier
//! (IPv4), with checksums updated incrementally (RFC 1624), all through the `wire` views.
//!
//! A packet whose L4 checksum is still partial (`F_NEEDS_CSUM`, as pods' kernels send them
//! over a TAP, GSO super-frames included) holds only the pseudo-header sum in its checksum
//! field, not complemented; the receiver's stack finishes it over the data. Then only the
//! address change is applied, the un-complemented way, and the port change not at all (the
//! port is data). A UDP checksum of zero means "none" and stays zero.
//!
//! The same functions translate a packet quoted in an ICMP error, which carries only its
//! header and the first 8 bytes of its transport header: there the TCP checksum may be cut
//! off, and only the port changes.

use crate::wire::checksum::{update_l4_address, update_l4_word};
use crate::wire::icmp::{self, IcmpPacket};
use crate::wire::{ipv4, udp, Ipv4Header, Ipv6Packet, TcpPacket, UdpPacket};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Which end of the packet is translated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The source (outbound masquerade).
    Source,
    /// The destination (replies to a masqueraded flow).
    Destination,
}

/// The transport identity a flow is tracked by: protocol and the port (TCP/UDP) or the
/// echo identifier (ICMP) of one side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct L4 {
    /// IP protocol (6, 17 or 1).
    pub protocol: u8,
    /// Source port or ICMP echo identifier.
    pub src_port: u16,
    /// Destination port or ICMP echo identifier.
    pub dst_port: u16,
}

/// The ports of a translatable IPv4 packet `l3` (plain header or with options, whole or
/// quoted; first fragments only): TCP, UDP, or ICMP echo request/reply. `None` for
/// anything else.
pub fn l4_of(l3: &[u8]) -> Option<L4> {
    let ip = Ipv4Header::new_checked(l3).ok()?;
    if ip.is_later_fragment() {
        return None;
    }
    ports_in(ip.protocol(), ip.rest())
}

/// The outer facts of an IPv4 or IPv6 packet `l3`, whole or quoted in an ICMP error.
#[derive(Debug, Clone, Copy)]
pub struct IpHead {
    /// IP protocol (IPv6: the fixed header's next header).
    pub protocol: u8,
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Where the transport header starts.
    pub l4_at: usize,
    /// An IPv4 fragment other than the first (no transport header).
    pub later_fragment: bool,
}

/// Reads the IP header of `l3` (IPv6 when `v6`); `None` when it is cut short.
pub fn ip_head(l3: &[u8], v6: bool) -> Option<IpHead> {
    if v6 {
        let ip = Ipv6Packet::new_quoted(l3).ok()?;
        Some(IpHead {
            protocol: ip.next_header(),
            src: ip.src().into(),
            dst: ip.dst().into(),
            l4_at: crate::wire::ipv6::HEADER_LEN,
            later_fragment: false,
        })
    } else {
        let ip = Ipv4Header::new_checked(l3).ok()?;
        Some(IpHead {
            protocol: ip.protocol(),
            src: ip.src().into(),
            dst: ip.dst().into(),
            l4_at: ip.header_len(),
            later_fragment: ip.is_later_fragment(),
        })
    }
}

/// The ports of the transport header `l4` of `protocol`, if it is translatable.
#[inline]
fn ports_in(protocol: u8, l4: &[u8]) -> Option<L4> {
    match protocol {
        // TCP and UDP both start with the two ports.
        ipv4::PROTO_TCP | ipv4::PROTO_UDP => {
            let ports = UdpPacket::new_checked(l4).ok()?;
            Some(L4 {
                protocol,
                src_port: ports.src_port(),
                dst_port: ports.dst_port(),
            })
        }
        ipv4::PROTO_ICMP => {
            let icmp = IcmpPacket::new_checked(l4).ok()?;
            icmp.is_v4_echo().then(|| L4 {
                protocol,
                src_port: icmp.echo_ident(),
                dst_port: icmp.echo_ident(),
            })
        }
        _ => None,
    }
}

/// Rewrites `side`'s address in the IPv4 header `l3` to `addr`, with the header checksum;
/// returns the address it replaced. `None` (nothing changed) when `l3` has no IPv4 header.
pub fn translate_address(l3: &mut [u8], side: Side, addr: Ipv4Addr) -> Option<Ipv4Addr> {
    let mut ip = Ipv4Header::new_checked(l3).ok()?;
    Some(match side {
        Side::Source => ip.set_src(addr),
        Side::Destination => ip.set_dst(addr),
    })
}

/// Rewrites `side`'s address to `addr` and its port (or the echo identifier) to `port` in
/// the IPv4 packet `l3`. `partial`: the L4 checksum is still partial (`F_NEEDS_CSUM`).
/// Returns false (and changes nothing) when the packet is not translatable.
pub fn translate(l3: &mut [u8], side: Side, addr: Ipv4Addr, port: u16, partial: bool) -> bool {
    let Ok(mut ip) = Ipv4Header::new_checked(&mut *l3) else {
        return false;
    };
    let protocol = ip.protocol();
    let rest = ip.rest();
    let l4_len = rest.len();
    // What `ports_in` accepts, without reading the ports.
    let translatable = match protocol {
        ipv4::PROTO_TCP | ipv4::PROTO_UDP => l4_len >= udp::HEADER_LEN,
        ipv4::PROTO_ICMP => {
            l4_len >= icmp::HEADER_LEN
                && matches!(rest[0], icmp::V4_ECHO_REQUEST | icmp::V4_ECHO_REPLY)
        }
        _ => false,
    };
    if !translatable || ip.is_later_fragment() {
        return false;
    }
    let old_addr = match side {
        Side::Source => ip.set_src(addr),
        Side::Destination => ip.set_dst(addr),
    };
    let Some(l4) = ip.split_mut().1.get_mut(..l4_len) else {
        return false;
    };
    if protocol == ipv4::PROTO_ICMP {
        // ICMP echo: no pseudo-header; only the identifier is covered.
        if let Ok(mut icmp) = IcmpPacket::new_checked(l4) {
            let old_id = icmp.echo_ident();
            icmp.set_echo_ident(port);
            let check = update_l4_word(icmp.checksum(), old_id, port, false);
            icmp.set_checksum(check);
        }
        return true;
    }
    translate_l4(
        l4,
        protocol,
        side,
        (&old_addr.octets(), &addr.octets()),
        port,
        partial,
    );
    true
}

/// The TCP or UDP ports of the IPv6 packet `l3` (no extension header; whole or quoted).
/// `None` for anything else.
pub fn l4_of_v6(l3: &[u8]) -> Option<L4> {
    let ip = Ipv6Packet::new_quoted(l3).ok()?;
    let protocol = ip.next_header();
    if protocol != ipv4::PROTO_TCP && protocol != ipv4::PROTO_UDP {
        return None;
    }
    let ports = UdpPacket::new_checked(ip.payload()).ok()?;
    Some(L4 {
        protocol,
        src_port: ports.src_port(),
        dst_port: ports.dst_port(),
    })
}

/// [`translate`] for a TCP or UDP packet over IPv6.
pub fn translate_v6(l3: &mut [u8], side: Side, addr: Ipv6Addr, port: u16, partial: bool) -> bool {
    let Some(ports) = l4_of_v6(l3) else {
        return false;
    };
    let Ok(mut ip) = Ipv6Packet::new_quoted(&mut *l3) else {
        return false;
    };
    let old_addr = match side {
        Side::Source => ip.set_src(addr),
        Side::Destination => ip.set_dst(addr),
    };
    translate_l4(
        ip.payload_mut(),
        ports.protocol,
        side,
        (&old_addr.octets(), &addr.octets()),
        port,
        partial,
    );
    true
}

/// [`translate`] or [`translate_v6`], by the address's family (which must be the packet's).
pub fn translate_ip(l3: &mut [u8], side: Side, addr: IpAddr, port: u16, partial: bool) -> bool {
    match addr {
        IpAddr::V4(a) => translate(l3, side, a, port, partial),
        IpAddr::V6(a) => translate_v6(l3, side, a, port, partial),
    }
}

/// Sets `side`'s port of the TCP or UDP header `l4` and updates its checksum for that and
/// for the pseudo-header's address change `(old, new)` (4 or 16 bytes each).
#[inline]
fn translate_l4(
    l4: &mut [u8],
    protocol: u8,
    side: Side,
    (old_addr, new_addr): (&[u8], &[u8]),
    port: u16,
    partial: bool,
) {
    // A checksum over the pseudo-header sees the address change; a complete one sees the
    // port change too (a partial one covers no data).
    let adjust = |check: u16, old_port: u16| {
        let check = update_l4_address(check, old_addr, new_addr, partial);
        if partial {
            check
        } else {
            update_l4_word(check, old_port, port, false)
        }
    };
    // TCP and UDP both start with the two ports: one view sets them.
    let Ok(mut ports) = UdpPacket::new_checked(&mut *l4) else {
        return;
    };
    let old_port = set_port(&mut ports, side, port);
    if protocol == ipv4::PROTO_TCP {
        // A quoted header cut before its checksum keeps only the port change.
        if let Ok(mut tcp) = TcpPacket::new_checked(l4) {
            let check = adjust(tcp.checksum(), old_port);
            tcp.set_checksum(check);
        }
        return;
    }
    let Ok(mut udp) = UdpPacket::new_checked(l4) else {
        return;
    };
    if udp.checksum() != 0 {
        let check = adjust(udp.checksum(), old_port);
        udp.set_checksum(if check == 0 { 0xffff } else { check });
    }
}

/// Sets `side`'s port of a TCP or UDP header (viewed as its first 8 bytes); returns the
/// old one.
#[inline]
fn set_port(udp: &mut UdpPacket<&mut [u8]>, side: Side, port: u16) -> u16 {
    match side {
        Side::Source => {
            let old = udp.src_port();
            udp.set_src_port(port);
            old
        }
        Side::Destination => {
            let old = udp.dst_port();
            udp.set_dst_port(port);
            old
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::checksum::{accumulate, checksum, finish, fold, pseudo_header_of};
    use crate::wire::{read_u16, write_u16};

    fn packet(proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        ipv4::emit_header(
            &mut p,
            [10, 244, 0, 5].into(),
            [192, 168, 2, 10].into(),
            proto,
            l4.len(),
            64,
        );
        p.extend_from_slice(l4);
        p
    }

    fn with_checksum(mut p: Vec<u8>, at: usize) -> Vec<u8> {
        let proto = p[9];
        let len = (p.len() - 20) as u32;
        let sum = finish(accumulate(pseudo_header_of(&p, proto, len), &p[20..]));
        write_u16(&mut p[20..], at, sum);
        p
    }

    fn l4_verifies(p: &[u8]) -> bool {
        let len = (p.len() - 20) as u32;
        finish(accumulate(pseudo_header_of(p, p[9], len), &p[20..])) == 0
    }

    fn tcp(flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&80u16.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t.extend_from_slice(b"hello world");
        t
    }

    #[test]
    fn tcp_source_and_back_keep_checksums_valid() {
        let p = with_checksum(packet(6, &tcp(0x02)), 16);
        let mut q = p.clone();
        assert!(translate(
            &mut q,
            Side::Source,
            [192, 168, 1, 10].into(),
            33000,
            false
        ));
        assert_eq!(checksum(&q[..20]), 0, "IP header checksum");
        assert!(l4_verifies(&q), "TCP checksum");
        assert_eq!(&q[12..16], &[192, 168, 1, 10]);
        assert_eq!(read_u16(&q[20..], 0), 33000);
        // The reply's destination back to the pod.
        let mut r = q.clone();
        r[12..16].copy_from_slice(&[192, 168, 2, 10]);
        r[16..20].copy_from_slice(&[192, 168, 1, 10]);
        write_u16(&mut r[20..], 0, 80);
        write_u16(&mut r[20..], 2, 33000);
        let mut r = with_checksum(
            {
                write_u16(&mut r, 10, 0);
                let c = checksum(&r[..20]);
                write_u16(&mut r, 10, c);
                write_u16(&mut r[20..], 16, 0);
                r
            },
            16,
        );
        assert!(translate(
            &mut r,
            Side::Destination,
            [10, 244, 0, 5].into(),
            40000,
            false
        ));
        assert_eq!(checksum(&r[..20]), 0);
        assert!(l4_verifies(&r));
        assert_eq!(read_u16(&r[20..], 2), 40000);
    }

    #[test]
    fn partial_checksums_get_only_the_address_change() {
        let mut p = packet(6, &tcp(0x10));
        let len = (p.len() - 20) as u32;
        let partial = fold(pseudo_header_of(&p, 6, len));
        write_u16(&mut p[20..], 16, partial);
        assert!(translate(
            &mut p,
            Side::Source,
            [192, 168, 1, 10].into(),
            33000,
            true
        ));
        assert_eq!(
            read_u16(&p[20..], 16),
            fold(pseudo_header_of(&p, 6, len)),
            "still the pseudo-header sum, of the new addresses"
        );
    }

    #[test]
    fn udp_without_checksum_and_icmp_echo() {
        let mut u = packet(17, &[0x9c, 0x40, 0, 53, 0, 10, 0, 0, 1, 2]);
        assert!(translate(
            &mut u,
            Side::Source,
            [192, 168, 1, 10].into(),
            40001,
            false
        ));
        assert_eq!(read_u16(&u[20..], 6), 0, "no checksum stays no checksum");
        let u = with_checksum(packet(17, &[0x9c, 0x40, 0, 53, 0, 10, 0, 0, 1, 2]), 6);
        let mut v = u.clone();
        assert!(translate(
            &mut v,
            Side::Source,
            [192, 168, 1, 10].into(),
            40001,
            false
        ));
        assert!(l4_verifies(&v));
        let mut echo = vec![8u8, 0, 0, 0, 0x12, 0x34, 0, 1, b'h', b'i'];
        let c = checksum(&echo);
        write_u16(&mut echo, 2, c);
        let mut e = packet(1, &echo);
        assert!(translate(
            &mut e,
            Side::Source,
            [192, 168, 1, 10].into(),
            0x4321,
            false
        ));
        assert_eq!(checksum(&e[20..]), 0, "ICMP checksum");
        assert_eq!(read_u16(&e[20..], 4), 0x4321);
        assert_eq!(checksum(&e[..20]), 0);
    }

    #[test]
    fn what_is_not_translatable_is_left_alone() {
        let mut frag = with_checksum(packet(6, &tcp(0x10)), 16);
        frag[7] = 1; // a later fragment
        let before = frag.clone();
        assert!(!translate(
            &mut frag,
            Side::Source,
            [1, 1, 1, 1].into(),
            1,
            false
        ));
        assert_eq!(frag, before);
        let mut unreachable = packet(1, &[3, 1, 0, 0, 0, 0, 0, 0]);
        assert!(l4_of(&unreachable).is_none());
        assert!(!translate(
            &mut unreachable,
            Side::Source,
            [1, 1, 1, 1].into(),
            1,
            false
        ));
        assert!(l4_of(&[0x45]).is_none());
        assert!(l4_of(&[]).is_none());
    }
}
