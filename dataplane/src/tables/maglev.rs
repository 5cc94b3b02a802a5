//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of `M` slots
//! (`M` prime) filled from each backend's own permutation of the slots, so that every
//! backend owns about `M / N` slots and adding or removing one backend moves about `1/N`
//! of them. The hashes use fixed keys, so every node builds the same table from the same
//! backends and a flow picks the same backend wherever its first packet is seen.

/// Primes a table size is chosen from (each about twice the one before).
const PRIMES: [u32; 10] = [
    251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521, 131_071,
];
/// The default largest table: Cilium's default size.
pub const DEFAULT_MAX_SIZE: u32 = 16381;

/// The table size for `backends` backends: the smallest prime of the list at or above
/// `100 × backends` (Maglev's disruption stays under about 1 % past that), at most `max`
/// (itself one of the primes, or the largest prime of the list below it).
pub fn table_size(backends: usize, max: u32) -> u32 {
    let cap = PRIMES
        .iter()
        .copied()
        .filter(|p| *p <= max.max(PRIMES[0]))
        .max()
        .unwrap_or(PRIMES[0]);
    let want = (backends as u64).saturating_mul(100);
    PRIMES
        .iter()
        .copied()
        .find(|p| u64::from(*p) >= want)
        .unwrap_or(cap)
        .min(cap)
}

/// True when `n` is prime (for sizes given by hand).
pub fn is_prime(n: u32) -> bool {
    n >= 2
        && (2..)
            .take_while(|d| d * d <= n)
            .all(|d| !n.is_multiple_of(d))
}

/// 64-bit hash of `bytes` with a fixed `key`: FNV-1a, then a splitmix64 finaliser.
pub fn hash(bytes: &[u8], key: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325 ^ key;
    for b in bytes {
        h = (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

const OFFSET_KEY: u64 = 0x6d61_676c_6576_0001;
const SKIP_KEY: u64 = 0x6d61_676c_6576_0002;

/// A filled lookup table: slot -> backend index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maglev {
    slots: Box<[u16]>,
}

impl Maglev {
    /// Fills a table of `size` slots (prime, more than the backends) for backends named
    /// by `names`; slots hold indices into `names`, but which backend owns a slot depends
    /// on the names only, not on their order. `None` when there is no backend, more than 65,535, or `size` is not a prime
    /// above the number of backends.
    pub fn new<N: AsRef<[u8]>>(names: &[N], size: u32) -> Option<Self> {
        let n = names.len();
        let m = size as usize;
        if n == 0 || n > usize::from(u16::MAX) || m <= n || !is_prime(size) {
            return None;
        }
        // Backends take turns in the order of their names, so that the table depends on
        // the names only, not on the order they were given in.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|a, b| names[*a].as_ref().cmp(names[*b].as_ref()));
        let perms: Vec<(usize, u64, u64)> = order
            .into_iter()
            .map(|i| {
                let name = names[i].as_ref();
                let offset = hash(name, OFFSET_KEY) % size as u64;
                let skip = hash(name, SKIP_KEY) % (size as u64 - 1) + 1;
                (i, offset, skip)
            })
            .collect();
        const EMPTY: u16 = u16::MAX;
        let mut slots = vec![EMPTY; m].into_boxed_slice();
        // Each backend's next position in its permutation, kept as the slot it points at.
        let mut next: Vec<u64> = perms.iter().map(|(_, offset, _)| *offset).collect();
        let mut filled = 0;
        'fill: loop {
            for (turn, (i, _, skip)) in perms.iter().enumerate() {
                let mut c = next[turn];
                while slots[c as usize] != EMPTY {
                    c = (c + skip) % size as u64;
                }
                slots[c as usize] = *i as u16;
                next[turn] = (c + skip) % size as u64;
                filled += 1;
                if filled == m {
                    break 'fill;
                }
            }
        }
        Some(Self { slots })
    }

    /// The backend index for a flow whose hash is `flow_hash`.
    #[inline]
    pub fn pick(&self, flow_hash: u64) -> usize {
        usize::from(self.slots[(flow_hash % self.slots.len() as u64) as usize])
    }

    /// Number of slots.
    pub fn size(&self) -> usize {
        self.slots.len()
    }

    /// How many slots each backend owns.
    pub fn shares(&self, backends: usize) -> Vec<usize> {
        let mut out = vec![0; backends];
        for s in self.slots.iter() {
            if let Some(c) = out.get_mut(usize::from(*s)) {
                *c += 1;
            }
        }
        out
    }

    /// The backend index of every slot.
    pub fn slots(&self) -> &[u16] {
        &self.slots
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.244.{}.{}:8080", i / 200, i % 200 + 10))
            .collect()
    }

    #[test]
    fn backends_share_the_table_evenly() {
        let m = Maglev::new(&names(100), 16381).unwrap();
        let shares = m.shares(100);
        let (min, max) = (*shares.iter().min().unwrap(), *shares.iter().max().unwrap());
        // 163.81 each on average; Maglev keeps every share within a few slots of it.
        assert!(min >= 150 && max <= 175, "{min}..{max}");
        assert_eq!(shares.iter().sum::<usize>(), 16381);
    }

    #[test]
    fn removing_one_of_a_hundred_backends_moves_about_a_hundredth_of_the_slots() {
        let all = names(100);
        let before = Maglev::new(&all, 16381).unwrap();
        let mut fewer = all.clone();
        let gone = fewer.remove(37);
        let after = Maglev::new(&fewer, 16381).unwrap();
        let mut moved_elsewhere = 0;
        for (b, a) in before.slots().iter().zip(after.slots()) {
            let was = &all[usize::from(*b)];
            let now = &fewer[usize::from(*a)];
            if *was != gone && was != now {
                moved_elsewhere += 1;
            }
        }
        // The removed backend's ~164 slots must move; Maglev moves few others besides.
        let disruption = moved_elsewhere as f64 / 16381.0;
        assert!(
            disruption < 0.02,
            "{moved_elsewhere} slots of surviving backends moved"
        );
        let owned_by_gone = before
            .slots()
            .iter()
            .filter(|s| all[usize::from(**s)] == gone)
            .count();
        assert!((140..=190).contains(&owned_by_gone), "{owned_by_gone}");
    }

    #[test]
    fn the_table_depends_on_names_not_order() {
        let mut a = names(10);
        let ma = Maglev::new(&a, 1021).unwrap();
        a.reverse();
        let mb = Maglev::new(&a, 1021).unwrap();
        for (x, y) in ma.slots().iter().zip(mb.slots()) {
            assert_eq!(
                names(10)[usize::from(*x)],
                a[usize::from(*y)],
                "the same backend owns the slot"
            );
        }
    }

    #[test]
    fn sizes_grow_with_backends_up_to_the_maximum() {
        assert_eq!(table_size(1, DEFAULT_MAX_SIZE), 251);
        assert_eq!(table_size(10, DEFAULT_MAX_SIZE), 1021);
        assert_eq!(table_size(100, DEFAULT_MAX_SIZE), 16381);
        assert_eq!(table_size(1000, DEFAULT_MAX_SIZE), 16381);
        assert_eq!(table_size(1000, 65521), 65521);
        assert_eq!(table_size(3, 1000), 509);
        assert!(is_prime(16381) && !is_prime(16383));
        assert!(Maglev::new(&names(3), 16383).is_none(), "not prime");
        assert!(Maglev::new(&names(0), 251).is_none());
    }
}
