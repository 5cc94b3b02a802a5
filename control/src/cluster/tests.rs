//! Manifests directories as files on disk, read, allocated and planned.

use super::allocate::{allocate, Record};
use super::config::BackendKind;
use super::manifests::{load_dir, ManifestError};
use super::plan::plan;
use std::path::PathBuf;

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str, files: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("sy-manifests-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text) in files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const CONFIG: &str = "apiVersion: v1
kind: ConfigMap
metadata: {name: switchyard-config, namespace: kube-system}
data:
  config.yaml: |
    clusterCIDR: 10.244.0.0/16
    clusterCIDRv6: fd00:244::/56
    backend: {type: ipip}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: someone-else}
data: {x: y}
";

fn node(name: &str, cidr: Option<&str>, ip: &str) -> String {
    let spec = cidr
        .map(|c| format!("spec: {{podCIDR: {c}}}\n"))
        .unwrap_or_default();
    format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n{spec}status: {{addresses: [{{type: Hostname, address: {name}}}, {{type: InternalIP, address: {ip}}}]}}\n")
}

/// The errors of a result that must fail, as the text the CLI prints.
fn only_errors(result: Result<impl std::fmt::Debug, Vec<ManifestError>>) -> Vec<String> {
    result
        .expect_err("expected manifest errors")
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn reads_allocates_and_plans() {
    let two_nodes = format!(
        "{}---\n{}",
        node("node-a", None, "192.168.1.11"),
        node("node-b", Some("10.244.7.0/24"), "192.168.1.12")
    );
    let dir = Dir::new(
        "ok",
        &[
            ("00-config.yaml", CONFIG),
            ("nodes.yaml", &two_nodes),
            ("notes.txt", "ignored"),
        ],
    );
    let mut m = load_dir(&dir.0).unwrap();
    assert_eq!(m.nodes.len(), 2);
    assert_eq!(m.config.backend.kind, BackendKind::Ipip);
    let record = allocate(&mut m, &Record::new()).unwrap();
    let a = &m.nodes[0];
    assert_eq!(a.name, "node-a");
    let a_cidrs: Vec<String> = a.pod_cidrs.iter().map(ToString::to_string).collect();
    assert_eq!(a_cidrs, vec!["10.244.0.0/24", "fd00:244::/64"]);
    assert_eq!(
        m.nodes[1].pod_cidrs.len(),
        1,
        "explicit podCIDRs are kept as they are"
    );
    assert_eq!(record.len(), 1);

    let p = plan(&m, "node-a").unwrap();
    assert_eq!(p.address.to_string(), "192.168.1.11");
    assert_eq!(p.peers.len(), 1);
    assert_eq!(p.peers[0].node, "node-b");
    assert_eq!(p.peers[0].address.to_string(), "192.168.1.12");
    assert!(plan(&m, "node-z")
        .unwrap_err()
        .contains("no Node named node-z"));

    // A third node that sorts first: recorded allocations do not move.
    let three = format!("{two_nodes}---\n{}", node("node-0", None, "192.168.1.10"));
    let dir2 = Dir::new(
        "grown",
        &[("00-config.yaml", CONFIG), ("nodes.yaml", &three)],
    );
    let mut m2 = load_dir(&dir2.0).unwrap();
    allocate(&mut m2, &record).unwrap();
    let by_name = |n: &str| m2.nodes.iter().find(|x| x.name == n).unwrap().pod_cidrs[0].to_string();
    assert_eq!(by_name("node-a"), "10.244.0.0/24");
    assert_eq!(by_name("node-0"), "10.244.1.0/24");

    // A new Node claiming an allocated CIDR does not move it: the claim is the error.
    let claim = format!(
        "{two_nodes}---\n{}",
        node("node-c", Some("10.244.0.0/25"), "192.168.1.11")
    );
    let dir3 = Dir::new(
        "claim",
        &[("00-config.yaml", CONFIG), ("nodes.yaml", &claim)],
    );
    let mut m3 = load_dir(&dir3.0).unwrap();
    let errors = only_errors(allocate(&mut m3, &record));
    assert!(
        errors
            .iter()
            .any(|e| e.contains("10.244.0.0/25") && e.contains("node-a")),
        "{errors:?}"
    );
}

#[test]
fn bad_manifests_name_the_file_and_field() {
    let dir = Dir::new(
        "bad",
        &[
            ("00-config.yaml", CONFIG),
            (
                "broken.yaml",
                "apiVersion: v1\nkind: Node\nmetadata: {name: [unclosed\n",
            ),
            (
                "outside.yaml",
                &node("node-x", Some("10.99.0.0/24"), "192.168.1.20"),
            ),
            (
                "bad-cidr.yaml",
                &node("node-y", Some("10.244.3.1/24"), "192.168.1.21"),
            ),
        ],
    );
    let text = only_errors(load_dir(&dir.0));
    assert!(
        text.iter()
            .any(|e| e.contains("broken.yaml") && e.contains("invalid YAML")),
        "{text:?}"
    );
    assert!(
        text.iter().any(|e| e.contains("bad-cidr.yaml")
            && e.contains("spec.podCIDR")
            && e.contains("host bits")),
        "{text:?}"
    );

    let dir = Dir::new(
        "outside",
        &[
            ("00-config.yaml", CONFIG),
            (
                "outside.yaml",
                &node("node-x", Some("10.99.0.0/24"), "192.168.1.20"),
            ),
            (
                "a.yaml",
                &node("node-a", Some("10.244.4.0/24"), "192.168.1.21"),
            ),
            (
                "b.yaml",
                &node("node-b", Some("10.244.4.0/25"), "192.168.1.22"),
            ),
        ],
    );
    let mut m = load_dir(&dir.0).unwrap();
    let text: Vec<String> = only_errors(allocate(&mut m, &Record::new()));
    assert!(
        text.iter().any(|e| e.contains("outside.yaml")
            && e.contains("Node node-x: spec.podCIDR")
            && e.contains("outside clusterCIDR")),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|e| e.contains("b.yaml") && e.contains("overlaps 10.244.4.0/24")),
        "{text:?}"
    );

    let gre = CONFIG.replace("type: ipip", "type: gre");
    let dir = Dir::new("backend", &[("00-config.yaml", &gre)]);
    let text: Vec<String> = only_errors(load_dir(&dir.0));
    assert!(
        text.iter().any(|e| e.contains("00-config.yaml")
            && e.contains("data.config.yaml")
            && e.contains("gre")),
        "{text:?}"
    );
}

#[test]
fn json_manifests_and_exhaustion() {
    let json = r#"{"apiVersion":"v1","kind":"Node","metadata":{"name":"node-j"},"status":{"addresses":[{"type":"InternalIP","address":"192.168.1.30"}]}}"#;
    let tiny = CONFIG.replace("clusterCIDR: 10.244.0.0/16", "clusterCIDR: 10.244.0.0/24");
    let dir = Dir::new(
        "json",
        &[
            ("c.yaml", &tiny),
            ("j.json", json),
            ("k.yaml", &node("node-k", None, "192.168.1.31")),
        ],
    );
    let mut m = load_dir(&dir.0).unwrap();
    let text: Vec<String> = only_errors(allocate(&mut m, &Record::new()));
    assert!(
        text.iter()
            .any(|e| e.contains("node-k") && e.contains("no free /24")),
        "{text:?}"
    );
}

#[test]
fn a_v1beta1_endpoint_slice_reads_as_v1_with_its_node_from_topology() {
    let text = "apiVersion: discovery.k8s.io/v1beta1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: default\n  labels: {kubernetes.io/service-name: web}\naddressType: IPv4\nports: [{name: http, port: 8080, protocol: TCP}]\nendpoints:\n- addresses: [10.244.1.5]\n  conditions: {ready: true}\n  topology: {kubernetes.io/hostname: node-b}\n";
    let mut m = super::manifests::Manifests::default();
    let mut errors = Vec::new();
    super::manifests::load_text(
        std::path::Path::new("slice.yaml"),
        text,
        &mut m,
        &mut errors,
    );
    assert!(errors.is_empty(), "{errors:?}");
    let slice = &m.endpoint_slices[0].slice;
    let endpoints = slice.endpoints.as_deref().unwrap_or_default();
    assert_eq!(endpoints[0].node_name.as_deref(), Some("node-b"));
}
