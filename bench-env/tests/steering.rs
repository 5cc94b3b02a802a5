//! The TAP steering programs on a real multi-queue TAP: which queue, and so which worker,
//! the kernel hands each frame to.

use bench_env::netns::Netns;
use bench_env::rawsock::send_frames;
use switchyard_dataplane::buffer::PacketBuf;
use switchyard_dataplane::io::netns::run_in;
use switchyard_dataplane::io::steering::Steering;
use switchyard_dataplane::io::tap::TapDevice;
use switchyard_dataplane::io::PortIo;

/// A 600-byte UDP frame of flow `flow` (its source port), IPv4 or IPv6, `from` one side
/// or the other (addresses and ports swapped), as a node forwards it: no socket, so no
/// socket's hash.
fn frame(flow: u16, ipv6: bool, reply: bool) -> Vec<u8> {
    let mut f = vec![0x0e, 0xee, 0xee, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    let (mut src, mut dst) = (vec![192, 0, 2, 1], vec![198, 51, 100, 7]);
    if ipv6 {
        src = [0x20, 0x01, 0x0d, 0xb8]
            .iter()
            .copied()
            .chain([0; 11])
            .chain([1])
            .collect();
        dst = [0x20, 0x01, 0x0d, 0xb8]
            .iter()
            .copied()
            .chain([9; 12])
            .collect();
    }
    let (mut sport, mut dport) = (40_000 + flow, 30_201u16);
    if reply {
        std::mem::swap(&mut src, &mut dst);
        std::mem::swap(&mut sport, &mut dport);
    }
    let payload = 600 - 14 - if ipv6 { 40 } else { 20 } - 8;
    let udp_len = (8 + payload) as u16;
    if ipv6 {
        f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        f.extend_from_slice(&udp_len.to_be_bytes());
        f.extend_from_slice(&[17, 64]);
    } else {
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        f.extend_from_slice(&(20 + udp_len).to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x40, 0, 64, 17, 0, 0]);
    }
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(600, 0xab);
    f
}

/// The flows (source ports as `frame` built them) of what each queue of `tap` holds.
fn drain(tap: &PortIo, queues: usize) -> Vec<Vec<(bool, u16)>> {
    let mut bufs: Vec<PacketBuf> = (0..8).map(|_| PacketBuf::new()).collect();
    (0..queues)
        .map(|q| {
            let mut seen = Vec::new();
            while let Ok(n) = tap.recv_batch(q, &mut bufs) {
                if n == 0 {
                    break;
                }
                for b in &bufs[..n] {
                    let e = b.ethernet();
                    let (ipv6, at) = match e.get(12..14) {
                        Some([0x08, 0x00]) => (false, 14 + 20),
                        Some([0x86, 0xdd]) => (true, 14 + 40),
                        _ => continue,
                    };
                    let port =
                        |at: usize| e.get(at..at + 2).map(|p| u16::from_be_bytes([p[0], p[1]]));
                    // Only the test's own: the kernel sends its own IPv6 frames on a new link.
                    if let (Some(sport @ 40_000..), Some(30_201)) = (port(at), port(at + 2)) {
                        seen.push((ipv6, sport - 40_000));
                    }
                }
            }
            seen
        })
        .collect()
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn the_host_port_keeps_each_forwarded_flow_on_one_queue_whatever_its_replies_take() {
    bench_env::require_root("TAP steering test");
    for steering in [Steering::Adaptive, Steering::Hash] {
        flows_stay_on_their_queues(steering);
    }
}

/// Forwarded flows (large frames, no socket's hash) spread over the queues of a host port
/// steered by `steering`, and each stays on its queue after its replies went through
/// another.
fn flows_stay_on_their_queues(steering: Steering) {
    const QUEUES: usize = 2;
    const FLOWS: u16 = 16;
    let ns = Netns::create(&format!("sy-steer-{}", std::process::id())).unwrap();
    let path = ns.path();
    let tap = run_in(&path, || {
        let mac = "0e:ee:ee:00:00:01".parse().unwrap();
        let (tap, _, _) = TapDevice::create_host("systeer0", mac, 1500, QUEUES, None, steering)?;
        Ok(PortIo::Tap(tap))
    })
    .unwrap_or_else(|e| panic!("cannot create the TAP: {e}"));
    let flows: Vec<(bool, u16)> = (0..FLOWS).flat_map(|f| [(false, f), (true, f)]).collect();
    let send = |round: u16| {
        let frames = (0..4)
            .flat_map(|_| flows.iter().map(|&(v6, f)| frame(f, v6, false)))
            .collect();
        let sent = send_frames(&path, "systeer0", frames).unwrap();
        assert_eq!(sent, flows.len() * 4, "{steering:?}, round {round}");
        std::thread::sleep(std::time::Duration::from_millis(100));
        drain(&tap, QUEUES)
    };
    let queue_of = |held: &[Vec<(bool, u16)>], flow: (bool, u16)| -> usize {
        let on: Vec<usize> = (0..QUEUES).filter(|&q| held[q].contains(&flow)).collect();
        assert_eq!(on.len(), 1, "flow {flow:?} on queues {on:?}: {held:?}");
        assert_eq!(held[on[0]].iter().filter(|&&f| f == flow).count(), 4);
        on[0]
    };
    let first = send(0);
    let placed: Vec<usize> = flows.iter().map(|&f| queue_of(&first, f)).collect();
    assert!(
        (0..QUEUES).all(|q| placed.contains(&q)),
        "{steering:?}: {} flows, all on one queue: {placed:?}",
        flows.len()
    );
    // Each flow's reply written through the queue it did not arrive on, as a worker that
    // received the reply from another node would: the kernel's own spreading moves the
    // flow to that queue, which reorders it.
    for (&(v6, f), &q) in flows.iter().zip(&placed) {
        let mut buf = PacketBuf::new();
        buf.load_ethernet(&frame(f, v6, true));
        tap.send((q + 1) % QUEUES, buf.frame()).unwrap();
    }
    let second = send(1);
    for (&flow, &q) in flows.iter().zip(&placed) {
        assert_eq!(
            queue_of(&second, flow),
            q,
            "{steering:?}: flow {flow:?} moved"
        );
    }
    drop(tap);
    run_in(&path, || TapDevice::remove_persistent("systeer0")).unwrap();
}
