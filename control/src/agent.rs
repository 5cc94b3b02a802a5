//! The per-node agent (`switchyard-control run`): a reconcile loop that keeps one
//! dataplane's state equal to what the cluster says, read from a [`Source`]: a manifests
//! directory or the Kubernetes API server.
//!
//! Every tick (200 ms by default) it:
//! 1. asks the source whether the cluster changed; when it did, computes this node's
//!    [`NodeSpec`], its Services and its pods' NetworkPolicy rules. Bad objects are
//!    reported with their origin and field, and the last good state stays in force;
//! 2. asks the dataplane for the settings in force and pushes the spec when they differ
//!    (first start, a change, or a dataplane that restarted with none);
//! 3. pushes the Services (from Services and EndpointSlices; cluster IPs and node ports
//!    the source has no allocation for are allocated and recorded by it): only what changed
//!    since the last push, or all of them to a dataplane that restarted;
//! 4. pushes the NetworkPolicy rules of this node's pods (from Namespaces, Pods and
//!    NetworkPolicies) when they changed, or to a dataplane that restarted;
//! 5. tells the source once the dataplane forwards (the API source then sets the Node's
//!    `NetworkUnavailable` condition to `False`).
//!
//! So a change reaches the dataplane within one tick plus the push, and a restarted
//! dataplane gets its state back within one tick of answering.

use crate::cluster::manifests::Manifests;
use crate::cluster::plan;
use crate::cluster::services;
use crate::source::Source;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;
use switchyard_api::{Client, NodeSpec, PolicySet, Request, ServiceKey, ServiceSpec};

pub use crate::source::dir::{load, ALLOCATIONS_FILE, SERVICE_ALLOCATIONS_FILE};

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
    /// The dataplane's API socket.
    pub api: PathBuf,
    /// Uplink interface override.
    pub uplink: Option<String>,
    /// Time between two reconciliations.
    pub interval: Duration,
}

/// This node's settings, Services and policies from the cluster state `m`; errors as
/// lines to print.
pub fn compute(
    m: &Manifests,
    source: &dyn Source,
    opts: &AgentOptions,
) -> Result<Desired, Vec<String>> {
    let strings = |errors: Vec<crate::cluster::manifests::ManifestError>| -> Vec<String> {
        errors.iter().map(ToString::to_string).collect()
    };
    let recorded = source.service_allocations();
    let (specs, record) = services::compile(m, &opts.node, &recorded).map_err(strings)?;
    source
        .record_service_allocations(&record)
        .map_err(|e| vec![e])?;
    let node = plan::plan(m, &opts.node)
        .and_then(|p| p.to_spec(m, opts.uplink.clone()))
        .map_err(|e| vec![e])?;
    Ok(Desired {
        node,
        services: specs.into_iter().map(|s| (s.key(), s)).collect(),
        maglev_table_size: m.config.maglev_table_size,
        policies: crate::policy::compile::compile(m, Some(&opts.node)),
    })
}

/// Runs the reconcile loop until the process is stopped.
pub fn run(source: &mut dyn Source, opts: &AgentOptions) -> ! {
    tracing::info!("node {} reads {}", opts.node, source.describe());
    let mut desired: Option<Desired> = None;
    let mut pushed = Pushed::default();
    let mut dataplane_down = false;
    let mut last_error: Option<String> = None;
    loop {
        if let Some(state) = source.changed() {
            match state.and_then(|m| compute(&m, source, opts)) {
                Ok(d) => {
                    if desired.as_ref().map(|o| &o.node) != Some(&d.node) {
                        tracing::info!(
                            "node {}: {} peers, pod CIDRs {}",
                            d.node.name,
                            d.node.peers.len(),
                            join(&d.node.pod_cidrs)
                        );
                    }
                    desired = Some(d);
                }
                Err(errors) => {
                    for e in &errors {
                        tracing::warn!("{e}");
                    }
                    tracing::warn!(
                        "keeping the last good settings ({})",
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
                        tracing::info!(
                            "dataplane at {} has the node settings, {} Services \
                             and the policies of {} pods",
                            opts.api.display(),
                            d.services.len(),
                            d.policies.pods.len()
                        );
                    }
                    dataplane_down = false;
                    last_error = None;
                    if let Err(e) = source.network_ready(&opts.node) {
                        if last_error.as_ref() != Some(&e) {
                            tracing::warn!("{e}");
                            last_error = Some(e);
                        }
                    }
                }
                Err(e) => {
                    if last_error.as_ref() != Some(&e) {
                        tracing::warn!("{e}");
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
