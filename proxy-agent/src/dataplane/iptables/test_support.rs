//! Test support shared by the iptables module's tests: a dataplane on a
//! node network of both families, frontends, and reading restore texts.
use std::collections::BTreeSet;

use super::{
    IptablesBackend, IptablesDataplane,
    restore::{RestoreInput, TopLevel, Writer},
};
use crate::{
    dataplane::{NodeNetwork, netfilter::Family},
    model::{
        Backend, Frontend, FrontendKey, FrontendKind, TableDiff,
        test_support::{frontend, ip},
    },
};

pub(super) fn network() -> NodeNetwork {
    NodeNetwork {
        nodeport_addresses: [ip("198.18.0.1"), ip("2001:2::1")].into_iter().collect(),
        cluster_cidrs: vec![
            "198.18.1.0/24".parse().unwrap(),
            "2001:2::1:0/112".parse().unwrap(),
        ],
        ..NodeNetwork::default()
    }
}

pub(super) fn dataplane() -> IptablesDataplane {
    let mut dp = IptablesDataplane::new(IptablesBackend::Nft);
    dp.network = network();
    dp
}

pub(super) fn external(kind: FrontendKind, backends: &[Backend]) -> Frontend {
    let mut f = frontend("ns", "web", backends);
    f.kind = kind;
    f.port_name = "http".into();
    f
}

pub(super) fn local(kind: FrontendKind, local: &[Backend], all: &[Backend]) -> Frontend {
    let mut f = external(kind, local);
    f.policy.local_only = true;
    f.cluster_backends = all.to_vec();
    f
}

/// The restores of a diff applied to `dp` (nothing runs).
pub(super) fn restores_of(
    dp: &IptablesDataplane,
    diff: &TableDiff,
    family: Family,
    top: TopLevel,
) -> Vec<String> {
    let (keys, wanted) = dp.wanted_of(diff);
    let none = BTreeSet::new();
    let writer = Writer {
        backend: dp.rules.backend,
        programmed: &dp.programmed,
        network: &dp.network,
    };
    writer
        .restores(family, &keys, &wanted, top, &none, &none)
        .iter()
        .map(RestoreInput::text)
        .collect()
}

/// The restore text of a diff applied to `dp`, the top-level chains
/// rewritten whole (so they can be read in the text).
pub(super) fn restore_text(dp: &IptablesDataplane, diff: &TableDiff, family: Family) -> String {
    restores_of(dp, diff, family, TopLevel::Rewrite).concat()
}

pub(super) fn added(frontends: &[(FrontendKey, Frontend)]) -> TableDiff {
    TableDiff {
        added: frontends
            .iter()
            .map(|(k, f)| (*k, f.clone().into()))
            .collect(),
        ..TableDiff::default()
    }
}

/// The rules of `chain` in `table` of a restore text (after `-A chain `).
pub(super) fn rules<'a>(text: &'a str, table: &str, chain: &str) -> Vec<&'a str> {
    let prefix = format!("-A {chain} ");
    let mut in_table = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            in_table = t == table;
        } else if in_table && let Some(rule) = line.strip_prefix(prefix.as_str()) {
            out.push(rule);
        }
    }
    out
}

pub(super) fn declared(text: &str) -> BTreeSet<&str> {
    text.lines()
        .filter_map(|l| l.strip_prefix(':'))
        .filter_map(|l| l.split_whitespace().next())
        .collect()
}

pub(super) const C: &str = "-m comment --comment \"ns/web:http\"";
