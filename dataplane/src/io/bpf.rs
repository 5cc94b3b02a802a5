//! The little of eBPF the dataplane needs, through the `bpf(2)` system call itself: an
//! instruction encoder, map creation and update, program loading and links. Programs are a
//! few instructions long and written here by hand (the TAP steering programs, the AF_XDP
//! redirect program), so no loader, compiler or object file is involved.
// Unsafe code here: the bpf(2) system call with a `union bpf_attr` built in a byte array.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_DETACH: libc::c_long = 34;

/// Program types.
pub const PROG_TYPE_SOCKET_FILTER: u32 = 1;
/// XDP programs.
pub const PROG_TYPE_XDP: u32 = 6;
/// Map types: an array.
pub const MAP_TYPE_ARRAY: u32 = 2;
/// Map types: a per-CPU array.
pub const MAP_TYPE_PERCPU_ARRAY: u32 = 6;
/// Map types: AF_XDP sockets by queue.
pub const MAP_TYPE_XSKMAP: u32 = 17;
/// Attach types: XDP on a device.
pub const ATTACH_XDP: u32 = 37;

/// Opcodes used by the programs.
pub mod op {
    /// BPF_JMP | BPF_CALL
    pub const CALL: u8 = 0x85;
    /// BPF_JMP | BPF_EXIT
    pub const EXIT: u8 = 0x95;
    /// BPF_ALU64 | BPF_MOV | BPF_X
    pub const MOV64_X: u8 = 0xbf;
    /// BPF_ALU64 | BPF_MOV | BPF_K
    pub const MOV64_K: u8 = 0xb7;
    /// BPF_ALU64 | BPF_ADD | BPF_K
    pub const ADD64_K: u8 = 0x07;
    /// BPF_ALU64 | BPF_SUB | BPF_X
    pub const SUB64_X: u8 = 0x1f;
    /// BPF_LDX | BPF_MEM | BPF_W
    pub const LDX_W: u8 = 0x61;
    /// BPF_LDX | BPF_MEM | BPF_DW
    pub const LDX_DW: u8 = 0x79;
    /// BPF_LDX | BPF_MEM | BPF_H
    pub const LDX_H: u8 = 0x69;
    /// BPF_LDX | BPF_MEM | BPF_B
    pub const LDX_B: u8 = 0x71;
    /// BPF_ALU64 | BPF_AND | BPF_K
    pub const AND64_K: u8 = 0x57;
    /// BPF_ALU64 | BPF_AND | BPF_X
    pub const AND64_X: u8 = 0x5f;
    /// BPF_JMP | BPF_JA
    pub const JA: u8 = 0x05;
    /// BPF_STX | BPF_MEM | BPF_W
    pub const STX_W: u8 = 0x63;
    /// BPF_JMP | BPF_JGT | BPF_X
    pub const JGT_X: u8 = 0x2d;
    /// BPF_JMP | BPF_JNE | BPF_K
    pub const JNE_K: u8 = 0x55;
    /// BPF_JMP32 | BPF_JNE | BPF_K (compares the low 32 bits)
    pub const JNE32_K: u8 = 0x56;
    /// BPF_ST | BPF_MEM | BPF_W
    pub const ST_W: u8 = 0x62;
    /// BPF_STX | BPF_MEM | BPF_DW
    pub const STX_DW: u8 = 0x7b;
    /// BPF_JMP | BPF_JGT | BPF_K
    pub const JGT_K: u8 = 0x25;
    /// BPF_JMP | BPF_JEQ | BPF_K
    pub const JEQ_K: u8 = 0x15;
    /// BPF_JMP | BPF_JLT | BPF_K
    pub const JLT_K: u8 = 0xa5;
    /// BPF_ALU64 | BPF_XOR | BPF_X
    pub const XOR64_X: u8 = 0xaf;
    /// BPF_ALU64 | BPF_LSH | BPF_K
    pub const LSH64_K: u8 = 0x67;
    /// BPF_ALU | BPF_MOV | BPF_X (the low 32 bits, the upper cleared)
    pub const MOV32_X: u8 = 0xbc;
    /// BPF_ALU | BPF_MUL | BPF_K
    pub const MUL32_K: u8 = 0x24;
    /// BPF_ALU | BPF_RSH | BPF_K
    pub const RSH32_K: u8 = 0x74;
    /// BPF_LD | BPF_ABS | BPF_W: `r0 = ntohl(*(u32 *)(skb->data + imm))` (needs `r6 = skb`;
    /// a load past the end ends the program with 0)
    pub const LD_ABS_W: u8 = 0x20;
    /// BPF_LD | BPF_ABS | BPF_H
    pub const LD_ABS_H: u8 = 0x28;
    /// BPF_LD | BPF_ABS | BPF_B
    pub const LD_ABS_B: u8 = 0x30;
    /// BPF_LD | BPF_IND | BPF_W: as `LD_ABS_W` at `src + imm`
    pub const LD_IND_W: u8 = 0x40;
    /// BPF_LD | BPF_DW | BPF_IMM (two instructions)
    pub const LD_IMM64: u8 = 0x18;
    /// The source register of `LD_IMM64` that makes its immediate a map's descriptor.
    pub const PSEUDO_MAP_FD: u8 = 1;
}

/// One `struct bpf_insn`: opcode, registers (source in the high nibble), offset, immediate.
pub fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let o = off.to_le_bytes();
    let i = imm.to_le_bytes();
    [code, (src << 4) | dst, o[0], o[1], i[0], i[1], i[2], i[3]]
}

/// `dst = map` (the two instructions of a map reference).
pub fn load_map(dst: u8, map: RawFd) -> [[u8; 8]; 2] {
    [
        insn(op::LD_IMM64, dst, op::PSEUDO_MAP_FD, 0, map),
        insn(0, 0, 0, 0, 0),
    ]
}

/// The jump offset that stands for label `n` until [`resolve_labels`] replaces it.
pub const fn label(n: u8) -> i16 {
    i16::MIN + n as i16
}

/// Turns every jump to a [`label`] in `program` into a jump to its instruction:
/// `targets[n]` is label `n`'s index.
pub fn resolve_labels(program: &mut [[u8; 8]], targets: &[usize]) {
    for (at, i) in program.iter_mut().enumerate() {
        // BPF_JMP and BPF_JMP32 classes; other instructions' offsets are addresses.
        let is_jump = matches!(i[0] & 0x07, 0x05 | 0x06);
        // label(n) - label(0) == n; any other offset lands far outside `targets`.
        let n = i16::from_le_bytes([i[2], i[3]]).wrapping_sub(label(0)) as usize;
        if let (true, Some(&target)) = (is_jump, targets.get(n)) {
            i[2..4].copy_from_slice(&(target as i16 - (at as i16 + 1)).to_le_bytes());
        }
    }
}

/// Calls bpf(2) with `attr` (a zero-padded `union bpf_attr`); returns what it returns.
fn call(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a zero-padded `union bpf_attr` for `cmd` whose pointers (set by the
    // callers) stay valid for the duration of the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

/// Calls bpf(2) for a command that returns a new descriptor.
fn call_fd(cmd: libc::c_long, attr: &mut [u8; 128]) -> io::Result<OwnedFd> {
    let fd = call(cmd, attr)?;
    // SAFETY: the kernel returned a new file descriptor that nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// Writes an object's name (at most 15 bytes and a NUL) into its field of `bpf_attr`.
fn set_name(field: &mut [u8], name: &[u8]) {
    let len = name.len().min(field.len() - 1);
    field[..len].copy_from_slice(&name[..len]);
}

fn put_u32(attr: &mut [u8; 128], at: usize, value: u32) {
    attr[at..at + 4].copy_from_slice(&value.to_ne_bytes());
}

fn put_u64(attr: &mut [u8; 128], at: usize, value: u64) {
    attr[at..at + 8].copy_from_slice(&value.to_ne_bytes());
}

/// Creates a map of `kind` with keys and values of the given sizes.
pub fn create_map(
    kind: u32,
    key_size: u32,
    value_size: u32,
    entries: u32,
    name: &[u8],
) -> io::Result<OwnedFd> {
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, kind);
    put_u32(&mut attr, 4, key_size);
    put_u32(&mut attr, 8, value_size);
    put_u32(&mut attr, 12, entries);
    set_name(&mut attr[28..44], name);
    call_fd(BPF_MAP_CREATE, &mut attr)
}

/// Sets `map[key] = value`.
pub fn update_elem(map: RawFd, key: &[u8], value: &[u8]) -> io::Result<()> {
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, map as u32);
    put_u64(&mut attr, 8, key.as_ptr() as u64);
    put_u64(&mut attr, 16, value.as_ptr() as u64);
    call(BPF_MAP_UPDATE_ELEM, &mut attr).map(|_| ())
}

/// Loads `program` as a program of `kind` (expected to attach as `attach_type`, 0 when
/// the type has no choice), named `name`.
pub fn load_program(
    kind: u32,
    attach_type: u32,
    program: &[[u8; 8]],
    name: &[u8],
) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, kind);
    put_u32(&mut attr, 4, program.len() as u32);
    put_u64(&mut attr, 8, program.as_ptr() as u64);
    put_u64(&mut attr, 16, license.as_ptr() as u64);
    set_name(&mut attr[48..64], name);
    put_u32(&mut attr, 68, attach_type);
    call_fd(BPF_PROG_LOAD, &mut attr)
}

/// Attaches `program` to the device `ifindex` of the caller's namespace as `attach_type`
/// through a link: the program stays attached while the returned descriptor is open, and
/// goes when it closes (with the process), leaving nothing behind.
pub fn link_device(
    program: RawFd,
    ifindex: u32,
    attach_type: u32,
    flags: u32,
) -> io::Result<OwnedFd> {
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, program as u32);
    put_u32(&mut attr, 4, ifindex);
    put_u32(&mut attr, 8, attach_type);
    put_u32(&mut attr, 12, flags);
    call_fd(BPF_LINK_CREATE, &mut attr)
}

/// Detaches the link `link` from its device now (Linux 5.9 and later); its descriptor
/// stays open, attached to nothing.
pub fn detach_link(link: RawFd) -> io::Result<()> {
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, link as u32);
    call(BPF_LINK_DETACH, &mut attr).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_encode_as_the_kernel_reads_them() {
        // r2 = *(u32 *)(r1 + 16): opcode, dst in the low nibble, src in the high one.
        assert_eq!(
            insn(op::LDX_W, 2, 1, 16, 0),
            [0x61, 0x12, 16, 0, 0, 0, 0, 0]
        );
        // r3 = -2: immediate little-endian, sign included.
        assert_eq!(
            insn(op::MOV64_K, 3, 0, 0, -2),
            [0xb7, 0x03, 0, 0, 0xfe, 0xff, 0xff, 0xff]
        );
        let [first, second] = load_map(1, 7);
        assert_eq!(first, [0x18, 0x11, 0, 0, 7, 0, 0, 0]);
        assert_eq!(second, [0; 8]);
    }

    #[test]
    fn jumps_to_labels_become_offsets_and_nothing_else_changes() {
        let mut program = vec![
            insn(op::JEQ_K, 0, 0, label(1), 6),   // 0: forward to label 1
            insn(op::LDX_W, 0, 6, label(0), 0),   // 1: not a jump: its offset stays
            insn(op::JNE32_K, 0, 0, label(0), 0), // 2: a JMP32 to label 0
            insn(op::JA, 0, 0, -3, 0),            // 3: a plain offset stays
            insn(op::EXIT, 0, 0, 0, 0),           // 4: label 0
            insn(op::JA, 0, 0, label(2), 0),      // 5: a label without a target stays
            insn(op::EXIT, 0, 0, 0, 0),           // 6: label 1
        ];
        let before = program.clone();
        resolve_labels(&mut program, &[4, 6]);
        let offset = |i: &[u8; 8]| i16::from_le_bytes([i[2], i[3]]);
        assert_eq!(offset(&program[0]), 5, "0 + 1 + 5 = 6");
        assert_eq!(offset(&program[2]), 1, "2 + 1 + 1 = 4");
        for unchanged in [1, 3, 4, 5, 6] {
            assert_eq!(
                program[unchanged], before[unchanged],
                "instruction {unchanged}"
            );
        }
    }
}
