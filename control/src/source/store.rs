//! The cluster state a watching source keeps: each object decoded once, as its watch event
//! arrives, and put into the [`Manifests`] in place, so that one change costs one decode
//! and the agent recomputes only what the changed kinds feed. Sans-IO: the API source's
//! watches feed it events; tests and benchmarks feed it the same way.

use crate::cluster::keyed::ObjectKey;
use crate::cluster::manifests::{self, Kind, Kinds, ManifestError, Manifests, Object};
use crate::cluster::pods::PodFields;
use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

/// Decoded objects, the problems of those that did not decode, and what changed since the
/// state was last read.
#[derive(Debug, Default)]
pub struct Store {
    state: Manifests,
    errors: BTreeMap<(Kind, ObjectKey), ManifestError>,
    changed: Kinds,
    /// Whether a change was ever taken (the first is of every kind).
    reported: bool,
}

/// What a reader learns from [`Store::take_changes`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The kinds that changed.
    pub kinds: Kinds,
    /// The objects that do not decode, as lines to print (the state is not usable while
    /// there are any).
    pub errors: Vec<String>,
}

impl Store {
    /// The state.
    pub fn state(&self) -> &Manifests {
        &self.state
    }

    /// An object of `kind` was added or modified: `value` is its JSON (with `apiVersion`
    /// and `kind`), `key` its namespace and name.
    pub fn apply(&mut self, kind: Kind, key: ObjectKey, value: serde_json::Value) {
        self.apply_decoded(Decoded::new(kind, key, value));
    }

    /// [`Store::apply`] of an object decoded beforehand.
    pub fn apply_decoded(&mut self, decoded: Decoded) {
        let Decoded { kind, key, object } = decoded;
        match object {
            Ok(Some(object)) => {
                let fixed = self.errors.remove(&(kind, key.clone())).is_some();
                if fixed || !self.state.holds(&key, &object) {
                    warn_without_cidrs(&object, &self.state, &key);
                    self.state.put(key, object);
                    self.changed.add(kind);
                }
            }
            Ok(None) => self.delete(kind, &key),
            Err(e) => {
                self.errors.insert((kind, key), e);
                self.changed.add(kind);
            }
        }
    }

    /// An object of `kind` was deleted.
    pub fn delete(&mut self, kind: Kind, key: &ObjectKey) {
        let fixed = self.errors.remove(&(kind, key.clone())).is_some();
        if self.state.remove(kind, key) || fixed {
            self.changed.add(kind);
        }
    }

    /// Every object of `kind`, decoded, as a full list gives them (after a start or a 410
    /// Gone): objects not in it go, the others are applied (an unchanged object changes
    /// nothing).
    pub fn relist(&mut self, kind: Kind, objects: Vec<Decoded>) {
        let fresh: HashSet<&ObjectKey> = objects.iter().map(|d| &d.key).collect();
        let gone: Vec<ObjectKey> = self
            .state
            .keys(kind)
            .into_iter()
            .chain(
                self.errors
                    .keys()
                    .filter(|(k, _)| *k == kind)
                    .map(|(_, key)| key.clone()),
            )
            .filter(|k| !fresh.contains(k))
            .collect();
        for key in gone {
            self.delete(kind, &key);
        }
        for decoded in objects {
            self.apply_decoded(decoded);
        }
    }

    /// True when something changed since [`Store::take_changes`] was last called.
    pub fn pending(&self) -> bool {
        !self.changed.is_empty() || !self.reported
    }

    /// The objects that do not decode, as lines to print.
    pub fn errors(&self) -> Vec<String> {
        self.errors.values().map(ToString::to_string).collect()
    }

    /// The changes since the last call (the first call: every kind); `None` when there
    /// were none.
    pub fn take_changes(&mut self) -> Option<Change> {
        if !self.pending() {
            return None;
        }
        let mut kinds = std::mem::take(&mut self.changed);
        if !std::mem::replace(&mut self.reported, true) {
            kinds = Kinds::ALL;
        }
        Some(Change {
            kinds,
            errors: self.errors(),
        })
    }
}

/// One object as its event gave it, decoded (a list's objects are decoded as they arrive,
/// so that no list is held as JSON).
#[derive(Debug)]
pub struct Decoded {
    kind: Kind,
    key: ObjectKey,
    /// What the state keeps of it; `None` when it is not Switchyard's.
    object: Result<Option<Object>, ManifestError>,
}

impl Decoded {
    /// Decodes `value`, the JSON of the object of `kind` under `key`.
    pub fn new(kind: Kind, key: ObjectKey, value: serde_json::Value) -> Self {
        let origin = PathBuf::from(format!("kube-apiserver {kind}"));
        let what = manifests::describe(kind, &key);
        let object = manifests::decode_value(&origin, &what, value).map(|o| o.map(|(_, o)| o));
        Self { kind, key, object }
    }

    /// A pod decoded straight from its JSON into its fields.
    pub fn pod(pod: &PodFields) -> Self {
        let (key, object) = manifests::pod_object(pod);
        Self {
            kind: Kind::Pod,
            key,
            object: Ok(Some(object)),
        }
    }
}

/// A node waiting for its pod CIDRs is reported once, when it arrives so.
fn warn_without_cidrs(object: &Object, state: &Manifests, key: &ObjectKey) {
    let Object::Node(node) = object else { return };
    let waited = state.nodes.get(key).is_some_and(|n| n.pod_cidrs.is_empty());
    if node.pod_cidrs.is_empty() && !waited {
        tracing::warn!(
            "Node {}: no spec.podCIDRs yet (kube-controller-manager allocates them with \
             --allocate-node-cidrs); left out until it has one",
            node.name
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, cidr: &str) -> (ObjectKey, serde_json::Value) {
        (
            (String::new(), name.into()),
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                   "spec": {"podCIDRs": [cidr]},
                   "status": {"addresses": [{"type": "InternalIP", "address": "192.0.2.1"}]}}),
        )
    }

    fn pod(name: &str, app: &str, status: &str) -> (ObjectKey, serde_json::Value) {
        (
            ("x".into(), name.into()),
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"namespace": "x", "name": name, "labels": {"app": app}},
                   "spec": {"nodeName": "n1", "containers": []},
                   "status": {"podIPs": [{"ip": "10.0.0.2"}], "phase": status}}),
        )
    }

    #[test]
    fn the_first_change_is_of_every_kind() {
        let mut s = Store::default();
        assert_eq!(
            s.take_changes(),
            Some(Change {
                kinds: Kinds::ALL,
                errors: Vec::new()
            })
        );
        assert_eq!(s.take_changes(), None);
    }

    #[test]
    fn an_object_changes_the_state_only_in_what_the_agent_reads() {
        let mut s = Store::default();
        s.take_changes();
        let (k, v) = pod("a", "web", "Pending");
        s.apply(Kind::Pod, k.clone(), v);
        let change = s.take_changes().unwrap();
        assert!(change.kinds.has(Kind::Pod) && !change.kinds.has(Kind::Node));
        assert!(change.errors.is_empty());
        assert_eq!(s.take_changes(), None);
        // The phase is not read: no change.
        s.apply(Kind::Pod, k.clone(), pod("a", "web", "Running").1);
        assert_eq!(s.take_changes(), None);
        // A label is read.
        s.apply(Kind::Pod, k.clone(), pod("a", "db", "Running").1);
        assert!(s.take_changes().unwrap().kinds.has(Kind::Pod));
        assert_eq!(s.state().pods.with_label("app", "db").len(), 1);
        s.delete(Kind::Pod, &k);
        assert!(s.take_changes().unwrap().kinds.has(Kind::Pod));
        assert!(s.state().pods.is_empty());
        s.delete(Kind::Pod, &k);
        assert_eq!(s.take_changes(), None);
    }

    #[test]
    fn a_bad_object_is_reported_until_it_is_fixed_or_deleted() {
        let mut s = Store::default();
        s.take_changes();
        let (k, _) = node("n1", "10.0.1.0/24");
        s.apply(Kind::Node, k.clone(), node("n1", "10.0.1.1/24").1);
        let change = s.take_changes().unwrap();
        assert_eq!(change.errors.len(), 1);
        assert!(
            change.errors[0].contains("host bits"),
            "{:?}",
            change.errors
        );
        s.apply(Kind::Node, k.clone(), node("n1", "10.0.1.0/24").1);
        assert_eq!(s.take_changes().unwrap().errors, Vec::<String>::new());
        s.apply(Kind::Node, k.clone(), node("n1", "nonsense").1);
        assert_eq!(s.take_changes().unwrap().errors.len(), 1);
        s.delete(Kind::Node, &k);
        let change = s.take_changes().unwrap();
        assert!(change.errors.is_empty() && change.kinds.has(Kind::Node));
        assert!(s.state().nodes.is_empty());
    }

    #[test]
    fn a_relist_removes_what_is_gone_and_keeps_what_is_unchanged() {
        let mut s = Store::default();
        s.take_changes();
        let list = |nodes: Vec<(ObjectKey, serde_json::Value)>| -> Vec<Decoded> {
            nodes
                .into_iter()
                .map(|(k, v)| Decoded::new(Kind::Node, k, v))
                .collect()
        };
        s.relist(
            Kind::Node,
            list(vec![node("n1", "10.0.1.0/24"), node("n2", "10.0.2.0/24")]),
        );
        assert!(s.take_changes().is_some());
        s.relist(
            Kind::Node,
            list(vec![node("n1", "10.0.1.0/24"), node("n2", "10.0.2.0/24")]),
        );
        assert_eq!(s.take_changes(), None, "an identical list changes nothing");
        s.relist(Kind::Node, list(vec![node("n2", "10.0.2.0/24")]));
        assert!(s.take_changes().unwrap().kinds.has(Kind::Node));
        let names: Vec<&str> = s.state().nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["n2"]);
    }
}
