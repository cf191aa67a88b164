//! Pure: what a round of the operator's workload checks changed since the last one (the
//! Events and metric series to publish, only on transitions), which workloads need a check
//! at all, and what each credential's status says about the images pulled with it.

use std::collections::{BTreeMap, BTreeSet};

use super::images::{ContainerKind, WorkloadKind};
use super::plan::{Finding, Target};
use crate::controller::identity::CredentialRef;
use crate::crd::{MAX_WORKLOAD_EXAMPLES, WorkloadExample, WorkloadSummary};
use crate::metrics::WorkloadImageLabels;

/// A workload: namespace, kind and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadKey {
    /// Namespace.
    pub namespace: String,
    /// Kind.
    pub kind: WorkloadKind,
    /// Name.
    pub name: String,
}

/// One container (or image volume) of a workload.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ContainerKey {
    /// Whose.
    pub workload: WorkloadKey,
    /// Its name.
    pub container: String,
    /// Where in the pod spec.
    pub container_kind: ContainerKind,
}

impl ContainerKey {
    /// The container a check or finding is about.
    pub fn of(t: &Target) -> Self {
        Self {
            workload: WorkloadKey {
                namespace: t.namespace.clone(),
                kind: t.kind,
                name: t.name.clone(),
            },
            container: t.container.clone(),
            container_kind: t.container_kind,
        }
    }

    /// Its metric series for `reason`.
    pub fn labels(&self, reason: &str) -> WorkloadImageLabels {
        WorkloadImageLabels {
            namespace: self.workload.namespace.clone(),
            kind: self.workload.kind.as_str(),
            workload: self.workload.name.clone(),
            container: self.container.clone(),
            reason: reason.to_owned(),
        }
    }
}

/// The last answer for one container.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// The image as written.
    pub image: String,
    /// The credentials whose Secrets were among the pull Secrets tried.
    pub credentials: Vec<CredentialRef>,
    /// Why it would not pull (or cannot be told); `None`: it pulls.
    pub finding: Option<Finding>,
}

/// What a round changed for one container.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// It turned unpullable, or unpullable for another reason or image: a Warning Event
    /// and its series (replacing the one of the reason it `was` unpullable for).
    Failing {
        /// Why now.
        finding: Finding,
        /// The reason before, if it failed before.
        was: Option<String>,
    },
    /// It pulls again (or its workload no longer uses it): a Normal Event, no series.
    Fixed {
        /// Which.
        key: ContainerKey,
        /// The image it pulls now (or the one it used).
        image: String,
        /// The reason it failed for.
        was: String,
    },
    /// Its workload is gone or no longer checked: its series goes, without an Event.
    Forgotten {
        /// Which.
        key: ContainerKey,
        /// The reason it failed for.
        was: String,
    },
}

impl Change {
    /// The metric series this change removes and the one it sets.
    pub fn series(&self) -> (Option<WorkloadImageLabels>, Option<WorkloadImageLabels>) {
        match self {
            Change::Failing { finding, was } => {
                let key = ContainerKey::of(&finding.target);
                (was.as_deref().map(|r| key.labels(r)), Some(key.labels(&finding.reason)))
            }
            Change::Fixed { key, was, .. } | Change::Forgotten { key, was } => (Some(key.labels(was)), None),
        }
    }
}

/// What the checks know between rounds: each container's last answer and the fingerprint
/// each workload had when it was checked.
#[derive(Default)]
pub struct Tracker {
    records: BTreeMap<ContainerKey, Record>,
    fingerprints: BTreeMap<WorkloadKey, u64>,
}

impl Tracker {
    /// The workloads of `current` (with their fingerprints) to check: all of them in a full
    /// round, else those that are new or changed since their last check.
    pub fn dirty(&self, current: &BTreeMap<WorkloadKey, u64>, full: bool) -> BTreeSet<WorkloadKey> {
        current
            .iter()
            .filter(|(k, f)| full || self.fingerprints.get(*k) != Some(*f))
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Takes the `records` of a round that checked the workloads `checked` of `current`
    /// (every workload checked now), forgets the workloads no longer in `current`, and
    /// returns what changed.
    pub fn update(
        &mut self,
        current: &BTreeMap<WorkloadKey, u64>,
        checked: &BTreeSet<WorkloadKey>,
        records: BTreeMap<ContainerKey, Record>,
    ) -> Vec<Change> {
        let mut changes = Vec::new();
        let (old, gone_or_kept): (BTreeMap<_, _>, BTreeMap<_, _>) = std::mem::take(&mut self.records)
            .into_iter()
            .partition(|(k, _)| checked.contains(&k.workload));
        for (key, r) in gone_or_kept {
            if current.contains_key(&key.workload) {
                self.records.insert(key, r);
            } else if let Some(f) = r.finding {
                changes.push(Change::Forgotten { key, was: f.reason });
            }
        }
        for (key, r) in &records {
            let before = old.get(key).and_then(|o| o.finding.as_ref());
            match (before, &r.finding) {
                (None, Some(f)) => changes.push(Change::Failing {
                    finding: f.clone(),
                    was: None,
                }),
                (Some(o), Some(f)) if o.reason != f.reason || o.target.image != f.target.image => {
                    changes.push(Change::Failing {
                        finding: f.clone(),
                        was: Some(o.reason.clone()),
                    });
                }
                (Some(o), None) => changes.push(Change::Fixed {
                    key: key.clone(),
                    image: r.image.clone(),
                    was: o.reason.clone(),
                }),
                _ => {}
            }
        }
        // A container the workload no longer has: what failed there is fixed too.
        for (key, o) in old {
            if let (false, Some(f)) = (records.contains_key(&key), o.finding) {
                changes.push(Change::Fixed {
                    key,
                    image: o.image,
                    was: f.reason,
                });
            }
        }
        self.records.extend(records);
        self.fingerprints.retain(|k, _| current.contains_key(k));
        for w in checked {
            if let Some(f) = current.get(w) {
                self.fingerprints.insert(w.clone(), *f);
            }
        }
        changes
    }

    /// Per credential involved: how many image uses its Secret was tried for, how many of
    /// them would not pull, and the first few of those.
    pub fn summaries(&self) -> BTreeMap<CredentialRef, WorkloadSummary> {
        let mut out: BTreeMap<CredentialRef, WorkloadSummary> = BTreeMap::new();
        for (key, r) in &self.records {
            let involved: BTreeSet<&CredentialRef> = r.credentials.iter().collect();
            for c in involved {
                let s = out.entry(c.clone()).or_default();
                s.images = s.images.saturating_add(1);
                let Some(f) = &r.finding else { continue };
                s.unpullable = s.unpullable.saturating_add(1);
                if s.examples.len() < MAX_WORKLOAD_EXAMPLES {
                    s.examples.push(WorkloadExample {
                        namespace: key.workload.namespace.clone(),
                        kind: key.workload.kind.as_str().to_owned(),
                        name: key.workload.name.clone(),
                        container: key.container.clone(),
                        image: r.image.clone(),
                        reason: f.reason.clone(),
                    });
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(name: &str, container: &str, image: &str) -> Target {
        Target {
            namespace: "ns".into(),
            kind: WorkloadKind::Deployment,
            name: name.into(),
            container: container.into(),
            container_kind: ContainerKind::Container,
            image: image.into(),
        }
    }

    fn record(name: &str, container: &str, image: &str, reason: Option<&str>) -> (ContainerKey, Record) {
        let t = target(name, container, image);
        let finding = reason.map(|r| Finding {
            target: t.clone(),
            verdict: "Unpullable",
            reason: r.into(),
            message: "m".into(),
            credentials: vec![],
        });
        (
            ContainerKey::of(&t),
            Record {
                image: image.into(),
                credentials: vec![CredentialRef::cluster("ghcr")],
                finding,
            },
        )
    }

    fn wk(name: &str) -> WorkloadKey {
        WorkloadKey {
            namespace: "ns".into(),
            kind: WorkloadKind::Deployment,
            name: name.into(),
        }
    }

    fn kinds(changes: &[Change]) -> Vec<(String, String)> {
        changes
            .iter()
            .map(|c| match c {
                Change::Failing { finding, .. } => (format!("failing {}", finding.target.name), finding.reason.clone()),
                Change::Fixed { key, was, .. } => (format!("fixed {}", key.workload.name), was.clone()),
                Change::Forgotten { key, was } => (format!("forgotten {}", key.workload.name), was.clone()),
            })
            .collect()
    }

    #[test]
    fn events_only_on_transitions_and_series_follow_the_reason() {
        let mut t = Tracker::default();
        let current = BTreeMap::from([(wk("web"), 1), (wk("ok"), 1)]);
        let all = t.dirty(&current, false);
        assert_eq!(all.len(), 2, "new workloads are checked");
        let round = BTreeMap::from([
            record("web", "app", "r/web:v1", Some("NotFound")),
            record("ok", "app", "r/ok:v1", None),
        ]);
        let changes = t.update(&current, &all, round.clone());
        assert_eq!(kinds(&changes), vec![("failing web".into(), "NotFound".into())]);
        let (removed, set) = changes[0].series();
        assert!(removed.is_none());
        assert_eq!(set.expect("series").reason, "NotFound");

        // The same answer again: nothing to say, and nothing changed needs no check.
        assert!(t.update(&current, &all, round).is_empty());
        assert!(t.dirty(&current, false).is_empty());
        assert_eq!(t.dirty(&current, true).len(), 2, "a full round checks everything");

        // Another reason replaces the series; then the fix removes it.
        let changes = t.update(
            &current,
            &all,
            BTreeMap::from([record("web", "app", "r/web:v1", Some("Unauthorized"))]),
        );
        assert_eq!(kinds(&changes), vec![("failing web".into(), "Unauthorized".into())]);
        assert_eq!(changes[0].series().0.expect("old series").reason, "NotFound");
        let changes = t.update(
            &current,
            &BTreeSet::from([wk("web")]),
            BTreeMap::from([record("web", "app", "r/web:v2", None)]),
        );
        assert_eq!(kinds(&changes), vec![("fixed web".into(), "Unauthorized".into())]);
        assert_eq!(
            changes[0].series(),
            (
                Some(ContainerKey::of(&target("web", "app", "")).labels("Unauthorized")),
                None
            )
        );
    }

    #[test]
    fn a_changed_workload_is_dirty_and_a_gone_one_is_forgotten_without_an_event() {
        let mut t = Tracker::default();
        let current = BTreeMap::from([(wk("web"), 1), (wk("batch"), 1)]);
        let checked = t.dirty(&current, false);
        t.update(
            &current,
            &checked,
            BTreeMap::from([
                record("web", "app", "r/web:v1", Some("NotFound")),
                record("batch", "app", "r/batch:v1", Some("Denied")),
            ]),
        );
        let now = BTreeMap::from([(wk("web"), 2)]);
        assert_eq!(t.dirty(&now, false), BTreeSet::from([wk("web")]));
        // The template changed and dropped the container that failed.
        let changes = t.update(
            &now,
            &BTreeSet::from([wk("web")]),
            BTreeMap::from([record("web", "main", "r/web:v2", None)]),
        );
        let mut got = kinds(&changes);
        got.sort();
        assert_eq!(
            got,
            vec![
                ("fixed web".into(), "NotFound".into()),
                ("forgotten batch".into(), "Denied".into())
            ]
        );
        assert!(t.summaries()[&CredentialRef::cluster("ghcr")].unpullable == 0);
    }

    #[test]
    fn summaries_count_image_uses_per_credential_with_a_few_examples() {
        let mut t = Tracker::default();
        let mut round = BTreeMap::new();
        let mut current = BTreeMap::new();
        for i in 0..8 {
            let reason = (i % 2 == 0).then_some("NotFound");
            let (k, r) = record(&format!("w{i}"), "app", "r/x:v1", reason);
            current.insert(k.workload.clone(), 1);
            round.insert(k, r);
        }
        let (k, mut r) = record("anonymous", "app", "r/x:v1", Some("Unauthorized"));
        r.credentials.clear();
        current.insert(k.workload.clone(), 1);
        round.insert(k, r);
        let checked = t.dirty(&current, true);
        t.update(&current, &checked, round);
        let s = t.summaries();
        assert_eq!(s.len(), 1, "only credentials whose Secret was tried");
        let ghcr = &s[&CredentialRef::cluster("ghcr")];
        assert_eq!((ghcr.images, ghcr.unpullable), (8, 4));
        assert_eq!(ghcr.examples.len(), 4);
        assert_eq!(ghcr.examples[0].name, "w0");
        assert_eq!(ghcr.examples[0].reason, "NotFound");
    }
}
