//! The node agent at cluster scale against a live dataplane: a synthetic cluster of 5,000
//! Nodes and 150,000 Pods (50 namespaces, each with a NetworkPolicy) is fed to the agent
//! as watch events, in process, and the agent pushes to a real dataplane on a one-node
//! testbed. Measured: the initial sync (every object decoded, the node's state computed
//! and pushed), then single changes from the event to the dataplane's reply (its new
//! tables are published before it answers), and the memory the agent's state takes.

use crate::cluster::{Cluster, ClusterOptions};
use crate::error::Result;
use crate::fail;
use crate::testbed::Arm;
use serde::Serialize;
use serde_json::json;
use std::time::{Duration, Instant};
use switchyard_control::agent::{Agent, AgentOptions};
use switchyard_control::cluster::manifests::Kind;
use switchyard_control::source::memory::MemorySource;
use switchyard_control::source::synthetic::{self, Size};

/// The cluster's size.
pub const SIZE: Size = Size {
    nodes: 5_000,
    pods_per_node: 30,
    namespaces: 50,
};

/// One measured quantity.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Stable name.
    pub name: String,
    /// Unit.
    pub unit: String,
    /// Median (single figures: the figure).
    pub p50: f64,
    /// 99th percentile (single figures: the figure).
    pub p99: f64,
}

/// Runs the scenario; `changes` single changes of each kind are timed.
pub fn run(changes: usize) -> Result<Vec<Row>> {
    let options = ClusterOptions {
        nodes: 1,
        pods_per_node: 0,
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::build(Arm::Switchyard, &options)?;
    // The testbed's own agent goes: this one takes its place.
    cluster.stop_control(0)?;
    let node = &cluster.nodes[0];
    let opts = AgentOptions {
        node: node.name.clone(),
        api: node.api.clone(),
        uplink: None,
        interval: Duration::from_millis(200),
    };
    let mut source = MemorySource::default();
    let mut agent = Agent::default();
    let before = rss_kib();
    let start = Instant::now();
    for (kind, key, value) in synthetic::objects(SIZE) {
        source.store.apply(kind, key, value);
    }
    // This node, as the synthetic cluster's 5,001st: its real address, its testbed CIDR.
    let (cidr, _) = crate::cluster::pod_cidrs(0);
    source.store.apply(
        Kind::Node,
        (String::new(), node.name.clone()),
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node.name},
               "spec": {"podCIDRs": [cidr]},
               "status": {"addresses": [{"type": "InternalIP", "address": node.ipv4.to_string()}]}}),
    );
    let decoded = start.elapsed();
    agent.tick(&mut source, &opts);
    let synced = start.elapsed();
    let state_kib = rss_kib().saturating_sub(before);
    let peers = node
        .client()?
        .node()?
        .spec
        .map(|s| s.peers.len())
        .unwrap_or(0);
    if peers != SIZE.nodes {
        return Err(fail!(
            "the dataplane has {peers} peers after the initial sync, not {}",
            SIZE.nodes
        ));
    }
    let mut rows = vec![
        single("initial_sync_decode_ms", "ms", decoded.as_secs_f64() * 1e3),
        single(
            "initial_sync_to_dataplane_ms",
            "ms",
            synced.as_secs_f64() * 1e3,
        ),
        single("agent_state_mib", "MiB", state_kib as f64 / 1024.0),
    ];

    // A Node joins (and leaves, untimed).
    let mut times = Vec::new();
    for i in 0..changes {
        let (kind, key, value) = synthetic::node(SIZE.nodes + 1 + i);
        times.push(timed(&mut agent, &mut source, &opts, |s| {
            s.store.apply(kind, key.clone(), value)
        }));
        expect_peers(node, SIZE.nodes + 1)?;
        timed(&mut agent, &mut source, &opts, |s| {
            s.store.delete(kind, &key)
        });
    }
    rows.push(percentiles("one_node_added_to_dataplane_ms", times));

    // A pod on this node that a policy selects: its rules are pushed.
    let local = |i: usize| {
        let name = format!("local-{i}");
        (
            ("ns-0".to_string(), name.clone()),
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "namespace": "ns-0", "labels": {"app": "app-0"}},
                   "spec": {"nodeName": node.name, "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
                   "status": {"podIPs": [{"ip": format!("10.244.0.{}", 10 + i % 200)}]}}),
        )
    };
    let mut times = Vec::new();
    for i in 0..changes {
        let (key, value) = local(i);
        times.push(timed(&mut agent, &mut source, &opts, |s| {
            s.store.apply(Kind::Pod, key.clone(), value)
        }));
        timed(&mut agent, &mut source, &opts, |s| {
            s.store.delete(Kind::Pod, &key)
        });
    }
    rows.push(percentiles(
        "one_pod_added_on_this_node_to_dataplane_ms",
        times,
    ));

    // With one local pod selected, a pod elsewhere that its policy admits: the rule's
    // peers change.
    let (key, value) = local(0);
    source.store.apply(Kind::Pod, key, value);
    agent.tick(&mut source, &opts);
    let mut times = Vec::new();
    for i in 0..changes {
        let (kind, key, value) = synthetic::pod(SIZE, 50 * (1 + i), 31);
        times.push(timed(&mut agent, &mut source, &opts, |s| {
            s.store.apply(kind, key.clone(), value)
        }));
        timed(&mut agent, &mut source, &opts, |s| {
            s.store.delete(kind, &key)
        });
    }
    rows.push(percentiles(
        "one_peer_pod_added_elsewhere_to_dataplane_ms",
        times,
    ));
    drop(cluster);
    Ok(rows)
}

/// The time from an event to the dataplane's answer to what it changed.
fn timed(
    agent: &mut Agent,
    source: &mut MemorySource,
    opts: &AgentOptions,
    event: impl FnOnce(&mut MemorySource),
) -> f64 {
    let start = Instant::now();
    event(source);
    agent.tick(source, opts);
    start.elapsed().as_secs_f64() * 1e3
}

fn expect_peers(node: &crate::cluster::SimNode, want: usize) -> Result<()> {
    let peers = node
        .client()?
        .node()?
        .spec
        .map(|s| s.peers.len())
        .unwrap_or(0);
    if peers == want {
        Ok(())
    } else {
        Err(fail!("the dataplane has {peers} peers, not {want}"))
    }
}

fn single(name: &str, unit: &str, value: f64) -> Row {
    Row {
        name: name.into(),
        unit: unit.into(),
        p50: value,
        p99: value,
    }
}

fn percentiles(name: &str, mut values: Vec<f64>) -> Row {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| {
        values
            .get(((values.len() as f64 * q).ceil() as usize).saturating_sub(1))
            .copied()
            .unwrap_or(0.0)
    };
    Row {
        name: name.into(),
        unit: "ms".into(),
        p50: at(0.5),
        p99: at(0.99),
    }
}

/// This process's resident memory.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
