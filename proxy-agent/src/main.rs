//! The proxy-agent binary: command line, logging, and wiring of source,
//! model and dataplane.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use proxy_agent::{
    config::{self, FileConfig},
    dataplane::{
        Dataplane, Mode, ModeOptions,
        addresses::{self, NodeNetworkSettings},
        ebpf::{self, EbpfOptions, InterfaceFilter},
        ipvs::{self, IpvsOptions, netlink::Timeouts},
        mode::{IptablesBackendChoice, Opened, remove_kube_proxy_leftovers},
    },
    inspect,
    model::{HealthCheck, ModelConfig, Rejection, ServiceName, TableBuilder},
    serve::{self, Health, Metrics, healthcheck::HealthCheckServers},
    source::{
        Source,
        api::{
            ApiSource,
            events::{EventLimits, EventPublisher, Reporter},
        },
        manifests::ManifestSource,
    },
    sync::{self, ObjectChanges, SyncObserver, SyncOptions, SyncReport},
};
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(
    name = "proxy-agent",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("PROXY_AGENT_GIT_COMMIT"), ")"),
    about = "Kubernetes service proxy (kube-proxy replacement) with an eBPF dataplane",
    long_about = "Watches Services, EndpointSlices and the local Node, computes the service table, \
and programs it into the kernel. Run it once per node."
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    /// Without a command: `run` (kube-proxy's command line, `proxy-agent
    /// --config FILE ...`, starts the agent).
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    run: Box<RunArgs>,

    /// Log format: human-readable text, or one JSON object per line.
    /// Default: `logging.format` of --config, else text.
    #[arg(long, visible_alias = "logging-format", value_enum, global = true)]
    log_format: Option<LogFormat>,

    /// Log verbosity as kube-proxy spells it (0-2 info, 3-4 debug, 5+ trace);
    /// `-v` alone means 4. Default: `logging.verbosity` of --config, else 0.
    /// RUST_LOG, when set, takes precedence.
    #[arg(
        short = 'v',
        long = "v",
        value_name = "LEVEL",
        num_args = 0..=1,
        default_missing_value = "4",
        global = true
    )]
    verbosity: Option<u8>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent in the foreground.
    Run(Box<RunArgs>),
    /// Remove every program, link, pinned map, nftables table and iptables chain the
    /// agent created (and a kube-proxy's KUBE-* chains). Safe to run twice.
    Cleanup(CleanupArgs),
    /// Print the completion script of a shell (e.g. `proxy-agent completions
    /// bash > /etc/bash_completion.d/proxy-agent`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff; `proxy-agent man | man -l -`).
    Man,
    /// Print the services as the kernel holds them now, in whatever mode,
    /// with the running agent's names, endpoint states and drift; with the
    /// agent down, what the kernel alone says.
    List(ListArgs),
    /// Explain what happens to one packet: which frontend matches, which
    /// endpoints are candidates and why, masquerade, drops, and the flow
    /// or affinity entry that pins the client. Asks the running agent;
    /// sends nothing, writes nothing.
    Trace(TraceArgs),
}

#[derive(Args, Debug)]
struct InspectArgs {
    /// The running agent's metrics address (its --metrics-bind-address),
    /// whose /debug endpoints answer.
    #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:10249")]
    agent: std::net::SocketAddr,
    /// text (a table) or json (what /debug/services and /debug/trace give).
    #[arg(long, short = 'o', value_enum, default_value = "text")]
    output: OutputFormat,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
struct ListArgs {
    #[command(flatten)]
    common: InspectArgs,
    /// With the agent down: read this mode's state only (default: every
    /// mode's that holds any).
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// With the agent down: the --bpf-root the ebpf mode pinned its maps under.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_BPF_ROOT)]
    bpf_root: PathBuf,
    /// With the agent down: the iptables interface to read (auto, nft, legacy).
    #[arg(long, value_enum, default_value = "auto")]
    iptables_backend: IptablesBackendChoice,
}

#[derive(Args, Debug)]
struct TraceArgs {
    #[command(flatten)]
    common: InspectArgs,
    /// The packet's source: IP, or IP:PORT to look up its flow.
    #[arg(long, value_name = "IP[:PORT]")]
    from: String,
    /// Its destination: IP:PORT, with /TCP (default), /UDP or /SCTP.
    #[arg(long, value_name = "IP:PORT[/PROTO]")]
    to: String,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
#[command(
    after_help = "Precedence: a flag given here overrides --config FILE, which overrides the \
built-in default."
)]
struct RunArgs {
    /// A KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1) in YAML or
    /// JSON, with our own fields under `proxyAgent:` (see
    /// examples/config/proxy-agent.yaml). Flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Which dataplane programs the services. Default: ebpf.
    #[arg(long = "mode", visible_alias = "proxy-mode", value_enum)]
    mode: Option<Mode>,

    /// At start, also remove what a kube-proxy left on this node: its
    /// nftables tables (`ip`/`ip6 kube-proxy`) and its KUBE-* iptables
    /// chains (which the ebpf and nftables modes remove anyway, as they are
    /// also the iptables mode's).
    #[arg(long)]
    cleanup_kube_proxy: bool,

    /// The iptables interface the iptables mode writes through: `nft`
    /// (iptables-nft), `legacy` (iptables-legacy), or `auto`, the one the
    /// node already uses (kubelet's marker chains, else the one with more
    /// rules), as Kubernetes' iptables wrapper decides. Default: auto.
    #[arg(long, value_enum, default_value = "auto")]
    iptables_backend: IptablesBackendChoice,

    /// The ipvs mode's scheduler, as kube-proxy's `--ipvs-scheduler`: rr
    /// (the default), wrr, lc, wlc, lblc, lblcr, sh, dh, sed, nq or mh
    /// (what the kernel has modules for).
    #[arg(long, value_name = "NAME", value_parser = ["rr", "wrr", "lc", "wlc", "lblc", "lblcr", "sh", "dh", "sed", "nq", "mh"])]
    ipvs_scheduler: Option<String>,

    /// The ipvs mode: answer ARP only for the addresses of the interface
    /// asked (`arp_ignore=1`, `arp_announce=2`), so the VIPs on
    /// `kube-ipvs0` are not announced, as kube-proxy's `--ipvs-strict-arp`.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    ipvs_strict_arp: Option<bool>,

    /// The ipvs mode: IPVS's timeout of established TCP connections (Go
    /// duration; 0 leaves the kernel's, 15m).
    #[arg(long, value_name = "DURATION", value_parser = config::parse_go_duration_or_zero)]
    ipvs_tcp_timeout: Option<Duration>,

    /// The ipvs mode: IPVS's timeout of TCP connections after a FIN (Go
    /// duration; 0 leaves the kernel's, 2m).
    #[arg(long, value_name = "DURATION", value_parser = config::parse_go_duration_or_zero)]
    ipvs_tcpfin_timeout: Option<Duration>,

    /// The ipvs mode: IPVS's timeout of UDP flows (Go duration; 0 leaves
    /// the kernel's, 5m).
    #[arg(long, value_name = "DURATION", value_parser = config::parse_go_duration_or_zero)]
    ipvs_udp_timeout: Option<Duration>,

    /// The ipvs mode: comma-separated CIDRs whose virtual servers belong to
    /// someone else (never deleted by the agent).
    #[arg(long, value_name = "CIDR[,CIDR]", value_delimiter = ',')]
    ipvs_exclude_cidrs: Option<Vec<IpNet>>,

    /// Read Services, EndpointSlices and Nodes from the YAML/JSON files of this
    /// directory and follow its changes (instead of the Kubernetes API).
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kubeconfig", "master"])]
    manifests: Option<PathBuf>,

    /// Kubeconfig file for the Kubernetes API. Default:
    /// clientConnection.kubeconfig of --config, else the in-cluster
    /// configuration (service account token) of the pod.
    #[arg(long, value_name = "PATH")]
    kubeconfig: Option<PathBuf>,

    /// URL of the Kubernetes API server; overrides the server of the
    /// kubeconfig. Without a kubeconfig the server is reached at this URL
    /// without credentials, as kube-proxy does.
    #[arg(long, value_name = "URL")]
    master: Option<String>,

    /// The name of this node: its Node object and the endpoints that count as
    /// local. Default: $NODE_NAME, else the host name.
    #[arg(long, value_name = "NAME")]
    hostname_override: Option<String>,

    /// The cluster's pod CIDR(s), at most one per IP family, comma-separated.
    /// Default: none.
    #[arg(long, value_name = "CIDR[,CIDR]", value_delimiter = ',')]
    cluster_cidr: Option<Vec<IpNet>>,

    /// The node addresses NodePorts are served on: comma-separated CIDRs
    /// (the local addresses inside them), or `primary` (the node's primary
    /// IP of each family). Loopback and IPv6 link-local addresses only when
    /// a CIDR names them (e.g. 127.0.0.0/8). Default: every local address
    /// except loopback and link-local.
    #[arg(long, value_name = "CIDR[,CIDR]|primary", value_parser = config::parse_node_port_addresses)]
    nodeport_addresses: Option<config::NodePortAddresses>,

    /// Masquerade (SNAT) every connection to a service, not only those that
    /// need it. `--masquerade-all=false` overrides a config file's true.
    /// Default: `masqueradeAll` of the config file's iptables/nftables
    /// section, else false.
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    masquerade_all: Option<bool>,

    /// Directory (on bpffs; mounted if missing) where maps and links are pinned.
    /// Default: /sys/fs/bpf/proxy-agent.
    #[arg(long, value_name = "PATH")]
    bpf_root: Option<PathBuf>,

    /// Directory where the agent keeps what must outlive it: the last good
    /// version of each manifest file, which applies when the file is broken
    /// at the next start. Default: /var/lib/proxy-agent.
    #[arg(long, value_name = "PATH")]
    state_dir: Option<PathBuf>,

    /// Attach only to these interfaces (comma-separated). Default: every
    /// non-loopback interface, including ones that appear later.
    #[arg(long, value_name = "IFACE[,IFACE]", value_delimiter = ',')]
    interfaces: Option<Vec<String>>,

    /// Never attach to these interfaces (comma-separated). Default: none.
    #[arg(long, value_name = "IFACE[,IFACE]", value_delimiter = ',')]
    exclude_interfaces: Option<Vec<String>>,

    /// The cgroup v2 directory whose processes reach services through the
    /// socket hooks: the node's own processes and hostNetwork pods (their
    /// traffic never crosses a pod interface), and localhost NodePorts.
    /// Sockets of the agent's network namespace are translated, and with
    /// `--socket-lb` those of this node's pods below the cgroup.
    /// Default: the first cgroup v2 mount; without one, node processes
    /// cannot reach services (logged at start).
    #[arg(long, value_name = "PATH")]
    cgroup_root: Option<PathBuf>,

    /// Socket-level load balancing for this node's pods (ebpf mode): a
    /// pod's connect() or sendmsg() to a ClusterIP gets a backend's address
    /// at once, so its packets need no translation. Pods are the network
    /// namespaces on the node's veths with an address in --cluster-cidr;
    /// without a cluster CIDR, pods keep the packet path. Default: true.
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    socket_lb: Option<bool>,

    /// How this node's pods' traffic is told from other traffic (for
    /// masquerade and the Local traffic policies): ClusterCIDR (a source in
    /// --cluster-cidr) or NodeCIDR (a source in this Node's
    /// spec.podCIDRs). kube-proxy's flag. Default: ClusterCIDR.
    #[arg(long, value_name = "MODE", value_enum)]
    detect_local_mode: Option<config::DetectLocal>,

    /// Exit when the health or metrics server cannot bind its address;
    /// otherwise the failure is logged and the bind retried every 5 s, as
    /// kube-proxy does. Default: false.
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true"
    )]
    bind_address_hard_fail: Option<bool>,

    /// The packet-mark bit (0-31) the ebpf mode sets on packets it
    /// translated at an ingress hook, so that a later hook on their way
    /// (a bridge's own after its port's) never translates them again; or
    /// `none`. Choose a bit that nothing else on the node uses. Default:
    /// 12 (0x1000).
    #[arg(long, value_name = "BIT|none", value_parser = config::parse_mark_bit)]
    translated_mark_bit: Option<config::MarkBit>,

    /// Interval of the full reconcile that repairs drift in the kernel (Go
    /// duration, e.g. 30s, 1m, 1m30s). Default: 30s.
    #[arg(long, value_name = "DURATION", value_parser = config::parse_go_duration)]
    sync_period: Option<Duration>,

    /// Least time between two applies; changes in between are combined
    /// (Go duration; 0 applies every change at once). Default: 0 for ebpf
    /// (applying is incremental), 1s for nftables, iptables and ipvs.
    #[arg(long, value_name = "DURATION", value_parser = config::parse_go_duration)]
    min_sync_period: Option<Duration>,

    /// Where /healthz and /livez are served (IP:port; "" disables).
    /// Default: 0.0.0.0:10256.
    #[arg(long, value_name = "IP:PORT", value_parser = optional_bind_address)]
    healthz_bind_address: Option<BindFlag>,

    /// Where /metrics is served (IP:port; "" disables). Default: 127.0.0.1:10249.
    #[arg(long, value_name = "IP:PORT", value_parser = optional_bind_address)]
    metrics_bind_address: Option<BindFlag>,

    /// Who may ask /debug/services and /debug/trace on the metrics address
    /// (what `proxy-agent list` and `trace` read): loopback clients only,
    /// any client, or off.
    #[arg(long, value_enum, default_value = "loopback")]
    debug_endpoints: serve::DebugAccess,

    /// kube-proxy's: the sync period of the iptables mode, which here also
    /// gives the ebpf and nftables modes theirs (below --sync-period).
    #[arg(long, value_name = "DURATION", value_parser = config::parse_go_duration)]
    iptables_sync_period: Option<Duration>,

    /// kube-proxy's: as --iptables-sync-period, for --min-sync-period.
    #[arg(long, value_name = "DURATION", value_parser = config::parse_go_duration_or_zero)]
    iptables_min_sync_period: Option<Duration>,

    /// kube-proxy's: the sync period of the ipvs mode (below --sync-period).
    #[arg(long, value_name = "DURATION", value_parser = config::parse_go_duration)]
    ipvs_sync_period: Option<Duration>,

    /// kube-proxy's: as --ipvs-sync-period, for --min-sync-period.
    #[arg(long, value_name = "DURATION", value_parser = config::parse_go_duration_or_zero)]
    ipvs_min_sync_period: Option<Duration>,

    /// kube-proxy's --cleanup: remove what every mode (and kube-proxy) left,
    /// as `proxy-agent cleanup` does, and exit.
    #[arg(long)]
    cleanup: bool,

    /// kube-proxy's: write the configuration in effect (the defaults, the
    /// --config file, the flags) to FILE as a KubeProxyConfiguration that
    /// --config reads back, and exit.
    #[arg(long, value_name = "FILE")]
    write_config_to: Option<PathBuf>,

    /// kube-proxy's flags with no meaning here, accepted (with a warning) so
    /// that a kube-proxy argument list starts.
    #[command(flatten)]
    ignored: IgnoredFlags,
}

/// kube-proxy's flags that have no counterpart here.
#[derive(Args, Debug, Default)]
struct IgnoredFlags {
    /// Ignored (kube-proxy's feature gates; none applies here).
    #[arg(long, value_name = "KEY=BOOL,...")]
    feature_gates: Option<String>,
    /// Ignored (no profiling handlers).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    profiling: Option<bool>,
    /// Ignored (set the process's oom_score_adj in the pod spec).
    #[arg(long, value_name = "N", allow_negative_numbers = true)]
    oom_score_adj: Option<i64>,
    /// Ignored (the API watches are never re-listed on a timer).
    #[arg(long, value_name = "DURATION")]
    config_sync_period: Option<String>,
    /// Ignored (no hidden metrics).
    #[arg(long, value_name = "VERSION")]
    show_hidden_metrics_for_version: Option<String>,
    /// Ignored (logs are written as they come).
    #[arg(long, value_name = "DURATION")]
    log_flush_frequency: Option<String>,
}

impl IgnoredFlags {
    /// The flags given, as kube-proxy spells them.
    fn given(&self) -> Vec<&'static str> {
        [
            (self.feature_gates.is_some(), "--feature-gates"),
            (self.profiling.is_some(), "--profiling"),
            (self.oom_score_adj.is_some(), "--oom-score-adj"),
            (self.config_sync_period.is_some(), "--config-sync-period"),
            (
                self.show_hidden_metrics_for_version.is_some(),
                "--show-hidden-metrics-for-version",
            ),
            (self.log_flush_frequency.is_some(), "--log-flush-frequency"),
        ]
        .into_iter()
        .filter_map(|(given, flag)| given.then_some(flag))
        .collect()
    }
}

/// A bind address flag: "" means disabled.
/// A bind-address flag's value: an address, or "" (serve nothing). A type
/// of its own: clap reads `Option<Option<T>>` as a flag whose value may be
/// left out, not as a value that may be empty.
#[derive(Clone, Debug)]
struct BindFlag(Option<config::BindAddress>);

fn optional_bind_address(s: &str) -> Result<BindFlag, String> {
    if s.trim().is_empty() {
        return Ok(BindFlag(None));
    }
    config::parse_bind_address(s).map(|a| BindFlag(Some(a)))
}

const DEFAULT_BPF_ROOT: &str = "/sys/fs/bpf/proxy-agent";
const DEFAULT_STATE_DIR: &str = "/var/lib/proxy-agent";
const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);
const DEFAULT_HEALTHZ: config::BindAddress = config::BindAddress {
    ip: Some(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)),
    port: 10256,
};
const DEFAULT_METRICS: config::BindAddress = config::BindAddress {
    ip: Some(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
    port: 10249,
};

impl From<config::LogFormat> for LogFormat {
    fn from(f: config::LogFormat) -> Self {
        match f {
            config::LogFormat::Text => LogFormat::Text,
            config::LogFormat::Json => LogFormat::Json,
        }
    }
}

/// The ipvs mode's options: flag, else the file's `ipvs:` section, else
/// kube-proxy's defaults.
fn ipvs_options(args: &RunArgs, file: config::Ipvs) -> IpvsOptions {
    let seconds = |flag: Option<Duration>, field: Option<Duration>| {
        flag.or(field)
            .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX))
    };
    IpvsOptions {
        scheduler: args
            .ipvs_scheduler
            .clone()
            .or(file.scheduler)
            .unwrap_or_else(|| ipvs::DEFAULT_SCHEDULER.to_string()),
        strict_arp: args.ipvs_strict_arp.or(file.strict_arp).unwrap_or(false),
        timeouts: Timeouts {
            tcp: seconds(args.ipvs_tcp_timeout, file.tcp_timeout),
            tcp_fin: seconds(args.ipvs_tcpfin_timeout, file.tcp_fin_timeout),
            udp: seconds(args.ipvs_udp_timeout, file.udp_timeout),
        },
        exclude_cidrs: args
            .ipvs_exclude_cidrs
            .clone()
            .or(file.exclude_cidrs)
            .unwrap_or_default(),
    }
}

/// The settings of `run` after merging: flag, else config file, else default.
#[derive(Debug)]
struct Settings {
    mode: Mode,
    manifests: Option<PathBuf>,
    manifests_from_file: bool,
    kubeconfig: Option<PathBuf>,
    master: Option<String>,
    hostname_override: Option<String>,
    cluster_cidr: Vec<IpNet>,
    nodeport_addresses: Option<config::NodePortAddresses>,
    masquerade_all: bool,
    cleanup_kube_proxy: bool,
    iptables_backend: IptablesBackendChoice,
    ipvs: IpvsOptions,
    bpf_root: PathBuf,
    state_dir: PathBuf,
    interfaces: Vec<String>,
    exclude_interfaces: Vec<String>,
    cgroup_root: Option<PathBuf>,
    socket_lb: bool,
    translated_mark_bit: Option<u8>,
    /// kube-proxy's flags given that have no meaning here.
    ignored_flags: Vec<&'static str>,
    detect_local: config::DetectLocal,
    bind_address_hard_fail: bool,
    sync_period: Duration,
    min_sync_period: Duration,
    healthz_bind_address: Option<config::BindAddress>,
    metrics_bind_address: Option<config::BindAddress>,
    debug_endpoints: serve::DebugAccess,
    config_path: Option<PathBuf>,
    /// The whole validated file, including the fields this build does not use yet.
    file: Option<FileConfig>,
}

impl Settings {
    fn resolve(args: RunArgs, file: Option<FileConfig>) -> Self {
        let f = file.clone().unwrap_or_default();
        let mode = args.mode.or(f.mode).unwrap_or(Mode::Ebpf);
        let ipvs = ipvs_options(&args, f.ipvs.clone().unwrap_or_default());
        let masquerade_all = args
            .masquerade_all
            .or_else(|| f.masquerade_all(mode))
            .unwrap_or(false);
        // kube-proxy's per-mode flags, then the file's (which follows the
        // same rule), then the default.
        let (mode_sync, mode_min_sync) = match mode {
            Mode::Ipvs => (args.ipvs_sync_period, args.ipvs_min_sync_period),
            Mode::Ebpf | Mode::Nftables | Mode::Iptables => {
                (args.iptables_sync_period, args.iptables_min_sync_period)
            }
        };
        let sync_period = args
            .sync_period
            .or(mode_sync)
            .or(f.sync_period_for(mode))
            .unwrap_or(DEFAULT_SYNC_PERIOD);
        let min_sync_period = args
            .min_sync_period
            .or(mode_min_sync)
            .or(f.min_sync_period_for(mode))
            .unwrap_or(mode.default_min_sync_period());
        let pa = f.proxy_agent;
        // A kubeconfig or master given as a flag means "use the API", even
        // when the file names a manifest directory.
        let api_flag = args.kubeconfig.is_some() || args.master.is_some();
        let manifests_flag = args.manifests.is_some();
        let manifests = args.manifests.or(pa.manifests.filter(|_| !api_flag));
        Settings {
            mode,
            manifests_from_file: manifests.is_some() && !manifests_flag,
            manifests,
            kubeconfig: args.kubeconfig.or(f.client_connection.kubeconfig),
            master: args.master,
            hostname_override: args.hostname_override.or(f.hostname_override),
            cluster_cidr: args.cluster_cidr.or(f.cluster_cidrs).unwrap_or_default(),
            nodeport_addresses: args.nodeport_addresses.or(f.node_port_addresses),
            masquerade_all,
            cleanup_kube_proxy: args.cleanup_kube_proxy,
            iptables_backend: args.iptables_backend,
            ipvs,
            bpf_root: args
                .bpf_root
                .or(pa.bpf_root)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_BPF_ROOT)),
            state_dir: args
                .state_dir
                .or(pa.state_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            interfaces: args.interfaces.or(pa.interfaces).unwrap_or_default(),
            exclude_interfaces: args
                .exclude_interfaces
                .or(pa.exclude_interfaces)
                .unwrap_or_default(),
            cgroup_root: args
                .cgroup_root
                .or(pa.cgroup_root)
                .or_else(ebpf::sockets::cgroup2_mount),
            socket_lb: args.socket_lb.or(pa.socket_lb).unwrap_or(true),
            translated_mark_bit: args
                .translated_mark_bit
                .or(pa.translated_mark_bit)
                .map_or(Some(proxy_common::TRANSLATED_MARK_BIT), |bit| bit.0),
            ignored_flags: args.ignored.given(),
            detect_local: args
                .detect_local_mode
                .or(f.detect_local)
                .unwrap_or_default(),
            bind_address_hard_fail: args
                .bind_address_hard_fail
                .or(f.bind_address_hard_fail)
                .unwrap_or(false),
            sync_period,
            min_sync_period,
            healthz_bind_address: args
                .healthz_bind_address
                .map(|flag| flag.0)
                .unwrap_or(Some(f.healthz_bind_address.unwrap_or(DEFAULT_HEALTHZ))),
            metrics_bind_address: args
                .metrics_bind_address
                .map(|flag| flag.0)
                .unwrap_or(Some(f.metrics_bind_address.unwrap_or(DEFAULT_METRICS))),
            debug_endpoints: args.debug_endpoints,
            config_path: args.config,
            file,
        }
    }

    /// How to name a setting in a message: the flag, or the file's field.
    fn origin(&self, from_file: bool, flag: &str, field: &str) -> String {
        match (&self.config_path, from_file) {
            (Some(path), true) => format!("{}: {field}", path.display()),
            _ => flag.to_string(),
        }
    }
}

#[derive(Args, Debug)]
struct CleanupArgs {
    /// The --bpf-root (or proxyAgent.bpfRoot) the agent ran with.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_BPF_ROOT)]
    bpf_root: PathBuf,
}

fn init_logging(format: LogFormat, verbosity: u8) {
    use tracing_subscriber::EnvFilter;
    let level = match verbosity {
        0..=2 => "info",
        3..=4 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // kube's client logs every failed request as an error; the source
        // reports them itself, rate-limited, with what it does about them.
        EnvFilter::new(format!(
            "warn,kube_client::client::builder=off,proxy_agent={level}"
        ))
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

fn node_name(flag: Option<String>) -> Result<String> {
    if let Some(name) = flag.filter(|n| !n.is_empty()) {
        return Ok(name.to_lowercase());
    }
    if let Some(name) = std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()) {
        return Ok(name.to_lowercase());
    }
    let name = hostname::get().map_err(|e| anyhow::anyhow!("cannot read the host name: {e}"))?;
    Ok(name.to_string_lossy().trim().to_lowercase())
}

fn validate(args: &Settings) -> Result<()> {
    let v4 = args
        .cluster_cidr
        .iter()
        .filter(|c| matches!(c, IpNet::V4(_)))
        .count();
    let v6 = args.cluster_cidr.len() - v4;
    if v4 > 1 || v6 > 1 {
        bail!("--cluster-cidr: at most one CIDR per IP family, got {v4} IPv4 and {v6} IPv6");
    }
    // A directory that does not exist yet is waited for (the source says
    // so); one that is something else is a mistake.
    if let Some(dir) = &args.manifests
        && dir.exists()
        && !dir.is_dir()
    {
        bail!(
            "{}: {} is not a directory",
            args.origin(
                args.manifests_from_file,
                "--manifests",
                "proxyAgent.manifests"
            ),
            dir.display()
        );
    }
    Ok(())
}

async fn run(mut args: Settings) -> Result<()> {
    let node = node_name(args.hostname_override.clone())?;
    log_start(&args, &node);
    validate(&args)?;
    if args.mode == Mode::Ebpf && args.cgroup_root.is_none() {
        args.cgroup_root = mount_own_cgroup2();
    }
    warn_if_not_forwarding();
    // The source lists while the dataplane opens (loading and verifying
    // the eBPF programs takes a second or two of CPU): on a large cluster
    // the two together are most of the time to the first sync.
    let (tx, rx) = watch::channel(None);
    // Before the source: the API client counts its requests there.
    let metrics = Arc::new(Metrics::new());
    let (source, events) = source_of(&args, &node, &metrics).await?;
    let source_task = tokio::spawn(source.run(tx));
    let (cfg, network, sync_opts) = sync_settings(&args, node);
    // The table of the first state is built meanwhile too.
    let prebuild = Prebuild::start(rx.clone(), cfg.clone());
    let Running {
        mut dataplane,
        mut links,
        links_attached,
    } = tokio::task::block_in_place(|| open_dataplane(&args))?;
    let builder = prebuild.finish().await;
    let (addresses_tx, mut addresses_rx) = watch::channel(Vec::new());
    let node_addresses = tokio::spawn(addresses::follow_addresses(addresses_tx));

    let health = Arc::new(Health::new(health_timeout(args.sync_period)));
    {
        let health = health.clone();
        metrics.register_collector(move || health.answer_samples());
    }
    let node_network = Arc::new(Mutex::new(None));
    let views: Arc<dyn serve::DebugViews> = Arc::new(inspect::agent::AgentViews {
        mode: args.mode,
        kernel: inspect::kernel::KernelOptions {
            bpf_root: args.bpf_root.clone(),
            iptables_backend: args.iptables_backend,
        },
        cfg: cfg.clone(),
        state: rx.clone(),
        network: node_network.clone(),
    });
    metrics.set_mode(args.mode.name());
    let mut servers = start_servers(&args, &health, &metrics, views).await?;
    match args.mode {
        Mode::Ebpf => {
            register_datapath_counters(&metrics, &args.bpf_root);
            watch_map_occupancy(&metrics, args.bpf_root.clone());
        }
        Mode::Ipvs => register_ipvs_counters(&metrics),
        Mode::Nftables | Mode::Iptables => {}
    }
    let (first_sync_tx, first_sync) = tokio::sync::oneshot::channel();
    let observer = AgentObserver::new(health, metrics, events, first_sync_tx, node_network);
    // Taking over needs where the other modes' state is, nothing else.
    let handover_options = ModeOptions {
        ebpf: EbpfOptions {
            bpf_root: args.bpf_root.clone(),
            ..EbpfOptions::default()
        },
        iptables_backend: args.iptables_backend,
        ipvs: args.ipvs.clone(),
    };
    tokio::spawn(hand_over(
        args.mode,
        handover_options,
        args.cleanup_kube_proxy,
        first_sync,
    ));
    // The follower sends its first list at once (or fails, which the select
    // below reports): wait for it, so the first node network is complete.
    addresses_rx.changed().await.ok();
    // Every current interface has the programs before the maps are
    // programmed (see `follow_links`); a failure to attach is reported by
    // the select below.
    if let Some(attached) = links_attached {
        attached.await.ok();
    }
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        () = sync::run(rx, addresses_rx, dataplane.as_mut(), builder, &cfg, &network, &sync_opts, &observer) => {}
        res = source_task => {
            res.context("source task panicked")?.context("service source failed")?;
        }
        res = async {
            match links.as_mut() {
                Some(links) => links.await,
                None => std::future::pending().await,
            }
        } => {
            res.context("link watcher panicked")?.context("following interfaces failed")?;
        }
        res = node_addresses => {
            res.context("address watcher panicked")?.context("following interface addresses failed")?;
        }
        Some(res) = servers.join_next() => {
            res.context("health or metrics server panicked")?;
            bail!("health or metrics server stopped");
        }
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
        _ = sigterm.recv() => tracing::info!("terminated"),
    }
    tracing::info!(
        mode = args.mode.name(),
        "exiting; the dataplane keeps serving the last table (remove it with `proxy-agent cleanup`)"
    );
    Ok(())
}

/// The table of the source's first state, built while the dataplane opens
/// (the two take about as long at tens of thousands of services).
struct Prebuild {
    task: tokio::task::JoinHandle<TableBuilder>,
    /// Set once the first state came and its build began.
    started: Arc<std::sync::atomic::AtomicBool>,
}

impl Prebuild {
    fn start(mut rx: proxy_agent::source::StateReceiver, cfg: ModelConfig) -> Self {
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = started.clone();
        let task = tokio::spawn(async move {
            let state = loop {
                if rx.changed().await.is_err() {
                    return TableBuilder::default();
                }
                if let Some(state) = rx.borrow().clone() {
                    break state;
                }
            };
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            tokio::task::spawn_blocking(move || {
                let mut builder = TableBuilder::default();
                builder.update(&state, &cfg);
                builder
            })
            .await
            .unwrap_or_default()
        });
        Prebuild { task, started }
    }

    /// The builder, with the first state's table when its build began;
    /// otherwise an empty one (the sync loop waits for the state itself).
    async fn finish(self) -> TableBuilder {
        if !self.started.load(std::sync::atomic::Ordering::SeqCst) {
            self.task.abort();
            return TableBuilder::default();
        }
        self.task.await.unwrap_or_default()
    }
}

/// What the sync loop needs from the settings.
fn sync_settings(args: &Settings, node: String) -> (ModelConfig, NodeNetworkSettings, SyncOptions) {
    let network = NodeNetworkSettings {
        nodeport_addresses: args.nodeport_addresses.clone(),
        cluster_cidrs: args.cluster_cidr.clone(),
        masquerade_all: args.masquerade_all,
        detect_local: args.detect_local,
    };
    let sync_opts = SyncOptions {
        sync_period: args.sync_period,
        min_sync_period: args.min_sync_period,
        ..SyncOptions::default()
    };
    let cfg = ModelConfig {
        node_name: node,
        cluster_cidrs: args.cluster_cidr.clone(),
    };
    (cfg, network, sync_opts)
}

fn log_start(args: &Settings, node: &str) {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), commit = env!("PROXY_AGENT_GIT_COMMIT"), node = %node, mode = args.mode.name(), bpf_root = %args.bpf_root.display(), "starting");
    if !args.ignored_flags.is_empty() {
        tracing::warn!(
            flags = %args.ignored_flags.join(", "),
            "kube-proxy flags given that have no effect here (accepted so that its argument list starts)"
        );
    }
    if let (Some(path), Some(file)) = (&args.config_path, &args.file) {
        let unused = file.not_yet_used();
        if !unused.is_empty() {
            tracing::warn!(
                config = %path.display(),
                fields = %unused.join(", "),
                "config fields set that proxy-agent does not act on (accepted and validated)"
            );
        }
    }
}

/// Every mode sends a pod's packets for a Service back out of the node
/// (to a backend on another interface, or the same one): with forwarding
/// off they are dropped. kubeadm's preflight requires it; a node set up by
/// hand may lack it, and this line is then the only hint.
fn warn_if_not_forwarding() {
    let off = |path: &str| std::fs::read_to_string(path).is_ok_and(|value| value.trim() == "0");
    if off("/proc/sys/net/ipv4/ip_forward") {
        tracing::warn!(
            "net.ipv4.ip_forward is 0: packets from pods and other hosts to Services are not forwarded (the node's own connections work); set it to 1"
        );
    }
}

/// With no cgroup v2 in this mount namespace (as under `ip netns exec`,
/// whose fresh sysfs has none), mounts one for the socket hooks.
fn mount_own_cgroup2() -> Option<PathBuf> {
    let at = PathBuf::from(ebpf::sockets::OWN_CGROUP2_MOUNT);
    match ebpf::sockets::mount_cgroup2(&at) {
        Ok(()) => {
            tracing::info!(path = %at.display(), "no cgroup v2 mounted: mounted one for the socket hooks");
            Some(at)
        }
        Err(e) => {
            tracing::warn!(
                path = %at.display(),
                error = %e,
                "no cgroup v2 mounted and none could be: the node's own processes cannot reach services"
            );
            None
        }
    }
}

/// The ebpf mode's task that attaches its programs to the node's
/// interfaces as they come and go.
type LinksTask = tokio::task::JoinHandle<Result<(), ebpf::EbpfError>>;
/// Fires once the interfaces present at start have the programs.
type LinksAttached = tokio::sync::oneshot::Receiver<()>;

/// An opened dataplane, and what follows the node's interfaces for it.
struct Running {
    dataplane: Box<dyn Dataplane>,
    links: Option<LinksTask>,
    links_attached: Option<LinksAttached>,
}

/// What opening (and handing over from) a mode needs, from the settings.
fn mode_options(args: &Settings) -> ModeOptions {
    ModeOptions {
        ebpf: EbpfOptions {
            bpf_root: args.bpf_root.clone(),
            interfaces: InterfaceFilter {
                include: args.interfaces.clone(),
                exclude: args.exclude_interfaces.clone(),
            },
            cgroup: args.cgroup_root.clone(),
            pod_socket_lb: pod_socket_lb(args),
            translated_mark_bit: args.translated_mark_bit,
        },
        iptables_backend: args.iptables_backend,
        ipvs: args.ipvs.clone(),
    }
}

/// After the first sync (this mode serves): takes the node over from the
/// other modes, keeping their state while it carries established flows
/// ([`Mode::take_over`]), at most [`HANDOVER_LIMIT`].
async fn hand_over(
    mode: Mode,
    options: ModeOptions,
    kube_proxy: bool,
    first_sync: tokio::sync::oneshot::Receiver<()>,
) {
    if first_sync.await.is_err() {
        return;
    }
    let started = std::time::Instant::now();
    let Ok(handover) =
        tokio::task::spawn_blocking(move || mode.take_over(&options, kube_proxy)).await
    else {
        return;
    };
    let handover = Arc::new(handover);
    let mut logged = false;
    loop {
        let counting = handover.clone();
        let left = tokio::task::spawn_blocking(move || counting.flows_left())
            .await
            .unwrap_or(0);
        if left == 0 {
            break;
        }
        if started.elapsed() >= HANDOVER_LIMIT {
            tracing::warn!(
                flows = left,
                limit = ?HANDOVER_LIMIT,
                "removing an earlier mode's state with flows it still carries: they end"
            );
            break;
        }
        if !logged {
            let kept: Vec<&str> = handover.kept().iter().map(|m| m.name()).collect();
            tracing::info!(
                modes = %kept.join(", "),
                flows = left,
                "keeping an earlier mode's state for the established connections it carries"
            );
            logged = true;
        }
        tokio::time::sleep(HANDOVER_POLL).await;
    }
    if let Ok(handover) = Arc::try_unwrap(handover) {
        let _ = tokio::task::spawn_blocking(move || handover.finish()).await;
    }
}

/// How long an earlier mode's state may stay for its established flows.
const HANDOVER_LIMIT: Duration = Duration::from_secs(3600);
/// How often the flows it carries are counted.
const HANDOVER_POLL: Duration = Duration::from_secs(2);

/// Opens this mode's dataplane (the other modes' state goes once it
/// serves: [`hand_over`]), and for the ebpf mode starts following the
/// node's interfaces.
fn open_dataplane(args: &Settings) -> Result<Running> {
    let options = mode_options(args);
    // The other modes' state goes once this mode serves (`hand_over`).
    // kube-proxy's goes first under a netfilter mode, whose own state has
    // some of its names.
    if args.cleanup_kube_proxy && args.mode != Mode::Ebpf {
        remove_kube_proxy_leftovers();
    }
    let Opened {
        dataplane,
        attacher,
    } = args
        .mode
        .open(&options)
        .with_context(|| format!("opening the {} dataplane", args.mode))?;
    let (links, attached) = match attacher {
        Some(attacher) => {
            let attacher = Arc::new(Mutex::new(attacher));
            let (links_attached_tx, attached) = tokio::sync::oneshot::channel();
            let links = tokio::spawn(ebpf::follow_links(attacher, links_attached_tx));
            (Some(links), Some(attached))
        }
        None => (None, None),
    };
    Ok(Running {
        dataplane,
        links,
        links_attached: attached,
    })
}

/// The cluster CIDRs that tell pods for socket-level load balancing, when
/// it is on and can work.
fn pod_socket_lb(args: &Settings) -> Option<Vec<IpNet>> {
    if args.mode != Mode::Ebpf || !args.socket_lb || args.cgroup_root.is_none() {
        return None;
    }
    if args.cluster_cidr.is_empty() {
        tracing::info!(
            "socket-level load balancing for pods needs --cluster-cidr to tell pods; pods keep the packet path"
        );
        return None;
    }
    Some(args.cluster_cidr.clone())
}

/// Binds the health and metrics servers before anything else starts. With
/// `--bind-address-hard-fail` a taken address fails the start; otherwise
/// the failure is logged and the bind retried every 5 s in the background,
/// as kube-proxy does.
async fn start_servers(
    args: &Settings,
    health: &Arc<Health>,
    metrics: &Arc<Metrics>,
    views: Arc<dyn serve::DebugViews>,
) -> Result<tokio::task::JoinSet<()>> {
    let mut servers = tokio::task::JoinSet::new();
    if let Some(addr) = &args.healthz_bind_address {
        let health = health.clone();
        let serve = move |listener| serve::run_health(listener, health.clone());
        start_server(&mut servers, "--healthz-bind-address", addr, args, serve).await?;
    }
    if let Some(addr) = &args.metrics_bind_address {
        let (metrics, mode) = (metrics.clone(), args.mode.name());
        let debug = Some((views, args.debug_endpoints));
        let serve =
            move |listener| serve::run_metrics(listener, metrics.clone(), mode, debug.clone());
        start_server(&mut servers, "--metrics-bind-address", addr, args, serve).await?;
    }
    Ok(servers)
}

/// How often a server whose address could not be bound tries again.
const BIND_RETRY: Duration = Duration::from_secs(5);

/// Binds `addr` and serves it with `serve`; see [`start_servers`].
async fn start_server<F, Fut>(
    servers: &mut tokio::task::JoinSet<()>,
    flag: &'static str,
    addr: &config::BindAddress,
    args: &Settings,
    serve: F,
) -> Result<()>
where
    F: Fn(tokio::net::TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let at = addr.socket_addr();
    match serve::bind(at).await {
        Ok(listener) => {
            servers.spawn(serve(listener));
            Ok(())
        }
        Err(e) if args.bind_address_hard_fail => Err(e).context(flag),
        Err(e) => {
            tracing::error!(
                flag,
                address = %at,
                error = %e,
                "cannot bind; retrying every 5 s (--bind-address-hard-fail makes this fatal)"
            );
            servers.spawn(async move {
                loop {
                    tokio::time::sleep(BIND_RETRY).await;
                    if let Ok(listener) = serve::bind(at).await {
                        tracing::info!(flag, address = %at, "bound");
                        serve(listener).await;
                        return;
                    }
                }
            });
            Ok(())
        }
    }
}

/// Where Services come from: the manifest directory, or the Kubernetes API
/// (with the publisher of Events about the objects it refuses).
async fn source_of(
    args: &Settings,
    node: &str,
    metrics: &Arc<Metrics>,
) -> Result<(Box<dyn Source>, Option<EventPublisher>)> {
    let Some(dir) = &args.manifests else {
        let client =
            kube_client(args.kubeconfig.as_deref(), args.master.as_deref(), metrics).await?;
        let source = ApiSource::new(client.clone(), node.to_string());
        let events = EventPublisher::start(
            client,
            source.stores(),
            Reporter {
                controller: "proxy-agent".to_string(),
                instance: format!("proxy-agent-{node}"),
            },
            EventLimits::default(),
        );
        return Ok((Box::new(source), Some(events)));
    };
    Ok((
        Box::new(ManifestSource::new(dir.clone()).with_state_dir(&args.state_dir)),
        None,
    ))
}

/// Exports the datapath's per-reason counters at every scrape as
/// `proxy_agent_datapath_packets_total{reason}` (kube-proxy has no
/// counterpart: it never sees packets). Failing to open them is logged,
/// not fatal: the dataplane itself works without.
fn register_datapath_counters(metrics: &Metrics, bpf_root: &std::path::Path) {
    let counters = match ebpf::counters::DatapathCounters::open(bpf_root) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "datapath counters unavailable; not exported");
            return;
        }
    };
    metrics.register_collector(move || match counters.read() {
        Ok(list) => list
            .into_iter()
            .map(|(reason, packets)| serve::metrics::Sample {
                name: "proxy_agent_datapath_packets_total".into(),
                help: "Packets the eBPF programs handled, by the reason of their verdict".into(),
                kind: serve::metrics::SampleKind::Counter,
                labels: vec![("reason".into(), reason.into())],
                value: packets as f64,
            })
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "reading datapath counters");
            Vec::new()
        }
    });
}

/// How often the ebpf maps' fill is counted (a batch read of each map:
/// about a tenth of a second for a full flow map).
const OCCUPANCY_PERIOD: Duration = Duration::from_secs(60);
/// A map filled this far gets a warning; below [`MAP_FULL_CLEARS`] again,
/// a line that it is over.
const MAP_NEARLY_FULL: f64 = 0.9;
const MAP_FULL_CLEARS: f64 = 0.8;

/// Counts the ebpf maps' entries every [`OCCUPANCY_PERIOD`] into
/// `proxy_agent_ebpf_map_entries` and `_capacity`, and the masquerade
/// ports of the busiest destination into `proxy_agent_ebpf_snat_ports_in_use`
/// against `proxy_agent_ebpf_snat_ports`, warning when one is nearly full:
/// a full flow map evicts live flows, a full services map refuses
/// frontends, and without a free port a masqueraded flow cannot start.
fn watch_map_occupancy(metrics: &Metrics, bpf_root: PathBuf) {
    let last: Arc<Mutex<ebpf::occupancy::Fill>> = Arc::default();
    let shown = last.clone();
    metrics.register_collector(move || {
        let Ok(fill) = shown.lock() else {
            return Vec::new();
        };
        let sample = |name: &str, help: &str, map: &str, value: usize| serve::metrics::Sample {
            name: name.into(),
            help: help.into(),
            kind: serve::metrics::SampleKind::Gauge,
            labels: if map.is_empty() {
                Vec::new()
            } else {
                vec![("map".into(), map.into())]
            },
            value: value as f64,
        };
        let snat = fill.snat.iter().flat_map(|p| {
            [
                sample(
                    "proxy_agent_ebpf_snat_ports_in_use",
                    "Masquerade ports the busiest destination (backend address, port, protocol) uses",
                    "",
                    p.busiest,
                ),
                sample(
                    "proxy_agent_ebpf_snat_ports",
                    "Masquerade ports per node address and destination",
                    "",
                    p.available,
                ),
            ]
        });
        fill.maps
            .iter()
            .flat_map(|o| {
                [
                    sample(
                        "proxy_agent_ebpf_map_entries",
                        "Entries of an eBPF map, counted every minute",
                        o.map,
                        o.entries,
                    ),
                    sample(
                        "proxy_agent_ebpf_map_capacity",
                        "Entries an eBPF map can hold",
                        o.map,
                        o.capacity,
                    ),
                ]
            })
            .chain(snat)
            .collect()
    });
    tokio::spawn(async move {
        let mut full: BTreeSet<&'static str> = BTreeSet::new();
        loop {
            let root = bpf_root.clone();
            match tokio::task::spawn_blocking(move || ebpf::occupancy::occupancy(&root)).await {
                Ok(Ok(counted)) => {
                    let snat = counted.snat.map(|p| ebpf::occupancy::Occupancy {
                        map: "masquerade ports of the busiest destination",
                        entries: p.busiest,
                        capacity: p.available,
                    });
                    for o in counted.maps.iter().chain(&snat) {
                        let ratio = o.ratio();
                        if ratio >= MAP_NEARLY_FULL && full.insert(o.map) {
                            tracing::warn!(
                                map = o.map,
                                entries = o.entries,
                                capacity = o.capacity,
                                "nearly full: a full flow map evicts live flows, a full services or \
                                 backends map refuses new frontends, and without a free masquerade \
                                 port a masqueraded flow cannot start"
                            );
                        } else if ratio < MAP_FULL_CLEARS && full.remove(o.map) {
                            tracing::info!(
                                map = o.map,
                                entries = o.entries,
                                capacity = o.capacity,
                                "no longer nearly full"
                            );
                        }
                    }
                    if let Ok(mut slot) = last.lock() {
                        *slot = counted;
                    }
                }
                Ok(Err(e)) => tracing::debug!(error = %e, "counting the eBPF maps' entries"),
                Err(e) => tracing::debug!(error = %e, "the map counter panicked"),
            }
            tokio::time::sleep(OCCUPANCY_PERIOD).await;
        }
    });
}

/// IPVS's own statistics (what `ipvsadm -Ln --stats` shows), per virtual
/// server and per real server, read at each scrape over a netlink socket
/// of the collector's own.
fn register_ipvs_counters(metrics: &Metrics) {
    use proxy_agent::dataplane::ipvs::netlink::{IpvsSocket, describe};
    let socket = match IpvsSocket::open() {
        Ok(s) => std::sync::Mutex::new(s),
        Err(e) => {
            tracing::warn!(error = %e, "IPVS statistics unavailable; not exported");
            return;
        }
    };
    metrics.register_collector(move || {
        let Ok(mut socket) = socket.lock() else {
            return Vec::new();
        };
        let services = match socket.services() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "reading IPVS statistics");
                return Vec::new();
            }
        };
        let mut samples = Vec::new();
        let counter = |name: &str, help: &str, labels: &[(String, String)], value: u64| {
            serve::metrics::Sample {
                name: name.into(),
                help: help.into(),
                kind: serve::metrics::SampleKind::Counter,
                labels: labels.to_vec(),
                value: value as f64,
            }
        };
        for vs in services {
            let labels = vec![("virtual_server".to_string(), describe(&vs.id))];
            let s = vs.stats;
            for (name, help, value) in [
                (
                    "proxy_agent_ipvs_connections_total",
                    "Connections IPVS scheduled to a virtual server",
                    s.connections,
                ),
                (
                    "proxy_agent_ipvs_packets_in_total",
                    "Packets IPVS received for a virtual server",
                    s.packets_in,
                ),
                (
                    "proxy_agent_ipvs_packets_out_total",
                    "Packets IPVS sent back for a virtual server",
                    s.packets_out,
                ),
                (
                    "proxy_agent_ipvs_bytes_in_total",
                    "Bytes IPVS received for a virtual server",
                    s.bytes_in,
                ),
                (
                    "proxy_agent_ipvs_bytes_out_total",
                    "Bytes IPVS sent back for a virtual server",
                    s.bytes_out,
                ),
            ] {
                samples.push(counter(name, help, &labels, value));
            }
            let Ok(real) = socket.real_servers(&vs.id) else {
                continue;
            };
            for rs in real {
                let mut labels = labels.clone();
                labels.push((
                    "real_server".into(),
                    std::net::SocketAddr::new(rs.addr, rs.port).to_string(),
                ));
                samples.push(counter(
                    "proxy_agent_ipvs_real_server_connections_total",
                    "Connections IPVS scheduled to a real server",
                    &labels,
                    rs.stats.connections,
                ));
                samples.push(serve::metrics::Sample {
                    name: "proxy_agent_ipvs_real_server_active_connections".into(),
                    help: "Connections of a real server IPVS counts as active".into(),
                    kind: serve::metrics::SampleKind::Gauge,
                    labels,
                    value: f64::from(rs.active_conns),
                });
            }
        }
        samples
    });
}

/// kube-proxy's health timeout: twice the sync period (a change waiting
/// longer than that to be programmed makes /healthz fail).
fn health_timeout(sync_period: Duration) -> Duration {
    sync_period * 2
}

/// A client for the Kubernetes API: the kubeconfig when given, else the
/// in-cluster configuration; `master` overrides the server URL of either.
async fn kube_client(
    kubeconfig: Option<&Path>,
    master: Option<&str>,
    metrics: &Arc<Metrics>,
) -> Result<kube::Client> {
    let master: Option<http::Uri> = master
        .map(|url| {
            url.parse()
                .with_context(|| format!("--master {url:?} is not a URL"))
        })
        .transpose()?;
    let mut config = match (kubeconfig, &master) {
        (Some(path), _) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        (None, Some(url)) => kube::Config::new(url.clone()),
        (None, None) => kube::Config::incluster().context(
            "no in-cluster Kubernetes configuration (not running in a pod?); \
             give --kubeconfig, --master or --manifests",
        )?,
    };
    if let (Some(url), Some(_)) = (master, kubeconfig) {
        config.cluster_url = url;
    }
    tracing::info!(server = %config.cluster_url, "using the Kubernetes API");
    let host = config
        .cluster_url
        .authority()
        .map(ToString::to_string)
        .unwrap_or_default();
    let layer = proxy_agent::serve::api_client::ApiRequestMetricsLayer::new(metrics.clone(), &host);
    Ok(kube::client::ClientBuilder::try_from(config)
        .context("creating the Kubernetes client")?
        .with_layer(&layer)
        .build())
}

/// Feeds what the sync loop does to the health server, the metrics and
/// Kubernetes Events.
struct AgentObserver {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    events: Option<EventPublisher>,
    /// The HTTP servers of `spec.healthCheckNodePort`s.
    health_checks: Mutex<HealthCheckServers>,
    /// Fired at the first sync: this mode serves, the others may go.
    first_sync: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    /// The node network last given to the dataplane, for the debug views.
    node_network: Arc<Mutex<Option<proxy_agent::model::NodeNetwork>>>,
}

impl AgentObserver {
    fn new(
        health: Arc<Health>,
        metrics: Arc<Metrics>,
        events: Option<EventPublisher>,
        first_sync: tokio::sync::oneshot::Sender<()>,
        node_network: Arc<Mutex<Option<proxy_agent::model::NodeNetwork>>>,
    ) -> Self {
        let health_checks = {
            let health = health.clone();
            // On every node address (kube-proxy binds them the same way); the
            // load balancers probe the node's address.
            HealthCheckServers::new(None, Arc::new(move || health.is_healthy()))
        };
        AgentObserver {
            health,
            metrics,
            events,
            health_checks: Mutex::new(health_checks),
            first_sync: Mutex::new(Some(first_sync)),
            node_network,
        }
    }
}

impl SyncObserver for AgentObserver {
    fn node_network(&self, network: &proxy_agent::model::NodeNetwork) {
        self.metrics
            .set_ip_families(network.snat_v4.is_some(), network.snat_v6.is_some());
        if let Ok(mut slot) = self.node_network.lock() {
            *slot = Some(network.clone());
        }
    }

    fn queued(&self, changes: ObjectChanges) {
        self.health.queued_update();
        self.metrics.sync_queued();
        self.metrics.add_service_changes(changes.services as u64);
        self.metrics
            .add_endpoint_changes(changes.endpoint_slices as u64);
    }

    fn synced(&self, report: &SyncReport) {
        self.health.updated();
        self.metrics.changes_synced();
        if let Some(first) = self.first_sync.lock().ok().and_then(|mut f| f.take()) {
            let _ = first.send(());
        }
        if report.applied {
            self.metrics.observe_sync(report.full, report.elapsed);
            self.metrics
                .observe_conntrack_cleanup(&report.stats.conntrack);
        }
        self.metrics
            .set_table_size(report.frontends as u64, report.backends as u64);
        if let Some(no_local) = report.no_local_endpoints {
            self.metrics.set_no_local_endpoints(no_local.counts);
        }
        for latency in &report.programming_latencies {
            self.metrics.observe_network_programming(*latency);
        }
    }

    fn failed(&self) {
        self.metrics.inc_sync_errors();
    }

    fn rejected(&self, rejection: &Rejection) {
        if let Some(events) = &self.events
            && !events.report(rejection)
        {
            self.metrics.inc_events_dropped();
        }
    }

    fn rejections(&self, count: usize) {
        self.metrics.set_rejected_objects(count as u64);
    }

    fn node_eligible(&self, eligible: bool) {
        self.health.set_node_eligible(eligible);
    }

    fn health_checks(&self, checks: &BTreeMap<ServiceName, HealthCheck>) {
        if let Ok(mut servers) = self.health_checks.lock() {
            servers.update(checks);
        }
    }
}

/// `proxy-agent cleanup`: every mode's state, whichever mode ran. Each
/// mode is tried even when another fails; the first failure is returned.
fn cleanup(args: CleanupArgs) -> Result<()> {
    let options = ModeOptions {
        ebpf: EbpfOptions {
            bpf_root: args.bpf_root.clone(),
            ..EbpfOptions::default()
        },
        ..ModeOptions::default()
    };
    let mut failed = None;
    for mode in Mode::ALL {
        match mode.remove_leftovers(&options) {
            Ok(objects) => tracing::info!(mode = mode.name(), objects, "cleaned up"),
            Err(e) => {
                tracing::error!(mode = mode.name(), error = %e, "cleaning up");
                failed.get_or_insert(
                    anyhow::Error::new(e).context(format!("cleaning up the {mode} mode")),
                );
            }
        }
    }
    match failed {
        Some(e) => Err(e),
        None => {
            tracing::info!(bpf_root = %args.bpf_root.display(), "cleanup done");
            Ok(())
        }
    }
}

/// The configuration in effect, as a KubeProxyConfiguration that
/// `--config` reads back (kube-proxy's `--write-config-to`): every setting
/// the agent acts on, with its value after the defaults, the file and the
/// flags. A server disabled by an empty flag is written as "", which a
/// file reads as the default address, as kube-proxy's does.
fn effective_config(args: &Settings) -> String {
    use std::fmt::Write as _;
    let quote = |s: &str| format!("{s:?}");
    let list = |items: Vec<String>| {
        if items.is_empty() {
            "[]".to_string()
        } else {
            format!("[{}]", items.join(", "))
        }
    };
    let bind = |b: &Option<config::BindAddress>| {
        quote(&b.as_ref().map(ToString::to_string).unwrap_or_default())
    };
    let mut out = String::new();
    let _ = writeln!(out, "apiVersion: {}", config::API_VERSION);
    let _ = writeln!(out, "kind: {}", config::KIND);
    let _ = writeln!(out, "mode: {}", args.mode.name());
    let cidrs: Vec<String> = args.cluster_cidr.iter().map(ToString::to_string).collect();
    let _ = writeln!(out, "clusterCIDR: {}", quote(&cidrs.join(",")));
    let node_ports = match &args.nodeport_addresses {
        None => "null".to_string(),
        Some(config::NodePortAddresses::Primary) => "[primary]".to_string(),
        Some(config::NodePortAddresses::Cidrs(c)) => {
            list(c.iter().map(|c| quote(&c.to_string())).collect())
        }
    };
    let _ = writeln!(out, "nodePortAddresses: {node_ports}");
    let _ = writeln!(
        out,
        "hostnameOverride: {}",
        quote(args.hostname_override.as_deref().unwrap_or(""))
    );
    let _ = writeln!(
        out,
        "healthzBindAddress: {}",
        bind(&args.healthz_bind_address)
    );
    let _ = writeln!(
        out,
        "metricsBindAddress: {}",
        bind(&args.metrics_bind_address)
    );
    let _ = writeln!(out, "bindAddressHardFail: {}", args.bind_address_hard_fail);
    let detect = match args.detect_local {
        config::DetectLocal::ClusterCidr => "ClusterCIDR",
        config::DetectLocal::NodeCidr => "NodeCIDR",
    };
    let _ = writeln!(out, "detectLocalMode: {detect}");
    let _ = writeln!(out, "syncPeriod: {}", go_duration(args.sync_period));
    let _ = writeln!(out, "minSyncPeriod: {}", go_duration(args.min_sync_period));
    let kubeconfig = args
        .kubeconfig
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "clientConnection:\n  kubeconfig: {}",
        quote(&kubeconfig)
    );
    let _ = writeln!(out, "iptables:\n  masqueradeAll: {}", args.masquerade_all);
    let ipvs = &args.ipvs;
    let _ = writeln!(
        out,
        "ipvs:\n  scheduler: {}\n  strictARP: {}\n  excludeCIDRs: {}",
        quote(&ipvs.scheduler),
        ipvs.strict_arp,
        list(
            ipvs.exclude_cidrs
                .iter()
                .map(|c| quote(&c.to_string()))
                .collect()
        )
    );
    // Unset timeouts leave the kernel's: left out.
    for (name, timeout) in [
        ("tcpTimeout", ipvs.timeouts.tcp),
        ("tcpFinTimeout", ipvs.timeouts.tcp_fin),
        ("udpTimeout", ipvs.timeouts.udp),
    ] {
        if let Some(secs) = timeout {
            let _ = writeln!(
                out,
                "  {name}: {}",
                go_duration(Duration::from_secs(u64::from(secs)))
            );
        }
    }
    let _ = writeln!(out, "proxyAgent:");
    if let Some(dir) = &args.manifests {
        let _ = writeln!(out, "  manifests: {}", quote(&dir.display().to_string()));
    }
    let _ = writeln!(
        out,
        "  stateDir: {}",
        quote(&args.state_dir.display().to_string())
    );
    let _ = writeln!(
        out,
        "  bpfRoot: {}",
        quote(&args.bpf_root.display().to_string())
    );
    if let Some(cgroup) = &args.cgroup_root {
        let _ = writeln!(
            out,
            "  cgroupRoot: {}",
            quote(&cgroup.display().to_string())
        );
    }
    let _ = writeln!(out, "  socketLb: {}", args.socket_lb);
    let mark = args
        .translated_mark_bit
        .map_or_else(|| "none".to_string(), |bit| bit.to_string());
    let _ = writeln!(out, "  translatedMarkBit: {mark}");
    for (name, items) in [
        ("interfaces", &args.interfaces),
        ("excludeInterfaces", &args.exclude_interfaces),
    ] {
        let _ = writeln!(
            out,
            "  {name}: {}",
            list(items.iter().map(|i| quote(i)).collect())
        );
    }
    out
}

/// `d` as Go prints a duration ("30s", "1m30s", "1h0m0s", "500ms", "0s").
fn go_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_string();
    }
    if d.subsec_nanos() != 0 {
        return format!("{}ms", d.as_millis());
    }
    let secs = d.as_secs();
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

/// Sets the allocator up for a long-lived process whose full syncs build
/// and drop tables of tens of MiB, and whose watches parse large lists.
/// - Blocks from 128 KiB up come from their own mappings and go back to the
///   kernel when freed: glibc would otherwise raise that threshold after
///   the first such block is freed, and the next ones would land in the
///   heap, fragment it and keep the agent's RSS high (158 against 170 MiB
///   at 30 000 services).
/// - Two arenas, not eight per core: each thread that parses a list (the
///   watches run on every worker) keeps the kept objects of its pages in
///   its own arena, between the pages' freed scratch, and no arena can
///   use another's free memory. At 30 000 services with the metadata
///   kubectl and the controllers write (managed fields, last-applied
///   copies): 143 against 169 MiB.
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets parameters of glibc's allocator; called
    // first thing in main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// How long `list` and `trace` wait for the agent's answer: it reads the
/// whole kernel state, seconds at tens of thousands of services.
const ASK_TIMEOUT: Duration = Duration::from_secs(120);

/// `proxy-agent list`: the agent's listing, else the kernel's alone.
fn inspect_list(args: &ListArgs) -> std::process::ExitCode {
    use inspect::client::{AskError, ask};
    let output = args.common.output;
    let answer = ask(args.common.agent, "/debug/services", ASK_TIMEOUT);
    let listings: Vec<inspect::Listing> = match answer {
        Ok(body) => match serde_json::from_str::<inspect::Listing>(&body) {
            Ok(listing) if output == OutputFormat::Json => {
                println!("{body}");
                return listing_status(&[listing]);
            }
            Ok(listing) => vec![listing],
            Err(e) => {
                eprintln!("the agent's /debug/services could not be read: {e}");
                return std::process::ExitCode::FAILURE;
            }
        },
        Err(e @ AskError::Unreachable { .. }) => {
            eprintln!("{e}; listing what the kernel holds, without the agent's names and drift");
            let options = inspect::kernel::KernelOptions {
                bpf_root: args.bpf_root.clone(),
                iptables_backend: args.iptables_backend,
            };
            let addresses = inspect::client::local_addresses();
            let read = match args.mode {
                Some(mode) => vec![(mode, inspect::kernel::held(mode, &options, &addresses))],
                None => inspect::kernel::modes_holding_state(&options, &addresses),
            };
            let mut listings = Vec::new();
            for (mode, held) in read {
                match held {
                    Ok(held) => listings.push(inspect::list(&held, None)),
                    Err(e) => eprintln!("reading the {mode} mode's state: {e}"),
                }
            }
            if listings.is_empty() {
                eprintln!("no mode holds any service on this node");
            }
            listings
        }
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match output {
        OutputFormat::Json => match serde_json::to_string_pretty(&listings) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("{e}");
                return std::process::ExitCode::FAILURE;
            }
        },
        OutputFormat::Text => {
            for listing in &listings {
                print!("{}", inspect::render_listing(listing));
            }
        }
    }
    listing_status(&listings)
}

/// 0 when nothing drifted, 3 when some frontend did (for scripts and
/// probes), as `diff` tells "differs" from "failed".
fn listing_status(listings: &[inspect::Listing]) -> std::process::ExitCode {
    if listings.iter().any(|l| l.drifted > 0) {
        std::process::ExitCode::from(3)
    } else {
        std::process::ExitCode::SUCCESS
    }
}

/// `proxy-agent trace`: the agent's answer.
fn inspect_trace(args: &TraceArgs) -> std::process::ExitCode {
    if let Err(e) = inspect::trace::Query::parse(&args.from, &args.to) {
        eprintln!("{e}");
        return std::process::ExitCode::from(2);
    }
    let path = format!(
        "/debug/trace?from={}&to={}",
        serve::debug::percent_encode(&args.from),
        serve::debug::percent_encode(&args.to)
    );
    match inspect::client::ask(args.common.agent, &path, ASK_TIMEOUT) {
        Ok(body) if args.common.output == OutputFormat::Json => {
            println!("{body}");
            std::process::ExitCode::SUCCESS
        }
        Ok(body) => match serde_json::from_str::<inspect::trace::Trace>(&body) {
            Ok(trace) => {
                print!("{}", inspect::trace::render_trace(&trace));
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("the agent's /debug/trace could not be read: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        Err(e) => {
            eprintln!("{e}; trace needs the running agent's model");
            std::process::ExitCode::FAILURE
        }
    }
}

fn main() -> std::process::ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    // The config file is read before logging starts, as it may set the format
    // and verbosity (the flags still win).
    let command = match cli.command {
        Some(command) => command,
        None => Command::Run(cli.run),
    };
    let file = match &command {
        Command::Run(args) => args.config.as_deref().map(config::load),
        Command::Completions { shell } => {
            let mut cli = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cli, "proxy-agent", &mut std::io::stdout());
            return std::process::ExitCode::SUCCESS;
        }
        Command::Man => {
            let page = clap_mangen::Man::new(<Cli as clap::CommandFactory>::command());
            return match page.render(&mut std::io::stdout()) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("writing the man page: {e}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Command::Cleanup(_) => None,
        Command::List(args) => return inspect_list(args),
        Command::Trace(args) => return inspect_trace(args),
    };
    let logging = match &file {
        Some(Ok(f)) => f.logging.clone(),
        _ => config::Logging::default(),
    };
    init_logging(
        cli.log_format
            .or(logging.format.map(LogFormat::from))
            .unwrap_or(LogFormat::Text),
        cli.verbosity.or(logging.verbosity).unwrap_or(0),
    );
    let file = match file.transpose() {
        Ok(file) => file,
        Err(e) => {
            tracing::error!("invalid --config: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match command {
        // kube-proxy's --cleanup: what `proxy-agent cleanup` removes, and
        // kube-proxy's own state.
        Command::Run(args) if args.cleanup => cleanup(CleanupArgs {
            bpf_root: args
                .bpf_root
                .clone()
                .or_else(|| file.as_ref().and_then(|f| f.proxy_agent.bpf_root.clone()))
                .unwrap_or_else(|| PathBuf::from(DEFAULT_BPF_ROOT)),
        })
        .inspect(|()| remove_kube_proxy_leftovers()),
        Command::Run(args) if args.write_config_to.is_some() => {
            let path = args.write_config_to.clone().unwrap_or_default();
            let text = effective_config(&Settings::resolve(*args, file));
            std::fs::write(&path, text)
                .with_context(|| format!("--write-config-to {}", path.display()))
                .inspect(|()| tracing::info!(path = %path.display(), "configuration written"))
        }
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")
            .and_then(|rt| rt.block_on(run(Settings::resolve(*args, file)))),
        Command::Cleanup(args) => cleanup(args),
        Command::Completions { .. } | Command::Man | Command::List(_) | Command::Trace(_) => Ok(()),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes, joined by ": ", each cause printed once: the
/// library errors name their cause in their own message too (so a log line
/// of one of them alone says it), which anyhow's `{:#}` would repeat.
fn error_chain(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("preparing {0}: {1}")]
    struct Preparing(&'static str, #[source] std::io::Error);

    fn run_args(argv: &[&str]) -> RunArgs {
        let cli = Cli::try_parse_from(["proxy-agent", "run"].iter().chain(argv)).unwrap();
        match cli.command {
            Some(Command::Run(args)) => *args,
            _ => unreachable!(),
        }
    }

    /// kube-proxy's command line: no command means `run`; its per-mode
    /// sync flags give the mode's periods under --sync-period; its flags
    /// with no meaning here are accepted and listed.
    #[test]
    fn kube_proxys_command_line_runs_the_agent() {
        let cli = Cli::try_parse_from([
            "proxy-agent",
            "--config=/var/lib/kube-proxy/config.conf",
            "--hostname-override=node-1",
            "--ipvs-sync-period=45s",
            "--iptables-min-sync-period=0s",
            "--feature-gates=TopologyAwareHints=true",
            "--oom-score-adj=-999",
            "--profiling=false",
            "--logging-format=json",
        ])
        .unwrap();
        assert!(cli.command.is_none());
        assert_eq!(
            cli.run.config.as_deref(),
            Some(std::path::Path::new("/var/lib/kube-proxy/config.conf"))
        );
        assert_eq!(cli.log_format, Some(LogFormat::Json));
        assert_eq!(
            cli.run.ignored.given(),
            ["--feature-gates", "--profiling", "--oom-score-adj"]
        );
        let settings = |argv: &[&str]| Settings::resolve(run_args(argv), None);
        let ipvs = settings(&[
            "--mode=ipvs",
            "--ipvs-sync-period=45s",
            "--iptables-sync-period=5s",
        ]);
        assert_eq!(ipvs.sync_period, Duration::from_secs(45));
        let nft = settings(&[
            "--mode=nftables",
            "--ipvs-sync-period=45s",
            "--iptables-sync-period=5s",
        ]);
        assert_eq!(nft.sync_period, Duration::from_secs(5));
        let ours = settings(&["--mode=ipvs", "--ipvs-sync-period=45s", "--sync-period=7s"]);
        assert_eq!(ours.sync_period, Duration::from_secs(7));
        let immediate = settings(&["--mode=iptables", "--iptables-min-sync-period=0s"]);
        assert_eq!(immediate.min_sync_period, Duration::ZERO);
        // A command and run's flags together are an error.
        assert!(Cli::try_parse_from(["proxy-agent", "--config=x", "cleanup"]).is_err());
    }

    /// --write-config-to writes what is in effect, and --config reads it
    /// back to the same settings.
    #[test]
    fn the_written_config_reads_back_to_the_same_settings() {
        let argv = [
            "--mode=ipvs",
            "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56",
            "--nodeport-addresses=primary",
            "--ipvs-scheduler=lc",
            "--ipvs-tcp-timeout=15m",
            "--ipvs-exclude-cidrs=10.0.0.0/8",
            "--sync-period=1m30s",
            "--min-sync-period=500ms",
            "--masquerade-all",
            "--detect-local-mode=NodeCIDR",
            "--translated-mark-bit=none",
            "--metrics-bind-address=0.0.0.0:10249",
            "--interfaces=eth0,eth1",
            "--manifests=/srv/manifests",
        ];
        let first = Settings::resolve(run_args(&argv), None);
        let text = effective_config(&first);
        let file = config::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let again = Settings::resolve(run_args(&[]), Some(file));
        let again = Settings {
            file: first.file.clone(),
            manifests_from_file: first.manifests_from_file,
            ..again
        };
        assert_eq!(format!("{first:?}"), format!("{again:?}"), "{text}");
        assert_eq!(go_duration(Duration::from_secs(3600)), "1h0m0s");
        assert_eq!(go_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(go_duration(Duration::ZERO), "0s");
    }

    /// The completion scripts and the man page come from the same
    /// definition as the parser.
    #[test]
    fn completions_and_man_page_name_the_flags() {
        let mut script = Vec::new();
        let mut cli = <Cli as clap::CommandFactory>::command();
        clap_complete::generate(
            clap_complete::Shell::Bash,
            &mut cli,
            "proxy-agent",
            &mut script,
        );
        let script = String::from_utf8(script).unwrap();
        assert!(script.contains("--translated-mark-bit"), "bash completion");
        let mut page = Vec::new();
        clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
            .render(&mut page)
            .unwrap();
        let page = String::from_utf8(page).unwrap();
        assert!(
            page.contains(".TH proxy-agent"),
            "{}",
            &page[..200.min(page.len())]
        );
        assert!(Cli::try_parse_from(["proxy-agent", "completions", "zsh"]).is_ok());
    }

    #[test]
    fn ipvs_options_take_the_flag_then_the_file_then_kube_proxys_defaults() {
        let file = config::Ipvs {
            scheduler: Some("lc".into()),
            strict_arp: Some(true),
            tcp_timeout: Some(Duration::from_secs(900)),
            udp_timeout: Some(Duration::ZERO),
            exclude_cidrs: Some(vec!["10.0.0.0/8".parse().unwrap()]),
            ..config::Ipvs::default()
        };
        let options = ipvs_options(&run_args(&[]), file.clone());
        assert_eq!(options.scheduler, "lc");
        assert!(options.strict_arp);
        assert_eq!(
            options.timeouts,
            Timeouts {
                tcp: Some(900),
                tcp_fin: None,
                udp: Some(0),
            }
        );
        assert_eq!(options.exclude_cidrs.len(), 1);
        let options = ipvs_options(
            &run_args(&[
                "--ipvs-scheduler=sh",
                "--ipvs-strict-arp=false",
                "--ipvs-tcpfin-timeout=30s",
                "--ipvs-exclude-cidrs=192.0.2.0/24,2001:db8::/64",
            ]),
            file,
        );
        assert_eq!(options.scheduler, "sh");
        assert!(!options.strict_arp);
        assert_eq!(options.timeouts.tcp_fin, Some(30));
        assert_eq!(options.exclude_cidrs.len(), 2);
        let defaults = ipvs_options(&run_args(&[]), config::Ipvs::default());
        assert_eq!(defaults, IpvsOptions::default());
        assert!(Cli::try_parse_from(["proxy-agent", "run", "--ipvs-udp-timeout=-1s"]).is_err());
    }

    #[test]
    fn an_error_chain_names_each_cause_once() {
        let io = std::io::Error::from_raw_os_error(libc::ENOENT);
        let text = io.to_string();
        let e = anyhow::Error::new(Preparing("/sys/fs/bpf/x", io)).context("opening the dataplane");
        assert_eq!(
            error_chain(&e),
            format!("opening the dataplane: preparing /sys/fs/bpf/x: {text}")
        );
        // A cause its parent does not name is printed.
        let plain = anyhow::Error::new(std::io::Error::from_raw_os_error(libc::EACCES))
            .context("reading x");
        assert!(
            error_chain(&plain).starts_with("reading x: "),
            "{}",
            error_chain(&plain)
        );
        assert!(error_chain(&plain).len() > "reading x: ".len());
    }
}
