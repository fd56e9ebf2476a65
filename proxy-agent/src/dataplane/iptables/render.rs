//! What a frontend is in iptables: its [`FrontendPlan`] spelled as the nat
//! chains of its own and its rules in the top-level chains.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;

use super::names::{
    EXTERNAL_SERVICES_CHAIN, FIREWALL_CHAIN, MARK_MASQ_CHAIN, NODEPORTS_CHAIN, SERVICES_CHAIN,
    ext_chain, fw_chain, sep_chain, svc_chain, svl_chain,
};
use crate::{
    dataplane::netfilter::{self, Action, Family, FrontendPlan, Masquerade, View, proto_name},
    model::{Backend, FrontendKey, Protocol},
};

/// `ip/32`, `ip/128` for IPv6.
pub(super) fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(ip) => format!("{ip}/32"),
        IpAddr::V6(ip) => format!("{ip}/128"),
    }
}

fn net(n: &IpNet) -> String {
    format!("{}/{}", n.network(), n.prefix_len())
}

/// `-m comment --comment "<text>"`, with what the restore parser cannot
/// take inside quotes left out (names are DNS labels; this is a guard).
fn comment(text: &str) -> String {
    let clean: String = text
        .chars()
        .filter(|c| !matches!(c, '"' | '\\' | '\n' | '\r'))
        .take(250)
        .collect();
    format!("-m comment --comment \"{clean}\"")
}

/// `-p proto -m proto --dport port`.
fn dport(key: &FrontendKey) -> String {
    let p = proto_name(key.protocol);
    format!("-p {p} -m {p} --dport {}", key.port)
}

/// kube-proxy's spelling of the cascade's probabilities.
fn probability(n: usize) -> String {
    format!("{:.10}", 1.0 / n as f64)
}

/// The rules of one frontend in the top-level chains, by (table, chain), in
/// order.
pub(super) type TopRules = BTreeMap<(&'static str, &'static str), Vec<String>>;

/// What is programmed for one frontend.
pub(super) type Programmed = netfilter::Programmed<Rendered>;

/// What a frontend is in iptables: its nat chains, and its rules in the
/// top-level chains.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rendered {
    /// Chain name and its rules (the text after `-A <chain> `), in order.
    pub(super) chains: BTreeMap<String, Vec<String>>,
    /// The rule of `KUBE-SERVICES` (or of `KUBE-NODEPORTS`, for a NodePort)
    /// that enters the frontend; `None` when nothing is translated.
    pub(super) entry: Option<String>,
    /// Its rules in the top-level chains: the entry, and the filter rules.
    pub(super) top: TopRules,
}

/// What `plan` is in iptables; `external`: the frontend is reached from
/// outside the cluster (its kind is not ClusterIP); `nodeport_addresses`:
/// the node's, which a NodePort's filter rules name.
pub(super) fn rules_of(
    plan: &FrontendPlan,
    comment: &str,
    external: bool,
    nodeport_addresses: &BTreeSet<IpAddr>,
) -> Rendered {
    let mut rendered = render(plan, comment, external);
    if let Some(entry) = &rendered.entry {
        let chain = if plan.is_node_port() {
            NODEPORTS_CHAIN
        } else {
            SERVICES_CHAIN
        };
        rendered
            .top
            .entry(("nat", chain))
            .or_default()
            .push(entry.clone());
    }
    for (chain, rule) in filter_rules(plan, comment, nodeport_addresses, external) {
        rendered
            .top
            .entry(("filter", chain))
            .or_default()
            .push(rule);
    }
    rendered
}

fn balances(view: &View) -> bool {
    matches!(view.action, Action::Balance(_))
}

/// The nat chains of `plan` and the rule that enters them; `external`: the
/// frontend is reached from outside the cluster (its kind is not
/// ClusterIP) and enters through `KUBE-EXT-…`.
fn render(plan: &FrontendPlan, comment_text: &str, external: bool) -> Rendered {
    let mut out = Rendered::default();
    let c = comment(comment_text);
    let key = &plan.key;
    // The pods' and the node's views choose among the same cluster-wide
    // endpoints, in `KUBE-SVC-…`; the main view then has `KUBE-SVL-…`.
    let cluster_wide = plan
        .cluster_view
        .as_ref()
        .map(|(_, v)| v)
        .or(plan.node_view.as_ref());
    let cluster_balances = cluster_wide.is_some_and(balances);
    if !balances(&plan.view) && !cluster_balances {
        // Nothing is translated: the filter table refuses.
        return out;
    }
    // The endpoint choice of each view that balances.
    let main_choice = if cluster_wide.is_some() {
        svl_chain(key)
    } else {
        svc_chain(key)
    };
    if let Action::Balance(backends) = &plan.view.action {
        // A ClusterIP marks in its choice chain, an external frontend in
        // its KUBE-EXT chain.
        let masquerade = (!external).then_some(&plan.view.masquerade);
        let rules = choice_rules(plan, backends, masquerade, &c);
        out.chains.insert(main_choice.clone(), rules);
    }
    if let Some(View {
        action: Action::Balance(backends),
        ..
    }) = cluster_wide
    {
        // Marked (or not) in KUBE-EXT, by the view that jumps here.
        let rules = choice_rules(plan, backends, None, &c);
        out.chains.insert(svc_chain(key), rules);
    }
    for b in plan.backends() {
        out.chains
            .insert(sep_chain(key, &b), sep_rules(plan, &b, &c));
    }
    out.entry = Some(if external {
        external_chains(plan, comment_text, &main_choice, &mut out.chains)
    } else {
        format!("{c} -d {} {} -j {main_choice}", host(key.ip), dport(key))
    });
    out
}

/// The chains an external frontend is entered through, added to `chains`:
/// `KUBE-EXT-…` (the pods' short-circuit, the node's own connections to
/// every endpoint, masqueraded, the masquerade mark, the main view's choice
/// `main_choice`) and, under source ranges, `KUBE-FW-…`.
/// Returns the rule that enters them.
fn external_chains(
    plan: &FrontendPlan,
    comment_text: &str,
    main_choice: &str,
    chains: &mut BTreeMap<String, Vec<String>>,
) -> String {
    let c = comment(comment_text);
    let key = &plan.key;
    let ext = ext_chain(key);
    let mut rules = Vec::new();
    if let Some((cidr, view)) = &plan.cluster_view {
        let target = if balances(view) {
            svc_chain(key)
        } else {
            // The pods' view refuses: the filter table does it for them.
            "RETURN".to_string()
        };
        rules.push(format!("{c} -s {} -j {target}", net(cidr)));
    }
    if let Some(view) = &plan.node_view {
        // kube-proxy's "LOCAL traffic for external destinations".
        let local = format!("{c} -m addrtype --src-type LOCAL");
        if balances(view) {
            rules.extend(mark_rule(&view.masquerade, &local));
            rules.push(format!("{local} -j {}", svc_chain(key)));
        } else {
            rules.push(format!("{local} -j RETURN"));
        }
    }
    if balances(&plan.view) {
        rules.extend(mark_rule(&plan.view.masquerade, &c));
        rules.push(format!("{c} -j {main_choice}"));
    }
    chains.insert(ext.clone(), rules);
    let mut target = ext;
    if let Some(ranges) = &plan.source_ranges {
        let fw = fw_chain(key);
        let rules = ranges
            .iter()
            .map(|r| format!("{c} -s {} -j {target}", net(r)))
            .chain(std::iter::once(comment(&format!(
                "other traffic to {comment_text} will be dropped by {FIREWALL_CHAIN}"
            ))))
            .collect();
        chains.insert(fw.clone(), rules);
        target = fw;
    }
    if plan.is_node_port() {
        format!("{c} {} -j {target}", dport(key))
    } else {
        format!("{c} -d {} {} -j {target}", host(key.ip), dport(key))
    }
}

/// The masquerade mark rule of a view, if it marks.
fn mark_rule(masquerade: &Masquerade, c: &str) -> Option<String> {
    match masquerade {
        Masquerade::Never => None,
        Masquerade::Always => Some(format!("{c} -j {MARK_MASQ_CHAIN}")),
        Masquerade::SourceOutside(cidr) => {
            Some(format!("{c} ! -s {} -j {MARK_MASQ_CHAIN}", net(cidr)))
        }
    }
}

/// A choice chain: masquerade mark (ClusterIP), affinity checks, cascade.
fn choice_rules(
    plan: &FrontendPlan,
    backends: &[Backend],
    masquerade: Option<&Masquerade>,
    c: &str,
) -> Vec<String> {
    let mut rules = Vec::new();
    if let Some(m) = masquerade {
        rules.extend(mark_rule(m, c));
    }
    let seps: Vec<String> = backends.iter().map(|b| sep_chain(&plan.key, b)).collect();
    if let Some(timeout) = plan.affinity_timeout_secs {
        for sep in &seps {
            rules.push(format!(
                "{c} -m recent --name {sep} --rcheck --seconds {timeout} --reap --rsource -j {sep}"
            ));
        }
    }
    let n = seps.len();
    for (i, sep) in seps.iter().enumerate() {
        if i + 1 < n {
            rules.push(format!(
                "{c} -m statistic --mode random --probability {} -j {sep}",
                probability(n - i)
            ));
        } else {
            rules.push(format!("{c} -j {sep}"));
        }
    }
    rules
}

/// An endpoint chain: hairpin, then DNAT (remembering the client under
/// affinity).
fn sep_rules(plan: &FrontendPlan, backend: &Backend, c: &str) -> Vec<String> {
    let sep = sep_chain(&plan.key, backend);
    let p = proto_name(plan.key.protocol);
    let affinity = if plan.affinity_timeout_secs.is_some() {
        format!(" -m recent --name {sep} --set --rsource")
    } else {
        String::new()
    };
    vec![
        format!("{c} -s {} -j {MARK_MASQ_CHAIN}", host(backend.ip)),
        format!("{c} -p {p}{affinity} -m {p} -j DNAT --to-destination {backend}"),
    ]
}

/// Which filter chain a refusal goes to, and its rules: (chain, rule).
fn filter_rules(
    plan: &FrontendPlan,
    comment_text: &str,
    nodeport_addresses: &BTreeSet<IpAddr>,
    external: bool,
) -> Vec<(&'static str, String)> {
    let c = comment(comment_text);
    let key = &plan.key;
    let destinations: Vec<String> = if plan.is_node_port() {
        nodeport_addresses
            .iter()
            .filter(|ip| Family::of(**ip) == plan.family)
            .map(|ip| format!("-d {} {}", host(*ip), dport(key)))
            .collect()
    } else {
        vec![format!("-d {} {}", host(key.ip), dport(key))]
    };
    let verdict = |action: &Action| -> Option<String> {
        match action {
            Action::Balance(_) => None,
            Action::Reject if key.protocol == Protocol::Tcp => {
                Some("-j REJECT --reject-with tcp-reset".to_string())
            }
            Action::Reject => Some("-j REJECT".to_string()),
            Action::Drop => Some("-j DROP".to_string()),
        }
    };
    let chain_of = |action: &Action| -> &'static str {
        match action {
            Action::Reject if !plan.is_node_port() => SERVICES_CHAIN,
            Action::Drop if !external => SERVICES_CHAIN,
            _ => EXTERNAL_SERVICES_CHAIN,
        }
    };
    let refusals = refusals(plan);
    let mut out = match &plan.source_ranges {
        Some(ranges) => {
            let refuses = refusals
                .iter()
                .any(|(_, a)| !matches!(a, Action::Balance(_)));
            firewall_rules(key, ranges, comment_text, &destinations, refuses)
        }
        None => Vec::new(),
    };
    for (src, action) in refusals {
        let Some(verdict) = verdict(action) else {
            continue;
        };
        for d in &destinations {
            out.push((chain_of(action), format!("{c}{src} {d} {verdict}")));
        }
    }
    out
}

/// (source match, action) per view of `plan`.
fn refusals(plan: &FrontendPlan) -> Vec<(String, &Action)> {
    match &plan.cluster_view {
        Some((_, view)) if view.action == plan.view.action => {
            vec![(String::new(), &plan.view.action)]
        }
        Some((cidr, view)) => vec![
            (format!(" -s {}", net(cidr)), &view.action),
            (format!(" ! -s {}", net(cidr)), &plan.view.action),
        ],
        None => vec![(String::new(), &plan.view.action)],
    }
}

/// The rules of `KUBE-PROXY-FIREWALL` for a frontend with source ranges:
/// sources outside the ranges are dropped whatever the views do. Admitted
/// sources that reach this point were not translated because their view
/// refuses (`refuses`): they go on to that refusal. (A RETURN only skips
/// rules of other frontends, which cannot match the same destination.)
fn firewall_rules(
    key: &FrontendKey,
    ranges: &[IpNet],
    comment_text: &str,
    destinations: &[String],
    refuses: bool,
) -> Vec<(&'static str, String)> {
    let c = comment(comment_text);
    let mut out = Vec::new();
    for d in destinations {
        if refuses {
            for r in ranges {
                out.push((FIREWALL_CHAIN, format!("{c} -s {} {d} -j RETURN", net(r))));
            }
        }
        out.push((
            FIREWALL_CHAIN,
            format!(
                "{} {d} -j DROP",
                comment(&format!(
                    "{comment_text} traffic not accepted by {}",
                    fw_chain(key)
                ))
            ),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{super::test_support::*, *};
    use crate::model::{
        FrontendKind,
        test_support::{backend, ip, key, key_proto},
    };

    #[test]
    fn cluster_ip_with_three_endpoints_cascades_with_kube_proxys_probabilities() {
        let dp = dataplane();
        let k = key("198.19.0.10", 80);
        let bs = [
            backend("198.18.1.10", 8080),
            backend("198.18.1.11", 8080),
            backend("198.18.1.12", 8080),
        ];
        let text = restore_text(
            &dp,
            &added(&[(k, external(FrontendKind::ClusterIp, &bs))]),
            Family::V4,
        );
        let svc = svc_chain(&k);
        let seps: Vec<String> = bs.iter().map(|b| sep_chain(&k, b)).collect();
        assert_eq!(
            rules(&text, "nat", &svc),
            vec![
                format!("{C} ! -s 198.18.1.0/24 -j KUBE-MARK-MASQ"),
                format!(
                    "{C} -m statistic --mode random --probability 0.3333333333 -j {}",
                    seps[0]
                ),
                format!(
                    "{C} -m statistic --mode random --probability 0.5000000000 -j {}",
                    seps[1]
                ),
                format!("{C} -j {}", seps[2]),
            ]
        );
        assert_eq!(
            rules(&text, "nat", &seps[1]),
            vec![
                format!("{C} -s 198.18.1.11/32 -j KUBE-MARK-MASQ"),
                format!("{C} -p tcp -m tcp -j DNAT --to-destination 198.18.1.11:8080"),
            ]
        );
        assert_eq!(
            rules(&text, "nat", SERVICES_CHAIN),
            vec![
                format!("{C} -d 198.19.0.10/32 -p tcp -m tcp --dport 80 -j {svc}"),
                "-m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -d 198.18.0.1/32 -j KUBE-NODEPORTS".to_string(),
            ]
        );
        // Nothing refuses: the filter chains are declared (rewritten) empty.
        for chain in [SERVICES_CHAIN, EXTERNAL_SERVICES_CHAIN, FIREWALL_CHAIN] {
            assert!(rules(&text, "filter", chain).is_empty(), "{chain}: {text}");
        }
        assert!(
            text.starts_with("*nat\n")
                && text.contains("COMMIT\n*filter\n")
                && text.ends_with("COMMIT\n")
        );
        assert!(!text.contains("-X "), "{text}");
    }

    #[test]
    fn session_affinity_checks_every_endpoint_before_the_cascade() {
        let dp = dataplane();
        let k = key_proto("198.19.0.10", 53, Protocol::Udp);
        let bs = [backend("198.18.1.10", 5353), backend("198.18.1.11", 5353)];
        let mut f = external(FrontendKind::ClusterIp, &bs);
        f.policy.affinity_timeout_secs = Some(10800);
        let text = restore_text(&dp, &added(&[(k, f)]), Family::V4);
        let s0 = sep_chain(&k, &bs[0]);
        let s1 = sep_chain(&k, &bs[1]);
        assert_eq!(
            rules(&text, "nat", &svc_chain(&k))[1..],
            [
                format!(
                    "{C} -m recent --name {s0} --rcheck --seconds 10800 --reap --rsource -j {s0}"
                ),
                format!(
                    "{C} -m recent --name {s1} --rcheck --seconds 10800 --reap --rsource -j {s1}"
                ),
                format!("{C} -m statistic --mode random --probability 0.5000000000 -j {s0}"),
                format!("{C} -j {s1}"),
            ]
        );
        assert_eq!(
            rules(&text, "nat", &s1)[1],
            format!(
                "{C} -p udp -m recent --name {s1} --set --rsource -m udp -j DNAT --to-destination 198.18.1.11:5353"
            )
        );
    }

    #[test]
    fn local_policy_short_circuits_pods_and_drops_others_without_a_local_endpoint() {
        let dp = dataplane();
        let k = key("198.19.2.10", 80);
        let remote = [backend("198.18.1.224", 8080)];
        let text = restore_text(
            &dp,
            &added(&[(k, local(FrontendKind::LoadBalancer, &[], &remote))]),
            Family::V4,
        );
        let ext = ext_chain(&k);
        // Pods go to every endpoint, the node's own connections too,
        // masqueraded; the others are not translated...
        let from_node = format!("{C} -m addrtype --src-type LOCAL");
        let short_circuits = vec![
            format!("{C} -s 198.18.1.0/24 -j {}", svc_chain(&k)),
            format!("{from_node} -j KUBE-MARK-MASQ"),
            format!("{from_node} -j {}", svc_chain(&k)),
        ];
        assert_eq!(rules(&text, "nat", &ext), short_circuits);
        assert!(!declared(&text).contains(svl_chain(&k).as_str()));
        assert_eq!(rules(&text, "nat", &svc_chain(&k)).len(), 1, "{text}");
        assert_eq!(
            rules(&text, "nat", SERVICES_CHAIN)[0],
            format!("{C} -d 198.19.2.10/32 -p tcp -m tcp --dport 80 -j {ext}")
        );
        // ...and dropped by the filter table (non-pods only).
        assert_eq!(
            rules(&text, "filter", EXTERNAL_SERVICES_CHAIN),
            vec![format!(
                "{C} ! -s 198.18.1.0/24 -d 198.19.2.10/32 -p tcp -m tcp --dport 80 -j DROP"
            )]
        );
        // With a local endpoint: the others use it, unmasqueraded.
        let here = [backend("198.18.1.10", 8080)];
        let all = [here[0], remote[0]];
        let text = restore_text(
            &dp,
            &added(&[(k, local(FrontendKind::LoadBalancer, &here, &all))]),
            Family::V4,
        );
        let mut with_local = short_circuits;
        with_local.push(format!("{C} -j {}", svl_chain(&k)));
        assert_eq!(rules(&text, "nat", &ext), with_local);
        assert_eq!(
            rules(&text, "nat", &svl_chain(&k)),
            vec![format!("{C} -j {}", sep_chain(&k, &here[0]))]
        );
        assert_eq!(rules(&text, "nat", &svc_chain(&k)).len(), 2);
        assert!(rules(&text, "filter", EXTERNAL_SERVICES_CHAIN).is_empty());
    }

    #[test]
    fn frontends_without_endpoints_are_not_translated_and_rejected_in_filter() {
        let dp = dataplane();
        let tcp = key("198.19.0.10", 80);
        let udp = key_proto("198.19.0.10", 53, Protocol::Udp);
        let np = key("0.0.0.0", 30080);
        let ext = key("198.19.1.10", 80);
        let text = restore_text(
            &dp,
            &added(&[
                (tcp, external(FrontendKind::ClusterIp, &[])),
                (udp, external(FrontendKind::ClusterIp, &[])),
                (np, external(FrontendKind::NodePort, &[])),
                (ext, external(FrontendKind::ExternalIp, &[])),
            ]),
            Family::V4,
        );
        assert_eq!(
            declared(&text),
            [
                SERVICES_CHAIN,
                NODEPORTS_CHAIN,
                EXTERNAL_SERVICES_CHAIN,
                FIREWALL_CHAIN
            ]
            .into_iter()
            .collect()
        );
        assert!(rules(&text, "nat", NODEPORTS_CHAIN).is_empty());
        assert_eq!(
            rules(&text, "nat", SERVICES_CHAIN).len(),
            1,
            "only the NodePort jump: {text}"
        );
        assert_eq!(
            rules(&text, "filter", SERVICES_CHAIN),
            vec![
                format!("{C} -d 198.19.0.10/32 -p udp -m udp --dport 53 -j REJECT"),
                format!(
                    "{C} -d 198.19.0.10/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with tcp-reset"
                ),
                format!(
                    "{C} -d 198.19.1.10/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with tcp-reset"
                ),
            ]
        );
        assert_eq!(
            rules(&text, "filter", EXTERNAL_SERVICES_CHAIN),
            vec![format!(
                "{C} -d 198.18.0.1/32 -p tcp -m tcp --dport 30080 -j REJECT --reject-with tcp-reset"
            )]
        );
    }

    #[test]
    fn internal_local_policy_without_a_local_endpoint_drops() {
        let dp = dataplane();
        let k = key("198.19.0.10", 80);
        let mut f = external(FrontendKind::ClusterIp, &[]);
        f.policy.local_only = true;
        f.cluster_backends = vec![backend("198.18.1.224", 8080)];
        let text = restore_text(&dp, &added(&[(k, f)]), Family::V4);
        assert_eq!(
            rules(&text, "filter", SERVICES_CHAIN),
            vec![format!(
                "{C} -d 198.19.0.10/32 -p tcp -m tcp --dport 80 -j DROP"
            )]
        );
        assert!(!declared(&text).contains(svc_chain(&k).as_str()));
    }

    #[test]
    fn source_ranges_admit_through_the_fw_chain_and_the_firewall_drops_the_rest() {
        let dp = dataplane();
        let k = key("198.19.2.10", 80);
        let mut f = external(FrontendKind::LoadBalancer, &[backend("198.18.1.10", 8080)]);
        f.policy.source_ranges = vec![
            "203.0.113.0/24".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        let text = restore_text(&dp, &added(&[(k, f.clone())]), Family::V4);
        let (fw, ext) = (fw_chain(&k), ext_chain(&k));
        assert_eq!(
            rules(&text, "nat", SERVICES_CHAIN)[0],
            format!("{C} -d 198.19.2.10/32 -p tcp -m tcp --dport 80 -j {fw}")
        );
        assert_eq!(
            rules(&text, "nat", &fw),
            vec![
                format!("{C} -s 203.0.113.0/24 -j {ext}"),
                "-m comment --comment \"other traffic to ns/web:http will be dropped by KUBE-PROXY-FIREWALL\"".to_string(),
            ]
        );
        assert_eq!(
            rules(&text, "nat", &ext),
            vec![
                // Every client of an external Cluster frontend, pods too.
                format!("{C} -j KUBE-MARK-MASQ"),
                format!("{C} -j {}", svc_chain(&k))
            ]
        );
        assert_eq!(
            rules(&text, "filter", FIREWALL_CHAIN),
            vec![format!(
                "-m comment --comment \"ns/web:http traffic not accepted by {fw}\" -d 198.19.2.10/32 -p tcp -m tcp --dport 80 -j DROP"
            )]
        );
        // Without endpoints, admitted sources are rejected, the others dropped.
        f.backends.clear();
        let text = restore_text(&dp, &added(&[(k, f)]), Family::V4);
        assert_eq!(
            rules(&text, "filter", FIREWALL_CHAIN),
            vec![
                format!(
                    "{C} -s 203.0.113.0/24 -d 198.19.2.10/32 -p tcp -m tcp --dport 80 -j RETURN"
                ),
                format!(
                    "-m comment --comment \"ns/web:http traffic not accepted by {fw}\" -d 198.19.2.10/32 -p tcp -m tcp --dport 80 -j DROP"
                ),
            ]
        );
        assert_eq!(
            rules(&text, "filter", SERVICES_CHAIN),
            vec![format!(
                "{C} -d 198.19.2.10/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with tcp-reset"
            )]
        );
    }

    #[test]
    fn node_ports_enter_through_kube_nodeports_on_the_nodeport_addresses_only() {
        let mut dp = dataplane();
        dp.network.nodeport_addresses.insert(ip("127.0.0.1"));
        let k = key_proto("0.0.0.0", 30053, Protocol::Udp);
        let b = backend("198.18.1.10", 5353);
        let text = restore_text(
            &dp,
            &added(&[(k, external(FrontendKind::NodePort, &[b]))]),
            Family::V4,
        );
        let ext = ext_chain(&k);
        assert_eq!(
            rules(&text, "nat", NODEPORTS_CHAIN),
            vec![format!("{C} -p udp -m udp --dport 30053 -j {ext}")]
        );
        assert_eq!(
            rules(&text, "nat", &ext),
            vec![
                // Every client, loopback included: no rule of its own.
                format!("{C} -j KUBE-MARK-MASQ"),
                format!("{C} -j {}", svc_chain(&k)),
            ]
        );
        let jumps: Vec<&str> = rules(&text, "nat", SERVICES_CHAIN);
        assert_eq!(jumps.len(), 2);
        assert!(
            jumps[0].ends_with("-d 127.0.0.1/32 -j KUBE-NODEPORTS")
                && jumps[1].ends_with("-d 198.18.0.1/32 -j KUBE-NODEPORTS")
        );
        assert!(!text.contains("addrtype"), "{text}");
    }

    #[test]
    fn ipv6_frontends_render_with_bracketed_destinations() {
        let dp = dataplane();
        let k = key("2001:2:0:ff::10", 80);
        let b = backend("2001:2::1:a", 8080);
        let np = key("::", 30080);
        let diff = added(&[
            (k, external(FrontendKind::ClusterIp, &[b])),
            (np, external(FrontendKind::NodePort, &[])),
        ]);
        let text = restore_text(&dp, &diff, Family::V6);
        assert_eq!(
            rules(&text, "nat", &sep_chain(&k, &b)),
            vec![
                format!("{C} -s 2001:2::1:a/128 -j KUBE-MARK-MASQ"),
                format!("{C} -p tcp -m tcp -j DNAT --to-destination [2001:2::1:a]:8080"),
            ]
        );
        assert_eq!(
            rules(&text, "nat", &svc_chain(&k)),
            vec![
                format!("{C} ! -s 2001:2::1:0/112 -j KUBE-MARK-MASQ"),
                format!("{C} -j {}", sep_chain(&k, &b))
            ]
        );
        assert!(
            rules(&text, "nat", SERVICES_CHAIN)[1].ends_with("-d 2001:2::1/128 -j KUBE-NODEPORTS")
        );
        assert_eq!(
            rules(&text, "filter", EXTERNAL_SERVICES_CHAIN),
            vec![format!(
                "{C} -d 2001:2::1/128 -p tcp -m tcp --dport 30080 -j REJECT --reject-with tcp-reset"
            )]
        );
        // IPv4 is another restore: nothing of these in it.
        assert!(!restore_text(&dp, &diff, Family::V4).contains("2001:"));
    }
}
