//! Guards for running proxy-agent under test: a bpffs mounted on the host,
//! and the agent process itself.
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};

use crate::netns::{ChildGuard, netns_command, run};

/// The workspace root (the parent of this crate).
pub fn workspace_dir() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// The agent binary: `PROXY_AGENT_BIN` if set, else
/// `<workspace>/target/debug/proxy-agent`.
pub fn agent_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("PROXY_AGENT_BIN") {
        let path = PathBuf::from(path);
        anyhow::ensure!(
            path.is_file(),
            "PROXY_AGENT_BIN={} does not exist: unset it to use target/debug, \
             and run `cargo build -p proxy-agent`",
            path.display()
        );
        return Ok(path);
    }
    let path = workspace_dir().join("target/debug/proxy-agent");
    anyhow::ensure!(
        path.is_file(),
        "proxy-agent binary not found at {}: run `cargo build -p proxy-agent` first \
         (or set PROXY_AGENT_BIN)",
        path.display()
    );
    Ok(path)
}

/// Where the harness keeps per-run directories on the host.
const RUN_DIR: &str = "/run/proxy-tests";

/// A bpffs mounted at a unique host directory, unmounted and removed on drop.
///
/// The agent cannot mount its own: `ip netns exec` gives it a private mount
/// namespace, and a bpffs mounted there would vanish (with its pins) when it
/// exits. Host mounts made before are visible inside `ip netns exec`.
pub struct BpfFs {
    /// `/run/proxy-tests/<pid>-<counter>`, removed on drop.
    dir: PathBuf,
    /// `<dir>/bpffs`, the mount point.
    mount_point: PathBuf,
}

impl BpfFs {
    pub fn mount() -> anyhow::Result<Self> {
        remove_stale_run_dirs();
        let dir = Path::new(RUN_DIR).join(crate::unique_suffix());
        let mount_point = dir.join("bpffs");
        std::fs::create_dir_all(&mount_point)
            .with_context(|| format!("creating {}", mount_point.display()))?;
        let bpffs = BpfFs { dir, mount_point };
        run(Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&bpffs.mount_point))
        .context("mounting a bpffs for the agent")?;
        Ok(bpffs)
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.mount_point
    }

    /// What to pass as the agent's `--bpf-root`.
    pub fn agent_root(&self) -> PathBuf {
        self.mount_point.join("proxy-agent")
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        unmount_and_remove(&self.dir);
    }
}

fn unmount_and_remove(dir: &Path) {
    for mount_point in [dir.join("bpffs"), dir.join("cgroup2")] {
        if !is_mount_point(&mount_point) {
            continue;
        }
        let unmounted = run(Command::new("umount").arg(&mount_point))
            // Busy (a process still has it open): detach it now, the kernel
            // frees it when the last user goes.
            .or_else(|_| run(Command::new("umount").arg("-l").arg(&mount_point)));
        if let Err(error) = unmounted {
            eprintln!("proxy-tests: {error:#}");
            return;
        }
    }
    if let Err(error) = std::fs::remove_dir_all(dir) {
        eprintln!("proxy-tests: removing {}: {error}", dir.display());
    }
}

fn is_mount_point(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    let path = path.to_string_lossy();
    mounts
        .lines()
        .any(|line| line.split_whitespace().nth(1) == Some(&*path))
}

/// Unmounts and removes run directories of harness processes that no longer
/// exist.
fn remove_stale_run_dirs() {
    let Ok(entries) = std::fs::read_dir(RUN_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !crate::process_exists(pid) {
            unmount_and_remove(&entry.path());
        }
    }
}

/// Where the agent reads Services, EndpointSlices and Nodes from.
#[derive(Clone, Debug)]
pub enum AgentSource {
    /// `--manifests DIR`.
    Manifests(PathBuf),
    /// `--kubeconfig FILE` (the Kubernetes API source).
    Kubeconfig(PathBuf),
}

/// How to start the agent.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub binary: PathBuf,
    /// The node namespace it runs in.
    pub netns: String,
    pub source: AgentSource,
    pub bpf_root: PathBuf,
    pub node_name: String,
    /// `--mode`: `ebpf`, `nftables`, `iptables` or `ipvs`.
    pub mode: String,
    /// Appended to `run ...`, e.g. `--interfaces`.
    pub extra_args: Vec<String>,
    /// The cgroup for the socket hooks (`--cgroup-root`), e.g. the node's
    /// cgroup of a [`Topology`](crate::netns::Topology), which holds its
    /// pods' processes; `None`: the agent gets a cgroup of its own.
    pub cgroup: Option<PathBuf>,
}

/// A running `proxy-agent run --mode=<mode>`, logging to a file.
///
/// On drop it stops the agent, runs `proxy-agent cleanup`, and, when the
/// thread is panicking (a failed test), prints the agent's log.
pub struct Agent {
    config: AgentConfig,
    process: ChildGuard,
    log_path: PathBuf,
    /// Skip `cleanup` on drop (see [`Agent::stop_keeping_pins`]).
    keep_pins: bool,
    /// The agent's own cgroup for its socket hooks (`--cgroup-root`) when
    /// the config names none, so they never see the machine's other
    /// processes; removed on drop.
    own_cgroup: Option<CgroupDir>,
    /// Holds the log file's directory; removed on drop.
    _log_dir: tempfile::TempDir,
}

/// How long the agent gets to exit after SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(5);

impl Agent {
    pub fn start(config: AgentConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(
            config.binary.is_file(),
            "proxy-agent binary not found at {}: run `cargo build -p proxy-agent` first",
            config.binary.display()
        );
        let log_dir = tempfile::Builder::new()
            .prefix("proxy-agent-log-")
            .tempdir()
            .context("creating a directory for the agent log")?;
        let log_path = log_dir.path().join("agent.log");
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut command = netns_command(&config.netns, &config.binary);
        command.arg("run").arg(format!("--mode={}", config.mode));
        match &config.source {
            // The agent's state (the manifests' saved copies) in a hidden
            // directory of the test's manifest directory: kept across the
            // test's restarts, gone with the directory.
            AgentSource::Manifests(dir) => command
                .arg("--manifests")
                .arg(dir)
                .arg("--state-dir")
                .arg(dir.join(".agent-state")),
            AgentSource::Kubeconfig(file) => command.arg("--kubeconfig").arg(file),
        };
        command
            .arg("--bpf-root")
            .arg(&config.bpf_root)
            .arg("--hostname-override")
            .arg(&config.node_name)
            .args(["--log-format", "text", "-v"]);
        let own_cgroup = match &config.cgroup {
            Some(_) => None,
            None => CgroupDir::create()?,
        };
        let cgroup = config
            .cgroup
            .as_deref()
            .or(own_cgroup.as_ref().map(CgroupDir::path));
        if let Some(cgroup) = cgroup {
            command.arg("--cgroup-root").arg(cgroup);
        }
        command
            .args(&config.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating the log file")?)
            .stderr(log);
        let process = ChildGuard::spawn(&mut command)?;
        Ok(Agent {
            config,
            process,
            log_path,
            keep_pins: false,
            own_cgroup,
            _log_dir: log_dir,
        })
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
    }

    /// The agent's process ID (`ip netns exec` execs it in place).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The agent's resident memory, from `/proc/<pid>/status`.
    pub fn rss_bytes(&self) -> anyhow::Result<u64> {
        let path = format!("/proc/{}/status", self.pid());
        let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .with_context(|| format!("no VmRSS in {path}"))?;
        Ok(kib * 1024)
    }

    /// The cgroup the agent's socket hooks apply to: the config's, else its
    /// own (`None` where the machine has no cgroup v2). Node processes
    /// started in it reach services through the hooks.
    pub fn cgroup(&self) -> Option<&Path> {
        self.config
            .cgroup
            .as_deref()
            .or(self.own_cgroup.as_ref().map(CgroupDir::path))
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the agent wrote so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path)
            .unwrap_or_else(|error| format!("(reading {}: {error})", self.log_path.display()))
    }

    /// An error, with the log, if the agent has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.process.exited()? {
            bail!(
                "proxy-agent exited ({status}); its log:\n{}",
                indent(&self.log())
            );
        }
        Ok(())
    }

    /// Stops the agent (SIGTERM, then SIGKILL after a grace period) without
    /// cleaning up.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        self.process.terminate(STOP_GRACE)
    }

    /// Stops the agent and leaves its programs and pinned maps in place, as
    /// an agent restart does (the next agent on the same --bpf-root takes
    /// them over).
    pub fn stop_keeping_pins(mut self) -> anyhow::Result<()> {
        self.keep_pins = true;
        self.stop()?;
        Ok(())
    }

    /// Runs `proxy-agent cleanup --bpf-root ...` in the node namespace.
    pub fn cleanup(&self) -> anyhow::Result<Output> {
        let mut command = netns_command(&self.config.netns, &self.config.binary);
        command
            .arg("cleanup")
            .arg("--bpf-root")
            .arg(&self.config.bpf_root)
            .stdin(Stdio::null());
        // Bounded: cleanup only talks to the kernel, but a hung cleanup must
        // not hang the suite.
        ChildGuard::spawn(command.stdout(Stdio::piped()).stderr(Stdio::piped()))?
            .output_within(Duration::from_secs(30))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            eprintln!("proxy-tests: stopping proxy-agent: {error:#}");
        }
        let cleanup = if self.keep_pins {
            None
        } else {
            Some(self.cleanup())
        };
        match cleanup {
            Some(Ok(output)) if !output.status.success() => eprintln!(
                "proxy-tests: proxy-agent cleanup failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
            Some(Err(error)) => eprintln!("proxy-tests: proxy-agent cleanup: {error:#}"),
            Some(Ok(_)) | None => {}
        }
        if std::thread::panicking() {
            eprintln!(
                "---- proxy-agent log ({}) ----\n{}---- end of proxy-agent log ----",
                self.log_path.display(),
                self.log()
            );
        }
    }
}

/// A cgroup v2 directory of the test's own, removed on drop.
///
/// The cgroup v2 hierarchy is mounted again under [`RUN_DIR`]: `ip netns
/// exec` remounts `/sys`, which hides `/sys/fs/cgroup/...` from the agent,
/// while mounts made elsewhere stay visible. Every cgroup2 mount shows the
/// one hierarchy, so the directory is the same cgroup everywhere.
pub struct CgroupDir {
    /// `/run/proxy-tests/<pid>-<counter>`, removed on drop.
    dir: PathBuf,
    /// `<dir>/cgroup2/proxy-tests-<pid>-<counter>`: the cgroup.
    path: PathBuf,
}

impl CgroupDir {
    /// A new cgroup; `None` where the kernel has no cgroup v2 mounted.
    pub fn create() -> anyhow::Result<Option<Self>> {
        if !has_cgroup2() {
            return Ok(None);
        }
        remove_stale_run_dirs();
        let suffix = crate::unique_suffix();
        let dir = Path::new(RUN_DIR).join(&suffix);
        let mount_point = dir.join("cgroup2");
        std::fs::create_dir_all(&mount_point)
            .with_context(|| format!("creating {}", mount_point.display()))?;
        let mut cgroup = CgroupDir {
            path: mount_point.join(format!("proxy-tests-{suffix}")),
            dir,
        };
        if let Err(error) = run(Command::new("mount")
            .args(["-t", "cgroup2", "cgroup2"])
            .arg(&mount_point))
        {
            // Nothing to remove inside; the guard still removes the dir.
            cgroup.path = PathBuf::new();
            return Err(error.context("mounting cgroup2 for the agent's socket hooks"));
        }
        std::fs::create_dir(&cgroup.path)
            .with_context(|| format!("creating cgroup {}", cgroup.path.display()))?;
        Ok(Some(cgroup))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// This process (every thread of it) moved into a cgroup, and back where
/// it was when dropped: for a program whose own threads are a node's pods'
/// clients (the traffic benchmark), which the socket hooks must see.
pub struct CgroupMember {
    back: PathBuf,
}

impl CgroupMember {
    /// Moves this process into `cgroup` (a directory of a cgroup2 mount
    /// whose root is its parent, as [`CgroupDir`] makes them).
    pub fn join(cgroup: &Path) -> anyhow::Result<Self> {
        let own = std::fs::read_to_string("/proc/self/cgroup").context("reading our cgroup")?;
        let relative = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("no cgroup v2 entry in /proc/self/cgroup")?;
        let root = cgroup.parent().context("a cgroup has a parent")?;
        let back = root.join(relative.trim_start_matches('/'));
        move_to(cgroup)?;
        Ok(CgroupMember { back })
    }
}

fn move_to(cgroup: &Path) -> anyhow::Result<()> {
    let procs = cgroup.join("cgroup.procs");
    std::fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("joining {}", procs.display()))
}

impl Drop for CgroupMember {
    fn drop(&mut self) {
        if let Err(e) = move_to(&self.back) {
            eprintln!("proxy-tests: leaving the cgroup: {e:#}");
        }
    }
}

impl Drop for CgroupDir {
    fn drop(&mut self) {
        // Its processes have exited, but the kernel may take a moment to
        // see them out: a bounded retry.
        if !self.path.as_os_str().is_empty() {
            let removed = (0..50).any(|_| {
                let done = std::fs::remove_dir(&self.path).is_ok() || !self.path.exists();
                if !done {
                    std::thread::sleep(Duration::from_millis(20));
                }
                done
            });
            if !removed {
                eprintln!(
                    "proxy-tests: could not remove cgroup {}",
                    self.path.display()
                );
            }
        }
        unmount_and_remove(&self.dir);
    }
}

/// Whether a cgroup v2 hierarchy is mounted anywhere.
fn has_cgroup2() -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .map(|mounts| {
            mounts
                .lines()
                .any(|l| l.split_whitespace().nth(2) == Some("cgroup2"))
        })
        .unwrap_or(false)
}

fn indent(text: &str) -> String {
    text.lines().map(|line| format!("    {line}\n")).collect()
}
