//! The agent's Prometheus metrics, rendered by hand in the text exposition
//! format 0.0.4. Names follow kube-proxy's (pkg/proxy/metrics/metrics.go) where
//! a counterpart exists, so existing dashboards and alerts keep working; the
//! rest are prefixed `proxy_agent_`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use jiff::Timestamp;

use crate::dataplane::ConntrackCleanup;

/// `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// kube-proxy's sync duration buckets: exponential from 1 ms, factor 2, 15
/// buckets (1 ms .. 16.384 s).
pub fn sync_duration_buckets() -> Vec<f64> {
    let mut bound = 0.001;
    (0..15)
        .map(|_| {
            let b = bound;
            bound *= 2.0;
            b
        })
        .collect()
}

/// kube-proxy's network programming buckets: 0, 0.25 s, 0.5 s, every second up
/// to 59 s, every 5 s up to 115 s, every 30 s up to 5 min (81 bounds; the
/// leading 0 comes from kube-proxy's bucket-merging helper).
/// client-go's buckets of `rest_client_request_duration_seconds`.
pub fn api_request_buckets() -> Vec<f64> {
    vec![
        0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0,
    ]
}

pub fn network_programming_buckets() -> Vec<f64> {
    let mut out = vec![0.0, 0.25, 0.5];
    out.extend((1..=59).map(f64::from));
    out.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    out.extend((0..7).map(|i| 120.0 + 30.0 * f64::from(i)));
    out
}

/// Kind of an on-demand [`Sample`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SampleKind {
    Gauge,
    Counter,
}

impl SampleKind {
    fn as_str(self) -> &'static str {
        match self {
            SampleKind::Gauge => "gauge",
            SampleKind::Counter => "counter",
        }
    }
}

/// One line produced on demand by a registered collector, e.g. an eBPF
/// dataplane's in-kernel packet counters read at scrape time. Samples sharing a
/// `name` form one metric family; `help` and `kind` are taken from the first.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub help: String,
    pub kind: SampleKind,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

type Collector = Box<dyn Fn() -> Vec<Sample> + Send + Sync>;

/// A fixed-bucket histogram. Buckets are stored non-cumulatively and summed
/// at render time; one mutex keeps count, sum and buckets consistent.
#[derive(Debug)]
struct Histogram {
    bounds: Vec<f64>,
    state: Mutex<HistogramState>,
}

#[derive(Debug, Default)]
struct HistogramState {
    /// `counts[i]` = observations in `(bounds[i-1], bounds[i]]`; the extra last
    /// slot holds those above every bound (the `+Inf` bucket).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: Vec<f64>) -> Self {
        let counts = vec![0; bounds.len() + 1];
        Self {
            bounds,
            state: Mutex::new(HistogramState {
                counts,
                ..HistogramState::default()
            }),
        }
    }

    fn observe(&self, value: f64) {
        // Prometheus buckets are upper-inclusive (`le`).
        let idx = self.bounds.partition_point(|&b| b < value);
        let mut state = lock(&self.state);
        state.counts[idx] += 1;
        state.sum += value;
        state.count += 1;
    }

    fn count_and_sum(&self) -> (u64, f64) {
        let state = lock(&self.state);
        (state.count, state.sum)
    }

    /// The series of one histogram of a family, `labels` written before
    /// `le` (`k="v",` each, escaped).
    fn render_series(&self, out: &mut String, name: &str, labels: &str) {
        let state = lock(&self.state);
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&state.counts) {
            cumulative += count;
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}le=\"{}\"}} {cumulative}",
                format_float(*bound)
            );
        }
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {}", state.count);
        let plain = labels.trim_end_matches(',');
        let braces = if plain.is_empty() {
            String::new()
        } else {
            format!("{{{plain}}}")
        };
        let _ = writeln!(out, "{name}_sum{braces} {}", format_float(state.sum));
        let _ = writeln!(out, "{name}_count{braces} {}", state.count);
    }
}

/// The value of a one-value metric.
enum Scalar {
    Gauge(f64),
    Counter(u64),
}

/// An `f64` gauge stored as bits so it can be set without a lock.
#[derive(Debug, Default)]
struct FloatGauge(AtomicU64);

impl FloatGauge {
    fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// The agent's metric registry, shared via `Arc` between the sync loop, the
/// dataplane and the `/metrics` handler.
pub struct Metrics {
    sync_duration: Histogram,
    sync_full_duration: Histogram,
    sync_partial_duration: Histogram,
    network_programming: Histogram,
    last_sync_timestamp: FloatGauge,
    last_queued_timestamp: FloatGauge,
    endpoint_changes: AtomicU64,
    service_changes: AtomicU64,
    /// Changes seen since the last successful sync.
    endpoint_changes_pending: AtomicU64,
    service_changes_pending: AtomicU64,
    frontends: AtomicU64,
    backends: AtomicU64,
    rejected_objects: AtomicU64,
    sync_errors: AtomicU64,
    /// Stale UDP conntrack entries deleted, per family (kube-proxy's
    /// conntrack reconciler's counter), and how long each cleanup took.
    conntrack_deleted: [AtomicU64; 2],
    conntrack_duration: [Histogram; 2],
    events_dropped: AtomicU64,
    applies_full: AtomicU64,
    applies_partial: AtomicU64,
    /// The node's IP families, as kube-proxy's `ip_family` label values
    /// ("IPv4", "IPv6"): kube-proxy runs one proxier per family, each
    /// labelling its series; one sync here programs both.
    families: Mutex<Vec<&'static str>>,
    /// Service ports with a Local policy and no local endpoint, by
    /// `[family][internal, external]`.
    no_local_endpoints: Mutex<[[usize; 2]; 2]>,
    /// kube-proxy's name for its mode's sync failures, when it has one.
    failures_name: Mutex<Option<&'static str>>,
    process_start: f64,
    /// The API client's requests (client-go's `rest_client_*`): counts by
    /// (code, host, method), durations by (verb, host).
    api_requests: Mutex<std::collections::BTreeMap<(String, String, String), u64>>,
    api_durations: Mutex<std::collections::BTreeMap<(String, String), Histogram>>,
    collectors: Mutex<Vec<Collector>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry whose `process_start_time_seconds` is now; create it early
    /// in `main`.
    pub fn new() -> Self {
        Self::with_start_time(Timestamp::now())
    }

    pub fn with_start_time(process_start: Timestamp) -> Self {
        Self {
            sync_duration: Histogram::new(sync_duration_buckets()),
            sync_full_duration: Histogram::new(sync_duration_buckets()),
            sync_partial_duration: Histogram::new(sync_duration_buckets()),
            network_programming: Histogram::new(network_programming_buckets()),
            last_sync_timestamp: FloatGauge::default(),
            last_queued_timestamp: FloatGauge::default(),
            endpoint_changes: AtomicU64::new(0),
            service_changes: AtomicU64::new(0),
            endpoint_changes_pending: AtomicU64::new(0),
            service_changes_pending: AtomicU64::new(0),
            frontends: AtomicU64::new(0),
            backends: AtomicU64::new(0),
            rejected_objects: AtomicU64::new(0),
            sync_errors: AtomicU64::new(0),
            conntrack_deleted: [AtomicU64::new(0), AtomicU64::new(0)],
            conntrack_duration: [
                Histogram::new(sync_duration_buckets()),
                Histogram::new(sync_duration_buckets()),
            ],
            events_dropped: AtomicU64::new(0),
            applies_full: AtomicU64::new(0),
            applies_partial: AtomicU64::new(0),
            families: Mutex::new(vec![IPV4]),
            no_local_endpoints: Mutex::new([[0; 2]; 2]),
            failures_name: Mutex::new(None),
            process_start: unix_seconds(process_start),
            api_requests: Mutex::new(Default::default()),
            api_durations: Mutex::new(Default::default()),
            collectors: Mutex::new(Vec::new()),
        }
    }

    /// A successful sync (full or partial apply) that took `elapsed`.
    pub fn observe_sync(&self, full: bool, elapsed: Duration) {
        self.observe_sync_at(full, elapsed, Timestamp::now());
    }

    /// [`Self::observe_sync`] with an explicit completion time.
    pub fn observe_sync_at(&self, full: bool, elapsed: Duration, finished: Timestamp) {
        let secs = elapsed.as_secs_f64();
        self.sync_duration.observe(secs);
        if full {
            self.sync_full_duration.observe(secs);
            self.applies_full.fetch_add(1, Ordering::Relaxed);
        } else {
            self.sync_partial_duration.observe(secs);
            self.applies_partial.fetch_add(1, Ordering::Relaxed);
        }
        self.last_sync_timestamp.set(unix_seconds(finished));
    }

    /// A sync was requested (kube-proxy sets this in `Sync()`); if it runs far
    /// ahead of the last sync timestamp, programming is stuck.
    pub fn sync_queued(&self) {
        self.sync_queued_at(Timestamp::now());
    }

    pub fn sync_queued_at(&self, queued: Timestamp) {
        self.last_queued_timestamp.set(unix_seconds(queued));
    }

    /// Time from an object change (e.g. an EndpointSlice's
    /// `endpoints.kubernetes.io/last-change-trigger-time`) to its programming.
    pub fn observe_network_programming(&self, latency: Duration) {
        self.network_programming.observe(latency.as_secs_f64());
    }

    /// `(count, sum in seconds)` of network programming observations.
    pub fn network_programming_samples(&self) -> (u64, f64) {
        self.network_programming.count_and_sum()
    }

    pub fn add_endpoint_changes(&self, n: u64) {
        self.endpoint_changes.fetch_add(n, Ordering::Relaxed);
        self.endpoint_changes_pending
            .fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_service_changes(&self, n: u64) {
        self.service_changes.fetch_add(n, Ordering::Relaxed);
        self.service_changes_pending.fetch_add(n, Ordering::Relaxed);
    }

    /// The changes seen so far are programmed (kube-proxy's pending gauges
    /// go to 0 at each successful sync).
    pub fn changes_synced(&self) {
        self.endpoint_changes_pending.store(0, Ordering::Relaxed);
        self.service_changes_pending.store(0, Ordering::Relaxed);
    }

    /// Programmed frontends (service IP:port:protocol) and backends.
    pub fn set_table_size(&self, frontends: u64, backends: u64) {
        self.frontends.store(frontends, Ordering::Relaxed);
        self.backends.store(backends, Ordering::Relaxed);
    }

    /// Objects currently refused by validation (not programmed).
    pub fn set_rejected_objects(&self, n: u64) {
        self.rejected_objects.store(n, Ordering::Relaxed);
    }

    /// What a sync's connection-tracking cleanup deleted and how long it
    /// took, per family.
    pub fn observe_conntrack_cleanup(&self, cleanup: &ConntrackCleanup) {
        for family in 0..2 {
            self.conntrack_deleted[family]
                .fetch_add(cleanup.deleted[family] as u64, Ordering::Relaxed);
            if let Some(took) = cleanup.took[family] {
                self.conntrack_duration[family].observe(took.as_secs_f64());
            }
        }
    }

    /// The node's families (both false: IPv4, kube-proxy's default).
    pub fn set_ip_families(&self, v4: bool, v6: bool) {
        let mut families = Vec::new();
        if v4 || !v6 {
            families.push(IPV4);
        }
        if v6 {
            families.push(IPV6);
        }
        *lock(&self.families) = families;
    }

    /// [`Self::no_local_endpoints`]'s counts, `[family][policy]` (IPv4,
    /// IPv6; internal, external).
    pub fn set_no_local_endpoints(&self, counts: [[usize; 2]; 2]) {
        *lock(&self.no_local_endpoints) = counts;
    }

    /// The mode, for kube-proxy's name of its sync failure counter
    /// (`iptables_restore_failures_total`, `nftables_sync_failures_total`),
    /// which counts what `proxy_agent_sync_errors_total` counts.
    pub fn set_mode(&self, mode: &str) {
        *lock(&self.failures_name) = match mode {
            "iptables" => Some("kubeproxy_sync_proxy_rules_iptables_restore_failures_total"),
            "nftables" => Some("kubeproxy_sync_proxy_rules_nftables_sync_failures_total"),
            _ => None,
        };
    }

    pub fn inc_sync_errors(&self) {
        self.sync_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A Kubernetes Event was not sent because of rate limiting.
    pub fn inc_events_dropped(&self) {
        self.events_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// An API request answered `code` (or "<error>") after `elapsed`, as
    /// client-go's `rest_client_requests_total` and
    /// `rest_client_request_duration_seconds` count it.
    pub fn observe_api_request(&self, method: &str, host: &str, code: &str, elapsed: Duration) {
        *lock(&self.api_requests)
            .entry((code.to_string(), host.to_string(), method.to_string()))
            .or_insert(0) += 1;
        lock(&self.api_durations)
            .entry((method.to_string(), host.to_string()))
            .or_insert_with(|| Histogram::new(api_request_buckets()))
            .observe(elapsed.as_secs_f64());
    }

    fn render_api_requests(&self, out: &mut String) {
        let requests = lock(&self.api_requests);
        if !requests.is_empty() {
            header(
                out,
                "rest_client_requests_total",
                "Number of HTTP requests, partitioned by status code, method, and host.",
                "counter",
            );
            for ((code, host, method), n) in requests.iter() {
                let _ = writeln!(
                    out,
                    "rest_client_requests_total{{code=\"{}\",host=\"{}\",method=\"{}\"}} {n}",
                    escape_label_value(code),
                    escape_label_value(host),
                    escape_label_value(method)
                );
            }
        }
        drop(requests);
        let durations = lock(&self.api_durations);
        if !durations.is_empty() {
            const NAME: &str = "rest_client_request_duration_seconds";
            header(
                out,
                NAME,
                "Request latency in seconds. Broken down by verb, and host.",
                "histogram",
            );
            for ((verb, host), histogram) in durations.iter() {
                let labels = format!(
                    "host=\"{}\",verb=\"{}\",",
                    escape_label_value(host),
                    escape_label_value(verb)
                );
                histogram.render_series(out, NAME, &labels);
            }
        }
    }

    /// Registers a callback run at every scrape; its samples are appended
    /// after the built-in metrics. It must be quick and must not call back
    /// into [`Self::render`].
    pub fn register_collector<F>(&self, collector: F)
    where
        F: Fn() -> Vec<Sample> + Send + Sync + 'static,
    {
        lock(&self.collectors).push(Box::new(collector));
    }

    /// The whole registry in the text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        let families = lock(&self.families).clone();
        for (histogram, name, help) in [
            (
                &self.sync_duration,
                "kubeproxy_sync_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds",
            ),
            (
                &self.sync_full_duration,
                "kubeproxy_sync_full_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for full resyncs",
            ),
            (
                &self.sync_partial_duration,
                "kubeproxy_sync_partial_proxy_rules_duration_seconds",
                "SyncProxyRules latency in seconds for partial resyncs",
            ),
            (
                &self.network_programming,
                "kubeproxy_network_programming_duration_seconds",
                "In Cluster Network Programming Latency in seconds",
            ),
        ] {
            header(&mut out, name, help, "histogram");
            for family in &families {
                histogram.render_series(&mut out, name, &format!("ip_family=\"{family}\","));
            }
        }
        for (name, help, value) in self.scalars() {
            let by_family = BY_FAMILY.contains(&name);
            let (kind, text) = match value {
                Scalar::Gauge(v) => ("gauge", format_float(v)),
                Scalar::Counter(v) => ("counter", v.to_string()),
            };
            header(&mut out, name, help, kind);
            if by_family {
                for family in &families {
                    let _ = writeln!(out, "{name}{{ip_family=\"{family}\"}} {text}");
                }
            } else {
                let _ = writeln!(out, "{name} {text}");
            }
        }
        let no_local = *lock(&self.no_local_endpoints);
        header(
            &mut out,
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints",
            "gauge",
        );
        for family in &families {
            let row = no_local[usize::from(*family == IPV6)];
            for (policy, count) in ["internal", "external"].iter().zip(row) {
                let _ = writeln!(
                    out,
                    "kubeproxy_sync_proxy_rules_no_local_endpoints_total{{ip_family=\"{family}\",traffic_policy=\"{policy}\"}} {count}"
                );
            }
        }
        const CONNTRACK_DURATION: &str = "kubeproxy_conntrack_reconciler_sync_duration_seconds";
        header(
            &mut out,
            CONNTRACK_DURATION,
            "ReconcileConntrackFlowsLatency latency in seconds",
            "histogram",
        );
        for family in &families {
            self.conntrack_duration[usize::from(*family == IPV6)].render_series(
                &mut out,
                CONNTRACK_DURATION,
                &format!("ip_family=\"{family}\","),
            );
        }
        header(
            &mut out,
            "kubeproxy_conntrack_reconciler_deleted_entries_total",
            "Cumulative conntrack flows deleted by conntrack reconciler",
            "counter",
        );
        for family in &families {
            let _ = writeln!(
                out,
                "kubeproxy_conntrack_reconciler_deleted_entries_total{{ip_family=\"{family}\"}} {}",
                load(&self.conntrack_deleted[usize::from(*family == IPV6)])
            );
        }
        if let Some(name) = *lock(&self.failures_name) {
            header(
                &mut out,
                name,
                "Cumulative proxy rules sync failures (proxy_agent_sync_errors_total)",
                "counter",
            );
            for family in &families {
                let _ = writeln!(
                    out,
                    "{name}{{ip_family=\"{family}\"}} {}",
                    load(&self.sync_errors)
                );
            }
        }
        header(
            &mut out,
            "proxy_agent_applies_total",
            "Dataplane applies by kind",
            "counter",
        );
        for (kind, count) in [
            ("full", &self.applies_full),
            ("partial", &self.applies_partial),
        ] {
            let _ = writeln!(
                out,
                "proxy_agent_applies_total{{kind=\"{kind}\"}} {}",
                load(count)
            );
        }
        gauge(
            &mut out,
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            self.process_start,
        );
        self.render_api_requests(&mut out);
        for (name, help, kind, value) in super::process::samples() {
            header(&mut out, name, help, kind);
            let _ = writeln!(out, "{name} {}", format_float(value));
        }
        self.render_collected(&mut out);
        out
    }

    /// The gauges and counters of one value each, in exposition order:
    /// name, help, value.
    fn scalars(&self) -> [(&'static str, &'static str, Scalar); 11] {
        use Scalar::{Counter, Gauge};
        [
            (
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                "The last time proxy rules were successfully synced",
                Gauge(self.last_sync_timestamp.get()),
            ),
            (
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                "The last time a sync of proxy rules was queued",
                Gauge(self.last_queued_timestamp.get()),
            ),
            (
                "kubeproxy_sync_proxy_rules_endpoint_changes_total",
                "Cumulative proxy rules Endpoint changes",
                Counter(load(&self.endpoint_changes)),
            ),
            (
                "kubeproxy_sync_proxy_rules_service_changes_total",
                "Cumulative proxy rules Service changes",
                Counter(load(&self.service_changes)),
            ),
            (
                "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
                "Pending proxy rules Endpoint changes",
                Gauge(load(&self.endpoint_changes_pending) as f64),
            ),
            (
                "kubeproxy_sync_proxy_rules_service_changes_pending",
                "Pending proxy rules Service changes",
                Gauge(load(&self.service_changes_pending) as f64),
            ),
            (
                "proxy_agent_frontends",
                "Service frontends (IP, port, protocol) programmed in the dataplane",
                Gauge(load(&self.frontends) as f64),
            ),
            (
                "proxy_agent_backends",
                "Backends programmed in the dataplane",
                Gauge(load(&self.backends) as f64),
            ),
            (
                "proxy_agent_rejected_objects",
                "Objects currently rejected by validation and not programmed",
                Gauge(load(&self.rejected_objects) as f64),
            ),
            (
                "proxy_agent_sync_errors_total",
                "Failed dataplane syncs",
                Counter(load(&self.sync_errors)),
            ),
            (
                "proxy_agent_events_dropped_total",
                "Kubernetes Events not sent because of rate limiting",
                Counter(load(&self.events_dropped)),
            ),
        ]
    }

    fn render_collected(&self, out: &mut String) {
        let samples: Vec<Sample> = lock(&self.collectors).iter().flat_map(|c| c()).collect();
        // Group by family, keeping first-appearance order, so each family
        // gets exactly one HELP/TYPE header as the format requires.
        let mut families: Vec<(&Sample, Vec<&Sample>)> = Vec::new();
        for sample in &samples {
            if !valid_metric_name(&sample.name)
                || !sample.labels.iter().all(|(k, _)| valid_label_name(k))
            {
                // One bad sample must not make the whole scrape unparsable.
                tracing::debug!(name = %sample.name, "skipping metric sample with an invalid name");
                continue;
            }
            match families
                .iter_mut()
                .find(|(first, _)| first.name == sample.name)
            {
                Some((_, members)) => members.push(sample),
                None => families.push((sample, vec![sample])),
            }
        }
        for (first, members) in families {
            header(out, &first.name, &first.help, first.kind.as_str());
            for sample in members {
                out.push_str(&sample.name);
                write_labels(out, &sample.labels);
                let _ = writeln!(out, " {}", format_float(sample.value));
            }
        }
    }
}

const IPV4: &str = "IPv4";
const IPV6: &str = "IPv6";

/// The one-value series kube-proxy labels with `ip_family`.
const BY_FAMILY: [&str; 2] = [
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
];

fn load(v: &AtomicU64) -> u64 {
    v.load(Ordering::Relaxed)
}

/// Plain counters and floats stay consistent after a panic elsewhere, so a
/// poisoned lock is reused rather than failing the scrape.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn unix_seconds(ts: Timestamp) -> f64 {
    ts.as_duration().as_secs_f64()
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn gauge(out: &mut String, name: &str, help: &str, value: f64) {
    header(out, name, help, "gauge");
    let _ = writeln!(out, "{name} {}", format_float(value));
}

fn write_labels(out: &mut String, labels: &[(String, String)]) {
    if labels.is_empty() {
        return;
    }
    out.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{k}=\"{}\"", escape_label_value(v));
    }
    out.push('}');
}

/// Label values escape backslash, double quote and line feed.
pub fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// HELP text escapes backslash and line feed (not quotes).
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Prometheus spells the special values `+Inf`, `-Inf`, `NaN`; Rust's
/// shortest round-trip formatting is fine for the rest.
fn format_float(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v == f64::INFINITY {
        "+Inf".to_owned()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        v.to_string()
    }
}

fn valid_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_layouts_match_kube_proxy() {
        let sync = sync_duration_buckets();
        assert_eq!(sync.len(), 15);
        assert_eq!(sync[0], 0.001);
        assert_eq!(sync[14], 16.384);
        let np = network_programming_buckets();
        assert_eq!(np.len(), 81);
        assert_eq!(&np[..5], &[0.0, 0.25, 0.5, 1.0, 2.0]);
        assert_eq!(np[61], 59.0);
        assert_eq!(np[62], 60.0);
        assert_eq!(np[73], 115.0);
        assert_eq!(np[74], 120.0);
        assert_eq!(np[80], 300.0);
        assert!(np.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn histogram_renders_exact_text() {
        let h = Histogram::new(vec![0.25, 0.5, 1.0]);
        h.observe(0.25); // upper-inclusive: lands in le=0.25
        h.observe(0.75);
        h.observe(5.0); // only in +Inf
        let mut out = String::new();
        header(&mut out, "x_seconds", "Some \"latency\"\nin s", "histogram");
        h.render_series(&mut out, "x_seconds", "");
        assert_eq!(
            out,
            "# HELP x_seconds Some \"latency\"\\nin s\n\
             # TYPE x_seconds histogram\n\
             x_seconds_bucket{le=\"0.25\"} 1\n\
             x_seconds_bucket{le=\"0.5\"} 1\n\
             x_seconds_bucket{le=\"1\"} 2\n\
             x_seconds_bucket{le=\"+Inf\"} 3\n\
             x_seconds_sum 6\n\
             x_seconds_count 3\n"
        );
    }

    #[test]
    fn observe_sync_feeds_kube_proxy_histograms() {
        let m = Metrics::with_start_time(Timestamp::from_second(1_700_000_000).expect("ts"));
        m.observe_sync_at(
            true,
            Duration::from_millis(3),
            Timestamp::from_second(1_700_000_100).expect("ts"),
        );
        m.observe_sync_at(
            false,
            Duration::from_millis(1),
            Timestamp::from_second(1_700_000_200).expect("ts"),
        );
        let text = m.render();
        let section: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("kubeproxy_sync_proxy_rules_duration_seconds"))
            .collect();
        let mut expected = vec![
            "# HELP kubeproxy_sync_proxy_rules_duration_seconds SyncProxyRules latency in seconds"
                .to_owned(),
            "# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram".to_owned(),
        ];
        let cumulative = [1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2];
        for (bound, n) in sync_duration_buckets().iter().zip(cumulative) {
            expected.push(format!(
                "kubeproxy_sync_proxy_rules_duration_seconds_bucket{{ip_family=\"IPv4\",le=\"{bound}\"}} {n}"
            ));
        }
        expected.push(
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"+Inf\"} 2"
                .to_owned(),
        );
        expected.push(
            "kubeproxy_sync_proxy_rules_duration_seconds_sum{ip_family=\"IPv4\"} 0.004".to_owned(),
        );
        expected.push(
            "kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 2".to_owned(),
        );
        assert_eq!(section, expected);
        for line in [
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1\n",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 1\n",
            "proxy_agent_applies_total{kind=\"full\"} 1\n",
            "proxy_agent_applies_total{kind=\"partial\"} 1\n",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"} 1700000200\n",
            "process_start_time_seconds 1700000000\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // A dual-stack node: every family's series, as kube-proxy's two
        // proxiers give them.
        m.set_ip_families(true, true);
        let text = m.render();
        for family in ["IPv4", "IPv6"] {
            let line = format!(
                "kubeproxy_sync_proxy_rules_duration_seconds_count{{ip_family=\"{family}\"}} 2\n"
            );
            assert!(text.contains(&line), "missing {line:?}");
        }
        m.set_ip_families(false, true);
        assert!(!m.render().contains("IPv4"));
    }

    #[test]
    fn no_local_endpoints_and_the_modes_failure_counter_under_kube_proxys_names() {
        let m = Metrics::new();
        m.set_ip_families(true, true);
        m.set_no_local_endpoints([[1, 2], [0, 3]]);
        m.set_mode("nftables");
        m.inc_sync_errors();
        let text = m.render();
        for line in [
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"internal\"} 1\n",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv4\",traffic_policy=\"external\"} 2\n",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv6\",traffic_policy=\"internal\"} 0\n",
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total{ip_family=\"IPv6\",traffic_policy=\"external\"} 3\n",
            "kubeproxy_sync_proxy_rules_nftables_sync_failures_total{ip_family=\"IPv6\"} 1\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        m.set_mode("ebpf");
        assert!(!m.render().contains("failures_total"));
        m.set_mode("iptables");
        assert!(m.render().contains(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total{ip_family=\"IPv4\"} 1\n"
        ));
    }

    #[test]
    fn counters_gauges_and_network_programming() {
        let m = Metrics::new();
        m.observe_network_programming(Duration::from_millis(500));
        m.observe_network_programming(Duration::from_secs(400));
        assert_eq!(m.network_programming_samples(), (2, 400.5));
        m.set_table_size(3, 7);
        m.set_rejected_objects(2);
        m.add_endpoint_changes(5);
        m.add_service_changes(4);
        m.inc_sync_errors();
        m.observe_conntrack_cleanup(&ConntrackCleanup {
            deleted: [3, 0],
            took: [Some(Duration::from_millis(3)), None],
        });
        m.inc_events_dropped();
        m.inc_events_dropped();
        m.sync_queued_at(Timestamp::from_second(1_700_000_000).expect("ts"));
        let text = m.render();
        for line in [
            "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0\"} 0\n",
            "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.5\"} 1\n",
            "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"300\"} 1\n",
            "kubeproxy_network_programming_duration_seconds_bucket{ip_family=\"IPv4\",le=\"+Inf\"} 2\n",
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family=\"IPv4\"} 1700000000\n",
            "kubeproxy_sync_proxy_rules_endpoint_changes_total 5\n",
            "kubeproxy_sync_proxy_rules_service_changes_total 4\n",
            "kubeproxy_sync_proxy_rules_endpoint_changes_pending 5\n",
            "kubeproxy_sync_proxy_rules_service_changes_pending 4\n",
            "proxy_agent_frontends 3\n",
            "proxy_agent_backends 7\n",
            "proxy_agent_rejected_objects 2\n",
            "proxy_agent_sync_errors_total 1\n",
            "kubeproxy_conntrack_reconciler_deleted_entries_total{ip_family=\"IPv4\"} 3\n",
            "kubeproxy_conntrack_reconciler_sync_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.002\"} 0\n",
            "kubeproxy_conntrack_reconciler_sync_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.004\"} 1\n",
            "kubeproxy_conntrack_reconciler_sync_duration_seconds_count{ip_family=\"IPv4\"} 1\n",
            "proxy_agent_events_dropped_total 2\n",
            "# TYPE proxy_agent_events_dropped_total counter\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // Every family is declared exactly once: 20 of the agent's, and the
        // process family.
        let types = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        let helps = text.lines().filter(|l| l.starts_with("# HELP ")).count();
        assert_eq!(types, 20 + super::super::process::samples().len());
        assert_eq!(helps, types);
        for family in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
        ] {
            assert!(text.contains(&format!("# TYPE {family} ")), "{family}");
        }
        // A sync programs what was pending.
        m.changes_synced();
        let text = m.render();
        assert!(text.contains("kubeproxy_sync_proxy_rules_endpoint_changes_pending 0\n"));
        assert!(text.contains("kubeproxy_sync_proxy_rules_endpoint_changes_total 5\n"));
    }

    /// The queries of the usual kube-proxy dashboard and alerts (the
    /// kubernetes-mixin's "Proxy" dashboard: sync rate and latency, network
    /// programming rate and latency, API requests by code class and their
    /// latency by verb, memory and CPU; the stale-sync alert) find a series
    /// of the name with labels their matchers accept, as an agent that
    /// synced and talked to the API server exposes them.
    #[test]
    fn the_kube_proxy_dashboards_queries_find_their_series() {
        let m = Metrics::new();
        m.observe_sync(true, Duration::from_millis(3));
        m.observe_network_programming(Duration::from_millis(800));
        m.observe_api_request("GET", "10.96.0.1:443", "200", Duration::from_millis(4));
        m.observe_api_request("POST", "10.96.0.1:443", "201", Duration::from_millis(9));
        let text = m.render();
        let series: Vec<(&str, Vec<(&str, &str)>)> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (head, _value) = l.rsplit_once(' ')?;
                let (name, labels) = match head.split_once('{') {
                    Some((name, rest)) => (name, rest.trim_end_matches('}')),
                    None => (head, ""),
                };
                let labels = labels
                    .split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k, v.trim_matches('"')))
                    .collect();
                Some((name, labels))
            })
            .collect();
        // (metric, label, what its value must start with) per matcher.
        let queries: &[(&str, &[(&str, &str)])] = &[
            ("kubeproxy_sync_proxy_rules_duration_seconds_count", &[]),
            (
                "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
                &[("le", "")],
            ),
            ("kubeproxy_network_programming_duration_seconds_count", &[]),
            (
                "kubeproxy_network_programming_duration_seconds_bucket",
                &[("le", "")],
            ),
            ("rest_client_requests_total", &[("code", "2")]),
            (
                "rest_client_request_duration_seconds_bucket",
                &[("verb", "POST"), ("le", "")],
            ),
            (
                "rest_client_request_duration_seconds_bucket",
                &[("verb", "GET"), ("le", "")],
            ),
            ("process_resident_memory_bytes", &[]),
            ("process_cpu_seconds_total", &[]),
            ("kubeproxy_sync_proxy_rules_last_timestamp_seconds", &[]),
            (
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                &[],
            ),
        ];
        for (metric, matchers) in queries {
            let found = series.iter().any(|(name, labels)| {
                name == metric
                    && matchers.iter().all(|(k, prefix)| {
                        labels
                            .iter()
                            .any(|(lk, lv)| lk == k && lv.starts_with(prefix))
                    })
            });
            assert!(found, "no series answers {metric} {matchers:?} in\n{text}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape_label_value("x\ny"), "x\\ny");
        assert_eq!(escape_label_value("plain"), "plain");
    }

    #[test]
    fn collectors_are_grouped_escaped_and_validated() {
        let m = Metrics::new();
        m.register_collector(|| {
            let sample = |prog: &str, value: f64| Sample {
                name: "proxy_agent_ebpf_packets_total".to_owned(),
                help: "Packets seen by eBPF programs".to_owned(),
                kind: SampleKind::Counter,
                labels: vec![("program".to_owned(), prog.to_owned())],
                value,
            };
            vec![
                sample("tc\"ingress\"", 10.0),
                Sample {
                    name: "bad name".to_owned(),
                    help: String::new(),
                    kind: SampleKind::Gauge,
                    labels: Vec::new(),
                    value: 1.0,
                },
                sample("connect4", 3.0),
            ]
        });
        m.register_collector(|| {
            vec![Sample {
                name: "proxy_agent_ebpf_map_fill_ratio".to_owned(),
                help: "Fill ratio".to_owned(),
                kind: SampleKind::Gauge,
                labels: Vec::new(),
                value: f64::NAN,
            }]
        });
        let text = m.render();
        let tail = text
            .split_once("# HELP proxy_agent_ebpf_packets_total")
            .map(|(_, t)| t)
            .expect("collector family rendered");
        assert_eq!(
            tail,
            " Packets seen by eBPF programs\n\
             # TYPE proxy_agent_ebpf_packets_total counter\n\
             proxy_agent_ebpf_packets_total{program=\"tc\\\"ingress\\\"\"} 10\n\
             proxy_agent_ebpf_packets_total{program=\"connect4\"} 3\n\
             # HELP proxy_agent_ebpf_map_fill_ratio Fill ratio\n\
             # TYPE proxy_agent_ebpf_map_fill_ratio gauge\n\
             proxy_agent_ebpf_map_fill_ratio NaN\n"
        );
        assert!(!text.contains("bad name"));
    }
}
