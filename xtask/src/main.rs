//! Project tasks, run as `cargo xtask <task>`:
//! - `setup`: install what a fresh Debian 12 machine lacks (idempotent).
//! - `test`: setup, build the agent, run the whole test suite.
//! - `demo`: setup, build release binaries, run the ClusterIP demo.
//! - `bench`: setup, run the benchmarks (crate `proxy-bench`).
use std::{
    ffi::{OsStr, OsString},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

mod vm;

#[derive(Parser)]
#[command(about = "proxy-agent project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh Debian 12 machine lacks: apt packages, nightly
    /// rust-src, bpf-linker. Skips what is present.
    Setup,
    /// Setup, `cargo build -p proxy-agent`, then `cargo test --workspace`,
    /// then the scenarios that need a kernel this machine lacks (SCTP), in
    /// a VM. With test arguments, only the `cargo test` part, filtered.
    Test {
        /// Passed to the test binaries, e.g. a test name filter.
        #[arg(last = true)]
        test_args: Vec<String>,
    },
    /// Setup, build, then only the scenarios that run in a VM (what `test`
    /// runs last).
    Vm,
    /// Setup, build release binaries, then run the agent on a ClusterIP in
    /// network namespaces on this machine and show which pod answered.
    Demo,
    /// Setup, then the benchmarks: `packet` (per-packet cost of the eBPF
    /// programs), `sync` (API change to programmed map entry), `traffic`
    /// (connections, a stream and UDP packets through a Service in each
    /// mode against the direct path, at 0 to 30 000 services; report and
    /// plots in target/bench; about 2 h with its defaults) and
    /// `dataplane` (full and one-endpoint sync time of each mode at 10 000
    /// services; then every mode again with the ipvs mode in the VM, when
    /// this kernel has no IPVS, or the modes of `--vm-modes=M,...`); all
    /// when none is named.
    Bench {
        /// `packet ARGS`, `sync ARGS`, `traffic ARGS` or `dataplane ARGS` run one benchmark with its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The "never panics on bad input" property tests of the parsers and
    /// decoders (manifests, config file, ctnetlink, IPVS netlink) and the
    /// eBPF programs' mangled-packet test (`BPF_PROG_TEST_RUN`, needs root)
    /// run long: `--cases` each (the test suite runs a few hundred).
    Fuzz {
        #[arg(long, default_value_t = 100_000)]
        cases: u32,
    },
}

/// The names of the fuzzing property tests (libtest filters).
const FUZZ_TESTS: &[&str] = &[
    "never_panics_on",
    "do_not_panic",
    "decode_without_panic",
    "mangled_packets",
];

/// What the eBPF build, the agent and the tests need from Debian.
/// (kubectl is not among them: it is already on the machines.)
const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "bpftool",
    "nftables",
    "iptables",
    "conntrack",
    "iperf3",
];

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let env = Env::new()?;
    match cli.task {
        Task::Setup => setup(&env),
        Task::Test { test_args } => test(&env, &test_args),
        Task::Vm => {
            setup(&env)?;
            run(&mut env.cargo(&["build", "-p", "proxy-agent"]))?;
            vm::run_scenarios(&env)
        }
        Task::Demo => demo(&env),
        Task::Bench { args } => bench(&env, &args),
        Task::Fuzz { cases } => {
            let mut command = env.cargo(&[
                "test",
                "--release",
                "-p",
                "proxy-agent",
                "--lib",
                "--test",
                "datapath_fuzz",
                "--",
            ]);
            command
                .args(FUZZ_TESTS)
                .env("PROXY_FUZZ_CASES", cases.to_string());
            run(&mut command)
        }
    }
}

/// Where things are, and the PATH child processes get.
struct Env {
    workspace: PathBuf,
    target_dir: PathBuf,
    cargo: OsString,
    cargo_bin: PathBuf,
    /// PATH with cargo's bin directory on it (bpf-linker lives there).
    path: OsString,
}

impl Env {
    fn new() -> anyhow::Result<Self> {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask lives in the workspace")?
            .to_path_buf();
        let target_dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace.join("target"));
        let cargo_home = std::env::var_os("CARGO_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
            .context("neither CARGO_HOME nor HOME is set")?;
        let cargo_bin = cargo_home.join("bin");
        let current = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs: Vec<PathBuf> = std::env::split_paths(&current).collect();
        if !dirs.contains(&cargo_bin) {
            dirs.insert(0, cargo_bin.clone());
        }
        let path = std::env::join_paths(dirs).context("building PATH")?;
        Ok(Env {
            workspace,
            target_dir,
            cargo: std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()),
            cargo_bin,
            path,
        })
    }

    /// A command in the workspace with our PATH.
    fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new(program);
        command.current_dir(&self.workspace).env("PATH", &self.path);
        command
    }

    fn cargo<S: AsRef<OsStr>>(&self, args: &[S]) -> Command {
        let mut command = self.command(&self.cargo);
        command.args(args);
        command
    }

    /// Whether `program` is on our PATH.
    fn on_path(&self, program: &str) -> bool {
        std::env::split_paths(&self.path).any(|dir| dir.join(program).is_file())
    }
}

/// Runs a command with inherited output; an error unless it exits 0.
fn run(command: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: running {}", describe(command));
    let status = command
        .status()
        .with_context(|| format!("starting {}", describe(command)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(command));
    }
    Ok(())
}

fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Output of a command that is only asked something; `None` if it fails.
fn query(command: &mut Command) -> Option<String> {
    let output = command.stderr(Stdio::null()).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

fn setup(env: &Env) -> anyhow::Result<()> {
    install_apt_packages(env)?;
    install_rust_src(env)?;
    install_bpf_linker(env)?;
    Ok(())
}

fn apt_installed(env: &Env, package: &str) -> bool {
    query(
        env.command("dpkg-query")
            .args(["-W", "-f=${db:Status-Status}", package]),
    )
    .is_some_and(|status| status.trim() == "installed")
}

fn install_apt_packages(env: &Env) -> anyhow::Result<()> {
    install_packages(env, APT_PACKAGES)
}

/// Installs the Debian `packages` that are missing (apt-get, as root or
/// through sudo).
fn install_packages(env: &Env, packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !apt_installed(env, package))
        .collect();
    if missing.is_empty() {
        eprintln!("xtask: apt packages present");
        return Ok(());
    }
    // apt needs root; use sudo when we are not.
    let apt_get = |args: &[&str]| {
        let mut command = if proxy_tests::is_root() {
            env.command("apt-get")
        } else {
            let mut sudo = env.command("sudo");
            sudo.arg("apt-get");
            sudo
        };
        command.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        command
    };
    run(&mut apt_get(&["update"]))?;
    let mut install = apt_get(&["install", "-y", "--no-install-recommends"]);
    install.args(&missing);
    run(&mut install)
}

fn install_rust_src(env: &Env) -> anyhow::Result<()> {
    let installed = query(env.command("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .is_some_and(|list| list.lines().any(|line| line.trim().starts_with("rust-src")));
    if installed {
        eprintln!("xtask: nightly rust-src present");
        return Ok(());
    }
    run(env
        .command("rustup")
        .args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn install_bpf_linker(env: &Env) -> anyhow::Result<()> {
    if env.on_path("bpf-linker") || env.cargo_bin.join("bpf-linker").is_file() {
        eprintln!("xtask: bpf-linker present");
        return Ok(());
    }
    // bpf-linker links against the system LLVM 22, found through llvm-config.
    let mut path = OsString::from("/usr/lib/llvm-22/bin:");
    path.push(&env.path);
    run(env
        .cargo(&[
            "install",
            "bpf-linker",
            "--locked",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("PATH", path))
}

fn test(env: &Env, test_args: &[String]) -> anyhow::Result<()> {
    setup(env)?;
    run(&mut env.cargo(&["build", "-p", "proxy-agent"]))?;
    let agent = env.target_dir.join("debug/proxy-agent");
    // proxy-ebpf only builds for the BPF target (proxy-agent's build script
    // builds it). Two test threads for two cores; the namespace scenarios
    // serialise themselves.
    let mut command = env.cargo(&[
        "test",
        "--workspace",
        "--exclude",
        "proxy-ebpf",
        "--",
        "--test-threads=2",
    ]);
    command.args(test_args).env("PROXY_AGENT_BIN", &agent);
    run(&mut command)?;
    if test_args.is_empty() {
        // The traffic benchmark once at a tiny size, so that it keeps
        // working; its figures mean nothing at this size.
        let mut traffic = env.cargo(&["run", "-p", "proxy-bench", "--bin", "traffic", "--"]);
        traffic
            .args(TRAFFIC_SMOKE)
            .arg("--out")
            .arg(env.target_dir.join("bench/smoke"))
            .env("PROXY_AGENT_BIN", &agent);
        run(&mut traffic)?;
        vm::run_scenarios(env)?;
    }
    Ok(())
}

/// The traffic benchmark's arguments in `test`: every mode and pod network,
/// a table of 10 services, one repetition of one second.
const TRAFFIC_SMOKE: &[&str] = &[
    "--sizes",
    "0,10",
    "--duration",
    "1s",
    "--iperf-seconds",
    "1",
    "--reps",
    "1",
];

fn demo(env: &Env) -> anyhow::Result<()> {
    setup(env)?;
    build_release_binaries(env)?;
    proxy_tests::demo::run(&env.target_dir.join("release/proxy-agent"))
}

/// The agent and the binaries the test topology runs in its pods, as
/// release builds.
fn build_release_binaries(env: &Env) -> anyhow::Result<()> {
    run(&mut env.cargo(&[
        "build",
        "--release",
        "-p",
        "proxy-agent",
        "-p",
        "proxy-tests",
        "--bins",
    ]))
}

/// `bench [packet|sync|traffic|dataplane] [ARGS]`: every benchmark, or one with its arguments.
fn bench(env: &Env, args: &[String]) -> anyhow::Result<()> {
    setup(env)?;
    let (which, rest) = match args.first().map(String::as_str) {
        Some(w @ ("packet" | "sync" | "dataplane" | "traffic")) => (Some(w), &args[1..]),
        _ => (None, args),
    };
    let bench_bin =
        |name: &str| env.cargo(&["run", "--release", "-p", "proxy-bench", "--bin", name, "--"]);
    if which.is_none_or(|w| w == "packet") {
        run(bench_bin("proxy-bench").args(rest))?;
    }
    if which.is_none_or(|w| w == "sync") {
        // Timing matters: the agent under test is a release build too.
        run(&mut env.cargo(&["build", "--release", "-p", "proxy-agent"]))?;
        let mut command = bench_bin("sync-latency");
        command.env(
            "PROXY_AGENT_BIN",
            env.target_dir.join("release/proxy-agent"),
        );
        if which.is_some() {
            command.args(rest);
        }
        run(&mut command)?;
    }
    if which.is_none_or(|w| w == "traffic") {
        // Timing matters: the agent under test is a release build too, and
        // so are the pods' servers and clients the topology runs.
        build_release_binaries(env)?;
        let mut command = bench_bin("traffic");
        command
            .env(
                "PROXY_AGENT_BIN",
                env.target_dir.join("release/proxy-agent"),
            )
            .arg("--out")
            .arg(env.target_dir.join("bench"));
        if which.is_some() {
            command.args(rest);
        }
        run(&mut command)?;
    }
    if which.is_none_or(|w| w == "dataplane") {
        let rest: &[String] = if which.is_some() { rest } else { &[] };
        // `--vm-modes M,...` (xtask's own): the modes the VM runs, where
        // emulation makes the netfilter modes take hours at 10 000 services.
        let vm_modes = rest
            .iter()
            .find_map(|a| a.strip_prefix("--vm-modes="))
            .map(str::to_string);
        let rest: Vec<String> = rest
            .iter()
            .filter(|a| !a.starts_with("--vm-modes="))
            .cloned()
            .collect();
        let mut command = bench_bin("dataplane-sync");
        command.args(&rest);
        run(&mut command)?;
        // The ipvs mode needs a kernel with IPVS: every mode again (or those
        // of --vm-modes), side by side in the VM, unless the modes were named.
        let named = rest.iter().any(|a| a.starts_with("--modes"));
        if !proxy_tests::ipvs_available() && (!named || vm_modes.is_some()) {
            let binary = env.target_dir.join("release/dataplane-sync");
            let mut args: Vec<String> = rest
                .iter()
                .filter(|a| !a.starts_with("--modes"))
                .cloned()
                .collect();
            let modes = vm_modes
                .unwrap_or_else(|| "ebpf,nftables,iptables,iptables-legacy,ipvs".to_string());
            args.push(format!("--modes={modes}"));
            vm::run_dataplane_bench(env, &binary, &args)?;
        }
    }
    Ok(())
}
