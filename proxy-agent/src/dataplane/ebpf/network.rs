//! The node's network: its NodePort addresses, masquerade settings and
//! masquerade port ranges.
use std::{
    collections::{BTreeSet, HashSet},
    net::IpAddr,
};

use aya::maps::{HashMap as BpfHashMap, MapData, lpm_trie::Key as LpmKey};
use ipnet::IpNet;
use proxy_common::{
    CFG_CLUSTER_V4, CFG_CLUSTER_V6, CFG_SNAT_V4, CFG_SNAT_V6, CFG_TRANSLATED_MARK, FAMILY_V4,
    NodeAddrKey, NodeConfig, SNAT_LOW_PORT_MIN, SNAT_PORT_MAX, SNAT_PORT_MIN, ServiceCidrKey,
};

use super::{
    EbpfDataplane, EbpfError, batch,
    encode::{addr_of, node_addr_key},
    writer::remove_ignoring_missing,
};
use crate::dataplane::{ApplyStats, NodeNetwork};

impl EbpfDataplane {
    /// Programs the node's NodePort addresses and masquerade settings.
    pub(super) fn program_node_network(&mut self, network: &NodeNetwork) -> Result<(), EbpfError> {
        let ephemeral = std::fs::read_to_string(EPHEMERAL_PORTS_SYSCTL)
            .ok()
            .and_then(|text| parse_port_range(&text));
        let [(low_min, low_max), (high_min, high_max)] = snat_port_ranges(ephemeral);
        let mut cfg = NodeConfig {
            snat_port_min: high_min,
            snat_port_max: high_max,
            snat_low_min: low_min,
            snat_low_max: low_max,
            ..Default::default()
        };
        if let Some(bit) = self.translated_mark_bit {
            cfg.translated_mark_bit = bit;
            cfg.flags |= CFG_TRANSLATED_MARK;
        }
        if let Some(v4) = network.snat_v4 {
            cfg.snat_v4 = addr_of(IpAddr::V4(v4)).0;
            cfg.flags |= CFG_SNAT_V4;
        }
        if let Some(v6) = network.snat_v6 {
            cfg.snat_v6 = addr_of(IpAddr::V6(v6)).0;
            cfg.flags |= CFG_SNAT_V6;
        }
        for cidr in &network.cluster_cidrs {
            let (addr, family) = addr_of(cidr.network());
            if family == FAMILY_V4 {
                cfg.cluster_v4 = addr;
                cfg.cluster_v4_len = cidr.prefix_len();
                cfg.flags |= CFG_CLUSTER_V4;
            } else {
                cfg.cluster_v6 = addr;
                cfg.cluster_v6_len = cidr.prefix_len();
                cfg.flags |= CFG_CLUSTER_V6;
            }
        }
        self.config.set(0, cfg, 0)?;
        // Addresses: add the new ones, then remove the old ones.
        let kernel = addresses_in(&self.node_addrs)?;
        for ip in network.nodeport_addresses.difference(&kernel) {
            self.node_addrs.insert(node_addr_key(*ip), 1, 0)?;
        }
        for ip in kernel.difference(&network.nodeport_addresses) {
            remove_ignoring_missing(&mut self.node_addrs, &node_addr_key(*ip))?;
        }
        self.node_addresses = network.nodeport_addresses.clone();
        // The datapath tells service traffic by the frontend-address filter
        // alone: NodePort addresses are in it too (one that goes lingers
        // there, as a frontend's address does).
        let written = self.frontend_addresses.clone();
        self.sync_frontend_addrs(written, &mut ApplyStats::default())?;
        self.program_service_cidrs(&network.service_cidrs)?;
        let replan = self.network.changes_plans(network);
        self.network = network.clone();
        if replan {
            self.replan()?;
        }
        Ok(())
    }
}

impl EbpfDataplane {
    /// Copies the node-addresses map into the frontend-address filter before
    /// this version's programs are attached: an earlier version's programs
    /// looked node addresses up in their own map, this version's look in
    /// the filter only, and the first sync that puts them there comes after
    /// the programs. Returns how many were copied.
    pub(super) fn copy_node_addresses_to_filter(&mut self) -> Result<usize, EbpfError> {
        let mut copied = 0;
        for ip in addresses_in(&self.node_addrs)? {
            let key = node_addr_key(ip);
            if self.frontend_addrs.get(&key, 0).is_err() {
                self.frontend_addrs.insert(key, 1, 0)?;
                copied += 1;
            }
        }
        Ok(copied)
    }

    /// Makes the service-CIDRs trie hold exactly `cidrs`: new ones first,
    /// then those that went.
    fn program_service_cidrs(&mut self, cidrs: &[IpNet]) -> Result<(), EbpfError> {
        let wanted: HashSet<(u32, ServiceCidrKey)> = cidrs.iter().map(service_cidr_key).collect();
        let kernel: HashSet<(u32, ServiceCidrKey)> = self
            .service_cidrs
            .keys()
            .filter_map(Result::ok)
            .map(|k| (k.prefix_len(), k.data()))
            .collect();
        for (len, data) in wanted.difference(&kernel) {
            self.service_cidrs.insert(&LpmKey::new(*len, *data), 1, 0)?;
        }
        for (len, data) in kernel.difference(&wanted) {
            match self.service_cidrs.remove(&LpmKey::new(*len, *data)) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// The trie key of a ServiceCIDR range: its family, then its prefix.
fn service_cidr_key(cidr: &IpNet) -> (u32, ServiceCidrKey) {
    let (addr, family) = addr_of(cidr.network());
    (
        32 + u32::from(cidr.prefix_len()),
        ServiceCidrKey {
            family_be: u32::from(family).to_be(),
            addr,
        },
    )
}

/// The node's own ephemeral ports (this network namespace's).
const EPHEMERAL_PORTS_SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_port_range";
/// The default NodePort range's first port; masquerade ports stay below it.
const NODE_PORT_RANGE_MIN: u16 = 30_000;

/// `"32768\t60999\n"` -> (32768, 60999).
fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    let (low, high) = (parts.next()?.ok()?, parts.next()?.ok()?);
    (low <= high).then_some((low, high))
}

/// The masquerade port ranges `[low, high]` (inclusive; `(0, 0)` is
/// empty): every port from 1024 up that is neither one of the node's
/// ephemeral ports (its own connections) nor in the NodePort range, as one
/// range below both and one above. Unknown ephemeral ports: Linux's
/// default. When nothing is left above, the default high range is kept so
/// that masquerade still works, at the risk of a rare collision.
fn snat_port_ranges(ephemeral: Option<(u16, u16)>) -> [(u16, u16); 2] {
    let (eph_min, eph_max) = ephemeral.unwrap_or((32_768, 60_999));
    let low_end = eph_min.min(NODE_PORT_RANGE_MIN);
    let low = if low_end > SNAT_LOW_PORT_MIN {
        (SNAT_LOW_PORT_MIN, low_end - 1)
    } else {
        (0, 0)
    };
    let high_start = eph_max.max(NODE_PORT_RANGE_MIN + 2_767).saturating_add(1);
    let high = if eph_max < u16::MAX && high_start > eph_max {
        (high_start, u16::MAX)
    } else {
        (SNAT_PORT_MIN, SNAT_PORT_MAX)
    };
    [low, high]
}

/// The addresses an address-keyed map (node or frontend addresses) holds.
pub(super) fn addresses_in(
    map: &BpfHashMap<MapData, NodeAddrKey, u32>,
) -> Result<BTreeSet<IpAddr>, EbpfError> {
    Ok(batch::read_all(map)?
        .into_iter()
        .filter_map(|(k, _)| address_of(&k))
        .collect())
}

/// The address of a node-addresses (or frontend-addresses) key.
pub(super) fn address_of(k: &NodeAddrKey) -> Option<IpAddr> {
    super::encode::ip_of(&k.addr, k.family)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masquerade_ports_avoid_ephemeral_and_node_ports() {
        for (ephemeral, want) in [
            // Linux's default: 1024-29999 and 61000-65535.
            (Some((32_768, 60_999)), [(1_024, 29_999), (61_000, 65_535)]),
            (None, [(1_024, 29_999), (61_000, 65_535)]),
            // A wide ephemeral range leaves less on each side.
            (Some((10_000, 64_999)), [(1_024, 9_999), (65_000, 65_535)]),
            // Ephemeral ports below the NodePorts: the high range starts
            // above the NodePorts.
            (Some((20_000, 25_000)), [(1_024, 19_999), (32_768, 65_535)]),
            // Nothing left: no low range, and the default high range.
            (Some((1_024, 65_535)), [(0, 0), (61_000, 65_535)]),
        ] {
            assert_eq!(snat_port_ranges(ephemeral), want, "{ephemeral:?}");
        }
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32_768, 60_999)));
        for bad in ["", "32768", "60999 32768", "a b", "1 70000"] {
            assert_eq!(parse_port_range(bad), None, "{bad:?}");
        }
    }

    /// The datapath tells service traffic by the frontend-address filter
    /// alone, so NodePort addresses are in it: a new one at once, one that
    /// goes lingers like a frontend's address, and one that is also a
    /// frontend's lingering address stays. An earlier version kept them
    /// only in the node-addresses map; they are copied in at load.
    #[test]
    fn nodeport_addresses_are_in_the_frontend_address_filter() {
        let Ok((mut dp, _ebpf)) = super::super::load_unpinned() else {
            eprintln!("skipped: cannot load the eBPF object here (not root?)");
            return;
        };
        let a: IpAddr = "192.0.2.10".parse().expect("address");
        let b: IpAddr = "2001:db8::11".parse().expect("address");
        let network = |addresses: &[IpAddr]| NodeNetwork {
            nodeport_addresses: addresses.iter().copied().collect(),
            ..NodeNetwork::default()
        };
        let filter = |dp: &EbpfDataplane| addresses_in(&dp.frontend_addrs).expect("read");
        let set = |addresses: &[IpAddr]| addresses.iter().copied().collect::<BTreeSet<_>>();

        dp.program_node_network(&network(&[a, b])).expect("program");
        assert_eq!(filter(&dp), set(&[a, b]));
        dp.program_node_network(&network(&[a])).expect("program");
        assert_eq!(filter(&dp), set(&[a, b]), "a removed address lingers");
        let later = std::time::Instant::now()
            + super::super::writer::FRONTEND_ADDR_LINGER
            + std::time::Duration::from_secs(1);
        // `a` also lingers as a frontend's address whose frontend went.
        dp.lingering.insert(a, std::time::Instant::now());
        dp.expire_lingering(later, &mut ApplyStats::default())
            .expect("expire");
        assert_eq!(filter(&dp), set(&[a]), "b is gone, a stays");

        remove_ignoring_missing(&mut dp.frontend_addrs, &node_addr_key(a)).expect("remove");
        assert_eq!(dp.copy_node_addresses_to_filter().expect("copy"), 1);
        assert_eq!(filter(&dp), set(&[a]));
        assert_eq!(dp.copy_node_addresses_to_filter().expect("copy"), 0);
    }
}
