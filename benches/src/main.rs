//! Per-packet cost of the TC programs, measured in the kernel through
//! `BPF_PROG_TEST_RUN`, for each datapath path and several table sizes,
//! side by side with the empty-program floor of the same harness.
//!
//! Every path measured is a row of the packet-fixture tests' table
//! (`proxy-agent/tests/common/cases.rs`, included here with the fixture
//! and the packet builders), named on the command line (`--cases`), so
//! every figure is of a tested case, whose expectations are checked on
//! every packet measured. How each figure is obtained (also printed with
//! the results):
//! - Each row runs on its own setup (the table and node network its tests
//!   use), with filler ClusterIP services added to make the table size.
//!   Its `given` rows run first (not measured), then one warm-up run
//!   (which, for the affinity row, creates the client's entry), then
//!   `--calls` runs.
//! - A program that rewrites a packet changes what a later repeat of the
//!   same test run would see, so every row is measured with `repeat = 1`
//!   over many calls, each from freshly built bytes, and the
//!   kernel-reported durations are averaged. The floor is measured the
//!   same way, so every row carries the same timer overhead.
//! - A row whose client varies (new flows) sends each call from the next
//!   source port (and, for `PortThenAddress`, the next address every
//!   60 000 calls), so every call misses the connection table and creates
//!   its entries; the others re-send the same packet of one flow.
//! - A row through two hooks (ingress, then its output through egress)
//!   adds the two durations.
//! - The non-service rows and the floor leave the packet unchanged, so
//!   they are also measured with one call of a large repeat count, for
//!   reference.
use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use anyhow::{Context, Result, anyhow, bail};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use clap::Parser;
use proxy_agent::model::{
    Backend, Frontend, FrontendKey, FrontendKind, FrontendPolicy, Protocol, ServiceName,
    ServiceTable,
};
use proxy_common::{PROG_FLOOR, PROG_INGRESS, PROG_STEPS};

#[path = "../../proxy-agent/tests/common/mod.rs"]
mod common;
use common::{
    Fixture,
    cases::{Case, Run, Setup, cases},
};

/// The rows measured by default: a non-service TCP and UDP packet,
/// ClusterIP new flow, established flow, reply, NodePort with SNAT,
/// masqueraded reply, affinity hit.
const DEFAULT_CASES: &str = "clusterip/pass/other-address/ingress,\
clusterip/pass/udp-to-other-address/ingress,\
clusterip/tcp/syn,\
clusterip/tcp/established,\
clusterip/tcp/reply,\
nodeport-masquerade/tcp/syn,\
nodeport-masquerade/tcp/masqueraded-reply,\
affinity/tcp/new-flows-stick";

/// The row whose packets the floor runs, and the non-service rows also
/// measured with a large repeat count.
const FLOOR_PACKETS: &str = "clusterip/tcp/syn";
const REPEATED: [&str; 2] = [
    "clusterip/pass/other-address/ingress",
    "clusterip/pass/udp-to-other-address/ingress",
];

/// The rows broken down step by step (`PROG_STEPS`), each with how many
/// of the steps it takes: an established packet is done at its flow entry,
/// a packet for no Service after parsing and the frontend address check,
/// which at ingress is the real program (at egress, a flow lookup).
const STEPPED: [(&str, usize); 5] = [
    ("clusterip/pass/other-address/ingress", 1),
    ("clusterip/pass/other-address/egress", 1),
    ("clusterip/tcp/established", 3),
    ("clusterip/tcp/syn", 5),
    ("nodeport-masquerade/tcp/syn", 5),
];

#[derive(Parser, Debug)]
#[command(about = "Per-packet cost of the eBPF datapath (BPF_PROG_TEST_RUN)")]
struct Args {
    /// Table sizes (number of services) to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,100000")]
    services: Vec<u32>,
    /// Calls per figure for the repeat=1 measurements.
    #[arg(long, default_value_t = 20_000)]
    calls: u32,
    /// Repeat count for the single-call reference measurements.
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
    /// Backends per filler service.
    #[arg(long, default_value_t = 3)]
    backends: u32,
    /// Rows of the packet-case table to measure, by name, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_CASES)]
    cases: Vec<String>,
    /// List the rows of the packet-case table and exit.
    #[arg(long)]
    list: bool,
    /// Skip the step-by-step breakdown.
    #[arg(long)]
    no_steps: bool,
    /// An earlier build's eBPF object (`target/*/build/proxy-agent-*/out/
    /// proxy-ebpf`, same map layout), measured beside this build's: each
    /// table size gets a "before" and an "after" column.
    #[arg(long)]
    baseline: Option<std::path::PathBuf>,
}

/// `count` ClusterIP services in 10.100.0.0/14 (clear of every address
/// of the cases), each over `backends` backends in 10.128.0.0/10.
fn fillers(count: u32, backends: u32) -> ServiceTable {
    let mut t = ServiceTable::new();
    for i in 0..count {
        let vip = Ipv4Addr::from((10u32 << 24 | 100 << 16) + i);
        t.insert(
            FrontendKey {
                ip: IpAddr::V4(vip),
                port: 80,
                protocol: Protocol::Tcp,
            },
            Frontend {
                service: ServiceName {
                    namespace: "bench".into(),
                    name: format!("svc-{i}").into(),
                },
                port_name: "http".into(),
                kind: FrontendKind::ClusterIp,
                backends: (0..backends)
                    .map(|j| Backend {
                        ip: IpAddr::V4(Ipv4Addr::from((10u32 << 24 | 128 << 16) + i * 8 + j)),
                        port: 8080,
                    })
                    .collect(),
                cluster_backends: Vec::new(),
                policy: FrontendPolicy::default(),
            },
        );
    }
    t
}

fn find<'a>(all: &'a [Case], name: &str) -> Result<&'a Case> {
    all.iter()
        .find(|c| c.name == name)
        .with_context(|| format!("no packet case {name} (see --list)"))
}

/// Mean kernel-measured ns per call of row `case` over `calls` calls,
/// after its `given` rows and one warm-up call; every output checked.
fn measure(f: &Fixture, case: &Case, all: &[Case], calls: u32) -> Result<f64> {
    let fail = |e: String| anyhow!("{}: {e}", case.name);
    let mut run = Run::start(f, case, all).map_err(fail)?;
    run.step(f, 0).map_err(fail)?;
    let mut total = Duration::ZERO;
    for i in 1..=calls {
        total += run.step(f, i).map_err(|e| fail(format!("call {i}: {e}")))?;
    }
    Ok(total.as_nanos() as f64 / f64::from(calls))
}

/// Mean kernel-measured ns per call over `calls` calls on the packets of
/// row `case` (after its `given` rows and one unmeasured warm-up call,
/// as [`measure`]), each call made by `call`, which checks its outcome and
/// gives the time the kernel measured.
fn mean_ns(
    f: &Fixture,
    case: &Case,
    all: &[Case],
    calls: u32,
    call: impl Fn(&[u8]) -> Result<Duration>,
) -> Result<f64> {
    let fail = |e: String| anyhow!("{}: {e}", case.name);
    let mut run = Run::start(f, case, all).map_err(fail)?;
    let mut total = Duration::ZERO;
    for i in 0..=calls {
        let packet = run.packet(f, i).map_err(fail)?;
        let took = call(&packet)?;
        if i > 0 {
            total += took;
        }
    }
    Ok(total.as_nanos() as f64 / f64::from(calls))
}

/// Mean ns per call of `prog`, which must pass row `case`'s packets
/// unchanged: the empty program (the floor), or a variant that stops
/// after a step.
fn measure_unchanged(
    f: &Fixture,
    prog: &str,
    case: &Case,
    all: &[Case],
    calls: u32,
) -> Result<f64> {
    mean_ns(f, case, all, calls, |packet| {
        let (verdict, out, took) = f.run_timed(prog, packet);
        if verdict != 0 || out != packet {
            bail!(
                "{prog} on {}: verdict {verdict}, or the packet changed",
                case.name
            );
        }
        Ok(took)
    })
}

/// Mean ns per call of row `case`'s first hook alone (the real program),
/// its verdict checked.
fn measure_first_hook(f: &Fixture, case: &Case, all: &[Case], calls: u32) -> Result<f64> {
    let stage = case.stages.first().context("a row without hooks")?;
    mean_ns(f, case, all, calls, |packet| {
        let (verdict, _, took) = f.run_timed(stage.hook.prog(), packet);
        if verdict != stage.verdict {
            bail!(
                "{}: verdict {verdict}, expected {}",
                case.name,
                stage.verdict
            );
        }
        Ok(took)
    })
}

/// One measurement of the step-by-step table.
#[derive(Clone, Copy)]
enum StepRun {
    Floor,
    /// `PROG_STEPS[i]`.
    Variant(usize),
    FirstHook,
    EveryHook,
}

/// The rows of the step-by-step table for row `case` taking `steps` steps.
fn step_rows(case: &Case, steps: usize) -> Vec<(String, StepRun)> {
    let mut rows = vec![(
        format!("{}: empty program (floor)", case.name),
        StepRun::Floor,
    )];
    for (i, (_, what)) in PROG_STEPS.iter().enumerate().take(steps) {
        rows.push((format!("{}: {what}", case.name), StepRun::Variant(i)));
    }
    rows.push((
        format!(
            "{}: {} hook, the real program",
            case.name, case.stages[0].hook
        ),
        StepRun::FirstHook,
    ));
    if case.stages.len() > 1 {
        rows.push((
            format!("{}: every hook ({})", case.name, case.stages.len()),
            StepRun::EveryHook,
        ));
    }
    rows
}

/// ns per run from one call of `prog` with a large repeat count, on the
/// packet of row `case` (which must leave it unchanged).
fn repeated_ns(f: &Fixture, prog: &str, case: &Case, all: &[Case], repeat: u32) -> Result<f64> {
    let mut run = Run::start(f, case, all).map_err(|e| anyhow!("{}: {e}", case.name))?;
    let packet = run
        .packet(f, 0)
        .map_err(|e| anyhow!("{}: {e}", case.name))?;
    let mut out = vec![0u8; packet.len() + 128];
    let r = f.program(prog).test_run(TestRunOptions {
        data_in: Some(&packet),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    })?;
    if out[..packet.len()] != *packet {
        bail!("{prog}: a repeated packet was rewritten; this figure would be dishonest");
    }
    Ok(r.duration.as_nanos() as f64)
}

struct Row {
    name: String,
    ns: Vec<f64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let all = cases();
    common::cases::check_table(&all).map_err(|e| anyhow!("the packet-case table: {e}"))?;
    if args.list {
        for case in &all {
            println!("{}", case.name);
        }
        return Ok(());
    }
    let measured: Vec<&Case> = args
        .cases
        .iter()
        .map(|name| find(&all, name))
        .collect::<Result<_>>()?;
    let floor_case = find(&all, FLOOR_PACKETS)?;
    let repeated: Vec<&Case> = REPEATED
        .iter()
        .map(|name| find(&all, name))
        .collect::<Result<_>>()?;
    for case in repeated.iter().chain([&floor_case]) {
        if case.setup != Setup::Web || case.given.len() + case.stages.len() != 1 {
            bail!("{}: not a one-hook row of Setup::Web", case.name);
        }
    }
    // Every setup measured, in order; Web (floor and repeats) first.
    let mut setups = vec![Setup::Web];
    for case in &measured {
        if !setups.contains(&case.setup) {
            setups.push(case.setup);
        }
    }

    let mut rows = vec![Row {
        name: "empty program (floor)".into(),
        ns: vec![],
    }];
    rows.extend(measured.iter().map(|case| Row {
        name: case.name.clone(),
        ns: vec![],
    }));
    rows.push(Row {
        name: "floor, repeat=N".into(),
        ns: vec![],
    });
    rows.extend(repeated.iter().map(|case| Row {
        name: format!("{}, repeat=N", case.name),
        ns: vec![],
    }));
    let repeat_rows = rows.len() - 1 - repeated.len();

    let stepped: Vec<(&Case, usize)> = if args.no_steps {
        vec![]
    } else {
        STEPPED
            .iter()
            .map(|&(name, steps)| Ok((find(&all, name)?, steps)))
            .collect::<Result<_>>()?
    };
    for (case, _) in &stepped {
        if !setups.contains(&case.setup) {
            setups.push(case.setup);
        }
    }
    let mut step_table: Vec<(String, StepRun, &Case, Vec<f64>)> = stepped
        .iter()
        .flat_map(|&(case, steps)| {
            step_rows(case, steps)
                .into_iter()
                .map(move |(name, run)| (name, run, case, vec![]))
        })
        .collect();

    // The objects measured, with their column labels: this build's last.
    let baseline = match &args.baseline {
        Some(path) => {
            Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
        }
        None => None,
    };
    let objects: Vec<(&str, Option<&[u8]>)> = match &baseline {
        Some(object) => vec![("before", Some(object.as_slice())), ("after", None)],
        None => vec![("", None)],
    };
    let mut labels = vec![];
    for &n in &args.services {
        for (label, _) in &objects {
            labels.push(format!("{n} {label}").trim().to_string());
        }
    }

    for &n in &args.services {
        let n = n.max(1);
        let extra = fillers(n - 1, args.backends);
        for &(label, object) in &objects {
            eprintln!(
                "{n} services: each row's own and {} fillers x {} backends ... {label}",
                n - 1,
                args.backends
            );
            let mut column = vec![f64::NAN; rows.len()];
            // The breakdown is of this build (an earlier one may lack it).
            let steps_here = object.is_none() && !stepped.is_empty();
            for &setup in &setups {
                let mut f = Fixture::load_object(object);
                let extra_progs = std::iter::once(PROG_FLOOR).chain(
                    PROG_STEPS
                        .iter()
                        .map(|(name, _)| *name)
                        .filter(|_| steps_here),
                );
                for name in extra_progs {
                    let prog: &mut SchedClassifier = f
                        .ebpf
                        .program_mut(name)
                        .with_context(|| format!("program {name}"))?
                        .try_into()?;
                    prog.load().with_context(|| format!("loading {name}"))?;
                }
                let started = std::time::Instant::now();
                setup.apply(&mut f, &extra);
                eprintln!("  {setup:?} programmed in {:.2?}", started.elapsed());
                if setup == Setup::Web {
                    column[0] = measure_unchanged(&f, PROG_FLOOR, floor_case, &all, args.calls)?;
                    column[repeat_rows] =
                        repeated_ns(&f, PROG_FLOOR, floor_case, &all, args.repeat)?;
                    for (i, case) in repeated.iter().enumerate() {
                        column[repeat_rows + 1 + i] =
                            repeated_ns(&f, PROG_INGRESS, case, &all, args.repeat)?;
                    }
                }
                for (i, case) in measured.iter().enumerate() {
                    if case.setup == setup {
                        // Rows of one setup share its object; each starts
                        // without flows, as in the tests.
                        f.forget_flows();
                        column[1 + i] = measure(&f, case, &all, args.calls)?;
                    }
                }
                for (_, run, case, ns) in step_table.iter_mut() {
                    if case.setup != setup || !steps_here {
                        continue;
                    }
                    f.forget_flows();
                    let v = match *run {
                        StepRun::Floor => {
                            measure_unchanged(&f, PROG_FLOOR, case, &all, args.calls)?
                        }
                        StepRun::Variant(i) => {
                            measure_unchanged(&f, PROG_STEPS[i].0, case, &all, args.calls)?
                        }
                        StepRun::FirstHook => measure_first_hook(&f, case, &all, args.calls)?,
                        StepRun::EveryHook => measure(&f, case, &all, args.calls)?,
                    };
                    ns.push(v);
                }
            }
            for (row, v) in rows.iter_mut().zip(column) {
                row.ns.push(v);
            }
        }
    }

    let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0) + 2;
    println!();
    println!("Per-packet cost of the TC programs (ns, kernel-measured by BPF_PROG_TEST_RUN),");
    println!(
        "rows of the packet-case table by name; in brackets: the ratio to the floor of the same column."
    );
    print!("{:<width$}", "case \\ services loaded");
    for label in &labels {
        print!("{label:>20}");
    }
    println!();
    for (r, row) in rows.iter().enumerate() {
        print!("{:<width$}", row.name);
        for (i, v) in row.ns.iter().enumerate() {
            let floor = if r >= repeat_rows {
                rows[repeat_rows].ns[i]
            } else {
                rows[0].ns[i]
            };
            print!("{:>20}", format!("{v:.1} ({:.2}x)", v / floor));
        }
        println!();
    }
    println!();
    println!(
        "How: each case runs on its own setup (the table and node network its test uses) with"
    );
    println!(
        "filler ClusterIP services ({} backends each) making up the table size; its given",
        args.backends
    );
    println!(
        "rows and one warm-up call run first; then {} calls with repeat=1, each from",
        args.calls
    );
    println!("freshly built bytes, every output checked against the case's expectations.");
    println!("New-flow cases (clusterip/tcp/syn, nodeport-masquerade/tcp/syn) send each call");
    println!("from a new source port (and address every 60000 calls), so each call misses the");
    println!("connection table; the affinity case from a new port of a client that has an");
    println!("affinity entry; the others re-send one flow's packet (established: its ACK; reply:");
    println!("its backend's SYN-ACK to egress). Two-hook cases add an ingress and an egress run");
    println!("(NodePort: DNAT then SNAT; masqueraded reply: un-SNAT then reverse NAT). The floor");
    println!("runs the empty program on clusterip/tcp/syn's packets. The repeat=N rows use one");
    println!(
        "call with repeat={} on packets the program leaves unchanged (verified).",
        args.repeat
    );
    if !step_table.is_empty() {
        print_steps(&args.services, &step_table);
    }
    Ok(())
}

/// The step-by-step table: each step's cumulative cost, and in brackets
/// what it adds to the step before.
fn print_steps(services: &[u32], table: &[(String, StepRun, &Case, Vec<f64>)]) {
    let width = table.iter().map(|r| r.0.len()).max().unwrap_or(0) + 2;
    println!();
    println!("Step by step (ns per call, repeat=1, measured as the rows above): each variant");
    println!("runs the ingress program's own code up to a step and passes the packet unchanged;");
    println!("in brackets, what the row adds to the row above it.");
    print!("{:<width$}", "row: step \\ services loaded");
    for n in services {
        print!("{:>18}", n);
    }
    println!();
    for (r, (name, _, _, ns)) in table.iter().enumerate() {
        print!("{name:<width$}");
        for (i, v) in ns.iter().enumerate() {
            let above = if r > 0 && !matches!(table[r].1, StepRun::Floor) {
                table[r - 1].3.get(i).copied()
            } else {
                None
            };
            match above {
                Some(a) => print!("{:>18}", format!("{v:.0} ({:+.0})", v - a)),
                None => print!("{:>18}", format!("{v:.0}")),
            }
        }
        println!();
    }
}
