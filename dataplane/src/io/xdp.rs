//! XDP on a device, for AF_XDP ports: a four-instruction program that hands every frame
//! the device receives on queue `q` to the AF_XDP socket registered for `q` in its map
//! (`bpf_redirect_map` on an `XSKMAP`), and lets the kernel have the frame (`XDP_PASS`)
//! when no socket is registered for that queue. Attached through a BPF link, so the
//! program is on the device exactly as long as the [`XdpRedirect`] lives: dropping it, or
//! the process ending in any way, detaches it.

use super::bpf::{self, insn, op};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

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

/// The redirect program attached to one device, with its socket map.
pub struct XdpRedirect {
    map: OwnedFd,
    _program: OwnedFd,
    _link: OwnedFd,
}

impl XdpRedirect {
    /// Loads the program with room for `queues` sockets and attaches it to the device
    /// `ifindex` of the caller's namespace (native XDP where the driver has it, as veth
    /// does; the kernel's generic XDP otherwise).
    pub fn attach(ifindex: u32, queues: u32) -> io::Result<Self> {
        let map = bpf::create_map(bpf::MAP_TYPE_XSKMAP, 4, 4, queues.max(1), b"sy_xsks")?;
        let program = bpf::load_program(
            bpf::PROG_TYPE_XDP,
            bpf::ATTACH_XDP,
            &redirect_program(map.as_raw_fd()),
            b"sy_xsk_redirect",
        )?;
        let link = bpf::link_device(program.as_raw_fd(), ifindex, bpf::ATTACH_XDP, 0)?;
        Ok(Self {
            map,
            _program: program,
            _link: link,
        })
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
}
