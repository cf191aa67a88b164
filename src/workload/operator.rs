//! The operator's workload checks (opt-in, `--workload-checks`; the leader runs them
//! beside the controllers). A round is the CLI's pipeline fed from watches: the workloads
//! of the namespaces pullkeeper's credentials target ([`select`]), the pod specs that are
//! new or changed ([`Tracker::dirty`]; every one in a full round, each
//! `--workload-check-interval`), their pull Secrets read, [`plan::checks`], one shared
//! [`resolver::Resolver`] per round, and what changed published ([`publish`]).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::events::{Recorder, Reporter};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::track::{Tracker, WorkloadKey};
use super::{cluster, images, plan, platforms, publish, resolver, select, track, watch};
use crate::controller::CredentialKind as _;
use crate::controller::identity::CredentialRef;
use crate::controller::watches::{Credentials, readable};
use crate::crd::WorkloadSummary;
use crate::registry::{AddressPolicy, Cidr, RegistryClient, TlsOptions};

/// How the operator runs workload checks.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Every workload is checked again this often (a changed one at once).
    pub interval: Duration,
    /// Ranges never contacted, on top of the link-local and cloud metadata addresses.
    pub deny_registry_cidrs: Vec<Cidr>,
}

/// A changed workload is checked this long after the change, so that a burst (a rollout,
/// a `kubectl apply` of many objects) makes one round.
const SETTLE: Duration = Duration::from_secs(1);

/// How often the workloads' fingerprints are compared between watch events.
const RESCAN: Duration = Duration::from_secs(5);

/// What the rounds read from: the controllers' caches and credential stores.
pub type Inputs = crate::controller::Shared;

struct Rounds {
    inputs: Inputs,
    stores: watch::Stores,
    registry: RegistryClient,
    recorder: Recorder,
    tracker: Tracker,
    written: BTreeMap<CredentialRef, WorkloadSummary>,
}

/// Runs the checks until `shutdown`: a full round at once and every `interval`, and a
/// round of the changed workloads soon after any workload changes.
pub async fn run(inputs: Inputs, settings: Settings, shutdown: CancellationToken) {
    let registry = match RegistryClient::with_policy(
        &TlsOptions::default(),
        AddressPolicy::new(settings.deny_registry_cidrs.clone()),
    ) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "workload checks cannot start: no registry client");
            return;
        }
    };
    let changed = Arc::new(Notify::new());
    let stores = watch::start(&inputs.client, &changed, &shutdown);
    // The credentials decide which namespaces are checked: their stores must be listed too.
    let listed = async {
        stores.ready().await;
        let _ = inputs.credentials.clusters.wait_until_ready().await;
        let _ = inputs.credentials.namespaced.wait_until_ready().await;
    };
    tokio::select! {
        () = listed => {}
        () = shutdown.cancelled() => return,
    }
    let recorder = Recorder::new(
        inputs.client.clone(),
        Reporter {
            controller: crate::OPERATOR_NAME.to_owned(),
            instance: inputs.instance.clone(),
        },
    );
    let written = written_summaries(&inputs.credentials);
    let mut rounds = Rounds {
        inputs,
        stores,
        registry,
        recorder,
        tracker: Tracker::default(),
        written,
    };
    // A round a second at most, however short the interval asked for.
    let interval = settings.interval.max(Duration::from_secs(1));
    tracing::info!(?interval, "workload checks started");
    // The first round is a full one; the changes the watches saw while listing find
    // nothing left to check after it.
    rounds.round(true).await;
    let mut next_full = Instant::now() + interval;
    loop {
        let full = tokio::select! {
            biased;
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep_until(next_full) => true,
            () = changed.notified() => {
                tokio::time::sleep(SETTLE).await;
                false
            }
            // What no workload watch shows (a ServiceAccount's pull Secrets) is looked at
            // this often; a look that finds nothing changed costs no request.
            () = tokio::time::sleep(RESCAN) => false,
        };
        if full {
            next_full = Instant::now() + interval;
        }
        rounds.round(full).await;
    }
}

/// The summaries the credentials' status holds already (written before a restart, or by
/// another leader), so that one no longer true is removed.
fn written_summaries(credentials: &Credentials) -> BTreeMap<CredentialRef, WorkloadSummary> {
    let clusters = credentials.clusters.state();
    let namespaced = credentials.namespaced.state();
    let c = readable(&clusters)
        .into_iter()
        .filter_map(|c| Some((c.reference(), c.current_status()?.workloads.clone()?)));
    let n = readable(&namespaced)
        .into_iter()
        .filter_map(|c| Some((c.reference(), c.current_status()?.workloads.clone()?)));
    c.chain(n).collect()
}

impl Rounds {
    /// The namespaces to check, from the namespace cache and every readable credential.
    fn namespaces(&self) -> BTreeSet<String> {
        let clusters = self.inputs.credentials.clusters.state();
        let namespaced = self.inputs.credentials.namespaced.state();
        let scopes: Vec<_> = readable(&clusters)
            .into_iter()
            .filter_map(|c| c.validate().ok())
            .chain(readable(&namespaced).into_iter().filter_map(|c| c.validate().ok()))
            .map(|v| v.scope)
            .collect();
        let namespaces = self.inputs.caches.namespaces.read();
        select::checked_namespaces(namespaces.iter(), &scopes)
    }

    /// Each ServiceAccount's `imagePullSecrets` names, in `namespaces`.
    fn service_accounts(&self, namespaces: &BTreeSet<String>) -> BTreeMap<plan::Key, Vec<String>> {
        let sas = self.inputs.caches.service_accounts.read();
        namespaces
            .iter()
            .flat_map(|ns| sas.within(ns))
            .map(|sa| {
                let names = sa.pull_secrets.iter().flatten().map(|s| s.to_string()).collect();
                ((sa.namespace.to_string(), sa.name.to_string()), names)
            })
            .collect()
    }

    /// The resourceVersion of every pullkeeper Secret (from the controllers' metadata
    /// cache): one written, renewed or repaired changes the fingerprints of the workloads
    /// that use it.
    fn managed_versions(&self) -> BTreeMap<plan::Key, String> {
        let secrets = self.inputs.caches.secrets.read();
        secrets
            .iter()
            .map(|s| ((s.namespace.to_string(), s.name.to_string()), s.version.to_string()))
            .collect()
    }

    /// `namespace/name` of every pullkeeper Secret written by a credential this operator
    /// reconciles (with `--credential-selector`, another shard's credentials are its
    /// operator's to report on), and who wrote it.
    fn managed(&self) -> BTreeMap<String, CredentialRef> {
        let clusters = self.inputs.credentials.clusters.state();
        let namespaced = self.inputs.credentials.namespaced.state();
        let ours: BTreeSet<CredentialRef> = readable(&clusters)
            .into_iter()
            .map(|c| c.reference())
            .chain(readable(&namespaced).into_iter().map(|c| c.reference()))
            .collect();
        let secrets = self.inputs.caches.secrets.read();
        secrets
            .iter()
            .filter_map(|s| {
                let who = s.holder().filter(|w| ours.contains(w))?;
                Some((format!("{}/{}", s.namespace, s.name), who))
            })
            .collect()
    }

    async fn round(&mut self, full: bool) {
        let started = Instant::now();
        let requests_before = self.registry.requests();
        let namespaces = self.namespaces();
        let service_accounts = self.service_accounts(&namespaces);
        let all = images::workloads(&self.stores.objects(&namespaces));
        let versions = self.managed_versions();
        let current: BTreeMap<WorkloadKey, u64> = all
            .iter()
            .map(|w| {
                (
                    select::workload_key(w),
                    plan::fingerprint(w, &service_accounts, &versions),
                )
            })
            .collect();
        let dirty = self.tracker.dirty(&current, full);
        let workloads: Vec<images::Workload> = all
            .into_iter()
            .filter(|w| dirty.contains(&select::workload_key(w)))
            .collect();
        let (records, resolutions) = if workloads.is_empty() && !full {
            // Nothing changed: only what was deleted, if anything, is forgotten.
            (BTreeMap::new(), None)
        } else {
            let (records, resolutions) = self.check(workloads, service_accounts).await;
            (records, Some(resolutions))
        };
        let changes = self.tracker.update(&current, &dirty, records);
        let m = &self.inputs.metrics;
        if let Some(n) = resolutions {
            let requests = self.registry.requests().saturating_sub(requests_before);
            let took = started.elapsed();
            m.observe_workload_round(if full { "full" } else { "changed" }, n, requests, took);
            tracing::debug!(
                full,
                workloads = dirty.len(),
                resolutions = n,
                requests,
                took_ms = took.as_millis(),
                changes = changes.len(),
                "workload check round"
            );
        }
        for (registry, left) in self.registry.ratelimit_remaining() {
            m.set_ratelimit_remaining(&registry, left);
        }
        publish::changes(&self.recorder, m, &changes).await;
        publish::summaries(&self.inputs.client, &mut self.written, self.tracker.summaries()).await;
    }

    /// Checks `workloads`: their pull Secrets read, one resolution per image and
    /// credential. Returns a record per container and the resolutions sent.
    async fn check(
        &self,
        workloads: Vec<images::Workload>,
        service_accounts: BTreeMap<plan::Key, Vec<String>>,
    ) -> (BTreeMap<track::ContainerKey, track::Record>, usize) {
        let secrets = cluster::read_secrets(
            &self.inputs.client,
            plan::secrets_to_read(&workloads, &service_accounts),
        )
        .await;
        let view = plan::View {
            workloads,
            service_accounts,
            secrets,
            nodes: platforms::node_platforms(&self.stores.nodes()),
        };
        let checks = plan::checks(&view);
        let resolver = resolver::Resolver::new(
            self.registry.clone(),
            resolver::DEFAULT_PER_HOST,
            resolver::DEFAULT_MAX_WAIT,
            checks.iter().any(|c| !c.platforms.is_empty()),
        );
        let findings = resolver.run(&checks).await;
        (
            select::records(&checks, findings, &self.managed()),
            resolver.resolutions(),
        )
    }
}
