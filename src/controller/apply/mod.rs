//! I/O step: carry out a [`Plan`] with bounded concurrency, collecting per-namespace
//! failures instead of stopping at the first one.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client};

use crate::crd::NamespaceFailure;

use super::OBJECT_MANAGER;
use super::identity::CredentialRef;
use super::plan::{Delete, Plan, SaChange, Write};
use super::secret::{self, Content, Owner};

mod accounts;
mod error;
pub use accounts::Accounts;
pub use error::Error;
pub(crate) use error::status_code;

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

/// What one namespace needs, in order: its Secret, then its ServiceAccount entries (so no
/// ServiceAccount names a Secret that is not there yet, and none trails behind the
/// Secrets of other namespaces), then deletions.
#[derive(Default)]
struct Unit {
    write: Option<Write>,
    sa_changes: Vec<SaChange>,
    deletes: Vec<Delete>,
}

/// Executes the plan, namespaces concurrently (at most `concurrency` at once), each
/// namespace's steps in order; a namespace whose Secret could not be written gets no
/// ServiceAccount entry. The plan's steps move into the work (at 10,000 namespaces a
/// copy of them was megabytes at the peak); its `targeted` and `current` are not read.
pub async fn execute(
    client: &Client,
    accounts: &Accounts,
    owner: &Owner,
    secret_name: &str,
    content: Option<&Content>,
    plan: Plan,
    concurrency: usize,
) -> Outcome {
    let mut out = Outcome::default();
    for c in plan.conflicts {
        let conflict = Error::Conflict {
            namespace: c.namespace,
            name: secret_name.to_owned(),
            holder: c.holder,
        };
        out.failures.push(conflict.to_failure());
    }
    let mut units: BTreeMap<String, Unit> = BTreeMap::new();
    for w in plan.writes {
        let (Write::Create(ns) | Write::Apply(ns)) = &w;
        let ns = ns.clone();
        units.entry(ns).or_default().write = Some(w);
    }
    for c in plan.sa_changes {
        match units.get_mut(&c.namespace) {
            Some(unit) => unit.sa_changes.push(c),
            None => units.entry(c.namespace.clone()).or_default().sa_changes.push(c),
        }
    }
    for d in plan.deletes {
        match units.get_mut(&d.namespace) {
            Some(unit) => unit.deletes.push(d),
            None => units.entry(d.namespace.clone()).or_default().deletes.push(d),
        }
    }
    // Each namespace's results are taken in as they come, not gathered first (at 10,000
    // namespaces that was megabytes at the peak).
    let mut results = futures::stream::iter(units.into_values())
        .map(|unit| run_unit(client, accounts, owner, secret_name, content, unit))
        .buffer_unordered(concurrency.max(1));
    while let Some(steps) = results.next().await {
        for (result, requests) in steps {
            out.requests += requests;
            match result {
                Ok(Some(written)) => out.written.push(written),
                Ok(None) => {}
                Err(e) => {
                    out.retryable |= e.retryable();
                    out.failures.push(e.to_failure());
                }
            }
        }
    }
    out.failures.sort_by(|a, b| a.namespace.cmp(&b.namespace));
    out
}

/// The namespace written (if any), or why not; and the requests made.
type StepResult = (Result<Option<String>, Arc<Error>>, usize);

async fn run_unit(
    client: &Client,
    accounts: &Accounts,
    owner: &Owner,
    name: &str,
    content: Option<&Content>,
    unit: Unit,
) -> Vec<StepResult> {
    let mut results = Vec::new();
    if let (Some(w), Some(content)) = (unit.write, content) {
        let (ns, create) = match &w {
            Write::Create(ns) => (ns, true),
            Write::Apply(ns) => (ns, false),
        };
        let (res, n) = write_secret(client, owner, name, ns, content, create).await;
        let failed = res.is_err();
        results.push((res.map(|()| Some(ns.clone())).map_err(Arc::new), n));
        if failed {
            return results;
        }
    }
    for change in unit.sa_changes {
        let (res, n) = accounts.change(change).await;
        results.push((res.map(|()| None), n));
    }
    for d in unit.deletes {
        results.push(delete(client, &d).await);
    }
    results
}

async fn delete(client: &Client, d: &Delete) -> StepResult {
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
        Err(source) => Err(Arc::new(Error::Delete {
            namespace: d.namespace.clone(),
            name: d.name.clone(),
            source,
        })),
    };
    (r, 1)
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
