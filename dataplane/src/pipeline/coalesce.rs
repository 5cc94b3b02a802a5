//! UDP coalescing (GRO in user space): consecutive datagrams of one flow, forwarded to the
//! same TAP port, are merged into one `UDP_L4` GSO super-frame before they are written. The
//! pod's kernel splits it again at the socket (`udp_rcv_segment`), so each datagram still
//! arrives on its own, but the dataplane makes one write instead of many and the pod's
//! stack runs its IP layer once per super-frame.
//!
//! Only datagrams whose checksum is still partial (`NEEDS_CSUM`, as a pod's kernel sends
//! them over a TAP with offloads) are merged: their checksum has not been computed yet, so
//! merging changes nothing the receiver could have checked. Merged datagrams must have the
//! same addresses, ports, TTL, traffic class and payload size (the last one may be shorter),
//! a plain header (IPv4 without options or fragments, IPv6 without extension headers), and
//! the egress port must accept USO.

use super::counters::Counters;
use super::{Event, Verdict, L3_OFFSET};
use crate::buffer::PacketBuf;
use crate::tables::{NextHop, Tables};
use crate::wire::{checksum, ipv4, ipv6, read_u16, vnet, write_u16, VnetHeader};

const UDP_HEADER: usize = 8;
/// The largest IP packet a super-frame may become.
const MAX_SUPER: usize = 65_535;

/// What identifies a datagram's flow, and where its payload is.
#[derive(Clone, Copy)]
struct Datagram {
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

/// Merges runs of coalescable datagrams in place: the first of a run grows into a GSO
/// super-frame, the others get [`Verdict::Merged`].
pub(super) fn udp(
    tables: &Tables,
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
        let uso = matches!(tables.nexthop(nh), Some(NextHop::Port(p)) if p.accepts_udp_gso);
        let Some(first) = uso.then(|| datagram(frames[i].frame())).flatten() else {
            i += 1;
            continue;
        };
        let mut total = first.payload;
        let mut j = i + 1;
        while j < frames.len() && verdicts[j] == Verdict::Forward(nh) {
            let Some(d) = datagram(frames[j].frame()) else {
                break;
            };
            if d.l3_header != first.l3_header
                || d.payload > first.payload
                || first.l3_header + UDP_HEADER + total + d.payload > MAX_SUPER
                || !same_flow(frames[i].frame(), frames[j].frame(), first)
            {
                break;
            }
            let (head, tail) = frames.split_at_mut(j);
            append_payload(&mut head[i], &tail[0], first.l3_header, d.payload);
            total += d.payload;
            verdicts[j] = Verdict::Merged;
            counters.event(Event::UdpCoalesced);
            j += 1;
            if d.payload < first.payload {
                break; // only the last segment may be short
            }
        }
        if j > i + 1 {
            finish_super_frame(&mut frames[i], first, total);
        }
        i = j;
    }
}

fn append_payload(into: &mut PacketBuf, from: &PacketBuf, l3_header: usize, payload: usize) {
    let start = L3_OFFSET + l3_header + UDP_HEADER;
    let old = into.len();
    into.set_len(old + payload);
    into.frame_mut()[old..].copy_from_slice(&from.frame()[start..start + payload]);
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
