//! Reading RBAC objects, so tests can compare a ClusterRole with what the
//! agent really does (see `apiserver::ApiServer::rbac_usage`).
use std::collections::BTreeSet;

use anyhow::{Context, ensure};
use serde_json::Value;

/// Every (verb, apiGroup, resource) a ClusterRole grants, in the order
/// `ApiServer::rbac_usage` reports them. Rules narrowed by `resourceNames`
/// or about `nonResourceURLs` are refused: the tests' comparison assumes
/// neither.
pub fn cluster_role_grants(role: &Value) -> anyhow::Result<BTreeSet<(String, String, String)>> {
    let mut granted = BTreeSet::new();
    for rule in role["rules"].as_array().context("no rules")? {
        ensure!(
            rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(),
            "rule with resourceNames or nonResourceURLs: {rule}"
        );
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                for verb in strings(&rule["verbs"]) {
                    granted.insert((verb, group.clone(), resource.clone()));
                }
            }
        }
    }
    Ok(granted)
}

/// The strings of a JSON array (nothing for anything else).
pub fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}
