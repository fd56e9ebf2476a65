//! Dataplanes: one trait, one module per kernel interface. Each applies the
//! difference between what it has programmed and what the model desires.
pub use crate::model::NodeNetwork;
use crate::model::{ServiceTable, TableDiff};
pub use addresses::DetectLocal;
pub use mode::{Mode, ModeOptions};

pub mod addresses;
pub mod conntrack;
pub mod ebpf;
pub mod held;
pub mod iptables;
pub mod ipvs;
pub mod mode;
pub mod netfilter;
pub mod netlink_socket;
pub mod nftables;

/// Counts of what one apply or reconcile did, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub frontends_added: usize,
    pub frontends_changed: usize,
    pub frontends_removed: usize,
    /// Kernel objects written: map entries, chains or rules, set and map
    /// elements, whatever the mode's unit is.
    pub kernel_writes: usize,
    /// Kernel objects deleted, in the same unit.
    pub kernel_deletes: usize,
    /// What the connection-tracking cleanup of the apply did.
    pub conntrack: ConntrackCleanup,
}

/// One apply's connection-tracking cleanup (UDP flows to removed backends,
/// or never translated), per IP family as kube-proxy's conntrack
/// reconciler reports it: index 0 IPv4, 1 IPv6.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConntrackCleanup {
    /// Flows deleted: netfilter's conntrack entries (one per flow), or the
    /// eBPF mode's flows (counted by their client -> frontend entry).
    pub deleted: [usize; 2],
    /// How long the family's cleanup took, when it ran (it runs only when
    /// the apply leaves flows to forget in that family).
    pub took: [Option<std::time::Duration>; 2],
}

impl ConntrackCleanup {
    /// Index of `ip`'s family in the arrays.
    pub fn family_index(ip: std::net::IpAddr) -> usize {
        usize::from(ip.is_ipv6())
    }

    pub fn total_deleted(&self) -> usize {
        self.deleted.iter().sum()
    }
}

/// What a reconcile did, and the drift it repaired.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub stats: ApplyStats,
    /// Kernel objects that were missing, extra or different from what the
    /// desired table needs, and were written or removed. At start that is
    /// whatever an earlier run left differing; later, anything is drift:
    /// someone changed the kernel behind the agent's back.
    pub repaired: usize,
}

impl ReconcileReport {
    /// The report of a reconcile that writes only what differs from what
    /// it read in the kernel: every write and delete repairs drift.
    pub fn of_repairs(stats: ApplyStats) -> Self {
        ReconcileReport {
            repaired: stats.kernel_writes + stats.kernel_deletes,
            stats,
        }
    }
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
    fn reconcile(&mut self, desired: &ServiceTable) -> Result<ReconcileReport, DataplaneError>;

    /// Programs the node's own network facts. Called before the first
    /// reconcile and whenever they change (an address added or removed).
    fn set_node_network(&mut self, network: &NodeNetwork) -> Result<(), DataplaneError>;
}

/// A dataplane's failure. The variants are transparent: the mode is named
/// by whoever reports the error (the sync loop logs the dataplane's name,
/// the start names the mode), and a cause is printed once in a chain.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(transparent)]
    Ebpf(#[from] ebpf::EbpfError),
    #[error(transparent)]
    Nftables(#[from] nftables::NftablesError),
    #[error(transparent)]
    Iptables(#[from] iptables::IptablesError),
    #[error(transparent)]
    Conntrack(#[from] conntrack::ConntrackError),
    #[error(transparent)]
    Ipvs(ipvs::IpvsModeError),
}

/// Test support: runs `test` on a fresh thread moved into a network
/// namespace of its own, which dies with the thread, so nothing outlives a
/// failure; child processes the thread starts (nft, ip) inherit it. Skips,
/// saying why, without root or when the namespace cannot be made; a panic
/// of `test` is the caller's.
#[cfg(test)]
pub(crate) fn in_private_netns(test: impl FnOnce() + Send + 'static) {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root for a network namespace");
        return;
    }
    let outcome = std::thread::spawn(move || {
        // unshare(CLONE_NEWNET) moves only this freshly spawned thread,
        // which holds no sockets yet, to a new namespace.
        if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET) {
            eprintln!(
                "skipped: cannot create a network namespace: {}",
                std::io::Error::from(e)
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
