//! Packet-fixture scenarios, through `BPF_PROG_TEST_RUN`, of the service
//! features of the eBPF datapath beyond plain ClusterIP DNAT that a row of
//! the packet-case table (`common/cases.rs`, run by `datapath.rs`) cannot
//! express: several flows competing for masquerade ports, a client reusing
//! a masqueraded flow's tuple, the table changing under flows, affinity
//! over time, a full masquerade port space; and checks of the fixtures'
//! own checksum verification and of the verifier's instruction counts.
//!
//! Every test loads the real embedded object (unpinned, its own maps),
//! programs it through the real `EbpfDataplane` (a table diff, and the
//! node's network facts), runs packets built as data through the programs
//! and checks the verdict, the bytes that come out (every IP, TCP, UDP and
//! ICMP checksum verified with `etherparse`, SCTP's CRC32c with an
//! implementation of its own, `common/packet.rs`) and the packet counters.
//! Needs root.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use proxy_agent::model::{FrontendKind, Protocol, ServiceTable};
use proxy_common::{
    CT_FLAG_ESTABLISHED, CT_FLAG_SEEN_FIN, CtKey, CtValue, PROG_EGRESS, PROG_INGRESS,
    PROG_NEW_FLOW, PROG_REJECT, stat,
};

mod common;
use common::{
    Fixture, TC_ACT_OK, TC_ACT_SHOT,
    cases::{
        BACKENDS, CLIENT, NODE, NODE_PORT, POD_CLIENT, SVC_PORT, Setup, TARGET_PORT, VIP,
        backend_set, frontend, in_snat_range, ip, key, node_network, node_port_key, sa, table, v4s,
        with_affinity,
    },
    packet::{ETH_HLEN, Flow, Tcp, crc32c, flow, inspect, parse, sctp, sctp_init_chunk, tcp, udp},
};

/// Runs a packet through ingress, asserts it was passed, and returns what
/// came out.
fn ingress_ok(f: &Fixture, packet: &[u8]) -> Flow {
    let (verdict, out) = f.ingress(packet);
    assert_eq!(verdict, TC_ACT_OK, "ingress verdict");
    inspect(&out)
}

fn egress_ok(f: &Fixture, packet: &[u8]) -> Flow {
    let (verdict, out) = f.egress(packet);
    assert_eq!(verdict, TC_ACT_OK, "egress verdict");
    inspect(&out)
}

fn assert_untouched(f: &Fixture, prog: &str, packet: &[u8]) {
    let (verdict, out) = f.run(prog, packet);
    assert_eq!(verdict, TC_ACT_OK, "{prog} passes it");
    assert_eq!(out, packet, "{prog} leaves it unchanged");
}

// ---------------------------------------------------------------------------
// Masquerade.

/// Two concurrent masqueraded flows to one backend (same client, other
/// ports) get a masquerade port each, and each reply finds its own client.
/// (One flow's translation both ways is rows `nodeport-snat/*`.)
#[test]
fn concurrent_masqueraded_flows_get_their_own_ports() {
    let f = Setup::NodePortToOneBackend.load();
    let to_backend = sa(BACKENDS[0], TARGET_PORT);
    let node_port = sa(NODE, NODE_PORT);
    let client = sa(CLIENT, 40000);
    assert_eq!(
        ingress_ok(&f, &tcp(client, node_port, Tcp::Syn)),
        flow(client, to_backend)
    );
    let snat = egress_ok(&f, &tcp(client, to_backend, Tcp::Syn)).src;

    let client2 = sa(CLIENT, 40001);
    assert_eq!(
        ingress_ok(&f, &tcp(client2, node_port, Tcp::Syn)),
        flow(client2, to_backend)
    );
    let out2 = egress_ok(&f, &tcp(client2, to_backend, Tcp::Syn));
    assert_eq!(out2.src.ip(), ip(NODE));
    assert!(in_snat_range(out2.src.port()));
    assert_ne!(out2.src.port(), snat.port(), "each flow its own SNAT port");
    // Each reply finds its own client.
    let back2 = ingress_ok(&f, &tcp(to_backend, out2.src, Tcp::SynAck));
    assert_eq!(back2.dst, client2);
    let back1 = ingress_ok(&f, &tcp(to_backend, snat, Tcp::Ack));
    assert_eq!(back1.dst, client);
    assert_eq!(f.stat(stat::SNAT_NEW), 2);
    assert_eq!(f.stat(stat::SNAT_IN), 2);
    assert_eq!(f.stat(stat::DROP_SNAT_EXHAUSTED), 0);
    // Four entries per masqueraded flow.
    assert_eq!(f.dp.conntrack_len(), 8);
}

/// A client that connects straight to the backend from the port of a
/// closed masqueraded flow keeps its own address and gets untranslated
/// answers: neither masquerade leg of the old flow claims the connection.
#[test]
fn a_direct_connection_on_a_masqueraded_flows_tuple_is_left_alone() {
    let f = Setup::NodePortToOneBackend.load();
    let client = sa(CLIENT, 40010);
    let node_port = sa(NODE, NODE_PORT);
    let to_backend = sa(BACKENDS[0], TARGET_PORT);
    ingress_ok(&f, &tcp(client, node_port, Tcp::Syn));
    let snat = egress_ok(&f, &tcp(client, to_backend, Tcp::Syn)).src;
    for kind in [Tcp::SynAck, Tcp::Fin] {
        assert_eq!(ingress_ok(&f, &tcp(to_backend, snat, kind)).dst, client);
        assert_eq!(egress_ok(&f, &tcp(to_backend, client, kind)).src, node_port);
    }
    for kind in [Tcp::Ack, Tcp::Fin] {
        assert_eq!(
            ingress_ok(&f, &tcp(client, node_port, kind)).dst,
            to_backend
        );
        assert_eq!(egress_ok(&f, &tcp(client, to_backend, kind)).src, snat);
    }

    // The same client port, now to the backend itself.
    for kind in [Tcp::Syn, Tcp::Ack] {
        let direct = flow(client, to_backend);
        assert_eq!(ingress_ok(&f, &tcp(client, to_backend, kind)), direct);
        assert_eq!(
            egress_ok(&f, &tcp(client, to_backend, kind)),
            direct,
            "{kind:?} keeps its source"
        );
    }
    for kind in [Tcp::SynAck, Tcp::Ack] {
        let answer = flow(to_backend, client);
        assert_eq!(
            egress_ok(&f, &tcp(to_backend, client, kind)),
            answer,
            "{kind:?} keeps its source"
        );
    }
}

/// The UDP counterpart: a datagram straight to the backend from the port of
/// a masqueraded flow makes that flow forgotten, masquerade leg included.
#[test]
fn a_direct_udp_flow_on_a_masqueraded_flows_tuple_is_left_alone() {
    let f = Setup::UdpNodePortToOneBackend.load();
    let client = sa(CLIENT, 33020);
    let node_port = sa(NODE, NODE_PORT);
    let to_backend = sa(BACKENDS[0], TARGET_PORT);
    ingress_ok(&f, &udp(client, node_port));
    let snat = egress_ok(&f, &udp(client, to_backend)).src;
    assert_eq!(ingress_ok(&f, &udp(to_backend, snat)).dst, client);
    assert_eq!(egress_ok(&f, &udp(to_backend, client)).src, node_port);

    let direct = flow(client, to_backend);
    assert_eq!(ingress_ok(&f, &udp(client, to_backend)), direct);
    assert_eq!(f.stat(stat::FLOW_TUPLE_REUSED), 1);
    assert_eq!(
        egress_ok(&f, &udp(client, to_backend)),
        direct,
        "not masqueraded"
    );
    let answer = flow(to_backend, client);
    assert_eq!(
        egress_ok(&f, &udp(to_backend, client)),
        answer,
        "not reverse-NATed"
    );
}

#[test]
fn a_masqueraded_udp_flow_to_a_removed_backend_is_forgotten_with_its_masquerade_legs() {
    let mut f = Fixture::load();
    f.set_network(&node_network());
    let fe = |ips: &[Ipv4Addr]| frontend(FrontendKind::NodePort, &v4s(ips));
    f.set_table(table([(node_port_key(Protocol::Udp), fe(&BACKENDS[..2]))]));
    let node_port = sa(NODE, NODE_PORT);
    // One masqueraded flow on each backend: (client, backend, SNAT port),
    // and how many flows each backend got in all.
    let mut flows: [Option<(SocketAddr, SocketAddr, SocketAddr)>; 2] = [None, None];
    let mut per_backend = [0usize; 2];
    for port in 52000..52200u16 {
        let client = sa(CLIENT, port);
        let seen = ingress_ok(&f, &udp(client, node_port));
        let out = egress_ok(&f, &udp(client, seen.dst));
        assert_eq!(out.src.ip(), ip(NODE));
        let i = BACKENDS.iter().position(|b| ip(*b) == seen.dst.ip());
        let i = i.expect("a known backend");
        per_backend[i] += 1;
        flows[i].get_or_insert((client, seen.dst, out.src));
        if flows.iter().all(Option::is_some) {
            break;
        }
    }
    let [Some(gone), Some(kept)] = flows else {
        panic!("no flow on each backend: {flows:?}")
    };
    let flows_made = per_backend[0] + per_backend[1];
    assert_eq!(
        f.dp.conntrack_len(),
        4 * flows_made,
        "four entries per masqueraded flow"
    );

    f.set_table(table([(node_port_key(Protocol::Udp), fe(&BACKENDS[1..2]))]));
    assert_eq!(
        f.dp.conntrack_len(),
        4 * per_backend[1],
        "all four legs of every flow to the backend that left, and no other"
    );
    // A late datagram from the backend that left to the node port it had is
    // not turned into one to the client any more.
    let late = udp(gone.1, gone.2);
    assert_untouched(&f, PROG_INGRESS, &late);
    // The other flow is untouched.
    let back = ingress_ok(&f, &udp(kept.1, kept.2));
    assert_eq!(back, flow(kept.1, kept.0));
    // The socket whose backend left starts over on a live one.
    let seen = ingress_ok(&f, &udp(gone.0, node_port));
    assert_eq!(seen.dst, kept.1);
    let out = egress_ok(&f, &udp(gone.0, seen.dst));
    assert_eq!(out.src.ip(), ip(NODE));
}

// ---------------------------------------------------------------------------
// Session affinity.

/// Other clients have their own entries; when a client's backend leaves,
/// its next connection goes to one that remains and stays there, and the
/// old backend coming back does not pull it back. (One client's
/// connections sticking is row `affinity/tcp/new-flows-stick`.)
#[test]
fn session_affinity_keeps_a_client_on_its_backend_until_it_leaves() {
    let mut f = Setup::ClientIpAffinity.load();
    let vip_key = key(VIP, SVC_PORT, Protocol::Tcp);
    let vip = sa(VIP, SVC_PORT);

    let first = ingress_ok(&f, &tcp(sa(CLIENT, 45000), vip, Tcp::Syn)).dst;
    assert_eq!(f.dp.affinity_len(), 1);

    // Among twenty other clients, one lands on another backend (all on one:
    // p = 3^-19), and each stays where it is.
    let mut elsewhere = None;
    for c in 0..20u8 {
        let client = Ipv4Addr::new(203, 0, 113, 100 + c);
        let a = ingress_ok(&f, &tcp(sa(client, 46000), vip, Tcp::Syn)).dst;
        let b = ingress_ok(&f, &tcp(sa(client, 46001), vip, Tcp::Syn)).dst;
        assert_eq!(a, b, "client {client} keeps its backend");
        if a != first {
            elsewhere = Some(a);
        }
    }
    assert!(elsewhere.is_some(), "every client on one backend");
    assert_eq!(f.stat(stat::AFFINITY_HIT), 20);
    assert_eq!(f.dp.affinity_len(), 21);

    // The client's backend leaves: its next connection goes to one that
    // remains, and then stays there.
    let remaining: Vec<IpAddr> = backend_set()
        .into_iter()
        .filter(|b| *b != first.ip())
        .collect();
    f.set_table(table([(vip_key, with_affinity(&remaining, 10_800))]));
    let hits = f.stat(stat::AFFINITY_HIT);
    let moved = ingress_ok(&f, &tcp(sa(CLIENT, 45100), vip, Tcp::Syn)).dst;
    assert_ne!(moved, first, "no new connection to a backend that left");
    assert!(remaining.contains(&moved.ip()));
    assert_eq!(
        f.stat(stat::AFFINITY_HIT),
        hits,
        "the stale entry is not a hit"
    );
    for i in 1..10u16 {
        let seen = ingress_ok(&f, &tcp(sa(CLIENT, 45100 + i), vip, Tcp::Syn));
        assert_eq!(seen.dst, moved, "sticks to its new backend");
    }
    assert_eq!(f.stat(stat::AFFINITY_HIT), hits + 9);
    // The established connection to the backend that left keeps it.
    let est = ingress_ok(&f, &tcp(sa(CLIENT, 45000), vip, Tcp::Ack));
    assert_eq!(est.dst, first);

    // Re-adding the old backend does not pull the client back: its entry
    // now names the backend it moved to.
    f.set_table(table([(vip_key, with_affinity(&backend_set(), 10_800))]));
    for i in 0..10u16 {
        let seen = ingress_ok(&f, &tcp(sa(CLIENT, 45200 + i), vip, Tcp::Syn));
        assert_eq!(seen.dst, moved);
    }
    assert_eq!(f.stat(stat::AFFINITY_HIT), hits + 19);
}

#[test]
fn session_affinity_expires_after_its_timeout() {
    let mut f = Fixture::load();
    f.set_table(table([(
        key(VIP, SVC_PORT, Protocol::Tcp),
        with_affinity(&backend_set(), 1),
    )]));
    let vip = sa(VIP, SVC_PORT);
    let first = ingress_ok(&f, &tcp(sa(CLIENT, 47000), vip, Tcp::Syn)).dst;
    let second = ingress_ok(&f, &tcp(sa(CLIENT, 47001), vip, Tcp::Syn)).dst;
    assert_eq!(second, first);
    assert_eq!(f.stat(stat::AFFINITY_HIT), 1);
    std::thread::sleep(Duration::from_millis(1_200));
    // Past the timeout: the entry is not used (a fresh random choice, which
    // may or may not be the same backend), and is replaced by a new one.
    let third = ingress_ok(&f, &tcp(sa(CLIENT, 47002), vip, Tcp::Syn)).dst;
    assert_eq!(f.stat(stat::AFFINITY_HIT), 1, "expired entry not used");
    let fourth = ingress_ok(&f, &tcp(sa(CLIENT, 47003), vip, Tcp::Syn)).dst;
    assert_eq!(fourth, third, "the new entry is used");
    assert_eq!(f.stat(stat::AFFINITY_HIT), 2);
    assert_eq!(f.stat(stat::DNAT_NEW), 4);
}

// ---------------------------------------------------------------------------
// The fixtures' own checks.

#[test]
fn crc32c_of_the_test_matches_the_standard_check_value() {
    // The check value of the CRC-32C catalogue entry, so that the SCTP
    // fixtures' verdicts rest on a known-good CRC.
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
}

/// The checks of `inspect` can fail: one flipped bit in the L4 part of
/// each kind of packet is caught.
#[test]
fn inspect_catches_a_broken_checksum_of_every_kind() {
    let v6a = ip("fd00::1".parse::<Ipv6Addr>().expect("v6"));
    let v6b = ip("fd00::2".parse::<Ipv6Addr>().expect("v6"));
    let cases = [
        tcp(sa(CLIENT, 1), sa(VIP, 2), Tcp::Ack),
        udp(sa(CLIENT, 1), sa(VIP, 2)),
        tcp(sa(v6a, 1), sa(v6b, 2), Tcp::Ack),
        udp(sa(v6a, 1), sa(v6b, 2)),
        sctp(sa(CLIENT, 1), sa(VIP, 2), 0, &sctp_init_chunk(1, 1)),
        sctp(sa(v6a, 1), sa(v6b, 2), 0, &sctp_init_chunk(1, 1)),
    ];
    for (i, packet) in cases.iter().enumerate() {
        inspect(packet);
        let mut broken = packet.clone();
        *broken.last_mut().expect("non-empty") ^= 0x01;
        let caught = std::panic::catch_unwind(|| inspect(&broken)).is_err();
        assert!(caught, "case {i}: a corrupted packet passed inspection");
        assert!(parse(&broken).is_err(), "case {i}: parse let it pass");
    }
    // And the IPv4 header checksum.
    let mut broken = tcp(sa(CLIENT, 1), sa(VIP, 2), Tcp::Syn);
    broken[ETH_HLEN + 8] ^= 0x01; // TTL
    assert!(std::panic::catch_unwind(|| inspect(&broken)).is_err());
    // The padded SCTP rows pad a 50-byte packet: a 4-byte chunk.
    let short = sctp(sa(POD_CLIENT, 1), sa(VIP, 2), 0, &[14, 0, 0, 4]);
    assert_eq!(short.len(), 50);
}

// ---------------------------------------------------------------------------
// Verifier budget.

#[test]
fn every_program_stays_well_inside_the_verifier_budget() {
    // The kernel verifies at most 1 000 000 instructions per program; the
    // datapath once drifted up to that limit. Half of it is the guard rail.
    const BUDGET: u32 = 500_000;
    // Verification is most of the CPU an agent's start takes before it
    // can program anything. The per-packet programs stay small: the SCTP
    // CRC fix, the one large piece they share, is a global function the
    // kernel verifies once per program, not once per path to it (about
    // 200 000 instructions each when it was not).
    const PER_PACKET_BUDGET: u32 = 50_000;
    let f = Fixture::load();
    let mut over = Vec::new();
    let tc = [PROG_INGRESS, PROG_NEW_FLOW, PROG_REJECT, PROG_EGRESS];
    for name in tc.into_iter().chain(proxy_common::PROGS_SOCKET) {
        let info = f
            .ebpf
            .program(name)
            .expect("program present")
            .info()
            .expect("program info");
        let count = info
            .verified_instruction_count()
            .expect("kernel reports verified instructions (5.16+)");
        eprintln!("{name}: {count} verified instructions");
        assert!(count > 0);
        let budget = if [PROG_INGRESS, PROG_EGRESS].contains(&name) {
            PER_PACKET_BUDGET
        } else {
            BUDGET
        };
        if count >= budget {
            over.push((name, count, budget));
        }
    }
    assert!(
        over.is_empty(),
        "over budget (name, verified instructions, budget): {over:?}"
    );
}

// ---------------------------------------------------------------------------
// Masquerade ports.

/// `CLOCK_MONOTONIC` in ns: what `bpf_ktime_get_ns` reads.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
        0
    );
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Who held the masquerade ports: a client address and the frontend view
/// (`svc_id`) it reached.
#[derive(Clone, Copy)]
struct Holder {
    client: Ipv4Addr,
    svc_id: u32,
}

/// Claims every masquerade port towards `backend` with a reply-side entry
/// of `holder`'s, last seen at `last_seen_ns`, as earlier flows would have;
/// returns how many ports there are.
fn occupy_every_snat_port(
    f: &Fixture,
    backend: SocketAddr,
    holder: Holder,
    flags: u16,
    last_seen_ns: u64,
) -> usize {
    let mut ct = f.conntrack();
    let to_addr = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&v4.octets());
            a
        }
        IpAddr::V6(v6) => v6.octets(),
    };
    let mut ports = 0;
    for port in (1024..=u16::MAX).filter(|&p| in_snat_range(p)) {
        let key = CtKey {
            src: to_addr(backend.ip()),
            dst: to_addr(ip(NODE)),
            sport: backend.port().to_be(),
            dport: port.to_be(),
            proto: proxy_common::PROTO_TCP,
            family: proxy_common::FAMILY_V4,
            dir: proxy_common::CT_SNAT_IN,
            _pad0: 0,
        };
        let value = CtValue {
            nat_addr: to_addr(ip(holder.client)),
            nat_port: 1u16.to_be(),
            flags,
            backend_id: 0,
            svc_id: holder.svc_id,
            in_ifindex: 0,
            last_seen_ns,
        };
        ct.insert(key, value, 0).expect("insert a masquerade entry");
        ports += 1;
    }
    ports
}

/// The frontend view of the masqueraded flows in the conntrack map (the
/// one flow a test made).
fn snat_svc_id(f: &Fixture) -> u32 {
    let ct = f.conntrack();
    ct.iter()
        .filter_map(Result::ok)
        .find(|(k, _)| k.dir == proxy_common::CT_SNAT_IN)
        .map(|(_, v)| v.svc_id)
        .expect("a masquerade entry")
}

/// Another client than [`CLIENT`].
const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 99);

/// The masquerade ports a new flow may take: a free one (or one whose flow
/// is long over, past the backend's TIME_WAIT); and only when every port
/// tried is held, one whose closed flow was another tuple's (counted: the
/// connection may wait for a SYN retransmit). A live flow's port is never
/// taken: with every port live, the new flow is dropped.
#[test]
fn masquerade_ports_of_live_flows_are_never_taken_and_closed_ones_are_reused() {
    let f = Setup::NodePortToOneBackend.load();
    let to_backend = sa(BACKENDS[0], TARGET_PORT);
    let node_port = sa(NODE, NODE_PORT);
    let first = sa(CLIENT, 40999);
    ingress_ok(&f, &tcp(first, node_port, Tcp::Syn));
    let svc_id = snat_svc_id(&f);
    let other = Holder {
        client: OTHER_CLIENT,
        svc_id,
    };
    let one_second_ago = monotonic_ns() - 1_000_000_000;
    let reaches_the_backend_masqueraded = |client_port: u16| {
        let client = sa(CLIENT, client_port);
        let dnated = ingress_ok(&f, &tcp(client, node_port, Tcp::Syn));
        assert_eq!(dnated, flow(client, to_backend));
        let out = egress_ok(&f, &tcp(client, to_backend, Tcp::Syn));
        assert_eq!(out.src.ip(), ip(NODE));
        assert!(in_snat_range(out.src.port()));
        let back = ingress_ok(&f, &tcp(to_backend, out.src, Tcp::SynAck));
        assert_eq!(
            back,
            flow(to_backend, client),
            "the port leads back to the new client"
        );
    };

    // Live flows of another client.
    let ports = occupy_every_snat_port(&f, to_backend, other, CT_FLAG_ESTABLISHED, one_second_ago);
    assert!(ports > 30_000, "{ports} masquerade ports on this machine");
    let (verdict, _) = f.ingress(&tcp(sa(CLIENT, 41000), node_port, Tcp::Syn));
    assert_eq!(verdict, TC_ACT_SHOT, "no port left: dropped");
    assert_eq!(f.stat(stat::DROP_SNAT_EXHAUSTED), 1);

    // Closed 70 s ago: past any TIME_WAIT, free.
    occupy_every_snat_port(
        &f,
        to_backend,
        other,
        CT_FLAG_SEEN_FIN,
        monotonic_ns() - 70_000_000_000,
    );
    reaches_the_backend_masqueraded(41001);
    assert_eq!(f.stat(stat::SNAT_PORT_REUSED_EARLY), 0);

    // Closed a second ago by other tuples: of this client (its timestamps
    // on another connection's clock), then of another client. Taken, as a
    // last resort, and counted.
    let same_client = Holder {
        client: CLIENT,
        svc_id,
    };
    occupy_every_snat_port(
        &f,
        to_backend,
        same_client,
        CT_FLAG_SEEN_FIN,
        one_second_ago,
    );
    reaches_the_backend_masqueraded(41002);
    assert_eq!(f.stat(stat::SNAT_PORT_REUSED_EARLY), 1);
    occupy_every_snat_port(&f, to_backend, other, CT_FLAG_SEEN_FIN, one_second_ago);
    reaches_the_backend_masqueraded(41003);
    assert_eq!(f.stat(stat::SNAT_PORT_REUSED_EARLY), 2);
    assert_eq!(f.stat(stat::DROP_SNAT_EXHAUSTED), 1);
}

/// A client that reconnects from the same port gets the same masquerade
/// port (its previous flow's, closed): the backend sees the same tuple,
/// with a later sequence number, as it would without the masquerade.
#[test]
fn a_reconnecting_client_tuple_keeps_its_masquerade_port() {
    let f = Setup::NodePortToOneBackend.load();
    let to_backend = sa(BACKENDS[0], TARGET_PORT);
    let client = sa(CLIENT, 41000);
    let node_port = sa(NODE, NODE_PORT);
    let mut ports = Vec::new();
    for _ in 0..3 {
        ingress_ok(&f, &tcp(client, node_port, Tcp::Syn));
        let out = egress_ok(&f, &tcp(client, to_backend, Tcp::Syn));
        // The backend closes first, as servers without keep-alive do.
        ingress_ok(&f, &tcp(to_backend, out.src, Tcp::Fin));
        ports.push(out.src.port());
    }
    assert!(ports.iter().all(|p| *p == ports[0]), "{ports:?}");
    assert_eq!(f.stat(stat::SNAT_PORT_REUSED_EARLY), 0);
}

/// Traffic to addresses no frontend has passes after one lookup; a
/// Service's address stays known while its established flows may live, so
/// those keep their translation after the Service is deleted (as
/// conntrack keeps them for kube-proxy), while new connections pass.
#[test]
fn established_flows_outlive_their_service_and_other_traffic_passes_early() {
    let mut f = Fixture::load();
    f.set_table(table([(
        key(VIP, SVC_PORT, Protocol::Tcp),
        frontend(FrontendKind::ClusterIp, &[ip(BACKENDS[0])]),
    )]));
    let client = sa(POD_CLIENT, 41000);
    let vip = sa(VIP, SVC_PORT);
    let dnated = ingress_ok(&f, &tcp(client, vip, Tcp::Syn));
    assert_eq!(dnated.dst, sa(BACKENDS[0], TARGET_PORT));

    f.set_table(ServiceTable::new());
    assert_eq!(
        ingress_ok(&f, &tcp(client, vip, Tcp::Ack)),
        dnated,
        "the established flow keeps its backend"
    );
    assert_untouched(&f, PROG_INGRESS, &tcp(sa(POD_CLIENT, 41001), vip, Tcp::Syn));
    let before = f.stat(stat::DNAT_ESTABLISHED);
    let other = tcp(client, sa(Ipv4Addr::new(192, 0, 2, 99), SVC_PORT), Tcp::Ack);
    assert_untouched(&f, PROG_INGRESS, &other);
    assert_eq!(f.stat(stat::DNAT_ESTABLISHED), before);
}
