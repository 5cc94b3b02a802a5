//! What the fast path needs to masquerade: the connection-tracking table, the node's
//! address, and the destinations that are never masqueraded (the cluster's pod networks,
//! the node's own addresses, `nonMasqueradeCIDRs`, link-local unless asked).

use crate::conntrack::Conntrack;
use std::net::Ipv4Addr;
use std::sync::Arc;
use switchyard_api::IpNet;

/// Masquerade state published with the tables.
pub struct Masquerading {
    /// The shared connection-tracking table (kept across table publications).
    pub conntrack: Arc<Conntrack>,
    /// IPv4 networks (address, mask) never masqueraded to.
    exempt: Vec<(u32, u32)>,
}

impl Masquerading {
    /// Masquerading through `conntrack`, except toward `exempt` (IPv6 entries ignored:
    /// IPv6 pods are not masqueraded).
    pub fn new(conntrack: Arc<Conntrack>, exempt: &[IpNet]) -> Self {
        let exempt = exempt
            .iter()
            .filter_map(|n| match n {
                IpNet::V4(n) => Some((u32::from(n.network()), u32::from(n.netmask()))),
                IpNet::V6(_) => None,
            })
            .collect();
        Self { conntrack, exempt }
    }

    /// The same masquerade over an empty table of its own with the same address, ports
    /// and bound: what a trace runs against, so that it opens no flow in the live table.
    pub fn detached(&self) -> Self {
        let ct = &self.conntrack;
        Self {
            conntrack: Arc::new(Conntrack::new(ct.node(), ct.port_range(), ct.limit())),
            exempt: self.exempt.clone(),
        }
    }

    /// The node's address, the masqueraded source.
    #[inline]
    pub fn node(&self) -> Ipv4Addr {
        self.conntrack.node()
    }

    /// True when pod traffic to `dst` is masqueraded.
    #[inline]
    pub fn applies_to(&self, dst: Ipv4Addr) -> bool {
        let d = u32::from(dst);
        !self.exempt.iter().any(|(net, mask)| d & mask == *net)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exempt_networks_are_not_masqueraded() {
        let ct = Arc::new(Conntrack::new(
            Ipv4Addr::new(192, 168, 1, 10),
            (40000, 40100),
            10,
        ));
        let nets: Vec<IpNet> = ["10.244.0.0/16", "169.254.0.0/16", "fd00::/8"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let m = Masquerading::new(ct, &nets);
        assert!(!m.applies_to(Ipv4Addr::new(10, 244, 3, 4)));
        assert!(!m.applies_to(Ipv4Addr::new(169, 254, 169, 254)));
        assert!(m.applies_to(Ipv4Addr::new(192, 168, 2, 10)));
        assert_eq!(m.node(), Ipv4Addr::new(192, 168, 1, 10));
    }
}
