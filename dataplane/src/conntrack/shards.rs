//! What every connection-tracking table is built from: a fast hasher and a random seed per
//! process.

use std::hash::{BuildHasherDefault, Hasher};

/// Shards per table: a packet takes one shard's lock, never a global one.
pub const SHARDS: usize = 1024;

/// FxHash: fast, and good enough for tuples an attacker can only partly choose (the shard
/// index and the port search start are mixed with a per-start random seed).
#[derive(Default)]
pub struct Fx(pub u64);

impl Hasher for Fx {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            self.write_u64(u64::from_le_bytes(w));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.write_u64(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 59));
        }
    }

    // Integers are mixed in as one word each: the defaults would go through `write`, one
    // multiplication per byte (an address and a port cost 15 dependent multiplications).
    #[inline]
    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }

    #[inline]
    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }

    #[inline]
    fn write_u32(&mut self, n: u32) {
        self.write_u64(u64::from(n));
    }

    #[inline]
    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    #[inline]
    fn write_u128(&mut self, n: u128) {
        self.write_u64(n as u64);
        self.write_u64((n >> 64) as u64);
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
}

/// Hash maps keyed with FxHash (`Fx`).
pub type FxBuild = BuildHasherDefault<Fx>;

/// The hash of `key` in a table whose hashes are seeded with `seed`.
#[inline]
pub fn hash_of<K: std::hash::Hash>(seed: u64, key: &K) -> u64 {
    let mut h = Fx(seed);
    key.hash(&mut h);
    let x = h.finish();
    x ^ (x >> 29)
}

/// The shard of `key` in a table whose hashes are seeded with `seed`.
#[inline]
pub fn shard_of<K: std::hash::Hash>(seed: u64, key: &K) -> usize {
    (hash_of(seed, key) as usize) % SHARDS
}

/// `SHARDS` empty shards, each behind its own lock.
pub fn new_shards<T: Default>() -> Box<[std::sync::Mutex<T>]> {
    (0..SHARDS).map(|_| std::sync::Mutex::default()).collect()
}

/// Locks a shard. A panic while holding a shard lock leaves the map consistent (single
/// inserts or removes), so a poisoned lock is still usable.
#[inline]
pub fn lock<T>(shard: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    shard.lock().unwrap_or_else(|e| e.into_inner())
}

/// A random number per process (std's per-process hash keys).
pub fn random_seed() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(0x5eed_u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    fn fx(bytes: &[u8]) -> u64 {
        let mut h = Fx::default();
        h.write(bytes);
        h.finish()
    }

    #[test]
    fn every_byte_and_the_length_of_a_tail_change_the_hash() {
        let nine = [1u8, 2, 3, 4, 5, 6, 7, 8, 9];
        assert_ne!(fx(&nine), fx(&[1, 2, 3, 4, 5, 6, 7, 8, 10]), "ninth byte");
        assert_ne!(fx(&nine[..8]), fx(&[1, 2, 3, 4, 5, 6, 7, 9]), "eighth byte");
        assert_ne!(fx(&[1]), fx(&[1, 0]), "a zero byte more");
        let addr = |s: &str| FxBuild::default().hash_one(s.parse::<std::net::IpAddr>().unwrap());
        assert_ne!(addr("10.0.0.1"), addr("10.0.0.2"));
        assert_ne!(addr("0.0.0.1"), addr("::1"), "the family counts");
    }
}
