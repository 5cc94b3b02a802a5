//! Answers for neighbour resolution: every pod sees the gateway's MAC for whatever address
//! it resolves (proxy-ARP and proxy-ND), so pods route everything through the dataplane
//! whatever prefix length their addresses have. Requests for the pod's own addresses
//! (duplicate address detection, gratuitous ARP) are left unanswered.

use super::{Event, Pipeline, Verdict, ETH_OFFSET, L3_OFFSET};
use crate::buffer::PacketBuf;
use crate::pipeline::DropReason;
use crate::tables::{Port, Tables};
use crate::wire::arp::{self, ArpPacket};
use crate::wire::icmp::{self, IcmpPacket};
use crate::wire::ipv6::{self, Ipv6Packet};
use crate::wire::{checksum, ethernet, EthernetFrame, VnetHeader};

/// Answers an ARP request in place.
pub(super) fn answer_arp<D>(
    p: &mut Pipeline,
    tables: &Tables<D>,
    ingress: &Port<D>,
    pkt: &mut PacketBuf,
) -> Verdict {
    let Some(body) = pkt.frame_mut().get_mut(L3_OFFSET..) else {
        return p.drop(DropReason::MalformedArp);
    };
    let Ok(mut arp) = ArpPacket::new_checked(body) else {
        return p.drop(DropReason::MalformedArp);
    };
    let sender = arp.sender_ip();
    if arp.operation() != arp::OP_REQUEST || sender.is_unspecified() {
        return p.drop(DropReason::ArpIgnored);
    }
    if !ingress.may_send_from_v4(sender) {
        return p.drop(DropReason::SpoofedSource);
    }
    if ingress.ipv4.contains(&arp.target_ip()) {
        return p.drop(DropReason::ArpIgnored);
    }
    arp.make_reply(tables.gateway.mac);
    finish_reply(pkt, tables, ingress, arp::PACKET_LEN);
    p.counters.event(Event::ArpReplies);
    Verdict::Reply
}

/// Answers an IPv6 neighbour solicitation in place. `None` when the frame is not neighbour
/// discovery, so the caller forwards it.
pub(super) fn answer_nd<D>(
    p: &mut Pipeline,
    tables: &Tables<D>,
    ingress: &Port<D>,
    pkt: &mut PacketBuf,
) -> Option<Verdict> {
    let l3 = pkt.frame().get(L3_OFFSET..)?;
    let Ok(ip) = Ipv6Packet::new_checked(l3) else {
        return Some(p.drop(DropReason::MalformedIpv6));
    };
    if ip.next_header() != ipv6::NEXT_ICMPV6 {
        return None;
    }
    let message = IcmpPacket::new_checked(ip.payload()).ok()?;
    let kind = message.kind();
    if !matches!(
        kind,
        icmp::V6_NEIGHBOR_SOLICIT | icmp::V6_NEIGHBOR_ADVERT | icmp::V6_ROUTER_SOLICIT | 143
    ) {
        return None;
    }
    let (src, target) = (ip.src(), message.nd_target());
    let answerable = kind == icmp::V6_NEIGHBOR_SOLICIT
        && ip.hop_limit() == 255
        && !src.is_unspecified()
        && target.is_some_and(|t| !ingress.ipv6.contains(&t));
    let Some(target) = target.filter(|_| answerable) else {
        return Some(p.drop(DropReason::NdIgnored));
    };
    let gateway = tables.gateway;
    let frame = pkt.frame_mut();
    let l3 = &mut frame[L3_OFFSET..];
    if l3.len() < ipv6::HEADER_LEN + icmp::NEIGHBOR_ADVERT_LEN {
        return Some(p.drop(DropReason::Truncated));
    }
    // Sent from the target address itself: receivers that key their cache on the IP source
    // (smoltcp) and those that use the target field (Linux) both learn the right entry.
    ipv6::emit_header(
        l3,
        target,
        src,
        ipv6::NEXT_ICMPV6,
        icmp::NEIGHBOR_ADVERT_LEN,
        255,
    );
    let body = &mut l3[ipv6::HEADER_LEN..ipv6::HEADER_LEN + icmp::NEIGHBOR_ADVERT_LEN];
    icmp::emit_neighbor_advert(body, target, gateway.mac);
    let pseudo = checksum::pseudo_header_v6(
        target,
        src,
        ipv6::NEXT_ICMPV6,
        icmp::NEIGHBOR_ADVERT_LEN as u32,
    );
    let sum = checksum::finish(checksum::accumulate(pseudo, body));
    if let Ok(mut message) = IcmpPacket::new_checked(body) {
        message.set_checksum(sum);
    }
    finish_reply(
        pkt,
        tables,
        ingress,
        ipv6::HEADER_LEN + icmp::NEIGHBOR_ADVERT_LEN,
    );
    p.counters.event(Event::NdReplies);
    Some(Verdict::Reply)
}

/// Addresses a reply of `l3_len` bytes back to the pod: Ethernet from the gateway to the
/// pod, a plain (non-GSO) virtio-net header, the frame cut to size.
pub(super) fn finish_reply<D>(
    pkt: &mut PacketBuf,
    tables: &Tables<D>,
    ingress: &Port<D>,
    l3_len: usize,
) {
    let frame = pkt.frame_mut();
    if let Ok(mut vnet) = VnetHeader::new_checked(&mut frame[..]) {
        vnet.clear();
    }
    if let Ok(mut eth) = EthernetFrame::new_checked(&mut frame[ETH_OFFSET..]) {
        eth.set_dst(ingress.mac);
        eth.set_src(tables.gateway.mac);
    }
    pkt.set_len(ETH_OFFSET + ethernet::HEADER_LEN + l3_len);
}
