//! Surviving a restart: the pod ports are recorded in a state file after every change, and
//! the node settings once applied; a new dataplane process applies the settings and
//! re-attaches to the (persistent) TAP devices at start, before it serves its API. Pods
//! keep their interfaces, addresses and routes across the restart. After a crash they lose
//! the frames sent while no process held the devices; after a planned stop
//! ([`Switch::hand_over`]) a holder process keeps the queues and sockets open, and the
//! frames wait in them for the successor.

use super::Switch;
use crate::io::afxdp::AfXdpPort;
use crate::io::handover::{self, Kept};
use crate::io::tap::{TapDevice, TUN_F_USO};
use crate::io::PortIo;
use crate::tables::PortRole;
use std::path::Path;
use switchyard_api::{AddPort, PodPorts, PortInfo};

impl Switch {
    /// Writes the pod ports to the state file (atomically), if there is one. A failure is
    /// reported, not fatal: forwarding goes on, only a restart would lose the ports.
    pub(super) fn save_ports(&self) {
        let Some(path) = &self.config.state_file else {
            return;
        };
        let ports: Vec<PortInfo> = self
            .state()
            .builder
            .ports()
            .filter(|p| {
                p.role == PortRole::Pod && matches!(p.device, PortIo::Tap(_) | PortIo::AfXdp(_))
            })
            .map(|p| p.info.clone())
            .collect();
        record(path, serde_json::to_vec_pretty(&ports), "the ports");
    }

    /// Re-attaches the pod ports recorded in the state file; returns how many came back.
    /// Ports whose namespace or interface is gone are dropped from the record.
    fn restore_ports(&self) -> usize {
        let Some(path) = &self.config.state_file else {
            return 0;
        };
        let Ok(text) = std::fs::read(path) else {
            return 0;
        };
        let saved: Vec<PortInfo> = match serde_json::from_slice(&text) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("ignoring unreadable state file {}: {e}", path.display());
                return 0;
            }
        };
        let mut restored = 0;
        for info in saved {
            match self.reattach(&info) {
                Ok(()) => restored += 1,
                Err(e) => {
                    tracing::warn!("not restoring port {} in {}: {e}", info.ifname, info.netns)
                }
            }
        }
        self.save_ports();
        restored
    }

    fn reattach(&self, info: &PortInfo) -> Result<(), String> {
        // Only TAP and AF_XDP ports are recorded.
        let kind: PodPorts = info.kind.parse().unwrap_or_default();
        let spec = AddPort {
            netns: info.netns.clone(),
            ifname: info.ifname.clone(),
            ips: info.ips.clone(),
            mtu: Some(info.mtu),
            mac: Some(info.mac),
            owner: info.owner.clone(),
            pod: info.pod.clone(),
            port_mappings: info.port_mappings.clone(),
            kind: Some(kind),
        };
        self.validate(&spec).map_err(|e| e.message)?;
        let mut state = self.state();
        state
            .builder
            .check_new_port(&spec.netns, &spec.ifname, &spec.ips, &spec.port_mappings)
            .map_err(|e| e.message)?;
        let netns = Path::new(&info.netns);
        let (io, ifindex, uso) = if kind == PodPorts::Afxdp {
            let (port, ifindex) = AfXdpPort::attach(netns, &info.netns, &info.ifname, info.queues)
                .map_err(|e| e.to_string())?;
            (PortIo::AfXdp(port), ifindex, false)
        } else {
            let kept = self.kept(&handover::tap_key(&info.netns, &info.ifname));
            let (tap, ifindex) = TapDevice::attach(netns, &info.ifname, info.queues, kept)
                .map_err(|e| e.to_string())?;
            tap.steer(self.config.steering);
            let uso = tap.offloads() & TUN_F_USO == TUN_F_USO;
            (PortIo::Tap(tap), ifindex, uso)
        };
        self.insert_port(&mut state, &spec, (info.mac, info.mtu, ifindex), io, uso)
            .map(|_| ())
            .map_err(|e| e.message)
    }

    /// Takes the descriptors a stopped process kept for this one; ports opened from now
    /// on use them where they fit.
    fn keep_descriptors(&self, kept: Kept) {
        *self.kept_pool() = kept;
    }

    fn kept_pool(&self) -> std::sync::MutexGuard<'_, Kept> {
        // Single inserts and takes: a poisoned lock still holds a consistent map.
        self.kept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The kept descriptors under `key`, taken out.
    pub(super) fn kept(&self, key: &str) -> Option<Vec<std::os::fd::OwnedFd>> {
        self.kept_pool().take(key)
    }

    /// Closes the kept descriptors no port took (a pod removed meanwhile); returns their
    /// keys.
    fn release_unclaimed(&self) -> Vec<String> {
        let mut kept = self.kept_pool();
        let keys = kept.keys().map(str::to_owned).collect();
        *kept = Kept::default();
        keys
    }

    /// A planned stop: gives the open queues of every TAP port (pods and the host port)
    /// and the uplinks' receive sockets to a holder process that keeps them for the next
    /// dataplane at `path`. Returns how many ports; the caller exits next. The workers
    /// forward until then, and what arrives afterwards waits in the queues.
    pub fn hand_over(&self, path: &Path) -> std::io::Result<usize> {
        let tables = self.tables();
        let host_ifname = &self.config.host_ifname;
        let underlay = self.state().node.as_ref().map(|n| n.spec().underlay);
        let entries: Vec<(String, Vec<std::os::fd::RawFd>)> = tables
            .ports
            .values()
            .filter_map(|port| match (&port.device, port.role) {
                (PortIo::Tap(tap), PortRole::Pod) => Some((
                    handover::tap_key(&port.info.netns, &port.info.ifname),
                    tap.raw_fds(),
                )),
                (PortIo::Tap(tap), PortRole::Host) => {
                    Some((handover::host_key(host_ifname), tap.raw_fds()))
                }
                (PortIo::Uplink(uplink), PortRole::Uplink) => Some((
                    handover::uplink_key(&port.info.ifname, underlay?),
                    uplink.receive_fds(),
                )),
                _ => None,
            })
            .collect();
        handover::hold(path, &entries)?;
        Ok(entries.len())
    }

    /// A restarted process's start: takes what its predecessor kept (`kept`), applies the
    /// recorded node settings and re-attaches the recorded pod ports, with forwarding held
    /// back until all of it is in place, then closes the kept descriptors nobody took.
    /// Returns (whether the node settings were applied, pod ports re-attached).
    pub fn restore(&self, kept: Kept) -> (bool, usize) {
        self.keep_descriptors(kept);
        self.shared.hold(true);
        let ports = self.restore_ports();
        let node = self.restore_node();
        if node {
            // Said before forwarding resumes, so that the log orders it before the first
            // frame forwarded.
            tracing::info!("applied the recorded node settings");
        }
        self.shared.hold(false);
        for key in self.release_unclaimed() {
            tracing::info!("closed the kept descriptors of {key}: nothing here uses them");
        }
        (node, ports)
    }

    /// Records the node settings now in force, if there is a file for them.
    pub(super) fn save_node(&self, spec: &switchyard_api::NodeSpec) {
        let Some(path) = &self.config.node_file else {
            return;
        };
        record(path, serde_json::to_vec_pretty(spec), "the node settings");
    }

    /// Applies the node settings recorded by an earlier process, if any; returns whether
    /// it did. The control process's next push replaces them if they changed meanwhile.
    fn restore_node(&self) -> bool {
        let Some(path) = &self.config.node_file else {
            return false;
        };
        let Ok(text) = std::fs::read(path) else {
            return false;
        };
        let spec = match serde_json::from_slice(&text) {
            Ok(spec) => spec,
            Err(e) => {
                tracing::warn!("ignoring unreadable node settings {}: {e}", path.display());
                return false;
            }
        };
        match self.set_node(spec) {
            Ok(_) => {
                self.node_from_record
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::warn!(
                    "not applying the recorded node settings ({}); waiting for the control process",
                    e.message
                );
                false
            }
        }
    }
}

/// Writes the JSON `text` of `what` to `path` (atomically); a failure is reported, not
/// fatal: forwarding goes on, only a restart would miss `what`.
fn record(path: &Path, text: serde_json::Result<Vec<u8>>, what: &str) {
    let written = text
        .map_err(std::io::Error::other)
        .and_then(|text| write_atomically(path, &text));
    if let Err(e) = written {
        tracing::warn!("cannot record {what} in {}: {e}", path.display());
    }
}

fn write_atomically(path: &Path, text: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
