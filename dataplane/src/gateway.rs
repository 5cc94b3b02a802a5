//! The pods' gateway: the addresses every pod routes through, which the pipeline answers
//! ARP / ND for and the ports configure as the pods' default route. Shared by the tables
//! (what the pipeline answers) and the ports (what the pod interfaces are given).

use std::net::{Ipv4Addr, Ipv6Addr};
use switchyard_api::MacAddr;

/// The pods' gateway: the MAC and addresses the dataplane answers ARP / ND for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gateway {
    /// MAC of the gateway, answered for every ARP / ND request.
    pub mac: MacAddr,
    /// IPv4 gateway (link-local, like Calico's 169.254.1.1).
    pub ipv4: Ipv4Addr,
    /// IPv6 gateway (link-local fe80::1).
    pub ipv6: Ipv6Addr,
}

impl Default for Gateway {
    fn default() -> Self {
        Self {
            mac: MacAddr([0xee, 0xee, 0xee, 0xee, 0xee, 0xee]),
            ipv4: Ipv4Addr::new(169, 254, 1, 1),
            ipv6: Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1),
        }
    }
}
