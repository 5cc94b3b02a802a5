//! Arbitrary frames (virtio-net header included) from a pod through the whole pipeline,
//! in batches: no panic, and every verdict is one the worker can carry out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use switchyard_api::AddPort;
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
                port_mappings: Vec::new(),
            };
            s.add_memory_port(&spec, uso).unwrap();
        }
        s
    })
}

fuzz_target!(|data: &[u8]| {
    let switch = switch();
    let tables = switch.tables();
    let Some(ingress) = tables.ports.values().min_by_key(|p| p.id) else {
        return;
    };
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
