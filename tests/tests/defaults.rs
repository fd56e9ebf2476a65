//! The agent as an operator first starts it by hand: `ip netns exec NODE
//! proxy-agent run --manifests DIR`, no other flag. `ip netns exec` gives it
//! a mount namespace of its own with a fresh sysfs, in which `/sys/fs/bpf`
//! is an empty directory that is no bpffs: the agent mounts one there (as
//! Cilium does), says that its pins go with it, and
//! serves a ClusterIP to a client outside the node and to the node's own
//! processes. When it exits, nothing of it stays attached to the host's
//! root cgroup.
//!
//! Needs root; without it the test prints why and passes.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use proxy_tests::{
    netns::{
        ChildGuard, ManifestsDir, POD_TCP_PORT, Protocol, ServiceSpec, ToolPaths, Topology,
        agent_binary, netns_command,
    },
    serial, skipped,
};

const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1));

fn tools() -> ToolPaths {
    ToolPaths::new(
        env!("CARGO_BIN_EXE_pod-server"),
        env!("CARGO_BIN_EXE_pod-client"),
    )
}

/// The programs attached to the host's root cgroup v2, by id (none if the
/// host mounts no cgroup v2).
fn root_cgroup_programs() -> anyhow::Result<BTreeSet<u64>> {
    let Some(root) = proxy_agent::dataplane::ebpf::sockets::cgroup2_mount() else {
        return Ok(BTreeSet::new());
    };
    let output = Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(&root)
        .output()
        .context("running bpftool")?;
    ensure!(
        output.status.success(),
        "bpftool cgroup show {}: {}",
        root.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    if text.trim().is_empty() {
        return Ok(BTreeSet::new());
    }
    let attached: Vec<serde_json::Value> = serde_json::from_str(&text)?;
    Ok(attached.iter().filter_map(|p| p["id"].as_u64()).collect())
}

fn agent_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn the_agent_started_with_its_defaults_under_ip_netns_exec_serves() {
    let _serial = serial();
    if skipped("the_agent_started_with_its_defaults_under_ip_netns_exec_serves") {
        return;
    }
    if let Err(e) = run() {
        panic!("{e:?}");
    }
}

fn run() -> anyhow::Result<()> {
    let binary = agent_binary()?;
    let topology = Topology::builder().backends(2).tools(tools()).build()?;
    let manifests = ManifestsDir::new()?;
    let service = ServiceSpec::cluster_ip("default", "web", VIP).tcp(80, POD_TCP_PORT);
    manifests.write_service(&service)?;
    manifests.write_endpoint_slice(&service, &topology.endpoints(&[0, 1]))?;
    let before = root_cgroup_programs()?;

    let log_dir = tempfile::tempdir()?;
    let log_path = log_dir.path().join("agent.log");
    let log = std::fs::File::create(&log_path)?;
    let mut agent = ChildGuard::spawn(
        netns_command(topology.node_ns(), &binary)
            .args(["run", "--manifests"])
            .arg(manifests.path())
            .stdout(Stdio::null())
            .stderr(log),
    )?;
    let served = serve_checks(&topology, &mut agent, &log_path, &before);
    let status = agent.terminate(Duration::from_secs(10))?;
    let log = agent_log(&log_path);
    served.with_context(|| format!("agent log:\n{log}"))?;
    ensure!(
        status.success(),
        "the agent exited with {status}; log:\n{log}"
    );
    ensure!(!log.contains("ERROR"), "errors in the agent log:\n{log}");
    for expected in [
        "mounted bpffs in this process's own mount namespace",
        "path=/sys/fs/bpf",
        // At the first cgroup v2 of its mount namespace (here the test
        // harness's), or one it mounts where there is none.
        "socket hooks attached",
    ] {
        ensure!(
            log.contains(expected),
            "no {expected:?} in the agent log:\n{log}"
        );
    }
    // Its pins went with its mount namespace, and its socket hooks with them.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left: BTreeSet<u64> = root_cgroup_programs()?
            .difference(&before)
            .copied()
            .collect();
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            bail!("programs {left:?} stay attached to the root cgroup after the agent exited");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// With the agent running: the ClusterIP answers from the client namespace
/// (tc programs) and from the node's own namespace (socket hooks on the
/// cgroup the agent mounted), and the agent's hooks are on the root cgroup.
fn serve_checks(
    topology: &Topology,
    agent: &mut ChildGuard,
    log_path: &Path,
    before: &BTreeSet<u64>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let options = topology.client_options(Protocol::Tcp, VIP, 80, 10);
    loop {
        if let Some(status) = agent.exited()? {
            bail!("the agent exited with {status}: {}", agent_log(log_path));
        }
        let report = topology.run_client(&options)?;
        if report.ok == options.count {
            break;
        }
        if Instant::now() > deadline {
            bail!("the ClusterIP does not answer the client: {report:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let from_node = topology.run_client_in(topology.node_ns(), &options)?;
    ensure!(
        from_node.ok == options.count,
        "the ClusterIP does not answer the node's own processes: {from_node:?}"
    );
    let added = root_cgroup_programs()?.difference(before).count();
    ensure!(added > 0, "no socket hook of the agent on the root cgroup");
    Ok(())
}
