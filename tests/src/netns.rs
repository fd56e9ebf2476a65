//! A node, a client and N backend pods, each in its own network namespace.
//!
//! ```text
//!   client ns                node ns (ip_forward=1)               pod-<i> ns
//!  eth0 198.18.0.2 ──veth── to-client  198.18.0.1
//!                           to-pod<i>  198.18.0.1 ──veth── eth0 198.18.1.<10+i>
//! ```
//!
//! Address scheme: all addresses come from 198.18.0.0/15, the RFC 2544
//! benchmarking range, which nothing on a real network uses:
//! - 198.18.0.1: the node, on every one of its links; 198.18.0.2: the client.
//! - 198.18.1.10, .11, ...: pod i (at most [`MAX_PODS`]).
//! - 198.19.0.0/16 ([`SERVICE_RANGE`]): service VIPs. The client reaches
//!   them through its default route via the node; the node has a `local`
//!   route for the range, so a VIP packet that is not DNATed is answered by
//!   the node itself (a TCP reset, or a server the node runs) rather than
//!   forwarded anywhere.
//!
//! With [`PodNetwork::Bridge`] the pods sit instead on a Linux bridge `pods0`
//! of the node (198.18.1.1/24, each pod 198.18.1.<10+i>/24 with a default
//! route via 198.18.1.1; the node ends of the pod veths are bridge ports,
//! optionally with `hairpin_mode` on), as with bridge CNI plugins.
//!
//! Links are routed point-to-point (/32 with a peer route), so each pod and
//! the client have a default route via the node and the node has a host route
//! per pod. The namespaces have no link to the host namespace, so topologies
//! never clash and can all use the same addresses; only the namespace names
//! are unique: `pxt<pid>-<counter>-node|client|pod<i>`. Interfaces are created
//! inside the namespaces, so their names never clash either.
use std::{
    ffi::OsStr,
    io::Read,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

pub use crate::{
    agent::{Agent, AgentConfig, AgentSource, BpfFs, agent_binary},
    client::{ClientOptions, ClientReport, Protocol},
    manifests::{Endpoint, ManifestsDir, ServicePort, ServiceSpec},
};

/// The node's address, on all its links.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The client's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// Where service VIPs come from; local to the node (see the module docs).
pub const SERVICE_RANGE: &str = "198.19.0.0/16";
/// The most pods one topology can have (198.18.1.10 to 198.18.1.209).
pub const MAX_PODS: usize = 200;
/// The port every pod-server serves TCP on.
pub const POD_TCP_PORT: u16 = 8080;
/// The port every pod-server serves UDP on.
pub const POD_UDP_PORT: u16 = 5353;
/// The Node name used unless the builder is told otherwise.
pub const DEFAULT_NODE_NAME: &str = "test-node";

/// Prefix of every namespace this harness creates.
const NETNS_PREFIX: &str = "pxt";

/// The address of pod `index`.
pub fn pod_ip(index: usize) -> Ipv4Addr {
    assert!(index < MAX_PODS, "pod index {index} out of range");
    Ipv4Addr::new(198, 18, 1, 10 + index as u8)
}

/// The name of pod `index`, which is also what its server answers.
pub fn pod_name(index: usize) -> String {
    format!("pod-{index}")
}

/// Where the `pod-server` and `pod-client` binaries are.
#[derive(Clone, Debug)]
pub struct ToolPaths {
    pub pod_server: PathBuf,
    pub pod_client: PathBuf,
}

impl ToolPaths {
    pub fn new(pod_server: impl Into<PathBuf>, pod_client: impl Into<PathBuf>) -> Self {
        ToolPaths {
            pod_server: pod_server.into(),
            pod_client: pod_client.into(),
        }
    }

    /// Both binaries in `dir`, e.g. `target/release`.
    pub fn in_dir(dir: &Path) -> Self {
        ToolPaths::new(dir.join("pod-server"), dir.join("pod-client"))
    }

    /// `POD_SERVER_BIN`/`POD_CLIENT_BIN` if set, else the first of: beside
    /// this executable, its parent (tests run from target/*/deps),
    /// `target/debug`, `target/release`.
    pub fn locate() -> anyhow::Result<Self> {
        if let (Some(server), Some(client)) = (
            std::env::var_os("POD_SERVER_BIN"),
            std::env::var_os("POD_CLIENT_BIN"),
        ) {
            return Ok(ToolPaths::new(server, client));
        }
        let mut dirs = Vec::new();
        if let Ok(exe) = std::env::current_exe()
            && let Some(dir) = exe.parent()
        {
            dirs.push(dir.to_path_buf());
            dirs.extend(dir.parent().map(Path::to_path_buf));
        }
        let target = crate::agent::workspace_dir().join("target");
        dirs.push(target.join("debug"));
        dirs.push(target.join("release"));
        dirs.iter()
            .map(|dir| ToolPaths::in_dir(dir))
            .find(ToolPaths::exist)
            .with_context(|| {
                format!(
                    "pod-server/pod-client not found in {dirs:?}: run `cargo build -p proxy-tests`"
                )
            })
    }

    fn exist(&self) -> bool {
        self.pod_server.is_file() && self.pod_client.is_file()
    }
}

/// Runs a command to completion; an error (with its stderr) unless it exits 0.
/// Returns stdout.
pub fn run(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {command:?}"))?;
    check(command, &output)?;
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn check(command: &Command, output: &Output) -> anyhow::Result<()> {
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim(),
            String::from_utf8_lossy(&output.stdout).trim()
        );
    }
    Ok(())
}

/// `ip ARGS`, which must succeed.
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("ip").args(args))
}

/// Runs `f` on a thread of its own that has entered network namespace `ns`
/// (setns changes only the calling thread's namespace). Sockets made there
/// stay in `ns` when handed back, so this also serves to bind a listener
/// inside a namespace.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    use std::os::fd::AsRawFd;
    let path = std::path::Path::new("/run/netns").join(ns);
    let file = std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| -> anyhow::Result<T> {
                // SAFETY: `file` is an open namespace file for the duration
                // of the call.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error()).context("setns");
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
    })
}

/// A command that runs `program` inside namespace `ns`.
pub fn netns_command(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", ns]).arg(program);
    command
}

/// Runs `program args` in `ns` to completion; returns stdout, or an error with
/// stderr if it fails.
pub fn exec_in<S: AsRef<OsStr>>(
    ns: &str,
    program: impl AsRef<OsStr>,
    args: &[S],
) -> anyhow::Result<String> {
    run(netns_command(ns, program).args(args))
}

/// Starts `program args` in `ns` in the background, output discarded; the
/// process is killed when the guard drops.
pub fn spawn_in<S: AsRef<OsStr>>(
    ns: &str,
    program: impl AsRef<OsStr>,
    args: &[S],
) -> anyhow::Result<ChildGuard> {
    let mut command = netns_command(ns, program);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    ChildGuard::spawn(&mut command)
}

/// A child process killed (and reaped) on drop.
pub struct ChildGuard {
    child: Child,
    description: String,
}

impl ChildGuard {
    pub fn spawn(command: &mut Command) -> anyhow::Result<Self> {
        let description = format!("{command:?}");
        let child = command
            .spawn()
            .with_context(|| format!("starting {description}"))?;
        Ok(ChildGuard { child, description })
    }

    /// The process id; `ip netns exec` execs the program, so this is the
    /// program itself.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited.
    pub fn exited(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        self.child
            .try_wait()
            .with_context(|| format!("waiting for {}", self.description))
    }

    /// Asks the process to stop (SIGTERM), waits up to `grace`, then kills it.
    pub fn terminate(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.exited()? {
            return Ok(status);
        }
        // SAFETY: kill has no memory-safety preconditions; the pid is our
        // own unreaped child, so it cannot have been reused.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.exited()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        self.child
            .wait()
            .with_context(|| format!("waiting for {}", self.description))
    }
}

impl ChildGuard {
    /// Waits at most `timeout` for the process to exit (killing it after
    /// that) and collects whatever it wrote to piped stdout/stderr.
    pub fn output_within(mut self, timeout: Duration) -> anyhow::Result<Output> {
        // Read the pipes on threads so a chatty child cannot block on a full
        // pipe while we wait for it.
        fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<Vec<u8>> {
            std::thread::spawn(move || {
                let mut bytes = Vec::new();
                if let Some(mut pipe) = pipe {
                    let _ = pipe.read_to_end(&mut bytes);
                }
                bytes
            })
        }
        let stdout = drain(self.child.stdout.take());
        let stderr = drain(self.child.stderr.take());
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.exited()? {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{} did not exit within {timeout:?}", self.description);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        })
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` with loopback up.
    pub fn create(name: String) -> anyhow::Result<Self> {
        ip(&["netns", "add", &name]).with_context(|| format!("creating namespace {name}"))?;
        let netns = Netns { name };
        ip(&["-n", &netns.name, "link", "set", "lo", "up"])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets a sysctl inside the namespace (the net.* ones are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        exec_in(&self.name, "sysctl", &["-qw", &format!("{key}={value}")])?;
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(error) = ip(&["netns", "del", &self.name]) {
            eprintln!("proxy-tests: {error:#}");
        }
    }
}

/// Deletes namespaces left behind by harness processes that no longer exist
/// (a test killed with SIGKILL never runs its Drop guards).
fn remove_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(NETNS_PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if !crate::process_exists(pid) {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// How pods connect to the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodNetwork {
    /// A veth per pod with point-to-point /32 routes (the default).
    Routed,
    /// Pods on the node's bridge `pods0`; `hairpin` sets `hairpin_mode` on
    /// the bridge ports (a frame may go back out the port it came in on).
    Bridge { hairpin: bool },
}

/// The node's bridge for [`PodNetwork::Bridge`], and its address there.
pub const POD_BRIDGE: &str = "pods0";
pub const POD_GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);

/// Configures a topology; see the module documentation.
#[derive(Clone, Debug)]
pub struct TopologyBuilder {
    pod_network: PodNetwork,
    backends: usize,
    node_name: String,
    tools: Option<ToolPaths>,
}

impl TopologyBuilder {
    /// How pods are connected (default [`PodNetwork::Routed`]).
    pub fn pod_network(mut self, network: PodNetwork) -> Self {
        self.pod_network = network;
        self
    }

    /// Number of backend pods (default 3).
    pub fn backends(mut self, count: usize) -> Self {
        self.backends = count;
        self
    }

    /// The node's name, as the agent's `--hostname-override` and in manifests.
    pub fn node_name(mut self, name: impl Into<String>) -> Self {
        self.node_name = name.into();
        self
    }

    /// Where pod-server and pod-client are (default: [`ToolPaths::locate`]).
    pub fn tools(mut self, tools: ToolPaths) -> Self {
        self.tools = Some(tools);
        self
    }

    /// Creates the namespaces, links and pod servers, and waits (bounded)
    /// until the client reaches every pod directly.
    pub fn build(self) -> anyhow::Result<Topology> {
        anyhow::ensure!(
            self.backends <= MAX_PODS,
            "at most {MAX_PODS} backends, asked for {}",
            self.backends
        );
        let tools = match self.tools {
            Some(tools) => tools,
            None => ToolPaths::locate()?,
        };
        anyhow::ensure!(
            tools.exist(),
            "pod-server/pod-client missing at {tools:?}: run `cargo build -p proxy-tests`"
        );
        remove_stale_namespaces();
        let id = format!("{NETNS_PREFIX}{}", crate::unique_suffix());

        let node = Netns::create(format!("{id}-node"))?;
        node.sysctl("net.ipv4.ip_forward", "1")?;
        // The node takes the whole service range as local, so a packet to a
        // VIP that the agent does not DNAT is answered by the node itself: a
        // TCP reset (or a server of the node's) at once. Without this the
        // node would drop it with a rate-limited ICMP error, and clients
        // would mostly wait for their timeouts.
        ip(&[
            "-n",
            node.name(),
            "route",
            "add",
            "local",
            SERVICE_RANGE,
            "dev",
            "lo",
        ])?;
        let client = Netns::create(format!("{id}-client"))?;
        link(&node, "to-client", NODE_IP, &client, CLIENT_IP)?;

        if let PodNetwork::Bridge { .. } = self.pod_network {
            let n = node.name();
            ip(&["-n", n, "link", "add", POD_BRIDGE, "type", "bridge"])?;
            ip(&[
                "-n",
                n,
                "addr",
                "add",
                &format!("{POD_GATEWAY_IP}/24"),
                "dev",
                POD_BRIDGE,
            ])?;
            ip(&["-n", n, "link", "set", POD_BRIDGE, "up"])?;
        }
        let mut pods = Vec::with_capacity(self.backends);
        for index in 0..self.backends {
            let ns = Netns::create(format!("{id}-pod{index}"))?;
            let node_if = format!("to-pod{index}");
            match self.pod_network {
                PodNetwork::Routed => link(&node, &node_if, NODE_IP, &ns, pod_ip(index))?,
                PodNetwork::Bridge { hairpin } => {
                    bridge_port(&node, &node_if, &ns, pod_ip(index), hairpin)?;
                }
            }
            let name = pod_name(index);
            let server = spawn_in(
                ns.name(),
                &tools.pod_server,
                &[
                    "--name",
                    &name,
                    "--tcp",
                    &POD_TCP_PORT.to_string(),
                    "--udp",
                    &POD_UDP_PORT.to_string(),
                ],
            )?;
            pods.push(Pod {
                name,
                ip: pod_ip(index),
                server,
                ns,
            });
        }
        let mut topology = Topology {
            pods,
            client,
            node,
            node_name: self.node_name,
            tools,
        };
        topology.wait_for_pods()?;
        Ok(topology)
    }
}

/// Connects `node` and `other` with a veth pair: `node_if` in the node,
/// `eth0` in the other namespace, /32 addresses with peer routes, and a
/// default route from the other namespace via the node.
fn link(
    node: &Netns,
    node_if: &str,
    node_ip: Ipv4Addr,
    other: &Netns,
    other_ip: Ipv4Addr,
) -> anyhow::Result<()> {
    let (n, o) = (node.name(), other.name());
    let (node_ip, other_ip) = (node_ip.to_string(), other_ip.to_string());
    ip(&[
        "-n", n, "link", "add", node_if, "type", "veth", "peer", "name", "eth0", "netns", o,
    ])?;
    ip(&[
        "-n",
        n,
        "addr",
        "add",
        &node_ip,
        "peer",
        &format!("{other_ip}/32"),
        "dev",
        node_if,
    ])?;
    ip(&[
        "-n",
        o,
        "addr",
        "add",
        &other_ip,
        "peer",
        &format!("{node_ip}/32"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", n, "link", "set", node_if, "up"])?;
    ip(&["-n", o, "link", "set", "eth0", "up"])?;
    ip(&[
        "-n", o, "route", "add", "default", "via", &node_ip, "dev", "eth0",
    ])?;
    Ok(())
}

/// Connects `pod` to the node's bridge: `node_if` becomes a port of
/// [`POD_BRIDGE`], `eth0` in the pod gets `pod_ip`/24 and a default route via
/// [`POD_GATEWAY_IP`].
fn bridge_port(
    node: &Netns,
    node_if: &str,
    pod: &Netns,
    pod_ip: Ipv4Addr,
    hairpin: bool,
) -> anyhow::Result<()> {
    let (n, o) = (node.name(), pod.name());
    ip(&[
        "-n", n, "link", "add", node_if, "type", "veth", "peer", "name", "eth0", "netns", o,
    ])?;
    ip(&["-n", n, "link", "set", node_if, "master", POD_BRIDGE])?;
    if hairpin {
        ip(&[
            "-n",
            n,
            "link",
            "set",
            node_if,
            "type",
            "bridge_slave",
            "hairpin",
            "on",
        ])?;
    }
    ip(&["-n", n, "link", "set", node_if, "up"])?;
    ip(&[
        "-n",
        o,
        "addr",
        "add",
        &format!("{pod_ip}/24"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", o, "link", "set", "eth0", "up"])?;
    let gateway = POD_GATEWAY_IP.to_string();
    ip(&[
        "-n", o, "route", "add", "default", "via", &gateway, "dev", "eth0",
    ])?;
    Ok(())
}

/// A backend pod: its namespace and the pod-server in it.
pub struct Pod {
    /// `pod-<i>`; also what its server answers.
    pub name: String,
    pub ip: Ipv4Addr,
    // Declared before `ns` so the server stops before its namespace goes.
    server: ChildGuard,
    ns: Netns,
}

impl Pod {
    pub fn ns(&self) -> &str {
        self.ns.name()
    }

    /// This pod as an EndpointSlice endpoint.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            pod: self.name.clone(),
            ip: IpAddr::V4(self.ip),
        }
    }
}

/// A built topology; everything in it is removed on drop, pods first.
pub struct Topology {
    pods: Vec<Pod>,
    client: Netns,
    node: Netns,
    node_name: String,
    tools: ToolPaths,
}

/// How long to wait for something that should work at once (pods to listen,
/// the agent to program a service).
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Per-exchange timeout of the client helpers.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(500);
/// Threads the client helpers use.
const CLIENT_PARALLEL: usize = 4;

impl Topology {
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder {
            pod_network: PodNetwork::Routed,
            backends: 3,
            node_name: DEFAULT_NODE_NAME.to_string(),
            tools: None,
        }
    }

    pub fn node_ns(&self) -> &str {
        self.node.name()
    }

    pub fn client_ns(&self) -> &str {
        self.client.name()
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    pub fn pod(&self, index: usize) -> &Pod {
        &self.pods[index]
    }

    pub fn tools(&self) -> &ToolPaths {
        &self.tools
    }

    /// Endpoints for the pods with the given indices.
    pub fn endpoints(&self, indices: &[usize]) -> Vec<Endpoint> {
        indices.iter().map(|&i| self.pods[i].endpoint()).collect()
    }

    /// Runs `program args` in namespace `ns`; see [`exec_in`].
    pub fn exec_in<S: AsRef<OsStr>>(
        &self,
        ns: &str,
        program: impl AsRef<OsStr>,
        args: &[S],
    ) -> anyhow::Result<String> {
        exec_in(ns, program, args)
    }

    /// Starts `program args` in namespace `ns`; see [`spawn_in`].
    pub fn spawn_in<S: AsRef<OsStr>>(
        &self,
        ns: &str,
        program: impl AsRef<OsStr>,
        args: &[S],
    ) -> anyhow::Result<ChildGuard> {
        spawn_in(ns, program, args)
    }

    /// Starts a pod-server named `name` in namespace `ns` (e.g. the node).
    pub fn spawn_server(
        &self,
        ns: &str,
        name: &str,
        bind: IpAddr,
        tcp_port: u16,
        udp_port: u16,
    ) -> anyhow::Result<ChildGuard> {
        spawn_in(
            ns,
            &self.tools.pod_server,
            &[
                "--name",
                name,
                "--bind",
                &bind.to_string(),
                "--tcp",
                &tcp_port.to_string(),
                "--udp",
                &udp_port.to_string(),
            ],
        )
    }

    /// Runs pod-client in the client namespace.
    pub fn run_client(&self, options: &ClientOptions) -> anyhow::Result<ClientReport> {
        let stdout = exec_in(
            self.client_ns(),
            &self.tools.pod_client,
            &[
                options.protocol.as_str(),
                &options.target.to_string(),
                "--count",
                &options.count.to_string(),
                "--timeout-ms",
                &options.timeout.as_millis().to_string(),
                "--parallel",
                &options.parallel.to_string(),
            ],
        )?;
        serde_json::from_str(stdout.trim())
            .with_context(|| format!("parsing pod-client output {stdout:?}"))
    }

    /// `count` TCP connections from the client to `ip:port`.
    pub fn client_tcp(&self, ip: IpAddr, port: u16, count: u64) -> anyhow::Result<ClientReport> {
        self.run_client(&self.client_options(Protocol::Tcp, ip, port, count))
    }

    /// `count` UDP exchanges from the client to `ip:port`.
    pub fn client_udp(&self, ip: IpAddr, port: u16, count: u64) -> anyhow::Result<ClientReport> {
        self.run_client(&self.client_options(Protocol::Udp, ip, port, count))
    }

    /// The options `client_tcp`/`client_udp` use, to adjust.
    pub fn client_options(
        &self,
        protocol: Protocol,
        ip: IpAddr,
        port: u16,
        count: u64,
    ) -> ClientOptions {
        ClientOptions {
            protocol,
            target: SocketAddr::new(ip, port),
            count,
            timeout: CLIENT_TIMEOUT,
            parallel: CLIENT_PARALLEL,
        }
    }

    /// Starts the agent in the node namespace on `manifests`, pinning under
    /// `bpffs`.
    pub fn start_agent(
        &self,
        binary: &Path,
        bpffs: &BpfFs,
        manifests: &ManifestsDir,
    ) -> anyhow::Result<Agent> {
        Agent::start(self.start_agent_config(binary, bpffs, manifests))
    }

    /// The configuration [`Topology::start_agent`] uses, to adjust before starting.
    pub fn start_agent_config(
        &self,
        binary: &Path,
        bpffs: &BpfFs,
        manifests: &ManifestsDir,
    ) -> AgentConfig {
        self.agent_config(
            binary,
            bpffs,
            AgentSource::Manifests(manifests.path().to_path_buf()),
        )
    }

    /// An agent in the node namespace reading from `source`, pinning under
    /// `bpffs`.
    pub fn agent_config(&self, binary: &Path, bpffs: &BpfFs, source: AgentSource) -> AgentConfig {
        AgentConfig {
            binary: binary.to_path_buf(),
            netns: self.node_ns().to_string(),
            source,
            bpf_root: bpffs.agent_root(),
            node_name: self.node_name.clone(),
            extra_args: Vec::new(),
        }
    }

    /// Waits (at most `timeout`) until every one of a few exchanges with
    /// `target` succeeds, failing early if the agent exits. Returns how long
    /// it took.
    pub fn wait_reachable(
        &self,
        agent: &mut Agent,
        protocol: Protocol,
        target: SocketAddr,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        let probe = ClientOptions {
            protocol,
            target,
            count: 3,
            timeout: Duration::from_millis(200),
            parallel: 1,
        };
        loop {
            agent.ensure_running()?;
            let report = self.run_client(&probe)?;
            if report.ok == probe.count {
                return Ok(start.elapsed());
            }
            if start.elapsed() >= timeout {
                bail!(
                    "{protocol} {target} not reachable through the agent within {timeout:?}; \
                     last probe: {report:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the client reaches every pod directly over TCP and UDP;
    /// proves the namespaces, links, routes and servers work.
    fn wait_for_pods(&mut self) -> anyhow::Result<()> {
        let start = Instant::now();
        for index in 0..self.pods.len() {
            for protocol in [Protocol::Tcp, Protocol::Udp] {
                let port = match protocol {
                    Protocol::Tcp => POD_TCP_PORT,
                    Protocol::Udp => POD_UDP_PORT,
                };
                let mut probe =
                    self.client_options(protocol, IpAddr::V4(self.pods[index].ip), port, 1);
                probe.timeout = Duration::from_millis(200);
                loop {
                    let pod = &mut self.pods[index];
                    if let Some(status) = pod.server.exited()? {
                        bail!("pod-server of {} exited: {status}", pod.name);
                    }
                    let report = self.run_client(&probe)?;
                    let pod = &self.pods[index];
                    if report.count(&pod.name) == 1 {
                        break;
                    }
                    if start.elapsed() >= READY_TIMEOUT {
                        bail!(
                            "{} did not answer {protocol} on {}:{port} within {READY_TIMEOUT:?}: {report:?}",
                            pod.name,
                            pod.ip
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        Ok(())
    }
}
