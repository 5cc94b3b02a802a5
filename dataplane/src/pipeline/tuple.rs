//! A packet's flow tuple read as raw words, without parsing it into a flow key: what the
//! pipeline's memos of a flow's last decision (the batch's last route, the policy
//! stage's verdicts) compare.

use crate::wire::{icmp, ipv4, ipv6, tcp};
use std::net::IpAddr;

/// A packet's TCP, UDP, SCTP or ICMP echo tuple as three words read straight from its
/// bytes, as the memos of a flow's last decision compare it: IPv4, both addresses in the
/// first word; IPv6, one address per word; ports (an echo's type and identifier),
/// protocol and family in the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct RawTuple {
    first: u128,
    second: u128,
    rest: u64,
}

impl RawTuple {
    /// The tuple's words folded into one, for hashing.
    #[inline]
    pub(super) fn folded(&self) -> u64 {
        (self.first ^ (self.first >> 64) ^ self.second ^ (self.second >> 64)) as u64
            ^ self.rest.rotate_left(29)
    }

    /// The source address and port (IPv6 when `v6`).
    pub(super) fn source(&self, v6: bool) -> (IpAddr, u16) {
        let port = (self.rest >> 32) as u16;
        let addr = if v6 {
            IpAddr::from(self.first.to_be_bytes())
        } else {
            IpAddr::from(((self.first >> 32) as u32).to_be_bytes())
        };
        (addr, port)
    }
}

/// The raw tuple of `l3` (IPv6 when `v6`), if it is a TCP segment without SYN, FIN or RST,
/// a UDP or SCTP packet or an ICMP echo request or reply, whole (not a fragment, no IPv6
/// extension header): a packet a memo of its flow's last decision may decide.
#[inline(always)]
pub(super) fn raw_tuple(l3: &[u8], v6: bool) -> Option<RawTuple> {
    // Fixed-size views: one length check per header, none per field.
    let word = |bytes: &[u8; 16]| u128::from_be_bytes(*bytes);
    let (protocol, first, second, l4) = if v6 {
        let h = l3.first_chunk::<{ ipv6::HEADER_LEN }>()?;
        let (src, dst) = (h[8..24].try_into().ok()?, h[24..40].try_into().ok()?);
        (h[6], word(src), word(dst), &l3[ipv6::HEADER_LEN..])
    } else {
        let h = l3.first_chunk::<20>()?;
        if u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
            return None;
        }
        let addrs = u64::from_be_bytes(h[12..20].try_into().ok()?);
        let l4 = l3.get(usize::from(h[0] & 0x0f) * 4..)?;
        (h[9], u128::from(addrs), 0, l4)
    };
    let ports = match protocol {
        ipv4::PROTO_TCP => {
            let h = l4.first_chunk::<14>()?;
            if h[13] & (tcp::FLAG_SYN | tcp::FLAG_FIN | tcp::FLAG_RST) != 0 {
                return None;
            }
            u32::from_be_bytes([h[0], h[1], h[2], h[3]])
        }
        ipv4::PROTO_UDP | ipv4::PROTO_SCTP => {
            let h = l4.first_chunk::<8>()?;
            u32::from_be_bytes([h[0], h[1], h[2], h[3]])
        }
        ipv4::PROTO_ICMP | ipv6::NEXT_ICMPV6 if (protocol == ipv6::NEXT_ICMPV6) == v6 => {
            // Echo requests and replies only (their identifier in place of ports).
            let h = l4.first_chunk::<6>()?;
            let kind = h[0];
            let echo = if v6 {
                kind == icmp::V6_ECHO_REQUEST || kind == icmp::V6_ECHO_REPLY
            } else {
                kind == icmp::V4_ECHO_REQUEST || kind == icmp::V4_ECHO_REPLY
            };
            if !echo {
                return None;
            }
            let ident = u32::from(u16::from_be_bytes([h[4], h[5]]));
            return Some(RawTuple {
                first,
                second,
                rest: (u64::from(kind) << 48)
                    | (u64::from(ident) << 32)
                    | (u64::from(protocol) << 8)
                    | u64::from(v6),
            });
        }
        _ => return None,
    };
    Some(RawTuple {
        first,
        second,
        rest: (u64::from(ports) << 16) | (u64::from(protocol) << 8) | u64::from(v6),
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::wire::ipv4::emit_header;

    /// An IPv4 packet 10.244.0.5:40000 -> 10.244.0.6:80 of `protocol` with TCP `flags`
    /// and the fragment field `fragment`.
    pub(in crate::pipeline) fn v4(protocol: u8, flags: u8, fragment: u16) -> Vec<u8> {
        let mut p = vec![0u8; 20 + 20];
        emit_header(
            &mut p,
            "10.244.0.5".parse().unwrap(),
            "10.244.0.6".parse().unwrap(),
            protocol,
            20,
            64,
        );
        p[6..8].copy_from_slice(&fragment.to_be_bytes());
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&80u16.to_be_bytes());
        p[33] = flags;
        p
    }

    #[test]
    fn only_whole_tcp_segments_without_syn_fin_rst_udp_datagrams_and_echoes_have_a_raw_tuple() {
        let ack = raw_tuple(&v4(6, tcp::FLAG_ACK, 0), false).unwrap();
        assert_eq!(ack.source(false), ("10.244.0.5".parse().unwrap(), 40000));
        assert!(raw_tuple(&v4(17, 0, 0), false).is_some());
        for flags in [tcp::FLAG_SYN, tcp::FLAG_FIN | tcp::FLAG_ACK, tcp::FLAG_RST] {
            assert!(raw_tuple(&v4(6, flags, 0), false).is_none(), "{flags:#x}");
        }
        assert!(
            raw_tuple(&v4(17, 0, 0x2000), false).is_none(),
            "a first fragment"
        );
        assert!(
            raw_tuple(&v4(17, 0, 0x0010), false).is_none(),
            "a later fragment"
        );
        assert!(raw_tuple(&v4(1, 0, 0), false).is_none(), "ICMP");
        assert!(
            raw_tuple(&v4(6, tcp::FLAG_ACK, 0)[..30], false).is_none(),
            "cut short"
        );
        let mut v6 = vec![0u8; 40 + 8];
        crate::wire::ipv6::emit_header(
            &mut v6,
            "fd00::5".parse().unwrap(),
            "fd00::6".parse().unwrap(),
            17,
            8,
            64,
        );
        v6[40..42].copy_from_slice(&5353u16.to_be_bytes());
        let raw = raw_tuple(&v6, true).unwrap();
        assert_eq!(raw.source(true), ("fd00::5".parse().unwrap(), 5353));
    }
}
