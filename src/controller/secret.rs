//! Pure step: the pull secret pullkeeper writes, and whether an existing one is current.

use std::collections::BTreeMap;

use base64::Engine as _;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::provider::{Credential, DOCKER_CONFIG_JSON_KEY, DOCKER_CONFIG_JSON_TYPE};
use crate::registry::RegistryHost;

use super::OBJECT_MANAGER;
use super::identity::Stamp;
pub use super::identity::{CREDENTIAL_ANNOTATION, CREDENTIAL_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE, SCOPE_LABEL};

/// RFC 3339 time at which the credential in the Secret expires.
pub const EXPIRES_AT_ANNOTATION: &str = "pullkeeper.io/expires-at";
/// Salted digest of the written content, to know without reading data whether a write is needed.
pub const HASH_ANNOTATION: &str = "pullkeeper.io/content-hash";

/// Longest label value Kubernetes accepts.
const MAX_LABEL_VALUE: usize = 63;

/// A credential name as a label value: the name itself when it fits in 63 characters,
/// else a prefix and a digest of the whole name, so every accepted name (up to 253
/// characters) can label what it writes and select it again.
pub fn label_value(name: &str) -> String {
    shorten_cow(name, MAX_LABEL_VALUE).into_owned()
}

/// `name` itself if it has at most `max` characters, else a prefix, `-` and 10 hex
/// characters of the name's SHA-256: stable, distinct for distinct names, and still a
/// valid DNS subdomain or label value. For ASCII names (Kubernetes names are).
pub fn shorten(name: &str, max: usize) -> String {
    shorten_cow(name, max).into_owned()
}

/// [`shorten`], borrowing `name` when it is short enough.
fn shorten_cow(name: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if name.len() <= max || !name.is_ascii() {
        return name.into();
    }
    let digest = Sha256::digest(name.as_bytes());
    let suffix: String = digest.iter().take(5).map(|b| format!("{b:02x}")).collect();
    // Both label values and DNS names must end alphanumeric, hence the trim.
    let prefix = name[..max - suffix.len() - 1].trim_end_matches(['-', '.']);
    format!("{prefix}-{suffix}").into()
}

/// Which credential owns a Secret: its kind (scope), its namespace for the namespaced
/// kind, and its name. Two credentials that differ in any of these never touch each
/// other's Secrets.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Owner {
    /// `cluster` or `namespace`.
    pub scope: &'static str,
    /// The credential's name.
    pub name: String,
    /// The namespace of a namespaced credential (`None` for the cluster kind). Its Secrets
    /// live only there.
    pub namespace: Option<String>,
    /// The credential's UID (salts the content hash; the owner reference's UID).
    pub uid: String,
}

impl Owner {
    /// The owner stamped on what `who` (with UID `uid`) writes.
    pub fn of(who: &super::identity::CredentialRef, uid: String) -> Self {
        Self {
            scope: who.scope_label(),
            name: who.name.clone(),
            namespace: who.namespace.clone(),
            uid,
        }
    }

    /// The labels every written Secret carries.
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned()),
            (CREDENTIAL_LABEL.to_owned(), label_value(&self.name)),
            (SCOPE_LABEL.to_owned(), self.scope.to_owned()),
        ])
    }

    /// Whether a Secret's labels (and, for a shortened label, its name annotation) say
    /// it is this owner's, in a namespace this owner may write to.
    pub fn owns(&self, meta: &ObjectMeta) -> bool {
        Stamp::of(meta).is_some_and(|s| self.stamped(&s, meta.namespace.as_deref().unwrap_or_default()))
    }

    /// Whether a Secret in `namespace` carrying `stamp` is this owner's.
    pub fn stamped(&self, stamp: &Stamp, namespace: &str) -> bool {
        *stamp.label == *shorten_cow(&self.name, MAX_LABEL_VALUE)
            && stamp.scope == self.scope
            && stamp.full_name.as_deref().is_none_or(|n| n == self.name)
            && self.namespace.as_deref().is_none_or(|ns| namespace == ns)
    }

    /// Label selector for this owner's Secrets (list them in [`Owner::namespace`] when set).
    pub fn selector(&self) -> String {
        format!(
            "{MANAGED_BY_LABEL}={MANAGED_BY_VALUE},{CREDENTIAL_LABEL}={},{SCOPE_LABEL}={}",
            label_value(&self.name),
            self.scope
        )
    }
}

/// The content of a pull secret, ready to apply to any namespace.
#[derive(Clone)]
pub struct Content {
    /// `.dockerconfigjson` bytes.
    config: Vec<u8>,
    /// Salted hash of everything written.
    pub hash: String,
    /// `pullkeeper.io/expires-at`, if the credential expires.
    pub expires_at: Option<String>,
}

impl std::fmt::Debug for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Content")
            .field("hash", &self.hash)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// The `.dockerconfigjson` document: one entry, under the registry's key, with `auth`,
/// `username` and `password`, as docker, containerd and CRI-O read it.
pub fn docker_config_json(registry: &RegistryHost, credential: &Credential) -> Vec<u8> {
    let password = credential.password.expose_secret();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{}:{password}", credential.username));
    let doc = json!({
        "auths": {
            registry.auth_key(): {
                "username": credential.username,
                "password": password,
                "auth": auth,
            }
        }
    });
    serde_json::to_vec(&doc).unwrap_or_default()
}

/// Builds the content for `credential`.
pub fn content(owner: &Owner, registry: &RegistryHost, credential: &Credential) -> Content {
    let config = docker_config_json(registry, credential);
    // Whole seconds, as status records it: a credential recovered after a restart (whose
    // expiry comes from status) then has the very content already written, so a restart
    // rewrites nothing.
    let expires_at = credential
        .expires_at
        .map(|t| crate::crd::conditions::whole_seconds(t).to_string());
    let hash = hash_of(owner, &config, expires_at.as_deref());
    Content {
        config,
        hash,
        expires_at,
    }
}

/// The salted digest of what a Secret holds: its `.dockerconfigjson` bytes and its
/// `pullkeeper.io/expires-at` annotation. Recorded in the credential's status (which only
/// the operator writes), it proves after a restart that a copy was not edited.
pub fn hash_of(owner: &Owner, config: &[u8], expires_at: Option<&str>) -> String {
    let mut h = Sha256::new();
    h.update(owner.uid.as_bytes());
    h.update([0]);
    h.update(config);
    h.update([0]);
    h.update(expires_at.unwrap_or("").as_bytes());
    h.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// The server-side apply body of the Secret in `namespace`.
pub fn apply_body(owner: &Owner, name: &str, namespace: &str, content: &Content) -> Value {
    let mut annotations = serde_json::Map::new();
    annotations.insert(HASH_ANNOTATION.into(), content.hash.clone().into());
    annotations.insert(CREDENTIAL_ANNOTATION.into(), owner.name.clone().into());
    if let Some(at) = &content.expires_at {
        annotations.insert(EXPIRES_AT_ANNOTATION.into(), at.clone().into());
    }
    let mut metadata = json!({
        "name": name,
        "namespace": namespace,
        "labels": owner.labels(),
        "annotations": annotations,
    });
    // The namespaced kind's Secrets live next to it: an owner reference ties them to it
    // (and lets the garbage collector remove them should the finalizer be skipped).
    if owner.namespace.is_some() && !owner.uid.is_empty() {
        metadata["ownerReferences"] = json!([{
            "apiVersion": format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION),
            "kind": "RegistryCredential",
            "name": owner.name,
            "uid": owner.uid,
        }]);
    }
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata,
        "type": DOCKER_CONFIG_JSON_TYPE,
        "data": {
            DOCKER_CONFIG_JSON_KEY: base64::engine::general_purpose::STANDARD.encode(&content.config),
        },
    })
}

/// Whether a field manager other than pullkeeper owns the data, type, or our labels and
/// annotations: someone edited the Secret by hand (`kubectl edit`, `apply`, `replace`).
pub fn edited_by_others(meta: &ObjectMeta) -> bool {
    meta.managed_fields.iter().flatten().any(|mf| {
        mf.manager.as_deref() != Some(OBJECT_MANAGER)
            && mf.fields_v1.as_ref().is_some_and(|f| {
                let v = &f.0;
                v.get("f:data").is_some()
                    || v.get("f:type").is_some()
                    || v.pointer("/f:metadata/f:annotations").is_some_and(|a| {
                        a.get(format!("f:{HASH_ANNOTATION}")).is_some()
                            || a.get(format!("f:{EXPIRES_AT_ANNOTATION}")).is_some()
                    })
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_credential_recovered_with_the_expiry_in_status_has_the_content_written() {
        let owner = Owner {
            scope: "cluster",
            name: "x".into(),
            namespace: None,
            uid: "u".into(),
        };
        let host = RegistryHost::parse("gcr.io").expect("host");
        let minted = k8s_openapi::jiff::Timestamp::from_second(1_800_000_000)
            .expect("t")
            .checked_add(k8s_openapi::jiff::SignedDuration::from_millis(598))
            .expect("t");
        let credential = |expires_at| Credential {
            username: "oauth2accesstoken".into(),
            password: secrecy::SecretString::from("ya29.token"),
            expires_at: Some(expires_at),
        };
        let written = content(&owner, &host, &credential(minted));
        let recovered = content(
            &owner,
            &host,
            &credential(crate::crd::conditions::whole_seconds(minted)),
        );
        assert_eq!(written.hash, recovered.hash);
        assert_eq!(written.expires_at.as_deref(), Some("2027-01-15T08:00:00Z"));
    }
    use secrecy::SecretString;

    fn owner() -> Owner {
        Owner {
            scope: "cluster",
            name: "ghcr".into(),
            namespace: None,
            uid: "uid-1".into(),
        }
    }

    fn tenant(ns: &str) -> Owner {
        Owner {
            scope: "namespace",
            name: "ghcr".into(),
            namespace: Some(ns.into()),
            uid: format!("uid-{ns}"),
        }
    }

    #[test]
    fn long_names_become_valid_label_values() {
        assert_eq!(label_value("ghcr"), "ghcr");
        let exact = "a".repeat(63);
        assert_eq!(label_value(&exact), exact);
        for len in [64, 100, 253] {
            let name = format!("{}.x-y", "b-".repeat(len))
                .chars()
                .take(len)
                .collect::<String>();
            let v = label_value(&name);
            assert!(v.len() <= 63, "{v}");
            assert!(v.chars().last().is_some_and(|c| c.is_ascii_alphanumeric()), "{v}");
            assert!(v.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c)), "{v}");
        }
        // Same prefix, different names: different values.
        let a = format!("{}a", "n".repeat(80));
        let b = format!("{}b", "n".repeat(80));
        assert_ne!(label_value(&a), label_value(&b));
    }

    #[test]
    fn same_named_credentials_in_two_namespaces_never_own_each_others_secrets() {
        let a = tenant("team-a");
        let b = tenant("team-b");
        let mut meta = ObjectMeta {
            namespace: Some("team-a".into()),
            labels: Some(a.labels()),
            ..Default::default()
        };
        assert!(a.owns(&meta));
        assert!(!b.owns(&meta), "team-b must not own team-a's Secret");
        // The cluster kind of the same name owns neither.
        assert!(!owner().owns(&meta));
        meta.namespace = Some("team-b".into());
        assert!(b.owns(&meta) && !a.owns(&meta));
    }

    #[test]
    fn a_shortened_label_is_checked_against_the_full_name() {
        let long = |tail: &str| Owner {
            name: format!("{}{tail}", "x".repeat(70)),
            ..owner()
        };
        let body = apply_body(
            &long("a"),
            "s",
            "web",
            &content(&long("a"), &RegistryHost::parse("ghcr.io").expect("host"), &cred("pw")),
        );
        let meta: ObjectMeta = serde_json::from_value(body["metadata"].clone()).expect("meta");
        assert!(long("a").owns(&meta));
        assert!(!long("b").owns(&meta));
    }

    #[test]
    fn namespaced_secrets_carry_an_owner_reference() {
        let host = RegistryHost::parse("ghcr.io").expect("host");
        let t = tenant("team-a");
        let body = apply_body(&t, "pullkeeper-ghcr", "team-a", &content(&t, &host, &cred("pw")));
        let refs = &body["metadata"]["ownerReferences"];
        assert_eq!(refs[0]["kind"], "RegistryCredential");
        assert_eq!(refs[0]["uid"], "uid-team-a");
        let cluster = apply_body(
            &owner(),
            "pullkeeper-ghcr",
            "web",
            &content(&owner(), &host, &cred("pw")),
        );
        assert!(cluster["metadata"].get("ownerReferences").is_none());
    }

    fn cred(password: &str) -> Credential {
        Credential {
            username: "bot".into(),
            password: SecretString::from(password.to_owned()),
            expires_at: None,
        }
    }

    #[test]
    fn config_has_bare_host_key_and_all_fields() {
        let host = RegistryHost::parse("registry.example.com:5000").expect("host");
        let v: Value = serde_json::from_slice(&docker_config_json(&host, &cred("pw"))).expect("json");
        let entry = &v["auths"]["registry.example.com:5000"];
        assert_eq!(entry["username"], "bot");
        assert_eq!(entry["password"], "pw");
        assert_eq!(
            entry["auth"],
            base64::engine::general_purpose::STANDARD.encode("bot:pw")
        );
        assert_eq!(v["auths"].as_object().map(|o| o.len()), Some(1));
    }

    #[test]
    fn docker_hub_is_written_under_its_historical_key() {
        let host = RegistryHost::parse("docker.io").expect("host");
        let v: Value = serde_json::from_slice(&docker_config_json(&host, &cred("pw"))).expect("json");
        assert!(v["auths"].get("https://index.docker.io/v1/").is_some(), "{v}");
    }

    #[test]
    fn apply_body_has_type_labels_and_annotations() {
        let host = RegistryHost::parse("ghcr.io").expect("host");
        let c = content(&owner(), &host, &cred("pw"));
        let body = apply_body(&owner(), "pullkeeper-ghcr", "web", &c);
        assert_eq!(body["type"], "kubernetes.io/dockerconfigjson");
        assert_eq!(body["metadata"]["labels"]["app.kubernetes.io/managed-by"], "pullkeeper");
        assert_eq!(body["metadata"]["labels"]["pullkeeper.io/credential"], "ghcr");
        assert_eq!(body["metadata"]["annotations"][HASH_ANNOTATION], c.hash.as_str());
        assert!(body["data"][".dockerconfigjson"].is_string());
        assert!(!format!("{c:?}").contains("pw\""), "Debug must not show the config");
    }

    #[test]
    fn hash_changes_with_password_and_is_salted_by_owner() {
        let host = RegistryHost::parse("ghcr.io").expect("host");
        let a = content(&owner(), &host, &cred("one"));
        let b = content(&owner(), &host, &cred("two"));
        assert_ne!(a.hash, b.hash);
        let mut other = owner();
        other.uid = "uid-2".into();
        assert_ne!(a.hash, content(&other, &host, &cred("one")).hash);
    }
}
