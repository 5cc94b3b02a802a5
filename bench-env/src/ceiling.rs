//! The ceiling of a user-space forwarder between two nodes, measured beside Switchyard and
//! the kernel: two node namespaces on one underlay link, one pod on each with a TAP created
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
use switchyard_dataplane::io::uplink::{Encap, Uplink};
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
        let peer_ns = nodes[1].path().to_string_lossy().into_owned();
        nodes[0].exec(&[
            "ip", "link", "add", "nul0", "type", "veth", "peer", "name", "nul1", "netns", &peer_ns,
        ])?;
        for (i, ns) in nodes.iter().enumerate() {
            let dev = format!("nul{i}");
            ns.exec(&[
                "ip",
                "addr",
                "add",
                &format!("{}/24", underlay[i]),
                "dev",
                &dev,
            ])?;
            ns.exec(&["ip", "link", "set", &dev, "up"])?;
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
            let config = PodInterface {
                ifname: "eth0".into(),
                mac: pod_mac,
                mtu: POD_MTU,
                ips: vec![format!("{ipv4}/24").parse().map_err(|e| fail!("{e}"))?],
                gateway,
                steering: Default::default(),
                gso_max_size: Some(gso_max_for_overlay(POD_MTU)),
            };
            let (tap, _) = TapDevice::create(&ns.path(), &config, QUEUES)?;
            tap.set_persist(false)?;
            // The pod's kernel asks for the gateway's MAC; nobody here answers ARP.
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

/// Queue `queue` of one node, both ways, until `stop`; pinned as the dataplane pins its
/// workers under its default steering (which the TAP carries too), with the uplink's
/// sockets chosen by receiving CPU as the dataplane's are.
fn forward(node: &NullNode, queue: usize, stop: &AtomicBool) {
    let _ = switchyard_dataplane::io::steering::pin_current_thread(queue, QUEUES);
    let fds: [RawFd; 2] = [
        node.tap.raw_fd(queue).unwrap_or(-1),
        node.uplink.raw_fd(queue).unwrap_or(-1),
    ];
    let mut pfds = fds.map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    let mut bufs: Vec<PacketBuf> = (0..BATCH).map(|_| PacketBuf::new()).collect();
    let mut scratch = vec![0u8; SCRATCH_LEN];
    let PortIo::Uplink(uplink) = node.uplink.as_ref() else {
        return;
    };
    let gateway = Gateway::default().mac;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `pfds` is a valid array of two pollfd for the duration of the call.
        if unsafe { libc::poll(pfds.as_mut_ptr(), 2, 100) } <= 0 {
            continue;
        }
        loop {
            let mut moved = 0;
            // Pod to the other node.
            let n = node.tap.recv_batch(queue, &mut bufs).unwrap_or(0);
            for buf in &mut bufs[..n] {
                let _ = uplink.send_to(buf.frame_mut(), node.peer, &mut scratch);
            }
            moved += n;
            // The other node to the pod: the frame is for the pod, from the gateway.
            let n = node.uplink.recv_batch(queue, &mut bufs).unwrap_or(0);
            for buf in &mut bufs[..n] {
                let frame = buf.frame_mut();
                if frame.len() >= vnet::HEADER_LEN + 12 {
                    frame[vnet::HEADER_LEN..vnet::HEADER_LEN + 6].copy_from_slice(&node.pod_mac.0);
                    frame[vnet::HEADER_LEN + 6..vnet::HEADER_LEN + 12].copy_from_slice(&gateway.0);
                }
                let _ = node.tap.send(queue, frame);
            }
            moved += n;
            if moved == 0 {
                break;
            }
        }
    }
}
