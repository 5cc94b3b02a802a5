//! ARP for IPv4 over Ethernet (RFC 826).

use super::{read_u16, write_u16, WireError};
use std::net::Ipv4Addr;
use switchyard_api::MacAddr;

/// Length of an Ethernet/IPv4 ARP packet.
pub const PACKET_LEN: usize = 28;
/// Operation code of a request.
pub const OP_REQUEST: u16 = 1;
/// Operation code of a reply.
pub const OP_REPLY: u16 = 2;

/// A view of an Ethernet/IPv4 ARP packet.
#[derive(Debug)]
pub struct ArpPacket<T> {
    buf: T,
}

impl<T: AsRef<[u8]>> ArpPacket<T> {
    /// Wraps `buf`, checking length and that it is Ethernet/IPv4 ARP.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        let b = buf.as_ref();
        if b.len() < PACKET_LEN {
            return Err(WireError::Truncated);
        }
        if read_u16(b, 0) != 1 || read_u16(b, 2) != 0x0800 || b[4] != 6 || b[5] != 4 {
            return Err(WireError::Malformed);
        }
        Ok(Self { buf })
    }

    /// Operation (request or reply).
    pub fn operation(&self) -> u16 {
        read_u16(self.buf.as_ref(), 6)
    }

    /// Sender hardware address.
    pub fn sender_mac(&self) -> MacAddr {
        MacAddr(self.buf.as_ref()[8..14].try_into().unwrap_or_default())
    }

    /// Sender protocol address.
    pub fn sender_ip(&self) -> Ipv4Addr {
        ipv4_at(self.buf.as_ref(), 14)
    }

    /// Target hardware address.
    pub fn target_mac(&self) -> MacAddr {
        MacAddr(self.buf.as_ref()[18..24].try_into().unwrap_or_default())
    }

    /// Target protocol address.
    pub fn target_ip(&self) -> Ipv4Addr {
        ipv4_at(self.buf.as_ref(), 24)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> ArpPacket<T> {
    /// Turns a request into the reply saying `target_ip` is at `answer_mac`, in place.
    pub fn make_reply(&mut self, answer_mac: MacAddr) {
        let sender_mac = self.sender_mac();
        let sender_ip = self.sender_ip();
        let target_ip = self.target_ip();
        let b = self.buf.as_mut();
        write_u16(b, 6, OP_REPLY);
        b[8..14].copy_from_slice(&answer_mac.0);
        b[14..18].copy_from_slice(&target_ip.octets());
        b[18..24].copy_from_slice(&sender_mac.0);
        b[24..28].copy_from_slice(&sender_ip.octets());
    }
}

fn ipv4_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// "Who has 169.254.1.1? Tell 10.244.0.5" from 0a:58:0a:f4:00:05.
    static REQUEST: [u8; 28] = [
        0x00, 0x01, 0x08, 0x00, 0x06, 0x04, 0x00, 0x01, // Ethernet/IPv4, request
        0x0a, 0x58, 0x0a, 0xf4, 0x00, 0x05, 10, 244, 0, 5, // sender
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 169, 254, 1, 1, // target
    ];

    #[test]
    fn parse_request() {
        let p = ArpPacket::new_checked(&REQUEST[..]).unwrap();
        assert_eq!(p.operation(), OP_REQUEST);
        assert_eq!(p.sender_ip(), Ipv4Addr::new(10, 244, 0, 5));
        assert_eq!(p.target_ip(), Ipv4Addr::new(169, 254, 1, 1));
        assert_eq!(p.sender_mac().to_string(), "0a:58:0a:f4:00:05");
    }

    #[test]
    fn reply_in_place() {
        let mut buf = REQUEST;
        ArpPacket::new_checked(&mut buf[..])
            .unwrap()
            .make_reply(MacAddr([0xee; 6]));
        let p = ArpPacket::new_checked(&buf[..]).unwrap();
        assert_eq!(p.operation(), OP_REPLY);
        assert_eq!(p.sender_mac(), MacAddr([0xee; 6]));
        assert_eq!(p.sender_ip(), Ipv4Addr::new(169, 254, 1, 1));
        assert_eq!(p.target_ip(), Ipv4Addr::new(10, 244, 0, 5));
        assert_eq!(p.target_mac().to_string(), "0a:58:0a:f4:00:05");
    }

    #[test]
    fn rejects_other_hardware() {
        let mut buf = REQUEST;
        buf[1] = 6; // IEEE 802
        assert_eq!(
            ArpPacket::new_checked(&buf[..]).unwrap_err(),
            WireError::Malformed
        );
        assert_eq!(
            ArpPacket::new_checked(&REQUEST[..27]).unwrap_err(),
            WireError::Truncated
        );
    }
}
