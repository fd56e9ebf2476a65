//! The packets of the packet fixtures and of the packet benchmark: built as
//! data (Ethernet, IPv4 or IPv6, TCP, UDP, SCTP, ICMP errors), and read
//! back with every checksum verified independently of the datapath (IP,
//! TCP, UDP and ICMP with `etherparse`, SCTP's CRC32c bitwise, here).
//!
//! The only packet builders of the workspace: the fixture tests
//! (`datapath.rs`, `datapath_services.rs`) and `proxy-bench` (which
//! includes this directory with `#[path]`) use them.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub use etherparse::{Icmpv4Type, Icmpv6Type, icmpv4, icmpv6};
use etherparse::{
    IpHeaders, IpNumber, NetSlice, PacketBuilder, PacketBuilderStep, SlicedPacket, TransportSlice,
};

/// The sender's MAC (source of every built frame), and the node's.
pub const MAC_CLIENT: [u8; 6] = [2, 0, 0, 0, 0, 1];
pub const MAC_NODE: [u8; 6] = [2, 0, 0, 0, 0, 2];
pub const ETH_HLEN: usize = 14;
/// The sequence number of every built TCP segment.
pub const TCP_SEQ: u32 = 1000;

/// The TCP segments the fixtures send.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tcp {
    Syn,
    /// An ACK with 18 bytes of data.
    Ack,
    SynAck,
    /// FIN with ACK: one side closes.
    Fin,
}

fn eth_ip(src: IpAddr, dst: IpAddr) -> PacketBuilderStep<IpHeaders> {
    let eth = PacketBuilder::ethernet2(MAC_CLIENT, MAC_NODE);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed address families: {src} to {dst}"),
    }
}

pub fn tcp(src: SocketAddr, dst: SocketAddr, kind: Tcp) -> Vec<u8> {
    let b = eth_ip(src.ip(), dst.ip()).tcp(src.port(), dst.port(), TCP_SEQ, 64240);
    let b = match kind {
        Tcp::Syn => b.syn(),
        Tcp::Ack => b.ack(5000),
        Tcp::SynAck => b.syn().ack(TCP_SEQ + 1),
        Tcp::Fin => b.fin().ack(5000),
    };
    let payload: &[u8] = if kind == Tcp::Ack {
        b"GET / HTTP/1.1\r\n\r\n"
    } else {
        b""
    };
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("build TCP packet");
    out
}

pub fn udp(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let b = eth_ip(src.ip(), dst.ip()).udp(src.port(), dst.port());
    let payload = b"\x12\x34query";
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, payload).expect("build UDP packet");
    out
}

/// CRC32c (Castagnoli) as SCTP uses it (RFC 9260 appendix A): reflected,
/// initial value and final XOR all ones. Bitwise, independent of the
/// datapath's incremental update.
pub fn crc32c(data: &[u8]) -> u32 {
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
pub fn sctp_checksum(sctp: &[u8]) -> [u8; 4] {
    let mut copy = sctp.to_vec();
    copy[8..12].fill(0);
    crc32c(&copy).to_le_bytes()
}

/// An SCTP packet: the common header (ports, verification tag, checksum)
/// and `chunks`.
pub fn sctp(src: SocketAddr, dst: SocketAddr, vtag: u32, chunks: &[u8]) -> Vec<u8> {
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
pub fn sctp_init_chunk(chunk_type: u8, initiate_tag: u32) -> Vec<u8> {
    let mut c = vec![chunk_type, 0, 0, 20];
    c.extend_from_slice(&initiate_tag.to_be_bytes());
    c.extend_from_slice(&65_535u32.to_be_bytes()); // a_rwnd
    c.extend_from_slice(&10u16.to_be_bytes()); // outbound streams
    c.extend_from_slice(&10u16.to_be_bytes()); // inbound streams
    c.extend_from_slice(&1u32.to_be_bytes()); // initial TSN
    c
}

/// The kind of an ICMP error, of either family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IcmpKind {
    V4(Icmpv4Type),
    V6(Icmpv6Type),
}

/// An ICMP error from `src` to `dst` of `kind`, quoting `quoted`.
pub fn icmp_error(src: IpAddr, dst: IpAddr, kind: &IcmpKind, quoted: &[u8]) -> Vec<u8> {
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

/// The addresses and ports of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Flow {
    pub src: SocketAddr,
    pub dst: SocketAddr,
}

pub fn flow(src: SocketAddr, dst: SocketAddr) -> Flow {
    Flow { src, dst }
}

/// The TCP header fields a fixture looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSeen {
    pub syn: bool,
    pub ack: bool,
    pub rst: bool,
    pub fin: bool,
    pub seq: u32,
    pub ack_number: u32,
}

/// What [`parse`] read from a packet whose checksums are all right.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub flow: Flow,
    /// For TCP.
    pub tcp: Option<TcpSeen>,
    /// For UDP: the checksum field (0 over IPv4: none).
    pub udp_checksum: Option<u16>,
}

/// Parses a TCP, UDP or SCTP packet over IPv4 or IPv6, checks that every
/// checksum in it is right (computed here, from the bytes), and returns
/// its addresses, ports and the header fields fixtures look at.
pub fn parse(packet: &[u8]) -> Result<Seen, String> {
    let sliced = SlicedPacket::from_ethernet(packet).map_err(|e| format!("does not parse: {e}"))?;
    let (src, dst, l4) = match &sliced.net {
        Some(NetSlice::Ipv4(v4)) => {
            let h = v4.header().to_header();
            if h.calc_header_checksum() != h.header_checksum {
                return Err("wrong IPv4 header checksum".into());
            }
            (
                IpAddr::V4(Ipv4Addr::from(h.source)),
                IpAddr::V4(Ipv4Addr::from(h.destination)),
                v4.payload(),
            )
        }
        Some(NetSlice::Ipv6(v6)) => {
            let h = v6.header().to_header();
            (
                IpAddr::V6(Ipv6Addr::from(h.source)),
                IpAddr::V6(Ipv6Addr::from(h.destination)),
                v6.payload(),
            )
        }
        None => return Err("not IP".into()),
    };
    let mixed = || format!("mixed address families: {src} to {dst}");
    let mut seen = Seen {
        flow: flow(SocketAddr::new(src, 0), SocketAddr::new(dst, 0)),
        tcp: None,
        udp_checksum: None,
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
                _ => return Err(mixed()),
            };
            if expected != Ok(t.checksum()) {
                return Err(format!(
                    "wrong TCP checksum {:#06x} (should be {expected:?})",
                    t.checksum()
                ));
            }
            seen.tcp = Some(TcpSeen {
                syn: t.syn(),
                ack: t.ack(),
                rst: t.rst(),
                fin: t.fin(),
                seq: t.sequence_number(),
                ack_number: t.acknowledgment_number(),
            });
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
                _ => return Err(mixed()),
            };
            if expected != Ok(h.checksum) {
                return Err(format!(
                    "wrong UDP checksum {:#06x} (should be {expected:?})",
                    h.checksum
                ));
            }
            seen.udp_checksum = Some(h.checksum);
            (h.source_port, h.destination_port)
        }
        None if l4.ip_number == IpNumber::SCTP => {
            let s = l4.payload;
            if s.len() < 12 {
                return Err("SCTP common header cut short".into());
            }
            if s[8..12] != sctp_checksum(s) {
                return Err("wrong SCTP CRC32c".into());
            }
            (
                u16::from_be_bytes([s[0], s[1]]),
                u16::from_be_bytes([s[2], s[3]]),
            )
        }
        other => return Err(format!("no TCP/UDP/SCTP: {other:?}")),
    };
    seen.flow = flow(SocketAddr::new(src, sport), SocketAddr::new(dst, dport));
    Ok(seen)
}

/// [`parse`]'s addresses and ports; panics on a packet that does not parse
/// or has a wrong checksum.
pub fn inspect(packet: &[u8]) -> Flow {
    match parse(packet) {
        Ok(seen) => seen.flow,
        Err(e) => panic!("{e}"),
    }
}

/// Checks that `out` is the ICMP (or ICMPv6) port unreachable answering
/// `input`: from `from` to `to`, back to the sender's MAC, every checksum
/// right, quoting the input's IP header and 8 bytes.
pub fn check_port_unreachable(
    input: &[u8],
    out: &[u8],
    from: IpAddr,
    to: IpAddr,
) -> Result<(), String> {
    let ensure = |ok: bool, what: &str| if ok { Ok(()) } else { Err(what.to_string()) };
    let ip_header_len = if from.is_ipv4() { 20 } else { 40 };
    let quote_len = ip_header_len + 8;
    ensure(
        out.len() == ETH_HLEN + ip_header_len + 8 + quote_len,
        &format!("{} bytes: not IP + ICMP + a quote", out.len()),
    )?;
    ensure(out[0..6] == MAC_CLIENT, "not to the sender's MAC")?;
    ensure(out[6..12] == MAC_NODE, "not from the node's MAC")?;
    let quote = &input[ETH_HLEN..ETH_HLEN + quote_len];
    let sliced = SlicedPacket::from_ethernet(out).map_err(|e| format!("does not parse: {e}"))?;
    match (&sliced.net, &sliced.transport, from, to) {
        (
            Some(NetSlice::Ipv4(v4)),
            Some(TransportSlice::Icmpv4(icmp)),
            IpAddr::V4(from),
            IpAddr::V4(to),
        ) => {
            let h = v4.header().to_header();
            ensure(
                h.calc_header_checksum() == h.header_checksum,
                "wrong IPv4 checksum",
            )?;
            ensure(h.protocol == IpNumber::ICMP, "not ICMP")?;
            ensure(h.total_len == 56, "IPv4 total length not 56")?;
            ensure(
                (h.source, h.destination) == (from.octets(), to.octets()),
                "wrong addresses",
            )?;
            ensure(h.time_to_live > 0, "TTL 0")?;
            ensure(
                (icmp.type_u8(), icmp.code_u8()) == (3, 3),
                "not type 3 code 3",
            )?;
            ensure(
                icmp.icmp_type()
                    == Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port),
                "not port unreachable",
            )?;
            ensure(
                icmp.checksum() == icmp.icmp_type().calc_checksum(icmp.payload()),
                "wrong ICMP checksum",
            )?;
            ensure(
                icmp.payload() == quote,
                "does not quote the IP header and 8 bytes",
            )
        }
        (
            Some(NetSlice::Ipv6(v6)),
            Some(TransportSlice::Icmpv6(icmp)),
            IpAddr::V6(from),
            IpAddr::V6(to),
        ) => {
            let h = v6.header().to_header();
            ensure(h.next_header == IpNumber::IPV6_ICMP, "not ICMPv6")?;
            ensure(h.payload_length == 56, "IPv6 payload length not 56")?;
            ensure(
                (h.source, h.destination) == (from.octets(), to.octets()),
                "wrong addresses",
            )?;
            ensure(h.hop_limit > 0, "hop limit 0")?;
            ensure(
                (icmp.type_u8(), icmp.code_u8()) == (1, 4),
                "not type 1 code 4",
            )?;
            ensure(
                icmp.icmp_type()
                    == Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port),
                "not port unreachable",
            )?;
            ensure(
                icmp.is_checksum_valid(h.source, h.destination),
                "wrong ICMPv6 checksum (with the pseudo-header)",
            )?;
            ensure(
                icmp.payload() == quote,
                "does not quote the IPv6 header and 8 bytes",
            )
        }
        (net, transport, _, _) => Err(format!(
            "not an ICMP error of the family of {from}: {net:?} {transport:?}"
        )),
    }
}
