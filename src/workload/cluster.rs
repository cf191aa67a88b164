//! Reading a [`View`] from the apiserver with the caller's own permissions (the CLI's
//! edge; the operator will feed the same [`View`] from its watches).

use std::collections::BTreeMap;

use futures::TryFutureExt as _;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Node, Secret, ServiceAccount};
use kube::api::ListParams;
use kube::{Api, Client};
use serde::de::DeserializeOwned;

use super::WorkloadError;
use super::images::{Objects, workloads};
use super::keyring::read_pull_secret;
use super::plan::{Key, SecretState, View, secrets_to_read};
use super::platforms::node_platforms;

/// Which namespaces to read.
#[derive(Clone, Debug)]
pub enum Scope {
    /// One namespace.
    Namespace(String),
    /// Every namespace.
    All,
}

fn api<K>(client: &Client, scope: &Scope) -> Api<K>
where
    K: kube::Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match scope {
        Scope::Namespace(ns) => Api::namespaced(client.clone(), ns),
        Scope::All => Api::all(client.clone()),
    }
}

async fn list<K>(client: &Client, scope: &Scope, kind: &'static str) -> Result<Vec<K>, WorkloadError>
where
    K: kube::Resource<Scope = NamespaceResourceScope, DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    api::<K>(client, scope)
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .map_err(|source| WorkloadError::List { kind, source })
}

/// Lists the workloads, ServiceAccounts and Nodes, then gets each pull Secret in use.
/// Nodes the reader may not list leave the platforms to what pods pin.
pub async fn read(client: &Client, scope: &Scope) -> Result<View, WorkloadError> {
    let (deployments, stateful_sets, daemon_sets, jobs, cron_jobs, replica_sets, pods, sas) = futures::try_join!(
        list(client, scope, "Deployments"),
        list(client, scope, "StatefulSets"),
        list(client, scope, "DaemonSets"),
        list(client, scope, "Jobs"),
        list(client, scope, "CronJobs"),
        list(client, scope, "ReplicaSets"),
        list(client, scope, "Pods"),
        list::<ServiceAccount>(client, scope, "ServiceAccounts"),
    )?;
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default())
        .map_ok(|l| l.items)
        .await
        .unwrap_or_default();
    let objects = Objects {
        deployments,
        stateful_sets,
        daemon_sets,
        jobs,
        cron_jobs,
        replica_sets,
        pods,
    };
    let service_accounts: BTreeMap<_, _> = sas
        .into_iter()
        .map(|sa| {
            let names = sa.image_pull_secrets.iter().flatten().map(|r| r.name.clone()).collect();
            (
                (
                    sa.metadata.namespace.unwrap_or_default(),
                    sa.metadata.name.unwrap_or_default(),
                ),
                names,
            )
        })
        .collect();
    let workloads = workloads(&objects);
    let wanted = secrets_to_read(&workloads, &service_accounts);
    let secrets = read_secrets(client, wanted).await;
    Ok(View {
        workloads,
        service_accounts,
        secrets,
        nodes: node_platforms(&nodes),
    })
}

/// Reads each of the pull Secrets `wanted` (a few at a time).
pub async fn read_secrets(client: &Client, wanted: Vec<Key>) -> BTreeMap<Key, SecretState> {
    use futures::StreamExt as _;
    futures::stream::iter(wanted)
        .map(|(ns, name)| async move {
            let state = secret_state(client, &ns, &name).await;
            ((ns, name), state)
        })
        .buffer_unordered(16)
        .collect()
        .await
}

async fn secret_state(client: &Client, namespace: &str, name: &str) -> SecretState {
    match Api::<Secret>::namespaced(client.clone(), namespace).get(name).await {
        Ok(s) => match read_pull_secret(namespace, name, s.type_.as_deref(), s.data.as_ref()) {
            Ok(Some(entries)) => SecretState::Entries(entries),
            Ok(None) => SecretState::Ignored,
            Err(e) => SecretState::Malformed(e.to_string()),
        },
        Err(kube::Error::Api(s)) if s.code == 404 => SecretState::Missing,
        Err(kube::Error::Api(s)) if s.code == 403 => SecretState::Forbidden,
        Err(e) => SecretState::Unavailable(crate::registry::untrusted::sanitize(&e.to_string())),
    }
}
