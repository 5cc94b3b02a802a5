//! Every wire parser on arbitrary bytes: once `new_checked` accepts, no accessor may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_dataplane::wire::{
    icmp::IcmpPacket, ArpPacket, EthernetFrame, Ipv4Packet, Ipv6Packet, VnetHeader,
};

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = VnetHeader::new_checked(data) {
        let _ = (
            v.flags(),
            v.gso_type(),
            v.hdr_len(),
            v.gso_size(),
            v.csum_start(),
            v.csum_offset(),
            v.is_gso(),
        );
    }
    if let Ok(e) = EthernetFrame::new_checked(data) {
        let _ = (e.dst(), e.src(), e.ethertype(), e.payload().len());
    }
    if let Ok(a) = ArpPacket::new_checked(data) {
        let _ = (
            a.operation(),
            a.sender_mac(),
            a.sender_ip(),
            a.target_mac(),
            a.target_ip(),
        );
    }
    if let Ok(ip) = Ipv4Packet::new_checked(data) {
        let _ = (
            ip.header_len(),
            ip.total_len(),
            ip.dont_fragment(),
            ip.is_later_fragment(),
        );
        let _ = (
            ip.ttl(),
            ip.protocol(),
            ip.checksum(),
            ip.src(),
            ip.dst(),
            ip.verify_checksum(),
        );
        let _ = ip.payload().len();
        let mut copy = data.to_vec();
        if let Ok(mut ip) = Ipv4Packet::new_checked(&mut copy[..]) {
            ip.decrement_ttl();
            ip.fill_checksum();
        }
    }
    if let Ok(ip) = Ipv6Packet::new_checked(data) {
        let _ = (
            ip.payload_len(),
            ip.next_header(),
            ip.hop_limit(),
            ip.src(),
            ip.dst(),
            ip.payload().len(),
        );
    }
    let mut out = vec![0u8; 80_000];
    if let Ok(s) = switchyard_dataplane::offload::segment::super_frame(data, 8, &mut out) {
        assert!(s.total <= out.len() && s.count >= 1);
    }
    if let Ok(m) = IcmpPacket::new_checked(data) {
        let _ = (m.kind(), m.code(), m.checksum(), m.nd_target());
    }
});
