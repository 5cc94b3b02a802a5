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
