//! The outer headers of VXLAN datagrams that travel as whole frames, as an AF_XDP uplink
//! sends and receives them (the socket uplink leaves these headers to the kernel): Ethernet,
//! IPv4 without options, UDP; and the Ethernet header alone around a packet routed
//! directly. Pure functions over buffers; [`super::tunnel`] makes and takes the VXLAN
//! datagrams inside.

use crate::wire::{checksum, ethernet, ipv4, tcp, udp, Ipv4Header, TcpPacket};
use std::net::Ipv4Addr;
use std::ops::Range;
use switchyard_api::MacAddr;

/// Ethernet, IPv4 and UDP headers before a VXLAN datagram.
pub const OUTER_LEN: usize = ethernet::HEADER_LEN + ipv4::MIN_HEADER_LEN + udp::HEADER_LEN;

/// The addresses of one VXLAN frame this node sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OuterAddrs {
    /// The uplink device's MAC.
    pub src_mac: MacAddr,
    /// The next hop's MAC (the peer's, or its gateway's).
    pub dst_mac: MacAddr,
    /// This node's underlay address.
    pub src: Ipv4Addr,
    /// The peer node's.
    pub dst: Ipv4Addr,
    /// UDP source port (from the inner flow's hash).
    pub src_port: u16,
    /// UDP destination port (the VXLAN port).
    pub dst_port: u16,
}

/// The outer headers for the datagram made of `parts` (the VXLAN header, then the inner
/// frame; every part but the last of even length): IPv4 with DF set, TTL 64 and its header
/// checksum; UDP with its checksum over the datagram (a receiver may then trust the inner
/// packet, as a kernel-sent datagram's receiver does).
pub fn headers(addrs: &OuterAddrs, parts: &[&[u8]]) -> [u8; OUTER_LEN] {
    let payload: usize = parts.iter().map(|p| p.len()).sum();
    let udp_len = udp::HEADER_LEN + payload;
    let mut out = [0u8; OUTER_LEN];
    out[..ethernet::HEADER_LEN].copy_from_slice(&ethernet_v4(addrs.dst_mac, addrs.src_mac));
    let (ip, l4) = out[ethernet::HEADER_LEN..].split_at_mut(ipv4::MIN_HEADER_LEN);
    ipv4::emit_header(ip, addrs.src, addrs.dst, ipv4::PROTO_UDP, udp_len, 64);
    // Don't fragment: the sender sized the inner frames to the path (the flags word
    // changes from 0, the header checksum with it).
    ip[6] = 0x40;
    let check = checksum::update_word(u16::from_be_bytes([ip[10], ip[11]]), 0, 0x4000);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    l4[0..2].copy_from_slice(&addrs.src_port.to_be_bytes());
    l4[2..4].copy_from_slice(&addrs.dst_port.to_be_bytes());
    l4[4..6].copy_from_slice(&(udp_len as u16).to_be_bytes());
    let mut sum = checksum::pseudo_header_v4(addrs.src, addrs.dst, ipv4::PROTO_UDP, udp_len as u32);
    sum = checksum::accumulate(sum, l4);
    for part in parts {
        sum = checksum::accumulate(sum, part);
    }
    // A computed zero goes out as all ones (zero means "no checksum").
    let check = match checksum::finish(sum) {
        0 => 0xffff,
        c => c,
    };
    l4[6..8].copy_from_slice(&check.to_be_bytes());
    out
}

/// The Ethernet header of an IPv4 frame from `src` to `dst`.
pub fn ethernet_v4(dst: MacAddr, src: MacAddr) -> [u8; ethernet::HEADER_LEN] {
    let mut out = [0u8; ethernet::HEADER_LEN];
    out[0..6].copy_from_slice(&dst.0);
    out[6..12].copy_from_slice(&src.0);
    out[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    out
}

/// Where the IPv4 packet of the received Ethernet frame `frame` lies (direct routing: no
/// encapsulation), without the padding of a short frame; `None` when it is not an IPv4
/// packet whose header checksum and lengths hold.
pub fn routed_packet(frame: &[u8]) -> Option<Range<usize>> {
    let l3 = ipv4_of(frame)?;
    let ip = Ipv4Header::new_checked(l3).ok()?;
    let total = ip.total_len();
    (ip.verify_checksum() && total <= l3.len() && total >= ip.header_len())
        .then_some(ethernet::HEADER_LEN..ethernet::HEADER_LEN + total)
}

/// What follows the Ethernet header of `frame`, if the frame carries IPv4 (untagged).
fn ipv4_of(frame: &[u8]) -> Option<&[u8]> {
    if frame.get(12..14)? != [0x08, 0x00] {
        return None;
    }
    frame.get(ethernet::HEADER_LEN..)
}

/// The destination address of the received Ethernet frame `frame`, if it carries IPv4.
pub fn routed_to(frame: &[u8]) -> Option<Ipv4Addr> {
    let dst: [u8; 4] = ipv4_of(frame)?.get(16..20)?.try_into().ok()?;
    Some(Ipv4Addr::from(dst))
}

/// The source address of the received Ethernet frame `frame` when it opens a TCP
/// connection: an IPv4 packet, not a later fragment, carrying a SYN without ACK.
pub fn connection_opened_by(frame: &[u8]) -> Option<Ipv4Addr> {
    let ip = Ipv4Header::new_checked(ipv4_of(frame)?).ok()?;
    if ip.protocol() != ipv4::PROTO_TCP || ip.is_later_fragment() {
        return None;
    }
    let flags = TcpPacket::new_checked(ip.rest()).ok()?.flags();
    (flags & (tcp::FLAG_SYN | tcp::FLAG_ACK) == tcp::FLAG_SYN).then(|| ip.src())
}

/// A VXLAN datagram found in a received frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    /// The sender's address.
    pub src: Ipv4Addr,
    /// Where the UDP payload (the VXLAN header, then the inner frame) lies in the frame.
    pub payload: Range<usize>,
    /// Whether a UDP checksum covered the payload (and held); without one, nothing vouches
    /// for the inner packet.
    pub checksummed: bool,
}

/// Why a received frame carries no VXLAN datagram for this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotVxlan {
    /// Not IPv4 UDP to this address and port (the device's program let it through anyway).
    NotOurs,
    /// Cut short, inconsistent lengths, a fragment, or a checksum that does not hold.
    Malformed,
}

/// The VXLAN datagram to `local`:`port` in the Ethernet frame `frame`.
pub fn datagram(frame: &[u8], local: Ipv4Addr, port: u16) -> Result<Datagram, NotVxlan> {
    let eth = frame
        .get(..ethernet::HEADER_LEN)
        .ok_or(NotVxlan::Malformed)?;
    if eth[12..14] != [0x08, 0x00] {
        return Err(NotVxlan::NotOurs);
    }
    let l3 = &frame[ethernet::HEADER_LEN..];
    let ip = Ipv4Header::new_checked(l3).map_err(|_| NotVxlan::Malformed)?;
    if ip.protocol() != ipv4::PROTO_UDP || ip.dst() != local {
        return Err(NotVxlan::NotOurs);
    }
    let (header, total) = (ip.header_len(), ip.total_len());
    if ip.is_fragment() || !ip.verify_checksum() || total > l3.len() || total < header + 8 {
        return Err(NotVxlan::Malformed);
    }
    let l4 = &l3[header..total];
    if u16::from_be_bytes([l4[2], l4[3]]) != port {
        return Err(NotVxlan::NotOurs);
    }
    let udp_len = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
    if udp_len < udp::HEADER_LEN || udp_len > l4.len() {
        return Err(NotVxlan::Malformed);
    }
    let l4 = &l4[..udp_len];
    let field = u16::from_be_bytes([l4[6], l4[7]]);
    let mut checksummed = field != 0;
    if checksummed {
        let sum = checksum::pseudo_header_v4(ip.src(), local, ipv4::PROTO_UDP, udp_len as u32);
        // A partial checksum (the pseudo-header's sum, which a sender behind a virtual link
        // leaves for a device to finish) vouches for nothing, as no checksum: the inner
        // packet's own is checked, and the datagram is not summed in vain. Any other value
        // must be the whole datagram's checksum.
        if field == checksum::fold(sum) {
            checksummed = false;
        } else if checksum::fold(checksum::accumulate(sum, l4)) != 0xffff {
            return Err(NotVxlan::Malformed);
        }
    }
    let start = ethernet::HEADER_LEN + header + udp::HEADER_LEN;
    Ok(Datagram {
        src: ip.src(),
        payload: start..start + udp_len - udp::HEADER_LEN,
        checksummed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs() -> OuterAddrs {
        OuterAddrs {
            src_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            dst_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            src: Ipv4Addr::new(192, 168, 77, 1),
            dst: Ipv4Addr::new(192, 168, 77, 2),
            src_port: 50_000,
            dst_port: 4789,
        }
    }

    /// A VXLAN header and a small inner frame, odd in length.
    fn datagram_parts() -> (Vec<u8>, Vec<u8>) {
        let vxlan = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
        let inner: Vec<u8> = (0..61u8).collect();
        (vxlan, inner)
    }

    #[test]
    fn a_routed_packet_is_found_without_its_padding_and_checked() {
        let mut ip = [0u8; 28];
        ipv4::emit_header(
            &mut ip,
            Ipv4Addr::new(10, 244, 1, 5),
            Ipv4Addr::new(10, 244, 0, 5),
            ipv4::PROTO_UDP,
            8,
            64,
        );
        let head = ethernet_v4(MacAddr([2, 0, 0, 0, 0, 2]), MacAddr([2, 0, 0, 0, 0, 1]));
        assert_eq!(head[..6], [2, 0, 0, 0, 0, 2]);
        assert_eq!(head[6..12], [2, 0, 0, 0, 0, 1]);
        // Padded to Ethernet's 60-byte minimum.
        let mut frame = [&head[..], &ip, &[0u8; 18]].concat();
        assert_eq!(routed_packet(&frame), Some(14..42));
        frame[14 + 8] = 1; // TTL changed, checksum not
        assert_eq!(routed_packet(&frame), None, "header checksum");
        assert_eq!(routed_packet(&frame[..30]), None, "cut short");
        let mut arp = [&head[..], &ip].concat();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(routed_packet(&arp), None, "not IPv4");
    }

    #[test]
    fn a_syn_without_ack_opens_a_connection_and_names_its_client() {
        let client = Ipv4Addr::new(192, 168, 77, 9);
        let frame = |protocol: u8, flags: u8| {
            let mut ip = [0u8; 40];
            ipv4::emit_header(
                &mut ip,
                client,
                Ipv4Addr::new(192, 168, 77, 1),
                protocol,
                20,
                64,
            );
            ip[20 + 12] = 0x50; // data offset: 5 words
            ip[20 + 13] = flags;
            let head = ethernet_v4(MacAddr([2, 0, 0, 0, 0, 1]), MacAddr([2, 0, 0, 0, 0, 9]));
            [&head[..], &ip].concat()
        };
        let syn = frame(ipv4::PROTO_TCP, tcp::FLAG_SYN);
        assert_eq!(connection_opened_by(&syn), Some(client));
        let syn_ack = frame(ipv4::PROTO_TCP, tcp::FLAG_SYN | tcp::FLAG_ACK);
        assert_eq!(connection_opened_by(&syn_ack), None, "an answer");
        assert_eq!(
            connection_opened_by(&frame(ipv4::PROTO_TCP, tcp::FLAG_ACK)),
            None
        );
        assert_eq!(
            connection_opened_by(&frame(ipv4::PROTO_UDP, tcp::FLAG_SYN)),
            None
        );
        assert_eq!(connection_opened_by(&syn[..40]), None, "cut short");
        let mut later = syn.clone();
        later[14 + 7] = 1; // fragment offset 8
        assert_eq!(connection_opened_by(&later), None, "a later fragment");
    }

    #[test]
    fn headers_then_datagram_read_back_as_the_same_datagram() {
        let (vxlan, inner) = datagram_parts();
        let head = headers(&addrs(), &[&vxlan, &inner]);
        let frame = [&head[..], &vxlan, &inner].concat();
        // What a packet capture would check: IPv4 header checksum, DF, lengths.
        assert_eq!(&frame[12..14], &[0x08, 0x00]);
        assert_eq!(frame[14], 0x45);
        assert_eq!(frame[20], 0x40, "DF");
        assert_eq!(
            u16::from_be_bytes([frame[16], frame[17]]) as usize,
            frame.len() - 14
        );
        let got = datagram(&frame, addrs().dst, 4789).unwrap();
        assert_eq!(got.src, addrs().src);
        assert!(got.checksummed);
        assert_eq!(
            &frame[got.payload.clone()],
            &[&vxlan[..], &inner].concat()[..]
        );
    }

    #[test]
    fn a_flipped_payload_bit_fails_the_udp_checksum() {
        let (vxlan, inner) = datagram_parts();
        let head = headers(&addrs(), &[&vxlan, &inner]);
        let mut frame = [&head[..], &vxlan, &inner].concat();
        let last = frame.len() - 1;
        frame[last] ^= 0x10;
        assert_eq!(
            datagram(&frame, addrs().dst, 4789),
            Err(NotVxlan::Malformed)
        );
        // Without a checksum nothing is verified, and the datagram says so.
        frame[40..42].fill(0);
        let got = datagram(&frame, addrs().dst, 4789).unwrap();
        assert!(!got.checksummed);
        // A partial checksum (the pseudo-header's sum, left for a device to finish, as a
        // sender's kernel leaves it on a virtual link) vouches for nothing either.
        let udp_len = (frame.len() - 34) as u32;
        let pseudo = checksum::pseudo_header_v4(addrs().src, addrs().dst, 17, udp_len);
        frame[40..42].copy_from_slice(&checksum::fold(pseudo).to_be_bytes());
        let got = datagram(&frame, addrs().dst, 4789).unwrap();
        assert!(!got.checksummed, "partial");
        frame[41] ^= 1;
        assert_eq!(
            datagram(&frame, addrs().dst, 4789),
            Err(NotVxlan::Malformed),
            "neither whole nor partial"
        );
    }

    #[test]
    fn other_addresses_ports_and_short_frames_are_refused() {
        let (vxlan, inner) = datagram_parts();
        let head = headers(&addrs(), &[&vxlan, &inner]);
        let frame = [&head[..], &vxlan, &inner].concat();
        assert_eq!(
            datagram(&frame, Ipv4Addr::new(192, 168, 77, 9), 4789),
            Err(NotVxlan::NotOurs)
        );
        assert_eq!(datagram(&frame, addrs().dst, 8472), Err(NotVxlan::NotOurs));
        for cut in [0, 13, 20, 33, 41] {
            assert!(datagram(&frame[..cut], addrs().dst, 4789).is_err(), "{cut}");
        }
        let mut fragment = frame.clone();
        fragment[20] = 0x20; // MF
        assert!(datagram(&fragment, addrs().dst, 4789).is_err());
    }
}
