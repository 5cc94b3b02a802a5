//! Offloads done in user space, as pure functions over frames: what a NIC or the kernel
//! would do to a packet's bytes on the way between a pod and the wire.
//!
//! * [`gro`]: merging packets of one flow into one GSO super-frame;
//! * [`segment`]: cutting a TCP or UDP super-frame into segments or datagrams (software GSO);
//! * [`tunnel`]: VXLAN and IP-in-IP encapsulation and decapsulation;
//! * [`outer`]: the Ethernet, IPv4 and UDP headers around a VXLAN datagram, for an uplink
//!   that sends and receives whole frames (AF_XDP).
//!
//! No system call and no table lookup here: the pipeline's coalescing stage and the
//! uplink's sockets (`io::uplink`) both build on these.

pub mod gro;
pub mod outer;
pub mod segment;
pub mod tunnel;
