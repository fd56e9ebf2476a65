//! Dataplanes: one trait, one module per kernel interface. Each applies the
//! difference between what it has programmed and what the model desires.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

use crate::model::{ServiceTable, TableDiff};

pub mod addresses;
pub mod conntrack;
pub mod ebpf;
pub mod iptables;
pub mod netfilter;
pub mod nftables;

/// Counts of what one apply did, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub frontends_added: usize,
    pub frontends_changed: usize,
    pub frontends_removed: usize,
    pub map_writes: usize,
    pub map_deletes: usize,
    /// Connection-tracking entries deleted (UDP flows to removed backends).
    pub conntrack_deletes: usize,
}

/// What a dataplane needs to know about the node itself, beyond the service
/// table: where NodePorts are served, which address masqueraded traffic
/// takes, and which sources count as inside the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeNetwork {
    /// The node's addresses NodePorts are served on (after
    /// `--nodeport-addresses`; loopback only when explicitly asked for).
    pub nodeport_addresses: BTreeSet<IpAddr>,
    /// The source address of masqueraded traffic, per family (the node's
    /// primary address); `None` when the node has none of that family.
    pub snat_v4: Option<Ipv4Addr>,
    pub snat_v6: Option<Ipv6Addr>,
    /// `--cluster-cidr`: at most one per family. Sources inside are pods.
    pub cluster_cidrs: Vec<IpNet>,
    /// `--masquerade-all`: masquerade every service connection.
    pub masquerade_all: bool,
}

/// A kernel dataplane.
pub trait Dataplane: Send {
    /// Short name for logs ("ebpf", "nftables", ...).
    fn name(&self) -> &'static str;

    /// Programs `diff`. On error the caller keeps its idea of what is
    /// programmed unchanged and retries with a full diff later.
    fn apply(&mut self, diff: &TableDiff) -> Result<ApplyStats, DataplaneError>;

    /// Reads what is really programmed in the kernel and makes it equal to
    /// `desired` (first sync after start, periodic repair of drift, and
    /// recovery after a failed apply).
    fn reconcile(&mut self, desired: &ServiceTable) -> Result<ApplyStats, DataplaneError>;

    /// Programs the node's own network facts. Called before the first
    /// reconcile and whenever they change (an address added or removed).
    fn set_node_network(&mut self, network: &NodeNetwork) -> Result<(), DataplaneError>;
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("eBPF: {0}")]
    Ebpf(#[from] ebpf::EbpfError),
    #[error("nftables: {0}")]
    Nftables(#[from] nftables::NftablesError),
    #[error("iptables: {0}")]
    Iptables(#[from] iptables::IptablesError),
}

/// Test support: runs `test` on a fresh thread moved into a network
/// namespace of its own, which dies with the thread, so nothing outlives a
/// failure; child processes the thread starts (nft, ip) inherit it. Skips,
/// saying why, without root or when the namespace cannot be made; a panic
/// of `test` is the caller's.
#[cfg(test)]
pub(crate) fn in_private_netns(test: impl FnOnce() + Send + 'static) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root for a network namespace");
        return;
    }
    let outcome = std::thread::spawn(move || {
        // SAFETY: unshare(CLONE_NEWNET) moves only this freshly spawned
        // thread, which holds no sockets yet, to a new namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "skipped: cannot create a network namespace: {}",
                std::io::Error::last_os_error()
            );
            return;
        }
        test();
    })
    .join();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}
