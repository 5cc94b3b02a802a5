//! CPU-local queue steering for multi-queue TAPs: a two-instruction eBPF program,
//! `return bpf_get_smp_processor_id();`, attached with `TUNSETSTEERINGEBPF`, makes a pod's
//! kernel put each frame on the queue of the CPU that transmits it. With worker *i* pinned
//! to the CPUs *c* where `c % workers == i` (see [`pin_current_thread`]), a frame is
//! forwarded on the CPU that sent it, as the kernel's own datapath does: the wake-up of the
//! worker is local, not an inter-processor interrupt to a halted vCPU.
#![allow(unsafe_code)] // bpf(2) and the steering ioctl

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;

/// `call bpf_get_smp_processor_id; exit` as `struct bpf_insn` bytes.
const PROGRAM: [u8; 16] = [
    0x85, 0, 0, 0, 8, 0, 0, 0, // BPF_JMP | BPF_CALL, helper 8
    0x95, 0, 0, 0, 0, 0, 0, 0, // BPF_JMP | BPF_EXIT
];

fn load_program() -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&BPF_PROG_TYPE_SOCKET_FILTER.to_ne_bytes());
    attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
    attr[8..16].copy_from_slice(&(PROGRAM.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[48..60].copy_from_slice(b"sy_cpu_steer");
    // SAFETY: `attr` is a zero-padded `union bpf_attr` for BPF_PROG_LOAD whose pointers
    // (instructions, licence) stay valid for the duration of the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_PROG_LOAD, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new program file descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// The loaded program, shared by every TAP (loaded once).
fn program() -> io::Result<RawFd> {
    static PROG: OnceLock<Result<OwnedFd, i32>> = OnceLock::new();
    match PROG.get_or_init(|| load_program().map_err(|e| e.raw_os_error().unwrap_or(libc::EINVAL)))
    {
        Ok(fd) => Ok(fd.as_raw_fd()),
        Err(errno) => Err(io::Error::from_raw_os_error(*errno)),
    }
}

/// Attaches CPU steering to the TAP device behind `queue_fd` (any of its queues).
pub fn attach(queue_fd: RawFd) -> io::Result<()> {
    let prog: libc::c_int = program()?;
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
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let mut any = false;
    for cpu in (0..cpus.max(workers)).filter(|c| c % workers == index) {
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
