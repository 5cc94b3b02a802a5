//! XDP programs on a device: loaded by the dataplane itself, with no external loader, and
//! gone from the device once their owner is.

use bench_env::netns::Netns;
use switchyard_dataplane::io::netns::{link_index, run_in};
use switchyard_dataplane::io::xdp::{Filter, XdpRedirect};

/// A namespace `sy-<what>-<pid>` with a veth pair `sy<what>0` / `sy<what>1` of one queue
/// each, both up; removed with the namespace.
fn veth_pair(what: &str) -> Netns {
    let ns = Netns::create(&format!("sy-{what}-{}", std::process::id())).unwrap();
    let (a, b) = (format!("sy{what}0"), format!("sy{what}1"));
    let one = "1";
    ns.exec(&[
        "ip",
        "link",
        "add",
        &a,
        "numtxqueues",
        one,
        "numrxqueues",
        one,
        "type",
        "veth",
        "peer",
        "name",
        &b,
        "numtxqueues",
        one,
        "numrxqueues",
        one,
    ])
    .unwrap();
    for dev in [&a, &b] {
        ns.exec(&["ip", "link", "set", dev, "up"]).unwrap();
    }
    ns
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and XDP programs"
)]
fn the_redirect_program_attaches_to_a_veth_and_goes_with_its_owner() {
    bench_env::require_root("XDP test");
    let ns = veth_pair("xdp");
    let shown = || ns.exec(&["ip", "-d", "link", "show", "syxdp0"]).unwrap();
    assert!(!shown().contains("prog/xdp"), "nothing before: {}", shown());
    let redirect = run_in(&ns.path(), || {
        let index = link_index("syxdp0").expect("the veth");
        XdpRedirect::attach(index, 2, Filter::All, None)
    })
    .unwrap_or_else(|e| panic!("the kernel refused the program or the link: {e}"));
    let attached = shown();
    assert!(
        attached.contains("prog/xdp") && attached.contains("sy_xsk_redirect"),
        "{attached}"
    );
    drop(redirect);
    let after = shown();
    assert!(
        !after.contains("prog/xdp"),
        "detached with its owner: {after}"
    );
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and AF_XDP sockets"
)]
fn an_af_xdp_socket_receives_and_sends_frames_on_a_veth() {
    use bench_env::rawsock::{capture, send_frames, CAPTURE_VNET_LEN};
    use switchyard_dataplane::io::xsk::{XskSocket, FRAME_SIZE, UPLINK_RX_RING};
    bench_env::require_root("AF_XDP test");
    let ns = veth_pair("xsk");
    let path = ns.path();
    let (_redirect, mut socket) = run_in(&path, || {
        let index = link_index("syxsk0").expect("the veth");
        let redirect = XdpRedirect::attach(index, 1, Filter::All, None)?;
        let socket = XskSocket::bind(index, 0, FRAME_SIZE, UPLINK_RX_RING)?;
        redirect.insert_socket(0, socket.raw_fd())?;
        Ok((redirect, socket))
    })
    .unwrap_or_else(|e| panic!("cannot set up the AF_XDP socket: {e}"));
    // A frame of a local experimental EtherType, to every station.
    let frame = |text: &[u8]| -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x88, 0xb5]);
        f.extend_from_slice(text);
        f.resize(60, 0);
        f
    };
    let inbound = frame(b"to the socket");
    send_frames(&path, "syxsk1", vec![inbound.clone()]).unwrap();
    let mut buf = [0u8; 2048];
    let started = std::time::Instant::now();
    let received = loop {
        // The kernel's own frames on a veth just up (IPv6 multicast listener reports,
        // neighbour solicitations) may come first: only the test's EtherType counts.
        if let Some(n) = socket.recv(&mut buf) {
            if n >= 14 && buf[12..14] == inbound[12..14] {
                break buf[..n].to_vec();
            }
            continue;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "nothing reached the socket"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    assert_eq!(received, inbound);
    let outbound = frame(b"from the socket");
    let watcher = {
        let path = path.clone();
        std::thread::spawn(move || {
            capture(&path, "syxsk1", std::time::Duration::from_millis(800)).unwrap()
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(200));
    socket.send(&outbound).unwrap();
    let seen = watcher.join().unwrap();
    assert!(
        seen.iter()
            .any(|f| f.get(CAPTURE_VNET_LEN..) == Some(&outbound[..])),
        "the peer did not see the frame the socket sent: {} frames",
        seen.len()
    );
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and XDP programs"
)]
fn the_afxdp_uplink_refuses_a_device_that_runs_another_program_and_says_what_to_do() {
    use switchyard_dataplane::io::uplink::{Encap, Uplink, UplinkMode};
    bench_env::require_root("XDP test");
    let ns = veth_pair("xup");
    ns.add_address("syxup0", "192.168.79.1/24").unwrap();
    let result = run_in(&ns.path(), || {
        let index = link_index("syxup0").expect("the veth");
        let _other = XdpRedirect::attach(index, 1, Filter::All, None)?;
        let mac = switchyard_api::MacAddr([2, 0, 0, 0, 0, 1]);
        match Uplink::open(
            Encap::Vxlan { vni: 1, port: 4789 },
            "192.168.79.1".parse().unwrap(),
            1,
            mac,
            mac,
            None,
            false,
            UplinkMode::AfXdp,
            None,
            None,
        ) {
            Ok(_) => Ok(None),
            Err(e) => Ok(Some(e.to_string())),
        }
    })
    .unwrap();
    let message = result.expect("a second XDP program on the device is refused");
    assert!(
        message.contains("another XDP program is on syxup0")
            && message.contains("--uplink-mode sockets"),
        "{message}"
    );
}
