//! Switchyard's cluster configuration: the `config.yaml` key of the `switchyard-config`
//! ConfigMap.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

pub use switchyard_api::{Backend, BackendKind, ExtraRoute, Masquerade, PortRange};

/// The cluster-wide settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// IPv4 range pod CIDRs are allocated from.
    #[serde(rename = "clusterCIDR", default)]
    pub cluster_cidr: Option<IpNet>,
    /// IPv6 range pod CIDRs are allocated from.
    #[serde(rename = "clusterCIDRv6", default)]
    pub cluster_cidr_v6: Option<IpNet>,
    /// Prefix length of each node's IPv4 pod CIDR.
    #[serde(rename = "nodeCIDRMaskSize", default = "default_mask")]
    pub node_cidr_mask_size: u8,
    /// Prefix length of each node's IPv6 pod CIDR.
    #[serde(rename = "nodeCIDRMaskSizeV6", default = "default_mask_v6")]
    pub node_cidr_mask_size_v6: u8,
    /// Encapsulation between nodes.
    #[serde(default)]
    pub backend: Backend,
    /// Pod MTU; otherwise the uplink's MTU less the backend's overhead.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// Masquerade of pod traffic leaving the cluster.
    #[serde(default)]
    pub masquerade: Masquerade,
    /// Routes every node's stack gets (`[{dst, via}]`).
    #[serde(default)]
    pub routes: Vec<ExtraRoute>,
    /// The Services' virtual address range(s), as the API server's
    /// `--service-cluster-ip-range` (never masqueraded).
    #[serde(rename = "serviceCIDR", default, deserialize_with = "one_or_many")]
    pub service_cidrs: Vec<IpNet>,
    /// The range node ports are allocated from (`"30000-32767"`).
    #[serde(rename = "nodePortRange", default = "default_node_ports")]
    pub node_port_range: PortRange,
    /// The largest Maglev table a Service port gets (a prime).
    #[serde(rename = "maglevTableSize", default = "default_maglev")]
    pub maglev_table_size: u32,
}

fn default_node_ports() -> PortRange {
    PortRange {
        first: 30000,
        last: 32767,
    }
}

fn default_maglev() -> u32 {
    16381
}

/// `serviceCIDR: 10.96.0.0/12` or `serviceCIDR: [10.96.0.0/12, fd00:96::/112]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(IpNet),
        Many(Vec<IpNet>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(n) => vec![n],
        OneOrMany::Many(v) => v,
    })
}

fn default_mask() -> u8 {
    24
}

fn default_mask_v6() -> u8 {
    64
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            cluster_cidr: None,
            cluster_cidr_v6: None,
            node_cidr_mask_size: default_mask(),
            node_cidr_mask_size_v6: default_mask_v6(),
            backend: Backend::default(),
            mtu: None,
            masquerade: Masquerade::default(),
            routes: Vec::new(),
            service_cidrs: Vec::new(),
            node_port_range: default_node_ports(),
            maglev_table_size: default_maglev(),
        }
    }
}

impl ClusterConfig {
    /// Parses and checks `config.yaml`; the error names the field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let config: ClusterConfig = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        for (field, cidr, mask, v6) in [
            (
                "clusterCIDR",
                config.cluster_cidr,
                config.node_cidr_mask_size,
                false,
            ),
            (
                "clusterCIDRv6",
                config.cluster_cidr_v6,
                config.node_cidr_mask_size_v6,
                true,
            ),
        ] {
            let Some(cidr) = cidr else { continue };
            if cidr.addr().is_ipv6() != v6 {
                return Err(format!(
                    "{field}: {cidr} is not an IPv{} range",
                    if v6 { 6 } else { 4 }
                ));
            }
            if cidr.trunc() != cidr {
                return Err(format!(
                    "{field}: {cidr} has host bits set (did you mean {}?)",
                    cidr.trunc()
                ));
            }
            if mask < cidr.prefix_len() || mask > cidr.max_prefix_len() {
                return Err(format!("node mask /{mask} does not fit in {field} {cidr}"));
            }
        }
        let m = config.maglev_table_size;
        let prime = (2..)
            .take_while(|d| d * d <= m)
            .all(|d| !m.is_multiple_of(d));
        if !(251..=131_071).contains(&m) || !prime {
            return Err(format!(
                "maglevTableSize: {m} must be a prime from 251 to 131071 (16381 by default)"
            ));
        }
        if let Some(mtu) = config.mtu {
            if !(576..=65_521).contains(&mtu) {
                return Err(format!("mtu: {mtu} is out of range 576..=65521"));
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_errors() {
        let c = ClusterConfig::parse("clusterCIDR: 10.244.0.0/16\n").unwrap();
        assert_eq!(c.backend, Backend::default());
        assert_eq!(
            (c.node_cidr_mask_size, c.backend.port, c.backend.vni),
            (24, 4789, 1)
        );
        let c = ClusterConfig::parse("backend: {type: ipip}\nmtu: 1480\n").unwrap();
        assert_eq!(c.backend.kind, BackendKind::Ipip);
        let c = ClusterConfig::parse(
            "masquerade:\n  nonMasqueradeCIDRs: [10.0.0.0/8]\n  masqLinkLocal: true\n  portRange: \"40000-40999\"\n",
        )
        .unwrap();
        assert_eq!(c.masquerade.port_range.to_string(), "40000-40999");
        assert!(c.masquerade.masq_link_local);
        assert_eq!(
            ClusterConfig::parse("")
                .unwrap()
                .masquerade
                .port_range
                .first,
            61000
        );
        let bad = ClusterConfig::parse("masquerade: {portRange: \"70-20\"}\n").unwrap_err();
        assert!(bad.contains("port range"), "{bad}");
        let bad = ClusterConfig::parse("backend: {type: gre}\n").unwrap_err();
        assert!(bad.contains("backend") && bad.contains("gre"), "{bad}");
        assert!(ClusterConfig::parse("clusterCIDR: 10.244.0.1/16\n")
            .unwrap_err()
            .contains("host bits"));
        assert!(ClusterConfig::parse("clusterCIDR: 10.244.0.0/16\nnodeCIDRMaskSize: 8\n").is_err());
        assert!(ClusterConfig::parse("clusterCIDRv6: 10.0.0.0/8\n").is_err());
        assert!(ClusterConfig::parse("typo: 1\n")
            .unwrap_err()
            .contains("typo"));
    }
}
