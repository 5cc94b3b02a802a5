//! The Kubernetes API server as a source: list and watch (kube-rs' watcher: resourceVersion
//! resume, bookmarks, a relist on 410 Gone, backoff on errors) of Nodes, the
//! `switchyard-config` ConfigMap, Namespaces, Pods, Services, EndpointSlices
//! (`discovery.k8s.io/v1` where served, else `v1beta1`) and NetworkPolicies. Each object
//! goes through the same decoding and validation as a manifest file's.
//!
//! The watches run on a small tokio runtime of their own and decode each object once, as
//! its event arrives, into a [`Store`] that the agent's loop reads (and is woken by).
//! Nothing is reported before every kind has been listed once (a partial list could, say,
//! deny traffic to pods not yet seen). While the API server is
//! unreachable the watches retry with backoff and the agent keeps the last state, so the
//! dataplane keeps forwarding.
//!
//! Pod CIDRs come from `Node.spec.podCIDRs`, as kube-controller-manager allocates them
//! (`--allocate-node-cidrs`); a node without one is reported and left out until it has one.

use super::store::{Decoded, Store};
use super::{Change, Source};
use crate::cluster::keyed::ObjectKey;
use crate::cluster::manifests::{Kind, Manifests, CONFIG_MAP};
use crate::cluster::pods::PodFields;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{watcher, WatchStreamExt};
use serde::de::DeserializeOwned;
use std::borrow::Cow;
use std::fmt::Debug;
use std::ops::Deref;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

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
struct Watched {
    kind: Kind,
    resource: ApiResource,
    namespace: Option<String>,
    fields: Option<String>,
}

/// Shared between the watches and the agent.
#[derive(Default)]
struct Shared {
    store: Mutex<Store>,
    /// Notified after every change to the store.
    wake: Condvar,
    /// Kinds listed at least once.
    listed: AtomicUsize,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The API server, watched.
pub struct ApiSource {
    runtime: tokio::runtime::Runtime,
    client: kube::Client,
    shared: Arc<Shared>,
    kinds: usize,
    url: String,
    ready: Arc<Mutex<Ready>>,
}

/// The store's state, locked while the agent reads it.
struct StateGuard<'a>(MutexGuard<'a, Store>);

impl Deref for StateGuard<'_> {
    type Target = Manifests;

    fn deref(&self) -> &Manifests {
        self.0.state()
    }
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
            Watched {
                kind: Kind::Node,
                resource: resource("", "v1", "Node", "nodes"),
                namespace: None,
                fields: None,
            },
            Watched {
                kind: Kind::Config,
                resource: resource("", "v1", "ConfigMap", "configmaps"),
                namespace: Some(opts.config_namespace.clone()),
                fields: Some(format!("metadata.name={CONFIG_MAP}")),
            },
            Watched {
                kind: Kind::Namespace,
                resource: resource("", "v1", "Namespace", "namespaces"),
                namespace: None,
                fields: None,
            },
            Watched {
                kind: Kind::Pod,
                resource: resource("", "v1", "Pod", "pods"),
                namespace: None,
                fields: None,
            },
            Watched {
                kind: Kind::Service,
                resource: resource("", "v1", "Service", "services"),
                namespace: None,
                fields: None,
            },
            Watched {
                kind: Kind::EndpointSlice,
                resource: resource(
                    "discovery.k8s.io",
                    slices,
                    "EndpointSlice",
                    "endpointslices",
                ),
                namespace: None,
                fields: None,
            },
            Watched {
                kind: Kind::NetworkPolicy,
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
            spawn_watch(&runtime, client.clone(), kind, shared.clone());
        }
        Ok(Self {
            runtime,
            client,
            shared,
            kinds: count,
            url,
            ready: Arc::new(Mutex::new(Ready::NotYet)),
        })
    }

    /// The cluster state now (for `explain --kubeconfig`): waits until every kind has been
    /// listed, up to `timeout`.
    pub fn snapshot(&mut self, timeout: Duration) -> Result<Manifests, Vec<String>> {
        let deadline = std::time::Instant::now() + timeout;
        while self.shared.listed.load(Ordering::Acquire) < self.kinds {
            if std::time::Instant::now() > deadline {
                return Err(vec![format!(
                    "the API server at {} did not answer every list within {timeout:?}",
                    self.url
                )]);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let store = self.shared.store();
        let errors = store.errors();
        if errors.is_empty() {
            Ok(store.state().clone())
        } else {
            Err(errors)
        }
    }
}

impl Source for ApiSource {
    fn changed(&mut self) -> Option<Change> {
        if self.shared.listed.load(Ordering::Acquire) < self.kinds {
            return None;
        }
        self.shared.store().take_changes()
    }

    fn state(&self) -> Box<dyn Deref<Target = Manifests> + '_> {
        Box::new(StateGuard(self.shared.store()))
    }

    fn wait(&self, timeout: Duration) {
        let store = self.shared.store();
        let listed = self.shared.listed.load(Ordering::Acquire) >= self.kinds;
        if listed && store.pending() {
            return;
        }
        let _ = self.shared.wake.wait_timeout(store, timeout);
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

/// An object type a watch decodes into the store.
trait Watchable: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static {
    /// The object, decoded for the store.
    fn decode(self, watched: &Watched) -> Decoded;
}

impl Watchable for DynamicObject {
    fn decode(self, watched: &Watched) -> Decoded {
        let (key, value) = entry(&watched.resource, self);
        Decoded::new(watched.kind, key, value)
    }
}

impl Watchable for PodFields {
    fn decode(self, _: &Watched) -> Decoded {
        Decoded::pod(&self)
    }
}

/// A pod's fields are what the API serves at `/api/v1/pods`.
impl kube::Resource for PodFields {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind((): &()) -> Cow<'_, str> {
        Pod::kind(&())
    }

    fn group((): &()) -> Cow<'_, str> {
        Pod::group(&())
    }

    fn version((): &()) -> Cow<'_, str> {
        Pod::version(&())
    }

    fn plural((): &()) -> Cow<'_, str> {
        Pod::plural(&())
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Starts the watch of one kind: Pods straight into their fields (a cluster's largest
/// list by far), every other kind as JSON decoded as a manifest's.
fn spawn_watch(
    runtime: &tokio::runtime::Runtime,
    client: kube::Client,
    kind: Watched,
    shared: Arc<Shared>,
) {
    if kind.kind == Kind::Pod {
        runtime.spawn(watch(Api::<PodFields>::all(client), kind, shared));
        return;
    }
    let api: Api<DynamicObject> = match &kind.namespace {
        Some(ns) => Api::namespaced_with(client, ns, &kind.resource),
        None => Api::all_with(client, &kind.resource),
    };
    runtime.spawn(watch(api, kind, shared));
}

/// Objects per page of a list. Each page is one range read in etcd, and etcd 3.4 walks the
/// index of every key after the page to count them, so a list costs etcd about pages times
/// objects: at 150,000 pods, client-go's 500 per page cost etcd 8-9 CPU-seconds and 5,000
/// cost 1.7-1.9 (docs/benchmarks.md). A page of 5,000 pods' fields is a few MiB here.
const LIST_PAGE: u32 = 5_000;

/// Keeps `shared`'s objects of one kind in line with the server until the process ends.
async fn watch<K: Watchable>(api: Api<K>, kind: Watched, shared: Arc<Shared>) {
    let kind = Arc::new(kind);
    let mut config = watcher::Config::default().page_size(LIST_PAGE);
    if let Some(fields) = &kind.fields {
        config = config.fields(fields);
    }
    let mut events = watcher(api, config).backoff(Retry::default()).boxed();
    let mut relist: Option<Relist<K>> = None;
    let mut listed_once = false;
    let mut last_error = String::new();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                let text = e.to_string();
                if text != last_error {
                    tracing::warn!("watching {}s: {text} (retrying)", kind.kind);
                    last_error = text;
                }
                continue;
            }
        };
        last_error.clear();
        if std::env::var_os("SWITCHYARD_DEBUG_WATCH").is_some() {
            let name = |o: &K| o.meta().name.clone();
            let what = match &event {
                watcher::Event::Apply(o) => format!("apply {:?}", name(o)),
                watcher::Event::Delete(o) => format!("delete {:?}", name(o)),
                watcher::Event::Init => "init".into(),
                watcher::Event::InitApply(o) => format!("init-apply {:?}", name(o)),
                watcher::Event::InitDone => "init-done".into(),
            };
            tracing::info!("watch {}: {what}", kind.kind);
        }
        match event {
            watcher::Event::Init => relist = Some(Relist::default()),
            watcher::Event::InitApply(o) => {
                if let Some(list) = relist.as_mut() {
                    list.push(&kind, o);
                }
                // Nothing for the agent yet: the store changes at the list's end.
                continue;
            }
            watcher::Event::InitDone => {
                let fresh = match relist.take() {
                    Some(list) => list.finish(&kind).await,
                    None => Vec::new(),
                };
                shared.store().relist(kind.kind, fresh);
                if !listed_once {
                    listed_once = true;
                    shared.listed.fetch_add(1, Ordering::AcqRel);
                }
            }
            watcher::Event::Apply(o) => {
                let decoded = o.decode(&kind);
                shared.store().apply_decoded(decoded);
            }
            watcher::Event::Delete(o) => {
                shared.store().delete(kind.kind, &key_of(o.meta()));
            }
        }
        shared.wake.notify_all();
    }
}

/// A list in progress: its objects are decoded in chunks on the runtime's blocking
/// threads, so that the next page is fetched (and the API server prepares it) meanwhile.
struct Relist<K> {
    pending: Vec<K>,
    chunks: Vec<tokio::task::JoinHandle<Vec<Decoded>>>,
}

impl<K> Default for Relist<K> {
    fn default() -> Self {
        Self {
            pending: Vec::new(),
            chunks: Vec::new(),
        }
    }
}

/// Objects decoded per chunk of a list.
const CHUNK: usize = 500;

impl<K: Watchable> Relist<K> {
    fn push(&mut self, kind: &Arc<Watched>, o: K) {
        self.pending.push(o);
        if self.pending.len() >= CHUNK {
            self.flush(kind);
        }
    }

    fn flush(&mut self, kind: &Arc<Watched>) {
        let objects = std::mem::take(&mut self.pending);
        let kind = kind.clone();
        self.chunks.push(tokio::task::spawn_blocking(move || {
            objects.into_iter().map(|o| o.decode(&kind)).collect()
        }));
    }

    /// Every object of the list, decoded.
    async fn finish(mut self, kind: &Arc<Watched>) -> Vec<Decoded> {
        self.flush(kind);
        let mut out = Vec::new();
        for chunk in self.chunks {
            match chunk.await {
                Ok(decoded) => out.extend(decoded),
                Err(e) => tracing::error!("decoding a list of {}s failed: {e}", kind.kind),
            }
        }
        out
    }
}

/// An object's key: its namespace (empty for cluster-wide kinds) and name.
fn key_of(meta: &ObjectMeta) -> ObjectKey {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// An object's key and its JSON, with `apiVersion` and `kind` set (list items lack them).
/// The object's fields are moved, not copied, and its `managedFields` (often the larger
/// part of an object, and nothing Switchyard reads) are left out.
fn entry(resource: &ApiResource, o: DynamicObject) -> (ObjectKey, serde_json::Value) {
    let DynamicObject {
        mut metadata, data, ..
    } = o;
    let key = key_of(&metadata);
    metadata.managed_fields = None;
    let mut map = match data {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    map.insert(
        "metadata".into(),
        serde_json::to_value(&metadata).unwrap_or_default(),
    );
    map.insert("apiVersion".into(), resource.api_version.clone().into());
    map.insert("kind".into(), resource.kind.clone().into());
    (key, serde_json::Value::Object(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_the_object_as_a_manifest_without_managed_fields() {
        let listed: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "a", "namespace": "x", "labels": {"app": "web"},
                         "managedFields": [{"manager": "kubelet", "operation": "Update"}]},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox"}]},
            "status": {"podIPs": [{"ip": "10.244.0.5"}]}
        }))
        .unwrap();
        let (key, value) = entry(&resource("", "v1", "Pod", "pods"), listed);
        assert_eq!(key, ("x".to_string(), "a".to_string()));
        assert_eq!(value["apiVersion"], "v1");
        assert_eq!(value["kind"], "Pod");
        assert!(value["metadata"].get("managedFields").is_none());
        assert_eq!(value["metadata"]["labels"]["app"], "web");
        let decoded = Decoded::new(Kind::Pod, key, value);
        let mut store = Store::default();
        store.apply_decoded(decoded);
        let pod = &store.state().pods[0];
        assert_eq!(pod.node.as_deref(), Some("n1"));
        assert_eq!(
            pod.ips,
            vec!["10.244.0.5".parse::<std::net::IpAddr>().unwrap()]
        );
    }
}
