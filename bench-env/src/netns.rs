//! Named network namespaces, deleted when their guard drops.

use crate::cleanup::{self, Resource};
use crate::process::{run, Process};
use crate::{fail, Result};
use std::path::PathBuf;

/// A network namespace created with `ip netns add`.
pub struct Netns {
    name: String,
    key: u64,
}

impl Netns {
    /// Creates the namespace `name` (which must not exist) with `lo` up.
    pub fn create(name: &str) -> Result<Self> {
        run(&["ip", "netns", "add", name])?;
        let ns = Self {
            name: name.to_string(),
            key: cleanup::register(Resource::Netns(name.to_string())),
        };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its path, as given to the dataplane and CNI (`/run/netns/NAME`).
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    fn argv(&self, argv: &[&str]) -> Vec<String> {
        let mut full = vec![
            "ip".to_string(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ];
        full.extend(argv.iter().map(|s| s.to_string()));
        full
    }

    /// Runs a command inside the namespace to completion; returns its stdout.
    pub fn exec(&self, argv: &[&str]) -> Result<String> {
        let full = self.argv(argv);
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        run(&refs)
    }

    /// Makes the namespace's bridges forward frames without handing them to iptables,
    /// ip6tables or arptables. Where the kernel has `br_netfilter` (built in on this
    /// machine kind, loaded for kube-proxy elsewhere), every new namespace starts with
    /// those calls on and each bridged frame takes a detour through netfilter's hooks, as
    /// on a Kubernetes node; a switch between nodes does no such thing. Nothing to do
    /// without `br_netfilter`.
    pub fn bridges_without_netfilter(&self) -> Result<()> {
        for table in ["iptables", "ip6tables", "arptables"] {
            // -e: a kernel without br_netfilter loaded has no such key.
            self.exec(&[
                "sysctl",
                "-qew",
                &format!("net.bridge.bridge-nf-call-{table}=0"),
            ])?;
        }
        Ok(())
    }

    /// Adds `cidr` (`10.0.0.1/24`, `fd00::1/64`; IPv6 without duplicate address detection)
    /// to `ifname`.
    pub fn add_address(&self, ifname: &str, cidr: &str) -> Result<()> {
        let mut argv = vec!["ip", "addr", "add", cidr, "dev", ifname];
        if cidr.contains(':') {
            argv.push("nodad");
        }
        self.exec(&argv).map(|_| ())
    }

    /// IPv4 packets the namespace's kernel has forwarded so far (`Ip: ForwDatagrams` of
    /// `/proc/net/snmp`).
    pub fn ipv4_forwarded(&self) -> Result<u64> {
        let snmp = self.exec(&["cat", "/proc/net/snmp"])?;
        let mut ip = snmp.lines().filter(|l| l.starts_with("Ip: "));
        let (names, values) = ip
            .next()
            .zip(ip.next())
            .ok_or_else(|| fail!("no Ip: lines in /proc/net/snmp"))?;
        names
            .split_whitespace()
            .position(|n| n == "ForwDatagrams")
            .and_then(|at| values.split_whitespace().nth(at))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| fail!("no ForwDatagrams in /proc/net/snmp"))
    }

    /// Starts a command inside the namespace; it is killed when the guard drops.
    pub fn spawn(&self, argv: &[&str], log: Option<&std::path::Path>) -> Result<Process> {
        Process::spawn(&self.argv(argv), log)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        cleanup::release(self.key);
    }
}
