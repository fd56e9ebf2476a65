//! Traffic benchmark: what a Service costs the traffic through it, in each
//! mode, measured side by side with the same traffic sent straight to the
//! pod (no agent at all) in one run, on one topology.
//!
//! The topology is the scenario suite's: a node namespace, backend pods (on
//! a bridge or on routed veths, `--networks`), one more pod as the client
//! pod, and an external client routed to the node. For each mode and each
//! table size the agent (release build, default flags, manifests) starts
//! fresh with `--services` filler Services of `--endpoints` endpoints each,
//! plus the two Services measured:
//! - `bench/conn`: port 80 to the pods' short-connection server (two
//!   backends), NodePort 30080;
//! - `bench/iperf`: port 5201 TCP and UDP to one pod's iperf3, NodePort
//!   30201.
//!
//! Per route (a ClusterIP from the client pod, a NodePort from the external
//! client; without an agent, the pod's own address from each) it measures
//! new connections per second with `--parallel` clients for `--duration`,
//! connect latency p50/p99/max, connects that waited for a SYN retransmit,
//! the machine's CPU (and softirq) time per connection, one TCP stream's
//! throughput and 64-byte UDP packets received per second (iperf3). Each
//! figure is repeated `--reps` times; the report gives median [min-max] and
//! the ratio to the direct path, plus the time to program each table and
//! the agent's RSS, in `--out/traffic.md`, with SVG plots beside it.
mod load;
mod report;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use proxy_tests::{
    http,
    manifests::{Endpoint, ManifestsDir, ServiceSpec},
    netns::{
        Agent, AgentSource, BpfFs, CLUSTER_CIDR, CgroupMember, NODE_IP, PodNetwork, Topology,
        agent_binary,
    },
};

use load::{CONN_PORT_BASE, ConnServer, IPERF_PORT};
use report::{At, Metric, NO_AGENT, Programming, Report, Route};

#[derive(Parser, Debug)]
#[command(
    about = "Traffic through a Service in each mode, against the direct path",
    args_override_self = true
)]
struct Args {
    /// Modes, comma-separated; `none` (no agent: the direct path) always
    /// runs first. `ebpf-packet` is the ebpf mode with `--socket-lb=false`
    /// (pods' connections translated per packet, not at connect).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ebpf,ebpf-packet,nftables,iptables"
    )]
    modes: Vec<String>,
    /// Numbers of filler Services, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,1000,10000,30000")]
    sizes: Vec<u32>,
    /// Endpoints of each filler Service.
    #[arg(long, default_value_t = 10)]
    endpoints: u32,
    /// Pod networks, comma-separated: `bridge`, `routed`.
    #[arg(long, value_delimiter = ',', default_value = "bridge,routed")]
    networks: Vec<String>,
    /// How long each run of short connections lasts.
    #[arg(long, default_value = "30s", value_parser = proxy_agent::config::parse_go_duration)]
    duration: Duration,
    /// Clients opening connections in parallel.
    #[arg(long, default_value_t = 4)]
    parallel: usize,
    /// Seconds of each iperf3 run (stream and UDP).
    #[arg(long, default_value_t = 5)]
    iperf_seconds: u32,
    /// Repetitions of each figure.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Where the report and plots go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

/// The client pod is the last pod; the others are backends.
const PODS: usize = 3;
const CONN_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 10);
const IPERF_VIP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 11);
const CONN_NODE_PORT: u16 = 30080;
const IPERF_NODE_PORT: u16 = 30201;
/// Filler Services (each with its EndpointSlice) per manifest file: about
/// 11 MB of JSON at 10 endpoints each.
const FILLERS_PER_FILE: usize = 5_000;

/// How long the agent gets to program the largest table.
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(300);

fn main() -> Result<()> {
    let args = Args::parse();
    for mode in &args.modes {
        if proxy_agent::dataplane::Mode::from_name(agent_mode(mode).0).is_none() {
            bail!("unknown mode {mode}");
        }
    }
    let binary = agent_binary()?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut report = Report {
        setup: setup_lines(&args, &binary),
        ..Report::default()
    };
    for network in &args.networks {
        let pod_network = match network.as_str() {
            "bridge" => PodNetwork::Bridge { hairpin: true },
            "routed" => PodNetwork::Routed,
            other => bail!("unknown pod network {other} (bridge, routed)"),
        };
        run_network(&args, &binary, network, pod_network, &mut report)?;
        write(&args, &report)?;
    }
    Ok(())
}

/// The run's parameters, as the report's first lines.
fn setup_lines(args: &Args, binary: &std::path::Path) -> Vec<String> {
    vec![
        format!("agent: {}", binary.display()),
        format!(
            "{} parallel clients, {:?} per run of short connections; iperf3 runs of {} s; {} repetitions",
            args.parallel, args.duration, args.iperf_seconds, args.reps
        ),
        format!(
            "filler Services: {:?}, {} endpoints each; kernel {}",
            args.sizes,
            args.endpoints,
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
        ),
    ]
}

fn write(args: &Args, report: &Report) -> Result<()> {
    let plots = report.plots(&args.out)?;
    let mut md = report.markdown();
    md.push_str("\n## Plots\n\n");
    for plot in plots {
        md.push_str(&format!("![{plot}]({plot})\n"));
    }
    let path = args.out.join("traffic.md");
    std::fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    println!("{md}\nwrote {}", path.display());
    Ok(())
}

/// The topology of one pod network and what runs in it.
struct Bench<'a> {
    args: &'a Args,
    topology: Topology,
    network: &'a str,
    /// The client pod's namespace.
    client_pod: String,
}

fn run_network(
    args: &Args,
    binary: &std::path::Path,
    network: &str,
    pod_network: PodNetwork,
    report: &mut Report,
) -> Result<()> {
    let topology = Topology::builder()
        .pod_network(pod_network)
        .backends(PODS)
        .build()?;
    let client_pod = topology.pod(PODS - 1).ns().to_string();
    let bench = Bench {
        args,
        topology,
        network,
        client_pod,
    };
    // The client pod's connections run on this process's threads: in the
    // node's cgroup, the socket hooks see them as they see a pod's. Both
    // go before the topology (its cgroup is removed only when empty).
    let _member = bench
        .topology
        .cgroup()
        .map(CgroupMember::join)
        .transpose()?;
    let _iperf = load::iperf_server(bench.topology.pod(0).ns())?;
    let pod0 = bench
        .topology
        .pod(0)
        .ip_of(proxy_tests::manifests::IpFamily::V4);
    eprintln!("[{network}] direct path");
    let mut port = CONN_PORT_BASE;
    let servers = bench.conn_servers(port)?;
    bench.measure(report, NO_AGENT, 0, |_, server| match server {
        Server::Conn => SocketAddr::new(pod0, port),
        Server::Iperf => SocketAddr::new(pod0, IPERF_PORT),
    })?;
    drop(servers);
    for mode in &args.modes {
        for &services in &args.sizes {
            eprintln!("[{network}] {mode}, {services} services");
            port += 1;
            let _servers = bench.conn_servers(port)?;
            let manifests = bench.manifests(services, port)?;
            let bpffs = BpfFs::mount()?;
            let mut config = bench.topology.agent_config(
                binary,
                &bpffs,
                AgentSource::Manifests(manifests.path().into()),
            );
            let (agent_mode, extra) = agent_mode(mode);
            config.mode = agent_mode.to_string();
            config
                .extra_args
                .extend(extra.iter().map(|a| a.to_string()));
            // As a cluster's kube-proxy is configured: pods are known.
            config
                .extra_args
                .push(format!("--cluster-cidr={CLUSTER_CIDR}"));
            let started = Instant::now();
            let mut agent = Agent::start(config)?;
            let seconds = bench.wait_programmed(&mut agent, services, started)?;
            let rss_bytes = agent.rss_bytes().unwrap_or(0);
            bench.wait_reachable(&mut agent)?;
            bench.measure(report, mode, services, |route, server| {
                match (route, server) {
                    (Route::FromPod, Server::Conn) => SocketAddr::new(IpAddr::V4(CONN_VIP), 80),
                    (Route::FromPod, Server::Iperf) => {
                        SocketAddr::new(IpAddr::V4(IPERF_VIP), IPERF_PORT)
                    }
                    (Route::FromOutside, Server::Conn) => {
                        SocketAddr::new(IpAddr::V4(NODE_IP), CONN_NODE_PORT)
                    }
                    (Route::FromOutside, Server::Iperf) => {
                        SocketAddr::new(IpAddr::V4(NODE_IP), IPERF_NODE_PORT)
                    }
                }
            })?;
            agent.ensure_running()?;
            let metrics = scrape_metrics(bench.topology.node_ns());
            report.programming.push(Programming {
                network: network.to_string(),
                mode: mode.clone(),
                services,
                seconds,
                rss_bytes,
                datapath: DATAPATH_REASONS
                    .iter()
                    .filter_map(|reason| Some((*reason, datapath_count(&metrics, reason)?)))
                    .collect(),
            });
        }
    }
    Ok(())
}

/// The agent's `--mode` and further arguments of a benchmark mode.
fn agent_mode(mode: &str) -> (&str, &'static [&'static str]) {
    match mode {
        "ebpf-packet" => ("ebpf", &["--socket-lb=false"]),
        other => (other, &[]),
    }
}

/// The eBPF datapath's counters the report shows per phase: masquerade
/// ports that ran out, or were reused inside the backend's TIME_WAIT;
/// and packets of a flow it had no (live) entry for, passed untranslated.
const DATAPATH_REASONS: [&str; 6] = [
    "drop_snat_exhausted",
    "snat_port_reused_early",
    "sock_pod_translated",
    "dnat_new",
    "pass_no_reply",
    "pass_no_flow",
];

/// `proxy_agent_datapath_packets_total{reason="<reason>"}`, if exported.
fn datapath_count(metrics: &str, reason: &str) -> Option<u64> {
    let sample = format!("proxy_agent_datapath_packets_total{{reason=\"{reason}\"}}");
    http::sample(metrics, &sample).map(|count| count as u64)
}

/// The servers traffic goes to.
#[derive(Copy, Clone, Debug)]
enum Server {
    /// The short-connection servers of the backend pods.
    Conn,
    /// The first pod's iperf3.
    Iperf,
}

impl Bench<'_> {
    /// A short-connection server on `port` in each backend pod.
    fn conn_servers(&self, port: u16) -> Result<Vec<ConnServer>> {
        (0..PODS - 1)
            .map(|i| ConnServer::start(self.topology.pod(i).ns(), port, 2))
            .collect()
    }

    /// The two measured Services (`bench/conn` to `conn_port`), and
    /// `services` fillers in List files of [`FILLERS_PER_FILE`] each (the
    /// agent refuses a manifest file over 64 MiB, which 30 000 fillers in
    /// one file exceed).
    fn manifests(&self, services: u32, conn_port: u16) -> Result<ManifestsDir> {
        let mut dir = ManifestsDir::new()?;
        dir.write_node(self.topology.node_name(), IpAddr::V4(NODE_IP))?;
        let backends: Vec<Endpoint> = (0..PODS - 1)
            .map(|i| self.topology.pod(i).endpoint())
            .collect();
        let conn = ServiceSpec::cluster_ip("bench", "conn", IpAddr::V4(CONN_VIP))
            .tcp(80, conn_port)
            .node_port(&[CONN_NODE_PORT]);
        dir.write_service(&conn)?;
        dir.write_endpoint_slice(&conn, &backends)?;
        let iperf = ServiceSpec::cluster_ip("bench", "iperf", IpAddr::V4(IPERF_VIP))
            .tcp(IPERF_PORT, IPERF_PORT)
            .udp(IPERF_PORT, IPERF_PORT)
            .node_port(&[IPERF_NODE_PORT, IPERF_NODE_PORT]);
        dir.write_service(&iperf)?;
        dir.write_endpoint_slice(&iperf, &backends[..1])?;
        let mut items = Vec::with_capacity(2 * services as usize);
        for i in 0..services {
            let spec =
                ServiceSpec::cluster_ip("fill", &format!("svc-{i}"), filler_ip(i)).tcp(80, 8080);
            let endpoints: Vec<Endpoint> = (0..self.args.endpoints)
                .map(|j| Endpoint {
                    pod: format!("svc-{i}-{j}"),
                    ip: IpAddr::V4(Ipv4Addr::new(10, (100 + j) as u8, (i >> 8) as u8, i as u8)),
                })
                .collect();
            items.push(spec.service());
            items.push(spec.endpoint_slice(&endpoints, Some(self.topology.node_name())));
        }
        for (n, items) in items.chunks(2 * FILLERS_PER_FILE).enumerate() {
            let list = serde_json::json!({ "apiVersion": "v1", "kind": "List", "items": items });
            dir.write_file(&format!("fillers-{n:03}.json"), &serde_json::to_vec(&list)?)?;
        }
        Ok(dir)
    }

    /// Waits until the agent reports every frontend programmed; returns the
    /// seconds since `started`.
    fn wait_programmed(&self, agent: &mut Agent, services: u32, started: Instant) -> Result<f64> {
        // The fillers and the three ClusterIP frontends of conn and iperf
        // (the first sync programs the whole table at once).
        let want = f64::from(services) + 3.0;
        loop {
            agent.ensure_running()?;
            let metrics = scrape_metrics(self.topology.node_ns());
            let gauge = |name| http::sample(&metrics, name).unwrap_or(0.0);
            let synced = gauge("kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 0.0;
            if synced && gauge("proxy_agent_frontends") >= want {
                return Ok(started.elapsed().as_secs_f64());
            }
            if started.elapsed() > PROGRAM_TIMEOUT {
                bail!(
                    "{services} services not programmed after {PROGRAM_TIMEOUT:?}; log:\n{}",
                    agent.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (bounded) until a connection through each route completes.
    fn wait_reachable(&self, agent: &mut Agent) -> Result<()> {
        for (from, target) in [
            (
                self.client_pod.as_str(),
                SocketAddr::new(IpAddr::V4(CONN_VIP), 80),
            ),
            (
                self.topology.client_ns(),
                SocketAddr::new(IpAddr::V4(NODE_IP), CONN_NODE_PORT),
            ),
        ] {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                agent.ensure_running()?;
                let run = load::connections(from, target, 1, Duration::from_millis(50))?;
                if run.completed > 0 {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "{target} unreachable from {from}; agent log:\n{}",
                        agent.log()
                    );
                }
            }
        }
        Ok(())
    }

    /// Every figure of both routes; `target(route, server)` is where the
    /// traffic for each server goes.
    fn measure(
        &self,
        report: &mut Report,
        mode: &str,
        services: u32,
        target: impl Fn(Route, Server) -> SocketAddr,
    ) -> Result<()> {
        for route in Route::ALL {
            let from = match route {
                Route::FromPod => self.client_pod.as_str(),
                Route::FromOutside => self.topology.client_ns(),
            };
            let at = At {
                network: self.network.to_string(),
                mode: mode.to_string(),
                services,
                route,
            };
            let conn = target(route, Server::Conn);
            let iperf = target(route, Server::Iperf);
            for _ in 0..self.args.reps {
                let run = load::connections(from, conn, self.args.parallel, self.args.duration)?;
                if run.completed == 0 {
                    bail!(
                        "no connection to {conn} from {from} completed ({} failed)",
                        run.failed
                    );
                }
                let (busy, softirq) = run.cpu_per_conn();
                let ms = |d: Duration| d.as_secs_f64() * 1e3;
                report.add(&at, Metric::ConnRate, run.rate());
                report.add(&at, Metric::ConnP50, ms(run.percentile(50.0)));
                report.add(&at, Metric::ConnP99, ms(run.percentile(99.0)));
                report.add(&at, Metric::ConnMax, ms(run.max()));
                report.add(&at, Metric::Stalls, run.stalls as f64);
                report.add(&at, Metric::Failed, run.failed as f64);
                report.add(&at, Metric::BusyPerConn, busy.as_secs_f64() * 1e6);
                report.add(&at, Metric::SoftirqPerConn, softirq.as_secs_f64() * 1e6);
            }
            eprintln!("  {route:?}: connections done; iperf3 to {iperf}");
            for _ in 0..self.args.reps {
                let bps = load::stream(from, iperf, self.args.iperf_seconds)?;
                report.add(&at, Metric::StreamGbps, bps / 1e9);
                let pps = load::udp(from, iperf, self.args.iperf_seconds)?;
                report.add(&at, Metric::UdpPps, pps / 1e3);
            }
        }
        Ok(())
    }
}

/// Filler ClusterIPs: 198.19.1.0 onwards (the measured ones are in 198.19.0.0/24).
fn filler_ip(i: u32) -> IpAddr {
    let n = 256 + i;
    IpAddr::V4(Ipv4Addr::new(198, 19, (n >> 8) as u8, n as u8))
}

/// The agent's `/metrics` (empty until it answers).
fn scrape_metrics(node_ns: &str) -> String {
    http::get(
        node_ns,
        SocketAddr::from(([127, 0, 0, 1], 10249)),
        "/metrics",
    )
    .map(|(_, body)| body)
    .unwrap_or_default()
}
