//! Packet-fixture tests of the TC programs through `BPF_PROG_TEST_RUN`.
//!
//! Every single-packet check is a row of one table (`common/cases.rs`),
//! run by [`packet_cases`]: a named setup programmed into the real embedded
//! object (unpinned, its own maps) through the real `EbpfDataplane`, a
//! packet built as data, the verdict and the bytes out of each hook
//! (including IP and L4 checksums computed independently by `etherparse`)
//! and the packet counters. The scenarios a row cannot express (a flow's
//! whole life, the table changing under flows, reconcile) are the
//! functions below; `datapath_services.rs` has the others. Needs root
//! (CAP_BPF + CAP_NET_ADMIN).
use std::net::{Ipv4Addr, SocketAddr};

use proxy_agent::{
    dataplane::Dataplane,
    model::{
        FrontendKind::{ClusterIp, ExternalIp},
        Protocol, ServiceTable,
    },
};
use proxy_common::{PROG_INGRESS, stat};

mod common;
use common::{
    Fixture, TC_ACT_OK,
    cases::{
        BACKENDS, CLIENT, DNS_PORT, DNS_TARGET_PORT, POD_CLIENT, SVC_PORT, Setup, TARGET_PORT, VIP,
        backend_set, cases, frontend, frontend_on, key, node_network, run_all, sa, table, v4s,
    },
    packet::{Flow, Tcp, flow, inspect, tcp, udp},
};

/// Every row of the packet-case table; prints each failing row's name and
/// why. `PACKET_CASE=text` runs the rows whose name contains `text`.
#[test]
fn packet_cases() {
    let cases = cases();
    let filter = std::env::var("PACKET_CASE").ok();
    let failed = run_all(&cases, filter.as_deref());
    for (name, why) in &failed {
        eprintln!("packet case {name} FAILED: {why}");
    }
    let names: Vec<&str> = failed.iter().map(|(name, _)| name.as_str()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} packet cases failed: {names:?}",
        failed.len(),
        cases.len()
    );
}

fn vip() -> SocketAddr {
    sa(VIP, SVC_PORT)
}

fn vip_dns() -> SocketAddr {
    sa(VIP, DNS_PORT)
}

/// The table of `Setup::Web` with other backends for VIP:80/TCP and
/// VIP:53/UDP.
fn web_over(tcp_backends: &[Ipv4Addr], udp_backends: &[Ipv4Addr]) -> ServiceTable {
    table([
        (
            key(VIP, SVC_PORT, Protocol::Tcp),
            frontend(ClusterIp, &v4s(tcp_backends)),
        ),
        (
            key(VIP, DNS_PORT, Protocol::Udp),
            frontend_on(ClusterIp, &v4s(udp_backends), DNS_TARGET_PORT),
        ),
    ])
}

/// The backends' ports, of every protocol: those a UDP or SCTP client may
/// reuse straight to a backend, and those a socket the hooks translated
/// has as its peer's; a port stays after its last backend, as that
/// backend's flows and sockets may.
#[test]
fn backend_ports_are_marked_and_kept() {
    let mut f = Setup::Web.load();
    let ports = std::collections::BTreeSet::from([DNS_TARGET_PORT, TARGET_PORT]);
    assert_eq!(f.dp.backend_ports_in_kernel(), ports, "UDP's and TCP's");
    f.set_table(ServiceTable::new());
    assert_eq!(f.dp.backend_ports_in_kernel(), ports, "kept");
}

/// How a service flow ends before its client reuses the port: closed by
/// FIN both ways, or abandoned mid-stream (the client vanished).
const FLOW_ENDINGS: [Option<Tcp>; 2] = [Some(Tcp::Fin), None];

/// Runs one service flow from `sport` through the handshake and a data
/// segment each way, then ends it as `ending` says; returns its backend.
fn service_flow(f: &Fixture, sport: u16, ending: Option<Tcp>) -> SocketAddr {
    let client = sa(CLIENT, sport);
    let (_, out) = f.ingress(&tcp(client, vip(), Tcp::Syn));
    let backend = inspect(&out).dst;
    let reply = |kind| inspect(&f.egress(&tcp(backend, client, kind)).1);
    assert_eq!(reply(Tcp::SynAck).src, vip());
    assert_eq!(reply(Tcp::SynAck).src, vip(), "a retransmitted SYN-ACK too");
    let (_, out) = f.ingress(&tcp(client, vip(), Tcp::Ack));
    assert_eq!(inspect(&out).dst, backend);
    assert_eq!(reply(Tcp::Ack).src, vip());
    if let Some(kind) = ending {
        let (_, out) = f.ingress(&tcp(client, vip(), kind));
        assert_eq!(inspect(&out).dst, backend);
        assert_eq!(reply(kind).src, vip());
    }
    backend
}

/// A Service whose external IP and port are another Service's backend: a
/// flow through the first is translated once, at the first ingress hook
/// it crosses, and marked; the bridge's own hook, which sees the packet
/// again with the backend (a frontend of the second Service) as its
/// destination, passes it untouched, and the reply is reversed once.
/// Traffic straight to that address goes to the second Service, as
/// kube-proxy sends it.
#[test]
fn a_packet_translated_at_one_ingress_hook_is_not_translated_at_the_next() {
    const EXTERNAL_TARGET_PORT: u16 = 9090;
    let mut f = common::Fixture::load();
    f.set_network(&node_network());
    let pod = std::net::IpAddr::V4(BACKENDS[0]);
    f.set_table(table([
        (
            key(VIP, SVC_PORT, Protocol::Tcp),
            frontend(ClusterIp, &v4s(&BACKENDS[..1])),
        ),
        (
            key(pod, TARGET_PORT, Protocol::Tcp),
            frontend_on(ExternalIp, &v4s(&BACKENDS[1..2]), EXTERNAL_TARGET_PORT),
        ),
    ]));
    let mark = 1u32 << proxy_common::TRANSLATED_MARK_BIT;
    let other_bits = 0x1;
    let client = sa(POD_CLIENT, 40100);
    let backend = sa(BACKENDS[0], TARGET_PORT);
    // At the pod's bridge port: translated and marked, the other bits kept.
    let (verdict, out, mark_out) =
        f.run_marked(PROG_INGRESS, &tcp(client, vip(), Tcp::Syn), other_bits);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(inspect(&out), flow(client, backend));
    assert_eq!(mark_out, other_bits | mark);
    // At the bridge's own hook: untouched.
    let (verdict, again, mark_again) = f.run_marked(PROG_INGRESS, &out, mark_out);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(again, out, "translated once");
    assert_eq!(mark_again, mark_out);
    assert_eq!(f.stat(stat::PASS_TRANSLATED), 1);
    assert_eq!(f.stat(stat::DNAT_NEW), 1);
    // One flow of the ClusterIP counted, whatever its packets.
    let clusterip = key(VIP, SVC_PORT, Protocol::Tcp);
    assert_eq!(f.dp.frontend_flows(&clusterip), Some(1));
    // The established flow's packets likewise.
    let (_, out, mark_out) = f.run_marked(PROG_INGRESS, &tcp(client, vip(), Tcp::Ack), 0);
    assert_eq!(inspect(&out), flow(client, backend));
    assert_eq!(mark_out, mark);
    let (_, again, _) = f.run_marked(PROG_INGRESS, &out, mark_out);
    assert_eq!(again, out);
    // The reply is reversed once.
    let (_, reply) = f.egress(&tcp(backend, client, Tcp::SynAck));
    assert_eq!(inspect(&reply), flow(vip(), client));
    assert_eq!(
        f.dp.frontend_flows(&clusterip),
        Some(1),
        "per flow, not per packet"
    );
    // Straight to the pod's address and port: the external IP's Service.
    let direct = sa(POD_CLIENT, 40101);
    let (_, out, mark_out) = f.run_marked(PROG_INGRESS, &tcp(direct, backend, Tcp::Syn), 0);
    let external_backend = sa(BACKENDS[1], EXTERNAL_TARGET_PORT);
    assert_eq!(inspect(&out), flow(direct, external_backend));
    assert_eq!(mark_out, mark);
    let (_, reply) = f.egress(&tcp(external_backend, direct, Tcp::SynAck));
    assert_eq!(inspect(&reply), flow(backend, direct));
}

/// A client that connects straight to a backend from a port a service flow
/// to that backend used gets the backend's answers untranslated: the old
/// flow's reply entry must not claim the new connection (its SYN-ACK from
/// the VIP would be refused, and the connection would time out).
#[test]
fn a_direct_connection_on_a_service_flows_tuple_is_not_reverse_nated() {
    for ending in FLOW_ENDINGS {
        let f = Setup::Web.load();
        let client = sa(CLIENT, 40020);
        let backend = service_flow(&f, client.port(), ending);
        let (verdict, out) = f.ingress(&tcp(client, backend, Tcp::Syn));
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(inspect(&out).dst, backend, "not for a frontend: untouched");
        let direct = flow(backend, client);
        for kind in [Tcp::SynAck, Tcp::Ack, Tcp::Fin] {
            let (verdict, out) = f.egress(&tcp(backend, client, kind));
            assert_eq!(verdict, TC_ACT_OK);
            assert_eq!(
                inspect(&out),
                direct,
                "{kind:?} of the direct connection after a flow ended by {ending:?}"
            );
        }
        assert_eq!(f.stat(stat::REVNAT), 3 + u64::from(ending.is_some()));
        // The old flow's reply entry met the direct connection's SYN-ACK:
        // removed, and the answer passed as it is, counted once.
        assert_eq!(f.stat(stat::PASS_NO_REPLY), 1, "after {ending:?}");
    }
}

/// What `pass_no_reply` counts, each harmless: an answer on a flow's
/// tuple that the flow no longer owns is passed as it is, once, and the
/// entry goes. One case above (a direct connection took the tuple: its
/// answers are its own); here, an answer after its flow was silent past
/// its lifetime (UDP 60 s, a closing TCP connection 10 s), which
/// netfilter's conntrack, whose entries expire likewise, does not reverse
/// either. The client's socket, connected to the frontend, does not take
/// it (for TCP its kernel answers with a reset, which ends the backend's
/// half-closed socket); the client's next packet to the frontend starts a
/// new flow, whose answers are translated.
#[test]
fn answers_after_a_flows_lifetime_pass_untranslated_once() {
    let f = Setup::Web.load();
    let client = sa(CLIENT, 33020);
    let (_, out) = f.ingress(&udp(client, vip_dns()));
    let backend = inspect(&out).dst;
    let (_, reply) = f.egress(&udp(backend, client));
    assert_eq!(inspect(&reply).src, vip_dns());
    f.age_flows(std::time::Duration::from_secs(61));
    for late in 1..=2 {
        let (verdict, reply) = f.egress(&udp(backend, client));
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(inspect(&reply), flow(backend, client), "late answer {late}");
        assert_eq!(f.stat(stat::PASS_NO_REPLY), 1, "counted once");
    }
    let (_, out) = f.ingress(&udp(client, vip_dns()));
    assert_eq!(f.stat(stat::DNAT_NEW), 2, "the client again: a new flow");
    let (_, reply) = f.egress(&udp(inspect(&out).dst, client));
    assert_eq!(inspect(&reply).src, vip_dns());

    // TCP, closed by FIN both ways: a retransmitted last answer within the
    // closing time is still the flow's; past it, it passes.
    let client = sa(CLIENT, 40030);
    let backend = service_flow(&f, client.port(), Some(Tcp::Fin));
    let (_, reply) = f.egress(&tcp(backend, client, Tcp::Fin));
    assert_eq!(inspect(&reply).src, vip(), "within the closing time");
    f.age_flows(std::time::Duration::from_secs(11));
    let (verdict, reply) = f.egress(&tcp(backend, client, Tcp::Fin));
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(inspect(&reply), flow(backend, client));
    assert_eq!(f.stat(stat::PASS_NO_REPLY), 2);
    let (_, out) = f.ingress(&tcp(client, vip(), Tcp::Syn));
    let (_, reply) = f.egress(&tcp(inspect(&out).dst, client, Tcp::SynAck));
    assert_eq!(inspect(&reply).src, vip(), "a new connection is translated");
}

/// A client that connects to the VIP again from the port of an earlier
/// flow opens a new flow (a fresh backend choice) whose answers are
/// translated, however the earlier one ended.
#[test]
fn a_reconnect_through_the_vip_on_a_used_tuple_is_a_new_flow() {
    for ending in FLOW_ENDINGS {
        let f = Setup::Web.load();
        let client = sa(CLIENT, 40021);
        service_flow(&f, client.port(), ending);
        assert_eq!(f.stat(stat::DNAT_NEW), 1);
        let (_, out) = f.ingress(&tcp(client, vip(), Tcp::Syn));
        let backend = inspect(&out).dst;
        assert_eq!(f.stat(stat::DNAT_NEW), 2, "after {ending:?}");
        let (_, out) = f.egress(&tcp(backend, client, Tcp::SynAck));
        assert_eq!(inspect(&out).src, vip(), "after {ending:?}");
    }
}

/// UDP has no handshake to tell a new flow by: a datagram from the client
/// straight to the backend, from the port of a service flow with it, makes
/// the old flow forgotten, so the answers come back untranslated; the next
/// datagram to the VIP starts a new flow.
#[test]
fn a_udp_client_reaching_the_backend_directly_from_a_flows_port_gets_direct_answers() {
    let f = Setup::Web.load();
    let client = sa(CLIENT, 33010);
    let (_, out) = f.ingress(&udp(client, vip_dns()));
    let backend = inspect(&out).dst;
    let (_, reply) = f.egress(&udp(backend, client));
    assert_eq!(inspect(&reply).src, vip_dns());

    let direct = flow(backend, client);
    for round in 1..=2 {
        let (verdict, out) = f.ingress(&udp(client, backend));
        assert_eq!(verdict, TC_ACT_OK);
        assert_eq!(inspect(&out).dst, backend, "untouched");
        let (_, reply) = f.egress(&udp(backend, client));
        assert_eq!(inspect(&reply), direct, "round {round}");
        assert_eq!(f.stat(stat::FLOW_TUPLE_REUSED), 1, "forgotten once");
    }

    let (_, out) = f.ingress(&udp(client, vip_dns()));
    assert_eq!(f.stat(stat::DNAT_NEW), 2, "back to the VIP: a new flow");
    let backend = inspect(&out).dst;
    let (_, reply) = f.egress(&udp(backend, client));
    assert_eq!(inspect(&reply).src, vip_dns());
}

#[test]
fn a_removed_backend_gets_no_new_flows_but_keeps_established_ones() {
    let mut f = Setup::Web.load();
    let backend0 = sa(BACKENDS[0], TARGET_PORT);
    // Find a flow that landed on backend 0.
    let mut sport = 41000;
    loop {
        let (_, out) = f.ingress(&tcp(sa(CLIENT, sport), vip(), Tcp::Syn));
        if inspect(&out).dst == backend0 {
            break;
        }
        sport += 1;
        assert!(sport < 41200, "no flow reached backend 0");
    }
    f.set_table(web_over(&BACKENDS[1..], &BACKENDS));

    let (_, out) = f.ingress(&tcp(sa(CLIENT, sport), vip(), Tcp::Ack));
    assert_eq!(
        inspect(&out).dst,
        backend0,
        "established flow keeps its backend"
    );
    for s in 0..200u16 {
        let (_, out) = f.ingress(&tcp(sa(CLIENT, 50000 + s), vip(), Tcp::Syn));
        assert_ne!(
            inspect(&out).dst,
            backend0,
            "no new flow to a removed backend"
        );
    }
}

#[test]
fn a_udp_flow_to_a_removed_backend_moves_to_a_live_one() {
    let mut f = Setup::Web.load();
    let backend0 = sa(BACKENDS[0], DNS_TARGET_PORT);
    // A UDP "flow" (one client socket) that landed on backend 0, and one on
    // another backend.
    let mut on_zero = None;
    let mut flows_on_zero = 0;
    let mut elsewhere: Option<Flow> = None;
    for sport in 42000..42200u16 {
        let (_, out) = f.ingress(&udp(sa(CLIENT, sport), vip_dns()));
        let seen = inspect(&out);
        if seen.dst == backend0 {
            on_zero.get_or_insert(seen.src);
            flows_on_zero += 1;
        } else {
            elsewhere.get_or_insert(seen);
        }
        if on_zero.is_some() && elsewhere.is_some() {
            break;
        }
    }
    let client = on_zero.expect("a UDP flow on backend 0");
    let other = elsewhere.expect("a UDP flow elsewhere");
    // Its reply is reverse-NATed while the backend is there.
    let (_, reply) = f.egress(&udp(backend0, client));
    assert_eq!(inspect(&reply).src, vip_dns());

    let stats = f.set_table(web_over(&BACKENDS, &BACKENDS[1..]));
    // Counted as kube-proxy's reconciler counts: flows, not their entries.
    assert_eq!(stats.conntrack.deleted, [flows_on_zero, 0]);
    assert!(stats.conntrack.took[0].is_some() && stats.conntrack.took[1].is_none());

    // The next datagram of the same socket goes to a live backend, at once.
    let (_, out) = f.ingress(&udp(client, vip_dns()));
    assert_ne!(
        inspect(&out).dst,
        backend0,
        "UDP flow stuck on a removed backend"
    );
    // A late reply from the removed backend is no longer translated.
    let (_, late) = f.egress(&udp(backend0, client));
    assert_eq!(inspect(&late).src, backend0);
    // Flows on other backends are untouched.
    let (_, out) = f.ingress(&udp(other.src, vip_dns()));
    assert_eq!(inspect(&out).dst, other.dst);
}

#[test]
fn reconcile_repairs_entries_removed_behind_the_agents_back() {
    let mut f = Setup::Web.load();
    let table = f.table.clone();
    // Wipe the maps the way drift would: a fresh reconcile against an empty
    // table, then ask for the real one again.
    f.dp.reconcile(&ServiceTable::new())
        .expect("reconcile to empty");
    let packet = tcp(sa(CLIENT, 43000), vip(), Tcp::Syn);
    assert_eq!(f.ingress(&packet).1, packet, "nothing programmed");
    let report = f.dp.reconcile(&table).expect("reconcile back");
    assert!(
        report.stats.kernel_writes >= 3 + 4 && report.repaired >= 3 + 4,
        "backends and slots rewritten: {report:?}"
    );
    let (_, out) = f.ingress(&packet);
    assert!(backend_set().contains(&inspect(&out).dst.ip()));
    assert_eq!(inspect(&out).dst.port(), TARGET_PORT);
    // A second reconcile finds nothing to do.
    let again = f.dp.reconcile(&table).expect("reconcile again");
    assert_eq!(again.repaired, 0, "{again:?}");
}

/// A periodic reconcile of an unchanged kernel compares and writes
/// nothing; an entry changed behind the agent's back, after it trusts its
/// shadow, is still found and repaired.
#[test]
fn a_periodic_reconcile_writes_nothing_until_the_kernel_drifts() {
    let mut f = Setup::Web.load();
    let table = f.table.clone();
    f.dp.reconcile(&table).expect("first reconcile");
    let quiet = f.dp.reconcile(&table).expect("periodic reconcile");
    assert_eq!(
        (
            quiet.repaired,
            quiet.stats.kernel_writes,
            quiet.stats.kernel_deletes
        ),
        (0, 0, 0),
        "{quiet:?}"
    );
    // Another process deletes every service entry.
    let id = f.dp.services_map_id().expect("services map id");
    let data = aya::maps::MapData::from_id(id).expect("open the services map by id");
    let mut other: aya::maps::HashMap<_, proxy_common::ServiceKey, proxy_common::ServiceValue> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).expect("a hash map");
    let keys: Vec<proxy_common::ServiceKey> = other.keys().filter_map(Result::ok).collect();
    assert!(!keys.is_empty());
    for k in &keys {
        other.remove(k).expect("remove");
    }
    let packet = tcp(sa(CLIENT, 43001), vip(), Tcp::Syn);
    assert_eq!(f.ingress(&packet).1, packet, "drifted: nothing programmed");
    let repair = f.dp.reconcile(&table).expect("reconcile after drift");
    assert!(repair.repaired >= keys.len(), "{repair:?}");
    let (_, out) = f.ingress(&packet);
    assert!(backend_set().contains(&inspect(&out).dst.ip()));
}

/// A change that adds or removes a frontend moves only its address in the
/// frontend-address filter: a new address serves at once, a removed one
/// lingers (its flows keep their translation), and the filter always
/// matches the shadow, so a periodic reconcile finds nothing to repair.
#[test]
fn added_and_removed_frontends_move_only_their_addresses() {
    let mut f = Setup::Web.load();
    let web = f.table.clone();
    f.dp.reconcile(&web).expect("first reconcile");
    let other = Ipv4Addr::new(10, 96, 7, 7);
    let mut grown = web.clone();
    grown.insert(
        key(other, SVC_PORT, Protocol::Tcp),
        frontend(ClusterIp, &v4s(&BACKENDS)),
    );
    f.set_table(grown.clone());
    let packet = tcp(sa(CLIENT, 43101), sa(other, SVC_PORT), Tcp::Syn);
    let (_, out) = f.ingress(&packet);
    assert!(
        backend_set().contains(&inspect(&out).dst.ip()),
        "the new address serves"
    );
    let quiet = |f: &mut Fixture, table: &ServiceTable| {
        let report = f.dp.reconcile(table).expect("periodic reconcile");
        (
            report.repaired,
            report.stats.kernel_writes,
            report.stats.kernel_deletes,
        )
    };
    assert_eq!(quiet(&mut f, &grown), (0, 0, 0), "added: shadow matches");
    f.set_table(web.clone());
    // The established flow on the removed frontend keeps its translation.
    let (_, out) = f.ingress(&tcp(sa(CLIENT, 43101), sa(other, SVC_PORT), Tcp::Ack));
    assert!(backend_set().contains(&inspect(&out).dst.ip()), "lingers");
    assert_eq!(quiet(&mut f, &web), (0, 0, 0), "removed: shadow matches");
}
