//! The plan of one frontend: every mode-neutral decision about how a
//! frontend treats its clients, made once for every dataplane. Which views
//! a frontend has (the pods' short-circuit of an external `Local` service),
//! which clients each view masquerades, what a view without backends does
//! (reject or drop), and which sources `loadBalancerSourceRanges` admit.
//! The netfilter modes render a [`FrontendPlan`] as rules; the eBPF mode
//! writes it into its service entries, whose flags the datapath follows
//! per packet. The decisions are kube-proxy's (pkg/proxy/iptables and
//! nftables `syncProxyRules`), cited where they are taken.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::IpNet;

use super::{Backend, Frontend, FrontendKey, FrontendKind};

/// What the plans need to know about the node itself, beyond the service
/// table: where NodePorts are served, which address masqueraded traffic
/// takes, and which sources count as inside the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeNetwork {
    /// The node's addresses NodePorts are served on (after
    /// `--nodeport-addresses`; loopback only when explicitly asked for).
    pub nodeport_addresses: BTreeSet<IpAddr>,
    /// The source address of masqueraded traffic, per family (the node's
    /// primary address); `None` when the node has none of that family.
    pub snat_v4: Option<Ipv4Addr>,
    pub snat_v6: Option<Ipv6Addr>,
    /// `--cluster-cidr`: at most one per family. Sources inside are pods.
    pub cluster_cidrs: Vec<IpNet>,
    /// `--masquerade-all`: masquerade every service connection.
    pub masquerade_all: bool,
    /// The ranges ClusterIPs are allocated from (the cluster's
    /// ServiceCIDRs): a new connection to an address inside them that no
    /// frontend holds is dropped, as kube-proxy's nftables mode does.
    pub service_cidrs: Vec<IpNet>,
}

impl NodeNetwork {
    /// The node's primary address of `family` (kube-proxy's node IP).
    pub fn node_ip(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::V4 => self.snat_v4.map(IpAddr::V4),
            Family::V6 => self.snat_v6.map(IpAddr::V6),
        }
    }

    /// Whether going from `self` to `other` changes some frontend's plan,
    /// so that a dataplane must program every frontend again.
    pub fn changes_plans(&self, other: &NodeNetwork) -> bool {
        self.cluster_cidrs != other.cluster_cidrs
            || self.masquerade_all != other.masquerade_all
            || self.snat_v4 != other.snat_v4
            || self.snat_v6 != other.snat_v6
    }
}

/// IPv4 or IPv6: a frontend and its backends are of one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    pub fn of_net(net: &IpNet) -> Family {
        Family::of(net.addr())
    }
}

/// Which new connections of a view are masqueraded (besides hairpin, which
/// every endpoint handles itself: a client that is its own backend).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Masquerade {
    Never,
    Always,
    /// Clients whose source is outside this CIDR (the cluster's pods).
    SourceOutside(IpNet),
}

/// What a view does with a new connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Pick one of these backends at random (or the client's affine one).
    Balance(Vec<Backend>),
    /// No endpoint at all: refuse (TCP reset, ICMP port unreachable).
    Reject,
    /// Endpoints exist, none may serve this client (traffic policy Local
    /// without a local endpoint): drop silently, as kube-proxy does.
    Drop,
}

/// One set of backends and the rules around them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    pub action: Action,
    pub masquerade: Masquerade,
}

/// Everything a dataplane programs for one frontend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendPlan {
    pub key: FrontendKey,
    pub family: Family,
    /// `loadBalancerSourceRanges` of the frontend's family: other sources
    /// are dropped. `None`: any source. `Some(empty)`: every range was of
    /// the other family, so nobody of this one is admitted (a restriction
    /// is never widened).
    pub source_ranges: Option<Vec<IpNet>>,
    /// Clients inside this CIDR use `cluster_view` (kube-proxy's
    /// short-circuit of pod traffic to an external frontend whose policy is
    /// Local). Present only for such frontends when a cluster CIDR of the
    /// family is known.
    pub cluster_view: Option<(IpNet, View)>,
    /// Connections that start on the node itself (its processes, and
    /// whatever reaches an external frontend with a source address of the
    /// node) use this view when present: for an external frontend with the
    /// Local policy, the cluster-wide backends, masqueraded, as kube-proxy
    /// routes "LOCAL traffic for external destinations" (the frontend's
    /// address is local to the node, so the reply comes back anyway).
    pub node_view: Option<View>,
    pub view: View,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity_timeout_secs: Option<u32>,
}

impl FrontendPlan {
    /// Every backend any view of the plan may choose, sorted, without duplicates.
    pub fn backends(&self) -> Vec<Backend> {
        let mut all: Vec<Backend> = Vec::new();
        let others = self.cluster_view.as_ref().map(|(_, v)| v).into_iter();
        for view in std::iter::once(&self.view)
            .chain(others)
            .chain(&self.node_view)
        {
            if let Action::Balance(backends) = &view.action {
                all.extend(backends.iter().copied());
            }
        }
        all.sort_unstable();
        all.dedup();
        all
    }

    /// Whether traffic to this frontend is matched on the node's NodePort
    /// addresses rather than on its own address.
    pub fn is_node_port(&self) -> bool {
        self.key.ip.is_unspecified()
    }
}

/// Plans `frontend` under `network`.
pub fn plan(key: &FrontendKey, frontend: &Frontend, network: &NodeNetwork) -> FrontendPlan {
    let family = Family::of(key.ip);
    let external = frontend.kind.is_external();
    let local = frontend.policy.local_only;
    let cluster_cidr = network
        .cluster_cidrs
        .iter()
        .find(|c| Family::of_net(c) == family)
        .copied();
    let view = View {
        action: action_of(
            &frontend.backends,
            local && !frontend.cluster_backends.is_empty(),
        ),
        masquerade: masquerade_of(external, local, cluster_cidr, network.masquerade_all),
    };
    // kube-proxy's short-circuit: pods reaching an external Local frontend
    // go to the cluster-wide endpoints, as if they had gone out to the load
    // balancer and back, with their own address. Not even
    // `--masquerade-all` masquerades them: upstream's masquerade-all rule
    // matches the ClusterIP as destination, which this traffic does not have.
    let cluster_view = match cluster_cidr {
        Some(cidr) if external && local => Some((
            cidr,
            View {
                action: action_of(&frontend.cluster_backends, false),
                masquerade: Masquerade::Never,
            },
        )),
        _ => None,
    };
    let node_view = (external && local).then(|| View {
        action: action_of(&frontend.cluster_backends, false),
        masquerade: Masquerade::Always,
    });
    FrontendPlan {
        key: *key,
        family,
        source_ranges: source_ranges_of(key, frontend, network),
        cluster_view,
        node_view,
        view,
        affinity_timeout_secs: frontend.policy.affinity_timeout_secs,
    }
}

/// What a view with these backends does with a new connection.
fn action_of(backends: &[Backend], drop_if_empty: bool) -> Action {
    if !backends.is_empty() {
        Action::Balance(backends.to_vec())
    } else if drop_if_empty {
        Action::Drop
    } else {
        Action::Reject
    }
}

/// Which clients of a frontend's main view are masqueraded:
/// - external with the Local policy: none (the point of the policy is that
///   the backend sees the client's address);
/// - external with the Cluster policy: every client, pods included, since
///   the endpoint may be on another node and must answer through this one
///   (kube-proxy's "masquerade traffic for external destinations");
/// - a ClusterIP: everyone with `--masquerade-all`, else clients outside
///   the cluster CIDR when one is known (kube-proxy's "off-cluster traffic
///   to a service VIP"), else none.
fn masquerade_of(
    external: bool,
    local: bool,
    cluster_cidr: Option<IpNet>,
    masquerade_all: bool,
) -> Masquerade {
    match (external, local, cluster_cidr) {
        (true, true, _) => Masquerade::Never,
        (true, false, _) => Masquerade::Always,
        (false, ..) if masquerade_all => Masquerade::Always,
        (false, _, Some(cidr)) => Masquerade::SourceOutside(cidr),
        (false, _, None) => Masquerade::Never,
    }
}

/// The sources `loadBalancerSourceRanges` admit to a LoadBalancer frontend:
/// the ranges of its family, plus its own address when a range holds the
/// node's address (kube-proxy's `allowFromNode`: a node reaching a VIP it
/// holds locally loops back with the VIP as source, as do load balancers
/// that SNAT to their own address).
fn source_ranges_of(
    key: &FrontendKey,
    frontend: &Frontend,
    network: &NodeNetwork,
) -> Option<Vec<IpNet>> {
    let ranges = &frontend.policy.source_ranges;
    if frontend.kind != FrontendKind::LoadBalancer || ranges.is_empty() {
        return None;
    }
    let family = Family::of(key.ip);
    let mut admitted: Vec<IpNet> = ranges
        .iter()
        .filter(|r| Family::of_net(r) == family)
        .map(IpNet::trunc)
        .collect();
    let node_inside = network
        .node_ip(family)
        .is_some_and(|ip| admitted.iter().any(|r| r.contains(&ip)));
    if node_inside {
        admitted.push(IpNet::from(key.ip));
    }
    Some(admitted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::{backend, frontend, key};

    const CIDR: &str = "10.1.0.0/16";

    fn network(cidrs: &[&str], masquerade_all: bool) -> NodeNetwork {
        NodeNetwork {
            cluster_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            masquerade_all,
            snat_v4: Some("192.0.2.100".parse().unwrap()),
            ..NodeNetwork::default()
        }
    }

    fn outside() -> Masquerade {
        Masquerade::SourceOutside(CIDR.parse().unwrap())
    }

    /// One row: a frontend under a network, and the views its plan has.
    struct Row {
        what: &'static str,
        kind: FrontendKind,
        local: bool,
        /// Backends of the policy's view, and (for Local) cluster-wide ones.
        backends: &'static [usize],
        cluster: &'static [usize],
        cidrs: &'static [&'static str],
        masquerade_all: bool,
        view: (Action, Masquerade),
        cluster_view: Option<(Action, Masquerade)>,
    }

    const B: [(&str, u16); 2] = [("10.1.0.1", 80), ("10.1.0.2", 80)];

    fn backends(of: &[usize]) -> Vec<Backend> {
        of.iter().map(|i| backend(B[*i].0, B[*i].1)).collect()
    }

    fn balance(of: &[usize]) -> Action {
        Action::Balance(backends(of))
    }

    fn rows() -> Vec<Row> {
        use FrontendKind::*;
        use Masquerade::*;
        let row = |what, kind, local, backends, cluster, cidrs, masquerade_all| Row {
            what,
            kind,
            local,
            backends,
            cluster,
            cidrs,
            masquerade_all,
            view: (Action::Reject, Never),
            cluster_view: None,
        };
        let with = |mut r: Row, view, cluster_view| {
            r.view = view;
            r.cluster_view = cluster_view;
            r
        };
        vec![
            with(
                row(
                    "ClusterIP, CIDR known",
                    ClusterIp,
                    false,
                    &[0],
                    &[],
                    &[CIDR],
                    false,
                ),
                (balance(&[0]), outside()),
                None,
            ),
            with(
                row(
                    "ClusterIP, no CIDR",
                    ClusterIp,
                    false,
                    &[0],
                    &[],
                    &[],
                    false,
                ),
                (balance(&[0]), Never),
                None,
            ),
            with(
                row(
                    "ClusterIP, masquerade-all",
                    ClusterIp,
                    false,
                    &[0],
                    &[],
                    &[CIDR],
                    true,
                ),
                (balance(&[0]), Always),
                None,
            ),
            with(
                row(
                    "ClusterIP, no endpoint",
                    ClusterIp,
                    false,
                    &[],
                    &[],
                    &[CIDR],
                    false,
                ),
                (Action::Reject, outside()),
                None,
            ),
            with(
                row(
                    "ClusterIP Local, only remote",
                    ClusterIp,
                    true,
                    &[],
                    &[1],
                    &[CIDR],
                    false,
                ),
                (Action::Drop, outside()),
                None,
            ),
            // kube-proxy masquerades every client of an external Cluster
            // frontend, pods included: the endpoint may be on a third node.
            with(
                row(
                    "NodePort Cluster",
                    NodePort,
                    false,
                    &[0],
                    &[],
                    &[CIDR],
                    false,
                ),
                (balance(&[0]), Always),
                None,
            ),
            with(
                row(
                    "NodePort Cluster, no CIDR",
                    NodePort,
                    false,
                    &[0],
                    &[],
                    &[],
                    false,
                ),
                (balance(&[0]), Always),
                None,
            ),
            with(
                row(
                    "external IP Local, no local",
                    ExternalIp,
                    true,
                    &[],
                    &[0, 1],
                    &[CIDR],
                    false,
                ),
                (Action::Drop, Never),
                Some((balance(&[0, 1]), Never)),
            ),
            // Short-circuited pods keep their address, even with
            // masquerade-all (upstream's rule matches the ClusterIP only).
            with(
                row(
                    "LB Local, masquerade-all",
                    LoadBalancer,
                    true,
                    &[0],
                    &[0, 1],
                    &[CIDR],
                    true,
                ),
                (balance(&[0]), Never),
                Some((balance(&[0, 1]), Never)),
            ),
            with(
                row(
                    "external IP Local, none at all",
                    ExternalIp,
                    true,
                    &[],
                    &[],
                    &[CIDR],
                    true,
                ),
                (Action::Reject, Never),
                Some((Action::Reject, Never)),
            ),
            // Without a cluster CIDR nobody is known to be a pod.
            with(
                row(
                    "external IP Local, no CIDR",
                    ExternalIp,
                    true,
                    &[0],
                    &[0, 1],
                    &[],
                    false,
                ),
                (balance(&[0]), Never),
                None,
            ),
        ]
    }

    #[test]
    fn views_and_masquerade_follow_kube_proxy() {
        for r in rows() {
            let k = match r.kind {
                FrontendKind::NodePort => key("0.0.0.0", 30080),
                _ => key("10.96.0.1", 80),
            };
            let mut f = frontend("ns", "a", &backends(r.backends));
            f.kind = r.kind;
            f.policy.local_only = r.local;
            f.cluster_backends = backends(r.cluster);
            let p = plan(&k, &f, &network(r.cidrs, r.masquerade_all));
            let view = (p.view.action.clone(), p.view.masquerade.clone());
            assert_eq!(view, r.view, "{}: view", r.what);
            let cluster_view = p
                .cluster_view
                .as_ref()
                .map(|(_, v)| (v.action.clone(), v.masquerade.clone()));
            assert_eq!(cluster_view, r.cluster_view, "{}: cluster view", r.what);
            if let Some((cidr, _)) = &p.cluster_view {
                assert_eq!(cidr.to_string(), CIDR, "{}", r.what);
            }
            // The node's own connections to an external Local frontend
            // reach every endpoint, masqueraded, whatever the CIDR.
            let node_view = (r.kind.is_external() && r.local).then(|| View {
                action: if r.cluster.is_empty() {
                    Action::Reject
                } else {
                    balance(r.cluster)
                },
                masquerade: Masquerade::Always,
            });
            assert_eq!(p.node_view, node_view, "{}: node view", r.what);
            // Every backend a view may choose, once.
            let node = node_view
                .as_ref()
                .map(|v| (v.action.clone(), Masquerade::Always));
            let mut all: Vec<Backend> = [Some(&r.view), r.cluster_view.as_ref(), node.as_ref()]
                .into_iter()
                .flatten()
                .filter_map(|(action, _)| match action {
                    Action::Balance(b) => Some(b.clone()),
                    _ => None,
                })
                .flatten()
                .collect();
            all.sort_unstable();
            all.dedup();
            assert_eq!(p.backends(), all, "{}: backends", r.what);
            assert_eq!(p.is_node_port(), r.kind == FrontendKind::NodePort);
            assert_eq!(p.source_ranges, None, "{}", r.what);
        }
    }

    /// Rows: (the frontend's address, its ranges, the plan's ranges). The
    /// node's address is 192.0.2.100.
    #[test]
    fn source_ranges_keep_the_family_never_widen_and_admit_the_lb_from_the_node() {
        type Row<'a> = (&'a str, &'a [&'a str], Option<&'a [&'a str]>);
        let rows: [Row; 5] = [
            ("192.0.2.1", &[], None),
            ("192.0.2.1", &["fd00::/64"], Some(&[])),
            (
                "192.0.2.1",
                &["fd00::/64", "198.51.100.7/24"],
                Some(&["198.51.100.0/24"]),
            ),
            // A range holding the node's address also admits the LB IP
            // itself (kube-proxy's allowFromNode).
            (
                "192.0.2.1",
                &["192.0.2.0/24", "198.51.100.0/24"],
                Some(&["192.0.2.0/24", "198.51.100.0/24", "192.0.2.1/32"]),
            ),
            ("fd01::1", &["fd00::/64"], Some(&["fd00::/64"])),
        ];
        for (address, ranges, expected) in rows {
            let mut f = frontend("ns", "a", &[backend("10.1.0.1", 80)]);
            f.kind = FrontendKind::LoadBalancer;
            f.policy.source_ranges = ranges.iter().map(|r| r.parse().unwrap()).collect();
            let expected: Option<Vec<IpNet>> =
                expected.map(|e| e.iter().map(|r| r.parse().unwrap()).collect());
            let k = key(address, 80);
            let p = plan(&k, &f, &network(&[], false));
            assert_eq!(p.source_ranges, expected, "{address} {ranges:?}");
            // Other kinds of frontend are never restricted.
            f.kind = FrontendKind::ExternalIp;
            assert_eq!(plan(&k, &f, &network(&[], false)).source_ranges, None);
        }
    }

    #[test]
    fn plans_change_with_the_node_address_cidrs_and_masquerade_all() {
        let base = network(&[CIDR], false);
        let mut addresses = base.clone();
        addresses
            .nodeport_addresses
            .insert("192.0.2.100".parse().unwrap());
        assert!(!base.changes_plans(&addresses));
        for changed in [
            network(&[], false),
            network(&[CIDR], true),
            NodeNetwork {
                snat_v4: None,
                ..base.clone()
            },
        ] {
            assert!(base.changes_plans(&changed), "{changed:?}");
        }
    }
}
