//! The registry of what the harness created, so that it can be removed on every exit path:
//! guard drop (normal or panic unwinding) and Ctrl-C / SIGTERM.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};

/// Something to remove.
#[derive(Debug, Clone)]
pub enum Resource {
    /// A process to kill (SIGTERM, then SIGKILL).
    Process(u32),
    /// A named network namespace to delete.
    Netns(String),
    /// A file to remove.
    File(PathBuf),
    /// A directory to remove with its contents.
    Dir(PathBuf),
    /// An empty directory the harness created as a mountpoint: removed only while empty.
    EmptyDir(PathBuf),
    /// A control group (one name under every cgroup v1 hierarchy): every process in it and
    /// its children is killed, then the groups are removed.
    Cgroup(String),
    /// Where a stopped dataplane's descriptor holder may wait for a successor: dismissed
    /// (its descriptors taken and closed, so it exits and the devices can go).
    Holder(PathBuf),
}

static REGISTRY: Mutex<BTreeMap<u64, Resource>> = Mutex::new(BTreeMap::new());
static NEXT: AtomicU64 = AtomicU64::new(1);
static HANDLER: Once = Once::new();

fn registry() -> std::sync::MutexGuard<'static, BTreeMap<u64, Resource>> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records a resource; returns its key.
pub fn register(resource: Resource) -> u64 {
    install_signal_handler();
    let key = NEXT.fetch_add(1, Ordering::Relaxed);
    registry().insert(key, resource);
    key
}

/// A registered resource, removed when the guard drops.
pub struct Guard(u64);

impl Guard {
    /// Registers `resource`; it is removed when the guard drops.
    pub fn new(resource: Resource) -> Self {
        Self(register(resource))
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        release(self.0);
    }
}

/// Removes a resource now and forgets it.
pub fn release(key: u64) {
    let resource = registry().remove(&key);
    if let Some(resource) = resource {
        remove(&resource);
    }
}

/// Forgets a resource that is already gone (a command that finished).
pub fn forget(key: u64) {
    registry().remove(&key);
}

/// Removes everything still registered: processes and control groups first, then
/// namespaces, then files, then mountpoints (newest first).
pub fn release_all() {
    let all: Vec<Resource> = std::mem::take(&mut *registry())
        .into_values()
        .rev()
        .collect();
    for pass in 0..4 {
        for r in &all {
            let matches = matches!(
                (pass, r),
                (
                    0,
                    Resource::Process(_) | Resource::Cgroup(_) | Resource::Holder(_)
                ) | (1, Resource::Netns(_))
                    | (2, Resource::File(_) | Resource::Dir(_))
                    | (3, Resource::EmptyDir(_))
            );
            if matches {
                remove(r);
            }
        }
    }
}

fn remove(resource: &Resource) {
    match resource {
        Resource::Process(pid) => crate::process::terminate(*pid),
        Resource::Netns(name) => {
            let _ = Command::new("ip").args(["netns", "delete", name]).output();
        }
        Resource::File(path) => {
            let _ = std::fs::remove_file(path);
        }
        Resource::Holder(path) => drop(switchyard_dataplane::io::handover::take(path)),
        Resource::Dir(path) => {
            let _ = std::fs::remove_dir_all(path);
        }
        Resource::EmptyDir(path) => {
            let _ = std::fs::remove_dir(path);
        }
        Resource::Cgroup(name) => crate::cgroup::destroy(name),
    }
}

/// On Ctrl-C or SIGTERM: remove everything, then exit with status 130.
pub fn install_signal_handler() {
    HANDLER.call_once(|| {
        let _ = ctrlc::set_handler(|| {
            eprintln!("bench-env: interrupted, cleaning up");
            release_all();
            std::process::exit(130);
        });
    });
}
