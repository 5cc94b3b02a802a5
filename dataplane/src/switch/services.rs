//! The Services the control process pushes: validated, compiled into the snapshot's
//! Service table, and the flows an endpoint change must not keep (UDP flows to an endpoint
//! that went; TCP connections are left alone, as Kubernetes expects).

use super::{invalid, State, Switch};
use crate::conntrack::service::ServiceFlows;
use crate::tables::maglev;
use crate::tables::services::{protocol_number, NodeAddresses, ServiceTable};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use switchyard_api::{
    ApiError, ErrorCode, NodeSpec, Reply, ServiceFlowEntry, ServiceKey, ServiceSpec, ServiceStatus,
};

/// The Services in force and the largest Maglev table.
#[derive(Default)]
pub(super) struct Services {
    specs: BTreeMap<ServiceKey, ServiceSpec>,
    max_table: Option<u32>,
}

impl Services {
    /// The Service table for a node with settings `node` (none yet: node ports are served
    /// on no address), compiling again only the Services in `changed` when `previous`
    /// (built from the same table size) is given.
    pub(super) fn table(
        &self,
        node: Option<&NodeSpec>,
        previous: &ServiceTable,
        changed: Option<&HashSet<ServiceKey>>,
        flows: &ServiceFlows,
    ) -> Arc<ServiceTable> {
        let mut addresses = NodeAddresses::default();
        if let Some(spec) = node {
            addresses.own_v4 = Some(IpAddr::V4(spec.underlay));
            addresses.own_v6 = spec.addresses.iter().copied().find(IpAddr::is_ipv6);
            addresses.all.push(IpAddr::V4(spec.underlay));
            addresses.all.extend(spec.addresses.iter().copied());
            for peer in &spec.peers {
                addresses.all.push(IpAddr::V4(peer.underlay));
                addresses.all.extend(peer.addresses.iter().copied());
            }
        }
        let reuse = changed.map(|c| (previous, c));
        let mut table = ServiceTable::rebuild(self.specs.values(), self.max(), &addresses, reuse);
        // Endpoints that left while connections still use them: their replies must still
        // be translated back (an established TCP connection outlives its endpoint).
        let gone: HashSet<(IpAddr, u8, u16)> = previous
            .backend_set()
            .filter(|b| !table.is_backend(b.0, b.1, b.2))
            .copied()
            .collect();
        if !gone.is_empty() {
            table.keep_backends(flows.backends_in_use(&gone));
        }
        Arc::new(table)
    }

    /// The largest Maglev table.
    fn max(&self) -> u32 {
        self.max_table.unwrap_or(maglev::DEFAULT_MAX_SIZE)
    }
}

/// Refuses a Service that cannot be served, saying why.
fn validate(s: &ServiceSpec) -> Result<(), ApiError> {
    let name = s.key();
    if s.namespace.is_empty() || s.name.is_empty() {
        return Err(invalid("a Service needs a namespace and a name"));
    }
    if s.cluster_ips.is_empty() && s.ports.iter().all(|p| p.node_port.is_none()) {
        return Err(invalid(format!(
            "Service {name} has neither a cluster IP nor a node port"
        )));
    }
    for p in &s.ports {
        if protocol_number(&p.protocol).is_none() && !p.protocol.eq_ignore_ascii_case("sctp") {
            return Err(invalid(format!(
                "Service {name} port {}: protocol {:?} is not TCP, UDP or SCTP",
                p.port, p.protocol
            )));
        }
        if p.port == 0 || p.endpoints.iter().any(|e| e.port == 0) {
            return Err(invalid(format!("Service {name}: port 0")));
        }
    }
    Ok(())
}

impl Switch {
    /// Applies a change to the Services: all of it, or none when a Service is invalid or
    /// two Services claim one frontend.
    pub(super) fn apply_services(
        &self,
        upsert: Vec<ServiceSpec>,
        remove: &[ServiceKey],
        replace: bool,
        max_table: Option<u32>,
    ) -> Result<Reply, ApiError> {
        for s in &upsert {
            validate(s)?;
        }
        if let Some(m) = max_table {
            if !maglev::is_prime(m) || m < 251 {
                return Err(invalid(format!(
                    "Maglev table size {m} must be a prime of at least 251 (16381 is the default)"
                )));
            }
        }
        let mut state = self.state();
        let mut specs = if replace {
            BTreeMap::new()
        } else {
            state.services.specs.clone()
        };
        for key in remove {
            specs.remove(key);
        }
        let upsert_keys: Vec<ServiceKey> = upsert.iter().map(ServiceSpec::key).collect();
        for s in upsert {
            specs.insert(s.key(), s);
        }
        check_frontends(&specs)?;
        let changed: HashSet<ServiceKey> = upsert_keys
            .into_iter()
            .chain(remove.iter().cloned())
            .collect();
        let before = state.services.max();
        state.services = Services {
            specs,
            max_table: max_table.or(state.services.max_table),
        };
        let previous = state.builder.services().clone();
        let reuse = (!replace && state.services.max() == before).then_some(&changed);
        let flows = state.builder.service_flows().clone();
        let node = state.node.as_ref().map(|n| n.spec());
        let table = state.services.table(node, &previous, reuse, &flows);
        state.builder.set_services(table.clone());
        self.publish(&mut state);
        forget_stale_udp_flows(&state, &table);
        drop(state);
        self.sync_host_port_rules();
        Ok(Reply::Done)
    }

    /// The Services served, with their Maglev table sizes.
    pub(super) fn list_services(&self) -> Reply {
        let state = self.state();
        let table = state.builder.services();
        Reply::Services(
            state
                .services
                .specs
                .values()
                .map(|spec| ServiceStatus {
                    maglev_table_sizes: table.table_sizes(&spec.key()),
                    spec: spec.clone(),
                })
                .collect(),
        )
    }
}

impl Switch {
    /// The flows to Services (of `service` only, when given).
    pub(super) fn service_flows(&self, service: Option<&ServiceKey>) -> Reply {
        let tables = self.tables();
        let socket = |a: IpAddr, p: u16| std::net::SocketAddr::from((a, p)).to_string();
        Reply::ServiceFlows(
            tables
                .service_flows
                .flows(crate::worker::monotonic_ns())
                .into_iter()
                .map(|f| (tables.services.service_of(f.service_port).cloned(), f))
                .filter(|(key, _)| service.is_none_or(|s| key.as_ref() == Some(s)))
                .map(|(key, f)| ServiceFlowEntry {
                    service: key,
                    protocol: super::protocol_name(f.original.protocol),
                    client: socket(f.original.src, f.original.src_port),
                    frontend: socket(f.original.dst, f.original.dst_port),
                    backend: socket(f.backend.0, f.backend.1),
                    state: f.state.name().into(),
                    idle_s: f.idle_s,
                })
                .collect(),
        )
    }
}

/// Refuses two Services with the same frontend (address, protocol, port) or node port.
fn check_frontends(specs: &BTreeMap<ServiceKey, ServiceSpec>) -> Result<(), ApiError> {
    let mut seen: HashMap<(Option<IpAddr>, String, u16), &ServiceKey> = HashMap::new();
    for (key, s) in specs {
        for p in &s.ports {
            let protocol = p.protocol.to_ascii_lowercase();
            let fronts = s
                .cluster_ips
                .iter()
                .chain(&s.external_ips)
                .map(|a| (Some(*a), protocol.clone(), p.port))
                .chain(p.node_port.map(|n| (None, protocol.clone(), n)));
            for front in fronts {
                if let Some(other) = seen.insert(front.clone(), key) {
                    if other != key {
                        let what = match front.0 {
                            Some(a) => format!("{a} port {}/{}", front.2, front.1),
                            None => format!("node port {}/{}", front.2, front.1),
                        };
                        return Err(ApiError::new(
                            ErrorCode::Conflict,
                            format!("{what} belongs to both Service {other} and Service {key}"),
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

/// UDP flows whose endpoint left their Service go at once: a one-way sender (DNS,
/// statsd) would otherwise keep sending to a gone pod until its flow timed out.
fn forget_stale_udp_flows(state: &State, table: &ServiceTable) {
    state.builder.service_flows().remove_where(|flow| {
        if flow.original.protocol != 17 {
            return false;
        }
        let front = crate::conntrack::service::Frontend {
            addr: flow.original.dst,
            protocol: 17,
            port: flow.original.dst_port,
        };
        !table
            .frontend(&front)
            .is_some_and(|e| e.id == flow.service_port && e.all.contains(&flow.backend))
    });
}
