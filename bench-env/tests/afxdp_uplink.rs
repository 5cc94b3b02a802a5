//! The uplink on AF_XDP (`--uplink-mode afxdp`): VXLAN (or directly routed packets)
//! between nodes through AF_XDP sockets on each node's underlay device, behind a program
//! that takes only that and what comes back to the node for the dataplane (masquerade
//! replies, connections to published ports, ICMP); masqueraded flows and published ports
//! leave through the same sockets, so the node's stack forwards none of them; the node's
//! own traffic stays the kernel's. Namespace tests; they need root and run in CI.

use bench_env::cluster::{self, Cluster, ClusterOptions};
use bench_env::netns::Netns;
use bench_env::testbed::Arm;
use bench_env::transfer::tcp_transfer;
use std::net::IpAddr;
use std::time::Duration;

fn afxdp_uplink() -> Vec<String> {
    vec!["--uplink-mode".into(), "afxdp".into()]
}

/// The name of the XDP program on the node's underlay device, if any.
fn uplink_program(node: &Netns) -> Option<String> {
    let shown = node.exec(&["ip", "-d", "link", "show", "eth0"]).unwrap();
    shown
        .contains("prog/xdp")
        .then(|| shown.split_whitespace().skip_while(|w| *w != "name").nth(1))
        .flatten()
        .map(str::to_string)
}

fn counter(c: &Cluster, node: usize, name: &str) -> u64 {
    let stats = c.nodes[node].client().unwrap().stats().unwrap();
    stats.counters.get(name).copied().unwrap_or(0)
}

/// Two nodes of two pods on `backend` with the uplink on AF_XDP and an external network;
/// every node's underlay device runs `program`.
fn external_cluster(backend: switchyard_api::BackendKind, program: &str) -> Cluster {
    let c = Cluster::build(
        Arm::Switchyard,
        &ClusterOptions {
            pods_per_node: 2,
            backend,
            external: true,
            dataplane_args: afxdp_uplink(),
            ..ClusterOptions::default()
        },
    )
    .expect("cluster");
    for node in &c.nodes {
        assert_eq!(
            uplink_program(&node.ns).as_deref(),
            Some(program),
            "{}: the filter on the underlay device",
            node.name
        );
    }
    c
}

/// Frames node `node`'s AF_XDP sockets sent and received so far.
fn afxdp_frames(c: &Cluster, node: usize) -> (u64, u64) {
    (
        counter(c, node, "uplink_afxdp_tx_frames"),
        counter(c, node, "uplink_afxdp_rx_frames"),
    )
}

/// Runs `f` (traffic between node `i`'s pods and the external host) and checks that node
/// `i`'s AF_XDP sockets sent at least `sent` and received at least `received` frames
/// meanwhile, and its kernel forwarded none of it (at most 2 packets: the first of a flow
/// whose next hop the kernel was still resolving).
fn through_the_exit<T>(
    c: &mut Cluster,
    i: usize,
    sent: u64,
    received: u64,
    f: impl FnOnce(&mut Cluster) -> T,
) -> T {
    let (forwarded, frames) = (c.nodes[i].ns.ipv4_forwarded().unwrap(), afxdp_frames(c, i));
    let out = f(c);
    let forwarded = c.nodes[i].ns.ipv4_forwarded().unwrap() - forwarded;
    let (tx, rx) = afxdp_frames(c, i);
    let (tx, rx) = (tx - frames.0, rx - frames.1);
    assert!(
        tx >= sent && rx >= received,
        "node {i}'s AF_XDP sockets sent {tx} and received {rx} frames, not at least {sent} and {received}"
    );
    assert!(
        forwarded <= 2,
        "node {i}'s kernel forwarded {forwarded} packets of it"
    );
    out
}

/// `bytes` from node 0's first pod to node 1's and from node 1's second pod to node 0's
/// at once, each checked intact.
fn transfer_both_ways(c: &Cluster, bytes: u64) {
    let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[0]);
    let (c0, c1) = (&c.nodes[0].pods[1], &c.nodes[1].pods[1]);
    std::thread::scope(|s| {
        let there = s.spawn(|| tcp_transfer(a, b, bytes));
        let back = tcp_transfer(c1, c0, bytes).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.sent_hash, back.received_hash, "corrupted node 1 -> 0");
        let there = there.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            there.sent_hash, there.received_hash,
            "corrupted node 0 -> 1"
        );
    });
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces, XDP programs and AF_XDP sockets"
)]
fn the_afxdp_uplink_carries_pods_across_nodes_beside_egress_and_goes_with_its_dataplane() {
    bench_env::require_root("AF_XDP uplink test");
    let mut c = external_cluster(switchyard_api::BackendKind::Vxlan, "sy_xsk_vxlan");
    cluster::assert_connected(&c, "AF_XDP uplink");
    // Bulk data across nodes, intact, and carried by the AF_XDP sockets both ways.
    let before: Vec<(u64, u64)> = (0..2).map(|i| afxdp_frames(&c, i)).collect();
    let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[1]);
    let t = tcp_transfer(a, b, 50 << 20).unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert_eq!(t.sent_hash, t.received_hash, "corrupted across nodes");
    let (sent, received) = (
        afxdp_frames(&c, 0).0 - before[0].0,
        afxdp_frames(&c, 1).1 - before[1].1,
    );
    // 50 MB in frames of at most 1,400 bytes of payload.
    assert!(
        sent > 35_000 && received > 35_000,
        "the AF_XDP sockets carried {sent} frames out of node 0 and {received} into node 1"
    );
    // Masquerade to the external network leaves and comes back through the AF_XDP
    // sockets (20 MB in segments of at most 1,448 bytes), not through the node's stack.
    let t = through_the_exit(&mut c, 0, 14_000, 500, |c| {
        tcp_transfer(&c.nodes[0].pods[0], c.external.as_ref().unwrap(), 20 << 20)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert_eq!(t.sent_hash, t.received_hash, "corrupted through masquerade");
    assert_eq!(t.peer.ip(), IpAddr::V4(c.nodes[0].ipv4), "masqueraded");
    // A published port (hostPort) on the node's address, reached from outside: both
    // ways through the AF_XDP sockets too.
    through_the_exit(&mut c, 0, 3, 3, |c| c.check_host_port_from_outside(0, 8080))
        .unwrap_or_else(|e| panic!("{e}"));
    let (a, b) = (&c.nodes[0].pods[0], &c.nodes[1].pods[1]);
    // The node's own traffic on the device stays the kernel's: the nodes' pings.
    let other = c.nodes[1].ipv4.to_string();
    c.nodes[0]
        .ns
        .exec(&["ping", "-c", "2", "-W", "1", &other])
        .unwrap_or_else(|e| panic!("node to node: {e}"));
    // The next hop is the kernel's to resolve: with its neighbour table flushed, the
    // kernel resolves it again (the dataplane marks the entry in use) and frames go back
    // to the AF_XDP socket, the UDP sockets carrying them meanwhile.
    c.nodes[0]
        .ns
        .exec(&["ip", "neigh", "flush", "dev", "eth0"])
        .unwrap();
    let resolved = || {
        let shown = c.nodes[0]
            .ns
            .exec(&["ip", "neigh", "show", "dev", "eth0"])
            .unwrap();
        shown
            .lines()
            .any(|l| l.starts_with(&format!("{other} ")) && l.contains("lladdr"))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !resolved() {
        assert!(
            bench_env::measure::ping(&a.ns, b.ipv4.into()),
            "no ping after the flush"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the kernel did not resolve the peer again after its neighbour table was flushed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(2 * switchyard_dataplane::io::next_hops::REFRESH);
    let sent = counter(&c, 0, "uplink_afxdp_tx_frames");
    assert!(bench_env::measure::ping(&a.ns, b.ipv4.into()));
    assert!(
        counter(&c, 0, "uplink_afxdp_tx_frames") > sent,
        "the AF_XDP socket carries frames again once the kernel resolved the next hop"
    );
    // The gateway toward the external network went with the flush too: a masqueraded
    // connection still gets through (its first packets through the node's stack, whose
    // kernel resolves the gateway again, asked by the dataplane), and the next leaves
    // through the AF_XDP sockets again (1 MB in segments of at most 1,448 bytes).
    let to_external = |c: &mut Cluster| {
        let t = tcp_transfer(&c.nodes[0].pods[0], c.external.as_ref().unwrap(), 1 << 20)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(t.sent_hash, t.received_hash, "corrupted through masquerade");
    };
    to_external(&mut c);
    std::thread::sleep(2 * switchyard_dataplane::io::next_hops::REFRESH);
    through_the_exit(&mut c, 0, 700, 20, to_external);
    // A restart attaches again; a stop leaves nothing on the device.
    c.restart_dataplane(0).unwrap();
    c.wait_for_peers(0, 1, Duration::from_secs(20)).unwrap();
    assert_eq!(
        uplink_program(&c.nodes[0].ns).as_deref(),
        Some("sy_xsk_vxlan")
    );
    cluster::assert_connected(&c, "after a restart");
    c.stop_dataplane(0, nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    assert_eq!(uplink_program(&c.nodes[0].ns), None, "left after a stop");
    c.restart_dataplane(0).unwrap();
    c.stop_dataplane(0, nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    assert_eq!(uplink_program(&c.nodes[0].ns), None, "left after a crash");
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces, XDP programs and AF_XDP sockets"
)]
fn a_node_on_the_sockets_uplink_and_one_on_afxdp_carry_each_others_pods() {
    // As during a rollout that changes the uplink mode node by node: node 0 sends through
    // its UDP sockets, whose kernel leaves the outer checksum partial on a virtual link,
    // and node 1's AF_XDP sockets take those datagrams (the inner checksums vouch for them).
    bench_env::require_root("AF_XDP uplink test");
    let mut c = external_cluster(switchyard_api::BackendKind::Vxlan, "sy_xsk_vxlan");
    c.set_dataplane_args(Vec::new());
    c.restart_dataplane(0).unwrap();
    c.wait_for_peers(0, 1, Duration::from_secs(20)).unwrap();
    assert_eq!(
        uplink_program(&c.nodes[0].ns),
        None,
        "node 0 on the sockets"
    );
    cluster::assert_connected(&c, "a sockets node beside an AF_XDP node");
    let received = afxdp_frames(&c, 1).1;
    transfer_both_ways(&c, 20 << 20);
    let received = afxdp_frames(&c, 1).1 - received;
    // 20 MB from node 0 in datagrams of at most 1,400 bytes of payload.
    assert!(
        received > 14_000,
        "node 1's AF_XDP sockets received {received} frames"
    );
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces, XDP programs and AF_XDP sockets"
)]
fn pods_on_afxdp_ports_cross_an_afxdp_uplink_intact_and_leave_through_the_kernel_if_asked() {
    bench_env::require_root("AF_XDP uplink test");
    let mut args = afxdp_uplink();
    args.extend(["--pod-ports", "afxdp", "--node-exit", "kernel"].map(String::from));
    let c = Cluster::build(
        Arm::Switchyard,
        &ClusterOptions {
            pods_per_node: 2,
            external: true,
            dataplane_args: args,
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
        .filter(|p| !p.netns.is_empty())
        .map(|p| p.kind)
        .collect();
    assert!(kinds.iter().all(|k| k == "afxdp"), "{kinds:?}");
    cluster::assert_connected(&c, "AF_XDP pods over an AF_XDP uplink");
    // Both ways at once: every frame crosses two AF_XDP rings on each node.
    transfer_both_ways(&c, 30 << 20);
    assert!(counter(&c, 1, "uplink_afxdp_rx_frames") > 20_000);
    assert!(counter(&c, 1, "uplink_afxdp_tx_frames") > 20_000);
    // With `--node-exit kernel`, masquerade goes through the node's stack both ways (1 MB
    // is at least 16 packets of 64 KiB, and their answers), not through the AF_XDP
    // sockets.
    let ns = &c.nodes[0].ns;
    let (forwarded, frames) = (ns.ipv4_forwarded().unwrap(), afxdp_frames(&c, 0));
    let t = tcp_transfer(&c.nodes[0].pods[0], c.external.as_ref().unwrap(), 1 << 20)
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert_eq!(t.sent_hash, t.received_hash, "corrupted through masquerade");
    assert_eq!(t.peer.ip(), IpAddr::V4(c.nodes[0].ipv4), "masqueraded");
    let forwarded = ns.ipv4_forwarded().unwrap() - forwarded;
    assert!(
        forwarded >= 32,
        "the node's kernel forwarded {forwarded} packets"
    );
    assert_eq!(
        afxdp_frames(&c, 0),
        frames,
        "the AF_XDP sockets carried some"
    );
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces, XDP programs and AF_XDP sockets"
)]
fn direct_routing_on_the_afxdp_uplink_carries_ipv4_pods_itself_and_ipv6_through_the_kernel() {
    bench_env::require_root("AF_XDP uplink test");
    let mut c = external_cluster(switchyard_api::BackendKind::Direct, "sy_xsk_pods");
    // Every pair, both families (IPv6 between nodes stays with the nodes' kernels).
    cluster::assert_connected(&c, "direct routing on an AF_XDP uplink");
    // Both ways at once, intact, every IPv4 packet through the AF_XDP sockets.
    let before: Vec<(u64, u64)> = (0..2).map(|i| afxdp_frames(&c, i)).collect();
    transfer_both_ways(&c, 30 << 20);
    for (i, (tx, rx)) in before.iter().enumerate() {
        let (sent, received) = (afxdp_frames(&c, i).0 - tx, afxdp_frames(&c, i).1 - rx);
        // 30 MB each way in packets of at most 1,448 bytes of payload.
        assert!(
            sent > 20_000 && received > 20_000,
            "node {i}: the AF_XDP sockets carried {sent} packets out and {received} in"
        );
    }
    // Masquerade to the external network and a published port through the AF_XDP
    // sockets as well; the node's own traffic stays the kernel's: a node reaching a pod on
    // the other node (through its kernel route to that node; the other node's program
    // hands the packet to its dataplane).
    let t = through_the_exit(&mut c, 0, 7_000, 300, |c| {
        tcp_transfer(&c.nodes[0].pods[0], c.external.as_ref().unwrap(), 10 << 20)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let b = &c.nodes[1].pods[0];
    assert_eq!(t.sent_hash, t.received_hash, "corrupted through masquerade");
    assert_eq!(t.peer.ip(), IpAddr::V4(c.nodes[0].ipv4), "masqueraded");
    c.nodes[0]
        .ns
        .exec(&["ping", "-c", "2", "-W", "1", &b.ipv4.to_string()])
        .unwrap_or_else(|e| panic!("node 0 to a pod on node 1: {e}"));
    through_the_exit(&mut c, 1, 3, 3, |c| c.check_host_port_from_outside(1, 8080))
        .unwrap_or_else(|e| panic!("{e}"));
    // A live change to VXLAN and back: each uplink's program replaces the last one's.
    for (backend, program) in [
        (switchyard_api::BackendKind::Vxlan, "sy_xsk_vxlan"),
        (switchyard_api::BackendKind::Direct, "sy_xsk_pods"),
    ] {
        c.set_backend(backend).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while c.nodes.iter().any(|n| {
            n.client()
                .unwrap()
                .node()
                .unwrap()
                .spec
                .map(|s| s.backend.kind)
                != Some(backend)
                || uplink_program(&n.ns).as_deref() != Some(program)
        }) {
            assert!(
                std::time::Instant::now() < deadline,
                "{backend:?} not applied with {program}\n{}",
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        cluster::assert_connected(&c, &format!("after the change to {backend:?}"));
    }
    c.stop_dataplane(0, nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    assert_eq!(uplink_program(&c.nodes[0].ns), None, "left after a stop");
}
