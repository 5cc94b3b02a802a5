//! The packet pipeline: a batch of frames from one port in, one [`Verdict`] per frame out.
//!
//! Sans-IO: no system calls, no clock (the caller passes `now`), no allocation. The one lock
//! is the connection table's shard lock, which masquerade and published ports take when a
//! packet opens or finds a flow.
//! Stages, in order, for each frame:
//!
//! 1. **ingress**: the virtio-net header and Ethernet header must be there; the source MAC
//!    must be the port's own (anti-spoofing).
//! 2. **neighbour** ([`neighbor`]): ARP requests and IPv6 neighbour solicitations are
//!    answered in place with the gateway's MAC (proxy-ARP / proxy-ND, as Calico does).
//! 3. **forward** (this file): IPv4 / IPv6 validation, source address check,
//!    longest-prefix match, TTL / hop-limit, MTU, then an in-place rewrite (MACs, TTL with
//!    an incremental checksum). The virtio-net header is kept as it is, so a GSO
//!    super-frame stays one. A packet of the flow the batch forwarded last, untranslated,
//!    takes that flow's next hop from the batch's memo (`memo.rs`) and skips the address
//!    checks, the lookup and the policy stage; its own TTL, size and checksum are checked.
//! 4. **masquerade and published ports** ([`masquerade`], [`nat`]): translations before and
//!    after routing (IPv4).
//! 5. **errors** ([`icmp_error`]): where the packet cannot go on, it is turned into an
//!    ICMP / ICMPv6 error back to the sender, rate-limited.
//! 6. **coalescing** ([`coalesce`]): runs of one flow toward one port become a super-frame.
//!
//! Later stages (Service translation, policy) slot in around routing, without changing
//! this shape; encapsulation is a next-hop kind (`Tunnel`) carried out by the uplink.

pub mod coalesce;
pub mod counters;
pub mod icmp_error;
pub mod masquerade;
mod memo;
pub mod nat;
pub mod neighbor;
mod policy;
mod services;
pub mod trace;
mod tuple;

use crate::buffer::PacketBuf;
use crate::tables::{NextHop, Port, PortRole, Tables};
use crate::wire::ethernet::{EtherType, EthernetFrame};
use crate::wire::{ipv4::Ipv4Packet, ipv6::Ipv6Packet, vnet, VnetHeader};
pub use counters::{Counters, DropReason, Event};
use icmp_error::{IcmpError, RateLimiter};
use masquerade::Translated;
use std::net::{Ipv4Addr, Ipv6Addr};

pub use crate::wire::{ETH_OFFSET, L3_OFFSET};

/// What happens to one frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Dropped (and counted).
    Drop,
    /// Sent back out of the port it came from (ARP / ND answers, ICMP errors).
    Reply,
    /// Sent to the next hop with this index in [`Tables::nexthops`].
    Forward(u32),
    /// Leaving the node with its address (masqueraded, or answering a port it publishes):
    /// sent straight out of the uplink that is the node's exit ([`Tables::exit`]) where it
    /// knows the way, else to the next hop with this index (the host port).
    Leave(u32),
    /// Carried inside an earlier frame of the batch (UDP coalescing); nothing to send.
    Merged,
}

/// One worker's pipeline: its counters and its ICMP rate limiter.
pub struct Pipeline {
    counters: Counters,
    icmp_limit: RateLimiter,
    /// Where super-frames are cut into segments on their way to an uplink (allocated on
    /// first use: [`crate::offload::segment::SCRATCH_LEN`]).
    segment_buf: Vec<u8>,
    /// The clock reading of the batch being processed.
    now_ns: u64,
    /// The policy verdicts this worker used last.
    verdicts: policy::VerdictCache,
    /// The next hop of the last flow forwarded in the batch being processed.
    route_memo: memo::RouteMemo,
}

impl Default for Pipeline {
    fn default() -> Self {
        Self::new()
    }
}

/// What the forward step read of a packet before the policy stage.
struct Read {
    /// The packet as it arrived, when a stage may have translated it since (and a policy
    /// selects some port).
    origin: Option<policy::Origin>,
    /// Its raw tuple now, when no stage translated it.
    raw: Option<tuple::RawTuple>,
}

/// What routing needs to know of an address family.
trait Family: Copy + PartialEq {
    /// The gateway's own address.
    fn gateway<D>(tables: &Tables<D>) -> Self;
    /// Whether no packet may be routed to it.
    fn is_martian(self) -> bool;
    /// Its longest-prefix match: a next hop index.
    fn look_up<D>(self, tables: &Tables<D>) -> u32;
}

impl Family for Ipv4Addr {
    fn gateway<D>(tables: &Tables<D>) -> Self {
        tables.gateway.ipv4
    }

    fn is_martian(self) -> bool {
        is_martian_v4(self)
    }

    #[inline(always)]
    fn look_up<D>(self, tables: &Tables<D>) -> u32 {
        tables.routes_v4.lookup(u32::from(self))
    }
}

impl Family for Ipv6Addr {
    fn gateway<D>(tables: &Tables<D>) -> Self {
        tables.gateway.ipv6
    }

    fn is_martian(self) -> bool {
        is_martian_v6(self)
    }

    #[inline(always)]
    fn look_up<D>(self, tables: &Tables<D>) -> u32 {
        tables.routes_v6.lookup(u128::from(self))
    }
}

/// Why a routed packet cannot be forwarded.
enum Reject {
    Drop(DropReason),
    Icmp(IcmpError, DropReason),
}

impl Pipeline {
    /// A pipeline with zeroed counters and the default ICMP rate limit.
    pub fn new() -> Self {
        Self {
            counters: Counters::default(),
            icmp_limit: RateLimiter::default(),
            segment_buf: Vec::new(),
            now_ns: 0,
            verdicts: policy::VerdictCache::default(),
            route_memo: memo::RouteMemo::default(),
        }
    }

    /// The counters and the segmentation buffer, for the I/O layer's transmit step.
    pub fn tx_parts(&mut self) -> (&mut Counters, &mut [u8]) {
        if self.segment_buf.is_empty() {
            self.segment_buf = vec![0; crate::offload::segment::SCRATCH_LEN];
        }
        (&mut self.counters, &mut self.segment_buf)
    }

    /// The counters so far.
    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The counters, for the I/O layer to add transmit failures.
    pub fn counters_mut(&mut self) -> &mut Counters {
        &mut self.counters
    }

    /// Runs the pipeline over frames that arrived on `ingress`, writing one verdict per
    /// frame. `now_ns` is a monotonic clock reading for rate limits.
    pub fn process<D>(
        &mut self,
        tables: &Tables<D>,
        ingress: &Port<D>,
        frames: &mut [PacketBuf],
        verdicts: &mut [Verdict],
        now_ns: u64,
    ) {
        self.icmp_limit.refill(now_ns);
        self.now_ns = now_ns;
        self.verdicts.begin(tables.policy.generation, now_ns);
        self.route_memo.forget();
        for (frame, verdict) in frames.iter_mut().zip(verdicts.iter_mut()) {
            *verdict = self.process_one(tables, ingress, frame);
        }
        coalesce::coalesce::<coalesce::Udp, D>(
            tables,
            ingress,
            frames,
            verdicts,
            &mut self.counters,
        );
        if ingress.role == PortRole::Uplink {
            coalesce::coalesce::<coalesce::Tcp, D>(
                tables,
                ingress,
                frames,
                verdicts,
                &mut self.counters,
            );
        }
    }

    fn drop(&mut self, reason: DropReason) -> Verdict {
        self.counters.drop(reason);
        Verdict::Drop
    }

    fn process_one<D>(
        &mut self,
        tables: &Tables<D>,
        ingress: &Port<D>,
        pkt: &mut PacketBuf,
    ) -> Verdict {
        let Some(eth) = pkt
            .frame()
            .get(ETH_OFFSET..)
            .and_then(|b| EthernetFrame::new_checked(b).ok())
        else {
            return self.drop(DropReason::Truncated);
        };
        if eth.src() != ingress.mac {
            return self.drop(DropReason::SpoofedMac);
        }
        let to_gateway = eth.dst() == tables.gateway.mac;
        match eth.ethertype() {
            EtherType::Arp => neighbor::answer_arp(self, tables, ingress, pkt),
            EtherType::Ipv4 if to_gateway => self.forward_ipv4(tables, ingress, pkt),
            EtherType::Ipv6 => {
                if let Some(verdict) = neighbor::answer_nd(self, tables, ingress, pkt) {
                    verdict
                } else if to_gateway {
                    self.forward_ipv6(tables, ingress, pkt)
                } else {
                    self.drop(DropReason::NotForGateway)
                }
            }
            EtherType::Ipv4 => self.drop(DropReason::NotForGateway),
            EtherType::Unknown(_) => self.drop(DropReason::UnsupportedEthertype),
        }
    }

    fn forward_ipv4<D>(
        &mut self,
        tables: &Tables<D>,
        ingress: &Port<D>,
        pkt: &mut PacketBuf,
    ) -> Verdict {
        let (head, l3) = pkt.frame_mut().split_at_mut(L3_OFFSET);
        let partial = head[0] & vnet::F_NEEDS_CSUM != 0;
        let Ok(mut ip) = Ipv4Packet::new_checked(&mut *l3) else {
            return self.drop(DropReason::MalformedIpv4);
        };
        let (src, mut dst) = (ip.src(), ip.dst());
        if !ingress.may_send_from_v4(src) {
            return self.drop(DropReason::SpoofedSource);
        }
        if !ip.verify_checksum() {
            return self.drop(DropReason::BadIpv4Checksum);
        }
        let origin = self.origin(tables, ip.as_bytes(), false);
        let mut serviced = false;
        let mut translated = false;
        if !tables.services.is_empty() {
            let bytes = ip.into_inner();
            let step = self.services(tables, ingress, bytes, false, partial);
            // Translation changes addresses and ports, never lengths: still a packet.
            let Ok(view) = Ipv4Packet::new_checked(bytes) else {
                return self.drop(DropReason::MalformedIpv4);
            };
            ip = view;
            match self.service_step(step) {
                Ok(true) => {
                    dst = ip.dst();
                    serviced = true;
                    translated = true;
                }
                Ok(false) => {}
                Err(Some(reason)) => return self.drop(reason),
                Err(None) => {
                    let quotable = icmp_error::may_answer_v4(&ip);
                    return self.refuse(tables, ingress, pkt, quotable);
                }
            }
        }
        let mut answered = false;
        let mut untranslated = None;
        if let Some(m) = tables.masquerade.as_deref().filter(|_| !serviced) {
            let host_ports = &tables.host_ports;
            if let Some(step) =
                masquerade::before_routing(m, host_ports, ingress.role, ip.as_bytes())
            {
                let bytes = ip.into_inner();
                let before = masquerade::tuple(bytes);
                let outcome = masquerade::translate_before_routing(
                    m,
                    host_ports,
                    step,
                    bytes,
                    partial,
                    self.now_ns,
                );
                // Translation changes addresses and ports, never lengths: still a packet.
                let Ok(view) = Ipv4Packet::new_checked(bytes) else {
                    return self.drop(DropReason::MalformedIpv4);
                };
                ip = view;
                match outcome {
                    Ok(Translated::Nothing) => {}
                    Ok(done) => {
                        self.counters.event(match done {
                            Translated::Answer => Event::Masqueraded,
                            _ => Event::Unmasqueraded,
                        });
                        dst = ip.dst();
                        answered = done == Translated::Answer;
                        untranslated = before;
                        translated = true;
                    }
                    Err(reason) => return self.drop(reason),
                }
            }
        }
        let raw = (!translated)
            .then(|| tuple::raw_tuple(ip.as_bytes(), false))
            .flatten();
        let (nh, known) = match self.next_hop(tables, raw.as_ref(), dst) {
            Ok(found) => found,
            Err(reason) => return self.drop(reason),
        };
        let vnet = &head[..vnet::HEADER_LEN];
        let wire_len = wire_l3_len(vnet, ip.header_len(), ip.total_len(), ip.payload());
        match self.route(tables, ingress, nh, ip.ttl(), wire_len) {
            Ok(egress) => {
                if !known {
                    let read = Read { origin, raw };
                    let admitted =
                        self.admit(tables, ingress, egress, ip.as_bytes(), false, read, nh);
                    if let Err(reason) = admitted {
                        return self.drop(reason);
                    }
                }
                ip.decrement_ttl();
                if ingress.role == PortRole::Pod
                    && egress.role == PortRole::Host
                    && !answered
                    && !serviced
                {
                    if let Some(m) = tables.masquerade.as_deref().filter(|m| m.applies_to(dst)) {
                        if let Err(reason) = masquerade::outbound(m, l3, partial, self.now_ns) {
                            return self.drop(reason);
                        }
                        self.counters.event(Event::Masqueraded);
                    }
                }
                self.rewrite_ethernet(tables, egress, head, Event::ForwardedIpv4);
                if tables.exit.is_some()
                    && egress.role == PortRole::Host
                    && ingress.role != PortRole::Host
                    && leaves_as_node(tables, l3)
                {
                    return Verdict::Leave(nh);
                }
                Verdict::Forward(nh)
            }
            Err(Reject::Icmp(IcmpError::TooBig(_), _)) if !ip.dont_fragment() && !is_gso(vnet) => {
                self.drop(DropReason::NeedsFragmentation)
            }
            Err(Reject::Drop(reason)) => self.drop(reason),
            Err(Reject::Icmp(error, reason)) => {
                let quotable = icmp_error::may_answer_v4(&ip);
                // The sender knows its packet only as it sent it.
                if let Some(before) = &untranslated {
                    masquerade::restore(&mut pkt.frame_mut()[L3_OFFSET..], before, partial);
                }
                self.counters.drop(reason);
                self.send_icmp_error(tables, ingress, pkt, error, quotable)
            }
        }
    }

    fn forward_ipv6<D>(
        &mut self,
        tables: &Tables<D>,
        ingress: &Port<D>,
        pkt: &mut PacketBuf,
    ) -> Verdict {
        let (head, l3) = pkt.frame_mut().split_at_mut(L3_OFFSET);
        let Ok(mut ip) = Ipv6Packet::new_checked(&mut *l3) else {
            return self.drop(DropReason::MalformedIpv6);
        };
        let (src, mut dst) = (ip.src(), ip.dst());
        if !ingress.may_send_from_v6(src) {
            return self.drop(DropReason::SpoofedSource);
        }
        let origin = self.origin(tables, ip.as_bytes(), true);
        let mut translated = false;
        if !tables.services.is_empty() {
            let partial = head[0] & vnet::F_NEEDS_CSUM != 0;
            let bytes = ip.into_inner();
            let step = self.services(tables, ingress, bytes, true, partial);
            let Ok(view) = Ipv6Packet::new_checked(bytes) else {
                return self.drop(DropReason::MalformedIpv6);
            };
            ip = view;
            match self.service_step(step) {
                Ok(true) => {
                    dst = ip.dst();
                    translated = true;
                }
                Ok(false) => {}
                Err(Some(reason)) => return self.drop(reason),
                Err(None) => {
                    let quotable = icmp_error::may_answer_v6(&ip);
                    return self.refuse(tables, ingress, pkt, quotable);
                }
            }
        }
        let raw = (!translated)
            .then(|| tuple::raw_tuple(ip.as_bytes(), true))
            .flatten();
        let (nh, known) = match self.next_hop(tables, raw.as_ref(), dst) {
            Ok(found) => found,
            Err(reason) => return self.drop(reason),
        };
        let vnet = &head[..vnet::HEADER_LEN];
        let wire_len = wire_l3_len(vnet, 40, ip.total_len(), ip.payload());
        match self.route(tables, ingress, nh, ip.hop_limit(), wire_len) {
            Ok(egress) => {
                if !known {
                    let read = Read { origin, raw };
                    let admitted =
                        self.admit(tables, ingress, egress, ip.as_bytes(), true, read, nh);
                    if let Err(reason) = admitted {
                        return self.drop(reason);
                    }
                }
                ip.decrement_hop_limit();
                self.rewrite_ethernet(tables, egress, head, Event::ForwardedIpv6);
                Verdict::Forward(nh)
            }
            Err(Reject::Drop(reason)) => self.drop(reason),
            Err(Reject::Icmp(error, reason)) => {
                let quotable = icmp_error::may_answer_v6(&ip);
                self.counters.drop(reason);
                self.send_icmp_error(tables, ingress, pkt, error, quotable)
            }
        }
    }

    /// The routing decision shared by both families.
    #[inline(always)]
    fn route<'t, D>(
        &self,
        tables: &'t Tables<D>,
        ingress: &Port<D>,
        nh: u32,
        ttl: u8,
        wire_len: usize,
    ) -> Result<&'t Port<D>, Reject> {
        let port = match tables.nexthop(nh) {
            None => return Err(Reject::Icmp(IcmpError::Unreachable, DropReason::NoRoute)),
            Some(NextHop::Blackhole) => return Err(Reject::Drop(DropReason::Blackhole)),
            Some(NextHop::Unreachable) => {
                return Err(Reject::Icmp(
                    IcmpError::Unreachable,
                    DropReason::Unreachable,
                ))
            }
            Some(NextHop::Port(port)) => port,
            Some(NextHop::Tunnel { port, .. }) => {
                if ingress.role == PortRole::Uplink {
                    return Err(Reject::Drop(DropReason::OverlayTransit));
                }
                port
            }
        };
        if ttl <= 1 {
            Err(Reject::Icmp(
                IcmpError::TimeExceeded,
                DropReason::TtlExceeded,
            ))
        } else if wire_len > port.mtu as usize {
            Err(Reject::Icmp(
                IcmpError::TooBig(port.mtu),
                DropReason::TooBig,
            ))
        } else {
            Ok(port)
        }
    }

    /// Rewrites the Ethernet header for delivery to `egress` (`head` is the virtio-net
    /// header followed by the Ethernet header) and counts the forward.
    #[inline(always)]
    fn rewrite_ethernet<D>(
        &mut self,
        tables: &Tables<D>,
        egress: &Port<D>,
        head: &mut [u8],
        event: Event,
    ) {
        let (vnet, eth) = head.split_at_mut(vnet::HEADER_LEN);
        if is_gso(vnet) {
            self.counters.event(Event::ForwardedGso);
        }
        eth[0..6].copy_from_slice(&egress.mac.0);
        eth[6..12].copy_from_slice(&tables.gateway.mac.0);
        self.counters.event(event);
    }

    /// What the policy stage needs of the IP packet `l3` (IPv6 when `v6`) as it arrived,
    /// taken here only when a stage may translate it before the policy stage: otherwise
    /// the policy stage reads the same tuple from the packet itself, without carrying it
    /// through the stages in between.
    #[inline(always)]
    fn origin<D>(&self, tables: &Tables<D>, l3: &[u8], v6: bool) -> Option<policy::Origin> {
        let translating = !tables.services.is_empty() || (!v6 && tables.masquerade.is_some());
        (translating && tables.selected_ports.any()).then(|| policy::Origin::of(l3, v6, true))
    }

    /// The next hop toward `dst`, and whether it is the batch's memo's (the packet is of
    /// the flow `raw` that the batch forwarded last): otherwise the destination is checked
    /// and looked up.
    #[inline(always)]
    fn next_hop<A: Family, D>(
        &self,
        tables: &Tables<D>,
        raw: Option<&tuple::RawTuple>,
        dst: A,
    ) -> Result<(u32, bool), DropReason> {
        if let Some(nh) = raw.and_then(|raw| self.route_memo.get(raw)) {
            return Ok((nh, true));
        }
        if dst == A::gateway(tables) {
            return Err(DropReason::ToGateway);
        }
        if dst.is_martian() {
            return Err(DropReason::Martian);
        }
        Ok((dst.look_up(tables), false))
    }

    /// Runs the policy stage over a packet routed to the next hop `nh` (see
    /// [`Self::police`]) and, when it may go on, remembers its flow's way for the rest of
    /// the batch.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn admit<D>(
        &mut self,
        tables: &Tables<D>,
        ingress: &Port<D>,
        egress: &Port<D>,
        l3: &[u8],
        v6: bool,
        read: Read,
        nh: u32,
    ) -> Result<(), DropReason> {
        let raw = read.raw;
        self.police(tables, ingress, egress, l3, v6, read)?;
        if let Some(raw) = raw {
            self.route_memo.keep(raw, nh);
        }
        Ok(())
    }

    /// Runs the policy stage over a routed packet `l3` (IPv6 when `v6`) from `ingress` to
    /// `egress`, with what was read of it before.
    #[inline(always)]
    fn police<D>(
        &mut self,
        tables: &Tables<D>,
        ingress: &Port<D>,
        egress: &Port<D>,
        l3: &[u8],
        v6: bool,
        read: Read,
    ) -> Result<(), DropReason> {
        let Read { origin, raw } = read;
        // Between two pods no policy selects (or a pod and the node or the overlay): no
        // rule applies either way, and the packet is not read. (With no policy, no port
        // is selected.)
        let selected = &tables.selected_ports;
        if !(selected.contains(ingress.id) || selected.contains(egress.id)) {
            return Ok(());
        }
        // A packet of a flow this worker decided last takes only its raw tuple and a
        // comparison; the rest is read on a miss.
        let raw = match &origin {
            Some(origin) => origin.raw,
            None => raw,
        };
        if let Some(tuple) = &raw {
            if let Some(verdict) = self.verdicts.get(tuple) {
                return verdict;
            }
        }
        let origin = origin.unwrap_or(policy::Origin { raw, source: None });
        let Some(mut packet) = policy::packet(l3, v6) else {
            return Ok(());
        };
        if let Some((src, src_port)) = origin.source {
            packet.key.src = src;
            packet.key.src_port = src_port;
        }
        let verdict = policy::check(tables, ingress, egress, &packet, self.now_ns);
        self.verdicts.put(&origin, verdict);
        verdict
    }

    /// Runs the Service stage over the IP packet `bytes` (IPv6 when `v6`).
    fn services<D>(
        &self,
        tables: &Tables<D>,
        ingress: &Port<D>,
        bytes: &mut [u8],
        v6: bool,
        partial: bool,
    ) -> services::Step {
        services::before_routing(
            &tables.services,
            &tables.service_flows,
            ingress.role,
            bytes,
            v6,
            partial,
            self.now_ns,
        )
    }

    /// Counts what the Service stage did: `Ok(true)` when the packet was translated,
    /// `Ok(false)` when not, `Err(Some)` to drop, `Err(None)` to refuse the client.
    fn service_step(&mut self, step: services::Step) -> Result<bool, Option<DropReason>> {
        match step {
            services::Step::Untouched => Ok(false),
            services::Step::ToBackend => {
                self.counters.event(Event::ServiceTranslated);
                Ok(true)
            }
            services::Step::FromFrontend => {
                self.counters.event(Event::ServiceReplies);
                Ok(true)
            }
            services::Step::Refuse => Err(None),
            services::Step::Drop(reason) => Err(Some(reason)),
        }
    }

    /// Refuses a client of a Service port with no endpoint: ICMP port unreachable.
    fn refuse<D>(
        &mut self,
        tables: &Tables<D>,
        ingress: &Port<D>,
        pkt: &mut PacketBuf,
        quotable: bool,
    ) -> Verdict {
        self.counters.drop(DropReason::ServiceNoEndpoints);
        self.send_icmp_error(tables, ingress, pkt, IcmpError::PortUnreachable, quotable)
    }

    fn send_icmp_error<D>(
        &mut self,
        tables: &Tables<D>,
        ingress: &Port<D>,
        pkt: &mut PacketBuf,
        error: IcmpError,
        quotable: bool,
    ) -> Verdict {
        if !quotable {
            return Verdict::Drop;
        }
        if !self.icmp_limit.take() {
            return self.drop(DropReason::IcmpRateLimited);
        }
        if icmp_error::build(pkt, &tables.gateway, error) {
            let l3_len = pkt.len() - L3_OFFSET;
            neighbor::finish_reply(pkt, tables, ingress, l3_len);
            self.counters.event(Event::IcmpErrorsSent);
            Verdict::Reply
        } else {
            Verdict::Drop
        }
    }
}

fn is_gso(vnet: &[u8]) -> bool {
    VnetHeader::new_checked(vnet).is_ok_and(|h| h.is_gso() && h.gso_size() > 0)
}

/// Bytes of L3 packet each segment puts on the wire: the whole packet for a plain frame;
/// headers plus one segment's payload for a GSO super-frame.
#[inline(always)]
fn wire_l3_len(vnet: &[u8], l3_header: usize, l3_total: usize, l4: &[u8]) -> usize {
    let Ok(h) = VnetHeader::new_checked(vnet) else {
        return l3_total;
    };
    if !h.is_gso() || h.gso_size() == 0 {
        return l3_total;
    }
    let l4_header = match h.gso_type() {
        vnet::GSO_TCPV4 | vnet::GSO_TCPV6 => l4.get(12).map_or(20, |b| usize::from(b >> 4) * 4),
        _ => 8,
    };
    (l3_header + l4_header + usize::from(h.gso_size())).min(l3_total)
}

/// Whether the IPv4 packet `l3` carries the node's own address as its source (the
/// masquerade address): a packet the dataplane made leave as the node.
#[inline]
fn leaves_as_node<D>(tables: &Tables<D>, l3: &[u8]) -> bool {
    tables
        .masquerade
        .as_ref()
        .is_some_and(|m| l3.get(12..16) == Some(&m.node().octets()[..]))
}

fn is_martian_v4(dst: Ipv4Addr) -> bool {
    dst.is_multicast()
        || dst.is_broadcast()
        || dst.is_loopback()
        || dst.is_unspecified()
        || dst.is_link_local()
}

fn is_martian_v6(dst: Ipv6Addr) -> bool {
    dst.is_multicast() || dst.is_loopback() || dst.is_unspecified() || dst.is_unicast_link_local()
}

#[cfg(test)]
mod tests;
