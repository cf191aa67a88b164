//! Race-free pods. The ServiceAccount admission plugin copies a ServiceAccount's
//! `imagePullSecrets` into a Pod once, when the Pod is created: a Pod created in a new
//! namespace a moment before pullkeeper patched the ServiceAccount keeps an empty list for
//! the rest of its life. Where the apiserver serves `admissionregistration.k8s.io/v1`
//! `MutatingAdmissionPolicy` (GA in Kubernetes 1.36), pullkeeper installs two fixed
//! policies (one per kind, the credential as the policy's parameter) and one binding per
//! credential, whose namespace selector is the credential's targeting. The policy appends
//! the credential's pull secret name to a new Pod's `imagePullSecrets` when the Pod's
//! ServiceAccount is one the credential targets and the entry is missing; it touches
//! nothing else. Secret names are predictable, so a Pod admitted before its Secret exists
//! pulls as soon as the Secret appears (the kubelet retries).
//!
//! The policy's `failurePolicy` is `Ignore`: creating a Pod never depends on pullkeeper.

use kube::api::{ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::Value;

use crate::crd::conditions::{Desired, Status};

use super::secret::Owner;
use super::validate::ValidSpec;

mod objects;
pub use objects::{binding, binding_name, namespace_selector, policies, policies_yaml, policy};

/// Field manager for the policies and bindings.
pub const MANAGER: &str = "pullkeeper.io/admission";
/// API group and version of MutatingAdmissionPolicy.
pub const API_VERSION: &str = "admissionregistration.k8s.io/v1";
/// Policy for ClusterRegistryCredentials.
pub const CLUSTER_POLICY: &str = "pullkeeper.io-cluster-credentials";
/// Policy for RegistryCredentials.
pub const NAMESPACED_POLICY: &str = "pullkeeper.io-namespaced-credentials";
/// Condition type telling which admission route a credential has.
pub const CONDITION: &str = "PodAdmission";
/// Namespace label every namespace carries (since Kubernetes 1.21).
const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Errors of the admission route. None of them stops the fan-out.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Discovery of the admission API failed.
    #[error("discovering {API_VERSION}: {0}")]
    Discovery(#[source] kube::Error),
    /// Writing a policy or binding failed.
    #[error("writing {kind} {name}: {source}")]
    Apply {
        /// Kind.
        kind: &'static str,
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
    /// A policy is neither installed nor installable with pullkeeper's permissions.
    #[error(
        "MutatingAdmissionPolicy {name} is not installed and pullkeeper may not create it: install the chart with podAdmission.enabled, or apply `pullkeeper admission-policies`"
    )]
    Missing {
        /// Name.
        name: String,
    },
    /// Deleting a binding failed.
    #[error("deleting MutatingAdmissionPolicyBinding {name}: {source}")]
    Delete {
        /// Name.
        name: String,
        /// Cause.
        #[source]
        source: kube::Error,
    },
}

/// Which route keeps new Pods supplied, as seen at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// MutatingAdmissionPolicy bindings.
    Policy,
    /// Turned off by the administrator.
    Disabled,
    /// The apiserver does not serve MutatingAdmissionPolicy v1.
    NotServed,
    /// Installing the policies failed at start-up (logged).
    Failed,
    /// The operator's mutating webhook (see `crate::webhook`): opted in, and the policy
    /// route is turned off or not served.
    Webhook,
}

/// Which route keeps new Pods supplied: the policy where it is turned on and served (it
/// wins over the webhook, which needs the operator up and a serving certificate), else the
/// webhook if opted in.
pub fn choose(policy: bool, served: bool, webhook: bool) -> Route {
    match (policy && served, webhook, policy) {
        (true, _, _) => Route::Policy,
        (false, true, _) => Route::Webhook,
        (false, false, false) => Route::Disabled,
        (false, false, true) => Route::NotServed,
    }
}

/// [`choose`] for this apiserver (asking it only when the policy route is turned on).
pub async fn route(client: &Client, policy: bool, webhook: bool) -> Result<Route, Error> {
    let served = policy && served(client).await?;
    Ok(choose(policy, served, webhook))
}

/// The route and the bindings written so far, so a reconcile writes a binding only
/// when it changes.
pub struct Bindings {
    route: Route,
    applied: std::sync::Mutex<std::collections::HashMap<String, Value>>,
}

impl Bindings {
    /// For the route chosen at start-up.
    pub fn new(route: Route) -> Self {
        Self {
            route,
            applied: Default::default(),
        }
    }

    /// Brings the credential's binding up to date and returns its condition.
    pub async fn sync(&self, client: &Client, owner: &Owner, spec: &ValidSpec) -> Desired {
        if self.route != Route::Policy {
            return condition(self.route, owner, &Ok(false));
        }
        let name = binding_name(owner);
        let desired = binding(owner, spec);
        let known = crate::lock(&self.applied).get(&name).cloned();
        let result = match (&desired, known) {
            (Some(d), Some(k)) if *d == k => Ok(true),
            (Some(d), _) => apply(client, "MutatingAdmissionPolicyBinding", d).await.map(|()| true),
            (None, _) => unbind(client, owner).await.map(|()| false),
        };
        let mut applied = crate::lock(&self.applied);
        match (&result, desired) {
            (Ok(true), Some(d)) => {
                applied.insert(name, d);
            }
            _ => {
                applied.remove(&name);
            }
        }
        drop(applied);
        condition(self.route, owner, &result)
    }

    /// Removes the credential's binding (when the credential goes away).
    pub async fn remove(&self, client: &Client, owner: &Owner) -> Result<(), Error> {
        crate::lock(&self.applied).remove(&binding_name(owner));
        if self.route == Route::Policy {
            unbind(client, owner).await?;
        }
        Ok(())
    }
}

fn gvk(kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk("admissionregistration.k8s.io", "v1", kind))
}

/// Whether the apiserver serves MutatingAdmissionPolicy v1.
pub async fn served(client: &Client) -> Result<bool, Error> {
    match client.list_api_group_resources(API_VERSION).await {
        Ok(list) => Ok(list.resources.iter().any(|r| r.name == "mutatingadmissionpolicies")),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(Error::Discovery(e)),
    }
}

/// Server-side applies `body` unless the object in place already holds all of it (a
/// restart with nothing to change writes nothing).
async fn apply(client: &Client, kind: &'static str, body: &Value) -> Result<(), Error> {
    let name = body["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &gvk(kind));
    // Unreadable (e.g. no `get`): the apply below says what is wrong.
    if let Ok(Some(current)) = api.get_opt(&name).await
        && serde_json::to_value(&current).is_ok_and(|current| holds(&current, body))
    {
        return Ok(());
    }
    api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(body))
        .await
        .map(|_| ())
        .map_err(|source| Error::Apply { kind, name, source })
}

/// Whether `current` holds every field of `wanted` with the same value (fields the
/// apiserver defaulted or others wrote may be there too; lists must match item by item).
pub fn holds(current: &Value, wanted: &Value) -> bool {
    match (current, wanted) {
        (Value::Object(c), Value::Object(w)) => w.iter().all(|(k, wv)| c.get(k).is_some_and(|cv| holds(cv, wv))),
        (Value::Array(c), Value::Array(w)) => c.len() == w.len() && c.iter().zip(w).all(|(cv, wv)| holds(cv, wv)),
        (c, w) => c == w,
    }
}

/// Decides the route at start-up. For [`Route::Policy`] the policies must be in place:
/// pullkeeper writes them when it may; installed by the Helm chart, the operator's
/// ServiceAccount may only read them (a leaked token then cannot rewrite a policy that
/// mutates every new Pod), and they are used as they are.
pub async fn start(client: &Client, enabled: bool, webhook: bool) -> Result<Route, Error> {
    let route = route(client, enabled, webhook).await?;
    if route != Route::Policy {
        return Ok(route);
    }
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &gvk("MutatingAdmissionPolicy"));
    for p in policies() {
        match apply(client, "MutatingAdmissionPolicy", &p).await {
            Ok(()) => {}
            Err(Error::Apply {
                source: kube::Error::Api(e),
                name,
                ..
            }) if e.code == 403 => match api.get_opt(&name).await {
                Ok(Some(_)) => {
                    tracing::debug!(policy = %name, "the policy is installed by the chart; using it as it is");
                }
                Ok(None) => return Err(Error::Missing { name }),
                Err(source) => {
                    return Err(Error::Apply {
                        kind: "MutatingAdmissionPolicy",
                        name,
                        source,
                    });
                }
            },
            Err(e) => return Err(e),
        }
    }
    Ok(Route::Policy)
}

/// Removes the binding of a credential, if any.
pub async fn unbind(client: &Client, owner: &Owner) -> Result<(), Error> {
    let name = binding_name(owner);
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &gvk("MutatingAdmissionPolicyBinding"));
    match api.delete(&name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(source) => Err(Error::Delete { name, source }),
    }
}

/// The `PodAdmission` condition for a route and the result of binding.
pub fn condition(route: Route, owner: &Owner, bound: &Result<bool, Error>) -> Desired {
    match (route, bound) {
        (Route::Disabled, _) => Desired::new(
            CONDITION,
            Status::False,
            "Disabled",
            "pod admission is turned off (--pod-admission-policy=false, no --pod-admission-webhook): a Pod created before its ServiceAccount holds the secret keeps an empty imagePullSecrets",
        ),
        (Route::Failed, _) => Desired::new(
            CONDITION,
            Status::False,
            "PolicyNotInstalled",
            "pullkeeper could not install its MutatingAdmissionPolicy at start-up (see its log; it needs create and patch on mutatingadmissionpolicies and their bindings)",
        ),
        (Route::NotServed, _) => Desired::new(
            CONDITION,
            Status::False,
            "NotServed",
            "the apiserver does not serve admissionregistration.k8s.io/v1 MutatingAdmissionPolicy (Kubernetes 1.36+) and the webhook is not turned on (--pod-admission-webhook): a Pod created before its ServiceAccount holds the secret keeps an empty imagePullSecrets",
        ),
        (Route::Webhook, _) => Desired::new(
            CONDITION,
            Status::True,
            "WebhookServed",
            "pullkeeper's mutating webhook adds the pull secret to new Pods of the targeted ServiceAccounts (it fails open: Pods created while no replica answers are admitted unchanged)",
        ),
        (Route::Policy, Ok(true)) => Desired::new(
            CONDITION,
            Status::True,
            "PolicyBound",
            format!(
                "MutatingAdmissionPolicyBinding {} adds the pull secret to new Pods of the targeted ServiceAccounts",
                binding_name(owner)
            ),
        ),
        (Route::Policy, Ok(false)) => Desired::new(
            CONDITION,
            Status::False,
            "NameTooLong",
            "the default pull secret name is shortened for this long credential name, which the admission policy cannot compute: set spec.target.secretName",
        ),
        (Route::Policy, Err(e)) => Desired::new(CONDITION, Status::False, "BindingFailed", e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::validate;
    use crate::crd::{ClusterRegistryCredentialSpec, RegistryCredentialSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
    use serde_json::json;

    #[test]
    fn an_object_holds_what_was_applied_when_every_field_is_there_with_its_value() {
        let wanted = json!({"metadata": {"name": "b", "labels": {"a": "1"}}, "spec": {"list": [{"x": 1}], "n": 2}});
        let current = json!({"metadata": {"name": "b", "uid": "u", "labels": {"a": "1", "b": "2"}},
                             "spec": {"list": [{"x": 1, "defaulted": true}], "n": 2, "other": 3}});
        assert!(holds(&current, &wanted), "defaulted and foreign fields are fine");
        let changed = json!({"metadata": {"name": "b"}, "spec": {"list": [{"x": 2}], "n": 2}});
        assert!(!holds(&changed, &wanted));
        let longer =
            json!({"metadata": {"name": "b", "labels": {"a": "1"}}, "spec": {"list": [{"x": 1}, {"x": 1}], "n": 2}});
        assert!(!holds(&longer, &wanted), "a list must match item by item");
        assert!(!holds(&json!({"metadata": {"name": "b"}}), &wanted), "missing fields");
    }

    fn cluster_spec(target: Value) -> ValidSpec {
        let spec: ClusterRegistryCredentialSpec = serde_json::from_value(json!({
            "registry": "ghcr.io",
            "provider": {"basic": {"secretRef": {"name": "s", "namespace": "ops"}}},
            "target": target,
        }))
        .expect("spec");
        validate::cluster("ghcr", &spec).expect("valid")
    }

    fn owner(namespace: Option<&str>, name: &str) -> Owner {
        Owner {
            scope: if namespace.is_some() { "namespace" } else { "cluster" },
            name: name.into(),
            namespace: namespace.map(str::to_owned),
            uid: "u".into(),
        }
    }

    #[test]
    fn cluster_targeting_becomes_a_namespace_selector() {
        let spec = cluster_spec(json!({
            "namespaceSelector": {"matchLabels": {"team": "payments"}},
            "namespaces": ["web", "api"],
            "excludeNamespaces": ["kube-system"],
        }));
        let sel = namespace_selector(&spec.scope);
        assert_eq!(
            sel.match_labels
                .as_ref()
                .and_then(|m| m.get("team"))
                .map(String::as_str),
            Some("payments")
        );
        let exprs = sel.match_expressions.unwrap_or_default();
        let find = |op: &str| exprs.iter().find(|e| e.operator == op).expect(op);
        assert_eq!(find("In").key, "kubernetes.io/metadata.name");
        assert_eq!(find("In").values.clone().unwrap_or_default(), vec!["api", "web"]);
        assert_eq!(find("NotIn").values.clone().unwrap_or_default(), vec!["kube-system"]);
        // No targeting at all: every namespace.
        assert_eq!(
            namespace_selector(&cluster_spec(json!({})).scope),
            LabelSelector::default()
        );
    }

    #[test]
    fn a_namespaced_credential_binds_its_own_namespace_and_its_own_parameter() {
        let spec: RegistryCredentialSpec = serde_json::from_value(json!({
            "registry": "ghcr.io",
            "provider": {"basic": {"secretRef": {"name": "s"}}},
        }))
        .expect("spec");
        let valid = validate::namespaced("ghcr", "team-a", &spec).expect("valid");
        let b = binding(&owner(Some("team-a"), "ghcr"), &valid).expect("binding");
        assert_eq!(b["spec"]["policyName"], NAMESPACED_POLICY);
        assert_eq!(b["spec"]["paramRef"]["namespace"], "team-a");
        assert_eq!(b["spec"]["paramRef"]["name"], "ghcr");
        let exprs = &b["spec"]["matchResources"]["namespaceSelector"]["matchExpressions"];
        assert_eq!(exprs[0]["values"], json!(["team-a"]));
        // Same name in another namespace: another binding.
        assert_ne!(
            binding_name(&owner(Some("team-a"), "ghcr")),
            binding_name(&owner(Some("team-b"), "ghcr"))
        );
        assert_ne!(
            binding_name(&owner(None, "ghcr")),
            binding_name(&owner(Some("team-a"), "ghcr"))
        );
    }

    #[test]
    fn a_shortened_default_secret_name_gets_no_binding() {
        let long = "x".repeat(250);
        let spec: ClusterRegistryCredentialSpec = serde_json::from_value(json!({
            "registry": "ghcr.io",
            "provider": {"basic": {"secretRef": {"name": "s", "namespace": "ops"}}},
        }))
        .expect("spec");
        let valid = validate::cluster(&long, &spec).expect("valid");
        assert!(binding(&owner(None, &long), &valid).is_none());
        assert!(binding_name(&owner(None, &long)).len() <= 253);
        let short = validate::cluster("ghcr", &spec).expect("valid");
        assert!(binding(&owner(None, "ghcr"), &short).is_some());
    }

    #[test]
    fn the_condition_names_the_route() {
        let o = owner(None, "ghcr");
        let reason = |route, bound: Result<bool, Error>| condition(route, &o, &bound).reason;
        assert_eq!(reason(Route::Policy, Ok(true)), "PolicyBound");
        assert_eq!(reason(Route::Policy, Ok(false)), "NameTooLong");
        assert_eq!(reason(Route::Disabled, Ok(false)), "Disabled");
        assert_eq!(reason(Route::NotServed, Ok(false)), "NotServed");
        assert_eq!(reason(Route::Failed, Ok(false)), "PolicyNotInstalled");
        assert_eq!(reason(Route::Webhook, Ok(false)), "WebhookServed");
        assert_eq!(condition(Route::Webhook, &o, &Ok(false)).status, Status::True);
        let failed = Error::Missing { name: "p".into() };
        assert_eq!(reason(Route::Policy, Err(failed)), "BindingFailed");
        let bound = condition(Route::Policy, &o, &Ok(true));
        assert_eq!(bound.status, Status::True);
        assert!(bound.message.contains(&binding_name(&o)), "{}", bound.message);
    }

    #[test]
    fn the_policy_wins_where_served_and_turned_on_else_the_webhook_if_opted_in() {
        assert_eq!(choose(true, true, false), Route::Policy);
        assert_eq!(choose(true, true, true), Route::Policy);
        assert_eq!(choose(true, false, true), Route::Webhook);
        assert_eq!(choose(false, true, true), Route::Webhook);
        assert_eq!(choose(false, false, true), Route::Webhook);
        assert_eq!(choose(true, false, false), Route::NotServed);
        assert_eq!(choose(false, true, false), Route::Disabled);
    }

    #[test]
    fn the_policy_only_touches_image_pull_secrets_of_new_pods() {
        let p = policy(CLUSTER_POLICY, "ClusterRegistryCredential");
        assert_eq!(p["spec"]["failurePolicy"], "Ignore");
        assert_eq!(
            p["spec"]["matchConstraints"]["resourceRules"][0]["operations"],
            json!(["CREATE"])
        );
        assert_eq!(
            p["spec"]["matchConstraints"]["resourceRules"][0]["resources"],
            json!(["pods"])
        );
        let expr = p["spec"]["mutations"][0]["jsonPatch"]["expression"]
            .as_str()
            .expect("expr");
        let paths: Vec<&str> = expr.match_indices("path: '").map(|(i, _)| &expr[i + 7..]).collect();
        assert!(paths.iter().all(|p| p.starts_with("/spec/imagePullSecrets")), "{expr}");
        assert_eq!(p["spec"]["paramKind"]["kind"], "ClusterRegistryCredential");
    }
}
