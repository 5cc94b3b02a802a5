//! Packet buffers: fixed-size, reused, each with headroom before the frame (kept for a
//! port kind that needs to prepend; encapsulation sends its header as a separate iovec).
//!
//! A buffer holds one frame as a port delivers it: a virtio-net header (12 bytes) followed
//! by the Ethernet frame. Ports without a virtio-net header (in-memory, later AF_XDP)
//! write a zeroed one, so the pipeline sees one layout.

use crate::wire::vnet;

/// Bytes kept free before the frame, for headers a port may prepend.
pub const HEADROOM: usize = 128;
/// The largest frame a buffer holds: a virtio-net header and a 64 KiB GSO super-frame.
pub const MAX_FRAME: usize = vnet::HEADER_LEN + 14 + 65_535 + 64;
/// Frames moved per batch.
pub const BATCH: usize = 32;
/// Bytes after which a port stops filling a batch: 32 GSO super-frames would keep a worker
/// on one port for a millisecond or more (each copied in, copied out, and the receiving
/// pod's stack run in the write), while a ping on another port waits; 4 of them are
/// plenty to amortise a batch's fixed costs.
pub const BATCH_BYTES: usize = 256 * 1024;

/// One packet buffer.
pub struct PacketBuf {
    data: Box<[u8]>,
    start: usize,
    len: usize,
}

impl Default for PacketBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl PacketBuf {
    /// A zeroed buffer of [`MAX_FRAME`] bytes after [`HEADROOM`].
    pub fn new() -> Self {
        Self {
            data: vec![0; HEADROOM + MAX_FRAME].into_boxed_slice(),
            start: HEADROOM,
            len: 0,
        }
    }

    /// The frame: virtio-net header then Ethernet.
    pub fn frame(&self) -> &[u8] {
        &self.data[self.start..self.start + self.len]
    }

    /// The frame, mutable.
    pub fn frame_mut(&mut self) -> &mut [u8] {
        &mut self.data[self.start..self.start + self.len]
    }

    /// Length of the frame.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the buffer holds no frame.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// All the space from the frame start to the end of the buffer, for a port to read
    /// into; then call [`PacketBuf::set_len`]. Resets the frame start to after the headroom.
    pub fn receive_space(&mut self) -> &mut [u8] {
        self.start = HEADROOM;
        self.len = 0;
        &mut self.data[HEADROOM..]
    }

    /// Room after the frame start, in bytes.
    pub fn capacity(&self) -> usize {
        self.data.len() - self.start
    }

    /// Sets the frame length (clamped to the capacity).
    pub fn set_len(&mut self, len: usize) {
        self.len = len.min(self.capacity());
    }

    /// Copies `frame` (virtio-net header included) into the buffer.
    pub fn load(&mut self, frame: &[u8]) {
        let n = frame.len().min(MAX_FRAME);
        self.receive_space()[..n].copy_from_slice(&frame[..n]);
        self.len = n;
    }

    /// Copies an Ethernet frame in behind a zeroed virtio-net header.
    pub fn load_ethernet(&mut self, ethernet: &[u8]) {
        let n = ethernet.len().min(MAX_FRAME - vnet::HEADER_LEN);
        let space = self.receive_space();
        space[..vnet::HEADER_LEN].fill(0);
        space[vnet::HEADER_LEN..vnet::HEADER_LEN + n].copy_from_slice(&ethernet[..n]);
        self.len = vnet::HEADER_LEN + n;
    }

    /// The Ethernet frame, without the virtio-net header.
    pub fn ethernet(&self) -> &[u8] {
        self.frame().get(vnet::HEADER_LEN..).unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_and_view() {
        let mut b = PacketBuf::new();
        assert!(b.is_empty());
        b.load_ethernet(&[1, 2, 3]);
        assert_eq!(b.len(), 15);
        assert_eq!(b.ethernet(), &[1, 2, 3]);
        assert_eq!(&b.frame()[..12], &[0; 12]);
        b.set_len(usize::MAX);
        assert_eq!(b.len(), b.capacity());
    }
}
