//! A tracked flow's life: its state (which decides its timeout) and when it was last seen,
//! both atomics so that any worker can touch a flow without a lock.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

/// Nanoseconds in a second.
pub const NS: u64 = 1_000_000_000;

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;

/// Where a flow is in its life, which decides its timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Outbound packets only so far (TCP SYN sent, UDP or ICMP unanswered).
    New = 0,
    /// Replies seen.
    Established = 1,
    /// A FIN was seen.
    Closing = 2,
    /// A RST was seen.
    Closed = 3,
}

impl State {
    fn from_u8(v: u8) -> Self {
        match v {
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

/// State and last-seen time of one flow.
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

    /// A packet of the flow at `now_ns`, with its TCP flags; `reply`: in the answering
    /// direction (which establishes the flow).
    pub fn touch(&self, now_ns: u64, tcp_flags: Option<u8>, reply: bool) {
        self.last_seen_ns.store(now_ns, Ordering::Relaxed);
        let state = self.state();
        let next = match tcp_flags {
            Some(f) if f & TCP_RST != 0 => State::Closed,
            Some(f) if f & TCP_FIN != 0 && state != State::Closed => State::Closing,
            _ if reply && state == State::New => State::Established,
            _ => state,
        };
        if next != state {
            self.state.store(next as u8, Ordering::Relaxed);
        }
    }

    /// True when a flow of `protocol` has been idle past its timeout at `now_ns`.
    pub fn expired(&self, protocol: u8, now_ns: u64) -> bool {
        let idle = now_ns.saturating_sub(self.last_seen_ns.load(Ordering::Relaxed));
        idle > timeout_s(protocol, self.state()) * NS
    }

    /// Whole seconds since the last packet.
    pub fn idle_s(&self, now_ns: u64) -> u64 {
        now_ns.saturating_sub(self.last_seen_ns.load(Ordering::Relaxed)) / NS
    }
}
