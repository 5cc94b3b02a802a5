//! XDP on a device, for AF_XDP ports: a program that hands the frames the device receives
//! on queue `q` to the AF_XDP socket registered for `q` in its map (`bpf_redirect_map` on
//! an `XSKMAP`), and lets the kernel have the frame (`XDP_PASS`) when no socket is
//! registered for that queue. On a pod's veth every frame goes ([`Filter::All`]); on the
//! node's uplink only VXLAN datagrams to the node's address and port do
//! ([`Filter::Vxlan`]), or with direct routing only IPv4 packets to the node's pod CIDR
//! ([`Filter::PodCidr`]): the node's own traffic stays the kernel's. Attached through a BPF
//! link, so the program is on the device exactly as long as the [`XdpRedirect`] lives:
//! dropping it, or the process ending in any way, detaches it.

use super::bpf::{self, insn, op};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

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

/// The jump offset [`filtered`] turns into a jump to `return XDP_PASS`.
const TO_PASS: i16 = i16::MIN;

/// A filter in front of [`redirect_program`]: with `r2 = data` and `r3 = data_end`, frames
/// shorter than `min_len` go to the kernel, then `checks` run (their jumps with offset
/// [`TO_PASS`] send the frame to the kernel), then the redirect.
fn filtered(map: RawFd, min_len: i32, checks: &[[u8; 8]]) -> Vec<[u8; 8]> {
    let mut program = vec![
        insn(op::LDX_W, 2, 1, XDP_MD_DATA, 0),     // r2 = data
        insn(op::LDX_W, 3, 1, XDP_MD_DATA_END, 0), // r3 = data_end
        insn(op::MOV64_X, 4, 2, 0, 0),             // r4 = data
        insn(op::ADD64_K, 4, 0, 0, min_len),       // r4 += min_len
        insn(op::JGT_X, 4, 3, TO_PASS, 0),         // too short
    ];
    program.extend_from_slice(checks);
    program.extend(redirect_program(map));
    let pass = program.len() as i16;
    program.push(insn(op::MOV64_K, 0, 0, 0, XDP_PASS)); // pass: r0 = XDP_PASS
    program.push(insn(op::EXIT, 0, 0, 0, 0));
    for (at, i) in program.iter_mut().enumerate() {
        if i16::from_le_bytes([i[2], i[3]]) == TO_PASS {
            i[2..4].copy_from_slice(&(pass - (at as i16 + 1)).to_le_bytes());
        }
    }
    program
}

/// The VXLAN filter in front of [`redirect_program`]: frames that are not untagged IPv4
/// (no options, not a fragment) UDP to `local`:`port` go to the kernel.
///
/// ```text
/// if (data + 42 > data_end) return XDP_PASS;          // Ethernet, IPv4, UDP
/// if (eth.type != IPv4 || ip.ver_ihl != 0x45 || ip.proto != UDP) return XDP_PASS;
/// if (ip.frag_off & (MF | offset)) return XDP_PASS;
/// if (ip.dst != local || udp.dst != port) return XDP_PASS;
/// return bpf_redirect_map(map, ctx->rx_queue_index, XDP_PASS);
/// ```
fn vxlan_program(map: RawFd, local: Ipv4Addr, port: u16) -> Vec<[u8; 8]> {
    // Packet bytes are loaded little-endian: compare against the wire bytes read so.
    let local = i32::from_le_bytes(local.octets());
    let port = i32::from(u16::from_le_bytes(port.to_be_bytes()));
    filtered(
        map,
        42,
        &[
            insn(op::LDX_H, 5, 2, 12, 0),                   // 5: EtherType
            insn(op::JNE_K, 5, 0, TO_PASS, ETHERTYPE_IPV4), // 6
            insn(op::LDX_B, 5, 2, 14, 0),                   // 7: version, header length
            insn(op::JNE_K, 5, 0, TO_PASS, 0x45),           // 8
            insn(op::LDX_B, 5, 2, 23, 0),                   // 9: protocol
            insn(op::JNE_K, 5, 0, TO_PASS, 17),             // 10
            insn(op::LDX_H, 5, 2, 20, 0),                   // 11: flags, fragment offset
            insn(op::AND64_K, 5, 0, 0, 0xff3f),             // 12: MF and the offset
            insn(op::JNE_K, 5, 0, TO_PASS, 0),              // 13
            insn(op::LDX_W, 5, 2, 30, 0),                   // 14: destination address
            insn(op::JNE32_K, 5, 0, TO_PASS, local),        // 15
            insn(op::LDX_H, 5, 2, 36, 0),                   // 16: UDP destination port
            insn(op::JNE_K, 5, 0, TO_PASS, port),           // 17
        ],
    )
}

/// The EtherType of IPv4 as its wire bytes load little-endian.
const ETHERTYPE_IPV4: i32 = 0x0008;

/// The pod CIDR filter in front of [`redirect_program`]: frames that are not untagged IPv4
/// to an address in `net`/`prefix` go to the kernel.
///
/// ```text
/// if (data + 34 > data_end) return XDP_PASS;          // Ethernet, IPv4
/// if (eth.type != IPv4) return XDP_PASS;
/// if ((ip.dst & mask) != net) return XDP_PASS;
/// return bpf_redirect_map(map, ctx->rx_queue_index, XDP_PASS);
/// ```
fn pod_cidr_program(map: RawFd, net: Ipv4Addr, prefix: u8) -> Vec<[u8; 8]> {
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
            insn(op::LDX_H, 5, 2, 12, 0),                   // 5: EtherType
            insn(op::JNE_K, 5, 0, TO_PASS, ETHERTYPE_IPV4), // 6
            insn(op::LDX_W, 5, 2, 30, 0),                   // 7: destination address
            insn(op::AND64_K, 5, 0, 0, mask),               // 8: its network
            insn(op::JNE32_K, 5, 0, TO_PASS, net),          // 9
        ],
    )
}

/// The redirect program attached to one device, with its socket map.
pub struct XdpRedirect {
    map: OwnedFd,
    _program: OwnedFd,
    link: OwnedFd,
}

impl XdpRedirect {
    /// Loads the program for the frames `filter` names, with room for `queues` sockets,
    /// and attaches it to the device `ifindex` of the caller's namespace (native XDP where
    /// the driver has it, as veth does; the kernel's generic XDP otherwise).
    pub fn attach(ifindex: u32, queues: u32, filter: Filter) -> io::Result<Self> {
        let map = bpf::create_map(bpf::MAP_TYPE_XSKMAP, 4, 4, queues.max(1), b"sy_xsks")?;
        let (instructions, name): (_, &[u8]) = match filter {
            Filter::All => (redirect_program(map.as_raw_fd()), b"sy_xsk_redirect"),
            Filter::Vxlan { local, port } => {
                (vxlan_program(map.as_raw_fd(), local, port), b"sy_xsk_vxlan")
            }
            Filter::PodCidr { net, prefix } => (
                pod_cidr_program(map.as_raw_fd(), net, prefix),
                b"sy_xsk_pods",
            ),
        };
        let program = bpf::load_program(bpf::PROG_TYPE_XDP, bpf::ATTACH_XDP, &instructions, name)?;
        let link = bpf::link_device(program.as_raw_fd(), ifindex, bpf::ATTACH_XDP, 0)?;
        Ok(Self {
            map,
            _program: program,
            link,
        })
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

    #[test]
    fn the_vxlan_filter_compares_wire_bytes_and_jumps_to_pass() {
        let program = vxlan_program(9, Ipv4Addr::new(192, 168, 77, 1), 4789);
        assert_eq!(program.len(), 26);
        // Every conditional jump lands on `r0 = XDP_PASS`.
        for (at, i) in program.iter().enumerate() {
            if [op::JGT_X, op::JNE_K, op::JNE32_K].contains(&i[0]) {
                let off = i16::from_le_bytes([i[2], i[3]]);
                let target = at as i16 + 1 + off;
                assert_eq!(
                    program[target as usize],
                    [0xb7, 0, 0, 0, 2, 0, 0, 0],
                    "from {at}"
                );
            }
        }
        // 192.168.77.1 as its wire bytes loaded little-endian; port 4789 = 0x12b5 on the wire.
        assert_eq!(program[15][4..], [192, 168, 77, 1]);
        assert_eq!(
            i32::from_le_bytes(program[17][4..].try_into().unwrap()),
            0xb512
        );
        assert_eq!(
            i32::from_le_bytes(program[6][4..].try_into().unwrap()),
            0x0008
        );
        assert_eq!(program[18..24], redirect_program(9)[..]);
    }

    #[test]
    fn the_pod_cidr_filter_masks_the_destination_and_jumps_to_pass() {
        let program = pod_cidr_program(9, Ipv4Addr::new(10, 244, 128, 77), 17);
        assert_eq!(program.len(), 18);
        for (at, i) in program.iter().enumerate() {
            if [op::JGT_X, op::JNE_K, op::JNE32_K].contains(&i[0]) {
                let off = i16::from_le_bytes([i[2], i[3]]);
                let target = at as i16 + 1 + off;
                assert_eq!(program[target as usize], [0xb7, 0, 0, 0, 2, 0, 0, 0]);
            }
        }
        // /17: 255.255.128.0 and the network 10.244.128.0, as wire bytes.
        assert_eq!(program[8][4..], [255, 255, 128, 0]);
        assert_eq!(program[9][4..], [10, 244, 128, 0]);
        assert_eq!(program[10..16], redirect_program(9)[..]);
        let all = pod_cidr_program(9, Ipv4Addr::new(10, 0, 0, 1), 0);
        assert_eq!(all[8][4..], [0, 0, 0, 0], "/0 matches everything");
        let one = pod_cidr_program(9, Ipv4Addr::new(10, 0, 0, 1), 32);
        assert_eq!(one[9][4..], [10, 0, 0, 1]);
    }
}
