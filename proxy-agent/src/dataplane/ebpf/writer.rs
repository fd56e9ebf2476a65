//! The make-before-break writer: programs frontends (and the backends,
//! backend ports and frontend addresses they use) into the maps, and keeps
//! the shadow of what it wrote.
use std::{collections::BTreeSet, io, net::IpAddr, sync::Arc};

use aya::maps::{HashMap as BpfHashMap, MapData};
use proxy_common::{
    BackendId, MAX_BACKENDS_PER_SERVICE, MemberKey, SCOPE_EXTERNAL, SCOPE_INTERNAL, SVC_AFFINITY,
    ServiceKey, ServiceValue,
};

use super::{
    EbpfDataplane, EbpfError, batch,
    encode::{
        BackendRef, Entries, FrontendEntries, FrontendServices, SourceRangeSlot, addr_of,
        backend_refs, backend_value, backends_of, flags_of, frontend_name, node_addr_key,
        scoped_views, source_range_key,
    },
    flows::stale_udp_flows,
};
use crate::{
    dataplane::{ApplyStats, ConntrackCleanup},
    model::{
        Frontend, FrontendKey, TableDiff,
        plan::{FrontendPlan, plan},
    },
};

/// What this agent wrote for one frontend.
#[derive(Clone, Debug, Default)]
pub(super) struct Programmed {
    /// Its entries; it holds a reference on the backend of each slot.
    pub(super) entries: FrontendEntries,
    /// svc_id per scope (index = scope).
    pub(super) svc_ids: [Option<u32>; 2],
    /// The frontend, planned again when the node's network changes a plan
    /// (shared with the table it came from).
    pub(super) frontend: Option<Arc<Frontend>>,
}

/// How long an address no frontend has any more stays in the
/// frontend-address filter: as long as an established TCP flow through it
/// may live, so such flows keep their translation after their Service is
/// gone, as netfilter's conntrack keeps them for kube-proxy.
pub(super) const FRONTEND_ADDR_LINGER: std::time::Duration =
    std::time::Duration::from_nanos(proxy_common::CT_LIFETIME_TCP_NS);

pub(super) fn remove_ignoring_missing<K: aya::Pod, V: aya::Pod>(
    map: &mut BpfHashMap<MapData, K, V>,
    key: &K,
) -> Result<(), EbpfError> {
    match map.remove(key) {
        Ok(()) => Ok(()),
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.kind() == io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

impl EbpfDataplane {
    fn acquire(&mut self, b: BackendRef, stats: &mut ApplyStats) -> Result<BackendId, EbpfError> {
        if let Some(id) = self.backend_ids.id_of(&b) {
            self.backend_ids.take(id);
            return Ok(id);
        }
        let id = self
            .backend_alloc
            .alloc()
            .ok_or(EbpfError::BackendIdsExhausted)?;
        // Written with the entries that use it, before them (see
        // `write_entries`); its port marked before either.
        self.mark_backend_ports([&b], stats)?;
        self.pending_backends.push((id, backend_value(&b)));
        stats.kernel_writes += 1;
        self.backend_ids.insert(b, id, 1);
        Ok(id)
    }

    /// Drops a reference on every backend of `entries`' slots.
    fn release_all(
        &mut self,
        entries: &FrontendEntries,
        stats: &mut ApplyStats,
    ) -> Result<(), EbpfError> {
        for id in entries.services.backend_ids() {
            if self.backend_ids.drop_ref(id).is_some() {
                remove_ignoring_missing(&mut self.backends, &id)?;
                stats.kernel_deletes += 1;
                self.backend_alloc.release(id);
            }
        }
        Ok(())
    }

    /// The entries a frontend's `plan` needs, given its views' IDs;
    /// acquires a reference on the backend of every slot.
    pub(super) fn entries_for(
        &mut self,
        plan: &FrontendPlan,
        svc_ids: &[Option<u32>; 2],
        stats: &mut ApplyStats,
    ) -> Result<FrontendEntries, EbpfError> {
        let key = &plan.key;
        let mut entries = FrontendEntries::default();
        let mut scopes = Vec::new();
        let (_, family) = addr_of(key.ip);
        for (scope, view) in scoped_views(plan) {
            let (backends, flags) = (backends_of(view), flags_of(plan, scope, view));
            if backends.len() > MAX_BACKENDS_PER_SERVICE as usize {
                return Err(EbpfError::TooManyBackends(
                    frontend_name(key),
                    backends.len(),
                ));
            }
            let svc_id = svc_ids[scope as usize].ok_or(EbpfError::ServiceIdsExhausted)?;
            let mut slots = Vec::with_capacity(backends.len());
            for r in backend_refs(key, view) {
                let id = self.acquire(r, stats)?;
                slots.push(id);
                if flags & SVC_AFFINITY != 0 {
                    entries.members.insert(MemberKey {
                        svc_id,
                        backend_id: id,
                    });
                }
            }
            let head = ServiceValue {
                count: backends.len() as u16,
                flags,
                affinity_timeout_secs: plan.affinity_timeout_secs.unwrap_or(0),
                svc_id,
                ..Default::default()
            };
            scopes.push((scope, head, slots));
            if scope == SCOPE_EXTERNAL {
                for range in plan.source_ranges.iter().flatten() {
                    if let Some(k) = source_range_key(svc_id, family, range) {
                        entries.ranges.insert(SourceRangeSlot {
                            prefix_len: k.prefix_len(),
                            data: k.data(),
                        });
                    }
                }
            }
        }
        entries.services = FrontendServices::new(key, scopes);
        Ok(entries)
    }

    /// IDs for the views `frontend` needs, keeping those it already has.
    pub(super) fn svc_ids_for(
        &mut self,
        plan: &FrontendPlan,
        current: [Option<u32>; 2],
    ) -> Result<[Option<u32>; 2], EbpfError> {
        let mut ids = [None, None];
        let wanted: Vec<u8> = scoped_views(plan).map(|(scope, _)| scope).collect();
        for scope in [SCOPE_EXTERNAL, SCOPE_INTERNAL] {
            let i = scope as usize;
            if wanted.contains(&scope) {
                ids[i] = match current[i] {
                    Some(id) => Some(id),
                    None => {
                        let id = self
                            .svc_alloc
                            .alloc()
                            .ok_or(EbpfError::ServiceIdsExhausted)?;
                        // A reused ID's count was another view's. One past
                        // the counters' end is not counted (an error here).
                        let _ = self.frontend_flows.set(id, 0, 0);
                        Some(id)
                    }
                };
            } else if let Some(id) = current[i] {
                self.svc_alloc.release(id);
            }
        }
        Ok(ids)
    }

    /// Writes what is in `new` and not in `old`, then removes what is only
    /// in `old`, in make-before-break order: members, source ranges and
    /// slots before the service entries that expose them; service entries
    /// before the slots, ranges and members they stop exposing.
    pub(super) fn write_entries(
        &mut self,
        old: &Entries,
        new: &Entries,
        stats: &mut ApplyStats,
    ) -> Result<(), EbpfError> {
        // New backends first, then members, ranges and slots, then the
        // heads that make them reachable: make-before-break.
        let backends = std::mem::take(&mut self.pending_backends);
        batch::insert_all(&mut self.backends, &backends)?;
        let members: Vec<(MemberKey, u32)> = new
            .members
            .difference(&old.members)
            .map(|m| (*m, 1))
            .collect();
        batch::insert_all(&mut self.members, &members)?;
        stats.kernel_writes += members.len();
        for r in new.ranges.difference(&old.ranges) {
            self.source_ranges.insert(&r.key(), 1, 0)?;
            stats.kernel_writes += 1;
        }
        for heads in [false, true] {
            let services: Vec<(ServiceKey, ServiceValue)> = new
                .services
                .iter()
                .filter(|(k, v)| (k.slot == 0) == heads && old.services.get(k) != Some(v))
                .copied()
                .collect();
            batch::insert_all(&mut self.services, &services)?;
            stats.kernel_writes += services.len();
        }
        let mut stale: Vec<&ServiceKey> = old
            .services
            .keys()
            .filter(|k| !new.services.contains_key(k))
            .collect();
        stale.sort_by_key(|k| k.slot);
        for k in stale {
            remove_ignoring_missing(&mut self.services, k)?;
            stats.kernel_deletes += 1;
        }
        for r in old.ranges.difference(&new.ranges) {
            match self.source_ranges.remove(&r.key()) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            stats.kernel_deletes += 1;
        }
        for m in old.members.difference(&new.members) {
            remove_ignoring_missing(&mut self.members, m)?;
            stats.kernel_deletes += 1;
        }
        Ok(())
    }

    /// Programs one frontend (new or changed), make-before-break; a new
    /// one's address goes into the frontend-address filter after its
    /// entries.
    fn program_frontend(
        &mut self,
        key: &FrontendKey,
        frontend: &Arc<Frontend>,
        stats: &mut ApplyStats,
    ) -> Result<(), EbpfError> {
        let old = self.programmed.remove(key);
        let new = old.is_none();
        let old = old.unwrap_or_default();
        let plan = plan(key, frontend, &self.network);
        let svc_ids = self.svc_ids_for(&plan, old.svc_ids)?;
        let entries = self.entries_for(&plan, &svc_ids, stats)?;
        self.write_entries(&old.entries.expand(), &entries.expand(), stats)?;
        self.release_all(&old.entries, stats)?;
        self.programmed.insert(
            *key,
            Programmed {
                entries,
                svc_ids,
                frontend: Some(frontend.clone()),
            },
        );
        if new {
            self.hold_address(key.ip, stats)?;
        }
        Ok(())
    }

    /// Removes one frontend; its address lingers in the filter once no
    /// frontend has it.
    fn remove_frontend(
        &mut self,
        key: &FrontendKey,
        stats: &mut ApplyStats,
    ) -> Result<(), EbpfError> {
        let Some(old) = self.programmed.remove(key) else {
            return Ok(());
        };
        self.write_entries(&old.entries.expand(), &Entries::default(), stats)?;
        self.release_all(&old.entries, stats)?;
        for id in old.svc_ids.into_iter().flatten() {
            self.svc_alloc.release(id);
        }
        self.release_address(key.ip, std::time::Instant::now());
        Ok(())
    }

    /// Sets the bits of the ports among `backends` in the backend-port
    /// bitmap (see [`proxy_common::MAP_BACKEND_PORTS`]). Bits are never
    /// cleared: flows to a port may outlive its last backend, and a stale
    /// bit costs the datapath one lookup, nothing else.
    pub(super) fn mark_backend_ports<'a>(
        &mut self,
        backends: impl IntoIterator<Item = &'a BackendRef>,
        stats: &mut ApplyStats,
    ) -> Result<(), EbpfError> {
        for b in backends {
            let (word, bit) = (b.port >> 6, b.port & 63);
            let Some(value) = self.backend_port_words.get_mut(usize::from(word)) else {
                continue;
            };
            if *value & (1 << bit) == 0 {
                *value |= 1 << bit;
                self.backend_ports.set(u32::from(word), *value, 0)?;
                stats.kernel_writes += 1;
            }
        }
        Ok(())
    }

    /// Makes the frontend-address filter, which holds `in_kernel`, hold
    /// every address of a programmed frontend, every NodePort address of
    /// the node (NodePorts' own key has the unspecified address), and
    /// those that lost their last frontend less than
    /// [`FRONTEND_ADDR_LINGER`] ago.
    pub(super) fn sync_frontend_addrs(
        &mut self,
        in_kernel: BTreeSet<IpAddr>,
        stats: &mut ApplyStats,
    ) -> Result<(), EbpfError> {
        let now = std::time::Instant::now();
        let current: BTreeSet<IpAddr> = self
            .programmed
            .keys()
            .map(|k| k.ip)
            .filter(|ip| !ip.is_unspecified())
            .chain(self.node_addresses.iter().copied())
            .collect();
        for ip in in_kernel.difference(&current) {
            self.lingering
                .entry(*ip)
                .or_insert(now + FRONTEND_ADDR_LINGER);
        }
        self.lingering
            .retain(|ip, until| !current.contains(ip) && *until > now);
        let wanted: BTreeSet<IpAddr> = current
            .iter()
            .chain(self.lingering.keys())
            .copied()
            .collect();
        for ip in wanted.difference(&in_kernel) {
            self.frontend_addrs.insert(node_addr_key(*ip), 1, 0)?;
            stats.kernel_writes += 1;
        }
        for ip in in_kernel.difference(&wanted) {
            remove_ignoring_missing(&mut self.frontend_addrs, &node_addr_key(*ip))?;
            stats.kernel_deletes += 1;
        }
        self.frontend_addresses = wanted;
        self.address_refs.clear();
        for key in self.programmed.keys() {
            if !key.ip.is_unspecified() {
                *self.address_refs.entry(key.ip).or_default() += 1;
            }
        }
        Ok(())
    }

    /// Counts a newly programmed frontend on `ip`; its first one puts the
    /// address in the filter (after the frontend's entries: make before
    /// break).
    fn hold_address(&mut self, ip: IpAddr, stats: &mut ApplyStats) -> Result<(), EbpfError> {
        if ip.is_unspecified() {
            return Ok(());
        }
        let refs = self.address_refs.entry(ip).or_default();
        *refs += 1;
        if *refs == 1 {
            self.lingering.remove(&ip);
            if self.frontend_addresses.insert(ip) {
                self.frontend_addrs.insert(node_addr_key(ip), 1, 0)?;
                stats.kernel_writes += 1;
            }
        }
        Ok(())
    }

    /// Uncounts a removed frontend on `ip`; after its last one the address
    /// lingers in the filter (see [`FRONTEND_ADDR_LINGER`]).
    fn release_address(&mut self, ip: IpAddr, now: std::time::Instant) {
        let Some(refs) = self.address_refs.get_mut(&ip) else {
            return;
        };
        *refs -= 1;
        if *refs == 0 {
            self.address_refs.remove(&ip);
            self.lingering
                .entry(ip)
                .or_insert(now + FRONTEND_ADDR_LINGER);
        }
    }

    /// Takes the addresses whose lingering is over out of the filter.
    pub(super) fn expire_lingering(
        &mut self,
        now: std::time::Instant,
        stats: &mut ApplyStats,
    ) -> Result<(), EbpfError> {
        let over: Vec<IpAddr> = self
            .lingering
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in over {
            self.lingering.remove(&ip);
            // A NodePort address stays, whatever else it was.
            if self.node_addresses.contains(&ip) {
                continue;
            }
            if self.frontend_addresses.remove(&ip) {
                remove_ignoring_missing(&mut self.frontend_addrs, &node_addr_key(ip))?;
                stats.kernel_deletes += 1;
            }
        }
        Ok(())
    }

    /// Programs every frontend again under the current node network.
    pub(super) fn replan(&mut self) -> Result<(), EbpfError> {
        let frontends: Vec<(FrontendKey, Arc<Frontend>)> = self
            .programmed
            .iter()
            .filter_map(|(key, p)| Some((*key, p.frontend.clone()?)))
            .collect();
        let mut stats = ApplyStats::default();
        for (key, frontend) in &frontends {
            self.program_frontend(key, frontend, &mut stats)?;
        }
        Ok(())
    }

    pub(super) fn apply_diff(&mut self, diff: &TableDiff) -> Result<ApplyStats, EbpfError> {
        let mut stats = ApplyStats::default();
        for (key, _) in &diff.removed {
            self.remove_frontend(key, &mut stats)?;
            stats.frontends_removed += 1;
        }
        for (key, fe) in &diff.added {
            self.program_frontend(key, fe, &mut stats)?;
            stats.frontends_added += 1;
        }
        for change in &diff.changed {
            self.program_frontend(&change.key, &change.new, &mut stats)?;
            stats.frontends_changed += 1;
        }
        // Only flows to removed backends: a flow made before its frontend
        // existed is no entry of these maps, and the packets of the new
        // frontend are translated before netfilter's conntrack sees them.
        let gone = diff.stale_udp_flows();
        let stale = self.at_node_addresses(stale_udp_flows(&gone));
        if !stale.is_empty() {
            let mut families = [false; 2];
            for (key, _) in &gone {
                families[ConntrackCleanup::family_index(key.ip)] = true;
            }
            stats.conntrack = self.forget_udp_flows(&stale, families)?;
            self.end_stale_sockets(&stale);
        }
        // Added and removed frontends moved their addresses' counts above;
        // only time ends a lingering one.
        self.expire_lingering(std::time::Instant::now(), &mut stats)?;
        Ok(stats)
    }
}
