//! The proxy-agent binary: command line, logging, and wiring of source,
//! model and dataplane.
use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use proxy_agent::{
    dataplane::ebpf::{self, EbpfOptions, InterfaceFilter},
    model::ModelConfig,
    source::{Source, manifests::ManifestSource},
    sync::{self, SyncOptions},
};
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(
    name = "proxy-agent",
    version,
    about = "Kubernetes service proxy (kube-proxy replacement) with an eBPF dataplane",
    long_about = "Watches Services, EndpointSlices and the local Node, computes the service table, \
and programs it into the kernel. Run it once per node."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,

    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,

    /// Log verbosity as kube-proxy spells it (0-2 info, 3-4 debug, 5+ trace);
    /// `-v` alone means 4. RUST_LOG, when set, takes precedence.
    #[arg(
        short = 'v',
        long = "v",
        value_name = "LEVEL",
        num_args = 0..=1,
        default_missing_value = "4",
        default_value_t = 0,
        global = true
    )]
    verbosity: u8,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the agent in the foreground.
    Run(RunArgs),
    /// Remove every program, link and pinned map the agent created. Safe to run twice.
    Cleanup(CleanupArgs),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// TC programs (tcx) with maps pinned under --bpf-root.
    Ebpf,
    /// nftables rules (not in this build yet).
    Nftables,
    /// iptables rules (not in this build yet).
    Iptables,
    /// IPVS virtual servers (not in this build yet).
    Ipvs,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Which dataplane programs the services.
    #[arg(long = "mode", visible_alias = "proxy-mode", value_enum, default_value_t = Mode::Ebpf)]
    mode: Mode,

    /// Read Services, EndpointSlices and Nodes from the YAML/JSON files of this
    /// directory and follow its changes (instead of the Kubernetes API).
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,

    /// The name of this node: its Node object and the endpoints that count as
    /// local. Default: $NODE_NAME, else the host name.
    #[arg(long, value_name = "NAME")]
    hostname_override: Option<String>,

    /// The cluster's pod CIDR(s), at most one per IP family, comma-separated.
    #[arg(long, value_name = "CIDR[,CIDR]", value_delimiter = ',')]
    cluster_cidr: Vec<IpNet>,

    /// Directory (on bpffs; mounted if missing) where maps and links are pinned.
    #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf/proxy-agent")]
    bpf_root: PathBuf,

    /// Attach only to these interfaces (comma-separated). Default: every
    /// non-loopback interface, including ones that appear later.
    #[arg(long, value_name = "IFACE[,IFACE]", value_delimiter = ',')]
    interfaces: Vec<String>,

    /// Never attach to these interfaces (comma-separated).
    #[arg(long, value_name = "IFACE[,IFACE]", value_delimiter = ',')]
    exclude_interfaces: Vec<String>,

    /// Interval of the full reconcile that repairs drift in the kernel (e.g. 30s, 1m).
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    sync_period: Duration,
}

#[derive(Args, Debug)]
struct CleanupArgs {
    /// The --bpf-root the agent ran with.
    #[arg(long, value_name = "PATH", default_value = "/sys/fs/bpf/proxy-agent")]
    bpf_root: PathBuf,
}

/// Parses Go-style durations as kube-proxy takes them: "500ms", "30s", "1m", "1h".
fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| format!("{s:?} lacks a unit (ms, s, m, h)"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m, h)")),
    };
    if !secs.is_finite() || secs <= 0.0 || secs > 86_400.0 * 365.0 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn init_logging(format: LogFormat, verbosity: u8) {
    use tracing_subscriber::EnvFilter;
    let level = match verbosity {
        0..=2 => "info",
        3..=4 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("warn,proxy_agent={level}")));
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
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        bail!(
            "cannot read the host name: {}",
            std::io::Error::last_os_error()
        );
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    Ok(String::from_utf8_lossy(&buf[..end]).trim().to_lowercase())
}

fn validate(args: &RunArgs) -> Result<()> {
    let v4 = args
        .cluster_cidr
        .iter()
        .filter(|c| matches!(c, IpNet::V4(_)))
        .count();
    let v6 = args.cluster_cidr.len() - v4;
    if v4 > 1 || v6 > 1 {
        bail!("--cluster-cidr: at most one CIDR per IP family, got {v4} IPv4 and {v6} IPv6");
    }
    if args.mode != Mode::Ebpf {
        bail!(
            "--mode={}: this build implements only --mode=ebpf so far",
            args.mode
                .to_possible_value()
                .map_or_else(String::new, |v| v.get_name().to_string())
        );
    }
    if args.manifests.is_none() {
        bail!("--manifests DIR is required: the Kubernetes API source is not in this build yet");
    }
    if let Some(dir) = &args.manifests
        && !dir.is_dir()
    {
        bail!("--manifests: {} is not a directory", dir.display());
    }
    Ok(())
}

async fn run(args: RunArgs) -> Result<()> {
    validate(&args)?;
    let node = node_name(args.hostname_override.clone())?;
    tracing::info!(version = env!("CARGO_PKG_VERSION"), node = %node, mode = "ebpf", bpf_root = %args.bpf_root.display(), "starting");

    let opts = EbpfOptions {
        bpf_root: args.bpf_root.clone(),
        interfaces: InterfaceFilter {
            include: args.interfaces.clone(),
            exclude: args.exclude_interfaces.clone(),
        },
    };
    let (mut dataplane, attacher) = ebpf::load(&opts).context("loading the eBPF dataplane")?;
    let attacher = Arc::new(Mutex::new(attacher));
    let links = tokio::spawn(ebpf::follow_links(attacher.clone()));

    let (tx, rx) = watch::channel(None);
    let source: Box<dyn Source> = match &args.manifests {
        Some(dir) => Box::new(ManifestSource::new(dir.clone())),
        None => unreachable!("validated above"),
    };
    let source_task = tokio::spawn(source.run(tx));

    let cfg = ModelConfig { node_name: node };
    let sync_opts = SyncOptions {
        sync_period: args.sync_period,
        ..SyncOptions::default()
    };
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        () = sync::run(rx, &mut dataplane, &cfg, &sync_opts) => {}
        res = source_task => {
            res.context("source task panicked")?.context("service source failed")?;
        }
        res = links => {
            res.context("link watcher panicked")?.context("following interfaces failed")?;
        }
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
        _ = sigterm.recv() => tracing::info!("terminated"),
    }
    tracing::info!(
        "exiting; programs stay attached and keep serving the last table (remove them with `proxy-agent cleanup`)"
    );
    Ok(())
}

fn cleanup(args: CleanupArgs) -> Result<()> {
    let report = ebpf::cleanup(&args.bpf_root)
        .with_context(|| format!("cleaning up {}", args.bpf_root.display()))?;
    tracing::info!(
        links = report.links,
        maps = report.maps,
        unmounted = report.unmounted,
        bpf_root = %args.bpf_root.display(),
        "cleanup done"
    );
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, cli.verbosity);
    let result = match cli.command {
        Command::Run(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the async runtime")
            .and_then(|rt| rt.block_on(run(args))),
        Command::Cleanup(args) => cleanup(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
