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
use std::collections::{BTreeMap, HashSet};

use super::{
    ApplyStats, NodeNetwork,
    netfilter::{self, Driver, Planned, RuleBackend, Scope, commit},
};
use crate::model::FrontendKey;

mod base;
mod cleanup;
mod existing;
mod expr;
pub mod held;
mod render;
mod shard;
mod transaction;

use base::{base_objects, service_cidr_objects};
pub use cleanup::{cleanup, cleanup_kube_proxy};
use existing::Existing;
pub use render::Objects;
use render::objects;
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
type Programmed = netfilter::Programmed<Objects>;

/// What is programmed, per frontend.
type Shadow = netfilter::Shadow<Objects>;

/// Programs services into the tables `inet proxy-agent-0` to
/// `proxy-agent-<SHARDS - 1>`, each frontend into the table [`shard_of`]
/// its key. A transaction may span several tables: a change is as atomic
/// as with one table.
pub type NftablesDataplane = Driver<Nftables>;

impl Default for NftablesDataplane {
    fn default() -> Self {
        Self::new()
    }
}

impl NftablesDataplane {
    pub fn new() -> Self {
        Driver::with_rules(Nftables {
            shards: (0..SHARDS)
                .map(|n| Shard::new(format!("{TABLE}-{n}"), n == 0))
                .collect(),
        })
    }
}

/// The nftables mode's own part of [`NftablesDataplane`]: the shards.
pub struct Nftables {
    shards: Vec<Shard>,
}

/// What a reconcile read in the kernel: the tables named like ours, and the
/// transaction that deletes what they hold and nobody wants.
pub struct Found {
    existing: BTreeMap<String, Existing>,
    cleanup: Tx,
}

impl RuleBackend for Nftables {
    const NAME: &'static str = "nftables";
    type Rendered = Objects;
    type Found = Found;
    type Error = NftablesError;

    /// The chains and sets of the frontend; its rules are rendered when
    /// they are written.
    fn render(&self, planned: &Planned<'_>, _network: &NodeNetwork) -> Objects {
        objects(planned.plan)
    }

    /// Creates every shard's table and base objects (an `add` of what
    /// exists changes nothing; base chains are flushed and written again),
    /// in one transaction.
    fn ensure_base(&mut self, network: &NodeNetwork) -> Result<(), NftablesError> {
        let mut tx = Tx::new("");
        for shard in &self.shards {
            let mut part = Tx::new(&shard.table);
            base_objects(&mut part);
            if shard.first {
                service_cidr_objects(&mut part);
            }
            part.append(shard.node_network_objects(network));
            tx.append(part);
        }
        run(tx)
    }

    fn write(
        &mut self,
        programmed: &mut Shadow,
        keys: &[FrontendKey],
        wanted: &Shadow,
        _network: &NodeNetwork,
        _scope: Scope,
    ) -> Result<(), NftablesError> {
        self.write_frontends(programmed, keys, wanted, None)
    }

    /// Reads the tables' chains, sets and map elements and counts what is
    /// missing or extra, tables named like ours that no shard is (an
    /// earlier layout) included. When nothing is and a rewrite is not
    /// `due`, only the frontends that differ are written (a periodic sync
    /// at 10 000 services then costs a listing, not a rewrite); otherwise
    /// every frontend chain is rewritten, which also repairs rules edited
    /// by hand.
    fn read_kernel(
        &mut self,
        _programmed: &Shadow,
        wanted: &Shadow,
        network: &NodeNetwork,
        due: bool,
        stats: &mut ApplyStats,
    ) -> Result<Option<Found>, NftablesError> {
        let mut existing = Existing::read_all()?;
        self.ensure_base(network)?;
        let before = stats.kernel_writes + stats.kernel_deletes;
        let cleanup = self.drift_cleanup(&mut existing, wanted, stats);
        let drift = stats.kernel_writes + stats.kernel_deletes > before;
        Ok((due || drift).then_some(Found { existing, cleanup }))
    }

    /// Rewrites every wanted frontend, then removes what is not wanted:
    /// chains the kernel holds are flushed in the same transaction as
    /// their new rules, and a chain or set nobody wants goes only once no
    /// rewritten rule refers to it (nft refuses to delete one in use).
    fn rewrite(
        &mut self,
        programmed: &mut Shadow,
        wanted: &Shadow,
        _network: &NodeNetwork,
        Found { existing, cleanup }: Found,
    ) -> Result<(), NftablesError> {
        for shard in &mut self.shards {
            shard.hairpin.clear();
            shard.cluster_ips.clear();
        }
        let keys: Vec<FrontendKey> = wanted.keys().copied().collect();
        self.write_frontends(programmed, &keys, wanted, Some(&existing))?;
        run(cleanup)
    }

    /// The sets of NodePort addresses; no frontend's rules name them.
    fn write_node_network(
        &mut self,
        _old: &NodeNetwork,
        network: &NodeNetwork,
    ) -> Result<bool, NftablesError> {
        let mut tx = Tx::new("");
        for shard in &self.shards {
            tx.append(shard.node_network_objects(network));
        }
        run(tx)?;
        Ok(false)
    }
}

impl Nftables {
    /// Writes `wanted` in place of what is programmed for `keys`, in
    /// transactions of [`FRONTENDS_PER_TRANSACTION`] frontends that span
    /// the shards. On error the transactions before the failed one stay.
    /// `existing`: what the kernel holds, per table (a reconcile's
    /// rewrite).
    fn write_frontends(
        &mut self,
        programmed: &mut Shadow,
        keys: &[FrontendKey],
        wanted: &Shadow,
        existing: Option<&BTreeMap<String, Existing>>,
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
                let known = existing.and_then(|e| e.get(&shard.table));
                let (part, hairpin, cluster_ips) = shard.prepare(programmed, &keys, wanted, known);
                tx.append(part);
                staged.push(Staged {
                    shard: n,
                    keys,
                    hairpin,
                    cluster_ips,
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
                cluster_ips,
            } in staged
            {
                self.shards[shard].hairpin = hairpin;
                self.shards[shard].cluster_ips = cluster_ips;
                commit(programmed, &keys, wanted);
            }
        }
        Ok(())
    }

    /// The transaction that deletes what `existing` holds and `wanted`
    /// lacks, the drift counted into `stats`: per shard, elements, chains
    /// and sets nobody wants ([`Shard::cleanup_objects`]), and the tables
    /// named like ours that no shard is (an earlier layout), which are
    /// dropped from `existing`.
    fn drift_cleanup(
        &self,
        existing: &mut BTreeMap<String, Existing>,
        wanted: &Shadow,
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
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::model::{
        FrontendChange, ServiceTable, TableDiff,
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

    /// A restarted agent rewrites every frontend over the table an earlier
    /// run left: affinity sets the kernel holds (which nft lists as
    /// `dynamic` too) are kept, not added again, and a set no frontend
    /// wants any more goes after the rules that used it.
    #[test]
    fn a_rewrite_over_an_earlier_runs_table_keeps_and_drops_affinity_sets() {
        crate::dataplane::in_private_netns(|| {
            let a = key("10.96.0.1", 80);
            let sticky = |backends: &[crate::model::Backend]| {
                let mut f = frontend("ns", "a", backends);
                f.policy.affinity_timeout_secs = Some(30);
                f
            };
            let two = [backend("10.1.0.1", 80), backend("10.1.0.2", 80)];
            let mut table = ServiceTable::new();
            table.insert(a, sticky(&two));
            let mut first = NftablesDataplane::new();
            first.set_network(&network()).unwrap();
            first.reconcile_table(&table).unwrap();
            // A second run over the same table, then over one backend less.
            let mut second = NftablesDataplane::new();
            second.set_network(&network()).unwrap();
            second.reconcile_table(&table).unwrap();
            table.insert(a, sticky(&two[..1]));
            let mut third = NftablesDataplane::new();
            third.set_network(&network()).unwrap();
            third.reconcile_table(&table).unwrap();
            let sets = nft_out(&["list", "sets", "inet"]);
            assert!(sets.contains("10.1.0.1-80"), "{sets}");
            assert!(!sets.contains("10.1.0.2-80"), "{sets}");
            assert!(cleanup().unwrap());
        });
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
                    old: old.into(),
                    new: new.clone().into(),
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
