//! The sync loop: turns each published cluster state into a table, and has
//! the dataplane apply the difference from what it programmed last.
use std::{collections::BTreeSet, time::Duration};

use tokio::time::{Instant, sleep_until};

use crate::{
    dataplane::Dataplane,
    model::{ModelConfig, Rejection, ServiceTable, build_table},
    source::StateReceiver,
};

/// Timing of the loop.
#[derive(Clone, Debug)]
pub struct SyncOptions {
    /// Full reconcile against the kernel at this interval (repairs drift).
    pub sync_period: Duration,
    /// First retry delay after a failed apply; doubles up to `max_backoff`.
    pub retry_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for SyncOptions {
    fn default() -> Self {
        Self {
            sync_period: Duration::from_secs(30),
            retry_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

/// Runs until the source's channel closes.
pub async fn run(
    mut rx: StateReceiver,
    dataplane: &mut dyn Dataplane,
    cfg: &ModelConfig,
    opts: &SyncOptions,
) {
    // None: the next sync must be a full reconcile (first one, or after a
    // failure left the kernel in an unknown state).
    let mut programmed: Option<ServiceTable> = None;
    let mut reported: BTreeSet<Rejection> = BTreeSet::new();
    let mut backoff = opts.retry_backoff;
    let mut next_full = Instant::now() + opts.sync_period;
    let mut retry_at: Option<Instant> = None;
    loop {
        let deadline = retry_at.map_or(next_full, |r| r.min(next_full));
        let full = tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    tracing::info!("source closed; sync loop ends");
                    return;
                }
                false
            }
            () = sleep_until(deadline) => retry_at.is_none_or(|r| r > next_full),
        };
        let Some(state) = rx.borrow_and_update().clone() else {
            // The source has not completed its first read: program nothing.
            continue;
        };
        let output = build_table(&state, cfg);
        report_rejections(&output.rejections, &mut reported);
        let desired = output.table;
        let started = std::time::Instant::now();
        let result = match (&programmed, full) {
            (Some(current), false) => {
                let diff = current.diff(&desired);
                if diff.is_empty() {
                    retry_at = None;
                    continue;
                }
                dataplane.apply(&diff)
            }
            _ => dataplane.reconcile(&desired),
        };
        match result {
            Ok(stats) => {
                // A periodic reconcile that had to write found the kernel
                // different from what we programmed: someone changed it.
                if full && programmed.is_some() && stats.map_writes + stats.map_deletes > 0 {
                    tracing::warn!(
                        dataplane = dataplane.name(),
                        writes = stats.map_writes,
                        deletes = stats.map_deletes,
                        "full sync repaired drift in the kernel"
                    );
                }
                tracing::info!(
                    dataplane = dataplane.name(),
                    full = programmed.is_none() || full,
                    frontends = desired.len(),
                    backends = desired.backend_count(),
                    added = stats.frontends_added,
                    changed = stats.frontends_changed,
                    removed = stats.frontends_removed,
                    writes = stats.map_writes,
                    deletes = stats.map_deletes,
                    elapsed_us = started.elapsed().as_micros() as u64,
                    "programmed service table"
                );
                programmed = Some(desired);
                retry_at = None;
                backoff = opts.retry_backoff;
                if full {
                    next_full = Instant::now() + opts.sync_period;
                }
            }
            Err(e) => {
                tracing::error!(dataplane = dataplane.name(), error = %e, retry_in_ms = backoff.as_millis() as u64, "sync failed; will retry with a full reconcile");
                programmed = None;
                retry_at = Some(Instant::now() + backoff);
                backoff = (backoff * 2).min(opts.max_backoff);
            }
        }
    }
}

/// Logs each rejection once while it persists.
fn report_rejections(current: &[Rejection], reported: &mut BTreeSet<Rejection>) {
    let now: BTreeSet<Rejection> = current.iter().cloned().collect();
    for r in now.difference(reported) {
        tracing::warn!(kind = r.kind, namespace = %r.namespace, name = %r.name, reason = %r.reason, "object rejected");
    }
    *reported = now;
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::sync::watch;

    use super::*;
    use crate::{
        dataplane::{ApplyStats, DataplaneError},
        model::{ClusterState, TableDiff, test_support::*},
    };

    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Apply(TableDiff),
        Reconcile(usize),
    }

    /// Records calls; fails the first `fail_applies` applies.
    #[derive(Clone, Default)]
    struct FakeDataplane {
        calls: Arc<Mutex<Vec<Call>>>,
        fail_applies: Arc<Mutex<usize>>,
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
        fn reconcile(&mut self, desired: &ServiceTable) -> Result<ApplyStats, DataplaneError> {
            self.calls
                .lock()
                .unwrap()
                .push(Call::Reconcile(desired.len()));
            Ok(ApplyStats::default())
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
            retry_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(40),
        }
    }

    async fn settle() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    fn spawn(fake: &FakeDataplane) -> watch::Sender<Option<Arc<ClusterState>>> {
        let (tx, rx) = watch::channel(None);
        let mut dp = fake.clone();
        tokio::spawn(async move {
            run(rx, &mut dp, &config(), &options()).await;
        });
        tx
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
        assert_eq!(*fake.calls.lock().unwrap(), vec![Call::Reconcile(1)]);
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
        let calls = fake.calls.lock().unwrap().clone();
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
        let calls = fake.calls.lock().unwrap().clone();
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
        let calls = fake.calls.lock().unwrap().clone();
        assert!(matches!(calls[1], Call::Apply(_)), "{calls:?}");
        assert_eq!(calls[2], Call::Reconcile(1), "retry reconciles: {calls:?}");
        assert_eq!(
            calls.len(),
            3,
            "no further calls once it succeeded: {calls:?}"
        );
    }
}
