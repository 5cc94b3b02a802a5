//! The batch's last route: the next hop of the last flow the batch forwarded, so that the
//! next packet of that flow is not looked up again.
//!
//! A batch comes from one port under one snapshot of the tables, so within it every
//! packet of a flow that no stage translated goes the same way: the same address checks
//! (the gateway's own address, martians), the same longest-prefix match and the same
//! policy verdict. A packet with the remembered tuple takes the remembered next hop and
//! skips those; what depends on the packet itself still runs for each one (the source
//! check, the header checksum, the TTL, the MTU, masquerade on the way out, the rewrite).
//! A bulk transfer's batch is mostly one flow, and its packets then pay one comparison of
//! their raw tuple in place of the lookups and the policy stage.

use super::tuple::RawTuple;

/// The last flow forwarded in the batch being processed, and its next hop.
#[derive(Debug, Default)]
pub(super) struct RouteMemo {
    last: Option<(RawTuple, u32)>,
}

impl RouteMemo {
    /// Forgets the flow of the previous batch (another port, perhaps other tables).
    #[inline]
    pub fn forget(&mut self) {
        self.last = None;
    }

    /// The next hop of the batch's last forwarded flow, when `tuple` is that flow's.
    #[inline(always)]
    pub fn get(&self, tuple: &RawTuple) -> Option<u32> {
        match &self.last {
            Some((last, nh)) if last == tuple => Some(*nh),
            _ => None,
        }
    }

    /// Remembers that packets with `tuple` were forwarded to the next hop `nh` after every
    /// check that depends on their addresses and ports passed.
    #[inline]
    pub fn keep(&mut self, tuple: RawTuple, nh: u32) {
        self.last = Some((tuple, nh));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::tuple::{raw_tuple, tests::v4};
    use crate::wire::tcp;

    #[test]
    fn a_memo_answers_only_its_own_flow_and_only_until_forgotten() {
        let ack = raw_tuple(&v4(6, tcp::FLAG_ACK, 0), false).unwrap();
        let mut reply = v4(6, tcp::FLAG_ACK, 0);
        reply[20..24].copy_from_slice(&[0, 80, 0x9c, 0x40]);
        let other_way = raw_tuple(&reply, false).unwrap();
        let udp = raw_tuple(&v4(17, 0, 0), false).unwrap();
        let mut memo = RouteMemo::default();
        assert_eq!(memo.get(&ack), None, "nothing kept yet");
        memo.keep(ack, 7);
        assert_eq!(memo.get(&ack), Some(7));
        assert_eq!(memo.get(&other_way), None, "the flow's other direction");
        assert_eq!(memo.get(&udp), None, "same addresses and ports, UDP");
        memo.keep(udp, 3);
        assert_eq!(memo.get(&ack), None, "only the last flow is kept");
        assert_eq!(memo.get(&udp), Some(3));
        memo.forget();
        assert_eq!(memo.get(&udp), None, "a new batch");
    }
}
