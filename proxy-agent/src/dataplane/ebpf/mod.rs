//! The eBPF dataplane: loads the TC programs, pins their maps under
//! `--bpf-root`, and programs services into the maps.
//!
//! Map layout (see `proxy-common`): a service entry per frontend at slot 0
//! holding the backend count, slots `1..=n` holding backend IDs, backends in
//! their own map by ID. Updates are make-before-break: new backends and
//! slots are written before the count that exposes them, and surplus slots
//! and unused backends are removed after it.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap as BpfHashMap, MapData, PerCpuArray, ProgramArray,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{CgroupSockAddr, SchedClassifier},
};
use ipnet::IpNet;
use proxy_common::{
    Addr, AffinityKey, AffinityValue, BACKEND_PORT_WORDS, BackendId, BackendValue, CFG_CLUSTER_V4,
    CFG_CLUSTER_V6, CFG_MASQUERADE_ALL, CFG_SNAT_V4, CFG_SNAT_V6, CT_FLAG_SNAT, CT_FORWARD,
    CT_REPLY, CT_SNAT_IN, CT_SNAT_OUT, CtKey, CtValue, FAMILY_V4, FAMILY_V6, MAP_AFFINITY,
    MAP_BACKEND_PORTS, MAP_BACKENDS, MAP_CONFIG, MAP_CONNTRACK, MAP_FRONTEND_ADDRS, MAP_MEMBERS,
    MAP_NODE_ADDRS, MAP_PROGS, MAP_SERVICES, MAP_SOCK_NETNS, MAP_SOCK_REVNAT, MAP_SOURCE_RANGES,
    MAP_STATS, MAX_BACKENDS_PER_SERVICE, MemberKey, NodeAddrKey, NodeConfig, PROG_EGRESS,
    PROG_ICMP_EGRESS, PROG_ICMP_INGRESS, PROG_INGRESS, PROG_NEW_FLOW, PROG_REJECT, PROGS_SOCKET,
    SCOPE_EXTERNAL, SCOPE_INTERNAL, SNAT_LOW_PORT_MIN, SNAT_PORT_MAX, SNAT_PORT_MIN, SVC_AFFINITY,
    SVC_DROP_EMPTY, SVC_INTERNAL_SCOPE, SVC_MASQUERADE, SVC_MASQUERADE_OUTSIDE, SVC_SOURCE_RANGES,
    ServiceKey, ServiceValue, SourceRangeKey, TAIL_ICMP_EGRESS, TAIL_ICMP_INGRESS, TAIL_NEW_FLOW,
    TAIL_REJECT, stat,
};

use super::{ApplyStats, Dataplane, DataplaneError, NodeNetwork};
use crate::model::{
    Backend, Frontend, FrontendKey, Protocol, ServiceTable, TableDiff,
    plan::{Action, FrontendPlan, Masquerade, View, plan},
};

pub mod attach;
pub mod bpffs;
pub mod counters;
pub mod sockets;

pub use attach::{Attacher, InterfaceFilter, follow_links};
pub use bpffs::PinLayout;

/// The compiled eBPF object, embedded at build time by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// The embedded eBPF object (for tests and benchmarks).
pub fn object() -> &'static [u8] {
    OBJECT
}

/// Every map is pinned, the program array too: its slots are cleared when
/// the last user reference to it goes, and the attached programs, which
/// outlive the agent, need them.
const PINNED_MAPS: [&str; 14] = [
    MAP_SERVICES,
    MAP_BACKENDS,
    MAP_CONNTRACK,
    MAP_AFFINITY,
    MAP_MEMBERS,
    MAP_SOURCE_RANGES,
    MAP_NODE_ADDRS,
    MAP_CONFIG,
    MAP_STATS,
    MAP_PROGS,
    MAP_SOCK_NETNS,
    MAP_SOCK_REVNAT,
    MAP_FRONTEND_ADDRS,
    MAP_BACKEND_PORTS,
];

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
    #[error("no free frontend ID left")]
    ServiceIdsExhausted,
    #[error("frontend {0} has {1} backends; at most {max} fit", max = MAX_BACKENDS_PER_SERVICE)]
    TooManyBackends(String, usize),
}

/// Where and how to load.
#[derive(Clone, Debug)]
pub struct EbpfOptions {
    pub bpf_root: PathBuf,
    pub interfaces: InterfaceFilter,
    /// The cgroup v2 directory the socket hooks attach to (the node's own
    /// processes below it reach services through them); `None`: no socket
    /// hooks.
    pub cgroup: Option<PathBuf>,
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

fn service_key(key: &FrontendKey, scope: u8, slot: u16) -> ServiceKey {
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

fn frontend_name(key: &FrontendKey) -> String {
    format!("{}:{}/{}", key.ip, key.port, key.protocol)
}

/// The views of a frontend's plan the datapath keeps, by scope: the main
/// view, and for an external Local frontend the cluster-wide one, which
/// pods (the plan's cluster view, on the packet path) and the node's own
/// sockets (its node view, at `connect()`) use. The two choose among the
/// same backends; the masquerade of the scope is the pods' (the socket
/// hooks never masquerade: the node's address is the source anyway).
fn scoped_views(plan: &FrontendPlan) -> impl Iterator<Item = (u8, &View)> {
    let internal = plan
        .cluster_view
        .as_ref()
        .map(|(_, view)| view)
        .or(plan.node_view.as_ref());
    std::iter::once((SCOPE_EXTERNAL, &plan.view)).chain(internal.map(|v| (SCOPE_INTERNAL, v)))
}

/// The backends a view balances over (none when it refuses).
fn backends_of(view: &View) -> &[Backend] {
    match &view.action {
        Action::Balance(backends) => backends,
        Action::Reject | Action::Drop => &[],
    }
}

/// The service-entry flags of one scope of a plan.
fn flags_of(plan: &FrontendPlan, scope: u8, view: &View) -> u32 {
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
fn source_range_key(svc_id: u32, family: u8, range: &IpNet) -> Option<LpmKey<SourceRangeKey>> {
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
struct Entries {
    services: HashMap<ServiceKey, ServiceValue>,
    members: HashSet<MemberKey>,
    ranges: HashSet<SourceRangeSlot>,
}

/// A source-ranges trie key, hashable for the shadow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct SourceRangeSlot {
    prefix_len: u32,
    data: SourceRangeKey,
}

impl SourceRangeSlot {
    fn key(&self) -> LpmKey<SourceRangeKey> {
        LpmKey::new(self.prefix_len, self.data)
    }
}

/// What this agent wrote for one frontend.
#[derive(Clone, Debug, Default)]
struct Programmed {
    entries: Entries,
    /// The backends it holds a reference on.
    backends: Vec<BackendRef>,
    /// svc_id per scope (index = scope).
    svc_ids: [Option<u32>; 2],
    /// The frontend, planned again when the node's network changes a plan.
    frontend: Option<Frontend>,
}

/// Allocates small integer IDs, reusing freed ones.
#[derive(Debug)]
struct IdAllocator {
    free: Vec<u32>,
    next: u32,
}

impl Default for IdAllocator {
    fn default() -> Self {
        Self {
            free: Vec::new(),
            next: 1,
        }
    }
}

impl IdAllocator {
    fn alloc(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop() {
            return Some(id);
        }
        let id = self.next;
        self.next = self.next.checked_add(1)?;
        Some(id)
    }

    fn release(&mut self, id: u32) {
        self.free.push(id);
    }

    /// Restarts after IDs `used` were adopted from the kernel: everything
    /// below the highest one that is not used is free.
    fn reset(&mut self, used: &BTreeSet<u32>) {
        self.next = used.iter().next_back().map_or(1, |m| m + 1);
        self.free = (1..self.next)
            .filter(|id| !used.contains(id))
            .rev()
            .collect();
    }
}

/// The maps, and a shadow of what this agent has written into them.
pub struct EbpfDataplane {
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    backends: BpfHashMap<MapData, BackendId, BackendValue>,
    conntrack: BpfHashMap<MapData, CtKey, CtValue>,
    affinity: BpfHashMap<MapData, AffinityKey, AffinityValue>,
    members: BpfHashMap<MapData, MemberKey, u32>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u32>,
    node_addrs: BpfHashMap<MapData, NodeAddrKey, u32>,
    config: Array<MapData, NodeConfig>,
    stats: PerCpuArray<MapData, u64>,
    programmed: HashMap<FrontendKey, Programmed>,
    /// Every programmed backend, its ID and how many frontend views use it.
    backend_ids: HashMap<BackendRef, (BackendId, usize)>,
    backend_alloc: IdAllocator,
    svc_alloc: IdAllocator,
    /// The node addresses written to the node-addresses map.
    node_addresses: BTreeSet<IpAddr>,
    /// The node's network the frontends were planned under.
    network: NodeNetwork,
    frontend_addrs: BpfHashMap<MapData, NodeAddrKey, u32>,
    backend_ports: Array<MapData, u64>,
    /// The words of the backend-port bitmap as written (see
    /// [`EbpfDataplane::mark_backend_ports`]).
    backend_port_words: Vec<u64>,
    /// The addresses written to the frontend-address filter (read back from
    /// the kernel only by a reconcile).
    frontend_addresses: BTreeSet<IpAddr>,
    /// Addresses no frontend has any more, kept in the frontend-address
    /// filter until the given time (see [`FRONTEND_ADDR_LINGER`]).
    lingering: HashMap<IpAddr, std::time::Instant>,
}

/// How long an address no frontend has any more stays in the
/// frontend-address filter: as long as an established TCP flow through it
/// may live, so such flows keep their translation after their Service is
/// gone, as netfilter's conntrack keeps them for kube-proxy.
const FRONTEND_ADDR_LINGER: std::time::Duration =
    std::time::Duration::from_nanos(proxy_common::CT_LIFETIME_TCP_NS);

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
    if let Some(cgroup) = &opts.cgroup {
        sockets::attach(&mut ebpf, &layout, cgroup)?;
    }
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

/// Loads every program, and points the program array's slots at the
/// tail-called stages (replacing what an earlier run left there).
fn load_programs(ebpf: &mut Ebpf) -> Result<(), EbpfError> {
    for name in [
        PROG_INGRESS,
        PROG_EGRESS,
        PROG_NEW_FLOW,
        PROG_REJECT,
        PROG_ICMP_INGRESS,
        PROG_ICMP_EGRESS,
    ] {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(EbpfError::MissingProgram(name))?
            .try_into()?;
        prog.load()?;
    }
    for name in PROGS_SOCKET {
        let prog: &mut CgroupSockAddr = ebpf
            .program_mut(name)
            .ok_or(EbpfError::MissingProgram(name))?
            .try_into()?;
        prog.load()?;
    }
    let mut stages = Vec::new();
    for (slot, name) in [
        (TAIL_NEW_FLOW, PROG_NEW_FLOW),
        (TAIL_REJECT, PROG_REJECT),
        (TAIL_ICMP_INGRESS, PROG_ICMP_INGRESS),
        (TAIL_ICMP_EGRESS, PROG_ICMP_EGRESS),
    ] {
        let prog: &SchedClassifier = ebpf
            .program(name)
            .ok_or(EbpfError::MissingProgram(name))?
            .try_into()?;
        let fd = prog
            .fd()?
            .try_clone()
            .map_err(|e| EbpfError::Io(PathBuf::from(name), e))?;
        stages.push((slot, fd));
    }
    let mut progs = ProgramArray::try_from(
        ebpf.map_mut(MAP_PROGS)
            .ok_or(EbpfError::MissingMap(MAP_PROGS))?,
    )?;
    for (slot, fd) in &stages {
        progs.set(*slot, fd, 0)?;
    }
    Ok(())
}

/// The backend-port bitmap as the kernel holds it (a word that cannot be
/// read counts as empty, and is written again when a port of it is set).
fn words_of(bitmap: &Array<MapData, u64>) -> Vec<u64> {
    (0..BACKEND_PORT_WORDS)
        .map(|word| bitmap.get(&word, 0).unwrap_or(0))
        .collect()
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, EbpfError> {
    ebpf.take_map(name).ok_or(EbpfError::MissingMap(name))
}

impl EbpfDataplane {
    fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, EbpfError> {
        let backend_ports = Array::try_from(take_map(ebpf, MAP_BACKEND_PORTS)?)?;
        Ok(Self {
            backend_port_words: words_of(&backend_ports),
            backend_ports,
            services: BpfHashMap::try_from(take_map(ebpf, MAP_SERVICES)?)?,
            backends: BpfHashMap::try_from(take_map(ebpf, MAP_BACKENDS)?)?,
            conntrack: BpfHashMap::try_from(take_map(ebpf, MAP_CONNTRACK)?)?,
            affinity: BpfHashMap::try_from(take_map(ebpf, MAP_AFFINITY)?)?,
            members: BpfHashMap::try_from(take_map(ebpf, MAP_MEMBERS)?)?,
            source_ranges: LpmTrie::try_from(take_map(ebpf, MAP_SOURCE_RANGES)?)?,
            node_addrs: BpfHashMap::try_from(take_map(ebpf, MAP_NODE_ADDRS)?)?,
            frontend_addrs: BpfHashMap::try_from(take_map(ebpf, MAP_FRONTEND_ADDRS)?)?,
            frontend_addresses: BTreeSet::new(),
            lingering: HashMap::new(),
            config: Array::try_from(take_map(ebpf, MAP_CONFIG)?)?,
            stats: PerCpuArray::try_from(take_map(ebpf, MAP_STATS)?)?,
            programmed: HashMap::new(),
            backend_ids: HashMap::new(),
            backend_alloc: IdAllocator::default(),
            svc_alloc: IdAllocator::default(),
            node_addresses: BTreeSet::new(),
            network: NodeNetwork::default(),
        })
    }

    /// Per-reason packet counters summed over CPUs, indexed like
    /// [`proxy_common::stat`].
    pub fn stats(&self) -> Result<[u64; stat::COUNT as usize], EbpfError> {
        counters::sum_over_cpus(&self.stats)
    }

    /// Number of connection-tracking entries (walks the map; for tests and
    /// diagnostics, not the hot path).
    pub fn conntrack_len(&self) -> usize {
        self.conntrack.keys().filter(|k| k.is_ok()).count()
    }

    /// The ports set in the kernel's backend-port bitmap (reads all of it;
    /// for tests and diagnostics).
    pub fn backend_ports_in_kernel(&self) -> BTreeSet<u16> {
        let mut ports = BTreeSet::new();
        for (word, value) in (0u16..).zip(words_of(&self.backend_ports)) {
            for bit in 0..64u16 {
                if value & (1 << bit) != 0 {
                    ports.insert(word * 64 + bit);
                }
            }
        }
        ports
    }

    /// Number of session-affinity entries (walks the map; for tests).
    pub fn affinity_len(&self) -> usize {
        self.affinity.keys().filter(|k| k.is_ok()).count()
    }

    fn acquire(&mut self, b: BackendRef, stats: &mut ApplyStats) -> Result<BackendId, EbpfError> {
        if let Some((id, refs)) = self.backend_ids.get_mut(&b) {
            *refs += 1;
            return Ok(*id);
        }
        let id = self
            .backend_alloc
            .alloc()
            .ok_or(EbpfError::BackendIdsExhausted)?;
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
            self.backend_alloc.release(id);
        }
        Ok(())
    }

    /// The entries a frontend's `plan` needs, given its views' IDs;
    /// acquires (and returns) a reference on every backend it uses.
    fn entries_for(
        &mut self,
        plan: &FrontendPlan,
        svc_ids: &[Option<u32>; 2],
        stats: &mut ApplyStats,
    ) -> Result<(Entries, Vec<BackendRef>), EbpfError> {
        let key = &plan.key;
        let mut entries = Entries::default();
        let mut refs = Vec::new();
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
            for (i, b) in backends.iter().enumerate() {
                let r = BackendRef {
                    ip: b.ip,
                    port: b.port,
                    protocol: key.protocol,
                };
                let id = self.acquire(r, stats)?;
                refs.push(r);
                entries.services.insert(
                    service_key(key, scope, i as u16 + 1),
                    ServiceValue {
                        backend_id: id,
                        ..Default::default()
                    },
                );
                if flags & SVC_AFFINITY != 0 {
                    entries.members.insert(MemberKey {
                        svc_id,
                        backend_id: id,
                    });
                }
            }
            entries.services.insert(
                service_key(key, scope, 0),
                ServiceValue {
                    count: backends.len() as u16,
                    flags,
                    affinity_timeout_secs: plan.affinity_timeout_secs.unwrap_or(0),
                    svc_id,
                    ..Default::default()
                },
            );
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
        Ok((entries, refs))
    }

    /// IDs for the views `frontend` needs, keeping those it already has.
    fn svc_ids_for(
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
                    None => Some(
                        self.svc_alloc
                            .alloc()
                            .ok_or(EbpfError::ServiceIdsExhausted)?,
                    ),
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
    fn write_entries(
        &mut self,
        old: &Entries,
        new: &Entries,
        stats: &mut ApplyStats,
    ) -> Result<(), EbpfError> {
        for m in new.members.difference(&old.members) {
            self.members.insert(*m, 1, 0)?;
            stats.map_writes += 1;
        }
        for r in new.ranges.difference(&old.ranges) {
            self.source_ranges.insert(&r.key(), 1, 0)?;
            stats.map_writes += 1;
        }
        for heads in [false, true] {
            for (k, v) in &new.services {
                if (k.slot == 0) == heads && old.services.get(k) != Some(v) {
                    self.services.insert(*k, *v, 0)?;
                    stats.map_writes += 1;
                }
            }
        }
        let mut stale: Vec<&ServiceKey> = old
            .services
            .keys()
            .filter(|k| !new.services.contains_key(k))
            .collect();
        stale.sort_by_key(|k| k.slot);
        for k in stale {
            remove_ignoring_missing(&mut self.services, k)?;
            stats.map_deletes += 1;
        }
        for r in old.ranges.difference(&new.ranges) {
            match self.source_ranges.remove(&r.key()) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(aya::maps::MapError::SyscallError(e))
                    if e.io_error.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
            stats.map_deletes += 1;
        }
        for m in old.members.difference(&new.members) {
            remove_ignoring_missing(&mut self.members, m)?;
            stats.map_deletes += 1;
        }
        Ok(())
    }

    /// Programs one frontend (new or changed), make-before-break.
    fn program_frontend(
        &mut self,
        key: &FrontendKey,
        frontend: &Frontend,
        stats: &mut ApplyStats,
    ) -> Result<(), EbpfError> {
        let old = self.programmed.remove(key).unwrap_or_default();
        let plan = plan(key, frontend, &self.network);
        let svc_ids = self.svc_ids_for(&plan, old.svc_ids)?;
        let (entries, backends) = self.entries_for(&plan, &svc_ids, stats)?;
        self.mark_backend_ports(&backends, stats)?;
        self.write_entries(&old.entries, &entries, stats)?;
        for b in &old.backends {
            self.release(b, stats)?;
        }
        self.programmed.insert(
            *key,
            Programmed {
                entries,
                backends,
                svc_ids,
                frontend: Some(frontend.clone()),
            },
        );
        Ok(())
    }

    fn remove_frontend(
        &mut self,
        key: &FrontendKey,
        stats: &mut ApplyStats,
    ) -> Result<(), EbpfError> {
        let Some(old) = self.programmed.remove(key) else {
            return Ok(());
        };
        self.write_entries(&old.entries, &Entries::default(), stats)?;
        for b in &old.backends {
            self.release(b, stats)?;
        }
        for id in old.svc_ids.into_iter().flatten() {
            self.svc_alloc.release(id);
        }
        Ok(())
    }

    /// Makes the maps hold exactly `desired`, whatever they held before (an
    /// earlier run's pinned state, or entries changed behind our back), and
    /// resets the shadow to match. Backend and frontend IDs already in the
    /// kernel are kept for the same backends and frontends, so existing
    /// flows and affinities are undisturbed.
    pub fn reconcile(&mut self, desired: &ServiceTable) -> Result<ApplyStats, EbpfError> {
        let mut stats = ApplyStats::default();
        let kernel_backends: BTreeMap<BackendId, BackendValue> =
            self.backends.iter().filter_map(Result::ok).collect();
        let kernel_services: HashMap<ServiceKey, ServiceValue> =
            self.services.iter().filter_map(Result::ok).collect();
        let kernel_members: HashSet<MemberKey> =
            self.members.keys().filter_map(Result::ok).collect();
        let kernel_ranges: HashSet<SourceRangeSlot> = self
            .source_ranges
            .keys()
            .filter_map(Result::ok)
            .map(|k| SourceRangeSlot {
                prefix_len: k.prefix_len(),
                data: k.data(),
            })
            .collect();

        // Adopt the IDs of backends already in the kernel.
        let mut by_value: HashMap<BackendValue, BackendId> = HashMap::new();
        for (id, v) in &kernel_backends {
            by_value.entry(*v).or_insert(*id);
        }
        let plans: Vec<(FrontendPlan, &Frontend)> = desired
            .iter()
            .map(|(key, fe)| (plan(key, fe, &self.network), fe))
            .collect();
        let mut wanted: BTreeMap<BackendRef, usize> = BTreeMap::new();
        for (plan, _) in &plans {
            let key = &plan.key;
            for (_, view) in scoped_views(plan) {
                for b in backends_of(view) {
                    let r = BackendRef {
                        ip: b.ip,
                        port: b.port,
                        protocol: key.protocol,
                    };
                    *wanted.entry(r).or_default() += 1;
                }
            }
        }
        // The bitmap as the kernel has it (an earlier run's bits, or drift),
        // then the desired ports set in it.
        self.backend_port_words = words_of(&self.backend_ports);
        self.mark_backend_ports(wanted.keys(), &mut stats)?;
        let mut used_backend_ids = BTreeSet::new();
        let mut adopted = HashMap::new();
        for b in wanted.keys() {
            if let Some(id) = by_value.get(&backend_value(b)) {
                used_backend_ids.insert(*id);
                adopted.insert(*b, *id);
            }
        }
        self.backend_alloc.reset(&used_backend_ids);
        self.backend_ids.clear();
        for (b, id) in adopted {
            // Counted up again as frontends take them below.
            self.backend_ids.insert(b, (id, 0));
        }
        // Adopt the IDs of frontend views from their kernel service entries.
        let mut used_svc_ids = BTreeSet::new();
        let mut current_ids: HashMap<FrontendKey, [Option<u32>; 2]> = HashMap::new();
        for (plan, _) in &plans {
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

        // Pretend the kernel's content is what we programmed, then program
        // the desired table over it: one diff writes what differs.
        self.programmed.clear();
        let kernel = Entries {
            services: kernel_services,
            members: kernel_members,
            ranges: kernel_ranges,
        };
        let mut all_new = Entries::default();
        let mut programmed = HashMap::new();
        for (plan, fe) in &plans {
            let key = &plan.key;
            let current = current_ids.get(key).copied().unwrap_or([None, None]);
            let svc_ids = self.svc_ids_for(plan, current)?;
            let (entries, backends) = self.entries_for(plan, &svc_ids, &mut stats)?;
            all_new
                .services
                .extend(entries.services.iter().map(|(k, v)| (*k, *v)));
            all_new.members.extend(entries.members.iter().copied());
            all_new.ranges.extend(entries.ranges.iter().copied());
            programmed.insert(
                *key,
                Programmed {
                    entries,
                    backends,
                    svc_ids,
                    frontend: Some((*fe).clone()),
                },
            );
        }
        // Adopted backends are in the kernel already and `acquire` wrote the
        // new ones; what is left is the service entries, then stale backends.
        self.write_entries(&kernel, &all_new, &mut stats)?;
        let in_use: BTreeSet<BackendId> = self.backend_ids.values().map(|(id, _)| *id).collect();
        for id in kernel_backends.keys().filter(|id| !in_use.contains(id)) {
            remove_ignoring_missing(&mut self.backends, id)?;
            stats.map_deletes += 1;
        }
        self.backend_alloc.reset(&in_use);
        self.programmed = programmed;
        stats.frontends_added = desired.len();
        // What is really in the filter: drift, or an earlier run's
        // addresses, which linger rather than go at once.
        let in_kernel = addresses_in(&self.frontend_addrs);
        self.sync_frontend_addrs(in_kernel, &mut stats)?;
        Ok(stats)
    }

    /// Sets the bits of the UDP and SCTP ports among `backends` in the
    /// backend-port bitmap (see [`proxy_common::MAP_BACKEND_PORTS`]). Bits
    /// are never cleared: flows to a port may outlive its last backend, and
    /// a stale bit costs the datapath one lookup, nothing else.
    fn mark_backend_ports<'a>(
        &mut self,
        backends: impl IntoIterator<Item = &'a BackendRef>,
        stats: &mut ApplyStats,
    ) -> Result<(), EbpfError> {
        for b in backends {
            if !matches!(b.protocol, Protocol::Udp | Protocol::Sctp) {
                continue;
            }
            let (word, bit) = (b.port >> 6, b.port & 63);
            let Some(value) = self.backend_port_words.get_mut(usize::from(word)) else {
                continue;
            };
            if *value & (1 << bit) == 0 {
                *value |= 1 << bit;
                self.backend_ports.set(u32::from(word), *value, 0)?;
                stats.map_writes += 1;
            }
        }
        Ok(())
    }

    /// Makes the frontend-address filter, which holds `in_kernel`, hold
    /// every address of a programmed frontend, and those that lost their
    /// last frontend less than [`FRONTEND_ADDR_LINGER`] ago. NodePorts (the
    /// unspecified address) are served through the node-addresses map
    /// instead.
    fn sync_frontend_addrs(
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
            stats.map_writes += 1;
        }
        for ip in in_kernel.difference(&wanted) {
            remove_ignoring_missing(&mut self.frontend_addrs, &node_addr_key(*ip))?;
            stats.map_deletes += 1;
        }
        self.frontend_addresses = wanted;
        Ok(())
    }

    /// Programs the node's NodePort addresses and masquerade settings.
    pub fn set_node_network(&mut self, network: &NodeNetwork) -> Result<(), EbpfError> {
        let ephemeral = std::fs::read_to_string(EPHEMERAL_PORTS_SYSCTL)
            .ok()
            .and_then(|text| parse_port_range(&text));
        let [(low_min, low_max), (high_min, high_max)] = snat_port_ranges(ephemeral);
        let mut cfg = NodeConfig {
            snat_port_min: high_min,
            snat_port_max: high_max,
            snat_low_min: low_min,
            snat_low_max: low_max,
            ..Default::default()
        };
        if let Some(v4) = network.snat_v4 {
            cfg.snat_v4 = addr_of(IpAddr::V4(v4)).0;
            cfg.flags |= CFG_SNAT_V4;
        }
        if let Some(v6) = network.snat_v6 {
            cfg.snat_v6 = addr_of(IpAddr::V6(v6)).0;
            cfg.flags |= CFG_SNAT_V6;
        }
        for cidr in &network.cluster_cidrs {
            let (addr, family) = addr_of(cidr.network());
            if family == FAMILY_V4 {
                cfg.cluster_v4 = addr;
                cfg.cluster_v4_len = cidr.prefix_len();
                cfg.flags |= CFG_CLUSTER_V4;
            } else {
                cfg.cluster_v6 = addr;
                cfg.cluster_v6_len = cidr.prefix_len();
                cfg.flags |= CFG_CLUSTER_V6;
            }
        }
        if network.masquerade_all {
            cfg.flags |= CFG_MASQUERADE_ALL;
        }
        self.config.set(0, cfg, 0)?;
        // Addresses: add the new ones, then remove the old ones.
        let kernel = addresses_in(&self.node_addrs);
        for ip in network.nodeport_addresses.difference(&kernel) {
            self.node_addrs.insert(node_addr_key(*ip), 1, 0)?;
        }
        for ip in kernel.difference(&network.nodeport_addresses) {
            remove_ignoring_missing(&mut self.node_addrs, &node_addr_key(*ip))?;
        }
        self.node_addresses = network.nodeport_addresses.clone();
        let replan = self.network.changes_plans(network);
        self.network = network.clone();
        if replan {
            self.replan()?;
        }
        Ok(())
    }

    /// Programs every frontend again under the current node network.
    fn replan(&mut self) -> Result<(), EbpfError> {
        let frontends: Vec<(FrontendKey, Frontend)> = self
            .programmed
            .iter()
            .filter_map(|(key, p)| p.frontend.clone().map(|f| (*key, f)))
            .collect();
        let mut stats = ApplyStats::default();
        for (key, frontend) in &frontends {
            self.program_frontend(key, frontend, &mut stats)?;
        }
        Ok(())
    }

    fn apply_diff(&mut self, diff: &TableDiff) -> Result<ApplyStats, EbpfError> {
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
        let stale = self.at_node_addresses(stale_udp_flows(diff));
        if !stale.is_empty() {
            stats.conntrack_deletes += self.forget_udp_flows(&stale)?;
        }
        let written = self.frontend_addresses.clone();
        self.sync_frontend_addrs(written, &mut stats)?;
        Ok(stats)
    }

    /// A NodePort frontend is keyed on the unspecified address, but its
    /// flows carry the node address the client sent to: stands every node
    /// address in for the unspecified one in `stale`.
    fn at_node_addresses(
        &self,
        mut stale: HashSet<(Addr, u16, Addr, u16)>,
    ) -> HashSet<(Addr, u16, Addr, u16)> {
        let unspecified: Vec<_> = stale
            .iter()
            .filter(|(vip, ..)| *vip == [0u8; 16])
            .copied()
            .collect();
        for (_, port, backend, backend_port) in unspecified {
            for ip in &self.node_addresses {
                stale.insert((addr_of(*ip).0, port, backend, backend_port));
            }
        }
        stale
    }

    /// Deletes the connection-tracking entries (every direction, masquerade
    /// legs included) of UDP flows of `stale` (frontend, backend) pairs. UDP
    /// has no end, so a client that keeps sending (DNS from one socket, say)
    /// would otherwise stick to a backend that is gone; without its entries
    /// its next datagram picks a live backend, as kube-proxy's conntrack
    /// flush achieves.
    fn forget_udp_flows(
        &mut self,
        stale: &HashSet<(Addr, u16, Addr, u16)>,
    ) -> Result<usize, EbpfError> {
        // Walks the whole table, but only when a UDP backend went away.
        let udp = Protocol::Udp.number();
        let all: Vec<(CtKey, CtValue)> = self
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| k.proto == udp)
            .collect();
        let mut doomed: HashSet<CtKey> = HashSet::new();
        let mut snat_out: HashSet<CtKey> = HashSet::new();
        for (k, v) in &all {
            let hit = match k.dir {
                // Client -> VIP; the value holds the backend.
                CT_FORWARD => stale.contains(&(k.dst, k.dport, v.nat_addr, v.nat_port)),
                // Backend -> client; the value holds the VIP.
                CT_REPLY => stale.contains(&(v.nat_addr, v.nat_port, k.src, k.sport)),
                _ => false,
            };
            if hit {
                doomed.insert(*k);
                if k.dir == CT_FORWARD && v.flags & CT_FLAG_SNAT != 0 {
                    snat_out.insert(CtKey {
                        src: k.src,
                        dst: v.nat_addr,
                        sport: k.sport,
                        dport: v.nat_port,
                        dir: CT_SNAT_OUT,
                        ..*k
                    });
                }
            }
        }
        // The masquerade legs: client -> backend at egress, and the node
        // port it was given at ingress.
        for (k, v) in &all {
            if k.dir == CT_SNAT_OUT && snat_out.contains(k) {
                doomed.insert(*k);
                doomed.insert(CtKey {
                    src: k.dst,
                    dst: v.nat_addr,
                    sport: k.dport,
                    dport: v.nat_port,
                    dir: CT_SNAT_IN,
                    ..*k
                });
            }
        }
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

/// The node's own ephemeral ports (this network namespace's).
const EPHEMERAL_PORTS_SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_port_range";
/// The default NodePort range's first port; masquerade ports stay below it.
const NODE_PORT_RANGE_MIN: u16 = 30_000;

/// `"32768\t60999\n"` -> (32768, 60999).
fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut parts = text.split_whitespace().map(str::parse::<u16>);
    let (low, high) = (parts.next()?.ok()?, parts.next()?.ok()?);
    (low <= high).then_some((low, high))
}

/// The masquerade port ranges `[low, high]` (inclusive; `(0, 0)` is
/// empty): every port from 1024 up that is neither one of the node's
/// ephemeral ports (its own connections) nor in the NodePort range, as one
/// range below both and one above. Unknown ephemeral ports: Linux's
/// default. When nothing is left above, the default high range is kept so
/// that masquerade still works, at the risk of a rare collision.
fn snat_port_ranges(ephemeral: Option<(u16, u16)>) -> [(u16, u16); 2] {
    let (eph_min, eph_max) = ephemeral.unwrap_or((32_768, 60_999));
    let low_end = eph_min.min(NODE_PORT_RANGE_MIN);
    let low = if low_end > SNAT_LOW_PORT_MIN {
        (SNAT_LOW_PORT_MIN, low_end - 1)
    } else {
        (0, 0)
    };
    let high_start = eph_max.max(NODE_PORT_RANGE_MIN + 2_767).saturating_add(1);
    let high = if eph_max < u16::MAX && high_start > eph_max {
        (high_start, u16::MAX)
    } else {
        (SNAT_PORT_MIN, SNAT_PORT_MAX)
    };
    [low, high]
}

/// The addresses an address-keyed map (node or frontend addresses) holds.
fn addresses_in(map: &BpfHashMap<MapData, NodeAddrKey, u32>) -> BTreeSet<IpAddr> {
    map.keys()
        .filter_map(Result::ok)
        .filter_map(|k| match k.family {
            FAMILY_V4 => Some(IpAddr::V4(std::net::Ipv4Addr::new(
                k.addr[0], k.addr[1], k.addr[2], k.addr[3],
            ))),
            FAMILY_V6 => Some(IpAddr::V6(std::net::Ipv6Addr::from(k.addr))),
            _ => None,
        })
        .collect()
}

fn node_addr_key(ip: IpAddr) -> NodeAddrKey {
    let (addr, family) = addr_of(ip);
    NodeAddrKey {
        addr,
        family,
        _pad0: [0; 3],
    }
}

/// (VIP, port, backend, backend port), ports in network byte order, of the
/// UDP flows `diff` makes stale ([`TableDiff::stale_udp_flows`]).
fn stale_udp_flows(diff: &TableDiff) -> HashSet<(Addr, u16, Addr, u16)> {
    diff.stale_udp_flows()
        .into_iter()
        .map(|(key, b)| {
            let (vip, _) = addr_of(key.ip);
            let (addr, _) = addr_of(b.ip);
            (vip, key.port.to_be(), addr, b.port.to_be())
        })
        .collect()
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

impl Dataplane for EbpfDataplane {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn apply(&mut self, diff: &TableDiff) -> Result<ApplyStats, DataplaneError> {
        Ok(self.apply_diff(diff)?)
    }

    fn reconcile(&mut self, desired: &ServiceTable) -> Result<ApplyStats, DataplaneError> {
        Ok(EbpfDataplane::reconcile(self, desired)?)
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
        for (dir, is_link) in [
            (layout.links(), true),
            (layout.socket_links(), true),
            (layout.maps(), false),
        ] {
            let counter = if is_link {
                &mut report.links
            } else {
                &mut report.maps
            };
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

    #[test]
    fn masquerade_ports_avoid_ephemeral_and_node_ports() {
        for (ephemeral, want) in [
            // Linux's default: 1024-29999 and 61000-65535.
            (Some((32_768, 60_999)), [(1_024, 29_999), (61_000, 65_535)]),
            (None, [(1_024, 29_999), (61_000, 65_535)]),
            // A wide ephemeral range leaves less on each side.
            (Some((10_000, 64_999)), [(1_024, 9_999), (65_000, 65_535)]),
            // Ephemeral ports below the NodePorts: the high range starts
            // above the NodePorts.
            (Some((20_000, 25_000)), [(1_024, 19_999), (32_768, 65_535)]),
            // Nothing left: no low range, and the default high range.
            (Some((1_024, 65_535)), [(0, 0), (61_000, 65_535)]),
        ] {
            assert_eq!(snat_port_ranges(ephemeral), want, "{ephemeral:?}");
        }
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32_768, 60_999)));
        for bad in ["", "32768", "60999 32768", "a b", "1 70000"] {
            assert_eq!(parse_port_range(bad), None, "{bad:?}");
        }
    }
}
