//! Services and EndpointSlices turned into what one node's dataplane serves: each
//! Service's virtual addresses and ports, and for each port the endpoints kube-proxy would
//! use (KEP-1669: the ready ones; when none is ready, the serving terminating ones; never
//! a not-ready one), marked local when they run on this node.
//!
//! A Service without a cluster IP (read from a manifest, not created through an API server
//! that allocates one) gets one from `serviceCIDR`, and a NodePort Service without a node
//! port gets one from `nodePortRange`; both are recorded like pod CIDR allocations, so
//! every node's agent and every later run agrees.

use super::manifests::{ManifestError, Manifests};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Service, ServicePort as KubePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use switchyard_api::{Endpoint, ServicePort, ServiceSpec};

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// A Service's ClientIP affinity timeout when its manifest gives none (kube-proxy's).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// A Service read from a manifest, with the file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceManifest {
    /// The object.
    pub service: Service,
    /// Its file.
    pub file: PathBuf,
}

/// An EndpointSlice read from a manifest, with the file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceManifest {
    /// The object.
    pub slice: EndpointSlice,
    /// Its file.
    pub file: PathBuf,
}

/// Cluster IPs and node ports given to Services whose manifests have none, by
/// `namespace/name` (node ports by `namespace/name/port`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAllocations {
    /// Cluster IPs.
    #[serde(default)]
    pub cluster_ips: BTreeMap<String, Vec<IpAddr>>,
    /// Node ports.
    #[serde(default)]
    pub node_ports: BTreeMap<String, u16>,
}

fn error(file: &Path, field: String, message: impl Into<String>) -> ManifestError {
    ManifestError {
        file: file.to_path_buf(),
        field,
        message: message.into(),
    }
}

/// What one Service's manifest says, checked, before allocations and endpoints.
struct Parsed<'a> {
    key: String,
    namespace: String,
    name: String,
    kind: String,
    cluster_ips: Vec<IpAddr>,
    families: Vec<bool>,
    external_ips: Vec<IpAddr>,
    ports: Vec<KubePort>,
    affinity: Option<u32>,
    external_local: bool,
    internal_local: bool,
    file: &'a Path,
}

fn parse<'a>(m: &'a ServiceManifest, cidrs: &[IpNet]) -> Result<Option<Parsed<'a>>, ManifestError> {
    let s = &m.service;
    let file = m.file.as_path();
    let name = s.metadata.name.clone().unwrap_or_default();
    let namespace = s
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    if name.is_empty() {
        return Err(error(file, "Service: metadata.name".into(), "missing"));
    }
    let at = |field: &str| format!("Service {namespace}/{name}: {field}");
    let spec = s.spec.clone().unwrap_or_default();
    let kind = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
    if kind == "ExternalName" {
        return Ok(None); // a DNS alias: nothing for a dataplane to do
    }
    if !matches!(kind.as_str(), "ClusterIP" | "NodePort" | "LoadBalancer") {
        return Err(error(
            file,
            at("spec.type"),
            format!("{kind:?} is not ClusterIP, NodePort, LoadBalancer or ExternalName"),
        ));
    }
    let texts: Vec<String> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(list), _) if !list.is_empty() => list.clone(),
        (_, Some(one)) if !one.is_empty() => vec![one.clone()],
        _ => Vec::new(),
    };
    if texts.iter().any(|t| t == "None") {
        return Ok(None); // headless: DNS names the pods, no virtual address
    }
    let mut cluster_ips = Vec::new();
    for t in &texts {
        let ip: IpAddr = t.parse().map_err(|_| {
            error(
                file,
                at("spec.clusterIPs"),
                format!("{t:?} is not an IP address"),
            )
        })?;
        if !cidrs.is_empty() && !cidrs.iter().any(|c| c.contains(&ip)) {
            return Err(error(
                file,
                at("spec.clusterIPs"),
                format!("{ip} is outside serviceCIDR {}", join(cidrs)),
            ));
        }
        cluster_ips.push(ip);
    }
    let families: Vec<bool> = match &spec.ip_families {
        Some(list) if !list.is_empty() => list
            .iter()
            .map(|f| match f.as_str() {
                "IPv4" => Ok(false),
                "IPv6" => Ok(true),
                other => Err(error(
                    file,
                    at("spec.ipFamilies"),
                    format!("{other:?} is not IPv4 or IPv6"),
                )),
            })
            .collect::<Result<_, _>>()?,
        _ if !cluster_ips.is_empty() => cluster_ips.iter().map(IpAddr::is_ipv6).collect(),
        _ if spec
            .ip_family_policy
            .as_deref()
            .is_some_and(|p| p != "SingleStack") =>
        {
            let mut f: Vec<bool> = cidrs.iter().map(|c| c.addr().is_ipv6()).collect();
            f.dedup();
            f
        }
        _ => cidrs
            .first()
            .map(|c| c.addr().is_ipv6())
            .into_iter()
            .collect(),
    };
    let mut external_ips = Vec::new();
    for t in spec.external_ips.iter().flatten() {
        external_ips.push(t.parse().map_err(|_| {
            error(
                file,
                at("spec.externalIPs"),
                format!("{t:?} is not an IP address"),
            )
        })?);
    }
    let ports: Vec<KubePort> = spec.ports.clone().unwrap_or_default();
    let mut names = BTreeSet::new();
    for (i, p) in ports.iter().enumerate() {
        let field = at(&format!("spec.ports[{i}]"));
        if !(1..=65535).contains(&p.port) {
            return Err(error(
                file,
                field,
                format!("port {} is out of range", p.port),
            ));
        }
        let protocol = p.protocol.as_deref().unwrap_or("TCP");
        if !matches!(protocol, "TCP" | "UDP" | "SCTP") {
            return Err(error(
                file,
                field,
                format!("protocol {protocol:?} is not TCP, UDP or SCTP"),
            ));
        }
        if !names.insert(p.name.clone().unwrap_or_default()) {
            return Err(error(file, field, "two ports with one name"));
        }
    }
    let affinity = match spec.session_affinity.as_deref() {
        Some("ClientIP") => Some(
            spec.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .map_or(DEFAULT_AFFINITY_TIMEOUT_S, |t| t.clamp(1, 86_400) as u32),
        ),
        None | Some("None") => None,
        Some(other) => {
            return Err(error(
                file,
                at("spec.sessionAffinity"),
                format!("{other:?} is not ClientIP or None"),
            ))
        }
    };
    Ok(Some(Parsed {
        key: format!("{namespace}/{name}"),
        namespace,
        name,
        kind,
        cluster_ips,
        families,
        external_ips,
        ports,
        affinity,
        external_local: spec.external_traffic_policy.as_deref() == Some("Local"),
        internal_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        file,
    }))
}

/// Every Service of `m` as node `node`'s dataplane serves it, with cluster IPs and node
/// ports allocated where missing (recorded ones kept first); returns the Services and the
/// allocations to record.
pub fn compile(
    m: &Manifests,
    node: &str,
    recorded: &ServiceAllocations,
) -> Result<(Vec<ServiceSpec>, ServiceAllocations), Vec<ManifestError>> {
    let cidrs = &m.config.service_cidrs;
    let mut errors = Vec::new();
    let mut parsed: Vec<Parsed> = Vec::new();
    for s in &m.services {
        match parse(s, cidrs) {
            Ok(Some(p)) => parsed.push(p),
            Ok(None) => {}
            Err(e) => errors.push(e),
        }
    }
    // One per key: the state keeps Services by namespace and name.
    parsed.sort_by(|a, b| a.key.cmp(&b.key));
    let mut record = ServiceAllocations::default();
    allocate_cluster_ips(&mut parsed, cidrs, recorded, &mut record, &mut errors);
    let node_ports = allocate_node_ports(&parsed, &m.config, recorded, &mut record, &mut errors);
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in &m.endpoint_slices {
        let Some(service) = s
            .slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
        else {
            continue;
        };
        let namespace = s
            .slice
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        by_service
            .entry((namespace, service.clone()))
            .or_default()
            .push(&s.slice);
    }
    let specs = parsed
        .iter()
        .map(|p| {
            let slices = by_service
                .get(&(p.namespace.clone(), p.name.clone()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            ServiceSpec {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                kind: if p.kind == "ClusterIP" {
                    "ClusterIP".into()
                } else {
                    "NodePort".into()
                },
                cluster_ips: p.cluster_ips.clone(),
                external_ips: p.external_ips.clone(),
                ports: p
                    .ports
                    .iter()
                    .map(|kp| {
                        let name = kp.name.clone().unwrap_or_default();
                        ServicePort {
                            endpoints: select_endpoints(slices, &name, protocol_of(kp), node),
                            node_port: node_ports.get(&format!("{}/{name}", p.key)).copied(),
                            protocol: protocol_of(kp).to_ascii_lowercase(),
                            port: kp.port as u16,
                            name,
                        }
                    })
                    .collect(),
                affinity_timeout_s: p.affinity,
                external_local: p.external_local,
                internal_local: p.internal_local,
            }
        })
        .collect();
    Ok((specs, record))
}

fn protocol_of(p: &KubePort) -> &str {
    p.protocol.as_deref().unwrap_or("TCP")
}

fn join(cidrs: &[IpNet]) -> String {
    cidrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Gives every Service without cluster IPs one per family it asks for: the recorded one if
/// still free and inside `serviceCIDR`, else the first free address (after the range's
/// network address) of the family's range.
fn allocate_cluster_ips(
    parsed: &mut [Parsed],
    cidrs: &[IpNet],
    recorded: &ServiceAllocations,
    record: &mut ServiceAllocations,
    errors: &mut Vec<ManifestError>,
) {
    let mut used: BTreeSet<IpAddr> = parsed.iter().flat_map(|p| p.cluster_ips.clone()).collect();
    for keep_recorded in [true, false] {
        for p in parsed
            .iter_mut()
            .filter(|p| p.cluster_ips.len() < p.families.len())
        {
            for v6 in p.families.clone() {
                if p.cluster_ips.iter().any(|a| a.is_ipv6() == v6) {
                    continue;
                }
                let Some(range) = cidrs.iter().find(|c| c.addr().is_ipv6() == v6) else {
                    if !keep_recorded {
                        errors.push(error(
                            p.file,
                            format!("Service {}: spec.clusterIP", p.key),
                            format!(
                                "none given and serviceCIDR has no IPv{} range to allocate from",
                                if v6 { 6 } else { 4 }
                            ),
                        ));
                    }
                    continue;
                };
                let chosen = if keep_recorded {
                    recorded
                        .cluster_ips
                        .get(&p.key)
                        .into_iter()
                        .flatten()
                        .find(|a| a.is_ipv6() == v6 && range.contains(*a) && !used.contains(a))
                        .copied()
                } else {
                    range.hosts().skip(1).find(|a| !used.contains(a))
                };
                match chosen {
                    Some(ip) => {
                        used.insert(ip);
                        p.cluster_ips.push(ip);
                        record
                            .cluster_ips
                            .entry(p.key.clone())
                            .or_default()
                            .push(ip);
                    }
                    None if !keep_recorded => errors.push(error(
                        p.file,
                        format!("Service {}: spec.clusterIP", p.key),
                        format!("serviceCIDR {range} has no free address left"),
                    )),
                    None => {}
                }
            }
        }
    }
}

/// Node ports of NodePort and LoadBalancer Services, by `namespace/name/port-name`: the
/// manifest's (checked against `nodePortRange` and each other), else the recorded one,
/// else the first free one of the range.
fn allocate_node_ports(
    parsed: &[Parsed],
    config: &super::config::ClusterConfig,
    recorded: &ServiceAllocations,
    record: &mut ServiceAllocations,
    errors: &mut Vec<ManifestError>,
) -> BTreeMap<String, u16> {
    let range = config.node_port_range;
    let mut out = BTreeMap::new();
    let mut used: BTreeMap<(String, u16), String> = BTreeMap::new();
    let wanted = parsed
        .iter()
        .filter(|p| p.kind != "ClusterIP")
        .flat_map(|p| p.ports.iter().enumerate().map(move |(i, kp)| (p, i, kp)));
    let mut missing = Vec::new();
    for (p, i, kp) in wanted {
        let key = format!("{}/{}", p.key, kp.name.clone().unwrap_or_default());
        let protocol = protocol_of(kp).to_string();
        match kp.node_port {
            Some(n) if n != 0 => {
                let field = format!("Service {}: spec.ports[{i}].nodePort", p.key);
                if !(i32::from(range.first)..=i32::from(range.last)).contains(&n) {
                    errors.push(error(
                        p.file,
                        field,
                        format!("{n} is outside nodePortRange {range}"),
                    ));
                    continue;
                }
                if let Some(other) = used.insert((protocol, n as u16), key.clone()) {
                    errors.push(error(p.file, field, format!("{n} is taken by {other}")));
                    continue;
                }
                out.insert(key, n as u16);
            }
            _ => missing.push((p, protocol, key)),
        }
    }
    for keep_recorded in [true, false] {
        for (p, protocol, key) in &missing {
            if out.contains_key(key) {
                continue;
            }
            let free = |n: &u16| !used.contains_key(&(protocol.clone(), *n));
            let chosen = if keep_recorded {
                recorded
                    .node_ports
                    .get(key)
                    .copied()
                    .filter(|n| (range.first..=range.last).contains(n) && free(n))
            } else {
                (range.first..=range.last).find(free)
            };
            match chosen {
                Some(n) => {
                    used.insert((protocol.clone(), n), key.clone());
                    out.insert(key.clone(), n);
                    record.node_ports.insert(key.clone(), n);
                }
                None if !keep_recorded => errors.push(error(
                    p.file,
                    format!("Service {}: spec.ports.nodePort", p.key),
                    format!("nodePortRange {range} has no free port left"),
                )),
                None => {}
            }
        }
    }
    out
}

/// The endpoints of one Service port (by name and protocol) across its slices, as kube-proxy
/// picks them: ready ones; when none is ready, serving terminating ones; never not-ready
/// ones. `local` marks those on `node`.
pub fn select_endpoints(
    slices: &[&EndpointSlice],
    port_name: &str,
    protocol: &str,
    node: &str,
) -> Vec<Endpoint> {
    let mut ready = BTreeSet::new();
    let mut terminating = BTreeSet::new();
    for slice in slices {
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue; // FQDN slices name hosts, not addresses
        }
        let Some(port) = slice.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or_default() == port_name
                && p.protocol.as_deref().unwrap_or("TCP") == protocol
        }) else {
            continue;
        };
        let Some(number) = port.port.filter(|n| (1..=65535).contains(n)) else {
            continue;
        };
        for e in slice.endpoints.iter().flatten() {
            let Some(address) = e.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()) else {
                continue;
            };
            let c = e.conditions.clone().unwrap_or_default();
            let is_ready = c.ready.unwrap_or(true);
            let serving = c.serving.unwrap_or(is_ready);
            let endpoint = Endpoint {
                address,
                port: number as u16,
                local: e.node_name.as_deref() == Some(node),
            };
            if is_ready {
                ready.insert(endpoint);
            } else if serving && c.terminating.unwrap_or(false) {
                terminating.insert(endpoint);
            }
        }
    }
    if ready.is_empty() {
        terminating.into_iter().collect()
    } else {
        ready.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::manifests::load_text;

    fn manifests(text: &str) -> Manifests {
        let mut m = Manifests::default();
        m.config.service_cidrs = vec![
            "10.96.0.0/24".parse().unwrap(),
            "fd00:96::/112".parse().unwrap(),
        ];
        let mut errors = Vec::new();
        load_text(Path::new("test.yaml"), text, &mut m, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        m
    }

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports:
  - {name: http, port: 80, targetPort: http, protocol: TCP}
  - {name: dns, port: 53, protocol: UDP, nodePort: 30053}
  sessionAffinity: ClientIP
  externalTrafficPolicy: Local
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports:
- {name: http, port: 8080, protocol: TCP}
- {name: dns, port: 5353, protocol: UDP}
endpoints:
- addresses: ["10.244.0.5"]
  nodeName: node0
- addresses: ["10.244.1.5"]
  nodeName: node1
  conditions: {ready: true}
- addresses: ["10.244.1.6"]
  nodeName: node1
  conditions: {ready: false, serving: true, terminating: true}
- addresses: ["10.244.1.7"]
  nodeName: node1
  conditions: {ready: false}
"#;

    #[test]
    fn services_compile_with_their_ready_endpoints_and_allocated_node_ports() {
        let m = manifests(WEB);
        let (specs, record) = compile(&m, "node0", &ServiceAllocations::default()).unwrap();
        assert_eq!(specs.len(), 1);
        let web = &specs[0];
        assert_eq!((web.namespace.as_str(), web.name.as_str()), ("shop", "web"));
        assert_eq!(web.kind, "NodePort");
        assert_eq!(web.cluster_ips, vec![IpAddr::from([10, 96, 0, 10])]);
        assert_eq!(web.affinity_timeout_s, Some(DEFAULT_AFFINITY_TIMEOUT_S));
        assert!(web.external_local && !web.internal_local);
        let http = &web.ports[0];
        assert_eq!((http.protocol.as_str(), http.port), ("tcp", 80));
        let addrs: Vec<String> = http.endpoints.iter().map(ToString::to_string).collect();
        assert_eq!(
            addrs,
            ["10.244.0.5:8080", "10.244.1.5:8080"],
            "ready ones only"
        );
        assert!(http.endpoints[0].local && !http.endpoints[1].local);
        assert_eq!(http.node_port, Some(30000), "allocated from the range");
        assert_eq!(web.ports[1].node_port, Some(30053), "as the manifest says");
        assert_eq!(web.ports[1].endpoints[0].port, 5353);
        assert_eq!(record.node_ports.get("shop/web/http"), Some(&30000));
        // The allocation is kept by the next run even when another Service came first.
        let other = WEB
            .replace("name: web, namespace: shop", "name: aaa, namespace: shop")
            .replace("clusterIP: 10.96.0.10", "clusterIP: 10.96.0.20")
            .replace("nodePort: 30053", "nodePort: 30054")
            .replace("name: web-1", "name: aaa-1")
            .replace("service-name: web}", "service-name: aaa}");
        let m = manifests(&format!("{WEB}\n---\n{other}"));
        let (specs, _) = compile(&m, "node0", &record).unwrap();
        let web = specs.iter().find(|s| s.name == "web").unwrap();
        assert_eq!(web.ports[0].node_port, Some(30000));
    }

    #[test]
    fn terminating_endpoints_serve_only_when_none_is_ready() {
        let m = manifests(
            &WEB.replace("conditions: {ready: true}", "conditions: {ready: false}")
                .replace("- addresses: [\"10.244.0.5\"]\n  nodeName: node0\n", ""),
        );
        let (specs, _) = compile(&m, "node1", &ServiceAllocations::default()).unwrap();
        let addrs: Vec<String> = specs[0].ports[0]
            .endpoints
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            addrs,
            ["10.244.1.6:8080"],
            "the serving terminating one, not the not-ready ones"
        );
        assert!(specs[0].ports[0].endpoints[0].local);
    }

    #[test]
    fn missing_cluster_ips_are_allocated_per_family_and_kept() {
        let text = r#"
apiVersion: v1
kind: Service
metadata: {name: dual}
spec:
  ipFamilyPolicy: PreferDualStack
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: one}
spec:
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: headless}
spec:
  clusterIP: None
  ports: [{port: 80}]
"#;
        let m = manifests(text);
        let (specs, record) = compile(&m, "node0", &ServiceAllocations::default()).unwrap();
        assert_eq!(specs.len(), 2, "the headless Service has nothing to serve");
        let dual = specs.iter().find(|s| s.name == "dual").unwrap();
        assert_eq!(dual.cluster_ips.len(), 2);
        assert!(dual.cluster_ips[0].is_ipv4() && dual.cluster_ips[1].is_ipv6());
        let one = specs.iter().find(|s| s.name == "one").unwrap();
        assert_eq!(one.cluster_ips.len(), 1);
        assert_ne!(one.cluster_ips[0], dual.cluster_ips[0]);
        let (again, _) = compile(&m, "node0", &record).unwrap();
        assert_eq!(again, specs, "the same addresses on the next run");
    }

    #[test]
    fn errors_name_the_service_and_field() {
        let bad = WEB.replace("clusterIP: 10.96.0.10", "clusterIP: 10.97.0.10");
        let errors =
            compile(&manifests(&bad), "node0", &ServiceAllocations::default()).unwrap_err();
        assert!(
            errors[0]
                .field
                .contains("Service shop/web: spec.clusterIPs"),
            "{errors:?}"
        );
        assert!(
            errors[0].message.contains("outside serviceCIDR"),
            "{errors:?}"
        );
        let bad = WEB.replace("nodePort: 30053", "nodePort: 80");
        let errors =
            compile(&manifests(&bad), "node0", &ServiceAllocations::default()).unwrap_err();
        assert!(
            errors[0].message.contains("outside nodePortRange"),
            "{errors:?}"
        );
        let bad = WEB.replace("protocol: UDP, nodePort", "protocol: ICMP, nodePort");
        let errors =
            compile(&manifests(&bad), "node0", &ServiceAllocations::default()).unwrap_err();
        assert!(
            errors[0].message.contains("not TCP, UDP or SCTP"),
            "{errors:?}"
        );
    }
}
