//! The eBPF dataplane: loads the TC programs, pins their maps under
//! `--bpf-root`, and programs services into the maps.
//!
//! Map layout (see `proxy-common`): a service entry per frontend at slot 0
//! holding the backend count, slots `1..=n` holding backend IDs, backends in
//! their own map by ID. Updates are make-before-break: new backends and
//! slots are written before the count that exposes them, and surplus slots
//! and unused backends are removed after it.
//!
//! By concern: `encode` turns plans into map keys and values, `ids`
//! allocates backend and frontend-view IDs, `writer` programs frontends
//! make-before-break, `reconcile` makes the maps match a whole table,
//! `flows` forgets stale UDP flows, `network` programs the node's network.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, LpmTrie, MapData, PerCpuArray, ProgramArray},
    programs::{Program, SchedClassifier},
};
use proxy_common::{
    AffinityKey, AffinityValue, BACKEND_PORT_WORDS, BackendId, BackendValue, CtKey, CtValue,
    MAP_AFFINITY, MAP_BACKEND_PORTS, MAP_BACKENDS, MAP_CONFIG, MAP_CONNTRACK, MAP_FRONTEND_ADDRS,
    MAP_FRONTEND_FLOWS, MAP_MEMBERS, MAP_NODE_ADDRS, MAP_PROGS, MAP_SERVICE_CIDRS, MAP_SERVICES,
    MAP_SOCK_NETNS, MAP_SOCK_PODS, MAP_SOCK_REVNAT, MAP_SOURCE_RANGES, MAP_STATS,
    MAX_BACKENDS_PER_SERVICE, MemberKey, NodeAddrKey, NodeConfig, PROG_EGRESS, PROG_ICMP_EGRESS,
    PROG_ICMP_INGRESS, PROG_INGRESS, PROG_NEW_FLOW, PROG_REJECT, PROG_SOCK_RELEASE, PROGS_SOCKET,
    ServiceCidrKey, ServiceKey, ServiceValue, SockRevKey, SockRevValue, SourceRangeKey,
    TAIL_ICMP_EGRESS, TAIL_ICMP_INGRESS, TAIL_NEW_FLOW, TAIL_REJECT, stat,
};

use super::{ApplyStats, Dataplane, DataplaneError, NodeNetwork, ReconcileReport};
use crate::model::{FrontendKey, ServiceTable, TableDiff};

pub mod attach;
mod backends;
mod batch;
pub mod bpffs;
pub mod counters;
mod encode;
mod flows;
pub mod handover;
pub mod held;
mod ids;
mod network;
pub mod occupancy;
pub mod pods;
mod reconcile;
mod sockdiag;
pub mod sockets;
mod writer;

pub use attach::{Attacher, InterfaceFilter, follow_links};
use backends::BackendTable;
pub use bpffs::PinLayout;
use ids::IdAllocator;
use ipnet::IpNet;
use pods::{PodNamespaces, PodSockets};
use writer::Programmed;

/// The compiled eBPF object, embedded at build time by build.rs.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// The embedded eBPF object (for tests and benchmarks).
pub fn object() -> &'static [u8] {
    OBJECT
}

/// Every map is pinned, the program array too: its slots are cleared when
/// the last user reference to it goes, and the attached programs, which
/// outlive the agent, need them.
const PINNED_MAPS: [&str; 17] = [
    MAP_SERVICES,
    MAP_BACKENDS,
    MAP_CONNTRACK,
    MAP_AFFINITY,
    MAP_MEMBERS,
    MAP_SOURCE_RANGES,
    MAP_SERVICE_CIDRS,
    MAP_NODE_ADDRS,
    MAP_CONFIG,
    MAP_STATS,
    MAP_PROGS,
    MAP_SOCK_NETNS,
    MAP_SOCK_REVNAT,
    MAP_SOCK_PODS,
    MAP_FRONTEND_ADDRS,
    MAP_BACKEND_PORTS,
    MAP_FRONTEND_FLOWS,
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
#[derive(Clone, Debug, Default)]
pub struct EbpfOptions {
    pub bpf_root: PathBuf,
    pub interfaces: InterfaceFilter,
    /// The cgroup v2 directory the socket hooks attach to (the node's own
    /// processes below it reach services through them); `None`: no socket
    /// hooks.
    pub cgroup: Option<PathBuf>,
    /// Socket-level load balancing for this node's pods (through the same
    /// hooks, so only with a cgroup): the cluster CIDRs that tell a pod's
    /// namespace. `None`: pods keep the packet path.
    pub pod_socket_lb: Option<Vec<IpNet>>,
    /// The packet-mark bit (0-31) that the ingress program sets on what it
    /// translates, so that no later ingress hook translates it again;
    /// `None`: no mark (a packet may then be translated twice when a
    /// backend's address and port are another Service's frontend).
    pub translated_mark_bit: Option<u8>,
}

/// The maps, and a shadow of what this agent has written into them.
pub struct EbpfDataplane {
    services: BpfHashMap<MapData, ServiceKey, ServiceValue>,
    backends: BpfHashMap<MapData, BackendId, BackendValue>,
    conntrack: BpfHashMap<MapData, CtKey, CtValue>,
    affinity: BpfHashMap<MapData, AffinityKey, AffinityValue>,
    members: BpfHashMap<MapData, MemberKey, u32>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u32>,
    service_cidrs: LpmTrie<MapData, ServiceCidrKey, u32>,
    node_addrs: BpfHashMap<MapData, NodeAddrKey, u32>,
    config: Array<MapData, NodeConfig>,
    stats: PerCpuArray<MapData, u64>,
    /// Ordered: built whole by a reconcile, its nodes are full (a hash
    /// table keeps room for up to twice as many frontends as it holds).
    programmed: BTreeMap<FrontendKey, Programmed>,
    /// Every programmed backend, its ID and how many frontend views use it.
    backend_ids: BackendTable,
    /// Backends given an ID and not yet written: written together, before
    /// the entries that use them.
    pending_backends: Vec<(BackendId, BackendValue)>,
    backend_alloc: IdAllocator,
    svc_alloc: IdAllocator,
    /// The node addresses written to the node-addresses map.
    node_addresses: BTreeSet<IpAddr>,
    /// The node's network the frontends were planned under.
    network: NodeNetwork,
    frontend_addrs: BpfHashMap<MapData, NodeAddrKey, u32>,
    backend_ports: Array<MapData, u64>,
    /// New flows per frontend view (see `proxy_common::MAP_FRONTEND_FLOWS`):
    /// a view ID given out anew starts from zero.
    frontend_flows: Array<MapData, u64>,
    /// The words of the backend-port bitmap as written (see
    /// [`EbpfDataplane::mark_backend_ports`]).
    backend_port_words: Vec<u64>,
    /// The addresses written to the frontend-address filter (read back from
    /// the kernel only by a reconcile).
    frontend_addresses: BTreeSet<IpAddr>,
    /// Addresses no frontend has any more, kept in the frontend-address
    /// filter until the given time (see [`writer::FRONTEND_ADDR_LINGER`]).
    lingering: HashMap<IpAddr, std::time::Instant>,
    /// The programmed frontends of each address (NodePorts' unspecified
    /// address left out): a change that adds or removes a frontend
    /// updates the filter from these, without a walk of every frontend.
    address_refs: HashMap<IpAddr, u32>,
    /// Which socket the socket hooks gave which backend (read to end the
    /// connected UDP sockets of backends that went away).
    sock_revnat: BpfHashMap<MapData, SockRevKey, SockRevValue>,
    /// The pods whose sockets the hooks translate.
    pod_namespaces: PodNamespaces,
    /// The packet-mark bit of "translated at ingress" (`None`: not marked).
    translated_mark_bit: Option<u8>,
    /// Whether the shadow (`programmed`, `backend_ids`, the written
    /// addresses and ports) is what this agent last wrote in full: set by
    /// a complete reconcile, kept by every complete write after it. Only
    /// then can a periodic reconcile compare the kernel with it and skip
    /// the rest.
    shadow_trusted: bool,
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
    match mounted {
        Some(bpffs::Mounted { at, private: false }) => {
            tracing::info!(path = %at.display(), "mounted bpffs");
        }
        Some(bpffs::Mounted { at, private: true }) => tracing::warn!(
            path = %at.display(),
            "mounted bpffs in this process's own mount namespace (as under `ip netns exec`): \
             the pinned maps and programs go when the agent exits, and a restart starts from \
             an empty datapath; mount a bpffs at /sys/fs/bpf on the host to keep them"
        ),
        None => {}
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
    let mut pods_map = BpfHashMap::try_from(take_map(&mut ebpf, MAP_SOCK_PODS)?)?;
    let namespaces = PodNamespaces::default();
    let pods = match (&opts.cgroup, &opts.pod_socket_lb) {
        (Some(_), Some(cidrs)) => {
            Some(PodSockets::new(pods_map, cidrs.clone(), namespaces.clone()))
        }
        _ => {
            PodSockets::clear(&mut pods_map)?;
            None
        }
    };
    let mut dataplane = EbpfDataplane::from_ebpf(&mut ebpf)?;
    dataplane.pod_namespaces = namespaces;
    dataplane.translated_mark_bit = opts.translated_mark_bit;
    let copied = dataplane.copy_node_addresses_to_filter()?;
    if copied > 0 {
        tracing::info!(
            addresses = copied,
            "NodePort addresses of an earlier version put in the frontend-address filter"
        );
    }
    let moved = dataplane.move_old_masquerade_entries()?;
    if moved > 0 {
        tracing::info!(
            entries = moved,
            "masquerade entries of an earlier version moved"
        );
    }
    Ok((
        dataplane,
        Attacher::new(ebpf, layout, opts.interfaces.clone(), pods),
    ))
}

/// Loads the object without pinning anything, for packet-fixture tests and
/// benchmarks through `BPF_PROG_TEST_RUN`.
pub fn load_unpinned() -> Result<(EbpfDataplane, Ebpf), EbpfError> {
    load_unpinned_object(OBJECT)
}

/// [`load_unpinned`] for another build's object (of the same map layout):
/// the per-packet benchmark measures an earlier build beside this one.
pub fn load_unpinned_object(object: &[u8]) -> Result<(EbpfDataplane, Ebpf), EbpfError> {
    if object.is_empty() {
        return Err(EbpfError::NoObject);
    }
    let mut ebpf = EbpfLoader::new().load(object)?;
    load_programs(&mut ebpf)?;
    let dataplane = EbpfDataplane::from_ebpf(&mut ebpf)?;
    Ok((dataplane, ebpf))
}

/// Loads every program, and points the program array's slots at the
/// tail-called stages (replacing what an earlier run left there).
///
/// The kernel verifies each program as it loads (a second or two of CPU
/// for all of them), so they load on two threads, each program whole on
/// one.
fn load_programs(ebpf: &mut Ebpf) -> Result<(), EbpfError> {
    let wanted: Vec<&'static str> = [
        PROG_INGRESS,
        PROG_EGRESS,
        PROG_NEW_FLOW,
        PROG_REJECT,
        PROG_ICMP_INGRESS,
        PROG_ICMP_EGRESS,
        PROG_SOCK_RELEASE,
    ]
    .into_iter()
    .chain(PROGS_SOCKET)
    .collect();
    let programs: Vec<(&'static str, &mut Program)> = ebpf
        .programs_mut()
        .filter_map(|(name, program)| Some((*wanted.iter().find(|w| **w == name)?, program)))
        .collect();
    if let Some(missing) = wanted
        .iter()
        .find(|name| !programs.iter().any(|(have, _)| have == *name))
    {
        return Err(EbpfError::MissingProgram(missing));
    }
    // Verification time is nearly all in the three packet programs, and
    // pa_new_flow alone takes about as long as pa_ingress and pa_egress
    // together: it gets a thread of its own, the other two share one, and
    // the small programs go where the load is lighter.
    let (mut first, mut second): (Vec<_>, Vec<_>) = (Vec::new(), Vec::new());
    let mut small = 0usize;
    for program in programs {
        match program.0 {
            PROG_NEW_FLOW => first.push(program),
            PROG_INGRESS | PROG_EGRESS => second.push(program),
            _ => {
                small += 1;
                if small.is_multiple_of(2) {
                    first.push(program);
                } else {
                    second.push(program);
                }
            }
        }
    }
    // The large ones first on each thread, so neither waits on the other
    // for long at the end.
    first.sort_by_key(|(name, _)| *name != PROG_NEW_FLOW);
    second.sort_by_key(|(name, _)| !matches!(*name, PROG_INGRESS | PROG_EGRESS));
    std::thread::scope(|scope| {
        let other = scope.spawn(move || load_each(second));
        let here = load_each(first);
        let other = other
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        here.and(other)
    })?;
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
        let frontend_flows = Array::try_from(take_map(ebpf, MAP_FRONTEND_FLOWS)?)?;
        Ok(Self {
            backend_port_words: words_of(&backend_ports),
            backend_ports,
            frontend_flows,
            services: BpfHashMap::try_from(take_map(ebpf, MAP_SERVICES)?)?,
            backends: BpfHashMap::try_from(take_map(ebpf, MAP_BACKENDS)?)?,
            conntrack: BpfHashMap::try_from(take_map(ebpf, MAP_CONNTRACK)?)?,
            affinity: BpfHashMap::try_from(take_map(ebpf, MAP_AFFINITY)?)?,
            members: BpfHashMap::try_from(take_map(ebpf, MAP_MEMBERS)?)?,
            source_ranges: LpmTrie::try_from(take_map(ebpf, MAP_SOURCE_RANGES)?)?,
            service_cidrs: LpmTrie::try_from(take_map(ebpf, MAP_SERVICE_CIDRS)?)?,
            node_addrs: BpfHashMap::try_from(take_map(ebpf, MAP_NODE_ADDRS)?)?,
            frontend_addrs: BpfHashMap::try_from(take_map(ebpf, MAP_FRONTEND_ADDRS)?)?,
            sock_revnat: BpfHashMap::try_from(take_map(ebpf, MAP_SOCK_REVNAT)?)?,
            pod_namespaces: PodNamespaces::default(),
            translated_mark_bit: Some(proxy_common::TRANSLATED_MARK_BIT),
            frontend_addresses: BTreeSet::new(),
            lingering: HashMap::new(),
            address_refs: HashMap::new(),
            config: Array::try_from(take_map(ebpf, MAP_CONFIG)?)?,
            stats: PerCpuArray::try_from(take_map(ebpf, MAP_STATS)?)?,
            programmed: BTreeMap::new(),
            backend_ids: BackendTable::default(),
            pending_backends: Vec::new(),
            shadow_trusted: false,
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

    /// The kernel's ID of the services map (for tools and tests that
    /// open it beside the agent).
    pub fn services_map_id(&self) -> Option<u32> {
        use aya::maps::IterableMap;
        Some(self.services.map().info().ok()?.id())
    }

    /// Number of session-affinity entries (walks the map; for tests).
    pub fn affinity_len(&self) -> usize {
        self.affinity.keys().filter(|k| k.is_ok()).count()
    }
}

impl Dataplane for EbpfDataplane {
    fn name(&self) -> &'static str {
        "ebpf"
    }

    fn apply(&mut self, diff: &TableDiff) -> Result<ApplyStats, DataplaneError> {
        // A failure part-way leaves the shadow unsure: the next reconcile
        // does all of its work.
        self.shadow_trusted = false;
        let stats = self.apply_diff(diff)?;
        self.shadow_trusted = true;
        Ok(stats)
    }

    fn reconcile(&mut self, desired: &ServiceTable) -> Result<ReconcileReport, DataplaneError> {
        if self.shadow_trusted && self.holds_exactly(desired)? {
            // Nothing to repair; only lingering frontend addresses may be
            // due to go, which is no drift.
            let mut stats = ApplyStats::default();
            let written = self.frontend_addresses.clone();
            self.sync_frontend_addrs(written, &mut stats)?;
            return Ok(ReconcileReport { repaired: 0, stats });
        }
        self.shadow_trusted = false;
        let stats = self.reconcile_maps(desired)?;
        self.shadow_trusted = true;
        Ok(ReconcileReport::of_repairs(stats))
    }

    fn set_node_network(&mut self, network: &NodeNetwork) -> Result<(), DataplaneError> {
        let trusted = std::mem::replace(&mut self.shadow_trusted, false);
        self.program_node_network(network)?;
        self.shadow_trusted = trusted;
        Ok(())
    }
}

/// Loads each of `programs` (the kinds this agent has).
fn load_each(programs: Vec<(&'static str, &mut Program)>) -> Result<(), EbpfError> {
    for (name, program) in programs {
        let started = std::time::Instant::now();
        match program {
            Program::SchedClassifier(p) => p.load()?,
            Program::CgroupSockAddr(p) => p.load()?,
            Program::CgroupSock(p) => p.load()?,
            // The object defines each of these names with one kind.
            _ => return Err(EbpfError::MissingProgram(name)),
        }
        tracing::debug!(
            program = name,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "program loaded"
        );
    }
    Ok(())
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
