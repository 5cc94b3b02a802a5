//! Reading cluster state from a directory of Kubernetes manifests (YAML or JSON, several
//! documents per file) in Kubernetes' own shapes: `v1/Node`, `v1/Service` and
//! `discovery.k8s.io/v1/EndpointSlice` objects and the `switchyard-config` ConfigMap. Objects are decoded into `k8s-openapi` types, so the same
//! code later reads them from the API server. Every problem names the file and the field.

use super::config::ClusterConfig;
use super::keyed::{Keyed, ObjectKey};
use super::pods::{pod_view, PodFields, PodView, Pods};
use super::services::{ServiceManifest, SliceManifest};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Service};
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

/// The cluster state: everything read from a manifests directory or watched on the API
/// server, each kind kept by key so that one object changes in place.
#[derive(Debug, Clone, Default)]
pub struct Manifests {
    /// Nodes (sorted by name when read from a directory).
    pub nodes: Keyed<NodeRecord>,
    /// The cluster configuration (defaults when no ConfigMap is present).
    pub config: ClusterConfig,
    /// The file the configuration came from.
    pub config_file: Option<PathBuf>,
    /// Services, as read.
    pub services: Keyed<ServiceManifest>,
    /// EndpointSlices, as read (`v1`, or `v1beta1` as older API servers serve them).
    pub endpoint_slices: Keyed<SliceManifest>,
    /// Namespaces (their labels, for NetworkPolicy's namespace selectors).
    pub namespaces: Keyed<Namespace>,
    /// Pods (labels, named ports, addresses), indexed by label and node.
    pub pods: Pods,
    /// NetworkPolicies, as read.
    pub policies: Keyed<PolicyManifest>,
    /// The key of the ConfigMap the configuration came from.
    config_key: Option<ObjectKey>,
}

/// A NetworkPolicy read from a manifest, with the file it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyManifest {
    /// The object.
    pub policy: NetworkPolicy,
    /// Its file.
    pub file: PathBuf,
}

/// The kinds of object the cluster state holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// `v1/Node`.
    Node,
    /// The `switchyard-config` ConfigMap.
    Config,
    /// `v1/Service`.
    Service,
    /// `discovery.k8s.io/v1/EndpointSlice`.
    EndpointSlice,
    /// `v1/Namespace`.
    Namespace,
    /// `v1/Pod`.
    Pod,
    /// `networking.k8s.io/v1/NetworkPolicy`.
    NetworkPolicy,
}

/// A set of kinds (what changed since the state was last read).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kinds(u8);

impl Kinds {
    /// Every kind.
    pub const ALL: Kinds = Kinds(0x7f);

    /// Adds `kind`.
    pub fn add(&mut self, kind: Kind) {
        self.0 |= 1 << kind as u8;
    }

    /// True when `kind` is in the set.
    pub fn has(self, kind: Kind) -> bool {
        self.0 & (1 << kind as u8) != 0
    }

    /// True when any of `kinds` is in the set.
    pub fn any(self, kinds: &[Kind]) -> bool {
        kinds.iter().any(|k| self.has(*k))
    }

    /// True when the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Both sets.
    pub fn union(self, other: Kinds) -> Kinds {
        Kinds(self.0 | other.0)
    }
}

/// One decoded object, as the cluster state keeps it.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// A Node.
    Node(NodeRecord),
    /// The `switchyard-config` ConfigMap's configuration, and where it came from.
    Config(Box<ClusterConfig>, PathBuf),
    /// A Service.
    Service(Box<ServiceManifest>),
    /// An EndpointSlice.
    EndpointSlice(Box<SliceManifest>),
    /// A Namespace.
    Namespace(Box<Namespace>),
    /// A Pod.
    Pod(Box<PodView>),
    /// A NetworkPolicy.
    NetworkPolicy(Box<PolicyManifest>),
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Node => "Node",
            Kind::Config => "ConfigMap",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Namespace => "Namespace",
            Kind::Pod => "Pod",
            Kind::NetworkPolicy => "NetworkPolicy",
        })
    }
}

impl Object {
    /// Its kind.
    pub fn kind(&self) -> Kind {
        match self {
            Object::Node(_) => Kind::Node,
            Object::Config(..) => Kind::Config,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Namespace(_) => Kind::Namespace,
            Object::Pod(_) => Kind::Pod,
            Object::NetworkPolicy(_) => Kind::NetworkPolicy,
        }
    }

    /// The file it came from, where it keeps one.
    fn file(&self) -> Option<&Path> {
        match self {
            Object::Node(n) => Some(&n.file),
            Object::Config(_, f) => Some(f),
            Object::Service(s) => Some(&s.file),
            Object::EndpointSlice(s) => Some(&s.file),
            Object::NetworkPolicy(p) => Some(&p.file),
            Object::Namespace(_) | Object::Pod(_) => None,
        }
    }
}

impl Manifests {
    /// Puts `object` under `key`; returns the object it replaced.
    pub fn put(&mut self, key: ObjectKey, object: Object) -> Option<Object> {
        match object {
            Object::Node(n) => self.nodes.insert(key, n).1.map(Object::Node),
            Object::Config(config, file) => {
                self.config_key = Some(key);
                let old_file = self.config_file.replace(file);
                let old = std::mem::replace(&mut self.config, *config);
                old_file.map(|f| Object::Config(Box::new(old), f))
            }
            Object::Service(s) => self
                .services
                .insert(key, *s)
                .1
                .map(|s| Object::Service(Box::new(s))),
            Object::EndpointSlice(s) => self
                .endpoint_slices
                .insert(key, *s)
                .1
                .map(|s| Object::EndpointSlice(Box::new(s))),
            Object::Namespace(n) => self
                .namespaces
                .insert(key, *n)
                .1
                .map(|n| Object::Namespace(Box::new(n))),
            Object::Pod(p) => self.pods.insert(*p).map(|p| Object::Pod(Box::new(p))),
            Object::NetworkPolicy(p) => self
                .policies
                .insert(key, *p)
                .1
                .map(|p| Object::NetworkPolicy(Box::new(p))),
        }
    }

    /// True when the state holds `object` under `key` already.
    pub fn holds(&self, key: &ObjectKey, object: &Object) -> bool {
        match object {
            Object::Node(n) => self.nodes.get(key) == Some(n),
            Object::Config(config, file) => {
                self.config_key.as_ref() == Some(key)
                    && self.config_file.as_ref() == Some(file)
                    && &self.config == config.as_ref()
            }
            Object::Service(s) => self.services.get(key) == Some(s.as_ref()),
            Object::EndpointSlice(s) => self.endpoint_slices.get(key) == Some(s.as_ref()),
            Object::Namespace(n) => self.namespaces.get(key) == Some(n.as_ref()),
            Object::Pod(p) => self.pods.get(key) == Some(p.as_ref()),
            Object::NetworkPolicy(p) => self.policies.get(key) == Some(p.as_ref()),
        }
    }

    /// The keys of every object of `kind`.
    pub fn keys(&self, kind: Kind) -> Vec<ObjectKey> {
        fn of<T>(list: &Keyed<T>) -> Vec<ObjectKey> {
            list.keys().cloned().collect()
        }
        match kind {
            Kind::Node => of(&self.nodes),
            Kind::Config => self.config_key.iter().cloned().collect(),
            Kind::Service => of(&self.services),
            Kind::EndpointSlice => of(&self.endpoint_slices),
            Kind::Namespace => of(&self.namespaces),
            Kind::Pod => self.pods.keys().cloned().collect(),
            Kind::NetworkPolicy => of(&self.policies),
        }
    }

    /// Takes the object of `kind` under `key` out; returns whether there was one.
    pub fn remove(&mut self, kind: Kind, key: &ObjectKey) -> bool {
        match kind {
            Kind::Node => self.nodes.remove(key).is_some(),
            Kind::Config if self.config_key.as_ref() == Some(key) => {
                self.config_key = None;
                self.config = ClusterConfig::default();
                self.config_file.take().is_some()
            }
            Kind::Config => false,
            Kind::Service => self.services.remove(key).is_some(),
            Kind::EndpointSlice => self.endpoint_slices.remove(key).is_some(),
            Kind::Namespace => self.namespaces.remove(key).is_some(),
            Kind::Pod => self.pods.remove(key).is_some(),
            Kind::NetworkPolicy => self.policies.remove(key).is_some(),
        }
    }
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

/// Reads one object (`what` names it in errors: `document 2`, `Node node-a`) into `out`;
/// an object defined twice is an error.
pub fn load_value(
    file: &Path,
    what: &str,
    value: serde_json::Value,
    out: &mut Manifests,
    errors: &mut Vec<ManifestError>,
) {
    let Some((key, object)) = decode_value(file, what, value).unwrap_or_else(|e| {
        errors.push(e);
        None
    }) else {
        return;
    };
    let what = describe(object.kind(), &key);
    if let Some(previous) = out.put(key, object) {
        let also = previous
            .file()
            .map(|f| format!(" (also in {})", f.display()))
            .unwrap_or_default();
        errors.push(error(file, what, format!("defined twice{also}")));
    }
}

/// An object as messages name it: `Node node-a`, `Pod x/a`.
pub fn describe(kind: Kind, (namespace, name): &ObjectKey) -> String {
    if namespace.is_empty() {
        format!("{kind} {name}")
    } else {
        format!("{kind} {namespace}/{name}")
    }
}

/// Decodes one object (`what` names it in errors): its key and what the cluster state
/// keeps of it; `None` for the kinds and ConfigMaps that are not Switchyard's.
pub fn decode_value(
    file: &Path,
    what: &str,
    value: serde_json::Value,
) -> Result<Option<(ObjectKey, Object)>, ManifestError> {
    let kind = value
        .get("kind")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_string();
    let api_version = value
        .get("apiVersion")
        .and_then(|k| k.as_str())
        .unwrap_or_default();
    let decode_error =
        |kind: &str, e: serde_json::Error| error(file, format!("{what}: {kind}"), e.to_string());
    let key = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
               namespaced: bool| {
        let namespace = if namespaced {
            meta.namespace.clone().unwrap_or_else(|| "default".into())
        } else {
            String::new()
        };
        (namespace, meta.name.clone().unwrap_or_default())
    };
    let file_buf = || file.to_path_buf();
    Ok(Some(match (api_version, kind.as_str()) {
        ("v1", "Node") => {
            let node =
                serde_json::from_value::<Node>(value).map_err(|e| decode_error("Node", e))?;
            let record = node_record(file, &node)?;
            ((String::new(), record.name.clone()), Object::Node(record))
        }
        ("v1", "ConfigMap") => {
            let map = serde_json::from_value::<ConfigMap>(value)
                .map_err(|e| decode_error("ConfigMap", e))?;
            if map.metadata.name.as_deref() != Some(CONFIG_MAP) {
                return Ok(None); // other ConfigMaps are not ours
            }
            let field = format!("ConfigMap {CONFIG_MAP}: data.{CONFIG_KEY}");
            let text = map
                .data
                .as_ref()
                .and_then(|d| d.get(CONFIG_KEY))
                .ok_or_else(|| error(file, &field, "missing"))?;
            let config = ClusterConfig::parse(text).map_err(|e| error(file, &field, e))?;
            (
                key(&map.metadata, true),
                Object::Config(Box::new(config), file_buf()),
            )
        }
        ("v1", "Service") => {
            let service =
                serde_json::from_value::<Service>(value).map_err(|e| decode_error("Service", e))?;
            let k = key(&service.metadata, true);
            (
                k,
                Object::Service(Box::new(ServiceManifest {
                    service,
                    file: file_buf(),
                })),
            )
        }
        ("discovery.k8s.io/v1" | "discovery.k8s.io/v1beta1", "EndpointSlice") => {
            let slice = serde_json::from_value::<EndpointSlice>(beta_slice_as_v1(value))
                .map_err(|e| decode_error("EndpointSlice", e))?;
            let k = key(&slice.metadata, true);
            (
                k,
                Object::EndpointSlice(Box::new(SliceManifest {
                    slice,
                    file: file_buf(),
                })),
            )
        }
        ("v1", "Namespace") => {
            let ns = serde_json::from_value::<Namespace>(value)
                .map_err(|e| decode_error("Namespace", e))?;
            (key(&ns.metadata, false), Object::Namespace(Box::new(ns)))
        }
        ("v1", "Pod") => {
            let pod =
                serde_json::from_value::<PodFields>(value).map_err(|e| decode_error("Pod", e))?;
            pod_object(&pod)
        }
        ("networking.k8s.io/v1", "NetworkPolicy") => {
            let policy = serde_json::from_value::<NetworkPolicy>(value)
                .map_err(|e| decode_error("NetworkPolicy", e))?;
            let k = key(&policy.metadata, true);
            (
                k,
                Object::NetworkPolicy(Box::new(PolicyManifest {
                    policy,
                    file: file_buf(),
                })),
            )
        }
        _ => return Ok(None), // other kinds are not Switchyard's business
    }))
}

/// A pod's key and what the state keeps of it.
pub fn pod_object(pod: &PodFields) -> (ObjectKey, Object) {
    let view = pod_view(pod);
    (
        (view.namespace.clone(), view.name.clone()),
        Object::Pod(Box::new(view)),
    )
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
