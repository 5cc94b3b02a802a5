//! In-memory ports: a pair of bounded queues between the switch and a peer (a test, a
//! benchmark, a smoltcp stack). Frame vectors are recycled, so the steady state does not
//! allocate.

use crate::buffer::PacketBuf;
use crossbeam_queue::ArrayQueue;
use std::io;
use std::sync::Arc;

struct Queues {
    to_switch: ArrayQueue<Vec<u8>>,
    from_switch: ArrayQueue<Vec<u8>>,
    spare: ArrayQueue<Vec<u8>>,
}

/// The switch's end of an in-memory port.
pub struct MemoryPort {
    queues: Arc<Queues>,
}

/// The peer's end: what a pod would see. Frames carry a virtio-net header first.
#[derive(Clone)]
pub struct MemoryPeer {
    queues: Arc<Queues>,
}

/// A connected port and peer with room for `depth` frames each way.
pub fn pair(depth: usize) -> (MemoryPort, MemoryPeer) {
    let queues = Arc::new(Queues {
        to_switch: ArrayQueue::new(depth),
        from_switch: ArrayQueue::new(depth),
        spare: ArrayQueue::new(depth * 2),
    });
    (
        MemoryPort {
            queues: queues.clone(),
        },
        MemoryPeer { queues },
    )
}

fn filled(spare: &ArrayQueue<Vec<u8>>, frame: &[u8]) -> Vec<u8> {
    let mut v = spare.pop().unwrap_or_default();
    v.clear();
    v.extend_from_slice(frame);
    v
}

impl MemoryPort {
    pub(super) fn recv_batch(&self, bufs: &mut [PacketBuf]) -> usize {
        let (mut n, mut bytes) = (0, 0);
        while n < bufs.len() && bytes < crate::buffer::BATCH_BYTES {
            let Some(frame) = self.queues.to_switch.pop() else {
                break;
            };
            bufs[n].load(&frame);
            bytes += frame.len();
            let _ = self.queues.spare.push(frame);
            n += 1;
        }
        n
    }

    pub(super) fn send(&self, frame: &[u8]) -> io::Result<()> {
        let v = filled(&self.queues.spare, frame);
        self.queues.from_switch.push(v).map_err(|v| {
            let _ = self.queues.spare.push(v);
            io::Error::from(io::ErrorKind::WouldBlock)
        })
    }
}

impl MemoryPeer {
    /// Sends a frame (virtio-net header included) to the switch; false when the queue is full.
    pub fn send(&self, frame: &[u8]) -> bool {
        let v = filled(&self.queues.spare, frame);
        self.queues.to_switch.push(v).is_ok()
    }

    /// Sends an Ethernet frame behind a zeroed virtio-net header.
    pub fn send_ethernet(&self, ethernet: &[u8]) -> bool {
        let mut v = self.queues.spare.pop().unwrap_or_default();
        v.clear();
        v.resize(crate::wire::vnet::HEADER_LEN, 0);
        v.extend_from_slice(ethernet);
        self.queues.to_switch.push(v).is_ok()
    }

    /// Takes the next frame the switch sent (virtio-net header included).
    pub fn recv(&self) -> Option<Vec<u8>> {
        self.queues.from_switch.pop()
    }

    /// Gives a received frame's memory back for reuse.
    pub fn recycle(&self, frame: Vec<u8>) {
        let _ = self.queues.spare.push(frame);
    }

    /// Frames waiting for the switch.
    pub fn pending_to_switch(&self) -> usize {
        self.queues.to_switch.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_cross_both_ways() {
        let (port, peer) = pair(4);
        assert!(peer.send(&[0; 12]));
        assert!(peer.send_ethernet(&[1, 2, 3]));
        let mut bufs: Vec<PacketBuf> = (0..4).map(|_| PacketBuf::new()).collect();
        assert_eq!(port.recv_batch(&mut bufs), 2);
        assert_eq!(bufs[1].ethernet(), &[1, 2, 3]);
        port.send(bufs[1].frame()).unwrap();
        let got = peer.recv().unwrap();
        assert_eq!(&got[12..], &[1, 2, 3]);
        peer.recycle(got);
        assert!(peer.recv().is_none());
        for _ in 0..4 {
            port.send(&[0]).unwrap();
        }
        assert!(
            port.send(&[0]).is_err(),
            "a full queue refuses, never blocks"
        );
    }
}
