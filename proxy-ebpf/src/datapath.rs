//! TC programs: service DNAT with connection tracking on ingress, reverse
//! NAT of replies on egress.
//!
//! Reverse NAT runs at egress (after the stack has routed the reply) so that
//! the kernel's own conntrack, where it is active, sees a consistent flow
//! (client -> backend, backend -> client) and never marks replies invalid.
//!
//! Every header read goes through `bpf_skb_load_bytes` (`TcContext::load`),
//! which bounds-checks against the packet: a truncated or malformed packet
//! makes a load fail and the packet is passed untouched.
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_NO_PREALLOC, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    macros::{classifier, map},
    maps::{HashMap, LruHashMap, PerCpuArray},
    programs::TcContext,
};
use proxy_common::{
    Addr, BackendId, BackendValue, CT_FLAG_SEEN_FIN, CT_FLAG_SEEN_RST, CT_FORWARD,
    CT_LIFETIME_NON_TCP_NS, CT_LIFETIME_TCP_CLOSING_NS, CT_LIFETIME_TCP_NS, CT_REFRESH_NS,
    CT_REPLY, CtKey, CtValue, FAMILY_V4, PROTO_TCP, PROTO_UDP, ServiceKey, ServiceValue, stat,
};

#[map]
static PA_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(proxy_common::SERVICES_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
static PA_BACKENDS: HashMap<BackendId, BackendValue> =
    HashMap::with_max_entries(proxy_common::BACKENDS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
static PA_CONNTRACK: LruHashMap<CtKey, CtValue> =
    LruHashMap::with_max_entries(proxy_common::CONNTRACK_MAX_ENTRIES, 0);

#[map]
static PA_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;

// IPv4 header offsets.
const IP_CSUM: usize = 10;
const IP_SADDR: usize = 12;
const IP_DADDR: usize = 16;

// L4 offsets.
const L4_SPORT: usize = 0;
const L4_DPORT: usize = 2;
const TCP_FLAGS: usize = 13;
const TCP_CSUM: usize = 16;
const UDP_CSUM: usize = 6;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The fields of a parsed IPv4 TCP/UDP packet that the datapath needs.
/// Addresses and ports are raw (network byte order as in memory).
struct Packet {
    l3_off: usize,
    l4_off: usize,
    proto: u8,
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    tcp_flags: u8,
}

#[inline(always)]
fn count(index: u32) {
    if let Some(counter) = PA_STATS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a per-CPU array slot of this CPU and
        // is valid for the duration of the program; no other CPU writes it.
        unsafe { *counter += 1 };
    }
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

/// Parses Ethernet + IPv4 + TCP/UDP. `Err(stat)` says why a packet is not
/// one the datapath translates; the caller passes it untouched.
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
    parse_linear(ctx)
}

#[inline(always)]
fn parse_linear(ctx: &TcContext) -> Result<Packet, u32> {
    let ethertype = u16::from_be(read::<u16>(ctx, 12).ok_or(stat::PASS_TRUNCATED)?);
    if ethertype == ETH_P_IPV6 {
        return Err(stat::PASS_IPV6);
    }
    if ethertype != ETH_P_IP {
        return Err(stat::PASS_NOT_IP);
    }
    let l3_off = ETH_HLEN;
    // version/IHL, TOS, total length, id, flags/fragment offset, TTL, protocol.
    let version_ihl = read::<u8>(ctx, l3_off).ok_or(stat::PASS_TRUNCATED)?;
    if version_ihl >> 4 != 4 {
        return Err(stat::PASS_NOT_IP);
    }
    let ihl = ((version_ihl & 0x0f) as usize) * 4;
    if ihl < 20 {
        return Err(stat::PASS_TRUNCATED);
    }
    let frag = u16::from_be(read::<u16>(ctx, l3_off + 6).ok_or(stat::PASS_TRUNCATED)?);
    // More-fragments set or a non-zero offset: only the first fragment
    // carries ports, so translating it alone would break the datagram.
    if frag & 0x3fff != 0 {
        return Err(stat::PASS_FRAGMENT);
    }
    let proto = read::<u8>(ctx, l3_off + 9).ok_or(stat::PASS_TRUNCATED)?;
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(stat::PASS_OTHER_PROTO);
    }
    let addrs = read::<[u32; 2]>(ctx, l3_off + IP_SADDR).ok_or(stat::PASS_TRUNCATED)?;
    let l4_off = l3_off + ihl;
    // The whole fixed L4 header must be present (TCP 20 bytes, UDP 8).
    let tcp_flags = if proto == PROTO_TCP {
        let hdr = read::<[u8; 20]>(ctx, l4_off).ok_or(stat::PASS_TRUNCATED)?;
        hdr[TCP_FLAGS]
    } else {
        read::<[u8; 8]>(ctx, l4_off).ok_or(stat::PASS_TRUNCATED)?;
        0
    };
    let ports = read::<[u16; 2]>(ctx, l4_off).ok_or(stat::PASS_TRUNCATED)?;
    Ok(Packet {
        l3_off,
        l4_off,
        proto,
        saddr: addrs[0],
        daddr: addrs[1],
        sport: ports[0],
        dport: ports[1],
        tcp_flags,
    })
}

/// Monotonic clock, read only on paths that touch connection tracking.
#[inline(always)]
fn now() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn v4_addr(raw: u32) -> Addr {
    let mut addr = [0u8; 16];
    let b = raw.to_ne_bytes();
    addr[0] = b[0];
    addr[1] = b[1];
    addr[2] = b[2];
    addr[3] = b[3];
    addr
}

#[inline(always)]
fn v4_raw(addr: &Addr) -> u32 {
    u32::from_ne_bytes([addr[0], addr[1], addr[2], addr[3]])
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
fn tcp_ct_flags(tcp_flags: u8) -> u16 {
    let mut flags = 0;
    if tcp_flags & TCP_FIN != 0 {
        flags |= CT_FLAG_SEEN_FIN;
    }
    if tcp_flags & TCP_RST != 0 {
        flags |= CT_FLAG_SEEN_RST;
    }
    flags
}

/// Refreshes an entry's clock and TCP state. Returns false when the entry
/// has expired (or a new connection reuses a closed one's tuple) and must
/// not be used.
#[inline(always)]
fn ct_touch(ct: &mut CtValue, pkt: &Packet, now: u64) -> bool {
    if now.wrapping_sub(ct.last_seen_ns) > lifetime(pkt.proto, ct.flags) {
        return false;
    }
    let syn_only = pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if pkt.proto == PROTO_TCP && syn_only && ct.flags & (CT_FLAG_SEEN_FIN | CT_FLAG_SEEN_RST) != 0 {
        return false;
    }
    let new_flags = ct.flags | tcp_ct_flags(pkt.tcp_flags);
    if new_flags != ct.flags || now.wrapping_sub(ct.last_seen_ns) > CT_REFRESH_NS {
        ct.flags = new_flags;
        ct.last_seen_ns = now;
    }
    true
}

/// Rewrites one address and port of the packet (destination when `dst`,
/// source otherwise) and fixes the IP and L4 checksums incrementally.
#[inline(always)]
fn rewrite(
    ctx: &mut TcContext,
    pkt: &Packet,
    dst: bool,
    old_addr: u32,
    new_addr: u32,
    old_port: u16,
    new_port: u16,
) -> Result<(), i64> {
    let (addr_off, port_off) = if dst {
        (pkt.l3_off + IP_DADDR, pkt.l4_off + L4_DPORT)
    } else {
        (pkt.l3_off + IP_SADDR, pkt.l4_off + L4_SPORT)
    };
    let (csum_off, mangled) = if pkt.proto == PROTO_TCP {
        (pkt.l4_off + TCP_CSUM, 0)
    } else {
        (pkt.l4_off + UDP_CSUM, BPF_F_MARK_MANGLED_0 as u64)
    };
    // A UDP checksum of zero means "none" and must stay zero.
    let l4_csum = pkt.proto == PROTO_TCP || ctx.load::<u16>(csum_off)? != 0;
    if l4_csum {
        if old_addr != new_addr {
            ctx.l4_csum_replace(
                csum_off,
                old_addr as u64,
                new_addr as u64,
                BPF_F_PSEUDO_HDR as u64 | mangled | 4,
            )?;
        }
        if old_port != new_port {
            ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled | 2)?;
        }
    }
    if old_addr != new_addr {
        ctx.l3_csum_replace(pkt.l3_off + IP_CSUM, old_addr as u64, new_addr as u64, 4)?;
        ctx.store(addr_off, &new_addr, 0)?;
    }
    if old_port != new_port {
        ctx.store(port_off, &new_port, 0)?;
    }
    Ok(())
}

#[classifier]
pub fn pa_ingress(mut ctx: TcContext) -> i32 {
    let pkt = match parse(&ctx) {
        Ok(pkt) => pkt,
        Err(reason) => {
            count(reason);
            return TC_ACT_OK as i32;
        }
    };
    let (verdict, reason) = ingress(&mut ctx, &pkt);
    count(reason);
    verdict
}

#[inline(always)]
fn ingress(ctx: &mut TcContext, pkt: &Packet) -> (i32, u32) {
    let fwd_key = CtKey {
        src: v4_addr(pkt.saddr),
        dst: v4_addr(pkt.daddr),
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        family: FAMILY_V4,
        dir: CT_FORWARD,
        _pad0: 0,
    };
    if let Some(ct) = PA_CONNTRACK.get_ptr_mut(&fwd_key) {
        // SAFETY: the pointer is to a live map value; concurrent writers
        // only ever store whole plain-data fields, so a torn read at worst
        // refreshes a clock twice.
        let ct = unsafe { &mut *ct };
        if ct_touch(ct, pkt, now()) {
            let new_addr = v4_raw(&ct.nat_addr);
            let new_port = ct.nat_port;
            return match rewrite(ctx, pkt, true, pkt.daddr, new_addr, pkt.dport, new_port) {
                Ok(()) => (TC_ACT_OK as i32, stat::DNAT_ESTABLISHED),
                Err(_) => (TC_ACT_SHOT as i32, stat::ERR_REWRITE),
            };
        }
    }

    let mut svc_key = ServiceKey {
        addr: fwd_key.dst,
        port: pkt.dport,
        proto: pkt.proto,
        family: FAMILY_V4,
        scope: 0,
        _pad0: 0,
        slot: 0,
    };
    let count = match unsafe {
        // SAFETY: the value is copied out at once; it is plain data.
        PA_SERVICES.get(&svc_key)
    } {
        Some(svc) => svc.count,
        None => return (TC_ACT_OK as i32, stat::PASS_NO_SERVICE),
    };
    if count == 0 {
        return (TC_ACT_SHOT as i32, stat::DROP_NO_BACKEND);
    }
    let rnd = unsafe {
        // SAFETY: bpf_get_prandom_u32 has no preconditions.
        bpf_get_prandom_u32()
    };
    svc_key.slot = (rnd % count as u32) as u16 + 1;
    let backend_id = match unsafe {
        // SAFETY: as above, copied out at once.
        PA_SERVICES.get(&svc_key)
    } {
        Some(slot) => slot.backend_id,
        None => return (TC_ACT_OK as i32, stat::PASS_BACKEND_MISSING),
    };
    let backend = match unsafe {
        // SAFETY: as above, copied out at once.
        PA_BACKENDS.get(&backend_id)
    } {
        Some(backend) => *backend,
        None => return (TC_ACT_OK as i32, stat::PASS_BACKEND_MISSING),
    };

    let flags = if pkt.proto == PROTO_TCP {
        tcp_ct_flags(pkt.tcp_flags)
    } else {
        0
    };
    let now = now();
    let fwd = CtValue {
        nat_addr: backend.addr,
        nat_port: backend.port,
        flags,
        backend_id,
        last_seen_ns: now,
    };
    let reply_key = CtKey {
        src: backend.addr,
        dst: fwd_key.src,
        sport: backend.port,
        dport: pkt.sport,
        proto: pkt.proto,
        family: FAMILY_V4,
        dir: CT_REPLY,
        _pad0: 0,
    };
    let reply = CtValue {
        nat_addr: fwd_key.dst,
        nat_port: pkt.dport,
        flags,
        backend_id,
        last_seen_ns: now,
    };
    // The reply entry first: a reply can never arrive before the forward
    // packet is sent, but it must find its entry when it does.
    if PA_CONNTRACK.insert(&reply_key, &reply, 0).is_err()
        || PA_CONNTRACK.insert(&fwd_key, &fwd, 0).is_err()
    {
        return (TC_ACT_SHOT as i32, stat::ERR_REWRITE);
    }
    match rewrite(
        ctx,
        pkt,
        true,
        pkt.daddr,
        v4_raw(&backend.addr),
        pkt.dport,
        backend.port,
    ) {
        Ok(()) => (TC_ACT_OK as i32, stat::DNAT_NEW),
        Err(_) => (TC_ACT_SHOT as i32, stat::ERR_REWRITE),
    }
}

#[classifier]
pub fn pa_egress(mut ctx: TcContext) -> i32 {
    let pkt = match parse(&ctx) {
        Ok(pkt) => pkt,
        Err(_) => return TC_ACT_OK as i32,
    };
    let reply_key = CtKey {
        src: v4_addr(pkt.saddr),
        dst: v4_addr(pkt.daddr),
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        family: FAMILY_V4,
        dir: CT_REPLY,
        _pad0: 0,
    };
    let Some(ct) = PA_CONNTRACK.get_ptr_mut(&reply_key) else {
        return TC_ACT_OK as i32;
    };
    // SAFETY: as in ingress: a live map value of plain data.
    let ct = unsafe { &mut *ct };
    if !ct_touch(ct, &pkt, now()) {
        count(stat::PASS_NO_REPLY);
        return TC_ACT_OK as i32;
    }
    let vip = v4_raw(&ct.nat_addr);
    let vport = ct.nat_port;
    match rewrite(&mut ctx, &pkt, false, pkt.saddr, vip, pkt.sport, vport) {
        Ok(()) => {
            count(stat::REVNAT);
            TC_ACT_OK as i32
        }
        Err(_) => {
            count(stat::ERR_REWRITE);
            TC_ACT_SHOT as i32
        }
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
