//! The network model's scenario in a real Kubernetes cluster on one machine: an API
//! server, kube-controller-manager allocating pod CIDRs and kube-scheduler in the hub
//! namespace, two nodes with containerd and a kubelet each ([`Cluster::start_kube_node`]),
//! Switchyard installed with `kubectl apply -f deploy/switchyard.yaml`, busybox pods that
//! ping each other, the other node and a host on a subnet behind the nodes' static route,
//! a ClusterIP Service, a default-deny NetworkPolicy, a restart of the DaemonSet in place,
//! and the uninstall leaving nothing behind.
//!
//! Every step prints one line (`ok` or `FAILED`, how long it took, what it saw); the run
//! stops at the first failure, tears everything down, and its last line sums it up.

use crate::cluster::{Cluster, ClusterOptions, KubeNode};
use crate::testbed::Arm;
use crate::{fail, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The nodes of the scenario.
pub const NODES: usize = 2;
/// Replicas of the busybox Deployment.
pub const REPLICAS: usize = 4;
/// The external host, on the subnet behind the nodes' static route.
pub const EXTERNAL_HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 2, 10);

/// One step's outcome.
#[derive(Debug, Clone)]
pub struct Step {
    /// What the step checks.
    pub name: String,
    /// How long it took.
    pub took: Duration,
    /// What it saw (on success) or why it failed.
    pub detail: String,
    /// Whether it held.
    pub ok: bool,
}

/// Builds the images' archives (`scripts/kube-images`); returns their directory. The
/// Switchyard image holds the binaries this program runs beside, so a test run does not build
/// a second profile.
pub fn images() -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kube-images");
    let dataplane = crate::tools::find_binary("switchyard-dataplane")?;
    let bin_dir = dataplane.parent().unwrap_or(Path::new("."));
    let out = std::process::Command::new(&script)
        .env("SWITCHYARD_BIN_DIR", bin_dir)
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(fail!("{} failed", script.display()));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The scenario's state: the cluster, and what earlier steps learnt.
pub struct Scenario {
    /// The testbed: hub, API server, external host, kubelet nodes.
    pub cluster: Cluster,
    images: PathBuf,
    steps: Vec<Step>,
    /// The manifest applied to install Switchyard.
    deploy: PathBuf,
    /// Each node's links, routes and rules before Switchyard was installed.
    baseline: BTreeMap<String, String>,
}

/// The repository's `deploy/switchyard.yaml`.
pub fn deploy_manifest() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/switchyard.yaml")
}

impl Scenario {
    /// Builds what is missing (Kubernetes binaries, images), then the testbed: hub, API
    /// server with its controllers, the external network and the nodes.
    pub fn start() -> Result<Self> {
        crate::tools::ensure_installed()?;
        crate::kube::cluster_binaries()?;
        let images = images()?;
        let cluster = Cluster::build(
            Arm::Switchyard,
            &ClusterOptions {
                nodes: 0,
                api_server: true,
                external: true,
                ..ClusterOptions::default()
            },
        )?;
        Ok(Self {
            cluster,
            images,
            steps: Vec::new(),
            deploy: deploy_manifest(),
            baseline: BTreeMap::new(),
        })
    }

    /// The steps run so far.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Runs `f` as step `name`, printing its line; an error stops the scenario.
    pub fn step(&mut self, name: &str, f: impl FnOnce(&mut Self) -> Result<String>) -> Result<()> {
        let start = Instant::now();
        let outcome = f(self);
        let took = start.elapsed();
        let (ok, detail) = match &outcome {
            Ok(d) => (true, d.clone()),
            Err(e) => (false, e.to_string()),
        };
        println!(
            "{} {name} ({:.1} s){}{}",
            if ok { "ok    " } else { "FAILED" },
            took.as_secs_f64(),
            if detail.is_empty() { "" } else { ": " },
            detail
        );
        self.steps.push(Step {
            name: name.to_string(),
            took,
            detail,
            ok,
        });
        outcome.map(|_| ())
    }

    /// `kubectl ARGS` as the administrator, from the hub.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        let api = self.api()?;
        api.kubectl(&self.cluster.hub, args)
    }

    /// `kubectl ARGS -o json`, parsed.
    pub fn kubectl_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl(&all)?)?)
    }

    fn api(&self) -> Result<&crate::kube::ApiServer> {
        self.cluster
            .api
            .as_ref()
            .ok_or_else(|| fail!("no API server"))
    }

    /// Retries `check` every 250 ms until it returns `Some`, or fails after `timeout`
    /// with the last reason it gave.
    pub fn wait<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&Self) -> std::result::Result<T, String>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            match check(self) {
                Ok(v) => return Ok(v),
                Err(reason) if Instant::now() > deadline => {
                    return Err(fail!("{what}: not within {timeout:?}: {reason}"));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    /// The kubelet nodes.
    pub fn nodes(&self) -> &[KubeNode] {
        &self.cluster.kube_nodes
    }

    /// Everything's logs, for a failure.
    pub fn logs(&self) -> String {
        let mut out: String = self.nodes().iter().map(KubeNode::logs).collect();
        if let Ok(api) = self.api() {
            out += &api.logs();
        }
        out
    }

    /// Copies every log (kubelets, containerd, the control plane) into `dir`.
    pub fn keep_logs(&self, dir: &Path) {
        let _ = std::fs::create_dir_all(dir);
        let mut sources: Vec<(String, PathBuf)> = Vec::new();
        for node in self.nodes() {
            for f in ["kubelet.log", "containerd.log"] {
                sources.push((format!("{}-{f}", node.name), node.dir.join(f)));
            }
        }
        if let Ok(api) = self.api() {
            for f in [
                "etcd.log",
                "apiserver.log",
                "controller-manager.log",
                "scheduler.log",
            ] {
                sources.push((f.to_string(), api.dir.join(f)));
            }
        }
        for (name, from) in sources {
            let _ = std::fs::copy(from, dir.join(name));
        }
        eprintln!("kube-e2e: logs kept in {}", dir.display());
    }

    /// Starts the control plane's controllers and the kubelets; waits until every Node
    /// is registered with a pod CIDR of each family.
    pub fn start_nodes(&mut self) -> Result<String> {
        let hub = &self.cluster.hub;
        let cidrs = format!("{},fd00:244::/56", crate::cluster::CLUSTER_CIDR);
        self.cluster
            .api
            .as_mut()
            .ok_or_else(|| fail!("no API server"))?
            .start_controllers(hub, &cidrs)?;
        for i in 0..NODES {
            self.cluster.start_kube_node(i, &self.images)?;
        }
        let cidrs = self.wait("Nodes registered", Duration::from_secs(90), |s| {
            let nodes = s
                .kubectl_json(&["get", "nodes"])
                .map_err(|e| e.to_string())?;
            let items = nodes["items"].as_array().cloned().unwrap_or_default();
            let with_cidrs: Vec<String> = items
                .iter()
                .filter(|n| {
                    n["spec"]["podCIDRs"]
                        .as_array()
                        .is_some_and(|c| c.len() == 2)
                })
                .map(|n| {
                    format!(
                        "{} {}",
                        n["metadata"]["name"].as_str().unwrap_or("?"),
                        n["spec"]["podCIDRs"]
                    )
                })
                .collect();
            if with_cidrs.len() == NODES {
                Ok(with_cidrs)
            } else {
                Err(format!(
                    "{} Nodes, {} with two pod CIDRs",
                    items.len(),
                    with_cidrs.len()
                ))
            }
        })?;
        for node in &self.cluster.kube_nodes {
            let state = node_network_state(node)?;
            self.baseline.insert(node.name.clone(), state);
        }
        Ok(cidrs.join("; "))
    }
}

/// A node's links, addresses, routes and rules, as `ip` lists them (what an uninstall
/// must leave as it found).
pub fn node_network_state(node: &KubeNode) -> Result<String> {
    let mut out = String::new();
    for argv in [
        &["ip", "-o", "link", "show"][..],
        &["ip", "-o", "addr", "show"],
        &["ip", "route", "show", "table", "all"],
        &["ip", "-6", "route", "show", "table", "all"],
        &["ip", "rule", "show"],
        &["ip", "-6", "rule", "show"],
        &[
            "sysctl",
            "net.ipv4.ip_forward",
            "net.ipv6.conf.all.forwarding",
            "net.ipv4.ip_local_port_range",
            "net.ipv4.ip_local_reserved_ports",
        ],
    ] {
        out += &node.ns.exec(argv)?;
    }
    Ok(out)
}

/// Runs the whole scenario; true when every step held. Prints a line per step and a last
/// line that sums up.
pub fn run() -> Result<bool> {
    let start = Instant::now();
    let mut s = match Scenario::start() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            println!("kube-e2e: FAILED (the testbed did not start: building or starting the API server, images or underlay failed)");
            return Ok(false);
        }
    };
    let outcome = steps(&mut s);
    let passed = s.steps().iter().filter(|st| st.ok).count();
    if let Err(e) = &outcome {
        eprintln!("{e}\n{}", s.logs());
        if let Some(dir) = std::env::var_os("KUBE_E2E_LOGS") {
            s.keep_logs(Path::new(&dir));
        }
    }
    drop(s);
    let ok = outcome.is_ok();
    println!(
        "kube-e2e: {} ({passed} steps held{}, {:.0} s)",
        if ok { "PASSED" } else { "FAILED" },
        if ok { "" } else { ", then one failed" },
        start.elapsed().as_secs_f64()
    );
    Ok(ok)
}

/// `bench-env kube-cluster`: starts the cluster (with Switchyard installed unless
/// `bare`), prints how to reach it, and keeps it until Ctrl-C or SIGTERM, which tear
/// everything down.
pub fn serve(bare: bool) -> Result<bool> {
    let mut s = Scenario::start()?;
    s.step(
        "two nodes with containerd and a kubelet join the cluster",
        Scenario::start_nodes,
    )?;
    if !bare {
        s.step(
            "kubectl apply -f deploy/switchyard.yaml: the DaemonSet is Ready on both nodes, Nodes Ready, NetworkUnavailable=False",
            Scenario::install,
        )?;
    }
    let api = s.api()?;
    println!(
        "\nThe cluster runs. kubectl, as the administrator:\n  ip netns exec {} {}\n\
         Each node's files (logs, containerd, kubelet): {}\n\
         A node's own view (its mounts and network): nsenter -t <kubelet pid> -m -n\n\
         Ctrl-C tears everything down.",
        s.cluster.hub.name(),
        api.kubectl_argv(&["get", "nodes", "-o", "wide"]).join(" "),
        s.nodes()
            .iter()
            .map(|n| n.dir.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    loop {
        std::thread::park();
    }
}

fn steps(s: &mut Scenario) -> Result<()> {
    s.step(
        "two nodes with containerd and a kubelet join the cluster",
        Scenario::start_nodes,
    )?;
    s.step(
        "kubectl apply -f deploy/switchyard.yaml: the DaemonSet is Ready on both nodes, Nodes Ready, NetworkUnavailable=False",
        Scenario::install,
    )?;
    s.step(
        "a busybox Deployment of 4 replicas over both nodes: every pod's IP in its node's pod CIDR, and switchyard-control agrees",
        Scenario::deploy_busybox,
    )?;
    s.step(
        "kubectl exec ping: every other pod (same node and across), the other node, the external host",
        Scenario::ping_everything,
    )?;
    s.step(
        "the external host sees the node's address (masquerade)",
        Scenario::masquerade,
    )?;
    s.step(
        "a ClusterIP Service in front of the Deployment, reached from a pod on each node",
        Scenario::service,
    )?;
    s.step(
        "a default-deny NetworkPolicy applied with kubectl stops a ping; deleting it lets it through",
        Scenario::default_deny,
    )?;
    s.step(
        "kubectl rollout restart daemonset/switchyard: pods keep their interfaces, connectivity comes back",
        Scenario::restart_in_place,
    )?;
    s.step(
        "deleting the Deployment releases every address and port (CNI DEL from the kubelet)",
        Scenario::delete_pods,
    )?;
    s.step(
        "deleting the DaemonSet and the uninstall step leave no interface, address, route or rule",
        Scenario::uninstall,
    )?;
    Ok(())
}

/// The busybox Deployment: an HTTP server on 8080 (for the Service), spread over the
/// nodes; its image is on every node already, never pulled.
const BUSYBOX: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: busybox
  namespace: default
spec:
  replicas: 4
  selector:
    matchLabels: {app: busybox}
  template:
    metadata:
      labels: {app: busybox}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
      - maxSkew: 1
        topologyKey: kubernetes.io/hostname
        whenUnsatisfiable: DoNotSchedule
        labelSelector:
          matchLabels: {app: busybox}
      containers:
      - name: busybox
        image: busybox:1.35
        imagePullPolicy: Never
        command: [sh, -c, "echo served-by-$(hostname) > /tmp/index.html && exec httpd -f -p 8080 -h /tmp"]
        ports:
        - {containerPort: 8080, name: http}
"#;

const SERVICE: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: busybox
  namespace: default
spec:
  type: ClusterIP
  selector: {app: busybox}
  ports:
  - {name: http, port: 80, targetPort: http, protocol: TCP}
"#;

const DEFAULT_DENY: &str = r#"apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: default-deny
  namespace: default
spec:
  podSelector: {}
  policyTypes: [Ingress]
"#;

/// A busybox pod as `kubectl get pods` shows it.
#[derive(Debug, Clone)]
pub struct BusyboxPod {
    /// Its name.
    pub name: String,
    /// The node it runs on.
    pub node: String,
    /// Its IPv4 address.
    pub ipv4: Ipv4Addr,
}

/// Two pods on different nodes.
fn across_nodes(pods: &[BusyboxPod]) -> Result<(BusyboxPod, BusyboxPod)> {
    pods.iter()
        .find_map(|a| {
            pods.iter()
                .find(|b| b.node != a.node)
                .map(|b| (a.clone(), b.clone()))
        })
        .ok_or_else(|| fail!("no two busybox pods on different nodes"))
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

fn in_cidr(ip: Ipv4Addr, cidr: &str) -> bool {
    cidr.parse::<switchyard_api::IpNet>()
        .is_ok_and(|net| net.contains(&std::net::IpAddr::V4(ip)))
}

impl Scenario {
    fn install(&mut self) -> Result<String> {
        // Pods on the host network reach the API server at its own address: nothing serves
        // the `kubernetes` Service's cluster IP before Switchyard runs (the same ConfigMap
        // Calico reads).
        self.kubectl(&[
            "-n",
            "kube-system",
            "create",
            "configmap",
            "kubernetes-services-endpoint",
            &format!(
                "--from-literal=KUBERNETES_SERVICE_HOST={}",
                crate::kube::ADDRESS
            ),
            &format!(
                "--from-literal=KUBERNETES_SERVICE_PORT={}",
                crate::kube::PORT
            ),
        ])?;
        let deploy = self.deploy.to_string_lossy().into_owned();
        self.kubectl(&["apply", "-f", &deploy])?;
        let ready = self.wait(
            "the DaemonSet's pods Ready",
            Duration::from_secs(120),
            |s| {
                let ds = s
                    .kubectl_json(&["-n", "kube-system", "get", "daemonset", "switchyard"])
                    .map_err(|e| e.to_string())?;
                let ready = ds["status"]["numberReady"].as_u64().unwrap_or(0);
                if ready as usize == NODES {
                    Ok(ready)
                } else {
                    Err(format!("{ready} of {NODES} Ready: {}", ds["status"]))
                }
            },
        );
        if let Err(e) = ready {
            let pods = self.kubectl(&["-n", "kube-system", "describe", "pods"]);
            return Err(fail!("{e}\n{}", pods.unwrap_or_else(|e| e.to_string())));
        }
        self.wait(
            "Nodes Ready with NetworkUnavailable=False",
            Duration::from_secs(60),
            |s| {
                let nodes = s
                    .kubectl_json(&["get", "nodes"])
                    .map_err(|e| e.to_string())?;
                let items = nodes["items"].as_array().cloned().unwrap_or_default();
                let good = items
                    .iter()
                    .filter(|n| {
                        let conditions = n["status"]["conditions"]
                            .as_array()
                            .cloned()
                            .unwrap_or_default();
                        let status = |kind: &str| {
                            conditions
                                .iter()
                                .find(|c| c["type"] == kind)
                                .map(|c| text(&c["status"]))
                        };
                        status("Ready").as_deref() == Some("True")
                            && status("NetworkUnavailable").as_deref() == Some("False")
                    })
                    .count();
                if good == NODES {
                    Ok(())
                } else {
                    Err(format!(
                        "{good} of {NODES} Nodes Ready with the network available"
                    ))
                }
            },
        )?;
        self.kubectl(&["-n", "kube-system", "get", "pods", "-o", "wide"])
    }

    /// The busybox pods, Running with an address.
    pub fn busybox_pods(&self) -> Result<Vec<BusyboxPod>> {
        let pods = self.kubectl_json(&["get", "pods", "-l", "app=busybox"])?;
        Ok(pods["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter(|p| {
                p["status"]["phase"] == "Running" && p["metadata"]["deletionTimestamp"].is_null()
            })
            .filter_map(|p| {
                Some(BusyboxPod {
                    name: text(&p["metadata"]["name"]),
                    node: text(&p["spec"]["nodeName"]),
                    ipv4: text(&p["status"]["podIP"]).parse().ok()?,
                })
            })
            .collect())
    }

    fn node_cidrs(&self) -> Result<BTreeMap<String, Vec<String>>> {
        let nodes = self.kubectl_json(&["get", "nodes"])?;
        Ok(nodes["items"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|n| {
                let cidrs = n["spec"]["podCIDRs"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .iter()
                    .map(text)
                    .collect();
                (text(&n["metadata"]["name"]), cidrs)
            })
            .collect())
    }

    fn node(&self, name: &str) -> Result<&KubeNode> {
        self.nodes()
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| fail!("no node {name}"))
    }

    /// `switchyard-control ARGS` against node `name`'s dataplane (its socket, seen from the
    /// machine through the node's directory).
    pub fn switchyard_control(&self, name: &str, args: &[&str]) -> Result<String> {
        let node = self.node(name)?;
        let api = node.path("/run/switchyard").join("dataplane.sock");
        let binary = crate::tools::find_binary("switchyard-control")?;
        let api = api.to_string_lossy().into_owned();
        let binary = binary.to_string_lossy().into_owned();
        let mut argv = vec![binary.as_str(), "--api", &api];
        argv.extend(args);
        crate::process::run(&argv)
    }

    fn deploy_busybox(&mut self) -> Result<String> {
        self.api()?.apply(&self.cluster.hub, BUSYBOX)?;
        let pods = self.wait("4 busybox pods Running", Duration::from_secs(120), |s| {
            let pods = s.busybox_pods().map_err(|e| e.to_string())?;
            if pods.len() == REPLICAS {
                Ok(pods)
            } else {
                Err(format!("{} Running", pods.len()))
            }
        })?;
        let cidrs = self.node_cidrs()?;
        for pod in &pods {
            let cidr = cidrs
                .get(&pod.node)
                .and_then(|c| c.first())
                .ok_or_else(|| fail!("{} runs on {}, which has no pod CIDR", pod.name, pod.node))?;
            if !in_cidr(pod.ipv4, cidr) {
                return Err(fail!(
                    "{} has {} outside {}'s pod CIDR {cidr}",
                    pod.name,
                    pod.ipv4,
                    pod.node
                ));
            }
        }
        for node in cidrs.keys() {
            if !pods.iter().any(|p| &p.node == node) {
                return Err(fail!("no busybox pod on {node}"));
            }
            let listed: Value = serde_json::from_str(
                &self.switchyard_control(node, &["get", "pods", "-o", "json"])?,
            )?;
            // Each pod by its name and IPv4 address, as kubectl and the dataplane list it.
            let mut theirs: Vec<String> = listed
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|row| {
                    let ipv4 = row["ips"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .iter()
                        .map(text)
                        .find(|ip| !ip.contains(':'))
                        .unwrap_or_default();
                    format!("{} {ipv4}", text(&row["name"]))
                })
                .collect();
            let mut ours: Vec<String> = pods
                .iter()
                .filter(|p| &p.node == node)
                .map(|p| format!("default/{} {}", p.name, p.ipv4))
                .collect();
            theirs.sort();
            ours.sort();
            if theirs != ours {
                return Err(fail!(
                    "on {node}, kubectl shows {ours:?} and switchyard-control get pods {theirs:?}"
                ));
            }
        }
        let wide = self.kubectl(&["get", "pods", "-o", "wide"])?;
        let mut detail = format!("\n$ kubectl get pods -o wide\n{wide}");
        for node in cidrs.keys() {
            detail += &format!(
                "$ switchyard-control get pods -o wide   # on {node}\n{}",
                self.switchyard_control(node, &["get", "pods", "-o", "wide"])?
            );
        }
        Ok(detail)
    }

    /// `kubectl exec POD -- ARGS`.
    pub fn exec(&self, pod: &str, args: &[&str]) -> Result<String> {
        let mut argv = vec!["exec", pod, "--"];
        argv.extend(args);
        self.kubectl(&argv)
    }

    /// One ping from `pod` to `to` (a second try of two pings when the first is lost);
    /// why it failed otherwise.
    pub fn try_ping(&self, pod: &str, to: &str) -> Result<()> {
        self.exec(pod, &["ping", "-c", "1", "-W", "2", to])
            .or_else(|_| self.exec(pod, &["ping", "-c", "2", "-W", "2", to]))
            .map(|_| ())
    }

    /// Whether `pod` reaches `to` ([`Scenario::try_ping`]).
    pub fn ping(&self, pod: &str, to: &str) -> bool {
        self.try_ping(pod, to).is_ok()
    }

    fn ping_everything(&mut self) -> Result<String> {
        let pods = self.busybox_pods()?;
        let mut failed = Vec::new();
        let mut count = 0;
        for from in &pods {
            let mut targets: Vec<String> = pods
                .iter()
                .filter(|p| p.name != from.name)
                .map(|p| p.ipv4.to_string())
                .collect();
            targets.extend(
                self.nodes()
                    .iter()
                    .filter(|n| n.name != from.node)
                    .map(|n| n.ipv4.to_string()),
            );
            targets.push(EXTERNAL_HOST.to_string());
            for to in targets {
                count += 1;
                if let Err(e) = self.try_ping(&from.name, &to) {
                    failed.push(format!("{} ({}) -> {to}: {e}", from.name, from.node));
                }
            }
        }
        if failed.is_empty() {
            Ok(format!("{count} pings answered"))
        } else {
            Err(fail!(
                "{} of {count} pings unanswered: {}",
                failed.len(),
                failed.join(", ")
            ))
        }
    }

    fn masquerade(&mut self) -> Result<String> {
        let ext = self
            .cluster
            .external
            .as_ref()
            .ok_or_else(|| fail!("no external host"))?;
        let pods = self.busybox_pods()?;
        let mut seen = Vec::new();
        for pod in &pods {
            let server = serve_line(
                &ext.ns.path(),
                std::net::SocketAddr::from((EXTERNAL_HOST, 8081)),
            )?;
            let client = self.exec(
                &pod.name,
                &[
                    "sh",
                    "-c",
                    &format!("echo from-{} | nc {EXTERNAL_HOST} 8081", pod.name),
                ],
            );
            let (peer, line) = server
                .join()
                .map_err(|_| fail!("the external server panicked"))??;
            client?;
            let node = self.node(&pod.node)?;
            if peer.ip() != std::net::IpAddr::V4(node.ipv4) || !line.contains(&pod.name) {
                return Err(fail!(
                    "{} on {}: the external host saw {peer} send {line:?}, not the node's {}",
                    pod.name,
                    pod.node,
                    node.ipv4
                ));
            }
            seen.push(format!("{} -> {}", pod.name, peer.ip()));
        }
        Ok(seen.join(", "))
    }

    fn service(&mut self) -> Result<String> {
        self.api()?.apply(&self.cluster.hub, SERVICE)?;
        let svc = self.kubectl_json(&["get", "service", "busybox"])?;
        let ip = text(&svc["spec"]["clusterIP"]);
        let pods = self.busybox_pods()?;
        let mut detail = vec![format!("cluster IP {ip}")];
        for node in self
            .nodes()
            .iter()
            .map(|n| n.name.clone())
            .collect::<Vec<_>>()
        {
            let from = pods
                .iter()
                .find(|p| p.node == node)
                .ok_or_else(|| fail!("no busybox pod on {node}"))?;
            let answer = self.wait(
                &format!("{ip}:80 from {}", from.name),
                Duration::from_secs(20),
                |s| {
                    let out = s
                        // busybox-static's wget resolves even an address through glibc's
                        // NSS, which a static binary cannot load: nc speaks the HTTP.
                        .exec(
                            &from.name,
                            &[
                                "sh",
                                "-c",
                                &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} 80"),
                            ],
                        )
                        .map_err(|e| e.to_string())?;
                    match out.lines().find(|l| l.starts_with("served-by-")) {
                        Some(body) => Ok(body.trim().to_string()),
                        None => Err(format!("answered {out:?}")),
                    }
                },
            )?;
            detail.push(format!("{} ({node}) got {answer:?}", from.name));
        }
        Ok(detail.join(", "))
    }

    fn default_deny(&mut self) -> Result<String> {
        let pods = self.busybox_pods()?;
        let (a, b) = across_nodes(&pods)?;
        let to = b.ipv4.to_string();
        if !self.ping(&a.name, &to) {
            return Err(fail!("{} cannot ping {to} before the policy", a.name));
        }
        self.api()?.apply(&self.cluster.hub, DEFAULT_DENY)?;
        let applied = Instant::now();
        self.wait("the ping denied", Duration::from_secs(10), |s| {
            match s.exec(&a.name, &["ping", "-c", "1", "-W", "1", &to]) {
                Err(_) => Ok(()),
                Ok(_) => Err("still answered".to_string()),
            }
        })?;
        let denied_in = applied.elapsed();
        let denied = self.switchyard_control(&b.node, &["get", "flows", "--denied"])?;
        self.kubectl(&["delete", "networkpolicy", "default-deny"])?;
        self.wait("the ping allowed again", Duration::from_secs(10), |s| {
            if s.ping(&a.name, &to) {
                Ok(())
            } else {
                Err("still denied".to_string())
            }
        })?;
        Ok(format!(
            "{} -> {to} ({}) denied {:.1} s after kubectl apply; {}'s denied flows:\n{denied}",
            a.name,
            b.node,
            denied_in.as_secs_f64(),
            b.node
        ))
    }

    fn eth0_ifindexes(&self, pods: &[BusyboxPod]) -> Result<Vec<String>> {
        pods.iter()
            .map(|p| {
                Ok(self
                    .exec(&p.name, &["cat", "/sys/class/net/eth0/ifindex"])?
                    .trim()
                    .to_string())
            })
            .collect()
    }

    /// A process of pod `name` (its UID's control group on its node): the pod's network
    /// namespace is `/proc/PID/ns/net`.
    fn pod_pid(&self, pod: &BusyboxPod) -> Result<u32> {
        let uid = text(&self.kubectl_json(&["get", "pod", &pod.name])?["metadata"]["uid"]);
        let node = self.node(&pod.node)?;
        let wanted = format!("pod{uid}");
        let root = crate::cgroup::hierarchies()
            .into_iter()
            .find(|h| h.ends_with("pids") || h.join("cgroup.controllers").exists())
            .ok_or_else(|| fail!("no pids control group hierarchy"))?
            .join(node.cgroup_name());
        fn find(dir: &Path, wanted: &str, inside: bool) -> Option<u32> {
            let inside = inside || dir.file_name().is_some_and(|n| n == wanted);
            if inside {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                if let Some(pid) = procs.lines().find_map(|l| l.trim().parse().ok()) {
                    return Some(pid);
                }
            }
            std::fs::read_dir(dir)
                .ok()?
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .find_map(|e| find(&e.path(), wanted, inside))
        }
        find(&root, &wanted, false).ok_or_else(|| {
            fail!(
                "no process of {} ({wanted}) under {}",
                pod.name,
                root.display()
            )
        })
    }

    fn restart_in_place(&mut self) -> Result<String> {
        let pods = self.busybox_pods()?;
        let before = self.eth0_ifindexes(&pods)?;
        let (a, b) = across_nodes(&pods)?;
        // A timestamped ping every 100 ms across the nodes, from inside a's namespace, for
        // the whole rollout.
        let pid = self.pod_pid(&a)?.to_string();
        let log = self.api()?.dir.join("restart-ping.log");
        let target = b.ipv4.to_string();
        let argv: Vec<String> = [
            "nsenter", "-t", &pid, "-n", "--", "ping", "-D", "-n", "-i", "0.1", "-W", "1", &target,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let pinger = crate::process::Process::spawn(&argv, Some(&log))?;
        std::thread::sleep(Duration::from_secs(2));
        self.kubectl(&[
            "-n",
            "kube-system",
            "rollout",
            "restart",
            "daemonset/switchyard",
        ])?;
        self.kubectl(&[
            "-n",
            "kube-system",
            "rollout",
            "status",
            "daemonset/switchyard",
            "--timeout=180s",
        ])?;
        std::thread::sleep(Duration::from_secs(2));
        drop(pinger);
        let replies: Vec<f64> = std::fs::read_to_string(&log)?
            .lines()
            .filter(|l| l.contains("bytes from"))
            .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
            .collect();
        if replies.len() < 10 {
            return Err(fail!(
                "the ping across the restart got {} replies",
                replies.len()
            ));
        }
        // When each new dataplane had its node settings again: applied from its own record
        // at start (its log, written before forwarding resumes), or pushed by its agent
        // (the agent's log). A line's time is the process's own stamp (its second field),
        // not the runtime's, taken later when the line is read: a reply can come between.
        let logs = self.daemonset_logs();
        let settled: Vec<f64> = logs
            .lines()
            .filter(|l| {
                l.contains("has the node settings")
                    || l.contains("applied the recorded node settings")
            })
            .filter_map(|l| {
                let mut fields = l.split_whitespace();
                let runtime = fields.next();
                [fields.next(), runtime]
                    .into_iter()
                    .flatten()
                    .find_map(|f| f.parse::<jiff::Timestamp>().ok())
            })
            .map(|t| t.as_microsecond() as f64 / 1e6)
            .collect();
        let outages: Vec<(f64, f64)> = replies
            .windows(2)
            .filter(|w| w[1] - w[0] > 0.25)
            .map(|w| (w[0], w[1]))
            .collect();
        let after = self.eth0_ifindexes(&self.busybox_pods()?)?;
        if before != after {
            return Err(fail!(
                "pods' eth0 changed across the restart: {before:?} -> {after:?}"
            ));
        }
        let mut detail = format!(
            "{} -> {} every 100 ms, {} replies, eth0 kept in all {} pods",
            a.name,
            b.ipv4,
            replies.len(),
            pods.len()
        );
        let mut late = Vec::new();
        for (lost, back) in &outages {
            // The dataplane whose restart this was: the first to settle during the outage
            // (one node at a time is replaced).
            let ready = settled
                .iter()
                .copied()
                .filter(|t| t >= lost && t <= back)
                .fold(f64::NAN, f64::min);
            // NaN when no dataplane settled during the outage.
            let recovery = back - ready;
            detail += &format!(
                "; replies stopped for {:.1} s (the pod replaced by Kubernetes), back {:.2} s after the new dataplane had its settings",
                back - lost,
                recovery
            );
            if recovery.is_nan() || recovery > 1.0 {
                late.push(format!("{recovery:.2} s"));
            }
        }
        if !late.is_empty() {
            return Err(fail!(
                "{detail}: connectivity came back late ({})\n{logs}",
                late.join(", ")
            ));
        }
        Ok(detail)
    }

    /// The DaemonSet's pods' logs (every container, with timestamps), for a failure.
    pub fn daemonset_logs(&self) -> String {
        let mut out = String::new();
        let pods = self
            .kubectl_json(&[
                "-n",
                "kube-system",
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/name=switchyard",
            ])
            .unwrap_or_default();
        for pod in pods["items"].as_array().cloned().unwrap_or_default() {
            let name = text(&pod["metadata"]["name"]);
            for container in ["dataplane", "agent"] {
                let logs = self
                    .kubectl(&[
                        "-n",
                        "kube-system",
                        "logs",
                        "--timestamps",
                        &name,
                        "-c",
                        container,
                    ])
                    .unwrap_or_else(|e| e.to_string());
                out += &format!(
                    "--- {name} ({}) {container} ---\n{logs}",
                    text(&pod["spec"]["nodeName"])
                );
            }
        }
        out
    }

    /// The ids of the containers of `image` that run on `node`.
    fn switchyard_tasks(&self, node: &KubeNode, image: &str) -> Result<Vec<String>> {
        let containers = node.exec(&["ctr", "-n", "k8s.io", "containers", "ls"])?;
        let ours: Vec<&str> = containers
            .lines()
            .filter(|l| l.contains(image))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let tasks = node.exec(&["ctr", "-n", "k8s.io", "tasks", "ls"])?;
        Ok(tasks
            .lines()
            .filter(|l| l.contains("RUNNING"))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|id| ours.contains(id))
            .map(str::to_string)
            .collect())
    }

    /// Waits (a minute at most) until no pod of `namespace` matches `selector`.
    fn wait_no_pods(&self, namespace: &str, selector: &str) -> Result<()> {
        self.wait(
            &format!("the pods {selector} gone"),
            Duration::from_secs(60),
            |s| {
                let pods = s
                    .kubectl_json(&["-n", namespace, "get", "pods", "-l", selector])
                    .map_err(|e| e.to_string())?;
                match pods["items"].as_array().map_or(0, Vec::len) {
                    0 => Ok(()),
                    n => Err(format!("{n} left")),
                }
            },
        )
    }

    fn delete_pods(&mut self) -> Result<String> {
        self.kubectl(&["delete", "service", "busybox"])?;
        self.kubectl(&["delete", "deployment", "busybox", "--wait=true"])?;
        self.wait_no_pods("default", "app=busybox")?;
        let mut detail = Vec::new();
        for node in self.nodes() {
            let ports: Value = serde_json::from_str(
                &self.switchyard_control(&node.name, &["ports", "-o", "json"])?,
            )?;
            // The node's own ports (host TAP, overlay) stay while the dataplane runs.
            let left = ports
                .as_array()
                .map_or(0, |all| all.iter().filter(|p| p["owner"] != "node").count());
            let ipam = node
                .path("/var/lib/cni")
                .join("networks")
                .join("switchyard");
            let addresses: Vec<String> = std::fs::read_dir(&ipam)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                .collect();
            if left != 0 || !addresses.is_empty() {
                return Err(fail!("{}: {left} ports left in the dataplane, addresses still allocated: {addresses:?}\n{ports:#}", node.name));
            }
            detail.push(format!("{}: no port, no address", node.name));
        }
        Ok(detail.join(", "))
    }

    fn uninstall(&mut self) -> Result<String> {
        let deploy = self.deploy.to_string_lossy().into_owned();
        self.kubectl(&["delete", "-f", &deploy, "--wait=true"])?;
        self.kubectl(&[
            "-n",
            "kube-system",
            "delete",
            "configmap",
            "kubernetes-services-endpoint",
        ])?;
        let image = format!("localhost/switchyard:{}", env!("CARGO_PKG_VERSION"));
        let mut detail = Vec::new();
        if let Err(stuck) = self.wait_no_pods("kube-system", "app.kubernetes.io/name=switchyard") {
            // Kubelet 1.20 sometimes loses a pod whose containers exit at once on SIGTERM:
            // a housekeeping kill of the already removed containers fails, and the pod
            // object stays Terminating though nothing of it runs. Only that case is let
            // through, by deleting the object as an operator would.
            for node in self.nodes() {
                let running = self.switchyard_tasks(node, &image)?;
                if !running.is_empty() {
                    return Err(fail!("{stuck}; {} still runs {running:?}", node.name));
                }
            }
            self.kubectl(&[
                "-n",
                "kube-system",
                "delete",
                "pods",
                "-l",
                "app.kubernetes.io/name=switchyard",
                "--force",
                "--grace-period=0",
            ])?;
            self.wait_no_pods("kube-system", "app.kubernetes.io/name=switchyard")?;
            detail.push(format!(
                "the kubelet left a pod Terminating whose containers had all exited ({stuck}): deleted with --force"
            ));
        }
        for node in self.nodes() {
            // The uninstall step, from the image, as an operator runs it on each node.
            let cleanup = node.exec(&[
                "ctr",
                "-n",
                "k8s.io",
                "run",
                "--rm",
                "--net-host",
                "--privileged",
                "--mount",
                "type=bind,src=/run/switchyard,dst=/run/switchyard,options=rbind:rw",
                "--mount",
                "type=bind,src=/etc/cni/net.d,dst=/host/etc/cni/net.d,options=rbind:rw",
                "--mount",
                "type=bind,src=/opt/cni/bin,dst=/host/opt/cni/bin,options=rbind:rw",
                &image,
                "switchyard-cleanup",
                "/usr/local/bin/switchyard-dataplane",
                "--cleanup",
                "--cni-conf-dir",
                "/host/etc/cni/net.d",
                "--cni-bin-dir",
                "/host/opt/cni/bin",
            ])?;
            let now = node_network_state(node)?;
            let before = self.baseline.get(&node.name).cloned().unwrap_or_default();
            if now != before {
                let gone: Vec<&str> = before.lines().filter(|l| !now.contains(l)).collect();
                let new: Vec<&str> = now.lines().filter(|l| !before.contains(l)).collect();
                return Err(fail!(
                    "{} differs from before the install:\nleft behind:\n{}\nmissing:\n{}",
                    node.name,
                    new.join("\n"),
                    gone.join("\n")
                ));
            }
            let files: Vec<String> = ["/etc/cni/net.d", "/opt/cni/bin"]
                .iter()
                .flat_map(|d| {
                    std::fs::read_dir(node.path(d))
                        .into_iter()
                        .flatten()
                        .flatten()
                })
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("switchyard"))
                .collect();
            if !files.is_empty() {
                return Err(fail!("{}: left behind {files:?}", node.name));
            }
            let left: Vec<String> = std::fs::read_dir(node.path("/run/switchyard"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            if !left.is_empty() {
                return Err(fail!("{}: /run/switchyard still holds {left:?}", node.name));
            }
            detail.push(format!(
                "{}: as before the install ({})",
                node.name,
                cleanup.lines().collect::<Vec<_>>().join("; ")
            ));
        }
        Ok(detail.join(", "))
    }
}

/// Accepts one TCP connection on `addr` in the namespace at `ns`; returns the peer and
/// the first line it sent.
fn serve_line(
    ns: &Path,
    addr: std::net::SocketAddr,
) -> Result<std::thread::JoinHandle<Result<(std::net::SocketAddr, String)>>> {
    let ns = ns.to_path_buf();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || -> Result<(std::net::SocketAddr, String)> {
        Ok(switchyard_dataplane::io::netns::run_in(&ns, move || {
            use std::io::BufRead;
            let listener = std::net::TcpListener::bind(addr)?;
            let _ = ready_tx.send(());
            let (stream, peer) = listener.accept()?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut line = String::new();
            std::io::BufReader::new(&stream).read_line(&mut line)?;
            Ok((peer, line))
        })?)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| fail!("the external server did not start"))?;
    Ok(handle)
}
