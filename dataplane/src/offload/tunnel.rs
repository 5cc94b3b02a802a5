//! Encapsulation between nodes, as pure functions over buffers: what the uplink's sockets
//! receive becomes frames the pipeline routes, and what the pipeline sends to another node
//! becomes what the sockets send. No system call here: the sockets are `io::uplink`'s.
//!
//! * **Receive** ([`Decapsulator`]): a VXLAN datagram, or a run of them back to back as one
//!   `UDP_GRO` read returns them, is checked (flag, VNI) and turned in place into frames
//!   in the layout every port delivers (virtio-net header, Ethernet from the uplink's MAC
//!   to the gateway's); consecutive TCP segments of one inner flow are merged into one
//!   super-frame ([`super::gro`]). An IP-in-IP packet loses its outer header the same way;
//!   a packet routed directly (no encapsulation) only gets the frame's headers.
//! * **Send** ([`encapsulate`]): a frame becomes one packet to send (VXLAN: the header then
//!   the inner Ethernet frame, in two parts so that nothing is copied; IP-in-IP: the inner
//!   IP packet) or, for a TCP or UDP super-frame, segments cut in software ([`super::segment`])
//!   into a scratch buffer, each behind room for its VXLAN header, laid out for one
//!   `UDP_SEGMENT` send.

use super::gro::{tcp_absorb, tcp_finish, tcp_follows, tcp_segment};
use super::segment::{self, Segments};
use crate::buffer::{PacketBuf, MAX_FRAME};
use crate::wire::{ethernet, vnet, vxlan, VnetHeader, VxlanHeader, L3_OFFSET};
use switchyard_api::MacAddr;

/// The encapsulation an uplink speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encap {
    /// VXLAN with this VNI, to this UDP port.
    Vxlan {
        /// VXLAN network identifier.
        vni: u32,
        /// Destination UDP port.
        port: u16,
    },
    /// IP-in-IP with this IP protocol number (4: IPv4 inner, 41: IPv6 inner).
    Ipip {
        /// Outer IP protocol.
        protocol: u8,
    },
    /// No encapsulation (direct routing on the AF_XDP uplink): IPv4 packets as they are,
    /// each behind an Ethernet header toward the peer.
    Direct,
}

/// The shortest inner packet accepted: an IPv4 header.
const MIN_INNER_L3: usize = 20;

impl Encap {
    /// Where a received datagram's payload is put in a buffer: for VXLAN the inner
    /// Ethernet header lands right after the virtio-net header; for IP-in-IP the inner IP
    /// header lands after virtio-net + Ethernet when the outer header has no options.
    pub fn rx_offset(self) -> usize {
        match self {
            Encap::Vxlan { .. } => vnet::HEADER_LEN - vxlan::HEADER_LEN,
            Encap::Ipip { .. } => L3_OFFSET - MIN_INNER_L3,
            Encap::Direct => L3_OFFSET,
        }
    }

    /// The VXLAN header this uplink puts before every frame (none for IP-in-IP).
    pub fn vxlan_header(self) -> Option<[u8; vxlan::HEADER_LEN]> {
        match self {
            Encap::Vxlan { vni, .. } => Some(vxlan::header(vni)),
            Encap::Ipip { .. } | Encap::Direct => None,
        }
    }

    /// The destination UDP port (0 for IP-in-IP and direct routing).
    pub fn dst_port(self) -> u16 {
        match self {
            Encap::Vxlan { port, .. } => port,
            Encap::Ipip { .. } | Encap::Direct => 0,
        }
    }

    /// Short name, as the API lists the port kind.
    pub fn name(self) -> &'static str {
        match self {
            Encap::Vxlan { .. } => "vxlan",
            Encap::Ipip { .. } => "ipip",
            Encap::Direct => "direct",
        }
    }
}

/// Turns what an uplink receives into frames.
#[derive(Debug, Clone, Copy)]
pub struct Decapsulator {
    /// The encapsulation spoken.
    pub encap: Encap,
    /// Source MAC written on decapsulated frames (the uplink port's own).
    pub mac: MacAddr,
    /// Destination MAC written on decapsulated frames (the gateway's).
    pub gateway: MacAddr,
}

/// Why a datagram that reached the uplink was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// From an address that is not a peer node (the sockets' check).
    NotAPeer,
    /// VXLAN with another VNI or no VNI flag, or IP-in-IP of another protocol.
    NotOurs,
    /// Shorter than its headers, or an inner packet that is not IPv4 or IPv6.
    Malformed,
    /// A run of datagrams longer than the buffers left in the batch.
    NoBuffer,
}

impl Reject {
    /// Every reason, in counter order.
    pub const ALL: [Reject; 4] = [
        Reject::NotAPeer,
        Reject::NotOurs,
        Reject::Malformed,
        Reject::NoBuffer,
    ];

    /// The drop counter's name in the stats.
    pub fn name(self) -> &'static str {
        match self {
            Reject::NotAPeer => "uplink_not_a_peer",
            Reject::NotOurs => "uplink_not_ours",
            Reject::Malformed => "uplink_malformed",
            Reject::NoBuffer => "uplink_no_buffer",
        }
    }
}

/// Frames made from a receive, and datagrams rejected on the way, by [`Reject`] index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Received {
    /// Frames ready in the buffers.
    pub frames: usize,
    /// Datagrams dropped, by reason.
    pub rejected: [u64; Reject::ALL.len()],
}

impl Received {
    fn reject(&mut self, reason: Reject, n: u64) {
        self.rejected[reason as usize] += n;
    }

    /// Datagrams dropped for any reason.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().sum()
    }
}

impl Decapsulator {
    /// Turns `data` into frames in `bufs` as a receive does: for VXLAN, datagrams of
    /// `segment` bytes back to back, as one `UDP_GRO` read returns them; for IP-in-IP, one
    /// packet with its outer header. The sender check is the caller's. For tests and
    /// fuzzing: a receive puts the data in place itself.
    pub fn deliver(&self, data: &[u8], segment: usize, bufs: &mut [PacketBuf]) -> Received {
        let Some(first) = bufs.first_mut() else {
            return Received::default();
        };
        let at = self.encap.rx_offset();
        let space = &mut first.receive_space()[at..];
        let len = data.len().min(space.len());
        space[..len].copy_from_slice(&data[..len]);
        match self.encap {
            Encap::Vxlan { .. } if len > 0 => self.split_runs(bufs, len, segment.clamp(1, len)),
            Encap::Vxlan { .. } => Received::default(),
            Encap::Ipip { .. } | Encap::Direct => {
                let mut out = Received::default();
                match self.decapsulate(first, len) {
                    Ok(()) => out.frames = 1,
                    Err(reason) => out.reject(reason, 1),
                }
                out
            }
        }
    }

    /// Turns the datagram of `len` bytes a receive put at [`Encap::rx_offset`] in `buf`
    /// into a frame, or says why not.
    pub fn decapsulate(&self, buf: &mut PacketBuf, len: usize) -> Result<(), Reject> {
        let frame_len = self.decapsulate_in(buf.receive_space(), self.encap.rx_offset(), len)?;
        buf.set_len(frame_len);
        Ok(())
    }

    /// `bufs[0]` holds `len` bytes of VXLAN datagrams of `segment` bytes (the last may be
    /// shorter) at [`Encap::rx_offset`]; turns them into frames in `bufs[0..]`. When the
    /// buffers run out, what is left is dropped and counted.
    pub fn split_runs(&self, bufs: &mut [PacketBuf], mut len: usize, segment: usize) -> Received {
        let at = self.encap.rx_offset();
        let mut out = Received::default();
        while len > 0 {
            let (this, rest) = bufs.split_at_mut(out.frames + 1);
            let space = this[out.frames].receive_space();
            let (used, frame) = self.merge_run(space, len, segment);
            len -= used;
            let src_at = at + used;
            let frame_len = match frame {
                Ok(frame_len) => frame_len,
                Err(reason) => {
                    // The first datagram was not ours: the rest starts over in this buffer.
                    out.reject(reason, 1);
                    space.copy_within(src_at..src_at + len, at);
                    continue;
                }
            };
            if len > 0 {
                // The rest starts a new frame in the next buffer, if there is one.
                match rest.first_mut() {
                    Some(next) => next.receive_space()[at..at + len]
                        .copy_from_slice(&space[src_at..src_at + len]),
                    None => {
                        out.reject(Reject::NoBuffer, len.div_ceil(segment) as u64);
                        len = 0;
                    }
                }
            }
            this[out.frames].set_len(frame_len);
            out.frames += 1;
        }
        out
    }

    /// Decapsulates the first datagram in `space` (at the VXLAN receive offset) into a
    /// frame and merges the TCP segments that continue it; returns the datagram bytes
    /// consumed and the frame's length, or why the first datagram was not made a frame.
    fn merge_run(
        &self,
        space: &mut [u8],
        len: usize,
        segment: usize,
    ) -> (usize, Result<usize, Reject>) {
        let at = self.encap.rx_offset();
        let first_len = segment.min(len);
        let frame_len = match self.decapsulate_in(space, at, first_len) {
            Ok(frame_len) => frame_len,
            Err(reason) => return (first_len, Err(reason)),
        };
        let Some(first) = tcp_segment(&space[L3_OFFSET..frame_len], true) else {
            return (first_len, Ok(frame_len));
        };
        let inner_type = vnet::HEADER_LEN + 12..L3_OFFSET;
        let (mut used, mut end, mut merged) = (first_len, frame_len, first.payload_len());
        while used < len {
            let next_at = at + used;
            let dlen = segment.min(len - used);
            let inner = next_at + vxlan::HEADER_LEN + ethernet::HEADER_LEN;
            // Another datagram of ours, with the same inner EtherType.
            let next_type = next_at + vxlan::HEADER_LEN + 12..inner;
            if dlen < vxlan::HEADER_LEN + ethernet::HEADER_LEN + MIN_INNER_L3
                || !self.vxlan_ok(&space[next_at..])
                || space[next_type] != space[inner_type.clone()]
            {
                break;
            }
            let (head, tail) = space.split_at_mut(inner);
            let next_l3 = &tail[..dlen - vxlan::HEADER_LEN - ethernet::HEADER_LEN];
            let Some(next) = tcp_segment(next_l3, true) else {
                break;
            };
            if end + next.payload_len() > MAX_FRAME
                || merged + next.payload_len() + first.payload_offset() > 65_535
                || !tcp_follows(&head[L3_OFFSET..], &first, merged, next_l3, &next)
            {
                break;
            }
            tcp_absorb(&mut head[L3_OFFSET..], &first, next_l3);
            let payload = inner + next.payload_offset();
            space.copy_within(payload..payload + next.payload_len(), end);
            end += next.payload_len();
            merged += next.payload_len();
            used += dlen;
            if next.payload_len() < first.payload_len() {
                break;
            }
        }
        if merged > first.payload_len() {
            tcp_finish(&mut space[..end], &first, merged);
        }
        (used, Ok(end))
    }

    /// True when `h` starts with a VXLAN header of this uplink's VNI.
    fn vxlan_ok(&self, h: &[u8]) -> bool {
        match (self.encap, VxlanHeader::new_checked(h)) {
            (Encap::Vxlan { vni, .. }, Ok(v)) => v.has_vni() && v.vni() == vni,
            _ => false,
        }
    }

    /// Decapsulates the datagram of `len` bytes at `at` in `space` in place; returns the
    /// frame's length (virtio-net header and Ethernet included).
    fn decapsulate_in(&self, space: &mut [u8], at: usize, len: usize) -> Result<usize, Reject> {
        let frame_len = match self.encap {
            Encap::Vxlan { .. } => {
                if len < vxlan::HEADER_LEN + ethernet::HEADER_LEN + MIN_INNER_L3
                    || space.len() < at + len
                {
                    return Err(Reject::Malformed);
                }
                if !self.vxlan_ok(&space[at..]) {
                    return Err(Reject::NotOurs);
                }
                at + len
            }
            Encap::Ipip { protocol } => {
                let outer = space
                    .get(at..at + len)
                    .and_then(|p| crate::wire::Ipv4Header::new_checked(p).ok())
                    .ok_or(Reject::Malformed)?;
                let outer_len = outer.header_len();
                if outer.protocol() != protocol {
                    return Err(Reject::NotOurs);
                }
                if len < outer_len + MIN_INNER_L3 {
                    return Err(Reject::Malformed);
                }
                if outer_len > MIN_INNER_L3 {
                    space.copy_within(at + outer_len..at + len, at + MIN_INNER_L3);
                }
                at + len - (outer_len - MIN_INNER_L3)
            }
            Encap::Direct => {
                if len < MIN_INNER_L3 || space.len() < at + len {
                    return Err(Reject::Malformed);
                }
                at + len
            }
        };
        let ethertype = match space[L3_OFFSET] >> 4 {
            4 => ethernet::EtherType::Ipv4,
            6 => ethernet::EtherType::Ipv6,
            _ => return Err(Reject::Malformed),
        };
        let (vh, rest) = space.split_at_mut(vnet::HEADER_LEN);
        let mut vh = VnetHeader::new_checked(vh).map_err(|_| Reject::Malformed)?;
        vh.clear();
        if matches!(self.encap, Encap::Vxlan { .. }) {
            // The kernel verified the outer UDP checksum, which covers the inner packet.
            vh.set_flags(vnet::F_DATA_VALID);
        }
        let mut eth = ethernet::EthernetFrame::new_checked(rest).map_err(|_| Reject::Malformed)?;
        eth.set_dst(self.gateway);
        eth.set_src(self.mac);
        eth.set_ethertype(ethertype);
        Ok(frame_len)
    }
}

impl std::fmt::Display for EncapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EncapError::Truncated => f.write_str("shorter than its headers"),
            EncapError::BadChecksumOffsets => f.write_str("partial checksum outside the frame"),
            EncapError::Segmentation(e) => write!(f, "cannot segment the super-frame: {e:?}"),
            EncapError::UnknownGso => f.write_str("a super-frame of an unknown GSO type"),
        }
    }
}

/// Why a frame cannot be carried to another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncapError {
    /// Shorter than its headers.
    Truncated,
    /// A partial checksum whose offsets point outside the frame.
    BadChecksumOffsets,
    /// A super-frame that cannot be segmented.
    Segmentation(segment::SegmentError),
    /// A super-frame of a kind that is never segmented (not TCP, not UDP).
    UnknownGso,
}

/// What to send for one frame.
#[derive(Debug)]
pub enum Outgoing<'a> {
    /// One packet, in parts sent as one (VXLAN: the header, then the inner Ethernet frame;
    /// IP-in-IP and direct routing: the IP packet alone).
    One([&'a [u8]; 2]),
    /// Segments back to back in `data`, every `stride` bytes (the last may be shorter):
    /// VXLAN datagram payloads, header included; for IP-in-IP and direct routing each
    /// starts with an Ethernet header that is not sent (`skip`).
    Segments {
        /// The segments.
        data: &'a [u8],
        /// Bytes from one segment's start to the next.
        stride: usize,
        /// How many segments.
        count: usize,
        /// Bytes at the start of each segment not to send.
        skip: usize,
    },
}

/// Prepares `frame` (virtio-net header then Ethernet, as the pipeline left it) for the
/// tunnel: finishes a partial checksum, or segments a TCP or UDP super-frame into `scratch`
/// (see [`segment::SCRATCH_LEN`]), and writes each segment's VXLAN header.
pub fn encapsulate<'a>(
    encap: Encap,
    vxlan_header: &'a [u8; vxlan::HEADER_LEN],
    frame: &'a mut [u8],
    scratch: &'a mut [u8],
) -> Result<Outgoing<'a>, EncapError> {
    let vh = VnetHeader::new_checked(&*frame).map_err(|_| EncapError::Truncated)?;
    let gso_type = if vh.is_gso() {
        vh.gso_type()
    } else {
        vnet::GSO_NONE
    };
    if frame.len() < L3_OFFSET + MIN_INNER_L3 {
        return Err(EncapError::Truncated);
    }
    match gso_type {
        vnet::GSO_NONE => {
            if !vnet::finish_checksum(frame) {
                return Err(EncapError::BadChecksumOffsets);
            }
            Ok(Outgoing::One(match encap {
                Encap::Vxlan { .. } => [&vxlan_header[..], &frame[vnet::HEADER_LEN..]],
                Encap::Ipip { .. } | Encap::Direct => [&frame[L3_OFFSET..], &[]],
            }))
        }
        vnet::GSO_TCPV4 | vnet::GSO_TCPV6 | vnet::GSO_UDP_L4 => {
            let gap = match encap {
                Encap::Vxlan { .. } => vxlan::HEADER_LEN,
                Encap::Ipip { .. } | Encap::Direct => 0,
            };
            let Segments {
                count,
                stride,
                total,
            } = segment::super_frame(frame, gap, scratch).map_err(EncapError::Segmentation)?;
            let data = &mut scratch[..total];
            if gap > 0 {
                for seg in data.chunks_mut(stride) {
                    seg[..gap].copy_from_slice(vxlan_header);
                }
            }
            let skip = match encap {
                Encap::Vxlan { .. } => 0,
                Encap::Ipip { .. } | Encap::Direct => ethernet::HEADER_LEN,
            };
            Ok(Outgoing::Segments {
                data,
                stride,
                count,
                skip,
            })
        }
        _ => Err(EncapError::UnknownGso),
    }
}

/// A hash of the inner packet's addresses and ports (IPv4 or IPv6), the same for every
/// packet of a flow: it picks the send socket, so the outer source port follows the inner
/// flow (RFC 7348) and the underlay can spread flows.
pub fn flow_hash(l3: &[u8]) -> u32 {
    let (addrs, proto, l4) = match l3.first().map(|b| b >> 4) {
        Some(4) => {
            let ihl = usize::from(l3[0] & 0x0f) * 4;
            (
                l3.get(12..20),
                l3.get(9).copied().unwrap_or(0),
                l3.get(ihl..),
            )
        }
        _ => (l3.get(8..40), l3.get(6).copied().unwrap_or(0), l3.get(40..)),
    };
    let mut h: u32 = 0x811c_9dc5;
    let ports = match proto {
        6 | 17 => l4.and_then(|l| l.get(..4)),
        _ => None,
    };
    for b in addrs.unwrap_or(&[]).iter().chain(ports.unwrap_or(&[])) {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    h ^ (h >> 16)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::offload::segment::test_frames;
    use crate::wire::read_u16;

    #[test]
    fn flow_hash_is_per_flow() {
        let mut a = [0u8; 40];
        a[0] = 0x45;
        a[9] = 6;
        a[12..20].copy_from_slice(&[10, 0, 0, 1, 10, 0, 1, 1]);
        a[20..24].copy_from_slice(&[0x30, 0x39, 0x00, 0x50]);
        let mut b = a;
        b[20] = 0x31;
        assert_eq!(flow_hash(&a), flow_hash(&a.clone()));
        assert_ne!(flow_hash(&a), flow_hash(&b));
    }

    #[test]
    fn vxlan_header_carries_the_vni() {
        let u = vxlan(0x12_3456);
        assert_eq!(
            u.encap.vxlan_header(),
            Some([0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0])
        );
    }

    const GW: MacAddr = MacAddr([0xee; 6]);
    const UP: MacAddr = MacAddr([0x0e, 0xee, 0xee, 0, 0, 2]);

    fn vxlan(vni: u32) -> Decapsulator {
        Decapsulator {
            encap: Encap::Vxlan { vni, port: 4789 },
            mac: UP,
            gateway: GW,
        }
    }

    /// What the sending node puts on the wire for `frame`: its segments, each behind a
    /// VXLAN header with `vni`; returns the datagrams back to back and their size.
    fn datagrams(frame: &[u8], vni: u32) -> (Vec<u8>, usize) {
        let mut out = vec![0u8; segment::SCRATCH_LEN];
        let s = segment::super_frame(frame, vxlan::HEADER_LEN, &mut out).unwrap();
        out.truncate(s.total);
        let header = vxlan::header(vni);
        for seg in out.chunks_mut(s.stride) {
            seg[..vxlan::HEADER_LEN].copy_from_slice(&header);
        }
        (out, s.stride)
    }

    fn bufs(n: usize) -> Vec<PacketBuf> {
        (0..n).map(|_| PacketBuf::new()).collect()
    }

    const ACK: u8 = 0x10;

    #[test]
    fn a_run_of_segments_becomes_the_super_frame_again() {
        for v6 in [false, true] {
            let payload: Vec<u8> = (0..20_000u32).map(|i| (i * 13 % 251) as u8).collect();
            let frame = test_frames::super_frame(v6, &payload, 1448, ACK);
            let (wire, stride) = datagrams(&frame, 1);
            let mut b = bufs(4);
            assert_eq!(
                vxlan(1).deliver(&wire, stride, &mut b).frames,
                1,
                "one frame"
            );
            let f = b[0].frame();
            let vh = VnetHeader::new_checked(f).unwrap();
            let l3h = if v6 { 40 } else { 20 };
            assert_eq!(
                vh.gso_type(),
                if v6 { vnet::GSO_TCPV6 } else { vnet::GSO_TCPV4 }
            );
            assert_eq!(vh.gso_size(), 1448);
            assert_eq!(usize::from(vh.csum_start()), 14 + l3h);
            assert_eq!(&f[12..18], &GW.0, "to the gateway");
            assert_eq!(&f[18..24], &UP.0, "from the uplink");
            let l3 = &f[26..];
            let total = if v6 {
                40 + usize::from(read_u16(l3, 4))
            } else {
                usize::from(read_u16(l3, 2))
            };
            assert_eq!(total, l3.len());
            assert_eq!(&l3[l3h + 20..], &payload[..], "payload intact and in order");
            assert_eq!(&l3[l3h + 4..l3h + 8], &1_000_000u32.to_be_bytes());
            if !v6 {
                assert_eq!(crate::wire::checksum::checksum(&l3[..20]), 0);
            }
        }
    }

    #[test]
    fn other_flows_wrong_vni_and_short_buffers_are_handled() {
        let payload = vec![7u8; 1448 * 4];
        let frame = test_frames::super_frame(false, &payload, 1448, ACK);
        let (mut wire, stride) = datagrams(&frame, 1);
        // Segments 3 and 4 belong to another flow (other destination port).
        for k in 2..4 {
            let tcp = k * stride + vxlan::HEADER_LEN + 14 + 20;
            wire[tcp + 3] ^= 1;
        }
        let mut b = bufs(4);
        assert_eq!(
            vxlan(1).deliver(&wire, stride, &mut b).frames,
            2,
            "two runs"
        );
        for f in &b[..2] {
            assert_eq!(
                f.len(),
                12 + 14 + 20 + 20 + 2 * 1448,
                "two segments in each"
            );
        }
        // Another VNI: the first datagram is dropped and counted, the rest start over.
        let (mut wire, stride) = datagrams(&frame, 1);
        wire[4..7].copy_from_slice(&[0, 0, 9]);
        let u = vxlan(1);
        let mut b = bufs(4);
        assert_eq!(
            u.deliver(&wire, stride, &mut b),
            Received {
                frames: 1,
                rejected: [0, 1, 0, 0]
            },
            "another VNI is not ours"
        );
        let l3 = &b[0].frame()[26..];
        assert_eq!(l3.len(), 20 + 20 + 3 * 1448, "three segments merged");
        // More runs than buffers: the rest is dropped and counted, nothing panics.
        let (mut wire, stride) = datagrams(&frame, 1);
        for k in 0..4 {
            wire[k * stride + vxlan::HEADER_LEN + 14 + 20 + 3] ^= k as u8;
        }
        let u = vxlan(1);
        let mut b = bufs(2);
        assert_eq!(
            u.deliver(&wire, stride, &mut b),
            Received {
                frames: 2,
                rejected: [0, 0, 0, 2]
            },
            "no buffer left for the rest"
        );
        assert!(b.iter().all(|f| f.len() == 12 + 14 + 20 + 20 + 1448));
    }

    #[test]
    fn ip_in_ip_is_stripped_to_a_frame() {
        let inner = [
            0x45u8, 0, 0, 20, 0, 0, 0, 0, 64, 1, 0, 0, 10, 244, 1, 5, 10, 244, 0, 5,
        ];
        let mut packet = vec![
            0x45u8, 0, 0, 40, 0, 0, 0, 0, 64, 4, 0, 0, 192, 168, 1, 11, 192, 168, 1, 10,
        ];
        packet.extend_from_slice(&inner);
        let u = Decapsulator {
            encap: Encap::Ipip { protocol: 4 },
            mac: UP,
            gateway: GW,
        };
        let mut b = bufs(1);
        assert_eq!(u.deliver(&packet, 0, &mut b).frames, 1);
        assert_eq!(&b[0].frame()[24..26], &[0x08, 0x00]);
        assert_eq!(&b[0].frame()[26..], &inner);
        packet[9] = 41;
        assert_eq!(
            u.deliver(&packet, 0, &mut b).frames,
            0,
            "another protocol is not ours"
        );
    }
}
