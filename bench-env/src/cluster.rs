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

use crate::cleanup::{self, Resource};
use crate::netns::Netns;
use crate::process::Process;
use crate::testbed::{cni_call, result_addresses, unique_prefix, Arm, Pod, CNI_BIN_DIR};
use crate::tools::find_binary;
use crate::{fail, Result};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use switchyard_api::{BackendKind, Client};

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
    /// An external network outside the cluster (seed 004): the hub routes between the
    /// nodes' subnet and `192.168.2.0/24` (`192.168.3.0/24` with a routed underlay), where
    /// the external host `.10` lives; the nodes reach it by a static route, and nobody
    /// outside the cluster knows the pod CIDRs.
    pub external: bool,
    /// `masquerade.conntrackMax` in the cluster configuration (default: the dataplane's).
    pub conntrack_max: Option<usize>,
    /// `routes` in the cluster configuration: (destination, next hop).
    pub routes: Vec<(String, String)>,
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

    /// A client of this node's dataplane.
    pub fn client(&self) -> Result<Client> {
        Ok(Client::connect(&self.api)?)
    }

    /// Runs `switchyard-control --api <this node's socket> ARGS`; returns whether it
    /// succeeded and its stdout (stderr in the error when it could not start).
    pub fn control(&self, args: &[&str]) -> Result<(bool, String)> {
        let out = std::process::Command::new(find_binary("switchyard-control")?)
            .arg("--api")
            .arg(&self.api)
            .args(args)
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        ))
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
    /// The hub (switch or router) namespace.
    pub hub: Netns,
    /// The manifests directory every control process reads.
    pub manifests: PathBuf,
    /// Name prefix of everything this testbed made.
    pub prefix: String,
    /// The external host (with `ClusterOptions::external`).
    pub external: Option<Pod>,
    options: ClusterOptions,
    keys: Vec<u64>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.nodes.clear();
        self.external.take();
        for key in self.keys.drain(..) {
            cleanup::release(key);
        }
    }
}

/// Pod CIDRs of node `i`: (IPv4, IPv6) networks, as the allocator hands them out.
pub fn pod_cidrs(i: usize) -> (String, String) {
    (format!("10.244.{i}.0/24"), format!("fd00:244:0:{i:x}::/64"))
}

const CLUSTER_CIDR: &str = "10.244.0.0/16";
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
            hub,
            keys: vec![cleanup::register(Resource::Dir(manifests.clone()))],
            manifests,
            prefix,
            external: None,
            options: options.clone(),
        };
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
                    cluster.wait_for_peers(i, options.nodes - 1, Duration::from_secs(10))?;
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

    /// The external subnet's third octet.
    fn external_subnet(&self) -> u8 {
        match self.options.underlay {
            Underlay::Flat => 2,
            Underlay::Routed => 3,
        }
    }

    /// Connects `ns` to the hub: `eth0` in `ns`, `port` in the hub.
    fn wire_to_hub(&self, ns: &Netns, port: &str) -> Result<()> {
        ns.exec(&[
            "ip",
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            port,
            "netns",
            self.hub.name(),
        ])
        .map(|_| ())
    }

    /// The external host: a namespace behind the hub, which routes to it.
    fn add_external(&mut self) -> Result<()> {
        let x = self.external_subnet();
        let ns = Netns::create(&format!("{}-ext", self.prefix))?;
        self.wire_to_hub(&ns, "x0")?;
        let (ipv4, ipv6) = address_on_subnet(&ns, x, 10)?;
        default_via_hub(&ns, x)?;
        let hub = &self.hub;
        hub.add_address("x0", &format!("192.168.{x}.1/24"))?;
        hub.add_address("x0", &format!("fd00:{x}::1/64"))?;
        hub.exec(&["ip", "link", "set", "x0", "up"])?;
        hub.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        if self.options.underlay == Underlay::Flat {
            hub.add_address("br0", "192.168.1.1/24")?;
            hub.add_address("br0", "fd00:1::1/64")?;
        }
        self.external = Some(Pod {
            ns,
            ipv4,
            ipv6,
            port: None,
        });
        Ok(())
    }

    /// Rewrites the cluster configuration with these extra routes (the agents apply them).
    pub fn set_routes(&mut self, routes: Vec<(String, String)>) -> Result<()> {
        self.options.routes = routes;
        self.write_config()
    }

    /// Rewrites the cluster configuration with another backend (the agents apply it).
    pub fn set_backend(&mut self, backend: BackendKind) -> Result<()> {
        self.options.backend = backend;
        self.write_config()
    }

    fn write_config(&self) -> Result<()> {
        let backend = match self.options.backend {
            BackendKind::Vxlan => "vxlan",
            BackendKind::Ipip => "ipip",
            BackendKind::Direct => "direct",
        };
        let mut text = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: switchyard-config\n  namespace: kube-system\ndata:\n  config.yaml: |\n    clusterCIDR: {CLUSTER_CIDR}\n    clusterCIDRv6: {CLUSTER_CIDR_V6}\n    serviceCIDR: 10.96.0.0/12\n    nodeCIDRMaskSizeV6: 64\n    backend:\n      type: {backend}\n"
        );
        if let Some(max) = self.options.conntrack_max {
            text += &format!("    masquerade:\n      conntrackMax: {max}\n");
        }
        if !self.options.routes.is_empty() {
            text += "    routes:\n";
            for (dst, via) in &self.options.routes {
                text += &format!("    - {{dst: {dst}, via: {via}}}\n");
            }
        }
        std::fs::write(self.manifests.join("switchyard-config.yaml"), text)?;
        Ok(())
    }

    /// Writes node `i`'s Node manifest (name and InternalIPs; no podCIDR, so the control
    /// processes allocate one).
    pub fn write_node_manifest(&self, i: usize) -> Result<()> {
        let node = &self.nodes[self.at(i)?];
        let text = format!(
            "apiVersion: v1\nkind: Node\nmetadata:\n  name: {}\nstatus:\n  addresses:\n  - type: InternalIP\n    address: {}\n  - type: InternalIP\n    address: \"{}\"\n  - type: Hostname\n    address: {}\n",
            node.name, node.ipv4, node.ipv6, node.name
        );
        let tmp = self.manifests.join(format!(".{}.tmp", node.name));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.manifests.join(format!("{}.yaml", node.name)))?;
        Ok(())
    }

    fn subnet(&self, i: usize) -> u8 {
        match self.options.underlay {
            Underlay::Flat => 1,
            Underlay::Routed => 1 + (i % 2) as u8,
        }
    }

    /// Creates node `i`'s namespace on the underlay and, for Switchyard, starts its
    /// dataplane and control process (without writing its Node manifest).
    pub fn start_node(&mut self, i: usize) -> Result<()> {
        let name = format!("node{i}");
        let ns = Netns::create(&format!("{}-n{i}", self.prefix))?;
        let s = self.subnet(i);
        let port = format!("n{i}");
        self.wire_to_hub(&ns, &port)?;
        let bridge = match self.options.underlay {
            Underlay::Flat => "br0".to_string(),
            Underlay::Routed => format!("br{s}"),
        };
        self.hub
            .exec(&["ip", "link", "set", &port, "master", &bridge, "up"])?;
        let (ipv4, ipv6) = address_on_subnet(&ns, s, 10 + i as u8)?;
        if self.options.external && self.options.underlay == Underlay::Flat {
            // Seed 004: the node reaches the external subnet by a static route.
            let x = self.external_subnet();
            ns.exec(&[
                "ip",
                "route",
                "add",
                &format!("192.168.{x}.0/24"),
                "via",
                "192.168.1.1",
            ])?;
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
        let state = api.with_extension("ports.json");
        for f in [&api, &state, &dataplane_log, &control_log] {
            self.keys.push(cleanup::register(Resource::File(f.clone())));
        }
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

    fn spawn_dataplane(&self, node: &SimNode) -> Result<Process> {
        let binary = find_binary("switchyard-dataplane")?
            .to_string_lossy()
            .into_owned();
        let api = node.api.to_string_lossy().into_owned();
        let mut argv = vec![binary, "--api".into(), api];
        if let Some(w) = self.options.workers {
            argv.extend(["--workers".into(), w.to_string()]);
        }
        argv.extend(self.options.dataplane_args.iter().cloned());
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        node.ns.spawn(&refs, Some(&node.dataplane_log))
    }

    fn spawn_control(&self, node: &SimNode) -> Result<Process> {
        let binary = find_binary("switchyard-control")?
            .to_string_lossy()
            .into_owned();
        let manifests = self.manifests.to_string_lossy().into_owned();
        let api = node.api.to_string_lossy().into_owned();
        node.ns.spawn(
            &[
                &binary,
                "run",
                "--node",
                &node.name,
                "--manifests",
                &manifests,
                "--dataplane-api",
                &api,
            ],
            Some(&node.control_log),
        )
    }

    /// Where node `i` is in `nodes`.
    fn at(&self, i: usize) -> Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.index == i)
            .ok_or_else(|| fail!("no node {i}"))
    }

    /// Kills node `i`'s dataplane and starts a new one.
    pub fn restart_dataplane(&mut self, i: usize) -> Result<()> {
        let at = self.at(i)?;
        self.nodes[at].dataplane.take();
        let process = self.spawn_dataplane(&self.nodes[at])?;
        self.nodes[at].dataplane = Some(process);
        Ok(())
    }

    /// Kills node `i`'s control process and starts a new one.
    pub fn restart_control(&mut self, i: usize) -> Result<()> {
        let at = self.at(i)?;
        self.nodes[at].control.take();
        let process = self.spawn_control(&self.nodes[at])?;
        self.nodes[at].control = Some(process);
        Ok(())
    }

    /// Waits until node `i`'s dataplane has node settings with `peers` peers.
    pub fn wait_for_peers(&self, i: usize, peers: usize, timeout: Duration) -> Result<Duration> {
        let node = &self.nodes[self.at(i)?];
        let start = Instant::now();
        loop {
            let have = node
                .client()
                .and_then(|mut c| Ok(c.node()?))
                .ok()
                .and_then(|s| s.spec)
                .map(|s| s.peers.len());
            if have == Some(peers) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                return Err(fail!(
                    "node {} did not get settings with {peers} peers within {timeout:?} (has {have:?})\n{}",
                    node.name,
                    node.logs()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Flannel's VXLAN layout in every node: a `vxlan` device with this node's pod CIDRs'
    /// first addresses, and for every other node a route, a neighbour and an fdb entry.
    fn flannel_routes(&self) -> Result<()> {
        let mac = |i: usize| format!("0e:00:00:00:00:{:02x}", i + 1);
        for node in &self.nodes {
            let ns = &node.ns;
            let i = node.index;
            ns.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
            if self.options.external {
                // Flannel's masquerade for traffic leaving the cluster.
                ns.exec(&[
                    "iptables",
                    "-t",
                    "nat",
                    "-A",
                    "POSTROUTING",
                    "-s",
                    CLUSTER_CIDR,
                    "!",
                    "-d",
                    CLUSTER_CIDR,
                    "-j",
                    "MASQUERADE",
                    "--random-fully",
                ])?;
            }
            ns.exec(&[
                "ip",
                "link",
                "add",
                "flannel.1",
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                &node.ipv4.to_string(),
                "dstport",
                "4789",
                "nolearning",
                "dev",
                "eth0",
            ])?;
            ns.exec(&[
                "ip",
                "link",
                "set",
                "flannel.1",
                "address",
                &mac(i),
                "mtu",
                "1450",
                "up",
            ])?;
            ns.add_address("flannel.1", &format!("10.244.{i}.0/32"))?;
            ns.add_address("flannel.1", &format!("fd00:244:0:{i:x}::/128"))?;
            for peer in self.nodes.iter().filter(|p| p.index != i) {
                let j = peer.index;
                let (v4, v6) = pod_cidrs(j);
                let (gw4, gw6) = (format!("10.244.{j}.0"), format!("fd00:244:0:{j:x}::"));
                // Per family: the peer's pod CIDR via its flannel.1 address, which
                // resolves to its VTEP MAC.
                for (cidr, gw) in [(&v4, &gw4), (&v6, &gw6)] {
                    ns.exec(&[
                        "ip",
                        "route",
                        "add",
                        cidr,
                        "via",
                        gw,
                        "dev",
                        "flannel.1",
                        "onlink",
                    ])?;
                    ns.exec(&[
                        "ip",
                        "neigh",
                        "add",
                        gw,
                        "lladdr",
                        &mac(j),
                        "dev",
                        "flannel.1",
                        "nud",
                        "permanent",
                    ])?;
                }
                ns.exec(&[
                    "bridge",
                    "fdb",
                    "append",
                    &mac(j),
                    "dev",
                    "flannel.1",
                    "dst",
                    &peer.ipv4.to_string(),
                ])?;
            }
        }
        Ok(())
    }

    fn ipam_dir(&self, node: &str) -> PathBuf {
        std::env::temp_dir().join(format!("{}-{node}-ipam", self.prefix))
    }

    /// The CNI configuration of node `i`: switchyard-cni with host-local over the node's
    /// pod CIDRs (`usePodCidr`), or the reference bridge plugin over the same ranges.
    fn cni_conf(&self, node: &SimNode) -> Result<(PathBuf, serde_json::Value)> {
        let data_dir = self.ipam_dir(&node.name);
        let (plugin, mut conf, ranges) = match self.arm {
            Arm::Switchyard => (
                find_binary("switchyard-cni")?,
                serde_json::json!({"type": "switchyard", "dataplane_api": node.api}),
                serde_json::json!([[{"subnet": "usePodCidr"}], [{"subnet": "usePodCidrIPv6"}]]),
            ),
            Arm::Kernel => {
                let (v4, v6) = pod_cidrs(node.index);
                (
                    PathBuf::from(CNI_BIN_DIR).join("bridge"),
                    serde_json::json!({"type": "bridge", "bridge": "cni0", "isGateway": true, "isDefaultGateway": true, "mtu": 1450}),
                    serde_json::json!([[{"subnet": v4}], [{"subnet": v6}]]),
                )
            }
        };
        conf["cniVersion"] = serde_json::json!("1.0.0");
        conf["name"] = serde_json::json!(format!("{}-{}", self.prefix, node.name));
        conf["ipam"] =
            serde_json::json!({"type": "host-local", "dataDir": data_dir, "ranges": ranges});
        if let Some(mtu) = self.options.pod_mtu {
            conf["mtu"] = serde_json::json!(mtu);
        }
        Ok((plugin, conf))
    }

    /// Attaches pod `p` of node `i` through the node's CNI plugin.
    pub fn add_pod(&mut self, i: usize, p: usize) -> Result<()> {
        self.add_pod_with(i, p, None)
    }

    /// Attaches pod `p` of node `i` with `runtimeConfig` (e.g. `portMappings`) in the CNI
    /// configuration, as a runtime passes capabilities.
    pub fn add_pod_with(
        &mut self,
        i: usize,
        p: usize,
        runtime_config: Option<serde_json::Value>,
    ) -> Result<()> {
        let at = self.at(i)?;
        let node = &self.nodes[at];
        let ns = Netns::create(&format!("{}-n{i}p{p}", self.prefix))?;
        let (plugin, mut conf) = self.cni_conf(node)?;
        if let Some(rc) = runtime_config {
            conf["runtimeConfig"] = rc;
        }
        let result = cni_call(
            &node.ns,
            &plugin,
            "ADD",
            &format!("{}-n{i}c{p}", self.prefix),
            &ns,
            &conf,
        )
        .map_err(|e| fail!("{e}\n{}", node.logs()))?;
        let (ipv4, ipv6) = result_addresses(&result)?;
        self.nodes[at].pods.push(Pod {
            ns,
            ipv4,
            ipv6,
            port: None,
        });
        Ok(())
    }

    /// Detaches pod `p` of node `i` (CNI DEL) and removes its namespace.
    pub fn del_pod(&mut self, i: usize, p: usize) -> Result<()> {
        let at = self.at(i)?;
        let node = &self.nodes[at];
        let (plugin, conf) = self.cni_conf(node)?;
        let pod = node
            .pods
            .get(p)
            .ok_or_else(|| fail!("no pod {p} on node {i}"))?;
        cni_call(
            &node.ns,
            &plugin,
            "DEL",
            &format!("{}-n{i}c{p}", self.prefix),
            &pod.ns,
            &conf,
        )?;
        self.nodes[at].pods.remove(p);
        Ok(())
    }

    /// Every pod, with the index of its node.
    pub fn pods(&self) -> impl Iterator<Item = (usize, &Pod)> {
        self.nodes
            .iter()
            .flat_map(|n| n.pods.iter().map(move |p| (n.index, p)))
    }

    /// Everyone's logs, for failure messages.
    pub fn logs(&self) -> String {
        self.nodes.iter().map(SimNode::logs).collect()
    }
}

fn bridge(ns: &Netns, name: &str, addrs: Option<(&str, &str)>) -> Result<()> {
    ns.exec(&["ip", "link", "add", name, "type", "bridge"])?;
    if let Some((v4, v6)) = addrs {
        ns.add_address(name, v4)?;
        ns.add_address(name, v6)?;
    }
    ns.exec(&["ip", "link", "set", name, "up"])?;
    Ok(())
}

/// Gives `ns`'s `eth0` host `host` of subnet `subnet` (192.168.`subnet`.`host`/24 and
/// fd00:`subnet`::`host`/64) and brings it up; returns the two addresses.
fn address_on_subnet(ns: &Netns, subnet: u8, host: u8) -> Result<(Ipv4Addr, Ipv6Addr)> {
    let ipv4 = Ipv4Addr::new(192, 168, subnet, host);
    let ipv6 = Ipv6Addr::new(0xfd00, u16::from(subnet), 0, 0, 0, 0, 0, u16::from(host));
    ns.add_address("eth0", &format!("{ipv4}/24"))?;
    ns.add_address("eth0", &format!("{ipv6}/64"))?;
    ns.exec(&["ip", "link", "set", "eth0", "up"])?;
    Ok((ipv4, ipv6))
}

/// The IPv4 default route of `ns`: the hub's address on `subnet` (192.168.`subnet`.1).
fn default_via_hub(ns: &Netns, subnet: u8) -> Result<()> {
    let hub = format!("192.168.{subnet}.1");
    ns.exec(&["ip", "route", "add", "default", "via", &hub])
        .map(|_| ())
}

fn wait_for_api(node: &SimNode, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if node.client().and_then(|mut c| Ok(c.hello()?)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(fail!(
        "the dataplane of {} did not answer within {timeout:?}\n{}",
        node.name,
        node.logs()
    ))
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
        // Seed 004: every pod reaches the external host (IPv4, masqueraded).
        for &(i, k, from) in &pods {
            m.ping(&from.ns, &format!("node{i}/pod{k}"), IpAddr::V4(ext.ipv4));
        }
    }
    m
}
