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
