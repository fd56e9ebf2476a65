//! The eBPF dataplane: loads the TC programs, pins their maps under
//! `--bpf-root`, and programs services into the maps.
//!
//! Map layout (see `proxy-common`): a service entry per frontend at slot 0
//! holding the backend count, slots `1..=n` holding backend IDs, backends in
//! their own map by ID. Updates are make-before-break: new backends and
//! slots are written before the count that exposes them, and surplus slots
//! and unused backends are removed after it.
use std::{
    collections::{BTreeMap, HashMap},
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray},
    programs::SchedClassifier,
};
use proxy_common::{
    Addr, BackendId, BackendValue, CT_FORWARD, CT_REPLY, CtKey, CtValue, FAMILY_V4, FAMILY_V6,
    MAP_BACKENDS, MAP_CONNTRACK, MAP_SERVICES, MAP_STATS, MAX_BACKENDS_PER_SERVICE, PROG_EGRESS,
    PROG_INGRESS, ServiceKey, ServiceValue, stat,
};

use super::{ApplyStats, Dataplane, DataplaneError, NodeNetwork};
use crate::model::{
    Backend, Frontend, FrontendKey, FrontendKind, Protocol, ServiceTable, TableDiff,
};

pub mod attach;
pub mod bpffs;

pub use attach::{Attacher, InterfaceFilter, follow_links};
pub use bpffs::PinLayout;

/// The compiled eBPF object, embedded at build time by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// The embedded eBPF object (for tests and benchmarks).
pub fn object() -> &'static [u8] {
    OBJECT
}

const PINNED_MAPS: [&str; 4] = [MAP_SERVICES, MAP_BACKENDS, MAP_CONNTRACK, MAP_STATS];

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error(
        "this agent was built without its eBPF object (AYA_BUILD_SKIP); rebuild after `cargo xtask setup`"
    )]
    NoObject,
    #[error("preparing bpffs at {0}: {1}")]
    BpfFs(PathBuf, #[source] io::Error),
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] io::Error),
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("eBPF program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("eBPF map: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("pinning: {0}")]
    Pin(#[from] aya::pin::PinError),
    #[error("link: {0}")]
    Link(#[source] aya::programs::links::LinkError),
    #[error("program {0} is missing from the eBPF object")]
    MissingProgram(&'static str),
    #[error("map {0} is missing from the eBPF object")]
    MissingMap(&'static str),
    #[error("netlink socket: {0}")]
    Netlink(#[source] io::Error),
    #[error("rtnetlink: {0}")]
    Rtnetlink(String),
    #[error("no free backend ID left")]
    BackendIdsExhausted,
    #[error("frontend {0} has {1} backends; at most {max} fit", max = MAX_BACKENDS_PER_SERVICE)]
    TooManyBackends(String, usize),
}

/// Where and how to load.
#[derive(Clone, Debug)]
pub struct EbpfOptions {
    pub bpf_root: PathBuf,
    pub interfaces: InterfaceFilter,
}

/// A backend as the kernel identifies it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct BackendRef {
    ip: IpAddr,
    port: u16,
    protocol: Protocol,
}

fn addr_of(ip: IpAddr) -> (Addr, u8) {
    let mut addr = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            (addr, FAMILY_V4)
        }
        IpAddr::V6(v6) => (v6.octets(), FAMILY_V6),
    }
}

fn service_key(key: &FrontendKey, slot: u16) -> ServiceKey {
    let (addr, family) = addr_of(key.ip);
    ServiceKey {
        addr,
        port: key.port.to_be(),
        proto: key.protocol.number(),
        family,
        scope: 0,
        _pad0: 0,
        slot,
    }
}

fn backend_value(b: &BackendRef) -> BackendValue {
    let (addr, family) = addr_of(b.ip);
    BackendValue {
        addr,
        port: b.port.to_be(),
        proto: b.protocol.number(),
        family,
        flags: 0,
    }
}

fn slot_value(backend_id: BackendId) -> ServiceValue {
    ServiceValue {
        backend_id,
        ..Default::default()
    }
}

fn head_value(count: u16) -> ServiceValue {
    ServiceValue {
        count,
        ..Default::default()
    }
}

/// The maps, and a shadow of what this agent has written into them.
pub struct EbpfDataplane {
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    backends: BpfHashMap<MapData, BackendId, BackendValue>,
    conntrack: BpfHashMap<MapData, CtKey, CtValue>,
    stats: PerCpuArray<MapData, u64>,
    /// Backend IDs in slot order, per programmed frontend.
    programmed: HashMap<FrontendKey, Vec<BackendId>>,
    /// Every programmed backend, its ID and how many frontends use it.
    backend_ids: HashMap<BackendRef, (BackendId, usize)>,
    free_ids: Vec<BackendId>,
    next_id: BackendId,
}

/// Loads the programs and opens (or creates) the pinned maps under
/// `opts.bpf_root`. Programs are loaded but not attached: attach them with
/// the returned [`Attacher`] (see [`follow_links`]).
pub fn load(opts: &EbpfOptions) -> Result<(EbpfDataplane, Attacher), EbpfError> {
    if OBJECT.is_empty() {
        return Err(EbpfError::NoObject);
    }
    let layout = PinLayout::new(&opts.bpf_root);
    let mounted = bpffs::ensure_mounted(&layout.root)
        .map_err(|e| EbpfError::BpfFs(layout.root.clone(), e))?;
    if mounted {
        tracing::info!(path = %layout.root.display(), "mounted bpffs");
    }
    for dir in [layout.maps(), layout.links()] {
        std::fs::create_dir_all(&dir).map_err(|e| EbpfError::Io(dir.clone(), e))?;
    }
    let maps_dir = layout.maps();
    let mut loader = EbpfLoader::new();
    for name in PINNED_MAPS {
        loader.map_pin_path(name, maps_dir.join(name));
    }
    let mut ebpf = loader.load(OBJECT)?;
    load_programs(&mut ebpf)?;
    let dataplane = EbpfDataplane::from_ebpf(&mut ebpf)?;
    Ok((
        dataplane,
        Attacher::new(ebpf, layout, opts.interfaces.clone()),
    ))
}

/// Loads the object without pinning anything, for packet-fixture tests and
/// benchmarks through `BPF_PROG_TEST_RUN`.
pub fn load_unpinned() -> Result<(EbpfDataplane, Ebpf), EbpfError> {
    if OBJECT.is_empty() {
        return Err(EbpfError::NoObject);
    }
    let mut ebpf = EbpfLoader::new().load(OBJECT)?;
    load_programs(&mut ebpf)?;
    let dataplane = EbpfDataplane::from_ebpf(&mut ebpf)?;
    Ok((dataplane, ebpf))
}

fn load_programs(ebpf: &mut Ebpf) -> Result<(), EbpfError> {
    for name in [PROG_INGRESS, PROG_EGRESS] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(EbpfError::MissingProgram(name))?
            .try_into()?;
        prog.load()?;
    }
    Ok(())
}

impl EbpfDataplane {
    fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, EbpfError> {
        let services = ebpf
            .take_map(MAP_SERVICES)
            .ok_or(EbpfError::MissingMap(MAP_SERVICES))?;
        let backends = ebpf
            .take_map(MAP_BACKENDS)
            .ok_or(EbpfError::MissingMap(MAP_BACKENDS))?;
        let conntrack = ebpf
            .take_map(MAP_CONNTRACK)
            .ok_or(EbpfError::MissingMap(MAP_CONNTRACK))?;
        let stats = ebpf
            .take_map(MAP_STATS)
            .ok_or(EbpfError::MissingMap(MAP_STATS))?;
        Ok(Self {
            services: BpfHashMap::try_from(services)?,
            backends: BpfHashMap::try_from(backends)?,
            conntrack: BpfHashMap::try_from(conntrack)?,
            stats: PerCpuArray::try_from(stats)?,
            programmed: HashMap::new(),
            backend_ids: HashMap::new(),
            free_ids: Vec::new(),
            next_id: 1,
        })
    }

    /// Per-reason packet counters summed over CPUs, indexed like
    /// [`proxy_common::stat`].
    pub fn stats(&self) -> Result<[u64; stat::COUNT as usize], EbpfError> {
        let mut out = [0u64; stat::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            let values = self.stats.get(&(i as u32), 0)?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }

    /// Number of connection-tracking entries (walks the map; for tests and
    /// diagnostics, not the hot path).
    pub fn conntrack_len(&self) -> usize {
        self.conntrack.keys().filter(|k| k.is_ok()).count()
    }

    fn alloc_id(&mut self) -> Result<BackendId, EbpfError> {
        if let Some(id) = self.free_ids.pop() {
            return Ok(id);
        }
        let id = self.next_id;
        self.next_id = self
            .next_id
            .checked_add(1)
            .ok_or(EbpfError::BackendIdsExhausted)?;
        Ok(id)
    }

    fn acquire(&mut self, b: BackendRef, stats: &mut ApplyStats) -> Result<BackendId, EbpfError> {
        if let Some((id, refs)) = self.backend_ids.get_mut(&b) {
            *refs += 1;
            return Ok(*id);
        }
        let id = self.alloc_id()?;
        self.backends.insert(id, backend_value(&b), 0)?;
        stats.map_writes += 1;
        self.backend_ids.insert(b, (id, 1));
        Ok(id)
    }

    fn release(&mut self, b: &BackendRef, stats: &mut ApplyStats) -> Result<(), EbpfError> {
        let Some((id, refs)) = self.backend_ids.get_mut(b) else {
            return Ok(());
        };
        *refs -= 1;
        if *refs == 0 {
            let id = *id;
            self.backend_ids.remove(b);
            remove_ignoring_missing(&mut self.backends, &id)?;
            stats.map_deletes += 1;
            self.free_ids.push(id);
        }
        Ok(())
    }

    fn refs_of(key: &FrontendKey, backends: &[Backend]) -> Vec<BackendRef> {
        backends
            .iter()
            .map(|b| BackendRef {
                ip: b.ip,
                port: b.port,
                protocol: key.protocol,
            })
            .collect()
    }

    /// Writes one frontend's slots and head entry, make-before-break.
    fn program_frontend(
        &mut self,
        key: &FrontendKey,
        backends: &[Backend],
        old: &[Backend],
        stats: &mut ApplyStats,
    ) -> Result<(), EbpfError> {
        if backends.len() > MAX_BACKENDS_PER_SERVICE as usize {
            return Err(EbpfError::TooManyBackends(
                format!("{}:{}/{:?}", key.ip, key.port, key.protocol),
                backends.len(),
            ));
        }
        let old_ids = self.programmed.get(key).cloned().unwrap_or_default();
        let mut new_ids = Vec::with_capacity(backends.len());
        for b in Self::refs_of(key, backends) {
            new_ids.push(self.acquire(b, stats)?);
        }
        for (i, id) in new_ids.iter().enumerate() {
            if old_ids.get(i) != Some(id) {
                self.services
                    .insert(service_key(key, i as u16 + 1), slot_value(*id), 0)?;
                stats.map_writes += 1;
            }
        }
        if old_ids.len() != new_ids.len() || !self.programmed.contains_key(key) {
            self.services
                .insert(service_key(key, 0), head_value(new_ids.len() as u16), 0)?;
            stats.map_writes += 1;
        }
        for slot in new_ids.len()..old_ids.len() {
            remove_ignoring_missing(&mut self.services, &service_key(key, slot as u16 + 1))?;
            stats.map_deletes += 1;
        }
        for b in Self::refs_of(key, old) {
            self.release(&b, stats)?;
        }
        self.programmed.insert(*key, new_ids);
        Ok(())
    }

    fn remove_frontend(
        &mut self,
        key: &FrontendKey,
        old: &[Backend],
        stats: &mut ApplyStats,
    ) -> Result<(), EbpfError> {
        let Some(ids) = self.programmed.remove(key) else {
            return Ok(());
        };
        // The head first, so no new flow picks a slot being removed.
        remove_ignoring_missing(&mut self.services, &service_key(key, 0))?;
        stats.map_deletes += 1;
        for slot in 0..ids.len() {
            remove_ignoring_missing(&mut self.services, &service_key(key, slot as u16 + 1))?;
            stats.map_deletes += 1;
        }
        for b in Self::refs_of(key, old) {
            self.release(&b, stats)?;
        }
        Ok(())
    }

    /// Makes the maps hold exactly `desired`, whatever they held before (an
    /// earlier run's pinned state, or entries changed behind our back), and
    /// resets the shadow to match. Backend IDs already in the kernel are
    /// kept for the same backends, so existing flows are undisturbed.
    pub fn reconcile(&mut self, desired: &ServiceTable) -> Result<ApplyStats, EbpfError> {
        let mut stats = ApplyStats::default();
        let kernel_backends: BTreeMap<BackendId, BackendValue> =
            self.backends.iter().filter_map(Result::ok).collect();
        let kernel_services: HashMap<ServiceKey, ServiceValue> =
            self.services.iter().filter_map(Result::ok).collect();

        // Adopt IDs of backends already in the kernel.
        let mut by_value: HashMap<BackendValue, BackendId> = HashMap::new();
        for (id, v) in &kernel_backends {
            by_value.entry(*v).or_insert(*id);
        }
        let mut wanted: BTreeMap<BackendRef, usize> = BTreeMap::new();
        for (key, fe) in desired.iter() {
            for b in Self::refs_of(key, &fe.backends) {
                *wanted.entry(b).or_default() += 1;
            }
        }
        self.backend_ids.clear();
        self.programmed.clear();
        self.free_ids.clear();
        let mut used: std::collections::BTreeSet<BackendId> = std::collections::BTreeSet::new();
        let mut unassigned = Vec::new();
        for (b, refs) in &wanted {
            match by_value.get(&backend_value(b)) {
                Some(id) => {
                    used.insert(*id);
                    self.backend_ids.insert(*b, (*id, *refs));
                }
                None => unassigned.push((*b, *refs)),
            }
        }
        self.next_id = used.iter().next_back().map_or(1, |m| m + 1);
        let stale_ids: Vec<BackendId> = kernel_backends
            .keys()
            .filter(|id| !used.contains(id))
            .copied()
            .collect();
        for (b, refs) in unassigned {
            let id = self.alloc_id()?;
            self.backend_ids.insert(b, (id, refs));
        }
        // Backends first, then slots, then heads (make-before-break).
        for (b, (id, _)) in &self.backend_ids {
            let v = backend_value(b);
            if kernel_backends.get(id) != Some(&v) {
                self.backends.insert(*id, v, 0)?;
                stats.map_writes += 1;
            }
        }
        let mut desired_entries: HashMap<ServiceKey, ServiceValue> = HashMap::new();
        let mut heads = Vec::new();
        for (key, fe) in desired.iter() {
            let ids: Vec<BackendId> = Self::refs_of(key, &fe.backends)
                .iter()
                .filter_map(|b| self.backend_ids.get(b).map(|(id, _)| *id))
                .collect();
            if ids.len() > MAX_BACKENDS_PER_SERVICE as usize {
                return Err(EbpfError::TooManyBackends(
                    format!("{}:{}/{:?}", key.ip, key.port, key.protocol),
                    ids.len(),
                ));
            }
            for (i, id) in ids.iter().enumerate() {
                desired_entries.insert(service_key(key, i as u16 + 1), slot_value(*id));
            }
            heads.push((service_key(key, 0), head_value(ids.len() as u16)));
            self.programmed.insert(*key, ids);
        }
        for (k, v) in &desired_entries {
            if kernel_services.get(k) != Some(v) {
                self.services.insert(*k, *v, 0)?;
                stats.map_writes += 1;
            }
        }
        for (k, v) in &heads {
            if kernel_services.get(k) != Some(v) {
                self.services.insert(*k, *v, 0)?;
                stats.map_writes += 1;
            }
            desired_entries.insert(*k, *v);
        }
        // Stale entries: heads before slots, then unused backends.
        let mut stale: Vec<&ServiceKey> = kernel_services
            .keys()
            .filter(|k| !desired_entries.contains_key(k))
            .collect();
        stale.sort_by_key(|k| k.slot);
        for k in stale {
            remove_ignoring_missing(&mut self.services, k)?;
            stats.map_deletes += 1;
        }
        for id in stale_ids {
            remove_ignoring_missing(&mut self.backends, &id)?;
            stats.map_deletes += 1;
        }
        // IDs below next_id that nobody uses are free again.
        let in_use: std::collections::BTreeSet<BackendId> =
            self.backend_ids.values().map(|(id, _)| *id).collect();
        self.free_ids = (1..self.next_id)
            .filter(|id| !in_use.contains(id))
            .rev()
            .collect();
        stats.frontends_added = desired.len();
        Ok(stats)
    }

    /// Programs the node's addresses and masquerade settings.
    pub fn set_node_network(&mut self, network: &NodeNetwork) -> Result<(), EbpfError> {
        // Filled in with the NodePort and masquerade maps.
        let _ = network;
        Ok(())
    }

    fn apply_diff(&mut self, diff: &TableDiff) -> Result<ApplyStats, EbpfError> {
        let mut stats = ApplyStats::default();
        for (key, old) in &diff.removed {
            self.remove_frontend(key, &old.backends, &mut stats)?;
            stats.frontends_removed += 1;
        }
        for (key, fe) in &diff.added {
            self.program_frontend(key, &fe.backends, &[], &mut stats)?;
            stats.frontends_added += 1;
        }
        for change in &diff.changed {
            self.program_frontend(
                &change.key,
                &change.new.backends,
                &change.old.backends,
                &mut stats,
            )?;
            stats.frontends_changed += 1;
        }
        let stale = stale_udp_flows(diff);
        if !stale.is_empty() {
            stats.conntrack_deletes += self.forget_udp_flows(&stale)?;
        }
        Ok(stats)
    }

    /// Deletes the connection-tracking entries (both directions) of UDP
    /// flows of `stale` (frontend, backend) pairs. UDP has no end, so a
    /// client that keeps sending (DNS from one socket, say) would otherwise
    /// stick to a backend that is gone; without its entry its next datagram
    /// picks a live backend, as kube-proxy's conntrack flush achieves.
    fn forget_udp_flows(
        &mut self,
        stale: &std::collections::HashSet<(Addr, u16, Addr, u16)>,
    ) -> Result<usize, EbpfError> {
        // Walks the whole table, but only when a UDP backend went away.
        let doomed: Vec<CtKey> = self
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| {
                k.proto == Protocol::Udp.number()
                    && match k.dir {
                        // Client -> VIP; the value holds the backend.
                        CT_FORWARD => stale.contains(&(k.dst, k.dport, v.nat_addr, v.nat_port)),
                        // Backend -> client; the value holds the VIP.
                        CT_REPLY => stale.contains(&(v.nat_addr, v.nat_port, k.src, k.sport)),
                        _ => false,
                    }
            })
            .map(|(k, _)| k)
            .collect();
        for key in &doomed {
            remove_ignoring_missing(&mut self.conntrack, key)?;
        }
        if !doomed.is_empty() {
            tracing::debug!(
                entries = doomed.len(),
                "forgot UDP flows to removed backends"
            );
        }
        Ok(doomed.len())
    }
}

/// (VIP, port, backend, backend port), ports in network byte order, of every
/// UDP backend that `diff` takes away from a frontend.
fn stale_udp_flows(diff: &TableDiff) -> std::collections::HashSet<(Addr, u16, Addr, u16)> {
    let mut stale = std::collections::HashSet::new();
    let mut add = |key: &FrontendKey, backends: &mut dyn Iterator<Item = &Backend>| {
        if key.protocol != Protocol::Udp {
            return;
        }
        let (vip, _) = addr_of(key.ip);
        for b in backends {
            let (addr, _) = addr_of(b.ip);
            stale.insert((vip, key.port.to_be(), addr, b.port.to_be()));
        }
    };
    for (key, old) in &diff.removed {
        add(key, &mut old.backends.iter());
    }
    for change in &diff.changed {
        let gone: Vec<Backend> = change.removed_backends();
        add(&change.key, &mut gone.iter());
    }
    stale
}

fn remove_ignoring_missing<K: aya::Pod, V: aya::Pod>(
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

/// Whether this datapath can serve `frontend` as the model means it. Not
/// yet: NodePorts (they need the node's addresses), and LoadBalancer IPs
/// restricted by `loadBalancerSourceRanges` (translating them without the
/// check would open what the operator closed). Those are left out rather
/// than half-served.
fn programmable(frontend: &Frontend) -> bool {
    match frontend.kind {
        FrontendKind::NodePort => false,
        FrontendKind::LoadBalancer => frontend.policy.source_ranges.is_empty(),
        FrontendKind::ClusterIp | FrontendKind::ExternalIp => true,
    }
}

/// `desired` without what [`programmable`] refuses.
fn programmable_table(desired: &ServiceTable) -> ServiceTable {
    let mut table = ServiceTable::new();
    let mut skipped = 0usize;
    for (key, frontend) in desired.iter() {
        if programmable(frontend) {
            table.insert(*key, frontend.clone());
        } else {
            skipped += 1;
        }
    }
    if skipped > 0 {
        tracing::debug!(
            skipped,
            "frontends not served by the eBPF datapath yet (NodePort, LoadBalancer with source ranges)"
        );
    }
    table
}

/// `diff` as seen by this datapath: a frontend that becomes programmable is
/// added, one that stops being so is removed.
fn programmable_diff(diff: &TableDiff) -> TableDiff {
    let mut out = TableDiff::default();
    out.added.extend(
        diff.added
            .iter()
            .filter(|(_, fe)| programmable(fe))
            .cloned(),
    );
    out.removed.extend(
        diff.removed
            .iter()
            .filter(|(_, fe)| programmable(fe))
            .cloned(),
    );
    for change in &diff.changed {
        match (programmable(&change.old), programmable(&change.new)) {
            (true, true) => out.changed.push(change.clone()),
            (true, false) => out.removed.push((change.key, change.old.clone())),
            (false, true) => out.added.push((change.key, change.new.clone())),
            (false, false) => {}
        }
    }
    out
}

impl Dataplane for EbpfDataplane {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn apply(&mut self, diff: &TableDiff) -> Result<ApplyStats, DataplaneError> {
        Ok(self.apply_diff(&programmable_diff(diff))?)
    }

    fn reconcile(&mut self, desired: &ServiceTable) -> Result<ApplyStats, DataplaneError> {
        Ok(EbpfDataplane::reconcile(
            self,
            &programmable_table(desired),
        )?)
    }

    fn set_node_network(&mut self, network: &NodeNetwork) -> Result<(), DataplaneError> {
        Ok(EbpfDataplane::set_node_network(self, network)?)
    }
}

/// What `cleanup` removed.
#[derive(Debug, Default)]
pub struct CleanupReport {
    pub links: usize,
    pub maps: usize,
    pub unmounted: bool,
}

/// Removes every link and map pinned under `bpf_root` (detaching the
/// programs) and the directories; unmounts a bpffs the agent mounted there.
/// Safe to run when nothing is left.
pub fn cleanup(bpf_root: &Path) -> Result<CleanupReport, EbpfError> {
    let mut report = CleanupReport::default();
    if !bpf_root.exists() {
        return Ok(report);
    }
    let layout = PinLayout::new(bpf_root);
    let on_bpffs = bpffs::is_bpffs(bpf_root).map_err(|e| EbpfError::BpfFs(bpf_root.into(), e))?;
    if on_bpffs {
        for (dir, counter) in [
            (layout.links(), &mut report.links),
            (layout.maps(), &mut report.maps),
        ] {
            let entries = match std::fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(EbpfError::Io(dir, e)),
            };
            for entry in entries.flatten() {
                let path = entry.path();
                // Unlinking the last reference to a link detaches its program.
                std::fs::remove_file(&path).map_err(|e| EbpfError::Io(path.clone(), e))?;
                *counter += 1;
            }
            std::fs::remove_dir(&dir).map_err(|e| EbpfError::Io(dir.clone(), e))?;
        }
        report.unmounted =
            bpffs::unmount_if_own(bpf_root).map_err(|e| EbpfError::BpfFs(bpf_root.into(), e))?;
    }
    match std::fs::remove_dir(bpf_root) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
            tracing::warn!(path = %bpf_root.display(), "bpf root not empty after cleanup; left in place");
        }
        Err(e) => return Err(EbpfError::Io(bpf_root.into(), e)),
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{FrontendChange, test_support::*};

    fn of_kind(kind: FrontendKind, ranges: &[&str]) -> Frontend {
        let mut fe = frontend("ns", "web", &[backend("10.1.0.1", 8080)]);
        fe.kind = kind;
        fe.policy.source_ranges = ranges.iter().map(|r| r.parse().unwrap()).collect();
        fe
    }

    #[test]
    fn only_what_the_datapath_can_enforce_is_programmed() {
        assert!(programmable(&of_kind(FrontendKind::ClusterIp, &[])));
        assert!(programmable(&of_kind(FrontendKind::ExternalIp, &[])));
        assert!(programmable(&of_kind(FrontendKind::LoadBalancer, &[])));
        assert!(!programmable(&of_kind(
            FrontendKind::LoadBalancer,
            &["10.0.0.0/8"]
        )));
        assert!(!programmable(&of_kind(FrontendKind::NodePort, &[])));

        // A LoadBalancer IP that gains source ranges is taken away, and one
        // that loses them is added; NodePorts never appear.
        let lb = key("192.0.2.1", 80);
        let diff = TableDiff {
            added: vec![(key("0.0.0.0", 30080), of_kind(FrontendKind::NodePort, &[]))],
            changed: vec![FrontendChange {
                key: lb,
                old: of_kind(FrontendKind::LoadBalancer, &[]),
                new: of_kind(FrontendKind::LoadBalancer, &["10.0.0.0/8"]),
            }],
            removed: vec![],
        };
        let seen = programmable_diff(&diff);
        assert!(seen.added.is_empty() && seen.changed.is_empty());
        assert_eq!(seen.removed.len(), 1);
        assert_eq!(seen.removed[0].0, lb);

        let mut table = ServiceTable::new();
        table.insert(key("0.0.0.0", 30080), of_kind(FrontendKind::NodePort, &[]));
        table.insert(key("10.0.0.1", 80), of_kind(FrontendKind::ClusterIp, &[]));
        let programmed = programmable_table(&table);
        assert_eq!(programmed.len(), 1);
        assert!(programmed.get(&key("10.0.0.1", 80)).is_some());
    }
}
