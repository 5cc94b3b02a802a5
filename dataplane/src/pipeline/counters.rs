//! Named counters: every event and every drop reason has its own, VPP-style. The pipeline
//! owns plain integers (one writer, no atomics on the fast path); workers publish them.

macro_rules! named_counters {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        #[repr(usize)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];
            /// Number of variants.
            pub const COUNT: usize = Self::ALL.len();

            /// The counter's name as the API and CLI show it.
            pub fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }
        }
    };
}

named_counters! {
    /// Things the pipeline did.
    Event {
        /// IPv4 packets forwarded.
        ForwardedIpv4 => "forwarded_ipv4",
        /// IPv6 packets forwarded.
        ForwardedIpv6 => "forwarded_ipv6",
        /// Forwarded packets that were GSO super-frames.
        ForwardedGso => "forwarded_gso",
        /// ARP requests answered.
        ArpReplies => "arp_replies",
        /// Neighbour solicitations answered.
        NdReplies => "nd_replies",
        /// ICMP / ICMPv6 errors sent.
        IcmpErrorsSent => "icmp_errors_sent",
        /// Batches read from ports (frames read / batches = mean batch size).
        RxBatches => "rx_batches",
        /// Frames read from ports.
        RxFrames => "rx_frames",
        /// Frames a TAP's stack queued within the write of the frame before it (a ping's
        /// echo, a SYN's SYN-ACK), read and forwarded in the same round, without a wait.
        AnswersRead => "answers_read",
        /// UDP datagrams merged into an earlier one's GSO super-frame.
        UdpCoalesced => "udp_coalesced",
        /// TCP segments from another node merged into an earlier one's GSO super-frame.
        TcpCoalesced => "tcp_coalesced",
        /// Pod packets leaving the cluster with the node's address (masquerade).
        Masqueraded => "masqueraded",
        /// Replies given their pod's address back.
        Unmasqueraded => "unmasqueraded",
        /// Packets to a Service given their backend as destination.
        ServiceTranslated => "service_translated",
        /// Backends' replies given their Service's address back.
        ServiceReplies => "service_replies",
    }
}

named_counters! {
    /// Why a frame was dropped.
    DropReason {
        /// Shorter than the headers it claims.
        Truncated => "truncated",
        /// Source MAC is not the port's own.
        SpoofedMac => "spoofed_mac",
        /// Source IP is not one of the port's own.
        SpoofedSource => "spoofed_source",
        /// EtherType not handled (VLAN tags, LLDP, ...).
        UnsupportedEthertype => "unsupported_ethertype",
        /// ARP that is not Ethernet/IPv4 or is cut short.
        MalformedArp => "malformed_arp",
        /// ARP that needs no answer (replies, probes, gratuitous).
        ArpIgnored => "arp_ignored",
        /// IPv4 header invalid.
        MalformedIpv4 => "malformed_ipv4",
        /// IPv4 header checksum wrong.
        BadIpv4Checksum => "bad_ipv4_checksum",
        /// IPv6 header invalid.
        MalformedIpv6 => "malformed_ipv6",
        /// Neighbour discovery that needs no answer (DAD, router solicitations, MLD).
        NdIgnored => "nd_ignored",
        /// Destination MAC is not the gateway's (multicast, broadcast, other).
        NotForGateway => "not_for_gateway",
        /// Destination is not routable (multicast, link-local, loopback, unspecified).
        Martian => "martian_destination",
        /// Addressed to the gateway itself.
        ToGateway => "to_gateway",
        /// No route to the destination.
        NoRoute => "no_route",
        /// Route is a blackhole.
        Blackhole => "blackhole",
        /// Route is unreachable.
        Unreachable => "unreachable_route",
        /// TTL / hop limit ran out.
        TtlExceeded => "ttl_exceeded",
        /// Larger than the egress MTU and may not be fragmented.
        TooBig => "too_big",
        /// Larger than the egress MTU without DF (fragmentation is not done).
        NeedsFragmentation => "needs_fragmentation",
        /// An ICMP error was due but the rate limit held it back.
        IcmpRateLimited => "icmp_rate_limited",
        /// The egress port was removed while the frame was in flight.
        PortGone => "port_gone",
        /// Arrived from another node and routed to a third one (the overlay carries no
        /// transit traffic).
        OverlayTransit => "overlay_transit",
        /// Masquerade refused a new flow: the connection-tracking table is full.
        ConntrackFull => "conntrack_full",
        /// Masquerade refused a new flow: no source port of the range is free.
        NoMasqueradePort => "nat_no_port_left",
        /// Leaving the cluster needs masquerade, and this packet cannot be masqueraded
        /// (not TCP, UDP or ICMP echo, or a later fragment).
        NotMasqueradable => "not_masqueradable",
        /// Writing to the egress port failed.
        TxFailed => "tx_failed",
        /// To a Service port with no usable endpoint: refused with ICMP port unreachable.
        ServiceNoEndpoints => "service_no_endpoints",
        /// To a node port or external IP of an `externalTrafficPolicy: Local` Service
        /// with no endpoint on this node: dropped, as kube-proxy drops it.
        ServiceNoLocalEndpoint => "service_no_local_endpoint",
        /// A new flow to a Service while the Service flow table is full.
        ServiceFlowsFull => "service_flows_full",
        /// A new flow to a Service whose replies could not be told from another flow's
        /// (one client port to two Services sharing a backend).
        ServiceReplyClash => "service_reply_clash",
        /// Denied by the NetworkPolicy ingress rules of the destination pod.
        PolicyDeniedIngress => "policy_denied_ingress",
        /// Denied by the NetworkPolicy egress rules of the source pod.
        PolicyDeniedEgress => "policy_denied_egress",
    }
}

/// One pipeline's counters.
#[derive(Debug, Clone)]
pub struct Counters {
    /// Event counts, indexed by [`Event`].
    pub events: [u64; Event::COUNT],
    /// Drop counts, indexed by [`DropReason`].
    pub drops: [u64; DropReason::COUNT],
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            events: [0; Event::COUNT],
            drops: [0; DropReason::COUNT],
        }
    }
}

impl Counters {
    /// Counts one event.
    #[inline(always)]
    pub fn event(&mut self, event: Event) {
        self.events[event as usize] += 1;
    }

    /// Adds `n` to an event count.
    #[inline(always)]
    pub fn add(&mut self, event: Event, n: u64) {
        self.events[event as usize] += n;
    }

    /// Counts one drop.
    #[inline(always)]
    pub fn drop(&mut self, reason: DropReason) {
        self.drops[reason as usize] += 1;
    }

    /// Count of one drop reason.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize]
    }

    /// Count of one event.
    pub fn count(&self, event: Event) -> u64 {
        self.events[event as usize]
    }
}
