//! Cluster state in Kubernetes' shapes and what each node makes of it.

pub mod allocate;
pub mod config;
pub mod keyed;
pub mod manifests;
pub mod plan;
pub mod pods;
pub mod services;

#[cfg(test)]
mod tests;
