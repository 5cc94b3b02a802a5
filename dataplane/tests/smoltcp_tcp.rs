//! Real TCP through the pipeline, without namespaces: two smoltcp stacks, each behind an
//! in-memory port, exchange a checked byte stream over IPv4 and over IPv6. The stacks
//! resolve the gateway through the pipeline's ARP / ND answers and route through it.

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr};
use switchyard_api::AddPort;
use switchyard_dataplane::buffer::{PacketBuf, BATCH};
use switchyard_dataplane::io::memory::MemoryPeer;
use switchyard_dataplane::pipeline::{Pipeline, Verdict};
use switchyard_dataplane::worker::{forward_batch, QueueRead};
use switchyard_dataplane::{Switch, SwitchConfig};

/// A smoltcp device on the pod side of an in-memory port.
struct PodDevice(MemoryPeer);

struct Rx(Vec<u8>);
struct Tx<'a>(&'a MemoryPeer);

impl RxToken for Rx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0[12..]) // strip the virtio-net header
    }
}

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        assert!(self.0.send_ethernet(&frame), "port queue full");
        r
    }
}

impl Device for PodDevice {
    type RxToken<'a> = Rx;
    type TxToken<'a> = Tx<'a>;

    fn receive(&mut self, _: Instant) -> Option<(Rx, Tx<'_>)> {
        let frame = self.0.recv()?;
        Some((Rx(frame), Tx(&self.0)))
    }

    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&self.0))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps
    }
}

struct Pod {
    port: u32,
    device: PodDevice,
    iface: Interface,
    sockets: SocketSet<'static>,
    tcp: SocketHandle,
}

fn pod(switch: &Switch, name: &str, v4: [u8; 4], v6_last: u16) -> Pod {
    let spec = AddPort {
        netns: format!("/test/{name}"),
        ifname: "eth0".into(),
        ips: vec![
            format!("{}.{}.{}.{}/24", v4[0], v4[1], v4[2], v4[3])
                .parse()
                .unwrap(),
            format!("fd00::{v6_last:x}/64").parse().unwrap(),
        ],
        mtu: Some(1500),
        mac: None,
        owner: None,
        pod: None,
        port_mappings: Vec::new(),
        kind: None,
    };
    let (info, peer) = switch.add_memory_port(&spec, false).unwrap();
    let mut device = PodDevice(peer);
    let config = Config::new(HardwareAddress::Ethernet(EthernetAddress(info.mac.0)));
    let mut iface = Interface::new(config, &mut device, Instant::ZERO);
    iface.update_ip_addrs(|addrs| {
        addrs
            .push(IpCidr::new(IpAddress::v4(v4[0], v4[1], v4[2], v4[3]), 24))
            .unwrap();
        addrs
            .push(IpCidr::new(
                IpAddress::v6(0xfd00, 0, 0, 0, 0, 0, 0, v6_last),
                64,
            ))
            .unwrap();
    });
    iface
        .routes_mut()
        .add_default_ipv4_route(smoltcp::wire::Ipv4Address::new(169, 254, 1, 1))
        .unwrap();
    iface
        .routes_mut()
        .add_default_ipv6_route(smoltcp::wire::Ipv6Address::new(0xfe80, 0, 0, 0, 0, 0, 0, 1))
        .unwrap();
    let mut sockets = SocketSet::new(vec![]);
    let socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 256 * 1024]),
        tcp::SocketBuffer::new(vec![0; 256 * 1024]),
    );
    let tcp = sockets.add(socket);
    Pod {
        port: info.id,
        device,
        iface,
        sockets,
        tcp,
    }
}

fn transfer(server_addr: IpAddress) {
    let switch = Switch::start(SwitchConfig {
        workers: 1,
        ..SwitchConfig::default()
    })
    .unwrap();
    let mut a = pod(&switch, "a", [10, 244, 0, 5], 5);
    // Same /24: smoltcp only accepts ARP answers from its own subnets, so it resolves
    // the peer (proxy-ARP) rather than 169.254.1.1. Linux pods in bench-env cover the
    // gateway path.
    let mut b = pod(&switch, "b", [10, 244, 0, 6], 6);
    b.sockets
        .get_mut::<tcp::Socket>(b.tcp)
        .listen(7000)
        .unwrap();
    let cx = a.iface.context();
    a.sockets
        .get_mut::<tcp::Socket>(a.tcp)
        .connect(cx, (server_addr, 7000), 49152)
        .unwrap();

    const TOTAL: usize = 4 << 20;
    let data: Vec<u8> = (0..TOTAL).map(|i| (i * 31 % 251) as u8).collect();
    let (mut sent, mut received) = (0usize, Vec::with_capacity(TOTAL));
    let mut pipeline = Pipeline::new();
    let mut bufs: Vec<PacketBuf> = (0..BATCH).map(|_| PacketBuf::new()).collect();
    let mut verdicts = [Verdict::Drop; BATCH];
    let mut now = Instant::ZERO;
    for _ in 0..200_000 {
        for pod in [&mut a, &mut b] {
            pod.iface.poll(now, &mut pod.device, &mut pod.sockets);
        }
        let tables = switch.tables();
        for id in [a.port, b.port] {
            let port = &tables.ports[&id];
            while forward_batch(
                &mut pipeline,
                &tables,
                port,
                QueueRead::drain(0),
                &mut bufs,
                &mut verdicts,
                0,
            )
            .unwrap()
            .frames
                > 0
            {}
        }
        let client = a.sockets.get_mut::<tcp::Socket>(a.tcp);
        if client.can_send() && sent < TOTAL {
            sent += client.send_slice(&data[sent..]).unwrap();
        }
        if sent == TOTAL && client.send_queue() == 0 {
            client.close();
        }
        let server = b.sockets.get_mut::<tcp::Socket>(b.tcp);
        while server.can_recv() {
            server
                .recv(|chunk| {
                    received.extend_from_slice(chunk);
                    (chunk.len(), ())
                })
                .unwrap();
        }
        if received.len() == TOTAL {
            break;
        }
        now += smoltcp::time::Duration::from_micros(100);
    }
    assert_eq!(
        received.len(),
        TOTAL,
        "transfer incomplete; pipeline counters {:?}",
        pipeline.counters()
    );
    assert!(received == data, "payload corrupted");
    let counters = pipeline.counters();
    assert!(
        counters.count(switchyard_dataplane::pipeline::Event::ArpReplies)
            + counters.count(switchyard_dataplane::pipeline::Event::NdReplies)
            >= 2
    );
    switch.shutdown();
}

#[test]
fn tcp_over_ipv4_through_the_pipeline() {
    transfer(IpAddress::v4(10, 244, 0, 6));
}

#[test]
fn tcp_over_ipv6_through_the_pipeline() {
    transfer(IpAddress::v6(0xfd00, 0, 0, 0, 0, 0, 0, 6));
}
