//! The per-node agent (`switchyard-control run`): a reconcile loop that keeps one
//! dataplane's node settings equal to what the manifests directory says.
//!
//! Every tick (200 ms by default) it:
//! 1. looks at the directory's listing (names, sizes, modification times); when it changed,
//!    reads every manifest, allocates missing pod CIDRs (recording them in
//!    `DIR/.switchyard-allocations.json` so every node's agent agrees) and computes this
//!    node's [`NodeSpec`]. Bad manifests are reported with file and field, and the last
//!    good spec stays in force;
//! 2. asks the dataplane for the settings in force and pushes the spec when they differ
//!    (first start, a manifest change, or a dataplane that restarted with none).
//!
//! So a change on disk reaches the dataplane within one tick plus the push, and a
//! restarted dataplane gets its settings back within one tick of answering.

use crate::cluster::allocate::{self, Record};
use crate::cluster::manifests::{self, ManifestError, Manifests};
use crate::cluster::plan;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use switchyard_api::{Client, NodeSpec};

/// Where allocations of pod CIDRs are recorded inside a manifests directory.
pub const ALLOCATIONS_FILE: &str = ".switchyard-allocations.json";

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// This node's name (its Node's `metadata.name`).
    pub node: String,
    /// The manifests directory.
    pub manifests: PathBuf,
    /// The dataplane's API socket.
    pub api: PathBuf,
    /// Uplink interface override.
    pub uplink: Option<String>,
    /// Time between two reconciliations.
    pub interval: Duration,
}

/// Reads the directory and fills in pod CIDRs, with the recorded allocations kept first;
/// returns the manifests and the allocations to record.
pub fn load(dir: &Path) -> Result<(Manifests, Record), Vec<ManifestError>> {
    let mut m = manifests::load_dir(dir)?;
    let recorded: Record = std::fs::read(dir.join(ALLOCATIONS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let record = allocate::allocate(&mut m, &recorded)?;
    Ok((m, record))
}

/// Writes the allocation record when it changed (atomically: temporary file, rename).
pub fn record_allocations(dir: &Path, record: &Record) -> std::io::Result<()> {
    let path = dir.join(ALLOCATIONS_FILE);
    let text = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    if std::fs::read(&path).ok().as_deref() == Some(&text[..]) {
        return Ok(());
    }
    let tmp = dir.join(format!("{ALLOCATIONS_FILE}.{}", std::process::id()));
    std::fs::write(&tmp, &text)?;
    std::fs::rename(&tmp, &path)
}

/// This node's spec from the directory; errors as lines to print.
pub fn compute(opts: &AgentOptions) -> Result<NodeSpec, Vec<String>> {
    let strings = |errors: Vec<ManifestError>| -> Vec<String> {
        errors.iter().map(ToString::to_string).collect()
    };
    let (m, record) = load(&opts.manifests).map_err(strings)?;
    if let Err(e) = record_allocations(&opts.manifests, &record) {
        return Err(vec![format!(
            "cannot record pod CIDR allocations in {}: {e}",
            opts.manifests.display()
        )]);
    }
    plan::plan(&m, &opts.node)
        .and_then(|p| p.to_spec(&m, opts.uplink.clone()))
        .map_err(|e| vec![e])
}

/// What the directory looks like: names, sizes and modification times of its files.
fn fingerprint(dir: &Path) -> Vec<(String, u64, Option<SystemTime>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                meta.len(),
                meta.modified().ok(),
            ))
        })
        .collect();
    out.sort();
    out
}

/// Runs the reconcile loop until the process is stopped.
pub fn run(opts: &AgentOptions) -> ! {
    let mut seen = None;
    let mut desired: Option<NodeSpec> = None;
    let mut dataplane_down = false;
    let mut last_error: Option<String> = None;
    loop {
        let now = fingerprint(&opts.manifests);
        if seen.as_ref() != Some(&now) {
            seen = Some(now);
            match compute(opts) {
                Ok(spec) => {
                    if desired.as_ref() != Some(&spec) {
                        eprintln!(
                            "switchyard-control: node {}: {} peers, pod CIDRs {}",
                            spec.name,
                            spec.peers.len(),
                            join(&spec.pod_cidrs)
                        );
                    }
                    desired = Some(spec);
                }
                Err(errors) => {
                    for e in &errors {
                        eprintln!("switchyard-control: {e}");
                    }
                    eprintln!(
                        "switchyard-control: keeping the last good settings ({})",
                        if desired.is_some() {
                            "in force"
                        } else {
                            "none yet"
                        }
                    );
                }
            }
        }
        if let Some(spec) = &desired {
            match reconcile(&opts.api, spec) {
                Ok(pushed) => {
                    if dataplane_down || pushed {
                        eprintln!(
                            "switchyard-control: dataplane at {} has the node settings",
                            opts.api.display()
                        );
                    }
                    dataplane_down = false;
                    last_error = None;
                }
                Err(e) => {
                    if last_error.as_ref() != Some(&e) {
                        eprintln!("switchyard-control: {e}");
                        last_error = Some(e);
                    }
                    dataplane_down = true;
                }
            }
        }
        std::thread::sleep(opts.interval);
    }
}

/// Pushes `spec` unless the dataplane has it already; returns whether it pushed.
fn reconcile(api: &Path, spec: &NodeSpec) -> Result<bool, String> {
    let mut client = Client::connect(api)
        .map_err(|e| format!("dataplane at {} unreachable: {e}", api.display()))?;
    let status = client.node().map_err(|e| e.to_string())?;
    if status.spec.as_ref() == Some(spec) {
        return Ok(false);
    }
    client
        .set_node(spec.clone())
        .map_err(|e| format!("dataplane refused the node settings: {e}"))?;
    Ok(true)
}

fn join(nets: &[switchyard_api::IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
