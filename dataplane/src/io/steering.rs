//! Queue steering for multi-queue TAPs: an eBPF program attached with
//! `TUNSETSTEERINGEBPF` chooses the queue a pod's frame lands on, and so the worker that
//! forwards it.
//!
//! - [`Steering::Cpu`]: `return bpf_get_smp_processor_id();`. With worker *i* pinned to the
//!   CPUs *c* where `c % workers == i` (see [`pin_current_thread`]), a frame is forwarded
//!   on the CPU that sent it, as the kernel's own datapath does: the worker's wake-up is
//!   local, not an inter-processor interrupt to a halted vCPU.
//! - [`Steering::Adaptive`]: a small frame that follows a quiet spell on its TAP (a ping,
//!   a request) goes to the sender's CPU, as with `Cpu`; everything else (bulk
//!   super-frames, a stream of small datagrams) is spread over the queues by the flow's
//!   hash, so that forwarding runs beside the sender instead of taking its CPU.
//! - [`Steering::Hash`]: by the flow's hash alone, workers floating.
//!
//! Every program puts a flow that is not latency-bound on the queue of its hash: the
//! sending socket's, or for a frame the node forwards (no socket) a hash of its addresses
//! and ports. Not the kernel's own spreading, which moves a flow to the queue its last
//! reply was written to, and so reorders it whenever replies come through another worker.
#![allow(unsafe_code)] // bpf(2) and the steering ioctl

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

/// How the frames sent into a TAP (a pod's, the host port) are spread over its queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Steering {
    /// The flow's hash; workers float.
    Hash,
    /// The queue of the sending CPU; workers pinned.
    Cpu,
    /// Small frames after a quiet spell on the sender's CPU, the rest by flow hash;
    /// workers pinned. The default: the lowest latency for requests and pings, and more
    /// small-packet throughput, for a little bulk throughput on busy CPUs
    /// (docs/benchmarks.md).
    #[default]
    Adaptive,
}

impl Steering {
    /// Whether workers are pinned to the CPUs whose queues they serve.
    pub fn pins_workers(self) -> bool {
        self != Steering::Hash
    }
}

/// Helpers called by the programs.
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_KTIME_GET_NS: i32 = 5;
const HELPER_GET_SMP_PROCESSOR_ID: i32 = 8;

/// Offsets in `struct __sk_buff`.
const SKB_LEN: i16 = 0;
const SKB_HASH: i16 = 68;

/// Frames up to this length may go to the sender's CPU (pings, ACKs, small requests).
const SMALL_FRAME: i32 = 256;
/// A small frame this long (ns) after the previous small frame from the same CPU on the
/// same TAP is latency-bound: nothing queued behind it to batch with.
const QUIET_NS: i32 = 20_000;

use super::bpf::{self, insn, op::*};

/// `return bpf_get_smp_processor_id();`
fn cpu_program() -> Vec<[u8; 8]> {
    vec![
        insn(CALL, 0, 0, 0, HELPER_GET_SMP_PROCESSOR_ID),
        insn(EXIT, 0, 0, 0, 0),
    ]
}

/// `return flow_hash(skb);`
fn hash_program() -> Vec<[u8; 8]> {
    let mut program = vec![insn(MOV64_X, 6, 1, 0, 0)]; // r6 = skb
    append_flow_hash(&mut program);
    program
}

/// The adaptive program over `map`, a one-entry per-CPU array holding the time of the
/// last small frame:
///
/// ```text
/// if (skb->len > SMALL_FRAME) return flow_hash(skb);
/// now = ktime_get_ns(); last = map[0] (this CPU's); map[0] = now;
/// if (now - last < QUIET_NS) return flow_hash(skb);
/// return smp_processor_id();
/// ```
fn adaptive_program(map: RawFd) -> Vec<[u8; 8]> {
    let [map_lo, map_hi] = bpf::load_map(1, map);
    let mut program = vec![
        insn(MOV64_X, 6, 1, 0, 0),                        // r6 = skb
        insn(LDX_W, 0, 6, SKB_LEN, 0),                    // r0 = skb->len
        insn(JGT_K, 0, 0, TO_HASH, SMALL_FRAME),          // large: by flow
        insn(CALL, 0, 0, 0, HELPER_KTIME_GET_NS),         // r0 = now
        insn(MOV64_X, 7, 0, 0, 0),                        // r7 = now
        insn(ST_W, 10, 0, -4, 0),                         // key = 0 on the stack
        insn(MOV64_X, 2, 10, 0, 0),                       // r2 = fp
        insn(ADD64_K, 2, 0, 0, -4),                       // r2 = &key
        map_lo,                                           // r1 = map
        map_hi,                                           // (its upper half)
        insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),      // r0 = &map[0]
        insn(JEQ_K, 0, 0, TO_HASH, 0),                    // no entry: by flow
        insn(LDX_DW, 1, 0, 0, 0),                         // r1 = last
        insn(STX_DW, 0, 7, 0, 0),                         // map[0] = now
        insn(SUB64_X, 7, 1, 0, 0),                        // r7 = now - last
        insn(JLT_K, 7, 0, TO_HASH, QUIET_NS),             // busy: by flow
        insn(CALL, 0, 0, 0, HELPER_GET_SMP_PROCESSOR_ID), // quiet: this CPU
        insn(EXIT, 0, 0, 0, 0),
    ];
    append_flow_hash(&mut program);
    program
}

/// Jump offsets standing for the labels of [`adaptive_program`] and [`append_flow_hash`].
const TO_HASH: i16 = bpf::label(0);
const TO_EXIT: i16 = bpf::label(1);
const TO_IPV6: i16 = bpf::label(2);
const TO_PORTS4: i16 = bpf::label(3);
const TO_PORTS6: i16 = bpf::label(4);
const TO_MIX: i16 = bpf::label(5);

/// Appends the program's tail (label `TO_HASH`, with `r6 = skb`) and resolves every jump
/// to a label in `program`: the queue of the frame's flow. A frame a local socket sent
/// carries the socket's hash; one the node forwards (node ports, hostPorts, masqueraded
/// replies into the host port) carries none, and hashing nothing would put every such
/// flow on one queue. Its addresses, protocol and ports are hashed instead, so that each
/// flow stays on one queue: the kernel's default, which follows the queue a flow's last
/// reply was written to, moved a single node-port stream between workers and reordered
/// it.
///
/// ```text
/// if (skb->hash) return skb->hash;
/// if (eth.type == IPv4) h = src ^ dst ^ proto, ^ ports unless a fragment;
/// else if (eth.type == IPv6) h = the eight words of src and dst ^ next header, ^ ports;
/// else return eth.type;
/// return (u32)(h * 0x9e3779b1) >> 16;
/// ```
fn append_flow_hash(program: &mut Vec<[u8; 8]>) {
    const GOLDEN: i32 = 0x9e37_79b1_u32 as i32;
    let hash = program.len();
    program.extend([
        insn(LDX_W, 0, 6, SKB_HASH, 0),     // r0 = skb->hash
        insn(JNE_K, 0, 0, TO_EXIT, 0),      // a socket's hash
        insn(LD_ABS_H, 0, 0, 0, 12),        // r0 = EtherType
        insn(JEQ_K, 0, 0, TO_IPV6, 0x86dd), //
        insn(JNE_K, 0, 0, TO_EXIT, 0x0800), // neither: one queue per EtherType
        insn(LD_ABS_W, 0, 0, 0, 26),        // IPv4 source
        insn(MOV64_X, 7, 0, 0, 0),          //
        insn(LD_ABS_W, 0, 0, 0, 30),        // destination
        insn(XOR64_X, 7, 0, 0, 0),          //
        insn(LD_ABS_B, 0, 0, 0, 23),        // protocol
        insn(XOR64_X, 7, 0, 0, 0),          //
        insn(JEQ_K, 0, 0, TO_PORTS4, 6),    // TCP
        insn(JEQ_K, 0, 0, TO_PORTS4, 17),   // UDP
        insn(JNE_K, 0, 0, TO_MIX, 132),     // nor SCTP: the addresses alone
    ]);
    let ports4 = program.len();
    program.extend([
        insn(LD_ABS_H, 0, 0, 0, 20),    // flags, fragment offset
        insn(AND64_K, 0, 0, 0, 0x3fff), // more fragments, offset
        insn(JNE_K, 0, 0, TO_MIX, 0),   // a fragment: its datagram's fragments together
        insn(LD_ABS_B, 0, 0, 0, 14),    // version, header length
        insn(AND64_K, 0, 0, 0, 0x0f),   //
        insn(LSH64_K, 0, 0, 0, 2),      // header bytes
        insn(MOV64_X, 8, 0, 0, 0),      //
        insn(LD_IND_W, 0, 8, 0, 14),    // both ports
        insn(XOR64_X, 7, 0, 0, 0),      //
        insn(JA, 0, 0, TO_MIX, 0),      //
    ]);
    let ipv6 = program.len();
    program.extend([
        insn(LD_ABS_W, 0, 0, 0, 22), // the source's first word
        insn(MOV64_X, 7, 0, 0, 0),   //
    ]);
    for offset in (26..54).step_by(4) {
        // The rest of the source, then the destination.
        program.extend([insn(LD_ABS_W, 0, 0, 0, offset), insn(XOR64_X, 7, 0, 0, 0)]);
    }
    program.extend([
        insn(LD_ABS_B, 0, 0, 0, 20),      // next header
        insn(XOR64_X, 7, 0, 0, 0),        //
        insn(JEQ_K, 0, 0, TO_PORTS6, 6),  // TCP
        insn(JEQ_K, 0, 0, TO_PORTS6, 17), // UDP
        insn(JNE_K, 0, 0, TO_MIX, 132),   // nor SCTP (nor an extension header)
    ]);
    let ports6 = program.len();
    program.extend([
        insn(LD_ABS_W, 0, 0, 0, 54), // both ports
        insn(XOR64_X, 7, 0, 0, 0),   //
    ]);
    let mix = program.len();
    program.extend([
        insn(MOV32_X, 0, 7, 0, 0),      // r0 = (u32)h
        insn(MUL32_K, 0, 0, 0, GOLDEN), //
        insn(RSH32_K, 0, 0, 0, 16),     // its upper half
    ]);
    let exit = program.len();
    program.push(insn(EXIT, 0, 0, 0, 0));
    // In the order of the labels.
    bpf::resolve_labels(program, &[hash, exit, ipv6, ports4, ports6, mix]);
}

/// A one-entry per-CPU array of one `u64`.
fn create_time_map() -> io::Result<OwnedFd> {
    bpf::create_map(bpf::MAP_TYPE_PERCPU_ARRAY, 4, 8, 1, b"sy_steer_last")
}

fn load_program(program: &[[u8; 8]], name: &[u8]) -> io::Result<OwnedFd> {
    bpf::load_program(bpf::PROG_TYPE_SOCKET_FILTER, 0, program, name)
}

/// A program without a map, loaded once and shared by every TAP.
type Shared = OnceLock<Result<OwnedFd, i32>>;
static CPU: Shared = OnceLock::new();
static HASH: Shared = OnceLock::new();

fn shared_program_fd(
    slot: &'static Shared,
    program: fn() -> Vec<[u8; 8]>,
    name: &[u8],
) -> io::Result<RawFd> {
    match slot.get_or_init(|| {
        load_program(&program(), name).map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))
    }) {
        Ok(fd) => Ok(fd.as_raw_fd()),
        Err(errno) => Err(io::Error::from_raw_os_error(*errno)),
    }
}

/// Attaches `steering` to the TAP device behind `queue_fd` (any of its queues). The
/// adaptive program is loaded per TAP, with its own map, so that one pod's traffic does
/// not make another's look busy; the TAP holds the program and the program its map.
/// Where the kernel refuses the program (no BPF, an old kernel), the TAP keeps the
/// kernel's spreading by hash, and that is said once.
pub fn attach(queue_fd: RawFd, steering: Steering) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if let Err(err) = try_attach(queue_fd, steering) {
        if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                "{steering:?} queue steering is not available here ({err}); pods' frames are \
                 spread over the workers by the kernel's flow hash"
            );
        }
    }
}

fn try_attach(queue_fd: RawFd, steering: Steering) -> io::Result<()> {
    // An adaptive program of its own: the TAP keeps it alive once this fd is closed.
    let own;
    let prog: libc::c_int = match steering {
        Steering::Hash => shared_program_fd(&HASH, hash_program, b"sy_hash_steer")?,
        Steering::Cpu => shared_program_fd(&CPU, cpu_program, b"sy_cpu_steer")?,
        Steering::Adaptive => {
            let map = create_time_map()?;
            own = load_program(&adaptive_program(map.as_raw_fd()), b"sy_adapt_steer")?;
            own.as_raw_fd()
        }
    };
    // SAFETY: TUNSETSTEERINGEBPF reads one int (the program fd) from the pointer.
    if unsafe { libc::ioctl(queue_fd, libc::TUNSETSTEERINGEBPF, &prog) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the calling thread's nice value (its share of a busy CPU against the node's
/// other processes).
pub fn set_current_thread_nice(nice: i32) -> io::Result<()> {
    // SAFETY: gettid and setpriority take plain integers and change only this thread's
    // scheduling weight.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread (worker `index` of `workers`) to the CPUs whose frames its
/// queue receives: every CPU `c` with `c % workers == index`.
pub fn pin_current_thread(index: usize, workers: usize) -> io::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    set_current_thread_cpus(
        (0..cpus.max(workers))
            .filter(|c| c % workers == index)
            .collect(),
    )
}

/// Restricts the calling thread to `cpus` (nothing when empty).
fn set_current_thread_cpus(cpus: Vec<usize>) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let mut any = false;
    for cpu in cpus {
        // SAFETY: CPU_SET writes one bit of `set`; `cpu` is below CPU_SETSIZE here.
        unsafe { libc::CPU_SET(cpu, &mut set) };
        any = true;
    }
    if !any {
        return Ok(());
    }
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the given size.
    if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instruction_is_encoded_as_the_kernel_reads_it() {
        // r1 = *(u32 *)(r6 + 68): opcode, dst 1 / src 6, offset 68.
        assert_eq!(insn(LDX_W, 1, 6, 68, 0), [0x61, 0x61, 68, 0, 0, 0, 0, 0]);
        // r2 += -4
        assert_eq!(
            insn(ADD64_K, 2, 0, 0, -4),
            [0x07, 0x02, 0, 0, 0xfc, 0xff, 0xff, 0xff]
        );
    }

    #[test]
    fn every_jump_lands_inside_the_program_and_the_quiet_checks_on_the_hash() {
        let program = adaptive_program(7);
        let hash = program
            .iter()
            .position(|i| *i == insn(LDX_W, 0, 6, SKB_HASH, 0))
            .expect("the hash tail");
        assert_eq!(hash, 18, "right after the quiet branch's exit");
        let mut to_hash = 0;
        for (at, i) in program.iter().enumerate() {
            if matches!(i[0], JGT_K | JEQ_K | JNE_K | JLT_K | JA) {
                let target = at as i64 + 1 + i64::from(i16::from_le_bytes([i[2], i[3]]));
                assert!(target > at as i64, "jump at {at} goes back");
                assert!(
                    target < program.len() as i64,
                    "jump at {at} leaves the program"
                );
                to_hash += usize::from(at < hash && target == hash as i64);
            }
        }
        assert_eq!(to_hash, 3, "large, no entry and busy go by flow");
        assert_eq!(program[8][4..8], 7i32.to_le_bytes());
        assert_eq!(program.last(), Some(&insn(EXIT, 0, 0, 0, 0)));
    }
}
