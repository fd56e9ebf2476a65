//! Proxy health state behind `/healthz` and `/livez`, imitating kube-proxy's
//! `ProxyHealthServer` (pkg/proxy/healthcheck/proxy_health.go).
//!
//! The sync loop reports two events: [`Health::queued_update`] when a change
//! arrives that still has to be programmed, and [`Health::updated`] when a sync
//! succeeded. The agent is unhealthy while the oldest unprogrammed change is
//! older than `health_timeout`.
//!
//! Start-up counts as a queued change. `/livez` therefore stays healthy for
//! `health_timeout` while the agent waits for its first complete state (the
//! API server may be slow), and fails after that, as kube-proxy's does. One
//! deliberate difference: `/healthz` (readiness, load balancers) fails until
//! the first successful sync, so neither a rolling update nor a load balancer
//! moves on to a node whose dataplane is still empty.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use jiff::Timestamp;

/// kube-proxy's default `--config-sync-period`/`syncPeriod` (30 s); kube-proxy
/// passes `2 × syncPeriod` as the health timeout, so 60 s by default.
pub const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// Health of the agent's programming loop, shared (via `Arc`) between the sync
/// loop, the node watcher and the HTTP server.
#[derive(Debug)]
pub struct Health {
    health_timeout: Duration,
    state: Mutex<State>,
    /// Answers given: `/healthz` and `/livez`, each 200 and 503
    /// (kube-proxy's `kubeproxy_proxy_healthz_total` and `_livez_total`).
    answers: [[std::sync::atomic::AtomicU64; 2]; 2],
}

/// Which probe an answer was to.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    Healthz,
    Livez,
}

#[derive(Debug)]
struct State {
    /// Last successful sync: monotonic time for the staleness check, wall time
    /// for the JSON body.
    last_updated: Option<(Instant, Timestamp)>,
    /// When the oldest change still waiting to be programmed was queued.
    oldest_pending: Option<Instant>,
    node_eligible: bool,
}

/// A snapshot of the health state at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthStatus {
    /// No queued change (start-up included) is older than the timeout.
    pub healthy: bool,
    /// At least one sync succeeded.
    pub synced: bool,
    /// The Node is neither being deleted nor tainted for autoscaler removal.
    pub node_eligible: bool,
    /// Last successful sync, `None` before the first one.
    pub last_updated: Option<Timestamp>,
    pub current_time: Timestamp,
}

impl HealthStatus {
    /// What `/healthz` answers: programming healthy and the node still eligible
    /// (so load balancers drain a node that is about to go away).
    pub fn healthz_ok(&self) -> bool {
        self.healthy && self.synced && self.node_eligible
    }

    /// What `/livez` answers: programming health only, so the kubelet does not
    /// restart the agent just because its node is being drained.
    pub fn livez_ok(&self) -> bool {
        self.healthy
    }

    /// kube-proxy's `/healthz` JSON body.
    pub fn healthz_body(&self) -> String {
        format!(
            r#"{{"lastUpdated": "{}","currentTime": "{}", "nodeEligible": {}}}"#,
            rfc3339(self.reported_last_updated(self.healthz_ok())),
            rfc3339(self.current_time),
            self.node_eligible
        )
    }

    /// kube-proxy's `/livez` JSON body (no `nodeEligible`).
    pub fn livez_body(&self) -> String {
        format!(
            r#"{{"lastUpdated": "{}","currentTime": "{}"}}"#,
            rfc3339(self.reported_last_updated(self.livez_ok())),
            rfc3339(self.current_time)
        )
    }

    /// Like kube-proxy, a healthy answer reports `lastUpdated` as "now": older
    /// releases updated it on every sync-loop tick, and clients grew to expect a
    /// recent value whenever the proxy is healthy.
    fn reported_last_updated(&self, ok: bool) -> Timestamp {
        if ok {
            self.current_time
        } else {
            // Go's zero time.Time, which kube-proxy prints when it never synced.
            self.last_updated.unwrap_or(GO_ZERO_TIME)
        }
    }
}

/// 0001-01-01T00:00:00Z.
const GO_ZERO_TIME: Timestamp = Timestamp::constant(-62_135_596_800, 0);

/// RFC 3339 with whole seconds, as Go's `time.RFC3339`.
fn rfc3339(ts: Timestamp) -> String {
    Timestamp::from_second(ts.as_second())
        .unwrap_or(ts)
        .to_string()
}

impl Health {
    pub fn new(health_timeout: Duration) -> Self {
        Self {
            health_timeout,
            state: Mutex::new(State {
                last_updated: None,
                oldest_pending: Some(Instant::now()),
                // Eligible until the node watcher says otherwise, as in kube-proxy.
                node_eligible: true,
            }),
            answers: Default::default(),
        }
    }

    /// Counts an answer to `probe`: 200 when `ok`, else 503.
    pub fn answered(&self, probe: Probe, ok: bool) {
        self.answers[probe as usize][usize::from(!ok)]
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The answers so far as kube-proxy's counters, by code.
    pub fn answer_samples(&self) -> Vec<crate::serve::Sample> {
        let mut out = Vec::new();
        for (probe, name, help) in [
            (
                Probe::Healthz,
                "kubeproxy_proxy_healthz_total",
                "Cumulative proxy healthz HTTP status",
            ),
            (
                Probe::Livez,
                "kubeproxy_proxy_livez_total",
                "Cumulative proxy livez HTTP status",
            ),
        ] {
            for (i, code) in ["200", "503"].into_iter().enumerate() {
                out.push(crate::serve::Sample {
                    name: name.to_string(),
                    help: help.to_string(),
                    kind: crate::serve::SampleKind::Counter,
                    labels: vec![("code".to_string(), code.to_string())],
                    value: self.answers[probe as usize][i]
                        .load(std::sync::atomic::Ordering::Relaxed)
                        as f64,
                });
            }
        }
        out
    }

    pub fn health_timeout(&self) -> Duration {
        self.health_timeout
    }

    /// A change arrived that has not been programmed yet.
    pub fn queued_update(&self) {
        self.queued_update_at(Instant::now());
    }

    /// [`Self::queued_update`] with an explicit clock. Only the oldest pending
    /// change counts: later ones must not push the deadline back.
    pub fn queued_update_at(&self, now: Instant) {
        let mut state = self.lock();
        state.oldest_pending.get_or_insert(now);
    }

    /// A sync succeeded: everything queued so far is programmed.
    pub fn updated(&self) {
        self.updated_at(Instant::now(), Timestamp::now());
    }

    /// [`Self::updated`] with an explicit clock.
    pub fn updated_at(&self, now: Instant, wall: Timestamp) {
        let mut state = self.lock();
        state.oldest_pending = None;
        state.last_updated = Some((now, wall));
    }

    /// `false` when the agent's Node is being deleted or carries the
    /// `ToBeDeletedByClusterAutoscaler` taint; the caller decides.
    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    pub fn node_eligible(&self) -> bool {
        self.lock().node_eligible
    }

    /// Programming health now, ignoring node eligibility (kube-proxy's `IsHealthy`).
    pub fn is_healthy(&self) -> bool {
        self.status().healthy
    }

    pub fn status(&self) -> HealthStatus {
        self.status_at(Instant::now(), Timestamp::now())
    }

    /// The health state as seen at `now` (monotonic) / `wall` (for display).
    pub fn status_at(&self, now: Instant, wall: Timestamp) -> HealthStatus {
        let state = self.lock();
        let healthy = state
            .oldest_pending
            .is_none_or(|queued| now.saturating_duration_since(queued) < self.health_timeout);
        HealthStatus {
            healthy,
            synced: state.last_updated.is_some(),
            node_eligible: state.node_eligible,
            last_updated: state.last_updated.map(|(_, wall)| wall),
            current_time: wall,
        }
    }

    /// The state is plain data that stays consistent even if a holder panicked,
    /// so a poisoned lock is simply reused (no panics on the request path).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(60);

    fn wall(second: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + second).expect("valid timestamp")
    }

    #[test]
    fn not_ready_before_first_sync_and_not_live_after_the_grace() {
        let t0 = Instant::now();
        let health = Health::new(TIMEOUT);
        let status = health.status_at(t0, wall(0));
        assert!(!status.synced);
        assert!(!status.healthz_ok(), "not ready before the first sync");
        assert!(status.livez_ok(), "live while starting");
        assert_eq!(status.last_updated, None);
        assert_eq!(
            status.healthz_body(),
            r#"{"lastUpdated": "0001-01-01T00:00:00Z","currentTime": "2023-11-14T22:13:20Z", "nodeEligible": true}"#
        );
        // A queued change before the first sync does not extend the grace.
        health.queued_update_at(t0 + Duration::from_secs(30));
        let late = health.status_at(t0 + TIMEOUT + Duration::from_secs(1), wall(61));
        assert!(!late.livez_ok() && !late.healthz_ok());
        health.updated_at(t0 + TIMEOUT, wall(60));
        assert!(health.status_at(t0 + TIMEOUT, wall(60)).healthz_ok());
    }

    #[test]
    fn healthy_after_sync_and_while_queue_is_young() {
        let health = Health::new(TIMEOUT);
        let t0 = Instant::now();
        health.updated_at(t0, wall(0));
        let status = health.status_at(t0 + Duration::from_secs(1), wall(1));
        assert!(status.healthz_ok() && status.livez_ok());
        assert_eq!(status.last_updated, Some(wall(0)));
        // Healthy answers report lastUpdated = currentTime, like kube-proxy.
        assert_eq!(
            status.livez_body(),
            r#"{"lastUpdated": "2023-11-14T22:13:21Z","currentTime": "2023-11-14T22:13:21Z"}"#
        );

        // No pending change: healthy however long ago the last sync was.
        assert!(health.status_at(t0 + TIMEOUT * 10, wall(600)).healthy);

        health.queued_update_at(t0 + Duration::from_secs(100));
        let young = t0 + Duration::from_secs(100) + TIMEOUT - Duration::from_millis(1);
        assert!(health.status_at(young, wall(159)).healthy);
    }

    #[test]
    fn stale_queue_is_unhealthy_until_next_sync() {
        let health = Health::new(TIMEOUT);
        let t0 = Instant::now();
        health.updated_at(t0, wall(0));
        health.queued_update_at(t0 + Duration::from_secs(10));
        // A later change must not reset the deadline of the oldest one.
        health.queued_update_at(t0 + Duration::from_secs(50));

        let stale = t0 + Duration::from_secs(10) + TIMEOUT;
        let status = health.status_at(stale, wall(70));
        assert!(!status.healthy && !status.healthz_ok() && !status.livez_ok());
        // Unhealthy answers report the real last sync.
        assert_eq!(
            status.healthz_body(),
            r#"{"lastUpdated": "2023-11-14T22:13:20Z","currentTime": "2023-11-14T22:14:30Z", "nodeEligible": true}"#
        );

        health.updated_at(stale, wall(70));
        assert!(health.status_at(stale, wall(70)).healthy);
    }

    #[test]
    fn ineligible_node_fails_healthz_but_not_livez() {
        let health = Health::new(TIMEOUT);
        let t0 = Instant::now();
        health.updated_at(t0, wall(0));
        health.set_node_eligible(false);
        let status = health.status_at(t0, wall(0));
        assert!(!status.healthz_ok());
        assert!(status.livez_ok());
        assert!(status.healthz_body().ends_with(r#""nodeEligible": false}"#));
        assert!(!status.livez_body().contains("nodeEligible"));

        health.set_node_eligible(true);
        assert!(health.status_at(t0, wall(0)).healthz_ok());
    }

    #[test]
    fn bodies_are_valid_json() {
        let health = Health::new(TIMEOUT);
        let status = health.status();
        for body in [status.healthz_body(), status.livez_body()] {
            let value: serde_json::Value = serde_json::from_str(&body).expect("valid JSON");
            assert!(value["lastUpdated"].is_string() && value["currentTime"].is_string());
        }
    }
}
