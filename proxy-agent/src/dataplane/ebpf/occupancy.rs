//! How full the maps are: a full flow map evicts live flows (an LRU map
//! drops its least recently used entry for a new one, and the connection
//! whose entry went loses its translation), a full services or backends
//! map refuses new frontends. Counted in batches from the pins, so that
//! the agent can say so before it happens.
use std::path::Path;

use aya::{
    Pod,
    maps::{HashMap as BpfHashMap, Map, MapData},
};
use proxy_common::{
    AFFINITY_MAX_ENTRIES, AffinityKey, AffinityValue, BACKENDS_MAX_ENTRIES, BackendId,
    BackendValue, CONNTRACK_MAX_ENTRIES, CtKey, CtValue, MAP_AFFINITY, MAP_BACKENDS, MAP_CONNTRACK,
    MAP_SERVICES, MAP_SOCK_REVNAT, SERVICES_MAX_ENTRIES, SOCK_REVNAT_MAX_ENTRIES, ServiceKey,
    ServiceValue, SockRevKey, SockRevValue,
};

use super::{EbpfError, batch, handover::pinned};

/// One map's fill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Occupancy {
    /// The map's name without its prefix ("conntrack", "services", ...).
    pub map: &'static str,
    pub entries: usize,
    pub capacity: usize,
}

impl Occupancy {
    /// Entries over capacity, 0 to 1.
    pub fn ratio(&self) -> f64 {
        self.entries as f64 / self.capacity.max(1) as f64
    }
}

/// The fill of the maps that can fill up, of the datapath pinned under
/// `bpf_root` (those not pinned are left out).
pub fn occupancy(bpf_root: &Path) -> Result<Vec<Occupancy>, EbpfError> {
    let mut out = Vec::new();
    count::<CtKey, CtValue>(
        bpf_root,
        MAP_CONNTRACK,
        "conntrack",
        CONNTRACK_MAX_ENTRIES,
        true,
        &mut out,
    )?;
    count::<AffinityKey, AffinityValue>(
        bpf_root,
        MAP_AFFINITY,
        "affinity",
        AFFINITY_MAX_ENTRIES,
        true,
        &mut out,
    )?;
    count::<SockRevKey, SockRevValue>(
        bpf_root,
        MAP_SOCK_REVNAT,
        "sock_revnat",
        SOCK_REVNAT_MAX_ENTRIES,
        true,
        &mut out,
    )?;
    count::<ServiceKey, ServiceValue>(
        bpf_root,
        MAP_SERVICES,
        "services",
        SERVICES_MAX_ENTRIES,
        false,
        &mut out,
    )?;
    count::<BackendId, BackendValue>(
        bpf_root,
        MAP_BACKENDS,
        "backends",
        BACKENDS_MAX_ENTRIES,
        false,
        &mut out,
    )?;
    Ok(out)
}

fn count<K: Pod, V: Pod>(
    bpf_root: &Path,
    pin: &str,
    map: &'static str,
    capacity: u32,
    lru: bool,
    out: &mut Vec<Occupancy>,
) -> Result<(), EbpfError> {
    let Some(data) = pinned(bpf_root, pin)? else {
        return Ok(());
    };
    let wrapped = if lru {
        Map::LruHashMap(data)
    } else {
        Map::HashMap(data)
    };
    let hash: BpfHashMap<MapData, K, V> = BpfHashMap::try_from(wrapped)?;
    out.push(Occupancy {
        map,
        entries: batch::count_all(&hash)?,
        capacity: capacity as usize,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use proxy_common::{CT_FORWARD, FAMILY_V4, PROTO_TCP};

    use super::*;

    /// More entries than one batch holds are all counted.
    #[test]
    fn entries_are_counted_over_several_batches() {
        let Ok((mut dataplane, _ebpf)) = super::super::load_unpinned() else {
            eprintln!("skipped: cannot load the eBPF object here (not root?)");
            return;
        };
        assert_eq!(batch::count_all(&dataplane.conntrack).unwrap(), 0);
        for n in 0..5_000u32 {
            let mut src = [0u8; 16];
            src[..4].copy_from_slice(&n.to_be_bytes());
            let key = CtKey {
                src,
                dst: [10; 16],
                sport: 1u16.to_be(),
                dport: 80u16.to_be(),
                proto: PROTO_TCP,
                family: FAMILY_V4,
                dir: CT_FORWARD,
                _pad0: 0,
            };
            dataplane
                .conntrack
                .insert(key, CtValue::default(), 0)
                .unwrap();
        }
        assert_eq!(batch::count_all(&dataplane.conntrack).unwrap(), 5_000);
        let o = Occupancy {
            map: "conntrack",
            entries: 5_000,
            capacity: 10_000,
        };
        assert_eq!(o.ratio(), 0.5);
    }
}
