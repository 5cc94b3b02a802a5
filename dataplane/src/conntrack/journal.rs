//! Masquerade's flows written where they outlive the process: a header and one fixed
//! record per flow in bytes that the dataplane maps from a file on tmpfs
//! (`/run/switchyard/dataplane.conntrack`), so that after a crash (`kill -9`) or a restart
//! the next process finds every masqueraded and published (hostPort) flow with its node
//! port, and their connections carry on.
//!
//! The fast path does not write here per packet: a record is written when its flow is
//! opened, when its state changes (established, closing, closed) and when it goes. A
//! restored flow starts its idle timeout again. Records are 24 bytes, so the journal of a
//! 1M-flow table is 24 MiB of address space, of which only the pages of flows in use are
//! ever touched.
//!
//! Nothing read back is trusted blindly: the header must name this format, its version,
//! record size, capacity, node address and port range, or the whole file is discarded;
//! each record must carry its check word and plausible fields (a masqueradable protocol, a
//! node port of the range), or it is dropped. A record is marked live only after its
//! fields are written, and dead before its slot is reused, so a crash mid-write leaves a
//! record that is either whole or ignored.

use super::{life::Liveness, Tuple};
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

/// What a journal is written into: bytes every thread may read and write.
pub trait Backing: Send + Sync {
    /// The bytes, header first.
    fn bytes(&self) -> &[AtomicU8];
}

impl Backing for Box<[AtomicU8]> {
    fn bytes(&self) -> &[AtomicU8] {
        self
    }
}

const MAGIC: [u8; 8] = *b"SYCTJRNL";
/// The format's version; a file of another one is discarded.
pub const VERSION: u32 = 1;
/// Bytes before the first record.
pub const HEADER_LEN: usize = 64;
/// Bytes per record.
pub const RECORD_LEN: usize = 24;

const LIVE: u8 = 1;
const PUBLISHED: u8 = 1;

/// The bytes a journal of `capacity` flows needs.
pub fn journal_len(capacity: usize) -> usize {
    HEADER_LEN + capacity * RECORD_LEN
}

/// A flow as the journal holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// The outbound tuple as the pod sent it.
    pub original: Tuple,
    /// The node's address its replies come to.
    pub node: Ipv4Addr,
    /// The node's port.
    pub node_port: u16,
    /// Opened through a published port (hostPort).
    pub published: bool,
    /// Its [`Liveness`] state byte.
    pub life: u8,
}

/// The flows of one masquerade table, in bytes that outlive the process.
pub struct Journal {
    backing: Box<dyn Backing>,
    capacity: usize,
    /// Free slots, the lowest on top (so that the pages in use stay few).
    free: Mutex<Vec<u32>>,
}

impl Journal {
    /// Takes `backing` as the journal of a table of `capacity` flows masquerading to
    /// `node` with `ports`. Returns it with the flows it validly holds (each with its
    /// slot, still taken), or with none and the reason when the bytes held another
    /// table's journal, another format or garbage (they are then started afresh).
    pub fn attach(
        backing: Box<dyn Backing>,
        capacity: usize,
        node: Ipv4Addr,
        ports: (u16, u16),
    ) -> (Self, Vec<(u32, Recorded)>, Option<String>) {
        let capacity =
            capacity.min((backing.bytes().len().saturating_sub(HEADER_LEN)) / RECORD_LEN);
        let header = header(capacity, node, ports);
        let bytes = backing.bytes();
        let found: Vec<u8> = bytes[..HEADER_LEN]
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let mut discarded = None;
        let mut flows = Vec::new();
        let mut used = vec![false; capacity];
        if found == header {
            for (slot, in_use) in used.iter_mut().enumerate() {
                let record = record_bytes(bytes, slot);
                if record[0].load(Ordering::Acquire) != LIVE {
                    continue;
                }
                match decode(record, node, ports) {
                    Some(flow) => {
                        flows.push((slot as u32, flow));
                        *in_use = true;
                    }
                    None => record[0].store(0, Ordering::Release),
                }
            }
        } else {
            if found.iter().any(|b| *b != 0) {
                discarded = Some(describe_mismatch(&found, &header));
            }
            for b in bytes {
                if b.load(Ordering::Relaxed) != 0 {
                    b.store(0, Ordering::Relaxed);
                }
            }
            for (at, value) in header.iter().enumerate() {
                bytes[at].store(*value, Ordering::Relaxed);
            }
        }
        let free = (0..capacity as u32)
            .rev()
            .filter(|s| !used[*s as usize])
            .collect();
        let journal = Self {
            backing,
            capacity,
            free: Mutex::new(free),
        };
        (journal, flows, discarded)
    }

    /// Flows it can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Writes a new flow; returns its slot, or none when every slot is taken.
    pub fn record(&self, flow: &Recorded) -> Option<u32> {
        let slot = self.lock().pop()?;
        let record = record_bytes(self.backing.bytes(), slot as usize);
        for (at, value) in encode(flow).iter().enumerate().skip(1) {
            record[at].store(*value, Ordering::Relaxed);
        }
        record[0].store(LIVE, Ordering::Release);
        Some(slot)
    }

    /// Writes a flow's new state byte.
    pub fn update_life(&self, slot: u32, flow: &Recorded) {
        let record = record_bytes(self.backing.bytes(), slot as usize);
        let bytes = encode(flow);
        record[3].store(bytes[3], Ordering::Relaxed);
        record[22].store(bytes[22], Ordering::Relaxed);
        record[23].store(bytes[23], Ordering::Relaxed);
    }

    /// Marks a flow's record dead and frees its slot.
    pub fn forget(&self, slot: u32) {
        if (slot as usize) < self.capacity {
            record_bytes(self.backing.bytes(), slot as usize)[0].store(0, Ordering::Release);
            self.lock().push(slot);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn record_bytes(bytes: &[AtomicU8], slot: usize) -> &[AtomicU8] {
    let at = HEADER_LEN + slot * RECORD_LEN;
    &bytes[at..at + RECORD_LEN]
}

fn header(capacity: usize, node: Ipv4Addr, ports: (u16, u16)) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(RECORD_LEN as u32).to_le_bytes());
    h[16..20].copy_from_slice(&(capacity as u32).to_le_bytes());
    h[20..24].copy_from_slice(&node.octets());
    h[24..26].copy_from_slice(&ports.0.to_le_bytes());
    h[26..28].copy_from_slice(&ports.1.to_le_bytes());
    h
}

/// Why a header found is not this table's.
fn describe_mismatch(found: &[u8], expected: &[u8; HEADER_LEN]) -> String {
    if found[0..8] != MAGIC {
        "not a Switchyard conntrack journal".into()
    } else if found[8..16] != expected[8..16] {
        "another format version".into()
    } else {
        "another table's journal (node address, port range or size changed)".into()
    }
}

/// A check word over a record's fields (bytes 1 to 21).
fn check(record: &[u8; RECORD_LEN]) -> u16 {
    let mut a: u16 = 0x5359;
    let mut b: u16 = 0;
    for byte in &record[1..22] {
        a = a.wrapping_add(u16::from(*byte));
        b = b.wrapping_add(a);
    }
    a ^ b.rotate_left(8)
}

fn encode(flow: &Recorded) -> [u8; RECORD_LEN] {
    let mut r = [0u8; RECORD_LEN];
    r[0] = LIVE;
    r[1] = flow.original.protocol;
    r[2] = if flow.published { PUBLISHED } else { 0 };
    r[3] = flow.life;
    r[4..8].copy_from_slice(&flow.original.src.octets());
    r[8..10].copy_from_slice(&flow.original.src_port.to_be_bytes());
    r[10..12].copy_from_slice(&flow.original.dst_port.to_be_bytes());
    r[12..16].copy_from_slice(&flow.original.dst.octets());
    r[16..20].copy_from_slice(&flow.node.octets());
    r[20..22].copy_from_slice(&flow.node_port.to_be_bytes());
    let c = check(&r);
    r[22..24].copy_from_slice(&c.to_be_bytes());
    r
}

/// The flow in `record`, if it is whole and plausible for a table masquerading to `node`
/// with `ports`.
fn decode(record: &[AtomicU8], node: Ipv4Addr, ports: (u16, u16)) -> Option<Recorded> {
    let mut r = [0u8; RECORD_LEN];
    for (at, b) in record.iter().enumerate() {
        r[at] = b.load(Ordering::Relaxed);
    }
    if u16::from_be_bytes([r[22], r[23]]) != check(&r) || r[2] > PUBLISHED {
        return None;
    }
    let ip = |at: usize| Ipv4Addr::new(r[at], r[at + 1], r[at + 2], r[at + 3]);
    let port = |at: usize| u16::from_be_bytes([r[at], r[at + 1]]);
    let flow = Recorded {
        original: Tuple {
            protocol: r[1],
            src: ip(4),
            src_port: port(8),
            dst: ip(12),
            dst_port: port(10),
        },
        node: ip(16),
        node_port: port(20),
        published: r[2] == PUBLISHED,
        life: r[3],
    };
    let masqueradable = matches!(flow.original.protocol, 1 | 6 | 17);
    let port_fits = flow.published || (ports.0..=ports.1).contains(&flow.node_port);
    let ours = flow.published || flow.node == node;
    (masqueradable && port_fits && ours && Liveness::valid_bits(flow.life)).then_some(flow)
}

/// Bytes in memory that two journals share in turn, as one file is by two processes.
#[cfg(test)]
#[derive(Clone)]
pub(crate) struct SharedMemory(pub std::sync::Arc<Box<[AtomicU8]>>);

#[cfg(test)]
impl SharedMemory {
    /// Zeroed bytes for a journal of `capacity` flows.
    pub fn new(capacity: usize) -> Self {
        Self(std::sync::Arc::new(
            (0..journal_len(capacity))
                .map(|_| AtomicU8::new(0))
                .collect(),
        ))
    }
}

#[cfg(test)]
impl Backing for SharedMemory {
    fn bytes(&self) -> &[AtomicU8] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
    const PORTS: (u16, u16) = (61000, 65534);

    fn memory(capacity: usize) -> Box<[AtomicU8]> {
        (0..journal_len(capacity))
            .map(|_| AtomicU8::new(0))
            .collect()
    }

    fn flow(src_port: u16, node_port: u16) -> Recorded {
        Recorded {
            original: Tuple {
                protocol: 6,
                src: Ipv4Addr::new(10, 244, 0, 5),
                src_port,
                dst: Ipv4Addr::new(192, 168, 2, 10),
                dst_port: 80,
            },
            node: NODE,
            node_port,
            published: false,
            life: 0x31,
        }
    }

    #[test]
    fn flows_written_by_one_process_are_read_by_the_next_and_forgotten_ones_are_not() {
        let shared = SharedMemory::new(8);
        let (first, restored, discarded) =
            Journal::attach(Box::new(shared.clone()), 8, NODE, PORTS);
        assert!(
            restored.is_empty() && discarded.is_none(),
            "a new file is no error"
        );
        let a = first.record(&flow(1, 61001)).unwrap();
        let b = first.record(&flow(2, 61002)).unwrap();
        assert_eq!((a, b), (0, 1), "the lowest slots first");
        let mut closing = flow(2, 61002);
        closing.life = 0x32;
        first.update_life(b, &closing);
        first.forget(a);
        drop(first);
        let (second, restored, discarded) = Journal::attach(Box::new(shared), 8, NODE, PORTS);
        assert_eq!(restored, vec![(1, closing)]);
        assert!(discarded.is_none());
        assert_eq!(
            second.record(&flow(3, 61003)),
            Some(0),
            "the forgotten slot is free"
        );
        assert_eq!(
            second.record(&flow(4, 61004)),
            Some(2),
            "the restored one's is not"
        );
    }

    #[test]
    fn another_tables_journal_is_discarded_with_a_reason() {
        let shared = SharedMemory::new(8);
        let (j, _, _) = Journal::attach(Box::new(shared.clone()), 8, NODE, PORTS);
        j.record(&flow(1, 61001)).unwrap();
        drop(j);
        let (_, restored, discarded) =
            Journal::attach(Box::new(shared.clone()), 8, NODE, (40000, 50000));
        assert!(restored.is_empty());
        assert!(discarded.unwrap().contains("another table"));
        let garbage = SharedMemory::new(8);
        garbage.0[3].store(0xff, Ordering::Relaxed);
        let (_, _, discarded) = Journal::attach(Box::new(garbage), 8, NODE, PORTS);
        assert_eq!(discarded.unwrap(), "not a Switchyard conntrack journal");
    }

    #[test]
    fn a_damaged_or_implausible_record_is_dropped_and_the_rest_kept() {
        let shared = SharedMemory::new(8);
        let (j, _, _) = Journal::attach(Box::new(shared.clone()), 8, NODE, PORTS);
        let torn = j.record(&flow(1, 61001)).unwrap();
        j.record(&flow(2, 61002)).unwrap();
        let outside = j.record(&flow(3, 61003)).unwrap();
        drop(j);
        // A byte flipped in one record; another rewritten whole with a port out of range.
        shared.0[HEADER_LEN + torn as usize * RECORD_LEN + 5].store(99, Ordering::Relaxed);
        let bad = encode(&flow(3, 1234));
        for (at, value) in bad.iter().enumerate() {
            shared.0[HEADER_LEN + outside as usize * RECORD_LEN + at]
                .store(*value, Ordering::Relaxed);
        }
        let (j, restored, _) = Journal::attach(Box::new(shared), 8, NODE, PORTS);
        assert_eq!(restored, vec![(1, flow(2, 61002))]);
        assert_eq!(
            j.record(&flow(5, 61005)),
            Some(torn),
            "the dropped slots are free again"
        );
    }

    #[test]
    fn a_full_journal_records_no_more() {
        let (j, _, _) = Journal::attach(Box::new(memory(2)), 2, NODE, PORTS);
        assert!(j.record(&flow(1, 61001)).is_some());
        assert!(j.record(&flow(2, 61002)).is_some());
        assert_eq!(j.record(&flow(3, 61003)), None);
        j.forget(0);
        assert_eq!(j.record(&flow(3, 61003)), Some(0));
    }
}
