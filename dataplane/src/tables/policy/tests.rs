use super::*;
use switchyard_api::{PodPolicy, PolicyPeer, PolicyPort};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn rule(origin: &str, peers: &[(&str, &[&str])], ports: &[(u8, u16, Option<u16>)]) -> PolicyRule {
    PolicyRule {
        origin: origin.into(),
        peers: peers
            .iter()
            .map(|(cidr, except)| PolicyPeer {
                cidr: net(cidr),
                except: except.iter().map(|e| net(e)).collect(),
            })
            .collect(),
        ports: ports
            .iter()
            .map(|&(protocol, port, end_port)| PolicyPort {
                protocol,
                port,
                end_port,
            })
            .collect(),
    }
}

/// The rules read the plain way: the first rule with a peer containing `peer` (outside
/// its `except`) and a port admitting `protocol`/`port`.
fn reference(rules: &[&PolicyRule], peer: IpAddr, protocol: u8, port: u16) -> Option<u32> {
    rules
        .iter()
        .position(|r| {
            let peer_ok = r.peers.is_empty()
                || r.peers
                    .iter()
                    .any(|p| p.cidr.contains(&peer) && !p.except.iter().any(|e| e.contains(&peer)));
            let port_ok = r.ports.is_empty()
                || r.ports.iter().any(|p| {
                    p.protocol == protocol
                        && (p.port == 0 || (p.port..=p.end_port.unwrap_or(p.port)).contains(&port))
                });
            peer_ok && port_ok
        })
        .map(|i| i as u32)
}

#[test]
fn no_rule_denies_everything() {
    let c = CompiledRules::compile(&[], vec!["x/deny".into()]);
    assert_eq!(c.allows(ip("10.0.0.1"), 6, 80), None);
    assert_eq!(c.allows(ip("fd00::1"), 17, 53), None);
    assert_eq!(c.segments(), 1);
}

#[test]
fn peers_ports_and_except_decide_and_the_first_rule_is_named() {
    let r0 = rule(
        "x/p ingress rule 0",
        &[("10.0.0.0/16", &["10.0.1.0/24"])],
        &[(6, 80, None)],
    );
    let r1 = rule(
        "x/p ingress rule 1",
        &[("10.0.1.0/24", &[])],
        &[(17, 1000, Some(2000))],
    );
    let r2 = rule("x/q ingress rule 0", &[("10.0.0.7/32", &[])], &[]);
    let rules = [&r0, &r1, &r2];
    let c = CompiledRules::compile(&rules, vec!["x/p".into(), "x/q".into()]);
    for (peer, protocol, port, want) in [
        ("10.0.0.1", 6, 80, Some(0)),
        ("10.0.0.1", 6, 81, None),
        ("10.0.0.1", 17, 80, None),
        ("10.0.1.1", 6, 80, None), // the except
        ("10.0.1.1", 17, 1500, Some(1)),
        ("10.0.1.1", 17, 2001, None),
        ("10.0.0.7", 6, 80, Some(0)), // rule 0 comes first
        ("10.0.0.7", 1, 0, Some(2)),  // any protocol
        ("10.1.0.1", 6, 80, None),
        ("fd00::1", 6, 80, None),
    ] {
        assert_eq!(
            c.allows(ip(peer), protocol, port),
            want,
            "{peer} {protocol}/{port}"
        );
        assert_eq!(reference(&rules, ip(peer), protocol, port), want);
    }
}

#[test]
fn a_protocol_without_port_admits_all_its_ports_and_an_empty_rule_all_peers() {
    let r0 = rule("a", &[], &[(132, 0, None)]);
    let r1 = rule("b", &[("::/0", &[])], &[]);
    let c = CompiledRules::compile(&[&r0, &r1], vec![]);
    assert_eq!(c.allows(ip("192.168.0.1"), 132, 9), Some(0));
    assert_eq!(c.allows(ip("192.168.0.1"), 6, 9), None);
    assert_eq!(c.allows(ip("fd00::9"), 6, 9), Some(1));
    assert_eq!(
        c.allows(ip("10.0.0.1"), 6, 9),
        None,
        "::/0 admits no IPv4 peer"
    );
}

#[test]
fn except_at_the_edges_of_the_space() {
    let r = rule("a", &[("0.0.0.0/0", &["0.0.0.0/8", "255.0.0.0/8"])], &[]);
    let c = CompiledRules::compile(&[&r], vec![]);
    assert_eq!(c.allows(ip("0.0.0.1"), 6, 1), None);
    assert_eq!(c.allows(ip("1.0.0.0"), 6, 1), Some(0));
    assert_eq!(c.allows(ip("254.255.255.255"), 6, 1), Some(0));
    assert_eq!(c.allows(ip("255.255.255.255"), 6, 1), None);
    let all = rule("b", &[("::/0", &["::/1"])], &[]);
    let c = CompiledRules::compile(&[&all], vec![]);
    assert_eq!(c.allows(ip("ffff::1"), 6, 1), Some(0));
    assert_eq!(c.allows(ip("::1"), 6, 1), None);
}

/// Random rules over a small address space and port range, compiled and read plainly,
/// agree on every probe.
#[test]
fn compiled_rules_agree_with_the_plain_reading() {
    let mut rng = fastrand::Rng::with_seed(7);
    let prefix = |rng: &mut fastrand::Rng| {
        let len = rng.u8(20..=32);
        let addr = std::net::Ipv4Addr::new(10, 0, rng.u8(0..4), rng.u8(..));
        IpNet::new(IpAddr::V4(addr), len).unwrap().trunc()
    };
    for round in 0..300 {
        let owned: Vec<PolicyRule> = (0..rng.usize(0..6))
            .map(|i| PolicyRule {
                origin: format!("rule {i}"),
                peers: (0..rng.usize(0..4))
                    .map(|_| {
                        let cidr = prefix(&mut rng);
                        let except = (0..rng.usize(0..3))
                            .map(|_| prefix(&mut rng))
                            .filter(|e| cidr.contains(e))
                            .collect();
                        PolicyPeer { cidr, except }
                    })
                    .collect(),
                ports: (0..rng.usize(0..3))
                    .map(|_| {
                        let port = rng.u16(0..12);
                        PolicyPort {
                            protocol: [6, 17, 132][rng.usize(0..3)],
                            port,
                            end_port: rng.bool().then(|| port + rng.u16(0..4)),
                        }
                    })
                    .collect(),
            })
            .collect();
        let rules: Vec<&PolicyRule> = owned.iter().collect();
        let c = CompiledRules::compile(&rules, vec![]);
        for _ in 0..200 {
            let peer = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, rng.u8(0..4), rng.u8(..)));
            let protocol = [1, 6, 17, 132][rng.usize(0..4)];
            let port = rng.u16(0..12);
            assert_eq!(
                c.allows(peer, protocol, port),
                reference(&rules, peer, protocol, port),
                "round {round}: {peer} {protocol}/{port} under {owned:?}"
            );
        }
    }
}

#[test]
fn pods_share_compiled_directions_and_open_directions_stay_open() {
    let set = PolicySet {
        rules: vec![rule(
            "x/p ingress rule 0",
            &[("10.0.0.0/8", &[])],
            &[(6, 80, None)],
        )],
        pods: ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, name)| PodPolicy {
                namespace: "x".into(),
                name: (*name).into(),
                addresses: vec![
                    ip(&format!("10.0.0.{}", i + 1)),
                    ip(&format!("fd00::{}", i + 1)),
                ],
                ingress: (i < 2).then(|| PolicyDirection {
                    policies: vec!["x/p".into()],
                    rules: vec![0],
                }),
                egress: None,
            })
            .collect(),
    };
    let table = PolicyTable::compile(&set, 3, vec![ip("192.168.1.1")]);
    assert_eq!(table.generation, 3);
    let a = table.pod(ip("10.0.0.1")).unwrap();
    let b = table.pod(ip("fd00::2")).unwrap();
    assert!(Arc::ptr_eq(
        a.ingress.as_ref().unwrap(),
        b.ingress.as_ref().unwrap()
    ));
    assert!(a.egress.is_none());
    assert!(
        table.pod(ip("10.0.0.3")).is_none(),
        "c is selected for nothing"
    );
    assert_eq!(table.pods().len(), 2);
    assert!(table.is_node(ip("192.168.1.1")));
    assert!(!table.is_node(ip("10.0.0.1")));
}

#[test]
fn selected_ports_never_miss_a_port_and_share_bits_modulo_256() {
    let mut ports = SelectedPorts::default();
    assert!(!ports.contains(7) && !ports.any());
    ports.insert(7);
    assert!(ports.any());
    ports.insert(300);
    assert!(ports.contains(7) && ports.contains(300));
    assert!(
        ports.contains(263),
        "263 shares 7's bit: checked for nothing, never missed"
    );
    assert!(!ports.contains(8) && !ports.contains(299) && !ports.contains(45));
}
