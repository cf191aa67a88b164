//! I/O step: carry out a [`Plan`] with bounded concurrency, collecting per-namespace
//! failures instead of stopping at the first one.

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client};
use serde_json::Value;

use crate::crd::NamespaceFailure;

use super::OBJECT_MANAGER;
use super::identity::CredentialRef;
use super::plan::{Delete, Plan, SaPatch, Write};
use super::secret::{self, Content, Owner};

mod error;
pub use error::Error;
use error::status_code;

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
    for c in &plan.conflicts {
        let conflict = Error::Conflict {
            namespace: c.namespace.clone(),
            name: secret_name.to_owned(),
            holder: c.holder.clone(),
        };
        out.failures.push(conflict.to_failure());
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
        for (result, requests) in results {
            out.requests += requests;
            match result {
                Ok(Some(written)) => out.written.push(written),
                Ok(None) => {}
                Err(e) => {
                    out.retryable |= e.retryable();
                    failed_ns.insert(e.namespace().to_owned());
                    out.failures.push(e.to_failure());
                }
            }
        }
    }
    out.failures.sort_by(|a, b| a.namespace.cmp(&b.namespace));
    out
}

/// The namespace written (if any), or why not; and the requests made.
type StepResult = (Result<Option<String>, Error>, usize);

async fn run(client: &Client, owner: &Owner, name: &str, content: Option<&Content>, step: Step) -> StepResult {
    match step {
        Step::Write(w) => {
            let (ns, create) = match &w {
                Write::Create(ns) => (ns, true),
                Write::Apply(ns) => (ns, false),
            };
            let Some(content) = content else {
                return (Ok(None), 0);
            };
            let (res, n) = write_secret(client, owner, name, ns, content, create).await;
            (res.map(|()| Some(ns.clone())), n)
        }
        Step::Sa(p) => {
            let api = Api::<ServiceAccount>::namespaced(client.clone(), &p.namespace);
            let patch: json_patch::Patch = match serde_json::from_value(p.patch.clone()) {
                Ok(p) => p,
                Err(source) => {
                    return (
                        Err(Error::Body {
                            namespace: p.namespace.clone(),
                            source,
                        }),
                        0,
                    );
                }
            };
            let res = api
                .patch(&p.name, &PatchParams::default(), &Patch::<Value>::Json(patch))
                .await;
            let r = match res {
                Ok(_) => Ok(None),
                // Gone meanwhile: nothing to do.
                Err(e) if status_code(&e) == Some(404) => Ok(None),
                Err(source) => Err(Error::PatchServiceAccount {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    source,
                }),
            };
            (r, 1)
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
                Err(e) if matches!(status_code(&e), Some(404 | 409)) => Ok(None),
                Err(source) => Err(Error::Delete {
                    namespace: d.namespace.clone(),
                    name: d.name.clone(),
                    source,
                }),
            };
            (r, 1)
        }
    }
}

async fn write_secret(
    client: &Client,
    owner: &Owner,
    name: &str,
    ns: &str,
    content: &Content,
    create: bool,
) -> (Result<(), Error>, usize) {
    let api = Api::<Secret>::namespaced(client.clone(), ns);
    let body = secret::apply_body(owner, name, ns, content);
    let at = || (ns.to_owned(), name.to_owned());
    let mut requests = 0;
    if create {
        let object: Secret = match serde_json::from_value(body.clone()) {
            Ok(s) => s,
            Err(source) => {
                return (
                    Err(Error::Body {
                        namespace: ns.to_owned(),
                        source,
                    }),
                    requests,
                );
            }
        };
        requests += 1;
        let pp = PostParams {
            field_manager: Some(OBJECT_MANAGER.to_owned()),
            ..PostParams::default()
        };
        match api.create(&pp, &object).await {
            Ok(_) => return (Ok(()), requests),
            Err(e) if status_code(&e) == Some(409) => {
                // Something is there that the cache has not shown us: ours, or not?
                requests += 1;
                let (namespace, name) = at();
                let r = match api.get_metadata_opt(&name).await {
                    Ok(Some(meta)) if owner.owns(&meta.metadata) => None,
                    Ok(Some(meta)) => Some(Error::Conflict {
                        holder: CredentialRef::holder_of(&meta.metadata),
                        namespace,
                        name,
                    }),
                    Ok(None) => Some(Error::Vanished { namespace, name }),
                    Err(source) => Some(Error::Read {
                        namespace,
                        name,
                        source,
                    }),
                };
                if let Some(e) = r {
                    return (Err(e), requests);
                }
            }
            Err(e) if status_code(&e) == Some(404) => {
                return (
                    Err(Error::NamespaceGone {
                        namespace: ns.to_owned(),
                    }),
                    requests,
                );
            }
            Err(source) => {
                let (namespace, name) = at();
                return (
                    Err(Error::Write {
                        namespace,
                        name,
                        source,
                    }),
                    requests,
                );
            }
        }
    }
    requests += 1;
    match api
        .patch(name, &PatchParams::apply(OBJECT_MANAGER).force(), &Patch::Apply(&body))
        .await
    {
        Ok(_) => (Ok(()), requests),
        Err(source) => {
            let (namespace, name) = at();
            (
                Err(Error::Write {
                    namespace,
                    name,
                    source,
                }),
                requests,
            )
        }
    }
}
