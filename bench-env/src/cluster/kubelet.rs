//! Real Kubernetes nodes on one machine: each node is a network namespace on the
//! underlay, a mount namespace in which the paths a node owns (`/run/containerd`,
//! `/var/lib/kubelet`, `/etc/cni/net.d`, `/opt/cni/bin`, `/run/netns`, `/run/switchyard`,
//! ...) are bind mounts of the node's own directories, and a control group holding its
//! containerd, its kubelet and every container they start. Dropping the node kills the
//! group, so nothing it started outlives it, and the bind mounts vanish with the mount
//! namespace.
//!
//! The kubelet changes a few kernel settings at start (`vm.overcommit_memory`,
//! `kernel.panic_on_oops`, ...) that are not namespaced: the node's mount namespace shows
//! it files holding the values it wants instead, so the machine's own are never touched.

use super::*;
use crate::cgroup::Cgroup;
use crate::cleanup::Guard;

/// The paths a node owns, bind-mounted from its own directory (a subdirectory named
/// after the path).
const NODE_PATHS: [&str; 10] = [
    "/run/switchyard",
    "/etc/cni/net.d",
    "/opt/cni/bin",
    "/var/lib/cni",
    "/run/netns",
    "/run/containerd",
    "/var/lib/containerd",
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
];

/// Kernel settings the kubelet insists on (its `setupKernelTunables`), as a path under
/// `/proc/sys` and the value it wants.
const KUBELET_SYSCTLS: [(&str, &str); 6] = [
    ("vm/overcommit_memory", "1"),
    ("vm/panic_on_oom", "0"),
    ("kernel/panic", "10"),
    ("kernel/panic_on_oops", "1"),
    ("kernel/keys/root_maxkeys", "1000000"),
    ("kernel/keys/root_maxbytes", "25000000"),
];

/// The CNI plugins a node has before a network plugin is installed: containerd's
/// loopback and the IPAM the Switchyard configuration names.
const BASE_CNI_PLUGINS: [&str; 2] = ["loopback", "host-local"];

/// The images every node has, imported from `scripts/kube-images`' archives.
pub const NODE_IMAGES: [&str; 3] = ["pause.tar", "busybox.tar", "switchyard.tar"];

/// A node with containerd and a kubelet registered with the cluster's API server.
pub struct KubeNode {
    // Field order is drop order: the kubelet, then everything else in its group, then the
    // namespace, then the files.
    kubelet: Option<Process>,
    cgroup: Cgroup,
    /// The node's network namespace.
    pub ns: Netns,
    /// Its name (the Node object's).
    pub name: String,
    /// Its underlay address (the Node's InternalIP).
    pub ipv4: Ipv4Addr,
    /// Its directory: the bind mounts' sources, configuration and logs.
    pub dir: PathBuf,
    _dir: Guard,
}

impl KubeNode {
    /// The log of the kubelet (with the node's start-up script's output).
    pub fn kubelet_log(&self) -> PathBuf {
        self.dir.join("kubelet.log")
    }

    /// The kubelet's and containerd's logs (their last lines).
    pub fn logs(&self) -> String {
        let tail = |f: &str| {
            let text = std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        format!(
            "--- {} kubelet ---\n{}\n--- {} containerd ---\n{}\n",
            self.name,
            tail("kubelet.log"),
            self.name,
            tail("containerd.log")
        )
    }

    /// The name of its control group (under every hierarchy).
    pub fn cgroup_name(&self) -> &str {
        self.cgroup.name()
    }

    /// The directory behind one of the node's own paths (`/run/switchyard`, ...).
    pub fn path(&self, node_path: &str) -> PathBuf {
        self.dir
            .join(node_path.trim_start_matches('/').replace('/', "-"))
    }

    /// Runs `argv` inside the node's namespaces (network and mount), as its own processes
    /// see the machine; returns stdout.
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        let pid = self
            .kubelet
            .as_ref()
            .ok_or_else(|| fail!("{} is stopped", self.name))?
            .id()
            .to_string();
        let mut full = vec!["nsenter", "-t", &pid, "-m", "-n", "--"];
        full.extend(argv);
        crate::process::run(&full)
    }
}

impl Cluster {
    /// Makes the host's mountpoints for [`NODE_PATHS`] that do not exist (empty
    /// directories, removed with the cluster).
    fn ensure_mountpoints(&mut self) -> Result<()> {
        for path in NODE_PATHS {
            let mut missing = Vec::new();
            let mut at = Path::new(path);
            while !at.exists() {
                missing.push(at.to_path_buf());
                at = at.parent().unwrap_or(Path::new("/"));
            }
            for dir in missing.into_iter().rev() {
                std::fs::create_dir(&dir)?;
                self.keys.push(cleanup::register(Resource::EmptyDir(dir)));
            }
        }
        Ok(())
    }

    /// Starts node `i` of the real cluster (`node<i>`, 192.168.1.(10+i) on the flat
    /// underlay, the external subnet by a static route): its containerd with the images
    /// of `images` imported, and its kubelet registered with the API server.
    pub fn start_kube_node(&mut self, i: usize, images: &Path) -> Result<()> {
        let kubeconfig = self
            .api
            .as_ref()
            .ok_or_else(|| fail!("a kubelet needs the API server testbed"))?
            .kubeconfig
            .to_string_lossy()
            .into_owned();
        let bin = crate::kube::cluster_binaries()?;
        self.ensure_mountpoints()?;
        let name = format!("node{i}");
        let ns = Netns::create(&format!("{}-k{i}", self.prefix))?;
        let port = format!("k{i}");
        self.wire_to_hub(&ns, &port, Some("br0"))?;
        let (ipv4, _) = address_on_subnet(&ns, 1, 10 + i as u8)?;
        if self.options.external {
            self.route_to_external(&ns)?;
        }
        let dir = std::env::temp_dir().join(format!("{}-{name}", self.prefix));
        let dir_guard = Guard::new(Resource::Dir(dir.clone()));
        std::fs::create_dir_all(dir.join("sysctl"))?;
        let mut binds = String::new();
        for path in NODE_PATHS {
            let source = dir.join(path.trim_start_matches('/').replace('/', "-"));
            std::fs::create_dir_all(&source)?;
            binds += &format!(
                "mount --bind {} {path}\nmount --make-shared {path}\n",
                source.display()
            );
        }
        for plugin in BASE_CNI_PLUGINS {
            std::fs::copy(
                Path::new(CNI_BIN_DIR).join(plugin),
                dir.join("opt-cni-bin").join(plugin),
            )?;
        }
        for (key, want) in KUBELET_SYSCTLS {
            let proc = Path::new("/proc/sys").join(key);
            if std::fs::read_to_string(&proc)?.trim() != want {
                let file = dir.join("sysctl").join(key.replace('/', "."));
                std::fs::write(&file, format!("{want}\n"))?;
                binds += &format!("mount --bind {} {}\n", file.display(), proc.display());
            }
        }
        let cgroup = Cgroup::create(&format!("{}-{name}", self.prefix))?;
        std::fs::write(dir.join("containerd.toml"), CONTAINERD_CONFIG)?;
        std::fs::write(
            dir.join("kubelet.yaml"),
            kubelet_config(&cgroup.path(), ipv4),
        )?;
        let join: String = cgroup
            .procs_files()
            .iter()
            .map(|f| format!("echo $$ > {}\n", f.display()))
            .collect();
        let imports: String = NODE_IMAGES
            .iter()
            .map(|image| {
                format!(
                    "ctr --address /run/containerd/containerd.sock -n k8s.io images import {} >/dev/null\n",
                    images.join(image).display()
                )
            })
            .collect();
        let d = dir.display();
        let kubelet = bin.join("kubelet");
        let script = format!(
            "set -eu\n{binds}\
             containerd --config {d}/containerd.toml >{d}/containerd.log 2>&1 &\n\
             n=0; until [ -S /run/containerd/containerd.sock ]; do n=$((n+1)); [ $n -lt 200 ] || {{ echo containerd did not start; exit 1; }}; sleep 0.05; done\n\
             {imports}\
             exec {kubelet} --config={d}/kubelet.yaml --kubeconfig={kubeconfig} \
             --container-runtime=remote --container-runtime-endpoint=unix:///run/containerd/containerd.sock \
             --hostname-override={name} --node-ip={ipv4} --root-dir=/var/lib/kubelet --v=1\n",
            kubelet = kubelet.display(),
        );
        let start = dir.join("start.sh");
        std::fs::write(&start, &script)?;
        // Into the group first, then into the node's network namespace and a mount
        // namespace of its own that still sees the machine's mounts (sysfs and the
        // cgroup hierarchies included, which `ip netns exec` would hide).
        let launcher = format!(
            "{join}exec nsenter --net={} -- unshare --mount --propagation slave -- sh {}",
            ns.path().display(),
            start.display()
        );
        let process = Process::spawn(
            &["sh".to_string(), "-c".into(), launcher],
            Some(&dir.join("kubelet.log")),
        )?;
        self.kube_nodes.push(KubeNode {
            kubelet: Some(process),
            cgroup,
            ns,
            name,
            ipv4,
            dir,
            _dir: dir_guard,
        });
        Ok(())
    }

    /// Stops node `i`'s kubelet and everything of its group (containerd, the pods' and the
    /// DaemonSet's containers), as a machine that powers off.
    pub fn stop_kube_node(&mut self, i: usize) {
        self.kube_nodes.retain(|n| n.name != format!("node{i}"));
    }
}

/// containerd for one node: the CRI plugin with runc (cgroupfs), the overlay snapshotter,
/// the CNI paths every runtime uses (the node's own, through its bind mounts) and the
/// sandbox image of `scripts/kube-images`; plugins that would write elsewhere are off.
const CONTAINERD_CONFIG: &str = r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "k8s.gcr.io/pause:3.4"
  enable_selinux = false
  # No CAP_SYS_RESOURCE where a node runs inside a sandbox: no lower OOM score than ours.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
    max_conf_num = 1
"#;

/// The kubelet's configuration: its pods under `cgroup_root`, serving on `address`; the
/// API server reaches it anonymously (a test cluster: every request allowed); no eviction
/// for a disk that is merely fuller than a production node's; no image garbage
/// collection (the images cannot be pulled again).
fn kubelet_config(cgroup_root: &str, address: Ipv4Addr) -> String {
    format!(
        "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {address}
port: 10250
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization: {{mode: AlwaysAllow}}
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root}
cgroupsPerQOS: true
enforceNodeAllocatable: []
failSwapOn: false
makeIPTablesUtilChains: false
evictionHard: {{memory.available: 1Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
serializeImagePulls: false
nodeStatusUpdateFrequency: 4s
syncFrequency: 10s
fileCheckFrequency: 10s
"
    )
}
