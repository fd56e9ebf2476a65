//! What a mode holds in the kernel, read back from the kernel itself into
//! one mode-neutral shape: what `proxy-agent list` prints, what `trace`
//! starts from, and what drift is measured against. Each mode has a
//! reader (`<mode>::held`); none of them needs the agent to be running.
use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::model::{
    Backend, FrontendKey, FrontendKind,
    plan::{Action, FrontendPlan},
};

/// What a new connection to a frontend meets, as held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeldAction {
    /// Sent to one of the backends.
    Balance,
    /// Refused (TCP reset, ICMP port unreachable): no endpoint at all.
    Reject,
    /// Dropped: endpoints exist, none may serve (traffic policy Local).
    Drop,
}

/// Counters a mode keeps per frontend, where it keeps them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldCounters {
    /// New connections (flows) translated for the frontend.
    pub connections: Option<u64>,
    pub packets: Option<u64>,
    pub bytes: Option<u64>,
}

/// One frontend as the kernel holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HeldFrontend {
    /// Address, port and protocol matched; a NodePort's address is the
    /// unspecified address of its family, as in the model.
    pub key: FrontendKey,
    /// The Service (`namespace/name`, with `:port-name` when named) where
    /// the mode writes it into the kernel (rule comments); `None` where
    /// the kernel holds addresses only (ebpf maps, IPVS).
    pub service: Option<String>,
    /// Where the kernel tells it (a NodePort always; other kinds only
    /// where a mode's rules name them).
    pub kind: Option<FrontendKind>,
    /// Every backend some client of the frontend may be sent to (sorted,
    /// without duplicates): the union of its views, as
    /// [`FrontendPlan::backends`].
    pub backends: Vec<Backend>,
    /// What the frontend's main view does with a new connection.
    pub action: HeldAction,
    /// `sessionAffinity: ClientIP` timeout, seconds.
    pub affinity_timeout_secs: Option<u32>,
    /// `loadBalancerSourceRanges` enforced (sorted); `None`: any source.
    pub source_ranges: Option<Vec<IpNet>>,
    pub counters: Option<HeldCounters>,
}

impl HeldFrontend {
    /// What a mode that programmed `plan` exactly would hold: the fields
    /// drift is measured on (`service`, `kind`, counters are left empty).
    pub fn of_plan(plan: &FrontendPlan) -> HeldFrontend {
        let mut ranges = plan.source_ranges.clone();
        if let Some(r) = ranges.as_mut() {
            r.iter_mut().for_each(|n| *n = n.trunc());
            r.sort_unstable();
            r.dedup();
        }
        HeldFrontend {
            key: plan.key,
            service: None,
            kind: None,
            backends: plan.backends(),
            action: match plan.view.action {
                Action::Balance(_) => HeldAction::Balance,
                Action::Reject => HeldAction::Reject,
                Action::Drop => HeldAction::Drop,
            },
            affinity_timeout_secs: plan.affinity_timeout_secs,
            source_ranges: ranges,
            counters: None,
        }
    }

    /// What `mode` holds when it programmed `plan` exactly: [`of_plan`],
    /// but where the mode documents a difference ([`Mode::cannot`]) what
    /// it holds instead. IPVS has one set of real servers per virtual
    /// server: a frontend with the Local policy holds its local endpoints
    /// only when it has some.
    ///
    /// [`of_plan`]: HeldFrontend::of_plan
    /// [`Mode::cannot`]: super::Mode::cannot
    pub fn expected(mode: super::Mode, plan: &FrontendPlan) -> HeldFrontend {
        let mut held = HeldFrontend::of_plan(plan);
        if mode
            .cannot(super::mode::Behaviour::ExternalLocalShortCircuitToEveryEndpoint)
            .is_some()
            && let Action::Balance(local) = &plan.view.action
            && plan.cluster_view.is_some()
        {
            let mut local = local.clone();
            local.sort_unstable();
            local.dedup();
            held.backends = local;
        }
        held
    }

    /// How `self` (held) differs from `expected` on the fields every mode
    /// reads back, one phrase each; empty when they agree.
    pub fn differences(&self, expected: &HeldFrontend) -> Vec<String> {
        let mut out = Vec::new();
        if self.backends != expected.backends {
            out.push(format!(
                "backends {} where {} are desired",
                list_backends(&self.backends),
                list_backends(&expected.backends)
            ));
        }
        if self.action != expected.action {
            out.push(format!(
                "action {:?} where {:?} is desired",
                self.action, expected.action
            ));
        }
        if self.affinity_timeout_secs != expected.affinity_timeout_secs {
            out.push(format!(
                "affinity {:?} where {:?} is desired",
                self.affinity_timeout_secs, expected.affinity_timeout_secs
            ));
        }
        if self.source_ranges != expected.source_ranges {
            out.push(format!(
                "source ranges {:?} where {:?} are desired",
                self.source_ranges, expected.source_ranges
            ));
        }
        out
    }
}

/// `ip:port, ...`, `[v6]:port` for IPv6; `none` when empty.
pub fn list_backends(backends: &[Backend]) -> String {
    if backends.is_empty() {
        return "none".into();
    }
    backends
        .iter()
        .map(Backend::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Everything one mode holds, by frontend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HeldTable {
    /// The mode whose state this is ("ebpf", "nftables", ...).
    pub mode: String,
    #[serde(serialize_with = "frontends_as_list")]
    pub frontends: BTreeMap<FrontendKey, HeldFrontend>,
}

fn frontends_as_list<S: serde::Serializer>(
    frontends: &BTreeMap<FrontendKey, HeldFrontend>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(frontends.values())
}

impl HeldTable {
    pub fn new(mode: &str) -> HeldTable {
        HeldTable {
            mode: mode.into(),
            frontends: BTreeMap::new(),
        }
    }

    pub fn insert(&mut self, frontend: HeldFrontend) {
        self.frontends.insert(frontend.key, frontend);
    }
}

/// Test support: a table with one frontend of every shape a reader must
/// tell apart, and the node network to plan it under.
#[cfg(test)]
pub(crate) fn sample_table() -> (crate::model::ServiceTable, crate::model::NodeNetwork) {
    use crate::model::{
        FrontendPolicy, Protocol, ServiceTable,
        test_support::{backend, frontend, ip, key, key_proto},
    };
    let mut table = ServiceTable::new();
    let two = [backend("10.1.0.1", 8080), backend("10.1.0.2", 8080)];
    table.insert(key("10.96.0.10", 80), frontend("ns", "web", &two));
    let mut sticky = frontend("ns", "sticky", &two[..1]);
    sticky.policy.affinity_timeout_secs = Some(600);
    table.insert(key_proto("10.96.0.11", 53, Protocol::Udp), sticky);
    table.insert(key("10.96.0.12", 80), frontend("ns", "empty", &[]));
    let mut node_port = frontend("ns", "web", &two);
    node_port.kind = FrontendKind::NodePort;
    table.insert(key("0.0.0.0", 30080), node_port);
    let mut lb = frontend("ns", "lb", &two);
    lb.kind = FrontendKind::LoadBalancer;
    lb.policy.source_ranges = vec!["203.0.113.0/24".parse().unwrap()];
    table.insert(key("192.0.2.10", 443), lb);
    // Local policy, no endpoint on this node: dropped for outside
    // clients, the cluster-wide backends for pods and the node.
    let mut local = frontend("ns", "local", &[]);
    local.kind = FrontendKind::ExternalIp;
    local.cluster_backends = vec![backend("10.1.0.3", 8080)];
    local.policy = FrontendPolicy {
        local_only: true,
        ..FrontendPolicy::default()
    };
    table.insert(key("192.0.2.11", 80), local);
    table.insert(
        key("fd00::10", 80),
        frontend("ns", "six", &[backend("fd01::1", 8080)]),
    );
    let network = crate::model::NodeNetwork {
        nodeport_addresses: [ip("192.168.0.1")].into(),
        snat_v4: Some("192.168.0.1".parse().unwrap()),
        snat_v6: None,
        cluster_cidrs: vec!["10.1.0.0/16".parse().unwrap()],
        masquerade_all: false,
        service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
    };
    (table, network)
}

/// Test support: asserts that `held` holds exactly the plans of `table`
/// under `network`.
#[cfg(test)]
pub(crate) fn assert_holds(
    held: &HeldTable,
    table: &crate::model::ServiceTable,
    network: &crate::model::NodeNetwork,
) {
    for (key, frontend) in table.iter() {
        let expected = HeldFrontend::of_plan(&crate::model::plan::plan(key, frontend, network));
        let Some(found) = held.frontends.get(key) else {
            panic!("{key:?} is not held: {held:#?}");
        };
        assert_eq!(
            found.differences(&expected),
            Vec::<String>::new(),
            "{key:?}"
        );
    }
    let extra: Vec<_> = held
        .frontends
        .keys()
        .filter(|k| table.get(k).is_none())
        .collect();
    assert!(extra.is_empty(), "held but not in the table: {extra:?}");
}
