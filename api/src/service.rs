//! Services as the dataplane needs them: virtual addresses and ports in front of sets of
//! endpoints, computed by the control process from Kubernetes' Services and
//! EndpointSlices (endpoints already chosen as kube-proxy chooses them) and pushed with
//! [`crate::Request::ApplyServices`].

use serde::{Deserialize, Serialize};
use std::net::IpAddr;

/// A Service's identity: namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceKey {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `ClusterIP` or `NodePort` (a `LoadBalancer` is served as a `NodePort`).
    #[serde(rename = "type", default = "cluster_ip")]
    pub kind: String,
    /// `spec.clusterIPs` (allocated from `serviceCIDR` when the Service has none).
    #[serde(rename = "clusterIPs")]
    pub cluster_ips: Vec<IpAddr>,
    /// `spec.externalIPs`: more virtual addresses, served like the cluster IPs.
    #[serde(rename = "externalIPs", default)]
    pub external_ips: Vec<IpAddr>,
    /// The ports.
    pub ports: Vec<ServicePort>,
    /// `sessionAffinity: ClientIP`: seconds a client keeps its backend (none: no
    /// affinity).
    #[serde(default)]
    pub affinity_timeout_s: Option<u32>,
    /// `externalTrafficPolicy: Local`: NodePort and external-IP traffic goes to this node's
    /// endpoints only, with the client's address kept.
    #[serde(default)]
    pub external_local: bool,
    /// `internalTrafficPolicy: Local`: pods reach only endpoints on their own node.
    #[serde(default)]
    pub internal_local: bool,
}

fn cluster_ip() -> String {
    "ClusterIP".into()
}

impl ServiceSpec {
    /// Its identity.
    pub fn key(&self) -> ServiceKey {
        ServiceKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

/// One port of a Service and the endpoints serving it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    /// The port's name (may be empty for a Service with one port).
    #[serde(default)]
    pub name: String,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    /// The virtual port.
    pub port: u16,
    /// The node port, for NodePort Services.
    #[serde(default)]
    pub node_port: Option<u16>,
    /// The endpoints, as kube-proxy would use them: ready ones, or, when none is ready,
    /// serving terminating ones; never not-ready ones.
    #[serde(default)]
    pub endpoints: Vec<Endpoint>,
}

/// One endpoint of a Service port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// The pod's address.
    pub address: IpAddr,
    /// The target port on it.
    pub port: u16,
    /// True when it runs on this node (the traffic policies' `Local`).
    #[serde(default)]
    pub local: bool,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.address {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

/// A Service as the dataplane serves it, for `get services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    /// What was pushed.
    #[serde(flatten)]
    pub spec: ServiceSpec,
    /// Slots of each port's Maglev table, in port order (0 for a port with no endpoint).
    pub maglev_table_sizes: Vec<u32>,
}

/// A flow to a Service, as listed (`get conntrack --service`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceFlowEntry {
    /// The Service (none when it is gone and the flow lives on).
    #[serde(default)]
    pub service: Option<ServiceKey>,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// The client, `address:port`.
    pub client: String,
    /// The frontend it used, `address:port`.
    pub frontend: String,
    /// The backend it was given, `address:port`.
    pub backend: String,
    /// Where the connection is: `new`, `established`, `closing`, `closed`.
    pub state: String,
    /// Seconds since its last packet.
    pub idle_s: u64,
}
