//! NetworkPolicy enforced on a two-node cluster, as Kubernetes' e2e tests check it: the
//! pods x/a ... z/c spread over both nodes probe each other on ports 80 and 81, TCP and
//! UDP, and every cell of every truth table must match, both in the namespaces and in
//! `explain`'s answer from the manifests alone. Policy changes (creation, update,
//! deletion, a pod's or a namespace's labels) must reach new and established flows within
//! a second. They need root.

use bench_env::policy::{PolicyWorld, NAMESPACES, PODS};
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use switchyard_control::cluster::manifests;
use switchyard_control::policy::{explain, PodView};
use switchyard_dataplane::io::netns::run_in;

fn world() -> PolicyWorld {
    bench_env::require_root("NetworkPolicy integration test");
    PolicyWorld::build().expect("NetworkPolicy world")
}

fn all_pods() -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .collect()
}

/// Every pair into `to`, but from the pods in `except`.
fn into(to: &str, except: &[&str]) -> Vec<String> {
    all_pods()
        .into_iter()
        .filter(|from| from != to && !except.contains(&from.as_str()))
        .map(|from| format!("{from}->{to}"))
        .collect()
}

/// Every pair out of `from`, but to the pods in `except`.
fn out_of(from: &str, except: &[&str]) -> Vec<String> {
    all_pods()
        .into_iter()
        .filter(|to| to != from && !except.contains(&to.as_str()))
        .map(|to| format!("{from}->{to}"))
        .collect()
}

/// Every pair into any pod of namespace `ns`.
fn into_namespace(ns: &str) -> Vec<String> {
    PODS.iter()
        .flat_map(|p| into(&format!("{ns}/{p}"), &[]))
        .collect()
}

fn policy(name: &str, ns: &str, spec: &str) -> String {
    format!("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}")
}

/// `explain`'s answer for every pair on `port`/`protocol`, from the manifests directory:
/// the pairs it denies.
fn explained(w: &PolicyWorld, port: u16, protocol: &str) -> BTreeSet<String> {
    let m = manifests::load_dir(&w.cluster.manifests).expect("manifests");
    let pods: &[PodView] = &m.pods;
    let mut denied = BTreeSet::new();
    for c in pods {
        for s in pods {
            if (&c.namespace, &c.name) == (&s.namespace, &s.name) {
                continue;
            }
            if !explain(&m, c, s, port, protocol).allowed {
                denied.insert(format!(
                    "{}/{}->{}/{}",
                    c.namespace, c.name, s.namespace, s.name
                ));
            }
        }
    }
    denied
}

/// Waits (up to 5 s) until the probes on `port`/`protocol` block exactly `denied`, and
/// checks that `explain` agrees with every cell.
fn expect(w: &PolicyWorld, case: &str, port: u16, protocol: &str, denied: &[String]) {
    let want: BTreeSet<String> = denied.iter().cloned().collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = w.blocked(port, protocol);
    while got != want && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        got = w.blocked(port, protocol);
    }
    assert!(
        got == want,
        "{case} {port}/{protocol}:\n  blocked but should pass: {:?}\n  passed but should be blocked: {:?}\n{}",
        got.difference(&want).collect::<Vec<_>>(),
        want.difference(&got).collect::<Vec<_>>(),
        w.cluster.logs()
    );
    assert_eq!(
        explained(w, port, protocol),
        want,
        "{case} {port}/{protocol}: explain disagrees"
    );
}

fn concat(parts: &[Vec<String>]) -> Vec<String> {
    let set: BTreeSet<String> = parts.iter().flatten().cloned().collect();
    set.into_iter().collect()
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn selectors_and_directions_on_two_nodes() {
    selectors_and_directions(&world());
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces, veth pairs and AF_XDP sockets"
)]
fn selectors_and_directions_on_two_nodes_with_afxdp_pod_ports() {
    bench_env::require_root("NetworkPolicy integration test");
    let w = PolicyWorld::build_with(vec!["--pod-ports".into(), "afxdp".into()])
        .expect("NetworkPolicy world");
    selectors_and_directions(&w);
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces, XDP programs and AF_XDP sockets"
)]
fn selectors_and_directions_on_two_nodes_across_an_afxdp_uplink() {
    bench_env::require_root("NetworkPolicy integration test");
    let w = PolicyWorld::build_with(vec!["--uplink-mode".into(), "afxdp".into()])
        .expect("NetworkPolicy world");
    selectors_and_directions(&w);
}

/// Every selector and direction of the truth tables, in `w`.
fn selectors_and_directions(w: &PolicyWorld) {
    expect(w, "no policy", 80, "TCP", &[]);
    expect(w, "no policy", 81, "UDP", &[]);

    w.set_policies(&policy(
        "deny",
        "x",
        "  podSelector: {}\n  policyTypes: [Ingress]\n",
    ))
    .unwrap();
    expect(
        w,
        "default deny ingress in x",
        80,
        "TCP",
        &into_namespace("x"),
    );
    expect(
        w,
        "default deny ingress in x",
        80,
        "UDP",
        &into_namespace("x"),
    );

    w.set_policies(&policy(
        "deny-all",
        "x",
        "  podSelector: {}\n  policyTypes: [Ingress, Egress]\n",
    ))
    .unwrap();
    let out_of_x: Vec<String> = PODS
        .iter()
        .flat_map(|p| out_of(&format!("x/{p}"), &[]))
        .collect();
    expect(
        w,
        "deny all in x",
        81,
        "TCP",
        &concat(&[into_namespace("x"), out_of_x]),
    );

    w.set_policies(&policy(
        "only-b",
        "x",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}]\n",
    ))
    .unwrap();
    expect(w, "pod selector", 80, "TCP", &into("x/a", &["x/b"]));

    w.set_policies(&policy(
        "and",
        "x",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n      podSelector: {matchLabels: {pod: b}}\n",
    ))
    .unwrap();
    expect(
        w,
        "namespace AND pod selector",
        80,
        "TCP",
        &into("x/a", &["y/b"]),
    );

    w.set_policies(&policy(
        "or",
        "x",
        "  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n    - podSelector: {matchLabels: {pod: b}}\n",
    ))
    .unwrap();
    expect(
        w,
        "namespace OR pod selector",
        80,
        "TCP",
        &into("x/a", &["y/a", "y/b", "y/c", "x/b"]),
    );

    w.set_policies(&policy(
        "no-egress",
        "x",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n",
    ))
    .unwrap();
    expect(w, "egress deny", 80, "TCP", &out_of("x/a", &[]));
    expect(w, "egress deny", 81, "UDP", &out_of("x/a", &[]));

    // Egress to y only; without policyTypes the policy also isolates x/a's ingress.
    w.set_policies(&policy(
        "to-y",
        "x",
        "  podSelector: {matchLabels: {pod: a}}\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {ns: y}}}]\n",
    ))
    .unwrap();
    expect(
        w,
        "client egress and server ingress",
        80,
        "TCP",
        &concat(&[out_of("x/a", &["y/a", "y/b", "y/c"]), into("x/a", &[])]),
    );
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn ports_protocols_and_ip_blocks_on_two_nodes() {
    let w = world();
    let a = "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Ingress]\n  ingress:\n";

    w.set_policies(&policy(
        "p81",
        "x",
        &format!("{a}  - ports: [{{port: 81}}]\n"),
    ))
    .unwrap();
    expect(&w, "port 81 only", 80, "TCP", &into("x/a", &[]));
    expect(&w, "port 81 only", 81, "TCP", &[]);

    w.set_policies(&policy(
        "named",
        "x",
        &format!("{a}  - ports: [{{port: serve-80-tcp}}]\n"),
    ))
    .unwrap();
    expect(&w, "named port", 80, "TCP", &[]);
    expect(&w, "named port", 81, "TCP", &into("x/a", &[]));
    expect(&w, "named port", 80, "UDP", &into("x/a", &[]));

    w.set_policies(&policy(
        "range",
        "x",
        &format!("{a}  - ports: [{{port: 80, endPort: 81, protocol: TCP}}]\n"),
    ))
    .unwrap();
    expect(&w, "endPort", 81, "TCP", &[]);
    expect(&w, "endPort", 81, "UDP", &into("x/a", &[]));

    w.set_policies(&policy(
        "udp-only",
        "x",
        &format!("{a}  - ports: [{{protocol: UDP}}]\n"),
    ))
    .unwrap();
    expect(&w, "protocol only", 80, "TCP", &into("x/a", &[]));
    expect(&w, "protocol only", 81, "UDP", &[]);

    // The cluster's pods, but x/b.
    let xb = w.pod("x/b").ipv4;
    w.set_policies(&policy(
        "block",
        "x",
        &format!("{a}  - from: [{{ipBlock: {{cidr: 10.244.0.0/16, except: [\"{xb}/32\"]}}}}]\n"),
    ))
    .unwrap();
    expect(
        &w,
        "ipBlock with except",
        80,
        "TCP",
        &["x/b->x/a".to_string()],
    );

    // Egress to any pod's named port resolves against the destination.
    w.set_policies(&policy(
        "egress-named",
        "x",
        "  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{port: serve-81-tcp}]\n",
    ))
    .unwrap();
    expect(&w, "egress named port", 81, "TCP", &[]);
    expect(&w, "egress named port", 80, "TCP", &out_of("x/a", &[]));
}

/// Sends a byte on `s` and reads it back within 200 ms.
fn echoes(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    s.write_all(b"e").is_ok() && s.read_exact(&mut b).is_ok()
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn changes_reach_new_and_established_flows_within_a_second() {
    let mut w = world();
    // x/b (node 1) holds a connection to x/a (node 0) open.
    let at = SocketAddr::from((w.pod("x/a").ipv4, 80));
    let mut conn = run_in(&w.pod("x/b").ns.path(), || {
        let s = TcpStream::connect_timeout(&at, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(s)
    })
    .unwrap();
    assert!(echoes(&mut conn));

    // Deny all ingress of x: the established connection must stop within a second.
    let written = Instant::now();
    w.set_policies(&policy(
        "deny",
        "x",
        "  podSelector: {}\n  policyTypes: [Ingress]\n",
    ))
    .unwrap();
    while echoes(&mut conn) {
        assert!(
            written.elapsed() < Duration::from_secs(1),
            "the established flow still echoes {:?} after the policy was written",
            written.elapsed()
        );
    }
    eprintln!(
        "established flow stopped {:?} after the change",
        written.elapsed()
    );
    expect(&w, "deny ingress in x", 80, "TCP", &into_namespace("x"));

    // The denial is listed, counted and explained.
    let (ok, json) = w.cluster.nodes[0]
        .control(&["get", "flows", "--denied", "-o", "json"])
        .unwrap();
    assert!(ok);
    let flows: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert!(
        flows.iter().any(|f| f["pod"] == "x/a"
            && f["direction"] == "ingress"
            && f["policies"][0] == "x/deny"
            && f["dst_port"] == 80),
        "{json}"
    );
    let (ok, json) = w.cluster.nodes[0]
        .control(&["get", "policies", "-o", "json"])
        .unwrap();
    assert!(ok);
    let status: serde_json::Value = serde_json::from_str(&json).unwrap();
    let pods: Vec<&str> = status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(pods, ["a", "c"], "node 0 runs x/a and x/c: {json}");
    let stats = w.cluster.nodes[0].client().unwrap().stats().unwrap();
    assert!(
        stats.drops["policy_denied_ingress"] > 0,
        "{:?}",
        stats.drops
    );
    let (ok, json) = w.cluster.nodes[0]
        .control(&[
            "explain",
            "--manifests",
            w.cluster.manifests.to_str().unwrap(),
            "--from",
            "y/a",
            "--to",
            "x/a",
            "--port",
            "80/tcp",
            "-o",
            "json",
        ])
        .unwrap();
    assert!(ok);
    let verdict: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(verdict["allowed"], false, "{json}");

    // Admit pods labelled allowed=yes: none yet; then y/b gets the label.
    let admit = |from: &str| {
        policy(
            "deny",
            "x",
            &format!(
                "  podSelector: {{}}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{from}]\n"
            ),
        )
    };
    w.set_policies(&admit(
        "{namespaceSelector: {}, podSelector: {matchLabels: {allowed: \"yes\"}}}",
    ))
    .unwrap();
    expect(
        &w,
        "update: admit allowed=yes",
        80,
        "TCP",
        &into_namespace("x"),
    );
    w.labels
        .insert("y/b".into(), vec![("allowed".into(), "yes".into())]);
    let written = Instant::now();
    w.write_world().unwrap();
    let xa = SocketAddr::from((w.pod("x/a").ipv4, 81));
    let yb = w.pod("y/b").ns.path();
    while !run_in(&yb, || {
        Ok(TcpStream::connect_timeout(&xa, Duration::from_millis(300)).is_ok())
    })
    .unwrap()
    {
        assert!(
            written.elapsed() < Duration::from_secs(1),
            "the new label took longer than a second"
        );
    }
    eprintln!(
        "a pod's new label admitted it {:?} after the change",
        written.elapsed()
    );
    let without_yb: Vec<String> = into_namespace("x")
        .into_iter()
        .filter(|p| !p.starts_with("y/b->"))
        .collect();
    expect(&w, "pod label change", 80, "TCP", &without_yb);

    // A namespace's label admits its pods.
    w.set_policies(&admit("{namespaceSelector: {matchLabels: {team: blue}}}"))
        .unwrap();
    expect(
        &w,
        "update: admit team=blue",
        80,
        "TCP",
        &into_namespace("x"),
    );
    w.labels
        .insert("z".into(), vec![("team".into(), "blue".into())]);
    w.write_world().unwrap();
    let without_z: Vec<String> = into_namespace("x")
        .into_iter()
        .filter(|p| !p.starts_with("z/"))
        .collect();
    expect(&w, "namespace label change", 80, "TCP", &without_z);

    // Deleted: everything passes again, the denied connection's successors included.
    w.set_policies("").unwrap();
    expect(&w, "policy deleted", 80, "TCP", &[]);
    expect(&w, "policy deleted", 81, "UDP", &[]);
}
