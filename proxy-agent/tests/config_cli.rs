//! `proxy-agent run --config FILE`: the built binary rejects a bad file at
//! once, naming the field, and flags override the file.
use std::process::Command;

const HEAD: &str = "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n";

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_proxy-agent"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("running proxy-agent");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
    let missing = dir.path().join("no-such-dir");
    let missing = missing.to_str().unwrap();

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
}

#[test]
fn node_network_flags_are_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-dir");
    let missing = missing.to_str().unwrap();
    for flags in [
        &["--nodeport-addresses", "10.0.0.0/8,127.0.0.1/32"][..],
        &["--nodeport-addresses=primary", "--masquerade-all"][..],
        &["--nodeport-addresses=", "--masquerade-all=false"][..],
        &["--healthz-bind-address=", "--metrics-bind-address="][..],
        &[
            "--healthz-bind-address=127.0.0.1:0",
            "--metrics-bind-address=[::1]:0",
        ][..],
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
