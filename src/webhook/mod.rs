//! Race-free pods where the apiserver does not serve `MutatingAdmissionPolicy` v1
//! (Kubernetes 1.30-1.35): an opt-in mutating admission webhook in the operator that does
//! what the policy route does (see `controller::admission`), decided by the pure
//! [`decide`] step with the reconciler's own targeting.
//!
//! Every replica serves it, leader or not, so the Service behind the
//! `MutatingWebhookConfiguration` may route to any of them: each keeps its own read-only
//! watches of namespaces (metadata) and both credential kinds, started before leader
//! election (the reconciler's caches exist on the leader only), and answers every review
//! from memory, with no API call. The configuration fails open (`failurePolicy: Ignore`),
//! so creating a Pod never depends on pullkeeper being up.
//!
//! The serving certificate is the operator's (see [`certs`]: one Secret shared by all
//! replicas, the CA patched into the configuration's `caBundle`, renewed before expiry)
//! or cert-manager's (mounted files, the CA injected by cert-manager's cainjector).

pub mod certs;
pub mod configuration;
pub mod decide;
pub mod server;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::controller::watches::spawn_watch;
use crate::crd::{ClusterRegistryCredential, RegistryCredential};

/// How often each replica re-reads its certificate (and the configuration's `caBundle`).
pub const CHECK_EVERY: Duration = Duration::from_secs(60);

/// Errors of the webhook route. None stops the operator: the webhook fails open.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Generating a certificate failed.
    #[error("generating the webhook's certificate: {0}")]
    Certificate(#[source] rcgen::Error),
    /// A time outside what certificates can express.
    #[error("certificate validity out of range")]
    Time,
    /// A certificate or key is not valid PEM.
    #[error("the webhook's {0} is not valid PEM")]
    Pem(&'static str),
    /// Reading or writing the certificate Secret failed.
    #[error("webhook certificate Secret {namespace}/{name}: {source}")]
    CertSecret {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Replicas kept overwriting each other's certificate.
    #[error("webhook certificate Secret {namespace}/{name} changed under every attempt")]
    CertContention {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// Reading a mounted certificate failed.
    #[error("reading {path}: {source}")]
    ReadFile {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading or patching the MutatingWebhookConfiguration failed.
    #[error("MutatingWebhookConfiguration {name}: {source}")]
    Configuration {
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// The MutatingWebhookConfiguration does not exist.
    #[error(
        "MutatingWebhookConfiguration {name} does not exist: install the chart with podAdmission.webhook.enabled, or give --webhook-url"
    )]
    ConfigurationMissing {
        /// Name.
        name: String,
    },
    /// The configuration has no webhook of pullkeeper's.
    #[error(
        "MutatingWebhookConfiguration {configuration} has no webhook named {}",
        configuration::WEBHOOK_NAME
    )]
    NoWebhook {
        /// Name.
        configuration: String,
    },
    /// (De)serialising an object failed.
    #[error("serialising: {0}")]
    Serialize(#[source] serde_json::Error),
}

/// Who provides the serving certificate.
#[derive(Clone, Debug)]
pub enum Certs {
    /// The operator: a Secret in its namespace, the CA patched into the configuration.
    Managed {
        /// Namespace of the Secret (the operator's).
        namespace: String,
        /// Name of the Secret.
        secret: String,
        /// Host names (or IP addresses) the certificate is for.
        hosts: Vec<String>,
    },
    /// cert-manager: `tls.crt` and `tls.key` mounted in this directory.
    Files(PathBuf),
}

/// How to run the webhook.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Name of the MutatingWebhookConfiguration.
    pub configuration: String,
    /// Where the apiserver reaches the webhook.
    pub endpoint: configuration::Endpoint,
    /// Serving certificate.
    pub certs: Certs,
    /// Namespaces never mutated (besides the configuration's own selector).
    pub skip_namespaces: Vec<String>,
    /// Only credentials whose labels match (the operator's `--credential-selector`).
    pub credential_selector: Option<String>,
}

/// Host names for a certificate of `endpoint`: the Service's DNS names, or the URL's host.
pub fn hosts(endpoint: &configuration::Endpoint) -> Vec<String> {
    match endpoint {
        configuration::Endpoint::Service { namespace, name } => vec![
            format!("{name}.{namespace}.svc"),
            format!("{name}.{namespace}.svc.cluster.local"),
        ],
        configuration::Endpoint::Url(u) => url::Url::parse(u)
            .ok()
            .and_then(|u| {
                u.host().map(|h| match h {
                    url::Host::Ipv6(ip) => ip.to_string(),
                    other => other.to_string(),
                })
            })
            .into_iter()
            .collect(),
    }
}

/// The read-only caches a review is answered from.
#[derive(Clone)]
pub struct Stores {
    /// Every namespace (metadata).
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    /// ClusterRegistryCredentials.
    pub clusters: Store<ClusterRegistryCredential>,
    /// RegistryCredentials.
    pub namespaced: Store<RegistryCredential>,
}

impl Stores {
    /// Starts the watches (until `shutdown`).
    pub fn start(client: &Client, credential_selector: Option<&str>, shutdown: &CancellationToken) -> Self {
        let mut wc = watcher::Config::default().any_semantic();
        if let Some(s) = credential_selector {
            wc = wc.labels(s);
        }
        let (namespaces, w) = reflector::store();
        let ns = watcher(
            Api::<PartialObjectMeta<Namespace>>::all(client.clone()),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(|ns| ns.managed_fields_mut().clear())
        .reflect(w);
        spawn_watch("namespaces", ns, shutdown, |_| true);
        let (clusters, w) = reflector::store();
        let s = watcher(Api::<ClusterRegistryCredential>::all(client.clone()), wc.clone())
            .default_backoff()
            .modify(|c| c.managed_fields_mut().clear())
            .reflect(w);
        spawn_watch("clusterregistrycredentials", s, shutdown, |_| true);
        let (namespaced, w) = reflector::store();
        let s = watcher(Api::<RegistryCredential>::all(client.clone()), wc)
            .default_backoff()
            .modify(|c| c.managed_fields_mut().clear())
            .reflect(w);
        spawn_watch("registrycredentials", s, shutdown, |_| true);
        Self {
            namespaces,
            clusters,
            namespaced,
        }
    }

    /// Waits until every store has done its initial list.
    pub async fn ready(&self) {
        let _ = self.namespaces.wait_until_ready().await;
        let _ = self.clusters.wait_until_ready().await;
        let _ = self.namespaced.wait_until_ready().await;
    }
}

/// Serves the webhook on `listener` until `shutdown`: waits for the caches, loads (or
/// issues) the certificate, then serves while re-checking the certificate every
/// [`CHECK_EVERY`].
pub async fn run(client: Client, listener: TcpListener, settings: Settings, shutdown: CancellationToken) {
    let stores = Stores::start(&client, settings.credential_selector.as_deref(), &shutdown);
    tokio::select! {
        () = stores.ready() => {}
        () = shutdown.cancelled() => return,
    }
    let resolver = Arc::new(certs::Resolver::default());
    refresh(&client, &settings, &resolver).await;
    let keeper = {
        let (client, settings, resolver, shutdown) =
            (client.clone(), settings.clone(), resolver.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(CHECK_EVERY) => {}
                }
                refresh(&client, &settings, &resolver).await;
            }
        })
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, configuration = %settings.configuration, "serving the pod admission webhook");
    }
    let reviewer = Arc::new(server::Reviewer {
        stores,
        skip_namespaces: settings.skip_namespaces.clone(),
    });
    server::serve(listener, resolver, server::router(reviewer), shutdown).await;
    keeper.abort();
}

/// Loads the current certificate and, when the operator manages it, keeps the Secret and
/// the configuration's `caBundle` up to date. Failures are logged and retried later.
async fn refresh(client: &Client, settings: &Settings, resolver: &certs::Resolver) {
    if let Err(e) = try_refresh(client, settings, resolver).await {
        tracing::warn!(error = %e, "the webhook's certificate is not up to date; retrying in a minute");
    }
}

async fn try_refresh(client: &Client, settings: &Settings, resolver: &certs::Resolver) -> Result<(), Error> {
    match &settings.certs {
        Certs::Files(dir) => {
            let (cert, key) = certs::read_dir(dir)?;
            if resolver.load(&cert, &key)? {
                tracing::info!(dir = %dir.display(), "loaded the webhook's serving certificate");
            }
        }
        Certs::Managed {
            namespace,
            secret,
            hosts,
        } => {
            let m = certs::ensure(client, namespace, secret, hosts).await?;
            if resolver.load(m.cert.as_bytes(), m.key.as_bytes())? {
                tracing::info!(secret = %format!("{namespace}/{secret}"), not_after = %m.not_after, "loaded the webhook's serving certificate");
            }
            let create = match &settings.endpoint {
                configuration::Endpoint::Url(_) => Some(configuration::configuration(
                    &settings.configuration,
                    &settings.endpoint,
                    &settings.skip_namespaces,
                    Some(&m.ca),
                )),
                configuration::Endpoint::Service { .. } => None,
            };
            if configuration::ensure_ca_bundle(client, &settings.configuration, &m.ca, create.as_ref()).await? {
                tracing::info!(configuration = %settings.configuration, "updated the webhook's caBundle");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use configuration::Endpoint;

    #[test]
    fn certificate_hosts_follow_the_endpoint() {
        let svc = Endpoint::Service {
            namespace: "ops".into(),
            name: "pk-webhook".into(),
        };
        assert_eq!(
            hosts(&svc),
            vec!["pk-webhook.ops.svc", "pk-webhook.ops.svc.cluster.local"]
        );
        assert_eq!(
            hosts(&Endpoint::Url("https://127.0.0.1:9443".into())),
            vec!["127.0.0.1"]
        );
        assert_eq!(hosts(&Endpoint::Url("https://[::1]:9443/x".into())), vec!["::1"]);
        assert_eq!(
            hosts(&Endpoint::Url("https://dev.example.com".into())),
            vec!["dev.example.com"]
        );
    }
}
