//! The nftables dataplane: [`SHARDS`] `inet` tables, `proxy-agent-0` to
//! `proxy-agent-7`, that nobody confuses with kube-proxy's `kube-proxy`
//! tables; nothing outside them is touched. A frontend lives in the table
//! of a stable hash of its key ([`shard_of`]); every table is complete in
//! itself (a chain can only jump within its table).
//!
//! Layout of each table (what an operator sees in `nft list ruleset`):
//! - `nat-prerouting` / `nat-output` jump to `services`, which looks the
//!   packet up in verdict maps keyed by `daddr . l4proto . dport`
//!   (`services4`/`services6`) and, on the node's NodePort addresses
//!   (`nodeport-ips4`/`6`), by `l4proto . dport` (`nodeports4`/`6`): the
//!   lookup does not grow with the number of services.
//! - One chain per frontend, `svc-<proto>-<ip>-<port>` (and `…-cluster` for
//!   the pods' view of an external frontend whose policy is Local): source
//!   ranges, the masquerade mark, then the endpoint choice.
//! - The choice is a cascade of `numgen random mod (n-i) == 0` rules, each
//!   DNATing to one endpoint (the last one unconditionally): a uniform
//!   choice, made for the first packet of a connection only.
//! - Session affinity: a dynamic set per endpoint with the service's
//!   timeout; a client found in one is sent to that endpoint, and every
//!   choice refreshes the chosen endpoint's entry.
//! - `nat-postrouting` masquerades marked packets and hairpin connections
//!   (`hairpin4`/`6` hold `endpoint . endpoint`).
//!
//! Why this shape, measured at 10 000 services of 10 endpoints (the
//! figures are in the README):
//! - Per-endpoint chains (upstream's layout) make 110 000 chains; `nft`
//!   lists every chain before each transaction, and one rule added then
//!   takes about 2 s. Per-service anonymous verdict maps cost as much in
//!   `nft`'s cache and in the kernel's set naming. One chain per frontend
//!   and no anonymous sets avoid both.
//! - The kernel validates every rule reachable from a table's base chains
//!   on each commit: with one table, any one-rule change costs ~0.1 s at
//!   that size. Spread over [`SHARDS`] tables, a change validates one
//!   eighth. A new connection pays one map lookup per table; established
//!   ones never reach these chains.
//!
//! Every change is one atomic `nft -j -f -` transaction (it may span the
//! tables) built with the `nftables` crate's schema. A large change is
//! split into transactions of [`FRONTENDS_PER_TRANSACTION`] frontends,
//! each complete in itself (a frontend's chain, its rules and its map
//! element go together): `nft`'s and the kernel's costs grow faster than
//! the size of one transaction.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    time::Instant,
};

use super::{
    ApplyStats, Dataplane, DataplaneError, NodeNetwork, ReconcileReport,
    netfilter::{self, FULL_REWRITE_PERIOD, FrontendPlan, comment_of},
};
use crate::model::{Frontend, FrontendKey, ServiceTable, TableDiff};

mod base;
mod cleanup;
mod existing;
mod expr;
mod render;
mod shard;
mod transaction;

use base::base_objects;
pub use cleanup::{cleanup, cleanup_kube_proxy};
use existing::Existing;
use render::{affinity_sets, cluster_chain, frontend_chain, node_chain};
use shard::{Shard, Staged, shard_of};
use transaction::{Tx, run};

/// The agent's tables (family `inet`) are named `proxy-agent-<n>`.
const TABLE: &str = "proxy-agent";

/// How many tables the frontends are spread over (see the module comment).
const SHARDS: usize = 8;

/// Frontends per transaction of a large change (see the module comment).
const FRONTENDS_PER_TRANSACTION: usize = 500;

#[derive(Debug, thiserror::Error)]
pub enum NftablesError {
    #[error("running nft: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("nft refused the transaction: {0}")]
    Refused(String),
    #[error("encoding the transaction: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("reading nft's listing: {0}")]
    Listing(String),
}

/// What is programmed for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Programmed {
    frontend: Frontend,
    plan: FrontendPlan,
    comment: String,
}

impl Programmed {
    fn chains(&self) -> Vec<String> {
        let mut chains = vec![frontend_chain(&self.plan.key)];
        if self.plan.node_view.is_some() {
            chains.push(node_chain(&self.plan.key));
        }
        if self.plan.cluster_view.is_some() {
            chains.push(cluster_chain(&self.plan.key));
        }
        chains
    }

    fn sets(&self) -> Vec<String> {
        affinity_sets(&self.plan)
            .into_iter()
            .map(|(name, ..)| name)
            .collect()
    }
}

/// Programs services into the tables `inet proxy-agent-0` to
/// `proxy-agent-<SHARDS - 1>`, each frontend into the table [`shard_of`]
/// its key. A transaction may span several tables: a change is as atomic
/// as with one table.
pub struct NftablesDataplane {
    network: NodeNetwork,
    shards: Vec<Shard>,
    /// Whether every shard's table and base objects are known to exist
    /// (they are made together, in one transaction).
    based: bool,
    /// When every frontend chain was last rewritten by a reconcile.
    last_rewrite: Option<Instant>,
}

impl Default for NftablesDataplane {
    fn default() -> Self {
        Self::new()
    }
}

impl NftablesDataplane {
    pub fn new() -> Self {
        NftablesDataplane {
            network: NodeNetwork::default(),
            shards: (0..SHARDS)
                .map(|n| Shard::new(format!("{TABLE}-{n}")))
                .collect(),
            based: false,
            last_rewrite: None,
        }
    }

    fn program(&self, key: &FrontendKey, frontend: &Frontend) -> Programmed {
        Programmed {
            frontend: frontend.clone(),
            plan: netfilter::plan(key, frontend, &self.network),
            comment: comment_of(frontend),
        }
    }

    /// Creates every shard's table and base objects (an `add` of what
    /// exists changes nothing; base chains are flushed and written again),
    /// in one transaction.
    fn ensure_base(&mut self) -> Result<(), NftablesError> {
        let mut tx = Tx::new("");
        for shard in &self.shards {
            let mut part = Tx::new(&shard.table);
            base_objects(&mut part);
            part.append(shard.node_network_objects(&self.network));
            tx.append(part);
        }
        run(tx)?;
        self.based = true;
        Ok(())
    }

    /// Writes `wanted` in place of what is programmed for `keys`, in
    /// transactions of [`FRONTENDS_PER_TRANSACTION`] frontends that span
    /// the shards. On error the transactions before the failed one stay.
    fn write(
        &mut self,
        keys: &[FrontendKey],
        wanted: &BTreeMap<FrontendKey, Programmed>,
        existing: Option<&BTreeMap<String, Existing>>,
        stats: &mut ApplyStats,
    ) -> Result<(), NftablesError> {
        for chunk in keys.chunks(FRONTENDS_PER_TRANSACTION) {
            let mut parts: Vec<Vec<FrontendKey>> = vec![Vec::new(); SHARDS];
            for key in chunk {
                parts[shard_of(key)].push(*key);
            }
            let mut tx = Tx::new("");
            let mut staged = Vec::new();
            for (n, keys) in parts.into_iter().enumerate() {
                if keys.is_empty() {
                    continue;
                }
                let shard = &self.shards[n];
                let known = existing
                    .and_then(|e| e.get(&shard.table))
                    .map(|e| &e.chains);
                let (part, hairpin) = shard.prepare(&keys, wanted, known, stats);
                tx.append(part);
                staged.push(Staged {
                    shard: n,
                    keys,
                    hairpin,
                });
            }
            if staged.is_empty() {
                continue;
            }
            run(tx)?;
            for Staged {
                shard,
                keys,
                hairpin,
            } in staged
            {
                self.shards[shard].commit(&keys, wanted, hairpin);
            }
        }
        Ok(())
    }

    fn apply_diff(&mut self, diff: &TableDiff) -> Result<ApplyStats, NftablesError> {
        if !self.based {
            self.ensure_base()?;
        }
        let mut stats = ApplyStats {
            frontends_added: diff.added.len(),
            frontends_changed: diff.changed.len(),
            frontends_removed: diff.removed.len(),
            ..ApplyStats::default()
        };
        let (keys, wanted) = netfilter::wanted_of(diff, |k, f| self.program(k, f));
        self.write(&keys, &wanted, None, &mut stats)?;
        Ok(stats)
    }

    /// Reads the tables' chains, sets and map elements, and makes them
    /// equal to `desired`. What is missing or extra is counted
    /// (`kernel_writes`/`kernel_deletes`: drift), tables named like ours that no
    /// shard is (an earlier layout) included. When nothing is, and the last
    /// full rewrite is younger than [`FULL_REWRITE_PERIOD`], only the
    /// frontends that differ from `desired` are written (a periodic sync
    /// at 10 000 services then costs a listing, not a rewrite); otherwise
    /// every frontend chain is rewritten, which also repairs rules edited
    /// by hand.
    fn reconcile_table(&mut self, desired: &ServiceTable) -> Result<ApplyStats, NftablesError> {
        let mut existing = Existing::read_all()?;
        self.ensure_base()?;
        let mut stats = ApplyStats::default();
        let wanted: BTreeMap<FrontendKey, Programmed> = desired
            .iter()
            .map(|(k, f)| (*k, self.program(k, f)))
            .collect();
        let cleanup = self.drift_cleanup(&mut existing, &wanted, &mut stats);
        let drift = stats.kernel_writes + stats.kernel_deletes > 0;
        let rewrite_all = self
            .last_rewrite
            .is_none_or(|at| at.elapsed() >= FULL_REWRITE_PERIOD);
        let mut write_stats = ApplyStats::default();
        if !rewrite_all && !drift {
            // The kernel holds what we programmed: write what differs.
            let mut keys: BTreeSet<FrontendKey> = wanted.keys().copied().collect();
            for shard in &self.shards {
                keys.extend(shard.programmed.keys().copied());
            }
            let keys: Vec<FrontendKey> = keys.into_iter().collect();
            self.write(&keys, &wanted, None, &mut write_stats)?;
            stats.frontends_changed = write_stats.kernel_writes + write_stats.kernel_deletes;
            return Ok(stats);
        }
        // Forget what we believe is programmed, remove what is not wanted,
        // and rewrite every wanted frontend; chains the kernel holds are
        // flushed in the same transaction as their new rules.
        self.last_rewrite = None;
        for shard in &mut self.shards {
            shard.programmed.clear();
            shard.hairpin.clear();
        }
        run(cleanup)?;
        let keys: Vec<FrontendKey> = wanted.keys().copied().collect();
        self.write(&keys, &wanted, Some(&existing), &mut write_stats)?;
        self.last_rewrite = Some(Instant::now());
        stats.frontends_added = wanted.len();
        Ok(stats)
    }

    /// The transaction that deletes what `existing` holds and `wanted`
    /// lacks, the drift counted into `stats`: per shard, elements, chains
    /// and sets nobody wants ([`Shard::cleanup_objects`]), and the tables
    /// named like ours that no shard is (an earlier layout), which are
    /// dropped from `existing`.
    fn drift_cleanup(
        &self,
        existing: &mut BTreeMap<String, Existing>,
        wanted: &BTreeMap<FrontendKey, Programmed>,
        stats: &mut ApplyStats,
    ) -> Tx {
        let mut parts: Vec<Vec<&Programmed>> = vec![Vec::new(); SHARDS];
        for (key, p) in wanted {
            parts[shard_of(key)].push(p);
        }
        let mut cleanup = Tx::new("");
        let none = Existing::default();
        for (shard, part) in self.shards.iter().zip(&parts) {
            let found = existing.get(&shard.table).unwrap_or(&none);
            cleanup.append(shard.cleanup_objects(part, found, stats));
        }
        let tables: HashSet<&str> = self.shards.iter().map(|s| s.table.as_str()).collect();
        for table in existing.keys().filter(|t| !tables.contains(t.as_str())) {
            cleanup.push_value(serde_json::json!({ "delete": { "table": {
                "family": "inet", "name": table,
            } } }));
            stats.kernel_deletes += 1;
        }
        existing.retain(|t, _| tables.contains(t.as_str()));
        cleanup
    }

    fn set_network(&mut self, network: &NodeNetwork) -> Result<(), NftablesError> {
        netfilter::allow_localhost_nodeports(network);
        let replan = network.cluster_cidrs != self.network.cluster_cidrs
            || network.masquerade_all != self.network.masquerade_all;
        self.network = network.clone();
        if !self.based {
            return self.ensure_base();
        }
        let mut tx = Tx::new("");
        for shard in &self.shards {
            tx.append(shard.node_network_objects(network));
        }
        run(tx)?;
        if replan {
            let wanted: BTreeMap<FrontendKey, Programmed> = self
                .shards
                .iter()
                .flat_map(|s| s.programmed.iter())
                .map(|(k, p)| (*k, self.program(k, &p.frontend)))
                .collect();
            let keys: Vec<FrontendKey> = wanted.keys().copied().collect();
            let mut stats = ApplyStats::default();
            self.write(&keys, &wanted, None, &mut stats)?;
        }
        Ok(())
    }
}

impl Dataplane for NftablesDataplane {
    fn name(&self) -> &'static str {
        "nftables"
    }

    fn apply(&mut self, diff: &TableDiff) -> Result<ApplyStats, DataplaneError> {
        let mut stats = self.apply_diff(diff)?;
        stats.conntrack_deletes = netfilter::forget_stale_udp_flows(diff)?;
        Ok(stats)
    }

    fn reconcile(&mut self, desired: &ServiceTable) -> Result<ReconcileReport, DataplaneError> {
        Ok(ReconcileReport::of_repairs(self.reconcile_table(desired)?))
    }

    fn set_node_network(&mut self, network: &NodeNetwork) -> Result<(), DataplaneError> {
        Ok(self.set_network(network)?)
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::model::{
        FrontendChange,
        test_support::{backend, frontend, key},
    };
    use shard::table_of;

    pub(super) fn network() -> NodeNetwork {
        NodeNetwork {
            cluster_cidrs: vec![
                "10.1.0.0/16".parse().unwrap(),
                "fd00:1::/64".parse().unwrap(),
            ],
            nodeport_addresses: ["192.0.2.1".parse().unwrap()].into_iter().collect(),
            ..NodeNetwork::default()
        }
    }

    fn nft_out(args: &[&str]) -> String {
        let out = Command::new("nft").args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn partial_syncs_touch_only_the_changed_frontend_and_reconcile_repairs_drift() {
        crate::dataplane::in_private_netns(|| {
            let mut dp = NftablesDataplane::new();
            dp.set_network(&network()).unwrap();
            let a = key("10.96.0.1", 80);
            let b = key("10.96.0.2", 80);
            let mut table = ServiceTable::new();
            table.insert(a, frontend("ns", "a", &[backend("10.1.0.1", 80)]));
            table.insert(b, frontend("ns", "b", &[backend("10.1.0.2", 80)]));
            let stats = dp.reconcile_table(&table).unwrap();
            assert_eq!(
                stats.kernel_writes, 4,
                "2 elements and 2 chains were missing: {stats:?}"
            );
            let (ta, tb) = (table_of(&a), table_of(&b));
            let handles =
                |table: &str, chain: &str| nft_out(&["-a", "list", "chain", "inet", table, chain]);
            let b_before = handles(&tb, "svc-tcp-10.96.0.2-80");
            assert!(b_before.contains("dnat ip to 10.1.0.2:80"), "{b_before}");

            // One endpoint more for `a`: `b`'s rules keep their handles.
            let old = table.get(&a).unwrap().clone();
            let new = frontend(
                "ns",
                "a",
                &[backend("10.1.0.1", 80), backend("10.1.0.3", 80)],
            );
            let diff = TableDiff {
                changed: vec![FrontendChange {
                    key: a,
                    old,
                    new: new.clone(),
                }],
                ..TableDiff::default()
            };
            dp.apply_diff(&diff).unwrap();
            table.insert(a, new);
            assert_eq!(handles(&tb, "svc-tcp-10.96.0.2-80"), b_before);
            let a_rules = handles(&ta, "svc-tcp-10.96.0.1-80");
            assert!(
                a_rules.contains("numgen random mod 2") && a_rules.contains("10.1.0.3:80"),
                "{a_rules}"
            );
            let hairpin = nft_out(&["list", "set", "inet", &ta, "hairpin4"]);
            assert!(hairpin.contains("10.1.0.3 . 10.1.0.3"), "{hairpin}");

            // Someone deletes `b`'s element and chain, and adds a chain.
            let sh = |script: &str| {
                let out =
                    netfilter::run_with_input("nft", &["-f", "-"], script.as_bytes()).unwrap();
                assert!(
                    out.status.success(),
                    "{script}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            sh(&format!(
                "delete element inet {tb} services4 {{ 10.96.0.2 . tcp . 80 }}\n\
                 flush chain inet {tb} svc-tcp-10.96.0.2-80\n\
                 delete chain inet {tb} svc-tcp-10.96.0.2-80\n\
                 add chain inet {ta} svc-tcp-10.96.0.99-80\n\
                 add table inet {TABLE}\n"
            ));
            let stats = dp.reconcile_table(&table).unwrap();
            // The element and chain are missing; a chain and a table of an
            // earlier layout are extra.
            assert_eq!(
                (stats.kernel_writes, stats.kernel_deletes),
                (2, 2),
                "{stats:?}"
            );
            assert!(handles(&tb, "svc-tcp-10.96.0.2-80").contains("dnat ip to 10.1.0.2:80"));
            assert!(!nft_out(&["list", "tables"]).contains(&format!("inet {TABLE}\n")));
            let chains = nft_out(&["list", "chains", "inet"]);
            assert!(!chains.contains("10.96.0.99"), "{chains}");
            let map = nft_out(&["list", "map", "inet", &tb, "services4"]);
            assert!(
                map.contains("10.96.0.2 . tcp . 80 : goto svc-tcp-10.96.0.2-80"),
                "{map}"
            );
            // A reconcile of an unchanged kernel finds nothing to repair.
            let stats = dp.reconcile_table(&table).unwrap();
            assert_eq!(
                (stats.kernel_writes, stats.kernel_deletes),
                (0, 0),
                "{stats:?}"
            );

            // Removing everything leaves only the base objects; cleanup the table.
            dp.reconcile_table(&ServiceTable::new()).unwrap();
            let left = nft_out(&["list", "ruleset"]);
            assert!(!left.contains("svc-"), "{left}");
            assert_eq!(
                left.matches("table inet proxy-agent-").count(),
                SHARDS,
                "{left}"
            );
            assert!(cleanup().unwrap());
            assert!(!cleanup().unwrap(), "a second cleanup finds nothing");

            // kube-proxy's tables go with --cleanup-kube-proxy, nothing else.
            sh(
                "add table ip kube-proxy\nadd chain ip kube-proxy c\nadd table ip6 kube-proxy\nadd table ip other\n",
            );
            assert_eq!(cleanup_kube_proxy().unwrap(), 2);
            assert_eq!(cleanup_kube_proxy().unwrap(), 0);
            assert!(nft_out(&["list", "tables"]).contains("table ip other"));
        });
    }
}
