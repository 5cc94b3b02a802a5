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
use switchyard_control::source::synthetic;
pub use switchyard_control::source::synthetic::Size;

/// The cluster's size by default.
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
pub fn run(size: Size, changes: usize) -> Result<Vec<Row>> {
    let options = ClusterOptions {
        nodes: 1,
        // One pod with a port: the dataplane lists the policies of its own pods only.
        pods_per_node: 1,
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
    for (kind, key, value) in synthetic::objects(size) {
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
    // The push is done when the tick returns: the dataplane has the peers at once.
    cluster.wait_for_peers(0, size.nodes, Duration::ZERO)?;
    let mut rows = vec![
        single("initial_sync_decode_ms", "ms", decoded.as_secs_f64() * 1e3),
        single(
            "initial_sync_to_dataplane_ms",
            "ms",
            synced.as_secs_f64() * 1e3,
        ),
        single("agent_state_mib", "MiB", state_kib as f64 / 1024.0),
    ];

    // A tick with nothing changed: the check that the dataplane still has the settings.
    let idle = (0..changes)
        .map(|_| timed(&mut agent, &mut source, &opts, |_| ()))
        .collect();
    rows.push(percentiles("idle_tick_ms", idle));

    // A Node joins (and leaves, untimed).
    let mut times = Vec::new();
    for i in 0..changes {
        let (kind, key, value) = synthetic::node(size.nodes + 1 + i);
        times.push(timed(&mut agent, &mut source, &opts, |s| {
            s.store.apply(kind, key.clone(), value)
        }));
        cluster.wait_for_peers(0, size.nodes + 1, Duration::ZERO)?;
        timed(&mut agent, &mut source, &opts, |s| {
            s.store.delete(kind, &key)
        });
    }
    rows.push(percentiles("one_node_added_to_dataplane_ms", times));

    // A pod on this node that a policy selects: its rules are pushed.
    // It is the testbed's pod, under a new name each time.
    let address = node.pods[0].ipv4.to_string();
    let local = |i: usize| {
        let name = format!("local-{i}");
        (
            ("ns-0".to_string(), name.clone()),
            pod_in_ns0(&name, &node.name, "app-0", &address),
        )
    };
    let mut dataplane = node.client()?;
    let mut times = Vec::new();
    for i in 0..changes {
        let (key, value) = local(i);
        times.push(timed(&mut agent, &mut source, &opts, |s| {
            s.store.apply(Kind::Pod, key.clone(), value)
        }));
        if !selected(&mut dataplane, &key.1)? {
            return Err(fail!("the dataplane does not list {} as selected", key.1));
        }
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
        let name = format!("peer-{i}");
        let (kind, key, value) = (
            Kind::Pod,
            ("ns-0".to_string(), name.clone()),
            pod_in_ns0(
                &name,
                "node-0",
                "app-1",
                &format!("10.0.0.{}", 200 + i % 50),
            ),
        );
        let peer: std::net::IpAddr = value["status"]["podIPs"][0]["ip"]
            .as_str()
            .and_then(|ip| ip.parse().ok())
            .ok_or_else(|| fail!("the peer pod has no address"))?;
        times.push(timed(&mut agent, &mut source, &opts, |s| {
            s.store.apply(kind, key.clone(), value)
        }));
        let admitted = agent.desired().is_some_and(|d| {
            d.policies
                .rules
                .iter()
                .any(|r| r.peers.iter().any(|p| p.cidr.contains(&peer)))
        });
        if !admitted {
            return Err(fail!("no rule pushed admits the new peer {peer}"));
        }
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

/// A pod of namespace `ns-0` (where a policy selects `app-0` and admits `app-1` to its
/// named port `http`).
fn pod_in_ns0(name: &str, node: &str, app: &str, ip: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "ns-0", "labels": {"app": app}},
        "spec": {"nodeName": node, "automountServiceAccountToken": false,
                 "containers": [{"name": "c", "image": "busybox",
                                 "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": {"podIPs": [{"ip": ip}]}})
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
    status_kib(std::process::id(), "VmRSS")
}

/// The same cluster in a real kube-apiserver (the testbed's, in the hub namespace): the
/// objects are created through the API (a pod's addresses by a status update, as the
/// kubelet does), then a fresh agent process (`switchyard-control run --kubeconfig`) syncs
/// and single changes are made through the API. Times run from the API server's answer
/// to the write until the dataplane shows the change, so they include the watch's
/// delivery; the memory is the agent process's.
pub fn run_api(size: Size, changes: usize) -> Result<Vec<Row>> {
    let options = ClusterOptions {
        nodes: 1,
        // One pod with a port: the dataplane lists the policies of its own pods only.
        pods_per_node: 1,
        api_server: true,
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::build(Arm::Switchyard, &options)?;
    cluster.stop_control(0)?;
    let api = cluster
        .api
        .as_ref()
        .ok_or_else(|| fail!("the testbed has no API server"))?;
    // A cluster CIDR that holds the synthetic nodes' pod CIDRs and the testbed's.
    api.apply(
        &cluster.hub,
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: switchyard-config\n  namespace: kube-system\ndata:\n  config.yaml: |\n    clusterCIDR: 10.0.0.0/8\n    clusterCIDRv6: fd00:244::/56\n    nodeCIDRMaskSizeV6: 64\n    backend:\n      type: vxlan\n",
    )?;
    let kubeconfig = api.kubeconfig.clone();
    let hub = cluster.hub.path();
    let start = Instant::now();
    in_netns(&hub, {
        let kubeconfig = kubeconfig.clone();
        move || load(&kubeconfig, size)
    })?;
    let mut rows = vec![single(
        "api_load_objects_s",
        "s",
        start.elapsed().as_secs_f64(),
    )];
    println!(
        "loaded {} objects into the API server in {:.0} s",
        size.nodes * (1 + size.pods_per_node),
        start.elapsed().as_secs_f64()
    );

    // The sync, three times (a fresh agent each), with the CPU time each side spent.
    let mut syncs = Vec::new();
    let mut cpu = [0.0f64; 3];
    for _ in 0..3 {
        // The dataplane keeps what the last agent pushed: take its peers away, so that
        // the new agent's push is what the wait sees.
        cluster.stop_control(0)?;
        let mut dataplane = cluster.nodes[0].client()?;
        if let Some(mut spec) = dataplane.node()?.spec {
            spec.peers.clear();
            dataplane.set_node(spec)?;
        }
        let servers = cpu_seconds_of(&["kube-apiserver", "etcd"]);
        let start = Instant::now();
        cluster.restart_control(0)?;
        cluster.wait_for_peers(0, size.nodes, Duration::from_secs(120))?;
        syncs.push(start.elapsed().as_secs_f64() * 1e3);
        let after = cpu_seconds_of(&["kube-apiserver", "etcd"]);
        let agent = cluster.nodes[0]
            .control_pid()
            .map_or(0.0, |pid| cpu_seconds(&format!("/proc/{pid}/stat")));
        cpu = [agent, after[0] - servers[0], after[1] - servers[1]];
    }
    let node = &cluster.nodes[0];
    rows.push(percentiles("api_initial_sync_to_dataplane_ms", syncs));
    for (name, seconds) in ["agent", "kube_apiserver", "etcd"].iter().zip(cpu) {
        rows.push(single(
            &format!("api_initial_sync_{name}_cpu_s"),
            "s",
            seconds,
        ));
    }
    let pid = node
        .control_pid()
        .ok_or_else(|| fail!("no agent process"))?;
    // Settle, then read the agent's memory: now and at its peak.
    std::thread::sleep(Duration::from_secs(2));
    rows.push(single(
        "api_agent_rss_mib",
        "MiB",
        status_kib(pid, "VmRSS") as f64 / 1024.0,
    ));
    rows.push(single(
        "api_agent_peak_rss_mib",
        "MiB",
        status_kib(pid, "VmHWM") as f64 / 1024.0,
    ));

    let api_socket = node.api.clone();
    let node_name = node.name.clone();
    let address = node.pods[0].ipv4.to_string();
    let timed_rows = in_netns(&hub, move || {
        changes_through_api(
            &kubeconfig,
            &api_socket,
            (&node_name, &address),
            size,
            changes,
        )
    })
    .map_err(|e| fail!("{e}\n{}", cluster.nodes[0].logs()))?;
    rows.extend(timed_rows);
    drop(cluster);
    Ok(rows)
}

/// Runs `f` on a thread in the network namespace at `ns` (where the API server listens).
fn in_netns<T: Send + 'static>(
    ns: &std::path::Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let file = std::fs::File::open(ns)?;
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| fail!("setns: {e}"))?;
        f()
    })
    .join()
    .map_err(|_| fail!("the API client's thread panicked"))?
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| fail!("tokio: {e}"))
}

async fn client(kubeconfig: &std::path::Path) -> Result<kube::Client> {
    let file = kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| fail!("{e}"))?;
    let config =
        kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| fail!("{e}"))?;
    kube::Client::try_from(config).map_err(|e| fail!("{e}"))
}

fn resource(kind: Kind) -> kube::api::ApiResource {
    let (group, version, kind, plural) = match kind {
        Kind::Node => ("", "v1", "Node", "nodes"),
        Kind::Config => ("", "v1", "ConfigMap", "configmaps"),
        Kind::Namespace => ("", "v1", "Namespace", "namespaces"),
        Kind::Pod => ("", "v1", "Pod", "pods"),
        Kind::Service => ("", "v1", "Service", "services"),
        Kind::EndpointSlice => (
            "discovery.k8s.io",
            "v1beta1",
            "EndpointSlice",
            "endpointslices",
        ),
        Kind::NetworkPolicy => (
            "networking.k8s.io",
            "v1",
            "NetworkPolicy",
            "networkpolicies",
        ),
    };
    kube::api::ApiResource::from_gvk_with_plural(
        &kube::api::GroupVersionKind::gvk(group, version, kind),
        plural,
    )
}

/// Creates one object (a pod, then its status: its addresses).
async fn create(
    client: &kube::Client,
    kind: Kind,
    (namespace, name): &ObjectKeyRef<'_>,
    value: &serde_json::Value,
) -> Result<()> {
    use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
    let ar = resource(kind);
    let api: Api<DynamicObject> = if namespace.is_empty() {
        Api::all_with(client.clone(), &ar)
    } else {
        Api::namespaced_with(client.clone(), namespace, &ar)
    };
    let object: DynamicObject =
        serde_json::from_value(value.clone()).map_err(|e| fail!("{kind} {name}: {e}"))?;
    api.create(&PostParams::default(), &object)
        .await
        .map_err(|e| fail!("creating {kind} {namespace}/{name}: {e}"))?;
    if kind == Kind::Pod {
        let status = serde_json::json!({"status": value["status"].clone()});
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
            .await
            .map_err(|e| fail!("status of Pod {namespace}/{name}: {e}"))?;
    }
    Ok(())
}

type ObjectKeyRef<'a> = (&'a str, &'a str);

/// Creates the synthetic cluster (but its ConfigMap) through the API, 64 writes at a time.
fn load(kubeconfig: &std::path::Path, size: Size) -> Result<()> {
    use futures::StreamExt;
    runtime()?.block_on(async {
        let client = client(kubeconfig).await?;
        // Namespaces (with the ServiceAccount pods are admitted with) and policies first.
        let (first, rest): (Vec<_>, Vec<_>) = synthetic::objects(size)
            .filter(|(kind, _, _)| *kind != Kind::Config)
            .partition(|(kind, _, _)| matches!(kind, Kind::Namespace | Kind::NetworkPolicy));
        for (kind, (ns, name), value) in &first {
            create(&client, *kind, &(ns, name), value).await?;
            if *kind == Kind::Namespace {
                let account = serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount",
                    "metadata": {"name": "default", "namespace": name}});
                let ar = kube::api::ApiResource::from_gvk_with_plural(
                    &kube::api::GroupVersionKind::gvk("", "v1", "ServiceAccount"),
                    "serviceaccounts",
                );
                let api: kube::api::Api<kube::api::DynamicObject> =
                    kube::api::Api::namespaced_with(client.clone(), name, &ar);
                let object = serde_json::from_value(account).map_err(|e| fail!("{e}"))?;
                let _ = api.create(&Default::default(), &object).await;
            }
        }
        let mut writes = futures::stream::iter(rest.iter().map(|(kind, (ns, name), value)| {
            let client = client.clone();
            async move { create(&client, *kind, &(ns, name), value).await }
        }))
        .buffer_unordered(64);
        let mut done = 0usize;
        while let Some(result) = writes.next().await {
            result?;
            done += 1;
            if done.is_multiple_of(20_000) {
                println!("  {done} of {} objects", rest.len());
            }
        }
        Ok(())
    })
}

/// A Node added, and a pod on this node that a policy selects, each through the API:
/// the time from the API server's answer until the dataplane has it.
fn changes_through_api(
    kubeconfig: &std::path::Path,
    api_socket: &std::path::Path,
    (node_name, address): (&str, &str),
    size: Size,
    changes: usize,
) -> Result<Vec<Row>> {
    use kube::api::{Api, DeleteParams, DynamicObject};
    runtime()?.block_on(async {
        let client = client(kubeconfig).await?;
        let mut dataplane = switchyard_api::Client::connect(api_socket)?;
        let mut node_times = Vec::new();
        let nodes: Api<DynamicObject> = Api::all_with(client.clone(), &resource(Kind::Node));
        for i in 0..changes {
            let (kind, (ns, name), value) = synthetic::node(size.nodes + 1 + i);
            create(&client, kind, &(&ns, &name), &value).await?;
            let start = Instant::now();
            wait_until(&mut dataplane, start, |d| {
                Ok(d.node()?.spec.map(|s| s.peers.len()) == Some(size.nodes + 1))
            })
            .map_err(|e| fail!("Node {name} added: {e}"))?;
            node_times.push(start.elapsed().as_secs_f64() * 1e3);
            nodes
                .delete(&name, &DeleteParams::default())
                .await
                .map_err(|e| fail!("{e}"))?;
            wait_until(&mut dataplane, Instant::now(), |d| {
                Ok(d.node()?.spec.map(|s| s.peers.len()) == Some(size.nodes))
            })?;
        }
        let mut pod_times = Vec::new();
        let pods: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), "ns-0", &resource(Kind::Pod));
        for i in 0..changes {
            let name = format!("local-{i}");
            let value = pod_in_ns0(&name, node_name, "app-0", address);
            create(&client, Kind::Pod, &("ns-0", &name), &value).await?;
            let start = Instant::now();
            wait_until(&mut dataplane, start, |d| selected(d, &name))
                .map_err(|e| fail!("Pod ns-0/{name} added: {e}"))?;
            pod_times.push(start.elapsed().as_secs_f64() * 1e3);
            pods.delete(&name, &DeleteParams::default().grace_period(0))
                .await
                .map_err(|e| fail!("{e}"))?;
            wait_until(&mut dataplane, Instant::now(), |d| Ok(!selected(d, &name)?))?;
        }
        Ok(vec![
            percentiles("api_one_node_added_to_dataplane_ms", node_times),
            percentiles("api_one_pod_added_on_this_node_to_dataplane_ms", pod_times),
        ])
    })
}

/// True when the dataplane lists its pod `name` as selected by a policy.
fn selected(dataplane: &mut switchyard_api::Client, name: &str) -> Result<bool> {
    Ok(
        match dataplane.call(switchyard_api::Request::ListPolicies)? {
            switchyard_api::Reply::Policies(p) => p.pods.iter().any(|p| p.name == name),
            _ => false,
        },
    )
}

/// Polls the dataplane every millisecond until `done` holds (10 s at most).
fn wait_until(
    dataplane: &mut switchyard_api::Client,
    start: Instant,
    mut done: impl FnMut(&mut switchyard_api::Client) -> Result<bool>,
) -> Result<()> {
    while !done(dataplane)? {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(fail!("the dataplane did not show the change within 10 s"));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// The CPU time (user and system) of the process whose `stat` file is at `path`.
fn cpu_seconds(path: &str) -> f64 {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            // Fields after the command (which may hold spaces): state is the 3rd, utime
            // and stime the 14th and 15th.
            let rest = &s[s.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .unwrap_or(0.0)
}

/// The CPU time of every process named each of `names`, summed per name.
fn cpu_seconds_of(names: &[&str]) -> Vec<f64> {
    let mut out = vec![0.0; names.len()];
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let dir = entry.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if let Some(i) = names.iter().position(|n| *n == comm.trim()) {
            out[i] += cpu_seconds(&dir.join("stat").to_string_lossy());
        }
    }
    out
}

/// A field of `/proc/PID/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
