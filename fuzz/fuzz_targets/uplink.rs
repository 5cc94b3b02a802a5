//! Fuzzes the uplink's receive path: VXLAN runs of datagrams (as one `UDP_GRO` read returns
//! them) decapsulated and merged in place, IP-in-IP packets stripped to frames, and whole
//! VXLAN frames as the AF_XDP uplink receives them (outer Ethernet, IPv4 and UDP checked
//! to 10.0.0.1:4789, then the datagram decapsulated), and whole frames routed directly as
//! the AF_XDP uplink receives them (Ethernet and IPv4 checked, the packet made a frame),
//! or as it receives them for the node's address (the same, then the TCP or UDP checksum
//! noted: a partial one must be one that can be finished), whose TCP SYNs name their
//! client.
//! Input: one byte picks the kind, two more the segment size, the rest is the data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_api::MacAddr;
use switchyard_dataplane::buffer::PacketBuf;
use switchyard_dataplane::offload::outer;
use switchyard_dataplane::offload::tunnel::{Decapsulator, Encap};
use switchyard_dataplane::wire::vnet;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let kind = data[0] % 6;
    let encap = match kind {
        0 | 3 => Encap::Vxlan { vni: 1, port: 4789 },
        1 => Encap::Ipip { protocol: 4 },
        2 => Encap::Ipip { protocol: 41 },
        _ => Encap::Direct,
    };
    let segment = usize::from(u16::from_le_bytes([data[1], data[2]]));
    let mut data = &data[3..];
    if kind == 3 {
        let local = std::net::Ipv4Addr::new(10, 0, 0, 1);
        let Ok(d) = outer::datagram(data, local, 4789) else {
            return;
        };
        assert!(d.payload.end <= data.len());
        data = &data[d.payload];
    }
    if kind >= 4 {
        let _ = outer::routed_to(data);
        if let Some(client) = outer::connection_opened_by(data) {
            assert_eq!(data[26..30], client.octets(), "the client is the IPv4 source");
        }
        let Some(packet) = outer::routed_packet(data) else {
            return;
        };
        assert!(packet.end <= data.len());
        data = &data[packet];
    }
    let decap = Decapsulator {
        encap,
        mac: MacAddr([0x0e, 0xee, 0xee, 0, 0, 2]),
        gateway: MacAddr([0xee; 6]),
    };
    let mut bufs: Vec<PacketBuf> = (0..4).map(|_| PacketBuf::new()).collect();
    let n = decap.deliver(data, segment, &mut bufs).frames;
    assert!(n <= bufs.len());
    for b in &mut bufs[..n] {
        assert!(b.len() >= 12 + 14);
        if kind == 5 {
            vnet::note_received_checksum(b.frame_mut());
            if b.frame_mut()[0] & vnet::F_NEEDS_CSUM != 0 {
                assert!(vnet::finish_checksum(b.frame_mut()), "a partial checksum it cannot finish");
            }
        }
    }
});
