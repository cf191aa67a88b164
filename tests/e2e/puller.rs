//! A real puller (skopeo) reads the Secrets pullkeeper writes and pulls from a real
//! registry with them: the format is proven the way a client reads it.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::DeleteParams;
use pullkeeper::crd::ClusterRegistryCredential;
use serde_json::json;

use crate::support::{self, eventually};

#[tokio::test]
async fn skopeo_pulls_with_the_written_secret() {
    let reg = support::registry();
    support::env();
    let client = support::client().await;
    let src = support::namespace(&client, "pull-src", &[]).await;
    let label = support::unique("pull");
    let ns = support::namespace(&client, "pull", &[("e2e-target", &label)]).await;
    let put_source = |password: String| {
        let (client, src) = (&client, &src);
        async move {
            support::put_secret(
                client,
                src,
                "login",
                json!({"username": reg.user, "password": password}),
            )
            .await;
        }
    };
    put_source(reg.password.clone()).await;
    let name = support::unique("pull");
    support::apply_credential(
        &client,
        &name,
        json!({}),
        json!({
            "registry": reg.addr,
            "provider": {"basic": {"secretRef": {"name": "login", "namespace": src}}},
            "target": {"namespaceSelector": {"matchLabels": {"e2e-target": label}}}
        }),
    )
    .await;
    let secrets = Api::<Secret>::namespaced(client.clone(), &ns);
    let secret_name = format!("pullkeeper-{name}");
    let dir = tempfile::tempdir().expect("tempdir");
    let authfile = dir.path().join("auth.json");
    let image = format!("{}/demo:v1", reg.addr);

    let pulled = eventually(Duration::from_secs(20), || async {
        let s = secrets.get_opt(&secret_name).await.ok()??;
        let raw = s.data?.get(".dockerconfigjson")?.0.clone();
        std::fs::write(&authfile, raw).ok()?;
        support::skopeo_inspect(&authfile, &image).ok()
    })
    .await
    .expect("skopeo could not pull with the written secret");
    assert!(pulled.contains("\"Digest\""), "{pulled}");

    // A wrong password propagates, and the same puller is refused.
    put_source("wrong-password".into()).await;
    let refused = eventually(Duration::from_secs(20), || async {
        let s = secrets.get_opt(&secret_name).await.ok()??;
        let raw = s.data?.get(".dockerconfigjson")?.0.clone();
        std::fs::write(&authfile, raw).ok()?;
        support::skopeo_inspect(&authfile, &image).err()
    })
    .await
    .expect("the wrong password never reached the secret");
    assert!(
        refused.contains("unauthorized") || refused.contains("authentication required"),
        "{refused}"
    );
    let _ = Api::<ClusterRegistryCredential>::all(client.clone())
        .delete(&name, &DeleteParams::default())
        .await;
}

#[tokio::test]
async fn verify_reports_which_images_would_pull() {
    let reg = support::registry();
    support::env();
    let client = support::client().await;
    let src = support::namespace(&client, "verify-src", &[]).await;
    let label = support::unique("verify");
    support::namespace(&client, "verify", &[("e2e-target", &label)]).await;
    support::put_secret(
        &client,
        &src,
        "login",
        json!({"username": reg.user, "password": reg.password}),
    )
    .await;
    let name = support::unique("verify");
    let api = Api::<ClusterRegistryCredential>::all(client.clone());
    let apply = |images: Vec<String>, platforms: Vec<&str>| {
        let spec = json!({
            "registry": reg.addr,
            "provider": {"basic": {"secretRef": {"name": "login", "namespace": src}}},
            "target": {"namespaceSelector": {"matchLabels": {"e2e-target": label}}},
            "verify": {"images": images, "platforms": platforms}
        });
        let (client, name) = (&client, &name);
        async move { support::apply_credential(client, name, json!({}), spec).await }
    };
    let good = format!("{}/demo:v1", reg.addr);
    let missing = format!("{}/demo:nope", reg.addr);
    apply(vec![good.clone(), missing.clone()], vec![]).await;
    let status = eventually(Duration::from_secs(20), || async {
        let s = api.get(&name).await.ok()?.status?;
        (s.images.len() == 2).then_some(s)
    })
    .await
    .expect("status.images never filled");
    let by = |img: &str| {
        status
            .images
            .iter()
            .find(|i| i.image == img)
            .expect("image status")
            .clone()
    };
    let ok = by(&good);
    assert!(
        ok.pullable && ok.digest.as_deref().is_some_and(|d| d.starts_with("sha256:")),
        "{ok:?}"
    );
    let bad = by(&missing);
    assert!(!bad.pullable && bad.reason == "NotFound", "{bad:?}");
    let ready = status.conditions.iter().find(|c| c.type_ == "Ready").expect("ready");
    assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "NotFound"));
    let pullable = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Pullable")
        .expect("pullable");
    assert_eq!(pullable.status, "False");

    // Only the good image, and a platform it has: Ready again.
    apply(vec![good.clone()], vec!["linux/amd64"]).await;
    let status = eventually(Duration::from_secs(20), || async {
        let s = api.get(&name).await.ok()?.status?;
        let r = s.conditions.iter().find(|c| c.type_ == "Ready")?;
        (r.status == "True" && s.images.len() == 1).then_some(s)
    })
    .await
    .expect("never Ready with the good image");
    assert_eq!(status.images[0].platforms, vec!["linux/amd64".to_owned()]);
    let text = serde_json::to_string(&status).expect("json");
    assert!(!text.contains(&reg.password), "a password reached the status");
    let _ = api.delete(&name, &DeleteParams::default()).await;
}

#[tokio::test]
async fn verify_never_reaches_metadata_addresses_nor_other_registries_for_a_tenant() {
    let reg = support::registry();
    support::env();
    let client = support::client().await;
    let ns = support::namespace(&client, "verify-tenant", &[]).await;
    support::put_secret(
        &client,
        &ns,
        "login",
        json!({"username": reg.user, "password": reg.password}),
    )
    .await;

    // A cluster credential may name any registry, but never the metadata service.
    let name = support::unique("verify-metadata");
    let metadata = "169.254.169.254/latest/meta-data:v1".to_owned();
    support::apply_credential(
        &client,
        &name,
        json!({}),
        json!({
            "registry": reg.addr,
            "provider": {"basic": {"secretRef": {"name": "login", "namespace": ns}}},
            "target": {"namespaces": [ns]},
            "verify": {"images": [metadata]}
        }),
    )
    .await;
    let api = Api::<ClusterRegistryCredential>::all(client.clone());
    let status = eventually(Duration::from_secs(20), || async {
        let s = api.get(&name).await.ok()?.status?;
        (s.images.len() == 1).then_some(s)
    })
    .await
    .expect("status.images never filled");
    assert_eq!(status.images[0].reason, "AddressNotAllowed", "{:?}", status.images);
    let _ = api.delete(&name, &DeleteParams::default()).await;

    // A RegistryCredential verifies only images on its own registry.
    let tenant = Api::<pullkeeper::crd::RegistryCredential>::namespaced(client.clone(), &ns);
    let name = support::unique("verify-foreign");
    let foreign = "registry.example.com/probe:v1";
    tenant
        .patch(
            &name,
            &kube::api::PatchParams::apply("e2e-user").force(),
            &kube::api::Patch::Apply(json!({
                "apiVersion": "pullkeeper.io/v1alpha1", "kind": "RegistryCredential",
                "metadata": {"name": name, "namespace": ns},
                "spec": {
                    "registry": reg.addr,
                    "provider": {"basic": {"secretRef": {"name": "login"}}},
                    "verify": {"images": [format!("{}/demo:v1", reg.addr), foreign]}
                }
            })),
        )
        .await
        .expect("applied");
    let ready = eventually(Duration::from_secs(20), || async {
        let s = tenant.get(&name).await.ok()?.status?;
        s.conditions
            .into_iter()
            .find(|c| c.type_ == "Ready" && c.reason == "InvalidSpec")
    })
    .await
    .expect("never InvalidSpec");
    assert!(
        ready.message.contains(foreign) && ready.message.contains("spec.verify.images"),
        "{}",
        ready.message
    );
    let _ = tenant.delete(&name, &DeleteParams::default()).await;
    support::delete_namespace(&client, &ns).await;
}
