//! Fuzzes the reading of Service and EndpointSlice manifests and their compilation into
//! what a dataplane serves, then the dataplane's Service table built from the result:
//! arbitrary YAML must give errors with a file and a field, never a panic, and whatever
//! compiles must build.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use switchyard_control::cluster::{manifests, services};
use switchyard_dataplane::tables::services::ServiceTable;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut m = manifests::Manifests::default();
    m.config.service_cidrs = vec![
        "10.96.0.0/28".parse().unwrap(),
        "fd00:96::/124".parse().unwrap(),
    ];
    m.config.node_port_range = switchyard_api::PortRange {
        first: 30000,
        last: 30009,
    };
    let mut errors = Vec::new();
    manifests::load_text(Path::new("fuzz.yaml"), text, &mut m, &mut errors);
    for e in &errors {
        assert_eq!(e.file, Path::new("fuzz.yaml"));
    }
    match services::compile(&m, "node0", &services::ServiceAllocations::default()) {
        Ok((specs, record)) => {
            for s in &specs {
                assert!(!s.name.is_empty());
                for ip in record.cluster_ips.values().flatten() {
                    assert!(m.config.service_cidrs.iter().any(|c| c.contains(ip)));
                }
            }
            let table = ServiceTable::build(&specs, 251, &Default::default());
            let _ = table.node_port_list();
        }
        Err(errors) => assert!(!errors.is_empty()),
    }
});
