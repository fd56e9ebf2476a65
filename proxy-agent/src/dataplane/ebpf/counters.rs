//! The datapath's per-reason packet counters, read from the pinned stats
//! map: every verdict the programs reach counts under one reason (see
//! `proxy_common::stat`), so nothing is dropped or passed unseen.
use std::path::Path;

use aya::maps::{MapData, PerCpuArray};
use proxy_common::{MAP_STATS, stat};

use super::{EbpfError, PinLayout};

/// An open handle on the pinned stats map, independent of the dataplane
/// that programs the other maps.
pub struct DatapathCounters {
    stats: PerCpuArray<MapData, u64>,
}

impl DatapathCounters {
    /// Opens the stats map pinned under `bpf_root` (after the dataplane has
    /// loaded, which creates the pin).
    pub fn open(bpf_root: &Path) -> Result<Self, EbpfError> {
        let path = PinLayout::new(bpf_root).maps().join(MAP_STATS);
        let data = MapData::from_pin(&path)?;
        let stats = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?;
        Ok(Self { stats })
    }

    /// `(reason, packets)` for every named reason, summed over CPUs.
    /// Unused slots (`unusedN`) are left out.
    pub fn read(&self) -> Result<Vec<(&'static str, u64)>, EbpfError> {
        let totals = sum_over_cpus(&self.stats)?;
        Ok(stat::NAMES
            .iter()
            .zip(totals)
            .filter(|(name, _)| !name.starts_with("unused"))
            .map(|(name, packets)| (*name, packets))
            .collect())
    }
}

/// Every counter of a stats map, summed over CPUs, indexed like
/// [`proxy_common::stat`].
pub(super) fn sum_over_cpus<T: std::borrow::Borrow<MapData>>(
    stats: &PerCpuArray<T, u64>,
) -> Result<[u64; stat::COUNT as usize], EbpfError> {
    let mut out = [0u64; stat::COUNT as usize];
    // A map pinned by an earlier version may have fewer counters: the
    // newer ones read 0 until the map is made again.
    let present = stats.len() as usize;
    for (i, slot) in out.iter_mut().enumerate().take(present) {
        *slot = stats.get(&(i as u32), 0)?.iter().sum();
    }
    Ok(out)
}
