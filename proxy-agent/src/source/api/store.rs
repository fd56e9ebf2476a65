//! [`ObjectStore`]: the objects of one watched resource, kept the way the
//! model compares states cheaply.
use std::{
    collections::HashSet,
    hash::{BuildHasher, RandomState},
    sync::{Arc, RwLock},
};

use hashbrown::HashTable;

use k8s_openapi::api::{
    core::v1::{Node, ObjectReference, Service},
    discovery::v1::EndpointSlice,
    networking::v1::ServiceCIDR,
};
use kube::{Resource, api::ObjectMeta, runtime::watcher};

use crate::model::{Identity, Objects, ServiceObject, Slice};

/// What a store keeps of each object its watch delivers.
pub trait Kept: Sized + Send + Sync + 'static {
    /// The watched API type.
    type Watched: Resource;

    /// The form kept of `object`: a compact copy, made after the parsed
    /// original (whose pieces lie between the parser's freed scratch) is
    /// dropped, so that kept objects do not pin the parser's memory.
    fn keep(object: Self::Watched) -> Self;

    /// (namespace, name), "" where unset.
    fn key(&self) -> Key<'_>;

    fn resource_version(&self) -> Option<&str>;

    /// A reference to the object, for the Events that name it.
    fn reference(&self) -> ObjectReference;
}

/// kubectl's copy of the object as last applied: often as large as the
/// object itself, and never read here.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what the model never reads before an object is kept as it is
/// (Services and EndpointSlices are reduced instead, see [`Kept`]): its
/// managed fields and kubectl's last-applied copy, which on a real cluster
/// are a large share of every object kept (Cilium keeps slim objects for the
/// same reason). Labels, the other annotations, spec and status stay.
fn slim<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

/// What each kind keeps: [`slim`], and what of the kind the model never
/// reads.
trait Slim: Resource + Sized {
    fn slim(&mut self) {
        slim(self);
    }
}

impl Slim for ServiceCIDR {}

impl Slim for Node {
    /// Also the images the node holds (often tens of kilobytes) and its
    /// volumes.
    fn slim(&mut self) {
        slim(self);
        if let Some(status) = self.status.as_mut() {
            status.images = None;
            status.volumes_attached = None;
            status.volumes_in_use = None;
        }
    }
}

macro_rules! kept_as_is {
    ($($kind:ty),*) => {$(
        impl Kept for $kind {
            type Watched = $kind;

            fn keep(mut object: $kind) -> Self {
                Slim::slim(&mut object);
                object.clone()
            }

            fn key(&self) -> Key<'_> {
                key_of(Resource::meta(self))
            }

            fn resource_version(&self) -> Option<&str> {
                Resource::meta(self).resource_version.as_deref()
            }

            fn reference(&self) -> ObjectReference {
                self.object_ref(&())
            }
        }
    )*};
}

kept_as_is!(Node, ServiceCIDR);

macro_rules! kept_reduced {
    ($($kept:ty => $kind:ty),*) => {$(
        impl Kept for $kept {
            type Watched = $kind;

            fn keep(object: $kind) -> Self {
                <$kept>::new(&object)
            }

            fn key(&self) -> Key<'_> {
                (
                    self.identity.namespace.as_deref().unwrap_or_default(),
                    self.identity.name.as_deref().unwrap_or_default(),
                )
            }

            fn resource_version(&self) -> Option<&str> {
                self.identity.resource_version.as_deref()
            }

            fn reference(&self) -> ObjectReference {
                reference_to::<$kind>(&self.identity)
            }
        }
    )*};
}

// Services and EndpointSlices are kept as the model reads them: their
// identity and checked plan, a fraction of the object.
kept_reduced!(ServiceObject => Service, Slice => EndpointSlice);

/// A reference to the object of kind `K` that `id` identifies.
fn reference_to<K: k8s_openapi::Resource>(id: &Identity) -> ObjectReference {
    ObjectReference {
        api_version: Some(K::API_VERSION.to_owned()),
        kind: Some(K::KIND.to_owned()),
        name: id.name.clone(),
        namespace: id.namespace.clone(),
        uid: id.uid.clone(),
        resource_version: id.resource_version.clone(),
        ..Default::default()
    }
}

/// The objects of one resource as its watch delivered them, in an
/// [`Objects`] list: a changed object replaces its old version in place, so
/// a published copy shares every chunk but one with the last. A relist
/// (after `410 Gone` or an outage) is buffered and applied when complete,
/// so a partial list is never seen; objects it brings back unchanged (same
/// resourceVersion) keep their `Arc`, so the model redoes nothing for them.
pub struct ObjectStore<K> {
    inner: Arc<RwLock<Inner<K>>>,
}

impl<K> Clone for ObjectStore<K> {
    fn clone(&self) -> Self {
        ObjectStore {
            inner: self.inner.clone(),
        }
    }
}

impl<K> Default for ObjectStore<K> {
    fn default() -> Self {
        ObjectStore {
            inner: Arc::new(RwLock::new(Inner {
                objects: Objects::new(),
                index: HashTable::new(),
                hasher: RandomState::new(),
                relist: None,
            })),
        }
    }
}

struct Inner<K> {
    objects: Objects<K>,
    /// The positions in `objects`, found by (namespace, name) (hashed from
    /// the objects themselves: tens of thousands of keys are not copied).
    index: HashTable<usize>,
    hasher: RandomState,
    /// The objects of a relist under way.
    relist: Option<Vec<Arc<K>>>,
}

/// (namespace, name).
pub type Key<'a> = (&'a str, &'a str);

fn key_of(meta: &ObjectMeta) -> Key<'_> {
    (
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
    )
}

impl<K: Kept> ObjectStore<K> {
    /// A copy of the list: one reference count per chunk.
    pub fn snapshot(&self) -> Objects<K> {
        self.read(|inner| inner.objects.clone())
    }

    pub fn len(&self) -> usize {
        self.read(|inner| inner.objects.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The object `namespace/name` ("" for cluster-scoped ones).
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<K>> {
        self.read(|inner| {
            let at = inner.position((namespace, name))?;
            inner.objects.get(at).cloned()
        })
    }

    fn read<T>(&self, f: impl FnOnce(&Inner<K>) -> T) -> T {
        // A writer that panicked left a consistent list (each step of an
        // update is whole), so a poisoned lock is still read.
        let guard = self.inner.read().unwrap_or_else(|e| e.into_inner());
        f(&guard)
    }

    /// Takes one event of the watch.
    pub fn apply(&self, event: watcher::Event<K::Watched>) {
        let mut guard = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *guard;
        match event {
            watcher::Event::Apply(object) => inner.upsert(Arc::new(K::keep(object))),
            watcher::Event::Delete(object) => inner.remove(key_of(object.meta())),
            watcher::Event::Init => inner.relist = Some(Vec::new()),
            watcher::Event::InitApply(object) => {
                inner
                    .relist
                    .get_or_insert_with(Vec::new)
                    .push(Arc::new(K::keep(object)));
            }
            watcher::Event::InitDone => {
                let listed = inner.relist.take().unwrap_or_default();
                inner.replace_all(listed);
            }
        }
    }
}

impl<K: Kept> Inner<K> {
    fn position(&self, key: Key<'_>) -> Option<usize> {
        let hash = self.hasher.hash_one(key);
        self.index
            .find(hash, |at| {
                self.objects.get(*at).is_some_and(|o| o.key() == key)
            })
            .copied()
    }

    fn upsert(&mut self, object: Arc<K>) {
        if let Some(at) = self.position(object.key()) {
            self.objects.set(at, object);
            return;
        }
        let hash = self.hasher.hash_one(object.key());
        let at = self.objects.len();
        self.objects.push(object);
        let (objects, hasher) = (&self.objects, &self.hasher);
        self.index.insert_unique(hash, at, |at| {
            objects.get(*at).map_or(0, |o| hasher.hash_one(o.key()))
        });
    }

    fn remove(&mut self, key: Key<'_>) {
        let Some(at) = self.position(key) else {
            return;
        };
        let hash = self.hasher.hash_one(key);
        if let Ok(entry) = self.index.find_entry(hash, |other| *other == at) {
            entry.remove();
        }
        let last = self.objects.len() - 1;
        self.objects.swap_remove(at);
        // The last object moved into the freed position.
        if let Some(moved) = self.objects.get(at) {
            let hash = self.hasher.hash_one(moved.key());
            if let Some(position) = self.index.find_mut(hash, |other| *other == last) {
                *position = at;
            }
        }
    }

    /// The content of a completed relist: what it lacks is removed, what
    /// it changed is replaced, what it brings back unchanged is kept.
    fn replace_all(&mut self, listed: Vec<Arc<K>>) {
        let listed_keys: HashSet<Key<'_>> = listed.iter().map(|o| o.key()).collect();
        let gone: Vec<Arc<K>> = self
            .objects
            .iter()
            .filter(|o| !listed_keys.contains(&o.key()))
            .cloned()
            .collect();
        drop(listed_keys);
        for object in gone {
            self.remove(object.key());
        }
        for object in listed {
            if let Some(at) = self.position(object.key())
                && let Some(current) = self.objects.get(at)
                && current.resource_version().is_some()
                && current.resource_version() == object.resource_version()
            {
                continue;
            }
            self.upsert(object);
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::Service;
    use kube::api::ObjectMeta;

    use super::*;

    fn svc(name: &str, version: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some(name.into()),
                resource_version: Some(version.into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn names(store: &ObjectStore<ServiceObject>) -> Vec<String> {
        let mut names: Vec<String> = store
            .snapshot()
            .iter()
            .map(|s| {
                format!(
                    "{}@{}",
                    s.identity.name.clone().unwrap_or_default(),
                    s.identity.resource_version.clone().unwrap_or_default()
                )
            })
            .collect();
        names.sort();
        names
    }

    #[test]
    fn events_update_in_place_and_deletes_keep_the_index() {
        let store = ObjectStore::default();
        store.apply(watcher::Event::Init);
        for name in ["a", "b", "c"] {
            store.apply(watcher::Event::InitApply(svc(name, "1")));
        }
        assert!(store.is_empty(), "a partial list is not seen");
        store.apply(watcher::Event::InitDone);
        assert_eq!(names(&store), ["a@1", "b@1", "c@1"]);
        let before = store.snapshot();
        store.apply(watcher::Event::Apply(svc("b", "2")));
        let after = store.snapshot();
        let differing = before
            .iter()
            .zip(after.iter())
            .filter(|(x, y)| !Arc::ptr_eq(x, y))
            .count();
        assert_eq!(differing, 1, "replaced in place");
        store.apply(watcher::Event::Delete(svc("a", "1")));
        assert_eq!(names(&store), ["b@2", "c@1"]);
        // The object moved into a's place is still found.
        assert_eq!(
            store
                .get("ns", "c")
                .and_then(|s| s.identity.resource_version.clone()),
            Some("1".into())
        );
        store.apply(watcher::Event::Apply(svc("d", "3")));
        assert_eq!(names(&store), ["b@2", "c@1", "d@3"]);
        assert!(store.get("ns", "a").is_none());
    }

    #[test]
    fn the_index_follows_objects_moved_by_removals() {
        let store = ObjectStore::<ServiceObject>::default();
        for i in 0..600 {
            store.apply(watcher::Event::Apply(svc(&format!("s{i}"), "1")));
        }
        // Every third one goes; each removal moves the last object.
        for i in (0..600).step_by(3) {
            store.apply(watcher::Event::Delete(svc(&format!("s{i}"), "1")));
        }
        store.apply(watcher::Event::Apply(svc("s1", "2")));
        assert_eq!(store.len(), 400);
        for i in 0..600 {
            let found = store
                .get("ns", &format!("s{i}"))
                .and_then(|s| s.identity.name.clone());
            let want = (i % 3 != 0).then(|| format!("s{i}"));
            assert_eq!(found, want, "s{i}");
        }
        assert_eq!(
            store
                .get("ns", "s1")
                .and_then(|s| s.identity.resource_version.clone()),
            Some("2".into())
        );
    }

    #[test]
    fn a_relist_keeps_unchanged_objects_and_drops_missing_ones() {
        let store = ObjectStore::default();
        store.apply(watcher::Event::Init);
        for name in ["a", "b", "c"] {
            store.apply(watcher::Event::InitApply(svc(name, "1")));
        }
        store.apply(watcher::Event::InitDone);
        let kept = store.get("ns", "a");
        store.apply(watcher::Event::Init);
        store.apply(watcher::Event::InitApply(svc("a", "1")));
        store.apply(watcher::Event::InitApply(svc("b", "5")));
        store.apply(watcher::Event::InitApply(svc("e", "6")));
        // The old content stays until the relist completes.
        assert_eq!(names(&store), ["a@1", "b@1", "c@1"]);
        store.apply(watcher::Event::InitDone);
        assert_eq!(names(&store), ["a@1", "b@5", "e@6"]);
        let (Some(kept), Some(now)) = (kept, store.get("ns", "a")) else {
            panic!("a is listed");
        };
        assert!(Arc::ptr_eq(&kept, &now), "unchanged: the same object");
    }

    #[test]
    fn slim_drops_managed_fields_and_the_last_applied_copy_only() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;
        let annotations = std::collections::BTreeMap::from([
            (LAST_APPLIED.to_string(), "{...}".to_string()),
            (
                "service.kubernetes.io/topology-mode".to_string(),
                "Auto".to_string(),
            ),
        ]);
        let mut cidr = ServiceCIDR {
            metadata: ObjectMeta {
                name: Some("web".into()),
                labels: Some([("app".to_string(), "web".to_string())].into()),
                annotations: Some(annotations),
                managed_fields: Some(vec![ManagedFieldsEntry {
                    manager: Some("kube-controller-manager".into()),
                    ..ManagedFieldsEntry::default()
                }]),
                ..ObjectMeta::default()
            },
            ..ServiceCIDR::default()
        };
        let mut want = cidr.clone();
        want.metadata.managed_fields = None;
        want.metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(LAST_APPLIED);
        slim(&mut cidr);
        assert_eq!(cidr, want);
        assert_eq!(
            cidr.metadata.annotations.unwrap().len(),
            1,
            "other annotations (topology) stay"
        );
    }
}
