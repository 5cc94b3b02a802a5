//! Criterion benchmarks of the node agent at cluster scale: 5,000 Nodes and 150,000 Pods
//! (30 per node, 50 namespaces with a NetworkPolicy each), fed as the API server's watch
//! events are. What each costs up to the node's new desired state (the push to the
//! dataplane is measured by `bench-env agent-scale`):
//! * the initial sync: every object decoded into the store, the node's state computed;
//! * one Node added: its event decoded and applied, the node settings computed again;
//! * one Pod added (on this node, and on another): the policy rules computed again.
//!
//! Run with `cargo bench -p switchyard-benches --bench agent`.
#![allow(missing_docs)] // criterion_group! generates an undocumented public function

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use switchyard_control::agent::{refresh, AgentOptions, Desired};
use switchyard_control::cluster::manifests::Kind;
use switchyard_control::source::memory::MemorySource;
use switchyard_control::source::store::Decoded;
use switchyard_control::source::synthetic::{self, Size};
use switchyard_control::source::Source;

const SIZE: Size = Size {
    nodes: 5_000,
    pods_per_node: 30,
    namespaces: 50,
};

fn options() -> AgentOptions {
    AgentOptions {
        node: "node-17".into(),
        api: "/nonexistent".into(),
        uplink: Some("eth0".into()),
        interval: Duration::from_millis(200),
    }
}

type Listed = BTreeMap<Kind, Vec<((String, String), serde_json::Value)>>;

/// The cluster's objects by kind, as lists give them.
fn listed() -> Listed {
    let mut out = Listed::new();
    for (kind, key, value) in synthetic::objects(SIZE) {
        out.entry(kind).or_default().push((key, value));
    }
    out
}

/// A source holding the whole cluster, and the node's desired state from it.
fn synced(listed: &Listed) -> (MemorySource, Option<Desired>) {
    let mut source = MemorySource::default();
    for (kind, objects) in listed {
        let decoded = objects
            .iter()
            .map(|(key, value)| Decoded::new(*kind, key.clone(), value.clone()))
            .collect();
        source.store.relist(*kind, decoded);
    }
    let mut desired = None;
    let change = source.changed().expect("a first change");
    let m = source.state();
    refresh(&mut desired, change.kinds, &m, &source, &options()).expect("a valid cluster");
    drop(m);
    (source, desired)
}

/// Applies one event and brings `desired` up to date.
fn step(
    source: &mut MemorySource,
    desired: &mut Option<Desired>,
    event: impl FnOnce(&mut MemorySource),
) {
    event(source);
    let change = source.changed().expect("a change");
    let m = source.state();
    refresh(desired, change.kinds, &m, source, &options()).expect("a valid cluster");
}

fn agent(c: &mut Criterion) {
    let listed = listed();
    let mut g = c.benchmark_group("agent");
    g.sample_size(10);
    g.bench_function("initial_sync_5000_nodes_150000_pods", |b| {
        b.iter(|| black_box(synced(&listed)))
    });
    let (mut source, mut desired) = synced(&listed);
    let peers = desired.as_ref().map(|d| d.node.peers.len());
    assert_eq!(peers, Some(SIZE.nodes - 1));
    let mut timed = |name: &str, add: &dyn Fn() -> (Kind, (String, String), serde_json::Value)| {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (kind, key, value) = add();
                    let start = Instant::now();
                    step(&mut source, &mut desired, |s| {
                        s.store.apply(kind, key.clone(), value)
                    });
                    total += start.elapsed();
                    step(&mut source, &mut desired, |s| s.store.delete(kind, &key));
                }
                total
            })
        });
    };
    timed("one_node_added", &|| synthetic::node(SIZE.nodes));
    timed("one_pod_added_on_this_node", &|| {
        synthetic::pod(SIZE, 17, SIZE.pods_per_node)
    });
    timed("one_pod_added_on_another_node", &|| {
        synthetic::pod(SIZE, 18, SIZE.pods_per_node)
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(10)).warm_up_time(Duration::from_secs(1));
    targets = agent
}
criterion_main!(benches);
