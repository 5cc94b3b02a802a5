//! Services on a two-node cluster, as Kubernetes' e2e tests exercise them: ClusterIPs
//! (IPv4 and IPv6) reached from pods on either node and from the node itself, the backend
//! seeing the client pod's address, hairpin, refusal without endpoints, ClientIP affinity,
//! internalTrafficPolicy Local, and UDP following endpoint changes. Service and
//! EndpointSlice manifests are written into the cluster's manifests directory, which every
//! node's agent reads. They need root.

use bench_env::cluster::{Cluster, ClusterOptions};
use bench_env::testbed::{Arm, Pod};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use switchyard_api::{Reply, Request};
use switchyard_dataplane::io::netns::run_in;

fn cluster() -> Cluster {
    cluster_with(false)
}

/// Two nodes with two pods each; `external`: with a host outside the cluster behind the
/// nodes' router.
fn cluster_with(external: bool) -> Cluster {
    cluster_of(external, Vec::new())
}

/// [`cluster_with`], with extra arguments for every node's dataplane.
fn cluster_of(external: bool, dataplane_args: Vec<String>) -> Cluster {
    bench_env::require_root("Services integration test");
    Cluster::build(
        Arm::Switchyard,
        &ClusterOptions {
            pods_per_node: 2,
            external,
            dataplane_args,
            ..ClusterOptions::default()
        },
    )
    .expect("cluster")
}

/// An endpoint of a slice: the pod, the node it runs on, and its conditions.
struct Ep<'a> {
    pod: &'a Pod,
    node: &'a str,
    ready: bool,
    terminating: bool,
}

fn ep<'a>(pod: &'a Pod, node: &'a str) -> Ep<'a> {
    Ep {
        pod,
        node,
        ready: true,
        terminating: false,
    }
}

/// Writes Service `name` (port 80 to 8080, TCP and UDP) with `extra` spec lines, and its
/// IPv4 and IPv6 EndpointSlices.
fn publish(c: &Cluster, name: &str, vips: (&str, &str), extra: &str, endpoints: &[Ep]) {
    let spec = format!(
        "  type: ClusterIP\n  clusterIPs: [\"{}\", \"{}\"]\n  ipFamilies: [IPv4, IPv6]\n  ports:\n  - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP}}\n  - {{name: udp, port: 80, targetPort: 8080, protocol: UDP}}\n{extra}",
        vips.0, vips.1
    );
    write_service(c, name, &spec, endpoints);
}

/// Writes NodePort Service `name` (cluster IP allocated, TCP port 80 to 8080 on node port
/// `node_port`) with `extra` spec lines, and its EndpointSlices.
fn publish_node_port(c: &Cluster, name: &str, node_port: u16, extra: &str, endpoints: &[Ep]) {
    let spec = format!(
        "  type: NodePort\n  ports:\n  - {{name: tcp, port: 80, targetPort: 8080, protocol: TCP, nodePort: {node_port}}}\n  - {{name: udp, port: 80, targetPort: 8080, protocol: UDP}}\n{extra}"
    );
    write_service(c, name, &spec, endpoints);
}

/// Writes a Service of `spec` lines and its IPv4 and IPv6 EndpointSlices (ports `tcp` and
/// `udp`, 8080) into the manifests directory, at once.
fn write_service(c: &Cluster, name: &str, spec: &str, endpoints: &[Ep]) {
    let mut text = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n{spec}"
    );
    for (family, v6) in [("IPv4", false), ("IPv6", true)] {
        text += &format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {name}-{}\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\naddressType: {family}\nports:\n- {{name: tcp, port: 8080, protocol: TCP}}\n- {{name: udp, port: 8080, protocol: UDP}}\nendpoints:\n",
            family.to_lowercase()
        );
        for e in endpoints {
            let addr = if v6 {
                e.pod.ipv6.to_string()
            } else {
                e.pod.ipv4.to_string()
            };
            text += &format!(
                "- addresses: [\"{addr}\"]\n  nodeName: {}\n  conditions: {{ready: {}, serving: true, terminating: {}}}\n",
                e.node, e.ready, e.terminating
            );
        }
    }
    let tmp = c.manifests.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, c.manifests.join(format!("svc-{name}.yaml"))).unwrap();
}

/// Waits until every node's dataplane serves `name` with exactly the endpoints of `pods`
/// (both families) on each port.
fn wait_served(c: &Cluster, name: &str, pods: &[&Pod]) {
    let mut want: Vec<IpAddr> = pods
        .iter()
        .flat_map(|p| [IpAddr::from(p.ipv4), IpAddr::from(p.ipv6)])
        .collect();
    want.sort();
    let deadline = Instant::now() + Duration::from_secs(5);
    for node in &c.nodes {
        loop {
            let served = match node.client().unwrap().call(Request::ListServices).unwrap() {
                Reply::Services(list) => list.iter().any(|s| {
                    s.spec.name == name
                        && s.spec.ports.iter().all(|p| {
                            let mut got: Vec<IpAddr> =
                                p.endpoints.iter().map(|e| e.address).collect();
                            got.sort();
                            got == want
                        })
                }),
                other => panic!("{other:?}"),
            };
            if served {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name} not served by {}",
                node.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// TCP and UDP servers on port 8080 of a pod (both families) that answer every
/// connection or datagram with `<pod name> <client address>`. Stop on drop.
struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Servers {
    fn start(pod: &Pod, name: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for addr in [
            SocketAddr::from((pod.ipv4, 8080)),
            SocketAddr::from((pod.ipv6, 8080)),
        ] {
            let (tcp, udp) = run_in(&pod.ns.path(), || {
                let tcp = TcpListener::bind(addr)?;
                tcp.set_nonblocking(true)?;
                let udp = UdpSocket::bind(addr)?;
                udp.set_read_timeout(Some(Duration::from_millis(50)))?;
                Ok((tcp, udp))
            })
            .unwrap();
            let (stop_t, name_t) = (stop.clone(), name.to_string());
            threads.push(std::thread::spawn(move || {
                while !stop_t.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((mut s, peer)) => {
                            let _ = s.write_all(format!("{name_t} {}\n", peer.ip()).as_bytes());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            }));
            let (stop_u, name_u) = (stop.clone(), name.to_string());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while !stop_u.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(format!("{name_u} {}\n", peer.ip()).as_bytes(), peer);
                    }
                }
            }));
        }
        Self { stop, threads }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Connects from `ns` (a pod's or a node's namespace) to `vip:80` over TCP; returns the
/// answer (`<backend> <client seen>`) or the error.
fn ask(ns: &bench_env::netns::Netns, vip: IpAddr) -> std::io::Result<(String, IpAddr)> {
    ask_at(ns, (vip, 80).into())
}

/// [`ask`] at any address and port.
fn ask_at(ns: &bench_env::netns::Netns, at: SocketAddr) -> std::io::Result<(String, IpAddr)> {
    run_in(&ns.path(), || {
        let mut s = TcpStream::connect_timeout(&at, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let mut words = text.split_whitespace();
        let backend = words.next().unwrap_or_default().to_string();
        let seen = words
            .next()
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("odd answer {text:?}")))?;
        Ok((backend, seen))
    })
}

const WEB: (&str, &str) = ("10.96.0.10", "fd00:96::10");

fn ips(vips: (&str, &str)) -> [IpAddr; 2] {
    [vips.0.parse().unwrap(), vips.1.parse().unwrap()]
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn cluster_ips_reach_backends_on_both_nodes_which_see_the_client_pod() {
    cluster_ips_reach_backends(&cluster());
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces, veth pairs and AF_XDP sockets"
)]
fn cluster_ips_reach_backends_on_afxdp_pod_ports() {
    cluster_ips_reach_backends(&cluster_of(
        false,
        vec!["--pod-ports".into(), "afxdp".into()],
    ));
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces, XDP programs and AF_XDP sockets"
)]
fn cluster_ips_reach_backends_across_an_afxdp_uplink() {
    cluster_ips_reach_backends(&cluster_of(
        false,
        vec!["--uplink-mode".into(), "afxdp".into()],
    ));
}

/// ClusterIPs of both families reach backends on both nodes of `c`, which see the client
/// pod's address.
fn cluster_ips_reach_backends(c: &Cluster) {
    let (client, local, remote) = (
        &c.nodes[0].pods[0],
        &c.nodes[0].pods[1],
        &c.nodes[1].pods[0],
    );
    let _a = Servers::start(local, "local");
    let _b = Servers::start(remote, "remote");
    publish(
        c,
        "web",
        WEB,
        "",
        &[ep(local, "node0"), ep(remote, "node1")],
    );
    wait_served(c, "web", &[local, remote]);
    for vip in ips(WEB) {
        let client_ip: IpAddr = if vip.is_ipv4() {
            client.ipv4.into()
        } else {
            client.ipv6.into()
        };
        let mut answered_by = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let (backend, seen) = ask(&client.ns, vip).expect("connect through the ClusterIP");
            assert_eq!(
                seen, client_ip,
                "the backend sees the client pod, not a node"
            );
            answered_by.insert(backend);
        }
        assert_eq!(
            answered_by.len(),
            2,
            "{vip}: both backends serve: {answered_by:?}"
        );
        // From the other node's pod too.
        let (_, seen) = ask(&c.nodes[1].pods[1].ns, vip).expect("from the other node");
        assert!(seen != client_ip);
    }
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn the_node_itself_reaches_cluster_ips() {
    let c = cluster();
    let backend = &c.nodes[1].pods[0];
    let _s = Servers::start(backend, "remote");
    publish(&c, "web", WEB, "", &[ep(backend, "node1")]);
    wait_served(&c, "web", &[backend]);
    for vip in ips(WEB) {
        let (name, _) = ask(&c.nodes[0].ns, vip).expect("the node reaches the ClusterIP");
        assert_eq!(name, "remote");
    }
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn a_pod_reaches_itself_through_its_service() {
    let c = cluster();
    let pod = &c.nodes[0].pods[0];
    let _s = Servers::start(pod, "self");
    publish(
        &c,
        "own",
        ("10.96.0.12", "fd00:96::12"),
        "",
        &[ep(pod, "node0")],
    );
    wait_served(&c, "own", &[pod]);
    for vip in ips(("10.96.0.12", "fd00:96::12")) {
        let (name, seen) = ask(&pod.ns, vip).expect("hairpin through the ClusterIP");
        assert_eq!(name, "self");
        assert_eq!(seen, vip, "the pod sees its Service as the client");
    }
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn a_service_without_endpoints_refuses_at_once() {
    let c = cluster();
    publish(&c, "empty", ("10.96.0.11", "fd00:96::11"), "", &[]);
    wait_served(&c, "empty", &[]);
    for vip in ips(("10.96.0.11", "fd00:96::11")) {
        let started = Instant::now();
        let err = ask(&c.nodes[0].pods[0].ns, vip).expect_err("nothing serves it");
        assert_eq!(
            err.kind(),
            std::io::ErrorKind::ConnectionRefused,
            "{vip}: {err}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused, not timed out"
        );
    }
    let drops = c.nodes[0].client().unwrap().stats().unwrap().drops;
    assert!(drops["service_no_endpoints"] >= 2);
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn client_ip_affinity_sends_every_connection_to_one_backend() {
    let c = cluster();
    let (a, b) = (&c.nodes[0].pods[1], &c.nodes[1].pods[0]);
    let _a = Servers::start(a, "a");
    let _b = Servers::start(b, "b");
    let affinity =
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n";
    publish(
        &c,
        "sticky",
        ("10.96.0.13", "fd00:96::13"),
        affinity,
        &[ep(a, "node0"), ep(b, "node1")],
    );
    wait_served(&c, "sticky", &[a, b]);
    for vip in ips(("10.96.0.13", "fd00:96::13")) {
        let answers: Vec<String> = (0..15)
            .map(|_| ask(&c.nodes[0].pods[0].ns, vip).expect("connect").0)
            .collect();
        assert!(
            answers.iter().all(|a| *a == answers[0]),
            "{vip}: {answers:?}"
        );
    }
    // The flows, as `get conntrack --service` lists them: one backend for all.
    let (ok, text) = c.nodes[0]
        .control(&[
            "get",
            "conntrack",
            "--service",
            "default/sticky",
            "-o",
            "json",
        ])
        .unwrap();
    assert!(ok, "{text}");
    let flows: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(flows.len() >= 15, "{text}");
    let v4: Vec<&str> = flows
        .iter()
        .filter_map(|f| f["backend"].as_str())
        .filter(|b| !b.starts_with('['))
        .collect();
    assert!(v4.iter().all(|b| *b == v4[0]), "{v4:?}");
    assert!(flows.iter().all(|f| f["service"]["name"] == "sticky"));
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn internal_traffic_policy_local_keeps_pods_on_their_node() {
    let c = cluster();
    let (here, there) = (&c.nodes[0].pods[1], &c.nodes[1].pods[1]);
    let _a = Servers::start(here, "node0");
    let _b = Servers::start(there, "node1");
    let local = "  internalTrafficPolicy: Local\n";
    publish(
        &c,
        "local",
        ("10.96.0.14", "fd00:96::14"),
        local,
        &[ep(here, "node0"), ep(there, "node1")],
    );
    wait_served(&c, "local", &[here, there]);
    for vip in ips(("10.96.0.14", "fd00:96::14")) {
        for _ in 0..10 {
            assert_eq!(ask(&c.nodes[0].pods[0].ns, vip).unwrap().0, "node0");
            assert_eq!(ask(&c.nodes[1].pods[0].ns, vip).unwrap().0, "node1");
        }
    }
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn a_udp_sender_follows_endpoint_changes_and_terminating_endpoints_serve_when_none_is_ready() {
    let c = cluster();
    let (a, b) = (&c.nodes[0].pods[1], &c.nodes[1].pods[0]);
    let _a = Servers::start(a, "a");
    let _b = Servers::start(b, "b");
    publish(
        &c,
        "dns",
        ("10.96.0.15", "fd00:96::15"),
        "",
        &[ep(a, "node0")],
    );
    wait_served(&c, "dns", &[a]);
    let client = &c.nodes[0].pods[0];
    let socket = run_in(&client.ns.path(), || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(s)
    })
    .unwrap();
    let vip: IpAddr = "10.96.0.15".parse().unwrap();
    let ask_udp = || -> Option<String> {
        socket.send_to(b"?", (vip, 80)).ok()?;
        let mut buf = [0u8; 64];
        let (n, _) = socket.recv_from(&mut buf).ok()?;
        String::from_utf8_lossy(&buf[..n])
            .split_whitespace()
            .next()
            .map(String::from)
    };
    assert_eq!(ask_udp().as_deref(), Some("a"));
    // The endpoint goes (its pod replaced by b): the same socket is answered by b, without
    // waiting for the flow to time out.
    publish(
        &c,
        "dns",
        ("10.96.0.15", "fd00:96::15"),
        "",
        &[ep(b, "node1")],
    );
    wait_served(&c, "dns", &[b]);
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut last = None;
    while Instant::now() < deadline {
        last = ask_udp();
        if last.as_deref() == Some("b") {
            break;
        }
    }
    assert_eq!(
        last.as_deref(),
        Some("b"),
        "the sender moved to the new endpoint"
    );
    // Only a terminating endpoint that still serves, and a not-ready one: the terminating
    // one is used (KEP-1669), the not-ready one never.
    let going = Ep {
        ready: false,
        terminating: true,
        ..ep(a, "node0")
    };
    let not_ready = Ep {
        ready: false,
        terminating: false,
        ..ep(b, "node1")
    };
    publish(
        &c,
        "dns",
        ("10.96.0.15", "fd00:96::15"),
        "",
        &[going, not_ready],
    );
    wait_served(&c, "dns", &[a]);
    for _ in 0..5 {
        assert_eq!(ask(&client.ns, vip).unwrap().0, "a");
    }
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn node_ports_answer_outside_clients_pods_and_the_node_on_every_node() {
    node_ports_answer_everyone(&cluster_with(true));
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces, XDP programs and AF_XDP sockets"
)]
fn node_ports_answer_outside_clients_through_an_afxdp_uplink() {
    // The uplink's program takes the outside client's connections to the node port, and
    // their answers leave through its AF_XDP sockets: the nodes' kernels forward none of
    // them but the first answers to the client while the kernel resolves its address (on a
    // busy host, up to a whole connection's). Through the node's stack, every connection
    // would be at least four forwarded packets: forty for ten (81 when measured so).
    let c = cluster_of(true, vec!["--uplink-mode".into(), "afxdp".into()]);
    let forwarded = |i: usize| c.nodes[i].ns.ipv4_forwarded().unwrap();
    let before = [forwarded(0), forwarded(1)];
    let _server = node_ports_answer_everyone(&c);
    let ext = c.external.as_ref().unwrap();
    for node in &c.nodes {
        for _ in 1..10 {
            let at = SocketAddr::from((node.ipv4, 30080));
            assert_eq!(ask_at(&ext.ns, at).expect("from outside").0, "remote");
        }
    }
    for (i, before) in before.into_iter().enumerate() {
        let n = forwarded(i) - before;
        assert!(
            n <= 10,
            "node {i}'s kernel forwarded {n} packets of ten connections from outside"
        );
    }
}

/// A node port on every node of `c` (with an external host) answers a client outside the
/// cluster (seen as the node: `externalTrafficPolicy: Cluster`), a pod (seen as itself)
/// and the node itself, from a backend on the second node; returns the backend's server.
fn node_ports_answer_everyone(c: &Cluster) -> Servers {
    let backend = &c.nodes[1].pods[0];
    let server = Servers::start(backend, "remote");
    publish_node_port(c, "np", 30080, "", &[ep(backend, "node1")]);
    wait_served(c, "np", &[backend]);
    let ext = c.external.as_ref().unwrap();
    for node in &c.nodes {
        let at = SocketAddr::from((node.ipv4, 30080));
        let (name, seen) = ask_at(&ext.ns, at).expect("from outside the cluster");
        assert_eq!(name, "remote");
        assert_eq!(
            seen,
            IpAddr::from(node.ipv4),
            "externalTrafficPolicy Cluster: the node"
        );
        let pod = &c.nodes[0].pods[0];
        let (_, seen) = ask_at(&pod.ns, at).expect("from a pod");
        assert_eq!(seen, IpAddr::from(pod.ipv4), "a pod keeps its address");
        let (name, _) = ask_at(&node.ns, at).expect("from the node itself");
        assert_eq!(name, "remote");
    }
    server
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn external_traffic_policy_local_keeps_the_client_and_needs_a_local_endpoint() {
    let c = cluster_with(true);
    let backend = &c.nodes[1].pods[0];
    let _s = Servers::start(backend, "remote");
    publish_node_port(
        &c,
        "np-local",
        30081,
        "  externalTrafficPolicy: Local\n",
        &[ep(backend, "node1")],
    );
    wait_served(&c, "np-local", &[backend]);
    let ext = c.external.as_ref().unwrap();
    let (name, seen) =
        ask_at(&ext.ns, SocketAddr::from((c.nodes[1].ipv4, 30081))).expect("the endpoint's node");
    assert_eq!(name, "remote");
    assert_eq!(seen, IpAddr::from(ext.ipv4), "the client's own address");
    let elsewhere = ask_at(&ext.ns, SocketAddr::from((c.nodes[0].ipv4, 30081)));
    assert!(
        elsewhere.is_err(),
        "a node without a local endpoint serves nothing"
    );
    let drops = c.nodes[0].client().unwrap().stats().unwrap().drops;
    assert!(drops["service_no_local_endpoint"] >= 1);
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn a_backends_icmp_error_reaches_the_client_as_its_services() {
    let c = cluster();
    // Nothing listens on this pod: its kernel answers UDP with port unreachable, TCP with
    // a reset.
    let quiet = &c.nodes[1].pods[1];
    publish(
        &c,
        "quiet",
        ("10.96.0.16", "fd00:96::16"),
        "",
        &[ep(quiet, "node1")],
    );
    wait_served(&c, "quiet", &[quiet]);
    let client = &c.nodes[0].pods[0];
    for vip in ips(("10.96.0.16", "fd00:96::16")) {
        let refused = run_in(&client.ns.path(), || {
            let s = UdpSocket::bind(if vip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.connect((vip, 80))?;
            s.send(b"?")?;
            let mut buf = [0u8; 16];
            Ok(s.recv(&mut buf).map(|_| ()))
        })
        .unwrap();
        assert_eq!(
            refused.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionRefused),
            "{vip}: the UDP client learns at once that nothing listens"
        );
        let tcp = ask(&client.ns, vip).map(|_| ()).map_err(|e| e.kind());
        assert_eq!(tcp, Err(std::io::ErrorKind::ConnectionRefused), "{vip}");
    }
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn an_established_connection_outlives_its_endpoints_removal() {
    let c = cluster();
    let (a, b) = (&c.nodes[1].pods[0], &c.nodes[1].pods[1]);
    let vip: IpAddr = "10.96.0.17".parse().unwrap();
    // An echo server on a's port 8080, reached through the Service.
    let listener = run_in(&a.ns.path(), || {
        TcpListener::bind(SocketAddr::from((a.ipv4, 8080)))
    })
    .unwrap();
    let echo = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || s.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    publish(
        &c,
        "moving",
        ("10.96.0.17", "fd00:96::17"),
        "",
        &[ep(a, "node1")],
    );
    wait_served(&c, "moving", &[a]);
    let mut conn = run_in(&c.nodes[0].pods[0].ns.path(), || {
        let s = TcpStream::connect_timeout(&(vip, 80).into(), Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        Ok(s)
    })
    .expect("connect through the ClusterIP");
    let mut roundtrip = |text: &[u8]| {
        conn.write_all(text).unwrap();
        let mut back = vec![0u8; text.len()];
        conn.read_exact(&mut back).map(|()| back)
    };
    assert_eq!(roundtrip(b"before").unwrap(), b"before");
    // a leaves the Service (its pod is going away): the open TCP connection carries on.
    publish(
        &c,
        "moving",
        ("10.96.0.17", "fd00:96::17"),
        "",
        &[ep(b, "node1")],
    );
    wait_served(&c, "moving", &[b]);
    assert_eq!(
        roundtrip(b"after").expect("the established connection still works"),
        b"after"
    );
    drop(conn);
    echo.join().unwrap();
}
