//! Operator processes started by the tests themselves: leader election with two replicas,
//! and least privilege (the operator running with only the Helm chart's RBAC and
//! admission policies).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::DeleteParams;
use kube::{Api, Client};
use pullkeeper::crd::ClusterRegistryCredential;
use serde_json::{Value, json};

use crate::support::{self, SHARD_LABEL, eventually, metric, start};

async fn basic_setup(client: &Client, shard: &str, prefix: &str) -> (String, String, String) {
    let src = support::namespace(client, &format!("{prefix}-src"), &[]).await;
    let ns = support::namespace(client, prefix, &[("e2e-target", shard)]).await;
    put_password(client, &src, "first-password").await;
    let name = support::unique(prefix);
    support::apply_credential(
        client,
        &name,
        json!({SHARD_LABEL: shard}),
        json!({
            "registry": "registry.example.com",
            "provider": {"basic": {"secretRef": {"name": "login", "namespace": src}}},
            "target": {"namespaceSelector": {"matchLabels": {"e2e-target": shard}}}
        }),
    )
    .await;
    (src, ns, name)
}

async fn put_password(client: &Client, src: &str, password: &str) {
    support::put_secret(client, src, "login", json!({"username": "robot", "password": password})).await;
}

async fn written_password(client: &Client, ns: &str, name: &str) -> Option<String> {
    let s = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(&format!("pullkeeper-{name}"))
        .await
        .ok()??;
    let v: Value = serde_json::from_slice(&s.data?.get(".dockerconfigjson")?.0).ok()?;
    v["auths"]["registry.example.com"]["password"]
        .as_str()
        .map(str::to_owned)
}

#[tokio::test]
async fn two_replicas_elect_one_leader_and_hand_over_when_it_dies() {
    let env = support::env();
    let client = support::client().await;
    let shard = support::unique("ha");
    let lease_ns = support::namespace(&client, "lease", &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let le = [
        ("PULLKEEPER_LEADER_ELECT", "true"),
        ("POD_NAMESPACE", lease_ns.as_str()),
        ("PULLKEEPER_LEADER_ELECTION_ID", shard.as_str()),
        ("PULLKEEPER_LEASE_DURATION_SECONDS", "4"),
        ("PULLKEEPER_LEASE_RENEW_SECONDS", "1"),
    ];
    let a = start(&env.kubeconfig, &shard, &le, dir.path(), "replica-a");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let b = start(&env.kubeconfig, &shard, &le, dir.path(), "replica-b");
    let (src, ns, name) = basic_setup(&client, &shard, "ha").await;
    let ok = eventually(Duration::from_secs(30), || async {
        (written_password(&client, &ns, &name).await.as_deref() == Some("first-password")).then_some(())
    })
    .await;
    assert!(
        ok.is_some(),
        "no replica wrote the secret; log: {}",
        std::fs::read_to_string(&a.log).unwrap_or_default()
    );

    let leases = Api::<Lease>::namespaced(client.clone(), &lease_ns);
    let holder = leases
        .get(&shard)
        .await
        .expect("lease")
        .spec
        .and_then(|s| s.holder_identity);
    let (leader, standby) = match holder.as_deref() {
        Some("replica-a") => (a, b),
        Some("replica-b") => (b, a),
        other => panic!("unexpected lease holder {other:?}"),
    };
    assert_eq!(metric(&leader.addr, "pullkeeper_leader").await, Some(1.0));
    assert_eq!(metric(&standby.addr, "pullkeeper_leader").await, Some(0.0));
    assert_eq!(
        metric(&standby.addr, "pullkeeper_reconciles_total").await,
        Some(0.0),
        "the standby reconciled"
    );

    // Kill the leader without a chance to release the lease: the standby takes over once
    // the lease expires (4 s) and carries on.
    let standby_name = if holder.as_deref() == Some("replica-a") {
        "replica-b"
    } else {
        "replica-a"
    };
    drop(leader);
    let took_over = eventually(Duration::from_secs(15), || async {
        let h = leases.get(&shard).await.ok()?.spec?.holder_identity?;
        (h == standby_name).then_some(())
    })
    .await;
    assert!(took_over.is_some(), "the standby never took the lease");
    put_password(&client, &src, "second-password").await;
    let ok = eventually(Duration::from_secs(20), || async {
        (written_password(&client, &ns, &name).await.as_deref() == Some("second-password")).then_some(())
    })
    .await;
    assert!(
        ok.is_some(),
        "the new leader did not carry on; log: {}",
        std::fs::read_to_string(&standby.log).unwrap_or_default()
    );
    assert_eq!(metric(&standby.addr, "pullkeeper_leader").await, Some(1.0));
    let _ = Api::<ClusterRegistryCredential>::all(client.clone())
        .delete(&name, &DeleteParams::default())
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn the_operator_works_with_only_the_charts_rbac() {
    let env = support::env();
    let client = support::client().await;
    let shard = support::unique("rbac");
    let home = support::namespace(&client, "rbac-home", &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    // The chart's RBAC and its admission policies, both enforced.
    let kubeconfig = support::chart_identity(&env.kubeconfig, &shard, &home, dir.path(), &[]).await;
    let op = start(
        &kubeconfig,
        &shard,
        &[("PULLKEEPER_LEADER_ELECT", "true"), ("POD_NAMESPACE", home.as_str())],
        dir.path(),
        "restricted",
    );
    let (src, ns, name) = basic_setup(&client, &shard, "rbac").await;
    let secret_name = format!("pullkeeper-{name}");
    let log = || std::fs::read_to_string(&op.log).unwrap_or_default();
    let ok = eventually(Duration::from_secs(30), || async {
        (written_password(&client, &ns, &name).await.as_deref() == Some("first-password")).then_some(())
    })
    .await;
    assert!(ok.is_some(), "nothing written; log: {}", log());
    // ServiceAccount patch, drift repair, source watch, Events and cleanup, all as the chart's SA.
    let sa_ok = eventually(Duration::from_secs(20), || async {
        let sa = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), &ns)
            .get_opt("default")
            .await
            .ok()??;
        sa.image_pull_secrets?
            .iter()
            .any(|r| r.name == secret_name)
            .then_some(())
    })
    .await;
    assert!(sa_ok.is_some(), "ServiceAccount not patched; log: {}", log());
    Api::<Secret>::namespaced(client.clone(), &ns)
        .delete(&secret_name, &DeleteParams::default())
        .await
        .expect("hand delete");
    put_password(&client, &src, "second-password").await;
    let ok = eventually(Duration::from_secs(20), || async {
        (written_password(&client, &ns, &name).await.as_deref() == Some("second-password")).then_some(())
    })
    .await;
    assert!(ok.is_some(), "drift or source change not handled; log: {}", log());
    Api::<ClusterRegistryCredential>::all(client.clone())
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete");
    let gone = eventually(Duration::from_secs(20), || async {
        Api::<ClusterRegistryCredential>::all(client.clone())
            .get_opt(&name)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    assert!(gone.is_some(), "finalizer not removed; log: {}", log());
    assert!(
        written_password(&client, &ns, &name).await.is_none(),
        "secret left behind"
    );
    let text = log();
    assert!(
        !text.contains("forbidden") && !text.contains("Forbidden") && !text.contains(" 403"),
        "the chart's RBAC is missing something:\n{text}"
    );
    assert!(metric(&op.addr, "pullkeeper_leader").await == Some(1.0));
}

#[tokio::test]
async fn a_restart_reuses_the_unexpired_token_instead_of_minting_a_new_one() {
    use crate::fakes::{self, Behaviour};
    let env = support::env();
    let client = support::client().await;
    let f = fakes::fakes();
    let id = support::unique("restart");
    f.set(&id, Behaviour::ok(3600));
    let shard = support::unique("restart");
    let ns = support::namespace(&client, "restart", &[("e2e-target", &shard)]).await;
    let name = support::unique("restart");
    support::apply_credential(
        &client,
        &name,
        json!({SHARD_LABEL: shard}),
        json!({
            "registry": "europe-docker.pkg.dev",
            "provider": {"gcp": {"metadataUrl": format!("{}/meta/{id}", f.base)}},
            "target": {"namespaceSelector": {"matchLabels": {"e2e-target": shard}}}
        }),
    )
    .await;
    let token_in = |ns: String| {
        let client = client.clone();
        let name = name.clone();
        async move {
            let s = Api::<Secret>::namespaced(client, &ns)
                .get_opt(&format!("pullkeeper-{name}"))
                .await
                .ok()??;
            let v: Value = serde_json::from_slice(&s.data?.get(".dockerconfigjson")?.0).ok()?;
            v["auths"]["europe-docker.pkg.dev"]["password"]
                .as_str()
                .map(str::to_owned)
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let first = start(&env.kubeconfig, &shard, &[], dir.path(), "first");
    let token = eventually(Duration::from_secs(30), || token_in(ns.clone()))
        .await
        .unwrap_or_else(|| {
            panic!(
                "no token written; log: {}",
                std::fs::read_to_string(&first.log).unwrap_or_default()
            )
        });
    // Let the status (with nextRefreshTime) land before the restart.
    let api = Api::<ClusterRegistryCredential>::all(client.clone());
    eventually(Duration::from_secs(20), || async {
        api.get(&name).await.ok()?.status?.next_refresh_time.map(|_| ())
    })
    .await
    .expect("status");
    assert_eq!(f.issued(&id), 1);
    drop(first);

    let second = start(&env.kubeconfig, &shard, &[], dir.path(), "second");
    // A namespace created after the restart gets the same, still valid token.
    let late = support::namespace(&client, "restart-late", &[("e2e-target", &shard)]).await;
    let again = eventually(Duration::from_secs(30), || token_in(late.clone())).await;
    assert_eq!(
        again.as_deref(),
        Some(token.as_str()),
        "log: {}",
        std::fs::read_to_string(&second.log).unwrap_or_default()
    );
    assert_eq!(f.issued(&id), 1, "the restarted operator minted a new token");
    let _ = api.delete(&name, &DeleteParams::default()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn acr_with_azure_workload_identity_uses_the_federated_token_file() {
    use crate::fakes::{self, Behaviour, Mode};
    let env = support::env();
    let client = support::client().await;
    let f = fakes::fakes();
    let id = support::unique("aksid");
    let dir = tempfile::tempdir().expect("tempdir");
    // What the workload identity webhook projects into the pod.
    let token_file = dir.path().join("azure-identity-token");
    let federated = format!("federated-{id}");
    std::fs::write(&token_file, &federated).expect("token file");
    f.set(
        &id,
        Behaviour {
            mode: Mode::Ok,
            lifetime: 3 * 3600,
            issued: 0,
            client_secret: federated,
            public_key: String::new(),
        },
    );
    let shard = support::unique("aks");
    let ns = support::namespace(&client, "aks", &[("e2e-target", &shard)]).await;
    let name = support::unique("aks");
    let authority = format!("{}/aad/{id}", f.base);
    let op = start(
        &env.kubeconfig,
        &shard,
        &[
            ("AZURE_FEDERATED_TOKEN_FILE", token_file.to_str().expect("path")),
            ("AZURE_TENANT_ID", "contoso-tenant"),
            ("AZURE_CLIENT_ID", "11111111-2222-3333-4444-555555555555"),
            ("AZURE_AUTHORITY_HOST", authority.as_str()),
        ],
        dir.path(),
        "aks",
    );
    support::apply_credential(
        &client,
        &name,
        json!({SHARD_LABEL: shard}),
        json!({
            "registry": "contoso.azurecr.io",
            // Only the exchange endpoint is overridden; identity comes from the environment.
            "provider": {"acr": {"exchangeUrl": format!("{}/acr/{id}/oauth2/exchange", f.base)}},
            "target": {"namespaceSelector": {"matchLabels": {"e2e-target": shard}}}
        }),
    )
    .await;
    let user = eventually(Duration::from_secs(30), || async {
        let s = Api::<Secret>::namespaced(client.clone(), &ns)
            .get_opt(&format!("pullkeeper-{name}"))
            .await
            .ok()??;
        let v: Value = serde_json::from_slice(&s.data?.get(".dockerconfigjson")?.0).ok()?;
        v["auths"]["contoso.azurecr.io"]["username"].as_str().map(str::to_owned)
    })
    .await;
    assert_eq!(
        user.as_deref(),
        Some("00000000-0000-0000-0000-000000000000"),
        "log: {}",
        std::fs::read_to_string(&op.log).unwrap_or_default()
    );
    let _ = Api::<ClusterRegistryCredential>::all(client.clone())
        .delete(&name, &DeleteParams::default())
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
}
