//! Test harness for proxy-agent: test pods (`pod-server`, `pod-client`), a
//! network-namespace topology builder, manifest writing, bpffs and agent
//! guards, and the demo.
//!
//! Everything that creates something on the machine (a namespace, a mount, a
//! process, a directory) is a guard that removes it on `Drop`, so a failing or
//! panicking test leaves nothing behind.
//!
//! Address scheme (see [`netns`]): every topology is a closed set of
//! namespaces with no link to the host, so all topologies use the same
//! addresses from the benchmarking range 198.18.0.0/15 (RFC 2544); only the
//! namespace names differ (`pxt<pid>-<counter>-...`).
pub mod agent;
pub mod apiserver;
pub mod bpf;
pub mod client;
pub mod demo;
pub mod http;
pub mod manifests;
pub mod netns;
pub mod rbac;
pub mod server;

use std::time::{Duration, Instant};

/// Whether this process runs as root (namespaces, mounts and eBPF need it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Why the privileged tests cannot run here, or `None` when they can.
pub fn privileged_skip_reason() -> Option<String> {
    if !is_root() {
        return Some("needs root (network namespaces, bpffs mounts, eBPF)".into());
    }
    if which("ip").is_none() {
        return Some("`ip` (iproute2) is not installed; run `cargo xtask setup`".into());
    }
    None
}

/// Serialises the scenario tests of one test binary: the machine has two
/// cores and some scenarios measure how fast the agent reacts. A failed test
/// poisons the lock; the next one may still run.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether the kernel has IPVS (loading its module if it is one), decided
/// once per test process.
pub fn ipvs_available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let present = || std::path::Path::new("/proc/net/ip_vs").exists();
        present()
            || (std::process::Command::new("modprobe")
                .arg("ip_vs")
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
                && present())
    })
}

/// Whether test `test` must be skipped here, printing why. Writes to stderr
/// directly: the test harness captures `eprintln!` of passing tests.
pub fn skipped(test: &str) -> bool {
    match privileged_skip_reason() {
        Some(reason) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "{test}: skipped: {reason}");
            true
        }
        None => false,
    }
}

/// The first executable called `name` on PATH.
pub fn which(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Calls `attempt` every `interval` until it yields `Some`, for at most
/// `timeout`; returns the value and the time it took.
pub fn poll_until<T>(
    timeout: Duration,
    interval: Duration,
    mut attempt: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<(T, Duration)> {
    let start = Instant::now();
    loop {
        if let Some(value) = attempt()? {
            return Ok((value, start.elapsed()));
        }
        if start.elapsed() >= timeout {
            anyhow::bail!("condition not met within {timeout:?}");
        }
        std::thread::sleep(interval);
    }
}

/// `<pid>-<counter>`: unique among the live harness processes on this
/// machine, and tells which process made a leftover.
pub(crate) fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether a process with this pid exists.
pub(crate) fn process_exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}
