//! Shared clusters: what one credential writes is its own (kind, namespace and name), a
//! tenant's edit of its copy never spreads, and every name the API accepts works.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use pullkeeper::crd::{ClusterRegistryCredential, RegistryCredential};
use serde_json::{Value, json};

use crate::support::start;
use crate::support::{self, SHARD_LABEL, eventually};

const REGISTRY: &str = "registry.example.com";

/// A client acting as `user`, who holds only a Role in `namespace`: manage
/// RegistryCredentials and Secrets there, nothing else.
async fn tenant(admin: &Client, namespace: &str, user: &str) -> Client {
    let role: Role = serde_json::from_value(json!({
        "metadata": {"name": "tenant", "namespace": namespace},
        "rules": [
            {"apiGroups": ["pullkeeper.io"], "resources": ["registrycredentials"], "verbs": ["*"]},
            {"apiGroups": [""], "resources": ["secrets", "serviceaccounts"], "verbs": ["*"]}
        ]
    }))
    .expect("role");
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "tenant", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tenant"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}]
    }))
    .expect("binding");
    Api::<Role>::namespaced(admin.clone(), namespace)
        .create(&PostParams::default(), &role)
        .await
        .expect("role created");
    Api::<RoleBinding>::namespaced(admin.clone(), namespace)
        .create(&PostParams::default(), &binding)
        .await
        .expect("binding created");
    let kc = kube::config::Kubeconfig::read_from(&support::env().kubeconfig).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
        .await
        .expect("config");
    config.auth_info.impersonate = Some(user.to_owned());
    let client = Client::try_from(config).expect("tenant client");
    // The apiserver's authorizer learns of the binding from its own watch: wait until the
    // tenant's rights are in effect (a 403 right after creating them was seen once).
    let in_effect = eventually(Duration::from_secs(30), || async {
        let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
        secrets.list(&ListParams::default().limit(1)).await.ok().map(|_| ())
    })
    .await;
    assert!(
        in_effect.is_some(),
        "the tenant's Role in {namespace} never took effect"
    );
    client
}

/// Applies a RegistryCredential as `client` (a tenant).
async fn apply_namespaced(client: &Client, ns: &str, name: &str, labels: Value, spec: Value) {
    Api::<RegistryCredential>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::apply("tenant").force(),
            &Patch::Apply(json!({
                "apiVersion": "pullkeeper.io/v1alpha1", "kind": "RegistryCredential",
                "metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": spec,
            })),
        )
        .await
        .expect("RegistryCredential applied by the tenant");
}

async fn sa_has(client: &Client, ns: &str, secret: &str) -> bool {
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .get_opt("default")
        .await
        .ok()
        .flatten()
        .and_then(|sa| sa.image_pull_secrets)
        .is_some_and(|l| l.iter().any(|r| r.name == secret))
}

#[tokio::test]
async fn same_named_credentials_in_two_namespaces_keep_their_own_secrets_across_restarts() {
    let env = support::env();
    let admin = support::client().await;
    let shard = support::unique("tenancy");
    let a = support::namespace(&admin, "team-a", &[]).await;
    let b = support::namespace(&admin, "team-b", &[]).await;
    let name = "registry";
    let secret = format!("pullkeeper-{name}");
    for (ns, user, password) in [(&a, "alice", "password-of-a"), (&b, "bob", "password-of-b")] {
        let client = tenant(&admin, ns, user).await;
        support::put_secret(&client, ns, "login", json!({"username": user, "password": password})).await;
        apply_namespaced(
            &client,
            ns,
            name,
            json!({SHARD_LABEL: shard}),
            json!({"registry": REGISTRY, "provider": {"basic": {"secretRef": {"name": "login"}}}}),
        )
        .await;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    // The operator runs as the chart's ServiceAccount, with its RBAC and admission policies.
    let home = support::namespace(&admin, "tenancy-home", &[]).await;
    let kubeconfig = support::chart_identity(&env.kubeconfig, &shard, &home, dir.path(), &[]).await;
    let mut uids = None;
    for round in 0..5 {
        let op = start(&kubeconfig, &shard, &[], dir.path(), &format!("round-{round}"));
        let log = || std::fs::read_to_string(&op.log).unwrap_or_default();
        let both = eventually(Duration::from_secs(30), || async {
            let wa = support::written(&admin, &a, &secret, REGISTRY).await?;
            let wb = support::written(&admin, &b, &secret, REGISTRY).await?;
            let ok = wa.0 == "password-of-a"
                && wb.0 == "password-of-b"
                && sa_has(&admin, &a, &secret).await
                && sa_has(&admin, &b, &secret).await;
            ok.then_some((wa.1, wb.1))
        })
        .await;
        let both = both.unwrap_or_else(|| {
            panic!(
                "round {round}: each tenant does not hold its own secret; log: {}",
                log()
            )
        });
        // Let the operator settle, then check nothing was deleted and recreated meanwhile.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let again = (
            support::written(&admin, &a, &secret, REGISTRY).await.map(|w| w.1),
            support::written(&admin, &b, &secret, REGISTRY).await.map(|w| w.1),
        );
        assert_eq!(
            again,
            (Some(both.0.clone()), Some(both.1.clone())),
            "round {round}: a Secret was replaced"
        );
        match &uids {
            None => uids = Some(both),
            Some(first) => assert_eq!(first, &both, "round {round}: Secrets were recreated across restarts"),
        }
        drop(op);
    }
    // Each namespaced Secret is owned by its own credential.
    for ns in [&a, &b] {
        let s = Api::<Secret>::namespaced(admin.clone(), ns)
            .get(&secret)
            .await
            .expect("secret");
        let cred = Api::<RegistryCredential>::namespaced(admin.clone(), ns)
            .get(name)
            .await
            .expect("cred");
        let refs = s.owner_references();
        assert_eq!(refs.len(), 1, "{refs:?}");
        assert_eq!(Some(refs[0].uid.clone()), cred.uid());
    }
    // Deleting one leaves the other's Secret and ServiceAccount entry alone.
    let op = start(&kubeconfig, &shard, &[], dir.path(), "delete");
    Api::<RegistryCredential>::namespaced(admin.clone(), &a)
        .delete(name, &DeleteParams::default())
        .await
        .expect("delete");
    let gone = eventually(Duration::from_secs(30), || async {
        support::written(&admin, &a, &secret, REGISTRY)
            .await
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "log: {}",
        std::fs::read_to_string(&op.log).unwrap_or_default()
    );
    assert_eq!(
        support::written(&admin, &b, &secret, REGISTRY)
            .await
            .map(|w| w.0)
            .as_deref(),
        Some("password-of-b")
    );
    assert!(sa_has(&admin, &b, &secret).await && !sa_has(&admin, &a, &secret).await);
    let _ = Api::<RegistryCredential>::namespaced(admin.clone(), &b)
        .delete(name, &DeleteParams::default())
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_tenants_edit_of_its_copy_spreads_nowhere_after_a_restart() {
    use crate::fakes::{self, Behaviour};
    let env = support::env();
    let admin = support::client().await;
    let f = fakes::fakes();
    let id = support::unique("edit");
    f.set(&id, Behaviour::ok(3600));
    let shard = support::unique("edit");
    let registry = "europe-docker.pkg.dev";
    let mallory = support::namespace(&admin, "mallory", &[("e2e-target", &shard)]).await;
    let other = support::namespace(&admin, "victim", &[("e2e-target", &shard)]).await;
    let name = support::unique("edit");
    let secret = format!("pullkeeper-{name}");
    support::apply_credential(
        &admin,
        &name,
        json!({SHARD_LABEL: shard}),
        json!({
            "registry": registry,
            "provider": {"gcp": {"metadataUrl": format!("{}/meta/{id}", f.base)}},
            "target": {"namespaceSelector": {"matchLabels": {"e2e-target": shard}}}
        }),
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let home = support::namespace(&admin, "edit-home", &[]).await;
    let kubeconfig = support::chart_identity(&env.kubeconfig, &shard, &home, dir.path(), &[]).await;
    let first = start(&kubeconfig, &shard, &[], dir.path(), "first");
    let token = eventually(Duration::from_secs(30), || async {
        let (t1, _) = support::written(&admin, &mallory, &secret, registry).await?;
        let (t2, _) = support::written(&admin, &other, &secret, registry).await?;
        (t1 == t2).then_some(t1)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "not written; log: {}",
            std::fs::read_to_string(&first.log).unwrap_or_default()
        )
    });
    let api = Api::<ClusterRegistryCredential>::all(admin.clone());
    eventually(Duration::from_secs(20), || async {
        api.get(&name).await.ok()?.status?.content_hash.map(|_| ())
    })
    .await
    .expect("status with contentHash");
    drop(first);

    // While the operator is down, the tenant of one namespace rewrites its copy (keeping
    // the labels and annotations, so it still looks like pullkeeper's).
    let tenant = tenant(&admin, &mallory, "mallory").await;
    let forged = json!({"auths": {registry: {"username": "oauth2accesstoken", "password": "forged-by-mallory",
        "auth": "b2F1dGgyYWNjZXNzdG9rZW46Zm9yZ2VkLWJ5LW1hbGxvcnk="}}});
    let mut copy = Api::<Secret>::namespaced(tenant.clone(), &mallory)
        .get(&secret)
        .await
        .expect("copy");
    copy.metadata.managed_fields = None;
    copy.data = Some(
        [(
            ".dockerconfigjson".to_owned(),
            k8s_openapi::ByteString(forged.to_string().into_bytes()),
        )]
        .into(),
    );
    Api::<Secret>::namespaced(tenant.clone(), &mallory)
        .replace(&secret, &PostParams::default(), &copy)
        .await
        .expect("the tenant edits its copy");
    // Make the forged copy the likeliest to be picked: the other copy is deleted.
    Api::<Secret>::namespaced(admin.clone(), &other)
        .delete(&secret, &DeleteParams::default())
        .await
        .expect("delete the other copy");

    let second = start(&kubeconfig, &shard, &[], dir.path(), "second");
    let late = support::namespace(&admin, "late", &[("e2e-target", &shard)]).await;
    let settled = eventually(Duration::from_secs(30), || async {
        let (a, _) = support::written(&admin, &mallory, &secret, registry).await?;
        let (b, _) = support::written(&admin, &other, &secret, registry).await?;
        let (c, _) = support::written(&admin, &late, &secret, registry).await?;
        (a == b && b == c && a != "forged-by-mallory").then_some(a)
    })
    .await;
    let log = std::fs::read_to_string(&second.log).unwrap_or_default();
    let settled = settled.unwrap_or_else(|| panic!("copies did not converge; log: {log}"));
    assert_ne!(settled, "forged-by-mallory");
    // The forged copy was not trusted, so a new token was minted.
    assert_ne!(settled, token, "an unverifiable copy was reused");
    assert_eq!(f.issued(&id), 2, "expected exactly one new mint after the restart");
    assert!(log.contains("does not match the digest"), "log: {log}");
    let _ = api.delete(&name, &DeleteParams::default()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// A DNS-subdomain name of exactly `len` characters starting with a unique prefix, in
/// dot-separated parts of at most 50 characters.
fn long_name(prefix: &str, len: usize) -> String {
    let mut name = support::unique(prefix);
    while name.len() < len {
        name.push(if name.len().is_multiple_of(50) { '.' } else { 'x' });
    }
    if name.ends_with('.') {
        name.pop();
        name.push('x');
    }
    name
}

#[tokio::test]
async fn names_of_64_to_253_characters_sync_and_delete() {
    support::env();
    let client = support::client().await;
    let src = support::namespace(&client, "long-src", &[]).await;
    let label = support::unique("long");
    let ns = support::namespace(&client, "long", &[("e2e-target", &label)]).await;
    support::put_secret(
        &client,
        &src,
        "login",
        json!({"username": "u", "password": "long-names"}),
    )
    .await;
    for len in [64, 200, 253] {
        let name = long_name("long", len);
        assert_eq!(name.len(), len);
        support::apply_credential(
            &client,
            &name,
            json!({}),
            json!({
                "registry": REGISTRY,
                "provider": {"basic": {"secretRef": {"name": "login", "namespace": src}}},
                "target": {"namespaceSelector": {"matchLabels": {"e2e-target": label}}}
            }),
        )
        .await;
        support::wait_ready(&client, &name, "True", "Synced").await;
        let secrets = Api::<Secret>::namespaced(client.clone(), &ns)
            .list(&Default::default())
            .await
            .expect("list");
        let ours: Vec<_> = secrets
            .items
            .iter()
            .filter(|s| s.annotations().get("pullkeeper.io/credential") == Some(&name))
            .collect();
        assert_eq!(ours.len(), 1, "length {len}: no Secret written");
        let s = ours[0];
        assert!(s.name_any().len() <= 253);
        assert!(s.labels().values().all(|v| v.len() <= 63), "{:?}", s.labels());
        assert!(
            sa_has(&client, &ns, &s.name_any()).await,
            "length {len}: no ServiceAccount entry"
        );
        let secret_name = s.name_any();
        support::delete_credential(&client, &name).await;
        let gone = eventually(Duration::from_secs(30), || async {
            let cred = Api::<ClusterRegistryCredential>::all(client.clone())
                .get_opt(&name)
                .await
                .ok()?;
            let secret = Api::<Secret>::namespaced(client.clone(), &ns)
                .get_opt(&secret_name)
                .await
                .ok()?;
            (cred.is_none() && secret.is_none()).then_some(())
        })
        .await;
        assert!(gone.is_some(), "length {len}: deletion did not complete");
        assert!(!sa_has(&client, &ns, &secret_name).await);
    }
    // The namespaced kind, written by a tenant.
    let team = support::namespace(&client, "long-team", &[]).await;
    let tenant = tenant(&client, &team, "long-team-user").await;
    support::put_secret(
        &tenant,
        &team,
        "login",
        json!({"username": "u", "password": "long-names"}),
    )
    .await;
    let name = long_name("long", 253);
    apply_namespaced(
        &tenant,
        &team,
        &name,
        json!({}),
        json!({"registry": REGISTRY, "provider": {"basic": {"secretRef": {"name": "login"}}}}),
    )
    .await;
    let api = Api::<RegistryCredential>::namespaced(tenant.clone(), &team);
    support::wait_namespaced_ready(&tenant, &team, &name, "True", "Synced", String::new).await;
    api.delete(&name, &DeleteParams::default()).await.expect("delete");
    let gone = eventually(Duration::from_secs(30), || async {
        let none = api.get_opt(&name).await.ok()?.is_none();
        let left = Api::<Secret>::namespaced(client.clone(), &team)
            .list(&Default::default())
            .await
            .ok()?
            .items
            .into_iter()
            .filter(|s| s.annotations().contains_key("pullkeeper.io/credential"))
            .count();
        (none && left == 0).then_some(())
    })
    .await;
    assert!(gone.is_some(), "the namespaced credential's deletion did not complete");
}
