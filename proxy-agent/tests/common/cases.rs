//! The packet cases: one table of named rows ([`cases`]), in the manner of
//! Katran's test fixtures. A row names a fixture setup (the service table
//! and node network it needs, [`Setup`]), the rows whose packets build the
//! state it needs first (`given`), the packet it sends, the hooks the
//! packet goes through with the verdict and the packet expected out of each
//! (the output of one hook is the input of the next), and the packet
//! counters and map sizes after.
//!
//! Packets and expectations are data: an address is a fixed one, the
//! row's client, or one the row's earlier packets found out (the backend a
//! flow went to, the masquerade address and port it was given); an
//! expected packet is checked whole, or by its addresses and ports with
//! every checksum verified ([`super::packet::parse`]).
//!
//! `datapath.rs` runs every row ([`run_all`]); the packet benchmark
//! (`proxy-bench packet`) measures rows of the same table by name
//! ([`Run`]), so every path it measures is a tested case.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    panic::{AssertUnwindSafe, catch_unwind},
    str::FromStr,
    sync::OnceLock,
    time::Duration,
};

use proxy_agent::{
    dataplane::NodeNetwork,
    model::{
        Backend, Frontend, FrontendKey, FrontendKind, FrontendPolicy, Protocol, ServiceName,
        ServiceTable,
    },
};
use proxy_common::{PROG_EGRESS, PROG_INGRESS, stat};

use super::{
    Fixture, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
    packet::{self, ETH_HLEN, IcmpKind, Icmpv4Type, Icmpv6Type, Tcp, icmpv4},
};

// ---------------------------------------------------------------------------
// Addresses (documentation and private ranges; nothing is ever sent).

/// The node's own address: NodePorts are served on it, masqueraded
/// traffic takes it as source.
pub const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 10);
/// An address of some other host, not one NodePorts are served on.
pub const OTHER_HOST: Ipv4Addr = Ipv4Addr::new(192, 168, 0, 11);
/// A client outside the cluster.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 5);
/// The cluster (pod) CIDR, a pod client inside it, and the backends.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
pub const POD_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 7);
pub const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 244, 1, 1),
    Ipv4Addr::new(10, 244, 1, 2),
    Ipv4Addr::new(10, 244, 1, 3),
];
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// A ClusterIP-like address no frontend has.
pub const OTHER_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// The ServiceCIDR of [`Setup::ServiceCidr`]: VIP and OTHER_VIP are in it.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";
pub const LB_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
/// A router between the node and a backend.
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 254);

pub const SVC_PORT: u16 = 80;
pub const NODE_PORT: u16 = 30080;
pub const TARGET_PORT: u16 = 8080;
pub const DNS_PORT: u16 = 53;
pub const DNS_TARGET_PORT: u16 = 5353;
pub const SCTP_SVC_PORT: u16 = 9000;
pub const SCTP_TARGET_PORT: u16 = 9999;

pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
pub const SCTP_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20);
pub const POD_CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 2, 0, 0, 0, 0, 7);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 5);
pub const BACKENDS6: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 1),
    Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 2),
    Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 3),
];
pub const NODE6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xa, 0, 0, 0, 0, 0x10);
pub const LB6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 0x20);
pub const CLUSTER_CIDR6: &str = "fd00:244::/32";

// ---------------------------------------------------------------------------
// Tables and node networks.

pub fn ip(addr: impl Into<IpAddr>) -> IpAddr {
    addr.into()
}

pub fn sa(addr: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(addr.into(), port)
}

pub fn key(addr: impl Into<IpAddr>, port: u16, protocol: Protocol) -> FrontendKey {
    FrontendKey {
        ip: addr.into(),
        port,
        protocol,
    }
}

/// The IPv4 NodePort frontend key: the unspecified address.
pub fn node_port_key(protocol: Protocol) -> FrontendKey {
    key(Ipv4Addr::UNSPECIFIED, NODE_PORT, protocol)
}

pub fn backends(ips: &[IpAddr], port: u16) -> Vec<Backend> {
    let mut out: Vec<Backend> = ips.iter().map(|&ip| Backend { ip, port }).collect();
    out.sort();
    out
}

pub fn v4s(ips: &[Ipv4Addr]) -> Vec<IpAddr> {
    ips.iter().map(|&a| IpAddr::V4(a)).collect()
}

pub fn backend_set() -> Vec<IpAddr> {
    v4s(&BACKENDS)
}

/// A frontend of `kind` over `ips` on `port`, Cluster policy, no affinity,
/// no source ranges.
pub fn frontend_on(kind: FrontendKind, ips: &[IpAddr], port: u16) -> Frontend {
    Frontend {
        service: ServiceName {
            namespace: "default".into(),
            name: "web".into(),
        },
        port_name: "http".into(),
        kind,
        backends: backends(ips, port),
        cluster_backends: Vec::new(),
        policy: FrontendPolicy::default(),
    }
}

/// [`frontend_on`] TARGET_PORT.
pub fn frontend(kind: FrontendKind, ips: &[IpAddr]) -> Frontend {
    frontend_on(kind, ips, TARGET_PORT)
}

/// A frontend with the `Local` traffic policy: `local` on this node,
/// `cluster` in the whole cluster.
pub fn local(kind: FrontendKind, local: &[IpAddr], cluster: &[IpAddr]) -> Frontend {
    Frontend {
        backends: backends(local, TARGET_PORT),
        cluster_backends: backends(cluster, TARGET_PORT),
        policy: FrontendPolicy {
            local_only: true,
            ..Default::default()
        },
        ..frontend(kind, &[])
    }
}

/// A ClusterIP with `sessionAffinity: ClientIP`.
pub fn with_affinity(ips: &[IpAddr], timeout_secs: u32) -> Frontend {
    Frontend {
        policy: FrontendPolicy {
            affinity_timeout_secs: Some(timeout_secs),
            ..Default::default()
        },
        ..frontend(FrontendKind::ClusterIp, ips)
    }
}

pub fn table(entries: impl IntoIterator<Item = (FrontendKey, Frontend)>) -> ServiceTable {
    let mut t = ServiceTable::new();
    for (k, f) in entries {
        t.insert(k, f);
    }
    t
}

/// A CIDR (of whatever type the field wants).
pub fn cidr<T: FromStr>(s: &str) -> T
where
    T::Err: fmt::Debug,
{
    s.parse().expect("a CIDR")
}

/// NodePorts on NODE, masquerade to NODE, the cluster CIDR set.
pub fn node_network() -> NodeNetwork {
    NodeNetwork {
        nodeport_addresses: BTreeSet::from([ip(NODE)]),
        snat_v4: Some(NODE),
        cluster_cidrs: vec![cidr(CLUSTER_CIDR)],
        ..Default::default()
    }
}

/// Whether `port` is one a masqueraded flow may get: from 1024 up, clear
/// of the NodePort range and of this namespace's ephemeral ports (read
/// here independently of the agent).
pub fn in_snat_range(port: u16) -> bool {
    static EPHEMERAL: OnceLock<(u16, u16)> = OnceLock::new();
    let &(eph_min, eph_max) = EPHEMERAL.get_or_init(|| {
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .expect("reading ip_local_port_range");
        let mut parts = text.split_whitespace().map(|p| p.parse::<u16>().unwrap());
        (parts.next().unwrap(), parts.next().unwrap())
    });
    port >= 1024 && !(30_000..=32_767).contains(&port) && !(eph_min..=eph_max).contains(&port)
}

/// The named fixture setups: what is programmed before a row's packets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    /// VIP:80/TCP over the three backends' TARGET_PORT and VIP:53/UDP
    /// over their DNS_TARGET_PORT; no node network.
    Web,
    /// Web, then VIP:80/TCP without endpoints (and no VIP:53).
    WebWithoutEndpoints,
    /// WebWithoutEndpoints, then an empty table.
    WebDeleted,
    /// NodePorts on NODE only, no masquerade address; a TCP NodePort over
    /// the three backends.
    NodePort,
    /// NodePort, then loopback added to the NodePort addresses.
    NodePortLoopbackAdded,
    /// NodePortLoopbackAdded, then NODE taken out of them.
    NodePortMovedToLoopback,
    /// The node network; a TCP NodePort whose only backend is BACKENDS[0].
    NodePortToOneBackend,
    /// The same with UDP.
    UdpNodePortToOneBackend,
    /// The node network; a TCP NodePort over the three backends.
    NodePortMasquerade,
    /// The node network; VIP:80/TCP over the three backends.
    ClusterIpMasquerade,
    /// ClusterIpMasquerade, then `--masquerade-all`.
    ClusterIpMasqueradeAll,
    /// The node network; a `Local` TCP NodePort whose local backend is
    /// BACKENDS[0], of the three in the cluster.
    LocalNodePort,
    /// The node network; a `Local` LoadBalancer LB_IP:80 and NodePort with
    /// no local backend, BACKENDS[1] and [2] elsewhere.
    LocalWithoutLocalBackend,
    /// The node network; VIP:80 with `internalTrafficPolicy: Local` and no
    /// local backend.
    InternalLocalWithoutLocalBackend,
    /// InternalLocalWithoutLocalBackend, then BACKENDS[2] local.
    InternalLocalWithLocalBackend,
    /// LB_IP:80 admitting 203.0.113.0/24 and 198.18.0.0/15, over the three
    /// backends; LB6:80 admitting 2001:db8:1::/48, over BACKENDS6[0].
    SourceRanges,
    /// VIP:80 with ClientIP affinity (10 800 s) over the three backends.
    ClientIpAffinity,
    /// VIP:53/UDP without endpoints.
    UdpWithoutEndpoints,
    /// VIP6:53/UDP without endpoints.
    Udp6WithoutEndpoints,
    /// VIP:53/UDP over BACKENDS[0]:DNS_TARGET_PORT.
    UdpToOneBackend,
    /// VIP6:80/TCP over BACKENDS6[0].
    ClusterIp6ToOneBackend,
    /// VIP6:80/TCP and VIP6:53/UDP over the three BACKENDS6.
    ClusterIp6,
    /// NodePorts on NODE6, masquerade to NODE6; an IPv6 UDP NodePort over
    /// BACKENDS6[0].
    NodePort6,
    /// VIP:9000/SCTP over the three backends' SCTP_TARGET_PORT.
    Sctp,
    /// SCTP_VIP6:9000/SCTP over BACKENDS6[0].
    Sctp6,
    /// The node network; VIP:80 whose only backend, BACKENDS[0], is the
    /// client.
    Hairpin,
    /// Web, with the node network and a ServiceCIDR holding VIP.
    ServiceCidr,
}

/// One step of a setup.
pub enum Step {
    Network(NodeNetwork),
    Table(ServiceTable),
}

impl Setup {
    pub fn steps(self) -> Vec<Step> {
        use FrontendKind as K;
        use Setup::*;
        use Step::{Network, Table};
        let web = || {
            table([
                (
                    key(VIP, SVC_PORT, Protocol::Tcp),
                    frontend(K::ClusterIp, &backend_set()),
                ),
                (
                    key(VIP, DNS_PORT, Protocol::Udp),
                    frontend_on(K::ClusterIp, &backend_set(), DNS_TARGET_PORT),
                ),
            ])
        };
        let without_endpoints = || {
            table([(
                key(VIP, SVC_PORT, Protocol::Tcp),
                frontend(K::ClusterIp, &[]),
            )])
        };
        let node_ports_on = |addresses: &[IpAddr]| NodeNetwork {
            nodeport_addresses: addresses.iter().copied().collect(),
            ..Default::default()
        };
        let node_port = || {
            table([(
                node_port_key(Protocol::Tcp),
                frontend(K::NodePort, &backend_set()),
            )])
        };
        let one_backend = |protocol| {
            table([(
                node_port_key(protocol),
                frontend(K::NodePort, &[ip(BACKENDS[0])]),
            )])
        };
        let vip_tcp = |f| table([(key(VIP, SVC_PORT, Protocol::Tcp), f)]);
        let internal_local = |ips: &[IpAddr]| vip_tcp(local(K::ClusterIp, ips, &backend_set()));
        let ranged = |ips: &[IpAddr], ranges: &[&str]| Frontend {
            policy: FrontendPolicy {
                source_ranges: ranges.iter().map(|r| cidr(r)).collect(),
                ..Default::default()
            },
            ..frontend(K::LoadBalancer, ips)
        };
        let v6 = |a: Ipv6Addr| [ip(a)];
        let (lo, node) = (ip(Ipv4Addr::LOCALHOST), ip(NODE));
        match self {
            Web => vec![Table(web())],
            WebWithoutEndpoints => vec![Table(web()), Table(without_endpoints())],
            WebDeleted => vec![
                Table(web()),
                Table(without_endpoints()),
                Table(ServiceTable::new()),
            ],
            NodePort => vec![Network(node_ports_on(&[node])), Table(node_port())],
            NodePortLoopbackAdded => vec![
                Network(node_ports_on(&[node])),
                Table(node_port()),
                Network(node_ports_on(&[node, lo])),
            ],
            NodePortMovedToLoopback => vec![
                Network(node_ports_on(&[node])),
                Table(node_port()),
                Network(node_ports_on(&[node, lo])),
                Network(node_ports_on(&[lo])),
            ],
            NodePortToOneBackend => {
                vec![Network(node_network()), Table(one_backend(Protocol::Tcp))]
            }
            UdpNodePortToOneBackend => {
                vec![Network(node_network()), Table(one_backend(Protocol::Udp))]
            }
            NodePortMasquerade => vec![Network(node_network()), Table(node_port())],
            ClusterIpMasquerade => vec![
                Network(node_network()),
                Table(vip_tcp(frontend(K::ClusterIp, &backend_set()))),
            ],
            ClusterIpMasqueradeAll => vec![
                Network(node_network()),
                Table(vip_tcp(frontend(K::ClusterIp, &backend_set()))),
                Network(NodeNetwork {
                    masquerade_all: true,
                    ..node_network()
                }),
            ],
            LocalNodePort => vec![
                Network(node_network()),
                Table(table([(
                    node_port_key(Protocol::Tcp),
                    local(K::NodePort, &[ip(BACKENDS[0])], &backend_set()),
                )])),
            ],
            LocalWithoutLocalBackend => {
                let remote = v4s(&BACKENDS[1..]);
                vec![
                    Network(node_network()),
                    Table(table([
                        (
                            key(LB_IP, SVC_PORT, Protocol::Tcp),
                            local(K::LoadBalancer, &[], &remote),
                        ),
                        (
                            node_port_key(Protocol::Tcp),
                            local(K::NodePort, &[], &remote),
                        ),
                    ])),
                ]
            }
            InternalLocalWithoutLocalBackend => {
                vec![Network(node_network()), Table(internal_local(&[]))]
            }
            InternalLocalWithLocalBackend => vec![
                Network(node_network()),
                Table(internal_local(&[])),
                Table(internal_local(&[ip(BACKENDS[2])])),
            ],
            SourceRanges => vec![Table(table([
                (
                    key(LB_IP, SVC_PORT, Protocol::Tcp),
                    ranged(&backend_set(), &["203.0.113.0/24", "198.18.0.0/15"]),
                ),
                (
                    key(LB6, SVC_PORT, Protocol::Tcp),
                    ranged(&v6(BACKENDS6[0]), &["2001:db8:1::/48"]),
                ),
            ]))],
            ClientIpAffinity => vec![Table(vip_tcp(with_affinity(&backend_set(), 10_800)))],
            UdpWithoutEndpoints => vec![Table(table([(
                key(VIP, DNS_PORT, Protocol::Udp),
                frontend(K::ClusterIp, &[]),
            )]))],
            Udp6WithoutEndpoints => vec![Table(table([(
                key(VIP6, DNS_PORT, Protocol::Udp),
                frontend(K::ClusterIp, &[]),
            )]))],
            UdpToOneBackend => vec![Table(table([(
                key(VIP, DNS_PORT, Protocol::Udp),
                frontend_on(K::ClusterIp, &[ip(BACKENDS[0])], DNS_TARGET_PORT),
            )]))],
            ClusterIp6ToOneBackend => vec![Table(table([(
                key(VIP6, SVC_PORT, Protocol::Tcp),
                frontend(K::ClusterIp, &v6(BACKENDS6[0])),
            )]))],
            ClusterIp6 => {
                let all: Vec<IpAddr> = BACKENDS6.iter().map(|&b| ip(b)).collect();
                vec![Table(table([
                    (
                        key(VIP6, SVC_PORT, Protocol::Tcp),
                        frontend(K::ClusterIp, &all),
                    ),
                    (
                        key(VIP6, DNS_PORT, Protocol::Udp),
                        frontend_on(K::ClusterIp, &all, DNS_TARGET_PORT),
                    ),
                ]))]
            }
            NodePort6 => vec![
                Network(NodeNetwork {
                    nodeport_addresses: BTreeSet::from([ip(NODE6)]),
                    snat_v6: Some(NODE6),
                    cluster_cidrs: vec![cidr(CLUSTER_CIDR6)],
                    ..Default::default()
                }),
                Table(table([(
                    key(Ipv6Addr::UNSPECIFIED, NODE_PORT, Protocol::Udp),
                    frontend(K::NodePort, &v6(BACKENDS6[0])),
                )])),
            ],
            Sctp => vec![Table(table([(
                key(VIP, SCTP_SVC_PORT, Protocol::Sctp),
                frontend_on(K::ClusterIp, &backend_set(), SCTP_TARGET_PORT),
            )]))],
            Sctp6 => vec![Table(table([(
                key(SCTP_VIP6, SCTP_SVC_PORT, Protocol::Sctp),
                frontend_on(K::ClusterIp, &v6(BACKENDS6[0]), SCTP_TARGET_PORT),
            )]))],
            Hairpin => vec![
                Network(node_network()),
                Table(vip_tcp(frontend(K::ClusterIp, &[ip(BACKENDS[0])]))),
            ],
            ServiceCidr => vec![
                Network(NodeNetwork {
                    service_cidrs: vec![cidr(SERVICE_CIDR)],
                    ..node_network()
                }),
                Table(web()),
            ],
        }
    }

    /// Programs the setup into `f`, step by step as the sync loop would,
    /// with the frontends of `extra` in every table (the benchmark's
    /// filler services; empty for the tests).
    pub fn apply(self, f: &mut Fixture, extra: &ServiceTable) {
        for step in self.steps() {
            match step {
                Step::Network(network) => f.set_network(&network),
                Step::Table(mut table) => {
                    for (k, frontend) in extra.iter() {
                        table.insert(*k, frontend.clone());
                    }
                    f.set_table(table);
                }
            }
        }
    }

    /// A freshly loaded object with this setup programmed.
    pub fn load(self) -> Fixture {
        let mut f = Fixture::load();
        self.apply(&mut f, &ServiceTable::new());
        f
    }

    /// Every backend address the setup's frontends may choose (under
    /// either traffic policy).
    fn backend_ips(self) -> BTreeSet<IpAddr> {
        let mut ips = BTreeSet::new();
        for step in self.steps() {
            if let Step::Table(t) = step {
                ips.clear();
                for (_, frontend) in t.iter() {
                    let all = frontend.backends.iter().chain(&frontend.cluster_backends);
                    ips.extend(all.map(|b| b.ip));
                }
            }
        }
        ips
    }

    /// The masquerade address of each family, as the last network says.
    fn snat(self) -> (Option<Ipv4Addr>, Option<Ipv6Addr>) {
        let mut snat = (None, None);
        for step in self.steps() {
            if let Step::Network(n) = step {
                snat = (n.snat_v4, n.snat_v6);
            }
        }
        snat
    }
}

// ---------------------------------------------------------------------------
// Rows.

/// An address and port in a row's packets and expectations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ep {
    At(SocketAddr),
    /// The row's client (a new one on every run of a varied row).
    Client,
    /// Expected: any backend of the setup on this port, remembered as the
    /// flow's backend. Not in a packet.
    AnyBackend(u16),
    /// The flow's backend on this port. Expected before any is known: as
    /// `AnyBackend`.
    Backend(u16),
    /// Expected: the setup's masquerade address of the family on a port
    /// masquerade may use, remembered as the flow's. Not in a packet.
    NewSnat,
    /// The flow's masquerade address and port. Expected before any is
    /// known: as `NewSnat`.
    Snat,
}

pub fn at(addr: impl Into<IpAddr>, port: u16) -> Ep {
    Ep::At(sa(addr, port))
}

/// A change to a built packet's bytes (for malformed packets).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edit {
    /// Cut the frame to this many bytes.
    Cut(usize),
    /// Set the byte at this offset.
    Set(usize, u8),
    /// Pad a frame of `from` bytes with zeros to `to` (as Ethernet pads).
    Pad { from: usize, to: usize },
}

/// A packet, as data.
#[derive(Clone, Debug)]
pub enum Pkt {
    Tcp(Ep, Ep, Tcp),
    Udp(Ep, Ep),
    /// Source, destination, verification tag, chunks.
    Sctp(Ep, Ep, u32, Vec<u8>),
    /// An ICMP error from the address of `src` to that of `dst`, quoting
    /// the first `quote` bytes after the Ethernet header of `about`.
    IcmpError {
        src: Ep,
        dst: Ep,
        kind: IcmpKind,
        about: Box<Pkt>,
        quote: usize,
    },
    Edited(Box<Pkt>, Vec<Edit>),
}

impl Pkt {
    pub fn tcp(src: Ep, dst: Ep, kind: Tcp) -> Pkt {
        Pkt::Tcp(src, dst, kind)
    }

    pub fn udp(src: Ep, dst: Ep) -> Pkt {
        Pkt::Udp(src, dst)
    }

    pub fn sctp(src: Ep, dst: Ep, vtag: u32, chunks: &[u8]) -> Pkt {
        Pkt::Sctp(src, dst, vtag, chunks.to_vec())
    }

    pub fn icmp_error(src: Ep, dst: Ep, kind: &IcmpKind, about: Pkt, quote: usize) -> Pkt {
        Pkt::IcmpError {
            src,
            dst,
            kind: kind.clone(),
            about: Box::new(about),
            quote,
        }
    }

    pub fn edit(self, edits: impl IntoIterator<Item = Edit>) -> Pkt {
        Pkt::Edited(Box::new(self), edits.into_iter().collect())
    }
}

/// What is expected out of a hook, besides its verdict.
#[derive(Clone, Debug)]
pub enum Out {
    /// The packet as it went in.
    Unchanged,
    /// Not looked at (a dropped packet).
    Ignored,
    /// A TCP, UDP or SCTP packet with every checksum right, from and to.
    Flow(Ep, Ep),
    /// The same, a UDP datagram over IPv4 whose checksum field is zero.
    FlowWithoutUdpChecksum(Ep, Ep),
    /// A TCP RST+ACK answering the input SYN (sequence 0, acknowledging
    /// it), from and to, back out of where it came (MACs swapped).
    Reset(Ep, Ep),
    /// The ICMP or ICMPv6 port unreachable answering the input, from and to
    /// ([`packet::check_port_unreachable`]).
    PortUnreachable(Ep, Ep),
    /// Exactly this packet.
    Packet(Pkt),
}

/// A TC hook, by its program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Ingress,
    Egress,
}

impl Hook {
    pub fn prog(self) -> &'static str {
        match self {
            Hook::Ingress => PROG_INGRESS,
            Hook::Egress => PROG_EGRESS,
        }
    }
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::Ingress => "ingress",
            Hook::Egress => "egress",
        })
    }
}

#[derive(Clone, Debug)]
pub struct Stage {
    pub hook: Hook,
    pub verdict: u32,
    pub out: Out,
}

/// How a row's client changes from one run to the next (the test's
/// `repeat`, every call of the benchmark). Run 0 is the row's client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vary {
    /// The same client: the same flow.
    None,
    /// The next source port: a new flow of the same client.
    Port,
    /// The next source port, and the next address every 60 000 runs: a new
    /// flow, never one seen before.
    PortThenAddress,
}

/// A check after every run of a row: counters count from before the row's
/// `given` rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Packet counter ([`proxy_common::stat`]) and how many it counted.
    Stat(u32, u64),
    ConntrackEntries(usize),
    AffinityEntries(usize),
    /// Every backend of the setup was found at least this many times.
    Spread(u32),
}

/// [`After::Stat`].
pub fn n(stat: u32, count: u64) -> After {
    After::Stat(stat, count)
}

/// A row of the table.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub setup: Setup,
    pub client: SocketAddr,
    /// Rows (earlier in the table, of the same setup) whose packet goes
    /// first, for this row's client: once, or before every run when the
    /// client varies.
    pub given: Vec<String>,
    pub packet: Pkt,
    /// The hooks the packet goes through, in order.
    pub stages: Vec<Stage>,
    /// How many times the packet is sent.
    pub repeat: u32,
    pub vary: Vary,
    pub after: Vec<After>,
}

pub fn case(name: impl Into<String>, setup: Setup, client: SocketAddr, packet: Pkt) -> Case {
    Case {
        name: name.into(),
        setup,
        client,
        given: Vec::new(),
        packet,
        stages: Vec::new(),
        repeat: 1,
        vary: Vary::None,
        after: Vec::new(),
    }
}

impl Case {
    pub fn given(mut self, name: &str) -> Self {
        self.given.push(name.into());
        self
    }

    pub fn stage(mut self, hook: Hook, verdict: u32, out: Out) -> Self {
        self.stages.push(Stage { hook, verdict, out });
        self
    }

    pub fn ingress(self, verdict: u32, out: Out) -> Self {
        self.stage(Hook::Ingress, verdict, out)
    }

    pub fn egress(self, verdict: u32, out: Out) -> Self {
        self.stage(Hook::Egress, verdict, out)
    }

    pub fn vary(mut self, vary: Vary) -> Self {
        self.vary = vary;
        self
    }

    pub fn repeat(mut self, times: u32, vary: Vary) -> Self {
        self.repeat = times;
        self.vary(vary)
    }

    pub fn after(mut self, after: impl IntoIterator<Item = After>) -> Self {
        self.after.extend(after);
        self
    }
}

/// The table. Hand-laid-out as a table (one row: its name, setup, client
/// and packet; the hooks with their verdict and expected output; the
/// counters after), so rustfmt leaves it alone.
#[rustfmt::skip]
pub fn cases() -> Vec<Case> {
    use After::*;
    use Ep::*;
    use Hook::*;
    use Out::*;
    use Setup::*;
    use Tcp::*;
    use Vary::*;
    use stat::*;
    const OK: u32 = TC_ACT_OK;
    const SHOT: u32 = TC_ACT_SHOT;
    const REDIRECT: u32 = TC_ACT_REDIRECT;
    const TP: u16 = TARGET_PORT;
    const DNS_TP: u16 = DNS_TARGET_PORT;
    const SCTP_TP: u16 = SCTP_TARGET_PORT;
    let vip = at(VIP, SVC_PORT);
    let vip_dns = at(VIP, DNS_PORT);
    let node_port = at(NODE, NODE_PORT);
    let b0 = at(BACKENDS[0], TP);
    let lb = at(LB_IP, SVC_PORT);
    let lo = Ipv4Addr::LOCALHOST;
    let router = at(ROUTER, 0);
    let v6 = |s: &str| s.parse::<Ipv6Addr>().expect("v6");

    let mut cases = vec![
        // ClusterIP: DNAT, the flow's later packets, its replies.
        case("clusterip/tcp/syn", Web, sa(CLIENT, 40000), Pkt::tcp(Client, vip, Syn))
            .ingress(OK, Flow(Client, AnyBackend(TP)))
            .vary(PortThenAddress)
            .after([n(DNAT_NEW, 1)]),
        // Uniform choice: each of 3 backends gets about 100 of 300; 40 is
        // far outside any plausible random deviation (p < 1e-9).
        case("clusterip/tcp/new-flows-spread-over-every-backend", Web, sa(CLIENT, 20000), Pkt::tcp(Client, vip, Syn))
            .ingress(OK, Flow(Client, AnyBackend(TP)))
            .repeat(300, Port)
            .after([Spread(41), n(DNAT_NEW, 300)]),
        case("clusterip/tcp/established", Web, sa(CLIENT, 40001), Pkt::tcp(Client, vip, Ack))
            .given("clusterip/tcp/syn")
            .ingress(OK, Flow(Client, Backend(TP)))
            .repeat(20, None)
            .after([n(DNAT_NEW, 1), n(DNAT_ESTABLISHED, 20)]),
        case("clusterip/tcp/reply", Web, sa(CLIENT, 40002), Pkt::tcp(Backend(TP), Client, SynAck))
            .given("clusterip/tcp/syn")
            .egress(OK, Flow(vip, Client))
            .after([n(REVNAT, 1)]),
        case("clusterip/udp/datagram", Web, sa(CLIENT, 33000), Pkt::udp(Client, vip_dns))
            .ingress(OK, Flow(Client, AnyBackend(DNS_TP)))
            .after([n(DNAT_NEW, 1)]),
        case("clusterip/udp/reply", Web, sa(CLIENT, 33000), Pkt::udp(Backend(DNS_TP), Client))
            .given("clusterip/udp/datagram")
            .egress(OK, Flow(vip_dns, Client))
            .after([n(REVNAT, 1)]),
        // No checksum (zero, over IPv4) stays none.
        case("clusterip/udp/no-checksum", Web, sa(CLIENT, 33001),
             Pkt::udp(Client, vip_dns).edit([Edit::Set(40, 0), Edit::Set(41, 0)]))
            .ingress(OK, FlowWithoutUdpChecksum(Client, AnyBackend(DNS_TP))),
    ];

    // Packets for anything else pass unchanged, through either hook;
    // ingress counts them.
    let other = [
        ("other-address", Pkt::tcp(Client, at(OTHER_VIP, SVC_PORT), Syn)),
        ("other-port", Pkt::tcp(Client, at(VIP, 81), Syn)),
        ("other-protocol-on-the-port", Pkt::udp(Client, at(VIP, SVC_PORT))),
        ("unrelated-reply", Pkt::tcp(b0, Client, SynAck)),
        // To a UDP backend port: the program looks for a flow whose client
        // now talks to the backend directly (a connection-table miss).
        ("udp-to-other-address", Pkt::udp(Client, at(OTHER_VIP, DNS_TP))),
    ];
    for (what, packet) in other {
        for (hook, counted) in [(Ingress, 1), (Egress, 0)] {
            cases.push(
                case(format!("clusterip/pass/{what}/{hook}"), Web, sa(CLIENT, 40003), packet.clone())
                    .stage(hook, OK, Unchanged)
                    .vary(Port)
                    .after([n(PASS_NO_SERVICE, counted)]),
            );
        }
    }

    // Truncated and malformed packets pass unchanged, counted at ingress
    // by why (egress counts nothing). BPF_PROG_TEST_RUN itself refuses
    // IPv4 frames shorter than a full IPv4 header (EINVAL), so the
    // shortest cut tested leaves no L4.
    let malformed = [
        ("no-l4-header", vec![Edit::Cut(14 + 20)], PASS_TRUNCATED),
        ("half-a-source-port", vec![Edit::Cut(14 + 20 + 3)], PASS_TRUNCATED),
        ("tcp-header-cut-short", vec![Edit::Cut(14 + 20 + 10)], PASS_TRUNCATED),
        // IHL 15 (60 bytes) runs past the TCP header's end.
        ("ihl-past-the-tcp-header", vec![Edit::Set(14, 0x4f), Edit::Cut(14 + 20 + 20)], PASS_TRUNCATED),
        // IHL 6: the L4 header starts past the ports.
        ("l4-header-past-the-ports", vec![Edit::Cut(14 + 20 + 4), Edit::Set(14, 0x46)], PASS_TRUNCATED),
        // IHL 3: shorter than the minimum header.
        ("ihl-below-the-minimum", vec![Edit::Set(14, 0x43)], PASS_TRUNCATED),
        // Version 6 behind an IPv4 ethertype.
        ("version-6-in-ipv4", vec![Edit::Set(14, 0x65)], PASS_NOT_IP),
        ("more-fragments", vec![Edit::Set(14 + 6, 0x20)], PASS_FRAGMENT),
    ];
    for (what, edits, why) in malformed {
        for hook in [Ingress, Egress] {
            let counted = |reason| n(reason, u64::from(hook == Ingress && reason == why));
            cases.push(
                case(format!("clusterip/malformed/{what}/{hook}"), Web, sa(CLIENT, 40004),
                     Pkt::tcp(Client, vip, Syn).edit(edits.clone()))
                    .stage(hook, OK, Unchanged)
                    .after([PASS_TRUNCATED, PASS_NOT_IP, PASS_FRAGMENT].map(counted))
                    .after([n(DNAT_NEW, 0)]),
            );
        }
    }

    cases.extend([
        // A service without endpoints: the SYN comes back as a RST+ACK from
        // the VIP, out of the interface it arrived on, so the client fails
        // at once; a later segment of such a connection is dropped, not
        // answered; UDP gets a port unreachable. Once the service is
        // deleted, its address passes.
        case("no-endpoints/tcp/syn-is-reset", WebWithoutEndpoints, sa(CLIENT, 42000), Pkt::tcp(Client, vip, Syn))
            .ingress(REDIRECT, Reset(vip, Client))
            .after([n(REJECT, 1)]),
        case("no-endpoints/tcp/later-segment-dropped", WebWithoutEndpoints, sa(CLIENT, 42000),
             Pkt::tcp(Client, vip, Ack))
            .given("no-endpoints/tcp/syn-is-reset")
            .ingress(SHOT, Ignored),
        // A later segment of a connection whose SYN the datapath never saw
        // (an earlier mode's, which netfilter's conntrack carries): passed.
        case("clusterip/tcp/segment-of-an-unknown-flow-passes", Web, sa(CLIENT, 42002),
             Pkt::tcp(Client, vip, Ack))
            .ingress(OK, Unchanged)
            .after([n(PASS_NO_FLOW, 1), n(DNAT_NEW, 0)]),
        case("deleted/tcp/syn-passes", WebDeleted, sa(CLIENT, 42001), Pkt::tcp(Client, vip, Syn))
            .ingress(OK, Unchanged),
        case("no-endpoints/udp/port-unreachable", UdpWithoutEndpoints, sa(CLIENT, 48000), Pkt::udp(Client, vip_dns))
            .ingress(REDIRECT, PortUnreachable(vip_dns, Client))
            .after([n(REJECT, 1), n(ERR_REJECT, 0)]),
        case("no-endpoints/udp6/port-unreachable", Udp6WithoutEndpoints, sa(CLIENT6, 48001),
             Pkt::udp(Client, at(VIP6, DNS_PORT)))
            .ingress(REDIRECT, PortUnreachable(at(VIP6, DNS_PORT), Client))
            .after([n(REJECT, 1)]),

        // NodePorts, on the node's addresses only (no masquerade address
        // here, so nothing is SNATed, counted as such); the reply leaves
        // from the node address and the NodePort.
        case("nodeport/tcp/syn", NodePort, sa(CLIENT, 40000), Pkt::tcp(Client, node_port, Syn))
            .ingress(OK, Flow(Client, AnyBackend(TP)))
            .after([n(DNAT_NEW, 1), n(PASS_NO_SNAT_ADDRESS, 1)]),
        case("nodeport/tcp/reply", NodePort, sa(CLIENT, 40000), Pkt::tcp(Backend(TP), Client, SynAck))
            .given("nodeport/tcp/syn")
            .egress(OK, Flow(node_port, Client))
            .after([n(REVNAT, 1)]),
        case("nodeport/tcp/other-host", NodePort, sa(CLIENT, 40001), Pkt::tcp(Client, at(OTHER_HOST, NODE_PORT), Syn))
            .ingress(OK, Unchanged)
            .after([n(PASS_NO_SERVICE, 1)]),
        // Loopback: never a NodePort address unless asked for
        // (CVE-2020-8558); and taking NODE out of the set stops serving it
        // there.
        case("nodeport/tcp/loopback", NodePort, sa(lo, 40002), Pkt::tcp(Client, at(lo, NODE_PORT), Syn))
            .ingress(OK, Unchanged)
            .after([n(PASS_NO_SERVICE, 1), n(DNAT_NEW, 0)]),
        case("nodeport-on-loopback/tcp/loopback", NodePortLoopbackAdded, sa(lo, 40002),
             Pkt::tcp(Client, at(lo, NODE_PORT), Syn))
            .ingress(OK, Flow(Client, AnyBackend(TP)))
            .after([n(DNAT_NEW, 1)]),
        case("nodeport-moved-to-loopback/tcp/node-address", NodePortMovedToLoopback, sa(CLIENT, 40003),
             Pkt::tcp(Client, node_port, Syn))
            .ingress(OK, Unchanged)
            .after([n(PASS_NO_SERVICE, 1)]),

        // A NodePort from outside is masqueraded: DNAT at ingress (the
        // masquerade port is taken there), SNAT to the node address at
        // egress; the backend answers the node, un-SNATed at ingress and
        // reverse-NATed at egress; later packets take the same translation.
        // One backend, so that flows compete for ports towards it.
        case("nodeport-snat/tcp/syn-at-ingress", NodePortToOneBackend, sa(CLIENT, 40000),
             Pkt::tcp(Client, node_port, Syn))
            .ingress(OK, Flow(Client, b0))
            .after([n(SNAT_NEW, 1), n(SNAT_OUT, 0)]),
        case("nodeport-snat/tcp/syn", NodePortToOneBackend, sa(CLIENT, 40000), Pkt::tcp(Client, node_port, Syn))
            .ingress(OK, Flow(Client, b0))
            .egress(OK, Flow(NewSnat, b0))
            .after([n(SNAT_NEW, 1), n(SNAT_OUT, 1)]),
        case("nodeport-snat/tcp/masqueraded-reply", NodePortToOneBackend, sa(CLIENT, 40000), Pkt::tcp(b0, Snat, SynAck))
            .given("nodeport-snat/tcp/syn")
            .ingress(OK, Flow(b0, Client))
            .egress(OK, Flow(node_port, Client))
            .after([n(SNAT_IN, 1), n(REVNAT, 1)]),
        case("nodeport-snat/tcp/established", NodePortToOneBackend, sa(CLIENT, 40000), Pkt::tcp(Client, node_port, Ack))
            .given("nodeport-snat/tcp/syn")
            .ingress(OK, Flow(Client, b0))
            .egress(OK, Flow(Snat, b0))
            .after([n(DNAT_ESTABLISHED, 1), n(SNAT_OUT, 2)]),
        // A router between the node and the backend says "fragmentation
        // needed": at ingress the error is given back its client (outer
        // destination, quoted source), at egress the quoted destination
        // becomes the NodePort again, and the router's own address stays
        // as the source. What the client gets quotes its own packet.
        case("nodeport-snat/icmp/fragmentation-needed-from-a-router", NodePortToOneBackend, sa(CLIENT, 40123),
             Pkt::icmp_error(router, at(NODE, 0), &frag_needed(), Pkt::tcp(Snat, b0, Syn), 28))
            .given("nodeport-snat/tcp/syn")
            .ingress(OK, Packet(Pkt::icmp_error(router, Client, &frag_needed(), Pkt::tcp(Client, b0, Syn), 28)))
            .egress(OK, Packet(Pkt::icmp_error(router, Client, &frag_needed(), Pkt::tcp(Client, node_port, Syn), 28)))
            .after([n(ICMP_ERROR_NAT, 2)]),
    ]);
    // An error about no flow of ours passes as it is.
    for hook in [Egress, Ingress] {
        cases.push(
            case(format!("nodeport-snat/icmp/error-about-no-flow/{hook}"), NodePortToOneBackend, sa(CLIENT, 40123),
                 Pkt::icmp_error(router, at(CLIENT, 0), &frag_needed(), Pkt::tcp(at(CLIENT, 999), b0, Syn), 28))
                .given("nodeport-snat/tcp/syn")
                .stage(hook, OK, Unchanged)
                .after([n(ICMP_ERROR_NAT, 0)]),
        );
    }

    cases.extend([
        // The same over three backends.
        case("nodeport-masquerade/tcp/syn", NodePortMasquerade, sa(CLIENT, 40200), Pkt::tcp(Client, node_port, Syn))
            .ingress(OK, Flow(Client, AnyBackend(TP)))
            .egress(OK, Flow(NewSnat, Backend(TP)))
            .vary(PortThenAddress)
            .after([n(SNAT_NEW, 1), n(SNAT_OUT, 1)]),
        case("nodeport-masquerade/tcp/masqueraded-reply", NodePortMasquerade, sa(CLIENT, 40200),
             Pkt::tcp(Backend(TP), Snat, SynAck))
            .given("nodeport-masquerade/tcp/syn")
            .ingress(OK, Flow(Backend(TP), Client))
            .egress(OK, Flow(node_port, Client))
            .after([n(SNAT_IN, 1), n(REVNAT, 1)]),

        // A ClusterIP masquerades clients outside the cluster CIDR (a node,
        // say), or every client with --masquerade-all; a pod client gets
        // DNAT only, its source kept at egress.
        case("clusterip-snat/tcp/pod-syn", ClusterIpMasquerade, sa(POD_CLIENT, 41000), Pkt::tcp(Client, vip, Syn))
            .ingress(OK, Flow(Client, AnyBackend(TP)))
            .egress(OK, Flow(Client, Backend(TP)))
            .after([n(DNAT_NEW, 1), n(SNAT_NEW, 0), n(SNAT_OUT, 0)]),
        case("clusterip-snat/tcp/outside-syn", ClusterIpMasquerade, sa(CLIENT, 41001), Pkt::tcp(Client, vip, Syn))
            .ingress(OK, Flow(Client, AnyBackend(TP)))
            .egress(OK, Flow(NewSnat, Backend(TP)))
            .after([n(SNAT_NEW, 1)]),
        case("clusterip-snat/tcp/outside-reply", ClusterIpMasquerade, sa(CLIENT, 41001),
             Pkt::tcp(Backend(TP), Snat, SynAck))
            .given("clusterip-snat/tcp/outside-syn")
            .ingress(OK, Flow(Backend(TP), Client))
            .egress(OK, Flow(vip, Client)),
        case("clusterip-masquerade-all/tcp/pod-syn", ClusterIpMasqueradeAll, sa(POD_CLIENT, 41002),
             Pkt::tcp(Client, vip, Syn))
            .ingress(OK, Flow(Client, AnyBackend(TP)))
            .egress(OK, Flow(NewSnat, Backend(TP)))
            .after([n(SNAT_NEW, 1)]),
        case("clusterip-masquerade-all/tcp/pod-reply", ClusterIpMasqueradeAll, sa(POD_CLIENT, 41002),
             Pkt::tcp(Backend(TP), Snat, SynAck))
            .given("clusterip-masquerade-all/tcp/pod-syn")
            .ingress(OK, Flow(Backend(TP), Client))
            .egress(OK, Flow(vip, Client)),

        // externalTrafficPolicy: Local keeps the client's source: only the
        // local backend; no masquerade entry, so egress leaves the client's
        // address alone; the reply leaves from the NodePort.
        case("local/nodeport/tcp/syn", LocalNodePort, sa(CLIENT, 42000), Pkt::tcp(Client, node_port, Syn))
            .ingress(OK, Flow(Client, b0))
            .egress(OK, Flow(Client, b0))
            .repeat(10, Port)
            .after([n(DNAT_NEW, 10), n(SNAT_NEW, 0), n(SNAT_OUT, 0)]),
        case("local/nodeport/tcp/reply", LocalNodePort, sa(CLIENT, 42000), Pkt::tcp(b0, Client, SynAck))
            .given("local/nodeport/tcp/syn")
            .egress(OK, Flow(node_port, Client))
            .repeat(10, Port)
            .after([n(DNAT_NEW, 10), n(SNAT_NEW, 0), n(SNAT_OUT, 0), n(REVNAT, 10)]),
    ]);
    // Local policy, no local backend: an external client is dropped (not
    // rejected: the service has endpoints, only none here); another
    // protocol is not this frontend; a pod gets the cluster-wide view,
    // without masquerade.
    for (what, dst) in [("lb", lb), ("nodeport", node_port)] {
        let name = |rest: &str| format!("local-elsewhere/{what}/{rest}");
        cases.extend([
            case(name("tcp/external-client-dropped"), LocalWithoutLocalBackend, sa(CLIENT, 43000),
                 Pkt::tcp(Client, dst, Syn))
                .ingress(SHOT, Ignored)
                .after([n(DROP_NO_LOCAL_BACKEND, 1), n(REJECT, 0)]),
            case(name("udp/other-protocol"), LocalWithoutLocalBackend, sa(CLIENT, 43001), Pkt::udp(Client, dst))
                .ingress(OK, Unchanged)
                .after([n(PASS_NO_SERVICE, 1)]),
            case(name("tcp/pod-syn"), LocalWithoutLocalBackend, sa(POD_CLIENT, 43100), Pkt::tcp(Client, dst, Syn))
                .ingress(OK, Flow(Client, AnyBackend(TP)))
                .egress(OK, Flow(Client, Backend(TP)))
                .repeat(10, Port)
                .after([n(DNAT_NEW, 10), n(SNAT_NEW, 0), n(REJECT, 0)]),
            case(name("tcp/pod-reply"), LocalWithoutLocalBackend, sa(POD_CLIENT, 43100),
                 Pkt::tcp(Backend(TP), Client, SynAck))
                .given(&name("tcp/pod-syn"))
                .egress(OK, Flow(dst, Client))
                .repeat(10, Port)
                .after([n(DNAT_NEW, 10), n(REVNAT, 10)]),
        ]);
    }
    // internalTrafficPolicy: Local. A ClusterIP has no cluster-wide view:
    // Local means this node's endpoints, for pods too.
    for (what, client) in [("pod", sa(POD_CLIENT, 43500)), ("outside", sa(CLIENT, 43501))] {
        cases.push(
            case(format!("internal-local-elsewhere/tcp/{what}-client-dropped"), InternalLocalWithoutLocalBackend,
                 client, Pkt::tcp(Client, vip, Syn))
                .ingress(SHOT, Ignored)
                .after([n(DROP_NO_LOCAL_BACKEND, 1), n(REJECT, 0)]),
        );
    }
    cases.push(
        case("internal-local/tcp/pod-syn", InternalLocalWithLocalBackend, sa(POD_CLIENT, 43502),
             Pkt::tcp(Client, vip, Syn))
            .ingress(OK, Flow(Client, at(BACKENDS[2], TP))),
    );

    // loadBalancerSourceRanges admit inside and drop outside.
    let lb6 = at(LB6, SVC_PORT);
    let b6 = at(BACKENDS6[0], TP);
    for (what, client, dst, admitted) in [
        ("tcp/inside", sa(CLIENT, 44000), lb, Flow(Client, AnyBackend(TP))),
        ("tcp/inside-the-second-range", sa(Ipv4Addr::new(198, 19, 7, 7), 44001), lb, Flow(Client, AnyBackend(TP))),
        ("tcp6/inside", sa(v6("2001:db8:1:ffff::5"), 44004), lb6, Flow(Client, b6)),
    ] {
        cases.push(
            case(format!("source-ranges/{what}"), SourceRanges, client, Pkt::tcp(Client, dst, Syn))
                .ingress(OK, admitted)
                .after([n(DNAT_NEW, 1)]),
        );
    }
    for (what, client, dst) in [
        ("tcp/just-past-the-range", sa(Ipv4Addr::new(203, 0, 114, 5), 44002), lb),
        ("tcp/pod", sa(POD_CLIENT, 44003), lb),
        ("tcp6/outside", sa(v6("2001:db8:2::5"), 44005), lb6),
    ] {
        cases.push(
            case(format!("source-ranges/{what}-dropped"), SourceRanges, client, Pkt::tcp(Client, dst, Syn))
                .ingress(SHOT, Ignored)
                .after([n(DROP_SOURCE_RANGE, 1), n(DNAT_NEW, 0)]),
        );
    }

    // ServiceCIDRs: a new flow to an address no Service holds is dropped,
    // one to a port of a ClusterIP that no Service has refused; Services
    // are served as before.
    cases.extend([
        case("service-cidr/tcp/unallocated-address-dropped", ServiceCidr, sa(CLIENT, 45000),
             Pkt::tcp(Client, at(OTHER_VIP, SVC_PORT), Syn))
            .ingress(SHOT, Ignored)
            .after([n(DROP_UNALLOCATED, 1), n(PASS_NO_SERVICE, 0)]),
        case("service-cidr/udp/unallocated-address-dropped", ServiceCidr, sa(CLIENT, 45001),
             Pkt::udp(Client, at(OTHER_VIP, DNS_PORT)))
            .ingress(SHOT, Ignored)
            .after([n(DROP_UNALLOCATED, 1)]),
        case("service-cidr/tcp/unserved-port-of-a-clusterip-is-reset", ServiceCidr, sa(CLIENT, 45002),
             Pkt::tcp(Client, at(VIP, 81), Syn))
            .ingress(REDIRECT, Reset(at(VIP, 81), Client))
            .after([n(REJECT, 1), n(PASS_NO_SERVICE, 0)]),
        case("service-cidr/tcp/served-port-still-served", ServiceCidr, sa(CLIENT, 45003), Pkt::tcp(Client, vip, Syn))
            .ingress(OK, Flow(Client, AnyBackend(TP)))
            .after([n(SNAT_NEW, 1), n(DROP_UNALLOCATED, 0)]),
        case("service-cidr/tcp/outside-the-range-untouched", ServiceCidr, sa(CLIENT, 45004),
             Pkt::tcp(Client, at(Ipv4Addr::new(10, 97, 0, 10), SVC_PORT), Syn))
            .ingress(OK, Unchanged)
            .after([n(PASS_NO_SERVICE, 1), n(DROP_UNALLOCATED, 0)]),
        // kube-proxy masquerades every client of an external Cluster
        // frontend, pods too: the endpoint may be on a third node.
        case("nodeport-masquerade/tcp/pod-client-masqueraded", NodePortMasquerade, sa(POD_CLIENT, 40300),
             Pkt::tcp(Client, node_port, Syn))
            .ingress(OK, Flow(Client, AnyBackend(TP)))
            .egress(OK, Flow(NewSnat, Backend(TP)))
            .after([n(SNAT_NEW, 1), n(DNAT_NEW, 0)]),
    ]);

    let vip6 = at(VIP6, SVC_PORT);
    let vip6_dns = at(VIP6, DNS_PORT);
    let node_port6 = at(NODE6, NODE_PORT);
    let sctp_vip = at(VIP, SCTP_SVC_PORT);
    let sctp_vip6 = at(SCTP_VIP6, SCTP_SVC_PORT);
    let sctp_b6 = at(BACKENDS6[0], SCTP_TP);
    let too_big = IcmpKind::V6(Icmpv6Type::PacketTooBig { mtu: 1280 });
    let port_unreachable = IcmpKind::V4(Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port));
    let init = |tag| packet::sctp_init_chunk(1, tag);
    let init_ack = |tag| packet::sctp_init_chunk(2, tag);
    // SHUTDOWN COMPLETE (type 14), 4 bytes: 14 + 20 + 12 + 4 = 50 bytes.
    let shutdown_complete = [14, 0, 0, 4];
    let padded = [Edit::Pad { from: 50, to: 60 }];
    // DATA (type 0, flags: unfragmented), 3 000 bytes: a 16-byte header
    // (length, TSN, stream, sequence, payload protocol) and its payload.
    let mut large_data = vec![0u8, 3];
    large_data.extend_from_slice(&3000u16.to_be_bytes());
    large_data.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]);
    large_data.extend((0..2984u32).map(|i| (i * 7 + 1) as u8));
    cases.extend([
        // Session affinity: the first connection finds the client's
        // backend, every later one keeps it.
        case("affinity/tcp/new-flows-stick", ClientIpAffinity, sa(CLIENT, 45000), Pkt::tcp(Client, vip, Syn))
            .ingress(OK, Flow(Client, Backend(TP)))
            .repeat(30, Port)
            .after([n(DNAT_NEW, 30), n(AFFINITY_HIT, 29), AffinityEntries(1)]),

        // An ICMP error about a translated flow (here the backend's port
        // unreachable; a router's fragmentation-needed works the same way)
        // must reach the client as one about the flow it knows, VIP to
        // client, quoting the client's own datagram, or the client never
        // learns of it (no ECONNREFUSED, a PMTU black hole). kube-proxy
        // gets this from netfilter's conntrack (related ICMP is NATed).
        case("udp-one-backend/udp/datagram", UdpToOneBackend, sa(POD_CLIENT, 53000), Pkt::udp(Client, vip_dns))
            .ingress(OK, Flow(Client, at(BACKENDS[0], DNS_TP))),
        case("udp-one-backend/icmp/port-unreachable-from-the-backend", UdpToOneBackend, sa(POD_CLIENT, 53000),
             Pkt::icmp_error(at(BACKENDS[0], 0), Client, &port_unreachable,
                             Pkt::udp(Client, at(BACKENDS[0], DNS_TP)), 28))
            .given("udp-one-backend/udp/datagram")
            .egress(OK, Packet(Pkt::icmp_error(vip_dns, Client, &port_unreachable, Pkt::udp(Client, vip_dns), 28)))
            .after([n(ICMP_ERROR_NAT, 1)]),
        // IPv6: a backend's packet-too-big about a ClusterIP flow reaches
        // the client from the VIP, quoting the client's own packet (the
        // IPv6 header and the whole TCP header, its checksum too; the
        // ICMPv6 checksum covers a pseudo-header with the outer addresses).
        case("clusterip6-one-backend/tcp/syn", ClusterIp6ToOneBackend, sa(POD_CLIENT6, 49100),
             Pkt::tcp(Client, vip6, Syn))
            .ingress(OK, Flow(Client, b6)),
        case("clusterip6-one-backend/icmp6/packet-too-big-from-the-backend", ClusterIp6ToOneBackend,
             sa(POD_CLIENT6, 49100),
             Pkt::icmp_error(b6, Client, &too_big, Pkt::tcp(Client, b6, Ack), 60))
            .given("clusterip6-one-backend/tcp/syn")
            .egress(OK, Packet(Pkt::icmp_error(vip6, Client, &too_big, Pkt::tcp(Client, vip6, Ack), 60)))
            .after([n(ICMP_ERROR_NAT, 1)]),

        // IPv6 ClusterIP, TCP and UDP.
        case("clusterip6/tcp/syn", ClusterIp6, sa(POD_CLIENT6, 49000), Pkt::tcp(Client, vip6, Syn))
            .ingress(OK, Flow(Client, AnyBackend(TP)))
            .after([n(DNAT_NEW, 1)]),
        case("clusterip6/tcp/established", ClusterIp6, sa(POD_CLIENT6, 49000), Pkt::tcp(Client, vip6, Ack))
            .given("clusterip6/tcp/syn")
            .ingress(OK, Flow(Client, Backend(TP)))
            .after([n(DNAT_NEW, 1), n(DNAT_ESTABLISHED, 1)]),
        case("clusterip6/tcp/reply", ClusterIp6, sa(POD_CLIENT6, 49000), Pkt::tcp(Backend(TP), Client, SynAck))
            .given("clusterip6/tcp/syn")
            .egress(OK, Flow(vip6, Client))
            .after([n(REVNAT, 1)]),
        case("clusterip6/udp/datagram", ClusterIp6, sa(POD_CLIENT6, 49001), Pkt::udp(Client, vip6_dns))
            .ingress(OK, Flow(Client, AnyBackend(DNS_TP)))
            .after([n(DNAT_NEW, 1)]),
        case("clusterip6/udp/reply", ClusterIp6, sa(POD_CLIENT6, 49001), Pkt::udp(Backend(DNS_TP), Client))
            .given("clusterip6/udp/datagram")
            .egress(OK, Flow(vip6_dns, Client))
            .after([n(REVNAT, 1)]),

        // IPv6 NodePort from outside, masqueraded both ways. A v4 address
        // in the set would not make a v6 NodePort of it, nor the reverse:
        // the other family's node address passes.
        case("nodeport6-snat/udp/datagram", NodePort6, sa(CLIENT6, 49100), Pkt::udp(Client, node_port6))
            .ingress(OK, Flow(Client, b6))
            .egress(OK, Flow(NewSnat, b6))
            .after([n(SNAT_NEW, 1), n(SNAT_OUT, 1)]),
        case("nodeport6-snat/udp/masqueraded-reply", NodePort6, sa(CLIENT6, 49100), Pkt::udp(b6, Snat))
            .given("nodeport6-snat/udp/datagram")
            .ingress(OK, Flow(b6, Client))
            .egress(OK, Flow(node_port6, Client))
            .after([n(SNAT_NEW, 1), n(SNAT_OUT, 1), n(SNAT_IN, 1), n(REVNAT, 1)]),
        case("nodeport6-snat/udp/ipv4-node-address", NodePort6, sa(CLIENT, 49101), Pkt::udp(Client, node_port))
            .ingress(OK, Unchanged),

        // SCTP, with the CRC32c kept valid.
        case("sctp/init", Sctp, sa(POD_CLIENT, 50000), Pkt::sctp(Client, sctp_vip, 0, &init(0x1234_5678)))
            .ingress(OK, Flow(Client, AnyBackend(SCTP_TP)))
            .after([n(DNAT_NEW, 1)]),
        case("sctp/init-ack", Sctp, sa(POD_CLIENT, 50000),
             Pkt::sctp(Backend(SCTP_TP), Client, 0x1234_5678, &init_ack(0x9abc_def0)))
            .given("sctp/init")
            .egress(OK, Flow(sctp_vip, Client))
            .after([n(REVNAT, 1)]),
        // Ethernet pads frames to 60 bytes; a short SCTP packet (a 4-byte
        // chunk: COOKIE ACK, SHUTDOWN COMPLETE, ABORT) arrives at TC
        // ingress from a NIC with that padding still on (the IP layer trims
        // it only later). The CRC covers the SCTP packet as the IP header
        // bounds it, not the padding. The same on the way back (padding
        // seen at egress only in odd setups, but the rule is the same).
        case("sctp/padded-shutdown-complete", Sctp, sa(POD_CLIENT, 50001),
             Pkt::sctp(Client, sctp_vip, 0x3333_4444, &shutdown_complete).edit(padded))
            .given("sctp/init")
            .ingress(OK, Flow(Client, Backend(SCTP_TP)))
            .after([n(DNAT_ESTABLISHED, 1)]),
        case("sctp/padded-shutdown-complete-reply", Sctp, sa(POD_CLIENT, 50001),
             Pkt::sctp(Backend(SCTP_TP), Client, 0x1111_2222, &shutdown_complete).edit(padded))
            .given("sctp/init")
            .egress(OK, Flow(sctp_vip, Client)),
        case("sctp6/init", Sctp6, sa(POD_CLIENT6, 50100), Pkt::sctp(Client, sctp_vip6, 0, &init(0x5555_6666)))
            .ingress(OK, Flow(Client, sctp_b6))
            .after([n(DNAT_NEW, 1)]),
        case("sctp6/init-ack", Sctp6, sa(POD_CLIENT6, 50100), Pkt::sctp(sctp_b6, Client, 0x5555_6666, &init_ack(7)))
            .given("sctp6/init")
            .egress(OK, Flow(sctp_vip6, Client))
            .after([n(REVNAT, 1)]),
        // A DATA chunk of 3 000 bytes: the CRC's shift over the zeros that
        // follow the port takes the table rows of long runs too.
        case("sctp6/large-data", Sctp6, sa(POD_CLIENT6, 50100), Pkt::sctp(Client, sctp_vip6, 7, &large_data))
            .given("sctp6/init")
            .ingress(OK, Flow(Client, sctp_b6))
            .after([n(DNAT_NEW, 1), n(DNAT_ESTABLISHED, 1)]),
        // A 4-byte chunk, the shortest SCTP packet.
        case("sctp6/abort", Sctp6, sa(POD_CLIENT6, 50100), Pkt::sctp(Client, sctp_vip6, 7, &[6, 0, 0, 4]))
            .given("sctp6/init")
            .ingress(OK, Flow(Client, sctp_b6))
            .after([n(DNAT_NEW, 1), n(DNAT_ESTABLISHED, 1)]),

        // Hairpin: a client that is its own backend is masqueraded through
        // the node. Out to the pod it comes from the node, so the pod
        // answers the node; the answer is turned back into one to the pod's
        // socket, and leaves towards it from the VIP.
        case("hairpin/tcp/syn-at-ingress", Hairpin, sa(BACKENDS[0], 51000), Pkt::tcp(Client, vip, Syn))
            .ingress(OK, Flow(Client, b0))
            .after([n(SNAT_NEW, 1)]),
        case("hairpin/tcp/syn", Hairpin, sa(BACKENDS[0], 51000), Pkt::tcp(Client, vip, Syn))
            .ingress(OK, Flow(Client, b0))
            .egress(OK, Flow(NewSnat, b0)),
        case("hairpin/tcp/reply", Hairpin, sa(BACKENDS[0], 51000), Pkt::tcp(b0, Snat, SynAck))
            .given("hairpin/tcp/syn")
            .ingress(OK, Flow(b0, Client))
            .egress(OK, Flow(vip, Client))
            .after([n(SNAT_IN, 1), n(REVNAT, 1)]),
    ]);
    cases
}

fn frag_needed() -> IcmpKind {
    IcmpKind::V4(Icmpv4Type::DestinationUnreachable(
        icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
    ))
}

// ---------------------------------------------------------------------------
// Running rows.

/// Checks the table itself: names unique, `given` rows earlier and of the
/// same setup, every row with a hook.
pub fn check_table(cases: &[Case]) -> Result<(), String> {
    let mut seen: BTreeMap<&str, Setup> = BTreeMap::new();
    for c in cases {
        if c.stages.is_empty() {
            return Err(format!("{}: no hook", c.name));
        }
        for g in &c.given {
            match seen.get(g.as_str()) {
                Some(setup) if *setup == c.setup => {}
                Some(_) => return Err(format!("{}: given {g} of another setup", c.name)),
                None => return Err(format!("{}: given {g} is not an earlier row", c.name)),
            }
        }
        if seen.insert(&c.name, c.setup).is_some() {
            return Err(format!("{}: two rows of this name", c.name));
        }
    }
    Ok(())
}

/// What a run of a row has found out.
#[derive(Debug)]
struct Found {
    client: SocketAddr,
    backends: BTreeSet<IpAddr>,
    snat_v4: Option<Ipv4Addr>,
    snat_v6: Option<Ipv6Addr>,
    backend: Option<IpAddr>,
    snat: Option<SocketAddr>,
    /// How often each backend was found.
    hits: BTreeMap<IpAddr, u32>,
}

/// A row being run on a fixture.
pub struct Run<'a> {
    case: &'a Case,
    cases: &'a [Case],
    found: Found,
}

impl<'a> Run<'a> {
    /// Starts `case` (of `cases`) on `f`, programmed with its setup: runs
    /// its `given` rows for its client.
    pub fn start(f: &Fixture, case: &'a Case, cases: &'a [Case]) -> Result<Self, String> {
        let (snat_v4, snat_v6) = case.setup.snat();
        let mut run = Run {
            case,
            cases,
            found: Found {
                client: case.client,
                backends: case.setup.backend_ips(),
                snat_v4,
                snat_v6,
                backend: None,
                snat: None,
                hits: BTreeMap::new(),
            },
        };
        run.given(f, case)?;
        Ok(run)
    }

    fn given(&mut self, f: &Fixture, case: &Case) -> Result<(), String> {
        for name in &case.given {
            let cases = self.cases;
            let given = cases
                .iter()
                .find(|c| c.name == *name)
                .ok_or_else(|| format!("no row {name}"))?;
            self.given(f, given)?;
            let packet = self.build(&given.packet)?;
            self.through(f, given, packet)
                .map_err(|e| format!("given {name}: {e}"))?;
        }
        Ok(())
    }

    /// The client of run `i`.
    pub fn client(&self, i: u32) -> SocketAddr {
        const PORTS: u32 = 60_000;
        let base = self.case.client;
        let next_port = || {
            let port = u32::from(base.port()).saturating_sub(1024) + i % PORTS;
            (1024 + port % (65_536 - 1024)) as u16
        };
        match self.case.vary {
            Vary::None => base,
            Vary::Port => SocketAddr::new(base.ip(), next_port()),
            Vary::PortThenAddress => {
                let ip = match base.ip() {
                    IpAddr::V4(a) => ip(Ipv4Addr::from(u32::from(a) + i / PORTS)),
                    IpAddr::V6(a) => ip(Ipv6Addr::from(u128::from(a) + u128::from(i / PORTS))),
                };
                SocketAddr::new(ip, next_port())
            }
        }
    }

    /// The packet of run `i` (run 0 is the one `start` prepared for).
    pub fn packet(&mut self, f: &Fixture, i: u32) -> Result<Vec<u8>, String> {
        self.found.client = self.client(i);
        if i > 0 && self.case.vary != Vary::None {
            self.given(f, self.case)?;
        }
        self.build(&self.case.packet)
    }

    /// Run `i`: its packet through the row's hooks, every output checked;
    /// the time the kernel measured for the hooks, together.
    pub fn step(&mut self, f: &Fixture, i: u32) -> Result<Duration, String> {
        let packet = self.packet(f, i)?;
        self.through(f, self.case, packet)
    }

    fn through(&mut self, f: &Fixture, case: &Case, packet: Vec<u8>) -> Result<Duration, String> {
        let mut input = packet;
        let mut took = Duration::ZERO;
        for (i, stage) in case.stages.iter().enumerate() {
            let (verdict, out, duration) = f.run_timed(stage.hook.prog(), &input);
            took += duration;
            let at = format!("hook {} ({})", i + 1, stage.hook);
            if verdict != stage.verdict {
                return Err(format!(
                    "{at}: verdict {verdict}, expected {}",
                    stage.verdict
                ));
            }
            self.expect(&input, &out, &stage.out)
                .map_err(|e| format!("{at}: {e}"))?;
            input = out;
        }
        Ok(took)
    }

    /// Checks the counters and maps after the row's runs, against counters
    /// read before them.
    pub fn check_after(&self, f: &Fixture, before: &[u64]) -> Result<(), String> {
        let now = f.dp.stats().map_err(|e| format!("reading stats: {e}"))?;
        for after in &self.case.after {
            let (what, got, expected) = match *after {
                After::Stat(index, count) => (
                    stat::NAMES[index as usize].to_string(),
                    now[index as usize] - before[index as usize],
                    count,
                ),
                After::ConntrackEntries(count) => (
                    "connection-tracking entries".into(),
                    f.dp.conntrack_len() as u64,
                    count as u64,
                ),
                After::AffinityEntries(count) => (
                    "affinity entries".into(),
                    f.dp.affinity_len() as u64,
                    count as u64,
                ),
                After::Spread(min) => {
                    let hits = |b| self.found.hits.get(b).copied().unwrap_or(0);
                    if self.found.backends.iter().any(|b| hits(b) < min) {
                        return Err(format!(
                            "a backend found fewer than {min} times: {:?}",
                            self.found.hits
                        ));
                    }
                    continue;
                }
            };
            if got != expected {
                let counted: Vec<String> = (0..now.len())
                    .filter(|&i| now[i] != before[i])
                    .map(|i| format!("{}={}", stat::NAMES[i], now[i] - before[i]))
                    .collect();
                return Err(format!(
                    "{what}: {got}, expected {expected} (counted: {})",
                    counted.join(" ")
                ));
            }
        }
        Ok(())
    }

    fn resolve(&self, ep: Ep) -> Result<SocketAddr, String> {
        match ep {
            Ep::At(a) => Ok(a),
            Ep::Client => Ok(self.found.client),
            Ep::Backend(port) => self
                .found
                .backend
                .map(|b| SocketAddr::new(b, port))
                .ok_or_else(|| "no backend found yet".into()),
            Ep::Snat => self
                .found
                .snat
                .ok_or_else(|| "no masquerade address found yet".into()),
            Ep::AnyBackend(_) | Ep::NewSnat => Err(format!("{ep:?} is only expected")),
        }
    }

    fn build(&self, pkt: &Pkt) -> Result<Vec<u8>, String> {
        Ok(match pkt {
            Pkt::Tcp(s, d, kind) => packet::tcp(self.resolve(*s)?, self.resolve(*d)?, *kind),
            Pkt::Udp(s, d) => packet::udp(self.resolve(*s)?, self.resolve(*d)?),
            Pkt::Sctp(s, d, vtag, chunks) => {
                packet::sctp(self.resolve(*s)?, self.resolve(*d)?, *vtag, chunks)
            }
            Pkt::IcmpError {
                src,
                dst,
                kind,
                about,
                quote,
            } => {
                let about = self.build(about)?;
                packet::icmp_error(
                    self.resolve(*src)?.ip(),
                    self.resolve(*dst)?.ip(),
                    kind,
                    &about[ETH_HLEN..ETH_HLEN + quote],
                )
            }
            Pkt::Edited(pkt, edits) => {
                let mut bytes = self.build(pkt)?;
                for edit in edits {
                    match *edit {
                        Edit::Cut(len) => bytes.truncate(len),
                        Edit::Set(at, value) => bytes[at] = value,
                        Edit::Pad { from, to } => {
                            if bytes.len() != from {
                                return Err(format!("{} bytes to pad, not {from}", bytes.len()));
                            }
                            bytes.resize(to, 0);
                        }
                    }
                }
                bytes
            }
        })
    }

    /// Checks that `got` is `ep`, remembering what it finds.
    fn expect_ep(&mut self, ep: Ep, got: SocketAddr, what: &str) -> Result<(), String> {
        let found = &mut self.found;
        let ok = match (ep, found.backend, found.snat) {
            (Ep::At(a), ..) => got == a,
            (Ep::Client, ..) => got == found.client,
            (Ep::Backend(port), Some(b), _) => got == SocketAddr::new(b, port),
            (Ep::Backend(port) | Ep::AnyBackend(port), ..) => {
                let ok = got.port() == port && found.backends.contains(&got.ip());
                if ok {
                    found.backend = Some(got.ip());
                    *found.hits.entry(got.ip()).or_default() += 1;
                }
                ok
            }
            (Ep::Snat, _, Some(s)) => got == s,
            (Ep::Snat | Ep::NewSnat, ..) => {
                let address = match got.ip() {
                    IpAddr::V4(_) => found.snat_v4.map(IpAddr::V4),
                    IpAddr::V6(_) => found.snat_v6.map(IpAddr::V6),
                };
                let ok = address == Some(got.ip()) && in_snat_range(got.port());
                if ok {
                    found.snat = Some(got);
                }
                ok
            }
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "{what} {got}, expected {ep:?} (client {}, backend {:?}, masquerade {:?})",
                found.client, found.backend, found.snat
            ))
        }
    }

    fn expect_flow(&mut self, seen: &packet::Seen, src: Ep, dst: Ep) -> Result<(), String> {
        self.expect_ep(src, seen.flow.src, "from")?;
        self.expect_ep(dst, seen.flow.dst, "to")
    }

    fn expect(&mut self, input: &[u8], out: &[u8], expected: &Out) -> Result<(), String> {
        match expected {
            Out::Unchanged => {
                if out != input {
                    return Err(format!("changed: {input:02x?} became {out:02x?}"));
                }
            }
            Out::Ignored => {}
            Out::Flow(src, dst) => {
                let seen = packet::parse(out)?;
                self.expect_flow(&seen, *src, *dst)?;
            }
            Out::FlowWithoutUdpChecksum(src, dst) => {
                let seen = packet::parse(out)?;
                self.expect_flow(&seen, *src, *dst)?;
                if seen.udp_checksum != Some(0) {
                    return Err(format!(
                        "UDP checksum {:?}, expected none",
                        seen.udp_checksum
                    ));
                }
            }
            Out::Reset(src, dst) => {
                let seen = packet::parse(out)?;
                self.expect_flow(&seen, *src, *dst)?;
                let sent = packet::parse(input)?.tcp.ok_or("not TCP in")?;
                let rst = seen.tcp.ok_or("not TCP out")?;
                if !(rst.rst && rst.ack && !rst.syn) {
                    return Err(format!("not a RST+ACK: {rst:?}"));
                }
                if (rst.seq, rst.ack_number) != (0, sent.seq + 1) {
                    return Err(format!("does not acknowledge the SYN: {rst:?}"));
                }
                if out[0..6] != input[6..12] || out[6..12] != input[0..6] {
                    return Err("MACs not swapped".into());
                }
            }
            Out::PortUnreachable(src, dst) => {
                let (src, dst) = (self.resolve(*src)?, self.resolve(*dst)?);
                packet::check_port_unreachable(input, out, src.ip(), dst.ip())?;
            }
            Out::Packet(pkt) => {
                let expected = self.build(pkt)?;
                if out != expected {
                    return Err(format!("{out:02x?}, expected {expected:02x?}"));
                }
            }
        }
        Ok(())
    }
}

/// Runs one row on `f`, programmed with its setup and without flows.
pub fn run_case(f: &Fixture, case: &Case, cases: &[Case]) -> Result<(), String> {
    let before = f.dp.stats().map_err(|e| format!("reading stats: {e}"))?;
    let mut run = Run::start(f, case, cases)?;
    for i in 0..case.repeat {
        run.step(f, i).map_err(|e| format!("run {i}: {e}"))?;
    }
    run.check_after(f, &before)
}

/// Runs every row whose name contains `filter`, each on a fixture of its
/// setup (loaded once for consecutive rows of one setup, and its flows
/// forgotten between rows); returns the rows that failed, with why.
pub fn run_all(cases: &[Case], filter: Option<&str>) -> Vec<(String, String)> {
    let mut failed = Vec::new();
    if let Err(e) = check_table(cases) {
        failed.push(("(the table)".to_string(), e));
        return failed;
    }
    let mut loaded: Option<(Setup, Fixture)> = None;
    for case in cases {
        if filter.is_some_and(|f| !case.name.contains(f)) {
            continue;
        }
        let result = catch_unwind(AssertUnwindSafe(|| {
            match &loaded {
                Some((setup, f)) if *setup == case.setup => f.forget_flows(),
                _ => loaded = Some((case.setup, case.setup.load())),
            }
            let (_, f) = loaded.as_ref().expect("loaded");
            run_case(f, case, cases)
        }));
        let error = match result {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e,
            Err(panic) => panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into()),
        };
        // Whatever state the row left, the next starts from a fresh load.
        loaded = None;
        failed.push((case.name.clone(), error));
    }
    failed
}
