//! End to end with a real CNI caller: podman with its CNI backend runs two containers on a
//! Switchyard network; they get addresses from its range, ping each other, pass an iperf3
//! run; `podman rm` leaves no port, address or interface behind. Needs root (and installs
//! podman, runc, busybox-static, iperf3 when missing); under `CI=true` it always runs.

use bench_env::process::run;
use bench_env::testbed::{unique_prefix, Testbed};
use serde_json::json;
use std::path::{Path, PathBuf};

/// A private podman installation: configuration, storage and CNI directories under one
/// temporary directory, removed (with every container) on drop.
struct Podman {
    dir: PathBuf,
    network: String,
}

impl Podman {
    fn new(network: &str, api: &Path) -> Self {
        let dir = std::env::temp_dir().join(format!("{network}-podman"));
        let _ = std::fs::remove_dir_all(&dir);
        for sub in [
            "net.d",
            "bin",
            "tmp",
            "run",
            "storage",
            "ipam",
            "rootfs/bin",
        ] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        let plugin = bench_env::tools::find_binary("switchyard-cni").unwrap();
        // Runtimes run the binary named by the network type.
        std::fs::copy(&plugin, dir.join("bin/switchyard")).unwrap();
        let d = dir.display();
        std::fs::write(
            dir.join("containers.conf"),
            format!(
                "[containers]\ndefault_ulimits = [\"nofile=16384:16384\", \"nproc=16384:16384\"]\n\
                 [network]\nnetwork_backend = \"cni\"\ncni_plugin_dirs = [\"{d}/bin\", \"/usr/lib/cni\"]\n\
                 network_config_dir = \"{d}/net.d\"\n\
                 [engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\nruntime = \"runc\"\ntmp_dir = \"{d}/tmp\"\n"
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("storage.conf"),
            format!("[storage]\ndriver = \"overlay\"\nrunroot = \"{d}/run\"\ngraphroot = \"{d}/storage\"\n"),
        )
        .unwrap();
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": network,
            "plugins": [{
                "type": "switchyard",
                "dataplane_api": api,
                "ipam": {
                    "type": "host-local",
                    "dataDir": dir.join("ipam"),
                    "ranges": [[{"subnet": "10.89.0.0/24"}]],
                },
            }],
        });
        std::fs::write(
            dir.join(format!("net.d/{network}.conflist")),
            conflist.to_string(),
        )
        .unwrap();
        let this = Self {
            dir,
            network: network.to_string(),
        };
        this.import_busybox();
        this
    }

    fn podman(&self, args: &[&str]) -> bench_env::Result<String> {
        let conf = self.dir.join("containers.conf");
        let storage = self.dir.join("storage.conf");
        let mut argv = vec!["env".to_string()];
        argv.push(format!("CONTAINERS_CONF={}", conf.display()));
        argv.push(format!("CONTAINERS_STORAGE_CONF={}", storage.display()));
        argv.push("podman".into());
        argv.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = argv.iter().map(String::as_str).collect();
        run(&refs)
    }

    /// A busybox image without any registry (cni-callers.md's recipe).
    fn import_busybox(&self) {
        let rootfs = self.dir.join("rootfs");
        std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).unwrap();
        let list = run(&["/bin/busybox", "--list"]).unwrap();
        for applet in list.lines().filter(|a| *a != "busybox") {
            let _ = std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet));
        }
        let tar = self.dir.join("rootfs.tar");
        run(&[
            "tar",
            "-C",
            &rootfs.display().to_string(),
            "-cf",
            &tar.display().to_string(),
            ".",
        ])
        .unwrap();
        self.podman(&[
            "import",
            "--change",
            "CMD [\"/bin/sh\"]",
            &tar.display().to_string(),
            "localhost/sy-busybox",
        ])
        .unwrap();
    }

    fn run_container(&self, name: &str) -> String {
        self.podman(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            &self.network,
            "localhost/sy-busybox",
            "sleep",
            "300",
        ])
        .unwrap_or_else(|e| panic!("podman run {name}: {e}"))
    }

    fn ipv4(&self, name: &str) -> String {
        let out = self
            .podman(&["exec", name, "ip", "-4", "-o", "addr", "show", "eth0"])
            .unwrap();
        out.split_whitespace()
            .skip_while(|w| *w != "inet")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .unwrap_or_else(|| panic!("no IPv4 on {name}: {out}"))
            .to_string()
    }

    fn netns_of(&self, name: &str) -> String {
        let pid = self
            .podman(&["inspect", "-f", "{{.State.Pid}}", name])
            .unwrap();
        format!("/proc/{}/ns/net", pid.trim())
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self.podman(&["rm", "-af", "-t0"]);
        let _ = self.podman(&["rmi", "-af"]);
        let _ = self.podman(&["system", "reset", "-f"]);
        let _ = run(&[
            "umount",
            "-R",
            &self.dir.join("storage/overlay").display().to_string(),
        ]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn podman_containers_on_a_switchyard_network() {
    bench_env::require_root("podman end-to-end test");
    bench_env::tools::ensure_podman().expect("podman, runc, busybox-static");
    bench_env::tools::ensure_cni_plugins().expect("host-local");
    bench_env::tools::ensure_installed().expect("iperf3");
    let bed = Testbed::dataplane_only().expect("dataplane");
    let network = unique_prefix();
    let podman = Podman::new(&network, bed.api_path().unwrap());
    podman.run_container("sy-a");
    podman.run_container("sy-b");
    let (a, b) = (podman.ipv4("sy-a"), podman.ipv4("sy-b"));
    for ip in [&a, &b] {
        assert!(
            ip.starts_with("10.89.0."),
            "address from the network's range: {ip}"
        );
    }
    let ports = bed.client().unwrap().ports().unwrap();
    assert_eq!(ports.len(), 2, "one Switchyard port per container");
    podman
        .podman(&["exec", "sy-a", "ping", "-c", "2", "-W", "2", &b])
        .expect("a pings b");
    podman
        .podman(&["exec", "sy-b", "ping", "-c", "2", "-W", "2", &a])
        .expect("b pings a");

    // iperf3 from the host tools, inside the containers' namespaces.
    let (ns_a, ns_b) = (podman.netns_of("sy-a"), podman.netns_of("sy-b"));
    let net_b = format!("--net={ns_b}");
    let net_a = format!("--net={ns_a}");
    let server = bench_env::process::Process::spawn(
        &["nsenter", &net_b, "iperf3", "-s", "-1"].map(String::from),
        None,
    )
    .unwrap();
    let mut report = None;
    for _ in 0..30 {
        if let Ok(out) = run(&["nsenter", &net_a, "iperf3", "-c", &b, "-t", "2", "-J"]) {
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            if v.get("error").is_none() {
                report = Some(v);
                break;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(server);
    let report = report.expect("iperf3 between the containers");
    let gbps = report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap()
        / 1e9;
    eprintln!("podman containers on Switchyard: iperf3 {gbps:.2} Gbit/s");
    assert!(gbps > 0.1, "{report}");

    podman.podman(&["rm", "-f", "-t0", "sy-a", "sy-b"]).unwrap();
    let ports = bed.client().unwrap().ports().unwrap();
    assert!(ports.is_empty(), "podman rm leaves no port: {ports:?}");
    let leftovers: Vec<_> = std::fs::read_dir(podman.dir.join("ipam").join(&network))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        leftovers
            .iter()
            .all(|f| f.parse::<std::net::IpAddr>().is_err()),
        "podman rm leaves no address: {leftovers:?}"
    );
}
