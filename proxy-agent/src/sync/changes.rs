//! What changed between two states, as kube-proxy counts it: changed
//! objects (for its `*_changes_total` metrics), and the EndpointSlice
//! changes a sync programs (for its network programming latency).
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{LAST_CHANGE_TRIGGER_TIME, ObjectChanges};
use crate::model::ClusterState;

type ObjectId = (String, String);

fn object_id(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> ObjectId {
    (
        meta.namespace.clone().unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
    )
}

/// The objects of the last state seen, to count changed objects.
///
/// Sources share unchanged objects between states (the same `Arc`), so a
/// pointer comparison finds what changed; identities (namespace/name) are
/// computed only for those, keeping this cheap at thousands of objects.
#[derive(Default)]
pub(super) struct Versions {
    services: HashMap<usize, Arc<Service>>,
    endpoint_slices: HashMap<usize, Arc<EndpointSlice>>,
}

impl Versions {
    pub(super) fn update(&mut self, state: &ClusterState) -> ObjectChanges {
        fn count<K>(
            seen: &mut HashMap<usize, Arc<K>>,
            objects: &[Arc<K>],
            meta: impl Fn(&K) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        ) -> usize {
            let next: HashMap<usize, Arc<K>> = objects
                .iter()
                .map(|o| (Arc::as_ptr(o) as usize, o.clone()))
                .collect();
            // Only objects whose pointer changed need a look: a new version
            // of an object appears on both sides under one identity (it counts
            // once), and a copy with the same resourceVersion not at all.
            let version = |o: &K| meta(o).resource_version.clone().unwrap_or_default();
            let gone: HashMap<ObjectId, String> = seen
                .iter()
                .filter(|(ptr, _)| !next.contains_key(ptr))
                .map(|(_, o)| (object_id(meta(o)), version(o)))
                .collect();
            let came: HashMap<ObjectId, String> = next
                .iter()
                .filter(|(ptr, _)| !seen.contains_key(ptr))
                .map(|(_, o)| (object_id(meta(o)), version(o)))
                .collect();
            let changed = came
                .iter()
                .filter(|(id, v)| gone.get(*id) != Some(*v))
                .count()
                + gone.keys().filter(|id| !came.contains_key(*id)).count();
            *seen = next;
            changed
        }
        ObjectChanges {
            services: count(&mut self.services, &state.services, |s| &s.metadata),
            endpoint_slices: count(&mut self.endpoint_slices, &state.endpoint_slices, |s| {
                &s.metadata
            }),
        }
    }
}

/// The last-change-trigger-time of each EndpointSlice as last programmed.
pub(super) struct TriggerTimes {
    /// Trigger times before this are ignored, as kube-proxy does: at start
    /// every slice is "new" but its change happened long before.
    since: SystemTime,
    programmed: HashMap<ObjectId, String>,
}

impl TriggerTimes {
    pub(super) fn new(since: SystemTime) -> Self {
        Self {
            since,
            programmed: HashMap::new(),
        }
    }

    /// Records that `slices` are now programmed; returns, for each new
    /// trigger time, how long ago it was.
    pub(super) fn programmed(&mut self, slices: &[Arc<EndpointSlice>]) -> Vec<Duration> {
        self.programmed_at(slices, SystemTime::now())
    }

    pub(super) fn programmed_at(
        &mut self,
        slices: &[Arc<EndpointSlice>],
        now: SystemTime,
    ) -> Vec<Duration> {
        let mut latencies = Vec::new();
        let mut next = HashMap::with_capacity(self.programmed.len());
        for slice in slices {
            let Some(value) = slice
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(LAST_CHANGE_TRIGGER_TIME))
            else {
                continue;
            };
            let id = object_id(&slice.metadata);
            if self.programmed.get(&id) != Some(value)
                && let Some(at) = parse_time(value)
                && at >= self.since
                && let Ok(latency) = now.duration_since(at)
            {
                latencies.push(latency);
            }
            next.insert(id, value.clone());
        }
        self.programmed = next;
        latencies
    }
}

fn parse_time(value: &str) -> Option<SystemTime> {
    let ts: jiff::Timestamp = value.parse().ok()?;
    Some(SystemTime::from(ts))
}
