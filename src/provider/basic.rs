//! `provider.basic`: a static username and password or token from a Secret.

use futures::future::BoxFuture;
use kube::Client;
use secrecy::SecretString;

use super::{Credential, CredentialProvider, ProviderError, source};
use crate::crd::{BasicProvider, ClusterSecretRef};

/// Reads the username and password keys of one Secret.
pub struct Basic {
    client: Client,
    spec: BasicProvider<ClusterSecretRef>,
}

impl Basic {
    /// For a resolved spec.
    pub fn new(client: Client, spec: BasicProvider<ClusterSecretRef>) -> Self {
        Self { client, spec }
    }
}

impl CredentialProvider for Basic {
    fn issue<'a>(&'a self, reads: &'a source::Reads) -> BoxFuture<'a, Result<Credential, ProviderError>> {
        Box::pin(async move {
            let r = &self.spec.secret_ref;
            let secret = source::read_secret(&self.client, reads, &r.namespace, &r.name).await?;
            let username = source::key_string(&secret, &r.namespace, &self.spec.username_key)?;
            let password = source::key_string(&secret, &r.namespace, &self.spec.password_key)?;
            Ok(Credential {
                username,
                password: SecretString::from(password),
                expires_at: None,
            })
        })
    }
}
