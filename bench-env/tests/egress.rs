//! Integration tests of egress (seed 004): pods reach a network outside the cluster that
//! their nodes reach by a static route, masqueraded to the node's address by Switchyard's
//! own connection tracking. They need root; under `CI=true` they always run.

use bench_env::cluster::{Cluster, ClusterOptions};
use bench_env::measure;
use bench_env::testbed::Arm;
use bench_env::transfer::{tcp_transfer, udp_burst};
use std::net::IpAddr;

fn cluster() -> Option<Cluster> {
    if !bench_env::privileged_test_may_run("egress integration test") {
        return None;
    }
    let options = ClusterOptions {
        external: true,
        ..ClusterOptions::default()
    };
    Some(Cluster::build(Arm::Switchyard, &options).expect("cluster"))
}

#[test]
fn pods_reach_the_external_network_as_their_node() {
    let Some(c) = cluster() else {
        return;
    };
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
}
