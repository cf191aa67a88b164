//! Status writes coalesced while only counts change: fifty new namespaces in a second are
//! one status write, not fifty (each write is paid by etcd and every watcher).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::crd::RegistryCredentialStatus;

use super::super::identity::CredentialRef;

/// At most one counts-only status write per credential in this interval.
pub const COALESCE: Duration = Duration::from_secs(2);

/// Whether `next` differs from `previous` only in namespace counts and condition messages
/// (no condition changed status or reason, no failure, image or time changed). Pure.
pub fn counts_only(previous: &RegistryCredentialStatus, next: &RegistryCredentialStatus) -> bool {
    let strip = |s: &RegistryCredentialStatus| {
        let mut s = s.clone();
        s.namespaces = None;
        for c in &mut s.conditions {
            c.message.clear();
        }
        s
    };
    strip(previous) == strip(next)
}

/// When each credential's status was last written.
#[derive(Default)]
pub struct StatusWrites {
    last: Mutex<HashMap<CredentialRef, Instant>>,
}

impl StatusWrites {
    /// Whether `who`'s status was written less than [`COALESCE`] ago.
    pub fn recent(&self, who: &CredentialRef) -> bool {
        crate::lock(&self.last)
            .get(who)
            .is_some_and(|at| at.elapsed() < COALESCE)
    }

    /// Notes a write now.
    pub fn record(&self, who: CredentialRef) {
        let mut last = crate::lock(&self.last);
        // Forget old entries now and then, so deleted credentials do not pile up.
        if last.len() > 1024 {
            last.retain(|_, at| at.elapsed() < COALESCE);
        }
        last.insert(who, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::NamespaceCounts;
    use crate::crd::conditions::{Desired, Status, reasons, types};

    fn status(synced: i32, ready: Status, reason: &str) -> RegistryCredentialStatus {
        let mut s = RegistryCredentialStatus {
            observed_generation: Some(1),
            namespaces: Some(NamespaceCounts {
                targeted: synced,
                synced,
                failed: 0,
            }),
            ..RegistryCredentialStatus::default()
        };
        let now = k8s_openapi::jiff::Timestamp::from_second(1_800_000_000).expect("t");
        let ready = Desired::new(
            types::READY,
            ready,
            reason,
            format!("{synced} targeted namespaces hold the current secret"),
        );
        s.conditions = crate::crd::conditions::merge(&[], &[ready], &[], Some(1), now);
        s
    }

    #[test]
    fn only_counts_and_messages_changing_is_coalesced_anything_else_is_written_at_once() {
        let before = status(10, Status::True, reasons::SYNCED);
        assert!(counts_only(&before, &status(11, Status::True, reasons::SYNCED)));
        assert!(!counts_only(&before, &status(11, Status::False, reasons::SYNC_FAILED)));
        let mut failed = status(11, Status::True, reasons::SYNCED);
        failed.failures.push(crate::crd::NamespaceFailure {
            namespace: "a".into(),
            reason: "WriteFailed".into(),
            message: "x".into(),
        });
        assert!(!counts_only(&before, &failed));
    }

    #[test]
    fn a_write_is_recent_for_the_coalescing_interval_per_credential() {
        let w = StatusWrites::default();
        let a = CredentialRef::cluster("a");
        assert!(!w.recent(&a));
        w.record(a.clone());
        assert!(w.recent(&a));
        assert!(!w.recent(&CredentialRef::cluster("b")));
    }
}
