//! The Internet checksum (RFC 1071) and its incremental update (RFC 1624).

use std::net::{Ipv4Addr, Ipv6Addr};

/// Adds `data` to a running ones'-complement sum (not yet folded).
pub fn accumulate(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        sum += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
    }
    let rest = chunks.remainder();
    let mut i = 0;
    while i + 1 < rest.len() {
        sum += u64::from(u16::from_be_bytes([rest[i], rest[i + 1]]));
        i += 2;
    }
    if i < rest.len() {
        sum += u64::from(rest[i]) << 8;
    }
    sum
}

/// Folds a running sum into 16 bits (without complementing).
pub fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The checksum field value for `data` plus an initial sum (e.g. a pseudo-header).
pub fn finish(sum: u64) -> u16 {
    !fold(sum)
}

/// Checksum of `data` alone.
pub fn checksum(data: &[u8]) -> u16 {
    finish(accumulate(0, data))
}

/// Running sum of the IPv4 pseudo-header.
pub fn pseudo_header_v4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, length: u32) -> u64 {
    let sum = accumulate(0, &src.octets());
    let sum = accumulate(sum, &dst.octets());
    sum + u64::from(protocol) + u64::from(length)
}

/// Running sum of the IPv6 pseudo-header.
pub fn pseudo_header_v6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, length: u32) -> u64 {
    let sum = accumulate(0, &src.octets());
    let sum = accumulate(sum, &dst.octets());
    sum + u64::from(next_header) + u64::from(length)
}

/// Running sum of the pseudo-header for the IPv4 or IPv6 header at the start of `ip`
/// (version from the first byte; addresses read in place). `ip` holds at least the fixed
/// header.
pub fn pseudo_header_of(ip: &[u8], protocol: u8, length: u32) -> u64 {
    let addresses = if ip[0] >> 4 == 6 {
        &ip[8..40]
    } else {
        &ip[12..20]
    };
    accumulate(0, addresses) + u64::from(protocol) + u64::from(length)
}

/// Updates checksum field `check` after a 16-bit word changed from `old` to `new`
/// (RFC 1624, eqn. 3: `HC' = ~(~HC + ~m + m')`).
#[inline]
pub fn update_word(check: u16, old: u16, new: u16) -> u16 {
    let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Updates checksum field `check` after a 4-byte address changed from `old` to `new`.
#[inline]
pub fn update_address(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let a = update_word(
        check,
        u16::from_be_bytes([old[0], old[1]]),
        u16::from_be_bytes([new[0], new[1]]),
    );
    update_word(
        a,
        u16::from_be_bytes([old[2], old[3]]),
        u16::from_be_bytes([new[2], new[3]]),
    )
}

/// Updates a transport checksum field after a word of what it covers changed. A
/// *partial* checksum (`F_NEEDS_CSUM`: the field holds the folded pseudo-header sum, not
/// complemented, and the receiver finishes it) is updated the un-complemented way.
#[inline]
pub fn update_l4_word(check: u16, old: u16, new: u16, partial: bool) -> u16 {
    if partial {
        !update_word(!check, old, new)
    } else {
        update_word(check, old, new)
    }
}

/// [`update_l4_word`] for an address in the pseudo-header (4 or 16 bytes, both the same
/// length).
#[inline]
pub fn update_l4_address(check: u16, old: &[u8], new: &[u8], partial: bool) -> u16 {
    old.chunks_exact(2)
        .zip(new.chunks_exact(2))
        .fold(check, |c, (o, n)| {
            update_l4_word(
                c,
                u16::from_be_bytes([o[0], o[1]]),
                u16::from_be_bytes([n[0], n[1]]),
                partial,
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc1071_example() {
        // The worked example of RFC 1071 section 3: sum is 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(fold(accumulate(0, &data)), 0xddf2);
        assert_eq!(checksum(&data), !0xddf2);
    }

    #[test]
    fn pseudo_header_of_matches_typed_versions() {
        let mut v4 = [0u8; 20];
        crate::wire::ipv4::emit_header(
            &mut v4,
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            17,
            8,
            64,
        );
        assert_eq!(
            fold(pseudo_header_of(&v4, 17, 100)),
            fold(pseudo_header_v4(
                Ipv4Addr::new(10, 0, 0, 1),
                Ipv4Addr::new(10, 0, 0, 2),
                17,
                100
            ))
        );
        let (s, d): (Ipv6Addr, Ipv6Addr) = ("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap());
        let mut v6 = [0u8; 40];
        crate::wire::ipv6::emit_header(&mut v6, s, d, 6, 8, 64);
        assert_eq!(
            fold(pseudo_header_of(&v6, 6, 100)),
            fold(pseudo_header_v6(s, d, 6, 100))
        );
    }

    #[test]
    fn odd_length_pads_with_zero() {
        assert_eq!(fold(accumulate(0, &[0xab])), 0xab00);
        assert_eq!(fold(accumulate(0, &[0x01, 0x02, 0x03])), 0x0102 + 0x0300);
    }

    #[test]
    fn incremental_update_matches_full_recompute() {
        let mut rng = 0x1234_5678u32;
        for _ in 0..1000 {
            let mut words = [0u16; 10];
            for w in words.iter_mut() {
                rng = rng.wrapping_mul(1_103_515_245).wrapping_add(12345);
                *w = (rng >> 8) as u16;
            }
            let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_be_bytes()).collect();
            let before = checksum(&bytes);
            let idx = (rng as usize) % words.len();
            let new = (rng >> 3) as u16;
            let mut changed = words;
            changed[idx] = new;
            let bytes: Vec<u8> = changed.iter().flat_map(|w| w.to_be_bytes()).collect();
            let updated = update_word(before, words[idx], new);
            // 0x0000 and 0xffff are the same value in ones' complement.
            let full = checksum(&bytes);
            assert!(
                updated == full || (updated ^ full) == 0xffff,
                "{updated:#x} {full:#x}"
            );
        }
    }
}
