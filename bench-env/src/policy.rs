//! The NetworkPolicy testbed of Kubernetes' e2e tests, on a two-node Switchyard cluster:
//! namespaces x, y and z, each with pods a, b and c (labelled `pod: a` ..., namespaces
//! `ns: x` ...), spread over the two nodes, each serving TCP and UDP on ports 80 and 81
//! (named `serve-80-tcp`, `serve-81-tcp`, `serve-80-udp`, `serve-81-udp`). Namespaces and
//! Pods (with their addresses, as the kubelet reports them) and the NetworkPolicies are
//! written into the manifests directory every node's agent reads; a probe connects from
//! every pod to every other pod, all at once, and reports which pairs got through.

use crate::cluster::{Cluster, ClusterOptions};
use crate::listen::accept_within;
use crate::testbed::{Arm, Pod};
use crate::{fail, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use switchyard_dataplane::io::netns::run_in;

/// The namespaces.
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
/// The pods of each namespace.
pub const PODS: [&str; 3] = ["a", "b", "c"];
/// The ports every pod serves, TCP and UDP.
pub const PORTS: [u16; 2] = [80, 81];
/// How long a probe waits for an answer before it counts as blocked.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1000);

/// Where a pod of the world runs.
#[derive(Debug, Clone)]
pub struct WorldPod {
    /// `NAMESPACE/NAME`.
    pub name: String,
    /// Node index.
    pub node: usize,
    /// Pod index on that node.
    pub slot: usize,
}

/// The nine pods on two nodes, their servers, and the manifests describing them.
pub struct PolicyWorld {
    /// The pods, in `NAMESPACES` x `PODS` order.
    pub pods: Vec<WorldPod>,
    /// Extra labels of namespaces and pods (`NAMESPACE` or `NAMESPACE/NAME` ->
    /// `key: value` pairs), written with the world.
    pub labels: BTreeMap<String, Vec<(String, String)>>,
    servers: Vec<EchoServers>,
    /// The cluster (dropped last).
    pub cluster: Cluster,
}

impl PolicyWorld {
    /// Builds the cluster, attaches the pods, writes the world and starts the servers.
    pub fn build() -> Result<Self> {
        Self::build_with(Vec::new())
    }

    /// [`PolicyWorld::build`] with extra arguments for every node's dataplane
    /// (`--pod-ports afxdp`).
    pub fn build_with(dataplane_args: Vec<String>) -> Result<Self> {
        let cluster = Cluster::build(
            Arm::Switchyard,
            &ClusterOptions {
                pods_per_node: 5,
                dataplane_args,
                ..ClusterOptions::default()
            },
        )?;
        let mut pods = Vec::new();
        for (k, (ns, pod)) in NAMESPACES
            .iter()
            .flat_map(|ns| PODS.iter().map(move |p| (ns, p)))
            .enumerate()
        {
            pods.push(WorldPod {
                name: format!("{ns}/{pod}"),
                node: k % 2,
                slot: k / 2,
            });
        }
        let mut world = Self {
            pods,
            labels: BTreeMap::new(),
            servers: Vec::new(),
            cluster,
        };
        for p in &world.pods {
            let pod = world.pod(&p.name);
            world.servers.push(EchoServers::start(pod)?);
        }
        world.write_world()?;
        Ok(world)
    }

    /// The attached pod of `NAMESPACE/NAME`.
    pub fn pod(&self, name: &str) -> &Pod {
        let p = self
            .pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in the world"));
        &self.cluster.nodes[p.node].pods[p.slot]
    }

    /// Writes the Namespaces and Pods (with `labels`) into the manifests directory.
    pub fn write_world(&self) -> Result<()> {
        let extra = |key: &str| -> String {
            self.labels
                .get(key)
                .into_iter()
                .flatten()
                .map(|(k, v)| format!(", {k}: \"{v}\""))
                .collect()
        };
        let mut text = String::new();
        for ns in NAMESPACES {
            text += &format!(
                "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{ns: {ns}{}}}}}\n",
                extra(ns)
            );
        }
        for p in &self.pods {
            let pod = self.pod(&p.name);
            let (ns, name) = p.name.split_once('/').unwrap_or_default();
            text += &format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{pod: {name}{}}}}}\nspec:\n  nodeName: node{}\n  containers:\n  - name: agnhost\n    ports:\n    - {{name: serve-80-tcp, containerPort: 80, protocol: TCP}}\n    - {{name: serve-81-tcp, containerPort: 81, protocol: TCP}}\n    - {{name: serve-80-udp, containerPort: 80, protocol: UDP}}\n    - {{name: serve-81-udp, containerPort: 81, protocol: UDP}}\nstatus:\n  podIPs: [{{ip: \"{}\"}}, {{ip: \"{}\"}}]\n",
                extra(&p.name),
                p.node,
                pod.ipv4,
                pod.ipv6
            );
        }
        self.write("netpol-world.yaml", &text)
    }

    /// Replaces the NetworkPolicies with `yaml` (none when empty).
    pub fn set_policies(&self, yaml: &str) -> Result<()> {
        self.write("netpol-policies.yaml", yaml)
    }

    /// Writes `name` in the manifests directory at once (temporary file, rename).
    fn write(&self, name: &str, text: &str) -> Result<()> {
        let dir = &self.cluster.manifests;
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, dir.join(name))?;
        Ok(())
    }

    /// Probes every ordered pair of distinct pods on `port`/`protocol` (`TCP` or `UDP`),
    /// all at once; returns the pairs that did not get through, as `x/a->y/b`.
    pub fn blocked(&self, port: u16, protocol: &str) -> BTreeSet<String> {
        let udp = protocol.eq_ignore_ascii_case("udp");
        std::thread::scope(|scope| {
            let mut probes = Vec::new();
            for from in &self.pods {
                for to in &self.pods {
                    if from.name == to.name {
                        continue;
                    }
                    let (client, server) = (self.pod(&from.name), self.pod(&to.name));
                    let at = SocketAddr::from((server.ipv4, port));
                    let path = client.ns.path();
                    let pair = format!("{}->{}", from.name, to.name);
                    probes.push(scope.spawn(move || {
                        let ok = run_in(&path, || {
                            Ok(if udp { udp_probe(at) } else { tcp_probe(at) })
                        })
                        .unwrap_or(false);
                        (pair, ok)
                    }));
                }
            }
            probes
                .into_iter()
                .filter_map(|p| p.join().ok())
                .filter(|(_, ok)| !ok)
                .map(|(pair, _)| pair)
                .collect()
        })
    }
}

/// True when a TCP connection to `at` opens and echoes a byte.
fn tcp_probe(at: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&at, PROBE_TIMEOUT) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
    let mut byte = [0u8; 1];
    s.write_all(b"p").is_ok() && s.read_exact(&mut byte).is_ok()
}

/// True when a datagram to `at` is answered (three tries within the timeout).
fn udp_probe(at: SocketAddr) -> bool {
    let bind: SocketAddr = if at.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let Ok(s) = UdpSocket::bind(bind) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(PROBE_TIMEOUT / 3));
    let mut buf = [0u8; 16];
    (0..3).any(|_| s.send_to(b"p", at).is_ok() && s.recv_from(&mut buf).is_ok())
}

/// TCP and UDP echo servers on ports 80 and 81 of a pod (IPv4 and IPv6); every TCP
/// connection is echoed until the client closes it. Stop on drop.
pub struct EchoServers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl EchoServers {
    /// Starts them in `pod`.
    pub fn start(pod: &Pod) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for port in PORTS {
            for addr in [IpAddr::from(pod.ipv4), IpAddr::from(pod.ipv6)] {
                let at = SocketAddr::from((addr, port));
                let (tcp, udp) = run_in(&pod.ns.path(), || {
                    let tcp = TcpListener::bind(at)?;
                    tcp.set_nonblocking(true)?;
                    let udp = UdpSocket::bind(at)?;
                    udp.set_read_timeout(Some(Duration::from_millis(50)))?;
                    Ok((tcp, udp))
                })
                .map_err(|e| fail!("echo server on {at}: {e}"))?;
                let stop_t = stop.clone();
                threads.push(std::thread::spawn(move || {
                    while !stop_t.load(Ordering::Relaxed) {
                        if let Some((s, _)) = accept_within(&tcp, Duration::from_millis(50)) {
                            let stop_c = stop_t.clone();
                            std::thread::spawn(move || echo(s, &stop_c));
                        }
                    }
                }));
                let stop_u = stop.clone();
                threads.push(std::thread::spawn(move || {
                    let mut buf = [0u8; 2048];
                    while !stop_u.load(Ordering::Relaxed) {
                        if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                            let _ = udp.send_to(&buf[..n], peer);
                        }
                    }
                }));
            }
        }
        Ok(Self { stop, threads })
    }
}

/// Echoes `s` until it closes or the servers stop.
fn echo(mut s: TcpStream, stop: &AtomicBool) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

impl Drop for EchoServers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
