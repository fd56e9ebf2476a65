//! Control-plane benchmark: the time from a change written to the API server
//! until the agent has programmed it into the kernel map, at N services.
//!
//! The real agent (release build, ebpf mode, `--kubeconfig`) runs in a
//! network namespace of its own with only loopback (so it attaches to
//! nothing), fed by the in-process fake API server of `proxy-tests`. For each
//! of `--changes` single EndpointSlice updates, the bench records two times
//! from the write:
//! - **watch delivery**: when a bare kube watcher in this process, on the
//!   same API server, sees the new resourceVersion. This is the floor: what
//!   any watch-based agent pays before it can act.
//! - **programmed**: when the service's slot-0 entry in the pinned services
//!   map shows the new backend count (the agent writes it last, after the
//!   backends and slots: make-before-break).
//!
//! Both are reported side by side with their ratio; and the initial sync
//! (agent start to all N services in the map) is timed once.
use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use aya::maps::{Map, MapData};
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, watcher};
use proxy_common::{FAMILY_V4, MAP_SERVICES, ServiceKey, ServiceValue};
use proxy_tests::{
    apiserver::ApiServer,
    manifests::{self, Endpoint, ServiceSpec},
    netns::{Agent, AgentConfig, AgentSource, BpfFs, Netns, agent_binary, in_netns},
};

#[derive(Parser, Debug)]
#[command(about = "API change -> programmed map entry latency of proxy-agent")]
struct Args {
    /// Services (each with one TCP port and one EndpointSlice).
    #[arg(long, default_value_t = 1000)]
    services: u32,
    /// Endpoints per slice (alternates with one more on each change).
    #[arg(long, default_value_t = 10)]
    endpoints: u32,
    /// Single changes measured.
    #[arg(long, default_value_t = 300)]
    changes: u32,
    /// Give every object the metadata a real cluster gives it (managed
    /// fields; kubectl's last-applied copy on Services; on EndpointSlices
    /// the controller's change-trigger time, and each endpoint's nodeName,
    /// spread over 100 nodes), so that the agent's memory is measured on
    /// objects of a real size.
    #[arg(long)]
    real_metadata: bool,
    /// Print the agent's log at the end (where its start went).
    #[arg(long)]
    agent_log: bool,
    /// Pause between changes, so that each one is applied alone.
    #[arg(long, default_value = "20ms", value_parser = proxy_agent::config::parse_go_duration)]
    pause: Duration,
}

fn cluster_ip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 96, (i >> 8) as u8, (i & 0xff) as u8))
}

fn spec(i: u32) -> ServiceSpec {
    ServiceSpec::cluster_ip("bench", &format!("svc-{i}"), cluster_ip(i)).tcp(80, 8080)
}

fn endpoints(i: u32, count: u32) -> Vec<Endpoint> {
    (0..count)
        .map(|j| Endpoint {
            pod: format!("svc-{i}-{j}"),
            ip: IpAddr::V4(Ipv4Addr::new(
                10,
                (100 + j) as u8,
                (i >> 8) as u8,
                (i & 0xff) as u8,
            )),
        })
        .collect()
}

fn slot0(i: u32) -> ServiceKey {
    let mut addr = [0u8; 16];
    if let IpAddr::V4(v4) = cluster_ip(i) {
        addr[..4].copy_from_slice(&v4.octets());
    }
    ServiceKey {
        addr,
        port: 80u16.to_be(),
        proto: 6,
        family: FAMILY_V4,
        scope: 0,
        _pad0: 0,
        slot: 0,
    }
}

/// The agent's pinned services map.
struct ServicesMap(aya::maps::HashMap<MapData, ServiceKey, ServiceValue>);

impl ServicesMap {
    fn open(bpf_root: &Path) -> Result<Self> {
        let path = bpf_root.join("maps").join(MAP_SERVICES);
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        Ok(Self(aya::maps::HashMap::try_from(Map::HashMap(data))?))
    }

    fn count(&self, i: u32) -> Option<u16> {
        self.0.get(&slot0(i), 0).ok().map(|v| v.count)
    }
}

/// What a real API server, kubectl and the EndpointSlice controller add to
/// an object: a managed-fields entry naming every field `manager` set (as
/// `fieldsV1`), on kubectl-applied objects the last-applied copy of the
/// object, and on the controller's slices the change-trigger time.
fn add_real_metadata(object: &mut serde_json::Value, manager: &str) {
    fn fields_of(value: &serde_json::Value) -> serde_json::Value {
        match value {
            serde_json::Value::Object(map) => serde_json::Value::Object(
                map.iter()
                    .map(|(k, v)| (format!("f:{k}"), fields_of(v)))
                    .collect(),
            ),
            serde_json::Value::Array(items) => serde_json::Value::Object(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (format!("i:{i}"), fields_of(v)))
                    .collect(),
            ),
            _ => serde_json::json!({}),
        }
    }
    let fields = fields_of(object);
    let copy = object.to_string();
    let meta = &mut object["metadata"];
    meta["managedFields"] = serde_json::json!([{
        "manager": manager,
        "operation": "Update",
        "apiVersion": "v1",
        "time": "2026-12-06T00:00:00Z",
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    }]);
    if manager.starts_with("kubectl") {
        meta["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] =
            serde_json::Value::String(copy);
    }
    if manager == SLICE_CONTROLLER {
        meta["annotations"]["endpoints.kubernetes.io/last-change-trigger-time"] =
            serde_json::json!("2026-12-06T00:00:00Z");
    }
}

/// The field manager of EndpointSlices in a real cluster.
const SLICE_CONTROLLER: &str = "endpointslice-controller.k8s.io";

/// The agent's resident memory in MiB (0 when it cannot be read).
fn rss_mib(agent: &Agent) -> f64 {
    agent.rss_bytes().unwrap_or(0) as f64 / (1024.0 * 1024.0)
}

/// Percentile (nearest rank) of sorted durations.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn main() -> Result<()> {
    let args = Args::parse();
    ensure!(
        proxy_tests::privileged_skip_reason().is_none(),
        "needs root: {}",
        proxy_tests::privileged_skip_reason().unwrap_or_default()
    );
    let binary = agent_binary()?;
    eprintln!("agent binary: {}", binary.display());
    let ns = Netns::create(format!("pxb{}-sync", std::process::id()))?;
    let bpffs = BpfFs::mount()?;
    let server = in_netns(ns.name(), ApiServer::start)??;
    let dir = tempfile::tempdir()?;
    let kubeconfig = server.kubeconfig(dir.path())?;

    server.apply_json(manifests::node(
        "bench-node",
        IpAddr::V4(Ipv4Addr::new(198, 18, 0, 1)),
    ))?;
    let n = args.services;
    let mut counts: Vec<u32> = vec![args.endpoints; n as usize];
    let real = |mut object: serde_json::Value, manager: &str| {
        if args.real_metadata {
            add_real_metadata(&mut object, manager);
        }
        object
    };
    let services: Vec<k8s_openapi::api::core::v1::Service> = (0..n)
        .map(|i| serde_json::from_value(real(spec(i).service(), "kubectl-client-side-apply")))
        .collect::<Result<_, _>>()?;
    let slices: Vec<EndpointSlice> = (0..n)
        .map(|i| {
            let node = args.real_metadata.then(|| format!("node-{}", i % 100));
            serde_json::from_value(real(
                spec(i).endpoint_slice(&endpoints(i, args.endpoints), node.as_deref()),
                SLICE_CONTROLLER,
            ))
        })
        .collect::<Result<_, _>>()?;
    server.apply_all(&services)?;
    server.apply_all(&slices)?;
    eprintln!(
        "{n} services x {} endpoints written to the API server",
        args.endpoints
    );

    let started = Instant::now();
    let mut agent = Agent::start(AgentConfig {
        binary,
        netns: ns.name().to_string(),
        source: AgentSource::Kubeconfig(kubeconfig.clone()),
        bpf_root: bpffs.agent_root(),
        node_name: "bench-node".into(),
        mode: "ebpf".into(),
        extra_args: Vec::new(),
        cgroup: None,
    })?;
    // Opened once it is pinned, then only read: the poll must not take the
    // CPU the agent is measured on.
    let mut opened: Option<ServicesMap> = None;
    let map = loop {
        agent.ensure_running()?;
        if opened.is_none() {
            opened = ServicesMap::open(&bpffs.agent_root()).ok();
        }
        if let Some(map) = &opened
            && map.count(n - 1) == Some(args.endpoints as u16)
            && map.count(0) == Some(args.endpoints as u16)
        {
            break opened.take().context("opened above")?;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "initial sync took over 60 s"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let initial = started.elapsed();
    eprintln!("initial sync (agent start -> {n} services in the map): {initial:?}");
    let rss_after_start = rss_mib(&agent);

    // The floor: a bare watcher of EndpointSlices on the same server, run in
    // the agent's namespace (where the server listens).
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watcher_ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ns_name = ns.name().to_string();
    {
        let seen = seen.clone();
        let ready = watcher_ready.clone();
        let kubeconfig = kubeconfig.clone();
        std::thread::spawn(move || {
            let result = in_netns(&ns_name, move || -> Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let file = kube::config::Kubeconfig::read_from(&kubeconfig)?;
                    let config = kube::Config::from_custom_kubeconfig(
                        file,
                        &kube::config::KubeConfigOptions::default(),
                    )
                    .await?;
                    let client = kube::Client::try_from(config)?;
                    let api: kube::Api<EndpointSlice> = kube::Api::all(client);
                    let mut stream = watcher(api, watcher::Config::default())
                        .default_backoff()
                        .boxed();
                    while let Some(event) = stream.next().await {
                        let now = Instant::now();
                        match event {
                            Ok(watcher::Event::InitDone) => {
                                ready.store(true, std::sync::atomic::Ordering::SeqCst);
                            }
                            Ok(watcher::Event::Apply(slice)) => {
                                if let Some(rv) = slice.metadata.resource_version {
                                    seen.lock()
                                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                                        .insert(rv, now);
                                }
                            }
                            _ => {}
                        }
                    }
                    Ok::<(), anyhow::Error>(())
                })
            });
            if let Err(e) | Ok(Err(e)) = result {
                eprintln!("bench watcher: {e:#}");
            }
        });
    }
    let wait = Instant::now();
    while !watcher_ready.load(std::sync::atomic::Ordering::SeqCst) {
        ensure!(
            wait.elapsed() < Duration::from_secs(30),
            "bench watcher did not sync"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    let mut delivered = Vec::new();
    let mut programmed = Vec::new();
    let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
    for _ in 0..args.changes {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let i = (rng % u64::from(n)) as u32;
        let next = if counts[i as usize] == args.endpoints {
            args.endpoints + 1
        } else {
            args.endpoints
        };
        counts[i as usize] = next;
        let slice: EndpointSlice =
            serde_json::from_value(spec(i).endpoint_slice(&endpoints(i, next), None))?;
        let t0 = Instant::now();
        let stored = server.apply(&slice)?;
        let rv = stored["metadata"]["resourceVersion"]
            .as_str()
            .context("no resourceVersion")?
            .to_string();
        loop {
            if map.count(i) == Some(next as u16) {
                programmed.push(t0.elapsed());
                break;
            }
            agent.ensure_running()?;
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("change of svc-{i} not programmed within 10 s");
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        // The bare watcher has certainly had the event by now, or soon.
        let wait = Instant::now();
        let at = loop {
            if let Some(at) = seen
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .remove(&rv)
            {
                break at;
            }
            ensure!(
                wait.elapsed() < Duration::from_secs(5),
                "bench watcher missed {rv}"
            );
            std::thread::sleep(Duration::from_micros(50));
        };
        delivered.push(at.saturating_duration_since(t0));
        std::thread::sleep(args.pause);
    }
    agent.ensure_running()?;
    if std::env::var_os("SYNC_LATENCY_AGENT_LOG").is_some() {
        eprintln!("{}", agent.log());
    }

    // What the agent adds to the watch: per change, programmed minus
    // delivered (the goal is on this, not on the floor under it).
    let mut after_delivery: Vec<Duration> = programmed
        .iter()
        .zip(&delivered)
        .map(|(p, d)| p.saturating_sub(*d))
        .collect();
    delivered.sort();
    programmed.sort();
    after_delivery.sort();
    println!(
        "API change -> programmed, {n} services x {}-{} endpoints, {} single EndpointSlice changes {:?} apart (ms)",
        args.endpoints,
        args.endpoints + 1,
        args.changes,
        args.pause
    );
    println!("{:<34}{:>9}{:>9}{:>9}{:>9}", "", "p50", "p90", "p99", "max");
    for (name, values) in [
        ("watch delivery (floor)", &delivered),
        ("programmed in the map", &programmed),
        ("programmed after delivery", &after_delivery),
    ] {
        println!(
            "{name:<34}{:>9}{:>9}{:>9}{:>9}",
            ms(percentile(values, 50.0)),
            ms(percentile(values, 90.0)),
            ms(percentile(values, 99.0)),
            ms(percentile(values, 100.0)),
        );
    }
    let ratio = |p: f64| {
        percentile(&programmed, p).as_secs_f64() / percentile(&delivered, p).as_secs_f64().max(1e-9)
    };
    println!(
        "{:<34}{:>8.2}x{:>8.2}x{:>8.2}x",
        "programmed / floor",
        ratio(50.0),
        ratio(90.0),
        ratio(99.0)
    );
    println!("initial sync of {n} services (agent start -> all in the map): {initial:.2?}");
    println!(
        "agent RSS: {rss_after_start:.0} MiB after the initial sync, {:.0} MiB after the changes{}",
        rss_mib(&agent),
        if args.real_metadata {
            " (objects with real metadata)"
        } else {
            ""
        }
    );
    if args.agent_log {
        eprintln!("{}", agent.log());
    }
    drop(agent);
    drop(server);
    drop(bpffs);
    drop(ns);
    Ok(())
}
