//! Address translation: the rewrite of a packet's source or destination
//! with its checksums, and masquerade: whether a new flow is masqueraded,
//! and the node port it gets (Cilium's `nat.h`).
use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use proxy_common::{
    Addr, BackendValue, CFG_TRANSLATED_MARK, CT_EGRESS, CT_FLAG_SEEN_FIN, CT_FLAG_SEEN_RST,
    CT_FLAG_SNAT_OUT, CT_SNAT_IN, CtKey, CtValue, FAMILY_V4, FAMILY_V6, NodeConfig, PROTO_TCP,
    SNAT_LOW_PORT_MAX, SNAT_LOW_PORT_MIN, SNAT_PORT_ATTEMPTS, SNAT_PORT_MAX, SNAT_PORT_MIN,
    SNAT_TCP_HOLD_NS, SVC_MASQUERADE, SVC_MASQUERADE_OUTSIDE, ServiceValue, stat,
};

use crate::conntrack::{FlowScratch, lifetime};
use crate::csum::{csum_diff16, l4_csum, sctp_port_changed};
use crate::datapath::Verdict;
use crate::lb::Selection;
use crate::maps::{PA_CONNTRACK, config, count, snat_addr};
use crate::packet::{ETH_HLEN, v4_raw};
use crate::parse::{
    IP_CSUM, IP_DADDR, IP_SADDR, IP6_DADDR, IP6_SADDR, L4_DPORT, L4_SPORT, Packet, ifindex,
};

/// The end of a packet a rewrite changes.
/// Which end of a packet [`rewrite`] changes.
#[derive(Clone, Copy)]
pub(crate) enum Side {
    /// The node address of a masqueraded flow (SNAT), or the frontend of a
    /// reply.
    Source,
    /// A flow's backend (DNAT), or the client of a masqueraded flow's
    /// reply.
    Destination,
}

/// Rewrites the address and port of `side` of the packet and fixes the
/// checksums incrementally: the IPv4 header checksum, the TCP/UDP checksum
/// (pseudo-header included), or the SCTP CRC32c when a port changes.
#[inline(always)]
pub(crate) fn rewrite(
    ctx: &mut TcContext,
    pkt: &Packet,
    side: Side,
    new_addr: &Addr,
    new_port: u16,
) -> Result<(), i64> {
    let (old_addr, old_port, port_at) = match side {
        Side::Destination => (&pkt.daddr, pkt.dport, L4_DPORT),
        Side::Source => (&pkt.saddr, pkt.sport, L4_SPORT),
    };
    let addr_off = match (pkt.family == FAMILY_V4, side) {
        (true, Side::Destination) => ETH_HLEN + IP_DADDR,
        (true, Side::Source) => ETH_HLEN + IP_SADDR,
        (false, Side::Destination) => ETH_HLEN + IP6_DADDR,
        (false, Side::Source) => ETH_HLEN + IP6_SADDR,
    };
    let port_off = pkt.l4_off + port_at;
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

/// The mark bit that says a packet was translated at an ingress hook of
/// this node, when the agent has set one.
#[inline(always)]
fn translated_mark(cfg: Option<&NodeConfig>) -> Option<u32> {
    let cfg = cfg?;
    (cfg.flags & CFG_TRANSLATED_MARK != 0).then(|| 1u32 << (cfg.translated_mark_bit & 31))
}

/// Whether an earlier ingress hook of the node translated this packet: a
/// bridge's own hook sees again what its port's translated, and the new
/// destination may itself be a frontend (another Service's external IP on
/// a backend's address), which must not be translated a second time.
#[inline(always)]
pub(crate) fn translated_before(ctx: &TcContext, cfg: Option<&NodeConfig>) -> bool {
    // SAFETY: the context's skb pointer is valid for the program's run.
    translated_mark(cfg).is_some_and(|mark| unsafe { (*ctx.skb.skb).mark } & mark != 0)
}

/// Marks a packet translated at ingress (see [`translated_before`]). The
/// mark goes with the packet in the node's namespace only: crossing into
/// a pod's clears it.
#[inline(always)]
pub(crate) fn mark_translated(ctx: &TcContext, cfg: Option<&NodeConfig>) {
    if let Some(mark) = translated_mark(cfg) {
        // SAFETY: as above.
        let old = unsafe { (*ctx.skb.skb).mark };
        ctx.set_mark(old | mark);
    }
}

/// The last step of a new flow: sends its first packet to the backend.
/// `reason` is the flow's, counted when the rewrite works.
#[inline(always)]
pub(crate) fn translate(
    ctx: &mut TcContext,
    pkt: &Packet,
    cfg: Option<&NodeConfig>,
    sel: &Selection,
    reason: u32,
) -> Verdict {
    match rewrite(
        ctx,
        pkt,
        Side::Destination,
        &sel.backend.addr,
        sel.backend.port,
    ) {
        Ok(()) => {
            mark_translated(ctx, cfg);
            (TC_ACT_OK as i32, reason)
        }
        Err(_) => (TC_ACT_SHOT as i32, stat::ERR_REWRITE),
    }
}

/// Masquerades a new flow if it needs it (see [`needs_masquerade`]) and the
/// node has an address to masquerade it with: claims it a node port and
/// writes its masquerade entries, with the flow's `flags`. Returns whether
/// it did, or the verdict on a flow that got no port.
#[inline(always)]
pub(crate) fn masquerade(
    ctx: &TcContext,
    pkt: &Packet,
    cfg: Option<&NodeConfig>,
    sel: &Selection,
    flags: u16,
    scratch: &mut FlowScratch,
) -> Result<bool, Verdict> {
    if !needs_masquerade(&sel.svc, pkt, &sel.backend, sel.client_in_cluster) {
        return Ok(false);
    }
    let Some(node) = snat_addr(cfg, pkt.family) else {
        count(stat::PASS_NO_SNAT_ADDRESS);
        return Ok(false);
    };
    scratch.value = CtValue {
        nat_addr: pkt.saddr,
        nat_port: pkt.sport,
        flags,
        backend_id: 0,
        // Which frontend the client reached: with its address, whose TCP
        // timestamp clock the backend saw on this port (see `claim_snat_port`).
        svc_id: sel.svc.svc_id,
        in_ifindex: ifindex(ctx),
        last_seen_ns: sel.now,
    };
    if !allocate_snat(scratch, pkt, &sel.backend, &node) {
        return Err((TC_ACT_SHOT as i32, stat::DROP_SNAT_EXHAUSTED));
    }
    Ok(true)
}

/// Whether a new flow is masqueraded: always a client that is its own
/// backend (hairpin), whose reply would otherwise never leave the pod;
/// otherwise as the agent's plan decided for the view (kube-proxy's
/// decisions, in the agent's `model/plan.rs`): every client, clients
/// outside the cluster CIDR, or none.
#[inline(always)]
fn needs_masquerade(
    svc: &ServiceValue,
    pkt: &Packet,
    backend: &BackendValue,
    client_in_cluster: Option<bool>,
) -> bool {
    if pkt.saddr == backend.addr || svc.flags & SVC_MASQUERADE != 0 {
        return true;
    }
    svc.flags & SVC_MASQUERADE_OUTSIDE != 0 && client_in_cluster == Some(false)
}

/// Picks a node port for a masqueraded flow and writes both of its
/// entries. The port is claimed by inserting the reply-side entry with
/// `BPF_NOEXIST`: two flows can never share (backend, node address, port),
/// even when CPUs race. Returns false only when every port tried is held
/// by a flow that is not over.
///
/// The search starts where the client's tuple hashes to, so a client that
/// reconnects from the same port finds its previous port first. A port
/// whose closed flow (another tuple's) the backend may still hold in
/// TIME_WAIT is taken only when no port tried is free: the new connection
/// may then wait for a SYN retransmit, which is better than a drop.
///
/// `scratch.value` holds the value of the reply-side entry on entry: the
/// client's address and port, with the flow's flags and clock.
#[inline(always)]
fn allocate_snat(
    scratch: &mut FlowScratch,
    pkt: &Packet,
    backend: &BackendValue,
    node: &Addr,
) -> bool {
    let (base, span, start, step) = snat_port_window(pkt, scratch.value.svc_id);
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
    scratch.fallback_port = 0;
    let mut claimed = 0u16;
    let mut i = 0;
    while i < SNAT_PORT_ATTEMPTS {
        let offset = start
            .wrapping_add(i.wrapping_mul(step))
            .checked_rem(span)
            .unwrap_or(0);
        let port = ((base + offset) as u16).to_be();
        scratch.key.dport = port;
        if claim_snat_port(scratch, pkt.proto) {
            claimed = port;
            break;
        }
        i += 1;
    }
    if claimed == 0 {
        claimed = scratch.fallback_port;
        if claimed == 0 {
            return false;
        }
        scratch.key.dport = claimed;
        if !take_over(scratch) {
            return false;
        }
        count(stat::SNAT_PORT_REUSED_EARLY);
    }
    write_snat_out(scratch, pkt, backend, node, claimed)
}

/// Writes the forward-side masquerade entry of a flow whose reply-side
/// entry (`scratch.key`) holds `port`; undoes that one if it cannot.
#[inline(always)]
fn write_snat_out(
    scratch: &mut FlowScratch,
    pkt: &Packet,
    backend: &BackendValue,
    node: &Addr,
    port: u16,
) -> bool {
    // Field by field: a struct literal would be built on the stack first,
    // and this runs three calls deep.
    scratch.key2 = scratch.key;
    scratch.key2.src = pkt.saddr;
    scratch.key2.dst = backend.addr;
    scratch.key2.sport = pkt.sport;
    scratch.key2.dport = backend.port;
    scratch.key2.dir = CT_EGRESS;
    scratch.value2 = scratch.value;
    scratch.value2.flags |= CT_FLAG_SNAT_OUT;
    scratch.value2.nat_addr = *node;
    scratch.value2.nat_port = port;
    if PA_CONNTRACK
        .insert(&scratch.key2, &scratch.value2, 0)
        .is_err()
    {
        let _ = PA_CONNTRACK.remove(&scratch.key);
        return false;
    }
    true
}

/// The port range a new masqueraded flow searches, and how: `(first port,
/// number of ports, offset of the first attempt, step between attempts)`.
/// All follow from the client's address and port and the frontend, not
/// from chance: a client tuple tries the same ports in the same order each
/// time, so it finds its own previous port while other tuples hold the
/// ones before it. The step (odd) scatters the attempts, so that tuples
/// whose first ports are neighbours do not search the same run of ports.
#[inline(always)]
fn snat_port_window(pkt: &Packet, svc_id: u32) -> (u32, u32, u32, u32) {
    let (min, max, low_min, low_max) = snat_ranges(config());
    // Offsets below `low` fall in the low range, the rest in the high one.
    let low = if low_min != 0 {
        low_max - low_min + 1
    } else {
        0
    };
    // One range is chosen, in proportion to its size, before the loop: a
    // choice per attempt would double the verifier's paths at each one.
    let high = max - min + 1;
    let hash = tuple_hash(pkt, svc_id);
    let pick = hash.checked_rem(high + low).unwrap_or(0);
    let step = (hash >> 20) | 1;
    if pick < low {
        (low_min, low, pick, step)
    } else {
        (min, high, pick - low, step)
    }
}

/// The masquerade port ranges, in host order: `(min, max, low min, low
/// max)`, the low range `(0, 0)` when there is none.
#[inline(always)]
fn snat_ranges(cfg: Option<&NodeConfig>) -> (u32, u32, u32, u32) {
    let (mut min, mut max, mut low_min, mut low_max) = match cfg {
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
    if low_min == 0 || low_max < low_min {
        (low_min, low_max) = (0, 0);
    }
    (min, max, low_min, low_max)
}

/// Whether `port` (network order) may be a masquerade port: only a packet
/// to one can be the reply of a masqueraded flow, so others skip that
/// lookup.
#[inline(always)]
pub(crate) fn may_be_snat_port(cfg: Option<&NodeConfig>, port: u16) -> bool {
    let port = u16::from_be(port) as u32;
    let (min, max, low_min, low_max) = snat_ranges(cfg);
    (min <= port && port <= max) || (low_min != 0 && low_min <= port && port <= low_max)
}

/// A hash of the client's address and port and the frontend (FNV-1a over
/// the words; spread is all it needs).
#[inline(always)]
fn tuple_hash(pkt: &Packet, svc_id: u32) -> u32 {
    let a = &pkt.saddr;
    let word = |i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
    let mix = |h: u32, w: u32| (h ^ w).wrapping_mul(0x0100_0193);
    let mut h = mix(0x811c_9dc5, word(0));
    h = mix(h, word(4));
    h = mix(h, word(8));
    h = mix(h, word(12));
    h = mix(h, pkt.sport as u32);
    h = mix(h, svc_id);
    h ^ (h >> 16)
}

/// Claims the masquerade tuple `scratch.key` for the flow in
/// `scratch.value`: inserts it if free, or takes it over from a flow that
/// is over when the backend will take the new SYN on the tuple:
/// - the same client tuple through the same frontend (a client that
///   reconnects from its port): its sequence numbers and TCP timestamps
///   have only grown since, so the backend's TIME_WAIT accepts the SYN;
/// - any other flow once expired, and for TCP past [`SNAT_TCP_HOLD_NS`]
///   (the backend's TIME_WAIT is over). Sooner, the SYN of another client,
///   whose timestamps run on a clock of their own (Linux offsets them per
///   connection), would be refused as a PAWS violation.
///
/// A port held by a flow that is over but may still be in the backend's
/// TIME_WAIT against another tuple is remembered as the fallback
/// (`scratch.fallback_port`, the first such one) and not taken.
///
/// Only a `BPF_NOEXIST` insert claims, so two CPUs never both get one
/// tuple; the delete before it only makes room.
#[inline(never)]
fn claim_snat_port(scratch: &mut FlowScratch, proto: u8) -> bool {
    if insert_new(scratch) {
        return true;
    }
    let Some(old) = PA_CONNTRACK.get_ptr(&scratch.key) else {
        // Gone in between: free now.
        return insert_new(scratch);
    };
    // SAFETY: a live map value of plain data, read field by field (a copy
    // would not fit the stack); a concurrent writer at worst makes this
    // flow look at a half-updated entry and try the next port.
    let old = unsafe { &*old };
    let new = &scratch.value;
    let idle = new.last_seen_ns.wrapping_sub(old.last_seen_ns);
    let expired = idle > lifetime(proto, old.flags);
    let same_tuple =
        old.nat_port == new.nat_port && old.svc_id == new.svc_id && old.nat_addr == new.nat_addr;
    let closed = proto == PROTO_TCP && old.flags & (CT_FLAG_SEEN_FIN | CT_FLAG_SEEN_RST) != 0;
    let safe = same_tuple || (expired && (proto != PROTO_TCP || idle > SNAT_TCP_HOLD_NS));
    if safe {
        return take_over(scratch);
    }
    if (closed || expired) && scratch.fallback_port == 0 {
        scratch.fallback_port = scratch.key.dport;
    }
    false
}

/// Claims `scratch.key` for `scratch.value` if no entry holds it.
#[inline(always)]
fn insert_new(scratch: &FlowScratch) -> bool {
    PA_CONNTRACK
        .insert(&scratch.key, &scratch.value, BPF_NOEXIST as u64)
        .is_ok()
}

/// Claims `scratch.key` for `scratch.value` from the flow that holds it:
/// the delete only makes room, the insert claims.
#[inline(always)]
fn take_over(scratch: &FlowScratch) -> bool {
    let _ = PA_CONNTRACK.remove(&scratch.key);
    insert_new(scratch)
}
