//! `provider.dockerConfig`: replicate one registry's entry from an existing
//! `kubernetes.io/dockerconfigjson` Secret.

use std::collections::BTreeMap;

use base64::Engine as _;
use futures::future::BoxFuture;
use kube::Client;
use secrecy::SecretString;
use serde::Deserialize;

use super::{Credential, CredentialProvider, ProviderError, source};
use crate::crd::{ClusterSecretRef, DockerConfigProvider};
use crate::registry::RegistryHost;

/// The Secret type this provider reads.
pub const DOCKER_CONFIG_JSON_TYPE: &str = "kubernetes.io/dockerconfigjson";
/// The data key of that type.
pub const DOCKER_CONFIG_JSON_KEY: &str = ".dockerconfigjson";

/// Replicates an entry of a dockerconfigjson Secret.
pub struct DockerConfig {
    client: Client,
    registry: RegistryHost,
    spec: DockerConfigProvider<ClusterSecretRef>,
}

impl DockerConfig {
    /// For a resolved spec.
    pub fn new(client: Client, registry: RegistryHost, spec: DockerConfigProvider<ClusterSecretRef>) -> Self {
        Self { client, registry, spec }
    }
}

impl CredentialProvider for DockerConfig {
    fn issue<'a>(&'a self, reads: &'a source::Reads) -> BoxFuture<'a, Result<Credential, ProviderError>> {
        Box::pin(async move {
            let r = &self.spec.secret_ref;
            let secret = source::read_secret(&self.client, reads, &r.namespace, &r.name).await?;
            let found = secret.type_.clone().unwrap_or_else(|| "Opaque".to_owned());
            if found != DOCKER_CONFIG_JSON_TYPE {
                return Err(ProviderError::WrongSecretType {
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    found,
                    expected: DOCKER_CONFIG_JSON_TYPE,
                });
            }
            let raw = secret
                .data
                .as_ref()
                .and_then(|d| d.get(DOCKER_CONFIG_JSON_KEY))
                .ok_or_else(|| ProviderError::SecretKeyMissing {
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    key: DOCKER_CONFIG_JSON_KEY.to_owned(),
                    present: String::new(),
                })?;
            entry_for(&raw.0, &self.registry).map_err(|problem| match problem {
                EntryError::Malformed(detail) => ProviderError::MalformedDockerConfig {
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    detail,
                },
                EntryError::NoEntry(keys) => ProviderError::NoRegistryEntry {
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    registry: self.registry.to_string(),
                    keys,
                },
            })
        })
    }
}

#[derive(Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Why no credential came out of a docker config. Never carries secret material.
#[derive(Debug, PartialEq, Eq)]
pub enum EntryError {
    /// Not a docker config; the text says where, never what.
    Malformed(String),
    /// No entry for the registry; lists the keys present.
    NoEntry(String),
}

/// Finds the credential for `registry` in a docker config JSON document. Keys match
/// whatever form docker accepts: bare `host[:port]`, with a scheme, or with a path
/// (`https://index.docker.io/v1/`).
pub fn entry_for(json: &[u8], registry: &RegistryHost) -> Result<Credential, EntryError> {
    let config: ConfigFile = serde_json::from_slice(json).map_err(|e| {
        // serde_json messages can quote values; report only the position and category.
        EntryError::Malformed(format!(
            "not valid docker config JSON ({:?} error at line {}, column {})",
            e.classify(),
            e.line(),
            e.column()
        ))
    })?;
    let entry = config
        .auths
        .iter()
        .find(|(key, _)| normalise_key(key).is_some_and(|k| k.same_registry(registry)))
        .map(|(_, v)| v)
        .ok_or_else(|| EntryError::NoEntry(super::list_names(config.auths.keys())))?;
    let (username, password) = match (&entry.username, &entry.password) {
        (Some(u), Some(p)) if !u.is_empty() => (u.clone(), p.clone()),
        _ => {
            let auth = entry
                .auth
                .as_deref()
                .ok_or_else(|| EntryError::Malformed("the entry has neither username/password nor auth".into()))?;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| EntryError::Malformed("the entry's auth is not base64".into()))?;
            let text = String::from_utf8(decoded)
                .map_err(|_| EntryError::Malformed("the entry's auth is not UTF-8".into()))?;
            let (u, p) = text
                .split_once(':')
                .ok_or_else(|| EntryError::Malformed("the entry's auth is not user:password".into()))?;
            (u.to_owned(), p.to_owned())
        }
    };
    Ok(Credential {
        username,
        password: SecretString::from(password),
        expires_at: None,
    })
}

fn normalise_key(key: &str) -> Option<RegistryHost> {
    let no_scheme = key.split_once("://").map_or(key, |(_, rest)| rest);
    let host = no_scheme.split('/').next().unwrap_or(no_scheme);
    let parsed = RegistryHost::parse(host).ok()?;
    Some(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn host(s: &str) -> RegistryHost {
        RegistryHost::parse(s).expect("host")
    }

    #[test]
    fn finds_entries_under_any_key_form() {
        let auth = base64::engine::general_purpose::STANDARD.encode("bob:s3cret");
        let json = format!(
            r#"{{"auths":{{"https://ghcr.io/v2/":{{"auth":"{auth}"}},"quay.io":{{"username":"u","password":"p"}}}}}}"#
        );
        let c = entry_for(json.as_bytes(), &host("ghcr.io")).expect("entry");
        assert_eq!((c.username.as_str(), c.password.expose_secret()), ("bob", "s3cret"));
        let c = entry_for(json.as_bytes(), &host("quay.io")).expect("entry");
        assert_eq!(c.username, "u");
    }

    #[test]
    fn docker_hub_matches_its_historical_key() {
        let json = br#"{"auths":{"https://index.docker.io/v1/":{"username":"me","password":"tok"}}}"#;
        let hub = entry_for(json, &host("docker.io")).expect("hub entry");
        assert_eq!(hub.username, "me");
    }

    #[test]
    fn missing_entry_lists_keys_and_malformed_json_quotes_nothing() {
        let json = br#"{"auths":{"quay.io":{"username":"u","password":"p"}}}"#;
        assert_eq!(
            entry_for(json, &host("ghcr.io")).err(),
            Some(EntryError::NoEntry("quay.io".into()))
        );
        let bad = br#"{"auths": {"ghcr.io": {"username": ["hunter2-secret"]}}}"#;
        match entry_for(bad, &host("ghcr.io")) {
            Err(EntryError::Malformed(m)) => assert!(!m.contains("hunter2"), "{m}"),
            other => panic!("expected Malformed, got {:?}", other.map(|c| c.username)),
        }
    }
}
