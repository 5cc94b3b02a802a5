//! A tracked flow's life: its state (which decides its timeout) and when it was last seen,
//! both atomics so that any worker can touch a flow without a lock.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// Nanoseconds in a second.
pub const NS: u64 = 1_000_000_000;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;

/// The bits of [`Liveness`]' byte that hold the [`State`].
const STATE_BITS: u8 = 0x0f;
/// A packet in the original direction was seen.
const SEEN_ORIGINAL: u8 = 0x10;
/// A packet in the reply direction was seen.
const SEEN_REPLY: u8 = 0x20;
/// The flow's first packet was in the reply direction (a client of a published port).
const OPENED_BY_REPLY: u8 = 0x40;

/// Where a flow is in its life, which decides its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Not established yet: UDP or ICMP unanswered, a TCP handshake not completed (the
    /// opener has not sent again since the answer).
    New = 0,
    /// Answered: UDP or ICMP seen both ways; TCP once the opener sent a segment without
    /// SYN after the other side answered (the handshake's last ACK).
    Established = 1,
    /// A FIN was seen.
    Closing = 2,
    /// A RST was seen.
    Closed = 3,
}

impl State {
    fn from_u8(v: u8) -> Self {
        match v & STATE_BITS {
            1 => State::Established,
            2 => State::Closing,
            3 => State::Closed,
            _ => State::New,
        }
    }

    /// Lower-case name, as listed.
    pub fn name(self) -> &'static str {
        match self {
            State::New => "new",
            State::Established => "established",
            State::Closing => "closing",
            State::Closed => "closed",
        }
    }
}

/// Idle time after which a flow expires, by protocol and state, in seconds.
pub fn timeout_s(protocol: u8, state: State) -> u64 {
    match (protocol, state) {
        (6, State::New) => 60,
        (6, State::Established) => 86_400,
        (6, State::Closing) => 120,
        (6, State::Closed) => 10,
        (17, State::Established) => 180,
        _ => 30,
    }
}

/// State and last-seen time of one flow. The state byte also records which directions
/// have been seen and which opened the flow (a masqueraded flow starts with its original
/// direction, a flow to a published port with the client's packet, which is its reply
/// direction), so that a flood of SYNs, answered or not, never establishes a flow.
#[derive(Debug)]
pub struct Liveness {
    state: AtomicU8,
    last_seen_ns: AtomicU64,
}

impl Liveness {
    /// A new flow seen at `now_ns`.
    pub fn new(now_ns: u64) -> Self {
        Self {
            state: AtomicU8::new(State::New as u8),
            last_seen_ns: AtomicU64::new(now_ns),
        }
    }

    /// Its state now.
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// A packet of the flow at `now_ns`, with its TCP flags (`None`: not TCP); `reply`: in
    /// the answering direction. Returns whether the state byte changed.
    pub fn touch(&self, now_ns: u64, tcp_flags: Option<u8>, reply: bool) -> bool {
        self.last_seen_ns.store(now_ns, Ordering::Relaxed);
        let old = self.state.load(Ordering::Relaxed);
        let this = if reply { SEEN_REPLY } else { SEEN_ORIGINAL };
        let both = SEEN_ORIGINAL | SEEN_REPLY;
        let opener = match old {
            _ if old & both == 0 => this,
            _ if old & OPENED_BY_REPLY != 0 => SEEN_REPLY,
            _ => SEEN_ORIGINAL,
        };
        let answered_before = old & both & !opener != 0;
        let mut bits = (old & !STATE_BITS) | this;
        if opener == SEEN_REPLY {
            bits |= OPENED_BY_REPLY;
        }
        let state = State::from_u8(old);
        let next = match tcp_flags {
            Some(f) if f & TCP_RST != 0 => State::Closed,
            Some(f) if f & TCP_FIN != 0 && state != State::Closed => State::Closing,
            Some(f)
                if state == State::New && answered_before && this == opener && f & TCP_SYN == 0 =>
            {
                State::Established
            }
            None if state == State::New && bits & both == both => State::Established,
            _ => state,
        };
        let new = bits | next as u8;
        if new != old {
            self.state.store(new, Ordering::Relaxed);
        }
        new != old
    }

    /// True while the flow may be dropped to make room for a new one: never answered, its
    /// handshake not completed, or reset.
    pub fn unassured(&self) -> bool {
        matches!(self.state(), State::New | State::Closed)
    }

    /// A flow read back from a journal: its state byte as [`Liveness::bits`] gave it,
    /// seen at `now_ns` (its idle time starts again).
    pub fn restored(bits: u8, now_ns: u64) -> Self {
        Self {
            state: AtomicU8::new(bits),
            last_seen_ns: AtomicU64::new(now_ns),
        }
    }

    /// The state byte (state and directions seen), to be written where it outlives the
    /// process.
    pub fn bits(&self) -> u8 {
        self.state.load(Ordering::Relaxed)
    }

    /// Whether `bits` could be a state byte.
    pub fn valid_bits(bits: u8) -> bool {
        bits & STATE_BITS <= State::Closed as u8
            && bits & !(STATE_BITS | SEEN_ORIGINAL | SEEN_REPLY | OPENED_BY_REPLY) == 0
    }

    /// When the last packet was seen.
    pub fn last_seen_ns(&self) -> u64 {
        self.last_seen_ns.load(Ordering::Relaxed)
    }

    /// True when a flow of `protocol` has been idle past its timeout at `now_ns`.
    pub fn expired(&self, protocol: u8, now_ns: u64) -> bool {
        let idle = now_ns.saturating_sub(self.last_seen_ns());
        idle > timeout_s(protocol, self.state()) * NS
    }

    /// Whole seconds since the last packet.
    pub fn idle_s(&self, now_ns: u64) -> u64 {
        now_ns.saturating_sub(self.last_seen_ns()) / NS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_is_established_by_the_openers_segment_after_the_answer() {
        let out_first = Liveness::new(0);
        out_first.touch(0, Some(0x02), false);
        out_first.touch(1, Some(0x02), false);
        assert_eq!(out_first.state(), State::New, "a retransmitted SYN");
        out_first.touch(2, Some(0x12), true);
        assert_eq!(
            out_first.state(),
            State::New,
            "answered, handshake not done"
        );
        assert!(out_first.unassured());
        out_first.touch(3, Some(0x10), false);
        assert_eq!(out_first.state(), State::Established);
        assert!(!out_first.unassured());
        // A client's SYN to a published port arrives in the reply direction.
        let reply_first = Liveness::new(0);
        reply_first.touch(0, Some(0x02), true);
        reply_first.touch(1, Some(0x12), false);
        reply_first.touch(2, Some(0x02), true);
        assert_eq!(
            reply_first.state(),
            State::New,
            "a SYN flood never establishes"
        );
        assert!(reply_first.expired(6, 63 * NS), "and expires as new");
        reply_first.touch(3, Some(0x10), true);
        assert_eq!(reply_first.state(), State::Established);
        reply_first.touch(4, Some(0x11), true);
        assert_eq!(reply_first.state(), State::Closing);
        reply_first.touch(5, Some(0x10), false);
        assert_eq!(
            reply_first.state(),
            State::Closing,
            "the direction bits stay apart"
        );
        reply_first.touch(6, Some(0x04), false);
        assert!(reply_first.unassured(), "a reset flow may make room");
    }

    #[test]
    fn udp_and_icmp_are_established_once_seen_both_ways() {
        let flow = Liveness::new(0);
        flow.touch(0, None, false);
        flow.touch(1, None, false);
        assert_eq!(flow.state(), State::New);
        flow.touch(2, None, true);
        assert_eq!(flow.state(), State::Established);
    }
}
