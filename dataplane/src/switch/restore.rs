//! What the dataplane changes in the node's kernel beyond its own devices, recorded so
//! that an uninstall puts it back: the first value of every sysctl it sets (forwarding,
//! the reserved masquerade ports, the ephemeral range) is kept in a file beside the API
//! socket, written before the change, so that restarts do not record their own values;
//! and the local table's rule, which the steering rules move from priority 0 to 100.

use super::egress::{remove_leftover_rules_except, LOCAL_PRIORITY};
use crate::io::links;
use crate::io::netlink::{KernelRule, Netlink, RT_TABLE_LOCAL};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

/// The file of a node's first sysctl values.
#[derive(Debug, Clone)]
pub struct Originals {
    path: Option<PathBuf>,
}

impl Originals {
    /// Records into `path` (none: nothing recorded).
    pub fn new(path: Option<PathBuf>) -> Self {
        Self { path }
    }

    /// Sets sysctl `key` (`net.ipv4.ip_forward`) to `value`, first recording the value
    /// it had if none is recorded yet.
    pub fn set(&self, key: &str, value: &str) -> io::Result<()> {
        if let Some(path) = &self.path {
            let mut recorded = read(path);
            if !recorded.contains_key(key) {
                let now = std::fs::read_to_string(proc_path(key))?;
                recorded.insert(key.to_string(), now.trim().to_string());
                write(path, &recorded)?;
            }
        }
        links::set_sysctl(key, value)
    }
}

fn proc_path(key: &str) -> PathBuf {
    Path::new("/proc/sys").join(key.replace('.', "/"))
}

fn read(path: &Path) -> BTreeMap<String, String> {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

fn write(path: &Path, values: &BTreeMap<String, String>) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(values)?)?;
    std::fs::rename(&tmp, path)
}

/// The rule that sends every packet to the local table, at `priority`.
pub(super) fn local_rule(priority: u32) -> KernelRule {
    KernelRule {
        priority,
        iif: None,
        protocol: None,
        dports: None,
        dst: None,
        table: RT_TABLE_LOCAL,
    }
}

/// Moves the local table's rule back to priority 0 (when the steering rules moved it).
pub fn restore_local_rule(nl: &mut Netlink) -> io::Result<()> {
    match nl.add_rule(&local_rule(0)) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    match nl.delete_rule(&local_rule(LOCAL_PRIORITY)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Puts the node's kernel back as it was before any dataplane ran: the host port
/// `host_ifname` a stopped process left (with the routes through it), its steering rules
/// and every other route it installed (marked `proto 83`) removed, the local rule at
/// priority 0, every recorded sysctl at its first value; then forgets the record. Returns
/// what it did, a line each.
pub fn cleanup(originals: &Path, host_ifname: &str) -> io::Result<Vec<String>> {
    let mut done = Vec::new();
    if crate::io::tap::TapDevice::remove_persistent(host_ifname)? {
        done.push(format!("removed the host port {host_ifname}"));
    }
    remove_leftover_rules_except(&[]);
    let mut nl = Netlink::open()?;
    for route in nl.routes_of(crate::io::netlink::RTPROT_SWITCHYARD)? {
        nl.delete_route(&route)?;
        done.push(format!("removed the route to {}", route.dst));
    }
    restore_local_rule(&mut nl)?;
    done.push("restored the local table's rule at priority 0".to_string());
    for (key, value) in read(originals) {
        // A device's own settings went with the device.
        if !proc_path(&key).exists() {
            continue;
        }
        // With its newline: an empty value (no reserved ports) must still be written.
        links::set_sysctl(&key, &format!("{value}\n"))?;
        done.push(format!("restored {key} = {value}"));
    }
    match std::fs::remove_file(originals) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_round_trips_and_a_missing_or_corrupt_file_reads_as_empty() {
        let dir = std::env::temp_dir().join(format!("sy-originals-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.sysctls.json");
        assert!(read(&path).is_empty());
        let values = BTreeMap::from([("net.ipv4.ip_forward".to_string(), "0".to_string())]);
        write(&path, &values).unwrap();
        assert_eq!(read(&path), values);
        std::fs::write(&path, b"{not json").unwrap();
        assert!(read(&path).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sysctl_keys_map_to_proc_paths() {
        assert_eq!(
            proc_path("net.ipv6.conf.all.forwarding"),
            Path::new("/proc/sys/net/ipv6/conf/all/forwarding")
        );
    }
}
