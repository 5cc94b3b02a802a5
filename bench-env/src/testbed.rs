//! Single-node testbeds: a node namespace and N pod namespaces, wired either through
//! Switchyard (the dataplane runs in the node namespace and creates each pod's TAP through
//! its API) or through the kernel (veth pairs on a Linux bridge, as the reference `bridge`
//! CNI plugin builds them). Pods get the same addresses in both arms.

use crate::cleanup::{self, Resource};
use crate::netns::Netns;
use crate::process::Process;
use crate::tools::find_binary;
use crate::{fail, Result};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use switchyard_api::{AddPort, Client, Reply, Request};

/// Which datapath connects the pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arm {
    /// Switchyard's userspace dataplane with TAP ports.
    Switchyard,
    /// The kernel: veth pairs on a Linux bridge.
    Kernel,
}

impl Arm {
    /// Short name for tables and namespace names.
    pub fn name(self) -> &'static str {
        match self {
            Arm::Switchyard => "switchyard",
            Arm::Kernel => "kernel",
        }
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct Options {
    /// Number of pods.
    pub pods: usize,
    /// MTU of pod `i` is `mtus[i]`, or the last entry for pods beyond the list.
    pub mtus: Vec<u32>,
    /// Dataplane worker threads (default: one per core).
    pub workers: Option<usize>,
    /// Extra arguments for `switchyard-dataplane`.
    pub dataplane_args: Vec<String>,
    /// How pods are attached.
    pub attach: Attach,
}

/// How pods get their interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attach {
    /// Directly: the dataplane's API (Switchyard) or `ip` commands (kernel).
    Direct,
    /// Through CNI plugins called exactly as a runtime calls them: `switchyard-cni`
    /// (Switchyard) or the reference `bridge` (kernel), both with `host-local` IPAM.
    Cni,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            pods: 2,
            mtus: vec![1500],
            workers: None,
            dataplane_args: Vec::new(),
            attach: Attach::Direct,
        }
    }
}

impl Options {
    fn mtu(&self, pod: usize) -> u32 {
        self.mtus
            .get(pod)
            .or(self.mtus.last())
            .copied()
            .unwrap_or(1500)
    }
}

/// A pod: its namespace and addresses.
pub struct Pod {
    /// The pod's network namespace.
    pub ns: Netns,
    /// IPv4 address.
    pub ipv4: Ipv4Addr,
    /// IPv6 address.
    pub ipv6: Ipv6Addr,
    /// Port id in the dataplane (Switchyard arm only).
    pub port: Option<u32>,
}

/// The IPv4 address of pod `i`.
pub fn pod_ipv4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, 10 + i as u8)
}

/// The IPv6 address of pod `i`.
pub fn pod_ipv6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 10 + i as u16)
}

static NEXT_TESTBED: AtomicU32 = AtomicU32::new(0);

/// A unique prefix for names: `sy<pid>t<n>`.
pub fn unique_prefix() -> String {
    format!(
        "sy{}t{}",
        std::process::id(),
        NEXT_TESTBED.fetch_add(1, Ordering::Relaxed)
    )
}

/// A built testbed. Dropping it stops the dataplane and removes every namespace.
pub struct Testbed {
    /// Which datapath this is.
    pub arm: Arm,
    // Field order is drop order: the dataplane stops first, then the pods go, then the node.
    dataplane: Option<Process>,
    /// The pods.
    pub pods: Vec<Pod>,
    /// The node namespace.
    pub node: Netns,
    api: Option<(PathBuf, u64)>,
    /// Where the dataplane's log goes (Switchyard arm).
    pub log: Option<PathBuf>,
    /// The CNI network, when pods are attached through CNI.
    cni: Option<CniNetwork>,
}

/// A CNI network configuration and the host-local state directory behind it.
struct CniNetwork {
    plugin: PathBuf,
    conf: serde_json::Value,
    data_dir_key: u64,
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.dataplane.take();
        self.pods.clear();
        if let Some((api, key)) = self.api.take() {
            cleanup::release(key);
            let files = switchyard_dataplane::StateFiles::beside(&api);
            drop(switchyard_dataplane::io::handover::take(&files.handover));
            for kept in files.all() {
                let _ = std::fs::remove_file(kept);
            }
        }
        if let Some(log) = self.log.take() {
            let _ = std::fs::remove_file(log);
        }
        if let Some(cni) = self.cni.take() {
            cleanup::release(cni.data_dir_key);
        }
    }
}

impl Testbed {
    /// Builds the arm asked for.
    pub fn build(arm: Arm, options: &Options) -> Result<Self> {
        match arm {
            Arm::Switchyard => Self::switchyard(options),
            Arm::Kernel => Self::kernel(options),
        }
    }

    /// A Switchyard dataplane in a node namespace, with no pod yet (for tests that attach
    /// pods themselves, e.g. through a container runtime).
    pub fn dataplane_only() -> Result<Self> {
        Self::switchyard(&Options {
            pods: 0,
            ..Options::default()
        })
    }

    /// Pods attached to a Switchyard dataplane running in the node namespace.
    pub fn switchyard(options: &Options) -> Result<Self> {
        let prefix = unique_prefix();
        let node = Netns::create(&format!("{prefix}-node"))?;
        let api = std::env::temp_dir().join(format!("{prefix}.sock"));
        let api_key = cleanup::register(Resource::File(api.clone()));
        // The dataplane records its state beside the socket.
        let files = switchyard_dataplane::StateFiles::beside(&api);
        for kept in files.all() {
            cleanup::register(Resource::File(kept.to_path_buf()));
        }
        cleanup::register(Resource::Holder(files.handover.clone()));
        let log = std::env::temp_dir().join(format!("{prefix}-dataplane.log"));
        // Registered so that Ctrl-C removes it too; the guard's drop removes it otherwise.
        cleanup::register(Resource::File(log.clone()));
        let binary = find_binary("switchyard-dataplane")?;
        let binary = binary.to_string_lossy().into_owned();
        let api_text = api.to_string_lossy().into_owned();
        let mut argv = vec![binary.as_str(), "--api", api_text.as_str()];
        let workers = options.workers.map(|w| w.to_string());
        if let Some(w) = &workers {
            argv.extend(["--workers", w.as_str()]);
        }
        argv.extend(options.dataplane_args.iter().map(String::as_str));
        let dataplane = node.spawn(&argv, Some(&log))?;
        let mut bed = Self {
            arm: Arm::Switchyard,
            dataplane: Some(dataplane),
            pods: Vec::new(),
            node,
            api: Some((api.clone(), api_key)),
            log: Some(log),
            cni: None,
        };
        bed.wait_for_api(Duration::from_secs(10))?;
        if options.attach == Attach::Cni {
            let conf = serde_json::json!({
                "cniVersion": "1.1.0",
                "type": "switchyard",
                "dataplane_api": api,
            });
            bed.cni = Some(CniNetwork::new(
                &prefix,
                find_binary("switchyard-cni")?,
                conf,
            )?);
        }
        for i in 0..options.pods {
            match options.attach {
                Attach::Direct => bed.add_switchyard_pod(&prefix, i, options.mtu(i))?,
                Attach::Cni => bed.add_cni_pod(&prefix, i, options.mtu(i))?,
            }
        }
        Ok(bed)
    }

    fn add_switchyard_pod(&mut self, prefix: &str, i: usize, mtu: u32) -> Result<()> {
        let ns = Netns::create(&format!("{prefix}-pod{i}"))?;
        let (ipv4, ipv6) = (pod_ipv4(i), pod_ipv6(i));
        let reply = self.client()?.call(Request::AddPort(AddPort {
            netns: ns.path().to_string_lossy().into_owned(),
            ifname: "eth0".into(),
            ips: vec![
                format!("{ipv4}/24").parse().map_err(|e| fail!("{e}"))?,
                format!("{ipv6}/64").parse().map_err(|e| fail!("{e}"))?,
            ],
            mtu: Some(mtu),
            mac: None,
            owner: Some(format!("bench-env/{prefix}/pod{i}")),
            pod: None,
            port_mappings: Vec::new(),
            kind: None,
        }))?;
        let Reply::Port(port) = reply else {
            return Err(fail!("unexpected reply to add_port: {reply:?}"));
        };
        self.pods.push(Pod {
            ns,
            ipv4,
            ipv6,
            port: Some(port.id),
        });
        Ok(())
    }

    /// Pods on veth pairs attached to a Linux bridge in the node namespace.
    pub fn kernel(options: &Options) -> Result<Self> {
        let prefix = unique_prefix();
        let node = Netns::create(&format!("{prefix}-node"))?;
        let mut bed = Self {
            arm: Arm::Kernel,
            dataplane: None,
            pods: Vec::new(),
            node,
            api: None,
            log: None,
            cni: None,
        };
        match options.attach {
            Attach::Direct => bed.add_bridge_pods(&prefix, options)?,
            Attach::Cni => {
                let conf = serde_json::json!({
                    "cniVersion": "1.0.0",
                    "type": "bridge",
                    "bridge": "br0",
                    "isGateway": true,
                });
                bed.cni = Some(CniNetwork::new(
                    &prefix,
                    PathBuf::from(CNI_BIN_DIR).join("bridge"),
                    conf,
                )?);
                for i in 0..options.pods {
                    bed.add_cni_pod(&prefix, i, options.mtu(i))?;
                }
            }
        }
        Ok(bed)
    }

    /// Attaches pod `i` by calling the CNI plugin (inside the node namespace, as a runtime
    /// on that node would) with the CNI_* environment and the configuration on stdin.
    fn add_cni_pod(&mut self, prefix: &str, i: usize, mtu: u32) -> Result<()> {
        let ns = Netns::create(&format!("{prefix}-pod{i}"))?;
        let cni = self.cni.as_ref().ok_or_else(|| fail!("no CNI network"))?;
        let mut conf = cni.conf.clone();
        conf["mtu"] = serde_json::json!(mtu);
        let result = cni_call(
            &self.node,
            &cni.plugin,
            "ADD",
            &format!("{prefix}-ctr{i}"),
            &ns,
            &conf,
        )?;
        let (ipv4, ipv6) = result_addresses(&result)?;
        // The Switchyard arm's port id; the kernel arm has no dataplane to ask.
        let port = match self.client() {
            Ok(mut c) => c
                .ports()?
                .iter()
                .find(|p| p.netns == ns.path().to_string_lossy())
                .map(|p| p.id),
            Err(_) => None,
        };
        self.pods.push(Pod {
            ns,
            ipv4,
            ipv6,
            port,
        });
        Ok(())
    }

    /// Builds the bridge and veth pairs by hand, with fixed addresses.
    fn add_bridge_pods(&mut self, prefix: &str, options: &Options) -> Result<()> {
        let node = &self.node;
        node.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
        node.add_address("br0", "10.244.0.1/24")?;
        node.add_address("br0", "fd00:244::1/64")?;
        node.exec(&["ip", "link", "set", "br0", "up"])?;
        for i in 0..options.pods {
            let ns = Netns::create(&format!("{prefix}-pod{i}"))?;
            let veth = format!("veth{i}");
            let mtu = options.mtu(i).to_string();
            ns.exec(&[
                "ip",
                "link",
                "add",
                "eth0",
                "mtu",
                &mtu,
                "type",
                "veth",
                "peer",
                "name",
                &veth,
                "mtu",
                &mtu,
                "netns",
                node.name(),
            ])?;
            node.exec(&["ip", "link", "set", &veth, "master", "br0", "up"])?;
            let (ipv4, ipv6) = (pod_ipv4(i), pod_ipv6(i));
            ns.add_address("eth0", &format!("{ipv4}/24"))?;
            ns.add_address("eth0", &format!("{ipv6}/64"))?;
            ns.exec(&["ip", "link", "set", "eth0", "up"])?;
            ns.exec(&["ip", "route", "add", "default", "via", "10.244.0.1"])?;
            ns.exec(&["ip", "-6", "route", "add", "default", "via", "fd00:244::1"])?;
            self.pods.push(Pod {
                ns,
                ipv4,
                ipv6,
                port: None,
            });
        }
        Ok(())
    }

    /// A client of this testbed's dataplane (Switchyard arm).
    pub fn client(&self) -> Result<Client> {
        let (api, _) = self
            .api
            .as_ref()
            .ok_or_else(|| fail!("the kernel arm has no dataplane"))?;
        Ok(Client::connect(api)?)
    }

    /// The dataplane's API socket path (Switchyard arm).
    pub fn api_path(&self) -> Option<&std::path::Path> {
        self.api.as_ref().map(|(p, _)| p.as_path())
    }

    /// True while the dataplane process runs (always true for the kernel arm).
    pub fn dataplane_running(&mut self) -> bool {
        self.dataplane.as_mut().is_none_or(|p| p.is_running())
    }

    /// The dataplane's process id (Switchyard arm).
    pub fn dataplane_pid(&self) -> Option<u32> {
        self.dataplane.as_ref().map(Process::id)
    }

    /// The dataplane's log so far.
    pub fn dataplane_log(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    fn wait_for_api(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(mut c) = self.client() {
                if c.call(Request::Hello).is_ok() {
                    return Ok(());
                }
            }
            if !self.dataplane_running() {
                return Err(fail!(
                    "the dataplane exited at start: {}",
                    self.dataplane_log()
                ));
            }
            if Instant::now() > deadline {
                return Err(fail!(
                    "the dataplane's API did not come up within {timeout:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Where Debian's reference CNI plugins live.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

impl CniNetwork {
    /// A network named `prefix` for `plugin`, with host-local IPAM in a fresh state
    /// directory over 10.244.0.0/24 and fd00:244::/64.
    fn new(prefix: &str, plugin: PathBuf, mut conf: serde_json::Value) -> Result<Self> {
        crate::tools::ensure_cni_plugins()?;
        let data_dir = std::env::temp_dir().join(format!("{prefix}-ipam"));
        let data_dir_key = cleanup::register(Resource::Dir(data_dir.clone()));
        conf["name"] = serde_json::json!(prefix);
        conf["ipam"] = serde_json::json!({
            "type": "host-local",
            "dataDir": data_dir,
            "ranges": [[{"subnet": "10.244.0.0/24"}], [{"subnet": "fd00:244::/64"}]],
        });
        Ok(Self {
            plugin,
            conf,
            data_dir_key,
        })
    }
}

/// Calls a CNI plugin as a runtime on `node` would: inside the node's namespace, with the
/// CNI_* environment and `conf` on stdin. Returns the parsed stdout.
pub fn cni_call(
    node: &Netns,
    plugin: &std::path::Path,
    command: &str,
    container_id: &str,
    pod: &Netns,
    conf: &serde_json::Value,
) -> Result<serde_json::Value> {
    use std::io::Write;
    let plugin_dir = plugin
        .parent()
        .map(|d| d.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", node.name()])
        .arg(plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", pod.path())
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", "IgnoreUnknown=1")
        .env("CNI_PATH", format!("{plugin_dir}:{CNI_BIN_DIR}"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| fail!("cannot run {}: {e}", plugin.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(conf.to_string().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(fail!(
            "CNI {command} with {} failed: {} {}",
            plugin.display(),
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    if stdout.trim().is_empty() {
        return Ok(serde_json::Value::Null);
    }
    Ok(serde_json::from_str(&stdout)?)
}

/// The IPv4 and IPv6 addresses of a CNI ADD result.
pub fn result_addresses(result: &serde_json::Value) -> Result<(Ipv4Addr, Ipv6Addr)> {
    let addr = |v6: bool| {
        result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| {
                ip["address"]
                    .as_str()?
                    .split('/')
                    .next()?
                    .parse::<std::net::IpAddr>()
                    .ok()
            })
            .find(|a| a.is_ipv6() == v6)
    };
    match (addr(false), addr(true)) {
        (Some(std::net::IpAddr::V4(a)), Some(std::net::IpAddr::V6(b))) => Ok((a, b)),
        _ => Err(fail!(
            "CNI result without an IPv4 and an IPv6 address: {result}"
        )),
    }
}
