//! Surviving a restart: the pod ports are recorded in a state file after every change, and
//! a new dataplane process re-attaches to their (persistent) TAP devices at start. Pods
//! keep their interfaces, addresses and routes across the restart and lose only the frames
//! sent while no process held the device. The node settings are not recorded: the control
//! process pushes them again within one reconcile tick.

use super::Switch;
use crate::io::tap::{TapDevice, TUN_F_USO};
use crate::io::PortIo;
use crate::tables::PortRole;
use std::path::Path;
use switchyard_api::{AddPort, PortInfo};

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
            .filter(|p| p.role == PortRole::Pod && p.info.kind == "tap")
            .map(|p| p.info.clone())
            .collect();
        let written = serde_json::to_vec_pretty(&ports)
            .map_err(std::io::Error::other)
            .and_then(|text| write_atomically(path, &text));
        if let Err(e) = written {
            tracing::warn!("cannot record the ports in {}: {e}", path.display());
        }
    }

    /// Re-attaches the pod ports recorded in the state file; returns how many came back.
    /// Ports whose namespace or interface is gone are dropped from the record.
    pub fn restore_ports(&self) -> usize {
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
        let spec = AddPort {
            netns: info.netns.clone(),
            ifname: info.ifname.clone(),
            ips: info.ips.clone(),
            mtu: Some(info.mtu),
            mac: Some(info.mac),
            owner: info.owner.clone(),
            pod: info.pod.clone(),
            port_mappings: info.port_mappings.clone(),
        };
        self.validate(&spec).map_err(|e| e.message)?;
        let mut state = self.state();
        state
            .builder
            .check_new_port(&spec.netns, &spec.ifname, &spec.ips, &spec.port_mappings)
            .map_err(|e| e.message)?;
        let (tap, ifindex) = TapDevice::attach(Path::new(&info.netns), &info.ifname, info.queues)
            .map_err(|e| e.to_string())?;
        if tap.queues() > 1 {
            crate::io::steering::attach(tap.raw_fd(0), self.config.steering);
        }
        let uso = tap.offloads() & TUN_F_USO == TUN_F_USO;
        self.insert_port(
            &mut state,
            &spec,
            (info.mac, info.mtu, ifindex),
            PortIo::Tap(tap),
            uso,
        )
        .map(|_| ())
        .map_err(|e| e.message)
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
