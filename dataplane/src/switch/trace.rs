//! `Trace`: a synthetic packet from one of this node's pods, run through the pipeline
//! against a detached copy of the live tables (see [`crate::pipeline::trace`]).

use super::{invalid, Switch};
use crate::pipeline::trace::{trace, Probe};
use crate::tables::PortRole;
use crate::wire::{ipv4, protocol_number};
use std::net::IpAddr;
use switchyard_api::{ApiError, ErrorCode, TraceReport, TraceRequest};

impl Switch {
    /// What each stage would decide for a packet from the pod `request.from` (its
    /// `namespace/name` or one of its addresses) to `request.to`.
    pub fn trace(&self, request: &TraceRequest) -> Result<TraceReport, ApiError> {
        let protocol = protocol_number(&request.protocol).ok_or_else(|| {
            invalid(format!(
                "protocol {:?}: trace tcp, udp, sctp or icmp",
                request.protocol
            ))
        })?;
        let dst_port = match (protocol, request.port) {
            (ipv4::PROTO_ICMP, _) => 0,
            (_, Some(port)) => port,
            (_, None) => {
                return Err(invalid(format!(
                    "a {} trace needs a destination port: --to IP:PORT/{}",
                    request.protocol, request.protocol
                )))
            }
        };
        let tables = self.tables().detached();
        let from_addr: Option<IpAddr> = request.from.parse().ok();
        let port = tables
            .ports
            .values()
            .filter(|p| p.role == PortRole::Pod)
            .find(|p| match from_addr {
                Some(addr) => p.info.ips.iter().any(|net| net.addr() == addr),
                None => p.info.pod.as_deref() == Some(request.from.as_str()),
            })
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NotFound,
                    format!(
                        "no pod {} on this node: name one that `switchyard-control get pods` lists (namespace/name or address)",
                        request.from
                    ),
                )
            })?;
        let src = match request.to {
            IpAddr::V4(_) => port.ipv4.first().copied().map(IpAddr::V4),
            IpAddr::V6(_) => port.ipv6.first().copied().map(IpAddr::V6),
        }
        .ok_or_else(|| {
            invalid(format!(
                "pod {} has no address of {}'s family",
                request.from, request.to
            ))
        })?;
        let probe = Probe {
            src,
            dst: request.to,
            protocol,
            dst_port,
        };
        Ok(trace(&tables, &port, &probe, crate::worker::monotonic_ns()))
    }
}
