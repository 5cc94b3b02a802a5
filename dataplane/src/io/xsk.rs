//! An AF_XDP socket (XSK) bound to one queue of a device, with a UMEM of its own, in copy
//! mode (what veth offers): the kernel writes received frames into UMEM frames the socket
//! lent it on the fill ring and announces them on the RX ring; frames to send are written
//! into free UMEM frames and posted on the TX ring, and come back on the completion ring
//! once sent. Every ring is a single-producer, single-consumer array shared with the
//! kernel through `mmap`, with the producer and consumer indexes as atomics.
//!
//! Part of the UMEM circulates between the fill and RX rings (receiving), the rest between
//! the TX and completion rings (sending); each ring holds as many entries as its part has
//! frames, so no ring can overflow. The receiving part's size is the caller's choice
//! ([`XskSocket::bind`]): a pod's port receives at its pod's pace, an uplink at a whole
//! network's, whose bursts a small ring drops. The frames reach
//! [`super::xdp::XdpRedirect`]'s map through [`XskSocket::raw_fd`].
// Unsafe code here: the socket's setup (setsockopt/getsockopt/mmap with the kernel's
// structures) and the rings, which live in memory shared with the kernel.
#![allow(unsafe_code)]

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

/// Bytes per UMEM frame, by default.
pub const FRAME_SIZE: usize = 4096;
/// Room the kernel keeps before a received frame in copy mode (`XDP_PACKET_HEADROOM`).
const KERNEL_HEADROOM: usize = 256;

/// The UMEM frame size that holds an Ethernet frame of `mtu` bytes of payload: 2 KiB when
/// it fits (half the memory), else 4 KiB.
pub fn frame_size_for(mtu: u32) -> usize {
    if mtu as usize + 14 <= 2048 - KERNEL_HEADROOM {
        2048
    } else {
        FRAME_SIZE
    }
}
/// Entries of the TX and completion rings, and frames of the sending part of the UMEM.
const TX_RING: u32 = 512;
/// Entries of the fill and RX rings of a pod's port (frames of the receiving part).
pub const POD_RX_RING: u32 = 512;
/// Entries of the fill and RX rings of an uplink: an outside sender's burst at the
/// kernel's speed overflowed [`POD_RX_RING`] entries (frames dropped at the device).
pub const UPLINK_RX_RING: u32 = 4096;
const _: () = assert!(
    TX_RING.is_power_of_two() && POD_RX_RING.is_power_of_two() && UPLINK_RX_RING.is_power_of_two()
);

/// An anonymous or shared mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; which thread may touch which part is decided by
// the rings' protocol, and `XskSocket`'s methods take `&mut self`.
unsafe impl Send for Mapping {}

impl Mapping {
    fn new(len: usize, fd: Option<(RawFd, libc::off_t)>) -> io::Result<Self> {
        let (flags, fd, offset) = match fd {
            Some((fd, offset)) => (libc::MAP_SHARED | libc::MAP_POPULATE, fd, offset),
            None => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            ),
        };
        // SAFETY: a new mapping at an address the kernel picks; nothing else is touched.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are a mapping this value made and nothing uses it any more.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One ring: its indexes, flags and entries inside a mapping shared with the kernel.
struct Ring<T> {
    /// Entries less one (a power of two less one): an index's slot is `index & mask`.
    mask: u32,
    producer: *const AtomicU32,
    consumer: *const AtomicU32,
    flags: *const AtomicU32,
    entries: *mut T,
    _map: Mapping,
}

// SAFETY: as for `Mapping`: the ring protocol decides who writes what.
unsafe impl<T> Send for Ring<T> {}

impl<T: Copy> Ring<T> {
    fn map(
        fd: RawFd,
        offsets: &libc::xdp_ring_offset,
        page_offset: u64,
        entries: u32,
    ) -> io::Result<Self> {
        let len = offsets.desc as usize + entries as usize * size_of::<T>();
        let map = Mapping::new(len, Some((fd, page_offset as libc::off_t)))?;
        let at = |offset: u64| -> *mut u8 {
            // SAFETY: the kernel's offsets lie inside the mapping of `len` bytes.
            unsafe { map.ptr.add(offset as usize) }
        };
        Ok(Self {
            mask: entries - 1,
            producer: at(offsets.producer).cast(),
            consumer: at(offsets.consumer).cast(),
            flags: at(offsets.flags).cast(),
            entries: at(offsets.desc).cast(),
            _map: map,
        })
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: points into the live mapping, at a 4-byte aligned u32 the kernel shares.
        unsafe { &*self.producer }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as above.
        unsafe { &*self.consumer }
    }

    fn needs_wakeup(&self) -> bool {
        // SAFETY: as above.
        unsafe { &*self.flags }.load(Ordering::Relaxed) & libc::XDP_RING_NEED_WAKEUP != 0
    }

    /// Takes the next entry, as the ring's consumer.
    fn pop(&mut self) -> Option<T> {
        let consumer = self.consumer().load(Ordering::Relaxed);
        if consumer == self.producer().load(Ordering::Acquire) {
            return None;
        }
        // SAFETY: the entry at `consumer` was published by the producer (acquired above)
        // and lies within the ring's `mask + 1` entries.
        let entry = unsafe { *self.entries.add((consumer & self.mask) as usize) };
        self.consumer()
            .store(consumer.wrapping_add(1), Ordering::Release);
        Some(entry)
    }

    /// Adds an entry, as the ring's producer; the caller never has more than the ring's
    /// entries outstanding.
    fn push(&mut self, entry: T) {
        let producer = self.producer().load(Ordering::Relaxed);
        // SAFETY: the slot is within the ring, and not the consumer's until published.
        unsafe { *self.entries.add((producer & self.mask) as usize) = entry };
        self.producer()
            .store(producer.wrapping_add(1), Ordering::Release);
    }
}

/// An AF_XDP socket bound to one queue of one device.
pub struct XskSocket {
    rx: Ring<libc::xdp_desc>,
    tx: Ring<libc::xdp_desc>,
    fill: Ring<u64>,
    completion: Ring<u64>,
    /// Sending frames not in flight.
    free: Vec<u64>,
    /// Bytes per UMEM frame.
    frame_size: usize,
    /// Whether frames were posted since the last flush.
    posted: bool,
    umem: Mapping,
    fd: OwnedFd,
}

fn set_option<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` is the structure or int the option reads, valid for the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl XskSocket {
    /// Opens a socket with its UMEM (frames of `frame_size` bytes: 2048 or 4096) and rings
    /// (`rx_ring` receiving entries: [`POD_RX_RING`] or [`UPLINK_RX_RING`], a power of two)
    /// and binds it, in copy mode, to queue `queue` of the device `ifindex` in the caller's
    /// namespace.
    pub fn bind(ifindex: u32, queue: u32, frame_size: usize, rx_ring: u32) -> io::Result<Self> {
        if frame_size != 2048 && frame_size != FRAME_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "UMEM frames are 2048 or 4096 bytes",
            ));
        }
        if !rx_ring.is_power_of_two() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "ring sizes are powers of two",
            ));
        }
        // SAFETY: socket(2) with constant arguments.
        let raw = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` was just returned by socket(2) and nobody else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // Copy mode builds an skb per frame sent, charged to the socket until the receiver
        // frees it: the default send buffer (~200 KiB) would stop the ring after about a
        // hundred frames. Room for every sending frame; best effort.
        let sndbuf = (TX_RING as usize * 2 * frame_size) as libc::c_int;
        let _ = set_option(&fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &sndbuf)
            .or_else(|_| set_option(&fd, libc::SOL_SOCKET, libc::SO_SNDBUF, &sndbuf));
        let frames = (rx_ring + TX_RING) as usize;
        let umem = Mapping::new(frames * frame_size, None)?;
        let reg = libc::xdp_umem_reg {
            addr: umem.ptr as u64,
            len: umem.len as u64,
            chunk_size: frame_size as u32,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        set_option(&fd, libc::SOL_XDP, libc::XDP_UMEM_REG, &reg)?;
        for (ring, size) in [
            (libc::XDP_UMEM_FILL_RING, rx_ring),
            (libc::XDP_UMEM_COMPLETION_RING, TX_RING),
            (libc::XDP_RX_RING, rx_ring),
            (libc::XDP_TX_RING, TX_RING),
        ] {
            set_option(&fd, libc::SOL_XDP, ring, &(size as libc::c_int))?;
        }
        // SAFETY: an all-zero `xdp_mmap_offsets` is valid (plain integers).
        let mut offsets: libc::xdp_mmap_offsets = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::xdp_mmap_offsets>() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `offsets`.
        let rc = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_XDP,
                libc::XDP_MMAP_OFFSETS,
                (&mut offsets as *mut libc::xdp_mmap_offsets).cast(),
                &mut len,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let raw = fd.as_raw_fd();
        let rx = Ring::map(raw, &offsets.rx, libc::XDP_PGOFF_RX_RING as u64, rx_ring)?;
        let tx = Ring::map(raw, &offsets.tx, libc::XDP_PGOFF_TX_RING as u64, TX_RING)?;
        let mut fill = Ring::map(raw, &offsets.fr, libc::XDP_UMEM_PGOFF_FILL_RING, rx_ring)?;
        let completion = Ring::map(
            raw,
            &offsets.cr,
            libc::XDP_UMEM_PGOFF_COMPLETION_RING,
            TX_RING,
        )?;
        for frame in 0..u64::from(rx_ring) {
            fill.push(frame * frame_size as u64);
        }
        let free = (u64::from(rx_ring)..frames as u64)
            .map(|frame| frame * frame_size as u64)
            .collect();
        let address = libc::sockaddr_xdp {
            sxdp_family: libc::AF_XDP as u16,
            sxdp_flags: libc::XDP_COPY | libc::XDP_USE_NEED_WAKEUP,
            sxdp_ifindex: ifindex,
            sxdp_queue_id: queue,
            sxdp_shared_umem_fd: 0,
        };
        // SAFETY: `address` is a complete `sockaddr_xdp` of the length given.
        let rc = unsafe {
            libc::bind(
                raw,
                (&address as *const libc::sockaddr_xdp).cast(),
                size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            rx,
            tx,
            fill,
            completion,
            free,
            frame_size,
            posted: false,
            umem,
            fd,
        })
    }

    /// The socket, to register in the device's XDP map and to poll for readability.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    fn frame(&mut self, addr: u64, len: usize) -> &mut [u8] {
        let at = (addr as usize).min(self.umem.len);
        let len = len.min(self.frame_size).min(self.umem.len - at);
        // SAFETY: `at..at + len` lies inside the UMEM, and the frame is this side's: the
        // kernel handed it over on the RX or completion ring, or never had it.
        unsafe { std::slice::from_raw_parts_mut(self.umem.ptr.add(at), len) }
    }

    /// Copies the next received frame into `out`; returns its length (cut to `out`'s), or
    /// `None` when nothing has arrived. Its UMEM frame goes back to the fill ring.
    pub fn recv(&mut self, out: &mut [u8]) -> Option<usize> {
        self.recv_with(|frame| {
            let len = frame.len().min(out.len());
            out[..len].copy_from_slice(&frame[..len]);
            len
        })
    }

    /// Hands the next received frame, in place in the UMEM, to `take`, and returns what it
    /// returns, or `None` when nothing has arrived. The UMEM frame then goes back to the
    /// fill ring.
    pub fn recv_with<R>(&mut self, take: impl FnOnce(&[u8]) -> R) -> Option<R> {
        let desc = self.rx.pop()?;
        let out = take(self.frame(desc.addr, desc.len as usize));
        self.fill
            .push(desc.addr - desc.addr % self.frame_size as u64);
        if self.fill.needs_wakeup() {
            self.kick_rx();
        }
        Some(out)
    }

    /// Sends `frame` (at most a UMEM frame) now: [`XskSocket::post`], then
    /// [`XskSocket::flush`].
    pub fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        self.post(frame)?;
        self.flush()
    }

    /// Posts `frame` (at most a UMEM frame) on the TX ring; it leaves at the next
    /// [`XskSocket::flush`]. `WouldBlock` when every sending frame is in flight.
    pub fn post(&mut self, frame: &[u8]) -> io::Result<()> {
        self.post_parts(&[frame])
    }

    /// Posts the concatenation of `parts` as one frame, as [`XskSocket::post`] does: each
    /// part is copied once, into the UMEM frame.
    pub fn post_parts(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > self.frame_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame larger than a UMEM frame",
            ));
        }
        if self.free.is_empty() {
            self.reclaim();
        }
        if self.free.is_empty() {
            // Everything is on the ring (a segmented super-frame is many frames): send it
            // to get frames back.
            self.flush()?;
            self.reclaim();
        }
        let addr = self.free.pop().ok_or(io::ErrorKind::WouldBlock)?;
        let mut frame = self.frame(addr, len);
        for part in parts {
            let (head, rest) = frame.split_at_mut(part.len());
            head.copy_from_slice(part);
            frame = rest;
        }
        self.tx.push(libc::xdp_desc {
            addr,
            len: len as u32,
            options: 0,
        });
        self.posted = true;
        Ok(())
    }

    /// Takes back the frames the kernel has sent.
    fn reclaim(&mut self) {
        while let Some(done) = self.completion.pop() {
            self.free.push(done);
        }
    }

    /// Sends what [`XskSocket::post`] queued. Copy mode sends from the system call, at
    /// most 32 frames per call: it is repeated while the kernel leaves frames on the ring
    /// (`EAGAIN`), a bounded number of times.
    pub fn flush(&mut self) -> io::Result<()> {
        if !std::mem::take(&mut self.posted) {
            return Ok(());
        }
        for _ in 0..TX_RING / 32 + 1 {
            // SAFETY: sendto(2) with no data and no address: the TX ring is the payload.
            let rc = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    std::ptr::null(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null(),
                    0,
                )
            };
            if rc >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                // More than one call's worth, or the device was busy: call again.
                Some(libc::EAGAIN | libc::EBUSY) => {}
                // Out of buffers: what is left waits for the next flush.
                Some(libc::ENOBUFS) => {
                    self.posted = true;
                    return Ok(());
                }
                _ => return Err(err),
            }
            if self.tx.consumer().load(Ordering::Acquire)
                == self.tx.producer().load(Ordering::Relaxed)
            {
                return Ok(());
            }
        }
        self.posted = true;
        Ok(())
    }

    fn kick_rx(&self) {
        // SAFETY: recvfrom(2) with no buffer: tells the kernel the fill ring has frames.
        unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                std::ptr::null_mut(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_2_kib_while_a_full_frame_fits_behind_the_kernel_headroom() {
        assert_eq!(frame_size_for(1500), 2048);
        assert_eq!(frame_size_for(1778), 2048);
        assert_eq!(frame_size_for(1779), 4096);
        assert_eq!(frame_size_for(3506), 4096);
    }

    #[test]
    fn a_receive_ring_that_is_not_a_power_of_two_is_refused_before_any_socket() {
        let refused = XskSocket::bind(1, 0, 2048, 3000).err().map(|e| e.kind());
        assert_eq!(refused, Some(io::ErrorKind::InvalidInput));
    }
}
