//! The TC datapath's view of a packet: header offsets, the bounds-checked
//! read, and the parser of Ethernet + IPv4/IPv6 + TCP/UDP/SCTP (Katran's
//! `pckt_parsing.h`).
//!
//! Every header read goes through bounds-checked loads: a truncated or
//! malformed packet makes a load fail and the packet is passed untouched.
use aya_ebpf::programs::TcContext;
use proxy_common::{Addr, FAMILY_V4, FAMILY_V6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, stat};

use crate::packet::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IP6_HLEN, v4_addr};

// IPv4 header offsets.
pub(crate) const IP_TOT_LEN: usize = 2;
pub(crate) const IP_CSUM: usize = 10;
pub(crate) const IP_SADDR: usize = 12;
pub(crate) const IP_DADDR: usize = 16;
// IPv6 header offsets and length.
pub(crate) const IP6_PAYLOAD_LEN: usize = 4;
const IP6_NEXTHDR: usize = 6;
pub(crate) const IP6_SADDR: usize = 8;
pub(crate) const IP6_DADDR: usize = 24;
const IPPROTO_FRAGMENT: u8 = 44;

// L4 offsets.
pub(crate) const L4_SPORT: usize = 0;
pub(crate) const L4_DPORT: usize = 2;
pub(crate) const TCP_SEQ: usize = 4;
pub(crate) const TCP_ACK_SEQ: usize = 8;
const TCP_FLAGS: usize = 13;
pub(crate) const TCP_WINDOW: usize = 14;
pub(crate) const TCP_CSUM: usize = 16;
pub(crate) const UDP_CSUM: usize = 6;
pub(crate) const SCTP_CSUM: usize = 8;

pub(crate) const TCP_FIN: u8 = 0x01;
pub(crate) const TCP_SYN: u8 = 0x02;
pub(crate) const TCP_RST: u8 = 0x04;
pub(crate) const TCP_ACK: u8 = 0x10;

/// The fields of a parsed IPv4/IPv6 TCP/UDP/SCTP packet that the datapath
/// needs. Addresses and ports are raw (network byte order as in memory); an
/// IPv4 address fills the first four bytes of an [`Addr`].
pub(crate) struct Packet {
    pub(crate) l4_off: usize,
    pub(crate) family: u8,
    pub(crate) proto: u8,
    pub(crate) saddr: Addr,
    pub(crate) daddr: Addr,
    pub(crate) sport: u16,
    pub(crate) dport: u16,
    pub(crate) tcp_flags: u8,
}

/// Reads a `T` at `off` from the linear part of the packet, bounds-checked
/// against `data_end` so the verifier (and a malformed packet) cannot make
/// it read out of range.
#[inline(always)]
fn read<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    // SAFETY: the range [start+off, start+off+size_of::<T>()) was checked to
    // lie inside the packet's linear data just above; T is plain data.
    Some(unsafe { core::ptr::read_unaligned((start + off) as *const T) })
}

/// Largest header span the parser reads: Ethernet, IPv4 with options, and
/// the fixed TCP header.
const MAX_HEADERS: usize = ETH_HLEN + 60 + 20;

/// Parses Ethernet + IPv4/IPv6 + TCP/UDP/SCTP. `Err(stat)` says why a packet
/// is not one the datapath translates; the caller passes it untouched.
#[inline(always)]
pub(crate) fn parse(ctx: &TcContext) -> Result<Packet, u32> {
    // Headers normally sit in the linear area; when they do not (a
    // non-linear skb), pull them in once so direct reads can reach them.
    let linear = ctx.data_end() - ctx.data();
    let len = ctx.len() as usize;
    if linear < MAX_HEADERS && len > linear && !headers_linear(ctx) {
        let want = if len < MAX_HEADERS { len } else { MAX_HEADERS };
        // Failure only means fewer bytes are readable; parsing then stops.
        let _ = ctx.pull_data(want as u32);
    }
    let ethertype = u16::from_be(read::<u16>(ctx, 12).ok_or(stat::PASS_TRUNCATED)?);
    let (family, proto, saddr, daddr, l4_off) = if ethertype == ETH_P_IP {
        parse_v4(ctx)?
    } else if ethertype == ETH_P_IPV6 {
        parse_v6(ctx)?
    } else {
        return Err(stat::PASS_NOT_IP);
    };
    if proto != PROTO_TCP && proto != PROTO_UDP && proto != PROTO_SCTP {
        return Err(stat::PASS_OTHER_PROTO);
    }
    // The whole fixed L4 header must be present (TCP 20 bytes, UDP 8,
    // SCTP 12).
    let tcp_flags = if proto == PROTO_TCP {
        let hdr = read::<[u8; 20]>(ctx, l4_off).ok_or(stat::PASS_TRUNCATED)?;
        hdr[TCP_FLAGS]
    } else if proto == PROTO_SCTP {
        read::<[u8; 12]>(ctx, l4_off).ok_or(stat::PASS_TRUNCATED)?;
        0
    } else {
        read::<[u8; 8]>(ctx, l4_off).ok_or(stat::PASS_TRUNCATED)?;
        0
    };
    let ports = read::<[u16; 2]>(ctx, l4_off).ok_or(stat::PASS_TRUNCATED)?;
    Ok(Packet {
        l4_off,
        family,
        proto,
        saddr,
        daddr,
        sport: ports[0],
        dport: ports[1],
        tcp_flags,
    })
}

/// Whether every header the parser reads lies in the linear area already,
/// as it does for nearly every packet (a TCP segment's headers are linear,
/// its payload in pages). A pull would copy a cloned skb (TCP keeps a clone
/// of each segment it sends) only to read what is readable. Other
/// protocols (ICMP errors read the packet they quote) say no.
#[inline(always)]
fn headers_linear(ctx: &TcContext) -> bool {
    let Some(ethertype) = read::<u16>(ctx, 12) else {
        return false;
    };
    let (l4_off, proto) = match u16::from_be(ethertype) {
        ETH_P_IP => {
            let (Some(version_ihl), Some(proto)) =
                (read::<u8>(ctx, ETH_HLEN), read::<u8>(ctx, ETH_HLEN + 9))
            else {
                return false;
            };
            (ETH_HLEN + ((version_ihl & 0x0f) as usize) * 4, proto)
        }
        ETH_P_IPV6 => {
            let Some(proto) = read::<u8>(ctx, ETH_HLEN + IP6_NEXTHDR) else {
                return false;
            };
            (ETH_HLEN + IP6_HLEN, proto)
        }
        // Not parsed any further.
        _ => return true,
    };
    let l4_len = match proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        PROTO_SCTP => 12,
        _ => return false,
    };
    ctx.data() + l4_off + l4_len <= ctx.data_end()
}

type L3 = (u8, u8, Addr, Addr, usize);

#[inline(always)]
fn parse_v4(ctx: &TcContext) -> Result<L3, u32> {
    let l3 = ETH_HLEN;
    let version_ihl = read::<u8>(ctx, l3).ok_or(stat::PASS_TRUNCATED)?;
    if version_ihl >> 4 != 4 {
        return Err(stat::PASS_NOT_IP);
    }
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(stat::PASS_TRUNCATED);
    }
    let frag = u16::from_be(read::<u16>(ctx, l3 + 6).ok_or(stat::PASS_TRUNCATED)?);
    // More-fragments set or a non-zero offset: only the first fragment
    // carries ports, so translating it alone would break the datagram.
    if frag & 0x3fff != 0 {
        return Err(stat::PASS_FRAGMENT);
    }
    let proto = read::<u8>(ctx, l3 + 9).ok_or(stat::PASS_TRUNCATED)?;
    let addrs = read::<[[u8; 4]; 2]>(ctx, l3 + IP_SADDR).ok_or(stat::PASS_TRUNCATED)?;
    Ok((
        FAMILY_V4,
        proto,
        v4_addr(addrs[0]),
        v4_addr(addrs[1]),
        l3 + ihl,
    ))
}

#[inline(always)]
fn parse_v6(ctx: &TcContext) -> Result<L3, u32> {
    let l3 = ETH_HLEN;
    let first = read::<u8>(ctx, l3).ok_or(stat::PASS_TRUNCATED)?;
    if first >> 4 != 6 {
        return Err(stat::PASS_NOT_IP);
    }
    let proto = read::<u8>(ctx, l3 + IP6_NEXTHDR).ok_or(stat::PASS_TRUNCATED)?;
    if proto == IPPROTO_FRAGMENT {
        return Err(stat::PASS_FRAGMENT);
    }
    // Other extension headers are rare on service traffic; such packets
    // are passed (counted as another protocol) rather than half-parsed.
    let addrs = read::<[Addr; 2]>(ctx, l3 + IP6_SADDR).ok_or(stat::PASS_TRUNCATED)?;
    Ok((FAMILY_V6, proto, addrs[0], addrs[1], l3 + IP6_HLEN))
}

/// The interface the program runs on.
#[inline(always)]
pub(crate) fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the skb pointer is this program's context.
    unsafe { (*ctx.skb.skb).ifindex }
}
