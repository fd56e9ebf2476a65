//! The maps every program family shares (TC datapath and socket hooks),
//! and the lookups both make in them: the frontend of a destination,
//! session affinity, and the random backend of a frontend.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, lpm_trie::Key},
};
use proxy_common::{
    Addr, AffinityKey, AffinityValue, BackendId, BackendValue, CFG_SNAT_V4, CFG_SNAT_V6, CtKey,
    CtValue, FAMILY_V4, MemberKey, NodeAddrKey, NodeConfig, SCOPE_EXTERNAL, SCOPE_INTERNAL,
    ServiceCidrKey, ServiceKey, ServiceValue, SockPod, SockRevKey, SockRevValue, SourceRangeKey,
    stat,
};

#[map]
pub(crate) static PA_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(proxy_common::SERVICES_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
pub(crate) static PA_BACKENDS: HashMap<BackendId, BackendValue> =
    HashMap::with_max_entries(proxy_common::BACKENDS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
pub(crate) static PA_CONNTRACK: LruHashMap<CtKey, CtValue> =
    LruHashMap::with_max_entries(proxy_common::CONNTRACK_MAX_ENTRIES, 0);

#[map]
pub(crate) static PA_AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(proxy_common::AFFINITY_MAX_ENTRIES, 0);

#[map]
pub(crate) static PA_MEMBERS: HashMap<MemberKey, u32> =
    HashMap::with_max_entries(proxy_common::MEMBERS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
pub(crate) static PA_SOURCE_RANGES: LpmTrie<SourceRangeKey, u32> =
    LpmTrie::with_max_entries(proxy_common::SOURCE_RANGES_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
pub(crate) static PA_SERVICE_CIDRS: LpmTrie<ServiceCidrKey, u32> =
    LpmTrie::with_max_entries(proxy_common::SERVICE_CIDRS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
pub(crate) static PA_NODE_ADDRS: HashMap<NodeAddrKey, u32> =
    HashMap::with_max_entries(proxy_common::NODE_ADDRS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

#[map]
pub(crate) static PA_CONFIG: Array<NodeConfig> = Array::with_max_entries(1, 0);

#[map]
pub(crate) static PA_FRONTEND_ADDRS: HashMap<NodeAddrKey, u32> =
    HashMap::with_max_entries(proxy_common::FRONTEND_ADDRS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// The network namespace cookie of the agent: the only namespace whose
/// sockets the socket hooks translate (0: none).
#[map]
pub(crate) static PA_SOCK_NETNS: Array<u64> = Array::with_max_entries(1, 0);

/// See `proxy_common::MAP_SOCK_PODS`.
#[map]
pub(crate) static PA_SOCK_PODS: HashMap<u64, SockPod> =
    HashMap::with_max_entries(proxy_common::SOCK_PODS_MAX_ENTRIES, BPF_F_NO_PREALLOC);

/// For each socket translated by the socket hooks and the backend it was
/// given: the frontend it asked for, restored on receive and getpeername.
#[map]
/// A connected socket's entry goes when it closes (`pa_sock_release`).
pub(crate) static PA_SOCK_REVNAT: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::with_max_entries(proxy_common::SOCK_REVNAT_MAX_ENTRIES, 0);

/// See `proxy_common::MAP_BACKEND_PORTS`.
#[map]
pub(crate) static PA_BACKEND_PORTS: Array<u64> =
    Array::with_max_entries(proxy_common::BACKEND_PORT_WORDS, 0);

/// Whether a backend may listen on `port` (network order).
#[inline(always)]
pub(crate) fn may_be_backend_port(port: u16) -> bool {
    let port = u16::from_be(port);
    match PA_BACKEND_PORTS.get(u32::from(port >> 6)) {
        Some(word) => word & (1u64 << (port & 63)) != 0,
        None => true,
    }
}

#[map]
pub(crate) static PA_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// See `proxy_common::MAP_FRONTEND_FLOWS`.
#[map]
pub(crate) static PA_FRONTEND_FLOWS: Array<u64> =
    Array::with_max_entries(proxy_common::FRONTEND_FLOWS_MAX_ENTRIES, 0);

/// One more flow of frontend view `svc_id`. Shared between CPUs (a
/// per-CPU slot per view would take the map's size times the CPUs), so an
/// atomic add; once per flow, never per packet.
#[inline(always)]
pub(crate) fn count_flow(svc_id: u32) {
    if let Some(counter) = PA_FRONTEND_FLOWS.get_ptr_mut(svc_id) {
        // SAFETY: the pointer is to a live, aligned u64 slot of an array
        // map for the duration of the program; other CPUs only add to it
        // atomically too. The old value is unused, so this is BPF's plain
        // atomic add (core's AtomicU64 has no fetch_add for this target).
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                counter, 1,
            )
        };
    }
}

#[inline(always)]
pub(crate) fn count(index: u32) {
    if let Some(counter) = PA_STATS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from a per-CPU array slot of this CPU and
        // is valid for the duration of the program; no other CPU writes it.
        unsafe { *counter += 1 };
    }
}

/// Switches a frontend's `key` and `svc` to its internal view (the
/// cluster-wide backends of an external Local frontend, for clients inside
/// the cluster); keeps the external view when that entry is missing.
#[inline(always)]
pub(crate) fn use_internal_view(key: &mut ServiceKey, svc: &mut ServiceValue) {
    key.scope = SCOPE_INTERNAL;
    // SAFETY: copied out at once; plain data.
    match unsafe { PA_SERVICES.get(&*key) } {
        Some(internal) => *svc = *internal,
        None => key.scope = SCOPE_EXTERNAL,
    }
}

/// Monotonic clock, read only on paths that touch connection tracking.
/// The coarse one (CLOCK_MONOTONIC_COARSE: a tick's resolution, no clock
/// source read): lifetimes and refreshes count in seconds.
#[inline(always)]
pub(crate) fn now() -> u64 {
    // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
    unsafe { bpf_ktime_get_coarse_ns() }
}

#[inline(always)]
pub(crate) fn random() -> u32 {
    // SAFETY: bpf_get_prandom_u32 has no preconditions.
    unsafe { bpf_get_prandom_u32() }
}

#[inline(always)]
pub(crate) fn config() -> Option<&'static NodeConfig> {
    PA_CONFIG.get(0)
}

/// The masquerade address of `family`, if the node has one.
#[inline(always)]
pub(crate) fn snat_addr(cfg: Option<&NodeConfig>, family: u8) -> Option<Addr> {
    let cfg = cfg?;
    if family == FAMILY_V4 {
        if cfg.flags & CFG_SNAT_V4 != 0 {
            return Some(cfg.snat_v4);
        }
    } else if cfg.flags & CFG_SNAT_V6 != 0 {
        return Some(cfg.snat_v6);
    }
    None
}

/// Whether a destination can be a frontend at all: an address a frontend
/// has (or had, while its flows may live on), or a NodePort address (the
/// agent keeps both in one map). The one lookup that traffic to anything
/// else pays.
#[inline(always)]
pub(crate) fn may_be_frontend(family: u8, addr: &Addr) -> bool {
    let key = NodeAddrKey {
        addr: *addr,
        family,
        _pad0: [0; 3],
    };
    // SAFETY: only presence is read.
    unsafe { PA_FRONTEND_ADDRS.get(&key).is_some() }
}

/// The service entry (slot 0) for a destination: its frontend address,
/// else a NodePort when the destination is one of the node's NodePort
/// addresses. `port` as in memory (network order).
#[inline(always)]
pub(crate) fn lookup_frontend(
    family: u8,
    proto: u8,
    addr: &Addr,
    port: u16,
) -> Option<(ServiceKey, ServiceValue)> {
    let mut key = ServiceKey {
        addr: *addr,
        port,
        proto,
        family,
        scope: SCOPE_EXTERNAL,
        _pad0: 0,
        slot: 0,
    };
    // SAFETY: values are copied out at once; they are plain data.
    if let Some(svc) = unsafe { PA_SERVICES.get(&key) } {
        return Some((key, *svc));
    }
    let node_addr = NodeAddrKey {
        addr: *addr,
        family,
        _pad0: [0; 3],
    };
    // SAFETY: as above.
    unsafe { PA_NODE_ADDRS.get(&node_addr) }?;
    key.addr = [0; 16];
    // SAFETY: as above.
    let svc = unsafe { PA_SERVICES.get(&key) }?;
    Some((key, *svc))
}

/// A backend of `svc` at random (`key`: its service entry's key).
#[inline(always)]
pub(crate) fn pick_slot(svc: &ServiceValue, key: &ServiceKey) -> Option<(BackendId, BackendValue)> {
    // `checked_rem`: the callers check count is non-zero, but the compiler
    // cannot see it, and a panic path would not pass the verifier.
    let pick = random().checked_rem(svc.count as u32)?;
    let mut slot_key = *key;
    slot_key.slot = pick as u16 + 1;
    // SAFETY: copied out at once; plain data.
    let slot = unsafe { PA_SERVICES.get(&slot_key) }?;
    let id = slot.backend_id;
    // SAFETY: as above.
    let backend = unsafe { PA_BACKENDS.get(&id) }?;
    Some((id, *backend))
}

#[inline(always)]
pub(crate) fn affinity_key(svc_id: u32, family: u8, client: &Addr) -> AffinityKey {
    AffinityKey {
        svc_id,
        family,
        _pad0: [0; 3],
        client: *client,
    }
}

/// The backend `client` was last sent to, if within the timeout and still
/// a member of the frontend.
#[inline(always)]
pub(crate) fn affinity_backend(
    svc: &ServiceValue,
    family: u8,
    client: &Addr,
    now: u64,
) -> Option<(BackendId, BackendValue)> {
    let key = affinity_key(svc.svc_id, family, client);
    // SAFETY: copied out at once; plain data.
    let entry = unsafe { PA_AFFINITY.get(&key) }?;
    let timeout_ns = svc.affinity_timeout_secs as u64 * 1_000_000_000;
    if now.wrapping_sub(entry.last_seen_ns) > timeout_ns {
        return None;
    }
    let id = entry.backend_id;
    let member = MemberKey {
        svc_id: svc.svc_id,
        backend_id: id,
    };
    // SAFETY: as above.
    unsafe { PA_MEMBERS.get(&member) }?;
    // SAFETY: as above.
    let backend = unsafe { PA_BACKENDS.get(&id) }?;
    Some((id, *backend))
}

/// Whether `loadBalancerSourceRanges` of frontend view `svc_id` admit
/// `addr` (the agent writes the ranges the plan admits, the frontend's own
/// address among them when a range holds the node's).
#[inline(always)]
pub(crate) fn source_admitted(svc_id: u32, family: u8, addr: &Addr) -> bool {
    let bits = if family == FAMILY_V4 { 32 } else { 128 };
    let key = Key::new(
        32 + bits,
        SourceRangeKey {
            svc_id_be: svc_id.to_be(),
            addr: *addr,
        },
    );
    PA_SOURCE_RANGES.get(&key).is_some()
}

/// Whether `addr` is inside one of the cluster's ServiceCIDRs.
#[inline(always)]
pub(crate) fn in_service_cidr(family: u8, addr: &Addr) -> bool {
    let bits = if family == FAMILY_V4 { 32 } else { 128 };
    let key = Key::new(
        32 + bits,
        ServiceCidrKey {
            family_be: u32::from(family).to_be(),
            addr: *addr,
        },
    );
    PA_SERVICE_CIDRS.get(&key).is_some()
}
