//! The ceilings of a user-space forwarder between two pods of one node ([`SameNodeNull`]),
//! across nodes ([`CrossNodeNull`]) and toward an external network ([`EgressNull`]),
//! measured beside Switchyard and the kernel. Across
//! nodes: two node namespaces on one underlay link, one pod on each with a TAP created
//! exactly as the dataplane creates it (virtio-net header, TSO, one queue per worker, its
//! super-frames capped to fit one `UDP_SEGMENT` send), and on each node a *null forwarder*:
//! per queue, one thread that moves whatever its TAP queue holds into the dataplane's own
//! VXLAN uplink sockets (`io::uplink`: segmentation, VXLAN header, `UDP_SEGMENT` send) and
//! whatever those sockets receive (`UDP_GRO`, decapsulation, TCP runs merged) into the TAP,
//! setting the two MAC addresses. No parsing, no tables, no pipeline: the least work any
//! forwarder that carries pod frames over a VXLAN underlay with these system calls does.
//! Its threads are pinned and its TAPs steered as the dataplane's default steering does.
#![allow(unsafe_code)] // poll(2) over the TAP queue and the uplink socket

use crate::netns::Netns;
use crate::testbed::{unique_prefix, Pod};
use crate::{fail, Result};
use std::net::Ipv4Addr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use switchyard_api::MacAddr;
use switchyard_dataplane::buffer::{PacketBuf, BATCH};
use switchyard_dataplane::io::interface::{gso_max_for_overlay, PodInterface};
use switchyard_dataplane::io::netns::run_in;
use switchyard_dataplane::io::tap::TapDevice;
use switchyard_dataplane::io::uplink::{Encap, Uplink, UplinkMode};
use switchyard_dataplane::io::PortIo;
use switchyard_dataplane::offload::segment::SCRATCH_LEN;
use switchyard_dataplane::tables::Gateway;
use switchyard_dataplane::wire::vnet;

/// Queues per TAP and threads per node, as two workers.
const QUEUES: usize = 2;
/// The pods' MTU: the underlay's 1500 less VXLAN's 50 bytes.
const POD_MTU: u32 = 1450;

struct NullNode {
    tap: Arc<PortIo>,
    uplink: Arc<PortIo>,
    pod_mac: MacAddr,
    peer: Ipv4Addr,
}

/// Two nodes, one pod each, joined by null forwarders. Everything goes when it drops.
pub struct CrossNodeNull {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    _nodes: Vec<Arc<NullNode>>,
    /// The pods, one per node.
    pub pods: Vec<Pod>,
    // Dropped last: the pods' and the nodes' namespaces.
    _namespaces: Vec<Netns>,
}

impl CrossNodeNull {
    /// Builds the two nodes, their pods and the forwarders.
    pub fn build() -> Result<Self> {
        let prefix = unique_prefix();
        let nodes = [
            Netns::create(&format!("{prefix}-nul0"))?,
            Netns::create(&format!("{prefix}-nul1"))?,
        ];
        let underlay = [
            Ipv4Addr::new(192, 168, 77, 1),
            Ipv4Addr::new(192, 168, 77, 2),
        ];
        // The same underlay as the clusters': a switch (a bridge in a hub namespace) and
        // one multi-queue link per node.
        let hub = Netns::create(&format!("{prefix}-nuh"))?;
        crate::cluster::bridge(&hub, "br0", None)?;
        for (i, ns) in nodes.iter().enumerate() {
            let port = format!("nul{i}");
            crate::cluster::wire(&hub, ns, &port, Some("br0"))?;
            ns.add_address("eth0", &format!("{}/24", underlay[i]))?;
            ns.exec(&["ip", "link", "set", "eth0", "up"])?;
            ns.exec(&["ip", "link", "set", "lo", "up"])?;
        }
        let gateway = Gateway::default();
        let mut pods = Vec::new();
        let mut namespaces = Vec::new();
        let mut forwarders = Vec::new();
        for (i, node) in nodes.iter().enumerate() {
            let ns = Netns::create(&format!("{prefix}-nul{i}pod"))?;
            let ipv4 = Ipv4Addr::new(10, 244, i as u8, 10);
            let pod_mac = MacAddr([0x02, 0x5e, 0, 0, i as u8, 10]);
            let tap = null_pod(
                &ns,
                ipv4,
                pod_mac,
                POD_MTU,
                Some(gso_max_for_overlay(POD_MTU)),
            )?;
            let local = underlay[i];
            let uplink = run_in(&node.path(), move || {
                Uplink::open(
                    Encap::Vxlan { vni: 1, port: 4789 },
                    local,
                    QUEUES,
                    gateway.mac,
                    gateway.mac,
                    None,
                    true,
                    UplinkMode::Sockets,
                    None,
                    None,
                )
            })?;
            let peer = underlay[1 - i];
            uplink.set_peers(vec![peer]);
            forwarders.push(Arc::new(NullNode {
                tap: Arc::new(PortIo::Tap(tap)),
                uplink: Arc::new(PortIo::Uplink(uplink)),
                pod_mac,
                peer,
            }));
            pods.push(Pod {
                ns,
                ipv4,
                ipv6: std::net::Ipv6Addr::UNSPECIFIED,
                port: None,
            });
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for node in &forwarders {
            for queue in 0..QUEUES {
                let (node, stop) = (node.clone(), stop.clone());
                threads.push(std::thread::spawn(move || forward(&node, queue, &stop)));
            }
        }
        namespaces.extend(nodes);
        namespaces.push(hub);
        Ok(Self {
            stop,
            threads,
            _nodes: forwarders,
            pods,
            _namespaces: namespaces,
        })
    }
}

impl Drop for CrossNodeNull {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Queue `queue` of one node, both ways, until `stop`, as a worker pinned under the
/// dataplane's default steering (which the TAP carries too), with the uplink's sockets
/// chosen by receiving CPU as the dataplane's are.
fn forward(node: &NullNode, queue: usize, stop: &AtomicBool) {
    let PortIo::Uplink(uplink) = node.uplink.as_ref() else {
        return;
    };
    let fds = [
        node.tap.raw_fd(queue).unwrap_or(-1),
        node.uplink.raw_fd(queue).unwrap_or(-1),
    ];
    let mut bufs: Vec<PacketBuf> = (0..BATCH).map(|_| PacketBuf::new()).collect();
    let mut scratch = vec![0u8; SCRATCH_LEN];
    let gateway = Gateway::default().mac;
    poll_loop(queue, fds, stop, || {
        // Pod to the other node.
        let sent = node.tap.recv_batch(queue, &mut bufs, BATCH).unwrap_or(0);
        for buf in &mut bufs[..sent] {
            let _ = uplink.send_to(queue, buf.frame_mut(), node.peer, &mut scratch);
        }
        // The other node to the pod: the frame is for the pod, from the gateway.
        let received = node.uplink.recv_batch(queue, &mut bufs, BATCH).unwrap_or(0);
        for buf in &mut bufs[..received] {
            let frame = buf.frame_mut();
            if frame.len() >= vnet::HEADER_LEN + 12 {
                frame[vnet::HEADER_LEN..vnet::HEADER_LEN + 6].copy_from_slice(&node.pod_mac.0);
                frame[vnet::HEADER_LEN + 6..vnet::HEADER_LEN + 12].copy_from_slice(&gateway.0);
            }
            let _ = node.tap.send(queue, frame);
        }
        sent + received
    });
}

/// A pod's TAP in `ns`, made as the dataplane makes it (`queues` = [`QUEUES`]), going with
/// its descriptors, and a permanent neighbour entry for the gateway (nobody answers ARP).
fn null_pod(
    ns: &Netns,
    ipv4: Ipv4Addr,
    mac: MacAddr,
    mtu: u32,
    gso_max_size: Option<u32>,
) -> Result<TapDevice> {
    let gateway = Gateway::default();
    let config = PodInterface {
        ifname: "eth0".into(),
        mac,
        mtu,
        ips: vec![format!("{ipv4}/24").parse().map_err(|e| fail!("{e}"))?],
        gateway,
        steering: Default::default(),
        gso_max_size,
    };
    let (tap, _) = TapDevice::create(&ns.path(), &config, QUEUES)?;
    tap.set_persist(false)?;
    ns.exec(&[
        "ip",
        "neigh",
        "replace",
        &gateway.ipv4.to_string(),
        "lladdr",
        &gateway.mac.to_string(),
        "dev",
        "eth0",
        "nud",
        "permanent",
    ])?;
    Ok(tap)
}

/// Pins the thread as worker `queue`, then, until `stop`, waits for `fds` to be readable
/// and calls `step` until it moves nothing (it returns how many frames it moved).
fn poll_loop(queue: usize, fds: [RawFd; 2], stop: &AtomicBool, mut step: impl FnMut() -> usize) {
    let _ = switchyard_dataplane::io::steering::pin_current_thread(queue, QUEUES);
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `pfds` is a valid array of two pollfd for the duration of the call.
        if unsafe { libc::poll(pfds.as_mut_ptr(), 2, 100) } <= 0 {
            continue;
        }
        while step() > 0 {}
    }
}

/// Two pods of one node whose TAPs a null forwarder joins, for a round trip's ceiling: per
/// queue one thread, pinned as a worker and at the nice value the dataplane's workers take
/// while the node is quiet (as they are between pings), that moves frames from one TAP to
/// the other unchanged (each pod's neighbour entry for the other is the other's MAC, so no
/// byte is rewritten). Its system calls per round trip are a worker's: a wake-up from
/// `poll`, a read and a write each way. Everything goes when it drops.
pub struct SameNodeNull {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// The two pods.
    pub pods: Vec<Pod>,
}

impl SameNodeNull {
    /// Builds the two pods and the forwarder.
    pub fn build() -> Result<Self> {
        let prefix = unique_prefix();
        let mut pods = Vec::new();
        let mut taps = Vec::new();
        let mut macs = Vec::new();
        for i in 0..2u8 {
            let ns = Netns::create(&format!("{prefix}-nup{i}"))?;
            let ipv4 = Ipv4Addr::new(10, 244, 8, 10 + i);
            let mac = MacAddr([0x02, 0x5e, 0, 0, 8, 10 + i]);
            taps.push(PortIo::Tap(null_pod(&ns, ipv4, mac, 1500, None)?));
            macs.push(mac);
            pods.push(Pod {
                ns,
                ipv4,
                ipv6: std::net::Ipv6Addr::UNSPECIFIED,
                port: None,
            });
        }
        for (i, pod) in pods.iter().enumerate() {
            let other = &pods[1 - i];
            pod.ns.exec(&[
                "ip",
                "neigh",
                "replace",
                &other.ipv4.to_string(),
                "lladdr",
                &macs[1 - i].to_string(),
                "dev",
                "eth0",
                "nud",
                "permanent",
            ])?;
        }
        let [a, b]: [PortIo; 2] = taps.try_into().map_err(|_| fail!("two TAPs were made"))?;
        let taps = Arc::new([a, b]);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..QUEUES)
            .map(|queue| {
                let (taps, stop) = (taps.clone(), stop.clone());
                std::thread::spawn(move || {
                    let nice = switchyard_dataplane::switch::QUIET_WORKER_NICE;
                    if let Err(e) =
                        switchyard_dataplane::io::steering::set_current_thread_nice(nice)
                    {
                        eprintln!(
                            "null forwarder: cannot take nice {nice}, measured without it: {e}"
                        );
                    }
                    between_taps(&taps, queue, &stop)
                })
            })
            .collect();
        Ok(Self {
            stop,
            threads,
            pods,
        })
    }
}

impl Drop for SameNodeNull {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The pod's subnet behind the egress null forwarder.
const EGRESS_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 9, 10);

/// The egress ceiling: a pod whose TAP a null forwarder joins to a host-side TAP in its
/// node's namespace (both made as the dataplane makes a pod's TAP and its host port), the
/// node routing to an external host behind a router namespace, as the cluster's external
/// network is laid out. The forwarder moves frames between the two TAPs unchanged: the
/// host TAP carries the gateway's MAC and the node's neighbour entry for the pod is the
/// pod's MAC, so no byte is rewritten; the router routes the pod's subnet back to the node,
/// so nothing is translated either. Everything goes when it drops.
pub struct EgressNull {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// The pod.
    pub pod: Pod,
    /// The external host.
    pub external: Pod,
    // Dropped last.
    _namespaces: Vec<Netns>,
}

impl EgressNull {
    /// Builds the pod, the node, the router and the external host, and the forwarder.
    pub fn build() -> Result<Self> {
        let prefix = unique_prefix();
        let node = Netns::create(&format!("{prefix}-nue"))?;
        let hub = Netns::create(&format!("{prefix}-nuh"))?;
        let ext = Netns::create(&format!("{prefix}-nux"))?;
        let hub_name = hub.path().to_string_lossy().into_owned();
        node.exec(&[
            "ip", "link", "add", "nue0", "type", "veth", "peer", "name", "nuh0", "netns", &hub_name,
        ])?;
        ext.exec(&[
            "ip", "link", "add", "nux0", "type", "veth", "peer", "name", "nuh1", "netns", &hub_name,
        ])?;
        node.add_address("nue0", "192.168.79.2/24")?;
        hub.add_address("nuh0", "192.168.79.1/24")?;
        hub.add_address("nuh1", "192.168.80.1/24")?;
        ext.add_address("nux0", "192.168.80.10/24")?;
        for (ns, devs) in [
            (&node, &["nue0", "lo"][..]),
            (&hub, &["nuh0", "nuh1", "lo"][..]),
            (&ext, &["nux0", "lo"][..]),
        ] {
            for dev in devs {
                ns.exec(&["ip", "link", "set", dev, "up"])?;
            }
        }
        for ns in [&node, &hub] {
            ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        }
        node.exec(&[
            "ip",
            "route",
            "add",
            "192.168.80.0/24",
            "via",
            "192.168.79.1",
        ])?;
        hub.exec(&["ip", "route", "add", "10.244.9.0/24", "via", "192.168.79.2"])?;
        ext.exec(&["ip", "route", "add", "default", "via", "192.168.80.1"])?;
        let gateway = Gateway::default();
        let pod_ns = Netns::create(&format!("{prefix}-nuepod"))?;
        let pod_mac = MacAddr([0x02, 0x5e, 0, 0, 9, 10]);
        let pod_tap = null_pod(&pod_ns, EGRESS_POD, pod_mac, 1500, None)?;
        let (host_tap, _, _) = run_in(&node.path(), move || {
            let made = TapDevice::create_host(
                "nulhost",
                gateway.mac,
                65_521,
                QUEUES,
                None,
                Default::default(),
            )?;
            made.0.set_persist(false)?;
            Ok(made)
        })?;
        node.exec(&["ip", "route", "add", "10.244.9.0/24", "dev", "nulhost"])?;
        node.exec(&[
            "ip",
            "neigh",
            "replace",
            &EGRESS_POD.to_string(),
            "lladdr",
            &pod_mac.to_string(),
            "dev",
            "nulhost",
            "nud",
            "permanent",
        ])?;
        let taps = Arc::new([PortIo::Tap(pod_tap), PortIo::Tap(host_tap)]);
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..QUEUES)
            .map(|queue| {
                let (taps, stop) = (taps.clone(), stop.clone());
                std::thread::spawn(move || between_taps(&taps, queue, &stop))
            })
            .collect();
        Ok(Self {
            stop,
            threads,
            pod: Pod {
                ns: pod_ns,
                ipv4: EGRESS_POD,
                ipv6: std::net::Ipv6Addr::UNSPECIFIED,
                port: None,
            },
            external: Pod {
                ns: ext,
                ipv4: Ipv4Addr::new(192, 168, 80, 10),
                ipv6: std::net::Ipv6Addr::UNSPECIFIED,
                port: None,
            },
            _namespaces: vec![node, hub],
        })
    }
}

impl Drop for EgressNull {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Queue `queue` of two TAPs, each way, unchanged, until `stop`; pinned as a worker.
fn between_taps(taps: &[PortIo; 2], queue: usize, stop: &AtomicBool) {
    let fds = [0, 1].map(|i| taps[i].raw_fd(queue).unwrap_or(-1));
    let mut bufs: Vec<PacketBuf> = (0..BATCH).map(|_| PacketBuf::new()).collect();
    poll_loop(queue, fds, stop, || {
        let mut moved = 0;
        for side in 0..2 {
            let n = taps[side].recv_batch(queue, &mut bufs, BATCH).unwrap_or(0);
            for buf in &bufs[..n] {
                let _ = taps[1 - side].send(queue, buf.frame());
            }
            moved += n;
        }
        moved
    });
}
