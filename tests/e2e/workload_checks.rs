//! The operator's workload checks (`--workload-checks`) against the real control plane and
//! the test registry, with an operator process of the test's own: each kind of broken
//! workload gets a Warning Event with the right reason and one metric series on the right
//! container, the credential's status sums them up, fixing each removes its series and
//! records a Normal Event, and no secret value appears in the operator's logs, Events,
//! metrics or status. No node is needed: pods stay Pending.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::CronJob;
use k8s_openapi::api::core::v1::{Event, Secret, ServiceAccount};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use pullkeeper::crd::ClusterRegistryCredential;
use serde_json::{Value, json};

use crate::support::{self, SHARD_LABEL};
use crate::workloads::{apply, cron_job, delete_image, deployment, pod, pull_secret};

/// `(workload, container, reason)` of every `pullkeeper_workload_image_unpullable` series of
/// `namespace`, from the operator's `/metrics` text.
pub(crate) fn series(metrics: &str, namespace: &str) -> BTreeSet<(String, String, String)> {
    let label = |line: &str, name: &str| {
        let start = line.find(&format!("{name}=\""))? + name.len() + 2;
        let len = line[start..].find('"')?;
        Some(line[start..start + len].to_owned())
    };
    metrics
        .lines()
        .filter(|l| l.starts_with("pullkeeper_workload_image_unpullable{"))
        .filter(|l| l.contains(&format!("namespace=\"{namespace}\"")))
        .filter_map(|l| {
            Some((
                format!("{}/{}", label(l, "kind")?, label(l, "workload")?),
                label(l, "container")?,
                label(l, "reason")?,
            ))
        })
        .collect()
}

pub(crate) async fn metrics_text(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return String::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await;
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf).await;
    buf
}

/// pullkeeper's Events in `namespace` as `(kind/name, type, reason, note, count)`.
async fn events(client: &Client, namespace: &str) -> Vec<(String, String, String, String, i32)> {
    Api::<Event>::namespaced(client.clone(), namespace)
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.reporting_component.as_deref() == Some("pullkeeper"))
        .map(|e| {
            let o = &e.involved_object;
            (
                format!(
                    "{}/{}",
                    o.kind.clone().unwrap_or_default(),
                    o.name.clone().unwrap_or_default()
                ),
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.message.unwrap_or_default(),
                e.series.and_then(|s| s.count).or(e.count).unwrap_or(1),
            )
        })
        .collect()
}

pub(crate) fn row(workload: &str, container: &str, reason: &str) -> (String, String, String) {
    (workload.into(), container.into(), reason.into())
}

/// The broken workloads of the issue, each with the reason it must get.
fn broken(r: &str, multi: &str, nightly: &str) -> (Vec<Value>, Value) {
    let demo = format!("{r}/demo:v1");
    let deployments = vec![
        deployment("missing-tag", pod(None, &format!("{r}/demo:no-such-tag"))),
        deployment("sa-lacks-secret", {
            let mut p = pod(None, &demo);
            p["serviceAccountName"] = json!("bare");
            p
        }),
        deployment("wrong-password", pod(Some("stale"), &demo)),
        deployment("init", {
            let mut p = pod(None, &demo);
            p["initContainers"] = json!([{"name": "setup", "image": format!("{r}/no-such-repo:v1")}]);
            p
        }),
        deployment("s390x", {
            let mut p = pod(None, &format!("{r}/{multi}:v1"));
            p["nodeSelector"] = json!({"kubernetes.io/arch": "s390x"});
            p
        }),
        deployment("healthy", pod(None, &demo)),
    ];
    (
        deployments,
        cron_job("nightly", pod(None, &format!("{r}/{nightly}:v1"))),
    )
}

/// Applies the fix of each broken workload.
async fn fix(client: &Client, ns: &str, reg: &support::Registry, multi: &str, nightly: &str) {
    let r = &reg.addr;
    let demo = format!("{r}/demo:v1");
    apply::<Deployment>(client, ns, deployment("missing-tag", pod(None, &demo))).await;
    // A Secret of the team's own: pullkeeper keeps its own Secret on the ServiceAccounts
    // its credential targets only.
    apply::<Secret>(client, ns, pull_secret("pull", r, &reg.user, &reg.password)).await;
    apply::<ServiceAccount>(
        client,
        ns,
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "bare"}, "imagePullSecrets": [{"name": "pull"}]}),
    )
    .await;
    apply::<Secret>(client, ns, pull_secret("stale", r, &reg.user, &reg.password)).await;
    let mut p = pod(None, &demo);
    p["initContainers"] = json!([{"name": "setup", "image": demo}]);
    apply::<Deployment>(client, ns, deployment("init", p)).await;
    let mut p = pod(None, &format!("{r}/{multi}:v1"));
    p["nodeSelector"] = json!({"kubernetes.io/arch": "arm64"});
    apply::<Deployment>(client, ns, deployment("s390x", p)).await;
    support::push_index(r, &reg.user, &reg.password, nightly, "v1").await;
}

#[tokio::test]
async fn unpullable_workloads_get_events_metrics_and_status_and_fixes_clear_them() {
    let reg = support::registry();
    let client = support::client().await;
    let r = &reg.addr;
    let shard = support::unique("wlc");
    let ns = support::namespace(&client, "wlc", &[]).await;
    let quiet = support::namespace(&client, "wlc-quiet", &[]).await;
    let annotate = json!({"metadata": {"annotations": {"pullkeeper.io/exclude-workload-checks": "true"}}});
    Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
        .patch(
            &quiet,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&annotate),
        )
        .await
        .expect("opt-out annotation");
    let (multi, nightly) = (support::unique("multi"), support::unique("nightly"));
    support::push_index(r, &reg.user, &reg.password, &multi, "v1").await;
    support::push_index(r, &reg.user, &reg.password, &nightly, "v1").await;
    delete_image(reg, &nightly, "v1").await;
    apply::<Secret>(&client, &ns, pull_secret("stale", r, &reg.user, "not-the-password")).await;
    apply::<ServiceAccount>(
        &client,
        &ns,
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "bare"}}),
    )
    .await;

    let dir = tempfile::tempdir().expect("tempdir");
    let op = support::start(
        &support::env().kubeconfig,
        &shard,
        &[
            ("PULLKEEPER_WORKLOAD_CHECKS", "true"),
            ("PULLKEEPER_WORKLOAD_CHECK_INTERVAL", "2s"),
            ("PULLKEEPER_LOG", "trace"),
        ],
        dir.path(),
        "workload-checks",
    );
    let credential = credential(&client, reg, &shard, &ns, &[&ns, &quiet]).await;
    let secret = format!("pullkeeper-{credential}");
    support::wait_service_account_has(&client, &ns, &secret).await;

    let (deployments, cron) = broken(r, &multi, &nightly);
    for d in deployments {
        apply::<Deployment>(&client, &ns, d.clone()).await;
        apply::<Deployment>(&client, &quiet, d).await;
    }
    apply::<CronJob>(&client, &ns, cron).await;

    let want = BTreeSet::from([
        row("CronJob/nightly", "app", "NotFound"),
        row("Deployment/init", "setup", "NotFound"),
        row("Deployment/missing-tag", "app", "NotFound"),
        row("Deployment/s390x", "app", "PlatformMissing"),
        row("Deployment/sa-lacks-secret", "app", "Unauthorized"),
        row("Deployment/wrong-password", "app", "Unauthorized"),
    ]);
    wait_series(&op, &ns, &want, 60).await;
    let warnings = support::eventually(Duration::from_secs(30), || async {
        let got: BTreeSet<(String, String)> = events(&client, &ns)
            .await
            .into_iter()
            .filter(|e| e.1 == "Warning")
            .map(|e| (e.0, e.2))
            .collect();
        (got.len() == want.len()).then_some(got)
    })
    .await
    .expect("a Warning Event per broken workload");
    let expected: BTreeSet<(String, String)> = want.iter().map(|(w, _, reason)| (w.clone(), reason.clone())).collect();
    assert_eq!(warnings, expected);
    let all = events(&client, &ns).await;
    let note = |w: &str| all.iter().find(|e| e.0 == w).map(|e| e.3.clone()).unwrap_or_default();
    assert!(
        note("Deployment/init").starts_with(&format!(
            "initContainer setup: image {r}/no-such-repo:v1 would not pull (NotFound)"
        )),
        "{all:?}"
    );
    assert!(
        note("Deployment/wrong-password").contains("fix the password"),
        "{all:?}"
    );

    // Further rounds change nothing: no new or repeated Events, the same series.
    let rounds = support::metric(&op.addr, "pullkeeper_workload_check_rounds_total")
        .await
        .unwrap_or(0.0);
    support::eventually(Duration::from_secs(30), || async {
        let now = support::metric(&op.addr, "pullkeeper_workload_check_rounds_total").await?;
        (now >= rounds + 2.0).then_some(())
    })
    .await
    .expect("more rounds");
    let again = events(&client, &ns).await;
    assert_eq!(again.len(), want.len(), "{again:?}");
    assert!(again.iter().all(|e| e.4 == 1), "an Event was repeated: {again:?}");
    assert!(
        series(&metrics_text(&op.addr).await, &quiet).is_empty(),
        "an opted-out namespace was checked"
    );
    assert!(
        events(&client, &quiet).await.is_empty(),
        "an opted-out namespace got Events"
    );

    // The credential's status: the images pulled with its Secret, and those that fail.
    let summary = support::eventually(Duration::from_secs(30), || async {
        let s = support::credential_status(&client, &credential).await?.workloads?;
        (s.unpullable == 4).then_some(s)
    })
    .await
    .expect("status.workloads");
    assert_eq!(summary.images, 6, "{summary:?}");
    let examples: BTreeSet<(String, String)> = summary
        .examples
        .iter()
        .map(|e| (format!("{}/{}", e.kind, e.name), e.reason.clone()))
        .collect();
    assert_eq!(
        examples,
        BTreeSet::from([
            ("CronJob/nightly".to_owned(), "NotFound".to_owned()),
            ("Deployment/init".to_owned(), "NotFound".to_owned()),
            ("Deployment/missing-tag".to_owned(), "NotFound".to_owned()),
            ("Deployment/s390x".to_owned(), "PlatformMissing".to_owned()),
        ])
    );
    // `kubectl get crc -o wide` shows the count.
    let wide = std::process::Command::new(support::tools().join("kubectl"))
        .env("KUBECONFIG", &support::env().kubeconfig)
        .args(["get", "crc", &credential, "-o", "wide"])
        .output()
        .expect("kubectl");
    let wide = String::from_utf8_lossy(&wide.stdout).into_owned();
    let column = |line: &str, header: &str| {
        let at = wide.lines().next().and_then(|h| h.find(header))?;
        line.get(at..)?.split_whitespace().next().map(str::to_owned)
    };
    let row = wide.lines().nth(1).unwrap_or_default();
    assert_eq!(column(row, "UNPULLABLE").as_deref(), Some("4"), "{wide}");
    // The reconciler's own status writes leave it alone: a new generation makes it write
    // status again, and status.workloads stays, owned by the workload checks' manager only.
    let api = Api::<ClusterRegistryCredential>::all(client.clone());
    let refresh = json!({"spec": {"refresh": {"interval": "2h"}}});
    api.patch(&credential, &PatchParams::default(), &Patch::Merge(&refresh))
        .await
        .expect("a new generation");
    let observed = support::eventually(Duration::from_secs(30), || async {
        let c = api.get(&credential).await.ok()?;
        let s = c.status.clone()?;
        (s.observed_generation == c.metadata.generation).then_some(c)
    })
    .await
    .expect("the reconciler wrote the new generation's status");
    assert_eq!(observed.status.and_then(|s| s.workloads), Some(summary.clone()));
    let owners: Vec<String> = observed
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| {
            m.fields_v1
                .as_ref()
                .is_some_and(|f| f.0.to_string().contains("f:workloads"))
        })
        .filter_map(|m| m.manager.clone())
        .collect();
    assert_eq!(owners, vec!["pullkeeper.io/workload-checks".to_owned()]);

    fix(&client, &ns, reg, &multi, &nightly).await;
    wait_series(&op, &ns, &BTreeSet::new(), 60).await;
    let fixed = support::eventually(Duration::from_secs(30), || async {
        let got: BTreeSet<String> = events(&client, &ns)
            .await
            .into_iter()
            .filter(|e| e.1 == "Normal" && e.2 == "Pullable")
            .map(|e| e.0)
            .collect();
        (got.len() == want.len()).then_some(got)
    })
    .await;
    let expected: BTreeSet<String> = want.iter().map(|(w, _, _)| w.clone()).collect();
    assert_eq!(fixed, Some(expected), "{:?}", events(&client, &ns).await);
    let summary = support::eventually(Duration::from_secs(30), || async {
        let s = support::credential_status(&client, &credential).await?.workloads?;
        (s.unpullable == 0 && s.images == 6).then_some(s)
    })
    .await;
    assert!(
        summary.is_some_and(|s| s.examples.is_empty()),
        "{:?}",
        support::credential_status(&client, &credential).await
    );

    // No secret value anywhere people look.
    let status = serde_json::to_string(&support::credential_status(&client, &credential).await).expect("json");
    let metrics = metrics_text(&op.addr).await;
    let notes = format!("{:?}", events(&client, &ns).await);
    let log = op.log_text();
    assert!(log.contains("workload checks started"), "{}", tail(&log));
    for (what, text) in [
        ("status", &status),
        ("metrics", &metrics),
        ("Events", &notes),
        ("log", &log),
    ] {
        assert!(!text.contains(&reg.password), "the password is in the {what}");
        assert!(
            !text.contains("not-the-password"),
            "the stale password is in the {what}"
        );
    }

    delete(&client, &credential).await;
    drop(op);
    support::delete_namespace(&client, &ns).await;
    support::delete_namespace(&client, &quiet).await;
}

/// Applies a registry login Secret in `source` and a ClusterRegistryCredential of `shard`
/// that reads it and targets `targets`; returns the credential's name.
async fn credential(
    client: &Client,
    reg: &support::Registry,
    shard: &str,
    source: &str,
    targets: &[&String],
) -> String {
    apply::<Secret>(client, source, login(reg, &reg.password)).await;
    let name = support::unique("wlc");
    support::apply_credential(
        client,
        &name,
        json!({SHARD_LABEL: shard}),
        json!({"registry": reg.addr, "provider": {"basic": {"secretRef": {"name": "login", "namespace": source}}},
               "target": {"namespaces": targets}}),
    )
    .await;
    name
}

/// The source Secret `login` of the test's credentials, with this password.
fn login(reg: &support::Registry, password: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "login"},
           "stringData": {"username": reg.user, "password": password}})
}

/// Deletes a credential and waits (30 s) until its finalizer has run.
async fn delete(client: &Client, name: &str) {
    support::delete_credential(client, name).await;
    support::eventually(Duration::from_secs(30), || async {
        support::credential_status(client, name).await.is_none().then_some(())
    })
    .await;
}

/// The test registry, an admin client, a fresh shard, and a namespace holding the pull
/// Secret `pull` with the registry's right password.
async fn with_pull_secret(prefix: &str) -> (&'static support::Registry, Client, String, String) {
    let reg = support::registry();
    let client = support::client().await;
    let shard = support::unique(prefix);
    let ns = support::namespace(&client, prefix, &[]).await;
    apply::<Secret>(&client, &ns, pull_secret("pull", &reg.addr, &reg.user, &reg.password)).await;
    (reg, client, shard, ns)
}

/// An operator process for `shard` with workload checks whose full rounds are an hour apart.
fn hourly(shard: &str, dir: &std::path::Path, name: &str) -> support::Operator {
    support::start(
        &support::env().kubeconfig,
        shard,
        &[
            ("PULLKEEPER_WORKLOAD_CHECKS", "true"),
            ("PULLKEEPER_WORKLOAD_CHECK_INTERVAL", "1h"),
        ],
        dir,
        name,
    )
}

/// Waits (up to `secs`) until the operator holds exactly the series `want` for
/// `namespace`; panics with those it holds and its last log lines otherwise.
async fn wait_series(op: &support::Operator, namespace: &str, want: &BTreeSet<(String, String, String)>, secs: u64) {
    let seen = support::eventually(Duration::from_secs(secs), || async {
        (series(&metrics_text(&op.addr).await, namespace) == *want).then_some(())
    })
    .await;
    assert!(
        seen.is_some(),
        "series of {namespace}: {:?}, want {want:?}\nlog tail: {}",
        series(&metrics_text(&op.addr).await, namespace),
        tail(&op.log_text())
    );
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// With the chart's RBAC and `sourceSecrets.namespace`, the operator may read pull
/// Secrets only where `workloadChecks.pullSecretNamespaces` lets it: there a wrong password
/// is found, elsewhere the pull Secret is reported as SecretForbidden, and the round goes on.
#[tokio::test]
async fn with_the_charts_rbac_an_unreadable_pull_secret_is_reported_not_fatal() {
    let reg = support::registry();
    let env = support::env();
    let client = support::client().await;
    let r = &reg.addr;
    let shard = support::unique("wlc-rbac");
    let home = support::namespace(&client, "wlc-home", &[]).await;
    let readable = support::namespace(&client, "wlc-readable", &[]).await;
    let hidden = support::namespace(&client, "wlc-hidden", &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let sets = [
        "workloadChecks.enabled=true".to_owned(),
        format!("sourceSecrets.namespace={home}"),
        format!("workloadChecks.pullSecretNamespaces={{{readable}}}"),
    ];
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    let kubeconfig = support::chart_identity(&env.kubeconfig, &shard, &home, dir.path(), &sets).await;
    let op = support::start(
        &kubeconfig,
        &shard,
        &[
            ("PULLKEEPER_SOURCE_SECRET_NAMESPACE", home.as_str()),
            ("PULLKEEPER_WORKLOAD_CHECKS", "true"),
            ("PULLKEEPER_WORKLOAD_CHECK_INTERVAL", "2s"),
        ],
        dir.path(),
        "workload-checks-rbac",
    );
    for ns in [&readable, &hidden] {
        apply::<Secret>(&client, ns, pull_secret("stale", r, &reg.user, "not-the-password")).await;
        apply::<Deployment>(
            &client,
            ns,
            deployment("own-secret", pod(Some("stale"), &format!("{r}/demo:v1"))),
        )
        .await;
    }
    let credential = credential(&client, reg, &shard, &home, &[&readable, &hidden]).await;
    let want = |reason: &str| BTreeSet::from([row("Deployment/own-secret", "app", reason)]);
    let seen = support::eventually(Duration::from_secs(60), || async {
        let m = metrics_text(&op.addr).await;
        (series(&m, &readable) == want("Unauthorized") && series(&m, &hidden) == want("SecretForbidden")).then_some(())
    })
    .await;
    let m = metrics_text(&op.addr).await;
    assert!(
        seen.is_some(),
        "readable: {:?}, hidden: {:?}\nlog tail: {}",
        series(&m, &readable),
        series(&m, &hidden),
        tail(&op.log_text())
    );
    let forbidden = support::eventually(Duration::from_secs(30), || async {
        events(&client, &hidden)
            .await
            .into_iter()
            .find(|e| e.2 == "SecretForbidden")
    })
    .await
    .expect("a SecretForbidden Event");
    assert!(
        forbidden.3.contains(&format!("{hidden}/stale")) && forbidden.3.contains("workloadChecks.pullSecretNamespaces"),
        "{forbidden:?}"
    );
    support::wait_ready(&client, &credential, "True", "Synced").await;
    let log = op.log_text();
    assert!(!log.contains(&reg.password) && !log.contains("not-the-password"));
    delete(&client, &credential).await;
    drop(op);
    for ns in [&home, &readable, &hidden] {
        support::delete_namespace(&client, ns).await;
    }
}

/// With leader election only the leader checks: the standby sends no resolution and
/// publishes nothing until it takes over.
#[tokio::test]
async fn only_the_leader_checks_workloads() {
    let reg = support::registry();
    let env = support::env();
    let client = support::client().await;
    let shard = support::unique("wlc-ha");
    let ns = support::namespace(&client, "wlc-ha", &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let env_vars = [
        ("PULLKEEPER_LEADER_ELECT", "true"),
        ("POD_NAMESPACE", ns.as_str()),
        ("PULLKEEPER_LEADER_ELECTION_ID", shard.as_str()),
        ("PULLKEEPER_LEASE_DURATION_SECONDS", "4"),
        ("PULLKEEPER_LEASE_RENEW_SECONDS", "1"),
        ("PULLKEEPER_WORKLOAD_CHECKS", "true"),
        ("PULLKEEPER_WORKLOAD_CHECK_INTERVAL", "2s"),
    ];
    let a = support::start(&env.kubeconfig, &shard, &env_vars, dir.path(), "wlc-replica-a");
    let leading = support::eventually(Duration::from_secs(30), || async {
        (support::metric(&a.addr, "pullkeeper_leader").await? == 1.0).then_some(())
    })
    .await;
    assert!(leading.is_some(), "{}", tail(&a.log_text()));
    let b = support::start(&env.kubeconfig, &shard, &env_vars, dir.path(), "wlc-replica-b");
    let credential = credential(&client, reg, &shard, &ns, &[&ns]).await;
    let image = format!("{}/demo:no-such-tag", reg.addr);
    apply::<Deployment>(&client, &ns, deployment("missing-tag", pod(None, &image))).await;
    let want = BTreeSet::from([row("Deployment/missing-tag", "app", "NotFound")]);
    wait_series(&a, &ns, &want, 60).await;
    // The standby is up (it serves metrics) and has run no round.
    let standby = metrics_text(&b.addr).await;
    assert!(standby.contains("pullkeeper_leader 0"), "{standby}");
    assert!(series(&standby, &ns).is_empty(), "{standby}");
    assert_eq!(
        support::metric(&b.addr, "pullkeeper_workload_check_rounds_total").await,
        Some(0.0),
        "the standby ran a round"
    );

    // The leader goes; the standby takes over and reports the same.
    drop(a);
    wait_series(&b, &ns, &want, 60).await;
    delete(&client, &credential).await;
    drop(b);
    support::delete_namespace(&client, &ns).await;
}

/// Between full rounds (an hour apart here) a changed pod template and a new workload are
/// checked at once, a deleted workload's series goes without an Event, and a round
/// resolves each image once per credential however many workloads use it.
#[tokio::test]
async fn changed_and_new_workloads_are_checked_at_once_and_images_are_resolved_once_per_round() {
    let (reg, client, shard, ns) = with_pull_secret("wlc-watch").await;
    let r = &reg.addr;
    let (good, missing) = (format!("{r}/demo:v1"), format!("{r}/demo:no-such-tag"));
    for (name, image) in [
        ("a", &good),
        ("b", &good),
        ("c", &good),
        ("broken", &missing),
        ("gone", &missing),
    ] {
        apply::<Deployment>(&client, &ns, deployment(name, pod(Some("pull"), image))).await;
    }
    let credential = credential(&client, reg, &shard, &ns, &[&ns]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let op = hourly(&shard, dir.path(), "workload-checks-watch");
    let want = BTreeSet::from([
        row("Deployment/broken", "app", "NotFound"),
        row("Deployment/gone", "app", "NotFound"),
    ]);
    wait_series(&op, &ns, &want, 60).await;
    // Five workloads, two images, one credential: two resolutions in the first round.
    let resolutions = support::metric(&op.addr, "pullkeeper_workload_check_resolutions_total").await;
    assert_eq!(resolutions, Some(2.0), "{}", metrics_text(&op.addr).await);

    apply::<Deployment>(&client, &ns, deployment("broken", pod(Some("pull"), &good))).await;
    Api::<Deployment>::namespaced(client.clone(), &ns)
        .delete("gone", &kube::api::DeleteParams::default())
        .await
        .expect("delete");
    wait_series(&op, &ns, &BTreeSet::new(), 20).await;
    let normal: Vec<String> = events(&client, &ns)
        .await
        .into_iter()
        .filter(|e| e.1 == "Normal")
        .map(|e| e.0)
        .collect();
    assert_eq!(
        normal,
        vec!["Deployment/broken".to_owned()],
        "no Event for a deleted workload"
    );
    // A workload created between full rounds is checked at once too.
    apply::<Deployment>(&client, &ns, deployment("late", pod(Some("pull"), &missing))).await;
    let late = BTreeSet::from([row("Deployment/late", "app", "NotFound")]);
    wait_series(&op, &ns, &late, 20).await;
    assert_eq!(
        support::metric(&op.addr, "pullkeeper_workload_check_rounds_total{round=\"full\"}").await,
        Some(1.0),
        "one full round only"
    );
    delete(&client, &credential).await;
    drop(op);
    support::delete_namespace(&client, &ns).await;
}

/// A ServiceAccount whose pull Secrets change is looked at again within seconds, even an
/// hour from the next full round; and a credential of another operator (another shard)
/// gets no `status.workloads` from this one, though its Secret is tried too.
#[tokio::test]
async fn a_service_account_change_is_checked_soon_and_other_shards_credentials_are_left_alone() {
    let (reg, client, shard, ns) = with_pull_secret("wlc-sa").await;
    let r = &reg.addr;
    apply::<ServiceAccount>(
        &client,
        &ns,
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "late"}}),
    )
    .await;
    // One credential of this test's operator, one of the in-process operator's.
    let mine = credential(&client, reg, &shard, &ns, &[&ns]).await;
    let theirs = support::unique("wlc-theirs");
    support::apply_credential(
        &client,
        &theirs,
        json!({}),
        json!({"registry": r, "provider": {"basic": {"secretRef": {"name": "login", "namespace": ns}}},
               "target": {"namespaces": [ns]}}),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let op = hourly(&shard, dir.path(), "workload-checks-sa");
    support::wait_service_account_has(&client, &ns, &format!("pullkeeper-{mine}")).await;
    support::wait_service_account_has(&client, &ns, &format!("pullkeeper-{theirs}")).await;
    let demo = format!("{r}/demo:v1");
    apply::<Deployment>(&client, &ns, deployment("by-default", pod(None, &demo))).await;
    let mut late = pod(None, &demo);
    late["serviceAccountName"] = json!("late");
    apply::<Deployment>(&client, &ns, deployment("by-late", late)).await;
    let want = BTreeSet::from([row("Deployment/by-late", "app", "Unauthorized")]);
    wait_series(&op, &ns, &want, 30).await;

    apply::<ServiceAccount>(
        &client,
        &ns,
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "late"}, "imagePullSecrets": [{"name": "pull"}]}),
    )
    .await;
    wait_series(&op, &ns, &BTreeSet::new(), 20).await;
    let summary = support::eventually(Duration::from_secs(20), || async {
        support::credential_status(&client, &mine).await?.workloads
    })
    .await
    .expect("status.workloads of this operator's credential");
    assert_eq!((summary.images, summary.unpullable), (1, 0), "{summary:?}");
    let other = support::credential_status(&client, &theirs).await.expect("status");
    assert!(other.workloads.is_none(), "{other:?}");
    support::delete_credential(&client, &theirs).await;
    delete(&client, &mine).await;
    drop(op);
    support::delete_namespace(&client, &ns).await;
}

/// The pulls a registry says are left (Docker Hub's `ratelimit-remaining`) reach the
/// operator's metric, per registry.
#[tokio::test]
async fn a_registrys_ratelimit_remaining_is_a_metric() {
    let (reg, client, shard, ns) = with_pull_secret("wlc-limit").await;
    // A registry that answers every manifest like Docker Hub, rate-limit headers included:
    // an index of the platforms nodes may have (the node tests register one).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let limited = listener.local_addr().expect("addr").to_string();
    let platform = |arch: &str| {
        json!({"mediaType": "application/vnd.oci.image.manifest.v1+json", "size": 2,
               "digest": format!("sha256:{}", "c".repeat(64)), "platform": {"os": "linux", "architecture": arch}})
    };
    let index = json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                       "manifests": [platform("amd64"), platform("arm64")]})
    .to_string();
    let app = axum::Router::new().fallback(move || {
        let index = index.clone();
        async move {
            axum::http::Response::builder()
                .header("content-type", "application/vnd.oci.image.index.v1+json")
                .header("docker-content-digest", format!("sha256:{}", "b".repeat(64)))
                .header("ratelimit-limit", "100;w=21600")
                .header("ratelimit-remaining", "42;w=21600")
                .body(axum::body::Body::from(index))
                .expect("response")
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    let credential = credential(&client, reg, &shard, &ns, &[&ns]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let op = hourly(&shard, dir.path(), "workload-checks-limit");
    apply::<Deployment>(
        &client,
        &ns,
        deployment("hub", pod(None, &format!("{limited}/library/app:v1"))),
    )
    .await;
    let labels = format!("registry=\"{limited}\"");
    let left = support::eventually(Duration::from_secs(30), || async {
        support::metric_with(&op.addr, "pullkeeper_registry_ratelimit_remaining", &labels)
            .await
            .filter(|n| *n > 0.0)
    })
    .await;
    assert_eq!(left, Some(42.0), "{}", metrics_text(&op.addr).await);
    let m = metrics_text(&op.addr).await;
    assert!(series(&m, &ns).is_empty(), "it pulls: {m}");
    delete(&client, &credential).await;
    drop(op);
    support::delete_namespace(&client, &ns).await;
}

/// A pull Secret pullkeeper rewrites (here once its source's password is fixed) has the
/// workloads that use it checked again within seconds, an hour from the next full round.
#[tokio::test]
async fn a_rewritten_pull_secret_has_its_workloads_checked_again_soon() {
    let (reg, client, shard, ns) = with_pull_secret("wlc-rewrite").await;
    let credential = credential(&client, reg, &shard, &ns, &[&ns]).await;
    apply::<Secret>(&client, &ns, login(reg, "not-the-password")).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let op = hourly(&shard, dir.path(), "workload-checks-rewrite");
    support::wait_service_account_has(&client, &ns, &format!("pullkeeper-{credential}")).await;
    let demo = format!("{}/demo:v1", reg.addr);
    apply::<Deployment>(&client, &ns, deployment("app", pod(None, &demo))).await;
    let want = BTreeSet::from([row("Deployment/app", "app", "Unauthorized")]);
    wait_series(&op, &ns, &want, 30).await;
    apply::<Secret>(&client, &ns, login(reg, &reg.password)).await;
    wait_series(&op, &ns, &BTreeSet::new(), 20).await;
    let log = op.log_text();
    assert!(!log.contains(&reg.password) && !log.contains("not-the-password"));
    delete(&client, &credential).await;
    drop(op);
    support::delete_namespace(&client, &ns).await;
}

/// A team's own RegistryCredential: the workloads of its namespace are checked, and its
/// status gets the summary.
#[tokio::test]
async fn a_registry_credentials_namespace_is_checked_and_its_status_summed_up() {
    let (reg, client, shard, ns) = with_pull_secret("wlc-team").await;
    apply::<Secret>(&client, &ns, login(reg, &reg.password)).await;
    let name = support::unique("team");
    support::apply_namespaced(
        &client,
        &ns,
        &name,
        json!({SHARD_LABEL: shard}),
        json!({"registry": reg.addr, "provider": {"basic": {"secretRef": {"name": "login"}}}}),
    )
    .await
    .expect("RegistryCredential applied");
    let dir = tempfile::tempdir().expect("tempdir");
    let op = hourly(&shard, dir.path(), "workload-checks-team");
    support::wait_service_account_has(&client, &ns, &format!("pullkeeper-{name}")).await;
    let r = &reg.addr;
    apply::<Deployment>(&client, &ns, deployment("ok", pod(None, &format!("{r}/demo:v1")))).await;
    apply::<Deployment>(
        &client,
        &ns,
        deployment("missing", pod(None, &format!("{r}/demo:gone"))),
    )
    .await;
    let summary = support::eventually(Duration::from_secs(30), || async {
        let s = support::namespaced_status(&client, &ns, &name).await?.workloads?;
        (s.images == 2).then_some(s)
    })
    .await;
    let status = support::namespaced_status(&client, &ns, &name).await;
    let summary = summary.unwrap_or_else(|| panic!("{status:?}\n{}", tail(&op.log_text())));
    assert_eq!(summary.unpullable, 1, "{summary:?}");
    assert_eq!(summary.examples[0].name, "missing", "{summary:?}");
    assert_eq!(
        series(&metrics_text(&op.addr).await, &ns),
        BTreeSet::from([row("Deployment/missing", "app", "NotFound")])
    );
    let _ = Api::<pullkeeper::crd::RegistryCredential>::namespaced(client.clone(), &ns)
        .delete(&name, &kube::api::DeleteParams::default())
        .await;
    support::eventually(Duration::from_secs(30), || async {
        support::namespaced_status(&client, &ns, &name)
            .await
            .is_none()
            .then_some(())
    })
    .await;
    drop(op);
    support::delete_namespace(&client, &ns).await;
}

/// Every kind the watches hold is checked: StatefulSets, DaemonSets, Jobs and bare Pods,
/// each once (the Pods a Deployment made are not reported again).
#[tokio::test]
async fn every_kind_is_checked_once() {
    use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
    use k8s_openapi::api::batch::v1::Job;
    use k8s_openapi::api::core::v1::Pod;
    let (reg, client, shard, ns) = with_pull_secret("wlc-kinds").await;
    let credential = credential(&client, reg, &shard, &ns, &[&ns]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let op = hourly(&shard, dir.path(), "workload-checks-kinds");
    let missing = format!("{}/demo:no-such-tag", reg.addr);
    let spec = pod(Some("pull"), &missing);
    let template = |name: &str| json!({"metadata": {"labels": {"app": name}}, "spec": spec.clone()});
    let selector = |name: &str| json!({"matchLabels": {"app": name}});
    apply::<StatefulSet>(
        &client,
        &ns,
        json!({"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "db"},
        "spec": {"serviceName": "db", "selector": selector("db"), "template": template("db")}}),
    )
    .await;
    apply::<DaemonSet>(
        &client,
        &ns,
        json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "agent"},
        "spec": {"selector": selector("agent"), "template": template("agent")}}),
    )
    .await;
    let mut job = spec.clone();
    job["restartPolicy"] = json!("Never");
    apply::<Job>(
        &client,
        &ns,
        json!({"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once"},
        "spec": {"template": {"spec": job}}}),
    )
    .await;
    apply::<Pod>(
        &client,
        &ns,
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "debug"}, "spec": spec}),
    )
    .await;
    apply::<Deployment>(&client, &ns, deployment("web", pod(Some("pull"), &missing))).await;
    let want = BTreeSet::from([
        row("DaemonSet/agent", "app", "NotFound"),
        row("Deployment/web", "app", "NotFound"),
        row("Job/once", "app", "NotFound"),
        row("Pod/debug", "app", "NotFound"),
        row("StatefulSet/db", "app", "NotFound"),
    ]);
    wait_series(&op, &ns, &want, 30).await;
    // The Pods the Deployment's ReplicaSet and the Job made (Pending: no node) stay unreported.
    let made = support::eventually(Duration::from_secs(30), || async {
        let pods = Api::<Pod>::namespaced(client.clone(), &ns)
            .list(&ListParams::default())
            .await
            .ok()?;
        (pods.items.len() >= 3).then_some(())
    })
    .await;
    assert!(made.is_some(), "the controllers made no Pods");
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(series(&metrics_text(&op.addr).await, &ns), want);
    delete(&client, &credential).await;
    drop(op);
    support::delete_namespace(&client, &ns).await;
}
