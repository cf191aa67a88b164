//! The operator: one kube-runtime `Controller` per kind sharing a [`Context`].
//!
//! Reconcile is a short pipeline (see [`reconcile`]): validate (pure) → issue credential
//! (provider I/O) → compute status (pure) → patch status (API I/O).

pub mod admission;
pub mod apply;
pub mod backoff;
pub mod cache;
pub mod cleanup;
pub mod credential;
mod error;
#[cfg(test)]
pub mod fixtures;
pub mod guarded;
pub mod identity;
pub mod index;
pub mod kind;
pub mod mappers;
pub mod passes;
pub mod plan;
pub mod reconcile;
pub mod report;
pub mod requests;
pub mod schedule;
pub mod secret;
pub mod service_account;
pub mod sources;
pub mod status;
pub mod target;
pub mod validate;
pub mod verify;
pub mod watches;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::core::DeserializeGuard;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;

use crate::crd::{ClusterRegistryCredential, RegistryCredential};
use crate::metrics::Metrics;

pub use kind::CredentialKind;

/// Field manager for status written by the controller.
pub const STATUS_MANAGER: &str = "pullkeeper.io/status";
/// Field manager for objects written by the controller (Secrets, ServiceAccount entries).
pub const OBJECT_MANAGER: &str = "pullkeeper.io/controller";

pub use error::Error;

/// Shared state of all reconciles.
pub struct Context {
    /// API client.
    pub client: Client,
    /// Publishes Events.
    pub recorder: Recorder,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Retry delays per object.
    pub backoffs: backoff::Backoffs,
    /// Namespaces, managed Secrets, ServiceAccounts.
    pub caches: watches::Caches,
    /// Writes ServiceAccount entries, one writer per ServiceAccount.
    pub accounts: apply::Accounts,
    /// Every credential object of both kinds (the controllers' stores).
    pub objects: watches::Credentials,
    /// Watches on referenced source Secrets.
    pub sources: sources::SourceWatches,
    /// Issued credentials until their refresh time.
    pub credentials: Arc<cache::CredentialCache>,
    /// Provider calls under way.
    pub issuing: credential::InFlight,
    /// When each credential's status was last written (counts-only changes coalesce).
    pub status_writes: status::StatusWrites,
    /// Reconcile requests (a provider call that ends after its reconcile moved on).
    pub requests: watches::Requests,
    /// Last pullability results.
    pub verified: verify::VerifyCache,
    /// Max parallel writes within one reconcile.
    pub write_concurrency: usize,
    /// How new Pods get the pull secret before their ServiceAccount holds it.
    pub admission: admission::Bindings,
    /// The only namespace ClusterRegistryCredentials may read source Secrets from.
    pub source_secret_namespace: Option<String>,
    /// A `RegistryCredential` may use the operator's own cloud identity.
    pub namespaced_ambient_credentials: bool,
    /// Cloud endpoints chosen by the administrator.
    pub endpoints: crate::provider::Endpoints,
}

/// Settings for [`run`].
#[derive(Clone, Debug)]
pub struct Settings {
    /// Reporter instance for Events (the pod name in a cluster).
    pub instance: Option<String>,
    /// Max parallel reconciles per kind.
    pub concurrency: u16,
    /// Max parallel writes within one reconcile.
    pub write_concurrency: usize,
    /// Only reconcile credentials whose labels match (a label selector), e.g. to shard.
    pub credential_selector: Option<String>,
    /// Leader election; `None` reconciles without it (a single replica).
    pub leader: Option<crate::leader::Config>,
    /// Keep new Pods supplied through a MutatingAdmissionPolicy where the apiserver serves
    /// one (see [`admission`]).
    pub pod_admission: bool,
    /// The operator serves the pod admission webhook (see [`crate::webhook`]): the route
    /// where the policy is turned off or not served.
    pub pod_admission_webhook: bool,
    /// The only namespace ClusterRegistryCredentials may read source Secrets from;
    /// `None` allows any.
    pub source_secret_namespace: Option<String>,
    /// Ranges that pullability checks never contact, on top of the built-in link-local
    /// and cloud metadata addresses.
    pub deny_registry_cidrs: Vec<crate::registry::Cidr>,
    /// Let a `RegistryCredential` (written by a namespace's team) use the operator's own
    /// cloud identity (AWS chain, GKE metadata server, Azure workload identity). Off by
    /// default, as cert-manager's `--issuer-ambient-credentials`.
    pub namespaced_ambient_credentials: bool,
    /// Cloud endpoints chosen by the administrator (Google STS, IAM Credentials, token URL).
    pub endpoints: crate::provider::Endpoints,
    /// Check the images workloads use, beside the controllers, every this often (opt-in;
    /// `None`: off). The operator runs the checks as the [`Beside`] work.
    pub workload_checks: Option<Duration>,
}

/// What the controllers share with work that runs beside them on the leader (the
/// workload checks): the client, metrics, and the watches' indexes and credential stores.
#[derive(Clone)]
pub struct Shared {
    /// API client.
    pub client: Client,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Namespaces, managed Secrets and ServiceAccounts.
    pub caches: watches::Caches,
    /// Both kinds of credentials.
    pub credentials: watches::Credentials,
    /// Reporter instance for Events (the pod name).
    pub instance: Option<String>,
}

/// Work that runs beside the controllers, started with what they share once their
/// watches are up, and stopped with them.
pub type Beside = Box<dyn FnOnce(Shared) -> futures::future::BoxFuture<'static, ()> + Send>;

/// Waits until both CRDs are served, polling with a capped delay, so the operator can start
/// before its CRDs are installed instead of crashing. Returns false if shut down first.
pub async fn wait_for_crds(client: &Client, shutdown: &CancellationToken) -> bool {
    let mut delay = Duration::from_millis(500);
    loop {
        let lp = kube::api::ListParams::default().limit(1);
        let cluster = Api::<ClusterRegistryCredential>::all(client.clone())
            .list_metadata(&lp)
            .await;
        let namespaced = Api::<RegistryCredential>::all(client.clone()).list_metadata(&lp).await;
        match (cluster, namespaced) {
            (Ok(_), Ok(_)) => return true,
            (Err(e), _) | (_, Err(e)) => {
                crate::warn_repeated!("crds", "", error = %e, "pullkeeper CRDs are not served yet; install them (`pullkeeper crds | kubectl apply --server-side -f -`). Retrying");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return false,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(15));
    }
}

/// Runs both controllers until `shutdown` is cancelled. Call [`wait_for_crds`] first.
pub async fn run(
    client: Client,
    metrics: Arc<Metrics>,
    settings: Settings,
    beside: Option<Beside>,
    shutdown: CancellationToken,
) {
    let mut wc = watcher::Config::default().any_semantic();
    if let Some(selector) = &settings.credential_selector {
        wc = wc.labels(selector);
    }
    let cluster_ctl = controller(
        Api::<DeserializeGuard<ClusterRegistryCredential>>::all(client.clone()),
        wc.clone(),
    );
    let namespaced_ctl = controller(Api::<DeserializeGuard<RegistryCredential>>::all(client.clone()), wc);
    let credentials = watches::Credentials {
        clusters: cluster_ctl.store(),
        namespaced: namespaced_ctl.store(),
    };
    let (requests, (cluster_requests, namespaced_requests)) = watches::Requests::channel();
    let caches = watches::start(&client, &credentials, &requests, &shutdown);
    tokio::select! {
        () = caches.ready() => {}
        () = shutdown.cancelled() => return,
    }
    tracing::info!("caches of namespaces, managed Secrets and ServiceAccounts are synced");
    let route = match admission::start(&client, settings.pod_admission, settings.pod_admission_webhook).await {
        Ok(route) => route,
        Err(e) => {
            tracing::warn!(error = %e, "could not install the pod admission policy; new Pods rely on their ServiceAccounts alone");
            admission::Route::Failed
        }
    };
    tracing::info!(?route, "pod admission route");
    let beside = beside.map(|start| {
        start(Shared {
            client: client.clone(),
            metrics: metrics.clone(),
            caches: caches.clone(),
            credentials: credentials.clone(),
            instance: settings.instance.clone(),
        })
    });
    let issued = Arc::new(cache::CredentialCache::default());
    let ctx = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: crate::OPERATOR_NAME.to_owned(),
                instance: settings.instance.clone(),
            },
        ),
        client: client.clone(),
        metrics,
        backoffs: backoff::Backoffs::default(),
        accounts: apply::Accounts::new(client.clone(), caches.service_accounts.clone()),
        caches,
        objects: credentials,
        sources: sources::SourceWatches::new(client.clone(), requests.clone(), issued.clone(), shutdown.clone()),
        credentials: issued,
        issuing: credential::InFlight::default(),
        status_writes: status::StatusWrites::default(),
        requests,
        verified: verify::VerifyCache::new(crate::registry::AddressPolicy::new(
            settings.deny_registry_cidrs.clone(),
        )),
        write_concurrency: settings.write_concurrency.max(1),
        admission: admission::Bindings::new(route),
        source_secret_namespace: settings.source_secret_namespace.clone(),
        namespaced_ambient_credentials: settings.namespaced_ambient_credentials,
        endpoints: settings.endpoints.clone(),
    });
    // No debounce: a new namespace is written at once (bursts are cheap: reconciles of a
    // credential never run concurrently, and counts-only status writes coalesce).
    let config = kube::runtime::controller::Config::default().concurrency(settings.concurrency);
    let cluster = cluster_ctl
        .with_config(config.clone())
        .reconcile_on(cluster_requests)
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(
            guarded::reconcile_guarded::<ClusterRegistryCredential>,
            guarded::error_policy_guarded::<ClusterRegistryCredential>,
            ctx.clone(),
        )
        .for_each(|res| async move { log_result(res) });
    let namespaced = namespaced_ctl
        .with_config(config)
        .reconcile_on(namespaced_requests)
        .graceful_shutdown_on(shutdown.clone().cancelled_owned())
        .run(
            guarded::reconcile_guarded::<RegistryCredential>,
            guarded::error_policy_guarded::<RegistryCredential>,
            ctx,
        )
        .for_each(|res| async move { log_result(res) });
    tracing::info!("controllers started");
    // Joined, not spawned: a replica that loses the Lease drops them with the controllers.
    let beside = async move {
        if let Some(work) = beside {
            work.await;
        }
    };
    futures::join!(cluster, namespaced, beside);
    tracing::info!("controllers stopped");
}

/// The controller of one kind, woken by the changes of its objects that matter (the spec,
/// through the generation, which deletion bumps too; labels, annotations, finalizers) and
/// not by their status: the reconciler's own status write would otherwise bring another
/// full pass over every namespace, and status counts behind every new namespace.
fn controller<K>(api: Api<K>, wc: watcher::Config) -> Controller<K>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    use kube::runtime::{Predicate, WatchStreamExt, predicates, reflector};
    let (store, writer) = reflector::store();
    let changes = predicates::generation
        .combine(predicates::labels)
        .combine(predicates::annotations)
        .combine(predicates::finalizers);
    let stream = watcher(api, wc)
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(changes, Default::default());
    Controller::for_stream(stream, store)
}

fn log_result<K, E1, E2>(
    res: Result<
        (
            kube::runtime::reflector::ObjectRef<K>,
            kube::runtime::controller::Action,
        ),
        kube::runtime::controller::Error<E1, E2>,
    >,
) where
    K: kube::Resource,
    K::DynamicType: std::fmt::Debug,
    E1: std::error::Error,
    E2: std::error::Error,
{
    match res {
        Ok((obj, _)) => tracing::debug!(object = %obj, "reconciled"),
        // Reconcile errors were logged by error_policy; only watch-level problems here.
        Err(kube::runtime::controller::Error::ReconcilerFailed(_, _)) => {}
        // A trigger for an object deleted meanwhile: nothing to do.
        Err(kube::runtime::controller::Error::ObjectNotFound(obj)) => {
            tracing::debug!(object = %obj, "triggered object is gone");
        }
        Err(e) => crate::warn_repeated!("controller-stream", "", error = %e, "controller stream error"),
    }
}
