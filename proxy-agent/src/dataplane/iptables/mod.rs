//! The iptables dataplane: `iptables-restore` / `ip6tables-restore` input
//! in kube-proxy's chain layout, so that operators' habits (`iptables-save
//! | grep KUBE-SVC`, the comments, the masquerade bit) keep working. What
//! each frontend means is decided in [`super::netfilter`]; this module only
//! spells it in iptables.
//!
//! Layout, per family (`iptables` for IPv4, `ip6tables` for IPv6):
//! - nat `KUBE-SERVICES`, jumped to from `PREROUTING` and `OUTPUT`: one rule
//!   per frontend address (`-d vip -p proto --dport port`), to `KUBE-SVC-…`
//!   (ClusterIP), `KUBE-EXT-…` (externalIPs, LoadBalancer IPs) or
//!   `KUBE-FW-…` (LoadBalancer IPs with source ranges); last, one
//!   `-d <address> -j KUBE-NODEPORTS` per NodePort address of the node
//!   (never `--dst-type LOCAL`: loopback is served only when asked for,
//!   CVE-2020-8558).
//! - nat `KUBE-NODEPORTS`: `-p proto --dport nodePort -j KUBE-EXT-…`.
//! - `KUBE-FW-<hash>`: `-s <range> -j KUBE-EXT-…` per source range; other
//!   sources fall through untranslated and are dropped by the filter
//!   table's `KUBE-PROXY-FIREWALL`.
//! - `KUBE-EXT-<hash>`: the pods' short-circuit of a frontend whose policy
//!   is Local (`-s <cluster CIDR> -j KUBE-SVC-…`), the masquerade mark, then
//!   the endpoint choice of the frontend's own view (`KUBE-SVL-…` when the
//!   pods have a view of their own, as kube-proxy names local endpoints).
//! - `KUBE-SVC-<hash>` / `KUBE-SVL-<hash>`: the masquerade mark of a
//!   ClusterIP, the session affinity checks (`-m recent --rcheck`), then the
//!   `-m statistic --mode random --probability 1/(n-i)` cascade to the
//!   `KUBE-SEP-…` chains, the last one unconditional.
//! - `KUBE-SEP-<hash>`: one endpoint of one frontend: hairpin (`-s <ep> -j
//!   KUBE-MARK-MASQ`), then `-j DNAT` (with `-m recent --set` under
//!   affinity; the recent list is named like the chain).
//! - nat `KUBE-MARK-MASQ` sets the mark 0x4000, `KUBE-POSTROUTING` (from
//!   `POSTROUTING`) masquerades marked packets (`--random-fully`).
//!
//! The nat table cannot drop or reject. As in kube-proxy, a view that
//! rejects or drops is simply not translated, and the filter table catches
//! the packets still addressed to the frontend: `KUBE-SERVICES` (rejects of
//! ClusterIPs, externalIPs, LoadBalancer IPs; drops of ClusterIPs with the
//! Local internal policy), `KUBE-EXTERNAL-SERVICES` (rejects of NodePorts,
//! drops of external frontends without a local endpoint, for non-pods only
//! when the pods have a view) and `KUBE-PROXY-FIREWALL` (sources outside
//! the source ranges), each jumped to from `INPUT`, `FORWARD` and `OUTPUT`
//! for `--ctstate NEW`, the firewall first, so a source outside the ranges
//! is dropped before a reject, as the nftables mode orders it. (kube-proxy
//! hooks `KUBE-SERVICES` from FORWARD and OUTPUT only and
//! `KUBE-EXTERNAL-SERVICES` from INPUT and FORWARD; a VIP the node has a
//! local route for, or a node process reaching a NodePort, needs all three
//! for a drop to mean the same as in the nftables mode.)
//!
//! Chain names carry a hash of the frontend (and endpoint): 16 base32
//! characters of a 128-bit FNV-1a (see [`names::hash16`]), the same on
//! every run and version, since the kernel keeps the chains across
//! restarts of the agent; at most 25 characters, under iptables' limit of
//! 28.
//!
//! A sync writes, per family, `iptables-restore --noflush` input (nat and
//! filter together): the chains of the changed frontends (only those whose
//! rules changed), the deletions (`-X`) of the chains they no longer have,
//! and their rules in the top-level chains (`KUBE-SERVICES`,
//! `KUBE-NODEPORTS`, the filter chains), deleted by their text and
//! inserted at the top; a sync that deletes more than
//! [`TOP_LEVEL_DELETES`](restore::TOP_LEVEL_DELETES) of them rewrites the
//! top-level chains whole instead, as the full check and a change of the
//! node's network do. Through iptables-nft a restore's cost grows with the
//! square of the chains it names, so a write of more than
//! [`CHAINS_PER_RESTORE`](restore::CHAINS_PER_RESTORE) chains is split
//! (see [`restore`](mod@restore)): the new and changed chains first, a
//! frontend's together, in restores of at most that many (nothing jumps to
//! them yet), then one restore of the top-level chains, then the
//! deletions, rank by rank. The legacy backend replaces the whole table at
//! each commit, so there a write is one restore.
//!
//! The jumps from the built-in chains are checked when the base is first
//! written (against `iptables-save`) and by every reconcile, never by a
//! partial sync. The periodic reconcile lists only the built-in and
//! top-level chains ([`CHECKED_CHAINS`], with `iptables -S`; the legacy
//! backend saves the table, which costs it no more) and, when they hold
//! what was programmed, writes only the frontends that differ. The full
//! check runs at the first reconcile, once
//! [`FULL_REWRITE_PERIOD`](netfilter::FULL_REWRITE_PERIOD) (an hour) has
//! passed since the last one, and when those chains differ: it reads the
//! nat table with `iptables-save` (and the filter chains of ours with
//! `iptables -S`), counts the drift, rewrites every chain of ours and
//! deletes the per-frontend chains (by prefix, so kube-proxy's too) that no
//! frontend wants (flushing instead one that a chain not ours still jumps
//! to). `-w 5` waits for the xtables lock; nothing else is locked.
use std::collections::{BTreeMap, BTreeSet};

use super::{
    ApplyStats, NodeNetwork,
    netfilter::{self, Driver, Family, Planned, RuleBackend, Scope, commit},
};
use crate::model::FrontendKey;

mod backend;
mod cleanup;
pub mod held;
mod names;
mod render;
mod restore;
mod save;
#[cfg(test)]
mod test_support;

pub use backend::IptablesBackend;
use backend::{list_chains, restore, save};
pub use cleanup::{cleanup, cleanup_backends, cleanup_kube_proxy};
use names::{
    BUILT_IN, EXTERNAL_SERVICES_CHAIN, FIREWALL_CHAIN, FRONTEND_PREFIXES, MARK_MASQ_CHAIN,
    NODEPORTS_CHAIN, POSTROUTING_CHAIN, SERVICES_CHAIN, is_top_level,
};
pub use render::Rendered;
use render::{Programmed, rules_of};
use restore::{RestoreInput, TopLevel, Writer, base_input};
use save::Saved;

#[derive(Debug, thiserror::Error)]
pub enum IptablesError {
    #[error("running {binary}: {source}")]
    Spawn {
        binary: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{binary} refused the input{}: {stderr}", line_text(*.line, .text))]
    Refused {
        binary: &'static str,
        /// Its first lines of stderr, joined with " | ".
        stderr: String,
        /// The input line it reported, if it did.
        line: Option<usize>,
        /// That line of our input.
        text: Option<String>,
    },
    #[error("{binary} failed: {stderr}")]
    Save {
        binary: &'static str,
        stderr: String,
    },
}

fn line_text(line: Option<usize>, text: &Option<String>) -> String {
    match (line, text) {
        (Some(n), Some(t)) => format!(" at line {n} ({t:?})"),
        (Some(n), None) => format!(" at line {n}"),
        _ => String::new(),
    }
}

/// The chains a reconcile checks between full checks: the built-in ones our
/// jumps stand in, and ours that are not per frontend, by table.
const CHECKED_CHAINS: [(&str, &[&str]); 2] = [
    (
        "nat",
        &[
            "PREROUTING",
            "OUTPUT",
            "POSTROUTING",
            SERVICES_CHAIN,
            NODEPORTS_CHAIN,
            MARK_MASQ_CHAIN,
            POSTROUTING_CHAIN,
        ],
    ),
    (
        "filter",
        &[
            "INPUT",
            "FORWARD",
            "OUTPUT",
            SERVICES_CHAIN,
            EXTERNAL_SERVICES_CHAIN,
            FIREWALL_CHAIN,
        ],
    ),
];

/// What is programmed, per frontend.
type Shadow = netfilter::Shadow<Rendered>;

/// Programs services with iptables-restore, in kube-proxy's chains.
pub type IptablesDataplane = Driver<Iptables>;

impl Default for IptablesDataplane {
    fn default() -> Self {
        Self::new(IptablesBackend::default())
    }
}

impl IptablesDataplane {
    pub fn new(backend: IptablesBackend) -> Self {
        Driver::with_rules(Iptables { backend })
    }
}

/// The iptables mode's own part of [`IptablesDataplane`]: the backend it
/// writes through.
pub struct Iptables {
    pub(super) backend: IptablesBackend,
}

/// What a full check found, per family: the chains of ours nobody wants,
/// to delete and to flush ([`unwanted_chains`]).
pub struct Unwanted(Vec<(Family, BTreeSet<String>, BTreeSet<String>)>);

impl RuleBackend for Iptables {
    const NAME: &'static str = "iptables";
    type Rendered = Rendered;
    type Found = Unwanted;
    type Error = IptablesError;

    fn render(&self, planned: &Planned<'_>, network: &NodeNetwork) -> Rendered {
        let external = planned.frontend.kind.is_external();
        rules_of(
            planned.plan,
            planned.comment,
            external,
            &network.nodeport_addresses,
        )
    }

    fn ensure_base(&mut self, _network: &NodeNetwork) -> Result<(), IptablesError> {
        for family in [Family::V4, Family::V6] {
            let nat = save(self.backend, family, "nat", false)?;
            let filter = save(self.backend, family, "filter", false)?;
            let mut input = RestoreInput::default();
            base_input(&mut input, &nat, &filter, true);
            restore(self.backend, family, &input.text())?;
        }
        Ok(())
    }

    /// Writes `wanted` for `keys`, family by family; [`Scope::Everything`]
    /// rewrites the top-level chains of both families whole (also of a
    /// family without a key), else they are edited. What is programmed is
    /// updated per family once its restores all passed; on an error, the
    /// caller's next sync is a reconcile, which reads the kernel.
    fn write(
        &mut self,
        programmed: &mut Shadow,
        keys: &[FrontendKey],
        wanted: &Shadow,
        network: &NodeNetwork,
        scope: Scope,
    ) -> Result<(), IptablesError> {
        let none = BTreeSet::new();
        for family in [Family::V4, Family::V6] {
            let mine: Vec<FrontendKey> = keys
                .iter()
                .filter(|k| Family::of(k.ip) == family)
                .copied()
                .collect();
            let top = match scope {
                Scope::Changes if mine.is_empty() => continue,
                Scope::Changes => TopLevel::Edit,
                Scope::Everything => TopLevel::Rewrite,
            };
            let writer = Writer {
                backend: self.backend,
                programmed,
                network,
            };
            for input in writer.restores(family, &mine, wanted, top, &none, &none) {
                restore(self.backend, family, &input.text())?;
            }
            commit(programmed, &mine, wanted);
        }
        Ok(())
    }

    /// Within [`FULL_REWRITE_PERIOD`](netfilter::FULL_REWRITE_PERIOD) of
    /// the last full rewrite (not `due`), reads only the built-in and
    /// top-level chains ([`CHECKED_CHAINS`], with `iptables -S`); when they
    /// hold what was programmed, only the frontends that differ from it
    /// are written (usually none). Otherwise (first reconcile, hourly, or
    /// when those chains differ) it makes the full check: saves both
    /// tables ([`Iptables::check_family`]), counts what is missing or extra
    /// as drift (`kernel_writes`: a wanted chain missing or holding another
    /// number of rules, a missing jump; `kernel_deletes`: an unwanted chain
    /// of ours, an extra copy of a jump); every chain of ours is then
    /// rewritten (which also repairs rules edited by hand) and those nobody
    /// wants deleted.
    fn read_kernel(
        &mut self,
        programmed: &Shadow,
        wanted: &Shadow,
        network: &NodeNetwork,
        due: bool,
        stats: &mut ApplyStats,
    ) -> Result<Option<Unwanted>, IptablesError> {
        if !due {
            if !self.checked_chains_differ(programmed, network)? {
                return Ok(None);
            }
            tracing::info!(
                "the top-level iptables chains differ from what was programmed; checking every chain"
            );
        }
        let mut found = Vec::new();
        for family in [Family::V4, Family::V6] {
            let (delete, flush) = self.check_family(family, wanted, network, stats)?;
            found.push((family, delete, flush));
        }
        Ok(Some(Unwanted(found)))
    }

    /// Rewrites every wanted chain, family by family; chains the kernel
    /// holds are flushed in the restore that refills them.
    fn rewrite(
        &mut self,
        programmed: &mut Shadow,
        wanted: &Shadow,
        network: &NodeNetwork,
        Unwanted(found): Unwanted,
    ) -> Result<(), IptablesError> {
        for (family, delete, flush) in found {
            let keys: Vec<FrontendKey> = wanted
                .keys()
                .filter(|k| Family::of(k.ip) == family)
                .copied()
                .collect();
            let writer = Writer {
                backend: self.backend,
                programmed,
                network,
            };
            for input in writer.restores(family, &keys, wanted, TopLevel::Rewrite, &delete, &flush)
            {
                restore(self.backend, family, &input.text())?;
            }
            // What the first family holds is programmed even if the second
            // fails.
            commit(programmed, &keys, wanted);
        }
        Ok(())
    }

    /// Nothing of its own: the NodePort addresses stand in the top-level
    /// chains (the jumps to `KUBE-NODEPORTS`) and in NodePorts' filter
    /// rules, so a change of them writes every frontend again.
    fn write_node_network(
        &mut self,
        old: &NodeNetwork,
        network: &NodeNetwork,
    ) -> Result<bool, IptablesError> {
        Ok(old.nodeport_addresses != network.nodeport_addresses)
    }
}

impl Iptables {
    /// Whether the chains that hold the jumps and the top level
    /// ([`CHECKED_CHAINS`]) differ from what was programmed. Only they are
    /// read (a few milliseconds, where saving the whole nat table can take
    /// minutes); a frontend's own chains are checked by the full check.
    fn checked_chains_differ(
        &self,
        programmed: &Shadow,
        network: &NodeNetwork,
    ) -> Result<bool, IptablesError> {
        let mut drift = false;
        for family in [Family::V4, Family::V6] {
            let [(_, nat_chains), (_, filter_chains)] = CHECKED_CHAINS;
            let nat = list_chains(self.backend, family, "nat", nat_chains)?;
            let filter = list_chains(self.backend, family, "filter", filter_chains)?;
            let mut base = RestoreInput::default();
            base_input(&mut base, &nat, &filter, false);
            drift |= !base.is_empty()
                || top_drift(programmed.values(), network, family, &nat, &filter) > 0;
        }
        Ok(drift)
    }

    /// One family's part of the full check: reads its nat table and the
    /// filter chains of ours, writes the base, counts the drift against
    /// `wanted` into `stats`, and returns the unwanted chains of ours to
    /// delete and to flush ([`unwanted_chains`]).
    fn check_family(
        &self,
        family: Family,
        wanted: &Shadow,
        network: &NodeNetwork,
        stats: &mut ApplyStats,
    ) -> Result<(BTreeSet<String>, BTreeSet<String>), IptablesError> {
        let nat = save(self.backend, family, "nat", false)?;
        // Of filter, only the chains we write or jump from matter;
        // iptables-nft-save of filter reads every table (5 s at 10 000
        // services), listing them takes milliseconds.
        let [_, (_, filter_chains)] = CHECKED_CHAINS;
        let filter = list_chains(self.backend, family, "filter", filter_chains)?;
        let mut base = RestoreInput::default();
        let (w, d) = base_input(&mut base, &nat, &filter, true);
        stats.kernel_writes += w;
        stats.kernel_deletes += d;
        restore(self.backend, family, &base.text())?;
        let mut wanted_chains: BTreeSet<&str> = BTreeSet::new();
        for p in wanted.values().filter(|p| p.plan.family == family) {
            for (chain, rules) in &p.rendered.chains {
                if !nat.has(chain) || nat.rules(chain).len() != rules.len() {
                    stats.kernel_writes += 1;
                }
                wanted_chains.insert(chain);
            }
        }
        stats.kernel_writes += top_drift(wanted.values(), network, family, &nat, &filter);
        Ok(unwanted_chains(&nat, &wanted_chains, stats))
    }
}

/// How many top-level chains of `family` hold another number of rules in
/// `nat` and `filter` than `frontends` (all of them) give on `network`.
fn top_drift<'a>(
    frontends: impl Iterator<Item = &'a Programmed>,
    network: &NodeNetwork,
    family: Family,
    nat: &Saved,
    filter: &Saved,
) -> usize {
    let mut counts: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for p in frontends.filter(|p| p.plan.family == family) {
        for (at, rules) in &p.rendered.top {
            *counts.entry(*at).or_default() += rules.len();
        }
    }
    *counts.entry(("nat", SERVICES_CHAIN)).or_default() += network
        .nodeport_addresses
        .iter()
        .filter(|ip| Family::of(**ip) == family)
        .count();
    let mut drift = 0;
    for (table, chains) in CHECKED_CHAINS {
        let saved = if table == "nat" { nat } else { filter };
        for chain in chains.iter().filter(|c| !BUILT_IN.contains(*c)) {
            let want = match *chain {
                MARK_MASQ_CHAIN | POSTROUTING_CHAIN => continue,
                _ => counts.get(&(table, *chain)).copied().unwrap_or(0),
            };
            if !saved.has(chain) || saved.rules(chain).len() != want {
                drift += 1;
            }
        }
    }
    drift
}

/// The chains of ours in `nat` (by prefix) that no frontend wants
/// (`wanted_chains`), counted as drift in `stats`: those to delete, and
/// those to flush and keep. A chain of ours that a chain we do not rewrite
/// jumps to (an operator's rule) cannot be deleted: it is flushed and kept,
/// rather than failing every reconcile; once flushed, it is left alone
/// (and not counted again).
fn unwanted_chains(
    nat: &Saved,
    wanted_chains: &BTreeSet<&str>,
    stats: &mut ApplyStats,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let unwanted: BTreeSet<String> = nat
        .chains
        .keys()
        .filter(|c| {
            FRONTEND_PREFIXES.iter().any(|p| c.starts_with(p))
                && !wanted_chains.contains(c.as_str())
        })
        .cloned()
        .collect();
    let kept: BTreeSet<String> = nat
        .foreign_references(|c| {
            unwanted.contains(c) || wanted_chains.contains(c.as_str()) || is_top_level(c)
        })
        .into_iter()
        .map(str::to_string)
        .collect();
    let mut delete = BTreeSet::new();
    let mut flush = BTreeSet::new();
    for chain in unwanted {
        if !kept.contains(&chain) {
            stats.kernel_deletes += 1;
            delete.insert(chain);
        } else if !nat.rules(&chain).is_empty() {
            tracing::warn!(chain = %chain, "another chain jumps to this unwanted chain; flushing it, not deleting it");
            stats.kernel_deletes += 1;
            flush.insert(chain);
        }
    }
    (delete, flush)
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::{test_support::*, *};
    use crate::model::{
        FrontendKind, ServiceTable, TableDiff,
        test_support::{backend, key},
    };
    use restore::CHAINS_PER_RESTORE;

    /// `iptables-nft -t nat -S` of this namespace, our chains only.
    fn nat_rules() -> Vec<String> {
        let out = Command::new("iptables-nft")
            .args(["-t", "nat", "-S"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("KUBE-"))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn large_writes_and_reconciles_in_the_kernel_keep_the_table_whole() {
        crate::dataplane::in_private_netns(|| {
            if Command::new("iptables-nft").arg("-V").output().is_err() {
                eprintln!("skipped: no iptables-nft");
                return;
            }
            let mut dp = IptablesDataplane::new(IptablesBackend::Nft);
            dp.set_network(&network()).unwrap();
            // More chains than one restore holds: three per frontend.
            let n = CHAINS_PER_RESTORE / 3 + 10;
            let bs = [backend("198.18.1.10", 8080), backend("198.18.1.11", 8080)];
            let mut table = ServiceTable::new();
            for i in 0..n {
                let ip = format!("198.19.{}.{}", i / 200, i % 200 + 1);
                table.insert(key(&ip, 80), external(FrontendKind::ClusterIp, &bs));
            }
            dp.reconcile_table(&table).unwrap();
            let services = |rules: &[String]| {
                rules
                    .iter()
                    .filter(|r| r.starts_with("-A KUBE-SERVICES "))
                    .count()
            };
            let rules = nat_rules();
            // One entry per frontend and the NodePort jump.
            assert_eq!(services(&rules), n + 1);
            assert_eq!(
                rules
                    .iter()
                    .filter(|r| r.starts_with("-N KUBE-SEP-"))
                    .count(),
                2 * n
            );

            // Nothing changed: a reconcile writes nothing.
            let stats = dp.reconcile_table(&table).unwrap();
            assert_eq!(stats, ApplyStats::default());
            assert_eq!(nat_rules(), rules);

            // An entry deleted by hand is drift: the reconcile puts it back.
            let entry = rules
                .iter()
                .find(|r| r.starts_with("-A KUBE-SERVICES ") && r.contains("198.19.0.1/32"))
                .unwrap()
                .replacen("-A ", "-D ", 1);
            let args: Vec<&str> = ["-t", "nat"]
                .into_iter()
                .chain(shell_words(&entry))
                .collect();
            assert!(
                Command::new("iptables-nft")
                    .args(&args)
                    .status()
                    .unwrap()
                    .success()
            );
            let stats = dp.reconcile_table(&table).unwrap();
            assert!(stats.kernel_writes > 0, "{stats:?}");
            assert_eq!(services(&nat_rules()), n + 1);

            // Removing every frontend at once deletes their chains (in
            // restores ordered so that no chain is still jumped to).
            let diff = TableDiff {
                removed: table.iter_shared().map(|(k, f)| (*k, f.clone())).collect(),
                ..TableDiff::default()
            };
            dp.apply_diff(&diff).unwrap();
            let rules = nat_rules();
            assert_eq!(services(&rules), 1, "{:?}", &rules[..rules.len().min(5)]);
            assert!(
                !rules
                    .iter()
                    .any(|r| r.contains("KUBE-SEP-") || r.contains("KUBE-SVC-"))
            );
            assert!(cleanup().unwrap());
            assert_eq!(nat_rules(), Vec::<String>::new());
        });
    }

    /// Splits a rule as a shell would (words, double quotes).
    fn shell_words(line: &str) -> Vec<&str> {
        let mut out = Vec::new();
        let mut rest = line.trim();
        while !rest.is_empty() {
            if let Some(quoted) = rest.strip_prefix('"') {
                let end = quoted.find('"').unwrap();
                out.push(&quoted[..end]);
                rest = quoted[end + 1..].trim_start();
            } else {
                let end = rest.find(' ').unwrap_or(rest.len());
                out.push(&rest[..end]);
                rest = rest[end..].trim_start();
            }
        }
        out
    }
}
