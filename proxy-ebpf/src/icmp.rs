//! ICMP errors about translated flows: a backend's port unreachable, a
//! router's fragmentation-needed or packet-too-big, a time exceeded. Each
//! quotes the packet as the backend side saw it, which the client cannot
//! match to its socket; netfilter's conntrack NATs such "related" errors,
//! and so do these stages:
//! - at ingress, an error sent to the node's masquerade address about a
//!   masqueraded flow gets the client back as its destination, in the
//!   outer header and as the source of the quoted packet;
//! - at egress, an error about a flow to a backend gets the frontend back:
//!   as the destination of the quoted packet, and as the outer source when
//!   the backend itself sent it.
//!
//! Checksums are fixed incrementally: the quoted IPv4 header's, the quoted
//! TCP/UDP checksum when it was quoted, and the ICMP checksum over all of
//! them (with its pseudo-header for ICMPv6).
use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use proxy_common::{
    Addr, CT_EGRESS, CT_FLAG_SNAT_OUT, CT_SNAT_IN, CtKey, FAMILY_V4, FAMILY_V6, PROTO_TCP,
    PROTO_UDP, stat,
};

use crate::{
    maps::{PA_CONNTRACK, config, count, snat_addr},
    packet::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IP6_HLEN, v4_addr, v4_raw},
};

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;

/// Where the parts of an ICMP error sit, and what its quoted packet says.
struct IcmpError {
    family: u8,
    /// Outer addresses (IPv4: first four bytes).
    outer_src: Addr,
    outer_dst: Addr,
    /// Offset of the ICMP checksum.
    icmp_csum: usize,
    /// Offset of the quoted IP header, and of its L4 header.
    inner_l3: usize,
    inner_l4: usize,
    inner_proto: u8,
    inner_src: Addr,
    inner_dst: Addr,
    inner_sport: u16,
    inner_dport: u16,
}

#[inline(always)]
fn load<T: Copy>(ctx: &TcContext, off: usize) -> Option<T> {
    ctx.load::<T>(off).ok()
}

/// Whether an Ethernet frame is ICMP or ICMPv6 (checked by the first
/// stages when a packet is none of the protocols they translate).
#[inline(always)]
pub(crate) fn is_icmp(ctx: &TcContext) -> bool {
    match load::<u16>(ctx, 12).map(u16::from_be) {
        Some(ETH_P_IP) => load::<u8>(ctx, ETH_HLEN + 9) == Some(IPPROTO_ICMP),
        Some(ETH_P_IPV6) => load::<u8>(ctx, ETH_HLEN + 6) == Some(IPPROTO_ICMPV6),
        _ => false,
    }
}

/// Parses an ICMP error whose quoted packet is TCP or UDP with its ports;
/// anything else (echo, truncated quotes, fragments) is `None`.
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<IcmpError> {
    let ethertype = u16::from_be(load::<u16>(ctx, 12)?);
    let (family, icmp, outer_src, outer_dst) = if ethertype == ETH_P_IP {
        let vihl = load::<u8>(ctx, ETH_HLEN)?;
        let frag = u16::from_be(load::<u16>(ctx, ETH_HLEN + 6)?);
        if vihl >> 4 != 4 || frag & 0x3fff != 0 {
            return None;
        }
        let ihl = ((vihl & 0x0f) as usize) * 4;
        let addrs = load::<[[u8; 4]; 2]>(ctx, ETH_HLEN + 12)?;
        let icmp = ETH_HLEN + ihl;
        // Destination unreachable, time exceeded, parameter problem.
        let kind = load::<u8>(ctx, icmp)?;
        if kind != 3 && kind != 11 && kind != 12 {
            return None;
        }
        (FAMILY_V4, icmp, v4_addr(addrs[0]), v4_addr(addrs[1]))
    } else if ethertype == ETH_P_IPV6 {
        let addrs = load::<[Addr; 2]>(ctx, ETH_HLEN + 8)?;
        let icmp = ETH_HLEN + IP6_HLEN;
        // Destination unreachable, packet too big, time exceeded,
        // parameter problem.
        let kind = load::<u8>(ctx, icmp)?;
        if !(1..=4).contains(&kind) {
            return None;
        }
        (FAMILY_V6, icmp, addrs[0], addrs[1])
    } else {
        return None;
    };
    let inner_l3 = icmp + 8;
    let (inner_proto, inner_src, inner_dst, inner_l4) = if family == FAMILY_V4 {
        let vihl = load::<u8>(ctx, inner_l3)?;
        let ihl = ((vihl & 0x0f) as usize) * 4;
        if vihl >> 4 != 4 || ihl < 20 {
            return None;
        }
        let proto = load::<u8>(ctx, inner_l3 + 9)?;
        let addrs = load::<[[u8; 4]; 2]>(ctx, inner_l3 + 12)?;
        (proto, v4_addr(addrs[0]), v4_addr(addrs[1]), inner_l3 + ihl)
    } else {
        let proto = load::<u8>(ctx, inner_l3 + 6)?;
        let addrs = load::<[Addr; 2]>(ctx, inner_l3 + 8)?;
        (proto, addrs[0], addrs[1], inner_l3 + IP6_HLEN)
    };
    if inner_proto != PROTO_TCP && inner_proto != PROTO_UDP {
        return None;
    }
    let ports = load::<[u16; 2]>(ctx, inner_l4)?;
    Some(IcmpError {
        family,
        outer_src,
        outer_dst,
        icmp_csum: icmp + 2,
        inner_l3,
        inner_l4,
        inner_proto,
        inner_src,
        inner_dst,
        inner_sport: ports[0],
        inner_dport: ports[1],
    })
}

/// Adds the change of `size` bytes from `old` to `new` (raw, as in memory)
/// to the one's-complement checksum at `csum`.
#[inline(always)]
fn fix(ctx: &mut TcContext, csum: usize, old: u32, new: u32, size: u64) -> Result<(), i64> {
    if old != new {
        ctx.l3_csum_replace(csum, old as u64, new as u64, size)?;
    }
    Ok(())
}

/// The same for a 16-byte address, in four words.
#[inline(always)]
fn fix_addr16(ctx: &mut TcContext, csum: usize, old: &Addr, new: &Addr) -> Result<(), i64> {
    let mut i = 0;
    while i < 4 {
        let o = u32::from_ne_bytes([old[i * 4], old[i * 4 + 1], old[i * 4 + 2], old[i * 4 + 3]]);
        let n = u32::from_ne_bytes([new[i * 4], new[i * 4 + 1], new[i * 4 + 2], new[i * 4 + 3]]);
        fix(ctx, csum, o, n, 4)?;
        i += 1;
    }
    Ok(())
}

/// Rewrites one address and port of the quoted packet (its destination
/// when `dst`), fixing the quoted checksums and the ICMP checksum.
#[inline(always)]
fn rewrite_inner(
    ctx: &mut TcContext,
    e: &IcmpError,
    dst: bool,
    new_addr: &Addr,
    new_port: u16,
) -> Result<(), i64> {
    let (old_addr, old_port) = if dst {
        (e.inner_dst, e.inner_dport)
    } else {
        (e.inner_src, e.inner_sport)
    };
    let port_off = e.inner_l4 + if dst { 2 } else { 0 };
    // The quoted L4 checksum, when quoted: its pseudo-header holds the
    // address, and the port is in the header.
    let l4_csum = e.inner_l4 + if e.inner_proto == PROTO_TCP { 16 } else { 6 };
    if let Some(old_csum) = load::<u16>(ctx, l4_csum)
        && !(e.inner_proto == PROTO_UDP && e.family == FAMILY_V4 && old_csum == 0)
    {
        if e.family == FAMILY_V4 {
            fix(ctx, l4_csum, v4_raw(&old_addr), v4_raw(new_addr), 4)?;
        } else {
            fix_addr16(ctx, l4_csum, &old_addr, new_addr)?;
        }
        fix(ctx, l4_csum, old_port as u32, new_port as u32, 2)?;
        let new_csum = ctx.load::<u16>(l4_csum)?;
        fix(ctx, e.icmp_csum, old_csum as u32, new_csum as u32, 2)?;
    }
    fix(ctx, e.icmp_csum, old_port as u32, new_port as u32, 2)?;
    ctx.store(port_off, &new_port, 0)?;
    if e.family == FAMILY_V4 {
        let addr_off = e.inner_l3 + if dst { 16 } else { 12 };
        let ip_csum = e.inner_l3 + 10;
        let old_ip_csum = ctx.load::<u16>(ip_csum)?;
        fix(ctx, ip_csum, v4_raw(&old_addr), v4_raw(new_addr), 4)?;
        let new_ip_csum = ctx.load::<u16>(ip_csum)?;
        fix(ctx, e.icmp_csum, old_ip_csum as u32, new_ip_csum as u32, 2)?;
        fix(ctx, e.icmp_csum, v4_raw(&old_addr), v4_raw(new_addr), 4)?;
        ctx.store(addr_off, &v4_raw(new_addr), 0)?;
    } else {
        let addr_off = e.inner_l3 + if dst { 24 } else { 8 };
        fix_addr16(ctx, e.icmp_csum, &old_addr, new_addr)?;
        ctx.store(addr_off, new_addr, 0)?;
    }
    Ok(())
}

/// Rewrites the outer source (`dst` false) or destination address.
#[inline(always)]
fn rewrite_outer(ctx: &mut TcContext, e: &IcmpError, dst: bool, new: &Addr) -> Result<(), i64> {
    let old = if dst { e.outer_dst } else { e.outer_src };
    if e.family == FAMILY_V4 {
        let off = ETH_HLEN + if dst { 16 } else { 12 };
        fix(ctx, ETH_HLEN + 10, v4_raw(&old), v4_raw(new), 4)?;
        ctx.store(off, &v4_raw(new), 0)?;
    } else {
        let off = ETH_HLEN + if dst { 24 } else { 8 };
        // ICMPv6 sums a pseudo-header with the outer addresses.
        fix_addr16(ctx, e.icmp_csum, &old, new)?;
        ctx.store(off, new, 0)?;
    }
    Ok(())
}

fn ct_key(e: &IcmpError, dir: u8) -> CtKey {
    // The quoted packet went one way; the entry that matches it is keyed
    // the other way round.
    CtKey {
        src: e.inner_dst,
        dst: e.inner_src,
        sport: e.inner_dport,
        dport: e.inner_sport,
        proto: e.inner_proto,
        family: e.family,
        dir,
        _pad0: 0,
    }
}

/// At ingress: an error about a masqueraded flow, sent to the node.
#[inline(always)]
fn ingress(ctx: &mut TcContext) -> Result<u32, i64> {
    let Some(e) = parse(ctx) else {
        return Ok(stat::PASS_OTHER_PROTO);
    };
    let Some(node) = snat_addr(config(), e.family) else {
        return Ok(stat::PASS_OTHER_PROTO);
    };
    if e.outer_dst != node || e.inner_src != node {
        return Ok(stat::PASS_OTHER_PROTO);
    }
    // SAFETY: copied out at once; plain data.
    let Some(ct) = (unsafe { PA_CONNTRACK.get(&ct_key(&e, CT_SNAT_IN)) }).copied() else {
        return Ok(stat::PASS_OTHER_PROTO);
    };
    rewrite_inner(ctx, &e, false, &ct.nat_addr, ct.nat_port)?;
    rewrite_outer(ctx, &e, true, &ct.nat_addr)?;
    Ok(stat::ICMP_ERROR_NAT)
}

/// At egress: an error about a flow to a backend, on its way to the client.
#[inline(always)]
fn egress(ctx: &mut TcContext) -> Result<u32, i64> {
    let Some(e) = parse(ctx) else {
        return Ok(stat::PASS_OTHER_PROTO);
    };
    // SAFETY: copied out at once; plain data.
    let Some(ct) = (unsafe { PA_CONNTRACK.get(&ct_key(&e, CT_EGRESS)) }).copied() else {
        return Ok(stat::PASS_OTHER_PROTO);
    };
    if ct.flags & CT_FLAG_SNAT_OUT != 0 {
        return Ok(stat::PASS_OTHER_PROTO);
    }
    let from_backend = e.outer_src == e.inner_dst;
    rewrite_inner(ctx, &e, true, &ct.nat_addr, ct.nat_port)?;
    if from_backend {
        rewrite_outer(ctx, &e, false, &ct.nat_addr)?;
    }
    Ok(stat::ICMP_ERROR_NAT)
}

#[inline(always)]
fn finish(result: Result<u32, i64>) -> i32 {
    match result {
        Ok(reason) => count(reason),
        Err(_) => count(stat::ERR_REWRITE),
    }
    // An error that cannot be translated still goes on: the client may
    // match it by other means, and dropping it would hide it for certain.
    TC_ACT_OK as i32
}

#[classifier]
pub fn pa_icmp_ingress(mut ctx: TcContext) -> i32 {
    finish(ingress(&mut ctx))
}

#[classifier]
pub fn pa_icmp_egress(mut ctx: TcContext) -> i32 {
    finish(egress(&mut ctx))
}
