//! Reading a referenced Secret, with errors that name it and never quote its data.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use super::ProviderError;

/// Reads `namespace/name`, turning API failures into provider errors a person can act on.
pub async fn read_secret(client: &Client, namespace: &str, name: &str) -> Result<Secret, ProviderError> {
    match Api::<Secret>::namespaced(client.clone(), namespace).get(name).await {
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
