//! Scenario tests: proxy-agent in eBPF mode serving a ClusterIP to a client,
//! all in network namespaces (see `proxy_tests::netns` for the addresses).
//!
//! Each test builds its own topology and tears it down on drop, also when it
//! fails. The tests take a lock so they run one at a time: the machine has
//! two cores and some tests measure how fast the agent reacts. They need
//! root; without it they print why and pass.
use std::{
    collections::BTreeSet,
    io::Write,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, bail, ensure};
use proxy_tests::{
    bpf,
    client::check_spread,
    netns::{
        Agent, AgentConfig, BpfFs, ClientOptions, ClientReport, ManifestsDir, NODE_IP, POD_BRIDGE,
        POD_TCP_PORT, POD_UDP_PORT, PodNetwork, Protocol, READY_TIMEOUT, ServiceSpec, ToolPaths,
        Topology, agent_binary, exec_in,
    },
    serial, skipped,
};

/// The tests' Service: default/echo, TCP 80 -> 8080 and UDP 53 -> 5353.
const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 19, 0, 1));
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
/// A port the Service does not have.
const OTHER_PORT: u16 = 9090;

/// How fast the agent must apply a manifest change.
const CONVERGENCE_LIMIT: Duration = Duration::from_secs(1);
/// How long to keep polling for a change before giving up (longer than the
/// limit, to report how late it was).
const POLL_LIMIT: Duration = Duration::from_secs(5);
/// Connections per polling batch: with 3 backends, a batch of 20 misses a
/// given one by chance with probability (2/3)^20 < 0.1%.
const BATCH: u64 = 20;

fn tools() -> ToolPaths {
    ToolPaths::built(
        env!("CARGO_BIN_EXE_pod-server"),
        env!("CARGO_BIN_EXE_pod-client"),
    )
}

fn service() -> ServiceSpec {
    ServiceSpec::cluster_ip("default", "echo", VIP)
        .tcp(TCP_PORT, POD_TCP_PORT)
        .udp(UDP_PORT, POD_UDP_PORT)
}

/// A topology with the agent running on a manifests directory holding the
/// Node, the Service and its EndpointSlice.
struct Scenario {
    // Field order is drop order: the agent stops and cleans up while its
    // namespace and bpffs still exist.
    agent: Agent,
    manifests: ManifestsDir,
    bpffs: BpfFs,
    topology: Topology,
    service: ServiceSpec,
}

impl Scenario {
    /// `backends` pods, of which those in `listed` are in the EndpointSlice.
    fn start(backends: usize, listed: &[usize]) -> anyhow::Result<Self> {
        Self::start_with(backends, listed, &[])
    }

    /// As [`Scenario::start`], with extra `proxy-agent run` arguments.
    fn start_with(backends: usize, listed: &[usize], extra_args: &[&str]) -> anyhow::Result<Self> {
        let binary = agent_binary()?;
        let topology = Topology::builder()
            .backends(backends)
            .tools(tools())
            .build()?;
        let bpffs = BpfFs::mount()?;
        let mut manifests = ManifestsDir::new()?;
        manifests.write_node(topology.node_name(), IpAddr::V4(NODE_IP))?;
        let service = service();
        manifests.write_service(&service)?;
        manifests.write_endpoint_slice(&service, &topology.endpoints(listed))?;
        let agent = Agent::start(AgentConfig {
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            ..topology.start_agent_config(&binary, &bpffs, &manifests)
        })?;
        Ok(Scenario {
            agent,
            manifests,
            bpffs,
            topology,
            service,
        })
    }

    /// Waits until both service ports answer through the agent.
    fn wait_ready(&mut self) -> anyhow::Result<()> {
        for (protocol, port) in [(Protocol::Tcp, TCP_PORT), (Protocol::Udp, UDP_PORT)] {
            self.topology
                .wait_reachable(
                    &mut self.agent,
                    protocol,
                    SocketAddr::new(VIP, port),
                    READY_TIMEOUT,
                )
                .context("waiting for the agent to serve the ClusterIP")?;
        }
        Ok(())
    }

    fn tcp(&self, count: u64) -> anyhow::Result<ClientReport> {
        self.topology.client_tcp(VIP, TCP_PORT, count)
    }

    fn udp(&self, count: u64) -> anyhow::Result<ClientReport> {
        self.topology.client_udp(VIP, UDP_PORT, count)
    }

    /// A quick batch: short timeout, so failing connections cost little.
    fn tcp_batch(&self, count: u64) -> anyhow::Result<ClientReport> {
        let mut options = self
            .topology
            .client_options(Protocol::Tcp, VIP, TCP_PORT, count);
        options.timeout = Duration::from_millis(300);
        self.topology.run_client(&options)
    }

    /// Rewrites the EndpointSlice to list the pods in `indices`.
    fn set_backends(&self, indices: &[usize]) -> anyhow::Result<()> {
        self.manifests
            .write_endpoint_slice(&self.service, &self.topology.endpoints(indices))
    }

    /// Sends TCP batches until `done` holds for one; returns the time from
    /// `since` to the end of that batch.
    fn tcp_batches_until(
        &self,
        since: Instant,
        what: &str,
        done: impl Fn(&ClientReport) -> bool,
    ) -> anyhow::Result<Duration> {
        let mut last = None;
        // Bounded by both time and count.
        for _ in 0..500 {
            if since.elapsed() > POLL_LIMIT {
                break;
            }
            let report = self.tcp_batch(BATCH)?;
            if done(&report) {
                return Ok(since.elapsed());
            }
            last = Some(report);
        }
        bail!("{what}: not within {POLL_LIMIT:?}; last batch: {last:?}")
    }
}

/// Runs `body` on a fresh scenario; fails the test (printing the agent log)
/// on any error.
fn scenario(
    test: &str,
    backends: usize,
    listed: &[usize],
    body: impl FnOnce(&mut Scenario) -> anyhow::Result<()>,
) {
    let _serial = serial();
    if skipped(test) {
        return;
    }
    let mut scenario = Scenario::start(backends, listed)
        .unwrap_or_else(|error| panic!("{test}: setting up: {error:?}"));
    // Panicking while `scenario` is alive makes the Agent guard print its log.
    if let Err(error) = scenario.wait_ready().and_then(|()| body(&mut scenario)) {
        panic!("{test}: {error:?}");
    }
}

fn names(names: &[&'static str]) -> BTreeSet<&'static str> {
    names.iter().copied().collect()
}

/// The harness alone: namespaces, links, routes and pod servers work, the
/// VIP goes nowhere without an agent, and everything is removed on drop.
#[test]
fn harness_reaches_pods_directly_without_agent() {
    let _serial = serial();
    if skipped("harness_reaches_pods_directly_without_agent") {
        return;
    }
    let topology = Topology::builder()
        .backends(2)
        .tools(tools())
        .build()
        .expect("building a topology");
    let mut namespaces: Vec<String> = vec![
        topology.node_ns().to_string(),
        topology.client_ns().to_string(),
    ];
    for pod in topology.pods() {
        namespaces.push(pod.ns().to_string());
        let ip = IpAddr::V4(pod.ip);
        let tcp = topology.client_tcp(ip, POD_TCP_PORT, 20).unwrap();
        assert_eq!(tcp.count(&pod.name), 20, "TCP to {}: {tcp:?}", pod.name);
        let udp = topology.client_udp(ip, POD_UDP_PORT, 20).unwrap();
        assert_eq!(udp.count(&pod.name), 20, "UDP to {}: {udp:?}", pod.name);
    }

    // Without an agent the node takes the VIP as its own and refuses at once.
    let report = topology.client_tcp(VIP, TCP_PORT, 5).unwrap();
    assert_eq!(
        report.errors.get("connect: ConnectionRefused"),
        Some(&5),
        "{report:?}"
    );

    // The tcx query works and finds nothing in a fresh namespace.
    assert_eq!(bpf::tcx_attachments(topology.node_ns()).unwrap(), vec![]);

    let bpffs = BpfFs::mount().unwrap();
    let mount_point = bpffs.path().to_path_buf();
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        mounts.contains(&format!("{} bpf ", mount_point.display())),
        "{} is not a bpffs mount",
        mount_point.display()
    );
    drop(bpffs);
    assert!(
        !mount_point.exists(),
        "{} left behind",
        mount_point.display()
    );

    drop(topology);
    let left: Vec<&String> = namespaces
        .iter()
        .filter(|ns| Path::new("/run/netns").join(ns).exists())
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

/// The bridge pod network of the harness: pods on the node's bridge answer
/// the client directly, and `hairpin_mode` is set on the ports only when
/// asked for.
#[test]
fn harness_bridge_pods_reachable_without_agent() {
    let _serial = serial();
    if skipped("harness_bridge_pods_reachable_without_agent") {
        return;
    }
    for hairpin in [false, true] {
        let topology = Topology::builder()
            .backends(2)
            .pod_network(PodNetwork::Bridge { hairpin })
            .tools(tools())
            .build()
            .expect("building a bridge topology");
        for pod in topology.pods() {
            let tcp = topology
                .client_tcp(IpAddr::V4(pod.ip), POD_TCP_PORT, 10)
                .unwrap();
            assert_eq!(tcp.count(&pod.name), 10, "TCP to {}: {tcp:?}", pod.name);
        }
        let ports = exec_in(
            topology.node_ns(),
            "ip",
            &["-d", "link", "show", "master", POD_BRIDGE],
        )
        .unwrap();
        let hairpins = ports.matches("hairpin on").count();
        assert_eq!(
            hairpins,
            if hairpin { 2 } else { 0 },
            "hairpin={hairpin}: {ports}"
        );
    }
}

/// (1) Many TCP connections and UDP exchanges through the VIP reach every
/// listed backend and only those; replies come from the VIP (pod-client
/// checks the UDP source, and TCP to the VIP only connects with reverse NAT).
#[test]
fn clusterip_spreads_over_listed_backends_only() {
    scenario(
        "clusterip_spreads_over_listed_backends_only",
        4,
        &[0, 1, 2],
        |s| {
            let listed = names(&["pod-0", "pod-1", "pod-2"]);
            check_spread("TCP", &s.tcp(300)?, 300, &listed)?;
            check_spread("UDP", &s.udp(300)?, 300, &listed)?;
            Ok(())
        },
    );
}

/// (2) A backend removed from the EndpointSlice gets no new connections
/// within a second, without restarting the agent.
#[test]
fn removed_backend_stops_receiving_within_a_second() {
    scenario(
        "removed_backend_stops_receiving_within_a_second",
        3,
        &[0, 1, 2],
        |s| {
            let before = s.tcp(60)?;
            ensure!(
                before.count("pod-2") > 0,
                "pod-2 not in use before: {before:?}"
            );

            let t0 = Instant::now();
            s.set_backends(&[0, 1])?;
            let took = s.tcp_batches_until(t0, "pod-2 dropped", |batch| {
                batch.failed == 0 && batch.count("pod-2") == 0
            })?;
            let _ = writeln!(std::io::stderr(), "pod-2 removed after {took:?}");
            ensure!(
                took < CONVERGENCE_LIMIT,
                "pod-2 still got connections {took:?} after its removal"
            );

            let after = s.tcp(200)?;
            check_spread(
                "TCP after removal",
                &after,
                200,
                &names(&["pod-0", "pod-1"]),
            )
        },
    );
}

/// (3) A backend added to the EndpointSlice gets its share of new
/// connections.
#[test]
fn added_backend_starts_receiving() {
    scenario("added_backend_starts_receiving", 3, &[0, 1], |s| {
        check_spread("TCP before", &s.tcp(60)?, 60, &names(&["pod-0", "pod-1"]))?;

        let t0 = Instant::now();
        s.set_backends(&[0, 1, 2])?;
        let took = s.tcp_batches_until(t0, "pod-2 added", |batch| batch.count("pod-2") > 0)?;
        let _ = writeln!(std::io::stderr(), "pod-2 added after {took:?}");
        ensure!(
            took < CONVERGENCE_LIMIT,
            "pod-2 got no connection until {took:?} after it was added"
        );

        check_spread(
            "TCP after adding",
            &s.tcp(300)?,
            300,
            &names(&["pod-0", "pod-1", "pod-2"]),
        )
    });
}

/// (4) Deleting the Service (its file; the EndpointSlice stays) stops
/// forwarding: connections to the VIP fail.
#[test]
fn deleted_service_stops_forwarding() {
    scenario("deleted_service_stops_forwarding", 2, &[0, 1], |s| {
        let t0 = Instant::now();
        s.manifests.remove_service(&s.service)?;
        let took = s.tcp_batches_until(t0, "forwarding stopped", |batch| batch.ok == 0)?;
        let _ = writeln!(std::io::stderr(), "service gone after {took:?}");
        ensure!(
            took < CONVERGENCE_LIMIT,
            "the VIP still forwarded {took:?} after the Service was deleted"
        );

        let tcp = s.tcp_batch(50)?;
        ensure!(tcp.ok == 0, "TCP to the deleted Service: {tcp:?}");
        let mut udp = s.topology.client_options(Protocol::Udp, VIP, UDP_PORT, 8);
        udp.timeout = Duration::from_millis(300);
        let udp = s.topology.run_client(&udp)?;
        ensure!(udp.ok == 0, "UDP to the deleted Service: {udp:?}");
        Ok(())
    });
}

/// (5) Traffic that is not for a service port passes untouched: to the node
/// itself, to a pod's own address, and to the VIP on another port.
#[test]
fn traffic_not_for_a_service_is_untouched() {
    scenario("traffic_not_for_a_service_is_untouched", 2, &[0, 1], |s| {
        let t = &s.topology;
        // The node takes the service range as local (see proxy_tests::netns),
        // so a packet to the VIP that is not DNATed reaches the node's own
        // server on that port.
        let node_ip = IpAddr::V4(NODE_IP);
        // Bound to one address each, so UDP replies leave from it.
        let _on_node_ip = t.spawn_server(t.node_ns(), "node", node_ip, OTHER_PORT, OTHER_PORT)?;
        let _on_vip = t.spawn_server(t.node_ns(), "node-vip", VIP, OTHER_PORT, OTHER_PORT)?;
        wait_for_answer(t, node_ip, OTHER_PORT, "node")?;
        wait_for_answer(t, VIP, OTHER_PORT, "node-vip")?;

        let pod = t.pod(1);
        let cases = [
            (
                "the node's address",
                node_ip,
                OTHER_PORT,
                OTHER_PORT,
                "node",
            ),
            (
                "pod-1's own address",
                IpAddr::V4(pod.ip),
                POD_TCP_PORT,
                POD_UDP_PORT,
                "pod-1",
            ),
            (
                "the VIP on a non-service port",
                VIP,
                OTHER_PORT,
                OTHER_PORT,
                "node-vip",
            ),
        ];
        for (what, ip, tcp_port, udp_port, answer) in cases {
            let tcp = t.client_tcp(ip, tcp_port, 50)?;
            ensure!(
                tcp.count(answer) == 50,
                "TCP to {what} ({ip}:{tcp_port}): expected {answer} only: {tcp:?}"
            );
            // pod-client rejects replies from another address than it sent
            // to, so this also shows no reply was reverse-NATed.
            let udp = t.client_udp(ip, udp_port, 50)?;
            ensure!(
                udp.count(answer) == 50,
                "UDP to {what} ({ip}:{udp_port}): expected {answer} only: {udp:?}"
            );
        }

        // The service port itself still goes to the pods.
        check_spread(
            "TCP to the service port",
            &s.tcp(60)?,
            60,
            &names(&["pod-0", "pod-1"]),
        )
    });
}

/// Waits until a server in the node answers TCP on `ip:port` with `name`.
fn wait_for_answer(t: &Topology, ip: IpAddr, port: u16, name: &str) -> anyhow::Result<()> {
    let probe = ClientOptions {
        timeout: Duration::from_millis(200),
        parallel: 1,
        ..t.client_options(Protocol::Tcp, ip, port, 1)
    };
    proxy_tests::poll_until(READY_TIMEOUT, Duration::from_millis(20), || {
        Ok((t.run_client(&probe)?.count(name) == 1).then_some(()))
    })
    .with_context(|| format!("{name} on {ip}:{port} did not come up"))?;
    Ok(())
}

/// (6) `proxy-agent cleanup` leaves no program, link or pinned map behind,
/// and running it twice is fine.
#[test]
fn cleanup_removes_programs_links_and_pins() {
    scenario("cleanup_removes_programs_links_and_pins", 2, &[0, 1], |s| {
        let node_ns = s.topology.node_ns().to_string();
        let root = s.bpffs.agent_root();
        let attached = bpf::tcx_attachments(&node_ns)?;
        ensure!(
            !attached.is_empty(),
            "the agent attached no tcx program in the node namespace"
        );
        let objects = bpf::agent_objects(&node_ns, &root)?;

        let status = s.agent.stop()?;
        let _ = writeln!(
            std::io::stderr(),
            "agent stopped: {status}; objects: {objects:?}"
        );
        for round in 1..=2 {
            let output = s.agent.cleanup()?;
            ensure!(
                output.status.success(),
                "cleanup #{round} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }

        let left = bpf::tcx_attachments(&node_ns)?;
        ensure!(
            left.is_empty(),
            "tcx attachments left after cleanup: {left:?}"
        );
        let net = exec_in(&node_ns, "bpftool", &["-j", "net", "show"])?;
        let net: serde_json::Value =
            serde_json::from_str(&net).context("parsing bpftool net show")?;
        let attached_elsewhere = net
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|section| section.as_object())
            .flat_map(|section| section.values())
            .any(|hooks| hooks.as_array().is_some_and(|hooks| !hooks.is_empty()));
        ensure!(!attached_elsewhere, "bpftool net show after cleanup: {net}");

        // The kernel frees objects asynchronously once the last reference
        // goes, so allow it a moment.
        let (_, took) =
            proxy_tests::poll_until(Duration::from_secs(3), Duration::from_millis(50), || {
                for &(kind, id) in &objects {
                    if bpf::object_exists(kind, id)? {
                        return Ok(None);
                    }
                }
                Ok(Some(()))
            })
            .map_err(|_| {
                let left: Vec<_> = objects
                    .iter()
                    .filter(|(kind, id)| bpf::object_exists(*kind, *id).unwrap_or(true))
                    .collect();
                anyhow::anyhow!("objects still exist 3 s after cleanup: {left:?}")
            })?;
        let _ = writeln!(
            std::io::stderr(),
            "all agent objects gone {took:?} after cleanup"
        );

        let pinned = bpf::pinned_paths(&root)?;
        ensure!(pinned.is_empty(), "still pinned after cleanup: {pinned:?}");
        Ok(())
    });
}

/// Two agents in two node namespaces, each with its own --bpf-root, serve
/// side by side; stopping and cleaning up one leaves the other serving with
/// its pins intact.
#[test]
fn two_agents_with_their_own_bpf_roots_do_not_disturb_each_other() {
    let test = "two_agents_with_their_own_bpf_roots_do_not_disturb_each_other";
    let _serial = serial();
    if skipped(test) {
        return;
    }
    let run = || -> anyhow::Result<()> {
        let mut first = Scenario::start(2, &[0, 1])?;
        let mut second = Scenario::start(2, &[0, 1])?;
        first.wait_ready()?;
        second.wait_ready()?;
        let both = names(&["pod-0", "pod-1"]);
        check_spread("first", &first.tcp(100)?, 100, &both)?;
        check_spread("second", &second.tcp(100)?, 100, &both)?;
        ensure!(
            first.bpffs.agent_root() != second.bpffs.agent_root(),
            "the two agents must have different bpf roots"
        );

        first.agent.stop()?;
        let output = first.agent.cleanup()?;
        ensure!(output.status.success(), "cleanup of the first agent failed");
        ensure!(
            bpf::pinned_paths(&first.bpffs.agent_root())?.is_empty(),
            "first agent's pins left"
        );
        ensure!(
            !bpf::pinned_paths(&second.bpffs.agent_root())?.is_empty(),
            "the second agent's pins went with the first's cleanup"
        );
        ensure!(
            !bpf::tcx_attachments(second.topology.node_ns())?.is_empty(),
            "the second agent's programs were detached"
        );
        check_spread("second after first cleanup", &second.tcp(100)?, 100, &both)?;
        let refused = first.tcp_batch(5)?;
        ensure!(
            refused.ok == 0,
            "the first node still forwards the VIP after cleanup: {refused:?}"
        );
        Ok(())
    };
    if let Err(error) = run() {
        panic!("{test}: {error:?}");
    }
}

/// `--exclude-interfaces` keeps the programs off an interface: traffic that
/// enters there is not translated, while the other interfaces are attached.
#[test]
fn excluded_interface_gets_no_program() {
    let test = "excluded_interface_gets_no_program";
    let _serial = serial();
    if skipped(test) {
        return;
    }
    let run = || -> anyhow::Result<()> {
        let s = Scenario::start_with(1, &[0], &["--exclude-interfaces", "to-client"])?;
        // The agent attaches asynchronously; wait until the pod side is done.
        let node_ns = s.topology.node_ns().to_string();
        proxy_tests::poll_until(READY_TIMEOUT, Duration::from_millis(20), || {
            let attached = bpf::tcx_attachments(&node_ns)?;
            Ok(attached
                .iter()
                .any(|a| a.interface == "to-pod0")
                .then_some(attached))
        })
        .context("the agent never attached to to-pod0")?;
        let attached = bpf::tcx_attachments(&node_ns)?;
        ensure!(
            attached.iter().all(|a| a.interface != "to-client"),
            "excluded interface got a program: {attached:?}"
        );
        // The VIP arrives on the excluded interface: not translated, so the
        // node answers it as its own address (connection refused).
        let report = s.tcp_batch(10)?;
        ensure!(
            report.ok == 0,
            "excluded interface translated traffic: {report:?}"
        );
        Ok(())
    };
    if let Err(error) = run() {
        panic!("{test}: {error:?}");
    }
}
