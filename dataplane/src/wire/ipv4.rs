//! IPv4 headers (RFC 791).

use super::checksum;
use super::{read_u16, write_u16, WireError};
use std::net::Ipv4Addr;

/// Length of a header without options.
pub const MIN_HEADER_LEN: usize = 20;
/// Protocol number of ICMP.
pub const PROTO_ICMP: u8 = 1;
/// Protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// Protocol number of UDP.
pub const PROTO_UDP: u8 = 17;
/// Protocol number of SCTP (its header starts with the two ports, as UDP's does).
pub const PROTO_SCTP: u8 = 132;

/// A view of an IPv4 header. `new_checked` guarantees that the header, with its options,
/// fits in the buffer, but not the total length it declares: the view for a packet quoted
/// in an ICMP error, which carries only the start of the original. Setters that change an
/// address update the header checksum incrementally.
#[derive(Debug)]
pub struct Ipv4Header<T> {
    buf: T,
}

/// A view of a whole IPv4 packet: an [`Ipv4Header`] (every header accessor, through
/// `Deref`) whose declared total length also fits in the buffer, so that its payload can
/// be read.
#[derive(Debug)]
pub struct Ipv4Packet<T>(Ipv4Header<T>);

impl<T: AsRef<[u8]>> Ipv4Header<T> {
    /// Wraps `buf` after checking version and header length.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < MIN_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if b[0] >> 4 != 4 {
            return Err(WireError::Malformed);
        }
        let header_len = usize::from(b[0] & 0x0f) * 4;
        if header_len < MIN_HEADER_LEN || usize::from(read_u16(b, 2)) < header_len {
            return Err(WireError::Malformed);
        }
        if b.len() < header_len {
            return Err(WireError::Truncated);
        }
        Ok(Self { buf })
    }

    /// The buffer back.
    pub fn into_inner(self) -> T {
        self.buf
    }

    /// The whole buffer, header first.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.as_ref()
    }

    /// Header length in bytes, options included.
    pub fn header_len(&self) -> usize {
        usize::from(self.buf.as_ref()[0] & 0x0f) * 4
    }

    /// Total length the header declares.
    pub fn total_len(&self) -> usize {
        usize::from(read_u16(self.buf.as_ref(), 2))
    }

    /// The don't-fragment flag.
    pub fn dont_fragment(&self) -> bool {
        self.buf.as_ref()[6] & 0x40 != 0
    }

    /// True for any fragment but the first (offset non-zero).
    pub fn is_later_fragment(&self) -> bool {
        read_u16(self.buf.as_ref(), 6) & 0x1fff != 0
    }

    /// True for a fragment of any kind (more fragments, or an offset).
    pub fn is_fragment(&self) -> bool {
        read_u16(self.buf.as_ref(), 6) & 0x3fff != 0
    }

    /// Identification.
    pub fn ident(&self) -> u16 {
        read_u16(self.buf.as_ref(), 4)
    }

    /// Time to live.
    pub fn ttl(&self) -> u8 {
        self.buf.as_ref()[8]
    }

    /// Protocol of the payload.
    pub fn protocol(&self) -> u8 {
        self.buf.as_ref()[9]
    }

    /// Header checksum field.
    pub fn checksum(&self) -> u16 {
        read_u16(self.buf.as_ref(), 10)
    }

    /// Source address.
    pub fn src(&self) -> Ipv4Addr {
        let b = self.buf.as_ref();
        Ipv4Addr::new(b[12], b[13], b[14], b[15])
    }

    /// Destination address.
    pub fn dst(&self) -> Ipv4Addr {
        let b = self.buf.as_ref();
        Ipv4Addr::new(b[16], b[17], b[18], b[19])
    }

    /// True when the header checksum is right.
    pub fn verify_checksum(&self) -> bool {
        checksum::fold(checksum::accumulate(
            0,
            &self.buf.as_ref()[..self.header_len()],
        )) == 0xffff
    }

    /// What follows the header in the buffer, up to the declared total length when the
    /// buffer holds it (a quoted packet may hold less).
    pub fn rest(&self) -> &[u8] {
        let b = self.buf.as_ref();
        &b[self.header_len()..self.total_len().clamp(self.header_len(), b.len())]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Header<T> {
    /// Decrements the TTL and updates the header checksum incrementally.
    /// The caller checks that the TTL is above 1 first.
    pub fn decrement_ttl(&mut self) {
        let b = self.buf.as_mut();
        let old = read_u16(b, 8);
        let new = old.wrapping_sub(0x0100);
        write_u16(b, 8, new);
        let check = checksum::update_word(read_u16(b, 10), old, new);
        write_u16(b, 10, check);
    }

    /// Recomputes the header checksum from scratch.
    pub fn fill_checksum(&mut self) {
        let len = self.header_len();
        let b = self.buf.as_mut();
        write_u16(b, 10, 0);
        let check = checksum::checksum(&b[..len]);
        write_u16(b, 10, check);
    }

    /// Sets the source address, updating the header checksum incrementally; returns the
    /// address it replaced (for the transport checksum's pseudo-header).
    pub fn set_src(&mut self, addr: Ipv4Addr) -> Ipv4Addr {
        self.set_address(12, addr)
    }

    /// Sets the destination address, likewise.
    pub fn set_dst(&mut self, addr: Ipv4Addr) -> Ipv4Addr {
        self.set_address(16, addr)
    }

    fn set_address(&mut self, at: usize, addr: Ipv4Addr) -> Ipv4Addr {
        let b = self.buf.as_mut();
        let old = Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3]);
        let check = checksum::update_address(read_u16(b, 10), old.octets(), addr.octets());
        write_u16(b, 10, check);
        b[at..at + 4].copy_from_slice(&addr.octets());
        old
    }

    /// The header and what follows it in the buffer, both mutable.
    pub fn split_mut(&mut self) -> (&mut [u8], &mut [u8]) {
        let len = self.header_len();
        self.buf.as_mut().split_at_mut(len)
    }
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    /// Wraps `buf` after checking version, header length and total length.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let header = Ipv4Header::new_checked(buf)?;
        if header.as_bytes().len() < header.total_len() {
            return Err(WireError::Truncated);
        }
        Ok(Self(header))
    }

    /// The buffer back.
    pub fn into_inner(self) -> T {
        self.0.into_inner()
    }

    /// The payload, up to the declared total length.
    pub fn payload(&self) -> &[u8] {
        &self.0.as_bytes()[self.header_len()..self.total_len()]
    }
}

impl<T> std::ops::Deref for Ipv4Packet<T> {
    type Target = Ipv4Header<T>;

    fn deref(&self) -> &Ipv4Header<T> {
        &self.0
    }
}

impl<T> std::ops::DerefMut for Ipv4Packet<T> {
    fn deref_mut(&mut self) -> &mut Ipv4Header<T> {
        &mut self.0
    }
}

/// Writes a 20-byte header (no options, DF clear, checksum filled) at the start of `buf`.
/// `buf` must hold at least [`MIN_HEADER_LEN`] bytes.
pub fn emit_header(
    buf: &mut [u8],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    payload_len: usize,
    ttl: u8,
) {
    let total = (MIN_HEADER_LEN + payload_len).min(usize::from(u16::MAX)) as u16;
    buf[0] = 0x45;
    buf[1] = 0;
    write_u16(buf, 2, total);
    write_u16(buf, 4, 0);
    write_u16(buf, 6, 0);
    buf[8] = ttl;
    buf[9] = protocol;
    write_u16(buf, 10, 0);
    buf[12..16].copy_from_slice(&src.octets());
    buf[16..20].copy_from_slice(&dst.octets());
    let check = checksum::checksum(&buf[..MIN_HEADER_LEN]);
    write_u16(buf, 10, check);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ICMP echo request 10.244.0.5 -> 10.244.0.6, TTL 64, DF, 8 bytes of ICMP.
    static PACKET: [u8; 28] = [
        0x45, 0x00, 0x00, 0x1c, 0x12, 0x34, 0x40, 0x00, 0x40, 0x01, 0x00,
        0x00, // csum filled below
        10, 244, 0, 5, 10, 244, 0, 6, //
        0x08, 0x00, 0xf7, 0xff, 0x00, 0x00, 0x00, 0x00,
    ];

    fn packet() -> [u8; 28] {
        let mut p = PACKET;
        Ipv4Packet::new_checked(&mut p[..]).unwrap().fill_checksum();
        p
    }

    #[test]
    fn deconstruct() {
        let bytes = packet();
        let p = Ipv4Packet::new_checked(&bytes[..]).unwrap();
        assert_eq!(p.header_len(), 20);
        assert_eq!(p.total_len(), 28);
        assert!(p.dont_fragment());
        assert!(!p.is_later_fragment());
        assert_eq!(p.ttl(), 64);
        assert_eq!(p.protocol(), PROTO_ICMP);
        assert_eq!(p.src(), Ipv4Addr::new(10, 244, 0, 5));
        assert_eq!(p.dst(), Ipv4Addr::new(10, 244, 0, 6));
        assert!(p.verify_checksum());
        assert_eq!(p.payload().len(), 8);
    }

    #[test]
    fn ttl_decrement_keeps_checksum_valid() {
        let mut bytes = packet();
        let mut p = Ipv4Packet::new_checked(&mut bytes[..]).unwrap();
        for expected in (1..64).rev() {
            p.decrement_ttl();
            assert_eq!(p.ttl(), expected);
            assert!(p.verify_checksum());
        }
    }

    #[test]
    fn rejects_bad_headers() {
        let bytes = packet();
        assert_eq!(
            Ipv4Packet::new_checked(&bytes[..19]).unwrap_err(),
            WireError::Truncated
        );
        assert_eq!(
            Ipv4Packet::new_checked(&bytes[..27]).unwrap_err(),
            WireError::Truncated
        );
        let mut v6 = bytes;
        v6[0] = 0x65;
        assert_eq!(
            Ipv4Packet::new_checked(&v6[..]).unwrap_err(),
            WireError::Malformed
        );
        let mut short_ihl = bytes;
        short_ihl[0] = 0x44;
        assert_eq!(
            Ipv4Packet::new_checked(&short_ihl[..]).unwrap_err(),
            WireError::Malformed
        );
        let mut long_ihl = bytes;
        long_ihl[0] = 0x4f; // 60-byte header in a 28-byte packet
        assert!(Ipv4Packet::new_checked(&long_ihl[..]).is_err());
    }

    #[test]
    fn emit_matches_parse() {
        let mut buf = [0u8; 20];
        emit_header(
            &mut buf,
            Ipv4Addr::new(169, 254, 1, 1),
            Ipv4Addr::new(10, 0, 0, 1),
            PROTO_ICMP,
            0,
            64,
        );
        let p = Ipv4Packet::new_checked(&buf[..]).unwrap();
        assert!(p.verify_checksum());
        assert_eq!(p.src(), Ipv4Addr::new(169, 254, 1, 1));
        assert_eq!(p.total_len(), 20);
    }
}
