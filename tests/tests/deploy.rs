//! The deployment files in `deploy/`: every overlay renders with
//! `kubectl kustomize`, has the objects, mode, capabilities and RBAC rules it
//! should, and passes offline validation against the Kubernetes schemas
//! (`kubernetes-validate --strict`, installed from PyPI when missing; that
//! part is skipped, with the reason printed, only if it cannot be installed).
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
};

use anyhow::{Context, bail, ensure};
use proxy_tests::rbac::{cluster_role_grants, strings};
use serde_json::Value;

/// The Kubernetes version the manifests are validated against.
const KUBERNETES_VERSION: &str = "1.33.0";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `kubectl kustomize DIR` (DIR relative to the repository root).
fn render(dir: &str) -> anyhow::Result<String> {
    let output = Command::new("kubectl")
        .arg("kustomize")
        .arg(repo_root().join(dir))
        .output()
        .context("running kubectl (it must be on PATH)")?;
    ensure!(
        output.status.success(),
        "kubectl kustomize {dir} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// The documents of a YAML stream (empty and null ones skipped).
fn documents(yaml: &str) -> anyhow::Result<Vec<Value>> {
    Ok(serde_saphyr::from_multiple(yaml)?)
}

/// The one object of this kind; fails unless there is exactly one.
fn only<'a>(docs: &'a [Value], kind: &str) -> anyhow::Result<&'a Value> {
    let found: Vec<&Value> = docs.iter().filter(|d| d["kind"] == kind).collect();
    ensure!(
        found.len() == 1,
        "expected exactly one {kind}, found {}",
        found.len()
    );
    Ok(found[0])
}

/// Whether `kubernetes-validate` can be run, installing it with pip if
/// needed. Decided once per test process.
fn kubernetes_validate_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        let importable = || {
            Command::new("python3")
                .args(["-c", "import kubernetes_validate"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if importable() {
            return true;
        }
        let install = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "kubernetes-validate"])
            .output();
        match install {
            Ok(o) if o.status.success() && importable() => true,
            Ok(o) => {
                eprintln!(
                    "SKIP schema validation: `python3 -m pip install kubernetes-validate` failed: {}",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                false
            }
            Err(e) => {
                eprintln!("SKIP schema validation: cannot run python3: {e}");
                false
            }
        }
    })
}

/// `kubernetes-validate --strict` on the rendered YAML.
fn validate_schemas(name: &str, yaml: &str) -> anyhow::Result<()> {
    if !kubernetes_validate_available() {
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let file = dir.path().join(format!("{name}.yaml"));
    std::fs::write(&file, yaml)?;
    let output = Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--quiet",
            "-k",
            KUBERNETES_VERSION,
        ])
        .arg(&file)
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success() && !stdout.contains("ERROR") && !stderr.contains("ERROR"),
        "kubernetes-validate --strict -k {KUBERNETES_VERSION} rejected {name}:\n{stdout}{stderr}"
    );
    Ok(())
}

fn check_overlay(mode: &str, capabilities: &[&str], xtables_lock: bool) -> anyhow::Result<()> {
    let yaml = render(&format!("deploy/overlays/{mode}"))?;
    let docs = documents(&yaml)?;
    ensure!(
        docs.len() == 6,
        "expected 6 objects, rendered {}",
        docs.len()
    );
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
    ] {
        only(&docs, kind)?;
    }

    // The ConfigMap: a KubeProxyConfiguration with this mode.
    let config_map = only(&docs, "ConfigMap")?;
    let config = config_map["data"]["config.yaml"]
        .as_str()
        .context("ConfigMap has no config.yaml")?;
    let config: Value = serde_saphyr::from_str(config)?;
    ensure!(
        config["kind"] == "KubeProxyConfiguration",
        "config kind: {}",
        config["kind"]
    );
    ensure!(config["apiVersion"] == "kubeproxy.config.k8s.io/v1alpha1");
    ensure!(
        config["mode"] == mode,
        "config mode is {}, not {mode}",
        config["mode"]
    );
    ensure!(config["proxyAgent"]["bpfRoot"] == "/sys/fs/bpf/proxy-agent");

    // The DaemonSet.
    let daemon_set = only(&docs, "DaemonSet")?;
    let pod = &daemon_set["spec"]["template"]["spec"];
    ensure!(pod["hostNetwork"] == true, "not hostNetwork");
    ensure!(
        pod["nodeSelector"]["kubernetes.io/os"] == "linux",
        "not limited to Linux nodes: {}",
        pod["nodeSelector"]
    );
    ensure!(
        daemon_set["spec"]["template"]["metadata"]["labels"]["k8s-app"] == "kube-proxy",
        "pods lack the label monitoring finds kube-proxy by"
    );
    ensure!(pod["priorityClassName"] == "system-node-critical");
    let tolerations = pod["tolerations"].as_array().context("no tolerations")?;
    ensure!(
        tolerations
            .iter()
            .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
        "does not tolerate every taint: {tolerations:?}"
    );
    let containers = pod["containers"].as_array().context("no containers")?;
    let agent = containers
        .iter()
        .find(|c| c["name"] == "proxy-agent")
        .context("no proxy-agent container")?;
    for (name, port) in [("healthz", 10256), ("metrics", 10249)] {
        ensure!(
            agent["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["name"] == name && p["containerPort"] == port),
            "no port {name} ({port}): {}",
            agent["ports"]
        );
    }
    let security = &agent["securityContext"];
    ensure!(security["privileged"] != true, "the agent is privileged");
    let added: BTreeSet<String> = strings(&security["capabilities"]["add"])
        .into_iter()
        .collect();
    let expected: BTreeSet<String> = capabilities.iter().map(|c| c.to_string()).collect();
    ensure!(
        added == expected,
        "capabilities {added:?}, expected {expected:?}"
    );
    ensure!(strings(&security["capabilities"]["drop"]) == ["ALL"]);
    for container in containers
        .iter()
        .chain(pod["initContainers"].as_array().into_iter().flatten())
    {
        ensure!(
            container["securityContext"]["privileged"] != true,
            "{} is privileged",
            container["name"]
        );
    }
    let mounts = agent["volumeMounts"]
        .as_array()
        .context("no volumeMounts")?;
    let mounted = |path: &str| mounts.iter().any(|m| m["mountPath"] == path);
    ensure!(mounted("/etc/proxy-agent"), "config not mounted");
    ensure!(mounted("/lib/modules"), "/lib/modules not mounted");
    ensure!(
        mounted("/run/xtables.lock") == xtables_lock,
        "/run/xtables.lock mounted: {}, expected {xtables_lock}",
        mounted("/run/xtables.lock")
    );
    for mount in mounts {
        ensure!(
            mount["mountPropagation"] != "Bidirectional",
            "Bidirectional needs privileged"
        );
    }

    // The ClusterRole grants exactly these (verb, group, resource) triples.
    let role = only(&docs, "ClusterRole")?;
    let granted = cluster_role_grants(role)?;
    let mut wanted = BTreeSet::new();
    for (group, resource, verbs) in [
        ("", "services", &["list", "watch"][..]),
        ("", "nodes", &["list", "watch"]),
        ("discovery.k8s.io", "endpointslices", &["list", "watch"]),
        ("networking.k8s.io", "servicecidrs", &["list", "watch"]),
        ("events.k8s.io", "events", &["create", "patch"]),
    ] {
        for verb in verbs {
            wanted.insert((verb.to_string(), group.to_string(), resource.to_string()));
        }
    }
    ensure!(
        granted == wanted,
        "ClusterRole grants {granted:?}, expected {wanted:?}"
    );

    let binding = only(&docs, "ClusterRoleBinding")?;
    ensure!(binding["roleRef"]["name"] == role["metadata"]["name"]);
    let account = only(&docs, "ServiceAccount")?;
    ensure!(
        binding["subjects"][0]["name"] == account["metadata"]["name"]
            && binding["subjects"][0]["namespace"] == "proxy-agent",
        "binding subject {}",
        binding["subjects"]
    );
    ensure!(pod["serviceAccountName"] == account["metadata"]["name"]);

    validate_schemas(mode, &yaml)
}

#[test]
fn overlay_ebpf() -> anyhow::Result<()> {
    check_overlay(
        "ebpf",
        &["NET_ADMIN", "BPF", "PERFMON", "SYS_RESOURCE", "SYS_ADMIN"],
        false,
    )?;
    // Socket-level load balancing for pods finds their namespaces through
    // the host's processes and the runtime's named namespaces.
    let yaml = render("deploy/overlays/ebpf")?;
    let docs = documents(&yaml)?;
    let pod = &only(&docs, "DaemonSet")?["spec"]["template"]["spec"];
    ensure!(pod["hostPID"] == true, "not hostPID");
    let mounts = pod["containers"][0]["volumeMounts"]
        .as_array()
        .context("no volumeMounts")?;
    ensure!(
        mounts.iter().any(|m| m["mountPath"] == "/run/netns"),
        "/run/netns not mounted"
    );
    Ok(())
}

/// The monitoring overlay: the ebpf overlay, its metrics server on the
/// node's addresses, and a PodMonitor that finds the agents' metrics port.
#[test]
fn overlay_ebpf_monitoring() -> anyhow::Result<()> {
    let docs = documents(&render("deploy/overlays/ebpf-monitoring")?)?;
    ensure!(
        docs.len() == 7,
        "expected 7 objects, rendered {}",
        docs.len()
    );
    let monitor = only(&docs, "PodMonitor")?;
    let daemon_set = only(&docs, "DaemonSet")?;
    let template = &daemon_set["spec"]["template"];
    let selector = &monitor["spec"]["selector"]["matchLabels"];
    let selected = selector
        .as_object()
        .context("PodMonitor selects nothing")?
        .iter()
        .all(|(key, value)| template["metadata"]["labels"][key] == *value);
    ensure!(selected, "PodMonitor {selector} does not select the agents");
    ensure!(monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics");
    let args = strings(&template["spec"]["containers"][0]["args"]);
    ensure!(
        args.iter()
            .any(|a| a == "--metrics-bind-address=0.0.0.0:10249"),
        "metrics stay on loopback: {args:?}"
    );
    Ok(())
}

#[test]
fn overlay_nftables() -> anyhow::Result<()> {
    check_overlay("nftables", &["NET_ADMIN", "NET_RAW"], false)
}

#[test]
fn overlay_iptables() -> anyhow::Result<()> {
    check_overlay("iptables", &["NET_ADMIN", "NET_RAW"], true)
}

#[test]
fn overlay_ipvs() -> anyhow::Result<()> {
    check_overlay("ipvs", &["NET_ADMIN", "NET_RAW", "SYS_MODULE"], true)
}

#[test]
fn cleanup_daemon_set() -> anyhow::Result<()> {
    let yaml = render("deploy/cleanup")?;
    let docs = documents(&yaml)?;
    let daemon_set = only(&docs, "DaemonSet")?;
    let pod = &daemon_set["spec"]["template"]["spec"];
    let init = &pod["initContainers"][0];
    if strings(&init["args"]).first().map(String::as_str) != Some("cleanup") {
        bail!(
            "the init container does not run `proxy-agent cleanup`: {}",
            init["args"]
        );
    }
    for container in pod["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .chain([init])
    {
        ensure!(
            container["securityContext"]["privileged"] != true,
            "{} is privileged",
            container["name"]
        );
    }
    validate_schemas("cleanup", &yaml)
}
