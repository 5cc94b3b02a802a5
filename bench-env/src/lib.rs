//! bench-env: testbeds of network namespaces on one machine (simulated nodes and pods), with
//! Switchyard and the kernel's own datapath side by side, and the measurements that compare
//! them. Used by the `bench-env` binary and by the integration tests.
//!
//! Everything it creates (namespaces, processes, sockets) is registered with [`cleanup`] and
//! removed when its guard drops, when the program panics, or on Ctrl-C / SIGTERM. Nothing
//! is created in the root namespace.

pub mod cleanup;
pub mod cluster;
pub mod error;
pub mod measure;
pub mod netns;
pub mod process;
pub mod rawsock;
pub mod report;
pub mod testbed;
pub mod tools;
pub mod transfer;

pub use error::{Error, Result};

/// True when running as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// For tests that need root: returns false (after saying why) when they should skip, which
/// is only when not root and not under CI. Under `CI=true` without root it panics: CI must
/// run these tests, never skip them.
pub fn privileged_test_may_run(name: &str) -> bool {
    if is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{name}: needs root (network namespaces, TAP devices) and CI=true forbids skipping");
    }
    eprintln!("SKIPPED {name}: needs root for network namespaces and TAP devices (run as root, or under CI)");
    false
}
