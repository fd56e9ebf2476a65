//! The Kubernetes API source: watches Services, EndpointSlices and this
//! node's Node object, and publishes a [`ClusterState`] once all three have
//! been listed completely.
//!
//! Like kube-proxy, it asks the API server to filter with label selectors, so
//! that objects it would ignore (services handled by another proxy, headless
//! services' slices) never reach it. Each resource is followed into an
//! [`ObjectStore`]; a relist (after `410 Gone` or a long outage) replaces
//! the store's content when the new list is complete, so a partial list is
//! never published. While the API server cannot be reached, nothing
//! is published: the dataplane keeps serving the last state.
use std::{
    fmt::Debug,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures::{StreamExt, future::BoxFuture, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice, networking::v1::ServiceCIDR,
};
use kube::{
    Api, Client, Resource,
    runtime::{WatchStreamExt, utils::Backoff, watcher},
};
use serde::de::DeserializeOwned;

use super::{Source, SourceError, StateSender};
use crate::model::{ClusterState, ServiceObject, Slice};

pub mod events;
mod store;

pub use store::{Kept, ObjectStore};

/// Objects kube-proxy never handles: those of a service owned by another
/// proxy implementation, and the endpoints of headless services. The same
/// selector serves Services and EndpointSlices, because the EndpointSlice
/// controller copies the service's labels onto its slices.
pub const PROXYABLE_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

/// Read access to the source's stores (for looking up objects to attach
/// Events to).
#[derive(Clone)]
pub struct Stores {
    pub services: ObjectStore<ServiceObject>,
    pub endpoint_slices: ObjectStore<Slice>,
    pub nodes: ObjectStore<Node>,
    pub service_cidrs: ObjectStore<ServiceCIDR>,
}

/// Watches the Kubernetes API.
pub struct ApiSource {
    client: Client,
    node_name: String,
    stores: Stores,
    backoff: BackoffSettings,
}

/// Retry timing after a failed list or watch.
#[derive(Clone, Copy, Debug)]
pub struct BackoffSettings {
    pub initial: Duration,
    pub max: Duration,
}

impl Default for BackoffSettings {
    /// Capped at 15 s: half of client-go's 30 s, as losing the API server
    /// delays every service change on this node; the jitter spreads the
    /// retries of many nodes when the API server comes back.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(15),
        }
    }
}

impl ApiSource {
    pub fn new(client: Client, node_name: String) -> Self {
        Self {
            client,
            node_name,
            stores: Stores {
                services: ObjectStore::default(),
                endpoint_slices: ObjectStore::default(),
                nodes: ObjectStore::default(),
                service_cidrs: ObjectStore::default(),
            },
            backoff: BackoffSettings::default(),
        }
    }

    pub fn with_backoff(mut self, backoff: BackoffSettings) -> Self {
        self.backoff = backoff;
        self
    }

    /// The stores this source fills (they stay empty until it runs).
    pub fn stores(&self) -> Stores {
        self.stores.clone()
    }
}

/// Which watched resource an event came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Watched {
    Services,
    EndpointSlices,
    Node,
    /// Optional: an API server without ServiceCIDRs (Kubernetes before
    /// 1.33, or the feature off) answers 404, which counts as none.
    ServiceCidrs,
}

impl Watched {
    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Self::Services => "services",
            Self::EndpointSlices => "endpointslices",
            Self::Node => "node",
            Self::ServiceCidrs => "servicecidrs",
        }
    }
}

/// What a watched stream reports, stripped of the object.
enum Progress {
    /// The watcher (re)starts: it is about to list. Not a sign that the API
    /// server answers.
    Restarting,
    /// The store changed (an object was added, modified or deleted, or a
    /// relist completed).
    Changed,
    /// A (re)list has begun or is delivering pages: nothing to publish yet.
    Listing,
    /// A (re)list completed.
    Listed,
    Failed(watcher::Error),
}

fn follow<K>(
    api: Api<K::Watched>,
    config: watcher::Config,
    store: ObjectStore<K>,
    backoff: BackoffSettings,
    which: Watched,
) -> BoxStream<'static, (Watched, Progress)>
where
    K: Kept,
    K::Watched: Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    <K::Watched as Resource>::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let backoff = JitteredBackoff::new(backoff);
    let answered = backoff.answered.clone();
    let stream = watcher(api, config).backoff(backoff).map(move |item| {
        let progress = match item {
            Ok(event) => {
                let progress = match &event {
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) => Progress::Changed,
                    watcher::Event::Init => Progress::Restarting,
                    watcher::Event::InitApply(_) => Progress::Listing,
                    watcher::Event::InitDone => Progress::Listed,
                };
                store.apply(event);
                progress
            }
            Err(e) => Progress::Failed(e),
        };
        if !matches!(progress, Progress::Restarting | Progress::Failed(_)) {
            answered.store(true, Ordering::Relaxed);
        }
        (which, progress)
    });
    stream.boxed()
}

impl Source for ApiSource {
    fn run(self: Box<Self>, tx: StateSender) -> BoxFuture<'static, Result<(), SourceError>> {
        Box::pin(self.watch(tx))
    }
}

impl ApiSource {
    async fn watch(self, tx: StateSender) -> Result<(), SourceError> {
        let Self {
            client,
            node_name,
            stores,
            backoff,
        } = self;
        let mut progress = Listings::default();
        let cidrs_readable = service_cidrs_readable(&client).await;
        if !cidrs_readable {
            progress.listed[Watched::ServiceCidrs.index()] = true;
        }
        let streams = follow_all(client, &node_name, stores.clone(), backoff, cidrs_readable);
        // Each resource's stream on a task of its own, so that the large
        // lists (Services, EndpointSlices) are parsed on both cores at
        // once; the tasks end with this future (their senders fail).
        let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
        let _followers: Vec<AbortOnDrop> = streams
            .into_iter()
            .map(|mut stream| {
                let tx = events_tx.clone();
                AbortOnDrop(tokio::spawn(async move {
                    while let Some(event) = stream.next().await {
                        if tx.send(event).is_err() {
                            return;
                        }
                    }
                }))
            })
            .collect();
        drop(events_tx);
        let mut published = false;
        while let Some(first) = events.recv().await {
            // Drain what is already waiting so that a burst of events leads to
            // one snapshot, not one per event.
            let mut dirty = false;
            let mut next = Some(first);
            while let Some((which, item)) = next {
                dirty |= progress.absorb(which, item);
                next = events.try_recv().ok();
            }
            if !dirty || !progress.all_listed() {
                continue;
            }
            if !published {
                log_first_state(&stores, &node_name);
                published = true;
            }
            if tx.send(Some(Arc::new(snapshot(&stores)))).is_err() {
                // Nobody listens any more: the agent is shutting down.
                return Ok(());
            }
        }
        // The channel ends only when every watcher stream ends, which they
        // never do on their own.
        Err(SourceError::Ended)
    }
}

/// A spawned task that ends when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One watch stream per resource: proxyable Services and EndpointSlices,
/// this node's Node, and the ServiceCIDRs when the API serves them to us.
fn follow_all(
    client: Client,
    node_name: &str,
    stores: Stores,
    backoff: BackoffSettings,
    cidrs_readable: bool,
) -> Vec<BoxStream<'static, (Watched, Progress)>> {
    let proxyable = watcher::Config::default()
        .labels(PROXYABLE_SELECTOR)
        .any_semantic();
    let own_node = watcher::Config::default()
        .fields(&format!("metadata.name={node_name}"))
        .any_semantic();
    let mut streams = vec![
        follow(
            Api::<Service>::all(client.clone()),
            proxyable.clone(),
            stores.services,
            backoff,
            Watched::Services,
        ),
        follow(
            Api::<EndpointSlice>::all(client.clone()),
            proxyable,
            stores.endpoint_slices,
            backoff,
            Watched::EndpointSlices,
        ),
        follow(
            Api::<Node>::all(client.clone()),
            own_node,
            stores.nodes,
            backoff,
            Watched::Node,
        ),
    ];
    if cidrs_readable {
        streams.push(follow(
            Api::<ServiceCIDR>::all(client),
            watcher::Config::default().any_semantic(),
            stores.service_cidrs,
            backoff,
            Watched::ServiceCidrs,
        ));
    }
    streams
}

fn log_first_state(stores: &Stores, node_name: &str) {
    tracing::info!(
        services = stores.services.len(),
        endpoint_slices = stores.endpoint_slices.len(),
        node_found = !stores.nodes.is_empty(),
        "all resources listed; publishing the first state"
    );
    if stores.nodes.is_empty() {
        tracing::warn!(node = %node_name, "no Node object with this name: check --hostname-override / NODE_NAME");
    }
}

/// What the watch streams have reported: which finished their first list,
/// and how many failures in a row each has had.
#[derive(Default)]
struct Listings {
    listed: [bool; 4],
    failing: [u32; 4],
}

impl Listings {
    /// Takes one report of `which`; returns whether the stores changed.
    fn absorb(&mut self, which: Watched, progress: Progress) -> bool {
        let i = which.index();
        match progress {
            Progress::Failed(e) if which == Watched::ServiceCidrs && unavailable(&e) => {
                // Nothing to wait for; the watcher keeps asking, with
                // back-off, in case they become readable.
                if !self.listed[i] {
                    warn_service_cidrs_unreadable(&e);
                    self.listed[i] = true;
                    return true;
                }
                return false;
            }
            Progress::Failed(e) => {
                self.failing[i] += 1;
                log_failure(which, &e, self.failing[i]);
                return false;
            }
            Progress::Restarting => return false,
            Progress::Changed | Progress::Listing | Progress::Listed => {}
        }
        if self.failing[i] > 0 {
            tracing::info!(
                resource = which.name(),
                failures = self.failing[i],
                "watch recovered"
            );
            self.failing[i] = 0;
        }
        match progress {
            Progress::Changed => true,
            Progress::Listed => {
                if !self.listed[i] {
                    tracing::info!(resource = which.name(), "initial list complete");
                }
                self.listed[i] = true;
                true
            }
            _ => false,
        }
    }

    fn all_listed(&self) -> bool {
        self.listed.iter().all(|&l| l)
    }
}

/// Whether this agent may read ServiceCIDRs: one list of at most one. An
/// API server that does not serve them (404: before Kubernetes 1.33, or the
/// API off) or RBAC that forbids them (403) means no, and they are not
/// watched at all, rather than asked for again at every back-off by every
/// node. Any other failure (the API server not answering yet) leaves it to
/// the watch, which retries.
async fn service_cidrs_readable(client: &Client) -> bool {
    let api = Api::<ServiceCIDR>::all(client.clone());
    match api.list(&kube::api::ListParams::default().limit(1)).await {
        Err(kube::Error::Api(status)) if matches!(status.code, 403 | 404) => {
            warn_service_cidrs_unreadable(&status);
            false
        }
        _ => true,
    }
}

fn warn_service_cidrs_unreadable(error: &dyn std::fmt::Display) {
    tracing::warn!(
        resource = Watched::ServiceCidrs.name(),
        error = %error,
        "not readable (not served by this API server, or not allowed by RBAC); \
         no service CIDR is known, so nothing is dropped for one"
    );
}

/// Whether the API server answered that it does not serve the resource
/// (404) or that the agent may not read it (403).
fn unavailable(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::InitialListFailed(kube::Error::Api(status)) if matches!(status.code, 403 | 404))
}

fn log_failure(which: Watched, e: &watcher::Error, count: u32) {
    // The first failure and then every tenth at warn level: the back-off
    // already bounds the rate, and a long outage should not flood the log.
    if count == 1 || count.is_multiple_of(10) {
        tracing::warn!(resource = which.name(), failures = count, error = %e, "watch failed; keeping the last state and retrying with back-off");
    } else {
        tracing::debug!(resource = which.name(), failures = count, error = %e, "watch failed again");
    }
    if matches!(e, watcher::Error::WatchError(status) if status.code == 410) {
        tracing::info!(
            resource = which.name(),
            "resource version expired (410 Gone); relisting"
        );
    }
}

/// The stores' current content; the objects are shared, not copied.
fn snapshot(stores: &Stores) -> ClusterState {
    ClusterState {
        services: stores.services.snapshot(),
        endpoint_slices: stores.endpoint_slices.snapshot(),
        nodes: stores.nodes.snapshot().iter().cloned().collect(),
        service_cidrs: stores.service_cidrs.snapshot().iter().cloned().collect(),
    }
}

/// Capped exponential back-off with "equal jitter": each delay is drawn from
/// [d/2, d], where d doubles from `initial` up to `max`.
///
/// It starts over only once the API server has really answered (a list page,
/// a completed list or a watch event). kube's `StreamBackoff` calls `reset`
/// on every successful item, and the watcher emits one (`Init`) before each
/// list attempt, which would keep the delay at its minimum forever while the
/// server is down; so `reset` is ignored and the stream flags real answers.
struct JitteredBackoff {
    settings: BackoffSettings,
    current: Duration,
    rng: u64,
    answered: Arc<AtomicBool>,
}

impl JitteredBackoff {
    fn new(settings: BackoffSettings) -> Self {
        // Seeded per process and stream, so nodes restarted together do not
        // retry in lockstep.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let seed = nanos ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15;
        Self {
            settings,
            current: settings.initial,
            rng: seed | 1,
            answered: Arc::new(AtomicBool::new(false)),
        }
    }

    fn random_fraction(&mut self) -> f64 {
        // xorshift64: good enough for spreading retries.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }
}

impl Iterator for JitteredBackoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        if self.answered.swap(false, Ordering::Relaxed) {
            self.current = self.settings.initial;
        }
        let d = self.current;
        self.current = (self.current * 2).min(self.settings.max);
        let half = d / 2;
        Some(half + half.mul_f64(self.random_fraction()))
    }
}

impl Backoff for JitteredBackoff {
    fn reset(&mut self) {
        // See the type's comment: progress is signalled through `answered`.
    }
}

#[cfg(test)]
mod tests {

    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_and_resets() {
        let settings = BackoffSettings {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
        };
        let mut b = JitteredBackoff::new(settings);
        let bases = [100u64, 200, 400, 800, 1000, 1000, 1000];
        for base in bases {
            let d = b.next().unwrap_or_default();
            let base = Duration::from_millis(base);
            assert!(
                d >= base / 2 && d <= base,
                "{d:?} outside [{:?}, {base:?}]",
                base / 2
            );
        }
        // kube's reset (after the watcher's Init) does not shorten the delay...
        b.reset();
        let d = b.next().unwrap_or_default();
        assert!(d >= Duration::from_millis(500), "{d:?} after reset");
        // ...an answer from the API server does.
        b.answered.store(true, Ordering::Relaxed);
        let d = b.next().unwrap_or_default();
        assert!(d <= Duration::from_millis(100), "{d:?} after an answer");
    }

    #[test]
    fn service_cidrs_that_cannot_be_read_count_as_none_and_do_not_block() {
        let failed = |code: u16| {
            let status = kube::core::Status::failure("no", "NotFound").with_code(code);
            Progress::Failed(watcher::Error::InitialListFailed(kube::Error::Api(
                Box::new(status),
            )))
        };
        for code in [403, 404] {
            let mut listings = Listings::default();
            for which in [Watched::Services, Watched::EndpointSlices, Watched::Node] {
                assert!(listings.absorb(which, Progress::Listed));
            }
            assert!(!listings.all_listed());
            assert!(
                listings.absorb(Watched::ServiceCidrs, failed(code)),
                "{code}"
            );
            assert!(listings.all_listed(), "{code}");
            // The watcher's retries change nothing more.
            assert!(!listings.absorb(Watched::ServiceCidrs, failed(code)));
        }
        // Any other failure of theirs is an outage like the others'.
        let mut listings = Listings::default();
        assert!(!listings.absorb(Watched::ServiceCidrs, failed(500)));
        assert!(!listings.listed[Watched::ServiceCidrs.index()]);
    }

    #[test]
    fn backoff_jitter_varies() {
        let mut b = JitteredBackoff::new(BackoffSettings {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(10),
        });
        let draws: std::collections::BTreeSet<_> = (0..20).filter_map(|_| b.next()).collect();
        assert!(draws.len() > 10, "only {} distinct delays", draws.len());
    }
}
