//! Pure: the admission objects pullkeeper manages, as JSON: the two fixed
//! MutatingAdmissionPolicies (the chart ships the same) and one binding per credential.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::core::{Expression, Selector};
use serde_json::{Value, json};

use super::super::secret::{MANAGED_BY_LABEL, MANAGED_BY_VALUE, Owner, shorten};
use super::super::validate::{SECRET_NAME_PREFIX, Scope, ValidSpec};
use super::{API_VERSION, CLUSTER_POLICY, NAMESPACE_NAME_LABEL, NAMESPACED_POLICY};

/// The variables and the mutation shared by both policies. Everything that varies per
/// credential is read from the parameter (the credential itself): its pull secret name
/// and target ServiceAccounts. A namespace annotated `pullkeeper.io/exclude: "true"`
/// (for the cluster kind; a namespace's own RegistryCredential ignores it, as the
/// reconciler does), a suspended or deleted credential, a Pod of another ServiceAccount or one that already
/// lists the secret: no patch.
pub fn policy(name: &str, param_kind: &str) -> Value {
    let excluded = if param_kind == "ClusterRegistryCredential" {
        "has(namespaceObject.metadata.annotations) && 'pullkeeper.io/exclude' in namespaceObject.metadata.annotations && namespaceObject.metadata.annotations['pullkeeper.io/exclude'] == 'true'"
    } else {
        "false"
    };
    let variables = json!([
        {"name": "secretName", "expression":
            "has(params.spec.target) && has(params.spec.target.secretName) ? params.spec.target.secretName : 'pullkeeper-' + params.metadata.name"},
        {"name": "serviceAccounts", "expression":
            "has(params.spec.target) && has(params.spec.target.serviceAccounts) ? params.spec.target.serviceAccounts : ['default']"},
        {"name": "serviceAccount", "expression":
            "has(object.spec.serviceAccountName) && object.spec.serviceAccountName != '' ? object.spec.serviceAccountName : 'default'"},
        {"name": "excluded", "expression": excluded},
        {"name": "applies", "expression":
            "!(has(params.spec.suspend) && params.spec.suspend) && !has(params.metadata.deletionTimestamp) && !variables.excluded && variables.serviceAccount in variables.serviceAccounts && !(has(object.spec.imagePullSecrets) && object.spec.imagePullSecrets.exists(s, s.name == variables.secretName))"},
    ]);
    // An untyped value: a typed `Object.spec.imagePullSecrets{...}` list makes 1.36
    // apiservers fail the request with an internal error.
    let patch = "!variables.applies ? [] : has(object.spec.imagePullSecrets) ? \
        [JSONPatch{op: 'add', path: '/spec/imagePullSecrets/-', value: {'name': variables.secretName}}] : \
        [JSONPatch{op: 'add', path: '/spec/imagePullSecrets', value: [{'name': variables.secretName}]}]";
    json!({
        "apiVersion": API_VERSION,
        "kind": "MutatingAdmissionPolicy",
        "metadata": {"name": name, "labels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE}},
        "spec": {
            "paramKind": {"apiVersion": format!("{}/{}", crate::crd::GROUP, crate::crd::VERSION), "kind": param_kind},
            "matchConstraints": {
                "resourceRules": [{
                    "apiGroups": [""], "apiVersions": ["v1"],
                    "operations": ["CREATE"], "resources": ["pods"],
                }],
            },
            "failurePolicy": "Ignore",
            "reinvocationPolicy": "IfNeeded",
            "variables": variables,
            "mutations": [{"patchType": "JSONPatch", "jsonPatch": {"expression": patch}}],
        },
    })
}

/// Name of the binding of `owner`: stable, a valid object name, distinct per credential.
pub fn binding_name(owner: &Owner) -> String {
    let raw = match &owner.namespace {
        Some(ns) => format!("pullkeeper.io-{ns}.{}", owner.name),
        None => format!("pullkeeper.io-cluster.{}", owner.name),
    };
    shorten(&raw, 253)
}

/// The namespaces a binding applies to, as a label selector: the credential's own
/// namespace, or the cluster kind's selector, allow-list and deny-list.
pub fn namespace_selector(scope: &Scope) -> LabelSelector {
    let name = |set: &[String]| set.iter().cloned().collect::<BTreeSet<String>>();
    let selector: Selector = match scope {
        Scope::Namespace(ns) => Expression::In(NAMESPACE_NAME_LABEL.into(), name(std::slice::from_ref(ns))).into(),
        Scope::Cluster {
            selector,
            namespaces,
            exclude,
        } => {
            let mut s = selector.as_ref().map(|s| s.selector().clone()).unwrap_or_default();
            if let Some(allowed) = namespaces {
                s.extend([Expression::In(NAMESPACE_NAME_LABEL.into(), name(allowed))]);
            }
            if !exclude.is_empty() {
                s.extend([Expression::NotIn(NAMESPACE_NAME_LABEL.into(), name(exclude))]);
            }
            s
        }
    };
    selector.into()
}

/// The binding for a credential, or `None` when the policy cannot name its Secret: a
/// default name so long that pullkeeper shortens it (CEL cannot compute the digest).
pub fn binding(owner: &Owner, spec: &ValidSpec) -> Option<Value> {
    let default_name = format!("{SECRET_NAME_PREFIX}{}", owner.name);
    if spec.secret_name != default_name && shorten(&default_name, 253) == spec.secret_name {
        return None;
    }
    let (policy, namespace) = match &owner.namespace {
        Some(ns) => (NAMESPACED_POLICY, Some(ns.clone())),
        None => (CLUSTER_POLICY, None),
    };
    let mut param_ref = json!({"name": owner.name, "parameterNotFoundAction": "Allow"});
    if let Some(ns) = namespace {
        param_ref["namespace"] = json!(ns);
    }
    Some(json!({
        "apiVersion": API_VERSION,
        "kind": "MutatingAdmissionPolicyBinding",
        "metadata": {"name": binding_name(owner), "labels": {MANAGED_BY_LABEL: MANAGED_BY_VALUE}},
        "spec": {
            "policyName": policy,
            "paramRef": param_ref,
            "matchResources": {"namespaceSelector": namespace_selector(&spec.scope)},
        },
    }))
}

/// Both policies, as the chart installs them (`pullkeeper admission-policies`).
pub fn policies() -> [Value; 2] {
    [
        policy(CLUSTER_POLICY, "ClusterRegistryCredential"),
        policy(NAMESPACED_POLICY, "RegistryCredential"),
    ]
}

/// Both policies as a multi-document YAML stream.
pub fn policies_yaml() -> Result<String, serde_yaml::Error> {
    crate::crd::yaml_stream(policies())
}
