//! Dataplane sync benchmark: how long each mode takes to program a table of
//! `--services` ClusterIP services with `--endpoints` endpoints each (full
//! sync, from an empty kernel), then how long a one-endpoint change and one
//! added service take at that size, the periodic reconcile when nothing
//! changed (resync), and the first reconcile of a new dataplane over the
//! loaded kernel (restart). Every mode runs on the same table, in a
//! fresh network namespace of its own, in this one run; the report gives
//! each figure and its ratio to the eBPF mode.
//!
//! The dataplanes are driven through the `Dataplane` trait exactly as the
//! agent's sync loop drives them (`set_node_network`, `reconcile`, `apply`),
//! so the figures include everything the agent pays (rendering, `nft`,
//! `iptables-restore`, map writes) and nothing of the API server.
use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use proxy_agent::{
    dataplane::{Dataplane, Mode, ModeOptions, NodeNetwork, ebpf, mode::IptablesBackendChoice},
    model::{
        Backend, Frontend, FrontendChange, FrontendKey, FrontendKind, FrontendPolicy, Protocol,
        ServiceName, ServiceTable, TableDiff,
    },
};
use proxy_tests::netns::{Netns, in_netns};

#[derive(Parser, Debug)]
#[command(about = "Full and partial sync times of each dataplane mode at one table size")]
struct Args {
    /// Services (one TCP ClusterIP port each).
    #[arg(long, default_value_t = 10_000)]
    services: u32,
    /// Endpoints per service.
    #[arg(long, default_value_t = 10)]
    endpoints: u32,
    /// One-endpoint changes measured (median and max reported).
    #[arg(long, default_value_t = 20)]
    changes: u32,
    /// Modes to run, comma-separated (`iptables` is iptables-nft,
    /// `iptables-legacy` the legacy backend).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ebpf,nftables,iptables,iptables-legacy"
    )]
    modes: Vec<String>,
    /// Leave each mode's namespace (`pa-bench-sync-<pid>-<mode>`) in place,
    /// to inspect what was programmed; delete it with `ip netns del`.
    #[arg(long)]
    keep_netns: bool,
}

fn vip(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        10,
        96 + (i >> 16) as u8,
        (i >> 8) as u8,
        i as u8,
    ))
}

fn backend(i: u32, j: u32) -> Backend {
    let n = i * 64 + j;
    Backend {
        ip: IpAddr::V4(Ipv4Addr::new(
            10,
            128 + (n >> 16) as u8,
            (n >> 8) as u8,
            n as u8,
        )),
        port: 8080,
    }
}

fn key(i: u32) -> FrontendKey {
    FrontendKey {
        ip: vip(i),
        port: 80,
        protocol: Protocol::Tcp,
    }
}

fn frontend(i: u32, endpoints: u32) -> Frontend {
    Frontend {
        service: ServiceName {
            namespace: "bench".into(),
            name: format!("svc-{i}").into(),
        },
        port_name: String::new(),
        kind: FrontendKind::ClusterIp,
        backends: (0..endpoints).map(|j| backend(i, j)).collect(),
        cluster_backends: Vec::new(),
        policy: FrontendPolicy::default(),
    }
}

fn table(services: u32, endpoints: u32) -> ServiceTable {
    let mut t = ServiceTable::new();
    for i in 0..services {
        t.insert(key(i), frontend(i, endpoints));
    }
    t
}

fn network() -> NodeNetwork {
    NodeNetwork {
        cluster_cidrs: vec!["10.128.0.0/9".parse().expect("a valid CIDR")],
        snat_v4: Some(Ipv4Addr::new(192, 0, 2, 1)),
        ..NodeNetwork::default()
    }
}

/// What one mode measured.
struct Figures {
    full: Duration,
    change_median: Duration,
    change_max: Duration,
    add: Duration,
    /// The periodic reconcile when nothing changed (what the agent runs
    /// every --sync-period).
    resync: Duration,
    /// The first reconcile of a new dataplane over the loaded kernel (an
    /// agent restart); ebpf loads fresh maps here, so it is its full sync.
    restart: Duration,
}

/// The dataplane of `name`: a mode as `--mode` spells it, or
/// `iptables-legacy` (the iptables mode through iptables-legacy; plain
/// `iptables` is iptables-nft here).
fn dataplane(name: &str) -> Result<Box<dyn Dataplane>> {
    let (mode, iptables_backend) = match name {
        "iptables-legacy" => (Mode::Iptables, IptablesBackendChoice::Legacy),
        "iptables" => (Mode::Iptables, IptablesBackendChoice::Nft),
        other => (
            Mode::from_name(other).with_context(|| format!("unknown mode {other:?}"))?,
            IptablesBackendChoice::Auto,
        ),
    };
    if mode == Mode::Ebpf {
        // Maps only: nothing is attached, so no interface is needed.
        return Ok(Box::new(
            ebpf::load_unpinned().context("loading the eBPF object")?.0,
        ));
    }
    let options = ModeOptions {
        iptables_backend,
        ..ModeOptions::default()
    };
    Ok(mode.open(&options)?.dataplane)
}

fn measure(mode: &str, args: &Args) -> Result<Figures> {
    let desired = table(args.services, args.endpoints);
    let mut dp = dataplane(mode)?;
    dp.set_node_network(&network())?;
    let started = Instant::now();
    dp.reconcile(&desired)?;
    let full = started.elapsed();

    let mut current = desired;
    let mut changes = Vec::new();
    for n in 0..args.changes {
        // Spread over the table; alternately one endpoint more and back.
        let i = (n * 7919) % args.services;
        let k = key(i);
        let old = current.get(&k).cloned().context("service missing")?;
        let mut new = old.clone();
        if new.backends.len() as u32 > args.endpoints {
            new.backends.pop();
        } else {
            new.backends.push(backend(i, args.endpoints));
        }
        let diff = TableDiff {
            changed: vec![FrontendChange {
                key: k,
                old: old.into(),
                new: new.clone().into(),
            }],
            ..TableDiff::default()
        };
        let started = Instant::now();
        dp.apply(&diff)?;
        changes.push(started.elapsed());
        current.insert(k, new);
    }
    changes.sort();
    let extra = args.services;
    let diff = TableDiff {
        added: vec![(key(extra), frontend(extra, args.endpoints).into())],
        ..TableDiff::default()
    };
    let started = Instant::now();
    dp.apply(&diff)?;
    let add = started.elapsed();
    for (k, f) in diff.added {
        current.insert_shared(k, f);
    }
    let started = Instant::now();
    let report = dp.reconcile(&current)?;
    let resync = started.elapsed();
    if report.repaired + report.stats.frontends_changed > 0 {
        bail!("{mode}: the reconcile after the changes found drift: {report:?}");
    }
    drop(dp);
    let mut dp = dataplane(mode)?;
    dp.set_node_network(&network())?;
    let started = Instant::now();
    dp.reconcile(&current)?;
    let restart = started.elapsed();
    Ok(Figures {
        full,
        change_median: changes.get(changes.len() / 2).copied().unwrap_or_default(),
        change_max: changes.last().copied().unwrap_or_default(),
        add,
        resync,
        restart,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.services == 0 || args.services > 1 << 20 || args.endpoints == 0 || args.endpoints > 60 {
        bail!("--services must be 1..=1048576 and --endpoints 1..=60");
    }
    println!(
        "dataplane sync: {} services x {} endpoints, {} one-endpoint changes",
        args.services, args.endpoints, args.changes
    );
    let mut results = Vec::new();
    for mode in &args.modes {
        let ns = Netns::create(format!("pa-bench-sync-{}-{mode}", std::process::id()))?;
        let figures = in_netns(ns.name(), || measure(mode, &args))??;
        println!(
            "  {mode:<15} full {:>9.1} ms   change median {:>7.1} ms  max {:>7.1} ms   add one {:>7.1} ms   resync {:>7.1} ms   restart {:>9.1} ms",
            ms(figures.full),
            ms(figures.change_median),
            ms(figures.change_max),
            ms(figures.add),
            ms(figures.resync),
            ms(figures.restart)
        );
        if args.keep_netns {
            println!("  kept namespace {}", ns.name());
            std::mem::forget(ns);
        }
        results.push((mode.clone(), figures));
    }
    if let Some((_, base)) = results.iter().find(|(m, _)| m == "ebpf") {
        println!("  ratios to ebpf (full / change median / add one / resync / restart):");
        for (mode, f) in &results {
            println!(
                "  {mode:<15} {:>8.1}x {:>8.1}x {:>8.1}x {:>8.1}x {:>8.1}x",
                ratio(f.full, base.full),
                ratio(f.change_median, base.change_median),
                ratio(f.add, base.add),
                ratio(f.resync, base.resync),
                ratio(f.restart, base.restart)
            );
        }
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64().max(1e-9)
}
