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
//!
//! This module holds the programs and their stages; the pieces they are
//! made of live by concern: `parse` (headers), `csum` (checksums),
//! `conntrack`, `lb` (frontend and backend selection), `nat` (rewrite and
//! masquerade) and `reject`.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, map},
    maps::ProgramArray,
    programs::TcContext,
};
use proxy_common::{
    CT_EGRESS, CT_FLAG_AFFINITY, CT_FLAG_SNAT_OUT, CT_FORWARD, CT_SNAT_IN, NodeConfig,
    TAIL_ICMP_EGRESS, TAIL_ICMP_INGRESS, TAIL_NEW_FLOW, TAIL_SLOTS, stat,
};

use crate::conntrack::{self, ct_key, ct_touch, forget_flow_on_tuple};
use crate::lb::{self, refresh_affinity};
use crate::maps::{
    PA_CONNTRACK, config, count, in_service_cidr, may_be_backend_port, may_be_frontend, now,
    snat_addr,
};
use crate::nat::{self, Side, mark_translated, may_be_snat_port, rewrite, translated_before};
use crate::parse::{Packet, parse};
use crate::reject::reject;

/// The later stages of ingress, tail-called (see `proxy_common::TAIL_*`).
#[map]
static PA_PROGS: ProgramArray = ProgramArray::with_max_entries(TAIL_SLOTS, 0);

#[classifier]
pub fn pa_ingress(mut ctx: TcContext) -> i32 {
    stage(
        &mut ctx,
        TC_ACT_OK as i32,
        Some(TAIL_ICMP_INGRESS),
        ingress::<{ step::ALL }>,
    )
}

/// How far a variant of ingress goes. The variants (`pa_step_*`, loaded
/// only by the per-packet benchmark) run the real program's code up to a
/// step and pass the packet unchanged there, so that the benchmark can
/// tell what each step costs; in the real program (`ALL`) every test of
/// the step is a constant and compiles away.
mod step {
    /// Headers parsed.
    pub(crate) const PARSE: u32 = 1;
    /// The masquerade-reply check and the frontend address check.
    pub(crate) const CLASSIFY: u32 = 2;
    /// The flow's entry looked up and refreshed.
    pub(crate) const CONNTRACK: u32 = 3;
    /// A new flow's frontend and backend chosen.
    pub(crate) const SELECT: u32 = 4;
    /// A new flow's entries written (and its masquerade port claimed).
    pub(crate) const CREATE: u32 = 5;
    /// The real program.
    pub(crate) const ALL: u32 = u32::MAX;
}

/// What a variant answers where it stops: the packet passed, nothing
/// counted (no counter has this index).
const STOPPED: Verdict = (TC_ACT_OK as i32, u32::MAX);

#[classifier]
pub fn pa_step_parse(mut ctx: TcContext) -> i32 {
    stage(&mut ctx, TC_ACT_OK as i32, None, ingress::<{ step::PARSE }>)
}

#[classifier]
pub fn pa_step_classify(mut ctx: TcContext) -> i32 {
    stage(
        &mut ctx,
        TC_ACT_OK as i32,
        None,
        ingress::<{ step::CLASSIFY }>,
    )
}

#[classifier]
pub fn pa_step_conntrack(mut ctx: TcContext) -> i32 {
    stage(
        &mut ctx,
        TC_ACT_OK as i32,
        None,
        ingress::<{ step::CONNTRACK }>,
    )
}

#[classifier]
pub fn pa_step_select(mut ctx: TcContext) -> i32 {
    stage(
        &mut ctx,
        TC_ACT_OK as i32,
        None,
        ingress::<{ step::SELECT }>,
    )
}

#[classifier]
pub fn pa_step_create(mut ctx: TcContext) -> i32 {
    stage(
        &mut ctx,
        TC_ACT_OK as i32,
        None,
        ingress::<{ step::CREATE }>,
    )
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

/// What a stage decides: the TC action, and the counter (`stat`) of why.
pub(crate) type Verdict = (i32, u32);

#[inline(always)]
fn ingress<const UNTIL: u32>(ctx: &mut TcContext, pkt: &Packet) -> Verdict {
    if UNTIL == step::PARSE {
        return STOPPED;
    }
    let cfg = config();
    // One translation per packet, whatever hooks it crosses.
    if translated_before(ctx, cfg) {
        return (TC_ACT_OK as i32, stat::PASS_TRANSLATED);
    }
    // A reply to a masqueraded flow: give it back its client as destination.
    if let Some(snat) = snat_addr(cfg, pkt.family)
        && snat == pkt.daddr
        && may_be_snat_port(cfg, pkt.dport)
        && let Some(ct) = PA_CONNTRACK.get_ptr_mut(&ct_key(pkt, CT_SNAT_IN))
    {
        // SAFETY: the pointer is to a live map value; concurrent writers
        // only ever store whole plain-data fields, so a torn read at worst
        // refreshes a clock twice.
        let ct = unsafe { &mut *ct };
        if ct_touch(ct, pkt, now()).is_some() {
            if UNTIL != step::ALL {
                return STOPPED;
            }
            let (addr, port) = (ct.nat_addr, ct.nat_port);
            return match rewrite(ctx, pkt, Side::Destination, &addr, port) {
                Ok(()) => {
                    mark_translated(ctx, cfg);
                    (TC_ACT_OK as i32, stat::SNAT_IN)
                }
                Err(_) => (TC_ACT_SHOT as i32, stat::ERR_REWRITE),
            };
        }
    }

    // Traffic to anything but a frontend has no flow and no service here;
    // to an address of a ServiceCIDR that no Service holds it goes nowhere,
    // and is dropped, as kube-proxy drops it.
    if !may_be_frontend(pkt.family, &pkt.daddr) {
        if in_service_cidr(pkt.family, &pkt.daddr) {
            return (TC_ACT_SHOT as i32, stat::DROP_UNALLOCATED);
        }
        forget_flow_on_tuple(ctx, pkt);
        return (TC_ACT_OK as i32, stat::PASS_NO_SERVICE);
    }
    if UNTIL == step::CLASSIFY {
        return STOPPED;
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
            if UNTIL != step::ALL {
                return STOPPED;
            }
            let (addr, port) = (ct.nat_addr, ct.nat_port);
            return match rewrite(ctx, pkt, Side::Destination, &addr, port) {
                Ok(()) => {
                    mark_translated(ctx, cfg);
                    (TC_ACT_OK as i32, stat::DNAT_ESTABLISHED)
                }
                Err(_) => (TC_ACT_SHOT as i32, stat::ERR_REWRITE),
            };
        }
        // Over: gone even if no new flow replaces it (its frontend went),
        // so that later packets on the tuple are not translated by it.
        let _ = PA_CONNTRACK.remove(&fwd_key);
    }
    if UNTIL == step::CONNTRACK {
        return STOPPED;
    }

    if UNTIL != step::ALL {
        // A variant runs the later steps itself, without the tail call.
        return new_flow::<UNTIL>(ctx, pkt, cfg);
    }
    tail_call(ctx, TAIL_NEW_FLOW)
}

/// Continues with the stage in `slot`; returns only if that fails.
#[inline(always)]
pub(crate) fn tail_call(ctx: &TcContext, slot: u32) -> Verdict {
    // SAFETY: control passes to a program of the same type on the same
    // context; nothing of this program's state is needed afterwards.
    unsafe { PA_PROGS.tail_call(ctx, slot) };
    (TC_ACT_OK as i32, stat::ERR_TAIL_CALL)
}

#[classifier]
pub fn pa_new_flow(mut ctx: TcContext) -> i32 {
    stage(&mut ctx, TC_ACT_OK as i32, None, |ctx, pkt| {
        new_flow::<{ step::ALL }>(ctx, pkt, config())
    })
}

/// Packets that reach it were parsed by the earlier stages; one that no
/// longer parses is dropped, as a rejected packet would be.
#[classifier]
pub fn pa_reject(mut ctx: TcContext) -> i32 {
    stage(&mut ctx, TC_ACT_SHOT as i32, None, reject)
}

/// A packet that starts a flow: [`lb::select`] its backend,
/// [`conntrack::create`] its entries, [`nat::translate`] it.
#[inline(always)]
fn new_flow<const UNTIL: u32>(
    ctx: &mut TcContext,
    pkt: &Packet,
    cfg: Option<&NodeConfig>,
) -> Verdict {
    let sel = match lb::select(ctx, pkt, cfg) {
        Ok(sel) => sel,
        Err(verdict) => return verdict,
    };
    if UNTIL == step::SELECT {
        return STOPPED;
    }
    let reason = match conntrack::create(ctx, pkt, cfg, &sel) {
        Ok(reason) => reason,
        Err(verdict) => return verdict,
    };
    if UNTIL == step::CREATE {
        return STOPPED;
    }
    nat::translate(ctx, pkt, cfg, &sel, reason)
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
/// flow's forward packet, or the frontend of a reply; one lookup finds
/// either (see `CT_EGRESS`).
#[inline(always)]
fn egress(ctx: &mut TcContext, pkt: &Packet) -> Verdict {
    // Every egress entry has a backend's port in its tuple: as the source
    // of a reply, or the destination of a masqueraded flow's forward
    // packet. Traffic between other ports (most of a node's) leaves after
    // the bitmap's word, without a connection-table lookup.
    if !may_be_backend_port(pkt.sport) && !may_be_backend_port(pkt.dport) {
        return (TC_ACT_OK as i32, u32::MAX);
    }
    let key = ct_key(pkt, CT_EGRESS);
    let Some(ct) = PA_CONNTRACK.get_ptr_mut(&key) else {
        return (TC_ACT_OK as i32, u32::MAX);
    };
    // SAFETY: as in ingress: a live map value of plain data.
    let ct = unsafe { &mut *ct };
    let reason = if ct.flags & CT_FLAG_SNAT_OUT != 0 {
        stat::SNAT_OUT
    } else {
        stat::REVNAT
    };
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
    match rewrite(ctx, pkt, Side::Source, &addr, port) {
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
