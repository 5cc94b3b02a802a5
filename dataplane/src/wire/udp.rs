//! UDP headers (RFC 768). Also the view of the first 8 bytes of any transport header that
//! starts with two ports (TCP's as quoted in an ICMP error, which may carry only those).

use super::{read_u16, write_u16, WireError};

/// Header length.
pub const HEADER_LEN: usize = 8;
/// Where the checksum field is.
pub const CHECKSUM_OFFSET: usize = 6;

/// A view of a UDP datagram. `new_checked` guarantees the 8-byte header is there.
#[derive(Debug)]
pub struct UdpPacket<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> UdpPacket<T> {
    /// Wraps `buf` after checking it holds the header.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        if buf.as_ref().len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(Self { buf })
    }

    /// Source port.
    pub fn src_port(&self) -> u16 {
        read_u16(self.buf.as_ref(), 0)
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        read_u16(self.buf.as_ref(), 2)
    }

    /// Length field (header and payload).
    pub fn len(&self) -> usize {
        usize::from(read_u16(self.buf.as_ref(), 4))
    }

    /// True when the length field says there is no payload.
    pub fn is_empty(&self) -> bool {
        self.len() <= HEADER_LEN
    }

    /// Checksum field; 0 means "none" over IPv4.
    pub fn checksum(&self) -> u16 {
        read_u16(self.buf.as_ref(), CHECKSUM_OFFSET)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpPacket<T> {
    /// Sets the source port (the checksum is the caller's).
    pub fn set_src_port(&mut self, port: u16) {
        write_u16(self.buf.as_mut(), 0, port)
    }

    /// Sets the destination port (the checksum is the caller's).
    pub fn set_dst_port(&mut self, port: u16) {
        write_u16(self.buf.as_mut(), 2, port)
    }

    /// Sets the length field.
    pub fn set_len(&mut self, len: u16) {
        write_u16(self.buf.as_mut(), 4, len)
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, check: u16) {
        write_u16(self.buf.as_mut(), CHECKSUM_OFFSET, check)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deconstruct_and_set() {
        let mut bytes = [0xd2, 0x04, 0x00, 0x35, 0x00, 0x0a, 0xab, 0xcd, b'h', b'i'];
        let mut u = UdpPacket::new_checked(&mut bytes[..]).unwrap();
        assert_eq!((u.src_port(), u.dst_port()), (53764, 53));
        assert_eq!(u.len(), 10);
        assert!(!u.is_empty());
        assert_eq!(u.checksum(), 0xabcd);
        u.set_src_port(1);
        u.set_dst_port(2);
        u.set_len(8);
        u.set_checksum(0);
        assert_eq!(&bytes[..8], &[0, 1, 0, 2, 0, 8, 0, 0]);
        assert_eq!(
            UdpPacket::new_checked(&bytes[..7]).unwrap_err(),
            WireError::Truncated
        );
    }
}
