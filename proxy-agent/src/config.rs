//! The `--config FILE` of `proxy-agent run`: a `KubeProxyConfiguration`
//! (`kubeproxy.config.k8s.io/v1alpha1`) in YAML or JSON, with kube-proxy's field
//! names for the fields that have a counterpart here, plus our own fields under
//! `proxyAgent:`.
//!
//! [`load`] reads, parses (unknown fields are rejected) and validates a file
//! into a [`FileConfig`], where every field is `Option`: `None` means the file
//! does not set it, so that the caller can merge flag > file > default.
use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::IpNet;
use serde::Deserialize;

pub use crate::dataplane::{DetectLocal, Mode};

/// The `apiVersion` we accept.
pub const API_VERSION: &str = "kubeproxy.config.k8s.io/v1alpha1";
/// The `kind` we accept.
pub const KIND: &str = "KubeProxyConfiguration";

/// Why a config file was not accepted. Its `Display` starts with the file path.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}: {}", path.display(), errors.join("; "))]
    Invalid { path: PathBuf, errors: Vec<String> },
}

// ---------------------------------------------------------------------------
// The file as written (serde).

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConfig {
    api_version: Option<String>,
    kind: Option<String>,
    mode: Option<String>,
    #[serde(rename = "clusterCIDR")]
    cluster_cidr: Option<String>,
    node_port_addresses: Option<Vec<String>>,
    sync_period: Option<String>,
    min_sync_period: Option<String>,
    bind_address: Option<String>,
    metrics_bind_address: Option<String>,
    healthz_bind_address: Option<String>,
    hostname_override: Option<String>,
    client_connection: Option<RawClientConnection>,
    conntrack: Option<RawConntrack>,
    ipvs: Option<RawIpvs>,
    iptables: Option<RawRules>,
    nftables: Option<RawRules>,
    logging: Option<RawLogging>,
    proxy_agent: Option<RawProxyAgent>,
    // The other v1alpha1 fields, as kubeadm writes them (every one, most
    // zero or null). Accepted; those set to something but their zero value
    // have no counterpart here and are logged once ([`FileConfig::no_counterpart`]).
    detect_local_mode: Option<String>,
    detect_local: Option<RawDetectLocal>,
    bind_address_hard_fail: Option<bool>,
    feature_gates: Option<std::collections::BTreeMap<String, bool>>,
    enable_profiling: Option<bool>,
    show_hidden_metrics_for_version: Option<String>,
    oom_score_adj: Option<i64>,
    config_sync_period: Option<String>,
    port_range: Option<String>,
    winkernel: Option<RawWinkernel>,
    windows_run_as_service: Option<bool>,
    /// Dropped from v1alpha1 in Kubernetes 1.27, still in older dumps.
    udp_idle_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawDetectLocal {
    bridge_interface: Option<String>,
    interface_name_prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawWinkernel {
    network_name: Option<String>,
    source_vip: Option<String>,
    #[serde(rename = "enableDSR")]
    enable_dsr: Option<bool>,
    root_hns_endpoint_name: Option<String>,
    forward_health_check_vip: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawClientConnection {
    kubeconfig: Option<String>,
    accept_content_types: Option<String>,
    content_type: Option<String>,
    qps: Option<f64>,
    burst: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawConntrack {
    max_per_core: Option<i64>,
    min: Option<i64>,
    tcp_established_timeout: Option<String>,
    tcp_close_wait_timeout: Option<String>,
    tcp_be_liberal: Option<bool>,
    udp_timeout: Option<String>,
    udp_stream_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawIpvs {
    scheduler: Option<String>,
    sync_period: Option<String>,
    min_sync_period: Option<String>,
    #[serde(rename = "strictARP")]
    strict_arp: Option<bool>,
    tcp_timeout: Option<String>,
    tcp_fin_timeout: Option<String>,
    udp_timeout: Option<String>,
    #[serde(rename = "excludeCIDRs")]
    exclude_cidrs: Option<Vec<String>>,
}

/// The `iptables:` and `nftables:` sections.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRules {
    masquerade_all: Option<bool>,
    masquerade_bit: Option<i64>,
    sync_period: Option<String>,
    min_sync_period: Option<String>,
    /// `iptables:` only.
    localhost_node_ports: Option<bool>,
    /// `iptables:` only (Kubernetes 1.35).
    #[serde(rename = "snatNodeInternalIP")]
    snat_node_internal_ip: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawLogging {
    format: Option<String>,
    verbosity: Option<i64>,
    /// Nanoseconds, or a Go duration.
    flush_frequency: Option<RawFlushFrequency>,
    vmodule: Option<Vec<serde::de::IgnoredAny>>,
    /// klog's buffer options: nothing here buffers.
    #[serde(rename = "options")]
    _options: Option<serde::de::IgnoredAny>,
}

/// `logging.flushFrequency`: an integer of nanoseconds or a duration string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawFlushFrequency {
    Nanoseconds(i64),
    Duration(String),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawProxyAgent {
    manifests: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    bpf_root: Option<PathBuf>,
    cgroup_root: Option<PathBuf>,
    socket_lb: Option<bool>,
    translated_mark_bit: Option<RawMarkBit>,
    interfaces: Option<Vec<String>>,
    exclude_interfaces: Option<Vec<String>>,
}

/// `proxyAgent.translatedMarkBit`: a bit number, or `none`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawMarkBit {
    Bit(i64),
    Word(String),
}

// ---------------------------------------------------------------------------
// The validated result.

/// `logging.format`.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// `nodePortAddresses`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodePortAddresses {
    /// `["primary"]`: the node's primary IPs.
    Primary,
    Cidrs(Vec<IpNet>),
}

/// A `host:port` listen address; the host may be empty (all addresses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindAddress {
    pub ip: Option<IpAddr>,
    pub port: u16,
}

impl BindAddress {
    /// The socket address to listen on (an empty host means all IPv4 and,
    /// where the system maps them, IPv6 addresses).
    pub fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(
            self.ip
                .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
            self.port,
        )
    }
}

impl fmt::Display for BindAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            Some(IpAddr::V6(ip)) => write!(f, "[{ip}]:{}", self.port),
            Some(ip) => write!(f, "{ip}:{}", self.port),
            None => write!(f, ":{}", self.port),
        }
    }
}

/// Parses `IP:port`, `[IPv6]:port` or `:port`.
pub fn parse_bind_address(s: &str) -> Result<BindAddress, String> {
    let bad = |why: &str| format!("{s:?} is not IP:port ({why})");
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err(bad("no port"));
    };
    let Ok(port) = port.parse::<u16>() else {
        return Err(bad("bad port"));
    };
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() {
        return Ok(BindAddress { ip: None, port });
    }
    match host.parse::<IpAddr>() {
        Ok(ip) => Ok(BindAddress { ip: Some(ip), port }),
        Err(_) => Err(bad("host is not an IP address")),
    }
}

/// `clientConnection:` (only the kubeconfig is used; the rest is validated).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientConnection {
    pub kubeconfig: Option<PathBuf>,
    /// Whether fields this build does not use (qps, burst, content types) are set.
    pub has_unused: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conntrack {
    pub max_per_core: Option<u32>,
    pub min: Option<u32>,
    pub tcp_established_timeout: Option<Duration>,
    pub tcp_close_wait_timeout: Option<Duration>,
    pub udp_timeout: Option<Duration>,
    pub udp_stream_timeout: Option<Duration>,
}

impl Conntrack {
    /// Whether any limit or timeout is set (0 is unset).
    fn is_set(&self) -> bool {
        *self != Conntrack::default()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ipvs {
    pub scheduler: Option<String>,
    pub sync_period: Option<Duration>,
    pub min_sync_period: Option<Duration>,
    pub strict_arp: Option<bool>,
    pub tcp_timeout: Option<Duration>,
    pub tcp_fin_timeout: Option<Duration>,
    pub udp_timeout: Option<Duration>,
    pub exclude_cidrs: Option<Vec<IpNet>>,
}

/// The `iptables:` or `nftables:` section.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    pub masquerade_all: Option<bool>,
    pub masquerade_bit: Option<u8>,
    pub sync_period: Option<Duration>,
    pub min_sync_period: Option<Duration>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Logging {
    pub format: Option<LogFormat>,
    pub verbosity: Option<u8>,
}

/// Our own fields, under `proxyAgent:`. Relative paths are resolved against
/// the directory of the config file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProxyAgent {
    pub manifests: Option<PathBuf>,
    /// Where the agent keeps what must outlive it (`--state-dir`).
    pub state_dir: Option<PathBuf>,
    pub bpf_root: Option<PathBuf>,
    /// The cgroup v2 directory of the socket hooks (`--cgroup-root`).
    pub cgroup_root: Option<PathBuf>,
    /// Socket-level load balancing for pods (`--socket-lb`).
    pub socket_lb: Option<bool>,
    /// The packet-mark bit of "translated at ingress" in the ebpf mode
    /// (`--translated-mark-bit`).
    pub translated_mark_bit: Option<MarkBit>,
    pub interfaces: Option<Vec<String>>,
    pub exclude_interfaces: Option<Vec<String>>,
}

/// A validated config file; `None` means "not set by the file".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileConfig {
    pub mode: Option<Mode>,
    pub cluster_cidrs: Option<Vec<IpNet>>,
    pub node_port_addresses: Option<NodePortAddresses>,
    pub sync_period: Option<Duration>,
    pub min_sync_period: Option<Duration>,
    pub bind_address: Option<IpAddr>,
    pub metrics_bind_address: Option<BindAddress>,
    pub healthz_bind_address: Option<BindAddress>,
    pub hostname_override: Option<String>,
    pub client_connection: ClientConnection,
    pub conntrack: Option<Conntrack>,
    pub ipvs: Option<Ipvs>,
    pub iptables: Option<Rules>,
    pub nftables: Option<Rules>,
    pub logging: Logging,
    pub proxy_agent: ProxyAgent,
    /// `detectLocalMode` (`ClusterCIDR` when unset).
    pub detect_local: Option<DetectLocal>,
    /// `bindAddressHardFail`.
    pub bind_address_hard_fail: Option<bool>,
    /// The v1alpha1 fields set to something but their zero value that have
    /// no counterpart here (logged once at start).
    pub no_counterpart: Vec<&'static str>,
}

/// Parses `detectLocalMode`; `Ok(None)` for "" (unset).
pub fn parse_detect_local(s: &str) -> Result<Option<DetectLocal>, String> {
    match s.trim() {
        "" => Ok(None),
        "ClusterCIDR" => Ok(Some(DetectLocal::ClusterCidr)),
        "NodeCIDR" => Ok(Some(DetectLocal::NodeCidr)),
        "BridgeInterface" | "InterfaceNamePrefix" => Err(format!(
            "{s:?} is not supported by proxy-agent (ClusterCIDR, NodeCIDR): pods are told by \
             their addresses"
        )),
        other => Err(format!(
            "unknown mode {other:?} (ClusterCIDR, NodeCIDR, BridgeInterface, InterfaceNamePrefix)"
        )),
    }
}

impl FileConfig {
    /// `syncPeriod` for `mode`: our top-level field, else the mode's own
    /// section, as kube-proxy converts v1alpha1 (the ebpf mode reads the
    /// `iptables:` section, kube-proxy's default mode's).
    pub fn sync_period_for(&self, mode: Mode) -> Option<Duration> {
        self.sync_period
            .or_else(|| self.section_of(mode, |r| r.sync_period, |i| i.sync_period))
    }

    /// `minSyncPeriod` for `mode`, as [`FileConfig::sync_period_for`].
    pub fn min_sync_period_for(&self, mode: Mode) -> Option<Duration> {
        self.min_sync_period
            .or_else(|| self.section_of(mode, |r| r.min_sync_period, |i| i.min_sync_period))
    }

    fn section_of(
        &self,
        mode: Mode,
        rules: impl Fn(&Rules) -> Option<Duration>,
        ipvs: impl Fn(&Ipvs) -> Option<Duration>,
    ) -> Option<Duration> {
        match mode {
            Mode::Ipvs => self.ipvs.as_ref().and_then(ipvs),
            Mode::Nftables => self.nftables.as_ref().and_then(rules),
            Mode::Iptables | Mode::Ebpf => self.iptables.as_ref().and_then(rules),
        }
    }

    /// The fields this file sets that are validated and stored but that this
    /// build does not act on (kube-proxy field names); fields at their zero
    /// value, as kubeadm writes every field, are not among them.
    pub fn not_yet_used(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut add = |set: bool, name| {
            if set {
                out.push(name);
            }
        };
        add(self.bind_address.is_some(), "bindAddress");
        add(
            self.client_connection.has_unused,
            "clientConnection (except kubeconfig)",
        );
        add(
            self.conntrack.as_ref().is_some_and(Conntrack::is_set),
            "conntrack",
        );
        for (rules, name) in [
            (&self.iptables, "iptables.masqueradeBit"),
            (&self.nftables, "nftables.masqueradeBit"),
        ] {
            add(
                rules.as_ref().is_some_and(|r| r.masquerade_bit.is_some()),
                name,
            );
        }
        out.extend(self.no_counterpart.iter().copied());
        out
    }

    /// `masqueradeAll` for `mode`: the `iptables:` or `nftables:` section
    /// matching the mode (ipvs uses `iptables:`, as in kube-proxy), else
    /// the other one; in ebpf mode, true when either section says true.
    pub fn masquerade_all(&self, mode: Mode) -> Option<bool> {
        let of = |rules: &Option<Rules>| rules.as_ref().and_then(|r| r.masquerade_all);
        let (iptables, nftables) = (of(&self.iptables), of(&self.nftables));
        match mode {
            Mode::Iptables | Mode::Ipvs => iptables.or(nftables),
            Mode::Nftables => nftables.or(iptables),
            Mode::Ebpf => match (iptables, nftables) {
                (None, None) => None,
                (a, b) => Some(a == Some(true) || b == Some(true)),
            },
        }
    }
}

/// Reads, parses and validates a config file.
pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut cfg = parse(&text).map_err(|e| match e {
        ParseError::Syntax(message) => ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        },
        ParseError::Invalid(errors) => ConfigError::Invalid {
            path: path.to_path_buf(),
            errors,
        },
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    for p in [
        &mut cfg.proxy_agent.manifests,
        &mut cfg.proxy_agent.state_dir,
        &mut cfg.proxy_agent.bpf_root,
        &mut cfg.proxy_agent.cgroup_root,
    ]
    .into_iter()
    .flatten()
    {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
    Ok(cfg)
}

/// Why a config text was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    /// Not YAML/JSON, wrong types, or an unknown field (serde's message).
    Syntax(String),
    /// Every validation error, each starting with its field path.
    Invalid(Vec<String>),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Syntax(m) => f.write_str(m),
            Self::Invalid(errors) => f.write_str(&errors.join("; ")),
        }
    }
}

impl std::error::Error for ParseError {}

/// Parses and validates a config text (YAML; JSON is YAML too). Relative
/// paths are kept as written.
pub fn parse(text: &str) -> Result<FileConfig, ParseError> {
    let raw: RawConfig = if text.trim().is_empty() {
        RawConfig::default()
    } else {
        serde_saphyr::from_str(text)
            .map_err(|e| ParseError::Syntax(e.without_snippet().to_string()))?
    };
    let mut v = Validator::default();
    let cfg = v.config(raw);
    if v.errors.is_empty() {
        Ok(cfg)
    } else {
        Err(ParseError::Invalid(v.errors))
    }
}

#[derive(Default)]
struct Validator {
    errors: Vec<String>,
    /// Fields set to something but their zero value that have no
    /// counterpart here.
    no_counterpart: Vec<&'static str>,
}

/// kube-proxy treats "" as "unset" for its string fields.
fn non_empty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.trim().is_empty())
}

impl Validator {
    fn err(&mut self, field: &str, msg: impl fmt::Display) {
        self.errors.push(format!("{field}: {msg}"));
    }

    fn config(&mut self, raw: RawConfig) -> FileConfig {
        self.type_meta(raw.api_version.as_deref(), raw.kind.as_deref());
        self.unused_fields(&raw);
        let mode = non_empty(raw.mode).and_then(|m| self.mode(&m));
        let cluster_cidrs = non_empty(raw.cluster_cidr).map(|s| self.cluster_cidrs(&s));
        let node_port_addresses = raw.node_port_addresses.map(|list| {
            let (value, errors) = node_port_addresses(&list);
            for (index, msg) in errors {
                match index {
                    Some(i) => self.err(&format!("nodePortAddresses[{i}]"), msg),
                    None => self.err("nodePortAddresses", msg),
                }
            }
            value
        });
        let sync_period = self.positive("syncPeriod", raw.sync_period);
        let min_sync_period = self.non_negative("minSyncPeriod", raw.min_sync_period);
        // 0.0.0.0 (kubeadm's) and :: override nothing.
        let bind_address = non_empty(raw.bind_address).and_then(|s| {
            // kube-proxy's bindAddress is an IP; accept IP:port too.
            s.parse::<IpAddr>()
                .ok()
                .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
                .or_else(|| {
                    self.err("bindAddress", format!("{s:?} is not an IP address"));
                    None
                })
                .filter(|ip| !ip.is_unspecified())
        });
        let metrics_bind_address = self.host_port("metricsBindAddress", raw.metrics_bind_address);
        let healthz_bind_address = self.host_port("healthzBindAddress", raw.healthz_bind_address);
        let hostname_override = non_empty(raw.hostname_override);
        let client_connection = raw
            .client_connection
            .map(|c| self.client_connection(c))
            .unwrap_or_default();
        let conntrack = raw.conntrack.map(|c| self.conntrack(c));
        let ipvs = raw.ipvs.map(|c| self.ipvs(c));
        let iptables = raw.iptables.map(|c| self.rules("iptables", c));
        let nftables = raw.nftables.map(|c| self.rules("nftables", c));
        let logging = raw.logging.map(|l| self.logging(l)).unwrap_or_default();
        let proxy_agent = raw
            .proxy_agent
            .map(|p| self.proxy_agent(p))
            .unwrap_or_default();
        let detect_local = raw.detect_local_mode.and_then(|m| {
            parse_detect_local(&m)
                .map_err(|msg| self.err("detectLocalMode", msg))
                .ok()
                .flatten()
        });
        FileConfig {
            mode,
            cluster_cidrs,
            node_port_addresses,
            sync_period,
            min_sync_period,
            bind_address,
            metrics_bind_address,
            healthz_bind_address,
            hostname_override,
            client_connection,
            conntrack,
            ipvs,
            iptables,
            nftables,
            logging,
            proxy_agent,
            detect_local,
            bind_address_hard_fail: raw.bind_address_hard_fail,
            no_counterpart: std::mem::take(&mut self.no_counterpart),
        }
    }

    /// Notes `field` as set without a counterpart when `set`.
    fn unused(&mut self, field: &'static str, set: bool) {
        if set && !self.no_counterpart.contains(&field) {
            self.no_counterpart.push(field);
        }
    }

    /// The v1alpha1 fields with no counterpart here: validated where
    /// kube-proxy validates them, noted when set.
    fn unused_fields(&mut self, raw: &RawConfig) {
        let set = |s: &Option<String>| s.as_ref().is_some_and(|s| !s.trim().is_empty());
        let yes = |b: Option<bool>| b == Some(true);
        if let Some(d) = &raw.detect_local {
            self.unused(
                "detectLocal",
                set(&d.bridge_interface) || set(&d.interface_name_prefix),
            );
        }
        self.unused(
            "featureGates",
            raw.feature_gates.as_ref().is_some_and(|g| !g.is_empty()),
        );
        self.unused("enableProfiling", yes(raw.enable_profiling));
        self.unused(
            "showHiddenMetricsForVersion",
            set(&raw.show_hidden_metrics_for_version),
        );
        if let Some(adj) = raw.oom_score_adj {
            if !(-1000..=1000).contains(&adj) {
                self.err("oomScoreAdj", format!("{adj} is not in [-1000, 1000]"));
            }
            self.unused("oomScoreAdj", true);
        }
        let period = self.period("configSyncPeriod", raw.config_sync_period.clone());
        self.unused("configSyncPeriod", period.is_some());
        self.unused("portRange", set(&raw.port_range));
        if let Some(w) = &raw.winkernel {
            let any = set(&w.network_name)
                || set(&w.source_vip)
                || set(&w.root_hns_endpoint_name)
                || yes(w.enable_dsr)
                || yes(w.forward_health_check_vip);
            self.unused("winkernel", any);
        }
        self.unused("windowsRunAsService", yes(raw.windows_run_as_service));
        let idle = self.period("udpIdleTimeout", raw.udp_idle_timeout.clone());
        self.unused("udpIdleTimeout", idle.is_some());
    }

    /// A duration where 0 means unset, as kube-proxy defaults it: `None`
    /// for 0 (or absent), an error for a negative one.
    fn period(&mut self, field: &str, s: Option<String>) -> Option<Duration> {
        let (neg, d) = self.duration(field, s)?;
        if neg && !d.is_zero() {
            self.err(field, "must be >= 0");
            return None;
        }
        (!d.is_zero()).then_some(d)
    }

    /// `apiVersion` and `kind` must name a KubeProxyConfiguration.
    fn type_meta(&mut self, api_version: Option<&str>, kind: Option<&str>) {
        match api_version {
            Some(API_VERSION) => {}
            Some(other) => self.err(
                "apiVersion",
                format!("must be {API_VERSION:?}, got {other:?}"),
            ),
            None => self.err("apiVersion", format!("missing (must be {API_VERSION:?})")),
        }
        match kind {
            Some(KIND) => {}
            Some(other) => self.err("kind", format!("must be {KIND:?}, got {other:?}")),
            None => self.err("kind", format!("missing (must be {KIND:?})")),
        }
    }

    fn mode(&mut self, name: &str) -> Option<Mode> {
        let mode = Mode::from_name(name);
        if mode.is_none() {
            let known: Vec<&str> = Mode::ALL.into_iter().map(Mode::name).collect();
            self.err(
                "mode",
                format!("unknown mode {name:?} ({})", known.join(", ")),
            );
        }
        mode
    }

    /// `clusterCIDR`: comma-separated, at most one per family.
    fn cluster_cidrs(&mut self, list: &str) -> Vec<IpNet> {
        let cidrs: Vec<IpNet> = list
            .split(',')
            .filter_map(|c| self.cidr("clusterCIDR", c.trim()))
            .collect();
        let v4 = cidrs.iter().filter(|c| matches!(c, IpNet::V4(_))).count();
        if v4 > 1 || cidrs.len() - v4 > 1 {
            self.err("clusterCIDR", "at most one CIDR per IP family");
        }
        cidrs
    }

    fn cidr(&mut self, field: &str, s: &str) -> Option<IpNet> {
        match s.parse::<IpNet>() {
            Ok(n) => Some(n),
            Err(_) => {
                self.err(field, format!("{s:?} is not a CIDR"));
                None
            }
        }
    }

    fn duration(&mut self, field: &str, s: Option<String>) -> Option<(bool, Duration)> {
        let s = s?;
        match parse_go_duration_signed(&s) {
            Ok(d) => Some(d),
            Err(e) => {
                self.err(field, e);
                None
            }
        }
    }

    fn positive(&mut self, field: &str, s: Option<String>) -> Option<Duration> {
        let (neg, d) = self.duration(field, s)?;
        if neg || d.is_zero() {
            self.err(field, "must be > 0");
            return None;
        }
        Some(d)
    }

    fn non_negative(&mut self, field: &str, s: Option<String>) -> Option<Duration> {
        let (neg, d) = self.duration(field, s)?;
        if neg && !d.is_zero() {
            self.err(field, "must be >= 0");
            return None;
        }
        Some(d)
    }

    fn count(&mut self, field: &str, n: Option<i64>) -> Option<u32> {
        let n = n?;
        match u32::try_from(n) {
            Ok(n) => Some(n),
            Err(_) if n < 0 => {
                self.err(field, "must be >= 0");
                None
            }
            Err(_) => {
                self.err(field, format!("{n} is too large"));
                None
            }
        }
    }

    fn host_port(&mut self, field: &str, s: Option<String>) -> Option<BindAddress> {
        let s = non_empty(s)?;
        match parse_bind_address(&s) {
            Ok(a) => Some(a),
            Err(e) => {
                self.err(field, e);
                None
            }
        }
    }

    fn client_connection(&mut self, c: RawClientConnection) -> ClientConnection {
        if let Some(qps) = c.qps
            && !(qps.is_finite() && qps >= 0.0)
        {
            self.err("clientConnection.qps", format!("{qps} is not >= 0"));
        }
        self.count("clientConnection.burst", c.burst);
        ClientConnection {
            kubeconfig: non_empty(c.kubeconfig).map(PathBuf::from),
            has_unused: non_empty(c.accept_content_types).is_some()
                || non_empty(c.content_type).is_some()
                || c.qps.is_some_and(|q| q != 0.0)
                || c.burst.is_some_and(|b| b != 0),
        }
    }

    fn conntrack(&mut self, c: RawConntrack) -> Conntrack {
        // 0 leaves the kernel's value, as in kube-proxy.
        let nonzero = |n: Option<u32>| n.filter(|n| *n != 0);
        self.unused("conntrack.tcpBeLiberal", c.tcp_be_liberal == Some(true));
        Conntrack {
            max_per_core: nonzero(self.count("conntrack.maxPerCore", c.max_per_core)),
            min: nonzero(self.count("conntrack.min", c.min)),
            tcp_established_timeout: self
                .period("conntrack.tcpEstablishedTimeout", c.tcp_established_timeout),
            tcp_close_wait_timeout: self
                .period("conntrack.tcpCloseWaitTimeout", c.tcp_close_wait_timeout),
            udp_timeout: self.period("conntrack.udpTimeout", c.udp_timeout),
            udp_stream_timeout: self.period("conntrack.udpStreamTimeout", c.udp_stream_timeout),
        }
    }

    fn ipvs(&mut self, c: RawIpvs) -> Ipvs {
        const SCHEDULERS: &[&str] = &[
            "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq", "mh",
        ];
        let scheduler = non_empty(c.scheduler).filter(|s| {
            let ok = SCHEDULERS.contains(&s.as_str());
            if !ok {
                self.err(
                    "ipvs.scheduler",
                    format!("unknown scheduler {s:?} ({})", SCHEDULERS.join(", ")),
                );
            }
            ok
        });
        Ipvs {
            scheduler,
            sync_period: self.period("ipvs.syncPeriod", c.sync_period),
            min_sync_period: self.period("ipvs.minSyncPeriod", c.min_sync_period),
            strict_arp: c.strict_arp,
            tcp_timeout: self.non_negative("ipvs.tcpTimeout", c.tcp_timeout),
            tcp_fin_timeout: self.non_negative("ipvs.tcpFinTimeout", c.tcp_fin_timeout),
            udp_timeout: self.non_negative("ipvs.udpTimeout", c.udp_timeout),
            exclude_cidrs: c.exclude_cidrs.map(|list| {
                list.iter()
                    .enumerate()
                    .filter_map(|(i, s)| self.cidr(&format!("ipvs.excludeCIDRs[{i}]"), s))
                    .collect()
            }),
        }
    }

    fn rules(&mut self, section: &str, c: RawRules) -> Rules {
        let masquerade_bit = c.masquerade_bit.and_then(|b| match u8::try_from(b) {
            Ok(b) if b <= 31 => Some(b),
            _ => {
                self.err(
                    &format!("{section}.masqueradeBit"),
                    format!("{b} is not in [0, 31]"),
                );
                None
            }
        });
        // kube-proxy serves localhost NodePorts by `nodePortAddresses`
        // here; SNAT to the node's InternalIP is not done.
        if section == "iptables" {
            self.unused(
                "iptables.localhostNodePorts",
                c.localhost_node_ports == Some(true),
            );
            self.unused(
                "iptables.snatNodeInternalIP",
                c.snat_node_internal_ip == Some(true),
            );
        } else if c.localhost_node_ports.is_some() || c.snat_node_internal_ip.is_some() {
            self.err(
                section,
                "localhostNodePorts and snatNodeInternalIP belong to iptables:",
            );
        }
        Rules {
            masquerade_all: c.masquerade_all,
            masquerade_bit,
            // 0 is "unset" in a section, as kube-proxy defaults it.
            sync_period: self.period(&format!("{section}.syncPeriod"), c.sync_period),
            min_sync_period: self.period(&format!("{section}.minSyncPeriod"), c.min_sync_period),
        }
    }

    fn logging(&mut self, l: RawLogging) -> Logging {
        let format = non_empty(l.format).and_then(|f| match f.as_str() {
            "text" => Some(LogFormat::Text),
            "json" => Some(LogFormat::Json),
            _ => {
                self.err(
                    "logging.format",
                    format!("unknown format {f:?} (text, json)"),
                );
                None
            }
        });
        let verbosity = l.verbosity.and_then(|n| match u8::try_from(n) {
            Ok(n) => Some(n),
            Err(_) => {
                self.err("logging.verbosity", format!("{n} is not in [0, 255]"));
                None
            }
        });
        let flush = match l.flush_frequency {
            Some(RawFlushFrequency::Nanoseconds(n)) => n != 0,
            Some(RawFlushFrequency::Duration(d)) => {
                self.period("logging.flushFrequency", Some(d)).is_some()
            }
            None => false,
        };
        self.unused("logging.flushFrequency", flush);
        self.unused("logging.vmodule", l.vmodule.is_some_and(|v| !v.is_empty()));
        Logging { format, verbosity }
    }

    fn proxy_agent(&mut self, p: RawProxyAgent) -> ProxyAgent {
        let mut paths = |field: &str, p: Option<PathBuf>| {
            p.filter(|p| {
                let empty = p.as_os_str().is_empty();
                if empty {
                    self.err(field, "must not be empty");
                }
                !empty
            })
        };
        let manifests = paths("proxyAgent.manifests", p.manifests);
        let state_dir = paths("proxyAgent.stateDir", p.state_dir);
        let bpf_root = paths("proxyAgent.bpfRoot", p.bpf_root);
        let cgroup_root = paths("proxyAgent.cgroupRoot", p.cgroup_root);
        let translated_mark_bit = p.translated_mark_bit.and_then(|raw| {
            let parsed = match raw {
                RawMarkBit::Bit(bit) => parse_mark_bit(&bit.to_string()),
                RawMarkBit::Word(word) => parse_mark_bit(&word),
            };
            parsed
                .map_err(|msg| self.err("proxyAgent.translatedMarkBit", msg))
                .ok()
        });
        let mut names = |field: &str, list: Option<Vec<String>>| {
            list.inspect(|list| {
                for (i, name) in list.iter().enumerate() {
                    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', ',']) {
                        self.err(
                            &format!("{field}[{i}]"),
                            format!("{name:?} is not an interface name"),
                        );
                    }
                }
            })
        };
        ProxyAgent {
            manifests,
            state_dir,
            bpf_root,
            cgroup_root,
            socket_lb: p.socket_lb,
            translated_mark_bit,
            interfaces: names("proxyAgent.interfaces", p.interfaces),
            exclude_interfaces: names("proxyAgent.excludeInterfaces", p.exclude_interfaces),
        }
    }
}

// ---------------------------------------------------------------------------
// nodePortAddresses.

/// Parses `--nodeport-addresses`: comma-separated CIDRs, or the word
/// `primary`, validated as the file's `nodePortAddresses`. An empty value
/// is an empty list (every local address but loopback, as kube-proxy).
pub fn parse_node_port_addresses(s: &str) -> Result<NodePortAddresses, String> {
    let list: Vec<&str> = if s.trim().is_empty() {
        Vec::new()
    } else {
        s.split(',').map(str::trim).collect()
    };
    let (value, errors) = node_port_addresses(&list);
    if errors.is_empty() {
        return Ok(value);
    }
    Err(errors
        .into_iter()
        .map(|(_, msg)| msg)
        .collect::<Vec<_>>()
        .join("; "))
}

/// The entries of `nodePortAddresses`, and each error with the index of
/// the entry it is about (`None`: the list as a whole).
fn node_port_addresses<S: AsRef<str>>(
    list: &[S],
) -> (NodePortAddresses, Vec<(Option<usize>, String)>) {
    let mut errors = Vec::new();
    if list.iter().any(|a| a.as_ref() == "primary") {
        if list.len() > 1 {
            errors.push((
                None,
                "\"primary\" cannot be combined with other entries".to_string(),
            ));
        }
        return (NodePortAddresses::Primary, errors);
    }
    let cidrs = list
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let c = c.as_ref();
            c.parse::<IpNet>()
                .map_err(|_| errors.push((Some(i), format!("{c:?} is not a CIDR"))))
                .ok()
        })
        .collect();
    (NodePortAddresses::Cidrs(cidrs), errors)
}

// ---------------------------------------------------------------------------
// The translated-packet mark.

/// `--translated-mark-bit`: a bit of the packet mark (0-31), or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MarkBit(pub Option<u8>);

/// Parses `--translated-mark-bit`: a bit number 0-31, or `none` for no
/// mark.
pub fn parse_mark_bit(s: &str) -> Result<MarkBit, String> {
    if s.trim().eq_ignore_ascii_case("none") {
        return Ok(MarkBit(None));
    }
    match s.trim().parse::<u8>() {
        Ok(bit) if bit < 32 => Ok(MarkBit(Some(bit))),
        _ => Err(format!(
            "{s:?} is not a packet-mark bit: give 0-31, or none"
        )),
    }
}

// ---------------------------------------------------------------------------
// Go durations.

/// Parses a Go duration ("300ms", "1m30s", "1h0m0s", "0") that must be > 0.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    match parse_go_duration_signed(s)? {
        (false, d) if !d.is_zero() => Ok(d),
        _ => Err(format!("{s:?} must be > 0")),
    }
}

/// A Go duration that may be 0 (kube-proxy's "unset" for its timeouts).
pub fn parse_go_duration_or_zero(s: &str) -> Result<Duration, String> {
    match parse_go_duration_signed(s)? {
        (false, d) => Ok(d),
        (true, _) => Err(format!("{s:?} must not be negative")),
    }
}

/// Parses a Go duration as `time.ParseDuration` does: an optional sign, then
/// "0" or one or more decimal numbers each with a unit (ns, us, µs, ms, s, m,
/// h). Returns (negative, magnitude).
pub fn parse_go_duration_signed(s: &str) -> Result<(bool, Duration), String> {
    let bad = || format!("{s:?} is not a duration (e.g. 500ms, 30s, 1m30s, 1h0m0s)");
    let (neg, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Ok((neg, Duration::ZERO));
    }
    if rest.is_empty() {
        return Err(bad());
    }
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let (int, after) = rest.split_at(int_end);
        let (frac, after) = match after.strip_prefix('.') {
            Some(a) => {
                let end = a.find(|c: char| !c.is_ascii_digit()).unwrap_or(a.len());
                a.split_at(end)
            }
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(bad());
        }
        let unit_end = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_end);
        let scale: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "" => return Err(format!("{s:?} lacks a unit (ns, us, ms, s, m, h)")),
            _ => {
                return Err(format!(
                    "{s:?}: unknown unit {unit:?} (ns, us, ms, s, m, h)"
                ));
            }
        };
        let int: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| bad())?
        };
        let mut part = int.checked_mul(scale).ok_or_else(bad)?;
        let mut div = scale;
        for d in frac.bytes().take(20) {
            div /= 10;
            if div == 0 {
                break;
            }
            part += u128::from(d - b'0') * div;
        }
        total = total.checked_add(part).ok_or_else(bad)?;
        rest = after;
    }
    // Go's limit: about 290 years.
    if total > i64::MAX as u128 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok((
        neg,
        Duration::new(
            (total / 1_000_000_000) as u64,
            (total % 1_000_000_000) as u32,
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../examples/config/proxy-agent.yaml");
    const HEAD: &str =
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";

    fn errors(body: &str) -> Vec<String> {
        match parse(&format!("{HEAD}{body}")) {
            Err(ParseError::Invalid(e)) => e,
            other => panic!("expected validation errors for {body:?}, got {other:?}"),
        }
    }

    fn one_error(body: &str) -> String {
        let e = errors(body);
        assert_eq!(e.len(), 1, "{e:?}");
        e.into_iter().next().unwrap()
    }

    #[test]
    fn full_example_parses() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.mode, Some(Mode::Ebpf));
        assert_eq!(
            c.cluster_cidrs,
            Some(vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:10:244::/56".parse().unwrap()
            ])
        );
        assert_eq!(c.sync_period, Some(Duration::from_secs(30)));
        assert_eq!(c.min_sync_period, Some(Duration::ZERO));
        assert_eq!(
            c.metrics_bind_address,
            Some(BindAddress {
                ip: Some("127.0.0.1".parse().unwrap()),
                port: 10249
            })
        );
        assert_eq!(c.client_connection.kubeconfig, None);
        let ct = c.conntrack.as_ref().unwrap();
        assert_eq!(ct.max_per_core, Some(32768));
        assert_eq!(ct.tcp_established_timeout, Some(Duration::from_secs(86400)));
        assert_eq!(c.ipvs.as_ref().unwrap().scheduler.as_deref(), Some("rr"));
        assert_eq!(c.iptables.as_ref().unwrap().masquerade_bit, Some(14));
        assert_eq!(c.logging.format, Some(LogFormat::Text));
        assert_eq!(c.logging.verbosity, Some(2));
        assert_eq!(
            c.proxy_agent.bpf_root.as_deref(),
            Some(Path::new("/sys/fs/bpf/proxy-agent"))
        );
        assert_eq!(
            c.proxy_agent.exclude_interfaces,
            Some(vec!["docker0".into()])
        );
        assert!(c.not_yet_used().contains(&"conntrack"));
        assert!(!c.not_yet_used().contains(&"syncPeriod"));
        assert!(!c.not_yet_used().contains(&"minSyncPeriod"));
    }

    #[test]
    fn minimal_file_sets_nothing() {
        let c = parse(HEAD).unwrap();
        assert_eq!(c, FileConfig::default());
        assert!(c.not_yet_used().is_empty());
        // kube-proxy's "" means default.
        let c = parse(&format!("{HEAD}mode: \"\"\nclusterCIDR: \"\"\n")).unwrap();
        assert_eq!(c, FileConfig::default());
    }

    #[test]
    fn json_accepted() {
        let c = parse(
            r#"{"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
                "mode": "nftables", "syncPeriod": "1m30s",
                "proxyAgent": {"interfaces": ["eth0", "eth1"]}}"#,
        )
        .unwrap();
        assert_eq!(c.mode, Some(Mode::Nftables));
        assert_eq!(c.sync_period, Some(Duration::from_secs(90)));
        assert_eq!(
            c.proxy_agent.interfaces,
            Some(vec!["eth0".to_string(), "eth1".to_string()])
        );
    }

    #[test]
    fn unknown_fields_rejected_by_name() {
        for (body, name) in [
            ("bogus: 1\n", "bogus"),
            ("conntrack:\n  maxPerCPU: 1\n", "maxPerCPU"),
            ("proxyAgent:\n  manifest: /x\n", "manifest"),
            ("clusterCidr: 10.0.0.0/8\n", "clusterCidr"),
        ] {
            match parse(&format!("{HEAD}{body}")) {
                Err(ParseError::Syntax(m)) => {
                    assert!(m.contains(&format!("unknown field `{name}`")), "{m}")
                }
                other => panic!("{body:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn wrong_api_version_or_kind() {
        let e = parse("apiVersion: v1\nkind: KubeProxyConfiguration\n").unwrap_err();
        assert!(e.to_string().starts_with("apiVersion: "), "{e}");
        let e = parse("apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: Pod\n").unwrap_err();
        assert!(e.to_string().starts_with("kind: "), "{e}");
        let e = parse("mode: ebpf\n").unwrap_err().to_string();
        assert!(
            e.contains("apiVersion: missing") && e.contains("kind: missing"),
            "{e}"
        );
    }

    #[test]
    fn each_validation_error_names_its_field() {
        for (body, want) in [
            ("mode: foo\n", "mode: unknown mode \"foo\""),
            (
                "clusterCIDR: 10.0.0.0/33\n",
                "clusterCIDR: \"10.0.0.0/33\" is not a CIDR",
            ),
            (
                "clusterCIDR: 10.0.0.0/8,10.1.0.0/16\n",
                "clusterCIDR: at most one CIDR per IP family",
            ),
            (
                "nodePortAddresses: [primary, 10.0.0.0/8]\n",
                "nodePortAddresses: ",
            ),
            (
                "nodePortAddresses: [10.0.0.0/8, nope]\n",
                "nodePortAddresses[1]: \"nope\"",
            ),
            ("syncPeriod: 0s\n", "syncPeriod: must be > 0"),
            ("syncPeriod: -5s\n", "syncPeriod: must be > 0"),
            ("syncPeriod: 30\n", "syncPeriod: \"30\" lacks a unit"),
            ("minSyncPeriod: -1s\n", "minSyncPeriod: must be >= 0"),
            ("bindAddress: nope\n", "bindAddress: "),
            ("metricsBindAddress: 0.0.0.0\n", "metricsBindAddress: "),
            (
                "healthzBindAddress: 0.0.0.0:99999\n",
                "healthzBindAddress: ",
            ),
            ("healthzBindAddress: host:10256\n", "healthzBindAddress: "),
            (
                "conntrack:\n  maxPerCore: -1\n",
                "conntrack.maxPerCore: must be >= 0",
            ),
            ("conntrack:\n  min: -1\n", "conntrack.min: must be >= 0"),
            ("conntrack:\n  udpTimeout: 5x\n", "conntrack.udpTimeout: "),
            (
                "conntrack:\n  tcpCloseWaitTimeout: -1h\n",
                "conntrack.tcpCloseWaitTimeout: must be >= 0",
            ),
            (
                "ipvs:\n  scheduler: best\n",
                "ipvs.scheduler: unknown scheduler",
            ),
            (
                "ipvs:\n  syncPeriod: -1s\n",
                "ipvs.syncPeriod: must be >= 0",
            ),
            (
                "ipvs:\n  excludeCIDRs: [1.2.3.4/40]\n",
                "ipvs.excludeCIDRs[0]: ",
            ),
            (
                "iptables:\n  masqueradeBit: 32\n",
                "iptables.masqueradeBit: ",
            ),
            (
                "nftables:\n  minSyncPeriod: -1s\n",
                "nftables.minSyncPeriod: must be >= 0",
            ),
            (
                "logging:\n  format: xml\n",
                "logging.format: unknown format",
            ),
            ("logging:\n  verbosity: -1\n", "logging.verbosity: "),
            ("clientConnection:\n  qps: -1\n", "clientConnection.qps: "),
            (
                "clientConnection:\n  burst: -1\n",
                "clientConnection.burst: ",
            ),
            (
                "proxyAgent:\n  bpfRoot: \"\"\n",
                "proxyAgent.bpfRoot: must not be empty",
            ),
            (
                "proxyAgent:\n  cgroupRoot: \"\"\n",
                "proxyAgent.cgroupRoot: must not be empty",
            ),
            (
                "proxyAgent:\n  interfaces: [eth0, \"a/b\"]\n",
                "proxyAgent.interfaces[1]: ",
            ),
        ] {
            let e = one_error(body);
            assert!(e.starts_with(want), "{body:?}: got {e:?}, want {want:?}");
        }
    }

    #[test]
    fn client_connection_kubeconfig() {
        let c = parse(&format!(
            "{HEAD}clientConnection:\n  kubeconfig: /var/lib/proxy-agent/kubeconfig\n"
        ))
        .unwrap();
        assert_eq!(
            c.client_connection.kubeconfig,
            Some(PathBuf::from("/var/lib/proxy-agent/kubeconfig"))
        );
        assert!(c.not_yet_used().is_empty());
        let c = parse(&format!("{HEAD}clientConnection:\n  qps: 5\n  burst: 10\n")).unwrap();
        assert_eq!(c.client_connection.kubeconfig, None);
        assert_eq!(
            c.not_yet_used(),
            vec!["clientConnection (except kubeconfig)"]
        );
        let unknown = parse(&format!("{HEAD}clientConnection:\n  token: x\n"));
        assert!(
            matches!(&unknown, Err(ParseError::Syntax(m)) if m.contains("token")),
            "{unknown:?}"
        );
    }

    #[test]
    fn bind_address_flags_parse_like_the_file() {
        assert_eq!(
            parse_bind_address("127.0.0.1:10249"),
            Ok(BindAddress {
                ip: Some(IpAddr::from([127, 0, 0, 1])),
                port: 10249
            })
        );
        let any = parse_bind_address(":10256").unwrap();
        assert_eq!(any.to_string(), ":10256");
        assert_eq!(any.socket_addr().to_string(), "0.0.0.0:10256");
        assert_eq!(
            parse_bind_address("[::1]:1").unwrap().to_string(),
            "[::1]:1"
        );
        assert!(parse_bind_address("10249").is_err());
        assert!(parse_bind_address("host:1").is_err());
    }

    #[test]
    fn nodeport_addresses_flag_parses_like_the_file() {
        let cidrs = |list: &[&str]| {
            Ok(NodePortAddresses::Cidrs(
                list.iter().map(|c| c.parse().unwrap()).collect(),
            ))
        };
        for (flag, want) in [
            ("primary", Ok(NodePortAddresses::Primary)),
            ("10.0.0.0/8", cidrs(&["10.0.0.0/8"])),
            (
                "10.0.0.0/8, fd00::/64,127.0.0.1/32",
                cidrs(&["10.0.0.0/8", "fd00::/64", "127.0.0.1/32"]),
            ),
            ("", cidrs(&[])),
        ] {
            assert_eq!(parse_node_port_addresses(flag), want, "{flag:?}");
        }
        for (flag, want) in [
            ("10.0.0.0/33", "\"10.0.0.0/33\" is not a CIDR"),
            ("10.0.0.0/8,nope", "\"nope\" is not a CIDR"),
            ("10.0.0.1", "\"10.0.0.1\" is not a CIDR"),
            ("10.0.0.0/8,,fd00::/64", "\"\" is not a CIDR"),
            ("primary,10.0.0.0/8", "\"primary\" cannot be combined"),
        ] {
            let e = parse_node_port_addresses(flag).unwrap_err();
            assert!(e.contains(want), "{flag:?}: {e}");
        }
        // The file takes the same entries.
        let c = parse(&format!(
            "{HEAD}nodePortAddresses: [\"10.0.0.0/8\", \"::1/128\"]\n"
        ))
        .unwrap();
        assert_eq!(
            c.node_port_addresses,
            cidrs(&["10.0.0.0/8", "::1/128"]).ok()
        );
    }

    #[test]
    fn masquerade_all_comes_from_the_section_of_the_mode() {
        let file = |iptables: Option<bool>, nftables: Option<bool>| FileConfig {
            iptables: Some(Rules {
                masquerade_all: iptables,
                ..Rules::default()
            }),
            nftables: Some(Rules {
                masquerade_all: nftables,
                ..Rules::default()
            }),
            ..FileConfig::default()
        };
        use Mode::*;
        for (ipt, nft, mode, want) in [
            (None, None, Ebpf, None),
            (Some(false), None, Ebpf, Some(false)),
            (Some(true), Some(false), Ebpf, Some(true)),
            (Some(false), Some(true), Ebpf, Some(true)),
            (Some(true), Some(false), Iptables, Some(true)),
            (Some(true), Some(false), Ipvs, Some(true)),
            (Some(true), Some(false), Nftables, Some(false)),
            (None, Some(true), Iptables, Some(true)),
            (Some(true), None, Nftables, Some(true)),
        ] {
            assert_eq!(
                file(ipt, nft).masquerade_all(mode),
                want,
                "iptables {ipt:?} nftables {nft:?} mode {mode:?}"
            );
        }
        assert_eq!(FileConfig::default().masquerade_all(Ebpf), None);
    }

    #[test]
    fn node_network_fields_are_used_now() {
        let c = parse(&format!(
            "{HEAD}clusterCIDR: 10.244.0.0/16\nnodePortAddresses: [primary]\n\
             iptables:\n  masqueradeAll: true\nnftables:\n  masqueradeAll: true\n  masqueradeBit: 3\n"
        ))
        .unwrap();
        assert_eq!(c.not_yet_used(), vec!["nftables.masqueradeBit"]);
    }

    #[test]
    fn all_errors_reported() {
        let e = errors("mode: foo\nsyncPeriod: 0s\n");
        assert_eq!(e.len(), 2, "{e:?}");
    }

    #[test]
    fn bind_addresses() {
        let c = parse(&format!(
            "{HEAD}metricsBindAddress: \":10249\"\nhealthzBindAddress: \"[::]:10256\"\nbindAddress: \"::\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.metrics_bind_address,
            Some(BindAddress {
                ip: None,
                port: 10249
            })
        );
        assert_eq!(
            c.healthz_bind_address,
            Some(BindAddress {
                ip: Some("::".parse().unwrap()),
                port: 10256
            })
        );
        // The unspecified address overrides nothing (kubeadm writes 0.0.0.0).
        assert_eq!(c.bind_address, None);
    }

    #[test]
    fn go_durations() {
        let ok = |s: &str, d: Duration| assert_eq!(parse_go_duration(s), Ok(d), "{s}");
        ok("30s", Duration::from_secs(30));
        ok("1m0s", Duration::from_secs(60));
        ok("1m30s", Duration::from_secs(90));
        ok("1h0m0s", Duration::from_secs(3600));
        ok("1h30m", Duration::from_secs(5400));
        ok("500ms", Duration::from_millis(500));
        ok("1.5s", Duration::from_millis(1500));
        ok(".5s", Duration::from_millis(500));
        ok("2us", Duration::from_micros(2));
        ok("2µs", Duration::from_micros(2));
        ok("3ns", Duration::from_nanos(3));
        ok("1s500ms", Duration::from_millis(1500));
        assert_eq!(parse_go_duration_signed("0"), Ok((false, Duration::ZERO)));
        assert_eq!(
            parse_go_duration_signed("-1m"),
            Ok((true, Duration::from_secs(60)))
        );
        for bad in [
            "",
            "s",
            "30",
            "1x",
            "1.s.",
            "--1s",
            "1m 30s",
            "0s",
            "-1s",
            "99999999h",
        ] {
            assert!(parse_go_duration(bad).is_err(), "{bad:?}");
        }
    }

    /// kube-proxy's config.conf as kubeadm writes it (every v1alpha1 field,
    /// most zero or null), for several Kubernetes versions.
    const KUBEADM: [(&str, &str); 3] = [
        ("v1.28", include_str!("../tests/kubeadm/v1.28-config.conf")),
        ("v1.31", include_str!("../tests/kubeadm/v1.31-config.conf")),
        ("v1.34", include_str!("../tests/kubeadm/v1.34-config.conf")),
    ];

    #[test]
    fn kubeadm_configs_load_as_written_and_their_zeros_mean_unset() {
        for (version, text) in KUBEADM {
            let c = parse(text).unwrap_or_else(|e| panic!("{version}: {e}"));
            assert_eq!(c.mode, None, "{version}: mode \"\" is unset");
            assert_eq!(c.bind_address, None, "{version}: 0.0.0.0 overrides nothing");
            assert_eq!(
                c.client_connection.kubeconfig.as_deref(),
                Some(Path::new("/var/lib/kube-proxy/kubeconfig.conf")),
                "{version}"
            );
            assert!(!c.client_connection.has_unused, "{version}");
            for mode in Mode::ALL {
                assert_eq!(c.sync_period_for(mode), None, "{version} {mode}");
                assert_eq!(c.min_sync_period_for(mode), None, "{version} {mode}");
            }
            assert_eq!(c.conntrack.as_ref().map(Conntrack::is_set), Some(false));
            assert_eq!(c.detect_local, None, "{version}");
            assert_eq!(c.bind_address_hard_fail, Some(false), "{version}");
            assert_eq!(c.masquerade_all(Mode::Iptables), Some(false), "{version}");
            assert!(
                c.not_yet_used().is_empty(),
                "{version}: nothing but zeros, nothing to report: {:?}",
                c.not_yet_used()
            );
        }
        let dual = parse(KUBEADM[1].1).unwrap();
        assert_eq!(
            dual.cluster_cidrs,
            Some(vec![
                "10.244.0.0/16".parse().unwrap(),
                "fd00:10:244::/56".parse().unwrap()
            ])
        );
    }

    /// A kubeadm config an operator tuned: the mode's section gives the sync
    /// periods, detectLocalMode NodeCIDR is taken, and the fields with no
    /// counterpart here are reported.
    #[test]
    fn a_tuned_kubeadm_config_is_acted_on_and_its_unused_fields_reported() {
        let c = parse(include_str!(
            "../tests/kubeadm/v1.31-ipvs-tuned-config.conf"
        ))
        .unwrap();
        assert_eq!(c.mode, Some(Mode::Ipvs));
        assert_eq!(c.sync_period_for(Mode::Ipvs), Some(Duration::from_secs(45)));
        assert_eq!(
            c.min_sync_period_for(Mode::Ipvs),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            c.sync_period_for(Mode::Iptables),
            Some(Duration::from_secs(30))
        );
        assert_eq!(c.sync_period_for(Mode::Nftables), None);
        assert_eq!(c.detect_local, Some(DetectLocal::NodeCidr));
        let ipvs = c.ipvs.clone().unwrap();
        assert_eq!(
            (ipvs.scheduler.as_deref(), ipvs.strict_arp),
            (Some("rr"), Some(true))
        );
        let mut unused = c.not_yet_used();
        unused.sort_unstable();
        assert_eq!(
            unused,
            [
                "configSyncPeriod",
                "conntrack",
                "featureGates",
                "iptables.masqueradeBit",
                "logging.flushFrequency",
                "oomScoreAdj",
            ]
        );
        // Our top-level fields win over the sections.
        let top = parse(&format!(
            "{HEAD}syncPeriod: 10s\nipvs:\n  syncPeriod: 45s\n"
        ))
        .unwrap();
        assert_eq!(
            top.sync_period_for(Mode::Ipvs),
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn detect_local_modes_and_v1alpha1_values_are_checked() {
        let with = |body: &str| parse(&format!("{HEAD}{body}"));
        assert_eq!(
            with("detectLocalMode: ClusterCIDR\n").unwrap().detect_local,
            Some(DetectLocal::ClusterCidr)
        );
        assert_eq!(with("detectLocalMode: \"\"\n").unwrap().detect_local, None);
        for (body, field) in [
            ("detectLocalMode: BridgeInterface\n", "detectLocalMode"),
            ("detectLocalMode: Elsewhere\n", "detectLocalMode"),
            ("oomScoreAdj: -1001\n", "oomScoreAdj"),
            ("iptables:\n  syncPeriod: -1s\n", "iptables.syncPeriod"),
            ("configSyncPeriod: soon\n", "configSyncPeriod"),
            ("nftables:\n  localhostNodePorts: true\n", "nftables"),
            (
                "logging:\n  flushFrequency: often\n",
                "logging.flushFrequency",
            ),
        ] {
            let e = with(body).unwrap_err().to_string();
            assert!(e.contains(field), "{body:?}: {e}");
        }
        // Not v1alpha1: still an error naming the field, at any depth.
        for (body, field) in [
            ("linux:\n  masqueradeAll: true\n", "linux"),
            ("iptables:\n  nope: 1\n", "nope"),
            ("winkernel:\n  nope: 1\n", "nope"),
        ] {
            let e = with(body).unwrap_err().to_string();
            assert!(e.contains(field), "{body:?}: {e}");
        }
        let c = with("winkernel:\n  enableDSR: true\nenableProfiling: true\nfeatureGates: {}\n")
            .unwrap();
        assert_eq!(c.not_yet_used(), ["enableProfiling", "winkernel"]);
    }

    #[test]
    fn translated_mark_bit_is_a_bit_or_none_on_the_flag_and_in_the_file() {
        assert_eq!(parse_mark_bit("12"), Ok(MarkBit(Some(12))));
        assert_eq!(parse_mark_bit("31"), Ok(MarkBit(Some(31))));
        assert_eq!(parse_mark_bit("none"), Ok(MarkBit(None)));
        for bad in ["32", "-1", "0x1000", "", "twelve"] {
            assert!(parse_mark_bit(bad).is_err(), "{bad:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        for (value, expected) in [("20", MarkBit(Some(20))), ("none", MarkBit(None))] {
            std::fs::write(
                &path,
                format!("{HEAD}proxyAgent:\n  translatedMarkBit: {value}\n"),
            )
            .unwrap();
            let loaded = load(&path).unwrap().proxy_agent.translated_mark_bit;
            assert_eq!(loaded, Some(expected), "{value}");
        }
        std::fs::write(
            &path,
            format!("{HEAD}proxyAgent:\n  translatedMarkBit: 40\n"),
        )
        .unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("proxyAgent.translatedMarkBit"), "{e}");
    }

    #[test]
    fn load_prefixes_path_and_resolves_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, format!("{HEAD}proxyAgent:\n  manifests: m\n")).unwrap();
        let c = load(&path).unwrap();
        assert_eq!(c.proxy_agent.manifests, Some(dir.path().join("m")));
        assert_eq!(c.proxy_agent.socket_lb, None);
        std::fs::write(&path, format!("{HEAD}proxyAgent:\n  socketLb: false\n")).unwrap();
        assert_eq!(load(&path).unwrap().proxy_agent.socket_lb, Some(false));
        std::fs::write(&path, format!("{HEAD}nope: 1\n")).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(
            e.starts_with(&path.display().to_string()) && e.contains("unknown field `nope`"),
            "{e}"
        );
        let e = load(&dir.path().join("missing.yaml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.yaml"), "{e}");
    }

    proptest::proptest! {
        #![proptest_config(crate::fuzz_config(256))]

        /// A broken config file is an error, never a panic.
        #[test]
        fn never_panics_on_arbitrary_config(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..400)) {
            let _ = parse(&String::from_utf8_lossy(&bytes));
        }

        /// The example with one byte changed.
        #[test]
        fn never_panics_on_mutated_config(pos in 0usize..4000, byte in proptest::num::u8::ANY) {
            let mut text = EXAMPLE.as_bytes().to_vec();
            let pos = pos % text.len();
            text[pos] = byte;
            let _ = parse(&String::from_utf8_lossy(&text));
        }

        #[test]
        fn go_duration_round_trips_h_m_s(h in 0u64..1000, m in 0u64..60, s in 0u64..60, ms in 0u64..1000) {
            let text = format!("{h}h{m}m{s}s{ms}ms");
            let want = Duration::from_millis(((h * 60 + m) * 60 + s) * 1000 + ms);
            proptest::prop_assert_eq!(parse_go_duration_signed(&text), Ok((false, want)));
        }
    }
}
