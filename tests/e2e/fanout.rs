//! The fan-out engine against the real control plane: targeting, Secret format,
//! ServiceAccounts, drift repair, conflicts, source changes, removal, and bad input.

use std::collections::BTreeMap;
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::core::v1::{LocalObjectReference, Namespace, Secret, ServiceAccount};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use pullkeeper::crd::{ClusterRegistryCredential, RegistryCredential, RegistryCredentialStatus};
use serde_json::{Value, json};

use crate::support::{self, eventually};

const WAIT: Duration = Duration::from_secs(20);

struct Fixture {
    client: Client,
    /// Label value selecting this test's namespaces.
    label: String,
    source_ns: String,
    password: String,
}

impl Fixture {
    async fn new(prefix: &str) -> Self {
        support::env();
        let client = support::client().await;
        let label = support::unique(prefix);
        let source_ns = support::namespace(&client, "src", &[]).await;
        let password = format!("pw-{}", support::unique("secret"));
        let f = Self {
            client,
            label,
            source_ns,
            password,
        };
        f.put_source("robot", &f.password.clone()).await;
        f
    }

    async fn put_source(&self, user: &str, password: &str) {
        support::put_secret(
            &self.client,
            &self.source_ns,
            "login",
            json!({"username": user, "password": password}),
        )
        .await;
    }

    async fn labelled_ns(&self, prefix: &str) -> String {
        support::namespace(&self.client, prefix, &[("e2e-target", &self.label)]).await
    }

    /// The spec of a basic credential selecting this fixture's namespaces, merged with `extra`.
    fn spec(&self, extra: Value) -> Value {
        let mut spec = json!({
            "registry": "registry.example.com:5000",
            "provider": {"basic": {"secretRef": {"name": "login", "namespace": self.source_ns}}},
            "target": {"namespaceSelector": {"matchLabels": {"e2e-target": self.label}}}
        });
        merge(&mut spec, extra);
        spec
    }

    async fn apply_crc(&self, name: &str, extra: Value) {
        support::apply_credential(&self.client, name, json!({}), self.spec(extra)).await;
    }

    async fn secret(&self, ns: &str, name: &str) -> Option<Secret> {
        Api::<Secret>::namespaced(self.client.clone(), ns)
            .get_opt(name)
            .await
            .ok()
            .flatten()
    }

    async fn wait_secret(&self, ns: &str, name: &str, password: &str) -> Secret {
        eventually(WAIT, || async {
            let s = self.secret(ns, name).await?;
            (decoded_password(&s).as_deref() == Some(password)).then_some(s)
        })
        .await
        .unwrap_or_else(|| panic!("{ns}/{name} never held the expected credential"))
    }

    async fn wait_gone(&self, ns: &str, name: &str) {
        eventually(WAIT, || async { self.secret(ns, name).await.is_none().then_some(()) })
            .await
            .unwrap_or_else(|| panic!("{ns}/{name} was never removed"));
    }

    async fn pull_secrets(&self, ns: &str, sa: &str) -> Vec<String> {
        Api::<ServiceAccount>::namespaced(self.client.clone(), ns)
            .get_opt(sa)
            .await
            .ok()
            .flatten()
            .and_then(|s| s.image_pull_secrets)
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.name)
            .collect()
    }

    async fn wait_pull_secrets(&self, ns: &str, sa: &str, expected: &[&str]) {
        let ok = eventually(WAIT, || async {
            let got = self.pull_secrets(ns, sa).await;
            (got == expected).then_some(())
        })
        .await;
        assert!(
            ok.is_some(),
            "{ns}/{sa} imagePullSecrets: expected {expected:?}, got {:?}",
            self.pull_secrets(ns, sa).await
        );
    }

    async fn wait_ready(&self, name: &str, status: &str, reason: &str) -> RegistryCredentialStatus {
        support::wait_ready(&self.client, name, status, reason).await
    }

    async fn delete_crc(&self, name: &str) {
        support::delete_credential(&self.client, name).await;
    }

    /// Neither the password nor the auth string is in any Event or in any credential's status.
    async fn assert_no_secret_in_events_or_status(&self) {
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("robot:{}", self.password));
        let events = Api::<k8s_openapi::api::events::v1::Event>::all(self.client.clone())
            .list(&Default::default())
            .await
            .expect("events");
        for e in &events.items {
            let text = format!("{:?} {:?}", e.note, e.reason);
            assert!(
                !text.contains(&self.password) && !text.contains(&b64),
                "a secret reached an Event: {text}"
            );
        }
        let credentials = Api::<ClusterRegistryCredential>::all(self.client.clone())
            .list(&Default::default())
            .await
            .expect("credentials");
        let text = serde_json::to_string(&credentials.items).expect("json");
        assert!(
            !text.contains(&self.password) && !text.contains(&b64),
            "a secret reached a status"
        );
    }

    fn assert_no_secret_in_logs(&self) {
        let logs = support::logs();
        assert!(!logs.contains(&self.password), "a password reached the operator's logs");
        let b64 = base64::engine::general_purpose::STANDARD.encode(format!("robot:{}", self.password));
        assert!(!logs.contains(&b64), "an auth string reached the operator's logs");
        // The Secret as sent to the apiserver (the base64 of the whole docker config) must
        // not appear either, e.g. in a logged request body.
        let config = crate::support::expected_config("registry.example.com:5000", "robot", &self.password);
        let encoded = base64::engine::general_purpose::STANDARD.encode(&config);
        assert!(
            !logs.contains(&encoded[..40.min(encoded.len())]),
            "a Secret body reached the operator's logs"
        );
    }
}

fn merge(base: &mut Value, extra: Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                if v.is_null() {
                    b.remove(&k);
                } else {
                    merge(b.entry(k).or_insert(Value::Null), v);
                }
            }
        }
        (b, e) => *b = e,
    }
}

fn config_json(s: &Secret) -> Option<Value> {
    let raw = s.data.as_ref()?.get(".dockerconfigjson")?;
    serde_json::from_slice(&raw.0).ok()
}

fn decoded_password(s: &Secret) -> Option<String> {
    let v = config_json(s)?;
    let (_, entry) = v["auths"].as_object()?.iter().next()?;
    entry["password"].as_str().map(str::to_owned)
}

#[tokio::test]
async fn fans_out_to_selected_namespaces_in_the_right_format() {
    let f = Fixture::new("fan").await;
    let a = f.labelled_ns("fan-a").await;
    let b = f.labelled_ns("fan-b").await;
    let other = support::namespace(&f.client, "fan-other", &[]).await;
    let name = support::unique("fan");
    f.apply_crc(&name, json!({})).await;
    let secret_name = format!("pullkeeper-{name}");

    for ns in [&a, &b] {
        let s = f.wait_secret(ns, &secret_name, &f.password).await;
        assert_eq!(s.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
        let labels = s.labels();
        assert_eq!(
            labels.get("app.kubernetes.io/managed-by").map(String::as_str),
            Some("pullkeeper")
        );
        assert_eq!(labels.get("pullkeeper.io/credential"), Some(&name));
        let cfg = config_json(&s).expect("config");
        let auths = cfg["auths"].as_object().expect("auths");
        assert_eq!(
            auths.keys().collect::<Vec<_>>(),
            vec!["registry.example.com:5000"],
            "bare host:port key"
        );
        let entry = &auths["registry.example.com:5000"];
        assert_eq!(entry["username"], "robot");
        let auth = base64::engine::general_purpose::STANDARD
            .decode(entry["auth"].as_str().expect("auth"))
            .expect("base64");
        assert_eq!(String::from_utf8(auth).expect("utf8"), format!("robot:{}", f.password));
        // The default ServiceAccount is created by the controller-manager a moment after
        // the namespace; it gets the entry too.
        f.wait_pull_secrets(ns, "default", &[&secret_name]).await;
    }
    assert!(
        f.secret(&other, &secret_name).await.is_none(),
        "unselected namespace got a secret"
    );

    let status = f.wait_ready(&name, "True", "Synced").await;
    let counts = status.namespaces.expect("counts");
    assert_eq!((counts.targeted, counts.synced, counts.failed), (2, 2, 0));

    // One more namespace, created later, gets it within moments.
    let late = f.labelled_ns("fan-late").await;
    f.wait_secret(&late, &secret_name, &f.password).await;
    f.wait_pull_secrets(&late, "default", &[&secret_name]).await;

    f.delete_crc(&name).await;
    for ns in [&a, &b, &late] {
        f.wait_gone(ns, &secret_name).await;
        f.wait_pull_secrets(ns, "default", &[]).await;
    }
    f.assert_no_secret_in_logs();
    f.assert_no_secret_in_events_or_status().await;
}

#[tokio::test]
async fn relabelling_moves_the_secret_in_and_out() {
    let f = Fixture::new("relabel").await;
    let ns = support::namespace(&f.client, "relabel", &[]).await;
    let name = support::unique("relabel");
    f.apply_crc(&name, json!({})).await;
    let secret_name = format!("pullkeeper-{name}");
    let ns_api = Api::<Namespace>::all(f.client.clone());
    let label = |v: Option<&str>| json!({"metadata": {"labels": {"e2e-target": v}}});

    ns_api
        .patch(&ns, &PatchParams::default(), &Patch::Merge(label(Some(&f.label))))
        .await
        .expect("label in");
    f.wait_secret(&ns, &secret_name, &f.password).await;
    f.wait_pull_secrets(&ns, "default", &[&secret_name]).await;

    ns_api
        .patch(&ns, &PatchParams::default(), &Patch::Merge(label(None)))
        .await
        .expect("label out");
    f.wait_gone(&ns, &secret_name).await;
    f.wait_pull_secrets(&ns, "default", &[]).await;

    // The opt-out annotation works like leaving the selector.
    ns_api
        .patch(&ns, &PatchParams::default(), &Patch::Merge(label(Some(&f.label))))
        .await
        .expect("label in again");
    f.wait_secret(&ns, &secret_name, &f.password).await;
    ns_api
        .patch(
            &ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"pullkeeper.io/exclude": "true"}}})),
        )
        .await
        .expect("annotate");
    f.wait_gone(&ns, &secret_name).await;
    f.delete_crc(&name).await;
}

#[tokio::test]
async fn a_secret_it_did_not_create_is_never_touched() {
    let f = Fixture::new("conflict").await;
    let ns = f.labelled_ns("conflict").await;
    let name = support::unique("conflict");
    let secret_name = format!("pullkeeper-{name}");
    let theirs = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(secret_name.clone()),
            namespace: Some(ns.clone()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([("mine".to_owned(), "keep-me".to_owned())])),
        ..Default::default()
    };
    let before = Api::<Secret>::namespaced(f.client.clone(), &ns)
        .create(&PostParams::default(), &theirs)
        .await
        .expect("their secret");
    f.apply_crc(&name, json!({})).await;
    let status = f.wait_ready(&name, "False", "Conflict").await;
    assert_eq!(status.failures.len(), 1);
    assert_eq!(status.failures[0].namespace, ns);
    assert!(
        status.failures[0].message.contains("not managed by"),
        "{}",
        status.failures[0].message
    );
    let after = f.secret(&ns, &secret_name).await.expect("still there");
    assert_eq!(
        after.metadata.resource_version, before.metadata.resource_version,
        "their secret was modified"
    );
    // An Event says so.
    let events = Api::<k8s_openapi::api::events::v1::Event>::all(f.client.clone());
    let seen = eventually(WAIT, || async {
        let list = events.list(&Default::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("Conflict")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str())
            })
            .then_some(())
    })
    .await;
    assert!(seen.is_some(), "no Conflict Event");
    // Deleting the credential leaves their secret alone too.
    f.delete_crc(&name).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = f.secret(&ns, &secret_name).await.expect("still there after delete");
    assert_eq!(after.metadata.resource_version, before.metadata.resource_version);
}

#[tokio::test]
async fn drift_is_repaired_and_other_pull_secrets_are_kept() {
    let f = Fixture::new("drift").await;
    let ns = f.labelled_ns("drift").await;
    let name = support::unique("drift");
    let secret_name = format!("pullkeeper-{name}");
    // The default SA already lists someone else's pull secret.
    let sa_api = Api::<ServiceAccount>::namespaced(f.client.clone(), &ns);
    eventually(WAIT, || async { sa_api.get_opt("default").await.ok().flatten() })
        .await
        .expect("default SA");
    sa_api
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(json!({"imagePullSecrets": [{"name": "theirs"}]})),
        )
        .await
        .expect("their entry");
    // And a second SA is listed in the target.
    let builder = ServiceAccount {
        metadata: kube::api::ObjectMeta {
            name: Some("builder".into()),
            ..Default::default()
        },
        image_pull_secrets: Some(vec![LocalObjectReference { name: "x".into() }]),
        ..Default::default()
    };
    f.apply_crc(&name, json!({"target": {"serviceAccounts": ["default", "builder"]}}))
        .await;
    f.wait_secret(&ns, &secret_name, &f.password).await;
    f.wait_pull_secrets(&ns, "default", &["theirs", &secret_name]).await;
    // A ServiceAccount created after the credential gets the entry too.
    sa_api
        .create(&PostParams::default(), &builder)
        .await
        .expect("builder SA");
    f.wait_pull_secrets(&ns, "builder", &["x", &secret_name]).await;

    // Someone edits the data by hand: put back.
    let secrets = Api::<Secret>::namespaced(f.client.clone(), &ns);
    secrets
        .patch(
            &secret_name,
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {".dockerconfigjson": base64::engine::general_purpose::STANDARD.encode(r#"{"auths":{}}"#)}})),
        )
        .await
        .expect("hand edit");
    f.wait_secret(&ns, &secret_name, &f.password).await;

    // Someone deletes it: put back.
    secrets
        .delete(&secret_name, &DeleteParams::default())
        .await
        .expect("hand delete");
    f.wait_secret(&ns, &secret_name, &f.password).await;

    // Someone removes the entry from the SA: put back, after theirs.
    sa_api
        .patch(
            "default",
            &PatchParams::default(),
            &Patch::Merge(json!({"imagePullSecrets": [{"name": "theirs"}]})),
        )
        .await
        .expect("remove entry");
    f.wait_pull_secrets(&ns, "default", &["theirs", &secret_name]).await;

    // Removal takes only our entries.
    f.delete_crc(&name).await;
    f.wait_gone(&ns, &secret_name).await;
    f.wait_pull_secrets(&ns, "default", &["theirs"]).await;
    f.wait_pull_secrets(&ns, "builder", &["x"]).await;
    f.assert_no_secret_in_logs();
    f.assert_no_secret_in_events_or_status().await;
}

#[tokio::test]
async fn a_new_password_reaches_every_namespace() {
    let f = Fixture::new("rotate").await;
    let a = f.labelled_ns("rotate-a").await;
    let b = f.labelled_ns("rotate-b").await;
    let name = support::unique("rotate");
    let secret_name = format!("pullkeeper-{name}");
    f.apply_crc(&name, json!({})).await;
    f.wait_secret(&a, &secret_name, &f.password).await;
    let new_password = format!("{}-rotated", f.password);
    f.put_source("robot", &new_password).await;
    for ns in [&a, &b] {
        f.wait_secret(ns, &secret_name, &new_password).await;
    }

    // Suspended: a further change is not propagated, and nothing is removed.
    f.apply_crc(&name, json!({"suspend": true})).await;
    f.wait_ready(&name, "Unknown", "Suspended").await;
    f.put_source("robot", "while-suspended").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = f.secret(&a, &secret_name).await.expect("kept while suspended");
    assert_eq!(decoded_password(&s).as_deref(), Some(new_password.as_str()));
    f.delete_crc(&name).await;
    f.assert_no_secret_in_logs();
    f.assert_no_secret_in_events_or_status().await;
}

#[tokio::test]
async fn bad_input_is_reported_and_changes_nothing() {
    let f = Fixture::new("badinput").await;
    let ns = f.labelled_ns("badinput").await;
    let cases = [
        (
            json!({"provider": {"basic": {"secretRef": {"name": "nope", "namespace": f.source_ns}}}}),
            "SecretNotFound",
            "does not exist",
        ),
        (
            json!({"provider": {"basic": {"secretRef": {"name": "login", "namespace": f.source_ns}, "passwordKey": "token"}}}),
            "SecretKeyMissing",
            "\"token\"",
        ),
        (
            json!({"provider": {"basic": null, "dockerConfig": {"secretRef": {"name": "login", "namespace": f.source_ns}}}}),
            "WrongSecretType",
            "kubernetes.io/dockerconfigjson",
        ),
    ];
    for (extra, reason, needle) in cases {
        let name = support::unique("bad");
        f.apply_crc(&name, extra).await;
        let status = f.wait_ready(&name, "False", reason).await;
        let ready = status.conditions.iter().find(|c| c.type_ == "Ready").expect("ready");
        assert!(ready.message.contains(needle), "{reason}: {}", ready.message);
        assert!(
            f.secret(&ns, &format!("pullkeeper-{name}")).await.is_none(),
            "{reason}: a secret was written"
        );
        f.delete_crc(&name).await;
    }

    // A missing Secret created later is picked up without touching the credential.
    let name = support::unique("late-src");
    f.apply_crc(
        &name,
        json!({"provider": {"basic": {"secretRef": {"name": "later", "namespace": f.source_ns}}}}),
    )
    .await;
    f.wait_ready(&name, "False", "SecretNotFound").await;
    Api::<Secret>::namespaced(f.client.clone(), &f.source_ns)
        .create(
            &PostParams::default(),
            &Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some("later".into()),
                    ..Default::default()
                },
                string_data: Some(BTreeMap::from([
                    ("username".to_owned(), "robot".to_owned()),
                    ("password".to_owned(), f.password.clone()),
                ])),
                ..Default::default()
            },
        )
        .await
        .expect("late source");
    f.wait_ready(&name, "True", "Synced").await;
    f.wait_secret(&ns, &format!("pullkeeper-{name}"), &f.password).await;
    f.delete_crc(&name).await;
    f.assert_no_secret_in_logs();
    f.assert_no_secret_in_events_or_status().await;
}

#[tokio::test]
async fn a_namespaced_credential_stays_in_its_namespace() {
    let f = Fixture::new("tenant").await;
    let ns = support::namespace(&f.client, "tenant", &[]).await;
    let neighbour = support::namespace(&f.client, "neighbour", &[]).await;
    // The team's own copy of the login, in its namespace.
    Api::<Secret>::namespaced(f.client.clone(), &ns)
        .create(
            &PostParams::default(),
            &Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some("login".into()),
                    ..Default::default()
                },
                type_: Some("kubernetes.io/dockerconfigjson".into()),
                string_data: Some(BTreeMap::from([(
                    ".dockerconfigjson".to_owned(),
                    json!({"auths": {"https://ghcr.io": {"username": "robot", "password": f.password}}}).to_string(),
                )])),
                ..Default::default()
            },
        )
        .await
        .expect("team secret");
    let name = support::unique("team");
    let api = Api::<RegistryCredential>::namespaced(f.client.clone(), &ns);
    api.patch(
        &name,
        &PatchParams::apply("e2e-user").force(),
        &Patch::Apply(json!({
            "apiVersion": "pullkeeper.io/v1alpha1",
            "kind": "RegistryCredential",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"registry": "ghcr.io", "provider": {"dockerConfig": {"secretRef": {"name": "login"}}}}
        })),
    )
    .await
    .expect("applied");
    let secret_name = format!("pullkeeper-{name}");
    let s = f.wait_secret(&ns, &secret_name, &f.password).await;
    let cfg = config_json(&s).expect("config");
    assert!(
        cfg["auths"].get("ghcr.io").is_some(),
        "bare host key, not https://: {cfg}"
    );
    f.wait_pull_secrets(&ns, "default", &[&secret_name]).await;
    assert!(f.secret(&neighbour, &secret_name).await.is_none());
    api.delete(&name, &DeleteParams::default()).await.expect("delete");
    f.wait_gone(&ns, &secret_name).await;
    f.wait_pull_secrets(&ns, "default", &[]).await;
    f.assert_no_secret_in_logs();
    f.assert_no_secret_in_events_or_status().await;
}

#[tokio::test]
async fn a_settled_credential_writes_nothing_more() {
    let f = Fixture::new("settled").await;
    let ns = f.labelled_ns("settled").await;
    let name = support::unique("settled");
    let secret_name = format!("pullkeeper-{name}");
    f.apply_crc(&name, json!({})).await;
    f.wait_secret(&ns, &secret_name, &f.password).await;
    f.wait_pull_secrets(&ns, "default", &[&secret_name]).await;
    f.wait_ready(&name, "True", "Synced").await;
    // Give the last status write and its echo a moment, then watch for churn.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let api = Api::<ClusterRegistryCredential>::all(f.client.clone());
    let rv = |o: Option<String>| o.unwrap_or_default();
    let crc_before = rv(api.get(&name).await.expect("crc").metadata.resource_version);
    let secret_before = rv(f
        .secret(&ns, &secret_name)
        .await
        .expect("secret")
        .metadata
        .resource_version);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let crc_after = rv(api.get(&name).await.expect("crc").metadata.resource_version);
    let secret_after = rv(f
        .secret(&ns, &secret_name)
        .await
        .expect("secret")
        .metadata
        .resource_version);
    assert_eq!(crc_before, crc_after, "the credential's status keeps being rewritten");
    assert_eq!(secret_before, secret_after, "the secret keeps being rewritten");
    f.delete_crc(&name).await;
}

/// How long two rival credentials are watched for a change (the issue's bar: 5 minutes;
/// `PULLKEEPER_E2E_RIVALS_SECS` shortens it for a quick local run).
fn rivals_window() -> Duration {
    let secs = std::env::var("PULLKEEPER_E2E_RIVALS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

#[tokio::test]
async fn credentials_wanting_one_secret_name_settle_on_the_oldest_and_never_flap() {
    let f = Fixture::new("rivals").await;
    let ns = f.labelled_ns("rivals").await;
    let shared = support::unique("shared");
    // Created at once, all wanting the same Secret name in `ns`: two cluster credentials
    // (on equal creation seconds the names break the tie) and the namespace's own one.
    let (first, second, tenant) = (
        support::unique("a-rival"),
        support::unique("b-rival"),
        support::unique("tenant"),
    );
    let target = json!({"target": {"secretName": shared}});
    support::put_secret(
        &f.client,
        &ns,
        "login",
        json!({"username": "robot", "password": f.password}),
    )
    .await;
    f.apply_crc(&first, target.clone()).await;
    f.apply_crc(&second, target.clone()).await;
    support::apply_namespaced(
        &f.client,
        &ns,
        &tenant,
        json!({}),
        json!({
            "registry": "registry.example.com:5000",
            "provider": {"basic": {"secretRef": {"name": "login"}}},
            "target": {"secretName": shared},
        }),
    )
    .await
    .expect("tenant credential");
    f.wait_ready(&first, "True", "Synced").await;
    let lost = f.wait_ready(&second, "False", "Conflict").await;
    assert!(
        lost.failures[0]
            .message
            .contains(&format!("held by ClusterRegistryCredential {first}")),
        "{:?}",
        lost.failures
    );
    let tenant_status = support::wait_namespaced_ready(&f.client, &ns, &tenant, "False", "Conflict", String::new).await;
    assert!(
        tenant_status.failures[0].message.contains(&first),
        "{:?}",
        tenant_status.failures
    );
    let held = f.wait_secret(&ns, &shared, &f.password).await;
    assert_eq!(
        held.labels().get("pullkeeper.io/credential").map(String::as_str),
        Some(first.as_str())
    );
    f.wait_pull_secrets(&ns, "default", &[&shared]).await;

    // Nothing changes while they all keep reconciling (resyncs, status writes, and the
    // loser's own events): same Secret, same ServiceAccount entry, same conditions.
    let sa_before = Api::<ServiceAccount>::namespaced(f.client.clone(), &ns)
        .get("default")
        .await
        .expect("sa");
    let deadline = tokio::time::Instant::now() + rivals_window();
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = f.secret(&ns, &shared).await.expect("the Secret stays");
        assert_eq!(
            now.metadata.resource_version, held.metadata.resource_version,
            "the Secret changed"
        );
        let sa = Api::<ServiceAccount>::namespaced(f.client.clone(), &ns)
            .get("default")
            .await
            .expect("sa");
        assert_eq!(
            sa.metadata.resource_version, sa_before.metadata.resource_version,
            "the ServiceAccount changed"
        );
        let ready = |s: Option<RegistryCredentialStatus>| {
            s.and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"))
                .map(|c| (c.status, c.reason))
        };
        assert_eq!(
            ready(support::credential_status(&f.client, &first).await),
            Some(("True".into(), "Synced".into()))
        );
        assert_eq!(
            ready(support::credential_status(&f.client, &second).await),
            Some(("False".into(), "Conflict".into()))
        );
        assert_eq!(
            ready(support::namespaced_status(&f.client, &ns, &tenant).await),
            Some(("False".into(), "Conflict".into()))
        );
    }

    // The holder leaves: the next in line takes the name over.
    f.delete_crc(&first).await;
    f.wait_ready(&second, "True", "Synced").await;
    let taken = f.wait_secret(&ns, &shared, &f.password).await;
    assert_eq!(
        taken.labels().get("pullkeeper.io/credential").map(String::as_str),
        Some(second.as_str())
    );
    f.delete_crc(&second).await;
    support::wait_namespaced_ready(&f.client, &ns, &tenant, "True", "Synced", String::new).await;
    Api::<RegistryCredential>::namespaced(f.client.clone(), &ns)
        .delete(&tenant, &DeleteParams::default())
        .await
        .expect("delete tenant credential");
}
