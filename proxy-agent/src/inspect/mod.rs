//! What an operator asks of a running node: `list` (what the kernel holds,
//! joined with what the model desires, and the drift between them) and
//! `trace` (what happens to one packet, and why). Both read; neither
//! writes a map or sends a packet. They sit above the model and the
//! dataplanes: the kernel's side comes from the modes' readers
//! ([`crate::dataplane::held`]), the desired side from the model.
use std::net::IpAddr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::{
    dataplane::{
        Mode,
        held::{HeldAction, HeldCounters, HeldFrontend, HeldTable},
    },
    model::{
        Backend, ClusterState, FrontendKey, FrontendKind, ModelConfig, NodeNetwork, ServiceTable,
        explain::Explainer, plan::plan,
    },
};

pub mod agent;
pub mod client;
pub mod kernel;
pub mod trace;

/// What the agent desires, for the views to compare the kernel with.
pub struct Desired<'a> {
    pub table: &'a ServiceTable,
    pub network: &'a NodeNetwork,
    pub state: &'a ClusterState,
    pub cfg: &'a ModelConfig,
}

/// One backend as listed: where, and the state of its endpoint when the
/// model knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedBackend {
    pub ip: IpAddr,
    pub port: u16,
    /// "ready", "terminating" (serving while it shuts down), "not ready";
    /// `None` when listed from the kernel alone.
    pub state: Option<String>,
    /// On this node (`None`: unknown).
    pub local: Option<bool>,
}

/// One frontend as listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListedFrontend {
    pub key: FrontendKey,
    pub kind: Option<FrontendKind>,
    /// `namespace/name`, with `:port-name` when the port is named.
    pub service: Option<String>,
    /// "Cluster" or "Local" (`None`: unknown).
    pub traffic_policy: Option<String>,
    /// What the kernel does with a new connection (`None`: not held).
    pub action: Option<HeldAction>,
    /// The backends the kernel holds.
    pub backends: Vec<ListedBackend>,
    pub affinity_timeout_secs: Option<u32>,
    pub source_ranges: Option<Vec<IpNet>>,
    pub counters: Option<HeldCounters>,
    /// How the kernel differs from what the agent desires; empty when
    /// they agree (or when nothing is desired to compare with).
    pub drift: Vec<String>,
}

/// Everything listed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    pub mode: String,
    /// Whether the desired side was known (the agent's model), so that
    /// drift was measured.
    pub compared: bool,
    pub frontends: Vec<ListedFrontend>,
    /// Frontends with drift.
    pub drifted: usize,
}

/// The service name as listed: `namespace/name[:port]`.
pub fn service_text(service: &crate::model::ServiceName, port_name: &str) -> String {
    if port_name.is_empty() {
        service.to_string()
    } else {
        format!("{service}:{port_name}")
    }
}

/// Lists `held`, joined with `desired` when it is known: names, kinds,
/// policies and endpoint states from the model, and drift (a frontend
/// held but not desired, desired but not held, or held differently).
pub fn list(held: &HeldTable, desired: Option<&Desired<'_>>) -> Listing {
    let explainer = desired.map(|d| Explainer::new(d.state, d.cfg));
    let expected = |key: &FrontendKey, frontend: &crate::model::Frontend, d: &Desired<'_>| {
        let plan = plan(key, frontend, d.network);
        match Mode::from_name(&held.mode) {
            Some(mode) => HeldFrontend::expected(mode, &plan),
            None => HeldFrontend::of_plan(&plan),
        }
    };
    let mut frontends = Vec::new();
    let mut keys: Vec<FrontendKey> = held.frontends.keys().copied().collect();
    if let Some(d) = desired {
        keys.extend(d.table.iter().map(|(k, _)| *k));
        keys.sort_unstable();
        keys.dedup();
    }
    for key in keys {
        let kernel = held.frontends.get(&key);
        let wanted = desired.and_then(|d| d.table.get(&key).map(|f| (d, f)));
        let mut listed = ListedFrontend {
            key,
            kind: kernel.and_then(|h| h.kind),
            service: kernel.and_then(|h| h.service.clone()),
            traffic_policy: None,
            action: kernel.map(|h| h.action),
            backends: kernel
                .map(|h| {
                    h.backends
                        .iter()
                        .map(|b| ListedBackend {
                            ip: b.ip,
                            port: b.port,
                            state: None,
                            local: None,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            affinity_timeout_secs: kernel.and_then(|h| h.affinity_timeout_secs),
            source_ranges: kernel.and_then(|h| h.source_ranges.clone()),
            counters: kernel.and_then(|h| h.counters),
            drift: Vec::new(),
        };
        match (kernel, wanted) {
            (Some(kernel), Some((d, frontend))) => {
                listed.drift = kernel.differences(&expected(&key, frontend, d));
            }
            (Some(_), None) if desired.is_some() => {
                listed.drift = vec!["held in the kernel, but the agent does not desire it".into()];
            }
            (None, Some((d, frontend))) => {
                let expected = expected(&key, frontend, d);
                listed.drift = vec![format!(
                    "desired ({:?} to {}), but not held in the kernel",
                    expected.action,
                    crate::dataplane::held::list_backends(&expected.backends)
                )];
            }
            _ => {}
        }
        if let (Some((_, frontend)), Some(explainer)) = (wanted, explainer.as_ref()) {
            listed.kind = Some(frontend.kind);
            listed.service = Some(service_text(&frontend.service, &frontend.port_name));
            let explained = explainer.explain(&key, frontend);
            listed.traffic_policy = Some(explained.traffic_policy.clone());
            for backend in &mut listed.backends {
                let endpoint = explained.endpoints.iter().find(|e| {
                    e.backend
                        == Backend {
                            ip: backend.ip,
                            port: backend.port,
                        }
                });
                if let Some(e) = endpoint {
                    backend.state = Some(
                        if e.ready {
                            "ready"
                        } else if e.terminating {
                            "terminating"
                        } else {
                            "not ready"
                        }
                        .into(),
                    );
                    backend.local = Some(e.local);
                }
            }
        }
        frontends.push(listed);
    }
    let drifted = frontends.iter().filter(|f| !f.drift.is_empty()).count();
    Listing {
        mode: held.mode.clone(),
        compared: desired.is_some(),
        frontends,
        drifted,
    }
}

/// `ip:port/PROTO`, `[v6]:port/PROTO`; a NodePort as `*:port/PROTO` (every
/// NodePort address of the node).
pub fn frontend_text(key: &FrontendKey) -> String {
    match key.ip {
        ip if ip.is_unspecified() => format!("*:{}/{}", key.port, key.protocol),
        IpAddr::V4(ip) => format!("{ip}:{}/{}", key.port, key.protocol),
        IpAddr::V6(ip) => format!("[{ip}]:{}/{}", key.port, key.protocol),
    }
}

pub(crate) fn kind_text(kind: Option<FrontendKind>) -> &'static str {
    match kind {
        Some(FrontendKind::ClusterIp) => "ClusterIP",
        Some(FrontendKind::NodePort) => "NodePort",
        Some(FrontendKind::ExternalIp) => "ExternalIP",
        Some(FrontendKind::LoadBalancer) => "LoadBalancer",
        None => "-",
    }
}

/// The listing as a table for a terminal, one line per frontend and one
/// per backend under it, drift last.
pub fn render_listing(listing: &Listing) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "mode {}: {} frontends{}",
        listing.mode,
        listing.frontends.len(),
        if listing.compared {
            format!(", {} with drift", listing.drifted)
        } else {
            " (the agent's model was not reachable: kernel state only, no drift check)".into()
        }
    );
    let _ = writeln!(
        out,
        "{:<30} {:<12} {:<32} {:<7} {:<8} {:>8} {:>12}",
        "FRONTEND", "KIND", "SERVICE", "POLICY", "ACTION", "AFFINITY", "CONNECTIONS"
    );
    for f in &listing.frontends {
        let action = match f.action {
            Some(HeldAction::Balance) => "balance",
            Some(HeldAction::Reject) => "reject",
            Some(HeldAction::Drop) => "drop",
            None => "absent",
        };
        let affinity = f
            .affinity_timeout_secs
            .map(|s| format!("{s}s"))
            .unwrap_or_else(|| "-".into());
        let connections = f
            .counters
            .and_then(|c| c.connections)
            .map(|c| c.to_string())
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:<30} {:<12} {:<32} {:<7} {:<8} {:>8} {:>12}",
            frontend_text(&f.key),
            kind_text(f.kind),
            f.service.as_deref().unwrap_or("-"),
            f.traffic_policy.as_deref().unwrap_or("-"),
            action,
            affinity,
            connections
        );
        if let Some(ranges) = &f.source_ranges {
            let ranges: Vec<String> = ranges.iter().map(ToString::to_string).collect();
            let _ = writeln!(out, "    source ranges: {}", ranges.join(", "));
        }
        for b in &f.backends {
            let at = Backend {
                ip: b.ip,
                port: b.port,
            };
            let mut notes: Vec<&str> = Vec::new();
            notes.extend(b.state.as_deref());
            if b.local == Some(true) {
                notes.push("local");
            }
            if notes.is_empty() {
                let _ = writeln!(out, "    -> {at}");
            } else {
                let _ = writeln!(out, "    -> {at} ({})", notes.join(", "));
            }
        }
        for d in &f.drift {
            let _ = writeln!(out, "    DRIFT: {d}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::held::sample_table;

    fn held_of(table: &ServiceTable, network: &NodeNetwork) -> HeldTable {
        let mut held = HeldTable::new("test");
        for (key, frontend) in table.iter() {
            held.insert(HeldFrontend::of_plan(&plan(key, frontend, network)));
        }
        held
    }

    #[test]
    fn a_kernel_that_holds_the_desired_table_shows_no_drift_and_the_models_names() {
        let (table, network) = sample_table();
        let held = held_of(&table, &network);
        let state = ClusterState::default();
        let cfg = crate::model::test_support::config();
        let desired = Desired {
            table: &table,
            network: &network,
            state: &state,
            cfg: &cfg,
        };
        let listing = list(&held, Some(&desired));
        assert_eq!(listing.drifted, 0, "{listing:#?}");
        assert_eq!(listing.frontends.len(), table.len());
        let web = &listing.frontends.iter().find(|f| f.key.port == 80).unwrap();
        assert_eq!(web.service.as_deref(), Some("ns/web"));
        assert_eq!(web.kind, Some(FrontendKind::ClusterIp));
    }

    #[test]
    fn drift_names_what_is_missing_extra_and_different() {
        let (table, network) = sample_table();
        let mut held = held_of(&table, &network);
        let mut keys = held.frontends.keys().copied();
        let (missing, changed) = (keys.next().unwrap(), keys.next().unwrap());
        held.frontends.remove(&missing);
        held.frontends.get_mut(&changed).unwrap().backends.pop();
        let extra = crate::model::test_support::key("10.96.9.9", 9);
        held.insert(HeldFrontend {
            key: extra,
            ..held.frontends[&changed].clone()
        });
        let state = ClusterState::default();
        let cfg = crate::model::test_support::config();
        let desired = Desired {
            table: &table,
            network: &network,
            state: &state,
            cfg: &cfg,
        };
        let listing = list(&held, Some(&desired));
        assert_eq!(listing.drifted, 3);
        let drift_of = |key: FrontendKey| {
            listing
                .frontends
                .iter()
                .find(|f| f.key == key)
                .map(|f| f.drift.join("; "))
                .unwrap()
        };
        assert!(
            drift_of(missing).contains("not held"),
            "{}",
            drift_of(missing)
        );
        assert!(
            drift_of(changed).starts_with("backends"),
            "{}",
            drift_of(changed)
        );
        assert!(
            drift_of(extra).contains("does not desire"),
            "{}",
            drift_of(extra)
        );
        let text = render_listing(&listing);
        assert!(text.contains("DRIFT"), "{text}");
        // Without the model: the kernel's view, no drift claimed.
        let alone = list(&held, None);
        assert!(!alone.compared && alone.drifted == 0);
        assert!(render_listing(&alone).contains("kernel state only"));
    }
}
