//! Fuzzing the TC programs through `BPF_PROG_TEST_RUN`: valid packets of
//! several setups (a ClusterIP over TCP and UDP, IPv6, SCTP), mutated as a
//! network mangles them (a byte changed, cut short, IPv4 options, IPv4
//! fragments, a VLAN tag, an IPv6 extension header, trailing bytes), run
//! through ingress and egress. Every verdict is one the programs give; a
//! valid packet for no frontend leaves unchanged; a packet the programs
//! changed from a valid one is valid (every checksum right), and an IPv4
//! header they changed has the right header checksum. Cases per setup:
//! `PROXY_FUZZ_CASES` (default 300; `cargo xtask fuzz` runs many more).
//! Needs root (CAP_BPF + CAP_NET_ADMIN).
use std::net::{IpAddr, SocketAddr};

use proptest::{
    prelude::*,
    test_runner::{Config, TestCaseError, TestRunner},
};
use proxy_agent::model::{FrontendKey, Protocol};
use proxy_common::{PROG_EGRESS, PROG_INGRESS};

mod common;
use common::{
    Fixture, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
    cases::{
        BACKENDS, BACKENDS6, CLIENT, CLIENT6, DNS_PORT, SCTP_SVC_PORT, SCTP_VIP6, SVC_PORT, Setup,
        VIP, VIP6, sa,
    },
    packet::{ETH_HLEN, Tcp, parse, sctp, sctp_init_chunk, tcp, udp},
};

/// The packets each mutation starts from: to the frontends of the setups,
/// their replies from backends, and to an address and port of no frontend.
fn seeds() -> Vec<Vec<u8>> {
    let sa6 = |ip, port| SocketAddr::new(IpAddr::V6(ip), port);
    vec![
        tcp(sa(CLIENT, 40000), sa(VIP, SVC_PORT), Tcp::Syn),
        tcp(sa(CLIENT, 40000), sa(VIP, SVC_PORT), Tcp::Ack),
        udp(sa(CLIENT, 40001), sa(VIP, DNS_PORT)),
        tcp(sa(BACKENDS[0], 8080), sa(CLIENT, 40000), Tcp::SynAck),
        tcp(sa(CLIENT, 40002), sa(VIP, SVC_PORT + 1), Tcp::Syn),
        udp(sa(CLIENT, 40003), sa(BACKENDS[1], 9999)),
        tcp(sa6(CLIENT6, 40000), sa6(VIP6, SVC_PORT), Tcp::Syn),
        udp(sa6(CLIENT6, 40001), sa6(VIP6, DNS_PORT)),
        tcp(sa6(BACKENDS6[0], 8080), sa6(CLIENT6, 40000), Tcp::SynAck),
        sctp(
            sa6(CLIENT6, 40004),
            sa6(SCTP_VIP6, SCTP_SVC_PORT),
            0,
            &sctp_init_chunk(1, 77),
        ),
    ]
}

/// How a packet is mangled.
#[derive(Clone, Debug)]
enum Mutation {
    None,
    /// The byte at (position modulo length) set.
    Byte(usize, u8),
    /// Cut to (length modulo the packet's length).
    Cut(usize),
    /// IPv4 options of this many 4-byte words (NOPs), the header made
    /// longer and its checksum right.
    Ipv4Options(u8),
    /// IPv4 fragment offset (8-byte units) and more-fragments flag.
    Fragment(u16, bool),
    /// An 802.1Q tag after the MAC addresses.
    Vlan(u16),
    /// An IPv6 hop-by-hop options header before the transport header.
    Ipv6HopByHop,
    /// Bytes after the packet.
    Trailer(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        Just(Mutation::None),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Byte(at, b)),
        any::<usize>().prop_map(Mutation::Cut),
        (1u8..=10).prop_map(Mutation::Ipv4Options),
        (0u16..0x2000, any::<bool>()).prop_map(|(o, mf)| Mutation::Fragment(o, mf)),
        any::<u16>().prop_map(Mutation::Vlan),
        Just(Mutation::Ipv6HopByHop),
        proptest::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Trailer),
    ]
}

const ETHERTYPE_IPV4: [u8; 2] = [0x08, 0x00];
const ETHERTYPE_IPV6: [u8; 2] = [0x86, 0xdd];

fn ipv4_header_checksum(header: &[u8]) -> [u8; 2] {
    let mut sum: u32 = 0;
    for (i, pair) in header.chunks(2).enumerate() {
        if i == 5 {
            continue; // the checksum itself
        }
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    (!(sum as u16)).to_be_bytes()
}

/// Whether `packet` has a whole IPv4 header with the right checksum.
fn ipv4_header_valid(packet: &[u8]) -> bool {
    if packet.len() < ETH_HLEN + 20 || packet[12..14] != ETHERTYPE_IPV4 {
        return false;
    }
    let ihl = usize::from(packet[ETH_HLEN] & 0x0f) * 4;
    if ihl < 20 || packet.len() < ETH_HLEN + ihl {
        return false;
    }
    let header = &packet[ETH_HLEN..ETH_HLEN + ihl];
    ipv4_header_checksum(header) == [header[10], header[11]]
}

fn fix_ipv4_checksum(packet: &mut [u8]) {
    let ihl = usize::from(packet[ETH_HLEN] & 0x0f) * 4;
    let end = ETH_HLEN + ihl;
    if packet.len() >= end {
        let sum = ipv4_header_checksum(&packet[ETH_HLEN..end]);
        packet[ETH_HLEN + 10..ETH_HLEN + 12].copy_from_slice(&sum);
    }
}

/// Whether the IPv4 header length field is sane and within the packet.
fn ihl_fits(p: &[u8]) -> bool {
    let ihl = usize::from(p[ETH_HLEN] & 0x0f) * 4;
    (20..=60).contains(&ihl) && p.len() >= ETH_HLEN + ihl
}

fn mutate(mut p: Vec<u8>, m: &Mutation) -> Vec<u8> {
    if p.len() < ETH_HLEN + 40 && !matches!(m, Mutation::Trailer(_)) {
        // Cut short already: only bytes added.
        return p;
    }
    let v4 = p.get(12..14) == Some(&ETHERTYPE_IPV4[..]);
    let v6 = p.get(12..14) == Some(&ETHERTYPE_IPV6[..]);
    match m {
        Mutation::None => {}
        Mutation::Byte(at, b) => {
            let at = at % p.len();
            p[at] = *b;
        }
        Mutation::Cut(len) => p.truncate(len % p.len()),
        Mutation::Ipv4Options(words) if v4 && ihl_fits(&p) => {
            let ihl = usize::from(p[ETH_HLEN] & 0x0f) * 4;
            let extra = usize::from(*words).min((60 - ihl) / 4) * 4;
            let at = ETH_HLEN + ihl;
            p.splice(at..at, std::iter::repeat_n(1u8, extra));
            p[ETH_HLEN] = 0x40 | ((ihl + extra) / 4) as u8;
            let total = u16::from_be_bytes([p[ETH_HLEN + 2], p[ETH_HLEN + 3]]) + extra as u16;
            p[ETH_HLEN + 2..ETH_HLEN + 4].copy_from_slice(&total.to_be_bytes());
            fix_ipv4_checksum(&mut p);
        }
        Mutation::Fragment(offset, more) if v4 => {
            let field = (offset & 0x1fff) | if *more { 0x2000 } else { 0 };
            p[ETH_HLEN + 6..ETH_HLEN + 8].copy_from_slice(&field.to_be_bytes());
            fix_ipv4_checksum(&mut p);
        }
        Mutation::Vlan(tci) => {
            let mut tag = vec![0x81, 0x00];
            tag.extend_from_slice(&tci.to_be_bytes());
            p.splice(12..12, tag);
        }
        Mutation::Ipv6HopByHop if v6 => {
            let next = p[ETH_HLEN + 6];
            let at = ETH_HLEN + 40;
            // Next header, length 0 (8 bytes), PadN of 4 bytes.
            p.splice(at..at, [next, 0, 1, 4, 0, 0, 0, 0]);
            p[ETH_HLEN + 6] = 0;
            let len = u16::from_be_bytes([p[ETH_HLEN + 4], p[ETH_HLEN + 5]]) + 8;
            p[ETH_HLEN + 4..ETH_HLEN + 6].copy_from_slice(&len.to_be_bytes());
        }
        Mutation::Trailer(bytes) => p.extend_from_slice(bytes),
        // A mutation of the other family: unchanged.
        _ => {}
    }
    p
}

/// Whether `packet` (valid) is addressed to a frontend of `f`'s table.
fn for_a_frontend(f: &Fixture, packet: &[u8]) -> bool {
    let Ok(seen) = parse(packet) else {
        return false;
    };
    let protocol = match packet_protocol(packet) {
        Some(p) => p,
        None => return false,
    };
    let key = FrontendKey {
        ip: seen.flow.dst.ip(),
        port: seen.flow.dst.port(),
        protocol,
    };
    f.table.get(&key).is_some()
}

/// The transport protocol of a valid, untagged packet.
fn packet_protocol(packet: &[u8]) -> Option<Protocol> {
    let number = if packet[12..14] == ETHERTYPE_IPV4 {
        *packet.get(ETH_HLEN + 9)?
    } else if packet[12..14] == ETHERTYPE_IPV6 {
        *packet.get(ETH_HLEN + 6)?
    } else {
        return None;
    };
    match number {
        6 => Some(Protocol::Tcp),
        17 => Some(Protocol::Udp),
        132 => Some(Protocol::Sctp),
        _ => None,
    }
}

/// Runs `packet` through program `prog`; `None` when the kernel refuses to
/// run it (the program never sees a packet that short).
fn run(f: &Fixture, prog: &str, packet: &[u8]) -> Option<(u32, Vec<u8>)> {
    let (verdict, out, _) = f.try_run(prog, packet).ok()?;
    Some((verdict, out))
}

fn check(f: &Fixture, prog: &str, packet: &[u8]) -> Result<(), TestCaseError> {
    let Some((verdict, out)) = run(f, prog, packet) else {
        // BPF_PROG_TEST_RUN wants the whole IP header of an IP packet
        // (IPv6's is 40 bytes); the kernel never hands the hook less.
        prop_assert!(
            packet.len() < ETH_HLEN + 40,
            "a run of {} bytes refused",
            packet.len()
        );
        return Ok(());
    };
    prop_assert!(
        [TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT].contains(&verdict),
        "{prog}: verdict {verdict}"
    );
    let valid = parse(packet).is_ok();
    if valid && !for_a_frontend(f, packet) && prog == PROG_INGRESS {
        prop_assert_eq!(verdict, TC_ACT_OK, "{}: a packet for no frontend", prog);
        prop_assert!(
            out == packet,
            "{prog}: a packet for no frontend was changed"
        );
    }
    if out != packet && verdict != TC_ACT_SHOT {
        if valid && let Err(why) = parse(&out) {
            return Err(TestCaseError::fail(format!(
                "{prog}: a valid packet came out invalid: {why}"
            )));
        }
        // An IPv4 header with a right checksum keeps it right (the header
        // of a packet cut short or with a bad transport part included).
        if ipv4_header_valid(packet) && out.len() >= ETH_HLEN + 20 && out[12..14] == ETHERTYPE_IPV4
        {
            let ihl = usize::from(out[ETH_HLEN] & 0x0f) * 4;
            if ihl >= 20 && out.len() >= ETH_HLEN + ihl {
                let header = &out[ETH_HLEN..ETH_HLEN + ihl];
                prop_assert_eq!(
                    ipv4_header_checksum(header),
                    [header[10], header[11]],
                    "{}: IPv4 header checksum",
                    prog
                );
            }
        }
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PROXY_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300)
}

#[test]
fn mangled_packets_get_known_verdicts_and_translations_stay_valid() {
    let seeds = seeds();
    for setup in [
        Setup::Web,
        Setup::ClusterIp6,
        Setup::Sctp6,
        Setup::NodePortMasquerade,
    ] {
        let f = setup.load();
        let mut runner = TestRunner::new(Config {
            cases: cases(),
            failure_persistence: None,
            ..Config::default()
        });
        let strategy = (0..seeds.len(), mutation(), mutation());
        let result = runner.run(&strategy, |(seed, first, second)| {
            f.forget_flows();
            let packet = mutate(mutate(seeds[seed].clone(), &first), &second);
            check(&f, PROG_INGRESS, &packet)?;
            check(&f, PROG_EGRESS, &packet)
        });
        if let Err(e) = result {
            panic!("{setup:?}: {e}");
        }
    }
}
