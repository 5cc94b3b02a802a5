//! The TAP steering programs on a real multi-queue TAP: which queue, and so which worker,
//! the kernel hands each frame to.

use bench_env::netns::Netns;
use bench_env::rawsock::send_frames;
use switchyard_dataplane::buffer::PacketBuf;
use switchyard_dataplane::io::netns::run_in;
use switchyard_dataplane::io::steering::Steering;
use switchyard_dataplane::io::tap::TapDevice;
use switchyard_dataplane::io::PortIo;

/// What a test frame is.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// IPv4 UDP, flow `f` from source port 40000 + f.
    V4,
    /// IPv6 UDP, likewise.
    V6,
    /// The first fragment of IPv4 datagram `f` (its ports inside), from 192.0.2.(1 + f).
    FirstFragment,
    /// A later fragment of it (no ports).
    LaterFragment,
}

/// A 600-byte frame of flow `flow` (IPv4's identification field, or the source port for
/// IPv6), or with addresses and ports swapped for its `reply`, as a node forwards it: no
/// socket, so no socket's hash.
fn frame(flow: u16, kind: Kind, reply: bool) -> Vec<u8> {
    let ipv6 = kind == Kind::V6;
    let mut f = vec![0x0e, 0xee, 0xee, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    let (mut src, mut dst) = (vec![192, 0, 2, 1], vec![198, 51, 100, 7]);
    if matches!(kind, Kind::FirstFragment | Kind::LaterFragment) {
        src[3] += flow as u8;
    }
    if ipv6 {
        src = [0x20, 0x01, 0x0d, 0xb8]
            .into_iter()
            .chain([0; 11])
            .chain([1])
            .collect();
        dst = [0x20, 0x01, 0x0d, 0xb8]
            .into_iter()
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
        let fragment: u16 = match kind {
            Kind::FirstFragment => 0x2000, // more fragments
            Kind::LaterFragment => 185,    // at 1,480 bytes
            _ => 0x4000,                   // don't fragment
        };
        f.extend_from_slice(&[0x08, 0x00, 0x45, 0]);
        f.extend_from_slice(&(20 + udp_len).to_be_bytes());
        f.extend_from_slice(&flow.to_be_bytes());
        f.extend_from_slice(&fragment.to_be_bytes());
        f.extend_from_slice(&[64, 17, 0, 0]);
    }
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    if kind != Kind::LaterFragment {
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&udp_len.to_be_bytes());
        f.extend_from_slice(&[0, 0]);
    }
    f.resize(600, 0xab);
    f
}

/// The test's frames each queue of `tap` holds, as (kind, flow).
fn drain(tap: &PortIo, queues: usize) -> Vec<Vec<(Kind, u16)>> {
    let mut bufs: Vec<PacketBuf> = (0..8).map(|_| PacketBuf::new()).collect();
    (0..queues)
        .map(|q| {
            let mut seen = Vec::new();
            while let Ok(n) = tap.recv_batch(q, &mut bufs, usize::MAX) {
                if n == 0 {
                    break;
                }
                seen.extend(bufs[..n].iter().filter_map(|b| recognise(b.ethernet())));
            }
            seen
        })
        .collect()
}

/// A frame [`frame`] built, as (kind, flow); `None` for others (the kernel sends its own
/// IPv6 frames on a new link).
fn recognise(e: &[u8]) -> Option<(Kind, u16)> {
    let word = |at: usize| e.get(at..at + 2).map(|p| u16::from_be_bytes([p[0], p[1]]));
    match e.get(12..14)? {
        [0x08, 0x00] if e.get(23) == Some(&17) => {
            let (flow, fragment) = (word(18)?, word(20)? & 0x3fff);
            let kind = match fragment {
                0 => Kind::V4,
                0x2000 => Kind::FirstFragment,
                _ => Kind::LaterFragment,
            };
            Some((kind, flow))
        }
        [0x86, 0xdd] => match (word(54)?, word(56)?) {
            (sport @ 40_000.., 30_201) => Some((Kind::V6, sport - 40_000)),
            _ => None,
        },
        _ => None,
    }
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
    let flows: Vec<(Kind, u16)> = (0..FLOWS)
        .flat_map(|f| [(Kind::V4, f), (Kind::V6, f)])
        .collect();
    let fragments: Vec<(Kind, u16)> = (0..FLOWS)
        .flat_map(|f| [(Kind::FirstFragment, f), (Kind::LaterFragment, f)])
        .collect();
    let send = |round: u16| {
        let frames = (0..4)
            .flat_map(|_| flows.iter().chain(&fragments))
            .map(|&(kind, f)| frame(f, kind, false))
            .collect();
        let sent = send_frames(&path, "systeer0", frames).unwrap();
        assert_eq!(
            sent,
            (flows.len() + fragments.len()) * 4,
            "{steering:?}, round {round}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
        drain(&tap, QUEUES)
    };
    let queue_of = |held: &[Vec<(Kind, u16)>], flow: (Kind, u16)| -> usize {
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
    // Fragments go by their addresses alone: the first, which holds the ports, with the
    // later ones of its datagram.
    for f in 0..FLOWS {
        assert_eq!(
            queue_of(&first, (Kind::FirstFragment, f)),
            queue_of(&first, (Kind::LaterFragment, f)),
            "{steering:?}: the fragments of datagram {f} parted"
        );
    }
    // Each flow's reply written through the queue it did not arrive on, as a worker that
    // received the reply from another node would: the kernel's own spreading moves the
    // flow to that queue, which reorders it.
    for (&(kind, f), &q) in flows.iter().zip(&placed) {
        let mut buf = PacketBuf::new();
        buf.load_ethernet(&frame(f, kind, true));
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
