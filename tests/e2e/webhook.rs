//! Race-free pods through the operator's mutating webhook (the route for apiservers that
//! do not serve MutatingAdmissionPolicy v1), on the real apiserver with the policy route
//! switched off. The operator runs as the Helm chart's ServiceAccount, with the chart's
//! RBAC and admission policies, and manages the serving certificate itself; the
//! MutatingWebhookConfiguration is the chart's, pointing at a URL on this host.

use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use pullkeeper::crd::ClusterRegistryCredential;
use pullkeeper::webhook::configuration::{self, Endpoint};
use serde_json::json;

use crate::admission::{self, admitted};
use crate::support::{self, SHARD_LABEL, eventually};

/// Creates Pods (retrying for a few seconds: the apiserver and the webhook's caches see
/// changes a moment after they are written) until one is admitted with its own entries
/// `own` first, followed by `secret` exactly once (`supplied`) or not at all.
async fn admitted_with(client: &Client, ns: &str, sa: Option<&str>, own: &[&str], secret: &str, supplied: bool) {
    let mut last = Vec::new();
    for _ in 0..40 {
        last = admitted(client, ns, sa, own).await;
        let ours = last.iter().filter(|n| *n == secret).count();
        let kept = last.iter().zip(own).all(|(a, b)| a == b);
        if kept && ours == usize::from(supplied) && (own.is_empty() || !supplied || last[own.len()] == secret) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!(
        "a Pod in {ns} (ServiceAccount {sa:?}) was admitted with {last:?}; expected {own:?} and {secret} supplied={supplied}"
    );
}

/// A ClusterRegistryCredential of the operator shard `shard` for namespaces labelled
/// `e2e-target=label` (ServiceAccounts `default` and `builder`), reading a login from a
/// new namespace; returns that namespace and the credential's name.
async fn credential(admin: &Client, shard: &str, label: &str) -> (String, String) {
    let src = support::namespace(admin, "wh-src", &[]).await;
    support::put_secret(admin, &src, "login", json!({"username": "u", "password": "p"})).await;
    let name = support::unique("wh");
    support::apply_credential(admin, &name, json!({SHARD_LABEL: shard}), admission::spec(&src, label)).await;
    (src, name)
}

#[tokio::test]
async fn the_webhook_supplies_new_pods_of_targeted_service_accounts() {
    let env = support::env();
    let admin = support::client().await;
    let release = support::unique("wh");
    let fullname = format!("{release}-pullkeeper");
    let home = support::namespace(&admin, "wh-home", &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let kubeconfig = support::chart_identity(
        &env.kubeconfig,
        &release,
        &home,
        dir.path(),
        &["podAdmission.enabled=false", "podAdmission.webhook.enabled=true"],
    )
    .await;

    // The chart's configuration, pointing at this host, for this test's namespaces only
    // (so other tests' Pods never reach an operator that is stopped below).
    let label = support::unique("wh");
    let addr = support::free_addr();
    let url = format!("https://{addr}");
    let mut body = configuration::configuration(
        &fullname,
        &Endpoint::Url(url.clone()),
        std::slice::from_ref(&home),
        None,
    );
    body["webhooks"][0]["namespaceSelector"]["matchLabels"] = json!({"e2e-webhook": label});
    let configurations = Api::<MutatingWebhookConfiguration>::all(admin.clone());
    let object: MutatingWebhookConfiguration = serde_json::from_value(body).expect("configuration");
    configurations
        .create(&PostParams::default(), &object)
        .await
        .expect("configuration created");

    let shard = support::unique("wh");
    let cert_secret = format!("{fullname}-webhook-cert");
    let op = support::start(
        &kubeconfig,
        &shard,
        &[
            ("PULLKEEPER_POD_ADMISSION_POLICY", "false"),
            ("PULLKEEPER_POD_ADMISSION_WEBHOOK", "true"),
            ("PULLKEEPER_WEBHOOK_ADDR", &addr),
            ("PULLKEEPER_WEBHOOK_URL", &url),
            ("PULLKEEPER_WEBHOOK_CONFIGURATION", &fullname),
            ("PULLKEEPER_WEBHOOK_CERT_SECRET", &cert_secret),
            ("POD_NAMESPACE", &home),
        ],
        dir.path(),
        "webhook",
    );

    let targeted = support::namespace(&admin, "wh", &[("e2e-target", &label), ("e2e-webhook", &label)]).await;
    let other = support::namespace(&admin, "wh-other", &[("e2e-webhook", &label)]).await;
    let (src, name) = credential(&admin, &shard, &label).await;
    let secret = format!("pullkeeper-{name}");

    // The route is visible in status, and the operator said which it took at start.
    let route = eventually(Duration::from_secs(60), || async {
        let s = support::credential_status(&admin, &name).await?;
        s.conditions
            .into_iter()
            .find(|c| c.type_ == "PodAdmission" && c.status == "True" && c.reason == "WebhookServed")
    })
    .await;
    assert!(
        route.is_some(),
        "no PodAdmission=True/WebhookServed: {:?}\n{}",
        support::credential_status(&admin, &name).await,
        op.log_text()
    );
    let log = op.log_text();
    assert!(log.contains("pod admission route") && log.contains("Webhook"), "{log}");
    // The server says so once its certificate is in place (after the route is in status).
    let serving = eventually(Duration::from_secs(30), || async {
        op.log_text()
            .contains("serving the pod admission webhook")
            .then_some(())
    })
    .await;
    assert!(serving.is_some(), "{}", op.log_text());

    // The operator issued its certificate into its own namespace and patched the CA into
    // the configuration, as the chart's identity.
    let ca = eventually(Duration::from_secs(30), || async {
        let c = configurations.get(&fullname).await.ok()?;
        c.webhooks?.first()?.client_config.ca_bundle.clone()
    })
    .await;
    assert!(ca.is_some(), "caBundle never patched:\n{}", op.log_text());
    let stored = Api::<Secret>::namespaced(admin.clone(), &home)
        .get(&cert_secret)
        .await
        .expect("certificate Secret");
    assert_eq!(stored.type_.as_deref(), Some("kubernetes.io/tls"));
    let stored_ca = stored.data.as_ref().and_then(|d| d.get("ca.crt")).map(|b| b.0.clone());
    assert_eq!(ca.map(|b| b.0), stored_ca, "the caBundle is the stored CA");

    // Ours is appended after the Pod's own entries, which stay as they are.
    admitted_with(&admin, &targeted, None, &["theirs", "mine"], &secret, true).await;
    // Without a list, the Pod gets it once (from the ServiceAccount or the webhook).
    admitted_with(&admin, &targeted, None, &[], &secret, true).await;
    // Another targeted ServiceAccount, created just now.
    support::service_account(&admin, &targeted, "builder").await;
    admitted_with(&admin, &targeted, Some("builder"), &["x"], &secret, true).await;
    // A ServiceAccount the credential does not target, and a namespace it does not target.
    support::service_account(&admin, &targeted, "runner").await;
    admitted_with(&admin, &targeted, Some("runner"), &["x"], &secret, false).await;
    admitted_with(&admin, &other, None, &["x"], &secret, false).await;
    // A targeted namespace annotated pullkeeper.io/exclude.
    admission::exclude(&admin, &targeted).await;
    admitted_with(&admin, &targeted, None, &["x"], &secret, false).await;
    // A namespace created later is supplied too.
    let later = support::namespace(&admin, "wh", &[("e2e-target", &label), ("e2e-webhook", &label)]).await;
    admitted_with(&admin, &later, None, &["x"], &secret, true).await;

    // Suspended: new Pods are left alone; resumed: supplied again.
    let credentials = Api::<ClusterRegistryCredential>::all(admin.clone());
    for suspend in [true, false] {
        credentials
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"suspend": suspend}})),
            )
            .await
            .expect("suspend");
        admitted_with(&admin, &later, None, &["x"], &secret, !suspend).await;
    }

    // Deleted: new Pods are left alone.
    credentials
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete");
    eventually(Duration::from_secs(30), || async {
        support::credential_status(&admin, &name).await.is_none().then_some(())
    })
    .await
    .expect("credential gone");
    admitted_with(&admin, &later, None, &["x"], &secret, false).await;

    // With the operator down, Pods are still created (failurePolicy Ignore).
    let log = op.log_text();
    drop(op);
    let listed = admitted(&admin, &later, None, &["x"]).await;
    assert_eq!(listed, vec!["x".to_owned()]);
    assert!(!log.contains("PRIVATE KEY"), "the certificate's key was logged");

    let _ = configurations.delete(&fullname, &DeleteParams::default()).await;
    for ns in [&home, &src, &targeted, &other, &later] {
        support::delete_namespace(&admin, ns).await;
    }
}

/// POSTs an AdmissionReview for a new Pod (ServiceAccount `default`, its own list `["x"]`)
/// in `ns` to the webhook at `addr`, trusting `ca`; returns the names it adds.
async fn review_at(addr: &str, ca: &[u8], ns: &str) -> Result<Vec<String>, String> {
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(5));
    for cert in reqwest::Certificate::from_pem_bundle(ca).map_err(|e| e.to_string())? {
        builder = builder.add_root_certificate(cert);
    }
    let client = builder.build().map_err(|e| e.to_string())?;
    let review = json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "e2e", "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": ns, "operation": "CREATE", "userInfo": {"username": "e2e"},
            "object": {
                "apiVersion": "v1", "kind": "Pod", "metadata": {"generateName": "p-", "namespace": ns},
                "spec": {"serviceAccountName": "default", "imagePullSecrets": [{"name": "x"}],
                         "containers": [{"name": "c", "image": "registry.example.com/app:1"}]},
            },
        },
    });
    let answer: serde_json::Value = client
        .post(format!("https://{addr}{}", configuration::PATH))
        .json(&review)
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let response = &answer["response"];
    if response["allowed"] != true || response["uid"] != "e2e" {
        return Err(format!("unexpected answer {answer}"));
    }
    // kube-rs writes the patch's bytes as a JSON array of numbers, which the apiserver
    // (Go's encoding/json) reads as well as the usual base64 string.
    let bytes: Vec<u8> = match &response["patch"] {
        serde_json::Value::Null => return Ok(vec![]),
        serde_json::Value::String(b64) => {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|e| e.to_string())?
        }
        other => serde_json::from_value(other.clone()).map_err(|e| e.to_string())?,
    };
    let ops: Vec<serde_json::Value> = serde_json::from_slice(&bytes).map_err(|e| e.to_string())?;
    Ok(ops
        .iter()
        .filter(|op| op["path"] == "/spec/imagePullSecrets/-")
        .filter_map(|op| op["value"]["name"].as_str().map(str::to_owned))
        .collect())
}

#[tokio::test]
async fn every_replica_answers_leader_or_not_with_the_one_certificate() {
    let env = support::env();
    let admin = support::client().await;
    let shard = support::unique("whha");
    let home = support::namespace(&admin, "whha-home", &[]).await;
    let label = support::unique("whha");
    let targeted = support::namespace(&admin, "whha", &[("e2e-target", &label)]).await;
    let (src, name) = credential(&admin, &shard, &label).await;
    let secret = format!("pullkeeper-{name}");

    // Two replicas with leader election, as the chart runs them, each on its own address
    // (development mode: the first to start creates the configuration for its URL).
    let configuration_name = support::unique("whha");
    let cert_secret = support::unique("whha-cert");
    let dir = tempfile::tempdir().expect("tempdir");
    let addrs = [support::free_addr(), support::free_addr()];
    let replicas: Vec<support::Operator> = addrs
        .iter()
        .zip(["replica-a", "replica-b"])
        .map(|(addr, replica)| {
            let url = format!("https://{addr}");
            support::start(
                &env.kubeconfig,
                &shard,
                &[
                    ("PULLKEEPER_LEADER_ELECT", "true"),
                    ("POD_NAMESPACE", &home),
                    ("PULLKEEPER_LEADER_ELECTION_ID", &shard),
                    ("PULLKEEPER_POD_ADMISSION_POLICY", "false"),
                    ("PULLKEEPER_POD_ADMISSION_WEBHOOK", "true"),
                    ("PULLKEEPER_WEBHOOK_ADDR", addr),
                    ("PULLKEEPER_WEBHOOK_URL", &url),
                    ("PULLKEEPER_WEBHOOK_CONFIGURATION", &configuration_name),
                    ("PULLKEEPER_WEBHOOK_CERT_SECRET", &cert_secret),
                ],
                dir.path(),
                replica,
            )
        })
        .collect();
    let logs = || {
        replicas
            .iter()
            .map(support::Operator::log_text)
            .collect::<Vec<_>>()
            .join("\n")
    };

    // One Secret, one CA in the configuration, created failing open.
    let configurations = Api::<MutatingWebhookConfiguration>::all(admin.clone());
    let created = eventually(Duration::from_secs(60), || async {
        let c = configurations.get_opt(&configuration_name).await.ok()??;
        let hook = c.webhooks?.into_iter().next()?;
        hook.client_config.ca_bundle.as_ref()?;
        Some(hook)
    })
    .await
    .unwrap_or_else(|| panic!("no configuration with a caBundle:\n{}", logs()));
    assert_eq!(created.failure_policy.as_deref(), Some("Ignore"));
    assert_eq!(created.side_effects, "None");
    let ca = created.client_config.ca_bundle.map(|b| b.0).unwrap_or_default();
    let stored = Api::<Secret>::namespaced(admin.clone(), &home)
        .get(&cert_secret)
        .await
        .expect("certificate Secret");
    let stored_ca = stored.data.and_then(|d| d.get("ca.crt").map(|b| b.0.clone()));
    assert_eq!(
        Some(ca.clone()),
        stored_ca,
        "both replicas share the stored certificate"
    );

    // Both answer, trusted through the one caBundle: the leader and the standby.
    for addr in &addrs {
        let mut last = Err(String::new());
        for _ in 0..100 {
            last = review_at(addr, &ca, &targeted).await;
            if last.as_ref().is_ok_and(|names| *names == [secret.clone()]) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert_eq!(last, Ok(vec![secret.clone()]), "replica at {addr}:\n{}", logs());
    }

    support::delete_credential(&admin, &name).await;
    let _ = eventually(Duration::from_secs(30), || async {
        support::credential_status(&admin, &name).await.is_none().then_some(())
    })
    .await;
    drop(replicas);
    let _ = configurations
        .delete(&configuration_name, &DeleteParams::default())
        .await;
    for ns in [&home, &src, &targeted] {
        support::delete_namespace(&admin, ns).await;
    }
}
