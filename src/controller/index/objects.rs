//! The entries of the indexes, and how watched objects become them.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{Entry, Interner};
use crate::controller::identity::{CredentialRef, Stamp};
use crate::controller::secret::{self, Owner};
use crate::controller::target::NamespaceInfo;

impl Entry for NamespaceInfo {
    fn namespace(&self) -> &str {
        &self.name
    }
    fn name(&self) -> &str {
        &self.name
    }
}

/// An object's UID: 16 bytes when it is a UUID (the apiserver makes them so), else as
/// written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Uid {
    /// A UUID.
    Uuid(uuid::Uuid),
    /// Anything else.
    Other(Box<str>),
}

impl Uid {
    /// From `metadata.uid`.
    pub fn of(uid: Option<&str>) -> Option<Self> {
        let uid = uid?;
        Some(match uuid::Uuid::try_parse(uid) {
            // Only where it reads back the same (lower case, hyphenated).
            Ok(u) if u.hyphenated().to_string() == uid => Self::Uuid(u),
            _ => Self::Other(uid.into()),
        })
    }
}

impl std::fmt::Display for Uid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Uuid(u) => u.hyphenated().fmt(f),
            Self::Other(s) => f.write_str(s),
        }
    }
}

/// A content digest as pullkeeper writes it (32 lower-case hex characters, see
/// [`secret::hash_of`]), in 16 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Digest([u8; 16]);

impl Digest {
    /// `None` for anything pullkeeper does not write as a digest.
    pub fn parse(hex: &str) -> Option<Self> {
        let canonical = hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        canonical
            .then(|| u128::from_str_radix(hex, 16).ok())
            .flatten()
            .map(|n| Self(n.to_be_bytes()))
    }
}

/// A Secret labelled `app.kubernetes.io/managed-by=pullkeeper`, as the engine plans from it.
#[derive(Clone, Debug, PartialEq)]
pub struct ManagedSecret {
    /// Namespace.
    pub namespace: Arc<str>,
    /// Name.
    pub name: Arc<str>,
    /// UID (a deletion's precondition).
    pub uid: Option<Uid>,
    /// Who wrote it; `None` when its labels are not a stamp pullkeeper makes.
    pub stamp: Option<Arc<Stamp>>,
    /// Its `pullkeeper.io/content-hash` annotation, if it is a digest.
    pub digest: Option<Digest>,
    /// Someone else's field manager owns its data, type or pullkeeper's annotations (an
    /// edit by hand): its writer puts it back.
    pub edited: bool,
    /// A digest of its resourceVersion (it changes whenever the Secret does).
    pub version: u64,
}

impl Entry for ManagedSecret {
    fn namespace(&self) -> &str {
        &self.namespace
    }
    fn name(&self) -> &str {
        &self.name
    }
}

impl ManagedSecret {
    /// From a Secret's metadata, without sharing strings (see [`Objects`] for that).
    pub fn of(meta: &ObjectMeta) -> Self {
        Objects::default().secret(meta)
    }

    /// Who wrote it.
    pub fn holder(&self) -> Option<CredentialRef> {
        self.stamp.as_ref()?.holder(&self.namespace)
    }

    /// Whether `owner` wrote it.
    pub fn owned_by(&self, owner: &Owner) -> bool {
        self.stamp.as_ref().is_some_and(|s| owner.stamped(s, &self.namespace))
    }

    /// Whether its digest annotation is `hash`.
    pub fn has_digest(&self, hash: &str) -> bool {
        self.digest.is_some() && self.digest == Digest::parse(hash)
    }
}

/// A ServiceAccount as the engine plans from it: who it is, its resourceVersion (what a
/// patch tests) and its `imagePullSecrets` names.
#[derive(Clone, Debug, PartialEq)]
pub struct Account {
    /// Namespace.
    pub namespace: Arc<str>,
    /// Name.
    pub name: Box<str>,
    /// resourceVersion.
    pub resource_version: Box<str>,
    /// `imagePullSecrets` names in order; `None` when the field is absent.
    pub pull_secrets: Option<Vec<Arc<str>>>,
}

impl Entry for Account {
    fn namespace(&self) -> &str {
        &self.namespace
    }
    fn name(&self) -> &str {
        &self.name
    }
}

impl Account {
    /// From a ServiceAccount, without sharing strings (see [`Objects`] for that).
    pub fn of(sa: &ServiceAccount) -> Self {
        Objects::default().account(sa)
    }

    /// Whether `imagePullSecrets` names `secret`.
    pub fn lists(&self, secret: &str) -> bool {
        self.pull_secrets.iter().flatten().any(|s| **s == *secret)
    }
}

/// Makes entries from watched objects, sharing the strings that repeat across them.
#[derive(Default)]
pub struct Objects {
    strings: Interner<str>,
    stamps: Interner<Stamp>,
    made: usize,
}

/// Entries made between two prunings of the shared strings.
const PRUNE_EVERY: usize = 50_000;

impl Objects {
    /// A managed Secret from its metadata.
    pub fn secret(&mut self, meta: &ObjectMeta) -> ManagedSecret {
        self.tick();
        let annotation = |k: &str| meta.annotations.as_ref().and_then(|a| a.get(k));
        ManagedSecret {
            namespace: self.strings.str(meta.namespace.as_deref().unwrap_or_default()),
            name: self.strings.str(meta.name.as_deref().unwrap_or_default()),
            uid: Uid::of(meta.uid.as_deref()),
            stamp: Stamp::of(meta).map(|s| self.stamps.get(&s, |s| Arc::new(s.clone()))),
            digest: annotation(secret::HASH_ANNOTATION).and_then(|h| Digest::parse(h)),
            edited: secret::edited_by_others(meta),
            version: {
                let mut h = DefaultHasher::new();
                meta.resource_version.hash(&mut h);
                h.finish()
            },
        }
    }

    /// A ServiceAccount.
    pub fn account(&mut self, sa: &ServiceAccount) -> Account {
        self.tick();
        let m = &sa.metadata;
        Account {
            namespace: self.strings.str(m.namespace.as_deref().unwrap_or_default()),
            name: m.name.as_deref().unwrap_or_default().into(),
            resource_version: m.resource_version.as_deref().unwrap_or_default().into(),
            pull_secrets: sa
                .image_pull_secrets
                .as_ref()
                .map(|refs| refs.iter().map(|r| self.strings.str(&r.name)).collect()),
        }
    }

    fn tick(&mut self) {
        self.made += 1;
        if self.made.is_multiple_of(PRUNE_EVERY) {
            self.strings.prune();
            self.stamps.prune();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::identity::{
        CREDENTIAL_LABEL, MANAGED_BY_LABEL, MANAGED_BY_VALUE, SCOPE_CLUSTER, SCOPE_LABEL,
    };

    fn meta(ns: &str, name: &str, hash: &str) -> ObjectMeta {
        ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            uid: Some("0b9ec3cb-3a3c-4e2d-9d51-bd1d8d3b5f0e".into()),
            resource_version: Some("42".into()),
            labels: Some(
                [
                    (MANAGED_BY_LABEL, MANAGED_BY_VALUE),
                    (CREDENTIAL_LABEL, "a"),
                    (SCOPE_LABEL, SCOPE_CLUSTER),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            ),
            annotations: Some([(secret::HASH_ANNOTATION.to_owned(), hash.to_owned())].into()),
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn a_managed_secret_keeps_who_wrote_it_its_digest_and_uid_compactly() {
        let hash = "00112233445566778899aabbccddeeff";
        let mut objects = Objects::default();
        let a = objects.secret(&meta("web", "regcred", hash));
        let b = objects.secret(&meta("api", "regcred", hash));
        assert_eq!(a.holder(), Some(CredentialRef::cluster("a")));
        assert!(a.has_digest(hash) && !a.has_digest("00112233445566778899aabbccddeefe"));
        assert_eq!(
            a.uid.as_ref().map(ToString::to_string).as_deref(),
            Some("0b9ec3cb-3a3c-4e2d-9d51-bd1d8d3b5f0e")
        );
        assert!(matches!(a.uid, Some(Uid::Uuid(_))));
        assert!(Arc::ptr_eq(&a.name, &b.name), "one copy of a name used everywhere");
        assert!(Arc::ptr_eq(
            a.stamp.as_ref().expect("stamp"),
            b.stamp.as_ref().expect("stamp")
        ));
        assert_eq!(a.version, b.version);
        let edited_by_hand = objects.secret(&meta("web", "regcred", "not-a-digest"));
        assert_eq!(edited_by_hand.digest, None);
    }

    #[test]
    fn an_entry_is_about_a_hundred_bytes() {
        // The README's figure: the entry itself; its strings and stamp are shared.
        assert!(
            std::mem::size_of::<ManagedSecret>() <= 104,
            "{}",
            std::mem::size_of::<ManagedSecret>()
        );
    }

    #[test]
    fn digests_and_uids_are_read_exactly_as_written() {
        assert!(Digest::parse("00112233445566778899aabbccddeeff").is_some());
        for odd in [
            "00112233445566778899AABBCCDDEEFF",
            "+0112233445566778899aabbccddeeff",
            "abc",
            "",
        ] {
            assert_eq!(Digest::parse(odd), None, "{odd}");
        }
        assert_eq!(
            Uid::of(Some("not-a-uuid")).map(|u| u.to_string()).as_deref(),
            Some("not-a-uuid")
        );
        let upper = "0B9EC3CB-3A3C-4E2D-9D51-BD1D8D3B5F0E";
        assert_eq!(Uid::of(Some(upper)).map(|u| u.to_string()).as_deref(), Some(upper));
        assert_eq!(Uid::of(None), None);
    }

    #[test]
    fn a_service_account_keeps_its_entries_in_order() {
        let sa: ServiceAccount = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "web", "name": "default", "resourceVersion": "7"},
            "imagePullSecrets": [{"name": "theirs"}, {"name": "regcred"}],
        }))
        .expect("service account");
        let a = Account::of(&sa);
        assert!(a.lists("regcred") && a.lists("theirs") && !a.lists("other"));
        assert_eq!(&*a.resource_version, "7");
        let names: Vec<&str> = a.pull_secrets.iter().flatten().map(|s| &**s).collect();
        assert_eq!(names, ["theirs", "regcred"]);
        let bare = Account::of(&ServiceAccount::default());
        assert_eq!(bare.pull_secrets, None);
    }
}
