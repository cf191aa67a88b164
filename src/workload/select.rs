//! Pure steps of the operator's rounds: which namespaces are checked, and what a round's
//! checks and findings say per container.

use std::collections::{BTreeMap, BTreeSet};

use super::images::Workload;
use super::plan::{Check, Finding, Plan};
use super::track::{ContainerKey, Record, WorkloadKey};
use crate::controller::identity::CredentialRef;
use crate::controller::target::{NamespaceInfo, is_targeted};
use crate::controller::validate::Scope;

/// Annotation that opts a namespace out of the operator's workload checks.
pub const EXCLUDE_ANNOTATION: &str = "pullkeeper.io/exclude-workload-checks";

/// The namespaces whose workloads are checked: those some credential targets (as the
/// reconciler targets them), unless annotated `pullkeeper.io/exclude-workload-checks: "true"`.
pub fn checked_namespaces<'a>(
    namespaces: impl IntoIterator<Item = &'a NamespaceInfo>,
    scopes: &[Scope],
) -> BTreeSet<String> {
    namespaces
        .into_iter()
        .filter(|ns| ns.annotations.get(EXCLUDE_ANNOTATION).map(String::as_str) != Some("true"))
        .filter(|ns| scopes.iter().any(|s| is_targeted(s, ns)))
        .map(|ns| ns.name.clone())
        .collect()
}

/// Whose pod spec it is.
pub fn workload_key(w: &Workload) -> WorkloadKey {
    WorkloadKey {
        namespace: w.namespace.clone(),
        kind: w.kind,
        name: w.name.clone(),
    }
}

/// One record per checked container: its image, the credentials whose managed Secrets
/// were among its pull Secrets (`managed` maps `namespace/name` of a pullkeeper Secret to
/// its writer), and its finding if it would not pull.
pub fn records(
    checks: &[Check],
    findings: Vec<Finding>,
    managed: &BTreeMap<String, CredentialRef>,
) -> BTreeMap<ContainerKey, Record> {
    let mut findings: BTreeMap<ContainerKey, Finding> =
        findings.into_iter().map(|f| (ContainerKey::of(&f.target), f)).collect();
    checks
        .iter()
        .map(|c| {
            let key = ContainerKey::of(&c.target);
            let credentials = match &c.plan {
                Plan::Resolve { candidates, .. } => {
                    let mut refs: Vec<CredentialRef> = candidates
                        .iter()
                        .filter_map(|c| managed.get(&c.secret).cloned())
                        .collect();
                    refs.dedup();
                    refs
                }
                Plan::Blocked(_) => Vec::new(),
            };
            let record = Record {
                image: c.target.image.clone(),
                credentials,
                finding: findings.remove(&key),
            };
            (key, record)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Login;
    use crate::workload::images::WorkloadKind;
    use crate::workload::plan::{SecretState, View, checks};
    use secrecy::SecretString;
    use serde_json::json;

    fn ns(name: &str, annotations: &[(&str, &str)]) -> NamespaceInfo {
        NamespaceInfo {
            name: name.into(),
            annotations: annotations.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
            ..NamespaceInfo::default()
        }
    }

    #[test]
    fn targeted_namespaces_are_checked_unless_they_opt_out() {
        let all = [
            ns("web", &[]),
            ns("quiet", &[(EXCLUDE_ANNOTATION, "true")]),
            ns("team", &[]),
            ns("untargeted", &[]),
        ];
        let scopes = [
            Scope::Cluster {
                selector: None,
                namespaces: Some(vec!["web".into(), "quiet".into()]),
                exclude: vec![],
            },
            Scope::Namespace("team".into()),
        ];
        assert_eq!(
            checked_namespaces(&all, &scopes),
            BTreeSet::from(["team".to_owned(), "web".to_owned()])
        );
        assert!(
            checked_namespaces(&all, &[]).is_empty(),
            "no credential, nothing checked"
        );
    }

    #[test]
    fn a_record_names_the_credentials_whose_secrets_were_tried() {
        let w = Workload {
            kind: WorkloadKind::Deployment,
            namespace: "ns".into(),
            name: "web".into(),
            spec: serde_json::from_value(json!({
                "imagePullSecrets": [{"name": "pullkeeper-ghcr"}, {"name": "own"}],
                "containers": [{"name": "app", "image": "ghcr.io/acme/web:v1"}]
            }))
            .expect("spec"),
        };
        let login = || Login {
            username: "u".into(),
            password: SecretString::from("s3cret".to_owned()),
        };
        let view = View {
            workloads: vec![w],
            secrets: BTreeMap::from([
                (
                    ("ns".to_owned(), "pullkeeper-ghcr".to_owned()),
                    SecretState::Entries(vec![("ghcr.io".into(), login())]),
                ),
                (
                    ("ns".to_owned(), "own".to_owned()),
                    SecretState::Entries(vec![("ghcr.io".into(), login())]),
                ),
            ]),
            ..View::default()
        };
        let checks = checks(&view);
        let managed = BTreeMap::from([("ns/pullkeeper-ghcr".to_owned(), CredentialRef::cluster("ghcr"))]);
        let finding = Finding {
            target: checks[0].target.clone(),
            verdict: "Unpullable",
            reason: "NotFound".into(),
            message: "m".into(),
            credentials: vec![],
        };
        let records = records(&checks, vec![finding], &managed);
        let r = records.values().next().expect("a record");
        assert_eq!(r.credentials, vec![CredentialRef::cluster("ghcr")]);
        assert_eq!(r.finding.as_ref().map(|f| f.reason.as_str()), Some("NotFound"));
        assert_eq!(r.image, "ghcr.io/acme/web:v1");
    }
}
