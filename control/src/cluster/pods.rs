//! The cluster's pods as the agent needs them (namespace, name, labels, addresses, node,
//! named ports), indexed by label and by node so that NetworkPolicy's selectors and one
//! node's pods are found without a pass over every pod of the cluster. The indexes follow
//! each change in place.

use super::keyed::{Keyed, Moved, ObjectKey};
use k8s_openapi::api::core::v1::{ContainerPort, PodIP};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Deserializer};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::ops::Deref;

/// A pod as policies see it: namespace, name, labels, address, container ports. Kept small:
/// a cluster has hundreds of thousands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodView {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: Labels,
    /// `status.podIPs` (first).
    pub ip: Option<IpAddr>,
    /// `status.podIPs` (all).
    pub ips: Vec<IpAddr>,
    /// `spec.nodeName`.
    pub node: Option<String>,
    /// Named container ports.
    pub ports: Box<[NamedPort]>,
}

/// A named container port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedPort {
    /// Its name.
    pub name: Box<str>,
    /// Its number.
    pub port: u16,
    /// Its protocol's number (`None`: a protocol NetworkPolicy does not know).
    pub protocol: Option<u8>,
}

impl PodView {
    /// The container port named `name`: number and protocol.
    pub fn port(&self, name: &str) -> Option<&NamedPort> {
        self.ports.iter().find(|p| &*p.name == name)
    }
}

/// A set of labels, sorted by key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(Box<[(Box<str>, Box<str>)]>);

impl Labels {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .binary_search_by(|(k, _)| (**k).cmp(key))
            .ok()
            .map(|at| &*self.0[at].1)
    }

    /// Every (key, value).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (&**k, &**v))
    }
}

impl From<&BTreeMap<String, String>> for Labels {
    fn from(map: &BTreeMap<String, String>) -> Self {
        Self(
            map.iter()
                .map(|(k, v)| (k.as_str().into(), v.as_str().into()))
                .collect(),
        )
    }
}

/// Something with labels a selector reads.
pub trait LabelSet {
    /// The value of `key`.
    fn label(&self, key: &str) -> Option<&str>;
}

impl LabelSet for Labels {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key)
    }
}

impl LabelSet for BTreeMap<String, String> {
    fn label(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

/// The IP protocol number of a Kubernetes protocol name (TCP, UDP, SCTP).
pub fn protocol_number(name: &str) -> Option<u8> {
    match name.to_ascii_uppercase().as_str() {
        "TCP" => Some(6),
        "UDP" => Some(17),
        "SCTP" => Some(132),
        _ => None,
    }
}

/// A `v1/Pod` as Switchyard reads it, decoded straight from its JSON: the fields a
/// [`PodView`] needs, typed as in `k8s-openapi`. Everything else (the containers' images,
/// `managedFields`, conditions) is skipped without being built, which makes a list of
/// 150,000 pods several times cheaper to decode than as whole `Pod`s.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PodFields {
    /// `metadata`: name, namespace, labels, uid and resourceVersion only.
    #[serde(default, deserialize_with = "lean_metadata")]
    pub metadata: ObjectMeta,
    /// `spec`: the node and the containers' ports.
    #[serde(default)]
    pub spec: Option<PodSpecFields>,
    /// `status`: the addresses.
    #[serde(default)]
    pub status: Option<PodStatusFields>,
}

/// The part of `spec` a pod's view reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpecFields {
    /// `spec.nodeName`.
    #[serde(default)]
    pub node_name: Option<String>,
    /// `spec.containers`, their ports only.
    #[serde(default)]
    pub containers: Vec<ContainerFields>,
}

/// A container's ports.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ContainerFields {
    /// `ports`.
    #[serde(default)]
    pub ports: Option<Vec<ContainerPort>>,
}

/// The part of `status` a pod's view reads.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatusFields {
    /// `status.podIP`.
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    /// `status.podIPs`.
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Option<Vec<PodIP>>,
}

/// Decodes the metadata fields any view reads (and a watch's bookkeeping needs), skipping
/// the rest.
fn lean_metadata<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Lean {
        name: Option<String>,
        namespace: Option<String>,
        labels: Option<BTreeMap<String, String>>,
        uid: Option<String>,
        resource_version: Option<String>,
    }
    let lean = Lean::deserialize(d)?;
    Ok(ObjectMeta {
        name: lean.name,
        namespace: lean.namespace,
        labels: lean.labels,
        uid: lean.uid,
        resource_version: lean.resource_version,
        ..ObjectMeta::default()
    })
}

/// Builds the view of a pod.
pub fn pod_view(pod: &PodFields) -> PodView {
    let meta = &pod.metadata;
    let mut ports: Vec<NamedPort> = Vec::new();
    for c in pod.spec.iter().flat_map(|s| &s.containers) {
        for p in c.ports.iter().flatten() {
            if let Some(name) = &p.name {
                let port = NamedPort {
                    name: name.as_str().into(),
                    port: p.container_port as u16,
                    protocol: protocol_number(p.protocol.as_deref().unwrap_or("TCP")),
                };
                // A later container's port of the same name wins, as a map's insert would.
                match ports.iter_mut().find(|q| q.name == port.name) {
                    Some(q) => *q = port,
                    None => ports.push(port),
                }
            }
        }
    }
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse().ok())
        .collect();
    if ips.is_empty() {
        ips.extend(status.and_then(|s| s.pod_ip.as_ref()?.parse::<IpAddr>().ok()));
    }
    ips.shrink_to_fit();
    PodView {
        namespace: meta.namespace.clone().unwrap_or_else(|| "default".into()),
        name: meta.name.clone().unwrap_or_default(),
        labels: meta.labels.as_ref().map(Labels::from).unwrap_or_default(),
        ip: ips.first().copied(),
        ips,
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        ports: ports.into(),
    }
}

/// The pods, read as a slice, with their label and node indexes.
#[derive(Debug, Clone, Default)]
pub struct Pods {
    list: Keyed<PodView>,
    index: PodIndex,
}

/// Pods' positions by label (`key`, `value`) and by node (empty: no node).
#[derive(Debug, Clone, Default)]
struct PodIndex {
    by_label: HashMap<(String, String), HashSet<u32>>,
    by_node: HashMap<String, HashSet<u32>>,
}

impl Pods {
    /// Puts `pod` in (replacing the pod of the same namespace and name); returns the pod it
    /// replaced.
    pub fn insert(&mut self, pod: PodView) -> Option<PodView> {
        let key = (pod.namespace.clone(), pod.name.clone());
        let (at, old) = self.list.insert(key, pod);
        if let Some(old) = &old {
            self.index.remove(at, old);
        }
        self.index.add(at, &self.list[at]);
        old
    }

    /// Takes out the pod `key` (namespace, name).
    pub fn remove(&mut self, key: &ObjectKey) -> Option<PodView> {
        let (at, old, moved) = self.list.remove(key)?;
        self.index.remove(at, &old);
        if let Moved::Object { from, to } = moved {
            self.index.remove(from, &self.list[to]);
            self.index.add(to, &self.list[to]);
        }
        Some(old)
    }

    /// The pod `key` (namespace, name).
    pub fn get(&self, key: &ObjectKey) -> Option<&PodView> {
        self.list.get(key)
    }

    /// Every pod's key, in the list's order.
    pub fn keys(&self) -> impl Iterator<Item = &ObjectKey> {
        self.list.keys()
    }

    /// The positions of the pods labelled `key`=`value`.
    pub fn with_label(&self, key: &str, value: &str) -> Vec<usize> {
        // A lookup by borrowed pair would need a custom key type; labels are short.
        self.index
            .by_label
            .get(&(key.to_string(), value.to_string()))
            .map(|s| s.iter().map(|&i| i as usize).collect())
            .unwrap_or_default()
    }

    /// The positions of the pods that name `node`, and of those that name no node.
    pub fn on_node(&self, node: &str) -> Vec<usize> {
        let mut out: Vec<usize> = [node, ""]
            .iter()
            .filter_map(|n| self.index.by_node.get(*n))
            .flatten()
            .map(|&i| i as usize)
            .collect();
        out.sort_unstable();
        out
    }
}

impl PodIndex {
    /// Indexes `pod` at position `at`.
    fn add(&mut self, at: usize, pod: &PodView) {
        for (k, v) in pod.labels.iter() {
            self.by_label
                .entry((k.to_string(), v.to_string()))
                .or_default()
                .insert(at as u32);
        }
        self.by_node
            .entry(pod.node.clone().unwrap_or_default())
            .or_default()
            .insert(at as u32);
    }

    /// Forgets `pod` at position `at`.
    fn remove(&mut self, at: usize, pod: &PodView) {
        for (k, v) in pod.labels.iter() {
            forget(&mut self.by_label, (k.to_string(), v.to_string()), at);
        }
        forget(&mut self.by_node, pod.node.clone().unwrap_or_default(), at);
    }
}

/// Takes `at` out of `map[key]`, and the set when it empties.
fn forget<K: std::hash::Hash + Eq>(map: &mut HashMap<K, HashSet<u32>>, key: K, at: usize) {
    if let Some(set) = map.get_mut(&key) {
        set.remove(&(at as u32));
        if set.is_empty() {
            map.remove(&key);
        }
    }
}

impl Deref for Pods {
    type Target = [PodView];

    fn deref(&self) -> &[PodView] {
        &self.list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pod as a kubelet-updated API server serves it: the view takes what it reads and
    /// skips the rest, managedFields and unknown fields included.
    #[test]
    fn a_pod_decodes_from_its_json_into_the_fields_its_view_reads() {
        let json = br#"{
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1",
                "resourceVersion": "42", "labels": {"app": "web", "tier": "front"},
                "annotations": {"a": "b"}, "creationTimestamp": "2026-12-02T10:00:00Z",
                "managedFields": [{"manager": "kubelet", "operation": "Update",
                    "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {"f:podIPs": {}}}}]},
            "spec": {"nodeName": "n1", "restartPolicy": "Always",
                "containers": [
                    {"name": "a", "image": "busybox", "ports": [
                        {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                        {"containerPort": 9000}]},
                    {"name": "b", "image": "busybox", "ports": [
                        {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                        {"name": "http", "containerPort": 8081}]}]},
            "status": {"phase": "Running", "podIP": "10.244.1.5",
                "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00:244:1::5"}],
                "conditions": [{"type": "Ready", "status": "True"}]}
        }"#;
        let fields: PodFields = serde_json::from_slice(json).unwrap();
        assert_eq!(fields.metadata.resource_version.as_deref(), Some("42"));
        assert!(fields.metadata.managed_fields.is_none());
        let view = pod_view(&fields);
        assert_eq!(
            (view.namespace.as_str(), view.name.as_str()),
            ("shop", "web-1")
        );
        assert_eq!(view.labels.get("tier"), Some("front"));
        assert_eq!(view.node.as_deref(), Some("n1"));
        let ips: Vec<IpAddr> = vec![
            "10.244.1.5".parse().unwrap(),
            "fd00:244:1::5".parse().unwrap(),
        ];
        assert_eq!(view.ips, ips);
        assert_eq!(view.ip, Some(ips[0]));
        // Named ports only; a later container's port of the same name wins.
        let ports: Vec<(&str, u16, Option<u8>)> = view
            .ports
            .iter()
            .map(|p| (&*p.name, p.port, p.protocol))
            .collect();
        assert_eq!(ports, [("http", 8081, Some(6)), ("dns", 53, Some(17))]);
    }

    #[test]
    fn a_pod_without_spec_or_status_has_an_empty_view_in_the_default_namespace() {
        let fields: PodFields = serde_json::from_slice(br#"{"metadata": {"name": "p"}}"#).unwrap();
        let view = pod_view(&fields);
        assert_eq!(
            (view.namespace.as_str(), view.node.clone(), view.ip),
            ("default", None, None)
        );
        assert!(serde_json::from_slice::<PodFields>(br#"{"metadata": {"name": 5}}"#).is_err());
    }

    fn pod(ns: &str, name: &str, app: &str, node: Option<&str>) -> PodView {
        PodView {
            namespace: ns.into(),
            name: name.into(),
            labels: Labels::from(&BTreeMap::from([("app".to_string(), app.to_string())])),
            ip: None,
            ips: Vec::new(),
            node: node.map(Into::into),
            ports: Box::default(),
        }
    }

    fn names(pods: &Pods, at: Vec<usize>) -> Vec<String> {
        let mut out: Vec<String> = at.into_iter().map(|i| pods[i].name.clone()).collect();
        out.sort();
        out
    }

    #[test]
    fn the_indexes_follow_inserts_replacements_and_removals() {
        let mut pods = Pods::default();
        pods.insert(pod("x", "a", "web", Some("n1")));
        pods.insert(pod("x", "b", "web", Some("n2")));
        pods.insert(pod("x", "c", "db", Some("n1")));
        pods.insert(pod("x", "d", "db", None));
        assert_eq!(names(&pods, pods.with_label("app", "web")), ["a", "b"]);
        assert_eq!(names(&pods, pods.on_node("n1")), ["a", "c", "d"]);

        // A relabel moves the pod between label sets.
        let old = pods.insert(pod("x", "b", "db", Some("n1")));
        assert_eq!(old.as_ref().and_then(|p| p.labels.get("app")), Some("web"));
        assert_eq!(names(&pods, pods.with_label("app", "web")), ["a"]);
        assert_eq!(names(&pods, pods.with_label("app", "db")), ["b", "c", "d"]);
        // A pod that names no node is every node's.
        assert_eq!(names(&pods, pods.on_node("n2")), ["d"]);

        // Removing the first pod moves the last one into its place; the indexes follow.
        assert!(pods.remove(&("x".into(), "a".into())).is_some());
        assert_eq!(pods.len(), 3);
        assert_eq!(
            names(&pods, pods.with_label("app", "web")),
            Vec::<String>::new()
        );
        assert_eq!(names(&pods, pods.with_label("app", "db")), ["b", "c", "d"]);
        assert_eq!(names(&pods, pods.on_node("n1")), ["b", "c", "d"]);
        assert!(pods.remove(&("x".into(), "a".into())).is_none());
        for (i, p) in pods.iter().enumerate() {
            assert!(pods
                .with_label("app", p.labels.get("app").unwrap())
                .contains(&i));
        }
    }
}
