//! Criterion benchmarks of the node agent at cluster scale: 5,000 Nodes and 150,000 Pods
//! (30 per node). What one change costs today: decoding every object as the API source
//! does on each change, and computing this node's state from them.
//! Run with `cargo bench -p switchyard-benches --bench agent`.
#![allow(missing_docs)] // criterion_group! generates an undocumented public function

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::path::Path;
use std::time::Duration;
use switchyard_control::agent::{compute, AgentOptions};
use switchyard_control::cluster::manifests::{load_value, Manifests};
use switchyard_control::source::dir::DirSource;

const NODES: usize = 5_000;
const PODS_PER_NODE: usize = 30;

/// The cluster's objects as the API server hands them over (JSON).
fn objects() -> Vec<serde_json::Value> {
    let mut out = vec![serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "switchyard-config", "namespace": "kube-system"},
        "data": {"config.yaml": "clusterCIDR: 10.0.0.0/8\nbackend:\n  type: vxlan\n"}
    })];
    for n in 0..NODES {
        let (hi, lo) = (n / 250, n % 250);
        out.push(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": format!("node-{n}"), "labels": {"kubernetes.io/hostname": format!("node-{n}")}},
            "spec": {"podCIDR": format!("10.{}.{}.0/24", hi, lo), "podCIDRs": [format!("10.{}.{}.0/24", hi, lo)]},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("172.16.{}.{}", hi, lo + 1)}]}
        }));
        for p in 0..PODS_PER_NODE {
            out.push(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("app-{n}-{p}"), "namespace": format!("ns-{}", n % 50),
                             "labels": {"app": format!("app-{}", p % 10)}},
                "spec": {"nodeName": format!("node-{n}"), "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
                "status": {"podIPs": [{"ip": format!("10.{}.{}.{}", hi, lo, p + 2)}]}
            }));
        }
    }
    out
}

fn decode(objects: &[serde_json::Value]) -> Manifests {
    let mut m = Manifests::default();
    let mut errors = Vec::new();
    let origin = Path::new("kube-apiserver");
    for o in objects {
        load_value(origin, "object", o.clone(), &mut m, &mut errors);
    }
    assert!(errors.is_empty(), "{errors:?}");
    m.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    m
}

fn agent(c: &mut Criterion) {
    let objects = objects();
    let mut g = c.benchmark_group("agent");
    g.sample_size(10);
    g.bench_function("decode_5000_nodes_150000_pods", |b| {
        b.iter(|| black_box(decode(&objects)))
    });
    let m = decode(&objects);
    let dir = std::env::temp_dir().join(format!("sy-bench-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = DirSource::new(&dir);
    let opts = AgentOptions {
        node: "node-17".into(),
        api: "/nonexistent".into(),
        uplink: Some("eth0".into()),
        interval: Duration::from_millis(200),
    };
    g.bench_function("compute_node_state_5000_nodes_150000_pods", |b| {
        b.iter(|| black_box(compute(&m, &source, &opts).unwrap()))
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(20)).warm_up_time(Duration::from_secs(1));
    targets = agent
}
criterion_main!(benches);
