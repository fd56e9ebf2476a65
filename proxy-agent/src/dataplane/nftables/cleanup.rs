//! Cleanup: deleting the tables of ours, and kube-proxy's.
use super::{
    NftablesError,
    existing::{list, tables_of_ours},
    transaction::{Tx, run},
};

/// Deletes the agent's tables, if present. Returns whether any was there.
pub fn cleanup() -> Result<bool, NftablesError> {
    let mut any = false;
    for name in &tables_of_ours()? {
        let mut tx = Tx::new("");
        tx.push_value(serde_json::json!({ "delete": { "table": {
            "family": "inet", "name": name,
        } } }));
        run(tx)?;
        any = true;
    }
    Ok(any)
}

/// Deletes the tables of kube-proxy's nftables mode (`ip kube-proxy` and
/// `ip6 kube-proxy`), for `--cleanup-kube-proxy`. Returns how many were there.
pub fn cleanup_kube_proxy() -> Result<usize, NftablesError> {
    let mut deleted = 0;
    for family in ["ip", "ip6"] {
        if list(&["list", "table", family, "kube-proxy"])?.is_none() {
            continue;
        }
        let mut tx = Tx::new("");
        tx.push_value(serde_json::json!({ "delete": { "table": {
            "family": family, "name": "kube-proxy",
        } } }));
        run(tx)?;
        deleted += 1;
    }
    Ok(deleted)
}
