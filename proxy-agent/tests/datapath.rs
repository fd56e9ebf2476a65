//! Packet-fixture tests of the TC programs through `BPF_PROG_TEST_RUN`.
//!
//! Each test loads the real embedded object (unpinned, its own maps),
//! programs services through the real `EbpfDataplane`, runs packets built
//! as data through the programs, and checks the verdict and the bytes that
//! come out, including IP and L4 checksums computed independently by
//! `etherparse`. Needs root (CAP_BPF + CAP_NET_ADMIN).
use std::net::{IpAddr, Ipv4Addr};

use etherparse::{Ipv4Header, NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use proxy_agent::{
    dataplane::Dataplane,
    model::{
        Backend, Frontend, FrontendKey, FrontendKind, FrontendPolicy, Protocol, ServiceName,
        ServiceTable,
    },
};
use proxy_common::{PROG_EGRESS, PROG_INGRESS, stat};

mod common;
use common::{Fixture, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, Tcp};

const CLIENT: [u8; 4] = [10, 0, 0, 7];
const VIP: [u8; 4] = [10, 96, 0, 10];
const BACKENDS: [[u8; 4]; 3] = [[10, 244, 1, 1], [10, 244, 1, 2], [10, 244, 1, 3]];
const TARGET_PORT: u16 = 8080;

fn frontend(backends: &[[u8; 4]], port: u16) -> Frontend {
    Frontend {
        service: ServiceName {
            namespace: "default".into(),
            name: "web".into(),
        },
        port_name: "http".into(),
        kind: FrontendKind::ClusterIp,
        backends: backends
            .iter()
            .map(|b| Backend {
                ip: IpAddr::V4(Ipv4Addr::from(*b)),
                port,
            })
            .collect(),
        cluster_backends: Vec::new(),
        policy: FrontendPolicy::default(),
    }
}

fn key(vip: [u8; 4], port: u16, protocol: Protocol) -> FrontendKey {
    FrontendKey {
        ip: IpAddr::V4(Ipv4Addr::from(vip)),
        port,
        protocol,
    }
}

impl Fixture {
    /// Loads the programs and programs VIP:80/TCP and VIP:53/UDP over the
    /// three backends.
    fn new() -> Self {
        let mut f = Fixture::load();
        let mut table = ServiceTable::new();
        table.insert(
            key(VIP, 80, Protocol::Tcp),
            frontend(&BACKENDS, TARGET_PORT),
        );
        table.insert(key(VIP, 53, Protocol::Udp), frontend(&BACKENDS, 5353));
        f.set_table(table);
        f
    }
}

fn tcp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, kind: Tcp) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 64240);
    let b = match kind {
        Tcp::Syn => b.syn(),
        Tcp::Ack => b.ack(5000),
        Tcp::SynAck => b.syn().ack(1001),
        Tcp::Fin => b.fin().ack(5000),
    };
    let payload: &[u8] = if matches!(kind, Tcp::Ack) {
        b"GET / HTTP/1.1\r\n\r\n"
    } else {
        b""
    };
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("build TCP packet");
    out
}

fn udp(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
        .ipv4(src, dst, 64)
        .udp(sport, dport);
    let payload = b"\x12\x34query";
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("build UDP packet");
    out
}

/// What a packet looks like after the program, with checksums verified.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
}

fn inspect(packet: &[u8]) -> Seen {
    let sliced = SlicedPacket::from_ethernet(packet).expect("output parses");
    let Some(NetSlice::Ipv4(ip)) = sliced.net else {
        panic!("output is not IPv4")
    };
    let ip_header: Ipv4Header = ip.header().to_header();
    assert_eq!(
        ip_header.calc_header_checksum(),
        ip_header.header_checksum,
        "IPv4 header checksum"
    );
    let (sport, dport) = match sliced.transport {
        Some(TransportSlice::Tcp(t)) => {
            let expected = t
                .to_header()
                .calc_checksum_ipv4(&ip_header, t.payload())
                .expect("checksum computable");
            assert_eq!(t.checksum(), expected, "TCP checksum");
            (t.source_port(), t.destination_port())
        }
        Some(TransportSlice::Udp(u)) => {
            let header = u.to_header();
            if header.checksum != 0 {
                let expected = header
                    .calc_checksum_ipv4(&ip_header, u.payload())
                    .expect("checksum computable");
                assert_eq!(header.checksum, expected, "UDP checksum");
            }
            (header.source_port, header.destination_port)
        }
        _ => panic!("no TCP/UDP in output"),
    };
    Seen {
        src: ip_header.source,
        dst: ip_header.destination,
        sport,
        dport,
    }
}

#[test]
fn syn_to_vip_is_dnated_to_a_backend_with_valid_checksums() {
    let f = Fixture::new();
    let (verdict, out) = f.ingress(&tcp(CLIENT, 40000, VIP, 80, Tcp::Syn));
    assert_eq!(verdict, TC_ACT_OK);
    let seen = inspect(&out);
    assert!(
        BACKENDS.contains(&seen.dst),
        "DNATed to a backend: {seen:?}"
    );
    assert_eq!(seen.dport, TARGET_PORT);
    assert_eq!((seen.src, seen.sport), (CLIENT, 40000), "source untouched");
    assert_eq!(f.stat(stat::DNAT_NEW), 1);
}

#[test]
fn later_packets_of_a_flow_stay_on_its_backend() {
    let f = Fixture::new();
    let (_, out) = f.ingress(&tcp(CLIENT, 40001, VIP, 80, Tcp::Syn));
    let first = inspect(&out).dst;
    for _ in 0..20 {
        let (verdict, out) = f.ingress(&tcp(CLIENT, 40001, VIP, 80, Tcp::Ack));
        assert_eq!(verdict, TC_ACT_OK);
        let seen = inspect(&out);
        assert_eq!(seen.dst, first, "same backend for the whole flow");
        assert_eq!(seen.dport, TARGET_PORT);
    }
    assert_eq!(f.stat(stat::DNAT_NEW), 1);
    assert_eq!(f.stat(stat::DNAT_ESTABLISHED), 20);
}

#[test]
fn new_flows_spread_over_every_backend() {
    let f = Fixture::new();
    let mut hits = [0u32; 3];
    for sport in 0..300u16 {
        let (_, out) = f.ingress(&tcp(CLIENT, 20000 + sport, VIP, 80, Tcp::Syn));
        let dst = inspect(&out).dst;
        let i = BACKENDS
            .iter()
            .position(|b| *b == dst)
            .expect("a known backend");
        hits[i] += 1;
    }
    // Uniform choice: each of 3 backends gets about 100 of 300; 40 is far
    // outside any plausible random deviation (p < 1e-9).
    for (i, h) in hits.iter().enumerate() {
        assert!(*h > 40, "backend {i} got only {h} of 300 flows: {hits:?}");
    }
}

#[test]
fn reply_is_rewritten_back_to_the_vip() {
    let f = Fixture::new();
    let (_, out) = f.ingress(&tcp(CLIENT, 40002, VIP, 80, Tcp::Syn));
    let backend = inspect(&out).dst;
    let (verdict, out) = f.egress(&tcp(backend, TARGET_PORT, CLIENT, 40002, Tcp::SynAck));
    assert_eq!(verdict, TC_ACT_OK);
    let seen = inspect(&out);
    assert_eq!(
        seen,
        Seen {
            src: VIP,
            dst: CLIENT,
            sport: 80,
            dport: 40002
        }
    );
    assert_eq!(f.stat(stat::REVNAT), 1);
}

/// The ports a client may reuse straight to a backend, which only UDP and
/// SCTP packets to them look for, are the UDP (and SCTP) backends' ports;
/// a port stays after its last backend, as that backend's flows may.
#[test]
fn udp_backend_ports_are_marked_and_kept() {
    let mut f = Fixture::new();
    let udp_only = std::collections::BTreeSet::from([5353]);
    assert_eq!(f.dp.backend_ports_in_kernel(), udp_only, "not TCP's 8080");
    f.set_table(ServiceTable::new());
    assert_eq!(f.dp.backend_ports_in_kernel(), udp_only, "kept");
}

/// How a service flow ends before its client reuses the port: closed by
/// FIN both ways, or abandoned mid-stream (the client vanished).
const FLOW_ENDINGS: [Option<Tcp>; 2] = [Some(Tcp::Fin), None];

/// Runs one service flow from `sport` through the handshake and a data
/// segment each way, then ends it as `ending` says; returns its backend.
fn service_flow(f: &Fixture, sport: u16, ending: Option<Tcp>) -> [u8; 4] {
    let (_, out) = f.ingress(&tcp(CLIENT, sport, VIP, 80, Tcp::Syn));
    let backend = inspect(&out).dst;
    let reply = |kind| inspect(&f.egress(&tcp(backend, TARGET_PORT, CLIENT, sport, kind)).1);
    assert_eq!(reply(Tcp::SynAck).src, VIP);
    assert_eq!(reply(Tcp::SynAck).src, VIP, "a retransmitted SYN-ACK too");
    let (_, out) = f.ingress(&tcp(CLIENT, sport, VIP, 80, Tcp::Ack));
    assert_eq!(inspect(&out).dst, backend);
    assert_eq!(reply(Tcp::Ack).src, VIP);
    if let Some(kind) = ending {
        let (_, out) = f.ingress(&tcp(CLIENT, sport, VIP, 80, kind));
        assert_eq!(inspect(&out).dst, backend);
        assert_eq!(reply(kind).src, VIP);
    }
    backend
}

/// A client that connects straight to a backend from a port a service flow
/// to that backend used gets the backend's answers untranslated: the old
/// flow's reply entry must not claim the new connection (its SYN-ACK from
/// the VIP would be refused, and the connection would time out).
#[test]
fn a_direct_connection_on_a_service_flows_tuple_is_not_reverse_nated() {
    for ending in FLOW_ENDINGS {
        let f = Fixture::new();
        let sport = 40020;
        let backend = service_flow(&f, sport, ending);
        let (verdict, out) = f.ingress(&tcp(CLIENT, sport, backend, TARGET_PORT, Tcp::Syn));
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(inspect(&out).dst, backend, "not for a frontend: untouched");
        let direct = Seen {
            src: backend,
            dst: CLIENT,
            sport: TARGET_PORT,
            dport: sport,
        };
        for kind in [Tcp::SynAck, Tcp::Ack, Tcp::Fin] {
            let (verdict, out) = f.egress(&tcp(backend, TARGET_PORT, CLIENT, sport, kind));
            assert_eq!(verdict, TC_ACT_OK);
            assert_eq!(
                inspect(&out),
                direct,
                "{kind:?} of the direct connection after a flow ended by {ending:?}"
            );
        }
        assert_eq!(f.stat(stat::REVNAT), 3 + u64::from(ending.is_some()));
    }
}

/// A client that connects to the VIP again from the port of an earlier
/// flow opens a new flow (a fresh backend choice) whose answers are
/// translated, however the earlier one ended.
#[test]
fn a_reconnect_through_the_vip_on_a_used_tuple_is_a_new_flow() {
    for ending in FLOW_ENDINGS {
        let f = Fixture::new();
        let sport = 40021;
        service_flow(&f, sport, ending);
        assert_eq!(f.stat(stat::DNAT_NEW), 1);
        let (_, out) = f.ingress(&tcp(CLIENT, sport, VIP, 80, Tcp::Syn));
        let backend = inspect(&out).dst;
        assert_eq!(f.stat(stat::DNAT_NEW), 2, "after {ending:?}");
        let (_, out) = f.egress(&tcp(backend, TARGET_PORT, CLIENT, sport, Tcp::SynAck));
        assert_eq!(inspect(&out).src, VIP, "after {ending:?}");
    }
}

/// UDP has no handshake to tell a new flow by: a datagram from the client
/// straight to the backend, from the port of a service flow with it, makes
/// the old flow forgotten, so the answers come back untranslated; the next
/// datagram to the VIP starts a new flow.
#[test]
fn a_udp_client_reaching_the_backend_directly_from_a_flows_port_gets_direct_answers() {
    let f = Fixture::new();
    let sport = 33010;
    let (_, out) = f.ingress(&udp(CLIENT, sport, VIP, 53));
    let backend = inspect(&out).dst;
    let (_, reply) = f.egress(&udp(backend, 5353, CLIENT, sport));
    assert_eq!(inspect(&reply).src, VIP);

    let direct = Seen {
        src: backend,
        dst: CLIENT,
        sport: 5353,
        dport: sport,
    };
    for round in 1..=2 {
        let (verdict, out) = f.ingress(&udp(CLIENT, sport, backend, 5353));
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(inspect(&out).dst, backend, "untouched");
        let (_, reply) = f.egress(&udp(backend, 5353, CLIENT, sport));
        assert_eq!(inspect(&reply), direct, "round {round}");
        assert_eq!(f.stat(stat::FLOW_TUPLE_REUSED), 1, "forgotten once");
    }

    let (_, out) = f.ingress(&udp(CLIENT, sport, VIP, 53));
    assert_eq!(f.stat(stat::DNAT_NEW), 2, "back to the VIP: a new flow");
    let backend = inspect(&out).dst;
    let (_, reply) = f.egress(&udp(backend, 5353, CLIENT, sport));
    assert_eq!(inspect(&reply).src, VIP);
}

#[test]
fn udp_is_translated_both_ways_and_a_zero_checksum_stays_zero() {
    let f = Fixture::new();
    let (verdict, out) = f.ingress(&udp(CLIENT, 33000, VIP, 53));
    assert_eq!(verdict, TC_ACT_OK);
    let seen = inspect(&out);
    assert!(BACKENDS.contains(&seen.dst));
    assert_eq!(seen.dport, 5353);
    let (_, reply) = f.egress(&udp(seen.dst, 5353, CLIENT, 33000));
    assert_eq!(inspect(&reply).src, VIP);
    assert_eq!(inspect(&reply).sport, 53);

    let mut no_csum = udp(CLIENT, 33001, VIP, 53);
    let csum_off = 14 + 20 + 6;
    no_csum[csum_off] = 0;
    no_csum[csum_off + 1] = 0;
    let (_, out) = f.ingress(&no_csum);
    assert_eq!(
        &out[csum_off..csum_off + 2],
        &[0, 0],
        "no checksum stays none"
    );
    assert!(BACKENDS.contains(&inspect(&out).dst));
}

#[test]
fn packets_for_anything_else_pass_unchanged() {
    let f = Fixture::new();
    let cases = [
        tcp(CLIENT, 40003, [10, 96, 0, 11], 80, Tcp::Syn), // other address
        tcp(CLIENT, 40003, VIP, 81, Tcp::Syn),             // other port
        udp(CLIENT, 40003, VIP, 80),                       // other protocol on the port
        tcp(BACKENDS[0], 8080, CLIENT, 40003, Tcp::SynAck), // unrelated reply
    ];
    for packet in &cases {
        for prog in [PROG_INGRESS, PROG_EGRESS] {
            let (verdict, out) = f.run(prog, packet);
            assert_eq!(verdict, TC_ACT_OK);
            assert_eq!(&out, packet, "{prog} left the packet unchanged");
        }
    }
    assert_eq!(f.stat(stat::PASS_NO_SERVICE), cases.len() as u64);
}

#[test]
fn truncated_and_malformed_packets_pass_unchanged() {
    let f = Fixture::new();
    let syn = tcp(CLIENT, 40004, VIP, 80, Tcp::Syn);
    let mut cases: Vec<Vec<u8>> = vec![
        // BPF_PROG_TEST_RUN itself refuses IPv4 frames shorter than a full
        // IPv4 header (EINVAL), so the shortest cut tested leaves no L4.
        syn[..14 + 20].to_vec(),      // no L4 header
        syn[..14 + 20 + 3].to_vec(),  // half a source port
        syn[..14 + 20 + 10].to_vec(), // TCP header cut short
    ];
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x4f; // IHL 15 (60 bytes) runs past the TCP header's end
    cases.push(bad_ihl[..14 + 20 + 20].to_vec());
    let mut options_past_end = syn[..14 + 20 + 4].to_vec();
    options_past_end[14] = 0x46; // IHL 6: the L4 header starts past the ports
    cases.push(options_past_end);
    let mut small_ihl = syn.clone();
    small_ihl[14] = 0x43; // IHL 3: shorter than the minimum header
    cases.push(small_ihl);
    let mut not_v4 = syn.clone();
    not_v4[14] = 0x65; // version 6 behind an IPv4 ethertype
    cases.push(not_v4);
    let mut fragment = syn.clone();
    fragment[14 + 6] = 0x20; // more-fragments set
    cases.push(fragment);
    for (i, packet) in cases.iter().enumerate() {
        let (verdict, out) = f.ingress(packet);
        assert_eq!(verdict, TC_ACT_OK, "case {i} passed");
        assert_eq!(&out, packet, "case {i} unchanged");
        let (verdict, out) = f.egress(packet);
        assert_eq!(verdict, TC_ACT_OK, "case {i} passed on egress");
        assert_eq!(&out, packet, "case {i} unchanged on egress");
    }
    assert_eq!(f.stat(stat::DNAT_NEW), 0);
    assert!(f.stat(stat::PASS_TRUNCATED) >= 5);
    assert_eq!(f.stat(stat::PASS_FRAGMENT), 1);
}

#[test]
fn a_removed_backend_gets_no_new_flows_but_keeps_established_ones() {
    let mut f = Fixture::new();
    // Find a flow that landed on backend 0.
    let mut sport = 41000;
    loop {
        let (_, out) = f.ingress(&tcp(CLIENT, sport, VIP, 80, Tcp::Syn));
        if inspect(&out).dst == BACKENDS[0] {
            break;
        }
        sport += 1;
        assert!(sport < 41200, "no flow reached backend 0");
    }
    let mut table = ServiceTable::new();
    table.insert(
        key(VIP, 80, Protocol::Tcp),
        frontend(&BACKENDS[1..], TARGET_PORT),
    );
    table.insert(key(VIP, 53, Protocol::Udp), frontend(&BACKENDS, 5353));
    f.set_table(table);

    let (_, out) = f.ingress(&tcp(CLIENT, sport, VIP, 80, Tcp::Ack));
    assert_eq!(
        inspect(&out).dst,
        BACKENDS[0],
        "established flow keeps its backend"
    );
    for s in 0..200u16 {
        let (_, out) = f.ingress(&tcp(CLIENT, 50000 + s, VIP, 80, Tcp::Syn));
        assert_ne!(
            inspect(&out).dst,
            BACKENDS[0],
            "no new flow to a removed backend"
        );
    }
}

#[test]
fn a_udp_flow_to_a_removed_backend_moves_to_a_live_one() {
    let mut f = Fixture::new();
    // A UDP "flow" (one client socket) that landed on backend 0, and one on
    // another backend.
    let mut on_zero = None;
    let mut elsewhere = None;
    for sport in 42000..42200u16 {
        let (_, out) = f.ingress(&udp(CLIENT, sport, VIP, 53));
        let seen = inspect(&out);
        if seen.dst == BACKENDS[0] {
            on_zero.get_or_insert((sport, seen.dst));
        } else {
            elsewhere.get_or_insert((sport, seen.dst));
        }
        if on_zero.is_some() && elsewhere.is_some() {
            break;
        }
    }
    let (sport, _) = on_zero.expect("a UDP flow on backend 0");
    let (other_sport, other_backend) = elsewhere.expect("a UDP flow elsewhere");
    // Its reply is reverse-NATed while the backend is there.
    let (_, reply) = f.egress(&udp(BACKENDS[0], 5353, CLIENT, sport));
    assert_eq!(inspect(&reply).src, VIP);

    let mut table = ServiceTable::new();
    table.insert(
        key(VIP, 80, Protocol::Tcp),
        frontend(&BACKENDS, TARGET_PORT),
    );
    table.insert(key(VIP, 53, Protocol::Udp), frontend(&BACKENDS[1..], 5353));
    f.set_table(table);

    // The next datagram of the same socket goes to a live backend, at once.
    let (_, out) = f.ingress(&udp(CLIENT, sport, VIP, 53));
    assert_ne!(
        inspect(&out).dst,
        BACKENDS[0],
        "UDP flow stuck on a removed backend"
    );
    // A late reply from the removed backend is no longer translated.
    let (_, late) = f.egress(&udp(BACKENDS[0], 5353, CLIENT, sport));
    assert_eq!(inspect(&late).src, BACKENDS[0]);
    // Flows on other backends are untouched.
    let (_, out) = f.ingress(&udp(CLIENT, other_sport, VIP, 53));
    assert_eq!(inspect(&out).dst, other_backend);
}

#[test]
fn a_service_without_backends_rejects_and_a_deleted_one_passes() {
    let mut f = Fixture::new();
    let mut table = ServiceTable::new();
    table.insert(key(VIP, 80, Protocol::Tcp), frontend(&[], TARGET_PORT));
    f.set_table(table);
    // The SYN comes back as a RST+ACK from the VIP, out of the interface it
    // arrived on, so the client fails at once.
    let (verdict, out) = f.ingress(&tcp(CLIENT, 42000, VIP, 80, Tcp::Syn));
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        inspect(&out),
        Seen {
            src: VIP,
            dst: CLIENT,
            sport: 80,
            dport: 42000
        }
    );
    let sliced = SlicedPacket::from_ethernet(&out).expect("output parses");
    let Some(TransportSlice::Tcp(rst)) = sliced.transport else {
        panic!("not TCP")
    };
    assert!(rst.rst() && rst.ack() && !rst.syn(), "RST+ACK");
    assert_eq!(rst.acknowledgment_number(), 1001, "acknowledges the SYN");
    assert_eq!(rst.sequence_number(), 0);
    assert_eq!(
        &out[0..12],
        &[2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2][..],
        "MACs swapped"
    );
    assert_eq!(f.stat(stat::REJECT), 1);
    // A later non-SYN packet of such a connection is dropped, not answered.
    let (verdict, _) = f.ingress(&tcp(CLIENT, 42000, VIP, 80, Tcp::Ack));
    assert_eq!(verdict, TC_ACT_SHOT);

    f.set_table(ServiceTable::new());
    let packet = tcp(CLIENT, 42001, VIP, 80, Tcp::Syn);
    let (verdict, out) = f.ingress(&packet);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, packet);
}

#[test]
fn reconcile_repairs_entries_removed_behind_the_agents_back() {
    let mut f = Fixture::new();
    let table = f.table.clone();
    // Wipe the maps the way drift would: a fresh reconcile against an empty
    // table, then ask for the real one again.
    f.dp.reconcile(&ServiceTable::new())
        .expect("reconcile to empty");
    let packet = tcp(CLIENT, 43000, VIP, 80, Tcp::Syn);
    assert_eq!(f.ingress(&packet).1, packet, "nothing programmed");
    let report = f.dp.reconcile(&table).expect("reconcile back");
    assert!(
        report.stats.kernel_writes >= 3 + 4 && report.repaired >= 3 + 4,
        "backends and slots rewritten: {report:?}"
    );
    let (_, out) = f.ingress(&packet);
    assert!(BACKENDS.contains(&inspect(&out).dst));
    // A second reconcile finds nothing to do.
    let again = f.dp.reconcile(&table).expect("reconcile again");
    assert_eq!(again.repaired, 0, "{again:?}");
}
