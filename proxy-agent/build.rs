//! Builds the eBPF programs (proxy-ebpf) with the nightly toolchain and
//! bpf-linker, so that `cargo build -p proxy-agent` yields one binary with
//! the object embedded. `cargo xtask setup` installs the tools.
use std::{env, fs, path::PathBuf};

fn main() {
    let manifest_dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let ebpf_dir = manifest_dir.join("../proxy-ebpf");
    let common_dir = manifest_dir.join("../proxy-common");
    println!("cargo:rerun-if-changed={}", common_dir.display());
    git_commit(&manifest_dir);
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let skip = env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        // Lets `cargo check` run on a machine without bpf-linker; the agent
        // reports a missing object at load time.
        let obj = out_dir.join("proxy-ebpf");
        if !obj.exists() {
            fs::write(&obj, b"").expect("write placeholder eBPF object");
        }
    }
    let package = aya_build::Package {
        name: "proxy-ebpf",
        root_dir: ebpf_dir.to_str().expect("utf-8 path"),
        ..Default::default()
    };
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::default()) {
        panic!("building the eBPF programs failed (run `cargo xtask setup` first): {e:#}");
    }
}

/// The commit the agent is built from, for `--version` and the start line
/// (`PROXY_AGENT_GIT_COMMIT`; "unknown" outside a git checkout).
fn git_commit(dir: &std::path::Path) {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=PROXY_AGENT_GIT_COMMIT={commit}");
    // Built again when HEAD moves (a commit, a checkout).
    for path in [
        git(&["rev-parse", "--git-path", "HEAD"]),
        git(&["rev-parse", "--symbolic-full-name", "HEAD"])
            .and_then(|name| git(&["rev-parse", "--git-path", &name])),
    ]
    .into_iter()
    .flatten()
    {
        println!("cargo:rerun-if-changed={}", dir.join(path).display());
    }
}
