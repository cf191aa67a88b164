//! Why one write of a plan failed.

use crate::crd::NamespaceFailure;
use crate::crd::conditions::reasons;

use crate::controller::identity::CredentialRef;

/// Why one write failed, per namespace.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Secret of that name is there and someone else holds it.
    #[error("{}", conflict_message(namespace, name, holder.as_ref()))]
    Conflict {
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
        /// The pullkeeper credential holding it; `None` when pullkeeper did not write it.
        holder: Option<CredentialRef>,
    },
    /// Creating or applying the Secret failed.
    #[error("writing Secret {namespace}/{name}: {source}")]
    Write {
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Reading a Secret that a create found in the way failed.
    #[error("reading Secret {namespace}/{name}: {source}")]
    Read {
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// The Secret in the way of a create was gone when read.
    #[error("Secret {namespace}/{name} vanished during create; retrying")]
    Vanished {
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
    },
    /// The namespace went away.
    #[error("namespace {namespace} no longer exists")]
    NamespaceGone {
        /// Namespace.
        namespace: String,
    },
    /// Patching a ServiceAccount's `imagePullSecrets` failed.
    #[error("patching imagePullSecrets of ServiceAccount {namespace}/{name}: {source}")]
    PatchServiceAccount {
        /// Namespace.
        namespace: String,
        /// ServiceAccount name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Deleting one of our Secrets failed.
    #[error("deleting Secret {namespace}/{name}: {source}")]
    Delete {
        /// Namespace.
        namespace: String,
        /// Secret name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// A request body could not be built (a bug).
    #[error("building the request for {namespace}: {source}")]
    Body {
        /// Namespace.
        namespace: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// CamelCase reason for status and Events.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Conflict { .. } => reasons::CONFLICT,
            Error::Write { source, .. } if status_code(source) == Some(403) => "Forbidden",
            Error::Write { .. } | Error::Read { .. } | Error::Vanished { .. } => "WriteFailed",
            Error::NamespaceGone { .. } => "NamespaceGone",
            Error::PatchServiceAccount { .. } => "ServiceAccountPatchFailed",
            Error::Delete { .. } => "DeleteFailed",
            Error::Body { .. } => "InternalError",
        }
    }

    /// Whether a quick retry may help: not for a conflict, a refusal (403), an invalid
    /// object (422), a namespace that is gone, or a bug.
    pub fn retryable(&self) -> bool {
        match self {
            Error::Conflict { .. } | Error::NamespaceGone { .. } | Error::Body { .. } => false,
            Error::Write { source, .. } => !matches!(status_code(source), Some(403 | 422)),
            Error::Read { .. } | Error::Vanished { .. } | Error::PatchServiceAccount { .. } | Error::Delete { .. } => {
                true
            }
        }
    }

    /// The namespace it happened in.
    pub fn namespace(&self) -> &str {
        match self {
            Error::Conflict { namespace, .. }
            | Error::Write { namespace, .. }
            | Error::Read { namespace, .. }
            | Error::Vanished { namespace, .. }
            | Error::NamespaceGone { namespace }
            | Error::PatchServiceAccount { namespace, .. }
            | Error::Delete { namespace, .. }
            | Error::Body { namespace, .. } => namespace,
        }
    }

    /// As reported in status.
    pub fn to_failure(&self) -> NamespaceFailure {
        NamespaceFailure {
            namespace: self.namespace().to_owned(),
            reason: self.reason().to_owned(),
            message: self.to_string(),
        }
    }
}

pub(crate) fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(ae) => Some(ae.code),
        _ => None,
    }
}

fn conflict_message(namespace: &str, name: &str, holder: Option<&CredentialRef>) -> String {
    match holder {
        Some(holder) => format!(
            "Secret {namespace}/{name} is held by {holder}, which wrote it first (or is older); pullkeeper leaves it to that credential. Give one of them another spec.target.secretName"
        ),
        None => format!(
            "Secret {namespace}/{name} exists and is not managed by this pullkeeper credential; pullkeeper leaves it alone. Rename or delete it, or set spec.target.secretName"
        ),
    }
}
