//! Reading what the kernel holds: the tables of ours, and their chains,
//! sets and map elements, listed with `nft -j`.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    process::Command,
};

use super::{NftablesError, TABLE};

/// `nft -j <args>`'s objects (`None`: the object listed does not exist).
/// Read as plain JSON: the crate's schema cannot read verdict maps, nor
/// every object other software may keep in the family.
pub(super) fn list(args: &[&str]) -> Result<Option<Vec<serde_json::Value>>, NftablesError> {
    let out = Command::new("nft")
        .arg("-j")
        .args(args)
        .output()
        .map_err(NftablesError::Spawn)?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stderr);
        if text.contains("No such file or directory") {
            return Ok(None);
        }
        return Err(NftablesError::Listing(text.trim().to_string()));
    }
    let mut value: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| NftablesError::Listing(e.to_string()))?;
    match value.get_mut("nftables").map(serde_json::Value::take) {
        Some(serde_json::Value::Array(objects)) => Ok(Some(objects)),
        _ => Err(NftablesError::Listing("no \"nftables\" array".into())),
    }
}

/// What the kernel's table holds, by name.
#[derive(Debug, Default)]
pub(super) struct Existing {
    pub(super) chains: HashSet<String>,
    pub(super) sets: HashSet<String>,
    /// (map, key as nft lists it, goto target) of the four frontend maps.
    pub(super) elements: Vec<(String, serde_json::Value, String)>,
}

impl Existing {
    /// What every table of the family holds that is named like ours (one
    /// listing of chains and sets for all of them, then their maps).
    pub(super) fn read_all() -> Result<BTreeMap<String, Existing>, NftablesError> {
        let mut all: BTreeMap<String, Existing> = BTreeMap::new();
        let str_of = |o: &serde_json::Value, field: &str| {
            o.get(field).and_then(|n| n.as_str()).map(str::to_string)
        };
        for table in tables_of_ours()? {
            all.entry(table).or_default();
        }
        for object in list(&["list", "chains", "inet"])?.unwrap_or_default() {
            if let Some(c) = object.get("chain")
                && let (Some(table), Some(name)) = (str_of(c, "table"), str_of(c, "name"))
                && let Some(e) = all.get_mut(&table)
            {
                e.chains.insert(name);
            }
        }
        // Terse: the names, not the elements of every affinity set.
        for object in list(&["-t", "list", "sets", "inet"])?.unwrap_or_default() {
            if let Some(c) = object.get("set")
                && let (Some(table), Some(name)) = (str_of(c, "table"), str_of(c, "name"))
                && let Some(e) = all.get_mut(&table)
            {
                e.sets.insert(name);
            }
        }
        for (table, existing) in all.iter_mut() {
            for map in ["services4", "services6", "nodeports4", "nodeports6"] {
                for object in list(&["list", "map", "inet", table, map])?.unwrap_or_default() {
                    let Some(elems) = object.pointer("/map/elem").and_then(|e| e.as_array()) else {
                        continue;
                    };
                    for pair in elems {
                        let (Some(key), Some(target)) = (
                            pair.get(0),
                            pair.pointer("/1/goto/target").and_then(|t| t.as_str()),
                        ) else {
                            continue;
                        };
                        existing
                            .elements
                            .push((map.to_string(), key.clone(), target.to_string()));
                    }
                }
            }
        }
        Ok(all)
    }
}

/// The `inet` tables of ours: those holding chains, and the one-table
/// layout's table (which may be empty) if it is there. Not `nft list
/// tables`: it fills nft's whole cache, rules included (66 s at 10 000
/// services), where listing chains takes 0.15 s.
pub(super) fn tables_of_ours() -> Result<BTreeSet<String>, NftablesError> {
    let mut tables: BTreeSet<String> = list(&["list", "chains", "inet"])?
        .unwrap_or_default()
        .iter()
        .filter_map(|o| o.pointer("/chain/table").and_then(|n| n.as_str()))
        .filter(|t| is_ours(t))
        .map(str::to_string)
        .collect();
    if list(&["-t", "list", "table", "inet", TABLE])?.is_some() {
        tables.insert(TABLE.to_string());
    }
    Ok(tables)
}

/// Whether an `inet` table is one of the agent's: [`TABLE`] (an earlier,
/// unsharded layout) or `proxy-agent-<n>`.
pub(super) fn is_ours(table: &str) -> bool {
    table == TABLE
        || table
            .strip_prefix(TABLE)
            .and_then(|rest| rest.strip_prefix('-'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}
