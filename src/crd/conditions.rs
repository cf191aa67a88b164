//! metav1.Condition helpers: types, reasons, and a pure `set` that keeps
//! `lastTransitionTime` unless the status flips.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// Condition types.
pub mod types {
    /// Everything is in place: credential issued, every namespace synced, images pullable.
    pub const READY: &str = "Ready";
    /// The provider gave a credential.
    pub const CREDENTIAL_ISSUED: &str = "CredentialIssued";
    /// Every targeted namespace holds the current secret.
    pub const SYNCED: &str = "Synced";
    /// Every `verify.images` entry resolved.
    pub const PULLABLE: &str = "Pullable";
}

/// Condition reasons (CamelCase constants, part of the API).
pub mod reasons {
    /// All good.
    pub const SYNCED: &str = "Synced";
    /// The provider issued a credential.
    pub const ISSUED: &str = "Issued";
    /// Every image resolved.
    pub const RESOLVED: &str = "Resolved";
    /// The spec is invalid; the message says which field.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// `suspend: true`.
    pub const SUSPENDED: &str = "Suspended";
    /// A referenced Secret does not exist.
    pub const SECRET_NOT_FOUND: &str = "SecretNotFound";
    /// pullkeeper may not read a referenced Secret.
    pub const SECRET_FORBIDDEN: &str = "SecretForbidden";
    /// Reading a referenced Secret failed (retried).
    pub const SECRET_UNAVAILABLE: &str = "SecretUnavailable";
    /// A referenced Secret lacks a key, or the key is empty.
    pub const SECRET_KEY_MISSING: &str = "SecretKeyMissing";
    /// A referenced Secret's content cannot be used.
    pub const MALFORMED_SECRET: &str = "MalformedSecret";
    /// A referenced Secret has the wrong type.
    pub const WRONG_SECRET_TYPE: &str = "WrongSecretType";
    /// A docker config has no entry for the registry.
    pub const NO_REGISTRY_ENTRY: &str = "NoRegistryEntry";
    /// The cloud provider rejected the credentials used to ask for a token.
    pub const PROVIDER_UNAUTHORIZED: &str = "ProviderUnauthorized";
    /// The cloud identity may not get a token for this registry.
    pub const PROVIDER_DENIED: &str = "ProviderDenied";
    /// The cloud provider is rate-limiting.
    pub const PROVIDER_THROTTLED: &str = "ProviderThrottled";
    /// The cloud provider's endpoint could not be reached.
    pub const PROVIDER_UNREACHABLE: &str = "ProviderUnreachable";
    /// The cloud provider failed in another way.
    pub const PROVIDER_ERROR: &str = "ProviderError";
    /// The provider has been asked and has not answered yet.
    pub const ISSUING: &str = "Issuing";
    /// A `RegistryCredential` would use the operator's own cloud identity, and the
    /// administrator has not allowed that (`--namespaced-ambient-credentials`).
    pub const AMBIENT_CREDENTIALS_NOT_ALLOWED: &str = "AmbientCredentialsNotAllowed";
    /// The ServiceAccount named by `serviceAccountRef` does not exist.
    pub const SERVICE_ACCOUNT_NOT_FOUND: &str = "ServiceAccountNotFound";
    /// pullkeeper may not request a token for the ServiceAccount named by `serviceAccountRef`.
    pub const TOKEN_REQUEST_FORBIDDEN: &str = "TokenRequestForbidden";
    /// Requesting a ServiceAccount token failed for another reason (retried).
    pub const TOKEN_REQUEST_FAILED: &str = "TokenRequestFailed";
    /// Some targeted namespaces do not hold the current secret.
    pub const SYNC_FAILED: &str = "SyncFailed";
    /// A same-named Secret not managed by pullkeeper is in the way.
    pub const CONFLICT: &str = "Conflict";
    /// An image's registry is link-local, a cloud metadata service, or in a range the
    /// administrator denied (`--deny-registry-cidrs`); nothing was sent to it. Name the
    /// registry by an allowed address, or ask the administrator.
    pub const ADDRESS_NOT_ALLOWED: &str = "AddressNotAllowed";
    /// An image's registry pointed the client at a plain-HTTP token realm on another host,
    /// or redirected from HTTPS to HTTP; the credential was not sent. Fix the registry's
    /// auth configuration (an HTTPS realm).
    pub const INSECURE_ENDPOINT: &str = "InsecureEndpoint";
}

/// Condition status values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// `"True"`.
    True,
    /// `"False"`.
    False,
    /// `"Unknown"`.
    Unknown,
}

impl Status {
    /// The string Kubernetes uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::True => "True",
            Status::False => "False",
            Status::Unknown => "Unknown",
        }
    }
}

impl From<bool> for Status {
    fn from(b: bool) -> Self {
        if b { Status::True } else { Status::False }
    }
}

/// The desired value of one condition, before timestamps are applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Desired {
    /// Condition type.
    pub type_: &'static str,
    /// Status.
    pub status: Status,
    /// CamelCase reason.
    pub reason: String,
    /// Human-readable message.
    pub message: String,
}

impl Desired {
    /// Builds a desired condition.
    pub fn new(type_: &'static str, status: Status, reason: &str, message: impl Into<String>) -> Self {
        Self {
            type_,
            status,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }
}

/// Merges `desired` into `existing`: a condition keeps its `lastTransitionTime` unless
/// its status changes; conditions of other types are kept as they are, except those
/// listed in `remove`.
pub fn merge(
    existing: &[Condition],
    desired: &[Desired],
    remove: &[&str],
    generation: Option<i64>,
    now: Timestamp,
) -> Vec<Condition> {
    let mut out: Vec<Condition> = existing
        .iter()
        .filter(|c| !remove.contains(&c.type_.as_str()) && !desired.iter().any(|d| d.type_ == c.type_))
        .cloned()
        .collect();
    for d in desired {
        let previous = existing.iter().find(|c| c.type_ == d.type_);
        let last_transition_time = match previous {
            Some(p) if p.status == d.status.as_str() => p.last_transition_time.clone(),
            _ => Time(whole_seconds(now)),
        };
        out.push(Condition {
            type_: d.type_.to_owned(),
            status: d.status.as_str().to_owned(),
            reason: d.reason.clone(),
            message: d.message.clone(),
            observed_generation: generation,
            last_transition_time,
        });
    }
    out.sort_by_key(|c| order(&c.type_));
    out
}

/// Kubernetes stores times with second precision; comparing a computed status with a
/// stored one only works if the computed one is rounded the same way.
pub fn whole_seconds(t: Timestamp) -> Timestamp {
    Timestamp::from_second(t.as_second()).unwrap_or(t)
}

fn order(type_: &str) -> usize {
    [types::READY, types::CREDENTIAL_ISSUED, types::SYNCED, types::PULLABLE]
        .iter()
        .position(|t| *t == type_)
        .unwrap_or(usize::MAX)
}

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("valid time")
    }

    #[test]
    fn keeps_transition_time_when_status_unchanged() {
        let first = merge(
            &[],
            &[Desired::new(types::READY, Status::False, "A", "a")],
            &[],
            Some(1),
            t(0),
        );
        let second = merge(
            &first,
            &[Desired::new(types::READY, Status::False, "B", "b")],
            &[],
            Some(2),
            t(10),
        );
        assert_eq!(second[0].last_transition_time, Time(t(0)));
        assert_eq!(second[0].reason, "B");
        assert_eq!(second[0].observed_generation, Some(2));
    }

    #[test]
    fn moves_transition_time_when_status_flips() {
        let first = merge(
            &[],
            &[Desired::new(types::READY, Status::False, "A", "a")],
            &[],
            Some(1),
            t(0),
        );
        let second = merge(
            &first,
            &[Desired::new(types::READY, Status::True, "B", "b")],
            &[],
            Some(1),
            t(10),
        );
        assert_eq!(second[0].last_transition_time, Time(t(10)));
    }

    #[test]
    fn keeps_other_types_and_removes_listed_ones_in_stable_order() {
        let first = merge(
            &[],
            &[
                Desired::new(types::PULLABLE, Status::True, "Resolved", ""),
                Desired::new(types::SYNCED, Status::True, "Synced", ""),
            ],
            &[],
            Some(1),
            t(0),
        );
        let second = merge(
            &first,
            &[Desired::new(types::READY, Status::True, "Synced", "")],
            &[types::PULLABLE],
            Some(1),
            t(1),
        );
        let kinds: Vec<_> = second.iter().map(|c| c.type_.as_str()).collect();
        assert_eq!(kinds, vec![types::READY, types::SYNCED]);
    }
}
