//! `switchyard-control check`: a connectivity matrix run from inside the pods this node's
//! dataplane knows. Each local pod pings every other pod known (its own node's, and those
//! of the dataplanes named with `--peer-api`), this node's addresses and every peer
//! node's addresses, over IPv4 and IPv6 where both ends have the family. Pings run in the
//! pod's network namespace (`nsenter --net=PATH ping`), up to three tries each.

use crate::table;
use serde::Serialize;
use std::net::IpAddr;
use std::process::Command;
use switchyard_api::{IpNet, NodeStatus, PortInfo};

/// One ping to make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Probe {
    /// The pod it runs in.
    pub from: String,
    /// Its network namespace path.
    #[serde(skip)]
    pub netns: String,
    /// What is pinged (a pod or a node).
    pub to: String,
    /// The address pinged.
    pub address: IpAddr,
}

/// A probe and whether it was answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// The probe.
    #[serde(flatten)]
    pub probe: Probe,
    /// True when a reply came back.
    pub ok: bool,
}

fn pod_name(p: &PortInfo) -> String {
    p.netns
        .rsplit('/')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or(&p.netns)
        .to_string()
}

fn is_pod(p: &PortInfo) -> bool {
    p.owner.as_deref() != Some("node") && !p.netns.is_empty()
}

/// The probes: from every local pod to every other known pod and to every node address.
pub fn probes(status: &NodeStatus, local: &[PortInfo], remote: &[PortInfo]) -> Vec<Probe> {
    let mut targets: Vec<(String, IpAddr)> = Vec::new();
    for p in local.iter().chain(remote).filter(|p| is_pod(p)) {
        targets.extend(p.ips.iter().map(|ip| (pod_name(p), ip.addr())));
    }
    if let Some(spec) = &status.spec {
        let mut node = |name: &str, addrs: &[IpAddr], underlay: IpAddr| {
            let mut all = addrs.to_vec();
            if !all.contains(&underlay) {
                all.push(underlay);
            }
            targets.extend(all.into_iter().map(|a| (format!("node/{name}"), a)));
        };
        node(&spec.name, &spec.addresses, IpAddr::V4(spec.underlay));
        for peer in &spec.peers {
            node(&peer.name, &peer.addresses, IpAddr::V4(peer.underlay));
        }
    }
    let mut out = Vec::new();
    for from in local.iter().filter(|p| is_pod(p)) {
        let own: Vec<IpAddr> = from.ips.iter().map(IpNet::addr).collect();
        for (to, address) in &targets {
            let family_ok = own.iter().any(|a| a.is_ipv4() == address.is_ipv4());
            if family_ok && !own.contains(address) {
                out.push(Probe {
                    from: pod_name(from),
                    netns: from.netns.clone(),
                    to: to.clone(),
                    address: *address,
                });
            }
        }
    }
    out
}

/// Runs the probes one after the other.
pub fn run(probes: Vec<Probe>) -> Vec<Outcome> {
    probes
        .into_iter()
        .map(|probe| {
            let ok = (0..3).any(|_| {
                Command::new("nsenter")
                    .arg(format!("--net={}", probe.netns))
                    .args(["ping", "-c", "1", "-W", "1", "-q"])
                    .arg(probe.address.to_string())
                    .output()
                    .is_ok_and(|o| o.status.success())
            });
            Outcome { probe, ok }
        })
        .collect()
}

/// The pass/fail table and a summary line.
pub fn render(outcomes: &[Outcome]) -> String {
    let rows = outcomes
        .iter()
        .map(|o| {
            vec![
                o.probe.from.clone(),
                o.probe.to.clone(),
                o.probe.address.to_string(),
                if o.ok { "pass" } else { "FAIL" }.into(),
            ]
        })
        .collect::<Vec<_>>();
    let passed = outcomes.iter().filter(|o| o.ok).count();
    format!(
        "{}{passed}/{} passed\n",
        table::render(&["FROM", "TO", "ADDRESS", "RESULT"], &rows),
        outcomes.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_api::{Backend, MacAddr, NodeSpec, Peer};

    fn port(id: u32, netns: &str, ips: &[&str], owner: Option<&str>) -> PortInfo {
        PortInfo {
            id,
            kind: "tap".into(),
            netns: netns.into(),
            ifname: "eth0".into(),
            ifindex: 2,
            mac: MacAddr::default(),
            mtu: 1450,
            ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            owner: owner.map(String::from),
            pod: None,
            queues: 1,
            port_mappings: Vec::new(),
        }
    }

    #[test]
    fn every_local_pod_pings_every_other_pod_and_node() {
        let status = NodeStatus {
            spec: Some(NodeSpec {
                name: "a".into(),
                underlay: "192.168.1.2".parse().unwrap(),
                addresses: vec!["192.168.1.2".parse().unwrap()],
                uplink: None,
                pod_cidrs: vec![],
                cluster_cidrs: vec![],
                backend: Backend::default(),
                mtu: None,
                peers: vec![Peer {
                    name: "b".into(),
                    underlay: "192.168.1.3".parse().unwrap(),
                    addresses: vec![],
                    pod_cidrs: vec![],
                }],
                masquerade: Default::default(),
                routes: Vec::new(),
                service_cidrs: Vec::new(),
            }),
            uplink: None,
            uplink_mtu: None,
            pod_mtu: None,
            host_ifname: None,
        };
        let local = vec![
            port(1, "", &[], Some("node")),
            port(2, "/run/netns/p1", &["10.0.0.2/24", "fd00::2/64"], None),
            port(3, "/run/netns/p2", &["10.0.0.3/24"], None),
        ];
        let remote = vec![port(9, "/run/netns/q1", &["10.0.1.2/24"], None)];
        let p = probes(&status, &local, &remote);
        let from_p1: Vec<_> = p.iter().filter(|x| x.from == "p1").collect();
        // p2, q1, node a, node b (IPv4 only: nobody else has IPv6).
        assert_eq!(from_p1.len(), 4);
        let from_p2: Vec<_> = p.iter().filter(|x| x.from == "p2").collect();
        // p1 (IPv4), q1, node a, node b; never itself, never IPv6.
        assert_eq!(from_p2.len(), 4);
        assert!(p.iter().all(|x| x.from != "q1"), "only local pods probe");
        let text = render(&[Outcome {
            probe: from_p1[0].clone(),
            ok: false,
        }]);
        assert!(text.contains("FAIL") && text.contains("0/1 passed"));
    }
}
