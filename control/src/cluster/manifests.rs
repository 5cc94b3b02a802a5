//! Reading cluster state from a directory of Kubernetes manifests (YAML or JSON, several
//! documents per file) in Kubernetes' own shapes: `v1/Node`, `v1/Service` and
//! `discovery.k8s.io/v1/EndpointSlice` objects and the `switchyard-config` ConfigMap. Objects are decoded into `k8s-openapi` types, so the same
//! code later reads them from the API server. Every problem names the file and the field.

use super::config::ClusterConfig;
use super::services::{ServiceManifest, SliceManifest};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::Deserialize;
use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Name of the ConfigMap holding Switchyard's cluster configuration.
pub const CONFIG_MAP: &str = "switchyard-config";
/// Key of the configuration inside that ConfigMap.
pub const CONFIG_KEY: &str = "config.yaml";

/// A problem in one manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    /// The file it is in.
    pub file: PathBuf,
    /// The object and field (`Node node-a: spec.podCIDR`), or empty for the whole file.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.field,
                self.message
            )
        }
    }
}

/// A node as Switchyard needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// `metadata.name`.
    pub name: String,
    /// `spec.podCIDRs` (or `spec.podCIDR`), possibly empty until allocated.
    pub pod_cidrs: Vec<IpNet>,
    /// The first `InternalIP` of `status.addresses`.
    pub internal_ip: Option<IpAddr>,
    /// Every InternalIP (IPv4 and IPv6).
    pub internal_ips: Vec<IpAddr>,
    /// The file the node came from.
    pub file: PathBuf,
}

/// Everything read from a manifests directory.
#[derive(Debug, Clone, Default)]
pub struct Manifests {
    /// Nodes, sorted by name.
    pub nodes: Vec<NodeRecord>,
    /// The cluster configuration (defaults when no ConfigMap is present).
    pub config: ClusterConfig,
    /// The file the configuration came from.
    pub config_file: Option<PathBuf>,
    /// Services, as read.
    pub services: Vec<ServiceManifest>,
    /// EndpointSlices, as read (`v1`, or `v1beta1` as older API servers serve them).
    pub endpoint_slices: Vec<SliceManifest>,
    /// Namespaces (their labels, for NetworkPolicy's namespace selectors).
    pub namespaces: Vec<Namespace>,
    /// Pods (labels, named ports, addresses).
    pub pods: Vec<Pod>,
    /// NetworkPolicies, as read.
    pub policies: Vec<PolicyManifest>,
}

/// A NetworkPolicy read from a manifest, with the file it came from.
#[derive(Debug, Clone)]
pub struct PolicyManifest {
    /// The object.
    pub policy: NetworkPolicy,
    /// Its file.
    pub file: PathBuf,
}

fn error(file: &Path, field: impl Into<String>, message: impl Into<String>) -> ManifestError {
    ManifestError {
        file: file.to_path_buf(),
        field: field.into(),
        message: message.into(),
    }
}

/// Reads every `*.yaml`, `*.yml` and `*.json` file of `dir` but hidden ones (the
/// allocation record is `.switchyard-allocations.json`). Returns every problem found, not
/// only the first.
pub fn load_dir(dir: &Path) -> Result<Manifests, Vec<ManifestError>> {
    let entries = std::fs::read_dir(dir)
        .map_err(|e| vec![error(dir, "", format!("cannot read the directory: {e}"))])?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            let hidden = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_none_or(|n| n.starts_with('.'));
            !hidden
                && matches!(
                    p.extension().and_then(|e| e.to_str()),
                    Some("yaml" | "yml" | "json")
                )
        })
        .collect();
    files.sort();
    let mut out = Manifests::default();
    let mut errors = Vec::new();
    for file in &files {
        match std::fs::read_to_string(file) {
            Ok(text) => load_text(file, &text, &mut out, &mut errors),
            Err(e) => errors.push(error(file, "", format!("cannot read: {e}"))),
        }
    }
    out.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    for pair in out.nodes.windows(2) {
        if pair[0].name == pair[1].name {
            errors.push(error(
                &pair[1].file,
                format!("Node {}", pair[1].name),
                format!("defined twice (also in {})", pair[0].file.display()),
            ));
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Reads the documents of one file's text into `out`.
pub fn load_text(file: &Path, text: &str, out: &mut Manifests, errors: &mut Vec<ManifestError>) {
    for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let value = match serde_json::Value::deserialize(document) {
            Ok(v) => v,
            Err(e) => {
                errors.push(error(
                    file,
                    format!("document {}", index + 1),
                    format!("invalid YAML: {e}"),
                ));
                return;
            }
        };
        if value.is_null() {
            continue;
        }
        load_value(file, &format!("document {}", index + 1), value, out, errors);
    }
}

/// Reads one object (`what` names it in errors: `document 2`, `Node node-a`) into `out`.
pub fn load_value(
    file: &Path,
    what: &str,
    value: serde_json::Value,
    out: &mut Manifests,
    errors: &mut Vec<ManifestError>,
) {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_string();
    let api_version = value
        .get("apiVersion")
        .and_then(|k| k.as_str())
        .unwrap_or_default();
    match (api_version, kind.as_str()) {
        ("v1", "Node") => match serde_json::from_value::<Node>(value) {
            Ok(node) => match node_record(file, &node) {
                Ok(record) => out.nodes.push(record),
                Err(e) => errors.push(e),
            },
            Err(e) => errors.push(error(file, format!("{what}: Node"), e.to_string())),
        },
        ("v1", "ConfigMap") => match serde_json::from_value::<ConfigMap>(value) {
            Ok(map) if map.metadata.name.as_deref() == Some(CONFIG_MAP) => {
                let field = format!("ConfigMap {CONFIG_MAP}: data.{CONFIG_KEY}");
                let Some(text) = map.data.as_ref().and_then(|d| d.get(CONFIG_KEY)) else {
                    errors.push(error(file, field, "missing"));
                    return;
                };
                match ClusterConfig::parse(text) {
                    Ok(config) => {
                        if let Some(previous) = &out.config_file {
                            errors.push(error(
                                file,
                                field,
                                format!(
                                    "a second {CONFIG_MAP} (the first is in {})",
                                    previous.display()
                                ),
                            ));
                        }
                        out.config = config;
                        out.config_file = Some(file.to_path_buf());
                    }
                    Err(e) => errors.push(error(file, field, e)),
                }
            }
            Ok(_) => {} // other ConfigMaps are not ours
            Err(e) => errors.push(error(file, format!("{what}: ConfigMap"), e.to_string())),
        },
        ("v1", "Service") => match serde_json::from_value::<Service>(value) {
            Ok(service) => out.services.push(ServiceManifest {
                service,
                file: file.to_path_buf(),
            }),
            Err(e) => errors.push(error(file, format!("{what}: Service"), e.to_string())),
        },
        ("discovery.k8s.io/v1" | "discovery.k8s.io/v1beta1", "EndpointSlice") => {
            match serde_json::from_value::<EndpointSlice>(beta_slice_as_v1(value)) {
                Ok(slice) => out.endpoint_slices.push(SliceManifest {
                    slice,
                    file: file.to_path_buf(),
                }),
                Err(e) => errors.push(error(file, format!("{what}: EndpointSlice"), e.to_string())),
            }
        }
        ("v1", "Namespace") => match serde_json::from_value::<Namespace>(value) {
            Ok(ns) => out.namespaces.push(ns),
            Err(e) => errors.push(error(file, format!("{what}: Namespace"), e.to_string())),
        },
        ("v1", "Pod") => match serde_json::from_value::<Pod>(value) {
            Ok(pod) => out.pods.push(pod),
            Err(e) => errors.push(error(file, format!("{what}: Pod"), e.to_string())),
        },
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            match serde_json::from_value::<NetworkPolicy>(value) {
                Ok(policy) => out.policies.push(PolicyManifest {
                    policy,
                    file: file.to_path_buf(),
                }),
                Err(e) => errors.push(error(file, format!("{what}: NetworkPolicy"), e.to_string())),
            }
        }
        _ => {} // other kinds are not Switchyard's business
    }
}

/// A `discovery.k8s.io/v1beta1` EndpointSlice in `v1`'s shape: the same fields but for the
/// endpoints' `topology` map, which `v1` splits into `nodeName` and `zone`.
fn beta_slice_as_v1(mut value: serde_json::Value) -> serde_json::Value {
    if let Some(map) = value.as_object_mut() {
        map.insert("apiVersion".into(), "discovery.k8s.io/v1".into());
    }
    if let Some(endpoints) = value.get_mut("endpoints").and_then(|e| e.as_array_mut()) {
        for e in endpoints {
            let Some(topology) = e.as_object_mut().and_then(|o| o.remove("topology")) else {
                continue;
            };
            if let Some(node) = topology.get("kubernetes.io/hostname") {
                if e.get("nodeName").is_none() {
                    e["nodeName"] = node.clone();
                }
            }
        }
    }
    value
}

fn node_record(file: &Path, node: &Node) -> Result<NodeRecord, ManifestError> {
    let name = node
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| error(file, "Node: metadata.name", "missing"))?;
    let at = |field: &str| format!("Node {name}: {field}");
    let spec = node.spec.clone().unwrap_or_default();
    let mut texts: Vec<(String, String)> = Vec::new();
    if let Some(list) = &spec.pod_cidrs {
        texts.extend(
            list.iter()
                .enumerate()
                .map(|(i, c)| (format!("spec.podCIDRs[{i}]"), c.clone())),
        );
    } else if let Some(one) = &spec.pod_cidr {
        texts.push(("spec.podCIDR".into(), one.clone()));
    }
    let mut pod_cidrs = Vec::new();
    for (field, text) in texts {
        let cidr: IpNet = text
            .parse()
            .map_err(|_| error(file, at(&field), format!("{text:?} is not a CIDR")))?;
        if cidr.trunc() != cidr {
            return Err(error(
                file,
                at(&field),
                format!("{cidr} has host bits set (did you mean {}?)", cidr.trunc()),
            ));
        }
        pod_cidrs.push(cidr);
    }
    let mut internal_ips: Vec<IpAddr> = Vec::new();
    for a in node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
    {
        internal_ips.push(a.address.parse().map_err(|_| {
            error(
                file,
                at("status.addresses[InternalIP]"),
                format!("{:?} is not an IP address", a.address),
            )
        })?);
    }
    let internal_ip = internal_ips
        .iter()
        .copied()
        .find(IpAddr::is_ipv4)
        .or_else(|| internal_ips.first().copied());
    Ok(NodeRecord {
        name,
        pod_cidrs,
        internal_ip,
        internal_ips,
        file: file.to_path_buf(),
    })
}
