//! A mock apiserver for plain `cargo test` (tower-test, as kube-rs's controller-rs
//! `fixtures.rs`): each scenario lists the requests the reconciler must send, in order,
//! with the answer to give, and fails on anything else. Field managers, the 409 path, UID
//! preconditions, JSON patches and server-side-apply bodies are checked without a cluster.

use std::sync::Arc;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{Context, admission, apply, backoff, cache, credential, sources, verify, watches};

/// One expected request: method, path and query must match; `check` sees the body.
pub struct Expect {
    /// `GET`, `POST`, `PATCH`, `DELETE`.
    pub method: &'static str,
    /// Path and query, e.g. `/api/v1/namespaces/a/secrets?fieldManager=...`.
    pub uri: String,
    /// Content type the body must have, if any.
    pub content_type: Option<&'static str>,
    /// Assertions on the parsed body (`Value::Null` when empty).
    pub check: Box<dyn Fn(&Value) + Send>,
    /// Status code and body of the answer.
    pub respond: (u16, Value),
}

impl Expect {
    /// A request answered with `status` and `body`, its body unchecked.
    pub fn new(method: &'static str, uri: impl Into<String>, status: u16, body: Value) -> Self {
        Self {
            method,
            uri: uri.into(),
            content_type: None,
            check: Box::new(|_| {}),
            respond: (status, body),
        }
    }

    /// Also requires this content type.
    pub fn content_type(mut self, content_type: &'static str) -> Self {
        self.content_type = Some(content_type);
        self
    }

    /// Also checks the body.
    pub fn check(mut self, check: impl Fn(&Value) + Send + 'static) -> Self {
        self.check = Box::new(check);
        self
    }
}

/// A client whose apiserver answers exactly `script`, and the task that plays it (await it
/// to see its assertions fail the test). Requests for Events are answered and skipped.
pub fn apiserver(script: Vec<Expect>) -> (Client, tokio::task::JoinHandle<()>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let task = tokio::spawn(async move {
        for expected in script {
            let (request, send) = loop {
                let (request, send) = handle
                    .next_request()
                    .await
                    .expect("the reconciler sent no more requests");
                if request.uri().path().contains("/events") {
                    send.send_response(
                        Response::builder()
                            .status(201)
                            .body(Body::from(b"{}".to_vec()))
                            .expect("response"),
                    );
                    continue;
                }
                break (request, send);
            };
            let uri = request.uri().to_string();
            assert_eq!(request.method().as_str(), expected.method, "{uri}");
            assert_eq!(normalized(&uri), normalized(&expected.uri), "{uri}");
            if let Some(ct) = expected.content_type {
                assert_eq!(
                    request
                        .headers()
                        .get(http::header::CONTENT_TYPE)
                        .and_then(|v| v.to_str().ok()),
                    Some(ct),
                    "{uri}"
                );
            }
            let bytes = request.into_body().collect_bytes().await.expect("body");
            let body: Value = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).expect("a JSON body")
            };
            (expected.check)(&body);
            let (status, answer) = expected.respond;
            send.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&answer).expect("json")))
                    .expect("response"),
            );
        }
    });
    (Client::new(service, "default"), task)
}

/// Path and sorted, decoded query pairs: the order kube writes parameters in is not part
/// of the contract.
fn normalized(uri: &str) -> (String, Vec<(String, String)>) {
    let url = url::Url::parse(&format!("http://apiserver{uri}")).expect("uri");
    let mut query: Vec<(String, String)> = url
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    query.sort();
    (url.path().to_owned(), query)
}

/// A ServiceAccount writer whose cache holds `accounts` (JSON ServiceAccounts).
pub fn accounts(client: &Client, accounts: &[Value]) -> apply::Accounts {
    let index = super::index::Index::of(accounts.iter().map(|sa| {
        let sa: k8s_openapi::api::core::v1::ServiceAccount =
            serde_json::from_value(sa.clone()).expect("a ServiceAccount");
        super::index::Account::of(&sa)
    }));
    apply::Accounts::new(client.clone(), index)
}

/// An apiserver `Status` error body.
pub fn status_error(code: u16, reason: &str) -> Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": format!("mock: {reason}"), "reason": reason, "code": code,
    })
}

/// A reconcile context on `client` with empty caches (no namespaces, Secrets or
/// ServiceAccounts), no admission route and default settings.
pub fn context(client: Client) -> Arc<Context> {
    let (requests, _streams) = watches::Requests::channel();
    let issued = Arc::new(cache::CredentialCache::default());
    // Empty stores; the reconciler plans from what they hold and never waits on them.
    let caches = watches::Caches::default();
    let (clusters, _) = reflector::store();
    let (namespaced, _) = reflector::store();
    // Source-Secret watches are not part of any script: they stop before they start.
    let stopped = CancellationToken::new();
    stopped.cancel();
    Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "pullkeeper-test".into(),
                instance: None,
            },
        ),
        client: client.clone(),
        metrics: Arc::default(),
        backoffs: backoff::Backoffs::default(),
        accounts: apply::Accounts::new(client.clone(), caches.service_accounts.clone()),
        caches,
        objects: watches::Credentials { clusters, namespaced },
        sources: sources::SourceWatches::new(client, requests.clone(), issued.clone(), stopped),
        credentials: issued,
        issuing: credential::InFlight::default(),
        status_writes: super::status::StatusWrites::default(),
        requests,
        verified: verify::VerifyCache::default(),
        write_concurrency: 1,
        admission: admission::Bindings::new(admission::Route::Disabled),
        source_secret_namespace: None,
        namespaced_ambient_credentials: false,
        endpoints: crate::provider::Endpoints::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::identity::CredentialRef;
    use crate::controller::plan::{Delete, Plan, SaChange, Write};
    use crate::controller::secret::{self, Owner};
    use crate::controller::{apply, reconcile};
    use crate::crd::ClusterRegistryCredential;
    use crate::provider::Credential;
    use crate::registry::RegistryHost;
    use serde_json::json;

    const JSON_PATCH: &str = "application/json-patch+json";
    const APPLY: &str = "application/apply-patch+yaml";

    fn owner() -> Owner {
        Owner::of(&CredentialRef::cluster("ghcr"), "uid-1".into())
    }

    fn content() -> secret::Content {
        let credential = Credential {
            username: "robot".into(),
            password: secrecy::SecretString::from("pw".to_owned()),
            expires_at: None,
        };
        secret::content(&owner(), &RegistryHost::parse("ghcr.io").expect("host"), &credential)
    }

    /// Carries out `plan` for the credential of [`owner`] (Secret `pull`), one write at a
    /// time, with the `default` ServiceAccount of [`default_sa`] in the cache.
    async fn execute(client: &Client, plan: &Plan) -> apply::Outcome {
        let accounts = accounts(client, &[default_sa()]);
        apply::execute(client, &accounts, &owner(), "pull", Some(&content()), plan.clone(), 1).await
    }

    fn default_sa() -> Value {
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": "default", "namespace": "a", "resourceVersion": "7"}})
    }

    fn secret_answer(ns: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "pull", "namespace": ns, "uid": "s1"}})
    }

    #[tokio::test]
    async fn a_plan_creates_then_patches_service_accounts_then_deletes_with_a_uid_precondition() {
        let sa_patch = json!([
            {"op": "test", "path": "/metadata/resourceVersion", "value": "7"},
            {"op": "add", "path": "/imagePullSecrets", "value": [{"name": "pull"}]},
        ]);
        let (client, server) = apiserver(vec![
            Expect::new(
                "POST",
                "/api/v1/namespaces/a/secrets?fieldManager=pullkeeper.io%2Fcontroller",
                201,
                secret_answer("a"),
            )
            .check(|body| {
                assert_eq!(body["type"], "kubernetes.io/dockerconfigjson");
                assert_eq!(body["metadata"]["labels"]["app.kubernetes.io/managed-by"], "pullkeeper");
                assert_eq!(body["metadata"]["labels"]["pullkeeper.io/credential"], "ghcr");
                assert_eq!(body["metadata"]["labels"]["pullkeeper.io/scope"], "cluster");
                assert!(body["data"][".dockerconfigjson"].is_string());
            }),
            Expect::new(
                "PATCH",
                "/api/v1/namespaces/a/serviceaccounts/default?",
                200,
                json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default"}}),
            )
            .content_type(JSON_PATCH)
            .check({
                let expected = sa_patch.clone();
                move |body| assert_eq!(body, &expected)
            }),
            Expect::new("DELETE", "/api/v1/namespaces/b/secrets/old?", 200, secret_answer("b"))
                .check(|body| assert_eq!(body["preconditions"]["uid"], "old-uid")),
        ]);
        let plan = Plan {
            targeted: vec!["a".into()],
            writes: vec![Write::Create("a".into())],
            sa_changes: vec![entry("pull")],
            deletes: vec![Delete {
                namespace: "b".into(),
                name: "old".into(),
                uid: Some("old-uid".into()),
            }],
            ..Plan::default()
        };
        let done = execute(&client, &plan).await;
        server.await.expect("the apiserver saw what it expected");
        assert_eq!(done.written, vec!["a".to_owned()]);
        assert!(done.failures.is_empty(), "{:?}", done.failures);
        assert_eq!(done.requests, 3);
    }

    #[tokio::test]
    async fn a_create_that_finds_another_credentials_secret_is_a_conflict_naming_it_and_no_patch() {
        let theirs = json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
            "metadata": {"name": "pull", "namespace": "a", "labels": {
                "app.kubernetes.io/managed-by": "pullkeeper",
                "pullkeeper.io/credential": "older",
                "pullkeeper.io/scope": "cluster",
            }},
        });
        let (client, server) = apiserver(vec![
            Expect::new(
                "POST",
                "/api/v1/namespaces/a/secrets?fieldManager=pullkeeper.io%2Fcontroller",
                409,
                status_error(409, "AlreadyExists"),
            ),
            Expect::new("GET", "/api/v1/namespaces/a/secrets/pull", 200, theirs),
        ]);
        let plan = Plan {
            targeted: vec!["a".into()],
            writes: vec![Write::Create("a".into())],
            sa_changes: vec![entry("pull")],
            ..Plan::default()
        };
        let done = execute(&client, &plan).await;
        server.await.expect("the apiserver saw what it expected");
        assert!(!done.retryable, "a conflict waits for a change");
        assert_eq!(done.failures.len(), 1);
        assert_eq!(done.failures[0].reason, "Conflict");
        assert!(
            done.failures[0]
                .message
                .contains("held by ClusterRegistryCredential older"),
            "{}",
            done.failures[0].message
        );
    }

    #[tokio::test]
    async fn a_stale_secret_is_server_side_applied_with_the_named_manager_and_a_403_is_not_retried_fast() {
        let (client, server) = apiserver(vec![
            Expect::new(
                "PATCH",
                "/api/v1/namespaces/a/secrets/pull?fieldManager=pullkeeper.io%2Fcontroller&force=true",
                200,
                secret_answer("a"),
            )
            .content_type(APPLY)
            .check(|body| {
                assert_eq!(body["apiVersion"], "v1");
                assert_eq!(body["kind"], "Secret");
                assert!(
                    body["metadata"]["annotations"]["pullkeeper.io/content-hash"].is_string(),
                    "{body}"
                );
            }),
            Expect::new(
                "PATCH",
                "/api/v1/namespaces/b/secrets/pull?fieldManager=pullkeeper.io%2Fcontroller&force=true",
                403,
                status_error(403, "Forbidden"),
            ),
        ]);
        let plan = Plan {
            targeted: vec!["a".into(), "b".into()],
            writes: vec![Write::Apply("a".into()), Write::Apply("b".into())],
            ..Plan::default()
        };
        let done = execute(&client, &plan).await;
        server.await.expect("the apiserver saw what it expected");
        assert_eq!(done.written, vec!["a".to_owned()]);
        assert_eq!(done.failures[0].reason, "Forbidden");
        assert!(
            !done.retryable,
            "a 403 waits for the backoff of a change, not a quick retry"
        );
    }

    fn credential(finalizers: &[&str], deleting: bool) -> ClusterRegistryCredential {
        let mut meta =
            json!({"name": "ghcr", "uid": "uid-1", "generation": 3, "resourceVersion": "10", "finalizers": finalizers});
        if deleting {
            meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        serde_json::from_value(json!({
            "apiVersion": "pullkeeper.io/v1alpha1", "kind": "ClusterRegistryCredential",
            "metadata": meta,
            "spec": {"registry": "ghcr.io", "provider": {"basic": {"secretRef": {"name": "login", "namespace": "ops"}}}},
        }))
        .expect("credential")
    }

    fn answer(c: &ClusterRegistryCredential) -> Value {
        serde_json::to_value(c).expect("json")
    }

    #[tokio::test]
    async fn the_finalizer_is_added_first_by_a_json_patch() {
        let c = credential(&[], false);
        let script = vec![
            Expect::new(
                "PATCH",
                "/apis/pullkeeper.io/v1alpha1/clusterregistrycredentials/ghcr?",
                200,
                answer(&credential(&[reconcile::FINALIZER], false)),
            )
            .content_type(JSON_PATCH)
            .check(|body| assert!(body.to_string().contains(reconcile::FINALIZER), "{body}")),
        ];
        reconcile_against(c, script).await;
    }

    #[tokio::test]
    async fn a_reconcile_reads_the_source_and_applies_status_with_its_own_manager() {
        let c = credential(&[reconcile::FINALIZER], false);
        let login = json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "login", "namespace": "ops"},
            "data": {"username": "cm9ib3Q=", "password": "cHc="},
        });
        let script = vec![
            Expect::new("GET", "/api/v1/namespaces/ops/secrets/login", 200, login),
            Expect::new("PATCH", "/apis/pullkeeper.io/v1alpha1/clusterregistrycredentials/ghcr/status?fieldManager=pullkeeper.io%2Fstatus&force=true", 200, answer(&c))
                .content_type(APPLY)
                .check(|body| {
                    assert_eq!(body["kind"], "ClusterRegistryCredential");
                    assert_eq!(body["status"]["observedGeneration"], 3);
                    let conditions = body["status"]["conditions"].as_array().expect("conditions");
                    assert!(conditions.iter().any(|c| c["type"] == "CredentialIssued" && c["status"] == "True"), "{body}");
                    assert!(!body.to_string().contains("cHc="), "no secret value in status");
                }),
        ];
        reconcile_against(c, script).await;
    }

    #[tokio::test]
    async fn deleting_lists_what_it_wrote_by_label_removes_it_and_then_the_finalizer() {
        let c = credential(&[reconcile::FINALIZER], true);
        let written = json!({
            "apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": {},
            "items": [{"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": {
                "name": "pullkeeper-ghcr", "namespace": "a", "uid": "s-uid",
                "labels": {"app.kubernetes.io/managed-by": "pullkeeper", "pullkeeper.io/credential": "ghcr", "pullkeeper.io/scope": "cluster"},
            }}],
        });
        let script = vec![
            Expect::new(
                "GET",
                format!("/api/v1/secrets?&labelSelector={}", url_encoded(&owner().selector())),
                200,
                written,
            ),
            Expect::new(
                "DELETE",
                "/api/v1/namespaces/a/secrets/pullkeeper-ghcr?",
                200,
                secret_answer("a"),
            )
            .check(|body| assert_eq!(body["preconditions"]["uid"], "s-uid")),
            Expect::new(
                "PATCH",
                "/apis/pullkeeper.io/v1alpha1/clusterregistrycredentials/ghcr?",
                200,
                answer(&credential(&[], true)),
            )
            .content_type(JSON_PATCH)
            .check(|body| assert!(body.to_string().contains("/metadata/finalizers"), "{body}")),
        ];
        reconcile_against(c, script).await;
    }

    /// Reconciles `c` against an apiserver that answers `script`, and checks it saw it all.
    async fn reconcile_against(c: ClusterRegistryCredential, script: Vec<Expect>) {
        let (client, server) = apiserver(script);
        reconcile::reconcile(Arc::new(c), context(client))
            .await
            .expect("reconciled");
        server.await.expect("the apiserver saw what it expected");
    }

    #[tokio::test]
    async fn an_unreadable_object_being_deleted_still_has_what_it_wrote_removed() {
        use kube::core::DeserializeGuard;
        // Written for another version: a provider this one does not know.
        let unreadable: DeserializeGuard<ClusterRegistryCredential> = serde_json::from_value(json!({
            "apiVersion": "pullkeeper.io/v1alpha1", "kind": "ClusterRegistryCredential",
            "metadata": {"name": "ghcr", "uid": "uid-1", "finalizers": [reconcile::FINALIZER, "other.io/keep"],
                         "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"registry": "ghcr.io", "provider": {"quay": {}}},
        }))
        .expect("guard");
        assert!(unreadable.0.is_err());
        let (client, server) = apiserver(vec![
            Expect::new(
                "GET",
                format!("/api/v1/secrets?&labelSelector={}", url_encoded(&owner().selector())),
                200,
                json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList", "metadata": {}, "items": []}),
            ),
            Expect::new(
                "PATCH",
                "/apis/pullkeeper.io/v1alpha1/clusterregistrycredentials/ghcr?",
                200,
                json!({"apiVersion": "pullkeeper.io/v1alpha1", "kind": "ClusterRegistryCredential", "metadata": {"name": "ghcr"}}),
            )
            .content_type(JSON_PATCH)
            .check(|body| {
                // Only our finalizer goes, guarded by a test of the list it was computed from.
                assert_eq!(body[0]["op"], "test", "{body}");
                assert_eq!(body[1]["value"], json!(["other.io/keep"]), "{body}");
            }),
        ]);
        crate::controller::guarded::reconcile_guarded(Arc::new(unreadable), context(client))
            .await
            .expect("cleaned up");
        server.await.expect("the apiserver saw what it expected");
    }

    fn sa_answer(rv: &str, entries: &[&str]) -> Value {
        let list: Vec<Value> = entries.iter().map(|e| json!({"name": e})).collect();
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": "default", "namespace": "a", "resourceVersion": rv},
               "imagePullSecrets": list})
    }

    fn entry(secret: &str) -> SaChange {
        SaChange {
            namespace: "a".into(),
            name: "default".into(),
            secret: secret.into(),
            add: true,
        }
    }

    #[tokio::test]
    async fn credentials_waiting_for_one_service_account_share_a_patch_made_from_the_last_answer() {
        const SA: &str = "/api/v1/namespaces/a/serviceaccounts/default?";
        let (client, server) = apiserver(vec![
            Expect::new("PATCH", SA, 200, sa_answer("8", &["pull-a"]))
                .content_type(JSON_PATCH)
                .check(|body| {
                    assert_eq!(body[0]["value"], "7", "from the cached copy");
                    assert_eq!(body[1]["value"], json!([{"name": "pull-a"}]));
                }),
            Expect::new("PATCH", SA, 200, sa_answer("9", &["pull-a", "pull-b", "pull-c"])).check(|body| {
                assert_eq!(body[0]["value"], "8", "from the answer, newer than the cache");
                let added: Vec<&Value> = body.as_array().expect("ops")[1..]
                    .iter()
                    .map(|op| &op["value"]["name"])
                    .collect();
                assert_eq!(added, vec!["pull-b", "pull-c"], "both waiting entries in one patch");
            }),
        ]);
        let accounts = accounts(&client, &[default_sa()]);
        let (a, b, c) = tokio::join!(
            accounts.change(entry("pull-a")),
            accounts.change(entry("pull-b")),
            accounts.change(entry("pull-c")),
        );
        server.await.expect("the apiserver saw what it expected");
        assert!(a.0.is_ok() && b.0.is_ok() && c.0.is_ok());
        assert_eq!(a.1 + b.1 + c.1, 2, "two requests for three entries");
    }

    #[tokio::test]
    async fn a_service_account_changed_by_someone_else_is_read_again_and_patched_once_more() {
        const SA: &str = "/api/v1/namespaces/a/serviceaccounts/default";
        let (client, server) = apiserver(vec![
            Expect::new("PATCH", format!("{SA}?"), 422, status_error(422, "Invalid")),
            Expect::new("GET", SA, 200, sa_answer("12", &["theirs"])),
            Expect::new("PATCH", format!("{SA}?"), 200, sa_answer("13", &["theirs", "pull-a"])).check(|body| {
                assert_eq!(body[0]["value"], "12");
                assert_eq!(body[1]["path"], "/imagePullSecrets/-", "appended after theirs");
            }),
        ]);
        let (answer, requests) = accounts(&client, &[default_sa()]).change(entry("pull-a")).await;
        server.await.expect("the apiserver saw what it expected");
        assert!(answer.is_ok(), "{answer:?}");
        assert_eq!(requests, 3);
    }

    fn url_encoded(s: &str) -> String {
        url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
    }
}
