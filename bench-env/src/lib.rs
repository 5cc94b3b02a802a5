//! bench-env: testbeds of network namespaces on one machine (simulated nodes and pods), with
//! Switchyard and the kernel's own datapath side by side, and the measurements that compare
//! them. Used by the `bench-env` binary and by the integration tests.
//!
//! Everything it creates (namespaces, processes, sockets) is registered with [`cleanup`] and
//! removed when its guard drops, when the program panics, or on Ctrl-C / SIGTERM. Nothing
//! is created in the root namespace.

pub mod agent_scale;
pub mod ceiling;
pub mod cgroup;
pub mod cleanup;
pub mod cluster;
pub mod connections;
pub mod error;
pub mod flood;
pub mod kube;
pub mod kube_e2e;
pub mod listen;
pub mod measure;
pub mod netns;
pub mod policy;
pub mod process;
pub mod rawsock;
pub mod report;
pub mod services;
pub mod testbed;
pub mod tools;
pub mod transfer;

pub use error::{Error, Result};

/// True when running as root.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// For tests that need root: panics, saying why, when not root. Such tests are marked
/// `#[cfg_attr(not(privileged), ignore = "...")]`: the build script sets `privileged` when
/// building as root or under `CI=true`, so without root they report as ignored (never as
/// passed), and under CI they always run: without root there, this panics.
pub fn require_root(name: &str) {
    assert!(
        is_root(),
        "{name}: needs root (network namespaces, TAP devices); run the tests as root"
    );
}
