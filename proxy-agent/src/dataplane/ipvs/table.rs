//! The ipvs mode's companion nftables table, `inet proxy-agent-ipvs`: what
//! IPVS cannot do, in kube-proxy's IPVS layout but with nftables sets
//! where kube-proxy uses ipsets (one atomic `nft -f` transaction per write,
//! and no ipset tool on the node):
//! - the masquerade mark on new connections that need it (kube-proxy's
//!   `KUBE-CLUSTER-IP`/`KUBE-NODE-PORT-*` sets with `KUBE-MARK-MASQ`), and
//!   masquerade of marked packets and of hairpin connections
//!   (`KUBE-LOOP-BACK`) at postrouting;
//! - drops before IPVS sees the packet: `loadBalancerSourceRanges`
//!   (`KUBE-LOAD-BALANCER-SOURCE-*`), the Local policy without a local
//!   endpoint, and new connections to a VIP on a port that is no service's
//!   (`KUBE-IPVS-FILTER`, rejected).
//!
//! The filter rules (chain `filtering`) run at `input` priority 0, before
//! IPVS's own input hook (`NF_IP_PRI_NAT_SRC - 2`), and at `output`
//! priority -150 for the node's own connections, before IPVS schedules
//! them at its output hook (`NF_IP_PRI_NAT_DST + 1`), after which they
//! never reach input; the mark is set at `prerouting`/`output`
//! before IPVS schedules, and read at `postrouting` after its NAT (with
//! `net.ipv4.vs.conntrack=1` the connection keeps its conntrack entry).
use std::fmt::Write;

use ipnet::IpNet;

use super::render::{Element, suffix};
use crate::dataplane::netfilter::{Family, MASQUERADE_MARK, NodeNetwork};

pub const TABLE: &str = "proxy-agent-ipvs";

/// The sets of one family, with their nft types; the family's address type
/// is `{a}`.
const SETS: &[(&str, &str)] = &[
    ("vips", "{a}"),
    ("services", "{a} . inet_proto . inet_service"),
    ("masq", "{a} . inet_proto . inet_service"),
    ("masq-outside", "{a} . inet_proto . inet_service"),
    ("nodeport-masq", "inet_proto . inet_service"),
    ("nodeport-masq-outside", "inet_proto . inet_service"),
    ("drop", "{a} . inet_proto . inet_service"),
    ("nodeport-drop", "inet_proto . inet_service"),
    ("local-fallback", "{a} . inet_proto . inet_service"),
    ("nodeport-local-fallback", "inet_proto . inet_service"),
    ("reject", "{a} . inet_proto . inet_service"),
    ("nodeport-reject", "inet_proto . inet_service"),
    ("restricted", "{a} . inet_proto . inet_service"),
    ("allowed", "{a} . inet_proto . inet_service . {a}"),
    ("hairpin", "{a} . {a} . inet_service"),
];

/// A refused connection: a TCP reset, else ICMP port unreachable.
const REJECTS: [&str; 2] = [
    "meta l4proto tcp reject with tcp reset",
    "meta l4proto != tcp reject",
];

/// The names of every set, both families.
pub fn set_names() -> Vec<String> {
    [Family::V4, Family::V6]
        .iter()
        .flat_map(|f| {
            SETS.iter()
                .map(move |(name, _)| format!("{name}{}", suffix(*f)))
        })
        .collect()
}

fn family_words(family: Family) -> (&'static str, &'static str, &'static str) {
    // (address type, match keyword, nfproto)
    match family {
        Family::V4 => ("ipv4_addr", "ip", "ipv4"),
        Family::V6 => ("ipv6_addr", "ip6", "ipv6"),
    }
}

/// The whole table but the sets' elements: tables and sets are added (an
/// add of what exists changes nothing), chains flushed and written again.
/// The cluster CIDRs of `network` are in the marking and filtering rules.
pub fn base(network: &NodeNetwork) -> String {
    let mut out = format!("add table inet {TABLE}\n");
    for family in [Family::V4, Family::V6] {
        let (addr, _, _) = family_words(family);
        for (name, ty) in SETS {
            let ty = ty.replace("{a}", addr);
            let flags = if *name == "allowed" {
                " flags interval;"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "add set inet {TABLE} {name}{} {{ type {ty};{flags} }}",
                suffix(family)
            );
        }
    }
    for (chain, hook) in [
        ("marking", None),
        // dstnat, dstnat, srcnat, filter (nft takes the names in some
        // hooks only).
        ("prerouting", Some("type nat hook prerouting priority -100")),
        ("output", Some("type nat hook output priority -100")),
        (
            "postrouting",
            Some("type nat hook postrouting priority 100"),
        ),
        ("filtering", None),
        ("input", Some("type filter hook input priority 0")),
        // Before IPVS's own output hook (dstnat + 1), which schedules the
        // node's own connections there and never shows them to input.
        (
            "output-filter",
            Some("type filter hook output priority -150"),
        ),
    ] {
        match hook {
            Some(hook) => {
                let _ = writeln!(
                    out,
                    "add chain inet {TABLE} {chain} {{ {hook}; policy accept; }}"
                );
            }
            None => {
                let _ = writeln!(out, "add chain inet {TABLE} {chain}");
            }
        }
        let _ = writeln!(out, "flush chain inet {TABLE} {chain}");
    }
    out.push_str(&chain_rules(network));
    out
}

/// The rules of the chains; marking and filtering depend on the cluster CIDRs.
fn chain_rules(network: &NodeNetwork) -> String {
    // On the connection, not the packet: IPVS transmits the scheduled
    // packet itself, and the connection's conntrack entry is what reaches
    // postrouting for sure.
    let mark = format!("ct mark set ct mark | {MASQUERADE_MARK:#x}");
    let mut out = String::new();
    let mut rule = |chain: &str, text: String| {
        let _ = writeln!(out, "add rule inet {TABLE} {chain} {text}");
    };
    rule("prerouting", "jump marking".into());
    rule("output", "jump marking".into());
    rule("input", "jump filtering".into());
    rule("output-filter", "jump filtering".into());
    for family in [Family::V4, Family::V6] {
        let s = suffix(family);
        let (_, ip, nfproto) = family_words(family);
        let l4 = "meta l4proto . th dport";
        // The family's cluster CIDR: its sources are pods.
        let cluster_cidr = network
            .cluster_cidrs
            .iter()
            .find(|c| Family::of_net(c) == family)
            .map(IpNet::trunc);
        rule("marking", format!("{ip} daddr . {l4} @masq{s} {mark}"));
        rule(
            "marking",
            format!("fib daddr type local meta nfproto {nfproto} {l4} @nodeport-masq{s} {mark}"),
        );
        // Off-cluster clients: sources outside the family's cluster CIDR.
        // Without one, kube-proxy masquerades none of them.
        if let Some(cidr) = cluster_cidr {
            rule(
                "marking",
                format!("{ip} saddr != {cidr} {ip} daddr . {l4} @masq-outside{s} {mark}"),
            );
            rule(
                "marking",
                format!(
                    "{ip} saddr != {cidr} fib daddr type local meta nfproto {nfproto} {l4} @nodeport-masq-outside{s} {mark}"
                ),
            );
        }
        // The node's own connections to an external Local frontend served
        // cluster-wide (kube-proxy's "LOCAL traffic for external
        // destinations"): masqueraded, so the remote endpoint's reply
        // comes back through this node.
        let own = format!("{ip} daddr . {l4} @local-fallback{s}");
        let own_node_port =
            format!("fib daddr type local meta nfproto {nfproto} {l4} @nodeport-local-fallback{s}");
        for matched in [&own, &own_node_port] {
            rule("marking", format!("fib saddr type local {matched} {mark}"));
        }
        rule(
            "postrouting",
            format!("{ip} saddr . {ip} daddr . th dport @hairpin{s} masquerade"),
        );
        rule(
            "filtering",
            format!("ct state new {ip} daddr . {l4} @drop{s} drop"),
        );
        rule(
            "filtering",
            format!(
                "ct state new fib daddr type local meta nfproto {nfproto} {l4} @nodeport-drop{s} drop"
            ),
        );
        // The same frontends admit the pods (the cluster CIDR) and the
        // node only: an external client must find a local endpoint.
        let pods = cluster_cidr
            .map(|cidr| format!("{ip} saddr != {cidr} "))
            .unwrap_or_default();
        for matched in [&own, &own_node_port] {
            rule(
                "filtering",
                format!("ct state new {pods}fib saddr type != local {matched} drop"),
            );
        }
        rule(
            "filtering",
            format!(
                "ct state new {ip} daddr . {l4} @restricted{s} {ip} daddr . {l4} . {ip} saddr != @allowed{s} drop"
            ),
        );
        // No endpoint at all: refused, as kube-proxy's other modes do
        // (IPVS alone would time a UDP client out).
        for (matched, set) in [
            (format!("{ip} daddr . {l4}"), format!("@reject{s}")),
            (
                format!("fib daddr type local meta nfproto {nfproto} {l4}"),
                format!("@nodeport-reject{s}"),
            ),
        ] {
            for verdict in REJECTS {
                rule(
                    "filtering",
                    format!("ct state new {matched} {set} {verdict}"),
                );
            }
        }
        // kube-proxy's KUBE-IPVS-FILTER: a VIP answers only on its ports.
        for verdict in REJECTS {
            rule(
                "filtering",
                format!(
                    "ct state new {ip} daddr @vips{s} {ip} daddr . {l4} != @services{s} {verdict}"
                ),
            );
        }
    }
    let clear = !MASQUERADE_MARK;
    rule(
        "postrouting",
        format!(
            "ct mark & {MASQUERADE_MARK:#x} == {MASQUERADE_MARK:#x} ct mark set ct mark & {clear:#x} masquerade"
        ),
    );
    out
}

/// The chains whose rules name the cluster CIDRs (marking, filtering),
/// written again for a new network, in one transaction.
pub fn network_chains(network: &NodeNetwork) -> String {
    let mut out = String::new();
    let rules = chain_rules(network);
    for chain in ["marking", "filtering"] {
        let _ = writeln!(out, "flush chain inet {TABLE} {chain}");
        let prefix = format!("add rule inet {TABLE} {chain} ");
        for line in rules.lines().filter(|l| l.starts_with(&prefix)) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// `add element`/`delete element` commands, one per element.
pub fn elements(verb: &str, elements: &[&Element]) -> String {
    let mut out = String::new();
    for element in elements {
        let _ = writeln!(
            out,
            "{verb} element inet {TABLE} {} {{ {} }}",
            element.set_name(),
            element.value
        );
    }
    out
}

/// Empties every set (a reconcile's rewrite adds every element again).
pub fn flush_sets() -> String {
    set_names()
        .iter()
        .map(|name| format!("flush set inet {TABLE} {name}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_base_marks_off_cluster_clients_of_the_cluster_cidr_only() {
        let network = NodeNetwork {
            cluster_cidrs: vec!["10.244.0.0/16".parse().unwrap()],
            ..NodeNetwork::default()
        };
        let text = base(&network);
        assert!(text.contains("add set inet proxy-agent-ipvs allowed4 { type ipv4_addr . inet_proto . inet_service . ipv4_addr; flags interval; }"));
        assert!(text.contains("add rule inet proxy-agent-ipvs marking ip saddr != 10.244.0.0/16 ip daddr . meta l4proto . th dport @masq-outside4 ct mark set ct mark | 0x4000"));
        assert!(
            !text.contains("@masq-outside6"),
            "no IPv6 cluster CIDR: {text}"
        );
        assert!(
            text.contains("ct mark & 0x4000 == 0x4000 ct mark set ct mark & 0xffffbfff masquerade")
        );
        let chains = network_chains(&network);
        assert!(chains.starts_with("flush chain inet proxy-agent-ipvs marking\n"));
        assert!(chains.contains("flush chain inet proxy-agent-ipvs filtering\n"));
        let marking = chains
            .lines()
            .take_while(|l| !l.contains("filtering"))
            .count();
        assert_eq!(marking, 1 + 4 * 2 + 2);
        assert!(chains.contains("add rule inet proxy-agent-ipvs filtering ct state new ip saddr != 10.244.0.0/16 fib saddr type != local ip daddr . meta l4proto . th dport @local-fallback4 drop"));
        assert!(chains.contains("add rule inet proxy-agent-ipvs filtering ct state new fib saddr type != local ip6 daddr . meta l4proto . th dport @local-fallback6 drop"));
    }

    fn nft(text: &str) {
        let out = crate::dataplane::netfilter::run_with_input("nft", &["-f", "-"], text.as_bytes())
            .expect("running nft");
        assert!(
            out.status.success(),
            "{}\n{text}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The kernel takes the table, every kind of element, and each later
    /// change (in a private network namespace; needs root and nft).
    #[test]
    fn nft_takes_the_table_and_its_changes() {
        crate::dataplane::in_private_netns(|| {
            let mut network = NodeNetwork {
                cluster_cidrs: vec![
                    "10.244.0.0/16".parse().unwrap(),
                    "fd00:244::/56".parse().unwrap(),
                ],
                ..NodeNetwork::default()
            };
            nft(&base(&network));
            // Twice: a start over an earlier run's table.
            nft(&base(&network));
            let element = |set, family, value: &str| Element {
                set,
                family,
                value: value.to_string(),
            };
            let all = [
                element("vips", Family::V4, "10.96.0.10"),
                element("services", Family::V4, "10.96.0.10 . tcp . 80"),
                element("masq", Family::V4, "10.96.0.10 . udp . 53"),
                element("masq-outside", Family::V4, "10.96.0.10 . tcp . 80"),
                element("nodeport-masq", Family::V4, "tcp . 30080"),
                element("nodeport-masq-outside", Family::V6, "sctp . 30081"),
                element("drop", Family::V6, "fd00::10 . tcp . 443"),
                element("nodeport-drop", Family::V4, "udp . 30082"),
                element("local-fallback", Family::V4, "203.0.113.8 . tcp . 80"),
                element("nodeport-local-fallback", Family::V6, "tcp . 30084"),
                element("reject", Family::V4, "10.96.0.11 . udp . 53"),
                element("nodeport-reject", Family::V6, "tcp . 30083"),
                element("restricted", Family::V4, "203.0.113.7 . tcp . 443"),
                element(
                    "allowed",
                    Family::V4,
                    "203.0.113.7 . tcp . 443 . 198.51.100.0/24",
                ),
                element("hairpin", Family::V6, "fd00:244::5 . fd00:244::5 . 8080"),
            ];
            let refs: Vec<&Element> = all.iter().collect();
            nft(&elements("add", &refs));
            nft(&elements("delete", &refs[..3]));
            network.cluster_cidrs.pop();
            nft(&network_chains(&network));
            nft(&flush_sets());
        });
    }
}
