//! Will my workloads pull? Every image a workload uses, resolved with the credentials the
//! kubelet would use for it, for the platforms of the nodes it can run on.
//!
//! A round is a short pipeline: read a [`plan::View`] of the cluster (I/O:
//! [`cluster::read`] for the CLI), turn it into checks ([`plan::checks`], pure: images of
//! each pod spec, the kubelet's choice of credentials from [`keyring`], the platforms from
//! [`platforms`]), resolve them ([`resolver::Resolver`], I/O: one resolution per image and
//! credential for the whole round, bounded per registry host), and judge each
//! ([`plan::verdict`], pure).
//!
//! The operator runs the same pipeline from its watches ([`operator`], opt-in): the
//! namespaces its credentials target ([`select`]), only what changed between full rounds
//! ([`track`], pure), and Events, metrics and credential status for the transitions
//! ([`publish`]).

pub mod cluster;
pub mod images;
pub mod keyring;
pub mod operator;
pub mod plan;
pub mod platforms;
pub mod publish;
pub mod report;
pub mod resolver;
pub mod select;
pub mod track;
pub mod watch;

use crate::registry::RegistryClient;

/// Why a round could not be run.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// Listing a kind failed (permissions, connectivity).
    #[error("listing {kind} failed: {source}")]
    List {
        /// The kind, plural.
        kind: &'static str,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// A pull Secret's docker config does not parse. Never carries its content.
    #[error("Secret {namespace}/{name}: {detail}")]
    MalformedPullSecret {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Where it is malformed.
        detail: String,
    },
}

impl WorkloadError {
    /// A fixed label per variant (for metrics).
    pub fn metric_label(&self) -> &'static str {
        match self {
            WorkloadError::List { .. } => "list",
            WorkloadError::MalformedPullSecret { .. } => "malformed_pull_secret",
        }
    }
}

/// Checks every workload of `scope` and reports each image use that would not pull.
pub async fn check_cluster(
    kube: &kube::Client,
    registry: RegistryClient,
    scope: &cluster::Scope,
) -> Result<report::Report, WorkloadError> {
    let view = cluster::read(kube, scope).await?;
    let checks = plan::checks(&view);
    let read_platforms = checks.iter().any(|c| !c.platforms.is_empty());
    let resolver = resolver::Resolver::new(
        registry,
        resolver::DEFAULT_PER_HOST,
        resolver::DEFAULT_MAX_WAIT,
        read_platforms,
    );
    let findings = resolver.run(&checks).await;
    Ok(report::Report::new(&view, &checks, resolver.resolutions(), findings))
}
