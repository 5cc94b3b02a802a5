//! TCP headers (RFC 9293).

use super::{read_u16, write_u16, WireError};

/// Length of a header without options.
pub const MIN_HEADER_LEN: usize = 20;
/// Where the checksum field is.
pub const CHECKSUM_OFFSET: usize = 16;
/// FIN flag.
pub const FLAG_FIN: u8 = 0x01;
/// SYN flag.
pub const FLAG_SYN: u8 = 0x02;
/// RST flag.
pub const FLAG_RST: u8 = 0x04;
/// PSH flag.
pub const FLAG_PSH: u8 = 0x08;
/// ACK flag.
pub const FLAG_ACK: u8 = 0x10;
/// CWR flag.
pub const FLAG_CWR: u8 = 0x80;

/// A view of a TCP segment. `new_checked` guarantees the header, with the options its data
/// offset declares, fits in the buffer.
#[derive(Debug)]
pub struct TcpPacket<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> TcpPacket<T> {
    /// Wraps `buf` after checking the data offset against its length.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < MIN_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let header_len = usize::from(b[12] >> 4) * 4;
        if header_len < MIN_HEADER_LEN {
            return Err(WireError::Malformed);
        }
        if b.len() < header_len {
            return Err(WireError::Truncated);
        }
        Ok(Self { buf })
    }

    /// The whole buffer, header first.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.as_ref()
    }

    /// Source port.
    pub fn src_port(&self) -> u16 {
        read_u16(self.buf.as_ref(), 0)
    }

    /// Destination port.
    pub fn dst_port(&self) -> u16 {
        read_u16(self.buf.as_ref(), 2)
    }

    /// Sequence number.
    pub fn seq(&self) -> u32 {
        let b = self.buf.as_ref();
        u32::from_be_bytes([b[4], b[5], b[6], b[7]])
    }

    /// Acknowledgement number.
    pub fn ack(&self) -> u32 {
        let b = self.buf.as_ref();
        u32::from_be_bytes([b[8], b[9], b[10], b[11]])
    }

    /// Header length in bytes, options included.
    pub fn header_len(&self) -> usize {
        usize::from(self.buf.as_ref()[12] >> 4) * 4
    }

    /// The low four bits beside the data offset: reserved bits and the AE (accurate ECN)
    /// flag.
    pub fn reserved_bits(&self) -> u8 {
        self.buf.as_ref()[12] & 0x0f
    }

    /// The flags byte (FIN, SYN, RST, PSH, ACK, URG, ECE, CWR).
    pub fn flags(&self) -> u8 {
        self.buf.as_ref()[13]
    }

    /// Receive window.
    pub fn window(&self) -> u16 {
        read_u16(self.buf.as_ref(), 14)
    }

    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        read_u16(self.buf.as_ref(), CHECKSUM_OFFSET)
    }

    /// Urgent pointer and options: what must be equal for two segments to merge, beside
    /// ports, acknowledgement, flags and window.
    pub fn urgent_and_options(&self) -> &[u8] {
        &self.buf.as_ref()[18..self.header_len()]
    }

    /// The payload.
    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[self.header_len()..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> TcpPacket<T> {
    /// Sets the source port (the checksum is the caller's).
    pub fn set_src_port(&mut self, port: u16) {
        write_u16(self.buf.as_mut(), 0, port)
    }

    /// Sets the destination port (the checksum is the caller's).
    pub fn set_dst_port(&mut self, port: u16) {
        write_u16(self.buf.as_mut(), 2, port)
    }

    /// Sets the sequence number.
    pub fn set_seq(&mut self, seq: u32) {
        self.buf.as_mut()[4..8].copy_from_slice(&seq.to_be_bytes())
    }

    /// Sets the flags byte.
    pub fn set_flags(&mut self, flags: u8) {
        self.buf.as_mut()[13] = flags
    }

    /// Sets the checksum field.
    pub fn set_checksum(&mut self, check: u16) {
        write_u16(self.buf.as_mut(), CHECKSUM_OFFSET, check)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 40000 -> 80, seq 1000, ack 1, 24-byte header (one MSS option), ACK|PSH, "hi".
    const SEGMENT: [u8; 26] = [
        0x9c, 0x40, 0x00, 0x50, 0, 0, 0x03, 0xe8, 0, 0, 0, 1, 0x60, 0x18, 0xff, 0xff, 0x12, 0x34,
        0, 0, 2, 4, 0x05, 0xb4, b'h', b'i',
    ];

    #[test]
    fn deconstruct_and_set() {
        let mut bytes = SEGMENT;
        let mut t = TcpPacket::new_checked(&mut bytes[..]).unwrap();
        assert_eq!((t.src_port(), t.dst_port()), (40000, 80));
        assert_eq!((t.seq(), t.ack()), (1000, 1));
        assert_eq!(t.header_len(), 24);
        assert_eq!(t.flags(), FLAG_ACK | FLAG_PSH);
        assert_eq!(t.window(), 0xffff);
        assert_eq!(t.checksum(), 0x1234);
        assert_eq!(t.urgent_and_options(), &[0, 0, 2, 4, 0x05, 0xb4]);
        assert_eq!(t.payload(), b"hi");
        t.set_src_port(1);
        t.set_dst_port(2);
        t.set_seq(7);
        t.set_flags(FLAG_ACK);
        t.set_checksum(0xbeef);
        assert_eq!(&bytes[..8], &[0, 1, 0, 2, 0, 0, 0, 7]);
        assert_eq!(bytes[13], FLAG_ACK);
        assert_eq!(&bytes[16..18], &[0xbe, 0xef]);
    }

    #[test]
    fn rejects_short_and_bad_offsets() {
        assert_eq!(
            TcpPacket::new_checked(&SEGMENT[..19]).unwrap_err(),
            WireError::Truncated
        );
        assert_eq!(
            TcpPacket::new_checked(&SEGMENT[..23]).unwrap_err(),
            WireError::Truncated
        );
        let mut bad = SEGMENT;
        bad[12] = 0x40;
        assert_eq!(
            TcpPacket::new_checked(&bad[..]).unwrap_err(),
            WireError::Malformed
        );
    }
}
