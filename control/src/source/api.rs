//! The Kubernetes API server as a source: list and watch (kube-rs' watcher: resourceVersion
//! resume, bookmarks, a relist on 410 Gone, backoff on errors) of Nodes, the
//! `switchyard-config` ConfigMap, Namespaces, Pods, Services, EndpointSlices
//! (`discovery.k8s.io/v1` where served, else `v1beta1`) and NetworkPolicies. Each object
//! goes through the same decoding and validation as a manifest file's.
//!
//! The watches run on a small tokio runtime of their own; the agent's loop reads the
//! objects they keep. Nothing is reported before every kind has been listed once (a
//! partial list could, say, deny traffic to pods not yet seen). While the API server is
//! unreachable the watches retry with backoff and the agent keeps the last state, so the
//! dataplane keeps forwarding.
//!
//! Pod CIDRs come from `Node.spec.podCIDRs`, as kube-controller-manager allocates them
//! (`--allocate-node-cidrs`); a node without one is reported and left out until it has one.

use super::Source;
use crate::cluster::manifests::{self, Manifests, CONFIG_MAP};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{watcher, WatchStreamExt};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// How to reach the API server.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// A kubeconfig file; none: the in-cluster configuration (service account token,
    /// `KUBERNETES_SERVICE_HOST`).
    pub kubeconfig: Option<PathBuf>,
    /// The namespace of the `switchyard-config` ConfigMap.
    pub config_namespace: String,
}

/// One watched kind.
struct Kind {
    name: &'static str,
    resource: ApiResource,
    namespace: Option<String>,
    fields: Option<String>,
}

/// The objects of every kind, by (namespace, name), as JSON.
type Objects = BTreeMap<&'static str, BTreeMap<(String, String), serde_json::Value>>;

/// Shared between the watches and the agent.
#[derive(Default)]
struct Shared {
    objects: Mutex<Objects>,
    /// Bumped by every change.
    changes: AtomicU64,
    /// Kinds listed at least once.
    listed: AtomicUsize,
}

/// The API server, watched.
pub struct ApiSource {
    runtime: tokio::runtime::Runtime,
    client: kube::Client,
    shared: Arc<Shared>,
    kinds: usize,
    seen: u64,
    url: String,
    ready: Arc<Mutex<Ready>>,
}

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

impl ApiSource {
    /// Connects (the kubeconfig or the in-cluster configuration) and starts the watches.
    pub fn connect(opts: &ApiOptions) -> Result<Self, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sy-kube")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the API client's runtime: {e}"))?;
        let config = runtime.block_on(async {
            match &opts.kubeconfig {
                Some(path) => {
                    let file = Kubeconfig::read_from(path)
                        .map_err(|e| format!("kubeconfig {}: {e}", path.display()))?;
                    kube::Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                        .await
                        .map_err(|e| format!("kubeconfig {}: {e}", path.display()))
                }
                None => kube::Config::incluster().map_err(|e| {
                    format!(
                        "no --kubeconfig, --manifests or in-cluster configuration \
                         (KUBERNETES_SERVICE_HOST and a service account token): {e}"
                    )
                }),
            }
        })?;
        let url = config.cluster_url.to_string();
        let client = {
            let _guard = runtime.enter();
            kube::Client::try_from(config).map_err(|e| format!("API client for {url}: {e}"))?
        };
        let slices = runtime.block_on(endpoint_slice_version(&client));
        let kinds = vec![
            Kind {
                name: "Node",
                resource: resource("", "v1", "Node", "nodes"),
                namespace: None,
                fields: None,
            },
            Kind {
                name: "ConfigMap",
                resource: resource("", "v1", "ConfigMap", "configmaps"),
                namespace: Some(opts.config_namespace.clone()),
                fields: Some(format!("metadata.name={CONFIG_MAP}")),
            },
            Kind {
                name: "Namespace",
                resource: resource("", "v1", "Namespace", "namespaces"),
                namespace: None,
                fields: None,
            },
            Kind {
                name: "Pod",
                resource: resource("", "v1", "Pod", "pods"),
                namespace: None,
                fields: None,
            },
            Kind {
                name: "Service",
                resource: resource("", "v1", "Service", "services"),
                namespace: None,
                fields: None,
            },
            Kind {
                name: "EndpointSlice",
                resource: resource(
                    "discovery.k8s.io",
                    slices,
                    "EndpointSlice",
                    "endpointslices",
                ),
                namespace: None,
                fields: None,
            },
            Kind {
                name: "NetworkPolicy",
                resource: resource(
                    "networking.k8s.io",
                    "v1",
                    "NetworkPolicy",
                    "networkpolicies",
                ),
                namespace: None,
                fields: None,
            },
        ];
        let shared = Arc::new(Shared::default());
        let count = kinds.len();
        for kind in kinds {
            runtime.spawn(watch(client.clone(), kind, shared.clone()));
        }
        Ok(Self {
            runtime,
            client,
            shared,
            kinds: count,
            seen: u64::MAX,
            url,
            ready: Arc::new(Mutex::new(Ready::NotYet)),
        })
    }

    /// The cluster state now (for `explain --kubeconfig`): waits until every kind has been
    /// listed, up to `timeout`.
    pub fn snapshot(&mut self, timeout: std::time::Duration) -> Result<Manifests, Vec<String>> {
        let deadline = std::time::Instant::now() + timeout;
        while self.shared.listed.load(Ordering::Acquire) < self.kinds {
            if std::time::Instant::now() > deadline {
                return Err(vec![format!(
                    "the API server at {} did not answer every list within {timeout:?}",
                    self.url
                )]);
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.build()
    }

    /// The objects as manifests, nodes without pod CIDRs left out.
    fn build(&self) -> Result<Manifests, Vec<String>> {
        let mut m = Manifests::default();
        let mut errors = Vec::new();
        {
            let objects = self
                .shared
                .objects
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for (kind, items) in objects.iter() {
                let origin = PathBuf::from(format!("kube-apiserver {kind}"));
                for ((namespace, name), value) in items {
                    let what = if namespace.is_empty() {
                        format!("{kind} {name}")
                    } else {
                        format!("{kind} {namespace}/{name}")
                    };
                    manifests::load_value(&origin, &what, value.clone(), &mut m, &mut errors);
                }
            }
        }
        let mut report: Vec<String> = errors.iter().map(ToString::to_string).collect();
        m.nodes.sort_by(|a, b| a.name.cmp(&b.name));
        m.nodes.retain(|n| {
            if n.pod_cidrs.is_empty() {
                report.push(format!(
                    "Node {}: no spec.podCIDRs yet (kube-controller-manager allocates them with \
                     --allocate-node-cidrs); left out until it has one",
                    n.name
                ));
            }
            !n.pod_cidrs.is_empty()
        });
        // A node waiting for its CIDR is not an error that should hold back the others.
        if errors.is_empty() {
            for line in report.iter().filter(|l| l.starts_with("Node ")) {
                tracing::warn!("{line}");
            }
            Ok(m)
        } else {
            Err(report)
        }
    }
}

impl Source for ApiSource {
    fn changed(&mut self) -> Option<Result<Manifests, Vec<String>>> {
        if self.shared.listed.load(Ordering::Acquire) < self.kinds {
            return None;
        }
        let now = self.shared.changes.load(Ordering::Acquire);
        if now == self.seen {
            return None;
        }
        self.seen = now;
        Some(self.build())
    }

    fn network_ready(&mut self, node: &str) -> Result<(), String> {
        // The patch runs on the watches' runtime; its outcome is read at a later call, so
        // the agent's loop never waits on the API server.
        let outcome = self.ready.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match outcome {
            Ready::Done => return Ok(()),
            Ready::Pending => return Ok(()),
            Ready::Failed(e) => {
                *self.ready.lock().unwrap_or_else(|e| e.into_inner()) = Ready::Pending;
                self.spawn_ready_patch(node);
                return Err(e);
            }
            Ready::NotYet => {}
        }
        *self.ready.lock().unwrap_or_else(|e| e.into_inner()) = Ready::Pending;
        self.spawn_ready_patch(node);
        Ok(())
    }

    fn describe(&self) -> String {
        format!("the API server at {}", self.url)
    }
}

/// Where the `NetworkUnavailable` patch stands.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ready {
    NotYet,
    Pending,
    Done,
    Failed(String),
}

impl ApiSource {
    /// Sets `node`'s `NetworkUnavailable` condition to `False`, in the background.
    fn spawn_ready_patch(&self, node: &str) {
        let now = jiff::Timestamp::now().to_string();
        let patch = serde_json::json!({"status": {"conditions": [{
            "type": "NetworkUnavailable",
            "status": "False",
            "reason": "SwitchyardIsUp",
            "message": "Switchyard's dataplane forwards on this node",
            "lastTransitionTime": now,
            "lastHeartbeatTime": now,
        }]}});
        let nodes: Api<Node> = Api::all(self.client.clone());
        let (node, ready) = (node.to_string(), self.ready.clone());
        self.runtime.spawn(async move {
            let result = nodes
                .patch_status(&node, &PatchParams::default(), &Patch::Strategic(patch))
                .await;
            *ready.lock().unwrap_or_else(|e| e.into_inner()) = match result {
                Ok(_) => Ready::Done,
                Err(e) => Ready::Failed(format!(
                    "cannot set Node {node}'s NetworkUnavailable condition: {e}"
                )),
            };
        });
    }
}

/// How long a watch waits before it tries again after an error: 250 ms, doubling up to 2 s
/// (not kube-rs' 30 s: an API server that comes back should be read at once; the agent
/// is one client per node, not a controller fleet).
#[derive(Debug, Clone)]
struct Retry(std::time::Duration);

impl Default for Retry {
    fn default() -> Self {
        Self(std::time::Duration::from_millis(250))
    }
}

impl Iterator for Retry {
    type Item = std::time::Duration;

    fn next(&mut self) -> Option<std::time::Duration> {
        let wait = self.0;
        self.0 = (self.0 * 2).min(std::time::Duration::from_secs(2));
        Some(wait)
    }
}

impl kube::runtime::utils::Backoff for Retry {
    fn reset(&mut self) {
        *self = Self::default();
    }
}

/// The EndpointSlice version the server serves: `v1`, else `v1beta1` (Kubernetes before
/// 1.21).
async fn endpoint_slice_version(client: &kube::Client) -> &'static str {
    match client.list_api_group_resources("discovery.k8s.io/v1").await {
        Ok(list) if list.resources.iter().any(|r| r.name == "endpointslices") => "v1",
        _ => "v1beta1",
    }
}

/// Keeps `shared`'s objects of one kind in line with the server until the process ends.
async fn watch(client: kube::Client, kind: Kind, shared: Arc<Shared>) {
    let api: Api<DynamicObject> = match &kind.namespace {
        Some(ns) => Api::namespaced_with(client, ns, &kind.resource),
        None => Api::all_with(client, &kind.resource),
    };
    let mut config = watcher::Config::default();
    if let Some(fields) = &kind.fields {
        config = config.fields(fields);
    }
    let mut events = watcher(api, config).backoff(Retry::default()).boxed();
    let mut relist: Option<BTreeMap<(String, String), serde_json::Value>> = None;
    let mut listed_once = false;
    let mut last_error = String::new();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                let text = e.to_string();
                if text != last_error {
                    tracing::warn!("watching {}s: {text} (retrying)", kind.name);
                    last_error = text;
                }
                continue;
            }
        };
        last_error.clear();
        if std::env::var_os("SWITCHYARD_DEBUG_WATCH").is_some() {
            let what = match &event {
                watcher::Event::Apply(o) => format!("apply {:?}", o.metadata.name),
                watcher::Event::Delete(o) => format!("delete {:?}", o.metadata.name),
                watcher::Event::Init => "init".into(),
                watcher::Event::InitApply(o) => format!("init-apply {:?}", o.metadata.name),
                watcher::Event::InitDone => "init-done".into(),
            };
            tracing::info!("watch {}: {what}", kind.name);
        }
        match event {
            watcher::Event::Init => relist = Some(BTreeMap::new()),
            watcher::Event::InitApply(o) => {
                if let Some(buffer) = relist.as_mut() {
                    let (key, value) = entry(&kind, o);
                    buffer.insert(key, value);
                }
            }
            watcher::Event::InitDone => {
                let fresh = relist.take().unwrap_or_default();
                let mut objects = shared.objects.lock().unwrap_or_else(|e| e.into_inner());
                let unchanged = objects.get(kind.name) == Some(&fresh);
                objects.insert(kind.name, fresh);
                drop(objects);
                if !unchanged {
                    shared.changes.fetch_add(1, Ordering::AcqRel);
                }
                if !listed_once {
                    listed_once = true;
                    shared.listed.fetch_add(1, Ordering::AcqRel);
                    shared.changes.fetch_add(1, Ordering::AcqRel);
                }
            }
            watcher::Event::Apply(o) => {
                let (key, value) = entry(&kind, o);
                let mut objects = shared.objects.lock().unwrap_or_else(|e| e.into_inner());
                let items = objects.entry(kind.name).or_default();
                if items.get(&key) != Some(&value) {
                    items.insert(key, value);
                    shared.changes.fetch_add(1, Ordering::AcqRel);
                }
            }
            watcher::Event::Delete(o) => {
                let (key, _) = entry(&kind, o);
                let mut objects = shared.objects.lock().unwrap_or_else(|e| e.into_inner());
                if objects.entry(kind.name).or_default().remove(&key).is_some() {
                    shared.changes.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
    }
}

/// An object's key and its JSON, with `apiVersion` and `kind` set (list items lack them),
/// and without the fields that change on every write but mean nothing here.
fn entry(kind: &Kind, o: DynamicObject) -> ((String, String), serde_json::Value) {
    let key = (
        o.metadata.namespace.clone().unwrap_or_default(),
        o.metadata.name.clone().unwrap_or_default(),
    );
    let mut value = serde_json::to_value(&o).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert(
            "apiVersion".into(),
            kind.resource.api_version.clone().into(),
        );
        map.insert("kind".into(), kind.name.into());
        if let Some(meta) = map.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            for noise in ["resourceVersion", "managedFields", "generation"] {
                meta.remove(noise);
            }
        }
        if kind.name == "Node" {
            // Heartbeats rewrite a Node's conditions every few seconds.
            if let Some(status) = map.get_mut("status").and_then(|s| s.as_object_mut()) {
                status.remove("conditions");
            }
        }
    }
    (key, value)
}
