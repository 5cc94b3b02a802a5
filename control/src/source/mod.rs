//! Where the agent reads the cluster from: a directory of manifests ([`dir`]) or the
//! Kubernetes API server ([`api`]). Both give the same [`Manifests`], which the same
//! validation and reconcile code turn into the dataplane's state.

pub mod api;
pub mod dir;

use crate::cluster::manifests::Manifests;
use crate::cluster::services::ServiceAllocations;

/// A source of cluster state.
pub trait Source {
    /// The cluster state, when it changed since the last call (`None`: unchanged), with
    /// every node's pod CIDRs as this source gives them; errors as lines to print.
    fn changed(&mut self) -> Option<Result<Manifests, Vec<String>>>;

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
