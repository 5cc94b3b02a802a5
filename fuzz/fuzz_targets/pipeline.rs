//! Arbitrary frames (virtio-net header included) from a pod, or from the node's stack,
//! through the whole pipeline, in batches, with masquerade on and a pod publishing ports
//! (hostPort): no panic, and every verdict is one the worker can carry out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use switchyard_api::{AddPort, PortMapping};
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
                port_mappings: if uso { published() } else { Vec::new() },
            };
            s.add_memory_port(&spec, uso).unwrap();
        }
        let exempt = ["10.244.0.0/16".parse().unwrap()];
        s.add_memory_node("192.168.1.10".parse().unwrap(), &exempt)
            .unwrap();
        s
    })
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
