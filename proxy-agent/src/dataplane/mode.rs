//! The dataplane modes: the one type that the CLI, the config file, the
//! sync loop, `cleanup`, the tests and the benchmarks name a mode by. Each
//! mode is one module behind [`Mode::open`] and [`Mode::remove_leftovers`];
//! adding one is a module, a variant here, and a line in the suite's list.
use super::{
    Dataplane, DataplaneError, conntrack,
    ebpf::{self, EbpfOptions, attach::Attacher},
    iptables::{self, IptablesBackend, IptablesDataplane},
    ipvs,
    nftables::{self, NftablesDataplane},
};

/// A dataplane mode (`--mode`, the config file's `mode`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, clap::ValueEnum)]
pub enum Mode {
    /// TC programs (tcx) and cgroup socket hooks, maps pinned under --bpf-root.
    Ebpf,
    /// nftables rules in the tables `inet proxy-agent-0` to `-7`.
    Nftables,
    /// iptables rules (iptables-restore) in kube-proxy's KUBE-* chains.
    Iptables,
    /// IPVS virtual servers (kube-proxy's IPVS layout), VIPs on `kube-ipvs0`,
    /// and the nftables table `inet proxy-agent-ipvs`.
    Ipvs,
}

impl Mode {
    /// Every mode, in the order cleanup visits them.
    pub const ALL: [Mode; 4] = [Mode::Ebpf, Mode::Nftables, Mode::Iptables, Mode::Ipvs];

    /// The spelling of `--mode` and of the config file's `mode`.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Ebpf => "ebpf",
            Mode::Nftables => "nftables",
            Mode::Iptables => "iptables",
            Mode::Ipvs => "ipvs",
        }
    }

    /// The mode spelled `name`, as `--mode` and the config file take it.
    pub fn from_name(name: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == name)
    }

    /// kube-proxy's default `minSyncPeriod` for its rule-writing modes (1 s)
    /// holds for ours too; map writes cost too little to batch them.
    pub fn default_min_sync_period(self) -> std::time::Duration {
        match self {
            Mode::Ebpf => std::time::Duration::ZERO,
            _ => std::time::Duration::from_secs(1),
        }
    }

    /// Opens the mode's dataplane. A mode first removes what it left
    /// through another interface of its own (the iptables mode, through
    /// the other iptables backend).
    pub fn open(self, options: &ModeOptions) -> Result<Opened, DataplaneError> {
        match self {
            Mode::Ebpf => {
                let (dataplane, attacher) = ebpf::load(&options.ebpf)?;
                Ok(Opened {
                    dataplane: Box::new(dataplane),
                    attacher: Some(attacher),
                })
            }
            Mode::Nftables => Ok(Opened::of(NftablesDataplane::new())),
            Mode::Iptables => {
                let backend = options.iptables_backend.resolve();
                tracing::info!(backend = backend.name(), "iptables backend");
                let others: Vec<IptablesBackend> = IptablesBackend::ALL
                    .into_iter()
                    .filter(|b| *b != backend)
                    .collect();
                log_removed(self, iptables::cleanup_backends(&others).map(usize::from));
                Ok(Opened::of(IptablesDataplane::new(backend)))
            }
            Mode::Ipvs => Ok(Opened::of(
                ipvs::open(&options.ipvs).map_err(DataplaneError::Ipvs)?,
            )),
        }
    }

    /// Removes everything the mode programs, wherever it is (the iptables
    /// mode: through both backends; its chains are also a kube-proxy's).
    /// Returns how many objects (links, pinned maps, tables, chain sets)
    /// were removed; 0 when the mode left nothing.
    pub fn remove_leftovers(self, options: &ModeOptions) -> Result<usize, DataplaneError> {
        match self {
            Mode::Ebpf => {
                let report = ebpf::cleanup(&options.ebpf.bpf_root)?;
                Ok(report.links + report.maps)
            }
            Mode::Nftables => Ok(usize::from(nftables::cleanup()?)),
            Mode::Iptables => Ok(usize::from(iptables::cleanup_backends(
                &IptablesBackend::ALL,
            )?)),
            Mode::Ipvs => ipvs::cleanup().map_err(DataplaneError::Ipvs),
        }
    }

    /// Removes what every mode but this one left: two dataplanes
    /// translating the same packets would fight. Failures are logged: a
    /// leftover that cannot be removed does not stop this mode.
    pub fn remove_other_modes(self, options: &ModeOptions) {
        for other in Mode::ALL.into_iter().filter(|m| *m != self) {
            log_removed(other, other.remove_leftovers(options));
        }
    }

    /// Takes the node over from the other modes, once this one serves (its
    /// first complete sync): what cannot carry their established flows is
    /// removed now, the rest stays until [`Handover::flows_left`] is 0.
    ///
    /// - An ebpf mode's pins: its frontends go (new flows reach this
    ///   mode), its programs go on translating the flows they hold.
    /// - Another netfilter mode's rules, under a netfilter mode: removed;
    ///   conntrack keeps each flow's translation, and this mode's own NAT
    ///   chains keep netfilter's NAT hooks.
    /// - Netfilter modes' rules, under the ebpf mode: kept while conntrack
    ///   holds translated TCP connections to this mode's frontends (the
    ///   programs leave a connection whose SYN they never saw to the
    ///   kernel), since without NAT chains netfilter no longer translates
    ///   them. So is kube-proxy's state with `kube_proxy`
    ///   (`--cleanup-kube-proxy`; the netfilter modes remove it before
    ///   they open, as some of it has their own names).
    pub fn take_over(self, options: &ModeOptions, kube_proxy: bool) -> Handover {
        let mut kept = Vec::new();
        for other in Mode::ALL.into_iter().filter(|m| *m != self) {
            let keep = match (self, other) {
                (_, Mode::Ebpf) => match ebpf::handover::stop_new_flows(&options.ebpf.bpf_root) {
                    Ok(found) => found,
                    Err(e) => {
                        tracing::warn!(error = %e, "stopping new flows in the ebpf mode's maps");
                        false
                    }
                },
                (Mode::Ebpf, _) => true,
                _ => false,
            };
            if keep {
                kept.push(other);
            } else {
                log_removed(other, other.remove_leftovers(options));
            }
        }
        Handover {
            mode: self,
            kept,
            kube_proxy: kube_proxy && self == Mode::Ebpf,
            options: options.clone(),
        }
    }
}

/// The other modes' state that [`Mode::take_over`] kept for their
/// established flows.
#[derive(Debug)]
pub struct Handover {
    mode: Mode,
    kept: Vec<Mode>,
    /// kube-proxy's state is kept too, to be removed with the rest.
    kube_proxy: bool,
    options: ModeOptions,
}

impl Handover {
    /// The modes whose state is kept.
    pub fn kept(&self) -> &[Mode] {
        &self.kept
    }

    /// The established TCP flows the kept state still carries; what cannot
    /// be read counts as none (the state then goes).
    pub fn flows_left(&self) -> usize {
        if self.kept.is_empty() && !self.kube_proxy {
            return 0;
        }
        let bpf_root = &self.options.ebpf.bpf_root;
        let counted = if self.mode == Mode::Ebpf {
            ebpf::handover::tcp_frontends(bpf_root)
                .map_err(|e| e.to_string())
                .and_then(|frontends| {
                    conntrack::count_translated_tcp_flows(|ip, port| {
                        frontends.contains(&(ip, port))
                    })
                    .map_err(|e| e.to_string())
                })
        } else {
            ebpf::handover::live_tcp_flows(bpf_root).map_err(|e| e.to_string())
        };
        counted.unwrap_or_else(|error| {
            tracing::warn!(%error, "counting the flows an earlier mode carries");
            0
        })
    }

    /// Removes the kept state.
    pub fn finish(self) {
        for other in self.kept {
            log_removed(other, other.remove_leftovers(&self.options));
        }
        if self.kube_proxy {
            remove_kube_proxy_leftovers();
        }
    }
}

/// A behaviour in which the modes differ. Every difference between modes is
/// one of these, decided here with its reason ([`Mode::cannot`]) and
/// listed in the README; the scenario suite checks each mode against it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Behaviour {
    /// A pod reaches its own Service over a Linux bridge whose port has no
    /// `hairpin_mode`.
    HairpinWithoutHairpinMode,
    /// NodePorts served on `::1` when `--nodeport-addresses` names it.
    Ipv6LocalhostNodePorts,
    /// Node processes outside the agent's cgroup reach Services.
    NodeProcessesOutsideTheAgentCgroup,
    /// A node process's connect to a Service that will not serve it fails
    /// at once with "connection refused" instead of timing out.
    RefusesNodeConnectsAtOnce,
    /// New connections to an address of a ServiceCIDR that no Service
    /// holds are dropped, and to a port of a ClusterIP that no Service has
    /// refused (kube-proxy's nftables mode).
    ChecksServiceCidrs,
    /// A pod's connected UDP socket whose backend leaves is moved to a live
    /// backend in place (its next datagram is answered), not ended.
    PodUdpSocketsMoveInPlace,
    /// A client that reuses the source port of a closed connection through
    /// a Service for a connection straight to the backend is answered.
    ClientPortReusedStraightToTheBackend,
    /// NodePorts served on `127.0.0.1` when `--nodeport-addresses` names it.
    LocalhostNodePorts,
    /// Pods and the node reaching an external frontend with the Local
    /// policy are served by every endpoint of the cluster, even when the
    /// node has a local one (kube-proxy's short-circuit).
    ExternalLocalShortCircuitToEveryEndpoint,
    /// A `ClientIP` affinity ends `timeoutSeconds` after the client's last
    /// packet, even while its closed connections linger in TIME_WAIT.
    AffinityEndsAfterTheLastPacket,
    /// A Service's external IP and port equal to another Service's backend
    /// (a pod's address, or the node's for a host-network endpoint) leaves
    /// that other Service working.
    FrontendOnABackendsAddress,
}

impl Mode {
    /// Why this mode cannot do `behaviour`, if it cannot.
    pub fn cannot(self, behaviour: Behaviour) -> Option<&'static str> {
        use Behaviour::*;
        let netfilter = matches!(self, Mode::Nftables | Mode::Iptables | Mode::Ipvs);
        match behaviour {
            HairpinWithoutHairpinMode if netfilter => Some(
                "with br_netfilter on (bridge-nf-call-iptables=1, the kernel's default), netfilter \
                 DNATs a pod's frame to its own service inside the bridge, which cannot send it \
                 back out of the port it came from without hairpin_mode (kube-proxy's documented \
                 requirement)",
            ),
            Ipv6LocalhostNodePorts if netfilter => Some(
                "a DNATed packet with source ::1 cannot leave the node (IPv6 has no \
                 route_localnet); kube-proxy serves localhost NodePorts on IPv4 only",
            ),
            NodeProcessesOutsideTheAgentCgroup if self == Mode::Ebpf => Some(
                "the node's own connections are translated by cgroup socket hooks attached to \
                 the agent's cgroup (the node's root cgroup in a DaemonSet); their packets never \
                 cross a hook of a pod interface",
            ),
            ChecksServiceCidrs if matches!(self, Mode::Iptables | Mode::Ipvs) => Some(
                "kube-proxy's iptables and IPVS modes do not check ServiceCIDRs either: telling \
                 a ClusterIP from an unallocated address takes a set of every ClusterIP, which \
                 iptables has only through ipset",
            ),
            PodUdpSocketsMoveInPlace if self == Mode::Ebpf => Some(
                "with socket-level load balancing (--socket-lb, the default) a pod's connected \
                 UDP socket is connected to the backend itself, and no flow entry stands between \
                 to move it: the agent ends the socket (SOCK_DESTROY, as Cilium does), so its \
                 next send fails once and a new socket reaches a live backend; with \
                 --socket-lb=false pods keep the packet path, which moves it in place",
            ),
            ClientPortReusedStraightToTheBackend if self == Mode::Ipvs => Some(
                "IPVS keeps a closed connection in its own connection table (TIME_WAIT, two \
                 minutes) and rewrites the backend's reply to a new connection on the same \
                 tuple as the VIP's, so the client's direct connection gets an answer from the \
                 wrong address; kube-proxy's IPVS mode behaves the same",
            ),
            LocalhostNodePorts if self == Mode::Ipvs => Some(
                "kube-proxy's IPVS mode never serves NodePorts on loopback: a virtual server on \
                 127.0.0.1 would send the backend a packet with a loopback source",
            ),
            ExternalLocalShortCircuitToEveryEndpoint if self == Mode::Ipvs => Some(
                "IPVS has one set of real servers per virtual server, which every client of the \
                 address shares: with a local endpoint it holds the local endpoints only, so pods \
                 and the node reach those (without one, the cluster-wide endpoints, for pods and \
                 the node only); kube-proxy's IPVS mode behaves the same",
            ),
            AffinityEndsAfterTheLastPacket if self == Mode::Ipvs => Some(
                "IPVS persistence keeps a client's template while any connection it scheduled \
                 is in IPVS's connection table, closed ones for two minutes in TIME_WAIT (a \
                 timeout the IPVS API does not set), so a client that comes back within two \
                 minutes of its last connection keeps its backend however short the timeout; \
                 kube-proxy's IPVS mode behaves the same",
            ),
            FrontendOnABackendsAddress if self == Mode::Ipvs => Some(
                "IPVS serves only addresses the node holds: the external IP is bound on \
                 kube-ipvs0, so a pod's address there becomes one of the node's own and the \
                 traffic of the Service whose backend the pod is gets delivered to the node; \
                 kube-proxy's IPVS mode binds external IPs the same way",
            ),
            RefusesNodeConnectsAtOnce if netfilter => Some(
                "netfilter drops or rejects the connection's first packet, as kube-proxy does; \
                 only a socket hook can fail the connect() call itself",
            ),
            _ => None,
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn log_removed<E: std::fmt::Display>(mode: Mode, removed: Result<usize, E>) {
    match removed {
        Ok(0) => {}
        Ok(objects) => tracing::info!(mode = mode.name(), objects, "removed what the mode left"),
        Err(e) => tracing::warn!(mode = mode.name(), error = %e, "removing what the mode left"),
    }
}

/// The iptables interface the iptables mode writes through.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum IptablesBackendChoice {
    /// The one the node already uses (kubelet's marker chains, else the
    /// one with more rules), as Kubernetes' iptables wrapper decides.
    #[default]
    Auto,
    /// iptables-nft.
    Nft,
    /// iptables-legacy.
    Legacy,
}

impl IptablesBackendChoice {
    pub fn resolve(self) -> IptablesBackend {
        match self {
            IptablesBackendChoice::Auto => IptablesBackend::detect(),
            IptablesBackendChoice::Nft => IptablesBackend::Nft,
            IptablesBackendChoice::Legacy => IptablesBackend::Legacy,
        }
    }
}

/// What opening or cleaning up a mode needs, whichever the mode.
#[derive(Clone, Debug, Default)]
pub struct ModeOptions {
    /// Where the ebpf mode pins its maps and links, the interfaces it
    /// attaches to, the cgroup of its socket hooks.
    pub ebpf: EbpfOptions,
    pub iptables_backend: IptablesBackendChoice,
    /// The ipvs mode's scheduler, timeouts, strict ARP, excluded CIDRs.
    pub ipvs: ipvs::IpvsOptions,
}

/// An opened mode: its dataplane and, for the ebpf mode, what attaches its
/// programs to the node's interfaces as they come and go.
pub struct Opened {
    pub dataplane: Box<dyn Dataplane>,
    pub attacher: Option<Attacher>,
}

impl Opened {
    fn of(dataplane: impl Dataplane + 'static) -> Opened {
        Opened {
            dataplane: Box::new(dataplane),
            attacher: None,
        }
    }
}

/// `--cleanup-kube-proxy`: kube-proxy's nftables tables and its KUBE-*
/// iptables chains (the iptables mode's chains are named as kube-proxy's).
/// Failures are logged, as for the other modes' leftovers.
pub fn remove_kube_proxy_leftovers() {
    match nftables::cleanup_kube_proxy() {
        Ok(0) => {}
        Ok(tables) => tracing::info!(tables, "removed kube-proxy's nftables tables"),
        Err(e) => tracing::warn!(error = %e, "removing kube-proxy's nftables tables"),
    }
    match iptables::cleanup_kube_proxy() {
        Ok(true) => tracing::info!("removed kube-proxy's KUBE-* iptables chains"),
        Ok(false) => {}
        Err(e) => tracing::warn!(error = %e, "removing kube-proxy's iptables chains"),
    }
    // Its IPVS state: kube-ipvs0 (the ipvs mode's link too), the virtual
    // servers on its addresses and NodePorts, then the ipsets no iptables
    // rule names any more.
    match ipvs::cleanup() {
        Ok(0) => {}
        Ok(objects) => tracing::info!(objects, "removed kube-proxy's IPVS state"),
        Err(e) => tracing::warn!(error = %e, "removing kube-proxy's IPVS state"),
    }
    match ipvs::destroy_kube_proxy_ipsets() {
        Ok(0) => {}
        Ok(sets) => tracing::info!(sets, "removed kube-proxy's KUBE-* ipsets"),
        Err(e) => tracing::warn!(error = %e, "removing kube-proxy's ipsets"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_difference_has_a_reason_and_no_behaviour_is_missing_everywhere() {
        use Behaviour::*;
        for behaviour in [
            HairpinWithoutHairpinMode,
            Ipv6LocalhostNodePorts,
            NodeProcessesOutsideTheAgentCgroup,
            RefusesNodeConnectsAtOnce,
            ChecksServiceCidrs,
            PodUdpSocketsMoveInPlace,
            ClientPortReusedStraightToTheBackend,
            LocalhostNodePorts,
        ] {
            let can: Vec<Mode> = Mode::ALL
                .into_iter()
                .filter(|m| m.cannot(behaviour).is_none())
                .collect();
            assert!(!can.is_empty(), "{behaviour:?}: no mode does it");
            for mode in Mode::ALL {
                if let Some(reason) = mode.cannot(behaviour) {
                    assert!(reason.len() > 40, "{mode} {behaviour:?}: say why");
                }
            }
        }
    }

    #[test]
    fn names_round_trip() {
        for mode in Mode::ALL {
            assert_eq!(Mode::from_name(mode.name()), Some(mode));
            assert_eq!(mode.to_string(), mode.name());
        }
        assert_eq!(Mode::from_name("userspace"), None);
    }
}
