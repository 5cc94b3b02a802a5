//! Masquerade's side of the node settings: the connection-tracking table and the node's
//! kernel set up so that replies to masqueraded flows reach the dataplane, never the
//! node's own sockets (docs/egress.md).
//!
//! In the node's namespace:
//! * the masquerade port range is reserved (`ip_local_reserved_ports`), so the node's own
//!   sockets never take a port a pod flow may use; if the node's ephemeral range lay
//!   inside it, the ephemeral range moves to the larger part outside it;
//! * policy rules, before the local table (which moves from priority 0 to 100): TCP and UDP
//!   arriving on the uplink for a port in the range, and ICMP arriving on the uplink, look
//!   up a table whose only route is `default dev <host port>`: they are forwarded into the
//!   dataplane, which translates its flows back and hands anything else to the node's
//!   stack through the same port (then `iif` is the host port, and the local table
//!   delivers it);
//! * the host port accepts packets with the node's own source address (`accept_local`:
//!   masqueraded packets) and skips reverse-path filtering (handed-back packets come
//!   from remote sources).

use super::Switch;
use crate::conntrack::journal::Backing;
use crate::conntrack::Conntrack;
use crate::io::netlink::{KernelRoute, KernelRule, Netlink};
use crate::io::shared::SharedBytes;
use crate::tables::masquerade::Masquerading;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use switchyard_api::{ApiError, ConntrackEntry, ErrorCode, IpNet, NatStatus, NodeSpec, PortRange};

impl Backing for SharedBytes {
    fn bytes(&self) -> &[std::sync::atomic::AtomicU8] {
        SharedBytes::bytes(self)
    }
}

/// The node's table that steers replies into the host port.
pub(super) const STEER_TABLE: u8 = 200;
/// Priority of the steering rules.
const STEER_PRIORITY: u32 = 50;
/// Where the local table's rule moves to, so that the steering rules come first.
pub(super) const LOCAL_PRIORITY: u32 = 100;

fn system(context: &str, err: io::Error) -> ApiError {
    ApiError::new(ErrorCode::System, format!("{context}: {err}"))
}

/// The destinations pods reach without masquerade: the cluster's pod networks, the
/// Services' ranges, every node's addresses, `nonMasqueradeCIDRs`, and link-local unless
/// `masqLinkLocal`.
fn exempt(spec: &NodeSpec) -> Vec<IpNet> {
    let host = |a: &IpAddr| crate::tables::builder::host_net(*a);
    let mut out: Vec<IpNet> = spec
        .cluster_cidrs
        .iter()
        .chain(&spec.pod_cidrs)
        .chain(spec.peers.iter().flat_map(|p| &p.pod_cidrs))
        .chain(&spec.masquerade.non_masquerade_cidrs)
        .chain(&spec.service_cidrs)
        .copied()
        .collect();
    out.extend(spec.addresses.iter().map(host));
    out.push(host(&IpAddr::V4(spec.underlay)));
    for peer in &spec.peers {
        out.extend(peer.addresses.iter().map(host));
        out.push(host(&IpAddr::V4(peer.underlay)));
    }
    if !spec.masquerade.masq_link_local {
        out.extend("169.254.0.0/16".parse::<IpNet>());
    }
    out
}

/// The ports of `range` free for the node's own sockets: above it when at least 1,024
/// ports are left there (below would take Kubernetes' NodePort range, 30000-32767), else
/// the larger part of 1024-65535 outside it.
fn ephemeral_outside(range: (u16, u16)) -> (u16, u16) {
    let below = (1024u16, range.0.saturating_sub(1));
    let above = (range.1.saturating_add(1), 65535u16);
    let size = |r: (u16, u16)| u32::from(r.1).saturating_sub(u32::from(r.0));
    if size(above) >= 1024 || size(above) >= size(below) {
        above
    } else {
        below
    }
}

impl Switch {
    /// The masquerade state for `spec`: the table in force is kept (with its flows) when
    /// the node address, port range and size are unchanged.
    pub(super) fn masquerading(
        &self,
        current: Option<&Arc<Masquerading>>,
        spec: &NodeSpec,
    ) -> Arc<Masquerading> {
        let m = &spec.masquerade;
        let range = (m.port_range.first, m.port_range.last);
        let conntrack = current
            .map(|c| c.conntrack.clone())
            .filter(|c| {
                c.node() == spec.underlay && c.port_range() == range && c.limit() == m.conntrack_max
            })
            .unwrap_or_else(|| {
                Arc::new(self.new_conntrack(
                    spec.underlay,
                    range,
                    m.conntrack_max,
                    current.is_none(),
                ))
            });
        Arc::new(Masquerading::new(conntrack, &exempt(spec)))
    }

    /// A masquerade table journaled to the conntrack file, if there is one: the first of
    /// this process takes back what an earlier process wrote there; a later one (the
    /// settings changed) starts a new file, which the table it replaces, still in use
    /// until the new one is published, never writes to.
    fn new_conntrack(
        &self,
        node: std::net::Ipv4Addr,
        range: (u16, u16),
        limit: usize,
        first: bool,
    ) -> Conntrack {
        let Some(path) = &self.config.conntrack_file else {
            return Conntrack::new(node, range, limit);
        };
        let len = crate::conntrack::journal::journal_len(limit);
        let mapped = if first {
            SharedBytes::open(path, len)
        } else {
            SharedBytes::create(path, len)
        };
        match mapped {
            Ok(bytes) => {
                let now = crate::worker::monotonic_ns();
                let (ct, restored) =
                    Conntrack::with_journal(node, range, limit, Box::new(bytes), now);
                if let Some(why) = restored.discarded {
                    tracing::warn!("discarded the conntrack journal {}: {why}", path.display());
                }
                if restored.flows > 0 {
                    tracing::info!(
                        "took back {} masqueraded and published flows from {}",
                        restored.flows,
                        path.display()
                    );
                }
                ct
            }
            Err(e) => {
                tracing::warn!(
                    "cannot map the conntrack journal {}: {e}; flows will not survive a restart",
                    path.display()
                );
                Conntrack::new(node, range, limit)
            }
        }
    }

    /// Sets the node's kernel up to send masquerade replies into the host port; returns
    /// the rules and the route it added (to remove them when they change).
    pub(super) fn steer_replies(
        &self,
        spec: &NodeSpec,
        uplink: &str,
        host_ifindex: u32,
    ) -> Result<(Vec<KernelRule>, KernelRoute), ApiError> {
        let host = &self.config.host_ifname;
        let range = (
            spec.masquerade.port_range.first,
            spec.masquerade.port_range.last,
        );
        for (key, value) in [
            (
                format!("net.ipv4.conf.{host}.accept_local"),
                "1".to_string(),
            ),
            (format!("net.ipv4.conf.{host}.rp_filter"), "0".to_string()),
            (
                "net.ipv4.ip_local_reserved_ports".to_string(),
                format!("{}-{}", range.0, range.1),
            ),
        ] {
            self.originals
                .set(&key, &value)
                .map_err(|e| system("masquerade", e))?;
        }
        let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|t| {
                let mut it = t.split_whitespace().filter_map(|v| v.parse::<u16>().ok());
                Some((it.next()?, it.next()?))
            });
        if let Some((lo, hi)) = ephemeral {
            if lo >= range.0 && hi <= range.1 {
                let (a, b) = ephemeral_outside(range);
                self.originals
                    .set("net.ipv4.ip_local_port_range", &format!("{a} {b}"))
                    .map_err(|e| system("masquerade", e))?;
                tracing::info!(
                    "the node's ephemeral ports {lo}-{hi} lay inside the masquerade range {}-{}; they are now {a}-{b}",
                    range.0, range.1
                );
            }
        }
        let route = KernelRoute {
            dst: IpNet::V4(Default::default()),
            oif: host_ifindex,
            gateway: None,
            src: None,
            table: STEER_TABLE,
        };
        let mut nl = Netlink::open().map_err(|e| system("netlink", e))?;
        nl.replace_route(&route)
            .map_err(|e| system("cannot add the masquerade steering route", e))?;
        let local = super::restore::local_rule;
        nl.add_rule(&local(LOCAL_PRIORITY))
            .and_then(|()| nl.delete_rule(&local(0)))
            .map_err(|e| system("cannot move the local table's rule", e))?;
        let steer = |protocol: u8, dports| KernelRule {
            priority: STEER_PRIORITY,
            iif: Some(uplink.to_string()),
            protocol: Some(protocol),
            dports,
            dst: None,
            table: u32::from(STEER_TABLE),
        };
        let rules = vec![
            steer(6, Some(range)),
            steer(17, Some(range)),
            steer(1, None),
        ];
        for rule in &rules {
            nl.add_rule(rule)
                .map_err(|e| system("cannot add a masquerade steering rule", e))?;
        }
        Ok((rules, route))
    }
}

impl Switch {
    /// Masquerade's state, once the node settings enabled it.
    pub fn nat_status(&self) -> Option<NatStatus> {
        let tables = self.tables();
        let ct = &tables.masquerade.as_ref()?.conntrack;
        let (first, last) = ct.port_range();
        let [tcp, udp, icmp] = ct.flows_by_protocol();
        Some(NatStatus {
            node: ct.node(),
            port_range: PortRange { first, last },
            flows: ct.len(),
            limit: ct.limit(),
            tcp,
            udp,
            icmp,
            early_drops: ct.early_drops(),
        })
    }

    /// Tracked flows, optionally of one pod and one protocol.
    pub fn conntrack_entries(
        &self,
        pod: Option<std::net::Ipv4Addr>,
        protocol: Option<&str>,
    ) -> Result<Vec<ConntrackEntry>, ApiError> {
        let wanted = match protocol {
            None => None,
            Some("tcp") => Some(6),
            Some("udp") => Some(17),
            Some("icmp") => Some(1),
            Some(other) => {
                return Err(ApiError::new(
                    ErrorCode::InvalidRequest,
                    format!("unknown protocol {other:?}: use tcp, udp or icmp"),
                ))
            }
        };
        let tables = self.tables();
        let Some(m) = tables.masquerade.as_ref() else {
            return Ok(Vec::new());
        };
        Ok(m.conntrack
            .flows(crate::worker::monotonic_ns())
            .into_iter()
            .filter(|f| pod.is_none_or(|p| f.original.src == p))
            .filter(|f| wanted.is_none_or(|w| f.original.protocol == w))
            .map(|f| ConntrackEntry {
                protocol: super::protocol_name(f.original.protocol),
                kind: if f.published {
                    "hostPort"
                } else {
                    "masquerade"
                }
                .into(),
                pod: f.original.src,
                pod_port: f.original.src_port,
                remote: f.original.dst,
                remote_port: f.original.dst_port,
                node_port: f.node_port,
                state: f.state.name().into(),
                idle_s: f.idle_s,
            })
            .collect())
    }
}

/// Whether the node routes by its main table alone: no policy rule of its own (beyond the
/// kernel's local, main and default tables and the dataplane's steering). Only then does
/// the AF_XDP uplink send packets that leave the node with its address itself, by the main
/// table's routes; a node with rules of its own keeps them going through its stack, where
/// the rules apply.
pub(super) fn routed_by_main_table() -> bool {
    let foreign = Netlink::open().and_then(|mut nl| nl.rules()).map(|rules| {
        rules
            .into_iter()
            .filter(|r| ![253, 254, 255, u32::from(STEER_TABLE)].contains(&r.table))
            .collect::<Vec<_>>()
    });
    match foreign {
        Ok(foreign) if foreign.is_empty() => true,
        Ok(foreign) => {
            tracing::info!(
                "the node has policy routing rules of its own ({} of them, the first to table {}): masquerade and published ports keep going through its stack, beside the AF_XDP uplink",
                foreign.len(),
                foreign[0].table
            );
            false
        }
        Err(e) => {
            tracing::warn!("cannot read the node's policy routing rules ({e}): masquerade and published ports keep going through its stack");
            false
        }
    }
}

impl Switch {
    /// Keeps two steering rules per port of the node published to a pod (hostPort) and per
    /// Service node port: one for connections arriving on the uplink, one for the node's
    /// own connections to its address (`iif lo`), so that both reach the dataplane; call
    /// after pods, Services or node settings change. (Pods reach them through the dataplane
    /// itself.)
    pub(super) fn sync_host_port_rules(&self) {
        let mut state = self.state();
        let desired: Vec<KernelRule> = match &state.node {
            None => return,
            Some(node) => {
                let rule = |protocol: u8, port: u16, iif: &str, dst| KernelRule {
                    priority: STEER_PRIORITY,
                    iif: Some(iif.to_string()),
                    protocol: Some(protocol),
                    dports: Some((port, port)),
                    dst,
                    table: u32::from(STEER_TABLE),
                };
                let mut ports: Vec<(u8, u16)> = state.builder.host_ports().into_keys().collect();
                ports.extend(state.builder.services().node_port_list());
                ports.sort();
                ports.dedup();
                if let Some(exit) = node.exit() {
                    // The AF_XDP exit takes them before the kernel, with the masquerade
                    // range (the rules stay for what its program leaves to the kernel).
                    let range = node.spec().masquerade.port_range;
                    let masquerade = (range.first..=range.last).flat_map(|p| [(6, p), (17, p)]);
                    if let Err(e) = exit.publish(ports.iter().copied().chain(masquerade)) {
                        tracing::warn!(
                            "cannot list the node's ports in the uplink's XDP program: {e}"
                        );
                    }
                }
                ports
                    .into_iter()
                    .flat_map(|(protocol, port)| {
                        [
                            rule(protocol, port, node.uplink_ifname(), None),
                            rule(protocol, port, "lo", Some(node.address())),
                        ]
                    })
                    .collect()
            }
        };
        let Some(node) = state.node.as_mut() else {
            return;
        };
        let (keep, stale): (Vec<KernelRule>, Vec<KernelRule>) =
            std::mem::take(&mut node.host_rules)
                .into_iter()
                .partition(|r| desired.contains(r));
        remove_rules(&stale);
        if let Ok(mut nl) = Netlink::open() {
            for rule in desired.iter().filter(|r| !keep.contains(r)) {
                if let Err(e) = nl.add_rule(rule) {
                    tracing::warn!(
                        "cannot steer port {:?} into the dataplane: {e}",
                        rule.dports
                    );
                }
            }
        }
        node.host_rules = desired;
    }
}

/// Removes the steering rules an earlier process left that are not in `wanted` (those
/// still wanted stay in place all along; the uninstall wants none): rules for ports no
/// pod publishes any more would otherwise stay for good.
pub(super) fn remove_leftover_rules_except(wanted: &[&KernelRule]) {
    let removed = Netlink::open().and_then(|mut nl| {
        let leftovers: Vec<KernelRule> = nl
            .rules()?
            .into_iter()
            .filter(|r| r.priority == STEER_PRIORITY && r.table == u32::from(STEER_TABLE))
            .filter(|r| !wanted.contains(&r))
            .collect();
        for rule in &leftovers {
            nl.delete_rule(rule)?;
        }
        Ok(leftovers.len())
    });
    match removed {
        Ok(0) => {}
        Ok(n) => tracing::info!("removed {n} steering rules left by an earlier process"),
        Err(e) => tracing::warn!("cannot look for leftover steering rules: {e}"),
    }
}

/// Removes steering rules (when they change, or when the dataplane leaves).
pub(super) fn remove_rules(rules: &[KernelRule]) {
    if let Ok(mut nl) = Netlink::open() {
        for rule in rules {
            let _ = nl.delete_rule(rule);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_keeps_the_larger_part_of_the_ports() {
        assert_eq!(ephemeral_outside((32768, 60999)), (61000, 65535));
        assert_eq!(ephemeral_outside((50000, 65535)), (1024, 49999));
        assert_eq!(ephemeral_outside((1024, 64000)), (64001, 65535));
    }
}
