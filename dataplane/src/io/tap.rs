//! TAP ports: one TAP device per pod, created inside the pod's network namespace and held
//! by the dataplane.
//!
//! The device is opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR` and a 12-byte virtio-net
//! header, and `TUNSETOFFLOAD` enables checksum and TCP segmentation offload (plus UDP
//! segmentation when the kernel accepts both USO4 and USO6). The pod's kernel then hands
//! over 64 KiB TCP super-frames with a partial checksum, which the dataplane forwards
//! whole to the destination TAP: segmentation, if any, happens in the receiving kernel.
//!
//! Pod devices are made persistent (`TUNSETPERSIST`): they outlive the dataplane process,
//! with their addresses and routes, and a restarted dataplane re-attaches to them by name
//! ([`TapDevice::attach`]). Deleting the port clears the flag, and the device goes away
//! with its last descriptor (or with the pod's namespace).
#![allow(unsafe_code)] // TUN ioctls and readv/writev on the queues (the fast path)

use super::interface::{configure, PodInterface};
use super::netlink::Netlink;
use super::netns;
use super::steering::Steering;
use crate::buffer::PacketBuf;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use switchyard_api::MacAddr;

/// Offload flags: checksum, TSO4, TSO6, TSO with ECN.
pub const TUN_F_TSO: u32 =
    libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_TSO_ECN;
/// Offload flags: UDP segmentation for IPv4 and IPv6.
pub const TUN_F_USO: u32 = libc::TUN_F_USO4 | libc::TUN_F_USO6;

/// An open TAP device: one file descriptor per queue. With several queues
/// (`IFF_MULTI_QUEUE`) the pod's kernel spreads its flows over them by hash, and each
/// worker reads and writes its own queue.
pub struct TapDevice {
    queues: Vec<OwnedFd>,
    offloads: u32,
}

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    /// A request naming the device `name` (shorter than `IFNAMSIZ`) with `flags`.
    fn new(name: &[u8], flags: libc::c_short) -> Self {
        let mut req = Self {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name);
        req
    }
}

impl TapDevice {
    /// Creates and configures the pod's interface, with `queues` queues, inside the
    /// namespace at `netns`; returns the device and the interface index in that namespace.
    /// On any failure nothing is left behind: the device goes away with its descriptors.
    pub fn create(
        netns_path: &Path,
        config: &PodInterface,
        queues: usize,
    ) -> io::Result<(Self, u32)> {
        netns::run_in(netns_path, || {
            if netns::link_index(&config.ifname).is_some() {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "an interface named {} already exists in the namespace",
                        config.ifname
                    ),
                ));
            }
            let device = Self::open(&config.ifname, queues.max(1))?;
            device.steer(config.steering);
            let index = netns::link_index(&config.ifname)
                .ok_or_else(|| io::Error::other("TAP device vanished after creation"))?;
            configure(index, config)?;
            device.set_persist(true)?;
            Ok((device, index))
        })
    }

    /// Re-attaches to the existing pod interface `ifname` in the namespace at `netns_path`
    /// (left by an earlier dataplane process) with `queues` queues, as it was created;
    /// returns the device and its interface index. Refuses when no such interface exists
    /// (opening would create a new, unconfigured one).
    /// An earlier process's open queues (`kept`, see [`super::handover`]) are taken over
    /// when they are this device's, as many as asked for.
    pub fn attach(
        netns_path: &Path,
        ifname: &str,
        queues: usize,
        kept: Option<Vec<OwnedFd>>,
    ) -> io::Result<(Self, u32)> {
        netns::run_in(netns_path, || {
            let index = netns::link_index(ifname).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no interface {ifname} to re-attach"),
                )
            })?;
            Ok((Self::kept_or_open(ifname, queues.max(1), kept)?, index))
        })
    }

    /// The kept queues of `ifname` when they fit, else newly opened ones.
    fn kept_or_open(ifname: &str, queues: usize, kept: Option<Vec<OwnedFd>>) -> io::Result<Self> {
        match kept {
            Some(fds) if fds.len() == queues => match Self::adopt(ifname, fds) {
                Ok(device) => return Ok(device),
                Err(e) => tracing::warn!("not taking over the kept queues of {ifname}: {e}"),
            },
            Some(fds) => tracing::warn!(
                "not taking over {} kept queues of {ifname}: {queues} wanted",
                fds.len()
            ),
            None => {}
        }
        Self::open(ifname, queues)
    }

    /// Keeps the device after its last descriptor closes (`true`), or not.
    pub fn set_persist(&self, persist: bool) -> io::Result<()> {
        // SAFETY: TUNSETPERSIST takes its flag by value.
        if unsafe {
            libc::ioctl(
                self.raw_fd(0),
                libc::TUNSETPERSIST,
                libc::c_ulong::from(persist),
            )
        } < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Creates the node-side interface `ifname` in the caller's own namespace (the host
    /// port), with `queues` queues, brought up with `mac` and `mtu`; returns the device,
    /// its interface index and whether it re-attached to the host port an earlier
    /// dataplane process left (the device is persistent: it outlives a crash, with the
    /// node's routes through it, until [`TapDevice::remove_persistent`] or a clean exit
    /// takes it away). Routes through it are the caller's business. Its frames are spread
    /// over the queues by `steering`, as a pod's are.
    pub fn create_host(
        ifname: &str,
        mac: MacAddr,
        mtu: u32,
        queues: usize,
        kept: Option<Vec<OwnedFd>>,
        steering: Steering,
    ) -> io::Result<(Self, u32, bool)> {
        let mut reattached = false;
        if netns::link_index(ifname).is_some() {
            if !is_tap(ifname) {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("an interface named {ifname} already exists on the node; remove it or choose another --host-ifname"),
                ));
            }
            reattached = true;
        }
        let kept = kept.filter(|_| reattached);
        let device = match Self::kept_or_open(ifname, queues.max(1), kept) {
            Ok(device) => device,
            Err(e) if reattached => {
                // Left with other queue flags (another worker count): start afresh.
                tracing::info!("cannot re-attach the host port {ifname} ({e}); recreating it");
                Self::remove_persistent(ifname)?;
                reattached = false;
                Self::open(ifname, queues.max(1))?
            }
            Err(e) => return Err(e),
        };
        device.set_persist(true)?;
        device.steer(steering);
        let index = netns::link_index(ifname)
            .ok_or_else(|| io::Error::other("TAP device vanished after creation"))?;
        // The dataplane answers neighbour solicitations for every address but the port's
        // own, so duplicate address detection would only delay the link-local address
        // the node's stack needs to reach the gateway. Absent when IPv6 is off.
        let _ = super::links::set_sysctl(&format!("net.ipv6.conf.{ifname}.accept_dad"), "0");
        Netlink::open()?.set_link(index, Some(mac), Some(mtu))?;
        Ok((device, index, reattached))
    }

    /// Removes the persistent TAP device `ifname` of the caller's namespace, if there is
    /// one (an interface of another kind is left alone); returns whether it did.
    pub fn remove_persistent(ifname: &str) -> io::Result<bool> {
        let Some(flags) = tun_flags(ifname) else {
            return Ok(false);
        };
        let fd = open_queue(ifname.as_bytes(), flags as libc::c_short)?;
        // SAFETY: TUNSETPERSIST takes its flag by value.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETPERSIST, 0 as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // The device goes with this last descriptor.
        drop(fd);
        Ok(true)
    }

    fn open(ifname: &str, queues: usize) -> io::Result<Self> {
        let name = ifname.as_bytes();
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad interface name",
            ));
        }
        let mut flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        if queues > 1 {
            flags |= libc::IFF_MULTI_QUEUE as libc::c_short;
        }
        let mut fds = Vec::with_capacity(queues);
        for _ in 0..queues {
            fds.push(open_queue(name, flags)?);
        }
        Self::with_offloads(fds)
    }

    /// Takes over the open queues `fds` of the TAP device `ifname`, which an earlier
    /// process held (kept across its restart: what the pod sent meanwhile is still queued
    /// on them). Refuses descriptors of another device.
    pub fn adopt(ifname: &str, fds: Vec<OwnedFd>) -> io::Result<Self> {
        if fds.is_empty() {
            return Err(io::Error::other("no queue to adopt"));
        }
        for fd in &fds {
            let mut req = IfReq::new(b"", 0);
            // SAFETY: `req` is a properly sized `struct ifreq` that lives across the call.
            if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF, &mut req) } < 0 {
                return Err(io::Error::last_os_error());
            }
            let len = req
                .name
                .iter()
                .position(|b| *b == 0)
                .unwrap_or(req.name.len());
            if &req.name[..len] != ifname.as_bytes()
                || req.flags & libc::IFF_TAP as libc::c_short == 0
            {
                return Err(io::Error::other(format!(
                    "a kept descriptor is not a queue of the TAP device {ifname}"
                )));
            }
        }
        Self::with_offloads(fds)
    }

    /// The queues `fds`, with TSO and, where the kernel has it, USO switched on.
    fn with_offloads(fds: Vec<OwnedFd>) -> io::Result<Self> {
        let fd = fds[0].as_raw_fd();
        let mut offloads = TUN_F_TSO | TUN_F_USO;
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        if unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, offloads as libc::c_ulong) } < 0 {
            offloads = TUN_F_TSO;
            // SAFETY: as above.
            if unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, offloads as libc::c_ulong) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(Self {
            queues: fds,
            offloads,
        })
    }

    /// Spreads the frames the kernel sends into this device over its queues by
    /// `steering` (nothing to choose with one queue).
    pub fn steer(&self, steering: Steering) {
        if self.queues() > 1 {
            super::steering::attach(self.raw_fd(0), steering);
        }
    }

    /// Number of queues.
    pub fn queues(&self) -> usize {
        self.queues.len()
    }

    /// The `TUN_F_*` offload flags the kernel accepted.
    pub fn offloads(&self) -> u32 {
        self.offloads
    }

    /// The file descriptors of every queue.
    pub fn raw_fds(&self) -> Vec<RawFd> {
        self.queues.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// The file descriptor of queue `queue` (modulo the number of queues).
    pub fn raw_fd(&self, queue: usize) -> RawFd {
        self.queues[queue % self.queues.len()].as_raw_fd()
    }

    pub(super) fn recv_batch(
        &self,
        queue: usize,
        bufs: &mut [PacketBuf],
        calls: usize,
    ) -> io::Result<usize> {
        let fd = self.raw_fd(queue);
        let (mut n, mut bytes) = (0, 0);
        while n < bufs.len().min(calls) && bytes < crate::buffer::BATCH_BYTES {
            let space = bufs[n].receive_space();
            // SAFETY: `space` is a writable buffer of `space.len()` bytes.
            let got = unsafe { libc::read(fd, space.as_mut_ptr().cast(), space.len()) };
            if got < 0 {
                let err = io::Error::last_os_error();
                if n == 0 && err.kind() != io::ErrorKind::WouldBlock {
                    return Err(err);
                }
                break;
            }
            bufs[n].set_len(got as usize);
            bytes += got as usize;
            n += 1;
        }
        Ok(n)
    }

    pub(super) fn send(&self, queue: usize, frame: &[u8]) -> io::Result<()> {
        let fd = self.raw_fd(queue);
        // SAFETY: `frame` is a readable buffer of `frame.len()` bytes.
        let put = unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) };
        if put < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The `IFF_*` flags of the TUN/TAP device `ifname` in the caller's namespace (from
/// sysfs), or none when it is not one.
fn tun_flags(ifname: &str) -> Option<u32> {
    let text = std::fs::read_to_string(format!("/sys/class/net/{ifname}/tun_flags")).ok()?;
    u32::from_str_radix(text.trim().trim_start_matches("0x"), 16).ok()
}

/// Whether `ifname` in the caller's namespace is a TAP device.
fn is_tap(ifname: &str) -> bool {
    tun_flags(ifname).is_some_and(|f| f & libc::IFF_TAP as u32 != 0)
}

/// Opens one queue of the TAP device `name` with `flags`, with a virtio-net header.
fn open_queue(name: &[u8], flags: libc::c_short) -> io::Result<OwnedFd> {
    // SAFETY: the path is a NUL-terminated literal; flags are constants.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by open(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq::new(name, flags);
    // SAFETY: `req` is a properly sized `struct ifreq` that lives across the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let hdr_len: libc::c_int = crate::wire::vnet::HEADER_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which is valid.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}
