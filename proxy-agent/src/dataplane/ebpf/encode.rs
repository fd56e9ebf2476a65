//! Turning the model's frontends and plans into map keys and values.
use std::{collections::BTreeSet, net::IpAddr};

use aya::maps::lpm_trie::Key as LpmKey;
use ipnet::IpNet;
use proxy_common::{
    Addr, BackendId, BackendValue, FAMILY_V4, FAMILY_V6, MemberKey, NodeAddrKey, SCOPE_EXTERNAL,
    SCOPE_INTERNAL, SVC_AFFINITY, SVC_DROP_EMPTY, SVC_INTERNAL_SCOPE, SVC_MASQUERADE,
    SVC_MASQUERADE_OUTSIDE, SVC_SOURCE_RANGES, ServiceKey, ServiceValue, SourceRangeKey,
};

use crate::model::{
    Backend, FrontendKey, Protocol,
    plan::{Action, FrontendPlan, Masquerade, View},
};

/// A backend as the kernel identifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct BackendRef {
    pub(super) ip: IpAddr,
    pub(super) port: u16,
    pub(super) protocol: Protocol,
}

pub(super) fn addr_of(ip: IpAddr) -> (Addr, u8) {
    let mut addr = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            (addr, FAMILY_V4)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

/// The address a map's `addr` and `family` hold ([`addr_of`] undone);
/// `None` for an unknown family.
pub(super) fn ip_of(addr: &Addr, family: u8) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::V4(std::net::Ipv4Addr::new(
            addr[0], addr[1], addr[2], addr[3],
        ))),
        FAMILY_V6 => Some(IpAddr::V6(std::net::Ipv6Addr::from(*addr))),
        _ => None,
    }
}

pub(super) fn service_key(key: &FrontendKey, scope: u8, slot: u16) -> ServiceKey {
    let (addr, family) = addr_of(key.ip);
    ServiceKey {
        addr,
        port: key.port.to_be(),
        proto: key.protocol.number(),
        family,
        scope,
        _pad0: 0,
        slot,
    }
}

pub(super) fn backend_value(b: &BackendRef) -> BackendValue {
    let (addr, family) = addr_of(b.ip);
    BackendValue {
        addr,
        port: b.port.to_be(),
        proto: b.protocol.number(),
        family,
        flags: 0,
    }
}

pub(super) fn frontend_name(key: &FrontendKey) -> String {
    format!("{}:{}/{}", key.ip, key.port, key.protocol)
}

/// The views of a frontend's plan the datapath keeps, by scope: the main
/// view, and for an external Local frontend the cluster-wide one, which
/// pods (the plan's cluster view, on the packet path) and the node's own
/// sockets (its node view, at `connect()`) use. The two choose among the
/// same backends; the masquerade of the scope is the pods' (the socket
/// hooks never masquerade: the node's address is the source anyway).
pub(super) fn scoped_views(plan: &FrontendPlan) -> impl Iterator<Item = (u8, &View)> {
    let internal = plan
        .cluster_view
        .as_ref()
        .map(|(_, view)| view)
        .or(plan.node_view.as_ref());
    std::iter::once((SCOPE_EXTERNAL, &plan.view)).chain(internal.map(|v| (SCOPE_INTERNAL, v)))
}

/// The backends a view balances over (none when it refuses).
pub(super) fn backends_of(view: &View) -> &[Backend] {
    match &view.action {
        Action::Balance(backends) => backends,
        Action::Reject | Action::Drop => &[],
    }
}

/// The backends of one view of frontend `key`, as the kernel identifies
/// them.
pub(super) fn backend_refs<'a>(
    key: &FrontendKey,
    view: &'a View,
) -> impl Iterator<Item = BackendRef> + 'a {
    let protocol = key.protocol;
    backends_of(view).iter().map(move |b| BackendRef {
        ip: b.ip,
        port: b.port,
        protocol,
    })
}

/// The service-entry flags of one scope of a plan.
pub(super) fn flags_of(plan: &FrontendPlan, scope: u8, view: &View) -> u32 {
    let mut flags = match view.masquerade {
        Masquerade::Never => 0,
        Masquerade::Always => SVC_MASQUERADE,
        Masquerade::SourceOutside(_) => SVC_MASQUERADE_OUTSIDE,
    };
    if plan.affinity_timeout_secs.is_some() {
        flags |= SVC_AFFINITY;
    }
    if scope != SCOPE_EXTERNAL {
        return flags;
    }
    if view.action == Action::Drop {
        flags |= SVC_DROP_EMPTY;
    }
    if plan.cluster_view.is_some() || plan.node_view.is_some() {
        flags |= SVC_INTERNAL_SCOPE;
    }
    if plan.source_ranges.is_some() {
        flags |= SVC_SOURCE_RANGES;
    }
    flags
}

/// Key of the source-ranges trie for `range` of frontend view `svc_id`.
/// A range of the other address family than the frontend can never match,
/// and is left out (so a frontend whose ranges are all of the other family
/// admits nobody of its own: a restriction is never widened).
pub(super) fn source_range_key(
    svc_id: u32,
    family: u8,
    range: &IpNet,
) -> Option<LpmKey<SourceRangeKey>> {
    let (addr, range_family) = addr_of(range.network());
    if range_family != family {
        return None;
    }
    Some(LpmKey::new(
        32 + u32::from(range.prefix_len()),
        SourceRangeKey {
            svc_id_be: svc_id.to_be(),
            addr,
        },
    ))
}

/// Everything one frontend puts in the maps (besides its backends).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Entries {
    pub(super) services: ServiceEntries,
    // Ordered sets: empty ones (most frontends have no members or ranges)
    // take half the room of empty hash sets in the shadow.
    pub(super) members: BTreeSet<MemberKey>,
    pub(super) ranges: BTreeSet<SourceRangeSlot>,
}

/// Service-map entries, sorted by key, without duplicate keys.
///
/// The shadow holds one list per frontend (tens of thousands of them), so
/// it is a plain list, without a hash table's buckets and spare room:
/// built whole, then sorted once ([`ServiceEntries::from`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct ServiceEntries(Box<[(ServiceKey, ServiceValue)]>);

impl ServiceEntries {
    pub(super) fn get(&self, key: &ServiceKey) -> Option<&ServiceValue> {
        let at = self.0.binary_search_by(|(k, _)| k.cmp(key)).ok()?;
        Some(&self.0[at].1)
    }

    pub(super) fn contains_key(&self, key: &ServiceKey) -> bool {
        self.get(key).is_some()
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &(ServiceKey, ServiceValue)> {
        self.0.iter()
    }

    pub(super) fn keys(&self) -> impl Iterator<Item = &ServiceKey> {
        self.0.iter().map(|(k, _)| k)
    }

    pub(super) fn len(&self) -> usize {
        self.0.len()
    }
}

impl From<Vec<(ServiceKey, ServiceValue)>> for ServiceEntries {
    /// Sorted by key; of entries with one key, the last is kept.
    fn from(mut entries: Vec<(ServiceKey, ServiceValue)>) -> Self {
        // Stable, so that equal keys keep their order and the last wins.
        entries.sort_by_key(|(k, _)| *k);
        entries.reverse();
        entries.dedup_by_key(|(k, _)| *k);
        entries.reverse();
        ServiceEntries(entries.into_boxed_slice())
    }
}

/// What the shadow keeps of one frontend's entries: its service entries
/// compact (see [`FrontendServices`]), its members and source ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct FrontendEntries {
    pub(super) services: FrontendServices,
    pub(super) members: BTreeSet<MemberKey>,
    pub(super) ranges: BTreeSet<SourceRangeSlot>,
}

impl FrontendEntries {
    /// The entries as the writer compares them.
    pub(super) fn expand(&self) -> Entries {
        Entries {
            services: ServiceEntries(self.services.iter().collect()),
            members: self.members.clone(),
            ranges: self.ranges.clone(),
        }
    }
}

/// One frontend's service entries, as the shadow keeps them (tens of
/// thousands of frontends, each with a dozen entries): the key they share,
/// and per scope the head (slot 0) and the backend IDs of slots `1..=n`.
/// Every other slot's value is its backend ID alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct FrontendServices {
    /// The frontend's key at scope 0, slot 0.
    base: ServiceKey,
    /// By scope, ascending.
    scopes: Box<[ScopeEntries]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ScopeEntries {
    scope: u8,
    head: ServiceValue,
    slots: Box<[BackendId]>,
}

impl FrontendServices {
    /// The entries of `key`: per scope its head and the backend IDs of its
    /// slots, in order.
    pub(super) fn new(
        key: &FrontendKey,
        scopes: impl IntoIterator<Item = (u8, ServiceValue, Vec<BackendId>)>,
    ) -> Self {
        let mut scopes: Vec<ScopeEntries> = scopes
            .into_iter()
            .map(|(scope, head, slots)| ScopeEntries {
                scope,
                head,
                slots: slots.into_boxed_slice(),
            })
            .collect();
        scopes.sort_by_key(|s| s.scope);
        scopes.dedup_by_key(|s| s.scope);
        FrontendServices {
            base: service_key(key, 0, 0),
            scopes: scopes.into_boxed_slice(),
        }
    }

    /// The entries in key order.
    pub(super) fn iter(&self) -> impl Iterator<Item = (ServiceKey, ServiceValue)> + '_ {
        self.scopes.iter().flat_map(move |s| {
            let key = move |slot: u16| ServiceKey {
                scope: s.scope,
                slot,
                ..self.base
            };
            let slots = (1u16..).zip(s.slots.iter()).map(move |(slot, id)| {
                let value = ServiceValue {
                    backend_id: *id,
                    ..Default::default()
                };
                (key(slot), value)
            });
            std::iter::once((key(0), s.head)).chain(slots)
        })
    }

    /// The backend IDs of every slot, one per slot (a backend both scopes
    /// use comes twice, as it holds a reference for each).
    pub(super) fn backend_ids(&self) -> impl Iterator<Item = BackendId> + '_ {
        self.scopes.iter().flat_map(|s| s.slots.iter().copied())
    }

    pub(super) fn len(&self) -> usize {
        self.scopes.iter().map(|s| 1 + s.slots.len()).sum()
    }
}

/// A source-ranges trie key, ordered for the shadow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct SourceRangeSlot {
    pub(super) prefix_len: u32,
    pub(super) data: SourceRangeKey,
}

impl SourceRangeSlot {
    pub(super) fn key(&self) -> LpmKey<SourceRangeKey> {
        LpmKey::new(self.prefix_len, self.data)
    }
}

pub(super) fn node_addr_key(ip: IpAddr) -> NodeAddrKey {
    let (addr, family) = addr_of(ip);
    NodeAddrKey {
        addr,
        family,
        _pad0: [0; 3],
    }
}
