//! The walking skeleton: CRDs served, status written, bad input refused or reported,
//! operator endpoints up.

use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use pullkeeper::crd::{ClusterRegistryCredential, RegistryCredential, RegistryCredentialStatus};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{self, eventually};

const APPLY: &str = "e2e-user";

async fn apply<K>(api: &Api<K>, name: &str, body: Value) -> Result<K, kube::Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply(APPLY).validation_strict(),
        &Patch::Apply(&body),
    )
    .await
}

/// Waits until status describes the current generation and has a Ready condition.
async fn settled_status<K>(api: &Api<K>, name: &str) -> RegistryCredentialStatus
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + serde::Serialize,
{
    eventually(Duration::from_secs(20), || async {
        let obj = api.get(name).await.ok()?;
        let generation = obj.meta().generation;
        let v = serde_json::to_value(&obj).ok()?;
        let status: RegistryCredentialStatus = serde_json::from_value(v.get("status")?.clone()).ok()?;
        (status.observed_generation == generation
            && status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.observed_generation == generation))
        .then_some(status)
    })
    .await
    .unwrap_or_else(|| panic!("{name} never got a Ready condition for its generation"))
}

fn ready(status: &RegistryCredentialStatus) -> (String, String, String) {
    let c = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready condition");
    (c.status.clone(), c.reason.clone(), c.message.clone())
}

fn cluster_body(name: &str, registry: &str) -> Value {
    json!({
        "apiVersion": "pullkeeper.io/v1alpha1",
        "kind": "ClusterRegistryCredential",
        "metadata": {"name": name},
        "spec": {
            "registry": registry,
            "provider": {"acr": {"tenantId": "t", "clientId": "c"}},
            "target": {"namespaces": ["nowhere"]}
        }
    })
}

#[tokio::test]
async fn crds_are_served_for_both_kinds() {
    support::env();
    let client = support::client().await;
    Api::<ClusterRegistryCredential>::all(client.clone())
        .list_metadata(&Default::default())
        .await
        .expect("cluster kind served");
    Api::<RegistryCredential>::all(client)
        .list_metadata(&Default::default())
        .await
        .expect("namespaced kind served");
}

#[tokio::test]
async fn a_cluster_credential_gets_observed_generation_and_ready() {
    support::env();
    let client = support::client().await;
    let api = Api::<ClusterRegistryCredential>::all(client.clone());
    let name = support::unique("crc");
    apply(
        &api,
        &name,
        cluster_body(&name, "123456789012.dkr.ecr.us-east-1.amazonaws.com"),
    )
    .await
    .expect("valid object accepted");
    let status = settled_status(&api, &name).await;
    let (s, reason, message) = ready(&status);
    // No client secret and no workload identity in this process: a clear InvalidSpec.
    assert_eq!((s.as_str(), reason.as_str()), ("False", "InvalidSpec"));
    assert!(message.contains("clientSecretRef"), "{message}");

    // A spec change is observed under the new generation.
    apply(
        &api,
        &name,
        cluster_body(&name, "123456789012.dkr.ecr.eu-west-1.amazonaws.com"),
    )
    .await
    .expect("update accepted");
    let status = settled_status(&api, &name).await;
    assert_eq!(status.observed_generation, Some(2));
    cleanup_cluster(&client, &name).await;
}

#[tokio::test]
async fn a_namespaced_credential_gets_observed_generation_and_ready() {
    support::env();
    let client = support::client().await;
    let ns = support::namespace(&client, "regcred", &[]).await;
    let api = Api::<RegistryCredential>::namespaced(client.clone(), &ns);
    let name = support::unique("ghcr");
    apply(
        &api,
        &name,
        json!({
            "apiVersion": "pullkeeper.io/v1alpha1",
            "kind": "RegistryCredential",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "registry": "ghcr.io",
                "provider": {"gcp": {"serviceAccountKeySecretRef": {"name": "gcp-sa", "key": "key.json"}}}
            }
        }),
    )
    .await
    .expect("valid object accepted");
    let status = settled_status(&api, &name).await;
    let (s, reason, message) = ready(&status);
    assert_eq!((s.as_str(), reason.as_str()), ("False", "SecretNotFound"));
    assert!(message.contains(&format!("{ns}/gcp-sa")), "{message}");
    support::delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn malformed_objects_are_refused_with_a_message_naming_the_field() {
    support::env();
    let client = support::client().await;
    let api = Api::<ClusterRegistryCredential>::all(client.clone());
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "scheme in registry",
            json!({"registry": "https://ghcr.io", "provider": {"ecr": {}}}),
            "spec.registry",
        ),
        (
            "path in registry",
            json!({"registry": "ghcr.io/org", "provider": {"ecr": {}}}),
            "spec.registry",
        ),
        (
            "two providers",
            json!({"registry": "ghcr.io", "provider": {"ecr": {}, "gcp": {}}}),
            "spec.provider",
        ),
        (
            "no provider",
            json!({"registry": "ghcr.io", "provider": {}}),
            "spec.provider",
        ),
        ("missing provider", json!({"registry": "ghcr.io"}), "spec.provider"),
        (
            "secretRef without namespace",
            json!({"registry": "ghcr.io", "provider": {"basic": {"secretRef": {"name": "pat"}}}}),
            "spec.provider.basic.secretRef.namespace",
        ),
        (
            "bad duration",
            json!({"registry": "ghcr.io", "provider": {"ecr": {}}, "refresh": {"renewBefore": "soon"}}),
            "spec.refresh.renewBefore",
        ),
        (
            "bad platform",
            json!({"registry": "ghcr.io", "provider": {"ecr": {}}, "verify": {"images": ["ghcr.io/a:b"], "platforms": ["amd64"]}}),
            "spec.verify.platforms",
        ),
    ];
    for (what, spec, field) in cases {
        let name = support::unique("bad");
        let body = json!({
            "apiVersion": "pullkeeper.io/v1alpha1",
            "kind": "ClusterRegistryCredential",
            "metadata": {"name": name},
            "spec": spec,
        });
        match apply(&api, &name, body).await {
            Ok(_) => panic!("{what}: the apiserver accepted a malformed object"),
            Err(kube::Error::Api(e)) => {
                assert_eq!(e.code, 422, "{what}: {e:?}");
                assert!(
                    e.message.contains(field),
                    "{what}: message does not name {field}: {}",
                    e.message
                );
            }
            Err(other) => panic!("{what}: unexpected error {other}"),
        }
    }
}

#[tokio::test]
async fn the_namespaced_kind_cannot_reach_into_another_namespace() {
    support::env();
    let client = support::client().await;
    let ns = support::namespace(&client, "tenant", &[]).await;
    let api = Api::<RegistryCredential>::namespaced(client.clone(), &ns);
    let name = support::unique("sneaky");
    let body = json!({
        "apiVersion": "pullkeeper.io/v1alpha1",
        "kind": "RegistryCredential",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "registry": "ghcr.io",
            "provider": {"basic": {"secretRef": {"name": "pat", "namespace": "kube-system"}}},
            "target": {"namespaceSelector": {}}
        }
    });
    match apply(&api, &name, body).await {
        Err(kube::Error::Api(e)) => {
            assert!(e.message.contains("namespace"), "{}", e.message);
        }
        // Servers without strict field validation prune the unknown fields instead.
        Ok(obj) => {
            let text = serde_json::to_string(&obj.spec).expect("serialises");
            assert!(
                !text.contains("kube-system") && !text.contains("namespaceSelector"),
                "{text}"
            );
        }
        Err(other) => panic!("unexpected error {other}"),
    }
    support::delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn invalid_input_is_reported_and_the_operator_keeps_serving_others() {
    support::env();
    let client = support::client().await;
    let api = Api::<ClusterRegistryCredential>::all(client.clone());
    let bad = support::unique("overlap");
    apply(
        &api,
        &bad,
        json!({
            "apiVersion": "pullkeeper.io/v1alpha1",
            "kind": "ClusterRegistryCredential",
            "metadata": {"name": bad},
            "spec": {
                "registry": "ghcr.io",
                "provider": {"ecr": {}},
                "refresh": {"interval": "0s"},
                "target": {"namespaces": ["web"], "excludeNamespaces": ["web"]}
            }
        }),
    )
    .await
    .expect("schema-valid object accepted");
    let status = settled_status(&api, &bad).await;
    let (s, reason, message) = ready(&status);
    assert_eq!((s.as_str(), reason.as_str()), ("False", "InvalidSpec"));
    assert!(message.contains("excludeNamespaces"), "{message}");

    let good = support::unique("good");
    apply(&api, &good, cluster_body(&good, "registry.example.com:5000"))
        .await
        .expect("valid object accepted");
    settled_status(&api, &good).await;
    cleanup_cluster(&client, &bad).await;
    cleanup_cluster(&client, &good).await;
}

#[tokio::test]
async fn health_readiness_and_metrics_are_served() {
    let env = support::env();
    let ok = eventually(Duration::from_secs(20), || async {
        let (code, _) = http_get(env.metrics_addr, "/readyz").await?;
        (code == 200).then_some(())
    })
    .await;
    assert!(ok.is_some(), "/readyz never became 200");
    let (code, body) = http_get(env.metrics_addr, "/healthz").await.expect("healthz");
    assert_eq!((code, body.trim()), (200, "ok"));
    // Make sure at least one reconcile happened before reading the counter.
    a_cluster_credential_is_reconciled().await;
    let (code, body) = http_get(env.metrics_addr, "/metrics").await.expect("metrics");
    assert_eq!(code, 200);
    // OpenMetrics text: every sample line is `name{labels} value`, and it ends with # EOF.
    assert_eq!(body.trim_end().lines().last(), Some("# EOF"), "{body}");
    for line in body.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
        let value = line.rsplit(' ').next().expect("value");
        assert!(value.parse::<f64>().is_ok(), "unparsable sample: {line}");
        assert!(
            line.starts_with("pullkeeper_"),
            "metric without the pullkeeper_ prefix: {line}"
        );
    }
    for family in [
        "pullkeeper_reconciles_total{",
        "pullkeeper_reconcile_duration_seconds_bucket{",
        "pullkeeper_api_requests_total{",
        "pullkeeper_managed_secrets ",
        "pullkeeper_provider_calls_total{",
    ] {
        assert!(body.contains(family), "{family} missing:\n{body}");
    }
    // Secret values never become metric labels.
    assert!(!body.contains("pw-secret") && !body.contains("password"), "{body}");
}

async fn a_cluster_credential_is_reconciled() {
    let client = support::client().await;
    let api = Api::<ClusterRegistryCredential>::all(client.clone());
    let name = support::unique("metrics");
    apply(&api, &name, cluster_body(&name, "ghcr.io"))
        .await
        .expect("accepted");
    settled_status(&api, &name).await;
    cleanup_cluster(&client, &name).await;
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((code, body))
}

async fn cleanup_cluster(client: &Client, name: &str) {
    let _ = Api::<ClusterRegistryCredential>::all(client.clone())
        .delete(name, &Default::default())
        .await;
}
