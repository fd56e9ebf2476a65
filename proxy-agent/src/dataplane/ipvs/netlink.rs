//! IPVS over generic netlink: the family `IPVS` of `linux/ip_vs.h`, as
//! ipvsadm and kube-proxy (through moby/ipvs) speak it.
//!
//! The framing (netlink header, generic netlink header, family resolution
//! through the controller) is netlink-packet-core's and
//! netlink-packet-generic's; the IPVS commands and attributes are typed
//! here, since no crate of the tree covers them. Every attribute the kernel
//! sends is parsed into a typed value or kept as an unknown one, never a
//! panic: a newer kernel may add attributes.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::dataplane::netlink_socket::{connected, restarting};
use netlink_packet_core::{
    DecodeError, DefaultNla, Emitable, NLA_F_NESTED, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, Nla, NlaBuffer, NlasIterator,
    Parseable, ParseableParametrized, emit_u16, emit_u16_be, emit_u32, parse_string, parse_u16,
    parse_u16_be, parse_u32, parse_u64,
};
use netlink_packet_generic::{
    GenlFamily, GenlHeader, GenlMessage,
    ctrl::{GenlCtrl, GenlCtrlCmd, nlas::GenlCtrlAttrs},
};

// ---------------------------------------------------------------------------
// linux/ip_vs.h

const IPVS_GENL_NAME: &str = "IPVS";
const IPVS_GENL_VERSION: u8 = 1;

const IPVS_CMD_NEW_SERVICE: u8 = 1;
const IPVS_CMD_SET_SERVICE: u8 = 2;
const IPVS_CMD_DEL_SERVICE: u8 = 3;
const IPVS_CMD_GET_SERVICE: u8 = 4;
const IPVS_CMD_NEW_DEST: u8 = 5;
const IPVS_CMD_SET_DEST: u8 = 6;
const IPVS_CMD_DEL_DEST: u8 = 7;
const IPVS_CMD_GET_DEST: u8 = 8;
const IPVS_CMD_SET_CONFIG: u8 = 12;
const IPVS_CMD_GET_CONFIG: u8 = 13;
const IPVS_CMD_FLUSH: u8 = 17;

const IPVS_CMD_ATTR_SERVICE: u16 = 1;
const IPVS_CMD_ATTR_DEST: u16 = 2;
const IPVS_CMD_ATTR_TIMEOUT_TCP: u16 = 4;
const IPVS_CMD_ATTR_TIMEOUT_TCP_FIN: u16 = 5;
const IPVS_CMD_ATTR_TIMEOUT_UDP: u16 = 6;

const IPVS_SVC_ATTR_AF: u16 = 1;
const IPVS_SVC_ATTR_PROTOCOL: u16 = 2;
const IPVS_SVC_ATTR_ADDR: u16 = 3;
const IPVS_SVC_ATTR_PORT: u16 = 4;
const IPVS_SVC_ATTR_FWMARK: u16 = 5;
const IPVS_SVC_ATTR_SCHED_NAME: u16 = 6;
const IPVS_SVC_ATTR_FLAGS: u16 = 7;
const IPVS_SVC_ATTR_TIMEOUT: u16 = 8;
const IPVS_SVC_ATTR_NETMASK: u16 = 9;
const IPVS_SVC_ATTR_STATS: u16 = 10;
const IPVS_SVC_ATTR_STATS64: u16 = 12;

const IPVS_DEST_ATTR_ADDR: u16 = 1;
const IPVS_DEST_ATTR_PORT: u16 = 2;
const IPVS_DEST_ATTR_FWD_METHOD: u16 = 3;
const IPVS_DEST_ATTR_WEIGHT: u16 = 4;
const IPVS_DEST_ATTR_U_THRESH: u16 = 5;
const IPVS_DEST_ATTR_L_THRESH: u16 = 6;
const IPVS_DEST_ATTR_ACTIVE_CONNS: u16 = 7;
const IPVS_DEST_ATTR_INACT_CONNS: u16 = 8;
const IPVS_DEST_ATTR_PERSIST_CONNS: u16 = 9;
const IPVS_DEST_ATTR_STATS: u16 = 10;
const IPVS_DEST_ATTR_ADDR_FAMILY: u16 = 11;
const IPVS_DEST_ATTR_STATS64: u16 = 12;

const IPVS_STATS_ATTR_CONNS: u16 = 1;
const IPVS_STATS_ATTR_INPKTS: u16 = 2;
const IPVS_STATS_ATTR_OUTPKTS: u16 = 3;
const IPVS_STATS_ATTR_INBYTES: u16 = 4;
const IPVS_STATS_ATTR_OUTBYTES: u16 = 5;

/// `IP_VS_SVC_F_PERSISTENT`: connections of one client go to one real
/// server for the service's timeout (session affinity `ClientIP`).
const IP_VS_SVC_F_PERSISTENT: u32 = 0x1;
/// `IP_VS_CONN_F_MASQ`: NAT forwarding, the only one kube-proxy uses.
pub const IP_VS_CONN_F_MASQ: u32 = 0;

const AF_INET: u16 = libc::AF_INET as u16;
const AF_INET6: u16 = libc::AF_INET6 as u16;

/// `union nf_inet_addr`: every address attribute is 16 bytes.
const ADDR_LEN: usize = 16;

// ---------------------------------------------------------------------------
// The typed objects.

/// What identifies a virtual server: protocol, address, port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceId {
    /// `IPPROTO_TCP`, `IPPROTO_UDP` or `IPPROTO_SCTP`.
    pub protocol: u16,
    pub addr: IpAddr,
    pub port: u16,
}

/// IPVS's connection timeouts in seconds (`ipvsadm --set tcp tcpfin udp`):
/// established TCP, TCP after a FIN, UDP. Written, `None` leaves one as it
/// is (the kernel takes 0 to mean the same).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub tcp: Option<u32>,
    pub tcp_fin: Option<u32>,
    pub udp: Option<u32>,
}

impl Timeouts {
    fn nlas(&self) -> Vec<IpvsNla> {
        [
            (IPVS_CMD_ATTR_TIMEOUT_TCP, self.tcp),
            (IPVS_CMD_ATTR_TIMEOUT_TCP_FIN, self.tcp_fin),
            (IPVS_CMD_ATTR_TIMEOUT_UDP, self.udp),
        ]
        .into_iter()
        .filter_map(|(kind, value)| {
            let value = value.filter(|v| *v > 0)?;
            Some(IpvsNla::Other(DefaultNla::new(
                kind,
                value.to_ne_bytes().to_vec(),
            )))
        })
        .collect()
    }

    fn parse(nlas: &[IpvsNla]) -> Result<Timeouts, DecodeError> {
        let mut out = Timeouts::default();
        for nla in nlas {
            if let IpvsNla::Other(nla) = nla {
                let value = || -> Result<Option<u32>, DecodeError> {
                    let mut bytes = [0u8; 4];
                    let mut payload = vec![0u8; nla.value_len()];
                    nla.emit_value(&mut payload);
                    if payload.len() != 4 {
                        return Err(DecodeError::from(format!(
                            "timeout attribute {} of {} bytes",
                            nla.kind(),
                            payload.len()
                        )));
                    }
                    bytes.copy_from_slice(&payload);
                    Ok(Some(u32::from_ne_bytes(bytes)))
                };
                match nla.kind() {
                    IPVS_CMD_ATTR_TIMEOUT_TCP => out.tcp = value()?,
                    IPVS_CMD_ATTR_TIMEOUT_TCP_FIN => out.tcp_fin = value()?,
                    IPVS_CMD_ATTR_TIMEOUT_UDP => out.udp = value()?,
                    _ => {}
                }
            }
        }
        Ok(out)
    }
}

/// A virtual server, as written (statistics are read only).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VirtualServer {
    pub id: ServiceId,
    pub scheduler: String,
    /// Persistence timeout in seconds (session affinity), if persistent.
    pub persistence: Option<u32>,
    /// The persistence netmask: all ones (/32, /128) for one client.
    pub netmask: u32,
    pub stats: Stats,
}

impl VirtualServer {
    /// A virtual server as kube-proxy writes them: scheduler `scheduler`,
    /// persistent for `affinity` seconds when set, one client per
    /// persistence entry.
    pub fn new(id: ServiceId, scheduler: &str, affinity: Option<u32>) -> Self {
        VirtualServer {
            id,
            scheduler: scheduler.to_string(),
            persistence: affinity,
            netmask: match id.addr {
                IpAddr::V4(_) => u32::MAX,
                IpAddr::V6(_) => 128,
            },
            stats: Stats::default(),
        }
    }

    /// Whether `other` is the same configuration (statistics aside).
    pub fn same_config(&self, other: &VirtualServer) -> bool {
        self.id == other.id
            && self.scheduler == other.scheduler
            && self.persistence == other.persistence
            && self.netmask == other.netmask
    }
}

/// A real server of a virtual server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RealServer {
    pub addr: IpAddr,
    pub port: u16,
    pub weight: u32,
    /// `IP_VS_CONN_F_*` forwarding method; kube-proxy's is masquerading.
    pub forwarding: u32,
    pub active_conns: u32,
    pub inactive_conns: u32,
    pub persistent_conns: u32,
    pub stats: Stats,
}

impl RealServer {
    /// A masquerading real server of weight `weight`.
    pub fn masq(addr: IpAddr, port: u16, weight: u32) -> Self {
        RealServer {
            addr,
            port,
            weight,
            forwarding: IP_VS_CONN_F_MASQ,
            active_conns: 0,
            inactive_conns: 0,
            persistent_conns: 0,
            stats: Stats::default(),
        }
    }
}

/// IPVS's counters of a virtual or real server (`ipvsadm --stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub connections: u64,
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

// ---------------------------------------------------------------------------
// Attributes.

/// A nested attribute's value: its attributes, emitted one after the other.
fn nested_len<T: Nla>(nlas: &[T]) -> usize {
    nlas.iter().map(Emitable::buffer_len).sum()
}

fn emit_nested<T: Nla>(nlas: &[T], buffer: &mut [u8]) {
    let mut at = 0;
    for nla in nlas {
        let len = nla.buffer_len();
        nla.emit(&mut buffer[at..at + len]);
        at += len;
    }
}

fn addr_bytes(addr: IpAddr) -> [u8; ADDR_LEN] {
    let mut bytes = [0u8; ADDR_LEN];
    match addr {
        IpAddr::V4(a) => bytes[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => bytes = a.octets(),
    }
    bytes
}

fn family_of(addr: IpAddr) -> u16 {
    match addr {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

/// The address of a 16-byte `nf_inet_addr` of family `af`.
fn parse_addr(af: u16, bytes: &[u8; ADDR_LEN]) -> Result<IpAddr, DecodeError> {
    match af {
        AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(
            bytes[0], bytes[1], bytes[2], bytes[3],
        ))),
        AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(*bytes))),
        other => Err(DecodeError::from(format!("address family {other}"))),
    }
}

fn parse_addr_bytes(payload: &[u8]) -> Result<[u8; ADDR_LEN], DecodeError> {
    // A shorter attribute is a shorter address (IPv4), zero-filled as the
    // kernel's nla_memcpy does.
    if payload.len() > ADDR_LEN {
        return Err(DecodeError::from(format!(
            "address attribute of {} bytes",
            payload.len()
        )));
    }
    let mut bytes = [0u8; ADDR_LEN];
    bytes[..payload.len()].copy_from_slice(payload);
    Ok(bytes)
}

/// A counter attribute of the stats (u32) or stats64 (u64) nest.
fn parse_counter(payload: &[u8]) -> Result<u64, DecodeError> {
    match payload.len() {
        4 => parse_u32(payload).map(u64::from),
        8 => parse_u64(payload),
        n => Err(DecodeError::from(format!("counter of {n} bytes"))),
    }
}

fn parse_stats(payload: &[u8]) -> Result<Stats, DecodeError> {
    let mut stats = Stats::default();
    for nla in NlasIterator::new(payload) {
        let nla = nla?;
        let value = nla.value();
        match nla.kind() {
            IPVS_STATS_ATTR_CONNS => stats.connections = parse_counter(value)?,
            IPVS_STATS_ATTR_INPKTS => stats.packets_in = parse_counter(value)?,
            IPVS_STATS_ATTR_OUTPKTS => stats.packets_out = parse_counter(value)?,
            IPVS_STATS_ATTR_INBYTES => stats.bytes_in = parse_counter(value)?,
            IPVS_STATS_ATTR_OUTBYTES => stats.bytes_out = parse_counter(value)?,
            _ => {}
        }
    }
    Ok(stats)
}

/// The length of a stats64 nest's value: five u64 counters.
const STATS64_LEN: usize = 5 * (4 + 8);

/// Writes `stats` as a stats64 nest's value (what a kernel sends; the
/// tests write it to parse it back).
fn emit_stats64(stats: &Stats, buffer: &mut [u8]) {
    let counters = [
        (IPVS_STATS_ATTR_CONNS, stats.connections),
        (IPVS_STATS_ATTR_INPKTS, stats.packets_in),
        (IPVS_STATS_ATTR_OUTPKTS, stats.packets_out),
        (IPVS_STATS_ATTR_INBYTES, stats.bytes_in),
        (IPVS_STATS_ATTR_OUTBYTES, stats.bytes_out),
    ];
    for (i, (kind, value)) in counters.into_iter().enumerate() {
        DefaultNla::new(kind, value.to_ne_bytes().to_vec()).emit(&mut buffer[i * 12..(i + 1) * 12]);
    }
}

/// An attribute of the service nest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum ServiceNla {
    Af(u16),
    Protocol(u16),
    Addr([u8; ADDR_LEN]),
    Port(u16),
    Fwmark(u32),
    Scheduler(String),
    /// `struct ip_vs_flags`: the flags, and which of them to set.
    Flags {
        flags: u32,
        mask: u32,
    },
    Timeout(u32),
    Netmask(u32),
    Stats(Stats),
    Other(DefaultNla),
}

impl Nla for ServiceNla {
    fn value_len(&self) -> usize {
        match self {
            ServiceNla::Af(_) | ServiceNla::Protocol(_) | ServiceNla::Port(_) => 2,
            ServiceNla::Addr(_) => ADDR_LEN,
            ServiceNla::Fwmark(_) | ServiceNla::Timeout(_) | ServiceNla::Netmask(_) => 4,
            ServiceNla::Scheduler(name) => name.len() + 1,
            ServiceNla::Flags { .. } => 8,
            ServiceNla::Stats(_) => STATS64_LEN,
            ServiceNla::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            ServiceNla::Af(_) => IPVS_SVC_ATTR_AF,
            ServiceNla::Protocol(_) => IPVS_SVC_ATTR_PROTOCOL,
            ServiceNla::Addr(_) => IPVS_SVC_ATTR_ADDR,
            ServiceNla::Port(_) => IPVS_SVC_ATTR_PORT,
            ServiceNla::Fwmark(_) => IPVS_SVC_ATTR_FWMARK,
            ServiceNla::Scheduler(_) => IPVS_SVC_ATTR_SCHED_NAME,
            ServiceNla::Flags { .. } => IPVS_SVC_ATTR_FLAGS,
            ServiceNla::Timeout(_) => IPVS_SVC_ATTR_TIMEOUT,
            ServiceNla::Netmask(_) => IPVS_SVC_ATTR_NETMASK,
            ServiceNla::Stats(_) => IPVS_SVC_ATTR_STATS64 | NLA_F_NESTED,
            ServiceNla::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        // The buffer is exactly `value_len` long: the emits cannot fail.
        match self {
            ServiceNla::Af(v) | ServiceNla::Protocol(v) => {
                let _ = emit_u16(buffer, *v);
            }
            ServiceNla::Port(port) => {
                let _ = emit_u16_be(buffer, *port);
            }
            ServiceNla::Addr(bytes) => buffer.copy_from_slice(bytes),
            ServiceNla::Fwmark(v) | ServiceNla::Timeout(v) | ServiceNla::Netmask(v) => {
                let _ = emit_u32(buffer, *v);
            }
            ServiceNla::Scheduler(name) => {
                buffer[..name.len()].copy_from_slice(name.as_bytes());
                buffer[name.len()] = 0;
            }
            ServiceNla::Flags { flags, mask } => {
                let _ = emit_u32(&mut buffer[..4], *flags);
                let _ = emit_u32(&mut buffer[4..], *mask);
            }
            ServiceNla::Stats(s) => emit_stats64(s, buffer),
            ServiceNla::Other(nla) => nla.emit_value(buffer),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for ServiceNla {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let value = buf.value();
        Ok(match buf.kind() {
            IPVS_SVC_ATTR_AF => ServiceNla::Af(parse_u16(value)?),
            IPVS_SVC_ATTR_PROTOCOL => ServiceNla::Protocol(parse_u16(value)?),
            IPVS_SVC_ATTR_ADDR => ServiceNla::Addr(parse_addr_bytes(value)?),
            IPVS_SVC_ATTR_PORT => ServiceNla::Port(parse_u16_be(value)?),
            IPVS_SVC_ATTR_FWMARK => ServiceNla::Fwmark(parse_u32(value)?),
            IPVS_SVC_ATTR_SCHED_NAME => ServiceNla::Scheduler(parse_string(value)?),
            IPVS_SVC_ATTR_FLAGS => {
                if value.len() != 8 {
                    return Err(DecodeError::from(format!("flags of {} bytes", value.len())));
                }
                ServiceNla::Flags {
                    flags: parse_u32(&value[..4])?,
                    mask: parse_u32(&value[4..])?,
                }
            }
            IPVS_SVC_ATTR_TIMEOUT => ServiceNla::Timeout(parse_u32(value)?),
            IPVS_SVC_ATTR_NETMASK => ServiceNla::Netmask(parse_u32(value)?),
            IPVS_SVC_ATTR_STATS | IPVS_SVC_ATTR_STATS64 => ServiceNla::Stats(parse_stats(value)?),
            _ => ServiceNla::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// An attribute of the destination (real server) nest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum DestNla {
    Addr([u8; ADDR_LEN]),
    Port(u16),
    FwdMethod(u32),
    Weight(u32),
    UpperThreshold(u32),
    LowerThreshold(u32),
    ActiveConns(u32),
    InactiveConns(u32),
    PersistentConns(u32),
    AddrFamily(u16),
    Stats(Stats),
    Other(DefaultNla),
}

impl Nla for DestNla {
    fn value_len(&self) -> usize {
        match self {
            DestNla::Addr(_) => ADDR_LEN,
            DestNla::Port(_) | DestNla::AddrFamily(_) => 2,
            DestNla::FwdMethod(_)
            | DestNla::Weight(_)
            | DestNla::UpperThreshold(_)
            | DestNla::LowerThreshold(_)
            | DestNla::ActiveConns(_)
            | DestNla::InactiveConns(_)
            | DestNla::PersistentConns(_) => 4,
            DestNla::Stats(_) => STATS64_LEN,
            DestNla::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            DestNla::Addr(_) => IPVS_DEST_ATTR_ADDR,
            DestNla::Port(_) => IPVS_DEST_ATTR_PORT,
            DestNla::FwdMethod(_) => IPVS_DEST_ATTR_FWD_METHOD,
            DestNla::Weight(_) => IPVS_DEST_ATTR_WEIGHT,
            DestNla::UpperThreshold(_) => IPVS_DEST_ATTR_U_THRESH,
            DestNla::LowerThreshold(_) => IPVS_DEST_ATTR_L_THRESH,
            DestNla::ActiveConns(_) => IPVS_DEST_ATTR_ACTIVE_CONNS,
            DestNla::InactiveConns(_) => IPVS_DEST_ATTR_INACT_CONNS,
            DestNla::PersistentConns(_) => IPVS_DEST_ATTR_PERSIST_CONNS,
            DestNla::AddrFamily(_) => IPVS_DEST_ATTR_ADDR_FAMILY,
            DestNla::Stats(_) => IPVS_DEST_ATTR_STATS64 | NLA_F_NESTED,
            DestNla::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            DestNla::Addr(bytes) => buffer.copy_from_slice(bytes),
            DestNla::Port(port) => {
                let _ = emit_u16_be(buffer, *port);
            }
            DestNla::AddrFamily(v) => {
                let _ = emit_u16(buffer, *v);
            }
            DestNla::FwdMethod(v)
            | DestNla::Weight(v)
            | DestNla::UpperThreshold(v)
            | DestNla::LowerThreshold(v)
            | DestNla::ActiveConns(v)
            | DestNla::InactiveConns(v)
            | DestNla::PersistentConns(v) => {
                let _ = emit_u32(buffer, *v);
            }
            DestNla::Stats(s) => emit_stats64(s, buffer),
            DestNla::Other(nla) => nla.emit_value(buffer),
        }
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for DestNla {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        let value = buf.value();
        Ok(match buf.kind() {
            IPVS_DEST_ATTR_ADDR => DestNla::Addr(parse_addr_bytes(value)?),
            IPVS_DEST_ATTR_PORT => DestNla::Port(parse_u16_be(value)?),
            IPVS_DEST_ATTR_FWD_METHOD => DestNla::FwdMethod(parse_u32(value)?),
            IPVS_DEST_ATTR_WEIGHT => DestNla::Weight(parse_u32(value)?),
            IPVS_DEST_ATTR_U_THRESH => DestNla::UpperThreshold(parse_u32(value)?),
            IPVS_DEST_ATTR_L_THRESH => DestNla::LowerThreshold(parse_u32(value)?),
            IPVS_DEST_ATTR_ACTIVE_CONNS => DestNla::ActiveConns(parse_u32(value)?),
            IPVS_DEST_ATTR_INACT_CONNS => DestNla::InactiveConns(parse_u32(value)?),
            IPVS_DEST_ATTR_PERSIST_CONNS => DestNla::PersistentConns(parse_u32(value)?),
            IPVS_DEST_ATTR_ADDR_FAMILY => DestNla::AddrFamily(parse_u16(value)?),
            IPVS_DEST_ATTR_STATS | IPVS_DEST_ATTR_STATS64 => DestNla::Stats(parse_stats(value)?),
            _ => DestNla::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// A top-level attribute of an IPVS message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum IpvsNla {
    Service(Vec<ServiceNla>),
    Dest(Vec<DestNla>),
    Other(DefaultNla),
}

impl Nla for IpvsNla {
    fn value_len(&self) -> usize {
        match self {
            IpvsNla::Service(nlas) => nested_len(nlas),
            IpvsNla::Dest(nlas) => nested_len(nlas),
            IpvsNla::Other(nla) => nla.value_len(),
        }
    }

    fn kind(&self) -> u16 {
        match self {
            IpvsNla::Service(_) => IPVS_CMD_ATTR_SERVICE | NLA_F_NESTED,
            IpvsNla::Dest(_) => IPVS_CMD_ATTR_DEST | NLA_F_NESTED,
            IpvsNla::Other(nla) => nla.kind(),
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            IpvsNla::Service(nlas) => emit_nested(nlas, buffer),
            IpvsNla::Dest(nlas) => emit_nested(nlas, buffer),
            IpvsNla::Other(nla) => nla.emit_value(buffer),
        }
    }
}

fn parse_nested<N>(payload: &[u8]) -> Result<Vec<N>, DecodeError>
where
    N: for<'a> Parseable<NlaBuffer<&'a [u8]>>,
{
    NlasIterator::new(payload)
        .map(|nla| N::parse(&nla?))
        .collect()
}

impl<'a, T: AsRef<[u8]> + ?Sized> Parseable<NlaBuffer<&'a T>> for IpvsNla {
    fn parse(buf: &NlaBuffer<&'a T>) -> Result<Self, DecodeError> {
        // The kernel sets NLA_F_NESTED on none of its IPVS nests; ours do.
        Ok(match buf.kind() & !NLA_F_NESTED {
            IPVS_CMD_ATTR_SERVICE => IpvsNla::Service(parse_nested(buf.value())?),
            IPVS_CMD_ATTR_DEST => IpvsNla::Dest(parse_nested(buf.value())?),
            _ => IpvsNla::Other(DefaultNla::parse(buf)?),
        })
    }
}

/// The payload of an IPVS generic netlink message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct IpvsMessage {
    pub(super) cmd: u8,
    pub(super) nlas: Vec<IpvsNla>,
}

impl GenlFamily for IpvsMessage {
    fn family_name() -> &'static str {
        IPVS_GENL_NAME
    }
    fn command(&self) -> u8 {
        self.cmd
    }
    fn version(&self) -> u8 {
        IPVS_GENL_VERSION
    }
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        nested_len(&self.nlas)
    }
    fn emit(&self, buffer: &mut [u8]) {
        emit_nested(&self.nlas, buffer)
    }
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        Ok(IpvsMessage {
            cmd: header.cmd,
            nlas: parse_nested(buf)?,
        })
    }
}

// ---------------------------------------------------------------------------
// Typed objects to and from attributes.

/// The attributes naming a virtual server (enough to delete it, or to name
/// it in a destination request).
fn service_id_nlas(id: &ServiceId) -> Vec<ServiceNla> {
    vec![
        ServiceNla::Af(family_of(id.addr)),
        ServiceNla::Protocol(id.protocol),
        ServiceNla::Addr(addr_bytes(id.addr)),
        ServiceNla::Port(id.port),
    ]
}

/// Every attribute a new or changed virtual server needs.
pub(super) fn service_nlas(vs: &VirtualServer) -> Vec<ServiceNla> {
    let mut nlas = service_id_nlas(&vs.id);
    nlas.extend([
        ServiceNla::Scheduler(vs.scheduler.clone()),
        ServiceNla::Flags {
            flags: if vs.persistence.is_some() {
                IP_VS_SVC_F_PERSISTENT
            } else {
                0
            },
            mask: IP_VS_SVC_F_PERSISTENT,
        },
        ServiceNla::Timeout(vs.persistence.unwrap_or(0)),
        ServiceNla::Netmask(vs.netmask),
    ]);
    nlas
}

/// The virtual server of a dump entry; `None` for a firewall-mark service
/// (which kube-proxy does not use and we never write).
pub(super) fn parse_service(nlas: &[ServiceNla]) -> Result<Option<VirtualServer>, DecodeError> {
    let (mut af, mut protocol, mut addr, mut port) = (None, None, None, None);
    let mut vs = VirtualServer {
        id: ServiceId {
            protocol: 0,
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 0,
        },
        scheduler: String::new(),
        persistence: None,
        netmask: 0,
        stats: Stats::default(),
    };
    let (mut flags, mut timeout) = (0, 0);
    for nla in nlas {
        match nla {
            ServiceNla::Af(v) => af = Some(*v),
            ServiceNla::Protocol(v) => protocol = Some(*v),
            ServiceNla::Addr(v) => addr = Some(*v),
            ServiceNla::Port(v) => port = Some(*v),
            ServiceNla::Fwmark(mark) if *mark != 0 => return Ok(None),
            ServiceNla::Scheduler(name) => vs.scheduler = name.clone(),
            ServiceNla::Flags { flags: f, .. } => flags = *f,
            ServiceNla::Timeout(v) => timeout = *v,
            ServiceNla::Netmask(v) => vs.netmask = *v,
            ServiceNla::Stats(s) => vs.stats = *s,
            _ => {}
        }
    }
    let af = af.ok_or_else(|| DecodeError::from("service without an address family"))?;
    let (Some(protocol), Some(addr), Some(port)) = (protocol, addr, port) else {
        return Ok(None);
    };
    vs.id = ServiceId {
        protocol,
        addr: parse_addr(af, &addr)?,
        port,
    };
    vs.persistence = (flags & IP_VS_SVC_F_PERSISTENT != 0).then_some(timeout);
    Ok(Some(vs))
}

/// Every attribute a new or changed real server needs.
pub(super) fn dest_nlas(rs: &RealServer) -> Vec<DestNla> {
    vec![
        DestNla::Addr(addr_bytes(rs.addr)),
        DestNla::Port(rs.port),
        DestNla::AddrFamily(family_of(rs.addr)),
        DestNla::FwdMethod(rs.forwarding),
        DestNla::Weight(rs.weight),
        DestNla::UpperThreshold(0),
        DestNla::LowerThreshold(0),
    ]
}

/// The real server of a dump entry of a virtual server of family `af`.
pub(super) fn parse_dest(af: u16, nlas: &[DestNla]) -> Result<RealServer, DecodeError> {
    let mut family = af;
    let (mut addr, mut port) = (None, None);
    let mut rs = RealServer::masq(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0, 0);
    for nla in nlas {
        match nla {
            DestNla::Addr(v) => addr = Some(*v),
            DestNla::Port(v) => port = Some(*v),
            DestNla::AddrFamily(v) => family = *v,
            DestNla::FwdMethod(v) => rs.forwarding = *v,
            DestNla::Weight(v) => rs.weight = *v,
            DestNla::ActiveConns(v) => rs.active_conns = *v,
            DestNla::InactiveConns(v) => rs.inactive_conns = *v,
            DestNla::PersistentConns(v) => rs.persistent_conns = *v,
            DestNla::Stats(s) => rs.stats = *s,
            _ => {}
        }
    }
    let (Some(addr), Some(port)) = (addr, port) else {
        return Err(DecodeError::from("real server without address or port"));
    };
    rs.addr = parse_addr(family, &addr)?;
    rs.port = port;
    Ok(rs)
}

// ---------------------------------------------------------------------------
// The socket.

/// What an IPVS request failed with.
#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    #[error("cannot open a generic netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("this kernel has no IPVS (generic netlink family IPVS unknown; modprobe ip_vs)")]
    NoIpvs,
    #[error("netlink I/O failed while {during}: {source}")]
    Io {
        during: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the kernel refused {request}: {source}")]
    Kernel {
        request: String,
        #[source]
        source: io::Error,
    },
    #[error("malformed netlink reply to {during}: {reason}")]
    Malformed {
        during: &'static str,
        reason: String,
    },
}

/// How long a reply may take before the request is given up.
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Room for one datagram of a dump (the kernel fills up to a page or two).
const RECV_BUFFER: usize = 64 * 1024;

/// A generic netlink socket speaking IPVS, in the calling thread's network
/// namespace (IPVS state is per namespace).
pub struct IpvsSocket {
    socket: netlink_sys::Socket,
    family: u16,
    seq: u32,
    buf: Vec<u8>,
}

impl IpvsSocket {
    /// Opens the socket and resolves the IPVS family; [`IpvsError::NoIpvs`]
    /// when the kernel has none (module not loaded or not built).
    pub fn open() -> Result<Self, IpvsError> {
        let socket = connected(netlink_sys::protocols::NETLINK_GENERIC, REPLY_TIMEOUT)
            .map_err(IpvsError::Socket)?;
        let mut this = IpvsSocket {
            socket,
            family: 0,
            seq: 0,
            buf: vec![0; RECV_BUFFER],
        };
        this.family = this.resolve_family()?;
        Ok(this)
    }

    fn resolve_family(&mut self) -> Result<u16, IpvsError> {
        let request = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(IPVS_GENL_NAME.to_string())],
        });
        let mut family = None;
        let outcome = self.exchange(
            request,
            NLM_F_REQUEST | NLM_F_ACK,
            "resolving the IPVS family",
            |reply: GenlMessage<GenlCtrl>| {
                for nla in &reply.payload.nlas {
                    if let GenlCtrlAttrs::FamilyId(id) = nla {
                        family = Some(*id);
                    }
                }
                Ok(())
            },
        );
        match outcome {
            Err(IpvsError::Kernel { source, .. })
                if source.raw_os_error() == Some(libc::ENOENT) =>
            {
                Err(IpvsError::NoIpvs)
            }
            Err(e) => Err(e),
            Ok(()) => family.ok_or(IpvsError::Malformed {
                during: "resolving the IPVS family",
                reason: "no family id in the reply".into(),
            }),
        }
    }

    fn request(&self, cmd: u8, nlas: Vec<IpvsNla>) -> GenlMessage<IpvsMessage> {
        let mut message = GenlMessage::from_payload(IpvsMessage { cmd, nlas });
        message.set_resolved_family_id(self.family);
        message
    }

    /// Sends `payload` with `flags` and feeds every reply message to
    /// `each` until the kernel's ack (or end of dump); a kernel error is
    /// [`IpvsError::Kernel`] naming `what`.
    fn exchange<Req, Rep>(
        &mut self,
        payload: Req,
        flags: u16,
        what: &'static str,
        mut each: impl FnMut(Rep) -> Result<(), IpvsError>,
    ) -> Result<(), IpvsError>
    where
        Req: netlink_packet_core::NetlinkSerializable + std::fmt::Debug,
        Rep: netlink_packet_core::NetlinkDeserializable + std::fmt::Debug,
    {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = seq;
        let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
        message.finalize();
        let mut datagram = vec![0u8; message.buffer_len()];
        message.serialize(&mut datagram);
        let sent =
            restarting(|| self.socket.send(&datagram, 0)).map_err(|source| IpvsError::Io {
                during: what,
                source,
            })?;
        if sent != datagram.len() {
            return Err(IpvsError::Io {
                during: what,
                source: io::Error::other("short netlink send"),
            });
        }
        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        loop {
            let len =
                restarting(|| self.socket.recv(&mut &mut self.buf[..], 0)).map_err(|source| {
                    IpvsError::Io {
                        during: what,
                        source,
                    }
                })?;
            let mut at = 0;
            while at < len {
                let bytes = &self.buf[at..len];
                let frame =
                    NetlinkBuffer::new_checked(bytes).map_err(|e| IpvsError::Malformed {
                        during: what,
                        reason: e.to_string(),
                    })?;
                let frame_len = (frame.length() as usize).max(16);
                let aligned = (frame_len + 3) & !3;
                let message =
                    NetlinkMessage::<Rep>::deserialize(&bytes[..frame_len.min(bytes.len())])
                        .map_err(|e| IpvsError::Malformed {
                            during: what,
                            reason: e.to_string(),
                        })?;
                at += aligned;
                if message.header.sequence_number != seq {
                    // A late reply to an earlier request given up on.
                    continue;
                }
                match message.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(()),
                            Some(code) => Err(IpvsError::Kernel {
                                request: what.to_string(),
                                source: io::Error::from_raw_os_error(-code.get()),
                            }),
                        };
                    }
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::InnerMessage(reply) => each(reply)?,
                    _ => {}
                }
            }
            if len == 0 && !dump {
                return Err(IpvsError::Io {
                    during: what,
                    source: io::Error::from(io::ErrorKind::UnexpectedEof),
                });
            }
        }
    }

    /// Every virtual server of the namespace (firewall-mark ones aside).
    pub fn services(&mut self) -> Result<Vec<VirtualServer>, IpvsError> {
        let request = self.request(IPVS_CMD_GET_SERVICE, vec![]);
        let mut out = Vec::new();
        self.exchange(
            request,
            NLM_F_REQUEST | NLM_F_DUMP,
            "listing the virtual servers",
            |reply: GenlMessage<IpvsMessage>| {
                for nla in reply.payload.nlas {
                    if let IpvsNla::Service(nlas) = nla {
                        let parsed = parse_service(&nlas).map_err(|e| IpvsError::Malformed {
                            during: "listing the virtual servers",
                            reason: e.to_string(),
                        })?;
                        out.extend(parsed);
                    }
                }
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// The real servers of virtual server `id`.
    pub fn real_servers(&mut self, id: &ServiceId) -> Result<Vec<RealServer>, IpvsError> {
        let request = self.request(
            IPVS_CMD_GET_DEST,
            vec![IpvsNla::Service(service_id_nlas(id))],
        );
        let af = family_of(id.addr);
        let mut out = Vec::new();
        self.exchange(
            request,
            NLM_F_REQUEST | NLM_F_DUMP,
            "listing real servers",
            |reply: GenlMessage<IpvsMessage>| {
                for nla in reply.payload.nlas {
                    if let IpvsNla::Dest(nlas) = nla {
                        out.push(parse_dest(af, &nlas).map_err(|e| IpvsError::Malformed {
                            during: "listing real servers",
                            reason: e.to_string(),
                        })?);
                    }
                }
                Ok(())
            },
        )?;
        Ok(out)
    }

    fn command(
        &mut self,
        cmd: u8,
        nlas: Vec<IpvsNla>,
        what: &'static str,
        target: impl FnOnce() -> String,
    ) -> Result<(), IpvsError> {
        let request = self.request(cmd, nlas);
        self.exchange(
            request,
            NLM_F_REQUEST | NLM_F_ACK,
            what,
            |_: GenlMessage<IpvsMessage>| Ok(()),
        )
        .map_err(|e| match e {
            IpvsError::Kernel { source, .. } => IpvsError::Kernel {
                request: format!("{what} {}", target()),
                source,
            },
            other => other,
        })
    }

    pub fn add_service(&mut self, vs: &VirtualServer) -> Result<(), IpvsError> {
        self.command(
            IPVS_CMD_NEW_SERVICE,
            vec![IpvsNla::Service(service_nlas(vs))],
            "adding virtual server",
            || describe(&vs.id),
        )
    }

    pub fn update_service(&mut self, vs: &VirtualServer) -> Result<(), IpvsError> {
        self.command(
            IPVS_CMD_SET_SERVICE,
            vec![IpvsNla::Service(service_nlas(vs))],
            "changing virtual server",
            || describe(&vs.id),
        )
    }

    pub fn delete_service(&mut self, id: &ServiceId) -> Result<(), IpvsError> {
        self.command(
            IPVS_CMD_DEL_SERVICE,
            vec![IpvsNla::Service(service_id_nlas(id))],
            "deleting virtual server",
            || describe(id),
        )
    }

    pub fn add_real_server(&mut self, id: &ServiceId, rs: &RealServer) -> Result<(), IpvsError> {
        self.command(
            IPVS_CMD_NEW_DEST,
            vec![
                IpvsNla::Service(service_id_nlas(id)),
                IpvsNla::Dest(dest_nlas(rs)),
            ],
            "adding real server",
            || format!("{} to {}", describe_addr(rs.addr, rs.port), describe(id)),
        )
    }

    pub fn update_real_server(&mut self, id: &ServiceId, rs: &RealServer) -> Result<(), IpvsError> {
        self.command(
            IPVS_CMD_SET_DEST,
            vec![
                IpvsNla::Service(service_id_nlas(id)),
                IpvsNla::Dest(dest_nlas(rs)),
            ],
            "changing real server",
            || format!("{} of {}", describe_addr(rs.addr, rs.port), describe(id)),
        )
    }

    pub fn delete_real_server(
        &mut self,
        id: &ServiceId,
        addr: IpAddr,
        port: u16,
    ) -> Result<(), IpvsError> {
        self.command(
            IPVS_CMD_DEL_DEST,
            vec![
                IpvsNla::Service(service_id_nlas(id)),
                IpvsNla::Dest(vec![
                    DestNla::Addr(addr_bytes(addr)),
                    DestNla::Port(port),
                    DestNla::AddrFamily(family_of(addr)),
                ]),
            ],
            "deleting real server",
            || format!("{} of {}", describe_addr(addr, port), describe(id)),
        )
    }

    /// Sets the connection timeouts that `timeouts` names (`ipvsadm --set`).
    pub fn set_timeouts(&mut self, timeouts: &Timeouts) -> Result<(), IpvsError> {
        let nlas = timeouts.nlas();
        if nlas.is_empty() {
            return Ok(());
        }
        self.command(IPVS_CMD_SET_CONFIG, nlas, "setting timeouts", || {
            format!("{timeouts:?}")
        })
    }

    /// The connection timeouts in force.
    pub fn timeouts(&mut self) -> Result<Timeouts, IpvsError> {
        let request = self.request(IPVS_CMD_GET_CONFIG, vec![]);
        let mut out = Timeouts::default();
        self.exchange(
            request,
            NLM_F_REQUEST | NLM_F_ACK,
            "reading the timeouts",
            |reply: GenlMessage<IpvsMessage>| {
                out = Timeouts::parse(&reply.payload.nlas).map_err(|e| IpvsError::Malformed {
                    during: "reading the timeouts",
                    reason: e.to_string(),
                })?;
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// Removes every virtual server of the namespace (`ipvsadm -C`).
    pub fn flush(&mut self) -> Result<(), IpvsError> {
        self.command(IPVS_CMD_FLUSH, vec![], "flushing IPVS", String::new)
    }
}

/// `TCP 10.96.0.1:443`, as ipvsadm prints a virtual server.
pub fn describe(id: &ServiceId) -> String {
    let protocol = match i32::from(id.protocol) {
        libc::IPPROTO_TCP => "TCP",
        libc::IPPROTO_UDP => "UDP",
        libc::IPPROTO_SCTP => "SCTP",
        _ => "proto",
    };
    format!("{protocol} {}", describe_addr(id.addr, id.port))
}

fn describe_addr(addr: IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(addr, port).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(addr: &str, port: u16) -> ServiceId {
        ServiceId {
            protocol: libc::IPPROTO_TCP as u16,
            addr: addr.parse().unwrap(),
            port,
        }
    }

    /// Parses `bytes` as the kernel's answer to command `cmd`, and every
    /// virtual server and real server in it: errors are fine, panics not.
    fn decode_everything(bytes: &[u8], cmd: u8) {
        let header = GenlHeader {
            cmd,
            version: IPVS_GENL_VERSION,
        };
        let Ok(message) = IpvsMessage::parse_with_param(bytes, header) else {
            return;
        };
        for nla in &message.nlas {
            match nla {
                IpvsNla::Service(nlas) => {
                    let _ = parse_service(nlas);
                }
                IpvsNla::Dest(nlas) => {
                    for af in [libc::AF_INET as u16, libc::AF_INET6 as u16, 0, 99] {
                        let _ = parse_dest(af, nlas);
                    }
                }
                IpvsNla::Other(_) => {}
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(crate::fuzz_config(512))]

        #[test]
        fn arbitrary_answers_decode_without_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            cmd in proptest::num::u8::ANY,
        ) {
            decode_everything(&bytes, cmd);
        }

        /// A real answer (a virtual server with its stats, a real server)
        /// with one byte changed, or cut short.
        #[test]
        fn mutated_answers_decode_without_panic(
            at in 0usize..400,
            byte in proptest::num::u8::ANY,
            cut in 0usize..400,
        ) {
            let mut vs = VirtualServer::new(tcp("fd00::10", 443), "rr", Some(10_800));
            vs.stats.connections = 9;
            let mut service = service_nlas(&vs);
            service.push(ServiceNla::Stats(vs.stats));
            let rs = RealServer::masq("fd00::20".parse().unwrap(), 8080, 1);
            let message = IpvsMessage {
                cmd: IPVS_CMD_NEW_DEST,
                nlas: vec![IpvsNla::Service(service), IpvsNla::Dest(dest_nlas(&rs))],
            };
            let mut bytes = vec![0u8; message.buffer_len()];
            message.emit(&mut bytes);
            let at = at % bytes.len();
            bytes[at] = byte;
            bytes.truncate(cut.max(1));
            decode_everything(&bytes, message.cmd);
        }
    }

    /// Emits `message` as the kernel would frame it and parses it back.
    fn round_trip(message: &IpvsMessage) -> IpvsMessage {
        let mut bytes = vec![0u8; message.buffer_len()];
        message.emit(&mut bytes);
        IpvsMessage::parse_with_param(
            &bytes,
            GenlHeader {
                cmd: message.cmd,
                version: IPVS_GENL_VERSION,
            },
        )
        .unwrap()
    }

    #[test]
    fn a_virtual_server_survives_encoding_in_both_families() {
        for (id, affinity) in [
            (tcp("10.96.0.10", 80), None),
            (tcp("fd00::10", 443), Some(10_800)),
        ] {
            let mut vs = VirtualServer::new(id, "rr", affinity);
            vs.stats = Stats {
                connections: 7,
                packets_in: 1 << 40,
                packets_out: 3,
                bytes_in: 4,
                bytes_out: 5,
            };
            let mut nlas = service_nlas(&vs);
            nlas.push(ServiceNla::Stats(vs.stats));
            let message = IpvsMessage {
                cmd: IPVS_CMD_NEW_SERVICE,
                nlas: vec![IpvsNla::Service(nlas)],
            };
            let parsed = round_trip(&message);
            assert_eq!(parsed, message);
            let IpvsNla::Service(nlas) = &parsed.nlas[0] else {
                panic!("{parsed:?}")
            };
            assert_eq!(parse_service(nlas).unwrap(), Some(vs));
        }
    }

    #[test]
    fn timeouts_encode_only_the_ones_set_and_parse_back() {
        let timeouts = Timeouts {
            tcp: Some(900),
            tcp_fin: Some(0),
            udp: None,
        };
        let nlas = timeouts.nlas();
        assert_eq!(nlas.len(), 1, "0 and None are left out: {nlas:?}");
        let mut bytes = vec![0u8; nested_len(&nlas)];
        emit_nested(&nlas, &mut bytes);
        // One u32 attribute: length 8, type 4 (IPVS_CMD_ATTR_TIMEOUT_TCP).
        assert_eq!(&bytes[..4], &[8, 0, 4, 0]);
        assert_eq!(&bytes[4..], &900u32.to_ne_bytes());
        let parsed: Vec<IpvsNla> = parse_nested(&bytes).unwrap();
        assert_eq!(
            Timeouts::parse(&parsed).unwrap(),
            Timeouts {
                tcp: Some(900),
                ..Timeouts::default()
            }
        );
        let short = [6u8, 0, 6, 0, 1, 0, 0, 0];
        let parsed: Vec<IpvsNla> = parse_nested(&short).unwrap();
        assert!(Timeouts::parse(&parsed).is_err());
    }

    #[test]
    fn the_wire_bytes_are_the_kernels_layout() {
        let vs = VirtualServer::new(tcp("10.96.0.10", 80), "rr", Some(180));
        let message = IpvsMessage {
            cmd: IPVS_CMD_NEW_SERVICE,
            nlas: vec![IpvsNla::Service(service_nlas(&vs))],
        };
        let mut bytes = vec![0u8; message.buffer_len()];
        message.emit(&mut bytes);
        // Nest header: length, IPVS_CMD_ATTR_SERVICE | NLA_F_NESTED.
        assert_eq!(&bytes[2..4], &(1u16 | NLA_F_NESTED).to_ne_bytes());
        // First inner attribute: AF (len 6, type 1), AF_INET, padding.
        assert_eq!(&bytes[4..12], &[6, 0, 1, 0, 2, 0, 0, 0]);
        // Then protocol 6, then the address in 16 bytes, IPv4 first.
        assert_eq!(&bytes[12..20], &[6, 0, 2, 0, 6, 0, 0, 0]);
        assert_eq!(&bytes[20..24], &[20, 0, 3, 0]);
        assert_eq!(&bytes[24..28], &[10, 96, 0, 10]);
        assert_eq!(&bytes[28..40], &[0; 12]);
        // The port in network order.
        assert_eq!(&bytes[40..46], &[6, 0, 4, 0, 0, 80]);
        // Scheduler "rr\0", flags {PERSISTENT, mask PERSISTENT}, timeout 180.
        assert_eq!(&bytes[48..55], &[7, 0, 6, 0, b'r', b'r', 0]);
        assert_eq!(&bytes[56..68], &[12, 0, 7, 0, 1, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(&bytes[68..76], &[8, 0, 8, 0, 180, 0, 0, 0]);
        assert_eq!(&bytes[76..84], &[8, 0, 9, 0, 255, 255, 255, 255]);
        assert_eq!(bytes.len(), 84);
    }

    #[test]
    fn a_real_server_survives_encoding_and_reads_the_kernels_counters() {
        let mut rs = RealServer::masq("2001:db8::7".parse().unwrap(), 8080, 1);
        rs.active_conns = 3;
        rs.inactive_conns = 4;
        rs.persistent_conns = 5;
        rs.stats.bytes_out = 99;
        let mut nlas = dest_nlas(&rs);
        nlas.extend([
            DestNla::ActiveConns(3),
            DestNla::InactiveConns(4),
            DestNla::PersistentConns(5),
            DestNla::Stats(rs.stats),
            DestNla::Other(DefaultNla::new(200, vec![1, 2, 3, 4])),
        ]);
        let message = IpvsMessage {
            cmd: IPVS_CMD_NEW_DEST,
            nlas: vec![IpvsNla::Dest(nlas)],
        };
        let parsed = round_trip(&message);
        assert_eq!(parsed, message);
        let IpvsNla::Dest(nlas) = &parsed.nlas[0] else {
            panic!()
        };
        assert_eq!(parse_dest(AF_INET6, nlas).unwrap(), rs);
    }

    #[test]
    fn a_kernel_nest_without_the_nested_flag_and_32_bit_stats_parse() {
        // The kernel writes IPVS_CMD_ATTR_SERVICE without NLA_F_NESTED and
        // the old IPVS_SVC_ATTR_STATS nest with u32 counters.
        let mut inner = Vec::new();
        for nla in service_nlas(&VirtualServer::new(tcp("10.0.0.1", 53), "wrr", None)) {
            let mut b = vec![0u8; nla.buffer_len()];
            nla.emit(&mut b);
            inner.extend(b);
        }
        let conns = DefaultNla::new(IPVS_STATS_ATTR_CONNS, 42u32.to_ne_bytes().to_vec());
        let mut stats = vec![0u8; conns.buffer_len()];
        conns.emit(&mut stats);
        let stats_nla = DefaultNla::new(IPVS_SVC_ATTR_STATS, stats);
        let mut b = vec![0u8; stats_nla.buffer_len()];
        stats_nla.emit(&mut b);
        inner.extend(b);
        let outer = DefaultNla::new(IPVS_CMD_ATTR_SERVICE, inner);
        let mut bytes = vec![0u8; outer.buffer_len()];
        outer.emit(&mut bytes);
        let parsed = IpvsMessage::parse_with_param(
            &bytes,
            GenlHeader {
                cmd: IPVS_CMD_GET_SERVICE,
                version: 1,
            },
        )
        .unwrap();
        let IpvsNla::Service(nlas) = &parsed.nlas[0] else {
            panic!("{parsed:?}")
        };
        let vs = parse_service(nlas).unwrap().unwrap();
        assert_eq!(vs.scheduler, "wrr");
        assert_eq!(vs.stats.connections, 42);
        assert_eq!(vs.persistence, None);
    }

    #[test]
    fn truncated_and_oversized_attributes_are_errors_not_panics() {
        let bad_addr = DefaultNla::new(IPVS_SVC_ATTR_ADDR, vec![0; 17]);
        let bad_flags = DefaultNla::new(IPVS_SVC_ATTR_FLAGS, vec![0; 5]);
        let bad_port = DefaultNla::new(IPVS_SVC_ATTR_PORT, vec![0; 1]);
        for nla in [bad_addr, bad_flags, bad_port] {
            let mut inner = vec![0u8; nla.buffer_len()];
            nla.emit(&mut inner);
            assert!(parse_nested::<ServiceNla>(&inner).is_err(), "{nla:?}");
        }
        // A nest cut in the middle of an attribute header.
        assert!(parse_nested::<IpvsNla>(&[8, 0, 1]).is_err());
        // A service without a family.
        assert!(parse_service(&[ServiceNla::Port(80)]).is_err());
        // A real server without an address.
        assert!(parse_dest(AF_INET, &[DestNla::Port(80)]).is_err());
    }

    /// What the kernel holds after each request, read back through the
    /// dump and (where installed) `ipvsadm -Ln`. Runs in a private network
    /// namespace (IPVS state is per namespace). On a kernel without IPVS
    /// it says so and passes here; the VM stage runs it on one with IPVS,
    /// where a skip fails the stage.
    #[test]
    fn requests_round_trip_through_the_kernel() {
        crate::dataplane::in_private_netns(|| {
            let mut ipvs = match IpvsSocket::open() {
                Ok(s) => s,
                Err(IpvsError::NoIpvs) => {
                    eprintln!(
                        "requests_round_trip_through_the_kernel: skipped: no IPVS in this kernel"
                    );
                    return;
                }
                Err(e) => panic!("{e}"),
            };
            // The kernel refuses a real server whose address type it cannot
            // tell (no local table until an interface is up).
            let lo = std::process::Command::new("ip")
                .args(["link", "set", "lo", "up"])
                .status()
                .unwrap();
            assert!(lo.success());
            ipvs.flush().unwrap();
            assert_eq!(ipvs.services().unwrap(), vec![]);

            let web = VirtualServer::new(tcp("10.96.0.10", 80), "rr", None);
            let dns = VirtualServer::new(
                ServiceId {
                    protocol: libc::IPPROTO_UDP as u16,
                    addr: "fd00::a".parse().unwrap(),
                    port: 53,
                },
                "rr",
                Some(10_800),
            );
            ipvs.add_service(&web).unwrap();
            ipvs.add_service(&dns).unwrap();
            let mut listed = ipvs.services().unwrap();
            listed.sort_by_key(|vs| vs.id);
            assert_eq!(listed.len(), 2, "{listed:?}");
            assert!(listed[0].same_config(&web), "{listed:?}");
            assert!(listed[1].same_config(&dns), "{listed:?}");

            // Adding it again is the kernel's EEXIST, naming the service.
            let again = ipvs.add_service(&web).unwrap_err();
            assert!(again.to_string().contains("TCP 10.96.0.10:80"), "{again}");
            assert!(
                matches!(&again, IpvsError::Kernel { source, .. } if source.raw_os_error() == Some(libc::EEXIST)),
                "{again:?}"
            );

            let backend = RealServer::masq("10.244.0.5".parse().unwrap(), 8080, 1);
            ipvs.add_real_server(&web.id, &backend).unwrap();
            let v6_backend = RealServer::masq("fd00:244::5".parse().unwrap(), 5353, 1);
            ipvs.add_real_server(&dns.id, &v6_backend).unwrap();
            let real = ipvs.real_servers(&web.id).unwrap();
            assert_eq!(real.len(), 1, "{real:?}");
            assert_eq!(
                (real[0].addr, real[0].port, real[0].weight),
                (backend.addr, 8080, 1)
            );
            assert_eq!(real[0].forwarding, IP_VS_CONN_F_MASQ);
            assert_eq!(ipvs.real_servers(&dns.id).unwrap()[0].addr, v6_backend.addr);

            if let Ok(out) = std::process::Command::new("ipvsadm").arg("-Ln").output() {
                let text = String::from_utf8_lossy(&out.stdout);
                // Columns as single spaces.
                let lines: Vec<String> = text
                    .lines()
                    .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
                    .collect();
                for expected in [
                    "TCP 10.96.0.10:80 rr",
                    "-> 10.244.0.5:8080 Masq 1 0 0",
                    "UDP [fd00::a]:53 rr persistent 10800",
                    "-> [fd00:244::5]:5353 Masq 1 0 0",
                ] {
                    assert!(
                        lines.iter().any(|l| l == expected),
                        "no {expected:?} in ipvsadm -Ln:\n{text}"
                    );
                }
            }

            // Graceful termination: weight 0, then gone.
            ipvs.update_real_server(
                &web.id,
                &RealServer {
                    weight: 0,
                    ..backend.clone()
                },
            )
            .unwrap();
            assert_eq!(ipvs.real_servers(&web.id).unwrap()[0].weight, 0);
            ipvs.delete_real_server(&web.id, backend.addr, backend.port)
                .unwrap();
            assert_eq!(ipvs.real_servers(&web.id).unwrap(), vec![]);

            // Session affinity switched on in place.
            let sticky = VirtualServer::new(web.id, "rr", Some(60));
            ipvs.update_service(&sticky).unwrap();
            let listed = ipvs.services().unwrap();
            let found = listed.iter().find(|vs| vs.id == web.id).unwrap();
            assert!(found.same_config(&sticky), "{found:?}");

            ipvs.delete_service(&web.id).unwrap();
            ipvs.delete_service(&dns.id).unwrap();
            assert_eq!(ipvs.services().unwrap(), vec![]);
            let gone = ipvs.delete_service(&web.id).unwrap_err();
            assert!(
                gone.to_string()
                    .contains("deleting virtual server TCP 10.96.0.10:80"),
                "{gone}"
            );

            // Timeouts: the ones named change, the others stay.
            let before = ipvs.timeouts().unwrap();
            assert!(before.tcp.is_some_and(|t| t > 0), "{before:?}");
            ipvs.set_timeouts(&Timeouts {
                tcp: Some(900),
                tcp_fin: None,
                udp: Some(30),
            })
            .unwrap();
            let after = ipvs.timeouts().unwrap();
            assert_eq!(
                after,
                Timeouts {
                    tcp: Some(900),
                    tcp_fin: before.tcp_fin,
                    udp: Some(30),
                }
            );
        });
    }
}
