//! The compiled rules, as the dataplane enforces them, against `explain`: on the truth
//! tables (through [`enforced`]) and on random clusters and policies.

use super::*;
use crate::cluster::manifests::load_text;
use crate::policy::{explain, PodView};
use std::path::Path;
use std::sync::Arc;
use switchyard_dataplane::tables::policy::{CompiledRules, PolicyTable};

/// Whether the dataplane, given the rules compiled from `m`, lets `client` open a flow to
/// `server`'s `port`/`protocol` (the client's egress and the server's ingress, as the
/// pipeline checks them), and the origins of the rules that allowed it.
pub(in crate::policy) fn enforced(
    m: &Manifests,
    client: &PodView,
    server: &PodView,
    port: u16,
    protocol: &str,
) -> (bool, Vec<String>) {
    let set = compile(m, None);
    let table = PolicyTable::compile(&set, 1, Vec::new());
    let number = crate::policy::protocol_number(protocol).unwrap_or(0);
    let (Some(c), Some(s)) = (client.ip, server.ip) else {
        return (true, Vec::new());
    };
    let mut origins = Vec::new();
    let mut check = |rules: Option<&Arc<CompiledRules>>, peer| match rules {
        None => true,
        Some(r) => match r.allows(peer, number, port) {
            Some(i) => {
                origins.push(r.origins[i as usize].clone());
                true
            }
            None => false,
        },
    };
    let egress = check(table.pod(c).and_then(|p| p.egress.as_ref()), s);
    let ingress = check(table.pod(s).and_then(|p| p.ingress.as_ref()), c);
    (egress && ingress, origins)
}

fn pick<'a, T>(rng: &mut fastrand::Rng, items: &'a [T]) -> &'a T {
    &items[rng.usize(..items.len())]
}

/// A random label selector over `key` with values from `values` (empty selector too).
fn selector(rng: &mut fastrand::Rng, key: &str, values: &[&str]) -> String {
    match rng.u8(0..5) {
        0 => "{}".into(),
        1 | 2 => format!("{{matchLabels: {{{key}: {}}}}}", pick(rng, values)),
        3 => format!(
            "{{matchExpressions: [{{key: {key}, operator: {}, values: [{}]}}]}}",
            pick(rng, &["In", "NotIn"]),
            pick(rng, values)
        ),
        _ => format!(
            "{{matchExpressions: [{{key: {}, operator: {}}}]}}",
            pick(rng, &[key, "tier"]),
            pick(rng, &["Exists", "DoesNotExist"])
        ),
    }
}

fn peer(rng: &mut fastrand::Rng) -> String {
    match rng.u8(0..5) {
        0 => format!(
            "{{podSelector: {}}}",
            selector(rng, "pod", &["a", "b", "c"])
        ),
        1 => format!(
            "{{namespaceSelector: {}}}",
            selector(rng, "ns", &["x", "y", "z"])
        ),
        2 => format!(
            "{{namespaceSelector: {}, podSelector: {}}}",
            selector(rng, "ns", &["x", "y", "z"]),
            selector(rng, "pod", &["a", "b", "c"])
        ),
        3 => format!(
            "{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: {}}}}}}}",
            pick(rng, &["x", "y", "z"])
        ),
        _ => {
            let cidr = pick(
                rng,
                &["10.0.0.0/16", "10.0.1.0/24", "10.0.0.0/22", "10.0.2.3/32"],
            );
            let except = pick(rng, &["", "10.0.1.2/32", "10.0.0.0/24", "10.0.2.0/30"]);
            let inside = except.is_empty()
                || cidr
                    .parse::<IpNet>()
                    .unwrap()
                    .contains(&except.parse::<IpNet>().unwrap());
            if inside && !except.is_empty() {
                format!("{{ipBlock: {{cidr: {cidr}, except: [{except}]}}}}")
            } else {
                format!("{{ipBlock: {{cidr: {cidr}}}}}")
            }
        }
    }
}

fn port(rng: &mut fastrand::Rng) -> String {
    let protocol = pick(
        rng,
        &["", ", protocol: TCP", ", protocol: UDP", ", protocol: SCTP"],
    );
    match rng.u8(0..5) {
        0 => format!("{{port: {}{protocol}}}", pick(rng, &[80, 81, 82])),
        1 => format!(
            "{{port: 80, endPort: {}{protocol}}}",
            pick(rng, &[80, 81, 90])
        ),
        2 => format!(
            "{{port: {}{protocol}}}",
            pick(
                rng,
                &["serve-80-tcp", "serve-81-udp", "serve-81-tcp", "nothing"]
            )
        ),
        _ => format!("{{protocol: {}}}", pick(rng, &["TCP", "UDP", "SCTP"])),
    }
}

fn rule(rng: &mut fastrand::Rng, peers_key: &str) -> String {
    let mut r = String::from("  - {");
    if rng.u8(0..4) > 0 {
        let peers: Vec<String> = (0..rng.usize(1..3)).map(|_| peer(rng)).collect();
        r += &format!("{peers_key}: [{}]", peers.join(", "));
    }
    if rng.bool() {
        if !r.ends_with('{') {
            r += ", ";
        }
        let ports: Vec<String> = (0..rng.usize(1..3)).map(|_| port(rng)).collect();
        r += &format!("ports: [{}]", ports.join(", "));
    }
    r + "}\n"
}

fn policy(rng: &mut fastrand::Rng, i: usize) -> String {
    let ns = pick(rng, &["x", "y", "z"]);
    let mut p = format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: {ns}}}\nspec:\n  podSelector: {}\n",
        selector(rng, "pod", &["a", "b", "c"])
    );
    match rng.u8(0..4) {
        0 => p += "  policyTypes: [Ingress]\n",
        1 => p += "  policyTypes: [Egress]\n",
        2 => p += "  policyTypes: [Ingress, Egress]\n",
        _ => {}
    }
    if rng.bool() {
        p += "  ingress:\n";
        for _ in 0..rng.usize(0..3) {
            p += &rule(rng, "from");
        }
        if p.ends_with("ingress:\n") {
            p += "  - {}\n";
        }
    }
    if rng.bool() {
        p += "  egress:\n";
        for _ in 0..rng.usize(1..3) {
            p += &rule(rng, "to");
        }
    }
    p
}

/// Namespaces x, y, z (labelled `ns`, some `tier`), pods a, b, c in each with random
/// labels and named ports, addresses 10.0.N.M, and random policies.
fn world(rng: &mut fastrand::Rng) -> Manifests {
    let mut text = String::new();
    for (i, ns) in ["x", "y", "z"].iter().enumerate() {
        let tier = if rng.bool() { ", tier: web" } else { "" };
        text += &format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}{tier}}}}}\n"
        );
        for (j, pod) in ["a", "b", "c"].iter().enumerate() {
            let label = pick(rng, &["a", "b", "c"]);
            let tier = if rng.bool() { ", tier: db" } else { "" };
            let named = pick(rng, &["serve-80-tcp", "serve-81-tcp", "other"]);
            text += &format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {ns}, labels: {{pod: {label}{tier}}}}}\nspec:\n  containers:\n  - name: c\n    ports:\n    - {{name: {named}, containerPort: {}, protocol: TCP}}\n    - {{name: serve-81-udp, containerPort: 81, protocol: UDP}}\nstatus:\n  podIPs: [{{ip: \"10.0.{i}.{}\"}}]\n",
                if named.contains("81") { 81 } else { 80 },
                j + 1
            );
        }
    }
    for i in 0..rng.usize(1..5) {
        text += &policy(rng, i);
    }
    let mut m = Manifests::default();
    let mut errors = Vec::new();
    load_text(Path::new("random.yaml"), &text, &mut m, &mut errors);
    assert!(errors.is_empty(), "{errors:?}\n{text}");
    m
}

#[test]
fn explain_agrees_with_the_compiled_rules_on_random_policies() {
    let mut rng = fastrand::Rng::with_seed(12);
    let (mut allowed_cells, mut denied_cells, mut by_rule) = (0, 0, 0);
    for round in 0..400 {
        let m = world(&mut rng);
        let pods: &[PodView] = &m.pods;
        for client in pods {
            for server in pods {
                if client.namespace == server.namespace && client.name == server.name {
                    continue;
                }
                for (port, protocol) in [(80, "TCP"), (81, "TCP"), (81, "UDP"), (90, "SCTP")] {
                    let v = explain(&m, client, server, port, protocol);
                    let (allowed, origins) = enforced(&m, client, server, port, protocol);
                    let pair = format!(
                        "round {round}: {}/{} -> {}/{} {port}/{protocol}",
                        client.namespace, client.name, server.namespace, server.name
                    );
                    assert_eq!(allowed, v.allowed, "{pair}: {}", v.reason);
                    if allowed {
                        allowed_cells += 1;
                    } else {
                        denied_cells += 1;
                    }
                    by_rule += usize::from(!origins.is_empty());
                    for origin in &origins {
                        assert!(
                            v.reason.contains(&format!("allowed by {origin}")),
                            "{pair}: the dataplane names {origin}, explain says {}",
                            v.reason
                        );
                    }
                }
            }
        }
    }
    // The random policies must exercise both outcomes, and rules that decide.
    let cells = allowed_cells + denied_cells;
    assert!(
        allowed_cells * 10 > cells && denied_cells * 10 > cells,
        "{allowed_cells} allowed, {denied_cells} denied"
    );
    assert!(
        by_rule * 10 > cells,
        "{by_rule} of {cells} allowed by a rule"
    );
}

#[test]
fn only_the_nodes_pods_are_compiled_and_rules_are_shared() {
    let text = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: x, labels: {app: web}}\nspec: {nodeName: n1, containers: [{name: c}]}\nstatus: {podIPs: [{ip: 10.0.0.1}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, namespace: x, labels: {app: web}}\nspec: {nodeName: n1, containers: [{name: c}]}\nstatus: {podIPs: [{ip: 10.0.0.2}]}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: c, namespace: x, labels: {app: web}}\nspec: {nodeName: n2, containers: [{name: c}]}\nstatus: {podIPs: [{ip: 10.0.1.1}]}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: web}}}]\n    ports: [{port: 80}]\n  - from: [{podSelector: {matchLabels: {app: nothing}}}]\n";
    let mut m = Manifests::default();
    let mut errors = Vec::new();
    load_text(Path::new("n.yaml"), text, &mut m, &mut errors);
    assert!(errors.is_empty(), "{errors:?}");
    let set = compile(&m, Some("n1"));
    let names: Vec<&str> = set.pods.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(
        set.rules.len(),
        1,
        "one rule shared; the one matching nobody left out"
    );
    assert_eq!(set.rules[0].peers.len(), 3, "every web pod, on any node");
    assert_eq!(set.pods[0].ingress.as_ref().unwrap().rules, [0]);
    assert!(set.pods[0].egress.is_none());
}
