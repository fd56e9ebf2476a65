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

/// Names of the maps, as pinned under `<bpf-root>/maps/`.
pub const MAP_SERVICES: &str = "PA_SERVICES";
pub const MAP_BACKENDS: &str = "PA_BACKENDS";
pub const MAP_CONNTRACK: &str = "PA_CONNTRACK";
pub const MAP_STATS: &str = "PA_STATS";

/// Names of the TC programs in the object file.
pub const PROG_INGRESS: &str = "pa_ingress";
pub const PROG_EGRESS: &str = "pa_egress";
/// An empty TC program: the floor of the per-packet benchmark harness.
pub const PROG_FLOOR: &str = "pa_floor";

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceKey {
    pub addr: Addr,
    /// Destination port, network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
    /// Reserved for traffic-policy scopes (external / internal view).
    pub scope: u8,
    pub _pad0: u8,
    pub slot: u16,
}

/// Value of the services map. Slot 0 uses `count` and `flags`; backend slots
/// use `backend_id`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceValue {
    pub backend_id: u32,
    pub count: u16,
    pub _pad0: u16,
    pub flags: u32,
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
pub const CT_FORWARD: u8 = 0;
pub const CT_REPLY: u8 = 1;

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
    /// `bpf_ktime_get_ns()` of the last packet, refreshed at most once a second.
    pub last_seen_ns: u64,
}

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
    pub const PASS_NO_REPLY: u32 = 12;
    pub const COUNT: u32 = 16;

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
        "unused13",
        "unused14",
        "unused15",
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 16 + 2 + 1 + 1 + 1 + 1 + 2);
        assert_eq!(size_of::<ServiceValue>(), 4 + 2 + 2 + 4 + 4);
        assert_eq!(size_of::<BackendValue>(), 16 + 2 + 1 + 1 + 4);
        assert_eq!(size_of::<CtKey>(), 16 + 16 + 2 + 2 + 1 + 1 + 1 + 1);
        assert_eq!(size_of::<CtValue>(), 16 + 2 + 2 + 4 + 8);
    }
}
