//! pullkeeper: a Kubernetes operator that keeps image pull secrets fresh and correct in
//! every namespace that needs them.
//!
//! Layout: [`crd`] holds the API types, [`controller`] the reconcile pipeline,
//! [`provider`] the credential sources, [`registry`] registry host handling and the OCI
//! client, [`workload`] the checks of what workloads pull, [`metrics`], [`telemetry`] and
//! [`http`] the operational surface.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod check;
pub mod controller;
pub mod crd;
pub mod http;
pub mod leader;
pub mod metrics;
pub mod operator;
pub mod provider;
pub mod registry;
pub mod telemetry;
pub mod webhook;
pub mod workload;

/// Name used as the Events reporter and in labels.
pub const OPERATOR_NAME: &str = "pullkeeper";

/// Selects rustls' process-wide crypto provider (ring). Both the Kubernetes client and the
/// AWS SDK use rustls, with different default providers, so the choice must be explicit.
/// Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Locks a mutex, carrying on with the data if another thread panicked while holding it:
/// every map guarded here stays consistent after any single operation.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
