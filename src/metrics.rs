//! Prometheus metrics, all prefixed `pullkeeper_`. Labels are fixed strings: never an
//! error message or anything derived from a secret.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Labels of reconcile metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// Kind reconciled.
    pub kind: &'static str,
    /// `success` or a fixed error label.
    pub result: &'static str,
}

/// Labels by kind only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// Kind reconciled.
    pub kind: &'static str,
}

/// Labels of provider calls.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    /// Provider kind (`basic`, `ecr`, ...).
    pub provider: &'static str,
    /// `success` or the failure reason.
    pub result: &'static str,
}

/// Labels of apiserver requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// HTTP method.
    pub method: &'static str,
}

/// Labels identifying one credential object.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CredentialLabels {
    /// Kind.
    pub kind: &'static str,
    /// Namespace (empty for the cluster kind).
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// A result label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `Resolved` or the failure reason.
    pub result: &'static str,
}

/// Labels of one workload image that would not pull.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct WorkloadImageLabels {
    /// Namespace of the workload.
    pub namespace: String,
    /// Workload kind (`Deployment`, ..., `Pod`).
    pub kind: &'static str,
    /// Workload name.
    pub workload: String,
    /// Container (or image volume) name.
    pub container: String,
    /// CamelCase reason (a fixed set, see the README).
    pub reason: String,
}

/// Labels by registry host.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegistryLabels {
    /// Registry host as the image names it.
    pub registry: String,
}

/// Labels of workload check rounds.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoundLabels {
    /// `full` (every interval) or `changed` (workloads whose pod template changed).
    pub round: &'static str,
}

/// Metrics of the workload checks.
struct WorkloadMetrics {
    unpullable: Family<WorkloadImageLabels, Gauge>,
    ratelimit_remaining: Family<RegistryLabels, Gauge>,
    rounds: Family<RoundLabels, Counter>,
    round_duration: Family<RoundLabels, Histogram>,
    resolutions: Counter,
    registry_requests: Counter,
}

impl WorkloadMetrics {
    fn register(registry: &mut Registry) -> Self {
        let unpullable = Family::<WorkloadImageLabels, Gauge>::default();
        registry.register(
            "workload_image_unpullable",
            "1 for each workload container whose image would not pull (or cannot be checked), with the reason; no series for healthy ones",
            unpullable.clone(),
        );
        let ratelimit_remaining = Family::<RegistryLabels, Gauge>::default();
        registry.register(
            "registry_ratelimit_remaining",
            "Pulls left in the registry's rate-limit window, from its last ratelimit-remaining header (Docker Hub)",
            ratelimit_remaining.clone(),
        );
        let rounds = Family::<RoundLabels, Counter>::default();
        registry.register("workload_check_rounds", "Workload check rounds run", rounds.clone());
        let round_duration = Family::<RoundLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.05, 2.0, 12))
        });
        registry.register(
            "workload_check_round_duration_seconds",
            "Time one workload check round took, from reading the workloads to the last resolution",
            round_duration.clone(),
        );
        let resolutions = Counter::default();
        registry.register(
            "workload_check_resolutions",
            "Manifest resolutions sent by workload checks (one per image and credential per round)",
            resolutions.clone(),
        );
        let registry_requests = Counter::default();
        registry.register(
            "workload_check_registry_requests",
            "HTTP requests workload checks sent to registries (pings, token requests, manifest HEADs and GETs)",
            registry_requests.clone(),
        );
        Self {
            unpullable,
            ratelimit_remaining,
            rounds,
            round_duration,
            resolutions,
            registry_requests,
        }
    }
}

/// All metrics of the operator.
pub struct Metrics {
    workloads: WorkloadMetrics,
    image_checks: Family<ResultLabels, Counter>,
    leader: Gauge,
    managed_secrets: Gauge,
    credential_expiry: Family<CredentialLabels, Gauge<f64, AtomicU64>>,
    next_attempt: Family<CredentialLabels, Gauge<f64, AtomicU64>>,
    registry: Registry,
    api_requests: Family<MethodLabels, Counter>,
    reconciles: Family<ReconcileLabels, Counter>,
    reconcile_duration: Family<KindLabels, Histogram>,
    write_requests: Family<KindLabels, Counter>,
    provider_calls: Family<ProviderLabels, Counter>,
    provider_duration: Family<KindProvider, Histogram>,
}

/// Labels by provider only.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindProvider {
    /// Provider kind.
    pub provider: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("pullkeeper");
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        registry.register("reconciles", "Reconciles by kind and result", reconciles.clone());
        let reconcile_duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        registry.register(
            "reconcile_duration_seconds",
            "Time spent in one reconcile",
            reconcile_duration.clone(),
        );
        let write_requests = Family::<KindLabels, Counter>::default();
        registry.register(
            "write_requests",
            "Write requests (create, apply, patch, delete) sent to the apiserver",
            write_requests.clone(),
        );
        let provider_calls = Family::<ProviderLabels, Counter>::default();
        registry.register(
            "provider_calls",
            "Credential provider calls by result",
            provider_calls.clone(),
        );
        let provider_duration = Family::<KindProvider, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.005, 2.0, 14))
        });
        registry.register(
            "provider_call_duration_seconds",
            "Latency of credential provider calls",
            provider_duration.clone(),
        );
        let api_requests = Family::<MethodLabels, Counter>::default();
        registry.register(
            "api_requests",
            "Requests sent to the Kubernetes apiserver, by HTTP method (watches count once)",
            api_requests.clone(),
        );
        let credential_expiry = Family::<CredentialLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "credential_expiry_timestamp_seconds",
            "When the credential currently written expires (Unix time); alert on this minus time()",
            credential_expiry.clone(),
        );
        let next_attempt = Family::<CredentialLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "credential_next_attempt_timestamp_seconds",
            "When the provider is asked next (Unix time): the renewal of a credential, or the retry after a failure (backoff, or the provider's Retry-After)",
            next_attempt.clone(),
        );
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica holds the leader lease", leader.clone());
        let managed_secrets = Gauge::default();
        registry.register(
            "managed_secrets",
            "Pull secrets written by pullkeeper that exist in the cluster",
            managed_secrets.clone(),
        );
        let image_checks = Family::<ResultLabels, Counter>::default();
        registry.register(
            "image_checks",
            "Pullability checks of verify.images by result",
            image_checks.clone(),
        );
        let workloads = WorkloadMetrics::register(&mut registry);
        Self {
            workloads,
            image_checks,
            leader,
            managed_secrets,
            credential_expiry,
            next_attempt,
            registry,
            api_requests,
            reconciles,
            reconcile_duration,
            write_requests,
            provider_calls,
            provider_duration,
        }
    }
}

impl Metrics {
    /// Records one reconcile.
    pub fn observe_reconcile(&self, kind: &'static str, error: Option<&'static str>, took: Duration) {
        self.reconciles
            .get_or_create(&ReconcileLabels {
                kind,
                result: error.unwrap_or("success"),
            })
            .inc();
        self.reconcile_duration
            .get_or_create(&KindLabels { kind })
            .observe(took.as_secs_f64());
    }

    /// Counts one apiserver request.
    pub fn observe_api_request(&self, method: &http::Method) {
        let method = match *method {
            http::Method::GET => "GET",
            http::Method::POST => "POST",
            http::Method::PUT => "PUT",
            http::Method::PATCH => "PATCH",
            http::Method::DELETE => "DELETE",
            _ => "OTHER",
        };
        self.api_requests.get_or_create(&MethodLabels { method }).inc();
    }

    /// Records how many managed Secrets exist.
    pub fn set_managed_secrets(&self, n: usize) {
        self.managed_secrets.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Counts one image check.
    pub fn observe_image_check(&self, result: &'static str) {
        self.image_checks.get_or_create(&ResultLabels { result }).inc();
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// Records when a credential expires (or forgets it, for `None`).
    pub fn set_expiry(&self, labels: &CredentialLabels, expires_at_unix: Option<f64>) {
        match expires_at_unix {
            Some(t) => {
                self.credential_expiry.get_or_create(labels).set(t);
            }
            None => {
                self.credential_expiry.remove(labels);
            }
        }
    }

    /// Records when the provider is asked next for a credential (or forgets it, for `None`).
    pub fn set_next_attempt(&self, labels: &CredentialLabels, at_unix: Option<f64>) {
        match at_unix {
            Some(t) => {
                self.next_attempt.get_or_create(labels).set(t);
            }
            None => {
                self.next_attempt.remove(labels);
            }
        }
    }

    /// Records write requests made by one reconcile.
    pub fn observe_writes(&self, kind: &'static str, requests: usize) {
        self.write_requests
            .get_or_create(&KindLabels { kind })
            .inc_by(u64::try_from(requests).unwrap_or(u64::MAX));
    }

    /// Records one provider call.
    pub fn observe_provider_call(&self, provider: &'static str, error: Option<&'static str>, took: Duration) {
        self.provider_calls
            .get_or_create(&ProviderLabels {
                provider,
                result: error.unwrap_or("success"),
            })
            .inc();
        self.provider_duration
            .get_or_create(&KindProvider { provider })
            .observe(took.as_secs_f64());
    }

    /// Marks a workload container unpullable for `labels.reason` (`true`), or forgets that
    /// series (`false`).
    pub fn set_workload_unpullable(&self, labels: &WorkloadImageLabels, unpullable: bool) {
        if unpullable {
            self.workloads.unpullable.get_or_create(labels).set(1);
        } else {
            self.workloads.unpullable.remove(labels);
        }
    }

    /// Records the pulls a registry says are left.
    pub fn set_ratelimit_remaining(&self, registry: &str, remaining: u64) {
        self.workloads
            .ratelimit_remaining
            .get_or_create(&RegistryLabels {
                registry: registry.to_owned(),
            })
            .set(i64::try_from(remaining).unwrap_or(i64::MAX));
    }

    /// Counts one workload check round, the resolutions and registry requests it sent,
    /// and how long it took.
    pub fn observe_workload_round(&self, round: &'static str, resolutions: usize, requests: u64, took: Duration) {
        let labels = RoundLabels { round };
        self.workloads.rounds.get_or_create(&labels).inc();
        self.workloads
            .round_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        self.workloads
            .resolutions
            .inc_by(u64::try_from(resolutions).unwrap_or(u64::MAX));
        self.workloads.registry_requests.inc_by(requests);
    }

    /// Text exposition format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_are_counted_with_fixed_labels() {
        let m = Metrics::default();
        m.observe_reconcile("RegistryCredential", None, Duration::from_millis(3));
        m.observe_reconcile("RegistryCredential", Some("patch_status"), Duration::from_millis(3));
        let text = m.encode().expect("encodes");
        assert!(
            text.contains(r#"pullkeeper_reconciles_total{kind="RegistryCredential",result="success"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"result="patch_status"} 1"#), "{text}");
        assert!(text.contains("pullkeeper_reconcile_duration_seconds_bucket"));
    }

    #[test]
    fn an_unpullable_workload_image_has_one_series_until_forgotten() {
        let m = Metrics::default();
        let labels = WorkloadImageLabels {
            namespace: "shop".into(),
            kind: "Deployment",
            workload: "web".into(),
            container: "app".into(),
            reason: "NotFound".into(),
        };
        m.set_workload_unpullable(&labels, true);
        m.set_ratelimit_remaining("docker.io", 97);
        let text = m.encode().expect("encodes");
        assert!(
            text.contains(r#"pullkeeper_workload_image_unpullable{namespace="shop",kind="Deployment",workload="web",container="app",reason="NotFound"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"pullkeeper_registry_ratelimit_remaining{registry="docker.io"} 97"#),
            "{text}"
        );
        m.set_workload_unpullable(&labels, false);
        let text = m.encode().expect("encodes");
        assert!(!text.contains("workload=\"web\""), "{text}");
    }

    #[test]
    fn a_workload_round_counts_its_resolutions_requests_and_time() {
        let m = Metrics::default();
        m.observe_workload_round("full", 400, 401, Duration::from_millis(700));
        m.observe_workload_round("changed", 2, 2, Duration::from_millis(30));
        let text = m.encode().expect("encodes");
        for line in [
            r#"pullkeeper_workload_check_rounds_total{round="full"} 1"#,
            "pullkeeper_workload_check_resolutions_total 402",
            "pullkeeper_workload_check_registry_requests_total 403",
            r#"pullkeeper_workload_check_round_duration_seconds_count{round="full"} 1"#,
            r#"pullkeeper_workload_check_round_duration_seconds_sum{round="changed"} 0.03"#,
        ] {
            assert!(text.contains(line), "{line} missing in {text}");
        }
    }
}
