//! Dataplanes: one trait, one module per kernel interface. Each applies the
//! difference between what it has programmed and what the model desires.
use crate::model::{ServiceTable, TableDiff};

pub mod ebpf;

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
}

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("eBPF: {0}")]
    Ebpf(#[from] ebpf::EbpfError),
}
