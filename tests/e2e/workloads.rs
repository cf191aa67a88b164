//! `pullkeeper check --cluster` against the real control plane and the test registry:
//! each kind of broken workload is reported with the right reason on the right workload
//! and container, and fixing it clears it. No node is needed: pods stay Pending.

use std::process::Command;

use base64::Engine as _;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::support;

fn check(namespace: &str, output: &str) -> (i32, String, String) {
    check_as(&support::env().kubeconfig, namespace, output)
}

fn check_as(kubeconfig: &std::path::Path, namespace: &str, output: &str) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pullkeeper"))
        .args(["check", "--cluster", "-n", namespace, "--output", output])
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("pullkeeper check --cluster");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Server-side applies an object of kind `K` as a user would.
pub(crate) async fn apply<K>(client: &Client, namespace: &str, object: Value)
where
    K: kube::Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let name = object["metadata"]["name"].as_str().expect("named").to_owned();
    Api::<K>::namespaced(client.clone(), namespace)
        .patch(&name, &PatchParams::apply("e2e-user").force(), &Patch::Apply(&object))
        .await
        .unwrap_or_else(|e| panic!("applying {name}: {e}"));
}

pub(crate) fn deployment(name: &str, pod: Value) -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod}
        }
    })
}

pub(crate) fn cron_job(name: &str, mut pod: Value) -> Value {
    pod["restartPolicy"] = json!("Never");
    json!({
        "apiVersion": "batch/v1", "kind": "CronJob",
        "metadata": {"name": name},
        "spec": {"schedule": "0 0 1 1 *", "jobTemplate": {"spec": {"template": {"spec": pod}}}}
    })
}

pub(crate) fn pull_secret(name: &str, registry: &str, user: &str, password: &str) -> Value {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": json!({"auths": {registry: {"auth": auth}}}).to_string()}
    })
}

pub(crate) fn pod(secret: Option<&str>, image: &str) -> Value {
    let mut spec = json!({"containers": [{"name": "app", "image": image}]});
    if let Some(s) = secret {
        spec["imagePullSecrets"] = json!([{"name": s}]);
    }
    spec
}

/// Deletes `repo:tag` from the registry (its manifest, by digest).
pub(crate) async fn delete_image(reg: &support::Registry, repo: &str, tag: &str) {
    let http = reqwest::Client::new();
    let url = format!("http://{}/v2/{repo}/manifests/{tag}", reg.addr);
    let head = http
        .head(&url)
        .basic_auth(&reg.user, Some(&reg.password))
        .header(
            "Accept",
            "application/vnd.oci.image.index.v1+json, application/vnd.oci.image.manifest.v1+json",
        )
        .send()
        .await
        .expect("head");
    let digest = head.headers()["docker-content-digest"]
        .to_str()
        .expect("digest")
        .to_owned();
    let del = http
        .delete(format!("http://{}/v2/{repo}/manifests/{digest}", reg.addr))
        .basic_auth(&reg.user, Some(&reg.password))
        .send()
        .await
        .expect("delete");
    assert!(del.status().is_success(), "deleting {repo}:{tag}: {}", del.status());
}

/// `(workload, container, containerKind, reason)` of each finding, sorted.
fn findings(report: &Value) -> Vec<(String, String, String, String)> {
    let mut out: Vec<_> = report["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| {
            let s = |k: &str| f[k].as_str().unwrap_or_default().to_owned();
            (
                format!("{}/{}", s("kind"), s("name")),
                s("container"),
                s("containerKind"),
                s("reason"),
            )
        })
        .collect();
    out.sort();
    out
}

fn row(workload: &str, container: &str, kind: &str, reason: &str) -> (String, String, String, String) {
    (workload.into(), container.into(), kind.into(), reason.into())
}

#[tokio::test]
async fn broken_workloads_are_reported_on_the_right_container_and_fixes_clear_them() {
    let reg = support::registry();
    let client = support::client().await;
    let ns = support::namespace(&client, "workloads", &[]).await;
    let r = &reg.addr;
    let multi = support::unique("multi");
    let nightly = support::unique("nightly");
    support::push_index(r, &reg.user, &reg.password, &multi, "v1").await;
    support::push_index(r, &reg.user, &reg.password, &nightly, "v1").await;
    delete_image(reg, &nightly, "v1").await;

    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::batch::v1::CronJob;
    use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
    apply::<Secret>(&client, &ns, pull_secret("pull", r, &reg.user, &reg.password)).await;
    apply::<Secret>(&client, &ns, pull_secret("stale", r, &reg.user, "not-the-password")).await;
    let demo = format!("{r}/demo:v1");
    let broken = [
        deployment("missing-tag", pod(Some("pull"), &format!("{r}/demo:no-such-tag"))),
        deployment("sa-lacks-secret", pod(None, &demo)),
        deployment("wrong-password", pod(Some("stale"), &demo)),
        deployment("init", {
            let mut p = pod(Some("pull"), &demo);
            p["initContainers"] = json!([{"name": "setup", "image": format!("{r}/no-such-repo:v1")}]);
            p
        }),
        deployment("s390x", {
            let mut p = pod(Some("pull"), &format!("{r}/{multi}:v1"));
            p["nodeSelector"] = json!({"kubernetes.io/arch": "s390x"});
            p
        }),
        deployment("healthy", pod(Some("pull"), &format!("{r}/{multi}:v1"))),
    ];
    for d in broken {
        apply::<Deployment>(&client, &ns, d).await;
    }
    apply::<CronJob>(
        &client,
        &ns,
        cron_job("nightly", pod(Some("pull"), &format!("{r}/{nightly}:v1"))),
    )
    .await;

    let (code, out, err) = check(&ns, "json");
    assert_eq!(code, 1, "{out}{err}");
    let report: Value = serde_json::from_str(&out).unwrap_or_else(|_| panic!("not JSON: {out}{err}"));
    assert_eq!(
        findings(&report),
        vec![
            row("CronJob/nightly", "app", "container", "NotFound"),
            row("Deployment/init", "setup", "initContainer", "NotFound"),
            row("Deployment/missing-tag", "app", "container", "NotFound"),
            row("Deployment/s390x", "app", "container", "PlatformMissing"),
            row("Deployment/sa-lacks-secret", "app", "container", "Unauthorized"),
            row("Deployment/wrong-password", "app", "container", "Unauthorized"),
        ],
        "{out}"
    );
    let message = |name: &str| {
        report["findings"]
            .as_array()
            .and_then(|f| f.iter().find(|f| f["name"] == name))
            .and_then(|f| f["message"].as_str())
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        message("sa-lacks-secret").contains(&format!("no pull Secret of ServiceAccount {ns}/default has an entry")),
        "{out}"
    );
    assert!(
        message("s390x").contains("linux/s390x") && message("s390x").contains("linux/arm64"),
        "{out}"
    );
    let wrong = report["findings"]
        .as_array()
        .and_then(|f| f.iter().find(|f| f["name"] == "wrong-password"))
        .expect("wrong-password");
    assert_eq!(wrong["credentials"], json!([format!("Secret {ns}/stale ({r})")]));
    assert!(
        !out.contains(&reg.password) && !err.contains(&reg.password),
        "a password was printed"
    );
    assert!(!out.contains("not-the-password"), "a password was printed");
    // The Deployments' ReplicaSets and Pods are not checked again.
    assert_eq!(report["workloads"], 7, "{out}");

    let (code, table, err) = check(&ns, "table");
    assert_eq!(code, 1, "{table}{err}");
    assert!(
        table.contains("Deployment/init") && table.contains("setup (initContainer)"),
        "{table}"
    );
    assert!(
        !table.contains(&reg.password) && !table.contains("not-the-password"),
        "{table}"
    );

    // Fix each.
    apply::<Deployment>(&client, &ns, deployment("missing-tag", pod(Some("pull"), &demo))).await;
    apply::<ServiceAccount>(
        &client,
        &ns,
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}, "imagePullSecrets": [{"name": "pull"}]}),
    )
    .await;
    apply::<Secret>(&client, &ns, pull_secret("stale", r, &reg.user, &reg.password)).await;
    apply::<Deployment>(
        &client,
        &ns,
        deployment("init", {
            let mut p = pod(Some("pull"), &demo);
            p["initContainers"] = json!([{"name": "setup", "image": demo}]);
            p
        }),
    )
    .await;
    apply::<Deployment>(
        &client,
        &ns,
        deployment("s390x", {
            let mut p = pod(Some("pull"), &format!("{r}/{multi}:v1"));
            p["nodeSelector"] = json!({"kubernetes.io/arch": "arm64"});
            p
        }),
    )
    .await;
    support::push_index(r, &reg.user, &reg.password, &nightly, "v1").await;

    let (code, out, err) = check(&ns, "json");
    assert_eq!(code, 0, "{out}{err}");
    let report: Value = serde_json::from_str(&out).expect("json");
    assert!(findings(&report).is_empty(), "{out}");
    let (images, resolutions) = (
        report["images"].as_u64().unwrap_or(0),
        report["resolutions"].as_u64().unwrap_or(u64::MAX),
    );
    assert_eq!(images, 8, "{out}");
    assert_eq!(
        resolutions, 3,
        "one resolution per image and credential: demo:v1, {multi}:v1 and {nightly}:v1 with one login: {out}"
    );
    support::delete_namespace(&client, &ns).await;
}

/// A copy of the admin kubeconfig that acts as `user` (impersonation).
fn kubeconfig_as(dir: &std::path::Path, user: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(&support::env().kubeconfig).expect("kubeconfig");
    let mut kc: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
    for u in kc["users"].as_sequence_mut().expect("users") {
        u["user"]["as"] = serde_yaml::Value::from(user);
    }
    let path = dir.join("kubeconfig");
    std::fs::write(&path, serde_yaml::to_string(&kc).expect("yaml")).expect("write");
    path
}

#[tokio::test]
async fn a_secret_the_user_cannot_read_is_reported_not_fatal() {
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::Secret;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let reg = support::registry();
    let client = support::client().await;
    let ns = support::namespace(&client, "workloads-rbac", &[]).await;
    let r = &reg.addr;
    apply::<Secret>(&client, &ns, pull_secret("pull", r, &reg.user, &reg.password)).await;
    apply::<Secret>(&client, &ns, pull_secret("hidden", r, &reg.user, &reg.password)).await;
    let demo = format!("{r}/demo:v1");
    apply::<Deployment>(&client, &ns, deployment("readable", pod(Some("pull"), &demo))).await;
    apply::<Deployment>(&client, &ns, deployment("unreadable", pod(Some("hidden"), &demo))).await;
    let list = json!(["list"]);
    apply::<Role>(
        &client,
        &ns,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": {"name": "viewer"}, "rules": [
            {"apiGroups": ["apps"], "resources": ["deployments", "statefulsets", "daemonsets", "replicasets"], "verbs": list},
            {"apiGroups": ["batch"], "resources": ["jobs", "cronjobs"], "verbs": list},
            {"apiGroups": [""], "resources": ["pods", "serviceaccounts"], "verbs": list},
            {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["pull"], "verbs": ["get"]}
        ]}),
    )
    .await;
    apply::<RoleBinding>(
        &client,
        &ns,
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "viewer"},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "viewer"},
               "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "pk-viewer"}]}),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = kubeconfig_as(dir.path(), "pk-viewer");
    let (code, stdout, stderr) = check_as(&kubeconfig, &ns, "json");
    assert_eq!(code, 1, "{stdout}{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|_| panic!("not JSON: {stdout}{stderr}"));
    assert_eq!(
        findings(&report),
        vec![row("Deployment/unreadable", "app", "container", "SecretForbidden")],
        "{stdout}"
    );
    assert_eq!(report["findings"][0]["verdict"], "Unknown", "{stdout}");
    assert!(
        report["findings"][0]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&format!("{ns}/hidden"))),
        "{stdout}"
    );
    assert!(!stdout.contains(&reg.password) && !stderr.contains(&reg.password));
    support::delete_namespace(&client, &ns).await;
}
