//! The bytes on the wire.
//!
//! The netlink framing is netlink-packet-core's: requests are
//! [`NetlinkMessage`]s with a [`NetlinkHeader`]; replies are split with
//! [`NetlinkBuffer`], and their acks, errors and ends of dump are read as
//! [`ErrorMessage`] and [`DoneMessage`]; attributes are walked with
//! [`NlasIterator`] and written through [`Nla`].
//!
//! The ctnetlink payload inside (an `nfgenmsg` header and `CTA_*`
//! attributes) is ours: no crate of the tree covers ctnetlink.
//!
//! Replies are not read with `NetlinkMessage::deserialize`, which would
//! copy every dumped entry into an owned message and flatten our errors
//! into strings: a dump entry is parsed in place, and every inconsistency
//! is a typed [`Malformed`], never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    DecodeError, DoneBuffer, DoneMessage, Emitable, ErrorBuffer, ErrorMessage, NLA_F_NESTED,
    NLA_HEADER_SIZE, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP,
    NLMSG_OVERRUN, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload,
    NetlinkSerializable, Nla, NlaBuffer, NlasIterator, Parseable, parse_ipv6, parse_u8,
    parse_u16_be, parse_u32_be,
};

use super::Malformed;

// ---------------------------------------------------------------------------
// Constants (linux/netlink.h, linux/netfilter/nfnetlink*.h); the generic
// netlink ones come from netlink-packet-core.

/// `struct nlmsghdr` (netlink-packet-core does not export its length).
pub(super) const NLMSG_HDRLEN: usize = 16;
pub(super) const NLA_HDRLEN: usize = NLA_HEADER_SIZE;
pub(super) const NFGENMSG_LEN: usize = 4;
/// `struct nlmsgerr`: the error code and the request's header.
const NLMSGERR_LEN: usize = 4 + NLMSG_HDRLEN;

pub(super) const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const NFNETLINK_V0: u8 = 0;
pub(super) const IPCTNL_MSG_CT_NEW: u16 = 0;
pub(super) const IPCTNL_MSG_CT_GET: u16 = 1;
pub(super) const IPCTNL_MSG_CT_DELETE: u16 = 2;

// enum ctattr_type
pub(super) const CTA_TUPLE_ORIG: u16 = 1;
pub(super) const CTA_TUPLE_REPLY: u16 = 2;
pub(super) const CTA_ID: u16 = 12;
pub(super) const CTA_ZONE: u16 = 18;
pub(super) const CTA_PROTOINFO: u16 = 4;
pub(super) const CTA_PROTOINFO_TCP: u16 = 1;
pub(super) const CTA_PROTOINFO_TCP_STATE: u16 = 1;
/// Kernel-side filtering of a dump (Linux 5.8 and later; earlier kernels
/// ignore it).
pub(super) const CTA_FILTER: u16 = 25;
pub(super) const CTA_FILTER_ORIG_FLAGS: u16 = 1;
/// `CTA_FILTER_FLAG_CTA_PROTO_NUM`: match the original tuple's protocol.
pub(super) const CTA_FILTER_FLAG_PROTO_NUM: u32 = 1 << 3;
// enum ctattr_tuple
pub(super) const CTA_TUPLE_IP: u16 = 1;
pub(super) const CTA_TUPLE_PROTO: u16 = 2;
// enum ctattr_ip
pub(super) const CTA_IP_V4_SRC: u16 = 1;
pub(super) const CTA_IP_V4_DST: u16 = 2;
pub(super) const CTA_IP_V6_SRC: u16 = 3;
pub(super) const CTA_IP_V6_DST: u16 = 4;
// enum ctattr_l4proto
pub(super) const CTA_PROTO_NUM: u16 = 1;
pub(super) const CTA_PROTO_SRC_PORT: u16 = 2;
pub(super) const CTA_PROTO_DST_PORT: u16 = 3;

pub(super) const AF_INET: u8 = libc::AF_INET as u8;
pub(super) const AF_INET6: u8 = libc::AF_INET6 as u8;
pub(super) const IPPROTO_UDP: u8 = libc::IPPROTO_UDP as u8;

pub(super) const fn ct_msg_type(msg: u16) -> u16 {
    (NFNL_SUBSYS_CTNETLINK << 8) | msg
}

const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

// ---------------------------------------------------------------------------
// Netlink framing of replies.

/// One netlink message of a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Message<'a> {
    pub(super) ty: u16,
    pub(super) flags: u16,
    pub(super) seq: u32,
    pub(super) payload: &'a [u8],
}

impl<'a> Message<'a> {
    /// What the message carries: netlink-packet-core's control messages,
    /// or the borrowed payload of a protocol message (whose type is `ty`).
    pub(super) fn decode(&self) -> Result<NetlinkPayload<&'a [u8]>, Malformed> {
        Ok(match self.ty {
            NLMSG_NOOP => NetlinkPayload::Noop,
            NLMSG_ERROR => NetlinkPayload::Error(parse_error(self.payload)?),
            NLMSG_DONE => NetlinkPayload::Done(parse_done(self.payload)?),
            NLMSG_OVERRUN => NetlinkPayload::Overrun(self.payload.to_vec()),
            _ => NetlinkPayload::InnerMessage(self.payload),
        })
    }
}

/// The netlink messages of one datagram; after the first error, nothing.
pub(super) struct Messages<'a> {
    rest: &'a [u8],
}

pub(super) fn messages(datagram: &[u8]) -> Messages<'_> {
    Messages { rest: datagram }
}

impl<'a> Messages<'a> {
    fn parse_one(&mut self) -> Result<Message<'a>, Malformed> {
        let rest = self.rest;
        let left = rest.len();
        // Checks the header and that `nlmsg_len` lies in 16..=left.
        let buffer = NetlinkBuffer::new_checked(rest).map_err(|_| {
            if left < NLMSG_HDRLEN {
                Malformed::TruncatedHeader { left }
            } else {
                Malformed::MessageLength {
                    len: NetlinkBuffer::new(rest).length(),
                    left,
                }
            }
        })?;
        let payload = buffer.payload();
        self.rest = rest
            .get(align4(NLMSG_HDRLEN + payload.len())..)
            .unwrap_or_default();
        Ok(Message {
            ty: buffer.message_type(),
            flags: buffer.flags(),
            seq: buffer.sequence_number(),
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

/// An `NLMSG_ERROR` payload: an ack (`code` `None`) or the kernel's
/// refusal. The whole `struct nlmsgerr` must be there.
pub(super) fn parse_error(payload: &[u8]) -> Result<ErrorMessage, Malformed> {
    let short = Malformed::ShortPayload {
        what: "NLMSG_ERROR",
        len: payload.len(),
    };
    if payload.len() < NLMSGERR_LEN {
        return Err(short);
    }
    ErrorBuffer::new_checked(&payload)
        .and_then(|buffer| ErrorMessage::parse(&buffer))
        .map_err(|_| short)
}

/// An `NLMSG_DONE` payload: the dump's final status (the kernel may leave
/// it out, which is success).
fn parse_done(payload: &[u8]) -> Result<DoneMessage, Malformed> {
    if payload.is_empty() {
        return Ok(DoneMessage::default());
    }
    DoneBuffer::new_checked(&payload)
        .and_then(|buffer| DoneMessage::parse(&buffer))
        .map_err(|_| Malformed::ShortPayload {
            what: "NLMSG_DONE",
            len: payload.len(),
        })
}

// ---------------------------------------------------------------------------
// Attributes.

/// One attribute: its type without the `NLA_F_*` flag bits, and its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Attr<'a> {
    pub(super) kind: u16,
    pub(super) payload: &'a [u8],
}

/// The attributes of a payload; after the first error, nothing. The last
/// attribute may lack its trailing padding; any other leftover is an error.
pub(super) struct Attrs<'a> {
    payload: &'a [u8],
    nlas: NlasIterator<&'a [u8]>,
    /// Where the next attribute starts (past the end after the last one).
    at: usize,
}

pub(super) fn attrs(payload: &[u8]) -> Attrs<'_> {
    Attrs {
        payload,
        nlas: NlasIterator::new(payload),
        at: 0,
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<Attr<'a>, Malformed>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self
            .payload
            .get(self.at..)
            .filter(|rest| !rest.is_empty())?;
        let bad = || {
            let left = rest.len();
            if left < NLA_HDRLEN {
                Malformed::TruncatedAttribute { left }
            } else {
                let nla = NlaBuffer::new(rest);
                Malformed::AttributeLength {
                    kind: nla.kind(),
                    len: nla.length(),
                    left,
                }
            }
        };
        // NlasIterator checks that the length lies in 4..=left.
        let one = match self.nlas.next()? {
            Ok(nla) => {
                let (kind, end) = (nla.kind(), usize::from(nla.length()));
                self.at += align4(end);
                nla.into_inner()
                    .get(NLA_HDRLEN..end)
                    .map(|payload| Attr { kind, payload })
                    .ok_or_else(bad)
            }
            Err(_) => Err(bad()),
        };
        if one.is_err() {
            // Nothing after an error.
            self.at = self.payload.len();
        }
        Some(one)
    }
}

/// An attribute's value through one of netlink-packet-core's exact-size
/// parsers.
fn value<T>(
    what: &'static str,
    payload: &[u8],
    parse: fn(&[u8]) -> Result<T, DecodeError>,
) -> Result<T, Malformed> {
    parse(payload).map_err(|_| Malformed::AttributeSize {
        what,
        len: payload.len(),
    })
}

// ---------------------------------------------------------------------------
// Conntrack entries.

/// One direction of a conntrack entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tuple {
    pub(super) src: IpAddr,
    pub(super) dst: IpAddr,
    pub(super) proto: u8,
    /// Ports, for the protocols that have them.
    pub(super) src_port: Option<u16>,
    pub(super) dst_port: Option<u16>,
}

pub(super) fn parse_tuple(payload: &[u8]) -> Result<Tuple, Malformed> {
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
    let v4 = |what, payload| value(what, payload, parse_u32_be).map(Ipv4Addr::from);
    let v6 = |what, payload| value(what, payload, parse_ipv6).map(Ipv6Addr::from);
    let (mut v4_src, mut v4_dst, mut v6_src, mut v6_dst) = (None, None, None, None);
    for attr in attrs(payload) {
        let attr = attr?;
        match attr.kind {
            CTA_IP_V4_SRC => v4_src = Some(v4("CTA_IP_V4_SRC", attr.payload)?),
            CTA_IP_V4_DST => v4_dst = Some(v4("CTA_IP_V4_DST", attr.payload)?),
            CTA_IP_V6_SRC => v6_src = Some(v6("CTA_IP_V6_SRC", attr.payload)?),
            CTA_IP_V6_DST => v6_dst = Some(v6("CTA_IP_V6_DST", attr.payload)?),
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
            CTA_PROTO_NUM => num = Some(value("CTA_PROTO_NUM", attr.payload, parse_u8)?),
            CTA_PROTO_SRC_PORT => {
                src = Some(value("CTA_PROTO_SRC_PORT", attr.payload, parse_u16_be)?);
            }
            CTA_PROTO_DST_PORT => {
                dst = Some(value("CTA_PROTO_DST_PORT", attr.payload, parse_u16_be)?);
            }
            _ => {}
        }
    }
    Ok((num.ok_or(Malformed::Missing("CTA_PROTO_NUM"))?, src, dst))
}

/// What a dump says about one conntrack entry, as far as we need it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Entry<'a> {
    /// `nfgen_family`: `AF_INET` or `AF_INET6`.
    pub(super) family: u8,
    pub(super) orig: Tuple,
    pub(super) reply: Tuple,
    /// The payload of `CTA_TUPLE_ORIG`, as received.
    pub(super) orig_raw: &'a [u8],
    /// `CTA_ZONE`, 0 when absent.
    pub(super) zone: u16,
    pub(super) id: Option<u32>,
    /// `CTA_PROTOINFO_TCP_STATE` of a TCP entry (`TCP_CONNTRACK_*`).
    pub(super) tcp_state: Option<u8>,
}

/// Parses the payload (after the netlink header) of one conntrack message.
pub(super) fn parse_entry(payload: &[u8]) -> Result<Entry<'_>, Malformed> {
    let (nfgen, body) = payload
        .split_at_checked(NFGENMSG_LEN)
        .ok_or(Malformed::ShortPayload {
            what: "conntrack message",
            len: payload.len(),
        })?;
    let family = nfgen[0];
    let (mut orig, mut reply, mut zone, mut id, mut tcp_state) = (None, None, 0, None, None);
    for attr in attrs(body) {
        let attr = attr?;
        match attr.kind {
            CTA_TUPLE_ORIG => orig = Some((parse_tuple(attr.payload)?, attr.payload)),
            CTA_TUPLE_REPLY => reply = Some(parse_tuple(attr.payload)?),
            CTA_ZONE => zone = value("CTA_ZONE", attr.payload, parse_u16_be)?,
            CTA_ID => id = Some(value("CTA_ID", attr.payload, parse_u32_be)?),
            CTA_PROTOINFO => tcp_state = parse_tcp_state(attr.payload)?.or(tcp_state),
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
        tcp_state,
    })
}

/// `CTA_PROTOINFO_TCP_STATE` inside a `CTA_PROTOINFO` nest, if there.
fn parse_tcp_state(protoinfo: &[u8]) -> Result<Option<u8>, Malformed> {
    for attr in attrs(protoinfo) {
        let attr = attr?;
        if attr.kind != CTA_PROTOINFO_TCP {
            continue;
        }
        for inner in attrs(attr.payload) {
            let inner = inner?;
            if inner.kind == CTA_PROTOINFO_TCP_STATE {
                return match inner.payload {
                    [state] => Ok(Some(*state)),
                    other => Err(Malformed::AttributeSize {
                        what: "CTA_PROTOINFO_TCP_STATE",
                        len: other.len(),
                    }),
                };
            }
        }
    }
    Ok(None)
}

// ---------------------------------------------------------------------------
// Requests.

/// An attribute of a delete request.
enum CtAttr<'a> {
    /// The payload of a `CTA_TUPLE_ORIG` nest.
    TupleOrig(&'a [u8]),
    Zone(u16),
    Id(u32),
    /// A `CTA_FILTER` nest of one `CTA_FILTER_ORIG_FLAGS`.
    FilterOrig(u32),
}

/// The payload of a `CTA_TUPLE_ORIG` nest that names only a protocol.
fn tuple_of_protocol(protocol: u8) -> Vec<u8> {
    let mut num = Vec::new();
    put_attr(&mut num, CTA_PROTO_NUM, &[protocol]);
    let mut tuple = Vec::new();
    put_attr(&mut tuple, CTA_TUPLE_PROTO | NLA_F_NESTED, &num);
    tuple
}

/// Appends attribute `kind` with `payload`, padded to 4 bytes.
fn put_attr(buf: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = NLA_HDRLEN + payload.len();
    // Only called with a few bytes of payload.
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len() + align4(len) - len, 0);
}

impl Nla for CtAttr<'_> {
    fn value_len(&self) -> usize {
        match self {
            CtAttr::TupleOrig(tuple) => tuple.len(),
            CtAttr::Zone(_) => 2,
            CtAttr::Id(_) => 4,
            CtAttr::FilterOrig(_) => NLA_HDRLEN + 4,
        }
    }

    fn kind(&self) -> u16 {
        match self {
            CtAttr::TupleOrig(_) => CTA_TUPLE_ORIG | NLA_F_NESTED,
            CtAttr::Zone(_) => CTA_ZONE,
            CtAttr::Id(_) => CTA_ID,
            CtAttr::FilterOrig(_) => CTA_FILTER | NLA_F_NESTED,
        }
    }

    fn emit_value(&self, buffer: &mut [u8]) {
        match self {
            CtAttr::TupleOrig(tuple) => buffer.copy_from_slice(tuple),
            CtAttr::Zone(zone) => buffer.copy_from_slice(&zone.to_be_bytes()),
            CtAttr::Id(id) => buffer.copy_from_slice(&id.to_be_bytes()),
            CtAttr::FilterOrig(flags) => {
                let mut nest = Vec::with_capacity(NLA_HDRLEN + 4);
                // Filter flags are host-endian (NLA_U32), unlike CTA_ID.
                put_attr(&mut nest, CTA_FILTER_ORIG_FLAGS, &flags.to_ne_bytes());
                buffer.copy_from_slice(&nest);
            }
        }
    }
}

/// A ctnetlink request: the `nfgenmsg` header and the attributes.
struct CtRequest<'a> {
    /// `IPCTNL_MSG_*`.
    msg: u16,
    family: u8,
    attrs: &'a [CtAttr<'a>],
}

impl NetlinkSerializable for CtRequest<'_> {
    fn message_type(&self) -> u16 {
        ct_msg_type(self.msg)
    }

    fn buffer_len(&self) -> usize {
        NFGENMSG_LEN + self.attrs.buffer_len()
    }

    fn serialize(&self, buffer: &mut [u8]) {
        let (nfgen, attrs) = buffer.split_at_mut(NFGENMSG_LEN);
        // nfgen_family, version, res_id (big endian) 0.
        nfgen.copy_from_slice(&[self.family, NFNETLINK_V0, 0, 0]);
        self.attrs.emit(attrs);
    }
}

/// Appends one netlink message, to the kernel, carrying `request`.
fn put_message(
    buf: &mut Vec<u8>,
    flags: u16,
    seq: u32,
    request: CtRequest<'_>,
) -> Result<(), Malformed> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    // port_number 0: the kernel.
    let mut message = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(request));
    let len = message.buffer_len();
    if u32::try_from(len).is_err() {
        return Err(Malformed::AttributeTooLong { len });
    }
    message.finalize();
    let start = buf.len();
    buf.resize(start + align4(len), 0);
    message.serialize(&mut buf[start..start + len]);
    Ok(())
}

/// Appends a request to dump the table of `family`: only the entries of
/// `protocol` when given (the kernel filters, where it can: a table of
/// 100 000 TCP entries then costs nothing to a UDP cleanup), else all.
pub(super) fn put_dump_request(
    buf: &mut Vec<u8>,
    family: u8,
    seq: u32,
    protocol: Option<u8>,
) -> Result<(), Malformed> {
    let tuple;
    let filtered;
    let attrs: &[CtAttr<'_>] = match protocol {
        Some(protocol) => {
            tuple = tuple_of_protocol(protocol);
            filtered = [
                CtAttr::TupleOrig(&tuple),
                CtAttr::FilterOrig(CTA_FILTER_FLAG_PROTO_NUM),
            ];
            &filtered
        }
        None => &[],
    };
    let request = CtRequest {
        msg: IPCTNL_MSG_CT_GET,
        family,
        attrs,
    };
    put_message(buf, NLM_F_REQUEST | NLM_F_DUMP, seq, request)
}

/// What names one entry to delete.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct DeleteRequest {
    pub(super) family: u8,
    /// The payload of the entry's `CTA_TUPLE_ORIG`, never empty.
    pub(super) orig: Vec<u8>,
    pub(super) zone: u16,
    pub(super) id: Option<u32>,
}

impl DeleteRequest {
    pub(super) fn of(entry: &Entry<'_>) -> Self {
        DeleteRequest {
            family: entry.family,
            orig: entry.orig_raw.to_vec(),
            zone: entry.zone,
            id: entry.id,
        }
    }

    pub(super) fn put(&self, buf: &mut Vec<u8>, seq: u32) -> Result<(), Malformed> {
        if self.orig.is_empty() {
            // Without a tuple the kernel would flush the table.
            return Err(Malformed::Missing("CTA_TUPLE_ORIG"));
        }
        let len = NLA_HDRLEN + self.orig.len();
        if u16::try_from(len).is_err() {
            return Err(Malformed::AttributeTooLong { len });
        }
        let mut attrs = vec![CtAttr::TupleOrig(&self.orig)];
        if self.zone != 0 {
            attrs.push(CtAttr::Zone(self.zone));
        }
        if let Some(id) = self.id {
            attrs.push(CtAttr::Id(id));
        }
        let request = CtRequest {
            msg: IPCTNL_MSG_CT_DELETE,
            family: self.family,
            attrs: &attrs,
        };
        put_message(buf, NLM_F_REQUEST | NLM_F_ACK, seq, request)
    }
}
