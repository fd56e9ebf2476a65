//! Packet-fixture tests, through `BPF_PROG_TEST_RUN`, of the service
//! features of the eBPF datapath beyond plain ClusterIP DNAT (those are in
//! `datapath.rs`): NodePorts, masquerade, `externalTrafficPolicy: Local`,
//! source ranges, session affinity, rejects, IPv6, SCTP, hairpin, and the
//! verifier's instruction counts.
//!
//! Every test loads the real embedded object (unpinned, its own maps),
//! programs it through the real `EbpfDataplane` (a table diff, and the
//! node's network facts), runs packets built as data through the programs
//! and checks the verdict, the bytes that come out (every IP, TCP, UDP and
//! ICMP checksum verified with `etherparse`, SCTP's CRC32c with an
//! implementation of its own below) and the packet counters. Needs root.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use etherparse::{
    Icmpv4Type, Icmpv6Type, IpHeaders, IpNumber, NetSlice, PacketBuilder, PacketBuilderStep,
    SlicedPacket, TransportSlice, icmpv4, icmpv6,
};
use ipnet::IpNet;
use proxy_agent::{
    dataplane::NodeNetwork,
    model::{
        Backend, Frontend, FrontendKey, FrontendKind, FrontendPolicy, Protocol, ServiceName,
        ServiceTable,
    },
};
use proxy_common::{CtKey, CtValue, PROG_EGRESS, PROG_INGRESS, PROG_NEW_FLOW, PROG_REJECT, stat};

mod common;
use common::{Fixture, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, Tcp};

// Addresses (documentation and private ranges; nothing is ever sent).
/// The node's own address: NodePorts are served on it, masqueraded
/// traffic takes it as source.
const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 10);
/// An address of some other host, not one NodePorts are served on.
const OTHER_HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 11);
/// Clients outside the cluster.
const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
/// The cluster (pod) CIDR, a pod client inside it, and the backends.
const CLUSTER_CIDR: &str = "10.244.0.0/16";
const POD_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 244, 1, 1),
    Ipv4Addr::new(10, 244, 1, 2),
    Ipv4Addr::new(10, 244, 1, 3),
];
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);

const SVC_PORT: u16 = 80;
const NODE_PORT: u16 = 30080;
const TARGET_PORT: u16 = 8080;

const MAC_CLIENT: [u8; 6] = [2, 0, 0, 0, 0, 1];
const MAC_NODE: [u8; 6] = [2, 0, 0, 0, 0, 2];
const ETH_HLEN: usize = 14;

// ---------------------------------------------------------------------------
// Tables and node networks.

fn ip(addr: impl Into<IpAddr>) -> IpAddr {
    addr.into()
}

fn sa(addr: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(addr.into(), port)
}

fn key(addr: impl Into<IpAddr>, port: u16, protocol: Protocol) -> FrontendKey {
    FrontendKey {
        ip: addr.into(),
        port,
        protocol,
    }
}

/// The NodePort frontend key: the unspecified address of the family.
fn node_port_key(protocol: Protocol) -> FrontendKey {
    key(Ipv4Addr::UNSPECIFIED, NODE_PORT, protocol)
}

fn backends(ips: &[IpAddr], port: u16) -> Vec<Backend> {
    let mut out: Vec<Backend> = ips.iter().map(|&ip| Backend { ip, port }).collect();
    out.sort();
    out
}

fn v4s(ips: &[Ipv4Addr]) -> Vec<IpAddr> {
    ips.iter().map(|&a| IpAddr::V4(a)).collect()
}

/// A frontend of `kind` over `ips` on TARGET_PORT, Cluster policy, no
/// affinity, no source ranges.
fn frontend(kind: FrontendKind, ips: &[IpAddr]) -> Frontend {
    Frontend {
        service: ServiceName {
            namespace: "default".into(),
            name: "web".into(),
        },
        port_name: "http".into(),
        kind,
        backends: backends(ips, TARGET_PORT),
        cluster_backends: Vec::new(),
        policy: FrontendPolicy::default(),
    }
}

fn table(entries: impl IntoIterator<Item = (FrontendKey, Frontend)>) -> ServiceTable {
    let mut t = ServiceTable::new();
    for (k, f) in entries {
        t.insert(k, f);
    }
    t
}

fn cidr(s: &str) -> IpNet {
    s.parse().expect("a CIDR")
}

/// NodePorts on NODE, masquerade to NODE, the cluster CIDR set.
fn node_network() -> NodeNetwork {
    NodeNetwork {
        nodeport_addresses: BTreeSet::from([ip(NODE)]),
        snat_v4: Some(NODE),
        snat_v6: None,
        cluster_cidrs: vec![cidr(CLUSTER_CIDR)],
        masquerade_all: false,
    }
}

// ---------------------------------------------------------------------------
// Packets.

fn eth_ip(src: IpAddr, dst: IpAddr) -> PacketBuilderStep<IpHeaders> {
    let eth = PacketBuilder::ethernet2(MAC_CLIENT, MAC_NODE);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed address families"),
    }
}

fn tcp(src: SocketAddr, dst: SocketAddr, kind: Tcp) -> Vec<u8> {
    let b = eth_ip(src.ip(), dst.ip()).tcp(src.port(), dst.port(), 1000, 64240);
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

fn udp(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let b = eth_ip(src.ip(), dst.ip()).udp(src.port(), dst.port());
    let payload = b"\x12\x34query";
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("build UDP packet");
    out
}

/// CRC32c (Castagnoli) as SCTP uses it (RFC 9260 appendix A): reflected,
/// initial value and final XOR all ones. Bitwise, independent of the
/// datapath's incremental update.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The SCTP checksum of a whole SCTP packet (common header and chunks),
/// with its checksum field taken as zero, as the field holds it: the CRC's
/// bytes in little-endian order (as Linux writes it).
fn sctp_checksum(sctp: &[u8]) -> [u8; 4] {
    let mut copy = sctp.to_vec();
    copy[8..12].fill(0);
    crc32c(&copy).to_le_bytes()
}

/// An SCTP packet: the common header (ports, verification tag, checksum)
/// and `chunks`.
fn sctp(src: SocketAddr, dst: SocketAddr, vtag: u32, chunks: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&src.port().to_be_bytes());
    l4.extend_from_slice(&dst.port().to_be_bytes());
    l4.extend_from_slice(&vtag.to_be_bytes());
    l4.extend_from_slice(&[0; 4]);
    l4.extend_from_slice(chunks);
    let csum = sctp_checksum(&l4);
    l4[8..12].copy_from_slice(&csum);
    let b = eth_ip(src.ip(), dst.ip());
    let mut out = Vec::with_capacity(b.size(l4.len()));
    b.write(&mut out, IpNumber::SCTP, &l4)
        .expect("build SCTP packet");
    out
}

/// An INIT (or, with `chunk_type` 2, an INIT ACK) chunk without parameters.
fn sctp_init_chunk(chunk_type: u8, initiate_tag: u32) -> Vec<u8> {
    let mut c = vec![chunk_type, 0, 0, 20];
    c.extend_from_slice(&initiate_tag.to_be_bytes());
    c.extend_from_slice(&65_535u32.to_be_bytes()); // a_rwnd
    c.extend_from_slice(&10u16.to_be_bytes()); // outbound streams
    c.extend_from_slice(&10u16.to_be_bytes()); // inbound streams
    c.extend_from_slice(&1u32.to_be_bytes()); // initial TSN
    c
}

/// What came out of a program, its checksums verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Flow {
    src: SocketAddr,
    dst: SocketAddr,
}

fn flow(src: SocketAddr, dst: SocketAddr) -> Flow {
    Flow { src, dst }
}

/// Parses a TCP, UDP or SCTP packet over IPv4 or IPv6, asserts that every
/// checksum in it is right (computed here, from the bytes), and returns
/// its addresses and ports.
fn inspect(packet: &[u8]) -> Flow {
    let sliced = SlicedPacket::from_ethernet(packet).expect("output parses");
    let (src, dst, l4) = match &sliced.net {
        Some(NetSlice::Ipv4(v4)) => {
            let h = v4.header().to_header();
            assert_eq!(
                h.calc_header_checksum(),
                h.header_checksum,
                "IPv4 header checksum"
            );
            (
                ip(Ipv4Addr::from(h.source)),
                ip(Ipv4Addr::from(h.destination)),
                v4.payload(),
            )
        }
        Some(NetSlice::Ipv6(v6)) => {
            let h = v6.header().to_header();
            (
                ip(Ipv6Addr::from(h.source)),
                ip(Ipv6Addr::from(h.destination)),
                v6.payload(),
            )
        }
        None => panic!("output is not IP"),
    };
    let (sport, dport) = match &sliced.transport {
        Some(TransportSlice::Tcp(t)) => {
            let h = t.to_header();
            let expected = match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    h.calc_checksum_ipv4_raw(s.octets(), d.octets(), t.payload())
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    h.calc_checksum_ipv6_raw(s.octets(), d.octets(), t.payload())
                }
                _ => panic!("mixed address families"),
            };
            assert_eq!(Ok(t.checksum()), expected, "TCP checksum");
            (t.source_port(), t.destination_port())
        }
        Some(TransportSlice::Udp(u)) => {
            let h = u.to_header();
            let expected = match (src, dst) {
                // Zero over IPv4: no checksum, which must stay none.
                (IpAddr::V4(_), _) if h.checksum == 0 => Ok(0),
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    h.calc_checksum_ipv4_raw(s.octets(), d.octets(), u.payload())
                }
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    h.calc_checksum_ipv6_raw(s.octets(), d.octets(), u.payload())
                }
                _ => panic!("mixed address families"),
            };
            assert_eq!(Ok(h.checksum), expected, "UDP checksum");
            (h.source_port, h.destination_port)
        }
        None if l4.ip_number == IpNumber::SCTP => {
            let s = l4.payload;
            assert!(s.len() >= 12, "SCTP common header present");
            assert_eq!(s[8..12], sctp_checksum(s), "SCTP CRC32c");
            (
                u16::from_be_bytes([s[0], s[1]]),
                u16::from_be_bytes([s[2], s[3]]),
            )
        }
        other => panic!("no TCP/UDP/SCTP in output: {other:?}"),
    };
    flow(sa(src, sport), sa(dst, dport))
}

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

fn backend_set() -> Vec<IpAddr> {
    v4s(&BACKENDS)
}

/// Whether `port` is one a masqueraded flow may get: from 1024 up, clear
/// of the NodePort range and of this namespace's ephemeral ports (read
/// here independently of the agent).
fn in_snat_range(port: u16) -> bool {
    let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .expect("reading ip_local_port_range");
    let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().unwrap());
    let (eph_min, eph_max) = (parts.next().unwrap(), parts.next().unwrap());
    port >= 1024 && !(30_000..=32_767).contains(&port) && !(eph_min..=eph_max).contains(&port)
}

// ---------------------------------------------------------------------------
// NodePort.

#[test]
fn node_port_is_served_on_node_addresses_only_and_loopback_only_when_asked() {
    let mut f = Fixture::load();
    // NodePorts on NODE only; no masquerade address, so nothing is SNATed
    // (counted as such) and only the DNAT is under test here.
    let mut net = NodeNetwork {
        nodeport_addresses: BTreeSet::from([ip(NODE)]),
        ..Default::default()
    };
    f.set_network(&net);
    f.set_table(table([(
        node_port_key(Protocol::Tcp),
        frontend(FrontendKind::NodePort, &backend_set()),
    )]));

    let seen = ingress_ok(&f, &tcp(sa(CLIENT, 40000), sa(NODE, NODE_PORT), Tcp::Syn));
    assert!(
        BACKENDS.iter().any(|b| seen.dst == sa(*b, TARGET_PORT)),
        "DNATed to a backend's target port: {seen:?}"
    );
    assert_eq!(seen.src, sa(CLIENT, 40000), "source kept");
    assert_eq!(f.stat(stat::DNAT_NEW), 1);
    assert_eq!(f.stat(stat::PASS_NO_SNAT_ADDRESS), 1);
    // The reply leaves from the node address and the NodePort.
    let reply = egress_ok(&f, &tcp(seen.dst, seen.src, Tcp::SynAck));
    assert_eq!(reply, flow(sa(NODE, NODE_PORT), sa(CLIENT, 40000)));
    assert_eq!(f.stat(stat::REVNAT), 1);

    // The same port on an address NodePorts are not served on.
    let other = tcp(sa(CLIENT, 40001), sa(OTHER_HOST, NODE_PORT), Tcp::Syn);
    assert_untouched(&f, PROG_INGRESS, &other);
    assert_eq!(f.stat(stat::PASS_NO_SERVICE), 1);

    // Loopback: never a NodePort address unless asked for (CVE-2020-8558).
    let lo = tcp(
        sa(Ipv4Addr::LOCALHOST, 40002),
        sa(Ipv4Addr::LOCALHOST, NODE_PORT),
        Tcp::Syn,
    );
    assert_untouched(&f, PROG_INGRESS, &lo);
    assert_eq!(f.stat(stat::PASS_NO_SERVICE), 2);
    assert_eq!(f.stat(stat::DNAT_NEW), 1);

    net.nodeport_addresses.insert(ip(Ipv4Addr::LOCALHOST));
    f.set_network(&net);
    let seen = ingress_ok(&f, &lo);
    assert!(
        BACKENDS.iter().any(|b| seen.dst == sa(*b, TARGET_PORT)),
        "loopback NodePort DNATed once asked for: {seen:?}"
    );
    assert_eq!(f.stat(stat::DNAT_NEW), 2);
    // And taking NODE out of the set stops serving it there.
    net.nodeport_addresses.remove(&ip(NODE));
    f.set_network(&net);
    let syn = tcp(sa(CLIENT, 40003), sa(NODE, NODE_PORT), Tcp::Syn);
    assert_untouched(&f, PROG_INGRESS, &syn);
    assert_eq!(f.stat(stat::PASS_NO_SERVICE), 3);
}

// ---------------------------------------------------------------------------
// Masquerade.

/// The node network, and one NodePort frontend of `protocol` whose only
/// backend is `BACKENDS[0]`.
fn node_port_to_one_backend(protocol: Protocol) -> Fixture {
    let mut f = Fixture::load();
    f.set_network(&node_network());
    f.set_table(table([(
        node_port_key(protocol),
        frontend(FrontendKind::NodePort, &[ip(BACKENDS[0])]),
    )]));
    f
}

#[test]
fn node_port_from_outside_is_masqueraded_both_ways() {
    // One backend, so that concurrent flows compete for ports towards it.
    let f = node_port_to_one_backend(Protocol::Tcp);
    let backend = BACKENDS[0];
    let client = sa(CLIENT, 40000);
    let node_port = sa(NODE, NODE_PORT);
    let to_backend = sa(backend, TARGET_PORT);

    // Ingress: DNAT only; the source is still the client.
    let dnated = ingress_ok(&f, &tcp(client, node_port, Tcp::Syn));
    assert_eq!(dnated, flow(client, to_backend));
    assert_eq!(f.stat(stat::SNAT_NEW), 1);
    // Egress: the source becomes the node address and a masquerade port.
    let out = egress_ok(&f, &tcp(client, to_backend, Tcp::Syn));
    assert_eq!(out.src.ip(), ip(NODE), "SNATed to the node address");
    assert_eq!(out.dst, to_backend);
    let snat_port = out.src.port();
    assert!(in_snat_range(snat_port), "SNAT port {snat_port} in range");
    assert_eq!(f.stat(stat::SNAT_OUT), 1);

    // The backend answers the node address and port: un-SNATed at ingress.
    let back = ingress_ok(&f, &tcp(to_backend, sa(NODE, snat_port), Tcp::SynAck));
    assert_eq!(back, flow(to_backend, client), "destination restored");
    assert_eq!(f.stat(stat::SNAT_IN), 1);
    // And reverse-NATed at egress: from the NodePort it was sent to.
    let reply = egress_ok(&f, &tcp(to_backend, client, Tcp::SynAck));
    assert_eq!(reply, flow(node_port, client));
    assert_eq!(f.stat(stat::REVNAT), 1);

    // Later packets of the flow take the same translation.
    assert_eq!(ingress_ok(&f, &tcp(client, node_port, Tcp::Ack)), dnated);
    let again = egress_ok(&f, &tcp(client, to_backend, Tcp::Ack));
    assert_eq!(again.src, sa(NODE, snat_port));
    assert_eq!(f.stat(stat::DNAT_ESTABLISHED), 1);
    assert_eq!(f.stat(stat::SNAT_OUT), 2);

    // A second, concurrent flow (same client, other port) gets another port.
    let client2 = sa(CLIENT, 40001);
    assert_eq!(
        ingress_ok(&f, &tcp(client2, node_port, Tcp::Syn)),
        flow(client2, to_backend)
    );
    let out2 = egress_ok(&f, &tcp(client2, to_backend, Tcp::Syn));
    assert_eq!(out2.src.ip(), ip(NODE));
    assert!(in_snat_range(out2.src.port()));
    assert_ne!(out2.src.port(), snat_port, "each flow its own SNAT port");
    // Each reply finds its own client.
    let back2 = ingress_ok(&f, &tcp(to_backend, out2.src, Tcp::SynAck));
    assert_eq!(back2.dst, client2);
    let back1 = ingress_ok(&f, &tcp(to_backend, sa(NODE, snat_port), Tcp::Ack));
    assert_eq!(back1.dst, client);
    assert_eq!(f.stat(stat::SNAT_NEW), 2);
    assert_eq!(f.stat(stat::SNAT_IN), 3);
    assert_eq!(f.stat(stat::DROP_SNAT_EXHAUSTED), 0);
    // Four entries per masqueraded flow.
    assert_eq!(f.dp.conntrack_len(), 8);
}

/// A client that connects straight to the backend from the port of a
/// closed masqueraded flow keeps its own address and gets untranslated
/// answers: neither masquerade leg of the old flow claims the connection.
#[test]
fn a_direct_connection_on_a_masqueraded_flows_tuple_is_left_alone() {
    let f = node_port_to_one_backend(Protocol::Tcp);
    let backend = BACKENDS[0];
    let client = sa(CLIENT, 40010);
    let node_port = sa(NODE, NODE_PORT);
    let to_backend = sa(backend, TARGET_PORT);
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
    let f = node_port_to_one_backend(Protocol::Udp);
    let backend = BACKENDS[0];
    let client = sa(CLIENT, 33020);
    let node_port = sa(NODE, NODE_PORT);
    let to_backend = sa(backend, TARGET_PORT);
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
fn cluster_ip_masquerades_clients_outside_the_cluster_cidr_or_all_with_masquerade_all() {
    let mut f = Fixture::load();
    let mut net = node_network();
    f.set_network(&net);
    f.set_table(table([(
        key(VIP, SVC_PORT, Protocol::Tcp),
        frontend(FrontendKind::ClusterIp, &backend_set()),
    )]));
    let vip = sa(VIP, SVC_PORT);

    // A pod client: DNAT only, its source kept at egress.
    let pod = sa(POD_CLIENT, 41000);
    let seen = ingress_ok(&f, &tcp(pod, vip, Tcp::Syn));
    assert_eq!(seen.src, pod);
    let out = egress_ok(&f, &tcp(pod, seen.dst, Tcp::Syn));
    assert_eq!(out, flow(pod, seen.dst), "pod client not masqueraded");
    assert_eq!(f.stat(stat::DNAT_NEW), 1);
    assert_eq!(f.stat(stat::SNAT_NEW), 0);
    assert_eq!(f.stat(stat::SNAT_OUT), 0);

    // A client outside the cluster CIDR (a node, say): masqueraded.
    let outside = sa(CLIENT, 41001);
    let seen = ingress_ok(&f, &tcp(outside, vip, Tcp::Syn));
    let out = egress_ok(&f, &tcp(outside, seen.dst, Tcp::Syn));
    assert_eq!(out.src.ip(), ip(NODE));
    assert!(in_snat_range(out.src.port()));
    assert_eq!(out.dst, seen.dst);
    assert_eq!(f.stat(stat::SNAT_NEW), 1);
    let back = ingress_ok(&f, &tcp(seen.dst, out.src, Tcp::SynAck));
    assert_eq!(back, flow(seen.dst, outside));
    let reply = egress_ok(&f, &tcp(seen.dst, outside, Tcp::SynAck));
    assert_eq!(reply, flow(vip, outside));

    // --masquerade-all: the pod client is masqueraded too.
    net.masquerade_all = true;
    f.set_network(&net);
    let pod2 = sa(POD_CLIENT, 41002);
    let seen = ingress_ok(&f, &tcp(pod2, vip, Tcp::Syn));
    let out = egress_ok(&f, &tcp(pod2, seen.dst, Tcp::Syn));
    assert_eq!(out.src.ip(), ip(NODE), "masquerade-all SNATs a pod client");
    assert!(in_snat_range(out.src.port()));
    assert_eq!(f.stat(stat::SNAT_NEW), 2);
    let back = ingress_ok(&f, &tcp(seen.dst, out.src, Tcp::SynAck));
    assert_eq!(back, flow(seen.dst, pod2));
    let reply = egress_ok(&f, &tcp(seen.dst, pod2, Tcp::SynAck));
    assert_eq!(reply, flow(vip, pod2));
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
// externalTrafficPolicy: Local.

fn local(kind: FrontendKind, local: &[IpAddr], cluster: &[IpAddr]) -> Frontend {
    Frontend {
        backends: backends(local, TARGET_PORT),
        cluster_backends: backends(cluster, TARGET_PORT),
        policy: FrontendPolicy {
            local_only: true,
            ..Default::default()
        },
        ..frontend(kind, &[])
    }
}

#[test]
fn local_policy_keeps_the_client_source_on_local_backends() {
    let mut f = Fixture::load();
    f.set_network(&node_network());
    f.set_table(table([(
        node_port_key(Protocol::Tcp),
        local(FrontendKind::NodePort, &[ip(BACKENDS[0])], &backend_set()),
    )]));
    let node_port = sa(NODE, NODE_PORT);
    for i in 0..10u16 {
        let client = sa(CLIENT, 42000 + i);
        let seen = ingress_ok(&f, &tcp(client, node_port, Tcp::Syn));
        assert_eq!(
            seen,
            flow(client, sa(BACKENDS[0], TARGET_PORT)),
            "only the local backend, source kept"
        );
        // No masquerade entry: egress leaves the client's address alone.
        let out = egress_ok(&f, &tcp(client, seen.dst, Tcp::Syn));
        assert_eq!(out, seen);
        let reply = egress_ok(&f, &tcp(seen.dst, client, Tcp::SynAck));
        assert_eq!(reply, flow(node_port, client));
    }
    assert_eq!(f.stat(stat::DNAT_NEW), 10);
    assert_eq!(f.stat(stat::SNAT_NEW), 0);
    assert_eq!(f.stat(stat::SNAT_OUT), 0);
    assert_eq!(f.stat(stat::REVNAT), 10);
}

#[test]
fn local_policy_without_local_backend_drops_external_and_serves_pods_cluster_wide() {
    let mut f = Fixture::load();
    f.set_network(&node_network());
    let remote = [ip(BACKENDS[1]), ip(BACKENDS[2])];
    f.set_table(table([
        (
            key(LB_IP, SVC_PORT, Protocol::Tcp),
            local(FrontendKind::LoadBalancer, &[], &remote),
        ),
        (
            node_port_key(Protocol::Tcp),
            local(FrontendKind::NodePort, &[], &remote),
        ),
    ]));
    for dst in [sa(LB_IP, SVC_PORT), sa(NODE, NODE_PORT)] {
        // External client: dropped, not rejected (the service has
        // endpoints, only none here).
        let (verdict, _) = f.ingress(&tcp(sa(CLIENT, 43000), dst, Tcp::Syn));
        assert_eq!(verdict, TC_ACT_SHOT, "external client to {dst} dropped");
        let (verdict, _) = f.ingress(&udp(sa(CLIENT, 43001), dst));
        assert_eq!(verdict, TC_ACT_OK, "another protocol is not this frontend");
        // A pod: the cluster-wide view, without masquerade.
        for i in 0..10u16 {
            let pod = sa(POD_CLIENT, 43100 + i);
            let seen = ingress_ok(&f, &tcp(pod, dst, Tcp::Syn));
            assert_eq!(seen.src, pod);
            assert!(
                remote.iter().any(|b| seen.dst == sa(*b, TARGET_PORT)),
                "pod served by a cluster-wide backend: {seen:?}"
            );
            let out = egress_ok(&f, &tcp(pod, seen.dst, Tcp::Syn));
            assert_eq!(out, seen, "pod client not masqueraded");
            let reply = egress_ok(&f, &tcp(seen.dst, pod, Tcp::SynAck));
            assert_eq!(reply, flow(dst, pod));
        }
    }
    assert_eq!(f.stat(stat::DROP_NO_LOCAL_BACKEND), 2);
    assert_eq!(f.stat(stat::REJECT), 0);
    assert_eq!(f.stat(stat::DNAT_NEW), 20);
    assert_eq!(f.stat(stat::SNAT_NEW), 0);
    assert_eq!(f.stat(stat::PASS_NO_SERVICE), 2);
}

#[test]
fn internal_traffic_policy_local_without_local_backend_drops_even_pods() {
    let mut f = Fixture::load();
    f.set_network(&node_network());
    let vip_key = key(VIP, SVC_PORT, Protocol::Tcp);
    f.set_table(table([(
        vip_key,
        local(FrontendKind::ClusterIp, &[], &backend_set()),
    )]));
    // A ClusterIP has no cluster-wide view: internalTrafficPolicy Local
    // means this node's endpoints, for pods too.
    for client in [sa(POD_CLIENT, 43500), sa(CLIENT, 43501)] {
        let (verdict, _) = f.ingress(&tcp(client, sa(VIP, SVC_PORT), Tcp::Syn));
        assert_eq!(verdict, TC_ACT_SHOT, "{client} dropped");
    }
    assert_eq!(f.stat(stat::DROP_NO_LOCAL_BACKEND), 2);
    assert_eq!(f.stat(stat::REJECT), 0);
    // With a local endpoint, it is served.
    f.set_table(table([(
        vip_key,
        local(FrontendKind::ClusterIp, &[ip(BACKENDS[2])], &backend_set()),
    )]));
    let pod = sa(POD_CLIENT, 43502);
    let seen = ingress_ok(&f, &tcp(pod, sa(VIP, SVC_PORT), Tcp::Syn));
    assert_eq!(seen, flow(pod, sa(BACKENDS[2], TARGET_PORT)));
}

// ---------------------------------------------------------------------------
// Source ranges.

#[test]
fn load_balancer_source_ranges_admit_inside_and_drop_outside() {
    let mut f = Fixture::load();
    let lb6: Ipv6Addr = "2001:db8:ff::20".parse().expect("v6");
    let backends6: Vec<IpAddr> = vec![ip("fd00:244:1::1".parse::<Ipv6Addr>().expect("v6"))];
    let ranged = |ips: &[IpAddr], ranges: &[&str]| Frontend {
        policy: FrontendPolicy {
            source_ranges: ranges.iter().map(|r| cidr(r)).collect(),
            ..Default::default()
        },
        ..frontend(FrontendKind::LoadBalancer, ips)
    };
    f.set_table(table([
        (
            key(LB_IP, SVC_PORT, Protocol::Tcp),
            ranged(&backend_set(), &["203.0.113.0/24", "198.18.0.0/15"]),
        ),
        (
            key(lb6, SVC_PORT, Protocol::Tcp),
            ranged(&backends6, &["2001:db8:1::/48"]),
        ),
    ]));
    let lb = sa(LB_IP, SVC_PORT);
    for client in [sa(CLIENT, 44000), sa(Ipv4Addr::new(198, 19, 7, 7), 44001)] {
        let seen = ingress_ok(&f, &tcp(client, lb, Tcp::Syn));
        assert_eq!(seen.src, client);
        assert!(BACKENDS.iter().any(|b| seen.dst == sa(*b, TARGET_PORT)));
    }
    for client in [
        sa(Ipv4Addr::new(203, 0, 114, 5), 44002), // just past the /24
        sa(POD_CLIENT, 44003),
    ] {
        let (verdict, _) = f.ingress(&tcp(client, lb, Tcp::Syn));
        assert_eq!(verdict, TC_ACT_SHOT, "{client} outside the ranges dropped");
    }
    assert_eq!(f.stat(stat::DNAT_NEW), 2);
    assert_eq!(f.stat(stat::DROP_SOURCE_RANGE), 2);

    let lb6 = sa(lb6, SVC_PORT);
    let inside6 = sa("2001:db8:1:ffff::5".parse::<Ipv6Addr>().expect("v6"), 44004);
    let seen = ingress_ok(&f, &tcp(inside6, lb6, Tcp::Syn));
    assert_eq!(seen, flow(inside6, sa(backends6[0], TARGET_PORT)));
    let outside6 = sa("2001:db8:2::5".parse::<Ipv6Addr>().expect("v6"), 44005);
    let (verdict, _) = f.ingress(&tcp(outside6, lb6, Tcp::Syn));
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(f.stat(stat::DNAT_NEW), 3);
    assert_eq!(f.stat(stat::DROP_SOURCE_RANGE), 3);
}

// ---------------------------------------------------------------------------
// Session affinity.

fn with_affinity(ips: &[IpAddr], timeout_secs: u32) -> Frontend {
    Frontend {
        policy: FrontendPolicy {
            affinity_timeout_secs: Some(timeout_secs),
            ..Default::default()
        },
        ..frontend(FrontendKind::ClusterIp, ips)
    }
}

#[test]
fn session_affinity_keeps_a_client_on_its_backend_until_it_leaves() {
    let mut f = Fixture::load();
    let vip_key = key(VIP, SVC_PORT, Protocol::Tcp);
    f.set_table(table([(vip_key, with_affinity(&backend_set(), 10_800))]));
    let vip = sa(VIP, SVC_PORT);

    let first = ingress_ok(&f, &tcp(sa(CLIENT, 45000), vip, Tcp::Syn)).dst;
    for i in 1..30u16 {
        let seen = ingress_ok(&f, &tcp(sa(CLIENT, 45000 + i), vip, Tcp::Syn));
        assert_eq!(seen.dst, first, "connection {i} on the client's backend");
    }
    assert_eq!(f.stat(stat::DNAT_NEW), 30);
    assert_eq!(f.stat(stat::AFFINITY_HIT), 29);
    assert_eq!(f.dp.affinity_len(), 1);

    // Other clients have their own entries; among twenty, one lands on
    // another backend (all on one: p = 3^-19), and each stays where it is.
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
    assert_eq!(f.stat(stat::AFFINITY_HIT), 29 + 20);
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
// Reject.

#[test]
fn udp_to_a_service_without_backends_gets_icmp_port_unreachable() {
    let mut f = Fixture::load();
    f.set_table(table([(
        key(VIP, 53, Protocol::Udp),
        frontend(FrontendKind::ClusterIp, &[]),
    )]));
    let packet = udp(sa(CLIENT, 48000), sa(VIP, 53));
    let (verdict, out) = f.ingress(&packet);
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back where it came from");
    assert_eq!(out.len(), ETH_HLEN + 20 + 8 + 28, "IP + ICMP + quote");
    assert_eq!(out[0..6], MAC_CLIENT, "to the sender's MAC");
    assert_eq!(out[6..12], MAC_NODE);

    let sliced = SlicedPacket::from_ethernet(&out).expect("output parses");
    let Some(NetSlice::Ipv4(v4)) = &sliced.net else {
        panic!("not IPv4")
    };
    let h = v4.header().to_header();
    assert_eq!(h.calc_header_checksum(), h.header_checksum, "IPv4 checksum");
    assert_eq!(h.protocol, IpNumber::ICMP);
    assert_eq!(h.total_len, 56);
    assert_eq!((h.source, h.destination), (VIP.octets(), CLIENT.octets()));
    assert!(h.time_to_live > 0);
    let Some(TransportSlice::Icmpv4(icmp)) = &sliced.transport else {
        panic!("not ICMP")
    };
    assert_eq!((icmp.type_u8(), icmp.code_u8()), (3, 3));
    assert_eq!(
        icmp.icmp_type(),
        Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port)
    );
    assert_eq!(
        icmp.checksum(),
        icmp.icmp_type().calc_checksum(icmp.payload()),
        "ICMP checksum"
    );
    assert_eq!(
        icmp.payload(),
        &packet[ETH_HLEN..ETH_HLEN + 28],
        "quotes the IP header and 8 bytes"
    );
    assert_eq!(f.stat(stat::REJECT), 1);
    assert_eq!(f.stat(stat::ERR_REJECT), 0);
}

#[test]
fn udp_over_ipv6_to_a_service_without_backends_gets_icmpv6_port_unreachable() {
    let mut f = Fixture::load();
    let vip6: Ipv6Addr = "fd00:96::10".parse().expect("v6");
    let client6: Ipv6Addr = "2001:db8:1::5".parse().expect("v6");
    f.set_table(table([(
        key(vip6, 53, Protocol::Udp),
        frontend(FrontendKind::ClusterIp, &[]),
    )]));
    let packet = udp(sa(client6, 48001), sa(vip6, 53));
    let (verdict, out) = f.ingress(&packet);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out.len(), ETH_HLEN + 40 + 8 + 48, "IPv6 + ICMPv6 + quote");
    assert_eq!(out[0..6], MAC_CLIENT);
    assert_eq!(out[6..12], MAC_NODE);

    let sliced = SlicedPacket::from_ethernet(&out).expect("output parses");
    let Some(NetSlice::Ipv6(v6)) = &sliced.net else {
        panic!("not IPv6")
    };
    let h = v6.header().to_header();
    assert_eq!(h.next_header, IpNumber::IPV6_ICMP);
    assert_eq!(h.payload_length, 56);
    assert_eq!((h.source, h.destination), (vip6.octets(), client6.octets()));
    assert!(h.hop_limit > 0);
    let Some(TransportSlice::Icmpv6(icmp)) = &sliced.transport else {
        panic!("not ICMPv6")
    };
    assert_eq!((icmp.type_u8(), icmp.code_u8()), (1, 4));
    assert_eq!(
        icmp.icmp_type(),
        Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port)
    );
    assert!(
        icmp.is_checksum_valid(h.source, h.destination),
        "ICMPv6 checksum (with the pseudo-header)"
    );
    assert_eq!(
        icmp.payload(),
        &packet[ETH_HLEN..ETH_HLEN + 48],
        "quotes the IPv6 header and 8 bytes"
    );
    assert_eq!(f.stat(stat::REJECT), 1);
}

// ---------------------------------------------------------------------------
// ICMP errors about translated flows.

/// An ICMP error about a translated flow (here the backend's port
/// unreachable; a router's fragmentation-needed works the same way) must
/// reach the client as one about the flow it knows, VIP to client, or the
/// client never learns of it (no ECONNREFUSED, a PMTU black hole).
/// kube-proxy gets this from netfilter's conntrack (related ICMP is NATed).
#[test]
fn an_icmp_error_from_a_backend_reaches_the_client_as_from_the_vip() {
    let mut f = Fixture::load();
    f.set_table(table([(
        key(VIP, 53, Protocol::Udp),
        Frontend {
            backends: backends(&[ip(BACKENDS[0])], 5353),
            ..frontend(FrontendKind::ClusterIp, &[])
        },
    )]));
    let client = sa(POD_CLIENT, 53000);
    let vip = sa(VIP, 53);
    let backend = sa(BACKENDS[0], 5353);
    let (_, dnated) = f.ingress(&udp(client, vip));
    assert_eq!(inspect(&dnated), flow(client, backend));

    // The backend's port unreachable, quoting what it received.
    let icmp_error = |src: Ipv4Addr, quoted: &[u8]| {
        let b = PacketBuilder::ethernet2(MAC_NODE, MAC_CLIENT)
            .ipv4(src.octets(), POD_CLIENT.octets(), 64)
            .icmpv4(Icmpv4Type::DestinationUnreachable(
                icmpv4::DestUnreachableHeader::Port,
            ));
        let mut out = Vec::with_capacity(b.size(quoted.len()));
        b.write(&mut out, quoted).expect("build ICMP packet");
        out
    };
    let error = icmp_error(BACKENDS[0], &dnated[ETH_HLEN..ETH_HLEN + 28]);
    let (verdict, out) = f.egress(&error);
    assert_eq!(verdict, TC_ACT_OK);
    // What the client must see: from the VIP, quoting its own datagram.
    let original = udp(client, vip);
    let expected = icmp_error(VIP, &original[ETH_HLEN..ETH_HLEN + 28]);
    assert_eq!(out, expected, "the error is about the client's own flow");
}

/// An ICMP error from `src` to `dst` of `kind`, quoting `quoted`.
fn icmp_error(src: IpAddr, dst: IpAddr, kind: &IcmpKind, quoted: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match kind {
        IcmpKind::V4(kind) => {
            let b = eth_ip(src, dst).icmpv4(kind.clone());
            b.write(&mut out, quoted).expect("build ICMP packet");
        }
        IcmpKind::V6(kind) => {
            let b = eth_ip(src, dst).icmpv6(*kind);
            b.write(&mut out, quoted).expect("build ICMPv6 packet");
        }
    }
    out
}

enum IcmpKind {
    V4(Icmpv4Type),
    V6(Icmpv6Type),
}

/// A router between the node and a backend of a masqueraded NodePort flow
/// says "fragmentation needed": at ingress the error is given back its
/// client (outer destination, quoted source), at egress the quoted
/// destination becomes the NodePort again, and the router's own address
/// stays as the source. What the client gets quotes its own packet.
#[test]
fn a_routers_error_about_a_masqueraded_flow_reaches_the_client() {
    let f = node_port_to_one_backend(Protocol::Tcp);
    let backend = BACKENDS[0];
    let client = sa(CLIENT, 40123);
    let node_port = sa(NODE, NODE_PORT);
    let syn = tcp(client, node_port, Tcp::Syn);
    let (_, dnated) = f.ingress(&syn);
    let (_, snated) = f.egress(&dnated);
    assert_eq!(inspect(&snated).src.ip(), ip(NODE), "masqueraded");

    let router = ip(Ipv4Addr::new(192, 0, 2, 254));
    let frag_needed = IcmpKind::V4(Icmpv4Type::DestinationUnreachable(
        icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
    ));
    let quote = |p: &[u8]| p[ETH_HLEN..ETH_HLEN + 28].to_vec();
    let error = icmp_error(router, ip(NODE), &frag_needed, &quote(&snated));
    let (verdict, unsnated) = f.ingress(&error);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        unsnated,
        icmp_error(router, ip(CLIENT), &frag_needed, &quote(&dnated)),
        "at ingress: the client's again, about the packet sent to the backend"
    );
    let (verdict, out) = f.egress(&unsnated);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        icmp_error(router, ip(CLIENT), &frag_needed, &quote(&syn)),
        "what the client gets: about its own packet to the NodePort"
    );
    assert_eq!(f.stat(stat::ICMP_ERROR_NAT), 2);

    // An error about no flow of ours passes as it is.
    let stranger = tcp(sa(CLIENT, 999), sa(backend, TARGET_PORT), Tcp::Syn);
    let unrelated = icmp_error(router, ip(CLIENT), &frag_needed, &quote(&stranger));
    assert_untouched(&f, PROG_EGRESS, &unrelated);
    assert_untouched(&f, PROG_INGRESS, &unrelated);
}

/// IPv6: a backend's packet-too-big about a ClusterIP flow reaches the
/// client from the VIP, quoting the client's own packet (the ICMPv6
/// checksum covers a pseudo-header with the outer addresses).
#[test]
fn an_ipv6_packet_too_big_from_a_backend_reaches_the_client_as_from_the_vip() {
    let mut f = Fixture::load();
    let vip6: Ipv6Addr = "fd00:96::10".parse().expect("v6");
    let client6: Ipv6Addr = "fd00:244:2::7".parse().expect("v6");
    let backend6: Ipv6Addr = "fd00:244:1::1".parse().expect("v6");
    f.set_table(table([(
        key(vip6, SVC_PORT, Protocol::Tcp),
        frontend(FrontendKind::ClusterIp, &[ip(backend6)]),
    )]));
    let client = sa(client6, 49100);
    let ack = tcp(client, sa(vip6, SVC_PORT), Tcp::Ack);
    let (_, dnated) = f.ingress(&ack);
    assert_eq!(inspect(&dnated).dst, sa(backend6, TARGET_PORT));
    let too_big = IcmpKind::V6(Icmpv6Type::PacketTooBig { mtu: 1280 });
    // Quote the IPv6 header and the whole TCP header (its checksum too).
    let quote = |p: &[u8]| p[ETH_HLEN..ETH_HLEN + 60].to_vec();
    let error = icmp_error(ip(backend6), ip(client6), &too_big, &quote(&dnated));
    let (verdict, out) = f.egress(&error);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(
        out,
        icmp_error(ip(vip6), ip(client6), &too_big, &quote(&ack)),
        "from the VIP, about the client's own packet"
    );
    assert_eq!(f.stat(stat::ICMP_ERROR_NAT), 1);
}

// ---------------------------------------------------------------------------
// IPv6.

#[test]
fn ipv6_cluster_ip_is_translated_both_ways_for_tcp_and_udp() {
    let mut f = Fixture::load();
    let vip6: Ipv6Addr = "fd00:96::10".parse().expect("v6");
    let client6: Ipv6Addr = "fd00:244:2::7".parse().expect("v6");
    let backends6: Vec<IpAddr> = ["fd00:244:1::1", "fd00:244:1::2", "fd00:244:1::3"]
        .iter()
        .map(|s| ip(s.parse::<Ipv6Addr>().expect("v6")))
        .collect();
    f.set_table(table([
        (
            key(vip6, SVC_PORT, Protocol::Tcp),
            frontend(FrontendKind::ClusterIp, &backends6),
        ),
        (
            key(vip6, 53, Protocol::Udp),
            Frontend {
                backends: backends(&backends6, 5353),
                ..frontend(FrontendKind::ClusterIp, &[])
            },
        ),
    ]));
    let (vip_tcp, vip_udp) = (sa(vip6, SVC_PORT), sa(vip6, 53));

    let client = sa(client6, 49000);
    let seen = ingress_ok(&f, &tcp(client, vip_tcp, Tcp::Syn));
    assert_eq!(seen.src, client);
    assert!(backends6.contains(&seen.dst.ip()), "{seen:?}");
    assert_eq!(seen.dst.port(), TARGET_PORT);
    let est = ingress_ok(&f, &tcp(client, vip_tcp, Tcp::Ack));
    assert_eq!(est, seen, "the flow stays on its backend");
    let reply = egress_ok(&f, &tcp(seen.dst, client, Tcp::SynAck));
    assert_eq!(reply, flow(vip_tcp, client));

    let client = sa(client6, 49001);
    let seen = ingress_ok(&f, &udp(client, vip_udp));
    assert_eq!(seen.src, client);
    assert!(backends6.contains(&seen.dst.ip()), "{seen:?}");
    assert_eq!(seen.dst.port(), 5353);
    let reply = egress_ok(&f, &udp(seen.dst, client));
    assert_eq!(reply, flow(vip_udp, client));

    assert_eq!(f.stat(stat::DNAT_NEW), 2);
    assert_eq!(f.stat(stat::DNAT_ESTABLISHED), 1);
    assert_eq!(f.stat(stat::REVNAT), 2);
}

#[test]
fn ipv6_node_port_from_outside_is_masqueraded_both_ways() {
    let mut f = Fixture::load();
    let node6: Ipv6Addr = "2001:db8:a::10".parse().expect("v6");
    let client6: Ipv6Addr = "2001:db8:1::5".parse().expect("v6");
    let backend6: Ipv6Addr = "fd00:244:1::1".parse().expect("v6");
    f.set_network(&NodeNetwork {
        nodeport_addresses: BTreeSet::from([ip(node6)]),
        snat_v6: Some(node6),
        cluster_cidrs: vec![cidr("fd00:244::/32")],
        ..Default::default()
    });
    f.set_table(table([(
        key(Ipv6Addr::UNSPECIFIED, NODE_PORT, Protocol::Udp),
        frontend(FrontendKind::NodePort, &[ip(backend6)]),
    )]));
    let client = sa(client6, 49100);
    let node_port = sa(node6, NODE_PORT);
    let to_backend = sa(backend6, TARGET_PORT);

    assert_eq!(
        ingress_ok(&f, &udp(client, node_port)),
        flow(client, to_backend)
    );
    let out = egress_ok(&f, &udp(client, to_backend));
    assert_eq!(out.src.ip(), ip(node6), "SNATed to the node's IPv6 address");
    assert!(in_snat_range(out.src.port()));
    assert_eq!(out.dst, to_backend);
    let back = ingress_ok(&f, &udp(to_backend, out.src));
    assert_eq!(back, flow(to_backend, client));
    let reply = egress_ok(&f, &udp(to_backend, client));
    assert_eq!(reply, flow(node_port, client));
    assert_eq!(
        [stat::SNAT_NEW, stat::SNAT_OUT, stat::SNAT_IN, stat::REVNAT].map(|s| f.stat(s)),
        [1, 1, 1, 1]
    );
    // A v4 address in the set would not make a v6 NodePort of it, nor the
    // reverse: the other family's node address passes.
    let v4 = udp(sa(CLIENT, 49101), sa(NODE, NODE_PORT));
    assert_untouched(&f, PROG_INGRESS, &v4);
}

// ---------------------------------------------------------------------------
// SCTP.

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
    }
    // And the IPv4 header checksum.
    let mut broken = tcp(sa(CLIENT, 1), sa(VIP, 2), Tcp::Syn);
    broken[ETH_HLEN + 8] ^= 0x01; // TTL
    assert!(std::panic::catch_unwind(|| inspect(&broken)).is_err());
}

const SCTP_SVC_PORT: u16 = 9000;
const SCTP_TARGET_PORT: u16 = 9999;

fn sctp_fixture() -> Fixture {
    let mut f = Fixture::load();
    f.set_table(table([(
        key(VIP, SCTP_SVC_PORT, Protocol::Sctp),
        Frontend {
            backends: backends(&backend_set(), SCTP_TARGET_PORT),
            ..frontend(FrontendKind::ClusterIp, &[])
        },
    )]));
    f
}

#[test]
fn sctp_init_is_translated_both_ways_with_a_valid_crc32c() {
    let f = sctp_fixture();
    let client = sa(POD_CLIENT, 50000);
    let vip = sa(VIP, SCTP_SVC_PORT);
    let init = sctp(client, vip, 0, &sctp_init_chunk(1, 0x1234_5678));
    let seen = ingress_ok(&f, &init);
    assert_eq!(seen.src, client);
    assert!(
        BACKENDS
            .iter()
            .any(|b| seen.dst == sa(*b, SCTP_TARGET_PORT)),
        "DNATed to a backend's target port: {seen:?}"
    );
    assert_eq!(f.stat(stat::DNAT_NEW), 1);

    let init_ack = sctp(
        seen.dst,
        client,
        0x1234_5678,
        &sctp_init_chunk(2, 0x9abc_def0),
    );
    let reply = egress_ok(&f, &init_ack);
    assert_eq!(reply, flow(vip, client));
    assert_eq!(f.stat(stat::REVNAT), 1);
}

#[test]
fn sctp_over_ipv6_is_translated_both_ways_with_a_valid_crc32c() {
    let mut f = Fixture::load();
    let vip6: Ipv6Addr = "fd00:96::20".parse().expect("v6");
    let client6: Ipv6Addr = "fd00:244:2::7".parse().expect("v6");
    let backend6: Ipv6Addr = "fd00:244:1::1".parse().expect("v6");
    f.set_table(table([(
        key(vip6, SCTP_SVC_PORT, Protocol::Sctp),
        Frontend {
            backends: backends(&[ip(backend6)], SCTP_TARGET_PORT),
            ..frontend(FrontendKind::ClusterIp, &[])
        },
    )]));
    let client = sa(client6, 50100);
    let vip = sa(vip6, SCTP_SVC_PORT);
    let to_backend = sa(backend6, SCTP_TARGET_PORT);
    let init = sctp(client, vip, 0, &sctp_init_chunk(1, 0x5555_6666));
    assert_eq!(ingress_ok(&f, &init), flow(client, to_backend));
    let init_ack = sctp(to_backend, client, 0x5555_6666, &sctp_init_chunk(2, 7));
    assert_eq!(egress_ok(&f, &init_ack), flow(vip, client));
    // A 4-byte chunk, the shortest SCTP packet.
    let abort = sctp(client, vip, 7, &[6, 0, 0, 4]);
    assert_eq!(ingress_ok(&f, &abort), flow(client, to_backend));
    assert_eq!(f.stat(stat::DNAT_NEW), 1);
    assert_eq!(f.stat(stat::DNAT_ESTABLISHED), 1);
    assert_eq!(f.stat(stat::REVNAT), 1);
}

/// Ethernet pads frames to 60 bytes; a short SCTP packet (a 4-byte chunk:
/// COOKIE ACK, SHUTDOWN COMPLETE, ABORT) arrives at TC ingress from a NIC
/// with that padding still on (the IP layer trims it only later). The CRC
/// covers the SCTP packet as the IP header bounds it, not the padding.
#[test]
fn sctp_crc32c_stays_valid_on_a_short_packet_with_ethernet_padding() {
    let f = sctp_fixture();
    let client = sa(POD_CLIENT, 50001);
    let vip = sa(VIP, SCTP_SVC_PORT);
    let init = sctp(client, vip, 0, &sctp_init_chunk(1, 0x1111_2222));
    let backend = ingress_ok(&f, &init).dst;

    // SHUTDOWN COMPLETE (type 14), 4 bytes: 14 + 20 + 12 + 4 = 50 bytes.
    let mut short = sctp(client, vip, 0x3333_4444, &[14, 0, 0, 4]);
    assert_eq!(short.len(), 50);
    short.resize(60, 0);
    let seen = ingress_ok(&f, &short);
    assert_eq!(
        seen,
        flow(client, backend),
        "DNATed, CRC over the IP length"
    );
    assert_eq!(f.stat(stat::DNAT_ESTABLISHED), 1);

    // The same on the way back (padding seen at egress only in odd setups,
    // but the rule is the same).
    let mut short_reply = sctp(backend, client, 0x1111_2222, &[14, 0, 0, 4]);
    short_reply.resize(60, 0);
    let reply = egress_ok(&f, &short_reply);
    assert_eq!(reply, flow(vip, client));
}

// ---------------------------------------------------------------------------
// Hairpin.

#[test]
fn a_client_that_is_its_own_backend_is_masqueraded_through_the_node() {
    let mut f = Fixture::load();
    f.set_network(&node_network());
    let pod = BACKENDS[0];
    f.set_table(table([(
        key(VIP, SVC_PORT, Protocol::Tcp),
        frontend(FrontendKind::ClusterIp, &[ip(pod)]),
    )]));
    let client = sa(pod, 51000);
    let vip = sa(VIP, SVC_PORT);
    let to_self = sa(pod, TARGET_PORT);

    let seen = ingress_ok(&f, &tcp(client, vip, Tcp::Syn));
    assert_eq!(seen, flow(client, to_self));
    assert_eq!(f.stat(stat::SNAT_NEW), 1, "hairpin is masqueraded");
    // Out to the pod it comes from the node, so the pod answers the node.
    let out = egress_ok(&f, &tcp(client, to_self, Tcp::Syn));
    assert_eq!(out.src.ip(), ip(NODE));
    assert!(in_snat_range(out.src.port()));
    assert_eq!(out.dst, to_self);
    // The answer to the node is turned back into one to the pod's socket,
    let back = ingress_ok(&f, &tcp(to_self, out.src, Tcp::SynAck));
    assert_eq!(back, flow(to_self, client));
    assert_eq!(f.stat(stat::SNAT_IN), 1);
    // and leaves towards it from the VIP.
    let reply = egress_ok(&f, &tcp(to_self, client, Tcp::SynAck));
    assert_eq!(reply, flow(vip, client));
    assert_eq!(f.stat(stat::REVNAT), 1);
}

// ---------------------------------------------------------------------------
// Verifier budget.

#[test]
fn every_program_stays_well_inside_the_verifier_budget() {
    // The kernel verifies at most 1 000 000 instructions per program; the
    // datapath once drifted up to that limit. Half of it is the guard rail.
    const BUDGET: u32 = 500_000;
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
        if count >= BUDGET {
            over.push((name, count));
        }
    }
    assert!(
        over.is_empty(),
        "over {BUDGET} verified instructions: {over:?}"
    );
}

// ---------------------------------------------------------------------------
// Masquerade ports.

/// A second handle on the fixture's connection-tracking map, found through
/// the map IDs of the program that writes it.
fn conntrack_handle(f: &Fixture) -> aya::maps::HashMap<aya::maps::MapData, CtKey, CtValue> {
    let info = f.program(PROG_NEW_FLOW).info().expect("program info");
    for id in info.map_ids().expect("map ids").unwrap_or_default() {
        let data = aya::maps::MapData::from_id(id).expect("map by id");
        let name = data
            .info()
            .expect("map info")
            .name_as_str()
            .map(str::to_string);
        if name.as_deref() == Some(proxy_common::MAP_CONNTRACK) {
            return aya::maps::HashMap::try_from(aya::maps::Map::LruHashMap(data))
                .expect("conntrack map");
        }
    }
    panic!("no conntrack map among the program's maps");
}

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

/// Claims every masquerade port towards `backend` with a reply-side entry
/// last seen at `last_seen_ns`, as earlier flows would have; returns how
/// many ports there are.
fn occupy_every_snat_port(
    f: &Fixture,
    backend: SocketAddr,
    flags: u16,
    last_seen_ns: u64,
) -> usize {
    let mut ct = conntrack_handle(f);
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
            nat_addr: to_addr(ip(CLIENT)),
            nat_port: 1u16.to_be(),
            flags,
            backend_id: 0,
            svc_id: 0,
            in_ifindex: 0,
            last_seen_ns,
        };
        ct.insert(key, value, 0).expect("insert a masquerade entry");
        ports += 1;
    }
    ports
}

/// Every masquerade port towards a backend is held by a live flow: a new
/// flow is dropped (never given a live flow's port); once those flows are
/// over (closed, and past the TIME_WAIT hold), a new flow takes a port.
#[test]
fn masquerade_ports_of_live_flows_are_never_taken_and_expired_ones_are_reused() {
    let f = node_port_to_one_backend(Protocol::Tcp);
    let backend = BACKENDS[0];
    let to_backend = sa(backend, TARGET_PORT);
    let node_port = sa(NODE, NODE_PORT);

    // Live (closed 1 s ago: still inside the 65 s hold).
    let ports = occupy_every_snat_port(
        &f,
        to_backend,
        proxy_common::CT_FLAG_SEEN_FIN,
        monotonic_ns() - 1_000_000_000,
    );
    assert!(ports > 30_000, "{ports} masquerade ports on this machine");
    let (verdict, _) = f.ingress(&tcp(sa(CLIENT, 41000), node_port, Tcp::Syn));
    assert_eq!(verdict, TC_ACT_SHOT, "no port left: dropped");
    assert_eq!(f.stat(stat::DROP_SNAT_EXHAUSTED), 1);

    // Over: closed 70 s ago.
    occupy_every_snat_port(
        &f,
        to_backend,
        proxy_common::CT_FLAG_SEEN_FIN,
        monotonic_ns() - 70_000_000_000,
    );
    let client = sa(CLIENT, 41001);
    let dnated = ingress_ok(&f, &tcp(client, node_port, Tcp::Syn));
    assert_eq!(dnated, flow(client, to_backend));
    let out = egress_ok(&f, &tcp(client, to_backend, Tcp::Syn));
    assert_eq!(out.src.ip(), ip(NODE));
    assert!(in_snat_range(out.src.port()));
    let back = ingress_ok(&f, &tcp(to_backend, out.src, Tcp::SynAck));
    assert_eq!(
        back,
        flow(to_backend, client),
        "the reused port leads back to the new client"
    );
    assert_eq!(f.stat(stat::DROP_SNAT_EXHAUSTED), 1);
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
