//! Why a frontend's backends are what they are: every endpoint of its
//! Service port in the cluster state, with the rule of
//! [`build_table`](super::build_table) that let it in or kept it out.
//! For `proxy-agent trace` and `list`; as pure as the rest of the model.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use super::{
    Backend, ClusterState, Frontend, FrontendKey, ModelConfig, ServiceName,
    builder::{
        BackendGroup, EndpointEntry, Hint, Place, TopologyScope, index_endpoints, node_zone,
        slice_service,
    },
    slice::Slice,
    validate::{IpFamily, NodeName},
};

/// One endpoint of a frontend's Service port and what became of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointVerdict {
    pub backend: Backend,
    /// `conditions.ready`.
    pub ready: bool,
    /// Serving and terminating (a pod shutting down that still answers).
    pub terminating: bool,
    /// On this agent's node.
    pub local: bool,
    /// A backend of the frontend's main view (its clients in general).
    pub chosen: bool,
    /// For a frontend with the Local policy: a backend of the cluster-wide
    /// view that pods and the node itself use.
    pub chosen_cluster_wide: bool,
    /// The rule that decided, in words.
    pub why: String,
}

/// What the cluster state says about a frontend's endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    /// "Cluster" or "Local": the traffic policy that applies to this kind.
    pub traffic_policy: String,
    /// "none", "zone" or "node": which topology hints decided (ready
    /// endpoints only, cluster-wide set only).
    pub topology: String,
    pub endpoints: Vec<EndpointVerdict>,
}

/// Explains frontends of the table `build_table` gives for one cluster
/// state: the state's slices and Services indexed by Service once.
pub struct Explainer<'a> {
    cfg: &'a ModelConfig,
    zone: Option<String>,
    slices: HashMap<ServiceName, Vec<(usize, Arc<Slice>)>>,
    topology: HashSet<ServiceName>,
}

impl<'a> Explainer<'a> {
    pub fn new(state: &ClusterState, cfg: &'a ModelConfig) -> Explainer<'a> {
        let mut slices: HashMap<ServiceName, Vec<(usize, Arc<Slice>)>> = HashMap::new();
        for slice in state.endpoint_slices.iter() {
            if let Some(service) = slice_service(&slice.check) {
                slices.entry(service).or_default().push((0, slice.clone()));
            }
        }
        let topology = state
            .services
            .iter()
            .filter_map(|s| s.check.plan.as_ref())
            .filter(|plan| plan.topology)
            .map(|plan| plan.name.clone())
            .collect();
        Explainer {
            cfg,
            zone: node_zone(&state.nodes, cfg, &mut Vec::new()),
            slices,
            topology,
        }
    }

    /// Explains `frontend`, the table's at `key`.
    pub fn explain(&self, key: &FrontendKey, frontend: &Frontend) -> Explanation {
        let service = &frontend.service;
        let place = Place {
            node_name: &self.cfg.node_name,
            node: NodeName::find(&self.cfg.node_name),
            zone: self.zone.as_deref(),
            reserved: &[],
        };
        let slices = self.slices.get(service).map(Vec::as_slice).unwrap_or(&[]);
        let groups = index_endpoints(service, slices, place);
        let entries: BTreeSet<EndpointEntry> = groups
            .get(&BackendGroup {
                service: service.clone(),
                family: IpFamily::of(key.ip),
                port_name: frontend.port_name.clone(),
                protocol: key.protocol,
            })
            .cloned()
            .unwrap_or_default();
        let local_only = frontend.policy.local_only;
        let scope = if self.topology.contains(service) && !local_only {
            TopologyScope::of(entries.iter().filter(|e| e.ready))
        } else {
            TopologyScope::Cluster
        };
        let endpoints = entries
            .iter()
            .map(|entry| {
                let chosen = frontend.backends.contains(&entry.backend);
                let chosen_cluster_wide = frontend.cluster_backends.contains(&entry.backend);
                EndpointVerdict {
                    backend: entry.backend,
                    ready: entry.ready,
                    terminating: entry.serving_terminating,
                    local: entry.local,
                    chosen,
                    chosen_cluster_wide,
                    why: why(entry, chosen, local_only, scope, chosen_cluster_wide),
                }
            })
            .collect();
        Explanation {
            traffic_policy: if local_only { "Local" } else { "Cluster" }.into(),
            topology: match scope {
                TopologyScope::Cluster => "none",
                TopologyScope::Zone => "zone",
                TopologyScope::Node => "node",
            }
            .into(),
            endpoints,
        }
    }
}

/// The rule that put `entry` in the frontend's backends or left it out,
/// in the order [`select_backends`](super::builder) applies them.
fn why(
    entry: &EndpointEntry,
    chosen: bool,
    local_only: bool,
    scope: TopologyScope,
    cluster_wide: bool,
) -> String {
    let also = if cluster_wide {
        "; pods and the node use it (cluster-wide view)"
    } else {
        ""
    };
    if local_only && !entry.local {
        return format!("not on this node and the traffic policy is Local{also}");
    }
    if !entry.ready {
        return if chosen {
            format!("terminating but serving, and no endpoint is ready (fallback){also}")
        } else {
            format!("terminating: ready endpoints are used instead{also}")
        };
    }
    if !scope.admits(entry) {
        let other = match scope {
            TopologyScope::Node => "hinted for another node",
            _ => "hinted for another zone",
        };
        return format!("ready, but {other} (topology-aware routing){also}");
    }
    let mut text = String::from("ready");
    if local_only {
        text.push_str(", on this node");
    }
    match scope {
        TopologyScope::Zone if entry.zone_hint == Hint::Here => {
            text.push_str(", hinted for this node's zone")
        }
        TopologyScope::Node if entry.node_hint == Hint::Here => {
            text.push_str(", hinted for this node")
        }
        _ => {}
    }
    if !chosen {
        // Every rule admitted it: the table is older than the state.
        text.push_str(", not in the table yet");
    }
    text.push_str(also);
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        build_table,
        test_support::{
            config, endpoint_full, for_zones, node_in_zone, simple_service, slice, slice_port,
            state,
        },
    };

    fn explain_first(state: &ClusterState, cfg: &ModelConfig) -> Explanation {
        let table = build_table(state, cfg).table;
        let (key, frontend) = table.iter().next().expect("a frontend");
        Explainer::new(state, cfg).explain(key, frontend)
    }

    #[test]
    fn ready_endpoints_are_chosen_and_terminating_ones_only_as_a_fallback() {
        let svc = simple_service("ns", "web", "10.96.0.1", 80);
        let endpoints = vec![
            endpoint_full("10.1.0.1", Some(true), Some(true), Some(false), ""),
            endpoint_full("10.1.0.2", Some(false), Some(true), Some(true), ""),
            endpoint_full("10.1.0.3", Some(false), Some(false), Some(false), ""),
        ];
        let port = [slice_port("", 8080, "")];
        let s = slice("ns", "web-1", "web", "IPv4", &port, &endpoints);
        let cluster = state(vec![svc.clone()], vec![s]);
        let explained = explain_first(&cluster, &config());
        let whys: Vec<(String, bool, &str)> = explained
            .endpoints
            .iter()
            .map(|e| (e.backend.ip.to_string(), e.chosen, e.why.as_str()))
            .collect();
        assert_eq!(
            whys,
            vec![
                ("10.1.0.1".into(), true, "ready"),
                (
                    "10.1.0.2".into(),
                    false,
                    "terminating: ready endpoints are used instead"
                ),
            ]
        );
        // An endpoint neither ready nor serving is not kept by the model at
        // all: it is nobody's candidate.
        assert_eq!(explained.traffic_policy, "Cluster");

        // Without the ready one, the terminating one serves.
        let s = slice("ns", "web-1", "web", "IPv4", &port, &endpoints[1..]);
        let explained = explain_first(&state(vec![svc], vec![s]), &config());
        assert!(explained.endpoints[0].chosen);
        assert_eq!(
            explained.endpoints[0].why,
            "terminating but serving, and no endpoint is ready (fallback)"
        );
    }

    #[test]
    fn zone_hints_say_which_zone_kept_an_endpoint_out() {
        let mut svc = simple_service("ns", "web", "10.96.0.1", 80);
        svc.spec.as_mut().unwrap().traffic_distribution = Some("PreferClose".into());
        let here = for_zones(
            endpoint_full("10.1.0.1", Some(true), Some(true), Some(false), ""),
            &["zone-a"],
        );
        let there = for_zones(
            endpoint_full("10.1.0.2", Some(true), Some(true), Some(false), ""),
            &["zone-b"],
        );
        let port = [slice_port("", 8080, "")];
        let s = slice("ns", "web-1", "web", "IPv4", &port, &[here, there]);
        let mut state = state(vec![svc], vec![s]);
        let cfg = config();
        state.nodes = vec![Arc::new(node_in_zone(&cfg.node_name, "zone-a"))];
        let explained = explain_first(&state, &cfg);
        assert_eq!(explained.topology, "zone");
        let whys: Vec<&str> = explained.endpoints.iter().map(|e| e.why.as_str()).collect();
        assert_eq!(
            whys,
            vec![
                "ready, hinted for this node's zone",
                "ready, but hinted for another zone (topology-aware routing)"
            ]
        );
    }
}
