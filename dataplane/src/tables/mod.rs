//! Forwarding state: an immutable snapshot of ports, routes and next hops that the control
//! side builds and publishes atomically, and that workers read without locks.
//!
//! Workers call [`SharedTables::load`] once per poll round and keep the snapshot for that
//! round; the API thread builds a new [`Tables`] and swaps it in with
//! [`SharedTables::publish`]. Nothing a worker does waits for the control side.
//!
//! The tables know nothing of devices: a [`Port`] carries a device of any type `D` that
//! the layer above chooses (the dataplane's `io::PortIo`; tests may use anything). The
//! snapshot owns it, so a port removed from the tables stays open until the last worker
//! lets go of the old snapshot.

pub mod builder;
pub mod host_ports;
pub mod lpm;
pub mod maglev;
pub mod masquerade;
pub mod policy;
pub mod services;

pub use crate::gateway::Gateway;
use arc_swap::ArcSwap;
use lpm::Lpm;
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use switchyard_api::{MacAddr, PortInfo};

/// Traffic counters of one port, shared between workers.
#[derive(Debug, Default)]
pub struct PortCounters {
    /// Frames read from the pod.
    pub rx_frames: AtomicU64,
    /// Bytes read from the pod.
    pub rx_bytes: AtomicU64,
    /// Frames written to the pod.
    pub tx_frames: AtomicU64,
    /// Bytes written to the pod.
    pub tx_bytes: AtomicU64,
    /// Failed writes to the pod.
    pub tx_errors: AtomicU64,
}

impl<D> Port<D> {
    /// True when the port may send from this IPv4 address.
    #[inline]
    pub fn may_send_from_v4(&self, addr: Ipv4Addr) -> bool {
        self.role != PortRole::Pod || self.ipv4.contains(&addr)
    }

    /// True when the port may send from this IPv6 address.
    #[inline]
    pub fn may_send_from_v6(&self, addr: Ipv6Addr) -> bool {
        self.role != PortRole::Pod || self.ipv6.contains(&addr)
    }
}

impl PortCounters {
    /// Adds to a counter (relaxed: counters order nothing).
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// What is behind a port, which decides what the pipeline trusts from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortRole {
    /// A pod: only its own MAC and addresses are accepted as sources.
    Pod,
    /// The node's own network stack (the host interface): any source address.
    Host,
    /// The overlay from other nodes: any source (the sender was checked against the peer
    /// list), but only to local pods and the node.
    Uplink,
}

/// A port as the fast path sees it, with the device `D` behind it.
pub struct Port<D> {
    /// Port id (also the worker's poll token).
    pub id: u32,
    /// The pod interface's MAC: the only source MAC accepted from it, the destination of
    /// frames sent to it.
    pub mac: MacAddr,
    /// MTU of the pod interface.
    pub mtu: u32,
    /// The pod's IPv4 addresses: the only IPv4 sources accepted from it.
    pub ipv4: Vec<Ipv4Addr>,
    /// The pod's IPv6 addresses: the only IPv6 sources forwarded from it.
    pub ipv6: Vec<Ipv6Addr>,
    /// The device behind the port.
    pub device: D,
    /// What is behind the port.
    pub role: PortRole,
    /// True when the device takes UDP GSO super-frames (a TAP with USO offload).
    pub accepts_udp_gso: bool,
    /// Traffic counters.
    pub counters: PortCounters,
    /// What the API lists about this port.
    pub info: PortInfo,
}

/// Where a route lookup sends a packet.
pub enum NextHop<D> {
    /// To the pod behind this port.
    Port(Arc<Port<D>>),
    /// Drop silently.
    Blackhole,
    /// Drop and answer ICMP unreachable.
    Unreachable,
    /// Encapsulate and send through the uplink `port` to the node at `peer`.
    Tunnel {
        /// The uplink port (its MTU is the largest inner packet a tunnel carries).
        port: Arc<Port<D>>,
        /// The peer node's underlay address.
        peer: Ipv4Addr,
    },
}

impl<D> Clone for NextHop<D> {
    fn clone(&self) -> Self {
        match self {
            NextHop::Port(port) => NextHop::Port(port.clone()),
            NextHop::Blackhole => NextHop::Blackhole,
            NextHop::Unreachable => NextHop::Unreachable,
            NextHop::Tunnel { port, peer } => NextHop::Tunnel {
                port: port.clone(),
                peer: *peer,
            },
        }
    }
}

/// An uplink that sends packets leaving the node with the node's own address (masqueraded,
/// or answering a port the node publishes) out by itself, and receives what comes back
/// for them, as frames from the host port. Such packets then never pass the node's stack:
/// the stack sees neither half of their flows. Packets whose way out the uplink does not
/// know go through the host port as all others.
pub struct Exit<D> {
    /// The uplink.
    pub uplink: Arc<Port<D>>,
    /// The host port, through which the rest of the node's traffic goes.
    pub host: Arc<Port<D>>,
}

impl<D> Clone for Exit<D> {
    fn clone(&self) -> Self {
        Self {
            uplink: self.uplink.clone(),
            host: self.host.clone(),
        }
    }
}

/// An immutable snapshot of everything the fast path reads.
pub struct Tables<D> {
    /// Increases with every publication.
    pub generation: u64,
    /// The pods' gateway.
    pub gateway: Gateway,
    /// Ports by id.
    pub ports: HashMap<u32, Arc<Port<D>>>,
    /// IPv4 routes: values index `nexthops`.
    pub routes_v4: Lpm<u32>,
    /// IPv6 routes: values index `nexthops`.
    pub routes_v6: Lpm<u128>,
    /// Next hops; index 0 is unused (it means "no route").
    pub nexthops: Vec<NextHop<D>>,
    /// Masquerade of pod traffic leaving the cluster, once the node settings enable it.
    pub masquerade: Option<Arc<masquerade::Masquerading>>,
    /// The node's ports published to pods (hostPort).
    pub host_ports: host_ports::HostPorts,
    /// The Services served.
    pub services: Arc<services::ServiceTable>,
    /// The flows to Services, shared by every snapshot.
    pub service_flows: Arc<crate::conntrack::service::ServiceFlows>,
    /// The NetworkPolicy rules of the node's selected pods.
    pub policy: Arc<policy::PolicyTable>,
    /// The ports whose pods `policy` selects (a filter: see [`policy::SelectedPorts`]).
    pub selected_ports: policy::SelectedPorts,
    /// The policy verdicts of flows, shared by every snapshot.
    pub policy_flows: Arc<crate::conntrack::policy::PolicyFlows>,
    /// Where packets leaving the node with its address go straight out, if anywhere.
    pub exit: Option<Exit<D>>,
}

impl<D> Tables<D> {
    /// Tables with no port and no route.
    pub fn empty(gateway: Gateway) -> Self {
        Self {
            generation: 0,
            gateway,
            ports: HashMap::new(),
            routes_v4: Lpm::default(),
            routes_v6: Lpm::default(),
            nexthops: vec![NextHop::Blackhole],
            masquerade: None,
            host_ports: host_ports::HostPorts::default(),
            services: Arc::default(),
            service_flows: Arc::new(crate::conntrack::service::ServiceFlows::new(0)),
            policy: Arc::default(),
            selected_ports: policy::SelectedPorts::default(),
            policy_flows: Arc::new(crate::conntrack::policy::PolicyFlows::new(0)),
            exit: None,
        }
    }

    /// A copy of this snapshot whose flow tables (masquerade, Services, policy verdicts)
    /// are empty and its own: running the pipeline over it decides as the live tables
    /// would for a new flow, and changes nothing they hold.
    pub fn detached(&self) -> Self {
        Self {
            generation: self.generation,
            gateway: self.gateway,
            ports: self.ports.clone(),
            routes_v4: self.routes_v4.clone(),
            routes_v6: self.routes_v6.clone(),
            nexthops: self.nexthops.clone(),
            masquerade: self.masquerade.as_ref().map(|m| Arc::new(m.detached())),
            host_ports: self.host_ports.clone(),
            services: self.services.clone(),
            service_flows: Arc::new(crate::conntrack::service::ServiceFlows::new(
                self.service_flows.limit(),
            )),
            policy: self.policy.clone(),
            selected_ports: self.selected_ports,
            policy_flows: Arc::new(crate::conntrack::policy::PolicyFlows::new(
                self.policy_flows.limit(),
            )),
            exit: self.exit.clone(),
        }
    }

    /// The next hop stored at `index`, if any.
    #[inline]
    pub fn nexthop(&self, index: u32) -> Option<&NextHop<D>> {
        if index == 0 {
            None
        } else {
            self.nexthops.get(index as usize)
        }
    }
}

/// The published snapshot: swapped atomically, read without locks.
pub struct SharedTables<D> {
    current: ArcSwap<Tables<D>>,
    /// While set, workers leave what arrives queued on the ports (a restart restoring its
    /// state: a frame forwarded by half-restored tables would be dropped).
    held: std::sync::atomic::AtomicBool,
}

impl<D> SharedTables<D> {
    /// Starts with `tables`.
    pub fn new(tables: Tables<D>) -> Self {
        Self {
            current: ArcSwap::from_pointee(tables),
            held: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Holds forwarding back (`true`) or lets it go on.
    pub fn hold(&self, held: bool) {
        self.held.store(held, std::sync::atomic::Ordering::Release);
    }

    /// Whether forwarding is held back.
    #[inline]
    pub fn held(&self) -> bool {
        self.held.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The current snapshot; hold it for one round of work, not longer.
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<Tables<D>>> {
        self.current.load()
    }

    /// The current snapshot as an owned reference.
    pub fn load_full(&self) -> Arc<Tables<D>> {
        self.current.load_full()
    }

    /// Replaces the snapshot. Readers see either the old or the new one, never a mix.
    pub fn publish(&self, tables: Tables<D>) {
        self.current.store(Arc::new(tables));
    }
}
