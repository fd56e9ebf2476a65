//! Expressions, statements and objects of the `nftables` crate's schema,
//! built for [`TABLE`] (a transaction moves them to its own table).
use std::borrow::Cow;

use ::nftables::{
    expr::{
        BinaryOperation, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix,
    },
    schema::{Chain, Element, NfListObject, Rule, Set, SetType, SetTypeValue, Table},
    stmt::{JumpTarget, Mangle, Match, NAT, NATFamily, Operator, Statement},
    types::{NfChainPolicy, NfChainType, NfFamily, NfHook},
};

use super::TABLE;
use crate::{
    dataplane::netfilter::{Family, MASQUERADE_MARK, proto_name},
    model::{Backend, Protocol},
};

const FAMILY: NfFamily = NfFamily::INet;

/// `4` or `6`: the end of the name of a set or map of one family.
pub(super) fn suffix(family: Family) -> &'static str {
    match family {
        Family::V4 => "4",
        Family::V6 => "6",
    }
}

pub(super) fn s(text: impl Into<Cow<'static, str>>) -> Expression<'static> {
    Expression::String(text.into())
}

pub(super) fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: protocol.into(),
            field: field.into(),
        },
    )))
}

fn ip_proto(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

pub(super) fn saddr(family: Family) -> Expression<'static> {
    payload(ip_proto(family), "saddr")
}

pub(super) fn daddr(family: Family) -> Expression<'static> {
    payload(ip_proto(family), "daddr")
}

pub(super) fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

/// `fib saddr type`: the kind of address the packet's source is (`local`
/// for an address of the node's own).
pub(super) fn fib_saddr_type() -> Expression<'static> {
    Expression::Named(NamedExpression::Fib(::nftables::expr::Fib {
        result: ::nftables::expr::FibResult::Type,
        flags: std::collections::HashSet::from([::nftables::expr::FibFlag::Saddr]),
    }))
}

pub(super) fn matches(
    left: Expression<'static>,
    op: Operator,
    right: Expression<'static>,
) -> Statement<'static> {
    Statement::Match(Match { left, right, op })
}

pub(super) fn prefix(net: &ipnet::IpNet) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(s(net.network().to_string())),
        len: u32::from(net.prefix_len()),
    }))
}

pub(super) fn goto(chain: impl Into<Cow<'static, str>>) -> Statement<'static> {
    Statement::Goto(JumpTarget {
        target: chain.into(),
    })
}

pub(super) fn set_mark() -> Statement<'static> {
    Statement::Mangle(Mangle {
        key: meta(MetaKey::Mark),
        value: Expression::BinaryOperation(Box::new(BinaryOperation::OR(vec![
            meta(MetaKey::Mark),
            Expression::Number(MASQUERADE_MARK),
        ]))),
    })
}

pub(super) fn dnat(
    family: Family,
    protocol: Protocol,
    backend: &Backend,
) -> [Statement<'static>; 2] {
    [
        matches(
            meta(MetaKey::L4proto),
            Operator::EQ,
            s(proto_name(protocol)),
        ),
        Statement::DNAT(Some(NAT {
            addr: Some(s(backend.ip.to_string())),
            family: Some(match family {
                Family::V4 => NATFamily::IP,
                Family::V6 => NATFamily::IP6,
            }),
            port: Some(Expression::Number(u32::from(backend.port))),
            flags: None,
        })),
    ]
}

pub(super) fn rule(
    chain: &str,
    expr: Vec<Statement<'static>>,
    comment: Option<&str>,
) -> NfListObject<'static> {
    NfListObject::Rule(Rule {
        family: FAMILY,
        table: TABLE.into(),
        chain: chain.to_string().into(),
        expr: expr.into(),
        handle: None,
        index: None,
        comment: comment.map(|c| c.to_string().into()),
    })
}

pub(super) fn chain(name: &str) -> Chain<'static> {
    Chain {
        family: FAMILY,
        table: TABLE.into(),
        name: name.to_string().into(),
        ..Chain::default()
    }
}

pub(super) fn base_chain(name: &str, hook: NfHook, prio: i32) -> Chain<'static> {
    Chain {
        _type: Some(NfChainType::NAT),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..chain(name)
    }
}

pub(super) fn set(name: &str, set_type: SetTypeValue<'static>) -> Set<'static> {
    Set {
        family: FAMILY,
        table: TABLE.into(),
        name: name.to_string().into(),
        set_type,
        ..Set::default()
    }
}

pub(super) fn addr_type(family: Family) -> SetType {
    match family {
        Family::V4 => SetType::Ipv4Addr,
        Family::V6 => SetType::Ipv6Addr,
    }
}

pub(super) fn element(name: &str, elem: Vec<Expression<'static>>) -> NfListObject<'static> {
    NfListObject::Element(Element {
        family: FAMILY,
        table: TABLE.into(),
        name: name.to_string().into(),
        elem: elem.into(),
    })
}

pub(super) fn table() -> NfListObject<'static> {
    NfListObject::Table(Table {
        family: FAMILY,
        name: TABLE.into(),
        handle: None,
    })
}
