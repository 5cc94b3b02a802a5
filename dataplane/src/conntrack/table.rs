//! The storage both translating connection-tracking tables (masquerade and Services) are
//! built on: each flow under two keys, its original tuple and its reply tuple, pointing at
//! one shared record; 1,024 hash-map shards, each behind its own lock, so that a packet
//! takes one shard's lock and never a global one; at most `limit` flows.
//!
//! When the table is full, a new flow takes the place of an unassured one near it, as
//! Linux's conntrack does ("early drop"): a flood of new flows (a SYN flood, a UDP scan)
//! then only displaces flows that are not established (unanswered, a TCP handshake not
//! completed, or reset), while established flows carry on and a legitimate new flow still
//! gets in. The search is bounded (a few shards, a few dozen entries each), so a table full
//! of established flows refuses a new one at a bounded cost.

use super::life::Liveness;
use super::shards::{hash_of, lock, new_shards, random_seed, shard_of, FxBuild, SHARDS};
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// Shards searched for an unassured flow to drop when the table is full.
const EARLY_DROP_SHARDS: usize = 8;
/// Entries looked at per shard searched.
const EARLY_DROP_SCAN: usize = 64;

/// A flow as a [`FlowTable`] stores it.
pub trait Tracked {
    /// The tuple type of its keys.
    type Key: Hash + Eq + Copy;
    /// The key of its original direction (the one that opened it).
    fn original_key(&self) -> Self::Key;
    /// The key of its replies.
    fn reply_key(&self) -> Self::Key;
    /// Its state and last-seen time.
    fn life(&self) -> &Liveness;
}

type Shard<F> = Mutex<HashMap<<F as Tracked>::Key, Arc<F>, FxBuild>>;

/// A bounded table of two-keyed flows (see the module's text).
pub struct FlowTable<F: Tracked> {
    shards: Box<[Shard<F>]>,
    limit: usize,
    flows: AtomicUsize,
    early_drops: AtomicU64,
    seed: u64,
}

impl<F: Tracked> FlowTable<F> {
    /// An empty table of at most `limit` flows, hashed with a seed of its own.
    pub fn new(limit: usize) -> Self {
        Self {
            shards: new_shards(),
            limit,
            flows: AtomicUsize::new(0),
            early_drops: AtomicU64::new(0),
            seed: random_seed(),
        }
    }

    /// The shard index of `key`, in `0..SHARDS`.
    #[inline]
    pub fn index<K: Hash>(&self, key: &K) -> usize {
        shard_of(self.seed, key)
    }

    /// The hash of `key` with this table's seed: a position no client can predict, for
    /// searches that start from it.
    #[inline]
    pub fn hash<K: Hash>(&self, key: &K) -> u64 {
        hash_of(self.seed, key)
    }

    /// The locked shard of `key`.
    #[inline]
    pub fn shard(&self, key: &F::Key) -> MutexGuard<'_, HashMap<F::Key, Arc<F>, FxBuild>> {
        lock(&self.shards[self.index(key)])
    }

    /// Counts a flow just inserted under both keys.
    pub fn added(&self) {
        self.flows.fetch_add(1, Ordering::Relaxed);
    }

    /// Flows held now.
    pub fn len(&self) -> usize {
        self.flows.load(Ordering::Relaxed)
    }

    /// True when no flow is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most flows it holds.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Flows not established (unanswered, handshake not done, or reset) dropped so far to make room for new ones.
    pub fn early_drops(&self) -> u64 {
        self.early_drops.load(Ordering::Relaxed)
    }

    /// Whether a new flow whose original key is `near` may be added: true below the limit,
    /// or once the least recently seen unassured flow (unanswered, handshake not done, or
    /// reset) among those searched near it has been removed (`gone` sees it). False when
    /// the table is full of established flows.
    pub fn make_room(&self, near: &F::Key, gone: impl FnOnce(&F)) -> bool {
        if self.len() < self.limit {
            return true;
        }
        let first = self.index(near);
        for i in 0..EARLY_DROP_SHARDS {
            let victim = {
                let mut map = lock(&self.shards[(first + i) % SHARDS]);
                let oldest = map
                    .iter()
                    .take(EARLY_DROP_SCAN)
                    .filter(|(key, flow)| **key == flow.original_key() && flow.life().unassured())
                    .min_by_key(|(_, flow)| flow.life().last_seen_ns())
                    .map(|(key, _)| *key);
                oldest.and_then(|key| map.remove(&key))
            };
            if let Some(flow) = victim {
                self.forget(&flow);
                self.early_drops.fetch_add(1, Ordering::Relaxed);
                gone(&flow);
                return true;
            }
        }
        false
    }

    /// Removes the flows `doomed` picks, both keys of each (the original key decides, so a
    /// flow is never left half reachable); `gone` sees each. Returns how many.
    pub fn remove_where(&self, doomed: impl Fn(&F) -> bool, mut gone: impl FnMut(&F)) -> usize {
        let mut removed = 0;
        for shard in self.shards.iter() {
            let picked: Vec<Arc<F>> = {
                let mut map = lock(shard);
                let mut out = Vec::new();
                map.retain(|key, flow| {
                    if *key == flow.original_key() && doomed(flow) {
                        out.push(flow.clone());
                        return false;
                    }
                    true
                });
                out
            };
            for flow in picked {
                self.forget(&flow);
                gone(&flow);
                removed += 1;
            }
        }
        removed
    }

    /// Every flow once (under its original key), shard by shard.
    pub fn for_each(&self, mut each: impl FnMut(&F)) {
        for shard in self.shards.iter() {
            let map = lock(shard);
            map.iter()
                .filter(|(key, flow)| **key == flow.original_key())
                .for_each(|(_, flow)| each(flow));
        }
    }

    /// Takes the reply key of `flow`, whose original key is already gone, and uncounts it.
    fn forget(&self, flow: &F) {
        let reply = flow.reply_key();
        self.shard(&reply).remove(&reply);
        self.flows.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flow keyed by numbers: original `n`, reply `n + 1_000_000`.
    struct Numbered {
        n: u64,
        life: Liveness,
    }

    impl Tracked for Numbered {
        type Key = u64;
        fn original_key(&self) -> u64 {
            self.n
        }
        fn reply_key(&self) -> u64 {
            self.n + 1_000_000
        }
        fn life(&self) -> &Liveness {
            &self.life
        }
    }

    fn insert(table: &FlowTable<Numbered>, n: u64, now_ns: u64, answered: bool) {
        let flow = Arc::new(Numbered {
            n,
            life: Liveness::new(now_ns),
        });
        flow.life.touch(now_ns, None, false);
        if answered {
            flow.life.touch(now_ns, None, true);
        }
        table
            .shard(&flow.reply_key())
            .insert(flow.reply_key(), flow.clone());
        table.shard(&n).insert(n, flow);
        table.added();
    }

    #[test]
    fn a_full_table_makes_room_by_dropping_an_unassured_flow_never_an_answered_one() {
        let table = FlowTable::new(4);
        insert(&table, 1, 10, true);
        insert(&table, 2, 20, true);
        insert(&table, 3, 30, false);
        insert(&table, 4, 40, true);
        // A new flow whose key shares the unassured one's shard.
        let near = (10..100_000u64)
            .find(|k| table.index(k) == table.index(&3u64))
            .unwrap();
        let mut dropped = Vec::new();
        assert!(table.make_room(&near, |f| dropped.push(f.n)));
        assert_eq!(dropped, vec![3]);
        assert_eq!((table.len(), table.early_drops()), (3, 1));
        assert!(
            table.shard(&1_000_003).get(&1_000_003).is_none(),
            "reply key gone too"
        );
        insert(&table, 5, 50, true);
        assert!(
            ![1u64, 2, 4, 5].iter().any(|k| table.make_room(k, |_| ())),
            "answered flows are never dropped"
        );
        assert_eq!(table.len(), 4);
    }

    #[test]
    fn the_least_recently_seen_unassured_flow_goes_first() {
        let table = FlowTable::new(2);
        // Two unassured flows in the same shard: find two keys that share one.
        let a = 7u64;
        let b = (8..10_000u64)
            .find(|k| table.index(k) == table.index(&a))
            .unwrap();
        insert(&table, a, 500, false);
        insert(&table, b, 100, false);
        let mut dropped = None;
        assert!(table.make_room(&a, |f| dropped = Some(f.n)));
        assert_eq!(dropped, Some(b), "the older one");
    }

    #[test]
    fn below_the_limit_nothing_is_dropped() {
        let table = FlowTable::new(3);
        insert(&table, 1, 0, false);
        assert!(table.make_room(&2, |_| unreachable!("nothing to drop")));
        assert_eq!(table.early_drops(), 0);
        assert_eq!(table.remove_where(|f| f.n == 1, |_| ()), 1);
        assert!(table.is_empty());
        assert!(table.shard(&1_000_001).get(&1_000_001).is_none());
    }
}
