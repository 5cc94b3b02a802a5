//! The node's ports published to pods (hostPort), looked up both ways: a connection to
//! node:hostPort goes to its pod, and the fast path recognises the pod's answers by their
//! source (pod address, protocol, container port) without a conntrack lookup for every
//! other packet.

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

/// Published ports, as a table snapshot holds them.
#[derive(Debug, Default, Clone)]
pub struct HostPorts {
    to_pod: HashMap<(u8, u16), (Ipv4Addr, u16)>,
    from_pod: HashSet<(Ipv4Addr, u8, u16)>,
}

impl HostPorts {
    /// From (protocol, node port) -> (pod address, pod port).
    pub fn new(to_pod: HashMap<(u8, u16), (Ipv4Addr, u16)>) -> Self {
        let from_pod = to_pod
            .iter()
            .map(|(&(protocol, _), &(pod, port))| (pod, protocol, port))
            .collect();
        Self { to_pod, from_pod }
    }

    /// True when no port is published (the fast path then skips every hostPort check).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.to_pod.is_empty()
    }

    /// The pod address and port published as node port `port` for `protocol`.
    #[inline]
    pub fn get(&self, protocol: u8, port: u16) -> Option<(Ipv4Addr, u16)> {
        self.to_pod.get(&(protocol, port)).copied()
    }

    /// True when `protocol` traffic from `pod`:`port` may be the answer of a published port.
    #[inline]
    pub fn publishes(&self, pod: Ipv4Addr, protocol: u8, port: u16) -> bool {
        self.from_pod.contains(&(pod, protocol, port))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_up_both_ways() {
        let pod = Ipv4Addr::new(10, 244, 0, 7);
        let h = HostPorts::new([((6, 8080), (pod, 80))].into_iter().collect());
        assert_eq!(h.get(6, 8080), Some((pod, 80)));
        assert_eq!(h.get(17, 8080), None);
        assert!(h.publishes(pod, 6, 80));
        assert!(!h.publishes(pod, 6, 8080));
        assert!(!h.is_empty() && HostPorts::default().is_empty());
    }
}
