//! Status types shared by both kinds.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// At most this many namespace failures are listed in status.
pub const MAX_LISTED_FAILURES: usize = 20;

/// Observed state of a registry credential.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RegistryCredentialStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `CredentialIssued`, `Synced` and `Pullable`, in the metav1.Condition shape.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// When the current credential expires (absent for credentials without an expiry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// When the credential was last obtained from its provider.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_time: Option<Time>,
    /// When the credential will next be renewed or re-read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_refresh_time: Option<Time>,
    /// Salted digest of the pull secret last written (no secret value). After a restart
    /// the operator reuses an unexpired token from a copy only if the copy matches it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_hash: Option<String>,
    /// How many namespaces are targeted, hold the current secret, or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<NamespaceCounts>,
    /// Namespaces where the secret could not be written (at most 20 listed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failures: Vec<NamespaceFailure>,
    /// Result of resolving each `verify.images` entry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageStatus>,
    /// What the operator's workload checks (`--workload-checks`) found for the images that
    /// workloads pull with this credential's Secret. Written by its own field manager.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workloads: Option<WorkloadSummary>,
}

/// At most this many unpullable workload images are named in a credential's status.
pub const MAX_WORKLOAD_EXAMPLES: usize = 5;

/// The workload images pulled with a credential's Secret, and those that would not pull.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSummary {
    /// Image uses (container, init or ephemeral container, image volume) whose pull
    /// Secrets include this credential's Secret.
    pub images: i32,
    /// How many of those would not pull.
    pub unpullable: i32,
    /// A few of those (at most 5), with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<WorkloadExample>,
}

/// One workload image that would not pull.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadExample {
    /// Namespace of the workload.
    pub namespace: String,
    /// `Deployment`, `StatefulSet`, `DaemonSet`, `Job`, `CronJob` or `Pod`.
    pub kind: String,
    /// Name of the workload.
    pub name: String,
    /// Container (or image volume) name.
    pub container: String,
    /// The image as written.
    pub image: String,
    /// CamelCase reason, as in `images[].reason`.
    pub reason: String,
}

/// Namespace counts.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceCounts {
    /// Namespaces the target selects.
    pub targeted: i32,
    /// Namespaces holding the current secret.
    pub synced: i32,
    /// Namespaces where writing failed.
    pub failed: i32,
}

/// Why one namespace does not hold the current secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceFailure {
    /// The namespace.
    pub namespace: String,
    /// CamelCase reason, e.g. `Conflict`.
    pub reason: String,
    /// What went wrong and what to do about it.
    pub message: String,
}

/// Result of resolving one image.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageStatus {
    /// The image reference as given in `verify.images`.
    pub image: String,
    /// Whether the manifest resolved with the credential (and every requested platform exists).
    pub pullable: bool,
    /// Manifest digest the reference resolved to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Platforms found in the image index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<String>,
    /// CamelCase reason: `Resolved`, `Unauthorized`, `Denied`, `NotFound`, `RateLimited`,
    /// `TLSError`, `Unreachable`, `PlatformMissing`, `AddressNotAllowed`,
    /// `InsecureEndpoint`, `InvalidReference` or `RegistryError`.
    pub reason: String,
    /// Details and what to do next.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// When the image was last checked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<Time>,
}
