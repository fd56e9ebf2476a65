//! Map key and value types shared by the eBPF programs and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding so that both sides agree
//! on the layout byte for byte; nothing here may contain an `Option`, an enum
//! with data, or implicit padding. Addresses and ports are kept in network
//! byte order, exactly as they appear in packets, so the datapath never swaps.
#![no_std]

/// Address family tags stored in keys (`family` fields).
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// IP protocol numbers the datapath handles.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;

/// Largest number of backend slots one service entry can have (slot 0 is the
/// service itself, slots 1..=count its backends).
pub const MAX_BACKENDS_PER_SERVICE: u16 = u16::MAX - 1;

/// Map capacities. The services and backends maps are not preallocated
/// (memory follows use), so their ceilings can be generous.
pub const SERVICES_MAX_ENTRIES: u32 = 1_048_576;
pub const BACKENDS_MAX_ENTRIES: u32 = 524_288;
pub const CONNTRACK_MAX_ENTRIES: u32 = 524_288;
pub const AFFINITY_MAX_ENTRIES: u32 = 131_072;
pub const MEMBERS_MAX_ENTRIES: u32 = 524_288;
pub const SOURCE_RANGES_MAX_ENTRIES: u32 = 65_536;
pub const NODE_ADDRS_MAX_ENTRIES: u32 = 1_024;
pub const SOCK_REVNAT_MAX_ENTRIES: u32 = 262_144;
/// Pods of one node: far above the usual limit of 110, and the kubelet's
/// largest setting.
pub const SOCK_PODS_MAX_ENTRIES: u32 = 4_096;
pub const FRONTEND_ADDRS_MAX_ENTRIES: u32 = 131_072;
/// ServiceCIDR ranges: a cluster has a handful.
pub const SERVICE_CIDRS_MAX_ENTRIES: u32 = 256;

/// Names of the maps, as pinned under `<bpf-root>/maps/`.
pub const MAP_SERVICES: &str = "PA_SERVICES";
pub const MAP_BACKENDS: &str = "PA_BACKENDS";
pub const MAP_CONNTRACK: &str = "PA_CONNTRACK";
pub const MAP_STATS: &str = "PA_STATS";
pub const MAP_AFFINITY: &str = "PA_AFFINITY";
pub const MAP_MEMBERS: &str = "PA_MEMBERS";
pub const MAP_SOURCE_RANGES: &str = "PA_SOURCE_RANGES";
/// The cluster's ServiceCIDR ranges (LPM trie of [`ServiceCidrKey`]): a new
/// flow to an address inside them that no frontend has is dropped.
pub const MAP_SERVICE_CIDRS: &str = "PA_SERVICE_CIDRS";
pub const MAP_NODE_ADDRS: &str = "PA_NODE_ADDRS";
pub const MAP_CONFIG: &str = "PA_CONFIG";
pub const MAP_PROGS: &str = "PA_PROGS";
pub const MAP_SOCK_NETNS: &str = "PA_SOCK_NETNS";
pub const MAP_SOCK_REVNAT: &str = "PA_SOCK_REVNAT";
/// The network namespaces of this node's pods (cookie -> [`SockPod`]): their
/// sockets get socket-level load balancing for the frontends that need no
/// packet-level work.
pub const MAP_SOCK_PODS: &str = "PA_SOCK_PODS";
/// Every address a frontend has (or had, while its flows may live on), and
/// every NodePort address of the node, keyed like the node-addresses map:
/// traffic to any other address is no service traffic, and leaves ingress
/// after one lookup.
pub const MAP_FRONTEND_ADDRS: &str = "PA_FRONTEND_ADDRS";
/// One bit per port (word `port / 64`, bit `port % 64`, the port in host
/// order) on which a backend has been programmed: only a UDP or SCTP
/// packet to such a port can be a client reusing a flow's tuple straight
/// to its backend, only a socket whose peer has such a port can have
/// been given its peer by the socket hooks, and only a packet with such a
/// port (as source or destination) can have an egress entry, so other
/// traffic and other sockets skip those lookups.
pub const MAP_BACKEND_PORTS: &str = "PA_BACKEND_PORTS";
/// Words of [`MAP_BACKEND_PORTS`].
pub const BACKEND_PORT_WORDS: u32 = 1_024;
/// New flows (packet path) and translated `connect()`/`sendmsg()` calls
/// (socket hooks) per frontend view, indexed by `ServiceValue::svc_id`
/// (a view whose ID is past the end is not counted): what `proxy-agent
/// list` shows as a frontend's connections. Counted with an atomic add,
/// once per flow, not per packet.
pub const MAP_FRONTEND_FLOWS: &str = "PA_FRONTEND_FLOWS";
pub const FRONTEND_FLOWS_MAX_ENTRIES: u32 = 262_144;

/// Names of the TC programs in the object file.
pub const PROG_INGRESS: &str = "pa_ingress";
pub const PROG_EGRESS: &str = "pa_egress";
/// Tail-called by `pa_ingress` for a packet of no known flow: service
/// lookup, backend choice, connection-tracking entries, masquerade.
pub const PROG_NEW_FLOW: &str = "pa_new_flow";
/// Tail-called by `pa_new_flow` for a service with no usable endpoint.
pub const PROG_REJECT: &str = "pa_reject";
/// Tail-called by `pa_ingress` / `pa_egress` for ICMP: errors about
/// translated flows are translated with them.
pub const PROG_ICMP_INGRESS: &str = "pa_icmp_ingress";
pub const PROG_ICMP_EGRESS: &str = "pa_icmp_egress";

/// The socket hooks (cgroup `sock_addr`), by attach point: they translate
/// the node's own connections and datagrams to services.
pub const PROGS_SOCKET: [&str; 8] = [
    "pa_connect4",
    "pa_sendmsg4",
    "pa_recvmsg4",
    "pa_getpeername4",
    "pa_connect6",
    "pa_sendmsg6",
    "pa_recvmsg6",
    "pa_getpeername6",
];

/// The socket hook (cgroup `sock`) that forgets a closing socket's
/// reverse-translation entry.
pub const PROG_SOCK_RELEASE: &str = "pa_sock_release";

/// Slots of the program array (`MAP_PROGS`). The stages are separate
/// programs so that each is verified, and gets its stack, on its own.
pub const TAIL_NEW_FLOW: u32 = 0;
pub const TAIL_REJECT: u32 = 1;
pub const TAIL_ICMP_INGRESS: u32 = 2;
pub const TAIL_ICMP_EGRESS: u32 = 3;
pub const TAIL_SLOTS: u32 = 4;
/// An empty TC program: the floor of the per-packet benchmark harness.
pub const PROG_FLOOR: &str = "pa_floor";
/// Variants of the ingress program that stop after a step and pass the
/// packet unchanged, in the order of the steps, with what each has done
/// by then; loaded only by the per-packet benchmark, which tells the cost
/// of each step from them.
pub const PROG_STEPS: [(&str, &str); 5] = [
    ("pa_step_parse", "headers parsed"),
    (
        "pa_step_classify",
        "+ masquerade-reply and frontend address checks",
    ),
    (
        "pa_step_conntrack",
        "+ flow entry looked up (and refreshed)",
    ),
    ("pa_step_select", "+ new flow: frontend and backend chosen"),
    (
        "pa_step_create",
        "+ new flow: entries written, masquerade port claimed",
    ),
];

/// An IPv4 or IPv6 address in network byte order. IPv4 uses the first four
/// bytes and leaves the rest zero, so one key type serves both families.
pub type Addr = [u8; 16];

/// Key of the services map: one frontend (VIP, port, protocol) and a slot.
///
/// Slot 0 holds the service entry (`ServiceValue::count` backends); slots
/// `1..=count` hold one backend ID each. Writing the new slots before the
/// new count, and removing surplus slots after it, keeps every lookup valid
/// while a service changes (make-before-break).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Destination port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    /// [`SCOPE_EXTERNAL`] or [`SCOPE_INTERNAL`].
    pub scope: u8,
    pub _pad0: u8,
    pub slot: u16,
}

/// The view every frontend has: the backends its traffic policy allows.
pub const SCOPE_EXTERNAL: u8 = 0;
/// A second view of an external frontend with `externalTrafficPolicy:
/// Local`: the cluster-wide backends, for clients inside the cluster CIDR
/// (kube-proxy short-circuits pod traffic to external IPs the same way).
pub const SCOPE_INTERNAL: u8 = 1;

/// Flags of a service entry (slot 0). Bits 0 and 1 (once "external" and
/// "Local policy", from which the datapath decided masquerade itself) are
/// retired: the agent's plan decides masquerade, in [`SVC_MASQUERADE`] and
/// [`SVC_MASQUERADE_OUTSIDE`].
/// Session affinity ClientIP; `affinity_timeout_secs` holds the timeout.
pub const SVC_AFFINITY: u32 = 1 << 2;
/// `loadBalancerSourceRanges` apply; the ranges are in the source-ranges map
/// under `svc_id`.
pub const SVC_SOURCE_RANGES: u32 = 1 << 3;
/// A [`SCOPE_INTERNAL`] entry exists for clients inside the cluster CIDR.
pub const SVC_INTERNAL_SCOPE: u32 = 1 << 4;
/// With no backend in this view, drop instead of rejecting: the service has
/// endpoints, only not here (a Local policy with no local endpoint).
pub const SVC_DROP_EMPTY: u32 = 1 << 5;
/// Masquerade every client of this view (hairpin is masqueraded anyway).
pub const SVC_MASQUERADE: u32 = 1 << 6;
/// Masquerade the clients of this view whose source is outside the cluster
/// CIDR of their family (none when no CIDR is configured).
pub const SVC_MASQUERADE_OUTSIDE: u32 = 1 << 7;

/// Value of the services map. Slot 0 (the service entry) uses `count`,
/// `flags`, `affinity_timeout_secs` and `svc_id`; backend slots use
/// `backend_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceValue {
    pub backend_id: u32,
    pub count: u16,
    pub _pad0: u16,
    pub flags: u32,
    pub affinity_timeout_secs: u32,
    /// Identifies this frontend view (frontend key and scope) in the
    /// affinity, members and source-ranges maps.
    pub svc_id: u32,
    pub _pad1: u32,
}

/// Key of the backends map.
pub type BackendId = u32;

/// Value of the backends map: where a backend lives.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct BackendValue {
    pub addr: Addr,
    /// Backend port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    pub flags: u32,
}

/// Direction tags of connection-tracking keys.
/// Client -> frontend, seen at ingress; the value is the backend.
pub const CT_FORWARD: u8 = 0;
/// Seen at egress, where a packet is either kind and one lookup finds it:
/// - a reply, backend -> client; the value is the frontend, restored as
///   the source;
/// - with [`CT_FLAG_SNAT_OUT`], the forward packet of a masqueraded flow,
///   client -> backend after the DNAT; the value is the node address and
///   port the source becomes.
///
/// Both kinds never share a tuple: at one hook, a tuple is one connection.
pub const CT_EGRESS: u8 = 1;
/// What `CT_EGRESS` entries with [`CT_FLAG_SNAT_OUT`] were keyed by before
/// the two kinds shared one tag: read once at load, to move live flows.
pub const CT_SNAT_OUT_OLD: u8 = 2;
/// Backend -> node address and port of a masqueraded flow, seen at ingress;
/// the value is the client, restored as the destination.
pub const CT_SNAT_IN: u8 = 3;

/// Key of the connection-tracking map: the 5-tuple as the packet carries it.
///
/// A forward entry is keyed by the client's tuple towards the VIP; a reply
/// entry by the backend's tuple towards the client.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtKey {
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub dir: u8,
    pub _pad0: u8,
}

/// Connection-tracking flags.
pub const CT_FLAG_SEEN_FIN: u16 = 1 << 0;
pub const CT_FLAG_SEEN_RST: u16 = 1 << 1;
/// The flow is masqueraded (it has masquerade entries at egress and
/// `CT_SNAT_IN`).
pub const CT_FLAG_SNAT: u16 = 1 << 2;
/// The flow's service has session affinity: its packets keep the client's
/// affinity entry fresh.
pub const CT_FLAG_AFFINITY: u16 = 1 << 3;
/// This direction of a TCP flow has carried a segment without SYN, so its
/// handshake is over: a SYN on its tuple now opens another connection
/// (a client reusing the port, perhaps straight to the backend), and the
/// entry must not translate it.
pub const CT_FLAG_ESTABLISHED: u16 = 1 << 4;
/// A [`CT_EGRESS`] entry of the masquerade kind (not a reply).
pub const CT_FLAG_SNAT_OUT: u16 = 1 << 5;

/// Value of the connection-tracking map.
///
/// Forward entries carry the backend to DNAT to; reply entries the VIP to
/// restore as the source. The translated address is stored in the entry
/// itself so that a flow keeps working after its backend leaves the table
/// (graceful termination): only new flows consult the services map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtValue {
    pub nat_addr: Addr,
    /// Network byte order.
    pub nat_port: u16,
    pub flags: u16,
    pub backend_id: BackendId,
    /// The frontend view (`ServiceValue::svc_id`) the flow was sent through.
    pub svc_id: u32,
    /// The interface the flow's first packet came in by, where the flow
    /// was translated (0: unknown). A packet on another interface that
    /// looks like a client reaching the backend directly is most likely the
    /// flow's own translated packet, passed up by a bridge to a second
    /// hook (see `forget_flow_on_tuple` in the programs).
    pub in_ifindex: u32,
    /// `bpf_ktime_get_ns()` of the last packet, refreshed at most once a second.
    pub last_seen_ns: u64,
}

/// Key of the affinity map: a client of one frontend view.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    pub svc_id: u32,
    pub family: u8,
    pub _pad0: [u8; 3],
    pub client: Addr,
}

/// Value of the affinity map: the backend a client was last sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityValue {
    pub backend_id: BackendId,
    pub _pad0: u32,
    pub last_seen_ns: u64,
}

/// Key of the members map: a backend of a frontend view with affinity. An
/// affinity entry is used only while its backend is still a member, so a
/// client never returns to a backend that left.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct MemberKey {
    pub svc_id: u32,
    pub backend_id: BackendId,
}

/// Data of the source-ranges LPM trie key (the prefix length counts the
/// 32 bits of `svc_id`, then address bits). An IPv4 range uses the first
/// four bytes of `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct SourceRangeKey {
    /// Big-endian, so that it is the leading 32 bits of the trie key.
    pub svc_id_be: u32,
    pub addr: Addr,
}

/// Data of the service-CIDRs LPM trie key: the prefix length counts the
/// 32 bits of the family (so IPv4 and IPv6 ranges never meet), then
/// address bits. An IPv4 range uses the first four bytes of `addr`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceCidrKey {
    /// [`FAMILY_V4`] or [`FAMILY_V6`], big-endian.
    pub family_be: u32,
    pub addr: Addr,
}

/// Key of the node-addresses map: an address of this node NodePorts are
/// served on.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NodeAddrKey {
    pub addr: Addr,
    pub family: u8,
    pub _pad0: [u8; 3],
}

/// Key of the socket reverse-translation map: a socket (its cookie) and the
/// backend the socket hooks gave it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRevKey {
    pub cookie: u64,
    pub addr: Addr,
    /// Network byte order, as in memory.
    pub port: u16,
    pub family: u8,
    pub _pad0: [u8; 5],
}

impl SockRevKey {
    /// The key of socket `cookie` and its peer `addr:port` (the port in
    /// network byte order), the padding zeroed as both sides must have it.
    #[inline(always)]
    pub const fn new(cookie: u64, family: u8, addr: Addr, port: u16) -> Self {
        SockRevKey {
            cookie,
            addr,
            port,
            family,
            _pad0: [0; 5],
        }
    }
}

/// Value of the socket reverse-translation map: the frontend the socket
/// asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRevValue {
    pub addr: Addr,
    pub port: u16,
    pub _pad0: [u8; 6],
}

/// [`SockPod::flags`]: the pod has an address of the family in the cluster
/// CIDR.
pub const SOCK_POD_V4: u8 = 1 << 0;
pub const SOCK_POD_V6: u8 = 1 << 1;

/// Value of the pods' namespaces map: the pod's own addresses, so that a
/// pod reaching itself through a frontend (hairpin, which is masqueraded)
/// keeps the packet path.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockPod {
    pub v4: Addr,
    pub v6: Addr,
    pub flags: u8,
    pub _pad0: [u8; 7],
}

/// Flags of [`NodeConfig`].
pub const CFG_SNAT_V4: u32 = 1 << 0;
pub const CFG_SNAT_V6: u32 = 1 << 1;
pub const CFG_CLUSTER_V4: u32 = 1 << 2;
pub const CFG_CLUSTER_V6: u32 = 1 << 3;
// Bit 4 (once `--masquerade-all`) is retired: the agent's plan decides
// masquerade per view (`SVC_MASQUERADE`).
/// Packets the ingress program translates get bit
/// [`NodeConfig::translated_mark_bit`] of their mark, and a marked packet
/// is not translated again at a later ingress hook of the node (a bridge's
/// own after its port's, a bond's after its slave's).
pub const CFG_TRANSLATED_MARK: u32 = 1 << 5;

/// The packet-mark bit of [`CFG_TRANSLATED_MARK`] unless configured: bit
/// 12 (0x1000), outside the bits kube-proxy and kubelet use (0x4000
/// masquerade, 0x8000 drop), Cilium's (0x0f00 and the upper half) and
/// Calico's (the upper half).
pub const TRANSLATED_MARK_BIT: u8 = 12;

/// The single entry of the config array: the node's network facts.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct NodeConfig {
    /// Source address of masqueraded traffic, per family.
    pub snat_v4: Addr,
    pub snat_v6: Addr,
    /// The cluster (pod) CIDR per family, and prefix lengths.
    pub cluster_v4: Addr,
    pub cluster_v6: Addr,
    pub cluster_v4_len: u8,
    pub cluster_v6_len: u8,
    /// With [`CFG_TRANSLATED_MARK`]: the bit of the packet mark that says
    /// "translated at an ingress hook of this node" (0-31). In what was
    /// padding, so that a pinned config map of an earlier version fits.
    pub translated_mark_bit: u8,
    pub _pad0: u8,
    pub flags: u32,
    /// Masquerade source ports: two inclusive ranges, host byte order,
    /// around the node's ephemeral range and the NodePort range. A range
    /// whose `min` is 0 is empty.
    pub snat_port_min: u16,
    pub snat_port_max: u16,
    pub snat_low_min: u16,
    pub snat_low_max: u16,
}

/// Default masquerade port ranges, for Linux's default ephemeral range
/// (32768-60999) and the default NodePort range (30000-32767): masqueraded
/// flows never collide with the node's own connections nor with NodePorts.
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_MAX: u16 = 65_535;
pub const SNAT_LOW_PORT_MIN: u16 = 1_024;
pub const SNAT_LOW_PORT_MAX: u16 = 29_999;
/// A TCP flow's masquerade port is not given to a flow of another client
/// tuple for this long after its last packet, even once the flow has
/// closed, while other ports are free: the backend may hold its end in
/// TIME_WAIT (60 s on Linux) and would refuse that SYN, whose timestamps
/// run on another connection's clock.
pub const SNAT_TCP_HOLD_NS: u64 = 65 * 1_000_000_000;
/// Ports tried for one new masqueraded flow before giving up.
pub const SNAT_PORT_ATTEMPTS: u32 = 32;

/// Lifetimes of connection-tracking entries, in nanoseconds.
pub const CT_LIFETIME_TCP_NS: u64 = 6 * 3600 * 1_000_000_000;
pub const CT_LIFETIME_TCP_CLOSING_NS: u64 = 10 * 1_000_000_000;
pub const CT_LIFETIME_NON_TCP_NS: u64 = 60 * 1_000_000_000;
/// Refresh `last_seen_ns` only when it is older than this, to spare writes.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

/// Indices of the per-CPU counters in the stats map: one for every reason a
/// packet is translated, passed or dropped, so nothing happens silently.
pub mod stat {
    pub const PASS_NOT_IP: u32 = 0;
    pub const PASS_TRUNCATED: u32 = 1;
    pub const PASS_FRAGMENT: u32 = 2;
    pub const PASS_OTHER_PROTO: u32 = 3;
    pub const PASS_NO_SERVICE: u32 = 4;
    pub const DNAT_NEW: u32 = 5;
    pub const DNAT_ESTABLISHED: u32 = 6;
    pub const REVNAT: u32 = 7;
    pub const DROP_NO_BACKEND: u32 = 8;
    pub const PASS_BACKEND_MISSING: u32 = 9;
    pub const ERR_REWRITE: u32 = 10;
    pub const PASS_IPV6: u32 = 11;
    /// An answer on a flow's tuple that the flow no longer owns (silent
    /// past its lifetime, or the tuple taken by a direct connection):
    /// passed as it is, once, and the entry removed. Harmless: netfilter's
    /// conntrack passes such an answer after its timeout too.
    pub const PASS_NO_REPLY: u32 = 12;
    pub const DROP_SOURCE_RANGE: u32 = 13;
    pub const REJECT: u32 = 14;
    pub const DROP_NO_LOCAL_BACKEND: u32 = 15;
    pub const AFFINITY_HIT: u32 = 16;
    pub const SNAT_NEW: u32 = 17;
    pub const DROP_SNAT_EXHAUSTED: u32 = 18;
    pub const SNAT_OUT: u32 = 19;
    pub const SNAT_IN: u32 = 20;
    pub const PASS_NO_SNAT_ADDRESS: u32 = 21;
    pub const ERR_REJECT: u32 = 22;
    /// A tail call to the next stage failed (its slot is empty): the
    /// program array was not filled, which only a broken load can cause.
    pub const ERR_TAIL_CALL: u32 = 23;
    /// A socket call of the node's own to a frontend was given a backend.
    pub const SOCK_TRANSLATED: u32 = 24;
    /// A socket call to a frontend without endpoints was refused.
    pub const SOCK_REFUSED: u32 = 25;
    /// A received datagram or a peer name was given its frontend back.
    pub const SOCK_REVNAT: u32 = 26;
    /// An ICMP error about a translated flow was translated with it.
    pub const ICMP_ERROR_NAT: u32 = 27;
    /// A UDP or SCTP client sent straight to a backend from the port of a
    /// flow it had with that backend through a frontend: the old flow was
    /// forgotten, so the answers are not translated as its were.
    pub const FLOW_TUPLE_REUSED: u32 = 28;
    /// A packet to an address of a ServiceCIDR that no Service holds
    /// (kube-proxy's "drop traffic to unallocated ClusterIPs").
    pub const DROP_UNALLOCATED: u32 = 29;
    /// A masqueraded flow got a port whose closed flow, another client
    /// tuple's, the backend may still hold in TIME_WAIT: every port tried
    /// was taken.
    /// The connection may wait for a SYN retransmit.
    pub const SNAT_PORT_REUSED_EARLY: u32 = 30;
    /// A pod's socket call to a frontend was given a backend (socket-level
    /// load balancing: its packets need no translation).
    pub const SOCK_POD_TRANSLATED: u32 = 31;
    /// A packet already translated at an earlier ingress hook of the node
    /// (its mark says so) passed untouched: one translation per packet.
    pub const PASS_TRANSLATED: u32 = 32;
    /// A TCP packet past its handshake (no SYN) of a flow the datapath
    /// does not know passed untouched: netfilter's conntrack may carry it
    /// (a flow an earlier mode, or kube-proxy, translated before this one
    /// started), and a backend picked now would not know the connection.
    pub const PASS_NO_FLOW: u32 = 33;
    pub const COUNT: u32 = 34;

    /// Human names, indexed like the constants above.
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_ip",
        "pass_truncated",
        "pass_fragment",
        "pass_other_proto",
        "pass_no_service",
        "dnat_new",
        "dnat_established",
        "revnat",
        "drop_no_backend",
        "pass_backend_missing",
        "err_rewrite",
        "pass_ipv6",
        "pass_no_reply",
        "drop_source_range",
        "reject",
        "drop_no_local_backend",
        "affinity_hit",
        "snat_new",
        "drop_snat_exhausted",
        "snat_out",
        "snat_in",
        "pass_no_snat_address",
        "err_reject",
        "err_tail_call",
        "sock_translated",
        "sock_refused",
        "sock_revnat",
        "icmp_error_nat",
        "flow_tuple_reused",
        "drop_unallocated",
        "snat_port_reused_early",
        "sock_pod_translated",
        "pass_translated",
        "pass_no_flow",
    ];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each type is #[repr(C)], Copy, has no implicit padding (every
    // gap is a named `_pad` field) and is valid for any bit pattern.
    unsafe impl aya::Pod for ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for BackendValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AffinityValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for MemberKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SourceRangeKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NodeAddrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ServiceCidrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NodeConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockRevKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockRevValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockPod {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 16 + 2 + 1 + 1 + 1 + 1 + 2);
        assert_eq!(size_of::<ServiceValue>(), 4 + 2 + 2 + 4 + 4 + 4 + 4);
        assert_eq!(size_of::<BackendValue>(), 16 + 2 + 1 + 1 + 4);
        assert_eq!(size_of::<CtKey>(), 16 + 16 + 2 + 2 + 1 + 1 + 1 + 1);
        assert_eq!(size_of::<CtValue>(), 16 + 2 + 2 + 4 + 4 + 4 + 8);
        assert_eq!(size_of::<AffinityKey>(), 4 + 1 + 3 + 16);
        assert_eq!(size_of::<AffinityValue>(), 4 + 4 + 8);
        assert_eq!(size_of::<MemberKey>(), 8);
        assert_eq!(size_of::<SourceRangeKey>(), 4 + 16);
        assert_eq!(size_of::<ServiceCidrKey>(), 4 + 16);
        assert_eq!(size_of::<NodeAddrKey>(), 16 + 1 + 3);
        assert_eq!(size_of::<SockRevKey>(), 8 + 16 + 2 + 1 + 5);
        assert_eq!(size_of::<SockRevValue>(), 16 + 2 + 6);
        assert_eq!(size_of::<SockPod>(), 16 + 16 + 1 + 7);
        assert_eq!(
            size_of::<NodeConfig>(),
            4 * 16 + 1 + 1 + 1 + 1 + 4 + 2 + 2 + 4
        );
    }
}
