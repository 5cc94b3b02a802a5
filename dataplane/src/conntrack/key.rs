//! A flow's tuple in either address family, as the Service and policy tables key it.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;

/// One direction of a flow: protocol, addresses and ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct FlowKey {
    /// IP protocol.
    pub protocol: u8,
    /// Source address.
    pub src: IpAddr,
    /// Source port.
    pub src_port: u16,
    /// Destination address.
    pub dst: IpAddr,
    /// Destination port.
    pub dst_port: u16,
}

fn words(addr: IpAddr) -> u128 {
    match addr {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

impl Hash for FlowKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let (s, d) = (words(self.src), words(self.dst));
        state.write_u64((s as u64) ^ ((s >> 64) as u64).rotate_left(17));
        state.write_u64((d as u64) ^ ((d >> 64) as u64).rotate_left(17));
        state.write_u64(
            (u64::from(self.protocol) << 32)
                | (u64::from(self.src_port) << 16)
                | u64::from(self.dst_port),
        );
    }
}

impl FlowKey {
    /// The same flow seen from the other end.
    #[inline]
    pub fn reversed(&self) -> Self {
        Self {
            protocol: self.protocol,
            src: self.dst,
            src_port: self.dst_port,
            dst: self.src,
            dst_port: self.src_port,
        }
    }
}
