//! Which pass a reconcile makes. A full pass plans every namespace from the caches and
//! writes the status; at 10,000 namespaces that is tens of milliseconds of work, too much
//! to repeat for every new namespace. When all that brought the reconcile is events in a
//! few namespaces (a namespace created or relabelled, a ServiceAccount created, a Secret
//! deleted) and nothing about the credential changed since its last clean full pass, only
//! those namespaces are planned and written, with the same plan and apply steps; the
//! status (its counts) follows at most [`STATUS_LAG`] later, in a status pass: the
//! counts read from the index, without planning or writing (at 10,000 namespaces x 20
//! credentials, twenty full passes every two seconds held up the namespace passes of new
//! namespaces). A status pass that finds any targeted namespace without the current Secret
//! becomes a full pass ([`super::plan::tally`]).

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::identity::CredentialRef;

/// How long a credential's status counts may lag behind namespace passes.
pub const STATUS_LAG: Duration = Duration::from_secs(2);
/// The least wait after a namespace pass before the full pass that is due.
pub const SOON: Duration = Duration::from_millis(100);

/// What brought a reconcile, as far as the watches said.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pending {
    /// Something about the credential itself (or a timer, a source Secret, a provider's
    /// answer): everything is planned.
    Everything,
    /// Events in these namespaces only.
    Namespaces(BTreeSet<String>),
}

impl Pending {
    /// Adds what another request asks for.
    pub fn merge(&mut self, namespace: Option<&str>) {
        match (&mut *self, namespace) {
            (Pending::Namespaces(set), Some(ns)) => {
                set.insert(ns.to_owned());
            }
            (_, None) => *self = Pending::Everything,
            (Pending::Everything, Some(_)) => {}
        }
    }
}

/// The last full pass of a credential.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FullPass {
    /// The generation it planned.
    pub generation: Option<i64>,
    /// The content digest it wrote.
    pub hash: String,
    /// Every targeted namespace held the Secret afterwards, with no failure or conflict.
    pub clean: bool,
    /// When the status must be brought up to date by a status pass (set by the first
    /// namespace pass after it, or by a status write put off to coalesce counts).
    pub status_due: Option<Instant>,
}

/// The pass to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Every namespace, and the status.
    Full,
    /// Only these namespaces; then a status pass at the given time.
    Namespaces(BTreeSet<String>, Instant),
    /// These namespaces (perhaps none), then the status counts from the index; a full
    /// pass instead if the counts show a namespace without the current Secret.
    Status(BTreeSet<String>),
}

/// The pass for a reconcile brought by `pending` (`None`: not by the watches, e.g. a
/// timer or the credential itself), of a credential at `generation` about to write
/// content `hash`. Only a clean full pass of the same generation and content lets a
/// reconcile do less; a timer when the status is due makes a status pass.
pub fn choose(
    pending: Option<Pending>,
    last: Option<&FullPass>,
    generation: Option<i64>,
    hash: &str,
    now: Instant,
) -> Pass {
    let Some(last) = last.filter(|l| l.clean && l.generation == generation && l.hash == hash) else {
        return Pass::Full;
    };
    match (pending, last.status_due) {
        (Some(Pending::Everything), _) => Pass::Full,
        (None, Some(due)) if due <= now => Pass::Status(BTreeSet::new()),
        (None, _) => Pass::Full,
        (Some(Pending::Namespaces(namespaces)), Some(due)) if due <= now => Pass::Status(namespaces),
        (Some(Pending::Namespaces(namespaces)), due) => Pass::Namespaces(namespaces, due.unwrap_or(now + STATUS_LAG)),
    }
}

/// The last full pass of each credential, and the namespaces that events named since the
/// last reconcile began.
#[derive(Default)]
pub struct Passes {
    full: Mutex<HashMap<CredentialRef, FullPass>>,
    pending: Mutex<HashMap<CredentialRef, Pending>>,
}

impl Passes {
    /// Records a request for `who`: about `namespace`, or (`None`) about everything.
    pub fn request(&self, who: &CredentialRef, namespace: Option<&str>) {
        let mut pending = crate::lock(&self.pending);
        match pending.get_mut(who) {
            Some(p) => p.merge(namespace),
            None => {
                let p = match namespace {
                    Some(ns) => Pending::Namespaces(BTreeSet::from([ns.to_owned()])),
                    None => Pending::Everything,
                };
                pending.insert(who.clone(), p);
            }
        }
    }

    /// What was requested for `who` since the last call (requests arriving later bring
    /// another reconcile).
    pub fn take(&self, who: &CredentialRef) -> Option<Pending> {
        crate::lock(&self.pending).remove(who)
    }

    /// The last full pass of `who`.
    pub fn last(&self, who: &CredentialRef) -> Option<FullPass> {
        crate::lock(&self.full).get(who).cloned()
    }

    /// Records a full pass.
    pub fn full_done(&self, who: &CredentialRef, generation: Option<i64>, hash: &str, clean: bool) {
        let pass = FullPass {
            generation,
            hash: hash.to_owned(),
            clean,
            status_due: None,
        };
        crate::lock(&self.full).insert(who.clone(), pass);
    }

    /// Records a namespace pass: the status is due by `due`.
    pub fn namespaces_done(&self, who: &CredentialRef, due: Instant, clean: bool) {
        if let Some(last) = crate::lock(&self.full).get_mut(who) {
            last.status_due = Some(due);
            last.clean &= clean;
        }
    }

    /// Puts the status off until `at`: the next timer brings a status pass.
    pub fn status_later(&self, who: &CredentialRef, at: Instant) {
        if let Some(last) = crate::lock(&self.full).get_mut(who) {
            last.status_due = Some(at);
        }
    }

    /// Forgets `who` (deleted, invalid or suspended).
    pub fn forget(&self, who: &CredentialRef) {
        crate::lock(&self.full).remove(who);
        crate::lock(&self.pending).remove(who);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespaces(names: &[&str]) -> Pending {
        Pending::Namespaces(names.iter().map(|n| (*n).to_owned()).collect())
    }

    fn last(clean: bool, due: Option<Instant>) -> FullPass {
        FullPass {
            generation: Some(2),
            hash: "h".into(),
            clean,
            status_due: due,
        }
    }

    #[test]
    fn requests_merge_into_namespaces_until_one_is_about_everything() {
        let passes = Passes::default();
        let who = CredentialRef::cluster("a");
        passes.request(&who, Some("x"));
        passes.request(&who, Some("y"));
        assert_eq!(passes.take(&who), Some(namespaces(&["x", "y"])));
        assert_eq!(passes.take(&who), None, "taken");
        passes.request(&who, Some("x"));
        passes.request(&who, None);
        passes.request(&who, Some("y"));
        assert_eq!(passes.take(&who), Some(Pending::Everything));
    }

    #[test]
    fn only_namespace_events_after_a_clean_full_pass_of_the_same_content_make_a_namespace_pass() {
        let now = Instant::now();
        let ns = || Some(namespaces(&["x"]));
        let clean = last(true, None);
        assert_eq!(
            choose(ns(), Some(&clean), Some(2), "h", now),
            Pass::Namespaces(BTreeSet::from(["x".to_owned()]), now + STATUS_LAG),
            "the status follows within the lag"
        );
        assert_eq!(
            choose(None, Some(&clean), Some(2), "h", now),
            Pass::Full,
            "a timer (or the credential itself) with no status due"
        );
        assert_eq!(
            choose(Some(Pending::Everything), Some(&clean), Some(2), "h", now),
            Pass::Full
        );
        assert_eq!(choose(ns(), None, Some(2), "h", now), Pass::Full, "no full pass yet");
        assert_eq!(
            choose(ns(), Some(&clean), Some(3), "h", now),
            Pass::Full,
            "a new generation"
        );
        assert_eq!(
            choose(ns(), Some(&clean), Some(2), "h2", now),
            Pass::Full,
            "new content"
        );
        assert_eq!(
            choose(ns(), Some(&last(false, None)), Some(2), "h", now),
            Pass::Full,
            "failures: retry everything"
        );
    }

    #[test]
    fn the_status_deadline_is_fixed_by_the_first_namespace_pass_and_then_brings_a_status_pass() {
        let now = Instant::now();
        let ns = || Some(namespaces(&["x"]));
        let due = now + Duration::from_millis(500);
        let pending = last(true, Some(due));
        assert_eq!(
            choose(ns(), Some(&pending), Some(2), "h", now),
            Pass::Namespaces(BTreeSet::from(["x".to_owned()]), due),
            "a steady stream of namespaces does not push the status back"
        );
        assert_eq!(
            choose(ns(), Some(&pending), Some(2), "h", due),
            Pass::Status(BTreeSet::from(["x".to_owned()])),
            "then those namespaces and the status counts"
        );
        assert_eq!(
            choose(None, Some(&pending), Some(2), "h", due),
            Pass::Status(BTreeSet::new()),
            "the timer set for the status"
        );
        assert_eq!(
            choose(None, Some(&pending), Some(2), "h", now),
            Pass::Full,
            "before it is due, not the status timer"
        );
        assert_eq!(
            choose(None, Some(&last(false, Some(due))), Some(2), "h", due),
            Pass::Full,
            "after a failure"
        );
    }
}
