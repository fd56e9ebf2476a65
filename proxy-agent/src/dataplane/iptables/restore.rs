//! `iptables-restore` input: the lines of a restore, the base (the chains
//! that hold no frontend and the jumps from the built-in chains), and how a
//! write is assembled and split into restores.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
};

use super::{
    IptablesBackend, Shadow,
    names::{
        EXTERNAL_SERVICES_CHAIN, FIREWALL_CHAIN, MARK_MASQ_CHAIN, NODEPORTS_CHAIN,
        POSTROUTING_CHAIN, SERVICES_CHAIN,
    },
    render::{Programmed, TopRules, host},
    save::{Saved, target_of},
};
use crate::{
    dataplane::{
        NodeNetwork,
        netfilter::{Family, MASQUERADE_MARK},
    },
    model::FrontendKey,
};

/// The lines of one table of a restore: declarations (which create or
/// flush), rules, then deletions of chains.
#[derive(Debug, Default)]
pub(super) struct TableInput {
    pub(super) declare: BTreeSet<String>,
    pub(super) rules: Vec<String>,
    delete: BTreeSet<String>,
}

impl TableInput {
    pub(super) fn is_empty(&self) -> bool {
        self.declare.is_empty() && self.rules.is_empty() && self.delete.is_empty()
    }

    /// Declares `chain` and appends its rules.
    pub(super) fn chain(&mut self, chain: &str, rules: &[String]) {
        self.declare.insert(chain.to_string());
        for r in rules {
            self.rules.push(format!("-A {chain} {r}"));
        }
    }

    /// Flushes and deletes `chain`.
    pub(super) fn remove(&mut self, chain: &str) {
        self.declare.insert(chain.to_string());
        self.delete.insert(chain.to_string());
    }

    pub(super) fn write(&self, table: &str, out: &mut String) {
        if self.is_empty() {
            return;
        }
        let _ = writeln!(out, "*{table}");
        for chain in &self.declare {
            let _ = writeln!(out, ":{chain} - [0:0]");
        }
        for rule in &self.rules {
            let _ = writeln!(out, "{rule}");
        }
        for chain in &self.delete {
            let _ = writeln!(out, "-X {chain}");
        }
        let _ = writeln!(out, "COMMIT");
    }
}

/// One family's restore: nat then filter.
#[derive(Debug, Default)]
pub(super) struct RestoreInput {
    pub(super) nat: TableInput,
    pub(super) filter: TableInput,
}

impl RestoreInput {
    fn table(&mut self, table: &str) -> &mut TableInput {
        match table {
            "nat" => &mut self.nat,
            _ => &mut self.filter,
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.nat.is_empty() && self.filter.is_empty()
    }

    pub(super) fn text(&self) -> String {
        let mut out = String::new();
        self.nat.write("nat", &mut out);
        self.filter.write("filter", &mut out);
        out
    }
}

// ---------------------------------------------------------------------------
// The base.

/// A jump from a built-in chain to one of ours.
struct Hook {
    table: &'static str,
    from: &'static str,
    spec: &'static str,
    to: &'static str,
}

/// The jumps, in the order they stand at the top of their built-in chains.
const HOOKS: [Hook; 12] = [
    Hook {
        table: "nat",
        from: "PREROUTING",
        spec: "-m comment --comment \"kubernetes service portals\"",
        to: SERVICES_CHAIN,
    },
    Hook {
        table: "nat",
        from: "OUTPUT",
        spec: "-m comment --comment \"kubernetes service portals\"",
        to: SERVICES_CHAIN,
    },
    Hook {
        table: "nat",
        from: "POSTROUTING",
        spec: "-m comment --comment \"kubernetes postrouting rules\"",
        to: POSTROUTING_CHAIN,
    },
    Hook {
        table: "filter",
        from: "INPUT",
        spec: "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\"",
        to: FIREWALL_CHAIN,
    },
    Hook {
        table: "filter",
        from: "INPUT",
        spec: "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\"",
        to: SERVICES_CHAIN,
    },
    Hook {
        table: "filter",
        from: "INPUT",
        spec: "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\"",
        to: EXTERNAL_SERVICES_CHAIN,
    },
    Hook {
        table: "filter",
        from: "FORWARD",
        spec: "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\"",
        to: FIREWALL_CHAIN,
    },
    Hook {
        table: "filter",
        from: "FORWARD",
        spec: "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\"",
        to: SERVICES_CHAIN,
    },
    Hook {
        table: "filter",
        from: "FORWARD",
        spec: "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\"",
        to: EXTERNAL_SERVICES_CHAIN,
    },
    Hook {
        table: "filter",
        from: "OUTPUT",
        spec: "-m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\"",
        to: FIREWALL_CHAIN,
    },
    Hook {
        table: "filter",
        from: "OUTPUT",
        spec: "-m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\"",
        to: SERVICES_CHAIN,
    },
    Hook {
        table: "filter",
        from: "OUTPUT",
        spec: "-m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\"",
        to: EXTERNAL_SERVICES_CHAIN,
    },
];

/// The rules of the base chains that hold no frontend.
fn base_chain_rules() -> [(&'static str, Vec<String>); 2] {
    let mark = format!("{MASQUERADE_MARK:#x}");
    [
        (MARK_MASQ_CHAIN, vec![format!("-j MARK --or-mark {mark}")]),
        (
            POSTROUTING_CHAIN,
            vec![
                format!("-m mark ! --mark {mark}/{mark} -j RETURN"),
                format!("-j MARK --xor-mark {mark}"),
                format!(
                    "-m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully"
                ),
            ],
        ),
    ]
}

/// Adds what the base needs against what `nat` and `filter` hold: the base
/// chains (rewritten when `force`, or when missing or holding another
/// number of rules), the top-level chains when missing (created empty), and
/// the missing jumps of the built-in chains (extra copies deleted). Returns
/// (writes, deletes) done to repair drift.
pub(super) fn base_input(
    input: &mut RestoreInput,
    nat: &Saved,
    filter: &Saved,
    force: bool,
) -> (usize, usize) {
    let (mut writes, mut deletes) = (0, 0);
    for (chain, rules) in base_chain_rules() {
        let differs = !nat.has(chain) || nat.rules(chain).len() != rules.len();
        if differs && nat.has(chain) {
            writes += 1;
        }
        if differs || force {
            input.nat.chain(chain, &rules);
        }
    }
    for chain in [SERVICES_CHAIN, NODEPORTS_CHAIN] {
        if !nat.has(chain) {
            input.nat.declare.insert(chain.to_string());
        }
    }
    for chain in [SERVICES_CHAIN, EXTERNAL_SERVICES_CHAIN, FIREWALL_CHAIN] {
        if !filter.has(chain) {
            input.filter.declare.insert(chain.to_string());
        }
    }
    // Jumps: inserted at the top in reverse, so they end up in HOOKS' order.
    let mut inserts: Vec<(&'static str, String)> = Vec::new();
    let mut removals: Vec<(&'static str, String)> = Vec::new();
    let mut seen: BTreeSet<(&str, &str, &str)> = BTreeSet::new();
    for hook in &HOOKS {
        if !seen.insert((hook.table, hook.from, hook.to)) {
            continue;
        }
        let saved = if hook.table == "nat" { nat } else { filter };
        let present: Vec<&String> = saved
            .rules(hook.from)
            .iter()
            .filter(|r| target_of(r) == Some(hook.to))
            .collect();
        if present.is_empty() {
            inserts.push((
                hook.table,
                format!("-I {} 1 {} -j {}", hook.from, hook.spec, hook.to),
            ));
            writes += 1;
        }
        for extra in present.iter().skip(1) {
            removals.push((hook.table, format!("-D {} {extra}", hook.from)));
            deletes += 1;
        }
    }
    for (table, line) in removals.into_iter().chain(inserts.into_iter().rev()) {
        input.table(table).rules.push(line);
    }
    (writes, deletes)
}

// ---------------------------------------------------------------------------
// Splitting a write into restores.

/// Most chains one restore declares (writes, flushes or deletes).
/// iptables-nft keeps the names of the chains a restore touches in a sorted
/// list, inserted one at a time, so a restore's cost grows with the square
/// of its chains: at 33 000 chains (3 000 services with 10 endpoints) it
/// spent 20 s there, against 5 s for the rules themselves.
pub(super) const CHAINS_PER_RESTORE: usize = 2_000;

/// Most top-level rules one restore deletes one by one (`-D`, a search
/// through the chain each); a write that removes more rewrites the
/// top-level chains whole.
pub(super) const TOP_LEVEL_DELETES: usize = 50;

/// How a write treats the top-level chains (`KUBE-SERVICES`,
/// `KUBE-NODEPORTS` and the filter chains).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum TopLevel {
    /// Delete the rules of the frontends whose rules change and insert
    /// their new ones at the top: a sync at 10 000 services then does not
    /// rewrite 10 000 rules for one change.
    Edit,
    /// Rewrite them whole (first sync, reconcile after drift, new node
    /// addresses).
    Rewrite,
}

/// The order in which chains can be deleted: a chain only jumps to chains
/// of a later rank, so deleting rank by rank, each restore flushing what it
/// deletes, never deletes a chain that a chain not yet deleted still jumps
/// to.
pub(super) fn deletion_rank(chain: &str) -> u8 {
    if chain == NODEPORTS_CHAIN {
        1
    } else if chain.starts_with("KUBE-FW-") {
        2
    } else if chain.starts_with("KUBE-XLB-") || chain.starts_with("KUBE-EXT-") {
        3
    } else if chain.starts_with("KUBE-SVC-") || chain.starts_with("KUBE-SVL-") {
        4
    } else if chain.starts_with("KUBE-SEP-") {
        5
    } else if chain == MARK_MASQ_CHAIN {
        6
    } else {
        0
    }
}

/// `chains` sorted by [`deletion_rank`], in groups of at most `limit`.
pub(super) fn deletion_chunks<'a>(
    chains: impl IntoIterator<Item = &'a String>,
    limit: usize,
) -> Vec<Vec<&'a String>> {
    let mut sorted: Vec<&String> = chains.into_iter().collect();
    sorted.sort_by_key(|c| (deletion_rank(c), c.as_str()));
    sorted.dedup();
    sorted
        .chunks(limit.max(1))
        .map(<[&String]>::to_vec)
        .collect()
}

/// What a write changes in one family, frontend by frontend.
#[derive(Default)]
struct Changes<'a> {
    /// The new or changed chains and their rules, a frontend's together.
    groups: Vec<Vec<(&'a str, &'a [String])>>,
    /// The chains to delete.
    gone: BTreeSet<&'a String>,
    /// Rules of the top-level chains to delete: (table, chain, rule).
    deletes: Vec<(&'static str, &'static str, &'a String)>,
    /// Rules of the top-level chains to insert: (table, chain, rules).
    inserts: Vec<(&'static str, &'static str, &'a [String])>,
}

impl<'a> Changes<'a> {
    /// Adds what turns `old` into `new` (either missing: added, removed).
    fn frontend(&mut self, old: Option<&'a Programmed>, new: Option<&'a Programmed>) {
        let mut group = Vec::new();
        if let Some(new) = new {
            for (chain, rules) in &new.rendered.chains {
                if old.and_then(|o| o.rendered.chains.get(chain)) != Some(rules) {
                    group.push((chain.as_str(), rules.as_slice()));
                }
            }
        }
        if !group.is_empty() {
            self.groups.push(group);
        }
        if let Some(old) = old {
            self.gone.extend(
                old.rendered
                    .chains
                    .keys()
                    .filter(|c| new.is_none_or(|n| !n.rendered.chains.contains_key(*c))),
            );
        }
        let places: BTreeSet<&(&str, &str)> = old
            .into_iter()
            .chain(new)
            .flat_map(|p| p.rendered.top.keys())
            .collect();
        for at in places {
            let top_of = |p: Option<&'a Programmed>| p.and_then(|p| p.rendered.top.get(at));
            let (before, after) = (top_of(old), top_of(new));
            if before == after {
                continue;
            }
            for rule in before.into_iter().flatten() {
                self.deletes.push((at.0, at.1, rule));
            }
            if let Some(rules) = after {
                self.inserts.push((at.0, at.1, rules));
            }
        }
    }

    /// How many chains the write declares, besides flushed ones.
    fn chains(&self) -> usize {
        self.groups.iter().map(Vec::len).sum::<usize>() + self.gone.len()
    }

    /// The edits of the top-level chains: deletions by text, then
    /// insertions at the top, in reverse, so a frontend's rules keep their
    /// order (and KUBE-SERVICES' NodePort jump stays last).
    fn edit(&self, input: &mut RestoreInput) {
        for (table, chain, rule) in &self.deletes {
            input.table(table).rules.push(format!("-D {chain} {rule}"));
        }
        for (table, chain, rules) in &self.inserts {
            for rule in rules.iter().rev() {
                input
                    .table(table)
                    .rules
                    .push(format!("-I {chain} 1 {rule}"));
            }
        }
    }

    /// The whole write in one restore, the top-level chains as `top_input`
    /// writes them (none when there is nothing to write).
    fn one_restore(&self, top_input: impl Fn(&mut RestoreInput)) -> Vec<RestoreInput> {
        let mut input = RestoreInput::default();
        for (chain, rules) in self.groups.iter().flatten() {
            input.nat.chain(chain, rules);
        }
        top_input(&mut input);
        for chain in &self.gone {
            input.nat.remove(chain);
        }
        if input.is_empty() {
            Vec::new()
        } else {
            vec![input]
        }
    }

    /// The write split into restores of at most `limit` chains: the
    /// changed chains, a frontend's together; then one restore of the
    /// top-level chains as `top_input` writes them; then the deletions by
    /// [`deletion_rank`].
    fn split(&self, limit: usize, top_input: impl Fn(&mut RestoreInput)) -> Vec<RestoreInput> {
        let mut out = Vec::new();
        let mut input = RestoreInput::default();
        let mut declared = 0;
        for group in &self.groups {
            if declared + group.len() > limit && declared > 0 {
                out.push(std::mem::take(&mut input));
                declared = 0;
            }
            for (chain, rules) in group {
                input.nat.chain(chain, rules);
            }
            declared += group.len();
        }
        if declared > 0 {
            out.push(input);
        }
        let mut input = RestoreInput::default();
        top_input(&mut input);
        if !input.is_empty() {
            out.push(input);
        }
        for chunk in deletion_chunks(self.gone.iter().copied(), limit) {
            let mut input = RestoreInput::default();
            for chain in chunk {
                input.nat.remove(chain);
            }
            out.push(input);
        }
        out
    }
}

/// The top-level chains of `family`, whole, from `frontends` (all of them,
/// in the order their rules are to stand).
fn top_level<'a>(
    frontends: impl Iterator<Item = &'a Programmed>,
    network: &NodeNetwork,
    family: Family,
    input: &mut RestoreInput,
) {
    let mut chains: TopRules = TopRules::new();
    for p in frontends.filter(|p| p.plan.family == family) {
        for (at, rules) in &p.rendered.top {
            chains.entry(*at).or_default().extend(rules.iter().cloned());
        }
    }
    let services = chains.entry(("nat", SERVICES_CHAIN)).or_default();
    for ip in network
        .nodeport_addresses
        .iter()
        .filter(|ip| Family::of(**ip) == family)
    {
        services.push(format!(
            "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -d {} -j {NODEPORTS_CHAIN}",
            host(*ip)
        ));
    }
    for at in [
        ("nat", SERVICES_CHAIN),
        ("nat", NODEPORTS_CHAIN),
        ("filter", SERVICES_CHAIN),
        ("filter", EXTERNAL_SERVICES_CHAIN),
        ("filter", FIREWALL_CHAIN),
    ] {
        let rules = chains.get(&at).map_or(&[][..], Vec::as_slice);
        input.table(at.0).chain(at.1, rules);
    }
}

/// What a write starts from: the backend it goes through, what is
/// programmed, and the node's network.
pub(super) struct Writer<'a> {
    pub(super) backend: IptablesBackend,
    pub(super) programmed: &'a Shadow,
    pub(super) network: &'a NodeNetwork,
}

impl Writer<'_> {
    /// The restores of `family`, in order, that turn what is programmed for
    /// `keys` into `wanted` (a key missing from `wanted` is removed), also
    /// deleting `unwanted` chains and flushing `flushed` ones (nat; found by
    /// a reconcile).
    ///
    /// A small write is one restore: the changed chains, the top-level
    /// edits, the deletions. A large one (more than the backend's
    /// [`CHAINS_PER_RESTORE`] chains) is split: first the changed chains, a
    /// frontend's together, in restores of at most that many chains (a new
    /// chain is not jumped to yet, so nothing sees it and the kernel does
    /// not validate it at each commit); then one restore of the top-level
    /// chains, which makes them reachable; then the deletions, by
    /// [`deletion_rank`].
    pub(super) fn restores(
        &self,
        family: Family,
        keys: &[FrontendKey],
        wanted: &Shadow,
        top: TopLevel,
        unwanted: &BTreeSet<String>,
        flushed: &BTreeSet<String>,
    ) -> Vec<RestoreInput> {
        let touched: BTreeSet<&FrontendKey> =
            keys.iter().filter(|k| Family::of(k.ip) == family).collect();
        let mut changes = Changes {
            gone: unwanted.iter().collect(),
            ..Changes::default()
        };
        for key in &touched {
            changes.frontend(self.programmed.get(key), wanted.get(key));
        }
        let edits = top == TopLevel::Edit && changes.deletes.len() <= TOP_LEVEL_DELETES;
        // The top-level chains (edited or whole), and the kept chains
        // flushed with them.
        let top_input = |input: &mut RestoreInput| {
            if edits {
                changes.edit(input);
            } else {
                self.top_level_after(family, &touched, wanted, input);
            }
            input.nat.declare.extend(flushed.iter().cloned());
        };
        let limit = self.backend.chains_per_restore();
        if changes.chains() + flushed.len() <= limit {
            changes.one_restore(top_input)
        } else {
            changes.split(limit, top_input)
        }
    }

    /// The top-level chains of `family`, whole, as they stand once `wanted`
    /// is written for `touched`: what is programmed after the write, in key
    /// order (so the top-level chains keep theirs from one rewrite to the
    /// next).
    fn top_level_after(
        &self,
        family: Family,
        touched: &BTreeSet<&FrontendKey>,
        wanted: &Shadow,
        input: &mut RestoreInput,
    ) {
        let mut after: BTreeMap<&FrontendKey, &Programmed> = self
            .programmed
            .iter()
            .filter(|(k, _)| Family::of(k.ip) == family && !touched.contains(k))
            .collect();
        after.extend(touched.iter().filter_map(|k| Some((*k, wanted.get(*k)?))));
        top_level(after.into_values(), self.network, family, input);
    }
}

#[cfg(test)]
mod tests {
    use super::{super::test_support::*, *};
    use crate::{
        dataplane::iptables::{
            IptablesBackend,
            names::{sep_chain, svc_chain},
        },
        model::{
            Frontend, FrontendChange, FrontendKind, TableDiff,
            test_support::{backend, key},
        },
    };

    #[test]
    fn base_input_adds_missing_jumps_in_order_and_removes_extra_copies() {
        let nat = Saved::parse(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n\
             -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A PREROUTING -j KUBE-SERVICES\nCOMMIT\n",
        );
        let mut input = RestoreInput::default();
        let (writes, deletes) = base_input(&mut input, &nat, &Saved::default(), false);
        // OUTPUT and POSTROUTING in nat, 9 in filter; one copy too many.
        assert_eq!((writes, deletes), (11, 1));
        let text = input.text();
        assert!(text.contains("-D PREROUTING -j KUBE-SERVICES\n"), "{text}");
        assert!(
            !text.contains(":KUBE-SERVICES - [0:0]\n-A"),
            "an existing KUBE-SERVICES is not flushed: {text}"
        );
        let filter: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-I INPUT 1"))
            .collect();
        assert_eq!(filter.len(), 3);
        assert!(
            filter[0].ends_with("-j KUBE-EXTERNAL-SERVICES")
                && filter[2].ends_with("-j KUBE-PROXY-FIREWALL")
        );
        assert!(text.contains("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n"));
        assert!(text.contains("-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n"));
        assert!(text.contains("-j MASQUERADE --random-fully\n"));
    }

    #[test]
    fn a_partial_restore_holds_only_the_changed_chains_and_edits_of_the_top_level() {
        let mut dp = dataplane();
        let a = key("198.19.0.10", 80);
        let b = key("198.19.0.11", 80);
        let a0 = [backend("198.18.1.10", 8080), backend("198.18.1.11", 8080)];
        let b0 = [backend("198.18.1.12", 8080)];
        for (k, bs) in [(a, &a0[..]), (b, &b0[..])] {
            let p = dp.program(&k, &external(FrontendKind::ClusterIp, bs));
            dp.programmed.insert(k, p);
        }
        // a loses an endpoint: its entry in KUBE-SERVICES stays as it is.
        let diff = TableDiff {
            changed: vec![FrontendChange {
                key: a,
                old: external(FrontendKind::ClusterIp, &a0).into(),
                new: external(FrontendKind::ClusterIp, &a0[..1]).into(),
            }],
            ..TableDiff::default()
        };
        let texts = restores_of(&dp, &diff, Family::V4, TopLevel::Edit);
        assert_eq!(texts.len(), 1, "one restore: {texts:?}");
        let text = &texts[0];
        let gone = sep_chain(&a, &a0[1]);
        assert_eq!(
            declared(text),
            [svc_chain(&a).as_str(), &gone].into_iter().collect(),
            "only a's changed chain and the chain it deletes: {text}"
        );
        assert!(!text.contains("KUBE-SERVICES"), "{text}");
        assert!(text.contains(&format!("-X {gone}\nCOMMIT\n")), "{text}");
        // Removing b deletes its entry by its text, then its chains.
        let entry = dp.programmed[&b].rendered.top[&("nat", SERVICES_CHAIN)][0].clone();
        let diff = TableDiff {
            removed: vec![(b, external(FrontendKind::ClusterIp, &b0).into())],
            ..TableDiff::default()
        };
        let texts = restores_of(&dp, &diff, Family::V4, TopLevel::Edit);
        let text = &texts[0];
        assert!(
            text.contains(&format!("-D KUBE-SERVICES {entry}\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("-X {}\n", svc_chain(&b)))
                && text.contains(&format!("-X {}\n", sep_chain(&b, &b0[0])))
        );
        // A new ClusterIP is inserted at the top, before the NodePort jump.
        let c = key("198.19.0.12", 80);
        let texts = restores_of(
            &dp,
            &added(&[(c, external(FrontendKind::ClusterIp, &b0))]),
            Family::V4,
            TopLevel::Edit,
        );
        assert!(
            texts[0].contains(&format!(
                "-I KUBE-SERVICES 1 {C} -d 198.19.0.12/32 -p tcp -m tcp --dport 80 -j {}\n",
                svc_chain(&c)
            )),
            "{}",
            texts[0]
        );
        // Rewritten whole, KUBE-SERVICES holds every entry and the NodePort
        // jump last.
        let text = restore_text(&dp, &diff, Family::V4);
        let services = rules(&text, "nat", SERVICES_CHAIN);
        assert_eq!(services.len(), 2, "{text}");
        assert!(services[1].ends_with("-j KUBE-NODEPORTS"));
    }

    #[test]
    fn a_large_write_creates_chains_in_chunks_then_enters_them_then_deletes_by_rank() {
        let mut dp = dataplane();
        // Enough frontends that their chains (a KUBE-SVC and two KUBE-SEP
        // each) exceed one restore.
        let n = CHAINS_PER_RESTORE / 3 + 10;
        let bs = [backend("198.18.1.10", 8080), backend("198.18.1.11", 8080)];
        let frontends: Vec<(FrontendKey, Frontend)> = (0..n)
            .map(|i| {
                let ip = format!("198.19.{}.{}", i / 200, i % 200 + 1);
                (key(&ip, 80), external(FrontendKind::ClusterIp, &bs))
            })
            .collect();
        let texts = restores_of(&dp, &added(&frontends), Family::V4, TopLevel::Edit);
        // Two of chains (no top-level chain in them), then the top level.
        assert_eq!(texts.len(), 3);
        for text in &texts[..2] {
            assert!(declared(text).len() <= CHAINS_PER_RESTORE);
            assert!(!text.contains("KUBE-SERVICES"));
            // A frontend's chains stay together: every SEP a SVC jumps to
            // is declared in the same restore.
            let targets = text
                .lines()
                .filter_map(|l| l.strip_prefix("-A KUBE-SVC-"))
                .filter_map(target_of)
                .filter(|t| t.starts_with("KUBE-SEP-"));
            for target in targets {
                assert!(declared(text).contains(target), "{target}");
            }
        }
        let top = &texts[2];
        assert_eq!(declared(top), BTreeSet::new(), "{top}");
        assert_eq!(
            top.lines()
                .filter(|l| l.starts_with("-I KUBE-SERVICES 1 "))
                .count(),
            n
        );
        // Remove them all: KUBE-SERVICES is rewritten whole (more deletes
        // than TOP_LEVEL_DELETES), then the chains go, SVCs before SEPs.
        for (k, f) in &frontends {
            let p = dp.program(k, f);
            dp.programmed.insert(*k, p);
        }
        let diff = TableDiff {
            removed: frontends
                .iter()
                .map(|(k, f)| (*k, f.clone().into()))
                .collect(),
            ..TableDiff::default()
        };
        let texts = restores_of(&dp, &diff, Family::V4, TopLevel::Edit);
        assert!(texts[0].contains(":KUBE-SERVICES - [0:0]"), "{}", texts[0]);
        assert_eq!(
            rules(&texts[0], "nat", SERVICES_CHAIN).len(),
            1,
            "the NodePort jump"
        );
        // Per restore, the ranks of what it deletes: no restore deletes a
        // chain of a lower rank than one an earlier restore deleted.
        let ranks: Vec<(u8, u8)> = texts[1..]
            .iter()
            .map(|t| {
                let r: Vec<u8> = t
                    .lines()
                    .filter_map(|l| l.strip_prefix("-X "))
                    .map(deletion_rank)
                    .collect();
                (*r.iter().min().unwrap(), *r.iter().max().unwrap())
            })
            .collect();
        assert!(ranks.len() >= 2, "{ranks:?}");
        assert!(ranks.windows(2).all(|w| w[0].1 <= w[1].0), "{ranks:?}");
        let deleted: usize = texts.iter().map(|t| t.matches("\n-X ").count()).sum();
        assert_eq!(deleted, 3 * n);
        // The legacy backend does it all in one restore.
        dp.rules.backend = IptablesBackend::Legacy;
        assert_eq!(restores_of(&dp, &diff, Family::V4, TopLevel::Edit).len(), 1);
    }
}
