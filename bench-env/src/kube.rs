//! A real Kubernetes API server for the testbeds: etcd and kube-apiserver v1.20.2 (built
//! offline by `scripts/kube-apiserver` into a cache outside the checkout), started in the
//! cluster's hub namespace and reachable from every node at `192.168.1.254:6443` over the
//! underlay, with a self-signed certificate and a token file (an admin in
//! `system:masters`). `kubectl` runs in the hub namespace too.

use crate::cleanup::{self, Resource};
use crate::netns::Netns;
use crate::process::Process;
use crate::{fail, Result};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where the API server listens, on the hub's underlay bridge.
pub const ADDRESS: &str = "192.168.1.254";
/// Its port.
pub const PORT: u16 = 6443;
/// The administrator's bearer token.
pub const ADMIN_TOKEN: &str = "switchyard-test-admin";

/// The directory of kube-apiserver and kubectl, built when missing (about 12 minutes, once
/// per machine).
pub fn binaries() -> Result<PathBuf> {
    build(&[])
}

/// The same directory with everything a cluster runs besides: kubelet,
/// kube-controller-manager, kube-scheduler (and Debian's containerd and runc installed).
pub fn cluster_binaries() -> Result<PathBuf> {
    build(&["--cluster"])
}

fn build(args: &[&str]) -> Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/kube-apiserver");
    let out = std::process::Command::new(&script).args(args).output()?;
    if !out.status.success() {
        return Err(fail!(
            "{} failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// etcd and kube-apiserver in a namespace; stopped on drop.
pub struct ApiServer {
    // Field order is drop order: the controllers, the API server, its store.
    controllers: Vec<Process>,
    apiserver: Option<Process>,
    etcd: Process,
    /// The kubeconfig of the administrator.
    pub kubeconfig: PathBuf,
    /// Where everything of this server lives (certificates, etcd's data, logs).
    pub dir: PathBuf,
    bin: PathBuf,
    ns_name: String,
    args: Vec<String>,
    keys: Vec<u64>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.controllers.clear();
        self.apiserver.take();
        for key in self.keys.drain(..) {
            cleanup::release(key);
        }
    }
}

impl ApiServer {
    /// Starts etcd and the API server in `ns` (which must hold [`ADDRESS`]), files under a
    /// new directory named after `prefix`; waits until the server answers.
    pub fn start(ns: &Netns, prefix: &str) -> Result<Self> {
        let bin = binaries()?;
        let dir = std::env::temp_dir().join(format!("{prefix}-apiserver"));
        std::fs::create_dir_all(dir.join("certs"))?;
        let keys = vec![cleanup::register(Resource::Dir(dir.clone()))];
        let sa_key = dir.join("sa.key");
        openssl(&dir, &["genrsa", "-out", "sa.key", "2048"])?;
        certificates(&dir)?;
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,admin-uid,\"system:masters\"\n"),
        )?;
        let etcd_data = dir.join("etcd");
        let s = |p: &Path| p.to_string_lossy().into_owned();
        let etcd = ns.spawn(
            &[
                "etcd",
                "--data-dir",
                &s(&etcd_data),
                "--listen-client-urls",
                "http://127.0.0.1:2379",
                "--advertise-client-urls",
                "http://127.0.0.1:2379",
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-advertise-peer-urls",
                "http://127.0.0.1:2380",
                "--initial-cluster",
                "default=http://127.0.0.1:2380",
                "--log-level",
                "warn",
            ],
            Some(&dir.join("etcd.log")),
        )?;
        let args: Vec<String> = [
            "--etcd-servers=http://127.0.0.1:2379".to_string(),
            format!("--bind-address={ADDRESS}"),
            format!("--advertise-address={ADDRESS}"),
            format!("--secure-port={PORT}"),
            format!("--cert-dir={}", s(&dir.join("certs"))),
            format!("--tls-cert-file={}", s(&dir.join("apiserver.crt"))),
            format!("--tls-private-key-file={}", s(&dir.join("apiserver.key"))),
            format!("--token-auth-file={}", s(&dir.join("tokens.csv"))),
            "--authorization-mode=RBAC".into(),
            "--service-cluster-ip-range=10.96.0.0/12".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-signing-key-file={}", s(&sa_key)),
            format!("--service-account-key-file={}", s(&sa_key)),
            "--api-audiences=https://kubernetes.default.svc".into(),
            "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount".into(),
            "--disable-admission-plugins=StorageObjectInUseProtection,DefaultStorageClass,PersistentVolumeClaimResize,DefaultTolerationSeconds,MutatingAdmissionWebhook,ValidatingAdmissionWebhook,ResourceQuota,Priority,TaintNodesByCondition,RuntimeClass,CertificateApproval,CertificateSigning,CertificateSubjectRestriction,DefaultIngressClass".into(),
            // Dual-stack (alpha in 1.20) keeps both of a Node's spec.podCIDRs.
            "--feature-gates=IPv6DualStack=true".into(),
            "--allow-privileged=true".into(),
            // Kubelets are reached at their InternalIP (no DNS for node names here).
            "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ]
        .into();
        let kubeconfig = dir.join("admin.kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_text(ADMIN_TOKEN))?;
        let mut server = Self {
            controllers: Vec::new(),
            apiserver: None,
            etcd,
            kubeconfig,
            dir,
            bin,
            ns_name: ns.name().to_string(),
            args,
            keys,
        };
        server.start_apiserver(ns)?;
        Ok(server)
    }

    /// Starts the API server (again) and waits until it answers.
    pub fn start_apiserver(&mut self, ns: &Netns) -> Result<()> {
        let binary = self
            .bin
            .join("kube-apiserver")
            .to_string_lossy()
            .into_owned();
        let mut argv = vec![binary.as_str()];
        argv.extend(self.args.iter().map(String::as_str));
        self.apiserver = Some(ns.spawn(&argv, Some(&self.dir.join("apiserver.log")))?);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.kubectl(ns, &["get", "--raw", "/readyz"]).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(fail!(
                    "kube-apiserver did not get ready in 60 s:\n{}",
                    self.logs()
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Starts kube-controller-manager (allocating Nodes' pod CIDRs from `cluster_cidrs`,
    /// issuing service account tokens) and kube-scheduler beside the API server, as a
    /// cluster with kubelets needs them.
    pub fn start_controllers(&mut self, ns: &Netns, cluster_cidrs: &str) -> Result<()> {
        let s = |p: &Path| p.to_string_lossy().into_owned();
        let kubeconfig = format!("--kubeconfig={}", s(&self.kubeconfig));
        let binary = |name: &str| s(&self.bin.join(name));
        let manager = [
            binary("kube-controller-manager"),
            kubeconfig.clone(),
            "--allocate-node-cidrs=true".into(),
            format!("--cluster-cidr={cluster_cidrs}"),
            "--node-cidr-mask-size-ipv4=24".into(),
            "--node-cidr-mask-size-ipv6=64".into(),
            "--service-cluster-ip-range=10.96.0.0/12".into(),
            "--feature-gates=IPv6DualStack=true".into(),
            format!(
                "--service-account-private-key-file={}",
                s(&self.dir.join("sa.key"))
            ),
            format!("--root-ca-file={}", s(&self.dir.join("ca.crt"))),
            "--leader-elect=false".into(),
            "--port=0".into(),
            "--secure-port=0".into(),
            "--v=1".into(),
        ];
        let scheduler = [
            binary("kube-scheduler"),
            kubeconfig,
            "--leader-elect=false".into(),
            "--port=0".into(),
            "--secure-port=0".into(),
            "--v=1".into(),
        ];
        for (argv, log) in [
            (&manager[..], "controller-manager.log"),
            (&scheduler[..], "scheduler.log"),
        ] {
            let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
            self.controllers
                .push(ns.spawn(&refs, Some(&self.dir.join(log)))?);
        }
        Ok(())
    }

    /// The certificate authority that signed the API server's certificate (what service
    /// account tokens carry as `ca.crt`).
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Stops the API server (etcd keeps running).
    pub fn stop_apiserver(&mut self) {
        self.apiserver.take();
    }

    /// Runs `kubectl ARGS` as the administrator in `ns`; returns its stdout.
    pub fn kubectl(&self, ns: &Netns, args: &[&str]) -> Result<String> {
        self.kubectl_with(ns, &self.kubeconfig, args)
    }

    /// Runs `kubectl ARGS` with `kubeconfig` in `ns`; returns its stdout.
    pub fn kubectl_with(&self, ns: &Netns, kubeconfig: &Path, args: &[&str]) -> Result<String> {
        debug_assert_eq!(ns.name(), self.ns_name);
        let argv = self.kubectl_argv_with(kubeconfig, args);
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        ns.exec(&refs)
    }

    /// The command line of `kubectl ARGS` as the administrator (to run in the server's
    /// namespace).
    pub fn kubectl_argv(&self, args: &[&str]) -> Vec<String> {
        self.kubectl_argv_with(&self.kubeconfig, args)
    }

    fn kubectl_argv_with(&self, kubeconfig: &Path, args: &[&str]) -> Vec<String> {
        let mut argv = vec![
            self.bin.join("kubectl").to_string_lossy().into_owned(),
            format!("--kubeconfig={}", kubeconfig.display()),
        ];
        argv.extend(args.iter().map(|a| a.to_string()));
        argv
    }

    /// Applies `yaml` (kubectl apply -f) as the administrator.
    pub fn apply(&self, ns: &Netns, yaml: &str) -> Result<String> {
        let file = self.dir.join(format!("apply-{}.yaml", fastrand::u64(..)));
        std::fs::write(&file, yaml)?;
        let out = self.kubectl(ns, &["apply", "-f", &file.to_string_lossy()]);
        let _ = std::fs::remove_file(&file);
        out
    }

    /// A kubeconfig with bearer token `token`, written under the server's directory as
    /// `name`.
    pub fn kubeconfig_for(&self, name: &str, token: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        std::fs::write(&path, kubeconfig_text(token))?;
        Ok(path)
    }

    /// The logs of etcd and the API server.
    pub fn logs(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        let tail = |t: String| {
            let lines: Vec<&str> = t.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        };
        ["etcd", "apiserver", "controller-manager", "scheduler"]
            .iter()
            .map(|name| format!("--- {name} ---\n{}\n", tail(read(&format!("{name}.log")))))
            .collect()
    }

    /// etcd's process, for compaction and the like.
    pub fn etcd_pid(&self) -> u32 {
        self.etcd.id()
    }
}

/// Runs openssl with `args` in `dir`.
fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()?;
    if !out.status.success() {
        return Err(fail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// A certificate authority (`ca.crt`) and the API server's certificate signed by it
/// (`apiserver.crt`), valid for its address and for the `kubernetes` Service's names and
/// cluster IP, so that clients in pods can verify it.
fn certificates(dir: &Path) -> Result<()> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=switchyard-test-ca",
        ],
    )?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "apiserver.key",
            "-out",
            "apiserver.csr",
            "-subj",
            "/CN=kube-apiserver",
        ],
    )?;
    std::fs::write(
        dir.join("san.ext"),
        format!("subjectAltName=IP:{ADDRESS},IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"),
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "apiserver.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "apiserver.crt",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    )
}

fn kubeconfig_text(token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://{ADDRESS}:{PORT}\n    insecure-skip-tls-verify: true\nusers:\n- name: user\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context: {{cluster: test, user: user}}\ncurrent-context: test\n"
    )
}
