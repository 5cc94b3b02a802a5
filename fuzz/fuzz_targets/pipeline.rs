//! Arbitrary frames (virtio-net header included) from a pod, or from the node's stack,
//! through the whole pipeline, in batches, with masquerade on, a pod publishing ports
//! (hostPort) and NetworkPolicies selecting both pods (so the policy stage parses every
//! packet): no panic, and every verdict is one the worker can carry out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use switchyard_api::{
    AddPort, PodPolicy, PolicyDirection, PolicyPeer, PolicyPort, PolicyRule, PolicySet,
    PortMapping, Request,
};
use switchyard_dataplane::buffer::PacketBuf;
use switchyard_dataplane::pipeline::{Pipeline, Verdict};
use switchyard_dataplane::{Switch, SwitchConfig};

fn switch() -> &'static Switch {
    static SWITCH: OnceLock<Switch> = OnceLock::new();
    SWITCH.get_or_init(|| {
        let s = Switch::start(SwitchConfig {
            workers: 1,
            ..SwitchConfig::default()
        })
        .unwrap();
        for (name, ip, uso) in [("a", "10.244.0.5", false), ("b", "10.244.0.6", true)] {
            let spec = AddPort {
                netns: format!("/fuzz/{name}"),
                ifname: "eth0".into(),
                ips: vec![
                    format!("{ip}/24").parse().unwrap(),
                    format!("fd00::{}/64", &ip[9..]).parse().unwrap(),
                ],
                mtu: Some(1500),
                mac: None,
                owner: None,
                pod: None,
                port_mappings: if uso { published() } else { Vec::new() },
                kind: None,
            };
            s.add_memory_port(&spec, uso).unwrap();
        }
        let exempt = ["10.244.0.0/16".parse().unwrap()];
        s.add_memory_node("192.168.1.10".parse().unwrap(), &exempt)
            .unwrap();
        s.handle(Request::ApplyPolicies(policies())).unwrap();
        s
    })
}

/// Pod a admits TCP 80-81 from 10.244.0.0/16 but 10.244.0.7, and opens nothing itself
/// but UDP; pod b admits everything on SCTP and ICMP-less rules from IPv6.
fn policies() -> PolicySet {
    let rule = |origin: &str, cidr: &str, except: &[&str], ports: Vec<PolicyPort>| PolicyRule {
        origin: origin.into(),
        peers: vec![PolicyPeer {
            cidr: cidr.parse().unwrap(),
            except: except.iter().map(|e| e.parse().unwrap()).collect(),
        }],
        ports,
    };
    let port = |protocol, port, end_port| PolicyPort {
        protocol,
        port,
        end_port,
    };
    let direction = |rules: Vec<u32>| {
        Some(PolicyDirection {
            policies: vec!["fuzz/p".into()],
            rules,
        })
    };
    PolicySet {
        rules: vec![
            rule(
                "fuzz/p ingress rule 0",
                "10.244.0.0/16",
                &["10.244.0.7/32"],
                vec![port(6, 80, Some(81))],
            ),
            rule(
                "fuzz/p egress rule 0",
                "0.0.0.0/0",
                &[],
                vec![port(17, 0, None)],
            ),
            rule("fuzz/p ingress rule 1", "fd00::/64", &[], vec![]),
            rule(
                "fuzz/p ingress rule 2",
                "10.244.0.0/24",
                &[],
                vec![port(132, 0, None)],
            ),
        ],
        pods: vec![
            PodPolicy {
                namespace: "fuzz".into(),
                name: "a".into(),
                addresses: vec!["10.244.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
                ingress: direction(vec![0]),
                egress: direction(vec![1]),
            },
            PodPolicy {
                namespace: "fuzz".into(),
                name: "b".into(),
                addresses: vec!["10.244.0.6".parse().unwrap(), "fd00::6".parse().unwrap()],
                ingress: direction(vec![2, 3]),
                egress: None,
            },
        ],
    }
}

fn published() -> Vec<PortMapping> {
    [(8080, 80, "tcp"), (5353, 53, "udp")]
        .into_iter()
        .map(|(host_port, container_port, protocol)| PortMapping {
            host_port,
            container_port,
            protocol: protocol.into(),
            host_ip: String::new(),
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let switch = switch();
    let tables = switch.tables();
    // The first byte picks the ingress: pod a, pod b (publishing ports) or the host port.
    let Some((&pick, data)) = data.split_first() else {
        return;
    };
    let mut ports: Vec<_> = tables.ports.values().collect();
    ports.sort_by_key(|p| p.id);
    let ingress = ports[usize::from(pick) % ports.len()];
    // Split the input into up to 8 frames at 0xff 0xfe markers; give each the pod's MAC
    // when long enough, so that deeper stages see them.
    let mut frames: Vec<PacketBuf> = data
        .split(|&b| b == 0xfe)
        .take(8)
        .map(|chunk| {
            let mut f = chunk.to_vec();
            if f.len() >= 12 + 14 {
                f[12 + 6..12 + 12].copy_from_slice(&ingress.mac.0);
            }
            let mut buf = PacketBuf::new();
            buf.load(&f);
            buf
        })
        .collect();
    let mut verdicts = vec![Verdict::Drop; frames.len()];
    let mut pipeline = Pipeline::new();
    pipeline.process(&tables, ingress, &mut frames, &mut verdicts, 0);
    for (frame, verdict) in frames.iter().zip(&verdicts) {
        if let Verdict::Forward(nh) = verdict {
            assert!(tables.nexthop(*nh).is_some());
        }
        assert!(frame.len() <= frame.capacity());
    }
});
