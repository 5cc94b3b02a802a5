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
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

/// Hash maps keyed with [`Fx`].
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
