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
        let mut out = Vec::with_capacity(stat::COUNT as usize);
        for (index, name) in stat::NAMES.iter().enumerate() {
            if name.starts_with("unused") {
                continue;
            }
            let values = self.stats.get(&(index as u32), 0)?;
            out.push((*name, values.iter().sum()));
        }
        Ok(out)
    }
}
