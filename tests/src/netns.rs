//! A node, a client and N backend pods, each in its own network namespace;
//! optionally a second node with pods of its own.
//!
//! ```text
//!   client ns                node ns (forwarding on)              pod-<i> ns
//!  eth0 198.18.0.2 ──veth── to-client  198.18.0.1
//!                           to-pod<i>  198.18.0.1 ──veth── eth0 198.18.1.<10+i>
//!                           to-node2   198.18.0.1 ──veth── to-node1 198.18.0.3
//!                                                  node2 ns (forwarding on)
//!                                                  to-pod<j> 198.18.0.3 ──veth── eth0 198.18.1.<224+j>
//! ```
//!
//! Address scheme: IPv4 from 198.18.0.0/15 (RFC 2544) and IPv6 from
//! 2001:2::/48 (RFC 5180), the benchmarking ranges, which nothing on a real
//! network uses. Every link carries both families:
//! - 198.18.0.1 / 2001:2::1 ([`NODE_IP`], [`NODE_IP6`]): the node, on every
//!   one of its links; 198.18.0.2 / 2001:2::2 ([`CLIENT_IP`],
//!   [`CLIENT_IP6`]): the client, outside the cluster (an external client
//!   for NodePort scenarios); 198.18.0.3 / 2001:2::3 ([`NODE2_IP`],
//!   [`NODE2_IP6`]): the second node.
//! - Pods: 198.18.1.N and 2001:2::1:N, the same number N in the last
//!   octet and the last group (so in hex in IPv6: 198.18.1.10 goes with
//!   2001:2::1:a). Pod i of the node has N = 10 + i (at most [`MAX_PODS`],
//!   up to 198.18.1.209); pod j of the second node has N = 224 + j (at most
//!   [`MAX_REMOTE_PODS`], in 198.18.1.224/27 and 2001:2::1:e0/123).
//! - [`CLUSTER_CIDR`] (198.18.1.0/24 and 2001:2::1:0/112) holds every pod
//!   (and the bridge gateway) but neither node nor the client.
//! - 198.19.0.0/16 ([`SERVICE_RANGE`]) and 2001:2:0:ff::/64
//!   ([`SERVICE_RANGE_V6`]): service VIPs. The client reaches them through
//!   its default route via the node; the node has a `local` route for each
//!   range, so a VIP packet that is not DNATed is answered by the node
//!   itself (a TCP reset, or a server the node runs) rather than forwarded
//!   anywhere. The second node has no such route (it runs no agent): it
//!   sends VIP packets to the node like everything else that is not its own.
//!
//! With [`PodNetwork::Bridge`] the node's pods sit instead on a Linux bridge
//! `pods0` of the node (198.18.1.1/24 and 2001:2::1:1/112, each pod
//! 198.18.1.<10+i>/24 and its IPv6 address /112 with default routes via the
//! gateway and routes to the second node's pods (198.18.1.224/27,
//! 2001:2::1:e0/123) via it too, since those are not on the bridge; the node
//! ends of the pod veths are bridge ports, optionally with `hairpin_mode`
//! on), as with bridge CNI plugins. The second node's pods are always
//! routed.
//!
//! Links are routed point-to-point (/32 and /128 with a peer route), so each
//! pod and the client have default routes via their node and each node has
//! a host route per pod; the node routes the second node's pods via the
//! second node, which routes everything else via the node. IPv6 addresses
//! are added without duplicate address detection (`nodad`, and DAD off in
//! every namespace), so they work at once. The namespaces have no link to
//! the host namespace, so topologies never clash and can all use the same
//! addresses; only the namespace names are unique:
//! `pxt<pid>-<counter>-node|client|pod<i>|node2|node2-pod<j>`. Interfaces are
//! created inside the namespaces, so their names never clash either.
//!
//! Every pod runs a `pod-server` named like the pod (`pod-<i>`,
//! `node2-pod-<j>`) on `::` (both families): TCP [`POD_TCP_PORT`], UDP
//! [`POD_UDP_PORT`] and, where the kernel has SCTP, SCTP [`POD_SCTP_PORT`]
//! (see [`Topology::sctp_skip_reason`]). Its answers carry the address it
//! saw the client at ([`ClientReport::sources`]).
//!
//! As on a real node, the node's pods run in the node's cgroup (a cgroup v2
//! of the topology's own, [`Topology::cgroup`], where the machine has cgroup
//! v2), which [`Topology::agent_config`] gives the agent as `--cgroup-root`
//! for its socket hooks: every process the topology starts in one of the
//! node's pods (its pod-server, [`Topology::run_client_in`],
//! [`Topology::spawn_in`], [`Topology::exec_in`]) is under the hooks.
//! Processes of the node namespace, the client and the second node and its
//! pods are not (other machines, or node processes that scenarios run
//! outside the hooks on purpose; [`Topology::run_client_in_cgroup`] puts
//! one in).
use std::{
    ffi::OsStr,
    io::Read,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::agent::CgroupDir;
pub use crate::{
    agent::{Agent, AgentConfig, AgentSource, BpfFs, CgroupMember, agent_binary},
    client::{ClientOptions, ClientReport, Protocol},
    manifests::{
        Endpoint, IpFamily, ManifestsDir, NodeSpec, ServicePort, ServiceSpec, SliceEndpoint,
    },
    server::ServerPorts,
};

/// The node's address, on all its links.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
/// The node's IPv6 address, on all its links.
pub const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 1);
/// The client's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
/// The client's IPv6 address.
pub const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 2);
/// The second node's address, on all its links.
pub const NODE2_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);
/// The second node's IPv6 address, on all its links.
pub const NODE2_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 3);
/// Where service VIPs come from; local to the node (see the module docs).
pub const SERVICE_RANGE: &str = "198.19.0.0/16";
/// Where IPv6 service VIPs come from; local to the node.
pub const SERVICE_RANGE_V6: &str = "2001:2:0:ff::/64";
/// The IPv4 pod range: every pod of both nodes, neither node nor the client.
pub const CLUSTER_CIDR_V4: &str = "198.18.1.0/24";
/// The IPv6 pod range, likewise.
pub const CLUSTER_CIDR_V6: &str = "2001:2::1:0/112";
/// Both pod ranges, as the agent's `--cluster-cidr` takes them.
pub const CLUSTER_CIDR: &str = "198.18.1.0/24,2001:2::1:0/112";
/// The most pods the node can have (198.18.1.10 to 198.18.1.209).
pub const MAX_PODS: usize = 200;
/// The most pods the second node can have (198.18.1.224 to 198.18.1.253).
pub const MAX_REMOTE_PODS: usize = 30;
/// The port every pod-server serves TCP on.
pub const POD_TCP_PORT: u16 = 8080;
/// The port every pod-server serves UDP on.
pub const POD_UDP_PORT: u16 = 5353;
/// The TCP port every pod-server serves sessions on (each line answered,
/// the connection kept open).
pub const POD_SESSION_PORT: u16 = 8081;
/// The port every pod-server serves SCTP on, where the kernel has SCTP.
pub const POD_SCTP_PORT: u16 = 9090;
/// The Node name used unless the builder is told otherwise.
pub const DEFAULT_NODE_NAME: &str = "test-node";
/// The second node's Node name unless the builder is told otherwise.
pub const DEFAULT_NODE2_NAME: &str = "test-node2";

/// Prefix of every namespace this harness creates.
const NETNS_PREFIX: &str = "pxt";
fn client_args(options: &ClientOptions) -> Vec<String> {
    vec![
        options.protocol.as_str().to_string(),
        options.target.to_string(),
        "--count".to_string(),
        options.count.to_string(),
        "--timeout-ms".to_string(),
        options.timeout.as_millis().to_string(),
        "--parallel".to_string(),
        options.parallel.to_string(),
    ]
}

fn parse_report(stdout: &str) -> anyhow::Result<ClientReport> {
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("parsing pod-client output {stdout:?}"))
}

/// Routes the second node's pods, in namespace `ns`, via `v4`/`v6` on `dev`.
fn route_remote_pods(ns: &str, v4: Ipv4Addr, v6: Ipv6Addr, dev: &str) -> anyhow::Result<()> {
    for (range, via) in [
        (REMOTE_PODS_V4, v4.to_string()),
        (REMOTE_PODS_V6, v6.to_string()),
    ] {
        ip(&[
            "-n", ns, "route", "add", range, "via", &via, "dev", dev, "onlink",
        ])?;
    }
    Ok(())
}

/// The last octet of the first pod of the second node.
const REMOTE_POD_BASE: u8 = 224;
/// The second node's pods, as one prefix per family.
const REMOTE_PODS_V4: &str = "198.18.1.224/27";
const REMOTE_PODS_V6: &str = "2001:2::1:e0/123";

/// The IPv6 address of the pod with IPv4 address 198.18.1.`n`.
fn pod_ip6_of(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 1, u16::from(n))
}

/// The address of pod `index`.
pub fn pod_ip(index: usize) -> Ipv4Addr {
    assert!(index < MAX_PODS, "pod index {index} out of range");
    Ipv4Addr::new(198, 18, 1, 10 + index as u8)
}

/// The IPv6 address of pod `index` (2001:2::1:a for pod 0).
pub fn pod_ip6(index: usize) -> Ipv6Addr {
    assert!(index < MAX_PODS, "pod index {index} out of range");
    pod_ip6_of(10 + index as u8)
}

/// The name of pod `index`, which is also what its server answers.
pub fn pod_name(index: usize) -> String {
    format!("pod-{index}")
}

/// The address of the second node's pod `index`.
pub fn remote_pod_ip(index: usize) -> Ipv4Addr {
    assert!(
        index < MAX_REMOTE_PODS,
        "remote pod index {index} out of range"
    );
    Ipv4Addr::new(198, 18, 1, REMOTE_POD_BASE + index as u8)
}

/// The IPv6 address of the second node's pod `index` (2001:2::1:e0 for 0).
pub fn remote_pod_ip6(index: usize) -> Ipv6Addr {
    assert!(
        index < MAX_REMOTE_PODS,
        "remote pod index {index} out of range"
    );
    pod_ip6_of(REMOTE_POD_BASE + index as u8)
}

/// The name of the second node's pod `index`: `node2-pod-<index>`.
pub fn remote_pod_name(index: usize) -> String {
    format!("node2-pod-{index}")
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

    /// `POD_SERVER_BIN`/`POD_CLIENT_BIN` if set (the VM stage runs copies
    /// without debug info), else the binaries cargo built for the test
    /// (`env!("CARGO_BIN_EXE_pod-server")`, ...).
    pub fn built(pod_server: &str, pod_client: &str) -> Self {
        match (
            std::env::var_os("POD_SERVER_BIN"),
            std::env::var_os("POD_CLIENT_BIN"),
        ) {
            (Some(server), Some(client)) => ToolPaths::new(server, client),
            _ => ToolPaths::new(pod_server, pod_client),
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

/// A command that runs `program` inside namespace `ns` as a member of
/// `cgroup` (a cgroup v2 directory) if given, else as [`netns_command`].
///
/// A shell joins the cgroup and then becomes `ip netns exec`, which
/// becomes `program`: nothing of it runs outside the cgroup, and the
/// spawned process id is the program's.
pub fn netns_command_in(ns: &str, cgroup: Option<&Path>, program: impl AsRef<OsStr>) -> Command {
    let Some(cgroup) = cgroup else {
        return netns_command(ns, program);
    };
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg("echo $$ > \"$0/cgroup.procs\" && exec \"$@\"")
        .arg(cgroup)
        .args(["ip", "netns", "exec", ns])
        .arg(program);
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
    spawn_quiet(netns_command(ns, program).args(args))
}

/// Starts `command` in the background, output discarded.
fn spawn_quiet(command: &mut Command) -> anyhow::Result<ChildGuard> {
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    ChildGuard::spawn(command)
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

    /// The process id; `ip netns exec` (and the cgroup wrapper of
    /// [`netns_command_in`]) execs the program, so this is the program
    /// itself.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The read end of the process's stdout, if it was piped
    /// ([`Stdio::piped`]) and not taken yet.
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    /// The read end of the process's stderr, if it was piped and not taken
    /// yet.
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.stderr.take()
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
    /// Creates namespace `name` with loopback up and IPv6 duplicate address
    /// detection off (for interfaces made from then on), so IPv6 addresses
    /// are usable at once.
    pub fn create(name: String) -> anyhow::Result<Self> {
        ip(&["netns", "add", &name]).with_context(|| format!("creating namespace {name}"))?;
        let netns = Netns { name };
        ip(&["-n", &netns.name, "link", "set", "lo", "up"])?;
        netns.sysctls(&[
            ("net.ipv6.conf.all.accept_dad", "0"),
            ("net.ipv6.conf.default.accept_dad", "0"),
        ])?;
        Ok(netns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets a sysctl inside the namespace (the net.* ones are per namespace).
    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.sysctls(&[(key, value)])
    }

    /// Sets sysctls inside the namespace, in order. Writes /proc/sys from a
    /// thread that entered the namespace (/proc/sys/net shows the writer's
    /// namespace), which saves a process per sysctl.
    pub fn sysctls(&self, settings: &[(&str, &str)]) -> anyhow::Result<()> {
        in_netns(&self.name, || -> anyhow::Result<()> {
            for (key, value) in settings {
                let path = Path::new("/proc/sys").join(key.replace('.', "/"));
                std::fs::write(&path, value)
                    .with_context(|| format!("setting {key}={value} in {}", self.name))?;
            }
            Ok(())
        })?
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
    /// A veth per pod with point-to-point /32 and /128 routes (the default).
    Routed,
    /// Pods on the node's bridge `pods0`; `hairpin` sets `hairpin_mode` on
    /// the bridge ports (a frame may go back out the port it came in on).
    Bridge { hairpin: bool },
}

/// The node's bridge for [`PodNetwork::Bridge`], and its addresses there.
pub const POD_BRIDGE: &str = "pods0";
pub const POD_GATEWAY_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
pub const POD_GATEWAY_IP6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 1, 1);

/// Configures a topology; see the module documentation.
#[derive(Clone, Debug)]
pub struct TopologyBuilder {
    pod_network: PodNetwork,
    backends: usize,
    node_name: String,
    /// Pods of the second node; `None`: no second node.
    second_node: Option<usize>,
    node2_name: String,
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

    /// Adds a second node (namespace `<id>-node2`, [`NODE2_IP`]) with `pods`
    /// routed pods of its own (`node2-pod-<j>`); see the module docs.
    pub fn second_node(mut self, pods: usize) -> Self {
        self.second_node = Some(pods);
        self
    }

    /// The second node's Node name (default [`DEFAULT_NODE2_NAME`]); its
    /// pods' endpoints carry it as `nodeName`.
    pub fn second_node_name(mut self, name: impl Into<String>) -> Self {
        self.node2_name = name.into();
        self
    }

    /// Where pod-server and pod-client are (default: [`ToolPaths::locate`]).
    pub fn tools(mut self, tools: ToolPaths) -> Self {
        self.tools = Some(tools);
        self
    }

    /// Creates the namespaces, links and pod servers, and waits (bounded)
    /// until the client reaches every pod directly, over both families.
    pub fn build(self) -> anyhow::Result<Topology> {
        anyhow::ensure!(
            self.backends <= MAX_PODS,
            "at most {MAX_PODS} backends, asked for {}",
            self.backends
        );
        let remote_count = self.second_node.unwrap_or(0);
        anyhow::ensure!(
            remote_count <= MAX_REMOTE_PODS,
            "at most {MAX_REMOTE_PODS} pods on the second node, asked for {remote_count}"
        );
        let tools = match self.tools {
            Some(tools) => tools,
            None => ToolPaths::locate()?,
        };
        anyhow::ensure!(
            tools.exist(),
            "pod-server/pod-client missing at {tools:?}: run `cargo build -p proxy-tests`"
        );
        let sctp_skip_reason = crate::client::sctp_skip_reason();
        remove_stale_namespaces();
        let id = format!("{NETNS_PREFIX}{}", crate::unique_suffix());

        let node = Netns::create(format!("{id}-node"))?;
        node.sysctls(&[
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
        ])?;
        // The node takes the whole service ranges as local, so a packet to a
        // VIP that the agent does not DNAT is answered by the node itself: a
        // TCP reset (or a server of the node's) at once. Without this the
        // node would drop it with a rate-limited ICMP error, and clients
        // would mostly wait for their timeouts.
        for range in [SERVICE_RANGE, SERVICE_RANGE_V6] {
            ip(&[
                "-n",
                node.name(),
                "route",
                "add",
                "local",
                range,
                "dev",
                "lo",
            ])?;
        }
        let client = Netns::create(format!("{id}-client"))?;
        let node_addrs = Addrs::new(NODE_IP, NODE_IP6);
        link(
            &node,
            "to-client",
            node_addrs,
            &client,
            Addrs::new(CLIENT_IP, CLIENT_IP6),
        )?;

        if let PodNetwork::Bridge { .. } = self.pod_network {
            let n = node.name();
            ip(&[
                "-n",
                n,
                "link",
                "add",
                POD_BRIDGE,
                "type",
                "bridge",
                // No MLD snooping: neighbour discovery floods like ARP.
                "mcast_snooping",
                "0",
            ])?;
            ip(&["-n", n, "link", "set", POD_BRIDGE, "up"])?;
            for gateway in [
                format!("{POD_GATEWAY_IP}/24"),
                format!("{POD_GATEWAY_IP6}/112"),
            ] {
                ip(&["-n", n, "addr", "add", &gateway, "dev", POD_BRIDGE, "nodad"])?;
            }
        }
        let server_args = |name: &str| -> Vec<String> {
            let mut args = vec![
                "--name".to_string(),
                name.to_string(),
                "--tcp".to_string(),
                POD_TCP_PORT.to_string(),
                "--udp".to_string(),
                POD_UDP_PORT.to_string(),
                "--session".to_string(),
                POD_SESSION_PORT.to_string(),
            ];
            if sctp_skip_reason.is_none() {
                args.extend(["--sctp".to_string(), POD_SCTP_PORT.to_string()]);
            }
            args
        };
        // The node's cgroup, for its pods' processes (see the module docs).
        // Declared before the pods, so that on an error below their
        // servers are gone before it is removed.
        let cgroup = CgroupDir::create().context("creating the node's cgroup")?;
        let mut pods = Vec::with_capacity(self.backends);
        for index in 0..self.backends {
            let ns = Netns::create(format!("{id}-pod{index}"))?;
            let node_if = format!("to-pod{index}");
            let addrs = Addrs::new(pod_ip(index), pod_ip6(index));
            match self.pod_network {
                PodNetwork::Routed => link(&node, &node_if, node_addrs, &ns, addrs)?,
                PodNetwork::Bridge { hairpin } => {
                    bridge_port(&node, &node_if, &ns, addrs, hairpin)?;
                }
            }
            let name = pod_name(index);
            let server = spawn_quiet(
                netns_command_in(
                    ns.name(),
                    cgroup.as_ref().map(CgroupDir::path),
                    &tools.pod_server,
                )
                .args(server_args(&name)),
            )?;
            pods.push(Pod {
                name,
                ip: addrs.v4,
                ip6: addrs.v6,
                node_name: self.node_name.clone(),
                server,
                ns,
            });
        }

        let mut remote_pods = Vec::with_capacity(remote_count);
        let node2 = match self.second_node {
            None => None,
            Some(_) => {
                let node2 = Netns::create(format!("{id}-node2"))?;
                node2.sysctls(&[
                    ("net.ipv4.ip_forward", "1"),
                    ("net.ipv6.conf.all.forwarding", "1"),
                ])?;
                let node2_addrs = Addrs::new(NODE2_IP, NODE2_IP6);
                // node2's default routes go via the node: the client and
                // the node's pods are reached that way.
                link_named(
                    &node,
                    "to-node2",
                    node_addrs,
                    &node2,
                    "to-node1",
                    node2_addrs,
                )?;
                route_remote_pods(node.name(), NODE2_IP, NODE2_IP6, "to-node2")?;
                for index in 0..remote_count {
                    let ns = Netns::create(format!("{id}-node2-pod{index}"))?;
                    let addrs = Addrs::new(remote_pod_ip(index), remote_pod_ip6(index));
                    link(&node2, &format!("to-pod{index}"), node2_addrs, &ns, addrs)?;
                    let name = remote_pod_name(index);
                    let server = spawn_in(ns.name(), &tools.pod_server, &server_args(&name))?;
                    remote_pods.push(Pod {
                        name,
                        ip: addrs.v4,
                        ip6: addrs.v6,
                        node_name: self.node2_name.clone(),
                        server,
                        ns,
                    });
                }
                Some(node2)
            }
        };
        if let PodNetwork::Bridge { .. } = self.pod_network
            && node2.is_some()
        {
            // The second node's pods are inside the bridge's on-link prefix
            // but not on the bridge: route them via the gateway.
            for pod in &pods {
                route_remote_pods(pod.ns(), POD_GATEWAY_IP, POD_GATEWAY_IP6, "eth0")?;
            }
        }
        let mut topology = Topology {
            pods,
            remote_pods,
            client,
            node2,
            node,
            node_name: self.node_name,
            node2_name: self.node2_name,
            sctp_skip_reason,
            tools,
            cgroup,
        };
        topology.wait_for_pods()?;
        Ok(topology)
    }
}

/// An address of each family, for one end of a link.
#[derive(Clone, Copy, Debug)]
struct Addrs {
    v4: Ipv4Addr,
    v6: Ipv6Addr,
}

impl Addrs {
    fn new(v4: Ipv4Addr, v6: Ipv6Addr) -> Self {
        Addrs { v4, v6 }
    }

    /// The address and the host-route prefix length of each family.
    fn each(self) -> [(IpAddr, u8); 2] {
        [(IpAddr::V4(self.v4), 32), (IpAddr::V6(self.v6), 128)]
    }
}

/// Connects `node` and `other` with a veth pair: `node_if` in the node,
/// `eth0` in the other namespace, /32 and /128 addresses with peer routes,
/// and default routes from the other namespace via the node.
fn link(
    node: &Netns,
    node_if: &str,
    node_addrs: Addrs,
    other: &Netns,
    other_addrs: Addrs,
) -> anyhow::Result<()> {
    link_named(node, node_if, node_addrs, other, "eth0", other_addrs)
}

/// [`link`] with the other end called `other_if`.
fn link_named(
    node: &Netns,
    node_if: &str,
    node_addrs: Addrs,
    other: &Netns,
    other_if: &str,
    other_addrs: Addrs,
) -> anyhow::Result<()> {
    let (n, o) = (node.name(), other.name());
    ip(&[
        "-n", n, "link", "add", node_if, "type", "veth", "peer", "name", other_if, "netns", o,
    ])?;
    // Up before the addresses: an IPv6 address added to a down interface
    // gets no route to its peer when the interface comes up.
    ip(&["-n", n, "link", "set", node_if, "up"])?;
    ip(&["-n", o, "link", "set", other_if, "up"])?;
    for ((node_ip, len), (other_ip, _)) in node_addrs.each().into_iter().zip(other_addrs.each()) {
        let (node_ip, other_ip) = (node_ip.to_string(), other_ip.to_string());
        ip(&[
            "-n",
            n,
            "addr",
            "add",
            &node_ip,
            "peer",
            &format!("{other_ip}/{len}"),
            "dev",
            node_if,
            "nodad",
        ])?;
        ip(&[
            "-n",
            o,
            "addr",
            "add",
            &other_ip,
            "peer",
            &format!("{node_ip}/{len}"),
            "dev",
            other_if,
            "nodad",
        ])?;
    }
    for (node_ip, _) in node_addrs.each() {
        ip(&[
            "-n",
            o,
            "route",
            "add",
            "default",
            "via",
            &node_ip.to_string(),
            "dev",
            other_if,
            // The gateway is the peer of a /32 or /128 address, so it is
            // on-link; saying so skips the kernel's next-hop check, which
            // races with the veth's carrier coming up (IPv6 answered "No
            // route to host" now and then).
            "onlink",
        ])?;
    }
    Ok(())
}

/// Connects `pod` to the node's bridge: `node_if` becomes a port of
/// [`POD_BRIDGE`], `eth0` in the pod gets its addresses (/24 and /112) and
/// default routes via [`POD_GATEWAY_IP`] and [`POD_GATEWAY_IP6`].
fn bridge_port(
    node: &Netns,
    node_if: &str,
    pod: &Netns,
    addrs: Addrs,
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
    ip(&["-n", o, "link", "set", "eth0", "up"])?;
    for address in [format!("{}/24", addrs.v4), format!("{}/112", addrs.v6)] {
        ip(&["-n", o, "addr", "add", &address, "dev", "eth0", "nodad"])?;
    }
    for gateway in [POD_GATEWAY_IP.to_string(), POD_GATEWAY_IP6.to_string()] {
        ip(&[
            "-n", o, "route", "add", "default", "via", &gateway, "dev", "eth0", "onlink",
        ])?;
    }
    Ok(())
}

/// A backend pod: its namespace and the pod-server in it.
pub struct Pod {
    /// `pod-<i>` (`node2-pod-<j>` on the second node); also what its server
    /// answers.
    pub name: String,
    pub ip: Ipv4Addr,
    pub ip6: Ipv6Addr,
    /// The Node it runs on.
    node_name: String,
    // Declared before `ns` so the server stops before its namespace goes.
    server: ChildGuard,
    ns: Netns,
}

impl Pod {
    pub fn ns(&self) -> &str {
        self.ns.name()
    }

    /// The Node name of the node this pod runs on.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// Its address of `family`.
    pub fn ip_of(&self, family: IpFamily) -> IpAddr {
        match family {
            IpFamily::V4 => IpAddr::V4(self.ip),
            IpFamily::V6 => IpAddr::V6(self.ip6),
        }
    }

    /// This pod as an EndpointSlice endpoint (IPv4).
    pub fn endpoint(&self) -> Endpoint {
        self.endpoint_of(IpFamily::V4)
    }

    /// This pod as an IPv6 EndpointSlice endpoint.
    pub fn endpoint_v6(&self) -> Endpoint {
        self.endpoint_of(IpFamily::V6)
    }

    /// This pod as an endpoint of `family`.
    pub fn endpoint_of(&self, family: IpFamily) -> Endpoint {
        Endpoint {
            pod: self.name.clone(),
            ip: self.ip_of(family),
        }
    }

    /// This pod as an endpoint of `family` on its node (`nodeName` set, so
    /// the second node's pods are remote to the agent); ready and serving.
    pub fn slice_endpoint(&self, family: IpFamily) -> SliceEndpoint {
        SliceEndpoint::from(self.endpoint_of(family)).on(&self.node_name)
    }
}

/// A built topology; everything in it is removed on drop, pods first.
pub struct Topology {
    pods: Vec<Pod>,
    remote_pods: Vec<Pod>,
    client: Netns,
    node2: Option<Netns>,
    node: Netns,
    node_name: String,
    node2_name: String,
    /// Why pods do not serve SCTP, or `None` when they do.
    sctp_skip_reason: Option<String>,
    tools: ToolPaths,
    /// The node's cgroup, holding its pods' processes (`None` without
    /// cgroup v2). Last, so it is removed after every process of the
    /// topology is gone (a cgroup must be empty to go).
    cgroup: Option<CgroupDir>,
}

/// How long to wait for something that should work at once (pods to listen,
/// the agent to program a service).
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the agent may take to serve after it starts: [`READY_TIMEOUT`],
/// or `PROXY_TESTS_READY_TIMEOUT_SECS` for slow runs (a VM under software
/// emulation takes minutes to verify the programs).
pub fn start_timeout() -> Duration {
    std::env::var("PROXY_TESTS_READY_TIMEOUT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(READY_TIMEOUT, Duration::from_secs)
}

/// How long a change may take to show in traffic: 10 s, or
/// `PROXY_TESTS_CONVERGE_SECS` for slow runs (in a VM under software
/// emulation the debug agent's sync, a process start at a time, can take
/// several seconds). Only a failing wait lasts this long.
pub fn converge_timeout() -> Duration {
    std::env::var("PROXY_TESTS_CONVERGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(10), Duration::from_secs)
}

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
            second_node: None,
            node2_name: DEFAULT_NODE2_NAME.to_string(),
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

    /// The second node's namespace, if the topology has one.
    pub fn node2_ns(&self) -> Option<&str> {
        self.node2.as_ref().map(Netns::name)
    }

    /// The second node's Node name, if the topology has a second node.
    pub fn node2_name(&self) -> Option<&str> {
        self.node2.as_ref().map(|_| self.node2_name.as_str())
    }

    /// The node's Node object: its name, both addresses, no zone.
    pub fn node_spec(&self) -> NodeSpec {
        NodeSpec::new(&self.node_name, IpAddr::V4(NODE_IP)).internal_ip(IpAddr::V6(NODE_IP6))
    }

    /// The second node's Node object, if there is a second node.
    pub fn node2_spec(&self) -> Option<NodeSpec> {
        self.node2_name().map(|name| {
            NodeSpec::new(name, IpAddr::V4(NODE2_IP)).internal_ip(IpAddr::V6(NODE2_IP6))
        })
    }

    /// The node's pods.
    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    pub fn pod(&self, index: usize) -> &Pod {
        &self.pods[index]
    }

    /// The second node's pods (empty without a second node).
    pub fn remote_pods(&self) -> &[Pod] {
        &self.remote_pods
    }

    pub fn remote_pod(&self, index: usize) -> &Pod {
        &self.remote_pods[index]
    }

    /// Every pod: the node's, then the second node's.
    pub fn all_pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.iter().chain(&self.remote_pods)
    }

    /// Why the pods serve no SCTP (on [`POD_SCTP_PORT`]), or `None` when
    /// they do.
    pub fn sctp_skip_reason(&self) -> Option<&str> {
        self.sctp_skip_reason.as_deref()
    }

    pub fn tools(&self) -> &ToolPaths {
        &self.tools
    }

    /// The node's cgroup, which holds the processes of its pods and which
    /// the agent's socket hooks attach to ([`Topology::agent_config`]);
    /// `None` where the machine has no cgroup v2.
    pub fn cgroup(&self) -> Option<&Path> {
        self.cgroup.as_ref().map(CgroupDir::path)
    }

    /// The cgroup for processes in namespace `ns`: the node's cgroup for
    /// the node's pods, none for every other namespace.
    fn cgroup_of(&self, ns: &str) -> Option<&Path> {
        if self.pods.iter().any(|pod| pod.ns() == ns) {
            self.cgroup()
        } else {
            None
        }
    }

    /// A command that runs `program` in namespace `ns`; in the node's
    /// cgroup when `ns` is one of the node's pods' (see the module docs).
    pub fn command_in(&self, ns: &str, program: impl AsRef<OsStr>) -> Command {
        netns_command_in(ns, self.cgroup_of(ns), program)
    }

    /// Endpoints (IPv4) for the node's pods with the given indices.
    pub fn endpoints(&self, indices: &[usize]) -> Vec<Endpoint> {
        indices.iter().map(|&i| self.pods[i].endpoint()).collect()
    }

    /// IPv6 endpoints for the node's pods with the given indices.
    pub fn endpoints_v6(&self, indices: &[usize]) -> Vec<Endpoint> {
        indices
            .iter()
            .map(|&i| self.pods[i].endpoint_v6())
            .collect()
    }

    /// Endpoints of `family`, each with its node, for the node's pods in
    /// `local` and the second node's pods in `remote`.
    pub fn slice_endpoints(
        &self,
        family: IpFamily,
        local: &[usize],
        remote: &[usize],
    ) -> Vec<SliceEndpoint> {
        let local = local.iter().map(|&i| &self.pods[i]);
        let remote = remote.iter().map(|&j| &self.remote_pods[j]);
        local
            .chain(remote)
            .map(|pod| pod.slice_endpoint(family))
            .collect()
    }

    /// Runs `program args` in namespace `ns` (in the node's cgroup when a
    /// pod's of the node); see [`exec_in`].
    pub fn exec_in<S: AsRef<OsStr>>(
        &self,
        ns: &str,
        program: impl AsRef<OsStr>,
        args: &[S],
    ) -> anyhow::Result<String> {
        run(self.command_in(ns, program).args(args))
    }

    /// Starts `program args` in namespace `ns` (in the node's cgroup when a
    /// pod's of the node); see [`spawn_in`].
    pub fn spawn_in<S: AsRef<OsStr>>(
        &self,
        ns: &str,
        program: impl AsRef<OsStr>,
        args: &[S],
    ) -> anyhow::Result<ChildGuard> {
        spawn_quiet(self.command_in(ns, program).args(args))
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
        let ports = ServerPorts {
            tcp: Some(tcp_port),
            udp: Some(udp_port),
            ..ServerPorts::default()
        };
        self.spawn_server_ports(ns, name, bind, ports)
    }

    /// Starts a pod-server named `name` in namespace `ns` serving `ports`
    /// on `bind` (`::` for both families).
    pub fn spawn_server_ports(
        &self,
        ns: &str,
        name: &str,
        bind: IpAddr,
        ports: ServerPorts,
    ) -> anyhow::Result<ChildGuard> {
        let mut args = vec![
            "--name".to_string(),
            name.to_string(),
            "--bind".to_string(),
            bind.to_string(),
        ];
        for (flag, port) in [
            ("--tcp", ports.tcp),
            ("--udp", ports.udp),
            ("--sctp", ports.sctp),
            ("--session", ports.session),
        ] {
            if let Some(port) = port {
                args.extend([flag.to_string(), port.to_string()]);
            }
        }
        self.spawn_in(ns, &self.tools.pod_server, &args)
    }

    /// Runs pod-client in the client namespace.
    pub fn run_client(&self, options: &ClientOptions) -> anyhow::Result<ClientReport> {
        self.run_client_in(self.client_ns(), options)
    }

    /// Runs pod-client in namespace `ns`: a pod's (in-cluster traffic,
    /// hairpin; in the node's cgroup for the node's pods), a node's, or the
    /// client's.
    pub fn run_client_in(&self, ns: &str, options: &ClientOptions) -> anyhow::Result<ClientReport> {
        let stdout = self.exec_in(ns, &self.tools.pod_client, &client_args(options))?;
        parse_report(&stdout)
    }

    /// Runs pod-client in namespace `ns` as a member of cgroup `cgroup` (a
    /// node process under the agent's socket hooks).
    pub fn run_client_in_cgroup(
        &self,
        ns: &str,
        cgroup: &Path,
        options: &ClientOptions,
    ) -> anyhow::Result<ClientReport> {
        let mut command = netns_command_in(ns, Some(cgroup), &self.tools.pod_client);
        parse_report(&run(command.args(client_args(options)))?)
    }

    /// `count` TCP connections from the client to `ip:port`.
    pub fn client_tcp(&self, ip: IpAddr, port: u16, count: u64) -> anyhow::Result<ClientReport> {
        self.run_client(&self.client_options(Protocol::Tcp, ip, port, count))
    }

    /// `count` UDP exchanges from the client to `ip:port`.
    pub fn client_udp(&self, ip: IpAddr, port: u16, count: u64) -> anyhow::Result<ClientReport> {
        self.run_client(&self.client_options(Protocol::Udp, ip, port, count))
    }

    /// `count` SCTP associations from the client to `ip:port`.
    pub fn client_sctp(&self, ip: IpAddr, port: u16, count: u64) -> anyhow::Result<ClientReport> {
        self.run_client(&self.client_options(Protocol::Sctp, ip, port, count))
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
    /// `bpffs`, its socket hooks on the node's cgroup ([`Topology::cgroup`]).
    pub fn agent_config(&self, binary: &Path, bpffs: &BpfFs, source: AgentSource) -> AgentConfig {
        AgentConfig {
            binary: binary.to_path_buf(),
            netns: self.node_ns().to_string(),
            source,
            bpf_root: bpffs.agent_root(),
            node_name: self.node_name.clone(),
            mode: "ebpf".to_string(),
            extra_args: Vec::new(),
            cgroup: self.cgroup().map(Path::to_path_buf),
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

    /// Waits until the client reaches every pod directly: TCP and UDP over
    /// IPv4, TCP over IPv6, and SCTP over IPv4 where served. Proves the
    /// namespaces, links, routes and servers work. The probes run in this
    /// process (a thread in the client namespace), not through pod-client,
    /// to keep building cheap.
    fn wait_for_pods(&mut self) -> anyhow::Result<()> {
        let mut probes = Vec::new();
        for (remote, pods) in [(false, &self.pods), (true, &self.remote_pods)] {
            for (index, pod) in pods.iter().enumerate() {
                probes.push((
                    remote,
                    index,
                    Protocol::Tcp,
                    SocketAddr::new(IpAddr::V4(pod.ip), POD_TCP_PORT),
                ));
                probes.push((
                    remote,
                    index,
                    Protocol::Udp,
                    SocketAddr::new(IpAddr::V4(pod.ip), POD_UDP_PORT),
                ));
                probes.push((
                    remote,
                    index,
                    Protocol::Tcp,
                    SocketAddr::new(IpAddr::V6(pod.ip6), POD_TCP_PORT),
                ));
                if self.sctp_skip_reason.is_none() {
                    probes.push((
                        remote,
                        index,
                        Protocol::Sctp,
                        SocketAddr::new(IpAddr::V4(pod.ip), POD_SCTP_PORT),
                    ));
                }
            }
        }
        let start = Instant::now();
        loop {
            let mut pending = Vec::new();
            for (remote, index, protocol, target) in probes {
                let pod = if remote {
                    &mut self.remote_pods[index]
                } else {
                    &mut self.pods[index]
                };
                if let Some(status) = pod.server.exited()? {
                    bail!("pod-server of {} exited: {status}", pod.name);
                }
                let probe = ClientOptions {
                    protocol,
                    target,
                    count: 1,
                    timeout: Duration::from_millis(200),
                    parallel: 1,
                };
                let report = in_netns(self.client.name(), || crate::client::run(&probe))?;
                if report.count(&pod.name) != 1 {
                    pending.push((remote, index, protocol, target, report));
                }
            }
            if pending.is_empty() {
                return Ok(());
            }
            if start.elapsed() >= READY_TIMEOUT {
                let (remote, index, protocol, target, report) = &pending[0];
                let pods = if *remote {
                    &self.remote_pods
                } else {
                    &self.pods
                };
                bail!(
                    "{} did not answer {protocol} on {target} within {READY_TIMEOUT:?} \
                     ({} probes failing): {report:?}",
                    pods[*index].name,
                    pending.len()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
            probes = pending
                .into_iter()
                .map(|(remote, index, protocol, target, _)| (remote, index, protocol, target))
                .collect();
        }
    }
}
