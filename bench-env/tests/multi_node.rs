//! Integration tests across nodes: simulated nodes in network namespaces, each with a
//! Switchyard dataplane and a `switchyard-control run` agent over one manifests
//! directory, pods attached through the CNI plugin. They need root; under `CI=true` they
//! always run (never skip).

use bench_env::cluster::{self, Cluster, ClusterOptions, Underlay};
use bench_env::measure;
use bench_env::testbed::Arm;
use bench_env::transfer::tcp_transfer;
use std::net::IpAddr;
use std::time::{Duration, Instant};
use switchyard_api::BackendKind;

fn cluster(options: ClusterOptions) -> Cluster {
    bench_env::require_root("multi-node integration test");
    Cluster::build(Arm::Switchyard, &options).expect("cluster")
}

fn assert_matrix(backend: BackendKind, underlay: Underlay) {
    let c = cluster(ClusterOptions {
        backend,
        underlay,
        pods_per_node: 2,
        ..ClusterOptions::default()
    });
    let m = cluster::assert_connected(&c, &format!("{backend:?} over {underlay:?}"));
    // 4 pods x 3 others x 2 families + 4 pods x 1 remote node x 2 + 2 nodes x 2 remote pods x 2.
    assert_eq!(m.attempted, 24 + 8 + 8);
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn matrix_vxlan_one_segment() {
    assert_matrix(BackendKind::Vxlan, Underlay::Flat);
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn matrix_ipip_one_segment() {
    assert_matrix(BackendKind::Ipip, Underlay::Flat);
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn matrix_direct_one_segment() {
    assert_matrix(BackendKind::Direct, Underlay::Flat);
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn matrix_vxlan_two_subnets_behind_a_router() {
    assert_matrix(BackendKind::Vxlan, Underlay::Routed);
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn matrix_ipip_two_subnets_behind_a_router() {
    assert_matrix(BackendKind::Ipip, Underlay::Routed);
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn direct_routing_refuses_peers_that_are_not_on_link() {
    bench_env::require_root("multi-node integration test");
    let options = ClusterOptions {
        backend: BackendKind::Direct,
        underlay: Underlay::Routed,
        pods_per_node: 0,
        ..ClusterOptions::default()
    };
    let Err(err) = Cluster::build(Arm::Switchyard, &options) else {
        panic!("direct routing between subnets was accepted");
    };
    let text = err.to_string();
    assert!(
        text.contains("is not on-link") && text.contains("use backend vxlan or ipip"),
        "the refusal does not say why and what to do: {text}"
    );
}

fn counter(c: &Cluster, node: usize, name: &str) -> u64 {
    let stats = c.nodes[node].client().unwrap().stats().unwrap();
    stats
        .counters
        .get(name)
        .or_else(|| stats.drops.get(name))
        .copied()
        .unwrap_or(0)
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn pmtu_pod_mtu_wrongly_1500_on_vxlan_still_moves_100_mb() {
    let c = cluster(ClusterOptions {
        backend: BackendKind::Vxlan,
        pod_mtu: Some(1500),
        ..ClusterOptions::default()
    });
    let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
    let mtu = a.ns.exec(&["cat", "/sys/class/net/eth0/mtu"]).unwrap();
    assert_eq!(
        mtu.trim(),
        "1500",
        "the test needs a pod MTU larger than the path"
    );
    let t = tcp_transfer(a, b, 100 << 20).unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert_eq!(t.received, 100 << 20);
    assert_eq!(t.sent_hash, t.received_hash, "payload corrupted in transit");
    assert!(
        counter(&c, 0, "too_big") > 0 && counter(&c, 0, "icmp_errors_sent") > 0,
        "the transfer should have been told the path MTU"
    );
    // And the other way, IPv6 has no fragmentation by routers at all.
    let out =
        b.ns.exec(&[
            "ping",
            "-6",
            "-c",
            "2",
            "-M",
            "do",
            "-s",
            "1452",
            &a.ipv6.to_string(),
        ])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        out.is_empty() || out.contains("mtu") || out.contains("too long"),
        "an oversized IPv6 ping should be refused with a packet-too-big, got: {out}"
    );
}

/// Pings `target` from `from` until it answers; returns how long that took.
fn time_to_answer(from: &bench_env::netns::Netns, target: IpAddr, limit: Duration) -> Duration {
    let start = Instant::now();
    while start.elapsed() < limit {
        if from
            .exec(&["ping", "-c", "1", "-W", "0.2", "-q", &target.to_string()])
            .is_ok()
        {
            return start.elapsed();
        }
    }
    panic!("{target} did not answer within {limit:?}");
}

/// `sysctl -n net.bridge.bridge-nf-call-iptables` in `ns`; `None` without br_netfilter.
fn bridge_calls_iptables(ns: &bench_env::netns::Netns) -> Option<String> {
    ns.exec(&["sysctl", "-n", "net.bridge.bridge-nf-call-iptables"])
        .ok()
        .map(|v| v.trim().to_string())
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn the_underlay_switch_hands_no_frame_to_netfilter() {
    bench_env::require_root("underlay test");
    let c = Cluster::build(Arm::Kernel, &ClusterOptions::default()).expect("cluster");
    let fresh = bench_env::netns::Netns::create(&format!("sybrnf{}", std::process::id()))
        .expect("namespace");
    match bridge_calls_iptables(&fresh) {
        // A kernel with br_netfilter: new namespaces start with the calls on.
        Some(default) => {
            assert_eq!(default, "1", "a new namespace's default");
            assert_eq!(bridge_calls_iptables(&c.hub).as_deref(), Some("0"));
        }
        None => assert_eq!(bridge_calls_iptables(&c.hub), None),
    }
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn a_third_node_joins_and_restarts_recover_within_a_second() {
    let mut c = cluster(ClusterOptions::default());
    // A third node: its dataplane and agent run, then its Node object appears.
    c.start_node(2).unwrap();
    let written = Instant::now();
    c.write_node_manifest(2).unwrap();
    for i in 0..3 {
        c.wait_for_peers(i, 2, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let tables_updated = written.elapsed();
    assert!(
        tables_updated < Duration::from_secs(1),
        "every node had the third node's routes only after {tables_updated:?}"
    );
    c.add_pod(2, 0).unwrap();
    let target = IpAddr::V4(c.nodes[2].pods[0].ipv4);
    time_to_answer(&c.nodes[0].pods[0].ns, target, Duration::from_secs(2));

    // A dataplane restart: pods keep their interfaces and connectivity comes back.
    let target = IpAddr::V4(c.nodes[1].pods[0].ipv4);
    c.restart_dataplane(1).unwrap();
    let back = time_to_answer(&c.nodes[0].pods[0].ns, target, Duration::from_secs(5));
    assert!(
        back < Duration::from_secs(1),
        "connectivity came back {back:?} after the dataplane restart\n{}",
        c.logs()
    );
    let v6 = IpAddr::V6(c.nodes[1].pods[0].ipv6);
    time_to_answer(&c.nodes[0].pods[0].ns, v6, Duration::from_secs(1));

    // A control process restart changes nothing the dataplane forwards.
    c.restart_control(0).unwrap();
    let back = time_to_answer(&c.nodes[0].pods[0].ns, target, Duration::from_secs(5));
    assert!(
        back < Duration::from_secs(1),
        "{back:?} after a control restart"
    );
    assert!(measure::ping(
        &c.nodes[2].pods[0].ns,
        IpAddr::V6(c.nodes[0].pods[0].ipv6)
    ));
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn bad_manifests_are_reported_and_the_last_good_tables_stay() {
    let c = cluster(ClusterOptions::default());
    let dir = &c.manifests;
    let target = IpAddr::V4(c.nodes[1].pods[0].ipv4);
    let cases: [(&str, &str, &str); 4] = [
        ("broken.yaml", "kind: Node\nmetadata: [unclosed\n", "broken.yaml"),
        (
            "outside.yaml",
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: stray\nspec:\n  podCIDR: 10.99.0.0/24\nstatus:\n  addresses:\n  - {type: InternalIP, address: 192.168.1.99}\n",
            "spec.podCIDR",
        ),
        (
            "overlap.yaml",
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: twin\nspec:\n  podCIDR: 10.244.0.0/25\nstatus:\n  addresses:\n  - {type: InternalIP, address: 192.168.1.98}\n",
            "overlap",
        ),
        (
            "switchyard-config.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: switchyard-config\ndata:\n  config.yaml: |\n    clusterCIDR: 10.244.0.0/16\n    backend: {type: gre}\n",
            "backend",
        ),
    ];
    let good_config = std::fs::read_to_string(dir.join("switchyard-config.yaml")).unwrap();
    for (file, text, expect) in cases {
        std::fs::write(dir.join(file), text).unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        let log = |n: usize| std::fs::read_to_string(&c.nodes[n].control_log).unwrap_or_default();
        while !(log(0).contains(file) && log(0).contains(expect)) {
            assert!(
                Instant::now() < deadline,
                "{file}: no report naming the file and {expect:?}:\n{}",
                log(0)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            log(0).contains("keeping the last good settings"),
            "{}",
            log(0)
        );
        assert!(
            measure::ping(&c.nodes[0].pods[0].ns, target),
            "{file}: connectivity lost with bad manifests"
        );
        let spec = c.nodes[0].client().unwrap().node().unwrap().spec.unwrap();
        assert_eq!(spec.peers.len(), 1, "{file}: tables changed");
        assert_eq!(spec.backend.kind, BackendKind::Vxlan);
        if file == "switchyard-config.yaml" {
            std::fs::write(dir.join(file), &good_config).unwrap();
        } else {
            std::fs::remove_file(dir.join(file)).unwrap();
        }
    }
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn cli_lists_nodes_peers_routes_pods_and_checks_the_matrix() {
    let c = cluster(ClusterOptions::default());
    let run = |args: &[&str]| c.nodes[0].control(args).unwrap();
    let (ok, nodes) = run(&["get", "nodes", "-o", "wide"]);
    assert!(
        ok && nodes.contains("node0") && nodes.contains("node1"),
        "{nodes}"
    );
    assert!(
        nodes.contains("10.244.1.0/24") && nodes.contains("fd00:1::b"),
        "{nodes}"
    );
    let (ok, peers) = run(&["get", "peers"]);
    assert!(
        ok && peers.contains("vxlan") && peers.contains("192.168.1.11"),
        "{peers}"
    );
    let (ok, routes) = run(&["get", "routes", "-o", "wide"]);
    assert!(
        ok && routes.contains("peer node1 (192.168.1.11)"),
        "{routes}"
    );
    let (ok, pods) = run(&["get", "pods", "-o", "wide"]);
    let pod = &c.nodes[0].pods[0];
    assert!(
        ok && pods.contains(&pod.ipv4.to_string()) && pods.contains(pod.ns.name()),
        "{pods}"
    );
    assert!(
        pods.lines().nth(1).is_some_and(|l| l.contains("node0")),
        "{pods}"
    );
    let (ok, json) = run(&["get", "pods", "-o", "json"]);
    let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(ok && parsed[0]["node"] == "node0", "{json}");
    let peer_api = c.nodes[1].api.to_string_lossy().into_owned();
    let (ok, table) = run(&["check", "--peer-api", &peer_api]);
    assert!(ok, "check failed:\n{table}\n{}", c.logs());
    // To the pod on node1 and to both nodes, IPv4 and IPv6.
    assert!(table.contains("6/6 passed"), "{table}");
}

/// Checks every VXLAN packet in `frames` (captured with their virtio-net header): the inner
/// IPv4 header checksum and the inner TCP, UDP and ICMP checksums of every segment. Returns
/// (segments verified per inner protocol, problems).
fn verify_vxlan_checksums(
    frames: &[Vec<u8>],
) -> (std::collections::BTreeMap<String, usize>, Vec<String>) {
    use bench_env::rawsock::CAPTURE_VNET_LEN;
    use switchyard_dataplane::wire::checksum::{accumulate, checksum, finish, pseudo_header_of};
    let mut seen = std::collections::BTreeMap::new();
    let mut bad = Vec::new();
    for f in frames {
        let (vnet, eth) = f.split_at(CAPTURE_VNET_LEN.min(f.len()));
        if eth.len() < 14 + 20 + 8 || eth[12..14] != [0x08, 0x00] || eth[14 + 9] != 17 {
            continue;
        }
        let ihl = usize::from(eth[14] & 0x0f) * 4;
        let udp = &eth[14 + ihl..];
        if udp.len() < 8 || udp[2..4] != 4789u16.to_be_bytes() {
            continue;
        }
        let payload = &udp[8..];
        let gso_size = usize::from(u16::from_le_bytes([vnet[4], vnet[5]]));
        let step = if vnet[1] == 5 && gso_size > 0 {
            gso_size
        } else {
            payload.len()
        };
        for datagram in payload.chunks(step) {
            if datagram.len() < 8 + 14 + 20 || datagram[0] & 0x08 == 0 {
                bad.push(format!(
                    "not VXLAN: {:02x?}",
                    &datagram[..datagram.len().min(16)]
                ));
                continue;
            }
            let l3 = &datagram[8 + 14..];
            let (v6, header, proto) = match l3[0] >> 4 {
                4 => (false, usize::from(l3[0] & 0x0f) * 4, l3[9]),
                _ => (true, 40, l3[6]),
            };
            if !v6 && checksum(&l3[..header]) != 0 {
                bad.push("inner IPv4 header checksum".into());
            }
            let l4 = &l3[header..];
            let sum = match proto {
                1 => checksum(l4),
                6 | 17 | 58 => finish(accumulate(pseudo_header_of(l3, proto, l4.len() as u32), l4)),
                _ => continue,
            };
            let name = format!("{}/{proto}", if v6 { "ipv6" } else { "ipv4" });
            if sum != 0 {
                bad.push(format!("{name} checksum wrong ({} bytes)", l4.len()));
            }
            *seen.entry(name).or_insert(0) += 1;
        }
    }
    (seen, bad)
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn every_vxlan_packet_on_the_wire_has_right_checksums() {
    let c = cluster(ClusterOptions::default());
    let hub = c.hub.path();
    let capture = std::thread::spawn(move || {
        bench_env::rawsock::capture(&hub, "n0", Duration::from_secs(3)).unwrap()
    });
    std::thread::sleep(Duration::from_millis(300));
    let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
    let t = tcp_transfer(a, b, 20 << 20).unwrap();
    assert_eq!(t.sent_hash, t.received_hash);
    for v6 in [false, true] {
        let burst = bench_env::transfer::udp_burst(a, b, v6, 300, 600).unwrap();
        assert_eq!(burst.damaged, 0);
    }
    assert!(measure::ping(&a.ns, IpAddr::V4(b.ipv4)));
    assert!(measure::ping(&b.ns, IpAddr::V6(a.ipv6)));
    let frames = capture.join().unwrap();
    let (seen, bad) = verify_vxlan_checksums(&frames);
    assert!(
        bad.is_empty(),
        "{} bad packets, first: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
    for kind in ["ipv4/6", "ipv4/17", "ipv4/1", "ipv6/17", "ipv6/58"] {
        assert!(
            seen.get(kind).copied().unwrap_or(0) > 0,
            "no {kind} seen: {seen:?}"
        );
    }
    // The capture socket may miss frames under load; what it saw must all be right.
    assert!(seen["ipv4/6"] > 1_000, "{seen:?}");
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn the_backend_changes_live_and_stale_routes_go() {
    let mut c = cluster(ClusterOptions::default());
    for backend in [BackendKind::Ipip, BackendKind::Direct, BackendKind::Vxlan] {
        c.set_backend(backend).unwrap();
        let start = Instant::now();
        while c.nodes.iter().any(|n| {
            n.client()
                .unwrap()
                .node()
                .unwrap()
                .spec
                .unwrap()
                .backend
                .kind
                != backend
        }) {
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "{backend:?} not applied"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
        for target in [IpAddr::V4(b.ipv4), IpAddr::V6(b.ipv6)] {
            assert!(
                measure::ping(&a.ns, target),
                "{backend:?}: {target}\n{}",
                c.logs()
            );
        }
        assert!(
            measure::ping(&c.nodes[1].ns, IpAddr::V4(a.ipv4)),
            "{backend:?}: node1 -> pod"
        );
        let routes = c.nodes[0].ns.exec(&["ip", "route"]).unwrap();
        let direct_route = routes.contains("10.244.1.0/24 via 192.168.1.11");
        assert_eq!(
            direct_route,
            backend == BackendKind::Direct,
            "{backend:?}: {routes}"
        );
    }
}

/// A socket bound to `addr`:`port` in `ns` (a socket stays in the namespace it was made in).
fn udp_in(ns: &bench_env::netns::Netns, addr: IpAddr, port: u16) -> std::net::UdpSocket {
    switchyard_dataplane::io::netns::run_in(&ns.path(), || std::net::UdpSocket::bind((addr, port)))
        .expect("UDP socket in the pod")
}

/// Sends `payload` from `from` to `to` (UDP port `port`) in one send, cut into datagrams of
/// `gso` bytes by the pod's kernel (`UDP_SEGMENT`) or, without, as one datagram that the
/// kernel fragments past the MTU; returns the datagrams `to` received, up to the number
/// sent (three tries).
fn udp_one_send(
    from: &bench_env::testbed::Pod,
    to: &bench_env::testbed::Pod,
    v6: bool,
    port: u16,
    gso: Option<u16>,
    payload: &[u8],
) -> Vec<Vec<u8>> {
    let addr = |p: &bench_env::testbed::Pod| -> IpAddr {
        if v6 {
            p.ipv6.into()
        } else {
            p.ipv4.into()
        }
    };
    let rx = udp_in(&to.ns, addr(to), port);
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let tx = udp_in(&from.ns, addr(from), 0);
    if let Some(size) = gso {
        nix::sys::socket::setsockopt(
            &tx,
            nix::sys::socket::sockopt::UdpGsoSegment,
            &i32::from(size),
        )
        .unwrap();
    }
    let expected = gso.map_or(1, |size| payload.len().div_ceil(usize::from(size)));
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65_536];
    for _ in 0..3 {
        tx.send_to(payload, (addr(to), port)).unwrap();
        while got.len() < expected {
            match rx.recv(&mut buf) {
                Ok(n) => got.push(buf[..n].to_vec()),
                Err(_) => break,
            }
        }
        if got.len() == expected {
            break;
        }
    }
    got
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn udp_gso_and_fragmented_datagrams_reach_a_pod_on_another_node() {
    // An application that sends with UDP_SEGMENT (QUIC stacks do) hands the pod's kernel
    // one buffer of several datagrams: they arrive as datagrams on the other node. A
    // datagram larger than the MTU leaves its pod in fragments: it arrives whole.
    let afxdp = || vec!["--uplink-mode".to_string(), "afxdp".to_string()];
    for (backend, dataplane_args) in [
        (BackendKind::Vxlan, Vec::new()),
        (BackendKind::Ipip, Vec::new()),
        (BackendKind::Direct, Vec::new()),
        (BackendKind::Vxlan, afxdp()),
        (BackendKind::Direct, afxdp()),
    ] {
        let backend_args = format!("{backend:?} {dataplane_args:?}");
        let c = cluster(ClusterOptions {
            backend,
            dataplane_args,
            ..ClusterOptions::default()
        });
        let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
        let payload: Vec<u8> = (0..4_000u32).map(|i| (i % 251) as u8).collect();
        let mut port = 9_000;
        for v6 in [false, true] {
            for gso in [Some(1_000), None] {
                port += 1;
                let got = udp_one_send(a, b, v6, port, gso, &payload);
                let what = format!("{backend_args}, IPv6 {v6}, GSO {gso:?}");
                let expected = if gso.is_some() { 4 } else { 1 };
                assert_eq!(got.len(), expected, "{what}: datagrams\n{}", c.logs());
                assert_eq!(got.concat(), payload, "{what}: in order, intact");
            }
        }
    }
}
