//! Tracing a synthetic packet through the pipeline (`switchyard-control trace`): what a pod's
//! packet to a destination would meet at each stage, against the live tables, without
//! sending it or changing any state.

use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// Parameters of [`crate::Request::Trace`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRequest {
    /// The sending pod: `namespace/name` as the CNI plugin recorded it, or one of its
    /// addresses.
    pub from: String,
    /// The destination address.
    pub to: IpAddr,
    /// `tcp`, `udp`, `sctp` or `icmp` (an echo request).
    pub protocol: String,
    /// The destination port (none for ICMP).
    #[serde(default)]
    pub port: Option<u16>,
}

/// One stage's decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceStep {
    /// The stage: `ingress`, `neighbour`, `service`, `masquerade`, `route`, `policy`,
    /// `egress`, `verdict`.
    pub stage: String,
    /// What it decided, in words.
    pub decision: String,
}

/// The answer to [`crate::Request::Trace`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceReport {
    /// The packet as the pod would send it (`tcp 10.244.0.5:40000 -> 10.96.0.10:80`).
    pub packet: String,
    /// The stages in the order the pipeline runs them.
    pub steps: Vec<TraceStep>,
    /// `forwarded`, `answered` (an ICMP error or an answer back to the pod) or `dropped`.
    pub verdict: String,
}
