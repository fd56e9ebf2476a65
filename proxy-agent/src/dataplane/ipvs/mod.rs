//! The ipvs mode: kube-proxy's IPVS layout, rendered from the shared plan.
//! - One IPVS virtual server per frontend address (ClusterIP, external IP,
//!   LoadBalancer IP, and each NodePort address but loopback), real servers
//!   in masquerading forwarding with weight 1, persistence for session
//!   affinity; programmed over generic netlink ([`netlink`]).
//! - Every VIP bound on the dummy link `kube-ipvs0` ([`link`]).
//! - What IPVS cannot do in the nftables table `inet proxy-agent-ipvs`
//!   ([`table`]).
//! - Graceful termination as kube-proxy's: a TCP real server whose backend
//!   left gets weight 0 and is deleted once IPVS counts no connection on it;
//!   UDP and SCTP ones are deleted at once (and the UDP flows' conntrack
//!   entries, as in the other modes).
//!
//! The [`Driver`] keeps the shadow of what is programmed per frontend, as
//! for the other rule-writing modes.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

pub mod held;
pub mod link;
pub mod netlink;
pub mod render;
pub mod table;

use ipnet::IpNet;
use netlink::{IpvsError, IpvsSocket, RealServer, ServiceId, Timeouts, VirtualServer};
use render::{Element, IpvsFrontend, Server, hairpin_element};

use crate::{
    dataplane::{
        ApplyStats, DataplaneError,
        netfilter::{Driver, NodeNetwork, Planned, RuleBackend, Scope, Shadow, run_with_input},
    },
    model::FrontendKey,
};

/// kube-proxy's default scheduler.
pub const DEFAULT_SCHEDULER: &str = "rr";

/// What the ipvs mode is configured with: kube-proxy's `ipvs:` section and
/// its `--ipvs-*` flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IpvsOptions {
    /// `--ipvs-scheduler`, `ipvs.scheduler`.
    pub scheduler: String,
    /// `--ipvs-strict-arp`, `ipvs.strictARP`: the node answers ARP only for
    /// the addresses of the interface asked (`arp_ignore=1`,
    /// `arp_announce=2`), so the VIPs on `kube-ipvs0` are not announced
    /// (what MetalLB's L2 mode needs).
    pub strict_arp: bool,
    /// `--ipvs-tcp-timeout`, `--ipvs-tcpfin-timeout`, `--ipvs-udp-timeout`
    /// (`ipvs.tcpTimeout`, ...): IPVS's connection timeouts; unset leaves
    /// the kernel's.
    pub timeouts: Timeouts,
    /// `--ipvs-exclude-cidrs`, `ipvs.excludeCIDRs`: addresses where other
    /// IPVS users' virtual servers live; the mode deletes there only the
    /// ones it wrote itself.
    pub exclude_cidrs: Vec<IpNet>,
}

impl Default for IpvsOptions {
    fn default() -> Self {
        IpvsOptions {
            scheduler: DEFAULT_SCHEDULER.to_string(),
            strict_arp: false,
            timeouts: Timeouts::default(),
            exclude_cidrs: Vec::new(),
        }
    }
}

/// How long a drained TCP real server may keep connections before it is
/// deleted anyway (kube-proxy's graceful termination has no bound; a
/// connection idle for this long is not coming back through this node).
const MAX_DRAIN: Duration = Duration::from_secs(15 * 60);

/// The ipvs mode's failure.
#[derive(Debug, thiserror::Error)]
pub enum IpvsModeError {
    #[error(transparent)]
    Ipvs(#[from] IpvsError),
    #[error(transparent)]
    Link(#[from] link::LinkError),
    #[error("nft -f (table {table}): {0}", table = table::TABLE)]
    Nft(String),
    #[error("ipset: {0}")]
    Ipset(String),
    #[error("nft -j list table inet {table}: {0}", table = table::TABLE)]
    List(String),
}

impl From<IpvsModeError> for DataplaneError {
    fn from(e: IpvsModeError) -> Self {
        DataplaneError::Ipvs(e)
    }
}

pub type IpvsDataplane = Driver<Ipvs>;

/// Opens the mode: the IPVS netlink socket (loading `ip_vs` when the
/// kernel has it as a module), kube-proxy's sysctls and IPVS timeouts.
pub fn open(options: &IpvsOptions) -> Result<IpvsDataplane, IpvsModeError> {
    let mut socket = match IpvsSocket::open() {
        Err(IpvsError::NoIpvs) => {
            // kube-proxy loads the modules it needs the same way.
            let _ = std::process::Command::new("modprobe").arg("ip_vs").status();
            IpvsSocket::open()?
        }
        other => other?,
    };
    set_sysctls(options.strict_arp);
    // As kube-proxy: a kernel that refuses them still serves.
    if let Err(e) = socket.set_timeouts(&options.timeouts) {
        tracing::warn!(error = %e, "cannot set the IPVS timeouts");
    }
    Ok(Driver::with_rules(Ipvs {
        scheduler: options.scheduler.clone(),
        exclude_cidrs: options.exclude_cidrs.clone(),
        socket,
        bound: BTreeSet::new(),
        shared: RefCounts::default(),
        vips: RefCounts::default(),
        draining: BTreeMap::new(),
    }))
}

/// kube-proxy's IPVS sysctls: connections keep their conntrack entry (for
/// masquerade), and connections to a removed real server end at their next
/// packet instead of being dropped until they time out; with `strict_arp`,
/// ARP answered only for the interface's own addresses (never lowered back
/// when off, as kube-proxy). Failures are logged: a kernel without them
/// still serves.
fn set_sysctls(strict_arp: bool) {
    let mut sysctls = vec![
        ("net/ipv4/vs/conntrack", "1"),
        ("net/ipv4/vs/expire_nodest_conn", "1"),
        ("net/ipv4/vs/expire_quiescent_template", "1"),
    ];
    if strict_arp {
        sysctls.push(("net/ipv4/conf/all/arp_ignore", "1"));
        sysctls.push(("net/ipv4/conf/all/arp_announce", "2"));
    }
    for (name, value) in sysctls {
        let path = format!("/proc/sys/{name}");
        if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == value) {
            continue;
        }
        if let Err(e) = std::fs::write(&path, value) {
            tracing::warn!(sysctl = name, error = %e, "cannot set");
        }
    }
}

/// What the ipvs mode holds besides the shadow.
pub struct Ipvs {
    scheduler: String,
    /// Addresses where only the virtual servers we wrote are ours.
    exclude_cidrs: Vec<IpNet>,
    socket: IpvsSocket,
    /// The addresses bound on `kube-ipvs0`, as last read or written.
    bound: BTreeSet<IpAddr>,
    /// The elements of the sets frontends share (VIPs, hairpin backends),
    /// by how many programmed frontends need each: a change writes only
    /// the elements its frontends gain or lose, whatever the table's size.
    shared: RefCounts<Element>,
    /// The VIPs the programmed frontends need bound, by how many need each.
    vips: RefCounts<IpAddr>,
    /// TCP real servers given weight 0 when their backend left, and since
    /// when: deleted once IPVS counts no connection on them.
    draining: BTreeMap<(ServiceId, IpAddr, u16), Instant>,
}

/// What a reconcile read: the virtual servers of ours in the kernel.
pub struct Found {
    services: Vec<VirtualServer>,
}

fn nft(text: &str) -> Result<(), IpvsModeError> {
    if text.is_empty() {
        return Ok(());
    }
    let out = run_with_input("nft", &["-f", "-"], text.as_bytes())
        .map_err(|e| IpvsModeError::Nft(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(IpvsModeError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

fn table_exists() -> bool {
    std::process::Command::new("nft")
        .args(["list", "table", "inet", table::TABLE])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Virtual servers by id, from a shadow.
fn servers_of(shadow: &Shadow<IpvsFrontend>) -> BTreeMap<ServiceId, &Server> {
    shadow
        .values()
        .flat_map(|p| p.rendered.servers.iter())
        .map(|s| (s.virtual_server.id, s))
        .collect()
}

impl RuleBackend for Ipvs {
    const NAME: &'static str = "ipvs";
    type Rendered = IpvsFrontend;
    type Found = Found;
    type Error = IpvsModeError;

    fn render(&self, planned: &Planned<'_>, network: &NodeNetwork) -> IpvsFrontend {
        render::render(planned.plan, &self.scheduler, network)
    }

    fn ensure_base(&mut self, network: &NodeNetwork) -> Result<(), IpvsModeError> {
        link::ensure()?;
        nft(&table::base(network))
    }

    /// Writes the changed frontends in the order that never shows a client
    /// a half-made one: the set elements they gain and the VIPs first (a
    /// virtual server is reachable only with its masquerade and filter
    /// rules in place), then the virtual servers, then the elements they
    /// lose.
    fn write(
        &mut self,
        programmed: &mut Shadow<IpvsFrontend>,
        keys: &[FrontendKey],
        wanted: &Shadow<IpvsFrontend>,
        _network: &NodeNetwork,
        _scope: Scope,
    ) -> Result<(), IpvsModeError> {
        let mut remove: Vec<Element> = Vec::new();
        let mut add: Vec<Element> = Vec::new();
        for key in keys {
            let old = programmed.get(key).map(|p| &p.rendered);
            let new = wanted.get(key).map(|p| &p.rendered);
            let old_elements: BTreeSet<&Element> =
                old.iter().flat_map(|o| o.elements.iter()).collect();
            let new_elements: BTreeSet<&Element> =
                new.iter().flat_map(|n| n.elements.iter()).collect();
            remove.extend(old_elements.difference(&new_elements).map(|e| (*e).clone()));
            add.extend(new_elements.difference(&old_elements).map(|e| (*e).clone()));
        }
        let (mut gained, mut lost) = (Vec::new(), Vec::new());
        let (mut vips_gained, mut vips_lost) = (Vec::new(), Vec::new());
        for key in keys {
            if let Some(old) = programmed.get(key) {
                lost.extend(shared_of(&old.rendered));
                vips_lost.extend(old.rendered.vip);
            }
            if let Some(new) = wanted.get(key) {
                gained.extend(shared_of(&new.rendered));
                vips_gained.extend(new.rendered.vip);
            }
        }
        let (appeared, disappeared) = self.shared.change(gained, lost);
        let (bind, unbind) = self.vips.change(vips_gained, vips_lost);
        let mut text = table::elements("add", &add.iter().collect::<Vec<_>>());
        text.push_str(&table::elements(
            "add",
            &appeared.iter().collect::<Vec<_>>(),
        ));
        nft(&text)?;
        self.bind_changes(&bind, &unbind)?;
        for key in keys {
            let none = Vec::new();
            let old_servers = programmed.get(key).map_or(&none, |o| &o.rendered.servers);
            let new_servers = wanted.get(key).map_or(&none, |n| &n.rendered.servers);
            self.sync_servers(old_servers, new_servers)?;
            match wanted.get(key) {
                Some(p) => {
                    programmed.insert(*key, p.clone());
                }
                None => {
                    programmed.remove(key);
                }
            }
        }
        let mut text = table::elements("delete", &remove.iter().collect::<Vec<_>>());
        text.push_str(&table::elements(
            "delete",
            &disappeared.iter().collect::<Vec<_>>(),
        ));
        nft(&text)?;
        self.expire_drained()?;
        Ok(())
    }

    fn read_kernel(
        &mut self,
        programmed: &Shadow<IpvsFrontend>,
        wanted: &Shadow<IpvsFrontend>,
        network: &NodeNetwork,
        due: bool,
        stats: &mut ApplyStats,
    ) -> Result<Option<Found>, IpvsModeError> {
        let had_table = table_exists();
        self.ensure_base(network)?;
        self.bound = link::addresses()?;
        let all = self.socket.services()?;
        let kernel = self.ours(all, wanted, programmed, network);
        let in_kernel: BTreeMap<ServiceId, &VirtualServer> =
            kernel.iter().map(|vs| (vs.id, vs)).collect();
        let wanted_servers = servers_of(wanted);
        let programmed_servers = servers_of(programmed);
        let mut drift = !had_table;
        for (id, server) in &wanted_servers {
            match in_kernel.get(id) {
                None => stats.kernel_writes += 1,
                Some(vs) if !vs.same_config(&server.virtual_server) => {
                    stats.kernel_writes += 1;
                }
                Some(_) => {}
            }
        }
        for id in in_kernel.keys() {
            if !wanted_servers.contains_key(id) {
                stats.kernel_deletes += 1;
            }
        }
        // Drift: the kernel is not what we programmed.
        for (id, server) in &programmed_servers {
            match in_kernel.get(id) {
                Some(vs) if vs.same_config(&server.virtual_server) => {
                    let real = self.socket.real_servers(id)?;
                    if !same_real_servers(&real, &server.real_servers, id, &self.draining) {
                        drift = true;
                    }
                }
                _ => drift = true,
            }
        }
        if in_kernel.len() != programmed_servers.len() {
            drift = true;
        }
        let wanted_vips: BTreeSet<IpAddr> =
            wanted.values().filter_map(|p| p.rendered.vip).collect();
        if wanted_vips != self.bound {
            drift = true;
        }
        Ok((due || drift).then_some(Found { services: kernel }))
    }

    fn rewrite(
        &mut self,
        programmed: &mut Shadow<IpvsFrontend>,
        wanted: &Shadow<IpvsFrontend>,
        network: &NodeNetwork,
        found: Found,
    ) -> Result<(), IpvsModeError> {
        // The table and the VIPs first, as in `write`.
        let mut text = table::base(network);
        text.push_str(&table::flush_sets());
        let all: Vec<&Element> = wanted
            .values()
            .flat_map(|p| p.rendered.elements.iter())
            .collect();
        text.push_str(&table::elements("add", &all));
        self.shared = RefCounts::of(wanted.values().flat_map(|p| shared_of(&p.rendered)));
        text.push_str(&table::elements(
            "add",
            &self.shared.keys().collect::<Vec<_>>(),
        ));
        nft(&text)?;
        self.vips = RefCounts::of(wanted.values().filter_map(|p| p.rendered.vip));
        self.bind_all()?;
        let wanted_servers = servers_of(wanted);
        // Virtual servers nobody wants go; the others are brought in line
        // in place, so their connections are kept.
        for vs in &found.services {
            if !wanted_servers.contains_key(&vs.id) {
                self.socket.delete_service(&vs.id)?;
                self.draining.retain(|(id, ..), _| *id != vs.id);
            }
        }
        let existing: BTreeMap<ServiceId, &VirtualServer> =
            found.services.iter().map(|vs| (vs.id, vs)).collect();
        for (id, server) in &wanted_servers {
            match existing.get(id) {
                None => self.add_server(server)?,
                Some(vs) => {
                    if !vs.same_config(&server.virtual_server) {
                        self.socket.update_service(&server.virtual_server)?;
                    }
                    let real = self.socket.real_servers(id)?;
                    self.sync_real_servers(id, &real, &server.real_servers)?;
                }
            }
        }
        programmed.clone_from(wanted);
        self.expire_drained()?;
        Ok(())
    }

    fn write_node_network(
        &mut self,
        old: &NodeNetwork,
        network: &NodeNetwork,
    ) -> Result<bool, IpvsModeError> {
        if old.cluster_cidrs != network.cluster_cidrs {
            nft(&table::network_chains(network))?;
        }
        // NodePort virtual servers are rendered per node address.
        Ok(old.nodeport_addresses != network.nodeport_addresses)
    }
}

/// Whether the kernel's real servers `real` are `wanted` plus the ones
/// being drained.
fn same_real_servers(
    real: &[RealServer],
    wanted: &[RealServer],
    id: &ServiceId,
    draining: &BTreeMap<(ServiceId, IpAddr, u16), Instant>,
) -> bool {
    let live: BTreeSet<(IpAddr, u16, u32)> = real
        .iter()
        .filter(|r| !draining.contains_key(&(*id, r.addr, r.port)))
        .map(|r| (r.addr, r.port, r.weight))
        .collect();
    let want: BTreeSet<(IpAddr, u16, u32)> =
        wanted.iter().map(|r| (r.addr, r.port, r.weight)).collect();
    live == want
}

/// The elements a frontend may share with others: its VIP (the filter's
/// set), the backends that may be their own clients (hairpin).
fn shared_of(rendered: &IpvsFrontend) -> BTreeSet<Element> {
    let mut out = BTreeSet::new();
    if let Some(vip) = rendered.vip {
        out.insert(Element {
            set: "vips",
            family: crate::dataplane::netfilter::Family::of(vip),
            value: vip.to_string(),
        });
    }
    out.extend(rendered.backends.iter().map(hairpin_element));
    out
}

/// How many frontends need each shared thing (a VIP, a set element).
#[derive(Debug)]
struct RefCounts<T: Ord> {
    counts: BTreeMap<T, usize>,
}

impl<T: Ord> Default for RefCounts<T> {
    fn default() -> Self {
        RefCounts {
            counts: BTreeMap::new(),
        }
    }
}

impl<T: Ord + Clone> RefCounts<T> {
    /// One count per item.
    fn of(items: impl IntoIterator<Item = T>) -> Self {
        let mut out = RefCounts::default();
        for item in items {
            *out.counts.entry(item).or_default() += 1;
        }
        out
    }

    fn keys(&self) -> impl Iterator<Item = &T> {
        self.counts.keys()
    }

    /// Counts `gained` in and `lost` out (one per frontend each); returns
    /// what is needed now and was not before, and what was and is no more.
    /// A thing one frontend lost and another gained in the batch is in
    /// neither.
    fn change(&mut self, gained: Vec<T>, lost: Vec<T>) -> (Vec<T>, Vec<T>) {
        let touched: BTreeSet<T> = gained.iter().chain(&lost).cloned().collect();
        let before: BTreeSet<T> = touched
            .iter()
            .filter(|t| self.counts.contains_key(*t))
            .cloned()
            .collect();
        for item in gained {
            *self.counts.entry(item).or_default() += 1;
        }
        for item in lost {
            if let Some(count) = self.counts.get_mut(&item) {
                *count = count.saturating_sub(1);
                if *count == 0 {
                    self.counts.remove(&item);
                }
            }
        }
        let (mut appeared, mut disappeared) = (Vec::new(), Vec::new());
        for item in touched {
            match (before.contains(&item), self.counts.contains_key(&item)) {
                (false, true) => appeared.push(item),
                (true, false) => disappeared.push(item),
                _ => {}
            }
        }
        (appeared, disappeared)
    }
}

impl Ipvs {
    /// The virtual servers of the kernel that are ours: the ones we want or
    /// programmed, and (outside `excludeCIDRs`, other IPVS users' space)
    /// any on a VIP bound on `kube-ipvs0` or on a NodePort address with a
    /// port of the NodePort range (an earlier run's).
    fn ours(
        &self,
        kernel: Vec<VirtualServer>,
        wanted: &Shadow<IpvsFrontend>,
        programmed: &Shadow<IpvsFrontend>,
        network: &NodeNetwork,
    ) -> Vec<VirtualServer> {
        let ids: BTreeSet<ServiceId> = [wanted, programmed]
            .into_iter()
            .flat_map(|shadow| servers_of(shadow).into_keys())
            .collect();
        let owner = Owner {
            ids: &ids,
            bound: &self.bound,
            nodeport_addresses: &network.nodeport_addresses,
            exclude_cidrs: &self.exclude_cidrs,
        };
        kernel.into_iter().filter(|vs| owner.owns(vs)).collect()
    }

    /// Binds `bind` on `kube-ipvs0` and unbinds `unbind`.
    fn bind_changes(&mut self, bind: &[IpAddr], unbind: &[IpAddr]) -> Result<(), IpvsModeError> {
        if let Err(e) = link::change(bind, unbind) {
            // An address bound or gone behind our back: what counts is
            // whether the link now holds what is wanted.
            self.bound = link::addresses()?;
            let want: BTreeSet<IpAddr> = self.vips.keys().copied().collect();
            if self.bound != want {
                return Err(e.into());
            }
            return Ok(());
        }
        self.bound.extend(bind.iter().copied());
        for addr in unbind {
            self.bound.remove(addr);
        }
        Ok(())
    }

    /// Binds every VIP the frontends need on `kube-ipvs0`, unbinds the rest.
    fn bind_all(&mut self) -> Result<(), IpvsModeError> {
        let want: BTreeSet<IpAddr> = self.vips.keys().copied().collect();
        let bind: Vec<IpAddr> = want.difference(&self.bound).copied().collect();
        let unbind: Vec<IpAddr> = self.bound.difference(&want).copied().collect();
        self.bind_changes(&bind, &unbind)
    }

    /// Adds a virtual server with its real servers.
    fn add_server(&mut self, server: &Server) -> Result<(), IpvsModeError> {
        let id = server.virtual_server.id;
        self.socket.add_service(&server.virtual_server)?;
        for rs in &server.real_servers {
            self.socket.add_real_server(&id, rs)?;
        }
        Ok(())
    }

    /// Takes the kernel's virtual servers of one frontend from `old` to
    /// `new`.
    fn sync_servers(&mut self, old: &[Server], new: &[Server]) -> Result<(), IpvsModeError> {
        let old_by: BTreeMap<ServiceId, &Server> =
            old.iter().map(|s| (s.virtual_server.id, s)).collect();
        let new_by: BTreeMap<ServiceId, &Server> =
            new.iter().map(|s| (s.virtual_server.id, s)).collect();
        for id in old_by.keys() {
            if !new_by.contains_key(id) {
                self.socket.delete_service(id)?;
                self.draining.retain(|(vs, ..), _| vs != id);
            }
        }
        for (id, server) in &new_by {
            match old_by.get(id) {
                None => self.add_server(server)?,
                Some(before) => {
                    if !before.virtual_server.same_config(&server.virtual_server) {
                        self.socket.update_service(&server.virtual_server)?;
                    }
                    self.sync_real_servers(id, &before.real_servers, &server.real_servers)?;
                }
            }
        }
        Ok(())
    }

    /// Takes virtual server `id`'s real servers from `old` to `new`, in the
    /// order [`real_server_steps`] gives.
    fn sync_real_servers(
        &mut self,
        id: &ServiceId,
        old: &[RealServer],
        new: &[RealServer],
    ) -> Result<(), IpvsModeError> {
        let tcp = i32::from(id.protocol) == libc::IPPROTO_TCP;
        let draining = |addr: IpAddr, port: u16| self.draining.contains_key(&(*id, addr, port));
        for step in real_server_steps(old, new, tcp, draining) {
            match step {
                RealServerStep::Add(rs) => self.socket.add_real_server(id, rs)?,
                RealServerStep::Set(rs) => {
                    self.draining.remove(&(*id, rs.addr, rs.port));
                    self.socket.update_real_server(id, rs)?;
                }
                RealServerStep::Drain(rs) => {
                    self.socket.update_real_server(
                        id,
                        &RealServer {
                            weight: 0,
                            ..rs.clone()
                        },
                    )?;
                    self.draining
                        .insert((*id, rs.addr, rs.port), Instant::now());
                }
                RealServerStep::Delete(rs) => {
                    self.socket.delete_real_server(id, rs.addr, rs.port)?
                }
            }
        }
        Ok(())
    }

    /// Deletes drained real servers that IPVS counts no connection on (or
    /// that drained for [`MAX_DRAIN`]).
    fn expire_drained(&mut self) -> Result<(), IpvsModeError> {
        if self.draining.is_empty() {
            return Ok(());
        }
        let services: BTreeSet<ServiceId> = self.draining.keys().map(|(id, ..)| *id).collect();
        for id in services {
            let real = match self.socket.real_servers(&id) {
                Ok(real) => real,
                Err(IpvsError::Kernel { .. }) => {
                    // The virtual server is gone, and its real servers with it.
                    self.draining.retain(|(vs, ..), _| *vs != id);
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let present: BTreeSet<(IpAddr, u16)> = real.iter().map(|r| (r.addr, r.port)).collect();
            for rs in real {
                let Some(since) = self.draining.get(&(id, rs.addr, rs.port)) else {
                    continue;
                };
                if rs.active_conns + rs.inactive_conns == 0 || since.elapsed() > MAX_DRAIN {
                    self.socket.delete_real_server(&id, rs.addr, rs.port)?;
                    self.draining.remove(&(id, rs.addr, rs.port));
                }
            }
            // Deleted behind our back: nothing left to drain.
            self.draining
                .retain(|(vs, addr, port), _| *vs != id || present.contains(&(*addr, *port)));
        }
        Ok(())
    }
}

/// One write to a virtual server's real servers.
#[derive(Debug, PartialEq, Eq)]
enum RealServerStep<'a> {
    Add(&'a RealServer),
    /// A new weight, or a draining one's weight back.
    Set(&'a RealServer),
    /// Weight 0: a TCP backend that left keeps its connections until they
    /// end (kube-proxy's graceful termination).
    Drain(&'a RealServer),
    Delete(&'a RealServer),
}

/// The writes that take a virtual server's real servers from `old` to
/// `new`, every gain before any loss: IPVS answers a new connection that
/// finds no real server of weight above 0 with ICMP port unreachable, so
/// removing first would refuse clients for the moment between two writes
/// of a change that replaces every backend. `draining` tells which of
/// `old`'s are already draining.
fn real_server_steps<'a>(
    old: &'a [RealServer],
    new: &'a [RealServer],
    tcp: bool,
    draining: impl Fn(IpAddr, u16) -> bool,
) -> Vec<RealServerStep<'a>> {
    let key = |r: &RealServer| (r.addr, r.port);
    let old_by: BTreeMap<(IpAddr, u16), &RealServer> = old.iter().map(|r| (key(r), r)).collect();
    let new_by: BTreeMap<(IpAddr, u16), &RealServer> = new.iter().map(|r| (key(r), r)).collect();
    let mut steps = Vec::new();
    for (k, rs) in &new_by {
        let was_draining = draining(k.0, k.1);
        match old_by.get(k) {
            None if !was_draining => steps.push(RealServerStep::Add(rs)),
            Some(before) if before.weight == rs.weight && !was_draining => {}
            _ => steps.push(RealServerStep::Set(rs)),
        }
    }
    for (k, rs) in &old_by {
        if new_by.contains_key(k) || draining(k.0, k.1) {
            continue;
        }
        steps.push(if tcp {
            RealServerStep::Drain(rs)
        } else {
            RealServerStep::Delete(rs)
        });
    }
    steps
}

/// Removes what the ipvs mode left: the companion table, the virtual
/// servers on `kube-ipvs0`'s addresses and on the node's NodePorts (only
/// when `kube-ipvs0` or the table shows the mode ran here: other IPVS
/// users of the node are left alone), and the link. Returns how many
/// objects went. A kernel without IPVS has nothing to remove.
pub fn cleanup() -> Result<usize, IpvsModeError> {
    let had_table = table_exists();
    let had_link = link::exists();
    if !had_table && !had_link {
        return Ok(0);
    }
    let mut removed = 0;
    let bound = link::addresses()?;
    match IpvsSocket::open() {
        Ok(mut socket) => {
            for vs in socket.services()? {
                if bound.contains(&vs.id.addr) || is_node_port(&vs) {
                    socket.delete_service(&vs.id)?;
                    removed += 1;
                }
            }
        }
        Err(IpvsError::NoIpvs) => {}
        Err(e) => return Err(e.into()),
    }
    if had_table {
        nft(&format!("delete table inet {}\n", table::TABLE))?;
        removed += 1;
    }
    if link::delete()? {
        removed += 1;
    }
    Ok(removed)
}

/// Destroys kube-proxy's `KUBE-*` ipsets (its IPVS mode's), when the
/// `ipset` tool is on the node; returns how many went. Sets still named by
/// a rule stay (the kernel refuses), and are reported.
pub fn destroy_kube_proxy_ipsets() -> Result<usize, IpvsModeError> {
    let Ok(out) = std::process::Command::new("ipset")
        .args(["list", "-n"])
        .output()
    else {
        return Ok(0);
    };
    if !out.status.success() {
        return Ok(0);
    }
    let mut destroyed = 0;
    for name in String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|n| n.starts_with("KUBE-"))
    {
        let status = std::process::Command::new("ipset")
            .args(["destroy", name])
            .output()
            .map_err(|e| IpvsModeError::Ipset(format!("destroy {name}: {e}")))?;
        if status.status.success() {
            destroyed += 1;
        } else {
            tracing::warn!(
                set = name,
                error = %String::from_utf8_lossy(&status.stderr).trim(),
                "cannot destroy kube-proxy's ipset"
            );
        }
    }
    Ok(destroyed)
}

/// What tells the mode's virtual servers from other IPVS users' ones.
struct Owner<'a> {
    /// Virtual servers wanted or programmed.
    ids: &'a BTreeSet<ServiceId>,
    /// The addresses on `kube-ipvs0`.
    bound: &'a BTreeSet<IpAddr>,
    nodeport_addresses: &'a BTreeSet<IpAddr>,
    exclude_cidrs: &'a [IpNet],
}

impl Owner<'_> {
    fn owns(&self, vs: &VirtualServer) -> bool {
        let addr = vs.id.addr;
        // What we wrote is ours wherever it is; excludeCIDRs guard only
        // what we may have left before.
        self.ids.contains(&vs.id)
            || (!self.exclude_cidrs.iter().any(|net| net.contains(&addr))
                && (self.bound.contains(&addr)
                    || (self.nodeport_addresses.contains(&addr) && is_node_port(vs))))
    }
}

/// A virtual server on a local address and a port of the default NodePort
/// range (30000-32767): a NodePort of ours.
fn is_node_port(vs: &VirtualServer) -> bool {
    (30000..=32767).contains(&vs.id.port) && !vs.id.addr.is_loopback()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_things_appear_with_their_first_user_and_go_with_their_last() {
        let mut counts = RefCounts::of(["a", "b", "b"]);
        // One user of b leaves, c arrives.
        assert_eq!(counts.change(vec!["c"], vec!["b"]), (vec!["c"], vec![]));
        // b's last user leaves; a moves from one frontend to another.
        assert_eq!(
            counts.change(vec!["a"], vec!["b", "a"]),
            (vec![], vec!["b"])
        );
        assert_eq!(counts.keys().copied().collect::<Vec<_>>(), vec!["a", "c"]);
        // Losing what was never counted changes nothing.
        assert_eq!(counts.change(vec![], vec!["z"]), (vec![], vec![]));
    }

    #[test]
    fn real_servers_are_gained_before_any_is_lost() {
        let rs =
            |last: u8, weight: u32| RealServer::masq(IpAddr::from([10, 0, 0, last]), 80, weight);
        let (a, b, c) = (rs(1, 1), rs(2, 1), rs(3, 1));
        let none = |_: IpAddr, _: u16| false;
        // Every backend replaced: both gains come before the loss, for TCP
        // (drain) and the others (delete).
        let old = [a.clone()];
        let new = [b.clone(), c.clone()];
        assert_eq!(
            real_server_steps(&old, &new, true, none),
            vec![
                RealServerStep::Add(&b),
                RealServerStep::Add(&c),
                RealServerStep::Drain(&a)
            ]
        );
        assert_eq!(
            real_server_steps(&old, &new, false, none),
            vec![
                RealServerStep::Add(&b),
                RealServerStep::Add(&c),
                RealServerStep::Delete(&a)
            ]
        );
        // A draining backend that comes back gets its weight again (it is
        // still in the kernel), before the one that leaves drains; one
        // already draining is not drained again.
        let b_draining = |addr: IpAddr, _: u16| addr == b.addr;
        assert_eq!(
            real_server_steps(
                std::slice::from_ref(&a),
                std::slice::from_ref(&b),
                true,
                b_draining
            ),
            vec![RealServerStep::Set(&b), RealServerStep::Drain(&a)]
        );
        assert_eq!(
            real_server_steps(
                std::slice::from_ref(&a),
                std::slice::from_ref(&a),
                true,
                none
            ),
            vec![]
        );
        let heavier = rs(1, 5);
        assert_eq!(
            real_server_steps(
                &[a.clone(), c.clone()],
                std::slice::from_ref(&heavier),
                true,
                none
            ),
            vec![RealServerStep::Set(&heavier), RealServerStep::Drain(&c)]
        );
    }

    #[test]
    fn only_the_modes_virtual_servers_are_its_own_and_excluded_cidrs_never() {
        let vs = |addr: &str, port: u16| {
            VirtualServer::new(
                ServiceId {
                    protocol: 6,
                    addr: addr.parse().unwrap(),
                    port,
                },
                "rr",
                None,
            )
        };
        let programmed = vs("10.96.0.10", 80);
        let ids = BTreeSet::from([programmed.id]);
        let bound = BTreeSet::from(["10.96.0.11".parse().unwrap()]);
        let node: BTreeSet<IpAddr> = BTreeSet::from(["192.0.2.10".parse().unwrap()]);
        let exclude = ["10.96.0.8/29".parse().unwrap()];
        let owner = Owner {
            ids: &ids,
            bound: &bound,
            nodeport_addresses: &node,
            exclude_cidrs: &[],
        };
        assert!(owner.owns(&programmed));
        assert!(owner.owns(&vs("10.96.0.11", 443)), "a VIP on kube-ipvs0");
        assert!(owner.owns(&vs("192.0.2.10", 30080)), "an earlier NodePort");
        assert!(
            !owner.owns(&vs("192.0.2.10", 80)),
            "keepalived's server on the node's address"
        );
        assert!(
            !owner.owns(&vs("198.51.100.1", 30080)),
            "not a node address"
        );
        let owner = Owner {
            exclude_cidrs: &exclude,
            ..owner
        };
        assert!(owner.owns(&programmed), "written by us, even inside");
        assert!(!owner.owns(&vs("10.96.0.11", 443)), "inside excludeCIDRs");
        assert!(owner.owns(&vs("192.0.2.10", 30080)));
    }
}
