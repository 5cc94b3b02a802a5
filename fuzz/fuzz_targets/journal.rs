//! A conntrack journal read back from arbitrary bytes (a file a crashed or foreign process
//! left): flows that pass validation, or none, never a panic; and the table built from
//! them answers lookups for every flow it took back.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::net::Ipv4Addr;
use std::sync::atomic::AtomicU8;
use switchyard_dataplane::conntrack::journal::{journal_len, HEADER_LEN};
use switchyard_dataplane::conntrack::Conntrack;

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 10);
const PORTS: (u16, u16) = (61000, 65534);
const CAPACITY: usize = 64;

fuzz_target!(|data: &[u8]| {
    let mut bytes = vec![0u8; journal_len(CAPACITY)];
    // The first byte picks whether the header is this table's (so that the records are
    // read) or the input's own.
    let (valid_header, body) = match data.split_first() {
        Some((first, rest)) => (first & 1 == 0, rest),
        None => (true, data),
    };
    if valid_header {
        let header = header_of_fresh_journal();
        bytes[..HEADER_LEN].copy_from_slice(&header);
        let n = body.len().min(bytes.len() - HEADER_LEN);
        bytes[HEADER_LEN..HEADER_LEN + n].copy_from_slice(&body[..n]);
    } else {
        let n = body.len().min(bytes.len());
        bytes[..n].copy_from_slice(&body[..n]);
    }
    let backing: Box<[AtomicU8]> = bytes.into_iter().map(AtomicU8::new).collect();
    let (ct, restored) = Conntrack::with_journal(NODE, PORTS, CAPACITY, Box::new(backing), 0);
    assert_eq!(restored.flows, ct.len());
    assert!(ct.len() <= CAPACITY);
    for flow in ct.flows(0) {
        assert_eq!(
            ct.answer(&flow.original, None, 1).map(|_| ()).or(flow.published.then_some(())),
            Some(())
        );
    }
});

fn zeroed(len: usize) -> Box<[AtomicU8]> {
    (0..len).map(|_| AtomicU8::new(0)).collect()
}

/// The header a table of this shape writes into an empty journal.
fn header_of_fresh_journal() -> Vec<u8> {
    let backing = std::sync::Arc::new(zeroed(journal_len(CAPACITY)));
    struct Shared(std::sync::Arc<Box<[AtomicU8]>>);
    impl switchyard_dataplane::conntrack::journal::Backing for Shared {
        fn bytes(&self) -> &[AtomicU8] {
            &self.0
        }
    }
    let _ = Conntrack::with_journal(NODE, PORTS, CAPACITY, Box::new(Shared(backing.clone())), 0);
    backing[..HEADER_LEN]
        .iter()
        .map(|b| b.load(std::sync::atomic::Ordering::Relaxed))
        .collect()
}
