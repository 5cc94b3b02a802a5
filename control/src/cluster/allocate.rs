//! Pod CIDR allocation for nodes whose manifest has none, as Kubernetes' node IPAM
//! controller does: the first free subnet of the cluster CIDR, in node-name order, keeping
//! what was allocated before (the caller records allocations so that every node's agent,
//! and every later run, agrees). Also checks every node's CIDRs: inside the cluster CIDR,
//! no two nodes overlapping.

use super::manifests::{ManifestError, Manifests};
use ipnet::IpNet;
use std::collections::BTreeMap;

/// Allocations made by this crate, by node name.
pub type Record = BTreeMap<String, Vec<IpNet>>;

/// Fills in missing pod CIDRs and checks all of them; returns the allocations to record.
pub fn allocate(m: &mut Manifests, recorded: &Record) -> Result<Record, Vec<ManifestError>> {
    let config = m.config.clone();
    let families = [
        (
            config.cluster_cidr,
            config.node_cidr_mask_size,
            "clusterCIDR",
        ),
        (
            config.cluster_cidr_v6,
            config.node_cidr_mask_size_v6,
            "clusterCIDRv6",
        ),
    ];
    let mut errors = Vec::new();
    let field_of = |name: &str| format!("Node {name}: spec.podCIDR");
    for node in &m.nodes {
        for cidr in &node.pod_cidrs {
            let family = families
                .iter()
                .find(|(c, _, _)| c.is_some_and(|c| c.addr().is_ipv6() == cidr.addr().is_ipv6()));
            if let Some((Some(cluster), _, field)) = family {
                if !cluster.contains(cidr) {
                    errors.push(ManifestError {
                        file: node.file.clone(),
                        field: field_of(&node.name),
                        message: format!("{cidr} is outside {field} {cluster}"),
                    });
                }
            }
        }
    }
    let mut used: Vec<IpNet> = m.nodes.iter().flat_map(|n| n.pod_cidrs.clone()).collect();
    let mut record = Record::new();
    // First the allocations recorded earlier (still inside the cluster CIDR and free), so
    // that a node added later never takes an older node's CIDR; then new ones.
    let needs: Vec<bool> = m.nodes.iter().map(|n| n.pod_cidrs.is_empty()).collect();
    for keep_recorded in [true, false] {
        for (node, _) in m.nodes.iter_mut().zip(&needs).filter(|(_, need)| **need) {
            for (cluster, mask, field) in families {
                let Some(cluster) = cluster else { continue };
                if node
                    .pod_cidrs
                    .iter()
                    .any(|c| c.addr().is_ipv6() == cluster.addr().is_ipv6())
                {
                    continue; // this family is done
                }
                let chosen = if keep_recorded {
                    let Some(cidrs) = recorded.get(&node.name) else {
                        continue;
                    };
                    // Kept even if a manifest now claims an overlapping CIDR: a node's
                    // CIDR never moves; the overlap is reported below instead.
                    match cidrs
                        .iter()
                        .find(|c| cluster.contains(*c) && c.prefix_len() == mask)
                    {
                        Some(c) => Some(*c),
                        None => continue,
                    }
                } else {
                    cluster
                        .subnets(mask)
                        .ok()
                        .and_then(|mut s| s.find(|c| !used.iter().any(|u| overlaps(u, c))))
                };
                match chosen {
                    Some(cidr) => {
                        used.push(cidr);
                        node.pod_cidrs.push(cidr);
                        record.entry(node.name.clone()).or_default().push(cidr);
                    }
                    None => errors.push(ManifestError {
                        file: node.file.clone(),
                        field: field_of(&node.name),
                        message: format!("{field} {cluster} has no free /{mask} left"),
                    }),
                }
            }
        }
    }
    for (i, a) in m.nodes.iter().enumerate() {
        for b in &m.nodes[i + 1..] {
            for ca in &a.pod_cidrs {
                if let Some(cb) = b.pod_cidrs.iter().find(|cb| overlaps(ca, cb)) {
                    errors.push(ManifestError {
                        file: b.file.clone(),
                        field: field_of(&b.name),
                        message: format!(
                            "{cb} overlaps {ca} of node {} ({})",
                            a.name,
                            a.file.display()
                        ),
                    });
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(record)
    } else {
        Err(errors)
    }
}

/// True when the two prefixes share an address.
pub fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}
