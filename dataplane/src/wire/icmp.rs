//! ICMP (RFC 792) and ICMPv6 (RFC 4443) messages, with the neighbour-discovery messages of
//! RFC 4861 that the dataplane answers.

use super::{read_u16, write_u16, WireError};
use std::net::Ipv6Addr;
use switchyard_api::MacAddr;

/// Length of the ICMP header (type, code, checksum, 4 bytes of rest).
pub const HEADER_LEN: usize = 8;

/// ICMPv4 destination unreachable.
pub const V4_DEST_UNREACHABLE: u8 = 3;
/// ICMPv4 time exceeded.
pub const V4_TIME_EXCEEDED: u8 = 11;
/// ICMPv4 echo request.
pub const V4_ECHO_REQUEST: u8 = 8;
/// ICMPv4 echo reply.
pub const V4_ECHO_REPLY: u8 = 0;
/// ICMPv4 unreachable code: host unreachable.
pub const V4_CODE_HOST_UNREACHABLE: u8 = 1;
/// ICMPv4 unreachable code: fragmentation needed and DF set.
pub const V4_CODE_FRAG_NEEDED: u8 = 4;
/// ICMPv4 destination-unreachable code: port unreachable.
pub const V4_CODE_PORT_UNREACHABLE: u8 = 3;

/// ICMPv6 destination unreachable.
pub const V6_DEST_UNREACHABLE: u8 = 1;
/// ICMPv6 packet too big.
pub const V6_PACKET_TOO_BIG: u8 = 2;
/// ICMPv6 time exceeded.
pub const V6_TIME_EXCEEDED: u8 = 3;
/// ICMPv6 unreachable code: address unreachable.
pub const V6_CODE_ADDR_UNREACHABLE: u8 = 3;
/// ICMPv6 destination-unreachable code: port unreachable.
pub const V6_CODE_PORT_UNREACHABLE: u8 = 4;
/// ICMPv6 echo request.
pub const V6_ECHO_REQUEST: u8 = 128;
/// ICMPv6 echo reply.
pub const V6_ECHO_REPLY: u8 = 129;
/// ICMPv6 router solicitation.
pub const V6_ROUTER_SOLICIT: u8 = 133;
/// ICMPv6 neighbour solicitation.
pub const V6_NEIGHBOR_SOLICIT: u8 = 135;
/// ICMPv6 neighbour advertisement.
pub const V6_NEIGHBOR_ADVERT: u8 = 136;

/// True for ICMPv4 types that are errors (never answered with another error).
pub fn is_v4_error(kind: u8) -> bool {
    matches!(kind, 3 | 4 | 5 | 11 | 12)
}

/// True for ICMPv6 types that are errors (types below 128).
pub fn is_v6_error(kind: u8) -> bool {
    kind < 128
}

/// A view of an ICMP or ICMPv6 message.
#[derive(Debug)]
pub struct IcmpPacket<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> IcmpPacket<T> {
    /// Wraps `buf`, checking it holds the 8-byte header.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        if buf.as_ref().len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(Self { buf })
    }

    /// Message type.
    pub fn kind(&self) -> u8 {
        self.buf.as_ref()[0]
    }

    /// Message code.
    pub fn code(&self) -> u8 {
        self.buf.as_ref()[1]
    }

    /// Checksum field.
    pub fn checksum(&self) -> u16 {
        read_u16(self.buf.as_ref(), 2)
    }

    /// True for an ICMPv4 echo request or reply.
    pub fn is_v4_echo(&self) -> bool {
        matches!(self.kind(), V4_ECHO_REQUEST | V4_ECHO_REPLY)
    }

    /// For an echo request or reply: the identifier.
    pub fn echo_ident(&self) -> u16 {
        read_u16(self.buf.as_ref(), 4)
    }

    /// The message after the 8-byte header (for an error: the quoted packet).
    pub fn body(&self) -> &[u8] {
        &self.buf.as_ref()[HEADER_LEN..]
    }

    /// For a neighbour solicitation or advertisement: the target address.
    pub fn nd_target(&self) -> Option<Ipv6Addr> {
        let b = self.buf.as_ref();
        let octets: [u8; 16] = b.get(8..24)?.try_into().ok()?;
        Some(Ipv6Addr::from(octets))
    }
}

/// Length of a neighbour advertisement with a target link-layer address option.
pub const NEIGHBOR_ADVERT_LEN: usize = 32;

/// Writes a solicited neighbour advertisement for `target` at `mac` (router flag set) at the
/// start of `buf` (at least [`NEIGHBOR_ADVERT_LEN`] bytes). The checksum is left zero: the
/// caller fills it with the pseudo-header.
pub fn emit_neighbor_advert(buf: &mut [u8], target: Ipv6Addr, mac: MacAddr) {
    buf[0] = V6_NEIGHBOR_ADVERT;
    buf[1] = 0;
    write_u16(buf, 2, 0);
    buf[4..8].copy_from_slice(&[0xe0, 0, 0, 0]); // router, solicited, override
    buf[8..24].copy_from_slice(&target.octets());
    buf[24] = 2; // target link-layer address option
    buf[25] = 1; // length in units of 8 bytes
    buf[26..32].copy_from_slice(&mac.0);
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> IcmpPacket<T> {
    /// Sets the checksum field.
    pub fn set_checksum(&mut self, value: u16) {
        write_u16(self.buf.as_mut(), 2, value);
    }

    /// For an echo request or reply: sets the identifier (the checksum is the caller's).
    pub fn set_echo_ident(&mut self, ident: u16) {
        write_u16(self.buf.as_mut(), 4, ident);
    }

    /// The message after the 8-byte header, mutable.
    pub fn body_mut(&mut self) -> &mut [u8] {
        &mut self.buf.as_mut()[HEADER_LEN..]
    }

    /// Recomputes the checksum over the whole message (ICMPv4: no pseudo-header).
    pub fn fill_checksum_v4(&mut self) {
        self.set_checksum(0);
        let check = super::checksum::checksum(self.buf.as_ref());
        self.set_checksum(check);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Neighbour solicitation for fe80::1 (options omitted).
    static SOLICIT: [u8; 24] = [
        135, 0, 0x12, 0x34, 0, 0, 0, 0, //
        0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
    ];

    #[test]
    fn parse_solicit() {
        let p = IcmpPacket::new_checked(&SOLICIT[..]).unwrap();
        assert_eq!(p.kind(), V6_NEIGHBOR_SOLICIT);
        assert_eq!(p.checksum(), 0x1234);
        assert_eq!(p.nd_target(), Some("fe80::1".parse().unwrap()));
        assert_eq!(
            IcmpPacket::new_checked(&SOLICIT[..8]).unwrap().nd_target(),
            None
        );
        assert!(IcmpPacket::new_checked(&SOLICIT[..7]).is_err());
    }

    #[test]
    fn advert_layout() {
        let mut buf = [0u8; NEIGHBOR_ADVERT_LEN];
        emit_neighbor_advert(&mut buf, "fe80::1".parse().unwrap(), MacAddr([0xee; 6]));
        let p = IcmpPacket::new_checked(&buf[..]).unwrap();
        assert_eq!(p.kind(), V6_NEIGHBOR_ADVERT);
        assert_eq!(p.nd_target(), Some("fe80::1".parse().unwrap()));
        assert_eq!(&buf[24..32], &[2, 1, 0xee, 0xee, 0xee, 0xee, 0xee, 0xee]);
        assert!(is_v6_error(V6_PACKET_TOO_BIG) && !is_v6_error(V6_NEIGHBOR_ADVERT));
        assert!(is_v4_error(V4_TIME_EXCEEDED) && !is_v4_error(V4_ECHO_REQUEST));
    }
}
