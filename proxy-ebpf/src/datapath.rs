//! TC programs: service DNAT with connection tracking on ingress, reverse
//! NAT of replies on egress, and masquerade (SNAT) split the same way.
//!
//! Reverse NAT runs at egress (after the stack has routed the reply) so that
//! the kernel's own conntrack, where it is active, sees a consistent flow
//! (client -> backend, backend -> client) and never marks replies invalid.
//! Masquerade follows the same rule: the forward packet is DNATed at the
//! ingress it arrives on and SNATed at the egress it leaves by; its reply is
//! un-SNATed at ingress and reverse-DNATed at egress. Every translation
//! therefore happens on a packet the stack routes normally, and no packet
//! ever carries a node address as its source into the routing input (which
//! Linux would drop as a martian).
//!
//! Every header read goes through bounds-checked loads: a truncated or
//! malformed packet makes a load fail and the packet is passed untouched.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{PerCpuArray, ProgramArray, lpm_trie::Key},
    programs::TcContext,
};
use proxy_common::{
    Addr, AffinityValue, BackendId, BackendValue, CFG_CLUSTER_V4, CFG_CLUSTER_V6,
    CFG_MASQUERADE_ALL, CT_FLAG_AFFINITY, CT_FLAG_ESTABLISHED, CT_FLAG_SEEN_FIN, CT_FLAG_SEEN_RST,
    CT_FLAG_SNAT, CT_FORWARD, CT_LIFETIME_NON_TCP_NS, CT_LIFETIME_TCP_CLOSING_NS,
    CT_LIFETIME_TCP_NS, CT_REFRESH_NS, CT_REPLY, CT_SNAT_IN, CT_SNAT_OUT, CtKey, CtValue,
    FAMILY_V4, FAMILY_V6, NodeConfig, PROTO_SCTP, PROTO_TCP, PROTO_UDP, SCOPE_EXTERNAL,
    SCOPE_INTERNAL, SNAT_LOW_PORT_MAX, SNAT_LOW_PORT_MIN, SNAT_PORT_ATTEMPTS, SNAT_PORT_MAX,
    SNAT_PORT_MIN, SNAT_TCP_HOLD_NS, SVC_AFFINITY, SVC_DROP_EMPTY, SVC_EXTERNAL,
    SVC_INTERNAL_SCOPE, SVC_LOCAL, SVC_SOURCE_RANGES, ServiceValue, SourceRangeKey,
    TAIL_ICMP_EGRESS, TAIL_ICMP_INGRESS, TAIL_NEW_FLOW, TAIL_REJECT, TAIL_SLOTS, stat,
};

use crate::maps::{
    PA_AFFINITY, PA_CONNTRACK, PA_SERVICES, PA_SOURCE_RANGES, affinity_backend, affinity_key,
    config, count, lookup_frontend, may_be_backend_port, may_be_frontend, now, pick_slot, random,
    snat_addr,
};
use crate::packet::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IP6_HLEN, v4_addr, v4_raw};

/// Working space of a new flow: the connection-tracking entries it writes
/// are built here, in this CPU's slot, rather than on the 512-byte stack.
#[repr(C)]
struct FlowScratch {
    key: CtKey,
    value: CtValue,
    key2: CtKey,
    value2: CtValue,
}

#[map]
static PA_SCRATCH: PerCpuArray<FlowScratch> = PerCpuArray::with_max_entries(1, 0);

/// The later stages of ingress, tail-called (see `proxy_common::TAIL_*`).
#[map]
static PA_PROGS: ProgramArray = ProgramArray::with_max_entries(TAIL_SLOTS, 0);

// IPv4 header offsets.
const IP_TOT_LEN: usize = 2;
const IP_CSUM: usize = 10;
const IP_SADDR: usize = 12;
const IP_DADDR: usize = 16;
// IPv6 header offsets and length.
const IP6_PAYLOAD_LEN: usize = 4;
const IP6_NEXTHDR: usize = 6;
const IP6_SADDR: usize = 8;
const IP6_DADDR: usize = 24;
const IPPROTO_FRAGMENT: u8 = 44;

// L4 offsets.
const L4_SPORT: usize = 0;
const L4_DPORT: usize = 2;
const TCP_SEQ: usize = 4;
const TCP_ACK_SEQ: usize = 8;
const TCP_FLAGS: usize = 13;
const TCP_WINDOW: usize = 14;
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;
const SCTP_CSUM: usize = 8;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

const TC_ACT_REDIRECT: i32 = 7;

/// The fields of a parsed IPv4/IPv6 TCP/UDP/SCTP packet that the datapath
/// needs. Addresses and ports are raw (network byte order as in memory); an
/// IPv4 address fills the first four bytes of an [`Addr`].
struct Packet {
    l4_off: usize,
    family: u8,
    proto: u8,
    saddr: Addr,
    daddr: Addr,
    sport: u16,
    dport: u16,
    tcp_flags: u8,
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
fn parse(ctx: &TcContext) -> Result<Packet, u32> {
    // Headers normally sit in the linear area; when they do not (a
    // non-linear skb), pull them in once so direct reads can reach them.
    let linear = ctx.data_end() - ctx.data();
    let len = ctx.len() as usize;
    if linear < MAX_HEADERS && len > linear {
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

#[inline(always)]
fn lifetime(proto: u8, flags: u16) -> u64 {
    if proto != PROTO_TCP {
        CT_LIFETIME_NON_TCP_NS
    } else if flags & (CT_FLAG_SEEN_FIN | CT_FLAG_SEEN_RST) != 0 {
        CT_LIFETIME_TCP_CLOSING_NS
    } else {
        CT_LIFETIME_TCP_NS
    }
}

#[inline(always)]
fn tcp_ct_flags(pkt: &Packet) -> u16 {
    let mut flags = 0;
    if pkt.proto != PROTO_TCP {
        return flags;
    }
    if pkt.tcp_flags & TCP_FIN != 0 {
        flags |= CT_FLAG_SEEN_FIN;
    }
    if pkt.tcp_flags & TCP_RST != 0 {
        flags |= CT_FLAG_SEEN_RST;
    }
    if pkt.tcp_flags & TCP_SYN == 0 {
        flags |= CT_FLAG_ESTABLISHED;
    }
    flags
}

/// Refreshes an entry's clock and TCP state. Returns `None` when the entry
/// has expired, or when a new connection reuses its tuple, and must not be
/// used; else whether the clock was refreshed.
///
/// A SYN (or SYN-ACK) belongs to a new connection once this direction has
/// carried anything but its handshake: a client that reconnects from the
/// same port, to the frontend again or straight to the backend, must not
/// be translated as the old flow was. Retransmitted handshakes still are.
#[inline(always)]
fn ct_touch(ct: &mut CtValue, pkt: &Packet, now: u64) -> Option<bool> {
    if now.wrapping_sub(ct.last_seen_ns) > lifetime(pkt.proto, ct.flags) {
        return None;
    }
    let over = CT_FLAG_SEEN_FIN | CT_FLAG_SEEN_RST | CT_FLAG_ESTABLISHED;
    if pkt.proto == PROTO_TCP && pkt.tcp_flags & TCP_SYN != 0 && ct.flags & over != 0 {
        return None;
    }
    let new_flags = ct.flags | tcp_ct_flags(pkt);
    if new_flags != ct.flags || now.wrapping_sub(ct.last_seen_ns) > CT_REFRESH_NS {
        ct.flags = new_flags;
        ct.last_seen_ns = now;
        return Some(true);
    }
    Some(false)
}

fn ct_key(pkt: &Packet, dir: u8) -> CtKey {
    CtKey {
        src: pkt.saddr,
        dst: pkt.daddr,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        family: pkt.family,
        dir,
        _pad0: 0,
    }
}

/// Offset of the L4 checksum, and the flags its updates need; `None` for
/// SCTP, whose CRC32c covers no IP pseudo-header.
#[inline(always)]
fn l4_csum(pkt: &Packet) -> Option<(usize, u64)> {
    if pkt.proto == PROTO_TCP {
        Some((pkt.l4_off + TCP_CSUM, 0))
    } else if pkt.proto == PROTO_UDP {
        // A zero UDP checksum over IPv4 means "none" and must stay zero.
        let mangled = if pkt.family == FAMILY_V4 {
            BPF_F_MARK_MANGLED_0 as u64
        } else {
            0
        };
        Some((pkt.l4_off + UDP_CSUM, mangled))
    } else {
        None
    }
}

/// Rewrites one address and port of the packet (destination when `dst`,
/// source otherwise) and fixes the checksums incrementally: the IPv4 header
/// checksum, the TCP/UDP checksum (pseudo-header included), or the SCTP
/// CRC32c when a port changes.
#[inline(always)]
fn rewrite(
    ctx: &mut TcContext,
    pkt: &Packet,
    dst: bool,
    old_addr: &Addr,
    new_addr: &Addr,
    old_port: u16,
    new_port: u16,
) -> Result<(), i64> {
    let (addr_off, port_off) = match (pkt.family == FAMILY_V4, dst) {
        (true, true) => (ETH_HLEN + IP_DADDR, pkt.l4_off + L4_DPORT),
        (true, false) => (ETH_HLEN + IP_SADDR, pkt.l4_off + L4_SPORT),
        (false, true) => (ETH_HLEN + IP6_DADDR, pkt.l4_off + L4_DPORT),
        (false, false) => (ETH_HLEN + IP6_SADDR, pkt.l4_off + L4_SPORT),
    };
    let addr_changed = old_addr != new_addr;
    let port_changed = old_port != new_port;
    if let Some((csum_off, mangled)) = l4_csum(pkt) {
        let present =
            pkt.proto == PROTO_TCP || pkt.family == FAMILY_V6 || ctx.load::<u16>(csum_off)? != 0;
        if present {
            if addr_changed {
                if pkt.family == FAMILY_V4 {
                    ctx.l4_csum_replace(
                        csum_off,
                        v4_raw(old_addr) as u64,
                        v4_raw(new_addr) as u64,
                        BPF_F_PSEUDO_HDR as u64 | mangled | 4,
                    )?;
                } else {
                    let diff = csum_diff16(old_addr, new_addr)?;
                    ctx.l4_csum_replace(csum_off, 0, diff, BPF_F_PSEUDO_HDR as u64 | mangled)?;
                }
            }
            if port_changed {
                ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled | 2)?;
            }
        }
    } else if port_changed {
        let port_at = if dst { L4_DPORT } else { L4_SPORT };
        let ret = sctp_port_changed(ctx, pkt, port_at, old_port ^ new_port);
        if ret < 0 {
            return Err(ret);
        }
    }
    if addr_changed {
        if pkt.family == FAMILY_V4 {
            let (old, new) = (v4_raw(old_addr), v4_raw(new_addr));
            ctx.l3_csum_replace(ETH_HLEN + IP_CSUM, old as u64, new as u64, 4)?;
            ctx.store(addr_off, &new, 0)?;
        } else {
            ctx.store(addr_off, new_addr, 0)?;
        }
    }
    if port_changed {
        ctx.store(port_off, &new_port, 0)?;
    }
    Ok(())
}

/// The one's-complement difference between two 16-byte addresses, as
/// `bpf_l4_csum_replace` takes it.
#[inline(always)]
fn csum_diff16(old: &Addr, new: &Addr) -> Result<u64, i64> {
    let mut from = *old;
    let mut to = *new;
    // SAFETY: both buffers are 16 bytes on this program's stack, a multiple
    // of four as the helper requires; it only reads them.
    let diff = unsafe {
        bpf_csum_diff(
            from.as_mut_ptr() as *mut u32,
            16,
            to.as_mut_ptr() as *mut u32,
            16,
            0,
        )
    };
    if diff < 0 {
        return Err(diff);
    }
    Ok(diff as u64)
}

/// CRC32c (Castagnoli), reflected polynomial.
const CRC32C_POLY: u32 = 0x82F6_3B78;

/// `x^(2^k) mod P` for k = 0..32, in the reflected bit order, for shifting
/// a CRC over runs of zero bytes (the method of zlib's crc32_combine).
const X2N: [u32; 32] = x2n_table();

const fn multmodp(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut p = 0u32;
    let mut i = 0;
    while i < 32 {
        if a & m != 0 {
            p ^= b;
        }
        m >>= 1;
        b = if b & 1 != 0 {
            (b >> 1) ^ CRC32C_POLY
        } else {
            b >> 1
        };
        i += 1;
    }
    p
}

const fn x2n_table() -> [u32; 32] {
    let mut table = [0u32; 32];
    let mut p = 1u32 << 30; // x^1
    let mut k = 0;
    while k < 32 {
        table[k] = p;
        p = multmodp(p, p);
        k += 1;
    }
    table
}

/// `crc * x^(8 * bytes) mod P`: the effect of `bytes` zero bytes following
/// the data a raw CRC was taken over.
#[inline(always)]
fn crc_shift_zeros(crc: u32, bytes: u32) -> u32 {
    let mut p = crc;
    let mut n = bytes;
    // 8 * bytes = bytes << 3: start at x^(2^3).
    let mut k = 3;
    while k < 32 {
        if n == 0 {
            break;
        }
        if n & 1 != 0 {
            p = multmodp(X2N[k], p);
        }
        n >>= 1;
        k += 1;
    }
    p
}

/// Fixes the SCTP CRC32c for a port change. CRC is linear: the checksum of
/// the new packet is the old one XOR the raw CRC of the difference, which is
/// non-zero only in the changed port, followed by the rest of the packet as
/// zero bytes. That costs a few hundred instructions, independent of the
/// packet's size, instead of a pass over the whole payload.
#[inline(never)]
///
/// `delta` is the XOR of the old and new port as they sit in memory, at
/// offset `port_at` of the SCTP header. Returns 0, or a helper's error.
fn sctp_port_changed(ctx: &mut TcContext, pkt: &Packet, port_at: usize, delta: u16) -> i64 {
    let delta = delta.to_ne_bytes();
    // Raw CRC (no init, no final xor) of the delta's bytes at the port's
    // place: the leading zero bytes leave the register at zero, so only
    // these two bytes and the zeros after them matter.
    let mut crc = 0u32;
    let mut i = 0;
    while i < 2 {
        crc ^= delta[i] as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ CRC32C_POLY
            } else {
                crc >> 1
            };
            bit += 1;
        }
        i += 1;
    }
    // The SCTP packet ends where the IP header says, not at the end of the
    // skb: at ingress a short frame still carries its Ethernet padding.
    let skb_end = ctx.len() as usize;
    let ip_end = if pkt.family == FAMILY_V4 {
        match ctx.load::<u16>(ETH_HLEN + IP_TOT_LEN) {
            Ok(v) => ETH_HLEN + u16::from_be(v) as usize,
            Err(e) => return e,
        }
    } else {
        match ctx.load::<u16>(ETH_HLEN + IP6_PAYLOAD_LEN) {
            // Zero: a jumbogram, whose length is in an option; the skb's.
            Ok(0) => skb_end,
            Ok(v) => ETH_HLEN + IP6_HLEN + u16::from_be(v) as usize,
            Err(e) => return e,
        }
    };
    let end = if ip_end < skb_end { ip_end } else { skb_end };
    let sctp_len = end.saturating_sub(pkt.l4_off);
    let after = sctp_len.saturating_sub(port_at + 2) as u32;
    let crc = crc_shift_zeros(crc, after);
    let off = pkt.l4_off + SCTP_CSUM;
    // The checksum field holds the CRC little-endian.
    let old: u32 = match ctx.load(off) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let new = u32::from_le(old) ^ crc;
    match ctx.store(off, &new.to_le(), 0) {
        Ok(()) => 0,
        Err(e) => e,
    }
}

/// Whether `addr` lies in `prefix`/`len` (both in network byte order).
#[inline(always)]
fn in_prefix(addr: &Addr, prefix: &Addr, len: u8) -> bool {
    let mut i = 0;
    while i < 16 {
        let bits = (len as i32) - (i as i32) * 8;
        if bits <= 0 {
            return true;
        }
        let mask: u8 = if bits >= 8 {
            0xff
        } else {
            0xffu8 << (8 - bits)
        };
        if addr[i] & mask != prefix[i] & mask {
            return false;
        }
        i += 1;
    }
    true
}

/// Whether `addr` is inside the cluster CIDR of its family (`None`: no
/// cluster CIDR configured for that family).
#[inline(always)]
fn in_cluster(cfg: Option<&NodeConfig>, family: u8, addr: &Addr) -> Option<bool> {
    let cfg = cfg?;
    if family == FAMILY_V4 {
        if cfg.flags & CFG_CLUSTER_V4 == 0 {
            return None;
        }
        Some(in_prefix(addr, &cfg.cluster_v4, cfg.cluster_v4_len))
    } else {
        if cfg.flags & CFG_CLUSTER_V6 == 0 {
            return None;
        }
        Some(in_prefix(addr, &cfg.cluster_v6, cfg.cluster_v6_len))
    }
}

#[classifier]
pub fn pa_ingress(mut ctx: TcContext) -> i32 {
    stage(&mut ctx, TC_ACT_OK as i32, Some(TAIL_ICMP_INGRESS), ingress)
}

/// Parses the packet and runs `body` on it, counting the reason it gives;
/// a packet that does not parse is counted and gets `unparsed`, unless it
/// is ICMP and `icmp` names the stage for it.
#[inline(always)]
fn stage(
    ctx: &mut TcContext,
    unparsed: i32,
    icmp: Option<u32>,
    body: impl FnOnce(&mut TcContext, &Packet) -> Verdict,
) -> i32 {
    let pkt = match parse(ctx) {
        Ok(pkt) => pkt,
        Err(reason) => {
            if reason == stat::PASS_OTHER_PROTO
                && let Some(slot) = icmp
                && crate::icmp::is_icmp(ctx)
            {
                let (_, failed) = tail_call(ctx, slot);
                count(failed);
                return unparsed;
            }
            count(reason);
            return unparsed;
        }
    };
    let (verdict, reason) = body(ctx, &pkt);
    count(reason);
    verdict
}

type Verdict = (i32, u32);

#[inline(always)]
fn ingress(ctx: &mut TcContext, pkt: &Packet) -> Verdict {
    let cfg = config();
    // A reply to a masqueraded flow: give it back its client as destination.
    if let Some(snat) = snat_addr(cfg, pkt.family)
        && snat == pkt.daddr
        && let Some(ct) = PA_CONNTRACK.get_ptr_mut(&ct_key(pkt, CT_SNAT_IN))
    {
        // SAFETY: the pointer is to a live map value; concurrent writers
        // only ever store whole plain-data fields, so a torn read at worst
        // refreshes a clock twice.
        let ct = unsafe { &mut *ct };
        if ct_touch(ct, pkt, now()).is_some() {
            let (addr, port) = (ct.nat_addr, ct.nat_port);
            return match rewrite(ctx, pkt, true, &pkt.daddr, &addr, pkt.dport, port) {
                Ok(()) => (TC_ACT_OK as i32, stat::SNAT_IN),
                Err(_) => (TC_ACT_SHOT as i32, stat::ERR_REWRITE),
            };
        }
    }

    // Traffic to anything but a frontend has no flow and no service here.
    if !may_be_frontend(pkt.family, &pkt.daddr) {
        forget_flow_on_tuple(ctx, pkt);
        return (TC_ACT_OK as i32, stat::PASS_NO_SERVICE);
    }
    let fwd_key = ct_key(pkt, CT_FORWARD);
    if let Some(ct) = PA_CONNTRACK.get_ptr_mut(&fwd_key) {
        // SAFETY: as above.
        let ct = unsafe { &mut *ct };
        let now = now();
        if let Some(refreshed) = ct_touch(ct, pkt, now) {
            if refreshed && ct.flags & CT_FLAG_AFFINITY != 0 {
                refresh_affinity(ct.svc_id, pkt, ct.backend_id, now);
            }
            let (addr, port) = (ct.nat_addr, ct.nat_port);
            return match rewrite(ctx, pkt, true, &pkt.daddr, &addr, pkt.dport, port) {
                Ok(()) => (TC_ACT_OK as i32, stat::DNAT_ESTABLISHED),
                Err(_) => (TC_ACT_SHOT as i32, stat::ERR_REWRITE),
            };
        }
        // Over: gone even if no new flow replaces it (its frontend went),
        // so that later packets on the tuple are not translated by it.
        let _ = PA_CONNTRACK.remove(&fwd_key);
    }
    tail_call(ctx, TAIL_NEW_FLOW)
}

/// Forgets the flow through a frontend whose answers came from where `pkt`,
/// which is for no frontend, goes, to the port it comes from: the client
/// now talks to that backend directly, from the same port, and the old
/// flow's entries would translate the answers (and masquerade the packets)
/// as the old flow's. Should the client go back to the frontend, its next
/// packet starts a new flow. Only UDP and SCTP need this; a TCP connection
/// announces itself with a SYN (see `ct_touch`).
///
/// The flow's own packets look the same once translated, and a bridge
/// passes them up to a second hook (a pod's port, then the bridge): only a
/// packet on the interface the flow came in by counts as the client's.
#[inline(always)]
fn forget_flow_on_tuple(ctx: &TcContext, pkt: &Packet) {
    if pkt.proto == PROTO_TCP || !may_be_backend_port(pkt.dport) {
        return;
    }
    let mut key = CtKey {
        src: pkt.daddr,
        dst: pkt.saddr,
        sport: pkt.dport,
        dport: pkt.sport,
        proto: pkt.proto,
        family: pkt.family,
        dir: CT_REPLY,
        _pad0: 0,
    };
    // SAFETY: the fields are copied out at once; plain data.
    let Some((frontend, frontend_port, flags, in_ifindex)) = (unsafe { PA_CONNTRACK.get(&key) })
        .map(|ct| (ct.nat_addr, ct.nat_port, ct.flags, ct.in_ifindex))
    else {
        return;
    };
    if in_ifindex != 0 && in_ifindex != ifindex(ctx) {
        return;
    }
    let _ = PA_CONNTRACK.remove(&key);
    key = CtKey {
        src: pkt.saddr,
        dst: frontend,
        sport: pkt.sport,
        dport: frontend_port,
        dir: CT_FORWARD,
        ..key
    };
    let _ = PA_CONNTRACK.remove(&key);
    // The masquerade leg at egress; the node port's entry keeps the port
    // held until it expires, as every closed flow's does.
    if flags & CT_FLAG_SNAT != 0 {
        let _ = PA_CONNTRACK.remove(&ct_key(pkt, CT_SNAT_OUT));
    }
    count(stat::FLOW_TUPLE_REUSED);
}

/// The interface the program runs on.
#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the skb pointer is this program's context.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Continues with the stage in `slot`; returns only if that fails.
#[inline(always)]
fn tail_call(ctx: &TcContext, slot: u32) -> Verdict {
    // SAFETY: control passes to a program of the same type on the same
    // context; nothing of this program's state is needed afterwards.
    unsafe { PA_PROGS.tail_call(ctx, slot) };
    (TC_ACT_OK as i32, stat::ERR_TAIL_CALL)
}

#[classifier]
pub fn pa_new_flow(mut ctx: TcContext) -> i32 {
    stage(&mut ctx, TC_ACT_OK as i32, None, |ctx, pkt| {
        new_flow(ctx, pkt, config())
    })
}

/// Packets that reach it were parsed by the earlier stages; one that no
/// longer parses is dropped, as a rejected packet would be.
#[classifier]
pub fn pa_reject(mut ctx: TcContext) -> i32 {
    stage(&mut ctx, TC_ACT_SHOT as i32, None, reject)
}

#[inline(always)]
fn new_flow(ctx: &mut TcContext, pkt: &Packet, cfg: Option<&NodeConfig>) -> Verdict {
    let Some((mut svc_key, mut svc)) =
        lookup_frontend(pkt.family, pkt.proto, &pkt.daddr, pkt.dport)
    else {
        // A node address, say, with a host-network backend behind it.
        forget_flow_on_tuple(ctx, pkt);
        return (TC_ACT_OK as i32, stat::PASS_NO_SERVICE);
    };
    if svc.flags & SVC_SOURCE_RANGES != 0 && !source_allowed(svc.svc_id, pkt) {
        return (TC_ACT_SHOT as i32, stat::DROP_SOURCE_RANGE);
    }
    let client_in_cluster = in_cluster(cfg, pkt.family, &pkt.saddr);
    // In-cluster clients of an external Local frontend use the cluster-wide
    // view (kube-proxy's short-circuit of pod traffic).
    if svc.flags & SVC_INTERNAL_SCOPE != 0 && client_in_cluster == Some(true) {
        svc_key.scope = SCOPE_INTERNAL;
        // SAFETY: copied out at once; plain data.
        match unsafe { PA_SERVICES.get(&svc_key) } {
            Some(internal) => svc = *internal,
            None => svc_key.scope = SCOPE_EXTERNAL,
        }
    }
    if svc.count == 0 {
        if svc.flags & SVC_DROP_EMPTY != 0 {
            return (TC_ACT_SHOT as i32, stat::DROP_NO_LOCAL_BACKEND);
        }
        let (_, reason) = tail_call(ctx, TAIL_REJECT);
        return (TC_ACT_SHOT as i32, reason);
    }

    let now = now();
    let mut chosen: Option<(BackendId, BackendValue)> = None;
    let affinity = svc.flags & SVC_AFFINITY != 0;
    if affinity && let Some(found) = affinity_backend(&svc, pkt.family, &pkt.saddr, now) {
        chosen = Some(found);
    }
    let from_affinity = chosen.is_some();
    let (backend_id, backend) = match chosen {
        Some(found) => found,
        None => match pick_slot(&svc, &svc_key) {
            Some(found) => found,
            None => return (TC_ACT_OK as i32, stat::PASS_BACKEND_MISSING),
        },
    };
    if affinity {
        let key = affinity_key(svc.svc_id, pkt.family, &pkt.saddr);
        let value = AffinityValue {
            backend_id,
            _pad0: 0,
            last_seen_ns: now,
        };
        // A failed insert only costs the next connection its affinity.
        let _ = PA_AFFINITY.insert(&key, &value, 0);
    }

    let masquerade = needs_masquerade(cfg, &svc, svc_key.scope, pkt, &backend, client_in_cluster);
    let mut flags = tcp_ct_flags(pkt);
    if affinity {
        flags |= CT_FLAG_AFFINITY;
    }
    let Some(scratch) = PA_SCRATCH.get_ptr_mut(0) else {
        return (TC_ACT_OK as i32, stat::ERR_REWRITE);
    };
    // SAFETY: this CPU's slot of a per-CPU array; nothing else uses it
    // while this program runs (programs do not preempt each other on a CPU).
    let scratch = unsafe { &mut *scratch };
    let mut snat_reason = stat::DNAT_NEW;
    if masquerade {
        match snat_addr(cfg, pkt.family) {
            Some(node) => {
                scratch.value = CtValue {
                    nat_addr: pkt.saddr,
                    nat_port: pkt.sport,
                    flags,
                    backend_id: 0,
                    svc_id: 0,
                    in_ifindex: ifindex(ctx),
                    last_seen_ns: now,
                };
                if !allocate_snat(scratch, pkt, &backend, &node) {
                    return (TC_ACT_SHOT as i32, stat::DROP_SNAT_EXHAUSTED);
                }
                flags |= CT_FLAG_SNAT;
                snat_reason = stat::SNAT_NEW;
            }
            None => count(stat::PASS_NO_SNAT_ADDRESS),
        }
    }

    // The reply entry first: a reply can never arrive before the forward
    // packet is sent, but it must find its entry when it does.
    scratch.key = CtKey {
        src: backend.addr,
        dst: pkt.saddr,
        sport: backend.port,
        dport: pkt.sport,
        proto: pkt.proto,
        family: pkt.family,
        dir: CT_REPLY,
        _pad0: 0,
    };
    scratch.value = CtValue {
        nat_addr: pkt.daddr,
        nat_port: pkt.dport,
        flags,
        backend_id,
        svc_id: svc.svc_id,
        in_ifindex: ifindex(ctx),
        last_seen_ns: now,
    };
    if PA_CONNTRACK
        .insert(&scratch.key, &scratch.value, 0)
        .is_err()
    {
        return (TC_ACT_SHOT as i32, stat::ERR_REWRITE);
    }
    scratch.key = ct_key(pkt, CT_FORWARD);
    scratch.value.nat_addr = backend.addr;
    scratch.value.nat_port = backend.port;
    if PA_CONNTRACK
        .insert(&scratch.key, &scratch.value, 0)
        .is_err()
    {
        return (TC_ACT_SHOT as i32, stat::ERR_REWRITE);
    }
    if from_affinity {
        count(stat::AFFINITY_HIT);
    }
    match rewrite(
        ctx,
        pkt,
        true,
        &pkt.daddr,
        &backend.addr,
        pkt.dport,
        backend.port,
    ) {
        Ok(()) => (TC_ACT_OK as i32, snat_reason),
        Err(_) => (TC_ACT_SHOT as i32, stat::ERR_REWRITE),
    }
}

#[inline(always)]
fn source_allowed(svc_id: u32, pkt: &Packet) -> bool {
    let bits = if pkt.family == FAMILY_V4 { 32 } else { 128 };
    let key = Key::new(
        32 + bits,
        SourceRangeKey {
            svc_id_be: svc_id.to_be(),
            addr: pkt.saddr,
        },
    );
    PA_SOURCE_RANGES.get(&key).is_some()
}

/// Keeps a client's affinity alive while its connections carry packets
/// (the timeout runs from the client's last packet).
#[inline(always)]
fn refresh_affinity(svc_id: u32, pkt: &Packet, backend_id: BackendId, now: u64) {
    let key = affinity_key(svc_id, pkt.family, &pkt.saddr);
    if let Some(entry) = PA_AFFINITY.get_ptr_mut(&key) {
        // SAFETY: a live map value of plain data; see ingress.
        let entry = unsafe { &mut *entry };
        if entry.backend_id == backend_id {
            entry.last_seen_ns = now;
        }
    }
}

/// Whether a new flow is masqueraded, as kube-proxy decides it:
/// - a client that is its own backend (hairpin), whose reply would otherwise
///   never leave the pod;
/// - with `--masquerade-all`, everything but a Local external frontend
///   (whose point is to keep the client's address);
/// - external frontends with the Cluster policy, unless the client is a pod;
/// - cluster IPs reached from outside the cluster CIDR (only when one is set).
#[inline(always)]
fn needs_masquerade(
    cfg: Option<&NodeConfig>,
    svc: &ServiceValue,
    scope: u8,
    pkt: &Packet,
    backend: &BackendValue,
    client_in_cluster: Option<bool>,
) -> bool {
    if pkt.saddr == backend.addr {
        return true;
    }
    let external = svc.flags & SVC_EXTERNAL != 0;
    let keeps_source = external && svc.flags & SVC_LOCAL != 0 && scope == SCOPE_EXTERNAL;
    if keeps_source {
        return false;
    }
    if let Some(cfg) = cfg
        && cfg.flags & CFG_MASQUERADE_ALL != 0
    {
        return true;
    }
    if external {
        client_in_cluster != Some(true)
    } else {
        client_in_cluster == Some(false)
    }
}

/// Picks a node port for a masqueraded flow and writes both of its
/// entries. The port is claimed by inserting the reply-side entry with
/// `BPF_NOEXIST`: two flows can never share (backend, node address, port),
/// even when CPUs race. Returns false when every attempt collided.
///
/// `scratch.value` holds the value of the reply-side entry on entry: the
/// client's address and port, with the flow's flags and clock.
#[inline(never)]
fn allocate_snat(
    scratch: &mut FlowScratch,
    pkt: &Packet,
    backend: &BackendValue,
    node: &Addr,
) -> bool {
    let (mut min, mut max, low_min, low_max) = match config() {
        Some(c) => (
            c.snat_port_min as u32,
            c.snat_port_max as u32,
            c.snat_low_min as u32,
            c.snat_low_max as u32,
        ),
        None => (
            SNAT_PORT_MIN as u32,
            SNAT_PORT_MAX as u32,
            SNAT_LOW_PORT_MIN as u32,
            SNAT_LOW_PORT_MAX as u32,
        ),
    };
    if min == 0 || max < min {
        min = SNAT_PORT_MIN as u32;
        max = SNAT_PORT_MAX as u32;
    }
    // Offsets below `low` fall in the low range, the rest in the high one.
    let low = if low_min != 0 && low_max >= low_min {
        low_max - low_min + 1
    } else {
        0
    };
    // One range is chosen, in proportion to its size, before the loop: a
    // choice per attempt would double the verifier's paths at each one.
    let high = max - min + 1;
    let pick = random().checked_rem(high + low).unwrap_or(0);
    let (base, span, start) = if pick < low {
        (low_min, low, pick)
    } else {
        (min, high, pick - low)
    };
    scratch.key = CtKey {
        src: backend.addr,
        dst: *node,
        sport: backend.port,
        dport: 0,
        proto: pkt.proto,
        family: pkt.family,
        dir: CT_SNAT_IN,
        _pad0: 0,
    };
    let mut i = 0;
    while i < SNAT_PORT_ATTEMPTS {
        let offset = start.wrapping_add(i).checked_rem(span).unwrap_or(0);
        let port = ((base + offset) as u16).to_be();
        scratch.key.dport = port;
        if claim_snat_port(scratch, pkt.proto) {
            scratch.key2 = CtKey {
                src: pkt.saddr,
                dst: backend.addr,
                sport: pkt.sport,
                dport: backend.port,
                proto: pkt.proto,
                family: pkt.family,
                dir: CT_SNAT_OUT,
                _pad0: 0,
            };
            scratch.value2 = CtValue {
                nat_addr: *node,
                nat_port: port,
                ..scratch.value
            };
            if PA_CONNTRACK
                .insert(&scratch.key2, &scratch.value2, 0)
                .is_err()
            {
                let _ = PA_CONNTRACK.remove(&scratch.key);
                return false;
            }
            return true;
        }
        i += 1;
    }
    false
}

/// Claims the masquerade tuple `scratch.key` for the flow in
/// `scratch.value`: inserts it if free, or takes it over from a flow that
/// is over (expired, and for TCP past [`SNAT_TCP_HOLD_NS`]). Only a
/// `BPF_NOEXIST` insert claims, so two CPUs never both get one tuple; the
/// delete before it only makes room.
#[inline(never)]
fn claim_snat_port(scratch: &mut FlowScratch, proto: u8) -> bool {
    let insert = |s: &FlowScratch| {
        PA_CONNTRACK
            .insert(&s.key, &s.value, BPF_NOEXIST as u64)
            .is_ok()
    };
    if insert(scratch) {
        return true;
    }
    // SAFETY: copied out at once; plain data.
    let Some(old) = (unsafe { PA_CONNTRACK.get(&scratch.key) }).copied() else {
        // Gone in between: free now.
        return insert(scratch);
    };
    let idle = scratch.value.last_seen_ns.wrapping_sub(old.last_seen_ns);
    let mut hold = lifetime(proto, old.flags);
    if proto == PROTO_TCP && hold < SNAT_TCP_HOLD_NS {
        hold = SNAT_TCP_HOLD_NS;
    }
    if idle <= hold {
        return false;
    }
    let _ = PA_CONNTRACK.remove(&scratch.key);
    insert(scratch)
}

/// Refuses a connection to a service without any endpoint, so the client
/// fails at once instead of waiting for a timeout: a TCP SYN gets a reset,
/// a UDP or SCTP packet an ICMP port-unreachable, sent back out of the
/// interface it came in on. Other TCP packets are dropped.
#[inline(always)]
fn reject(ctx: &mut TcContext, pkt: &Packet) -> Verdict {
    let done = if pkt.proto == PROTO_TCP {
        if pkt.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
            return (TC_ACT_SHOT as i32, stat::REJECT);
        }
        tcp_reset(ctx, pkt)
    } else if pkt.family == FAMILY_V4 {
        icmp4_unreachable(ctx, pkt)
    } else {
        icmp6_unreachable(ctx, pkt)
    };
    if done.is_err() {
        return (TC_ACT_SHOT as i32, stat::ERR_REJECT);
    }
    let ifindex = ifindex(ctx);
    // SAFETY: bpf_redirect only records the target; no memory is passed.
    let action = unsafe { bpf_redirect(ifindex, 0) };
    if action as i32 != TC_ACT_REDIRECT {
        return (TC_ACT_SHOT as i32, stat::ERR_REJECT);
    }
    (TC_ACT_REDIRECT, stat::REJECT)
}

/// Swaps the Ethernet addresses, so the frame goes back to its sender.
#[inline(always)]
fn swap_macs(ctx: &mut TcContext) -> Result<(), i64> {
    let macs: [u8; 12] = ctx.load(0)?;
    let mut swapped = [0u8; 12];
    let mut i = 0;
    while i < 6 {
        swapped[i] = macs[i + 6];
        swapped[i + 6] = macs[i];
        i += 1;
    }
    ctx.store(0, &swapped, 0)
}

/// Turns a SYN into the matching RST+ACK in place. Swapping addresses and
/// ports leaves every checksum unchanged, and the other fields are updated
/// incrementally, so this is correct whatever checksum offload state the
/// packet is in. Options stay (Linux ignores them on a reset).
#[inline(never)]
fn tcp_reset(ctx: &mut TcContext, pkt: &Packet) -> Result<(), i64> {
    let l4 = pkt.l4_off;
    let csum = l4 + TCP_CSUM;
    let seq: u32 = ctx.load(l4 + TCP_SEQ)?;
    let old_ack: u32 = ctx.load(l4 + TCP_ACK_SEQ)?;
    let new_ack = u32::from_be(seq).wrapping_add(1).to_be();
    let old_flags: u16 = ctx.load(l4 + 12)?;
    let mut flag_bytes = old_flags.to_ne_bytes();
    flag_bytes[1] = TCP_RST | TCP_ACK;
    let new_flags = u16::from_ne_bytes(flag_bytes);
    let old_window: u16 = ctx.load(l4 + TCP_WINDOW)?;
    ctx.l4_csum_replace(csum, seq as u64, 0, 4)?;
    ctx.store(l4 + TCP_SEQ, &0u32, 0)?;
    ctx.l4_csum_replace(csum, old_ack as u64, new_ack as u64, 4)?;
    ctx.store(l4 + TCP_ACK_SEQ, &new_ack, 0)?;
    ctx.l4_csum_replace(csum, old_flags as u64, new_flags as u64, 2)?;
    ctx.store(l4 + 12, &new_flags, 0)?;
    ctx.l4_csum_replace(csum, old_window as u64, 0, 2)?;
    ctx.store(l4 + TCP_WINDOW, &0u16, 0)?;
    ctx.store(l4 + L4_SPORT, &pkt.dport, 0)?;
    ctx.store(l4 + L4_DPORT, &pkt.sport, 0)?;
    if pkt.family == FAMILY_V4 {
        ctx.store(ETH_HLEN + IP_SADDR, &v4_raw(&pkt.daddr), 0)?;
        ctx.store(ETH_HLEN + IP_DADDR, &v4_raw(&pkt.saddr), 0)?;
    } else {
        ctx.store(ETH_HLEN + IP6_SADDR, &pkt.daddr, 0)?;
        ctx.store(ETH_HLEN + IP6_DADDR, &pkt.saddr, 0)?;
    }
    swap_macs(ctx)
}

/// One's-complement sum of 16-bit big-endian words.
#[inline(always)]
fn sum16(bytes: &[u8], mut acc: u32) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        acc += ((bytes[i] as u32) << 8) | bytes[i + 1] as u32;
        i += 2;
    }
    acc
}

#[inline(always)]
fn fold(mut acc: u32) -> u16 {
    acc = (acc & 0xffff) + (acc >> 16);
    acc = (acc & 0xffff) + (acc >> 16);
    !(acc as u16)
}

/// Copies exactly `dst.len()` bytes from `off` of the packet, or fails.
/// (aya's `load_bytes` clamps the length to what is left of the packet,
/// which the verifier refuses as a possibly zero-sized read.)
#[inline(always)]
fn load_exact(ctx: &TcContext, off: usize, dst: &mut [u8]) -> Result<(), i64> {
    // SAFETY: `dst` is a live buffer of `dst.len()` bytes on this program's
    // stack; the helper writes at most that many and checks the packet side.
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            off as u32,
            dst.as_mut_ptr() as *mut _,
            dst.len() as u32,
        )
    };
    if ret < 0 { Err(ret) } else { Ok(()) }
}

/// Resizes the packet to `len` bytes (Ethernet header included).
#[inline(always)]
fn set_len(ctx: &mut TcContext, len: u32) -> Result<(), i64> {
    // SAFETY: the skb pointer is this program's context.
    let ret = unsafe { bpf_skb_change_tail(ctx.skb.skb, len, 0) };
    if ret < 0 { Err(ret) } else { Ok(()) }
}

/// Replaces an IPv4 packet with an ICMP port-unreachable quoting its IP
/// header and first 8 bytes, from the address it was sent to.
///
/// The checksums are written whole. An skb whose L4 checksum the sender
/// left to offload (CHECKSUM_PARTIAL) only comes from a local virtual
/// device, and goes back out of that same device, whose peer does not
/// check it.
#[inline(never)]
fn icmp4_unreachable(ctx: &mut TcContext, pkt: &Packet) -> Result<(), i64> {
    if pkt.l4_off != ETH_HLEN + 20 {
        // IP options: too rare to quote; the caller drops the packet.
        return Err(-1);
    }
    let mut buf = [0u8; 56];
    load_exact(ctx, ETH_HLEN, &mut buf[28..56])?;
    buf[0] = 0x45;
    buf[1] = 0xc0;
    buf[2] = 0;
    buf[3] = 56;
    buf[8] = 64;
    buf[9] = 1; // ICMP
    let mut i = 0;
    while i < 4 {
        buf[12 + i] = pkt.daddr[i];
        buf[16 + i] = pkt.saddr[i];
        i += 1;
    }
    let ip_csum = fold(sum16(&buf[0..20], 0));
    buf[10] = (ip_csum >> 8) as u8;
    buf[11] = ip_csum as u8;
    buf[20] = 3; // destination unreachable
    buf[21] = 3; // port unreachable
    let icmp_csum = fold(sum16(&buf[20..56], 0));
    buf[22] = (icmp_csum >> 8) as u8;
    buf[23] = icmp_csum as u8;
    swap_macs(ctx)?;
    set_len(ctx, (ETH_HLEN + 56) as u32)?;
    ctx.store(ETH_HLEN, &buf, 0)
}

/// The IPv6 counterpart: ICMPv6 destination unreachable, port unreachable.
#[inline(never)]
fn icmp6_unreachable(ctx: &mut TcContext, pkt: &Packet) -> Result<(), i64> {
    if pkt.l4_off != ETH_HLEN + IP6_HLEN {
        return Err(-1);
    }
    let mut buf = [0u8; 96];
    load_exact(ctx, ETH_HLEN, &mut buf[48..96])?;
    buf[0] = 0x60;
    buf[4] = 0;
    buf[5] = 56; // payload length
    buf[6] = 58; // ICMPv6
    buf[7] = 64;
    let mut i = 0;
    while i < 16 {
        buf[8 + i] = pkt.daddr[i];
        buf[24 + i] = pkt.saddr[i];
        i += 1;
    }
    buf[40] = 1; // destination unreachable
    buf[41] = 4; // port unreachable
    // Pseudo-header: addresses, upper-layer length, next header.
    let mut acc = sum16(&buf[8..40], 0);
    acc += 56 + 58;
    let csum = fold(sum16(&buf[40..96], acc));
    buf[42] = (csum >> 8) as u8;
    buf[43] = csum as u8;
    swap_macs(ctx)?;
    set_len(ctx, (ETH_HLEN + 96) as u32)?;
    ctx.store(ETH_HLEN, &buf, 0)
}

#[classifier]
pub fn pa_egress(mut ctx: TcContext) -> i32 {
    let pkt = match parse(&ctx) {
        Ok(pkt) => pkt,
        Err(reason) => {
            if reason == stat::PASS_OTHER_PROTO && crate::icmp::is_icmp(&ctx) {
                let (_, failed) = tail_call(&ctx, TAIL_ICMP_EGRESS);
                count(failed);
            }
            return TC_ACT_OK as i32;
        }
    };
    let (verdict, reason) = egress(&mut ctx, &pkt);
    if reason != u32::MAX {
        count(reason);
    }
    verdict
}

/// Source translation on the way out: the node address of a masqueraded
/// flow's forward packet, or the frontend of a reply.
#[inline(always)]
fn egress(ctx: &mut TcContext, pkt: &Packet) -> Verdict {
    let mut key = ct_key(pkt, CT_SNAT_OUT);
    let mut reason = stat::SNAT_OUT;
    let ct = match PA_CONNTRACK.get_ptr_mut(&key) {
        Some(ct) => ct,
        None => {
            key.dir = CT_REPLY;
            reason = stat::REVNAT;
            match PA_CONNTRACK.get_ptr_mut(&key) {
                Some(ct) => ct,
                None => return (TC_ACT_OK as i32, u32::MAX),
            }
        }
    };
    // SAFETY: as in ingress: a live map value of plain data.
    let ct = unsafe { &mut *ct };
    if ct_touch(ct, pkt, now()).is_none() {
        // Over, or its tuple taken by a connection that did not come
        // through a frontend (a client reaching the backend directly from
        // a port a closed service flow used): removed, so that none of
        // that connection's packets are translated either. A new flow
        // through a frontend writes fresh entries before its first reply.
        let _ = PA_CONNTRACK.remove(&key);
        return (TC_ACT_OK as i32, stat::PASS_NO_REPLY);
    }
    let (addr, port) = (ct.nat_addr, ct.nat_port);
    match rewrite(ctx, pkt, false, &pkt.saddr, &addr, pkt.sport, port) {
        Ok(()) => (TC_ACT_OK as i32, reason),
        Err(_) => (TC_ACT_SHOT as i32, stat::ERR_REWRITE),
    }
}

/// Does nothing: loaded only by the benchmark, to measure the harness floor.
#[classifier]
pub fn pa_floor(_ctx: TcContext) -> i32 {
    TC_ACT_OK as i32
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
