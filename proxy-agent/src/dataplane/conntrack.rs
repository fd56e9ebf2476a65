//! Deleting stale UDP connection-tracking entries through ctnetlink.
//!
//! When a UDP backend goes away, netfilter's conntrack keeps steering the
//! client's datagrams to it: the entry's NAT binding lives as long as
//! datagrams keep coming. kube-proxy therefore deletes the entries whose
//! original destination is the service frontend and whose reply source is
//! the removed backend (vishvananda/netlink's `ConntrackDeleteFilters`).
//! This module does the same over a raw `NETLINK_NETFILTER` socket, with
//! messages built and parsed by hand:
//!
//! 1. one `IPCTNL_MSG_CT_GET` dump per address family present in the flows;
//! 2. each entry's original and reply tuples are parsed and the entry is
//!    kept when it matches a flow (hash lookups: one pass over the table,
//!    however many flows are given);
//! 3. once every dump has finished, one `IPCTNL_MSG_CT_DELETE` per kept
//!    entry goes out, in batches of [`DELETE_BATCH`] requests per send, each
//!    request answered by its own ack.
//!
//! A delete names the entry by its original tuple exactly as the kernel sent
//! it (so a directional `CTA_TUPLE_ZONE` inside it survives), its
//! `CTA_ZONE` when non-zero, and its `CTA_ID`. With the ID the kernel
//! deletes only that very entry: if it expired and a new flow with the same
//! tuple took its place between the dump and the delete, the kernel answers
//! `ENOENT` and the new entry stays. A delete request without a tuple would
//! make the kernel flush the whole table; the encoder cannot produce one.
//!
//! Parsing never trusts a length from the kernel: every header and
//! attribute is bounds-checked, and anything inconsistent is a
//! [`Malformed`] error, never a panic.
use std::{
    collections::{BTreeSet, HashSet},
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

/// A UDP flow that a removed backend served: the entries to delete are
/// those whose original destination is `vip:port` (the service's frontend,
/// port in host order) and whose reply source is `backend:backend_port`
/// (the DNAT target), protocol UDP.
///
/// NodePort variant: any original destination address, destination port
/// `port`. Represent it with `vip` = the unspecified address of the family
/// (`0.0.0.0` or `::`), meaning "any destination address".
///
/// A flow whose `vip` and `backend` are of different families matches
/// nothing (a conntrack entry's tuples are of one family).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StaleFlow {
    pub vip: IpAddr,
    pub port: u16,
    pub backend: IpAddr,
    pub backend_port: u16,
}

/// Why [`delete_stale_udp_flows`] failed.
///
/// A failed dump deletes nothing (all dumps finish before the first delete);
/// a failed delete is reported with the counts in [`DeleteFailed`].
///
/// [`DeleteFailed`]: ConntrackError::DeleteFailed
#[derive(Debug, thiserror::Error)]
pub enum ConntrackError {
    #[error("cannot open a NETLINK_NETFILTER socket: {0}")]
    Socket(#[source] io::Error),
    #[error("netlink I/O failed while {during}: {source}")]
    Io {
        during: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("no answer from the kernel within {timeout:?} while {during}")]
    Timeout {
        during: &'static str,
        timeout: Duration,
    },
    #[error("the netlink receive buffer overflowed while {during}: replies were lost")]
    Overrun { during: &'static str },
    #[error("the kernel refused the conntrack {request} request: {source}")]
    Kernel {
        request: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("malformed netlink data from the kernel: {0}")]
    Malformed(#[from] Malformed),
    #[error("{failed} conntrack entries could not be deleted ({deleted} were): {first}")]
    DeleteFailed {
        deleted: usize,
        failed: usize,
        /// The first error the kernel answered.
        #[source]
        first: io::Error,
    },
}

/// What was wrong with a message the kernel sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    #[error("netlink message header truncated ({left} bytes left)")]
    TruncatedHeader { left: usize },
    #[error("netlink message length {len} outside 16..={left}")]
    MessageLength { len: u32, left: usize },
    #[error("datagram of {len} bytes exceeds the receive buffer")]
    TruncatedDatagram { len: usize },
    #[error("{what} payload too short ({len} bytes)")]
    ShortPayload { what: &'static str, len: usize },
    #[error("attribute header truncated ({left} bytes left)")]
    TruncatedAttribute { left: usize },
    #[error("attribute {kind} length {len} outside 4..={left}")]
    AttributeLength { kind: u16, len: u16, left: usize },
    #[error("{what} attribute has {len} bytes")]
    AttributeSize { what: &'static str, len: usize },
    #[error("attribute too long to send ({len} bytes)")]
    AttributeTooLong { len: usize },
    #[error("conntrack entry lacks {0}")]
    Missing(&'static str),
    #[error("tuple addresses mix IPv4 and IPv6")]
    MixedFamilies,
    #[error("tuple addresses do not match the entry's family {family}")]
    FamilyMismatch { family: u8 },
}

/// Deletes every UDP conntrack entry matching one of `flows` (both families
/// as present in `flows`), in the network namespace of the calling thread.
/// Returns how many entries were deleted. An entry already gone (`ENOENT` on
/// delete) is not an error and is not counted.
///
/// One dump per family, then the deletes; nothing is deleted when a dump
/// fails. Needs `CAP_NET_ADMIN` in the namespace.
pub fn delete_stale_udp_flows(flows: &[StaleFlow]) -> Result<usize, ConntrackError> {
    delete_with(NetlinkSocket::open, flows)
}

// ---------------------------------------------------------------------------
// Wire constants (linux/netlink.h, linux/netfilter/nfnetlink*.h).

const NLMSG_HDRLEN: usize = 16;
const NLA_HDRLEN: usize = 4;
const NFGENMSG_LEN: usize = 4;
/// `struct nlmsgerr`: the error code and the request's header.
const NLMSGERR_LEN: usize = 4 + NLMSG_HDRLEN;

const NLMSG_NOOP: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_OVERRUN: u16 = 4;

const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;

const NLA_F_NESTED: u16 = 0x8000;
const NLA_F_NET_BYTEORDER: u16 = 0x4000;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | NLA_F_NET_BYTEORDER);

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const NFNETLINK_V0: u8 = 0;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;

// enum ctattr_type
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ID: u16 = 12;
const CTA_ZONE: u16 = 18;
// enum ctattr_tuple
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
// enum ctattr_ip
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_IP_V6_SRC: u16 = 3;
const CTA_IP_V6_DST: u16 = 4;
// enum ctattr_l4proto
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

const AF_INET: u8 = libc::AF_INET as u8;
const AF_INET6: u8 = libc::AF_INET6 as u8;
const IPPROTO_UDP: u8 = libc::IPPROTO_UDP as u8;

/// Delete requests per send. Their acks (one skb each, about 1 KiB of
/// receive-buffer accounting) are all queued before the send returns, so a
/// batch must fit in the receive buffer with room to spare.
const DELETE_BATCH: usize = 64;
/// Receive buffer for one datagram: the kernel's dump skbs are at most
/// 32 KiB.
const RECV_BUF_LEN: usize = 64 * 1024;
/// Receive buffer size asked for (clamped by `net.core.rmem_max`).
const SOCKET_RCVBUF: libc::c_int = 1 << 20;
/// How long one receive waits for the kernel.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// A dump whose replies overflowed the receive buffer is started over, at
/// most this many times in all.
const DUMP_ATTEMPTS: usize = 3;

const fn ct_msg_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_CTNETLINK << 8) | msg
}

const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

// ---------------------------------------------------------------------------
// Parsing.

/// One netlink message of a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Message<'a> {
    ty: u16,
    flags: u16,
    seq: u32,
    payload: &'a [u8],
}

/// The netlink messages of one datagram; after the first error, nothing.
struct Messages<'a> {
    rest: &'a [u8],
}

fn messages(datagram: &[u8]) -> Messages<'_> {
    Messages { rest: datagram }
}

impl<'a> Messages<'a> {
    fn parse_one(&mut self) -> Result<Message<'a>, Malformed> {
        let left = self.rest.len();
        let hdr = self
            .rest
            .get(..NLMSG_HDRLEN)
            .ok_or(Malformed::TruncatedHeader { left })?;
        let len = u32::from_ne_bytes(array(&hdr[0..4]));
        let ty = u16::from_ne_bytes(array(&hdr[4..6]));
        let flags = u16::from_ne_bytes(array(&hdr[6..8]));
        let seq = u32::from_ne_bytes(array(&hdr[8..12]));
        let end = usize::try_from(len)
            .ok()
            .filter(|&l| (NLMSG_HDRLEN..=left).contains(&l))
            .ok_or(Malformed::MessageLength { len, left })?;
        let payload = &self.rest[NLMSG_HDRLEN..end];
        self.rest = &self.rest[align4(end).min(left)..];
        Ok(Message {
            ty,
            flags,
            seq,
            payload,
        })
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<Message<'a>, Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let one = self.parse_one();
        if one.is_err() {
            self.rest = &[];
        }
        Some(one)
    }
}

/// One attribute: its type without the `NLA_F_*` flag bits, and its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Attr<'a> {
    kind: u16,
    payload: &'a [u8],
}

/// The attributes of a payload; after the first error, nothing. The last
/// attribute may lack its trailing padding; any other leftover is an error.
struct Attrs<'a> {
    rest: &'a [u8],
}

fn attrs(payload: &[u8]) -> Attrs<'_> {
    Attrs { rest: payload }
}

impl<'a> Attrs<'a> {
    fn parse_one(&mut self) -> Result<Attr<'a>, Malformed> {
        let left = self.rest.len();
        let hdr = self
            .rest
            .get(..NLA_HDRLEN)
            .ok_or(Malformed::TruncatedAttribute { left })?;
        let len = u16::from_ne_bytes(array(&hdr[0..2]));
        let kind = u16::from_ne_bytes(array(&hdr[2..4])) & NLA_TYPE_MASK;
        let end = usize::from(len);
        if !(NLA_HDRLEN..=left).contains(&end) {
            return Err(Malformed::AttributeLength { kind, len, left });
        }
        let payload = &self.rest[NLA_HDRLEN..end];
        self.rest = &self.rest[align4(end).min(left)..];
        Ok(Attr { kind, payload })
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<Attr<'a>, Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let one = self.parse_one();
        if one.is_err() {
            self.rest = &[];
        }
        Some(one)
    }
}

/// A slice whose length the caller has already checked, as an array.
fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&bytes[..N]);
    out
}

fn fixed<const N: usize>(what: &'static str, payload: &[u8]) -> Result<[u8; N], Malformed> {
    <[u8; N]>::try_from(payload).map_err(|_| Malformed::AttributeSize {
        what,
        len: payload.len(),
    })
}

/// One direction of a conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tuple {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    /// Ports, for the protocols that have them.
    src_port: Option<u16>,
    dst_port: Option<u16>,
}

fn parse_tuple(payload: &[u8]) -> Result<Tuple, Malformed> {
    let mut ips = None;
    let mut proto = None;
    for attr in attrs(payload) {
        let attr = attr?;
        match attr.kind {
            CTA_TUPLE_IP => ips = Some(parse_tuple_ip(attr.payload)?),
            CTA_TUPLE_PROTO => proto = Some(parse_tuple_proto(attr.payload)?),
            _ => {}
        }
    }
    let (src, dst) = ips.ok_or(Malformed::Missing("CTA_TUPLE_IP"))?;
    let (proto, src_port, dst_port) = proto.ok_or(Malformed::Missing("CTA_TUPLE_PROTO"))?;
    if proto == IPPROTO_UDP && (src_port.is_none() || dst_port.is_none()) {
        return Err(Malformed::Missing("the ports of a UDP tuple"));
    }
    Ok(Tuple {
        src,
        dst,
        proto,
        src_port,
        dst_port,
    })
}

fn parse_tuple_ip(payload: &[u8]) -> Result<(IpAddr, IpAddr), Malformed> {
    let (mut v4_src, mut v4_dst, mut v6_src, mut v6_dst) = (None, None, None, None);
    for attr in attrs(payload) {
        let attr = attr?;
        match attr.kind {
            CTA_IP_V4_SRC => v4_src = Some(Ipv4Addr::from(fixed("CTA_IP_V4_SRC", attr.payload)?)),
            CTA_IP_V4_DST => v4_dst = Some(Ipv4Addr::from(fixed("CTA_IP_V4_DST", attr.payload)?)),
            CTA_IP_V6_SRC => v6_src = Some(Ipv6Addr::from(fixed("CTA_IP_V6_SRC", attr.payload)?)),
            CTA_IP_V6_DST => v6_dst = Some(Ipv6Addr::from(fixed("CTA_IP_V6_DST", attr.payload)?)),
            _ => {}
        }
    }
    match (v4_src, v4_dst, v6_src, v6_dst) {
        (Some(s), Some(d), None, None) => Ok((s.into(), d.into())),
        (None, None, Some(s), Some(d)) => Ok((s.into(), d.into())),
        (None, None, None, None) => Err(Malformed::Missing("tuple addresses")),
        (_, _, None, None) | (None, None, _, _) => {
            Err(Malformed::Missing("a source or destination address"))
        }
        _ => Err(Malformed::MixedFamilies),
    }
}

type ProtoTuple = (u8, Option<u16>, Option<u16>);

fn parse_tuple_proto(payload: &[u8]) -> Result<ProtoTuple, Malformed> {
    let (mut num, mut src, mut dst) = (None, None, None);
    for attr in attrs(payload) {
        let attr = attr?;
        match attr.kind {
            CTA_PROTO_NUM => num = Some(fixed::<1>("CTA_PROTO_NUM", attr.payload)?[0]),
            CTA_PROTO_SRC_PORT => {
                src = Some(u16::from_be_bytes(fixed(
                    "CTA_PROTO_SRC_PORT",
                    attr.payload,
                )?));
            }
            CTA_PROTO_DST_PORT => {
                dst = Some(u16::from_be_bytes(fixed(
                    "CTA_PROTO_DST_PORT",
                    attr.payload,
                )?));
            }
            _ => {}
        }
    }
    Ok((num.ok_or(Malformed::Missing("CTA_PROTO_NUM"))?, src, dst))
}

/// What a dump says about one conntrack entry, as far as we need it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry<'a> {
    /// `nfgen_family`: `AF_INET` or `AF_INET6`.
    family: u8,
    orig: Tuple,
    reply: Tuple,
    /// The payload of `CTA_TUPLE_ORIG`, as received.
    orig_raw: &'a [u8],
    /// `CTA_ZONE`, 0 when absent.
    zone: u16,
    id: Option<u32>,
}

/// Parses the payload (after the netlink header) of one conntrack message.
fn parse_entry(payload: &[u8]) -> Result<Entry<'_>, Malformed> {
    let (nfgen, body) = payload
        .split_at_checked(NFGENMSG_LEN)
        .ok_or(Malformed::ShortPayload {
            what: "conntrack message",
            len: payload.len(),
        })?;
    let family = nfgen[0];
    let (mut orig, mut reply, mut zone, mut id) = (None, None, 0, None);
    for attr in attrs(body) {
        let attr = attr?;
        match attr.kind {
            CTA_TUPLE_ORIG => orig = Some((parse_tuple(attr.payload)?, attr.payload)),
            CTA_TUPLE_REPLY => reply = Some(parse_tuple(attr.payload)?),
            CTA_ZONE => zone = u16::from_be_bytes(fixed("CTA_ZONE", attr.payload)?),
            CTA_ID => id = Some(u32::from_be_bytes(fixed("CTA_ID", attr.payload)?)),
            _ => {}
        }
    }
    let (orig, orig_raw) = orig.ok_or(Malformed::Missing("CTA_TUPLE_ORIG"))?;
    let reply = reply.ok_or(Malformed::Missing("CTA_TUPLE_REPLY"))?;
    let expected_v4 = match family {
        AF_INET => true,
        AF_INET6 => false,
        _ => return Err(Malformed::FamilyMismatch { family }),
    };
    if [orig.src, orig.dst, reply.src, reply.dst]
        .iter()
        .any(|ip| ip.is_ipv4() != expected_v4)
    {
        return Err(Malformed::FamilyMismatch { family });
    }
    Ok(Entry {
        family,
        orig,
        reply,
        orig_raw,
        zone,
        id,
    })
}

/// The error code of an `NLMSG_ERROR` message (0 for an ack, else a
/// negative errno).
fn parse_error_code(payload: &[u8]) -> Result<i32, Malformed> {
    if payload.len() < NLMSGERR_LEN {
        return Err(Malformed::ShortPayload {
            what: "NLMSG_ERROR",
            len: payload.len(),
        });
    }
    Ok(i32::from_ne_bytes(array(&payload[..4])))
}

/// `-errno` from the kernel as an [`io::Error`].
fn kernel_errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code.saturating_neg())
}

// ---------------------------------------------------------------------------
// Matching.

fn family_of(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => AF_INET,
        IpAddr::V6(_) => AF_INET6,
    }
}

fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    }
}

/// The flows of one family, for lookups by entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FlowSet {
    family: u8,
    flows: HashSet<StaleFlow>,
}

impl FlowSet {
    /// The non-empty flow sets, IPv4 first. Flows mixing families are left
    /// out: they cannot match an entry.
    fn by_family(flows: &[StaleFlow]) -> Vec<FlowSet> {
        [AF_INET, AF_INET6]
            .into_iter()
            .map(|family| FlowSet {
                family,
                flows: flows
                    .iter()
                    .filter(|f| family_of(f.vip) == family && family_of(f.backend) == family)
                    .copied()
                    .collect(),
            })
            .filter(|set| !set.flows.is_empty())
            .collect()
    }

    fn matches(&self, entry: &Entry<'_>) -> bool {
        if entry.family != self.family || entry.orig.proto != IPPROTO_UDP {
            return false;
        }
        let (Some(port), Some(backend_port)) = (entry.orig.dst_port, entry.reply.src_port) else {
            return false;
        };
        let exact = StaleFlow {
            vip: entry.orig.dst,
            port,
            backend: entry.reply.src,
            backend_port,
        };
        let any_vip = StaleFlow {
            vip: unspecified_like(entry.orig.dst),
            ..exact
        };
        self.flows.contains(&exact) || self.flows.contains(&any_vip)
    }
}

// ---------------------------------------------------------------------------
// Building requests.

/// Appends one netlink message with an `nfgenmsg` header; `body` appends
/// the attributes.
fn put_message(
    buf: &mut Vec<u8>,
    ty: u16,
    flags: u16,
    seq: u32,
    family: u8,
    body: impl FnOnce(&mut Vec<u8>) -> Result<(), Malformed>,
) -> Result<(), Malformed> {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]); // nlmsg_len, patched below
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: the kernel
    buf.push(family);
    buf.push(NFNETLINK_V0);
    buf.extend_from_slice(&0u16.to_be_bytes()); // res_id
    body(buf)?;
    let len = buf.len() - start;
    let len32 = u32::try_from(len).map_err(|_| Malformed::AttributeTooLong { len })?;
    buf[start..start + 4].copy_from_slice(&len32.to_ne_bytes());
    buf.resize(start + align4(len), 0);
    Ok(())
}

fn put_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) -> Result<(), Malformed> {
    let len = NLA_HDRLEN + payload.len();
    let len16 = u16::try_from(len).map_err(|_| Malformed::AttributeTooLong { len })?;
    buf.extend_from_slice(&len16.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len() + align4(len) - len, 0);
    Ok(())
}

fn put_dump_request(buf: &mut Vec<u8>, family: u8, seq: u32) -> Result<(), Malformed> {
    put_message(
        buf,
        ct_msg_type(IPCTNL_MSG_CT_GET),
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        family,
        |_| Ok(()),
    )
}

/// What names one entry to delete.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct DeleteRequest {
    family: u8,
    /// The payload of the entry's `CTA_TUPLE_ORIG`, never empty.
    orig: Vec<u8>,
    zone: u16,
    id: Option<u32>,
}

impl DeleteRequest {
    fn of(entry: &Entry<'_>) -> Self {
        DeleteRequest {
            family: entry.family,
            orig: entry.orig_raw.to_vec(),
            zone: entry.zone,
            id: entry.id,
        }
    }

    fn put(&self, buf: &mut Vec<u8>, seq: u32) -> Result<(), Malformed> {
        if self.orig.is_empty() {
            // Without a tuple the kernel would flush the table.
            return Err(Malformed::Missing("CTA_TUPLE_ORIG"));
        }
        put_message(
            buf,
            ct_msg_type(IPCTNL_MSG_CT_DELETE),
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            self.family,
            |buf| {
                put_attr(buf, CTA_TUPLE_ORIG | NLA_F_NESTED, &self.orig)?;
                if self.zone != 0 {
                    put_attr(buf, CTA_ZONE, &self.zone.to_be_bytes())?;
                }
                if let Some(id) = self.id {
                    put_attr(buf, CTA_ID, &id.to_be_bytes())?;
                }
                Ok(())
            },
        )
    }
}

// ---------------------------------------------------------------------------
// The conversation with the kernel.

/// A datagram channel to the kernel's netfilter netlink (a fake in tests).
trait Transport {
    /// Sends one datagram (one or more messages).
    fn send(&mut self, datagram: &[u8]) -> io::Result<()>;
    /// Receives one datagram into `buf` and returns its full length, which
    /// exceeds `buf.len()` when it was cut. Without `wait`, an empty queue
    /// is `WouldBlock`; with it, so is a timeout. `ENOBUFS` means replies
    /// were dropped.
    fn recv(&mut self, buf: &mut [u8], wait: bool) -> io::Result<usize>;
}

struct NetlinkSocket {
    fd: OwnedFd,
}

impl NetlinkSocket {
    /// A `NETLINK_NETFILTER` socket connected to the kernel (so no other
    /// process can send to it), in the calling thread's network namespace.
    fn open() -> Result<Self, ConntrackError> {
        // SAFETY: socket(2) with constant arguments; it returns a new
        // descriptor or -1 and touches no memory of ours.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_NETFILTER,
            )
        };
        if raw < 0 {
            return Err(ConntrackError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly created descriptor that nothing else
        // owns; OwnedFd closes it exactly once.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let socket = NetlinkSocket { fd };
        let timeout = libc::timeval {
            tv_sec: REPLY_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: REPLY_TIMEOUT.subsec_micros() as libc::suseconds_t,
        };
        socket
            .set_option(libc::SOL_SOCKET, libc::SO_RCVTIMEO, &timeout)
            .map_err(ConntrackError::Socket)?;
        // Best effort: a larger receive buffer and short acks only make
        // overruns less likely; the protocol works without them.
        let _ = socket.set_option(libc::SOL_SOCKET, libc::SO_RCVBUF, &SOCKET_RCVBUF);
        let one: libc::c_int = 1;
        let _ = socket.set_option(libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, &one);
        // SAFETY: sockaddr_nl is plain old data; all zeros is a valid value.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `kernel` is a live sockaddr_nl and the length passed is
        // its size; connect only reads it.
        let rc = unsafe {
            libc::connect(
                socket.fd.as_raw_fd(),
                (&raw const kernel).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(ConntrackError::Socket(io::Error::last_os_error()));
        }
        Ok(socket)
    }

    fn set_option<T>(&self, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
        // SAFETY: `value` points to a live T of size_of::<T>() bytes for the
        // duration of the call; setsockopt only reads it.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (value as *const T).cast(),
                size_of::<T>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

impl Transport for NetlinkSocket {
    fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        loop {
            // SAFETY: `datagram` is an initialized buffer of datagram.len()
            // bytes, alive for the call; send only reads it.
            let n = unsafe {
                libc::send(
                    self.fd.as_raw_fd(),
                    datagram.as_ptr().cast(),
                    datagram.len(),
                    0,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if usize::try_from(n).ok() != Some(datagram.len()) {
                return Err(io::Error::other("short netlink send"));
            }
            return Ok(());
        }
    }

    fn recv(&mut self, buf: &mut [u8], wait: bool) -> io::Result<usize> {
        let flags = libc::MSG_TRUNC | if wait { 0 } else { libc::MSG_DONTWAIT };
        loop {
            // SAFETY: `buf` is a writable buffer of buf.len() bytes, alive
            // for the call; with MSG_TRUNC the kernel still writes at most
            // buf.len() bytes (it only reports the full length).
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    flags,
                )
            };
            match usize::try_from(n) {
                Ok(n) => return Ok(n),
                Err(_) => {
                    let err = io::Error::last_os_error();
                    if err.kind() != io::ErrorKind::Interrupted {
                        return Err(err);
                    }
                }
            }
        }
    }
}

fn recv_error(err: io::Error, during: &'static str) -> ConntrackError {
    if err.raw_os_error() == Some(libc::ENOBUFS) {
        ConntrackError::Overrun { during }
    } else if err.kind() == io::ErrorKind::WouldBlock {
        ConntrackError::Timeout {
            during,
            timeout: REPLY_TIMEOUT,
        }
    } else {
        ConntrackError::Io {
            during,
            source: err,
        }
    }
}

/// One socket's requests, numbered by `seq`.
struct Session<T> {
    transport: T,
    seq: u32,
    buf: Vec<u8>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Progress {
    More,
    Done,
}

/// Tallies of the delete acks.
#[derive(Debug, Default)]
struct DeleteTally {
    deleted: usize,
    failed: usize,
    first_error: Option<io::Error>,
}

impl<T: Transport> Session<T> {
    fn new(transport: T) -> Self {
        Session {
            transport,
            seq: 0,
            buf: vec![0; RECV_BUF_LEN],
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Receives one datagram; returns its length within `self.buf`.
    fn recv(&mut self, wait: bool, during: &'static str) -> Result<usize, ConntrackError> {
        let len = self
            .transport
            .recv(&mut self.buf, wait)
            .map_err(|e| recv_error(e, during))?;
        if len > self.buf.len() {
            return Err(Malformed::TruncatedDatagram { len }.into());
        }
        Ok(len)
    }

    /// Dumps the table of `flows.family`, adding a delete request for each
    /// matching entry to `out`.
    fn dump(
        &mut self,
        flows: &FlowSet,
        out: &mut BTreeSet<DeleteRequest>,
    ) -> Result<(), ConntrackError> {
        const DURING: &str = "dumping the conntrack table";
        let seq = self.next_seq();
        let mut request = Vec::with_capacity(NLMSG_HDRLEN + NFGENMSG_LEN);
        put_dump_request(&mut request, flows.family, seq)?;
        self.transport
            .send(&request)
            .map_err(|source| ConntrackError::Io {
                during: DURING,
                source,
            })?;
        loop {
            let len = self.recv(true, DURING)?;
            let datagram = &self.buf[..len];
            if handle_dump_datagram(datagram, seq, flows, out)? == Progress::Done {
                return Ok(());
            }
        }
    }

    /// Sends `batch` and reads its acks into `tally`. Returns the requests
    /// whose acks were lost to an overrun of the receive buffer.
    fn delete_batch<'r>(
        &mut self,
        batch: &'r [DeleteRequest],
        tally: &mut DeleteTally,
    ) -> Result<Vec<&'r DeleteRequest>, ConntrackError> {
        const DURING: &str = "deleting conntrack entries";
        let first = self.seq.wrapping_add(1);
        let mut request = Vec::new();
        for delete in batch {
            let seq = self.next_seq();
            delete.put(&mut request, seq)?;
        }
        self.transport
            .send(&request)
            .map_err(|source| ConntrackError::Io {
                during: DURING,
                source,
            })?;
        let mut acked = vec![false; batch.len()];
        let mut waiting = batch.len();
        // The kernel handles the whole batch inside the send, so after an
        // overrun everything that survived is already queued.
        let mut overrun = false;
        while waiting > 0 {
            let len = match self.recv(!overrun, DURING) {
                Ok(len) => len,
                Err(ConntrackError::Overrun { .. }) => {
                    overrun = true;
                    continue;
                }
                Err(ConntrackError::Timeout { .. }) if overrun => break,
                Err(e) => return Err(e),
            };
            for msg in messages(&self.buf[..len]) {
                let msg = msg?;
                let Ok(index) = usize::try_from(msg.seq.wrapping_sub(first)) else {
                    continue;
                };
                if msg.ty != NLMSG_ERROR || acked.get(index) != Some(&false) {
                    continue; // not an answer to this batch
                }
                acked[index] = true;
                waiting -= 1;
                match parse_error_code(msg.payload)? {
                    0 => tally.deleted += 1,
                    code if code == -libc::ENOENT => {}
                    code => {
                        tally.failed += 1;
                        tally.first_error.get_or_insert_with(|| kernel_errno(code));
                    }
                }
            }
        }
        Ok(batch
            .iter()
            .zip(acked)
            .filter(|(_, acked)| !acked)
            .map(|(delete, _)| delete)
            .collect())
    }

    /// Deletes the entries named by `deletes`; returns how many went.
    fn delete_all(&mut self, deletes: &[DeleteRequest]) -> Result<usize, ConntrackError> {
        let mut tally = DeleteTally::default();
        for batch in deletes.chunks(DELETE_BATCH) {
            let lost = self.delete_batch(batch, &mut tally)?;
            for delete in lost {
                // Sent again alone, whose ack cannot overrun. The first
                // delete was most likely carried out, so an entry gone now
                // counts as deleted.
                let mut again = DeleteTally::default();
                if !self
                    .delete_batch(std::slice::from_ref(delete), &mut again)?
                    .is_empty()
                {
                    return Err(ConntrackError::Overrun {
                        during: "deleting conntrack entries",
                    });
                }
                if again.failed == 0 {
                    tally.deleted += 1;
                }
                tally.failed += again.failed;
                if let Some(err) = again.first_error {
                    tally.first_error.get_or_insert(err);
                }
            }
        }
        match tally.first_error {
            None => Ok(tally.deleted),
            Some(first) => Err(ConntrackError::DeleteFailed {
                deleted: tally.deleted,
                failed: tally.failed,
                first,
            }),
        }
    }
}

/// Handles one datagram of the dump answering request `seq`.
fn handle_dump_datagram(
    datagram: &[u8],
    seq: u32,
    flows: &FlowSet,
    out: &mut BTreeSet<DeleteRequest>,
) -> Result<Progress, ConntrackError> {
    for msg in messages(datagram) {
        let msg = msg?;
        if msg.seq != seq {
            continue; // not ours
        }
        match msg.ty {
            NLMSG_NOOP => {}
            NLMSG_ERROR => match parse_error_code(msg.payload)? {
                0 => {}
                code => {
                    return Err(ConntrackError::Kernel {
                        request: "dump",
                        source: kernel_errno(code),
                    });
                }
            },
            NLMSG_DONE => {
                // The payload, when present, is the dump's final status.
                if let Some(code) = msg.payload.get(..4) {
                    let code = i32::from_ne_bytes(array(code));
                    if code < 0 {
                        return Err(ConntrackError::Kernel {
                            request: "dump",
                            source: kernel_errno(code),
                        });
                    }
                }
                return Ok(Progress::Done);
            }
            NLMSG_OVERRUN => {
                return Err(ConntrackError::Overrun {
                    during: "dumping the conntrack table",
                });
            }
            ty if ty == ct_msg_type(IPCTNL_MSG_CT_GET) || ty == ct_msg_type(IPCTNL_MSG_CT_NEW) => {
                let entry = parse_entry(msg.payload)?;
                if flows.matches(&entry) {
                    out.insert(DeleteRequest::of(&entry));
                }
            }
            _ => {}
        }
    }
    Ok(Progress::More)
}

/// [`delete_stale_udp_flows`] over transports that `open` makes.
fn delete_with<T: Transport>(
    mut open: impl FnMut() -> Result<T, ConntrackError>,
    flows: &[StaleFlow],
) -> Result<usize, ConntrackError> {
    let sets = FlowSet::by_family(flows);
    if sets.is_empty() {
        return Ok(0);
    }
    let mut deletes = BTreeSet::new();
    let mut session = None;
    for set in &sets {
        let mut attempt = 1;
        loop {
            // A fresh socket for each attempt: leftovers of an overrun dump
            // must not mix with the new one.
            let mut fresh = Session::new(open()?);
            match fresh.dump(set, &mut deletes) {
                Ok(()) => {
                    session = Some(fresh);
                    break;
                }
                Err(ConntrackError::Overrun { .. }) if attempt < DUMP_ATTEMPTS => attempt += 1,
                Err(e) => return Err(e),
            }
        }
    }
    let deletes: Vec<DeleteRequest> = deletes.into_iter().collect();
    match session {
        Some(mut session) if !deletes.is_empty() => session.delete_all(&deletes),
        _ => Ok(0),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        cell::RefCell,
        collections::VecDeque,
        net::{SocketAddr, UdpSocket},
        process::{Command, Stdio},
        rc::Rc,
    };

    use proptest::prelude::*;

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    // -- fixture builders (test side; independent of the code under test) --

    fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = ((4 + payload.len()) as u16).to_ne_bytes().to_vec();
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(payload);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out
    }

    fn nest(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(kind | NLA_F_NESTED, &parts.concat())
    }

    fn tuple_payload(t: &Tuple) -> Vec<u8> {
        let addr = |kind_v4: u16, a: IpAddr| match a {
            IpAddr::V4(a) => attr(kind_v4, &a.octets()),
            IpAddr::V6(a) => attr(kind_v4 + 2, &a.octets()),
        };
        let mut proto = vec![attr(CTA_PROTO_NUM, &[t.proto])];
        if let Some(p) = t.src_port {
            proto.push(attr(CTA_PROTO_SRC_PORT, &p.to_be_bytes()));
        }
        if let Some(p) = t.dst_port {
            proto.push(attr(CTA_PROTO_DST_PORT, &p.to_be_bytes()));
        }
        [
            nest(
                CTA_TUPLE_IP,
                &[addr(CTA_IP_V4_SRC, t.src), addr(CTA_IP_V4_DST, t.dst)],
            ),
            nest(CTA_TUPLE_PROTO, &proto),
        ]
        .concat()
    }

    fn nlmsg(ty: u16, flags: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = ((16 + payload.len()) as u32).to_ne_bytes().to_vec();
        out.extend_from_slice(&ty.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&4242u32.to_ne_bytes());
        out.extend_from_slice(payload);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out
    }

    fn error_msg(seq: u32, code: i32) -> Vec<u8> {
        let mut payload = code.to_ne_bytes().to_vec();
        payload.extend_from_slice(&[0; 16]); // the request's header
        nlmsg(NLMSG_ERROR, 0, seq, &payload)
    }

    fn done_msg(seq: u32) -> Vec<u8> {
        nlmsg(NLMSG_DONE, 2, seq, &0i32.to_ne_bytes())
    }

    #[derive(Clone, Debug, PartialEq)]
    struct FakeEntry {
        family: u8,
        orig: Tuple,
        reply: Tuple,
        zone: u16,
        id: u32,
    }

    fn entry_payload(e: &FakeEntry) -> Vec<u8> {
        let mut out = vec![e.family, 0, 0, 0];
        out.extend(nest(CTA_TUPLE_ORIG, &[tuple_payload(&e.orig)]));
        out.extend(nest(CTA_TUPLE_REPLY, &[tuple_payload(&e.reply)]));
        out.extend(attr(3, &0x188u32.to_be_bytes())); // CTA_STATUS
        out.extend(attr(7, &30u32.to_be_bytes())); // CTA_TIMEOUT
        if e.zone != 0 {
            out.extend(attr(CTA_ZONE, &e.zone.to_be_bytes()));
        }
        out.extend(attr(CTA_ID, &e.id.to_be_bytes()));
        out
    }

    fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Tuple {
        Tuple {
            src: ip(src),
            dst: ip(dst),
            proto: IPPROTO_UDP,
            src_port: Some(sport),
            dst_port: Some(dport),
        }
    }

    /// A DNATed UDP entry: client → vip:port, answered by backend.
    fn dnat_entry(
        client: (&str, u16),
        vip: (&str, u16),
        backend: (&str, u16),
        id: u32,
    ) -> FakeEntry {
        FakeEntry {
            family: family_of(ip(client.0)),
            orig: udp(client.0, client.1, vip.0, vip.1),
            reply: udp(backend.0, backend.1, client.0, client.1),
            zone: 0,
            id,
        }
    }

    // -- wire constants --

    #[test]
    fn constants_agree_with_libc() {
        assert_eq!(i32::from(NLMSG_NOOP), libc::NLMSG_NOOP);
        assert_eq!(i32::from(NLMSG_ERROR), libc::NLMSG_ERROR);
        assert_eq!(i32::from(NLMSG_DONE), libc::NLMSG_DONE);
        assert_eq!(i32::from(NLMSG_OVERRUN), libc::NLMSG_OVERRUN);
        assert_eq!(i32::from(NLM_F_REQUEST), libc::NLM_F_REQUEST);
        assert_eq!(i32::from(NLM_F_ACK), libc::NLM_F_ACK);
        assert_eq!(i32::from(NLM_F_DUMP), libc::NLM_F_DUMP);
        assert_eq!(i32::from(NLA_F_NESTED), libc::NLA_F_NESTED);
        assert_eq!(i32::from(NLA_F_NET_BYTEORDER), libc::NLA_F_NET_BYTEORDER);
        assert_eq!(
            i32::from(NFNL_SUBSYS_CTNETLINK),
            libc::NFNL_SUBSYS_CTNETLINK
        );
        assert_eq!(size_of::<libc::nlmsghdr>(), NLMSG_HDRLEN);
        assert_eq!(size_of::<libc::nlattr>(), NLA_HDRLEN);
    }

    // -- building --

    #[test]
    fn dump_request_bytes() {
        let mut buf = Vec::new();
        put_dump_request(&mut buf, AF_INET6, 7).unwrap();
        let mut want = 20u32.to_ne_bytes().to_vec();
        want.extend_from_slice(&0x0101u16.to_ne_bytes()); // CTNETLINK << 8 | CT_GET
        want.extend_from_slice(&0x0301u16.to_ne_bytes()); // REQUEST | DUMP
        want.extend_from_slice(&7u32.to_ne_bytes());
        want.extend_from_slice(&0u32.to_ne_bytes());
        want.extend_from_slice(&[10, 0, 0, 0]); // AF_INET6, v0, res_id 0
        assert_eq!(buf, want);
    }

    #[test]
    fn delete_request_bytes() {
        let orig = tuple_payload(&udp("10.0.0.1", 40000, "10.96.0.10", 53));
        let delete = DeleteRequest {
            family: AF_INET,
            orig: orig.clone(),
            zone: 7,
            id: Some(0xdead_beef),
        };
        let mut buf = Vec::new();
        delete.put(&mut buf, 9).unwrap();

        let mut payload = vec![2, 0, 0, 0];
        payload.extend(attr(CTA_TUPLE_ORIG | NLA_F_NESTED, &orig));
        payload.extend(attr(CTA_ZONE, &[0, 7])); // be16 7, padded
        payload.extend(attr(CTA_ID, &[0xde, 0xad, 0xbe, 0xef]));
        let mut want = nlmsg(0x0102, NLM_F_REQUEST | NLM_F_ACK, 9, &payload);
        want[12..16].copy_from_slice(&0u32.to_ne_bytes()); // pid 0: the kernel
        assert_eq!(buf, want);
        assert_eq!(buf.len() % 4, 0);

        // Our own parser reads back what we built.
        let msg = messages(&buf).next().unwrap().unwrap();
        let back: Vec<Attr> = attrs(&msg.payload[4..]).map(Result::unwrap).collect();
        assert_eq!(back[0].kind, CTA_TUPLE_ORIG);
        assert_eq!(
            parse_tuple(back[0].payload).unwrap(),
            udp("10.0.0.1", 40000, "10.96.0.10", 53)
        );
        assert_eq!(
            back[1],
            Attr {
                kind: CTA_ZONE,
                payload: &[0, 7]
            }
        );
        assert_eq!(
            back[2],
            Attr {
                kind: CTA_ID,
                payload: &[0xde, 0xad, 0xbe, 0xef]
            }
        );
    }

    #[test]
    fn delete_request_without_zone_or_id_has_only_the_tuple() {
        let orig = tuple_payload(&udp("::1", 1, "::2", 2));
        let delete = DeleteRequest {
            family: AF_INET6,
            orig: orig.clone(),
            zone: 0,
            id: None,
        };
        let mut buf = Vec::new();
        delete.put(&mut buf, 1).unwrap();
        let msg = messages(&buf).next().unwrap().unwrap();
        assert_eq!(msg.payload[0], AF_INET6);
        assert_eq!(
            msg.payload[4..],
            attr(CTA_TUPLE_ORIG | NLA_F_NESTED, &orig)[..]
        );
    }

    #[test]
    fn a_delete_without_a_tuple_is_never_built() {
        // It would flush the whole table.
        let delete = DeleteRequest {
            family: AF_INET,
            orig: Vec::new(),
            zone: 0,
            id: None,
        };
        assert_eq!(
            delete.put(&mut Vec::new(), 1),
            Err(Malformed::Missing("CTA_TUPLE_ORIG"))
        );
    }

    // -- parsing --

    /// A conntrack dump message as the kernel sends it (x86_64 byte order
    /// for the netlink headers): UDP 127.0.0.1:40000 → 127.0.0.2:5555,
    /// DNATed to 127.0.0.1:6666.
    #[rustfmt::skip]
    const KERNEL_ENTRY: [u8; 164] = [
        // nlmsghdr: len 164, type CTNETLINK<<8|CT_GET, flags MULTI, seq 5, pid 4242
        0xa4, 0, 0, 0,  0x01, 0x01,  0x02, 0,  5, 0, 0, 0,  0x92, 0x10, 0, 0,
        // nfgenmsg: AF_INET, v0, res_id 0
        2, 0, 0, 0,
        // CTA_TUPLE_ORIG (nested), 52 bytes
        0x34, 0, 0x01, 0x80,
            0x14, 0, 0x01, 0x80, // CTA_TUPLE_IP
                8, 0, 1, 0,  127, 0, 0, 1, // CTA_IP_V4_SRC
                8, 0, 2, 0,  127, 0, 0, 2, // CTA_IP_V4_DST
            0x1c, 0, 0x02, 0x80, // CTA_TUPLE_PROTO
                5, 0, 1, 0,  17, 0, 0, 0, // CTA_PROTO_NUM udp + pad
                6, 0, 2, 0,  0x9c, 0x40, 0, 0, // CTA_PROTO_SRC_PORT 40000
                6, 0, 3, 0,  0x15, 0xb3, 0, 0, // CTA_PROTO_DST_PORT 5555
        // CTA_TUPLE_REPLY (nested), 52 bytes
        0x34, 0, 0x02, 0x80,
            0x14, 0, 0x01, 0x80,
                8, 0, 1, 0,  127, 0, 0, 1,
                8, 0, 2, 0,  127, 0, 0, 1,
            0x1c, 0, 0x02, 0x80,
                5, 0, 1, 0,  17, 0, 0, 0,
                6, 0, 2, 0,  0x1a, 0x0a, 0, 0, // 6666
                6, 0, 3, 0,  0x9c, 0x40, 0, 0, // 40000
        8, 0, 3, 0,  0, 0, 0x01, 0x88, // CTA_STATUS
        8, 0, 7, 0,  0, 0, 0, 0x1e, // CTA_TIMEOUT 30
        8, 0, 8, 0,  0, 0, 0, 0, // CTA_MARK
        8, 0, 12, 0,  0xde, 0xad, 0xbe, 0xef, // CTA_ID
        8, 0, 11, 0,  0, 0, 0, 1, // CTA_USE
    ];
    /// Where the attributes after the two tuples start.
    const AFTER_TUPLES: usize = 4 + 52 + 52;

    #[cfg(target_endian = "little")]
    #[test]
    fn parses_a_kernel_entry() {
        let mut msgs = messages(&KERNEL_ENTRY);
        let msg = msgs.next().unwrap().unwrap();
        assert!(msgs.next().is_none());
        assert_eq!((msg.ty, msg.flags, msg.seq), (0x0101, 2, 5));
        let entry = parse_entry(msg.payload).unwrap();
        assert_eq!(entry.family, AF_INET);
        assert_eq!(entry.orig, udp("127.0.0.1", 40000, "127.0.0.2", 5555));
        assert_eq!(entry.reply, udp("127.0.0.1", 6666, "127.0.0.1", 40000));
        assert_eq!(entry.zone, 0);
        assert_eq!(entry.id, Some(0xdead_beef));
        assert_eq!(entry.orig_raw, &KERNEL_ENTRY[24..72]);

        // The delete names it by the same bytes.
        let mut buf = Vec::new();
        DeleteRequest::of(&entry).put(&mut buf, 1).unwrap();
        assert_eq!(buf[20..72], KERNEL_ENTRY[20..72]);
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn every_truncation_of_the_datagram_is_an_error() {
        for cut in 1..KERNEL_ENTRY.len() {
            let result: Result<Vec<_>, _> = messages(&KERNEL_ENTRY[..cut]).collect();
            let err = result.unwrap_err();
            if cut < 16 {
                assert_eq!(err, Malformed::TruncatedHeader { left: cut });
            } else {
                assert_eq!(
                    err,
                    Malformed::MessageLength {
                        len: 164,
                        left: cut
                    }
                );
            }
        }
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn every_truncation_of_the_entry_inside_an_attribute_is_an_error() {
        let payload = &KERNEL_ENTRY[16..];
        for cut in 0..payload.len() {
            let result = parse_entry(&payload[..cut]);
            // Whole optional attributes may be missing; nothing else.
            let at_optional_boundary =
                cut >= AFTER_TUPLES && (cut - AFTER_TUPLES).is_multiple_of(8);
            assert_eq!(
                result.is_ok(),
                at_optional_boundary,
                "cut at {cut}: {result:?}"
            );
        }
    }

    #[test]
    fn malformed_entries_are_errors() {
        let good = dnat_entry(("10.0.0.1", 1000), ("10.96.0.1", 53), ("10.1.0.5", 5353), 1);
        let orig = nest(CTA_TUPLE_ORIG, &[tuple_payload(&good.orig)]);
        let reply = nest(CTA_TUPLE_REPLY, &[tuple_payload(&good.reply)]);
        let with = |attrs: &[&[u8]]| -> Vec<u8> {
            let mut p = vec![AF_INET, 0, 0, 0];
            for a in attrs {
                p.extend_from_slice(a);
            }
            p
        };
        let ip_nest = |parts: &[Vec<u8>]| nest(CTA_TUPLE_IP, parts);
        let udp_proto = nest(
            CTA_TUPLE_PROTO,
            &[
                attr(CTA_PROTO_NUM, &[17]),
                attr(CTA_PROTO_SRC_PORT, &[0, 1]),
                attr(CTA_PROTO_DST_PORT, &[0, 2]),
            ],
        );
        let v4 = |kind, last| attr(kind, &[10, 0, 0, last]);
        let tuple = |parts: &[Vec<u8>]| nest(CTA_TUPLE_REPLY, parts);

        let cases: Vec<(&str, Vec<u8>, Malformed)> = vec![
            (
                "short nfgenmsg",
                vec![2, 0],
                Malformed::ShortPayload {
                    what: "conntrack message",
                    len: 2,
                },
            ),
            ("no tuples", with(&[]), Malformed::Missing("CTA_TUPLE_ORIG")),
            (
                "no reply",
                with(&[&orig]),
                Malformed::Missing("CTA_TUPLE_REPLY"),
            ),
            (
                "attribute length 3",
                with(&[&orig, &[3, 0, 2, 0]]),
                Malformed::AttributeLength {
                    kind: 2,
                    len: 3,
                    left: 4,
                },
            ),
            (
                "attribute past the end",
                with(&[&orig, &[200, 0, 2, 0]]),
                Malformed::AttributeLength {
                    kind: 2,
                    len: 200,
                    left: 4,
                },
            ),
            (
                "leftover bytes",
                with(&[&orig, &reply, &[1, 2]]),
                Malformed::TruncatedAttribute { left: 2 },
            ),
            (
                "5-byte address",
                with(&[
                    &orig,
                    &tuple(&[
                        ip_nest(&[attr(CTA_IP_V4_SRC, &[1, 2, 3, 4, 5]), v4(CTA_IP_V4_DST, 1)]),
                        udp_proto.clone(),
                    ]),
                ]),
                Malformed::AttributeSize {
                    what: "CTA_IP_V4_SRC",
                    len: 5,
                },
            ),
            (
                "mixed families",
                with(&[
                    &orig,
                    &tuple(&[
                        ip_nest(&[v4(CTA_IP_V4_SRC, 1), attr(CTA_IP_V6_DST, &[0; 16])]),
                        udp_proto.clone(),
                    ]),
                ]),
                Malformed::MixedFamilies,
            ),
            (
                "no destination",
                with(&[
                    &orig,
                    &tuple(&[ip_nest(&[v4(CTA_IP_V4_SRC, 1)]), udp_proto.clone()]),
                ]),
                Malformed::Missing("a source or destination address"),
            ),
            (
                "no addresses",
                with(&[&orig, &tuple(&[ip_nest(&[]), udp_proto.clone()])]),
                Malformed::Missing("tuple addresses"),
            ),
            (
                "no protocol",
                with(&[
                    &orig,
                    &tuple(&[ip_nest(&[v4(CTA_IP_V4_SRC, 1), v4(CTA_IP_V4_DST, 2)])]),
                ]),
                Malformed::Missing("CTA_TUPLE_PROTO"),
            ),
            (
                "UDP without ports",
                with(&[
                    &orig,
                    &tuple(&[
                        ip_nest(&[v4(CTA_IP_V4_SRC, 1), v4(CTA_IP_V4_DST, 2)]),
                        nest(CTA_TUPLE_PROTO, &[attr(CTA_PROTO_NUM, &[17])]),
                    ]),
                ]),
                Malformed::Missing("the ports of a UDP tuple"),
            ),
            (
                "3-byte port",
                with(&[
                    &orig,
                    &tuple(&[
                        ip_nest(&[v4(CTA_IP_V4_SRC, 1), v4(CTA_IP_V4_DST, 2)]),
                        nest(
                            CTA_TUPLE_PROTO,
                            &[
                                attr(CTA_PROTO_NUM, &[17]),
                                attr(CTA_PROTO_SRC_PORT, &[0, 0, 1]),
                            ],
                        ),
                    ]),
                ]),
                Malformed::AttributeSize {
                    what: "CTA_PROTO_SRC_PORT",
                    len: 3,
                },
            ),
            (
                "4-byte zone",
                with(&[&orig, &reply, &attr(CTA_ZONE, &[0, 0, 0, 1])]),
                Malformed::AttributeSize {
                    what: "CTA_ZONE",
                    len: 4,
                },
            ),
            (
                "2-byte id",
                with(&[&orig, &reply, &attr(CTA_ID, &[0, 1])]),
                Malformed::AttributeSize {
                    what: "CTA_ID",
                    len: 2,
                },
            ),
        ];
        for (name, payload, want) in cases {
            assert_eq!(parse_entry(&payload), Err(want), "{name}");
        }

        // IPv4 tuples in an AF_INET6 message.
        let mut v6 = with(&[&orig, &reply]);
        v6[0] = AF_INET6;
        assert_eq!(
            parse_entry(&v6),
            Err(Malformed::FamilyMismatch { family: AF_INET6 })
        );
        // The well-formed one parses.
        assert!(parse_entry(&with(&[&orig, &reply])).is_ok());
    }

    #[test]
    fn entries_of_other_protocols_parse_without_ports() {
        let icmp = Tuple {
            src: ip("10.0.0.1"),
            dst: ip("10.0.0.2"),
            proto: 1,
            src_port: None,
            dst_port: None,
        };
        let e = FakeEntry {
            family: AF_INET,
            orig: icmp,
            reply: icmp,
            zone: 3,
            id: 9,
        };
        let payload = entry_payload(&e);
        let parsed = parse_entry(&payload).unwrap();
        assert_eq!((parsed.orig, parsed.zone, parsed.id), (icmp, 3, Some(9)));
    }

    #[test]
    fn nested_flag_is_optional_and_unknown_attributes_are_skipped() {
        let t = udp("2001:db8::1", 7, "2001:db8::2", 8);
        let mut plain = tuple_payload(&t);
        // Clear NLA_F_NESTED on the CTA_TUPLE_IP nest header (bytes 2..4).
        let kind = u16::from_ne_bytes([plain[2], plain[3]]) & !NLA_F_NESTED;
        plain[2..4].copy_from_slice(&kind.to_ne_bytes());
        plain.extend(attr(99, &[1, 2, 3])); // unknown, padded
        assert_eq!(parse_tuple(&plain), Ok(t));
    }

    #[test]
    fn error_messages_need_the_whole_nlmsgerr() {
        assert_eq!(parse_error_code(&error_msg(1, -2)[16..]), Ok(-2));
        assert_eq!(
            parse_error_code(&[0xfe, 0xff, 0xff, 0xff]),
            Err(Malformed::ShortPayload {
                what: "NLMSG_ERROR",
                len: 4
            })
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes never panic the datagram handler.
        #[test]
        fn arbitrary_datagrams_do_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let flows = FlowSet::by_family(&[StaleFlow { vip: ip("0.0.0.0"), port: 1, backend: ip("127.0.0.1"), backend_port: 2 }]);
            let _ = handle_dump_datagram(&bytes, 5, &flows[0], &mut BTreeSet::new());
            let _ = parse_entry(&bytes);
        }

        /// Corrupting any bytes of a real entry never panics, and whatever
        /// still parses names a non-empty tuple.
        #[test]
        fn corrupted_entries_do_not_panic(flips in proptest::collection::vec((0usize..164, any::<u8>()), 1..6)) {
            let mut bytes = KERNEL_ENTRY;
            for (at, value) in flips {
                bytes[at] = value;
            }
            for msg in messages(&bytes).flatten() {
                if let Ok(entry) = parse_entry(msg.payload) {
                    prop_assert!(!entry.orig_raw.is_empty());
                }
            }
        }
    }

    // -- matching --

    #[test]
    fn filter_matching() {
        let flow = StaleFlow {
            vip: ip("10.96.0.10"),
            port: 53,
            backend: ip("10.1.0.5"),
            backend_port: 5353,
        };
        let nodeport = StaleFlow {
            vip: ip("0.0.0.0"),
            port: 30053,
            backend: ip("10.1.0.5"),
            backend_port: 5353,
        };
        let nodeport6 = StaleFlow {
            vip: ip("::"),
            port: 30053,
            backend: ip("fd00::5"),
            backend_port: 5353,
        };
        let mixed = StaleFlow {
            vip: ip("10.96.0.11"),
            port: 53,
            backend: ip("fd00::5"),
            backend_port: 5353,
        };
        let sets = FlowSet::by_family(&[flow, nodeport, nodeport6, mixed]);
        assert_eq!(sets.len(), 2);
        assert_eq!(sets[0].family, AF_INET);
        assert!(!sets[0].flows.contains(&mixed) && !sets[1].flows.contains(&mixed));

        let tcp = |mut e: FakeEntry| {
            e.orig.proto = libc::IPPROTO_TCP as u8;
            e.reply.proto = libc::IPPROTO_TCP as u8;
            e
        };
        let client = ("10.2.0.7", 40000);
        let table: Vec<(&str, FakeEntry, bool)> = vec![
            (
                "exact",
                dnat_entry(client, ("10.96.0.10", 53), ("10.1.0.5", 5353), 1),
                true,
            ),
            (
                "other vip",
                dnat_entry(client, ("10.96.0.99", 53), ("10.1.0.5", 5353), 1),
                false,
            ),
            (
                "other port",
                dnat_entry(client, ("10.96.0.10", 54), ("10.1.0.5", 5353), 1),
                false,
            ),
            (
                "other backend",
                dnat_entry(client, ("10.96.0.10", 53), ("10.1.0.6", 5353), 1),
                false,
            ),
            (
                "other backend port",
                dnat_entry(client, ("10.96.0.10", 53), ("10.1.0.5", 53), 1),
                false,
            ),
            (
                "tcp",
                tcp(dnat_entry(
                    client,
                    ("10.96.0.10", 53),
                    ("10.1.0.5", 5353),
                    1,
                )),
                false,
            ),
            (
                "nodeport, any node address",
                dnat_entry(client, ("192.168.1.4", 30053), ("10.1.0.5", 5353), 1),
                true,
            ),
            (
                "nodeport, other backend",
                dnat_entry(client, ("192.168.1.4", 30053), ("10.1.0.9", 5353), 1),
                false,
            ),
            (
                "nodeport6",
                dnat_entry(
                    ("fd00::77", 9),
                    ("2001:db8::4", 30053),
                    ("fd00::5", 5353),
                    1,
                ),
                true,
            ),
            (
                "v6 exact not asked",
                dnat_entry(("fd00::77", 9), ("fd00::10", 53), ("fd00::5", 5353), 1),
                false,
            ),
            (
                "mixed flow never",
                dnat_entry(("fd00::77", 9), ("fd00::11", 53), ("fd00::5", 5353), 1),
                false,
            ),
        ];
        for (name, e, want) in table {
            let payload = entry_payload(&e);
            let entry = parse_entry(&payload).unwrap();
            let got = sets.iter().any(|s| s.matches(&entry));
            assert_eq!(got, want, "{name}");
        }
    }

    // -- the conversation, against a fake kernel --

    #[derive(Default)]
    struct FakeState {
        entries: Vec<FakeEntry>,
        dumps: Vec<u8>,
        sends: usize,
        /// Entries per dump datagram.
        per_datagram: usize,
        dump_error: Option<i32>,
        delete_error: Option<i32>,
        /// The next dump stops with ENOBUFS after its first datagram.
        overrun_next_dump: bool,
        /// In the next delete batch, acks after this many are lost to an
        /// overrun (the deletes still happen).
        lose_acks_after: Option<usize>,
        /// Removed right after the dump (expired before the delete).
        expire_after_dump: Vec<u32>,
        /// Every dump lists every entry twice.
        duplicate: bool,
        /// A stray message with a foreign seq before every answer.
        stray: bool,
    }

    struct FakeKernel {
        state: Rc<RefCell<FakeState>>,
        queue: VecDeque<Result<Vec<u8>, i32>>,
    }

    impl Transport for FakeKernel {
        fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
            let mut st = self.state.borrow_mut();
            st.sends += 1;
            let mut acks = 0;
            for msg in messages(datagram) {
                let msg = msg.unwrap();
                let family = msg.payload[0];
                if st.stray {
                    self.queue
                        .push_back(Ok(error_msg(msg.seq.wrapping_add(1000), -1)));
                }
                if msg.ty == ct_msg_type(IPCTNL_MSG_CT_GET) {
                    assert_eq!(msg.flags, NLM_F_REQUEST | NLM_F_DUMP);
                    st.dumps.push(family);
                    if let Some(code) = st.dump_error {
                        self.queue.push_back(Ok(error_msg(msg.seq, code)));
                        continue;
                    }
                    let mut listed: Vec<&FakeEntry> =
                        st.entries.iter().filter(|e| e.family == family).collect();
                    if st.duplicate {
                        listed.extend(listed.clone());
                    }
                    let mut datagrams: Vec<Vec<u8>> = listed
                        .chunks(st.per_datagram.max(1))
                        .map(|chunk| {
                            chunk
                                .iter()
                                .flat_map(|e| nlmsg(0x0101, 2, msg.seq, &entry_payload(e)))
                                .collect()
                        })
                        .collect();
                    match datagrams.last_mut() {
                        Some(last) => last.extend(done_msg(msg.seq)),
                        None => datagrams.push(done_msg(msg.seq)),
                    }
                    if std::mem::take(&mut st.overrun_next_dump) {
                        datagrams.truncate(1);
                        self.queue.push_back(Ok(datagrams.remove(0)));
                        self.queue.push_back(Err(libc::ENOBUFS));
                    } else {
                        self.queue.extend(datagrams.into_iter().map(Ok));
                    }
                    let expire = std::mem::take(&mut st.expire_after_dump);
                    st.entries.retain(|e| !expire.contains(&e.id));
                } else if msg.ty == ct_msg_type(IPCTNL_MSG_CT_DELETE) {
                    assert_eq!(msg.flags, NLM_F_REQUEST | NLM_F_ACK);
                    let (mut orig, mut id) = (None, None);
                    for a in attrs(&msg.payload[4..]) {
                        let a = a.unwrap();
                        match a.kind {
                            CTA_TUPLE_ORIG => orig = Some(parse_tuple(a.payload).unwrap()),
                            CTA_ID => id = Some(u32::from_be_bytes(a.payload.try_into().unwrap())),
                            _ => {}
                        }
                    }
                    let orig = orig.expect("a delete without a tuple flushes the table");
                    let code = if let Some(code) = st.delete_error {
                        code
                    } else if let Some(at) = st
                        .entries
                        .iter()
                        .position(|e| e.family == family && e.orig == orig && Some(e.id) == id)
                    {
                        st.entries.remove(at);
                        0
                    } else {
                        -libc::ENOENT
                    };
                    acks += 1;
                    match st.lose_acks_after {
                        Some(n) if acks > n => {
                            if acks == n + 1 {
                                self.queue.push_back(Err(libc::ENOBUFS));
                            }
                        }
                        _ => self.queue.push_back(Ok(error_msg(msg.seq, code))),
                    }
                } else {
                    panic!("unexpected message type {:#x}", msg.ty);
                }
            }
            if acks > 0 {
                st.lose_acks_after = None;
            }
            Ok(())
        }

        fn recv(&mut self, buf: &mut [u8], _wait: bool) -> io::Result<usize> {
            match self.queue.pop_front() {
                Some(Ok(d)) => {
                    let n = d.len().min(buf.len());
                    buf[..n].copy_from_slice(&d[..n]);
                    Ok(d.len())
                }
                Some(Err(code)) => Err(io::Error::from_raw_os_error(code)),
                None => Err(io::ErrorKind::WouldBlock.into()),
            }
        }
    }

    fn run(state: &Rc<RefCell<FakeState>>, flows: &[StaleFlow]) -> Result<usize, ConntrackError> {
        delete_with(
            || {
                Ok(FakeKernel {
                    state: state.clone(),
                    queue: VecDeque::new(),
                })
            },
            flows,
        )
    }

    const DNS: StaleFlow = StaleFlow {
        vip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)),
        port: 53,
        backend: IpAddr::V4(Ipv4Addr::new(10, 1, 0, 5)),
        backend_port: 5353,
    };

    /// `n` stale DNS flows (ids 1..=n), plus a live one to another backend
    /// (id 1000) and an IPv6 flow (id 2000).
    fn table(n: u32) -> Vec<FakeEntry> {
        let mut out: Vec<FakeEntry> = (1..=n)
            .map(|i| {
                dnat_entry(
                    ("10.2.0.7", 10000 + i as u16),
                    ("10.96.0.10", 53),
                    ("10.1.0.5", 5353),
                    i,
                )
            })
            .collect();
        out.push(dnat_entry(
            ("10.2.0.7", 9999),
            ("10.96.0.10", 53),
            ("10.1.0.6", 5353),
            1000,
        ));
        out.push(dnat_entry(
            ("fd00::7", 9999),
            ("fd00::10", 53),
            ("fd00::5", 5353),
            2000,
        ));
        out
    }

    fn fake(entries: Vec<FakeEntry>) -> Rc<RefCell<FakeState>> {
        Rc::new(RefCell::new(FakeState {
            entries,
            per_datagram: 7,
            ..FakeState::default()
        }))
    }

    fn ids(state: &Rc<RefCell<FakeState>>) -> Vec<u32> {
        state.borrow().entries.iter().map(|e| e.id).collect()
    }

    #[test]
    fn deletes_matching_entries_over_a_multipart_dump_in_batches() {
        let state = fake(table(150));
        assert_eq!(run(&state, &[DNS]).unwrap(), 150);
        assert_eq!(ids(&state), [1000, 2000]);
        let st = state.borrow();
        assert_eq!(st.dumps, [AF_INET], "one dump, of the flows' family only");
        // One dump send, then 150 deletes in batches of 64.
        assert_eq!(st.sends, 1 + 150usize.div_ceil(DELETE_BATCH));
    }

    #[test]
    fn one_dump_per_family_however_many_flows() {
        let state = fake(table(3));
        let v6 = StaleFlow {
            vip: ip("fd00::10"),
            port: 53,
            backend: ip("fd00::5"),
            backend_port: 5353,
        };
        let other = StaleFlow {
            backend: ip("10.1.0.6"),
            ..DNS
        };
        assert_eq!(run(&state, &[DNS, other, v6, DNS]).unwrap(), 5);
        assert!(ids(&state).is_empty());
        assert_eq!(state.borrow().dumps, [AF_INET, AF_INET6]);
    }

    #[test]
    fn no_flows_no_netlink() {
        let state = fake(table(3));
        assert_eq!(run(&state, &[]).unwrap(), 0);
        assert_eq!(state.borrow().sends, 0);
    }

    #[test]
    fn nothing_matching_sends_no_delete() {
        let state = fake(table(3));
        let flow = StaleFlow { port: 54, ..DNS };
        assert_eq!(run(&state, &[flow]).unwrap(), 0);
        assert_eq!(state.borrow().sends, 1);
        assert_eq!(ids(&state).len(), 5);
    }

    #[test]
    fn entries_gone_before_the_delete_are_not_errors_nor_counted() {
        let state = fake(table(5));
        state.borrow_mut().expire_after_dump = vec![2, 4];
        assert_eq!(run(&state, &[DNS]).unwrap(), 3);
        assert_eq!(ids(&state), [1000, 2000]);
    }

    #[test]
    fn duplicates_in_the_dump_are_deleted_once() {
        let state = fake(table(4));
        state.borrow_mut().duplicate = true;
        assert_eq!(run(&state, &[DNS]).unwrap(), 4);
        assert_eq!(state.borrow().sends, 2);
    }

    #[test]
    fn foreign_messages_are_ignored() {
        let state = fake(table(4));
        state.borrow_mut().stray = true;
        assert_eq!(run(&state, &[DNS]).unwrap(), 4);
    }

    #[test]
    fn a_refused_dump_is_a_kernel_error_and_deletes_nothing() {
        let state = fake(table(4));
        state.borrow_mut().dump_error = Some(-libc::EPERM);
        let err = run(&state, &[DNS]).unwrap_err();
        assert!(
            matches!(&err, ConntrackError::Kernel { request: "dump", source } if source.raw_os_error() == Some(libc::EPERM)),
            "{err:?}"
        );
        assert_eq!(ids(&state).len(), 6);
    }

    #[test]
    fn an_overrun_dump_is_started_over() {
        let state = fake(table(30));
        state.borrow_mut().overrun_next_dump = true;
        assert_eq!(run(&state, &[DNS]).unwrap(), 30);
        assert_eq!(state.borrow().dumps, [AF_INET, AF_INET]);
        assert_eq!(ids(&state), [1000, 2000]);
    }

    #[test]
    fn lost_acks_are_recovered() {
        let state = fake(table(40));
        state.borrow_mut().lose_acks_after = Some(10);
        assert_eq!(run(&state, &[DNS]).unwrap(), 40);
        assert_eq!(ids(&state), [1000, 2000]);
        // The batch, then the 30 unacknowledged requests one by one.
        assert_eq!(state.borrow().sends, 1 + 1 + 30);
    }

    #[test]
    fn refused_deletes_are_reported_with_counts() {
        let state = fake(table(3));
        state.borrow_mut().delete_error = Some(-libc::EPERM);
        match run(&state, &[DNS]).unwrap_err() {
            ConntrackError::DeleteFailed {
                deleted,
                failed,
                first,
            } => {
                assert_eq!((deleted, failed), (0, 3));
                assert_eq!(first.raw_os_error(), Some(libc::EPERM));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_silent_kernel_is_a_timeout() {
        struct Mute;
        impl Transport for Mute {
            fn send(&mut self, _: &[u8]) -> io::Result<()> {
                Ok(())
            }
            fn recv(&mut self, _: &mut [u8], _: bool) -> io::Result<usize> {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
        let err = delete_with(|| Ok(Mute), &[DNS]).unwrap_err();
        assert!(matches!(err, ConntrackError::Timeout { .. }), "{err:?}");
    }

    // -- the real kernel, in a network namespace of its own --

    fn have(tool: &str) -> bool {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
    }

    /// Runs a command (in the calling thread's network namespace, which a
    /// child spawned from it inherits), feeding it `stdin`. Returns stdout,
    /// or what went wrong.
    fn try_sh(cmd: &[&str], stdin: &str) -> Result<String, String> {
        use std::io::Write;
        let mut child = Command::new(cmd[0])
            .args(&cmd[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{cmd:?}: {e}"))?;
        let mut input = child.stdin.take().ok_or("no stdin")?;
        input
            .write_all(stdin.as_bytes())
            .map_err(|e| e.to_string())?;
        drop(input);
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "{cmd:?}: {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        String::from_utf8(out.stdout).map_err(|e| e.to_string())
    }

    fn sh(cmd: &[&str], stdin: &str) -> String {
        try_sh(cmd, stdin).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Sends one datagram to `to` from a fresh socket bound to `from`. The
    /// socket is returned to keep its port from being reused by the next.
    fn send_from(from: &str, to: &str) -> (UdpSocket, u16) {
        let socket = UdpSocket::bind(from).unwrap();
        socket.send_to(b"ping", to).unwrap();
        let port = socket.local_addr().unwrap().port();
        (socket, port)
    }

    fn sorted(mut ports: Vec<u16>) -> Vec<u16> {
        ports.sort_unstable();
        ports
    }

    /// Receives `n` datagrams; returns their source ports.
    fn receive(socket: &UdpSocket, n: usize) -> Vec<u16> {
        let mut buf = [0; 16];
        (0..n)
            .map(|_| {
                let (_, from): (usize, SocketAddr) =
                    socket.recv_from(&mut buf).expect("datagram within 1s");
                from.port()
            })
            .collect()
    }

    /// The UDP conntrack entries of `family` ("ipv4"/"ipv6"), one a line.
    fn listed(family: &str) -> String {
        sh(&["conntrack", "-L", "-f", family, "-p", "udp"], "")
    }

    fn lists(listing: &str, sport: u16, dport: u16) -> bool {
        let needle = format!("sport={sport} dport={dport} ");
        listing.lines().any(|l| l.contains(&needle))
    }

    /// In a network namespace of its own (needs root; the namespace lives
    /// and dies with the test's thread, so nothing outlives a failure):
    /// DNATed UDP flows are tracked by the kernel, the stale ones are
    /// deleted and counted, the others stay.
    #[test]
    fn deletes_stale_flows_from_the_kernel_table() {
        if !have("ip") || !have("nft") || !have("conntrack") {
            eprintln!("skipping: needs ip, nft and conntrack on PATH");
            return;
        }
        crate::dataplane::in_private_netns(in_namespace);
    }

    fn in_namespace() {
        sh(&["ip", "link", "set", "lo", "up"], "");
        sh(
            &["nft", "-f", "-"],
            "table ip ct_test {
                chain out {
                    type nat hook output priority -100;
                    udp dport 5555 dnat to 127.0.0.1:6666
                    udp dport 5556 dnat to 127.0.0.1:6666
                }
            }",
        );
        let v4_backend = UdpSocket::bind("127.0.0.1:6666").unwrap();
        let untouched = UdpSocket::bind("127.0.0.1:7777").unwrap();
        for s in [&v4_backend, &untouched] {
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        }
        // IPv6 too, where the namespace has it: [::1]:5555 → [::1]:6666.
        let v6_backend = match UdpSocket::bind("[::1]:6666")
            .map_err(|e| e.to_string())
            .and_then(|s| {
                try_sh(
                    &["nft", "-f", "-"],
                    "table ip6 ct_test6 {
                        chain out {
                            type nat hook output priority -100;
                            udp dport 5555 dnat to [::1]:6666
                        }
                    }",
                )
                .map(|_| s)
            }) {
            Ok(socket) => Some(socket),
            Err(e) => {
                eprintln!("no IPv6 NAT in the namespace ({e}): testing IPv4 only");
                None
            }
        };

        let mut keep = Vec::new();
        let mut send = |from, to| {
            let (socket, port) = send_from(from, to);
            keep.push(socket);
            port
        };
        let stale: Vec<u16> = (0..3)
            .map(|_| send("127.0.0.1:0", "127.0.0.2:5555"))
            .collect();
        let other_port = send("127.0.0.1:0", "127.0.0.2:5556");
        let not_nated = send("127.0.0.1:0", "127.0.0.1:7777");
        assert_eq!(
            sorted(receive(&v4_backend, 4)),
            sorted([stale.clone(), vec![other_port]].concat()),
            "DNAT to 127.0.0.1:6666 works"
        );
        assert_eq!(receive(&untouched, 1), [not_nated]);
        let stale6: Vec<u16> = match &v6_backend {
            Some(socket) => {
                socket
                    .set_read_timeout(Some(Duration::from_secs(1)))
                    .unwrap();
                let ports: Vec<u16> = (0..2).map(|_| send("[::1]:0", "[::1]:5555")).collect();
                assert_eq!(sorted(receive(socket, 2)), sorted(ports.clone()));
                ports
            }
            None => Vec::new(),
        };

        let before = listed("ipv4");
        for &p in &stale {
            assert!(lists(&before, p, 5555), "tracked before: {before}");
        }
        assert!(
            lists(&before, other_port, 5556) && lists(&before, not_nated, 7777),
            "{before}"
        );
        if !stale6.is_empty() {
            let before6 = listed("ipv6");
            assert!(
                stale6.iter().all(|&p| lists(&before6, p, 5555)),
                "{before6}"
            );
        }

        let flow = StaleFlow {
            vip: ip("127.0.0.2"),
            port: 5555,
            backend: ip("127.0.0.1"),
            backend_port: 6666,
        };
        let flow6 = StaleFlow {
            vip: ip("::1"),
            port: 5555,
            backend: ip("::1"),
            backend_port: 6666,
        };
        let deleted = delete_stale_udp_flows(&[flow, flow6]).unwrap();
        assert_eq!(deleted, stale.len() + stale6.len());

        let after = listed("ipv4");
        for &p in &stale {
            assert!(!lists(&after, p, 5555), "deleted: {after}");
        }
        assert!(
            lists(&after, other_port, 5556),
            "another port stays: {after}"
        );
        assert!(
            lists(&after, not_nated, 7777),
            "an untranslated flow stays: {after}"
        );
        if !stale6.is_empty() {
            let after6 = listed("ipv6");
            assert!(!stale6.iter().any(|&p| lists(&after6, p, 5555)), "{after6}");
        }

        // Again: nothing left to delete.
        assert_eq!(delete_stale_udp_flows(&[flow, flow6]).unwrap(), 0);

        // NodePort form: any destination address, port 5556.
        let nodeport = StaleFlow {
            vip: ip("0.0.0.0"),
            port: 5556,
            ..flow
        };
        assert_eq!(delete_stale_udp_flows(&[nodeport]).unwrap(), 1);
        let last = listed("ipv4");
        assert!(!lists(&last, other_port, 5556), "{last}");
        assert!(lists(&last, not_nated, 7777), "{last}");
    }
}
