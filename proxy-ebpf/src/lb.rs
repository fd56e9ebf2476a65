//! Load balancing of a new flow: its frontend, the source ranges and the
//! view (scope) its client gets, and its backend, by session affinity or at
//! random (Cilium's `lb.h`). The map lookups themselves are in `maps`,
//! shared with the socket hooks.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use proxy_common::{
    Addr, AffinityValue, BackendId, BackendValue, CFG_CLUSTER_V4, CFG_CLUSTER_V6, FAMILY_V4,
    NodeConfig, PROTO_TCP, SVC_AFFINITY, SVC_DROP_EMPTY, SVC_INTERNAL_SCOPE, SVC_SOURCE_RANGES,
    ServiceValue, TAIL_REJECT, stat,
};

use crate::conntrack::forget_flow_on_tuple;
use crate::datapath::{Verdict, tail_call};
use crate::maps::{
    PA_AFFINITY, affinity_backend, affinity_key, count_flow, in_service_cidr, lookup_frontend, now,
    pick_slot, source_admitted, use_internal_view,
};
use crate::parse::{Packet, TCP_SYN};

/// What [`select`] chose for a new flow, and what the later steps need to
/// know of how.
pub(crate) struct Selection {
    /// The frontend view the flow goes through.
    pub(crate) svc: ServiceValue,
    pub(crate) backend_id: BackendId,
    pub(crate) backend: BackendValue,
    /// The frontend has session affinity.
    pub(crate) affinity: bool,
    /// The backend is the one the client's affinity named.
    pub(crate) from_affinity: bool,
    pub(crate) client_in_cluster: Option<bool>,
    pub(crate) now: u64,
}

/// The first step of a new flow: its frontend, whether its client may use
/// it, the view the client gets, and the backend. `Err`: the verdict on a
/// packet that gets no backend (no frontend, a source out of range, an
/// empty frontend, a backend gone).
#[inline(always)]
pub(crate) fn select(
    ctx: &mut TcContext,
    pkt: &Packet,
    cfg: Option<&NodeConfig>,
) -> Result<Selection, Verdict> {
    let Some((mut svc_key, mut svc)) =
        lookup_frontend(pkt.family, pkt.proto, &pkt.daddr, pkt.dport)
    else {
        // A port of a ClusterIP that no Service has: refused, as kube-proxy's
        // nftables mode refuses it.
        if in_service_cidr(pkt.family, &pkt.daddr) {
            let (_, reason) = tail_call(ctx, TAIL_REJECT);
            return Err((TC_ACT_SHOT as i32, reason));
        }
        // A node address, say, with a host-network backend behind it.
        forget_flow_on_tuple(ctx, pkt);
        return Err((TC_ACT_OK as i32, stat::PASS_NO_SERVICE));
    };
    if svc.flags & SVC_SOURCE_RANGES != 0 && !source_admitted(svc.svc_id, pkt.family, &pkt.saddr) {
        return Err((TC_ACT_SHOT as i32, stat::DROP_SOURCE_RANGE));
    }
    let client_in_cluster = in_cluster(cfg, pkt.family, &pkt.saddr);
    // In-cluster clients of an external Local frontend use the cluster-wide
    // view (kube-proxy's short-circuit of pod traffic).
    if svc.flags & SVC_INTERNAL_SCOPE != 0 && client_in_cluster == Some(true) {
        use_internal_view(&mut svc_key, &mut svc);
    }
    if svc.count == 0 {
        if svc.flags & SVC_DROP_EMPTY != 0 {
            return Err((TC_ACT_SHOT as i32, stat::DROP_NO_LOCAL_BACKEND));
        }
        let (_, reason) = tail_call(ctx, TAIL_REJECT);
        return Err((TC_ACT_SHOT as i32, reason));
    }
    // Only a SYN starts a TCP flow here. A later packet of a connection
    // this datapath never saw belongs to whoever translated its SYN (an
    // earlier mode's netfilter state, kept until its flows end); a backend
    // chosen now would answer it with a reset.
    if pkt.proto == PROTO_TCP && pkt.tcp_flags & TCP_SYN == 0 {
        return Err((TC_ACT_OK as i32, stat::PASS_NO_FLOW));
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
            None => return Err((TC_ACT_OK as i32, stat::PASS_BACKEND_MISSING)),
        },
    };
    count_flow(svc.svc_id);
    Ok(Selection {
        svc,
        backend_id,
        backend,
        affinity,
        from_affinity,
        client_in_cluster,
        now,
    })
}

/// Sends the client of a new flow through a frontend with session affinity
/// to the same backend next time.
#[inline(always)]
pub(crate) fn record_affinity(sel: &Selection, pkt: &Packet) {
    let key = affinity_key(sel.svc.svc_id, pkt.family, &pkt.saddr);
    let value = AffinityValue {
        backend_id: sel.backend_id,
        _pad0: 0,
        last_seen_ns: sel.now,
    };
    // A failed insert only costs the next connection its affinity.
    let _ = PA_AFFINITY.insert(&key, &value, 0);
}

/// Keeps a client's affinity alive while its connections carry packets
/// (the timeout runs from the client's last packet).
#[inline(always)]
pub(crate) fn refresh_affinity(svc_id: u32, pkt: &Packet, backend_id: BackendId, now: u64) {
    let key = affinity_key(svc_id, pkt.family, &pkt.saddr);
    if let Some(entry) = PA_AFFINITY.get_ptr_mut(&key) {
        // SAFETY: a live map value of plain data; see `ingress` in datapath.
        let entry = unsafe { &mut *entry };
        if entry.backend_id == backend_id {
            entry.last_seen_ns = now;
        }
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
