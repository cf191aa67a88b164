//! The baselines: the floor (a minimal client doing the same writes as pullkeeper, in bulk
//! and as a watch-and-write loop for new namespaces) and the DIY kubectl loop.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use kube::api::{ListParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use pullkeeper::controller::index::Account;
use pullkeeper::controller::service_account::add_patch;
use serde_json::json;

use super::cluster::{CONCURRENCY, LABEL};

/// Label on the floor's Secrets.
pub const SECRET_LABEL: &str = "bench-floor";
/// Prefix of the floor's Secret names (`floor-00` ..).
pub const PREFIX: &str = "floor-";

fn names(k: usize) -> Vec<String> {
    (0..k).map(|i| format!("{PREFIX}{i:02}")).collect()
}

fn dockerconfig(password: &str) -> String {
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("robot:{password}"));
    json!({"auths": {"registry.example.com:5000": {"username": "robot", "password": password, "auth": auth}}})
        .to_string()
}

/// Server-side applies Secret `name` in `namespace`.
async fn apply_secret(client: &Client, namespace: &str, name: &str, data: &str) {
    let body = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": {SECRET_LABEL: "true"}},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": data},
    });
    Api::<Secret>::namespaced(client.clone(), namespace)
        .patch(name, &PatchParams::apply("floor").force(), &Patch::Apply(body))
        .await
        .expect("floor apply");
}

/// Appends each of `names` to the `default` ServiceAccount, one JSON patch each, guarded by
/// the resourceVersion it was computed from (pullkeeper's own patch); on a conflict it reads
/// the ServiceAccount again and retries.
async fn append_entries(client: &Client, namespace: &str, mut sa: ServiceAccount, names: &[String]) {
    let api = Api::<ServiceAccount>::namespaced(client.clone(), namespace);
    for name in names {
        for attempt in 0.. {
            let Some(patch) = add_patch(&Account::of(&sa), name) else {
                break;
            };
            let patch: json_patch::Patch = serde_json::from_value(patch).expect("json patch");
            match api
                .patch("default", &PatchParams::default(), &Patch::<()>::Json(patch))
                .await
            {
                Ok(updated) => {
                    sa = updated;
                    break;
                }
                Err(e) => {
                    assert!(attempt < 10, "patching {namespace}/default: {e}");
                    sa = api.get("default").await.expect("service account");
                }
            }
        }
    }
}

/// The floor fan-out: for each namespace, `k` Secret applies then `k` ServiceAccount
/// patches, 32 namespaces at a time. The ServiceAccounts come from one list beforehand, as
/// any controller has them in a watch cache.
pub async fn fanout(client: &Client, namespaces: &[String], k: usize) -> Duration {
    let mut sas: HashMap<String, ServiceAccount> = Api::<ServiceAccount>::all(client.clone())
        .list(&ListParams::default().fields("metadata.name=default"))
        .await
        .expect("service accounts")
        .items
        .into_iter()
        .map(|sa| (sa.namespace().unwrap_or_default(), sa))
        .collect();
    let work: Vec<(String, ServiceAccount)> = namespaces
        .iter()
        .map(|ns| (ns.clone(), sas.remove(ns).expect("default service account")))
        .collect();
    let (names, data) = (names(k), dockerconfig("floor-password"));
    let t = Instant::now();
    futures::stream::iter(work)
        .map(|(ns, sa)| {
            let (names, data) = (&names, &data);
            async move {
                for name in names {
                    apply_secret(client, &ns, name, data).await;
                }
                append_entries(client, &ns, sa, names).await;
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    t.elapsed()
}

/// The floor's watch-and-write loop: watches namespaces labelled `LABEL=label` and default
/// ServiceAccounts; writes a new namespace's `k` Secrets as soon as the namespace shows up
/// and its ServiceAccount entries as soon as the ServiceAccount does, once each. Stops when
/// dropped.
pub struct WatchAndWrite {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

enum Seen {
    Namespace(String),
    ServiceAccount(Box<ServiceAccount>),
}

impl WatchAndWrite {
    pub fn start(client: &Client, label: &str, k: usize) -> Self {
        let names = Arc::new(names(k));
        let data = Arc::new(dockerconfig("floor-password"));
        let namespaces = watcher::watcher(
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            watcher::Config::default().labels(&format!("{LABEL}={label}")),
        )
        .default_backoff()
        .filter_map(|ev| async move {
            match ev {
                Ok(Event::Apply(ns) | Event::InitApply(ns)) => Some(Seen::Namespace(ns.name_any())),
                _ => None,
            }
        });
        let service_accounts = watcher::watcher(
            Api::<ServiceAccount>::all(client.clone()),
            watcher::Config::default().fields("metadata.name=default"),
        )
        .default_backoff()
        .filter_map(|ev| async move {
            match ev {
                Ok(Event::Apply(sa) | Event::InitApply(sa)) => Some(Seen::ServiceAccount(Box::new(sa))),
                _ => None,
            }
        });
        let client = client.clone();
        let task = tokio::spawn(async move {
            let mut events = futures::stream::select(namespaces.boxed(), service_accounts.boxed());
            // Namespaces selected so far; default ServiceAccounts seen before their namespace.
            let mut selected = HashSet::new();
            let mut early: HashMap<String, ServiceAccount> = HashMap::new();
            let mut patched = HashSet::new();
            while let Some(ev) = events.next().await {
                let sa = match ev {
                    Seen::Namespace(ns) => {
                        if !selected.insert(ns.clone()) {
                            continue;
                        }
                        let (client, names, data, ns2) = (client.clone(), names.clone(), data.clone(), ns.clone());
                        tokio::spawn(async move {
                            futures::future::join_all(names.iter().map(|n| apply_secret(&client, &ns2, n, &data)))
                                .await;
                        });
                        match early.remove(&ns) {
                            Some(sa) => sa,
                            None => continue,
                        }
                    }
                    Seen::ServiceAccount(sa) => {
                        let ns = sa.namespace().unwrap_or_default();
                        if !selected.contains(&ns) {
                            early.insert(ns, *sa);
                            continue;
                        }
                        *sa
                    }
                };
                let ns = sa.namespace().unwrap_or_default();
                if patched.insert(ns.clone()) {
                    let (client, names) = (client.clone(), names.clone());
                    tokio::spawn(async move { append_entries(&client, &ns, sa, &names).await });
                }
            }
        });
        WatchAndWrite { tasks: vec![task] }
    }
}

impl Drop for WatchAndWrite {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The DIY loop people run from CronJobs, per namespace: `kubectl create secret
/// docker-registry --dry-run=client -o yaml` for each of the `k` Secrets piped into one
/// `kubectl apply`, then one `kubectl patch serviceaccount default` appending the `k` entries.
pub fn diy(kubectl: &Path, kubeconfig: &Path, namespaces: &[String], k: usize) -> Duration {
    let t = Instant::now();
    let k_ = kubectl.display();
    let creates: Vec<String> = (0..k)
        .map(|i| {
            format!(
                "'{k_}' create secret docker-registry diy-{i:02} --docker-server=registry.example.com:5000 \
                 --docker-username=robot --docker-password=diy-password --dry-run=client -o yaml; echo ---"
            )
        })
        .collect();
    let entries: Vec<String> = (0..k)
        .map(|i| format!(r#"{{"op":"add","path":"/imagePullSecrets/-","value":{{"name":"diy-{i:02}"}}}}"#))
        .collect();
    for ns in namespaces {
        let st = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "set -e; {{ {creates}; }} | '{k_}' apply -n {ns} -f - >/dev/null; \
                 '{k_}' patch serviceaccount default -n {ns} --type=json -p '[{entries}]' >/dev/null",
                creates = creates.join("; "),
                entries = entries.join(","),
            ))
            .env("KUBECONFIG", kubeconfig)
            .status()
            .expect("kubectl");
        assert!(st.success(), "DIY loop failed in {ns}");
    }
    t.elapsed()
}
