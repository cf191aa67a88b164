//! Tenancy of the namespaced kind: a `RegistryCredential` never uses the operator's own
//! cloud identity unless the administrator opts in, a namespace's ServiceAccount is
//! federated to AWS, Google and Azure with tokens the real apiserver issues, and the
//! apiserver refuses endpoint overrides on the namespaced kind.

use std::time::Duration;

use kube::Client;
use serde_json::{Value, json};

use crate::fakes::{self, Behaviour, Federation, Mode};
use crate::support::{self, SHARD_LABEL, eventually};

const ECR_REGISTRY: &str = "123456789012.dkr.ecr.us-east-1.amazonaws.com";
const GCP_REGISTRY: &str = "europe-docker.pkg.dev";
const ACR_REGISTRY: &str = "contoso.azurecr.io";
const ACR_USER: &str = "00000000-0000-0000-0000-000000000000";
const WORKLOAD_IDENTITY_PROVIDER: &str =
    "projects/123456789/locations/global/workloadIdentityPools/tenants/providers/kube";

/// A tenant namespace with a ServiceAccount `puller`, served by an operator process of
/// its own shard.
struct Tenant {
    client: Client,
    ns: String,
    shard: String,
    dir: tempfile::TempDir,
}

async fn tenant(prefix: &str) -> Tenant {
    support::env();
    let client = support::client().await;
    let ns = support::namespace(&client, prefix, &[]).await;
    support::service_account(&client, &ns, "puller").await;
    Tenant {
        client,
        ns,
        shard: support::unique(prefix),
        dir: tempfile::tempdir().expect("tempdir"),
    }
}

impl Tenant {
    fn operator(&self, name: &str, env: &[(&str, &str)]) -> support::Operator {
        support::start(&support::env().kubeconfig, &self.shard, env, self.dir.path(), name)
    }

    async fn apply(&self, name: &str, registry: &str, provider: Value) {
        support::apply_namespaced(
            &self.client,
            &self.ns,
            name,
            json!({SHARD_LABEL: self.shard}),
            json!({"registry": registry, "provider": provider}),
        )
        .await
        .expect("credential applied");
    }

    async fn ready(&self, op: &support::Operator, name: &str, status: &str, reason: &str) -> Value {
        let s = support::wait_namespaced_ready(&self.client, &self.ns, name, status, reason, || op.log_text()).await;
        serde_json::to_value(s).expect("status")
    }

    async fn entry(&self, name: &str, registry: &str) -> Option<Value> {
        support::written_entry(&self.client, &self.ns, &format!("pullkeeper-{name}"), registry).await
    }

    async fn done(self) {
        support::delete_namespace(&self.client, &self.ns).await;
    }

    fn subject(&self) -> String {
        format!("system:serviceaccount:{}:puller", self.ns)
    }
}

fn condition<'a>(status: &'a Value, kind: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == kind))
        .unwrap_or(&Value::Null)
}

fn fakes_host() -> String {
    fakes::fakes().base.trim_start_matches("http://").to_owned()
}

#[tokio::test]
async fn without_the_opt_in_no_cloud_is_asked_with_the_operators_identity() {
    let t = tenant("ambient").await;
    let f = fakes::fakes();
    // Every ambient identity of the operator points at a sink that counts requests.
    let id = support::unique("sink");
    let sink = format!("{}/count/{id}", f.base);
    let metadata_host = format!("{}/count/{id}", fakes_host());
    let token_file = t.dir.path().join("azure-identity-token");
    std::fs::write(&token_file, "operator-federated-token").expect("token file");
    let op = t.operator(
        "ambient-off",
        &[
            ("AWS_ENDPOINT_URL", sink.as_str()),
            ("AWS_ACCESS_KEY_ID", "AKIAOPERATORIDENTITY"),
            ("AWS_SECRET_ACCESS_KEY", "operator-secret-key"),
            ("GCE_METADATA_HOST", metadata_host.as_str()),
            ("AZURE_FEDERATED_TOKEN_FILE", token_file.to_str().expect("path")),
            ("AZURE_TENANT_ID", "operator-tenant"),
            ("AZURE_CLIENT_ID", "operator-client"),
            ("AZURE_AUTHORITY_HOST", sink.as_str()),
        ],
    );
    for (provider, registry, instead) in [
        ("ecr", ECR_REGISTRY, "serviceAccountRef with roleArn"),
        ("gcp", GCP_REGISTRY, "serviceAccountRef with workloadIdentityProvider"),
        ("acr", ACR_REGISTRY, "serviceAccountRef with tenantId and clientId"),
    ] {
        let name = format!("ambient-{provider}");
        t.apply(&name, registry, json!({provider: {}})).await;
        let status = t.ready(&op, &name, "False", "AmbientCredentialsNotAllowed").await;
        let message = condition(&status, "Ready")["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            message.contains(&format!("spec.provider.{provider}"))
                && message.contains("--namespaced-ambient-credentials")
                && message.contains(instead),
            "{message}"
        );
        assert_eq!(condition(&status, "CredentialIssued")["status"], "False", "{status}");
        assert_eq!(t.entry(&name, registry).await, None, "a pull secret was written");
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        fakes::hits(&id),
        0,
        "a cloud endpoint was asked with the operator's identity"
    );

    // The same process does use its identity for the cluster kind: the sink is wired.
    let cluster = support::unique("ambient-cluster");
    support::apply_credential(
        &t.client,
        &cluster,
        json!({SHARD_LABEL: t.shard}),
        json!({"registry": GCP_REGISTRY, "provider": {"gcp": {}}, "target": {"namespaces": [t.ns]}}),
    )
    .await;
    let reached = eventually(Duration::from_secs(30), || async {
        (fakes::hits(&id) > 0).then_some(())
    })
    .await;
    assert!(
        reached.is_some(),
        "the cluster kind never reached the sink; log: {}",
        op.log_text()
    );
    support::delete_credential(&t.client, &cluster).await;
    t.done().await;
}

#[tokio::test]
async fn with_the_opt_in_a_namespaced_credential_may_use_the_operators_identity() {
    let t = tenant("ambient-on").await;
    let f = fakes::fakes();
    let id = support::unique("meta");
    f.set(
        &id,
        Behaviour {
            mode: Mode::Ok,
            lifetime: 3600,
            issued: 0,
            client_secret: String::new(),
            public_key: String::new(),
        },
    );
    let metadata_host = format!("{}/meta/{id}", fakes_host());
    let op = t.operator(
        "ambient-on",
        &[
            ("PULLKEEPER_NAMESPACED_AMBIENT_CREDENTIALS", "true"),
            ("GCE_METADATA_HOST", metadata_host.as_str()),
        ],
    );
    t.apply("gke", GCP_REGISTRY, json!({"gcp": {}})).await;
    t.ready(&op, "gke", "True", "Synced").await;
    let entry = t.entry("gke", GCP_REGISTRY).await.expect("pull secret written");
    assert_eq!(entry["username"], "oauth2accesstoken");
    assert_eq!(entry["password"], format!("ya29.meta-{id}-1"));

    // Even with the opt-in, the operator's Azure token is only exchanged at an ACR host.
    t.apply("not-acr", "registry.example.com", json!({"acr": {}})).await;
    let status = t.ready(&op, "not-acr", "False", "InvalidSpec").await;
    let message = condition(&status, "Ready")["message"].as_str().unwrap_or_default();
    assert!(message.contains("not an Azure Container Registry host"), "{message}");
    t.done().await;
}

#[tokio::test]
async fn a_tenants_service_account_is_federated_to_aws() {
    let moto = support::moto();
    let t = tenant("fed-aws").await;
    // No AWS credentials at all: only the exchanged web identity can sign the ECR call.
    let op = t.operator("fed-aws", &[("AWS_ENDPOINT_URL", moto)]);
    t.apply(
        "ecr",
        ECR_REGISTRY,
        json!({"ecr": {
            "serviceAccountRef": {"name": "puller"},
            "roleArn": "arn:aws:iam::123456789012:role/tenant-pull"
        }}),
    )
    .await;
    t.ready(&op, "ecr", "True", "Synced").await;
    let entry = t.entry("ecr", ECR_REGISTRY).await.expect("pull secret written");
    assert_eq!(entry["username"], "AWS", "{entry}");
    assert!(entry["password"].as_str().is_some_and(|p| !p.is_empty()), "{entry}");
    t.done().await;
}

#[tokio::test]
async fn a_tenants_service_account_is_federated_to_google() {
    let t = tenant("fed-gcp").await;
    let f = fakes::fakes();
    let id = support::unique("gcp");
    let email = "puller@tenant-project.iam.gserviceaccount.com";
    fakes::expect_federation(
        &id,
        Federation {
            jwks: support::apiserver_jwks(&t.client).await,
            subject: t.subject(),
            audience: format!("//iam.googleapis.com/{WORKLOAD_IDENTITY_PROVIDER}"),
            principal: email.to_owned(),
            tenant: String::new(),
            registry: String::new(),
            exchanged: 0,
        },
    );
    let sts = format!("{}/sts/{id}/v1/token", f.base);
    let iam = format!("{}/iam/{id}", f.base);
    let op = t.operator(
        "fed-gcp",
        &[
            ("PULLKEEPER_GCP_STS_URL", sts.as_str()),
            ("PULLKEEPER_GCP_IAM_CREDENTIALS_URL", iam.as_str()),
        ],
    );
    t.apply(
        "gar",
        GCP_REGISTRY,
        json!({"gcp": {
            "serviceAccountRef": {"name": "puller"},
            "workloadIdentityProvider": WORKLOAD_IDENTITY_PROVIDER,
            "serviceAccountEmail": email
        }}),
    )
    .await;
    t.ready(&op, "gar", "True", "Synced").await;
    let entry = t.entry("gar", GCP_REGISTRY).await.expect("pull secret written");
    assert_eq!(entry["username"], "oauth2accesstoken");
    assert_eq!(entry["password"], format!("ya29.impersonated-{id}"));
    assert_eq!(fakes::exchanged(&id), 1);

    // Without impersonation the federated token itself is written, with the read-only scope.
    t.apply(
        "gar-direct",
        GCP_REGISTRY,
        json!({"gcp": {"serviceAccountRef": {"name": "puller"}, "workloadIdentityProvider": WORKLOAD_IDENTITY_PROVIDER}}),
    )
    .await;
    t.ready(&op, "gar-direct", "True", "Synced").await;
    let entry = t.entry("gar-direct", GCP_REGISTRY).await.expect("pull secret written");
    assert_eq!(entry["password"], format!("ya29.sts-ro-{id}"));
    t.done().await;
}

#[tokio::test]
async fn a_tenants_service_account_is_federated_to_azure() {
    let t = tenant("fed-acr").await;
    let f = fakes::fakes();
    // The registry's own HTTPS address: the exchange goes to https://<registry>/oauth2/exchange.
    let (registry, ca) = fakes::tls();
    let id = support::unique("entra");
    let client_id = "22222222-3333-4444-5555-666666666666";
    let tenant_id = format!("tenant-{id}");
    fakes::expect_federation(
        &id,
        Federation {
            jwks: support::apiserver_jwks(&t.client).await,
            subject: t.subject(),
            audience: "api://AzureADTokenExchange".into(),
            principal: client_id.into(),
            tenant: tenant_id.clone(),
            registry: registry.clone(),
            exchanged: 0,
        },
    );
    let authority = format!("{}/entra/{id}", f.base);
    let op = t.operator(
        "fed-acr",
        &[
            ("AZURE_AUTHORITY_HOST", authority.as_str()),
            ("SSL_CERT_FILE", ca.to_str().expect("path")),
        ],
    );
    t.apply(
        "acr",
        registry,
        json!({"acr": {"serviceAccountRef": {"name": "puller"}, "tenantId": tenant_id, "clientId": client_id}}),
    )
    .await;
    t.ready(&op, "acr", "True", "Synced").await;
    let entry = t.entry("acr", registry).await.expect("pull secret written");
    assert_eq!(entry["username"], ACR_USER);
    assert!(
        entry["password"]
            .as_str()
            .is_some_and(|p| p.ends_with(&format!("acr-{id}"))),
        "{entry}"
    );
    assert_eq!(fakes::exchanged(&id), 1);
    t.done().await;
}

#[tokio::test]
async fn the_apiserver_refuses_endpoint_overrides_on_the_namespaced_kind() {
    support::env();
    let client = support::client().await;
    let ns = support::namespace(&client, "overrides", &[]).await;
    for (registry, provider, refused) in [
        (
            ECR_REGISTRY,
            json!({"ecr": {"credentialsSecretRef": {"name": "aws"}, "endpoint": "http://10.0.0.1"}}),
            "spec.provider.ecr.endpoint is not allowed on a RegistryCredential",
        ),
        (
            GCP_REGISTRY,
            json!({"gcp": {"metadataUrl": "http://10.0.0.1"}}),
            "spec.provider.gcp.metadataUrl is not allowed on a RegistryCredential",
        ),
        (
            GCP_REGISTRY,
            json!({"gcp": {"serviceAccountKeySecretRef": {"name": "k", "key": "key.json"}, "tokenUrl": "http://10.0.0.1"}}),
            "spec.provider.gcp.tokenUrl is not allowed on a RegistryCredential",
        ),
        (
            ACR_REGISTRY,
            json!({"acr": {"authorityHost": "http://10.0.0.1"}}),
            "spec.provider.acr.authorityHost is not allowed on a RegistryCredential",
        ),
        (
            ACR_REGISTRY,
            json!({"acr": {"exchangeUrl": "http://10.0.0.1"}}),
            "spec.provider.acr.exchangeUrl is not allowed on a RegistryCredential",
        ),
        (
            ECR_REGISTRY,
            json!({"ecr": {"roleArn": "arn:aws:iam::123456789012:role/any"}}),
            "spec.provider.ecr.roleArn on a RegistryCredential needs serviceAccountRef or credentialsSecretRef",
        ),
        (
            ECR_REGISTRY,
            json!({"ecr": {"serviceAccountRef": {"name": "puller"}}}),
            "serviceAccountRef needs roleArn",
        ),
    ] {
        let err = support::apply_namespaced(
            &client,
            &ns,
            "refused",
            json!({}),
            json!({"registry": registry, "provider": provider}),
        )
        .await
        .expect_err(refused);
        match err {
            kube::Error::Api(e) => {
                assert_eq!(e.code, 422, "{e:?}");
                assert!(e.message.contains(refused), "{refused}: {}", e.message);
            }
            other => panic!("{refused}: {other}"),
        }
    }
    // Administrators keep the overrides on the cluster kind.
    let name = support::unique("overrides");
    support::apply_credential(
        &client,
        &name,
        json!({SHARD_LABEL: "nobody"}),
        json!({"registry": ACR_REGISTRY, "provider": {"acr": {"exchangeUrl": "http://10.0.0.1"}}, "target": {"namespaces": [ns]}}),
    )
    .await;
    support::delete_credential(&client, &name).await;
    support::delete_namespace(&client, &ns).await;
}
