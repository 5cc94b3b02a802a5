//! Merging packets of one flow into one GSO super-frame (GRO), in place, as pure functions
//! over frames (virtio-net header, Ethernet, IP): the pieces the pipeline's coalescing stage
//! and the uplink's receive path both use.
//!
//! * **UDP**: datagrams whose checksum is still partial (`NEEDS_CSUM`) become a `UDP_L4`
//!   super-frame.
//! * **TCP**: segments in sequence with identical headers (flags ACK/PSH only, same
//!   options) become a `TCPV4`/`TCPV6` super-frame, as the kernel's GRO does. A segment's
//!   checksum is verified before it is merged unless the caller vouches for it.
//!
//! Merged packets must have a plain header (IPv4 without options or fragments, IPv6
//! without extension headers) and the same payload size (the last may be shorter).

use crate::wire::{checksum, ipv4, ipv6, tcp, udp, vnet, write_u16, Ipv4Packet, Ipv6Packet};
use crate::wire::{TcpPacket, UdpPacket, VnetHeader, L3_OFFSET};

/// The largest frame a super-frame may become: virtio-net and Ethernet headers plus the
/// largest IP packet.
pub const MAX_SUPER: usize = L3_OFFSET + 65_535;

/// A UDP datagram that can start or continue a run: where its payload is.
#[derive(Clone, Copy, Debug)]
pub struct Datagram {
    /// IP header length (20 or 40).
    l3_header: usize,
    /// UDP payload length.
    payload: usize,
}

impl Datagram {
    /// Where the payload starts in the frame, and its length.
    pub fn payload(&self) -> (usize, usize) {
        (L3_OFFSET + self.l3_header + udp::HEADER_LEN, self.payload)
    }

    /// True when the datagram in frame `b` continues the run that this one (in frame
    /// `a`) started: same IP header but for lengths, identification and checksum; same
    /// ports.
    pub fn continued_by(&self, a: &[u8], b: &[u8], next: &Datagram) -> bool {
        next.l3_header == self.l3_header && same_flow(a, b, self.l3_header)
    }
}

/// Parses `frame` (virtio-net header + Ethernet) as a coalescable UDP datagram: a partial
/// checksum, no GSO, a plain IP header whose length covers the frame, some payload.
pub fn udp_datagram(frame: &[u8]) -> Option<Datagram> {
    let vh = VnetHeader::new_checked(frame).ok()?;
    let l3 = frame.get(L3_OFFSET..)?;
    if vh.flags() & vnet::F_NEEDS_CSUM == 0 || vh.is_gso() {
        return None;
    }
    let l3_header = plain_l3(l3, ipv4::PROTO_UDP)?;
    if usize::from(vh.csum_start()) != L3_OFFSET - vnet::HEADER_LEN + l3_header
        || usize::from(vh.csum_offset()) != udp::CHECKSUM_OFFSET
    {
        return None;
    }
    let udp = UdpPacket::new_checked(&l3[l3_header..]).ok()?;
    let payload = udp.len().checked_sub(udp::HEADER_LEN)?;
    (l3_header + udp.len() == l3.len() && payload > 0).then_some(Datagram { l3_header, payload })
}

/// The header length of `l3` when it is a plain IPv4 (no options, not a fragment) or IPv6
/// (no extension header) packet carrying `protocol` whose declared length is exactly
/// `l3`'s.
fn plain_l3(l3: &[u8], protocol: u8) -> Option<usize> {
    match l3.first()? >> 4 {
        4 => {
            let ip = Ipv4Packet::new_checked(l3).ok()?;
            (ip.header_len() == ipv4::MIN_HEADER_LEN
                && ip.protocol() == protocol
                && !ip.is_fragment()
                && ip.total_len() == l3.len())
            .then_some(ipv4::MIN_HEADER_LEN)
        }
        6 => {
            let ip = Ipv6Packet::new_checked(l3).ok()?;
            (ip.next_header() == protocol && ip.total_len() == l3.len()).then_some(ipv6::HEADER_LEN)
        }
        _ => None,
    }
}

/// True when frames `a` and `b` carry the same flow: equal IP header except lengths,
/// identification and checksum; equal ports.
fn same_flow(a: &[u8], b: &[u8], l3_header: usize) -> bool {
    let (a, b) = (&a[L3_OFFSET..], &b[L3_OFFSET..]);
    if l3_header == ipv4::MIN_HEADER_LEN {
        // version/IHL/TOS, flags+offset, TTL/protocol, addresses, ports
        a[0..2] == b[0..2] && a[6..10] == b[6..10] && a[12..24] == b[12..24]
    } else {
        // version/class/flow label, next header/hop limit, addresses, ports
        a[0..4] == b[0..4] && a[6..44] == b[6..44]
    }
}

/// Rewrites a grown first datagram's lengths, checksums and virtio-net header for
/// `total` payload bytes: a `UDP_L4` super-frame with the first datagram's size.
pub fn udp_finish(frame: &mut [u8], first: &Datagram, total: usize) {
    let udp_len = udp::HEADER_LEN + total;
    let (vh, l3) = frame.split_at_mut(L3_OFFSET);
    set_l3_len(l3, first.l3_header, udp_len);
    let pseudo = checksum::pseudo_header_of(l3, ipv4::PROTO_UDP, udp_len as u32);
    if let Ok(mut udp) = UdpPacket::new_checked(&mut l3[first.l3_header..]) {
        udp.set_len(udp_len as u16);
        // A partial checksum holds the folded pseudo-header sum, not complemented.
        udp.set_checksum(checksum::fold(pseudo));
    }
    let hdr_len = L3_OFFSET - vnet::HEADER_LEN + first.l3_header + udp::HEADER_LEN;
    if let Ok(mut vh) = VnetHeader::new_checked(vh) {
        vh.set_gso(vnet::GSO_UDP_L4, hdr_len, first.payload, None);
    }
}

/// Sets the IP packet's length for `l4_len` bytes after its header (and, for IPv4, the
/// header checksum).
fn set_l3_len(l3: &mut [u8], l3_header: usize, l4_len: usize) {
    if l3_header == ipv4::MIN_HEADER_LEN {
        write_u16(l3, 2, (l3_header + l4_len) as u16);
        if let Ok(mut ip) = crate::wire::Ipv4Header::new_checked(l3) {
            ip.fill_checksum();
        }
    } else {
        write_u16(l3, 4, l4_len as u16);
    }
}

/// A TCP segment that can start or continue a run.
#[derive(Clone, Copy, Debug)]
pub struct Segment {
    l3_header: usize,
    tcp_header: usize,
    payload: usize,
    seq: u32,
}

impl Segment {
    /// Where the payload starts, from the start of the IP header.
    pub fn payload_offset(&self) -> usize {
        self.l3_header + self.tcp_header
    }

    /// Payload bytes.
    pub fn payload_len(&self) -> usize {
        self.payload
    }
}

/// Parses an IP packet `l3` as a mergeable TCP segment: plain IP header, flags ACK (and
/// PSH) only, some payload, and a checksum that verifies unless `checksum_valid`.
pub fn tcp_segment(l3: &[u8], checksum_valid: bool) -> Option<Segment> {
    let l3_header = plain_l3(l3, ipv4::PROTO_TCP)?;
    let tcp = TcpPacket::new_checked(&l3[l3_header..]).ok()?;
    let flags = tcp.flags();
    if tcp.payload().is_empty() || flags & !tcp::FLAG_PSH != tcp::FLAG_ACK {
        return None;
    }
    if !checksum_valid {
        let segment = tcp.as_bytes();
        let pseudo = checksum::pseudo_header_of(l3, ipv4::PROTO_TCP, segment.len() as u32);
        if checksum::finish(checksum::accumulate(pseudo, segment)) != 0 {
            return None;
        }
    }
    Some(Segment {
        l3_header,
        tcp_header: tcp.header_len(),
        payload: tcp.payload().len(),
        seq: tcp.seq(),
    })
}

/// True when segment `b` (IP packet) continues the run that `a` started, `merged` payload
/// bytes in: next in sequence, no PSH before it, same addresses, ports, acknowledgement,
/// window, options and flags (but PSH), and no larger than the first.
pub fn tcp_follows(a: &[u8], first: &Segment, merged: usize, b: &[u8], next: &Segment) -> bool {
    if next.l3_header != first.l3_header
        || next.tcp_header != first.tcp_header
        || next.payload > first.payload
        || next.seq != first.seq.wrapping_add(merged as u32)
    {
        return false;
    }
    let (Ok(ta), Ok(tb)) = (
        TcpPacket::new_checked(&a[first.l3_header..]),
        TcpPacket::new_checked(&b[first.l3_header..]),
    ) else {
        return false;
    };
    let same_ip = if first.l3_header == ipv4::MIN_HEADER_LEN {
        a[0..2] == b[0..2] && a[6..10] == b[6..10] && a[12..20] == b[12..20]
    } else {
        a[0..4] == b[0..4] && a[6..40] == b[6..40]
    };
    ta.flags() & tcp::FLAG_PSH == 0
        && same_ip
        && ta.src_port() == tb.src_port()
        && ta.dst_port() == tb.dst_port()
        && ta.ack() == tb.ack()
        && ta.reserved_bits() == tb.reserved_bits()
        && ta.flags() == tb.flags() & !tcp::FLAG_PSH
        && ta.window() == tb.window()
        && ta.urgent_and_options() == tb.urgent_and_options()
}

/// Takes segment `b`'s PSH into the run's first header `a` (IP packets).
pub fn tcp_absorb(a: &mut [u8], first: &Segment, b: &[u8]) {
    let push =
        TcpPacket::new_checked(&b[first.l3_header..]).map_or(0, |t| t.flags() & tcp::FLAG_PSH);
    if let Ok(mut ta) = TcpPacket::new_checked(&mut a[first.l3_header..]) {
        let flags = ta.flags();
        ta.set_flags(flags | push);
    }
}

/// Rewrites a grown first segment's headers in `frame` (virtio-net header + Ethernet) for
/// `total` payload bytes: lengths, IPv4 header checksum, partial TCP checksum, and a
/// `TCPV4`/`TCPV6` GSO virtio-net header with the first segment's size.
pub fn tcp_finish(frame: &mut [u8], first: &Segment, total: usize) {
    let (l3h, tcph) = (first.l3_header, first.tcp_header);
    let tcp_len = tcph + total;
    let (vh, l3) = frame.split_at_mut(L3_OFFSET);
    set_l3_len(l3, l3h, tcp_len);
    let pseudo = checksum::pseudo_header_of(l3, ipv4::PROTO_TCP, tcp_len as u32);
    if let Ok(mut tcp) = TcpPacket::new_checked(&mut l3[l3h..]) {
        tcp.set_checksum(checksum::fold(pseudo));
    }
    let eth_l3 = L3_OFFSET - vnet::HEADER_LEN + l3h;
    let gso = if l3h == ipv4::MIN_HEADER_LEN {
        vnet::GSO_TCPV4
    } else {
        vnet::GSO_TCPV6
    };
    if let Ok(mut vh) = VnetHeader::new_checked(vh) {
        let csum = (eth_l3, tcp::CHECKSUM_OFFSET);
        vh.set_gso(gso, eth_l3 + tcph, first.payload, Some(csum));
    }
}
