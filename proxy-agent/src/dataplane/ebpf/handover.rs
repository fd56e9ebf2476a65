//! Handing the node over between the ebpf mode and another: what an agent
//! of another mode does with the pins an ebpf agent left, and what the
//! ebpf mode reads of its own pins to tell which kernel flows are its
//! frontends'.
//!
//! A mode switch keeps established flows: the new mode serves new ones,
//! and the old mode's state stays for the flows it translated until they
//! end. The programs look a flow up before they look at its frontend, so
//! emptying the frontend maps (services, ServiceCIDRs) stops new flows
//! while the programs go on translating the established ones; once none
//! is left the pins go, and with them the programs.
use std::{collections::HashSet, net::IpAddr, path::Path};

use aya::maps::{HashMap as BpfHashMap, LpmTrie, Map, MapData, lpm_trie::Key as LpmKey};
use proxy_common::{
    CT_FLAG_SEEN_FIN, CT_FLAG_SEEN_RST, CT_FORWARD, CT_LIFETIME_TCP_NS, CtKey, CtValue,
    MAP_CONNTRACK, MAP_NODE_ADDRS, MAP_SERVICE_CIDRS, MAP_SERVICES, NodeAddrKey, PROTO_TCP,
    ServiceCidrKey, ServiceKey, ServiceValue,
};

use super::{EbpfError, PinLayout, network::address_of, writer::remove_ignoring_missing};

/// The map `name` pinned under `bpf_root`, if it is there.
pub(super) fn pinned(bpf_root: &Path, name: &str) -> Result<Option<MapData>, EbpfError> {
    let path = PinLayout::new(bpf_root).maps().join(name);
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(MapData::from_pin(&path)?))
}

/// Stops the ebpf datapath pinned under `bpf_root` from taking new flows
/// (its frontends and ServiceCIDRs removed: new packets pass to whatever
/// serves now) while it keeps translating its established ones. Returns
/// whether there was such a datapath.
pub fn stop_new_flows(bpf_root: &Path) -> Result<bool, EbpfError> {
    let Some(services) = pinned(bpf_root, MAP_SERVICES)? else {
        return Ok(false);
    };
    let mut services: BpfHashMap<MapData, ServiceKey, ServiceValue> =
        BpfHashMap::try_from(Map::HashMap(services))?;
    let keys: Vec<ServiceKey> = services.keys().filter_map(Result::ok).collect();
    for key in keys {
        remove_ignoring_missing(&mut services, &key)?;
    }
    if let Some(cidrs) = pinned(bpf_root, MAP_SERVICE_CIDRS)? {
        let mut cidrs: LpmTrie<MapData, ServiceCidrKey, u32> =
            LpmTrie::try_from(Map::LpmTrie(cidrs))?;
        let keys: Vec<LpmKey<ServiceCidrKey>> = cidrs.keys().filter_map(Result::ok).collect();
        for key in keys {
            match cidrs.remove(&key) {
                Ok(()) => {}
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(true)
}

/// The TCP flows the ebpf datapath pinned under `bpf_root` still carries:
/// established (no FIN or reset seen) and not idle past their lifetime.
/// 0 when there is no such datapath.
pub fn live_tcp_flows(bpf_root: &Path) -> Result<usize, EbpfError> {
    let Some(conntrack) = pinned(bpf_root, MAP_CONNTRACK)? else {
        return Ok(0);
    };
    let conntrack: BpfHashMap<MapData, CtKey, CtValue> =
        BpfHashMap::try_from(Map::LruHashMap(conntrack))?;
    let now = monotonic_ns();
    Ok(conntrack
        .iter()
        .filter_map(Result::ok)
        .filter(|(key, value)| {
            key.dir == CT_FORWARD
                && key.proto == PROTO_TCP
                && value.flags & (CT_FLAG_SEEN_FIN | CT_FLAG_SEEN_RST) == 0
                && now.saturating_sub(value.last_seen_ns) < CT_LIFETIME_TCP_NS
        })
        .count())
}

/// The TCP frontends (address, port) of the ebpf datapath pinned under
/// `bpf_root`, NodePorts on each NodePort address.
pub fn tcp_frontends(bpf_root: &Path) -> Result<HashSet<(IpAddr, u16)>, EbpfError> {
    let Some(services) = pinned(bpf_root, MAP_SERVICES)? else {
        return Ok(HashSet::new());
    };
    let services: BpfHashMap<MapData, ServiceKey, ServiceValue> =
        BpfHashMap::try_from(Map::HashMap(services))?;
    let node_addresses: Vec<IpAddr> = match pinned(bpf_root, MAP_NODE_ADDRS)? {
        Some(addrs) => {
            let addrs: BpfHashMap<MapData, NodeAddrKey, u32> =
                BpfHashMap::try_from(Map::HashMap(addrs))?;
            addrs
                .keys()
                .filter_map(Result::ok)
                .filter_map(|key| address_of(&key))
                .collect()
        }
        None => Vec::new(),
    };
    let mut out = HashSet::new();
    for key in services.keys().filter_map(Result::ok) {
        if key.proto != PROTO_TCP {
            continue;
        }
        let port = u16::from_be(key.port);
        let node_key = NodeAddrKey {
            addr: key.addr,
            family: key.family,
            _pad0: [0; 3],
        };
        let Some(ip) = address_of(&node_key) else {
            continue;
        };
        if ip.is_unspecified() {
            out.extend(
                node_addresses
                    .iter()
                    .filter(|a| a.is_ipv4() == ip.is_ipv4())
                    .map(|a| (*a, port)),
            );
        } else {
            out.insert((ip, port));
        }
    }
    Ok(out)
}

/// The clock of the programs' `bpf_ktime_get_coarse_ns()`.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given, nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}
