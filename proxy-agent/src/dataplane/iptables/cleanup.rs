//! Cleanup: removing every rule and chain of this mode (which are
//! kube-proxy's), through either backend.
use std::collections::BTreeSet;

use super::{
    IptablesBackend, IptablesError,
    backend::{restore, save},
    names::{
        BUILT_IN, EXTERNAL_SERVICES_CHAIN, FIREWALL_CHAIN, FRONTEND_PREFIXES, MARK_MASQ_CHAIN,
        NODEPORTS_CHAIN, POSTROUTING_CHAIN, SERVICES_CHAIN,
    },
    restore::{TableInput, deletion_chunks},
    save::{Saved, target_of},
};
use crate::dataplane::netfilter::Family;

/// The chains kube-proxy's iptables mode creates, by table, besides the
/// per-frontend ones ([`FRONTEND_PREFIXES`]). Ours are a subset (same
/// names), so one cleanup serves both. Not kubelet's: `KUBE-FIREWALL`,
/// `KUBE-KUBELET-CANARY`, `KUBE-MARK-DROP` stay.
const KUBE_PROXY_CHAINS: [(&str, &[&str]); 3] = [
    (
        "nat",
        &[
            SERVICES_CHAIN,
            NODEPORTS_CHAIN,
            POSTROUTING_CHAIN,
            MARK_MASQ_CHAIN,
            "KUBE-PROXY-CANARY",
        ],
    ),
    (
        "filter",
        &[
            SERVICES_CHAIN,
            EXTERNAL_SERVICES_CHAIN,
            FIREWALL_CHAIN,
            NODEPORTS_CHAIN,
            "KUBE-FORWARD",
            "KUBE-PROXY-CANARY",
        ],
    ),
    ("mangle", &["KUBE-PROXY-CANARY"]),
];

/// What to remove from one table, as the table's part of successive
/// restores: the jumps from built-in chains to `ours` (deleted by their
/// exact text), then `ours` flushed and deleted by
/// [`deletion_rank`](super::restore::deletion_rank), at most `limit` per
/// restore. A chain of ours that another chain (not ours, not built in)
/// jumps to is flushed but kept: deleting it would fail the whole restore.
/// Returns how many jumps and chains go, and the parts (none when nothing
/// goes).
fn cleanup_input(
    table: &str,
    saved: &Saved,
    ours: &BTreeSet<String>,
    limit: usize,
) -> (usize, Vec<TableInput>) {
    let mut removed = 0;
    let mut first = TableInput::default();
    let mut referenced: BTreeSet<&str> = BTreeSet::new();
    for (chain, rules) in &saved.chains {
        if ours.contains(chain) {
            continue;
        }
        for rule in rules {
            let Some(target) = target_of(rule).filter(|t| ours.contains(*t)) else {
                continue;
            };
            if BUILT_IN.contains(&chain.as_str()) {
                first.rules.push(format!("-D {chain} {rule}"));
                removed += 1;
            } else {
                tracing::warn!(table, chain = %chain, target, "a foreign chain jumps to ours; keeping ours (flushed)");
                referenced.insert(target);
            }
        }
    }
    let mut remove = Vec::new();
    for chain in ours.iter().filter(|c| saved.has(c)) {
        if !referenced.contains(chain.as_str()) {
            remove.push(chain);
            removed += 1;
        } else if !saved.rules(chain).is_empty() {
            // Kept, empty: a second cleanup finds nothing more to do.
            first.declare.insert(chain.clone());
            removed += 1;
        }
    }
    let mut parts = vec![first];
    for (i, chunk) in deletion_chunks(remove, limit).into_iter().enumerate() {
        if i > 0 {
            parts.push(TableInput::default());
        }
        let part = parts.last_mut().expect("parts holds the first part");
        for chain in chunk {
            part.remove(chain);
        }
    }
    parts.retain(|p| !p.is_empty());
    (removed, parts)
}

/// Removes every rule and chain this mode creates, in both families, in
/// both iptables backends, and in the nat and filter tables: the jumps from
/// the built-in chains first, then our chains, flushed and deleted. Returns
/// whether there was anything. Safe to run twice. The names are
/// kube-proxy's, so this is also [`cleanup_kube_proxy`].
pub fn cleanup() -> Result<bool, IptablesError> {
    cleanup_kube_proxy()
}

/// Removes what kube-proxy's iptables mode leaves: its `KUBE-*` chains of
/// the nat, filter and mangle tables (the per-service ones by prefix) and
/// the jumps to them, through both backends (a node may have moved from one
/// to the other). Since this mode uses kube-proxy's names, this is what
/// [`cleanup`] does as well. A node without iptables has nothing to remove.
pub fn cleanup_kube_proxy() -> Result<bool, IptablesError> {
    cleanup_backends(&IptablesBackend::ALL)
}

/// [`cleanup_kube_proxy`] through `backends` only.
pub fn cleanup_backends(backends: &[IptablesBackend]) -> Result<bool, IptablesError> {
    let mut any = false;
    for &backend in backends {
        for family in [Family::V4, Family::V6] {
            let mut restores: Vec<String> = Vec::new();
            for (table, chains) in KUBE_PROXY_CHAINS {
                let saved = save(backend, family, table, true)?;
                let mut ours: BTreeSet<String> = chains.iter().map(|c| c.to_string()).collect();
                if table == "nat" {
                    ours.extend(
                        saved
                            .chains
                            .keys()
                            .filter(|c| FRONTEND_PREFIXES.iter().any(|p| c.starts_with(p)))
                            .cloned(),
                    );
                }
                let limit = backend.chains_per_restore();
                let (removed, parts) = cleanup_input(table, &saved, &ours, limit);
                any |= removed > 0;
                for (i, part) in parts.iter().enumerate() {
                    if restores.len() <= i {
                        restores.push(String::new());
                    }
                    part.write(table, &mut restores[i]);
                }
            }
            for text in restores {
                restore(backend, family, &text)?;
            }
            if backend == IptablesBackend::Nft {
                for (table, _) in KUBE_PROXY_CHAINS {
                    any |= remove_if_unused(family, table)?;
                }
            }
        }
    }
    Ok(any)
}

/// Deletes the nftables table `table` of `family` (iptables-nft's `nat`,
/// `filter`, `mangle`) when nothing is left in it but its built-in chains,
/// empty and accepting: iptables-nft made it on first use, and left in place
/// its hooked chains would keep netfilter's NAT and conntrack on every
/// packet. A table with anything else in it stays. Returns whether it went.
fn remove_if_unused(family: Family, table: &str) -> Result<bool, IptablesError> {
    let nft_family = match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    };
    let listed = std::process::Command::new("nft")
        .args(["-j", "list", "table", nft_family, table])
        .output();
    let Ok(listed) = listed else {
        return Ok(false); // no nft: nothing of iptables-nft's either
    };
    if !listed.status.success() || !only_unused_base_chains(&listed.stdout) {
        return Ok(false);
    }
    let deleted = std::process::Command::new("nft")
        .args(["delete", "table", nft_family, table])
        .output()
        .map_err(|source| IptablesError::Spawn {
            binary: "nft",
            source,
        })?;
    if !deleted.status.success() {
        // Filled in between, or gone: either way not ours to insist on.
        tracing::debug!(
            table,
            family = nft_family,
            stderr = %String::from_utf8_lossy(&deleted.stderr),
            "leaving the table"
        );
        return Ok(false);
    }
    tracing::info!(
        table,
        family = nft_family,
        "removed iptables-nft's empty table"
    );
    Ok(true)
}

/// Whether `nft -j list table` output holds a table and nothing but base
/// chains without rules and with policy accept.
fn only_unused_base_chains(json: &[u8]) -> bool {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(json) else {
        return false;
    };
    let Some(items) = value.get("nftables").and_then(|v| v.as_array()) else {
        return false;
    };
    items.iter().all(|item| {
        let Some((kind, body)) = item.as_object().and_then(|o| o.iter().next()) else {
            return false;
        };
        match kind.as_str() {
            "metainfo" | "table" => true,
            "chain" => {
                body.get("hook").is_some()
                    && body.get("policy").and_then(|p| p.as_str()) == Some("accept")
            }
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::iptables::restore::CHAINS_PER_RESTORE;

    #[test]
    fn only_a_table_of_empty_accepting_base_chains_is_unused() {
        let table = |items: &str| {
            format!(
                r#"{{"nftables": [{{"metainfo": {{"version": "1.0.6"}}}},
                {{"table": {{"family": "ip", "name": "nat", "handle": 1}}}}{items}]}}"#
            )
        };
        let base = r#", {"chain": {"family": "ip", "table": "nat", "name": "POSTROUTING",
            "handle": 1, "type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"}}"#;
        assert!(only_unused_base_chains(table("").as_bytes()));
        assert!(only_unused_base_chains(table(base).as_bytes()));
        let drop = base.replace("accept", "drop");
        assert!(!only_unused_base_chains(table(&drop).as_bytes()));
        let user_chain =
            r#", {"chain": {"family": "ip", "table": "nat", "name": "DOCKER", "handle": 2}}"#;
        assert!(!only_unused_base_chains(table(user_chain).as_bytes()));
        let rule = r#", {"rule": {"family": "ip", "table": "nat", "chain": "POSTROUTING",
            "handle": 3, "expr": [{"counter": {"packets": 0, "bytes": 0}}]}}"#;
        assert!(!only_unused_base_chains(
            table(&format!("{base}{rule}")).as_bytes()
        ));
        assert!(!only_unused_base_chains(b"not json"));
    }

    #[test]
    fn cleanup_deletes_jumps_then_chains_and_keeps_what_a_foreign_chain_uses() {
        let saved = Saved::parse(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-AAAA - [0:0]\n:CNI-X - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n\
             -A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -A PREROUTING -j CNI-X\n-A CNI-X -j KUBE-MARK-MASQ\n-A KUBE-SERVICES -j KUBE-SVC-AAAA\nCOMMIT\n",
        );
        let ours: BTreeSet<String> = [
            "KUBE-SERVICES",
            "KUBE-SVC-AAAA",
            "KUBE-MARK-MASQ",
            "KUBE-NODEPORTS",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        // KUBE-MARK-MASQ is used by CNI-X, and empty already: left alone.
        let (removed, parts) = cleanup_input("nat", &saved, &ours, CHAINS_PER_RESTORE);
        assert_eq!(removed, 3);
        assert_eq!(parts.len(), 1);
        let mut text = String::new();
        parts[0].write("nat", &mut text);
        assert_eq!(
            text,
            "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-SVC-AAAA - [0:0]\n\
             -D PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
             -X KUBE-SERVICES\n-X KUBE-SVC-AAAA\nCOMMIT\n"
        );
        // Nothing left: nothing to do.
        let (removed, parts) = cleanup_input("nat", &Saved::default(), &ours, CHAINS_PER_RESTORE);
        assert_eq!(removed, 0);
        assert!(parts.is_empty());
    }
}
