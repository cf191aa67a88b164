//! `provider.ecr` against moto's ECR and STS API server.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt};
use pullkeeper::crd::RegistryCredentialStatus;
use serde_json::{Value, json};

use crate::support;

const REGISTRY: &str = "123456789012.dkr.ecr.us-east-1.amazonaws.com";

struct Setup {
    client: Client,
    src: String,
    ns: String,
    label: String,
}

async fn setup(prefix: &str) -> Setup {
    support::env();
    let client = support::client().await;
    let src = support::namespace(&client, "aws-src", &[]).await;
    let label = support::unique(prefix);
    let ns = support::namespace(&client, prefix, &[("e2e-target", &label)]).await;
    support::put_secret(
        &client,
        &src,
        "aws",
        json!({"access-key-id": "AKIAEXAMPLEKEY", "secret-access-key": "example-secret-key"}),
    )
    .await;
    Setup { client, src, ns, label }
}

impl Setup {
    async fn apply(&self, name: &str, ecr: Value) {
        support::apply_credential(
            &self.client,
            name,
            json!({}),
            json!({
                "registry": REGISTRY,
                "provider": {"ecr": ecr},
                "target": {"namespaceSelector": {"matchLabels": {"e2e-target": self.label}}}
            }),
        )
        .await;
    }

    async fn ready(&self, name: &str, status: &str, reason: &str) -> RegistryCredentialStatus {
        support::wait_ready(&self.client, name, status, reason).await
    }

    async fn delete(&self, name: &str) {
        support::delete_credential(&self.client, name).await;
    }
}

#[tokio::test]
async fn ecr_tokens_are_minted_and_a_past_expiry_does_not_hot_loop() {
    let moto = support::moto();
    let s = setup("ecr").await;
    let name = support::unique("ecr");
    s.apply(
        &name,
        json!({"endpoint": moto, "credentialsSecretRef": {"name": "aws", "namespace": s.src}}),
    )
    .await;
    let status = s.ready(&name, "True", "Synced").await;
    let secret_name = format!("pullkeeper-{name}");
    let secret = Api::<Secret>::namespaced(s.client.clone(), &s.ns)
        .get(&secret_name)
        .await
        .expect("secret written");
    let cfg: Value =
        serde_json::from_slice(&secret.data.as_ref().expect("data")[".dockerconfigjson"].0).expect("docker config");
    let entry = &cfg["auths"][REGISTRY];
    assert_eq!(entry["username"], "AWS", "{cfg}");
    let password = entry["password"].as_str().expect("password");
    assert!(!password.is_empty());
    // The operator's logs are captured at trace level (wire-logging libraries capped as in
    // production): neither the token nor its base64 `auth` form is in them.
    let logs = support::logs();
    assert!(!logs.contains(password), "the ECR token reached the logs");
    assert!(
        !logs.contains(entry["auth"].as_str().expect("auth")),
        "the ECR auth reached the logs"
    );
    // moto answers with an expiry in 2015: annotated as given, renewed on the floor interval.
    let expires = secret
        .annotations()
        .get("pullkeeper.io/expires-at")
        .cloned()
        .expect("expires-at annotation");
    assert!(expires.starts_with("2015-"), "{expires}");
    let last = status.last_refresh_time.expect("lastRefreshTime").0;
    let next = status.next_refresh_time.expect("nextRefreshTime").0;
    assert!(
        next.duration_since(last).as_secs() >= 29,
        "refresh floor not applied: {last} -> {next}"
    );
    let issued = status
        .conditions
        .iter()
        .find(|c| c.type_ == "CredentialIssued")
        .expect("CredentialIssued");
    assert!(issued.message.contains("already past"), "{}", issued.message);
    s.delete(&name).await;
}

#[tokio::test]
async fn ecr_assume_role_goes_through_sts() {
    let moto = support::moto();
    let s = setup("ecr-role").await;
    let name = support::unique("ecr-role");
    s.apply(
        &name,
        json!({
            "endpoint": moto,
            "credentialsSecretRef": {"name": "aws", "namespace": s.src},
            "roleArn": "arn:aws:iam::210987654321:role/ecr-pull",
            "externalId": "pullkeeper-test"
        }),
    )
    .await;
    s.ready(&name, "True", "Synced").await;
    let secret = Api::<Secret>::namespaced(s.client.clone(), &s.ns)
        .get(&format!("pullkeeper-{name}"))
        .await
        .expect("secret written");
    let cfg: Value =
        serde_json::from_slice(&secret.data.as_ref().expect("data")[".dockerconfigjson"].0).expect("docker config");
    let password = cfg["auths"][REGISTRY]["password"].as_str().expect("password");
    assert!(
        !support::logs().contains(password),
        "the ECR token minted with assumed-role credentials reached the logs"
    );
    s.delete(&name).await;
}

#[tokio::test]
async fn ecr_endpoint_down_is_unreachable_and_writes_nothing() {
    let s = setup("ecr-down").await;
    let name = support::unique("ecr-down");
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    s.apply(
        &name,
        json!({"endpoint": format!("http://127.0.0.1:{closed}"), "credentialsSecretRef": {"name": "aws", "namespace": s.src}}),
    )
    .await;
    let status = s.ready(&name, "False", "ProviderUnreachable").await;
    let msg = &status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("ready")
        .message;
    assert!(msg.contains("could not be reached"), "{msg}");
    assert!(
        Api::<Secret>::namespaced(s.client.clone(), &s.ns)
            .get_opt(&format!("pullkeeper-{name}"))
            .await
            .expect("get")
            .is_none()
    );
    assert!(
        !support::logs().contains("example-secret-key"),
        "an AWS secret key reached the logs"
    );
    s.delete(&name).await;
}

#[tokio::test]
async fn ecr_without_a_region_in_host_or_spec_is_invalid() {
    let s = setup("ecr-noregion").await;
    let name = support::unique("ecr-noregion");
    support::apply_credential(
        &s.client,
        &name,
        json!({}),
        json!({"registry": "registry.example.com", "provider": {"ecr": {}}, "target": {"namespaces": [s.ns]}}),
    )
    .await;
    let status = s.ready(&name, "False", "InvalidSpec").await;
    let msg = &status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("ready")
        .message;
    assert!(msg.contains("spec.provider.ecr.region"), "{msg}");
    s.delete(&name).await;
}

/// Against a real ECR registry, with credentials from the default AWS chain of the test
/// process. Run with:
/// `PULLKEEPER_TEST_ECR_REGISTRY=<account>.dkr.ecr.<region>.amazonaws.com cargo test --test e2e -- --ignored real_ecr`
#[tokio::test]
#[ignore = "needs AWS account"]
async fn real_ecr_issues_a_token() {
    let registry = std::env::var("PULLKEEPER_TEST_ECR_REGISTRY").expect("set PULLKEEPER_TEST_ECR_REGISTRY");
    let s = setup("real-ecr").await;
    let name = support::unique("real-ecr");
    support::apply_credential(
        &s.client,
        &name,
        json!({}),
        json!({"registry": registry, "provider": {"ecr": {}}, "target": {"namespaces": [s.ns]}}),
    )
    .await;
    let status = s.ready(&name, "True", "Synced").await;
    let expires = status.expires_at.expect("expiresAt").0;
    let hours = expires.duration_since(k8s_openapi::jiff::Timestamp::now()).as_secs() / 3600;
    assert!((11..=12).contains(&hours), "ECR tokens last 12 hours, got {hours}");
    s.delete(&name).await;
}

#[tokio::test]
async fn ecr_wrong_credentials_are_unauthorized() {
    let moto = support::moto_with_auth();
    let s = setup("ecr-badkey").await;
    let name = support::unique("ecr-badkey");
    s.apply(
        &name,
        json!({"endpoint": moto, "credentialsSecretRef": {"name": "aws", "namespace": s.src}}),
    )
    .await;
    let status = s.ready(&name, "False", "ProviderUnauthorized").await;
    let msg = &status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("ready")
        .message;
    assert!(
        msg.contains("InvalidClientTokenId") || msg.contains("security token"),
        "{msg}"
    );
    assert!(!msg.contains("example-secret-key"), "{msg}");
    s.delete(&name).await;
}
