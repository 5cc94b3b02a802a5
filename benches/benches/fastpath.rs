//! Criterion benchmarks of the fast path: parsing, LPM lookups, the pipeline per packet.
//! Run with `cargo bench -p switchyard-benches`; figures go to docs/benchmarks.md.
#![allow(missing_docs)] // criterion_group! generates an undocumented public function

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};
use switchyard_api::{AddPort, Endpoint, Request, ServicePort, ServiceSpec};
use switchyard_benches::{ipv4_routes, ipv6_routes, udp6_frame, udp_frame};
use switchyard_dataplane::buffer::{PacketBuf, BATCH};
use switchyard_dataplane::pipeline::{Pipeline, Verdict};
use switchyard_dataplane::tables::lpm::Lpm;
use switchyard_dataplane::wire::{EtherType, EthernetFrame, Ipv4Packet};
use switchyard_dataplane::worker::{forward_batch, QueueRead};
use switchyard_dataplane::{Switch, SwitchConfig};

const GW: [u8; 6] = [0xee; 6];
const A_MAC: [u8; 6] = [0x0a, 0x58, 10, 244, 0, 5];

fn parse_classify(c: &mut Criterion) {
    let frame = udp_frame(
        A_MAC,
        GW,
        Ipv4Addr::new(10, 244, 0, 5),
        Ipv4Addr::new(10, 244, 0, 6),
        18,
    );
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ethernet_ipv4_classify", |b| {
        b.iter(|| {
            let eth = EthernetFrame::new_checked(black_box(&frame[..])).unwrap();
            match eth.ethertype() {
                EtherType::Ipv4 => {
                    let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
                    black_box((ip.src(), ip.dst(), ip.ttl(), ip.verify_checksum()))
                }
                _ => unreachable!(),
            }
        })
    });
    g.finish();
}

fn lpm(c: &mut Criterion) {
    let mut g = c.benchmark_group("lpm");
    const LOOKUPS: usize = 4096;
    g.throughput(Throughput::Elements(LOOKUPS as u64));
    for n in [1_000usize, 100_000, 1_000_000] {
        let routes = ipv4_routes(n);
        let table = Lpm::build(routes).unwrap();
        eprintln!(
            "ipv4 {n} routes: {:.1} MiB",
            table.memory_bytes() as f64 / (1 << 20) as f64
        );
        let mut rng = fastrand::Rng::with_seed(1);
        let keys: Vec<u32> = (0..LOOKUPS)
            .map(|_| rng.u32(0x0100_0000..0xe000_0000))
            .collect();
        g.bench_function(format!("ipv4_{n}_routes"), |b| {
            b.iter(|| {
                let mut acc = 0u32;
                for &k in &keys {
                    acc = acc.wrapping_add(table.lookup(black_box(k)));
                }
                acc
            })
        });
    }
    let routes = ipv6_routes(100_000);
    let table = Lpm::build(routes.clone()).unwrap();
    eprintln!(
        "ipv6 100000 routes: {:.1} MiB",
        table.memory_bytes() as f64 / (1 << 20) as f64
    );
    let mut rng = fastrand::Rng::with_seed(2);
    // Half the keys inside routed prefixes, half random in 2000::/3.
    let keys: Vec<u128> = (0..LOOKUPS)
        .map(|i| {
            if i % 2 == 0 {
                routes[rng.usize(..routes.len())].0 | u128::from(rng.u16(..))
            } else {
                (0x2000u128 << 112) | (u128::from(rng.u64(..)) << 64 >> 3)
            }
        })
        .collect();
    g.bench_function("ipv6_100000_routes", |b| {
        b.iter(|| {
            let mut acc = 0u32;
            for &k in &keys {
                acc = acc.wrapping_add(table.lookup(black_box(k)));
            }
            acc
        })
    });
    g.finish();
}

fn port(ip: &str) -> AddPort {
    AddPort {
        netns: format!("/bench/{ip}"),
        ifname: "eth0".into(),
        ips: vec![
            format!("{ip}/24").parse().unwrap(),
            format!("fd00:244::{}/64", ip.rsplit('.').next().unwrap_or("1"))
                .parse()
                .unwrap(),
        ],
        mtu: Some(65_000),
        mac: None,
        owner: None,
        pod: None,
        port_mappings: Vec::new(),
        kind: None,
    }
}

/// A frame in a packet buffer: virtio-net header (GSO when `mss` is given) + Ethernet.
fn frame_buf(payload: usize, mss: Option<u16>) -> PacketBuf {
    let eth = udp_frame(
        A_MAC,
        GW,
        Ipv4Addr::new(10, 244, 0, 5),
        Ipv4Addr::new(10, 244, 0, 6),
        payload,
    );
    let mut vnet = [0u8; 12];
    if let Some(mss) = mss {
        vnet[0] = 1; // NEEDS_CSUM
        vnet[1] = 5; // UDP_L4
        vnet[2..4].copy_from_slice(&42u16.to_le_bytes());
        vnet[4..6].copy_from_slice(&mss.to_le_bytes());
        vnet[6..8].copy_from_slice(&34u16.to_le_bytes());
        vnet[8..10].copy_from_slice(&6u16.to_le_bytes());
    }
    let mut frame = vnet.to_vec();
    frame.extend_from_slice(&eth);
    let mut buf = PacketBuf::new();
    buf.load(&frame);
    buf
}

/// Fresh packet buffers holding `frames` (built outside the timed part).
/// Times `run` over one batch of buffers, reloaded before each run (outside the timed
/// part) with the frames `frames` gives (after whatever else it resets). The buffers are
/// the same every time, as a worker's are: fresh ones would fault in new pages and start
/// every run with cold caches, which a worker never sees.
fn reused_batches(
    b: &mut criterion::Bencher<'_>,
    mut frames: impl FnMut() -> Vec<Vec<u8>>,
    mut run: impl FnMut(&mut [PacketBuf]),
) {
    let mut bufs: Vec<PacketBuf> = (0..BATCH).map(|_| PacketBuf::new()).collect();
    b.iter_custom(|iters| {
        let mut total = Duration::ZERO;
        for _ in 0..iters {
            for (buf, frame) in bufs.iter_mut().zip(frames()) {
                buf.load(&frame);
            }
            let started = Instant::now();
            run(&mut bufs);
            total += started.elapsed();
        }
        total
    })
}

fn pipeline(c: &mut Criterion) {
    let switch = Switch::start(SwitchConfig {
        workers: 1,
        ..SwitchConfig::default()
    })
    .unwrap();
    let (a, peer_a) = switch.add_memory_port(&port("10.244.0.5"), false).unwrap();
    let (_, peer_b) = switch.add_memory_port(&port("10.244.0.6"), false).unwrap();
    let tables = switch.tables();
    let ingress = tables.ports[&a.id].clone();
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(BATCH as u64));
    for (name, payload, mss) in [
        ("64B", 64 - 14 - 28 - 4, None),
        ("1500B", 1500 - 28, None),
        ("64KiB_gso", 65_000 - 28, Some(1472u16)),
    ] {
        let template: Vec<Vec<u8>> = (0..BATCH)
            .map(|_| frame_buf(payload, mss).frame().to_vec())
            .collect();
        let mut pipeline = Pipeline::new();
        let mut verdicts = [Verdict::Drop; BATCH];
        // Pure pipeline: the batch is rebuilt outside the timed part.
        g.bench_function(format!("process_{name}"), |b| {
            reused_batches(
                b,
                || template.clone(),
                |bufs| {
                    pipeline.process(&tables, &ingress, bufs, &mut verdicts, 0);
                    black_box(&verdicts);
                },
            )
        });
        // Through in-memory ports: copy in, pipeline, copy out to the peer.
        let mut bufs: Vec<PacketBuf> = (0..BATCH).map(|_| PacketBuf::new()).collect();
        g.bench_function(format!("memory_ports_{name}"), |b| {
            b.iter(|| {
                for f in &template {
                    peer_a.send(f);
                }
                let n = forward_batch(
                    &mut pipeline,
                    &tables,
                    &ingress,
                    QueueRead::drain(0),
                    &mut bufs,
                    &mut verdicts,
                    0,
                )
                .unwrap();
                while let Some(f) = peer_b.recv() {
                    peer_b.recycle(f);
                }
                n.frames
            })
        });
    }
    // IPv6 pod to pod: a /128 under a shared /64, the deepest walk in the trie.
    let v6: Vec<Vec<u8>> = (0..BATCH)
        .map(|_| {
            let eth = udp6_frame(
                A_MAC,
                GW,
                "fd00:244::5".parse().unwrap(),
                "fd00:244::6".parse().unwrap(),
                64 - 14 - 48,
            );
            let mut f = vec![0u8; 12];
            f.extend_from_slice(&eth);
            f
        })
        .collect();
    let mut pipeline = Pipeline::new();
    let mut verdicts = [Verdict::Drop; BATCH];
    g.bench_function("process_64B_ipv6", |b| {
        reused_batches(
            b,
            || v6.clone(),
            |bufs| {
                pipeline.process(&tables, &ingress, bufs, &mut verdicts, 0);
                assert!(matches!(verdicts[0], Verdict::Forward(_)));
            },
        )
    });
    g.finish();
}

fn segmentation(c: &mut Criterion) {
    // A 64 KiB TCP super-frame as a pod's kernel sends it (MSS 1448), cut into 45 segments
    // with an 8-byte gap each (room for a VXLAN header).
    let payload = 45 * 1448;
    let mut frame = vec![0u8; 12];
    frame[0] = 1; // NEEDS_CSUM
    frame[1] = 1; // TCPV4
    frame[4..6].copy_from_slice(&1448u16.to_le_bytes());
    let mut eth = udp_frame(
        A_MAC,
        GW,
        Ipv4Addr::new(10, 244, 0, 5),
        Ipv4Addr::new(10, 244, 0, 6),
        payload + 12,
    );
    eth[14 + 9] = 6; // TCP
    eth[14 + 20 + 12] = 5 << 4; // data offset
    eth[14 + 20 + 13] = 0x10; // ACK
    frame.extend_from_slice(&eth);
    let mut out = vec![0u8; 80_000];
    let mut g = c.benchmark_group("segment");
    g.throughput(Throughput::Bytes(payload as u64));
    g.bench_function("tcp_64KiB_into_45", |b| {
        b.iter(|| {
            switchyard_dataplane::offload::segment::super_frame(black_box(&frame), 8, &mut out)
                .unwrap()
        })
    });
    // The other node's receive: the 45 segments as one UDP_GRO read returns them, each
    // behind its VXLAN header, decapsulated and merged back into one super-frame.
    let s = switchyard_dataplane::offload::segment::super_frame(&frame, 8, &mut out).unwrap();
    let mut wire = out[..s.total].to_vec();
    for seg in wire.chunks_mut(s.stride) {
        seg[..8].copy_from_slice(&[0x08, 0, 0, 0, 0, 0, 1, 0]);
    }
    let decap = switchyard_dataplane::offload::tunnel::Decapsulator {
        encap: switchyard_dataplane::offload::tunnel::Encap::Vxlan { vni: 1, port: 4789 },
        mac: switchyard_api::MacAddr([0x0e, 0xee, 0xee, 0, 0, 2]),
        gateway: switchyard_api::MacAddr(GW),
    };
    let mut bufs: Vec<PacketBuf> = (0..4).map(|_| PacketBuf::new()).collect();
    // The run merges into two frames: the first holds what fits in one 64 KiB IP packet.
    let got = decap.deliver(&wire, s.stride, &mut bufs);
    assert_eq!(got.frames, 2, "{got:?}");
    g.bench_function("receive_vxlan_run_45", |b| {
        b.iter(|| decap.deliver(black_box(&wire), s.stride, &mut bufs))
    });
    g.finish();
}

fn masquerade(c: &mut Criterion) {
    use switchyard_dataplane::conntrack::{Conntrack, Tuple};
    use switchyard_dataplane::pipeline::nat::{translate, Side};
    // 100,000 flows tracked; the measured packet belongs to one of them (lookup, state
    // update, translation with incremental checksums), or opens a new one.
    let node = Ipv4Addr::new(192, 168, 1, 10);
    let ct = Conntrack::new(node, (32768, 60999), 1 << 20);
    // 1,000 flows to each of 100 remote hosts.
    let tuple = |i: u32| Tuple {
        protocol: 17,
        src: Ipv4Addr::new(10, 244, 0, 5),
        src_port: 1024 + (i % 1000) as u16,
        dst: Ipv4Addr::from(0xc0a8_0200 + i / 1000),
        dst_port: 53,
    };
    for i in 0..100_000 {
        ct.outbound(tuple(i), None, 0).unwrap();
    }
    let eth = udp_frame(
        A_MAC,
        GW,
        Ipv4Addr::new(10, 244, 0, 5),
        Ipv4Addr::new(192, 168, 2, 10),
        64,
    );
    let mut g = c.benchmark_group("masquerade");
    let mut i = 0u32;
    g.bench_function("known_flow_64B", |b| {
        b.iter_batched_ref(
            || eth[14..].to_vec(),
            |l3| {
                i = i.wrapping_add(7919) % 100_000;
                let t = tuple(i);
                let port = ct.outbound(black_box(t), None, 1).unwrap();
                translate(l3, Side::Source, node, port, false)
            },
            BatchSize::SmallInput,
        )
    });
    let mut j = 0u32;
    g.bench_function("known_flow_lookup", |b| {
        b.iter(|| {
            j = j.wrapping_add(7919) % 100_000;
            ct.outbound(black_box(tuple(j)), None, 1)
        })
    });
    g.bench_function("same_flow_lookup", |b| {
        b.iter(|| ct.outbound(black_box(tuple(42)), None, 1))
    });
    let mut l3 = eth[14..].to_vec();
    g.bench_function("translate_64B", |b| {
        b.iter(|| translate(black_box(&mut l3), Side::Source, node, 40000, false))
    });
    // New flows into a table that never fills: a table of 4 Mi flows, replaced (outside
    // the timed part) every 2 Mi flows. One that filled would measure the early-drop
    // search of a full table instead.
    g.bench_function("new_flow", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut done = 0u64;
            while done < iters {
                let fresh = Conntrack::new(node, (32768, 60999), 1 << 22);
                let chunk = (iters - done).min(1 << 21);
                let started = Instant::now();
                for n in 0..chunk as u32 {
                    let t = Tuple {
                        dst: Ipv4Addr::from(0x0a00_0000 + n),
                        ..tuple(0)
                    };
                    black_box(fresh.outbound(black_box(t), None, 1)).ok();
                }
                total += started.elapsed();
                done += chunk;
            }
            total
        })
    });
    g.finish();
}

/// `n` Services of 10 endpoints each (10.96.x.y:80 -> 10.245.x.y:8080), the first one's
/// endpoints being pod B.
fn services_of(n: usize) -> Vec<ServiceSpec> {
    (0..n)
        .map(|i| {
            let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + i as u32);
            let endpoints = (0..10u32)
                .map(|k| Endpoint {
                    address: if i == 0 {
                        IpAddr::from([10, 244, 0, 6])
                    } else {
                        IpAddr::from(Ipv4Addr::from(
                            u32::from(Ipv4Addr::new(10, 245, 0, 0)) + (i as u32) * 16 + k,
                        ))
                    },
                    port: 8080 + if i == 0 { k as u16 } else { 0 },
                    local: true,
                })
                .collect();
            ServiceSpec {
                namespace: "bench".into(),
                name: format!("svc-{i}"),
                kind: "ClusterIP".into(),
                cluster_ips: vec![IpAddr::V4(vip)],
                external_ips: Vec::new(),
                ports: vec![ServicePort {
                    name: "http".into(),
                    protocol: "tcp".into(),
                    port: 80,
                    node_port: None,
                    endpoints,
                }],
                affinity_timeout_s: None,
                external_local: false,
                internal_local: false,
            }
        })
        .collect()
}

fn apply(switch: &Switch, upsert: Vec<ServiceSpec>, replace: bool) {
    switch
        .handle(Request::ApplyServices {
            upsert,
            remove: Vec::new(),
            replace,
            maglev_table_size: None,
        })
        .unwrap();
}

/// TCP SYNs (or ACKs) from pod A to 10.96.0.10:80 from source ports `first..`.
fn service_frames(first_port: u16, flags: u8) -> Vec<Vec<u8>> {
    tcp_frames(Ipv4Addr::new(10, 96, 0, 10), first_port, flags)
}

/// TCP segments with `flags` from pod A to `dst`:80 from source ports `first..`.
fn tcp_frames(dst: Ipv4Addr, first_port: u16, flags: u8) -> Vec<Vec<u8>> {
    (0..BATCH as u16)
        .map(|k| {
            let mut f = udp_frame(A_MAC, GW, Ipv4Addr::new(10, 244, 0, 5), dst, 20 - 8 + 2);
            // Make it TCP: protocol, ports, data offset, flags (checksum left partial).
            f[14 + 9] = 6;
            let check = {
                f[14 + 10..14 + 12].fill(0);
                switchyard_dataplane::wire::checksum::checksum(&f[14..34])
            };
            f[14 + 10..14 + 12].copy_from_slice(&check.to_be_bytes());
            f[34..36].copy_from_slice(&(first_port.wrapping_add(k)).to_be_bytes());
            f[36..38].copy_from_slice(&80u16.to_be_bytes());
            f[34 + 12] = 5 << 4;
            f[34 + 13] = flags;
            let mut out = vec![0u8; 12];
            out.extend_from_slice(&f);
            out
        })
        .collect()
}

fn services(c: &mut Criterion) {
    let mut g = c.benchmark_group("services");
    g.sample_size(10);
    for n in [1usize, 10_000] {
        let switch = Switch::start(SwitchConfig {
            workers: 1,
            ..SwitchConfig::default()
        })
        .unwrap();
        let (a, _pa) = switch.add_memory_port(&port("10.244.0.5"), false).unwrap();
        let (_, _pb) = switch.add_memory_port(&port("10.244.0.6"), false).unwrap();
        let specs = services_of(n);
        g.bench_function(format!("apply_all_{n}x10"), |b| {
            b.iter(|| apply(&switch, specs.clone(), true))
        });
        apply(&switch, specs.clone(), true);
        let mut changed = specs[n / 2].clone();
        g.bench_function(format!("apply_one_change_of_{n}"), |b| {
            b.iter(|| {
                changed.ports[0].endpoints.rotate_left(1);
                apply(&switch, vec![changed.clone()], false)
            })
        });
        let tables = switch.tables();
        let ingress = tables.ports[&a.id].clone();
        let mut pipeline = Pipeline::new();
        let mut verdicts = [Verdict::Drop; BATCH];
        // Every packet opens a flow: the batch's source ports are new each time, and the
        // flow table is emptied outside the timed part.
        g.throughput(Throughput::Elements(BATCH as u64));
        let mut next_port = 1024u16;
        g.bench_function(format!("first_packet_64B_{n}_services"), |b| {
            reused_batches(
                b,
                || {
                    tables.service_flows.remove_where(|_| true);
                    next_port = next_port.wrapping_add(BATCH as u16).max(1024);
                    service_frames(next_port, 0x02)
                },
                |bufs| {
                    pipeline.process(&tables, &ingress, bufs, &mut verdicts, 0);
                    black_box(&verdicts);
                },
            )
        });
        // One established flow: every packet finds it.
        let established = one_flow(Ipv4Addr::new(10, 96, 0, 10));
        forwarded_batches(
            &mut g,
            &format!("established_64B_{n}_services"),
            &tables,
            &ingress,
            &established,
        );
        g.throughput(Throughput::Elements(1));
        switch.shutdown();
    }
    g.finish();
}

/// 32 ACK segments of one flow from pod A (port 40000) to `dst`:80.
fn one_flow(dst: Ipv4Addr) -> Vec<Vec<u8>> {
    tcp_frames(dst, 40_000, 0x10)
        .into_iter()
        .map(|mut f| {
            f[12 + 34..12 + 36].copy_from_slice(&40_000u16.to_be_bytes());
            f
        })
        .collect()
}

/// Benchmarks `name`: batches of `frames` from `ingress` through a pipeline, each
/// forwarded.
fn forwarded_batches(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    tables: &switchyard_dataplane::tables::Tables<switchyard_dataplane::io::PortIo>,
    ingress: &switchyard_dataplane::tables::Port<switchyard_dataplane::io::PortIo>,
    frames: &[Vec<u8>],
) {
    let mut pipeline = Pipeline::new();
    let mut verdicts = [Verdict::Drop; BATCH];
    g.bench_function(name, |b| {
        reused_batches(
            b,
            || frames.to_vec(),
            |bufs| {
                pipeline.process(tables, ingress, bufs, &mut verdicts, 0);
                assert!(matches!(verdicts[0], Verdict::Forward(_)));
            },
        )
    });
}

/// The manifests of a cluster with `n` NetworkPolicies and 10,000 peer pods: every
/// policy selects the server pods (`role: server`, B = 10.244.0.6 among them, on node
/// `n1`) and admits TCP port 80 from the pods of its group (`group: gI`, 10,000 / `n` pods
/// each on node `n2`); client A (10.244.0.5, on `n1`) is in the last group.
fn policy_world(n: usize) -> switchyard_control::cluster::manifests::Manifests {
    let mut text = String::new();
    let pod = |name: &str, node: &str, labels: &str, ip: Ipv4Addr| {
        format!("---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{{labels}}}}}\nspec: {{nodeName: {node}, containers: [{{name: c}}]}}\nstatus: {{podIPs: [{{ip: \"{ip}\"}}]}}\n")
    };
    for k in 0..10_000u32 {
        let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 1, 0, 0)) + k);
        text += &pod(
            &format!("peer-{k}"),
            "n2",
            &format!("group: g{}", k as usize % n.max(1)),
            ip,
        );
    }
    text += &pod("b", "n1", "role: server", Ipv4Addr::new(10, 244, 0, 6));
    text += &pod(
        "a",
        "n1",
        &format!("group: g{}", n.max(1) - 1),
        Ipv4Addr::new(10, 244, 0, 5),
    );
    for i in 0..n {
        text += &format!("---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p{i}, namespace: default}}\nspec:\n  podSelector: {{matchLabels: {{role: server}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{group: g{i}}}}}}}]\n    ports: [{{port: 80}}]\n");
    }
    let mut m = switchyard_control::cluster::manifests::Manifests::default();
    let mut errors = Vec::new();
    switchyard_control::cluster::manifests::load_text(
        std::path::Path::new("bench.yaml"),
        &text,
        &mut m,
        &mut errors,
    );
    assert!(errors.is_empty(), "{errors:?}");
    m
}

fn policy(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy");
    g.sample_size(10);
    for n in [0usize, 1, 100, 1000] {
        let switch = Switch::start(SwitchConfig {
            workers: 1,
            ..SwitchConfig::default()
        })
        .unwrap();
        let (a, _pa) = switch.add_memory_port(&port("10.244.0.5"), false).unwrap();
        let (_, _pb) = switch.add_memory_port(&port("10.244.0.6"), false).unwrap();
        let (_, _pc) = switch.add_memory_port(&port("10.244.0.7"), false).unwrap();
        let m = policy_world(n);
        // What the agent does on a change: compile the node's rules, send them, and the
        // dataplane decodes, compiles and publishes them.
        let push = || {
            let set = switchyard_control::policy::compile::compile(&m, Some("n1"));
            let line = serde_json::to_vec(&Request::ApplyPolicies(set)).unwrap();
            let request: Request = serde_json::from_slice(&line).unwrap();
            switch.handle(request).unwrap();
        };
        if n > 0 {
            g.bench_function(format!("compile_and_push_{n}_policies"), |b| b.iter(push));
        }
        push();
        let tables = switch.tables();
        let ingress = tables.ports[&a.id].clone();
        let mut pipeline = Pipeline::new();
        let mut verdicts = [Verdict::Drop; BATCH];
        let b_addr = Ipv4Addr::new(10, 244, 0, 6);
        g.throughput(Throughput::Elements(BATCH as u64));
        let mut next_port = 1024u16;
        // Every packet opens a flow (new source ports; the verdicts are forgotten outside
        // the timed part).
        g.bench_function(format!("first_packet_64B_{n}_policies"), |b| {
            reused_batches(
                b,
                || {
                    tables.policy_flows.sweep(u64::MAX);
                    next_port = next_port.wrapping_add(BATCH as u16).max(1024);
                    tcp_frames(b_addr, next_port, 0x02)
                },
                |bufs| {
                    pipeline.process(&tables, &ingress, bufs, &mut verdicts, 0);
                    assert!(matches!(verdicts[0], Verdict::Forward(_)));
                },
            )
        });
        // One established flow: every packet finds its verdict.
        let established = one_flow(b_addr);
        forwarded_batches(
            &mut g,
            &format!("established_64B_{n}_policies"),
            &tables,
            &ingress,
            &established,
        );
        // One established flow between pods no policy selects (A and C).
        forwarded_batches(
            &mut g,
            &format!("established_64B_{n}_policies_unselected"),
            &tables,
            &ingress,
            &one_flow(Ipv4Addr::new(10, 244, 0, 7)),
        );
        // As many established flows as packets in a batch, interleaved: no packet is of
        // the previous packet's flow, so each verdict comes from the worker's cache.
        forwarded_batches(
            &mut g,
            &format!("established_64B_{n}_policies_interleaved"),
            &tables,
            &ingress,
            &tcp_frames(b_addr, 41_000, 0x10),
        );
        g.throughput(Throughput::Elements(1));
        switch.shutdown();
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1)).sample_size(30);
    targets = parse_classify, lpm, pipeline, segmentation, masquerade, services, policy
}
criterion_main!(benches);
