//! Reading a referenced Secret, with errors that name it and never quote its data, and
//! a note of the copy read, so that only a change from that copy calls the provider again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use super::ProviderError;

/// How a provider call found a source Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Found {
    /// It did not exist.
    Missing,
    /// It existed at this resourceVersion.
    At(String),
}

/// The source Secrets a provider call read, by `(namespace, name)`, each as it found
/// it. A Secret it could not read (forbidden, unreachable) is not in it: unknown.
pub type Read = BTreeMap<(String, String), Found>;

/// Where a provider call notes the Secrets it reads, for whoever made the call.
#[derive(Clone, Debug, Default)]
pub struct Reads(Arc<Mutex<Read>>);

impl Reads {
    /// What was read so far.
    pub fn read(&self) -> Read {
        crate::lock(&self.0).clone()
    }

    fn note(&self, namespace: &str, name: &str, found: Option<Found>) {
        let mut read = crate::lock(&self.0);
        let key = (namespace.to_owned(), name.to_owned());
        match found {
            Some(found) => read.insert(key, found),
            None => read.remove(&key),
        };
    }
}

/// Reads `namespace/name`, turning API failures into provider errors a person can act on,
/// and notes in `reads` which copy it read (or that there was none).
pub async fn read_secret(client: &Client, reads: &Reads, namespace: &str, name: &str) -> Result<Secret, ProviderError> {
    let result = Api::<Secret>::namespaced(client.clone(), namespace).get(name).await;
    let found = match &result {
        Ok(s) => s.metadata.resource_version.clone().map(Found::At),
        Err(kube::Error::Api(e)) if e.code == 404 => Some(Found::Missing),
        Err(_) => None,
    };
    reads.note(namespace, name, found);
    match result {
        Ok(s) => Ok(s),
        Err(kube::Error::Api(e)) if e.code == 404 => Err(ProviderError::SecretNotFound {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }),
        Err(kube::Error::Api(e)) if e.code == 403 => Err(ProviderError::SecretForbidden {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }),
        Err(source) => Err(ProviderError::SecretUnavailable {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source: Box::new(source),
        }),
    }
}

/// One key of a Secret's data as UTF-8, with a trailing newline removed (a common
/// artefact of `echo ... > file` before `kubectl create secret --from-file`).
pub fn key_string(secret: &Secret, namespace: &str, key: &str) -> Result<String, ProviderError> {
    let name = secret.metadata.name.clone().unwrap_or_default();
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .ok_or_else(|| ProviderError::SecretKeyMissing {
            namespace: namespace.to_owned(),
            name: name.clone(),
            key: key.to_owned(),
            present: secret
                .data
                .as_ref()
                .map(|d| super::list_names(d.keys()))
                .unwrap_or_default(),
        })?;
    let s = String::from_utf8(bytes.0.clone()).map_err(|_| ProviderError::SecretKeyNotText {
        namespace: namespace.to_owned(),
        name: name.clone(),
        key: key.to_owned(),
    })?;
    let trimmed = s.trim_end_matches(['\n', '\r']);
    if trimmed.is_empty() {
        return Err(ProviderError::SecretKeyEmpty {
            namespace: namespace.to_owned(),
            name,
            key: key.to_owned(),
        });
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fixtures::{Expect, apiserver, status_error};
    use serde_json::json;

    const PAT: &str = "/api/v1/namespaces/ops/secrets/pat";

    fn key() -> (String, String) {
        ("ops".to_owned(), "pat".to_owned())
    }

    #[tokio::test]
    async fn the_copy_read_is_noted_and_a_failed_read_is_not() {
        let found = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "pat", "namespace": "ops", "resourceVersion": "7"}});
        let (client, script) = apiserver(vec![
            Expect::new("GET", PAT, 200, found),
            Expect::new("GET", PAT, 404, status_error(404, "NotFound")),
            Expect::new("GET", PAT, 403, status_error(403, "Forbidden")),
        ]);
        let reads = Reads::default();
        read_secret(&client, &reads, "ops", "pat").await.expect("found");
        assert_eq!(reads.read(), Read::from([(key(), Found::At("7".into()))]));
        let gone = read_secret(&client, &reads, "ops", "pat").await;
        assert!(matches!(gone, Err(ProviderError::SecretNotFound { .. })));
        assert_eq!(reads.read(), Read::from([(key(), Found::Missing)]));
        let forbidden = read_secret(&client, &reads, "ops", "pat").await;
        assert!(matches!(forbidden, Err(ProviderError::SecretForbidden { .. })));
        assert_eq!(reads.read(), Read::new(), "unknown: not noted");
        script.await.expect("script");
    }
}
