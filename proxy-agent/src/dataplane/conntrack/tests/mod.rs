//! Tests of the conntrack cleaner: the bytes it builds and parses, its
//! matching (here), its conversation with a fake kernel (`fake_kernel`) and
//! with the real one in a network namespace of its own (`netns`).

use netlink_packet_core::{
    NLA_F_NESTED, NLA_F_NET_BYTEORDER, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE,
    NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN,
};
use proptest::prelude::*;

use super::{wire::*, *};

/// The stale flow of `backend:backend_port` behind `vip:port`.
fn stale_flow(vip: &str, port: u16, backend: &str, backend_port: u16) -> StaleFlow {
    StaleFlow {
        vip: ip(vip),
        port,
        backend: ip(backend),
        backend_port,
    }
}

mod fake_kernel;
mod netns;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

// -- fixture builders (test side; independent of the code under test) --

fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = ((4 + payload.len()) as u16).to_ne_bytes().to_vec();
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out
}

fn nest(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
    attr(kind | NLA_F_NESTED, &parts.concat())
}

fn tuple_payload(t: &Tuple) -> Vec<u8> {
    let addr = |kind_v4: u16, a: IpAddr| match a {
        IpAddr::V4(a) => attr(kind_v4, &a.octets()),
        IpAddr::V6(a) => attr(kind_v4 + 2, &a.octets()),
    };
    let mut proto = vec![attr(CTA_PROTO_NUM, &[t.proto])];
    if let Some(p) = t.src_port {
        proto.push(attr(CTA_PROTO_SRC_PORT, &p.to_be_bytes()));
    }
    if let Some(p) = t.dst_port {
        proto.push(attr(CTA_PROTO_DST_PORT, &p.to_be_bytes()));
    }
    [
        nest(
            CTA_TUPLE_IP,
            &[addr(CTA_IP_V4_SRC, t.src), addr(CTA_IP_V4_DST, t.dst)],
        ),
        nest(CTA_TUPLE_PROTO, &proto),
    ]
    .concat()
}

fn nlmsg(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = ((16 + payload.len()) as u32).to_ne_bytes().to_vec();
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&4242u32.to_ne_bytes());
    out.extend_from_slice(payload);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out
}

fn error_msg(seq: u32, code: i32) -> Vec<u8> {
    let mut payload = code.to_ne_bytes().to_vec();
    payload.extend_from_slice(&[0; 16]); // the request's header
    nlmsg(NLMSG_ERROR, 0, seq, &payload)
}

fn done_msg(seq: u32) -> Vec<u8> {
    nlmsg(NLMSG_DONE, 2, seq, &0i32.to_ne_bytes())
}

#[derive(Clone, Debug, PartialEq)]
struct FakeEntry {
    family: u8,
    orig: Tuple,
    reply: Tuple,
    zone: u16,
    id: u32,
}

fn entry_payload(e: &FakeEntry) -> Vec<u8> {
    let mut out = vec![e.family, 0, 0, 0];
    out.extend(nest(CTA_TUPLE_ORIG, &[tuple_payload(&e.orig)]));
    out.extend(nest(CTA_TUPLE_REPLY, &[tuple_payload(&e.reply)]));
    out.extend(attr(3, &0x188u32.to_be_bytes())); // CTA_STATUS
    out.extend(attr(7, &30u32.to_be_bytes())); // CTA_TIMEOUT
    if e.zone != 0 {
        out.extend(attr(CTA_ZONE, &e.zone.to_be_bytes()));
    }
    out.extend(attr(CTA_ID, &e.id.to_be_bytes()));
    out
}

fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Tuple {
    Tuple {
        src: ip(src),
        dst: ip(dst),
        proto: IPPROTO_UDP,
        src_port: Some(sport),
        dst_port: Some(dport),
    }
}

/// A DNATed UDP entry: client → vip:port, answered by backend.
fn dnat_entry(client: (&str, u16), vip: (&str, u16), backend: (&str, u16), id: u32) -> FakeEntry {
    FakeEntry {
        family: family_of(ip(client.0)),
        orig: udp(client.0, client.1, vip.0, vip.1),
        reply: udp(backend.0, backend.1, client.0, client.1),
        zone: 0,
        id,
    }
}

// -- wire constants --

#[test]
fn constants_agree_with_libc() {
    assert_eq!(i32::from(NLMSG_NOOP), libc::NLMSG_NOOP);
    assert_eq!(i32::from(NLMSG_ERROR), libc::NLMSG_ERROR);
    assert_eq!(i32::from(NLMSG_DONE), libc::NLMSG_DONE);
    assert_eq!(i32::from(NLMSG_OVERRUN), libc::NLMSG_OVERRUN);
    assert_eq!(i32::from(NLM_F_REQUEST), libc::NLM_F_REQUEST);
    assert_eq!(i32::from(NLM_F_ACK), libc::NLM_F_ACK);
    assert_eq!(i32::from(NLM_F_DUMP), libc::NLM_F_DUMP);
    assert_eq!(i32::from(NLA_F_NESTED), libc::NLA_F_NESTED);
    assert_eq!(i32::from(NLA_F_NET_BYTEORDER), libc::NLA_F_NET_BYTEORDER);
    assert_eq!(
        i32::from(NFNL_SUBSYS_CTNETLINK),
        libc::NFNL_SUBSYS_CTNETLINK
    );
    assert_eq!(size_of::<libc::nlmsghdr>(), NLMSG_HDRLEN);
    assert_eq!(size_of::<libc::nlattr>(), NLA_HDRLEN);
    // What netlink-packet-core and netlink-sys say.
    assert_eq!(
        netlink_packet_core::Emitable::buffer_len(&netlink_packet_core::NetlinkHeader::default()),
        NLMSG_HDRLEN
    );
    assert_eq!(
        netlink_sys::protocols::NETLINK_NETFILTER,
        libc::NETLINK_NETFILTER as isize
    );
}

// -- building --

#[test]
fn dump_request_bytes() {
    let mut buf = Vec::new();
    put_dump_request(&mut buf, AF_INET6, 7, None).unwrap();
    let mut want = 20u32.to_ne_bytes().to_vec();
    want.extend_from_slice(&0x0101u16.to_ne_bytes()); // CTNETLINK << 8 | CT_GET
    want.extend_from_slice(&0x0301u16.to_ne_bytes()); // REQUEST | DUMP
    want.extend_from_slice(&7u32.to_ne_bytes());
    want.extend_from_slice(&0u32.to_ne_bytes());
    want.extend_from_slice(&[10, 0, 0, 0]); // AF_INET6, v0, res_id 0
    assert_eq!(buf, want);

    // Filtered to UDP: CTA_TUPLE_ORIG { CTA_TUPLE_PROTO { CTA_PROTO_NUM 17 } }
    // and CTA_FILTER { CTA_FILTER_ORIG_FLAGS CTA_FILTER_FLAG_CTA_PROTO_NUM }.
    let mut buf = Vec::new();
    put_dump_request(&mut buf, AF_INET, 8, Some(IPPROTO_UDP)).unwrap();
    #[rustfmt::skip]
    let attrs: [u8; 28] = [
        16, 0, 0x01, 0x80,          // CTA_TUPLE_ORIG, nested
            12, 0, 0x02, 0x80,      // CTA_TUPLE_PROTO, nested
                5, 0, 1, 0, 17, 0, 0, 0, // CTA_PROTO_NUM udp + pad
        12, 0, 25, 0x80,            // CTA_FILTER, nested
            8, 0, 1, 0, 8, 0, 0, 0, // CTA_FILTER_ORIG_FLAGS 1 << 3 (x86_64)
    ];
    let mut payload = vec![2, 0, 0, 0];
    payload.extend_from_slice(&attrs);
    let mut want = nlmsg(0x0101, NLM_F_REQUEST | NLM_F_DUMP, 8, &payload);
    want[12..16].copy_from_slice(&0u32.to_ne_bytes());
    assert_eq!(buf, want);
}

#[test]
fn delete_request_bytes() {
    let orig = tuple_payload(&udp("10.0.0.1", 40000, "10.96.0.10", 53));
    let delete = DeleteRequest {
        family: AF_INET,
        orig: orig.clone(),
        zone: 7,
        id: Some(0xdead_beef),
    };
    let mut buf = Vec::new();
    delete.put(&mut buf, 9).unwrap();

    let mut payload = vec![2, 0, 0, 0];
    payload.extend(attr(CTA_TUPLE_ORIG | NLA_F_NESTED, &orig));
    payload.extend(attr(CTA_ZONE, &[0, 7])); // be16 7, padded
    payload.extend(attr(CTA_ID, &[0xde, 0xad, 0xbe, 0xef]));
    let mut want = nlmsg(0x0102, NLM_F_REQUEST | NLM_F_ACK, 9, &payload);
    want[12..16].copy_from_slice(&0u32.to_ne_bytes()); // pid 0: the kernel
    assert_eq!(buf, want);
    assert_eq!(buf.len() % 4, 0);

    // Our own parser reads back what we built.
    let msg = messages(&buf).next().unwrap().unwrap();
    let back: Vec<Attr> = attrs(&msg.payload[4..]).map(Result::unwrap).collect();
    assert_eq!(back[0].kind, CTA_TUPLE_ORIG);
    assert_eq!(
        parse_tuple(back[0].payload).unwrap(),
        udp("10.0.0.1", 40000, "10.96.0.10", 53)
    );
    assert_eq!(
        back[1],
        Attr {
            kind: CTA_ZONE,
            payload: &[0, 7]
        }
    );
    assert_eq!(
        back[2],
        Attr {
            kind: CTA_ID,
            payload: &[0xde, 0xad, 0xbe, 0xef]
        }
    );
}

#[test]
fn delete_request_without_zone_or_id_has_only_the_tuple() {
    let orig = tuple_payload(&udp("::1", 1, "::2", 2));
    let delete = DeleteRequest {
        family: AF_INET6,
        orig: orig.clone(),
        zone: 0,
        id: None,
    };
    let mut buf = Vec::new();
    delete.put(&mut buf, 1).unwrap();
    let msg = messages(&buf).next().unwrap().unwrap();
    assert_eq!(msg.payload[0], AF_INET6);
    assert_eq!(
        msg.payload[4..],
        attr(CTA_TUPLE_ORIG | NLA_F_NESTED, &orig)[..]
    );
}

#[test]
fn a_delete_without_a_tuple_is_never_built() {
    // It would flush the whole table.
    let delete = DeleteRequest {
        family: AF_INET,
        orig: Vec::new(),
        zone: 0,
        id: None,
    };
    assert_eq!(
        delete.put(&mut Vec::new(), 1),
        Err(Malformed::Missing("CTA_TUPLE_ORIG"))
    );
}

// -- parsing --

/// A conntrack dump message as the kernel sends it (x86_64 byte order
/// for the netlink headers): UDP 127.0.0.1:40000 → 127.0.0.2:5555,
/// DNATed to 127.0.0.1:6666.
#[rustfmt::skip]
const KERNEL_ENTRY: [u8; 164] = [
    // nlmsghdr: len 164, type CTNETLINK<<8|CT_GET, flags MULTI, seq 5, pid 4242
    0xa4, 0, 0, 0,  0x01, 0x01,  0x02, 0,  5, 0, 0, 0,  0x92, 0x10, 0, 0,
    // nfgenmsg: AF_INET, v0, res_id 0
    2, 0, 0, 0,
    // CTA_TUPLE_ORIG (nested), 52 bytes
    0x34, 0, 0x01, 0x80,
        0x14, 0, 0x01, 0x80, // CTA_TUPLE_IP
            8, 0, 1, 0,  127, 0, 0, 1, // CTA_IP_V4_SRC
            8, 0, 2, 0,  127, 0, 0, 2, // CTA_IP_V4_DST
        0x1c, 0, 0x02, 0x80, // CTA_TUPLE_PROTO
            5, 0, 1, 0,  17, 0, 0, 0, // CTA_PROTO_NUM udp + pad
            6, 0, 2, 0,  0x9c, 0x40, 0, 0, // CTA_PROTO_SRC_PORT 40000
            6, 0, 3, 0,  0x15, 0xb3, 0, 0, // CTA_PROTO_DST_PORT 5555
    // CTA_TUPLE_REPLY (nested), 52 bytes
    0x34, 0, 0x02, 0x80,
        0x14, 0, 0x01, 0x80,
            8, 0, 1, 0,  127, 0, 0, 1,
            8, 0, 2, 0,  127, 0, 0, 1,
        0x1c, 0, 0x02, 0x80,
            5, 0, 1, 0,  17, 0, 0, 0,
            6, 0, 2, 0,  0x1a, 0x0a, 0, 0, // 6666
            6, 0, 3, 0,  0x9c, 0x40, 0, 0, // 40000
    8, 0, 3, 0,  0, 0, 0x01, 0x88, // CTA_STATUS
    8, 0, 7, 0,  0, 0, 0, 0x1e, // CTA_TIMEOUT 30
    8, 0, 8, 0,  0, 0, 0, 0, // CTA_MARK
    8, 0, 12, 0,  0xde, 0xad, 0xbe, 0xef, // CTA_ID
    8, 0, 11, 0,  0, 0, 0, 1, // CTA_USE
];
/// Where the attributes after the two tuples start.
const AFTER_TUPLES: usize = 4 + 52 + 52;

#[cfg(target_endian = "little")]
#[test]
fn parses_a_kernel_entry() {
    let mut msgs = messages(&KERNEL_ENTRY);
    let msg = msgs.next().unwrap().unwrap();
    assert!(msgs.next().is_none());
    assert_eq!((msg.ty, msg.flags, msg.seq), (0x0101, 2, 5));
    let entry = parse_entry(msg.payload).unwrap();
    assert_eq!(entry.family, AF_INET);
    assert_eq!(entry.orig, udp("127.0.0.1", 40000, "127.0.0.2", 5555));
    assert_eq!(entry.reply, udp("127.0.0.1", 6666, "127.0.0.1", 40000));
    assert_eq!(entry.zone, 0);
    assert_eq!(entry.id, Some(0xdead_beef));
    assert_eq!(entry.orig_raw, &KERNEL_ENTRY[24..72]);

    // The delete names it by the same bytes.
    let mut buf = Vec::new();
    DeleteRequest::of(&entry).put(&mut buf, 1).unwrap();
    assert_eq!(buf[20..72], KERNEL_ENTRY[20..72]);
}

#[cfg(target_endian = "little")]
#[test]
fn every_truncation_of_the_datagram_is_an_error() {
    for cut in 1..KERNEL_ENTRY.len() {
        let result: Result<Vec<_>, _> = messages(&KERNEL_ENTRY[..cut]).collect();
        let err = result.unwrap_err();
        if cut < 16 {
            assert_eq!(err, Malformed::TruncatedHeader { left: cut });
        } else {
            assert_eq!(
                err,
                Malformed::MessageLength {
                    len: 164,
                    left: cut
                }
            );
        }
    }
}

#[cfg(target_endian = "little")]
#[test]
fn every_truncation_of_the_entry_inside_an_attribute_is_an_error() {
    let payload = &KERNEL_ENTRY[16..];
    for cut in 0..payload.len() {
        let result = parse_entry(&payload[..cut]);
        // Whole optional attributes may be missing; nothing else.
        let at_optional_boundary = cut >= AFTER_TUPLES && (cut - AFTER_TUPLES).is_multiple_of(8);
        assert_eq!(
            result.is_ok(),
            at_optional_boundary,
            "cut at {cut}: {result:?}"
        );
    }
}

#[test]
fn malformed_entries_are_errors() {
    let good = dnat_entry(("10.0.0.1", 1000), ("10.96.0.1", 53), ("10.1.0.5", 5353), 1);
    let orig = nest(CTA_TUPLE_ORIG, &[tuple_payload(&good.orig)]);
    let reply = nest(CTA_TUPLE_REPLY, &[tuple_payload(&good.reply)]);
    let with = |attrs: &[&[u8]]| -> Vec<u8> {
        let mut p = vec![AF_INET, 0, 0, 0];
        for a in attrs {
            p.extend_from_slice(a);
        }
        p
    };
    let ip_nest = |parts: &[Vec<u8>]| nest(CTA_TUPLE_IP, parts);
    let udp_proto = nest(
        CTA_TUPLE_PROTO,
        &[
            attr(CTA_PROTO_NUM, &[17]),
            attr(CTA_PROTO_SRC_PORT, &[0, 1]),
            attr(CTA_PROTO_DST_PORT, &[0, 2]),
        ],
    );
    let v4 = |kind, last| attr(kind, &[10, 0, 0, last]);
    let tuple = |parts: &[Vec<u8>]| nest(CTA_TUPLE_REPLY, parts);

    let cases: Vec<(&str, Vec<u8>, Malformed)> = vec![
        (
            "short nfgenmsg",
            vec![2, 0],
            Malformed::ShortPayload {
                what: "conntrack message",
                len: 2,
            },
        ),
        ("no tuples", with(&[]), Malformed::Missing("CTA_TUPLE_ORIG")),
        (
            "no reply",
            with(&[&orig]),
            Malformed::Missing("CTA_TUPLE_REPLY"),
        ),
        (
            "attribute length 3",
            with(&[&orig, &[3, 0, 2, 0]]),
            Malformed::AttributeLength {
                kind: 2,
                len: 3,
                left: 4,
            },
        ),
        (
            "attribute past the end",
            with(&[&orig, &[200, 0, 2, 0]]),
            Malformed::AttributeLength {
                kind: 2,
                len: 200,
                left: 4,
            },
        ),
        (
            "leftover bytes",
            with(&[&orig, &reply, &[1, 2]]),
            Malformed::TruncatedAttribute { left: 2 },
        ),
        (
            "5-byte address",
            with(&[
                &orig,
                &tuple(&[
                    ip_nest(&[attr(CTA_IP_V4_SRC, &[1, 2, 3, 4, 5]), v4(CTA_IP_V4_DST, 1)]),
                    udp_proto.clone(),
                ]),
            ]),
            Malformed::AttributeSize {
                what: "CTA_IP_V4_SRC",
                len: 5,
            },
        ),
        (
            "mixed families",
            with(&[
                &orig,
                &tuple(&[
                    ip_nest(&[v4(CTA_IP_V4_SRC, 1), attr(CTA_IP_V6_DST, &[0; 16])]),
                    udp_proto.clone(),
                ]),
            ]),
            Malformed::MixedFamilies,
        ),
        (
            "no destination",
            with(&[
                &orig,
                &tuple(&[ip_nest(&[v4(CTA_IP_V4_SRC, 1)]), udp_proto.clone()]),
            ]),
            Malformed::Missing("a source or destination address"),
        ),
        (
            "no addresses",
            with(&[&orig, &tuple(&[ip_nest(&[]), udp_proto.clone()])]),
            Malformed::Missing("tuple addresses"),
        ),
        (
            "no protocol",
            with(&[
                &orig,
                &tuple(&[ip_nest(&[v4(CTA_IP_V4_SRC, 1), v4(CTA_IP_V4_DST, 2)])]),
            ]),
            Malformed::Missing("CTA_TUPLE_PROTO"),
        ),
        (
            "UDP without ports",
            with(&[
                &orig,
                &tuple(&[
                    ip_nest(&[v4(CTA_IP_V4_SRC, 1), v4(CTA_IP_V4_DST, 2)]),
                    nest(CTA_TUPLE_PROTO, &[attr(CTA_PROTO_NUM, &[17])]),
                ]),
            ]),
            Malformed::Missing("the ports of a UDP tuple"),
        ),
        (
            "3-byte port",
            with(&[
                &orig,
                &tuple(&[
                    ip_nest(&[v4(CTA_IP_V4_SRC, 1), v4(CTA_IP_V4_DST, 2)]),
                    nest(
                        CTA_TUPLE_PROTO,
                        &[
                            attr(CTA_PROTO_NUM, &[17]),
                            attr(CTA_PROTO_SRC_PORT, &[0, 0, 1]),
                        ],
                    ),
                ]),
            ]),
            Malformed::AttributeSize {
                what: "CTA_PROTO_SRC_PORT",
                len: 3,
            },
        ),
        (
            "4-byte zone",
            with(&[&orig, &reply, &attr(CTA_ZONE, &[0, 0, 0, 1])]),
            Malformed::AttributeSize {
                what: "CTA_ZONE",
                len: 4,
            },
        ),
        (
            "2-byte id",
            with(&[&orig, &reply, &attr(CTA_ID, &[0, 1])]),
            Malformed::AttributeSize {
                what: "CTA_ID",
                len: 2,
            },
        ),
    ];
    for (name, payload, want) in cases {
        assert_eq!(parse_entry(&payload), Err(want), "{name}");
    }

    // IPv4 tuples in an AF_INET6 message.
    let mut v6 = with(&[&orig, &reply]);
    v6[0] = AF_INET6;
    assert_eq!(
        parse_entry(&v6),
        Err(Malformed::FamilyMismatch { family: AF_INET6 })
    );
    // The well-formed one parses.
    assert!(parse_entry(&with(&[&orig, &reply])).is_ok());
}

#[test]
fn entries_of_other_protocols_parse_without_ports() {
    let icmp = Tuple {
        src: ip("10.0.0.1"),
        dst: ip("10.0.0.2"),
        proto: 1,
        src_port: None,
        dst_port: None,
    };
    let e = FakeEntry {
        family: AF_INET,
        orig: icmp,
        reply: icmp,
        zone: 3,
        id: 9,
    };
    let payload = entry_payload(&e);
    let parsed = parse_entry(&payload).unwrap();
    assert_eq!((parsed.orig, parsed.zone, parsed.id), (icmp, 3, Some(9)));
}

#[test]
fn nested_flag_is_optional_and_unknown_attributes_are_skipped() {
    let t = udp("2001:db8::1", 7, "2001:db8::2", 8);
    let mut plain = tuple_payload(&t);
    // Clear NLA_F_NESTED on the CTA_TUPLE_IP nest header (bytes 2..4).
    let kind = u16::from_ne_bytes([plain[2], plain[3]]) & !NLA_F_NESTED;
    plain[2..4].copy_from_slice(&kind.to_ne_bytes());
    plain.extend(attr(99, &[1, 2, 3])); // unknown, padded
    assert_eq!(parse_tuple(&plain), Ok(t));
}

#[test]
fn error_messages_need_the_whole_nlmsgerr() {
    let parse_error_code = |payload: &[u8]| parse_error(payload).map(|e| e.raw_code());
    assert_eq!(parse_error_code(&error_msg(1, -2)[16..]), Ok(-2));
    assert_eq!(
        parse_error_code(&[0xfe, 0xff, 0xff, 0xff]),
        Err(Malformed::ShortPayload {
            what: "NLMSG_ERROR",
            len: 4
        })
    );
}

#[test]
fn the_end_of_a_dump_carries_its_status() {
    let flows = FlowSet::by_family(&[stale_flow("10.96.0.10", 53, "10.1.0.5", 5353)]);
    let handle = |datagram: &[u8]| {
        handle_dump_datagram(datagram, 5, &flows[0], &mut BTreeSet::new(), &mut 0)
    };
    let kernel_error = |result| match result {
        Err(ConntrackError::Kernel {
            request: "dump",
            source,
        }) => source.raw_os_error(),
        other => panic!("{other:?}"),
    };

    assert!(matches!(handle(&done_msg(5)), Ok(Progress::Done)));
    // The kernel may leave the status out.
    assert!(matches!(
        handle(&nlmsg(NLMSG_DONE, 2, 5, &[])),
        Ok(Progress::Done)
    ));
    // A failed dump.
    let failed = nlmsg(NLMSG_DONE, 2, 5, &(-libc::EINTR).to_ne_bytes());
    assert_eq!(kernel_error(handle(&failed)), Some(libc::EINTR));
    // Another request's end is not ours.
    assert!(matches!(handle(&done_msg(4)), Ok(Progress::More)));
    // A cut status is malformed.
    assert!(matches!(
        handle(&nlmsg(NLMSG_DONE, 2, 5, &[0, 0])),
        Err(ConntrackError::Malformed(Malformed::ShortPayload {
            what: "NLMSG_DONE",
            len: 2
        }))
    ));
    // The kernel's overrun notice.
    assert!(matches!(
        handle(&nlmsg(NLMSG_OVERRUN, 0, 5, &[])),
        Err(ConntrackError::Overrun { .. })
    ));
    // An absurd error code is reported, without overflowing.
    assert_eq!(
        kernel_error(handle(&error_msg(5, i32::MIN))),
        Some(i32::MAX)
    );
}

proptest! {
    #![proptest_config(crate::fuzz_config(2000))]

    /// Arbitrary bytes never panic the datagram handler.
    #[test]
    fn arbitrary_datagrams_do_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        let flows = FlowSet::by_family(&[stale_flow("0.0.0.0", 1, "127.0.0.1", 2)]);
        let _ = handle_dump_datagram(&bytes, 5, &flows[0], &mut BTreeSet::new(), &mut 0);
        let _ = parse_entry(&bytes);
    }

    /// Corrupting any bytes of a real entry never panics, and whatever
    /// still parses names a non-empty tuple.
    #[test]
    fn corrupted_entries_do_not_panic(flips in proptest::collection::vec((0usize..164, any::<u8>()), 1..6)) {
        let mut bytes = KERNEL_ENTRY;
        for (at, value) in flips {
            bytes[at] = value;
        }
        for msg in messages(&bytes).flatten() {
            if let Ok(entry) = parse_entry(msg.payload) {
                prop_assert!(!entry.orig_raw.is_empty());
            }
        }
    }
}

// -- matching --

#[test]
fn filter_matching() {
    let flow = stale_flow("10.96.0.10", 53, "10.1.0.5", 5353);
    let nodeport = stale_flow("0.0.0.0", 30053, "10.1.0.5", 5353);
    let nodeport6 = stale_flow("::", 30053, "fd00::5", 5353);
    let mixed = stale_flow("10.96.0.11", 53, "fd00::5", 5353);
    let sets = FlowSet::by_family(&[flow, nodeport, nodeport6, mixed]);
    assert_eq!(sets.len(), 2);
    assert_eq!(sets[0].family, AF_INET);
    assert!(!sets[0].flows.contains(&mixed) && !sets[1].flows.contains(&mixed));

    let tcp = |mut e: FakeEntry| {
        e.orig.proto = libc::IPPROTO_TCP as u8;
        e.reply.proto = libc::IPPROTO_TCP as u8;
        e
    };
    let client = ("10.2.0.7", 40000);
    let table: Vec<(&str, FakeEntry, bool)> = vec![
        (
            "exact",
            dnat_entry(client, ("10.96.0.10", 53), ("10.1.0.5", 5353), 1),
            true,
        ),
        (
            "other vip",
            dnat_entry(client, ("10.96.0.99", 53), ("10.1.0.5", 5353), 1),
            false,
        ),
        (
            "other port",
            dnat_entry(client, ("10.96.0.10", 54), ("10.1.0.5", 5353), 1),
            false,
        ),
        (
            "other backend",
            dnat_entry(client, ("10.96.0.10", 53), ("10.1.0.6", 5353), 1),
            false,
        ),
        (
            "other backend port",
            dnat_entry(client, ("10.96.0.10", 53), ("10.1.0.5", 53), 1),
            false,
        ),
        (
            "tcp",
            tcp(dnat_entry(
                client,
                ("10.96.0.10", 53),
                ("10.1.0.5", 5353),
                1,
            )),
            false,
        ),
        (
            "nodeport, any node address",
            dnat_entry(client, ("192.168.1.4", 30053), ("10.1.0.5", 5353), 1),
            true,
        ),
        (
            "nodeport, other backend",
            dnat_entry(client, ("192.168.1.4", 30053), ("10.1.0.9", 5353), 1),
            false,
        ),
        (
            "nodeport6",
            dnat_entry(
                ("fd00::77", 9),
                ("2001:db8::4", 30053),
                ("fd00::5", 5353),
                1,
            ),
            true,
        ),
        (
            "v6 exact not asked",
            dnat_entry(("fd00::77", 9), ("fd00::10", 53), ("fd00::5", 5353), 1),
            false,
        ),
        (
            "mixed flow never",
            dnat_entry(("fd00::77", 9), ("fd00::11", 53), ("fd00::5", 5353), 1),
            false,
        ),
    ];
    for (name, e, want) in table {
        let payload = entry_payload(&e);
        let entry = parse_entry(&payload).unwrap();
        let got = sets.iter().any(|s| s.matches(&entry));
        assert_eq!(got, want, "{name}");
    }
}
