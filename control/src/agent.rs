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
//!    (first start, a manifest change, or a dataplane that restarted with none);
//! 3. pushes the Services (from Services and EndpointSlices, cluster IPs and node ports
//!    allocated where missing and recorded in `DIR/.switchyard-service-allocations.json`):
//!    only what changed since the last push, or all of them to a dataplane that restarted;
//! 4. pushes the NetworkPolicy rules of this node's pods (from Namespaces, Pods and
//!    NetworkPolicies) when they changed, or to a dataplane that restarted.
//!
//! So a change on disk reaches the dataplane within one tick plus the push, and a
//! restarted dataplane gets its settings back within one tick of answering.

use crate::cluster::allocate::{self, Record};
use crate::cluster::manifests::{self, ManifestError, Manifests};
use crate::cluster::plan;
use crate::cluster::services::{self, ServiceAllocations};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use switchyard_api::{Client, NodeSpec, PolicySet, Request, ServiceKey, ServiceSpec};

/// Where allocations of pod CIDRs are recorded inside a manifests directory.
pub const ALLOCATIONS_FILE: &str = ".switchyard-allocations.json";
/// Where cluster IPs and node ports given to Services are recorded.
pub const SERVICE_ALLOCATIONS_FILE: &str = ".switchyard-service-allocations.json";

/// What one node's dataplane should have.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// The node settings.
    pub node: NodeSpec,
    /// The Services, by key.
    pub services: BTreeMap<ServiceKey, ServiceSpec>,
    /// The largest Maglev table.
    pub maglev_table_size: u32,
    /// The NetworkPolicy rules of this node's pods.
    pub policies: PolicySet,
}

/// What the dataplane was last given (none: give it everything).
#[derive(Debug, Default)]
struct Pushed {
    services: Option<BTreeMap<ServiceKey, ServiceSpec>>,
    policies: Option<PolicySet>,
}

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
    write_record(dir, ALLOCATIONS_FILE, record)
}

/// Writes `record` as `dir/name` when it changed (atomically: temporary file, rename).
fn write_record(dir: &Path, name: &str, record: &impl serde::Serialize) -> std::io::Result<()> {
    let path = dir.join(name);
    let text = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    if std::fs::read(&path).ok().as_deref() == Some(&text[..]) {
        return Ok(());
    }
    let tmp = dir.join(format!("{name}.{}", std::process::id()));
    std::fs::write(&tmp, &text)?;
    std::fs::rename(&tmp, &path)
}

/// This node's settings and Services from the directory; errors as lines to print.
pub fn compute(opts: &AgentOptions) -> Result<Desired, Vec<String>> {
    let strings = |errors: Vec<ManifestError>| -> Vec<String> {
        errors.iter().map(ToString::to_string).collect()
    };
    let (m, record) = load(&opts.manifests).map_err(strings)?;
    let recorded: ServiceAllocations = std::fs::read(opts.manifests.join(SERVICE_ALLOCATIONS_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let (specs, service_record) = services::compile(&m, &opts.node, &recorded).map_err(strings)?;
    let written = record_allocations(&opts.manifests, &record)
        .and_then(|()| write_record(&opts.manifests, SERVICE_ALLOCATIONS_FILE, &service_record));
    if let Err(e) = written {
        return Err(vec![format!(
            "cannot record allocations in {}: {e}",
            opts.manifests.display()
        )]);
    }
    let node = plan::plan(&m, &opts.node)
        .and_then(|p| p.to_spec(&m, opts.uplink.clone()))
        .map_err(|e| vec![e])?;
    Ok(Desired {
        node,
        services: specs.into_iter().map(|s| (s.key(), s)).collect(),
        maglev_table_size: m.config.maglev_table_size,
        policies: crate::policy::compile::compile(&m, Some(&opts.node)),
    })
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
    let mut desired: Option<Desired> = None;
    let mut pushed = Pushed::default();
    let mut dataplane_down = false;
    let mut last_error: Option<String> = None;
    loop {
        let now = fingerprint(&opts.manifests);
        if seen.as_ref() != Some(&now) {
            seen = Some(now);
            match compute(opts) {
                Ok(d) => {
                    if desired.as_ref().map(|o| &o.node) != Some(&d.node) {
                        eprintln!(
                            "switchyard-control: node {}: {} peers, pod CIDRs {}",
                            d.node.name,
                            d.node.peers.len(),
                            join(&d.node.pod_cidrs)
                        );
                    }
                    desired = Some(d);
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
        if let Some(d) = &desired {
            match reconcile(&opts.api, d, &mut pushed) {
                Ok(pushed_node) => {
                    if dataplane_down || pushed_node {
                        eprintln!(
                            "switchyard-control: dataplane at {} has the node settings, {} Services \
                             and the policies of {} pods",
                            opts.api.display(),
                            d.services.len(),
                            d.policies.pods.len()
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

/// Pushes the node settings unless the dataplane has them already, then the Services and
/// the policies that changed since `pushed` (all of them after a node push: the dataplane
/// restarted or never had any); returns whether it pushed the node settings.
fn reconcile(api: &Path, desired: &Desired, pushed: &mut Pushed) -> Result<bool, String> {
    let mut client = Client::connect(api)
        .map_err(|e| format!("dataplane at {} unreachable: {e}", api.display()))?;
    let status = client.node().map_err(|e| e.to_string())?;
    let push_node = status.spec.as_ref() != Some(&desired.node);
    if push_node {
        client
            .set_node(desired.node.clone())
            .map_err(|e| format!("dataplane refused the node settings: {e}"))?;
        *pushed = Pushed::default();
    }
    if let Some(request) = services_request(desired, pushed.services.as_ref()) {
        client
            .call(request)
            .map_err(|e| format!("dataplane refused the Services: {e}"))?;
        pushed.services = Some(desired.services.clone());
    }
    if pushed.policies.as_ref() != Some(&desired.policies) {
        client
            .call(Request::ApplyPolicies(desired.policies.clone()))
            .map_err(|e| format!("dataplane refused the NetworkPolicy rules: {e}"))?;
        pushed.policies = Some(desired.policies.clone());
    }
    Ok(push_node)
}

/// The request that brings the dataplane's Services from `before` (none: unknown) to
/// `desired`'s; none when they are equal.
fn services_request(
    desired: &Desired,
    before: Option<&BTreeMap<ServiceKey, ServiceSpec>>,
) -> Option<Request> {
    Some(match before {
        None => Request::ApplyServices {
            upsert: desired.services.values().cloned().collect(),
            remove: Vec::new(),
            replace: true,
            maglev_table_size: Some(desired.maglev_table_size),
        },
        Some(before) if before == &desired.services => return None,
        Some(before) => Request::ApplyServices {
            upsert: desired
                .services
                .iter()
                .filter(|(k, s)| before.get(*k) != Some(*s))
                .map(|(_, s)| s.clone())
                .collect(),
            remove: before
                .keys()
                .filter(|k| !desired.services.contains_key(*k))
                .cloned()
                .collect(),
            replace: false,
            maglev_table_size: Some(desired.maglev_table_size),
        },
    })
}

fn join(nets: &[switchyard_api::IpNet]) -> String {
    nets.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}
