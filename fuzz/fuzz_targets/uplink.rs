//! Fuzzes the uplink's receive path: VXLAN runs of datagrams (as one `UDP_GRO` read returns
//! them) decapsulated and merged in place, and IP-in-IP packets stripped to frames. Input:
//! one byte picks the encapsulation, two more the segment size, the rest is the data.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_api::MacAddr;
use switchyard_dataplane::buffer::PacketBuf;
use switchyard_dataplane::offload::tunnel::{Decapsulator, Encap};

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let encap = match data[0] % 3 {
        0 => Encap::Vxlan { vni: 1, port: 4789 },
        1 => Encap::Ipip { protocol: 4 },
        _ => Encap::Ipip { protocol: 41 },
    };
    let segment = usize::from(u16::from_le_bytes([data[1], data[2]]));
    let decap = Decapsulator {
        encap,
        mac: MacAddr([0x0e, 0xee, 0xee, 0, 0, 2]),
        gateway: MacAddr([0xee; 6]),
    };
    let mut bufs: Vec<PacketBuf> = (0..4).map(|_| PacketBuf::new()).collect();
    let n = decap.deliver(&data[3..], segment, &mut bufs).frames;
    assert!(n <= bufs.len());
    for b in &bufs[..n] {
        assert!(b.len() >= 12 + 14);
    }
});
