//! Reading the node's interfaces: which one holds an address, its prefixes, its MTU.
//! Everything here looks at the calling thread's network namespace.
#![allow(unsafe_code)] // ioctl and getifaddrs system calls

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use switchyard_api::IpNet;

/// One address of one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InterfaceAddress {
    /// Interface name.
    pub ifname: String,
    /// The address with its prefix length.
    pub net: IpNet,
}

/// Every IPv4 and IPv6 address of every interface.
pub fn addresses() -> io::Result<Vec<InterfaceAddress>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `head`, freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed; its
        // name is a NUL-terminated string and its address pointers, when non-null, point
        // at sockaddrs of the family they announce.
        unsafe {
            let ifa = &*cur;
            if let (Some(addr), Some(mask)) =
                (sockaddr_ip(ifa.ifa_addr), sockaddr_ip(ifa.ifa_netmask))
            {
                let ifname = std::ffi::CStr::from_ptr(ifa.ifa_name)
                    .to_string_lossy()
                    .into_owned();
                let prefix = prefix_len(mask);
                if let Ok(net) = IpNet::new(addr, prefix) {
                    out.push(InterfaceAddress { ifname, net });
                }
            }
            cur = ifa.ifa_next;
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// # Safety
/// `sa` is null or points at a sockaddr whose family field tells its real size.
unsafe fn sockaddr_ip(sa: *const libc::sockaddr) -> Option<IpAddr> {
    if sa.is_null() {
        return None;
    }
    // SAFETY: non-null and valid per the caller; the family says which struct it is.
    unsafe {
        match i32::from((*sa).sa_family) {
            libc::AF_INET => {
                let sin = &*(sa as *const libc::sockaddr_in);
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))))
            }
            libc::AF_INET6 => {
                let sin6 = &*(sa as *const libc::sockaddr_in6);
                Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }
}

fn prefix_len(mask: IpAddr) -> u8 {
    match mask {
        IpAddr::V4(m) => u32::from(m).leading_ones() as u8,
        IpAddr::V6(m) => u128::from(m).leading_ones() as u8,
    }
}

/// The interface that holds `addr`, with the prefix it is on.
pub fn owner_of(addr: IpAddr) -> io::Result<Option<InterfaceAddress>> {
    Ok(addresses()?.into_iter().find(|a| a.net.addr() == addr))
}

/// The MTU of interface `ifname`.
pub fn mtu(ifname: &str) -> io::Result<u32> {
    let name = ifname.as_bytes();
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {ifname:?}"),
        ));
    }
    // SAFETY: plain socket(2) call with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: all-zero is a valid ifreq.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFMTU reads the name from and writes the MTU into `req`, which lives
    // across the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFMTU, &mut req) } < 0 {
        let err = io::Error::last_os_error();
        return Err(io::Error::new(
            err.kind(),
            format!("cannot read the MTU of {ifname}: {err}"),
        ));
    }
    // SAFETY: SIOCGIFMTU filled the `ifru_mtu` member of the union.
    Ok(unsafe { req.ifr_ifru.ifru_mtu } as u32)
}

/// Writes a sysctl under /proc/sys (in the caller's network namespace for `net.*`).
pub fn set_sysctl(path: &str, value: &str) -> io::Result<()> {
    let file = format!("/proc/sys/{}", path.replace('.', "/"));
    std::fs::write(&file, value)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot set {path}={value}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_listed_with_its_mtu() {
        let lo = owner_of(IpAddr::V4(Ipv4Addr::LOCALHOST)).unwrap();
        if let Some(lo) = lo {
            assert_eq!(lo.net.prefix_len(), 8);
            assert!(mtu(&lo.ifname).unwrap() >= 1500);
        }
        assert!(mtu("no-such-if0").is_err());
    }
}
