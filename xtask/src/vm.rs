//! Scenarios that need a kernel feature this machine's kernel lacks (SCTP,
//! IPVS), run in a VM: virtme-ng boots Debian's kernel over a
//! snapshot of this machine's filesystem, with KVM where a probe boot
//! shows that it works and under software emulation otherwise, and runs
//! the scenario binary there.
use std::{
    path::{Path, PathBuf},
    process::Stdio,
};

use anyhow::{Context, bail};

use crate::{Env, describe, query, run};

/// The Debian kernel the VM boots; its modules are copied to this
/// machine's /lib/modules, where the VM (sharing the filesystem) finds them.
const KERNEL: &str = "6.12.100+deb12-amd64";
const PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "kmod",
    "busybox-static",
    "ipvsadm",
    "binutils",
];
/// The tests run in the VM (exact test names, each in its test binary)
/// and the modules they need.
const SCENARIOS: &[(TestBinary, &str)] = &[
    (TestBinary::Scenarios, "ebpf::clusterip_sctp"),
    (TestBinary::Scenarios, "nftables::clusterip_sctp"),
    (TestBinary::Scenarios, "iptables::clusterip_sctp"),
    (TestBinary::Scenarios, "iptables_legacy::clusterip_sctp"),
    (
        TestBinary::AgentLib,
        "dataplane::ipvs::netlink::tests::requests_round_trip_through_the_kernel",
    ),
    (
        TestBinary::Modes,
        "switching_modes_removes_the_previous_modes_state_and_cleanup_removes_all",
    ),
    (
        TestBinary::Modes,
        "mode_switches_keep_established_connections_and_lose_no_new_ones",
    ),
];
const MODULES: &[&str] = &["sctp", "ip_vs", "dummy"];

/// The test binaries the VM runs tests of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TestBinary {
    /// proxy-tests' scenario suite (`tests/scenarios.rs`).
    Scenarios,
    /// proxy-agent's unit tests (the kernel round trips of its netlink code).
    AgentLib,
    /// proxy-tests' mode switch (`tests/modes.rs`), with the ipvs mode.
    Modes,
}

impl TestBinary {
    /// `cargo test` arguments that build it, and the line cargo names it by.
    fn cargo_args(self) -> (&'static [&'static str], &'static str) {
        match self {
            TestBinary::Scenarios => (
                &["-p", "proxy-tests", "--test", "scenarios"],
                "Executable tests/scenarios.rs (",
            ),
            TestBinary::AgentLib => (
                &["-p", "proxy-agent", "--lib"],
                "Executable unittests src/lib.rs (",
            ),
            TestBinary::Modes => (
                &["-p", "proxy-tests", "--test", "modes"],
                "Executable tests/modes.rs (",
            ),
        }
    }

    /// The directory it runs in (the scenario suite finds its files from
    /// the tests crate).
    fn dir(self) -> &'static str {
        match self {
            TestBinary::Scenarios | TestBinary::Modes => "tests",
            TestBinary::AgentLib => "proxy-agent",
        }
    }
}
/// How many tests the VM runs at once: one per vCPU.
const LANES: usize = 2;
/// The agent verifies its programs many times slower under emulation.
const READY_TIMEOUT_SECS: &str = "600";
/// How long a scenario waits for a change to show in traffic in the VM:
/// the debug agent's sync is several times slower there than on a host.
const CONVERGE_SECS: &str = "30";

/// Sets the VM up (packages, kernel, virtme-ng) and runs [`SCENARIOS`]
/// in it; an error unless each ran and passed (a skip is a failure here:
/// the VM exists to provide what the scenario would skip for).
pub fn run_scenarios(env: &Env) -> anyhow::Result<()> {
    if !proxy_tests::is_root() {
        eprintln!("xtask: VM scenarios skipped: they need root");
        return Ok(());
    }
    let vm = Vm::prepare(env)?;
    let scenarios = test_binary(env, TestBinary::Scenarios)?;
    let agent_lib = test_binary(env, TestBinary::AgentLib)?;
    let modes = test_binary(env, TestBinary::Modes)?;
    let tests = vm_tests(env, &scenarios)?;

    // The VM reads its files from this machine's through 9p, slowly, and
    // starts every process under emulation: a debug binary's debug info
    // makes it 5-20 times larger than its code and costs seconds a start
    // (pod-client: 2 s of a scenario's 20). The VM runs copies without it.
    let bin = vm.dir.join("bin");
    std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
    let debug = env.target_dir.join("debug");
    let slim = |from: &Path, name: &str| -> anyhow::Result<PathBuf> {
        let to = bin.join(name);
        run(env
            .command("objcopy")
            .arg("--strip-debug")
            .arg(from)
            .arg(&to))?;
        Ok(to)
    };
    let agent = slim(&debug.join("proxy-agent"), "proxy-agent")?;
    let pod_server = slim(&debug.join("pod-server"), "pod-server")?;
    let pod_client = slim(&debug.join("pod-client"), "pod-client")?;
    let scenarios = slim(&scenarios, "scenarios")?;
    let agent_lib = slim(&agent_lib, "agent-lib")?;
    let modes = slim(&modes, "modes")?;
    // Two lanes, one per vCPU, each running its tests one after another
    // into its own results file: under emulation a scenario mostly waits
    // for its single-threaded vCPU, so two at once take less time.
    let script = |tests: &[(TestBinary, String)], lanes: &[PathBuf]| -> String {
        let mut text = String::new();
        for (lane, results) in lanes.iter().enumerate() {
            text.push_str("(\n");
            for (which, scenario) in tests.iter().skip(lane).step_by(LANES) {
                let binary = match which {
                    TestBinary::Scenarios => &scenarios,
                    TestBinary::AgentLib => &agent_lib,
                    TestBinary::Modes => &modes,
                };
                text.push_str(&format!(
                    "cd {dir} && PROXY_TESTS_READY_TIMEOUT_SECS={READY_TIMEOUT_SECS} \
                     PROXY_TESTS_CONVERGE_SECS={CONVERGE_SECS} PROXY_AGENT_BIN={agent} \
                     POD_SERVER_BIN={pod_server} POD_CLIENT_BIN={pod_client} \
                     {binary} --exact {scenario} --nocapture >> {results} 2>&1\n\
                     echo \"VM-RC {scenario} $?\" >> {results}\n",
                    dir = env.workspace.join(which.dir()).display(),
                    agent = agent.display(),
                    pod_server = pod_server.display(),
                    pod_client = pod_client.display(),
                    binary = binary.display(),
                    results = results.display(),
                ));
            }
            text.push_str(") &\n");
        }
        text.push_str("wait\n");
        text
    };
    let read_lanes = |lanes: &[PathBuf]| -> anyhow::Result<String> {
        let mut out = String::new();
        for results in lanes {
            out.push_str(
                &std::fs::read_to_string(results)
                    .with_context(|| format!("the VM wrote no results to {}", results.display()))?,
            );
        }
        Ok(out)
    };
    let lanes: Vec<PathBuf> = (0..LANES)
        .map(|lane| vm.dir.join(format!("results-{lane}.txt")))
        .collect();
    let again: Vec<PathBuf> = (0..LANES)
        .map(|lane| vm.dir.join(format!("results-again-{lane}.txt")))
        .collect();
    for results in lanes.iter().chain(&again) {
        let _ = std::fs::remove_file(results);
    }
    vm.boot(env, "run.sh", &script(&tests, &lanes))?;
    let mut out = read_lanes(&lanes)?;
    // A guest kernel that crashed under emulation (seen once: an int3 of
    // the kernel's own text patching, hit by another vCPU) ends every
    // test still to run: those run again in a new boot, once.
    let not_run: Vec<(TestBinary, String)> = tests
        .iter()
        .filter(|(_, name)| !ran(&out, name))
        .cloned()
        .collect();
    let crashed = std::fs::read(vm.console("run.sh"))
        .is_ok_and(|text| String::from_utf8_lossy(&text).contains("Kernel panic"));
    if crashed && !not_run.is_empty() {
        eprintln!(
            "xtask: the guest kernel crashed (see {}):\n{}\nxtask: running the {} tests that did not run in a new boot",
            vm.console("run.sh").display(),
            vm.console_trouble("run.sh"),
            not_run.len()
        );
        vm.boot(env, "run-again.sh", &script(&not_run, &again))?;
        out.push_str(&read_lanes(&again)?);
    }
    let verdict = verdict(&out, &tests);
    for line in out
        .lines()
        .filter(|l| l.starts_with("test ") || l.contains("skipped"))
    {
        eprintln!("xtask: VM: {line}");
    }
    match verdict {
        Ok(passed) => {
            eprintln!("xtask: VM scenarios: {passed} passed, 0 failed");
            Ok(())
        }
        Err(e) => bail!(
            "VM scenarios: {e}\n{out}\nthe guest kernel's console ({}):\n{}",
            vm.console("run.sh").display(),
            vm.console_trouble("run.sh")
        ),
    }
}

/// The ipvs mode's scenarios of `PROXY_VM_IPVS=quick`: one for each part
/// of the mode (virtual servers of every kind, masquerade, source ranges,
/// graceful termination, stale UDP flows, hairpin, what `list` and
/// `trace` read of it), for a quicker loop
/// while working on it. By default the VM runs every `ipvs::` scenario.
const IPVS_SCENARIOS: &[&str] = &[
    "ipvs::clusterip_dual_stack_tcp_and_udp",
    "ipvs::clusterip_sctp",
    "ipvs::nodeport_on_node_addresses_never_loopback",
    "ipvs::masquerade_all_masquerades_pods_too",
    "ipvs::external_and_load_balancer_ips_with_source_ranges",
    "ipvs::established_flow_survives_backend_removal",
    "ipvs::udp_flow_moves_off_a_removed_backend",
    "ipvs::hairpin_routed",
    "ipvs::list_and_trace_tell_what_the_traffic_does",
    "ipvs::trace_names_the_backend_a_clients_affinity_holds",
];

/// [`SCENARIOS`] and every `ipvs::` scenario (listed by the scenario
/// binary), or only [`IPVS_SCENARIOS`] with `PROXY_VM_IPVS=quick`.
fn vm_tests(env: &Env, scenarios: &Path) -> anyhow::Result<Vec<(TestBinary, String)>> {
    let mut tests: Vec<(TestBinary, String)> = SCENARIOS
        .iter()
        .map(|(b, name)| (*b, name.to_string()))
        .collect();
    let ipvs: Vec<String> = if std::env::var("PROXY_VM_IPVS").as_deref() != Ok("quick") {
        let listed = query(env.command(scenarios).args(["--list", "--format", "terse"]))
            .context("listing the scenarios")?;
        listed
            .lines()
            .filter_map(|l| l.strip_suffix(": test"))
            .filter(|name| name.starts_with("ipvs::"))
            .map(str::to_string)
            .collect()
    } else {
        IPVS_SCENARIOS.iter().map(|s| s.to_string()).collect()
    };
    tests.extend(ipvs.into_iter().map(|name| (TestBinary::Scenarios, name)));
    Ok(tests)
}

/// A skip that the mode's `Mode::cannot` names is a decision, not a
/// missing kernel feature: it counts as done.
const DECIDED_SKIP: &str = ": skipped (Mode::cannot):";

/// The VM, set up: the kernel it boots, the `vng` that boots it, the
/// directory its scripts and results live in, and how qemu runs it.
#[derive(Clone)]
struct Vm {
    vng: PathBuf,
    vmlinuz: PathBuf,
    dir: PathBuf,
    accel: Accel,
}

/// How qemu runs the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Accel {
    /// With the bound of a boot, in seconds: a guest that KVM cannot run
    /// hangs rather than exits.
    Kvm { limit_secs: u32 },
    /// Software emulation: several times slower, works everywhere.
    Emulation,
}

/// The CPU model of a KVM boot: the host's, without the MSR qemu 7.2
/// fails to set on these machines ("failed to set MSR 0x10a").
const KVM_CPU: &str = "-cpu host,-arch-capabilities";
/// How long a KVM probe boot may take before emulation is used instead.
const KVM_PROBE_SECS: u32 = 90;
/// The bound of a KVM boot that runs tests (the whole VM stage takes
/// minutes under KVM).
const KVM_RUN_SECS: u32 = 3600;

impl Vm {
    /// Installs what the VM needs (packages, kernel, virtme-ng).
    fn prepare(env: &Env) -> anyhow::Result<Vm> {
        crate::install_packages(env, PACKAGES)?;
        let vng = virtme_ng(env)?;
        let dir = env.target_dir.join("vm");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let vmlinuz = kernel(env, &dir)?;
        let mut vm = Vm {
            vng,
            vmlinuz,
            dir,
            accel: Accel::Emulation,
        };
        vm.accel = vm.choose_accel(env);
        eprintln!("xtask: the VM runs with {:?}", vm.accel);
        Ok(vm)
    }

    /// KVM when the host has a KVM that boots Debian's kernel, found by a
    /// probe boot; emulation otherwise, or with `PROXY_VM_ACCEL=emulation`.
    fn choose_accel(&self, env: &Env) -> Accel {
        let forced = std::env::var("PROXY_VM_ACCEL").unwrap_or_default();
        if forced == "emulation" {
            return Accel::Emulation;
        }
        if !Path::new("/dev/kvm").exists() {
            eprintln!("xtask: no /dev/kvm: the VM runs under emulation");
            return Accel::Emulation;
        }
        // PVM (kvm_pvm, KVM without hardware virtualisation inside a VM)
        // boots only kernels built as PVM guests: Debian's stops in its
        // decompressor with "KVM internal error. Suberror: 1".
        let module = |name: &str| Path::new("/sys/module").join(name).exists();
        if module("kvm_pvm") && !module("kvm_intel") && !module("kvm_amd") && forced != "kvm" {
            eprintln!(
                "xtask: /dev/kvm is PVM's (kvm_pvm), which boots only PVM guest kernels: \
                 the VM runs under emulation"
            );
            return Accel::Emulation;
        }
        let marker = self.dir.join("kvm-probe.txt");
        let _ = std::fs::remove_file(&marker);
        let probe = Vm {
            accel: Accel::Kvm {
                limit_secs: KVM_PROBE_SECS,
            },
            ..self.clone()
        };
        let body = format!("echo booted > {}\n", marker.display());
        if let Err(e) = probe.boot(env, "kvm-probe.sh", &body) {
            eprintln!("xtask: the KVM probe boot failed ({e:#}): the VM runs under emulation");
            return Accel::Emulation;
        }
        if marker.exists() {
            Accel::Kvm {
                limit_secs: KVM_RUN_SECS,
            }
        } else {
            eprintln!(
                "xtask: a VM did not boot under KVM within {KVM_PROBE_SECS} s: \
                 it runs under emulation"
            );
            Accel::Emulation
        }
    }

    /// Where the console of script `name`'s boot goes.
    fn console(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.console.log"))
    }

    /// The guest kernel's complaints in the console of script `name`, if
    /// any: what to look at when a test did not run.
    fn console_trouble(&self, name: &str) -> String {
        let text = std::fs::read(self.console(name)).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| {
                [
                    "Kernel panic",
                    "BUG:",
                    "Oops",
                    "Out of memory",
                    "Killed process",
                    "RIP:",
                    "Call Trace",
                ]
                .iter()
                .any(|needle| l.contains(needle))
            })
            .take(40)
            .collect();
        lines.join("\n")
    }

    /// Boots the VM once to run `body` (shell, after loading [`MODULES`])
    /// as script `name`. What the script writes under the workspace is its
    /// result: vng's own exit status says nothing (255 even on success).
    fn boot(&self, env: &Env, name: &str, body: &str) -> anyhow::Result<()> {
        let mut text = String::from("#!/bin/sh\n");
        for module in MODULES {
            text.push_str(&format!(
                "modprobe {module} || echo 'modprobe {module} failed'\n"
            ));
        }
        text.push_str(body);
        let script = self.dir.join(name);
        std::fs::write(&script, text).with_context(|| format!("writing {}", script.display()))?;
        make_executable(&script)?;
        let mut command = match self.accel {
            Accel::Emulation => {
                let mut c = env.command(&self.vng);
                c.args(["--verbose", "--disable-kvm"]);
                c
            }
            Accel::Kvm { limit_secs } => {
                let mut c = env.command("timeout");
                c.arg(limit_secs.to_string()).arg(&self.vng).args([
                    "--verbose",
                    "--qemu-opts",
                    KVM_CPU,
                ]);
                c
            }
        };
        command
            .arg("--run")
            .arg(&self.vmlinuz)
            .args([
                "--user", "root", "--memory", "2G", "--cpus", "2", "--rw", "--exec",
            ])
            .arg(&script)
            .stdin(Stdio::null());
        // The console (the guest kernel's messages: a panic, an oops, the
        // OOM killer) for when a test "did not run".
        let console_path = self.console(name);
        let console = std::fs::File::create(&console_path)
            .with_context(|| format!("creating {}", console_path.display()))?;
        command
            .stdout(
                console
                    .try_clone()
                    .context("duplicating the console file")?,
            )
            .stderr(console);
        eprintln!("xtask: running {} (minutes)", describe(&command));
        let _ = command.status().context("starting vng")?;
        Ok(())
    }
}

/// `bench dataplane` in the VM, whose kernel has IPVS: `binary` (the
/// release dataplane-sync) with `args`, every mode side by side on that
/// kernel; prints what it printed.
pub fn run_dataplane_bench(env: &Env, binary: &Path, args: &[String]) -> anyhow::Result<()> {
    if !proxy_tests::is_root() {
        eprintln!("xtask: the VM's dataplane benchmark skipped: it needs root");
        return Ok(());
    }
    let vm = Vm::prepare(env)?;
    let out = vm.dir.join("bench-dataplane.txt");
    let _ = std::fs::remove_file(&out);
    let quoted: Vec<String> = args.iter().map(|a| format!("'{a}'")).collect();
    vm.boot(
        env,
        "bench-dataplane.sh",
        &format!(
            "cd {dir} && {binary} {args} > {out} 2>&1\necho \"VM-RC $?\" >> {out}\n",
            dir = env.workspace.display(),
            binary = binary.display(),
            args = quoted.join(" "),
            out = out.display(),
        ),
    )?;
    let text = std::fs::read_to_string(&out)
        .with_context(|| format!("the VM wrote no results to {}", out.display()))?;
    print!("{text}");
    if !text.contains("VM-RC 0") {
        bail!("the dataplane benchmark failed in the VM");
    }
    Ok(())
}

/// Whether `out` has the exit status of test `name`.
fn ran(out: &str, name: &str) -> bool {
    out.lines()
        .any(|l| l.strip_prefix(&format!("VM-RC {name} ")).is_some())
}

/// How many tests passed, or why the run does not count.
fn verdict(out: &str, tests: &[(TestBinary, String)]) -> Result<usize, String> {
    if let Some(line) = out
        .lines()
        .find(|l| l.contains(": skipped:") && !l.contains(DECIDED_SKIP))
    {
        return Err(format!("a scenario skipped in the VM: {line}"));
    }
    let mut passed = 0;
    for (_, scenario) in tests {
        let rc = out
            .lines()
            .find_map(|l| l.strip_prefix(&format!("VM-RC {scenario} ")))
            .ok_or_else(|| format!("{scenario} did not run"))?;
        if rc.trim() != "0" {
            return Err(format!("{scenario} failed (exit {rc})"));
        }
        if !out.contains(&format!("test {scenario} ... ok")) {
            return Err(format!("{scenario} did not report ok"));
        }
        passed += 1;
    }
    Ok(passed)
}

/// `vng`, installed from PyPI when missing.
fn virtme_ng(env: &Env) -> anyhow::Result<PathBuf> {
    let find = || {
        query(env.command("sh").args(["-c", "command -v vng"]))
            .map(|p| PathBuf::from(p.trim()))
            .filter(|p| p.is_file())
            .or_else(|| {
                query(env.command("python3").args([
                    "-c",
                    "import sysconfig; print(sysconfig.get_path('scripts'))",
                ]))
                .map(|dir| Path::new(dir.trim()).join("vng"))
                .filter(|p| p.is_file())
            })
    };
    if let Some(vng) = find() {
        return Ok(vng);
    }
    run(env
        .command("python3")
        .args(["-m", "pip", "install", "--quiet", "virtme-ng"]))?;
    find().context("virtme-ng installed, but no `vng` found")
}

/// The kernel image, downloaded and unpacked under `dir` when missing; its
/// modules installed under /lib/modules.
fn kernel(env: &Env, dir: &Path) -> anyhow::Result<PathBuf> {
    let root = dir.join(KERNEL);
    let vmlinuz = root.join(format!("boot/vmlinuz-{KERNEL}"));
    if !vmlinuz.is_file() {
        let package = format!("linux-image-{KERNEL}");
        run(env
            .command("apt-get")
            .args(["download", &package])
            .current_dir(dir))?;
        let deb = std::fs::read_dir(dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_")))
            })
            .context("apt-get download left no .deb")?;
        run(env.command("dpkg").arg("-x").arg(&deb).arg(&root))?;
    }
    let modules = Path::new("/lib/modules").join(KERNEL);
    if !modules.is_dir() {
        std::fs::create_dir_all("/lib/modules")?;
        run(env
            .command("cp")
            .arg("-a")
            .arg(root.join("lib/modules").join(KERNEL))
            .arg(&modules))?;
        run(env.command("depmod").arg(KERNEL))?;
    }
    Ok(vmlinuz)
}

/// A test binary of the VM's tests, built.
fn test_binary(env: &Env, which: TestBinary) -> anyhow::Result<PathBuf> {
    let (args, marker) = which.cargo_args();
    let mut cargo_args = vec!["test"];
    cargo_args.extend_from_slice(args);
    cargo_args.push("--no-run");
    let output = env
        .cargo(&cargo_args)
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("building the {which:?} test binary"))?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        bail!("building the {which:?} test binary failed:\n{stderr}");
    }
    // "  Executable tests/scenarios.rs (target/debug/deps/scenarios-...)"
    let path = stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix(marker)?.strip_suffix(')'))
        .with_context(|| format!("cargo did not name the {which:?} test binary"))?;
    Ok(env.workspace.join(path))
}

fn make_executable(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut perms = std::fs::metadata(path)?.permissions();
    perms.set_mode(0o755);
    std::fs::set_permissions(path, perms)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_run_counts_only_when_every_scenario_passed_without_skipping() {
        let tests: Vec<(TestBinary, String)> = SCENARIOS
            .iter()
            .map(|(b, n)| (*b, n.to_string()))
            .chain([(TestBinary::Scenarios, "ipvs::hairpin_bridge".to_string())])
            .collect();
        let verdict = |out: &str| verdict(out, &tests);
        let run = |rc: &str, result: &str, extra: &str| {
            let mut out = String::from(extra);
            for (_, scenario) in &tests {
                out.push_str(&format!(
                    "test {scenario} ... {result}\nVM-RC {scenario} {rc}\n"
                ));
            }
            out
        };
        assert_eq!(verdict(&run("0", "ok", "")), Ok(tests.len()));
        // A skip Mode::cannot decided counts as done.
        let decided = run(
            "0",
            "ok",
            "ipvs::hairpin_bridge: skipped (Mode::cannot): with br_netfilter on ...\n",
        );
        assert_eq!(verdict(&decided), Ok(tests.len()));
        assert!(
            verdict(&run("101", "FAILED", ""))
                .unwrap_err()
                .contains("failed")
        );
        let skipped = run("0", "ok", "ebpf::clusterip_sctp: skipped: no SCTP\n");
        assert!(verdict(&skipped).unwrap_err().contains("skipped"));
        // One scenario missing is a failure, not a smaller count.
        let partial = run("0", "ok", "").replace("VM-RC iptables::clusterip_sctp 0\n", "");
        assert!(
            verdict(&partial)
                .unwrap_err()
                .contains("iptables::clusterip_sctp did not run")
        );
        assert!(verdict("").unwrap_err().contains("did not run"));
    }
}
