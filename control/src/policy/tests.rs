//! The upstream NetworkPolicy e2e cases as truth tables: namespaces x, y, z, each with
//! pods a, b, c (labels `pod: a` ...; namespaces labelled `ns: x` ...), servers on port 80
//! (`serve-80-tcp`) and 81 (`serve-81-udp`, UDP). Every case lists what differs from "all
//! allowed".

use super::*;
use crate::cluster::manifests::load_text;
use std::path::Path;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];

fn world(policies: &str) -> Manifests {
    let mut text = String::new();
    for (i, ns) in NAMESPACES.iter().enumerate() {
        text += &format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}}}}}\n"
        );
        for (j, pod) in PODS.iter().enumerate() {
            text += &format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}}}\nspec:\n  containers:\n  - name: c\n    ports:\n    - {{name: serve-80-tcp, containerPort: 80, protocol: TCP}}\n    - {{name: serve-81-udp, containerPort: 81, protocol: UDP}}\nstatus:\n  podIPs: [{{ip: \"10.0.{i}.{}\"}}]\n",
                j + 1
            );
        }
    }
    text += policies;
    let mut m = Manifests::default();
    let mut errors = Vec::new();
    load_text(Path::new("world.yaml"), &text, &mut m, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    m
}

fn pod<'a>(m: &'a Manifests, name: &str) -> &'a PodView {
    let (ns, pod) = name.split_once('/').unwrap();
    m.pods.get(&(ns.into(), pod.into())).unwrap()
}

/// Checks every (client, server) pair on `port`/`protocol`: allowed unless listed in
/// `denied` (as "x/a->y/b").
fn table(policies: &str, port: u16, protocol: &str, denied: &[&str]) {
    let m = world(policies);
    for c_ns in NAMESPACES {
        for c in PODS {
            for s_ns in NAMESPACES {
                for s in PODS {
                    let (from, to) = (format!("{c_ns}/{c}"), format!("{s_ns}/{s}"));
                    if from == to {
                        continue; // a pod reaching itself is not part of the matrices
                    }
                    let (client, server) = (pod(&m, &from), pod(&m, &to));
                    let v = explain(&m, client, server, port, protocol);
                    let pair = format!("{from}->{to}");
                    assert_eq!(
                        v.allowed,
                        !denied.contains(&pair.as_str()),
                        "{pair} {port}/{protocol}: {}",
                        v.reason
                    );
                    let (enforced, _) =
                        super::compile::tests::enforced(&m, client, server, port, protocol);
                    assert_eq!(
                        enforced, v.allowed,
                        "{pair} {port}/{protocol}: the dataplane's rules"
                    );
                }
            }
        }
    }
}

/// Every pair into `to` but from the pods in `except`.
fn all_into(to: &str, except: &[&str]) -> Vec<String> {
    NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .filter(|from| from != to && !except.contains(&from.as_str()))
        .map(|from| format!("{from}->{to}"))
        .collect()
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

const DENY_INGRESS_X: &str = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n";

#[test]
fn no_policy_allows_everything() {
    table("", 80, "TCP", &[]);
}

#[test]
fn default_deny_ingress_cuts_the_namespace_off_from_everyone() {
    let denied: Vec<String> = PODS
        .iter()
        .flat_map(|p| all_into(&format!("x/{p}"), &[]))
        .collect();
    table(DENY_INGRESS_X, 80, "TCP", &refs(&denied));
}

#[test]
fn a_pod_selector_peer_means_the_policys_own_namespace() {
    let policy = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: only-b, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {pod: b}}}]\n";
    let denied = all_into("x/a", &["x/b"]);
    table(policy, 80, "TCP", &refs(&denied));
}

#[test]
fn namespace_and_pod_selectors_and_in_one_peer_or_in_two() {
    let and = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: and, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n      podSelector: {matchLabels: {pod: b}}\n";
    table(and, 80, "TCP", &refs(&all_into("x/a", &["y/b"])));
    let or = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: or, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from:\n    - namespaceSelector: {matchLabels: {ns: y}}\n    - podSelector: {matchLabels: {pod: b}}\n";
    table(
        or,
        80,
        "TCP",
        &refs(&all_into("x/a", &["y/a", "y/b", "y/c", "x/b"])),
    );
    // The implied label kubernetes.io/metadata.name selects a namespace by name.
    let by_name = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: by-name, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: z}}}]\n";
    table(
        by_name,
        80,
        "TCP",
        &refs(&all_into("x/a", &["z/a", "z/b", "z/c"])),
    );
}

#[test]
fn ports_numbers_names_ranges_and_protocols() {
    let port_81 = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p81, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{port: 81}]\n";
    table(port_81, 80, "TCP", &refs(&all_into("x/a", &[])));
    table(port_81, 81, "TCP", &[]);
    // A second policy allowing 80 unions with it.
    let also_80 = format!("{port_81}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p80, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - ports: [{{port: 80}}]\n");
    table(&also_80, 80, "TCP", &[]);
    // A named port resolves against the destination pod.
    let named = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: named, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{port: serve-80-tcp, protocol: TCP}]\n";
    table(named, 80, "TCP", &[]);
    table(named, 81, "UDP", &refs(&all_into("x/a", &[])));
    // A range.
    let range = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: range, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{port: 79, endPort: 80}]\n";
    table(range, 80, "TCP", &[]);
    table(range, 81, "TCP", &refs(&all_into("x/a", &[])));
    // A TCP rule does not admit UDP; an SCTP-only rule does not admit TCP.
    let tcp_only = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: tcp, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - ports: [{protocol: TCP}]\n";
    table(tcp_only, 81, "UDP", &refs(&all_into("x/a", &[])));
    let sctp = tcp_only.replace("protocol: TCP", "protocol: SCTP");
    table(&sctp, 80, "TCP", &refs(&all_into("x/a", &[])));
}

#[test]
fn the_clients_egress_deny_wins_over_the_servers_ingress() {
    let policy = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: no-egress, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  policyTypes: [Egress]\n";
    let denied: Vec<String> = NAMESPACES
        .iter()
        .flat_map(|ns| PODS.iter().map(move |p| format!("{ns}/{p}")))
        .filter(|to| to != "x/a")
        .map(|to| format!("x/a->{to}"))
        .collect();
    table(policy, 80, "TCP", &refs(&denied));
    // Egress allowed to y only. Without policyTypes the policy is Ingress and Egress
    // (it has egress rules): with no ingress rule, nothing reaches x/a either.
    let to_y = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: to-y, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {ns: y}}}]\n";
    let into_a = all_into("x/a", &[]);
    let denied: Vec<&str> = denied
        .iter()
        .map(String::as_str)
        .filter(|d| !d.contains("->y/"))
        .chain(into_a.iter().map(String::as_str))
        .collect();
    table(to_y, 80, "TCP", &denied);
}

#[test]
fn an_ip_block_except_narrows_its_own_peer_only() {
    let block = "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: block, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.0.2/32]}}]\n";
    table(
        block,
        80,
        "TCP",
        &refs(&all_into(
            "x/a",
            &["x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c"],
        )),
    );
    // A second policy re-allows x/b.
    let again = format!("{block}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: b, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{pod: b}}}}}}]\n");
    table(&again, 80, "TCP", &[]);
}

#[test]
fn explain_names_the_deciding_rule() {
    let m = world(DENY_INGRESS_X);
    let v = explain(&m, pod(&m, "y/a"), pod(&m, "x/b"), 80, "TCP");
    assert!(!v.allowed);
    assert!(
        v.reason.contains("denied: no rule of x/deny allows it"),
        "{}",
        v.reason
    );
    let v = explain(&m, pod(&m, "x/a"), pod(&m, "y/b"), 80, "TCP");
    assert!(v.allowed);
    assert!(v.reason.contains("no policy selects"), "{}", v.reason);
}
