//! The kernel arm in flannel's VXLAN layout: a `vxlan` device per node with static
//! routes, neighbours and fdb entries to every peer.

use super::*;

impl Cluster {
    /// Flannel's VXLAN layout in every node: a `vxlan` device with this node's pod CIDRs'
    /// first addresses, and for every other node a route, a neighbour and an fdb entry.
    pub(super) fn flannel_routes(&self) -> Result<()> {
        let mac = |i: usize| format!("0e:00:00:00:00:{:02x}", i + 1);
        for node in &self.nodes {
            let ns = &node.ns;
            let i = node.index;
            ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
            if self.options.external {
                // Flannel's masquerade for traffic leaving the cluster.
                ns.exec(&[
                    "iptables",
                    "-t",
                    "nat",
                    "-A",
                    "POSTROUTING",
                    "-s",
                    CLUSTER_CIDR,
                    "!",
                    "-d",
                    CLUSTER_CIDR,
                    "-j",
                    "MASQUERADE",
                    "--random-fully",
                ])?;
            }
            ns.exec(&[
                "ip",
                "link",
                "add",
                "flannel.1",
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                &node.ipv4.to_string(),
                "dstport",
                "4789",
                "nolearning",
                "dev",
                "eth0",
            ])?;
            ns.exec(&[
                "ip",
                "link",
                "set",
                "flannel.1",
                "address",
                &mac(i),
                "mtu",
                "1450",
                "up",
            ])?;
            ns.add_address("flannel.1", &format!("10.244.{i}.0/32"))?;
            ns.add_address("flannel.1", &format!("fd00:244:0:{i:x}::/128"))?;
            for peer in self.nodes.iter().filter(|p| p.index != i) {
                let j = peer.index;
                let (v4, v6) = pod_cidrs(j);
                let (gw4, gw6) = (format!("10.244.{j}.0"), format!("fd00:244:0:{j:x}::"));
                // Per family: the peer's pod CIDR via its flannel.1 address, which
                // resolves to its VTEP MAC.
                for (cidr, gw) in [(&v4, &gw4), (&v6, &gw6)] {
                    ns.exec(&[
                        "ip",
                        "route",
                        "add",
                        cidr,
                        "via",
                        gw,
                        "dev",
                        "flannel.1",
                        "onlink",
                    ])?;
                    ns.exec(&[
                        "ip",
                        "neigh",
                        "add",
                        gw,
                        "lladdr",
                        &mac(j),
                        "dev",
                        "flannel.1",
                        "nud",
                        "permanent",
                    ])?;
                }
                ns.exec(&[
                    "bridge",
                    "fdb",
                    "append",
                    &mac(j),
                    "dev",
                    "flannel.1",
                    "dst",
                    &peer.ipv4.to_string(),
                ])?;
            }
        }
        Ok(())
    }
}
