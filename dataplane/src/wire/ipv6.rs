//! IPv6 fixed headers (RFC 8200).

use super::{read_u16, write_u16, WireError};
use std::net::Ipv6Addr;

/// Length of the fixed header.
pub const HEADER_LEN: usize = 40;
/// Next-header value of ICMPv6.
pub const NEXT_ICMPV6: u8 = 58;
/// The minimum link MTU of IPv6; ICMPv6 errors never exceed it.
pub const MIN_MTU: usize = 1280;

/// A view of an IPv6 packet. `new_checked` guarantees that the fixed header and the payload
/// length it declares fit in the buffer.
#[derive(Debug)]
pub struct Ipv6Packet<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    /// Wraps `buf` after checking version and payload length.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if b[0] >> 4 != 6 {
            return Err(WireError::Malformed);
        }
        if b.len() < HEADER_LEN + usize::from(read_u16(b, 4)) {
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

    /// Payload length the header declares.
    pub fn payload_len(&self) -> usize {
        usize::from(read_u16(self.buf.as_ref(), 4))
    }

    /// Header plus payload length.
    pub fn total_len(&self) -> usize {
        HEADER_LEN + self.payload_len()
    }

    /// Type of the next header.
    pub fn next_header(&self) -> u8 {
        self.buf.as_ref()[6]
    }

    /// Hop limit.
    pub fn hop_limit(&self) -> u8 {
        self.buf.as_ref()[7]
    }

    /// Source address.
    pub fn src(&self) -> Ipv6Addr {
        addr_at(self.buf.as_ref(), 8)
    }

    /// Destination address.
    pub fn dst(&self) -> Ipv6Addr {
        addr_at(self.buf.as_ref(), 24)
    }

    /// Wraps `buf` after checking only the version and the fixed header: for a packet
    /// quoted in an ICMPv6 error, which may carry only the start of the original. The
    /// payload accessors then stop at the end of the buffer.
    pub fn new_quoted(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if b[0] >> 4 != 6 {
            return Err(WireError::Malformed);
        }
        Ok(Self { buf })
    }

    /// The payload, up to the declared length (or the end of a quoted packet's buffer).
    pub fn payload(&self) -> &[u8] {
        let b = self.buf.as_ref();
        &b[HEADER_LEN..self.total_len().min(b.len())]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Packet<T> {
    /// Decrements the hop limit (IPv6 has no header checksum to update).
    pub fn decrement_hop_limit(&mut self) {
        let b = self.buf.as_mut();
        b[7] = b[7].wrapping_sub(1);
    }

    /// Sets the source address; returns the one it replaced (IPv6 has no header
    /// checksum; the transport checksum's pseudo-header is the caller's).
    pub fn set_src(&mut self, addr: Ipv6Addr) -> Ipv6Addr {
        let old = self.src();
        self.buf.as_mut()[8..24].copy_from_slice(&addr.octets());
        old
    }

    /// Sets the destination address, likewise.
    pub fn set_dst(&mut self, addr: Ipv6Addr) -> Ipv6Addr {
        let old = self.dst();
        self.buf.as_mut()[24..40].copy_from_slice(&addr.octets());
        old
    }

    /// The payload, mutable.
    pub fn payload_mut(&mut self) -> &mut [u8] {
        let end = self.total_len().min(self.buf.as_ref().len());
        &mut self.buf.as_mut()[HEADER_LEN..end]
    }
}

fn addr_at(b: &[u8], at: usize) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    octets.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(octets)
}

/// Writes a fixed header at the start of `buf` (at least [`HEADER_LEN`] bytes).
pub fn emit_header(
    buf: &mut [u8],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next_header: u8,
    payload_len: usize,
    hop_limit: u8,
) {
    buf[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
    write_u16(buf, 4, payload_len.min(usize::from(u16::MAX)) as u16);
    buf[6] = next_header;
    buf[7] = hop_limit;
    buf[8..24].copy_from_slice(&src.octets());
    buf[24..40].copy_from_slice(&dst.octets());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet() -> [u8; 48] {
        let mut b = [0u8; 48];
        emit_header(
            &mut b,
            "fd00::5".parse().unwrap(),
            "fd00::6".parse().unwrap(),
            NEXT_ICMPV6,
            8,
            64,
        );
        b
    }

    #[test]
    fn round_trip() {
        let mut bytes = packet();
        let mut p = Ipv6Packet::new_checked(&mut bytes[..]).unwrap();
        assert_eq!(p.payload_len(), 8);
        assert_eq!(p.next_header(), NEXT_ICMPV6);
        assert_eq!(p.src(), "fd00::5".parse::<Ipv6Addr>().unwrap());
        assert_eq!(p.dst(), "fd00::6".parse::<Ipv6Addr>().unwrap());
        p.decrement_hop_limit();
        assert_eq!(p.hop_limit(), 63);
        assert_eq!(p.payload().len(), 8);
    }

    #[test]
    fn rejects_bad_headers() {
        let bytes = packet();
        assert_eq!(
            Ipv6Packet::new_checked(&bytes[..47]).unwrap_err(),
            WireError::Truncated
        );
        let mut v4 = bytes;
        v4[0] = 0x45;
        assert_eq!(
            Ipv6Packet::new_checked(&v4[..]).unwrap_err(),
            WireError::Malformed
        );
    }
}
