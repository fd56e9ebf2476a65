//! The reconcile: making the maps hold exactly the desired table whatever
//! they held, adopting the IDs the kernel already uses.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
};

use proxy_common::{BackendId, BackendValue};

use super::{
    EbpfDataplane, EbpfError, batch,
    encode::{
        Entries, ServiceEntries, SourceRangeSlot, backend_refs, backend_value, scoped_views,
        service_key,
    },
    network::addresses_in,
    words_of,
    writer::{Programmed, remove_ignoring_missing},
};
use crate::{
    dataplane::ApplyStats,
    model::{
        Frontend, FrontendKey, ServiceTable,
        plan::{FrontendPlan, plan},
    },
};

/// The desired table's frontends, each with its plan.
type Plans<'a> = [(FrontendPlan, &'a Arc<Frontend>)];

impl EbpfDataplane {
    /// Makes the maps hold exactly `desired`, whatever they held before (an
    /// earlier run's pinned state, or entries changed behind our back), and
    /// resets the shadow to match. Backend and frontend IDs already in the
    /// kernel are kept for the same backends and frontends, so existing
    /// flows and affinities are undisturbed.
    pub(super) fn reconcile_maps(
        &mut self,
        desired: &ServiceTable,
    ) -> Result<ApplyStats, EbpfError> {
        let mut stats = ApplyStats::default();
        // Left by a sync that failed: the backend IDs are adopted afresh.
        self.pending_backends.clear();
        let (kernel_backends, kernel) = self.kernel_contents()?;
        let plans: Vec<(FrontendPlan, &Arc<Frontend>)> = desired
            .iter_shared()
            .map(|(key, fe)| (plan(key, fe, &self.network), fe))
            .collect();
        self.adopt_backend_ids(&plans, &kernel_backends, &mut stats)?;
        // Adopt the IDs of frontend views from their kernel service entries.
        let current_ids = self.adopt_svc_ids(&plans, &kernel.services);

        // Pretend the kernel's content is what we programmed, then program
        // the desired table over it: one diff writes what differs.
        self.programmed.clear();
        let (all_new, programmed) = self.entries_of_plans(&plans, &current_ids, &mut stats)?;
        // Adopted backends are in the kernel already and `acquire` wrote the
        // new ones; what is left is the service entries, then stale backends.
        self.write_entries(&kernel, &all_new, &mut stats)?;
        self.remove_stale_backends(&kernel_backends, &mut stats)?;
        self.backend_ids.shrink_to_fit();
        self.programmed = programmed;
        stats.frontends_added = desired.len();
        // What is really in the filter: drift, or an earlier run's
        // addresses, which linger rather than go at once.
        let in_kernel = addresses_in(&self.frontend_addrs)?;
        self.sync_frontend_addrs(in_kernel, &mut stats)?;
        Ok(stats)
    }

    /// What the kernel holds: the backends by ID, and the service entries,
    /// members and source ranges of every frontend together. The hash maps
    /// are read in batches (see [`batch::read_all`]).
    fn kernel_contents(&self) -> Result<(BTreeMap<BackendId, BackendValue>, Entries), EbpfError> {
        let kernel_backends: BTreeMap<BackendId, BackendValue> =
            batch::read_all(&self.backends)?.into_iter().collect();
        let kernel = Entries {
            services: batch::read_all(&self.services)?.into(),
            members: batch::read_all(&self.members)?
                .into_iter()
                .map(|(k, _)| k)
                .collect(),
            ranges: self.ranges_in_kernel(),
        };
        Ok((kernel_backends, kernel))
    }

    /// Adopts the IDs of backends already in the kernel for the backends
    /// `plans` use (with no reference yet: they are counted up again as
    /// frontends take them), and sets their ports in the backend-port
    /// bitmap (the others' ports are set as they get their IDs).
    fn adopt_backend_ids(
        &mut self,
        plans: &Plans<'_>,
        kernel_backends: &BTreeMap<BackendId, BackendValue>,
        stats: &mut ApplyStats,
    ) -> Result<(), EbpfError> {
        let mut by_value: HashMap<BackendValue, BackendId> = HashMap::new();
        for (id, v) in kernel_backends {
            by_value.entry(*v).or_insert(*id);
        }
        // The bitmap as the kernel has it (an earlier run's bits, or drift).
        self.backend_port_words = words_of(&self.backend_ports);
        self.backend_ids.clear();
        let mut adopted = BTreeSet::new();
        // Nothing to adopt on a fresh node: no walk of every backend.
        if by_value.is_empty() {
            self.backend_alloc.reset(&adopted);
            return Ok(());
        }
        let wanted = plans.iter().flat_map(|(plan, _)| {
            scoped_views(plan).flat_map(|(_, view)| backend_refs(&plan.key, view))
        });
        for b in wanted {
            if self.backend_ids.id_of(&b).is_some() {
                continue;
            }
            if let Some(id) = by_value.get(&backend_value(&b)) {
                adopted.insert(*id);
                // Counted up again as frontends take them below.
                self.backend_ids.insert(b, *id, 0);
                self.mark_backend_ports([&b], stats)?;
            }
        }
        self.backend_alloc.reset(&adopted);
        Ok(())
    }

    /// The view IDs the kernel's service entries give the frontends of
    /// `plans` (an ID at most once); restarts the view IDs after them.
    fn adopt_svc_ids(
        &mut self,
        plans: &Plans<'_>,
        kernel_services: &ServiceEntries,
    ) -> HashMap<FrontendKey, [Option<u32>; 2]> {
        let mut used_svc_ids = BTreeSet::new();
        let mut current_ids: HashMap<FrontendKey, [Option<u32>; 2]> = HashMap::new();
        for (plan, _) in plans {
            let key = &plan.key;
            let mut ids = [None, None];
            for (scope, _) in scoped_views(plan) {
                if let Some(head) = kernel_services.get(&service_key(key, scope, 0))
                    && head.svc_id != 0
                    && used_svc_ids.insert(head.svc_id)
                {
                    ids[scope as usize] = Some(head.svc_id);
                }
            }
            current_ids.insert(*key, ids);
        }
        self.svc_alloc.reset(&used_svc_ids);
        current_ids
    }

    /// The entries of every frontend of `plans` together, and the shadow of
    /// each, with the view IDs adopted in `current_ids` (new ones for the
    /// others); acquires the backends they use.
    fn entries_of_plans(
        &mut self,
        plans: &Plans<'_>,
        current_ids: &HashMap<FrontendKey, [Option<u32>; 2]>,
        stats: &mut ApplyStats,
    ) -> Result<(Entries, BTreeMap<FrontendKey, Programmed>), EbpfError> {
        let mut all_new = Entries::default();
        let mut all_services = Vec::new();
        let mut programmed = Vec::with_capacity(plans.len());
        for (plan, fe) in plans {
            let key = &plan.key;
            let current = current_ids.get(key).copied().unwrap_or([None, None]);
            let svc_ids = self.svc_ids_for(plan, current)?;
            let entries = self.entries_for(plan, &svc_ids, stats)?;
            all_services.extend(entries.services.iter());
            all_new.members.extend(entries.members.iter().copied());
            all_new.ranges.extend(entries.ranges.iter().copied());
            programmed.push((
                *key,
                Programmed {
                    entries,
                    svc_ids,
                    frontend: Some(Arc::clone(fe)),
                },
            ));
        }
        all_new.services = all_services.into();
        // Built from a list, the map's nodes are full.
        Ok((all_new, programmed.into_iter().collect()))
    }

    /// The source-range slots in the kernel's trie.
    fn ranges_in_kernel(&self) -> BTreeSet<SourceRangeSlot> {
        self.source_ranges
            .keys()
            .filter_map(Result::ok)
            .map(|k| SourceRangeSlot {
                prefix_len: k.prefix_len(),
                data: k.data(),
            })
            .collect()
    }

    /// Whether the maps hold exactly what the shadow says this agent wrote,
    /// and the shadow is `desired`: a periodic reconcile then plans and
    /// writes nothing. The maps are read in batches and compared in
    /// memory, a small part of what a full reconcile costs (it plans every
    /// frontend and reads the maps key by key).
    pub(super) fn holds_exactly(&self, desired: &ServiceTable) -> Result<bool, EbpfError> {
        if self.programmed.len() != desired.len()
            || desired.iter_shared().any(|(key, fe)| {
                // Shared with the table when unchanged: equal at a glance.
                self.programmed.get(key).and_then(|p| p.frontend.as_ref()) != Some(fe)
            })
        {
            return Ok(false);
        }
        let (backends, kernel) = self.kernel_contents()?;
        let mut expected_services = 0;
        let mut expected_members = 0;
        let mut expected_ranges: BTreeSet<SourceRangeSlot> = BTreeSet::new();
        for programmed in self.programmed.values() {
            let entries = &programmed.entries;
            expected_services += entries.services.len();
            expected_members += entries.members.len();
            if entries
                .services
                .iter()
                .any(|(k, v)| kernel.services.get(&k) != Some(&v))
                || entries.members.iter().any(|m| !kernel.members.contains(m))
            {
                return Ok(false);
            }
            expected_ranges.extend(entries.ranges.iter().copied());
        }
        if kernel.services.len() != expected_services
            || kernel.members.len() != expected_members
            || kernel.ranges != expected_ranges
        {
            return Ok(false);
        }
        if backends.len() != self.backend_ids.len()
            || self
                .backend_ids
                .iter()
                .any(|(id, b)| backends.get(&id) != Some(&backend_value(b)))
        {
            return Ok(false);
        }
        Ok(
            addresses_in(&self.frontend_addrs)? == self.frontend_addresses
                && words_of(&self.backend_ports) == self.backend_port_words,
        )
    }

    /// Removes the backends of `kernel_backends` no frontend uses any more,
    /// and restarts the backend IDs after those in use.
    fn remove_stale_backends(
        &mut self,
        kernel_backends: &BTreeMap<BackendId, BackendValue>,
        stats: &mut ApplyStats,
    ) -> Result<(), EbpfError> {
        let in_use: BTreeSet<BackendId> = self.backend_ids.iter().map(|(id, _)| id).collect();
        for id in kernel_backends.keys().filter(|id| !in_use.contains(id)) {
            remove_ignoring_missing(&mut self.backends, id)?;
            stats.kernel_deletes += 1;
        }
        self.backend_alloc.reset(&in_use);
        Ok(())
    }
}
