//! The webhook's serving certificate. Managed by the operator: a self-signed CA and a
//! serving certificate for the webhook's host names, kept in one `kubernetes.io/tls`
//! Secret in the operator's namespace so that every replica serves the same one, issued
//! anew (CA included; the CA key is never stored) once a third of the lifetime is left or
//! the host names change. `ca.crt` keeps the previous CA beside the new one, so replicas
//! that still serve the previous certificate stay trusted until they reload. Or managed by
//! cert-manager: the operator only reads the mounted `tls.crt` and `tls.key`.
//!
//! The decisions are pure; [`ensure`] does the Secret I/O.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use serde_json::{Value, json};

use super::Error;

/// How long an issued certificate (and its CA) is valid.
pub const LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Annotation on the Secret: when the serving certificate expires.
pub const NOT_AFTER_ANNOTATION: &str = "pullkeeper.io/not-after";
/// Annotation on the Secret: the host names the serving certificate is for.
pub const HOSTS_ANNOTATION: &str = "pullkeeper.io/hosts";
/// Keys of the Secret (those of `kubernetes.io/tls`, as cert-manager writes them).
pub const CERT_KEY: &str = "tls.crt";
/// Private key of the serving certificate.
pub const KEY_KEY: &str = "tls.key";
/// The CA bundle the apiserver trusts.
pub const CA_KEY: &str = "ca.crt";

/// A serving certificate with its key and the CA bundle that trusts it (PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct Material {
    /// Serving certificate.
    pub cert: String,
    /// Its private key.
    pub key: String,
    /// CA certificates (the current one first).
    pub ca: String,
    /// Expiry of the serving certificate.
    pub not_after: Timestamp,
    /// Host names (or IP addresses) it is valid for.
    pub hosts: Vec<String>,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Material")
            .field("not_after", &self.not_after)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

/// Whether `stored` must be replaced: missing, for other host names, or with less than a
/// third of [`LIFETIME`] left at `now`.
pub fn needs_issuing(stored: Option<&Material>, hosts: &[String], now: Timestamp) -> bool {
    let Some(m) = stored else { return true };
    let renew_at = m.not_after.checked_sub(LIFETIME / 3).unwrap_or(Timestamp::MIN);
    m.hosts != hosts || now >= renew_at
}

/// A new CA and a serving certificate for `hosts` valid from `now` for [`LIFETIME`]
/// (backdated an hour for clock skew). The previous CA, if given, stays in the bundle.
pub fn issue(hosts: &[String], now: Timestamp, previous_ca: Option<&str>) -> Result<Material, Error> {
    let at = |t: Timestamp| time::OffsetDateTime::from_unix_timestamp(t.as_second()).map_err(|_| Error::Time);
    let not_before = now.checked_sub(Duration::from_secs(3600)).map_err(|_| Error::Time)?;
    let not_after = now.checked_add(LIFETIME).map_err(|_| Error::Time)?;

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(Error::Certificate)?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "pullkeeper webhook CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    ca_params.not_before = at(not_before)?;
    ca_params.not_after = at(not_after)?;
    let ca_key = KeyPair::generate().map_err(Error::Certificate)?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(Error::Certificate)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params = CertificateParams::new(hosts.to_vec()).map_err(Error::Certificate)?;
    if let Some(first) = hosts.first() {
        params.distinguished_name.push(DnType::CommonName, first.as_str());
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = at(not_before)?;
    params.not_after = at(not_after)?;
    let key = KeyPair::generate().map_err(Error::Certificate)?;
    let cert = params.signed_by(&key, &issuer).map_err(Error::Certificate)?;

    let mut ca = ca_cert.pem();
    if let Some(prev) = previous_ca.and_then(first_pem) {
        ca.push_str(&prev);
    }
    Ok(Material {
        cert: cert.pem(),
        key: key.serialize_pem(),
        ca,
        not_after,
        hosts: hosts.to_vec(),
    })
}

/// The first PEM block of a bundle (the current CA of a stored bundle).
fn first_pem(bundle: &str) -> Option<String> {
    const END: &str = "-----END CERTIFICATE-----";
    let start = bundle.find("-----BEGIN CERTIFICATE-----")?;
    let end = bundle[start..].find(END)? + start + END.len();
    Some(format!("{}\n", &bundle[start..end]))
}

/// The material in a Secret written by [`secret_body`], if complete.
pub fn from_secret(secret: &Secret) -> Option<Material> {
    let data = secret.data.as_ref()?;
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .filter(|s| !s.is_empty())
    };
    let annotations = secret.metadata.annotations.as_ref()?;
    Some(Material {
        cert: text(CERT_KEY)?,
        key: text(KEY_KEY)?,
        ca: text(CA_KEY)?,
        not_after: annotations.get(NOT_AFTER_ANNOTATION)?.parse().ok()?,
        hosts: annotations
            .get(HOSTS_ANNOTATION)?
            .split(',')
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
            .collect(),
    })
}

/// The Secret holding `m`.
pub fn secret_body(namespace: &str, name: &str, m: &Material) -> Value {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "pullkeeper", "app.kubernetes.io/component": "webhook"},
            "annotations": {
                NOT_AFTER_ANNOTATION: m.not_after.to_string(),
                HOSTS_ANNOTATION: m.hosts.join(","),
            },
        },
        "type": "kubernetes.io/tls",
        "data": {CERT_KEY: b64(&m.cert), KEY_KEY: b64(&m.key), CA_KEY: b64(&m.ca)},
    })
}

/// A rustls key from PEM certificate chain and key.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, Error> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| Error::Pem("certificate"))?;
    if chain.is_empty() {
        return Err(Error::Pem("certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|_| Error::Pem("private key"))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|_| Error::Pem("private key"))?;
    Ok(CertifiedKey::new(chain, signer))
}

/// The certificate the server presents, swapped in place when renewed.
#[derive(Debug, Default)]
pub struct Resolver {
    current: RwLock<Option<(Vec<u8>, Arc<CertifiedKey>)>>,
}

impl Resolver {
    /// Serves `cert_pem`/`key_pem` from now on; returns whether they differ from before.
    pub fn load(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<bool, Error> {
        let fingerprint: Vec<u8> = [cert_pem, key_pem].concat();
        if self
            .current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_some_and(|(f, _)| *f == fingerprint)
        {
            return Ok(false);
        }
        let key = Arc::new(certified_key(cert_pem, key_pem)?);
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((fingerprint, key));
        Ok(true)
    }

    /// Whether a certificate is loaded.
    pub fn loaded(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_some()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|(_, k)| k.clone())
    }
}

/// Reads the Secret `namespace/name`, issues and writes new material when
/// [`needs_issuing`] says so, and returns what the Secret holds. Replicas racing to write
/// it settle on one: creation fails on an existing Secret and a renewal is guarded by the
/// resourceVersion it was computed from; the loser reads the winner's.
pub async fn ensure(client: &Client, namespace: &str, name: &str, hosts: &[String]) -> Result<Material, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let io = |source| Error::CertSecret {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    };
    for _ in 0..3 {
        let existing = api.get_opt(name).await.map_err(io)?;
        let stored = existing.as_ref().and_then(from_secret);
        if !needs_issuing(stored.as_ref(), hosts, Timestamp::now())
            && let Some(m) = stored
        {
            return Ok(m);
        }
        let previous = stored.as_ref().map(|m| m.ca.as_str());
        let fresh = issue(hosts, Timestamp::now(), previous)?;
        let mut body = secret_body(namespace, name, &fresh);
        let written = match existing.and_then(|s| s.metadata.resource_version) {
            None => {
                let secret: Secret = serde_json::from_value(body).map_err(Error::Serialize)?;
                api.create(&PostParams::default(), &secret).await.map(|_| ())
            }
            Some(rv) => {
                body["metadata"]["resourceVersion"] = json!(rv);
                api.patch(name, &PatchParams::default(), &Patch::Merge(&body))
                    .await
                    .map(|_| ())
            }
        };
        match written {
            Ok(()) => {
                tracing::info!(secret = %format!("{namespace}/{name}"), hosts = ?hosts, not_after = %fresh.not_after, "issued the webhook's serving certificate");
                return Ok(fresh);
            }
            // Another replica wrote it first: use theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(io(e)),
        }
    }
    Err(Error::CertContention {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

/// Reads cert-manager's mounted `tls.crt` and `tls.key` from `dir`.
pub fn read_dir(dir: &std::path::Path) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let read = |f: &str| {
        let path = dir.join(f);
        std::fs::read(&path).map_err(|source| Error::ReadFile { path, source })
    };
    Ok((read(CERT_KEY)?, read(KEY_KEY)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("t")
    }

    fn hosts() -> Vec<String> {
        vec!["pk-webhook.ops.svc".to_owned(), "127.0.0.1".to_owned()]
    }

    #[test]
    fn issued_material_round_trips_through_the_secret_and_loads() {
        crate::install_crypto_provider();
        let m = issue(&hosts(), t(0), None).expect("issued");
        assert_eq!(m.ca.matches("BEGIN CERTIFICATE").count(), 1);
        let secret: Secret = serde_json::from_value(secret_body("ops", "cert", &m)).expect("secret");
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        let back = from_secret(&secret).expect("complete");
        assert!(back == m, "{back:?} != {m:?}");
        assert!(!format!("{m:?}").contains("PRIVATE KEY"), "Debug never shows the key");
        let r = Resolver::default();
        assert!(r.load(m.cert.as_bytes(), m.key.as_bytes()).expect("loads"));
        assert!(
            !r.load(m.cert.as_bytes(), m.key.as_bytes()).expect("loads"),
            "unchanged"
        );
        assert!(r.loaded());
        assert!(certified_key(b"", m.key.as_bytes()).is_err());
    }

    #[test]
    fn a_renewal_keeps_the_previous_ca_trusted() {
        let first = issue(&hosts(), t(0), None).expect("issued");
        let second = issue(&hosts(), t(10), Some(&first.ca)).expect("issued");
        assert_eq!(second.ca.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(second.ca.ends_with(&first.ca));
        // Only one generation back: the bundle does not grow.
        let third = issue(&hosts(), t(20), Some(&second.ca)).expect("issued");
        assert_eq!(third.ca.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(third.ca.contains(first_pem(&second.ca).expect("pem").as_str()));
        assert!(!third.ca.contains(first_pem(&first.ca).expect("pem").as_str()));
    }

    #[test]
    fn issued_again_when_missing_renamed_or_two_thirds_through() {
        let m = issue(&hosts(), t(0), None).expect("issued");
        assert!(needs_issuing(None, &hosts(), t(0)));
        assert!(!needs_issuing(Some(&m), &hosts(), t(0)));
        let two_thirds = (LIFETIME.as_secs() * 2 / 3) as i64;
        assert!(!needs_issuing(Some(&m), &hosts(), t(two_thirds - 60)));
        assert!(needs_issuing(Some(&m), &hosts(), t(two_thirds + 60)));
        assert!(needs_issuing(Some(&m), &["other.ops.svc".to_owned()], t(0)));
    }

    #[test]
    fn mounted_files_are_read_and_served() {
        crate::install_crypto_provider();
        let m = issue(&hosts(), t(0), None).expect("issued");
        let dir = tempfile::tempdir().expect("dir");
        assert!(matches!(read_dir(dir.path()), Err(Error::ReadFile { .. })));
        std::fs::write(dir.path().join(CERT_KEY), &m.cert).expect("write");
        std::fs::write(dir.path().join(KEY_KEY), &m.key).expect("write");
        let (cert, key) = read_dir(dir.path()).expect("read");
        let r = Resolver::default();
        assert!(r.load(&cert, &key).expect("loads"));
    }

    #[test]
    fn an_incomplete_secret_is_not_used() {
        let m = issue(&hosts(), t(0), None).expect("issued");
        let mut body = secret_body("ops", "cert", &m);
        body["data"].as_object_mut().expect("data").remove(KEY_KEY);
        let secret: Secret = serde_json::from_value(body).expect("secret");
        assert!(from_secret(&secret).is_none());
    }
}
