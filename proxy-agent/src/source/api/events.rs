//! Kubernetes Events (`events.k8s.io/v1`) for objects the model rejected.
//!
//! Reporting never blocks the sync loop: [`EventPublisher::report`] applies
//! the rate limits and hands the rejection to a background task through a
//! bounded queue. The task attaches the Event to the object (with its uid, so
//! `kubectl describe` shows it) and de-duplicates: the same message about the
//! same object within [`SERIES_WINDOW`] patches the existing Event's series
//! count instead of creating another, as client-go's event correlator does.
use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, Client, ResourceExt,
    api::{Patch, PatchParams, PostParams},
};
use tokio::sync::mpsc;

use super::Stores;
use crate::model::Rejection;

/// Repeats of one message about one object within this window are counted
/// on the first Event (client-go uses the same order of magnitude).
pub const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// The Events API refuses longer notes.
const MAX_NOTE_BYTES: usize = 1024;

/// Rate limits, in the spirit of client-go's event spam filter.
#[derive(Clone, Copy, Debug)]
pub struct EventLimits {
    /// Events one object may get at once...
    pub per_object_burst: u32,
    /// ...and one more per this interval after that.
    pub per_object_interval: Duration,
    /// Events the whole agent may send at once...
    pub global_burst: u32,
    /// ...and one more per this interval after that.
    pub global_interval: Duration,
    /// Rejections waiting to be sent; more are dropped (and counted).
    pub queue: usize,
}

impl Default for EventLimits {
    fn default() -> Self {
        Self {
            per_object_burst: 5,
            per_object_interval: Duration::from_secs(60),
            global_burst: 50,
            global_interval: Duration::from_millis(200),
            queue: 256,
        }
    }
}

/// Who reports the Events.
#[derive(Clone, Debug)]
pub struct Reporter {
    /// `reportingController`, e.g. "proxy-agent".
    pub controller: String,
    /// `reportingInstance`: this agent, e.g. "proxy-agent-<node>".
    pub instance: String,
}

/// Sends Events for rejected objects; cheap to clone.
#[derive(Clone)]
pub struct EventPublisher {
    queue: mpsc::Sender<Rejection>,
    limiter: Arc<Mutex<Limiter>>,
}

impl EventPublisher {
    /// Starts the sending task on the current tokio runtime.
    pub fn start(client: Client, stores: Stores, reporter: Reporter, limits: EventLimits) -> Self {
        let (queue, rx) = mpsc::channel(limits.queue.max(1));
        tokio::spawn(send_events(client, stores, reporter, rx));
        Self {
            queue,
            limiter: Arc::new(Mutex::new(Limiter::new(limits))),
        }
    }

    /// Queues an Event for `rejection`, unless a rate limit says no; returns
    /// whether it was queued (the caller counts the others).
    pub fn report(&self, rejection: &Rejection) -> bool {
        let allowed = match self.limiter.lock() {
            Ok(mut limiter) => limiter.allow(&object_key(rejection), Instant::now()),
            Err(_) => false,
        };
        if !allowed || self.queue.try_send(rejection.clone()).is_err() {
            tracing::debug!(kind = rejection.kind, namespace = %rejection.namespace, name = %rejection.name, "event not sent (rate limit)");
            return false;
        }
        true
    }
}

type ObjectKey = (&'static str, String, String);

fn object_key(r: &Rejection) -> ObjectKey {
    (r.kind, r.namespace.clone(), r.name.clone())
}

/// Token buckets: one per object and one for everything.
struct Limiter {
    limits: EventLimits,
    global: Bucket,
    objects: HashMap<ObjectKey, Bucket>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: u32, now: Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            at: now,
        }
    }

    /// Tokens at `now`, before the cap of `burst`.
    fn refilled(&self, interval: Duration, now: Instant) -> f64 {
        self.tokens
            + now.saturating_duration_since(self.at).as_secs_f64()
                / interval.as_secs_f64().max(1e-9)
    }

    fn take(&mut self, burst: u32, interval: Duration, now: Instant) -> bool {
        self.tokens = self.refilled(interval, now).min(f64::from(burst));
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn is_full(&self, burst: u32, interval: Duration, now: Instant) -> bool {
        self.refilled(interval, now) >= f64::from(burst)
    }
}

impl Limiter {
    fn new(limits: EventLimits) -> Self {
        Self {
            limits,
            global: Bucket::full(limits.global_burst, Instant::now()),
            objects: HashMap::new(),
        }
    }

    fn allow(&mut self, key: &ObjectKey, now: Instant) -> bool {
        let l = self.limits;
        // Forget objects whose bucket has refilled, so the map stays as small
        // as the set of recently noisy objects.
        if self.objects.len() > 1024 {
            self.objects
                .retain(|_, b| !b.is_full(l.per_object_burst, l.per_object_interval, now));
        }
        let bucket = self
            .objects
            .entry(key.clone())
            .or_insert_with(|| Bucket::full(l.per_object_burst, now));
        // Check the object's bucket without spending the global token when it
        // is empty, and the global one only when the object may speak.
        let mut probe = *bucket;
        if !probe.take(l.per_object_burst, l.per_object_interval, now) {
            *bucket = probe;
            return false;
        }
        if !self.global.take(l.global_burst, l.global_interval, now) {
            return false;
        }
        *bucket = probe;
        true
    }
}

/// The Event last sent for one message about one object.
struct Sent {
    name: String,
    namespace: String,
    count: i32,
    at: Instant,
}

async fn send_events(
    client: Client,
    stores: Stores,
    reporter: Reporter,
    mut rx: mpsc::Receiver<Rejection>,
) {
    let mut sent: HashMap<(ObjectKey, String), Sent> = HashMap::new();
    let mut failures = 0u64;
    while let Some(rejection) = rx.recv().await {
        let now = Instant::now();
        sent.retain(|_, s| now.duration_since(s.at) < SERIES_WINDOW);
        let note = truncate(&rejection.reason, MAX_NOTE_BYTES);
        let key = (object_key(&rejection), note.clone());
        let result = match sent.get_mut(&key) {
            Some(previous) => {
                previous.count += 1;
                previous.at = now;
                let patch = serde_json::json!({
                    "series": {
                        "count": previous.count,
                        "lastObservedTime": MicroTime(jiff::Timestamp::now()),
                    }
                });
                Api::<Event>::namespaced(client.clone(), &previous.namespace)
                    .patch(
                        &previous.name,
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                    .map(|_| ())
            }
            None => {
                let event = new_event(&rejection, &stores, &reporter, note);
                let namespace = event.metadata.namespace.clone().unwrap_or_default();
                let name = event.name_any();
                let result = Api::<Event>::namespaced(client.clone(), &namespace)
                    .create(&PostParams::default(), &event)
                    .await;
                if result.is_ok() {
                    sent.insert(
                        key,
                        Sent {
                            name,
                            namespace,
                            count: 1,
                            at: now,
                        },
                    );
                }
                result.map(|_| ())
            }
        };
        match result {
            Ok(()) => {
                tracing::debug!(kind = rejection.kind, namespace = %rejection.namespace, name = %rejection.name, "event sent");
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(100) {
                    tracing::warn!(error = %e, failures, "cannot send a Kubernetes Event");
                }
            }
        }
    }
}

/// An Event about `rejection`, attached to the live object when the stores
/// know it.
fn new_event(rejection: &Rejection, stores: &Stores, reporter: &Reporter, note: String) -> Event {
    let regarding = reference(rejection, stores);
    // Cluster-scoped objects (the Node) get their Events in "default", as
    // client-go does.
    let namespace = regarding
        .namespace
        .clone()
        .filter(|ns| !ns.is_empty())
        .unwrap_or_else(|| "default".to_string());
    let now = jiff::Timestamp::now();
    let base = if rejection.name.is_empty() {
        reporter.controller.clone()
    } else {
        rejection.name.clone()
    };
    Event {
        metadata: ObjectMeta {
            name: Some(format!("{base}.{:x}", now.as_nanosecond())),
            namespace: Some(namespace),
            ..Default::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some("Warning".to_string()),
        reason: Some(format!("Invalid{}", rejection.kind)),
        action: Some("Program".to_string()),
        note: Some(note),
        regarding: Some(regarding),
        reporting_controller: Some(reporter.controller.clone()),
        reporting_instance: Some(reporter.instance.clone()),
        ..Default::default()
    }
}

fn reference(r: &Rejection, stores: &Stores) -> ObjectReference {
    fn live<K: super::Kept>(
        store: &super::ObjectStore<K>,
        name: &str,
        ns: &str,
    ) -> Option<ObjectReference> {
        store.get(ns, name).map(|obj| obj.reference())
    }
    let found = match r.kind {
        "Service" => live(&stores.services, &r.name, &r.namespace),
        "EndpointSlice" => live(&stores.endpoint_slices, &r.name, &r.namespace),
        "Node" => live(&stores.nodes, &r.name, ""),
        _ => None,
    };
    found.unwrap_or_else(|| {
        let api_version = match r.kind {
            "EndpointSlice" => "discovery.k8s.io/v1",
            _ => "v1",
        };
        ObjectReference {
            api_version: Some(api_version.to_string()),
            kind: Some(r.kind.to_string()),
            name: Some(r.name.clone()),
            namespace: (!r.namespace.is_empty()).then(|| r.namespace.clone()),
            ..Default::default()
        }
    })
}

/// At most `max` bytes, cut at a character boundary.
fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> ObjectKey {
        ("Service", "ns".to_string(), name.to_string())
    }

    fn limits() -> EventLimits {
        EventLimits {
            per_object_burst: 2,
            per_object_interval: Duration::from_secs(60),
            global_burst: 3,
            global_interval: Duration::from_secs(1),
            queue: 8,
        }
    }

    #[test]
    fn one_object_gets_its_burst_then_one_per_interval() {
        let mut l = Limiter::new(limits());
        let t0 = Instant::now();
        assert!(l.allow(&key("a"), t0));
        assert!(l.allow(&key("a"), t0));
        assert!(!l.allow(&key("a"), t0));
        assert!(!l.allow(&key("a"), t0 + Duration::from_secs(30)));
        assert!(l.allow(&key("a"), t0 + Duration::from_secs(61)));
    }

    #[test]
    fn the_global_limit_caps_all_objects_together() {
        let mut l = Limiter::new(limits());
        let t0 = Instant::now();
        let allowed = ["a", "b", "c", "d", "e"]
            .iter()
            .filter(|n| l.allow(&key(n), t0))
            .count();
        assert_eq!(allowed, 3);
        // A refused global token does not cost the object its own token.
        assert!(l.allow(&key("d"), t0 + Duration::from_secs(1)));
        assert!(l.allow(&key("d"), t0 + Duration::from_secs(2)));
    }

    #[test]
    fn a_noisy_object_does_not_starve_others() {
        let mut l = Limiter::new(EventLimits {
            global_burst: 100,
            ..limits()
        });
        let t0 = Instant::now();
        let noisy = (0..50).filter(|_| l.allow(&key("noisy"), t0)).count();
        assert_eq!(noisy, 2);
        assert!(l.allow(&key("quiet"), t0));
    }

    #[test]
    fn notes_are_cut_at_a_character_boundary() {
        assert_eq!(truncate("abc", 10), "abc");
        assert_eq!(truncate("aé", 2), "a");
        assert_eq!(truncate(&"x".repeat(2000), MAX_NOTE_BYTES).len(), 1024);
    }

    #[test]
    fn reference_falls_back_to_kind_and_name() {
        let stores = Stores {
            services: Default::default(),
            endpoint_slices: Default::default(),
            nodes: Default::default(),
            service_cidrs: Default::default(),
        };
        let r = Rejection {
            kind: "EndpointSlice",
            namespace: "ns".into(),
            name: "web-1".into(),
            reason: "bad".into(),
        };
        let reference = reference(&r, &stores);
        assert_eq!(
            reference.api_version.as_deref(),
            Some("discovery.k8s.io/v1")
        );
        assert_eq!(reference.kind.as_deref(), Some("EndpointSlice"));
        assert_eq!(reference.namespace.as_deref(), Some("ns"));
        let event = new_event(
            &r,
            &stores,
            &Reporter {
                controller: "proxy-agent".into(),
                instance: "proxy-agent-n1".into(),
            },
            "bad".into(),
        );
        assert_eq!(event.metadata.namespace.as_deref(), Some("ns"));
        assert_eq!(event.reason.as_deref(), Some("InvalidEndpointSlice"));
        assert!(
            event
                .metadata
                .name
                .unwrap_or_default()
                .starts_with("web-1.")
        );
    }
}
