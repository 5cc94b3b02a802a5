//! Integration tests of egress: pods reach a network outside the cluster that
//! their nodes reach by a static route, masqueraded to the node's address by Switchyard's
//! own connection tracking. They need root; under `CI=true` they always run.

use bench_env::cluster::{Cluster, ClusterOptions};
use bench_env::measure;
use bench_env::testbed::Arm;
use bench_env::transfer::{tcp_transfer, udp_burst, EchoFlow};
use std::net::IpAddr;

fn cluster_with(options: ClusterOptions) -> Cluster {
    bench_env::require_root("egress integration test");
    Cluster::build(Arm::Switchyard, &options).expect("cluster")
}

fn cluster() -> Cluster {
    cluster_with(ClusterOptions {
        external: true,
        ..ClusterOptions::default()
    })
}

fn stat(c: &Cluster, node: usize, name: &str) -> u64 {
    let s = c.nodes[node].client().unwrap().stats().unwrap();
    s.counters
        .get(name)
        .or_else(|| s.drops.get(name))
        .copied()
        .unwrap_or(0)
}

/// Masquerade's state on node `node`.
fn nat(c: &Cluster, node: usize) -> switchyard_api::NatStatus {
    match c.nodes[node]
        .client()
        .unwrap()
        .call(switchyard_api::Request::GetNat)
        .unwrap()
    {
        switchyard_api::Reply::Nat(Some(n)) => n,
        other => panic!("{other:?}"),
    }
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn pods_reach_the_external_network_as_their_node() {
    let c = cluster();
    let ext = c.external.as_ref().unwrap();
    for node in &c.nodes {
        let pod = &node.pods[0];
        assert!(
            measure::ping(&pod.ns, IpAddr::V4(ext.ipv4)),
            "{}: no ping to the external host\n{}",
            node.name,
            c.logs()
        );
        let t = tcp_transfer(pod, ext, 20 << 20).unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
        assert_eq!(t.sent_hash, t.received_hash, "payload corrupted");
        assert_eq!(
            t.peer.ip(),
            IpAddr::V4(node.ipv4),
            "the external host must see the node"
        );
        let u = udp_burst(pod, ext, false, 500, 200).unwrap();
        assert_eq!(u.damaged, 0);
        assert!(u.intact > 400, "{u:?}");
        assert!(
            u.sources.iter().all(|s| s.ip() == IpAddr::V4(node.ipv4)),
            "UDP sources seen: {:?}",
            u.sources
        );
    }
    assert!(stat(&c, 0, "masqueraded") > 0 && stat(&c, 0, "unmasqueraded") > 0);
    // The flows are listed, per pod and protocol.
    let mut client = c.nodes[0].client().unwrap();
    let pod = c.nodes[0].pods[0].ipv4;
    let reply = client
        .call(switchyard_api::Request::ListConntrack {
            pod: Some(pod),
            protocol: Some("icmp".into()),
        })
        .unwrap();
    let switchyard_api::Reply::Conntrack(flows) = reply else {
        panic!("{reply:?}")
    };
    assert!(!flows.is_empty() && flows.iter().all(|f| f.pod == pod && f.protocol == "icmp"));
    // The same through the CLI.
    let run = |args: &[&str]| {
        let (ok, out) = c.nodes[0].control(args).unwrap();
        assert!(ok, "switchyard-control {args:?} failed");
        out
    };
    let nat = run(&["get", "nat"]);
    assert!(
        nat.contains("61000-65534") && nat.contains(&c.nodes[0].ipv4.to_string()),
        "{nat}"
    );
    let tcp = run(&[
        "get",
        "conntrack",
        "--protocol",
        "tcp",
        "--pod",
        &pod.to_string(),
        "-o",
        "wide",
    ]);
    assert!(
        tcp.contains(&format!("{}:7000", ext.ipv4)) && tcp.contains("IDLE"),
        "{tcp}"
    );
    assert!(!tcp.contains("udp"), "{tcp}");
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn fragmentation_needed_from_the_router_reaches_the_pod() {
    let c = cluster();
    // The router's link to the external network is narrower than the pods' MTU.
    c.hub
        .exec(&["ip", "link", "set", "x0", "mtu", "1300"])
        .unwrap();
    let ext = c.external.as_ref().unwrap();
    let pod = &c.nodes[0].pods[0];
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            pod.ns.name(),
            "ping",
            "-c",
            "2",
            "-W",
            "2",
            "-M",
            "do",
        ])
        .args(["-s", "1400", &ext.ipv4.to_string()])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(
        out.contains("mtu = 1300") || out.contains("mtu=1300"),
        "the pod did not hear of the smaller path MTU: {out}\n{}",
        c.logs()
    );
    // And so TCP finds the path MTU and completes.
    let t = tcp_transfer(pod, ext, 10 << 20).unwrap();
    assert_eq!(t.sent_hash, t.received_hash);
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn the_node_never_resets_a_masqueraded_flow() {
    let c = cluster();
    let node = &c.nodes[0];
    let ns = node.ns.path();
    let capture = std::thread::spawn(move || {
        bench_env::rawsock::capture(&ns, "eth0", std::time::Duration::from_secs(4)).unwrap()
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let ext = c.external.as_ref().unwrap();
    let gbps = measure::tcp_gbps(&node.pods[0], ext, 1, 3).unwrap();
    let frames = capture.join().unwrap();
    let v = bench_env::rawsock::CAPTURE_VNET_LEN;
    let node_ip = node.ipv4.octets();
    let (mut tcp, mut resets) = (0, 0);
    for f in frames.iter().filter(|f| f.len() > v + 14 + 40) {
        let (eth, l3) = (&f[v..], &f[v + 14..]);
        if eth[12..14] != [0x08, 0x00] || l3[9] != 6 || l3[12..16] != node_ip {
            continue;
        }
        tcp += 1;
        let ihl = usize::from(l3[0] & 0x0f) * 4;
        if l3[ihl + 13] & 0x04 != 0 {
            resets += 1;
        }
    }
    assert!(tcp > 100 && gbps > 0.1, "{tcp} segments, {gbps} Gbit/s");
    assert_eq!(
        resets, 0,
        "the node's stack answered a masqueraded flow with RST"
    );
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn a_syn_flood_toward_the_external_network_leaves_room_for_other_pods() {
    const LIMIT: usize = 4096;
    let c = cluster_with(ClusterOptions {
        external: true,
        pods_per_node: 3,
        conntrack_max: Some(LIMIT),
        ..ClusterOptions::default()
    });
    let ext = c.external.as_ref().unwrap();
    let node = &c.nodes[0];
    let (flooder, steady, newcomer) = (&node.pods[0], &node.pods[1], &node.pods[2]);
    let pid = node.dataplane_pid().unwrap();
    let nat = || nat(&c, 0);
    let mut known = EchoFlow::open(steady, ext).expect("a TCP connection to the external host");
    assert!(known.echo(b"before the flood"));
    let before = rss_kib(pid);
    // hping3's flood mode: SYNs as fast as the pod can send them, each from the next
    // source port, to a port the external host answers with a reset.
    let ext_ip = ext.ipv4.to_string();
    let flood = flooder
        .ns
        .spawn(
            &[
                "timeout", "8", "hping3", "--flood", "--syn", "-p", "9", &ext_ip,
            ],
            None,
        )
        .expect("hping3");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(6);
    while nat().early_drops == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let during = nat();
    assert!(
        during.early_drops > 0,
        "the flood never filled the table: {during:?}\n{}",
        c.logs()
    );
    assert!(
        known.echo(b"during the flood"),
        "another pod's established connection stopped under the flood"
    );
    let t = tcp_transfer(newcomer, ext, 1 << 20)
        .unwrap_or_else(|e| panic!("a new connection from a third pod under the flood: {e}"));
    assert_eq!(t.sent_hash, t.received_hash);
    drop(flood);
    let after = nat();
    assert!(running(pid), "the dataplane stayed up");
    assert!(
        after.flows <= LIMIT + 64,
        "the table stays bounded: {after:?}"
    );
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(
        grown < 16 << 10,
        "the dataplane grew by {grown} KiB under the flood"
    );
    assert!(known.echo(b"after the flood"));
    eprintln!(
        "SYN flood: {} early drops, {} refused as full, {} flows held (limit {LIMIT}), RSS +{grown} KiB",
        after.early_drops,
        stat(&c, 0, "conntrack_full"),
        after.flows
    );
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn trace_shows_a_routed_a_masqueraded_and_a_dropped_packet_without_opening_a_flow() {
    let c = cluster();
    let ext = c.external.as_ref().unwrap();
    let node = &c.nodes[0];
    let from = node.pods[0].ipv4.to_string();
    let trace = |to: String| {
        let (ok, out) = node
            .control(&["trace", "--from", &from, "--to", &to])
            .unwrap();
        assert!(ok, "trace --to {to}: {out}");
        out
    };
    let flows = nat(&c, 0).flows;
    let routed = trace(format!("{}:80/tcp", c.nodes[1].pods[0].ipv4));
    assert!(
        routed.contains(&format!("overlay to node {}", c.nodes[1].ipv4))
            && routed.trim_end().ends_with("forwarded"),
        "{routed}"
    );
    let masqueraded = trace(format!("{}:5201/tcp", ext.ipv4));
    assert!(
        masqueraded.contains(&format!("becomes {}:", node.ipv4)),
        "{masqueraded}"
    );
    let dropped = trace("127.0.0.1:80/tcp".into());
    assert!(
        dropped.contains("dropped: martian_destination"),
        "{dropped}"
    );
    let (ok, json) = node
        .control(&[
            "-o",
            "json",
            "trace",
            "--from",
            &from,
            "--to",
            &format!("{}/icmp", ext.ipv4),
        ])
        .unwrap();
    assert!(ok, "{json}");
    let report: switchyard_api::TraceReport = serde_json::from_str(&json).unwrap();
    assert_eq!(report.verdict, "forwarded", "{report:?}");
    assert_eq!(nat(&c, 0).flows, flows, "a trace opens no flow");
    let (ok, out) = node
        .control(&["trace", "--from", "default/nobody", "--to", "10.0.0.1"])
        .unwrap();
    assert!(!ok && out.contains("get pods"), "{out}");
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn a_masqueraded_stream_and_a_host_port_connection_survive_kill_9_of_the_dataplane() {
    streams_survive(nix::sys::signal::Signal::SIGKILL);
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn a_masqueraded_stream_and_a_host_port_connection_survive_a_planned_restart() {
    streams_survive(nix::sys::signal::Signal::SIGTERM);
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn a_planned_restart_loses_no_ping() {
    let mut c = cluster();
    let ext = c.external.as_ref().unwrap().ipv4;
    let pod = &c.nodes[0].pods[0];
    let remote = c.nodes[1].pods[0].ipv4;
    for target in [ext, remote] {
        assert!(measure::ping(&pod.ns, IpAddr::V4(target)), "{target}");
    }
    // 300 pings 10 ms apart to the external host (masqueraded) and to a pod on the other
    // node (the overlay), while node 0's dataplane stops and a new one starts.
    let netns = pod.ns.path().file_name().unwrap().to_owned();
    let pings: Vec<_> = [ext, remote]
        .into_iter()
        .map(|target| {
            let netns = netns.clone();
            std::thread::spawn(move || {
                let out = std::process::Command::new("ip")
                    .arg("netns")
                    .arg("exec")
                    .arg(&netns)
                    .args(["ping", "-c", "300", "-i", "0.01", "-W", "2", "-q"])
                    .arg(target.to_string())
                    .output()
                    .unwrap();
                (target, String::from_utf8_lossy(&out.stdout).into_owned())
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(800));
    c.stop_and_start_dataplane(0, nix::sys::signal::Signal::SIGTERM, |_| ())
        .unwrap();
    for ping in pings {
        let (target, out) = ping.join().unwrap();
        assert!(
            out.contains("300 packets transmitted, 300 received"),
            "pings to {target} were lost across the restart:\n{out}\n{}",
            c.logs()
        );
    }
    let log = std::fs::read_to_string(&c.nodes[0].dataplane_log).unwrap();
    assert!(
        log.contains("took over") && log.contains("applied the recorded node settings"),
        "the new process took the queues and the node settings over:\n{log}"
    );
}

/// A masqueraded TCP stream and one through a published port (hostPort) run while node
/// 0's dataplane is stopped with `signal` and started again: both carry on, every byte
/// arrives, and the bytes never stop for 2 s.
fn streams_survive(signal: nix::sys::signal::Signal) {
    use bench_env::transfer::TimedStream;
    let mut c = cluster();
    let mappings = serde_json::json!({"portMappings": [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}
    ]});
    c.add_pod_with(0, 1, Some(mappings)).unwrap();
    let ext = c.external.as_ref().unwrap();
    let (ext_ns, ext_ip) = (ext.ns.path(), ext.ipv4);
    let node = &c.nodes[0];
    let outbound = std::net::SocketAddr::from((ext_ip, 7010));
    let masqueraded = TimedStream::open(&node.pods[0].ns.path(), &ext_ns, outbound, outbound)
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let published = TimedStream::open(
        &ext_ns,
        &node.pods[1].ns.path(),
        std::net::SocketAddr::from((node.pods[1].ipv4, 80)),
        std::net::SocketAddr::from((node.ipv4, 8080)),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    std::thread::sleep(std::time::Duration::from_millis(800));
    let flows = nat(&c, 0).flows;
    assert!(flows >= 2, "both connections are tracked: {flows}");
    c.stop_and_start_dataplane(0, signal, |_| ()).unwrap();
    c.wait_for_peers(0, 1, std::time::Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let back = nat(&c, 0);
    assert!(
        back.flows >= 2,
        "the new process took the flows back: {back:?}\n{}",
        c.logs()
    );
    std::thread::sleep(std::time::Duration::from_secs(2));
    for (what, stream) in [("masqueraded", masqueraded), ("hostPort", published)] {
        let report = stream
            .finish()
            .unwrap_or_else(|e| panic!("the {what} connection broke: {e}\n{}", c.logs()));
        eprintln!("{signal}, {what}: {report:?}");
        assert_eq!(report.read, report.written, "{what}: bytes lost");
        assert!(
            report.longest_gap < std::time::Duration::from_secs(2),
            "{what}: the bytes stopped for {:?}",
            report.longest_gap
        );
    }
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn a_corrupt_conntrack_journal_is_discarded_with_a_log_line() {
    let mut c = cluster();
    let ext = c.external.as_ref().unwrap().ipv4;
    assert!(measure::ping(&c.nodes[0].pods[0].ns, IpAddr::V4(ext)));
    c.stop_and_start_dataplane(0, nix::sys::signal::Signal::SIGKILL, |api| {
        let journal = switchyard_dataplane::StateFiles::beside(api).conntrack;
        let garbage: Vec<u8> = (0..100_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        std::fs::write(journal, garbage).unwrap();
    })
    .unwrap();
    c.wait_for_peers(0, 1, std::time::Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    let log = std::fs::read_to_string(&c.nodes[0].dataplane_log).unwrap();
    assert!(
        log.contains("discarded the conntrack journal")
            && log.contains("not a Switchyard conntrack journal"),
        "{log}"
    );
    assert_eq!(nat(&c, 0).flows, 0, "nothing taken from garbage");
    assert!(
        measure::ping(&c.nodes[0].pods[0].ns, IpAddr::V4(ext)),
        "egress works with a fresh journal"
    );
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn a_stopped_dataplane_leaves_the_node_to_its_successor_and_the_uninstall_removes_it_all() {
    let mut c = cluster();
    let proto_83 = ["ip", "route", "show", "table", "all", "proto", "83"];
    let before = c.nodes[0].ns.exec(&proto_83).unwrap();
    assert!(
        !before.is_empty(),
        "Switchyard's node routes carry proto 83"
    );
    c.stop_dataplane(0, nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    let ns = &c.nodes[0].ns;
    let routes = || ns.exec(&proto_83).unwrap();
    let rules = || ns.exec(&["ip", "rule"]).unwrap();
    // The same routes; once nobody reads the host port, the kernel marks them `linkdown`.
    let unmarked = |text: String| text.replace(" linkdown", "");
    assert_eq!(unmarked(routes()), unmarked(before), "the routes stay");
    assert!(
        ns.exec(&["ip", "link", "show", "sy0"]).is_ok(),
        "the host port stays"
    );
    assert!(
        rules().contains("lookup 200"),
        "the steering stays: {}",
        rules()
    );
    let api = c.nodes[0].api.clone();
    let journal = switchyard_dataplane::StateFiles::beside(&api).conntrack;
    assert!(journal.exists(), "the flows' journal stays");
    let cni = std::env::temp_dir().join(format!("sy-uninstall-{}", std::process::id()));
    std::fs::create_dir_all(&cni).unwrap();
    let binary = bench_env::tools::find_binary("switchyard-dataplane").unwrap();
    let out = ns
        .exec(&[
            binary.to_str().unwrap(),
            "--cleanup",
            "--api",
            api.to_str().unwrap(),
            "--cni-conf-dir",
            cni.to_str().unwrap(),
            "--cni-bin-dir",
            cni.to_str().unwrap(),
        ])
        .unwrap_or_else(|e| panic!("--cleanup: {e}"));
    std::fs::remove_dir_all(&cni).unwrap();
    assert!(out.contains("removed the host port sy0"), "{out}");
    assert!(
        ns.exec(&["ip", "link", "show", "sy0"]).is_err(),
        "sy0 is gone"
    );
    assert_eq!(routes(), "", "no route of Switchyard's is left");
    let after = rules();
    assert!(!after.contains("lookup 200"), "{after}");
    assert!(
        after
            .lines()
            .any(|l| l.starts_with("0:") && l.contains("lookup local")),
        "{after}"
    );
    assert!(!journal.exists(), "the journal is removed");
}

/// Whether process `pid` runs (exists and is not a zombie).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// Opens `count` UDP flows from `pod` to the external host: one datagram each, from four
/// source ports to `count / 4` destination ports.
fn open_flows(
    pod: &bench_env::testbed::Pod,
    ext: std::net::Ipv4Addr,
    count: u32,
    first_dport: u16,
) {
    switchyard_dataplane::io::netns::run_in(&pod.ns.path(), move || {
        // Fixed source ports, so that sending again refreshes the same flows.
        let sockets: Vec<std::net::UdpSocket> = (0..4)
            .map(|k| std::net::UdpSocket::bind(("0.0.0.0", 20_001 + k)))
            .collect::<std::io::Result<_>>()?;
        for i in 0..count {
            let dport = first_dport.wrapping_add((i / 4) as u16).max(1);
            let _ = sockets[(i % 4) as usize].send_to(b"x", (ext, dport));
            if i % 128 == 127 {
                // Paced: the pod's own queue toward its TAP holds 1,000 frames.
                std::thread::sleep(std::time::Duration::from_micros(500));
            }
        }
        Ok(())
    })
    .unwrap();
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn two_hundred_thousand_flows_then_a_full_table_makes_room_from_unanswered_ones() {
    let c = cluster_with(ClusterOptions {
        external: true,
        conntrack_max: Some(210_000),
        ..ClusterOptions::default()
    });
    let ext = c.external.as_ref().unwrap();
    let pod = &c.nodes[0].pods[0];
    let pid = c.nodes[0].dataplane_pid().unwrap();
    let before = rss_kib(pid);
    let nat = |c: &Cluster| nat(c, 0);
    // A datagram the pod's kernel could not queue opens no flow: the flows are sent again,
    // up to 8 times, until `done` (a known flow is only refreshed). A busy machine loses
    // some on the way; the queues drain in between.
    let open_until = |count: u32, first_dport: u16, done: &dyn Fn() -> bool| {
        for _ in 0..8 {
            open_flows(pod, ext.ipv4, count, first_dport);
            if done() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    };
    open_until(200_000, 1000, &|| nat(&c).udp >= 200_000);
    let n = nat(&c);
    assert_eq!(n.udp, 200_000, "flows tracked");
    assert_eq!(
        stat(&c, 0, "conntrack_full") + stat(&c, 0, "nat_no_port_left"),
        0
    );
    // An established flow, then more flows than the table holds: the unanswered UDP
    // flows make room for the new ones (early drop), the established one stays.
    let t = tcp_transfer(pod, ext, 1 << 20).unwrap();
    assert_eq!(t.sent_hash, t.received_hash);
    let mut known = EchoFlow::open(pod, ext).expect("a TCP connection to the external host");
    assert!(known.echo(b"before the table fills"));
    // 20,000 new flows where about 10,000 fit: about 10,000 early drops (making room slows
    // the worker, so more of them may need sending again).
    open_until(20_000, 60_000, &|| nat(&c).early_drops > 5_000);
    let n = nat(&c);
    assert!(
        n.early_drops > 5_000,
        "new flows past the limit take unanswered ones' places: {n:?}"
    );
    assert!(n.flows <= 210_000 + 64, "{n:?}");
    assert!(
        known.echo(b"while the table is full"),
        "an established connection stopped when the table filled"
    );
    assert_eq!(
        stat(&c, 0, "conntrack_full"),
        0,
        "a new flow was refused although unanswered ones could make room"
    );
    let grown = rss_kib(pid).saturating_sub(before);
    eprintln!(
        "conntrack: {} flows; dataplane RSS grew by {grown} KiB ({} bytes per flow)",
        nat(&c).flows,
        grown * 1024 / nat(&c).flows as u64
    );
    // Documented: about 120 bytes per flow; allow twice that.
    assert!(
        grown < 210_000 * 240 / 1024,
        "{grown} KiB for 210,000 flows is more than documented"
    );
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn routes_from_the_cluster_configuration_reach_the_nodes() {
    let mut c = cluster();
    let ext = c.external.as_ref().unwrap().ipv4;
    // Node 0 loses its hand-made static route: its pods lose the external network.
    c.nodes[0]
        .ns
        .exec(&["ip", "route", "del", "192.168.2.0/24"])
        .unwrap();
    assert!(!measure::ping(&c.nodes[0].pods[0].ns, IpAddr::V4(ext)));
    // The ConfigMap's routes give it back, without scripts on the node.
    c.set_routes(vec![("192.168.2.0/24".into(), "192.168.1.1".into())])
        .unwrap();
    let start = std::time::Instant::now();
    while !c.nodes[0]
        .ns
        .exec(&["ip", "route", "show", "192.168.2.0/24"])
        .unwrap()
        .contains("via 192.168.1.1")
    {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(2),
            "{}",
            c.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(measure::ping(&c.nodes[0].pods[0].ns, IpAddr::V4(ext)));
}

/// Accepts one TCP connection on port 80 in `pod`'s namespace; returns the peer it saw
/// and the bytes it read.
fn serve_once(
    pod: &bench_env::testbed::Pod,
) -> std::thread::JoinHandle<std::io::Result<(std::net::SocketAddr, Vec<u8>)>> {
    let ns = pod.ns.path();
    let addr = std::net::SocketAddr::from((pod.ipv4, 80));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        switchyard_dataplane::io::netns::run_in(&ns, move || {
            use std::io::Read;
            let listener = std::net::TcpListener::bind(addr)?;
            let _ = ready_tx.send(());
            let (mut stream, peer) = listener.accept()?;
            let mut data = Vec::new();
            stream.read_to_end(&mut data)?;
            Ok((peer, data))
        })
    });
    ready_rx.recv().unwrap();
    handle
}

fn connect_from(
    from: &bench_env::netns::Netns,
    to: std::net::SocketAddr,
    payload: &'static [u8],
) -> std::io::Result<()> {
    switchyard_dataplane::io::netns::run_in(&from.path(), move || {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect_timeout(&to, std::time::Duration::from_secs(2))?;
        s.write_all(payload)?;
        Ok(())
    })
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn host_port_publishes_a_pod_on_its_node_until_del() {
    let mut c = cluster();
    let mappings = serde_json::json!({"portMappings": [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""},
        {"hostPort": 5353, "containerPort": 53, "protocol": "udp"}
    ]});
    c.add_pod_with(0, 1, Some(mappings)).unwrap();
    let node = std::net::SocketAddr::from((c.nodes[0].ipv4, 8080));
    let server = serve_once(&c.nodes[0].pods[1]);
    let ext = c.external.as_ref().unwrap();
    connect_from(&ext.ns, node, b"hello through the node's port")
        .unwrap_or_else(|e| panic!("external host cannot reach node:8080: {e}\n{}", c.logs()));
    let (peer, data) = server.join().unwrap().unwrap();
    assert_eq!(data, b"hello through the node's port");
    assert_eq!(
        peer.ip(),
        IpAddr::V4(ext.ipv4),
        "the pod sees the real client"
    );
    let rules = c.nodes[0].ns.exec(&["ip", "rule"]).unwrap();
    assert!(
        rules.contains("dport 8080") && rules.contains("dport 5353"),
        "{rules}"
    );
    let (_, pods) = c.nodes[0].control(&["get", "pods", "-o", "wide"]).unwrap();
    assert!(pods.contains("8080->80/tcp,5353->53/udp"), "{pods}");
    // UDP: a question to node:5353 is answered by the pod, from node:5353.
    let pod_addr = std::net::SocketAddr::from((c.nodes[0].pods[1].ipv4, 53));
    let echo = std::thread::spawn({
        let ns = c.nodes[0].pods[1].ns.path();
        move || {
            switchyard_dataplane::io::netns::run_in(&ns, move || {
                let s = std::net::UdpSocket::bind(pod_addr)?;
                s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
                let mut buf = [0u8; 64];
                let (n, from) = s.recv_from(&mut buf)?;
                s.send_to(&buf[..n], from)?;
                Ok(from)
            })
        }
    });
    std::thread::sleep(std::time::Duration::from_millis(100));
    let node_udp = std::net::SocketAddr::from((c.nodes[0].ipv4, 5353));
    let (answer, from) = switchyard_dataplane::io::netns::run_in(&ext.ns.path(), move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
        s.send_to(b"question", node_udp)?;
        let mut buf = [0u8; 64];
        let (n, from) = s.recv_from(&mut buf)?;
        Ok((buf[..n].to_vec(), from))
    })
    .unwrap_or_else(|e| panic!("no UDP answer through node:5353: {e}\n{}", c.logs()));
    assert_eq!(answer, b"question");
    assert_eq!(from, node_udp, "the answer comes from the node's port");
    assert_eq!(echo.join().unwrap().unwrap().ip(), IpAddr::V4(ext.ipv4));
    // CNI DEL: the mapping, its steering rules and the pod's flows go.
    let pod_ip = c.nodes[0].pods[1].ipv4;
    let flows_of_pod = |c: &Cluster| {
        let request = switchyard_api::Request::ListConntrack {
            pod: Some(pod_ip),
            protocol: None,
        };
        match c.nodes[0].client().unwrap().call(request).unwrap() {
            switchyard_api::Reply::Conntrack(flows) => flows.len(),
            other => panic!("unexpected reply {other:?}"),
        }
    };
    assert!(
        flows_of_pod(&c) > 0,
        "the published connections are tracked"
    );
    let (_, listed) = c.nodes[0]
        .control(&["get", "conntrack", "--pod", &pod_ip.to_string()])
        .unwrap();
    assert!(
        listed.contains("hostPort") && listed.contains(":80 "),
        "{listed}"
    );
    c.del_pod(0, 1).unwrap();
    assert_eq!(flows_of_pod(&c), 0, "a deleted pod leaves no flow behind");
    let rules = c.nodes[0].ns.exec(&["ip", "rule"]).unwrap();
    assert!(!rules.contains("dport 8080"), "{rules}");
    let ext = c.external.as_ref().unwrap();
    assert!(
        connect_from(&ext.ns, node, b"x").is_err(),
        "node:8080 still answers after DEL"
    );
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn host_port_answers_pods_on_every_node_the_node_itself_and_hairpin() {
    let mut c = cluster();
    let mappings = serde_json::json!({"portMappings": [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}
    ]});
    c.add_pod_with(0, 1, Some(mappings)).unwrap();
    let node = std::net::SocketAddr::from((c.nodes[0].ipv4, 8080));
    let clients = [
        (
            "a pod on the same node",
            &c.nodes[0].pods[0].ns,
            Some(c.nodes[0].pods[0].ipv4),
        ),
        (
            "a pod on another node",
            &c.nodes[1].pods[0].ns,
            Some(c.nodes[1].pods[0].ipv4),
        ),
        ("the node itself", &c.nodes[0].ns, None),
        // Hairpin: the pod sees its node's address as the client, not its own.
        (
            "the publishing pod itself",
            &c.nodes[0].pods[1].ns,
            Some(c.nodes[0].ipv4),
        ),
    ];
    for (who, ns, address) in clients {
        let server = serve_once(&c.nodes[0].pods[1]);
        connect_from(ns, node, b"hello from inside the cluster")
            .unwrap_or_else(|e| panic!("{who} cannot reach node:8080: {e}\n{}", c.logs()));
        let (peer, data) = server.join().unwrap().unwrap();
        assert_eq!(data, b"hello from inside the cluster", "{who}");
        if let Some(address) = address {
            assert_eq!(
                peer.ip(),
                IpAddr::V4(address),
                "{who}: the client the pod sees"
            );
        }
    }
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn steering_rules_left_by_a_crashed_dataplane_are_removed() {
    let mut c = cluster();
    // What a dataplane killed with SIGKILL leaves when a pod's hostPort went meanwhile.
    let uplink = "eth0";
    c.nodes[0]
        .ns
        .exec(&[
            "ip", "rule", "add", "pref", "50", "iif", uplink, "ipproto", "tcp", "dport", "9999",
            "lookup", "200",
        ])
        .unwrap();
    c.restart_dataplane(0).unwrap();
    let start = std::time::Instant::now();
    loop {
        let rules = c.nodes[0].ns.exec(&["ip", "rule"]).unwrap();
        let steering = rules.contains("lookup 200");
        if !rules.contains("dport 9999") && steering {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "the leftover rule stayed (or steering never came back):\n{rules}\n{}",
            c.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // And egress works again through the new process.
    let ext = c.external.as_ref().unwrap();
    assert!(measure::ping(&c.nodes[0].pods[0].ns, IpAddr::V4(ext.ipv4)));
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn vxlan_from_a_host_that_is_not_a_node_is_dropped_and_counted() {
    let c = cluster();
    let ext = c.external.as_ref().unwrap();
    let node = c.nodes[0].ipv4;
    let before = stat(&c, 0, "uplink_not_a_peer");
    switchyard_dataplane::io::netns::run_in(&ext.ns.path(), move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        // A well-formed VXLAN header and inner frame, from an address no Node has.
        let mut datagram = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
        datagram.extend_from_slice(&[0u8; 14 + 40]);
        for _ in 0..5 {
            socket.send_to(&datagram, (node, 4789))?;
        }
        Ok(())
    })
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while stat(&c, 0, "uplink_not_a_peer") < before + 5 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(stat(&c, 0, "uplink_not_a_peer"), before + 5);
}
