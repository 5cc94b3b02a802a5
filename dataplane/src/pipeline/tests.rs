//! Pipeline tests over in-memory ports: frames in, frames and counters out.

use super::*;
use crate::io::memory::MemoryPeer;
use crate::switch::{Switch, SwitchConfig};
use crate::tables::{Port, PortCounters, PortRole, Tables};
use crate::wire::{checksum, icmp, ipv4, ipv6};
use crate::worker::{forward_batch, QueueRead};
use std::sync::Arc;
use switchyard_api::{AddPort, MacAddr, PortInfo};

const GW: MacAddr = MacAddr([0xee; 6]);
const A_MAC: MacAddr = MacAddr([0x0a, 0x58, 10, 244, 0, 5]);
const B_MAC: MacAddr = MacAddr([0x0a, 0x58, 10, 244, 0, 6]);

struct Harness {
    switch: Switch,
    pipeline: Pipeline,
    a: (u32, MemoryPeer),
    b: (u32, MemoryPeer),
}

fn port(name: &str, ips: &[&str], mtu: u32) -> AddPort {
    AddPort {
        netns: format!("/test/{name}"),
        ifname: "eth0".into(),
        ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
        mtu: Some(mtu),
        mac: None,
        owner: None,
        pod: None,
        port_mappings: Vec::new(),
        kind: None,
    }
}

impl Harness {
    fn new(mtu_a: u32, mtu_b: u32) -> Self {
        Self::with_uso(mtu_a, mtu_b, false)
    }

    /// `uso_b`: whether pod B's port accepts UDP GSO super-frames.
    fn with_uso(mtu_a: u32, mtu_b: u32, uso_b: bool) -> Self {
        let switch = Switch::start(SwitchConfig {
            workers: 1,
            ..SwitchConfig::default()
        })
        .unwrap();
        let (a, pa) = switch
            .add_memory_port(&port("a", &["10.244.0.5/24", "fd00::5/64"], mtu_a), false)
            .unwrap();
        let (b, pb) = switch
            .add_memory_port(&port("b", &["10.244.0.6/24", "fd00::6/64"], mtu_b), uso_b)
            .unwrap();
        assert_eq!(a.mac, A_MAC);
        Self {
            switch,
            pipeline: Pipeline::new(),
            a: (a.id, pa),
            b: (b.id, pb),
        }
    }

    /// Sends `frame` (Ethernet, no vnet header) from pod A and runs one batch.
    fn send_from_a(&mut self, vnet: [u8; 12], ethernet: &[u8]) {
        self.send_batch_from_a(&[(vnet, ethernet.to_vec())]);
    }

    /// Sends frames from pod A and runs them through the switch as one batch.
    fn send_batch_from_a(&mut self, frames: &[([u8; 12], Vec<u8>)]) {
        for (vnet, ethernet) in frames {
            let mut frame = vnet.to_vec();
            frame.extend_from_slice(ethernet);
            assert!(self.a.1.send(&frame));
        }
        let tables = self.switch.tables();
        let port = tables.ports[&self.a.0].clone();
        let mut bufs: Vec<PacketBuf> = (0..8).map(|_| PacketBuf::new()).collect();
        let mut verdicts = [Verdict::Drop; 8];
        forward_batch(
            &mut self.pipeline,
            &tables,
            &port,
            QueueRead::drain(0),
            &mut bufs,
            &mut verdicts,
            0,
        )
        .unwrap();
    }

    fn drops(&self, reason: DropReason) -> u64 {
        self.pipeline.counters().dropped(reason)
    }
}

fn eth(dst: MacAddr, src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An IPv4 packet with `payload_len` bytes of UDP-ish payload.
fn ipv4_packet(
    src: [u8; 4],
    dst: [u8; 4],
    ttl: u8,
    df: bool,
    proto: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    ipv4::emit_header(&mut p, src.into(), dst.into(), proto, payload.len(), ttl);
    p.extend_from_slice(payload);
    if df {
        p[6] = 0x40;
        Ipv4Packet::new_checked(&mut p[..]).unwrap().fill_checksum();
    }
    p
}

fn echo_request() -> Vec<u8> {
    let mut m = vec![icmp::V4_ECHO_REQUEST, 0, 0, 0, 0x12, 0x34, 0, 1, b'h', b'i'];
    let sum = checksum::checksum(&m);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    m
}

fn ipv6_packet(src: &str, dst: &str, hop: u8, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    ipv6::emit_header(
        &mut p,
        src.parse().unwrap(),
        dst.parse().unwrap(),
        next,
        payload.len(),
        hop,
    );
    p.extend_from_slice(payload);
    p
}

fn icmpv6_checksum_ok(ip: &[u8]) -> bool {
    let p = Ipv6Packet::new_checked(ip).unwrap();
    let pseudo =
        checksum::pseudo_header_v6(p.src(), p.dst(), p.next_header(), p.payload_len() as u32);
    checksum::fold(checksum::accumulate(pseudo, p.payload())) == 0xffff
}

#[test]
fn arp_for_gateway_is_answered() {
    let mut h = Harness::new(1500, 1500);
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&A_MAC.0);
    arp.extend_from_slice(&[10, 244, 0, 5]);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&[169, 254, 1, 1]);
    h.send_from_a([0; 12], &eth(MacAddr::BROADCAST, A_MAC, 0x0806, &arp));
    let reply = h.a.1.recv().expect("an ARP reply to pod A");
    let e = EthernetFrame::new_checked(&reply[12..]).unwrap();
    assert_eq!(e.dst(), A_MAC);
    assert_eq!(e.src(), GW);
    let a = crate::wire::ArpPacket::new_checked(e.payload()).unwrap();
    assert_eq!(a.operation(), crate::wire::arp::OP_REPLY);
    assert_eq!(a.sender_mac(), GW);
    assert_eq!(a.sender_ip().octets(), [169, 254, 1, 1]);
    assert_eq!(h.pipeline.counters().count(Event::ArpReplies), 1);
    assert!(h.b.1.recv().is_none());

    // A request for the pod's own address (duplicate detection) stays unanswered.
    let mut dad = arp.clone();
    dad[24..28].copy_from_slice(&[10, 244, 0, 5]);
    h.send_from_a([0; 12], &eth(MacAddr::BROADCAST, A_MAC, 0x0806, &dad));
    assert!(h.a.1.recv().is_none());
    assert_eq!(h.drops(DropReason::ArpIgnored), 1);

    // A request claiming another pod's address is spoofing.
    let mut spoof = arp;
    spoof[14..18].copy_from_slice(&[10, 244, 0, 6]);
    h.send_from_a([0; 12], &eth(MacAddr::BROADCAST, A_MAC, 0x0806, &spoof));
    assert_eq!(h.drops(DropReason::SpoofedSource), 1);
}

#[test]
fn ipv4_is_routed_between_pods() {
    let mut h = Harness::new(1500, 1500);
    let packet = ipv4_packet(
        [10, 244, 0, 5],
        [10, 244, 0, 6],
        64,
        true,
        1,
        &echo_request(),
    );
    h.send_from_a([0; 12], &eth(GW, A_MAC, 0x0800, &packet));
    let out = h.b.1.recv().expect("forwarded to B");
    let e = EthernetFrame::new_checked(&out[12..]).unwrap();
    assert_eq!(e.dst(), B_MAC);
    assert_eq!(e.src(), GW);
    let ip = Ipv4Packet::new_checked(e.payload()).unwrap();
    assert_eq!(ip.ttl(), 63);
    assert!(ip.verify_checksum());
    assert_eq!(ip.payload(), &echo_request()[..]);
    assert_eq!(h.pipeline.counters().count(Event::ForwardedIpv4), 1);
}

#[test]
fn spoofed_frames_are_dropped_and_counted() {
    let mut h = Harness::new(1500, 1500);
    let forged_ip = ipv4_packet(
        [10, 244, 0, 9],
        [10, 244, 0, 6],
        64,
        true,
        1,
        &echo_request(),
    );
    h.send_from_a([0; 12], &eth(GW, A_MAC, 0x0800, &forged_ip));
    let forged_mac = ipv4_packet(
        [10, 244, 0, 5],
        [10, 244, 0, 6],
        64,
        true,
        1,
        &echo_request(),
    );
    h.send_from_a([0; 12], &eth(GW, B_MAC, 0x0800, &forged_mac));
    let forged_v6 = ipv6_packet("fd00::99", "fd00::6", 64, 17, &[0; 8]);
    h.send_from_a([0; 12], &eth(GW, A_MAC, 0x86dd, &forged_v6));
    assert!(h.b.1.recv().is_none());
    assert_eq!(h.drops(DropReason::SpoofedSource), 2);
    assert_eq!(h.drops(DropReason::SpoofedMac), 1);
}

#[test]
fn ttl_expiry_sends_time_exceeded() {
    let mut h = Harness::new(1500, 1500);
    let packet = ipv4_packet(
        [10, 244, 0, 5],
        [10, 244, 0, 6],
        1,
        true,
        17,
        &[1, 2, 3, 4, 5, 6, 7, 8, 9],
    );
    h.send_from_a([0; 12], &eth(GW, A_MAC, 0x0800, &packet));
    assert!(h.b.1.recv().is_none());
    let out = h.a.1.recv().expect("an ICMP error to A");
    let e = EthernetFrame::new_checked(&out[12..]).unwrap();
    assert_eq!((e.dst(), e.src()), (A_MAC, GW));
    let ip = Ipv4Packet::new_checked(e.payload()).unwrap();
    assert!(ip.verify_checksum());
    assert_eq!(ip.src().octets(), [169, 254, 1, 1]);
    assert_eq!(ip.dst().octets(), [10, 244, 0, 5]);
    let body = ip.payload();
    assert_eq!((body[0], body[1]), (icmp::V4_TIME_EXCEEDED, 0));
    assert_eq!(checksum::checksum(body), 0);
    assert_eq!(&body[8..], &packet[..], "the whole small packet is quoted");
    assert_eq!(h.drops(DropReason::TtlExceeded), 1);
}

#[test]
fn a_flows_later_packets_in_a_batch_are_still_checked_one_by_one() {
    // One UDP flow, one batch: the second packet takes the first's route from the
    // batch's memo, but its own TTL and size are still checked.
    let mut h = Harness::new(9000, 1500);
    let ports = [0x9c, 0x40, 0, 53, 0, 16, 0, 0];
    let with = |ttl: u8, len: usize| {
        let mut payload = ports.to_vec();
        payload.resize(len, 7);
        let packet = ipv4_packet([10, 244, 0, 5], [10, 244, 0, 6], ttl, true, 17, &payload);
        ([0u8; 12], eth(GW, A_MAC, 0x0800, &packet))
    };
    h.send_batch_from_a(&[with(64, 16), with(1, 16), with(64, 3000), with(64, 16)]);
    for _ in 0..2 {
        let out = h.b.1.recv().expect("the flow's two good packets reach B");
        let ip = Ipv4Packet::new_checked(&out[26..]).unwrap();
        assert_eq!(ip.ttl(), 63);
        assert!(ip.verify_checksum());
    }
    assert!(h.b.1.recv().is_none());
    assert_eq!(h.drops(DropReason::TtlExceeded), 1);
    assert_eq!(h.drops(DropReason::TooBig), 1);
    let errors: Vec<u8> = std::iter::from_fn(|| h.a.1.recv())
        .map(|out| Ipv4Packet::new_checked(&out[26..]).unwrap().payload()[0])
        .collect();
    assert_eq!(errors, [icmp::V4_TIME_EXCEEDED, icmp::V4_DEST_UNREACHABLE]);
}

#[test]
fn no_route_sends_unreachable_but_never_about_an_error() {
    let mut h = Harness::new(1500, 1500);
    let packet = ipv4_packet([10, 244, 0, 5], [192, 0, 2, 1], 64, true, 17, &[0; 8]);
    h.send_from_a([0; 12], &eth(GW, A_MAC, 0x0800, &packet));
    let out = h.a.1.recv().expect("unreachable");
    assert_eq!(out[12 + 14 + 20], icmp::V4_DEST_UNREACHABLE);
    // An ICMP error with no route gets no error back.
    let error = ipv4_packet(
        [10, 244, 0, 5],
        [192, 0, 2, 1],
        64,
        true,
        1,
        &[3, 1, 0, 0, 0, 0, 0, 0],
    );
    h.send_from_a([0; 12], &eth(GW, A_MAC, 0x0800, &error));
    assert!(h.a.1.recv().is_none());
    assert_eq!(h.drops(DropReason::NoRoute), 2);
}

#[test]
fn too_big_for_egress_mtu_sends_frag_needed() {
    let mut h = Harness::new(9000, 1500);
    let big = ipv4_packet([10, 244, 0, 5], [10, 244, 0, 6], 64, true, 17, &[7; 3000]);
    h.send_from_a([0; 12], &eth(GW, A_MAC, 0x0800, &big));
    assert!(h.b.1.recv().is_none());
    let out = h.a.1.recv().expect("fragmentation needed");
    let ip = Ipv4Packet::new_checked(&out[26..]).unwrap();
    let body = ip.payload();
    assert_eq!(
        (body[0], body[1]),
        (icmp::V4_DEST_UNREACHABLE, icmp::V4_CODE_FRAG_NEEDED)
    );
    assert_eq!(u16::from_be_bytes([body[6], body[7]]), 1500);
    assert!(ip.total_len() <= 576);
    assert_eq!(checksum::checksum(body), 0);
    // Without DF the packet is dropped (fragmenting is not done).
    let no_df = ipv4_packet([10, 244, 0, 5], [10, 244, 0, 6], 64, false, 17, &[7; 3000]);
    h.send_from_a([0; 12], &eth(GW, A_MAC, 0x0800, &no_df));
    assert_eq!(h.drops(DropReason::NeedsFragmentation), 1);
    // Exactly the MTU passes.
    let fits = ipv4_packet([10, 244, 0, 5], [10, 244, 0, 6], 64, true, 17, &[7; 1480]);
    h.send_from_a([0; 12], &eth(GW, A_MAC, 0x0800, &fits));
    assert!(h.b.1.recv().is_some());
}

#[test]
fn gso_frames_keep_their_header_and_are_checked_per_segment() {
    let mut h = Harness::new(65_000, 1500);
    // A 20 KB TCP super-frame with MSS 1448: headers 20 + 20 (data offset 5).
    let mut tcp = vec![0u8; 20_000];
    tcp[12] = 5 << 4;
    let packet = ipv4_packet([10, 244, 0, 5], [10, 244, 0, 6], 64, true, 6, &tcp);
    let vnet = [1, 1, 54, 0, 0xa8, 0x05, 34, 0, 16, 0, 0, 0];
    h.send_from_a(vnet, &eth(GW, A_MAC, 0x0800, &packet));
    let out = h.b.1.recv().expect("super-frame forwarded whole");
    assert_eq!(&out[..12], &vnet, "virtio-net header untouched");
    assert_eq!(out.len(), 12 + 14 + packet.len());
    assert_eq!(h.pipeline.counters().count(Event::ForwardedGso), 1);
    // The same frame with MSS 1480 + 40 > 1500 gets fragmentation-needed.
    let vnet_big = [1, 1, 54, 0, 0xc8, 0x05, 34, 0, 16, 0, 0, 0];
    h.send_from_a(vnet_big, &eth(GW, A_MAC, 0x0800, &packet));
    assert!(h.b.1.recv().is_none());
    let out = h.a.1.recv().expect("frag needed");
    assert_eq!(&out[..12], &[0; 12], "errors are plain frames");
    assert_eq!(h.drops(DropReason::TooBig), 1);
}

#[test]
fn neighbor_solicitation_for_gateway_is_answered() {
    let mut h = Harness::new(1500, 1500);
    let mut ns = vec![icmp::V6_NEIGHBOR_SOLICIT, 0, 0, 0, 0, 0, 0, 0];
    ns.extend_from_slice(&"fe80::1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    ns.extend_from_slice(&[1, 1]);
    ns.extend_from_slice(&A_MAC.0);
    let packet = ipv6_packet("fd00::5", "ff02::1:ff00:1", 255, 58, &ns);
    h.send_from_a(
        [0; 12],
        &eth(MacAddr([0x33, 0x33, 0xff, 0, 0, 1]), A_MAC, 0x86dd, &packet),
    );
    let out = h.a.1.recv().expect("a neighbour advertisement");
    let e = EthernetFrame::new_checked(&out[12..]).unwrap();
    assert_eq!((e.dst(), e.src()), (A_MAC, GW));
    let ip = Ipv6Packet::new_checked(e.payload()).unwrap();
    assert_eq!(ip.hop_limit(), 255);
    assert_eq!(ip.dst(), "fd00::5".parse::<std::net::Ipv6Addr>().unwrap());
    let na = ip.payload();
    assert_eq!(na[0], icmp::V6_NEIGHBOR_ADVERT);
    assert_eq!(&na[26..32], &GW.0);
    assert!(icmpv6_checksum_ok(e.payload()));

    // Duplicate address detection (source ::) is not answered.
    let dad = ipv6_packet("::", "ff02::1:ff00:1", 255, 58, &ns);
    h.send_from_a(
        [0; 12],
        &eth(MacAddr([0x33, 0x33, 0xff, 0, 0, 1]), A_MAC, 0x86dd, &dad),
    );
    assert!(h.a.1.recv().is_none());
    assert_eq!(h.drops(DropReason::NdIgnored), 1);
}

#[test]
fn ipv6_is_routed_and_errors_are_icmpv6() {
    let mut h = Harness::new(1500, 1280);
    let packet = ipv6_packet("fd00::5", "fd00::6", 64, 17, &[9; 100]);
    h.send_from_a([0; 12], &eth(GW, A_MAC, 0x86dd, &packet));
    let out = h.b.1.recv().expect("forwarded");
    let ip = Ipv6Packet::new_checked(&out[26..]).unwrap();
    assert_eq!(ip.hop_limit(), 63);
    assert_eq!(&out[12..18], &B_MAC.0);

    let last_hop = ipv6_packet("fd00::5", "fd00::6", 1, 17, &[9; 100]);
    h.send_from_a([0; 12], &eth(GW, A_MAC, 0x86dd, &last_hop));
    let err = h.a.1.recv().expect("time exceeded");
    assert_eq!(err[26 + 40], icmp::V6_TIME_EXCEEDED);
    assert!(icmpv6_checksum_ok(&err[26..]));

    let big = ipv6_packet("fd00::5", "fd00::6", 64, 17, &[9; 1400]);
    h.send_from_a([0; 12], &eth(GW, A_MAC, 0x86dd, &big));
    let err = h.a.1.recv().expect("packet too big");
    let ip = Ipv6Packet::new_checked(&err[26..]).unwrap();
    assert!(ip.total_len() <= 1280);
    assert_eq!(ip.payload()[0], icmp::V6_PACKET_TOO_BIG);
    assert_eq!(
        u32::from_be_bytes(ip.payload()[4..8].try_into().unwrap()),
        1280
    );
    assert!(icmpv6_checksum_ok(&err[26..]));
}

#[test]
fn icmp_errors_are_rate_limited() {
    let mut h = Harness::new(1500, 1500);
    let packet = ipv4_packet([10, 244, 0, 5], [192, 0, 2, 1], 64, true, 17, &[0; 8]);
    let frame = eth(GW, A_MAC, 0x0800, &packet);
    for _ in 0..150 {
        h.send_from_a([0; 12], &frame);
        while let Some(f) = h.a.1.recv() {
            h.a.1.recycle(f);
        }
    }
    assert_eq!(h.pipeline.counters().count(Event::IcmpErrorsSent), 100);
    assert_eq!(h.drops(DropReason::IcmpRateLimited), 50);
}

#[test]
fn random_and_truncated_frames_never_panic() {
    let mut h = Harness::new(1500, 1500);
    let mut rng = fastrand::Rng::with_seed(2026);
    let good = eth(
        GW,
        A_MAC,
        0x0800,
        &ipv4_packet(
            [10, 244, 0, 5],
            [10, 244, 0, 6],
            64,
            true,
            1,
            &echo_request(),
        ),
    );
    for i in 0..10_000 {
        let mut frame: Vec<u8> = if i % 2 == 0 {
            let len = rng.usize(0..200);
            (0..len).map(|_| rng.u8(..)).collect()
        } else {
            let mut f = good.clone();
            f.truncate(rng.usize(0..f.len()));
            let flips = rng.usize(0..4);
            for _ in 0..flips {
                if !f.is_empty() {
                    let at = rng.usize(0..f.len());
                    f[at] = rng.u8(..);
                }
            }
            f
        };
        // Half keep a valid source MAC so that deeper stages see them.
        if frame.len() >= 12 && rng.bool() {
            frame[6..12].copy_from_slice(&A_MAC.0);
        }
        let vnet: [u8; 12] = std::array::from_fn(|_| if rng.u8(..) < 20 { rng.u8(..) } else { 0 });
        h.send_from_a(vnet, &frame);
        while let Some(f) = h.a.1.recv() {
            h.a.1.recycle(f);
        }
        while let Some(f) = h.b.1.recv() {
            h.b.1.recycle(f);
        }
    }
    h.send_from_a([0; 12], &good);
    assert!(h.b.1.recv().is_some(), "still forwarding");
}

/// A UDP datagram (header + payload) with a partial checksum, and the virtio-net header a
/// pod's kernel puts before it (NEEDS_CSUM at the UDP checksum).
fn partial_udp(l3_header: u16, sport: u16, payload: &[u8]) -> ([u8; 12], Vec<u8>) {
    let mut udp = Vec::new();
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&5201u16.to_be_bytes());
    udp.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    udp.extend_from_slice(&[0x12, 0x34]); // partial sum: the coalescer rewrites it
    udp.extend_from_slice(payload);
    let csum_start = 14 + l3_header;
    let mut vnet = [0u8; 12];
    vnet[0] = crate::wire::vnet::F_NEEDS_CSUM;
    vnet[6..8].copy_from_slice(&csum_start.to_le_bytes());
    vnet[8..10].copy_from_slice(&6u16.to_le_bytes());
    (vnet, udp)
}

fn v4_udp_frame(sport: u16, payload: &[u8]) -> ([u8; 12], Vec<u8>) {
    let (vnet, udp) = partial_udp(20, sport, payload);
    (
        vnet,
        eth(
            GW,
            A_MAC,
            0x0800,
            &ipv4_packet([10, 244, 0, 5], [10, 244, 0, 6], 64, true, 17, &udp),
        ),
    )
}

#[test]
fn udp_runs_are_coalesced_into_gso_super_frames() {
    let mut h = Harness::with_uso(1500, 1500, true);
    let payloads: Vec<Vec<u8>> = (0..5u8)
        .map(|i| vec![i; if i == 4 { 50 } else { 100 }])
        .collect();
    let frames: Vec<_> = payloads.iter().map(|p| v4_udp_frame(4000, p)).collect();
    h.send_batch_from_a(&frames);
    let out = h.b.1.recv().expect("one super-frame");
    assert!(
        h.b.1.recv().is_none(),
        "merged datagrams are not sent on their own"
    );
    let v = crate::wire::VnetHeader::new_checked(&out[..12]).unwrap();
    assert_eq!(v.gso_type(), crate::wire::vnet::GSO_UDP_L4);
    assert_eq!(v.gso_size(), 100);
    assert_eq!(v.flags(), crate::wire::vnet::F_NEEDS_CSUM);
    assert_eq!((v.csum_start(), v.csum_offset(), v.hdr_len()), (34, 6, 42));
    let ip = Ipv4Packet::new_checked(&out[26..]).unwrap();
    assert!(ip.verify_checksum());
    assert_eq!(ip.total_len(), 20 + 8 + 450);
    assert_eq!(ip.ttl(), 63);
    let udp = ip.payload();
    assert_eq!(u16::from_be_bytes([udp[4], udp[5]]), 458);
    let pseudo = checksum::pseudo_header_v4(ip.src(), ip.dst(), 17, 458);
    assert_eq!(u16::from_be_bytes([udp[6], udp[7]]), checksum::fold(pseudo));
    assert_eq!(&udp[8..], &payloads.concat()[..]);
    assert_eq!(h.pipeline.counters().count(Event::UdpCoalesced), 4);
}

#[test]
fn coalescing_stops_at_another_flow_and_needs_uso() {
    let mut h = Harness::with_uso(1500, 1500, true);
    let frames = vec![
        v4_udp_frame(4000, &[1; 100]),
        v4_udp_frame(4000, &[2; 100]),
        v4_udp_frame(4001, &[3; 100]),
        v4_udp_frame(4000, &[4; 100]),
    ];
    h.send_batch_from_a(&frames);
    let sizes: Vec<usize> = std::iter::from_fn(|| h.b.1.recv())
        .map(|f| f.len())
        .collect();
    assert_eq!(
        sizes,
        vec![12 + 14 + 28 + 200, 12 + 14 + 128, 12 + 14 + 128]
    );

    // Without USO on the egress port nothing is merged.
    let mut h = Harness::with_uso(1500, 1500, false);
    h.send_batch_from_a(&frames[..2]);
    assert_eq!(std::iter::from_fn(|| h.b.1.recv()).count(), 2);
    // Datagrams with a complete checksum are never merged.
    let mut h = Harness::with_uso(1500, 1500, true);
    let complete: Vec<_> = frames[..2]
        .iter()
        .map(|(_, e)| ([0u8; 12], e.clone()))
        .collect();
    h.send_batch_from_a(&complete);
    assert_eq!(std::iter::from_fn(|| h.b.1.recv()).count(), 2);
}

#[test]
fn ipv6_udp_runs_are_coalesced() {
    let mut h = Harness::with_uso(1500, 1500, true);
    let frames: Vec<_> = (0..3u8)
        .map(|i| {
            let (vnet, udp) = partial_udp(40, 4000, &[i; 200]);
            (
                vnet,
                eth(
                    GW,
                    A_MAC,
                    0x86dd,
                    &ipv6_packet("fd00::5", "fd00::6", 64, 17, &udp),
                ),
            )
        })
        .collect();
    h.send_batch_from_a(&frames);
    let out = h.b.1.recv().expect("one super-frame");
    assert!(h.b.1.recv().is_none());
    let ip = Ipv6Packet::new_checked(&out[26..]).unwrap();
    assert_eq!(ip.payload_len(), 8 + 600);
    assert_eq!(ip.hop_limit(), 63);
    let v = crate::wire::VnetHeader::new_checked(&out[..12]).unwrap();
    assert_eq!((v.gso_size(), v.csum_start(), v.hdr_len()), (200, 54, 62));
    let pseudo = checksum::pseudo_header_v6(ip.src(), ip.dst(), 17, 608);
    assert_eq!(
        u16::from_be_bytes([ip.payload()[6], ip.payload()[7]]),
        checksum::fold(pseudo)
    );
}

/// A port with no device behind it, for pipeline tests over hand-built tables.
fn bare_port(id: u32, mac: MacAddr, ips: &[&str], role: PortRole) -> Arc<Port<()>> {
    let ips: Vec<switchyard_api::IpNet> = ips.iter().map(|s| s.parse().unwrap()).collect();
    Arc::new(Port {
        id,
        mac,
        mtu: 1500,
        ipv4: ips
            .iter()
            .filter_map(|n| match n.addr() {
                std::net::IpAddr::V4(a) => Some(a),
                _ => None,
            })
            .collect(),
        ipv6: ips
            .iter()
            .filter_map(|n| match n.addr() {
                std::net::IpAddr::V6(a) => Some(a),
                _ => None,
            })
            .collect(),
        device: (),
        role,
        accepts_udp_gso: false,
        counters: PortCounters::default(),
        info: PortInfo {
            id,
            kind: "none".into(),
            netns: String::new(),
            ifname: format!("p{id}"),
            ifindex: 0,
            mac,
            mtu: 1500,
            ips,
            owner: None,
            pod: None,
            queues: 1,
            port_mappings: Vec::new(),
        },
    })
}

/// Runs one frame (Ethernet) from port `ingress` through the pipeline; returns the verdict
/// and the frame after it (Ethernet).
fn run_bare(tables: &Tables<()>, ingress: u32, frame: Vec<u8>) -> (Verdict, Vec<u8>) {
    let mut pipeline = Pipeline::new();
    let mut bufs = vec![PacketBuf::new()];
    bufs[0].load_ethernet(&frame);
    let mut verdicts = [Verdict::Drop];
    let port = tables.ports[&ingress].clone();
    pipeline.process(tables, &port, &mut bufs, &mut verdicts, 1);
    (verdicts[0], bufs[0].frame()[12..].to_vec())
}

/// Masquerade through the pipeline, sans-IO: a pod port, a host port (the node's stack),
/// a default route to the host and a connection-tracking table, built by hand, with no
/// device behind the ports (the tables take any device type; here `()`).
/// Traces `protocol` to `dst:port` from the pod on port `ingress` (address `src`) over a
/// detached copy of `tables`.
fn trace_from(
    tables: &Tables<()>,
    ingress: u32,
    src: &str,
    dst: &str,
    protocol: u8,
    port: u16,
) -> switchyard_api::TraceReport {
    let probe = trace::Probe {
        src: src.parse().unwrap(),
        dst: dst.parse().unwrap(),
        protocol,
        dst_port: port,
    };
    trace::trace(&tables.detached(), &tables.ports[&ingress], &probe, 0)
}

/// What `stage` decided in `report` (empty when the stage is not listed).
fn decision(report: &switchyard_api::TraceReport, stage: &str) -> String {
    report
        .steps
        .iter()
        .find(|s| s.stage == stage)
        .map(|s| s.decision.clone())
        .unwrap_or_default()
}

mod masquerade_stage {
    use super::*;
    use super::{bare_port as port, run_bare as run};
    use crate::conntrack::Conntrack;
    use crate::tables::builder::{NodePorts, TableBuilder};
    use crate::tables::masquerade::Masquerading;
    use crate::tables::{Gateway, PortRole};
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;
    use std::sync::Arc;
    use switchyard_api::NextHop as ApiNextHop;

    const HOST_MAC: MacAddr = MacAddr([0x0e, 0xee, 0xee, 0, 0, 1]);
    const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
    const EXT: [u8; 4] = [192, 168, 2, 10];

    /// Pod A (port 1, 10.244.0.5), the host port (2) and pod B (port 3, 10.244.0.6), which
    /// publishes its UDP port 53 as the node's 5353.
    fn tables() -> crate::tables::Tables<()> {
        tables_with_mtu_of_b(1500)
    }

    fn tables_with_mtu_of_b(mtu: u32) -> crate::tables::Tables<()> {
        tables_with(mtu, false)
    }

    /// [`tables`], with an uplink (port 4) that is the node's exit when `exit`.
    fn tables_with(mtu: u32, exit: bool) -> crate::tables::Tables<()> {
        let mut b = TableBuilder::new(Gateway::default());
        let pod = port(1, A_MAC, &["10.244.0.5/24"], PortRole::Pod);
        let host = port(2, HOST_MAC, &[], PortRole::Host);
        let uplink = port(4, MacAddr([2, 0, 0, 0, 0, 4]), &[], PortRole::Uplink);
        let mut published = port(3, B_MAC, &["10.244.0.6/24"], PortRole::Pod);
        let port = Arc::get_mut(&mut published).unwrap();
        port.mtu = mtu;
        port.info.port_mappings.push(switchyard_api::PortMapping {
            host_port: 5353,
            container_port: 53,
            protocol: "udp".into(),
            host_ip: String::new(),
        });
        b.insert_port(pod);
        b.insert_port(host.clone());
        b.insert_port(published);
        let mut routes = BTreeMap::new();
        routes.insert("0.0.0.0/0".parse().unwrap(), ApiNextHop::Host);
        routes.insert("192.168.1.10/32".parse().unwrap(), ApiNextHop::Host);
        b.set_cluster(
            routes,
            NodePorts {
                host: Some(host),
                exit: exit.then_some(uplink),
                ..NodePorts::default()
            },
        );
        let ct = Arc::new(Conntrack::new(NODE, (40000, 40099), 100));
        let exempt: Vec<switchyard_api::IpNet> = vec!["10.244.0.0/16".parse().unwrap()];
        b.set_masquerade(Some(Arc::new(Masquerading::new(ct, &exempt))));
        b.build()
    }

    fn udp_datagram(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut udp = Vec::new();
        udp.extend_from_slice(&sport.to_be_bytes());
        udp.extend_from_slice(&dport.to_be_bytes());
        udp.extend_from_slice(&12u16.to_be_bytes());
        udp.extend_from_slice(&[0, 0, b'd', b'n', b's', b'?']);
        let mut p = ipv4_packet(src, dst, 64, true, 17, &udp);
        let pseudo = checksum::pseudo_header_of(&p, 17, 12);
        let sum = checksum::finish(checksum::accumulate(pseudo, &p[20..]));
        p[26..28].copy_from_slice(&sum.to_be_bytes());
        p
    }

    fn valid(l3: &[u8]) -> bool {
        let len = (l3.len() - 20) as u32;
        checksum::checksum(&l3[..20]) == 0
            && checksum::finish(checksum::accumulate(
                checksum::pseudo_header_of(l3, 17, len),
                &l3[20..],
            )) == 0
    }

    #[test]
    fn leaving_the_cluster_takes_the_node_address_and_replies_come_back() {
        let t = tables();
        let out = udp_datagram([10, 244, 0, 5], EXT, 5353, 53);
        let (v, frame) = run(&t, 1, eth(GW, A_MAC, 0x0800, &out));
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        let l3 = &frame[14..];
        assert_eq!(&l3[12..16], &NODE.octets(), "source is the node");
        let port = u16::from_be_bytes([l3[20], l3[21]]);
        assert!((40000..=40099).contains(&port));
        assert!(valid(l3), "checksums after masquerade");
        assert_eq!(&frame[..6], &HOST_MAC.0, "to the node's stack");
        // The reply from outside, as the node's stack hands it to the host port.
        let reply = udp_datagram(EXT, NODE.octets(), 53, port);
        let (v, frame) = run(&t, 2, eth(GW, HOST_MAC, 0x0800, &reply));
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        let l3 = &frame[14..];
        assert_eq!(&l3[16..20], &[10, 244, 0, 5], "back to the pod");
        assert_eq!(u16::from_be_bytes([l3[22], l3[23]]), 5353);
        assert!(valid(l3), "checksums after the reverse translation");
        assert_eq!(&frame[..6], &A_MAC.0);
    }

    #[test]
    fn with_an_exit_what_leaves_as_the_node_leaves_through_it_and_nothing_else_does() {
        let t = tables_with(1500, true);
        let host_port = |v: Verdict| match v {
            Verdict::Leave(nh) | Verdict::Forward(nh) => {
                matches!(t.nexthop(nh), Some(NextHop::Port(p)) if p.id == 2)
            }
            _ => false,
        };
        // Masqueraded: leaves as the node, through the host port when the exit does not
        // know the way.
        let out = udp_datagram([10, 244, 0, 5], EXT, 5353, 53);
        let (v, frame) = run(&t, 1, eth(GW, A_MAC, 0x0800, &out));
        assert!(matches!(v, Verdict::Leave(_)) && host_port(v), "{v:?}");
        let port = u16::from_be_bytes([frame[34], frame[35]]);
        // The reply, as the exit hands it over (from the host port): back to the pod.
        let reply = udp_datagram(EXT, NODE.octets(), 53, port);
        let (v, frame) = run(&t, 2, eth(GW, HOST_MAC, 0x0800, &reply));
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!(&frame[14 + 16..14 + 20], &[10, 244, 0, 5]);
        // A client outside asks pod B's published port; B's answer leaves as node:5353.
        let query = udp_datagram(EXT, NODE.octets(), 40_001, 5353);
        let (v, _) = run(&t, 2, eth(GW, HOST_MAC, 0x0800, &query));
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        let answer = udp_datagram([10, 244, 0, 6], EXT, 53, 40_001);
        let (v, frame) = run(&t, 3, eth(GW, B_MAC, 0x0800, &answer));
        assert!(matches!(v, Verdict::Leave(_)) && host_port(v), "{v:?}");
        assert_eq!(&frame[14 + 12..14 + 16], &NODE.octets());
        assert_eq!(u16::from_be_bytes([frame[34], frame[35]]), 5353);
        // Not masqueraded (an exempt destination): the pod's own address, through the
        // node's stack as before.
        let exempt = udp_datagram([10, 244, 0, 5], [10, 244, 9, 9], 5353, 53);
        let (v, _) = run(&t, 1, eth(GW, A_MAC, 0x0800, &exempt));
        assert!(matches!(v, Verdict::Forward(_)) && host_port(v), "{v:?}");
        // Without an exit, a masqueraded packet is an ordinary forward.
        let (v, _) = run(&tables(), 1, eth(GW, A_MAC, 0x0800, &out));
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
    }

    #[test]
    fn a_trace_shows_routed_masqueraded_and_dropped_packets_and_opens_no_flow() {
        let t = tables();
        let out = trace_from(&t, 1, "10.244.0.5", "192.168.2.10", 6, 80);
        assert_eq!(out.verdict, "forwarded", "{out:#?}");
        assert_eq!(out.packet, "tcp 10.244.0.5:40000 -> 192.168.2.10:80");
        assert!(
            decision(&out, "route").contains("via the node's host port"),
            "{out:#?}"
        );
        assert!(
            decision(&out, "masquerade").contains("becomes 192.168.1.10:4"),
            "{out:#?}"
        );
        assert!(
            decision(&out, "egress").contains("TTL 64 -> 63"),
            "{out:#?}"
        );
        let ping = trace_from(&t, 1, "10.244.0.5", "192.168.2.10", 1, 0);
        assert!(
            decision(&ping, "masquerade").contains("becomes"),
            "{ping:#?}"
        );
        assert!(
            t.masquerade.as_ref().unwrap().conntrack.is_empty(),
            "the live table opened no flow"
        );
        let inside = trace_from(&t, 1, "10.244.0.5", "10.244.0.6", 17, 53);
        assert_eq!(inside.verdict, "forwarded", "{inside:#?}");
        assert!(
            decision(&inside, "route").contains("10.244.0.6 via port 3"),
            "{inside:#?}"
        );
        assert_eq!(
            decision(&inside, "masquerade"),
            "",
            "a pod's packet to a pod"
        );
        assert!(
            decision(&inside, "egress").contains("MTU 1500"),
            "{inside:#?}"
        );
        let dropped = trace_from(&t, 1, "10.244.0.5", "127.0.0.1", 6, 80);
        assert_eq!(dropped.verdict, "dropped");
        assert!(
            decision(&dropped, "verdict").contains("martian_destination"),
            "{dropped:#?}"
        );
    }

    #[test]
    fn traffic_inside_the_cluster_and_strangers_are_not_translated() {
        let t = tables();
        // To another pod's network: exempt, routed to the host untouched (no peer route).
        let inside = udp_datagram([10, 244, 0, 5], [10, 244, 1, 7], 5353, 53);
        let (_, frame) = run(&t, 1, eth(GW, A_MAC, 0x0800, &inside));
        assert_eq!(&frame[14 + 12..14 + 16], &[10, 244, 0, 5]);
        // A packet for the node that no flow knows goes back to the node's stack as it was.
        let stranger = udp_datagram(EXT, NODE.octets(), 53, 40050);
        let (v, frame) = run(&t, 2, eth(GW, HOST_MAC, 0x0800, &stranger));
        assert!(matches!(v, Verdict::Forward(_)));
        assert_eq!(&frame[14 + 16..14 + 20], &NODE.octets());
        assert_eq!(&frame[..6], &HOST_MAC.0);
    }

    #[test]
    fn a_pod_reaches_a_published_port_of_its_node_and_the_answer_comes_from_it() {
        let t = tables();
        let ask = udp_datagram([10, 244, 0, 5], NODE.octets(), 40123, 5353);
        let (v, frame) = run(&t, 1, eth(GW, A_MAC, 0x0800, &ask));
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!(&frame[..6], &B_MAC.0, "to the publishing pod");
        let l3 = &frame[14..];
        assert_eq!(&l3[12..16], &[10, 244, 0, 5], "the client is kept");
        assert_eq!(&l3[16..20], &[10, 244, 0, 6]);
        assert_eq!(u16::from_be_bytes([l3[22], l3[23]]), 53);
        assert!(valid(l3));
        // B's answer leaves as node:5353, to A.
        let answer = udp_datagram([10, 244, 0, 6], [10, 244, 0, 5], 53, 40123);
        let (v, frame) = run(&t, 3, eth(GW, B_MAC, 0x0800, &answer));
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!(&frame[..6], &A_MAC.0);
        let l3 = &frame[14..];
        assert_eq!(&l3[12..16], &NODE.octets(), "from the node's address");
        assert_eq!(u16::from_be_bytes([l3[20], l3[21]]), 5353);
        assert!(valid(l3));
        // B's other traffic from port 53 (no such flow) and to unpublished node ports
        // (the node's own services) pass untouched.
        let other = udp_datagram([10, 244, 0, 6], [10, 244, 0, 5], 53, 40999);
        let (_, frame) = run(&t, 3, eth(GW, B_MAC, 0x0800, &other));
        assert_eq!(&frame[14 + 12..14 + 16], &[10, 244, 0, 6]);
        let to_node = udp_datagram([10, 244, 0, 5], NODE.octets(), 40123, 53);
        let (_, frame) = run(&t, 1, eth(GW, A_MAC, 0x0800, &to_node));
        assert_eq!(&frame[..6], &HOST_MAC.0, "to the node's stack");
        assert_eq!(&frame[14 + 16..14 + 20], &NODE.octets());
    }

    #[test]
    fn a_pod_reaching_its_own_published_port_sees_the_node_as_client() {
        let t = tables();
        let ask = udp_datagram([10, 244, 0, 6], NODE.octets(), 40555, 5353);
        let (v, frame) = run(&t, 3, eth(GW, B_MAC, 0x0800, &ask));
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!(&frame[..6], &B_MAC.0, "back to the pod itself");
        let l3 = &frame[14..];
        assert_eq!(&l3[12..16], &NODE.octets(), "not its own address");
        assert_eq!(u16::from_be_bytes([l3[20], l3[21]]), 40555);
        assert_eq!(&l3[16..20], &[10, 244, 0, 6]);
        assert_eq!(u16::from_be_bytes([l3[22], l3[23]]), 53);
        assert!(valid(l3));
        let answer = udp_datagram([10, 244, 0, 6], NODE.octets(), 53, 40555);
        let (v, frame) = run(&t, 3, eth(GW, B_MAC, 0x0800, &answer));
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!(&frame[..6], &B_MAC.0);
        let l3 = &frame[14..];
        assert_eq!(&l3[12..16], &NODE.octets());
        assert_eq!(u16::from_be_bytes([l3[20], l3[21]]), 5353, "from node:5353");
        assert_eq!(&l3[16..20], &[10, 244, 0, 6], "to the pod");
        assert_eq!(u16::from_be_bytes([l3[22], l3[23]]), 40555);
        assert!(valid(l3));
    }

    #[test]
    fn an_icmp_error_about_a_translated_packet_quotes_it_as_sent() {
        // The publishing pod's link is narrower than the client's.
        let t = tables_with_mtu_of_b(1280);
        let mut udp = Vec::new();
        udp.extend_from_slice(&40123u16.to_be_bytes());
        udp.extend_from_slice(&5353u16.to_be_bytes());
        udp.extend_from_slice(&1388u16.to_be_bytes());
        udp.extend_from_slice(&[0, 0]);
        udp.resize(1388, 7);
        let big = ipv4_packet([10, 244, 0, 5], NODE.octets(), 64, true, 17, &udp);
        let (v, frame) = run(&t, 1, eth(GW, A_MAC, 0x0800, &big));
        assert_eq!(
            v,
            Verdict::Reply,
            "fragmentation needed, back to the client"
        );
        let l3 = &frame[14..];
        assert_eq!((l3[20], l3[21]), (3, 4), "ICMP fragmentation needed");
        let quote = &l3[28..];
        assert_eq!(&quote[12..16], &[10, 244, 0, 5]);
        assert_eq!(
            &quote[16..20],
            &NODE.octets(),
            "the node, as the client sent it"
        );
        assert_eq!(u16::from_be_bytes([quote[22], quote[23]]), 5353);
    }
}

/// Services through the pipeline, sans-IO: pods A and B on device-free ports, Services
/// compiled as the control process pushes them.
mod service_stage {
    use super::*;
    use crate::tables::builder::TableBuilder;
    use crate::tables::maglev::DEFAULT_MAX_SIZE;
    use crate::tables::services::ServiceTable;
    use crate::tables::Gateway;
    use std::net::IpAddr;
    use switchyard_api::{Endpoint, ServicePort, ServiceSpec};

    const A: &str = "10.244.0.5";
    const B: &str = "10.244.0.6";
    const A6: &str = "fd00::5";
    const B6: &str = "fd00::6";

    fn service(
        name: &str,
        vips: &[&str],
        endpoints: &[&str],
        affinity: Option<u32>,
    ) -> ServiceSpec {
        ServiceSpec {
            namespace: "default".into(),
            name: name.into(),
            kind: "ClusterIP".into(),
            cluster_ips: vips.iter().map(|v| v.parse().unwrap()).collect(),
            external_ips: Vec::new(),
            ports: ["TCP", "UDP"]
                .into_iter()
                .map(|protocol| ServicePort {
                    name: protocol.to_lowercase(),
                    protocol: protocol.into(),
                    port: 80,
                    node_port: None,
                    endpoints: endpoints
                        .iter()
                        .map(|e| Endpoint {
                            address: e.parse().unwrap(),
                            port: 8080,
                            local: true,
                        })
                        .collect(),
                })
                .collect(),
            affinity_timeout_s: affinity,
            external_local: false,
            internal_local: false,
        }
    }

    /// web (10.96.0.10, fd00:96::10) -> B; empty (10.96.0.11) -> nothing; own
    /// (10.96.0.12) -> A; sticky (10.96.0.13, affinity) -> A, B and two pods elsewhere.
    pub(super) fn tables() -> Tables<()> {
        let mut b = TableBuilder::new(Gateway::default());
        b.insert_port(bare_port(
            1,
            A_MAC,
            &["10.244.0.5/24", "fd00::5/64"],
            PortRole::Pod,
        ));
        b.insert_port(bare_port(
            3,
            B_MAC,
            &["10.244.0.6/24", "fd00::6/64"],
            PortRole::Pod,
        ));
        let specs = [
            service("web", &["10.96.0.10", "fd00:96::10"], &[B, B6], None),
            service("empty", &["10.96.0.11"], &[], None),
            service("own", &["10.96.0.12"], &[A], None),
            service(
                "sticky",
                &["10.96.0.13"],
                &[A, B, "10.244.0.7", "10.244.0.8"],
                Some(60),
            ),
        ];
        b.set_services(Arc::new(ServiceTable::build(
            &specs,
            DEFAULT_MAX_SIZE,
            &Default::default(),
        )));
        b.build()
    }

    /// A TCP segment (20-byte header, flags, "hi") with a complete checksum.
    pub(super) fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&dport.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = flags;
        t.extend_from_slice(b"hi");
        let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
        let mut l3 = match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => ipv4_packet(s.octets(), d.octets(), 64, true, 6, &t),
            _ => ipv6_packet(&src.to_string(), &dst.to_string(), 64, 6, &t),
        };
        let at = if src.is_ipv4() { 20 } else { 40 };
        let sum = checksum::finish(checksum::accumulate(
            checksum::pseudo_header_of(&l3, 6, t.len() as u32),
            &l3[at..],
        ));
        l3[at + 16..at + 18].copy_from_slice(&sum.to_be_bytes());
        l3
    }

    /// Source, source port, destination, destination port of the IP packet after the
    /// Ethernet header of `frame`, and whether its checksums verify.
    fn seen(frame: &[u8]) -> (IpAddr, u16, IpAddr, u16, bool) {
        let l3 = &frame[14..];
        let (src, dst, at): (IpAddr, IpAddr, usize) = if l3[0] >> 4 == 4 {
            let ip = Ipv4Packet::new_checked(l3).unwrap();
            (ip.src().into(), ip.dst().into(), 20)
        } else {
            let ip = Ipv6Packet::new_checked(l3).unwrap();
            (ip.src().into(), ip.dst().into(), 40)
        };
        let port = |i: usize| u16::from_be_bytes([l3[at + i], l3[at + i + 1]]);
        let l4_ok = checksum::finish(checksum::accumulate(
            checksum::pseudo_header_of(l3, 6, (l3.len() - at) as u32),
            &l3[at..],
        )) == 0;
        let ip_ok = at == 40 || checksum::checksum(&l3[..20]) == 0;
        (src, port(0), dst, port(2), l4_ok && ip_ok)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ethertype(l3: &[u8]) -> u16 {
        if l3[0] >> 4 == 4 {
            0x0800
        } else {
            0x86dd
        }
    }

    fn from_a(t: &Tables<()>, l3: Vec<u8>) -> (Verdict, Vec<u8>) {
        run_bare(t, 1, eth(GW, A_MAC, ethertype(&l3), &l3))
    }

    fn from_b(t: &Tables<()>, l3: Vec<u8>) -> (Verdict, Vec<u8>) {
        run_bare(t, 3, eth(GW, B_MAC, ethertype(&l3), &l3))
    }

    #[test]
    fn a_pod_reaches_its_backend_through_the_cluster_ip_and_the_reply_comes_from_it() {
        for (a, b, vip) in [(A, B, "10.96.0.10"), (A6, B6, "fd00:96::10")] {
            let t = tables();
            let (v, out) = from_a(&t, tcp(a, 40000, vip, 80, 0x02));
            assert!(matches!(v, Verdict::Forward(_)), "{v:?} for {vip}");
            assert_eq!(&out[..6], &B_MAC.0, "to pod B");
            assert_eq!(seen(&out), (ip(a), 40000, ip(b), 8080, true), "client kept");
            let (v, out) = from_b(&t, tcp(b, 8080, a, 40000, 0x12));
            assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
            assert_eq!(&out[..6], &A_MAC.0);
            assert_eq!(
                seen(&out),
                (ip(vip), 80, ip(a), 40000, true),
                "from the cluster IP"
            );
            assert_eq!(t.service_flows.len(), 1);
        }
    }

    #[test]
    fn a_trace_shows_the_backend_a_service_gives_and_the_refusal_of_an_empty_one() {
        let t = tables();
        let to_web = trace_from(&t, 1, A, "10.96.0.10", 6, 80);
        assert_eq!(to_web.verdict, "forwarded", "{to_web:#?}");
        assert!(
            decision(&to_web, "service")
                .contains("10.96.0.10:80 is a Service frontend: backend 10.244.0.6:8080"),
            "{to_web:#?}"
        );
        assert!(t.service_flows.is_empty(), "the live table opened no flow");
        let empty = trace_from(&t, 1, A, "10.96.0.11", 6, 80);
        assert_eq!(empty.verdict, "answered", "{empty:#?}");
        assert!(
            decision(&empty, "reply").contains("type 3 code 3 (port unreachable)"),
            "{empty:#?}"
        );
        assert!(decision(&empty, "verdict").contains("service_no_endpoints"));
    }

    #[test]
    fn a_service_without_endpoints_refuses_at_once() {
        let t = tables();
        let (v, out) = from_a(&t, tcp(A, 40000, "10.96.0.11", 80, 0x02));
        assert_eq!(v, Verdict::Reply);
        let l3 = &out[14..];
        assert_eq!(l3[9], 1, "ICMP");
        assert_eq!((l3[20], l3[21]), (3, 3), "port unreachable");
        assert_eq!(&l3[16..20], &[10, 244, 0, 5], "to the client");
        assert_eq!(
            &l3[28 + 16..28 + 20],
            &[10, 96, 0, 11],
            "quoting what it sent"
        );
        assert!(t.service_flows.is_empty());
    }

    #[test]
    fn a_pod_reaching_itself_through_its_service_sees_the_cluster_ip_as_client() {
        let t = tables();
        let (v, out) = from_a(&t, tcp(A, 40000, "10.96.0.12", 80, 0x02));
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!(&out[..6], &A_MAC.0, "back to A");
        assert_eq!(seen(&out), (ip("10.96.0.12"), 40000, ip(A), 8080, true));
        let (v, out) = from_a(&t, tcp(A, 8080, "10.96.0.12", 40000, 0x12));
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!(seen(&out), (ip("10.96.0.12"), 80, ip(A), 40000, true));
    }

    #[test]
    fn client_ip_affinity_keeps_one_backend_for_every_connection() {
        let t = tables();
        let backends: Vec<IpAddr> = (0..15)
            .map(|k| {
                let (v, out) = from_a(&t, tcp(A, 41000 + k, "10.96.0.13", 80, 0x02));
                assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
                seen(&out).2
            })
            .collect();
        assert!(backends.iter().all(|b| *b == backends[0]), "{backends:?}");
        assert_eq!(t.service_flows.len(), 15);
    }

    #[test]
    fn traffic_to_pods_and_unknown_ports_is_not_translated() {
        let t = tables();
        let (v, out) = from_a(&t, tcp(A, 40000, B, 80, 0x02));
        assert!(matches!(v, Verdict::Forward(_)));
        assert_eq!(seen(&out), (ip(A), 40000, ip(B), 80, true));
        // B answering from 8080 to a client that never used a Service: left alone.
        let (_, out) = from_b(&t, tcp(B, 8080, A, 40001, 0x12));
        assert_eq!(seen(&out), (ip(B), 8080, ip(A), 40001, true));
        assert!(t.service_flows.is_empty());
    }

    const NODE: &str = "192.168.1.10";
    const PEER: &str = "192.168.1.11";
    const EXT: &str = "192.168.2.10";
    const HOST_MAC: MacAddr = MacAddr([0x0e, 0xee, 0xee, 0, 0, 1]);

    /// Pods A and B, the host port (2) with the default route, masquerade, and NodePort
    /// Services on
    /// node 192.168.1.10 (peer 192.168.1.11): web (30080, Cluster) -> B; local (30081,
    /// externalTrafficPolicy Local) -> a pod on the peer only.
    fn node_port_tables() -> Tables<()> {
        use crate::tables::builder::NodePorts;
        use crate::tables::services::NodeAddresses;
        use switchyard_api::NextHop as ApiNextHop;
        let mut b = TableBuilder::new(Gateway::default());
        b.insert_port(bare_port(1, A_MAC, &["10.244.0.5/24"], PortRole::Pod));
        b.insert_port(bare_port(3, B_MAC, &["10.244.0.6/24"], PortRole::Pod));
        let host = bare_port(2, HOST_MAC, &[], PortRole::Host);
        b.insert_port(host.clone());
        let mut routes = std::collections::BTreeMap::new();
        routes.insert("0.0.0.0/0".parse().unwrap(), ApiNextHop::Host);
        b.set_cluster(
            routes,
            NodePorts {
                host: Some(host),
                ..NodePorts::default()
            },
        );
        let mut web = service("web", &["10.96.0.10"], &[B], None);
        web.ports[0].node_port = Some(30080);
        let mut local = service("local", &["10.96.0.11"], &["10.244.1.9"], None);
        local.ports[0].node_port = Some(30081);
        local.ports[0].endpoints[0].local = false;
        local.external_local = true;
        let nodes = NodeAddresses {
            all: vec![ip(NODE), ip(PEER)],
            own_v4: Some(ip(NODE)),
            own_v6: None,
        };
        b.set_services(Arc::new(ServiceTable::build(
            &[web, local],
            DEFAULT_MAX_SIZE,
            &nodes,
        )));
        // Masquerade on, as on every node: a Service's packets must not get it too.
        let ct = Arc::new(crate::conntrack::Conntrack::new(
            NODE.parse().unwrap(),
            (40000, 40099),
            100,
        ));
        let exempt: Vec<switchyard_api::IpNet> = vec!["10.244.0.0/16".parse().unwrap()];
        b.set_masquerade(Some(Arc::new(
            crate::tables::masquerade::Masquerading::new(ct, &exempt),
        )));
        b.build()
    }

    fn from_host(t: &Tables<()>, l3: Vec<u8>) -> (Verdict, Vec<u8>) {
        run_bare(t, 2, eth(GW, HOST_MAC, 0x0800, &l3))
    }

    #[test]
    fn a_client_outside_reaches_a_node_port_and_the_backend_sees_the_node() {
        let t = node_port_tables();
        let (v, out) = from_host(&t, tcp(EXT, 50000, NODE, 30080, 0x02));
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!(&out[..6], &B_MAC.0);
        assert_eq!(
            seen(&out),
            (ip(NODE), 50000, ip(B), 8080, true),
            "shown as the node"
        );
        let (v, out) = from_b(&t, tcp(B, 8080, NODE, 50000, 0x12));
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!(&out[..6], &HOST_MAC.0, "back out through the node");
        assert_eq!(
            seen(&out),
            (ip(NODE), 30080, ip(EXT), 50000, true),
            "from the node port, not masqueraded again"
        );
    }

    #[test]
    fn pods_reach_a_node_port_on_any_node_and_keep_their_address() {
        let t = node_port_tables();
        for (sport, node) in [(40000, NODE), (40001, PEER)] {
            let (v, out) = from_a(&t, tcp(A, sport, node, 30080, 0x02));
            assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
            assert_eq!(seen(&out), (ip(A), sport, ip(B), 8080, true), "via {node}");
        }
    }

    #[test]
    fn external_traffic_policy_local_drops_where_no_endpoint_runs() {
        let t = node_port_tables();
        let (v, _) = from_host(&t, tcp(EXT, 50001, NODE, 30081, 0x02));
        assert_eq!(v, Verdict::Drop, "no endpoint on this node");
        // Pods are not external clients: they reach the remote endpoint.
        let (v, out) = from_a(&t, tcp(A, 40001, NODE, 30081, 0x02));
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        assert_eq!(seen(&out).2, ip("10.244.1.9"));
    }

    #[test]
    fn a_backends_port_unreachable_reaches_the_client_from_the_cluster_ip() {
        let t = tables();
        // A's UDP datagram to web's cluster IP goes to B:8080 ...
        let mut udp = vec![0x9c, 0x40, 0, 80, 0, 10, 0, 0, b'h', b'i'];
        let sum = {
            let p = ipv4_packet([10, 244, 0, 5], [10, 96, 0, 10], 64, true, 17, &udp);
            checksum::finish(checksum::accumulate(
                checksum::pseudo_header_of(&p, 17, 10),
                &p[20..],
            ))
        };
        udp[6..8].copy_from_slice(&sum.to_be_bytes());
        let sent = ipv4_packet([10, 244, 0, 5], [10, 96, 0, 10], 64, true, 17, &udp);
        let (v, out) = from_a(&t, sent);
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        // ... where nothing listens: B's kernel quotes what it got.
        let got = out[14..].to_vec();
        let mut icmp = vec![3, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&got);
        let sum = checksum::checksum(&icmp);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        let error = ipv4_packet([10, 244, 0, 6], [10, 244, 0, 5], 64, false, 1, &icmp);
        let (v, out) = from_b(&t, error);
        assert!(matches!(v, Verdict::Forward(_)), "{v:?}");
        let l3 = &out[14..];
        assert_eq!(&l3[12..16], &[10, 96, 0, 10], "from the cluster IP");
        assert_eq!(checksum::checksum(&l3[20..]), 0, "ICMP checksum");
        let quote = &l3[28..];
        assert_eq!(&quote[16..20], &[10, 96, 0, 10], "the quote as A sent it");
        assert_eq!(&quote[22..24], &80u16.to_be_bytes());
        assert_eq!(checksum::checksum(&quote[..20]), 0);
    }
}

/// NetworkPolicy through the pipeline, sans-IO: pods A (port 1) and B (port 3), the host
/// port (2), and the Services of the Service stage's tests.
mod policy_stage {
    use super::service_stage::tcp;
    use super::*;
    use crate::tables::builder::{NodePorts, TableBuilder};
    use crate::tables::policy::PolicyTable;
    use crate::tables::Gateway;
    use crate::wire::tcp::{FLAG_ACK, FLAG_SYN};
    use std::collections::BTreeMap;
    use switchyard_api::{
        NextHop as ApiNextHop, PodPolicy, PolicyDirection, PolicyPeer, PolicyPort, PolicyRule,
        PolicySet,
    };

    const HOST_MAC: MacAddr = MacAddr([0x0e, 0xee, 0xee, 0, 0, 1]);
    const NODE: &str = "192.168.1.10";

    /// A rule from `peer` (any when none) on TCP `port` (any when none).
    fn rule(origin: &str, peer: Option<&str>, port: Option<u16>) -> PolicyRule {
        PolicyRule {
            origin: origin.into(),
            peers: peer
                .map(|p| PolicyPeer {
                    cidr: p.parse().unwrap(),
                    except: Vec::new(),
                })
                .into_iter()
                .collect(),
            ports: port
                .map(|port| PolicyPort {
                    protocol: 6,
                    port,
                    end_port: None,
                })
                .into_iter()
                .collect(),
        }
    }

    /// Pod `name` at `addr` with ingress and egress rules (indexes into `rules`; none:
    /// open).
    fn pod(
        name: &str,
        addrs: &[&str],
        ingress: Option<Vec<u32>>,
        egress: Option<Vec<u32>>,
    ) -> PodPolicy {
        let direction = |rules: Option<Vec<u32>>| {
            rules.map(|rules| PolicyDirection {
                policies: vec![format!("default/{name}-policy")],
                rules,
            })
        };
        PodPolicy {
            namespace: "default".into(),
            name: name.into(),
            addresses: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            ingress: direction(ingress),
            egress: direction(egress),
        }
    }

    /// The Service stage's tables (A, B and Services), the host port with a route to the
    /// node, and `set` compiled as `generation`.
    fn tables(set: &PolicySet, generation: u64) -> Tables<()> {
        let mut b = TableBuilder::new(Gateway::default());
        let base = super::service_stage::tables();
        for port in base.ports.values() {
            b.insert_port(port.clone());
        }
        let host = bare_port(2, HOST_MAC, &[], PortRole::Host);
        b.insert_port(host.clone());
        let mut routes = BTreeMap::new();
        routes.insert(format!("{NODE}/32").parse().unwrap(), ApiNextHop::Host);
        b.set_cluster(
            routes,
            NodePorts {
                host: Some(host),
                ..NodePorts::default()
            },
        );
        b.set_services(base.services.clone());
        b.set_policy(Arc::new(PolicyTable::compile(
            set,
            generation,
            vec![NODE.parse().unwrap()],
        )));
        let mut t = b.build();
        // One flow table across rule changes, as the dataplane keeps it.
        t.policy_flows = FLOWS.with(|f| f.clone());
        t
    }

    thread_local! {
        static FLOWS: Arc<crate::conntrack::policy::PolicyFlows> =
            Arc::new(crate::conntrack::policy::PolicyFlows::new(1000));
    }

    fn send(t: &Tables<()>, from: u32, l3: &[u8]) -> (Verdict, Vec<u8>) {
        let (mac, ethertype) = match from {
            1 => (A_MAC, 0x0800),
            3 => (B_MAC, 0x0800),
            _ => (HOST_MAC, 0x0800),
        };
        let ethertype = if l3[0] >> 4 == 6 { 0x86dd } else { ethertype };
        run_bare(t, from, eth(GW, mac, ethertype, l3))
    }

    fn forwarded(v: Verdict) -> bool {
        matches!(v, Verdict::Forward(_))
    }

    /// B admits A on TCP 80 only, and denies all its own egress.
    fn b_admits_a_on_80() -> PolicySet {
        PolicySet {
            rules: vec![rule(
                "default/b-policy ingress rule 0",
                Some("10.244.0.5/32"),
                Some(80),
            )],
            pods: vec![pod("b", &["10.244.0.6"], Some(vec![0]), Some(vec![]))],
        }
    }

    #[test]
    fn only_the_selected_pods_ports_are_marked_for_the_policy_stage() {
        let t = tables(&b_admits_a_on_80(), 1);
        assert!(t.selected_ports.contains(3), "B is selected");
        assert!(!t.selected_ports.contains(1), "A is selected by nothing");
        assert!(!t.selected_ports.contains(2), "the host port is no pod");
        let none = tables(&PolicySet::default(), 2);
        assert_eq!(none.selected_ports, Default::default());
    }

    #[test]
    fn a_trace_names_the_policy_that_stops_a_packet() {
        let t = tables(&b_admits_a_on_80(), 1);
        let admitted = trace_from(&t, 1, "10.244.0.5", "10.244.0.6", 6, 80);
        assert_eq!(admitted.verdict, "forwarded", "{admitted:#?}");
        assert_eq!(decision(&admitted, "policy"), "allowed");
        let denied = trace_from(&t, 1, "10.244.0.5", "10.244.0.6", 6, 81);
        assert_eq!(denied.verdict, "dropped", "{denied:#?}");
        assert_eq!(
            decision(&denied, "policy"),
            "denied by the destination pod's ingress rules"
        );
        let outbound = trace_from(&t, 3, "10.244.0.6", "10.244.0.5", 6, 80);
        assert_eq!(
            decision(&outbound, "policy"),
            "denied by the sending pod's egress rules",
            "{outbound:#?}"
        );
        assert!(t.policy_flows.denied().is_empty(), "nothing recorded live");
    }

    #[test]
    fn ingress_rules_admit_their_peer_and_port_and_replies_pass() {
        let t = tables(&b_admits_a_on_80(), 1);
        let (v, _) = send(&t, 1, &tcp("10.244.0.5", 40000, "10.244.0.6", 80, FLAG_SYN));
        assert!(forwarded(v), "allowed: {v:?}");
        let (v, _) = send(
            &t,
            3,
            &tcp("10.244.0.6", 80, "10.244.0.5", 40000, FLAG_SYN | FLAG_ACK),
        );
        assert!(forwarded(v), "the reply passes B's egress deny: {v:?}");
        let (v, _) = send(&t, 1, &tcp("10.244.0.5", 40001, "10.244.0.6", 81, FLAG_SYN));
        assert_eq!(v, Verdict::Drop, "port 81 is not admitted");
        let (v, _) = send(&t, 3, &tcp("10.244.0.6", 40002, "10.244.0.5", 80, FLAG_SYN));
        assert_eq!(v, Verdict::Drop, "B opens nothing");
        let denied = t.policy_flows.denied();
        let last = &denied[denied.len() - 2..];
        assert_eq!((last[0].denial.ingress, last[0].flow.dst_port), (true, 81));
        assert_eq!(
            (last[1].denial.ingress, &*last[1].denial.pod),
            (false, "default/b")
        );
        assert_eq!(&*last[1].denial.policies, ["default/b-policy".to_string()]);
        // IPv6 addresses of B are not selected here: open.
        let (v, _) = send(&t, 1, &tcp("fd00::5", 40000, "fd00::6", 81, FLAG_SYN));
        assert!(forwarded(v));
    }

    #[test]
    fn drops_are_counted_by_direction() {
        let set = PolicySet {
            rules: vec![],
            pods: vec![pod("a", &["10.244.0.5"], None, Some(vec![]))],
        };
        let t = tables(&set, 1);
        let mut pipeline = Pipeline::new();
        let mut bufs = vec![PacketBuf::new()];
        bufs[0].load_ethernet(&eth(
            GW,
            A_MAC,
            0x0800,
            &tcp("10.244.0.5", 1, "10.244.0.6", 80, FLAG_SYN),
        ));
        let mut verdicts = [Verdict::Drop];
        pipeline.process(&t, &t.ports[&1].clone(), &mut bufs, &mut verdicts, 1);
        assert_eq!(
            pipeline.counters().dropped(DropReason::PolicyDeniedEgress),
            1
        );
        assert_eq!(
            pipeline.counters().dropped(DropReason::PolicyDeniedIngress),
            0
        );
    }

    #[test]
    fn the_node_always_reaches_its_pods_and_they_it() {
        let set = PolicySet {
            rules: vec![],
            pods: vec![pod("a", &["10.244.0.5"], Some(vec![]), Some(vec![]))],
        };
        let t = tables(&set, 1);
        let (v, _) = send(&t, 2, &tcp(NODE, 50000, "10.244.0.5", 80, FLAG_SYN));
        assert!(forwarded(v), "node to pod: {v:?}");
        let (v, _) = send(&t, 1, &tcp("10.244.0.5", 80, NODE, 50001, FLAG_SYN));
        assert!(forwarded(v), "pod to node: {v:?}");
        let (v, _) = send(&t, 1, &tcp("10.244.0.5", 80, "10.244.0.6", 50001, FLAG_SYN));
        assert_eq!(v, Verdict::Drop, "but not to another pod");
    }

    #[test]
    fn a_rule_change_stops_an_established_flow_in_both_directions() {
        let open = PolicySet {
            rules: vec![rule("default/b-policy ingress rule 0", None, Some(80))],
            pods: vec![pod("b", &["10.244.0.6"], Some(vec![0]), None)],
        };
        let t1 = tables(&open, 10);
        let syn = tcp("10.244.0.5", 41000, "10.244.0.6", 80, FLAG_SYN);
        assert!(forwarded(send(&t1, 1, &syn).0));
        let answer = tcp("10.244.0.6", 80, "10.244.0.5", 41000, FLAG_ACK);
        assert!(forwarded(send(&t1, 3, &answer).0));
        let closed = PolicySet {
            rules: vec![],
            pods: open.pods.clone(),
        };
        let t2 = tables(&closed, 11);
        assert_eq!(
            send(&t2, 3, &answer).0,
            Verdict::Drop,
            "the server's side stops"
        );
        let more = tcp("10.244.0.5", 41000, "10.244.0.6", 80, FLAG_ACK);
        assert_eq!(send(&t2, 1, &more).0, Verdict::Drop, "and the client's");
        // Back open: the flow goes on.
        let t3 = tables(&open, 12);
        assert!(forwarded(send(&t3, 1, &more).0));
    }

    #[test]
    fn a_workers_cached_verdict_follows_rule_changes_and_takes_no_shared_lookup() {
        let open = PolicySet {
            rules: vec![rule("default/b-policy ingress rule 0", None, Some(80))],
            pods: vec![pod("b", &["10.244.0.6"], Some(vec![0]), None)],
        };
        let mut pipeline = Pipeline::new();
        let mut run = |t: &Tables<()>, from: u32, l3: &[u8], now: u64| {
            let mac = if from == 1 { A_MAC } else { B_MAC };
            let mut bufs = vec![PacketBuf::new()];
            bufs[0].load_ethernet(&eth(GW, mac, 0x0800, l3));
            let mut verdicts = [Verdict::Drop];
            pipeline.process(t, &t.ports[&from].clone(), &mut bufs, &mut verdicts, now);
            verdicts[0]
        };
        let t1 = tables(&open, 40);
        let syn = tcp("10.244.0.5", 44000, "10.244.0.6", 80, FLAG_SYN);
        assert!(forwarded(run(&t1, 1, &syn, 1)));
        let data = tcp("10.244.0.5", 44000, "10.244.0.6", 80, FLAG_ACK);
        assert!(forwarded(run(&t1, 1, &data, 2)));
        // The shared verdict is gone (swept), but this worker's cache still knows it,
        // for up to a second.
        t1.policy_flows.sweep(u64::MAX);
        assert!(forwarded(run(&t1, 1, &data, 3)));
        assert!(
            t1.policy_flows.is_empty(),
            "answered from the cache, no shared lookup"
        );
        // A second later the shared table is asked again: the flow is decided afresh.
        let reply = tcp("10.244.0.6", 80, "10.244.0.5", 44000, FLAG_ACK);
        assert!(forwarded(run(&t1, 3, &reply, 2_000_000_000)));
        assert!(t1
            .policy_flows
            .state(&crate::conntrack::key::FlowKey {
                protocol: 6,
                src: "10.244.0.5".parse().unwrap(),
                src_port: 44000,
                dst: "10.244.0.6".parse().unwrap(),
                dst_port: 80,
            })
            .is_some());
        // New rules: the cache does not answer for them.
        let closed = PolicySet {
            rules: vec![],
            pods: open.pods.clone(),
        };
        let t2 = tables(&closed, 41);
        assert_eq!(run(&t2, 1, &data, 2_000_000_001), Verdict::Drop);
        assert_eq!(run(&t2, 3, &reply, 2_000_000_002), Verdict::Drop);
    }

    #[test]
    fn in_one_batch_a_denied_flow_stays_denied_between_packets_of_an_allowed_one() {
        let t = tables(&b_admits_a_on_80(), 42);
        let allowed = tcp("10.244.0.5", 45000, "10.244.0.6", 80, FLAG_ACK);
        let denied = tcp("10.244.0.5", 45000, "10.244.0.6", 81, FLAG_ACK);
        let batch = [&allowed, &allowed, &denied, &allowed, &denied, &denied];
        let mut bufs: Vec<PacketBuf> = batch
            .iter()
            .map(|l3| {
                let mut buf = PacketBuf::new();
                buf.load_ethernet(&eth(GW, A_MAC, 0x0800, l3));
                buf
            })
            .collect();
        let mut verdicts = [Verdict::Drop; 6];
        let mut pipeline = Pipeline::new();
        pipeline.process(&t, &t.ports[&1].clone(), &mut bufs, &mut verdicts, 5);
        let passed: Vec<bool> = verdicts.iter().map(|v| forwarded(*v)).collect();
        assert_eq!(passed, [true, true, false, true, false, false]);
        assert_eq!(
            pipeline.counters().dropped(DropReason::PolicyDeniedIngress),
            3
        );
    }

    #[test]
    fn a_flow_older_than_the_rules_keeps_its_replies() {
        // B may open nothing, but A's connection to B:80 started before the rules.
        let set = PolicySet {
            rules: vec![],
            pods: vec![pod("b", &["10.244.0.6"], None, Some(vec![]))],
        };
        let t = tables(&set, 20);
        let reply = tcp("10.244.0.6", 80, "10.244.0.5", 42000, FLAG_ACK);
        assert!(
            forwarded(send(&t, 3, &reply).0),
            "a reply in mid-stream passes"
        );
        // A new connection from B is still denied.
        let syn = tcp("10.244.0.6", 42001, "10.244.0.5", 80, FLAG_SYN);
        assert_eq!(send(&t, 3, &syn).0, Verdict::Drop);
        // Under rules that close B's ingress, the client's side of an older flow stops:
        // the end on the lower port is taken as the server.
        let closed = PolicySet {
            rules: vec![],
            pods: vec![pod("b", &["10.244.0.6"], Some(vec![]), None)],
        };
        let t = tables(&closed, 21);
        let segment = tcp("10.244.0.5", 42002, "10.244.0.6", 80, FLAG_ACK);
        assert_eq!(send(&t, 1, &segment).0, Verdict::Drop);
        let reply = tcp("10.244.0.6", 80, "10.244.0.5", 42002, FLAG_ACK);
        assert_eq!(
            send(&t, 3, &reply).0,
            Verdict::Drop,
            "nor does its server's"
        );
    }

    #[test]
    fn policy_sees_the_service_client_and_the_backend() {
        // web (10.96.0.10:80) -> B:8080. B admits A on 8080 only; A may reach B only.
        let set = PolicySet {
            rules: vec![
                rule(
                    "default/b-policy ingress rule 0",
                    Some("10.244.0.5/32"),
                    Some(8080),
                ),
                rule(
                    "default/a-policy egress rule 0",
                    Some("10.244.0.6/32"),
                    None,
                ),
            ],
            pods: vec![
                pod("b", &["10.244.0.6"], Some(vec![0]), None),
                pod("a", &["10.244.0.5"], None, Some(vec![1])),
            ],
        };
        let t = tables(&set, 30);
        let (v, frame) = send(&t, 1, &tcp("10.244.0.5", 43000, "10.96.0.10", 80, FLAG_SYN));
        assert!(forwarded(v), "{v:?}");
        assert_eq!(&frame[14 + 16..14 + 20], &[10, 244, 0, 6]);
        let (v, frame) = send(
            &t,
            3,
            &tcp("10.244.0.6", 8080, "10.244.0.5", 43000, FLAG_SYN | FLAG_ACK),
        );
        assert!(forwarded(v), "the backend's reply: {v:?}");
        assert_eq!(
            &frame[14 + 12..14 + 16],
            &[10, 96, 0, 10],
            "from the frontend"
        );
    }
}
