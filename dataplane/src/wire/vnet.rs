//! The virtio-net header (`struct virtio_net_hdr_v1`, 12 bytes) that a TAP device opened with
//! `IFF_VNET_HDR` puts before every frame. It carries checksum and segmentation offload state,
//! so a 64 KiB TCP super-frame can cross the dataplane unsegmented. Fields are little-endian
//! (the host order on the machines Switchyard runs on; TUNSETVNETLE is not used).

use super::WireError;

/// Header length used on every port (`TUNSETVNETHDRSZ` = 12).
pub const HEADER_LEN: usize = 12;
/// `flags`: the L4 checksum is partial and must be completed from `csum_start`.
pub const F_NEEDS_CSUM: u8 = 1;
/// `flags`: the checksum was already validated.
pub const F_DATA_VALID: u8 = 2;
/// `gso_type`: not a GSO frame.
pub const GSO_NONE: u8 = 0;
/// `gso_type`: TCP over IPv4.
pub const GSO_TCPV4: u8 = 1;
/// `gso_type`: UDP fragmentation offload (legacy).
pub const GSO_UDP: u8 = 3;
/// `gso_type`: TCP over IPv6.
pub const GSO_TCPV6: u8 = 4;
/// `gso_type`: UDP segmentation (USO).
pub const GSO_UDP_L4: u8 = 5;
/// `gso_type` flag: TCP with ECN.
pub const GSO_ECN: u8 = 0x80;

/// A view of a virtio-net header.
#[derive(Debug)]
pub struct VnetHeader<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> VnetHeader<T> {
    /// Wraps `buf`, checking it holds a whole header.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        if buf.as_ref().len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(Self { buf })
    }

    fn le16(&self, at: usize) -> u16 {
        let b = self.buf.as_ref();
        u16::from_le_bytes([b[at], b[at + 1]])
    }

    /// Flags (`F_NEEDS_CSUM`, `F_DATA_VALID`).
    pub fn flags(&self) -> u8 {
        self.buf.as_ref()[0]
    }

    /// GSO type, without the ECN flag.
    pub fn gso_type(&self) -> u8 {
        self.buf.as_ref()[1] & !GSO_ECN
    }

    /// Length of the headers before the payload of each segment.
    pub fn hdr_len(&self) -> u16 {
        self.le16(2)
    }

    /// Payload bytes per segment of a GSO frame.
    pub fn gso_size(&self) -> u16 {
        self.le16(4)
    }

    /// Where checksumming starts, from the start of the Ethernet frame.
    pub fn csum_start(&self) -> u16 {
        self.le16(6)
    }

    /// Where the checksum goes, from `csum_start`.
    pub fn csum_offset(&self) -> u16 {
        self.le16(8)
    }

    /// True when this frame is a GSO super-frame.
    pub fn is_gso(&self) -> bool {
        self.gso_type() != GSO_NONE
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> VnetHeader<T> {
    /// Sets the flags byte.
    pub fn set_flags(&mut self, flags: u8) {
        self.buf.as_mut()[0] = flags;
    }

    /// Resets to "plain frame, checksums complete".
    pub fn clear(&mut self) {
        self.buf.as_mut()[..HEADER_LEN].fill(0);
    }

    /// Marks the frame a GSO super-frame of `gso_type` with a partial checksum: headers of
    /// `hdr_len` bytes (from the Ethernet header), segments of `gso_size` payload bytes,
    /// and, when given, the checksum's start (from the Ethernet header) and its offset
    /// from there.
    pub fn set_gso(
        &mut self,
        gso_type: u8,
        hdr_len: usize,
        gso_size: usize,
        csum: Option<(usize, usize)>,
    ) {
        let b = self.buf.as_mut();
        b[0] = F_NEEDS_CSUM;
        b[1] = gso_type;
        b[2..4].copy_from_slice(&(hdr_len as u16).to_le_bytes());
        b[4..6].copy_from_slice(&(gso_size as u16).to_le_bytes());
        if let Some((start, offset)) = csum {
            b[6..8].copy_from_slice(&(start as u16).to_le_bytes());
            b[8..10].copy_from_slice(&(offset as u16).to_le_bytes());
        }
    }
}

/// Completes a partial checksum (`F_NEEDS_CSUM` without GSO) in `frame` (virtio-net header
/// then Ethernet) and clears the flag, for a frame leaving through a port that cannot
/// finish it (an uplink socket). The checksum field holds the pseudo-header sum, as the
/// sending kernel left it. Returns false when the offsets point outside the frame.
pub fn finish_checksum(frame: &mut [u8]) -> bool {
    let Ok(h) = VnetHeader::new_checked(&*frame) else {
        return false;
    };
    if h.flags() & F_NEEDS_CSUM == 0 || h.is_gso() {
        return true;
    }
    let start = HEADER_LEN + usize::from(h.csum_start());
    let at = start + usize::from(h.csum_offset());
    if at + 2 > frame.len() {
        return false;
    }
    let sum = super::checksum::finish(super::checksum::accumulate(0, &frame[start..]));
    // UDP sends a computed zero as all ones (zero means "no checksum"); TCP never gets it.
    let sum = if sum == 0 { 0xffff } else { sum };
    frame[at..at + 2].copy_from_slice(&sum.to_be_bytes());
    frame[0] &= !F_NEEDS_CSUM;
    true
}

/// Checks the TCP or UDP checksum of `frame` (virtio-net header then Ethernet, IPv4, the
/// header cleared) as received from a device, and says what it found in the header:
/// `F_DATA_VALID` when it holds; `F_NEEDS_CSUM` (with its start and offset) when the field
/// holds the pseudo-header sum, as a sending kernel leaves it when it offloads the
/// checksum to a virtual device (a veth's peer does; a physical link never carries such
/// a packet); nothing otherwise (a fragment, another protocol, no UDP checksum, or a
/// wrong one, left for the receiver to find).
pub fn note_received_checksum(frame: &mut [u8]) {
    let l3_at = HEADER_LEN + super::ethernet::HEADER_LEN;
    let Some(l3) = frame.get(l3_at..) else {
        return;
    };
    let Ok(ip) = super::Ipv4Header::new_checked(l3) else {
        return;
    };
    let (header, total) = (ip.header_len(), ip.total_len());
    let offset = match ip.protocol() {
        super::ipv4::PROTO_TCP => 16,
        super::ipv4::PROTO_UDP => 6,
        _ => return,
    };
    if ip.is_fragment() || total > l3.len() || total < header + offset + 2 {
        return;
    }
    let l4 = &l3[header..total];
    let field = u16::from_be_bytes([l4[offset], l4[offset + 1]]);
    if offset == 6 && field == 0 {
        return;
    }
    let pseudo = super::checksum::pseudo_header_of(l3, ip.protocol(), l4.len() as u32);
    let flags = if super::checksum::fold(super::checksum::accumulate(pseudo, l4)) == 0xffff {
        F_DATA_VALID
    } else if field == super::checksum::fold(pseudo) {
        let start = super::ethernet::HEADER_LEN + header;
        frame[6..8].copy_from_slice(&(start as u16).to_le_bytes());
        frame[8..10].copy_from_slice(&(offset as u16).to_le_bytes());
        F_NEEDS_CSUM
    } else {
        return;
    };
    frame[0] = flags;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_checksum_fills_the_field() {
        // vnet NEEDS_CSUM, csum_start 34, offset 6 (UDP); IPv4 10.0.0.1 -> 10.0.0.2, UDP
        // 1000 -> 2000, payload "hi"; the field holds the pseudo-header sum.
        let mut f = vec![1, 0, 0, 0, 0, 0, 34, 0, 6, 0, 0, 0];
        f.extend_from_slice(&[0; 12]);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[
            0x45, 0, 0, 30, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ]);
        let pseudo = super::super::checksum::pseudo_header_v4(
            [10, 0, 0, 1].into(),
            [10, 0, 0, 2].into(),
            17,
            10,
        );
        let partial = super::super::checksum::fold(pseudo);
        f.extend_from_slice(&[0x03, 0xe8, 0x07, 0xd0, 0, 10]);
        f.extend_from_slice(&partial.to_be_bytes());
        f.extend_from_slice(b"hi");
        assert!(finish_checksum(&mut f));
        assert_eq!(f[0], 0);
        let udp = &f[12 + 14 + 20..];
        let full = super::super::checksum::finish(super::super::checksum::accumulate(pseudo, udp));
        assert_eq!(full, 0, "checksum verifies");
        f[6] = 200;
        f[0] = F_NEEDS_CSUM;
        assert!(!finish_checksum(&mut f));
    }

    /// A TCPv4 GSO header as the kernel writes it: NEEDS_CSUM, hdr_len 66, MSS 1448,
    /// csum_start 34 (14 + 20), csum_offset 16.
    static GSO: [u8; 12] = [1, 1, 66, 0, 0xa8, 0x05, 34, 0, 16, 0, 0, 0];

    #[test]
    fn parse_gso() {
        let h = VnetHeader::new_checked(&GSO[..]).unwrap();
        assert_eq!(h.flags(), F_NEEDS_CSUM);
        assert_eq!(h.gso_type(), GSO_TCPV4);
        assert!(h.is_gso());
        assert_eq!(h.hdr_len(), 66);
        assert_eq!(h.gso_size(), 1448);
        assert_eq!(h.csum_start(), 34);
        assert_eq!(h.csum_offset(), 16);
    }

    #[test]
    fn clear_makes_plain_frame() {
        let mut b = GSO;
        let mut h = VnetHeader::new_checked(&mut b[..]).unwrap();
        h.clear();
        assert!(!h.is_gso());
        assert_eq!(b, [0; 12]);
        assert!(VnetHeader::new_checked(&GSO[..11]).is_err());
    }

    /// A frame (cleared virtio-net header, Ethernet, IPv4 10.0.0.1 -> 10.0.0.2) carrying
    /// a UDP datagram 1000 -> 2000 "hi" whose checksum field is `check`.
    fn udp_frame(check: u16) -> Vec<u8> {
        let mut f = vec![0; 12];
        f.extend_from_slice(&[0; 12]);
        f.extend_from_slice(&[0x08, 0x00]);
        let mut ip = [
            0x45, 0, 0, 30, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let sum = super::super::checksum::checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&[0x03, 0xe8, 0x07, 0xd0, 0, 10]);
        f.extend_from_slice(&check.to_be_bytes());
        f.extend_from_slice(b"hi");
        f
    }

    #[test]
    fn a_received_checksum_is_found_valid_partial_or_left_alone() {
        use super::super::checksum::{accumulate, finish, fold, pseudo_header_v4};
        let pseudo = pseudo_header_v4([10, 0, 0, 1].into(), [10, 0, 0, 2].into(), 17, 10);
        let partial = fold(pseudo);
        let mut full = udp_frame(0);
        let sum = finish(accumulate(pseudo, &full[46..]));
        full[52..54].copy_from_slice(&sum.to_be_bytes());
        note_received_checksum(&mut full);
        assert_eq!(full[0], F_DATA_VALID, "a full checksum that holds");
        let mut half = udp_frame(partial);
        note_received_checksum(&mut half);
        assert_eq!(half[0], F_NEEDS_CSUM, "the pseudo-header sum: partial");
        assert_eq!(&half[6..10], &[34, 0, 6, 0], "start and offset");
        assert!(finish_checksum(&mut half));
        assert_eq!(half[52..54], full[52..54], "completed, it is the full one");
        let mut wrong = udp_frame(sum ^ 0x0101);
        note_received_checksum(&mut wrong);
        assert_eq!(wrong[0], 0, "a wrong checksum is the receiver's to find");
        let mut none = udp_frame(0);
        note_received_checksum(&mut none);
        assert_eq!(none[0], 0, "UDP without a checksum");
        let mut short = udp_frame(partial);
        short.truncate(40);
        note_received_checksum(&mut short);
        assert_eq!(short[0], 0, "a truncated packet");
    }
}
