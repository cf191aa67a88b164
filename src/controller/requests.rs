//! Reconcile requests for the controllers of both kinds, routed by the credential's kind,
//! each noting what it is about (see [`Passes`]).

use std::sync::Arc;

use kube::core::DeserializeGuard;
use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::crd::{ClusterRegistryCredential, RegistryCredential};

use super::identity::CredentialRef;
use super::passes::Passes;

/// Reconcile requests for the controllers of both kinds.
#[derive(Clone)]
pub struct Requests {
    cluster: mpsc::UnboundedSender<ObjectRef<DeserializeGuard<ClusterRegistryCredential>>>,
    namespaced: mpsc::UnboundedSender<ObjectRef<DeserializeGuard<RegistryCredential>>>,
    passes: Arc<Passes>,
}

/// The request streams a [`Requests`] feeds, one per controller.
pub type RequestStreams = (
    UnboundedReceiverStream<ObjectRef<DeserializeGuard<ClusterRegistryCredential>>>,
    UnboundedReceiverStream<ObjectRef<DeserializeGuard<RegistryCredential>>>,
);

impl Requests {
    /// A sender and the streams to hand to `Controller::reconcile_on`.
    pub fn channel() -> (Self, RequestStreams) {
        let (cluster, cluster_rx) = mpsc::unbounded_channel();
        let (namespaced, namespaced_rx) = mpsc::unbounded_channel();
        (
            Self {
                cluster,
                namespaced,
                passes: Arc::default(),
            },
            (
                UnboundedReceiverStream::new(cluster_rx),
                UnboundedReceiverStream::new(namespaced_rx),
            ),
        )
    }

    /// What the requests were about, and the credentials' last full passes.
    pub fn passes(&self) -> &Passes {
        &self.passes
    }

    /// Asks the right controller to reconcile `who`, about everything. False once the
    /// controllers are gone.
    pub fn send(&self, who: &CredentialRef) -> bool {
        self.send_about(who, None)
    }

    /// Asks the right controller to reconcile `who`, about `namespace` only (`None`:
    /// everything). False once the controllers are gone.
    pub fn send_about(&self, who: &CredentialRef, namespace: Option<&str>) -> bool {
        self.passes.request(who, namespace);
        match (who.as_cluster(), who.as_namespaced()) {
            (Some(r), _) => self.cluster.send(r).is_ok(),
            (_, Some(r)) => self.namespaced.send(r).is_ok(),
            (None, None) => true,
        }
    }
}
