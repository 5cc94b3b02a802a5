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
}

impl Default for Options {
    fn default() -> Self {
        Self {
            pods: 2,
            mtus: vec![1500],
            workers: None,
            dataplane_args: Vec::new(),
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
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.dataplane.take();
        self.pods.clear();
        if let Some((_, key)) = self.api.take() {
            cleanup::release(key);
        }
        if let Some(log) = self.log.take() {
            let _ = std::fs::remove_file(log);
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

    /// Pods attached to a Switchyard dataplane running in the node namespace.
    pub fn switchyard(options: &Options) -> Result<Self> {
        let prefix = unique_prefix();
        let node = Netns::create(&format!("{prefix}-node"))?;
        let api = std::env::temp_dir().join(format!("{prefix}.sock"));
        let api_key = cleanup::register(Resource::File(api.clone()));
        let log = std::env::temp_dir().join(format!("{prefix}-dataplane.log"));
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
            api: Some((api, api_key)),
            log: Some(log),
        };
        bed.wait_for_api(Duration::from_secs(10))?;
        for i in 0..options.pods {
            bed.add_switchyard_pod(&prefix, i, options.mtu(i))?;
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
        node.exec(&["ip", "link", "add", "br0", "type", "bridge"])?;
        node.exec(&["ip", "addr", "add", "10.244.0.1/24", "dev", "br0"])?;
        node.exec(&["ip", "addr", "add", "fd00:244::1/64", "dev", "br0", "nodad"])?;
        node.exec(&["ip", "link", "set", "br0", "up"])?;
        let mut pods = Vec::new();
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
            ns.exec(&["ip", "addr", "add", &format!("{ipv4}/24"), "dev", "eth0"])?;
            ns.exec(&[
                "ip",
                "addr",
                "add",
                &format!("{ipv6}/64"),
                "dev",
                "eth0",
                "nodad",
            ])?;
            ns.exec(&["ip", "link", "set", "eth0", "up"])?;
            ns.exec(&["ip", "route", "add", "default", "via", "10.244.0.1"])?;
            ns.exec(&["ip", "-6", "route", "add", "default", "via", "fd00:244::1"])?;
            pods.push(Pod {
                ns,
                ipv4,
                ipv6,
                port: None,
            });
        }
        Ok(Self {
            arm: Arm::Kernel,
            dataplane: None,
            pods,
            node,
            api: None,
            log: None,
        })
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
