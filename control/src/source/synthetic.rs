//! A synthetic cluster of a chosen size, object by object as the API server lists them,
//! for the agent's benchmarks: Nodes with pod CIDRs and addresses, pods spread over them
//! with labels and a named port, one namespace per 100 nodes' worth of pods, and in each
//! namespace a NetworkPolicy that admits one app's pods to another's named port.

use crate::cluster::keyed::ObjectKey;
use crate::cluster::manifests::Kind;
use serde_json::{json, Value};

/// How large the cluster is.
#[derive(Debug, Clone, Copy)]
pub struct Size {
    /// Nodes (at most 65,000: each gets a /24 of 10.0.0.0/8 and an address in 172.16/12).
    pub nodes: usize,
    /// Pods per node (at most 250).
    pub pods_per_node: usize,
    /// Namespaces, each with one NetworkPolicy.
    pub namespaces: usize,
}

/// The ConfigMap, the Namespaces and their NetworkPolicies, then each Node followed by its
/// pods.
pub fn objects(size: Size) -> impl Iterator<Item = (Kind, ObjectKey, Value)> {
    let config = std::iter::once((
        Kind::Config,
        ("kube-system".to_string(), "switchyard-config".to_string()),
        json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "switchyard-config", "namespace": "kube-system"},
            "data": {"config.yaml": "clusterCIDR: 10.0.0.0/8\nbackend:\n  type: vxlan\n"}
        }),
    ));
    let namespaces = (0..size.namespaces).flat_map(|n| [namespace(n), policy(n)]);
    let nodes = (0..size.nodes).flat_map(move |n| {
        std::iter::once(node(n)).chain((0..size.pods_per_node).map(move |p| pod(size, n, p)))
    });
    config.chain(namespaces).chain(nodes)
}

fn namespace(n: usize) -> (Kind, ObjectKey, Value) {
    let name = format!("ns-{n}");
    (
        Kind::Namespace,
        (String::new(), name.clone()),
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": name, "labels": {"team": format!("team-{}", n % 5)}}}),
    )
}

fn policy(n: usize) -> (Kind, ObjectKey, Value) {
    let ns = format!("ns-{n}");
    (
        Kind::NetworkPolicy,
        (ns.clone(), "app-0-from-app-1".into()),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
               "metadata": {"name": "app-0-from-app-1", "namespace": ns},
               "spec": {"podSelector": {"matchLabels": {"app": "app-0"}},
                        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "app-1"}}}],
                                     "ports": [{"port": "http"}]}]}}),
    )
}

/// Node `n`: `node-N`, pod CIDR 10.HI.LO.0/24, address 172.16+HI/16 .LO+1.
pub fn node(n: usize) -> (Kind, ObjectKey, Value) {
    let (hi, lo) = (n / 250, n % 250);
    let name = format!("node-{n}");
    (
        Kind::Node,
        (String::new(), name.clone()),
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
               "spec": {"podCIDR": format!("10.{hi}.{lo}.0/24"),
                        "podCIDRs": [format!("10.{hi}.{lo}.0/24")]},
               "status": {"addresses": [{"type": "InternalIP",
                                         "address": format!("172.{}.{}.{}", 16 + hi / 256, hi % 256, lo + 1)}]}}),
    )
}

/// Pod `p` of node `n`: `app-N-P` in namespace `ns-(N mod namespaces)`, labelled
/// `app=app-(P mod 10)`, with the named container port `http` (8080), address
/// 10.HI.LO.(P+2).
pub fn pod(size: Size, n: usize, p: usize) -> (Kind, ObjectKey, Value) {
    let (hi, lo) = (n / 250, n % 250);
    let (ns, name) = (
        format!("ns-{}", n % size.namespaces.max(1)),
        format!("app-{n}-{p}"),
    );
    (
        Kind::Pod,
        (ns.clone(), name.clone()),
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": ns, "labels": {"app": format!("app-{}", p % 10)}},
               "spec": {"nodeName": format!("node-{n}"), "automountServiceAccountToken": false,
                        "containers": [{"name": "c", "image": "busybox",
                                        "ports": [{"name": "http", "containerPort": 8080}]}]},
               "status": {"phase": "Running", "podIPs": [{"ip": format!("10.{hi}.{lo}.{}", p + 2)}]}}),
    )
}
