//! I/O step: carry out a [`Plan`] with bounded concurrency, collecting per-namespace
//! failures instead of stopping at the first one.

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client};
use serde_json::Value;

use crate::crd::NamespaceFailure;
use crate::crd::conditions::reasons;

use super::OBJECT_MANAGER;
use super::plan::{Delete, Plan, SaPatch, Write};
use super::secret::{self, Content, Owner};

/// What happened to a plan.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Namespaces where the secret was written.
    pub written: Vec<String>,
    /// Per-namespace failures (conflicts included).
    pub failures: Vec<NamespaceFailure>,
    /// API requests made.
    pub requests: usize,
    /// Whether any failure is worth a quick retry (not a conflict).
    pub retryable: bool,
}

enum Step {
    Write(Write),
    Delete(Delete),
    Sa(SaPatch),
}

/// Executes the plan: secrets first, then ServiceAccounts (so no SA points at a Secret
/// that is not there yet), then deletions.
pub async fn execute(
    client: &Client,
    owner: &Owner,
    secret_name: &str,
    content: Option<&Content>,
    plan: &Plan,
    concurrency: usize,
) -> Outcome {
    let mut out = Outcome::default();
    for (ns, reason, message) in plan.conflicts.iter().map(|ns| conflict(ns, secret_name)) {
        out.failures.push(failure(&ns, reason, message));
    }
    let mut failed_ns = std::collections::BTreeSet::new();
    for phase in 0..3 {
        let steps: Vec<Step> = match phase {
            0 => plan.writes.iter().cloned().map(Step::Write).collect(),
            1 => plan
                .sa_patches
                .iter()
                .filter(|p| !failed_ns.contains(&p.namespace))
                .cloned()
                .map(Step::Sa)
                .collect(),
            _ => plan.deletes.iter().cloned().map(Step::Delete).collect(),
        };
        let results: Vec<StepResult> = futures::stream::iter(steps)
            .map(|step| run(client, owner, secret_name, content, step))
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
        for (ns, result, requests) in results {
            out.requests += requests;
            match result {
                Ok(Some(written)) => out.written.push(written),
                Ok(None) => {}
                Err((reason, message, retryable)) => {
                    out.retryable |= retryable;
                    failed_ns.insert(ns.clone());
                    out.failures.push(failure(&ns, reason, message));
                }
            }
        }
    }
    out.failures.sort_by(|a, b| a.namespace.cmp(&b.namespace));
    out
}

type StepResult = (String, Result<Option<String>, (&'static str, String, bool)>, usize);

async fn run(client: &Client, owner: &Owner, name: &str, content: Option<&Content>, step: Step) -> StepResult {
    match step {
        Step::Write(w) => {
            let (ns, create) = match &w {
                Write::Create(ns) => (ns, true),
                Write::Apply(ns) => (ns, false),
            };
            let Some(content) = content else {
                return (ns.clone(), Ok(None), 0);
            };
            let (res, n) = write_secret(client, owner, name, ns, content, create).await;
            (ns.clone(), res.map(|()| Some(ns.clone())), n)
        }
        Step::Sa(p) => {
            let api = Api::<ServiceAccount>::namespaced(client.clone(), &p.namespace);
            let patch: json_patch::Patch = match serde_json::from_value(p.patch.clone()) {
                Ok(p) => p,
                Err(e) => return (p.namespace.clone(), Err(("InternalError", e.to_string(), false)), 0),
            };
            let res = api
                .patch(&p.name, &PatchParams::default(), &Patch::<Value>::Json(patch))
                .await;
            let r = match res {
                Ok(_) => Ok(None),
                // Gone meanwhile: nothing to do.
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
                Err(e) => Err((
                    "ServiceAccountPatchFailed",
                    format!(
                        "patching imagePullSecrets of ServiceAccount {}/{}: {e}",
                        p.namespace, p.name
                    ),
                    true,
                )),
            };
            (p.namespace.clone(), r, 1)
        }
        Step::Delete(d) => {
            let api = Api::<Secret>::namespaced(client.clone(), &d.namespace);
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: d.uid.clone(),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            let r = match api.delete(&d.name, &dp).await {
                Ok(_) => Ok(None),
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(None),
                Err(e) => Err((
                    "DeleteFailed",
                    format!("deleting Secret {}/{}: {e}", d.namespace, d.name),
                    true,
                )),
            };
            (d.namespace.clone(), r, 1)
        }
    }
}

type WriteResult = (Result<(), (&'static str, String, bool)>, usize);

async fn write_secret(
    client: &Client,
    owner: &Owner,
    name: &str,
    ns: &str,
    content: &Content,
    create: bool,
) -> WriteResult {
    let api = Api::<Secret>::namespaced(client.clone(), ns);
    let body = secret::apply_body(owner, name, ns, content);
    let mut requests = 0;
    if create {
        let object: Secret = match serde_json::from_value(body.clone()) {
            Ok(s) => s,
            Err(e) => return (Err(("InternalError", e.to_string(), false)), requests),
        };
        requests += 1;
        let pp = PostParams {
            field_manager: Some(OBJECT_MANAGER.to_owned()),
            ..PostParams::default()
        };
        match api.create(&pp, &object).await {
            Ok(_) => return (Ok(()), requests),
            Err(kube::Error::Api(e)) if e.code == 409 => {
                // Something is there that the cache has not shown us: ours, or not?
                requests += 1;
                match api.get_metadata_opt(name).await {
                    Ok(Some(meta)) if owner.owns(&meta.metadata) => {}
                    Ok(Some(_)) => {
                        let (_, reason, message) = conflict(ns, name);
                        return (Err((reason, message, false)), requests);
                    }
                    Ok(None) => {
                        return (
                            Err((
                                "WriteFailed",
                                format!("Secret {ns}/{name} vanished during create; retrying"),
                                true,
                            )),
                            requests,
                        );
                    }
                    Err(e) => {
                        return (
                            Err(("WriteFailed", format!("reading Secret {ns}/{name}: {e}"), true)),
                            requests,
                        );
                    }
                }
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {
                return (
                    Err(("NamespaceGone", format!("namespace {ns} no longer exists"), false)),
                    requests,
                );
            }
            Err(e) => return (Err(write_error(ns, name, &e)), requests),
        }
    }
    requests += 1;
    match api
        .patch(name, &PatchParams::apply(OBJECT_MANAGER).force(), &Patch::Apply(&body))
        .await
    {
        Ok(_) => (Ok(()), requests),
        Err(e) => (Err(write_error(ns, name, &e)), requests),
    }
}

fn write_error(ns: &str, name: &str, e: &kube::Error) -> (&'static str, String, bool) {
    let retryable = !matches!(e, kube::Error::Api(ae) if ae.code == 403 || ae.code == 422);
    let reason = match e {
        kube::Error::Api(ae) if ae.code == 403 => "Forbidden",
        _ => "WriteFailed",
    };
    (reason, format!("writing Secret {ns}/{name}: {e}"), retryable)
}

fn conflict(ns: &str, name: &str) -> (String, &'static str, String) {
    (
        ns.to_owned(),
        reasons::CONFLICT,
        format!(
            "Secret {ns}/{name} exists and is not managed by this pullkeeper credential; pullkeeper leaves it alone. Rename or delete it, or set spec.target.secretName"
        ),
    )
}

fn failure(ns: &str, reason: &str, message: String) -> NamespaceFailure {
    NamespaceFailure {
        namespace: ns.to_owned(),
        reason: reason.to_owned(),
        message,
    }
}
