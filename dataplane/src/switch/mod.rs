//! The switch: published tables, worker threads, and the control-side state that API
//! requests change. Requests are serialised by one mutex that workers never touch; each
//! change validates first, then does the system work (creating a TAP), then publishes a new
//! snapshot, so that a refused or failed request leaves everything as it was.
//!
//! `cluster` carries out the node settings (host port, uplink, routes).

mod cluster;
mod egress;
mod persist;
mod policy;
pub mod restore;
mod services;
#[cfg(test)]
mod tests;
mod trace;

use crate::io::afxdp::AfXdpPort;
use crate::io::interface::PodInterface;
use crate::io::memory::{self, MemoryPeer};
pub use crate::io::steering::Steering;
use crate::io::tap::{TapDevice, TUN_F_USO};
use crate::io::PortIo;
use crate::pipeline::{DropReason, Event};
use crate::tables::builder::TableBuilder;
use crate::tables::{Gateway, Port, PortCounters, PortRole, SharedTables, Tables};
use crate::worker::priority::{NiceValues, NodeLoad};
use crate::worker::Worker;
use std::collections::BTreeMap;
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use switchyard_api::{
    self as api, AddPort, ApiError, ErrorCode, HelloReply, IpNet, MacAddr, PodPorts, PortInfo,
    PortSelector, Reply, Request, Stats,
};

/// The files a dataplane keeps beside its API socket `api` so that its successor finds
/// its state: the pod ports, the node's first sysctl values, the conntrack journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateFiles {
    /// The pod ports (`<api>.ports.json`).
    pub ports: std::path::PathBuf,
    /// The node's sysctls before their first change (`<api>.sysctls.json`).
    pub sysctls: std::path::PathBuf,
    /// Masquerade's flows (`<api>.conntrack`).
    pub conntrack: std::path::PathBuf,
    /// The node settings last applied (`<api>.node.json`).
    pub node: std::path::PathBuf,
    /// Where a stopped process's descriptors wait for its successor (`<api>.handover`,
    /// a socket; see `io::handover`).
    pub handover: std::path::PathBuf,
}

impl StateFiles {
    /// The files beside `api`.
    pub fn beside(api: &std::path::Path) -> Self {
        Self {
            ports: api.with_extension("ports.json"),
            sysctls: api.with_extension("sysctls.json"),
            conntrack: api.with_extension("conntrack"),
            node: api.with_extension("node.json"),
            handover: api.with_extension("handover"),
        }
    }

    /// All of them.
    pub fn all(&self) -> [&std::path::Path; 5] {
        [
            &self.ports,
            &self.sysctls,
            &self.conntrack,
            &self.node,
            &self.handover,
        ]
    }
}

/// How to run the switch.
#[derive(Debug, Clone)]
pub struct SwitchConfig {
    /// Number of worker threads.
    pub workers: usize,
    /// MTU of pod interfaces whose request names none.
    pub default_mtu: u32,
    /// The pods' gateway.
    pub gateway: Gateway,
    /// How long a worker keeps polling after activity before it sleeps.
    pub spin: std::time::Duration,
    /// This node's pod CIDRs, reported to clients (the CNI plugin's `usePodCidr`).
    pub pod_cidrs: Vec<IpNet>,
    /// How pods' frames are spread over their TAPs' queues, and so over the workers
    /// (see `io::steering`; measured in docs/benchmarks.md).
    pub steering: Steering,
    /// Name of the node-side interface through which the node's stack reaches pods.
    pub host_ifname: String,
    /// Where the pod ports are recorded, so that a restarted dataplane re-attaches them
    /// (none: not recorded).
    pub state_file: Option<std::path::PathBuf>,
    /// Where the node settings are recorded so that a restarted dataplane applies them at
    /// once, before the control process pushes them again (none: not recorded).
    pub node_file: Option<std::path::PathBuf>,
    /// Where the node's sysctls are recorded before their first change, for the uninstall
    /// (none: not recorded).
    pub sysctl_file: Option<std::path::PathBuf>,
    /// Nice value of the worker threads (0: left as inherited).
    pub worker_nice: i32,
    /// Nice value the workers take while all of them are nearly idle
    /// ([`crate::worker::priority`]; equal to `worker_nice`: never changed). 0 by default
    /// here, so that a program embedding a switch keeps its threads' values; the
    /// dataplane's `--worker-quiet-nice` defaults to [`QUIET_WORKER_NICE`].
    pub worker_quiet_nice: i32,
    /// Where masquerade's flows are journaled so that a restarted or crashed dataplane's
    /// successor takes them back (none: they live in memory only).
    pub conntrack_file: Option<std::path::PathBuf>,
    /// What carries a pod's frames when its port request does not say.
    pub pod_ports: PodPorts,
    /// How the uplink moves VXLAN datagrams.
    pub uplink_mode: crate::io::uplink::UplinkMode,
    /// How packets leaving the node with its address travel under the AF_XDP uplink.
    pub node_exit: crate::io::uplink::NodeExit,
}

/// The nice value `switchyard-dataplane` gives its workers while the node is quiet
/// (`--worker-quiet-nice`): enough for a woken worker to run before its waker sleeps.
pub const QUIET_WORKER_NICE: i32 = -10;

impl Default for SwitchConfig {
    fn default() -> Self {
        Self {
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            default_mtu: 1500,
            gateway: Gateway::default(),
            spin: std::time::Duration::ZERO,
            pod_cidrs: Vec::new(),
            steering: Steering::default(),
            host_ifname: "sy0".into(),
            conntrack_file: None,
            state_file: None,
            node_file: None,
            sysctl_file: None,
            worker_nice: 0,
            worker_quiet_nice: 0,
            pod_ports: PodPorts::Tap,
            uplink_mode: crate::io::uplink::UplinkMode::Sockets,
            node_exit: crate::io::uplink::NodeExit::AfXdp,
        }
    }
}

struct State {
    builder: TableBuilder<PortIo>,
    next_port_id: u32,
    node: Option<cluster::NodeState>,
    services: services::Services,
    policies: policy::Policies,
}

/// A running switch.
pub struct Switch {
    config: SwitchConfig,
    shared: Arc<SharedTables<PortIo>>,
    workers: Vec<Worker>,
    state: Mutex<State>,
    /// MTU for new pods once the node settings fixed it (0: not yet).
    node_mtu: AtomicU32,
    /// The node's sysctls as they were before the first change.
    originals: restore::Originals,
    /// Descriptors an earlier process kept for this one, until their ports take them.
    kept: Mutex<crate::io::handover::Kept>,
    /// The node settings in force came from the record, not yet from the control process.
    node_from_record: std::sync::atomic::AtomicBool,
}

use crate::wire::protocol_name;

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::InvalidRequest, message)
}

impl Switch {
    /// Starts the worker threads with empty tables.
    pub fn start(config: SwitchConfig) -> io::Result<Self> {
        let shared = Arc::new(SharedTables::new(Tables::empty(config.gateway)));
        let load = Arc::new(NodeLoad::new(config.workers.max(1)));
        let workers = (0..config.workers.max(1))
            .map(|i| {
                let pin = (config.steering.pins_workers() && config.workers > 1)
                    .then_some(config.workers);
                let nice = NiceValues {
                    base: config.worker_nice,
                    quiet: config.worker_quiet_nice,
                };
                Worker::spawn(i, shared.clone(), config.spin, pin, nice, load.clone())
            })
            .collect::<io::Result<Vec<_>>>()?;
        spawn_housekeeping(Arc::downgrade(&shared))?;
        Ok(Self {
            state: Mutex::new(State {
                builder: TableBuilder::new(config.gateway),
                next_port_id: 1,
                node: None,
                services: services::Services::default(),
                policies: policy::Policies::default(),
            }),
            node_mtu: AtomicU32::new(0),
            originals: restore::Originals::new(config.sysctl_file.clone()),
            config,
            shared,
            workers,
            kept: Mutex::default(),
            node_from_record: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The tables the workers currently use.
    pub fn tables(&self) -> Arc<Tables<PortIo>> {
        self.shared.load_full()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-changed (changes
        // are applied only after validation), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Carries out one API request.
    pub fn handle(&self, request: Request) -> Result<Reply, ApiError> {
        match request {
            Request::Hello => Ok(Reply::Hello(HelloReply {
                version: api::API_VERSION,
                software: format!("switchyard-dataplane {}", env!("CARGO_PKG_VERSION")),
                workers: self.workers.len(),
                gateway_mac: self.config.gateway.mac,
                gateway_ipv4: self.config.gateway.ipv4,
                gateway_ipv6: self.config.gateway.ipv6,
                pod_cidrs: self.pod_cidrs(),
            })),
            Request::AddPort(spec) => {
                let port = self.add_pod_port(&spec)?;
                self.save_ports();
                self.sync_host_port_rules();
                Ok(Reply::Port(port))
            }
            Request::DelPort(selector) => {
                self.del_port(&selector)?;
                self.save_ports();
                self.sync_host_port_rules();
                Ok(Reply::Done)
            }
            Request::ListPorts => Ok(Reply::Ports(self.list_ports())),
            Request::AddRoute(spec) => {
                let mut state = self.state();
                state.builder.add_route(&spec)?;
                self.publish(&mut state);
                Ok(Reply::Done)
            }
            Request::DelRoute { dst } => {
                let mut state = self.state();
                state.builder.del_route(&dst)?;
                self.publish(&mut state);
                Ok(Reply::Done)
            }
            Request::ListRoutes => Ok(Reply::Routes(self.state().builder.routes())),
            Request::Stats => Ok(Reply::Stats(self.stats())),
            Request::SetNode(spec) => self.set_node(spec).map(|n| Reply::Node(Box::new(n))),
            Request::GetNode => Ok(Reply::Node(Box::new(self.node_status()))),
            Request::GetNodeDigest => Ok(Reply::NodeDigest(self.node_digest())),
            Request::GetNat => Ok(Reply::Nat(self.nat_status())),
            Request::ListConntrack { pod, protocol } => self
                .conntrack_entries(pod, protocol.as_deref())
                .map(Reply::Conntrack),
            Request::ApplyServices {
                upsert,
                remove,
                replace,
                maglev_table_size,
            } => self.apply_services(upsert, &remove, replace, maglev_table_size),
            Request::ListServices => Ok(self.list_services()),
            Request::ListServiceFlows { service } => Ok(self.service_flows(service.as_ref())),
            Request::ApplyPolicies(set) => self.apply_policies(set),
            Request::ListPolicies => Ok(self.list_policies()),
            Request::Trace(request) => self.trace(&request).map(Reply::Trace),
            Request::ListDeniedFlows => Ok(self.denied_flows()),
        }
    }

    fn publish(&self, state: &mut State) {
        self.shared.publish(state.builder.build());
    }

    fn list_ports(&self) -> Vec<PortInfo> {
        self.state()
            .builder
            .ports()
            .map(|p| p.info.clone())
            .collect()
    }

    /// Validates an add-port request; returns the MAC and MTU to use.
    fn validate(&self, spec: &AddPort) -> Result<(MacAddr, u32), ApiError> {
        let name = spec.ifname.as_str();
        if name.is_empty()
            || name.len() > 15
            || name == "."
            || name == ".."
            || name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        {
            return Err(invalid(format!(
                "invalid interface name {name:?}: use 1 to 15 characters without '/', ':' or spaces"
            )));
        }
        if spec.ips.is_empty() {
            return Err(invalid("a port needs at least one IP address"));
        }
        for m in &spec.port_mappings {
            if m.host_port == 0 || m.container_port == 0 {
                return Err(invalid(format!(
                    "port mapping {}:{} needs two non-zero ports",
                    m.host_port, m.container_port
                )));
            }
            if !matches!(m.protocol.to_ascii_lowercase().as_str(), "tcp" | "udp") {
                return Err(invalid(format!(
                    "port mapping protocol {:?} is not tcp or udp",
                    m.protocol
                )));
            }
            if !spec.ips.iter().any(|ip| ip.addr().is_ipv4()) {
                return Err(invalid("hostPort needs an IPv4 pod address"));
            }
        }
        for (i, ip) in spec.ips.iter().enumerate() {
            let addr = ip.addr();
            let bad = match addr {
                IpAddr::V4(a) => {
                    a.is_unspecified()
                        || a.is_multicast()
                        || a.is_broadcast()
                        || a.is_loopback()
                        || a.is_link_local()
                }
                IpAddr::V6(a) => {
                    a.is_unspecified()
                        || a.is_multicast()
                        || a.is_loopback()
                        || a.is_unicast_link_local()
                }
            };
            if bad {
                return Err(invalid(format!("{addr} cannot be a pod address (unspecified, multicast, loopback or link-local)")));
            }
            if ip.network() == addr && ip.prefix_len() < ip.max_prefix_len() && ip.prefix_len() < 31
            {
                return Err(invalid(format!(
                    "{ip} is a network address, not a host address"
                )));
            }
            if spec.ips[..i].iter().any(|o| o.addr() == addr) {
                return Err(invalid(format!("address {addr} is listed twice")));
            }
        }
        let mtu = spec
            .mtu
            .unwrap_or(match self.node_mtu.load(Ordering::Relaxed) {
                0 => self.config.default_mtu,
                node => node,
            });
        let min_mtu = if spec.ips.iter().any(|ip| ip.addr().is_ipv6()) {
            1280
        } else {
            576
        };
        if !(min_mtu..=65_521).contains(&mtu) {
            return Err(invalid(format!(
                "MTU {mtu} is out of range {min_mtu}..=65521"
            )));
        }
        let mac = match spec.mac {
            Some(mac)
                if mac.is_multicast()
                    || mac == MacAddr::default()
                    || mac == self.config.gateway.mac =>
            {
                return Err(invalid(format!(
                    "MAC {mac} cannot be a pod's (multicast, zero or the gateway's)"
                )));
            }
            Some(mac) => mac,
            None => derive_mac(&spec.ips),
        };
        Ok((mac, mtu))
    }

    /// Creates a pod's port (of the kind the spec names, else the dataplane's
    /// `--pod-ports`) in the pod's namespace and starts forwarding for it.
    pub fn add_pod_port(&self, spec: &AddPort) -> Result<PortInfo, ApiError> {
        let (mac, mtu) = self.validate(spec)?;
        let netns = Path::new(&spec.netns);
        if !netns.exists() {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("network namespace {} does not exist", spec.netns),
            ));
        }
        let mut state = self.state();
        state
            .builder
            .check_new_port(&spec.netns, &spec.ifname, &spec.ips, &spec.port_mappings)?;
        let kind = spec.kind.unwrap_or(self.config.pod_ports);
        let config = PodInterface {
            ifname: spec.ifname.clone(),
            mac,
            mtu,
            ips: spec.ips.clone(),
            gateway: self.config.gateway,
            steering: self.config.steering,
            // Only a TAP's pod builds super-frames.
            gso_max_size: state
                .node
                .as_ref()
                .filter(|n| n.segments_over_udp() && kind == PodPorts::Tap)
                .map(|_| crate::io::interface::gso_max_for_overlay(mtu)),
        };
        let workers = self.workers.len();
        let created = match kind {
            PodPorts::Tap => TapDevice::create(netns, &config, workers).map(|(tap, ifindex)| {
                let uso = tap.offloads() & TUN_F_USO == TUN_F_USO;
                (PortIo::Tap(tap), ifindex, uso)
            }),
            PodPorts::Afxdp => AfXdpPort::create(netns, &spec.netns, &config, workers)
                .map(|(port, ifindex)| (PortIo::AfXdp(port), ifindex, false)),
        };
        let (io, ifindex, uso) = created.map_err(|err| {
            let code = match err.kind() {
                io::ErrorKind::AlreadyExists => ErrorCode::Conflict,
                io::ErrorKind::InvalidInput => ErrorCode::InvalidRequest,
                io::ErrorKind::NotFound => ErrorCode::NotFound,
                _ => ErrorCode::System,
            };
            ApiError::new(
                code,
                format!(
                    "cannot create the {} port {} in {}: {err}",
                    kind.name(),
                    spec.ifname,
                    spec.netns
                ),
            )
        })?;
        self.insert_port(&mut state, spec, (mac, mtu, ifindex), io, uso)
    }

    /// Adds an in-memory port (tests, benchmarks, fuzzing); returns it and the pod's end.
    /// `udp_gso`: whether the peer accepts UDP GSO super-frames, as a TAP with USO does.
    pub fn add_memory_port(
        &self,
        spec: &AddPort,
        udp_gso: bool,
    ) -> Result<(PortInfo, MemoryPeer), ApiError> {
        let (mac, mtu) = self.validate(spec)?;
        let mut state = self.state();
        state
            .builder
            .check_new_port(&spec.netns, &spec.ifname, &spec.ips, &spec.port_mappings)?;
        let (port, peer) = memory::pair(1024);
        let info = self.insert_port(
            &mut state,
            spec,
            (mac, mtu, 0),
            PortIo::Memory(port),
            udp_gso,
        )?;
        Ok((info, peer))
    }

    /// Publishes a port whose device exists. `link` is (MAC, MTU, ifindex).
    fn insert_port(
        &self,
        state: &mut State,
        spec: &AddPort,
        link: (MacAddr, u32, u32),
        io: PortIo,
        accepts_udp_gso: bool,
    ) -> Result<PortInfo, ApiError> {
        let (mac, mtu, ifindex) = link;
        let id = state.next_port_id;
        let queues = io.queues();
        let info = PortInfo {
            id,
            kind: io.kind().into(),
            netns: spec.netns.clone(),
            ifname: spec.ifname.clone(),
            ifindex,
            mac,
            mtu,
            ips: spec.ips.clone(),
            owner: spec.owner.clone(),
            pod: spec.pod.clone(),
            queues,
            port_mappings: spec.port_mappings.clone(),
        };
        let port = Arc::new(Port {
            id,
            mac,
            mtu,
            ipv4: spec
                .ips
                .iter()
                .filter_map(|n| match n {
                    IpNet::V4(n) => Some(n.addr()),
                    _ => None,
                })
                .collect(),
            ipv6: spec
                .ips
                .iter()
                .filter_map(|n| match n {
                    IpNet::V6(n) => Some(n.addr()),
                    _ => None,
                })
                .collect(),
            device: io,
            role: PortRole::Pod,
            accepts_udp_gso,
            counters: PortCounters::default(),
            info: info.clone(),
        });
        self.publish_port(state, port)?;
        state.next_port_id += 1;
        Ok(info)
    }

    /// Adds a port whose device is open to the tables and the workers' polls; undoes both
    /// when polling fails.
    fn publish_port(&self, state: &mut State, port: Arc<Port<PortIo>>) -> Result<(), ApiError> {
        state.builder.insert_port(port.clone());
        self.publish(state);
        if let Err(err) = self.workers.iter().try_for_each(|w| w.watch(&port)) {
            self.workers.iter().for_each(|w| w.unwatch(&port));
            state.builder.remove_port(port.id);
            self.publish(state);
            return Err(ApiError::new(
                ErrorCode::System,
                format!("cannot poll the new port: {err}"),
            ));
        }
        Ok(())
    }

    /// Removes a port from the workers' polls and the tables.
    fn unpublish_port(&self, state: &mut State, port: &Port<PortIo>) {
        self.workers.iter().for_each(|w| w.unwatch(port));
        state.builder.remove_port(port.id);
        self.publish(state);
    }

    /// Removes a port; its device goes away once no worker uses it any more.
    pub fn del_port(&self, selector: &PortSelector) -> Result<PortInfo, ApiError> {
        let mut state = self.state();
        let port = match selector {
            PortSelector::Id { id } => state.builder.port(*id),
            PortSelector::Attachment { netns, ifname } => {
                state.builder.find_attachment(netns, ifname)
            }
        }
        .cloned()
        .ok_or_else(|| {
            ApiError::new(
                ErrorCode::NotFound,
                format!("no such port: {}", describe(selector)),
            )
        })?;
        if port.role != PortRole::Pod {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!(
                    "port {} ({}) belongs to the node settings, not to a pod; change them with set_node",
                    port.id, port.info.ifname
                ),
            ));
        }
        self.unpublish_port(&mut state, &port);
        match &port.device {
            // The device goes away with its last descriptor.
            PortIo::Tap(tap) => {
                let _ = tap.set_persist(false);
            }
            PortIo::AfXdp(veth) => {
                if let Err(e) = veth.delete() {
                    tracing::warn!("cannot delete {}: {e}", veth.host_ifname());
                }
            }
            _ => {}
        }
        // Its flows go with it: a pod given the address later must not inherit them (nor
        // replies, nor connections to the published ports it had).
        let addrs: Vec<IpAddr> = port.info.ips.iter().map(IpNet::addr).collect();
        state
            .builder
            .service_flows()
            .remove_where(|f| addrs.contains(&f.original.src) || addrs.contains(&f.backend.0));
        if let Some(m) = state.builder.masquerade() {
            for addr in &port.ipv4 {
                m.conntrack.forget_pod(*addr);
            }
        }
        Ok(port.info.clone())
    }

    /// Counters summed over workers, and per port.
    pub fn stats(&self) -> Stats {
        let mut counters = BTreeMap::new();
        let mut drops = BTreeMap::new();
        for worker in &self.workers {
            for (event, value) in Event::ALL.iter().zip(&worker.stats.events) {
                *counters.entry(event.name().to_string()).or_insert(0) +=
                    value.load(Ordering::Relaxed);
            }
            for (reason, value) in DropReason::ALL.iter().zip(&worker.stats.drops) {
                *drops.entry(reason.name().to_string()).or_insert(0) +=
                    value.load(Ordering::Relaxed);
            }
            *counters.entry("rx_errors".to_string()).or_insert(0) +=
                worker.stats.rx_errors.load(Ordering::Relaxed);
        }
        let tables = self.tables();
        for reason in crate::offload::tunnel::Reject::ALL {
            drops.entry(reason.name().to_string()).or_insert(0);
        }
        for port in tables.ports.values() {
            if let PortIo::Uplink(uplink) = &port.device {
                for (reason, n) in uplink.drops() {
                    *drops.entry(reason.name().to_string()).or_insert(0) += n;
                }
                if let Some(xdp) = uplink.xdp() {
                    let (received, sent) = xdp.frames();
                    *counters.entry("uplink_afxdp_rx_frames".into()).or_insert(0) += received;
                    *counters.entry("uplink_afxdp_tx_frames".into()).or_insert(0) += sent;
                }
            }
        }
        let mut ports: Vec<api::PortCounters> = tables
            .ports
            .values()
            .map(|p| api::PortCounters {
                id: p.id,
                ifname: p.info.ifname.clone(),
                rx_frames: p.counters.rx_frames.load(Ordering::Relaxed),
                rx_bytes: p.counters.rx_bytes.load(Ordering::Relaxed),
                tx_frames: p.counters.tx_frames.load(Ordering::Relaxed),
                tx_bytes: p.counters.tx_bytes.load(Ordering::Relaxed),
                tx_errors: p.counters.tx_errors.load(Ordering::Relaxed),
            })
            .collect();
        ports.sort_by_key(|p| p.id);
        Stats {
            workers: self.workers.len(),
            counters,
            drops,
            ports,
        }
    }

    /// What a metrics scrape shows ([`crate::metrics`]).
    pub fn metrics(&self) -> crate::metrics::Snapshot {
        let stats = self.stats();
        let tables = self.tables();
        let ports = stats
            .ports
            .iter()
            .map(|p| {
                let info = tables.ports.get(&p.id).map(|port| &port.info);
                crate::metrics::PortSample {
                    id: p.id,
                    ifname: p.ifname.clone(),
                    pod: info
                        .and_then(|i| i.pod.clone().or_else(|| i.owner.clone()))
                        .unwrap_or_default(),
                    rx_frames: p.rx_frames,
                    rx_bytes: p.rx_bytes,
                    tx_frames: p.tx_frames,
                    tx_bytes: p.tx_bytes,
                    tx_errors: p.tx_errors,
                }
            })
            .collect();
        let rx_frames = Event::ALL.iter().position(|e| *e == Event::RxFrames);
        let workers = self
            .workers
            .iter()
            .map(|w| crate::metrics::WorkerSample {
                rx_frames: rx_frames.map_or(0, |i| w.stats.events[i].load(Ordering::Relaxed)),
                times: w.stats.work_times(),
            })
            .collect();
        crate::metrics::Snapshot {
            events: stats.counters.into_iter().collect(),
            drops: stats.drops.into_iter().collect(),
            ports,
            workers,
            conntrack: self.nat_status().map(|n| crate::metrics::TableSample {
                entries: n.flows as u64,
                capacity: n.limit as u64,
                early_drops: n.early_drops,
            }),
            service_flows: {
                let flows = &tables.service_flows;
                crate::metrics::TableSample {
                    entries: flows.len() as u64,
                    capacity: flows.limit() as u64,
                    early_drops: flows.early_drops(),
                }
            },
        }
    }

    /// Stops the workers and closes every port (their interfaces disappear), and removes
    /// the routes the node settings added to the node's stack.
    pub fn shutdown(mut self) {
        self.leave_cluster();
        for worker in &mut self.workers {
            worker.stop();
        }
    }
}

/// Once a second, removes expired connection-tracking entries; ends with the switch.
fn spawn_housekeeping(shared: std::sync::Weak<SharedTables<PortIo>>) -> io::Result<()> {
    std::thread::Builder::new()
        .name("sy-housekeeping".into())
        .spawn(move || loop {
            std::thread::sleep(std::time::Duration::from_secs(1));
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let tables = shared.load();
            let now = crate::worker::monotonic_ns();
            if let Some(m) = tables.masquerade.as_deref() {
                m.conntrack.sweep(now);
            }
            // Affinities are kept as long as the longest timeout a Service asks for; each
            // Service checks its own when it reads one.
            tables
                .service_flows
                .sweep(now, tables.services.longest_affinity_ns());
            tables.policy_flows.sweep(now);
        })
        .map(|_| ())
}

fn describe(selector: &PortSelector) -> String {
    match selector {
        PortSelector::Id { id } => format!("id {id}"),
        PortSelector::Attachment { netns, ifname } => format!("{ifname} in {netns}"),
    }
}

/// A stable, locally administered MAC from the pod's first address: `0a:58:` + the IPv4
/// address (as Kubernetes' bridge plugins do), or the last four bytes of the IPv6 one.
fn derive_mac(ips: &[IpNet]) -> MacAddr {
    let v4 = ips.iter().find_map(|n| match n.addr() {
        IpAddr::V4(a) => Some(a.octets()),
        IpAddr::V6(_) => None,
    });
    let octets = v4.unwrap_or_else(|| match ips.first().map(|n| n.addr()) {
        Some(IpAddr::V6(a)) => {
            let o = a.octets();
            [o[12], o[13], o[14], o[15]]
        }
        _ => [0, 0, 0, 1],
    });
    MacAddr::from_ipv4_octets(octets)
}
