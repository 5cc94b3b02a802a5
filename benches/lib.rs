//! Fixtures shared by the benchmarks: route sets and frames.

use std::net::Ipv4Addr;
use switchyard_dataplane::tables::lpm::Route;

/// `n` IPv4 routes shaped like an Internet table: mostly /24, then /16-/23, a few
/// shorter and longer, over 64 next hops. Deterministic.
pub fn ipv4_routes(n: usize) -> Vec<Route<u32>> {
    let mut rng = fastrand::Rng::with_seed(0x5717);
    (0..n)
        .map(|_| {
            let len = match rng.u8(0..100) {
                0..=59 => 24,
                60..=84 => rng.u8(20..24),
                85..=96 => rng.u8(16..20),
                97..=98 => rng.u8(8..16),
                _ => rng.u8(25..=32),
            };
            let addr = rng.u32(0x0100_0000..0xe000_0000);
            (addr, len, rng.u32(1..65))
        })
        .collect()
}

/// `n` IPv6 routes: /32 to /64 inside 2000::/3, plus /128 hosts, over 64 next hops.
pub fn ipv6_routes(n: usize) -> Vec<Route<u128>> {
    let mut rng = fastrand::Rng::with_seed(0x5718);
    (0..n)
        .map(|_| {
            let len = match rng.u8(0..100) {
                0..=44 => 48,
                45..=79 => rng.u8(32..48),
                80..=94 => rng.u8(49..=64),
                _ => 128,
            };
            let addr = (0x2000u128 << 112)
                | (u128::from(rng.u64(..)) << 64 >> 3)
                | u128::from(rng.u64(..));
            (addr, len, rng.u32(1..65))
        })
        .collect()
}

/// An Ethernet frame carrying IPv4/UDP from `src` to `dst` with `payload` bytes of UDP payload.
pub fn udp_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    payload: usize,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 28 + payload);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    let total = (20 + 8 + payload) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let check = switchyard_dataplane::wire::checksum::checksum(&ip);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0x30, 0x39, 0x13, 0x89]);
    f.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(14 + 28 + payload, 0xab);
    f
}

/// An Ethernet frame carrying IPv6/UDP from `src` to `dst` with `payload` bytes of payload.
pub fn udp6_frame(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    payload: usize,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + 48 + payload);
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x86, 0xdd]);
    let mut ip = [0u8; 40];
    switchyard_dataplane::wire::ipv6::emit_header(&mut ip, src, dst, 17, 8 + payload, 64);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0x30, 0x39, 0x13, 0x89]);
    f.extend_from_slice(&((8 + payload) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.resize(14 + 48 + payload, 0xab);
    f
}
