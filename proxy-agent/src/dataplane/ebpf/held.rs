//! What the ebpf mode holds, read back from the maps pinned under the bpf
//! root (the agent need not run): service entries by frontend and scope,
//! their backend slots, the backends by ID and the source ranges by
//! frontend view. The maps hold addresses only, no Service names.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::Path,
};

use aya::maps::{Array, HashMap as BpfHashMap, LpmTrie, Map, MapData};
use ipnet::IpNet;
use proxy_common::{
    Addr, AffinityKey, AffinityValue, BackendId, BackendValue, CT_FORWARD, CtKey, CtValue,
    MAP_AFFINITY, MAP_BACKENDS, MAP_CONNTRACK, MAP_FRONTEND_FLOWS, MAP_SERVICES, MAP_SOURCE_RANGES,
    SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_AFFINITY, SVC_DROP_EMPTY, SVC_INTERNAL_SCOPE,
    SVC_SOURCE_RANGES, ServiceKey, ServiceValue, SourceRangeKey,
};

use super::{
    EbpfError, batch,
    encode::{addr_of, ip_of, service_key},
    handover::pinned,
};
use crate::{
    dataplane::held::{HeldAction, HeldCounters, HeldFrontend, HeldTable},
    model::{Backend, FrontendKey, FrontendKind, Protocol},
};

/// What the maps pinned under `bpf_root` hold; an empty table when there
/// are none (no ebpf agent ran here, or its pins were removed).
pub fn held(bpf_root: &Path) -> Result<HeldTable, EbpfError> {
    let open = |name: &str| pinned(bpf_root, name);
    let (Some(services), Some(backends)) = (open(MAP_SERVICES)?, open(MAP_BACKENDS)?) else {
        return Ok(HeldTable::new("ebpf"));
    };
    let services: BpfHashMap<MapData, ServiceKey, ServiceValue> =
        BpfHashMap::try_from(Map::HashMap(services))?;
    let backends: BpfHashMap<MapData, BackendId, BackendValue> =
        BpfHashMap::try_from(Map::HashMap(backends))?;
    let ranges = match open(MAP_SOURCE_RANGES)? {
        Some(map) => {
            let trie: LpmTrie<MapData, SourceRangeKey, u32> = LpmTrie::try_from(Map::LpmTrie(map))?;
            trie.keys()
                .filter_map(Result::ok)
                .map(|k| (k.prefix_len(), k.data()))
                .collect()
        }
        None => Vec::new(),
    };
    let flows: Option<Array<MapData, u64>> = match open(MAP_FRONTEND_FLOWS)? {
        Some(map) => Some(Array::try_from(Map::Array(map))?),
        None => None,
    };
    Ok(decode(
        &batch::read_all(&services)?,
        &batch::read_all(&backends)?.into_iter().collect(),
        &ranges,
        &|svc_id| flows.as_ref().and_then(|f| f.get(&svc_id, 0).ok()),
    ))
}

/// The frontends of these map contents: `services` and `backends` as
/// the maps hold them, `ranges` the source-range trie's keys (prefix
/// length, key), `flows` the new flows counted for a view's ID. Entries
/// that cannot be read (an unknown family or protocol, a slot pointing at
/// no backend) are left out: they serve no traffic either.
pub(super) fn decode(
    services: &[(ServiceKey, ServiceValue)],
    backends: &BTreeMap<BackendId, BackendValue>,
    ranges: &[(u32, SourceRangeKey)],
    flows: &dyn Fn(u32) -> Option<u64>,
) -> HeldTable {
    let slots: HashMap<ServiceKey, u32> = services
        .iter()
        .filter(|(k, _)| k.slot != 0)
        .map(|(k, v)| (*k, v.backend_id))
        .collect();
    let mut ranges_of: HashMap<u32, Vec<(u32, Addr)>> = HashMap::new();
    for (prefix_len, key) in ranges {
        ranges_of
            .entry(u32::from_be(key.svc_id_be))
            .or_default()
            .push((*prefix_len, key.addr));
    }
    // A view's ranges are of its frontend's family (others are never
    // written); the trie's prefix counts the 32 bits of the view's ID first.
    let ranges_of_view = |svc_id: u32, family: u8| -> Vec<IpNet> {
        let mut nets: Vec<IpNet> = ranges_of
            .get(&svc_id)
            .into_iter()
            .flatten()
            .filter_map(|(prefix_len, addr)| {
                let prefix = u8::try_from(prefix_len.checked_sub(32)?).ok()?;
                IpNet::new(ip_of(addr, family)?, prefix).ok()
            })
            .map(|net| net.trunc())
            .collect();
        nets.sort_unstable();
        nets.dedup();
        nets
    };
    let view_backends = |key: &ServiceKey, scope: u8, count: u16| -> Vec<Backend> {
        (1..=count)
            .filter_map(|slot| {
                let id = slots.get(&ServiceKey {
                    scope,
                    slot,
                    ..*key
                })?;
                let b = backends.get(id)?;
                Some(Backend {
                    ip: ip_of(&b.addr, b.family)?,
                    port: u16::from_be(b.port),
                })
            })
            .collect()
    };
    let entries: HashMap<(ServiceKey, u8), &ServiceValue> = services
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .map(|(k, v)| ((ServiceKey { scope: 0, ..*k }, k.scope), v))
        .collect();
    let mut table = HeldTable::new("ebpf");
    for (key, value) in services
        .iter()
        .filter(|(k, _)| k.slot == 0 && k.scope == SCOPE_EXTERNAL)
    {
        let (Some(ip), Some(protocol)) = (
            ip_of(&key.addr, key.family),
            Protocol::from_number(key.proto),
        ) else {
            continue;
        };
        let mut all: BTreeSet<Backend> = view_backends(key, SCOPE_EXTERNAL, value.count)
            .into_iter()
            .collect();
        let mut connections = flows(value.svc_id);
        if value.flags & SVC_INTERNAL_SCOPE != 0
            && let Some(internal) = entries.get(&(*key, SCOPE_INTERNAL))
        {
            all.extend(view_backends(key, SCOPE_INTERNAL, internal.count));
            if let Some(n) = flows(internal.svc_id) {
                connections = Some(connections.unwrap_or(0) + n);
            }
        }
        let action = if value.count > 0 {
            HeldAction::Balance
        } else if value.flags & SVC_DROP_EMPTY != 0 {
            HeldAction::Drop
        } else {
            HeldAction::Reject
        };
        table.insert(HeldFrontend {
            key: FrontendKey {
                ip,
                port: u16::from_be(key.port),
                protocol,
            },
            service: None,
            kind: ip.is_unspecified().then_some(FrontendKind::NodePort),
            backends: all.into_iter().collect(),
            action,
            affinity_timeout_secs: (value.flags & SVC_AFFINITY != 0)
                .then_some(value.affinity_timeout_secs),
            source_ranges: (value.flags & SVC_SOURCE_RANGES != 0)
                .then(|| ranges_of_view(value.svc_id, key.family)),
            counters: connections.map(|n| HeldCounters {
                connections: Some(n),
                packets: None,
                bytes: None,
            }),
        });
    }
    table
}

impl super::EbpfDataplane {
    /// The new flows counted for frontend `key`'s views (both, for an
    /// external Local frontend); `None` when it is not programmed.
    pub fn frontend_flows(&self, key: &FrontendKey) -> Option<u64> {
        let mut total = None;
        for scope in [SCOPE_EXTERNAL, SCOPE_INTERNAL] {
            if let Ok(entry) = self.services.get(&service_key(key, scope, 0), 0) {
                let n = self.frontend_flows.get(&entry.svc_id, 0).unwrap_or(0);
                total = Some(total.unwrap_or(0) + n);
            }
        }
        total
    }
}

/// A packet's tuple, for [`pins`].
#[derive(Clone, Copy, Debug)]
pub struct Tuple {
    pub src: IpAddr,
    pub sport: u16,
    pub dst: IpAddr,
    pub dport: u16,
    pub protocol: Protocol,
}

/// What the pinned maps pin a client to: the backend of the flow of
/// `tuple` (when it has a source port), and the backend of the client's
/// affinity entry for `frontend` (a NodePort's key has the unspecified
/// address). Reads only.
pub fn pins(
    bpf_root: &Path,
    tuple: &Tuple,
    frontend: &FrontendKey,
) -> Result<(Option<Backend>, Option<Backend>), EbpfError> {
    let open = |name: &str| pinned(bpf_root, name);
    let Some(backends) = open(MAP_BACKENDS)? else {
        return Ok((None, None));
    };
    let backends: BpfHashMap<MapData, BackendId, BackendValue> =
        BpfHashMap::try_from(Map::HashMap(backends))?;
    let backend_of = |id: BackendId| -> Option<Backend> {
        let b = backends.get(&id, 0).ok()?;
        Some(Backend {
            ip: ip_of(&b.addr, b.family)?,
            port: u16::from_be(b.port),
        })
    };
    let (src, family) = addr_of(tuple.src);
    let mut flow = None;
    if tuple.sport != 0
        && let Some(map) = open(MAP_CONNTRACK)?
    {
        let conntrack: BpfHashMap<MapData, CtKey, CtValue> =
            BpfHashMap::try_from(Map::LruHashMap(map))?;
        let key = CtKey {
            src,
            dst: addr_of(tuple.dst).0,
            sport: tuple.sport.to_be(),
            dport: tuple.dport.to_be(),
            proto: tuple.protocol.number(),
            family,
            dir: CT_FORWARD,
            _pad0: 0,
        };
        flow = conntrack
            .get(&key, 0)
            .ok()
            .and_then(|v| backend_of(v.backend_id));
    }
    let mut affinity = None;
    if let (Some(services), Some(map)) = (open(MAP_SERVICES)?, open(MAP_AFFINITY)?) {
        let services: BpfHashMap<MapData, ServiceKey, ServiceValue> =
            BpfHashMap::try_from(Map::HashMap(services))?;
        let affinities: BpfHashMap<MapData, AffinityKey, AffinityValue> =
            BpfHashMap::try_from(Map::LruHashMap(map))?;
        // The pods' view has an ID of its own: whichever the client used.
        for scope in [SCOPE_EXTERNAL, SCOPE_INTERNAL] {
            let Ok(entry) = services.get(&service_key(frontend, scope, 0), 0) else {
                continue;
            };
            let key = AffinityKey {
                svc_id: entry.svc_id,
                family,
                _pad0: [0; 3],
                client: src,
            };
            if let Ok(value) = affinities.get(&key, 0) {
                affinity = backend_of(value.backend_id);
                break;
            }
        }
    }
    Ok((flow, affinity))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{
        Dataplane,
        held::{assert_holds, sample_table},
    };

    /// What the dataplane writes for every shape of frontend reads back as
    /// its plan.
    #[test]
    fn the_maps_read_back_as_the_plans_they_were_written_from() {
        let Ok((mut dataplane, _ebpf)) = super::super::load_unpinned() else {
            eprintln!("skipped: cannot load the eBPF object here (not root?)");
            return;
        };
        let (table, network) = sample_table();
        dataplane.set_node_network(&network).unwrap();
        dataplane.reconcile(&table).unwrap();
        let ranges: Vec<(u32, SourceRangeKey)> = dataplane
            .source_ranges
            .keys()
            .map(|k| k.map(|k| (k.prefix_len(), k.data())))
            .collect::<Result<_, _>>()
            .unwrap();
        let held = decode(
            &batch::read_all(&dataplane.services).unwrap(),
            &batch::read_all(&dataplane.backends)
                .unwrap()
                .into_iter()
                .collect(),
            &ranges,
            &|svc_id| dataplane.frontend_flows.get(&svc_id, 0).ok(),
        );
        assert_holds(&held, &table, &network);
        // Every view's count starts at zero.
        assert!(
            held.frontends
                .values()
                .all(|f| f.counters.and_then(|c| c.connections) == Some(0)),
            "{held:#?}"
        );
        let node_port = held.frontends.values().find(|f| f.key.port == 30080);
        assert_eq!(node_port.and_then(|f| f.kind), Some(FrontendKind::NodePort));
    }
}
