//! Switchyard's control side: reading cluster state (Kubernetes objects) and turning it
//! into each node's forwarding plan. The `switchyard-control` binary is the CLI over this
//! and over the dataplane's API.

pub mod agent;
pub mod check;
pub mod cli;
pub mod cluster;
pub mod policy;
pub mod source;
pub mod table;
pub mod views;
