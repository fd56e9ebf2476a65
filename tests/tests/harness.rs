//! Checks of the harness alone, without an agent: IPv6 on every link, the
//! second node and its routed pods, pods as clients, SCTP where the kernel
//! has it, and the source addresses the pod servers report (see
//! `proxy_tests::netns` for the addresses).
//!
//! Each test builds its own topology and tears it down on drop, also when it
//! fails. They take the suite's lock and need root; without it they print
//! why and pass.
use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use proxy_tests::{
    netns::{
        CLIENT_IP, CLIENT_IP6, CLUSTER_CIDR, CLUSTER_CIDR_V4, CLUSTER_CIDR_V6, ClientReport,
        IpFamily, NODE_IP, NODE_IP6, NODE2_IP, NODE2_IP6, POD_SCTP_PORT, POD_TCP_PORT,
        POD_UDP_PORT, Pod, PodNetwork, Protocol, ToolPaths, Topology,
    },
    serial, skipped,
};

fn tools() -> ToolPaths {
    ToolPaths::built(
        env!("CARGO_BIN_EXE_pod-server"),
        env!("CARGO_BIN_EXE_pod-client"),
    )
}

/// Exchanges per check: enough to see a flaky path, few enough to stay fast.
const COUNT: u64 = 5;

/// Every one of `COUNT` exchanges was answered by `pod`, which saw them all
/// come from `source`.
fn check_answered(what: &str, report: &ClientReport, pod: &Pod, source: IpAddr) {
    assert_eq!(report.count(&pod.name), COUNT, "{what}: {report:?}");
    assert_eq!(
        report.sources(),
        BTreeSet::from([source]),
        "{what}: the server saw other sources: {report:?}"
    );
}

/// `count` exchanges of `protocol` from namespace `ns` to `ip:port`.
fn exchange(
    t: &Topology,
    ns: &str,
    protocol: Protocol,
    ip: IpAddr,
    port: u16,
) -> anyhow::Result<ClientReport> {
    let options = t.client_options(protocol, ip, port, COUNT);
    t.run_client_in(ns, &options)
}

/// TCP and UDP from namespace `ns` (whose address of the family is
/// `source`) to `pod`'s address of `family`.
fn check_both(t: &Topology, ns: &str, source: IpAddr, pod: &Pod, family: IpFamily) {
    let target = pod.ip_of(family);
    for (protocol, port) in [(Protocol::Tcp, POD_TCP_PORT), (Protocol::Udp, POD_UDP_PORT)] {
        let what = format!("{protocol} from {ns} to {} ({target})", pod.name);
        let report = exchange(t, ns, protocol, target, port).unwrap();
        check_answered(&what, &report, pod, source);
    }
}

fn assert_namespaces_removed(namespaces: &[String]) {
    let left: Vec<&String> = namespaces
        .iter()
        .filter(|ns| Path::new("/run/netns").join(ns).exists())
        .collect();
    assert!(left.is_empty(), "namespaces left behind: {left:?}");
}

/// Whether `ip` is inside `cidr` (`addr/len`).
fn contains(cidr: &str, ip: IpAddr) -> bool {
    let (net, len) = cidr.split_once('/').unwrap();
    let (net, len): (IpAddr, u32) = (net.parse().unwrap(), len.parse().unwrap());
    match (net, ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => {
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) => {
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
}

/// IPv6 works on every routed link: the client reaches each pod, and a pod
/// reaches another pod, over both families, and each server sees the true
/// source address (no NAT in the bare topology).
#[test]
fn harness_ipv6_client_to_pod_and_pod_to_pod() {
    let _serial = serial();
    if skipped("harness_ipv6_client_to_pod_and_pod_to_pod") {
        return;
    }
    let t = Topology::builder()
        .backends(2)
        .tools(tools())
        .build()
        .expect("building a topology");
    let client = t.client_ns();
    for pod in t.pods() {
        check_both(&t, client, IpAddr::V4(CLIENT_IP), pod, IpFamily::V4);
        check_both(&t, client, IpAddr::V6(CLIENT_IP6), pod, IpFamily::V6);
    }
    let (from, to) = (t.pod(0), t.pod(1));
    for family in [IpFamily::V4, IpFamily::V6] {
        check_both(&t, from.ns(), from.ip_of(family), to, family);
    }
    // A pod reaches itself through its own address (the hairpin scenarios'
    // baseline without a VIP).
    let own = exchange(
        &t,
        from.ns(),
        Protocol::Tcp,
        from.ip_of(IpFamily::V6),
        POD_TCP_PORT,
    )
    .unwrap();
    check_answered("pod-0 to itself", &own, from, from.ip_of(IpFamily::V6));
}

/// The second node's pods: reachable from the external client and from the
/// node's pods (routed via the second node), and they reach the node's pods
/// back; their endpoints name the second node; the cluster CIDR holds every
/// pod and neither node nor the client; all namespaces go on drop.
#[test]
fn harness_second_node_pods_are_routed() {
    let _serial = serial();
    if skipped("harness_second_node_pods_are_routed") {
        return;
    }
    let t = Topology::builder()
        .backends(1)
        .second_node(2)
        .tools(tools())
        .build()
        .expect("building a topology with a second node");
    let node2_ns = t.node2_ns().expect("a second node").to_string();
    assert_eq!(t.remote_pods().len(), 2);
    assert_eq!(t.remote_pod(1).name, "node2-pod-1");

    let local = t.pod(0);
    for remote in t.remote_pods() {
        for family in [IpFamily::V4, IpFamily::V6] {
            let client_ip = match family {
                IpFamily::V4 => IpAddr::V4(CLIENT_IP),
                IpFamily::V6 => IpAddr::V6(CLIENT_IP6),
            };
            check_both(&t, t.client_ns(), client_ip, remote, family);
            check_both(&t, local.ns(), local.ip_of(family), remote, family);
        }
    }
    let remote = t.remote_pod(0);
    for family in [IpFamily::V4, IpFamily::V6] {
        check_both(&t, remote.ns(), remote.ip_of(family), local, family);
    }
    // The second node itself reaches the node's pods with its own address.
    check_both(&t, &node2_ns, IpAddr::V6(NODE2_IP6), local, IpFamily::V6);

    // Endpoints carry each pod's node.
    let endpoints = t.slice_endpoints(IpFamily::V6, &[0], &[1]);
    assert_eq!(endpoints[0].node.as_deref(), Some(t.node_name()));
    assert_eq!(endpoints[1].node.as_deref(), t.node2_name());
    assert_ne!(t.node2_name(), Some(t.node_name()));
    assert_eq!(endpoints[1].ip, IpAddr::V6(t.remote_pod(1).ip6));
    assert_eq!(
        t.node2_spec().unwrap().internal_ips,
        [IpAddr::V4(NODE2_IP), IpAddr::V6(NODE2_IP6)]
    );

    let cidrs: Vec<&str> = CLUSTER_CIDR.split(',').collect();
    assert_eq!(cidrs, [CLUSTER_CIDR_V4, CLUSTER_CIDR_V6]);
    let in_cluster = |ip: IpAddr| cidrs.iter().any(|cidr| contains(cidr, ip));
    for pod in t.all_pods() {
        for family in [IpFamily::V4, IpFamily::V6] {
            assert!(in_cluster(pod.ip_of(family)), "{} outside", pod.name);
        }
    }
    for outside in [
        IpAddr::V4(NODE_IP),
        IpAddr::V6(NODE_IP6),
        IpAddr::V4(NODE2_IP),
        IpAddr::V6(NODE2_IP6),
        IpAddr::V4(CLIENT_IP),
        IpAddr::V6(CLIENT_IP6),
    ] {
        assert!(!in_cluster(outside), "{outside} in the cluster CIDR");
    }

    let namespaces: Vec<String> = [t.node_ns(), t.client_ns(), &node2_ns]
        .into_iter()
        .map(str::to_string)
        .chain(t.all_pods().map(|pod| pod.ns().to_string()))
        .collect();
    drop(t);
    assert_namespaces_removed(&namespaces);
}

/// The bridge pod network carries IPv6 too, and bridge pods reach the second
/// node's pods although those are inside the bridge's prefix.
#[test]
fn harness_bridge_pods_have_ipv6_and_reach_the_second_node() {
    let _serial = serial();
    if skipped("harness_bridge_pods_have_ipv6_and_reach_the_second_node") {
        return;
    }
    let t = Topology::builder()
        .backends(2)
        .pod_network(PodNetwork::Bridge { hairpin: false })
        .second_node(1)
        .tools(tools())
        .build()
        .expect("building a bridge topology with a second node");
    let (pod, other, remote) = (t.pod(0), t.pod(1), t.remote_pod(0));
    check_both(&t, t.client_ns(), IpAddr::V6(CLIENT_IP6), pod, IpFamily::V6);
    for family in [IpFamily::V4, IpFamily::V6] {
        check_both(&t, pod.ns(), pod.ip_of(family), other, family);
        check_both(&t, pod.ns(), pod.ip_of(family), remote, family);
        check_both(&t, remote.ns(), remote.ip_of(family), pod, family);
    }
}

/// Pods answer SCTP on both families with the client's address, where the
/// kernel has SCTP; elsewhere the topology says why not.
#[test]
fn harness_sctp_answers_with_the_client_address() {
    let test = "harness_sctp_answers_with_the_client_address";
    let _serial = serial();
    if skipped(test) {
        return;
    }
    if let Some(reason) = proxy_tests::client::sctp_skip_reason() {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "{test}: skipped: {reason}");
        return;
    }
    let t = Topology::builder()
        .backends(1)
        .second_node(1)
        .tools(tools())
        .build()
        .expect("building a topology");
    assert_eq!(t.sctp_skip_reason(), None);
    for pod in [t.pod(0), t.remote_pod(0)] {
        for (family, client_ip) in [
            (IpFamily::V4, IpAddr::V4(CLIENT_IP)),
            (IpFamily::V6, IpAddr::V6(CLIENT_IP6)),
        ] {
            let target = SocketAddr::new(pod.ip_of(family), POD_SCTP_PORT);
            let report = t.client_sctp(target.ip(), target.port(), COUNT).unwrap();
            check_answered(&format!("SCTP to {target}"), &report, pod, client_ip);
        }
    }
}
