//! Coalescing (GRO in user space): consecutive packets of one flow in a batch, forwarded
//! to the same TAP port, are merged into one GSO super-frame before they are written, so
//! the dataplane makes one write instead of many and the receiving stack runs its IP layer
//! once per super-frame. Two kinds share one run-walker (`coalesce`):
//!
//! * **UDP** (`Udp`): datagrams whose checksum is still partial (`NEEDS_CSUM`, as a pod's
//!   kernel sends them over a TAP with offloads) become a `UDP_L4` super-frame; the pod's
//!   kernel splits it again at the socket (`udp_rcv_segment`), so each datagram still
//!   arrives on its own. Only toward ports that accept USO.
//! * **TCP** (`Tcp`): segments that arrived from another node (decapsulated, each with a
//!   complete checksum) become a `TCPV4`/`TCPV6` super-frame, as the kernel's GRO does,
//!   when they follow each other in sequence with identical headers (flags ACK/PSH only,
//!   same options). A segment's checksum is verified before it is merged unless the uplink
//!   vouched for it (`F_DATA_VALID`: the outer UDP checksum covered it).
//!
//! Merged packets must have a plain header (IPv4 without options or fragments, IPv6
//! without extension headers) and the same payload size (the last may be shorter).

use super::counters::Counters;
use super::{Event, Verdict, L3_OFFSET};
use crate::buffer::PacketBuf;
use crate::tables::{NextHop, Port, PortRole, Tables};
use crate::wire::{checksum, ipv4, ipv6, read_u16, vnet, write_u16, VnetHeader};

const UDP_HEADER: usize = 8;
/// The largest frame a super-frame may become: virtio-net and Ethernet headers plus the
/// largest IP packet.
const MAX_SUPER: usize = L3_OFFSET + 65_535;

/// What identifies a datagram's flow, and where its payload is.
#[derive(Clone, Copy)]
pub(super) struct Datagram {
    /// IP header length (20 or 40).
    l3_header: usize,
    /// UDP payload length.
    payload: usize,
}

/// Checks that `frame` (virtio-net header + Ethernet) is a coalescable UDP datagram.
fn datagram(frame: &[u8]) -> Option<Datagram> {
    let vh = VnetHeader::new_checked(frame).ok()?;
    let l3 = frame.get(L3_OFFSET..)?;
    if vh.flags() & vnet::F_NEEDS_CSUM == 0 || vh.is_gso() {
        return None;
    }
    let l3_header = match l3.first()? >> 4 {
        4 if l3[0] == 0x45
            && l3.get(9) == Some(&ipv4::PROTO_UDP)
            && read_u16(l3, 6) & 0x3fff == 0 =>
        {
            if usize::from(read_u16(l3, 2)) != l3.len() {
                return None;
            }
            ipv4::MIN_HEADER_LEN
        }
        6 if l3.get(6) == Some(&ipv4::PROTO_UDP) && l3.len() >= ipv6::HEADER_LEN => {
            if usize::from(read_u16(l3, 4)) + ipv6::HEADER_LEN != l3.len() {
                return None;
            }
            ipv6::HEADER_LEN
        }
        _ => return None,
    };
    if usize::from(vh.csum_start()) != L3_OFFSET - vnet::HEADER_LEN + l3_header
        || vh.csum_offset() != 6
    {
        return None;
    }
    let udp = l3.get(l3_header..l3_header + UDP_HEADER)?;
    let payload = usize::from(read_u16(udp, 4)).checked_sub(UDP_HEADER)?;
    (l3_header + UDP_HEADER + payload == l3.len() && payload > 0)
        .then_some(Datagram { l3_header, payload })
}

/// True when `b` belongs to the same flow as `a`: equal IP header except lengths,
/// identification and checksum; equal UDP ports.
fn same_flow(a: &[u8], b: &[u8], d: Datagram) -> bool {
    let (a, b) = (&a[L3_OFFSET..], &b[L3_OFFSET..]);
    if d.l3_header == ipv4::MIN_HEADER_LEN {
        // version/IHL/TOS, flags+offset, TTL/protocol, addresses
        a[0..2] == b[0..2]
            && a[6..10] == b[6..10]
            && a[12..20] == b[12..20]
            && a[20..24] == b[20..24]
    } else {
        // version/class/flow label, next header/hop limit, addresses, ports
        a[0..4] == b[0..4] && a[6..40] == b[6..40] && a[40..44] == b[40..44]
    }
}

/// A kind of packet that can be merged into a super-frame.
pub(super) trait Kind {
    /// What the first packet of a run tells about the run.
    type First: Copy;
    /// The event counted per merged packet.
    const EVENT: Event;
    /// Whether frames going to `egress` from `ingress` may be merged.
    fn eligible<D>(ingress: &Port<D>, egress: &Port<D>) -> bool;
    /// Parses a candidate; `None` when it cannot be merged at all.
    fn parse(frame: &[u8]) -> Option<Self::First>;
    /// Where the payload of a parsed packet starts in its frame, and its length.
    fn payload(p: &Self::First) -> (usize, usize);
    /// True when `next` continues the run of `first` after `merged` payload bytes.
    fn follows(
        first_frame: &[u8],
        first: &Self::First,
        merged: usize,
        next_frame: &[u8],
        next: &Self::First,
    ) -> bool;
    /// Takes into the first frame's headers what a merged packet adds (TCP: PSH).
    fn absorb(_first_frame: &mut [u8], _first: &Self::First, _next_frame: &[u8]) {}
    /// Rewrites the grown first frame's headers for `total` payload bytes.
    fn finish(frame: &mut PacketBuf, first: Self::First, total: usize);
}

/// Merges runs of packets of kind `K` in place: the first of a run grows into a GSO
/// super-frame, the others get [`Verdict::Merged`].
pub(super) fn coalesce<K: Kind, D>(
    tables: &Tables<D>,
    ingress: &Port<D>,
    frames: &mut [PacketBuf],
    verdicts: &mut [Verdict],
    counters: &mut Counters,
) {
    let mut i = 0;
    while i < frames.len() {
        let Verdict::Forward(nh) = verdicts[i] else {
            i += 1;
            continue;
        };
        let ok = matches!(tables.nexthop(nh), Some(NextHop::Port(p)) if K::eligible(ingress, p));
        let Some(first) = ok.then(|| K::parse(frames[i].frame())).flatten() else {
            i += 1;
            continue;
        };
        let (start, size) = K::payload(&first);
        let mut total = size;
        let mut j = i + 1;
        while j < frames.len() && verdicts[j] == Verdict::Forward(nh) {
            let Some(next) = K::parse(frames[j].frame()) else {
                break;
            };
            let (next_start, next_size) = K::payload(&next);
            if next_size > size
                || start + total + next_size > MAX_SUPER
                || !K::follows(frames[i].frame(), &first, total, frames[j].frame(), &next)
            {
                break;
            }
            let (head, tail) = frames.split_at_mut(j);
            let into = &mut head[i];
            K::absorb(into.frame_mut(), &first, tail[0].frame());
            let old = into.len();
            into.set_len(old + next_size);
            into.frame_mut()[old..]
                .copy_from_slice(&tail[0].frame()[next_start..next_start + next_size]);
            total += next_size;
            verdicts[j] = Verdict::Merged;
            counters.event(K::EVENT);
            j += 1;
            if next_size < size {
                break; // only the last segment may be short
            }
        }
        if j > i + 1 {
            K::finish(&mut frames[i], first, total);
        }
        i = j;
    }
}

/// UDP datagrams with partial checksums, toward ports that accept USO.
pub(super) struct Udp;

impl Kind for Udp {
    type First = Datagram;
    const EVENT: Event = Event::UdpCoalesced;

    fn eligible<D>(_: &Port<D>, egress: &Port<D>) -> bool {
        egress.accepts_udp_gso
    }

    fn parse(frame: &[u8]) -> Option<Datagram> {
        datagram(frame)
    }

    fn payload(d: &Datagram) -> (usize, usize) {
        (L3_OFFSET + d.l3_header + UDP_HEADER, d.payload)
    }

    fn follows(a: &[u8], first: &Datagram, _: usize, b: &[u8], next: &Datagram) -> bool {
        next.l3_header == first.l3_header && same_flow(a, b, *first)
    }

    fn finish(frame: &mut PacketBuf, first: Datagram, total: usize) {
        finish_super_frame(frame, first, total)
    }
}

/// Rewrites lengths, checksums and the virtio-net header of a grown first datagram.
fn finish_super_frame(frame: &mut PacketBuf, first: Datagram, total: usize) {
    let f = frame.frame_mut();
    let udp_len = UDP_HEADER + total;
    let (vh, l3) = f.split_at_mut(L3_OFFSET);
    if first.l3_header == ipv4::MIN_HEADER_LEN {
        write_u16(l3, 2, (ipv4::MIN_HEADER_LEN + udp_len) as u16);
        write_u16(l3, 10, 0);
        let check = checksum::checksum(&l3[..ipv4::MIN_HEADER_LEN]);
        write_u16(l3, 10, check);
    } else {
        write_u16(l3, 4, udp_len as u16);
    }
    let pseudo = checksum::pseudo_header_of(l3, ipv4::PROTO_UDP, udp_len as u32);
    let udp = &mut l3[first.l3_header..];
    write_u16(udp, 4, udp_len as u16);
    // A partial checksum holds the folded pseudo-header sum, not complemented.
    write_u16(udp, 6, checksum::fold(pseudo));
    let hdr_len = (L3_OFFSET - vnet::HEADER_LEN + first.l3_header + UDP_HEADER) as u16;
    vh[0] = vnet::F_NEEDS_CSUM;
    vh[1] = vnet::GSO_UDP_L4;
    vh[2..4].copy_from_slice(&hdr_len.to_le_bytes());
    vh[4..6].copy_from_slice(&(first.payload as u16).to_le_bytes());
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

const TCP_FLAG_ACK: u8 = 0x10;
const TCP_FLAG_PSH: u8 = 0x08;

/// Parses an IP packet `l3` as a mergeable TCP segment: plain IP header, flags ACK (and
/// PSH) only, some payload, and a checksum that verifies unless `checksum_valid`.
pub fn tcp_segment(l3: &[u8], checksum_valid: bool) -> Option<Segment> {
    let (l3_header, total) = match l3.first()? >> 4 {
        4 if l3[0] == 0x45
            && l3.get(9) == Some(&ipv4::PROTO_TCP)
            && read_u16(l3, 6) & 0x3fff == 0 =>
        {
            (ipv4::MIN_HEADER_LEN, usize::from(read_u16(l3, 2)))
        }
        6 if l3.get(6) == Some(&ipv4::PROTO_TCP) && l3.len() >= ipv6::HEADER_LEN => (
            ipv6::HEADER_LEN,
            usize::from(read_u16(l3, 4)) + ipv6::HEADER_LEN,
        ),
        _ => return None,
    };
    if total != l3.len() {
        return None;
    }
    let tcp = l3.get(l3_header..)?;
    let tcp_header = usize::from(*tcp.get(12)? >> 4) * 4;
    let flags = *tcp.get(13)?;
    if tcp_header < 20 || tcp.len() <= tcp_header || flags & !TCP_FLAG_PSH != TCP_FLAG_ACK {
        return None;
    }
    if !checksum_valid {
        let pseudo = checksum::pseudo_header_of(l3, ipv4::PROTO_TCP, tcp.len() as u32);
        if checksum::finish(checksum::accumulate(pseudo, tcp)) != 0 {
            return None;
        }
    }
    Some(Segment {
        l3_header,
        tcp_header,
        payload: tcp.len() - tcp_header,
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
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
        || a[first.l3_header + 13] & TCP_FLAG_PSH != 0
    {
        return false;
    }
    let same_ip = if first.l3_header == ipv4::MIN_HEADER_LEN {
        a[0..2] == b[0..2] && a[6..10] == b[6..10] && a[12..20] == b[12..20]
    } else {
        a[0..4] == b[0..4] && a[6..40] == b[6..40]
    };
    let (ta, tb) = (&a[first.l3_header..], &b[first.l3_header..]);
    same_ip
        && ta[0..4] == tb[0..4]
        && ta[8..13] == tb[8..13]
        && ta[13] == tb[13] & !TCP_FLAG_PSH
        && ta[14..16] == tb[14..16]
        && ta[18..first.tcp_header] == tb[18..first.tcp_header]
}

/// Takes segment `b`'s PSH into the run's first header `a` (IP packets).
pub fn tcp_absorb(a: &mut [u8], first: &Segment, b: &[u8]) {
    let at = first.l3_header + 13;
    a[at] |= b[at] & TCP_FLAG_PSH;
}

/// Rewrites a grown first segment's headers in `frame` (virtio-net header + Ethernet) for
/// `total` payload bytes: lengths, IPv4 header checksum, partial TCP checksum, and a
/// `TCPV4`/`TCPV6` GSO virtio-net header with the first segment's size.
pub fn tcp_finish(frame: &mut [u8], first: &Segment, total: usize) {
    let (l3h, tcph) = (first.l3_header, first.tcp_header);
    let tcp_len = tcph + total;
    let (vh, l3) = frame.split_at_mut(L3_OFFSET);
    let v6 = l3h != ipv4::MIN_HEADER_LEN;
    if v6 {
        write_u16(l3, 4, tcp_len as u16);
    } else {
        write_u16(l3, 2, (l3h + tcp_len) as u16);
        write_u16(l3, 10, 0);
        let check = checksum::checksum(&l3[..l3h]);
        write_u16(l3, 10, check);
    }
    let pseudo = checksum::pseudo_header_of(l3, ipv4::PROTO_TCP, tcp_len as u32);
    write_u16(&mut l3[l3h..], 16, checksum::fold(pseudo));
    let eth_l3 = L3_OFFSET - vnet::HEADER_LEN + l3h;
    vh[0] = vnet::F_NEEDS_CSUM;
    vh[1] = if v6 { vnet::GSO_TCPV6 } else { vnet::GSO_TCPV4 };
    vh[2..4].copy_from_slice(&((eth_l3 + tcph) as u16).to_le_bytes());
    vh[4..6].copy_from_slice(&(first.payload as u16).to_le_bytes());
    vh[6..8].copy_from_slice(&(eth_l3 as u16).to_le_bytes());
    vh[8..10].copy_from_slice(&16u16.to_le_bytes());
}

/// TCP segments from another node (decapsulated) toward local ports.
pub(super) struct Tcp;

impl Kind for Tcp {
    type First = Segment;
    const EVENT: Event = Event::TcpCoalesced;

    fn eligible<D>(ingress: &Port<D>, egress: &Port<D>) -> bool {
        ingress.role == PortRole::Uplink && egress.role != PortRole::Uplink
    }

    fn parse(frame: &[u8]) -> Option<Segment> {
        let vh = VnetHeader::new_checked(frame).ok()?;
        if vh.is_gso() || vh.flags() & vnet::F_NEEDS_CSUM != 0 {
            return None;
        }
        tcp_segment(
            frame.get(L3_OFFSET..)?,
            vh.flags() & vnet::F_DATA_VALID != 0,
        )
    }

    fn payload(s: &Segment) -> (usize, usize) {
        (L3_OFFSET + s.payload_offset(), s.payload)
    }

    fn follows(a: &[u8], first: &Segment, merged: usize, b: &[u8], next: &Segment) -> bool {
        tcp_follows(&a[L3_OFFSET..], first, merged, &b[L3_OFFSET..], next)
    }

    fn absorb(first_frame: &mut [u8], first: &Segment, next_frame: &[u8]) {
        tcp_absorb(
            &mut first_frame[L3_OFFSET..],
            first,
            &next_frame[L3_OFFSET..],
        );
    }

    fn finish(frame: &mut PacketBuf, first: Segment, total: usize) {
        tcp_finish(frame.frame_mut(), &first, total);
    }
}
