//! What changed between two states, as kube-proxy counts it: changed
//! objects (for its `*_changes_total` metrics), and the EndpointSlice
//! changes a sync programs (for its network programming latency).
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

use super::ObjectChanges;
use crate::model::{ClusterState, Identity, ObjectSet, Objects, ServiceObject, Slice};

type ObjectId = (String, String);

/// The objects of the last state seen, to count changed objects.
///
/// Sources share unchanged objects between states (the same `Arc`), so a
/// pointer comparison finds what changed; identities (namespace/name) are
/// computed only for those, keeping this cheap at thousands of objects.
#[derive(Default)]
pub(super) struct Versions {
    services: ObjectSet<ServiceObject, ()>,
    endpoint_slices: ObjectSet<Slice, ()>,
}

impl Versions {
    pub(super) fn update(&mut self, state: &ClusterState) -> ObjectChanges {
        fn count<K>(
            seen: &mut ObjectSet<K, ()>,
            objects: &Objects<K>,
            meta: impl Fn(&K) -> &Identity,
        ) -> usize {
            let delta = seen.refresh(objects, |_| ());
            // Only objects whose pointer changed need a look: a new version
            // of an object appears on both sides under one identity (it counts
            // once), and a copy with the same resourceVersion not at all.
            let version = |o: &K| meta(o).resource_version.clone().unwrap_or_default();
            let gone: HashMap<ObjectId, String> = delta
                .removed
                .iter()
                .map(|(_, o, _)| (meta(o).key(), version(o)))
                .collect();
            let came: HashMap<ObjectId, String> = delta
                .added
                .iter()
                .map(|(_, o, _)| (meta(o).key(), version(o)))
                .collect();
            came.iter()
                .filter(|(id, v)| gone.get(*id) != Some(*v))
                .count()
                + gone.keys().filter(|id| !came.contains_key(*id)).count()
        }
        ObjectChanges {
            services: count(&mut self.services, &state.services, |s| &s.identity),
            endpoint_slices: count(&mut self.endpoint_slices, &state.endpoint_slices, |s| {
                &s.identity
            }),
        }
    }
}

/// Network programming latency, from the last-change-trigger-time of each
/// EndpointSlice version programmed.
///
/// A version counts when its trigger time differs from that of the version
/// it replaced: the gone version of the same slice, found in the same
/// programming step (no table of every slice's time is kept: at tens of
/// thousands of slices it would be several MiB of copied names and times).
pub(super) struct TriggerTimes {
    /// Trigger times before this are ignored, as kube-proxy does: at start
    /// every slice is "new" but its change happened long before.
    since: SystemTime,
}

impl TriggerTimes {
    pub(super) fn new(since: SystemTime) -> Self {
        Self { since }
    }

    /// Records that the slices `new` since the last call are now
    /// programmed and that `gone` ones are gone (in the order they came,
    /// over steps that programmed nothing too); returns, for each new
    /// trigger time, how long ago it was.
    pub(super) fn programmed(&mut self, new: &[Arc<Slice>], gone: &[Arc<Slice>]) -> Vec<Duration> {
        self.programmed_at(new, gone, SystemTime::now())
    }

    pub(super) fn programmed_at(
        &mut self,
        new: &[Arc<Slice>],
        gone: &[Arc<Slice>],
        now: SystemTime,
    ) -> Vec<Duration> {
        // The time each slice was last programmed with: that of its version
        // gone, unless that version is also among the new ones (it came and
        // went between two programming steps, and is compared in turn).
        let came: HashSet<*const Slice> = new.iter().map(Arc::as_ptr).collect();
        let mut last: HashMap<(&str, &str), Option<&str>> = gone
            .iter()
            .filter(|slice| !came.contains(&Arc::as_ptr(slice)))
            .map(|slice| (names(slice), slice.trigger_time.as_deref()))
            .collect();
        let mut latencies = Vec::new();
        for slice in new {
            let value = slice.trigger_time.as_deref();
            let before = last.insert(names(slice), value).flatten();
            if let Some(value) = value
                && before != Some(value)
                && let Some(at) = parse_time(value)
                && at >= self.since
                && let Ok(latency) = now.duration_since(at)
            {
                latencies.push(latency);
            }
        }
        latencies
    }
}

/// A slice's namespace and name.
fn names(slice: &Slice) -> (&str, &str) {
    (
        slice.identity.namespace.as_deref().unwrap_or_default(),
        slice.identity.name.as_deref().unwrap_or_default(),
    )
}

fn parse_time(value: &str) -> Option<SystemTime> {
    let ts: jiff::Timestamp = value.parse().ok()?;
    Some(SystemTime::from(ts))
}
