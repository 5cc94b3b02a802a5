//! Ports: where frames enter and leave the dataplane, and the system calls that set the
//! node up (netlink, namespaces). The workspace denies `unsafe`; the submodules that make
//! raw system calls say so with `#![allow(unsafe_code)]`, and each block has a
//! `// SAFETY:` line.
//!
//! A port moves *batches*: [`PortIo::recv_batch`] fills several buffers per call until the
//! device has nothing left, [`PortIo::send`] writes one frame. Kinds:
//! * [`tap::TapDevice`]: a TAP device inside the pod's namespace, with a virtio-net
//!   header and TSO/USO offloads, so GSO super-frames cross unsegmented;
//! * [`afxdp::AfXdpPort`]: a veth pair into the pod's namespace whose node end hands its
//!   frames to AF_XDP sockets; sent to with [`afxdp::AfXdpPort::post`], which queues on
//!   the ring, and [`afxdp::AfXdpPort::flush`] once per batch;
//! * [`memory::MemoryPort`]: queues in memory, for tests, benchmarks and fuzzing;
//! * [`uplink::Uplink`]: the node's sockets that carry pod traffic to and from other
//!   nodes (VXLAN, IP-in-IP); sent to with [`uplink::Uplink::send_to`], which
//!   encapsulates.

pub mod afxdp;
pub mod bpf;
pub mod handover;
pub mod interface;
pub mod links;
pub mod memory;
pub mod netlink;
pub mod netns;
pub mod next_hops;
pub mod poller;
pub mod shared;
pub mod steering;
pub mod tap;
pub mod uplink;
pub mod uplink_xdp;
pub mod xdp;
pub mod xsk;

use crate::buffer::PacketBuf;
use std::io;
use std::os::fd::RawFd;

/// The device behind a port.
pub enum PortIo {
    /// A TAP device in a pod's network namespace.
    Tap(tap::TapDevice),
    /// An in-memory port.
    Memory(memory::MemoryPort),
    /// The overlay's sockets.
    Uplink(uplink::Uplink),
    /// A veth pair into a pod's namespace, read and written through AF_XDP sockets.
    AfXdp(afxdp::AfXdpPort),
}

impl PortIo {
    /// Reads frames from queue `queue` into `bufs` until the queue is empty or `bufs` is
    /// full, with at most `calls` read calls on the port's own descriptor (a device that
    /// takes one frame or datagram per read, [`PortIo::reads_one_per_call`], reads one
    /// per call, the others a batch; none when `calls` is 0, which leaves only an
    /// uplink's AF_XDP ring to read); returns how many were read. An error is returned
    /// only if nothing was read. Each worker uses its own queue number.
    pub fn recv_batch(
        &self,
        queue: usize,
        bufs: &mut [PacketBuf],
        calls: usize,
    ) -> io::Result<usize> {
        match self {
            PortIo::Tap(tap) => tap.recv_batch(queue, bufs, calls),
            PortIo::Memory(mem) => Ok(mem.recv_batch(bufs)),
            PortIo::Uplink(up) => up.recv_batch(queue, bufs, calls),
            PortIo::AfXdp(port) => port.recv_batch(queue, bufs),
        }
    }

    /// Writes one frame (virtio-net header included) through queue `queue`. An uplink
    /// needs a destination: use [`uplink::Uplink::send_to`]; an AF_XDP port sends in
    /// batches: use [`afxdp::AfXdpPort::post`].
    pub fn send(&self, queue: usize, frame: &[u8]) -> io::Result<()> {
        match self {
            PortIo::Tap(tap) => tap.send(queue, frame),
            PortIo::Memory(mem) => mem.send(frame),
            PortIo::Uplink(_) | PortIo::AfXdp(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "this port sends through its own call, not PortIo::send",
            )),
        }
    }

    /// The file descriptor of queue `queue` to poll for readability, if the port has one.
    pub fn raw_fd(&self, queue: usize) -> Option<RawFd> {
        match self {
            PortIo::Tap(tap) => Some(tap.raw_fd(queue)),
            PortIo::Memory(_) => None,
            PortIo::Uplink(up) => up.raw_fd(queue),
            PortIo::AfXdp(port) => Some(port.raw_fd(queue)),
        }
    }

    /// Every descriptor worker `queue` polls for this port: [`PortIo::raw_fd`], and an
    /// uplink's AF_XDP socket beside its UDP socket.
    pub fn fds(&self, queue: usize) -> impl Iterator<Item = RawFd> {
        let extra = match self {
            PortIo::Uplink(up) => up.xdp_fd(queue),
            _ => None,
        };
        self.raw_fd(queue).into_iter().chain(extra)
    }

    /// Whether a read takes one frame or datagram per system call (a TAP, the VXLAN
    /// socket of an uplink without AF_XDP), so that finding the queue empty costs a call
    /// of its own; the other devices read a batch in one call or from a ring.
    pub fn reads_one_per_call(&self) -> bool {
        match self {
            PortIo::Tap(_) => true,
            PortIo::Uplink(up) => up.reads_one_per_call(),
            PortIo::Memory(_) | PortIo::AfXdp(_) => false,
        }
    }

    /// Whether frames sent to this port wait on a ring until [`PortIo::flush`] (AF_XDP:
    /// pod ports, and an uplink with its AF_XDP path).
    pub fn posts(&self) -> bool {
        match self {
            PortIo::AfXdp(_) => true,
            PortIo::Uplink(up) => up.xdp().is_some(),
            PortIo::Tap(_) | PortIo::Memory(_) => false,
        }
    }

    /// Sends what worker `queue` posted on a port that queues its sends (AF_XDP); nothing
    /// to do for the others.
    pub fn flush(&self, queue: usize) -> io::Result<()> {
        match self {
            PortIo::AfXdp(port) => port.flush(queue),
            PortIo::Uplink(up) => up.flush(queue),
            PortIo::Tap(_) | PortIo::Memory(_) => Ok(()),
        }
    }

    /// Short name of the kind, as listed by the API.
    pub fn kind(&self) -> &'static str {
        match self {
            PortIo::Tap(_) => "tap",
            PortIo::Memory(_) => "memory",
            PortIo::Uplink(up) => up.encap().name(),
            PortIo::AfXdp(_) => "afxdp",
        }
    }

    /// Number of queues (one per worker, or one).
    pub fn queues(&self) -> usize {
        match self {
            PortIo::Tap(tap) => tap.queues(),
            PortIo::Memory(_) => 1,
            PortIo::Uplink(up) => up.queues(),
            PortIo::AfXdp(port) => port.queues(),
        }
    }
}
