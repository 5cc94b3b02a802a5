//! The underlay: the hub namespace (one L2 segment, or two subnets joined by a router),
//! each node's link to it, and the external network behind the router.

use super::*;

impl Cluster {
    /// The external subnet's third octet.
    pub(super) fn external_subnet(&self) -> u8 {
        match self.options.underlay {
            Underlay::Flat => 2,
            Underlay::Routed => 3,
        }
    }

    /// Connects `ns` to this cluster's hub through `port`, on `bridge` if given ([`wire`]).
    pub(super) fn wire_to_hub(&self, ns: &Netns, port: &str, bridge: Option<&str>) -> Result<()> {
        wire(&self.hub, ns, port, bridge)
    }

    /// The external host: a namespace behind the hub, which routes to it.
    pub(super) fn add_external(&mut self) -> Result<()> {
        let x = self.external_subnet();
        let ns = Netns::create(&format!("{}-ext", self.prefix))?;
        self.wire_to_hub(&ns, "x0", None)?;
        let (ipv4, ipv6) = address_on_subnet(&ns, x, 10)?;
        default_via_hub(&ns, x)?;
        let hub = &self.hub;
        hub.add_address("x0", &format!("192.168.{x}.1/24"))?;
        hub.add_address("x0", &format!("fd00:{x}::1/64"))?;
        hub.exec(&["ip", "link", "set", "x0", "up"])?;
        hub.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        if self.options.underlay == Underlay::Flat {
            hub.add_address("br0", "192.168.1.1/24")?;
            hub.add_address("br0", "fd00:1::1/64")?;
        }
        self.external = Some(Pod {
            ns,
            ipv4,
            ipv6,
            port: None,
        });
        Ok(())
    }

    /// The static route by which a node (`ns`) on the flat underlay reaches the external
    /// subnet, through the hub.
    pub(super) fn route_to_external(&self, ns: &Netns) -> Result<()> {
        let x = self.external_subnet();
        ns.exec(&[
            "ip",
            "route",
            "add",
            &format!("192.168.{x}.0/24"),
            "via",
            "192.168.1.1",
        ])
        .map(|_| ())
    }

    pub(super) fn subnet(&self, i: usize) -> u8 {
        match self.options.underlay {
            Underlay::Flat => 1,
            Underlay::Routed => 1 + (i % 2) as u8,
        }
    }
}

/// Connects `ns` to the hub namespace `hub`: `eth0` in `ns`, `port` in `hub`, each with one
/// queue per CPU, and the hub sending on queue `i` from CPU `i` (XPS), as a NIC with RSS
/// and one interrupt per CPU delivers: a frame the hub forwards on CPU `i` arrives on
/// `eth0`'s queue `i`, whose NAPI runs on CPU `i` (what an AF_XDP socket is bound to). With
/// `bridge`, `port` joins that bridge of the hub and comes up.
pub(crate) fn wire(hub: &Netns, ns: &Netns, port: &str, bridge: Option<&str>) -> Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let queues = cpus.to_string();
    ns.exec(&[
        "ip",
        "link",
        "add",
        "eth0",
        "numtxqueues",
        &queues,
        "numrxqueues",
        &queues,
        "type",
        "veth",
        "peer",
        "name",
        port,
        "numtxqueues",
        &queues,
        "numrxqueues",
        &queues,
        "netns",
        hub.name(),
    ])?;
    for cpu in 0..cpus {
        // A CPU mask as sysfs reads it: 32-bit hex words, the highest first.
        let mask = format!("{:x}{}", 1u32 << (cpu % 32), ",00000000".repeat(cpu / 32));
        let file = format!("/sys/class/net/{port}/queues/tx-{cpu}/xps_cpus");
        hub.exec(&["sh", "-c", &format!("echo {mask} > {file}")])?;
    }
    if let Some(bridge) = bridge {
        hub.exec(&["ip", "link", "set", port, "master", bridge, "up"])?;
    }
    Ok(())
}

/// A bridge `name` in the hub namespace `ns` (with `addrs`, IPv4 and IPv6, when given): the
/// underlay's switch, which hands no frame to netfilter.
pub(crate) fn bridge(ns: &Netns, name: &str, addrs: Option<(&str, &str)>) -> Result<()> {
    ns.bridges_without_netfilter()?;
    ns.exec(&["ip", "link", "add", name, "type", "bridge"])?;
    if let Some((v4, v6)) = addrs {
        ns.add_address(name, v4)?;
        ns.add_address(name, v6)?;
    }
    ns.exec(&["ip", "link", "set", name, "up"])?;
    Ok(())
}

/// Gives `ns`'s `eth0` host `host` of subnet `subnet` (192.168.`subnet`.`host`/24 and
/// fd00:`subnet`::`host`/64) and brings it up; returns the two addresses.
pub(super) fn address_on_subnet(ns: &Netns, subnet: u8, host: u8) -> Result<(Ipv4Addr, Ipv6Addr)> {
    let ipv4 = Ipv4Addr::new(192, 168, subnet, host);
    let ipv6 = Ipv6Addr::new(0xfd00, u16::from(subnet), 0, 0, 0, 0, 0, u16::from(host));
    ns.add_address("eth0", &format!("{ipv4}/24"))?;
    ns.add_address("eth0", &format!("{ipv6}/64"))?;
    ns.exec(&["ip", "link", "set", "eth0", "up"])?;
    Ok((ipv4, ipv6))
}

/// The IPv4 default route of `ns`: the hub's address on `subnet` (192.168.`subnet`.1).
pub(super) fn default_via_hub(ns: &Netns, subnet: u8) -> Result<()> {
    let hub = format!("192.168.{subnet}.1");
    ns.exec(&["ip", "route", "add", "default", "via", &hub])
        .map(|_| ())
}
