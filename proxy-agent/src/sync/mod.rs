//! The sync loop: turns each published cluster state into a table, and has
//! the dataplane apply the difference from what it programmed last.
//!
//! Changes coalesce: the source's channel keeps only the latest state, and
//! `min_sync_period` spaces applies out, so a burst of updates becomes one
//! apply of the combined difference.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::core::v1::Node;
use tokio::{
    sync::watch,
    time::{Instant, sleep_until},
};

mod changes;
mod schedule;

use changes::{TriggerTimes, Versions};
use schedule::{Due, Schedule};

use crate::{
    dataplane::{
        ApplyStats, Dataplane, DataplaneError, NodeNetwork,
        addresses::{InterfaceAddress, NodeNetworkSettings, node_network},
    },
    model::{
        ClusterState, HealthCheck, ModelConfig, NoLocalEndpoints, NoLocalEndpointsTracker,
        Rejection, ServiceName, Slice, TableBuilder,
    },
    source::StateReceiver,
};

/// The EndpointSlice annotation the controller sets to the time of the
/// change that caused the slice's last update (kube-proxy measures network
/// programming latency from it).
pub use crate::model::LAST_CHANGE_TRIGGER_TIME;

/// Hands the allocator's free memory back to the kernel. A full sync
/// builds and drops tables as large as the whole service table (hundreds
/// of MiB at 30 000 services); glibc keeps such freed pages in its heap, and
/// the agent's RSS would stay at that peak for good.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists and
    // returns unused pages; it touches no memory the program holds.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A taint the cluster autoscaler puts on a node it is about to delete.
const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Timing of the loop.
#[derive(Clone, Debug)]
pub struct SyncOptions {
    /// Full reconcile against the kernel at this interval (repairs drift).
    pub sync_period: Duration,
    /// At least this long between two applies (0: apply every change at once).
    pub min_sync_period: Duration,
    /// First retry delay after a failed apply; doubles up to `max_backoff`.
    pub retry_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for SyncOptions {
    fn default() -> Self {
        Self {
            sync_period: Duration::from_secs(30),
            min_sync_period: Duration::ZERO,
            retry_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// What one successful sync did.
#[derive(Clone, Debug, Default)]
pub struct SyncReport {
    /// A full reconcile (else the difference only).
    pub full: bool,
    /// Whether the dataplane was called (an unchanged table is not applied).
    pub applied: bool,
    pub elapsed: Duration,
    pub stats: ApplyStats,
    pub frontends: usize,
    pub backends: usize,
    /// For each EndpointSlice change this sync programmed: the time from the
    /// change (its `last-change-trigger-time`) to now.
    pub programming_latencies: Vec<Duration>,
    /// Of the table programmed, when it was (not when unchanged).
    pub no_local_endpoints: Option<NoLocalEndpoints>,
}

/// Changed objects in a newly received state, as kube-proxy counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ObjectChanges {
    pub services: usize,
    pub endpoint_slices: usize,
}

/// Hooks for health, metrics and Events. Every method has a no-op default.
pub trait SyncObserver: Send + Sync {
    /// A new state arrived and waits to be programmed.
    fn queued(&self, _changes: ObjectChanges) {}
    fn synced(&self, _report: &SyncReport) {}
    fn failed(&self) {}
    /// An object was rejected (called once while the rejection persists).
    fn rejected(&self, _rejection: &Rejection) {}
    /// Number of objects rejected in the current state.
    fn rejections(&self, _count: usize) {}
    /// Whether this node may take traffic (false while it is being deleted).
    fn node_eligible(&self, _eligible: bool) {}
    /// The health check node ports the current state asks for.
    fn health_checks(&self, _checks: &BTreeMap<ServiceName, HealthCheck>) {}
    /// The dataplane was given this node network.
    fn node_network(&self, _network: &NodeNetwork) {}
}

/// An observer that observes nothing.
pub struct NoObserver;
impl SyncObserver for NoObserver {}

/// Runs until the source's channel closes.
///
/// Besides the service table, keeps the dataplane's [`NodeNetwork`] equal to
/// what `addresses` (the node's interface addresses), this node's Node
/// object and `network` give: it is set before the first reconcile, and
/// again whenever it changes. `builder` may come with a state built (the
/// agent builds the first while its dataplane opens); the loop brings it
/// to each state it programs.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    mut rx: StateReceiver,
    mut addresses: watch::Receiver<Vec<InterfaceAddress>>,
    dataplane: &mut dyn Dataplane,
    builder: TableBuilder,
    cfg: &ModelConfig,
    network: &NodeNetworkSettings,
    opts: &SyncOptions,
    observer: &dyn SyncObserver,
) {
    let mut schedule = Schedule::new(opts, Instant::now());
    let mut syncer = Syncer::new(dataplane, builder, cfg, network, observer);
    let mut addresses_open = true;
    let mut closed = false;
    loop {
        tokio::select! {
            changed = rx.changed(), if !closed => {
                if changed.is_err() {
                    tracing::info!("source closed; sync loop ends");
                    closed = true;
                    if !schedule.waiting() {
                        return;
                    }
                    continue;
                }
                if let Some(state) = rx.borrow().as_ref() {
                    observer.queued(syncer.versions.update(state));
                }
                schedule.changed(Instant::now());
                continue;
            }
            changed = addresses.changed(), if addresses_open => {
                if changed.is_err() {
                    tracing::warn!("interface address follower stopped; node addresses are no longer followed");
                    addresses_open = false;
                    continue;
                }
                // Not before the first state: the Node object may change
                // the choice, and the first sync sets it anyway.
                let state = rx.borrow().clone();
                if let Some(state) = state {
                    let list = addresses.borrow_and_update().clone();
                    syncer.update_node_network(&list, &state);
                }
                continue;
            }
            () = sleep_until(schedule.deadline()) => {}
        }
        let now = Instant::now();
        let due = schedule.due(now);
        if due == Due::Nothing {
            continue;
        }
        let Some(state) = rx.borrow_and_update().clone() else {
            // The source has not completed its first read: program nothing.
            if due == Due::Full {
                schedule.skipped(now, due);
            }
            continue;
        };
        let list = addresses.borrow_and_update().clone();
        match syncer.sync(&state, &list, due == Due::Full) {
            Step::Unchanged => schedule.skipped(Instant::now(), due),
            Step::Applied => schedule.applied(Instant::now(), due),
            Step::Failed(e) => {
                let backoff = schedule.failed(Instant::now());
                tracing::error!(dataplane = syncer.dataplane.name(), error = %e, retry_in_ms = backoff.as_millis() as u64, "sync failed; will retry with a full reconcile");
                observer.failed();
            }
        }
        if closed {
            return;
        }
    }
}

/// What one sync step did.
enum Step {
    /// The table equals what is programmed: nothing was applied.
    Unchanged,
    Applied,
    /// The dataplane failed: the kernel's state is unknown.
    Failed(DataplaneError),
}

/// What the loop keeps between syncs, and one sync step.
struct Syncer<'a> {
    dataplane: &'a mut dyn Dataplane,
    cfg: &'a ModelConfig,
    network: &'a NodeNetworkSettings,
    observer: &'a dyn SyncObserver,
    /// What the dataplane was last given successfully.
    node_net: Option<NodeNetwork>,
    /// Whether the builder's table is what the kernel holds. When not (at
    /// first, or after a failure left the kernel in an unknown state), the
    /// next sync is a full reconcile.
    programmed: bool,
    reported: BTreeSet<Rejection>,
    versions: Versions,
    triggers: TriggerTimes,
    /// EndpointSlices new and gone in builds not yet programmed, for
    /// `triggers`.
    slices_new: Vec<Arc<Slice>>,
    slices_gone: Vec<Arc<Slice>>,
    /// Builds the table of each state, redoing only what changed.
    builder: TableBuilder,
    /// The builder's table's Local ports without a local endpoint, kept
    /// from its diffs.
    no_local: NoLocalEndpointsTracker,
}

impl<'a> Syncer<'a> {
    /// `builder` may have built a state already (see [`run`]): its last
    /// slice changes are counted as not yet programmed.
    fn new(
        dataplane: &'a mut dyn Dataplane,
        builder: TableBuilder,
        cfg: &'a ModelConfig,
        network: &'a NodeNetworkSettings,
        observer: &'a dyn SyncObserver,
    ) -> Self {
        let (new, gone) = builder.slice_changes();
        let (slices_new, slices_gone) = (new.to_vec(), gone.to_vec());
        Syncer {
            dataplane,
            cfg,
            network,
            observer,
            node_net: None,
            programmed: false,
            reported: BTreeSet::new(),
            versions: Versions::default(),
            triggers: TriggerTimes::new(SystemTime::now()),
            slices_new,
            slices_gone,
            no_local: NoLocalEndpointsTracker::of(builder.table()),
            builder,
        }
    }

    /// Builds the table of `state` and programs it: the difference from
    /// what is programmed, or all of it when `full` (or nothing is known
    /// to be programmed).
    fn sync(&mut self, state: &ClusterState, addresses: &[InterfaceAddress], full: bool) -> Step {
        let building = std::time::Instant::now();
        self.observer
            .node_eligible(node_eligible(state, &self.cfg.node_name));
        let diff = self.builder.update(state, self.cfg);
        self.no_local.apply(&diff);
        let (new, gone) = self.builder.slice_changes();
        self.slices_new.extend_from_slice(new);
        self.slices_gone.extend_from_slice(gone);
        // The node's network before the table: NodePorts of the table are
        // served on the addresses it names. Also retries a failed earlier
        // attempt.
        self.update_node_network(addresses, state);
        report_rejections(self.builder.rejections(), &mut self.reported, self.observer);
        self.observer
            .health_checks(self.builder.health_check_node_ports());
        let build_us = building.elapsed().as_micros() as u64;
        let started = std::time::Instant::now();
        let was_programmed = self.programmed;
        let result = if was_programmed && !full {
            if diff.is_empty() {
                let programming_latencies = self.programmed_slices();
                self.observer.synced(&SyncReport {
                    elapsed: started.elapsed(),
                    frontends: self.builder.table().len(),
                    backends: self.builder.backend_count(),
                    programming_latencies,
                    ..SyncReport::default()
                });
                return Step::Unchanged;
            }
            self.dataplane.apply(&diff)
        } else {
            self.dataplane
                .reconcile(self.builder.table())
                .map(|report| {
                    // A periodic reconcile that had to repair found the
                    // kernel different from what we programmed: someone
                    // changed it.
                    if was_programmed && report.repaired > 0 {
                        tracing::warn!(
                            dataplane = self.dataplane.name(),
                            repaired = report.repaired,
                            "full sync repaired drift in the kernel"
                        );
                    }
                    report.stats
                })
        };
        let stats = match result {
            Ok(stats) => stats,
            Err(e) => {
                self.programmed = false;
                return Step::Failed(e);
            }
        };
        let report = SyncReport {
            full: !was_programmed || full,
            applied: true,
            elapsed: started.elapsed(),
            stats,
            frontends: self.builder.table().len(),
            backends: self.builder.backend_count(),
            programming_latencies: self.programmed_slices(),
            no_local_endpoints: Some(self.no_local.counts()),
        };
        log_synced(self.dataplane.name(), &report, build_us);
        self.observer.synced(&report);
        self.programmed = true;
        if report.full {
            release_free_memory();
        }
        Step::Applied
    }

    /// The programming latencies of the slices built since the last
    /// successful sync, now programmed.
    fn programmed_slices(&mut self) -> Vec<Duration> {
        let latencies = self
            .triggers
            .programmed(&self.slices_new, &self.slices_gone);
        self.slices_new.clear();
        self.slices_gone.clear();
        latencies
    }

    /// Gives the dataplane the node's network when it differs from what it
    /// was last given. A failure is logged and changes nothing, so the
    /// next sync tries again.
    fn update_node_network(&mut self, addresses: &[InterfaceAddress], state: &ClusterState) {
        let node = state
            .nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(self.cfg.node_name.as_str()))
            .map(|n| n.as_ref());
        let net = NodeNetwork {
            service_cidrs: self.builder.service_cidrs().to_vec(),
            ..node_network(addresses, node, self.network)
        };
        if self.node_net.as_ref() == Some(&net) {
            return;
        }
        let dataplane = self.dataplane.name();
        match self.dataplane.set_node_network(&net) {
            Ok(()) => {
                log_node_network(dataplane, self.node_net.as_ref(), &net);
                self.observer.node_network(&net);
                self.node_net = Some(net);
            }
            Err(e) => {
                tracing::error!(dataplane, error = %e, "setting the node network failed; will retry on the next sync");
            }
        }
    }
}

fn log_synced(dataplane: &str, report: &SyncReport, build_us: u64) {
    let stats = &report.stats;
    tracing::info!(
        dataplane,
        full = report.full,
        frontends = report.frontends,
        backends = report.backends,
        added = stats.frontends_added,
        changed = stats.frontends_changed,
        removed = stats.frontends_removed,
        writes = stats.kernel_writes,
        deletes = stats.kernel_deletes,
        conntrack_deleted = stats.conntrack.total_deleted(),
        build_us,
        elapsed_us = report.elapsed.as_micros() as u64,
        "programmed service table"
    );
}

fn log_node_network(dataplane: &str, old: Option<&NodeNetwork>, new: &NodeNetwork) {
    fn list<T: std::fmt::Display>(items: impl IntoIterator<Item = T>) -> String {
        items
            .into_iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
    fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
        v.map_or_else(|| "none".to_string(), |v| v.to_string())
    }
    let empty = BTreeSet::new();
    let before = old.map_or(&empty, |o| &o.nodeport_addresses);
    tracing::info!(
        dataplane,
        nodeport_added = %list(new.nodeport_addresses.difference(before)),
        nodeport_removed = %list(before.difference(&new.nodeport_addresses)),
        nodeport_addresses = new.nodeport_addresses.len(),
        snat_v4 = %opt(new.snat_v4),
        snat_v6 = %opt(new.snat_v6),
        cluster_cidrs = %list(&new.cluster_cidrs),
        masquerade_all = new.masquerade_all,
        service_cidrs = %list(&new.service_cidrs),
        "node network set"
    );
}

/// Logs each rejection once while it persists, and tells the observer.
fn report_rejections<'r>(
    current: impl Iterator<Item = &'r Rejection>,
    reported: &mut BTreeSet<Rejection>,
    observer: &dyn SyncObserver,
) {
    let now: BTreeSet<Rejection> = current.cloned().collect();
    for r in now.difference(reported) {
        tracing::warn!(kind = r.kind, namespace = %r.namespace, name = %r.name, reason = %r.reason, "object rejected");
        observer.rejected(r);
    }
    observer.rejections(now.len());
    *reported = now;
}

/// False when this node's Node object is being deleted or is about to be
/// (kube-proxy then fails /healthz so load balancers drain the node).
fn node_eligible(state: &ClusterState, node_name: &str) -> bool {
    let Some(node) = state
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node_name))
    else {
        return true;
    };
    !is_being_deleted(node)
}

fn is_being_deleted(node: &Node) -> bool {
    node.metadata.deletion_timestamp.is_some()
        || node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::sync::watch;

    use crate::model::ServiceObject;

    use super::*;
    use crate::{
        dataplane::ApplyStats,
        model::{ClusterState, TableDiff, test_support::*},
    };

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Apply(TableDiff),
        Reconcile(usize),
        SetNodeNetwork(NodeNetwork),
    }

    /// Records calls; fails the first `fail_applies` applies and the first
    /// `fail_node_network` node network updates.
    #[derive(Clone, Default)]
    struct FakeDataplane {
        calls: Arc<Mutex<Vec<Call>>>,
        fail_applies: Arc<Mutex<usize>>,
        fail_node_network: Arc<Mutex<usize>>,
    }

    impl FakeDataplane {
        /// The service table calls (applies and reconciles) only.
        fn table_calls(&self) -> Vec<Call> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .filter(|c| !matches!(c, Call::SetNodeNetwork(_)))
                .cloned()
                .collect()
        }

        /// The node networks given, in order.
        fn node_networks(&self) -> Vec<NodeNetwork> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .filter_map(|c| match c {
                    Call::SetNodeNetwork(n) => Some(n.clone()),
                    _ => None,
                })
                .collect()
        }
    }

    impl Dataplane for FakeDataplane {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn apply(&mut self, diff: &TableDiff) -> Result<ApplyStats, DataplaneError> {
            self.calls.lock().unwrap().push(Call::Apply(diff.clone()));
            let mut fail = self.fail_applies.lock().unwrap();
            if *fail > 0 {
                *fail -= 1;
                return Err(DataplaneError::Ebpf(
                    crate::dataplane::ebpf::EbpfError::BackendIdsExhausted,
                ));
            }
            Ok(ApplyStats::default())
        }
        fn reconcile(
            &mut self,
            desired: &crate::model::ServiceTable,
        ) -> Result<crate::dataplane::ReconcileReport, DataplaneError> {
            self.calls
                .lock()
                .unwrap()
                .push(Call::Reconcile(desired.len()));
            Ok(crate::dataplane::ReconcileReport::default())
        }
        fn set_node_network(&mut self, network: &NodeNetwork) -> Result<(), DataplaneError> {
            self.calls
                .lock()
                .unwrap()
                .push(Call::SetNodeNetwork(network.clone()));
            let mut fail = self.fail_node_network.lock().unwrap();
            if *fail > 0 {
                *fail -= 1;
                return Err(DataplaneError::Ebpf(
                    crate::dataplane::ebpf::EbpfError::BackendIdsExhausted,
                ));
            }
            Ok(())
        }
    }

    fn web(backends: &[&str]) -> Arc<ClusterState> {
        Arc::new(state(
            vec![simple_service("ns", "web", "10.0.0.1", 80)],
            vec![simple_slice("ns", "web-1", "web", 8080, backends)],
        ))
    }

    fn options() -> SyncOptions {
        SyncOptions {
            sync_period: Duration::from_secs(3600),
            min_sync_period: Duration::ZERO,
            retry_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(40),
        }
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    type StateTx = watch::Sender<Option<Arc<ClusterState>>>;
    type AddressTx = watch::Sender<Vec<InterfaceAddress>>;

    fn spawn(fake: &FakeDataplane) -> StateTx {
        spawn_with_addresses(fake, host_addresses()).0
    }

    fn spawn_with_addresses(
        fake: &FakeDataplane,
        addresses: Vec<InterfaceAddress>,
    ) -> (StateTx, AddressTx) {
        spawn_loop(fake, addresses, options(), Arc::new(NoObserver))
    }

    /// The loop over `fake`, fed by the returned senders.
    fn spawn_loop(
        fake: &FakeDataplane,
        addresses: Vec<InterfaceAddress>,
        opts: SyncOptions,
        observer: Arc<dyn SyncObserver>,
    ) -> (StateTx, AddressTx) {
        let (tx, rx) = watch::channel(None);
        let (addr_tx, addr_rx) = watch::channel(addresses);
        let mut dp = fake.clone();
        tokio::spawn(async move {
            let network = NodeNetworkSettings::default();
            let cfg = config();
            run(
                rx,
                addr_rx,
                &mut dp,
                TableBuilder::default(),
                &cfg,
                &network,
                &opts,
                observer.as_ref(),
            )
            .await;
        });
        (tx, addr_tx)
    }

    /// An interface address: index, CIDR, and whether its scope is link/host.
    fn iface(ifindex: u32, cidr: &str, link_scope: bool) -> InterfaceAddress {
        let net: ipnet::IpNet = cidr.parse().unwrap();
        InterfaceAddress {
            ifindex,
            ip: net.addr(),
            prefix_len: net.prefix_len(),
            link_scope,
        }
    }

    fn host_addresses() -> Vec<InterfaceAddress> {
        vec![
            iface(1, "127.0.0.1/8", true),
            iface(2, "10.0.0.5/24", false),
            iface(3, "192.168.1.7/24", false),
        ]
    }

    fn ips(list: &[&str]) -> BTreeSet<std::net::IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[tokio::test]
    async fn nothing_is_programmed_before_the_first_complete_state() {
        let fake = FakeDataplane::default();
        let tx = spawn(&fake);
        tx.send_modify(|_| {}); // a wake-up with the value still None
        settle().await;
        assert!(fake.calls.lock().unwrap().is_empty());
        tx.send(Some(web(&["10.1.0.1"]))).unwrap();
        settle().await;
        assert_eq!(fake.table_calls(), vec![Call::Reconcile(1)]);
    }

    #[tokio::test]
    async fn later_changes_apply_only_the_difference() {
        let fake = FakeDataplane::default();
        let tx = spawn(&fake);
        tx.send(Some(web(&["10.1.0.1"]))).unwrap();
        settle().await;
        tx.send(Some(web(&["10.1.0.1", "10.1.0.2"]))).unwrap();
        settle().await;
        // The same state again changes nothing and applies nothing.
        tx.send(Some(web(&["10.1.0.1", "10.1.0.2"]))).unwrap();
        settle().await;
        let calls = fake.table_calls();
        assert_eq!(calls.len(), 2, "{calls:?}");
        let Call::Apply(diff) = &calls[1] else {
            panic!("second call is an apply: {calls:?}")
        };
        assert!(diff.added.is_empty() && diff.removed.is_empty());
        assert_eq!(diff.changed.len(), 1);
        assert_eq!(
            diff.changed[0].added_backends(),
            vec![backend("10.1.0.2", 8080)]
        );
    }

    #[tokio::test]
    async fn a_burst_of_updates_is_coalesced() {
        let fake = FakeDataplane::default();
        let tx = spawn(&fake);
        tx.send(Some(web(&["10.1.0.1"]))).unwrap();
        settle().await;
        // 1000 updates sent without yielding: the loop sees the latest only.
        for i in 0..1000u32 {
            let addr = format!("10.2.{}.{}", i / 250, i % 250 + 1);
            tx.send(Some(web(&["10.1.0.1", &addr]))).unwrap();
        }
        settle().await;
        let calls = fake.table_calls();
        assert_eq!(calls.len(), 2, "one reconcile and one apply: {calls:?}");
        let Call::Apply(diff) = &calls[1] else {
            panic!("{calls:?}")
        };
        assert_eq!(diff.changed[0].new.backends.len(), 2);
    }

    #[tokio::test]
    async fn a_failed_apply_is_retried_as_a_full_reconcile() {
        let fake = FakeDataplane::default();
        *fake.fail_applies.lock().unwrap() = 1;
        let tx = spawn(&fake);
        tx.send(Some(web(&["10.1.0.1"]))).unwrap();
        settle().await;
        tx.send(Some(web(&["10.1.0.2"]))).unwrap();
        settle().await;
        let calls = fake.table_calls();
        assert!(matches!(calls[1], Call::Apply(_)), "{calls:?}");
        assert_eq!(calls[2], Call::Reconcile(1), "retry reconciles: {calls:?}");
        assert_eq!(
            calls.len(),
            3,
            "no further calls once it succeeded: {calls:?}"
        );
    }

    #[tokio::test]
    async fn min_sync_period_spaces_applies_and_coalesces_what_comes_between() {
        let fake = FakeDataplane::default();
        let opts = SyncOptions {
            min_sync_period: Duration::from_millis(300),
            ..options()
        };
        let (tx, _addresses) = spawn_loop(&fake, host_addresses(), opts, Arc::new(NoObserver));
        tx.send(Some(web(&["10.1.0.1"]))).unwrap();
        settle().await;
        // Three changes 30 ms apart, all within the 300 ms after the first
        // sync: one apply with the last of them, after the period.
        for extra in ["10.1.0.2", "10.1.0.3", "10.1.0.4"] {
            tx.send(Some(web(&["10.1.0.1", extra]))).unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert_eq!(fake.table_calls().len(), 1, "applied too early");
        tokio::time::sleep(Duration::from_millis(400)).await;
        let calls = fake.table_calls();
        assert_eq!(calls.len(), 2, "{calls:?}");
        let Call::Apply(diff) = &calls[1] else {
            panic!("{calls:?}")
        };
        assert_eq!(
            diff.changed[0].added_backends(),
            vec![backend("10.1.0.4", 8080)]
        );
    }

    #[derive(Default)]
    struct Recorder {
        reports: Mutex<Vec<SyncReport>>,
        queued: Mutex<Vec<ObjectChanges>>,
        rejected: Mutex<Vec<Rejection>>,
        eligible: Mutex<Vec<bool>>,
    }

    impl SyncObserver for Recorder {
        fn queued(&self, changes: ObjectChanges) {
            self.queued.lock().unwrap().push(changes);
        }
        fn synced(&self, report: &SyncReport) {
            self.reports.lock().unwrap().push(report.clone());
        }
        fn rejected(&self, rejection: &Rejection) {
            self.rejected.lock().unwrap().push(rejection.clone());
        }
        fn node_eligible(&self, eligible: bool) {
            self.eligible.lock().unwrap().push(eligible);
        }
    }

    fn with_trigger(mut state: ClusterState, at: &str) -> ClusterState {
        for slice in &mut state.endpoint_slices {
            Arc::make_mut(slice).trigger_time = Some(at.to_string());
        }
        state
    }

    #[tokio::test]
    async fn observer_sees_queued_changes_syncs_latencies_and_rejections() {
        let fake = FakeDataplane::default();
        let recorder = Arc::new(Recorder::default());
        let (tx, _addresses) = spawn_loop(&fake, host_addresses(), options(), recorder.clone());
        // A trigger time from before the agent started is not a latency.
        let old = with_trigger((*web(&["10.1.0.1"])).clone(), "2020-01-01T00:00:00Z");
        tx.send(Some(Arc::new(old))).unwrap();
        settle().await;
        let changed_at = jiff::Timestamp::now() - jiff::SignedDuration::from_millis(50);
        let mut new = with_trigger((*web(&["10.1.0.2"])).clone(), &changed_at.to_string());
        Arc::make_mut(&mut new.endpoint_slices[0])
            .identity
            .resource_version = Some("2".into());
        new.services
            .push(Arc::new(ServiceObject::new(&simple_service(
                "ns",
                "broken",
                "10.0.0.300",
                80,
            ))));
        tx.send(Some(Arc::new(new))).unwrap();
        settle().await;
        let reports = recorder.reports.lock().unwrap().clone();
        assert_eq!(reports.len(), 2, "{reports:?}");
        assert!(reports[0].full && reports[0].programming_latencies.is_empty());
        assert!(!reports[1].full && reports[1].applied);
        let latency = reports[1].programming_latencies.as_slice();
        assert_eq!(latency.len(), 1, "{reports:?}");
        assert!(
            latency[0] >= Duration::from_millis(50) && latency[0] < Duration::from_secs(5),
            "{latency:?}"
        );
        let queued = recorder.queued.lock().unwrap().clone();
        assert_eq!(
            queued,
            vec![
                ObjectChanges {
                    services: 1,
                    endpoint_slices: 1
                },
                ObjectChanges {
                    services: 1,
                    endpoint_slices: 1
                },
            ]
        );
        let rejected = recorder.rejected.lock().unwrap().clone();
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert_eq!(rejected[0].name, "broken");
        assert_eq!(*recorder.eligible.lock().unwrap(), vec![true, true]);
    }

    #[tokio::test]
    async fn the_node_network_is_set_before_the_first_reconcile() {
        let fake = FakeDataplane::default();
        let (tx, addr_tx) = spawn_with_addresses(&fake, host_addresses());
        // Address changes before the first state program nothing yet.
        addr_tx.send(host_addresses()).unwrap();
        settle().await;
        assert!(fake.calls.lock().unwrap().is_empty());
        tx.send(Some(web(&["10.1.0.1"]))).unwrap();
        settle().await;
        let calls = fake.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 2, "{calls:?}");
        let Call::SetNodeNetwork(net) = &calls[0] else {
            panic!("the node network comes first: {calls:?}")
        };
        assert_eq!(net.nodeport_addresses, ips(&["10.0.0.5", "192.168.1.7"]));
        assert_eq!(net.snat_v4, Some("10.0.0.5".parse().unwrap()));
        assert_eq!(calls[1], Call::Reconcile(1));
    }

    #[tokio::test]
    async fn an_address_change_sets_the_node_network_once_and_no_change_never() {
        let fake = FakeDataplane::default();
        let (tx, addr_tx) = spawn_with_addresses(&fake, host_addresses());
        tx.send(Some(web(&["10.1.0.1"]))).unwrap();
        settle().await;
        assert_eq!(fake.node_networks().len(), 1);

        // The same list again, and an address that changes nothing (IPv6
        // link-local serves no NodePort and is no SNAT address): no call.
        addr_tx.send(host_addresses()).unwrap();
        settle().await;
        let mut with_link_local = host_addresses();
        with_link_local.push(iface(2, "fe80::1/64", true));
        addr_tx.send(with_link_local.clone()).unwrap();
        settle().await;
        assert_eq!(fake.node_networks().len(), 1, "{:?}", fake.calls);

        // An address added: exactly one call, and the table is left alone.
        let mut added = with_link_local;
        added.push(iface(2, "10.0.0.6/24", false));
        addr_tx.send(added).unwrap();
        settle().await;
        let nets = fake.node_networks();
        assert_eq!(nets.len(), 2, "{nets:?}");
        assert_eq!(
            nets[1].nodeport_addresses,
            ips(&["10.0.0.5", "10.0.0.6", "192.168.1.7"])
        );
        assert_eq!(fake.table_calls(), vec![Call::Reconcile(1)]);

        // An address removed: the SNAT address moves to the next one.
        addr_tx
            .send(vec![
                iface(1, "127.0.0.1/8", true),
                iface(3, "192.168.1.7/24", false),
            ])
            .unwrap();
        settle().await;
        let nets = fake.node_networks();
        assert_eq!(nets.len(), 3, "{nets:?}");
        assert_eq!(nets[2].nodeport_addresses, ips(&["192.168.1.7"]));
        assert_eq!(nets[2].snat_v4, Some("192.168.1.7".parse().unwrap()));
    }

    #[tokio::test]
    async fn the_node_object_changes_the_snat_address() {
        let fake = FakeDataplane::default();
        let tx = spawn(&fake);
        tx.send(Some(web(&["10.1.0.1"]))).unwrap();
        settle().await;
        let mut s = (*web(&["10.1.0.1"])).clone();
        let mut n = node("node-a");
        n.status = Some(k8s_openapi::api::core::v1::NodeStatus {
            addresses: Some(vec![k8s_openapi::api::core::v1::NodeAddress {
                type_: "InternalIP".into(),
                address: "192.168.1.7".into(),
            }]),
            ..Default::default()
        });
        // Another node's object does not count.
        let mut other = n.clone();
        other.metadata.name = Some("node-b".into());
        s.nodes = vec![Arc::new(other)];
        tx.send(Some(Arc::new(s.clone()))).unwrap();
        settle().await;
        assert_eq!(fake.node_networks().len(), 1);
        s.nodes.push(Arc::new(n));
        tx.send(Some(Arc::new(s))).unwrap();
        settle().await;
        let nets = fake.node_networks();
        assert_eq!(nets.len(), 2, "{nets:?}");
        assert_eq!(nets[1].snat_v4, Some("192.168.1.7".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_failed_node_network_is_retried_on_the_next_sync() {
        let fake = FakeDataplane::default();
        *fake.fail_node_network.lock().unwrap() = 1;
        let tx = spawn(&fake);
        tx.send(Some(web(&["10.1.0.1"]))).unwrap();
        settle().await;
        // The failure does not hold the table back.
        assert_eq!(fake.table_calls(), vec![Call::Reconcile(1)]);
        assert_eq!(fake.node_networks().len(), 1);
        tx.send(Some(web(&["10.1.0.1", "10.1.0.2"]))).unwrap();
        settle().await;
        let calls = fake.calls.lock().unwrap().clone();
        assert_eq!(calls.len(), 4, "{calls:?}");
        assert!(matches!(calls[2], Call::SetNodeNetwork(_)), "{calls:?}");
        assert!(matches!(calls[3], Call::Apply(_)), "{calls:?}");
        // Succeeded now: an unchanged state sets nothing more.
        tx.send(Some(web(&["10.1.0.1", "10.1.0.2"]))).unwrap();
        settle().await;
        assert_eq!(fake.node_networks().len(), 2);
    }

    #[test]
    fn trigger_times_count_each_change_once() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut triggers = TriggerTimes::new(start);
        let at = |secs: u64| {
            jiff::Timestamp::from_second(1_700_000_000 + secs as i64)
                .unwrap()
                .to_string()
        };
        let slices = |t: &str| {
            with_trigger((*web(&["10.1.0.1"])).clone(), t)
                .endpoint_slices
                .to_vec()
        };
        let now = start + Duration::from_secs(10);
        let first = slices(&at(4));
        assert_eq!(
            triggers.programmed_at(&first, &[], now),
            vec![Duration::from_secs(6)]
        );
        // A new version with the same trigger time is not a new change.
        let same = slices(&at(4));
        assert!(triggers.programmed_at(&same, &first, now).is_empty());
        let later = slices(&at(9));
        assert_eq!(
            triggers.programmed_at(&later, &same, now),
            vec![Duration::from_secs(1)]
        );
        // Unparsable or future times are ignored rather than guessed.
        let bad = slices("yesterday");
        assert!(triggers.programmed_at(&bad, &later, now).is_empty());
        let future = slices(&at(20));
        assert!(triggers.programmed_at(&future, &bad, now).is_empty());
        // A slice deleted and made again with its old trigger time counts
        // again: the deletion was programmed in between.
        assert!(triggers.programmed_at(&[], &future, now).is_empty());
        assert_eq!(
            triggers.programmed_at(&first, &[], now),
            vec![Duration::from_secs(6)]
        );
        // Two versions programmed in one step (the step between them
        // failed): each counts against the one before it, and a version
        // that came and went is compared in turn, not taken as programmed.
        let (second, third) = (slices(&at(7)), slices(&at(8)));
        let came: Vec<_> = second.iter().chain(&third).cloned().collect();
        let went: Vec<_> = first.iter().chain(&second).cloned().collect();
        assert_eq!(
            triggers.programmed_at(&came, &went, now),
            vec![Duration::from_secs(3), Duration::from_secs(2)]
        );
        // The same trigger time again in the same step is one change.
        let (again, once_more) = (slices(&at(8)), slices(&at(8)));
        let came: Vec<_> = again.iter().chain(&once_more).cloned().collect();
        let went: Vec<_> = third.iter().chain(&again).cloned().collect();
        assert!(triggers.programmed_at(&came, &went, now).is_empty());
    }

    #[test]
    fn a_node_being_deleted_is_not_eligible() {
        let mut s = (*web(&["10.1.0.1"])).clone();
        assert!(node_eligible(&s, "node-a"), "no Node object: eligible");
        let mut n = node("node-a");
        s.nodes = vec![Arc::new(n.clone())];
        assert!(node_eligible(&s, "node-a"));
        n.spec.get_or_insert_with(Default::default).taints =
            Some(vec![k8s_openapi::api::core::v1::Taint {
                key: TO_BE_DELETED_TAINT.into(),
                effect: "NoSchedule".into(),
                ..Default::default()
            }]);
        s.nodes = vec![Arc::new(n.clone())];
        assert!(!node_eligible(&s, "node-a"));
        assert!(node_eligible(&s, "node-b"));
        let mut n = node("node-a");
        n.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            jiff::Timestamp::now(),
        ));
        s.nodes = vec![Arc::new(n)];
        assert!(!node_eligible(&s, "node-a"));
    }

    #[test]
    fn changed_objects_are_counted_once_and_copies_not_at_all() {
        let mut versions = Versions::default();
        let svc = |name: &str, rv: &str| {
            let mut s = simple_service("ns", name, "10.0.0.1", 80);
            s.metadata.resource_version = Some(rv.into());
            Arc::new(ServiceObject::new(&s))
        };
        let (a, b) = (svc("a", "1"), svc("b", "1"));
        let state = |services: Vec<Arc<ServiceObject>>| ClusterState {
            services: services.into(),
            ..ClusterState::default()
        };
        let changes = |v: &mut Versions, s: &ClusterState| v.update(s).services;
        assert_eq!(
            changes(&mut versions, &state(vec![a.clone(), b.clone()])),
            2
        );
        // The same objects: nothing changed.
        assert_eq!(
            changes(&mut versions, &state(vec![a.clone(), b.clone()])),
            0
        );
        // An equal copy (same resourceVersion) is no change either.
        assert_eq!(
            changes(&mut versions, &state(vec![svc("a", "1"), b.clone()])),
            0
        );
        // A new version of a, b deleted, c added: three changes.
        assert_eq!(
            changes(&mut versions, &state(vec![svc("a", "2"), svc("c", "1")])),
            3
        );
    }
}
