//! The per-node agent (`switchyard-control run`): a reconcile loop that keeps one
//! dataplane's state equal to what the cluster says, read from a [`Source`]: a manifests
//! directory or the Kubernetes API server.
//!
//! Every tick (200 ms by default, or at once when the source has a change) it:
//! 1. asks the source what changed; recomputes what the changed kinds feed: this node's
//!    [`NodeSpec`] (Nodes, the configuration), its Services (Services, EndpointSlices,
//!    the configuration) and its pods' NetworkPolicy rules (Namespaces, Pods,
//!    NetworkPolicies). Bad objects are reported with their origin and field, and the last
//!    good state stays in force;
//! 2. pushes the spec when the dataplane's settings differ from it (first start, a change,
//!    or a dataplane that restarted with none): it asks the dataplane for the digest of its
//!    settings when the spec changed, on a new connection, and every
//!    [`DIGEST_RECHECK`] otherwise. The connection is kept between ticks and checked
//!    without a request (a dataplane that stops or restarts closes it), so a tick with
//!    nothing to do costs the dataplane nothing: no connection, no thread, no request,
//!    nothing taking a CPU from its workers five times a second;
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

use crate::cluster::manifests::{Kind, Kinds, Manifests};
use crate::cluster::plan;
use crate::cluster::services;
use crate::source::Source;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use switchyard_api::{Client, NodeSpec, PolicySet, Request, ServiceKey, ServiceSpec};

pub use crate::source::dir::{load, ALLOCATIONS_FILE, SERVICE_ALLOCATIONS_FILE};

/// What one node's dataplane should have.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// The node settings.
    pub node: NodeSpec,
    /// Their digest ([`NodeSpec::digest`]).
    pub node_digest: u64,
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

/// How long the dataplane's confirmation that it holds the node settings is trusted on
/// a connection that stayed open: past it, the digest is asked again (something else may
/// have changed the settings through the API).
pub const DIGEST_RECHECK: Duration = Duration::from_secs(5);

/// The agent's connection to its dataplane, kept from tick to tick.
#[derive(Debug, Default)]
struct Link {
    client: Option<Client>,
    /// The digest of the node settings the dataplane confirmed holding on this
    /// connection, and when.
    confirmed: Option<(u64, Instant)>,
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

fn strings(errors: Vec<crate::cluster::manifests::ManifestError>) -> Vec<String> {
    errors.iter().map(ToString::to_string).collect()
}

/// This node's settings, Services and policies from the cluster state `m`; errors as
/// lines to print.
pub fn compute(
    m: &Manifests,
    source: &dyn Source,
    opts: &AgentOptions,
) -> Result<Desired, Vec<String>> {
    let (services, maglev_table_size) = services_of(m, source, opts)?;
    let node = node_of(m, opts)?;
    Ok(Desired {
        node_digest: node.digest(),
        node,
        services,
        maglev_table_size,
        policies: crate::policy::compile::compile(m, Some(&opts.node)),
    })
}

/// Brings `desired` (none yet: computes it all) up to date with `m` after a change of
/// `kinds`: only the parts those kinds feed are computed again. On error `desired` is left
/// as it was.
pub fn refresh(
    desired: &mut Option<Desired>,
    kinds: Kinds,
    m: &Manifests,
    source: &dyn Source,
    opts: &AgentOptions,
) -> Result<(), Vec<String>> {
    let Some(d) = desired else {
        *desired = Some(compute(m, source, opts)?);
        return Ok(());
    };
    let node = if kinds.any(&[Kind::Node, Kind::Config]) {
        Some(node_of(m, opts)?)
    } else {
        None
    };
    let services = if kinds.any(&[Kind::Service, Kind::EndpointSlice, Kind::Config]) {
        Some(services_of(m, source, opts)?)
    } else {
        None
    };
    if kinds.any(&[Kind::Namespace, Kind::Pod, Kind::NetworkPolicy]) {
        d.policies = crate::policy::compile::compile(m, Some(&opts.node));
    }
    if let Some(node) = node {
        d.node_digest = node.digest();
        d.node = node;
    }
    if let Some((services, size)) = services {
        d.services = services;
        d.maglev_table_size = size;
    }
    Ok(())
}

/// This node's settings.
fn node_of(m: &Manifests, opts: &AgentOptions) -> Result<NodeSpec, Vec<String>> {
    plan::plan(m, &opts.node)
        .and_then(|p| p.to_spec(m, opts.uplink.clone()))
        .map_err(|e| vec![e])
}

/// This node's Services, with allocations recorded, and the largest Maglev table.
fn services_of(
    m: &Manifests,
    source: &dyn Source,
    opts: &AgentOptions,
) -> Result<(BTreeMap<ServiceKey, ServiceSpec>, u32), Vec<String>> {
    let recorded = source.service_allocations();
    let (specs, record) = services::compile(m, &opts.node, &recorded).map_err(strings)?;
    source
        .record_service_allocations(&record)
        .map_err(|e| vec![e])?;
    Ok((
        specs.into_iter().map(|s| (s.key(), s)).collect(),
        m.config.maglev_table_size,
    ))
}

/// Runs the reconcile loop until the process is stopped.
pub fn run(source: &mut dyn Source, opts: &AgentOptions) -> ! {
    tracing::info!("node {} reads {}", opts.node, source.describe());
    let mut agent = Agent::default();
    loop {
        agent.tick(source, opts);
        source.wait(opts.interval);
    }
}

/// The reconcile loop's state between two ticks.
#[derive(Debug, Default)]
pub struct Agent {
    desired: Option<Desired>,
    pushed: Pushed,
    link: Link,
    dataplane_down: bool,
    last_error: Option<String>,
    /// Kinds changed since the desired state was last computed without error.
    dirty: Kinds,
}

impl Agent {
    /// What the dataplane should have, once computed.
    pub fn desired(&self) -> Option<&Desired> {
        self.desired.as_ref()
    }

    /// One reconciliation: takes the source's changes, recomputes what they feed, and
    /// brings the dataplane in line (steps 1-5 above).
    pub fn tick(&mut self, source: &mut dyn Source, opts: &AgentOptions) {
        if let Some(change) = source.changed() {
            self.dirty = self.dirty.union(change.kinds);
            let before = self.desired.as_ref().map(|d| d.node_digest);
            let result = if change.errors.is_empty() {
                let m = source.state();
                refresh(&mut self.desired, self.dirty, &m, &*source, opts)
            } else {
                Err(change.errors)
            };
            match result {
                Ok(()) => {
                    self.dirty = Kinds::default();
                    if let Some(d) = self
                        .desired
                        .as_ref()
                        .filter(|d| before != Some(d.node_digest))
                    {
                        tracing::info!(
                            "node {}: {} peers, pod CIDRs {}",
                            d.node.name,
                            d.node.peers.len(),
                            join(&d.node.pod_cidrs)
                        );
                    }
                }
                Err(errors) => {
                    for e in &errors {
                        tracing::warn!("{e}");
                    }
                    tracing::warn!(
                        "keeping the last good settings ({})",
                        if self.desired.is_some() {
                            "in force"
                        } else {
                            "none yet"
                        }
                    );
                }
            }
        }
        let Some(d) = &self.desired else { return };
        match reconcile(&opts.api, d, &mut self.pushed, &mut self.link) {
            Ok(pushed_node) => {
                if self.dataplane_down || pushed_node {
                    tracing::info!(
                        "dataplane at {} has the node settings, {} Services \
                         and the policies of {} pods",
                        opts.api.display(),
                        d.services.len(),
                        d.policies.pods.len()
                    );
                }
                self.dataplane_down = false;
                self.last_error = None;
                if let Err(e) = source.network_ready(&opts.node) {
                    self.warn_once(e);
                }
            }
            Err(e) => {
                self.warn_once(e);
                self.dataplane_down = true;
            }
        }
    }

    fn warn_once(&mut self, e: String) {
        if self.last_error.as_ref() != Some(&e) {
            tracing::warn!("{e}");
            self.last_error = Some(e);
        }
    }
}

/// Pushes the node settings unless the dataplane has them already, then the Services and
/// the policies that changed since `pushed` (all of them after a node push: the dataplane
/// restarted or never had any), over `link`'s connection (a new one when the dataplane
/// closed it, and after any failure); returns whether it pushed the node settings.
fn reconcile(
    api: &Path,
    desired: &Desired,
    pushed: &mut Pushed,
    link: &mut Link,
) -> Result<bool, String> {
    if !link.client.as_mut().is_some_and(Client::is_open) {
        *link = Link::default();
    }
    let client = match &mut link.client {
        Some(client) => client,
        None => link.client.insert(
            Client::connect(api)
                .map_err(|e| format!("dataplane at {} unreachable: {e}", api.display()))?,
        ),
    };
    let result = push(client, desired, pushed, &mut link.confirmed);
    if result.is_err() {
        *link = Link::default();
    }
    result
}

/// [`reconcile`] over an open connection; `confirmed`: what the dataplane said it holds
/// on it, and when.
fn push(
    client: &mut Client,
    desired: &Desired,
    pushed: &mut Pushed,
    confirmed: &mut Option<(u64, Instant)>,
) -> Result<bool, String> {
    // The digest, not the settings: at thousands of peers, fetching and comparing them
    // would cost milliseconds on both sides.
    let trusted = matches!(*confirmed, Some((digest, at))
        if digest == desired.node_digest && at.elapsed() < DIGEST_RECHECK);
    let mut push_node = false;
    if !trusted {
        let digest = client.node_digest().map_err(|e| e.to_string())?;
        push_node = digest != Some(desired.node_digest);
        if push_node {
            client
                .set_node(desired.node.clone())
                .map_err(|e| format!("dataplane refused the node settings: {e}"))?;
            *pushed = Pushed::default();
        }
        *confirmed = Some((desired.node_digest, Instant::now()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::memory::MemorySource;
    use crate::source::synthetic::{self, Size};
    use serde_json::json;

    /// One change to the cluster.
    type Event<'a> = Box<dyn Fn(&mut MemorySource) + 'a>;

    const SIZE: Size = Size {
        nodes: 6,
        pods_per_node: 4,
        namespaces: 2,
    };

    fn options() -> AgentOptions {
        AgentOptions {
            node: "node-1".into(),
            api: "/nonexistent".into(),
            uplink: Some("eth0".into()),
            interval: Duration::from_millis(200),
        }
    }

    /// After each event, what the changed kinds recompute equals a computation from
    /// scratch: no kind feeds a part it is not declared to feed.
    #[test]
    fn a_refresh_after_each_change_equals_a_full_computation() {
        let mut source = MemorySource::default();
        for (kind, key, value) in synthetic::objects(SIZE) {
            source.store.apply(kind, key, value);
        }
        let service = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "ns-0"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": 8080}]}});
        let slice = json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "ns-0",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["10.0.0.2"], "nodeName": "node-0"}]});
        let config = |cidr: &str| {
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "switchyard-config", "namespace": "kube-system"},
                "data": {"config.yaml": format!("clusterCIDR: {cidr}\nbackend:\n  type: vxlan\n")}})
        };
        let ns_key = |ns: &str, name: &str| (ns.to_string(), name.to_string());
        let events: Vec<Event<'_>> = vec![
            Box::new(|s| {
                let (k, key, v) = synthetic::node(SIZE.nodes);
                s.store.apply(k, key, v)
            }),
            Box::new(|s| s.store.delete(Kind::Node, &ns_key("", "node-3"))),
            Box::new(|s| {
                let (k, key, v) = synthetic::pod(SIZE, 1, SIZE.pods_per_node);
                s.store.apply(k, key, v)
            }),
            Box::new(|s| {
                // A relabelled pod elsewhere: the peers of the node's policy rules change.
                let (k, key, mut v) = synthetic::pod(SIZE, 3, 0);
                v["metadata"]["labels"]["app"] = json!("app-1");
                s.store.apply(k, key, v)
            }),
            Box::new(|s| s.store.delete(Kind::Pod, &ns_key("ns-1", "app-1-1"))),
            Box::new(move |s| {
                s.store
                    .apply(Kind::Service, ns_key("ns-0", "web"), service.clone())
            }),
            Box::new(move |s| {
                s.store
                    .apply(Kind::EndpointSlice, ns_key("ns-0", "web-1"), slice.clone())
            }),
            Box::new(|s| {
                s.store
                    .delete(Kind::NetworkPolicy, &ns_key("ns-1", "app-0-from-app-1"))
            }),
            Box::new(move |s| {
                s.store.apply(
                    Kind::Config,
                    ns_key("kube-system", "switchyard-config"),
                    config("10.0.0.0/9"),
                )
            }),
            Box::new(|s| {
                s.store.apply(
                    Kind::Namespace,
                    ns_key("", "ns-0"),
                    json!({"apiVersion": "v1", "kind": "Namespace",
                           "metadata": {"name": "ns-0", "labels": {"team": "other"}}}),
                )
            }),
        ];
        let opts = options();
        let mut desired = None;
        let change = source.changed().unwrap();
        refresh(&mut desired, change.kinds, &source.state(), &source, &opts).unwrap();
        let mut policies_seen = 0;
        let mut rules_changed = 0;
        for (i, event) in events.iter().enumerate() {
            let before = desired.clone();
            event(&mut source);
            let change = source.changed().expect("every event changes something");
            assert!(change.errors.is_empty(), "{:?}", change.errors);
            let m = source.state();
            refresh(&mut desired, change.kinds, &m, &source, &opts).unwrap();
            let full = compute(&m, &source, &opts).unwrap();
            assert_eq!(desired.as_ref(), Some(&full), "after event {i}");
            policies_seen += full.policies.pods.len();
            rules_changed += usize::from(before.map(|b| b.policies) != Some(full.policies));
        }
        assert!(
            policies_seen > 0,
            "the node's pods are selected by a policy"
        );
        assert!(
            rules_changed >= 3,
            "events changed the node's rules: {rules_changed}"
        );
    }
}
