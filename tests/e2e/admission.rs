//! Race-free pods: the MutatingAdmissionPolicy route appends a credential's pull secret to
//! new Pods of the ServiceAccounts it targets, and only to those.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use pullkeeper::crd::{ClusterRegistryCredential, RegistryCredential};
use serde_json::json;

use crate::support::{self, eventually};

/// Creates a Pod (it never runs: there is no node here) and returns the names in its
/// `imagePullSecrets` as admitted.
pub(crate) async fn admitted(client: &Client, ns: &str, sa: Option<&str>, own: &[&str]) -> Vec<String> {
    // The ServiceAccount admission plugin refuses Pods whose ServiceAccount does not exist yet.
    let sa_name = sa.unwrap_or("default");
    eventually(Duration::from_secs(30), || async {
        Api::<ServiceAccount>::namespaced(client.clone(), ns)
            .get_opt(sa_name)
            .await
            .ok()?
            .map(|_| ())
    })
    .await
    .expect("ServiceAccount exists");
    let mut spec = json!({
        "containers": [{"name": "c", "image": "registry.example.com/app:1"}],
    });
    if let Some(sa) = sa {
        spec["serviceAccountName"] = json!(sa);
    }
    if !own.is_empty() {
        spec["imagePullSecrets"] = json!(own.iter().map(|n| json!({"name": n})).collect::<Vec<_>>());
    }
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"generateName": "p-", "namespace": ns},
        "spec": spec,
    }))
    .expect("pod");
    let pod = Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .expect("pod created");
    pod.spec
        .and_then(|s| s.image_pull_secrets)
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.name)
        .collect()
}

/// Like [`admitted`], retried for a few seconds until `expected` comes out: the apiserver
/// applies a new policy, binding or namespace annotation a moment after it is written.
async fn admitted_eventually(client: &Client, ns: &str, sa: Option<&str>, own: &[&str], expected: &[String]) {
    let mut last = Vec::new();
    for _ in 0..40 {
        last = admitted(client, ns, sa, own).await;
        if last == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("admitted with {last:?}, expected {expected:?}");
}

/// A ClusterRegistryCredential spec reading `login` from `src`, targeting namespaces
/// labelled `e2e-target=label` and the ServiceAccounts `default` and `builder`.
pub(crate) fn spec(src: &str, label: &str) -> serde_json::Value {
    json!({
        "registry": "registry.example.com",
        "provider": {"basic": {"secretRef": {"name": "login", "namespace": src}}},
        "target": {
            "namespaceSelector": {"matchLabels": {"e2e-target": label}},
            "serviceAccounts": ["default", "builder"],
        }
    })
}

/// Annotates a namespace `pullkeeper.io/exclude: "true"`.
pub(crate) async fn exclude(client: &Client, ns: &str) {
    Api::<Namespace>::all(client.clone())
        .patch(
            ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"pullkeeper.io/exclude": "true"}}})),
        )
        .await
        .expect("annotate");
}

/// Waits until the credential reports the policy bound.
async fn wait_bound(client: &Client, name: &str) {
    let ok = eventually(Duration::from_secs(30), || async {
        let s = support::credential_status(client, name).await?;
        s.conditions
            .iter()
            .any(|c| c.type_ == "PodAdmission" && c.status == "True")
            .then_some(())
    })
    .await;
    assert!(
        ok.is_some(),
        "PodAdmission never True: {:?}",
        support::credential_status(client, name).await
    );
}

#[tokio::test]
async fn new_pods_of_targeted_service_accounts_get_the_secret_appended() {
    support::env();
    let client = support::client().await;
    let label = support::unique("adm");
    let src = support::namespace(&client, "adm-src", &[]).await;
    support::put_secret(&client, &src, "login", json!({"username": "u", "password": "p"})).await;
    let targeted = support::namespace(&client, "adm", &[("e2e-target", &label)]).await;
    let other = support::namespace(&client, "adm-other", &[]).await;
    let name = support::unique("adm");
    let secret = format!("pullkeeper-{name}");
    support::apply_credential(&client, &name, json!({}), spec(&src, &label)).await;
    wait_bound(&client, &name).await;

    // A Pod with its own list (so the ServiceAccount's is not copied): ours is appended
    // after the Pod's own entries, which stay as they are.
    admitted_eventually(
        &client,
        &targeted,
        None,
        &["theirs"],
        &["theirs".to_owned(), secret.clone()],
    )
    .await;
    // A Pod without a list gets ours (from the ServiceAccount or from the policy), once.
    let got = admitted(&client, &targeted, None, &[]).await;
    assert_eq!(got, vec![secret.clone()]);
    // Another targeted ServiceAccount, created just now.
    support::service_account(&client, &targeted, "builder").await;
    assert_eq!(
        admitted(&client, &targeted, Some("builder"), &["x"]).await,
        vec!["x".to_owned(), secret.clone()]
    );
    // A ServiceAccount the credential does not target, and a namespace it does not target.
    support::service_account(&client, &targeted, "runner").await;
    assert_eq!(
        admitted(&client, &targeted, Some("runner"), &["x"]).await,
        vec!["x".to_owned()]
    );
    assert_eq!(admitted(&client, &other, None, &["x"]).await, vec!["x".to_owned()]);
    // A targeted namespace annotated pullkeeper.io/exclude.
    exclude(&client, &targeted).await;
    admitted_eventually(&client, &targeted, None, &["x"], &["x".to_owned()]).await;

    // A namespace created later is supplied too.
    let ns2 = support::namespace(&client, "adm", &[("e2e-target", &label)]).await;
    admitted_eventually(&client, &ns2, None, &["x"], &["x".to_owned(), secret.clone()]).await;
    // Suspended: new Pods are left alone; resumed: supplied again.
    let credentials = Api::<ClusterRegistryCredential>::all(client.clone());
    for (suspend, expected) in [
        (true, vec!["x".to_owned()]),
        (false, vec!["x".to_owned(), secret.clone()]),
    ] {
        credentials
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"suspend": suspend}})),
            )
            .await
            .expect("suspend");
        admitted_eventually(&client, &ns2, None, &["x"], &expected).await;
    }
    credentials
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete");
    // Deleted: the binding goes with it, new Pods are left alone.
    eventually(Duration::from_secs(30), || async {
        support::credential_status(&client, &name).await.is_none().then_some(())
    })
    .await
    .expect("credential gone");
    admitted_eventually(&client, &ns2, None, &["x"], &["x".to_owned()]).await;
}

#[tokio::test]
async fn a_namespaced_credential_supplies_pods_of_its_own_namespace_only() {
    support::env();
    let client = support::client().await;
    let ns = support::namespace(&client, "adm-team", &[]).await;
    let neighbour = support::namespace(&client, "adm-neighbour", &[]).await;
    support::put_secret(&client, &ns, "login", json!({"username": "u", "password": "p"})).await;
    let name = "registry";
    Api::<RegistryCredential>::namespaced(client.clone(), &ns)
        .patch(
            name,
            &PatchParams::apply("e2e-user").force(),
            &Patch::Apply(json!({
                "apiVersion": "pullkeeper.io/v1alpha1", "kind": "RegistryCredential",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"registry": "registry.example.com", "provider": {"basic": {"secretRef": {"name": "login"}}}},
            })),
        )
        .await
        .expect("applied");
    let api = Api::<RegistryCredential>::namespaced(client.clone(), &ns);
    let bound = eventually(Duration::from_secs(30), || async {
        api.get(name)
            .await
            .ok()?
            .status?
            .conditions
            .iter()
            .any(|c| c.type_ == "PodAdmission" && c.status == "True")
            .then_some(())
    })
    .await;
    assert!(bound.is_some(), "{:?}", api.get(name).await.ok().and_then(|c| c.status));
    admitted_eventually(
        &client,
        &ns,
        None,
        &["x"],
        &["x".to_owned(), "pullkeeper-registry".to_owned()],
    )
    .await;
    assert_eq!(admitted(&client, &neighbour, None, &["x"]).await, vec!["x".to_owned()]);
    // `pullkeeper.io/exclude` opts a namespace out of cluster credentials only: its own
    // credential keeps supplying its Pods (as it keeps writing its Secret).
    exclude(&client, &ns).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        admitted(&client, &ns, None, &["x"]).await,
        vec!["x".to_owned(), "pullkeeper-registry".to_owned()]
    );
    let _ = api.delete(name, &DeleteParams::default()).await;
}
