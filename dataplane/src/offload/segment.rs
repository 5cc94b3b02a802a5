//! Segmentation in user space (software GSO): a TCP super-frame as a pod's kernel hands it
//! over a TAP (virtio-net header with `GSO_TCPV4`/`GSO_TCPV6`, partial checksum) becomes
//! MSS-sized Ethernet frames with complete headers and checksums; a UDP one (`GSO_UDP_L4`,
//! as an application sending with `UDP_SEGMENT` makes, QUIC stacks among them) becomes its
//! datagrams.
//!
//! The segments are written back to back into one buffer, each after `gap` bytes left free
//! for the caller (a VXLAN header, say), and all but the last have the same length: the
//! layout `sendmsg` with `UDP_SEGMENT` takes, so one system call sends them all. Ports
//! without TSO (AF_XDP, an uplink) need the same.
//!
//! Per segment: IPv4 total length and identification (+1 each), header checksum; IPv6
//! payload length; TCP sequence number advanced by the payload before it; FIN and PSH only
//! on the last segment, CWR only on the first; UDP length; the TCP or UDP checksum
//! computed in full.

use crate::wire::{checksum, ethernet, ipv4, ipv6, read_u16, vnet, write_u16, VnetHeader};

/// Bytes of output room that always suffice for a 64 KiB super-frame: segments of at least
/// 500 bytes of payload, each with up to 8 + 14 + 60 + 60 bytes of gap and headers.
pub const SCRATCH_LEN: usize = 128 * 1024;

/// Why a frame could not be segmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentError {
    /// Not a TCP or UDP GSO frame with a usable segment size.
    NotGso,
    /// Headers missing or inconsistent.
    Malformed,
    /// The output buffer is too small.
    NoRoom,
}

/// Where the segments went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segments {
    /// Segments written.
    pub count: usize,
    /// Length of each segment but the last, gap included.
    pub stride: usize,
    /// Bytes written in all.
    pub total: usize,
}

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Segments `frame` (virtio-net header + Ethernet) into `out`; see the module docs.
pub fn super_frame(frame: &[u8], gap: usize, out: &mut [u8]) -> Result<Segments, SegmentError> {
    let vh = VnetHeader::new_checked(frame).map_err(|_| SegmentError::Malformed)?;
    let eth = frame
        .get(vnet::HEADER_LEN..)
        .ok_or(SegmentError::Malformed)?;
    let l3 = eth
        .get(ethernet::HEADER_LEN..)
        .ok_or(SegmentError::Malformed)?;
    // UDP's GSO type names no family: the packet's version says.
    let (v6, protocol) = match vh.gso_type() {
        vnet::GSO_TCPV4 => (false, ipv4::PROTO_TCP),
        vnet::GSO_TCPV6 => (true, ipv4::PROTO_TCP),
        vnet::GSO_UDP_L4 => (l3.first().map(|b| b >> 4) == Some(6), ipv4::PROTO_UDP),
        _ => return Err(SegmentError::NotGso),
    };
    let mss = usize::from(vh.gso_size());
    if mss == 0 {
        return Err(SegmentError::NotGso);
    }
    let (l3_header, l3_total, next) = if v6 {
        let ip = ipv6::Ipv6Packet::new_checked(l3).map_err(|_| SegmentError::Malformed)?;
        (ipv6::HEADER_LEN, ip.total_len(), ip.next_header())
    } else {
        let ip = ipv4::Ipv4Packet::new_checked(l3).map_err(|_| SegmentError::Malformed)?;
        (ip.header_len(), ip.total_len(), ip.protocol())
    };
    if next != protocol {
        return Err(SegmentError::Malformed);
    }
    let l4 = l3.get(l3_header..l3_total).ok_or(SegmentError::Malformed)?;
    let l4_header = if protocol == ipv4::PROTO_TCP {
        usize::from(l4.get(12).ok_or(SegmentError::Malformed)? >> 4) * 4
    } else {
        8
    };
    if l4_header < 8 || l4.len() < l4_header {
        return Err(SegmentError::Malformed);
    }
    let headers = ethernet::HEADER_LEN + l3_header + l4_header;
    let payload = &l4[l4_header..];
    let count = payload.len().div_ceil(mss).max(1);
    let stride = gap + headers + mss;
    let total = gap + headers + payload.len() + (count - 1) * (gap + headers);
    if out.len() < total {
        return Err(SegmentError::NoRoom);
    }
    let tcp = protocol == ipv4::PROTO_TCP;
    if tcp && l4_header < 20 {
        return Err(SegmentError::Malformed);
    }
    let seq = u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]);
    let flags = l4[13.min(l4.len() - 1)];
    let ipv4_id = if v6 { 0 } else { read_u16(l3, 4) };
    let mut at = 0;
    for (i, chunk) in payload
        .chunks(mss)
        .chain(payload.is_empty().then_some(&[][..]))
        .enumerate()
    {
        let seg = &mut out[at + gap..at + gap + headers + chunk.len()];
        seg[..headers].copy_from_slice(&eth[..headers]);
        seg[headers..].copy_from_slice(chunk);
        let (_, l3) = seg.split_at_mut(ethernet::HEADER_LEN);
        let l4_len = l4_header + chunk.len();
        if v6 {
            write_u16(l3, 4, l4_len as u16);
        } else {
            write_u16(l3, 2, (l3_header + l4_len) as u16);
            write_u16(l3, 4, ipv4_id.wrapping_add(i as u16));
            write_u16(l3, 10, 0);
            let check = checksum::checksum(&l3[..l3_header]);
            write_u16(l3, 10, check);
        }
        let (iph, t) = l3.split_at_mut(l3_header);
        let check_at = if tcp {
            t[4..8].copy_from_slice(&seq.wrapping_add((i * mss) as u32).to_be_bytes());
            let last = i + 1 == count;
            let mut f = flags;
            if !last {
                f &= !(TCP_FIN | TCP_PSH);
            }
            if i > 0 {
                f &= !TCP_CWR;
            }
            t[13] = f;
            16
        } else {
            write_u16(t, 4, l4_len as u16);
            6
        };
        write_u16(t, check_at, 0);
        let pseudo = checksum::pseudo_header_of(iph, protocol, l4_len as u32);
        let check = match checksum::finish(checksum::accumulate(pseudo, &t[..l4_len])) {
            // UDP sends a computed zero as all ones (zero means "no checksum").
            0 if !tcp => 0xffff,
            c => c,
        };
        write_u16(t, check_at, check);
        at += gap + headers + chunk.len();
    }
    Ok(Segments {
        count,
        stride,
        total,
    })
}

/// Frames for tests: TCP super-frames as a pod's kernel hands them over a TAP.
#[cfg(test)]
pub(crate) mod test_frames {
    use crate::wire::{ipv4, ipv6, vnet, write_u16};

    fn tcp_header(seq: u32, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&40000u16.to_be_bytes());
        t[2..4].copy_from_slice(&5201u16.to_be_bytes());
        t[4..8].copy_from_slice(&seq.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t[14..16].copy_from_slice(&65535u16.to_be_bytes());
        t
    }

    /// A TCP super-frame from 10.244.0.5 (fd00::5) to .6 (::6), sequence 1,000,000, with
    /// `flags`, MSS `mss`, partial checksum.
    pub(crate) fn super_frame(v6: bool, payload: &[u8], mss: u16, flags: u8) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f[0] = vnet::F_NEEDS_CSUM;
        f[1] = if v6 { vnet::GSO_TCPV6 } else { vnet::GSO_TCPV4 };
        f[4..6].copy_from_slice(&mss.to_le_bytes());
        f.extend_from_slice(&[0xee; 6]);
        f.extend_from_slice(&[0x0a, 0x58, 10, 244, 0, 5]);
        f.extend_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
        let mut tcp = tcp_header(1_000_000, flags);
        tcp.extend_from_slice(payload);
        if v6 {
            let mut ip = vec![0u8; 40];
            ipv6::emit_header(
                &mut ip,
                "fd00::5".parse().unwrap(),
                "fd00::6".parse().unwrap(),
                6,
                tcp.len(),
                64,
            );
            f.extend_from_slice(&ip);
        } else {
            let mut ip = vec![0u8; 20];
            ipv4::emit_header(
                &mut ip,
                [10, 244, 0, 5].into(),
                [10, 244, 0, 6].into(),
                6,
                tcp.len(),
                64,
            );
            write_u16(&mut ip, 4, 0xfffe); // identification wraps during segmentation
            f.extend_from_slice(&ip);
        }
        f.extend_from_slice(&tcp);
        f
    }
}

#[cfg(test)]
mod tests {
    use super::test_frames::super_frame as frame_with;
    use super::*;
    use crate::wire::{Ipv4Packet, Ipv6Packet};

    const FLAGS_ACK_PSH_FIN_CWR: u8 = 0x10 | TCP_PSH | TCP_FIN | TCP_CWR;

    fn tcp_frame(v6: bool, payload: &[u8], mss: u16) -> Vec<u8> {
        frame_with(v6, payload, mss, FLAGS_ACK_PSH_FIN_CWR)
    }

    fn check_segments(v6: bool) {
        let payload: Vec<u8> = (0..5000u32).map(|i| (i * 7 % 251) as u8).collect();
        let frame = tcp_frame(v6, &payload, 1448);
        let mut out = vec![0u8; 16 * 1024];
        let gap = 8;
        let s = super_frame(&frame, gap, &mut out).unwrap();
        let headers = 14 + if v6 { 40 } else { 20 } + 20;
        assert_eq!(s.count, 4);
        assert_eq!(s.stride, gap + headers + 1448);
        assert_eq!(s.total, 3 * s.stride + gap + headers + 5000 - 3 * 1448);
        let mut joined = Vec::new();
        for i in 0..s.count {
            let start = i * s.stride + gap;
            let end = if i + 1 == s.count {
                s.total
            } else {
                start - gap + s.stride
            };
            let seg = &out[start..end];
            let l3 = &seg[14..];
            let (src, dst, tcp): (std::net::IpAddr, std::net::IpAddr, &[u8]) = if v6 {
                let ip = Ipv6Packet::new_checked(l3).unwrap();
                (ip.src().into(), ip.dst().into(), &l3[40..ip.total_len()])
            } else {
                let ip = Ipv4Packet::new_checked(l3).unwrap();
                assert!(ip.verify_checksum(), "segment {i} IPv4 checksum");
                assert_eq!(read_u16(l3, 4), 0xfffeu16.wrapping_add(i as u16));
                assert_eq!(ip.total_len(), seg.len() - 14);
                (ip.src().into(), ip.dst().into(), &l3[20..ip.total_len()])
            };
            let pseudo = match (src, dst) {
                (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
                    checksum::pseudo_header_v4(s, d, 6, tcp.len() as u32)
                }
                (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
                    checksum::pseudo_header_v6(s, d, 6, tcp.len() as u32)
                }
                _ => unreachable!(),
            };
            assert_eq!(
                checksum::fold(checksum::accumulate(pseudo, tcp)),
                0xffff,
                "segment {i} TCP checksum"
            );
            let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
            assert_eq!(seq, 1_000_000 + (i * 1448) as u32);
            let last = i + 1 == s.count;
            assert_eq!(
                tcp[13] & (TCP_FIN | TCP_PSH) != 0,
                last,
                "FIN/PSH only on the last"
            );
            assert_eq!(tcp[13] & TCP_CWR != 0, i == 0, "CWR only on the first");
            joined.extend_from_slice(&tcp[20..]);
        }
        assert_eq!(joined, payload);
    }

    #[test]
    fn ipv4_super_frame_becomes_checked_segments() {
        check_segments(false);
    }

    #[test]
    fn ipv6_super_frame_becomes_checked_segments() {
        check_segments(true);
    }

    /// A UDP GSO super-frame, as an application's `UDP_SEGMENT` send makes it: datagrams
    /// of `size` bytes of `payload`, partial checksum.
    fn udp_frame(v6: bool, payload: &[u8], size: u16) -> Vec<u8> {
        let mut f = tcp_frame(v6, &[], 1000);
        f[1] = vnet::GSO_UDP_L4;
        f[4..6].copy_from_slice(&size.to_le_bytes());
        let l3 = 12 + 14;
        let l4 = l3 + if v6 { 40 } else { 20 };
        f.truncate(l4);
        let udp_len = 8 + payload.len();
        if v6 {
            f[l3 + 6] = 17;
            write_u16(&mut f[l3..], 4, udp_len as u16);
        } else {
            f[l3 + 9] = 17;
            write_u16(&mut f[l3..], 2, (20 + udp_len) as u16);
        }
        f.extend_from_slice(&40000u16.to_be_bytes());
        f.extend_from_slice(&4433u16.to_be_bytes());
        f.extend_from_slice(&(udp_len as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(payload);
        f
    }

    fn check_datagrams(v6: bool) {
        let payload: Vec<u8> = (0..3_500u32).map(|i| (i * 13 % 251) as u8).collect();
        let frame = udp_frame(v6, &payload, 1_200);
        let mut out = vec![0u8; 16 * 1024];
        let s = super_frame(&frame, 8, &mut out).unwrap();
        let headers = 14 + if v6 { 40 } else { 20 } + 8;
        assert_eq!((s.count, s.stride), (3, 8 + headers + 1_200));
        let mut joined = Vec::new();
        for (i, seg) in out[..s.total].chunks(s.stride).enumerate() {
            let l3 = &seg[8 + 14..];
            let (pseudo, udp) = if v6 {
                let ip = Ipv6Packet::new_checked(l3).unwrap();
                let udp = &l3[40..ip.total_len()];
                let p = checksum::pseudo_header_v6(ip.src(), ip.dst(), 17, udp.len() as u32);
                (p, udp)
            } else {
                let ip = Ipv4Packet::new_checked(l3).unwrap();
                assert!(ip.verify_checksum(), "datagram {i} IPv4 checksum");
                assert_eq!(ip.total_len(), seg.len() - 8 - 14);
                let udp = &l3[20..ip.total_len()];
                let p = checksum::pseudo_header_v4(ip.src(), ip.dst(), 17, udp.len() as u32);
                (p, udp)
            };
            assert_eq!(usize::from(read_u16(udp, 4)), udp.len(), "UDP length");
            assert_eq!(read_u16(udp, 2), 4433);
            assert_eq!(
                checksum::fold(checksum::accumulate(pseudo, udp)),
                0xffff,
                "datagram {i} UDP checksum"
            );
            joined.extend_from_slice(&udp[8..]);
        }
        assert_eq!(joined, payload, "the datagrams, in order");
    }

    #[test]
    fn a_udp_super_frame_becomes_its_datagrams_ipv4() {
        check_datagrams(false);
    }

    #[test]
    fn a_udp_super_frame_becomes_its_datagrams_ipv6() {
        check_datagrams(true);
    }

    #[test]
    fn refuses_what_it_cannot_segment() {
        let frame = tcp_frame(false, &[1; 3000], 1448);
        let mut small = vec![0u8; 100];
        assert_eq!(
            super_frame(&frame, 0, &mut small),
            Err(SegmentError::NoRoom)
        );
        let mut plain = frame.clone();
        plain[1] = vnet::GSO_NONE;
        let mut out = vec![0u8; 8192];
        assert_eq!(super_frame(&plain, 0, &mut out), Err(SegmentError::NotGso));
        let mut no_mss = frame.clone();
        no_mss[4..6].fill(0);
        assert_eq!(super_frame(&no_mss, 0, &mut out), Err(SegmentError::NotGso));
        assert_eq!(
            super_frame(&frame[..40], 0, &mut out),
            Err(SegmentError::Malformed)
        );
        // Arbitrary truncations never panic.
        for cut in 0..frame.len() {
            let _ = super_frame(&frame[..cut], 8, &mut out);
        }
    }
}
