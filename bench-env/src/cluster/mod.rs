//! Multi-node testbeds: node namespaces on an underlay (one L2 segment, or two subnets
//! joined by a router namespace), pods attached on each node through a CNI plugin, and
//! either Switchyard (a dataplane and a `switchyard-control run` agent per node, all
//! agents reading one manifests directory) or the kernel in flannel's VXLAN layout (a
//! bridge per node, a kernel `vxlan` device, static routes, neighbours and fdb entries).
//!
//! Addresses: node `i` is `192.168.S.(10+i)` and `fd00:S::(10+i)` on subnet S (1, or 1 and
//! 2 alternately when routed; the router is `.1` / `::1`); its pod CIDRs are
//! `10.244.i.0/24` and `fd00:244:0:i::/64` (the control process allocates them from
//! `clusterCIDR` in node-name order; the kernel arm uses the same).

mod kernel;
mod kubelet;
mod pods;
mod switchyard;
mod underlay;

pub(crate) use underlay::{bridge, wire};

use crate::cleanup::{self, Resource};
use crate::netns::Netns;
use crate::process::Process;
use crate::testbed::{cni_call, result_addresses, unique_prefix, Arm, Pod, CNI_BIN_DIR};
use crate::tools::find_binary;
use crate::{fail, Result};
pub use kubelet::{KubeNode, NODE_IMAGES};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use switchyard::wait_for_api;
use switchyard_api::{BackendKind, Client};
use underlay::{address_on_subnet, default_via_hub};

/// How the nodes are connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Underlay {
    /// One L2 segment (a bridge in a hub namespace).
    Flat,
    /// Two subnets joined by a router namespace; nodes alternate between them.
    Routed,
}

/// What to build.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Number of nodes.
    pub nodes: usize,
    /// Pods on each node.
    pub pods_per_node: usize,
    /// Encapsulation between nodes (Switchyard arm; the kernel arm is flannel's VXLAN).
    pub backend: BackendKind,
    /// Underlay layout.
    pub underlay: Underlay,
    /// Pod MTU written into the CNI configuration (default: the node's, from the uplink).
    pub pod_mtu: Option<u32>,
    /// Dataplane worker threads.
    pub workers: Option<usize>,
    /// Extra arguments for `switchyard-dataplane`.
    pub dataplane_args: Vec<String>,
    /// An external network outside the cluster (a subnet behind the node's static route): the hub routes between the
    /// nodes' subnet and `192.168.2.0/24` (`192.168.3.0/24` with a routed underlay), where
    /// the external host `.10` lives; the nodes reach it by a static route, and nobody
    /// outside the cluster knows the pod CIDRs.
    pub external: bool,
    /// `masquerade.conntrackMax` in the cluster configuration (default: the dataplane's).
    pub conntrack_max: Option<usize>,
    /// `routes` in the cluster configuration: (destination, next hop).
    pub routes: Vec<(String, String)>,
    /// Keep the cluster's state in a real kube-apiserver (in the hub namespace, on the
    /// underlay) instead of a manifests directory: the agents watch it, the test writes
    /// to it with kubectl, and Nodes carry their pod CIDRs in `spec.podCIDRs`.
    pub api_server: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 2,
            pods_per_node: 1,
            backend: BackendKind::Vxlan,
            underlay: Underlay::Flat,
            pod_mtu: None,
            workers: None,
            dataplane_args: Vec::new(),
            external: false,
            conntrack_max: None,
            routes: Vec::new(),
            api_server: false,
        }
    }
}

/// One simulated node.
pub struct SimNode {
    // Field order is drop order: processes, then pods, then the namespace.
    control: Option<Process>,
    dataplane: Option<Process>,
    /// Its pods.
    pub pods: Vec<Pod>,
    /// Its namespace.
    pub ns: Netns,
    /// Node name (`node<i>`).
    pub name: String,
    /// Index in the cluster.
    pub index: usize,
    /// Underlay IPv4 address.
    pub ipv4: Ipv4Addr,
    /// Underlay IPv6 address.
    pub ipv6: Ipv6Addr,
    /// Dataplane API socket (Switchyard arm).
    pub api: PathBuf,
    /// Dataplane log.
    pub dataplane_log: PathBuf,
    /// Control process log.
    pub control_log: PathBuf,
}

impl SimNode {
    /// The dataplane's process id.
    pub fn dataplane_pid(&self) -> Option<u32> {
        self.dataplane.as_ref().map(Process::id)
    }

    /// The control process's id.
    pub fn control_pid(&self) -> Option<u32> {
        self.control.as_ref().map(Process::id)
    }

    /// A client of this node's dataplane.
    pub fn client(&self) -> Result<Client> {
        Ok(Client::connect(&self.api)?)
    }

    /// Runs `switchyard-control --api <this node's socket> ARGS`; returns whether it
    /// succeeded and its stdout, followed by its stderr when it failed.
    pub fn control(&self, args: &[&str]) -> Result<(bool, String)> {
        let out = std::process::Command::new(find_binary("switchyard-control")?)
            .arg("--api")
            .arg(&self.api)
            .args(args)
            .output()?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            text.push_str(&String::from_utf8_lossy(&out.stderr));
        }
        Ok((out.status.success(), text))
    }

    /// The dataplane's and the control process's logs.
    pub fn logs(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!(
            "--- {} dataplane ---\n{}--- {} control ---\n{}",
            self.name,
            read(&self.dataplane_log),
            self.name,
            read(&self.control_log)
        )
    }
}

/// A built multi-node testbed; dropping it removes everything.
pub struct Cluster {
    /// Which datapath.
    pub arm: Arm,
    /// The nodes.
    pub nodes: Vec<SimNode>,
    /// The nodes of a real cluster: containerd and a kubelet each, Switchyard installed
    /// by its DaemonSet ([`Cluster::start_kube_node`]).
    pub kube_nodes: Vec<KubeNode>,
    /// The hub (switch or router) namespace.
    pub hub: Netns,
    /// The manifests directory every control process reads.
    pub manifests: PathBuf,
    /// Name prefix of everything this testbed made.
    pub prefix: String,
    /// The external host (with `ClusterOptions::external`).
    pub external: Option<Pod>,
    /// The API server (with `ClusterOptions::api_server`).
    pub api: Option<crate::kube::ApiServer>,
    /// The kubeconfig agents started from now on use (default: the administrator's).
    agent_kubeconfig: Option<PathBuf>,
    options: ClusterOptions,
    keys: Vec<u64>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.kube_nodes.clear();
        self.nodes.clear();
        self.external.take();
        self.api.take();
        // Newest first: a mountpoint's parent after the mountpoint.
        for key in self.keys.drain(..).rev() {
            cleanup::release(key);
        }
    }
}

/// Pod CIDRs of node `i`: (IPv4, IPv6) networks, as the allocator hands them out.
pub fn pod_cidrs(i: usize) -> (String, String) {
    (format!("10.244.{i}.0/24"), format!("fd00:244:0:{i:x}::/64"))
}

/// The IPv4 cluster CIDR of the testbeds.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
const CLUSTER_CIDR_V6: &str = "fd00:244::/56";

impl Cluster {
    /// Builds the arm asked for.
    pub fn build(arm: Arm, options: &ClusterOptions) -> Result<Self> {
        crate::tools::ensure_cni_plugins()?;
        let prefix = unique_prefix();
        let hub = Netns::create(&format!("{prefix}-hub"))?;
        match options.underlay {
            Underlay::Flat => bridge(&hub, "br0", None)?,
            Underlay::Routed => {
                bridge(&hub, "br1", Some(("192.168.1.1/24", "fd00:1::1/64")))?;
                bridge(&hub, "br2", Some(("192.168.2.1/24", "fd00:2::1/64")))?;
                hub.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
                hub.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
            }
        }
        let manifests = std::env::temp_dir().join(format!("{prefix}-manifests"));
        std::fs::create_dir_all(&manifests)?;
        let mut cluster = Self {
            arm,
            nodes: Vec::new(),
            kube_nodes: Vec::new(),
            hub,
            keys: vec![cleanup::register(Resource::Dir(manifests.clone()))],
            manifests,
            external: None,
            api: None,
            agent_kubeconfig: None,
            options: options.clone(),
            prefix,
        };
        if options.api_server {
            if options.underlay != Underlay::Flat {
                return Err(fail!("the API server testbed needs the flat underlay"));
            }
            cluster
                .hub
                .add_address("br0", &format!("{}/24", crate::kube::ADDRESS))?;
            cluster.api = Some(crate::kube::ApiServer::start(
                &cluster.hub,
                &cluster.prefix,
            )?);
        }
        cluster.write_config()?;
        if options.external {
            cluster.add_external()?;
        }
        for i in 0..options.nodes {
            cluster.start_node(i)?;
        }
        match arm {
            Arm::Switchyard => {
                for i in 0..options.nodes {
                    cluster.write_node_manifest(i)?;
                }
                for i in 0..options.nodes {
                    let waited =
                        cluster.wait_for_peers(i, options.nodes - 1, Duration::from_secs(10));
                    if let (Err(e), Some(api)) = (&waited, &cluster.api) {
                        let nodes = api.kubectl(&cluster.hub, &["get", "nodes", "-o", "wide"]);
                        return Err(fail!(
                            "{e}\nthe API server's Nodes: {nodes:?}\n{}",
                            cluster.logs()
                        ));
                    }
                    waited?;
                }
            }
            Arm::Kernel => cluster.flannel_routes()?,
        }
        for i in 0..options.nodes {
            for p in 0..options.pods_per_node {
                cluster.add_pod(i, p)?;
            }
        }
        Ok(cluster)
    }

    /// Creates node `i`'s namespace on the underlay and, for Switchyard, starts its
    /// dataplane and control process (without writing its Node manifest).
    pub fn start_node(&mut self, i: usize) -> Result<()> {
        let name = format!("node{i}");
        let ns = Netns::create(&format!("{}-n{i}", self.prefix))?;
        let s = self.subnet(i);
        let port = format!("n{i}");
        let bridge = match self.options.underlay {
            Underlay::Flat => "br0".to_string(),
            Underlay::Routed => format!("br{s}"),
        };
        self.wire_to_hub(&ns, &port, Some(&bridge))?;
        let (ipv4, ipv6) = address_on_subnet(&ns, s, 10 + i as u8)?;
        if self.options.external && self.options.underlay == Underlay::Flat {
            // The node reaches the external subnet by a static route.
            self.route_to_external(&ns)?;
        }
        if self.options.underlay == Underlay::Routed {
            default_via_hub(&ns, s)?;
            ns.exec(&[
                "ip",
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:{s}::1"),
            ])?;
        }
        let file = |what: &str| std::env::temp_dir().join(format!("{}-{name}.{what}", self.prefix));
        let (api, dataplane_log, control_log) =
            (file("sock"), file("dataplane.log"), file("control.log"));
        let state = switchyard_dataplane::StateFiles::beside(&api);
        for f in [&api, &dataplane_log, &control_log]
            .map(|f| f.as_path())
            .into_iter()
            .chain(state.all())
        {
            self.keys
                .push(cleanup::register(Resource::File(f.to_path_buf())));
        }
        self.keys
            .push(cleanup::register(Resource::Holder(state.handover.clone())));
        self.keys
            .push(cleanup::register(Resource::Dir(self.ipam_dir(&name))));
        let mut node = SimNode {
            control: None,
            dataplane: None,
            pods: Vec::new(),
            ns,
            name,
            index: i,
            ipv4,
            ipv6,
            api,
            dataplane_log,
            control_log,
        };
        if self.arm == Arm::Switchyard {
            node.dataplane = Some(self.spawn_dataplane(&node)?);
            wait_for_api(&node, Duration::from_secs(10))?;
            node.control = Some(self.spawn_control(&node)?);
        }
        self.nodes.push(node);
        Ok(())
    }

    /// Everyone's logs, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes.iter().map(SimNode::logs).collect()
    }
}

/// Panics, naming the failed pings and with the nodes' logs, unless every ping of
/// [`connectivity`] is answered (`when` says at which step of a test); returns the matrix.
pub fn assert_connected(cluster: &Cluster, when: &str) -> crate::measure::Matrix {
    let m = connectivity(cluster);
    assert!(
        m.failures.is_empty(),
        "{when}: {} of {} pings failed: {:?}\n{}",
        m.failures.len(),
        m.attempted,
        m.failures,
        cluster.logs()
    );
    m
}

/// The cluster matrix: every pod pings every other pod (same node and across nodes), every
/// node pings every pod of the other nodes, and every pod pings every other node, over IPv4
/// and IPv6; with an external network, every pod pings the external host too.
pub fn connectivity(cluster: &Cluster) -> crate::measure::Matrix {
    let mut m = crate::measure::Matrix::default();
    let pods: Vec<(usize, usize, &Pod)> = cluster
        .nodes
        .iter()
        .flat_map(|n| n.pods.iter().enumerate().map(move |(k, p)| (n.index, k, p)))
        .collect();
    for &(i, k, from) in &pods {
        let label = format!("node{i}/pod{k}");
        for &(j, l, to) in &pods {
            if (i, k) != (j, l) {
                for addr in [IpAddr::V4(to.ipv4), IpAddr::V6(to.ipv6)] {
                    m.ping(&from.ns, &label, addr);
                }
            }
        }
        for node in cluster.nodes.iter().filter(|n| n.index != i) {
            for addr in [IpAddr::V4(node.ipv4), IpAddr::V6(node.ipv6)] {
                m.ping(&from.ns, &label, addr);
            }
        }
    }
    for node in &cluster.nodes {
        for &(_, _, to) in pods.iter().filter(|(j, _, _)| *j != node.index) {
            for addr in [IpAddr::V4(to.ipv4), IpAddr::V6(to.ipv6)] {
                m.ping(&node.ns, &node.name, addr);
            }
        }
    }
    if let Some(ext) = &cluster.external {
        // Every pod reaches the external host (IPv4, masqueraded).
        for &(i, k, from) in &pods {
            m.ping(&from.ns, &format!("node{i}/pod{k}"), IpAddr::V4(ext.ipv4));
        }
    }
    m
}
