//! The objects every table has besides the frontends': the verdict maps
//! and sets, the base chains and their rules.
use ::nftables::{
    expr::{BinaryOperation, CT, Expression, MetaKey, NamedExpression},
    schema::{Chain, FlushObject, NfCmd, NfListObject, Set, SetFlag, SetTypeValue},
    stmt::{JumpTarget, Mangle, NAT, NATFlag, Operator, Reject, RejectType, Statement, VerdictMap},
    types::{NfChainType, NfHook},
};

use super::{
    TABLE,
    expr::{
        addr_type, base_chain, chain, daddr, matches, meta, payload, rule, s, saddr, set, suffix,
        table,
    },
    transaction::Tx,
};
use crate::dataplane::netfilter::{Family, MASQUERADE_MARK, SERVICE_ADDRESS_MARK};

const SERVICES_CHAIN: &str = "services";
pub(super) const REJECT_CHAIN: &str = "reject";
pub(super) const BASE_CHAINS: [&str; 5] = [
    "nat-prerouting",
    "nat-output",
    "nat-postrouting",
    SERVICES_CHAIN,
    REJECT_CHAIN,
];
pub(super) const BASE_SETS: [&str; 10] = [
    "services4",
    "services6",
    "cluster-ips4",
    "cluster-ips6",
    "nodeports4",
    "nodeports6",
    "nodeport-ips4",
    "nodeport-ips6",
    "hairpin4",
    "hairpin6",
];

/// The first shard's table alone checks new connections to the cluster's
/// ServiceCIDRs, after every table's DNAT: its chains and sets.
pub(super) const SERVICE_CIDR_CHAINS: [&str; 2] =
    ["service-cidrs-prerouting", "service-cidrs-output"];
pub(super) const SERVICE_CIDR_SETS: [&str; 2] = ["service-cidrs4", "service-cidrs6"];

/// `add map` of a verdict map keyed by `key_type`.
fn verdict_map(name: &str, key_type: serde_json::Value) -> serde_json::Value {
    serde_json::json!({ "add": { "map": {
        "family": "inet", "table": TABLE, "name": name, "type": key_type, "map": "verdict",
    } } })
}

/// The objects every table has, and the rules of its base chains.
pub(super) fn base_objects(batch: &mut Tx) {
    batch.add(table());
    maps_and_sets(batch);
    base_chains(batch);
    services_rules(batch);
    postrouting_rules(batch);
    batch.add(rule(
        REJECT_CHAIN,
        vec![
            matches(meta(MetaKey::L4proto), Operator::EQ, s("tcp")),
            Statement::Reject(Some(Reject::new(Some(RejectType::TCPReset), None))),
        ],
        None,
    ));
    batch.add(rule(REJECT_CHAIN, vec![Statement::Reject(None)], None));
}

/// The verdict maps of the frontends and the sets of NodePort addresses
/// and hairpin pairs, per family.
fn maps_and_sets(batch: &mut Tx) {
    for family in [Family::V4, Family::V6] {
        let addr = addr_type(family);
        let sfx = suffix(family);
        let addr_name = match family {
            Family::V4 => "ipv4_addr",
            Family::V6 => "ipv6_addr",
        };
        batch.push_value(verdict_map(
            &format!("services{sfx}"),
            serde_json::json!([addr_name, "inet_proto", "inet_service"]),
        ));
        batch.push_value(verdict_map(
            &format!("nodeports{sfx}"),
            serde_json::json!(["inet_proto", "inet_service"]),
        ));
        batch.add(NfListObject::Set(Box::new(set(
            &format!("nodeport-ips{sfx}"),
            SetTypeValue::Single(addr),
        ))));
        batch.add(NfListObject::Set(Box::new(set(
            &format!("cluster-ips{sfx}"),
            SetTypeValue::Single(addr),
        ))));
        batch.add(NfListObject::Set(Box::new(set(
            &format!("hairpin{sfx}"),
            SetTypeValue::Concatenated(vec![addr, addr].into()),
        ))));
    }
}

/// The base chains, created if missing and flushed.
fn base_chains(batch: &mut Tx) {
    batch.add(NfListObject::Chain(base_chain(
        "nat-prerouting",
        NfHook::Prerouting,
        -100,
    )));
    batch.add(NfListObject::Chain(base_chain(
        "nat-output",
        NfHook::Output,
        -100,
    )));
    batch.add(NfListObject::Chain(base_chain(
        "nat-postrouting",
        NfHook::Postrouting,
        100,
    )));
    batch.add(NfListObject::Chain(chain(SERVICES_CHAIN)));
    batch.add(NfListObject::Chain(chain(REJECT_CHAIN)));
    for name in BASE_CHAINS {
        batch.add_cmd(NfCmd::Flush(FlushObject::Chain(chain(name))));
    }
}

/// The mark of new connections to a ClusterIP of this table's frontends
/// (read by the ServiceCIDR check), the jumps to `services` and its
/// lookups in the verdict maps.
fn services_rules(batch: &mut Tx) {
    for chain in ["nat-prerouting", "nat-output"] {
        for family in [Family::V4, Family::V6] {
            batch.add(rule(
                chain,
                vec![
                    matches(
                        daddr(family),
                        Operator::EQ,
                        s(format!("@cluster-ips{}", suffix(family))),
                    ),
                    Statement::Mangle(Mangle {
                        key: meta(MetaKey::Mark),
                        value: Expression::BinaryOperation(Box::new(BinaryOperation::OR(vec![
                            meta(MetaKey::Mark),
                            Expression::Number(SERVICE_ADDRESS_MARK),
                        ]))),
                    }),
                ],
                None,
            ));
        }
    }
    let jump = Statement::Jump(JumpTarget {
        target: SERVICES_CHAIN.into(),
    });
    batch.add(rule("nat-prerouting", vec![jump.clone()], None));
    batch.add(rule("nat-output", vec![jump], None));
    for family in [Family::V4, Family::V6] {
        let sfx = suffix(family);
        let key = Expression::Named(NamedExpression::Concat(vec![
            daddr(family),
            meta(MetaKey::L4proto),
            payload("th", "dport"),
        ]));
        batch.add(rule(
            SERVICES_CHAIN,
            vec![Statement::VerdictMap(VerdictMap {
                key,
                data: s(format!("@services{sfx}")),
            })],
            None,
        ));
    }
    for family in [Family::V4, Family::V6] {
        let sfx = suffix(family);
        batch.add(rule(
            SERVICES_CHAIN,
            vec![
                matches(
                    daddr(family),
                    Operator::EQ,
                    s(format!("@nodeport-ips{sfx}")),
                ),
                Statement::VerdictMap(VerdictMap {
                    key: Expression::Named(NamedExpression::Concat(vec![
                        meta(MetaKey::L4proto),
                        payload("th", "dport"),
                    ])),
                    data: s(format!("@nodeports{sfx}")),
                }),
            ],
            None,
        ));
    }
}

/// `nat-postrouting`: masquerade hairpin connections and marked packets.
fn postrouting_rules(batch: &mut Tx) {
    let masquerade = || {
        Statement::Masquerade(Some(NAT {
            addr: None,
            family: None,
            port: None,
            flags: Some([NATFlag::FullyRandom].into_iter().collect()),
        }))
    };
    for family in [Family::V4, Family::V6] {
        batch.add(rule(
            "nat-postrouting",
            vec![
                matches(
                    Expression::Named(NamedExpression::CT(CT {
                        key: "status".into(),
                        family: None,
                        dir: None,
                    })),
                    Operator::IN,
                    s("dnat"),
                ),
                matches(
                    Expression::Named(NamedExpression::Concat(vec![saddr(family), daddr(family)])),
                    Operator::EQ,
                    s(format!("@hairpin{}", suffix(family))),
                ),
                masquerade(),
            ],
            Some("hairpin"),
        ));
    }
    batch.add(rule(
        "nat-postrouting",
        vec![
            matches(
                Expression::BinaryOperation(Box::new(BinaryOperation::AND(
                    meta(MetaKey::Mark),
                    Expression::Number(MASQUERADE_MARK),
                ))),
                Operator::EQ,
                Expression::Number(0),
            ),
            Statement::Return(None),
        ],
        None,
    ));
    batch.add(rule(
        "nat-postrouting",
        vec![
            Statement::Mangle(Mangle {
                key: meta(MetaKey::Mark),
                value: Expression::BinaryOperation(Box::new(BinaryOperation::XOR(
                    meta(MetaKey::Mark),
                    Expression::Number(MASQUERADE_MARK),
                ))),
            }),
            masquerade(),
        ],
        None,
    ));
}

/// The ServiceCIDR check of the first shard's table, at priority dstnat+10
/// (after every table's DNAT) on the prerouting and output hooks: a new
/// connection that no frontend translated, to an address of a ServiceCIDR,
/// is refused when the address is a ClusterIP (a port no Service has, as
/// kube-proxy's nftables mode rejects it) and dropped when no Service
/// holds the address ("unallocated"). The mark the nat chains set for it
/// is cleared, so nothing after sees it.
pub(super) fn service_cidr_objects(batch: &mut Tx) {
    for family in [Family::V4, Family::V6] {
        batch.add(NfListObject::Set(Box::new(Set {
            flags: Some([SetFlag::Interval].into_iter().collect()),
            ..set(
                &format!("service-cidrs{}", suffix(family)),
                SetTypeValue::Single(addr_type(family)),
            )
        })));
    }
    let hooks = [NfHook::Prerouting, NfHook::Output];
    for (name, hook) in SERVICE_CIDR_CHAINS.into_iter().zip(hooks) {
        batch.add(NfListObject::Chain(Chain {
            _type: Some(NfChainType::Filter),
            ..base_chain(name, hook, -90)
        }));
        batch.add_cmd(NfCmd::Flush(FlushObject::Chain(chain(name))));
        for family in [Family::V4, Family::V6] {
            let mut refuse = untranslated_new_to_service_cidr(family);
            refuse.push(matches(
                Expression::BinaryOperation(Box::new(BinaryOperation::AND(
                    meta(MetaKey::Mark),
                    Expression::Number(SERVICE_ADDRESS_MARK),
                ))),
                Operator::NEQ,
                Expression::Number(0),
            ));
            refuse.push(Statement::Goto(JumpTarget {
                target: REJECT_CHAIN.into(),
            }));
            batch.add(rule(
                name,
                refuse,
                Some("a port of a ClusterIP that no Service has"),
            ));
            let mut drop = untranslated_new_to_service_cidr(family);
            drop.push(Statement::Drop(None));
            batch.add(rule(
                name,
                drop,
                Some("an address of a ServiceCIDR that no Service holds"),
            ));
        }
        batch.add(rule(
            name,
            vec![Statement::Mangle(Mangle {
                key: meta(MetaKey::Mark),
                value: Expression::BinaryOperation(Box::new(BinaryOperation::AND(
                    meta(MetaKey::Mark),
                    Expression::Number(!SERVICE_ADDRESS_MARK),
                ))),
            })],
            None,
        ));
    }
}

/// `ct state new ct status & dnat == 0 ip daddr @service-cidrs4` (or ip6).
fn untranslated_new_to_service_cidr(family: Family) -> Vec<Statement<'static>> {
    let ct = |key: &'static str| {
        Expression::Named(NamedExpression::CT(CT {
            key: key.into(),
            family: None,
            dir: None,
        }))
    };
    vec![
        matches(ct("state"), Operator::IN, s("new")),
        matches(
            Expression::BinaryOperation(Box::new(BinaryOperation::AND(ct("status"), s("dnat")))),
            Operator::EQ,
            Expression::Number(0),
        ),
        matches(
            daddr(family),
            Operator::EQ,
            s(format!("@service-cidrs{}", suffix(family))),
        ),
    ]
}
