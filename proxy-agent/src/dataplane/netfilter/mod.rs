//! What the netfilter dataplanes (nftables, iptables) share besides the
//! plan they render (`model::plan`, re-exported here): their [`Driver`]
//! (the shadow, the base, diffs, reconciles and the node's network, around
//! a mode's [`RuleBackend`]), the masquerade mark, how both syntaxes name
//! things, the localhost-NodePort sysctl, running the tools, and
//! forgetting stale UDP flows in kernel conntrack.
use std::{
    collections::BTreeMap,
    io::Write,
    net::IpAddr,
    process::{Command, Output, Stdio},
};

mod driver;

pub use driver::{Driver, Planned, Programmed, RuleBackend, Scope, Shadow, commit};

use super::{
    ConntrackCleanup,
    conntrack::{ConntrackError, StaleFlow, delete_stale_udp_flows},
};
pub use crate::model::plan::{Action, Family, FrontendPlan, Masquerade, NodeNetwork, View, plan};
use crate::model::{Frontend, FrontendKey, Protocol, TableDiff};

/// The packet mark bit that asks the postrouting hook to masquerade
/// (kube-proxy's default `masqueradeBit: 14`).
pub const MASQUERADE_MARK: u32 = 1 << 14;

/// The packet mark bit the nftables mode's nat chains set on a new
/// connection to a ClusterIP: the ServiceCIDR check, which runs once after
/// the eight tables' DNAT, reads it to tell an allocated address from an
/// unallocated one, and clears it.
pub const SERVICE_ADDRESS_MARK: u32 = 1 << 15;

/// How both netfilter syntaxes spell a protocol.
pub fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// The comment on a frontend's rules: `namespace/name[:port-name]`.
pub fn comment_of(frontend: &Frontend) -> String {
    let port = if frontend.port_name.is_empty() {
        String::new()
    } else {
        format!(":{}", frontend.port_name)
    };
    format!("{}{port}", frontend.service)
}

/// A NodePort on 127.0.0.1 (asked for with `--nodeport-addresses`) is
/// DNATed to a pod with its loopback source, which the kernel routes out of
/// the node only with `route_localnet` (kube-proxy sets it the same way).
/// IPv6 has no counterpart: `::1` NodePorts are served by the eBPF mode
/// only.
pub fn allow_localhost_nodeports(network: &NodeNetwork) {
    const SYSCTL: &str = "/proc/sys/net/ipv4/conf/all/route_localnet";
    if !network
        .nodeport_addresses
        .iter()
        .any(|ip| matches!(ip, IpAddr::V4(v4) if v4.is_loopback()))
    {
        return;
    }
    if std::fs::read_to_string(SYSCTL).is_ok_and(|v| v.trim() == "1") {
        return;
    }
    match std::fs::write(SYSCTL, "1") {
        Ok(()) => tracing::info!(sysctl = SYSCTL, "set to 1 for NodePorts on 127.0.0.0/8"),
        Err(e) => {
            tracing::warn!(sysctl = SYSCTL, error = %e, "cannot set; NodePorts on 127.0.0.0/8 will not work")
        }
    }
}

/// The keys `diff` touches (added, changed, removed, in that order), and
/// what `program` makes of the frontends it keeps.
pub fn wanted_of<P>(
    diff: &TableDiff,
    program: impl Fn(&FrontendKey, &Frontend) -> P,
) -> (Vec<FrontendKey>, BTreeMap<FrontendKey, P>) {
    let mut wanted = BTreeMap::new();
    let mut keys = Vec::new();
    for (key, fe) in &diff.added {
        wanted.insert(*key, program(key, fe));
        keys.push(*key);
    }
    for change in &diff.changed {
        wanted.insert(change.key, program(&change.key, &change.new));
        keys.push(change.key);
    }
    for (key, _) in &diff.removed {
        keys.push(*key);
    }
    (keys, wanted)
}

/// Runs `program args` with `input` on its stdin, stdout discarded and
/// stderr kept for the caller's error. A failure to write `input` is not
/// reported by itself: a program that refuses its input may close stdin
/// early, and its exit status and stderr say why.
pub fn run_with_input(program: &str, args: &[&str], input: &[u8]) -> std::io::Result<Output> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    child.wait_with_output()
}

/// Deletes the kernel's connection-tracking entries of the UDP flows
/// [`TableDiff::stale_udp_flows`] names, so their next datagram picks a
/// live backend, and those of [`TableDiff::udp_frontends_starting_service`]
/// that were never translated, so their next datagram is. Returns what was
/// deleted, per family.
pub fn forget_stale_udp_flows(diff: &TableDiff) -> Result<ConntrackCleanup, ConntrackError> {
    let stale = diff
        .stale_udp_flows()
        .into_iter()
        .map(|(key, backend)| StaleFlow {
            vip: key.ip,
            port: key.port,
            backend: backend.ip,
            backend_port: backend.port,
        });
    let untranslated = diff
        .udp_frontends_starting_service()
        .into_iter()
        .map(|key| StaleFlow::untranslated(key.ip, key.port));
    let flows: Vec<StaleFlow> = stale.chain(untranslated).collect();
    if flows.is_empty() {
        return Ok(ConntrackCleanup::default());
    }
    delete_stale_udp_flows(&flows)
}

/// How often a reconcile of either netfilter mode rewrites every frontend
/// chain even when what it read shows no drift (kube-proxy's full sync is
/// hourly too).
pub const FULL_REWRITE_PERIOD: std::time::Duration = std::time::Duration::from_secs(3600);

/// 64-bit FNV-1a of `data`: the nftables mode's shard of a frontend.
pub(crate) fn fnv1a_64(data: &[u8]) -> u64 {
    const OFFSET: u128 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u128 = 0x0000_0100_0000_01b3;
    fnv1a(OFFSET, PRIME, u128::from(u64::MAX), data) as u64
}

/// 128-bit FNV-1a of `data`: the iptables mode's chain names.
pub(crate) fn fnv1a_128(data: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    fnv1a(OFFSET, PRIME, u128::MAX, data)
}

/// FNV-1a with `offset` and `prime`, modulo `mask + 1` (2^64 or 2^128).
/// Written here, not taken from a library that might change: the names and
/// shards it picks outlive the agent in the kernel, so its values must stay
/// the same on every version.
fn fnv1a(offset: u128, prime: u128, mask: u128, data: &[u8]) -> u128 {
    data.iter().fold(offset, |hash, b| {
        ((hash ^ u128::from(*b)).wrapping_mul(prime)) & mask
    })
}
