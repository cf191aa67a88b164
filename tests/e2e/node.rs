//! The consumer that matters: a real kubelet (containerd, runc) pulls with the Secrets
//! pullkeeper writes. Workloads are plain Deployments without `imagePullSecrets`; the
//! Secret reaches their pods through the namespace's `default` ServiceAccount.

use std::time::Duration;

use kube::{Api, Client};
use serde_json::{Value, json};

use crate::support::{self, PodOutcome, eventually};

/// A source Secret `login` in a new namespace and a ClusterRegistryCredential `basic` for
/// `registry` that targets the namespaces labelled with a fresh label; returns (source
/// namespace, credential name, label value).
async fn basic_credential(
    client: &Client,
    registry: &str,
    user: &str,
    password: &str,
    extra: Value,
) -> (String, String, String) {
    labelled_credential(client, registry, user, password, extra, json!({})).await
}

/// [`basic_credential`] with these labels on the credential (e.g. a test shard's).
async fn labelled_credential(
    client: &Client,
    registry: &str,
    user: &str,
    password: &str,
    extra: Value,
    labels: Value,
) -> (String, String, String) {
    let src = support::namespace(client, "node-src", &[]).await;
    support::put_secret(client, &src, "login", json!({"username": user, "password": password})).await;
    let label = support::unique("node");
    let name = support::unique("node");
    let mut spec = json!({
        "registry": registry,
        "provider": {"basic": {"secretRef": {"name": "login", "namespace": src}}},
        "target": {"namespaceSelector": {"matchLabels": {"e2e-node": label}}}
    });
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    support::apply_credential(client, &name, labels, spec).await;
    (src, name, label)
}

/// A namespace the credential targets, once its `default` ServiceAccount lists the Secret.
async fn targeted_namespace(client: &Client, label: &str, credential: &str) -> String {
    let ns = support::namespace(client, "node", &[("e2e-node", label)]).await;
    support::wait_service_account_has(client, &ns, &format!("pullkeeper-{credential}")).await;
    ns
}

/// Deletes the credentials and namespaces of a test that passed: a node started later
/// against the same control plane would otherwise run its Deployments again.
async fn cleanup(client: &Client, credentials: &[&str], namespaces: &[&str]) {
    for c in credentials {
        support::delete_credential(client, c).await;
    }
    for ns in namespaces {
        support::delete_namespace(client, ns).await;
    }
}

fn assert_running(outcome: &PodOutcome, what: &str) {
    assert!(matches!(outcome, PodOutcome::Running { .. }), "{what}: {outcome:?}");
}

fn assert_unauthorized(outcome: &PodOutcome, what: &str) {
    match outcome {
        PodOutcome::PullFailed { message, .. } => {
            assert!(message.contains("401 Unauthorized"), "{what}: {message}")
        }
        other => panic!("{what}: expected a 401 pull failure, got {other:?}"),
    }
}

#[tokio::test]
async fn the_kubelet_pulls_through_the_default_service_account_only_where_targeted() {
    let reg = support::registry();
    let image = support::push_runnable_image(&reg.addr, &reg.user, &reg.password, "node/app:v1", None);
    let client = support::client().await;
    let (src, name, label) = basic_credential(&client, &reg.addr, &reg.user, &reg.password, json!({})).await;
    let targeted = targeted_namespace(&client, &label, &name).await;
    let untargeted = support::namespace(&client, "node-out", &[]).await;

    support::deploy(&client, &targeted, "app", &image, "IfNotPresent").await;
    support::deploy(&client, &untargeted, "app", &image, "IfNotPresent").await;

    assert_running(
        &support::wait_pod(&client, &targeted, "app").await,
        "targeted namespace",
    );
    // The image may be on the node by now; the kubelet still refuses it to a pod without
    // the Secret it was pulled with, and pulls anonymously.
    let refused = support::wait_pod(&client, &untargeted, "app").await;
    assert_unauthorized(&refused, "untargeted namespace");
    if let PodOutcome::PullFailed { pod, .. } = &refused {
        let events = support::pod_events(&client, &untargeted, pod).await;
        assert!(
            events.iter().any(|e| e.contains("401 Unauthorized")),
            "no 401 in the pod's Events: {events:?}"
        );
    }
    cleanup(&client, &[&name], &[&src, &targeted, &untargeted]).await;
}

#[tokio::test]
async fn the_kubelet_pulls_from_a_private_ca_registry_and_a_token_registry() {
    let (reg, ca) = support::tls_registry();
    let image = support::push_runnable_image(&reg.addr, &reg.user, &reg.password, "node/app:v1", Some(ca));
    let client = support::client().await;
    let (tls_src, tls_name, tls_label) =
        basic_credential(&client, &reg.addr, &reg.user, &reg.password, json!({})).await;
    let tls_ns = targeted_namespace(&client, &tls_label, &tls_name).await;
    support::deploy(&client, &tls_ns, "app", &image, "Always").await;

    // Bearer tokens: the kubelet's runtime logs in at the issuer with the written Secret.
    let token = support::token_registry();
    let token_image = support::push_runnable_image(token, "admin", "admin-pw", "demo:app", None);
    let (token_src, token_name, token_label) = basic_credential(&client, token, "puller", "puller-pw", json!({})).await;
    let token_ns = targeted_namespace(&client, &token_label, &token_name).await;
    support::deploy(&client, &token_ns, "app", &token_image, "Always").await;

    assert_running(&support::wait_pod(&client, &tls_ns, "app").await, "TLS registry");
    assert_running(&support::wait_pod(&client, &token_ns, "app").await, "token registry");
    cleanup(
        &client,
        &[&tls_name, &token_name],
        &[&tls_src, &tls_ns, &token_src, &token_ns],
    )
    .await;
}

#[tokio::test]
async fn a_rotation_updates_the_secret_in_place_and_new_pods_start_from_the_cached_image() {
    let token = support::token_registry();
    // A tag of its own, so that no other test's pull puts it on the node first.
    let image = support::push_runnable_image(token, "admin", "admin-pw", "demo:rotation", None);
    let client = support::client().await;
    let (src, name, label) = basic_credential(&client, token, "puller", "puller-pw", json!({})).await;
    let ns = targeted_namespace(&client, &label, &name).await;
    let secret = format!("pullkeeper-{name}");
    let (_, uid) = support::written(&client, &ns, &secret, token)
        .await
        .expect("secret written");

    support::deploy(&client, &ns, "before", &image, "IfNotPresent").await;
    assert_running(&support::wait_pod(&client, &ns, "before").await, "before the rotation");

    // Rotate to another login that may pull the same repository.
    support::put_secret(
        &client,
        &src,
        "login",
        json!({"username": "admin", "password": "admin-pw"}),
    )
    .await;
    let rotated = eventually(Duration::from_secs(30), || async {
        let (password, uid) = support::written(&client, &ns, &secret, token).await?;
        (password == "admin-pw").then_some(uid)
    })
    .await
    .expect("the rotated password never reached the Secret");
    assert_eq!(rotated, uid, "the Secret was replaced, not updated in place");

    // The kubelet keys its pull records on the Secret's namespace, name and UID: the
    // rotated Secret still opens the image it pulled with the old content.
    support::deploy(&client, &ns, "after", &image, "IfNotPresent").await;
    let after = support::wait_pod(&client, &ns, "after").await;
    assert_running(&after, "after the rotation");
    if let PodOutcome::Running { pod } = &after {
        let events = support::pod_events(&client, &ns, pod).await;
        assert!(
            events.iter().any(|e| e.contains("already present on machine")),
            "the pod did not start from the cached image: {events:?}"
        );
    }
    cleanup(&client, &[&name], &[&src, &ns]).await;
}

#[tokio::test]
async fn a_wrong_password_fails_new_pods_the_credential_says_which_and_the_fix_heals_them() {
    let reg = support::registry();
    let image = support::push_runnable_image(&reg.addr, &reg.user, &reg.password, "node/wrong:v1", None);
    let client = support::client().await;
    let (src, name, label) = basic_credential(
        &client,
        &reg.addr,
        &reg.user,
        &reg.password,
        json!({"verify": {"images": [image]}}),
    )
    .await;
    let ns = targeted_namespace(&client, &label, &name).await;
    support::deploy(&client, &ns, "good", &image, "Always").await;
    assert_running(
        &support::wait_pod(&client, &ns, "good").await,
        "with the right password",
    );

    support::put_secret(
        &client,
        &src,
        "login",
        json!({"username": reg.user, "password": "not-the-password"}),
    )
    .await;
    let secret = format!("pullkeeper-{name}");
    eventually(Duration::from_secs(30), || async {
        let (password, _) = support::written(&client, &ns, &secret, &reg.addr).await?;
        (password == "not-the-password").then_some(())
    })
    .await
    .expect("the wrong password never reached the Secret");

    support::deploy(&client, &ns, "bad", &image, "Always").await;
    assert_unauthorized(&support::wait_pod(&client, &ns, "bad").await, "with the wrong password");

    // The credential names the image it cannot pull and why.
    let status = support::wait_ready(&client, &name, "False", "Unauthorized").await;
    let entry = status.images.iter().find(|i| i.image == image).expect("verify entry");
    assert!(!entry.pullable && entry.reason == "Unauthorized", "{entry:?}");
    let events = Api::<k8s_openapi::api::events::v1::Event>::all(client.clone());
    let warned = eventually(Duration::from_secs(30), || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items
            .into_iter()
            .find(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str())
                    && e.reason.as_deref() == Some("ImageNotPullable")
            })
            .and_then(|e| e.note)
    })
    .await
    .expect("no ImageNotPullable Event on the credential");
    assert!(warned.contains(&image) && warned.contains("Unauthorized"), "{warned}");
    assert!(!warned.contains("not-the-password"), "a password reached an Event");

    // Fixing the source heals the failing pod in place: the kubelet reads the Secret
    // again at its next attempt.
    support::put_secret(
        &client,
        &src,
        "login",
        json!({"username": reg.user, "password": reg.password}),
    )
    .await;
    support::wait_running(&client, &ns, "bad", Duration::from_secs(120)).await;
    support::wait_ready(&client, &name, "True", "Synced").await;
    cleanup(&client, &[&name], &[&src, &ns]).await;
}

#[tokio::test]
async fn a_gcp_token_renewed_twice_keeps_every_new_pod_pulling() {
    use crate::fakes::{self, Behaviour, Mode};
    let f = fakes::fakes();
    let client = support::client().await;
    let registry = support::token_registry();
    let image = support::push_runnable_image(registry, "admin", "admin-pw", "demo:renewal", None);
    // 24-second tokens from the GCP flow (a service-account key, the JWT-bearer grant);
    // the test registry accepts them as Google's registries do, until they expire.
    let id = support::unique("renew");
    let (private, public) = fakes::rsa_key_pair();
    f.set(
        &id,
        Behaviour {
            mode: Mode::Ok,
            lifetime: 24,
            issued: 0,
            client_secret: String::new(),
            public_key: public,
        },
    );
    let token_url = format!("{}/gcp/{id}/token", f.base);
    let src = support::namespace(&client, "renew-src", &[]).await;
    let key = json!({
        "type": "service_account",
        "client_email": format!("puller@{id}.iam.gserviceaccount.com"),
        "private_key_id": "k1",
        "private_key": private,
        "token_uri": token_url,
    });
    support::put_secret(&client, &src, "cloud", json!({"key.json": key.to_string()})).await;
    let label = support::unique("renew");
    let name = support::unique("renew");
    support::apply_credential(
        &client,
        &name,
        json!({}),
        json!({
            "registry": registry,
            "provider": {"gcp": {
                "serviceAccountKeySecretRef": {"name": "cloud", "namespace": src, "key": "key.json"},
                "tokenUrl": token_url,
            }},
            "target": {"namespaceSelector": {"matchLabels": {"e2e-node": label}}}
        }),
    )
    .await;
    let ns = targeted_namespace(&client, &label, &name).await;
    let expired_before = fakes::expired_cloud_tokens();
    // A new pod every 4 s for 45 s, pulling each time: the token renews at about 18 s
    // and 36 s, in place, and every pull uses the Secret as it is then.
    let started = std::time::Instant::now();
    let mut apps = Vec::new();
    while started.elapsed() < Duration::from_secs(45) {
        let app = format!("renew-{}", apps.len());
        support::deploy(&client, &ns, &app, &image, "Always").await;
        apps.push(app);
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
    for app in &apps {
        support::wait_running(&client, &ns, app, Duration::from_secs(60)).await;
    }
    let issued = f.issued(&id);
    assert!(
        issued >= 3,
        "the token was renewed {} times, expected at least twice",
        issued.saturating_sub(1)
    );
    assert_eq!(
        fakes::expired_cloud_tokens(),
        expired_before,
        "a pull presented an expired token"
    );
    cleanup(&client, &[&name], &[&ns, &src]).await;
}

/// What the operator's workload checks report is what the kubelet does: the workload they
/// find pullable runs on the node, and the two they report unpullable (a ServiceAccount
/// without the Secret, a missing tag) fail to pull there, for the reason they give.
#[tokio::test]
async fn what_the_operators_image_checks_report_is_what_the_kubelet_does() {
    use crate::workload_checks::{metrics_text, row, series};
    let reg = support::registry();
    let image = support::push_runnable_image(&reg.addr, &reg.user, &reg.password, "node/checked:v1", None);
    let missing = format!("{}/node/checked:no-such-tag", reg.addr);
    let client = support::client().await;
    let shard = support::unique("node-wlc");
    let dir = tempfile::tempdir().expect("tempdir");
    let op = support::start(
        &support::env().kubeconfig,
        &shard,
        &[
            ("PULLKEEPER_WORKLOAD_CHECKS", "true"),
            ("PULLKEEPER_WORKLOAD_CHECK_INTERVAL", "5s"),
        ],
        dir.path(),
        "node-workload-checks",
    );
    let shard_label = json!({support::SHARD_LABEL: shard});
    let (src, name, label) =
        labelled_credential(&client, &reg.addr, &reg.user, &reg.password, json!({}), shard_label).await;
    let ns = targeted_namespace(&client, &label, &name).await;
    support::service_account(&client, &ns, "bare").await;

    support::deploy(&client, &ns, "pulls", &image, "IfNotPresent").await;
    let bare = json!({"serviceAccountName": "bare"});
    support::deploy_with(&client, &ns, "unauthorized", &image, "IfNotPresent", bare).await;
    support::deploy(&client, &ns, "missing", &missing, "IfNotPresent").await;

    let want = std::collections::BTreeSet::from([
        row("Deployment/missing", "app", "NotFound"),
        row("Deployment/unauthorized", "app", "Unauthorized"),
    ]);
    let reported = eventually(Duration::from_secs(60), || async {
        (series(&metrics_text(&op.addr).await, &ns) == want).then_some(())
    })
    .await;
    assert!(
        reported.is_some(),
        "{:?}\n{}",
        series(&metrics_text(&op.addr).await, &ns),
        op.log_text()
    );

    assert_running(&support::wait_pod(&client, &ns, "pulls").await, "reported pullable");
    assert_unauthorized(
        &support::wait_pod(&client, &ns, "unauthorized").await,
        "reported Unauthorized",
    );
    match support::wait_pod(&client, &ns, "missing").await {
        PodOutcome::PullFailed { message, .. } => {
            assert!(
                message.to_lowercase().contains("not found"),
                "reported NotFound: {message}"
            )
        }
        other => panic!("reported NotFound: expected a pull failure, got {other:?}"),
    }
    // Its own operator removes the credential's finalizer before it goes.
    support::delete_credential(&client, &name).await;
    eventually(Duration::from_secs(30), || async {
        support::credential_status(&client, &name).await.is_none().then_some(())
    })
    .await;
    drop(op);
    cleanup(&client, &[], &[&ns, &src]).await;
}
