//! XDP on a device, for AF_XDP ports: a program that hands the frames the device receives
//! on queue `q` to the AF_XDP socket registered for `q` in its map (`bpf_redirect_map` on
//! an `XSKMAP`), and lets the kernel have the frame (`XDP_PASS`) when no socket is
//! registered for that queue. On a pod's veth every frame goes ([`Filter::All`]); on the
//! node's uplink only VXLAN datagrams to the node's address and port do
//! ([`Filter::Vxlan`]), or with direct routing only IPv4 packets to the node's pod CIDR
//! ([`Filter::PodCidr`]): the node's own traffic stays the kernel's. On the uplink the
//! program may also take what comes back to the node's address for the dataplane
//! (`PublishedChecks`): ICMP, and TCP and UDP to the ports it lists (the masquerade range, the
//! ports published to pods). Attached through a BPF link, so the program is on the device
//! exactly as long as the [`XdpRedirect`] lives: dropping it, or the process ending in any
//! way, detaches it.

use super::bpf::{self, insn, op};
use std::collections::HashMap;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// Which frames the program hands to the sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// Every frame (a pod's veth).
    All,
    /// Untagged IPv4 frames without options or fragmentation carrying UDP to this address
    /// and port (the node's uplink: VXLAN to the node); everything else is the kernel's.
    Vxlan {
        /// The node's address.
        local: Ipv4Addr,
        /// The VXLAN port.
        port: u16,
    },
    /// Untagged IPv4 frames to an address in `net`/`prefix` (the node's uplink under
    /// direct routing: packets for the node's pods); everything else is the kernel's.
    PodCidr {
        /// The network's address.
        net: Ipv4Addr,
        /// Its prefix length (0 to 32).
        prefix: u8,
    },
}

/// `bpf_redirect_map`.
const HELPER_REDIRECT_MAP: i32 = 51;
/// `offsetof(struct xdp_md, rx_queue_index)`.
const XDP_MD_RX_QUEUE: i16 = 16;
/// The action on a queue with no socket (the lower bits of `bpf_redirect_map`'s flags).
const XDP_PASS: i32 = 2;

/// The redirect program over `map`:
///
/// ```text
/// return bpf_redirect_map(map, ctx->rx_queue_index, XDP_PASS);
/// ```
fn redirect_program(map: RawFd) -> Vec<[u8; 8]> {
    let [map_lo, map_hi] = bpf::load_map(1, map);
    vec![
        insn(op::LDX_W, 2, 1, XDP_MD_RX_QUEUE, 0), // r2 = ctx->rx_queue_index
        map_lo,                                    // r1 = map
        map_hi,
        insn(op::MOV64_K, 3, 0, 0, XDP_PASS), // r3 = XDP_PASS
        insn(op::CALL, 0, 0, 0, HELPER_REDIRECT_MAP),
        insn(op::EXIT, 0, 0, 0, 0),
    ]
}

/// `offsetof(struct xdp_md, data)` and `data_end`.
const XDP_MD_DATA: i16 = 0;
const XDP_MD_DATA_END: i16 = 4;

/// Jump offsets [`filtered`] turns into jumps to its labels: `return XDP_PASS`, the
/// published ports' checks (or `return XDP_PASS` without them), and the redirect.
const TO_PASS: i16 = bpf::label(0);
const TO_MISS: i16 = bpf::label(1);
const TO_REDIRECT: i16 = bpf::label(2);

/// `bpf_map_lookup_elem`.
const HELPER_MAP_LOOKUP: i32 = 1;

/// What the program also takes for the node's address `node`, with
/// `ports` its map of ports.
struct PublishedChecks {
    node: Ipv4Addr,
    ports: RawFd,
}

/// The checks for what comes back to the node (entered at the label `TO_MISS` with
/// `r2 = data`, `r3 = data_end` and the frame at least 34 bytes of untagged IPv4): ICMP
/// and TCP or UDP to a listed port of the node's address, without options or fragments.
///
/// ```text
/// if (ip.dst != node || ip.ver_ihl != 0x45 || ip.frag_off & (MF | offset)) return XDP_PASS;
/// if (ip.proto == ICMP) goto redirect;
/// bit = ip.proto == TCP ? 1 : ip.proto == UDP ? 2 : return XDP_PASS;
/// if (data + 38 > data_end) return XDP_PASS;
/// flags = bpf_map_lookup_elem(ports, &dport);
/// if (!flags || !(*flags & bit)) return XDP_PASS;
/// goto redirect;
/// ```
fn published_checks(p: &PublishedChecks) -> Vec<[u8; 8]> {
    let node = i32::from_le_bytes(p.node.octets());
    let [map_lo, map_hi] = bpf::load_map(1, p.ports);
    vec![
        insn(op::LDX_W, 5, 2, 30, 0),                // destination address
        insn(op::JNE32_K, 5, 0, TO_PASS, node),      //
        insn(op::LDX_B, 5, 2, 14, 0),                // version, header length
        insn(op::JNE_K, 5, 0, TO_PASS, 0x45),        //
        insn(op::LDX_H, 5, 2, 20, 0),                // flags, fragment offset
        insn(op::AND64_K, 5, 0, 0, 0xff3f),          // MF and the offset
        insn(op::JNE_K, 5, 0, TO_PASS, 0),           //
        insn(op::LDX_B, 5, 2, 23, 0),                // protocol
        insn(op::JEQ_K, 5, 0, TO_REDIRECT, 1),       // ICMP
        insn(op::MOV64_K, 7, 0, 0, PORT_TCP as i32), //
        insn(op::JEQ_K, 5, 0, 2, 6),                 // TCP: skip to the ports
        insn(op::MOV64_K, 7, 0, 0, PORT_UDP as i32), //
        insn(op::JNE_K, 5, 0, TO_PASS, 17),          // neither TCP nor UDP
        insn(op::MOV64_X, 4, 2, 0, 0),               // r4 = data
        insn(op::ADD64_K, 4, 0, 0, 38),              // through the destination port
        insn(op::JGT_X, 4, 3, TO_PASS, 0),           //
        insn(op::LDX_H, 4, 2, 36, 0),                // destination port, as loaded
        insn(op::STX_W, 10, 4, -4, 0),               // the key, on the stack
        map_lo,                                      // r1 = ports
        map_hi,                                      //
        insn(op::MOV64_X, 2, 10, 0, 0),              // r2 = &key
        insn(op::ADD64_K, 2, 0, 0, -4),              //
        insn(op::CALL, 0, 0, 0, HELPER_MAP_LOOKUP),
        insn(op::JEQ_K, 0, 0, TO_PASS, 0), // no entry
        insn(op::LDX_W, 0, 0, 0, 0),       // its protocol bits
        insn(op::AND64_X, 0, 7, 0, 0),     //
        insn(op::JEQ_K, 0, 0, TO_PASS, 0), // not for this protocol
        insn(op::JA, 0, 0, TO_REDIRECT, 0),
    ]
}

/// A filter in front of [`redirect_program`]: with `r2 = data` and `r3 = data_end`, frames
/// shorter than `min_len` (at least 34) or not untagged IPv4 go to the kernel, then
/// `checks` run (their jumps with offset `TO_MISS` send the frame on to the published
/// checks if there are any, to the kernel otherwise; `TO_PASS` to the kernel), then the
/// redirect.
fn filtered(
    map: RawFd,
    min_len: i32,
    checks: &[[u8; 8]],
    published: Option<&PublishedChecks>,
) -> Vec<[u8; 8]> {
    let mut program = vec![
        insn(op::MOV64_X, 6, 1, 0, 0),         // r6 = ctx (kept across calls)
        insn(op::LDX_W, 2, 1, XDP_MD_DATA, 0), // r2 = data
        insn(op::LDX_W, 3, 1, XDP_MD_DATA_END, 0), // r3 = data_end
        insn(op::MOV64_X, 4, 2, 0, 0),         // r4 = data
        insn(op::ADD64_K, 4, 0, 0, min_len),   // r4 += min_len
        insn(op::JGT_X, 4, 3, TO_PASS, 0),     // too short
        insn(op::LDX_H, 5, 2, 12, 0),          // EtherType
        insn(op::JNE_K, 5, 0, TO_PASS, ETHERTYPE_IPV4),
    ];
    program.extend_from_slice(checks);
    let miss = match published {
        Some(published) => {
            program.push(insn(op::JA, 0, 0, TO_REDIRECT, 0));
            let miss = program.len() as i16;
            program.extend(published_checks(published));
            miss
        }
        None => -1,
    };
    let redirect = program.len() as i16;
    program.push(insn(op::MOV64_X, 1, 6, 0, 0)); // r1 = ctx
    program.extend(redirect_program(map));
    let pass = program.len() as i16;
    program.push(insn(op::MOV64_K, 0, 0, 0, XDP_PASS)); // pass: r0 = XDP_PASS
    program.push(insn(op::EXIT, 0, 0, 0, 0));
    let miss = if miss < 0 { pass } else { miss };
    // In the order of the labels TO_PASS, TO_MISS, TO_REDIRECT.
    bpf::resolve_labels(&mut program, &[pass, miss, redirect].map(|t| t as usize));
    program
}

/// The VXLAN filter in front of [`redirect_program`]: frames that are not untagged IPv4
/// (no options, not a fragment) UDP to `local`:`port` go to the kernel (or on to the
/// published checks).
///
/// ```text
/// if (data + 42 > data_end) return XDP_PASS;          // Ethernet, IPv4, UDP
/// if (eth.type != IPv4) return XDP_PASS;
/// if (ip.ver_ihl != 0x45 || ip.proto != UDP) goto miss;
/// if (ip.frag_off & (MF | offset)) goto miss;
/// if (ip.dst != local || udp.dst != port) goto miss;
/// return bpf_redirect_map(map, ctx->rx_queue_index, XDP_PASS);
/// ```
fn vxlan_program(
    map: RawFd,
    local: Ipv4Addr,
    port: u16,
    published: Option<&PublishedChecks>,
) -> Vec<[u8; 8]> {
    // Packet bytes are loaded little-endian: compare against the wire bytes read so.
    let local = i32::from_le_bytes(local.octets());
    let port = i32::from(u16::from_le_bytes(port.to_be_bytes()));
    filtered(
        map,
        42,
        &[
            insn(op::LDX_B, 5, 2, 14, 0),            // version, header length
            insn(op::JNE_K, 5, 0, TO_MISS, 0x45),    //
            insn(op::LDX_B, 5, 2, 23, 0),            // protocol
            insn(op::JNE_K, 5, 0, TO_MISS, 17),      //
            insn(op::LDX_H, 5, 2, 20, 0),            // flags, fragment offset
            insn(op::AND64_K, 5, 0, 0, 0xff3f),      // MF and the offset
            insn(op::JNE_K, 5, 0, TO_MISS, 0),       //
            insn(op::LDX_W, 5, 2, 30, 0),            // destination address
            insn(op::JNE32_K, 5, 0, TO_MISS, local), //
            insn(op::LDX_H, 5, 2, 36, 0),            // UDP destination port
            insn(op::JNE_K, 5, 0, TO_MISS, port),    //
        ],
        published,
    )
}

/// The EtherType of IPv4 as its wire bytes load little-endian.
const ETHERTYPE_IPV4: i32 = 0x0008;

/// The pod CIDR filter in front of [`redirect_program`]: frames that are not untagged IPv4
/// to an address in `net`/`prefix` go to the kernel (or on to the published checks).
///
/// ```text
/// if (data + 34 > data_end) return XDP_PASS;          // Ethernet, IPv4
/// if (eth.type != IPv4) return XDP_PASS;
/// if ((ip.dst & mask) != net) goto miss;
/// return bpf_redirect_map(map, ctx->rx_queue_index, XDP_PASS);
/// ```
fn pod_cidr_program(
    map: RawFd,
    net: Ipv4Addr,
    prefix: u8,
    published: Option<&PublishedChecks>,
) -> Vec<[u8; 8]> {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0);
    // Packet bytes are loaded little-endian: compare against the wire bytes read so.
    let wire = |v: u32| i32::from_le_bytes(v.to_be_bytes());
    let (mask, net) = (wire(mask), wire(u32::from(net) & mask));
    filtered(
        map,
        34,
        &[
            insn(op::LDX_W, 5, 2, 30, 0),          // destination address
            insn(op::AND64_K, 5, 0, 0, mask),      // its network
            insn(op::JNE32_K, 5, 0, TO_MISS, net), //
        ],
        published,
    )
}

/// Protocol bits of a published port (the values of the program's port map).
const PORT_TCP: u32 = 1;
const PORT_UDP: u32 = 2;

/// The bit of `protocol` in the port map, if the program takes that protocol by port.
fn port_bit(protocol: u8) -> Option<u32> {
    match protocol {
        6 => Some(PORT_TCP),
        17 => Some(PORT_UDP),
        _ => None,
    }
}

/// The key of `port` in the port map: the port as the program loads it from the wire
/// (little-endian).
fn port_key(port: u16) -> u32 {
    u32::from(u16::from_le_bytes(port.to_be_bytes()))
}

/// The redirect program attached to one device, with its socket map.
pub struct XdpRedirect {
    map: OwnedFd,
    /// The ports the program takes for the node's address, when it takes any.
    ports: Option<OwnedFd>,
    /// What `ports` holds: protocol bits by port.
    published: Mutex<HashMap<u16, u32>>,
    _program: OwnedFd,
    link: OwnedFd,
}

impl XdpRedirect {
    /// Loads the program for the frames `filter` names, with room for `queues` sockets,
    /// and attaches it to the device `ifindex` of the caller's namespace (native XDP where
    /// the driver has it, as veth does; the kernel's generic XDP otherwise). With
    /// `published` (the node's address; not for [`Filter::All`]), the program also takes
    /// ICMP to that address, and TCP and UDP to the ports set with
    /// [`XdpRedirect::publish`].
    pub fn attach(
        ifindex: u32,
        queues: u32,
        filter: Filter,
        published: Option<Ipv4Addr>,
    ) -> io::Result<Self> {
        let map = bpf::create_map(bpf::MAP_TYPE_XSKMAP, 4, 4, queues.max(1), b"sy_xsks")?;
        let ports = match (filter, published) {
            (Filter::All, _) | (_, None) => None,
            _ => Some(bpf::create_map(
                bpf::MAP_TYPE_ARRAY,
                4,
                4,
                1 << 16,
                b"sy_xsk_ports",
            )?),
        };
        let checks = published
            .zip(ports.as_ref())
            .map(|(node, ports)| PublishedChecks {
                node,
                ports: ports.as_raw_fd(),
            });
        let (instructions, name): (_, &[u8]) = match filter {
            Filter::All => (redirect_program(map.as_raw_fd()), b"sy_xsk_redirect"),
            Filter::Vxlan { local, port } => (
                vxlan_program(map.as_raw_fd(), local, port, checks.as_ref()),
                b"sy_xsk_vxlan",
            ),
            Filter::PodCidr { net, prefix } => (
                pod_cidr_program(map.as_raw_fd(), net, prefix, checks.as_ref()),
                b"sy_xsk_pods",
            ),
        };
        let program = bpf::load_program(bpf::PROG_TYPE_XDP, bpf::ATTACH_XDP, &instructions, name)?;
        let link = bpf::link_device(program.as_raw_fd(), ifindex, bpf::ATTACH_XDP, 0)?;
        Ok(Self {
            map,
            ports,
            published: Mutex::default(),
            _program: program,
            link,
        })
    }

    /// Makes the program take TCP and UDP to exactly these (protocol, port) pairs of the
    /// node's address, and leave every other port to the kernel; protocols other than
    /// TCP (6) and UDP (17), and a program without published ports, ignore them.
    pub fn publish(&self, ports: impl IntoIterator<Item = (u8, u16)>) -> io::Result<()> {
        let Some(map) = &self.ports else {
            return Ok(());
        };
        let mut wanted: HashMap<u16, u32> = HashMap::new();
        for (protocol, port) in ports {
            if let Some(bit) = port_bit(protocol) {
                *wanted.entry(port).or_default() |= bit;
            }
        }
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<u16> = published
            .keys()
            .filter(|p| !wanted.contains_key(p))
            .copied()
            .collect();
        let changes = gone.iter().map(|&p| (p, 0)).chain(
            wanted
                .iter()
                .filter(|(p, bits)| published.get(p) != Some(bits))
                .map(|(&p, &bits)| (p, bits)),
        );
        for (port, bits) in changes.collect::<Vec<_>>() {
            bpf::update_elem(
                map.as_raw_fd(),
                &port_key(port).to_ne_bytes(),
                &bits.to_ne_bytes(),
            )?;
            if bits == 0 {
                published.remove(&port);
            } else {
                published.insert(port, bits);
            }
        }
        Ok(())
    }

    /// Takes the program off the device now, before this value goes (only one XDP
    /// program fits a device: a successor's goes on after this).
    pub fn detach(&self) -> io::Result<()> {
        bpf::detach_link(self.link.as_raw_fd())
    }

    /// Sends the frames of queue `queue` to the AF_XDP socket `socket` (bound to that
    /// queue of the device).
    pub fn insert_socket(&self, queue: u32, socket: RawFd) -> io::Result<()> {
        bpf::update_elem(
            self.map.as_raw_fd(),
            &queue.to_ne_bytes(),
            &(socket as u32).to_ne_bytes(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_reads_the_queue_and_passes_what_no_socket_takes() {
        let program = redirect_program(9);
        assert_eq!(program.len(), 6);
        assert_eq!(
            program[0],
            [0x61, 0x12, 16, 0, 0, 0, 0, 0],
            "r2 = rx_queue_index"
        );
        assert_eq!(program[1][4], 9, "the map's descriptor");
        assert_eq!(program[3], [0xb7, 0x03, 0, 0, 2, 0, 0, 0], "r3 = XDP_PASS");
        assert_eq!(program[4][4], 51, "bpf_redirect_map");
        assert_eq!(program[5][0], 0x95, "exit");
    }

    /// Where every jump of `program` lands, by the instruction it is at.
    fn jump_targets(program: &[[u8; 8]]) -> Vec<(usize, usize)> {
        let jumps = [op::JGT_X, op::JNE_K, op::JNE32_K, op::JEQ_K, op::JA];
        program
            .iter()
            .enumerate()
            .filter(|(_, i)| jumps.contains(&i[0]))
            .map(|(at, i)| {
                let off = i16::from_le_bytes([i[2], i[3]]);
                (at, (at as i16 + 1 + off) as usize)
            })
            .collect()
    }

    const PASS: [u8; 8] = [0xb7, 0, 0, 0, 2, 0, 0, 0];

    #[test]
    fn the_vxlan_filter_compares_wire_bytes_and_jumps_to_pass() {
        let program = vxlan_program(9, Ipv4Addr::new(192, 168, 77, 1), 4789, None);
        assert_eq!(program.len(), 28);
        // Every conditional jump lands on `r0 = XDP_PASS`.
        for (at, target) in jump_targets(&program) {
            assert_eq!(program[target], PASS, "from {at}");
        }
        // 192.168.77.1 as its wire bytes loaded little-endian; port 4789 = 0x12b5 on the wire.
        assert_eq!(program[16][4..], [192, 168, 77, 1]);
        assert_eq!(
            i32::from_le_bytes(program[18][4..].try_into().unwrap()),
            0xb512
        );
        assert_eq!(
            i32::from_le_bytes(program[7][4..].try_into().unwrap()),
            0x0008
        );
        assert_eq!(program[19], [0xbf, 0x61, 0, 0, 0, 0, 0, 0], "r1 = ctx");
        assert_eq!(program[20..26], redirect_program(9)[..]);
    }

    #[test]
    fn the_pod_cidr_filter_masks_the_destination_and_jumps_to_pass() {
        let program = pod_cidr_program(9, Ipv4Addr::new(10, 244, 128, 77), 17, None);
        assert_eq!(program.len(), 20);
        for (at, target) in jump_targets(&program) {
            assert_eq!(program[target], PASS, "from {at}");
        }
        // /17: 255.255.128.0 and the network 10.244.128.0, as wire bytes.
        assert_eq!(program[9][4..], [255, 255, 128, 0]);
        assert_eq!(program[10][4..], [10, 244, 128, 0]);
        assert_eq!(program[12..18], redirect_program(9)[..]);
        let all = pod_cidr_program(9, Ipv4Addr::new(10, 0, 0, 1), 0, None);
        assert_eq!(all[9][4..], [0, 0, 0, 0], "/0 matches everything");
        let one = pod_cidr_program(9, Ipv4Addr::new(10, 0, 0, 1), 32, None);
        assert_eq!(one[10][4..], [10, 0, 0, 1]);
    }

    #[test]
    fn a_filter_that_misses_goes_on_to_the_published_ports_then_to_pass_or_redirect() {
        let published = PublishedChecks {
            node: Ipv4Addr::new(192, 168, 77, 1),
            ports: 11,
        };
        let program = vxlan_program(9, published.node, 4789, Some(&published));
        let miss = 20; // after the VXLAN checks and their jump to the redirect
        let redirect = program
            .iter()
            .position(|i| *i == [0xbf, 0x61, 0, 0, 0, 0, 0, 0])
            .unwrap();
        assert_eq!(program[redirect + 1..redirect + 7], redirect_program(9)[..]);
        let pass = program.len() - 2;
        assert_eq!(program[pass], PASS);
        for (at, target) in jump_targets(&program) {
            let expected: &[usize] = match at {
                // The VXLAN checks miss into the published checks; a match redirects.
                9..=18 => &[miss],
                19 => &[redirect],
                // ICMP, and a listed port, redirect; TCP skips to the ports.
                _ if program[at][0] == op::JA => &[redirect],
                _ if program[at][4] == 1 && program[at][0] == op::JEQ_K => &[redirect],
                _ if program[at][4] == 6 && program[at][0] == op::JEQ_K => &[at + 3],
                _ => &[pass],
            };
            assert!(expected.contains(&target), "jump at {at} to {target}");
        }
        // The node's address, the port map and the lookup helper.
        assert_eq!(program[miss][0], op::LDX_W);
        assert_eq!(program[miss + 1][4..], [192, 168, 77, 1]);
        assert!(program.iter().any(|i| i[0] == op::LD_IMM64 && i[4] == 11));
        assert!(program
            .iter()
            .any(|i| i[0] == op::CALL && i[4] == HELPER_MAP_LOOKUP as u8));
        // Port 53 is keyed as the program loads it from the wire.
        assert_eq!(port_key(53), 0x3500);
        assert_eq!(port_bit(6), Some(PORT_TCP));
        assert_eq!(port_bit(132), None);
    }
}
