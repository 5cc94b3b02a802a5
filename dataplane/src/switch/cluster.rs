//! Carrying out the node settings ([`NodeSpec`]): the host port, the uplink sockets, the
//! routes of the node's own stack, and the dataplane's cluster routes.
//!
//! Order: everything is computed and checked first ([`node::plan`]); then the host port is
//! created (once) and the uplink opened (again only when the encapsulation or the address
//! changed); then the kernel routes are replaced and stale ones removed; then one new
//! snapshot is published. Pushing the same spec again changes nothing.

use super::{State, Switch};
use crate::io::links;
use crate::io::netlink::{KernelRoute, KernelRule, Netlink};
use crate::io::tap::TapDevice;
use crate::io::uplink::{Encap, Uplink, UplinkMode};
use crate::io::PortIo;
use crate::node::{self, KernelVia, NodePlan, UplinkInfo};
use crate::tables::builder::NodePorts;
use crate::tables::{Port, PortCounters, PortRole};
use std::io;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use switchyard_api::{
    ApiError, BackendKind, ErrorCode, IpNet, MacAddr, NodeSpec, NodeStatus, PortInfo,
};

/// MAC of the host port: frames from the node's stack carry it, frames to it are sent to it.
const HOST_MAC: MacAddr = MacAddr([0x0e, 0xee, 0xee, 0x00, 0x00, 0x01]);
/// Source MAC of decapsulated frames (never on a wire).
const UPLINK_MAC: MacAddr = MacAddr([0x0e, 0xee, 0xee, 0x00, 0x00, 0x02]);
/// The kernel's main routing table.
const MAIN_TABLE: u8 = 254;

/// The host port takes any frame the node's stack sends (its own MTU is the pods').
const HOST_PORT_MTU: u32 = 65_521;

/// The node settings in force and what was made of them.
pub(super) struct NodeState {
    pub(super) spec: NodeSpec,
    /// `spec`'s digest, computed once.
    digest: u64,
    plan: NodePlan,
    uplink: UplinkInfo,
    host: Arc<Port<PortIo>>,
    host_ifindex: u32,
    tunnels: Vec<Arc<Port<PortIo>>>,
    kernel_routes: Vec<KernelRoute>,
    rules: Vec<KernelRule>,
    /// Steering rules for ports published to pods (hostPort), kept by
    /// `Switch::sync_host_port_rules`.
    pub(super) host_rules: Vec<KernelRule>,
}

impl NodeState {
    /// The uplink interface's name.
    pub(super) fn uplink_ifname(&self) -> &str {
        &self.uplink.ifname
    }

    /// The node settings in force.
    pub(super) fn spec(&self) -> &NodeSpec {
        &self.spec
    }

    /// The node's address: the masquerade source, and where hostPorts are published.
    pub(super) fn address(&self) -> std::net::Ipv4Addr {
        self.spec.underlay
    }

    /// The AF_XDP path that is the node's exit, if the uplink has one.
    pub(super) fn exit(&self) -> Option<&crate::io::uplink_xdp::XdpPath> {
        self.tunnels.iter().find_map(|port| exit_of(port))
    }

    /// True when traffic to other nodes is sent with `UDP_SEGMENT` (VXLAN).
    pub(super) fn segments_over_udp(&self) -> bool {
        self.spec.backend.kind == BackendKind::Vxlan
    }
}

/// The AF_XDP path of `port`, when it is an uplink that is the node's exit.
fn exit_of(port: &Port<PortIo>) -> Option<&crate::io::uplink_xdp::XdpPath> {
    match &port.device {
        PortIo::Uplink(up) => up.xdp().filter(|xdp| xdp.is_exit()),
        _ => None,
    }
}

fn system(context: &str, err: io::Error) -> ApiError {
    ApiError::new(ErrorCode::System, format!("{context}: {err}"))
}

fn node_port(
    id: u32,
    ifname: &str,
    ifindex: u32,
    mac: MacAddr,
    mtu: u32,
    io: PortIo,
    role: PortRole,
) -> Port<PortIo> {
    let info = PortInfo {
        id,
        kind: io.kind().into(),
        netns: String::new(),
        ifname: ifname.into(),
        ifindex,
        mac,
        mtu,
        ips: Vec::new(),
        owner: Some("node".into()),
        pod: None,
        queues: 1,
        port_mappings: Vec::new(),
    };
    Port {
        id,
        mac,
        mtu,
        ipv4: Vec::new(),
        ipv6: Vec::new(),
        device: io,
        role,
        accepts_udp_gso: false,
        counters: PortCounters::default(),
        info,
    }
}

/// The encapsulations a backend needs: (inner IPv4, inner IPv6) uplinks, the same for VXLAN;
/// direct routing needs one only on an AF_XDP uplink (else the node's kernel routes).
fn encaps(spec: &NodeSpec, mode: UplinkMode) -> Vec<Encap> {
    match spec.backend.kind {
        BackendKind::Vxlan => vec![Encap::Vxlan {
            vni: spec.backend.vni,
            port: spec.backend.port,
        }],
        BackendKind::Ipip => vec![Encap::Ipip { protocol: 4 }, Encap::Ipip { protocol: 41 }],
        BackendKind::Direct if mode == UplinkMode::AfXdp => vec![Encap::Direct],
        BackendKind::Direct => Vec::new(),
    }
}

impl Switch {
    /// This node's pod CIDRs: from the node settings, else from `--pod-cidr`.
    pub(super) fn pod_cidrs(&self) -> Vec<IpNet> {
        match &self.state().node {
            Some(node) => node.spec.pod_cidrs.clone(),
            None => self.config.pod_cidrs.clone(),
        }
    }

    /// The digest of the node settings in force.
    pub fn node_digest(&self) -> Option<u64> {
        if self
            .node_from_record
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            // Settings applied from the record at start: the control process must push
            // them once, so that it also pushes again what was not recorded (Services,
            // policies).
            return None;
        }
        self.state().node.as_ref().map(|n| n.digest)
    }

    /// The node settings in force.
    pub fn node_status(&self) -> NodeStatus {
        status(self.state().node.as_ref(), &self.config.host_ifname)
    }

    /// Joins the cluster as `spec` says, or moves to it from the settings in force. A first
    /// join that fails part-way takes back the ports it opened (the host port, the
    /// uplinks), so that a later attempt starts from nothing.
    pub fn set_node(&self, spec: NodeSpec) -> Result<NodeStatus, ApiError> {
        self.node_from_record
            .store(false, std::sync::atomic::Ordering::Relaxed);
        let mut state = self.state();
        if state.node.as_ref().is_some_and(|n| n.spec == spec) {
            return Ok(status(state.node.as_ref(), &self.config.host_ifname));
        }
        let first = state.node.is_none();
        let before: std::collections::HashSet<u32> = state.builder.ports().map(|p| p.id).collect();
        let result = self.join(&mut state, spec);
        if result.is_err() && first {
            let opened: Vec<Arc<Port<PortIo>>> = state
                .builder
                .ports()
                .filter(|p| !before.contains(&p.id) && p.role != PortRole::Pod)
                .cloned()
                .collect();
            for port in &opened {
                if let PortIo::Tap(tap) = &port.device {
                    // The host port is persistent: it goes with its last descriptor only
                    // when told.
                    let _ = tap.set_persist(false);
                }
                self.unpublish_port(&mut state, port);
            }
        }
        if let (Ok(_), Some(node)) = (&result, &state.node) {
            self.save_node(node.spec());
        }
        drop(state);
        if result.is_ok() {
            self.sync_host_port_rules();
            if first {
                // Only now, with this process's rules in place, go the rules an earlier
                // process left that nothing wants any more: a rule still wanted is never
                // missing, so no connection it steers meets the node's stack meanwhile.
                let state = self.state();
                if let Some(node) = &state.node {
                    let wanted: Vec<_> = node.rules.iter().chain(&node.host_rules).collect();
                    super::egress::remove_leftover_rules_except(&wanted);
                }
            }
        }
        result
    }

    /// [`Switch::set_node`]'s work, under the state's lock.
    fn join(&self, state: &mut State, spec: NodeSpec) -> Result<NodeStatus, ApiError> {
        let uplink = find_uplink(&spec)?;
        let mut plan = node::plan(&spec, &uplink)?;
        let mode = self.config.uplink_mode;
        if mode == UplinkMode::AfXdp {
            node::carry_direct_v4(&mut plan, &spec);
        }
        let uplink_index = crate::io::netns::link_index(&uplink.ifname).unwrap_or(0);

        let (host, host_ifindex) = match &state.node {
            Some(n) => (n.host.clone(), n.host_ifindex),
            None => self.create_host_port(state, plan.pod_mtu)?,
        };
        Netlink::open()
            .and_then(|mut nl| nl.set_link(host_ifindex, None, Some(plan.pod_mtu)))
            .map_err(|e| system("cannot set the host port's MTU", e))?;

        let mut old_tunnels: Vec<Arc<Port<PortIo>>> = state
            .node
            .as_ref()
            .map(|n| n.tunnels.clone())
            .unwrap_or_default();
        let same_uplink = state.node.as_ref().is_some_and(|n| {
            let direct = encaps(&spec, mode).contains(&Encap::Direct);
            n.spec.underlay == spec.underlay
                    && encaps(&n.spec, mode) == encaps(&spec, mode)
                    // The AF_XDP program of direct routing takes the node's pod CIDR.
                    && (!direct || n.spec.pod_cidrs == spec.pod_cidrs)
        });
        let tunnels = if same_uplink {
            old_tunnels.clone()
        } else {
            if mode == UplinkMode::AfXdp {
                // Only one XDP program fits a device, and one AF_XDP socket a queue: the
                // old uplinks go first (out of the workers' polls before their sockets
                // close, so that no descriptor number a new socket reuses is unwatched).
                if let Some(node) = state.node.as_mut() {
                    node.tunnels.clear();
                }
                for port in old_tunnels.drain(..) {
                    self.unpublish_port(state, &port);
                    if let PortIo::Uplink(up) = &port.device {
                        up.detach_xdp()
                            .map_err(|e| system("cannot detach the old uplink's XDP program", e))?;
                    }
                }
            }
            self.open_tunnels(state, &spec, plan.pod_mtu)?
        };
        for port in &tunnels {
            if let PortIo::Uplink(up) = &port.device {
                up.set_peers(plan.peer_underlays.clone());
            }
        }

        let gateway = self.config.gateway;
        let mut kernel_routes = vec![KernelRoute {
            dst: crate::tables::builder::host_net(IpAddr::V4(gateway.ipv4)),
            oif: host_ifindex,
            gateway: None,
            src: None,
            table: MAIN_TABLE,
        }];
        for (dst, (via, src)) in &plan.kernel_routes {
            let (oif, gw) = match via {
                KernelVia::HostPort => (
                    host_ifindex,
                    if dst.addr().is_ipv4() {
                        IpAddr::V4(gateway.ipv4)
                    } else {
                        IpAddr::V6(gateway.ipv6)
                    },
                ),
                KernelVia::Uplink(gw) => (uplink_index, *gw),
            };
            kernel_routes.push(KernelRoute {
                dst: *dst,
                oif,
                gateway: Some(gw),
                src: *src,
                table: MAIN_TABLE,
            });
        }
        self.originals
            .set("net.ipv4.ip_forward", "1")
            .map_err(|e| system("forwarding", e))?;
        if kernel_routes.iter().any(|r| r.dst.addr().is_ipv6()) {
            self.originals
                .set("net.ipv6.conf.all.forwarding", "1")
                .map_err(|e| system("forwarding", e))?;
        }
        let mut nl = Netlink::open().map_err(|e| system("netlink", e))?;
        for route in &kernel_routes {
            nl.replace_route(route)
                .map_err(|e| system(&format!("cannot route {} on the node", route.dst), e))?;
        }
        let (rules, steer_route) = self.steer_replies(&spec, &uplink.ifname, host_ifindex)?;
        kernel_routes.push(steer_route);
        if let Some(old) = &state.node {
            for route in old
                .kernel_routes
                .iter()
                .filter(|r| !kernel_routes.contains(r))
            {
                let _ = nl.delete_route(route);
            }
            let stale: Vec<KernelRule> = old
                .rules
                .iter()
                .filter(|r| !rules.contains(r))
                .cloned()
                .collect();
            super::egress::remove_rules(&stale);
        }
        let old_host_rules = state
            .node
            .as_mut()
            .map(|n| std::mem::take(&mut n.host_rules))
            .unwrap_or_default();
        let masquerade = self.masquerading(state.builder.masquerade(), &spec);
        state.builder.set_masquerade(Some(masquerade));
        // Node ports are served on the node addresses the settings name.
        // (Their compiled ports do not depend on the node: all are reused.)
        let previous = state.builder.services().clone();
        let flows = state.builder.service_flows().clone();
        let services =
            state
                .services
                .table(Some(&spec), &previous, Some(&Default::default()), &flows);
        state.builder.set_services(services);
        // Traffic between a pod and its node passes whatever the policies say.
        let policy = state.policies.table(&self.config.gateway, Some(&spec));
        state.builder.set_policy(policy);

        let exit = tunnels.iter().find(|port| exit_of(port).is_some());
        let ports = NodePorts {
            host: Some(host.clone()),
            tunnel_v4: tunnels.first().cloned(),
            tunnel_v6: tunnels.last().cloned(),
            exit: exit.cloned(),
        };
        state.builder.set_cluster(plan.routes.clone(), ports);
        self.publish(state);
        if !same_uplink {
            for port in &old_tunnels {
                self.unpublish_port(state, port);
            }
        }
        self.node_mtu.store(plan.pod_mtu, Ordering::Relaxed);
        state.node = Some(NodeState {
            digest: spec.digest(),
            spec,
            plan,
            uplink,
            host,
            host_ifindex,
            tunnels,
            kernel_routes,
            rules,
            host_rules: old_host_rules,
        });
        Ok(status(state.node.as_ref(), &self.config.host_ifname))
    }

    /// For tests, benchmarks and fuzzing, a node without kernel devices: an in-memory host
    /// port stands for the node's stack (returned: its far end), every IPv4 destination
    /// that is no pod's goes to it, and pod traffic is masqueraded as `node`, except toward
    /// `exempt`, with the default port range.
    pub fn add_memory_node(
        &self,
        node: std::net::Ipv4Addr,
        exempt: &[IpNet],
    ) -> Result<crate::io::memory::MemoryPeer, ApiError> {
        let mut state = self.state();
        let (io, peer) = crate::io::memory::pair(1024);
        let host = self.publish_host_port(&mut state, PortIo::Memory(io), 0)?;
        let default_route = IpNet::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0)
            .map_err(|e| system("default route", io::Error::other(e)))?;
        let routes = [(default_route, switchyard_api::NextHop::Host)]
            .into_iter()
            .collect();
        let ports = NodePorts {
            host: Some(host),
            ..NodePorts::default()
        };
        state.builder.set_cluster(routes, ports);
        let range = switchyard_api::PortRange::default();
        let conntrack = Arc::new(crate::conntrack::Conntrack::new(
            node,
            (range.first, range.last),
            1 << 16,
        ));
        let masquerade = crate::tables::masquerade::Masquerading::new(conntrack, exempt);
        state.builder.set_masquerade(Some(Arc::new(masquerade)));
        self.publish(&mut state);
        Ok(peer)
    }

    fn create_host_port(
        &self,
        state: &mut State,
        mtu: u32,
    ) -> Result<(Arc<Port<PortIo>>, u32), ApiError> {
        let name = &self.config.host_ifname;
        let (tap, ifindex, reattached) = TapDevice::create_host(
            name,
            HOST_MAC,
            mtu,
            self.workers.len(),
            self.kept(&crate::io::handover::host_key(name)),
            self.config.steering,
        )
        .map_err(|e| system(&format!("cannot create the host port {name}"), e))?;
        if reattached {
            tracing::info!("re-attached the host port {name} an earlier process left");
        }
        let port = self.publish_host_port(state, PortIo::Tap(tap), ifindex)?;
        Ok((port, ifindex))
    }

    /// Publishes `io` as the host port (interface `ifindex` in the node's namespace).
    fn publish_host_port(
        &self,
        state: &mut State,
        io: PortIo,
        ifindex: u32,
    ) -> Result<Arc<Port<PortIo>>, ApiError> {
        let port = Arc::new(node_port(
            state.next_port_id,
            &self.config.host_ifname,
            ifindex,
            HOST_MAC,
            HOST_PORT_MTU,
            io,
            PortRole::Host,
        ));
        self.publish_port(state, port.clone())?;
        state.next_port_id += 1;
        Ok(port)
    }

    fn open_tunnels(
        &self,
        state: &mut State,
        spec: &NodeSpec,
        mtu: u32,
    ) -> Result<Vec<Arc<Port<PortIo>>>, ApiError> {
        let mut out: Vec<Arc<Port<PortIo>>> = Vec::new();
        let pods_v4 = spec.pod_cidrs.iter().find_map(|c| match c.trunc() {
            IpNet::V4(n) => Some((n.addr(), n.prefix_len())),
            IpNet::V6(_) => None,
        });
        // Packets leaving the node with its address go out through the AF_XDP uplink
        // when asked to, and only where the main table alone routes them (see
        // egress::routed_by_main_table).
        let exit = self.config.uplink_mode == UplinkMode::AfXdp
            && self.config.node_exit == crate::io::uplink::NodeExit::AfXdp
            && super::egress::routed_by_main_table();
        if self.config.uplink_mode == UplinkMode::AfXdp {
            use crate::io::uplink::NodeExit;
            let way = if exit {
                NodeExit::AfXdp
            } else {
                NodeExit::Kernel
            };
            tracing::info!(
                "masquerade and published ports leave and return through: {}",
                way.name()
            );
        }
        for encap in encaps(spec, self.config.uplink_mode) {
            let name = match encap {
                Encap::Vxlan { .. } => "vxlan",
                Encap::Ipip { protocol: 4 } => "ipip4",
                Encap::Ipip { .. } => "ipip6",
                Encap::Direct => "direct",
            };
            let uplink = Uplink::open(
                encap,
                spec.underlay,
                self.workers.len(),
                UPLINK_MAC,
                self.config.gateway.mac,
                self.kept(&crate::io::handover::uplink_key(name, spec.underlay)),
                self.config.steering.pins_workers() && self.workers.len() > 1,
                self.config.uplink_mode,
                pods_v4,
                exit.then_some(HOST_MAC),
            )
            .map_err(|e| system("cannot open the uplink", e))?;
            let id = state.next_port_id;
            let port = Arc::new(node_port(
                id,
                name,
                0,
                UPLINK_MAC,
                mtu,
                PortIo::Uplink(uplink),
                PortRole::Uplink,
            ));
            if let Err(err) = self.publish_port(state, port.clone()) {
                for opened in &out {
                    self.unpublish_port(state, opened);
                }
                return Err(err);
            }
            state.next_port_id += 1;
            out.push(port);
        }
        Ok(out)
    }

    /// Removes the node's kernel routes (shutdown). The host port and its routes go away
    /// with the process; routes through the uplink (`direct`) would not. (A process that
    /// dies without this leaves them all, and its successor takes them over.)
    pub fn leave_cluster(&self) {
        let state = self.state();
        if let Some(PortIo::Tap(tap)) = state.node.as_ref().map(|n| &n.host.device) {
            let _ = tap.set_persist(false);
        }
        if let (Some(node), Ok(mut nl)) = (&state.node, Netlink::open()) {
            super::egress::remove_rules(&node.rules);
            super::egress::remove_rules(&node.host_rules);
            for route in &node.kernel_routes {
                let _ = nl.delete_route(route);
            }
            // The steering rules are gone: the local table's rule goes back to first.
            if let Err(e) = super::restore::restore_local_rule(&mut nl) {
                tracing::warn!("cannot move the local table's rule back: {e}");
            }
        }
    }
}

fn status(node: Option<&NodeState>, host_ifname: &str) -> NodeStatus {
    match node {
        None => NodeStatus {
            spec: None,
            uplink: None,
            uplink_mtu: None,
            pod_mtu: None,
            host_ifname: None,
        },
        Some(n) => NodeStatus {
            spec: Some(n.spec.clone()),
            uplink: Some(n.uplink.ifname.clone()),
            uplink_mtu: Some(n.uplink.mtu),
            pod_mtu: Some(n.plan.pod_mtu),
            host_ifname: Some(host_ifname.to_string()),
        },
    }
}

/// Finds the uplink: the interface named in the spec, or the one holding the underlay
/// address.
fn find_uplink(spec: &NodeSpec) -> Result<node::UplinkInfo, ApiError> {
    let system = |e: std::io::Error| ApiError::new(ErrorCode::System, e.to_string());
    let all = links::addresses().map_err(system)?;
    let ifname = match &spec.uplink {
        Some(name) => name.clone(),
        None => all
            .iter()
            .find(|a| a.net.addr() == IpAddr::V4(spec.underlay))
            .map(|a| a.ifname.clone())
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NotFound,
                    format!(
                        "node {}: no interface holds its address {}; check the Node's InternalIP or name the uplink (--uplink IFACE)",
                        spec.name, spec.underlay
                    ),
                )
            })?,
    };
    let mtu = links::mtu(&ifname).map_err(|e| {
        ApiError::new(
            ErrorCode::NotFound,
            format!("uplink {ifname}: {e}; name an existing interface with --uplink"),
        )
    })?;
    let prefixes = all
        .into_iter()
        .filter(|a| a.ifname == ifname)
        .map(|a| a.net.trunc())
        .collect();
    Ok(node::UplinkInfo {
        ifname,
        mtu,
        prefixes,
    })
}
