//! Coalescing (GRO in user space): consecutive packets of one flow in a batch, forwarded
//! to the same TAP port, are merged into one GSO super-frame before they are written, so
//! the dataplane makes one write instead of many and the receiving stack runs its IP layer
//! once per super-frame. This stage decides which runs may merge; the merging itself is
//! [`crate::offload::gro`]'s. Two kinds share one run-walker (`coalesce`):
//!
//! * **UDP** (`Udp`): datagrams whose checksum is still partial (`NEEDS_CSUM`, as a pod's
//!   kernel sends them over a TAP with offloads) become a `UDP_L4` super-frame; the pod's
//!   kernel splits it again at the socket (`udp_rcv_segment`), so each datagram still
//!   arrives on its own. Only toward ports that accept USO.
//! * **TCP** (`Tcp`): segments that arrived from another node (decapsulated, each with a
//!   complete checksum) become a `TCPV4`/`TCPV6` super-frame, as the kernel's GRO does. A
//!   segment's checksum is verified before it is merged unless the uplink vouched for it
//!   (`F_DATA_VALID`: the outer UDP checksum covered it).

use super::counters::Counters;
use super::{Event, Verdict, L3_OFFSET};
use crate::buffer::PacketBuf;
use crate::offload::gro::{self, Datagram, Segment, MAX_SUPER};
use crate::tables::{NextHop, Port, PortRole, Tables};
use crate::wire::{vnet, VnetHeader};

/// A kind of packet that can be merged into a super-frame.
pub(super) trait Kind {
    /// What the first packet of a run tells about the run.
    type First: Copy;
    /// The event counted per merged packet.
    const EVENT: Event;
    /// Whether frames going to `egress` from `ingress` may be merged.
    fn eligible<D>(ingress: &Port<D>, egress: &Port<D>) -> bool;
    /// Parses a candidate; `None` when it cannot be merged at all.
    fn parse(frame: &[u8]) -> Option<Self::First>;
    /// Where the payload of a parsed packet starts in its frame, and its length.
    fn payload(p: &Self::First) -> (usize, usize);
    /// True when `next` continues the run of `first` after `merged` payload bytes.
    fn follows(
        first_frame: &[u8],
        first: &Self::First,
        merged: usize,
        next_frame: &[u8],
        next: &Self::First,
    ) -> bool;
    /// Takes into the first frame's headers what a merged packet adds (TCP: PSH).
    fn absorb(_first_frame: &mut [u8], _first: &Self::First, _next_frame: &[u8]) {}
    /// Rewrites the grown first frame's headers for `total` payload bytes.
    fn finish(frame: &mut PacketBuf, first: Self::First, total: usize);
}

/// Merges runs of packets of kind `K` in place: the first of a run grows into a GSO
/// super-frame, the others get [`Verdict::Merged`].
pub(super) fn coalesce<K: Kind, D>(
    tables: &Tables<D>,
    ingress: &Port<D>,
    frames: &mut [PacketBuf],
    verdicts: &mut [Verdict],
    counters: &mut Counters,
) {
    let mut i = 0;
    while i < frames.len() {
        let Verdict::Forward(nh) = verdicts[i] else {
            i += 1;
            continue;
        };
        let ok = matches!(tables.nexthop(nh), Some(NextHop::Port(p)) if K::eligible(ingress, p));
        let Some(first) = ok.then(|| K::parse(frames[i].frame())).flatten() else {
            i += 1;
            continue;
        };
        let (start, size) = K::payload(&first);
        let mut total = size;
        let mut j = i + 1;
        while j < frames.len() && verdicts[j] == Verdict::Forward(nh) {
            let Some(next) = K::parse(frames[j].frame()) else {
                break;
            };
            let (next_start, next_size) = K::payload(&next);
            if next_size > size
                || start + total + next_size > MAX_SUPER
                || !K::follows(frames[i].frame(), &first, total, frames[j].frame(), &next)
            {
                break;
            }
            let (head, tail) = frames.split_at_mut(j);
            let into = &mut head[i];
            K::absorb(into.frame_mut(), &first, tail[0].frame());
            let old = into.len();
            into.set_len(old + next_size);
            into.frame_mut()[old..]
                .copy_from_slice(&tail[0].frame()[next_start..next_start + next_size]);
            total += next_size;
            verdicts[j] = Verdict::Merged;
            counters.event(K::EVENT);
            j += 1;
            if next_size < size {
                break; // only the last segment may be short
            }
        }
        if j > i + 1 {
            K::finish(&mut frames[i], first, total);
        }
        i = j;
    }
}

/// UDP datagrams with partial checksums, toward ports that accept USO.
pub(super) struct Udp;

impl Kind for Udp {
    type First = Datagram;
    const EVENT: Event = Event::UdpCoalesced;

    fn eligible<D>(_: &Port<D>, egress: &Port<D>) -> bool {
        egress.accepts_udp_gso
    }

    fn parse(frame: &[u8]) -> Option<Datagram> {
        gro::udp_datagram(frame)
    }

    fn payload(d: &Datagram) -> (usize, usize) {
        d.payload()
    }

    fn follows(a: &[u8], first: &Datagram, _: usize, b: &[u8], next: &Datagram) -> bool {
        first.continued_by(a, b, next)
    }

    fn finish(frame: &mut PacketBuf, first: Datagram, total: usize) {
        gro::udp_finish(frame.frame_mut(), &first, total)
    }
}

/// TCP segments from another node (decapsulated) toward local ports.
pub(super) struct Tcp;

impl Kind for Tcp {
    type First = Segment;
    const EVENT: Event = Event::TcpCoalesced;

    fn eligible<D>(ingress: &Port<D>, egress: &Port<D>) -> bool {
        ingress.role == PortRole::Uplink && egress.role != PortRole::Uplink
    }

    fn parse(frame: &[u8]) -> Option<Segment> {
        let vh = VnetHeader::new_checked(frame).ok()?;
        if vh.is_gso() || vh.flags() & vnet::F_NEEDS_CSUM != 0 {
            return None;
        }
        gro::tcp_segment(
            frame.get(L3_OFFSET..)?,
            vh.flags() & vnet::F_DATA_VALID != 0,
        )
    }

    fn payload(s: &Segment) -> (usize, usize) {
        (L3_OFFSET + s.payload_offset(), s.payload_len())
    }

    fn follows(a: &[u8], first: &Segment, merged: usize, b: &[u8], next: &Segment) -> bool {
        gro::tcp_follows(&a[L3_OFFSET..], first, merged, &b[L3_OFFSET..], next)
    }

    fn absorb(first_frame: &mut [u8], first: &Segment, next_frame: &[u8]) {
        gro::tcp_absorb(
            &mut first_frame[L3_OFFSET..],
            first,
            &next_frame[L3_OFFSET..],
        );
    }

    fn finish(frame: &mut PacketBuf, first: Segment, total: usize) {
        gro::tcp_finish(frame.frame_mut(), &first, total);
    }
}
