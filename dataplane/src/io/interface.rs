//! A pod's interface as the pod sees it, whatever carries its frames (a TAP device, a veth
//! pair): its MAC, MTU, addresses and the routes through the gateway, set inside the pod's
//! namespace.

use super::netlink::Netlink;
use super::netns;
use crate::gateway::Gateway;
use std::io;
use std::net::IpAddr;
use switchyard_api::{IpNet, MacAddr};

/// How to set up a pod's interface (a TAP device or the pod's end of a veth pair).
#[derive(Debug, Clone)]
pub struct PodInterface {
    /// Interface name in the pod.
    pub ifname: String,
    /// Interface MAC.
    pub mac: MacAddr,
    /// Interface MTU.
    pub mtu: u32,
    /// Addresses with prefix length.
    pub ips: Vec<IpNet>,
    /// The gateway the default routes point to.
    pub gateway: Gateway,
    /// How the pod's frames are spread over a TAP's queues (see `steering`).
    pub steering: super::steering::Steering,
    /// Cap on the pod's GSO super-frames (see [`gso_max_for_overlay`]), if any.
    pub gso_max_size: Option<u32>,
}

/// The largest super-frame a pod with this MTU may build so that its segments, each
/// behind a VXLAN header, fit in one `UDP_SEGMENT` send (65,507 bytes): one send, one skb
/// and one merged run at the receiver per super-frame instead of two (+12 % measured on
/// one stream).
pub fn gso_max_for_overlay(mtu: u32) -> u32 {
    let per_segment = 8 + 14 + mtu;
    let segments = 65_507 / per_segment;
    // Segments carry at most MTU - 72 bytes each when the headers are smallest (IPv6 and
    // TCP with timestamps take 72): no more segments than fit.
    segments * mtu.saturating_sub(72)
}

/// Brings `lo` and the interface up and gives it its MAC, MTU, addresses and routes through
/// the gateway. Runs inside the pod's namespace.
pub(super) fn configure(index: u32, config: &PodInterface) -> io::Result<()> {
    let mut nl = Netlink::open()?;
    if let Some(lo) = netns::link_index("lo") {
        nl.set_link(lo, None, None)?;
    }
    nl.set_link(index, Some(config.mac), Some(config.mtu))?;
    if let Some(size) = config.gso_max_size {
        nl.set_gso_max_size(index, size)?;
    }
    for ip in &config.ips {
        nl.add_address(index, *ip)?;
    }
    // A pod's first interface gets the routes through the gateway; a further interface
    // finds them taken (EEXIST) and leaves the default route where it is.
    let keep_existing = |r: io::Result<()>| match r {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        other => other,
    };
    let gw = config.gateway;
    if config.ips.iter().any(|ip| ip.addr().is_ipv4()) {
        let gw_net = IpNet::new(IpAddr::V4(gw.ipv4), 32).map_err(io::Error::other)?;
        keep_existing(nl.add_route(index, gw_net, None))?;
        let default =
            IpNet::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0).map_err(io::Error::other)?;
        keep_existing(nl.add_route(index, default, Some(IpAddr::V4(gw.ipv4))))?;
    }
    if config.ips.iter().any(|ip| ip.addr().is_ipv6()) {
        let default =
            IpNet::new(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), 0).map_err(io::Error::other)?;
        keep_existing(nl.add_route(index, default, Some(IpAddr::V6(gw.ipv6))))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::gso_max_for_overlay;

    #[test]
    fn super_frames_fit_one_udp_segment_send() {
        for mtu in [1280u32, 1450, 1500, 8950] {
            let cap = gso_max_for_overlay(mtu);
            // Worst case: IPv6 + TCP with options (72 bytes of headers), MSS mtu - 72.
            let segments = (cap - 72).div_ceil(mtu - 72);
            assert!(
                segments * (8 + 14 + mtu) <= 65_507,
                "MTU {mtu}: {segments} segments"
            );
        }
        assert_eq!(gso_max_for_overlay(1450), 44 * 1378);
    }
}
