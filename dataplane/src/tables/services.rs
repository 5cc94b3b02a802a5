//! The Services in a snapshot: frontends (virtual address, protocol, port) and node ports
//! mapped to their endpoints and Maglev tables, and the set of endpoints (whose packets may
//! be replies to translate back). Built from the control process's [`ServiceSpec`]s; looked
//! up without locks.

use super::maglev::{self, Maglev};
use crate::conntrack::service::Frontend;
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use switchyard_api::{ServiceKey, ServiceSpec};

/// Hash maps keyed with the connection tables' fast hasher.
type Map<K, V> = HashMap<K, V, crate::conntrack::FxBuild>;

/// The IP protocol number of a Service port's protocol name, if the dataplane serves it.
pub fn protocol_number(name: &str) -> Option<u8> {
    crate::wire::protocol_number(name).filter(|p| matches!(*p, 6 | 17))
}

/// The id of a Service port in one address family: the same in every table built.
fn port_id(service: &ServiceKey, name: &str, protocol: u8, port: u16, v6: bool) -> u64 {
    use std::hash::BuildHasher;
    crate::conntrack::FxBuild::default().hash_one((service, name, protocol, port, v6))
}

/// A set of backends and its Maglev table.
#[derive(Debug)]
pub struct Backends {
    /// Address and port of each, sorted.
    pub list: Vec<(IpAddr, u16)>,
    maglev: Option<Maglev>,
}

impl Backends {
    fn new(mut list: Vec<(IpAddr, u16)>, max_table: u32) -> Self {
        list.sort();
        list.dedup();
        let names: Vec<String> = list.iter().map(|(a, p)| format!("{a}:{p}")).collect();
        let maglev = Maglev::new(&names, maglev::table_size(list.len(), max_table));
        Self { list, maglev }
    }

    /// The backend for a flow of hash `flow_hash`; none when there is no backend.
    #[inline]
    pub fn pick(&self, flow_hash: u64) -> Option<(IpAddr, u16)> {
        let m = self.maglev.as_ref()?;
        self.list.get(m.pick(flow_hash)).copied()
    }

    /// True when `backend` is one of them.
    pub fn contains(&self, backend: &(IpAddr, u16)) -> bool {
        self.list.binary_search(backend).is_ok()
    }

    /// Slots of the Maglev table (0 without backends).
    pub fn table_size(&self) -> u32 {
        self.maglev.as_ref().map_or(0, |m| m.size() as u32)
    }
}

/// One port of one Service, for one address family.
#[derive(Debug)]
pub struct ServicePortEntry {
    /// Stable across tables (a hash of Service, port and family), so that flows and
    /// affinities opened under one table still name it in the next.
    pub id: u64,
    /// The Service.
    pub service: ServiceKey,
    /// Every endpoint of this family.
    pub all: Backends,
    /// The endpoints on this node.
    pub local: Backends,
    /// ClientIP affinity timeout, in nanoseconds.
    pub affinity_ns: Option<u64>,
    /// Pods reach only local endpoints.
    pub internal_local: bool,
    /// Node-port and external-IP clients reach only local endpoints.
    pub external_local: bool,
    /// IP protocol.
    pub protocol: u8,
    /// The virtual port.
    pub port: u16,
    /// The node port, if any.
    pub node_port: Option<u16>,
    /// IPv6 (else IPv4).
    pub v6: bool,
    /// The virtual addresses of this family (cluster and external IPs).
    pub frontends: Vec<IpAddr>,
}

/// The entries of one Service: one per port and address family served.
fn entries_of(s: &ServiceSpec, max_table: u32) -> Vec<Arc<ServicePortEntry>> {
    let key = s.key();
    let vips: Vec<IpAddr> = s
        .cluster_ips
        .iter()
        .chain(&s.external_ips)
        .copied()
        .collect();
    let mut out = Vec::new();
    for port in &s.ports {
        let Some(protocol) = protocol_number(&port.protocol) else {
            continue;
        };
        for v6 in [false, true] {
            let family: Vec<_> = port
                .endpoints
                .iter()
                .filter(|e| e.address.is_ipv6() == v6)
                .collect();
            let frontends: Vec<IpAddr> =
                vips.iter().copied().filter(|a| a.is_ipv6() == v6).collect();
            if frontends.is_empty() && (port.node_port.is_none() || family.is_empty()) {
                continue;
            }
            let backends = |local_only: bool| {
                let list = family
                    .iter()
                    .filter(|e| e.local || !local_only)
                    .map(|e| (e.address, e.port))
                    .collect();
                Backends::new(list, max_table)
            };
            out.push(Arc::new(ServicePortEntry {
                id: port_id(&key, &port.name, protocol, port.port, v6),
                service: key.clone(),
                all: backends(false),
                local: backends(true),
                affinity_ns: s
                    .affinity_timeout_s
                    .map(|secs| u64::from(secs) * 1_000_000_000),
                internal_local: s.internal_local,
                external_local: s.external_local,
                protocol,
                port: port.port,
                node_port: port.node_port,
                v6,
                frontends,
            }));
        }
    }
    out
}

impl ServicePortEntry {
    /// The backends a client may be sent to: `external` for node-port and external-IP
    /// clients, else pods and the node.
    pub fn backends(&self, external: bool) -> &Backends {
        let local = if external {
            self.external_local
        } else {
            self.internal_local
        };
        if local {
            &self.local
        } else {
            &self.all
        }
    }
}

/// Every Service of the node, ready for the fast path.
#[derive(Debug, Default)]
pub struct ServiceTable {
    frontends: Map<Frontend, Arc<ServicePortEntry>>,
    /// Frontends that are external IPs (a client from outside uses the external policy).
    external_ips: HashSet<IpAddr>,
    node_ports: Map<(bool, u8, u16), Arc<ServicePortEntry>>,
    backends: HashSet<(IpAddr, u8, u16), crate::conntrack::FxBuild>,
    entries: Vec<Arc<ServicePortEntry>>,
    by_service: HashMap<ServiceKey, Vec<Arc<ServicePortEntry>>>,
    /// Every node's addresses: a node port is served on each of them.
    nodes: HashSet<IpAddr>,
    /// This node's own addresses (IPv4, IPv6): the source of node-port clients' packets
    /// under `externalTrafficPolicy: Cluster`.
    own: (Option<IpAddr>, Option<IpAddr>),
}

/// Where the node stands: every node's addresses, and this node's own.
#[derive(Debug, Clone, Default)]
pub struct NodeAddresses {
    /// Every node's addresses (this one's included).
    pub all: Vec<IpAddr>,
    /// This node's IPv4 address.
    pub own_v4: Option<IpAddr>,
    /// This node's IPv6 address.
    pub own_v6: Option<IpAddr>,
}

impl ServiceTable {
    /// Compiles `services` with Maglev tables of at most `max_table` slots. Ports of a
    /// protocol the dataplane does not serve (SCTP) are left out.
    pub fn build<'a>(
        services: impl IntoIterator<Item = &'a ServiceSpec>,
        max_table: u32,
        nodes: &NodeAddresses,
    ) -> Self {
        Self::rebuild(services, max_table, nodes, None)
    }

    /// [`ServiceTable::build`], reusing the compiled ports (Maglev tables included) of
    /// every Service of `previous` whose key is not in `changed`: a change to one Service
    /// among thousands compiles that one only. `previous` must have been built with the same
    /// `max_table`.
    pub fn rebuild<'a>(
        services: impl IntoIterator<Item = &'a ServiceSpec>,
        max_table: u32,
        nodes: &NodeAddresses,
        previous: Option<(&ServiceTable, &HashSet<ServiceKey>)>,
    ) -> Self {
        let mut t = Self {
            nodes: nodes.all.iter().copied().collect(),
            own: (nodes.own_v4, nodes.own_v6),
            ..Self::default()
        };
        for s in services {
            let key = s.key();
            let reused = previous
                .filter(|(_, changed)| !changed.contains(&key))
                .and_then(|(prev, _)| prev.by_service.get(&key));
            let entries = match reused {
                Some(entries) => entries.clone(),
                None => entries_of(s, max_table),
            };
            t.external_ips.extend(s.external_ips.iter().copied());
            for entry in &entries {
                for (addr, port) in &entry.all.list {
                    t.backends.insert((*addr, entry.protocol, *port));
                }
                for addr in &entry.frontends {
                    let front = Frontend {
                        addr: *addr,
                        protocol: entry.protocol,
                        port: entry.port,
                    };
                    t.frontends.insert(front, entry.clone());
                }
                if let Some(node_port) = entry.node_port {
                    t.node_ports
                        .insert((entry.v6, entry.protocol, node_port), entry.clone());
                }
                t.entries.push(entry.clone());
            }
            t.by_service.insert(key, entries);
        }
        t
    }

    /// The longest ClientIP affinity timeout of any Service, in nanoseconds.
    pub fn longest_affinity_ns(&self) -> u64 {
        self.entries
            .iter()
            .filter_map(|e| e.affinity_ns)
            .max()
            .unwrap_or(0)
    }

    /// True when there is no Service.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The Service port behind a frontend.
    #[inline]
    pub fn frontend(&self, f: &Frontend) -> Option<&Arc<ServicePortEntry>> {
        if self.frontends.is_empty() {
            return None;
        }
        self.frontends.get(f)
    }

    /// True when `addr` is an external IP of some Service.
    pub fn is_external_ip(&self, addr: IpAddr) -> bool {
        self.external_ips.contains(&addr)
    }

    /// True when `addr` is one of the cluster's nodes'.
    #[inline]
    pub fn is_node_address(&self, addr: IpAddr) -> bool {
        !self.nodes.is_empty() && self.nodes.contains(&addr)
    }

    /// This node's address of `addr`'s family.
    pub fn own_address(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.own.1
        } else {
            self.own.0
        }
    }

    /// The Service port behind a node port (`v6`: reached on an IPv6 address).
    #[inline]
    pub fn node_port(&self, v6: bool, protocol: u8, port: u16) -> Option<&Arc<ServicePortEntry>> {
        if self.node_ports.is_empty() {
            return None;
        }
        self.node_ports.get(&(v6, protocol, port))
    }

    /// Every node port, by protocol, for the node's steering rules.
    pub fn node_port_list(&self) -> Vec<(u8, u16)> {
        let mut out: Vec<(u8, u16)> = self.node_ports.keys().map(|(_, p, n)| (*p, *n)).collect();
        out.sort();
        out.dedup();
        out
    }

    /// Every endpoint (address, protocol, port) of every Service.
    pub fn backend_set(&self) -> impl Iterator<Item = &(IpAddr, u8, u16)> {
        self.backends.iter()
    }

    /// Keeps treating `backends` as backends (their packets may be replies): endpoints that
    /// left their Service while established connections still use them.
    pub fn keep_backends(&mut self, backends: impl IntoIterator<Item = (IpAddr, u8, u16)>) {
        self.backends.extend(backends);
    }

    /// True when a packet from `src:port` may be a backend's reply.
    #[inline]
    pub fn is_backend(&self, src: IpAddr, protocol: u8, port: u16) -> bool {
        !self.backends.is_empty() && self.backends.contains(&(src, protocol, port))
    }

    /// The Service a port id belongs to.
    pub fn service_of(&self, id: u64) -> Option<&ServiceKey> {
        self.entries.iter().find(|e| e.id == id).map(|e| &e.service)
    }

    /// The Maglev table sizes of a Service's ports, one per (port, family) served.
    pub fn table_sizes(&self, key: &ServiceKey) -> Vec<u32> {
        self.entries
            .iter()
            .filter(|e| e.service == *key)
            .map(|e| e.all.table_size())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_api::{Endpoint, ServicePort};

    fn spec() -> ServiceSpec {
        ServiceSpec {
            namespace: "default".into(),
            name: "web".into(),
            kind: "NodePort".into(),
            cluster_ips: vec![
                "10.96.0.10".parse().unwrap(),
                "fd00:96::10".parse().unwrap(),
            ],
            external_ips: vec!["192.168.1.200".parse().unwrap()],
            ports: vec![
                ServicePort {
                    name: "http".into(),
                    protocol: "TCP".into(),
                    port: 80,
                    node_port: Some(30080),
                    endpoints: vec![
                        Endpoint {
                            address: "10.244.0.5".parse().unwrap(),
                            port: 8080,
                            local: true,
                        },
                        Endpoint {
                            address: "10.244.1.5".parse().unwrap(),
                            port: 8080,
                            local: false,
                        },
                        Endpoint {
                            address: "fd00:244::5".parse().unwrap(),
                            port: 8080,
                            local: true,
                        },
                    ],
                },
                ServicePort {
                    name: "sctp".into(),
                    protocol: "SCTP".into(),
                    port: 9,
                    node_port: None,
                    endpoints: Vec::new(),
                },
            ],
            affinity_timeout_s: Some(10),
            external_local: true,
            internal_local: false,
        }
    }

    #[test]
    fn frontends_map_to_their_family_and_policies_pick_local_backends() {
        let t = ServiceTable::build(
            [&spec()],
            maglev::DEFAULT_MAX_SIZE,
            &NodeAddresses::default(),
        );
        let f = |addr: &str| Frontend {
            addr: addr.parse().unwrap(),
            protocol: 6,
            port: 80,
        };
        let v4 = t.frontend(&f("10.96.0.10")).unwrap();
        assert_eq!(v4.all.list.len(), 2);
        assert_eq!(
            v4.backends(true).list.len(),
            1,
            "externalTrafficPolicy: Local"
        );
        assert_eq!(v4.backends(false).list.len(), 2);
        assert_eq!(v4.affinity_ns, Some(10_000_000_000));
        let v6 = t.frontend(&f("fd00:96::10")).unwrap();
        assert_eq!(v6.all.list, vec![("fd00:244::5".parse().unwrap(), 8080)]);
        assert!(Arc::ptr_eq(t.frontend(&f("192.168.1.200")).unwrap(), v4));
        assert!(t.is_external_ip("192.168.1.200".parse().unwrap()));
        assert!(t
            .frontend(&Frontend {
                port: 81,
                ..f("10.96.0.10")
            })
            .is_none());
        assert!(Arc::ptr_eq(t.node_port(false, 6, 30080).unwrap(), v4));
        assert!(Arc::ptr_eq(t.node_port(true, 6, 30080).unwrap(), v6));
        assert_eq!(t.node_port_list(), vec![(6, 30080)]);
        assert!(t.is_backend("10.244.1.5".parse().unwrap(), 6, 8080));
        assert!(!t.is_backend("10.244.1.5".parse().unwrap(), 17, 8080));
        let sctp = Frontend {
            protocol: 132,
            port: 9,
            ..f("10.96.0.10")
        };
        assert!(t.frontend(&sctp).is_none(), "SCTP is not served");
        assert_eq!(t.table_sizes(&spec().key()), vec![251, 251]);
        let picked = v4.all.pick(12345).unwrap();
        assert!(v4.all.contains(&picked));
        assert_ne!(v4.id, v6.id);
        let again = ServiceTable::build(
            [&spec()],
            maglev::DEFAULT_MAX_SIZE,
            &NodeAddresses::default(),
        );
        assert_eq!(
            again.frontend(&f("10.96.0.10")).unwrap().id,
            v4.id,
            "stable ids"
        );
    }

    #[test]
    fn a_rebuild_reuses_the_ports_of_unchanged_services() {
        let mut other = spec();
        other.name = "other".into();
        other.cluster_ips = vec!["10.96.0.20".parse().unwrap()];
        other.external_ips.clear();
        other.ports[0].node_port = Some(30081);
        let nodes = NodeAddresses::default();
        let first = ServiceTable::build([&spec(), &other], maglev::DEFAULT_MAX_SIZE, &nodes);
        let changed: HashSet<ServiceKey> = [other.key()].into();
        let mut other2 = other.clone();
        other2.ports[0].endpoints.remove(0);
        let second = ServiceTable::rebuild(
            [&spec(), &other2],
            maglev::DEFAULT_MAX_SIZE,
            &nodes,
            Some((&first, &changed)),
        );
        let f = |addr: &str| Frontend {
            addr: addr.parse().unwrap(),
            protocol: 6,
            port: 80,
        };
        assert!(Arc::ptr_eq(
            first.frontend(&f("10.96.0.10")).unwrap(),
            second.frontend(&f("10.96.0.10")).unwrap()
        ));
        let (a, b) = (
            first.frontend(&f("10.96.0.20")).unwrap(),
            second.frontend(&f("10.96.0.20")).unwrap(),
        );
        assert!(!Arc::ptr_eq(a, b), "the changed one is compiled again");
        assert_eq!(b.all.list.len(), a.all.list.len() - 1);
        assert_eq!(a.id, b.id);
    }

    #[test]
    fn a_port_without_endpoints_has_a_frontend_and_no_backend() {
        let mut s = spec();
        s.ports[0].endpoints.clear();
        let t = ServiceTable::build([&s], maglev::DEFAULT_MAX_SIZE, &NodeAddresses::default());
        let e = t
            .frontend(&Frontend {
                addr: "10.96.0.10".parse().unwrap(),
                protocol: 6,
                port: 80,
            })
            .unwrap();
        assert_eq!(e.all.pick(1), None);
        assert_eq!(e.all.table_size(), 0);
    }
}
