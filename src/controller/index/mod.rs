//! What the engine keeps of the cluster: compact copies of namespaces, pullkeeper's own
//! Secrets and ServiceAccounts, grouped by namespace and kept current by the watches.
//!
//! A k8s-openapi object (or kube's reflector store of them) costs about a kilobyte per
//! object even trimmed: an `ObjectMeta` is 400 bytes before any of its strings, a label
//! map is a tree of nodes, and the store's key repeats the name, namespace, UID and
//! resourceVersion. At 10,000 namespaces x 20 credentials that is 200,000 Secrets. Here a
//! Secret is its name, UID, digest and a shared pointer to who wrote it (about 100 bytes),
//! and strings that repeat (Secret names, writers, `imagePullSecrets` entries) are stored
//! once.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::Hash;
use std::sync::{Arc, PoisonError, RwLock, RwLockReadGuard};

use kube::runtime::watcher;

mod objects;

pub use objects::{Account, Digest, ManagedSecret, Objects, Uid};

/// An entry of an [`Index`]: named within its namespace.
pub trait Entry: Clone {
    /// The namespace it is in (a namespace's own name for a namespace).
    fn namespace(&self) -> &str;
    /// Name within its namespace.
    fn name(&self) -> &str;
}

/// Entries grouped by namespace (for namespaces themselves, each group is the namespace's
/// own name and holds one entry).
pub struct Groups<V> {
    groups: HashMap<Box<str>, Vec<V>>,
    len: usize,
}

impl<V> Default for Groups<V> {
    fn default() -> Self {
        Self {
            groups: HashMap::new(),
            len: 0,
        }
    }
}

impl<V: Entry> Groups<V> {
    /// The entry `name` in `namespace`.
    pub fn get(&self, namespace: &str, name: &str) -> Option<&V> {
        self.within(namespace).iter().find(|v| v.name() == name)
    }

    /// Every entry in `namespace`.
    pub fn within(&self, namespace: &str) -> &[V] {
        self.groups.get(namespace).map_or(&[], Vec::as_slice)
    }

    /// Every entry.
    pub fn iter(&self) -> impl Iterator<Item = &V> {
        self.groups.values().flatten()
    }

    /// The entries in `namespaces`, or (`None`) every entry: a pass over a few namespaces
    /// looks them up instead of walking everything.
    pub fn among<'a>(&'a self, namespaces: Option<&'a BTreeSet<String>>) -> impl Iterator<Item = &'a V> + 'a {
        let (some, all) = match namespaces {
            Some(names) => (Some(names.iter().flat_map(|n| self.within(n))), None),
            None => (None, Some(self.iter())),
        };
        some.into_iter().flatten().chain(all.into_iter().flatten())
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn upsert(&mut self, value: V) {
        let group = match self.groups.get_mut(value.namespace()) {
            Some(group) => group,
            None => self.groups.entry(value.namespace().into()).or_default(),
        };
        match group.iter_mut().find(|v| v.name() == value.name()) {
            Some(slot) => *slot = value,
            None => {
                // A quarter to spare, not double: 10,000 namespaces x 20 Secrets each would
                // otherwise carry room for 12 more in every one.
                if group.len() == group.capacity() {
                    group.reserve_exact(1 + group.len() / 4);
                }
                group.push(value);
                self.len += 1;
            }
        }
    }

    fn remove(&mut self, namespace: &str, name: &str) {
        let Some(group) = self.groups.get_mut(namespace) else {
            return;
        };
        let before = group.len();
        group.retain(|v| v.name() != name);
        self.len -= before - group.len();
        if group.is_empty() {
            self.groups.remove(namespace);
        }
    }
}

struct Inner<V> {
    live: RwLock<Groups<V>>,
    /// A (re)list under way: replaces `live` when it is done, so entries deleted while the
    /// watch was away go too.
    relist: std::sync::Mutex<Option<Groups<V>>>,
}

/// A shared, read-mostly index of entries kept current by one watch.
pub struct Index<V> {
    inner: Arc<Inner<V>>,
    ready: tokio::sync::watch::Sender<bool>,
}

impl<V> Clone for Index<V> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            ready: self.ready.clone(),
        }
    }
}

impl<V: Entry> Default for Index<V> {
    fn default() -> Self {
        Self {
            inner: Arc::new(Inner {
                live: RwLock::default(),
                relist: std::sync::Mutex::default(),
            }),
            ready: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl<V: Entry> Index<V> {
    /// The entries as they are now. Hold it only for pure work (no `.await`).
    pub fn read(&self) -> RwLockReadGuard<'_, Groups<V>> {
        self.inner.live.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until the first list is in.
    pub async fn ready(&self) {
        let _ = self.ready.subscribe().wait_for(|ready| *ready).await;
    }

    /// Takes one watch event in.
    pub fn apply(&self, event: &watcher::Event<V>) {
        let write = || self.inner.live.write().unwrap_or_else(PoisonError::into_inner);
        let relist = || crate::lock(&self.inner.relist);
        match event {
            watcher::Event::Apply(v) => write().upsert(v.clone()),
            watcher::Event::Delete(v) => write().remove(v.namespace(), v.name()),
            watcher::Event::Init => *relist() = Some(Groups::default()),
            watcher::Event::InitApply(v) => {
                relist().get_or_insert_with(Groups::default).upsert(v.clone());
            }
            watcher::Event::InitDone => {
                let fresh = relist().take().unwrap_or_default();
                *write() = fresh;
                self.ready.send_replace(true);
            }
        }
    }

    /// An index holding `entries`, ready (for tests).
    #[cfg(test)]
    pub fn of(entries: impl IntoIterator<Item = V>) -> Self {
        let index = Self::default();
        index.apply(&watcher::Event::Init);
        for e in entries {
            index.apply(&watcher::Event::InitApply(e));
        }
        index.apply(&watcher::Event::InitDone);
        index
    }
}

/// A watch event of one type as one of another (kube's `watcher::Event` has no `map`).
pub fn map_event<A, B>(event: watcher::Event<A>, mut f: impl FnMut(A) -> B) -> watcher::Event<B> {
    match event {
        watcher::Event::Apply(a) => watcher::Event::Apply(f(a)),
        watcher::Event::Delete(a) => watcher::Event::Delete(f(a)),
        watcher::Event::Init => watcher::Event::Init,
        watcher::Event::InitApply(a) => watcher::Event::InitApply(f(a)),
        watcher::Event::InitDone => watcher::Event::InitDone,
    }
}

/// Values that repeat across many entries (a Secret name in every namespace, who wrote
/// it), stored once and shared.
pub struct Interner<T: ?Sized> {
    seen: HashSet<Arc<T>>,
}

impl<T: ?Sized> Default for Interner<T> {
    fn default() -> Self {
        Self { seen: HashSet::new() }
    }
}

impl<T: ?Sized + Hash + Eq> Interner<T> {
    /// The shared copy of `value`, made by `make` the first time.
    pub fn get(&mut self, value: &T, make: impl FnOnce(&T) -> Arc<T>) -> Arc<T> {
        if let Some(shared) = self.seen.get(value) {
            return shared.clone();
        }
        let shared = make(value);
        self.seen.insert(shared.clone());
        shared
    }

    /// Forgets the values nothing else holds any more.
    pub fn prune(&mut self) {
        self.seen.retain(|v| Arc::strong_count(v) > 1);
    }
}

impl Interner<str> {
    /// The shared copy of a string.
    pub fn str(&mut self, value: &str) -> Arc<str> {
        self.get(value, |v| Arc::from(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Debug, PartialEq)]
    struct E(&'static str, &'static str, u32);
    impl Entry for E {
        fn namespace(&self) -> &str {
            self.0
        }
        fn name(&self) -> &str {
            self.1
        }
    }

    fn at(ns: &'static str, e: (&'static str, u32)) -> E {
        E(ns, e.0, e.1)
    }

    #[test]
    fn among_some_namespaces_reads_only_theirs_and_none_means_all() {
        let index = Index::<E>::default();
        for (ns, name) in [("a", "x"), ("a", "y"), ("b", "x"), ("c", "x")] {
            index.apply(&watcher::Event::Apply(at(ns, (name, 1))));
        }
        let names = |within: Option<&BTreeSet<String>>| {
            let mut out: Vec<_> = index.read().among(within).map(|e| format!("{}/{}", e.0, e.1)).collect();
            out.sort();
            out
        };
        let some = BTreeSet::from(["a".to_owned(), "c".to_owned(), "gone".to_owned()]);
        assert_eq!(names(Some(&some)), ["a/x", "a/y", "c/x"]);
        assert_eq!(names(None), ["a/x", "a/y", "b/x", "c/x"]);
    }

    #[tokio::test]
    async fn a_relist_replaces_everything_and_marks_the_index_ready() {
        let index = Index::<E>::default();
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(at("a", ("x", 1))));
        assert!(index.read().is_empty(), "not in before the list is done");
        index.apply(&watcher::Event::InitApply(at("a", ("y", 1))));
        index.apply(&watcher::Event::InitApply(at("b", ("x", 1))));
        index.apply(&watcher::Event::InitDone);
        index.ready().await;
        assert_eq!(index.read().len(), 3);
        assert_eq!(index.read().within("a").len(), 2);

        index.apply(&watcher::Event::Apply(at("a", ("x", 2))));
        index.apply(&watcher::Event::Delete(at("b", ("x", 2))));
        assert_eq!(index.read().get("a", "x"), Some(&E("a", "x", 2)), "replaced in place");
        assert_eq!(index.read().len(), 2);
        assert!(index.read().within("b").is_empty(), "an empty group goes");

        // The watch was away: what is not listed again is gone.
        index.apply(&watcher::Event::Init);
        index.apply(&watcher::Event::InitApply(at("c", ("z", 1))));
        assert_eq!(index.read().len(), 2, "the old entries serve until the list is done");
        index.apply(&watcher::Event::InitDone);
        let all: Vec<_> = index.read().iter().cloned().collect();
        assert_eq!(all, vec![E("c", "z", 1)]);
    }

    #[test]
    fn repeated_values_are_shared_until_nothing_holds_them() {
        let mut strings = Interner::<str>::default();
        let a = strings.str("regcred");
        let b = strings.str("regcred");
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        strings.prune();
        assert!(strings.seen.is_empty());
    }

    #[test]
    fn events_map_variant_for_variant() {
        let e = map_event(watcher::Event::Apply(1), |n| n * 2);
        assert!(matches!(e, watcher::Event::Apply(2)));
        assert!(matches!(
            map_event(watcher::Event::<u8>::InitDone, |n| n),
            watcher::Event::InitDone
        ));
    }
}
