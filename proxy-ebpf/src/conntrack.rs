//! Connection tracking: entry lifetimes, the TCP state a packet adds, the
//! refresh of an entry, and the entries a new flow writes (Cilium's
//! `conntrack.h`).
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::map,
    maps::PerCpuArray,
    programs::TcContext,
};
use proxy_common::{
    CT_EGRESS, CT_FLAG_AFFINITY, CT_FLAG_ESTABLISHED, CT_FLAG_SEEN_FIN, CT_FLAG_SEEN_RST,
    CT_FLAG_SNAT, CT_FLAG_SNAT_OUT, CT_FORWARD, CT_LIFETIME_NON_TCP_NS, CT_LIFETIME_TCP_CLOSING_NS,
    CT_LIFETIME_TCP_NS, CT_REFRESH_NS, CtKey, CtValue, NodeConfig, PROTO_TCP, stat,
};

use crate::datapath::Verdict;
use crate::lb::{Selection, record_affinity};
use crate::maps::{PA_CONNTRACK, count, may_be_backend_port};
use crate::nat::masquerade;
use crate::parse::{Packet, TCP_FIN, TCP_RST, TCP_SYN, ifindex};

/// Working space of a new flow: the connection-tracking entries it writes
/// are built here, in this CPU's slot, rather than on the 512-byte stack.
#[repr(C)]
pub(crate) struct FlowScratch {
    pub(crate) key: CtKey,
    pub(crate) value: CtValue,
    pub(crate) key2: CtKey,
    pub(crate) value2: CtValue,
    /// The masquerade port to fall back on (network order; 0: none). Kept
    /// here, not in a register: the verifier does not track map memory, so
    /// setting it does not split the port search into more states.
    pub(crate) fallback_port: u16,
}

#[map]
static PA_SCRATCH: PerCpuArray<FlowScratch> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub(crate) fn lifetime(proto: u8, flags: u16) -> u64 {
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
pub(crate) fn ct_touch(ct: &mut CtValue, pkt: &Packet, now: u64) -> Option<bool> {
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

pub(crate) fn ct_key(pkt: &Packet, dir: u8) -> CtKey {
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
pub(crate) fn forget_flow_on_tuple(ctx: &TcContext, pkt: &Packet) {
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
        dir: CT_EGRESS,
        _pad0: 0,
    };
    // SAFETY: the fields are copied out at once; plain data.
    let Some((frontend, frontend_port, flags, in_ifindex)) = (unsafe { PA_CONNTRACK.get(&key) })
        .map(|ct| (ct.nat_addr, ct.nat_port, ct.flags, ct.in_ifindex))
    else {
        return;
    };
    if flags & CT_FLAG_SNAT_OUT != 0 || (in_ifindex != 0 && in_ifindex != ifindex(ctx)) {
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
        let _ = PA_CONNTRACK.remove(&ct_key(pkt, CT_EGRESS));
    }
    count(stat::FLOW_TUPLE_REUSED);
}

/// The second step of a new flow: writes what it needs before its first
/// packet is translated: the client's affinity, the masquerade port when
/// the flow is masqueraded, and the flow's reply and forward entries.
/// Returns the reason to count for the flow (`DNAT_NEW`, or `SNAT_NEW` when
/// masqueraded), or the verdict on a flow that could not be written.
///
/// The masquerade port is claimed first: the flow's entries record it
/// (`CT_FLAG_SNAT`), and a flow that gets none is dropped before any entry
/// could translate its packets.
#[inline(always)]
pub(crate) fn create(
    ctx: &TcContext,
    pkt: &Packet,
    cfg: Option<&NodeConfig>,
    sel: &Selection,
) -> Result<u32, Verdict> {
    if sel.affinity {
        record_affinity(sel, pkt);
    }
    let mut flags = tcp_ct_flags(pkt);
    if sel.affinity {
        flags |= CT_FLAG_AFFINITY;
    }
    let Some(scratch) = PA_SCRATCH.get_ptr_mut(0) else {
        return Err((TC_ACT_OK as i32, stat::ERR_REWRITE));
    };
    // SAFETY: this CPU's slot of a per-CPU array; nothing else uses it
    // while this program runs (programs do not preempt each other on a CPU).
    let scratch = unsafe { &mut *scratch };
    let mut reason = stat::DNAT_NEW;
    if masquerade(ctx, pkt, cfg, sel, flags, scratch)? {
        flags |= CT_FLAG_SNAT;
        reason = stat::SNAT_NEW;
    }
    if !insert_flow(ctx, pkt, sel, flags, scratch) {
        return Err((TC_ACT_SHOT as i32, stat::ERR_REWRITE));
    }
    if sel.from_affinity {
        count(stat::AFFINITY_HIT);
    }
    Ok(reason)
}

/// Writes a new flow's reply and forward entries; false when an insert
/// failed.
#[inline(always)]
fn insert_flow(
    ctx: &TcContext,
    pkt: &Packet,
    sel: &Selection,
    flags: u16,
    scratch: &mut FlowScratch,
) -> bool {
    let backend = &sel.backend;
    // The reply entry first: a reply can never arrive before the forward
    // packet is sent, but it must find its entry when it does.
    scratch.key = CtKey {
        src: backend.addr,
        dst: pkt.saddr,
        sport: backend.port,
        dport: pkt.sport,
        proto: pkt.proto,
        family: pkt.family,
        dir: CT_EGRESS,
        _pad0: 0,
    };
    scratch.value = CtValue {
        nat_addr: pkt.daddr,
        nat_port: pkt.dport,
        flags,
        backend_id: sel.backend_id,
        svc_id: sel.svc.svc_id,
        in_ifindex: ifindex(ctx),
        last_seen_ns: sel.now,
    };
    if PA_CONNTRACK
        .insert(&scratch.key, &scratch.value, 0)
        .is_err()
    {
        return false;
    }
    scratch.key = ct_key(pkt, CT_FORWARD);
    scratch.value.nat_addr = backend.addr;
    scratch.value.nat_port = backend.port;
    PA_CONNTRACK.insert(&scratch.key, &scratch.value, 0).is_ok()
}
