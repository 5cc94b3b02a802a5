//! The CNI plugin's input parsing on arbitrary bytes (network configuration, valid
//! attachments, prevResult addresses): an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_cni::{input, result};

fuzz_target!(|data: &[u8]| {
    if let Ok(conf) = input::netconf(data) {
        let _ = input::valid_attachments(&conf);
        if let Some(prev) = &conf.prev_result {
            let _ = result::addresses(prev);
        }
    }
});
