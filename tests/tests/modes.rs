//! Switching dataplane modes on one node: each agent start removes what the
//! other modes left, and the iptables mode what it wrote through the other
//! iptables backend (an agent stopped without cleanup keeps serving with its
//! last table, so two dataplanes would otherwise translate the same
//! packets); `--cleanup-kube-proxy` also removes a kube-proxy's tables, and
//! `proxy-agent cleanup` removes everything of every mode.
//!
//! The ipvs mode takes part where the kernel has IPVS (the VM stage of
//! `cargo xtask test`).
//!
//! Needs root; without it the test prints why and passes.
use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, ensure};
use proxy_tests::{
    ipvs_available,
    netns::{
        Agent, AgentConfig, BpfFs, IpFamily, ManifestsDir, POD_SESSION_PORT, POD_TCP_PORT,
        Protocol, ServiceSpec, ToolPaths, Topology, agent_binary, exec_in, in_netns, start_timeout,
    },
    poll_until, serial, skipped,
};

const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 20));

/// What each mode left in the node namespace.
#[derive(Debug, PartialEq, Eq)]
struct Leftovers {
    nftables_tables: usize,
    kube_proxy_tables: usize,
    iptables_chains: usize,
    /// iptables-nft's own tables (`ip`/`ip6` `nat`, `filter`, `mangle`),
    /// which keep netfilter's NAT and conntrack hooked even when empty.
    iptables_nft_tables: usize,
    iptables_legacy_chains: usize,
    ebpf_pins: usize,
    /// The ipvs mode's table, `kube-ipvs0`, and IPVS virtual servers.
    ipvs: usize,
}

fn leftovers(t: &Topology, bpffs: &BpfFs) -> anyhow::Result<Leftovers> {
    let tables = exec_in(t.node_ns(), "nft", &["list", "tables"])?;
    let nat = exec_in(t.node_ns(), "iptables-nft-save", &["-t", "nat"])?;
    let legacy = exec_in(t.node_ns(), "iptables-legacy-save", &["-t", "nat"])?;
    let maps = bpffs.agent_root().join("maps");
    let ebpf_pins = match std::fs::read_dir(&maps) {
        Ok(entries) => entries.count(),
        Err(_) => 0,
    };
    let ipvs = if ipvs_available() {
        let servers = exec_in(t.node_ns(), "cat", &["/proc/net/ip_vs"])?;
        let links = exec_in(t.node_ns(), "ip", &["-o", "link", "show"])?;
        servers
            .lines()
            .filter(|l| ["TCP ", "UDP ", "SCTP "].iter().any(|p| l.starts_with(p)))
            .count()
            + links.matches(" kube-ipvs0:").count()
            + tables.matches("table inet proxy-agent-ipvs").count()
    } else {
        0
    };
    Ok(Leftovers {
        nftables_tables: tables.matches("table inet proxy-agent-").count()
            - tables.matches("table inet proxy-agent-ipvs").count(),
        kube_proxy_tables: tables.matches(" kube-proxy").count(),
        iptables_chains: nat.lines().filter(|l| l.starts_with(":KUBE-")).count(),
        iptables_nft_tables: tables
            .lines()
            .filter(|l| {
                ["ip", "ip6"].iter().any(|family| {
                    ["nat", "filter", "mangle"]
                        .iter()
                        .any(|table| l.trim() == format!("table {family} {table}"))
                })
            })
            .count(),
        iptables_legacy_chains: legacy.lines().filter(|l| l.starts_with(":KUBE-")).count(),
        ebpf_pins,
        ipvs,
    })
}

#[test]
fn switching_modes_removes_the_previous_modes_state_and_cleanup_removes_all() {
    let _serial = serial();
    if skipped("switching_modes_removes_the_previous_modes_state_and_cleanup_removes_all") {
        return;
    }
    if let Err(e) = switch_modes() {
        panic!("{e:?}");
    }
}

/// A node with `pods` pods, a bpffs, and manifests of `service` on every
/// pod.
fn node_serving(
    pods: usize,
    service: &ServiceSpec,
) -> anyhow::Result<(Topology, BpfFs, ManifestsDir)> {
    let t = Topology::builder()
        .backends(pods)
        .tools(ToolPaths::built(
            env!("CARGO_BIN_EXE_pod-server"),
            env!("CARGO_BIN_EXE_pod-client"),
        ))
        .build()?;
    let bpffs = BpfFs::mount()?;
    let mut manifests = ManifestsDir::new()?;
    manifests.write_own_node(&t.node_spec())?;
    manifests.write_service(service)?;
    let all: Vec<usize> = (0..pods).collect();
    manifests.write_endpoint_slices(service, &t.slice_endpoints(IpFamily::V4, &all, &[]))?;
    Ok((t, bpffs, manifests))
}

fn switch_modes() -> anyhow::Result<()> {
    let binary = agent_binary()?;
    let service = ServiceSpec::cluster_ip("default", "echo", VIP).tcp(80, POD_TCP_PORT);
    let (t, bpffs, manifests) = node_serving(1, &service)?;
    // A kube-proxy in nftables mode was here before.
    exec_in(t.node_ns(), "nft", &["add", "table", "ip", "kube-proxy"])?;
    exec_in(t.node_ns(), "nft", &["add", "table", "ip6", "kube-proxy"])?;

    let target = SocketAddr::new(VIP, 80);
    let mut kube_proxy_tables = 2;
    let mut steps = vec![
        ("nftables", &[][..]),
        (
            "iptables",
            &["--iptables-backend=nft", "--cleanup-kube-proxy"][..],
        ),
        ("iptables", &["--iptables-backend=legacy"][..]),
        ("ebpf", &[][..]),
        ("nftables", &[][..]),
    ];
    if ipvs_available() {
        // From every other kind of state: iptables-legacy chains before,
        // the ebpf mode's pins after.
        steps.insert(3, ("ipvs", &[][..]));
    } else {
        eprintln!(
            "switching modes: the ipvs step skipped: this kernel has no IPVS (the VM runs it)"
        );
    }
    for (mode, extra) in steps {
        if extra.contains(&"--cleanup-kube-proxy") {
            kube_proxy_tables = 0;
        }
        let legacy = extra.contains(&"--iptables-backend=legacy");
        let mut agent = Agent::start(AgentConfig {
            mode: mode.to_string(),
            extra_args: extra.iter().map(|a| a.to_string()).collect(),
            ..t.start_agent_config(&binary, &bpffs, &manifests)
        })?;
        t.wait_reachable(&mut agent, Protocol::Tcp, target, start_timeout())
            .with_context(|| format!("{mode}: agent log:\n{}", agent.log()))?;
        // The previous mode still serves while this agent starts: wait
        // until only this mode's state is left.
        let expected = |found: &Leftovers| {
            (found.nftables_tables > 0) == (mode == "nftables")
                && (found.iptables_chains > 0) == (mode == "iptables" && !legacy)
                && (found.iptables_legacy_chains > 0) == (mode == "iptables" && legacy)
                && (found.iptables_nft_tables == 0 || (mode == "iptables" && !legacy))
                && (found.ebpf_pins > 0) == (mode == "ebpf")
                && (found.ipvs > 0) == (mode == "ipvs")
                && found.kube_proxy_tables == kube_proxy_tables
        };
        let mut last = None;
        let settled = poll_until(start_timeout(), Duration::from_millis(100), || {
            let found = leftovers(&t, &bpffs)?;
            let done = expected(&found);
            last = Some(found);
            Ok(done.then_some(()))
        });
        ensure!(
            settled.is_ok(),
            "{mode}: other modes' state left: {last:?}\nagent log:\n{}",
            agent.log()
        );
        t.wait_reachable(&mut agent, Protocol::Tcp, target, start_timeout())
            .with_context(|| format!("{mode} after the switch: agent log:\n{}", agent.log()))?;
        // Stopped without cleanup: its dataplane keeps serving, as after a
        // crash, for the next mode to find.
        agent.stop_keeping_pins()?;
    }
    let root = bpffs.agent_root().display().to_string();
    exec_in(
        t.node_ns(),
        &binary,
        &["cleanup", "--bpf-root", root.as_str()],
    )?;
    let found = leftovers(&t, &bpffs)?;
    ensure!(
        found
            == Leftovers {
                nftables_tables: 0,
                kube_proxy_tables: 0,
                iptables_chains: 0,
                iptables_nft_tables: 0,
                iptables_legacy_chains: 0,
                ebpf_pins: 0,
                ipvs: 0,
            },
        "after cleanup: {found:?}"
    );
    Ok(())
}

/// What a mode switch cost the traffic through it.
#[derive(Debug, Default)]
struct SwitchCost {
    /// New connections tried during the switch, and those that failed.
    tried: u64,
    failed: u64,
    /// The connections opened before the switch that still answered
    /// after it.
    established_kept: usize,
}

/// New connections to `target` from namespace `ns`, one after another,
/// each answered or not within a second, until `stop` is set.
fn probe_until(
    ns: &str,
    target: SocketAddr,
    stop: &std::sync::atomic::AtomicBool,
) -> anyhow::Result<(u64, u64)> {
    in_netns(ns, || {
        let (mut tried, mut failed) = (0u64, 0u64);
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            tried += 1;
            let answered = TcpStream::connect_timeout(&target, Duration::from_secs(1))
                .and_then(|mut stream| {
                    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
                    // The answer's first bytes; the client closes first,
                    // as the server waits for it to.
                    let mut answer = [0u8; 4];
                    stream.read_exact(&mut answer)?;
                    Ok(&answer == b"pod-")
                })
                .unwrap_or(false);
            if !answered {
                failed += 1;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (tried, failed)
    })
}

/// One request on a session connection: whether its backend answered.
fn ask(stream: &mut TcpStream) -> bool {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    if stream.write_all(b"again\n").is_err() {
        return false;
    }
    while !line.ends_with(b"\n") && line.len() < 256 {
        match stream.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            _ => return false,
        }
    }
    line.starts_with(b"pod-")
}

/// Switching modes under traffic: TCP connections opened through a
/// ClusterIP before the switch go on after it (the old mode's state stays
/// for them, and goes once they end), and new connections made one after
/// another during the switch all succeed (the new mode serves before the
/// old one's state goes). Every ordered pair of ebpf, nftables and
/// iptables; the ipvs mode's pairs with ebpf where the kernel has IPVS.
#[test]
fn mode_switches_keep_established_connections_and_lose_no_new_ones() {
    let _serial = serial();
    if skipped("mode_switches_keep_established_connections_and_lose_no_new_ones") {
        return;
    }
    if let Err(e) = switch_under_traffic() {
        panic!("{e:?}");
    }
}

fn switch_under_traffic() -> anyhow::Result<()> {
    const SESSION_PORT: u16 = 81;
    const SESSIONS: usize = 8;
    let binary = agent_binary()?;
    // Two backends: a connection a new mode took over without its state
    // would most likely be sent to the other one, which resets it.
    let service = ServiceSpec::cluster_ip("default", "echo", VIP)
        .tcp(80, POD_TCP_PORT)
        .tcp(SESSION_PORT, POD_SESSION_PORT);
    let (t, bpffs, manifests) = node_serving(2, &service)?;
    let target = SocketAddr::new(VIP, 80);
    let session_target = SocketAddr::new(VIP, SESSION_PORT);
    let mut modes = vec![
        "nftables", "ebpf", "iptables", "ebpf", "nftables", "iptables", "nftables",
    ];
    if ipvs_available() {
        modes.extend(["ebpf", "ipvs", "ebpf"]);
    }
    let start = |mode: &str| -> anyhow::Result<Agent> {
        let mut agent = Agent::start(AgentConfig {
            mode: mode.to_string(),
            extra_args: vec!["--iptables-backend=nft".to_string()],
            ..t.start_agent_config(&binary, &bpffs, &manifests)
        })?;
        t.wait_reachable(&mut agent, Protocol::Tcp, target, start_timeout())
            .with_context(|| format!("{mode}: agent log:\n{}", agent.log()))?;
        Ok(agent)
    };
    let mut agent = start(modes[0])?;
    let mut costs = Vec::new();
    for pair in modes.windows(2) {
        let (from, to) = (pair[0], pair[1]);
        let mut sessions = Vec::new();
        for _ in 0..SESSIONS {
            let mut session = in_netns(t.client_ns(), || {
                TcpStream::connect_timeout(&session_target, Duration::from_secs(2))
            })??;
            session.set_read_timeout(Some(Duration::from_secs(2)))?;
            ensure!(ask(&mut session), "{from}: a session does not answer");
            sessions.push(session);
        }
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (cost, next) = std::thread::scope(|scope| -> anyhow::Result<_> {
            let probes = scope.spawn(|| probe_until(t.client_ns(), target, &stop));
            std::thread::sleep(Duration::from_millis(300));
            // As a DaemonSet's rolling update: the old agent goes (its
            // dataplane keeps serving), then the new one starts.
            agent.stop_keeping_pins()?;
            let next = start(to);
            // Traffic on for a while after the new mode serves.
            std::thread::sleep(Duration::from_secs(2));
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            let (tried, failed) = probes
                .join()
                .map_err(|_| anyhow::anyhow!("the probe thread panicked"))??;
            let next = next?;
            let established_kept = sessions.iter_mut().map(ask).filter(|kept| *kept).count();
            Ok((
                SwitchCost {
                    tried,
                    failed,
                    established_kept,
                },
                next,
            ))
        })?;
        agent = next;
        eprintln!(
            "mode switch {from} -> {to}: {} of {} new connections failed; {} of {SESSIONS} \
             established connections went on",
            cost.failed, cost.tried, cost.established_kept
        );
        // The sessions end; the old mode's state goes with them.
        drop(sessions);
        let only_mine = |found: &Leftovers| {
            (found.nftables_tables > 0) == (to == "nftables")
                && (found.iptables_chains > 0) == (to == "iptables")
                && (found.ebpf_pins > 0) == (to == "ebpf")
                && (found.ipvs > 0) == (to == "ipvs")
        };
        let mut last = None;
        let settled = poll_until(start_timeout(), Duration::from_millis(200), || {
            let found = leftovers(&t, &bpffs)?;
            let done = only_mine(&found);
            last = Some(found);
            Ok(done.then_some(()))
        });
        ensure!(
            settled.is_ok(),
            "{from} -> {to}: the old mode's state stayed after its last connection ended: \
             {last:?}\nagent log:\n{}",
            agent.log()
        );
        costs.push((from, to, cost));
    }
    let lossy: Vec<_> = costs
        .iter()
        .filter(|(_, _, c)| c.failed > 0 || c.established_kept < SESSIONS)
        .collect();
    ensure!(
        lossy.is_empty(),
        "mode switches that lost connections: {lossy:?}"
    );
    Ok(())
}
