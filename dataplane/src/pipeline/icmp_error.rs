//! ICMP and ICMPv6 errors back to the sender (time exceeded, unreachable,
//! fragmentation-needed / packet-too-big), built in place over the offending packet, which
//! they quote. Rate-limited per worker with a token bucket.

use super::L3_OFFSET;
use crate::buffer::PacketBuf;
use crate::gateway::Gateway;
use crate::wire::checksum;
use crate::wire::icmp;
use crate::wire::ipv4::{self, Ipv4Packet};
use crate::wire::ipv6::{self, Ipv6Packet};
use std::net::IpAddr;

/// The errors the pipeline sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpError {
    /// No route / unreachable route.
    Unreachable,
    /// TTL or hop limit ran out.
    TimeExceeded,
    /// Larger than the next hop's MTU (the value carried).
    TooBig(u32),
    /// Nothing listens behind the destination port (a Service without endpoints): the
    /// client's connect fails at once with "connection refused".
    PortUnreachable,
}

/// Largest IPv4 ICMP error (RFC 1812 4.3.2.3: quote as much as fits in 576 bytes).
const V4_MAX_ERROR: usize = 576;

/// True when an error may be sent about this IPv4 packet: not about an ICMP error, not
/// about a non-first fragment, not to an unspecified or group source.
pub fn may_answer_v4<T: AsRef<[u8]>>(ip: &Ipv4Packet<T>) -> bool {
    let src = ip.src();
    if ip.is_later_fragment() || src.is_unspecified() || src.is_multicast() || src.is_broadcast() {
        return false;
    }
    ip.protocol() != ipv4::PROTO_ICMP
        || ip.payload().first().is_some_and(|&t| !icmp::is_v4_error(t))
}

/// True when an error may be sent about this IPv6 packet (not about an ICMPv6 error, not
/// to an unspecified or multicast source).
pub fn may_answer_v6<T: AsRef<[u8]>>(ip: &Ipv6Packet<T>) -> bool {
    let src = ip.src();
    if src.is_unspecified() || src.is_multicast() {
        return false;
    }
    ip.next_header() != ipv6::NEXT_ICMPV6
        || ip.payload().first().is_some_and(|&t| !icmp::is_v6_error(t))
}

/// Rewrites `pkt` (an IPv4 or IPv6 packet that cannot be forwarded) into the ICMP error
/// about it, addressed back to its sender from the gateway. False when the packet is not
/// IP or the buffer is too small. The caller addresses the Ethernet header.
pub fn build(pkt: &mut PacketBuf, gateway: &Gateway, error: IcmpError) -> bool {
    let frame = pkt.frame();
    let Some(l3) = frame.get(L3_OFFSET..) else {
        return false;
    };
    let (src, l3_len, header_len, max_error): (IpAddr, usize, usize, usize) =
        match l3.first().map(|b| b >> 4) {
            Some(4) => match Ipv4Packet::new_checked(l3) {
                Ok(ip) => (
                    ip.src().into(),
                    ip.total_len(),
                    ipv4::MIN_HEADER_LEN,
                    V4_MAX_ERROR,
                ),
                Err(_) => return false,
            },
            Some(6) => match Ipv6Packet::new_checked(l3) {
                Ok(ip) => (
                    ip.src().into(),
                    ip.total_len(),
                    ipv6::HEADER_LEN,
                    ipv6::MIN_MTU,
                ),
                Err(_) => return false,
            },
            _ => return false,
        };
    let quote = l3_len.min(max_error - header_len - icmp::HEADER_LEN);
    let icmp_len = icmp::HEADER_LEN + quote;
    let needed = L3_OFFSET + header_len + icmp_len;
    if pkt.capacity() < needed {
        return false;
    }
    pkt.set_len(needed);
    let l3 = &mut pkt.frame_mut()[L3_OFFSET..];
    l3.copy_within(0..quote, header_len + icmp::HEADER_LEN);
    let (kind, code, rest) = match (src, error) {
        (IpAddr::V4(_), IcmpError::Unreachable) => {
            (icmp::V4_DEST_UNREACHABLE, icmp::V4_CODE_HOST_UNREACHABLE, 0)
        }
        (IpAddr::V4(_), IcmpError::TimeExceeded) => (icmp::V4_TIME_EXCEEDED, 0, 0),
        (IpAddr::V4(_), IcmpError::TooBig(mtu)) => (
            icmp::V4_DEST_UNREACHABLE,
            icmp::V4_CODE_FRAG_NEEDED,
            mtu.min(0xffff),
        ),
        (IpAddr::V6(_), IcmpError::Unreachable) => {
            (icmp::V6_DEST_UNREACHABLE, icmp::V6_CODE_ADDR_UNREACHABLE, 0)
        }
        (IpAddr::V6(_), IcmpError::TimeExceeded) => (icmp::V6_TIME_EXCEEDED, 0, 0),
        (IpAddr::V6(_), IcmpError::TooBig(mtu)) => (icmp::V6_PACKET_TOO_BIG, 0, mtu),
        (IpAddr::V4(_), IcmpError::PortUnreachable) => {
            (icmp::V4_DEST_UNREACHABLE, icmp::V4_CODE_PORT_UNREACHABLE, 0)
        }
        (IpAddr::V6(_), IcmpError::PortUnreachable) => {
            (icmp::V6_DEST_UNREACHABLE, icmp::V6_CODE_PORT_UNREACHABLE, 0)
        }
    };
    let (header, body) = l3.split_at_mut(header_len);
    let body = &mut body[..icmp_len];
    body[0] = kind;
    body[1] = code;
    body[2..4].fill(0);
    body[4..8].copy_from_slice(&rest.to_be_bytes());
    let sum = match src {
        IpAddr::V4(dst) => {
            ipv4::emit_header(header, gateway.ipv4, dst, ipv4::PROTO_ICMP, icmp_len, 64);
            checksum::accumulate(0, body)
        }
        IpAddr::V6(dst) => {
            ipv6::emit_header(header, gateway.ipv6, dst, ipv6::NEXT_ICMPV6, icmp_len, 64);
            checksum::accumulate(
                checksum::pseudo_header_v6(gateway.ipv6, dst, ipv6::NEXT_ICMPV6, icmp_len as u32),
                body,
            )
        }
    };
    body[2..4].copy_from_slice(&checksum::finish(sum).to_be_bytes());
    true
}

/// A token bucket: `rate` errors per second, bursts of up to `burst`.
pub struct RateLimiter {
    tokens: u32,
    burst: u32,
    rate: u32,
    last_ns: u64,
}

impl Default for RateLimiter {
    /// 1,000 errors per second with bursts of 100 per worker, in line with Linux's
    /// `icmp_msgs_per_sec` / `icmp_msgs_burst`.
    fn default() -> Self {
        Self::new(1000, 100)
    }
}

impl RateLimiter {
    /// A full bucket.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            tokens: burst,
            burst,
            rate,
            last_ns: 0,
        }
    }

    /// Adds the tokens earned since the last refill.
    pub fn refill(&mut self, now_ns: u64) {
        let elapsed = now_ns.saturating_sub(self.last_ns);
        let earned = elapsed.saturating_mul(u64::from(self.rate)) / 1_000_000_000;
        if earned > 0 {
            self.tokens = (u64::from(self.tokens) + earned).min(u64::from(self.burst)) as u32;
            self.last_ns = now_ns;
        }
    }

    /// Takes a token if there is one.
    pub fn take(&mut self) -> bool {
        if self.tokens == 0 {
            return false;
        }
        self.tokens -= 1;
        true
    }
}
