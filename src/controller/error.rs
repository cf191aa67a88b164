//! Errors of a reconcile's API I/O.

/// Errors of the controller's API I/O. Spec problems are not errors: they are reported in
/// status and the object waits for a change.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing status failed.
    #[error("writing status of {kind} {key}: {source}")]
    PatchStatus {
        /// Kind.
        kind: &'static str,
        /// `namespace/name` or `name`.
        key: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// The finalizer machinery failed (adding or removing it, or the wrapped step).
    #[error("{0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    /// Listing what to clean up failed.
    #[error("listing Secrets written by {kind} {key}: {source}")]
    Cleanup {
        /// Kind.
        kind: &'static str,
        /// `namespace/name` or `name`.
        key: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// Some cleanup steps failed; the finalizer stays until they succeed.
    #[error("cleaning up after {kind} {key}: {message}")]
    CleanupIncomplete {
        /// Kind.
        kind: &'static str,
        /// `namespace/name` or `name`.
        key: String,
        /// First failure.
        message: String,
    },
    /// Serialising the status failed.
    #[error("serialising status of {kind} {key}: {source}")]
    Serialize {
        /// Kind.
        kind: &'static str,
        /// `namespace/name` or `name`.
        key: String,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// A fixed label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::PatchStatus { .. } => "patch_status",
            Error::Serialize { .. } => "serialize",
            Error::Finalizer(e) => match e.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(inner)
                | kube::runtime::finalizer::Error::CleanupFailed(inner) => inner.metric_label(),
                _ => "finalizer",
            },
            Error::Cleanup { .. } => "cleanup_list",
            Error::CleanupIncomplete { .. } => "cleanup_incomplete",
        }
    }
}
