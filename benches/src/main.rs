//! Per-packet cost of the TC programs, measured in the kernel through
//! `BPF_PROG_TEST_RUN`, for each datapath path and several table sizes,
//! side by side with the empty-program floor of the same harness.
//!
//! How each figure is obtained (also printed with the results):
//! - A program that rewrites a packet changes what a later repeat of the
//!   same test run would see, so the translated paths (new flow,
//!   established flow, reply) are measured with `repeat = 1` over many
//!   calls, each from the original bytes, and the kernel-reported durations
//!   are averaged. The floor and the non-service path are measured the same
//!   way, so every row carries the same timer overhead.
//! - "new flow" uses a distinct source port on every call, so every call
//!   misses the connection table and creates its entries.
//! - "established" sends the same packet of one already-created flow.
//! - "reply" sends the backend's reply of an established flow to egress.
//! - "NodePort new flow + SNAT" sends a SYN from an external client to a
//!   node address through ingress (DNAT, port allocation, four entries),
//!   then its output through egress (SNAT); the two durations are added.
//! - "masqueraded reply" sends the backend's reply to the node address and
//!   port through ingress (un-SNAT), then its output through egress
//!   (reverse NAT), added likewise.
//! - "affinity hit" is a new flow (new source port) of a client that
//!   already has an affinity entry for a ClientIP service.
//! - The non-service path and the floor leave the packet unchanged, so they
//!   are also measured with one call of a large repeat count, for reference.
use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use clap::Parser;
use etherparse::PacketBuilder;
use proxy_agent::{
    dataplane::{Dataplane, NodeNetwork, ebpf::load_unpinned},
    model::{
        Backend, Frontend, FrontendKey, FrontendKind, FrontendPolicy, Protocol, ServiceName,
        ServiceTable,
    },
};
use proxy_common::{PROG_EGRESS, PROG_FLOOR, PROG_INGRESS};

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
    /// Backends per service.
    #[arg(long, default_value_t = 3)]
    backends: u32,
}

/// A pod client (inside [`CLUSTER_CIDR`]): ClusterIP flows are not
/// masqueraded.
const CLIENT: [u8; 4] = [10, 0, 0, 7];
/// The cluster CIDR of the bench's node network.
const CLUSTER_CIDR: &str = "10.0.0.0/8";
/// The node's address: NodePorts and masquerade.
const NODE: [u8; 4] = [192, 0, 2, 10];
/// A client outside the cluster, for NodePorts.
const EXTERNAL: [u8; 4] = [203, 0, 113, 7];
const NODE_PORT: u16 = 30080;

fn vip(i: u32) -> [u8; 4] {
    // 10.96.0.0/12 holds a million services.
    let n = (10u32 << 24 | 96 << 16) + i;
    n.to_be_bytes()
}

fn backend_ip(service: u32, j: u32) -> [u8; 4] {
    let n = (10u32 << 24 | 128 << 16) + (service * 8 + j);
    n.to_be_bytes()
}

fn table(services: u32, backends: u32) -> ServiceTable {
    let mut t = ServiceTable::new();
    for i in 0..services {
        t.insert(
            FrontendKey {
                ip: IpAddr::V4(Ipv4Addr::from(vip(i))),
                port: 80,
                protocol: Protocol::Tcp,
            },
            Frontend {
                service: ServiceName {
                    namespace: "bench".into(),
                    name: format!("svc-{i}"),
                },
                port_name: "http".into(),
                kind: FrontendKind::ClusterIp,
                backends: (0..backends)
                    .map(|j| Backend {
                        ip: IpAddr::V4(Ipv4Addr::from(backend_ip(i, j))),
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

/// A NodePort and a ClientIP-affinity ClusterIP (VIP `vip(services)`) over
/// the backends of the last service.
fn extra_frontends(table: &mut ServiceTable, services: u32, backends: u32) {
    let last = services - 1;
    let frontend = |kind: FrontendKind, policy: FrontendPolicy| Frontend {
        service: ServiceName {
            namespace: "bench".into(),
            name: format!("svc-{last}"),
        },
        port_name: "http".into(),
        kind,
        backends: (0..backends)
            .map(|j| Backend {
                ip: IpAddr::V4(Ipv4Addr::from(backend_ip(last, j))),
                port: 8080,
            })
            .collect(),
        cluster_backends: Vec::new(),
        policy,
    };
    table.insert(
        FrontendKey {
            ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: NODE_PORT,
            protocol: Protocol::Tcp,
        },
        frontend(FrontendKind::NodePort, FrontendPolicy::default()),
    );
    table.insert(
        FrontendKey {
            ip: IpAddr::V4(Ipv4Addr::from(vip(services))),
            port: 80,
            protocol: Protocol::Tcp,
        },
        frontend(
            FrontendKind::ClusterIp,
            FrontendPolicy {
                affinity_timeout_secs: Some(10_800),
                ..FrontendPolicy::default()
            },
        ),
    );
}

fn node_network() -> Result<NodeNetwork> {
    Ok(NodeNetwork {
        nodeport_addresses: [IpAddr::V4(Ipv4Addr::from(NODE))].into(),
        snat_v4: Some(Ipv4Addr::from(NODE)),
        snat_v6: None,
        cluster_cidrs: vec![CLUSTER_CIDR.parse()?],
        masquerade_all: false,
    })
}

fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, syn: bool) -> Result<Vec<u8>> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let mut out = Vec::with_capacity(b.size(0));
    b.write(&mut out, &[]).context("build packet")?;
    Ok(out)
}

fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Result<Vec<u8>> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .udp(sport, dport);
    let payload = b"query";
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).context("build packet")?;
    Ok(out)
}

struct Harness {
    ebpf: Ebpf,
}

impl Harness {
    fn prog(&self, name: &str) -> Result<&SchedClassifier> {
        Ok(self
            .ebpf
            .program(name)
            .with_context(|| format!("program {name}"))?
            .try_into()?)
    }

    /// Runs `packet` once through `prog`; returns (verdict, output, ns).
    fn once(&self, prog: &str, packet: &[u8]) -> Result<(u32, Vec<u8>, u128)> {
        let mut out = vec![0u8; packet.len() + 128];
        let r = self.prog(prog)?.test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            ..Default::default()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok((r.return_value, out, r.duration.as_nanos()))
    }

    /// Mean kernel-measured ns over `calls` single runs of packets from `make`.
    fn mean_ns(
        &self,
        prog: &str,
        calls: u32,
        mut make: impl FnMut(u32) -> Result<Vec<u8>>,
        mut check: impl FnMut(&[u8], &[u8]) -> Result<()>,
    ) -> Result<f64> {
        let mut total: u128 = 0;
        for i in 0..calls {
            let packet = make(i)?;
            let (verdict, out, ns) = self.once(prog, &packet)?;
            if verdict != 0 {
                bail!("{prog}: unexpected verdict {verdict}");
            }
            check(&packet, &out)?;
            total += ns;
        }
        Ok(total as f64 / calls as f64)
    }

    /// Mean kernel-measured ns over `calls` packets from `make`, each run
    /// through `first` and its output through `second`; the two durations
    /// are added. `check` sees the final output.
    fn mean_two_stage_ns(
        &self,
        (first, second): (&str, &str),
        calls: u32,
        mut make: impl FnMut(u32) -> Result<Vec<u8>>,
        mut check: impl FnMut(&[u8]) -> Result<()>,
    ) -> Result<f64> {
        let mut total: u128 = 0;
        for i in 0..calls {
            let packet = make(i)?;
            let (verdict, mid, ns1) = self.once(first, &packet)?;
            if verdict != 0 {
                bail!("{first}: unexpected verdict {verdict}");
            }
            let (verdict, out, ns2) = self.once(second, &mid)?;
            if verdict != 0 {
                bail!("{second}: unexpected verdict {verdict}");
            }
            check(&out)?;
            total += ns1 + ns2;
        }
        Ok(total as f64 / calls as f64)
    }

    /// ns per run from one call with a large repeat count (unchanged packets only).
    fn repeated_ns(&self, prog: &str, packet: &[u8], repeat: u32) -> Result<f64> {
        let mut out = vec![0u8; packet.len() + 128];
        let r = self.prog(prog)?.test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        })?;
        if out[..packet.len()] != *packet {
            bail!("{prog}: a repeated packet was rewritten; this figure would be dishonest");
        }
        Ok(r.duration.as_nanos() as f64)
    }
}

fn dst_of(p: &[u8]) -> [u8; 4] {
    [p[30], p[31], p[32], p[33]]
}
fn src_of(p: &[u8]) -> [u8; 4] {
    [p[26], p[27], p[28], p[29]]
}
fn sport_of(p: &[u8]) -> u16 {
    u16::from_be_bytes([p[34], p[35]])
}
fn dport_of(p: &[u8]) -> u16 {
    u16::from_be_bytes([p[36], p[37]])
}

struct Row {
    name: &'static str,
    ns: Vec<f64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut rows = vec![
        Row {
            name: "empty program (floor)",
            ns: vec![],
        },
        Row {
            name: "non-service packet",
            ns: vec![],
        },
        Row {
            name: "non-service UDP packet",
            ns: vec![],
        },
        Row {
            name: "ClusterIP new flow (SYN)",
            ns: vec![],
        },
        Row {
            name: "ClusterIP established flow",
            ns: vec![],
        },
        Row {
            name: "reply (reverse NAT, egress)",
            ns: vec![],
        },
        Row {
            name: "NodePort new flow + SNAT",
            ns: vec![],
        },
        Row {
            name: "masqueraded reply (2 stages)",
            ns: vec![],
        },
        Row {
            name: "ClusterIP new flow, affinity hit",
            ns: vec![],
        },
        Row {
            name: "floor, repeat=N",
            ns: vec![],
        },
        Row {
            name: "non-service, repeat=N",
            ns: vec![],
        },
        Row {
            name: "non-service UDP, repeat=N",
            ns: vec![],
        },
    ];
    for &n in &args.services {
        eprintln!("loading {n} services x {} backends ...", args.backends);
        let (mut dp, mut ebpf) = load_unpinned().context("load the eBPF object (root needed)")?;
        {
            let floor: &mut SchedClassifier = ebpf
                .program_mut(PROG_FLOOR)
                .context("floor program")?
                .try_into()?;
            floor.load()?;
        }
        let mut desired = table(n, args.backends);
        extra_frontends(&mut desired, n, args.backends);
        dp.set_node_network(&node_network()?)
            .context("program the node network")?;
        let started = std::time::Instant::now();
        dp.apply(&ServiceTable::new().diff(&desired))
            .context("program the table")?;
        eprintln!("  programmed in {:.2?}", started.elapsed());
        let h = Harness { ebpf };
        // Target the last service: in a hash map position does not matter,
        // but this keeps the probe away from the first insert.
        let target = vip(n - 1);
        let other = [192, 0, 2, 1];

        let unchanged = |inp: &[u8], out: &[u8]| -> Result<()> {
            if inp != out {
                bail!("packet changed");
            }
            Ok(())
        };
        let floor = h.mean_ns(
            PROG_FLOOR,
            args.calls,
            |i| tcp(CLIENT, (i % 60000) as u16 + 1024, target, 80, true),
            unchanged,
        )?;
        let pass = h.mean_ns(
            PROG_INGRESS,
            args.calls,
            |i| tcp(CLIENT, (i % 60000) as u16 + 1024, other, 80, true),
            unchanged,
        )?;
        // UDP also looks for a flow whose client now reaches the backend
        // directly from the same port (one connection-table miss).
        let pass_udp = h.mean_ns(
            PROG_INGRESS,
            args.calls,
            |i| udp(CLIENT, (i % 60000) as u16 + 1024, other, 53),
            unchanged,
        )?;
        let backends: Vec<[u8; 4]> = (0..args.backends).map(|j| backend_ip(n - 1, j)).collect();
        let mut sport_base: u32 = 0;
        let new_flow = h.mean_ns(
            PROG_INGRESS,
            args.calls,
            |i| {
                // A fresh client address every 60000 ports keeps every tuple new.
                sport_base = i / 60000;
                let client = [10, 1, (sport_base >> 8) as u8, sport_base as u8];
                tcp(client, (i % 60000) as u16 + 1024, target, 80, true)
            },
            |_, out| {
                if !backends.contains(&dst_of(out)) {
                    bail!("new flow not DNATed");
                }
                Ok(())
            },
        )?;
        // One established flow.
        let syn = tcp(CLIENT, 999, target, 80, true)?;
        let (_, out, _) = h.once(PROG_INGRESS, &syn)?;
        let chosen = dst_of(&out);
        let established = h.mean_ns(
            PROG_INGRESS,
            args.calls,
            |_| tcp(CLIENT, 999, target, 80, false),
            |_, out| {
                if dst_of(out) != chosen {
                    bail!("established flow moved");
                }
                Ok(())
            },
        )?;
        let reply = h.mean_ns(
            PROG_EGRESS,
            args.calls,
            |_| tcp(chosen, 8080, CLIENT, 999, false),
            |_, out| {
                if src_of(out) != target {
                    bail!("reply not reverse-NATed");
                }
                Ok(())
            },
        )?;
        // NodePort from an external client: DNAT at ingress, SNAT at egress.
        let nodeport = h.mean_two_stage_ns(
            (PROG_INGRESS, PROG_EGRESS),
            args.calls,
            |i| {
                let client = [203, 0, 113, (i / 60000) as u8];
                tcp(client, (i % 60000) as u16 + 1024, NODE, NODE_PORT, true)
            },
            |out| {
                if src_of(out) != NODE || !backends.contains(&dst_of(out)) {
                    bail!("NodePort flow not DNATed and SNATed");
                }
                Ok(())
            },
        )?;
        // One masqueraded flow, and its backend's replies.
        let syn = tcp(EXTERNAL, 4242, NODE, NODE_PORT, true)?;
        let (_, mid, _) = h.once(PROG_INGRESS, &syn)?;
        let (_, out, _) = h.once(PROG_EGRESS, &mid)?;
        let (np_backend, snat_port) = (dst_of(&out), sport_of(&out));
        let masq_reply = h.mean_two_stage_ns(
            (PROG_INGRESS, PROG_EGRESS),
            args.calls,
            |_| tcp(np_backend, 8080, NODE, snat_port, false),
            |out| {
                if (src_of(out), dst_of(out), dport_of(out)) != (NODE, EXTERNAL, 4242) {
                    bail!("masqueraded reply not translated back");
                }
                Ok(())
            },
        )?;
        // Affinity: the first SYN sets the entry; every later new flow of
        // the same client hits it.
        let affinity_vip = vip(n);
        let (_, first, _) = h.once(PROG_INGRESS, &tcp(CLIENT, 1, affinity_vip, 80, true)?)?;
        let sticky = dst_of(&first);
        let affinity_hit = h.mean_ns(
            PROG_INGRESS,
            args.calls,
            |i| tcp(CLIENT, (i % 60000) as u16 + 2, affinity_vip, 80, true),
            |_, out| {
                if dst_of(out) != sticky {
                    bail!("affinity not followed");
                }
                Ok(())
            },
        )?;
        let floor_rep =
            h.repeated_ns(PROG_FLOOR, &tcp(CLIENT, 1, target, 80, true)?, args.repeat)?;
        let pass_rep =
            h.repeated_ns(PROG_INGRESS, &tcp(CLIENT, 1, other, 80, true)?, args.repeat)?;
        let pass_udp_rep = h.repeated_ns(PROG_INGRESS, &udp(CLIENT, 1, other, 53)?, args.repeat)?;
        for (row, v) in rows.iter_mut().zip([
            floor,
            pass,
            pass_udp,
            new_flow,
            established,
            reply,
            nodeport,
            masq_reply,
            affinity_hit,
            floor_rep,
            pass_rep,
            pass_udp_rep,
        ]) {
            row.ns.push(v);
        }
    }

    println!();
    println!("Per-packet cost of the TC programs (ns, kernel-measured by BPF_PROG_TEST_RUN),");
    println!(
        "{} backends per service; in brackets: the ratio to the floor of the same column.",
        args.backends
    );
    print!("{:<32}", "path \\ services loaded");
    for n in &args.services {
        print!("{:>20}", n);
    }
    println!();
    let floor_of = |name: &str| rows.iter().position(|r| r.name == name).unwrap_or(0);
    let (floor_once, floor_repeated) = (
        floor_of("empty program (floor)"),
        floor_of("floor, repeat=N"),
    );
    for row in &rows {
        print!("{:<32}", row.name);
        for (i, v) in row.ns.iter().enumerate() {
            let floor = if row.name.contains("repeat") {
                rows[floor_repeated].ns[i]
            } else {
                rows[floor_once].ns[i]
            };
            print!("{:>20}", format!("{v:.1} ({:.2}x)", v / floor));
        }
        println!();
    }
    println!();
    println!(
        "How: rows 1-9 are means over {} calls with repeat=1, each call from the",
        args.calls
    );
    println!("original bytes (a rewritten packet must not be re-fed); 'new flow' uses a new");
    println!("source port (and address every 60000 ports) per call, so each call misses the");
    println!("connection table; 'established' re-sends one flow's ACK; 'reply' sends its");
    println!("backend's reply to egress; the two-stage rows add an ingress and an egress run");
    println!("(NodePort: DNAT then SNAT; masqueraded reply: un-SNAT then reverse NAT), and");
    println!("'affinity hit' is a new flow of a client with an affinity entry. Rows 10-12");
    println!("use one call with repeat={} on", args.repeat);
    println!("packets the program leaves unchanged (verified).");
    Ok(())
}
