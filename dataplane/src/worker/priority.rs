//! A worker's nice value, chosen by the node's load (the worker applies the value).
//!
//! While the node's workers are all nearly idle (none busy over 5 % of a 20 ms window in
//! the last two windows), a worker takes the quiet value, a larger share of its CPU: woken
//! by a frame it then runs before the thread that sent the frame goes to sleep, so the
//! answer reaches that thread while it still runs, instead of waking it on another, idle
//! CPU (on a VM, tens of microseconds). As soon as one worker is busy, every worker takes
//! the base value back: its fair share beside the pods, whose traffic it forwards and
//! whose CPU a larger share would take (a worker carrying a stream's acknowledgements at
//! the quiet value preempts the stream's own threads on every one).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// How long a worker's busy share is measured before its value is chosen again.
pub const WINDOW_NS: u64 = 20_000_000;
/// Busy share, per mille of a window, from which a worker is busy.
const BUSY_FROM_PERMILLE: u64 = 50;
/// How long a busy window keeps the node busy after it ended.
const BUSY_HOLD_NS: u64 = 2 * WINDOW_NS;

/// A worker's nice values: `base` under load, `quiet` while the node is nearly idle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NiceValues {
    /// Its value under load (and its only one when equal to `quiet`).
    pub base: i32,
    /// Its value while the node is nearly idle.
    pub quiet: i32,
}

/// When each worker of a node last ended a busy window, shared by them (plain atomic
/// loads and stores, once a window).
#[derive(Debug)]
pub struct NodeLoad {
    /// Per worker: the end of its last busy window, in [`super::monotonic_ns`] time plus
    /// one (0: never busy).
    busy_until: Box<[AtomicU64]>,
}

impl NodeLoad {
    /// A node of `workers` workers, none busy yet.
    pub fn new(workers: usize) -> Self {
        Self {
            busy_until: (0..workers.max(1)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn note_busy(&self, worker: usize, now_ns: u64) {
        if let Some(slot) = self.busy_until.get(worker) {
            slot.store(now_ns + 1, Ordering::Relaxed);
        }
    }

    fn quiet(&self, now_ns: u64) -> bool {
        self.busy_until.iter().all(|slot| {
            let until = slot.load(Ordering::Relaxed);
            until == 0 || now_ns.saturating_sub(until - 1) >= BUSY_HOLD_NS
        })
    }
}

/// Worker `index`'s nice values, the one it has, its current window, and its node's load.
#[derive(Debug)]
pub struct Priority {
    values: NiceValues,
    index: usize,
    load: Arc<NodeLoad>,
    current: i32,
    window_start_ns: u64,
    window_busy_ns: u64,
}

impl Priority {
    /// Worker `index` of the node whose load is `load`, at `values.base`; its first
    /// window starts at `now_ns`.
    pub fn new(values: NiceValues, index: usize, load: Arc<NodeLoad>, now_ns: u64) -> Self {
        Self {
            values,
            index,
            load,
            current: values.base,
            window_start_ns: now_ns,
            window_busy_ns: 0,
        }
    }

    /// The value the worker has.
    pub fn current(&self) -> i32 {
        self.current
    }

    /// Notes `busy_ns` of work done by `now_ns`; when a window has passed, records in the
    /// node's load whether it was busy and chooses the value again, returning it if it
    /// changed (the worker then applies it).
    #[inline]
    pub fn note(&mut self, busy_ns: u64, now_ns: u64) -> Option<i32> {
        if self.values.base == self.values.quiet {
            return None;
        }
        self.window_busy_ns += busy_ns;
        let elapsed = now_ns.saturating_sub(self.window_start_ns);
        if elapsed < WINDOW_NS {
            return None;
        }
        if self.window_busy_ns.saturating_mul(1000) >= elapsed.saturating_mul(BUSY_FROM_PERMILLE) {
            self.load.note_busy(self.index, now_ns);
        }
        self.window_start_ns = now_ns;
        self.window_busy_ns = 0;
        let wanted = if self.load.quiet(now_ns) {
            self.values.quiet
        } else {
            self.values.base
        };
        (wanted != self.current).then(|| {
            self.current = wanted;
            wanted
        })
    }

    /// Stays at `nice` from now on (the value could not be applied).
    pub fn fix(&mut self, nice: i32) {
        self.values = NiceValues {
            base: nice,
            quiet: nice,
        };
        self.current = nice;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const VALUES: NiceValues = NiceValues {
        base: 0,
        quiet: -10,
    };

    #[test]
    fn a_quiet_node_takes_the_quiet_value_and_a_busy_window_the_base_value_back() {
        let load = Arc::new(NodeLoad::new(1));
        let mut p = Priority::new(VALUES, 0, load.clone(), 0);
        // Within the first window nothing is chosen.
        assert_eq!(p.note(100_000, 10 * MS), None);
        // 0.1 ms busy in 20 ms: 0.5 %.
        assert_eq!(p.note(0, 20 * MS), Some(-10));
        assert_eq!(p.current(), -10);
        // 5 ms busy in the next 20 ms: 25 %.
        assert_eq!(p.note(5 * MS, 40 * MS), Some(0));
        // A quiet window right after a busy one: still held busy.
        assert_eq!(p.note(0, 60 * MS), None);
        // Quiet after a long sleep (the window is as long as the sleep).
        assert_eq!(p.note(50_000, 540 * MS), Some(-10));
    }

    #[test]
    fn one_busy_worker_keeps_every_worker_of_the_node_at_the_base_value() {
        let load = Arc::new(NodeLoad::new(2));
        let (mut busy, mut idle) = (
            Priority::new(VALUES, 0, load.clone(), 0),
            Priority::new(VALUES, 1, load.clone(), 0),
        );
        assert_eq!(busy.note(10 * MS, 20 * MS), None);
        assert_eq!(idle.note(0, 21 * MS), None);
        assert_eq!(idle.current(), 0);
        // The busy worker stops; once its last busy window is two windows old, both go
        // quiet.
        assert_eq!(idle.note(0, 45 * MS), None);
        assert_eq!(idle.note(0, 65 * MS), Some(-10));
        assert_eq!(busy.note(0, 66 * MS), Some(-10));
    }

    #[test]
    fn equal_values_and_a_fixed_value_never_change() {
        let load = Arc::new(NodeLoad::new(1));
        let same = NiceValues {
            base: -3,
            quiet: -3,
        };
        let mut p = Priority::new(same, 0, load.clone(), 0);
        assert_eq!(p.note(0, 20 * MS), None);
        assert_eq!(p.note(20 * MS, 40 * MS), None);
        let mut fixed = Priority::new(VALUES, 0, load.clone(), 0);
        fixed.fix(0);
        assert_eq!(fixed.note(0, 20 * MS), None);
        assert_eq!(fixed.current(), 0);
    }
}
