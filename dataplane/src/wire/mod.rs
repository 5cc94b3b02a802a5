//! Typed, zero-copy views over packet bytes.
//!
//! Each protocol has a `Packet<T: AsRef<[u8]>>`-style view. `new_checked` validates lengths
//! once; afterwards no accessor can panic. Setters exist when `T: AsMut<[u8]>` and mutate the
//! buffer in place. No I/O and no `unsafe` here.

pub mod arp;
pub mod checksum;
pub mod ethernet;
pub mod icmp;
pub mod ipv4;
pub mod ipv6;
pub mod tcp;
pub mod udp;
pub mod vnet;
pub mod vxlan;

pub use arp::ArpPacket;
pub use ethernet::{EtherType, EthernetFrame};
pub use icmp::IcmpPacket;
pub use ipv4::{Ipv4Header, Ipv4Packet};
pub use ipv6::Ipv6Packet;
pub use tcp::TcpPacket;
pub use udp::UdpPacket;
pub use vnet::VnetHeader;
pub use vxlan::VxlanHeader;

/// Where the Ethernet header starts in a frame as every port delivers it: after the
/// virtio-net header.
pub const ETH_OFFSET: usize = vnet::HEADER_LEN;
/// Where the IP header starts in such a frame.
pub const L3_OFFSET: usize = vnet::HEADER_LEN + ethernet::HEADER_LEN;

/// A flow's protocol as listings name it: `tcp`, `udp`, `sctp`, `icmp` (ICMP and ICMPv6),
/// else its number.
pub fn protocol_name(protocol: u8) -> String {
    match protocol {
        ipv4::PROTO_ICMP | ipv6::NEXT_ICMPV6 => "icmp".into(),
        ipv4::PROTO_TCP => "tcp".into(),
        ipv4::PROTO_UDP => "udp".into(),
        ipv4::PROTO_SCTP => "sctp".into(),
        n => n.to_string(),
    }
}

/// The protocol a listing's name stands for (`tcp`, `udp`, `sctp`, `icmp`; `icmp` is
/// ICMP's number in both families).
pub fn protocol_number(name: &str) -> Option<u8> {
    match name.to_ascii_lowercase().as_str() {
        "tcp" => Some(ipv4::PROTO_TCP),
        "udp" => Some(ipv4::PROTO_UDP),
        "sctp" => Some(ipv4::PROTO_SCTP),
        "icmp" | "icmpv6" => Some(ipv4::PROTO_ICMP),
        _ => None,
    }
}

/// Why bytes could not be viewed as a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireError {
    /// Fewer bytes than the header (or the length it declares) needs.
    Truncated,
    /// A field holds a value the view does not accept (version, header length, ...).
    Malformed,
}

pub(crate) fn read_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

pub(crate) fn write_u16(buf: &mut [u8], at: usize, value: u16) {
    buf[at..at + 2].copy_from_slice(&value.to_be_bytes());
}
