//! Fuzzes masquerade's translation of arbitrary IPv4 packets (both sides, complete and
//! partial checksums) and the connection-tracking table fed with the tuples they carry.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::net::Ipv4Addr;
use switchyard_dataplane::conntrack::{Conntrack, Tuple};
use switchyard_dataplane::pipeline::nat::{l4_of, translate, Side};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, packet)) = data.split_first() else {
        return;
    };
    let mut l3 = packet.to_vec();
    let side = if flags & 1 == 0 {
        Side::Source
    } else {
        Side::Destination
    };
    let translated = translate(
        &mut l3,
        side,
        Ipv4Addr::new(192, 168, 1, 10),
        40000,
        flags & 2 != 0,
    );
    assert_eq!(translated, l4_of(packet).is_some());
    assert_eq!(l3.len(), packet.len());
    if let Some(p) = l4_of(packet) {
        let ct = Conntrack::new(Ipv4Addr::new(192, 168, 1, 10), (40000, 40003), 4);
        let t = Tuple {
            protocol: p.protocol,
            src: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
            src_port: p.src_port,
            dst: Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]),
            dst_port: p.dst_port,
        };
        let _ = ct.outbound(t, Some(flags), 0);
        let _ = ct.outbound(t, Some(flags >> 1), 1);
        assert!(ct.answer(&t, Some(flags), 1).is_some() || ct.is_empty() || ct.len() >= ct.limit());
        // The same tuple as a connection to a published port (hostPort).
        if let Ok(pod) = ct.expose(&t, (Ipv4Addr::new(10, 244, 0, 7), 80), Some(flags), 2) {
            let answer = Tuple {
                protocol: t.protocol,
                src: pod.0,
                src_port: pod.1,
                dst: t.src,
                dst_port: t.src_port,
            };
            let _ = ct.answer(&answer, Some(flags >> 2), 3);
        }
        ct.sweep(u64::from(flags) << 33);
    }
});
