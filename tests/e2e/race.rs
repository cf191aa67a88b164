//! The pod-before-secret race, on the real node: a namespace is created and a Deployment
//! applied into it at once, with no sleeps. The ReplicaSet's pod is admitted the moment
//! the namespace's `default` ServiceAccount exists, usually before pullkeeper has patched
//! that ServiceAccount; without the admission policy such a pod keeps an empty
//! `imagePullSecrets` for the rest of its life.

use std::time::{Duration, Instant};

use kube::Client;
use serde_json::json;

use crate::support::{self, PodOutcome, SHARD_LABEL};

/// How many namespaces (one Deployment each) a run creates.
const ROUNDS: usize = 20;

/// Runs the race with an operator process of its own (pod admission on or off) and
/// returns, per namespace, whether its pod was Running within 90 s, and the pods'
/// `imagePullSecrets` at admission.
async fn race(admission: bool) -> Vec<(String, bool, Vec<String>)> {
    let env = support::env();
    let client = support::client().await;
    let reg = support::registry();
    let image = support::push_runnable_image(&reg.addr, &reg.user, &reg.password, "race/app:v1", None);
    let shard = support::unique("race");
    let src = support::namespace(&client, "race-src", &[]).await;
    support::put_secret(
        &client,
        &src,
        "login",
        json!({"username": reg.user, "password": reg.password}),
    )
    .await;
    let name = support::unique("race");
    support::apply_credential(
        &client,
        &name,
        json!({SHARD_LABEL: shard}),
        json!({
            "registry": reg.addr,
            "provider": {"basic": {"secretRef": {"name": "login", "namespace": src}}},
            "target": {"namespaceSelector": {"matchLabels": {"e2e-race": shard}}}
        }),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let on = if admission { "true" } else { "false" };
    let op = support::start(
        &env.kubeconfig,
        &shard,
        &[("PULLKEEPER_POD_ADMISSION_POLICY", on)],
        dir.path(),
        "race",
    );
    // The credential is bound before the race starts (with admission on).
    let ready = support::eventually(Duration::from_secs(30), || async {
        let s = support::credential_status(&client, &name).await?;
        let want = if admission { "True" } else { "False" };
        s.conditions
            .iter()
            .any(|c| c.type_ == "PodAdmission" && c.status == want)
            .then_some(())
    })
    .await;
    assert!(ready.is_some(), "PodAdmission; log: {}", op.log_text());
    if admission {
        // The apiserver applies a new binding a moment after it is written.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    let mut namespaces = Vec::new();
    for _ in 0..ROUNDS {
        let ns = support::namespace(&client, "race", &[("e2e-race", &shard)]).await;
        support::deploy(&client, &ns, "app", &image, "Always").await;
        namespaces.push(ns);
    }
    let started = Instant::now();
    let mut results = Vec::new();
    for ns in &namespaces {
        let left = Duration::from_secs(90).saturating_sub(started.elapsed());
        let running = wait_running_within(&client, ns, left.max(Duration::from_secs(1))).await;
        results.push((ns.clone(), running, pull_secrets(&client, ns).await));
    }
    support::delete_credential(&client, &name).await;
    for ns in &namespaces {
        support::delete_namespace(&client, ns).await;
    }
    drop(op);
    results
}

async fn wait_running_within(client: &Client, ns: &str, timeout: Duration) -> bool {
    let got = support::eventually(timeout, || async {
        match support::current_outcome(client, ns, "app").await {
            Some(PodOutcome::Running { .. }) => Some(()),
            _ => None,
        }
    })
    .await;
    got.is_some()
}

async fn pull_secrets(client: &Client, ns: &str) -> Vec<String> {
    kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), ns)
        .list(&kube::api::ListParams::default().labels("app=app"))
        .await
        .map(|l| {
            l.items
                .into_iter()
                .flat_map(|p| p.spec.and_then(|s| s.image_pull_secrets).unwrap_or_default())
                .map(|r| r.name)
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn pods_created_before_their_service_account_has_the_secret_still_pull() {
    let results = race(true).await;
    let failed: Vec<_> = results.iter().filter(|(_, running, _)| !running).collect();
    assert!(
        failed.is_empty(),
        "{} of {ROUNDS} pods did not run within 90 s: {failed:?}",
        failed.len()
    );
}

/// The same race without the admission policy, for comparison (not part of the suite:
/// it documents the failure the policy prevents). Run with
/// `cargo test --test e2e race::without -- --ignored --nocapture`.
#[tokio::test]
#[ignore = "measures the failure the admission policy prevents"]
async fn without_pod_admission_the_race_is_lost() {
    let results = race(false).await;
    let failed = results.iter().filter(|(_, running, _)| !running).count();
    let empty = results.iter().filter(|(_, _, secrets)| secrets.is_empty()).count();
    println!(
        "admission off: {failed} of {ROUNDS} pods not Running within 90 s; {empty} admitted with no imagePullSecrets"
    );
}
