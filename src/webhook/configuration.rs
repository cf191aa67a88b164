//! The `MutatingWebhookConfiguration` that sends new Pods to the webhook. The Helm chart
//! installs it (pointing at the operator's Service); the operator only keeps its
//! `caBundle` up to date when it manages the serving certificate itself. For
//! out-of-cluster and development use (`--webhook-url`) the operator creates
//! it, pointing at the URL, if it does not exist.

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use super::Error;

/// Name of the one webhook in the configuration.
pub const WEBHOOK_NAME: &str = "pods.pullkeeper.io";
/// Path the webhook is served on.
pub const PATH: &str = "/mutate-pods";
/// The apiserver gives up (and admits the Pod unchanged) after this long. The answer
/// comes from memory in well under a millisecond.
pub const TIMEOUT_SECONDS: i32 = 5;
/// Namespace label every namespace carries (since Kubernetes 1.21).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Where the apiserver reaches the webhook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A URL (out-of-cluster or development use).
    Url(String),
    /// The operator's Service.
    Service {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
}

/// The configuration named `name`: Pod CREATE only, failing open
/// (`failurePolicy: Ignore`), no side effects, re-invoked if a later mutation changes the
/// Pod, skipping the namespaces `skip`. The chart renders the same from its template.
pub fn configuration(name: &str, endpoint: &Endpoint, skip: &[String], ca_bundle: Option<&str>) -> Value {
    use base64::Engine as _;
    let mut client_config = match endpoint {
        Endpoint::Url(url) => json!({"url": format!("{}{PATH}", url.trim_end_matches('/'))}),
        Endpoint::Service { namespace, name } => {
            json!({"service": {"namespace": namespace, "name": name, "path": PATH, "port": 443}})
        }
    };
    if let Some(ca) = ca_bundle {
        client_config["caBundle"] = json!(base64::engine::general_purpose::STANDARD.encode(ca));
    }
    let mut webhook = json!({
        "name": WEBHOOK_NAME,
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        "failurePolicy": "Ignore",
        "matchPolicy": "Equivalent",
        "reinvocationPolicy": "IfNeeded",
        "timeoutSeconds": TIMEOUT_SECONDS,
        "clientConfig": client_config,
        "rules": [{
            "apiGroups": [""], "apiVersions": ["v1"],
            "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced",
        }],
    });
    if !skip.is_empty() {
        webhook["namespaceSelector"] = json!({"matchExpressions": [
            {"key": NAMESPACE_NAME_LABEL, "operator": "NotIn", "values": skip},
        ]});
    }
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": name, "labels": {"app.kubernetes.io/part-of": "pullkeeper"}},
        "webhooks": [webhook],
    })
}

/// A JSON patch setting the `caBundle` of [`WEBHOOK_NAME`] in `current`, or `None` when it
/// already holds `ca`. Tests the webhook's position first, so a concurrent edit that
/// moves it makes the patch fail instead of touching another webhook.
pub fn ca_bundle_patch(current: &MutatingWebhookConfiguration, ca: &str) -> Result<Option<Value>, Error> {
    let webhooks = current.webhooks.as_deref().unwrap_or_default();
    let name = current.metadata.name.clone().unwrap_or_default();
    let (i, hook) = webhooks
        .iter()
        .enumerate()
        .find(|(_, w)| w.name == WEBHOOK_NAME)
        .ok_or(Error::NoWebhook { configuration: name })?;
    if hook.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) == Some(ca.as_bytes()) {
        return Ok(None);
    }
    use base64::Engine as _;
    Ok(Some(json!([
        {"op": "test", "path": format!("/webhooks/{i}/name"), "value": WEBHOOK_NAME},
        {"op": "add", "path": format!("/webhooks/{i}/clientConfig/caBundle"),
         "value": base64::engine::general_purpose::STANDARD.encode(ca)},
    ])))
}

/// Puts `ca` into the configuration's `caBundle` (with `get` and `patch` on that one
/// object). If the configuration does not exist and `create` is given, creates that one
/// (development use). Returns whether anything was written.
pub async fn ensure_ca_bundle(client: &Client, name: &str, ca: &str, create: Option<&Value>) -> Result<bool, Error> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let io = |source| Error::Configuration {
        name: name.to_owned(),
        source,
    };
    let current = match api.get_opt(name).await.map_err(io)? {
        Some(c) => c,
        None => {
            let Some(body) = create else {
                return Err(Error::ConfigurationMissing { name: name.to_owned() });
            };
            let object: MutatingWebhookConfiguration =
                serde_json::from_value(body.clone()).map_err(Error::Serialize)?;
            api.create(&PostParams::default(), &object).await.map_err(io)?;
            return Ok(true);
        }
    };
    let Some(patch) = ca_bundle_patch(&current, ca)? else {
        return Ok(false);
    };
    let patch: json_patch::Patch = serde_json::from_value(patch).map_err(Error::Serialize)?;
    api.patch(name, &PatchParams::default(), &Patch::Json::<()>(patch))
        .await
        .map_err(io)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_create_only_failing_open_without_side_effects() {
        let c = configuration(
            "pk",
            &Endpoint::Service {
                namespace: "ops".into(),
                name: "pk-webhook".into(),
            },
            &["kube-system".to_owned(), "ops".to_owned()],
            None,
        );
        let w = &c["webhooks"][0];
        assert_eq!(w["failurePolicy"], "Ignore");
        assert_eq!(w["sideEffects"], "None");
        assert_eq!(w["rules"][0]["operations"], json!(["CREATE"]));
        assert_eq!(w["rules"][0]["resources"], json!(["pods"]));
        assert_eq!(w["clientConfig"]["service"]["path"], PATH);
        assert!(w["clientConfig"].get("caBundle").is_none());
        assert_eq!(
            w["namespaceSelector"]["matchExpressions"][0]["values"],
            json!(["kube-system", "ops"])
        );
        let typed: MutatingWebhookConfiguration = serde_json::from_value(c).expect("a valid object");
        assert_eq!(
            typed.webhooks.unwrap_or_default()[0].timeout_seconds,
            Some(TIMEOUT_SECONDS)
        );
    }

    #[test]
    fn the_ca_bundle_is_patched_only_when_it_differs() {
        let body = configuration("pk", &Endpoint::Url("https://127.0.0.1:9443/".into()), &[], Some("old"));
        assert_eq!(
            body["webhooks"][0]["clientConfig"]["url"],
            "https://127.0.0.1:9443/mutate-pods"
        );
        let current: MutatingWebhookConfiguration = serde_json::from_value(body).expect("object");
        assert!(ca_bundle_patch(&current, "old").expect("found").is_none());
        let patch = ca_bundle_patch(&current, "new").expect("found").expect("a patch");
        let mut doc = serde_json::to_value(&current).expect("json");
        let p: json_patch::Patch = serde_json::from_value(patch).expect("patch");
        json_patch::patch(&mut doc, &p).expect("applies");
        let after: MutatingWebhookConfiguration = serde_json::from_value(doc).expect("object");
        let hook = &after.webhooks.unwrap_or_default()[0];
        assert_eq!(
            hook.client_config.ca_bundle.as_ref().map(|b| b.0.clone()),
            Some(b"new".to_vec())
        );
        assert_eq!(
            hook.client_config.url.as_deref(),
            Some("https://127.0.0.1:9443/mutate-pods")
        );
        let mut other = current.clone();
        other.webhooks.get_or_insert_default()[0].name = "else.example.com".into();
        assert!(matches!(ca_bundle_patch(&other, "new"), Err(Error::NoWebhook { .. })));
    }
}
