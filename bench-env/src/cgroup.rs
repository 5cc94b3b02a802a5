//! Control groups that hold a simulated machine's processes (its container runtime, its
//! kubelet and every container they start), so that all of them can be killed at once,
//! whatever they forked or daemonised.

use crate::cleanup::{self, Resource};
use crate::Result;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const ROOT: &str = "/sys/fs/cgroup";

/// The hierarchies groups are made in: every cgroup v1 controller mounted under
/// `/sys/fs/cgroup` (the unified one aside), or the single cgroup v2 hierarchy.
pub fn hierarchies() -> Vec<PathBuf> {
    let root = Path::new(ROOT);
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_path_buf()];
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("cgroup.procs").exists() && !p.ends_with("unified"))
        .collect();
    found.sort();
    found
}

/// A control group `name` under every hierarchy, destroyed (its processes killed) when
/// the guard drops.
pub struct Cgroup {
    name: String,
    key: u64,
}

impl Cgroup {
    /// Creates `/NAME` under every hierarchy (cpuset given every CPU and memory node).
    pub fn create(name: &str) -> Result<Self> {
        let key = cleanup::register(Resource::Cgroup(name.to_string()));
        for h in hierarchies() {
            let dir = h.join(name);
            std::fs::create_dir_all(&dir)?;
            for file in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(all) = std::fs::read_to_string(h.join(file)) {
                    std::fs::write(dir.join(file), all.trim())?;
                }
            }
        }
        Ok(Self {
            name: name.to_string(),
            key,
        })
    }

    /// The group's name (its directory under each hierarchy).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The group's path, as `--cgroup-root` takes it.
    pub fn path(&self) -> String {
        format!("/{}", self.name)
    }

    /// The `cgroup.procs` file of the group in every hierarchy: a process joins by writing
    /// its id to each.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        hierarchies()
            .into_iter()
            .map(|h| h.join(&self.name).join("cgroup.procs"))
            .collect()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        cleanup::release(self.key);
    }
}

/// Every directory of the group `name` in `hierarchy`, children before their parent.
fn tree(hierarchy: &Path, name: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&entry.path(), out);
            }
        }
        out.push(dir.to_path_buf());
    }
    let mut out = Vec::new();
    let top = hierarchy.join(name);
    if top.is_dir() {
        walk(&top, &mut out);
    }
    out
}

/// Kills every process of group `name` (in any hierarchy, with its children) until none
/// is left, then removes the groups. Gives up after ten seconds.
pub fn destroy(name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut alive = 0;
        for h in hierarchies() {
            for dir in tree(&h, name) {
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    alive += 1;
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        if alive == 0 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // A killed process leaves its group a moment after it is reaped.
    while Instant::now() < deadline {
        let mut left = 0;
        for h in hierarchies() {
            for dir in tree(&h, name) {
                if std::fs::remove_dir(&dir).is_err() {
                    left += 1;
                }
            }
        }
        if left == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
