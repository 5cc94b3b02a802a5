//! Pods on AF_XDP ports (`--pod-ports afxdp`, `podPorts` in the CNI configuration): a veth
//! pair per pod whose node end the dataplane reads and writes through AF_XDP sockets. The
//! scenarios TAP ports pass, on these ports, and what they leave on the node. They need
//! root; under `CI=true` they always run.

use bench_env::cluster::{self, Cluster, ClusterOptions};
use bench_env::measure;
use bench_env::netns::Netns;
use bench_env::testbed::{Arm, Options, Testbed};
use bench_env::transfer::{tcp_transfer, udp_burst};
use std::net::IpAddr;
use std::time::Duration;
use switchyard_api::{AddPort, PodPorts, Reply, Request};

fn afxdp_args() -> Vec<String> {
    vec!["--pod-ports".into(), "afxdp".into()]
}

fn testbed(pods: usize) -> Testbed {
    bench_env::require_root("AF_XDP port test");
    Testbed::build(
        Arm::Switchyard,
        &Options {
            pods,
            dataplane_args: afxdp_args(),
            ..Options::default()
        },
    )
    .expect("testbed")
}

/// The node's veth ends (`syx…`) and whether each carries an XDP program.
fn node_ends(node: &Netns) -> Vec<(String, bool)> {
    let text = node.exec(&["ip", "-d", "-o", "link", "show"]).unwrap();
    text.lines()
        .filter_map(|line| {
            let name = line.split(": ").nth(1)?.split('@').next()?;
            name.starts_with("syx")
                .then(|| (name.to_string(), line.contains("prog/xdp")))
        })
        .collect()
}

/// A pod namespace `<prefix>-tap` with a TAP port (whatever the dataplane's default).
fn add_tap_pod(bed: &Testbed, ip: &str, ip6: &str) -> bench_env::testbed::Pod {
    let ns = Netns::create(&format!("{}-tap", bench_env::testbed::unique_prefix())).unwrap();
    let reply = bed
        .client()
        .unwrap()
        .call(Request::AddPort(AddPort {
            netns: ns.path().to_string_lossy().into_owned(),
            ifname: "eth0".into(),
            ips: vec![
                format!("{ip}/24").parse().unwrap(),
                format!("{ip6}/64").parse().unwrap(),
            ],
            mtu: Some(1500),
            mac: None,
            owner: None,
            pod: None,
            port_mappings: Vec::new(),
            kind: Some(PodPorts::Tap),
        }))
        .unwrap();
    let Reply::Port(port) = reply else {
        panic!("{reply:?}")
    };
    assert_eq!(port.kind, "tap");
    bench_env::testbed::Pod {
        ns,
        ipv4: ip.parse().unwrap(),
        ipv6: ip6.parse().unwrap(),
        port: Some(port.id),
    }
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces, veth pairs and AF_XDP sockets"
)]
fn afxdp_pods_ping_move_data_intact_and_talk_to_tap_pods() {
    let bed = testbed(2);
    let ports = bed.client().unwrap().ports().unwrap();
    assert!(
        ports.iter().all(|p| p.kind == "afxdp"),
        "{:?}",
        ports.iter().map(|p| &p.kind).collect::<Vec<_>>()
    );
    let ends = node_ends(&bed.node);
    assert_eq!(ends.len(), 2, "one node end per pod: {ends:?}");
    assert!(
        ends.iter().all(|(_, xdp)| *xdp),
        "programs on both: {ends:?}"
    );
    let m = measure::connectivity(&bed.pods);
    assert!(
        m.failures.is_empty(),
        "pings failed: {:?}\n{}",
        m.failures,
        bed.dataplane_log()
    );
    assert_eq!(m.attempted, 4, "IPv4 and IPv6 both ways");
    let t = tcp_transfer(&bed.pods[0], &bed.pods[1], 100 << 20).expect("transfer");
    assert_eq!(t.received, 100 << 20);
    assert_eq!(t.sent_hash, t.received_hash, "payload corrupted in transit");
    let u = udp_burst(&bed.pods[0], &bed.pods[1], false, 1000, 200).unwrap();
    assert_eq!(u.damaged, 0, "{u:?}");
    assert!(u.intact > 900, "{u:?}");
    // A TAP pod beside them: its TSO super-frames are segmented into the AF_XDP port,
    // its partial checksums finished.
    let tap = add_tap_pod(&bed, "10.244.0.50", "fd00:244::50");
    for target in [IpAddr::V4(tap.ipv4), IpAddr::V6(tap.ipv6)] {
        assert!(
            measure::ping(&bed.pods[0].ns, target),
            "afxdp -> tap {target}"
        );
    }
    for target in [IpAddr::V4(bed.pods[1].ipv4), IpAddr::V6(bed.pods[1].ipv6)] {
        assert!(measure::ping(&tap.ns, target), "tap -> afxdp {target}");
    }
    for (from, to) in [(&tap, &bed.pods[1]), (&bed.pods[0], &tap)] {
        let t = tcp_transfer(from, to, 50 << 20).expect("transfer");
        assert_eq!(t.received, 50 << 20);
        assert_eq!(t.sent_hash, t.received_hash, "payload corrupted in transit");
    }
    // A sent frame is the socket's until the pod's stack has taken it; when that work is
    // deferred (a busy machine), a segmented super-frame can find every sending frame in
    // flight and is dropped as a full queue would drop it. Rare, and never most of it.
    let stats = bed.client().unwrap().stats().unwrap();
    for p in &stats.ports {
        assert!(
            p.tx_errors * 100 <= p.tx_frames,
            "port {}: {} failed sends of {}\n{}",
            p.id,
            p.tx_errors,
            p.tx_frames,
            bed.dataplane_log()
        );
    }
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces, veth pairs and AF_XDP sockets"
)]
fn removing_an_afxdp_port_or_stopping_the_dataplane_leaves_no_program_behind() {
    let mut bed = testbed(2);
    assert_eq!(node_ends(&bed.node).len(), 2);
    let id = bed.pods[0].port.unwrap();
    bed.client()
        .unwrap()
        .call(Request::DelPort(switchyard_api::PortSelector::Id { id }))
        .unwrap();
    let ends = node_ends(&bed.node);
    assert_eq!(ends.len(), 1, "the removed pod's pair is gone: {ends:?}");
    let pod_links = bed.pods[0].ns.exec(&["ip", "-o", "link", "show"]).unwrap();
    assert!(!pod_links.contains("eth0"), "{pod_links}");
    // A stop: the remaining pod keeps its interface, and no program stays on it.
    let pid = nix::unistd::Pid::from_raw(bed.dataplane_pid().unwrap() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while bed.dataplane_running() {
        assert!(
            std::time::Instant::now() < deadline,
            "the dataplane did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let ends = node_ends(&bed.node);
    assert_eq!(ends.len(), 1, "{ends:?}");
    assert!(!ends[0].1, "the program left with the dataplane: {ends:?}");
    let pod_links = bed.pods[1].ns.exec(&["ip", "-o", "link", "show"]).unwrap();
    assert!(pod_links.contains("eth0"), "{pod_links}");
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces, veth pairs and AF_XDP sockets"
)]
fn afxdp_pods_across_nodes_reach_the_external_network_a_host_port_and_survive_a_restart() {
    bench_env::require_root("AF_XDP port test");
    let mut c = Cluster::build(
        Arm::Switchyard,
        &ClusterOptions {
            external: true,
            dataplane_args: afxdp_args(),
            ..ClusterOptions::default()
        },
    )
    .expect("cluster");
    let kinds: Vec<String> = c.nodes[0]
        .client()
        .unwrap()
        .ports()
        .unwrap()
        .into_iter()
        .map(|p| p.kind)
        .collect();
    assert!(kinds.iter().any(|k| k == "afxdp"), "{kinds:?}");
    cluster::assert_connected(&c, "AF_XDP pods across nodes");
    let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
    let t = tcp_transfer(a, b, 50 << 20).unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert_eq!(t.sent_hash, t.received_hash, "corrupted across nodes");
    let ext = c.external.as_ref().unwrap();
    let t = tcp_transfer(a, ext, 20 << 20).unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert_eq!(t.sent_hash, t.received_hash, "corrupted through masquerade");
    assert_eq!(t.peer.ip(), IpAddr::V4(c.nodes[0].ipv4), "masqueraded");
    // A published port on the first node reaches an AF_XDP pod.
    c.check_host_port_from_outside(0, 8080)
        .unwrap_or_else(|e| panic!("{e}"));
    // A restarted dataplane re-attaches the pods' pairs.
    c.restart_dataplane(0).unwrap();
    c.wait_for_peers(0, 1, Duration::from_secs(20)).unwrap();
    let mut back = c.nodes[0].client().unwrap().ports().unwrap();
    back.retain(|p| !p.netns.is_empty()); // the node's own ports
    assert_eq!(back.len(), c.nodes[0].pods.len(), "{back:?}");
    assert!(back.iter().all(|p| p.kind == "afxdp"), "{back:?}");
    cluster::assert_connected(&c, "after the restart");
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces, veth pairs and AF_XDP sockets"
)]
fn afxdp_pods_with_a_3000_byte_mtu_carry_full_size_frames() {
    bench_env::require_root("AF_XDP port test");
    // Above 1778 bytes a frame no longer fits a 2 KiB UMEM frame: 4 KiB frames.
    let bed = Testbed::build(
        Arm::Switchyard,
        &Options {
            pods: 2,
            mtus: vec![3000],
            dataplane_args: afxdp_args(),
            ..Options::default()
        },
    )
    .expect("testbed");
    let target = bed.pods[1].ipv4.to_string();
    bed.pods[0]
        .ns
        .exec(&[
            "ping", "-c", "3", "-W", "2", "-M", "do", "-s", "2972", &target,
        ])
        .unwrap_or_else(|e| panic!("full-size frames: {e}\n{}", bed.dataplane_log()));
    let t = tcp_transfer(&bed.pods[0], &bed.pods[1], 20 << 20).expect("transfer");
    assert_eq!(t.sent_hash, t.received_hash, "payload corrupted in transit");
}
