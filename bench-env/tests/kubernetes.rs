//! The agent against a real kube-apiserver (v1.20.2, built offline by
//! `scripts/kube-apiserver`, with etcd, in the cluster's hub namespace): nodes join from
//! their Node objects' `spec.podCIDRs`, a new Node reaches every node within a second, the
//! agent sets `NetworkUnavailable=False`, survives a relist forced by compaction and the
//! API server's absence, and `deploy/switchyard.yaml` applies and grants exactly what the
//! agent uses. They need root.

use bench_env::cluster::{self, Cluster, ClusterOptions};
use bench_env::testbed::Arm;
use std::time::{Duration, Instant};
use switchyard_api::{Reply, Request};

fn cluster(pods_per_node: usize) -> Cluster {
    bench_env::require_root("Kubernetes API integration test");
    Cluster::build(
        Arm::Switchyard,
        &ClusterOptions {
            pods_per_node,
            api_server: true,
            ..ClusterOptions::default()
        },
    )
    .expect("cluster with an API server")
}

fn kubectl(c: &Cluster, args: &[&str]) -> String {
    let api = c.api.as_ref().unwrap();
    api.kubectl(&c.hub, args)
        .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}\n{}", api.logs()))
}

/// A field of `node`'s `NetworkUnavailable` condition (`reason`, `lastHeartbeatTime`).
fn network_unavailable(c: &Cluster, node: &str, field: &str) -> String {
    let path =
        format!("jsonpath={{.status.conditions[?(@.type==\"NetworkUnavailable\")].{field}}}");
    kubectl(c, &["get", "node", node, "-o", &path])
}

/// The policy generation of node `i`'s dataplane (bumped by every push of rules or node
/// settings).
fn generation(c: &Cluster, i: usize) -> u64 {
    match c.nodes[i]
        .client()
        .unwrap()
        .call(Request::ListPolicies)
        .unwrap()
    {
        Reply::Policies(p) => p.generation,
        other => panic!("{other:?}"),
    }
}

/// A Service `name` without selector and its EndpointSlice (`discovery.k8s.io/v1beta1`,
/// as the 1.20 server serves it), applied with kubectl.
fn publish_service(c: &Cluster, name: &str) {
    let yaml = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]\n---\napiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata:\n  name: {name}-1\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n- addresses: [\"10.244.1.10\"]\n  conditions: {{ready: true}}\n  topology: {{kubernetes.io/hostname: node1}}\n"
    );
    c.api.as_ref().unwrap().apply(&c.hub, &yaml).unwrap();
}

/// True when node `i`'s dataplane serves Service `default/name` with its endpoint.
fn serves(c: &Cluster, i: usize, name: &str) -> bool {
    match c.nodes[i]
        .client()
        .unwrap()
        .call(Request::ListServices)
        .unwrap()
    {
        Reply::Services(list) => list
            .iter()
            .any(|s| s.spec.name == name && s.spec.ports.iter().any(|p| !p.endpoints.is_empty())),
        other => panic!("{other:?}"),
    }
}

/// Waits until `check` holds, up to `timeout`; returns how long it took.
fn wait(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces, TAP devices, kube-apiserver"
)]
fn nodes_join_from_the_api_server_and_a_new_node_reaches_both_within_a_second() {
    let mut c = cluster(1);
    cluster::assert_connected(&c, "two nodes from the API server");
    for node in ["node0", "node1"] {
        wait(Duration::from_secs(5), "NetworkUnavailable=False", || {
            network_unavailable(&c, node, "reason") == "SwitchyardIsUp"
        });
    }
    // A third node: its agent starts, then its Node object is created.
    c.start_node(2).unwrap();
    let created = Instant::now();
    c.write_node_manifest(2).unwrap();
    for i in 0..3 {
        c.wait_for_peers(i, 2, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("node{i}: {e}\n{}", c.logs()));
    }
    let joined = created.elapsed();
    eprintln!("a new Node reached every node {joined:?} after kubectl returned");
    assert!(joined < Duration::from_secs(1), "{joined:?}");
    c.add_pod(2, 0).unwrap();
    cluster::assert_connected(&c, "three nodes");
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces, TAP devices, kube-apiserver"
)]
fn the_agent_outlives_a_forced_relist_and_the_api_server_going_away() {
    let mut c = cluster(1);
    let before: Vec<u64> = (0..2).map(|i| generation(&c, i)).collect();
    // Writes the agents do not watch move etcd's revision past theirs; compaction then
    // makes their resourceVersions too old, and a restarted API server answers their
    // watches with 410 Gone: they must list again and find nothing changed.
    for k in 0..20 {
        kubectl(
            &c,
            &[
                "create",
                "configmap",
                &format!("filler-{k}"),
                "-n",
                "default",
            ],
        );
    }
    let status = c
        .hub
        .exec(&[
            "etcdctl",
            "--endpoints=http://127.0.0.1:2379",
            "endpoint",
            "status",
            "-w",
            "json",
        ])
        .unwrap();
    let revision = status
        .split("\"revision\":")
        .nth(1)
        .and_then(|r| r.split(|ch: char| !ch.is_ascii_digit()).next())
        .unwrap_or_else(|| panic!("no revision in {status}"))
        .to_string();
    c.hub
        .exec(&[
            "etcdctl",
            "--endpoints=http://127.0.0.1:2379",
            "compact",
            &revision,
        ])
        .unwrap();
    c.api.as_mut().unwrap().stop_apiserver();
    std::thread::sleep(Duration::from_secs(2));
    c.api.as_mut().unwrap().start_apiserver(&c.hub).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let after: Vec<u64> = (0..2).map(|i| generation(&c, i)).collect();
    assert_eq!(
        before, after,
        "a relist with nothing new changed the dataplanes"
    );

    // Thirty seconds without the API server: forwarding goes on.
    c.api.as_mut().unwrap().stop_apiserver();
    let gone = Instant::now();
    while gone.elapsed() < Duration::from_secs(30) {
        cluster::assert_connected(&c, "while the API server is away");
        std::thread::sleep(Duration::from_secs(5));
    }
    c.api.as_mut().unwrap().start_apiserver(&c.hub).unwrap();
    // Back: a change reaches the dataplanes again.
    publish_service(&c, "after-outage");
    let took = wait(
        Duration::from_secs(10),
        "the first change after the outage",
        || (0..2).all(|i| serves(&c, i, "after-outage")),
    );
    eprintln!("after the outage, a change reached both dataplanes in {took:?}");
    cluster::assert_connected(&c, "after the outage");
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces, TAP devices, kube-apiserver"
)]
fn the_deploy_manifest_applies_and_grants_exactly_what_the_agent_uses() {
    let mut c = cluster(1);
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/switchyard.yaml");
    let deploy = deploy.to_string_lossy().into_owned();
    kubectl(&c, &["apply", "--dry-run=server", "-f", &deploy]);
    kubectl(&c, &["apply", "-f", &deploy]);
    kubectl(&c, &["get", "daemonset", "switchyard", "-n", "kube-system"]);

    // The agents, now with the ServiceAccount's own token.
    let request = c.api.as_ref().unwrap().dir.join("token-request.json");
    std::fs::write(
        &request,
        r#"{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{"audiences":["https://kubernetes.default.svc"],"expirationSeconds":3600}}"#,
    )
    .unwrap();
    let answer = kubectl(
        &c,
        &[
            "create",
            "--raw",
            "/api/v1/namespaces/kube-system/serviceaccounts/switchyard/token",
            "-f",
            &request.to_string_lossy(),
        ],
    );
    let token = serde_json::from_str::<serde_json::Value>(&answer).unwrap()["status"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let kubeconfig = c
        .api
        .as_ref()
        .unwrap()
        .kubeconfig_for("switchyard.kubeconfig", &token)
        .unwrap();
    c.set_agent_kubeconfig(kubeconfig);
    let before_heartbeat = network_unavailable(&c, "node1", "lastHeartbeatTime");
    // Heartbeats have a resolution of one second.
    std::thread::sleep(Duration::from_millis(1100));
    // The node settings the admin's agents pushed are cleared by a dataplane restart, so
    // that the new agents must read everything themselves.
    for i in 0..2 {
        c.restart_dataplane(i).unwrap();
        c.restart_control(i).unwrap();
    }
    for i in 0..2 {
        c.wait_for_peers(i, 1, Duration::from_secs(10))
            .unwrap_or_else(|e| {
                panic!("node{i} with the ServiceAccount's token: {e}\n{}", c.logs())
            });
    }
    cluster::assert_connected(&c, "agents with the ServiceAccount's token");
    publish_service(&c, "read-by-the-account");
    wait(
        Duration::from_secs(5),
        "a Service read with the ServiceAccount",
        || (0..2).all(|i| serves(&c, i, "read-by-the-account")),
    );
    wait(
        Duration::from_secs(5),
        "NetworkUnavailable set with the ServiceAccount",
        || network_unavailable(&c, "node1", "lastHeartbeatTime") != before_heartbeat,
    );
    let logs = c.logs();
    assert!(
        !logs.contains("forbidden"),
        "the agent was refused something:\n{logs}"
    );

    // Nothing more than it uses.
    let sa = "--as=system:serviceaccount:kube-system:switchyard";
    let can = |verb: &str, what: &str, ns: Option<&str>| -> bool {
        // `nodes/status` is a subresource; `configmaps/NAME` one object.
        let (what, subresource) = match what.strip_suffix("/status") {
            Some(resource) => (resource, Some("--subresource=status")),
            None => (what, None),
        };
        let mut args = vec!["auth", "can-i", verb, what, sa];
        args.extend(subresource);
        if let Some(ns) = ns {
            args.extend(["-n", ns]);
        }
        let api = c.api.as_ref().unwrap();
        matches!(
            api.kubectl(&c.hub, &args).as_deref().map(str::trim),
            Ok("yes")
        )
    };
    for (verb, what) in [
        ("watch", "nodes"),
        ("list", "pods"),
        ("watch", "namespaces"),
        ("list", "services"),
        ("watch", "endpointslices.discovery.k8s.io"),
        ("watch", "networkpolicies.networking.k8s.io"),
        ("patch", "nodes/status"),
    ] {
        assert!(can(verb, what, None), "the agent needs {verb} {what}");
    }
    assert!(can(
        "get",
        "configmaps/switchyard-config",
        Some("kube-system")
    ));
    for (verb, what, ns) in [
        ("create", "pods", None),
        ("delete", "nodes", None),
        ("patch", "nodes", None),
        ("get", "secrets", Some("kube-system")),
        ("list", "secrets", None),
        ("get", "configmaps/other", Some("kube-system")),
        (
            "update",
            "configmaps/switchyard-config",
            Some("kube-system"),
        ),
        (
            "create",
            "networkpolicies.networking.k8s.io",
            Some("default"),
        ),
        ("patch", "services", Some("default")),
    ] {
        assert!(!can(verb, what, ns), "the agent must not {verb} {what}");
    }
}
