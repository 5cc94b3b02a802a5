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
//! - [`Steering::Hash`]: no program; the kernel spreads flows over the queues.
#![allow(unsafe_code)] // bpf(2) and the steering ioctl

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

/// How a pod's frames are spread over its TAP's queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Steering {
    /// The kernel's flow hash; workers float.
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

/// The adaptive program over `map`, a one-entry per-CPU array holding the time of the
/// last small frame:
///
/// ```text
/// if (skb->len > SMALL_FRAME) return skb->hash;
/// now = ktime_get_ns(); last = map[0] (this CPU's); map[0] = now;
/// if (now - last < QUIET_NS) return skb->hash;
/// return smp_processor_id();
/// ```
fn adaptive_program(map: RawFd) -> Vec<[u8; 8]> {
    let hash = 18; // index of the `return skb->hash` tail
    let jump = |from: usize| (hash - from - 1) as i16;
    let [map_lo, map_hi] = bpf::load_map(1, map);
    vec![
        insn(MOV64_X, 6, 1, 0, 0),                        // 0: r6 = skb
        insn(LDX_W, 0, 6, SKB_LEN, 0),                    // 1: r0 = skb->len
        insn(JGT_K, 0, 0, jump(2), SMALL_FRAME),          // 2: large: by hash
        insn(CALL, 0, 0, 0, HELPER_KTIME_GET_NS),         // 3: r0 = now
        insn(MOV64_X, 7, 0, 0, 0),                        // 4: r7 = now
        insn(ST_W, 10, 0, -4, 0),                         // 5: key = 0 on the stack
        insn(MOV64_X, 2, 10, 0, 0),                       // 6: r2 = fp
        insn(ADD64_K, 2, 0, 0, -4),                       // 7: r2 = &key
        map_lo,                                           // 8: r1 = map
        map_hi,                                           // 9: (its upper half)
        insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),      // 10: r0 = &map[0]
        insn(JEQ_K, 0, 0, jump(11), 0),                   // 11: no entry: by hash
        insn(LDX_DW, 1, 0, 0, 0),                         // 12: r1 = last
        insn(STX_DW, 0, 7, 0, 0),                         // 13: map[0] = now
        insn(SUB64_X, 7, 1, 0, 0),                        // 14: r7 = now - last
        insn(JLT_K, 7, 0, jump(15), QUIET_NS),            // 15: busy: by hash
        insn(CALL, 0, 0, 0, HELPER_GET_SMP_PROCESSOR_ID), // 16: quiet: this CPU
        insn(EXIT, 0, 0, 0, 0),                           // 17
        insn(LDX_W, 0, 6, SKB_HASH, 0),                   // 18: r0 = skb->hash
        insn(EXIT, 0, 0, 0, 0),                           // 19
    ]
}

/// A one-entry per-CPU array of one `u64`.
fn create_time_map() -> io::Result<OwnedFd> {
    bpf::create_map(bpf::MAP_TYPE_PERCPU_ARRAY, 4, 8, 1, b"sy_steer_last")
}

fn load_program(program: &[[u8; 8]], name: &[u8]) -> io::Result<OwnedFd> {
    bpf::load_program(bpf::PROG_TYPE_SOCKET_FILTER, 0, program, name)
}

/// The CPU program, shared by every TAP (loaded once).
fn cpu_program_fd() -> io::Result<RawFd> {
    static PROG: OnceLock<Result<OwnedFd, i32>> = OnceLock::new();
    match PROG.get_or_init(|| {
        load_program(&cpu_program(), b"sy_cpu_steer")
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL))
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
        Steering::Hash => return Ok(()),
        Steering::Cpu => cpu_program_fd()?,
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
    fn the_adaptive_programs_jumps_land_on_the_hash_tail() {
        let program = adaptive_program(7);
        let tail = program.len() - 2;
        assert_eq!(program[tail], insn(LDX_W, 0, 6, SKB_HASH, 0));
        for (at, i) in program.iter().enumerate() {
            if [JGT_K, JEQ_K, JLT_K].contains(&i[0]) {
                let off = i16::from_le_bytes([i[2], i[3]]);
                assert_eq!(at as i16 + 1 + off, tail as i16, "jump at {at}");
            }
        }
        assert_eq!(program[8][4..8], 7i32.to_le_bytes());
    }
}
