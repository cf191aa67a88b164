//! `provider.gcp` and `provider.acr` against local servers that follow the real
//! protocols, and the renewal schedule with short-lived tokens: renewed before expiry over
//! several cycles, and an outage across a renewal keeps the old secret until recovery.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::jiff::Timestamp;
use kube::{Api, Client, ResourceExt};
use pullkeeper::crd::RegistryCredentialStatus;
use serde_json::{Value, json};

use crate::fakes::{self, Behaviour, Mode};
use crate::support::{self, eventually};

struct Case {
    client: Client,
    id: String,
    src: String,
    namespaces: Vec<String>,
    label: String,
    name: String,
}

async fn case(prefix: &str, lifetime: i64, targets: usize) -> Case {
    support::env();
    let f = fakes::fakes();
    let client = support::client().await;
    let id = support::unique(prefix);
    let (private, public) = fakes::rsa_key_pair();
    f.set(
        &id,
        Behaviour {
            mode: Mode::Ok,
            lifetime,
            issued: 0,
            client_secret: format!("azure-secret-{id}"),
            public_key: public,
        },
    );
    let src = support::namespace(&client, "tok-src", &[]).await;
    let key = json!({
        "type": "service_account",
        "client_email": format!("puller@{id}.iam.gserviceaccount.com"),
        "private_key_id": "k1",
        "private_key": private,
        "token_uri": format!("{}/gcp/{id}/token", f.base),
    });
    support::put_secret(
        &client,
        &src,
        "cloud",
        json!({"key.json": key.to_string(), "client-secret": format!("azure-secret-{id}")}),
    )
    .await;
    let label = support::unique(prefix);
    let mut namespaces = Vec::new();
    for _ in 0..targets {
        namespaces.push(support::namespace(&client, prefix, &[("e2e-target", &label)]).await);
    }
    let name = support::unique(prefix);
    Case {
        client,
        id,
        src,
        namespaces,
        label,
        name,
    }
}

impl Case {
    async fn apply(&self, registry: &str, provider: Value) {
        support::apply_credential(
            &self.client,
            &self.name,
            json!({}),
            json!({
                "registry": registry,
                "provider": provider,
                "target": {"namespaceSelector": {"matchLabels": {"e2e-target": self.label}}}
            }),
        )
        .await;
    }

    async fn ready(&self, status: &str, reason: &str) -> RegistryCredentialStatus {
        support::wait_ready(&self.client, &self.name, status, reason).await
    }

    /// (username, password, expires-at annotation) in `ns`.
    async fn written(&self, ns: &str) -> Option<(String, String, Option<String>)> {
        let s = Api::<Secret>::namespaced(self.client.clone(), ns)
            .get_opt(&format!("pullkeeper-{}", self.name))
            .await
            .ok()??;
        let cfg: Value = serde_json::from_slice(&s.data.as_ref()?.get(".dockerconfigjson")?.0).ok()?;
        let (_, entry) = cfg["auths"].as_object()?.iter().next()?;
        Some((
            entry["username"].as_str()?.to_owned(),
            entry["password"].as_str()?.to_owned(),
            s.annotations().get("pullkeeper.io/expires-at").cloned(),
        ))
    }

    async fn delete(&self) {
        support::delete_credential(&self.client, &self.name).await;
    }
}

#[tokio::test]
async fn gcp_tokens_are_renewed_before_they_expire_in_every_namespace() {
    let c = case("gcp", 8, 2).await;
    c.apply(
        "europe-docker.pkg.dev",
        json!({"gcp": {"serviceAccountKeySecretRef": {"name": "cloud", "namespace": c.src, "key": "key.json"}}}),
    )
    .await;
    c.ready("True", "Synced").await;
    // Over 18 s (more than two lifetimes) every namespace keeps a token that has not
    // expired, and the token changes as it is renewed (about every 6 s).
    let mut seen = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(18);
    while tokio::time::Instant::now() < deadline {
        for ns in &c.namespaces {
            let (user, password, expires) = c.written(ns).await.expect("secret present");
            assert_eq!(user, "oauth2accesstoken");
            let expires: Timestamp = expires.expect("expires-at").parse().expect("RFC 3339");
            assert!(expires > Timestamp::now(), "{ns} holds an expired token ({expires})");
            seen.insert(password);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(seen.len() >= 3, "tokens were not renewed: {seen:?}");
    // One provider call per renewal, not per namespace.
    let issued = fakes::fakes().issued(&c.id);
    assert!(
        issued as usize <= seen.len() + 1,
        "{issued} tokens minted for {} seen",
        seen.len()
    );
    assert!(
        !support::logs().contains("ya29.gcp-"),
        "an access token reached the operator's logs"
    );
    c.delete().await;
}

#[tokio::test]
async fn an_outage_across_a_renewal_keeps_the_old_secret_and_recovers() {
    let c = case("outage", 6, 1).await;
    let ns = c.namespaces[0].clone();
    c.apply(
        "europe-docker.pkg.dev",
        json!({"gcp": {"serviceAccountKeySecretRef": {"name": "cloud", "namespace": c.src, "key": "key.json"}}}),
    )
    .await;
    c.ready("True", "Synced").await;
    let (_, before, _) = c.written(&ns).await.expect("written");
    fakes::fakes().mode(&c.id, Mode::Down);
    let status = c.ready("False", "ProviderUnreachable").await;
    let issued = status
        .conditions
        .iter()
        .find(|x| x.type_ == "CredentialIssued")
        .expect("CredentialIssued");
    assert_eq!(issued.status, "False");
    let (_, during, _) = c.written(&ns).await.expect("the old secret stays during the outage");
    assert_eq!(during, before, "a failed renewal replaced the secret");
    fakes::fakes().mode(&c.id, Mode::Ok);
    c.ready("True", "Synced").await;
    let renewed = eventually(Duration::from_secs(20), || async {
        let (_, now, _) = c.written(&ns).await?;
        (now != before).then_some(now)
    })
    .await;
    assert!(renewed.is_some(), "no new token after the provider came back");
    c.delete().await;
}

#[tokio::test]
async fn a_provider_outage_is_retried_with_backoff_whatever_triggers_arrive() {
    let c = case("backoff", 3600, 1).await;
    let ns = c.namespaces[0].clone();
    let f = fakes::fakes();
    let provider =
        json!({"gcp": {"serviceAccountKeySecretRef": {"name": "cloud", "namespace": c.src, "key": "key.json"}}});
    c.apply("europe-docker.pkg.dev", provider.clone()).await;
    c.ready("True", "Synced").await;
    let (_, before, _) = c.written(&ns).await.expect("written");
    // The endpoint goes down (503), and a spec change makes the operator ask again.
    f.mode(&c.id, Mode::Down);
    let start = f.requests(&c.id);
    c.apply(
        "europe-docker.pkg.dev",
        json!({"gcp": {
            "serviceAccountKeySecretRef": {"name": "cloud", "namespace": c.src, "key": "key.json"},
            "tokenUrl": format!("{}/gcp/{}/token", f.base, c.id),
        }}),
    )
    .await;
    let status = c.ready("False", "ProviderUnreachable").await;
    assert!(status.next_refresh_time.is_some(), "the next attempt is in status");
    // For 30 s, namespaces keep arriving (each one a trigger): the endpoint still sees
    // only what the backoff allows (1, 2, 4, 8, 16 s with jitter: at most 7 calls).
    let client = support::client().await;
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        support::namespace(&client, "backoff-churn", &[("e2e-target", &c.label)]).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let calls = f.requests(&c.id) - start;
    assert!((2..=8).contains(&calls), "{calls} provider requests in 30 s of outage");
    let (_, during, _) = c.written(&ns).await.expect("the old secret stays during the outage");
    assert_eq!(during, before, "a failed call replaced the secret");
    // Recovery is noticed within the longest wait (30 s).
    f.mode(&c.id, Mode::Ok);
    let renewed = eventually(Duration::from_secs(40), || async {
        let (_, now, _) = c.written(&ns).await?;
        (now != before).then_some(now)
    })
    .await;
    assert!(renewed.is_some(), "no new token within 40 s of recovery");
    c.delete().await;
}

#[tokio::test]
async fn gcp_metadata_server_and_rejected_keys() {
    let c = case("gcpmeta", 3600, 1).await;
    let f = fakes::fakes();
    c.apply(
        "gcr.io",
        json!({"gcp": {"metadataUrl": format!("{}/meta/{}", f.base, c.id)}}),
    )
    .await;
    c.ready("True", "Synced").await;
    let (user, password, _) = c.written(&c.namespaces[0]).await.expect("written");
    assert_eq!(user, "oauth2accesstoken");
    assert!(password.starts_with("ya29.meta-"), "{password}");

    // A key Google rejects.
    f.mode(&c.id, Mode::Reject);
    c.apply(
        "gcr.io",
        json!({"gcp": {"serviceAccountKeySecretRef": {"name": "cloud", "namespace": c.src, "key": "key.json"}}}),
    )
    .await;
    let status = c.ready("False", "ProviderUnauthorized").await;
    let msg = &status
        .conditions
        .iter()
        .find(|x| x.type_ == "Ready")
        .expect("ready")
        .message;
    assert!(msg.contains("invalid_grant"), "{msg}");
    c.delete().await;
}

#[tokio::test]
async fn acr_exchanges_an_entra_token_for_a_refresh_token() {
    let c = case("acr", 3 * 3600, 1).await;
    let f = fakes::fakes();
    let provider = |key: &str| {
        json!({"acr": {
            "tenantId": "contoso-tenant",
            "clientId": "11111111-2222-3333-4444-555555555555",
            "clientSecretRef": {"name": "cloud", "namespace": c.src, "key": key},
            "authorityHost": format!("{}/aad/{}", f.base, c.id),
            "exchangeUrl": format!("{}/acr/{}/oauth2/exchange", f.base, c.id),
        }})
    };
    c.apply("contoso.azurecr.io", provider("client-secret")).await;
    let status = c.ready("True", "Synced").await;
    let (user, password, expires) = c.written(&c.namespaces[0]).await.expect("written");
    assert_eq!(user, "00000000-0000-0000-0000-000000000000");
    assert_eq!(password.split('.').count(), 3, "a JWT refresh token");
    // Expiry comes from the token's exp claim: about 3 hours ahead.
    let exp: Timestamp = expires.expect("expires-at").parse().expect("time");
    let ahead = exp.duration_since(Timestamp::now()).as_secs();
    assert!((3 * 3600 - 120..=3 * 3600 + 5).contains(&ahead), "{ahead}");
    assert!(status.expires_at.is_some());

    // A wrong client secret is ProviderUnauthorized and leaves the working secret alone.
    c.apply("contoso.azurecr.io", provider("key.json")).await;
    c.ready("False", "ProviderUnauthorized").await;
    let (_, still, _) = c.written(&c.namespaces[0]).await.expect("kept");
    assert_eq!(still, password);
    c.delete().await;
}
