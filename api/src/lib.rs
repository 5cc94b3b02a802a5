//! The local API between the Switchyard dataplane and its clients (`switchyard-control`,
//! `switchyard-cni`).
//!
//! Wire format: one JSON object per line over a Unix stream socket. Every request carries the
//! protocol `version`; every response carries it back together with either `ok` (a [`Reply`]) or
//! `error` (an [`ApiError`]). A line longer than [`MAX_MESSAGE_BYTES`] is refused. A request
//! either takes full effect or none: an error leaves the dataplane's state as it was.
#![deny(unsafe_code)]

mod client;
pub mod logging;
mod mac;
mod node;
mod policy;
mod service;
mod trace;

pub use client::{Client, ClientError};
pub use ipnet::IpNet;
pub use mac::{MacAddr, ParseMacError};
pub use node::{
    Backend, BackendKind, ConntrackEntry, ExtraRoute, Masquerade, NatStatus, NodeSpec, NodeStatus,
    Peer, PortRange,
};
pub use policy::{
    DeniedFlow, PodPolicy, PodPolicyStatus, PolicyDirection, PolicyPeer, PolicyPort, PolicyRule,
    PolicySet, PolicyStatus,
};
pub use service::{
    Endpoint, ServiceFlowEntry, ServiceKey, ServicePort, ServiceSpec, ServiceStatus,
};
pub use trace::{TraceReport, TraceRequest, TraceStep};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The protocol version this crate speaks. Every change to a message takes a new version;
/// `tests/schema/v{N}.json` pins what each version's messages look like.
pub const API_VERSION: u32 = 7;
/// The oldest protocol version still accepted: a newer dataplane understands every
/// request an older client can send (later versions only add requests and fields with
/// defaults).
pub const OLDEST_API_VERSION: u32 = 1;
/// Where the dataplane listens unless told otherwise (`--api PATH`).
pub const DEFAULT_API_PATH: &str = "/run/switchyard/dataplane.sock";
/// The largest request or response line accepted, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// A request line: the protocol version and what is asked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestEnvelope {
    /// Protocol version of the sender; from [`OLDEST_API_VERSION`] to [`API_VERSION`].
    pub version: u32,
    /// The request itself.
    pub request: Request,
}

/// What a client can ask of the dataplane.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Check that the dataplane is up and learn its identity.
    Hello,
    /// Create a pod port (a TAP device inside the pod's network namespace).
    AddPort(AddPort),
    /// Remove a pod port and its routes.
    DelPort(PortSelector),
    /// List every port.
    ListPorts,
    /// Add a static route.
    AddRoute(RouteSpec),
    /// Remove a static route.
    DelRoute {
        /// The destination prefix of the route to remove.
        dst: IpNet,
    },
    /// List every route (pod routes and static ones).
    ListRoutes,
    /// Read the counters.
    Stats,
    /// Join the cluster, or change how: this node's pod CIDRs, the overlay and every peer.
    /// Idempotent: the dataplane moves from whatever it had to exactly this.
    SetNode(NodeSpec),
    /// Read the node settings in force.
    GetNode,
    /// Read the digest of the node settings in force ([`NodeSpec::digest`]): how an agent
    /// checks, every tick and cheaply at any cluster size, that the dataplane still has
    /// what it pushed (since v7).
    GetNodeDigest,
    /// Read masquerade's state: flows tracked, port range, limit.
    GetNat,
    /// List tracked flows, optionally of one pod address and one protocol
    /// (`tcp`, `udp`, `icmp`).
    ListConntrack {
        /// Only flows of this pod address.
        #[serde(default)]
        pod: Option<std::net::Ipv4Addr>,
        /// Only flows of this protocol.
        #[serde(default)]
        protocol: Option<String>,
    },
    /// Changes the Services served: removes those named in `remove`, then adds or replaces
    /// those in `upsert`; with `replace`, every Service not in `upsert` goes first. The
    /// whole change takes effect at once, or none of it.
    ApplyServices {
        /// Services to add or replace.
        #[serde(default)]
        upsert: Vec<ServiceSpec>,
        /// Services to remove.
        #[serde(default)]
        remove: Vec<ServiceKey>,
        /// Start from no Service at all.
        #[serde(default)]
        replace: bool,
        /// The largest Maglev table (a prime; default 16381).
        #[serde(default)]
        maglev_table_size: Option<u32>,
    },
    /// List the Services served.
    ListServices,
    /// List the flows to Services, optionally of one Service.
    ListServiceFlows {
        /// Only flows of this Service.
        #[serde(default)]
        service: Option<ServiceKey>,
    },
    /// Replaces every NetworkPolicy rule in force with these. Flows the new rules deny stop
    /// at their next packet; new flows are checked against the new rules at once.
    ApplyPolicies(PolicySet),
    /// List the selected pods of this node and the policies in force.
    ListPolicies,
    /// List the flows the policies denied last (newest last).
    ListDeniedFlows,
    /// Run a synthetic packet from a pod through the pipeline against the live tables,
    /// without sending it or opening any flow, and report each stage's decision (since v6).
    Trace(TraceRequest),
}

/// Parameters of [`Request::AddPort`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AddPort {
    /// Path of the pod's network namespace (`/run/netns/NAME`, `/proc/PID/ns/net`).
    pub netns: String,
    /// Interface name inside the pod (`eth0`); at most 15 bytes.
    pub ifname: String,
    /// The pod's addresses with their prefix length (`10.244.0.5/24`, `fd00::5/64`).
    pub ips: Vec<IpNet>,
    /// Interface MTU; the dataplane's default when absent.
    #[serde(default)]
    pub mtu: Option<u32>,
    /// The pod interface's MAC address; derived from the first IP when absent.
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// Free-form owner key (the CNI container ID), kept for listing and garbage collection.
    #[serde(default)]
    pub owner: Option<String>,
    /// The Kubernetes pod it belongs to, `namespace/name` (CNI_ARGS `K8S_POD_NAMESPACE`,
    /// `K8S_POD_NAME`), for listings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Ports of the node published to the pod (hostPort, CNI's `portMappings`).
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
    /// What carries the pod's frames; the dataplane's `--pod-ports` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<PodPorts>,
}

/// What carries a pod's frames between its namespace and the dataplane.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodPorts {
    /// A TAP device in the pod's namespace: TSO super-frames cross whole (bulk TCP).
    #[default]
    Tap,
    /// A veth pair whose node end is read and written through AF_XDP sockets: one system
    /// call per batch instead of per frame (small packets).
    Afxdp,
}

impl PodPorts {
    /// The name as configurations spell it.
    pub fn name(self) -> &'static str {
        match self {
            PodPorts::Tap => "tap",
            PodPorts::Afxdp => "afxdp",
        }
    }
}

impl std::str::FromStr for PodPorts {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tap" => Ok(PodPorts::Tap),
            "afxdp" => Ok(PodPorts::Afxdp),
            other => Err(format!("unknown pod port kind {other:?}: tap or afxdp")),
        }
    }
}

/// A port of the node published to a pod's port (Kubernetes' hostPort), as CNI's
/// `portMappings` capability carries it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    /// The node's port.
    pub host_port: u16,
    /// The pod's port.
    pub container_port: u16,
    /// `tcp` or `udp`.
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// The node address it is published on; empty: the node's address.
    #[serde(default, rename = "hostIP")]
    pub host_ip: String,
}

fn default_protocol() -> String {
    "tcp".into()
}

/// Names one port: by its id, or by the namespace and interface name it was created with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortSelector {
    /// The port's numeric id.
    Id {
        /// Port id as listed by [`Request::ListPorts`].
        id: u32,
    },
    /// The namespace path and interface name given at creation.
    Attachment {
        /// Network namespace path.
        netns: String,
        /// Interface name inside that namespace.
        ifname: String,
    },
}

/// Where a route sends matching packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NextHop {
    /// Out of the given port, to the pod behind it.
    Port(u32),
    /// Dropped silently (counted).
    Blackhole,
    /// Dropped with an ICMP destination-unreachable to the sender.
    Unreachable,
    /// To the node's own network stack (through the host interface).
    Host,
    /// Through the overlay to the node with this underlay address.
    Peer(std::net::Ipv4Addr),
}

/// A route: destination prefix and next hop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteSpec {
    /// Destination prefix.
    pub dst: IpNet,
    /// Where matching packets go.
    pub via: NextHop,
}

/// Where a route came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteOrigin {
    /// Installed with a pod port for the pod's own address.
    Pod,
    /// Added through [`Request::AddRoute`].
    Static,
    /// Computed from the node settings ([`Request::SetNode`]).
    Cluster,
}

/// A route as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteInfo {
    /// Destination prefix.
    pub dst: IpNet,
    /// Where matching packets go.
    pub via: NextHop,
    /// Who installed it.
    pub origin: RouteOrigin,
}

/// A port as listed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PortInfo {
    /// Port id, unique for the dataplane's lifetime.
    pub id: u32,
    /// Port kind: `tap` or `memory`.
    pub kind: String,
    /// Network namespace path.
    pub netns: String,
    /// Interface name inside the namespace.
    pub ifname: String,
    /// Interface index inside the namespace (0 for in-memory ports).
    pub ifindex: u32,
    /// The pod interface's MAC address.
    pub mac: MacAddr,
    /// Interface MTU.
    pub mtu: u32,
    /// The pod's addresses.
    pub ips: Vec<IpNet>,
    /// Owner key given at creation.
    pub owner: Option<String>,
    /// The Kubernetes pod (`namespace/name`) given at creation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Number of device queues; worker `i` serves queue `i`.
    pub queues: usize,
    /// Ports of the node published to this pod (hostPort).
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
}

/// Per-port traffic counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PortCounters {
    /// Port id.
    pub id: u32,
    /// Interface name inside the pod.
    pub ifname: String,
    /// Frames read from the pod.
    pub rx_frames: u64,
    /// Bytes read from the pod (GSO super-frames count whole).
    pub rx_bytes: u64,
    /// Frames written to the pod.
    pub tx_frames: u64,
    /// Bytes written to the pod.
    pub tx_bytes: u64,
    /// Writes to the pod that failed (the frame was dropped).
    pub tx_errors: u64,
}

/// The dataplane's counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Number of worker threads.
    pub workers: usize,
    /// Pipeline event counters by name (`forwarded_ipv4`, `arp_replies`, ...), summed over workers.
    pub counters: BTreeMap<String, u64>,
    /// Drops by reason (`spoofed_source`, `no_route`, ...), summed over workers.
    pub drops: BTreeMap<String, u64>,
    /// Per-port traffic.
    pub ports: Vec<PortCounters>,
}

/// Identity of the dataplane, answered to [`Request::Hello`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HelloReply {
    /// Protocol version spoken.
    pub version: u32,
    /// Software version of the dataplane.
    pub software: String,
    /// Number of worker threads.
    pub workers: usize,
    /// Gateway MAC answered for ARP / ND.
    pub gateway_mac: MacAddr,
    /// IPv4 gateway address pods route through.
    pub gateway_ipv4: std::net::Ipv4Addr,
    /// IPv6 gateway address pods route through.
    pub gateway_ipv6: std::net::Ipv6Addr,
    /// This node's pod CIDRs, when known (the CNI plugin fills `usePodCidr` from them).
    #[serde(default)]
    pub pod_cidrs: Vec<IpNet>,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Answer to [`Request::Hello`].
    Hello(HelloReply),
    /// The port created.
    Port(PortInfo),
    /// All ports.
    Ports(Vec<PortInfo>),
    /// All routes.
    Routes(Vec<RouteInfo>),
    /// Counters.
    Stats(Stats),
    /// Node settings in force.
    Node(Box<NodeStatus>),
    /// The digest of the node settings in force (none before the first).
    NodeDigest(Option<u64>),
    /// Masquerade's state (none before the node settings).
    Nat(Option<NatStatus>),
    /// Tracked flows.
    Conntrack(Vec<ConntrackEntry>),
    /// The Services served.
    Services(Vec<ServiceStatus>),
    /// Flows to Services.
    ServiceFlows(Vec<ServiceFlowEntry>),
    /// The policies in force.
    Policies(PolicyStatus),
    /// Flows the policies denied last.
    DeniedFlows(Vec<DeniedFlow>),
    /// What each stage decided for a traced packet.
    Trace(TraceReport),
    /// The request took effect and has nothing to report.
    Done,
}

/// Classes of error, so that callers can react without parsing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request could not be parsed or has an invalid field.
    InvalidRequest,
    /// The request's protocol version is not spoken here.
    UnsupportedVersion,
    /// The request line exceeds [`MAX_MESSAGE_BYTES`].
    TooLarge,
    /// The request conflicts with existing state (duplicate address, name or route).
    Conflict,
    /// The thing named does not exist (port, route, network namespace).
    NotFound,
    /// The kernel refused an operation (creating the TAP, configuring the interface).
    System,
}

/// An error answer: a code and a message that says what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    /// Class of error.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
}

impl ApiError {
    /// Builds an error of the given code.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// A response line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    /// Protocol version of the responder.
    pub version: u32,
    /// Success or failure.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Success or failure of one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The request succeeded.
    Ok(Reply),
    /// The request failed and changed nothing.
    Error(ApiError),
}

impl From<Result<Reply, ApiError>> for ResponseEnvelope {
    fn from(result: Result<Reply, ApiError>) -> Self {
        Self {
            version: API_VERSION,
            outcome: match result {
                Ok(reply) => Outcome::Ok(reply),
                Err(err) => Outcome::Error(err),
            },
        }
    }
}

/// Parses one request line, checking size and version.
pub fn parse_request(line: &[u8]) -> Result<Request, ApiError> {
    if line.len() > MAX_MESSAGE_BYTES {
        return Err(ApiError::new(
            ErrorCode::TooLarge,
            format!(
                "request of {} bytes exceeds the limit of {MAX_MESSAGE_BYTES}",
                line.len()
            ),
        ));
    }
    let value: serde_json::Value = serde_json::from_slice(line).map_err(|e| {
        ApiError::new(
            ErrorCode::InvalidRequest,
            format!("request is not valid JSON: {e}"),
        )
    })?;
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(v) if (u64::from(OLDEST_API_VERSION)..=u64::from(API_VERSION)).contains(&v) => {}
        Some(v) => {
            return Err(ApiError::new(
                ErrorCode::UnsupportedVersion,
                format!(
                    "protocol version {v} is not supported; this dataplane speaks versions \
                     {OLDEST_API_VERSION} to {API_VERSION}: upgrade the older of the two"
                ),
            ))
        }
        None => {
            return Err(ApiError::new(
                ErrorCode::InvalidRequest,
                "request has no numeric \"version\" field",
            ))
        }
    }
    let envelope: RequestEnvelope = serde_json::from_value(value)
        .map_err(|e| ApiError::new(ErrorCode::InvalidRequest, format!("invalid request: {e}")))?;
    Ok(envelope.request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_port_round_trips() {
        let line = br#"{"version":1,"request":{"op":"add_port","netns":"/run/netns/a","ifname":"eth0","ips":["10.0.0.2/24","fd00::2/64"],"mtu":9000}}"#;
        let req = parse_request(line).unwrap();
        let Request::AddPort(add) = &req else {
            panic!("wrong request {req:?}")
        };
        assert_eq!(add.mtu, Some(9000));
        assert_eq!(add.ips.len(), 2);
        let text = serde_json::to_string(&RequestEnvelope {
            version: API_VERSION,
            request: req.clone(),
        })
        .unwrap();
        assert_eq!(parse_request(text.as_bytes()).unwrap(), req);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            parse_request(b"{").unwrap_err().code,
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            parse_request(
                format!(
                    r#"{{"version":{},"request":{{"op":"hello"}}}}"#,
                    API_VERSION + 1
                )
                .as_bytes()
            )
            .unwrap_err()
            .code,
            ErrorCode::UnsupportedVersion
        );
        let bad_cidr =
            br#"{"version":1,"request":{"op":"add_route","dst":"10.0.0.0/33","via":"blackhole"}}"#;
        assert_eq!(
            parse_request(bad_cidr).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
        let huge = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert_eq!(parse_request(&huge).unwrap_err().code, ErrorCode::TooLarge);
    }

    #[test]
    fn response_shape() {
        let ok: ResponseEnvelope = Ok(Reply::Done).into();
        assert_eq!(
            serde_json::to_string(&ok).unwrap(),
            format!(r#"{{"version":{API_VERSION},"ok":"done"}}"#)
        );
        let err: ResponseEnvelope = Err(ApiError::new(ErrorCode::NotFound, "no port 3")).into();
        assert_eq!(
            serde_json::to_string(&err).unwrap(),
            format!(
                r#"{{"version":{API_VERSION},"error":{{"code":"not_found","message":"no port 3"}}}}"#
            )
        );
    }
}
