//! Pure step: JSON patches that add or remove pullkeeper's entry in a ServiceAccount's
//! `imagePullSecrets`, never touching anyone else's entries or their order. Each patch
//! first tests the resourceVersion (or the entry) it was computed from, so a concurrent
//! change makes it fail and retry instead of clobbering.

use serde_json::{Value, json};

use super::index::Account;

/// A JSON patch appending `secret`, or `None` if it is already there.
pub fn add_patch(sa: &Account, secret: &str) -> Option<Value> {
    patch(sa, &[secret], &[])
}

/// A JSON patch removing every entry naming `secret`, or `None` if there is none.
pub fn remove_patch(sa: &Account, secret: &str) -> Option<Value> {
    patch(sa, &[], &[secret])
}

/// One JSON patch that removes every entry naming one of `remove` and appends each of
/// `add` not listed yet, or `None` when there is nothing to do. Removals test the entry
/// they remove (from the end, so earlier indices stay valid); appending also tests the
/// resourceVersion it was computed from, so two writers never append the same entry.
pub fn patch(sa: &Account, add: &[&str], remove: &[&str]) -> Option<Value> {
    let entries = sa.pull_secrets.as_deref().unwrap_or_default();
    let mut ops = Vec::new();
    for (i, name) in entries.iter().enumerate().rev() {
        if remove.contains(&&**name) {
            ops.push(json!({"op": "test", "path": format!("/imagePullSecrets/{i}/name"), "value": &**name}));
            ops.push(json!({"op": "remove", "path": format!("/imagePullSecrets/{i}")}));
        }
    }
    let mut missing: Vec<&str> = Vec::new();
    for secret in add {
        if !sa.lists(secret) && !missing.contains(secret) && !remove.contains(secret) {
            missing.push(secret);
        }
    }
    if !missing.is_empty() {
        let rv = &*sa.resource_version;
        ops.insert(
            0,
            json!({"op": "test", "path": "/metadata/resourceVersion", "value": rv}),
        );
        if sa.pull_secrets.is_none() {
            let all: Vec<Value> = missing.iter().map(|s| json!({"name": s})).collect();
            ops.push(json!({"op": "add", "path": "/imagePullSecrets", "value": all}));
        } else {
            for s in missing {
                ops.push(json!({"op": "add", "path": "/imagePullSecrets/-", "value": {"name": s}}));
            }
        }
    }
    (!ops.is_empty()).then_some(Value::Array(ops))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{LocalObjectReference, ServiceAccount};

    fn sa(entries: Option<&[&str]>) -> ServiceAccount {
        let mut sa = ServiceAccount::default();
        sa.metadata.resource_version = Some("42".into());
        sa.image_pull_secrets = entries.map(|e| {
            e.iter()
                .map(|n| LocalObjectReference { name: (*n).to_owned() })
                .collect()
        });
        sa
    }

    fn apply(sa: &ServiceAccount, patch: &Value) -> Vec<String> {
        let mut doc = serde_json::to_value(sa).expect("serialises");
        let p: json_patch::Patch = serde_json::from_value(patch.clone()).expect("valid patch");
        json_patch::patch(&mut doc, &p).expect("applies");
        let out: ServiceAccount = serde_json::from_value(doc).expect("deserialises");
        out.image_pull_secrets
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.name)
            .collect()
    }

    #[test]
    fn appends_after_existing_entries() {
        let s = sa(Some(&["theirs", "also-theirs"]));
        let p = add_patch(&Account::of(&s), "pullkeeper-x").expect("patch");
        assert_eq!(apply(&s, &p), vec!["theirs", "also-theirs", "pullkeeper-x"]);
    }

    #[test]
    fn creates_the_list_when_absent_and_is_idempotent() {
        let s = sa(None);
        let p = add_patch(&Account::of(&s), "pullkeeper-x").expect("patch");
        assert_eq!(apply(&s, &p), vec!["pullkeeper-x"]);
        assert_eq!(
            add_patch(&Account::of(&sa(Some(&["pullkeeper-x"]))), "pullkeeper-x"),
            None
        );
    }

    #[test]
    fn add_is_guarded_by_resource_version() {
        let s = sa(Some(&[]));
        let p = add_patch(&Account::of(&s), "x").expect("patch");
        assert_eq!(p[0]["op"], "test");
        assert_eq!(p[0]["value"], "42");
    }

    #[test]
    fn removes_only_ours_keeping_order() {
        let s = sa(Some(&["a", "pullkeeper-x", "b", "pullkeeper-x"]));
        let p = remove_patch(&Account::of(&s), "pullkeeper-x").expect("patch");
        assert_eq!(apply(&s, &p), vec!["a", "b"]);
        assert_eq!(remove_patch(&Account::of(&sa(Some(&["a"]))), "pullkeeper-x"), None);
        assert_eq!(remove_patch(&Account::of(&sa(None)), "pullkeeper-x"), None);
    }

    #[test]
    fn one_patch_removes_and_appends_for_several_credentials() {
        let s = sa(Some(&["theirs", "old", "pullkeeper-a"]));
        let p = patch(
            &Account::of(&s),
            &["pullkeeper-a", "pullkeeper-b", "pullkeeper-c", "pullkeeper-b"],
            &["old"],
        )
        .expect("patch");
        assert_eq!(p[0]["op"], "test", "appending is guarded by the resourceVersion");
        assert_eq!(
            apply(&s, &p),
            vec!["theirs", "pullkeeper-a", "pullkeeper-b", "pullkeeper-c"],
            "each missing entry once, after everyone else's"
        );
        let none = sa(None);
        let p = patch(&Account::of(&none), &["a", "b"], &["c"]).expect("patch");
        assert_eq!(apply(&none, &p), vec!["a", "b"]);
        assert_eq!(
            patch(&Account::of(&s), &["pullkeeper-a"], &["gone"]),
            None,
            "nothing to do"
        );
    }

    #[test]
    fn a_removal_alone_is_not_guarded_by_the_resource_version() {
        let p = remove_patch(&Account::of(&sa(Some(&["x"]))), "x").expect("patch");
        assert!(
            p.as_array()
                .expect("ops")
                .iter()
                .all(|op| op["path"] != "/metadata/resourceVersion")
        );
    }
}
