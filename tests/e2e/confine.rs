//! The operator confined: with the Helm chart's RBAC and admission policies, the
//! operator's own token cannot be turned into more than the operator needs; source
//! Secrets can be confined to one namespace; `/metrics` can demand an authorised token.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRoleBinding, RoleBinding};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use pullkeeper::crd::{ClusterRegistryCredential, RegistryCredential};
use serde_json::{Value, json};

use crate::support::{self, SHARD_LABEL, chart_policies, denied_by_policy, eventually};
use crate::support::{free_addr, start};

fn secret(value: Value) -> Secret {
    serde_json::from_value(value).expect("secret")
}

fn audiences(list: &[&str]) -> TokenRequest {
    TokenRequest {
        spec: TokenRequestSpec {
            audiences: list.iter().map(|a| (*a).to_owned()).collect(),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn forbidden_by_rbac<T: std::fmt::Debug>(result: &Result<T, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(e)) if e.code == 403 && !e.message.contains("ValidatingAdmissionPolicy"))
}

#[tokio::test]
async fn a_leaked_operator_token_cannot_escalate() {
    let env = support::env();
    let admin = support::client().await;
    let release = support::unique("confine");
    let home = support::namespace(&admin, "confine-home", &[]).await;
    let victim = support::namespace(&admin, "confine-victim", &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = support::chart_identity(&env.kubeconfig, &release, &home, dir.path(), &[]).await;
    let op = support::client_for(&kubeconfig).await;
    let [secrets_policy, sa_policy, token_policy] = chart_policies(&release);

    // What the admin has in the victim namespace.
    let admin_secrets = Api::<Secret>::namespaced(admin.clone(), &victim);
    admin_secrets
        .create(
            &PostParams::default(),
            &secret(json!({"metadata": {"name": "foreign"}, "stringData": {"password": "hunter2"}})),
        )
        .await
        .expect("foreign secret");
    let admin_sas = Api::<ServiceAccount>::namespaced(admin.clone(), &victim);
    let mut robot = ServiceAccount::default();
    robot.metadata.name = Some("robot".into());
    admin_sas.create(&PostParams::default(), &robot).await.expect("robot");

    let secrets = Api::<Secret>::namespaced(op.clone(), &victim);
    let sas = Api::<ServiceAccount>::namespaced(op.clone(), &victim);
    let pp = PostParams::default();

    // Step one of the escalation: a token Secret for a powerful controller.
    let r = Api::<Secret>::namespaced(op.clone(), "kube-system")
        .create(
            &pp,
            &secret(json!({
                "metadata": {
                    "name": support::unique("steal"),
                    "labels": {"app.kubernetes.io/managed-by": "pullkeeper"},
                    "annotations": {"kubernetes.io/service-account.name": "clusterrole-aggregation-controller"}
                },
                "type": "kubernetes.io/service-account-token"
            })),
        )
        .await;
    assert!(denied_by_policy(&r, &secrets_policy), "{r:?}");
    let r = secrets
        .create(
            &pp,
            &secret(json!({"metadata": {"name": "opaque"}, "stringData": {"a": "b"}})),
        )
        .await;
    assert!(denied_by_policy(&r, &secrets_policy), "an Opaque Secret: {r:?}");
    // Someone else's Secret: no edit (even to label it as pullkeeper's), no delete.
    let label = json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": "pullkeeper"}}});
    let r = secrets
        .patch("foreign", &PatchParams::default(), &Patch::Merge(&label))
        .await;
    assert!(denied_by_policy(&r, &secrets_policy), "{r:?}");
    let r = secrets.delete("foreign", &DeleteParams::default()).await;
    assert!(denied_by_policy(&r, &secrets_policy), "{r:?}");
    assert!(admin_secrets.get_opt("foreign").await.expect("get").is_some());

    // ServiceAccounts: imagePullSecrets only.
    let r = sas
        .patch(
            "robot",
            &PatchParams::default(),
            &Patch::Merge(json!({"secrets": [{"name": "foreign"}]})),
        )
        .await;
    assert!(denied_by_policy(&r, &sa_policy), "secrets: {r:?}");
    let r = sas
        .patch(
            "robot",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"team": "mine"}}})),
        )
        .await;
    assert!(denied_by_policy(&r, &sa_policy), "labels: {r:?}");

    // Tokens for the apiserver: none, neither by default nor by naming its audience.
    for list in [
        &[][..],
        &["https://kubernetes.default.svc"][..],
        &["sts.amazonaws.com", "https://kubernetes.default.svc"][..],
    ] {
        let r = sas.create_token_request("robot", &pp, &audiences(list)).await;
        assert!(denied_by_policy(&r, &token_policy), "audiences {list:?}: {r:?}");
    }

    // And no RBAC at all.
    let crb: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": support::unique("escalate")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": format!("{release}-pullkeeper"), "namespace": home}]
    }))
    .expect("crb");
    let r = Api::<ClusterRoleBinding>::all(op.clone()).create(&pp, &crb).await;
    assert!(forbidden_by_rbac(&r), "{r:?}");
    let rb: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "escalate"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "admin"},
        "subjects": [{"kind": "ServiceAccount", "name": format!("{release}-pullkeeper"), "namespace": home}]
    }))
    .expect("rb");
    let r = Api::<RoleBinding>::namespaced(op.clone(), &victim)
        .create(&pp, &rb)
        .await;
    assert!(forbidden_by_rbac(&r), "{r:?}");

    // The pod admission policies: the chart installs them and the operator may not write
    // one (a policy that rewrites every new Pod).
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
    let gvk = |kind: &str| ApiResource::from_gvk(&GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind));
    let policy: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingAdmissionPolicy",
        "metadata": {"name": support::unique("pullkeeper.io-evil")},
        "spec": {
            "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"], "resources": ["pods"]}]},
            "failurePolicy": "Ignore",
            "reinvocationPolicy": "Never",
            "mutations": [{"patchType": "JSONPatch", "jsonPatch": {"expression": "[]"}}]
        }
    }))
    .expect("policy");
    let r = Api::<DynamicObject>::all_with(op.clone(), &gvk("MutatingAdmissionPolicy"))
        .create(&pp, &policy)
        .await;
    assert!(forbidden_by_rbac(&r), "{r:?}");
    // Admission policies do not apply to admission objects, so the bindings the operator
    // writes (one per credential) cannot be confined this way: see the README's
    // security model.

    // What the operator does is still allowed: its own pull secret, imagePullSecrets,
    // a token for a cloud, deleting its own Secret.
    let own = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "pullkeeper-own", "labels": {"app.kubernetes.io/managed-by": "pullkeeper"}},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": "{\"auths\":{}}"}
    });
    secrets
        .patch(
            "pullkeeper-own",
            &PatchParams::apply("pullkeeper.io/controller"),
            &Patch::Apply(&own),
        )
        .await
        .expect("own pull secret");
    // It may not drop its own label either (that would make the Secret someone else's).
    let r = secrets
        .patch(
            "pullkeeper-own",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": null}}})),
        )
        .await;
    assert!(denied_by_policy(&r, &secrets_policy), "{r:?}");
    sas.patch(
        "robot",
        &PatchParams::default(),
        &Patch::Json::<()>(
            serde_json::from_value(
                json!([{"op": "add", "path": "/imagePullSecrets", "value": [{"name": "pullkeeper-own"}]}]),
            )
            .expect("patch"),
        ),
    )
    .await
    .expect("imagePullSecrets");
    for list in [
        &["sts.amazonaws.com"][..],
        &["api://AzureADTokenExchange"][..],
        &["//iam.googleapis.com/projects/1/locations/global/workloadIdentityPools/p/providers/k8s"][..],
    ] {
        let t = sas.create_token_request("robot", &pp, &audiences(list)).await;
        assert!(t.is_ok(), "audiences {list:?}: {:?}", t.err());
    }
    secrets
        .delete("pullkeeper-own", &DeleteParams::default())
        .await
        .expect("delete own");
    support::delete_namespace(&admin, &victim).await;
}

#[tokio::test]
async fn extra_token_audiences_are_allowed_and_nothing_else() {
    let env = support::env();
    let admin = support::client().await;
    let release = support::unique("audience");
    let home = support::namespace(&admin, "audience-home", &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = support::chart_identity(
        &env.kubeconfig,
        &release,
        &home,
        dir.path(),
        &["admissionPolicy.extraTokenAudiences={vault}"],
    )
    .await;
    let sas = Api::<ServiceAccount>::namespaced(support::client_for(&kubeconfig).await, &home);
    let sa = format!("{release}-pullkeeper");
    let pp = PostParams::default();
    assert!(sas.create_token_request(&sa, &pp, &audiences(&["vault"])).await.is_ok());
    let r = sas.create_token_request(&sa, &pp, &audiences(&["vault2"])).await;
    assert!(denied_by_policy(&r, &chart_policies(&release)[2]), "{r:?}");
}

async fn status_of(client: &Client, ns: &str, name: &str) -> Option<(String, String)> {
    let s = Api::<RegistryCredential>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .ok()??
        .status?;
    let c = s.conditions.iter().find(|c| c.type_ == "Ready")?;
    Some((c.reason.clone(), c.message.clone()))
}

#[tokio::test]
async fn source_secrets_can_be_confined_to_the_operators_namespace() {
    let env = support::env();
    let admin = support::client().await;
    let shard = support::unique("srcns");
    let home = support::namespace(&admin, "srcns-home", &[]).await;
    let elsewhere = support::namespace(&admin, "srcns-elsewhere", &[]).await;
    let target = support::namespace(&admin, "srcns-target", &[("e2e-target", &shard)]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let source_ns = format!("sourceSecrets.namespace={home}");
    let kubeconfig = support::chart_identity(&env.kubeconfig, &shard, &home, dir.path(), &[&source_ns]).await;
    let op = start(
        &kubeconfig,
        &shard,
        &[("PULLKEEPER_SOURCE_SECRET_NAMESPACE", home.as_str())],
        dir.path(),
        "source-namespace",
    );
    let log = || std::fs::read_to_string(&op.log).unwrap_or_default();
    let login = json!({"username": "robot", "password": "pw"});
    support::put_secret(&admin, &home, "login", login.clone()).await;
    support::put_secret(&admin, &elsewhere, "login", login.clone()).await;

    // A ClusterRegistryCredential reading elsewhere is refused, naming field and namespace.
    let refused = support::unique("srcns-refused");
    support::apply_credential(
        &admin,
        &refused,
        json!({SHARD_LABEL: shard}),
        json!({
            "registry": "registry.example.com",
            "provider": {"basic": {"secretRef": {"name": "login", "namespace": elsewhere}}},
            "target": {"namespaceSelector": {"matchLabels": {"e2e-target": shard}}}
        }),
    )
    .await;
    let status = support::wait_ready(&admin, &refused, "False", "InvalidSpec").await;
    let message = support::ready_message(&status);
    assert!(
        message.contains("spec.provider.basic.secretRef.namespace") && message.contains(&format!("\"{home}\"")),
        "{message}"
    );

    // One reading the operator's namespace works.
    let allowed = support::unique("srcns-allowed");
    support::apply_credential(
        &admin,
        &allowed,
        json!({SHARD_LABEL: shard}),
        json!({
            "registry": "registry.example.com",
            "provider": {"basic": {"secretRef": {"name": "login", "namespace": home}}},
            "target": {"namespaceSelector": {"matchLabels": {"e2e-target": shard}}}
        }),
    )
    .await;
    let written = eventually(Duration::from_secs(30), || async {
        Api::<Secret>::namespaced(admin.clone(), &target)
            .get_opt(&format!("pullkeeper-{allowed}"))
            .await
            .ok()?
            .map(|_| ())
    })
    .await;
    assert!(written.is_some(), "nothing written; log: {}", log());

    // A team's RegistryCredential: SecretForbidden until the team lets the operator read
    // its own Secret.
    let team_cred = support::unique("srcns-team");
    Api::<RegistryCredential>::namespaced(admin.clone(), &elsewhere)
        .patch(
            &team_cred,
            &PatchParams::apply("e2e-user").force(),
            &Patch::Apply(json!({
                "apiVersion": "pullkeeper.io/v1alpha1",
                "kind": "RegistryCredential",
                "metadata": {"name": team_cred, "namespace": elsewhere, "labels": {SHARD_LABEL: shard}},
                "spec": {"registry": "registry.example.com", "provider": {"basic": {"secretRef": {"name": "login"}}}}
            })),
        )
        .await
        .expect("team credential");
    let forbidden = eventually(Duration::from_secs(30), || async {
        let (reason, message) = status_of(&admin, &elsewhere, &team_cred).await?;
        (reason == "SecretForbidden").then_some(message)
    })
    .await
    .unwrap_or_else(|| panic!("no SecretForbidden; log: {}", log()));
    assert!(forbidden.contains("grant"), "{forbidden}");
    let grant = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "pullkeeper-source", "namespace": elsewhere},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["login"], "verbs": ["get"]}]
    });
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "pullkeeper-source", "namespace": elsewhere},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pullkeeper-source"},
        "subjects": [{"kind": "ServiceAccount", "name": format!("{shard}-pullkeeper"), "namespace": home}]
    });
    let ssa = PatchParams::apply("e2e-user").force();
    Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(admin.clone(), &elsewhere)
        .patch("pullkeeper-source", &ssa, &Patch::Apply(&grant))
        .await
        .expect("role");
    Api::<RoleBinding>::namespaced(admin.clone(), &elsewhere)
        .patch("pullkeeper-source", &ssa, &Patch::Apply(&binding))
        .await
        .expect("rolebinding");
    // The operator retries on its own; touching the Secret just makes it sooner.
    support::put_secret(
        &admin,
        &elsewhere,
        "login",
        json!({"username": "robot", "password": "pw2"}),
    )
    .await;
    let team_written = eventually(Duration::from_secs(60), || async {
        Api::<Secret>::namespaced(admin.clone(), &elsewhere)
            .get_opt(&format!("pullkeeper-{team_cred}"))
            .await
            .ok()?
            .map(|_| ())
    })
    .await;
    assert!(
        team_written.is_some(),
        "the team's grant was not enough; log: {}",
        log()
    );

    for name in [&refused, &allowed] {
        let _ = Api::<ClusterRegistryCredential>::all(admin.clone())
            .delete(name, &DeleteParams::default())
            .await;
    }
    let _ = Api::<RegistryCredential>::namespaced(admin.clone(), &elsewhere)
        .delete(&team_cred, &DeleteParams::default())
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
}

async fn get(addr: &str, path: &str, token: Option<&str>) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n{auth}\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    buf.split(' ').nth(1)?.parse().ok()
}

fn token_for(namespace: &str, sa: &str) -> String {
    let out = std::process::Command::new(support::tools().join("kubectl"))
        .env("KUBECONFIG", &support::env().kubeconfig)
        .args(["create", "token", sa, "-n", namespace, "--duration=10m"])
        .output()
        .expect("kubectl create token");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn metrics_can_demand_a_token_allowed_to_get_them() {
    let env = support::env();
    let admin = support::client().await;
    let shard = support::unique("metrics");
    let home = support::namespace(&admin, "metrics-home", &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = support::chart_identity(
        &env.kubeconfig,
        &shard,
        &home,
        dir.path(),
        &["metrics.auth.enabled=true"],
    )
    .await;
    let health_addr = free_addr();
    let metrics_addr = free_addr();
    let op = start(
        &kubeconfig,
        &shard,
        &[
            ("PULLKEEPER_HEALTH_ADDR", health_addr.as_str()),
            ("PULLKEEPER_METRICS_ADDR", metrics_addr.as_str()),
            ("PULLKEEPER_METRICS_AUTH", "true"),
        ],
        dir.path(),
        "metrics-auth",
    );
    let log = || std::fs::read_to_string(&op.log).unwrap_or_default();
    // A scraper bound to the chart's metrics-reader role, and one that is not.
    let sa = |name: &str| {
        let mut s = ServiceAccount::default();
        s.metadata.name = Some(name.to_owned());
        s
    };
    let sas = Api::<ServiceAccount>::namespaced(admin.clone(), &home);
    for name in ["scraper", "stranger"] {
        sas.create(&PostParams::default(), &sa(name)).await.expect("sa");
    }
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("{shard}-metrics-reader")},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": format!("{shard}-pullkeeper-metrics-reader")},
        "subjects": [{"kind": "ServiceAccount", "name": "scraper", "namespace": home}]
    }))
    .expect("binding");
    let bindings = Api::<ClusterRoleBinding>::all(admin.clone());
    bindings
        .create(&PostParams::default(), &binding)
        .await
        .expect("binding");

    let up = eventually(Duration::from_secs(30), || async {
        (get(&health_addr, "/readyz", None).await? == 200).then_some(())
    })
    .await;
    assert!(up.is_some(), "not ready; log: {}", log());
    assert_eq!(get(&health_addr, "/healthz", None).await, Some(200));
    assert_eq!(
        get(&health_addr, "/metrics", None).await,
        Some(404),
        "metrics are not on the health port"
    );
    assert_eq!(get(&metrics_addr, "/metrics", None).await, Some(401));
    assert_eq!(get(&metrics_addr, "/metrics", Some("not-a-token")).await, Some(401));
    let stranger = token_for(&home, "stranger");
    assert_eq!(get(&metrics_addr, "/metrics", Some(&stranger)).await, Some(403));
    let scraper = token_for(&home, "scraper");
    assert_eq!(
        get(&metrics_addr, "/metrics", Some(&scraper)).await,
        Some(200),
        "log: {}",
        log()
    );
    let text = log();
    assert!(
        !text.contains(&scraper) && !text.contains(&stranger),
        "a token reached the log"
    );
    let _ = bindings
        .delete(&format!("{shard}-metrics-reader"), &DeleteParams::default())
        .await;
}
