//! Services on a cluster testbed, for both arms: Switchyard reads Service and
//! EndpointSlice manifests (its agents push them to the dataplanes); the kernel arm gets
//! the rules kube-proxy's iptables mode writes in every node (KUBE-SERVICES, KUBE-SVC-*
//! with `statistic mode random`, KUBE-SEP-* with DNAT, KUBE-NODEPORTS, masquerade of
//! marked packets, `recent` for ClientIP affinity).

use crate::cluster::Cluster;
use crate::netns::Netns;
use crate::testbed::{Arm, Pod};
use crate::{fail, Result};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};
use switchyard_api::{Reply, Request};

/// One endpoint of a slice, as a manifest lists it.
#[derive(Debug, Clone)]
pub struct SliceEndpoint {
    /// The pod's address.
    pub address: IpAddr,
    /// The node it runs on.
    pub node: String,
    /// `conditions.ready`.
    pub ready: bool,
    /// `conditions.terminating`.
    pub terminating: bool,
}

/// A Service manifest (`spec` holds the spec's lines, indented by two spaces) and its
/// EndpointSlices, one per address family present, with ports `ports` (name, target
/// port, protocol), as one YAML stream.
pub fn manifest(
    name: &str,
    spec: &str,
    ports: &[(&str, u16, &str)],
    endpoints: &[SliceEndpoint],
) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n{spec}"
    );
    for (family, v6) in [("IPv4", false), ("IPv6", true)] {
        let of_family: Vec<&SliceEndpoint> = endpoints
            .iter()
            .filter(|e| e.address.is_ipv6() == v6)
            .collect();
        if of_family.is_empty() && !endpoints.is_empty() {
            continue;
        }
        text += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: {family}\nports:\n",
            family.to_lowercase()
        );
        for (port_name, port, protocol) in ports {
            text += &format!("- {{name: {port_name}, port: {port}, protocol: {protocol}}}\n");
        }
        text += "endpoints:\n";
        for e in of_family {
            text += &format!(
                "- addresses: [\"{}\"]\n  nodeName: {}\n  conditions: {{ready: {}, serving: true, terminating: {}}}\n",
                e.address, e.node, e.ready, e.terminating
            );
        }
    }
    text
}

/// Writes `text` as `svc-NAME.yaml` in the cluster's manifests directory, at once.
pub fn write_manifest(c: &Cluster, name: &str, text: &str) -> Result<()> {
    let tmp = c.manifests.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, c.manifests.join(format!("svc-{name}.yaml")))?;
    Ok(())
}

/// Waits until every node's dataplane serves Service `name` with `endpoints` endpoints
/// on each port.
pub fn wait_served(c: &Cluster, name: &str, endpoints: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    for node in &c.nodes {
        loop {
            let served = match node.client()?.call(Request::ListServices)? {
                Reply::Services(list) => list.iter().any(|s| {
                    s.spec.name == name
                        && s.spec.ports.iter().all(|p| p.endpoints.len() == endpoints)
                }),
                other => return Err(fail!("unexpected answer {other:?}")),
            };
            if served {
                break;
            }
            if Instant::now() > deadline {
                return Err(fail!("{} does not serve Service {name}", node.name));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Ok(())
}

/// An IPv4 TCP Service for benchmarks: a cluster IP and port, maybe a node port, target
/// port on its backends, ClientIP affinity or not.
#[derive(Debug, Clone)]
pub struct BenchService {
    /// Name (namespace `default`).
    pub name: String,
    /// Cluster IP.
    pub cluster_ip: Ipv4Addr,
    /// Service port.
    pub port: u16,
    /// Port on the backends.
    pub target_port: u16,
    /// Node port, if any.
    pub node_port: Option<u16>,
    /// ClientIP affinity (kube-proxy's default timeout).
    pub affinity: bool,
}

/// The kube-proxy (iptables mode) rules of `svc` with `backends`, for one node, as
/// `iptables -t nat` arguments; chains named as kube-proxy names them, with the
/// Service's name in place of its hash.
pub fn kube_proxy_rules(svc: &BenchService, backends: &[Ipv4Addr], pod_cidr: &str) -> Vec<String> {
    let id = svc.name.to_uppercase().replace('-', "_");
    let (svc_chain, ext_chain) = (format!("KUBE-SVC-{id}"), format!("KUBE-EXT-{id}"));
    let sep = |i: usize| format!("KUBE-SEP-{id}-{i}");
    let mut rules: Vec<String> = Vec::new();
    let mut chains = vec![svc_chain.clone()];
    chains.extend((0..backends.len()).map(sep));
    if svc.node_port.is_some() {
        chains.push(ext_chain.clone());
    }
    for chain in &chains {
        rules.push(format!("-N {chain}"));
    }
    let (vip, port) = (svc.cluster_ip, svc.port);
    rules.push(format!(
        "-A KUBE-SERVICES -d {vip}/32 -p tcp -m tcp --dport {port} -j {svc_chain}"
    ));
    rules.push(format!(
        "-A {svc_chain} ! -s {pod_cidr} -d {vip}/32 -p tcp -m tcp --dport {port} -j KUBE-MARK-MASQ"
    ));
    if svc.affinity {
        for i in 0..backends.len() {
            rules.push(format!(
                "-A {svc_chain} -m recent --name {} --mask 255.255.255.255 --rsource --rcheck --seconds 10800 --reap -j {}",
                sep(i),
                sep(i)
            ));
        }
    }
    let n = backends.len();
    for (i, _) in backends.iter().enumerate() {
        if i + 1 < n {
            rules.push(format!(
                "-A {svc_chain} -m statistic --mode random --probability {:.11} -j {}",
                1.0 / (n - i) as f64,
                sep(i)
            ));
        } else {
            rules.push(format!("-A {svc_chain} -j {}", sep(i)));
        }
    }
    for (i, backend) in backends.iter().enumerate() {
        rules.push(format!("-A {} -s {backend}/32 -j KUBE-MARK-MASQ", sep(i)));
        let recent = if svc.affinity {
            format!(
                "-m recent --name {} --mask 255.255.255.255 --rsource --set ",
                sep(i)
            )
        } else {
            String::new()
        };
        rules.push(format!(
            "-A {} -p tcp {recent}-m tcp -j DNAT --to-destination {backend}:{}",
            sep(i),
            svc.target_port
        ));
    }
    if let Some(node_port) = svc.node_port {
        rules.push(format!(
            "-A KUBE-NODEPORTS -p tcp -m tcp --dport {node_port} -j {ext_chain}"
        ));
        rules.push(format!("-A {ext_chain} -j KUBE-MARK-MASQ"));
        rules.push(format!("-A {ext_chain} -j {svc_chain}"));
    }
    rules
}

/// The chains and jumps kube-proxy sets up once per node.
fn kube_proxy_base() -> Vec<&'static str> {
    vec![
        "-N KUBE-SERVICES",
        "-N KUBE-NODEPORTS",
        "-N KUBE-POSTROUTING",
        "-N KUBE-MARK-MASQ",
        "-A PREROUTING -j KUBE-SERVICES",
        "-A OUTPUT -j KUBE-SERVICES",
        "-A POSTROUTING -j KUBE-POSTROUTING",
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000",
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN",
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0",
        "-A KUBE-POSTROUTING -j MASQUERADE --random-fully",
    ]
}

/// Serves `svc` with `backends` (node index, pod index) on cluster `c`: manifests for
/// Switchyard (waiting until every node serves it), kube-proxy's rules for the kernel.
pub fn install(c: &Cluster, svc: &BenchService, backends: &[(usize, usize)]) -> Result<()> {
    let pods: Vec<(&Pod, String)> = backends
        .iter()
        .map(|(n, p)| (&c.nodes[*n].pods[*p], c.nodes[*n].name.clone()))
        .collect();
    match c.arm {
        Arm::Switchyard => {
            let mut spec = format!(
                "  type: {}\n  clusterIP: {}\n  ports:\n  - {{name: tcp, port: {}, targetPort: {}, protocol: TCP{}}}\n",
                if svc.node_port.is_some() { "NodePort" } else { "ClusterIP" },
                svc.cluster_ip,
                svc.port,
                svc.target_port,
                svc.node_port.map(|n| format!(", nodePort: {n}")).unwrap_or_default()
            );
            if svc.affinity {
                spec += "  sessionAffinity: ClientIP\n";
            }
            let endpoints: Vec<SliceEndpoint> = pods
                .iter()
                .map(|(pod, node)| SliceEndpoint {
                    address: IpAddr::V4(pod.ipv4),
                    node: node.clone(),
                    ready: true,
                    terminating: false,
                })
                .collect();
            let text = manifest(
                &svc.name,
                &spec,
                &[("tcp", svc.target_port, "TCP")],
                &endpoints,
            );
            write_manifest(c, &svc.name, &text)?;
            wait_served(c, &svc.name, endpoints.len(), Duration::from_secs(10))
        }
        Arm::Kernel => {
            let addrs: Vec<Ipv4Addr> = pods.iter().map(|(p, _)| p.ipv4).collect();
            let nodeports = "KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS";
            for node in &c.nodes {
                let ns = &node.ns;
                if nat(ns, "-S KUBE-SERVICES").is_err() {
                    // Replies between pods on one bridge must cross netfilter to be
                    // un-DNATed (kube-proxy requires br_netfilter for this).
                    ns.exec(&["sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1"])?;
                    for rule in kube_proxy_base() {
                        nat(ns, rule)?;
                    }
                }
                for rule in kube_proxy_rules(svc, &addrs, crate::cluster::CLUSTER_CIDR) {
                    nat(ns, &rule)?;
                }
                if svc.node_port.is_some() {
                    // Last in KUBE-SERVICES, as kube-proxy keeps it.
                    let _ = nat(ns, &format!("-D {nodeports}"));
                    nat(ns, &format!("-A {nodeports}"))?;
                }
            }
            Ok(())
        }
    }
}

/// Runs `iptables -t nat` with the words of `rule` in `ns`.
fn nat(ns: &Netns, rule: &str) -> Result<String> {
    let mut argv = vec!["iptables", "-t", "nat"];
    argv.extend(rule.split_whitespace());
    ns.exec(&argv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_rules_spread_evenly_and_remember_clients() {
        let svc = BenchService {
            name: "web".into(),
            cluster_ip: Ipv4Addr::new(10, 96, 0, 10),
            port: 80,
            target_port: 8080,
            node_port: Some(30080),
            affinity: true,
        };
        let backends = [
            Ipv4Addr::new(10, 244, 0, 3),
            Ipv4Addr::new(10, 244, 1, 2),
            Ipv4Addr::new(10, 244, 1, 3),
        ];
        let rules = kube_proxy_rules(&svc, &backends, "10.244.0.0/16");
        let has = |text: &str| rules.iter().any(|r| r == text);
        assert!(has(
            "-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-WEB"
        ));
        assert!(has("-A KUBE-SVC-WEB -m statistic --mode random --probability 0.33333333333 -j KUBE-SEP-WEB-0"));
        assert!(has("-A KUBE-SVC-WEB -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-WEB-1"));
        assert!(has("-A KUBE-SVC-WEB -j KUBE-SEP-WEB-2"));
        assert!(has("-A KUBE-SEP-WEB-1 -p tcp -m recent --name KUBE-SEP-WEB-1 --mask 255.255.255.255 --rsource --set -m tcp -j DNAT --to-destination 10.244.1.2:8080"));
        assert!(has(
            "-A KUBE-NODEPORTS -p tcp -m tcp --dport 30080 -j KUBE-EXT-WEB"
        ));
        assert_eq!(rules.iter().filter(|r| r.starts_with("-N ")).count(), 5);
    }

    #[test]
    fn manifests_list_each_family_with_its_endpoints() {
        let text = manifest(
            "web",
            "  clusterIP: 10.96.0.10\n  ports:\n  - {port: 80}\n",
            &[("tcp", 8080, "TCP")],
            &[SliceEndpoint {
                address: "10.244.0.5".parse().unwrap(),
                node: "node0".into(),
                ready: true,
                terminating: false,
            }],
        );
        assert!(text.contains("addressType: IPv4") && !text.contains("addressType: IPv6"));
        assert!(text.contains("nodeName: node0"));
        let empty = manifest(
            "none",
            "  ports:\n  - {port: 80}\n",
            &[("tcp", 8080, "TCP")],
            &[],
        );
        assert_eq!(
            empty.matches("kind: EndpointSlice").count(),
            2,
            "empty slices of both families"
        );
    }
}
