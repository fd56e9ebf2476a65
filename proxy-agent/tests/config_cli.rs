//! `proxy-agent run --config FILE`: the built binary rejects a bad file at
//! once, naming the field, and flags override the file.
use std::{
    io::Read,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const HEAD: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";

/// Runs the agent, which must stop by itself within 30 s (these runs are
/// refused at start; one that is not would program this machine): killed
/// and failed otherwise.
fn run(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_proxy-agent"))
        .args(args)
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running proxy-agent");
    let mut stderr = child.stderr.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for proxy-agent") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("proxy-agent {args:?} did not stop within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    (
        status.code().unwrap_or(-1),
        reader.join().unwrap_or_default(),
    )
}

/// A `--manifests` path the agent refuses at start: a file. (A directory
/// that does not exist yet is waited for, with the dataplane running.)
fn not_a_directory(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("a-file");
    std::fs::write(&path, "").unwrap();
    path.to_str().unwrap().to_string()
}

fn write_config(dir: &tempfile::TempDir, body: &str) -> String {
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, format!("{HEAD}{body}")).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn invalid_config_fails_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&dir, "syncPeriod: 0s\nclusterCIDR: 10.0.0.0/33\n");
    let (code, stderr) = run(&["run", "--config", &cfg]);
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains(&cfg), "{stderr}");
    assert!(stderr.contains("syncPeriod: must be > 0"), "{stderr}");
    assert!(
        stderr.contains("clusterCIDR: \"10.0.0.0/33\" is not a CIDR"),
        "{stderr}"
    );
}

#[test]
fn unknown_field_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&dir, "conntrack:\n  maxPerCPU: 3\n");
    let (code, stderr) = run(&["run", "--config", &cfg]);
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("unknown field `maxPerCPU`"), "{stderr}");
}

#[test]
fn mode_flag_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(&dir, "mode: ipvs\n");
    let missing = not_a_directory(&dir);
    let missing = missing.as_str();

    // The file's mode, as the start line says; the run then stops at the
    // --manifests check.
    let (code, stderr) = run(&["run", "--config", &cfg, "--manifests", missing]);
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("mode=\"ipvs\""), "{stderr}");

    // With --mode=ebpf the flag wins.
    let (code, stderr) = run(&[
        "run",
        "--config",
        &cfg,
        "--mode=ebpf",
        "--manifests",
        missing,
    ]);
    assert_ne!(code, 0, "{stderr}");
    assert!(stderr.contains("mode=\"ebpf\""), "{stderr}");
    assert!(
        stderr.contains("--manifests") && stderr.contains("is not a directory"),
        "{stderr}"
    );
    assert!(!stderr.contains("ipvs"), "{stderr}");
}

/// kube-proxy's ConfigMap as kubeadm writes it starts the agent: the run
/// gets past the config to the --manifests check, and names no field as
/// one it does not act on (they are all zero).
#[test]
fn a_kubeadm_config_starts_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let missing = not_a_directory(&dir);
    for version in ["v1.28", "v1.31", "v1.34"] {
        let cfg = format!(
            "{}/tests/kubeadm/{version}-config.conf",
            env!("CARGO_MANIFEST_DIR")
        );
        let (code, stderr) = run(&["run", "--config", &cfg, "--manifests", &missing]);
        assert_ne!(code, 0, "{version}: {stderr}");
        assert!(
            stderr.contains("--manifests") && stderr.contains("is not a directory"),
            "{version}: {stderr}"
        );
        assert!(!stderr.contains("does not act on"), "{version}: {stderr}");
    }
}

#[test]
fn bad_nodeport_addresses_flag_fails_at_start() {
    for (value, want) in [
        ("10.0.0.0/33", "\"10.0.0.0/33\" is not a CIDR"),
        ("10.0.0.0/8,nope", "\"nope\" is not a CIDR"),
        ("primary,10.0.0.0/8", "\"primary\" cannot be combined"),
    ] {
        let (code, stderr) = run(&["run", "--nodeport-addresses", value]);
        assert_eq!(code, 2, "{value}: {stderr}");
        assert!(
            stderr.contains("--nodeport-addresses") && stderr.contains(want),
            "{value}: {stderr}"
        );
    }
    let (code, stderr) = run(&["run", "--masquerade-all=maybe"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--masquerade-all"), "{stderr}");
    let (code, stderr) = run(&["run", "--detect-local-mode=BridgeInterface"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--detect-local-mode"), "{stderr}");
    let (code, stderr) = run(&["run", "--translated-mark-bit=32"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--translated-mark-bit"), "{stderr}");
}

#[test]
fn node_network_flags_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let missing = not_a_directory(&dir);
    let missing = missing.as_str();
    for flags in [
        &["--nodeport-addresses", "10.0.0.0/8,127.0.0.1/32"][..],
        &["--nodeport-addresses=primary", "--masquerade-all"][..],
        &["--nodeport-addresses=", "--masquerade-all=false"][..],
        &["--healthz-bind-address=", "--metrics-bind-address="][..],
        &[
            "--healthz-bind-address=127.0.0.1:0",
            "--metrics-bind-address=[::1]:0",
        ][..],
        &["--translated-mark-bit=20"][..],
        &[
            "--detect-local-mode",
            "NodeCIDR",
            "--bind-address-hard-fail",
        ][..],
        &[
            "--detect-local-mode=ClusterCIDR",
            "--bind-address-hard-fail=false",
        ][..],
        &["--translated-mark-bit", "none"][..],
    ] {
        // Parsed, then stopped by the --manifests check that follows.
        let mut args = vec!["run", "--manifests", missing];
        args.extend_from_slice(flags);
        let (code, stderr) = run(&args);
        assert_ne!(code, 0, "{flags:?}: {stderr}");
        assert!(
            stderr.contains("--manifests") && stderr.contains("is not a directory"),
            "{flags:?}: {stderr}"
        );
    }
}
