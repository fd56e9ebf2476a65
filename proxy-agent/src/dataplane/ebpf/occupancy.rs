//! How full the maps are: a full flow map evicts live flows (an LRU map
//! drops its least recently used entry for a new one, and the connection
//! whose entry went loses its translation), a full services or backends
//! map refuses new frontends. Counted in batches from the pins, so that
//! the agent can say so before it happens.
use std::path::Path;

use std::collections::HashMap;

use aya::{
    Pod,
    maps::{Array, HashMap as BpfHashMap, IterableMap, Map, MapData},
};
use proxy_common::{
    AFFINITY_MAX_ENTRIES, Addr, AffinityKey, AffinityValue, BACKENDS_MAX_ENTRIES, BackendId,
    BackendValue, CONNTRACK_MAX_ENTRIES, CT_SNAT_IN, CtKey, CtValue, MAP_AFFINITY, MAP_BACKENDS,
    MAP_CONFIG, MAP_CONNTRACK, MAP_SERVICES, MAP_SOCK_REVNAT, NodeConfig, SERVICES_MAX_ENTRIES,
    SOCK_REVNAT_MAX_ENTRIES, ServiceKey, ServiceValue, SockRevKey, SockRevValue,
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

/// The masquerade ports in use towards the busiest destination: a
/// masqueraded flow takes a port of the node's address that is unique
/// only per destination (backend address, port, protocol), so a
/// destination that many clients reach through one node address can use
/// every port the node has for masquerade, and new flows then wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnatPorts {
    pub busiest: usize,
    /// Ports the datapath masquerades to (both ranges of its config).
    pub available: usize,
}

/// What [`occupancy`] counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fill {
    pub maps: Vec<Occupancy>,
    /// `None` when no config is pinned.
    pub snat: Option<SnatPorts>,
}

/// The fill of the maps that can fill up, of the datapath pinned under
/// `bpf_root` (those not pinned are left out), and of its masquerade
/// ports.
pub fn occupancy(bpf_root: &Path) -> Result<Fill, EbpfError> {
    let mut out = Vec::new();
    let mut snat_busiest = 0;
    if let Some(data) = pinned(bpf_root, MAP_CONNTRACK)? {
        let conntrack: BpfHashMap<MapData, CtKey, CtValue> =
            BpfHashMap::try_from(Map::LruHashMap(data))?;
        let (entries, busiest) = count_flows(&conntrack)?;
        snat_busiest = busiest;
        out.push(Occupancy {
            map: "conntrack",
            entries,
            capacity: CONNTRACK_MAX_ENTRIES as usize,
        });
    }
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
    let snat = match pinned(bpf_root, MAP_CONFIG)? {
        Some(data) => {
            let config: Array<MapData, NodeConfig> = Array::try_from(Map::Array(data))?;
            let c = config.get(&0, 0)?;
            Some(SnatPorts {
                busiest: snat_busiest,
                available: span(c.snat_port_min, c.snat_port_max)
                    + span(c.snat_low_min, c.snat_low_max),
            })
        }
        None => None,
    };
    Ok(Fill { maps: out, snat })
}

/// Ports in `[min, max]`; `(0, 0)` is no range.
fn span(min: u16, max: u16) -> usize {
    if min == 0 && max == 0 {
        0
    } else {
        usize::from(max.saturating_sub(min)) + 1
    }
}

/// The flow map's entries, and the most masquerade ports one destination
/// uses: the ingress entries of masqueraded flows, keyed backend -> node
/// address and port, grouped by all but the port.
fn count_flows(
    conntrack: &BpfHashMap<MapData, CtKey, CtValue>,
) -> Result<(usize, usize), EbpfError> {
    let mut entries = 0;
    let mut per_destination: HashMap<(Addr, u16, Addr, u8), usize> = HashMap::new();
    batch::for_each_batch(
        conntrack.map(),
        |keys: &mut Vec<CtKey>, values: &mut Vec<CtValue>| {
            entries += keys.len();
            for k in keys.iter().filter(|k| k.dir == CT_SNAT_IN) {
                *per_destination
                    .entry((k.src, k.sport, k.dst, k.proto))
                    .or_default() += 1;
            }
            keys.clear();
            values.clear();
        },
    )
    .map_err(|io_error| {
        EbpfError::from(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_lookup_batch",
            io_error,
        }))
    })?;
    Ok((
        entries,
        per_destination.values().copied().max().unwrap_or(0),
    ))
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
        // Masqueraded flows: three ports towards one backend, one towards
        // another.
        for (backend, node_port) in [(1u8, 61_000u16), (1, 61_001), (1, 61_002), (2, 61_000)] {
            let key = CtKey {
                src: [backend; 16],
                dst: [192; 16],
                sport: 8080u16.to_be(),
                dport: node_port.to_be(),
                proto: PROTO_TCP,
                family: FAMILY_V4,
                dir: CT_SNAT_IN,
                _pad0: 0,
            };
            dataplane
                .conntrack
                .insert(key, CtValue::default(), 0)
                .unwrap();
        }
        assert_eq!(count_flows(&dataplane.conntrack).unwrap(), (5_004, 3));
        assert_eq!((span(61_000, 65_535), span(0, 0)), (4_536, 0));
        let o = Occupancy {
            map: "conntrack",
            entries: 5_000,
            capacity: 10_000,
        };
        assert_eq!(o.ratio(), 0.5);
    }
}
