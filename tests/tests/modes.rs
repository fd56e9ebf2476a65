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
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context, ensure};
use proxy_tests::{
    ipvs_available,
    netns::{
        Agent, AgentConfig, BpfFs, IpFamily, ManifestsDir, POD_TCP_PORT, Protocol, ServiceSpec,
        ToolPaths, Topology, agent_binary, exec_in, start_timeout,
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

fn switch_modes() -> anyhow::Result<()> {
    let binary = agent_binary()?;
    let t = Topology::builder()
        .backends(1)
        .tools(ToolPaths::built(
            env!("CARGO_BIN_EXE_pod-server"),
            env!("CARGO_BIN_EXE_pod-client"),
        ))
        .build()?;
    let bpffs = BpfFs::mount()?;
    let mut manifests = ManifestsDir::new()?;
    manifests.write_own_node(&t.node_spec())?;
    let service = ServiceSpec::cluster_ip("default", "echo", VIP).tcp(80, POD_TCP_PORT);
    manifests.write_service(&service)?;
    manifests.write_endpoint_slices(&service, &t.slice_endpoints(IpFamily::V4, &[0], &[]))?;
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
