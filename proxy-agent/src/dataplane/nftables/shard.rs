//! The [`SHARDS`] tables: which one holds a frontend, and what one table
//! holds and writes.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    net::IpAddr,
};

use ::nftables::{
    expr::{Expression, NamedExpression},
    schema::{FlushObject, NfCmd, NfListObject, SetType, SetTypeValue},
};

use super::{
    Programmed, SHARDS, Shadow, TABLE,
    base::{BASE_CHAINS, BASE_SETS, SERVICE_CIDR_CHAINS, SERVICE_CIDR_SETS},
    existing::Existing,
    expr::{addr_type, chain, element, prefix, s, set, suffix, table},
    render::{affinity_set_object, frontend_chain, map_element, map_entry, render},
    transaction::Tx,
};
use crate::{
    dataplane::{
        ApplyStats, NodeNetwork,
        netfilter::{Family, fnv1a_64},
    },
    model::{FrontendKey, FrontendKind},
};

/// The shard of a frontend: a hash of its key that stays the same across
/// restarts and versions (the tables outlive the agent).
pub(super) fn shard_of(key: &FrontendKey) -> usize {
    let mut bytes = match key.ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    bytes.extend(key.port.to_be_bytes());
    bytes.push(key.protocol.number());
    (fnv1a_64(&bytes) % SHARDS as u64) as usize
}

/// The table that holds `key`'s frontend.
#[cfg(test)]
pub(super) fn table_of(key: &FrontendKey) -> String {
    format!("{TABLE}-{}", shard_of(key))
}

/// One of the [`SHARDS`] tables and the endpoints of the frontends it
/// holds.
pub(super) struct Shard {
    /// `proxy-agent-<n>`.
    pub(super) table: String,
    /// Endpoints of every programmed frontend, counted, for the hairpin set.
    pub(super) hairpin: BTreeMap<IpAddr, usize>,
    /// Addresses of the programmed ClusterIP frontends, counted, for the
    /// cluster-ips set.
    pub(super) cluster_ips: BTreeMap<IpAddr, usize>,
    /// The first shard's table also holds the ServiceCIDR check.
    pub(super) first: bool,
}

/// A shard's part of a transaction, and its state once that succeeds.
pub(super) struct Staged {
    pub(super) shard: usize,
    pub(super) keys: Vec<FrontendKey>,
    pub(super) hairpin: BTreeMap<IpAddr, usize>,
    pub(super) cluster_ips: BTreeMap<IpAddr, usize>,
}

impl Shard {
    pub(super) fn new(table: String, first: bool) -> Self {
        Shard {
            table,
            hairpin: BTreeMap::new(),
            cluster_ips: BTreeMap::new(),
            first,
        }
    }

    /// The objects that turn what `programmed` holds for `keys` (this
    /// shard's) into `wanted` (a key missing from `wanted` is removed), in
    /// the order a transaction needs: new chains and sets, flushes, rules,
    /// elements, deletions. `existing`: what the kernel holds that
    /// `programmed` does not know of (a reconcile's rewrite): its chains are
    /// flushed rather than added, its sets kept (nft refuses to add a set
    /// again: the kernel's has the `dynamic` flag, which the JSON input
    /// cannot give). Returns the part and the shard's hairpin and ClusterIP
    /// counts once it is written.
    pub(super) fn prepare(
        &self,
        programmed: &Shadow,
        keys: &[FrontendKey],
        wanted: &Shadow,
        existing: Option<&Existing>,
    ) -> (Tx, BTreeMap<IpAddr, usize>, BTreeMap<IpAddr, usize>) {
        let mut parts = Parts::new(&self.table);
        for key in keys {
            let old = programmed.get(key);
            let new = wanted.get(key);
            if old == new && old.is_some() {
                continue;
            }
            parts.frontend(old, new, existing);
        }
        let hairpin = parts.hairpin(self.hairpin.clone());
        let cluster_ips = parts.cluster_ips(self.cluster_ips.clone());
        (parts.into_tx(&self.table), hairpin, cluster_ips)
    }

    /// The sets of NodePort addresses (and, in the first shard, of the
    /// ServiceCIDRs), flushed and written again.
    pub(super) fn node_network_objects(&self, network: &NodeNetwork) -> Tx {
        let mut batch = Tx::new(&self.table);
        batch.add(table());
        for family in [Family::V4, Family::V6] {
            if self.first {
                let cidrs = network
                    .service_cidrs
                    .iter()
                    .filter(|c| Family::of_net(c) == family)
                    .map(prefix);
                refill(&mut batch, "service-cidrs", family, cidrs.collect());
            }
            let ips = network
                .nodeport_addresses
                .iter()
                .filter(|ip| Family::of(**ip) == family)
                .map(|ip| s(ip.to_string()));
            refill(&mut batch, "nodeport-ips", family, ips.collect());
        }
        batch
    }

    /// Compares the kernel's table with `wanted` (this shard's part):
    /// the objects that delete what is not wanted, and the drift counted.
    pub(super) fn cleanup_objects(
        &self,
        wanted: &[&Programmed],
        existing: &Existing,
        stats: &mut ApplyStats,
    ) -> Tx {
        let wanted_chains: HashSet<&str> = wanted
            .iter()
            .flat_map(|p| &p.rendered.chains)
            .map(String::as_str)
            .collect();
        let wanted_sets: HashSet<&str> = wanted
            .iter()
            .flat_map(|p| &p.rendered.sets)
            .map(String::as_str)
            .collect();
        let mut batch = Tx::new(&self.table);
        batch.add(table());
        // Elements of frontends that should not be there, then their chains.
        let wanted_elements: HashSet<(String, String)> = wanted
            .iter()
            .map(|p| (map_entry(&p.plan).0, frontend_chain(&p.plan.key)))
            .collect();
        for (map, key, target) in &existing.elements {
            if !wanted_elements.contains(&(map.clone(), target.clone())) {
                batch.push_value(serde_json::json!({ "delete": { "element": {
                    "family": "inet", "table": TABLE, "name": map, "elem": [key],
                } } }));
                stats.kernel_deletes += 1;
            }
        }
        let mut late = Tx::new(&self.table);
        for name in &existing.chains {
            let base = BASE_CHAINS.contains(&name.as_str())
                || SERVICE_CIDR_CHAINS.contains(&name.as_str());
            if !wanted_chains.contains(name.as_str()) && !base {
                batch.add_cmd(NfCmd::Flush(FlushObject::Chain(chain(name))));
                late.delete(NfListObject::Chain(chain(name)));
                stats.kernel_deletes += 1;
            }
        }
        for name in &existing.sets {
            let base =
                BASE_SETS.contains(&name.as_str()) || SERVICE_CIDR_SETS.contains(&name.as_str());
            if !wanted_sets.contains(name.as_str()) && !base {
                late.delete(NfListObject::Set(Box::new(set(
                    name,
                    SetTypeValue::Single(SetType::Ipv4Addr),
                ))));
                stats.kernel_deletes += 1;
            }
        }
        batch.append(late);
        // What is wanted and missing.
        let existing_elements: HashSet<(String, String)> = existing
            .elements
            .iter()
            .map(|(m, _, t)| (m.clone(), t.clone()))
            .collect();
        stats.kernel_writes += wanted_elements.difference(&existing_elements).count();
        stats.kernel_writes += wanted_chains
            .iter()
            .filter(|c| !existing.chains.contains(**c))
            .count();
        batch
    }
}

/// Flushes the set `<name><family suffix>` and writes `elements` into it.
fn refill(batch: &mut Tx, name: &str, family: Family, elements: Vec<Expression<'static>>) {
    let name = format!("{name}{}", suffix(family));
    batch.add_cmd(NfCmd::Flush(FlushObject::Set(Box::new(set(
        &name,
        SetTypeValue::Single(addr_type(family)),
    )))));
    if !elements.is_empty() {
        batch.add(element(&name, elements));
    }
}

/// Applies `delta` to the reference `counts` of addresses, adding to
/// `elements` the element (`element_of`) of an address whose count leaves
/// zero, and deleting that of one whose count drops to zero. Returns the
/// counts after.
fn count_elements(
    elements: &mut Tx,
    mut counts: BTreeMap<IpAddr, usize>,
    delta: &BTreeMap<IpAddr, isize>,
    element_of: impl Fn(IpAddr) -> NfListObject<'static>,
) -> BTreeMap<IpAddr, usize> {
    for (ip, delta) in delta {
        let before = counts.get(ip).copied().unwrap_or(0);
        let after = (before as isize + delta).max(0) as usize;
        if before == 0 && after > 0 {
            elements.add(element_of(*ip));
        } else if before > 0 && after == 0 {
            elements.delete(element_of(*ip));
        }
        if after == 0 {
            counts.remove(ip);
        } else {
            counts.insert(*ip, after);
        }
    }
    counts
}

/// A shard's part of a transaction, by kind, in the order the transaction
/// needs them, and how many frontends each endpoint gains or loses.
struct Parts {
    adds: Tx,
    flushes: Tx,
    rules: Tx,
    elements: Tx,
    deletes: Tx,
    hairpin_delta: BTreeMap<IpAddr, isize>,
    cluster_ip_delta: BTreeMap<IpAddr, isize>,
}

impl Parts {
    fn new(table: &str) -> Parts {
        Parts {
            adds: Tx::new(table),
            flushes: Tx::new(table),
            rules: Tx::new(table),
            elements: Tx::new(table),
            deletes: Tx::new(table),
            hairpin_delta: BTreeMap::new(),
            cluster_ip_delta: BTreeMap::new(),
        }
    }

    /// Adds what turns `old` into `new` (either missing: added, removed).
    fn frontend(
        &mut self,
        old: Option<&Programmed>,
        new: Option<&Programmed>,
        existing: Option<&Existing>,
    ) {
        let old_chains: BTreeSet<String> = old
            .map(|o| o.rendered.chains.clone())
            .unwrap_or_default()
            .into_iter()
            .collect();
        let old_sets: BTreeSet<String> = old
            .map(|o| o.rendered.sets.clone())
            .unwrap_or_default()
            .into_iter()
            .collect();
        let (new_chains, new_sets) = match new {
            Some(new) => self.write(new, &old_chains, &old_sets, existing),
            None => Default::default(),
        };
        if let Some(new) = new
            && old.is_none()
        {
            self.elements.add(map_element(&new.plan));
        }
        if let Some(old) = old {
            for b in old.plan.backends() {
                *self.hairpin_delta.entry(b.ip).or_default() -= 1;
            }
            if old.frontend.kind == FrontendKind::ClusterIp {
                *self.cluster_ip_delta.entry(old.plan.key.ip).or_default() -= 1;
            }
            if new.is_none() {
                self.elements.delete(map_element(&old.plan));
            }
        }
        for name in old_chains.difference(&new_chains) {
            self.flushes
                .add_cmd(NfCmd::Flush(FlushObject::Chain(chain(name))));
            self.deletes.delete(NfListObject::Chain(chain(name)));
        }
        for name in old_sets.difference(&new_sets) {
            self.deletes.delete(NfListObject::Set(Box::new(set(
                name,
                SetTypeValue::Single(SetType::Ipv4Addr),
            ))));
        }
    }

    /// Writes `new`'s sets (those in neither `old_sets` nor `existing`),
    /// its chains (flushed when in `old_chains` or `existing`, else added)
    /// and their rules.
    /// Returns the names of its chains and sets.
    fn write(
        &mut self,
        new: &Programmed,
        old_chains: &BTreeSet<String>,
        old_sets: &BTreeSet<String>,
        existing: Option<&Existing>,
    ) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut new_chains = BTreeSet::new();
        let mut new_sets = BTreeSet::new();
        let rendered = render(&new.plan, &new.comment);
        for (name, family, timeout) in &rendered.sets {
            if !old_sets.contains(name) && !existing.is_some_and(|e| e.sets.contains(name)) {
                self.adds.add(affinity_set_object(name, *family, *timeout));
            }
            new_sets.insert(name.clone());
        }
        for (name, chain_rules) in rendered.chains {
            if old_chains.contains(&name) || existing.is_some_and(|e| e.chains.contains(&name)) {
                self.flushes
                    .add_cmd(NfCmd::Flush(FlushObject::Chain(chain(&name))));
            } else {
                self.adds.add(NfListObject::Chain(chain(&name)));
            }
            for r in chain_rules {
                self.rules.add(r);
            }
            new_chains.insert(name);
        }
        for b in new.plan.backends() {
            *self.hairpin_delta.entry(b.ip).or_default() += 1;
        }
        if new.frontend.kind == FrontendKind::ClusterIp {
            *self.cluster_ip_delta.entry(new.plan.key.ip).or_default() += 1;
        }
        (new_chains, new_sets)
    }

    /// The hairpin pairs of endpoints that come or go with this part, from
    /// the shard's counts `hairpin`. Returns the counts after it.
    fn hairpin(&mut self, hairpin: BTreeMap<IpAddr, usize>) -> BTreeMap<IpAddr, usize> {
        let delta = std::mem::take(&mut self.hairpin_delta);
        count_elements(&mut self.elements, hairpin, &delta, |ip| {
            element(
                &format!("hairpin{}", suffix(Family::of(ip))),
                vec![Expression::Named(NamedExpression::Concat(vec![
                    s(ip.to_string()),
                    s(ip.to_string()),
                ]))],
            )
        })
    }

    /// The cluster-ips elements of ClusterIPs that come or go with this
    /// part, from the shard's counts `counts`. Returns the counts after it.
    fn cluster_ips(&mut self, counts: BTreeMap<IpAddr, usize>) -> BTreeMap<IpAddr, usize> {
        let delta = std::mem::take(&mut self.cluster_ip_delta);
        count_elements(&mut self.elements, counts, &delta, |ip| {
            element(
                &format!("cluster-ips{}", suffix(Family::of(ip))),
                vec![s(ip.to_string())],
            )
        })
    }

    /// The transaction part: the table, then the objects in order.
    fn into_tx(self, table_name: &str) -> Tx {
        let mut batch = Tx::new(table_name);
        batch.add(table());
        for objects in [
            self.adds,
            self.flushes,
            self.rules,
            self.elements,
            self.deletes,
        ] {
            batch.append(objects);
        }
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::{super::existing::is_ours, *};
    use crate::model::test_support::key;

    #[test]
    fn frontends_spread_over_every_shard_and_only_our_tables_are_ours() {
        let mut counts = [0usize; SHARDS];
        for i in 0..4000u32 {
            let k = key(&format!("10.96.{}.{}", i / 256, i % 256), 80);
            counts[shard_of(&k)] += 1;
            assert_eq!(table_of(&k), format!("proxy-agent-{}", shard_of(&k)));
        }
        assert!(counts.iter().all(|&c| c > 350 && c < 650), "{counts:?}");
        // Stable: the tables outlive the agent, so this must never change.
        assert_eq!(
            shard_of(&key("10.96.0.1", 80)),
            shard_of(&key("10.96.0.1", 80))
        );
        for (name, ours) in [
            ("proxy-agent", true),
            ("proxy-agent-3", true),
            ("proxy-agent-12", true),
            ("proxy-agent-", false),
            ("proxy-agent-x", false),
            ("kube-proxy", false),
        ] {
            assert_eq!(is_ours(name), ours, "{name}");
        }
    }
}
