//! What the netfilter dataplanes (nftables, iptables) program for a
//! frontend, decided once for both: which views a frontend has, which
//! clients each view masquerades, and what it does without backends. The
//! backends only render a [`FrontendPlan`] in their own syntax, so the two
//! modes cannot drift apart in meaning; the eBPF datapath decides the same
//! things per packet (see `needs_masquerade` in proxy-ebpf).
use std::{
    collections::BTreeMap,
    io::Write,
    net::IpAddr,
    process::{Command, Output, Stdio},
};

use ipnet::IpNet;

use super::{
    NodeNetwork,
    conntrack::{ConntrackError, StaleFlow, delete_stale_udp_flows},
};
use crate::model::{Backend, Frontend, FrontendKey, FrontendKind, Protocol, TableDiff};

/// The packet mark bit that asks the postrouting hook to masquerade
/// (kube-proxy's default `masqueradeBit: 14`).
pub const MASQUERADE_MARK: u32 = 1 << 14;

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

/// Everything a netfilter dataplane writes for one frontend.
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
    pub view: View,
    /// `sessionAffinity: ClientIP` timeout in seconds.
    pub affinity_timeout_secs: Option<u32>,
    /// Sources in 127.0.0.0/8 are masqueraded (a node process reaching a
    /// NodePort on localhost, which only leaves the node with another source).
    pub masquerade_loopback: bool,
}

impl FrontendPlan {
    /// Every backend any view of the plan may choose, sorted, without duplicates.
    pub fn backends(&self) -> Vec<Backend> {
        let mut all: Vec<Backend> = Vec::new();
        for view in std::iter::once(&self.view).chain(self.cluster_view.as_ref().map(|(_, v)| v)) {
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

/// How both netfilter syntaxes spell a protocol.
pub fn proto_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Sctp => "sctp",
    }
}

/// The comment on a frontend's rules: `namespace/name[:port-name]`.
pub fn comment_of(frontend: &Frontend) -> String {
    let port = if frontend.port_name.is_empty() {
        String::new()
    } else {
        format!(":{}", frontend.port_name)
    };
    format!("{}{port}", frontend.service)
}

/// Plans `frontend` under `network`, as the eBPF datapath treats it.
pub fn plan(key: &FrontendKey, frontend: &Frontend, network: &NodeNetwork) -> FrontendPlan {
    let family = Family::of(key.ip);
    let external = frontend.kind.is_external();
    let policy = &frontend.policy;
    let cluster_cidr = network
        .cluster_cidrs
        .iter()
        .find(|c| Family::of_net(c) == family)
        .copied();
    // Masquerade of a view whose clients may come from anywhere.
    let masquerade_by_source = |external: bool| {
        if network.masquerade_all {
            return Masquerade::Always;
        }
        match (external, cluster_cidr) {
            (true, None) => Masquerade::Always,
            (_, Some(cidr)) => Masquerade::SourceOutside(cidr),
            (false, None) => Masquerade::Never,
        }
    };
    let action_of = |backends: &[Backend], drop_if_empty: bool| {
        if !backends.is_empty() {
            Action::Balance(backends.to_vec())
        } else if drop_if_empty {
            Action::Drop
        } else {
            Action::Reject
        }
    };
    let local = policy.local_only;
    let view = View {
        action: action_of(
            &frontend.backends,
            local && !frontend.cluster_backends.is_empty(),
        ),
        masquerade: if external && local {
            // The point of the Local policy: the client's address is kept.
            Masquerade::Never
        } else {
            masquerade_by_source(external)
        },
    };
    let cluster_view = match cluster_cidr {
        Some(cidr) if external && local => Some((
            cidr,
            View {
                action: action_of(&frontend.cluster_backends, false),
                masquerade: if network.masquerade_all {
                    Masquerade::Always
                } else {
                    Masquerade::Never
                },
            },
        )),
        _ => None,
    };
    let source_ranges = (frontend.kind == FrontendKind::LoadBalancer
        && !policy.source_ranges.is_empty())
    .then(|| {
        policy
            .source_ranges
            .iter()
            .filter(|r| Family::of_net(r) == family)
            .map(IpNet::trunc)
            .collect()
    });
    FrontendPlan {
        key: *key,
        family,
        source_ranges,
        cluster_view,
        view,
        affinity_timeout_secs: policy.affinity_timeout_secs,
        masquerade_loopback: frontend.kind == FrontendKind::NodePort && family == Family::V4,
    }
}

/// A NodePort on 127.0.0.1 (asked for with `--nodeport-addresses`) is
/// DNATed to a pod with its loopback source, which the kernel routes out of
/// the node only with `route_localnet` (kube-proxy sets it the same way).
/// IPv6 has no counterpart: `::1` NodePorts are served by the eBPF mode
/// only.
pub fn allow_localhost_nodeports(network: &NodeNetwork) {
    const SYSCTL: &str = "/proc/sys/net/ipv4/conf/all/route_localnet";
    if !network
        .nodeport_addresses
        .iter()
        .any(|ip| matches!(ip, IpAddr::V4(v4) if v4.is_loopback()))
    {
        return;
    }
    if std::fs::read_to_string(SYSCTL).is_ok_and(|v| v.trim() == "1") {
        return;
    }
    match std::fs::write(SYSCTL, "1") {
        Ok(()) => tracing::info!(sysctl = SYSCTL, "set to 1 for NodePorts on 127.0.0.0/8"),
        Err(e) => {
            tracing::warn!(sysctl = SYSCTL, error = %e, "cannot set; NodePorts on 127.0.0.0/8 will not work")
        }
    }
}

/// The keys `diff` touches (added, changed, removed, in that order), and
/// what `program` makes of the frontends it keeps.
pub fn wanted_of<P>(
    diff: &TableDiff,
    program: impl Fn(&FrontendKey, &Frontend) -> P,
) -> (Vec<FrontendKey>, BTreeMap<FrontendKey, P>) {
    let mut wanted = BTreeMap::new();
    let mut keys = Vec::new();
    for (key, fe) in &diff.added {
        wanted.insert(*key, program(key, fe));
        keys.push(*key);
    }
    for change in &diff.changed {
        wanted.insert(change.key, program(&change.key, &change.new));
        keys.push(change.key);
    }
    for (key, _) in &diff.removed {
        keys.push(*key);
    }
    (keys, wanted)
}

/// Runs `program args` with `input` on its stdin, stdout discarded and
/// stderr kept for the caller's error. A failure to write `input` is not
/// reported by itself: a program that refuses its input may close stdin
/// early, and its exit status and stderr say why.
pub fn run_with_input(program: &str, args: &[&str], input: &[u8]) -> std::io::Result<Output> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(input);
    }
    child.wait_with_output()
}

/// The UDP (frontend, backend) pairs `diff` takes away: their connection
/// tracking entries must go, or a client that keeps sending from one socket
/// stays on a backend that no longer exists. A change of a frontend's
/// source ranges takes every backend away, so that clients the new ranges
/// leave out lose their flows too.
/// The frontend's address is unspecified for a NodePort (any node address).
pub fn stale_udp_flows(diff: &TableDiff) -> Vec<StaleFlow> {
    let mut stale = Vec::new();
    let mut add = |key: &FrontendKey, backends: &mut dyn Iterator<Item = &Backend>| {
        if key.protocol != Protocol::Udp {
            return;
        }
        for b in backends {
            stale.push(StaleFlow {
                vip: key.ip,
                port: key.port,
                backend: b.ip,
                backend_port: b.port,
            });
        }
    };
    for (key, old) in &diff.removed {
        add(key, &mut old.backends.iter().chain(&old.cluster_backends));
    }
    for change in &diff.changed {
        // Narrowed source ranges must stop the UDP flows of clients now
        // outside them: their conntrack entries would keep them translated.
        let ranges_changed = change.old.policy.source_ranges != change.new.policy.source_ranges;
        let gone = |b: &&Backend| {
            ranges_changed
                || (!change.new.backends.contains(b) && !change.new.cluster_backends.contains(b))
        };
        add(
            &change.key,
            &mut change
                .old
                .backends
                .iter()
                .chain(&change.old.cluster_backends)
                .filter(gone),
        );
    }
    stale.sort_unstable();
    stale.dedup();
    stale
}

/// Deletes the kernel's connection-tracking entries of the UDP flows
/// [`stale_udp_flows`] names, so their next datagram picks a live backend.
/// Returns how many were deleted.
pub fn forget_stale_udp_flows(diff: &TableDiff) -> Result<usize, ConntrackError> {
    let flows = stale_udp_flows(diff);
    if flows.is_empty() {
        return Ok(0);
    }
    delete_stale_udp_flows(&flows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::{backend, frontend, ip, key};

    fn network(cidrs: &[&str], masquerade_all: bool) -> NodeNetwork {
        NodeNetwork {
            cluster_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            masquerade_all,
            ..NodeNetwork::default()
        }
    }

    fn external(
        kind: FrontendKind,
        local: bool,
        backends: &[Backend],
        all: &[Backend],
    ) -> Frontend {
        let mut f = frontend("ns", "a", backends);
        f.kind = kind;
        f.policy.local_only = local;
        if local {
            f.cluster_backends = all.to_vec();
        }
        f
    }

    #[test]
    fn cluster_ip_masquerades_only_sources_outside_the_cluster_cidr() {
        let k = key("10.96.0.1", 80);
        let f = frontend("ns", "a", &[backend("10.1.0.1", 8080)]);
        let p = plan(&k, &f, &network(&["10.1.0.0/16"], false));
        assert_eq!(
            p.view.masquerade,
            Masquerade::SourceOutside("10.1.0.0/16".parse().unwrap())
        );
        assert_eq!(
            plan(&k, &f, &network(&[], false)).view.masquerade,
            Masquerade::Never
        );
        assert_eq!(
            plan(&k, &f, &network(&[], true)).view.masquerade,
            Masquerade::Always
        );
        assert!(p.cluster_view.is_none() && p.source_ranges.is_none());
        assert_eq!(
            p.view.action,
            Action::Balance(vec![backend("10.1.0.1", 8080)])
        );
    }

    #[test]
    fn external_cluster_policy_masquerades_unless_the_client_is_a_pod() {
        let k = key("0.0.0.0", 30080);
        let f = external(
            FrontendKind::NodePort,
            false,
            &[backend("10.1.0.1", 80)],
            &[],
        );
        assert_eq!(
            plan(&k, &f, &network(&[], false)).view.masquerade,
            Masquerade::Always
        );
        assert_eq!(
            plan(&k, &f, &network(&["10.1.0.0/16"], false))
                .view
                .masquerade,
            Masquerade::SourceOutside("10.1.0.0/16".parse().unwrap())
        );
        assert!(plan(&k, &f, &network(&[], false)).masquerade_loopback);
        assert!(plan(&k, &f, &network(&[], false)).is_node_port());
    }

    #[test]
    fn external_local_policy_keeps_sources_and_short_circuits_pods() {
        let k = key("192.0.2.1", 80);
        let all = [backend("10.1.0.1", 80), backend("10.1.0.2", 80)];
        let f = external(FrontendKind::ExternalIp, true, &[], &all);
        let p = plan(&k, &f, &network(&["10.1.0.0/16", "fd00::/64"], false));
        assert_eq!(p.view.action, Action::Drop);
        assert_eq!(p.view.masquerade, Masquerade::Never);
        let (cidr, view) = p.cluster_view.clone().unwrap();
        assert_eq!(cidr, "10.1.0.0/16".parse::<IpNet>().unwrap());
        assert_eq!(view.action, Action::Balance(all.to_vec()));
        assert_eq!(view.masquerade, Masquerade::Never);
        assert_eq!(p.backends(), all.to_vec());
        // Without any endpoint at all: reject, in both views.
        let none = external(FrontendKind::ExternalIp, true, &[], &[]);
        let p = plan(&k, &none, &network(&["10.1.0.0/16"], true));
        assert_eq!(p.view.action, Action::Reject);
        assert_eq!(
            p.cluster_view.unwrap().1,
            View {
                action: Action::Reject,
                masquerade: Masquerade::Always
            }
        );
        // Without a cluster CIDR nobody is known to be a pod.
        assert!(plan(&k, &f, &network(&[], false)).cluster_view.is_none());
    }

    #[test]
    fn internal_local_policy_drops_when_only_other_nodes_serve() {
        let k = key("10.96.0.1", 80);
        let mut f = frontend("ns", "a", &[]);
        f.policy.local_only = true;
        f.cluster_backends = vec![backend("10.1.0.9", 80)];
        let p = plan(&k, &f, &network(&["10.1.0.0/16"], false));
        assert_eq!(p.view.action, Action::Drop);
        assert!(p.cluster_view.is_none());
    }

    #[test]
    fn source_ranges_keep_the_frontends_family_and_never_widen() {
        let k = key("192.0.2.1", 80);
        let mut f = external(
            FrontendKind::LoadBalancer,
            false,
            &[backend("10.1.0.1", 80)],
            &[],
        );
        f.policy.source_ranges = vec!["fd00::/64".parse().unwrap()];
        assert_eq!(
            plan(&k, &f, &network(&[], false)).source_ranges,
            Some(vec![])
        );
        f.policy
            .source_ranges
            .push("198.51.100.7/24".parse().unwrap());
        assert_eq!(
            plan(&k, &f, &network(&[], false)).source_ranges,
            Some(vec!["198.51.100.0/24".parse().unwrap()])
        );
    }

    #[test]
    fn stale_udp_flows_are_the_udp_backends_that_left() {
        use crate::model::test_support::key_proto;
        let k = key_proto("10.96.0.10", 53, Protocol::Udp);
        let old = frontend(
            "ns",
            "dns",
            &[backend("10.1.0.1", 53), backend("10.1.0.2", 53)],
        );
        let new = frontend("ns", "dns", &[backend("10.1.0.2", 53)]);
        let diff = TableDiff {
            changed: vec![crate::model::FrontendChange {
                key: k,
                old: old.clone(),
                new,
            }],
            removed: vec![(key("10.96.0.11", 80), old)],
            ..TableDiff::default()
        };
        assert_eq!(
            stale_udp_flows(&diff),
            vec![StaleFlow {
                vip: k.ip,
                port: 53,
                backend: ip("10.1.0.1"),
                backend_port: 53
            }]
        );
        // Narrowed source ranges: every backend's flows go.
        let mut narrowed = frontend("ns", "dns", &[backend("10.1.0.2", 53)]);
        narrowed.policy.source_ranges = vec!["198.51.100.0/24".parse().unwrap()];
        let diff = TableDiff {
            changed: vec![crate::model::FrontendChange {
                key: k,
                old: frontend("ns", "dns", &[backend("10.1.0.2", 53)]),
                new: narrowed,
            }],
            ..TableDiff::default()
        };
        assert_eq!(
            stale_udp_flows(&diff),
            vec![StaleFlow {
                vip: k.ip,
                port: 53,
                backend: ip("10.1.0.2"),
                backend_port: 53
            }]
        );
    }
}
