//! Where the agent reads the cluster from: a directory of manifests ([`dir`]) or the
//! Kubernetes API server ([`api`], which keeps its objects in a [`store::Store`]). Both
//! give the same [`Manifests`], which the same validation and reconcile code turn into the
//! dataplane's state.

pub mod api;
pub mod dir;
pub mod memory;
pub mod store;
pub mod synthetic;

use crate::cluster::manifests::Manifests;
use crate::cluster::services::ServiceAllocations;
use std::ops::Deref;
use std::time::Duration;

pub use store::Change;

/// A source of cluster state.
pub trait Source {
    /// What changed since the last call (`None`: nothing), with every node's pod CIDRs as
    /// this source gives them; the state is usable when the change has no errors.
    fn changed(&mut self) -> Option<Change>;

    /// The cluster state (as of the last [`Source::changed`] or later).
    fn state(&self) -> Box<dyn Deref<Target = Manifests> + '_>;

    /// Waits up to `timeout`, less when a change arrives sooner.
    fn wait(&self, timeout: Duration) {
        std::thread::sleep(timeout);
    }

    /// Cluster IPs and node ports this source recorded for Services that have none.
    fn service_allocations(&self) -> ServiceAllocations {
        ServiceAllocations::default()
    }

    /// Records the allocations made for Services that have none (a directory keeps them
    /// beside the manifests; the API server allocates its own).
    fn record_service_allocations(&self, _record: &ServiceAllocations) -> Result<(), String> {
        Ok(())
    }

    /// Called once the dataplane forwards with this node's settings (the API source sets
    /// the node's `NetworkUnavailable` condition to `False`).
    fn network_ready(&mut self, _node: &str) -> Result<(), String> {
        Ok(())
    }

    /// What it is, for messages (`manifests in DIR`, `the API server at URL`).
    fn describe(&self) -> String;
}
