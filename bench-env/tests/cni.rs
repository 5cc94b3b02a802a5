//! The CNI plugin driven exactly as a runtime drives it (CNI_* environment, configuration
//! on stdin), against a real dataplane and Debian's host-local IPAM plugin. Needs root;
//! under `CI=true` it always runs.

use bench_env::netns::Netns;
use bench_env::testbed::{unique_prefix, Testbed};
use serde_json::{json, Value};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use switchyard_api::Request;

const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// A dataplane plus a CNI network configuration with its own host-local data directory.
struct Network {
    bed: Testbed,
    conf: Value,
    data_dir: PathBuf,
    plugin: PathBuf,
}

impl Drop for Network {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

fn network() -> Network {
    bench_env::require_root("CNI integration test");
    bench_env::tools::ensure_cni_plugins().expect("reference CNI plugins");
    let bed = Testbed::dataplane_only().expect("dataplane");
    let name = unique_prefix();
    let data_dir = std::env::temp_dir().join(format!("{name}-ipam"));
    let conf = json!({
        "cniVersion": "1.1.0",
        "name": name,
        "type": "switchyard",
        "dataplane_api": bed.api_path().unwrap(),
        "ipam": {
            "type": "host-local",
            "dataDir": data_dir,
            "ranges": [[{"subnet": "10.88.0.0/24"}], [{"subnet": "fd88::/64"}]],
        },
    });
    Network {
        bed,
        conf,
        data_dir,
        plugin: bench_env::tools::find_binary("switchyard-cni").unwrap(),
    }
}

impl Network {
    /// Runs the plugin; returns (stdout as JSON or Null, exit success).
    fn call(
        &self,
        command: &str,
        container: &str,
        netns: &str,
        ifname: &str,
        conf: &Value,
    ) -> (Value, bool) {
        call_plugin(&self.plugin, command, container, netns, ifname, conf)
    }

    /// ADD for container `container` in `pod`; panics with the plugin's answer on failure.
    fn add(&self, container: &str, pod: &Netns) -> Value {
        let (result, ok) = self.call(
            "ADD",
            container,
            &pod.path().display().to_string(),
            "eth0",
            &self.conf,
        );
        assert!(ok, "ADD {container}: {result}");
        result
    }

    fn ports(&self) -> Vec<switchyard_api::PortInfo> {
        self.bed.client().unwrap().ports().unwrap()
    }

    /// Addresses host-local holds (files named after an address).
    fn allocations(&self) -> Vec<String> {
        let dir = self.data_dir.join(self.conf["name"].as_str().unwrap());
        std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().to_str().map(String::from))
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn with_version(&self, v: &str) -> Value {
        let mut c = self.conf.clone();
        c["cniVersion"] = json!(v);
        c
    }
}

fn call_plugin(
    plugin: &PathBuf,
    command: &str,
    container: &str,
    netns: &str,
    ifname: &str,
    conf: &Value,
) -> (Value, bool) {
    let mut child = Command::new(plugin)
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", ifname)
        .env("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAME=test")
        .env("CNI_PATH", CNI_BIN_DIR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (value, out.status.success())
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn every_version_adds_checks_and_deletes() {
    let net = network();
    for v in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        let conf = net.with_version(v);
        let pod = Netns::create(&format!("{}-pod", unique_prefix())).unwrap();
        let ns = pod.path().display().to_string();
        let (result, ok) = net.call("ADD", "ctr-a", &ns, "eth0", &conf);
        assert!(ok, "{v}: {result}");
        assert_eq!(result["cniVersion"], v);
        assert_eq!(result["interfaces"][0]["name"], "eth0");
        assert_eq!(result["interfaces"][0]["sandbox"], ns.as_str());
        assert_eq!(result["ips"].as_array().unwrap().len(), 2, "{result}");
        assert_eq!(result["ips"][0]["interface"], 0);
        assert_eq!(
            result["ips"][0].get("version").is_some(),
            v.starts_with("0."),
            "{v}: {result}"
        );
        assert_eq!(net.ports().len(), 1);
        assert_eq!(net.allocations().len(), 2);
        if v != "0.3.0" && v != "0.3.1" {
            let mut check = conf.clone();
            check["prevResult"] = result.clone();
            let (out, ok) = net.call("CHECK", "ctr-a", &ns, "eth0", &check);
            assert!(ok, "{v}: healthy pod must pass CHECK: {out}");
            if v == "1.1.0" {
                // An address removed behind the plugin's back.
                let addr = result["ips"][0]["address"].as_str().unwrap();
                pod.exec(&["ip", "addr", "del", addr, "dev", "eth0"])
                    .unwrap();
                let (err, ok) = net.call("CHECK", "ctr-a", &ns, "eth0", &check);
                assert!(!ok);
                assert_eq!(err["code"], 100, "{err}");
                assert!(err["msg"].as_str().unwrap().contains(addr), "{err}");
            }
        }
        let (out, ok) = net.call("DEL", "ctr-a", &ns, "eth0", &conf);
        assert!(ok, "{v}: {out}");
        assert!(net.ports().is_empty());
        assert!(net.allocations().is_empty());
        let (out, ok) = net.call("DEL", "ctr-a", &ns, "eth0", &conf);
        assert!(ok, "DEL is idempotent: {out}");
        let links = pod.exec(&["ip", "-o", "link"]).unwrap();
        assert!(!links.contains("eth0"), "{links}");
    }
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn check_fails_when_the_interface_is_gone_and_pods_talk() {
    let net = network();
    let a = Netns::create(&format!("{}-a", unique_prefix())).unwrap();
    let b = Netns::create(&format!("{}-b", unique_prefix())).unwrap();
    net.add("ctr-a", &a);
    let rb = net.add("ctr-b", &b);
    for ip in rb["ips"].as_array().unwrap() {
        let addr = ip["address"].as_str().unwrap().split('/').next().unwrap();
        a.exec(&["ping", "-c", "1", "-W", "2", addr])
            .unwrap_or_else(|e| panic!("pod a -> {addr}: {e}"));
    }
    // The pod's interface deleted behind the plugin's back: CHECK names it.
    let ns_b = b.path().display().to_string();
    let mut check = net.conf.clone();
    check["prevResult"] = rb;
    assert!(
        net.call("CHECK", "ctr-b", &ns_b, "eth0", &check).1,
        "healthy before"
    );
    b.exec(&["ip", "link", "del", "eth0"]).unwrap();
    let (err, ok) = net.call("CHECK", "ctr-b", &ns_b, "eth0", &check);
    assert!(!ok);
    assert_eq!(err["code"], 100, "{err}");
    assert!(
        err["msg"].as_str().unwrap().contains("eth0 is missing"),
        "{err}"
    );
    // The dataplane's port deleted behind the plugin's back: CHECK says so.
    let id = net.ports().iter().find(|p| p.netns == ns_b).unwrap().id;
    net.bed
        .client()
        .unwrap()
        .call(Request::DelPort(switchyard_api::PortSelector::Id { id }))
        .unwrap();
    let (err, ok) = net.call("CHECK", "ctr-b", &ns_b, "eth0", &check);
    assert!(!ok);
    assert!(err["msg"].as_str().unwrap().contains("no port"), "{err}");
    // DEL still succeeds and releases the addresses.
    assert!(net.call("DEL", "ctr-b", &ns_b, "eth0", &net.conf).1);
    assert_eq!(net.allocations().len(), 2, "only pod a's addresses remain");
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn gc_removes_ports_and_addresses_of_invalid_attachments() {
    let net = network();
    let keep = Netns::create(&format!("{}-keep", unique_prefix())).unwrap();
    let drop = Netns::create(&format!("{}-drop", unique_prefix())).unwrap();
    net.add("keep", &keep);
    net.add("drop", &drop);
    assert_eq!(net.allocations().len(), 4);
    let mut gc = net.conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    let (out, ok) = net.call("GC", "", "", "", &gc);
    assert!(ok, "{out}");
    assert_eq!(out, Value::Null, "GC prints nothing on success");
    let ports = net.ports();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].netns, keep.path().display().to_string());
    assert_eq!(
        net.allocations().len(),
        2,
        "the orphan's addresses are released"
    );
    assert!(!drop.exec(&["ip", "-o", "link"]).unwrap().contains("eth0"));
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn errors_follow_the_spec() {
    let net = network();
    let pod = Netns::create(&format!("{}-pod", unique_prefix())).unwrap();
    let ns = pod.path().display().to_string();
    let code = |(v, ok): (Value, bool)| {
        assert!(!ok, "expected failure: {v}");
        assert!(v["msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
        v["code"].as_u64().unwrap()
    };
    let mut no_ipam = net.conf.clone();
    no_ipam.as_object_mut().unwrap().remove("ipam");
    assert_eq!(code(net.call("ADD", "c", &ns, "eth0", &no_ipam)), 7);
    assert_eq!(
        code(net.call("ADD", "c", &ns, "eth0", &net.with_version("0.2.0"))),
        1
    );
    assert_eq!(code(net.call("ADD", "", &ns, "eth0", &net.conf)), 4);
    assert_eq!(code(net.call("FLY", "c", &ns, "eth0", &net.conf)), 4);
    assert_eq!(
        code(net.call("ADD", "c", "/run/netns/sy-no-such-ns", "eth0", &net.conf)),
        3
    );
    let mut garbage = Command::new(&net.plugin)
        .env("CNI_COMMAND", "ADD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    garbage
        .stdin
        .take()
        .unwrap()
        .write_all(b"{not json")
        .unwrap();
    let out = garbage.wait_with_output().unwrap();
    assert!(!out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["code"], 6);
    assert!(net.allocations().is_empty(), "failed ADDs leave no address");
    assert!(net.ports().is_empty());
    // The dataplane unreachable: ADD says try again later, STATUS says not available.
    let mut away = net.conf.clone();
    away["dataplane_api"] = json!("/run/sy-no-such-dataplane.sock");
    assert_eq!(code(net.call("ADD", "c", &ns, "eth0", &away)), 11);
    assert_eq!(code(net.call("STATUS", "", "", "", &away)), 50);
    assert!(net.call("STATUS", "", "", "", &net.conf).1);
    let (v, ok) = net.call("VERSION", "", "", "", &net.conf);
    assert!(
        ok && v["supportedVersions"].as_array().unwrap().len() == 5,
        "{v}"
    );
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces and TAP devices"
)]
fn fifty_concurrent_adds_then_dels_leak_nothing() {
    let net = network();
    let pods: Vec<Netns> = (0..50)
        .map(|i| Netns::create(&format!("{}-c{i}", unique_prefix())).unwrap())
        .collect();
    let run_all = |command: &'static str| {
        std::thread::scope(|s| {
            let handles: Vec<_> = pods
                .iter()
                .enumerate()
                .map(|(i, pod)| {
                    let ns = pod.path().display().to_string();
                    let (plugin, conf) = (&net.plugin, &net.conf);
                    s.spawn(move || {
                        call_plugin(plugin, command, &format!("ctr-{i}"), &ns, "eth0", conf)
                    })
                })
                .collect();
            for h in handles {
                let (out, ok) = h.join().unwrap();
                assert!(ok, "{command}: {out}");
            }
        })
    };
    run_all("ADD");
    assert_eq!(net.ports().len(), 50);
    assert_eq!(net.allocations().len(), 100);
    run_all("DEL");
    assert!(net.ports().is_empty(), "ports left: {:?}", net.ports());
    assert!(
        net.allocations().is_empty(),
        "addresses left: {:?}",
        net.allocations()
    );
    for pod in &pods {
        assert!(!pod.exec(&["ip", "-o", "link"]).unwrap().contains("eth0"));
    }
}

#[test]
#[cfg_attr(
    not(privileged),
    ignore = "needs root: network namespaces, veth pairs and AF_XDP sockets"
)]
fn pod_ports_afxdp_in_the_configuration_gives_a_veth_pair_that_del_removes() {
    let net = network();
    let node_ends = || {
        net.bed
            .node
            .exec(&["ip", "-o", "link", "show"])
            .unwrap()
            .lines()
            .filter(|l| l.contains(": syx"))
            .count()
    };
    let mut afxdp = net.conf.clone();
    afxdp["podPorts"] = json!("afxdp");
    let a = Netns::create(&format!("{}-a", unique_prefix())).unwrap();
    let b = Netns::create(&format!("{}-b", unique_prefix())).unwrap();
    let ns_a = a.path().display().to_string();
    let (ra, ok) = net.call("ADD", "ctr-a", &ns_a, "eth0", &afxdp);
    assert!(ok, "ADD with podPorts afxdp: {ra}");
    let rb = net.add("ctr-b", &b);
    let kinds: Vec<(String, String)> = net.ports().into_iter().map(|p| (p.netns, p.kind)).collect();
    assert!(kinds.contains(&(ns_a.clone(), "afxdp".into())), "{kinds:?}");
    assert!(
        kinds.contains(&(b.path().display().to_string(), "tap".into())),
        "the dataplane's default for a configuration without podPorts: {kinds:?}"
    );
    assert_eq!(node_ends(), 1);
    for ip in rb["ips"].as_array().unwrap() {
        let addr = ip["address"].as_str().unwrap().split('/').next().unwrap();
        a.exec(&["ping", "-c", "1", "-W", "2", addr])
            .unwrap_or_else(|e| panic!("afxdp pod -> tap pod {addr}: {e}"));
    }
    let mut check = afxdp.clone();
    check["prevResult"] = ra;
    assert!(net.call("CHECK", "ctr-a", &ns_a, "eth0", &check).1);
    assert!(net.call("DEL", "ctr-a", &ns_a, "eth0", &afxdp).1);
    assert_eq!(node_ends(), 0, "DEL removes the pair");
    assert!(!a
        .exec(&["ip", "-o", "link", "show"])
        .unwrap()
        .contains("eth0"));
    // An MTU an AF_XDP port cannot take: a clear refusal, nothing left allocated.
    let before = net.allocations().len();
    let mut jumbo = afxdp.clone();
    jumbo["mtu"] = json!(9000);
    let c = Netns::create(&format!("{}-c", unique_prefix())).unwrap();
    let (err, ok) = net.call(
        "ADD",
        "ctr-c",
        &c.path().display().to_string(),
        "eth0",
        &jumbo,
    );
    assert!(!ok);
    let msg = err["msg"].as_str().unwrap_or_default().to_string()
        + err["details"].as_str().unwrap_or_default();
    assert!(msg.contains("3506") && msg.contains("tap"), "{err}");
    assert_eq!(
        net.allocations().len(),
        before,
        "the addresses were released"
    );
    assert_eq!(node_ends(), 0, "no pair left behind");
    // The pod's namespace deleted without a DEL (a runtime crash): the pair goes with it,
    // and the DEL that comes later still succeeds and releases the addresses.
    let e = Netns::create(&format!("{}-e", unique_prefix())).unwrap();
    let ns_e = e.path().display().to_string();
    assert!(net.call("ADD", "ctr-e", &ns_e, "eth0", &afxdp).1);
    assert_eq!(node_ends(), 1);
    drop(e);
    // The kernel dismantles a deleted namespace in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while node_ends() > 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(node_ends(), 0, "the pair went with the namespace");
    assert!(net.call("DEL", "ctr-e", &ns_e, "eth0", &afxdp).1);
    assert_eq!(
        net.allocations().len(),
        before,
        "the addresses were released"
    );
    assert!(!net.ports().iter().any(|p| p.netns == ns_e));
    // A kind the plugin does not know: the configuration is refused.
    let mut bad = net.conf.clone();
    bad["podPorts"] = json!("xdp");
    let (err, ok) = net.call(
        "ADD",
        "ctr-d",
        &c.path().display().to_string(),
        "eth0",
        &bad,
    );
    assert!(!ok);
    assert_eq!(err["code"], 7, "{err}");
}
