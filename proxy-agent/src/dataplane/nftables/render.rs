//! What a frontend is in nftables: its [`FrontendPlan`] spelled as a chain
//! (two for an external frontend whose pods have a view of their own), its
//! affinity sets, and its element of a verdict map.
use ::nftables::{
    expr::{Expression, NamedExpression, NgMode, Numgen, SetItem, Verdict},
    schema::{NfListObject, Set, SetFlag, SetTypeValue},
    stmt::{Counter, JumpTarget, Operator, Set as SetStmt, SetOp, Statement},
};

use super::{
    base::REJECT_CHAIN,
    expr::{
        addr_type, dnat, element, fib_saddr_type, goto, matches, prefix, rule, s, saddr, set,
        set_mark, suffix,
    },
};
use crate::{
    dataplane::netfilter::{Action, Family, FrontendPlan, Masquerade, View, proto_name},
    model::{Backend, FrontendKey},
};

// ---------------------------------------------------------------------------
// Names.

/// The chain of a frontend (its external view).
pub(super) fn frontend_chain(key: &FrontendKey) -> String {
    format!("svc-{}-{}-{}", proto_name(key.protocol), key.ip, key.port)
}

/// The chain of the pods' view of an external frontend whose policy is
/// Local.
pub(super) fn cluster_chain(key: &FrontendKey) -> String {
    format!("{}-cluster", frontend_chain(key))
}

/// The chain of the node's own connections to an external frontend whose
/// policy is Local.
pub(super) fn node_chain(key: &FrontendKey) -> String {
    format!("{}-node", frontend_chain(key))
}

/// The affinity set of one endpoint of a frontend.
pub(super) fn affinity_set_name(key: &FrontendKey, backend: &Backend, timeout: u32) -> String {
    format!(
        "{}-aff{timeout}-{}-{}",
        frontend_chain(key),
        backend.ip,
        backend.port
    )
}

/// The chains and affinity sets of a frontend, by name: what the driver
/// keeps of a frontend besides its plan (its rules are rendered when they
/// are written, by [`render`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Objects {
    pub(super) chains: Vec<String>,
    pub(super) sets: Vec<String>,
}

/// The chains and affinity sets of `plan`.
pub(super) fn objects(plan: &FrontendPlan) -> Objects {
    let mut chains = vec![frontend_chain(&plan.key)];
    if plan.node_view.is_some() {
        chains.push(node_chain(&plan.key));
    }
    if plan.cluster_view.is_some() {
        chains.push(cluster_chain(&plan.key));
    }
    Objects {
        chains,
        sets: affinity_sets(plan)
            .into_iter()
            .map(|(name, ..)| name)
            .collect(),
    }
}

// ---------------------------------------------------------------------------
// Chains, rules, sets and elements.

/// The map a frontend's element lives in, and its key.
pub(super) fn map_entry(plan: &FrontendPlan) -> (String, Expression<'static>) {
    let proto = s(proto_name(plan.key.protocol));
    let port = Expression::Number(u32::from(plan.key.port));
    if plan.is_node_port() {
        (
            format!("nodeports{}", suffix(plan.family)),
            Expression::Named(NamedExpression::Concat(vec![proto, port])),
        )
    } else {
        (
            format!("services{}", suffix(plan.family)),
            Expression::Named(NamedExpression::Concat(vec![
                s(plan.key.ip.to_string()),
                proto,
                port,
            ])),
        )
    }
}

pub(super) fn map_element(plan: &FrontendPlan) -> NfListObject<'static> {
    let (map, key) = map_entry(plan);
    element(
        &map,
        vec![Expression::List(vec![
            key,
            Expression::Verdict(Verdict::Goto(JumpTarget {
                target: frontend_chain(&plan.key).into(),
            })),
        ])],
    )
}

/// The chains, rules and affinity sets of one frontend.
#[derive(Clone, Debug, Default)]
pub(super) struct Rendered {
    /// Chain name and its rules, in order.
    pub(super) chains: Vec<(String, Vec<NfListObject<'static>>)>,
    /// Affinity sets: name, family, timeout.
    pub(super) sets: Vec<(String, Family, u32)>,
}

/// The chains, rules and affinity sets of `plan`.
pub(super) fn render(plan: &FrontendPlan, comment: &str) -> Rendered {
    let mut out = Rendered::default();
    let main = frontend_chain(&plan.key);
    let mut rules = Vec::new();
    let family = plan.family;
    match &plan.source_ranges {
        Some(ranges) if ranges.is_empty() => {
            rules.push(rule(&main, vec![Statement::Drop(None)], Some(comment)))
        }
        Some(ranges) => {
            let set = ranges.iter().map(|r| SetItem::Element(prefix(r))).collect();
            rules.push(rule(
                &main,
                vec![
                    matches(
                        saddr(family),
                        Operator::NEQ,
                        Expression::Named(NamedExpression::Set(set)),
                    ),
                    Statement::Drop(None),
                ],
                Some(comment),
            ));
        }
        None => {}
    }
    if let Some(view) = &plan.node_view {
        // kube-proxy's "LOCAL traffic for external destinations": a source
        // address of the node's own.
        let node = node_chain(&plan.key);
        rules.push(rule(
            &main,
            vec![
                matches(fib_saddr_type(), Operator::EQ, s("local")),
                goto(node.clone()),
            ],
            Some(comment),
        ));
        let node_rules = view_rules(plan, &node, view, comment);
        out.chains.push((node, node_rules));
    }
    if let Some((cidr, view)) = &plan.cluster_view {
        let cluster = cluster_chain(&plan.key);
        rules.push(rule(
            &main,
            vec![
                matches(saddr(family), Operator::EQ, prefix(cidr)),
                goto(cluster.clone()),
            ],
            Some(comment),
        ));
        let cluster_rules = view_rules(plan, &cluster, view, comment);
        out.chains.push((cluster, cluster_rules));
    }
    rules.extend(view_rules(plan, &main, &plan.view, comment));
    out.chains.insert(0, (main, rules));
    out.sets = affinity_sets(plan);
    out
}

/// The affinity sets of a frontend (name, family, timeout): one per
/// endpoint any of its views may choose, sorted by name.
pub(super) fn affinity_sets(plan: &FrontendPlan) -> Vec<(String, Family, u32)> {
    let Some(timeout) = plan.affinity_timeout_secs else {
        return Vec::new();
    };
    let mut sets: Vec<(String, Family, u32)> = plan
        .backends()
        .iter()
        .map(|b| {
            (
                affinity_set_name(&plan.key, b, timeout),
                plan.family,
                timeout,
            )
        })
        .collect();
    sets.sort();
    sets
}

/// The rules of one view of a frontend in `chain`: the masquerade marks,
/// then what it does with a new connection.
fn view_rules(
    plan: &FrontendPlan,
    chain: &str,
    view: &View,
    comment: &str,
) -> Vec<NfListObject<'static>> {
    let c = Some(comment);
    let mut rules = mark_rules(plan.family, chain, &view.masquerade, c);
    match &view.action {
        Action::Reject => rules.push(rule(chain, vec![goto(REJECT_CHAIN)], c)),
        Action::Drop => rules.push(rule(chain, vec![Statement::Drop(None)], c)),
        Action::Balance(backends) => {
            // The nat chains see a connection's first packet only: this
            // counts the view's new connections, each of which the rules
            // below translate (one counter per view, not per endpoint, so
            // the ruleset grows by a rule per frontend). A chain written
            // again, when its frontend changes, starts from zero.
            rules.push(rule(
                chain,
                vec![Statement::Counter(Counter::Anonymous(None))],
                c,
            ));
            rules.extend(balance_rules(plan, chain, backends, c));
        }
    }
    rules
}

/// The masquerade mark of a view's clients that `masquerade` names.
fn mark_rules(
    family: Family,
    chain: &str,
    masquerade: &Masquerade,
    c: Option<&str>,
) -> Vec<NfListObject<'static>> {
    match masquerade {
        Masquerade::Never => Vec::new(),
        Masquerade::Always => vec![rule(chain, vec![set_mark()], c)],
        Masquerade::SourceOutside(cidr) => vec![rule(
            chain,
            vec![
                matches(saddr(family), Operator::NEQ, prefix(cidr)),
                set_mark(),
            ],
            c,
        )],
    }
}

/// The choice among `backends`: under affinity, a client found in an
/// endpoint's set goes there; then the `numgen random mod (n-i)` cascade,
/// each choice refreshing the chosen endpoint's set.
fn balance_rules(
    plan: &FrontendPlan,
    chain: &str,
    backends: &[Backend],
    c: Option<&str>,
) -> Vec<NfListObject<'static>> {
    let family = plan.family;
    let mut rules = Vec::new();
    let affinity: Vec<Option<String>> = backends
        .iter()
        .map(|b| {
            plan.affinity_timeout_secs
                .map(|t| affinity_set_name(&plan.key, b, t))
        })
        .collect();
    for (b, set) in backends.iter().zip(&affinity) {
        if let Some(set) = set {
            let mut expr = vec![
                matches(saddr(family), Operator::EQ, s(format!("@{set}"))),
                update(family, set),
            ];
            expr.extend(dnat(family, plan.key.protocol, b));
            rules.push(rule(chain, expr, c));
        }
    }
    let n = backends.len();
    for (i, (b, set)) in backends.iter().zip(&affinity).enumerate() {
        let mut expr = Vec::new();
        if i + 1 < n {
            expr.push(matches(
                Expression::Named(NamedExpression::Numgen(Numgen {
                    mode: NgMode::Random,
                    ng_mod: (n - i) as u32,
                    offset: None,
                })),
                Operator::EQ,
                Expression::Number(0),
            ));
        }
        if let Some(set) = set {
            expr.push(update(family, set));
        }
        expr.extend(dnat(family, plan.key.protocol, b));
        rules.push(rule(chain, expr, c));
    }
    rules
}

fn update(family: Family, set: &str) -> Statement<'static> {
    Statement::Set(SetStmt {
        op: SetOp::Update,
        elem: saddr(family),
        set: format!("@{set}").into(),
    })
}

pub(super) fn affinity_set_object(
    name: &str,
    family: Family,
    timeout: u32,
) -> NfListObject<'static> {
    NfListObject::Set(Box::new(Set {
        // `dynamic` too, which nft adds itself for a set updated from the
        // packet path (nft 1.0.6 refuses the word in JSON).
        flags: Some([SetFlag::Timeout].into_iter().collect()),
        timeout: Some(timeout),
        ..set(name, SetTypeValue::Single(addr_type(family)))
    }))
}

#[cfg(test)]
mod tests {
    use super::{super::tests::network, *};
    use crate::{
        dataplane::netfilter::{self, comment_of},
        model::{
            Frontend, FrontendKind, Protocol,
            test_support::{backend, frontend, key, key_proto},
        },
    };

    /// The rules of `chain` in `rendered`, as nft's JSON text.
    fn rules_of(rendered: &Rendered, chain: &str) -> Vec<String> {
        rendered
            .chains
            .iter()
            .find(|(name, _)| name == chain)
            .map(|(_, rules)| {
                rules
                    .iter()
                    .map(|r| serde_json::to_string(r).unwrap())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn rendered(k: &FrontendKey, f: &Frontend) -> Rendered {
        render(&netfilter::plan(k, f, &network()), &comment_of(f))
    }

    #[test]
    fn backends_are_chosen_by_a_uniform_cascade_after_the_masquerade_mark() {
        let k = key("10.96.0.1", 80);
        let f = frontend(
            "ns",
            "web",
            &[
                backend("10.1.0.1", 8080),
                backend("10.1.0.2", 8080),
                backend("10.1.0.3", 8080),
            ],
        );
        let r = rendered(&k, &f);
        assert_eq!(r.chains.len(), 1);
        assert!(r.sets.is_empty());
        let rules = rules_of(&r, "svc-tcp-10.96.0.1-80");
        assert_eq!(rules.len(), 5, "{rules:#?}");
        assert!(
            rules[0].contains(r#""op":"!=""#) && rules[0].contains(r#""addr":"10.1.0.0","len":16"#)
        );
        assert!(rules[0].contains(r#""mangle""#));
        // The view's new connections are counted once, before the choice.
        assert!(rules[1].contains(r#""expr":[{"counter":null}]"#));
        assert!(
            rules[2].contains(r#""mod":3"#)
                && rules[2].contains(r#""addr":"10.1.0.1","family":"ip","port":8080"#)
        );
        assert!(rules[3].contains(r#""mod":2"#) && rules[3].contains(r#""addr":"10.1.0.2""#));
        assert!(!rules[4].contains("numgen") && rules[4].contains(r#""addr":"10.1.0.3""#));
        assert!(rules.iter().all(|r| r.contains(r#""comment":"ns/web""#)));
    }

    #[test]
    fn affinity_checks_every_endpoints_set_first_and_refreshes_the_chosen_one() {
        let k = key("10.96.0.1", 80);
        let mut f = frontend(
            "ns",
            "web",
            &[backend("10.1.0.1", 80), backend("10.1.0.2", 80)],
        );
        f.policy.affinity_timeout_secs = Some(30);
        let r = rendered(&k, &f);
        let names: Vec<&str> = r.sets.iter().map(|(n, ..)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "svc-tcp-10.96.0.1-80-aff30-10.1.0.1-80",
                "svc-tcp-10.96.0.1-80-aff30-10.1.0.2-80"
            ]
        );
        let rules = rules_of(&r, "svc-tcp-10.96.0.1-80");
        // Mark, counter, two affinity hits, two choices.
        assert_eq!(rules.len(), 6, "{rules:#?}");
        assert!(rules[1].contains("counter"));
        assert!(rules[2].contains(r#""right":"@svc-tcp-10.96.0.1-80-aff30-10.1.0.1-80""#));
        assert!(rules[2].contains(r#""op":"update""#));
        assert!(
            rules[4].contains("numgen")
                && rules[4].contains(r#""set":"@svc-tcp-10.96.0.1-80-aff30-10.1.0.1-80""#)
        );
        let set = serde_json::to_string(&affinity_set_object(names[0], Family::V4, 30)).unwrap();
        assert!(set.contains(r#""flags":["timeout"]"#) && set.contains(r#""timeout":30"#));
    }

    #[test]
    fn local_external_frontends_send_pods_to_the_cluster_view_and_drop_the_rest() {
        let k = key("0.0.0.0", 30080);
        let mut f = frontend("ns", "web", &[]);
        f.kind = FrontendKind::NodePort;
        f.policy.local_only = true;
        f.cluster_backends = vec![backend("10.1.0.9", 80)];
        let r = rendered(&k, &f);
        let main = rules_of(&r, "svc-tcp-0.0.0.0-30080");
        // The node's own connections go to every endpoint, masqueraded.
        assert!(
            main[0].contains(r#""fib":{"result":"type","flags":["saddr"]}"#)
                && main[0].contains(r#""goto":{"target":"svc-tcp-0.0.0.0-30080-node"}"#),
            "{main:#?}"
        );
        let node = rules_of(&r, "svc-tcp-0.0.0.0-30080-node");
        assert_eq!(node.len(), 3, "mark, counter, the one endpoint: {node:#?}");
        assert!(node[0].contains("mark") && node[1].contains("counter"));
        assert!(node[2].contains(r#""addr":"10.1.0.9""#));
        assert!(
            main[1].contains(r#""goto":{"target":"svc-tcp-0.0.0.0-30080-cluster"}"#),
            "{main:#?}"
        );
        assert!(
            main.last().unwrap().contains(r#"{"drop":null}"#),
            "{main:#?}"
        );
        assert!(!main.iter().any(|r| r.contains("mangle")), "{main:#?}");
        let cluster = rules_of(&r, "svc-tcp-0.0.0.0-30080-cluster");
        assert_eq!(cluster.len(), 2, "pods keep their source: {cluster:#?}");
        assert!(cluster[0].contains("counter") && cluster[1].contains(r#""addr":"10.1.0.9""#));
        let (map, _) = map_entry(&netfilter::plan(&k, &f, &network()));
        assert_eq!(map, "nodeports4");
    }

    #[test]
    fn services_without_endpoints_reject_and_source_ranges_drop_others() {
        let k = key_proto("fd00:2::10", 53, Protocol::Udp);
        let f = frontend("ns", "dns", &[]);
        let rules = rules_of(&rendered(&k, &f), "svc-udp-fd00:2::10-53");
        assert!(
            rules
                .last()
                .unwrap()
                .contains(r#""goto":{"target":"reject"}"#),
            "{rules:#?}"
        );
        let k = key("192.0.2.10", 443);
        let mut f = frontend("ns", "lb", &[backend("10.1.0.1", 8443)]);
        f.kind = FrontendKind::LoadBalancer;
        f.policy.source_ranges = vec![
            "198.51.100.0/24".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ];
        let rules = rules_of(&rendered(&k, &f), "svc-tcp-192.0.2.10-443");
        assert!(
            rules[0].contains(r#""op":"!=""#)
                && rules[0].contains(r#""addr":"198.51.100.0","len":24"#)
        );
        assert!(!rules[0].contains("fd00::") && rules[0].contains(r#"{"drop":null}"#));
    }

    #[test]
    fn ipv6_backends_are_translated_with_the_ip6_family() {
        let k = key("fd00:2::10", 80);
        let f = frontend("ns", "web", &[backend("fd00:1::5", 8080)]);
        let rules = rules_of(&rendered(&k, &f), "svc-tcp-fd00:2::10-80");
        assert!(
            rules
                .last()
                .unwrap()
                .contains(r#""addr":"fd00:1::5","family":"ip6","port":8080"#),
            "{rules:#?}"
        );
    }
}
