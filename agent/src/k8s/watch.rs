//! The watcher of this node's pods (`spec.nodeName`), with owner lookups to
//! name each pod's workload.

use std::collections::{BTreeMap, HashMap};

use anyhow::Context as _;
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::mpsc;

use super::pod::{
    PodInfo, Update, Workload, controller_owner, marks, oversized, owner_to_walk, pod_info,
    workload,
};

/// Owner lookups through the API, cached per (kind, namespace, name).
struct Owners {
    client: Client,
    cache: HashMap<(String, String, String), Option<(String, String)>>,
}

impl Owners {
    async fn workload(&mut self, pod: &Pod) -> Workload {
        let walked = match owner_to_walk(pod) {
            Some((k, ns, n)) => self.owner_of(k, ns, n).await,
            None => None,
        };
        workload(pod, walked)
    }

    async fn owner_of(
        &mut self,
        kind: String,
        ns: String,
        name: String,
    ) -> Option<(String, String)> {
        let key = (kind.clone(), ns.clone(), name.clone());
        if let Some(v) = self.cache.get(&key) {
            return v.clone();
        }
        let meta = match kind.as_str() {
            "ReplicaSet" => {
                Api::<k8s_openapi::api::apps::v1::ReplicaSet>::namespaced(self.client.clone(), &ns)
                    .get_metadata_opt(&name)
                    .await
                    .ok()
                    .flatten()
                    .map(|o| o.metadata)
            }
            "Job" => Api::<k8s_openapi::api::batch::v1::Job>::namespaced(self.client.clone(), &ns)
                .get_metadata_opt(&name)
                .await
                .ok()
                .flatten()
                .map(|o| o.metadata),
            _ => None,
        };
        let owner = meta.as_ref().and_then(controller_owner);
        if self.cache.len() > 10_000 {
            self.cache.clear();
        }
        self.cache.insert(key, owner.clone());
        owner
    }
}

/// Namespaces' labels through the API, cached per namespace for
/// [`NAMESPACE_TTL`]: a label that marks a namespace's pods (Istio ambient's
/// `istio.io/dataplane-mode`) is read when a pod of it is seen.
struct Namespaces {
    client: Client,
    cache: HashMap<String, (std::time::Instant, BTreeMap<String, String>)>,
}

/// How long a namespace's labels are taken as known.
const NAMESPACE_TTL: std::time::Duration = std::time::Duration::from_secs(60);

impl Namespaces {
    /// The labels of namespace `ns` (none when the API cannot say: the
    /// pod's own marks still count).
    async fn labels(&mut self, ns: &str) -> BTreeMap<String, String> {
        if let Some((at, l)) = self.cache.get(ns)
            && at.elapsed() < NAMESPACE_TTL
        {
            return l.clone();
        }
        let meta = Api::<Namespace>::all(self.client.clone())
            .get_metadata_opt(ns)
            .await;
        let labels = match meta {
            Ok(m) => marks(m.and_then(|m| m.metadata.labels).as_ref()),
            Err(e) => {
                tracing::debug!(namespace = ns, error = %e, "namespace labels unavailable");
                BTreeMap::new()
            }
        };
        if self.cache.len() > 10_000 {
            self.cache.clear();
        }
        self.cache
            .insert(ns.to_string(), (std::time::Instant::now(), labels.clone()));
        labels
    }

    /// `info` with its namespace's labels.
    async fn fill(&mut self, mut info: PodInfo) -> PodInfo {
        let labels = self.labels(&info.namespace).await;
        info.set_namespace_labels(labels);
        info
    }
}

/// How the agent reaches the API.
#[derive(Debug, Clone)]
pub(crate) enum Access {
    /// In-cluster service account (or KUBECONFIG).
    Infer,
    /// An explicit URL, plain HTTP or HTTPS without auth (tests, proxies).
    Url(String),
}

/// Builds a client.
pub(crate) async fn client(access: &Access) -> anyhow::Result<Client> {
    Ok(match access {
        Access::Infer => Client::try_default().await?,
        Access::Url(u) => Client::try_from(kube::Config::new(u.parse()?))?,
    })
}

/// Starts the watcher of `node`'s pods on its own task.
pub(crate) async fn start_watch(
    access: &Access,
    node: String,
) -> anyhow::Result<mpsc::Receiver<Update>> {
    let client = client(access)
        .await
        .context("building the Kubernetes client")?;
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(watch(client, node, tx));
    Ok(rx)
}

/// Watches this node's pods and sends [`Update`]s until the receiver is gone.
pub(crate) async fn watch(client: Client, node: String, tx: mpsc::Sender<Update>) {
    let api: Api<Pod> = Api::all(client.clone());
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut namespaces = Namespaces {
        client: client.clone(),
        cache: HashMap::new(),
    };
    let mut owners = Owners {
        client,
        cache: HashMap::new(),
    };
    let mut stream = watcher(api, cfg).default_backoff().boxed();
    let mut buffer: Vec<PodInfo> = Vec::new();
    let mut failing = false;
    loop {
        let ev = match stream.try_next().await {
            Ok(Some(ev)) => ev,
            Ok(None) => break,
            Err(e) => {
                failing = true;
                if tx.send(Update::Error(e.to_string())).await.is_err() {
                    return;
                }
                continue;
            }
        };
        if failing {
            failing = false;
            if tx.send(Update::Recovered).await.is_err() {
                return;
            }
        }
        let update = match ev {
            watcher::Event::Init => {
                buffer.clear();
                None
            }
            watcher::Event::InitApply(p) => {
                let w = owners.workload(&p).await;
                match pod_info(&p, w).map(|p| (oversized(&p), p)) {
                    Some((Some(why), _)) => Some(Update::Error(why)),
                    Some((None, p)) => {
                        buffer.push(namespaces.fill(p).await);
                        None
                    }
                    None => None,
                }
            }
            watcher::Event::InitDone => Some(Update::Replace(std::mem::take(&mut buffer))),
            watcher::Event::Apply(p) => {
                let w = owners.workload(&p).await;
                match pod_info(&p, w).map(|p| (oversized(&p), p)) {
                    Some((Some(why), _)) => Some(Update::Error(why)),
                    Some((None, p)) => Some(Update::Apply(Box::new(namespaces.fill(p).await))),
                    None => None,
                }
            }
            watcher::Event::Delete(p) => p.metadata.uid.clone().map(Update::Delete),
        };
        if let Some(u) = update
            && tx.send(u).await.is_err()
        {
            return;
        }
    }
}
