//! Address and port translation of IPv4 packets in place, for masquerade: the source
//! (outbound) or the destination (replies) address and the TCP/UDP port or ICMP echo
//! identifier, with checksums updated incrementally (RFC 1624).
//!
//! A packet whose L4 checksum is still partial (`F_NEEDS_CSUM`, as pods' kernels send them
//! over a TAP, GSO super-frames included) holds only the pseudo-header sum in its checksum
//! field, not complemented; the receiver's stack finishes it over the data. Then only the
//! address change is applied, the un-complemented way, and the port change not at all (the
//! port is data). A UDP checksum of zero means "none" and stays zero.

use crate::wire::checksum::update_word;
use crate::wire::{ipv4, read_u16, write_u16};
use std::net::Ipv4Addr;

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

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

/// The ports of a translatable IPv4 packet `l3` (plain header or with options; first
/// fragments only): TCP, UDP, or ICMP echo request/reply. `None` for anything else.
pub fn l4_of(l3: &[u8]) -> Option<L4> {
    let ihl = usize::from(*l3.first()? & 0x0f) * 4;
    if l3[0] >> 4 != 4 || ihl < 20 || l3.len() < ihl || read_u16(l3, 6) & 0x1fff != 0 {
        return None;
    }
    let l4 = l3.get(ihl..)?;
    match l3[9] {
        ipv4::PROTO_TCP | ipv4::PROTO_UDP if l4.len() >= 8 => Some(L4 {
            protocol: l3[9],
            src_port: read_u16(l4, 0),
            dst_port: read_u16(l4, 2),
        }),
        ipv4::PROTO_ICMP
            if l4.len() >= 8 && matches!(l4[0], ICMP_ECHO_REQUEST | ICMP_ECHO_REPLY) =>
        {
            let id = read_u16(l4, 4);
            Some(L4 {
                protocol: ipv4::PROTO_ICMP,
                src_port: id,
                dst_port: id,
            })
        }
        _ => None,
    }
}

/// Adjusts an L4 checksum field for a word that changed from `old` to `new`: the usual
/// way for a complete checksum, the un-complemented way for a partial one.
fn adjust(check: u16, old: u16, new: u16, partial: bool) -> u16 {
    if partial {
        !update_word(!check, old, new)
    } else {
        update_word(check, old, new)
    }
}

/// Rewrites `side`'s address in the IPv4 header `l3` to `addr`, with the header checksum;
/// returns the old and new address as 16-bit words (for the callers' L4 checksums).
pub fn translate_address(l3: &mut [u8], side: Side, addr: Ipv4Addr) -> ([u16; 2], [u16; 2]) {
    let at = match side {
        Side::Source => 12,
        Side::Destination => 16,
    };
    let old = [read_u16(l3, at), read_u16(l3, at + 2)];
    let octets = addr.octets();
    let new = [
        u16::from_be_bytes([octets[0], octets[1]]),
        u16::from_be_bytes([octets[2], octets[3]]),
    ];
    let mut check = read_u16(l3, 10);
    for (o, n) in old.iter().zip(new) {
        check = update_word(check, *o, n);
    }
    write_u16(l3, 10, check);
    l3[at..at + 4].copy_from_slice(&octets);
    (old, new)
}

/// Recomputes the checksum of the ICMP message `icmp` (no pseudo-header) in full.
pub fn refresh_icmp_checksum(icmp: &mut [u8]) {
    if icmp.len() < 4 {
        return;
    }
    write_u16(icmp, 2, 0);
    let sum = crate::wire::checksum::checksum(icmp);
    write_u16(icmp, 2, sum);
}

/// Rewrites `side`'s address to `addr` and its port (or the echo identifier) to `port` in
/// the IPv4 packet `l3`. `partial`: the L4 checksum is still partial (`F_NEEDS_CSUM`).
/// Returns false (and changes nothing) when the packet is not translatable.
pub fn translate(l3: &mut [u8], side: Side, addr: Ipv4Addr, port: u16, partial: bool) -> bool {
    let Some(ports) = l4_of(l3) else {
        return false;
    };
    let ihl = usize::from(l3[0] & 0x0f) * 4;
    let (old_addr, new_addr) = translate_address(l3, side, addr);
    let (l4_protocol, l4) = (ports.protocol, &mut l3[ihl..]);
    match l4_protocol {
        ipv4::PROTO_TCP | ipv4::PROTO_UDP => {
            let (port_at, check_at) = match (l4_protocol, side) {
                (ipv4::PROTO_TCP, Side::Source) => (0, 16),
                (ipv4::PROTO_TCP, Side::Destination) => (2, 16),
                (_, Side::Source) => (0, 6),
                (_, Side::Destination) => (2, 6),
            };
            let old_port = read_u16(l4, port_at);
            write_u16(l4, port_at, port);
            if l4.len() < check_at + 2 {
                return true; // a TCP header cut short: nothing more to fix
            }
            let mut check = read_u16(l4, check_at);
            if l4_protocol == ipv4::PROTO_UDP && check == 0 {
                return true;
            }
            for (o, n) in old_addr.iter().zip(new_addr) {
                check = adjust(check, *o, n, partial);
            }
            if !partial {
                check = update_word(check, old_port, port);
            }
            if l4_protocol == ipv4::PROTO_UDP && check == 0 {
                check = 0xffff;
            }
            write_u16(l4, check_at, check);
        }
        _ => {
            // ICMP echo: no pseudo-header; only the identifier is covered.
            let old_id = read_u16(l4, 4);
            write_u16(l4, 4, port);
            let check = update_word(read_u16(l4, 2), old_id, port);
            write_u16(l4, 2, check);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::checksum::{accumulate, checksum, finish, fold, pseudo_header_of};

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
